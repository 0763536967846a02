//! Copying a response as it passes, from what the host hands over: the header map in the
//! proxy-wasm serialization (any bytes: a broken or hostile host, header bytes nginx lets
//! through), a status, body chunks cut anywhere. Nothing panics; a response recorded is the
//! one seen: its status, every storable header but the hop-by-hop ones, and its body byte
//! for byte, in a record body the backend reads.
#![no_main]

use arbitrary::Arbitrary;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use idempotency::capture::{self, CaptureBuf, End};
use idempotency::config::StatusSet;
use idempotency::pairs;
use idempotency_spec::{CaptureRecord, HeaderValue};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    /// The host's serialization of the response headers (decoded; usually malformed).
    map: &'a [u8],
    /// Or headers that decode, built from pairs.
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
    use_pairs: bool,
    status: u16,
    limit: u16,
    chunks: Vec<&'a [u8]>,
    complete: bool,
}

fuzz_target!(|input: Input<'_>| {
    let map = if input.use_pairs {
        let bytes = pairs::encode(&input.pairs);
        let decoded = pairs::decode(&bytes).expect("a well-formed map decodes");
        assert_eq!(decoded, input.pairs);
        bytes
    } else {
        input.map.to_vec()
    };
    let Some(headers) = pairs::decode(&map) else {
        return;
    };
    let storable = headers
        .iter()
        .all(|(n, v)| std::str::from_utf8(n).is_ok() && std::str::from_utf8(v).is_ok());
    let text = pairs::lossy(&headers);
    let mut copy = CaptureBuf::from_pairs(input.status, &headers, u64::from(input.limit));
    let mut body = Vec::new();
    for chunk in &input.chunks {
        if copy.overflow() {
            copy.skip(chunk.len());
        } else {
            copy.push(chunk);
        }
        body.extend_from_slice(chunk);
    }
    assert_eq!(copy.seen(), body.len() as u64);
    let store = StatusSet(vec![(100, 599)]);
    if capture::at_end(Some(&copy), input.complete, &store) != End::Record {
        return;
    }
    assert!(storable, "a header that is not UTF-8 was recorded");
    assert!(body.len() <= usize::from(input.limit), "past the limit");
    let record: CaptureRecord = serde_json::from_slice(&copy.record_body("a2V5", "token"))
        .expect("the record body is a CaptureRecord");
    assert_eq!(record.response.response_status, input.status);
    assert_eq!(
        STANDARD.decode(&record.response.response_body).unwrap(),
        body
    );
    let tokens = capture::connection_tokens(text.iter().map(|(n, v)| (n.as_str(), v.as_str())));
    let kept: Vec<(String, String)> = text
        .into_iter()
        .filter(|(n, _)| !capture::is_hop_by_hop(n, &tokens) && !capture::is_credential(n))
        .collect();
    let stored: Vec<(String, String)> = record
        .response
        .response_headers
        .into_iter()
        .map(|h| match h.value {
            HeaderValue::One(v) => (h.key, v),
            HeaderValue::Many(_) => panic!("the filter stores one value per entry"),
        })
        .collect();
    assert_eq!(stored, kept);
});
