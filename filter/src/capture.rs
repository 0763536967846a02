//! Copying the upstream's response as it passes (status, headers, body chunks up to
//! `max_capture_bytes`), deciding at its end whether to record or release, and building the
//! record body. Nothing here changes what the client receives.

use crate::b64::STANDARD;
use crate::config::StatusSet;
use crate::json;
use crate::pairs::is_named;

/// Headers that describe one connection, never stored nor replayed (RFC 9110 §7.6.1), plus
/// `content-length`, which is recomputed on replay.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
    "content-length",
];

/// Whether a header is never stored or replayed: a pseudo-header, a hop-by-hop header, or one
/// named by the response's own `Connection` header.
pub fn is_hop_by_hop(name: &str, connection_tokens: &[String]) -> bool {
    hop_by_hop_bytes(name.as_bytes(), connection_tokens)
}

/// [`is_hop_by_hop`] of a name as the host hands it over (any bytes).
fn hop_by_hop_bytes<T: AsRef<[u8]>>(name: &[u8], connection_tokens: &[T]) -> bool {
    name.first() == Some(&b':')
        || HOP_BY_HOP.iter().any(|h| is_named(name, h))
        || connection_tokens
            .iter()
            .any(|t| name.eq_ignore_ascii_case(t.as_ref()))
}

/// Response headers never stored nor replayed, whatever the configuration: a session cookie
/// is a credential, which must not sit in the backend's store, nor be handed out again from
/// it.
const NEVER_STORED: &[&str] = &["set-cookie", "set-cookie2"];

/// Whether a response header is never stored or replayed because it carries a credential.
pub fn is_credential(name: &str) -> bool {
    credential_bytes(name.as_bytes())
}

fn credential_bytes(name: &[u8]) -> bool {
    NEVER_STORED.iter().any(|h| is_named(name, h))
}

/// The header names listed in the `Connection` headers.
pub fn connection_tokens<'a>(headers: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<String> {
    connection_token_bytes(headers.map(|(n, v)| (n.as_bytes(), v.as_bytes())))
        .into_iter()
        .map(|t| String::from_utf8_lossy(t).to_ascii_lowercase())
        .collect()
}

/// [`connection_tokens`], borrowed from the headers as the host hands them over (no
/// allocation for a response without a `Connection` header, which is most of them).
fn connection_token_bytes<'a>(
    headers: impl Iterator<Item = (&'a [u8], &'a [u8])>,
) -> Vec<&'a [u8]> {
    headers
        .filter(|(n, _)| n.eq_ignore_ascii_case(b"connection"))
        .flat_map(|(_, v)| v.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
        .collect()
}

/// Whether a header's bytes are text (UTF-8), ASCII told first, word by word.
fn is_text(bytes: &[u8]) -> bool {
    bytes.is_ascii() || std::str::from_utf8(bytes).is_ok()
}

/// A response being copied.
#[derive(Debug, Clone)]
pub struct CaptureBuf {
    pub status: u16,
    /// The headers stored, already as the record's JSON (`{"key":…,"value":…}` entries
    /// separated by commas): each checked for UTF-8 and escaped once, as it passes, with no
    /// copy of its own.
    headers_json: Vec<u8>,
    /// `Content-Length`, when the response has one.
    pub content_length: Option<u64>,
    body: Vec<u8>,
    limit: usize,
    /// Bytes seen, including those past the limit.
    seen: u64,
    overflow: bool,
    /// A header name or value is not UTF-8: the backend stores text, so this response cannot
    /// be replayed exactly; it passes and the key is released.
    unstorable: bool,
    /// A body chunk could not be read from the host: the copy misses bytes the client got.
    unreadable: bool,
    /// The gateway (or a filter after this one) answered, not the upstream: nothing the
    /// request did, so nothing to replay.
    not_from_upstream: bool,
}

impl CaptureBuf {
    /// Starts a copy from the response headers as text (`:status` included or not).
    pub fn new(status: u16, headers: Vec<(String, String)>, limit: u64) -> CaptureBuf {
        CaptureBuf::from_pairs(status, &headers, limit)
    }

