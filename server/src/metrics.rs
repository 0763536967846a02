//! The backend's metrics, served in Prometheus's text format at `GET /metrics`.
//!
//! Every name starts with `idempotency_server_` (the filter's own start with `idempotency_`), and
//! every label is one of a fixed set of values: never a key, a token, a path as sent, or a
//! client's method. What each counts is in README.md (Backend, Metrics).
//!
//! Why the `prometheus` crate (not the `metrics` facade with its exporter): each server has a
//! [`Registry`] of its own, so several servers in one process (the end-to-end tests, the
//! benchmark) count apart, with no global recorder to install; and every counter and histogram
//! a request touches is resolved once, here, to a handle whose update is one atomic add (no
//! label lookup on the hot path, except the HTTP request counter's, keyed by the status).
//!
//! A store adds its own ([`crate::Store::register_metrics`]): the embedded store's group commit.

use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::store::{Store, StoreError};

/// The prefix of every metric of the backend.
pub const PREFIX: &str = "idempotency_server_";

/// The content type of `GET /metrics`: the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Buckets of the latency histograms, in seconds: 100 µs to 10 s (a store call's time-out is
/// 2 s by default; an allocation that waits, up to 30 s, is in its own histogram).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Buckets of how long an allocation waited (`wait_ms`, at most 30 s).
pub const WAIT_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0,
];

/// Labels with a fixed set of values, each a counter resolved at start.
pub trait Label: Copy + 'static {
    const ALL: &'static [Self];
    fn as_str(self) -> &'static str;
    fn index(self) -> usize;
}

macro_rules! label {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal,)* }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)*
        }

        impl Label for $name {
            const ALL: &'static [Self] = &[$($name::$variant,)*];

            fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                }
            }

            fn index(self) -> usize {
                self as usize
            }
        }
    };
}

label! {
    /// How an allocation (`PUT /api/v2/captures`) ended.
    Allocation {
        /// 202 for a key that held no lease.
        Allocated => "allocated",
        /// 202 for a key whose lease had expired: its holder never recorded nor released.
        TakenOver => "taken_over",
        /// 200: a recorded response replayed.
        Replayed => "replayed",
        /// 409: another request holds the key (also after waiting `wait_ms` in vain).
        Conflict => "conflict",
        /// 200 after waiting (`wait_ms`) for the holder to record.
        Waited => "waited",
        /// 422: the key was used with another fingerprint.
        Mismatch => "mismatch",
        /// 400, 413 or a malformed key (422): refused before the store.
        Invalid => "invalid",
        /// 503: the store failed.
        Error => "error",
    }
}

label! {
    /// How a record ended (a single call or a batch item).
    Recording {
        /// 200: stored.
        Stored => "stored",
        /// 403: not allocated, completed, expired, or another token.
        Forbidden => "forbidden",
        /// 413: larger than the store keeps (MongoDB's 16 MiB).
        TooLarge => "too_large",
        /// 400, 413, 422: refused before the store.
        Invalid => "invalid",
        /// 503: the store failed.
        Error => "error",
    }
}

label! {
    /// How a release ended (a single call or a batch item).
    Releasing {
        /// 200: the key is free.
        Released => "released",
        /// 403: as for a record.
        Forbidden => "forbidden",
        /// 400, 413, 422: refused before the store.
        Invalid => "invalid",
        /// 503: the store failed.
        Error => "error",
    }
}

label! {
    /// The API's operations, each with a latency histogram.
    Operation {
        Allocate => "allocate",
        Record => "record",
        Release => "release",
        Batch => "batch",
    }
}

label! {
    /// The calls the server makes to its store.
    StoreCall {
        Allocate => "allocate",
        Record => "record",
        Release => "release",
        Batch => "batch",
        Ready => "ready",
        Purge => "purge",
    }
}

label! {
    /// What kind of failure of the store ([`StoreError`]).
    ErrorKind {
        Closed => "closed",
        Unavailable => "unavailable",
        Timeout => "timeout",
        Corrupt => "corrupt",
    }
}

impl ErrorKind {
    pub fn of(error: &StoreError) -> ErrorKind {
        match error {
            StoreError::Closed => ErrorKind::Closed,
            StoreError::Unavailable(_) => ErrorKind::Unavailable,
            StoreError::TimedOut(_) => ErrorKind::Timeout,
            StoreError::Corrupt(_) => ErrorKind::Corrupt,
        }
    }
}

/// The methods a route label may carry; any other is counted as `other`, so that a client
/// cannot make a label of its own.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// One counter per value of `L`, all present (at 0) from the start.
struct Counters<L: Label> {
    counters: Vec<IntCounter>,
    _label: std::marker::PhantomData<L>,
}

impl<L: Label> Counters<L> {
    fn new(registry: &Registry, name: &str, help: &str, label: &str) -> Counters<L> {
        let family = IntCounterVec::new(Opts::new(format!("{PREFIX}{name}"), help), &[label])
            .expect("a valid metric");
        registry
            .register(Box::new(family.clone()))
            .expect("a metric registered once");
        Counters {
            counters: L::ALL
                .iter()
                .map(|l| family.with_label_values(&[l.as_str()]))
                .collect(),
            _label: std::marker::PhantomData,
        }
    }

    fn inc(&self, label: L) {
        self.counters[label.index()].inc();
    }
}

