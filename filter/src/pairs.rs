//! Header maps as bytes. The SDK's `get_map` and `get_map_bytes` turn names (and, for
//! `get_map`, values) into `String` with `unwrap`: a header that is not UTF-8 (nginx accepts
//! bytes above 0x7F in values, and in names with `ignore_invalid_headers off`) would panic,
//! which is a trap that resets a Kong worker's instance or fails Envoy's VM for good. So the
//! filter reads maps through [`crate::shared::header_map`], which decodes the host's
//! serialization here, without assumptions: malformed input gives an empty map, never a panic.
//!
//! The serialization (proxy-wasm ABI): a `u32` count, then per pair two `u32` lengths (name,
//! value), then per pair the name, a NUL, the value, a NUL; all little-endian.

/// Header pairs, names and values as bytes.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Decodes the host's serialization into pairs that borrow from it (what the filter reads:
/// nothing copied); `None` when it is malformed. It walks the bytes as slices, each step
/// split off the rest, rather than by offsets checked one addition at a time.
pub fn parse(bytes: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let (count, rest) = bytes.split_first_chunk::<4>()?;
    let count = usize::try_from(u32::from_le_bytes(*count)).ok()?;
    let (sizes, mut data) = rest.split_at_checked(count.checked_mul(8)?)?;
    let mut out = Vec::with_capacity(count);
    for size in sizes.chunks_exact(8) {
        let (name_len, value_len) = size.split_first_chunk::<4>()?;
        let name_len = usize::try_from(u32::from_le_bytes(*name_len)).ok()?;
        let value_len = usize::try_from(u32::from_le_bytes(value_len.try_into().ok()?)).ok()?;
        let (name, rest) = data.split_at_checked(name_len)?;
        let (value, rest) = rest.get(1..)?.split_at_checked(value_len)?;
        data = rest.get(1..)?;
        out.push((name, value));
    }
    Some(out)
}

/// [`parse`], the pairs copied.
pub fn decode(bytes: &[u8]) -> Option<Pairs> {
    Some(
        parse(bytes)?
            .into_iter()
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect(),
    )
}

/// The host's serialization of `pairs`, the inverse of [`decode`]: what the unit tests and
/// the fuzz target feed it (the filter itself hands maps to the SDK).
pub fn encode<N: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(N, V)]) -> Vec<u8> {
    let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
    for (n, v) in pairs {
        out.extend_from_slice(&(n.as_ref().len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.as_ref().len() as u32).to_le_bytes());
    }
    for (n, v) in pairs {
        out.extend_from_slice(n.as_ref());
        out.push(0);
        out.extend_from_slice(v.as_ref());
        out.push(0);
    }
    out
}

/// The first value of the header `lower` (a name in lower case, as the filter's own names and
/// the configuration's are; the map's names in any case).
pub fn get<'a, N: AsRef<[u8]>, V: AsRef<[u8]>>(
    pairs: &'a [(N, V)],
    lower: &str,
) -> Option<&'a [u8]> {
    pairs
        .iter()
        .find(|(n, _)| is_named(n.as_ref(), lower))
        .map(|(_, v)| v.as_ref())
}

/// A header value as a decimal number (`Content-Length`, `:status`): what
/// `str::trim().parse::<u64>()` gives for it, without the UTF-8 check, the Unicode trim and
/// the generic parser, about 250 instructions a value. Whitespace is trimmed as ASCII (what
/// HTTP allows around a value): a value with other Unicode spaces around its digits is no
/// number here.
pub fn number(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    let digits = digits.strip_prefix(b"+").unwrap_or(digits);
    // Up to 19 digits cannot overflow a u64; longer ones (u64::MAX has 20, and leading
    // zeros add more) go to std's parser.
    if digits.is_empty() {
        return None;
    }
    if digits.len() > 19 {
        return std::str::from_utf8(digits).ok()?.parse().ok();
    }
    let mut n = 0u64;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u64::from(d - b'0');
    }
    Some(n)
}

/// The `:status` pseudo-header as a status code ([`number`], within `u16`): of an answer to a
/// call, or of a response. Inlined: called out of line it cost a first request 100
/// instructions more than the two readings it replaced.
#[inline(always)]
pub fn status<N: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(N, V)]) -> Option<u16> {
    get(pairs, ":status")
        .and_then(number)
        .and_then(|s| u16::try_from(s).ok())
}

