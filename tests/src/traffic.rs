//! Traffic: client ↔ filter ↔ upstream, on the worker thread.
//!
//! The worker owns the one Wasm instance and processes [`Event`]s one at a time, like an
//! nginx worker or an Envoy worker thread: a client request arrived, a body chunk, the
//! upstream's head/chunk/end, a dispatch answer, a clock advance, a client gone. All
//! network I/O runs in tokio tasks that post events back; so many requests are in
//! flight at once and their callbacks interleave in the one instance.
//!
//! Per request the pipeline is: `on_request_headers` → request body (ngx: whole, once;
//! envoy: chunks, Pause = buffer) → the upstream (ngx: once the body is read; envoy: as
//! soon as the headers continue, the body streamed) → `on_response_headers` → response
//! body chunks (Pause = buffer, per mode) → the end callbacks (order per mode).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use wasmtime::{Config, Engine, Linker, Module};

use crate::abi::{self, Pairs};
use crate::contexts::{Action, CallResponse, LocalResponse, ROOT_ID, StreamData, Vm, World};
use crate::host::{Down, Event, HostOptions, Poster};
use crate::observed::{Level, Observed, Source, ViolationKind};
use crate::rules::{EndOrder, Mode, ResponseHeadersPause, TrapRule};

/// Where the request side of a request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReqStage {
    Headers,
    PausedHeaders,
    Body,
    PausedBody,
    Done,
}

/// Where the response side is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RespStage {
    Waiting,
    PausedHeaders,
    Body,
    Done,
}

/// The pipeline state of one request.
struct Req {
    ctx: u32,
    generation: u64,
    down: mpsc::UnboundedSender<Down>,
    /// The filter is bypassed (envoy fail_open after a failure).
    bypass: bool,
    has_body: bool,
    client_done: bool,
    client_gone: bool,
    req_stage: ReqStage,
    /// Client body not yet given to the filter.
    req_pending: Vec<u8>,
    /// ngx: the whole body as the client sent it.
    req_whole: Vec<u8>,
    req_eos_delivered: bool,
    req_buffering: bool,
    req_content_length: Option<u64>,
    req_delivered: u64,
    /// envoy: body the filter released while its headers were still held.
    req_released: Vec<u8>,
    upstream_tx: Option<mpsc::UnboundedSender<Bytes>>,
    upstream_started: bool,
    upstream_task: Option<tokio::task::AbortHandle>,
    resp_stage: RespStage,
    resp_pending: Vec<u8>,
    resp_content_length: Option<u64>,
    resp_delivered: u64,
    resp_eos_delivered: bool,
    resp_buffering: bool,
    resp_overflowed: bool,
    upstream_done: bool,
    /// Body released by the filter while the head is held (envoy Pause in headers).
    held_body: Vec<u8>,
    head_sent: bool,
    declared_length: Option<u64>,
    sent: u64,
    /// The response is a local one (no upstream events expected).
    local: bool,
}

/// The worker: one instance, one thread.
pub struct Worker {
    opts: Arc<HostOptions>,
    mode: Mode,
    engine: Engine,
    linker: Linker<World>,
    module: Module,
    vm: Option<Vm>,
    generation: u64,
    /// envoy: the VM failed (trap); it is never replaced.
    failed: bool,
    observed: Arc<Mutex<Observed>>,
    poster: Poster,
    runtime: tokio::runtime::Handle,
    reqs: HashMap<u64, Req>,
    by_ctx: HashMap<u32, u64>,
    next_ctx: u32,
    now_ns: u64,
    next_tick: Option<u64>,
    tick_period: Option<u64>,
    /// (instance generation, token) → the request that dispatched the call.
    call_owners: HashMap<(u64, u32), u64>,
}

impl Worker {
    pub fn new(
        opts: Arc<HostOptions>,
        bytes: &[u8],
        observed: Arc<Mutex<Observed>>,
        poster: Poster,
        runtime: tokio::runtime::Handle,
    ) -> Result<Worker> {
        let engine = engine()?;
        let mut linker = Linker::new(&engine);
        crate::hostcalls::link(&mut linker)?;
        let module = compiled(&engine, bytes)?;
        let mut worker = Worker {
            mode: opts.mode,
            now_ns: opts.start_time_ns,
            opts,
            engine,
            linker,
            module,
            vm: None,
            generation: 0,
            failed: false,
            observed,
            poster,
            runtime,
            reqs: HashMap::new(),
            by_ctx: HashMap::new(),
            next_ctx: ROOT_ID + 1,
            next_tick: None,
            tick_period: None,
            call_owners: HashMap::new(),
        };
        if let Err(e) = worker.new_instance() {
            if e.to_string().contains("on_configure returned false") {
                worker.observed.lock().unwrap().violation(
                    ViolationKind::ConfigureFailed,
                    "on_configure returned false: Kong stops the worker".into(),
                );
            }
            return Err(e);
        }
        Ok(worker)
    }

    /// Instantiates the module and starts its root context.
    fn new_instance(&mut self) -> Result<()> {
        self.generation += 1;
        let world = World::new(self.opts.clone(), self.observed.clone(), self.now_ns);
        let mut vm = Vm::instantiate(
            &self.engine,
            &self.linker,
            &self.module,
            world,
            self.generation,
        )?;
        let started = vm.start_root();
        self.vm = Some(vm);
        self.after_call();
        started
    }

    fn host_log(&self, level: Level, ctx: u32, message: impl Into<String>) {
        self.observed
            .lock()
            .unwrap()
            .log(level, Source::Host, ctx, message.into());
    }

