//! The captures API contract, shared by the backend (`server/`) and the gateway filter
//! (`filter/`).
//!
//! `openapi.yaml` beside this crate is the published contract; the types here are its wire
//! shapes, with serde only, so that the crate also builds for `wasm32-wasip1`. The old Go
//! server's shapes are kept field for field (its clients, the old Kong Lua plugin among them,
//! must keep working); everything this project added is optional for the caller.

use serde::{Deserialize, Serialize};

/// The longest idempotency key the backend accepts (base64url characters).
pub const MAX_KEY_LEN: usize = 1400;
/// The longest a `wait_ms` allocation may wait for the holder of a key.
pub const MAX_WAIT_MS: u64 = 30_000;
/// The lowest and highest status a capture may carry.
pub const STATUS_RANGE: std::ops::RangeInclusive<u16> = 100..=599;

/// Media type of every error answer (RFC 9457).
pub const PROBLEM_JSON: &str = "application/problem+json";
/// The longest request fingerprint the backend stores (bytes). A digest fits many times over.
pub const MAX_FINGERPRINT_LEN: usize = 1024;

/// Whether `fingerprint` is one the backend takes: at most [`MAX_FINGERPRINT_LEN`] characters
/// of printable ASCII (0x20–0x7E), empty meaning none. ASCII only, so that the contract's
/// `maxLength` (characters, in JSON Schema) and the stored size (bytes) are one number; a
/// digest is ASCII anyway (`sha-256=:…:`).
pub fn is_valid_fingerprint(fingerprint: &str) -> bool {
    fingerprint.len() <= MAX_FINGERPRINT_LEN
        && fingerprint.bytes().all(|b| (0x20..=0x7e).contains(&b))
}
/// The path of the captures resource (allocate `PUT`, record `POST`, release `DELETE`).
pub const CAPTURES_PATH: &str = "/api/v2/captures";
/// The path of the batch operation (`POST`): many records and releases in one call.
pub const BATCH_PATH: &str = "/api/v2/captures/batch";
/// The most operations one batch may carry (more is a 400; the body limit applies too).
pub const MAX_BATCH_OPERATIONS: usize = 1000;
/// The response header of an allocation that waited (`wait_ms`) for another request holding
/// the key: how long it waited, in milliseconds. Absent when it did not wait.
pub const WAITED_HEADER: &str = "idempotency-waited-ms";

/// The `type` of every problem the backend answers, one per cause, so that a client can tell
/// the two 422s apart (a malformed key and a fingerprint mismatch). `openapi.yaml` documents
/// each; `about:blank` is used for plain 404 and 405.
pub mod problem_type {
    /// 400: the body is not a JSON object, a field is missing or ill-typed, or a value is out
    /// of range.
    pub const MALFORMED_PAYLOAD: &str = "urn:idempotency:problem:malformed-payload";
    /// 422: the idempotency key is not base64url without padding, or longer than allowed.
    pub const MALFORMED_KEY: &str = "urn:idempotency:problem:malformed-key";
    /// 422: the key was allocated or completed with another request fingerprint.
    pub const FINGERPRINT_MISMATCH: &str = "urn:idempotency:problem:fingerprint-mismatch";
    /// 409: another request holds a live lease on the key.
    pub const IN_FLIGHT: &str = "urn:idempotency:problem:in-flight";
    /// 403: record or release of a key that is not allocated under that lease.
    pub const NOT_ALLOCATED: &str = "urn:idempotency:problem:not-allocated";
    /// 413: the body is larger than the backend's limit.
    pub const PAYLOAD_TOO_LARGE: &str = "urn:idempotency:problem:payload-too-large";
    /// 401: `API_TOKEN` is set and the request does not carry it.
    pub const UNAUTHORIZED: &str = "urn:idempotency:problem:unauthorized";
    /// 408: the request body did not arrive within the server's body read time-out.
    pub const REQUEST_TIMEOUT: &str = "urn:idempotency:problem:request-timeout";
    /// 503: the store does not answer.
    pub const STORE_UNAVAILABLE: &str = "urn:idempotency:problem:store-unavailable";
    /// 404 and 405: no such route or method (RFC 9457 §4.2.1).
    pub const ABOUT_BLANK: &str = "about:blank";
}

