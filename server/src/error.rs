//! The one error type of the API: every answer that is not a success is an [`ApiError`],
//! rendered as an RFC 9457 problem (`application/problem+json`) that also carries the old
//! server's `"error"` member, which the old clients read.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use idempotency_spec::{PROBLEM_JSON, Problem, problem_type};

use crate::store::StoreError;

/// The old server's message for a body that is not JSON.
pub const MALFORMED_PAYLOAD: &str = "Malformed payload";
/// The old server's message for a bad key.
pub const MALFORMED_KEY: &str =
    "Malformed idempotency key. Use URL safe base64 encoding without padding";
/// The old server's message for a record or release that does not hold the key.
pub const NOT_ALLOCATED: &str = "Capture has been completed or has not been allocated";
/// The old Lua plugin's message for a request in flight.
pub const IN_FLIGHT: &str = "Another request with the same idempotency key is in progress";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: not a JSON object (`None`), or a field missing, ill-typed or out of range.
    #[error("{}", malformed_payload(.0.as_deref()))]
    MalformedPayload(Option<String>),
    /// 422: the key is not base64url without padding, or too long.
    #[error("{MALFORMED_KEY}")]
    MalformedKey,
    /// 422: the key is allocated or completed with another fingerprint.
    #[error("The idempotency key was used with another request payload (fingerprint mismatch)")]
    FingerprintMismatch,
    /// 409: another request holds the key; retry after this many seconds.
    #[error("{IN_FLIGHT}")]
    InFlight { retry_after_secs: u64 },
    /// 403: record or release without holding the key.
    #[error("{NOT_ALLOCATED}")]
    NotAllocated,
    /// 413: the body is larger than the limit.
    #[error("The request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// 413: the response to record is larger than the store keeps in one entry.
    #[error(
        "The response is too large for the store: stored, it would exceed {limit} bytes \
         (its headers and body, as the store encodes them)"
    )]
    CaptureTooLarge { limit: usize },
    /// 408: the body did not arrive within `--body-read-timeout`.
    #[error("The request body did not arrive within {} ms", .limit.as_millis())]
    RequestTimeout { limit: std::time::Duration },
    /// 401: `API_TOKEN` is set and the request does not carry it.
    #[error("Missing or invalid bearer token")]
    Unauthorized,
    /// 404.
    #[error("No such resource")]
    NotFound,
    /// 405.
    #[error("Method not allowed on this resource")]
    MethodNotAllowed,
    /// 503: the store failed; the request may be retried.
    #[error("The store is unavailable")]
    Store(#[from] StoreError),
}

fn malformed_payload(reason: Option<&str>) -> String {
    match reason {
        None => MALFORMED_PAYLOAD.to_owned(),
        Some(reason) => format!("{MALFORMED_PAYLOAD}: {reason}"),
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::MalformedPayload(_) => StatusCode::BAD_REQUEST,
            ApiError::MalformedKey | ApiError::FingerprintMismatch => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::InFlight { .. } => StatusCode::CONFLICT,
            ApiError::NotAllocated => StatusCode::FORBIDDEN,
            ApiError::PayloadTooLarge { .. } | ApiError::CaptureTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The problem `type` (documented in `openapi.yaml`).
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::MalformedPayload(_) => problem_type::MALFORMED_PAYLOAD,
            ApiError::MalformedKey => problem_type::MALFORMED_KEY,
            ApiError::FingerprintMismatch => problem_type::FINGERPRINT_MISMATCH,
            ApiError::InFlight { .. } => problem_type::IN_FLIGHT,
            ApiError::NotAllocated => problem_type::NOT_ALLOCATED,
            ApiError::PayloadTooLarge { .. } | ApiError::CaptureTooLarge { .. } => {
                problem_type::PAYLOAD_TOO_LARGE
            }
            ApiError::RequestTimeout { .. } => problem_type::REQUEST_TIMEOUT,
            ApiError::Unauthorized => problem_type::UNAUTHORIZED,
            ApiError::NotFound | ApiError::MethodNotAllowed => problem_type::ABOUT_BLANK,
            ApiError::Store(_) => problem_type::STORE_UNAVAILABLE,
        }
    }

    fn title(&self) -> &'static str {
        match self {
            ApiError::MalformedPayload(_) => "Malformed payload",
            ApiError::MalformedKey => "Malformed idempotency key",
            ApiError::FingerprintMismatch => "Idempotency key reused with another payload",
            ApiError::InFlight { .. } => "Request in progress",
            ApiError::NotAllocated => "Capture not allocated",
            ApiError::PayloadTooLarge { .. } | ApiError::CaptureTooLarge { .. } => {
                "Payload too large"
            }
            ApiError::RequestTimeout { .. } => "Request timeout",
            ApiError::Unauthorized => "Unauthorized",
            ApiError::NotFound => "Not Found",
            ApiError::MethodNotAllowed => "Method Not Allowed",
            ApiError::Store(_) => "Store unavailable",
        }
    }

    pub fn problem(&self) -> Problem {
        let detail = self.to_string();
        Problem {
            kind: self.kind().to_owned(),
            title: self.title().to_owned(),
            status: self.status().as_u16(),
            error: Some(detail.clone()),
            detail,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Store(e) = &self {
            // The cause is for the operator, not the caller.
            tracing::error!(error = %e, "store failure");
        }
        let body = serde_json::to_vec(&self.problem()).expect("a problem always encodes");
        let mut response = (self.status(), body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        match self {
            ApiError::InFlight { retry_after_secs } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            }
            ApiError::Store(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::RequestTimeout { .. } => {
                // The rest of the body is never read: the connection cannot carry another
                // request (RFC 9110 §15.5.9).
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}