    pub fn run(&mut self, mut rx: mpsc::UnboundedReceiver<Event>) {
        while let Some(event) = rx.blocking_recv() {
            let stop = matches!(event, Event::Shutdown);
            self.handle(event);
            self.poster.pending.dec();
            if stop {
                break;
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::ClientRequest {
                id,
                method,
                path,
                headers,
                has_body,
                peer,
                local,
                connection_id,
                down,
            } => self.client_request(
                id,
                method,
                path,
                headers,
                has_body,
                (peer, local, connection_id),
                down,
            ),
            Event::ClientBody { id, data } => {
                if let Some(r) = self.reqs.get_mut(&id) {
                    r.req_pending.extend_from_slice(&data);
                    if self.mode.request_body_whole() || r.bypass {
                        r.req_whole.extend_from_slice(&data);
                    }
                    self.with_stream(id, |s| s.request_size += data.len() as u64);
                    self.drive(id);
                }
            }
            Event::ClientBodyEnd { id } => {
                if let Some(r) = self.reqs.get_mut(&id) {
                    r.client_done = true;
                    self.drive(id);
                }
            }
            Event::ClientGone { id } => self.client_gone(id),
            Event::UpstreamHead {
                id,
                status,
                headers,
            } => self.upstream_head(id, status, headers),
            Event::UpstreamBody { id, data } => {
                if let Some(r) = self.reqs.get_mut(&id)
                    && !r.local
                {
                    r.resp_pending.extend_from_slice(&data);
                    self.drive(id);
                }
            }
            Event::UpstreamEnd { id } => {
                if let Some(r) = self.reqs.get_mut(&id)
                    && !r.local
                {
                    r.upstream_done = true;
                    self.drive(id);
                }
            }
            Event::UpstreamFailed { id, refused } => self.upstream_failed(id, refused),
            Event::CallDone {
                generation,
                token,
                outcome,
            } => self.call_done(generation, token, outcome),
            Event::Advance { by, done } => {
                self.advance(by);
                let _ = done.send(());
            }
            Event::Shutdown => {}
        }
    }

    fn with_stream<T>(&mut self, id: u64, f: impl FnOnce(&mut StreamData) -> T) -> Option<T> {
        let ctx = self.reqs.get(&id)?.ctx;
        let vm = self.vm.as_mut()?;
        vm.world().streams.get_mut(&ctx).map(f)
    }

    fn stream(&mut self, id: u64) -> Option<&mut StreamData> {
        let ctx = self.reqs.get(&id)?.ctx;
        self.vm.as_mut()?.world().streams.get_mut(&ctx)
    }

    /// Whether the request's instance can still run its callbacks.
    fn alive(&self, id: u64) -> bool {
        let Some(r) = self.reqs.get(&id) else {
            return false;
        };
        match &self.vm {
            Some(vm) => !vm.trapped && vm.generation == r.generation && !r.bypass,
            None => false,
        }
    }

    // ---- requests ------------------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    fn client_request(
        &mut self,
        id: u64,
        method: String,
        path: String,
        headers: Pairs,
        has_body: bool,
        (peer, local, connection_id): (SocketAddr, SocketAddr, u64),
        down: mpsc::UnboundedSender<Down>,
    ) {
        // The request holds the settle count until it is finished.
        self.poster.pending.inc();
        let ngx_fresh = self.mode == Mode::Ngx && self.vm.as_ref().is_none_or(|vm| vm.trapped);
        if ngx_fresh {
            self.host_log(
                Level::Info,
                0,
                "proxy_wasm: new instance (the previous one trapped)",
            );
            if let Err(e) = self.new_instance() {
                self.host_log(
                    Level::Error,
                    0,
                    format!("failed to start a new instance: {e:#}"),
                );
            }
        }
        let ctx = self.next_ctx;
        self.next_ctx += 1;
        let bypass = self.failed && self.opts.fail_open;
        let generation = self.generation;
        self.reqs.insert(
            id,
            Req {
                ctx,
                generation,
                down,
                bypass,
                has_body,
                client_done: !has_body,
                client_gone: false,
                req_stage: ReqStage::Headers,
                req_pending: Vec::new(),
                req_whole: Vec::new(),
                req_eos_delivered: false,
                req_buffering: false,
                req_content_length: None,
                req_delivered: 0,
                req_released: Vec::new(),
                upstream_tx: None,
                upstream_started: false,
                upstream_task: None,
                resp_stage: RespStage::Waiting,
                resp_pending: Vec::new(),
                resp_content_length: None,
                resp_delivered: 0,
                resp_eos_delivered: false,
                resp_buffering: false,
                resp_overflowed: false,
                upstream_done: false,
                held_body: Vec::new(),
                head_sent: false,
                declared_length: None,
                sent: 0,
                local: false,
            },
        );
        self.by_ctx.insert(ctx, id);
        if let Some(r) = self.reqs.get_mut(&id) {
            r.req_content_length = abi::content_length(&headers);
        }
        let request_headers = self.request_pairs(&method, &path, headers, local);
        self.observed
            .lock()
            .unwrap()
            .open_request_fuel(ctx, &method, &path);
        let failed = self.failed;
        if let Some(vm) = self.vm.as_mut() {
            vm.world().streams.insert(
                ctx,
                StreamData {
                    method,
                    path,
                    peer: Some(peer),
                    local: Some(local),
                    connection_id,
                    request_headers,
                    ..StreamData::default()
                },
            );
        }
        if failed && !bypass {
            // envoy: a failed VM fails every stream (CHECK_FAIL_HTTP → failStream).
            self.error_response(id, 503, "");
            return;
        }
        if bypass {
            self.drive(id);
            return;
        }
        let created = self.vm.as_mut().map(|vm| vm.context_create(ctx));
        if let Some(Err(trap)) = created {
            self.trap(Some(id), "proxy_on_context_create", trap);
            return;
        }
        self.drive(id);
    }

    /// The request header map the filter sees, pseudo-headers first.
    fn request_pairs(&self, method: &str, path: &str, headers: Pairs, local: SocketAddr) -> Pairs {
        let mut pairs: Pairs = Vec::new();
        pairs.push((":path".into(), path.as_bytes().to_vec()));
        pairs.push((":method".into(), method.as_bytes().to_vec()));
        pairs.push((":scheme".into(), b"http".to_vec()));
        match self.mode {
            // ngx: `:authority` is server_name:port (ngx_proxy_wasm_maps.c), and the
            // Host header stays.
            Mode::Ngx => {
                pairs.push((
                    ":authority".into(),
                    format!("kong:{}", local.port()).into_bytes(),
                ));
                pairs.extend(headers);
            }
            // Envoy's HTTP/1 codec turns Host into `:authority`; the connection manager
            // adds x-forwarded-proto and x-request-id.
            Mode::Envoy => {
                let host = abi::get(&headers, "host")
                    .map(<[u8]>::to_vec)
                    .unwrap_or_default();
                pairs.push((":authority".into(), host));
                pairs.extend(headers.into_iter().filter(|(k, _)| k != "host"));
                pairs.push(("x-forwarded-proto".into(), b"http".to_vec()));
                if abi::get(&pairs, "x-request-id").is_none() {
                    let rid = format!("{:032x}", self.now_ns ^ (self.next_ctx as u64) << 40);
                    pairs.push(("x-request-id".into(), rid.into_bytes()));
                }
            }
        }
        pairs
    }

    /// Advances a request as far as it can go.
    fn drive(&mut self, id: u64) {
        for _ in 0..10_000 {
            let Some(r) = self.reqs.get(&id) else { return };
            if r.bypass {
                self.drive_bypass(id);
                return;
            }
            let progressed = self.step_request(id) || self.step_response(id);
            if !progressed {
                return;
            }
        }
    }

