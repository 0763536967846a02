//! The HTTP API: the routes (all of them, here), the handlers, the body extractor and the
//! bearer-token check.
//!
//! A request goes: [`observe`] (its span, its log line, the HTTP request counter) → (for
//! `/api/*`) bearer token → [`Payload`] (body limit, JSON object, fields) → the handler's range
//! checks and key check → the store (through [`crate::wait`] for `wait_ms`) → an answer, or an
//! [`ApiError`] rendered as a problem. Each handler counts its outcome and its latency
//! ([`crate::metrics`]) and tells `observe` the outcome ([`Told`]) for the log line and the span.

use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, FailedToBufferBody};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use idempotency_spec as spec;
use serde::Serialize;
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq;
use tracing::Instrument as _;

use crate::error::ApiError;
use crate::metrics::{Allocation, Label as _, Metrics, Operation, Recording, Releasing};
use crate::store::{
    self, AllocateOutcome, BatchOp, BatchOutcome, RecordOutcome, ReleaseOutcome, Store, UnixMillis,
    now_ms,
};
use crate::wait::{self, Waiters};

/// Where the metrics are served (open, like `/-/ping`).
pub const METRICS_PATH: &str = "/metrics";

/// The published contract, served at `GET /openapi.yaml`.
pub const OPENAPI_YAML: &str = include_str!("../../spec/openapi.yaml");

/// The service's rules, from the configuration.
#[derive(Debug, Clone)]
pub struct Policy {
    pub default_lease: Duration,
    pub max_lease: Duration,
    pub retention: Duration,
    pub body_limit: usize,
    pub api_token: Option<String>,
}

/// What every handler shares, behind one `Arc`: the `State` extractor clones it for every
/// request, and one reference count is cheaper than one per field.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

pub struct Shared {
    pub store: Arc<dyn Store>,
    pub waiters: Arc<Waiters>,
    pub policy: Arc<Policy>,
    pub metrics: Arc<Metrics>,
}

impl AppState {
    pub fn new(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// Every route of the service.
pub fn router(state: AppState) -> Router {
    // The captures routes check the bearer token through their `Authorized` argument.
    let captures = axum::routing::put(allocate).post(record).delete(release);
    Router::new()
        .route(spec::CAPTURES_PATH, captures)
        .route(spec::BATCH_PATH, axum::routing::post(batch))
        .route("/-/ping", get(ping))
        .route("/-/ready", get(ready))
        .route("/openapi.yaml", get(openapi))
        .route(METRICS_PATH, get(metrics))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(state.policy.body_limit))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// A JSON body: read within the body limit (413), a JSON object (400 "Malformed payload"),
/// deserialized into `T` (400 naming the field). Unknown fields are ignored, and no
/// `Content-Type` is required: the old clients do not always send one.
pub struct Payload<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for Payload<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        // A Content-Length over the limit is refused at once: the limit below only counts the
        // bytes as they come, so the answer would wait for a body that cannot be taken.
        let announced = axum::body::HttpBody::size_hint(request.body()).lower();
        if usize::try_from(announced).map_or(true, |n| n > state.policy.body_limit) {
            return Err(ApiError::PayloadTooLarge {
                limit: state.policy.body_limit,
            });
        }
        let bytes =
            Bytes::from_request(request, state)
                .await
                .map_err(|rejection| match rejection {
                    BytesRejection::FailedToBufferBody(FailedToBufferBody::LengthLimitError(_)) => {
                        ApiError::PayloadTooLarge {
                            limit: state.policy.body_limit,
                        }
                    }
                    // The client was too slow (`--body-read-timeout`): not a malformed body.
                    other => match crate::http::body_timeout(&other) {
                        Some(limit) => ApiError::RequestTimeout { limit },
                        None => ApiError::MalformedPayload(Some(other.body_text())),
                    },
                })?;
        // serde would take a JSON array for a struct, field by field: refuse anything but an
        // object first.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiError::MalformedPayload(None));
        }
        serde_json::from_slice(&bytes)
            .map(Payload)
            .map_err(malformed)
    }
}

