//! The HTTP context: a thin sequencing of the pure modules over the proxy-wasm callbacks.
//!
//! Request: key → scope → body (fingerprint) → allocate (request paused) → proceed, replay,
//! 409, 422 or per `on_server_error`. Response: copy as it passes (always `Continue`) → at
//! the end record or release, inline (Envoy: the end of the response is held until the call
//! answers) or through the queue (Kong, and wherever a call could not be made inline).
//!
//! Where each host call is made (HOSTS.md):
//! - `dispatch_http_call` from this context only in `on_http_request_headers` and
//!   `on_http_request_body` of a request that is then paused on it, so the call always
//!   answers before the request can end; in response phases only when [`crate::host::inline`]
//!   says so (never on Kong); never from `on_http_call_response` (on Kong a dispatch there
//!   after an empty-bodied answer hangs the worker, HOSTS.md bug 2: `conflict: wait` sends its
//!   one allocation with `wait_ms` from the start).
//! - `send_http_response` only in request phases and `on_http_call_response`; the response
//!   callbacks of a local reply only apply the fix-ups of [`crate::replay`].
//!
//! Every call of a request carries its trace context and id ([`CallContext`]); each decision on a
//! keyed request is one line at info naming the key by its digest only (never the key, a
//! token or a body), the details at debug.

use std::cell::OnceCell;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, LogLevel, MapType};

use crate::capture::{self, CaptureBuf, End};
use crate::config::{Config, Conflict, OnServerError};
use crate::decision::{self, Allocation, CallAnswer, CallContext};
use crate::fingerprint::Fingerprint;
use crate::host::{self, BodyPlan, Host};
use crate::key;
use crate::metrics::Metric;
use crate::pairs;
use crate::problem::{self, Kind};
use crate::queue::{Class, Entry, Op, classify};
use crate::replay::{self, HeaderOp, LocalReply};
use crate::scope::{self, ScopeInput};
use crate::shared::{
    Endpoint, call_backend, count, enqueue, header_map, log, log_parts, logs, now_ms,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not handled (other method, no key, passed on error): every callback continues.
    Idle,
    /// Hashing the request body until its end.
    ReadingBody,
    /// The allocate call is in flight.
    Allocating,
    /// Holding the lease: the upstream's response is copied as it passes.
    Proxying,
    /// The record/release call is in flight inline, the end of the response held.
    Inline,
    /// The key's end (record or release) was handed over; the response passes.
    Done,
    /// The filter answered itself; the response callbacks apply the fix-ups.
    LocalReply,
}

pub struct Http {
    cfg: Option<Rc<Config>>,
    host: Host,
    phase: Phase,
    key: String,
    /// What names this request in its log lines ([`Http::about`]): built once, on the first
    /// line, after the key and the request id are known.
    about: OnceCell<String>,
    fingerprint: Option<Fingerprint>,
    content_length: Option<u64>,
    /// Request body bytes seen, and how many of the host's buffer were hashed.
    body_total: u64,
    body_hashed: usize,
    lease: Option<String>,
    capture: Option<CaptureBuf>,
    /// The inline call's operation and body, re-queued if the request ends before it answers.
    inline_call: Option<(Op, Vec<u8>)>,
    reply: Option<LocalReply>,
    reply_out: usize,
    /// The request's trace context and id, passed on with its calls.
    context: CallContext,
}

impl Http {
    pub fn new(cfg: Option<Rc<Config>>) -> Http {
        Http {
            cfg,
            host: Host::Unknown,
            phase: Phase::Idle,
            key: String::new(),
            about: OnceCell::new(),
            fingerprint: None,
            content_length: None,
            body_total: 0,
            body_hashed: 0,
            lease: None,
            capture: None,
            inline_call: None,
            reply: None,
            reply_out: 0,
            context: CallContext::default(),
        }
    }

    // ----- logs -----

    /// `; key=<digest> request_id=<id>`: what names this request in a log line (the key only
    /// by its digest, the one the backend logs), or nothing. Built once, on the first line.
    fn about(&self) -> &str {
        self.about.get_or_init(|| {
            let id_len = self.context.request_id.as_ref().map_or(0, String::len);
            let mut about = String::with_capacity(32 + id_len);
            if !self.key.is_empty() {
                about.push_str("; key=");
                about.push_str(&idempotency_spec::key_digest(&self.key));
            }
            if let Some(id) = &self.context.request_id {
                about.push_str(if about.is_empty() { "; " } else { " " });
                about.push_str("request_id=");
                about.push_str(id);
            }
            about
        })
    }