/// Whether `key` is a key the backend takes: 1 to [`MAX_KEY_LEN`] characters of the URL-safe
/// base64 alphabet (RFC 4648 §5), without padding.
///
/// Only the alphabet is checked, not the length modulo 4: the old server accepted a UUID with
/// one extra character (37 characters), and its clients rely on that.
pub fn is_valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_KEY_LEN
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// What logs and traces show instead of a key: 12 hex digits, the first 6 bytes (little
/// endian) of the SipHash-2-4 of the backend key, under the key of the SipHash paper's test
/// vectors (`00 01 … 0f`). The backend and the filter compute it from the same string, so that
/// their lines about one key can be matched; 48 bits of it reveal nothing of the client's key
/// (which the backend key embeds) or of its scope.
///
/// A label, not a commitment: it only has to tell keys apart in logs. SipHash (a keyed hash
/// whose key here is public) does that for a seventh of the Wasm instructions of the SHA-256 it
/// replaced (two blocks for a backend key of a UUID); a key short enough to be guessed would be
/// found by trying it against either, and one that cannot be guessed is not given away by 48
/// bits of either.
pub fn key_digest(key: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    const PAPER_KEY: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
    let digest = siphasher::sip::SipHasher24::new_with_key(&PAPER_KEY)
        .hash(key.as_bytes())
        .to_le_bytes();
    let mut out = String::with_capacity(12);
    for b in digest.iter().take(6) {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
    out
}

/// `PUT /api/v2/captures`: allocate a key before the request reaches the upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocateRequest {
    pub idempotency_key: String,
    /// Digest of the request; a key presented again with another non-empty fingerprint is
    /// refused with 422.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// How long this allocation holds the key if it is never recorded.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "integer::optional"
    )]
    pub lease_ms: Option<u64>,
    /// When another request holds the key, wait up to this long for it to finish.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "integer::optional"
    )]
    pub wait_ms: Option<u64>,
}

/// 202 answer to an allocation: the caller now holds the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocated {
    pub lease_token: String,
    /// RFC 3339 instant at which the key is free again unless recorded or released.
    pub lease_expires_at: String,
}

/// `POST /api/v2/captures` body (record), and the 200 answer to an allocation of a completed
/// key (replay).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureRecord {
    pub idempotency_key: String,
    /// The token of the allocation being completed. Without it, any allocated key may be
    /// recorded (the old behaviour).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_token: Option<String>,
    pub response: Capture,
}

/// A captured upstream response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capture {
    #[serde(deserialize_with = "integer::status")]
    pub response_status: u16,
    /// Opaque to the backend. The filter stores the body base64-encoded (RFC 4648 §4); the
    /// old Lua plugin stored it gzipped and base64url-encoded.
    pub response_body: String,
    pub response_headers: Vec<Header>,
}

/// One response header. A repeated header (two `Set-Cookie`) is either two entries or one
/// entry whose value is an array (what the old Lua plugin sends).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub key: String,
    pub value: HeaderValue,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HeaderValue {
    One(String),
    Many(Vec<String>),
}

impl HeaderValue {
    /// Every value, in order.
    pub fn values(&self) -> impl Iterator<Item = &str> {
        let slice: &[String] = match self {
            HeaderValue::One(v) => std::slice::from_ref(v),
            HeaderValue::Many(vs) => vs,
        };
        slice.iter().map(String::as_str)
    }
}

/// 200 answer to a record: the capture is stored and replayed until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    pub idempotency_key: String,
    /// RFC 3339 instant at which the capture expires and the key is free again.
    pub expires_at: String,
}

/// 200 answer to a release: the key is free again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Released {
    pub idempotency_key: String,
}

/// `DELETE /api/v2/captures`: give a key back, so that a retry executes again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRequest {
    pub idempotency_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_token: Option<String>,
}

