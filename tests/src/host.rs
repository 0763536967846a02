//! The public face of the test host: [`Host::builder`], the proxy listener, the clock,
//! [`Host::settle`], and what tests read back (logs, metrics, shared data, fuel,
//! violations). The worker thread itself is in [`crate::traffic`].

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::abi::Pairs;
use crate::connections::Slots;
use crate::observed::{Fuel, Level, LogLine, Metric, Observed, Violation, ViolationKind};
use crate::rules::{FailurePolicy, Mode};

/// Everything a host is configured with. Build it with [`Host::builder`].
#[derive(Clone, Debug)]
pub struct HostOptions {
    pub mode: Mode,
    pub module: PathBuf,
    /// The filter configuration (`on_configure`, `get_plugin_configuration`).
    pub config: Vec<u8>,
    /// The VM configuration (`on_vm_start`).
    pub vm_config: Vec<u8>,
    /// The route's upstream (the API behind the gateway).
    pub upstream: Option<SocketAddr>,
    /// envoy: cluster name → address, for `dispatch_http_call`.
    pub clusters: HashMap<String, SocketAddr>,
    /// ngx: where a dispatch to a `name:port` the test declared goes (what Kong's resolver
    /// and the network would make of it), e.g. a shipped configuration's backend.
    pub names: HashMap<String, SocketAddr>,
    /// Size of the body chunks the filter sees (None: as they arrive).
    pub request_chunk_size: Option<usize>,
    pub response_chunk_size: Option<usize>,
    /// ngx: past this the request body goes to a temp file and the filter sees none
    /// (Kong's default `nginx_http_client_body_buffer_size` is 8k).
    pub client_body_buffer_size: usize,
    /// ngx: `wasm_response_body_buffers` (count, size); default 4 × 4k.
    pub response_body_buffers: (usize, usize),
    /// envoy: `per_connection_buffer_limit_bytes` (1 MiB by default).
    pub buffer_limit: usize,
    /// envoy: the plugin's `failure_policy`; `None`: the version's default (FAIL_RELOAD from
    /// 1.33, FAIL_CLOSED before).
    pub failure_policy: Option<FailurePolicy>,
    /// envoy: clusters with no healthy host (or an open circuit breaker): a call to one fails
    /// synchronously (InternalFailure, no callback).
    pub unhealthy_clusters: HashSet<String>,
    /// envoy: a filter after this one answers every request itself (a 403 from RBAC, a 429
    /// from a local rate limit…): (status, `response.code_details`), instead of the upstream.
    pub local_reply_after: Option<(u16, String)>,
    /// envoy: the Envoy version the mode stands for (major, minor): which properties exist,
    /// the default failure policy. 1.36 by default; 1.32 is the oldest the filter supports.
    pub envoy_version: (u32, u32),
    /// envoy: `allow_on_headers_stop_iteration` of the Wasm filter (Envoy 1.35+): a Pause in
    /// `on_http_request_headers` is a real StopIteration (body callbacks go on) instead of
    /// StopAllIterationAndWatermark.
    pub allow_on_headers_stop_iteration: bool,
    pub filter_name: String,
    /// envoy: `root_id` and `vm_id` of the plugin.
    pub root_id: String,
    pub vm_id: String,
    pub route_name: String,
    pub route_id: String,
    pub service_name: String,
    pub service_id: String,
    pub node_id: String,
    pub kong_version: String,
    /// ngx: `$hostname` (what `request.host` maps to).
    pub hostname: String,
    /// ngx: the names of the `nginx_wasm_shm_queue` zones (register fails otherwise).
    pub shm_queues: HashSet<String>,
    /// What `proxy_get_log_level` answers (0 = trace).
    pub log_level: u8,
    /// ngx: the time-out of a call dispatched with timeout 0.
    pub ngx_default_dispatch_timeout: Duration,
    /// ngx: `worker_connections`, the slots every client connection, upstream exchange and
    /// call takes (Kong: `ulimit -n` clamped to 1024–16384; 1024 here). See
    /// [`crate::connections`].
    pub worker_connections: usize,
    /// The virtual clock's start, nanoseconds since the Unix epoch.
    pub start_time_ns: u64,
}