/// One histogram per value of `L`.
fn histograms<L: Label>(
    registry: &Registry,
    name: &str,
    help: &str,
    label: &str,
    buckets: &[f64],
) -> Vec<Histogram> {
    let family = HistogramVec::new(
        HistogramOpts::new(format!("{PREFIX}{name}"), help).buckets(buckets.to_vec()),
        &[label],
    )
    .expect("a valid metric");
    registry
        .register(Box::new(family.clone()))
        .expect("a metric registered once");
    L::ALL
        .iter()
        .map(|l| family.with_label_values(&[l.as_str()]))
        .collect()
}

/// Every metric of one server.
pub struct Metrics {
    registry: Registry,
    allocations: Counters<Allocation>,
    records: Counters<Recording>,
    releases: Counters<Releasing>,
    http_requests: IntCounterVec,
    operations: Vec<Histogram>,
    wait: Histogram,
    store_calls: Vec<Histogram>,
    /// Per call, per kind.
    store_errors: Vec<Vec<IntCounter>>,
}

impl Metrics {
    /// The metrics of a server on `store` (which adds its own).
    pub fn new(store: &dyn Store) -> Metrics {
        let registry = Registry::new();
        let build = IntGaugeVec::new(
            Opts::new(
                format!("{PREFIX}build_info"),
                "The server's version and store: always 1.",
            ),
            &["version", "store"],
        )
        .expect("a valid metric");
        build
            .with_label_values(&[env!("CARGO_PKG_VERSION"), store.name()])
            .set(1);
        registry
            .register(Box::new(build))
            .expect("a metric registered once");
        let http_requests = IntCounterVec::new(
            Opts::new(
                format!("{PREFIX}http_requests_total"),
                "HTTP requests answered, by route (the route's template, or `unmatched`), method and status.",
            ),
            &["route", "method", "status"],
        )
        .expect("a valid metric");
        registry
            .register(Box::new(http_requests.clone()))
            .expect("a metric registered once");
        let wait = Histogram::with_opts(
            HistogramOpts::new(
                format!("{PREFIX}allocation_wait_seconds"),
                "How long allocations with wait_ms waited for the key's holder, whatever they got.",
            )
            .buckets(WAIT_BUCKETS.to_vec()),
        )
        .expect("a valid metric");
        registry
            .register(Box::new(wait.clone()))
            .expect("a metric registered once");
        let errors = IntCounterVec::new(
            Opts::new(
                format!("{PREFIX}store_errors_total"),
                "Failed store operations (each a 503), by call and kind; a batch counts each item.",
            ),
            &["call", "kind"],
        )
        .expect("a valid metric");
        registry
            .register(Box::new(errors.clone()))
            .expect("a metric registered once");
        let store_errors = StoreCall::ALL
            .iter()
            .map(|call| {
                ErrorKind::ALL
                    .iter()
                    .map(|kind| errors.with_label_values(&[call.as_str(), kind.as_str()]))
                    .collect()
            })
            .collect();
        let metrics = Metrics {
            allocations: Counters::new(
                &registry,
                "allocations_total",
                "Allocations, by outcome.",
                "outcome",
            ),
            records: Counters::new(
                &registry,
                "records_total",
                "Records (single calls and batch items), by outcome.",
                "outcome",
            ),
            releases: Counters::new(
                &registry,
                "releases_total",
                "Releases (single calls and batch items), by outcome.",
                "outcome",
            ),
            http_requests,
            operations: histograms::<Operation>(
                &registry,
                "operation_duration_seconds",
                "Time to answer each API operation, from its request to its answer (waits included).",
                "operation",
                LATENCY_BUCKETS,
            ),
            wait,
            store_calls: histograms::<StoreCall>(
                &registry,
                "store_call_duration_seconds",
                "Time of each call to the store, by call.",
                "call",
                LATENCY_BUCKETS,
            ),
            store_errors,
            registry,
        };
        store.register_metrics(&metrics.registry);
        metrics
    }

    pub fn allocation(&self, outcome: Allocation) {
        self.allocations.inc(outcome);
    }

    pub fn record(&self, outcome: Recording) {
        self.records.inc(outcome);
    }

    pub fn release(&self, outcome: Releasing) {
        self.releases.inc(outcome);
    }

    pub fn waited(&self, waited: Duration) {
        self.wait.observe(waited.as_secs_f64());
    }

    pub fn operation(&self, operation: Operation, took: Duration) {
        self.operations[operation.index()].observe(took.as_secs_f64());
    }

    /// One HTTP request answered. `route` is the route's template (`None`: no route).
    pub fn http_request(&self, route: Option<&str>, method: &axum::http::Method, status: u16) {
        // A status is three digits (`StatusCode` holds 100 to 999): written on the stack, not
        // in a `String` per request.
        let digits = [100, 10, 1].map(|unit| b'0' + (status / unit % 10) as u8);
        let status = std::str::from_utf8(&digits).unwrap_or("???");
        self.http_requests
            .with_label_values(&[route.unwrap_or("unmatched"), method_label(method), status])
            .inc();
    }

    pub fn store_call(&self, call: StoreCall, took: Duration) {
        self.store_calls[call.index()].observe(took.as_secs_f64());
    }

    pub fn store_error(&self, call: StoreCall, error: &StoreError) {
        self.store_errors[call.index()][ErrorKind::of(error).index()].inc();
    }

    /// Everything, in the text exposition format.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# the metrics could not be encoded: {e}\n"))
    }
}
