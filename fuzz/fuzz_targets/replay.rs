//! Building a replay from a stored capture (anything the backend may hold: the old Lua
//! plugin's, another writer's), and the fix-ups that make what the host emits exact. A
//! replay never carries a header a host could not send or must not repeat; once the fix-ups
//! are applied to whatever headers the host was about to send, every header of the reply
//! has exactly its values, in order; and the body the client gets, however the host cuts it
//! and whether it adds Kong's line feed, is the stored body.
#![no_main]

use arbitrary::Arbitrary;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use idempotency::capture::HOP_BY_HOP;
use idempotency::config::is_token;
use idempotency::replay::{self, HeaderOp};
use idempotency_spec::{Capture, Header, HeaderValue};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    status: u16,
    /// The stored body: as bytes, base64 as this filter stores it, unless `raw_body`.
    body: Vec<u8>,
    raw_body: Option<String>,
    headers: Vec<(String, Vec<String>, bool)>,
    strip: Vec<String>,
    replay_header: String,
    /// What the host already put in the response headers.
    present: Vec<(String, String)>,
    /// Where the host cuts the body it emits, and whether it appends a line feed.
    cuts: Vec<u8>,
    line_feed: bool,
}

fuzz_target!(|input: Input| {
    let capture = Capture {
        response_status: input.status,
        response_body: input
            .raw_body
            .unwrap_or_else(|| STANDARD.encode(&input.body)),
        response_headers: input
            .headers
            .into_iter()
            .map(|(key, mut values, many)| Header {
                key,
                value: if many || values.is_empty() {
                    HeaderValue::Many(values)
                } else {
                    HeaderValue::One(values.swap_remove(0))
                },
            })
            .collect(),
    };
    // The replay header comes from the configuration, which takes only a token (or ""), and
    // no hop-by-hop name nor Content-Length (config.rs).
    let hop_by_hop = HOP_BY_HOP
        .iter()
        .any(|h| input.replay_header.eq_ignore_ascii_case(h));
    let replay_header =
        if input.replay_header.is_empty() || (is_token(&input.replay_header) && !hop_by_hop) {
            input.replay_header
        } else {
            "Idempotent-Replayed".to_string()
        };
    let Ok(reply) = replay::from_capture(&capture, &input.strip, &replay_header) else {
        return;
    };
    assert!((200..=599).contains(&reply.status));
    for (name, value) in &reply.headers {
        assert!(is_token(name), "{name:?}");
        assert!(
            value
                .bytes()
                .all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f)),
            "{value:?}"
        );
        assert!(
            !HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h)),
            "{name}"
        );
        // The filter's own replay header is added whatever `strip_on_replay` says.
        assert!(
            *name == replay_header || !input.strip.iter().any(|s| name.eq_ignore_ascii_case(s)),
            "{name}"
        );
    }

    // The header fix-ups, applied to what the host was about to send.
    let mut sent = input.present.clone();
    for op in replay::header_fixups(&input.present, &reply) {
        match op {
            HeaderOp::Remove(name) => sent.retain(|(n, _)| !n.eq_ignore_ascii_case(&name)),
            HeaderOp::Add(name, value) => sent.push((name, value)),
        }
    }
    let values = |headers: &[(String, String)], name: &str| -> Vec<String> {
        headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .collect()
    };
    for (name, _) in &reply.headers {
        assert_eq!(values(&sent, name), values(&reply.headers, name), "{name}");
    }
    for length in values(&sent, "content-length") {
        assert_eq!(length.trim(), reply.body.len().to_string());
    }
    if values(&reply.headers, "content-type").is_empty() {
        assert!(values(&sent, "content-type").is_empty());
    }

    // The body fix-up, over the chunks the host emits.
    let mut emitted = reply.body.clone();
    if input.line_feed && !emitted.is_empty() {
        emitted.push(b'\n');
    }
    let mut chunks = Vec::new();
    let mut rest = emitted.as_slice();
    for cut in input.cuts {
        let at = usize::from(cut).min(rest.len());
        let (chunk, tail) = rest.split_at(at);
        chunks.push(chunk);
        rest = tail;
    }
    chunks.push(rest);
    let mut out = 0;
    let mut client = Vec::new();
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let (replacement, next) = replay::body_fixup(chunk, out, i == last, &reply.body);
        client.extend_from_slice(replacement.as_deref().unwrap_or(chunk));
        out = next;
    }
    assert_eq!(client, reply.body);
});
