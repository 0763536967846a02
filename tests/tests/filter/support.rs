//! Shared set-up of the end-to-end tests: the product filter (`idempotency.wasm`, built once
//! per test binary by the host's build helper) in the test host, the real backend
//! in-process (embedded store in a temp dir, ephemeral port), the counting upstream, and the
//! helpers the tests read results with. No sleeps: the clock moves with `tick`, waits are
//! `settle` or [`eventually`] (polling with a deadline).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use idempotency_tests::{ClientRequest, ClientResponse, Host, HostBuilder, Mode, Upstream, build};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// Runs an `async fn(Mode)` as one test per mode: `<name>::ngx` and `<name>::envoy`.
#[macro_export]
macro_rules! both_modes {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn ngx() {
                $crate::support::bounded(super::$name(idempotency_tests::Mode::Ngx)).await
            }
            #[tokio::test]
            async fn envoy() {
                $crate::support::bounded(super::$name(idempotency_tests::Mode::Envoy)).await
            }
        }
    )*};
}

/// The metric names, exactly as README's Metrics table gives them.
pub mod metric {
    pub const NO_KEY: &str = "idempotency_requests_no_key_total";
    pub const ALLOCATED: &str = "idempotency_requests_allocated_total";
    pub const REPLAYED: &str = "idempotency_requests_replayed_total";
    pub const CONFLICT: &str = "idempotency_requests_conflict_total";
    pub const WAITED: &str = "idempotency_requests_waited_total";
    pub const MISMATCH: &str = "idempotency_requests_mismatch_total";
    pub const MISSING_KEY: &str = "idempotency_requests_missing_key_total";
    pub const INVALID_KEY: &str = "idempotency_requests_invalid_key_total";
    pub const TOO_LARGE: &str = "idempotency_requests_too_large_total";
    pub const LENGTH_REQUIRED: &str = "idempotency_requests_length_required_total";
    pub const SERVER_ERROR: &str = "idempotency_requests_server_error_total";
    pub const PASSED_ON_ERROR: &str = "idempotency_requests_passed_on_error_total";
    pub const RECORDED: &str = "idempotency_recorded_total";
    pub const RELEASED: &str = "idempotency_released_total";
    pub const RECORD_FAILED: &str = "idempotency_record_failed_total";
    pub const QUEUE_DROPPED: &str = "idempotency_queue_dropped_total";
    pub const GRPC_PASSED: &str = "idempotency_requests_grpc_passed_total";
}

/// The problem types, exactly as README's Problems table gives them.
pub mod problem {
    pub const MISSING_KEY: &str = "urn:idempotency:problem:missing-key";
    pub const INVALID_KEY: &str = "urn:idempotency:problem:invalid-key";
    pub const IN_FLIGHT: &str = "urn:idempotency:problem:in-flight";
    pub const PAYLOAD_TOO_LARGE: &str = "urn:idempotency:problem:payload-too-large";
    pub const BODY_SPOOLED: &str = "urn:idempotency:problem:body-spooled";
    pub const LENGTH_REQUIRED: &str = "urn:idempotency:problem:length-required";
    pub const MISMATCH: &str = "urn:idempotency:problem:fingerprint-mismatch";
    pub const BACKEND_UNAVAILABLE: &str = "urn:idempotency:problem:backend-unavailable";
}

/// A test fails instead of hanging: none takes more than a minute.
pub async fn bounded(test: impl std::future::Future<Output = ()>) {
    if tokio::time::timeout(Duration::from_secs(60), test)
        .await
        .is_err()
    {
        panic!("the test did not finish within 60 s");
    }
}

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

/// The real backend, in-process: embedded store in its own temp dir, an ephemeral port.
pub struct Backend {
    pub addr: SocketAddr,
    dir: PathBuf,
    token: Option<String>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Backend {
    pub async fn start() -> Backend {
        Backend::start_with_token(None).await
    }

    /// With the backend's `API_TOKEN` set.
    pub async fn start_with_token(token: Option<&str>) -> Backend {
        let dir = std::env::temp_dir().join(format!(
            "idempotency-e2e-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut b = Backend {
            addr: listener.local_addr().unwrap(),
            dir,
            token: token.map(str::to_string),
            stop: None,
            task: None,
        };
        b.serve(listener);
        b
    }

    fn serve(&mut self, listener: TcpListener) {
        // Its log lines are scanned for what the tests sent (`E2e::finish`), its spans kept.
        spans();
        let mut config = idempotency_server::Config::new(&self.dir);
        // Never MongoDB, whatever MONGODB_URI says.
        config.store = Some(idempotency_server::StoreKind::Embedded);
        config.api_token = self.token.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        self.stop = Some(stop);
        self.task = Some(tokio::spawn(idempotency_server::serve(
            config,
            listener,
            async {
                let _ = stopped.await;
            },
        )));
    }

    /// Stops it gracefully (the store is flushed and the dir unlocked); its port then
    /// refuses connections.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("the backend task")
                .expect("the backend ran");
        }
    }