    /// One line at `level` about this request, when the host keeps it.
    fn note(&self, level: LogLevel, what: &str) {
        self.note_parts(level, &[what]);
    }

    /// [`Http::note`] of a line made of `parts`.
    fn note_parts(&self, level: LogLevel, parts: &[&str]) {
        if logs(level) {
            log_parts(level, parts, self.about());
        }
    }

    // ----- local replies -----

    fn send_reply(&mut self, reply: LocalReply) -> Action {
        let headers: Vec<(&str, &str)> = reply
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        if let Err(e) =
            hostcalls::send_http_response(u32::from(reply.status), headers, Some(&reply.body))
        {
            log(
                LogLevel::Error,
                &format!("send_http_response failed (status {})", e as u32),
            );
        }
        self.phase = Phase::LocalReply;
        self.reply = Some(reply);
        self.reply_out = 0;
        Action::Pause
    }

    fn send_problem(&mut self, kind: Kind, detail: &str, retry_after: Option<&str>) -> Action {
        self.send_reply(problem::answer(kind, detail, retry_after))
    }

    fn server_error(&mut self, cfg: &Config, reason: &str) -> Action {
        match cfg.on_server_error {
            OnServerError::Reject => {
                self.note(
                    LogLevel::Warn,
                    &format!("backend error, answering 503: {reason}"),
                );
                count(Metric::ServerError);
                self.send_problem(
                    Kind::ServerError,
                    "the idempotency backend could not be reached; retry later with the same key",
                    None,
                )
            }
            OnServerError::Pass => {
                self.note(
                    LogLevel::Warn,
                    &format!("backend error, forwarding without idempotency: {reason}"),
                );
                count(Metric::PassedOnError);
                self.phase = Phase::Idle;
                Action::Continue
            }
        }
    }

    // ----- request path -----

