//! Turning a stored capture (or a problem) into the exact response the client must get, and
//! the fix-ups that make it exact on every host.
//!
//! The filter sends a local response with `send_http_response(status, headers, body)`, then
//! checks what the host actually emits in its own `on_http_response_headers` and
//! `on_http_response_body`, which both hosts run for a local response, and corrects any
//! difference:
//! - Kong (ngx_wasm_module) keeps only the last value of a repeated header name
//!   (`ngx_http_wasm_flush_local_response` sets each header with `NGX_HTTP_WASM_HEADERS_SET`),
//!   adds a default `Content-Type` to a non-empty body (`ngx_http_set_content_type`), and
//!   appends a line feed to a non-empty body with `Content-Length` counting it
//!   (`ngx_http_wasm_stash_local_response`). The fix-up re-adds the missing values, removes the
//!   `Content-Length` (the reply then goes out chunked, HOSTS.md) and replaces the body.
//! - Envoy keeps every header (`addCopy` in the wasm `sendLocalResponse`), keeps the given
//!   `content-type`, sets `content-length` to the body's length, and removes `content-type`
//!   from a body-less reply (`Utility::prepareLocalReply`). The fix-up restores that
//!   `content-type`; everything else already matches, so it does nothing.
//!
//! The rules are the same on both hosts: compare, and change only what differs.

use crate::b64::{STANDARD, URL_SAFE_NO_PAD};
use idempotency_spec::Capture;

use crate::capture::{connection_tokens, is_credential, is_hop_by_hop};

/// A response the filter sends itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u16,
    /// In order; repeated names kept. Never `content-length`.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Why a stored capture cannot be replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayError {
    BadStatus,
    BadBody,
}

impl ReplayError {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplayError::BadStatus => "status out of range",
            ReplayError::BadBody => "body is not base64",
        }
    }
}

/// The replay of a stored capture: hop-by-hop headers, cookies (`Set-Cookie`),
/// `strip_on_replay` and any stored replay header removed, the replay header (`true`) added.
pub fn from_capture(
    capture: &Capture,
    strip_on_replay: &[String],
    replay_header: &str,
) -> Result<LocalReply, ReplayError> {
    if !(200..=599).contains(&capture.response_status) {
        return Err(ReplayError::BadStatus);
    }
    let body = decode_body(&capture.response_body).ok_or(ReplayError::BadBody)?;
    let flat: Vec<(&str, &str)> = capture
        .response_headers
        .iter()
        .flat_map(|h| h.value.values().map(move |v| (h.key.as_str(), v)))
        .collect();
    let tokens = connection_tokens(flat.iter().copied());
    let mut headers: Vec<(String, String)> = flat
        .into_iter()
        .filter(|(n, _)| {
            !is_hop_by_hop(n, &tokens)
                // Never stored by this filter; an older capture (the old Lua plugin's) may.
                && !is_credential(n)
                && !strip_on_replay.iter().any(|s| n.eq_ignore_ascii_case(s))
                && (replay_header.is_empty() || !n.eq_ignore_ascii_case(replay_header))
                && crate::config::is_token(n)
        })
        // A value a host could not send as is (CR, LF, NUL or another control character)
        // never left an upstream through a proxy: such an entry is not replayed.
        .filter(|(_, v)| v.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f)))
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    if !replay_header.is_empty() {
        headers.push((replay_header.to_string(), "true".to_string()));
    }
    Ok(LocalReply {
        status: capture.response_status,
        headers,
        body,
    })
}

/// Decodes a stored body: standard base64 (this filter), or URL-safe base64 without padding
/// when that is all it can be.
fn decode_body(s: &str) -> Option<Vec<u8>> {
    STANDARD
        .decode(s.as_bytes())
        .or_else(|| URL_SAFE_NO_PAD.decode(s.as_bytes()))
}

/// One change to the headers the host is about to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderOp {
    Remove(String),
    Add(String, String),
}

/// The changes that turn the headers the host is about to send (`present`) into the local
/// reply's: every name of the reply carries exactly its values, in order; a `content-length`
/// that does not match the body is removed; a `content-type` the reply does not have is
/// removed. Headers the host adds on its own (`date`, `server`, …) stay.
pub fn header_fixups(present: &[(String, String)], reply: &LocalReply) -> Vec<HeaderOp> {
    let mut ops = Vec::new();
    let mut done: Vec<String> = Vec::new();
    for (name, _) in &reply.headers {
        let lname = name.to_ascii_lowercase();
        if done.contains(&lname) {
            continue;
        }
        let want: Vec<&str> = reply
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(&lname))
            .map(|(_, v)| v.as_str())
            .collect();
        let have: Vec<&str> = present
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(&lname))
            .map(|(_, v)| v.as_str())
            .collect();
        if want != have {
            if !have.is_empty() {
                ops.push(HeaderOp::Remove(lname.clone()));
            }
            for v in want {
                // The reply's own spelling of the name (Kong emits it as given).
                ops.push(HeaderOp::Add(name.clone(), v.to_string()));
            }
        }
        done.push(lname);
    }
    let body_len = reply.body.len().to_string();
    if present
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("content-length") && v.trim() != body_len)
    {
        ops.push(HeaderOp::Remove("content-length".to_string()));
    }
    let reply_has_ct = reply
        .headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("content-type"));
    if !reply_has_ct
        && present
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
    {
        ops.push(HeaderOp::Remove("content-type".to_string()));
    }
    ops
}

