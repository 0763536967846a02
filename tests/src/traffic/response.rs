//! The upstream side: the response (the upstream's, the host's own, or the filter's local
//! reply) through the response callbacks to the client; the upstream exchange itself.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Body as _;
use tokio::sync::mpsc;

use super::{ReqStage, RespStage, next_chunk};
use crate::abi::{self, Pairs};
use crate::contexts::{Action, LocalResponse};
use crate::host::{Down, Event, Poster};
use crate::observed::{Level, ViolationKind};
use crate::rules::{Mode, ResponseHeadersPause};

use super::Worker;

impl Worker {
    /// envoy fail_open: the request goes through without the filter.
    pub(super) fn drive_bypass(&mut self, id: u64) {
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

    /// Sends the request upstream: `Some(body)` whole, `None` streamed as released.
    pub(super) fn start_upstream(&mut self, id: u64, body: Option<Vec<u8>>) {
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
        if let (Mode::Envoy, Some((status, details))) = (self.mode, &self.opts.local_reply_after) {
            // A filter after this one answers (RBAC, a local rate limit…): the upstream is
            // never asked; the reply goes through this filter's response callbacks.
            let (status, details) = (*status, details.clone());
            self.with_stream(id, |s| s.code_details = Some(details));
            let body = b"denied".to_vec();
            let headers = vec![
                ("content-type".to_string(), b"text/plain".to_vec()),
                (
                    "content-length".to_string(),
                    body.len().to_string().into_bytes(),
                ),
            ];
            self.synthetic_response(id, status, headers, body);
            return;
        }
        let Some(addr) = self.opts.upstream else {
            self.host_log(Level::Error, 0, "no upstream configured for the route");
            self.upstream_failed(id, true);
            return;
        };
        // ngx: the upstream connection takes a slot; with none left the request gets 500
        // (ngx_http_upstream_connect: no connection from ngx_event_connect_peer).
        let Some(slot) = self.slots.take() else {
            let limit = self.slots.limit();
            self.host_log(
                Level::Error,
                0,
                format!("{limit} worker_connections are not enough"),
            );
            self.error_response(id, 500, "");
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
            let _slot = slot;
            forward(id, addr, method, path, headers, rx, streamed, &poster).await;
        });
        if let Some(r) = self.reqs.get_mut(&id) {
            r.upstream_task = Some(task.abort_handle());
        }
    }

    pub(super) fn upstream_failed(&mut self, id: u64, refused: bool) {
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
        // Envoy's router names why it answered (`response.code_details`); nginx keeps the
        // failed upstream's 502 in `$upstream_status`.
        let details = if refused {
            "upstream_reset_before_response_started{remote_connection_failure}"
        } else {
            "upstream_reset_before_response_started{connection_termination}"
        };
        let upstream_status = (self.mode == Mode::Ngx).then_some(502);
        self.with_stream(id, |s| {
            s.code_details = Some(details.to_string());
            s.upstream_status = upstream_status;
        });
        self.synthetic_response(id, status, headers, body.as_bytes().to_vec());
    }

    /// Feeds a response the host produced itself through the response phases. The caller
    /// sets what `response.code_details` (Envoy) and `$upstream_status` (ngx) say of it;
    /// by default, neither names an upstream.
    pub(super) fn synthetic_response(
        &mut self,
        id: u64,
        status: u16,
        headers: Pairs,
        body: Vec<u8>,
    ) {
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
        self.upstream_head(id, status, headers, false);
    }

    /// The response's head. `end`: it said that no body follows, and the message ended with
    /// it (what Envoy's codec needs to raise it with end_stream).
    pub(super) fn upstream_head(&mut self, id: u64, status: u16, headers: Pairs, end: bool) {
        let Some(r) = self.reqs.get_mut(&id) else {
            return;
        };
        if r.resp_stage != RespStage::Waiting {
            return;
        }
        if end {
            r.upstream_done = true;
            r.upstream_ended_with_head = true;
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
        let from_upstream = !r.local;
        self.with_stream(id, |s| {
            s.response_headers = pairs;
            s.response_started = true;
            if from_upstream {
                s.code_details = Some("via_upstream".into());
                s.upstream_status = Some(status);
            }
        });
        if !self.alive(id) {
            self.fail_dead(id);
            return;
        }
        let r = self.reqs.get_mut(&id).unwrap();
        // The response phases have begun (a local response now replaces this one).
        r.resp_stage = RespStage::Body;
        let ctx = r.ctx;
        // No body follows: Content-Length 0, a head that ended the upstream's message (a 204),
        // or a local reply without a body.
        let bodyless = (r.resp_content_length == Some(0) || r.upstream_ended_with_head || r.local)
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
    pub(super) fn send_response_head(&mut self, id: u64) {
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

    pub(super) fn send_head(&mut self, id: u64, status: u16, empty_reason: bool, headers: Pairs) {
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

    pub(super) fn send_body(&mut self, id: u64, data: Vec<u8>) {
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

    pub(super) fn step_response(&mut self, id: u64) -> bool {
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

    pub(super) fn step_response_body(&mut self, id: u64) -> bool {
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

    /// A local response the filter asked for.
    pub(super) fn local_response(&mut self, id: u64, local: LocalResponse) {
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
        // Envoy: the details the filter passed (empty spaces replaced); never `via_upstream`.
        let details = local.details.replace(' ', "_");
        self.with_stream(id, |s| s.code_details = Some(details));
        self.synthetic_response(id, status, headers, body);
    }

    /// A response the host sends without the filter (trap, buffer limits): no more
    /// callbacks except the end ones.
    pub(super) fn error_response(&mut self, id: u64, status: u16, body: &str) {
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
    pub(super) fn fail_dead(&mut self, id: u64) {
        let status = self.mode.trap_status();
        self.error_response(id, status, "");
    }
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
    let _conn = crate::client::Closer::spawn(conn);
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
    // Envoy's HTTP/1 codec raises the head of a response without a body only once the
    // message is complete, with end_stream set (`deferred_end_stream_headers_` in
    // http1/codec_impl.cc): whether the filter sees end_of_stream on a `Content-Length: 0`
    // response must not depend on when the end is read.
    let end = response.body().is_end_stream();
    poster.post(Event::UpstreamHead {
        id,
        status,
        headers: pairs,
        end,
    });
    if end {
        return poster.post(Event::UpstreamEnd { id });
    }
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