    fn on_request_headers(&mut self, cfg: &Config, end_of_stream: bool) -> Action {
        self.host = crate::shared::host();
        // Most requests are of another method or carry no key: those are decided from two or
        // three single-header lookups (each host answers a lookup with the first value of
        // that name, case-insensitively), and the whole header map is read for keyed ones only.
        let Some(method) = header_value(":method")
            .filter(|m| std::str::from_utf8(m).is_ok_and(|m| cfg.applies_to(m)))
        else {
            return Action::Continue;
        };
        let method = method.as_slice();
        if header_value(&cfg.header).is_none() {
            if !cfg.require_key {
                // A gRPC request without a key counts as one without a key: untouched either
                // way.
                count(Metric::NoKey);
                if logs(LogLevel::Debug) {
                    // The whole line as one literal: `log` would copy it behind its prefix,
                    // about 420 instructions, a seventh of an unkeyed request, wherever debug
                    // lines are built (on Kong, always).
                    let _ =
                        hostcalls::log(LogLevel::Debug, "idempotency: no key: passed untouched");
                }
                return Action::Continue;
            }
            if is_grpc(header_value("content-type").as_deref()) {
                return self.grpc();
            }
            let raw = header_map(MapType::HttpRequestHeaders);
            let headers = pairs::parse(&raw).unwrap_or_default();
            self.context = CallContext::of(|name| pairs::get(&headers, name));
            count(Metric::MissingKey);
            self.note(LogLevel::Info, "missing key: 400");
            let detail = format!("this request requires an {} header", cfg.header);
            return self.send_problem(Kind::MissingKey, &detail, None);
        }
        // As bytes: nothing a client sends may make the filter panic (see `pairs`).
        let raw = header_map(MapType::HttpRequestHeaders);
        let headers = pairs::parse(&raw).unwrap_or_default();
        let get = |name: &str| pairs::get(&headers, name);
        self.context = CallContext::of(get);
        let content_type = get("content-type");
        if is_grpc(content_type) {
            return self.grpc();
        }
        let mut values = headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(cfg.header.as_bytes()))
            .map(|(_, v)| *v);
        let raw = match (values.next(), values.next()) {
            (Some(one), None) => one,
            // The lookup found a value the map does not list: no host does that.
            (None, _) => return Action::Continue,
            (Some(_), Some(_)) => {
                count(Metric::InvalidKey);
                self.note(LogLevel::Info, "invalid key (repeated header): 400");
                let detail = format!("the {} header is repeated", cfg.header);
                return self.send_problem(Kind::InvalidKey, &detail, None);
            }
        };
        let client_key = match key::parse(raw) {
            Ok(k) => k,
            Err(e) => {
                count(Metric::InvalidKey);
                self.note(LogLevel::Info, "invalid key: 400");
                return self.send_problem(Kind::InvalidKey, e.detail(), None);
            }
        };
        let path = get(":path").unwrap_or(b"/");
        let host_name = get("host").or_else(|| get(":authority")).unwrap_or(b"");
        let digest = scope::digest(
            cfg.scope.route,
            &cfg.scope.headers,
            &ScopeInput {
                method,
                host: host_name,
                path,
                headers: &headers,
            },
        );
        self.key = key::backend_key(&digest, &client_key);
        self.content_length = get("content-length").and_then(pairs::number);
        if self
            .content_length
            .is_some_and(|cl| cl > cfg.max_request_body_bytes)
        {
            return self.too_large(cfg);
        }
        if !cfg.fingerprint {
            // Nothing to read: the body's size is bounded by its Content-Length only.
            return self.allocate(cfg);
        }
        let body_expected = if self.host == Host::Ngx {
            // ngx_wasm_module passes end_of_stream = 1 to on_request_headers whatever follows
            // (NGX_HTTP_PROXY_WASM_EOF in ngx_http_proxy_wasm.c), and calls on_request_body
            // only for a non-empty body: decide from the framing headers. A body of unknown
            // length may be empty, and then no callback would come before the upstream is
            // asked: refuse it rather than let it pass unallocated (README, Problems).
            if self.content_length.is_none() && get("transfer-encoding").is_some() {
                count(Metric::LengthRequired);
                self.note(LogLevel::Info, "body of unknown length: 411");
                return self.send_problem(
                    Kind::LengthRequired,
                    "send this request with a Content-Length: on this gateway a body of unknown length cannot be fingerprinted before it is forwarded",
                    None,
                );
            }
            self.content_length.is_some_and(|cl| cl > 0)
        } else {
            !end_of_stream
        };
        // One fingerprint begun per request: each is a SHA-256 whose first block is hashed as
        // soon as its fields pass 64 bytes (a path and a `Content-Type` of the usual lengths).
        if !body_expected {
            self.fingerprint = Some(Fingerprint::new(method, path, content_type));
            return self.allocate(cfg);
        }
        match host::body_plan(self.host, cfg.envoy_body) {
            BodyPlan::FromHeaders => {
                // Envoy would hold the body back while the headers wait for the allocation:
                // the fingerprint stands on what the headers say of the body.
                self.fingerprint = Some(Fingerprint::without_body(
                    method,
                    path,
                    content_type,
                    self.content_length,
                ));
                self.allocate(cfg)
            }
            BodyPlan::Read { pause_headers } => {
                self.fingerprint = Some(Fingerprint::new(method, path, content_type));
                self.phase = Phase::ReadingBody;
                if pause_headers {
                    Action::Pause
                } else {
                    Action::Continue
                }
            }
        }
    }

    /// A gRPC answer ends in trailers (grpc-status) that a capture does not keep, and Envoy
    /// turns any local reply to a gRPC request into a trailers-only one: a replay could not be
    /// exact, so the request passes untouched.
    fn grpc(&mut self) -> Action {
        count(Metric::Grpc);
        self.note(LogLevel::Debug, "gRPC: passed untouched");
        Action::Continue
    }

    fn too_large(&mut self, cfg: &Config) -> Action {
        count(Metric::TooLarge);
        self.note(LogLevel::Info, "body too large: 413");
        let detail = format!(
            "the request body is larger than this route's limit of {} bytes",
            cfg.max_request_body_bytes
        );
        self.send_problem(Kind::BodyTooLarge, &detail, None)
    }

    /// Kong: nginx spooled the body to a temporary file, which a filter cannot read.
    fn spooled(&mut self, cfg: &Config) -> Action {
        count(Metric::TooLarge);
        self.note(LogLevel::Info, "body spooled to a file by the host: 413");
        let detail = problem::spooled_detail(cfg.max_request_body_bytes);
        self.send_problem(Kind::BodySpooled, &detail, None)
    }

    fn on_request_body(&mut self, cfg: &Config, size: usize, end_of_stream: bool) -> Action {
        // Kong: nginx spooled the body to a file; the filter sees it empty (HOSTS.md).
        if size == 0
            && end_of_stream
            && self.body_total == 0
            && self.content_length.is_some_and(|cl| cl > 0)
        {
            return self.spooled(cfg);
        }
        // The host's buffer holds what was paused on before (Envoy) plus the new bytes.
        let (start, new) = if size >= self.body_hashed {
            (self.body_hashed, size - self.body_hashed)
        } else {
            (0, size)
        };
        self.body_total = self.body_total.saturating_add(new as u64);
        if self.body_total > cfg.max_request_body_bytes {
            return self.too_large(cfg);
        }
        if new > 0 {
            let bytes = hostcalls::get_buffer(BufferType::HttpRequestBody, start, new)
                .ok()
                .flatten()
                .unwrap_or_default();
            if bytes.len() != new {
                // ngx_wasm_module: the body is in nginx's temporary file; the host reports
                // its size but serves no bytes ("cannot read request body buffered to file").
                return self.spooled(cfg);
            }
            if let Some(fp) = self.fingerprint.as_mut() {
                fp.update(&bytes);
            }
            self.body_hashed = start.saturating_add(new);
        }
        if !end_of_stream {
            // Envoy: StopIterationAndBuffer until the end (Kong delivers it whole).
            return Action::Pause;
        }
        self.allocate(cfg)
    }

    /// The one allocation of this request. With `conflict: wait` it already asks the backend
    /// to wait for a holder of the key (`wait_ms`), so that a 409 is final and nothing is sent
    /// again from its answer; its time-out grows by the wait.
    fn allocate(&mut self, cfg: &Config) -> Action {
        let wait = cfg.conflict == Conflict::Wait;
        let fingerprint = self.fingerprint.take().map(Fingerprint::finish);
        let body =
            decision::allocate_body(cfg, &self.key, fingerprint.as_ref().map(|f| &f[..]), wait);
        let timeout = cfg.server.timeout_ms + if wait { cfg.wait_ms } else { 0 };
        match call_backend(
            &cfg.server,
            "PUT",
            Endpoint::Captures,
            &body,
            timeout,
            &self.context,
        ) {
            Ok(_) => {
                self.note(
                    LogLevel::Debug,
                    if wait {
                        "allocating, waiting for a holder (conflict: wait)"
                    } else {
                        "allocating"
                    },
                );
                self.phase = Phase::Allocating;
                Action::Pause
            }
            Err(e) => self.server_error(
                cfg,
                &format!("allocate dispatch failed (status {})", e as u32),
            ),
        }
    }

    fn on_allocated(&mut self, cfg: &Config, answer: &CallAnswer) -> Action {
        match decision::allocation(answer) {
            Allocation::Proceed { lease_token } => {
                count(Metric::Allocated);
                self.note(LogLevel::Info, "allocated: to the upstream");
                self.lease = Some(lease_token);
                self.phase = Phase::Proxying;
                Action::Continue
            }
            Allocation::Replay(capture) => {
                match replay::from_capture(&capture, &cfg.strip_on_replay, &cfg.replay_header) {
                    Ok(reply) => {
                        // The backend says whether it waited for the first request (with
                        // `conflict: wait`), or the key was already completed.
                        count(if answer.waited {
                            Metric::Waited
                        } else {
                            Metric::Replayed
                        });
                        let what = if answer.waited {
                            "waited for the first request, replayed: "
                        } else {
                            "replayed: "
                        };
                        self.note_parts(LogLevel::Info, &[what, &reply.status.to_string()]);
                        self.send_reply(reply)
                    }
                    Err(e) => {
                        self.server_error(cfg, &format!("stored capture unusable: {}", e.as_str()))
                    }
                }
            }
            Allocation::Conflict { retry_after } => {
                // With `conflict: wait` the backend already waited `wait_ms` for the holder.
                count(Metric::Conflict);
                self.note(LogLevel::Info, "in flight elsewhere: 409");
                let ra = problem::retry_after(retry_after.as_deref());
                self.send_problem(
                    Kind::Conflict,
                    "another request with this idempotency key is in progress; retry after it completes",
                    Some(&ra),
                )
            }
            Allocation::Mismatch => {
                count(Metric::Mismatch);
                self.note(LogLevel::Info, "used with another request: 422");
                self.send_problem(
                    Kind::Mismatch,
                    "this idempotency key was already used with a different request",
                    None,
                )
            }
            Allocation::ServerError(reason) => self.server_error(cfg, &reason),
        }
    }

    // ----- response path -----

    /// The end of the response (or of the request): record or release, once.
    fn finish(&mut self, cfg: &Config, complete: bool, may_hold: bool) -> Action {
        if self.phase != Phase::Proxying {
            return Action::Continue;
        }
        self.phase = Phase::Done;
        // Nothing of the request needs its lease after this.
        let Some(lease) = self.lease.take() else {
            return Action::Continue;
        };
        let copy = self.capture.take();
        let end = capture::at_end(copy.as_ref(), complete, &cfg.store_status);
        let (op, body) = match (end, copy) {
            (End::Record, Some(c)) => (Op::Record, c.record_body(&self.key, &lease)),
            (End::Release(reason), _) => {
                self.note_parts(LogLevel::Debug, &["releasing: ", reason.as_str()]);
                (Op::Release, capture::release_body(&self.key, &lease))
            }
            (End::Record, None) => (Op::Release, capture::release_body(&self.key, &lease)),
        };
        if may_hold
            && host::inline(cfg.record, self.host)
            && call_backend(
                &cfg.server,
                op.method(),
                Endpoint::Captures,
                &body,
                cfg.server.timeout_ms,
                &self.context,
            )
            .is_ok()
        {
            self.note_parts(LogLevel::Debug, &[op.name(), ": sent inline"]);
            self.phase = Phase::Inline;
            self.inline_call = Some((op, body));
            return Action::Pause;
        }
        self.note_parts(LogLevel::Debug, &[op.name(), ": queued"]);
        enqueue(
            Entry::new(
                op,
                cfg.server.clone(),
                body,
                cfg.queue.max_attempts,
                now_ms(),
            )
            .for_request(self.context.clone()),
            &cfg.queue,
        );
        Action::Continue
    }

    fn on_inline_answer(&mut self, cfg: &Config, answer: &CallAnswer) {
        self.phase = Phase::Done;
        let Some((op, body)) = self.inline_call.take() else {
            return;
        };
        match classify(answer.status, false) {
            Class::Done => {
                count(if op == Op::Record {
                    Metric::Recorded
                } else {
                    Metric::Released
                });
                self.note_parts(LogLevel::Debug, &[op.name(), ": done"]);
            }
            Class::Fail => {
                count(Metric::RecordFailed);
                self.note(
                    LogLevel::Warn,
                    &format!("{} refused: {}", op.name(), answer.describe()),
                );
            }
            // The inline send was the first attempt.
            Class::Retry => {
                self.note(
                    LogLevel::Debug,
                    &format!("{}: {}, queued again", op.name(), answer.describe()),
                );
                requeue_inline(cfg, op, body, 1, self.context.clone());
            }
        }
        let _ = hostcalls::resume_http_response();
    }

    fn reply_headers(&mut self) {
        let Some(reply) = self.reply.as_ref() else {
            return;
        };
        let raw = header_map(MapType::HttpResponseHeaders);
        let present = pairs::lossy(&pairs::parse(&raw).unwrap_or_default());
        for op in replay::header_fixups(&present, reply) {
            let _ = match op {
                HeaderOp::Remove(n) => {
                    hostcalls::remove_map_value(MapType::HttpResponseHeaders, &n)
                }
                HeaderOp::Add(n, v) => {
                    hostcalls::add_map_value(MapType::HttpResponseHeaders, &n, &v)
                }
            };
        }
    }

    fn reply_body(&mut self, size: usize, end_of_stream: bool) {
        let Some(reply) = self.reply.as_ref() else {
            return;
        };
        let chunk = if size > 0 {
            hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size)
                .ok()
                .flatten()
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let (replacement, out) =
            replay::body_fixup(&chunk, self.reply_out, end_of_stream, &reply.body);
        self.reply_out = out;
        if let Some(bytes) = replacement {
            let _ = hostcalls::set_buffer(BufferType::HttpResponseBody, 0, size, &bytes);
        }
    }
}

