//! How an [`Entry`] is laid out as the value of the `captures` table.
//!
//! Compact and binary, because the value is what the disk holds per capture: no field names,
//! lengths as LEB128 varints, and a body that is canonical standard base64 (what the filter
//! always sends, RFC 4648 §4) stored as the bytes it encodes, a quarter smaller. Encoding
//! that body again gives back the very string that was recorded, so a replay is byte for byte
//! what was sent; any other body (the old Lua plugin's base64url, plain text) is kept as it
//! came.
//!
//! ```text
//! entry     = 0x01 (format) kind
//! kind      = 0x00 u64le(lease_expires_at) str(lease_token) opt(fingerprint)   ; allocated
//!           | 0x01 u64le(expires_at) opt(fingerprint) u16le(status) body headers ; completed
//! body      = 0x00 str(text) | 0x01 bytes(base64-decoded)
//! headers   = varint(count) { str(key) (0x00 str(value) | 0x01 varint(n) {str(value)}) }
//! opt(x)    = 0x00 | 0x01 str(x)
//! str, bytes = varint(length) octets
//! ```
//!
//! Data dirs written before this format hold entries as JSON (`{"state":...}`); a value whose
//! first byte is `{` is read that way, so an upgrade loses nothing and rewrites each entry in
//! the new format the next time it changes.

use base64_simd::STANDARD;
use idempotency_spec::{Capture, Header, HeaderValue};

use super::super::{Entry, StoreError};

const FORMAT: u8 = 0x01;
const ALLOCATED: u8 = 0x00;
const COMPLETED: u8 = 0x01;
const TEXT: u8 = 0x00;
const BASE64: u8 = 0x01;
const ONE: u8 = 0x00;
const MANY: u8 = 0x01;

/// The value stored for `entry`.
pub fn encode(entry: &Entry) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(FORMAT);
    match entry {
        Entry::Allocated {
            lease_token,
            lease_expires_at,
            fingerprint,
        } => {
            out.push(ALLOCATED);
            out.extend_from_slice(&lease_expires_at.to_le_bytes());
            put_str(&mut out, lease_token);
            put_opt(&mut out, fingerprint.as_deref());
        }
        Entry::Completed {
            capture,
            expires_at,
            fingerprint,
        } => {
            let body = &capture.response_body;
            out.reserve(body.len() + 64);
            out.push(COMPLETED);
            out.extend_from_slice(&expires_at.to_le_bytes());
            put_opt(&mut out, fingerprint.as_deref());
            out.extend_from_slice(&capture.response_status.to_le_bytes());
            match canonical_base64(body) {
                Some(bytes) => {
                    out.push(BASE64);
                    put_bytes(&mut out, &bytes);
                }
                None => {
                    out.push(TEXT);
                    put_str(&mut out, body);
                }
            }
            put_varint(&mut out, capture.response_headers.len() as u64);
            for header in &capture.response_headers {
                put_str(&mut out, &header.key);
                match &header.value {
                    HeaderValue::One(value) => {
                        out.push(ONE);
                        put_str(&mut out, value);
                    }
                    HeaderValue::Many(values) => {
                        out.push(MANY);
                        put_varint(&mut out, values.len() as u64);
                        for value in values {
                            put_str(&mut out, value);
                        }
                    }
                }
            }
        }
    }
    out
}

/// The entry a stored value holds, in this format or the JSON of older data dirs. The error
/// names what is wrong, never the content.
pub fn decode(value: &[u8]) -> Result<Entry, StoreError> {
    match value.first() {
        Some(b'{') => serde_json::from_slice(value)
            .map_err(|e| super::super::undecodable("a stored entry", &e)),
        Some(&FORMAT) => {
            let mut input = Reader(&value[1..]);
            let entry = input.entry()?;
            if !input.0.is_empty() {
                return Err(corrupt("trailing bytes"));
            }
            Ok(entry)
        }
        Some(other) => Err(corrupt(&format!("unknown format {other:#04x}"))),
        None => Err(corrupt("empty value")),
    }
}

