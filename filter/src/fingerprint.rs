//! The request fingerprint: SHA-256 over the method, the path with its query, the
//! content-type and the body, streamed (the body is hashed as it passes, never kept).
//! The same key presented with another fingerprint gets 422 from the backend.

use crate::sha::Sha;

/// A fingerprint being computed.
#[derive(Clone)]
pub struct Fingerprint {
    hasher: Sha,
    body_len: u64,
}

impl Fingerprint {
    /// From the request's bytes as sent (none of them need be UTF-8).
    pub fn new(method: &[u8], path_with_query: &[u8], content_type: Option<&[u8]>) -> Fingerprint {
        let mut hasher = Sha::new();
        // The request's line and type: what many requests share.
        hasher.field_common(b"idempotency-fingerprint/1");
        hasher.field_common(method);
        hasher.field_common(path_with_query);
        match content_type {
            Some(ct) => {
                hasher.update_common([1]);
                hasher.field_common(ct.trim_ascii());
            }
            None => hasher.update_common([0]),
        }
        Fingerprint {
            hasher,
            body_len: 0,
        }
    }

    /// Without the body bytes (`envoy.request_body: skip`): method, path, content-type and
    /// the declared `Content-Length` (absent for a body of unknown length), in a domain of
    /// its own, so that it never equals a fingerprint with the body.
    pub fn without_body(
        method: &[u8],
        path_with_query: &[u8],
        content_type: Option<&[u8]>,
        content_length: Option<u64>,
    ) -> Fingerprint {
        let mut f = Fingerprint::new(method, path_with_query, content_type);
        f.hasher.field_common(b"without-body");
        match content_length {
            Some(n) => {
                f.hasher.update([1]);
                f.hasher.update(n.to_be_bytes());
            }
            None => f.hasher.update([0]),
        }
        f
    }

    pub fn update(&mut self, chunk: &[u8]) {
        self.hasher.update(chunk);
        self.body_len = self.body_len.saturating_add(chunk.len() as u64);
    }

    /// `sha-256:` and 64 lower-case hex digits (72 ASCII bytes, within the backend's 1024),
    /// as bytes: they are written into the allocation's JSON as they are, with no `String`
    /// (whose UTF-8 check alone cost more than the digits).
    pub fn finish(mut self) -> [u8; 72] {
        self.hasher.update(self.body_len.to_be_bytes());
        let digest = self.hasher.finalize();
        let mut out = *b"sha-256:0000000000000000000000000000000000000000000000000000000000000000";
        for (pair, b) in out[8..].chunks_exact_mut(2).zip(digest) {
            pair.copy_from_slice(&crate::json::hex_pair(b));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    // On wasm32-unknown-unknown the tests run under wasm-bindgen-test (Cargo.toml).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn fp(method: &str, path: &str, ct: Option<&str>, chunks: &[&[u8]]) -> String {
        let mut f = Fingerprint::new(method.as_bytes(), path.as_bytes(), ct.map(str::as_bytes));
        for c in chunks {
            f.update(c);
        }
        String::from_utf8(f.finish().to_vec()).unwrap()
    }

    #[test]
    fn chunking_does_not_matter() {
        let whole = fp("POST", "/p?q=1", Some("application/json"), &[b"{\"a\":1}"]);
        let split = fp(
            "POST",
            "/p?q=1",
            Some("application/json"),
            &[b"{\"a", b"", b"\":1}"],
        );
        assert_eq!(whole, split);
        assert_eq!(whole.len(), 72);
        assert!(whole.starts_with("sha-256:"));
        assert!(whole.len() <= idempotency_spec::MAX_FINGERPRINT_LEN);
    }

    #[test]
    fn every_part_counts() {
        let base = fp("POST", "/p?q=1", Some("application/json"), &[b"{}"]);
        assert_ne!(
            base,
            fp("PATCH", "/p?q=1", Some("application/json"), &[b"{}"])
        );
        assert_ne!(
            base,
            fp("POST", "/p?q=2", Some("application/json"), &[b"{}"])
        );
        assert_ne!(base, fp("POST", "/p?q=1", Some("text/plain"), &[b"{}"]));
        assert_ne!(base, fp("POST", "/p?q=1", None, &[b"{}"]));
        assert_ne!(
            base,
            fp("POST", "/p?q=1", Some("application/json"), &[b"{ }"])
        );
        assert_ne!(fp("POST", "/", None, &[]), fp("POST", "/", Some(""), &[]));
    }

    #[test]
    fn without_the_body_the_declared_length_still_counts() {
        let f = |len| {
            Fingerprint::without_body(b"POST", b"/p", Some(b"application/json"), len)
                .finish()
                .to_vec()
        };
        assert_eq!(f(Some(10)), f(Some(10)));
        assert_ne!(f(Some(10)), f(Some(11)));
        assert_ne!(f(Some(0)), f(None));
        // Never the fingerprint of the same request with its (empty) body.
        assert_ne!(
            f(Some(0)),
            fp("POST", "/p", Some("application/json"), &[]).into_bytes()
        );
        // A declared length past 4 GiB is not cut to 32 bits (on the gateway's Wasm).
        assert_ne!(f(Some(1 << 32)), f(Some(0)));
        assert_ne!(f(Some(u64::MAX)), f(Some(u64::from(u32::MAX))));
    }
}