/// A request header's (first) value, as bytes.
fn header_value(name: &str) -> Option<Vec<u8>> {
    hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()
}

/// `application/grpc`, `application/grpc+proto`… (any case).
fn is_grpc(content_type: Option<&[u8]>) -> bool {
    content_type.is_some_and(|ct| {
        ct.get(..16)
            .is_some_and(|p| p.eq_ignore_ascii_case(b"application/grpc"))
    })
}

/// Queues an inline record or release again, for the tick: it may have been applied already
/// (its answer was lost, or its request ended first), so a 403 then means done. `attempts`:
/// the sends it counts as made.
fn requeue_inline(cfg: &Config, op: Op, body: Vec<u8>, attempts: u32, context: CallContext) {
    let mut e = Entry::new(
        op,
        cfg.server.clone(),
        body,
        cfg.queue.max_attempts,
        now_ms(),
    )
    .for_request(context);
    e.attempts = attempts;
    e.tolerate_403 = true;
    enqueue(e, &cfg.queue);
}

impl Context for Http {
    fn on_http_call_response(
        &mut self,
        _token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let Some(cfg) = self.cfg.clone() else {
            return;
        };
        let raw = header_map(MapType::HttpCallResponseHeaders);
        let headers = pairs::parse(&raw).unwrap_or_default();
        let body = if body_size > 0 {
            hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                .ok()
                .flatten()
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let answer = CallAnswer::from_headers(&headers, body);
        match self.phase {
            Phase::Allocating => {
                let next = self.on_allocated(&cfg, &answer);
                if next == Action::Continue {
                    let _ = hostcalls::resume_http_request();
                }
            }
            Phase::Inline => self.on_inline_answer(&cfg, &answer),
            _ => {}
        }
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(cfg) = self.cfg.clone() else {
            return Action::Continue;
        };
        if self.phase != Phase::Idle {
            return Action::Continue;
        }
        self.on_request_headers(&cfg, end_of_stream)
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        let Some(cfg) = self.cfg.clone() else {
            return Action::Continue;
        };
        match self.phase {
            Phase::ReadingBody => self.on_request_body(&cfg, size, end_of_stream),
            // A local reply was sent from the headers: hold the body back.
            Phase::LocalReply => Action::Pause,
            _ => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(cfg) = self.cfg.clone() else {
            return Action::Continue;
        };
        match self.phase {
            Phase::LocalReply => {
                self.reply_headers();
                Action::Continue
            }
            Phase::Proxying => {
                let raw = header_map(MapType::HttpResponseHeaders);
                let headers = pairs::parse(&raw).unwrap_or_default();
                let status = pairs::status(&headers);
                if let Some(status) = status {
                    let mut capture =
                        CaptureBuf::from_pairs(status, &headers, cfg.max_capture_bytes);
                    if !self.host.from_upstream() {
                        capture.not_from_upstream();
                    }
                    self.capture = Some(capture);
                }
                // ngx_wasm_module passes end_of_stream = 1 here whatever follows: only
                // Envoy's flag means that no body comes.
                if end_of_stream && self.host.response_headers_eos_means_no_body() {
                    return self.finish(&cfg, true, true);
                }
                Action::Continue
            }
            _ => Action::Continue,
        }
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        let Some(cfg) = self.cfg.clone() else {
            return Action::Continue;
        };
        match self.phase {
            Phase::LocalReply => {
                self.reply_body(size, end_of_stream);
                Action::Continue
            }
            Phase::Proxying => {
                if let Some(c) = self.capture.as_mut()
                    && size > 0
                {
                    if c.overflow() {
                        c.skip(size);
                    } else {
                        match hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size) {
                            Ok(Some(bytes)) if bytes.len() == size => c.push(&bytes),
                            _ => c.lost(size),
                        }
                    }
                }
                if end_of_stream {
                    return self.finish(&cfg, true, true);
                }
                Action::Continue
            }
            _ => Action::Continue,
        }
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        let Some(cfg) = self.cfg.clone() else {
            return Action::Continue;
        };
        // Trailers end the response (Envoy: the last body callback had no end of stream).
        self.finish(&cfg, true, true)
    }

    fn on_log(&mut self) {
        let Some(cfg) = self.cfg.clone() else {
            return;
        };
        match self.phase {
            // No end of stream: complete only if Content-Length bytes went by. No call from
            // here (Kong traps): the queue sends it.
            Phase::Proxying => {
                let _ = self.finish(&cfg, false, false);
            }
            // The request ended while the inline call was in flight (client gone): the host
            // may cancel it; queue it again, a 403 then meaning it was applied after all.
            Phase::Inline => {
                if let Some((op, body)) = self.inline_call.take() {
                    requeue_inline(&cfg, op, body, 0, self.context.clone());
                }
                self.phase = Phase::Done;
            }
            _ => {}
        }
    }
}