/// The bytes `body` encodes, if it is standard base64 that encodes back to exactly `body`.
fn canonical_base64(body: &str) -> Option<Vec<u8>> {
    // Short bodies gain nothing worth a decode.
    if body.len() < 16 || !body.len().is_multiple_of(4) {
        return None;
    }
    let bytes = STANDARD.decode_to_vec(body).ok()?;
    // The comparison is what makes the replay byte for byte, whatever the decoder accepts
    // (non-canonical trailing bits, say).
    (STANDARD.encode_to_string(&bytes) == body).then_some(bytes)
}

fn corrupt(why: &str) -> StoreError {
    StoreError::Corrupt(format!("a stored entry: {why}"))
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bytes(out, s.as_bytes());
}

fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_str(out, s);
        }
    }
}

/// The rest of a value being decoded.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn entry(&mut self) -> Result<Entry, StoreError> {
        match self.u8()? {
            ALLOCATED => Ok(Entry::Allocated {
                lease_expires_at: self.u64()?,
                lease_token: self.string()?,
                fingerprint: self.opt()?,
            }),
            COMPLETED => {
                let expires_at = self.u64()?;
                let fingerprint = self.opt()?;
                let response_status = u16::from_le_bytes(self.take(2)?.try_into().unwrap());
                let response_body = match self.u8()? {
                    TEXT => self.string()?,
                    BASE64 => STANDARD.encode_to_string(self.bytes()?),
                    _ => return Err(corrupt("unknown body kind")),
                };
                let count = self.count()?;
                let mut response_headers = Vec::with_capacity(count);
                for _ in 0..count {
                    let key = self.string()?;
                    let value = match self.u8()? {
                        ONE => HeaderValue::One(self.string()?),
                        MANY => {
                            let n = self.count()?;
                            let mut values = Vec::with_capacity(n);
                            for _ in 0..n {
                                values.push(self.string()?);
                            }
                            HeaderValue::Many(values)
                        }
                        _ => return Err(corrupt("unknown header value kind")),
                    };
                    response_headers.push(Header { key, value });
                }
                Ok(Entry::Completed {
                    capture: Capture {
                        response_status,
                        response_body,
                        response_headers,
                    },
                    expires_at,
                    fingerprint,
                })
            }
            _ => Err(corrupt("unknown entry kind")),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.0.len() < n {
            return Err(corrupt("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64, StoreError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    fn varint(&mut self) -> Result<u64, StoreError> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            n |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(corrupt("overlong length"))
    }

    /// A count of items that follow, each at least one byte: bounded by what is left, so a
    /// corrupt count cannot make a huge allocation.
    fn count(&mut self) -> Result<usize, StoreError> {
        let n = self.varint()?;
        if n > self.0.len() as u64 {
            return Err(corrupt("count beyond the value"));
        }
        Ok(n as usize)
    }

    fn bytes(&mut self) -> Result<&'a [u8], StoreError> {
        let n = self.count()?;
        self.take(n)
    }

    fn string(&mut self) -> Result<String, StoreError> {
        let bytes = self.bytes()?;
        String::from_utf8(bytes.to_vec()).map_err(|_| corrupt("a string that is not UTF-8"))
    }

    fn opt(&mut self) -> Result<Option<String>, StoreError> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.string().map(Some),
            _ => Err(corrupt("unknown option tag")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    // The base64 crate: another implementation than the one under test.
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as REFERENCE;
    use proptest::prelude::*;

    fn completed(body: &str, headers: Vec<Header>) -> Entry {
        Entry::Completed {
            capture: Capture {
                response_status: 201,
                response_body: body.into(),
                response_headers: headers,
            },
            expires_at: 1_800_000_000_000,
            fingerprint: Some("sha-256=:abc:".into()),
        }
    }

    #[test]
    fn a_base64_body_is_stored_as_its_bytes_and_replayed_as_the_same_string() {
        let body = REFERENCE.encode((0..=255u8).cycle().take(768).collect::<Vec<_>>());
        let entry = completed(&body, vec![]);
        let value = encode(&entry);
        // 768 bytes of body plus a few dozen of framing, not 1,024 characters.
        assert!(value.len() < 768 + 64, "{}", value.len());
        assert_eq!(decode(&value).unwrap(), entry);
    }

    #[test]
    fn bodies_that_are_not_canonical_base64_are_kept_as_they_came() {
        for body in [
            "",
            "plain text, not base64 at all",
            "aGVsbG8gd29ybGQhIQ",   // no padding
            "aGVsbG8gd29ybGQhIR==", // trailing bits set: decodes, but not back to itself
            "aGVsbG8-d29ybGQ_IQ==", // base64url
            "aGVs bG8gd29ybGQhIQ==",
        ] {
            let entry = completed(body, vec![]);
            let value = encode(&entry);
            assert_eq!(decode(&value).unwrap(), entry, "{body:?}");
        }
    }

    #[test]
    fn entries_of_older_data_dirs_are_read_from_their_json() {
        let entry = completed(
            "eyJpZCI6NDJ9",
            vec![Header {
                key: "Set".into(),
                value: HeaderValue::Many(vec!["a".into(), "b".into()]),
            }],
        );
        let json = serde_json::to_vec(&entry).unwrap();
        assert_eq!(json[0], b'{');
        assert_eq!(decode(&json).unwrap(), entry);
        let lease = Entry::Allocated {
            lease_token: "t".into(),
            lease_expires_at: 5,
            fingerprint: None,
        };
        assert_eq!(decode(&serde_json::to_vec(&lease).unwrap()).unwrap(), lease);
    }

    #[test]
    fn a_damaged_value_is_an_error_that_names_no_content() {
        let value = encode(&completed("c2VjcmV0LXNlY3JldC1zZWNyZXQ=", vec![]));
        for cut in 0..value.len() {
            let error = decode(&value[..cut]).unwrap_err().to_string();
            assert!(!error.contains("secret"), "{error}");
        }
        let mut long = value.clone();
        long.push(0);
        assert!(matches!(decode(&long), Err(StoreError::Corrupt(_))));
        assert!(matches!(decode(&[0x07]), Err(StoreError::Corrupt(_))));
        // A huge count in a short value is refused, not allocated.
        assert!(
            decode(&[
                FORMAT, COMPLETED, 0, 0, 0, 0, 0, 0, 0, 0, 0, 201, 0, TEXT, 0, 0xff, 0xff, 0xff,
                0xff, 0x0f
            ])
            .is_err()
        );
    }

    fn header() -> impl Strategy<Value = Header> {
        (
            ".{0,12}",
            prop_oneof![
                ".{0,20}".prop_map(HeaderValue::One),
                prop::collection::vec(".{0,8}", 0..4).prop_map(HeaderValue::Many),
            ],
        )
            .prop_map(|(key, value)| Header { key, value })
    }

    fn entry() -> impl Strategy<Value = Entry> {
        let body = prop_oneof![
            ".{0,64}",
            prop::collection::vec(any::<u8>(), 0..200).prop_map(|b| REFERENCE.encode(b)),
        ];
        prop_oneof![
            (".{0,40}", any::<u64>(), prop::option::of(".{0,40}")).prop_map(
                |(lease_token, lease_expires_at, fingerprint)| Entry::Allocated {
                    lease_token,
                    lease_expires_at,
                    fingerprint,
                }
            ),
            (
                any::<u16>(),
                body,
                prop::collection::vec(header(), 0..5),
                any::<u64>(),
                prop::option::of(".{0,40}")
            )
                .prop_map(
                    |(
                        response_status,
                        response_body,
                        response_headers,
                        expires_at,
                        fingerprint,
                    )| {
                        Entry::Completed {
                            capture: Capture {
                                response_status,
                                response_body,
                                response_headers,
                            },
                            expires_at,
                            fingerprint,
                        }
                    }
                ),
        ]
    }

    proptest! {
        #[test]
        fn every_entry_comes_back_as_it_was_stored(entry in entry()) {
            prop_assert_eq!(decode(&encode(&entry)).unwrap(), entry);
        }

        #[test]
        fn arbitrary_bytes_decode_or_fail_without_panicking(mut value in prop::collection::vec(any::<u8>(), 0..64)) {
            if let Some(first) = value.first_mut() && *first != b'{' { *first = FORMAT; }
            let _ = decode(&value);
        }
    }
}