/// The body fix-up for one chunk the host is about to send: `out` bytes of the reply went out
/// already. Returns the bytes this chunk must carry, or `None` when it already carries them.
/// A chunk carries the next bytes of the reply, as many as it has; the last chunk (end of
/// stream) carries all that remains, so an extra line feed is dropped.
pub fn body_fixup(
    chunk: &[u8],
    out: usize,
    end_of_stream: bool,
    body: &[u8],
) -> (Option<Vec<u8>>, usize) {
    let remaining = body.get(out..).unwrap_or(&[]);
    let want = if end_of_stream {
        remaining
    } else {
        remaining.get(..chunk.len()).unwrap_or(remaining)
    };
    let next = out.saturating_add(want.len());
    if same(chunk, want) {
        (None, next)
    } else {
        (Some(want.to_vec()), next)
    }
}

/// `a == b`, eight bytes at a time: `==` on byte slices is `memcmp`, which on wasm32 is a loop
/// over single bytes (about 21 instructions a byte, for every chunk of a replayed body).
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let rest = a8.remainder() == b8.remainder();
    let word = |c: &[u8]| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
    rest && a8.zip(b8).all(|(x, y)| word(x) == word(y))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    // On wasm32-unknown-unknown the tests run under wasm-bindgen-test (Cargo.toml).
    use idempotency_spec::{Header, HeaderValue};
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn capture(body: &[u8]) -> Capture {
        Capture {
            response_status: 201,
            response_body: STANDARD.encode(body),
            response_headers: vec![
                Header {
                    key: "Content-Type".into(),
                    value: HeaderValue::One("application/octet-stream".into()),
                },
                Header {
                    key: "Link".into(),
                    value: HeaderValue::One("</a>; rel=preload".into()),
                },
                // Never stored by this filter; the old Lua plugin's captures may carry one.
                Header {
                    key: "Set-Cookie".into(),
                    value: HeaderValue::One("session=secret".into()),
                },
                Header {
                    key: "Link".into(),
                    value: HeaderValue::One("</b>; rel=preload".into()),
                },
                Header {
                    key: "x-many".into(),
                    value: HeaderValue::Many(vec!["1".into(), "2".into()]),
                },
                Header {
                    key: "Content-Length".into(),
                    value: HeaderValue::One("99".into()),
                },
                Header {
                    key: "Transfer-Encoding".into(),
                    value: HeaderValue::One("chunked".into()),
                },
                Header {
                    key: "X-Secret".into(),
                    value: HeaderValue::One("s".into()),
                },
                Header {
                    key: "Idempotent-Replayed".into(),
                    value: HeaderValue::One("false".into()),
                },
            ],
        }
    }

    #[test]
    fn replay_keeps_everything_but_hop_by_hop_cookies_and_stripped() {
        let r = from_capture(
            &capture(&[0, 1, 255]),
            &["x-secret".into()],
            "Idempotent-Replayed",
        )
        .unwrap();
        assert_eq!(r.status, 201);
        assert_eq!(r.body, [0, 1, 255]);
        assert_eq!(
            r.headers,
            h(&[
                ("Content-Type", "application/octet-stream"),
                ("Link", "</a>; rel=preload"),
                ("Link", "</b>; rel=preload"),
                ("x-many", "1"),
                ("x-many", "2"),
                ("Idempotent-Replayed", "true"),
            ])
        );
        let off = from_capture(&capture(b""), &[], "").unwrap();
        assert!(
            !off.headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case("set-cookie")),
            "a stored cookie is never replayed, whatever the configuration"
        );
        assert!(
            off.headers
                .iter()
                .any(|(n, v)| n == "Idempotent-Replayed" && v == "false")
        );
    }

    #[test]
    fn header_values_with_control_characters_are_not_replayed() {
        let mut c = capture(b"x");
        c.response_headers = vec![
            Header {
                key: "x-ok".into(),
                value: HeaderValue::One("a\tb".into()),
            },
            Header {
                key: "x-split".into(),
                value: HeaderValue::One("a\r\nset-cookie: evil=1".into()),
            },
        ];
        let r = from_capture(&c, &[], "").unwrap();
        assert_eq!(r.headers, h(&[("x-ok", "a\tb")]));
    }

    #[test]
    fn unusable_captures_are_errors() {
        let mut c = capture(b"x");
        c.response_body = "%%%".into();
        assert_eq!(from_capture(&c, &[], "r"), Err(ReplayError::BadBody));
        let mut c = capture(b"x");
        c.response_status = 600;
        assert_eq!(from_capture(&c, &[], "r"), Err(ReplayError::BadStatus));
        let mut c = capture(b"x");
        c.response_body = URL_SAFE_NO_PAD.encode([251, 255]);
        assert_eq!(from_capture(&c, &[], "r").unwrap().body, [251, 255]);
    }

    fn reply() -> LocalReply {
        LocalReply {
            status: 201,
            headers: h(&[
                ("content-type", "application/octet-stream"),
                ("link", "</a>"),
                ("link", "</b>"),
                ("idempotent-replayed", "true"),
            ]),
            body: b"0123456789".to_vec(),
        }
    }

    #[test]
    fn kong_headers_are_fixed() {
        // What ngx_wasm_module emits: last of a repeated header only, Content-Length + 1 for the LF.
        let present = h(&[
            (":status", "201"),
            ("content-type", "application/octet-stream"),
            ("link", "</b>"),
            ("idempotent-replayed", "true"),
            ("content-length", "11"),
            ("server", "kong"),
        ]);
        assert_eq!(
            header_fixups(&present, &reply()),
            vec![
                HeaderOp::Remove("link".into()),
                HeaderOp::Add("link".into(), "</a>".into()),
                HeaderOp::Add("link".into(), "</b>".into()),
                HeaderOp::Remove("content-length".into()),
            ]
        );
        // A default content-type added to a reply without one is removed.
        let mut r = reply();
        r.headers.retain(|(n, _)| n != "content-type");
        let present = h(&[
            ("content-type", "text/plain"),
            ("link", "</a>"),
            ("link", "</b>"),
            ("idempotent-replayed", "true"),
            ("content-length", "10"),
        ]);
        assert_eq!(
            header_fixups(&present, &r),
            vec![HeaderOp::Remove("content-type".into())]
        );
    }

    #[test]
    fn envoy_headers_need_nothing_but_a_bodyless_content_type() {
        let present = h(&[
            (":status", "201"),
            ("content-type", "application/octet-stream"),
            ("link", "</a>"),
            ("link", "</b>"),
            ("idempotent-replayed", "true"),
            ("content-length", "10"),
        ]);
        assert!(header_fixups(&present, &reply()).is_empty());
        let mut r = reply();
        r.body.clear();
        let present: Vec<_> = present
            .into_iter()
            .filter(|(n, _)| n != "content-type" && n != "content-length")
            .collect();
        assert_eq!(
            header_fixups(&present, &r),
            vec![HeaderOp::Add(
                "content-type".into(),
                "application/octet-stream".into()
            )]
        );
    }

    #[test]
    fn body_line_feed_is_dropped_and_exact_bodies_untouched() {
        let body = b"0123456789";
        // Kong: one chunk, body + LF, end of stream.
        let (rep, out) = body_fixup(b"0123456789\n", 0, true, body);
        assert_eq!(rep.as_deref(), Some(&body[..]));
        assert_eq!(out, 10);
        // Envoy: exact.
        assert_eq!(body_fixup(body, 0, true, body), (None, 10));
        // Split chunks, the LF in the last.
        let (r1, o1) = body_fixup(b"01234", 0, false, body);
        assert_eq!((r1, o1), (None, 5));
        let (r2, o2) = body_fixup(b"56789\n", o1, true, body);
        assert_eq!(r2.as_deref(), Some(&b"56789"[..]));
        assert_eq!(o2, 10);
        // Binary body with a trailing LF of its own stays whole.
        let bin = [0u8, 10];
        assert_eq!(
            body_fixup(&[0, 10, 10], 0, true, &bin).0.as_deref(),
            Some(&bin[..])
        );
        // Out of range offsets never panic.
        assert_eq!(body_fixup(b"x", 99, true, body), (Some(vec![]), 99));
    }

    /// The comparison eight bytes at a time says what `==` says: equal slices of every length
    /// around a word's, and the same with one byte changed at each place, or one more byte.
    #[test]
    fn chunks_compare_as_slices_do() {
        for len in 0..40usize {
            let a: Vec<u8> = (0..len).map(|i| (i * 37) as u8).collect();
            assert!(same(&a, &a.clone()));
            for i in 0..len {
                let mut b = a.clone();
                b[i] ^= 0x80;
                assert!(!same(&a, &b), "{len} {i}");
            }
            let mut longer = a.clone();
            longer.push(0);
            assert!(!same(&a, &longer));
            assert!(!same(&longer, &a));
        }
    }
}