/// A body that did not deserialize: 400, naming the field when serde can.
fn malformed(e: serde_json::Error) -> ApiError {
    match e.classify() {
        serde_json::error::Category::Data => ApiError::MalformedPayload(Some(
            // Without serde's " at line 1 column 42": the field is what matters.
            e.to_string()
                .split(" at line ")
                .next()
                .unwrap_or_default()
                .to_owned(),
        )),
        _ => ApiError::MalformedPayload(None),
    }
}

fn check_key(key: &str) -> Result<(), ApiError> {
    if spec::is_valid_key(key) {
        Ok(())
    } else {
        Err(ApiError::MalformedKey)
    }
}

fn out_of_range(message: String) -> ApiError {
    ApiError::MalformedPayload(Some(message))
}

/// An RFC 3339 instant with milliseconds, UTC.
fn rfc3339(at: UnixMillis) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(at)).to_string()
}

/// Seconds until `at`, rounded up, at least 1: what `Retry-After` says.
fn retry_after_secs(at: UnixMillis, now: UnixMillis) -> u64 {
    at.saturating_sub(now).div_ceil(1000).max(1)
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    // Room for the common answers (an allocation's is about 90 bytes), instead of the four
    // reallocations of a Vec that starts empty.
    let mut bytes = Vec::with_capacity(128);
    serde_json::to_writer(&mut bytes, body).expect("an answer always encodes");
    json_bytes(status, bytes)
}

/// A JSON answer already written.
fn json_bytes(status: StatusCode, bytes: Vec<u8>) -> Response {
    let mut response = (status, bytes).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A replay's answer: byte for byte what `json` writes for a [`spec::CaptureRecord`] without
/// a lease token, but written here. serde_json looks at each byte of a string for one to
/// escape, and for the body, which is base64 (never escaped) and most of the answer, that
/// loop was the largest single cost of a replay in a profile (bench/experiments.md), growing with
/// the body. A string with nothing to escape is copied whole (the check below runs on whole
/// blocks); any other goes through serde_json.
fn replay_json(key: &str, capture: &spec::Capture) -> Vec<u8> {
    // The key and the body, and room for the rest (a few headers) before the Vec must grow.
    let mut out = Vec::with_capacity(key.len() + capture.response_body.len() + 256);
    out.extend_from_slice(b"{\"idempotency_key\":");
    json_string(&mut out, key);
    out.extend_from_slice(b",\"response\":{\"response_status\":");
    serde_json::to_writer(&mut out, &capture.response_status).expect("a number always encodes");
    out.extend_from_slice(b",\"response_body\":");
    json_string(&mut out, &capture.response_body);
    out.extend_from_slice(b",\"response_headers\":[");
    for (i, header) in capture.response_headers.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"key\":");
        json_string(&mut out, &header.key);
        out.extend_from_slice(b",\"value\":");
        match &header.value {
            spec::HeaderValue::One(value) => json_string(&mut out, value),
            spec::HeaderValue::Many(values) => {
                out.push(b'[');
                for (i, value) in values.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    json_string(&mut out, value);
                }
                out.push(b']');
            }
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"]}}");
    out
}

