//! Contexts and lifecycle: the Wasm instance of one worker, the state its host calls
//! see ([`World`]), and the calls into the module's `proxy_on_*` exports, each measured
//! in fuel and with its trap caught.
//!
//! Lifecycle, as both hosts run it (proxy-wasm-cpp-host `WasmBase::start`,
//! ngx_proxy_wasm `ngx_proxy_wasm_start`): instantiate, `_initialize`, then for the root
//! context `proxy_on_context_create(root, 0)`, `proxy_on_vm_start(root, vm_config_len)`,
//! `proxy_on_configure(root, plugin_config_len)` (false fails the load), then ticks if
//! the root asked for them. Per request: `proxy_on_context_create(ctx, root)`, the
//! request/response callbacks, `on_log`/`on_done` (order per [`Mode::end_order`]),
//! `proxy_on_delete`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use wasmtime::{Engine, Instance, Linker, Module, Store, TypedFunc};

use crate::abi::Pairs;
use crate::connections::Slots;
use crate::host::HostOptions;
use crate::observed::{Level, Observed, Source, ViolationKind};
use crate::rules::{Mode, Phase};

/// The id of the first root context (one filter, one root context per instance; an Envoy
/// reconfiguration replaces it with a new one, [`World::root_id`]).
pub const ROOT_ID: u32 = 1;

/// A local response a filter asked for (`proxy_send_local_response`), applied by the
/// worker after the callback returns (Envoy defers it the same way, ngx stashes it).
#[derive(Clone, Debug, Default)]
pub struct LocalResponse {
    pub status: u32,
    pub details: String,
    pub body: Vec<u8>,
    pub headers: Pairs,
}

/// What the filter sees of one request (one HTTP context).
#[derive(Debug, Default)]
pub struct StreamData {
    pub method: String,
    /// Path with query, as received.
    pub path: String,
    pub peer: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    pub connection_id: u64,
    pub request_headers: Pairs,
    /// The body buffer the current callback sees (a chunk, or what is buffered).
    pub request_body: Vec<u8>,
    /// ngx: the body was larger than client_body_buffer_size and went to a temp file.
    pub request_body_spooled: bool,
    pub request_trailers: Pairs,
    pub response_headers: Pairs,
    pub response_body: Vec<u8>,
    pub response_trailers: Pairs,
    pub local_response: Option<LocalResponse>,
    /// Set by `proxy_continue_stream(HttpRequest)`.
    pub resume_request: bool,
    /// Set by `proxy_continue_stream(HttpResponse)`.
    pub resume_response: bool,
    /// Set by `proxy_close_stream` (Envoy: reset the stream).
    pub reset: bool,
    /// The request went upstream: its headers can no longer change it.
    pub request_sent: bool,
    /// The response entered the response phases.
    pub response_started: bool,
    /// The response headers went to the client.
    pub response_headers_sent: bool,
    pub upstream_addr: Option<SocketAddr>,
    /// `proxy_set_property` values (Envoy filter state, ngx variables).
    pub properties: HashMap<String, Vec<u8>>,
    /// Bytes of request body the client sent (for `request.size`).
    pub request_size: u64,
    /// Envoy `response.code_details`: `via_upstream` for the upstream's response, the reason
    /// of a reply Envoy or a filter made.
    pub code_details: Option<String>,
    /// ngx `$upstream_status`: the upstream's status, 502 when it could not be reached, none
    /// for a response nginx or a filter made.
    pub upstream_status: Option<u16>,
}

/// The response of a dispatched call, visible during `on_http_call_response`.
#[derive(Clone, Debug, Default)]
pub struct CallResponse {
    pub headers: Pairs,
    pub body: Vec<u8>,
    pub trailers: Pairs,
    /// ngx: `:dispatch_status` of a failed call (`timeout`, `broken connection`, …).
    pub dispatch_status: Option<String>,
    /// The answered call was dispatched with a request body (ngx bug 2 needs one).
    pub request_had_body: bool,
}

