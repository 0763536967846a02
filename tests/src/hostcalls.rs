//! The `env.proxy_*` functions of proxy-wasm ABI 0.2.1 that the Rust SDK 0.2.x imports.
//! Each returns a `WasmResult` status ([`crate::abi::status`]) or traps (an `Err`); the
//! SDK panics on a status it does not expect, so a wrong status is a trap too, as in the
//! real hosts. What differs per host is asked of [`Mode`].
//!
//! Status codes, per call (ngx: ngx_proxy_wasm_host.c; envoy: proxy-wasm-cpp-host
//! `exports.cc` and Envoy's `context.cc`):
//! * get_buffer: NotFound for no body / empty slice (ngx), Ok with no data (envoy).
//! * get_header_map_value: NotFound when absent.
//! * get_property: NotFound when the host has no such property.
//! * set_shared_data: CasMismatch when the CAS rule refuses.
//! * http_call: BadArgument (envoy: unknown cluster, missing `:method`/`:path`/
//!   `:authority`); ngx traps instead (`dispatch failed: …`).
//! * continue_stream of an unknown stream type: BadArgument.

use wasmtime::{Caller, Linker};
use wasmtime::{Result, bail};

use crate::abi::{self, Pairs, status};
use crate::contexts::{DispatchRequest, LocalResponse, World};
use crate::observed::{Level, Metric, MetricKind, Source, ViolationKind};
use crate::rules::{DispatchRule, Mode, Phase};

/// The `env` functions this host provides.
pub const NAMES: &[&str] = &[
    "proxy_log",
    "proxy_get_log_level",
    "proxy_get_current_time_nanoseconds",
    "proxy_set_tick_period_milliseconds",
    "proxy_get_buffer_bytes",
    "proxy_set_buffer_bytes",
    "proxy_get_header_map_pairs",
    "proxy_set_header_map_pairs",
    "proxy_get_header_map_value",
    "proxy_replace_header_map_value",
    "proxy_remove_header_map_value",
    "proxy_add_header_map_value",
    "proxy_get_property",
    "proxy_set_property",
    "proxy_get_shared_data",
    "proxy_set_shared_data",
    "proxy_register_shared_queue",
    "proxy_resolve_shared_queue",
    "proxy_dequeue_shared_queue",
    "proxy_enqueue_shared_queue",
    "proxy_continue_stream",
    "proxy_close_stream",
    "proxy_send_local_response",
    "proxy_http_call",
    "proxy_grpc_call",
    "proxy_grpc_stream",
    "proxy_grpc_send",
    "proxy_grpc_cancel",
    "proxy_grpc_close",
    "proxy_get_status",
    "proxy_set_effective_context",
    "proxy_call_foreign_function",
    "proxy_done",
    "proxy_define_metric",
    "proxy_get_metric",
    "proxy_record_metric",
    "proxy_increment_metric",
];

type C<'a> = Caller<'a, World>;

const E: &str = "env";

/// Which map a `MapType` names, for the current context.
fn map(world: &mut World, map_type: u32) -> Option<&mut Pairs> {
    if map_type == 6 || map_type == 7 {
        let call = world.call.as_mut()?;
        return Some(if map_type == 6 {
            &mut call.headers
        } else {
            &mut call.trailers
        });
    }
    let stream = world.stream()?;
    Some(match map_type {
        0 => &mut stream.request_headers,
        1 => &mut stream.request_trailers,
        2 => &mut stream.response_headers,
        3 => &mut stream.response_trailers,
        _ => return None,
    })
}

/// The status for a map that does not exist here (no request in a root context, no
/// call response outside on_http_call_response): ngx says BadArgument, Envoy NotFound;
/// the SDK panics on either.
fn no_map(mode: Mode) -> u32 {
    match mode {
        Mode::Ngx => status::BAD_ARGUMENT,
        Mode::Envoy => status::NOT_FOUND,
    }
}

/// Whether a header map can still change; logs like the host when it cannot.
fn map_writable(world: &World, map_type: u32) -> bool {
    let Some(stream) = world.streams.get(&world.current) else {
        return true;
    };
    let (frozen, what) = match map_type {
        0 => (
            stream.request_sent || stream.response_started,
            "request headers",
        ),
        2 => (stream.response_headers_sent, "response headers"),
        _ => (false, ""),
    };
    if frozen {
        let why = if map_type == 0 {
            "response produced"
        } else {
            "headers already sent"
        };
        world.host_log(Level::Error, format!("cannot set {what}: {why}"));
    }
    !frozen
}