    /// Starts a copy from the response headers as the host gives them (as bytes, owned or
    /// borrowed from the host's map: [`crate::pairs::parse`]): only those stored are copied.
    pub fn from_pairs<N: AsRef<[u8]>, V: AsRef<[u8]>>(
        status: u16,
        headers: &[(N, V)],
        limit: u64,
    ) -> CaptureBuf {
        let bytes = || headers.iter().map(|(n, v)| (n.as_ref(), v.as_ref()));
        let tokens = connection_token_bytes(bytes());
        // The first Content-Length, found by the loop below (it is never stored).
        let mut content_length: Option<Option<u64>> = None;
        let mut headers_json =
            Vec::with_capacity(bytes().map(|(n, v)| n.len() + v.len() + 21).sum::<usize>());
        let mut unstorable = false;
        for (name, value) in bytes() {
            if content_length.is_none() && is_named(name, "content-length") {
                content_length = Some(crate::pairs::number(value));
            }
            if hop_by_hop_bytes(name, &tokens) || credential_bytes(name) {
                // Not stored, but a response with any header that is not text is not
                // stored either (what the backend could not hold, it could not replay).
                unstorable |= !is_text(name) || !is_text(value);
                continue;
            }
            let mark = headers_json.len();
            if mark > 0 {
                headers_json.push(b',');
            }
            headers_json.extend_from_slice(b"{\"key\":");
            let mut ok = json::string_bytes(&mut headers_json, name);
            headers_json.extend_from_slice(b",\"value\":");
            ok = ok && json::string_bytes(&mut headers_json, value);
            headers_json.push(b'}');
            if !ok {
                unstorable = true;
                headers_json.truncate(mark);
            }
        }
        let content_length = content_length.flatten();
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let overflow = content_length.is_some_and(|cl| cl > limit as u64);
        // Room for the whole body when its length is known and kept (no regrowth per chunk).
        let body = match content_length.and_then(|cl| usize::try_from(cl).ok()) {
            Some(cl) if !overflow && !unstorable => Vec::with_capacity(cl),
            _ => Vec::new(),
        };
        if unstorable {
            headers_json = Vec::new();
        }
        CaptureBuf {
            status,
            headers_json,
            content_length,
            body,
            limit,
            seen: 0,
            overflow,
            unstorable,
            unreadable: false,
            not_from_upstream: false,
        }
    }

    /// Adds a body chunk; past the limit the copy is dropped (the response still passes).
    pub fn push(&mut self, chunk: &[u8]) {
        self.seen = self.seen.saturating_add(chunk.len() as u64);
        if self.overflow() {
            return;
        }
        if self.body.len().saturating_add(chunk.len()) > self.limit {
            self.overflow = true;
            self.body = Vec::new();
            return;
        }
        self.body.extend_from_slice(chunk);
    }

    /// Counts a chunk the host would not give (or gave short): the copy can never be whole,
    /// so the response is released rather than recorded without those bytes.
    pub fn lost(&mut self, len: usize) {
        self.seen = self.seen.saturating_add(len as u64);
        self.unreadable = true;
        self.body = Vec::new();
    }

    /// The host says the gateway made this response (Envoy's `response.code_details` is not
    /// `via_upstream`, Kong's `$upstream_status` is empty): it is released, never stored.
    pub fn not_from_upstream(&mut self) {
        self.not_from_upstream = true;
    }

    /// Counts a chunk that is not copied (the copy already overflowed).
    pub fn skip(&mut self, len: usize) {
        self.seen = self.seen.saturating_add(len as u64);
        if !self.overflow && self.body.len().saturating_add(len) > self.limit {
            self.overflow = true;
            self.body = Vec::new();
        }
    }