/// One operation of a batch (`POST /api/v2/captures/batch`, `{"operations": [...]}`): the body
/// of the single call with an `op` member naming it. Each is answered exactly as the single call
/// would answer it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum BatchOperation {
    Record(CaptureRecord),
    Release(ReleaseRequest),
}

/// The 200 answer to a batch: one result per operation, in order. `B` is the answer's body as
/// the single call would send it (the backend uses a JSON value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchAnswer<B> {
    pub results: Vec<BatchResult<B>>,
}

/// The answer of one batch operation: the status and body the single call would have given.
/// The body is left out of a 200 when the batch was sent with [`PREFER_MINIMAL`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchResult<B> {
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<B>,
}

/// `Prefer: return=minimal` (RFC 7240, §4.2) on a batch: its successful results carry their
/// status only (failed ones keep their problem). What the filter sends, since it reads only
/// the statuses; a backend that applied it says so in `Preference-Applied`.
pub const PREFER_MINIMAL: &str = "return=minimal";

/// `GET /-/ping` answer (the old shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    pub message: String,
}

/// An RFC 9457 problem, as both the backend and the filter send it. `error` repeats `detail`
/// for the old clients, which read that member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Integers as JSON Schema counts them: `201` and `201.0` alike (draft 2020-12, §6.1.1: "a
/// number with a zero fractional part"), which serde's own `u64` refuses. The contract says
/// `type: integer`, so a client whose JSON library writes every number with a fraction is
/// not refused for it; `201.5`, a negative number or one out of range still is.
mod integer {
    use serde::Deserializer;
    use serde::de::{Error, Unexpected, Visitor};
    use std::fmt;

    struct Integer {
        max: u64,
    }

