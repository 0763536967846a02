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
//!
//! | file | what |
//! | --- | --- |
//! | `mod.rs` | the loop: the worker, its events, driving a request, traps, the end of a request, the clock |
//! | `request.rs` | the client side: a request from its client through the request callbacks to the upstream |
//! | `response.rs` | the upstream side: the upstream exchange, and a response (the upstream's, the host's own, the filter's local reply) through the response callbacks to the client |
//! | `calls.rs` | dispatch: the calls a callback made, their answers, and the rules of ngx_wasm_module's call bugs |

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use tokio::sync::mpsc;
use wasmtime::{Config, Engine, Linker, Module};

use crate::connections::Slots;
use crate::contexts::{Action, ROOT_ID, StreamData, Vm, World};
use crate::host::{Down, Event, HostOptions, Poster};
use crate::observed::{Level, Observed, Source, ViolationKind};
use crate::rules::{EndOrder, Mode, TrapRule};

mod calls;
mod request;
mod response;

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
    /// The upstream's head said that no body follows (a 204 or 304, `Content-Length: 0`, an
    /// answer to HEAD): the message ended with it.
    upstream_ended_with_head: bool,
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
    /// Counted by [`crate::profile`]: the profile was on when the worker was made.
    profiled: bool,
    engine: Engine,
    linker: Linker<World>,
    module: Module,
    vm: Option<Vm>,
    generation: u64,
    /// envoy: the VM failed (trap); FAIL_CLOSED/FAIL_OPEN: for good; FAIL_RELOAD: until
    /// `reload_at`.
    failed: bool,
    /// envoy FAIL_RELOAD: when (virtual ns) the failed VM may be replaced.
    reload_at: Option<u64>,
    observed: Arc<Mutex<Observed>>,
    poster: Poster,
    runtime: tokio::runtime::Handle,
    reqs: HashMap<u64, Req>,
    by_ctx: HashMap<u32, u64>,
    next_ctx: u32,
    now_ns: u64,
    next_tick: Option<u64>,
    tick_period: Option<u64>,
    /// Every call in flight, by (instance generation, token).
    calls: HashMap<(u64, u32), calls::InFlight>,
    /// ngx: the worker's connection slots (shared with the accept loop).
    slots: Arc<Slots>,
    /// ngx bug 2: the worker spins; it serves nothing any more.
    hung: bool,
    /// The clients of a hung worker: kept, so that they wait (for ever, as on the real one).
    hung_clients: Vec<mpsc::UnboundedSender<Down>>,
}

