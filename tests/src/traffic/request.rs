//! The client side of a request: from its client, through the request callbacks, to the
//! upstream (ngx: once the body is read whole; envoy: as soon as the headers continue).

use std::net::SocketAddr;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{Req, ReqStage, RespStage, next_chunk};
use crate::abi::{self, Pairs};
use crate::contexts::{Action, StreamData};
use crate::host::Down;
use crate::observed::Level;
use crate::rules::Mode;

use super::Worker;

impl Worker {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn client_request(
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
        // ngx: a trapped instance is replaced by the next request; Envoy FAIL_RELOAD: a failed
        // VM by the first request after the backoff.
        let trapped = self.vm.as_ref().is_none_or(|vm| vm.trapped);
        let fresh = match self.mode {
            Mode::Ngx => trapped,
            Mode::Envoy => trapped && self.reload_at.is_some_and(|at| self.now_ns >= at),
        };
        if fresh {
            self.failed = false;
            self.reload_at = None;
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
        let bypass =
            self.failed && self.opts.failure_policy() == crate::rules::FailurePolicy::FailOpen;
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
                upstream_ended_with_head: false,
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
    pub(super) fn request_pairs(
        &self,
        method: &str,
        path: &str,
        headers: Pairs,
        local: SocketAddr,
    ) -> Pairs {
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

    /// One step of the request side; true when something changed.
    pub(super) fn step_request(&mut self, id: u64) -> bool {
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
                    // Envoy keeps calling the filter with body data while it buffers the body
                    // (StopIterationAndBuffer), and while it holds the headers only with
                    // allow_on_headers_stop_iteration: a Pause in the headers is otherwise
                    // StopAllIterationAndWatermark, the body waits (buffered) for the resume.
                    let r = self.reqs.get(&id).unwrap();
                    let held = r.req_stage == ReqStage::PausedHeaders
                        && self.mode.pause_in_request_headers_stops_body(
                            self.opts.allow_on_headers_stop_iteration,
                        );
                    return self.mode == Mode::Envoy && !held && self.step_request_body(id);
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
    pub(super) fn headers_continued(&mut self, id: u64) {
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
    pub(super) fn body_continued(&mut self, id: u64) {
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

    pub(super) fn step_request_body(&mut self, id: u64) -> bool {
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
}