    impl<'de> Visitor<'de> for Integer {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "an integer from 0 to {}", self.max)
        }

        fn visit_u64<E: Error>(self, v: u64) -> Result<u64, E> {
            if v <= self.max {
                Ok(v)
            } else {
                Err(E::invalid_value(Unexpected::Unsigned(v), &self))
            }
        }

        fn visit_i64<E: Error>(self, v: i64) -> Result<u64, E> {
            match u64::try_from(v) {
                Ok(v) => self.visit_u64(v),
                Err(_) => Err(E::invalid_value(Unexpected::Signed(v), &self)),
            }
        }

        fn visit_f64<E: Error>(self, v: f64) -> Result<u64, E> {
            // An integral float below 2^64 converts to exactly that u64.
            if v.fract() == 0.0 && v >= 0.0 && v <= self.max as f64 {
                Ok(v as u64)
            } else {
                Err(E::invalid_value(Unexpected::Float(v), &self))
            }
        }
    }

    /// A capture's status (a `u16`).
    pub fn status<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
        let max = u64::from(u16::MAX);
        let v = d.deserialize_any(Integer { max })?;
        u16::try_from(v).map_err(|_| D::Error::invalid_value(Unexpected::Unsigned(v), &"a u16"))
    }

    /// An optional `u64` field (absent or `null`: `None`).
    pub fn optional<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        struct Optional;
        impl<'de> Visitor<'de> for Optional {
            type Value = Option<u64>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer or null")
            }
            fn visit_none<E: Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_unit<E: Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                d.deserialize_any(Integer { max: u64::MAX }).map(Some)
            }
        }
        d.deserialize_option(Optional)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_digest_is_the_start_of_its_siphash_2_4() {
        // The SipHash paper's test vector for the 15 bytes 00 01 … 0e under the key 00 … 0f
        // (Aumasson and Bernstein, appendix A): a1 29 ca 61 49 be 45 e5 as a number, its bytes
        // little endian.
        let message: String = (0u8..15).map(char::from).collect();
        assert_eq!(key_digest(&message), "e545be4961ca");
        assert_ne!(key_digest("abd"), key_digest("abc"));
        assert_eq!(key_digest("").len(), 12);
    }

    #[test]
    fn keys_follow_the_old_servers_rule() {
        assert!(is_valid_key("qwe"));
        // A UUID with one extra character: 37 characters, not a multiple of 4.
        assert!(is_valid_key("8e03978e-40d5-43e8-bc93-6894a57f93241"));
        assert!(is_valid_key(
            "QkE2OTlCQjctNTg2QS00Qzk4LTk2OEYtRUY4NjVFRTBDODVG"
        ));
        assert!(!is_valid_key("==qwe--"));
        assert!(!is_valid_key(""));
        assert!(!is_valid_key("a+b/c"));
        assert!(is_valid_key(&"a".repeat(MAX_KEY_LEN)));
        assert!(!is_valid_key(&"a".repeat(MAX_KEY_LEN + 1)));
    }

    #[test]
    fn header_values_take_both_shapes() {
        let one: Header = serde_json::from_str(r#"{"key":"a","value":"x"}"#).unwrap();
        let many: Header = serde_json::from_str(r#"{"key":"a","value":["x","y"]}"#).unwrap();
        assert_eq!(one.value.values().collect::<Vec<_>>(), ["x"]);
        assert_eq!(many.value.values().collect::<Vec<_>>(), ["x", "y"]);
        assert_eq!(
            serde_json::to_string(&many).unwrap(),
            r#"{"key":"a","value":["x","y"]}"#
        );
    }

    #[test]
    fn integers_with_a_zero_fraction_are_integers() {
        let r: AllocateRequest =
            serde_json::from_str(r#"{"idempotency_key":"k","lease_ms":3000.0,"wait_ms":null}"#)
                .unwrap();
        assert_eq!((r.lease_ms, r.wait_ms), (Some(3000), None));
        let c: Capture = serde_json::from_str(
            r#"{"response_status":201.0,"response_body":"","response_headers":[]}"#,
        )
        .unwrap();
        assert_eq!(c.response_status, 201);
        for bad in [
            r#"{"idempotency_key":"k","lease_ms":1.5}"#,
            r#"{"idempotency_key":"k","lease_ms":-1}"#,
            r#"{"idempotency_key":"k","lease_ms":-0.5}"#,
            r#"{"idempotency_key":"k","lease_ms":1e300}"#,
            r#"{"idempotency_key":"k","lease_ms":"5"}"#,
            r#"{"idempotency_key":"k","wait_ms":true}"#,
        ] {
            assert!(
                serde_json::from_str::<AllocateRequest>(bad).is_err(),
                "{bad}"
            );
        }
        for bad in ["65536", "65536.0", "201.5", "-201", "\"201\""] {
            let json =
                format!(r#"{{"response_status":{bad},"response_body":"","response_headers":[]}}"#);
            assert!(serde_json::from_str::<Capture>(&json).is_err(), "{bad}");
        }
        // The same inside a batch (an internally tagged enum buffers its fields first).
        let op: BatchOperation = serde_json::from_str(
            r#"{"op":"record","idempotency_key":"k","response":{"response_status":200.0,"response_body":"","response_headers":[]}}"#,
        )
        .unwrap();
        assert!(matches!(op, BatchOperation::Record(r) if r.response.response_status == 200));
    }

    #[test]
    fn fingerprints_are_printable_ascii_within_the_limit() {
        assert!(is_valid_fingerprint(""));
        assert!(is_valid_fingerprint(
            "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"
        ));
        assert!(is_valid_fingerprint(&"f".repeat(MAX_FINGERPRINT_LEN)));
        assert!(!is_valid_fingerprint(&"f".repeat(MAX_FINGERPRINT_LEN + 1)));
        assert!(!is_valid_fingerprint("é"));
        assert!(!is_valid_fingerprint("a\nb"));
    }

    #[test]
    fn optional_fields_stay_optional() {
        let old: AllocateRequest = serde_json::from_str(r#"{"idempotency_key":"qwe"}"#).unwrap();
        assert_eq!(old.fingerprint, None);
        assert_eq!(
            serde_json::to_string(&old).unwrap(),
            r#"{"idempotency_key":"qwe"}"#
        );
        let unknown: ReleaseRequest =
            serde_json::from_str(r#"{"idempotency_key":"qwe","extra":1}"#).unwrap();
        assert_eq!(unknown.lease_token, None);
    }
}