/// Builds a [`Host`].
pub struct HostBuilder {
    opts: HostOptions,
}

macro_rules! setter {
    ($(#[$doc:meta])* $name:ident: $ty:ty) => {
        $(#[$doc])*
        pub fn $name(mut self, value: $ty) -> Self {
            self.opts.$name = value.into();
            self
        }
    };
}

impl HostBuilder {
    setter!(/// The filter configuration bytes.
        config: impl Into<Vec<u8>>);
    setter!(/// The VM configuration bytes.
        vm_config: impl Into<Vec<u8>>);
    setter!(filter_name: impl Into<String>);
    setter!(root_id: impl Into<String>);
    setter!(vm_id: impl Into<String>);
    setter!(route_name: impl Into<String>);
    setter!(route_id: impl Into<String>);
    setter!(service_name: impl Into<String>);
    setter!(service_id: impl Into<String>);
    setter!(client_body_buffer_size: usize);
    setter!(buffer_limit: usize);
    /// envoy: FAIL_OPEN (`true`) or FAIL_CLOSED (`false`).
    pub fn fail_open(mut self, open: bool) -> Self {
        self.opts.failure_policy = Some(if open {
            FailurePolicy::FailOpen
        } else {
            FailurePolicy::FailClosed
        });
        self
    }

    /// envoy: the plugin's `failure_policy`.
    pub fn failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.opts.failure_policy = Some(policy);
        self
    }

    /// envoy: the cluster has no healthy host: calls to it fail synchronously.
    pub fn unhealthy_cluster(mut self, name: impl Into<String>) -> Self {
        self.opts.unhealthy_clusters.insert(name.into());
        self
    }

    /// envoy: a filter after this one answers every request with `status`, setting
    /// `response.code_details` to `details` (e.g. `rbac_access_denied_matched_policy[none]`).
    pub fn local_reply_after(mut self, status: u16, details: impl Into<String>) -> Self {
        self.opts.local_reply_after = Some((status, details.into()));
        self
    }
    setter!(/// envoy: `allow_on_headers_stop_iteration` of the Wasm filter (Envoy 1.35+).
        allow_on_headers_stop_iteration: bool);

    /// envoy: the Envoy version to imitate (1.32 to 1.36; 1.36 by default).
    pub fn envoy_version(mut self, major: u32, minor: u32) -> Self {
        self.opts.envoy_version = (major, minor);
        self
    }
    setter!(ngx_default_dispatch_timeout: Duration);
    setter!(/// ngx: `worker_connections` (1024 by default).
        worker_connections: usize);

    /// The route's upstream.
    pub fn upstream(mut self, addr: SocketAddr) -> Self {
        self.opts.upstream = Some(addr);
        self
    }

    /// envoy: a cluster the filter can dispatch to.
    pub fn cluster(mut self, name: impl Into<String>, addr: SocketAddr) -> Self {
        self.opts.clusters.insert(name.into(), addr);
        self
    }

    /// ngx: a dispatch to `upstream` (`name:port`, as a configuration gives it) reaches
    /// `addr`, as Kong's resolver and the network would route it.
    pub fn resolve(mut self, upstream: impl Into<String>, addr: SocketAddr) -> Self {
        self.opts
            .names
            .insert(upstream.into().to_ascii_lowercase(), addr);
        self
    }

    pub fn request_chunk_size(mut self, size: usize) -> Self {
        self.opts.request_chunk_size = Some(size.max(1));
        self
    }

    pub fn response_chunk_size(mut self, size: usize) -> Self {
        self.opts.response_chunk_size = Some(size.max(1));
        self
    }

    /// ngx: `wasm_response_body_buffers` as (count, size).
    pub fn response_body_buffers(mut self, count: usize, size: usize) -> Self {
        self.opts.response_body_buffers = (count, size);
        self
    }

    /// ngx: declare an `nginx_wasm_shm_queue` zone.
    pub fn shm_queue(mut self, name: impl Into<String>) -> Self {
        self.opts.shm_queues.insert(name.into());
        self
    }

    /// Loads the module, runs vm start and configure, and starts listening.
    /// Err when the module fails to load (bad imports, a trap, on_configure false).
    pub async fn start(self) -> Result<Host> {
        Host::start(self.opts).await
    }
}

/// The context of the error [`HostBuilder::start`] returns when the module fails to load:
/// the log lines written until then (the filter's own explanation of a refused
/// configuration, for example). Read it with `err.downcast_ref::<LoadFailure>()`.
#[derive(Debug, Clone)]
pub struct LoadFailure {
    pub logs: Vec<LogLine>,
}

impl std::fmt::Display for LoadFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the module failed to load ({} log lines)",
            self.logs.len()
        )
    }
}

