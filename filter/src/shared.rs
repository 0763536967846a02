//! Module memory shared by the root and HTTP contexts of one instance: the deferred queue,
//! the metric ids, the detected host; and the host calls both make (header maps as bytes,
//! calls to the backend through [`call_backend`], the clock, the log). A Wasm instance is single-threaded; every borrow
//! here is short and never held across a host call that could call back into the module.

use std::cell::{Cell, RefCell};
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{LogLevel, MapType, MetricType, Status};

use crate::config::{QueueConfig, Server};
use crate::decision::{CallContext, call_headers};
use crate::host::Host;
use crate::metrics::Metric;
use crate::queue::{Entry, Queue};

thread_local! {
    static QUEUE: RefCell<Queue> = RefCell::new(Queue::default());
    static METRICS: RefCell<Vec<Option<u32>>> = const { RefCell::new(Vec::new()) };
    static HOST: Cell<Option<Host>> = const { Cell::new(None) };
    /// The buffer log lines are built in, kept from one line to the next.
    static LINE: Cell<String> = const { Cell::new(String::new()) };
}

/// Runs `f` on the queue.
pub fn with_queue<T>(f: impl FnOnce(&mut Queue) -> T) -> T {
    QUEUE.with(|q| f(&mut q.borrow_mut()))
}

/// Queues a call; counts and logs a drop.
pub fn enqueue(entry: Entry, limits: &QueueConfig) {
    let op = entry.op;
    if !with_queue(|q| q.push(entry, limits)) {
        count(Metric::QueueDropped);
        log(
            LogLevel::Warn,
            &format!(
                "queue full, {} dropped (the lease will free the key)",
                op.name()
            ),
        );
    }
}

/// Defines the metrics once per instance.
pub fn define_metrics() {
    METRICS.with(|m| {
        let mut m = m.borrow_mut();
        if !m.is_empty() {
            return;
        }
        *m = Metric::ALL
            .iter()
            .map(|metric| hostcalls::define_metric(MetricType::Counter, metric.name()).ok())
            .collect();
    });
}

/// Adds one to a counter (silently nothing when it could not be defined).
pub fn count(metric: Metric) {
    let id = METRICS.with(|m| m.borrow().get(metric.index()).copied().flatten());
    if let Some(id) = id {
        let _ = hostcalls::increment_metric(id, 1);
    }
}

/// The host, detected once per instance (see `host`).
pub fn host() -> Host {
    if let Some(h) = HOST.with(Cell::get) {
        return h;
    }
    let ngx = matches!(
        hostcalls::get_property(vec!["ngx", "hostname"]),
        Ok(Some(_))
    );
    let has =
        |path: Vec<&str>| matches!(hostcalls::get_property(path), Ok(Some(v)) if !v.is_empty());
    // `xds.node` since Envoy 1.29, `node` until 1.32 (removed in 1.33).
    let node = !ngx && (has(vec!["xds", "node"]) || has(vec!["node"]));
    let h = Host::detect(ngx, node);
    HOST.with(|c| c.set(Some(h)));
    log(LogLevel::Info, &format!("host detected: {}", h.name()));
    h
}

#[cfg(target_arch = "wasm32")]
#[link(wasm_import_module = "env")]
unsafe extern "C" {
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
}

/// A header map in the host's serialization, for [`crate::pairs::parse`] (see
/// [`crate::pairs`]): empty when the host has none here.
#[cfg(target_arch = "wasm32")]
pub fn header_map(map: MapType) -> Vec<u8> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a buffer it allocated through the SDK's
    // `proxy_on_memory_allocate` (a boxed slice of exactly `size` bytes), which the `Vec`
    // returned then owns and frees, as the SDK's own `get_map` does.
    unsafe {
        if proxy_get_header_map_pairs(map as u32, &mut data, &mut size) != 0 || data.is_null() {
            return Vec::new();
        }
        Vec::from_raw_parts(data, size, size)
    }
}

