//! The `Idempotency-Key` header value, and the key sent to the backend.
//!
//! The draft makes the header an RFC 8941 sf-string (`"8e03978e-…"`); a bare value is also
//! accepted, as the old Lua plugin did. Either way the key is 1 to 255 printable ASCII
//! characters (0x20–0x7E); anything else is a 400. The backend key is
//! `base64url-nopad(scope digest ‖ key)`: 32 bytes of scope and at most 255 of key make at most
//! 383 characters, well within the backend's 1400.

use crate::b64::URL_SAFE_NO_PAD;

/// The longest key a client may send (characters, after unquoting).
pub const MAX_KEY_LEN: usize = 255;

/// Why a header value is not a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyError {
    Empty,
    TooLong,
    /// A character outside printable ASCII.
    NotPrintable,
    /// Starts with a double quote but is not a well-formed sf-string (bad escape, no closing
    /// quote, text after it).
    BadString,
}

impl KeyError {
    pub fn detail(self) -> &'static str {
        match self {
            KeyError::Empty => "the idempotency key is empty",
            KeyError::TooLong => "the idempotency key is longer than 255 characters",
            KeyError::NotPrintable => {
                "the idempotency key must be printable ASCII (an RFC 8941 string)"
            }
            KeyError::BadString => {
                "the idempotency key is not a well-formed RFC 8941 string (\"…\" with \\\" and \\\\ escapes only)"
            }
        }
    }
}

fn printable(b: u8) -> bool {
    (0x20..=0x7e).contains(&b)
}

/// Parses a header value into the key.
pub fn parse(value: &[u8]) -> Result<String, KeyError> {
    let v = trim(value);
    let key: Vec<u8> = if let Some(rest) = v.strip_prefix(b"\"") {
        // Keys are rarely escaped: one scan finds where the string ends, and an unescaped
        // key is copied whole rather than byte by byte.
        let special = rest
            .iter()
            .position(|&b| b == b'"' || b == b'\\' || !printable(b));
        match special.map(|i| (i, rest.get(i).copied())) {
            Some((i, Some(b'"'))) if i + 1 == rest.len() => {
                rest.get(..i).unwrap_or_default().to_vec()
            }
            // Text after the closing quote.
            Some((_, Some(b'"'))) => return Err(KeyError::BadString),
            Some((_, Some(b'\\'))) => unescape(rest)?,
            Some(_) => return Err(KeyError::NotPrintable),
            // No closing quote.
            None => return Err(KeyError::BadString),
        }
    } else {
        if !v.iter().all(|&b| printable(b)) {
            return Err(KeyError::NotPrintable);
        }
        v.to_vec()
    };
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong);
    }
    // Only printable ASCII got in: valid UTF-8.
    String::from_utf8(key).map_err(|_| KeyError::NotPrintable)
}

/// The characters of an sf-string with escapes, from after its opening quote: `\"` and `\\`
/// stand for themselves, nothing else may follow a backslash, and the closing quote ends the
/// value.
fn unescape(rest: &[u8]) -> Result<Vec<u8>, KeyError> {
    let mut out = Vec::with_capacity(rest.len());
    let mut it = rest.iter();
    let mut closed = false;
    while let Some(&b) = it.next() {
        match b {
            b'\\' => match it.next() {
                Some(&e @ (b'"' | b'\\')) => out.push(e),
                _ => return Err(KeyError::BadString),
            },
            b'"' => {
                closed = true;
                break;
            }
            b if printable(b) => out.push(b),
            _ => return Err(KeyError::NotPrintable),
        }
    }
    if !closed || it.next().is_some() {
        return Err(KeyError::BadString);
    }
    Ok(out)
}

