//! # A proxy-wasm host on wasmtime, with Kong's and Envoy's rules
//!
//! Kong and Envoy cannot run here, so filters are proven under this host: a library
//! that loads a `wasm32-wasip1` proxy-wasm module (ABI 0.2.1, Rust SDK 0.2.x), runs it
//! as one worker of the real host would, and sends real HTTP over loopback through it.
//! The proof is only worth the host's fidelity: every behaviour below says where it
//! comes from (HOSTS.md = `../shared/HOSTS.md`, observed in real runs; otherwise the
//! hosts' source, named).
//!
//! ## Map
//!
//! | module | concern |
//! | --- | --- |
//! | [`host`] | the public API: [`Host::builder`], options, the proxy listener, clock, [`Host::settle`], what tests read back |
//! | [`traffic`] | the worker thread and its event loop: client ↔ filter ↔ upstream, per request |
//! | [`contexts`] | the instance, its store data ([`contexts::World`]), the lifecycle calls, fuel, traps |
//! | [`hostcalls`] | the `env.proxy_*` imports, with each call's status codes |
//! | [`properties`] | `proxy_get_property`: names, encodings, per mode and context |
//! | [`dispatch`] | `dispatch_http_call` over loopback, and how each host reports failures |
//! | [`wasi`] | the WASI preview1 functions (stdout/stderr to the log, virtual clock) |
//! | [`abi`] | guest memory, allocation through the module, pairs serialization, status codes |
//! | [`rules`] | **the one place where ngx and envoy differ** ([`Mode`]) |
//! | [`secrets`] | the keys, tokens and bodies a test sent, looked for in the filter's and the backend's logs |
//! | [`connections`] | ngx: the worker's `worker_connections` slots, and the ones root calls leak |
//! | [`observed`] | logs, metrics, shared data, fuel, violations (survive an ngx reset) |
//! | [`profile`] | a profiling aid: the guest's fuel counted per function and per stack (`IDEMPOTENCY_HOST_PROFILE`) |
//! | [`flame`] | a flame graph (SVG) of those stacks |
//! | [`measure`] | what the fuel example and the performance suite share: a gateway calling a backend, the fuel per request against the no-op filter, the profile of first requests |
//! | [`exposition`] | the filter's metrics as each host exports them: Kong's Prometheus plugin (`pw_<filter>_<name>`), Envoy's `/stats` (`wasmcustom.<name>`) and `/stats/prometheus` |
//! | [`upstream`] | the counting upstream (the API behind the gateway), and a port that refuses connections |
//! | [`client`] | a small HTTP/1.1 client (status, reason, repeated headers, bytes) |
//! | [`build`] | builds a workspace package for wasm32-wasip1 (`--profile wasm`) |
//!
//! ## The event loop
//!
//! One [`Host`] = one worker: ONE Wasm instance owned by ONE thread, which processes
//! events one at a time (client request / body chunk / client gone, upstream head /
//! chunk / end / failure, dispatch answer, clock advance). All network I/O runs in
//! tokio tasks on the test's runtime and posts events to it. So many requests are in
//! flight at once and their callbacks interleave in one instance, sharing the module's
//! memory with each other and with the root context — a race in a filter can show.
//! Effects of a callback (dispatched calls, local responses, resume, tick period) are
//! applied after it returns, as Envoy's "after VM call actions" and ngx's stash do.
//!
//! Time is virtual: the clock starts at the wall time of `Host::builder` and moves only
//! with [`Host::advance`], which fires each due tick with the clock at its due time;
//! `proxy_get_current_time_nanoseconds` and WASI `clock_time_get` read it. Tests never
//! sleep to synchronise: [`Host::settle`] waits until no request, call, upstream
//! exchange or event is in flight. (Time-outs of calls and upstream delays are real
//! time: they are behaviours under test, not synchronisation.)
//!
//! ## Per-mode rules
//!
//! ngx stands for ngx_wasm_module as Kong 3.4–3.9 embeds it; envoy for Envoy 1.32 to 1.36
//! (`HostOptions::envoy_version`, 1.36 by default; 1.29–1.31 only for the properties: their
//! body handling, `get_http_request_body` missing the current chunk before
//! envoyproxy/envoy#36411, is not modelled), as Istio 1.24+ runs it.
//!
//! | rule | ngx (Kong) | envoy | source |
//! | --- | --- | --- | --- |
//! | `dispatch_http_call` | request headers, request body, call response, tick; elsewhere traps (`dispatch failed: bad step`) | every phase | HOSTS.md (observed); ngx_http_proxy_wasm_dispatch.c |
//! | dispatch upstream | `host:port` (no port → 80; a URL traps; names other than localhost/IPs: `resolver failure`) | a cluster name mapped by the test; unknown → BadArgument | HOSTS.md |
//! | dispatch headers | no `:method`/`:path` traps; `:authority` → Host; new connection, `Connection: close`, Content-Length | `:method`, `:path`, `:authority` required (BadArgument); a new connection per call here, where Envoy reuses pooled ones (not modelled: a pooled call can meet the backend's idle close, which the kits' `idle_timeout` avoids) | dispatch.c; HOSTS.md; Envoy's connection pooling docs |
//! | dispatch time-out | 0 → 60 s (socket default) | 0 → none | HOSTS.md |
//! | failed call | `on_http_call_response(0 headers)`, `:dispatch_status` = `timeout` / `broken connection` / `resolver failure` | refused → 503, time-out → 504 (router replies); reset after headers → 0 headers, `proxy_get_status` = (11, `reset`) | Kong/ngx_wasm_module#625; Envoy context.cc `onHttpCallFailure`, envoyproxy/envoy#27311 |
//! | call in flight when its request ends | fatal violation: the worker crashes (see below) | cancelled silently | HOSTS.md (observed 3/3); Envoy cancels `http_request_` |
//! | root dispatch inside the root's `on_http_call_response` after a complete answer (bug 1) | the worker crashes: every request in flight on it ends as a dead worker's client sees it (connection closed, no response or a cut one), the instance and its memory are gone, a new worker starts at once (vm start, configure, ticks, all its connections); fatal violation | allowed | HOSTS.md, "Three bugs of ngx_wasm_module" (observed with a debugger) |
//! | HTTP-context dispatch with a body from `on_http_call_response` after an answer with an empty body, to a call that had one (bug 2) | the worker spins for ever: every request on it, and every later one, hangs until its client gives up; fatal violation | allowed | HOSTS.md, same section (observed) |
//! | `worker_connections` (bug 3) | every client connection, upstream exchange and call takes a slot while it lasts, a root call two (its fake connection too); a root call that completes while another of the root context is pending, and a root dispatch that fails synchronously (an error status there, where an HTTP context traps), lose one for good (violation); none left: a new connection is closed at once, an upstream is a 500, a call fails (`broken connection`), a root dispatch returns an error | no budget | HOSTS.md, same section (observed); [`connections`] |
//! | trap (any host error or Rust panic) | instance discarded; its client gets 500; other in-flight requests of it fail (500, or a broken response) at their next step, without callbacks; the next request gets a new instance (`on_vm_start`/`on_configure` again, globals lost) | per `failure_policy`: FAIL_RELOAD (the default from 1.33): this stream and those until the reload (1 s backoff) get 503, then a new VM (memory lost); FAIL_CLOSED (the default before 1.33): 503 for every stream for good (`wasm_fail_stream`); FAIL_OPEN: streams pass without the filter | HOSTS.md; ngx_proxy_wasm.c (`instance->trapped` → `ERR_INSTANCE_TRAPPED`); proxy-wasm-cpp-host `CHECK_FAIL_HTTP` / Envoy `failStream`; Envoy changelog 1.33.0, `ReloadConfig.backoff` (1 s default) |
//! | `dispatch_http_call` that cannot be sent | see the dispatch rows | a cluster without healthy host or with an open circuit breaker (`HostBuilder::unhealthy_cluster`): InternalFailure at once, no answer ever | context.cc `httpCall` (`if (!http_request) … InternalFailure`) |
//! | reconfiguration on the same VM (`Host::reconfigure`) | – | the old root context is done and deleted, its calls cancelled (no answer), a new root context (new id) created and configured; module memory stays | Envoy `~Context` cancels `http_request_`; plugin reload keeps a VM with the same vm_id and code |
//! | who answered (`response.code_details`; ngx `$upstream_status`) | `ngx.upstream_status`: the upstream's status, 502 when it could not be reached, none for nginx's or a filter's own response | `via_upstream` for the upstream's response; the router's reason (`upstream_reset_before_response_started{…}`), a filter's local reply details, or what a filter after this one set (`HostBuilder::local_reply_after`: a 403 from RBAC, a 429…) | nginx `$upstream_status`; Envoy stream info `responseCodeDetails` |
//! | header callbacks' end_of_stream | 1 for request and response headers, whatever follows | true when nothing follows: an upstream response whose head says no body comes (`Content-Length: 0`, a 204 or 304) always has it, since the HTTP/1 codec raises such a head only once the message is complete | ngx_http_proxy_wasm.c (`NGX_HTTP_PROXY_WASM_EOF`); Envoy context.cc `decodeHeaders`/`encodeHeaders`, http1/codec_impl.cc (`deferred_end_stream_headers_`) |
//! | request body | whole, once, end_of_stream true, and only when non-empty (an empty or `Content-Length: 0` body, an empty chunked one: no call); past `client_body_buffer_size` (8k) the call carries the size but the bytes cannot be read (error logged) while the upstream gets them all | chunks as they come (the test chooses the size), an empty chunked body is one empty call with end_of_stream; Pause = StopIterationAndBuffer, past `buffer_limit` (1 MiB) → 413 | HOSTS.md; ngx_http_proxy_wasm.c `on_request_body_handler` (`if (len)`); ngx_proxy_wasm_host.c `get_buffer` |
//! | when the upstream is asked | after the body was read | as soon as the request headers continue, body streamed as released | nginx proxy_request_buffering; Envoy router |
//! | Pause in request headers | until `resume_http_request` | until resume; the body waits too (buffered, flow-controlled, no 413): proxy-wasm-cpp-host makes it StopAllIterationAndWatermark; with `allow_on_headers_stop_iteration` (1.35+; refused by older versions) a real StopIteration, the body reaching the filter meanwhile | HOSTS.md; proxy-wasm-cpp-host#143 (`convertVmCallResultToFilterHeadersStatus`), envoyproxy/envoy#40213, context.cc (`DefaultAllowOnHeadersStopIteration = false`) |
//! | Pause in response headers | ignored, warning logged | stops until `resume_http_response` | HOSTS.md |
//! | resume in response phases | does nothing | resumes | HOSTS.md |
//! | Pause in response body | buffering up to `wasm_response_body_buffers` (4 × 4k); on overflow the buffer goes out and buffering stops | StopIterationAndBuffer up to `buffer_limit`; past it 500 if the headers are not sent, else reset | HOSTS.md |
//! | response end_of_stream | with Content-Length only on a call that carries the whole body (`chunk_len == content_length`): a body in several calls, or after a buffers overflow, never gets it (on_log still runs); `Content-Length: 0` and chunked: a final empty call | Content-Length: on the last chunk; chunked: a final empty call | ngx_http_proxy_wasm.c `on_response_body`; HOSTS.md (observed) |
//! | body changed after Content-Length went out | violation (the client hangs); remove `content-length` in response headers first → chunked | same (a broken response) | HOSTS.md |
//! | local response | stashed, flushed after the callback; LF appended to a non-empty body, Content-Length counting it (`Content-Length: 0` without a body); last of repeated headers wins; a non-empty body without Content-Type gets the default type (`text/plain`); empty reason phrase; the response callbacks run for it; in response headers it replaces status and body only | applied after the VM call; body as given, repeated headers kept (`addCopy`), content-length = body length, `text/plain` when no content-type, neither header without a body, canonical reason; the response (encoder) callbacks run too | HOSTS.md; ngx_http_wasm_local_response.c, ngx_proxy_wasm_host.c `send_local_response`; Envoy context.cc `sendLocalResponse`, utility.cc `prepareLocalReply` |
//! | `set_tick_period` | once per root context (a second call traps); ignored from an HTTP context | may change; from an HTTP context it sets the root's | ngx_proxy_wasm_host.c `set_tick_period` |
//! | shared data CAS 0 | succeeds only when the key does not exist | writes unconditionally | HOSTS.md |
//! | `set_buffer` | `(0, 0, d)` prepends; otherwise body[..start] + d cut to `len` | start 0: drain `len`, prepend; start ≥ size: append; else BadArgument | HOSTS.md; ngx_proxy_wasm_host.c; cpp-host `copyFrom` |
//! | client goes away | nothing stops: a pending call completes, its answer runs, the upstream is asked, on_log runs | the stream is reset: calls cancelled, upstream reset, on_done/on_log run | HOSTS.md (observed); Envoy stream reset |
//! | end callbacks | on_log, on_done, on_delete | on_done, on_log, on_delete | ngx log then done steps; cpp-host onDestroy/log |
//! | `on_configure` false | the load fails (Kong stops the worker) | the load fails | HOSTS.md |
//! | `proxy_get_log_level` | traps: mapped to the NYI stub ("host function not yet implemented") | the level of the `wasm` logger | ngx_proxy_wasm_host.c (`ngx_proxy_wasm_hfuncs_nop` → `NGX_WAVM_NYI`), ngx_wavm.c (NYI is a trap) |
//! | metrics (`proxy_define_metric`) | stored as `pw.<filter>.<name>`, the whole name within `max_metric_name_length` (256; longer traps); Kong's Prometheus plugin exports `pw_<filter>_<name>` | `wasmcustom.<name>` in `/stats`, `<name>` in `/stats/prometheus` | [`exposition`]; ngx_wasm_module docs/METRICS.md "Name Prefixing"; Kong kong/plugins/prometheus/wasmx.lua; Envoy source/extensions/common/wasm/ `CustomMetricNamespace`, admin/prometheus_stats.cc `metricName` |
//!
//! ## Checked against the hosts' source
//!
//! The facts the product filter relies on, read in the source (the `search` corpus: the
//! versions of Kong/ngx_wasm_module with response buffering, as Kong 3.x embeds, and
//! envoyproxy/envoy), each a rule in [`rules`] and a test in `tests/tests/fidelity.rs`:
//!
//! * **ngx end_of_stream of the header callbacks** — src/http/proxy_wasm/ngx_http_proxy_wasm.c:
//!   `ngx_http_proxy_wasm_on_request_headers` and `…_on_response_headers` pass
//!   `NGX_HTTP_PROXY_WASM_EOF` (1) as end_of_stream, unconditionally. A filter must decide
//!   from `Content-Length`/`Transfer-Encoding` whether a body follows, and must not take the
//!   response headers' flag as the end of the response.
//! * **ngx on_request_body only for a non-empty body** — same file,
//!   `ngx_http_proxy_wasm_on_request_body_handler`: returns when `request_body->bufs == NULL`,
//!   and resumes the filters with the body only `if (len)`; a body in a temp file is announced
//!   with `ngx_file_size` as `len`, and `get_buffer` then fails ("cannot read request body
//!   buffered to file", src/common/proxy_wasm/ngx_proxy_wasm_host.c).
//! * **ngx response end_of_stream** — `ngx_http_proxy_wasm_on_response_body`: with
//!   `resp_content_length_n > 0`, `resp_chunk_eof = (resp_chunk_len == resp_content_length_n)`
//!   and the call is made only `if (resp_chunk_len || resp_chunk_eof)`; `resp_chunk_len` is the
//!   size of this call's chain (src/http/ngx_http_wasm_filter_module.c,
//!   `ngx_http_wasm_body_filter_resume`).
//! * **ngx local response** — `ngx_proxy_wasm_hfuncs_send_local_response`
//!   (ngx_proxy_wasm_host.c) stashes it (`ngx_http_wasm_stash_local_response`: the body copied
//!   with an LF appended, its length counting the LF; allowed until the header filter ran, so
//!   from on_request_headers, on_request_body and the call response); in the response headers
//!   it replaces status and body only. `ngx_http_wasm_flush_local_response`
//!   (src/http/ngx_http_wasm_local_response.c) sets each header with
//!   `NGX_HTTP_WASM_HEADERS_SET` (the last of a repeated name wins), calls
//!   `ngx_http_set_content_type` for a non-empty body (nginx's `default_type`, `text/plain`
//!   unless configured) and sets Content-Length (0 without a body); it is flushed by the
//!   content handler (`ngx_http_wasm_content`, before or after the ops, or from the write event
//!   after a body read) and goes through the header and body filters, so the filter's
//!   `on_http_response_headers`/`on_http_response_body` run for it.
//! * **Envoy local reply** — source/extensions/common/wasm/context.cc `sendLocalResponse`:
//!   `addAfterVmCallAction` (applied after the callback returns), headers added with `addCopy`
//!   (repeats kept), `decoder_callbacks_->sendLocalReply`; source/common/http/utility.cc
//!   `prepareLocalReply`: a non-empty body sets content-length to its size and content-type to
//!   `text/plain` unless one is given; an empty body removes both. The filter manager encodes
//!   the reply through the encoder filters, the Wasm filter's response callbacks included.
//! * **Envoy failed calls** — context.cc `onHttpCallSuccess`/`onHttpCallFailure` and
//!   source/common/http/async_client_impl.cc: the async client runs the router, whose local
//!   replies (503 `upstream connect error or disconnect/reset before headers…` for a refused
//!   or reset connection, 504 `upstream request timeout`) complete the request through
//!   `onComplete` → `onSuccess`; only a reset after the headers is `onFailure(Reset)`: 0
//!   headers, `proxy_get_status` = `BrokenConnection`/`reset`.
//! * **Envoy resume** — a filter that paused its headers and buffered its body
//!   (StopIterationAndBuffer) and then resumes sends the headers and the buffered body
//!   together (`continueDecoding`).
//!
//! Not modelled (the product filter never relies on it): ngx does not call on_response_body
//! while it buffers after a Pause there (it calls once, with the buffers, at their end or
//! when they are full); this host calls it on each chunk with what is buffered.
//!
//! ## Properties (`proxy_get_property`)
//!
//! ngx (ngx_proxy_wasm_properties.c, Kong `runloop/wasm.lua`), values are text:
//! * any context: `plugin_name` (filter name), `plugin_root_id` (root context id, decimal);
//! * HTTP context only: `request.path` (`$request_uri`, with query), `request.url_path`,
//!   `request.host` (`$hostname`, the machine's name — not the Host header),
//!   `request.scheme`, `request.method`, `request.useragent`, `request.protocol`,
//!   `request.query`, `request.id` (x-request-id), `request.referer`, `request.size`
//!   (`$content_length`), `request.total_size`, `request.headers.<name>`,
//!   `response.code` (`$status`), `response.headers.<name>`, `source.address`
//!   (`$remote_addr`, ip only), `source.port`, `connection.id`, `upstream.address`,
//!   `upstream.port`; `ngx.<variable>` for nginx variables (`request_uri`, `uri`, `args`,
//!   `request_method`, `scheme`, `remote_addr`, `remote_port`, `server_addr`,
//!   `server_port`, `host`, `hostname`, `http_<header>`, `sent_http_<header>`,
//!   `content_length`, `status`, `upstream_addr`, …); Kong's `kong.route_id`,
//!   `kong.service_id`, `kong.router.route` and `kong.router.service` (JSON; the route
//!   and service **names** are read there), `kong.version`, `kong.client.protocol`,
//!   `kong.nginx.subsystem`, `kong.node.id`, `kong.request.port`;
//! * never: `node`, `route_name`, `cluster_name`, `listener_*`, … (NotFound and an error
//!   line "property not supported"), `plugin_vm_id` (NYI).
//!
//! envoy (Envoy attributes and Wasm properties), strings raw, integers 8-byte LE int64:
//! * any context: `plugin_name`, `plugin_root_id`, `plugin_vm_id`, `xds.node` (1.29+) and
//!   `node` (until 1.32: the old top-level xDS names, `node`, `route_name`, `cluster_name`,
//!   `listener_direction`…, were removed in 1.33, changelog 1.33.0 / envoyproxy/envoy#36619)
//!   (serialized `Node` proto), `listener_direction` / `xds.listener_direction`;
//! * HTTP context: `request.path`, `request.url_path`, `request.host` (`:authority`),
//!   `request.scheme`, `request.method`, `request.headers.<name>`, `request.referer`,
//!   `request.useragent`, `request.id`, `request.protocol`, `request.query`,
//!   `request.size` (int), `source.address` (`ip:port`), `source.port` (int),
//!   `destination.address`, `destination.port`, `connection.id` (int), `response.code`
//!   (int), `response.code_details`, `response.headers.<name>`, `xds.route_name` (the
//!   route name), `xds.cluster_name` (the service), `upstream.address`,
//!   `upstream.port`, and anything set with `proxy_set_property`.
//!
//! **Telling the hosts apart at start** (root context, `on_configure`): `xds.node` is
//! present in Envoy (1.29+) and NotFound in ngx. In an HTTP context, `ngx.*` exists only in
//! ngx.
//!
//! Header maps: request headers start with `:path`, `:method`, `:scheme`, `:authority`
//! (ngx: `server_name:port`, the Host header stays; envoy: the Host header becomes
//! `:authority`, plus `x-forwarded-proto` and `x-request-id`); response headers start
//! with `:status`. A failed ngx call's headers hold `:dispatch_status` only.
//!
//! ## Using it
//!
//! ```no_run
//! use idempotency_tests::{Host, Mode, Reply, Upstream, build};
//!
//! # async fn example() {
//! let api = Upstream::start().await;
//! api.reply("/orders", Reply::new(201).header("location", "/orders/1").body("{}"));
//! let host = Host::builder(Mode::Ngx, build::wasm("host-fixture"))
//!     .upstream(api.addr())
//!     .config("tick_ms=1000")
//!     .start()
//!     .await
//!     .unwrap();
//! let r = host.client().post("/orders", "{\"qty\":1}").await.unwrap();
//! assert_eq!(r.status, 201);
//! host.advance(std::time::Duration::from_secs(1)).await; // one tick
//! host.settle().await;
//! assert_eq!(api.count("/orders"), 1);
//! host.finish().await; // panics on an unexpected violation
//! # }
//! ```
//!
//! Tests run on any tokio runtime (`#[tokio::test]`); each host starts its own worker
//! thread. A [`Violation`] (a behaviour that would crash or hang a real host) fails the
//! test at [`Host::finish`] or drop unless [`Host::expect_violation`] declared it.

pub mod abi;
pub mod build;
pub mod client;
pub mod connections;
pub mod contexts;
pub mod dispatch;
pub mod exposition;
pub mod flame;
pub mod host;
pub mod hostcalls;
pub mod measure;
pub mod observed;
pub mod profile;
pub mod properties;
pub mod rules;
pub mod secrets;
pub mod traffic;
pub mod upstream;
pub mod wasi;

pub use client::{Client, ClientRequest, ClientResponse, HeldConnection};
pub use host::{Host, HostBuilder, HostOptions, LoadFailure};
pub use observed::{
    Fuel, Level, LogLine, Metric, MetricKind, RequestFuel, Source, Violation, ViolationKind,
};
pub use rules::{FailurePolicy, Mode, Phase};
pub use upstream::{DeadPort, Reply, Seen, Upstream};