    /// Whether copying the body is pointless (too large, or the response cannot be stored).
    pub fn overflow(&self) -> bool {
        self.overflow || self.unstorable || self.unreadable
    }

    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// The record body (`POST /captures`, an [`idempotency_spec::CaptureRecord`], its fields
    /// in their order): the body base64 (standard alphabet, written in place: nothing in it
    /// needs escaping), every header as its own entry (two `Set-Cookie` stay two).
    pub fn record_body(self, idempotency_key: &str, lease_token: &str) -> Vec<u8> {
        let b64 = STANDARD.encoded_len(self.body.len());
        let mut out = Vec::with_capacity(
            160 + json::max_string_len(idempotency_key)
                + json::max_string_len(lease_token)
                + b64
                + self.headers_json.len(),
        );
        out.push(b'{');
        json::field(&mut out, "idempotency_key", idempotency_key);
        out.push(b',');
        json::field(&mut out, "lease_token", lease_token);
        out.extend_from_slice(b",\"response\":{");
        json::key(&mut out, "response_status");
        json::number(&mut out, u64::from(self.status));
        out.push(b',');
        json::key(&mut out, "response_body");
        out.push(b'"');
        STANDARD.encode_into(&self.body, &mut out);
        out.extend_from_slice(b"\",");
        json::key(&mut out, "response_headers");
        out.push(b'[');
        out.extend_from_slice(&self.headers_json);
        out.extend_from_slice(b"]}}");
        out
    }
}

/// The release body (`DELETE /captures`, an [`idempotency_spec::ReleaseRequest`]).
pub fn release_body(idempotency_key: &str, lease_token: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        40 + json::max_string_len(idempotency_key) + json::max_string_len(lease_token),
    );
    out.push(b'{');
    json::field(&mut out, "idempotency_key", idempotency_key);
    out.push(b',');
    json::field(&mut out, "lease_token", lease_token);
    out.push(b'}');
    out
}

/// What to do with the key when the request ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Record,
    Release(ReleaseReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseReason {
    /// No response reached the filter (client gone, upstream unreachable).
    NoResponse,
    /// A 502 or 504: a proxy-generated failure or time-out, never stored.
    GatewayFailure,
    /// A 1xx final status (101 Switching Protocols): nothing a retry could be given back.
    Informational,
    /// The status is not in `store_status`.
    NotStored,
    /// The body exceeded `max_capture_bytes`.
    TooLarge,
    /// The response did not complete (no end of stream, bytes short of Content-Length).
    Incomplete,
    /// A header value is not UTF-8, which the backend's capture (JSON text) cannot hold.
    Unstorable,
    /// A body chunk could not be read from the host: the copy would miss it.
    Unreadable,
    /// The gateway answered (a 408, a 403 from RBAC, a 429 from a rate limit, a 503 on a
    /// connect failure), not the upstream: a retry must reach the upstream.
    NotFromUpstream,
}

impl ReleaseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseReason::NoResponse => "no response",
            ReleaseReason::GatewayFailure => "gateway failure (502/504)",
            ReleaseReason::Informational => "informational status (1xx)",
            ReleaseReason::NotStored => "status not in store_status",
            ReleaseReason::TooLarge => "response larger than max_capture_bytes",
            ReleaseReason::Incomplete => "response incomplete",
            ReleaseReason::Unstorable => "a response header is not UTF-8",
            ReleaseReason::Unreadable => "a response body chunk could not be read",
            ReleaseReason::NotFromUpstream => "the gateway answered, not the upstream",
        }
    }
}