fn is_read_only_pseudo(mode: Mode, map_type: u32, key: &str) -> bool {
    // ngx: `:scheme` and `:authority` are read-only special keys (an error is logged);
    // `:status` of a response is read-only there too.
    mode == Mode::Ngx
        && ((map_type == 0 && (key == ":scheme" || key == ":authority"))
            || (map_type == 2 && key == ":status"))
}

/// A property path as the SDK serializes it: its parts separated by NULs.
fn property_path(raw: &[u8]) -> Vec<String> {
    raw.split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect()
}

fn body_of(world: &mut World, buffer_type: u32) -> Option<Vec<u8>> {
    match buffer_type {
        0 => world.stream().map(|s| s.request_body.clone()),
        1 => world.stream().map(|s| s.response_body.clone()),
        4 => world.call.as_ref().map(|c| c.body.clone()),
        6 => Some(world.opts.vm_config.clone()),
        7 => Some(world.plugin_config.clone()),
        _ => None,
    }
}

/// Splices a body the way each host's `set_buffer` does.
fn set_body(mode: Mode, body: &mut Vec<u8>, start: usize, len: usize, data: &[u8]) -> bool {
    match mode {
        // ngx_http_wasm_set_{req,resp}_body: (0, 0, data) prepends; otherwise the body
        // becomes body[..start] + data cut to `len` (HOSTS.md: `(0, old_len, data)`
        // truncates to the old length).
        Mode::Ngx => {
            if start == 0 && len == 0 && !data.is_empty() {
                body.splice(0..0, data.iter().copied());
            } else {
                let len = if start > 0 && len == 0 {
                    data.len()
                } else {
                    len
                };
                body.truncate(start.min(body.len()));
                body.extend_from_slice(&data[..len.min(data.len())]);
            }
            true
        }
        // proxy-wasm-cpp-host/Envoy `Buffer::copyFrom`: start 0 drains `len` then
        // prepends; start past the end appends; anything else is BadArgument.
        Mode::Envoy => {
            if start == 0 {
                body.drain(..len.min(body.len()));
                body.splice(0..0, data.iter().copied());
                true
            } else if start >= body.len() {
                body.extend_from_slice(data);
                true
            } else {
                false
            }
        }
    }
}

