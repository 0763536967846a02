//! The digests that name a key in the backend are a stored format: a filter that computed them
//! differently would not find the keys an earlier one allocated, and a retry across an upgrade
//! would run twice. These pin each to the value the filter gave before its hashing, hex and
//! base64 were rewritten for speed, and rebuild it from its documented encoding, so that no
//! change of code can change a format unnoticed.

use base64::Engine as _;
use idempotency::fingerprint::Fingerprint;
use idempotency::key;
use idempotency::scope::{self, ScopeInput};
use sha2::{Digest as _, Sha256};

/// A length-prefixed field, as both digests encode one.
fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn the_fingerprint_is_stable() {
    let mut f = Fingerprint::new(b"POST", b"/orders?x=1", Some(b" application/json "));
    f.update(b"{\"qty\":");
    f.update(b"1}");
    let fingerprint = String::from_utf8(f.finish().to_vec()).unwrap();
    assert_eq!(
        fingerprint,
        "sha-256:14c63acfaca48da13e27af0253b8ce2effdd5185b5eb885baaec3b54a5ec8012"
    );
    // How it is built: tag, method, path with query, content-type (present, trimmed), body,
    // the body's length.
    let mut encoding = Vec::new();
    put(&mut encoding, b"idempotency-fingerprint/1");
    put(&mut encoding, b"POST");
    put(&mut encoding, b"/orders?x=1");
    encoding.push(1);
    put(&mut encoding, b"application/json");
    encoding.extend_from_slice(b"{\"qty\":1}");
    encoding.extend_from_slice(&9u64.to_be_bytes());
    assert_eq!(
        fingerprint,
        format!("sha-256:{}", hex(&Sha256::digest(&encoding)))
    );

    let without_body = String::from_utf8(
        Fingerprint::without_body(b"POST", b"/orders", None, Some(7))
            .finish()
            .to_vec(),
    )
    .unwrap();
    assert_eq!(
        without_body,
        "sha-256:49ee7d8250efe3937cfb91a8837fd09dc8f8fb5cc52d027c613faae4c17906a4"
    );
}

#[test]
fn the_scope_and_the_backend_key_are_stable() {
    let headers: Vec<(&[u8], &[u8])> = vec![
        (b"Authorization", b"Bearer t0k3n"),
        (b"host", b"API.example.com"),
    ];
    let names = vec!["authorization".to_string()];
    let digest = scope::digest(
        true,
        &names,
        &ScopeInput {
            method: b"POST",
            host: b"API.example.com",
            path: b"/v1/payments?retry=1",
            headers: &headers,
        },
    );
    // How it is built: tag, then the route (method, host in lower case, path without its
    // query), then each configured header: its name, how many values, each value.
    let mut encoding = Vec::new();
    put(&mut encoding, b"idempotency-scope/1");
    put(&mut encoding, b"route");
    put(&mut encoding, b"POST");
    put(&mut encoding, b"api.example.com");
    put(&mut encoding, b"/v1/payments");
    put(&mut encoding, b"header");
    put(&mut encoding, b"authorization");
    encoding.extend_from_slice(&1u64.to_be_bytes());
    put(&mut encoding, b"Bearer t0k3n");
    assert_eq!(digest, <[u8; 32]>::from(Sha256::digest(&encoding)));

    let client_key = "8e03978e-40d5-43e8-bc93-6894a57f9324";
    let backend = key::backend_key(&digest, client_key);
    assert_eq!(
        backend,
        "xtUFYzksIivgPX1g8RUF-RrGbCCxbblTn4tun8Blq_84ZTAzOTc4ZS00MGQ1LTQzZTgtYmM5My02ODk0YTU3ZjkzMjQ"
    );
    // base64url without padding of the scope digest and the key.
    let joined = [&digest[..], client_key.as_bytes()].concat();
    assert_eq!(
        backend,
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(joined)
    );
    // What logs show of it, the same in the filter and the backend: a label, not a stored
    // format (`key_digest` says how it is made; this value is from a SipHash-2-4 of its own).
    assert_eq!(idempotency_spec::key_digest(&backend), "d3225cce9f19");
}