/// Trims optional whitespace (SP, HTAB) on both ends.
fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// The key the backend stores: base64url without padding of the scope digest and the key.
pub fn backend_key(scope_digest: &[u8; 32], key: &str) -> String {
    // On the stack: a key is at most MAX_KEY_LEN bytes (a longer one, which `parse` never
    // gives, is encoded from the heap).
    let mut buf = [0u8; 32 + MAX_KEY_LEN];
    let len = 32 + key.len();
    match buf.get_mut(..len) {
        Some(raw) => {
            let (scope, rest) = raw.split_at_mut(32);
            scope.copy_from_slice(scope_digest);
            rest.copy_from_slice(key.as_bytes());
            URL_SAFE_NO_PAD.encode(raw)
        }
        None => URL_SAFE_NO_PAD.encode(&[&scope_digest[..], key.as_bytes()].concat()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    // On wasm32-unknown-unknown the tests run under wasm-bindgen-test (Cargo.toml).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn sf_string_and_bare_token() {
        assert_eq!(parse(br#""8e03978e-40d5""#).unwrap(), "8e03978e-40d5");
        assert_eq!(parse(b"  \"a b\"\t").unwrap(), "a b");
        assert_eq!(parse(br#""a\"b\\c""#).unwrap(), r#"a"b\c"#);
        assert_eq!(parse(b"8e03978e-40d5").unwrap(), "8e03978e-40d5");
        assert_eq!(parse(b" bare ").unwrap(), "bare");
    }

    #[test]
    fn malformed_values_are_refused() {
        assert_eq!(parse(b""), Err(KeyError::Empty));
        assert_eq!(parse(b"  "), Err(KeyError::Empty));
        assert_eq!(parse(br#""""#), Err(KeyError::Empty));
        assert_eq!(parse(br#""abc"#), Err(KeyError::BadString));
        assert_eq!(parse(br#""a\nb""#), Err(KeyError::BadString));
        assert_eq!(parse(br#""abc";x=1"#), Err(KeyError::BadString));
        assert_eq!(parse("clé".as_bytes()), Err(KeyError::NotPrintable));
        assert_eq!(parse(b"a\x00b"), Err(KeyError::NotPrintable));
        assert_eq!(parse("\"é\"".as_bytes()), Err(KeyError::NotPrintable));
        assert_eq!(parse("a".repeat(255).as_bytes()).unwrap().len(), 255);
        assert_eq!(parse("a".repeat(256).as_bytes()), Err(KeyError::TooLong));
        let quoted = format!("\"{}\"", "a".repeat(256));
        assert_eq!(parse(quoted.as_bytes()), Err(KeyError::TooLong));
    }

    /// The whole-copy path for unescaped keys answers as the escape-aware loop does, for
    /// every quoted value of up to five characters over an alphabet of the characters that
    /// matter (an ordinary one, the quote, the backslash, a control character, a space).
    #[test]
    fn unescaped_keys_parse_as_the_escaping_loop_would() {
        let reference = |rest: &[u8]| -> Result<String, KeyError> {
            let key = unescape(rest)?;
            if key.is_empty() {
                return Err(KeyError::Empty);
            }
            Ok(String::from_utf8(key).unwrap())
        };
        let alphabet = [b'a', b'"', b'\\', 0x01, b' '];
        let mut values = vec![Vec::new()];
        for _ in 0..5 {
            let longer: Vec<Vec<u8>> = values
                .iter()
                .filter(|v| v.len() == values.last().map_or(0, Vec::len))
                .flat_map(|v| {
                    alphabet.iter().map(move |&c| {
                        let mut w = v.clone();
                        w.push(c);
                        w
                    })
                })
                .collect();
            values.extend(longer);
        }
        assert_eq!(values.len(), 1 + 5 + 25 + 125 + 625 + 3125);
        for rest in &values {
            // Trailing spaces are trimmed before the string is read: leave them out.
            if rest.last() == Some(&b' ') {
                continue;
            }
            let quoted = [&b"\""[..], rest].concat();
            assert_eq!(parse(&quoted), reference(rest), "{quoted:?}");
        }
    }

    #[test]
    fn backend_key_is_valid_for_the_backend_and_distinct_per_scope() {
        let k = backend_key(&[7; 32], &"~".repeat(MAX_KEY_LEN));
        // The same encoding past the longest key (never given by `parse`).
        let long = "~".repeat(MAX_KEY_LEN + 1);
        let raw = [&[7u8; 32][..], long.as_bytes()].concat();
        assert_eq!(backend_key(&[7; 32], &long), URL_SAFE_NO_PAD.encode(raw));
        assert!(idempotency_spec::is_valid_key(&k), "{k}");
        assert_ne!(backend_key(&[1; 32], "k"), backend_key(&[2; 32], "k"));
        assert_ne!(backend_key(&[1; 32], "k1"), backend_key(&[1; 32], "k2"));
    }
}