    /// Starts it again on the same port and data dir (what it stored is still there).
    pub async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where the filter's calls go.
pub enum Target {
    /// The real backend.
    Backend,
    /// The real backend with its `API_TOKEN`.
    BackendWithToken(&'static str),
    /// Something else at this address (a stand-in that never answers, a dead port).
    At(SocketAddr),
}

/// Builds an [`E2e`].
pub struct Setup {
    mode: Mode,
    config: Value,
    target: Target,
    /// envoy: the name of the backend's cluster (`server.upstream`).
    cluster: String,
    host: Vec<Box<dyn FnOnce(HostBuilder) -> HostBuilder>>,
}

impl Setup {
    /// Merged into the base configuration (`server.upstream` is set for the mode).
    pub fn config(mut self, patch: Value) -> Setup {
        merge(&mut self.config, patch);
        self
    }

    pub fn target(mut self, target: Target) -> Setup {
        self.target = target;
        self
    }

    /// envoy: the backend's cluster name (`idempotency` by default), e.g. an Istio one.
    pub fn cluster(mut self, name: &str) -> Setup {
        self.cluster = name.to_string();
        self
    }

    /// Host options (chunk sizes, buffer sizes, …).
    pub fn host(mut self, f: impl FnOnce(HostBuilder) -> HostBuilder + 'static) -> Setup {
        self.host.push(Box::new(f));
        self
    }

    /// The request body in the fingerprint on every host: on Envoy that is
    /// `envoy.request_body: await` with `allow_on_headers_stop_iteration` (Envoy 1.35+);
    /// Kong always reads the body first.
    pub fn body_fingerprinted(self) -> Setup {
        self.config(json!({"envoy": {"request_body": "await"}}))
            .host(|h| h.allow_on_headers_stop_iteration(true))
    }

    pub async fn start(self) -> E2e {
        let api = Upstream::start().await;
        // What must never be logged: the backend tokens (and, at the end, the traffic).
        let log_mark = idempotency_tests::secrets::backend_mark();
        let mut tokens: Vec<String> = config_token(&self.config).into_iter().collect();
        if let Target::BackendWithToken(token) = self.target {
            tokens.push(token.to_string());
        }
        let (backend, addr) = match self.target {
            Target::Backend => {
                let b = Backend::start().await;
                let addr = b.addr;
                (Some(b), addr)
            }
            Target::BackendWithToken(token) => {
                let b = Backend::start_with_token(Some(token)).await;
                let addr = b.addr;
                (Some(b), addr)
            }
            Target::At(addr) => (None, addr),
        };
        let mut config = self.config;
        let upstream = match self.mode {
            Mode::Ngx => addr.to_string(),
            Mode::Envoy => self.cluster.clone(),
        };
        merge(&mut config, json!({"server": {"upstream": upstream}}));
        let tick = Duration::from_millis(config["tick_ms"].as_u64().unwrap_or(20));
        let mut builder = Host::builder(self.mode, filter_wasm())
            .filter_name("idempotency")
            .upstream(api.addr())
            .cluster(self.cluster.clone(), addr)
            .config(config.to_string());
        for f in self.host {
            builder = f(builder);
        }
        let host = builder.start().await.expect("the filter loads");
        E2e {
            mode: self.mode,
            api,
            backend,
            host: Some(host),
            tick,
            tokens,
            log_mark,
        }
    }
}

/// The release build of the product filter; with its functions' names while the profile is on
/// (the same code: only the names differ).
pub fn filter_wasm() -> PathBuf {
    if idempotency_tests::profile::enabled() {
        build::wasm_with_names("idempotency")
    } else {
        build::wasm("idempotency")
    }
}

/// One end-to-end set-up: the filter in a host of `mode`, the backend, the upstream API.
pub struct E2e {
    pub mode: Mode,
    /// The counting upstream (the API behind the gateway).
    pub api: Upstream,
    pub backend: Option<Backend>,
    host: Option<Host>,
    pub tick: Duration,
    /// The backend tokens of the set-up (never logged).
    tokens: Vec<String>,
    /// Where the backend's log lines of this test start.
    log_mark: usize,
}

fn config_token(config: &Value) -> Option<String> {
    config["server"]["token"].as_str().map(str::to_string)
}

impl Drop for E2e {
    fn drop(&mut self) {
        // A failed assertion or a time-out (dropped before `finish`): show what the filter
        // and the host logged.
        if let Some(host) = &self.host {
            eprintln!("--- {} host logs ---\n{}", self.mode, host.dump_logs());
        }
    }
}

impl E2e {
    pub fn setup(mode: Mode) -> Setup {
        Setup {
            mode,
            config: json!({"server": {"timeout_ms": 2000}}),
            target: Target::Backend,
            cluster: "idempotency".into(),
            host: Vec::new(),
        }
    }