impl Worker {
    pub fn new(
        opts: Arc<HostOptions>,
        bytes: &[u8],
        observed: Arc<Mutex<Observed>>,
        poster: Poster,
        runtime: tokio::runtime::Handle,
        slots: Arc<Slots>,
    ) -> Result<Worker> {
        // Decided once per worker: its instances after a reset are profiled like the first.
        let profiled = crate::profile::enabled();
        let engine = engine(profiled)?;
        let mut linker = Linker::new(&engine);
        crate::hostcalls::link(&mut linker)?;
        let module = compiled(&engine, profiled, bytes)?;
        let mut worker = Worker {
            profiled,
            mode: opts.mode,
            now_ns: opts.start_time_ns,
            opts,
            engine,
            linker,
            module,
            vm: None,
            generation: 0,
            failed: false,
            reload_at: None,
            observed,
            poster,
            runtime,
            reqs: HashMap::new(),
            by_ctx: HashMap::new(),
            next_ctx: ROOT_ID + 1,
            next_tick: None,
            tick_period: None,
            calls: HashMap::new(),
            slots,
            hung: false,
            hung_clients: Vec::new(),
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
        let world = World::new(
            self.opts.clone(),
            self.observed.clone(),
            self.slots.clone(),
            self.now_ns,
        );
        let mut vm = Vm::instantiate(
            &self.engine,
            &self.linker,
            &self.module,
            world,
            self.generation,
            self.profiled,
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
            if self.hung {
                self.spin(event);
            } else {
                self.handle(event);
                // What the event's callbacks did that kills the worker takes effect now.
                let fatal = self.vm.as_mut().and_then(|vm| vm.world().fatal.take());
                if let Some((kind, detail)) = fatal {
                    match kind {
                        ViolationKind::DispatchAfterEmptyAnswer => self.hang(kind, detail),
                        _ => self.crash(kind, detail),
                    }
                }
            }
            self.poster.pending.dec();
            if stop {
                break;
            }
        }
    }

    /// ngx: the worker process died (SIGSEGV). Every request in flight on it fails as its
    /// client sees a dead worker's (the connection closes, no response or a cut one), the
    /// instance and its memory are gone, and the master's new worker starts at once: a new
    /// instance (vm start, configure, ticks) and all its connection slots.
    fn crash(&mut self, kind: ViolationKind, detail: String) {
        self.host_log(
            Level::Critical,
            0,
            "worker process exited on signal 11 (core dumped); a new worker starts",
        );
        for (_, r) in self.reqs.drain() {
            if let Some(task) = r.upstream_task {
                task.abort();
            }
            let _ = r.down.send(Down::Abort);
            self.poster.pending.dec();
        }
        self.by_ctx.clear();
        self.calls.clear();
        self.slots.reset();
        self.vm = None;
        self.next_tick = None;
        self.tick_period = None;
        if let Err(e) = self.new_instance() {
            self.host_log(
                Level::Error,
                0,
                format!("the new worker failed to start: {e:#}"),
            );
        }
        // Last, so that whoever sees the violation sees the new worker too.
        self.observed.lock().unwrap().violation(kind, detail);
    }

    /// ngx: the worker spins for ever in `ngx_wasm_socket_tcp_send` ("send() returned
    /// zero"). Nothing it holds progresses and nothing is respawned: its requests, and every
    /// later one, wait until their clients give up.
    fn hang(&mut self, kind: ViolationKind, detail: String) {
        self.host_log(
            Level::Critical,
            0,
            "send() returned zero (the worker spins; every request on it hangs)",
        );
        self.hung = true;
        for (_, r) in self.reqs.drain() {
            if let Some(task) = r.upstream_task {
                task.abort();
            }
            self.hung_clients.push(r.down);
            self.poster.pending.dec();
        }
        self.by_ctx.clear();
        self.calls.clear();
        self.next_tick = None;
        self.observed.lock().unwrap().violation(kind, detail);
    }

    /// An event reaching a hung worker: nothing happens; a new client waits like the others.
    fn spin(&mut self, event: Event) {
        match event {
            Event::ClientRequest { down, .. } => self.hung_clients.push(down),
            Event::Advance { done, .. } | Event::Trap { done } => drop(done.send(())),
            Event::Memory { done } => drop(done.send(None)),
            Event::Reconfigure { done, .. } => {
                drop(done.send(Err(anyhow::anyhow!("the worker hangs"))))
            }
            _ => {}
        }
    }

    /// envoy: the plugin gets a new configuration on the same VM (see
    /// [`crate::Host::reconfigure`]).
    fn reconfigure(&mut self, config: Vec<u8>) -> Result<()> {
        if self.mode != Mode::Envoy {
            anyhow::bail!("only the envoy mode reconfigures a plugin in place");
        }
        let new_root = self.next_ctx;
        self.next_ctx += 1;
        let vm = self.vm.as_mut().ok_or_else(|| anyhow::anyhow!("no VM"))?;
        let replaced = vm.replace_root(new_root, config);
        self.after_call();
        replaced
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
                end,
            } => self.upstream_head(id, status, headers, end),
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
            Event::Trap { done } => {
                if self.vm.as_ref().is_some_and(|vm| !vm.trapped) {
                    if let Some(vm) = self.vm.as_mut() {
                        vm.trapped = true;
                    }
                    self.trap(
                        None,
                        "proxy_on_tick",
                        "unreachable (injected by the test)".into(),
                    );
                }
                let _ = done.send(());
            }
            Event::Reconfigure { config, done } => {
                let _ = done.send(self.reconfigure(config));
            }
            Event::Memory { done } => {
                let _ = done.send(self.vm.as_ref().and_then(|vm| vm.memory_bytes()));
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

    /// A trap: log it and apply the mode's rule.
    fn trap(&mut self, id: Option<u64>, callback: &str, message: String) {
        let ctx = id
            .and_then(|i| self.reqs.get(&i))
            .map(|r| r.ctx)
            .unwrap_or_else(|| self.vm.as_mut().map_or(ROOT_ID, |vm| vm.world().root_id));
        self.host_log(
            Level::Error,
            ctx,
            format!("[wasm] trap in {callback} (context {ctx}): {message}"),
        );
        // Either way the instance's ticks stop.
        self.next_tick = None;
        self.tick_period = None;
        match self.mode.trap_rule(self.opts.failure_policy()) {
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
            TrapRule::ReloadVm => {
                self.failed = true;
                self.reload_at = Some(self.now_ns + crate::rules::ENVOY_RELOAD_BACKOFF_NS);
                self.host_log(
                    Level::Critical,
                    ctx,
                    "wasm VM failed: it will be reloaded (failure_policy FAIL_RELOAD)",
                );
            }
        }
        if let Some(id) = id {
            let status = self.mode.trap_status();
            self.error_response(id, status, "");
        }
        // The other requests of this instance fail at their next step.
    }

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
            self.observed.lock().unwrap().calls_outliving_requests += outstanding.len() as u64;
            let vm = self.vm.as_mut().unwrap();
            if self.mode.dispatch_outliving_request_is_fatal() {
                // The worker crashes once this event is handled (see `run`).
                vm.world().fatal.get_or_insert((
                    ViolationKind::DispatchOutlivedRequest,
                    format!(
                        "context {ctx}: dispatch {outstanding:?} still in flight when the request ended (nginx worker crashes with signal 11)"
                    ),
                ));
            }
            // Both: the call's answer is dropped (envoy cancels it).
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

/// One engine per process (fuel on), and one more for profiled hosts (epoch checks, which
/// every store of that engine must answer): compiled modules are shared between hosts.
fn engine(profiled: bool) -> Result<Engine> {
    static ENGINES: [std::sync::OnceLock<Engine>; 2] =
        [std::sync::OnceLock::new(), std::sync::OnceLock::new()];
    let cell = &ENGINES[usize::from(profiled)];
    if let Some(e) = cell.get() {
        return Ok(e.clone());
    }
    let mut config = Config::new();
    config.consume_fuel(true);
    // A profiling aid: wasmtime writes /tmp/perf-<pid>.map, in which `perf report` finds the
    // names of the module's functions (a module built with CARGO_PROFILE_WASM_STRIP=false).
    if std::env::var_os("IDEMPOTENCY_HOST_PERFMAP").is_some() {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    // Another: the fuel of the guest's functions counted per stack (`crate::profile`).
    if profiled {
        config.epoch_interruption(true);
    }
    let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("{e:#}"))?;
    Ok(cell.get_or_init(|| engine).clone())
}

/// Compiles a module once per process and engine (Cranelift is slow in a debug build of the
/// tests).
fn compiled(engine: &Engine, profiled: bool, bytes: &[u8]) -> Result<Module> {
    type Cache = Mutex<HashMap<(bool, Vec<u8>), Module>>;
    static CACHE: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (profiled, bytes.to_vec());
    if let Some(m) = cache.lock().unwrap().get(&key) {
        return Ok(m.clone());
    }
    let module = crate::contexts::compile(engine, bytes)?;
    cache.lock().unwrap().insert(key, module.clone());
    Ok(module)
}