    /// envoy fail_open: the request goes through without the filter.
    fn drive_bypass(&mut self, id: u64) {
        let Some(r) = self.reqs.get_mut(&id) else {
            return;
        };
        if !r.upstream_started && r.client_done {
            let body = std::mem::take(&mut r.req_whole);
            self.start_upstream(id, Some(body));
        }
        let Some(r) = self.reqs.get_mut(&id) else {
            return;
        };
        if r.resp_stage == RespStage::Body {
            let data = std::mem::take(&mut r.resp_pending);
            if !data.is_empty() {
                self.send_body(id, data);
            }
            let Some(r) = self.reqs.get_mut(&id) else {
                return;
            };
            if r.upstream_done {
                r.resp_stage = RespStage::Done;
                self.finish(id, false);
            }
        }
    }

    /// One step of the request side; true when something changed.
    fn step_request(&mut self, id: u64) -> bool {
        let Some(r) = self.reqs.get(&id) else {
            return false;
        };
        let ctx = r.ctx;
        match r.req_stage {
            ReqStage::Headers => {
                if !self.alive(id) {
                    self.fail_dead(id);
                    return false;
                }
                let eos = self.mode.request_headers_eos(r.has_body);
                let n = self
                    .stream(id)
                    .map(|s| s.request_headers.len())
                    .unwrap_or(0) as u32;
                let result = self.vm.as_mut().unwrap().request_headers(ctx, n, eos);
                let Some(action) = self.after_callback(id, "on_request_headers", result) else {
                    return false;
                };
                let r = self.reqs.get_mut(&id).unwrap();
                if action == Action::Pause {
                    r.req_stage = ReqStage::PausedHeaders;
                } else {
                    r.req_stage = ReqStage::Body;
                    self.headers_continued(id);
                }
                true
            }
            ReqStage::PausedHeaders | ReqStage::PausedBody => {
                let resumed = self.with_stream(id, |s| std::mem::take(&mut s.resume_request));
                if resumed != Some(true) {
                    // Envoy keeps calling the filter with body data while it holds
                    // the headers or buffers the body (StopIterationAndBuffer).
                    return self.mode == Mode::Envoy && self.step_request_body(id);
                }
                let r = self.reqs.get_mut(&id).unwrap();
                let was_headers = r.req_stage == ReqStage::PausedHeaders;
                let buffered = r.req_buffering;
                if was_headers {
                    r.req_stage = ReqStage::Body;
                    self.headers_continued(id);
                    if buffered && self.mode == Mode::Envoy {
                        // continueDecoding resumes the whole chain: the headers, then the
                        // body buffered meanwhile (StopIterationAndBuffer), with its end.
                        self.body_continued(id);
                    }
                } else {
                    self.body_continued(id);
                }
                true
            }
            ReqStage::Body => self.step_request_body(id),
            ReqStage::Done => false,
        }
    }

    /// The request headers continued: envoy sends them upstream now.
    fn headers_continued(&mut self, id: u64) {
        let r = self.reqs.get(&id).unwrap();
        if !r.has_body {
            self.reqs.get_mut(&id).unwrap().req_stage = ReqStage::Done;
            self.start_upstream(id, Some(Vec::new()));
        } else if self.mode == Mode::Envoy {
            self.start_upstream(id, None);
            let r = self.reqs.get_mut(&id).unwrap();
            let released = std::mem::take(&mut r.req_released);
            let done = r.req_eos_delivered && !r.req_buffering;
            if let Some(tx) = &r.upstream_tx
                && !released.is_empty()
            {
                let _ = tx.send(Bytes::from(released));
            }
            if done {
                r.upstream_tx = None;
                r.req_stage = ReqStage::Done;
            }
        }
    }

    /// The filter let the current request body buffer go.
    fn body_continued(&mut self, id: u64) {
        let body = self
            .with_stream(id, |s| std::mem::take(&mut s.request_body))
            .unwrap_or_default();
        let r = self.reqs.get_mut(&id).unwrap();
        r.req_buffering = false;
        match self.mode {
            Mode::Ngx => {
                r.req_stage = ReqStage::Done;
                let spooled = self.with_stream(id, |s| s.request_body_spooled) == Some(true);
                let r = self.reqs.get_mut(&id).unwrap();
                // A spooled body reaches the upstream whole (the filter saw none).
                let upstream_body = if spooled {
                    std::mem::take(&mut r.req_whole)
                } else {
                    body
                };
                self.start_upstream(id, Some(upstream_body));
            }
            Mode::Envoy => {
                if r.req_stage == ReqStage::PausedHeaders {
                    // Released by the filter, held with the headers.
                    r.req_released.extend_from_slice(&body);
                    return;
                }
                r.req_stage = if r.req_eos_delivered {
                    ReqStage::Done
                } else {
                    ReqStage::Body
                };
                let done = r.req_eos_delivered;
                if let Some(tx) = &r.upstream_tx {
                    if !body.is_empty() {
                        let _ = tx.send(Bytes::from(body));
                    }
                    if done {
                        r.upstream_tx = None;
                    }
                }
            }
        }
    }

    fn step_request_body(&mut self, id: u64) -> bool {
        if !self.alive(id) {
            self.fail_dead(id);
            return false;
        }
        let chunk_size = self.opts.request_chunk_size;
        let r = self.reqs.get_mut(&id).unwrap();
        let ctx = r.ctx;
        let (chunk, eos) = if self.mode.request_body_whole() {
            if !r.client_done {
                return false;
            }
            r.req_pending.clear();
            (r.req_whole.clone(), true)
        } else {
            let chunk = next_chunk(
                &mut r.req_pending,
                &mut r.req_delivered,
                r.client_done,
                chunk_size,
            );
            if let Some(chunk) = chunk {
                // With a Content-Length the chunk that completes it carries
                // end_of_stream (Envoy's HTTP/1 codec dispatches the last buffered
                // body with end_stream); a chunked request ends with an empty call.
                let eos = (r.client_done && r.req_pending.is_empty())
                    || r.req_content_length.is_some_and(|cl| r.req_delivered >= cl);
                (chunk, eos)
            } else if r.client_done && !r.req_eos_delivered {
                (Vec::new(), true)
            } else {
                return false;
            }
        };
        r.req_eos_delivered = eos;
        if chunk.is_empty() && eos && !self.mode.request_body_call_when_empty() {
            // ngx: no on_http_request_body for an empty body; the request goes on.
            self.with_stream(id, |s| s.request_body.clear());
            self.body_continued(id);
            return true;
        }
        let buffering = r.req_buffering;
        let mode = self.mode;
        let limit = self.opts.client_body_buffer_size;
        let chunk_len = chunk.len();
        let size = self
            .with_stream(id, |s| {
                if mode == Mode::Ngx && chunk.len() > limit {
                    // nginx spooled the body to a temp file: the filter is told its size
                    // (the file's, ngx_http_proxy_wasm_on_request_body_handler) but cannot
                    // read it (get_buffer: "cannot read request body buffered to file").
                    s.request_body_spooled = true;
                    s.request_body.clear();
                    return chunk_len;
                } else if buffering {
                    s.request_body.extend_from_slice(&chunk);
                } else {
                    s.request_body = chunk;
                }
                s.request_body.len()
            })
            .unwrap_or(0);
        if mode == Mode::Envoy && size > self.opts.buffer_limit {
            // Envoy: buffering past per_connection_buffer_limit_bytes → 413.
            self.host_log(Level::Debug, ctx, "request body buffer limit exceeded: 413");
            self.error_response(id, 413, "Payload Too Large");
            return false;
        }
        let result = self
            .vm
            .as_mut()
            .unwrap()
            .request_body(ctx, size as u32, eos);
        let Some(action) = self.after_callback(id, "on_request_body", result) else {
            return false;
        };
        if action == Action::Pause {
            let r = self.reqs.get_mut(&id).unwrap();
            if r.req_stage != ReqStage::PausedHeaders {
                r.req_stage = ReqStage::PausedBody;
            }
            r.req_buffering = true;
        } else {
            self.body_continued(id);
        }
        true
    }

