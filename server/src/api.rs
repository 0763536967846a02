//! The HTTP API: the routes (all of them, here), the handlers, the body extractor and the
//! bearer-token check.
//!
//! A request goes: request log → (for `/api/*`) bearer token → [`Payload`] (body limit, JSON
//! object, fields) → the handler's range checks and key check → the store (through
//! [`crate::wait`] for `wait_ms`) → an answer, or an [`ApiError`] rendered as a problem.

use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, FailedToBufferBody};
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use idempotency_spec as spec;
use serde::Serialize;
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::store::{
    self, AllocateOutcome, BatchOp, BatchOutcome, RecordOutcome, ReleaseOutcome, Store, UnixMillis,
    now_ms,
};
use crate::wait::{self, Waiters};

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

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub waiters: Arc<Waiters>,
    pub policy: Arc<Policy>,
}

/// Every route of the service.
pub fn router(state: AppState) -> Router {
    let captures = axum::routing::put(allocate)
        .post(record)
        .delete(release)
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let batch = axum::routing::post(batch)
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route(spec::CAPTURES_PATH, captures)
        .route(spec::BATCH_PATH, batch)
        .route("/-/ping", get(ping))
        .route("/-/ready", get(ready))
        .route("/openapi.yaml", get(openapi))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(state.policy.body_limit))
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

