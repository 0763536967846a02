//! The per-mode rules: the one place where `ngx` (ngx_wasm_module as Kong runs it) and
//! `envoy` differ. Every other module asks [`Mode`] instead of matching on it, so a rule
//! reads here once, with where it comes from (see also the crate doc's rule table).

use std::fmt;

/// Which real host the test host imitates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Kong/ngx_wasm_module (Kong Gateway 3.4–3.9).
    Ngx,
    /// Envoy (and Istio, which runs Envoy).
    Envoy,
}

/// The callback the module is executing, for the rules that depend on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    VmStart,
    Configure,
    Tick,
    RequestHeaders,
    RequestBody,
    RequestTrailers,
    ResponseHeaders,
    ResponseBody,
    ResponseTrailers,
    CallResponse,
    Log,
    Done,
    Delete,
    /// Context creation and memory allocation.
    Other,
}

impl Phase {
    /// The name the fixture filter and the logs use (`request_headers`, …).
    pub fn name(self) -> &'static str {
        match self {
            Phase::VmStart => "vm_start",
            Phase::Configure => "configure",
            Phase::Tick => "tick",
            Phase::RequestHeaders => "request_headers",
            Phase::RequestBody => "request_body",
            Phase::RequestTrailers => "request_trailers",
            Phase::ResponseHeaders => "response_headers",
            Phase::ResponseBody => "response_body",
            Phase::ResponseTrailers => "response_trailers",
            Phase::CallResponse => "call_response",
            Phase::Log => "log",
            Phase::Done => "done",
            Phase::Delete => "delete",
            Phase::Other => "other",
        }
    }

    /// A response phase (headers, body or trailers of the response).
    pub fn is_response(self) -> bool {
        matches!(
            self,
            Phase::ResponseHeaders | Phase::ResponseBody | Phase::ResponseTrailers
        )
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What `proxy_http_call` does when called in a phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DispatchRule {
    Allowed,
    /// The host raises a trap (ngx: `dispatch failed: bad step`).
    Trap,
}

/// What the host does with `Pause` returned from `on_http_response_headers`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseHeadersPause {
    /// Iteration stops until `resume_http_response` (Envoy).
    Stop,
    /// A warning is logged and the response goes on (ngx).
    IgnoredWithWarning,
}

/// Envoy's `failure_policy` of a Wasm plugin (`envoy.extensions.wasm.v3.FailurePolicy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailurePolicy {
    /// The VM stays failed: every stream gets 503 (`wasm_fail_stream`). The default before
    /// Envoy 1.33.
    FailClosed,
    /// The VM stays failed and the filter is skipped: streams go on without it.
    FailOpen,
    /// The VM is reloaded (after a backoff, 1 s by default): a new instance, module memory
    /// lost, `on_vm_start`/`on_configure` again; streams meanwhile get 503. The default from
    /// Envoy 1.33 (changelog 1.33.0).
    FailReload,
}

impl FailurePolicy {
    /// The default of an Envoy version.
    pub fn default_for(version: (u32, u32)) -> FailurePolicy {
        if version >= (1, 33) {
            FailurePolicy::FailReload
        } else {
            FailurePolicy::FailClosed
        }
    }
}

/// How long Envoy waits before it reloads a failed VM (`ReloadConfig.backoff`: "If not
/// specified, the default 1s base interval will be applied").
pub const ENVOY_RELOAD_BACKOFF_NS: u64 = 1_000_000_000;

/// What happens after a trap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrapRule {
    /// ngx: the instance is discarded; its in-flight requests fail (500) at their next
    /// step; the next request gets a fresh instance (`on_vm_start`/`on_configure` again,
    /// module globals lost).
    ResetInstance,
    /// Envoy FAIL_CLOSED / FAIL_OPEN: the VM is marked failed for good; every stream gets a
    /// 503 local reply (`wasm_fail_stream`), or with FAIL_OPEN the filter is skipped.
    FailVm,
    /// Envoy FAIL_RELOAD: the VM is failed, its streams get 503, and the first stream after
    /// the backoff gets a new VM (module memory lost, as on ngx).
    ReloadVm,
}