/// `s` as a JSON string, as serde_json writes it.
fn json_string(out: &mut Vec<u8>, s: &str) {
    // What serde_json escapes: control characters, the quote and the backslash (nothing else,
    // not even DEL or non-ASCII). Folded without a branch over blocks of 32 bytes, which the
    // compiler turns into vector instructions.
    let escapes = s.as_bytes().chunks(32).any(|block| {
        block.iter().fold(false, |any, &b| {
            any | (b < 0x20) | (b == b'"') | (b == b'\\')
        })
    });
    if escapes {
        serde_json::to_writer(&mut *out, s).expect("a string always encodes");
    } else {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

/// What a handler tells [`observe`] about its answer, for the request's log line and span.
#[derive(Clone, Debug)]
pub struct Told {
    /// The outcome's label, as counted (`allocated`, `replayed`, `stored`, ...).
    pub outcome: &'static str,
    /// The key the request named: shown only as its digest ([`spec::key_digest`]), computed
    /// when a log line or a span takes it.
    key: Option<String>,
}

/// `response`, telling `observe` its outcome and key.
fn told(mut response: Response, outcome: &'static str, key: Option<String>) -> Response {
    response.extensions_mut().insert(Told { outcome, key });
    response
}

/// `PUT /api/v2/captures`: allocate.
async fn allocate(
    State(state): State<AppState>,
    _: Authorized,
    payload: Result<Payload<spec::AllocateRequest>, ApiError>,
) -> Response {
    let started = Instant::now();
    let (outcome, key, response) = match payload {
        Ok(Payload(request)) => {
            let key = request.idempotency_key.clone();
            match allocate_answer(&state, request).await {
                Ok((outcome, response)) => (outcome, Some(key), response),
                Err(e) => (failed_allocation(&e), Some(key), e.into_response()),
            }
        }
        Err(e) => (failed_allocation(&e), None, e.into_response()),
    };
    state.metrics.allocation(outcome);
    state
        .metrics
        .operation(Operation::Allocate, started.elapsed());
    told(response, outcome.as_str(), key)
}

/// An allocation answered with an error: the store's (503), or a bad request's.
fn failed_allocation(e: &ApiError) -> Allocation {
    match e {
        ApiError::Store(_) => Allocation::Error,
        _ => Allocation::Invalid,
    }
}

/// The checks, the store (through the wait), the answer.
async fn allocate_answer(
    state: &AppState,
    request: spec::AllocateRequest,
) -> Result<(Allocation, Response), ApiError> {
    let policy = &state.policy;
    let max_lease_ms = policy.max_lease.as_millis();
    let lease = match request.lease_ms {
        None => policy.default_lease,
        Some(ms) if ms == 0 || u128::from(ms) > max_lease_ms => {
            return Err(out_of_range(format!(
                "lease_ms must be between 1 and {max_lease_ms}"
            )));
        }
        Some(ms) => Duration::from_millis(ms),
    };
    let wait = match request.wait_ms {
        Some(ms) if ms > spec::MAX_WAIT_MS => {
            return Err(out_of_range(format!(
                "wait_ms must be between 0 and {}",
                spec::MAX_WAIT_MS
            )));
        }
        ms => Duration::from_millis(ms.unwrap_or(0)),
    };
    if request
        .fingerprint
        .as_ref()
        .is_some_and(|f| !spec::is_valid_fingerprint(f))
    {
        return Err(out_of_range(format!(
            "fingerprint must be at most {} characters of printable ASCII",
            spec::MAX_FINGERPRINT_LEN
        )));
    }
    check_key(&request.idempotency_key)?;

    let key = request.idempotency_key;
    let operation = store::Allocate {
        key: key.clone(),
        fingerprint: request.fingerprint,
        lease,
    };
    let (outcome, waited) = wait::allocate(&*state.store, &state.waiters, operation, wait).await?;
    if let Some(waited) = waited {
        state.metrics.waited(waited);
    }
    let (label, mut response) = match outcome {
        AllocateOutcome::Allocated {
            lease_token,
            lease_expires_at,
            taken_over,
        } => (
            if taken_over {
                Allocation::TakenOver
            } else {
                Allocation::Allocated
            },
            json(
                StatusCode::ACCEPTED,
                &spec::Allocated {
                    lease_token,
                    lease_expires_at: rfc3339(lease_expires_at),
                },
            ),
        ),
        AllocateOutcome::Completed(capture) => (
            if waited.is_some() {
                Allocation::Waited
            } else {
                Allocation::Replayed
            },
            json_bytes(StatusCode::OK, replay_json(&key, &capture)),
        ),
        AllocateOutcome::InFlight { lease_expires_at } => (
            Allocation::Conflict,
            ApiError::InFlight {
                retry_after_secs: retry_after_secs(lease_expires_at, now_ms()),
            }
            .into_response(),
        ),
        AllocateOutcome::FingerprintMismatch => (
            Allocation::Mismatch,
            ApiError::FingerprintMismatch.into_response(),
        ),
    };
    if let Some(waited) = waited {
        // Tells a response the caller waited for from a plain replay (the filter counts them
        // apart without asking twice).
        let ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX);
        response
            .headers_mut()
            .insert(spec::WAITED_HEADER, HeaderValue::from(ms));
    }
    Ok((label, response))
}

/// A record's checks (400, 422), before the store is asked.
fn record_request(
    request: spec::CaptureRecord,
    policy: &Policy,
) -> Result<store::Record, ApiError> {
    let status = request.response.response_status;
    if !spec::STATUS_RANGE.contains(&status) {
        return Err(out_of_range(format!(
            "response_status must be between {} and {}",
            spec::STATUS_RANGE.start(),
            spec::STATUS_RANGE.end()
        )));
    }
    check_key(&request.idempotency_key)?;
    Ok(store::Record {
        key: request.idempotency_key,
        lease_token: request.lease_token,
        capture: request.response,
        retention: policy.retention,
    })
}

/// A release's checks (422), before the store is asked.
fn release_request(request: spec::ReleaseRequest) -> Result<store::Release, ApiError> {
    check_key(&request.idempotency_key)?;
    Ok(store::Release {
        key: request.idempotency_key,
        lease_token: request.lease_token,
    })
}

/// The answer to a record the store applied; wakes the waits on the key once it is stored.
fn recorded(
    state: &AppState,
    key: String,
    outcome: RecordOutcome,
) -> Result<spec::Recorded, ApiError> {
    match outcome {
        RecordOutcome::Stored { expires_at } => {
            // Committed: whoever waits on the key may replay it now.
            state.waiters.notify(&key);
            Ok(spec::Recorded {
                idempotency_key: key,
                expires_at: rfc3339(expires_at),
            })
        }
        RecordOutcome::Forbidden => Err(ApiError::NotAllocated),
        RecordOutcome::TooLarge { limit } => Err(ApiError::CaptureTooLarge { limit }),
    }
}

/// The answer to a release the store applied; wakes the waits on the key once it is free.
fn released(
    state: &AppState,
    key: String,
    outcome: ReleaseOutcome,
) -> Result<spec::Released, ApiError> {
    match outcome {
        ReleaseOutcome::Released => {
            // Free: whoever waits on the key may take it now.
            state.waiters.notify(&key);
            Ok(spec::Released {
                idempotency_key: key,
            })
        }
        ReleaseOutcome::Forbidden => Err(ApiError::NotAllocated),
    }
}

/// The label of a record's outcome: its answer from the store, or the error it got.
fn recording(answer: &Result<spec::Recorded, ApiError>) -> Recording {
    match answer {
        Ok(_) => Recording::Stored,
        Err(ApiError::NotAllocated) => Recording::Forbidden,
        Err(ApiError::CaptureTooLarge { .. }) => Recording::TooLarge,
        Err(ApiError::Store(_)) => Recording::Error,
        Err(_) => Recording::Invalid,
    }
}

/// The label of a release's outcome.
fn releasing(answer: &Result<spec::Released, ApiError>) -> Releasing {
    match answer {
        Ok(_) => Releasing::Released,
        Err(ApiError::NotAllocated) => Releasing::Forbidden,
        Err(ApiError::Store(_)) => Releasing::Error,
        Err(_) => Releasing::Invalid,
    }
}

/// `POST /api/v2/captures`: record.
async fn record(
    State(state): State<AppState>,
    _: Authorized,
    payload: Result<Payload<spec::CaptureRecord>, ApiError>,
) -> Response {
    let started = Instant::now();
    let (key, answer) = match payload {
        Ok(Payload(request)) => {
            let key = request.idempotency_key.clone();
            let answer = async {
                let operation = record_request(request, &state.policy)?;
                let key = operation.key.clone();
                let outcome = state.store.record(operation).await?;
                recorded(&state, key, outcome)
            }
            .await;
            (Some(key), answer)
        }
        Err(e) => (None, Err(e)),
    };
    let outcome = recording(&answer);
    state.metrics.record(outcome);
    state
        .metrics
        .operation(Operation::Record, started.elapsed());
    let response = match answer {
        Ok(body) => json(StatusCode::OK, &body),
        Err(e) => e.into_response(),
    };
    told(response, outcome.as_str(), key)
}

/// `DELETE /api/v2/captures`: release.
async fn release(
    State(state): State<AppState>,
    _: Authorized,
    payload: Result<Payload<spec::ReleaseRequest>, ApiError>,
) -> Response {
    let started = Instant::now();
    let (key, answer) = match payload {
        Ok(Payload(request)) => {
            let key = request.idempotency_key.clone();
            let answer = async {
                let operation = release_request(request)?;
                let key = operation.key.clone();
                let outcome = state.store.release(operation).await?;
                released(&state, key, outcome)
            }
            .await;
            (Some(key), answer)
        }
        Err(e) => (None, Err(e)),
    };
    let outcome = releasing(&answer);
    state.metrics.release(outcome);
    state
        .metrics
        .operation(Operation::Release, started.elapsed());
    let response = match answer {
        Ok(body) => json(StatusCode::OK, &body),
        Err(e) => e.into_response(),
    };
    told(response, outcome.as_str(), key)
}

/// `{"operations": [...]}`: each item is read on its own, so that a malformed one is answered
/// 400 by itself and the others still apply.
#[derive(serde::Deserialize)]
struct BatchRequest {
    operations: Vec<serde_json::Value>,
}

/// One batch item, as read: the store operation, or the answer it gets without the store.
fn batch_item(item: serde_json::Value, policy: &Policy) -> Result<BatchOp, ApiError> {
    if !item.is_object() {
        return Err(ApiError::MalformedPayload(None));
    }
    let op: spec::BatchOperation = serde_json::from_value(item).map_err(malformed)?;
    Ok(match op {
        spec::BatchOperation::Record(r) => BatchOp::Record(record_request(r, policy)?),
        spec::BatchOperation::Release(r) => BatchOp::Release(release_request(r)?),
    })
}

/// An item's answer as the single call would send it: its status and its JSON body, or its
/// status alone for a success when the caller asked for `return=minimal`.
fn batch_result<T: Serialize>(
    answer: Result<T, ApiError>,
    minimal: bool,
) -> spec::BatchResult<serde_json::Value> {
    let (status, body) = match answer {
        Ok(_) if minimal => (StatusCode::OK, None),
        Ok(body) => (StatusCode::OK, Some(serde_json::to_value(&body))),
        Err(e) => {
            if let ApiError::Store(cause) = &e {
                tracing::error!(error = %cause, "store failure (batch item)");
            }
            (e.status(), Some(serde_json::to_value(e.problem())))
        }
    };
    spec::BatchResult {
        status: status.as_u16(),
        body: body.map(|b| b.expect("an answer always encodes")),
    }
}

/// Whether the `Prefer` headers ask for `return=minimal` (RFC 7240: a comma-separated list of
/// preferences in one or more headers, each `name[=value]` followed by `;` parameters; names
/// are case-insensitive, a value may be quoted). A header that is not text is ignored, as the
/// RFC asks of a preference the server does not understand.
fn prefers_minimal(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|preference| {
            let first = preference.split(';').next().unwrap_or_default();
            let (name, value) = first.split_once('=').unwrap_or((first, ""));
            name.trim().eq_ignore_ascii_case("return")
                && value
                    .trim()
                    .trim_matches('"')
                    .eq_ignore_ascii_case("minimal")
        })
}