    // ---- upstream ------------------------------------------------------------------

    /// Sends the request upstream: `Some(body)` whole, `None` streamed as released.
    fn start_upstream(&mut self, id: u64, body: Option<Vec<u8>>) {
        let Some(r) = self.reqs.get_mut(&id) else {
            return;
        };
        if r.upstream_started {
            if let (Some(body), Some(tx)) = (body, r.upstream_tx.take()) {
                let _ = tx.send(Bytes::from(body));
            }
            return;
        }
        r.upstream_started = true;
        let streamed = body.is_none();
        let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
        match body {
            None => r.upstream_tx = Some(tx),
            Some(b) => {
                if !b.is_empty() {
                    let _ = tx.send(Bytes::from(b));
                }
            }
        }
        let Some(addr) = self.opts.upstream else {
            self.host_log(Level::Error, 0, "no upstream configured for the route");
            self.upstream_failed(id, true);
            return;
        };
        let mode = self.mode;
        let Some(stream) = self.stream(id) else {
            return;
        };
        stream.request_sent = true;
        stream.upstream_addr = Some(addr);
        let method = abi::get(&stream.request_headers, ":method")
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_else(|| "GET".into());
        let path = abi::get(&stream.request_headers, ":path")
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_else(|| "/".into());
        let authority = abi::get(&stream.request_headers, ":authority").map(<[u8]>::to_vec);
        let mut headers: Pairs = stream
            .request_headers
            .iter()
            .filter(|(k, _)| !k.starts_with(':'))
            .filter(|(k, _)| {
                !matches!(
                    k.as_str(),
                    "content-length" | "transfer-encoding" | "connection"
                )
            })
            .cloned()
            .collect();
        if mode == Mode::Envoy
            && let Some(a) = authority
        {
            headers.insert(0, ("host".into(), a));
        }
        let poster = self.poster.clone();
        let guard = crate::host::PendingGuard::new(&poster.pending);
        let task = self.runtime.spawn(async move {
            let _guard = guard;
            forward(id, addr, method, path, headers, rx, streamed, &poster).await;
        });
        if let Some(r) = self.reqs.get_mut(&id) {
            r.upstream_task = Some(task.abort_handle());
        }
    }

    fn upstream_failed(&mut self, id: u64, refused: bool) {
        let Some(r) = self.reqs.get(&id) else { return };
        if r.local || r.resp_stage != RespStage::Waiting {
            // Broke mid-response: the client gets a broken response.
            if let Some(r) = self.reqs.get_mut(&id) {
                r.upstream_done = true;
                let _ = r.down.send(Down::Abort);
                r.head_sent = true;
            }
            self.finish(id, true);
            return;
        }
        // The proxy answers the upstream failure itself; the answer goes through the
        // response phases like any response (nginx error page / Envoy router reply).
        let (status, body): (u16, &str) = match self.mode {
            Mode::Ngx => (
                502,
                "{\n  \"message\":\"An invalid response was received from the upstream server\"\n}",
            ),
            Mode::Envoy if refused => (503, crate::dispatch::ENVOY_REFUSED),
            Mode::Envoy => (503, crate::dispatch::ENVOY_RESET),
        };
        let ctype: &[u8] = if self.mode == Mode::Ngx {
            b"application/json; charset=utf-8"
        } else {
            b"text/plain"
        };
        let headers = vec![
            ("content-type".to_string(), ctype.to_vec()),
            (
                "content-length".to_string(),
                body.len().to_string().into_bytes(),
            ),
        ];
        self.synthetic_response(id, status, headers, body.as_bytes().to_vec());
    }

    /// Feeds a response the host produced itself through the response phases.
    fn synthetic_response(&mut self, id: u64, status: u16, headers: Pairs, body: Vec<u8>) {
        let Some(r) = self.reqs.get_mut(&id) else {
            return;
        };
        r.local = true;
        if let Some(task) = r.upstream_task.take() {
            task.abort();
        }
        r.upstream_tx = None;
        r.req_stage = ReqStage::Done;
        r.resp_pending = body;
        r.upstream_done = true;
        self.upstream_head(id, status, headers);
    }

    // ---- response ------------------------------------------------------------------

    fn upstream_head(&mut self, id: u64, status: u16, headers: Pairs) {
        let Some(r) = self.reqs.get_mut(&id) else {
            return;
        };
        if r.resp_stage != RespStage::Waiting {
            return;
        }
        r.resp_content_length = abi::content_length(&headers);
        if r.bypass {
            r.resp_stage = RespStage::Body;
            self.send_head(id, status, false, headers);
            self.drive(id);
            return;
        }
        let mut pairs: Pairs = vec![(":status".into(), status.to_string().into_bytes())];
        pairs.extend(headers);
        self.with_stream(id, |s| {
            s.response_headers = pairs;
            s.response_started = true;
        });
        if !self.alive(id) {
            self.fail_dead(id);
            return;
        }
        let r = self.reqs.get_mut(&id).unwrap();
        // The response phases have begun (a local response now replaces this one).
        r.resp_stage = RespStage::Body;
        let ctx = r.ctx;
        // No body follows: Content-Length 0, or a local reply without a body.
        let bodyless = (r.resp_content_length == Some(0) || r.local)
            && r.upstream_done
            && r.resp_pending.is_empty();
        let eos = self.mode.response_headers_eos(bodyless);
        let n = self
            .stream(id)
            .map(|s| s.response_headers.len())
            .unwrap_or(0) as u32;
        let result = self.vm.as_mut().unwrap().response_headers(ctx, n, eos);
        let Some(action) = self.after_callback(id, "on_response_headers", result) else {
            return;
        };
        let r = self.reqs.get_mut(&id).unwrap();
        r.resp_stage = RespStage::Body;
        if bodyless && !self.mode.response_eos_needs_whole_body() {
            r.resp_eos_delivered = true;
        }
        match (action, self.mode.response_headers_pause()) {
            (Action::Pause, ResponseHeadersPause::Stop) => {
                r.resp_stage = RespStage::PausedHeaders;
            }
            (Action::Pause, ResponseHeadersPause::IgnoredWithWarning) => {
                self.host_log(
                    Level::Warn,
                    ctx,
                    "pause in \"on_response_headers\" is not supported: continuing",
                );
                self.send_response_head(id);
            }
            (Action::Continue, _) => self.send_response_head(id),
        }
        self.drive(id);
    }