/// Counts the work in flight, for [`Host::settle`].
#[derive(Default)]
pub struct Pending {
    count: AtomicUsize,
    notify: Notify,
}

impl Pending {
    pub fn inc(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    pub fn dec(&self) {
        if self.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.notify.notify_waiters();
        }
    }

    pub fn get(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

/// Holds one unit of [`Pending`] until dropped (also when its task is aborted).
pub struct PendingGuard(pub Arc<Pending>);

impl PendingGuard {
    pub fn new(pending: &Arc<Pending>) -> PendingGuard {
        pending.inc();
        PendingGuard(pending.clone())
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What the worker sends to a client connection.
#[derive(Debug)]
pub enum Down {
    Head {
        status: u16,
        empty_reason: bool,
        headers: Pairs,
    },
    Data(Bytes),
    End,
    /// Break the connection (the client sees an incomplete response).
    Abort,
}

/// What the worker thread processes, one at a time.
pub enum Event {
    ClientRequest {
        id: u64,
        method: String,
        path: String,
        headers: Pairs,
        has_body: bool,
        peer: SocketAddr,
        local: SocketAddr,
        connection_id: u64,
        down: mpsc::UnboundedSender<Down>,
    },
    ClientBody {
        id: u64,
        data: Bytes,
    },
    ClientBodyEnd {
        id: u64,
    },
    ClientGone {
        id: u64,
    },
    UpstreamHead {
        id: u64,
        status: u16,
        headers: Pairs,
        /// The response's framing says no body follows (`Content-Length: 0`, a 204 or 304,
        /// an answer to HEAD): the upstream message is complete with its head.
        end: bool,
    },
    UpstreamBody {
        id: u64,
        data: Bytes,
    },
    UpstreamEnd {
        id: u64,
    },
    UpstreamFailed {
        id: u64,
        refused: bool,
    },
    CallDone {
        generation: u64,
        token: u32,
        outcome: crate::dispatch::Outcome,
    },
    Advance {
        by: Duration,
        done: oneshot::Sender<()>,
    },
    /// The instance traps now, outside any request (what a test injects: a bug of the
    /// filter, a host that kills the instance): the mode's trap rule applies.
    Trap {
        done: oneshot::Sender<()>,
    },
    /// The size of the current instance's linear memory (`None`: no instance).
    Memory {
        done: oneshot::Sender<Option<usize>>,
    },
    /// envoy: a new plugin configuration for the same VM.
    Reconfigure {
        config: Vec<u8>,
        done: oneshot::Sender<Result<()>>,
    },
    Shutdown,
}

/// A handle to post events to the worker, counting them as pending until handled.
#[derive(Clone)]
pub struct Poster {
    tx: mpsc::UnboundedSender<Event>,
    pub pending: Arc<Pending>,
}

impl Poster {
    pub fn post(&self, event: Event) {
        self.pending.inc();
        if self.tx.send(event).is_err() {
            self.pending.dec();
        }
    }
}

/// A proxy-wasm host running one filter: one instance on one worker thread, an HTTP/1.1
/// listener on loopback, the mode's rules. Dropping it stops it; it panics on drop if a
/// violation happened that the test did not [`expect`](Host::expect_violation).
pub struct Host {
    addr: SocketAddr,
    mode: Mode,
    poster: Poster,
    observed: Arc<Mutex<Observed>>,
    accept: tokio::task::JoinHandle<()>,
    thread: Option<std::thread::JoinHandle<()>>,
    expected: Mutex<HashSet<ViolationKind>>,
    start_ns: u64,
    elapsed: Mutex<Duration>,
    slots: Arc<Slots>,
    /// The filter's name, the host's prefix of its metrics (ngx).
    filter_name: String,
}

impl HostOptions {
    /// envoy: the failure policy in effect (the configured one, else the version's default).
    pub fn failure_policy(&self) -> FailurePolicy {
        self.failure_policy
            .unwrap_or_else(|| FailurePolicy::default_for(self.envoy_version))
    }
}

impl Host {
    /// A builder for a host of `mode` running the module at `module`.
    pub fn builder(mode: Mode, module: impl AsRef<Path>) -> HostBuilder {
        let start_time_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        HostBuilder {
            opts: HostOptions {
                mode,
                module: module.as_ref().to_path_buf(),
                config: Vec::new(),
                vm_config: Vec::new(),
                upstream: None,
                clusters: HashMap::new(),
                names: HashMap::new(),
                request_chunk_size: None,
                response_chunk_size: None,
                client_body_buffer_size: 8 * 1024,
                response_body_buffers: (4, 4096),
                buffer_limit: 1024 * 1024,
                failure_policy: None,
                unhealthy_clusters: HashSet::new(),
                local_reply_after: None,
                envoy_version: (1, 36),
                allow_on_headers_stop_iteration: false,
                filter_name: "filter".into(),
                root_id: String::new(),
                vm_id: String::new(),
                route_name: "route".into(),
                route_id: "00000000-0000-4000-8000-000000000001".into(),
                service_name: "service".into(),
                service_id: "00000000-0000-4000-8000-000000000002".into(),
                node_id: "test-node".into(),
                kong_version: "3.9.1".into(),
                hostname: "test-host".into(),
                shm_queues: HashSet::new(),
                log_level: 0,
                ngx_default_dispatch_timeout: crate::dispatch::NGX_DEFAULT_TIMEOUT,
                worker_connections: 1024,
                start_time_ns,
            },
        }
    }

    async fn start(opts: HostOptions) -> Result<Host> {
        if opts.mode == Mode::Envoy {
            let (major, minor) = opts.envoy_version;
            if !(major == 1 && (29..=36).contains(&minor)) {
                return Err(anyhow!(
                    "the envoy mode imitates Envoy 1.29 to 1.36 (its body handling 1.32 and later), not {major}.{minor}"
                ));
            }
            if opts.allow_on_headers_stop_iteration && minor < 35 {
                // The field is unknown to the API of older versions: the config is refused.
                return Err(anyhow!(
                    "Envoy {major}.{minor} rejects allow_on_headers_stop_iteration (added in 1.35)"
                ));
            }
        }
        let bytes = std::fs::read(&opts.module)
            .with_context(|| format!("reading {}", opts.module.display()))?;
        let opts = Arc::new(opts);
        let observed = Arc::new(Mutex::new(Observed::default()));
        let (tx, rx) = mpsc::unbounded_channel();
        let poster = Poster {
            tx,
            pending: Arc::new(Pending::default()),
        };
        let (ready_tx, ready_rx) = oneshot::channel();
        let runtime = tokio::runtime::Handle::current();
        let slots = Slots::new(if opts.mode.worker_connections_leak() {
            opts.worker_connections
        } else {
            usize::MAX
        });
        let thread = {
            let (opts, observed, poster, slots) = (
                opts.clone(),
                observed.clone(),
                poster.clone(),
                slots.clone(),
            );
            std::thread::Builder::new()
                .name(format!("proxy-wasm-{}", opts.mode))
                .stack_size(32 * 1024 * 1024)
                .spawn(move || {
                    let worker =
                        crate::traffic::Worker::new(opts, &bytes, observed, poster, runtime, slots);
                    match worker {
                        Ok(mut worker) => {
                            let _ = ready_tx.send(Ok(()));
                            worker.run(rx);
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                })?
        };
        if let Err(e) = ready_rx
            .await
            .map_err(|_| anyhow!("the worker thread died"))?
        {
            let _ = thread.join();
            let logs = observed.lock().unwrap().logs.clone();
            return Err(e.context(LoadFailure { logs }));
        }
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let accept = tokio::spawn(accept_loop(
            listener,
            poster.clone(),
            slots.clone(),
            observed.clone(),
        ));
        Ok(Host {
            addr,
            mode: opts.mode,
            poster,
            observed,
            accept,
            thread: Some(thread),
            expected: Mutex::new(HashSet::new()),
            start_ns: opts.start_time_ns,
            elapsed: Mutex::new(Duration::ZERO),
            slots,
            filter_name: opts.filter_name.clone(),
        })
    }

    /// The proxy's address (send requests here).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:port{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// A client for this host.
    pub fn client(&self) -> crate::client::Client {
        crate::client::Client::new(self.addr)
    }

    /// Moves the virtual clock forward, firing every due tick of the root context in
    /// order (the clock reads each tick's due time while it runs).
    pub async fn advance(&self, by: Duration) {
        let (done, wait) = oneshot::channel();
        self.poster.post(Event::Advance { by, done });
        let _ = wait.await;
        *self.elapsed.lock().unwrap() += by;
    }

    /// envoy: a new configuration of the plugin that keeps the VM (an xDS update of the
    /// filter's `configuration`): the old root context is deleted and its calls cancelled
    /// (no answer ever reaches the filter), a new root context is created and configured;
    /// module memory stays. Err when the new configuration is refused.
    pub async fn reconfigure(&self, config: impl Into<Vec<u8>>) -> Result<()> {
        let (done, wait) = oneshot::channel();
        self.poster.post(Event::Reconfigure {
            config: config.into(),
            done,
        });
        wait.await.map_err(|_| anyhow!("the worker is gone"))?
    }

    /// The instance traps now, as if one of its callbacks had (ngx: it is recycled, and the
    /// next request starts a new one with fresh memory: whatever the old one queued is
    /// lost; envoy: the VM fails, and FAIL_RELOAD reloads it after its backoff). Requests
    /// in flight on it fail at their next step.
    pub async fn trap_instance(&self) {
        let (done, wait) = oneshot::channel();
        self.poster.post(Event::Trap { done });
        let _ = wait.await;
    }

    /// The size of the current Wasm instance's linear memory, in bytes: it grows as the
    /// filter's allocator needs more and never shrinks, so its growth while requests are held
    /// is what they take in the filter itself (in 64 KiB pages). `None`: no instance now.
    pub async fn wasm_memory(&self) -> Option<usize> {
        let (done, wait) = oneshot::channel();
        self.poster.post(Event::Memory { done });
        wait.await.ok().flatten()
    }

    /// The virtual clock, nanoseconds since the Unix epoch.
    pub fn now_ns(&self) -> u64 {
        self.start_ns + self.elapsed.lock().unwrap().as_nanos() as u64
    }

    /// Waits until nothing is in flight: no request, call, upstream exchange or event
    /// the host knows of. (A request a client has not sent yet is not known.)
    pub async fn settle(&self) {
        loop {
            let notified = self.poster.pending.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.poster.pending.get() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<LogLine> {
        self.observed.lock().unwrap().logs.clone()
    }

    /// The messages of the log lines at `level` or above that contain `needle`.
    pub fn logs_containing(&self, needle: &str) -> Vec<LogLine> {
        self.logs()
            .into_iter()
            .filter(|l| l.message.contains(needle))
            .collect()
    }

    /// Panics (printing the logs) unless a line contains `needle`.
    pub fn assert_logged(&self, needle: &str) {
        if self.logs_containing(needle).is_empty() {
            panic!(
                "no log line contains {needle:?}; logs:\n{}",
                self.dump_logs()
            );
        }
    }

    /// The logs, one per line, for failure messages.
    pub fn dump_logs(&self) -> String {
        self.logs()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Lines at `level` or above.
    pub fn logs_at_least(&self, level: Level) -> Vec<LogLine> {
        self.logs()
            .into_iter()
            .filter(|l| l.level >= level)
            .collect()
    }

    /// A metric by the name the filter defined it with.
    pub fn metric(&self, name: &str) -> Option<Metric> {
        let observed = self.observed.lock().unwrap();
        observed.metrics.iter().find(|m| m.name == name).cloned()
    }

    pub fn metrics(&self) -> Vec<Metric> {
        self.observed.lock().unwrap().metrics.clone()
    }

    /// The filter's metrics as a Prometheus scrape of the real host returns them: Kong's
    /// Prometheus plugin (`pw_<filter>_<name>`) in ngx mode, Envoy's `/stats/prometheus`
    /// (`<name>`) in envoy mode ([`crate::exposition`]).
    pub fn prometheus(&self) -> String {
        crate::exposition::prometheus(self.mode(), &self.filter_name, &self.metrics())
    }

    /// The host's own names of the filter's metrics: Envoy's `/stats`
    /// (`wasmcustom.<name>: <value>`), ngx_wasm_module's shm (`pw.<filter>.<name>: <value>`).
    pub fn stats(&self) -> String {
        crate::exposition::stats(self.mode(), &self.filter_name, &self.metrics())
    }

    /// Shared data: value and CAS.
    pub fn shared_data(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.observed.lock().unwrap().shared.get(key).cloned()
    }

    /// Fuel per request and for the root context.
    pub fn fuel(&self) -> Fuel {
        self.observed.lock().unwrap().fuel.clone()
    }

    /// ngx: connection slots lost for good by the current worker (HOSTS.md bug 3).
    pub fn leaked_connections(&self) -> usize {
        self.slots.leaked()
    }

    /// ngx: connection slots in use now (client connections, upstream exchanges, calls).
    pub fn connections_in_use(&self) -> usize {
        self.slots.in_use()
    }

    /// How many times the module was instantiated (1, plus one per ngx reset).
    pub fn instances(&self) -> u32 {
        self.observed.lock().unwrap().instances
    }

    /// How many calls of HTTP contexts were still in flight when their request ended, in
    /// either mode (ngx: each is also a fatal violation; envoy: cancelled silently, which a
    /// request the client saw through to its end never needs).
    pub fn calls_outliving_requests(&self) -> u64 {
        self.observed.lock().unwrap().calls_outliving_requests
    }

    /// How many callbacks of a phase ran (e.g. `"tick"`, `"log"`).
    pub fn callbacks(&self, phase: &str) -> u64 {
        let observed = self.observed.lock().unwrap();
        observed.calls.get(phase).copied().unwrap_or(0)
    }

    /// The violations so far (expected or not).
    pub fn violations(&self) -> Vec<Violation> {
        self.observed.lock().unwrap().violations.clone()
    }

    /// Declares a violation this test provokes on purpose (drop will not panic on it).
    pub fn expect_violation(&self, kind: ViolationKind) {
        self.expected.lock().unwrap().insert(kind);
    }

    /// The violations the test did not expect.
    pub fn unexpected_violations(&self) -> Vec<Violation> {
        let expected = self.expected.lock().unwrap();
        self.violations()
            .into_iter()
            .filter(|v| !expected.contains(&v.kind))
            .collect()
    }

    /// Panics (printing the logs) on a violation the test did not expect.
    fn assert_no_unexpected_violations(&self) {
        let unexpected = self.unexpected_violations();
        if !unexpected.is_empty() {
            panic!(
                "host violations (a real host would break):\n{unexpected:#?}\nlogs:\n{}",
                self.dump_logs()
            );
        }
    }

    /// Settles, stops the host and panics on unexpected violations.
    pub async fn finish(mut self) {
        self.settle().await;
        self.stop();
        self.assert_no_unexpected_violations();
        self.expected.lock().unwrap().extend([
            ViolationKind::DispatchOutlivedRequest,
            ViolationKind::BodyChangedAfterContentLength,
            ViolationKind::ConfigureFailed,
            ViolationKind::RootDispatchFromCallResponse,
            ViolationKind::DispatchAfterEmptyAnswer,
            ViolationKind::ConnectionLeaked,
        ]);
    }

    fn stop(&mut self) {
        self.accept.abort();
        if let Some(thread) = self.thread.take() {
            self.poster.post(Event::Shutdown);
            let _ = thread.join();
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            return;
        }
        self.assert_no_unexpected_violations();
    }
}

static NEXT_REQUEST: AtomicU64 = AtomicU64::new(1);
static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

async fn accept_loop(
    listener: TcpListener,
    poster: Poster,
    slots: Arc<Slots>,
    observed: Arc<Mutex<Observed>>,
) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        // ngx: a connection takes a slot for as long as it is open; with none left nginx
        // closes it at once (ngx_event_accept).
        let Some(slot) = slots.take() else {
            observed.lock().unwrap().log(
                Level::Error,
                crate::observed::Source::Host,
                0,
                format!("{} worker_connections are not enough", slots.limit()),
            );
            drop(stream);
            continue;
        };
        let local = stream.local_addr().unwrap_or(peer);
        let poster = poster.clone();
        let connection_id = NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                serve(req, poster.clone(), peer, local, connection_id)
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.keep_alive(true);
            let _ = builder
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Posts `ClientGone` when dropped before the response ended.
struct ClientGuard {
    id: u64,
    poster: Poster,
    armed: bool,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        if self.armed {
            self.poster.post(Event::ClientGone { id: self.id });
        }
    }
}

/// The response body a client reads: frames the worker sends.
pub struct DownBody {
    rx: mpsc::UnboundedReceiver<Down>,
    guard: ClientGuard,
}

impl hyper::body::Body for DownBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Down::Data(data))) => Poll::Ready(Some(Ok(Frame::data(data)))),
            Poll::Ready(Some(Down::End)) | Poll::Ready(None) => {
                self.guard.armed = false;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Down::Abort)) | Poll::Ready(Some(Down::Head { .. })) => {
                self.guard.armed = false;
                Poll::Ready(Some(Err(std::io::Error::other(
                    "response aborted by the host",
                ))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

async fn serve(
    req: Request<Incoming>,
    poster: Poster,
    peer: SocketAddr,
    local: SocketAddr,
    connection_id: u64,
) -> Result<Response<DownBody>, std::io::Error> {
    let id = NEXT_REQUEST.fetch_add(1, Ordering::Relaxed);
    let (parts, mut body) = req.into_parts();
    let mut headers: Pairs = Vec::new();
    for (k, v) in &parts.headers {
        headers.push((k.as_str().to_string(), v.as_bytes().to_vec()));
    }
    let has_body = !hyper::body::Body::is_end_stream(&body);
    let (down_tx, mut down_rx) = mpsc::unbounded_channel();
    let mut guard = ClientGuard {
        id,
        poster: poster.clone(),
        armed: true,
    };
    poster.post(Event::ClientRequest {
        id,
        method: parts.method.as_str().to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into()),
        headers,
        has_body,
        peer,
        local,
        connection_id,
        down: down_tx,
    });
    if has_body {
        let poster = poster.clone();
        poster.pending.inc();
        tokio::spawn(async move {
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => {
                        if let Ok(data) = frame.into_data()
                            && !data.is_empty()
                        {
                            poster.post(Event::ClientBody { id, data });
                        }
                    }
                    Err(_) => {
                        poster.post(Event::ClientGone { id });
                        poster.pending.dec();
                        return;
                    }
                }
            }
            poster.post(Event::ClientBodyEnd { id });
            poster.pending.dec();
        });
    }
    match down_rx.recv().await {
        Some(Down::Head {
            status,
            empty_reason,
            headers,
        }) => {
            let mut response = Response::builder().status(status);
            for (k, v) in &headers {
                if let (Ok(name), Ok(value)) = (
                    hyper::header::HeaderName::from_bytes(k.as_bytes()),
                    hyper::header::HeaderValue::from_bytes(v),
                ) {
                    response = response.header(name, value);
                }
            }
            if empty_reason {
                response = response.extension(hyper::ext::ReasonPhrase::from_static(b""));
            }
            guard.armed = false;
            let body = DownBody {
                rx: down_rx,
                guard: ClientGuard {
                    id,
                    poster: poster.clone(),
                    armed: true,
                },
            };
            Ok(response.body(body).unwrap_or_else(|_| {
                let (_, rx) = mpsc::unbounded_channel();
                let mut r = Response::new(DownBody {
                    rx,
                    guard: ClientGuard {
                        id,
                        poster: poster.clone(),
                        armed: false,
                    },
                });
                *r.status_mut() = hyper::StatusCode::BAD_GATEWAY;
                r
            }))
        }
        Some(_) | None => {
            // Aborted before the head: hyper closes the connection, no response.
            guard.armed = false;
            Err(std::io::Error::other("request aborted by the host"))
        }
    }
}