/// What a batch item says of the request it comes from: the fields the filter adds to each
/// (`request_id`, `traceparent`; both optional, ignored by the item's own checks).
struct ItemContext {
    release: bool,
    request_id: Option<String>,
}

impl ItemContext {
    fn of(item: &serde_json::Value) -> ItemContext {
        let text = |name: &str| item.get(name).and_then(serde_json::Value::as_str);
        // The batch is one call for many requests: its span links to each item's trace.
        if let Some(traceparent) = text("traceparent") {
            crate::logging::link_current_span(traceparent);
        }
        ItemContext {
            release: text("op") == Some("release"),
            request_id: text("request_id").and_then(request_id),
        }
    }
}

/// `POST /api/v2/captures/batch`: many records and releases in one call (what the filter's
/// deferred queue sends). Each item is checked and answered exactly as its single call (200,
/// 400, 403, 422, 503, in a result of its own), and counted as its single call would be; the
/// items the checks let through go to the store together (one transaction and one sync in the
/// embedded store, one pipeline in Redis), and nothing is answered before all of them are
/// durable.
async fn batch(
    State(state): State<AppState>,
    _: Authorized,
    headers: HeaderMap,
    payload: Result<Payload<BatchRequest>, ApiError>,
) -> Response {
    let started = Instant::now();
    let answer = match payload {
        Ok(Payload(request)) => batch_answer(&state, request, prefers_minimal(&headers)).await,
        Err(e) => Err(e),
    };
    state.metrics.operation(Operation::Batch, started.elapsed());
    match answer {
        Ok(response) => told(response, "answered", None),
        // Refused whole (400, 413): no item is counted, none was read.
        Err(e) => told(e.into_response(), "invalid", None),
    }
}