pub fn link(linker: &mut Linker<World>) -> Result<()> {
    linker.func_wrap(
        E,
        "proxy_log",
        |mut c: C, level: u32, ptr: u32, len: u32| -> Result<u32> {
            let Some(level) = Level::from_proxy(level) else {
                return Ok(status::BAD_ARGUMENT);
            };
            let message = abi::read_string(&mut c, ptr, len)?;
            let w = c.data();
            w.observed
                .lock()
                .unwrap()
                .log(level, Source::Filter, w.current, message);
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_get_log_level",
        |mut c: C, ptr: u32| -> Result<u32> {
            // ngx_wasm_module: its NYI stub (`ngx_proxy_wasm_hfuncs_nop`), a trap.
            if c.data().mode == Mode::Ngx {
                bail!("proxy_get_log_level: host function not yet implemented");
            }
            let level = c.data().opts.log_level as u32;
            abi::write_u32(&mut c, ptr, level)?;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_get_current_time_nanoseconds",
        |mut c: C, ptr: u32| -> Result<u32> {
            let now = c.data().now_ns;
            abi::write_u64(&mut c, ptr, now)?;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_set_tick_period_milliseconds",
        |mut c: C, period: u32| -> Result<u32> {
            let w = c.data_mut();
            if w.current != w.root_id && w.mode == Mode::Ngx {
                // ngx_proxy_wasm_hfuncs_set_tick_period: ignored outside the root.
                return Ok(status::OK);
            }
            if w.mode.tick_period_once() && w.tick_period_ms.is_some() {
                bail!("tick_period already set");
            }
            w.tick_period_ms = Some(period);
            w.tick_changed = true;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_get_buffer_bytes",
        |mut c: C, kind: u32, start: u32, max: u32, ptr_ptr: u32, size_ptr: u32| -> Result<u32> {
            let mode = c.data().mode;
            if kind == 0 {
                let spooled = c.data_mut().stream().is_some_and(|s| s.request_body_spooled);
                if spooled {
                    c.data().host_log(
                        Level::Error,
                        "cannot read request body buffered to file at \"/usr/local/kong/client_body_temp/0000000001\"",
                    );
                    return Ok(status::NOT_FOUND);
                }
            }
            let Some(body) = body_of(c.data_mut(), kind) else {
                return Ok(if kind > 8 {
                    status::BAD_ARGUMENT
                } else {
                    status::NOT_FOUND
                });
            };
            let start = (start as usize).min(body.len());
            let end = start.saturating_add(max as usize).min(body.len());
            let slice = &body[start..end];
            if slice.is_empty() && mode == Mode::Ngx {
                return Ok(status::NOT_FOUND);
            }
            abi::return_bytes(&mut c, slice, ptr_ptr, size_ptr)?;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_set_buffer_bytes",
        |mut c: C, kind: u32, start: u32, len: u32, ptr: u32, size: u32| -> Result<u32> {
            let data = abi::read(&mut c, ptr, size)?;
            let w = c.data_mut();
            let mode = w.mode;
            let Some(stream) = w.stream() else {
                return Ok(status::NOT_FOUND);
            };
            let body = match kind {
                0 => {
                    if stream.request_sent && mode == Mode::Ngx {
                        bail!("cannot set request body");
                    }
                    &mut stream.request_body
                }
                1 => {
                    if mode == Mode::Ngx
                        && stream.response_body.is_empty()
                        && !stream.response_started
                    {
                        bail!("cannot set response body");
                    }
                    &mut stream.response_body
                }
                _ => return Ok(status::BAD_ARGUMENT),
            };
            Ok(
                if set_body(mode, body, start as usize, len as usize, &data) {
                    status::OK
                } else {
                    status::BAD_ARGUMENT
                },
            )
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_get_header_map_pairs",
        |mut c: C, kind: u32, ptr_ptr: u32, size_ptr: u32| -> Result<u32> {
            let mode = c.data().mode;
            let Some(pairs) = map(c.data_mut(), kind).cloned() else {
                return Ok(no_map(mode));
            };
            let bytes = abi::serialize_pairs(&pairs);
            abi::return_bytes(&mut c, &bytes, ptr_ptr, size_ptr)?;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_set_header_map_pairs",
        |mut c: C, kind: u32, ptr: u32, size: u32| -> Result<u32> {
            let bytes = abi::read(&mut c, ptr, size)?;
            let Some(pairs) = abi::deserialize_pairs(&bytes) else {
                return Ok(status::SERIALIZATION_FAILURE);
            };
            let w = c.data_mut();
            if !map_writable(w, kind) {
                return Ok(status::OK);
            }
            let mode = w.mode;
            let Some(map) = map(w, kind) else {
                return Ok(no_map(mode));
            };
            // Pseudo-headers stay (they are the request line / status line).
            map.retain(|(k, _)| k.starts_with(':'));
            for (k, v) in pairs {
                let k = k.to_ascii_lowercase();
                if k.starts_with(':') {
                    abi::replace(map, &k, v);
                } else {
                    map.push((k, v));
                }
            }
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_get_header_map_value",
        |mut c: C, kind: u32, kptr: u32, klen: u32, ptr_ptr: u32, size_ptr: u32| -> Result<u32> {
            let key = abi::read_string(&mut c, kptr, klen)?;
            let w = c.data_mut();
            let mode = w.mode;
            let value = if kind == 6 && key == ":dispatch_status" && mode == Mode::Ngx {
                w.call
                    .as_ref()
                    .and_then(|c| c.dispatch_status.clone())
                    .map(String::into_bytes)
            } else {
                match map(w, kind) {
                    Some(map) => abi::get(map, &key).map(<[u8]>::to_vec),
                    None => return Ok(no_map(mode)),
                }
            };
            match value {
                Some(v) => {
                    abi::return_bytes(&mut c, &v, ptr_ptr, size_ptr)?;
                    Ok(status::OK)
                }
                None => Ok(status::NOT_FOUND),
            }
        },
    )?;
    for (name, op) in [
        ("proxy_replace_header_map_value", 0u8),
        ("proxy_add_header_map_value", 1u8),
    ] {
        linker.func_wrap(
            E,
            name,
            move |mut c: C, kind: u32, kptr: u32, klen: u32, vptr: u32, vlen: u32| -> Result<u32> {
                let key = abi::read_string(&mut c, kptr, klen)?.to_ascii_lowercase();
                let value = abi::read(&mut c, vptr, vlen)?;
                let w = c.data_mut();
                if !map_writable(w, kind) {
                    return Ok(status::OK);
                }
                let mode = w.mode;
                if is_read_only_pseudo(mode, kind, &key) {
                    w.host_log(
                        Level::Error,
                        format!("cannot set read-only \"{key}\" header"),
                    );
                    return Ok(status::OK);
                }
                let Some(map) = map(w, kind) else {
                    return Ok(no_map(mode));
                };
                if op == 0 || key.starts_with(':') {
                    abi::replace(map, &key, value);
                } else {
                    map.push((key, value));
                }
                Ok(status::OK)
            },
        )?;
    }
    linker.func_wrap(
        E,
        "proxy_remove_header_map_value",
        |mut c: C, kind: u32, kptr: u32, klen: u32| -> Result<u32> {
            let key = abi::read_string(&mut c, kptr, klen)?;
            let w = c.data_mut();
            if !map_writable(w, kind) {
                return Ok(status::OK);
            }
            let mode = w.mode;
            let Some(map) = map(w, kind) else {
                return Ok(no_map(mode));
            };
            abi::remove(map, &key);
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_get_property",
        |mut c: C, ptr: u32, len: u32, ptr_ptr: u32, size_ptr: u32| -> Result<u32> {
            let parts = property_path(&abi::read(&mut c, ptr, len)?);
            match crate::properties::get(c.data(), &parts) {
                Some(value) => {
                    abi::return_bytes(&mut c, &value, ptr_ptr, size_ptr)?;
                    Ok(status::OK)
                }
                None => Ok(status::NOT_FOUND),
            }
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_set_property",
        |mut c: C, ptr: u32, len: u32, vptr: u32, vlen: u32| -> Result<u32> {
            let parts = property_path(&abi::read(&mut c, ptr, len)?);
            let value = abi::read(&mut c, vptr, vlen)?;
            Ok(if crate::properties::set(c.data_mut(), &parts, &value) {
                status::OK
            } else {
                status::NOT_FOUND
            })
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_get_shared_data",
        |mut c: C,
         kptr: u32,
         klen: u32,
         ptr_ptr: u32,
         size_ptr: u32,
         cas_ptr: u32|
         -> Result<u32> {
            let key = abi::read_string(&mut c, kptr, klen)?;
            let found = c.data().observed.lock().unwrap().shared.get(&key).cloned();
            match found {
                Some((value, cas)) => {
                    abi::return_bytes(&mut c, &value, ptr_ptr, size_ptr)?;
                    abi::write_u32(&mut c, cas_ptr, cas)?;
                    Ok(status::OK)
                }
                None => Ok(status::NOT_FOUND),
            }
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_set_shared_data",
        |mut c: C, kptr: u32, klen: u32, vptr: u32, vlen: u32, cas: u32| -> Result<u32> {
            let key = abi::read_string(&mut c, kptr, klen)?;
            let value = abi::read(&mut c, vptr, vlen)?;
            let w = c.data();
            let mut observed = w.observed.lock().unwrap();
            let current = observed.shared.get(&key).map(|(_, cas)| *cas);
            let allowed = match (cas, current) {
                (0, None) => true,
                (0, Some(_)) => !w.mode.cas_zero_requires_absent(),
                (cas, Some(now)) => cas == now,
                // A CAS for a key that does not exist: ngx refuses (no entry to match),
                // Envoy writes (it only compares when the key exists).
                (_, None) => w.mode == Mode::Envoy,
            };
            if !allowed {
                return Ok(status::CAS_MISMATCH);
            }
            if vptr == 0 && w.mode == Mode::Ngx {
                // ngx: a NULL value pointer deletes the key.
                observed.shared.remove(&key);
                return Ok(status::OK);
            }
            observed.next_cas += 1;
            let next = observed.next_cas;
            observed.shared.insert(key, (value, next));
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_register_shared_queue",
        |mut c: C, ptr: u32, len: u32, id_ptr: u32| -> Result<u32> {
            let name = abi::read_string(&mut c, ptr, len)?;
            let w = c.data_mut();
            if w.mode == Mode::Ngx && !w.opts.shm_queues.contains(&name) {
                bail!("could not find queue");
            }
            let next = w.queues.len() as u32 + 1;
            let id = *w.queues.entry(name).or_insert(next);
            w.queue_data.entry(id).or_default();
            abi::write_u32(&mut c, id_ptr, id)?;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_resolve_shared_queue",
        |mut c: C, _vptr: u32, _vlen: u32, ptr: u32, len: u32, id_ptr: u32| -> Result<u32> {
            let name = abi::read_string(&mut c, ptr, len)?;
            match c.data().queues.get(&name).copied() {
                Some(id) => {
                    abi::write_u32(&mut c, id_ptr, id)?;
                    Ok(status::OK)
                }
                None => Ok(status::NOT_FOUND),
            }
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_enqueue_shared_queue",
        |mut c: C, id: u32, ptr: u32, len: u32| -> Result<u32> {
            let value = abi::read(&mut c, ptr, len)?;
            match c.data_mut().queue_data.get_mut(&id) {
                Some(q) => {
                    q.push_back(value);
                    Ok(status::OK)
                }
                None => Ok(status::NOT_FOUND),
            }
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_dequeue_shared_queue",
        |mut c: C, id: u32, ptr_ptr: u32, size_ptr: u32| -> Result<u32> {
            let item = match c.data_mut().queue_data.get_mut(&id) {
                Some(q) => q.pop_front(),
                None => return Ok(status::NOT_FOUND),
            };
            match item {
                Some(v) => {
                    abi::return_bytes(&mut c, &v, ptr_ptr, size_ptr)?;
                    Ok(status::OK)
                }
                None => Ok(status::EMPTY),
            }
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_continue_stream",
        |mut c: C, kind: u32| -> Result<u32> {
            let w = c.data_mut();
            let mode = w.mode;
            let phase = w.phase;
            let Some(stream) = w.stream() else {
                return Ok(status::NOT_FOUND);
            };
            match (mode, kind) {
                // ngx: both stream types force-resume the request; in response phases
                // there is nothing to resume (HOSTS.md: resume does nothing there).
                (Mode::Ngx, 0 | 1) => {
                    if !phase.is_response() {
                        stream.resume_request = true;
                    }
                    Ok(status::OK)
                }
                (Mode::Ngx, _) => Ok(status::INTERNAL_FAILURE),
                (Mode::Envoy, 0) => {
                    stream.resume_request = true;
                    Ok(status::OK)
                }
                (Mode::Envoy, 1) => {
                    stream.resume_response = true;
                    Ok(status::OK)
                }
                (Mode::Envoy, _) => Ok(status::BAD_ARGUMENT),
            }
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_close_stream",
        |mut c: C, kind: u32| -> Result<u32> {
            let w = c.data_mut();
            if w.mode == Mode::Ngx {
                bail!("NYI - proxy_close_stream");
            }
            match w.stream() {
                Some(s) if kind <= 1 => {
                    s.reset = true;
                    Ok(status::OK)
                }
                _ => Ok(status::BAD_ARGUMENT),
            }
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_send_local_response",
        |mut c: C,
         code: u32,
         dptr: u32,
         dlen: u32,
         bptr: u32,
         blen: u32,
         hptr: u32,
         hlen: u32,
         _grpc: i32|
         -> Result<u32> {
            let details = abi::read_string(&mut c, dptr, dlen)?;
            let body = abi::read(&mut c, bptr, blen)?;
            let raw = abi::read(&mut c, hptr, hlen)?;
            let Some(headers) = abi::deserialize_pairs(&raw) else {
                return Ok(status::SERIALIZATION_FAILURE);
            };
            let w = c.data_mut();
            let mode = w.mode;
            let Some(stream) = w.stream() else {
                return Ok(status::NOT_FOUND);
            };
            if mode == Mode::Ngx {
                if stream.response_headers_sent {
                    bail!("response already sent");
                }
                if stream.local_response.is_some() {
                    bail!("local response already stashed");
                }
            }
            stream.local_response = Some(LocalResponse {
                status: code,
                details,
                body,
                headers,
            });
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_http_call",
        |mut c: C,
         uptr: u32,
         ulen: u32,
         hptr: u32,
         hlen: u32,
         bptr: u32,
         blen: u32,
         tptr: u32,
         tlen: u32,
         timeout: u32,
         token_ptr: u32|
         -> Result<u32> {
            let upstream = abi::read_string(&mut c, uptr, ulen)?;
            let headers = abi::read(&mut c, hptr, hlen)?;
            let body = abi::read(&mut c, bptr, blen)?;
            let trailers = abi::read(&mut c, tptr, tlen)?;
            let w = c.data_mut();
            let (Some(headers), Some(trailers)) = (
                abi::deserialize_pairs(&headers),
                abi::deserialize_pairs(&trailers),
            ) else {
                return Ok(status::SERIALIZATION_FAILURE);
            };
            match plan_call(w, &upstream, headers, body, trailers, timeout)? {
                Ok(token) => {
                    abi::write_u32(&mut c, token_ptr, token)?;
                    Ok(status::OK)
                }
                Err(status) => Ok(status),
            }
        },
    )?;
    // gRPC: neither the product nor the fixture uses it; the SDK maps InternalFailure to
    // an error it returns (no panic).
    linker.func_wrap(
        E,
        "proxy_grpc_call",
        |_: C,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32| { Ok(status::INTERNAL_FAILURE) },
    )?;
    linker.func_wrap(
        E,
        "proxy_grpc_stream",
        |_: C, _: u32, _: u32, _: u32, _: u32, _: u32, _: u32, _: u32, _: u32, _: u32| {
            Ok(status::INTERNAL_FAILURE)
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_grpc_send",
        |_: C, _: u32, _: u32, _: u32, _: u32| Ok(status::NOT_FOUND),
    )?;
    linker.func_wrap(E, "proxy_grpc_cancel", |_: C, _: u32| Ok(status::NOT_FOUND))?;
    linker.func_wrap(E, "proxy_grpc_close", |_: C, _: u32| Ok(status::NOT_FOUND))?;
    linker.func_wrap(
        E,
        "proxy_get_status",
        |mut c: C, code_ptr: u32, ptr_ptr: u32, size_ptr: u32| -> Result<u32> {
            let (code, message) = c.data().status.clone();
            abi::write_u32(&mut c, code_ptr, code)?;
            abi::return_bytes(&mut c, message.as_bytes(), ptr_ptr, size_ptr)?;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_set_effective_context",
        |mut c: C, id: u32| -> Result<u32> {
            let w = c.data_mut();
            if id == w.root_id || w.streams.contains_key(&id) {
                w.current = id;
                Ok(status::OK)
            } else {
                Ok(status::BAD_ARGUMENT)
            }
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_call_foreign_function",
        |_: C, _: u32, _: u32, _: u32, _: u32, _: u32, _: u32| Ok(status::NOT_FOUND),
    )?;
    linker.func_wrap(E, "proxy_done", |_: C| Ok(status::OK))?;
    linker.func_wrap(
        E,
        "proxy_define_metric",
        |mut c: C, kind: u32, ptr: u32, len: u32, id_ptr: u32| -> Result<u32> {
            let name = abi::read_string(&mut c, ptr, len)?;
            let kind = match kind {
                0 => MetricKind::Counter,
                1 => MetricKind::Gauge,
                2 => MetricKind::Histogram,
                _ => return Ok(status::BAD_ARGUMENT),
            };
            // ngx: the stored name, prefix included, within `max_metric_name_length`
            // (ngx_proxy_wasm_host.c: "could not define metric: name … too long", a trap).
            let mode = c.data().mode;
            let stored = crate::exposition::stored_name(mode, &c.data().opts.filter_name, &name);
            if crate::exposition::stored_name_limit(mode).is_some_and(|limit| stored.len() > limit)
            {
                bail!("could not define metric: name \"{name}\" too long");
            }
            let id = {
                let mut observed = c.data().observed.lock().unwrap();
                match observed.metrics.iter().position(|m| m.name == name) {
                    Some(i) => i as u32 + 1,
                    None => {
                        observed.metrics.push(Metric {
                            name,
                            kind,
                            value: 0,
                            samples: Vec::new(),
                        });
                        observed.metrics.len() as u32
                    }
                }
            };
            abi::write_u32(&mut c, id_ptr, id)?;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_get_metric",
        |mut c: C, id: u32, ptr: u32| -> Result<u32> {
            let value = {
                let mut observed = c.data().observed.lock().unwrap();
                match observed.metric_mut(id) {
                    Some(m) if m.kind != MetricKind::Histogram => m.value,
                    Some(_) => return Ok(status::BAD_ARGUMENT),
                    None => return Ok(status::NOT_FOUND),
                }
            };
            abi::write_u64(&mut c, ptr, value as u64)?;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_record_metric",
        |c: C, id: u32, value: u64| -> Result<u32> {
            let mut observed = c.data().observed.lock().unwrap();
            let Some(m) = observed.metric_mut(id) else {
                return Ok(status::NOT_FOUND);
            };
            match m.kind {
                // Envoy: recording a counter raises it to the value (never lowers it).
                MetricKind::Counter => m.value = m.value.max(value as i64),
                MetricKind::Gauge => m.value = value as i64,
                MetricKind::Histogram => m.samples.push(value),
            }
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_increment_metric",
        |c: C, id: u32, offset: i64| -> Result<u32> {
            let mut observed = c.data().observed.lock().unwrap();
            let Some(m) = observed.metric_mut(id) else {
                return Ok(status::NOT_FOUND);
            };
            match m.kind {
                MetricKind::Counter if offset < 0 => return Ok(status::BAD_ARGUMENT),
                MetricKind::Histogram => return Ok(status::BAD_ARGUMENT),
                _ => m.value += offset,
            }
            Ok(status::OK)
        },
    )?;
    crate::wasi::link(linker)?;
    Ok(())
}

/// Checks a `proxy_http_call` against the mode's rules and queues it for the worker.
/// `Err` traps; `Ok(Err(status))` returns a status; `Ok(Ok(token))` dispatched.
fn plan_call(
    w: &mut World,
    upstream: &str,
    headers: Pairs,
    body: Vec<u8>,
    trailers: Pairs,
    timeout_ms: u32,
) -> Result<std::result::Result<u32, u32>> {
    let mode = w.mode;
    let phase = w.phase;
    if mode.dispatch_rule(phase) == DispatchRule::Trap {
        bail!("dispatch failed: bad step (dispatch_http_call is not allowed in {phase})");
    }
    let pseudo =
        |name: &str| abi::get(&headers, name).map(|v| String::from_utf8_lossy(v).into_owned());
    let (method, path, authority) = (pseudo(":method"), pseudo(":path"), pseudo(":authority"));
    let root = w.current == w.root_id;
    let mut fake_connection = None;
    let target = match mode {
        Mode::Ngx => {
            if upstream.contains("://") || upstream.contains('/') {
                bail!("dispatch failed: invalid host \"{upstream}\" (a URL is not a host:port)");
            }
            if root && mode.worker_connections_leak() {
                // A root call ngx_wasm_module cannot make returns an error status (no trap:
                // there is no request to fail), and its fake connection is never freed.
                let refused = if method.as_deref().is_none_or(str::is_empty) {
                    Some("no :method")
                } else if path.as_deref().is_none_or(str::is_empty) {
                    Some("no :path")
                } else if !ngx_port_ok(upstream) {
                    Some("invalid port")
                } else {
                    None
                };
                if let Some(why) = refused {
                    w.host_log(
                        Level::Error,
                        format!("dispatch failed: {why} (root context, \"{upstream}\")"),
                    );
                    w.sync_failures += 1;
                    return Ok(Err(status::INTERNAL_FAILURE));
                }
                match w.slots.take() {
                    Some(slot) => fake_connection = Some(slot),
                    None => {
                        let limit = w.slots.limit();
                        w.host_log(
                            Level::Error,
                            format!("{limit} worker_connections are not enough"),
                        );
                        return Ok(Err(status::INTERNAL_FAILURE));
                    }
                }
            }
            if method.is_none() {
                bail!("dispatch failed: no :method");
            }
            if path.is_none() {
                bail!("dispatch failed: no :path");
            }
            if phase == Phase::CallResponse
                && let Some(answered) = &w.call
            {
                if root
                    && mode.root_dispatch_in_call_response_crashes()
                    && answered.dispatch_status.is_none()
                {
                    w.fatal.get_or_insert((
                        ViolationKind::RootDispatchFromCallResponse,
                        "the root context dispatched inside its own on_http_call_response after a complete answer: the nginx worker crashes (SIGSEGV, HOSTS.md bug 1)".into(),
                    ));
                }
                if !root
                    && mode.dispatch_after_empty_answer_hangs()
                    && answered.request_had_body
                    && answered.body.is_empty()
                    && !body.is_empty()
                {
                    w.fatal.get_or_insert((
                        ViolationKind::DispatchAfterEmptyAnswer,
                        "an HTTP context dispatched a call with a body from on_http_call_response after an empty-bodied answer: the nginx worker spins for ever (HOSTS.md bug 2)".into(),
                    ));
                }
            }
            resolve(upstream, &w.opts.names)
        }
        Mode::Envoy => {
            let Some(addr) = w.opts.clusters.get(upstream).copied() else {
                w.host_log(
                    Level::Debug,
                    format!("http call: unknown cluster \"{upstream}\""),
                );
                return Ok(Err(status::BAD_ARGUMENT));
            };
            if method.is_none() || path.is_none() || authority.is_none() {
                return Ok(Err(status::BAD_ARGUMENT));
            }
            if w.opts.unhealthy_clusters.contains(upstream) {
                // The async client fails the request inline (no healthy host, an open circuit
                // breaker): `httpCall` returns InternalFailure and the answer is never
                // delivered (context.cc: `if (!http_request) … return InternalFailure`).
                w.host_log(
                    Level::Debug,
                    format!("http call: no healthy upstream in cluster \"{upstream}\""),
                );
                return Ok(Err(status::INTERNAL_FAILURE));
            }
            Ok(addr)
        }
    };
    let timeout = match (mode, timeout_ms) {
        (Mode::Envoy, 0) => None,
        // ngx: 0 falls back to the proxy_wasm socket time-outs (60 s by default).
        (Mode::Ngx, 0) => Some(w.opts.ngx_default_dispatch_timeout),
        (_, ms) => Some(std::time::Duration::from_millis(ms as u64)),
    };
    let token = w.next_token;
    w.next_token = w.next_token.wrapping_add(1);
    let owner = w.current;
    w.calls.insert(token, owner);
    let headers = headers
        .into_iter()
        .filter(|(k, _)| !k.starts_with(':'))
        .collect();
    w.dispatches.push(DispatchRequest {
        token,
        owner,
        target,
        method: method.unwrap_or_default(),
        path: path.unwrap_or_default(),
        authority,
        headers,
        body,
        trailers,
        timeout,
        fake_connection,
    });
    Ok(Ok(token))
}

/// ngx: whether the port of `host[:port]` is one (absent, or 1 to 65535 in digits); the
/// socket's URL parse refuses anything else at once.
fn ngx_port_ok(upstream: &str) -> bool {
    let after_host = match upstream.strip_prefix('[') {
        Some(v6) => v6.split_once(']').map(|(_, rest)| rest),
        None => Some(upstream.find(':').map_or("", |i| &upstream[i..])),
    };
    match after_host {
        None => false,
        Some("") => true,
        Some(rest) => rest.strip_prefix(':').is_some_and(|p| {
            !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && p.parse::<u16>().is_ok_and(|n| n > 0)
        }),
    }
}

/// ngx: `host:port` (no port → 80); names other than `localhost`, IP literals and the ones
/// the test declared ([`crate::HostBuilder::resolve`]) cannot be resolved here (no DNS),
/// which the call reports as `resolver failure`.
fn resolve(
    upstream: &str,
    names: &std::collections::HashMap<String, std::net::SocketAddr>,
) -> std::result::Result<std::net::SocketAddr, String> {
    if let Some(addr) = names.get(&upstream.to_ascii_lowercase()) {
        return Ok(*addr);
    }
    let (host, port) = match upstream.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !h.ends_with(':') => match p.parse::<u16>() {
            Ok(p) => (h, p),
            Err(_) => return Err("resolver failure".into()),
        },
        _ => (upstream, 80),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip = if host.eq_ignore_ascii_case("localhost") {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        host.parse().map_err(|_| "resolver failure".to_string())?
    };
    Ok(std::net::SocketAddr::new(ip, port))
}