/// Whether the header name `name` (any case) is `lower` (in lower case): only `name`'s bytes
/// are folded, half the work of `eq_ignore_ascii_case` on a name that matches.
pub fn is_named(name: &[u8], lower: &str) -> bool {
    debug_assert!(!lower.bytes().any(|b| b.is_ascii_uppercase()), "{lower}");
    name.len() == lower.len()
        && name
            .iter()
            .zip(lower.as_bytes())
            .all(|(n, l)| n.to_ascii_lowercase() == *l)
}

/// The pairs (owned, or borrowed from the host's map: [`parse`]) as text, invalid UTF-8
/// replaced: for statuses and comparisons only, never for anything hashed or stored.
pub fn lossy<N: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(N, V)]) -> Vec<(String, String)> {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    pairs
        .iter()
        .map(|(n, v)| (text(n.as_ref()), text(v.as_ref())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    // On wasm32-unknown-unknown the tests run under wasm-bindgen-test (Cargo.toml).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn decodes_bytes_that_are_not_utf8() {
        let raw =
            encode::<&[u8], &[u8]>(&[(b":path", b"/caf\xe9"), (b"x-\xff", b""), (b"a", b"b")]);
        let p = decode(&raw).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(get(&p, ":path"), Some(&b"/caf\xe9"[..]));
        assert_eq!(p[1].0, b"x-\xff");
        assert_eq!(get(&p, "a"), Some(&b"b"[..]));
        assert_eq!(lossy(&p)[0].1, "/caf\u{fffd}");
        assert_eq!(decode(&[]), Some(vec![]));
        let borrowed = parse(&raw).unwrap();
        assert_eq!(borrowed[0], (&b":path"[..], &b"/caf\xe9"[..]));
        assert_eq!(get(&borrowed, "a"), Some(&b"b"[..]));
        let upper = encode::<&[u8], &[u8]>(&[(b"X-Request-ID", b"1")]);
        assert_eq!(
            get(&decode(&upper).unwrap(), "x-request-id"),
            Some(&b"1"[..])
        );
        assert_eq!(status(&[(":status", " 201 ")]), Some(201));
        assert_eq!(status(&[(":status", "70000")]), None);
        assert_eq!(status(&[(":status", "2x1")]), None);
        assert_eq!(status::<&str, &str>(&[]), None);
        assert!(is_named(b"Content-LENGTH", "content-length"));
        assert!(!is_named(b"content-lengt", "content-length"));
        assert!(!is_named(b"content_length", "content-length"));
    }

    #[test]
    fn numbers_read_as_std_reads_them() {
        let mut cases: Vec<Vec<u8>> = [
            "",
            "0",
            "7",
            "+7",
            "-7",
            "++7",
            " 12 ",
            "\t12\t",
            "1 2",
            "12a",
            "0012",
            "18446744073709551615",
            "18446744073709551616",
            "000000000000000000000001",
            "99999999999999999999",
            "9999999999999999999",
            "+",
            " ",
            "1.5",
            "１２",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        cases.push(b"12\xff".to_vec());
        // Every string of up to two bytes over the edges of the digits and of the signs.
        let edges = [b' ', b'+', b'-', b'/', b'0', b'5', b'9', b':', 0x80];
        for a in edges {
            cases.push(vec![a]);
            for b in edges {
                cases.push(vec![a, b]);
            }
        }
        for v in cases {
            let std = std::str::from_utf8(&v)
                .ok()
                .and_then(|s| s.trim_matches([' ', '\t']).parse::<u64>().ok());
            assert_eq!(number(&v), std, "{v:?}");
        }
    }

    #[test]
    fn malformed_input_is_none_never_a_panic() {
        let raw = encode::<&[u8], &[u8]>(&[(b"name", b"value")]);
        // Every cut, down to the last NUL (both hosts write one after every name and value).
        for cut in 1..raw.len() {
            assert!(decode(&raw[..cut]).is_none(), "cut at {cut}");
        }
        assert!(decode(&[255, 255, 255, 255]).is_none());
        let mut huge = raw.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&huge).is_none());
    }
}