/// A call the filter dispatched, for the worker to send once the callback returns.
#[derive(Debug)]
pub struct DispatchRequest {
    pub token: u32,
    /// The context that dispatched it ([`World::root_id`] for the root context).
    pub owner: u32,
    /// Where to connect; `Err(status)` when the call fails before connecting (ngx
    /// `resolver failure`).
    pub target: std::result::Result<SocketAddr, String>,
    pub method: String,
    pub path: String,
    pub authority: Option<String>,
    pub headers: Pairs,
    pub body: Vec<u8>,
    pub trailers: Pairs,
    /// None: no time-out (Envoy, timeout 0).
    pub timeout: Option<Duration>,
    /// ngx: the fake connection of a root context's call (see [`crate::connections`]).
    pub fake_connection: Option<crate::connections::Slot>,
}

/// The state host calls read and write: the store data of the instance.
pub struct World {
    pub mode: Mode,
    pub opts: Arc<HostOptions>,
    pub observed: Arc<Mutex<Observed>>,
    /// Virtual wall clock, nanoseconds since the Unix epoch.
    pub now_ns: u64,
    /// The context executing now (the effective context).
    pub current: u32,
    pub phase: Phase,
    pub streams: HashMap<u32, StreamData>,
    pub call: Option<CallResponse>,
    /// Outstanding calls: token → owner context.
    pub calls: HashMap<u32, u32>,
    pub next_token: u32,
    pub dispatches: Vec<DispatchRequest>,
    pub tick_period_ms: Option<u32>,
    pub tick_changed: bool,
    /// What `proxy_get_status` answers during `on_http_call_response` (code, message).
    pub status: (u32, String),
    pub queues: HashMap<String, u32>,
    pub queue_data: HashMap<u32, std::collections::VecDeque<Vec<u8>>>,
    pub rng: u64,
    /// ngx: the worker's connection slots (`worker_connections`).
    pub slots: Arc<Slots>,
    /// What a call of this callback did that kills the worker (ngx bugs 1 and 2), applied
    /// by the worker once the callback returns: the violation and its detail.
    pub fatal: Option<(ViolationKind, String)>,
    /// ngx: root dispatches of this callback that failed synchronously (each leaks a slot).
    pub sync_failures: u32,
    /// The root context now (Envoy: a reconfiguration creates a new one).
    pub root_id: u32,
    /// What `on_configure` of the current root context reads.
    pub plugin_config: Vec<u8>,
}

impl World {
    pub fn new(
        opts: Arc<HostOptions>,
        observed: Arc<Mutex<Observed>>,
        slots: Arc<Slots>,
        now_ns: u64,
    ) -> World {
        let plugin_config = opts.config.clone();
        World {
            mode: opts.mode,
            next_token: opts.mode.first_call_token(),
            opts,
            observed,
            now_ns,
            current: ROOT_ID,
            phase: Phase::Other,
            streams: HashMap::new(),
            call: None,
            calls: HashMap::new(),
            dispatches: Vec::new(),
            tick_period_ms: None,
            tick_changed: false,
            status: (0, String::new()),
            queues: HashMap::new(),
            queue_data: HashMap::new(),
            rng: 0x9E37_79B9_7F4A_7C15 ^ now_ns,
            slots,
            fatal: None,
            sync_failures: 0,
            root_id: ROOT_ID,
            plugin_config,
        }
    }

    /// Logs a line as the host (what nginx/Envoy would write to their log).
    pub fn host_log(&self, level: Level, message: impl Into<String>) {
        self.observed
            .lock()
            .unwrap()
            .log(level, Source::Host, self.current, message.into());
    }

    /// The HTTP context executing now, if the current context is one.
    pub fn stream(&mut self) -> Option<&mut StreamData> {
        let id = self.current;
        self.streams.get_mut(&id)
    }
}

/// `proxy_on_http_call_response(context, token, headers, body, trailers)`.
type CallResponseFunc = TypedFunc<(u32, u32, u32, u32, u32), ()>;