/// Decides at the end of the request. `complete`: end of stream was seen (or trailers).
/// Without it, a response is complete only when the bytes seen equal its Content-Length (on
/// Kong, end of stream does not come when the body buffers overflowed; HOSTS.md).
pub fn at_end(capture: Option<&CaptureBuf>, complete: bool, store: &StatusSet) -> End {
    let Some(c) = capture else {
        return End::Release(ReleaseReason::NoResponse);
    };
    if c.status == 502 || c.status == 504 {
        return End::Release(ReleaseReason::GatewayFailure);
    }
    if c.not_from_upstream {
        return End::Release(ReleaseReason::NotFromUpstream);
    }
    // A replay answers with a final response; a 1xx one (an upgrade) cannot be given twice.
    if c.status < 200 {
        return End::Release(ReleaseReason::Informational);
    }
    if !store.contains(c.status) {
        return End::Release(ReleaseReason::NotStored);
    }
    if c.overflow {
        return End::Release(ReleaseReason::TooLarge);
    }
    if c.unstorable {
        return End::Release(ReleaseReason::Unstorable);
    }
    if c.unreadable {
        return End::Release(ReleaseReason::Unreadable);
    }
    // Without end of stream: the bytes seen equal Content-Length, or a status that never
    // has a body (204, 304) and none was seen.
    let complete = complete
        || c.content_length == Some(c.seen)
        || (matches!(c.status, 204 | 304) && c.seen == 0);
    if !complete {
        return End::Release(ReleaseReason::Incomplete);
    }
    End::Record
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    // On wasm32-unknown-unknown the tests run under wasm-bindgen-test (Cargo.toml).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use idempotency_spec::{Capture, CaptureRecord, Header, HeaderValue, ReleaseRequest};

    /// The bodies are written by hand: byte for byte what serde_json makes of the spec's types.
    #[test]
    fn record_and_release_bodies_are_what_serde_json_writes() {
        let odd = "q\"uote b\\ack \u{1} \n \u{7f} é 😀 </script>";
        for (headers, body, key, lease) in [
            (vec![], vec![], "k", "t"),
            (
                vec![("content-type", "text/plain"), ("x-odd", odd), (odd, "v")],
                b"\x00\xff\"\\ any bytes".to_vec(),
                "a2V5-_",
                odd,
            ),
            (vec![("a", "")], (0..=255).collect::<Vec<u8>>(), odd, ""),
        ] {
            let mut c = CaptureBuf::new(201, h(&headers), 1000);
            c.push(&body);
            let expected = CaptureRecord {
                idempotency_key: key.to_string(),
                lease_token: Some(lease.to_string()),
                response: Capture {
                    response_status: 201,
                    response_body: STANDARD.encode(&body),
                    response_headers: headers
                        .iter()
                        .map(|(n, v)| Header {
                            key: n.to_string(),
                            value: HeaderValue::One(v.to_string()),
                        })
                        .collect(),
                },
            };
            assert_eq!(
                String::from_utf8(c.record_body(key, lease)).unwrap(),
                serde_json::to_string(&expected).unwrap()
            );
            let expected = ReleaseRequest {
                idempotency_key: key.to_string(),
                lease_token: Some(lease.to_string()),
            };
            assert_eq!(
                String::from_utf8(release_body(key, lease)).unwrap(),
                serde_json::to_string(&expected).unwrap()
            );
        }
    }

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    /// The headers a capture's record stores, in their order.
    fn stored(c: &CaptureBuf) -> Vec<(String, String)> {
        let rec: CaptureRecord = serde_json::from_slice(&c.clone().record_body("k", "t")).unwrap();
        rec.response
            .response_headers
            .into_iter()
            .map(|h| match h.value {
                HeaderValue::One(v) => (h.key, v),
                HeaderValue::Many(_) => panic!("one value per entry"),
            })
            .collect()
    }

    fn below_500() -> StatusSet {
        StatusSet(vec![(100, 499)])
    }

    #[test]
    fn copies_headers_without_hop_by_hop_nor_cookies_and_keeps_repeats() {
        let c = CaptureBuf::new(
            201,
            h(&[
                (":status", "201"),
                ("content-type", "application/octet-stream"),
                ("link", "</a>; rel=preload"),
                ("Set-Cookie", "session=secret"),
                ("link", "</b>; rel=preload"),
                ("set-cookie2", "old=1"),
                ("connection", "keep-alive, x-conn"),
                ("x-conn", "1"),
                ("transfer-encoding", "chunked"),
                ("content-length", "3"),
            ]),
            100,
        );
        assert_eq!(
            stored(&c),
            h(&[
                ("content-type", "application/octet-stream"),
                ("link", "</a>; rel=preload"),
                ("link", "</b>; rel=preload")
            ])
        );
        assert_eq!(c.content_length, Some(3));
        let rec: CaptureRecord = serde_json::from_slice(&c.record_body("k", "t")).unwrap();
        assert_eq!(rec.lease_token.as_deref(), Some("t"));
        assert_eq!(rec.response.response_headers.len(), 3);
    }

    #[test]
    fn the_unstored_names_are_matched_in_any_case() {
        // `is_named` folds the header's name only: the lists must be in lower case.
        for name in HOP_BY_HOP.iter().chain(NEVER_STORED) {
            assert_eq!(name.to_ascii_lowercase(), *name);
        }
        let c = CaptureBuf::new(
            200,
            h(&[
                ("Content-Length", " 12 "),
                ("CONTENT-LENGTH", "13"),
                ("Set-Cookie", "a=1"),
                ("Transfer-Encoding", "chunked"),
                ("Content-Type", "text/plain"),
            ]),
            100,
        );
        assert_eq!(c.content_length, Some(12), "the first, trimmed");
        assert_eq!(stored(&c), h(&[("Content-Type", "text/plain")]));
    }

    #[test]
    fn body_is_stored_base64_byte_for_byte() {
        let mut c = CaptureBuf::new(200, Vec::new(), 10);
        c.push(&[0, 255, 10]);
        c.push(&[13]);
        assert_eq!(at_end(Some(&c), true, &below_500()), End::Record);
        let rec: CaptureRecord = serde_json::from_slice(&c.record_body("k", "t")).unwrap();
        assert_eq!(
            STANDARD.decode(rec.response.response_body).unwrap(),
            [0, 255, 10, 13]
        );
    }

    #[test]
    fn a_chunk_the_host_would_not_give_releases() {
        let mut c = CaptureBuf::new(200, h(&[("content-length", "6")]), 100);
        c.push(b"abc");
        c.lost(3);
        c.push(b"def");
        assert_eq!(c.seen(), 9);
        assert_eq!(
            at_end(Some(&c), true, &below_500()),
            End::Release(ReleaseReason::Unreadable)
        );
    }

    #[test]
    fn a_final_1xx_is_never_stored() {
        // `store_status` may include 100-199 (the default does), but a replay answers with a
        // final response: an upgrade (101) cannot be given to a retry.
        let c = CaptureBuf::new(101, Vec::new(), 100);
        assert_eq!(
            at_end(Some(&c), true, &below_500()),
            End::Release(ReleaseReason::Informational)
        );
    }

    #[test]
    fn over_the_limit_releases() {
        let mut c = CaptureBuf::new(200, Vec::new(), 4);
        c.push(b"abc");
        c.push(b"de");
        assert!(c.overflow());
        assert_eq!(c.seen(), 5);
        assert_eq!(
            at_end(Some(&c), true, &below_500()),
            End::Release(ReleaseReason::TooLarge)
        );
        let c = CaptureBuf::new(200, h(&[("Content-Length", "5")]), 4);
        assert!(c.overflow(), "known too large from Content-Length");
        let mut c = CaptureBuf::new(200, Vec::new(), 4);
        c.push(b"abcd");
        assert!(!c.overflow(), "exactly the limit is kept");
    }

    /// Sizes past 4 GiB, which a 32-bit `usize` (the filter a gateway runs) cannot hold: a
    /// Content-Length there, a limit there, bytes counted past it.
    #[test]
    fn sizes_past_4_gib_are_counted_in_64_bits() {
        let c = CaptureBuf::new(200, h(&[("content-length", "4294967297")]), 1 << 20);
        assert_eq!(c.content_length, Some(4_294_967_297));
        assert!(
            c.overflow(),
            "a Content-Length past 4 GiB is over any limit"
        );
        let mut c = CaptureBuf::new(200, h(&[("content-length", "3")]), 5 << 30);
        c.push(b"abc");
        assert!(
            !c.overflow(),
            "a limit past 4 GiB is no limit at all, not a small one"
        );
        assert_eq!(at_end(Some(&c), false, &below_500()), End::Record);
        // 8 GiB and 1 byte of body, in chunks as large as a 32-bit host can announce.
        let mut c = CaptureBuf::new(200, h(&[("content-length", "8589934593")]), 4);
        let most = usize::try_from(u32::MAX).unwrap();
        c.skip(most);
        c.skip(most);
        c.push(b"abc");
        assert_eq!(c.seen(), 8_589_934_593);
        assert_eq!(
            at_end(Some(&c), false, &below_500()),
            End::Release(ReleaseReason::TooLarge)
        );
    }

    #[test]
    fn end_decisions() {
        let store = below_500();
        assert_eq!(
            at_end(None, true, &store),
            End::Release(ReleaseReason::NoResponse)
        );
        for s in [502, 504] {
            let c = CaptureBuf::new(s, Vec::new(), 10);
            let all = StatusSet(vec![(100, 599)]);
            assert_eq!(
                at_end(Some(&c), true, &all),
                End::Release(ReleaseReason::GatewayFailure)
            );
        }
        let c = CaptureBuf::new(503, Vec::new(), 10);
        assert_eq!(
            at_end(Some(&c), true, &store),
            End::Release(ReleaseReason::NotStored)
        );
        let c = CaptureBuf::new(500, Vec::new(), 10);
        assert_eq!(
            at_end(Some(&c), true, &StatusSet(vec![(500, 500)])),
            End::Record
        );
        // No end of stream: complete only when Content-Length bytes were seen.
        let mut c = CaptureBuf::new(200, h(&[("content-length", "3")]), 10);
        c.push(b"ab");
        assert_eq!(
            at_end(Some(&c), false, &store),
            End::Release(ReleaseReason::Incomplete)
        );
        c.push(b"c");
        assert_eq!(at_end(Some(&c), false, &store), End::Record);
        let c = CaptureBuf::new(200, Vec::new(), 10);
        assert_eq!(
            at_end(Some(&c), false, &store),
            End::Release(ReleaseReason::Incomplete)
        );
        // A 204 or 304 has no body: complete without end of stream or Content-Length.
        for s in [204, 304] {
            let c = CaptureBuf::new(s, Vec::new(), 10);
            assert_eq!(at_end(Some(&c), false, &store), End::Record);
        }
    }

    #[test]
    fn a_header_that_is_not_utf8_releases() {
        let headers = vec![
            (b"content-type".to_vec(), b"text/plain".to_vec()),
            (b"x-name".to_vec(), b"caf\xe9".to_vec()),
        ];
        let mut c = CaptureBuf::from_pairs(200, &headers, 10);
        assert!(c.overflow(), "nothing is copied");
        c.push(b"abc");
        assert_eq!(c.seen(), 3);
        assert_eq!(
            at_end(Some(&c), true, &below_500()),
            End::Release(ReleaseReason::Unstorable)
        );
        // Not stored either way, but not text: the same (as before headers were copied as
        // they pass); a name that is not text too.
        for odd in [
            (b"set-cookie".to_vec(), b"s=\xe9".to_vec()),
            (b"connection".to_vec(), b"close\xff".to_vec()),
            (b"x-\xff".to_vec(), b"1".to_vec()),
        ] {
            let c = CaptureBuf::from_pairs(200, &[headers[0].clone(), odd], 10);
            assert_eq!(
                at_end(Some(&c), true, &below_500()),
                End::Release(ReleaseReason::Unstorable)
            );
        }
        let ok = CaptureBuf::from_pairs(200, &headers[..1], 10);
        assert_eq!(stored(&ok), h(&[("content-type", "text/plain")]));
        assert_eq!(at_end(Some(&ok), true, &below_500()), End::Record);
    }

    #[test]
    fn release_body_shape() {
        let r: ReleaseRequest = serde_json::from_slice(&release_body("k", "t")).unwrap();
        assert_eq!(r.idempotency_key, "k");
        assert_eq!(r.lease_token.as_deref(), Some("t"));
    }
}