/// Natively (the unit tests) there is no host.
#[cfg(not(target_arch = "wasm32"))]
pub fn header_map(_map: MapType) -> Vec<u8> {
    Vec::new()
}

/// Which of the backend's paths a call goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `{path_prefix}/captures`: an allocation, or a record or release sent inline.
    Captures,
    /// `{path_prefix}/captures/batch`: the queue's records and releases.
    Batch,
}

/// Dispatches `method` with `body` to the backend's `endpoint`: the call's token, or the
/// refusal.
///
/// On Kong the arguments are checked first and a call ngx_wasm_module would refuse is never
/// made (BadArgument): a root-context dispatch that fails synchronously leaks a connection slot
/// of the worker for good (HOSTS.md, bug 3), and in an HTTP context it traps.
pub fn call_backend(
    server: &Server,
    method: &str,
    endpoint: Endpoint,
    body: &[u8],
    timeout_ms: u64,
    context: &CallContext,
) -> Result<u32, Status> {
    if HOST.with(Cell::get) == Some(Host::Ngx) && !server.ngx_dispatchable {
        log(
            LogLevel::Error,
            &format!(
                "not calling the backend: server.upstream {} is not host:port, as Kong needs",
                crate::config::quoted(&server.upstream)
            ),
        );
        return Err(Status::BadArgument);
    }
    let path = match endpoint {
        Endpoint::Captures => &server.captures_path,
        Endpoint::Batch => &server.batch_path,
    };
    let headers = call_headers(
        method,
        path,
        &server.authority,
        server.authorization.as_deref(),
        context,
        endpoint == Endpoint::Batch,
    );
    hostcalls::dispatch_http_call(
        &server.upstream,
        headers,
        Some(body),
        vec![],
        Duration::from_millis(timeout_ms),
    )
}

/// Milliseconds since the epoch, from the host's clock (0 when it has none).
pub fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        // Neither `as_millis` (a u128) nor `saturating_mul` nor `min(u64::MAX / 1000)` (an
        // overflow check, which LLVM makes of each): all are a 128-bit multiply (`__multi3`) on
        // wasm32. Under 2^53 seconds `* 1000` cannot overflow: the same value for the next
        // 285 million years.
        .map_or(0, |d| {
            (d.as_secs().min(1 << 53) * 1000) + u64::from(d.subsec_millis())
        })
}

/// Logs one line, prefixed with the filter's name.
pub fn log(level: LogLevel, msg: &str) {
    log_parts(level, &[msg], "");
}

/// Logs one line made of `parts` and `suffix`, prefixed with the filter's name: built without
/// `format!`, whose machinery costs more Wasm instructions than the rest of a line, in a
/// buffer kept for the next line (on Kong a keyed request logs four, every one built: an
/// allocation and a free each, saved). The buffer is taken out while the line is built and
/// logged, so that nothing is borrowed during the host call.
pub fn log_parts(level: LogLevel, parts: &[&str], suffix: &str) {
    const PREFIX: &str = "idempotency: ";
    let mut line = LINE.with(Cell::take);
    line.clear();
    line.push_str(PREFIX);
    for p in parts {
        line.push_str(p);
    }
    line.push_str(suffix);
    let _ = hostcalls::log(level, &line);
    LINE.with(|l| l.set(line));
}

/// Whether the host keeps lines of `level`, so that a line is not built for nothing. Only
/// Envoy is asked: ngx_wasm_module maps `proxy_get_log_level` to its NYI stub, which traps
/// ("host function not yet implemented": `ngx_proxy_wasm_hfuncs_nop` returns `NGX_WAVM_NYI`,
/// ngx_wavm.c), so there, and before the host is known, every line is built and the host's
/// own `error_log` level decides.
pub fn logs(level: LogLevel) -> bool {
    if HOST.with(Cell::get) != Some(Host::Envoy) {
        return true;
    }
    hostcalls::get_log_level().map_or(true, |kept| kept as u32 <= level as u32)
}