/// Typed handles on the module's exports (missing ones are `None`: the SDK exports them
/// all, a hand-written module may not).
struct Exports {
    context_create: Option<TypedFunc<(u32, u32), ()>>,
    vm_start: Option<TypedFunc<(u32, u32), u32>>,
    configure: Option<TypedFunc<(u32, u32), u32>>,
    tick: Option<TypedFunc<u32, ()>>,
    request_headers: Option<TypedFunc<(u32, u32, u32), u32>>,
    request_body: Option<TypedFunc<(u32, u32, u32), u32>>,
    response_headers: Option<TypedFunc<(u32, u32, u32), u32>>,
    response_body: Option<TypedFunc<(u32, u32, u32), u32>>,
    call_response: Option<CallResponseFunc>,
    log: Option<TypedFunc<u32, ()>>,
    done: Option<TypedFunc<u32, u32>>,
    delete: Option<TypedFunc<u32, ()>>,
    memory: Option<wasmtime::Memory>,
}

/// A filter action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

/// The result of one callback: its value, or the trap message.
pub type CallResult<T> = std::result::Result<T, String>;

/// One instance of the module and its store.
pub struct Vm {
    pub store: Store<World>,
    exports: Exports,
    /// The instance trapped (ngx: it is discarded; Envoy: the VM is failed).
    pub trapped: bool,
    /// Which instance this is (1, 2, … after resets).
    pub generation: u64,
    /// Its calls are counted by [`crate::profile`] (an engine with epoch checks).
    profiled: bool,
}

/// Compiles a module and checks its imports against what the host provides.
pub fn compile(engine: &Engine, bytes: &[u8]) -> Result<Module> {
    let module =
        Module::new(engine, bytes).map_err(|e| anyhow!("compiling the Wasm module: {e:#}"))?;
    let mut missing = Vec::new();
    for import in module.imports() {
        let provided = crate::hostcalls::NAMES.contains(&import.name()) && import.module() == "env"
            || crate::wasi::NAMES.contains(&import.name())
                && import.module() == "wasi_snapshot_preview1";
        if !provided {
            missing.push(format!("{}::{}", import.module(), import.name()));
        }
    }
    if !missing.is_empty() {
        bail!(
            "the module imports {} that this host does not provide: {}",
            if missing.len() == 1 {
                "a function"
            } else {
                "functions"
            },
            missing.join(", ")
        );
    }
    if module.get_export("proxy_abi_version_0_2_1").is_none() {
        bail!("not a proxy-wasm ABI 0.2.1 module: no proxy_abi_version_0_2_1 export");
    }
    Ok(module)
}

impl Vm {
    /// Instantiates the module and runs `_initialize` (not the root context yet). `profiled`:
    /// the engine checks epochs, and the instance's calls are counted by [`crate::profile`].
    pub fn instantiate(
        engine: &Engine,
        linker: &Linker<World>,
        module: &Module,
        world: World,
        generation: u64,
        profiled: bool,
    ) -> Result<Vm> {
        let mut store = Store::new(engine, world);
        store.set_fuel(u64::MAX).map_err(|e| anyhow!("{e:#}"))?;
        if profiled {
            crate::profile::attach(&mut store);
        }
        let instance: Instance = linker
            .instantiate(&mut store, module)
            .map_err(|e| anyhow!("instantiating the module: {e:#}"))?;
        macro_rules! export {
            ($name:literal) => {
                instance.get_typed_func(&mut store, $name).ok()
            };
        }
        let exports = Exports {
            context_create: export!("proxy_on_context_create"),
            vm_start: export!("proxy_on_vm_start"),
            configure: export!("proxy_on_configure"),
            tick: export!("proxy_on_tick"),
            request_headers: export!("proxy_on_request_headers"),
            request_body: export!("proxy_on_request_body"),
            response_headers: export!("proxy_on_response_headers"),
            response_body: export!("proxy_on_response_body"),
            call_response: export!("proxy_on_http_call_response"),
            log: export!("proxy_on_log"),
            done: export!("proxy_on_done"),
            delete: export!("proxy_on_delete"),
            memory: instance.get_memory(&mut store, "memory"),
        };
        let mut vm = Vm {
            store,
            exports,
            trapped: false,
            generation,
            profiled,
        };
        if let Ok(init) = instance.get_typed_func::<(), ()>(&mut vm.store, "_initialize") {
            vm.run(None, Phase::VmStart, |s| init.call(s, ()))
                .map_err(|e| anyhow!("_initialize trapped: {e}"))?;
        }
        vm.store.data().observed.lock().unwrap().instances += 1;
        Ok(vm)
    }