    /// Sends the response head as the filter left it.
    fn send_response_head(&mut self, id: u64) {
        let Some(pairs) = self.stream(id).map(|s| s.response_headers.clone()) else {
            return;
        };
        let status = abi::get(&pairs, ":status")
            .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
            .unwrap_or(200);
        let headers: Pairs = pairs
            .into_iter()
            .filter(|(k, _)| !k.starts_with(':'))
            .collect();
        let empty_reason = self.reqs.get(&id).is_some_and(|r| r.local)
            && self.mode.local_response_empty_reason()
            && self.stream(id).is_some_and(|s| s.local_response.is_none());
        self.send_head(id, status, empty_reason, headers);
        let held = self
            .reqs
            .get_mut(&id)
            .map(|r| std::mem::take(&mut r.held_body))
            .unwrap_or_default();
        if !held.is_empty() {
            self.send_body(id, held);
        }
    }

    fn send_head(&mut self, id: u64, status: u16, empty_reason: bool, headers: Pairs) {
        let Some(r) = self.reqs.get_mut(&id) else {
            return;
        };
        if r.head_sent {
            return;
        }
        r.head_sent = true;
        r.declared_length = abi::content_length(&headers);
        let _ = r.down.send(Down::Head {
            status,
            empty_reason,
            headers,
        });
        self.with_stream(id, |s| s.response_headers_sent = true);
    }

    fn send_body(&mut self, id: u64, data: Vec<u8>) {
        let Some(r) = self.reqs.get_mut(&id) else {
            return;
        };
        if !r.head_sent {
            r.held_body.extend_from_slice(&data);
            return;
        }
        if let Some(declared) = r.declared_length
            && r.sent + data.len() as u64 > declared
        {
            let detail = format!(
                "context {}: Content-Length {declared} was sent but the body grew to {} bytes",
                r.ctx,
                r.sent + data.len() as u64
            );
            r.declared_length = None;
            r.sent = u64::MAX / 2;
            let _ = r.down.send(Down::Abort);
            self.observed
                .lock()
                .unwrap()
                .violation(ViolationKind::BodyChangedAfterContentLength, detail);
            return;
        }
        r.sent += data.len() as u64;
        let _ = r.down.send(Down::Data(Bytes::from(data)));
    }

    fn step_response(&mut self, id: u64) -> bool {
        let Some(r) = self.reqs.get(&id) else {
            return false;
        };
        match r.resp_stage {
            RespStage::Waiting | RespStage::Done => false,
            RespStage::PausedHeaders => {
                let resumed = self.with_stream(id, |s| std::mem::take(&mut s.resume_response));
                if resumed == Some(true) {
                    self.reqs.get_mut(&id).unwrap().resp_stage = RespStage::Body;
                    self.send_response_head(id);
                    true
                } else {
                    self.step_response_body(id)
                }
            }
            RespStage::Body => self.step_response_body(id),
        }
    }

    fn step_response_body(&mut self, id: u64) -> bool {
        let chunk_size = self.opts.response_chunk_size;
        let mode = self.mode;
        let r = self.reqs.get_mut(&id).unwrap();
        if r.resp_buffering && mode == Mode::Envoy {
            // Resumed after buffering (resume_http_response): release the buffer.
            let resumed = self.with_stream(id, |s| std::mem::take(&mut s.resume_response));
            if resumed == Some(true) {
                let body = self
                    .with_stream(id, |s| std::mem::take(&mut s.response_body))
                    .unwrap_or_default();
                let r = self.reqs.get_mut(&id).unwrap();
                r.resp_buffering = false;
                self.send_body(id, body);
                return true;
            }
        }
        let r = self.reqs.get_mut(&id).unwrap();
        if r.resp_eos_delivered {
            // Envoy: a held head or a buffered end waits for resume_http_response.
            if r.upstream_done && !r.resp_buffering && r.resp_stage == RespStage::Body {
                r.resp_stage = RespStage::Done;
                self.finish(id, false);
                return true;
            }
            return false;
        }
        let cl = r.resp_content_length;
        let whole_body_eos = mode.response_eos_needs_whole_body();
        let chunk = next_chunk(
            &mut r.resp_pending,
            &mut r.resp_delivered,
            r.upstream_done,
            chunk_size,
        );
        let (chunk, eos) = if let Some(chunk) = chunk {
            // Envoy: with a Content-Length the chunk that completes it carries
            // end_of_stream. ngx: only a call carrying the whole body does (decided below,
            // on the size the call gets). A chunked upstream ends with an empty call.
            let eos = match cl {
                Some(cl) if !whole_body_eos => r.resp_delivered >= cl && !r.resp_overflowed,
                _ => false,
            };
            (chunk, eos)
        } else if r.upstream_done {
            let withheld = mode == Mode::Ngx && cl.is_some_and(|cl| cl > 0);
            if withheld
                || (cl.is_some() && r.resp_delivered >= cl.unwrap_or(0) && r.resp_delivered > 0)
            {
                // ngx, Content-Length: the empty last buffer is never delivered, so no
                // end_of_stream call comes unless one call carried the whole body (after a
                // buffers overflow it never does, observed); what is buffered goes out and
                // on_log still runs.
                r.resp_eos_delivered = true;
                if withheld {
                    r.resp_buffering = false;
                    let rest = self
                        .with_stream(id, |s| std::mem::take(&mut s.response_body))
                        .unwrap_or_default();
                    self.send_body(id, rest);
                }
                return true;
            }
            (Vec::new(), true)
        } else {
            return false;
        };
        if !self.alive(id) {
            self.fail_dead(id);
            return false;
        }
        let r = self.reqs.get_mut(&id).unwrap();
        let ctx = r.ctx;
        let buffering = r.resp_buffering;
        let size = self
            .with_stream(id, |s| {
                if buffering {
                    s.response_body.extend_from_slice(&chunk);
                } else {
                    s.response_body = chunk;
                }
                s.response_body.len()
            })
            .unwrap_or(0);
        let r = self.reqs.get_mut(&id).unwrap();
        let eos = eos
            || (whole_body_eos
                && !r.resp_overflowed
                && cl.is_some_and(|cl| cl > 0 && size as u64 == cl));
        r.resp_eos_delivered = eos;
        if mode == Mode::Envoy && size > self.opts.buffer_limit {
            let head_sent = self.reqs.get(&id).is_some_and(|r| r.head_sent);
            if head_sent {
                self.host_log(
                    Level::Debug,
                    ctx,
                    "response buffer limit exceeded after headers: reset",
                );
                if let Some(r) = self.reqs.get_mut(&id) {
                    let _ = r.down.send(Down::Abort);
                }
                self.finish(id, true);
            } else {
                self.error_response(id, 500, "Internal Server Error");
            }
            return false;
        }
        let result = self
            .vm
            .as_mut()
            .unwrap()
            .response_body(ctx, size as u32, eos);
        let Some(action) = self.after_callback(id, "on_response_body", result) else {
            return false;
        };
        let body_now = self.stream(id).map(|s| s.response_body.len()).unwrap_or(0);
        let capacity = self.opts.response_body_buffers.0 * self.opts.response_body_buffers.1;
        let r = self.reqs.get_mut(&id).unwrap();
        let release = match (action, mode) {
            (Action::Continue, _) => true,
            (Action::Pause, Mode::Envoy) => {
                r.resp_buffering = true;
                false
            }
            (Action::Pause, Mode::Ngx) => {
                if eos || r.resp_overflowed {
                    true
                } else if body_now > capacity {
                    // The buffers overflow: what is buffered goes out and buffering
                    // stops.
                    r.resp_overflowed = true;
                    self.host_log(
                        Level::Error,
                        ctx,
                        "proxy_wasm: response body buffers exhausted (wasm_response_body_buffers)",
                    );
                    true
                } else {
                    r.resp_buffering = true;
                    false
                }
            }
        };
        if release {
            let body = self
                .with_stream(id, |s| std::mem::take(&mut s.response_body))
                .unwrap_or_default();
            if let Some(r) = self.reqs.get_mut(&id) {
                r.resp_buffering = false;
            }
            self.send_body(id, body);
        }
        true
    }