/// The order of the end-of-stream callbacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndOrder {
    /// `on_log` then `on_done` then `on_delete` (ngx: log phase, then the done step).
    LogDone,
    /// `on_done` then `on_log` then `on_delete` (proxy-wasm-cpp-host: onDestroy → onDone,
    /// then the access log → onLog, then the context is deleted).
    DoneLog,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Ngx => "ngx",
            Mode::Envoy => "envoy",
        }
    }

    /// ngx (HOSTS.md, observed): dispatch works in request headers, request body, call
    /// response and the root tick, and traps elsewhere. Envoy: every phase.
    pub fn dispatch_rule(self, phase: Phase) -> DispatchRule {
        match self {
            Mode::Envoy => DispatchRule::Allowed,
            Mode::Ngx => match phase {
                Phase::RequestHeaders | Phase::RequestBody | Phase::CallResponse | Phase::Tick => {
                    DispatchRule::Allowed
                }
                _ => DispatchRule::Trap,
            },
        }
    }

    /// ngx: Pause in response headers is ignored with a warning (observed). Envoy: stops.
    pub fn response_headers_pause(self) -> ResponseHeadersPause {
        match self {
            Mode::Ngx => ResponseHeadersPause::IgnoredWithWarning,
            Mode::Envoy => ResponseHeadersPause::Stop,
        }
    }

    /// ngx: `resume_http_response`/`resume_http_request` in a response phase does
    /// nothing (observed: only Pause-for-buffering exists there). Envoy: it resumes.
    pub fn resume_in_response_phases(self) -> bool {
        matches!(self, Mode::Envoy)
    }

    /// ngx: the request body comes whole, once, with end_of_stream (observed).
    /// Envoy: in chunks as they arrive.
    pub fn request_body_whole(self) -> bool {
        matches!(self, Mode::Ngx)
    }

    /// The `end_of_stream` flag of `on_http_request_headers`. ngx passes 1 whatever follows
    /// (`NGX_HTTP_PROXY_WASM_EOF` in `ngx_http_proxy_wasm_on_request_headers`,
    /// src/http/proxy_wasm/ngx_http_proxy_wasm.c): a filter learns of a body from the
    /// framing headers only. Envoy: true when no body follows (`decodeHeaders(end_stream)`).
    pub fn request_headers_eos(self, has_body: bool) -> bool {
        match self {
            Mode::Ngx => true,
            Mode::Envoy => !has_body,
        }
    }

    /// Whether `on_http_request_body` is called for an empty body. ngx: no; its body handler
    /// returns on `request_body->bufs == NULL` and calls the filter only `if (len)`
    /// (`ngx_http_proxy_wasm_on_request_body_handler`, ngx_http_proxy_wasm.c), so a POST with
    /// `Content-Length: 0` or an empty chunked body never reaches it. Envoy: an empty chunked
    /// body ends with `decodeData(empty, end_stream = true)`.
    pub fn request_body_call_when_empty(self) -> bool {
        matches!(self, Mode::Envoy)
    }

    /// The `end_of_stream` flag of `on_http_response_headers`. ngx passes 1 whatever follows
    /// (`NGX_HTTP_PROXY_WASM_EOF` in `ngx_http_proxy_wasm_on_response_headers`); Envoy: true
    /// for a response without a body (`encodeHeaders(end_stream)`).
    pub fn response_headers_eos(self, bodyless: bool) -> bool {
        match self {
            Mode::Ngx => true,
            Mode::Envoy => bodyless,
        }
    }

    /// ngx: the `end_of_stream` of a response body call on a response with a Content-Length
    /// is `chunk_len == content_length` (`ngx_http_proxy_wasm_on_response_body`:
    /// `resp_chunk_eof = (resp_chunk_len == resp_content_length_n)`), i.e. true only when one
    /// call carries the whole body (a body in one piece, or buffered whole); a body in several
    /// calls never gets end_of_stream, and the empty last buffer is not delivered
    /// (`if (resp_chunk_len || resp_chunk_eof)`). Envoy: the chunk that completes the body.
    pub fn response_eos_needs_whole_body(self) -> bool {
        matches!(self, Mode::Ngx)
    }

    /// ngx: a local response with a non-empty body and no Content-Type gets nginx's
    /// `default_type` (`ngx_http_set_content_type` in `ngx_http_wasm_flush_local_response`);
    /// Envoy sets `text/plain` (`Utility::prepareLocalReply`). Both keep a given one.
    pub fn local_response_default_content_type(self) -> &'static str {
        "text/plain"
    }

    /// Envoy: a local reply with an empty body has neither `content-length` nor
    /// `content-type` (`prepareLocalReply` removes both); ngx sets `Content-Length: 0`.
    pub fn local_response_empty_body_strips_entity_headers(self) -> bool {
        matches!(self, Mode::Envoy)
    }

    /// Shared data `set` with CAS 0: ngx succeeds only when the key does not exist
    /// (ngx_wasm_shm_kv); Envoy writes unconditionally (HOSTS.md).
    pub fn cas_zero_requires_absent(self) -> bool {
        matches!(self, Mode::Ngx)
    }

    /// ngx: `set_tick_period` may be set once per root context; a second call traps
    /// ("tick_period already set", ngx_proxy_wasm_host.c). Envoy: it may change.
    pub fn tick_period_once(self) -> bool {
        matches!(self, Mode::Ngx)
    }

    /// ngx: `send_http_response` appends a line feed to a non-empty body (read in the
    /// module's source; observed 40 → 41 bytes). Envoy: the body is sent as given.
    pub fn local_response_appends_lf(self) -> bool {
        matches!(self, Mode::Ngx)
    }

    /// ngx: of repeated header names in a local response only the last value survives
    /// (observed). Envoy adds each pair (`headers.addCopy`).
    pub fn local_response_last_header_wins(self) -> bool {
        matches!(self, Mode::Ngx)
    }

    /// ngx: a local response has an empty reason phrase (observed). Envoy: the
    /// canonical one.
    pub fn local_response_empty_reason(self) -> bool {
        matches!(self, Mode::Ngx)
    }

    /// ngx: `send_http_response` in on_http_response_headers replaces status and body
    /// only, its headers are ignored (observed).
    pub fn local_response_in_response_headers_keeps_headers(self) -> bool {
        matches!(self, Mode::Envoy)
    }

    pub fn trap_rule(self, policy: FailurePolicy) -> TrapRule {
        match (self, policy) {
            (Mode::Ngx, _) => TrapRule::ResetInstance,
            (Mode::Envoy, FailurePolicy::FailReload) => TrapRule::ReloadVm,
            (Mode::Envoy, _) => TrapRule::FailVm,
        }
    }

    /// Envoy without `allow_on_headers_stop_iteration` (the only way before 1.35, and what
    /// Istio's WasmPlugin gives): proxy-wasm-cpp-host turns a StopIteration returned from
    /// `on_http_request_headers` into StopAllIterationAndWatermark
    /// (`convertVmCallResultToFilterHeadersStatus`, proxy-wasm-cpp-host#143): the body is
    /// buffered (with flow control, no 413) and no `on_http_request_body` comes until the
    /// filter resumes. With the knob (envoyproxy/envoy#40213), body callbacks go on.
    pub fn pause_in_request_headers_stops_body(
        self,
        allow_on_headers_stop_iteration: bool,
    ) -> bool {
        self == Mode::Envoy && !allow_on_headers_stop_iteration
    }

    /// ngx: a dispatch still in flight when its request ends crashes the worker
    /// (signal 11, observed 3/3): the host records a fatal violation. Envoy cancels the
    /// calls of a destroyed context (`http_request_` handlers are cancelled).
    pub fn dispatch_outliving_request_is_fatal(self) -> bool {
        matches!(self, Mode::Ngx)
    }

    /// ngx bug 1 (HOSTS.md, observed with a debugger): a dispatch made by the root context
    /// inside its own `on_http_call_response`, after that call got a complete answer, crashes
    /// the worker: the answered call's connection slot is reused by the new call's fake
    /// connection, and the host's clean-up writes through its stale pointer. A failed call's
    /// answer (time-out, refused, reset) does not trigger it.
    pub fn root_dispatch_in_call_response_crashes(self) -> bool {
        matches!(self, Mode::Ngx)
    }

    /// ngx bug 2 (HOSTS.md, observed): an HTTP context that dispatches a call with a body
    /// from `on_http_call_response`, when the answered call had a body and its answer an
    /// empty one (a 204, a `Content-Length: 0` 409), hangs the worker for ever (its send
    /// chain points to itself; it spins in `ngx_wasm_socket_tcp_send`).
    pub fn dispatch_after_empty_answer_hangs(self) -> bool {
        matches!(self, Mode::Ngx)
    }

    /// ngx bug 3 (HOSTS.md, observed): the worker has `worker_connections` slots; every root
    /// call gets a fake connection, freed when the call completes only if no other call of
    /// that root context is pending, and a root dispatch that fails synchronously (it
    /// returns an error status there; an HTTP context traps) never frees its own. See
    /// [`crate::connections`].
    pub fn worker_connections_leak(self) -> bool {
        matches!(self, Mode::Ngx)
    }

    /// ngx: a client that goes away does not stop the request: a pending call
    /// completes, on_http_call_response runs, the request goes on to the upstream and
    /// on_log runs (observed). Envoy resets the stream: pending calls are cancelled,
    /// the upstream request is reset, on_done/on_log still run.
    pub fn client_abort_stops_request(self) -> bool {
        matches!(self, Mode::Envoy)
    }

    pub fn end_order(self) -> EndOrder {
        match self {
            Mode::Ngx => EndOrder::LogDone,
            Mode::Envoy => EndOrder::DoneLog,
        }
    }

    /// The first token `proxy_http_call` returns: ngx counts from 0 (`callout_ids = 0`
    /// in ngx_http_proxy_wasm_dispatch.c), Envoy from 1.
    pub fn first_call_token(self) -> u32 {
        match self {
            Mode::Ngx => 0,
            Mode::Envoy => 1,
        }
    }

    /// The status of the error page a trap produces for the request that trapped.
    pub fn trap_status(self) -> u16 {
        match self {
            Mode::Ngx => 500,
            Mode::Envoy => 503,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
