//! The scope of a key: what, besides the key itself, must match for two requests to share a
//! capture. Two clients that send the same key never see each other's responses, because
//! their scope digests differ.
//!
//! The digest is SHA-256 over a length-prefixed encoding (no separator ambiguity): a version
//! tag; when `scope.route`, the method, the host (lower case) and the path without its query;
//! then, for each configured header name in order, the name and every value the request sent
//! (a missing header and an empty one differ).

use crate::sha::Sha;

/// What the scope is computed from: the bytes as the client sent them (a header value need
/// not be UTF-8, and two different byte strings must never make the same scope).
pub struct ScopeInput<'a> {
    pub method: &'a [u8],
    pub host: &'a [u8],
    /// The request path, with or without a query (the query is dropped).
    pub path: &'a [u8],
    /// Every request header (name, value); names are matched case-insensitively.
    pub headers: &'a [(&'a [u8], &'a [u8])],
}

/// The path without its query.
pub fn path_without_query(path: &[u8]) -> &[u8] {
    path.split(|&b| b == b'?').next().unwrap_or(path)
}

/// The scope digest. `header_names` in lower case, as the configuration gives them (the
/// request's names match in any case).
pub fn digest(route: bool, header_names: &[String], input: &ScopeInput<'_>) -> [u8; 32] {
    let mut h = Sha::new();
    h.field_common(b"idempotency-scope/1");
    if route {
        h.field_common(b"route");
        h.field_common(input.method);
        // The host in lower case, without a copy.
        h.update_common((input.host.len() as u64).to_be_bytes());
        let mut buf = [0u8; 64];
        for chunk in input.host.chunks(buf.len()) {
            let lower = buf.get_mut(..chunk.len()).unwrap_or_default();
            for (l, b) in lower.iter_mut().zip(chunk) {
                *l = b.to_ascii_lowercase();
            }
            h.update_common(&*lower);
        }
        h.field_common(path_without_query(input.path));
    }
    for name in header_names {
        h.field_common(b"header");
        h.field_common(name.as_bytes());
        let values = || {
            input
                .headers
                .iter()
                // The configuration's names are in lower case (`config`).
                .filter(|(n, _)| crate::pairs::is_named(n, name))
                .map(|(_, v)| *v)
        };
        h.update((values().count() as u64).to_be_bytes());
        for v in values() {
            h.field(v);
        }
    }
    h.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;
    // On wasm32-unknown-unknown the tests run under wasm-bindgen-test (Cargo.toml).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn hdrs<'a>(pairs: &[(&'a str, &'a str)]) -> Vec<(&'a [u8], &'a [u8])> {
        pairs
            .iter()
            .map(|(a, b)| (a.as_bytes(), b.as_bytes()))
            .collect()
    }

    fn d(
        route: bool,
        names: &[&str],
        method: &str,
        host: &str,
        path: &str,
        h: &[(&str, &str)],
    ) -> [u8; 32] {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let headers = hdrs(h);
        digest(
            route,
            &names,
            &ScopeInput {
                method: method.as_bytes(),
                host: host.as_bytes(),
                path: path.as_bytes(),
                headers: &headers,
            },
        )
    }

    #[test]
    fn authorization_separates_clients() {
        let a = d(
            true,
            &["authorization"],
            "POST",
            "api",
            "/pay",
            &[("Authorization", "Bearer a")],
        );
        let b = d(
            true,
            &["authorization"],
            "POST",
            "api",
            "/pay",
            &[("authorization", "Bearer b")],
        );
        let none = d(true, &["authorization"], "POST", "api", "/pay", &[]);
        let empty = d(
            true,
            &["authorization"],
            "POST",
            "api",
            "/pay",
            &[("authorization", "")],
        );
        assert_ne!(a, b);
        assert_ne!(a, none);
        assert_ne!(none, empty);
        let a2 = d(
            true,
            &["authorization"],
            "POST",
            "API",
            "/pay?x=1",
            &[("AUTHORIZATION", "Bearer a")],
        );
        assert_eq!(a, a2, "host case and query do not matter");
    }

    #[test]
    fn route_is_part_of_the_scope_unless_disabled() {
        let p1 = d(true, &[], "POST", "h", "/a", &[]);
        let p2 = d(true, &[], "POST", "h", "/b", &[]);
        let m2 = d(true, &[], "PATCH", "h", "/a", &[]);
        let h2 = d(true, &[], "POST", "h2", "/a", &[]);
        assert!(p1 != p2 && p1 != m2 && p1 != h2);
        assert_eq!(
            d(false, &[], "POST", "h", "/a", &[]),
            d(false, &[], "PATCH", "h2", "/b", &[])
        );
    }

    #[test]
    fn values_are_bytes_not_text() {
        // Two values that are not UTF-8 and would read the same decoded lossily.
        let names = vec!["authorization".to_string()];
        let scope = |v: &[u8]| {
            let headers = vec![(&b"authorization"[..], v)];
            digest(
                true,
                &names,
                &ScopeInput {
                    method: b"POST",
                    host: b"h",
                    path: b"/p",
                    headers: &headers,
                },
            )
        };
        assert_ne!(scope(b"Bearer \xe9"), scope(b"Bearer \xe8"));
        assert_eq!(path_without_query(b"/a\xff?q"), b"/a\xff");
    }

    #[test]
    fn no_ambiguity_between_fields() {
        assert_ne!(
            d(true, &[], "POST", "ab", "/c", &[]),
            d(true, &[], "POST", "a", "b/c", &[])
        );
        assert_ne!(
            d(false, &["x"], "", "", "", &[("x", "a"), ("x", "b")]),
            d(false, &["x"], "", "", "", &[("x", "ab")])
        );
    }
}