    /// The size of the instance's linear memory, in bytes (it only grows: the high-water
    /// mark of what the module's allocator needed).
    pub fn memory_bytes(&self) -> Option<usize> {
        self.exports.memory.map(|m| m.data_size(&self.store))
    }

    /// Runs one call into the module as context `ctx` (None: the root) in `phase`,
    /// adding its fuel to that context and turning a trap into its message.
    fn run<R>(
        &mut self,
        ctx: Option<u32>,
        phase: Phase,
        call: impl FnOnce(&mut Store<World>) -> wasmtime::Result<R>,
    ) -> CallResult<R> {
        {
            let world = self.store.data_mut();
            world.current = ctx.unwrap_or(world.root_id);
            world.phase = phase;
        }
        let before = self.store.get_fuel().unwrap_or(0);
        if self.profiled {
            crate::profile::enter(phase.name(), before);
        }
        let result = call(&mut self.store);
        if self.profiled {
            crate::profile::leave(self.store.get_fuel().unwrap_or(0));
        }
        let used = before.saturating_sub(self.store.get_fuel().unwrap_or(0));
        let _ = self.store.set_fuel(u64::MAX);
        {
            let world = self.store.data_mut();
            world.phase = Phase::Other;
            world.observed.lock().unwrap().add_fuel(ctx, phase, used);
        }
        result.map_err(|e| {
            self.trapped = true;
            format!("{e:#}")
        })
    }

    /// `proxy_on_context_create` + `on_vm_start` + `on_configure` for the root context.
    /// Err: the load fails (a trap, or false from vm start or configure).
    pub fn start_root(&mut self) -> Result<()> {
        let vm_len = self.store.data().opts.vm_config.len() as u32;
        let root = self.store.data().root_id;
        if let Some(f) = self.exports.context_create.clone() {
            self.run(None, Phase::Other, |s| f.call(s, (root, 0)))
                .map_err(|e| anyhow!("proxy_on_context_create trapped: {e}"))?;
        }
        if let Some(f) = self.exports.vm_start.clone() {
            let ok = self
                .run(None, Phase::VmStart, |s| f.call(s, (root, vm_len)))
                .map_err(|e| anyhow!("on_vm_start trapped: {e}"))?;
            if ok == 0 {
                bail!("on_vm_start returned false");
            }
        }
        self.configure_root()
    }

    /// `proxy_on_configure` for the current root context, with its configuration.
    fn configure_root(&mut self) -> Result<()> {
        let root = self.store.data().root_id;
        let cfg_len = self.store.data().plugin_config.len() as u32;
        if let Some(f) = self.exports.configure.clone() {
            let ok = self
                .run(None, Phase::Configure, |s| f.call(s, (root, cfg_len)))
                .map_err(|e| anyhow!("on_configure trapped: {e}"))?;
            if ok == 0 {
                bail!("on_configure returned false");
            }
        }
        Ok(())
    }

    /// Envoy, a reconfiguration that keeps the VM: the old root context is done and deleted
    /// (the host cancels its calls: their answers never come), a new one with id `new_root`
    /// is created and configured with `config`; module memory stays.
    pub fn replace_root(&mut self, new_root: u32, config: Vec<u8>) -> Result<()> {
        let old = self.store.data().root_id;
        self.store.data_mut().calls.retain(|_, owner| *owner != old);
        if let Some(f) = self.exports.done.clone() {
            let _ = self.run(None, Phase::Done, |s| f.call(s, old));
        }
        if let Some(f) = self.exports.delete.clone() {
            let _ = self.run(None, Phase::Delete, |s| f.call(s, old));
        }
        {
            let world = self.store.data_mut();
            world.root_id = new_root;
            world.plugin_config = config;
        }
        if let Some(f) = self.exports.context_create.clone() {
            self.run(None, Phase::Other, |s| f.call(s, (new_root, 0)))
                .map_err(|e| anyhow!("proxy_on_context_create trapped: {e}"))?;
        }
        self.configure_root()
    }