/// A JSON body: read within the body limit (413), a JSON object (400 "Malformed payload"),
/// deserialized into `T` (400 naming the field). Unknown fields are ignored, and no
/// `Content-Type` is required: the old clients do not always send one.
pub struct Payload<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for Payload<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes =
            Bytes::from_request(request, state)
                .await
                .map_err(|rejection| match rejection {
                    BytesRejection::FailedToBufferBody(FailedToBufferBody::LengthLimitError(_)) => {
                        ApiError::PayloadTooLarge {
                            limit: state.policy.body_limit,
                        }
                    }
                    other => ApiError::MalformedPayload(Some(other.body_text())),
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
    let bytes = serde_json::to_vec(body).expect("an answer always encodes");
    let mut response = (status, bytes).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// `PUT /api/v2/captures`: allocate.
async fn allocate(
    State(state): State<AppState>,
    Payload(request): Payload<spec::AllocateRequest>,
) -> Result<Response, ApiError> {
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
        .is_some_and(|f| f.len() > spec::MAX_FINGERPRINT_LEN)
    {
        return Err(out_of_range(format!(
            "fingerprint must be at most {} bytes",
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
    let mut response = match outcome {
        AllocateOutcome::Allocated {
            lease_token,
            lease_expires_at,
            ..
        } => json(
            StatusCode::ACCEPTED,
            &spec::Allocated {
                lease_token,
                lease_expires_at: rfc3339(lease_expires_at),
            },
        ),
        AllocateOutcome::Completed(capture) => json(
            StatusCode::OK,
            &spec::CaptureRecord {
                idempotency_key: key,
                lease_token: None,
                response: capture,
            },
        ),
        AllocateOutcome::InFlight { lease_expires_at } => ApiError::InFlight {
            retry_after_secs: retry_after_secs(lease_expires_at, now_ms()),
        }
        .into_response(),
        AllocateOutcome::FingerprintMismatch => ApiError::FingerprintMismatch.into_response(),
    };
    if let Some(waited) = waited {
        // Tells a response the caller waited for from a plain replay (the filter counts them
        // apart without asking twice).
        let ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX);
        response
            .headers_mut()
            .insert(spec::WAITED_HEADER, HeaderValue::from(ms));
    }
    Ok(response)
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

/// `POST /api/v2/captures`: record.
async fn record(
    State(state): State<AppState>,
    Payload(request): Payload<spec::CaptureRecord>,
) -> Result<Response, ApiError> {
    let operation = record_request(request, &state.policy)?;
    let key = operation.key.clone();
    let outcome = state.store.record(operation).await?;
    Ok(json(StatusCode::OK, &recorded(&state, key, outcome)?))
}

/// `DELETE /api/v2/captures`: release.
async fn release(
    State(state): State<AppState>,
    Payload(request): Payload<spec::ReleaseRequest>,
) -> Result<Response, ApiError> {
    let operation = release_request(request)?;
    let key = operation.key.clone();
    let outcome = state.store.release(operation).await?;
    Ok(json(StatusCode::OK, &released(&state, key, outcome)?))
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

/// An item's answer as the single call would send it: its status and its JSON body.
fn batch_result<T: Serialize>(answer: Result<T, ApiError>) -> spec::BatchResult<serde_json::Value> {
    let (status, body) = match answer {
        Ok(body) => (StatusCode::OK, serde_json::to_value(&body)),
        Err(e) => {
            if let ApiError::Store(cause) = &e {
                tracing::error!(error = %cause, "store failure (batch item)");
            }
            (e.status(), serde_json::to_value(e.problem()))
        }
    };
    spec::BatchResult {
        status: status.as_u16(),
        body: body.expect("an answer always encodes"),
    }
}

/// `POST /api/v2/captures/batch`: many records and releases in one call (what the filter's
/// deferred queue sends). Each item is checked and answered exactly as its single call (200,
/// 400, 403, 422, 503, in a result of its own); the items the checks let through go to the
/// store together (one transaction and one sync in the embedded store, one pipeline in
/// Redis), and nothing is answered before all of them are durable.
async fn batch(
    State(state): State<AppState>,
    Payload(request): Payload<BatchRequest>,
) -> Result<Response, ApiError> {
    if request.operations.len() > spec::MAX_BATCH_OPERATIONS {
        return Err(out_of_range(format!(
            "operations must hold at most {} items",
            spec::MAX_BATCH_OPERATIONS
        )));
    }
    // Per item: its key, or the answer the checks gave it; the rest go to the store, in order.
    let mut items: Vec<Result<String, ApiError>> = Vec::new();
    let mut valid: Vec<BatchOp> = Vec::new();
    for item in request.operations {
        items.push(batch_item(item, &state.policy).map(|op| {
            let key = match &op {
                BatchOp::Record(r) => r.key.clone(),
                BatchOp::Release(r) => r.key.clone(),
            };
            valid.push(op);
            key
        }));
    }
    let mut outcomes = state.store.batch(valid).await.into_iter();
    let results = items
        .into_iter()
        .map(|item| {
            let key = match item {
                Ok(key) => key,
                Err(e) => return batch_result::<()>(Err(e)),
            };
            let outcome = outcomes.next().unwrap_or_else(|| {
                Err(store::StoreError::Unavailable(
                    "the store answered fewer items than it was given".into(),
                ))
            });
            match outcome {
                Err(e) => batch_result::<()>(Err(e.into())),
                Ok(BatchOutcome::Record(o)) => batch_result(recorded(&state, key, o)),
                Ok(BatchOutcome::Release(o)) => batch_result(released(&state, key, o)),
            }
        })
        .collect();
    Ok(json(StatusCode::OK, &spec::BatchAnswer { results }))
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

/// With `API_TOKEN` set, the request must carry `Authorization: Bearer <token>`.
async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(expected) = &state.policy.api_token {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token);
        // Constant time over the token's bytes, so that timing does not reveal how much of a
        // guess was right.
        let valid = presented.is_some_and(|t| bool::from(t.as_bytes().ct_eq(expected.as_bytes())));
        if !valid {
            return Err(ApiError::Unauthorized);
        }
    }
    Ok(next.run(request).await)
}

/// The token of `Bearer <token>` (the scheme is case-insensitive, RFC 9110 §11.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// One debug line per request (method, path, status, latency), a warning for a 5xx.
async fn log_request(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if response.status().is_server_error() {
        tracing::warn!(%method, path, status, ms, "request");
    } else {
        tracing::debug!(%method, path, status, ms, "request");
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn instants_are_rfc3339_with_milliseconds() {
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }
}