/// `minimal`: the caller sent `Prefer: return=minimal`, and its successful results carry their
/// status only (the filter reads nothing else; the bodies were most of the answer's bytes).
async fn batch_answer(
    state: &AppState,
    request: BatchRequest,
    minimal: bool,
) -> Result<Response, ApiError> {
    if request.operations.len() > spec::MAX_BATCH_OPERATIONS {
        return Err(out_of_range(format!(
            "operations must hold at most {} items",
            spec::MAX_BATCH_OPERATIONS
        )));
    }
    // Per item: where it comes from, and its key or the answer the checks gave it; the rest go
    // to the store, in order.
    let mut items: Vec<(ItemContext, Result<String, ApiError>)> = Vec::new();
    let mut valid: Vec<BatchOp> = Vec::new();
    for item in request.operations {
        let context = ItemContext::of(&item);
        items.push((
            context,
            batch_item(item, &state.policy).map(|op| {
                let key = match &op {
                    BatchOp::Record(r) => r.key.clone(),
                    BatchOp::Release(r) => r.key.clone(),
                };
                valid.push(op);
                key
            }),
        ));
    }
    let mut outcomes = state.store.batch(valid).await.into_iter();
    let results = items
        .into_iter()
        .map(|(context, item)| {
            let (label, digest, result) = match item {
                Err(e) => {
                    let label = if context.release {
                        state.metrics.release(Releasing::Invalid);
                        Releasing::Invalid.as_str()
                    } else {
                        state.metrics.record(Recording::Invalid);
                        Recording::Invalid.as_str()
                    };
                    (label, None, batch_result::<()>(Err(e), minimal))
                }
                Ok(key) => {
                    let outcome = outcomes.next().unwrap_or_else(|| {
                        Err(store::StoreError::Unavailable(
                            "the store answered fewer items than it was given".into(),
                        ))
                    });
                    let digest =
                        tracing::enabled!(tracing::Level::DEBUG).then(|| spec::key_digest(&key));
                    match outcome {
                        Err(e) => {
                            let e = ApiError::from(e);
                            let label = if context.release {
                                state.metrics.release(Releasing::Error);
                                Releasing::Error.as_str()
                            } else {
                                state.metrics.record(Recording::Error);
                                Recording::Error.as_str()
                            };
                            (label, digest, batch_result::<()>(Err(e), minimal))
                        }
                        Ok(BatchOutcome::Record(o)) => {
                            let answer = recorded(state, key, o);
                            let label = recording(&answer);
                            state.metrics.record(label);
                            (label.as_str(), digest, batch_result(answer, minimal))
                        }
                        Ok(BatchOutcome::Release(o)) => {
                            let answer = released(state, key, o);
                            let label = releasing(&answer);
                            state.metrics.release(label);
                            (label.as_str(), digest, batch_result(answer, minimal))
                        }
                    }
                }
            };
            tracing::debug!(
                request_id = context.request_id,
                op = if context.release { "release" } else { "record" },
                outcome = label,
                key = digest,
                status = result.status,
                "batch item"
            );
            result
        })
        .collect();
    let mut response = json(StatusCode::OK, &spec::BatchAnswer { results });
    if minimal {
        response.headers_mut().insert(
            "preference-applied",
            HeaderValue::from_static(spec::PREFER_MINIMAL),
        );
    }
    Ok(response)
}