    pub fn context_create(&mut self, ctx: u32) -> CallResult<()> {
        match self.exports.context_create.clone() {
            Some(f) => {
                let root = self.store.data().root_id;
                self.run(Some(ctx), Phase::Other, |s| f.call(s, (ctx, root)))
            }
            None => Ok(()),
        }
    }

    pub fn tick(&mut self) -> CallResult<()> {
        match self.exports.tick.clone() {
            Some(f) => {
                let root = self.store.data().root_id;
                self.run(None, Phase::Tick, |s| f.call(s, root))
            }
            None => Ok(()),
        }
    }

    fn action(
        &mut self,
        f: Option<TypedFunc<(u32, u32, u32), u32>>,
        ctx: u32,
        phase: Phase,
        size: u32,
        eos: bool,
    ) -> CallResult<Action> {
        match f {
            Some(f) => self
                .run(Some(ctx), phase, |s| f.call(s, (ctx, size, eos as u32)))
                .map(|a| {
                    if a == 1 {
                        Action::Pause
                    } else {
                        Action::Continue
                    }
                }),
            None => Ok(Action::Continue),
        }
    }

    pub fn request_headers(&mut self, ctx: u32, n: u32, eos: bool) -> CallResult<Action> {
        let f = self.exports.request_headers.clone();
        self.action(f, ctx, Phase::RequestHeaders, n, eos)
    }

    pub fn request_body(&mut self, ctx: u32, size: u32, eos: bool) -> CallResult<Action> {
        let f = self.exports.request_body.clone();
        self.action(f, ctx, Phase::RequestBody, size, eos)
    }

    pub fn response_headers(&mut self, ctx: u32, n: u32, eos: bool) -> CallResult<Action> {
        let f = self.exports.response_headers.clone();
        self.action(f, ctx, Phase::ResponseHeaders, n, eos)
    }

    pub fn response_body(&mut self, ctx: u32, size: u32, eos: bool) -> CallResult<Action> {
        let f = self.exports.response_body.clone();
        self.action(f, ctx, Phase::ResponseBody, size, eos)
    }

    /// `proxy_on_http_call_response`; `owner` is the context that dispatched the call.
    pub fn call_response(
        &mut self,
        owner: u32,
        token: u32,
        headers: u32,
        body: u32,
        trailers: u32,
    ) -> CallResult<()> {
        let ctx = (owner != self.store.data().root_id).then_some(owner);
        match self.exports.call_response.clone() {
            Some(f) => self.run(ctx, Phase::CallResponse, |s| {
                f.call(s, (owner, token, headers, body, trailers))
            }),
            None => Ok(()),
        }
    }

    pub fn log(&mut self, ctx: u32) -> CallResult<()> {
        match self.exports.log.clone() {
            Some(f) => self.run(Some(ctx), Phase::Log, |s| f.call(s, ctx)),
            None => Ok(()),
        }
    }

    pub fn done(&mut self, ctx: u32) -> CallResult<()> {
        match self.exports.done.clone() {
            Some(f) => self
                .run(Some(ctx), Phase::Done, |s| f.call(s, ctx))
                .map(|_| ()),
            None => Ok(()),
        }
    }

    pub fn delete(&mut self, ctx: u32) -> CallResult<()> {
        match self.exports.delete.clone() {
            Some(f) => self.run(Some(ctx), Phase::Delete, |s| f.call(s, ctx)),
            None => Ok(()),
        }
    }

    pub fn world(&mut self) -> &mut World {
        self.store.data_mut()
    }
}