    // ---- the end -------------------------------------------------------------------

    /// Ends a request: the last bytes, the end callbacks, cleanup.
    /// `broken`: the client already got (or gets) a broken response.
    fn finish(&mut self, id: u64, broken: bool) {
        let Some(r) = self.reqs.get_mut(&id) else {
            return;
        };
        r.resp_stage = RespStage::Done;
        r.req_stage = ReqStage::Done;
        if let Some(task) = r.upstream_task.take() {
            task.abort();
        }
        r.upstream_tx = None;
        if !broken {
            if !r.head_sent {
                // Paused headers that never resumed: send what we have.
                self.send_response_head(id);
            }
            let r = self.reqs.get_mut(&id).unwrap();
            let held = std::mem::take(&mut r.held_body);
            if !held.is_empty() {
                self.send_body(id, held);
            }
            let r = self.reqs.get_mut(&id).unwrap();
            match r.declared_length {
                Some(declared) if declared != r.sent => {
                    let detail = format!(
                        "context {}: Content-Length {declared} was sent but the body has {} bytes",
                        r.ctx, r.sent
                    );
                    let _ = r.down.send(Down::Abort);
                    self.observed
                        .lock()
                        .unwrap()
                        .violation(ViolationKind::BodyChangedAfterContentLength, detail);
                }
                _ => {
                    let _ = r.down.send(Down::End);
                }
            }
        }
        self.end_callbacks(id);
        self.close(id);
    }

    /// The end callbacks, in the mode's order, if the instance is still alive.
    fn end_callbacks(&mut self, id: u64) {
        let ctx = self.reqs[&id].ctx;
        // Calls still in flight for this context.
        let outstanding: Vec<u32> = match self.vm.as_mut() {
            Some(vm) => vm
                .world()
                .calls
                .iter()
                .filter(|(_, owner)| **owner == ctx)
                .map(|(t, _)| *t)
                .collect(),
            None => Vec::new(),
        };
        if !outstanding.is_empty() && self.alive(id) {
            if self.mode.dispatch_outliving_request_is_fatal() {
                self.observed.lock().unwrap().violation(
                    ViolationKind::DispatchOutlivedRequest,
                    format!(
                        "context {ctx}: dispatch {outstanding:?} still in flight when the request ended (nginx worker crashes with signal 11)"
                    ),
                );
            }
            // Both: the call's answer is dropped (envoy cancels it).
            let vm = self.vm.as_mut().unwrap();
            for t in outstanding {
                vm.world().calls.remove(&t);
            }
        }
        if !self.alive(id) {
            return;
        }
        let order = match self.mode.end_order() {
            EndOrder::LogDone => ["log", "done", "delete"],
            EndOrder::DoneLog => ["done", "log", "delete"],
        };
        for step in order {
            if !self.alive(id) {
                return;
            }
            let vm = self.vm.as_mut().unwrap();
            let result = match step {
                "log" => vm.log(ctx),
                "done" => vm.done(ctx),
                _ => vm.delete(ctx),
            };
            self.after_call();
            if let Err(trap) = result {
                self.trap(Some(id), &format!("proxy_on_{step}"), trap);
                return;
            }
        }
    }

    fn close(&mut self, id: u64) {
        if let Some(r) = self.reqs.remove(&id) {
            self.by_ctx.remove(&r.ctx);
            if let Some(vm) = self.vm.as_mut()
                && vm.generation == r.generation
            {
                vm.world().streams.remove(&r.ctx);
            }
            self.poster.pending.dec();
        }
    }

    /// A response the host sends without the filter (trap, buffer limits): no more
    /// callbacks except the end ones.
    fn error_response(&mut self, id: u64, status: u16, body: &str) {
        let Some(r) = self.reqs.get_mut(&id) else {
            return;
        };
        if let Some(task) = r.upstream_task.take() {
            task.abort();
        }
        if r.head_sent {
            let _ = r.down.send(Down::Abort);
            self.finish(id, true);
            return;
        }
        let (ctype, body) = match (self.mode, status) {
            (Mode::Ngx, 500) => (
                "application/json; charset=utf-8",
                "{\n  \"message\":\"An unexpected error occurred\"\n}".to_string(),
            ),
            _ => ("text/plain", body.to_string()),
        };
        let mut headers: Pairs =
            vec![("content-length".into(), body.len().to_string().into_bytes())];
        if !body.is_empty() {
            headers.push(("content-type".into(), ctype.as_bytes().to_vec()));
        }
        self.send_head(id, status, false, headers);
        self.send_body(id, body.into_bytes());
        let r = self.reqs.get_mut(&id).unwrap();
        r.declared_length = None;
        let _ = r.down.send(Down::End);
        self.finish(id, true);
    }

    /// The request's instance is gone (ngx: trapped; envoy: failed): it fails now.
    fn fail_dead(&mut self, id: u64) {
        let status = self.mode.trap_status();
        self.error_response(id, status, "");
    }