    /// The default set-up with a configuration patch.
    pub async fn start(mode: Mode, patch: Value) -> E2e {
        E2e::setup(mode).config(patch).start().await
    }

    pub fn host(&self) -> &Host {
        self.host.as_ref().expect("the host runs until finish")
    }

    /// A POST with the key header (raw value) when `key` is given.
    pub fn post(&self, path: &str, key: Option<&str>, body: impl Into<Vec<u8>>) -> ClientRequest {
        let mut r = self.host().client().request("POST", path).body(body);
        if let Some(k) = key {
            r = r.header("idempotency-key", k);
        }
        r
    }

    /// Sends a POST with the key and waits for its whole response.
    pub async fn send(&self, path: &str, key: &str, body: impl Into<Vec<u8>>) -> ClientResponse {
        self.post(path, Some(key), body).send().await.unwrap()
    }

    /// Once nothing is in flight, one tick of the root context (the deferred queue is
    /// sent), then everything settles again.
    pub async fn tick(&self) {
        self.host().settle().await;
        self.host().advance(self.tick).await;
        self.host().settle().await;
    }

    /// Waits until the host has seen a client go away (noticed by its connection, so polled).
    pub async fn client_gone(&self) {
        eventually(
            "the host saw the client go",
            Duration::from_secs(10),
            || {
                !self
                    .host()
                    .logs_containing("client closed the connection")
                    .is_empty()
            },
        )
        .await;
    }

    /// A counter's value (0 when the filter has not defined it).
    pub fn metric(&self, name: &str) -> i64 {
        self.host().metric(name).map_or(0, |m| m.value)
    }

    /// Settles, checks that no host rule was broken (`Host::finish`) and that neither the
    /// filter nor the backend logged a key, a token or a body of the test, stops the backend.
    pub async fn finish(mut self) {
        if let Some(host) = self.host.take() {
            host.settle().await;
            let mut secrets = idempotency_tests::secrets::Secrets::of_traffic(&self.api);
            for token in &self.tokens {
                secrets.add(token);
            }
            idempotency_tests::secrets::assert_not_logged(&host, self.log_mark, &secrets);
            host.finish().await;
        }
        if let Some(mut b) = self.backend.take() {
            b.stop().await;
        }
    }
}

/// Merges `patch` into `base` (objects recursively, anything else replaced).
pub fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, p) => *b = p,
    }
}

/// The `type` and `status` of a problem+json answer; panics if it is not one.
pub fn problem_of(r: &ClientResponse) -> (String, u64) {
    assert_eq!(
        r.header("content-type"),
        Some("application/problem+json"),
        "status {}: {}",
        r.status,
        r.text()
    );
    // Exact on both hosts: no line feed added (ngx), no stale Content-Length.
    assert!(
        !r.body.ends_with(b"\n"),
        "a line feed was added: {:?}",
        r.text()
    );
    if let Some(cl) = r.header("content-length") {
        assert_eq!(cl, r.body.len().to_string(), "stale Content-Length");
    }
    let v: Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", r.text()));
    (
        v["type"].as_str().unwrap_or_default().to_string(),
        v["status"].as_u64().unwrap_or_default(),
    )
}

/// The `detail` of a problem+json answer.
pub fn detail_of(r: &ClientResponse) -> String {
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    v["detail"].as_str().unwrap_or_default().to_string()
}

/// Polls `check` until it holds, failing after `deadline` with `what`.
pub async fn eventually(what: &str, deadline: Duration, mut check: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !check() {
        assert!(
            start.elapsed() < deadline,
            "not within {deadline:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The headers of a response that describe the resource (not the connection or the
/// framing), lowercase, in order: what a replay must reproduce.
pub fn entity_headers(r: &ClientResponse) -> Vec<(String, String)> {
    r.headers
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "content-length" | "transfer-encoding" | "connection" | "date" | "keep-alive"
            )
        })
        .cloned()
        .collect()
}

/// The one `tracing` subscriber of this test binary, installed by the first backend: every
/// backend log event for the secrets scan (`idempotency_tests::secrets`), and every backend
/// span, through the backend's own trace layer (`idempotency_server::logging::trace_layer`),
/// into the OpenTelemetry SDK's in-memory exporter (observability.rs picks its spans out by
/// trace id). One for the whole binary: `tracing` caches per call site, for every thread,
/// whether an event or span is wanted.
pub fn spans() -> &'static opentelemetry_sdk::trace::InMemorySpanExporter {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    static EXPORTER: std::sync::OnceLock<opentelemetry_sdk::trace::InMemorySpanExporter> =
        std::sync::OnceLock::new();
    EXPORTER.get_or_init(|| {
        let exporter = opentelemetry_sdk::trace::InMemorySpanExporter::default();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        tracing_subscriber::registry()
            .with(idempotency_tests::secrets::capture_layer())
            .with(idempotency_server::logging::trace_layer(
                provider.tracer("e2e"),
            ))
            .try_init()
            .expect("the only subscriber of the test binary");
        exporter
    })
}