/// `GET /-/ping`: the process answers (the old shape).
async fn ping() -> Response {
    json(
        StatusCode::OK,
        &spec::Pong {
            message: "pong".into(),
        },
    )
}

/// `GET /-/ready`: the store answers too.
async fn ready(State(state): State<AppState>) -> Result<Response, ApiError> {
    state.store.ready().await?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "status": "ready", "store": state.store.name() }),
    ))
}

/// `GET /openapi.yaml`.
async fn openapi() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/yaml"),
        )],
        OPENAPI_YAML,
    )
        .into_response()
}

/// The bearer-token check of the captures routes: with `API_TOKEN` (`--api-token`) set, the
/// request must carry `Authorization: Bearer <token>`. An extractor of the request's head,
/// which axum runs before the body's, so that a request without the token is refused (401)
/// before its body is read. (An extractor rather than a middleware: a `route_layer` clones
/// the boxed route for every request.)
pub struct Authorized;

impl FromRequestParts<AppState> for Authorized {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if let Some(expected) = &state.policy.api_token {
            let presented = parts
                .headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(bearer_token);
            // Constant time over the token's bytes, so that timing does not reveal how much of
            // a guess was right.
            let valid =
                presented.is_some_and(|t| bool::from(t.as_bytes().ct_eq(expected.as_bytes())));
            if !valid {
                return Err(ApiError::Unauthorized);
            }
        }
        Ok(Authorized)
    }
}