    fn client_gone(&mut self, id: u64) {
        let Some(r) = self.reqs.get_mut(&id) else {
            return;
        };
        if r.client_gone {
            return;
        }
        r.client_gone = true;
        let ctx = r.ctx;
        self.host_log(Level::Info, ctx, "client closed the connection");
        if self.mode.client_abort_stops_request() {
            // Envoy resets the stream: the upstream request is reset, pending calls
            // are cancelled (end_callbacks drops them), on_done/on_log still run.
            self.finish(id, true);
        }
        // ngx: the request goes on; what is sent to the client is dropped.
    }

    // ---- after a callback ----------------------------------------------------------

    /// Applies what a request callback left behind; `None` when the request cannot go
    /// on (trap, local response).
    fn after_callback(
        &mut self,
        id: u64,
        callback: &str,
        result: crate::contexts::CallResult<Action>,
    ) -> Option<Action> {
        self.after_call();
        let action = match result {
            Ok(a) => a,
            Err(trap) => {
                self.trap(Some(id), callback, trap);
                return None;
            }
        };
        if self.with_stream(id, |s| std::mem::take(&mut s.reset)) == Some(true) {
            if let Some(r) = self.reqs.get_mut(&id) {
                let _ = r.down.send(Down::Abort);
            }
            self.finish(id, true);
            return None;
        }
        let local = self.with_stream(id, |s| s.local_response.take()).flatten();
        if let Some(local) = local {
            self.local_response(id, local);
            return None;
        }
        Some(action)
    }

    /// Everything a callback may leave for the worker besides the stream's own state:
    /// dispatched calls and the tick period.
    fn after_call(&mut self) {
        let Some(vm) = self.vm.as_mut() else { return };
        let generation = vm.generation;
        let world = vm.world();
        let calls = std::mem::take(&mut world.dispatches);
        let tick = world.tick_changed.then_some(world.tick_period_ms);
        world.tick_changed = false;
        for call in calls {
            if let Some(id) = self.by_ctx.get(&call.owner) {
                self.call_owners.insert((generation, call.token), *id);
            }
            let poster = self.poster.clone();
            let mode = self.mode;
            let guard = crate::host::PendingGuard::new(&poster.pending);
            self.runtime.spawn(async move {
                let _guard = guard;
                let token = call.token;
                let outcome = crate::dispatch::perform(mode, call).await;
                poster.post(Event::CallDone {
                    generation,
                    token,
                    outcome,
                });
            });
        }
        if let Some(period) = tick {
            let period = period.filter(|p| *p > 0).map(|p| p as u64 * 1_000_000);
            self.tick_period = period;
            self.next_tick = period.map(|p| self.now_ns + p);
        }
    }

