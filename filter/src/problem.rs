//! The filter's own error answers: RFC 9457 problem+json with a stable `type` per case (the
//! README lists them). Where the backend has the same case (409 in flight, 422 fingerprint
//! mismatch, 413 too large) the filter uses the backend's `type`, so a client sees one URN per
//! cause whoever answered.

use idempotency_spec::{PROBLEM_JSON, problem_type};

use crate::json;
use crate::replay::LocalReply;

/// Each case the filter answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// 400: `require_key` and no key header.
    MissingKey,
    /// 400: the key is not 1 to 255 printable ASCII characters, a malformed sf-string, or the
    /// header is repeated.
    InvalidKey,
    /// 409: another request with this key is in flight.
    Conflict,
    /// 413: the body is larger than `max_request_body_bytes`.
    BodyTooLarge,
    /// 413: nginx spooled the body to a temporary file, which a filter cannot read.
    BodySpooled,
    /// 411: Kong and a body of unknown length (`Transfer-Encoding`) under `fingerprint`:
    /// ngx_wasm_module gives a filter no callback for an empty chunked body, so the body could
    /// reach the upstream before the key is allocated.
    LengthRequired,
    /// 422: the key was used with another request.
    Mismatch,
    /// 503: the backend did not answer usably (`on_server_error: reject`).
    ServerError,
}

pub const MISSING_KEY: &str = "urn:idempotency:problem:missing-key";
pub const INVALID_KEY: &str = "urn:idempotency:problem:invalid-key";
pub const BODY_SPOOLED: &str = "urn:idempotency:problem:body-spooled";
pub const LENGTH_REQUIRED: &str = "urn:idempotency:problem:length-required";
pub const BACKEND_UNAVAILABLE: &str = "urn:idempotency:problem:backend-unavailable";

impl Kind {
    pub fn status(self) -> u16 {
        match self {
            Kind::MissingKey | Kind::InvalidKey => 400,
            Kind::Conflict => 409,
            Kind::LengthRequired => 411,
            Kind::BodyTooLarge | Kind::BodySpooled => 413,
            Kind::Mismatch => 422,
            Kind::ServerError => 503,
        }
    }

    pub fn type_uri(self) -> &'static str {
        match self {
            Kind::MissingKey => MISSING_KEY,
            Kind::InvalidKey => INVALID_KEY,
            Kind::Conflict => problem_type::IN_FLIGHT,
            Kind::BodyTooLarge => problem_type::PAYLOAD_TOO_LARGE,
            Kind::BodySpooled => BODY_SPOOLED,
            Kind::LengthRequired => LENGTH_REQUIRED,
            Kind::Mismatch => problem_type::FINGERPRINT_MISMATCH,
            Kind::ServerError => BACKEND_UNAVAILABLE,
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Kind::MissingKey => "Idempotency key missing",
            Kind::InvalidKey => "Idempotency key invalid",
            Kind::Conflict => "Request with this idempotency key in progress",
            Kind::BodyTooLarge => "Request body too large",
            Kind::BodySpooled => "Request body buffered to disk",
            Kind::LengthRequired => "Request body length required",
            Kind::Mismatch => "Idempotency key reused with another request",
            Kind::ServerError => "Idempotency backend unavailable",
        }
    }
}

/// Builds the answer for `kind`, with a human `detail`; `retry_after` (seconds) for 409.
pub fn answer(kind: Kind, detail: &str, retry_after: Option<&str>) -> LocalReply {
    // A `Problem` of the spec, its fields in their order, `error` repeating `detail`.
    let mut body = Vec::with_capacity(160 + 2 * json::max_string_len(detail));
    body.push(b'{');
    json::field(&mut body, "type", kind.type_uri());
    body.push(b',');
    json::field(&mut body, "title", kind.title());
    body.push(b',');
    json::key(&mut body, "status");
    json::number(&mut body, u64::from(kind.status()));
    body.push(b',');
    json::field(&mut body, "detail", detail);
    body.push(b',');
    json::field(&mut body, "error", detail);
    body.push(b'}');
    let mut headers = vec![
        ("content-type".to_string(), PROBLEM_JSON.to_string()),
        ("cache-control".to_string(), "no-store".to_string()),
    ];
    if let Some(ra) = retry_after {
        headers.push(("retry-after".to_string(), ra.to_string()));
    }
    LocalReply {
        status: kind.status(),
        headers,
        body,
    }
}

/// The `Retry-After` to send with a 409: the backend's when it is a number of seconds,
/// else 1.
pub fn retry_after(backend: Option<&str>) -> String {
    match backend.map(str::trim) {
        Some(s) if !s.is_empty() && s.len() <= 9 && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.to_string()
        }
        _ => "1".to_string(),
    }
}

/// The detail of the 413 when nginx spooled the body to disk.
pub fn spooled_detail(limit: u64) -> String {
    format!(
        "the request body was buffered to a temporary file by nginx, where the gateway filter cannot read it; \
         raise Kong's nginx_http_client_body_buffer_size (nginx client_body_buffer_size) to at least the largest \
         body this route accepts (the filter's max_request_body_bytes is {limit})"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    // On wasm32-unknown-unknown the tests run under wasm-bindgen-test (Cargo.toml).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn bodies_are_rfc9457_with_stable_types() {
        let a = answer(Kind::Conflict, "busy", Some("3"));
        assert_eq!(a.status, 409);
        assert!(a.headers.contains(&("retry-after".into(), "3".into())));
        assert!(
            a.headers
                .contains(&("content-type".into(), "application/problem+json".into()))
        );
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(v["type"], "urn:idempotency:problem:in-flight");
        assert_eq!(v["status"], 409);
        assert_eq!(v["detail"], "busy");
        assert_eq!(v["error"], "busy");
        for (k, s) in [
            (Kind::MissingKey, 400),
            (Kind::InvalidKey, 400),
            (Kind::BodyTooLarge, 413),
            (Kind::BodySpooled, 413),
            (Kind::LengthRequired, 411),
            (Kind::Mismatch, 422),
            (Kind::ServerError, 503),
        ] {
            let a = answer(k, "d", None);
            assert_eq!(a.status, s);
            let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
            assert_eq!(v["type"], k.type_uri());
            assert!(!a.headers.iter().any(|(n, _)| n == "retry-after"));
        }
        assert_ne!(Kind::MissingKey.type_uri(), Kind::InvalidKey.type_uri());
        assert_ne!(Kind::BodySpooled.type_uri(), Kind::BodyTooLarge.type_uri());
    }

    /// Written by hand: byte for byte what serde_json makes of the spec's `Problem`.
    #[test]
    fn bodies_are_what_serde_json_writes() {
        for detail in ["d", "the X-Key\" header \\ is \u{1} repeated: é"] {
            let a = answer(Kind::InvalidKey, detail, None);
            let expected = idempotency_spec::Problem {
                kind: INVALID_KEY.into(),
                title: Kind::InvalidKey.title().into(),
                status: 400,
                detail: detail.into(),
                error: Some(detail.into()),
            };
            assert_eq!(a.body, serde_json::to_vec(&expected).unwrap());
        }
    }

    #[test]
    fn retry_after_is_sanitised() {
        assert_eq!(retry_after(Some(" 5 ")), "5");
        assert_eq!(retry_after(Some("Wed, 21 Oct 2015 07:28:00 GMT")), "1");
        assert_eq!(retry_after(None), "1");
        assert_eq!(retry_after(Some("")), "1");
    }

    #[test]
    fn spooled_detail_names_the_kong_setting() {
        assert!(spooled_detail(1024).contains("nginx_http_client_body_buffer_size"));
    }
}
