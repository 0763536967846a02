//! What a test reads back from a host: the filter's log lines, its metrics, the shared
//! key/value data, the fuel its callbacks burnt and the host violations. It lives behind
//! one mutex shared by the worker thread and the [`Host`](crate::Host) handle, and it
//! survives an instance reset (like nginx's shared memory and error log do).

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crate::rules::Phase;

/// A log level, as proxy-wasm numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Critical,
}

impl Level {
    pub fn from_proxy(level: u32) -> Option<Level> {
        Some(match level {
            0 => Level::Trace,
            1 => Level::Debug,
            2 => Level::Info,
            3 => Level::Warn,
            4 => Level::Error,
            5 => Level::Critical,
            _ => return None,
        })
    }
}

/// Who wrote a log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The filter, through `proxy_log`.
    Filter,
    /// The filter's stdout/stderr (WASI `fd_write`), e.g. a Rust panic message.
    Stdio,
    /// The host itself (what nginx or Envoy would log: warnings, errors, traps).
    Host,
}

/// One captured log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    pub level: Level,
    pub source: Source,
    /// The context that was executing (0 when none).
    pub context_id: u32,
    pub message: String,
}

impl fmt::Display for LogLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{:?}] {:?} #{}: {}",
            self.level, self.source, self.context_id, self.message
        )
    }
}

/// A metric kind, as `proxy_define_metric` numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// A metric as the filter defined it.
#[derive(Clone, Debug, PartialEq)]
pub struct Metric {
    pub name: String,
    pub kind: MetricKind,
    /// Counter or gauge value (a counter never decreases).
    pub value: i64,
    /// Every value recorded in a histogram.
    pub samples: Vec<u64>,
}

/// A behaviour that would break a real host: a test fails unless it expects it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ViolationKind {
    /// ngx: a dispatch was still in flight when its request ended; a real nginx worker
    /// crashes (signal 11).
    DispatchOutlivedRequest,
    /// The response body changed size after its Content-Length went out; a real client
    /// hangs waiting for the missing bytes (or reads garbage).
    BodyChangedAfterContentLength,
    /// `on_configure` returned false: Kong stops the worker.
    ConfigureFailed,
    /// ngx bug 1: the root context dispatched inside its own `on_http_call_response` after a
    /// complete answer; a real nginx worker crashes (SIGSEGV).
    RootDispatchFromCallResponse,
    /// ngx bug 2: an HTTP context dispatched a call with a body from `on_http_call_response`
    /// after an answer with an empty body; a real nginx worker spins for ever.
    DispatchAfterEmptyAnswer,
    /// ngx bug 3: a root call completed while another of its root context was pending, or a
    /// root dispatch failed synchronously; a real nginx worker lost a connection slot for
    /// good.
    ConnectionLeaked,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub kind: ViolationKind,
    pub detail: String,
}

/// The fuel (Wasm instructions, roughly) a piece of work cost.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fuel {
    /// Per HTTP request, in arrival order: the sum over every callback of its context
    /// (request/response phases, call responses, log, done, delete).
    pub requests: Vec<RequestFuel>,
    /// The root context: vm start, configure, ticks, and call responses of calls the
    /// root context dispatched.
    pub root: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestFuel {
    pub context_id: u32,
    pub method: String,
    pub path: String,
    pub fuel: u64,
    /// Per phase, in the order first seen.
    pub by_phase: Vec<(Phase, u64)>,
}

/// Everything tests read back.
#[derive(Default)]
pub struct Observed {
    pub logs: Vec<LogLine>,
    pub metrics: Vec<Metric>,
    pub shared: HashMap<String, (Vec<u8>, u32)>,
    pub next_cas: u32,
    pub violations: Vec<Violation>,
    pub fuel: Fuel,
    pub fuel_index: HashMap<u32, usize>,
    /// How many times the module was instantiated (1 + resets).
    pub instances: u32,
    /// Callback counts by phase, over all contexts.
    pub calls: BTreeMap<&'static str, u64>,
    /// Calls of an HTTP context still in flight when its request ended (ngx: a fatal
    /// violation too; envoy: cancelled, their answers never delivered).
    pub calls_outliving_requests: u64,
}

impl Observed {
    pub fn log(&mut self, level: Level, source: Source, context_id: u32, message: String) {
        self.logs.push(LogLine {
            level,
            source,
            context_id,
            message,
        });
    }

    pub fn violation(&mut self, kind: ViolationKind, detail: String) {
        self.log(
            Level::Critical,
            Source::Host,
            0,
            format!("VIOLATION {kind:?}: {detail}"),
        );
        self.violations.push(Violation { kind, detail });
    }

    /// The metric `proxy_define_metric` gave `id` (its 1-based position).
    pub fn metric_mut(&mut self, id: u32) -> Option<&mut Metric> {
        self.metrics.get_mut((id as usize).wrapping_sub(1))
    }

    pub fn add_fuel(&mut self, context_id: Option<u32>, phase: Phase, fuel: u64) {
        *self.calls.entry(phase.name()).or_default() += 1;
        let index = context_id.and_then(|id| self.fuel_index.get(&id).copied());
        match index {
            Some(i) => {
                let req = &mut self.fuel.requests[i];
                req.fuel += fuel;
                match req.by_phase.iter_mut().find(|(p, _)| *p == phase) {
                    Some((_, f)) => *f += fuel,
                    None => req.by_phase.push((phase, fuel)),
                }
            }
            None => self.fuel.root += fuel,
        }
    }

    pub fn open_request_fuel(&mut self, context_id: u32, method: &str, path: &str) {
        self.fuel_index.insert(context_id, self.fuel.requests.len());
        self.fuel.requests.push(RequestFuel {
            context_id,
            method: method.to_string(),
            path: path.to_string(),
            fuel: 0,
            by_phase: Vec::new(),
        });
    }
}