    /// A local response the filter asked for.
    fn local_response(&mut self, id: u64, local: LocalResponse) {
        let mode = self.mode;
        let Some(r) = self.reqs.get(&id) else { return };
        let in_response = r.resp_stage != RespStage::Waiting;
        let mut body = local.body.clone();
        if mode.local_response_appends_lf() && !body.is_empty() {
            body.push(b'\n');
        }
        let status = local.status as u16;
        if in_response {
            // In a response phase: replace the response that was on its way.
            let r = self.reqs.get_mut(&id).unwrap();
            if r.head_sent {
                let _ = r.down.send(Down::Abort);
                self.finish(id, true);
                return;
            }
            r.local = true;
            if let Some(task) = r.upstream_task.take() {
                task.abort();
            }
            let mut headers: Pairs = if mode.local_response_in_response_headers_keeps_headers() {
                local.headers.clone()
            } else {
                // ngx: status and body only, the filter's headers are ignored.
                self.stream(id)
                    .map(|s| {
                        s.response_headers
                            .iter()
                            .filter(|(k, _)| !k.starts_with(':'))
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default()
            };
            abi::remove(&mut headers, "content-length");
            abi::remove(&mut headers, "transfer-encoding");
            headers.push(("content-length".into(), body.len().to_string().into_bytes()));
            let empty = mode.local_response_empty_reason();
            self.send_head(id, status, empty, headers);
            self.send_body(id, body);
            if let Some(r) = self.reqs.get_mut(&id) {
                r.resp_stage = RespStage::Done;
            }
            self.finish(id, false);
            return;
        }
        // In a request phase: the upstream is never asked; the local response goes
        // through the response phases (ngx header filter / Envoy encoder chain).
        let mut headers: Pairs = Vec::new();
        for (k, v) in local.headers {
            let k = k.to_ascii_lowercase();
            if mode.local_response_last_header_wins() {
                abi::remove(&mut headers, &k);
            }
            headers.push((k, v));
        }
        abi::remove(&mut headers, "content-length");
        if body.is_empty() && mode.local_response_empty_body_strips_entity_headers() {
            // Envoy: prepareLocalReply removes both from a body-less reply.
            abi::remove(&mut headers, "content-type");
        } else {
            headers.push(("content-length".into(), body.len().to_string().into_bytes()));
        }
        if !body.is_empty() && abi::get(&headers, "content-type").is_none() {
            let default = mode.local_response_default_content_type();
            headers.push(("content-type".into(), default.as_bytes().to_vec()));
        }
        self.synthetic_response(id, status, headers, body);
    }

    /// A trap: log it and apply the mode's rule.
    fn trap(&mut self, id: Option<u64>, callback: &str, message: String) {
        let ctx = id
            .and_then(|i| self.reqs.get(&i))
            .map(|r| r.ctx)
            .unwrap_or(ROOT_ID);
        self.host_log(
            Level::Error,
            ctx,
            format!("[wasm] trap in {callback} (context {ctx}): {message}"),
        );
        // Either way the instance's ticks stop.
        self.next_tick = None;
        self.tick_period = None;
        match self.mode.trap_rule() {
            TrapRule::ResetInstance => {
                self.host_log(
                    Level::Warn,
                    ctx,
                    "proxy_wasm: instance trapped, it will be recycled",
                );
            }
            TrapRule::FailVm => {
                self.failed = true;
                self.host_log(
                    Level::Critical,
                    ctx,
                    "wasm VM failed: every stream now fails (wasm_fail_stream)",
                );
            }
        }
        if let Some(id) = id {
            let status = self.mode.trap_status();
            self.error_response(id, status, "");
        }
        // The other requests of this instance fail at their next step.
    }

    // ---- calls ---------------------------------------------------------------------

    fn call_done(&mut self, generation: u64, token: u32, outcome: crate::dispatch::Outcome) {
        let owner_request = self.call_owners.remove(&(generation, token));
        let Some(vm) = self.vm.as_mut() else { return };
        if vm.generation != generation || vm.trapped {
            // The instance that dispatched it is gone: its request fails now.
            if let Some(id) = owner_request
                && self.reqs.contains_key(&id)
            {
                self.fail_dead(id);
            }
            return;
        }
        let Some(owner) = vm.world().calls.remove(&token) else {
            // Cancelled (its request ended).
            return;
        };
        let delivered = crate::dispatch::deliver(self.mode, outcome);
        let n_headers = if delivered.dispatch_status.is_some() {
            0
        } else {
            delivered.headers.len() as u32
        };
        let body_len = delivered.body.len() as u32;
        let world = vm.world();
        world.call = Some(CallResponse {
            headers: delivered.headers,
            body: delivered.body,
            trailers: Vec::new(),
            dispatch_status: delivered.dispatch_status,
        });
        world.status = delivered.status;
        let request = self.by_ctx.get(&owner).copied();
        if let Some(id) = request
            && !self.alive(id)
        {
            self.fail_dead(id);
            return;
        }
        let vm = self.vm.as_mut().unwrap();
        let result = vm.call_response(owner, token, n_headers, body_len, 0);
        let world = vm.world();
        world.call = None;
        world.status = (0, String::new());
        match request {
            Some(id) => {
                if self
                    .after_callback(
                        id,
                        "on_http_call_response",
                        result.map(|_| Action::Continue),
                    )
                    .is_some()
                {
                    self.drive(id);
                }
            }
            None => {
                self.after_call();
                if let Err(trap) = result {
                    self.trap(None, "on_http_call_response", trap);
                }
            }
        }
    }

    // ---- the clock -----------------------------------------------------------------

    fn advance(&mut self, by: Duration) {
        let target = self.now_ns + by.as_nanos() as u64;
        while let Some(due) = self.next_tick.filter(|due| *due <= target) {
            self.set_now(due);
            self.next_tick = self.tick_period.map(|p| due + p);
            let alive = self.vm.as_ref().is_some_and(|vm| !vm.trapped);
            if !alive {
                break;
            }
            let result = self.vm.as_mut().unwrap().tick();
            self.after_call();
            if let Err(trap) = result {
                self.trap(None, "on_tick", trap);
            }
        }
        self.set_now(target);
    }

    fn set_now(&mut self, now: u64) {
        self.now_ns = now;
        if let Some(vm) = self.vm.as_mut() {
            vm.world().now_ns = now;
        }
    }
}

/// The next body chunk a filter gets from `pending`: `chunk_size` bytes (fewer only once the
/// sender is `done`), or everything pending when no size is set; `None` until there is one.
/// Counted in `delivered`.
fn next_chunk(
    pending: &mut Vec<u8>,
    delivered: &mut u64,
    done: bool,
    chunk_size: Option<usize>,
) -> Option<Vec<u8>> {
    let ready = match chunk_size {
        Some(n) => pending.len() >= n || (done && !pending.is_empty()),
        None => !pending.is_empty(),
    };
    if !ready {
        return None;
    }
    let n = chunk_size.unwrap_or(usize::MAX).min(pending.len());
    let chunk: Vec<u8> = pending.drain(..n).collect();
    *delivered += chunk.len() as u64;
    Some(chunk)
}

/// One engine per process (fuel on): compiled modules are shared between hosts.
fn engine() -> Result<Engine> {
    static ENGINE: std::sync::OnceLock<Engine> = std::sync::OnceLock::new();
    if let Some(e) = ENGINE.get() {
        return Ok(e.clone());
    }
    let mut config = Config::new();
    config.consume_fuel(true);
    let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("{e:#}"))?;
    Ok(ENGINE.get_or_init(|| engine).clone())
}

/// Compiles a module once per process (Cranelift is slow in a debug build of the tests).
fn compiled(engine: &Engine, bytes: &[u8]) -> Result<Module> {
    static CACHE: std::sync::OnceLock<Mutex<HashMap<Vec<u8>, Module>>> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = bytes.to_vec();
    if let Some(m) = cache.lock().unwrap().get(&key) {
        return Ok(m.clone());
    }
    let module = crate::contexts::compile(engine, bytes)?;
    cache.lock().unwrap().insert(key, module.clone());
    Ok(module)
}

/// The upstream exchange: sends the request, posts the response as events.
#[allow(clippy::too_many_arguments)]
async fn forward(
    id: u64,
    addr: SocketAddr,
    method: String,
    path: String,
    headers: Pairs,
    mut body: mpsc::UnboundedReceiver<Bytes>,
    streamed: bool,
    poster: &Poster,
) {
    let failed = |refused| Event::UpstreamFailed { id, refused };
    let stream = match tokio::net::TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(_) => return poster.post(failed(true)),
    };
    let io = hyper_util::rt::TokioIo::new(stream);
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(io).await else {
        return poster.post(failed(false));
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut builder = hyper::Request::builder()
        .method(method.as_str())
        .uri(path.as_str());
    for (k, v) in &headers {
        builder = builder.header(k.as_str(), v.as_slice());
    }
    let request_body: http_body_util::combinators::BoxBody<Bytes, std::io::Error> = if streamed {
        // Streamed as the filter releases it (hyper would send no body for a GET of
        // unknown length without the explicit encoding).
        builder = builder.header("transfer-encoding", "chunked");
        let stream = futures_lite_stream(body);
        http_body_util::StreamBody::new(stream).boxed()
    } else {
        let mut all = Vec::new();
        while let Some(b) = body.recv().await {
            all.extend_from_slice(&b);
        }
        builder = builder.header("content-length", all.len().to_string());
        http_body_util::Full::new(Bytes::from(all))
            .map_err(|never| match never {})
            .boxed()
    };
    let Ok(request) = builder.body(request_body) else {
        return poster.post(failed(false));
    };
    let response = match sender.send_request(request).await {
        Ok(r) => r,
        Err(_) => return poster.post(failed(false)),
    };
    let status = response.status().as_u16();
    let mut pairs: Pairs = Vec::new();
    for (k, v) in response.headers() {
        pairs.push((k.as_str().to_string(), v.as_bytes().to_vec()));
    }
    poster.post(Event::UpstreamHead {
        id,
        status,
        headers: pairs,
    });
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data()
                    && !data.is_empty()
                {
                    poster.post(Event::UpstreamBody { id, data });
                }
            }
            Err(_) => return poster.post(failed(false)),
        }
    }
    poster.post(Event::UpstreamEnd { id });
}

/// A receiver of chunks as a stream of body frames.
fn futures_lite_stream(
    rx: mpsc::UnboundedReceiver<Bytes>,
) -> impl futures_core::Stream<Item = Result<hyper::body::Frame<Bytes>, std::io::Error>> {
    struct S(mpsc::UnboundedReceiver<Bytes>);
    impl futures_core::Stream for S {
        type Item = Result<hyper::body::Frame<Bytes>, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            self.0
                .poll_recv(cx)
                .map(|o| o.map(|b| Ok(hyper::body::Frame::data(b))))
        }
    }
    S(rx)
}