/// The token of `Bearer <token>` (the scheme is case-insensitive, RFC 9110 §11.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// `GET /metrics`: every metric, in Prometheus's text format.
async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// The request id a caller sent (`x-request-id`, the gateway's), when it is one: 1 to 128
/// visible ASCII characters. Anything else is not shown at all.
fn request_id(value: &str) -> Option<String> {
    (!value.is_empty() && value.len() <= 128 && value.bytes().all(|b| b.is_ascii_graphic()))
        .then(|| value.to_owned())
}

/// A matched route as its template, one of a fixed few (the label of the HTTP metrics).
fn route_of(request: &Request) -> Option<&'static str> {
    let matched = request.extensions().get::<MatchedPath>()?.as_str();
    [
        spec::CAPTURES_PATH,
        spec::BATCH_PATH,
        "/-/ping",
        "/-/ready",
        "/openapi.yaml",
        METRICS_PATH,
    ]
    .into_iter()
    .find(|route| *route == matched)
}

/// Around every request: a span for the API's routes (continuing the caller's trace from its
/// `traceparent`; debug, so that it costs nothing unless traces are exported or the log is at
/// debug), the HTTP request counter, and one log line: debug, a warning for a 5xx, with the
/// request id, method, route, status, outcome, the key's digest and the latency.
async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = route_of(&request);
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .and_then(request_id);
    let span = match route {
        Some(spec::CAPTURES_PATH | spec::BATCH_PATH) => tracing::debug_span!(
            "request",
            otel.name = tracing::field::Empty,
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            http.request.method = %method,
            http.route = route,
            http.response.status_code = tracing::field::Empty,
            request_id = request_id.as_deref(),
            idempotency.outcome = tracing::field::Empty,
            idempotency.key = tracing::field::Empty,
        ),
        _ => tracing::Span::none(),
    };
    if !span.is_disabled() {
        span.record(
            "otel.name",
            format!("{method} {}", route.unwrap_or_default()).as_str(),
        );
        crate::logging::continue_trace(&span, request.headers());
    }
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status().as_u16();
    state.metrics.http_request(route, &method, status);

    let told = response.extensions().get::<Told>();
    let error = response.status().is_server_error();
    let log = if error {
        tracing::enabled!(tracing::Level::WARN)
    } else {
        tracing::enabled!(tracing::Level::DEBUG)
    };
    if log || !span.is_disabled() {
        let outcome = told.map(|t| t.outcome);
        let key = told.and_then(|t| t.key.as_deref()).map(spec::key_digest);
        // As an i64: the OpenTelemetry layer records an u64 as text.
        span.record("http.response.status_code", i64::from(status));
        span.record("idempotency.outcome", outcome);
        span.record("idempotency.key", key.as_deref());
        if error {
            span.record("otel.status_code", "ERROR");
        }
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        let route = route.unwrap_or("unmatched");
        if error {
            tracing::warn!(request_id, %method, route, status, outcome, key, ms, "request");
        } else {
            tracing::debug!(request_id, %method, route, status, outcome, key, ms, "request");
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The hand-written replay answer is what serde_json writes for the same record,
        /// whatever the strings hold (escapes, controls, non-ASCII, long bodies).
        #[test]
        fn a_replay_answer_is_what_serde_json_writes(
            key in "[A-Za-z0-9_-]{1,64}",
            status in 100u16..=599,
            body in proptest::prop_oneof![
                "[A-Za-z0-9+/]{0,200}={0,2}",
                proptest::prelude::any::<String>(),
                "[ -~\u{7f}\u{e9}\u{1f600}\"\\\\\n\t\u{0}]{0,80}",
            ],
            headers in proptest::collection::vec(
                (
                    "[A-Za-z-]{1,20}",
                    proptest::collection::vec(proptest::prelude::any::<String>(), 0..3),
                    proptest::prelude::any::<bool>(),
                ),
                0..4,
            ),
        ) {
            let capture = spec::Capture {
                response_status: status,
                response_body: body,
                response_headers: headers
                    .into_iter()
                    .map(|(key, values, one)| spec::Header {
                        key,
                        value: match (one, values.first()) {
                            (true, Some(v)) => spec::HeaderValue::One(v.clone()),
                            _ => spec::HeaderValue::Many(values),
                        },
                    })
                    .collect(),
            };
            let expected = serde_json::to_vec(&spec::CaptureRecord {
                idempotency_key: key.clone(),
                lease_token: None,
                response: capture.clone(),
            })
            .unwrap();
            proptest::prop_assert_eq!(
                String::from_utf8(replay_json(&key, &capture)).unwrap(),
                String::from_utf8(expected).unwrap()
            );
        }
    }

    #[test]
    fn retry_after_rounds_up_to_at_least_one_second() {
        assert_eq!(retry_after_secs(10_000, 10_000), 1);
        assert_eq!(retry_after_secs(10_001, 10_000), 1);
        assert_eq!(retry_after_secs(11_001, 10_000), 2);
        assert_eq!(retry_after_secs(5_000, 10_000), 1);
    }

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
    }

    #[test]
    fn request_ids_are_shown_only_when_plain() {
        assert_eq!(request_id("7f3a-9c").as_deref(), Some("7f3a-9c"));
        assert_eq!(request_id(""), None);
        assert_eq!(request_id("a b"), None);
        assert_eq!(request_id(&"x".repeat(129)), None);
        assert_eq!(request_id("caf\u{e9}"), None);
    }

    #[test]
    fn instants_are_rfc3339_with_milliseconds() {
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }
}
