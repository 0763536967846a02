//! # idempotency: Idempotency-Key enforcement at the gateway
//!
//! A proxy-wasm filter (ABI 0.2.1, Rust SDK `proxy-wasm` 0.2.5, `wasm32-wasip1`) for Kong
//! 3.4–3.9 (ngx_wasm_module), Envoy and Istio. A request carrying `Idempotency-Key` (draft
//! `draft-ietf-httpapi-idempotency-key-header`) is allocated in the backend before it reaches
//! the upstream; its response is recorded at the end, and a retry gets it replayed byte for
//! byte. Configuration: `spec/filter-config.schema.json` (the one source), parsed by
//! [`config`].
//!
//! ## Module map
//!
//! Pure logic, tested natively (`cargo test -p idempotency`):
//! - [`config`]: the JSON configuration, validated, errors naming the field.
//! - [`key`]: the header value (RFC 8941 sf-string or bare token) and the backend key.
//! - [`scope`]: the scope digest (route, `scope.headers`): clients never share a key.
//! - [`fingerprint`]: streaming SHA-256 of method, path, content-type and body.
//! - [`sha`]: SHA-256 that looks its first block up in a small cache of the instance.
//! - [`decision`]: what each backend answer means; the calls' bodies and headers.
//! - [`capture`]: copying the response as it passes; record or release at its end.
//! - [`replay`]: a stored capture as a local reply, and the host fix-ups that make it exact.
//! - [`problem`]: the RFC 9457 answers of the filter and their stable types.
//! - [`queue`]: the bounded deferred record/release queue, retries with backoff.
//! - [`metrics`]: counter names. [`host`]: host detection and what follows from it.
//! - [`pairs`]: header maps as bytes, decoded without the SDK's `unwrap`s.
//! - [`json`]: the backend calls' few JSON shapes, written and read by hand (serde_json for
//!   the configuration only).
//! - [`allocator`]: the module's allocator, size classes in front of the system's.
//! - [`b64`]: base64, standard and URL-safe, as strict as the `base64` crate.
//!
//! The proxy-wasm layer, thin: [`root`] (configuration, tick, the queue's calls), [`filter`]
//! (the HTTP context), [`shared`] (module memory shared by both: queue, metric ids, host).
//!
//! ## Invariants
//! - No dispatch where Kong forbids it: from an HTTP context only in request headers and
//!   request body; in response phases only inline on a host detected as Envoy (or an unknown
//!   host with `record: inline`), never on ngx_wasm_module. `on_log` never calls.
//! - No dispatch from any `on_http_call_response`, root or HTTP context, on any host: on Kong
//!   the first crashes the worker and the second can hang it (HOSTS.md, "Three bugs of
//!   ngx_wasm_module"). The root context sends from `on_tick` only, one batch call in flight
//!   per root context (overlapping root calls leak the worker's connections); on Kong a call's
//!   arguments are checked first, so that a dispatch never fails synchronously.
//! - No call in flight past the end of its request on Kong: the request is paused on every
//!   call its context makes there; every call that may outlive a request is the root's.
//! - No panic on any input: no `unwrap`, `expect`, indexing or unchecked arithmetic on
//!   untrusted data (clippy denies the first three outside tests); header maps are read as
//!   bytes ([`pairs`]), never through the SDK's `get_map`, which unwraps UTF-8. A panic is a
//!   trap, and on Kong a trap resets the instance of the worker (all its requests, the queue).
//! - What identifies a request (scope, fingerprint) is hashed from the bytes the client sent.
//! - Kong's end_of_stream is 1 in every header callback: a body is expected from
//!   `Content-Length` (a body of unknown length under `fingerprint` gets 411, since an empty
//!   one would get no callback before the upstream), and the response ends in a body callback
//!   or in `on_log`.
//! - Bounded memory: per request at most one copy of the response within
//!   `max_capture_bytes` (the request body is hashed, never kept); the queue within
//!   `queue.max_entries` and `queue.max_bytes`.
//! - Nothing the client receives is changed, except replies the filter sends itself (replays
//!   and problems), which are made exact on each host.

// The docs are a map for contributors (`cargo doc --document-private-items`): a module's
// overview names the private pieces it is made of.
#![allow(rustdoc::private_intra_doc_links)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod allocator;
pub mod b64;
pub mod capture;
pub mod config;
pub mod decision;
pub mod filter;
pub mod fingerprint;
pub mod host;
pub mod json;
pub mod key;
pub mod metrics;
pub mod pairs;
pub mod problem;
pub mod queue;
pub mod replay;
pub mod root;
pub mod scope;
pub mod sha;
pub mod shared;

/// Size classes in front of the system allocator ([`allocator`] says why).
#[cfg(all(target_family = "wasm", not(target_feature = "atomics")))]
#[global_allocator]
static ALLOCATOR: allocator::SizeClasses = allocator::SizeClasses::new();

#[cfg(target_arch = "wasm32")]
proxy_wasm::main! {{
    proxy_wasm::set_root_context(|id| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(root::Root::new(id))
    });
}}
