//! Secrets in logs: the idempotency keys, tokens, request and response bodies that a test
//! sent must never appear in a log line, at any level, neither in the filter's (the host's
//! log) nor in the backend's.
//!
//! - [`capture_backend_logs`] installs (once per test process) a `tracing` subscriber that
//!   keeps every event of the in-process backend, at every level (`idempotency_server` at
//!   TRACE, its dependencies at INFO), as one line with all its fields; [`backend_lines`]
//!   reads them.
//! - [`Secrets`] collects what a test sent (from the counting upstream's log of traffic, and
//!   whatever else the test adds) and [`Secrets::leaks`] finds them in log lines.

use std::sync::Mutex;

use crate::upstream::Upstream;

/// Shorter strings are not looked for: they would be found by chance in ordinary words.
pub const MIN_LEN: usize = 8;

/// A longer one is looked for by its first this many bytes: no log line holds 64 bytes of a
/// body by chance, a line that holds it cut short is found too, and the finder stays small
/// (one built over the whole of multi-megabyte bodies, as the hostile-input tests send, took
/// minutes per scan).
pub const MAX_PATTERN_LEN: usize = 64;

static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Keeps every backend event of this process from now on (idempotent).
pub fn capture_backend_logs() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    static INSTALLED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    INSTALLED.get_or_init(|| {
        let _ = tracing_subscriber::registry()
            .with(capture_layer())
            .try_init();
    });
}

/// The layer [`capture_backend_logs`] installs, with its own level filter, for a test binary
/// whose one subscriber has other layers too (`tracing` allows one per process).
pub fn capture_layer<S>() -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let filter = tracing_subscriber::filter::Targets::new()
        .with_default(tracing::Level::INFO)
        .with_target("idempotency_server", tracing::Level::TRACE);
    tracing_subscriber::Layer::with_filter(Capture, filter)
}

/// Every backend event captured so far: `LEVEL target: message field=value …`.
pub fn backend_lines() -> Vec<String> {
    backend_lines_since(0)
}

/// How many backend events were captured so far: where a test's own start.
pub fn backend_mark() -> usize {
    LINES.lock().unwrap().len()
}

/// The backend events captured since `mark` (those of every test running meanwhile).
pub fn backend_lines_since(mark: usize) -> Vec<String> {
    LINES
        .lock()
        .unwrap()
        .get(mark..)
        .unwrap_or_default()
        .to_vec()
}

struct Capture;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Fields(String);
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                use std::fmt::Write as _;
                if field.name() == "message" {
                    let _ = write!(self.0, " {value:?}");
                } else {
                    let _ = write!(self.0, " {}={value:?}", field.name());
                }
            }
        }
        let meta = event.metadata();
        let mut fields = Fields(format!("{} {}:", meta.level(), meta.target()));
        event.record(&mut fields);
        LINES.lock().unwrap().push(fields.0);
    }
}

/// What must not be logged (a set: a long run adds hundreds of thousands).
#[derive(Default, Debug, Clone)]
pub struct Secrets(std::collections::BTreeSet<Vec<u8>>);

impl Secrets {
    pub fn new() -> Secrets {
        Secrets::default()
    }

    /// Adds one (ignored when shorter than [`MIN_LEN`], its first [`MAX_PATTERN_LEN`] bytes
    /// when longer).
    pub fn add(&mut self, secret: impl AsRef<[u8]>) {
        let s = secret.as_ref();
        let s = s.get(..MAX_PATTERN_LEN).unwrap_or(s);
        if s.len() >= MIN_LEN && !self.0.contains(s) {
            self.0.insert(s.to_vec());
        }
    }

    /// Everything the upstream saw and sent: each request's key (as sent, and without the
    /// quotes of its structured-field form), its `authorization`, its body, and each
    /// response body.
    pub fn of_traffic(upstream: &Upstream) -> Secrets {
        let mut secrets = Secrets::new();
        for seen in upstream.requests() {
            for (name, value) in &seen.headers {
                if name == "idempotency-key" || name == "authorization" {
                    secrets.add(value);
                    secrets.add(
                        value
                            .strip_prefix(b"\"")
                            .unwrap_or(value)
                            .strip_suffix(b"\"")
                            .unwrap_or(value),
                    );
                    secrets.add(value.strip_prefix(b"Bearer ").unwrap_or(value));
                }
            }
            secrets.add(&seen.body);
        }
        for body in upstream.response_bodies() {
            secrets.add(body);
        }
        secrets
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The lines that contain a secret, each with the first secret it contains. (One pass
    /// per line whatever the number of secrets: a run sends thousands of keys.)
    pub fn leaks<'a>(&self, lines: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        if self.0.is_empty() {
            return Vec::new();
        }
        let secrets: Vec<&Vec<u8>> = self.0.iter().collect();
        let finder = aho_corasick::AhoCorasick::new(&secrets).expect("a finder of the secrets");
        lines
            .into_iter()
            .filter_map(|line| {
                let found = finder.find(line.as_bytes())?;
                let secret = secrets[found.pattern().as_usize()];
                Some(format!("{:?} in: {line}", String::from_utf8_lossy(secret)))
            })
            .collect()
    }

    /// Panics listing the first leaks, if any.
    pub fn assert_not_in<'a>(&self, what: &str, lines: impl IntoIterator<Item = &'a str>) {
        let leaks = self.leaks(lines);
        assert!(
            leaks.is_empty(),
            "{} secret(s) in the {what} logs, the first: {:#?}",
            leaks.len(),
            &leaks[..leaks.len().min(10)]
        );
    }
}

/// The filter's own lines (`proxy_log`, and its stdout and stderr), not the host's.
pub fn filter_lines(host: &crate::Host) -> Vec<String> {
    host.logs()
        .into_iter()
        .filter(|l| l.source != crate::observed::Source::Host)
        .map(|l| l.message)
        .collect()
}

/// Neither the filter in `host` nor any in-process backend (since `mark`, see
/// [`backend_mark`]) logged one of `secrets`.
pub fn assert_not_logged(host: &crate::Host, mark: usize, secrets: &Secrets) {
    secrets.assert_not_in("filter", filter_lines(host).iter().map(String::as_str));
    let backend = backend_lines_since(mark);
    secrets.assert_not_in("backend", backend.iter().map(String::as_str));
}

#[cfg(test)]
mod tests {
    use super::Secrets;

    #[test]
    fn finds_each_secret_once_per_line_and_ignores_short_ones() {
        let mut s = Secrets::new();
        s.add("order-4711-key");
        s.add("\"order-4711-key\"");
        s.add("short");
        assert_eq!(s.len(), 2, "a string under MIN_LEN is not looked for");
        let lines = [
            "allocated key=order-4711-key",
            "nothing to see",
            "short lines",
            "both \"order-4711-key\" and order-4711-key",
        ];
        let leaks = s.leaks(lines);
        assert_eq!(leaks.len(), 2, "{leaks:?}");
        assert!(leaks[0].ends_with("allocated key=order-4711-key"));
        assert!(Secrets::new().leaks(lines).is_empty());
    }

    #[test]
    fn a_long_secret_is_found_by_its_start_even_cut_short() {
        let body: String = (0..200_000).map(|i: u32| i.to_string()).collect();
        let mut s = Secrets::new();
        s.add(&body);
        s.add(format!("{body}-and-more"));
        assert_eq!(s.len(), 1, "the same first bytes are one pattern");
        let cut = format!("stored response_body={}…", &body[..100]);
        assert_eq!(s.leaks([cut.as_str(), "another line"]).len(), 1);
        assert!(s.leaks([&body[1..80]]).is_empty(), "not from its middle");
    }
}
