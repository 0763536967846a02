//! The few JSON shapes of the backend calls, written and read by hand.
//!
//! Why not serde_json here: each keyed request writes an allocation and a record and reads an
//! answer or two, and serde_json's generic machinery (a `Value` tree of `String`s and
//! `BTreeMap`s, a `Serializer` per field) cost about a third of the filter's instructions per
//! request (`cargo run -p idempotency-tests --example fuel`). The configuration, read once,
//! stays with serde_json (`config`).
//!
//! - Writing: [`string`] escapes exactly as serde_json does (`"`, `\`, and the control
//!   characters below 0x20, as `\b \t \n \f \r` or `\u00xx`; everything else as is), so that
//!   a body is byte for byte what serde_json made of the spec's types (the unit tests compare).
//! - Reading: [`parse`] is a strict parser of the whole document, which accepts and refuses
//!   what `serde_json::from_slice` into a `Value` does (depth limit, string escapes and
//!   surrogates, UTF-8, no trailing text), and keeps strings borrowed where they have no
//!   escape. A number with a fraction or an exponent, or of more than 300 digits, is left to
//!   serde_json, whose float rules (an out-of-range number is an error) are not worth copying:
//!   the backend never sends one.

use std::borrow::Cow;

use serde_json::Value;

// ----- writing -----

/// What a byte becomes in a JSON string (serde_json's table): 0 as is, `u` as `\u00xx`,
/// anything else as a backslash and that letter.
fn escape_of(b: u8) -> u8 {
    match b {
        0x08 => b'b',
        0x09 => b't',
        0x0a => b'n',
        0x0c => b'f',
        0x0d => b'r',
        0x00..=0x1f => b'u',
        b'"' => b'"',
        b'\\' => b'\\',
        _ => 0,
    }
}

/// Every byte's two lower-case hex digits, made at compile time: a fingerprint writes 32
/// pairs per keyed request, one load each instead of two bounds-checked lookups (500
/// instructions fewer per request in the fuel example). Its indexing is evaluated by the
/// compiler: an index out of range would fail the build, never panic.
#[allow(clippy::indexing_slicing)]
const HEX_PAIRS: [[u8; 2]; 256] = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut table = [[0u8; 2]; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = [HEX[b >> 4], HEX[b & 0xf]];
        b += 1;
    }
    table
};

/// A byte as two lower-case hex digits (a `\u00xx` escape; the fingerprint's digits).
pub fn hex_pair(b: u8) -> [u8; 2] {
    // Any u8 is in range: the check is compiled away.
    HEX_PAIRS.get(usize::from(b)).copied().unwrap_or_default()
}

/// `s` as a JSON string, quoted and escaped.
pub fn string(out: &mut Vec<u8>, s: &str) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    let bytes = s.as_bytes();
    let plain = plain_prefix(bytes);
    let (head, rest) = bytes.split_at(plain.min(bytes.len()));
    out.extend_from_slice(head);
    for &b in rest {
        match escape_of(b) {
            0 => out.push(b),
            b'u' => {
                let [hi, lo] = hex_pair(b);
                out.extend_from_slice(&[b'\\', b'u', b'0', b'0', hi, lo]);
            }
            e => out.extend_from_slice(&[b'\\', e]),
        }
    }
    out.push(b'"');
}

/// `bytes` as a JSON string, exactly as [`string`] writes them, if they are UTF-8; if not,
/// `false`, and nothing written. A header as the host hands it over: most are ASCII with
/// nothing to escape, which one scan tells, without `from_utf8`'s per-call cost.
pub fn string_bytes(out: &mut Vec<u8>, bytes: &[u8]) -> bool {
    if plain_ascii(bytes) {
        out.reserve(bytes.len() + 2);
        out.push(b'"');
        out.extend_from_slice(bytes);
        out.push(b'"');
        return true;
    }
    match std::str::from_utf8(bytes) {
        Ok(s) => {
            string(out, s);
            true
        }
        Err(_) => false,
    }
}

/// Whether every byte is ASCII and stands for itself in a JSON string, eight at a time (the
/// last few padded with spaces).
fn plain_ascii(bytes: &[u8]) -> bool {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let x = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
        if special8(x) | x & HIGH != 0 {
            return false;
        }
    }
    let mut last = [b' '; 8];
    let tail = chunks.remainder();
    if let Some(room) = last.get_mut(..tail.len()) {
        room.copy_from_slice(tail);
    }
    let x = u64::from_le_bytes(last);
    special8(x) | x & HIGH == 0
}

/// How many bytes at the start of `bytes` stand for themselves in a JSON string (none of
/// `"`, `\` or a control character), counted eight at a time: the strings the filter writes
/// (keys, tokens, digests) have nothing to escape.
fn plain_prefix(bytes: &[u8]) -> usize {
    let mut n = 0usize;
    for chunk in bytes.chunks_exact(8) {
        // Eight bytes always (a zero chunk, never taken, would stop the scan).
        let x = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
        let found = special8(x);
        if found != 0 {
            // The first special byte is the lowest flagged one (little-endian).
            return n + (found.trailing_zeros() / 8) as usize;
        }
        n += 8;
    }
    n
}

/// The bytes of `x` that are `"`, `\` or a control character (below 0x20), each flagged by
/// its high bit, exact for the lowest (Mycroft's trick, as serde_json's own scan): a byte of
/// `v` is zero where `(v - 0x01…01) & !v` has its high bit.
fn special8(x: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let quote = x ^ (ONES * u64::from(b'"'));
    let backslash = x ^ (ONES * u64::from(b'\\'));
    (x.wrapping_sub(ONES * 0x20) & !x
        | quote.wrapping_sub(ONES) & !quote
        | backslash.wrapping_sub(ONES) & !backslash)
        & HIGH
}

/// `n` in decimal.
pub fn number(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        if let Some(d) = digits.get_mut(i) {
            *d = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    out.extend_from_slice(digits.get(i..).unwrap_or_default());
}

/// `"name":` (names are the filter's own literals: nothing to escape).
pub fn key(out: &mut Vec<u8>, name: &str) {
    out.push(b'"');
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
}

/// `"name":` and `value` as a JSON string.
pub fn field(out: &mut Vec<u8>, name: &str, value: &str) {
    key(out, name);
    string(out, value);
}

/// The longest [`string`] (or [`string_bytes`]) of `s` can be: for sizing a buffer once.
pub fn max_string_len(s: impl AsRef<[u8]>) -> usize {
    s.as_ref().len().saturating_mul(6).saturating_add(2)
}

// ----- reading -----

/// A JSON value. Numbers are kept only as what `serde_json::Value::as_u64` makes of them,
/// the one number the filter reads; an object keeps its members in order, repeats included,
/// and [`Json::get`] takes the last, as a `serde_json::Map` keeps the last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Json<'a> {
    Null,
    Bool(bool),
    /// `Some` for an integer from 0 to `u64::MAX` written without fraction or exponent.
    Number(Option<u64>),
    String(Cow<'a, str>),
    Array(Vec<Json<'a>>),
    Object(Vec<(Cow<'a, str>, Json<'a>)>),
}

impl<'a> Json<'a> {
    /// The member `name` of an object (the last, if repeated).
    pub fn get(&self, name: &str) -> Option<&Json<'a>> {
        match self {
            Json::Object(members) => members.iter().rev().find(|(k, _)| k == name).map(|m| &m.1),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Json::Number(n) => *n,
            _ => None,
        }
    }

    /// The same value from serde_json's tree.
    pub fn from_value(v: Value) -> Json<'static> {
        match v {
            Value::Null => Json::Null,
            Value::Bool(b) => Json::Bool(b),
            Value::Number(n) => Json::Number(n.as_u64()),
            Value::String(s) => Json::String(Cow::Owned(s)),
            Value::Array(items) => Json::Array(items.into_iter().map(Json::from_value).collect()),
            Value::Object(members) => Json::Object(
                members
                    .into_iter()
                    .map(|(k, v)| (Cow::Owned(k), Json::from_value(v)))
                    .collect(),
            ),
        }
    }
}

/// The document `bytes` (`None` when it is not JSON, as `serde_json::from_slice` would say).
pub fn parse(bytes: &[u8]) -> Option<Json<'_>> {
    // UTF-8 is checked once, for the whole document (outside its strings only ASCII can be
    // JSON), instead of once per string: a string is then a slice of it.
    let text = std::str::from_utf8(bytes).ok()?;
    let mut p = Parser::new(text, false);
    let v = p.document();
    if !p.unsure {
        return v;
    }
    // A number only serde_json can judge (an `f64` out of range is an error there): it says
    // whether the document is JSON; such a number is never a `u64`.
    serde_json::from_slice::<Value>(bytes).ok()?;
    Parser::new(text, true).document()
}

/// serde_json's recursion limit: 127 nested arrays or objects are read, 128 are an error.
const MAX_DEPTH: usize = 127;
/// Integers of more digits are left to serde_json (past about 309 an `f64` overflows).
const MAX_DIGITS: usize = 300;

struct Parser<'a> {
    /// The document, valid UTF-8, and its bytes.
    s: &'a str,
    b: &'a [u8],
    i: usize,
    /// A number serde_json must judge was met (fraction, exponent, very long).
    unsure: bool,
    /// serde_json found the document valid: such a number is read as one that is no `u64`.
    lenient: bool,
}

impl<'a> Parser<'a> {
    fn new(s: &'a str, lenient: bool) -> Parser<'a> {
        Parser {
            s,
            b: s.as_bytes(),
            i: 0,
            unsure: false,
            lenient,
        }
    }

    /// The whole input as one value, with nothing but whitespace after it.
    fn document(&mut self) -> Option<Json<'a>> {
        let v = self.value(0)?;
        self.ws();
        (self.i == self.b.len()).then_some(v)
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.i += 1;
        Some(b)
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    fn literal(&mut self, word: &[u8], v: Json<'a>) -> Option<Json<'a>> {
        let end = self.i.checked_add(word.len())?;
        if self.b.get(self.i..end)? != word {
            return None;
        }
        self.i = end;
        Some(v)
    }

    fn value(&mut self, depth: usize) -> Option<Json<'a>> {
        self.ws();
        match self.peek()? {
            b'n' => self.literal(b"null", Json::Null),
            b't' => self.literal(b"true", Json::Bool(true)),
            b'f' => self.literal(b"false", Json::Bool(false)),
            b'"' => {
                self.i += 1;
                self.string().map(Json::String)
            }
            b'-' | b'0'..=b'9' => self.number(),
            b'[' => {
                if depth >= MAX_DEPTH {
                    return None;
                }
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.peek() == Some(b']') {
                    self.i += 1;
                    return Some(Json::Array(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    self.ws();
                    match self.next()? {
                        b',' => {}
                        b']' => return Some(Json::Array(items)),
                        _ => return None,
                    }
                }
            }
            b'{' => {
                if depth >= MAX_DEPTH {
                    return None;
                }
                self.i += 1;
                let mut members = Vec::new();
                self.ws();
                if self.peek() == Some(b'}') {
                    self.i += 1;
                    return Some(Json::Object(members));
                }
                loop {
                    self.ws();
                    if self.next()? != b'"' {
                        return None;
                    }
                    let k = self.string()?;
                    self.ws();
                    if self.next()? != b':' {
                        return None;
                    }
                    let v = self.value(depth + 1)?;
                    members.push((k, v));
                    self.ws();
                    match self.next()? {
                        b',' => {}
                        b'}' => return Some(Json::Object(members)),
                        _ => return None,
                    }
                }
            }
            _ => None,
        }
    }

    /// An integer (`-?(0|[1-9][0-9]*)`); anything more is serde_json's to decide.
    fn number(&mut self) -> Option<Json<'a>> {
        let negative = self.peek() == Some(b'-');
        if negative {
            self.i += 1;
        }
        let start = self.i;
        let mut value: Option<u64> = Some(0);
        match self.next()? {
            b'0' => {}
            d @ b'1'..=b'9' => {
                value = Some(u64::from(d - b'0'));
                while let Some(d @ b'0'..=b'9') = self.peek() {
                    self.i += 1;
                    // `v * 10` overflows exactly when `v > u64::MAX / 10`; `checked_mul`
                    // would test it with a 128-bit multiply (`__multi3` on wasm32).
                    value = value
                        .filter(|&v| v <= u64::MAX / 10)
                        .and_then(|v| (v * 10).checked_add(u64::from(d - b'0')));
                }
            }
            _ => return None,
        }
        if matches!(self.peek(), Some(b'.' | b'e' | b'E')) || self.i - start > MAX_DIGITS {
            if !self.lenient {
                self.unsure = true;
                return None;
            }
            // Valid (serde_json said so): skip the fraction and exponent.
            while let Some(b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            return Some(Json::Number(None));
        }
        // serde_json: `-0` is a float, a negative integer an `i64`, a larger one a float;
        // none of them is a `u64`.
        Some(Json::Number(if negative { None } else { value }))
    }

    /// The rest of a string, after its opening quote. Its pieces are slices of the document
    /// between ASCII bytes (quotes, backslashes, escapes): whole characters.
    fn string(&mut self) -> Option<Cow<'a, str>> {
        let start = self.i;
        self.skip_plain();
        // Most strings have no escape: borrowed.
        match self.next()? {
            b'"' => return self.s.get(start..self.i - 1).map(Cow::Borrowed),
            b'\\' => {}
            _ => return None,
        }
        let mut out = String::from(self.s.get(start..self.i - 1)?);
        self.escape(&mut out)?;
        loop {
            let from = self.i;
            self.skip_plain();
            out.push_str(self.s.get(from..self.i)?);
            match self.next()? {
                b'"' => return Some(Cow::Owned(out)),
                b'\\' => self.escape(&mut out)?,
                _ => return None,
            }
        }
    }

    /// Moves past the bytes of a string that stand for themselves (all but `"`, `\` and the
    /// control characters), eight at a time while none of the eight is one (a captured body
    /// is a long base64 string).
    fn skip_plain(&mut self) {
        if let Some(rest) = self.b.get(self.i..) {
            self.i += plain_prefix(rest);
        }
        while let Some(b) = self.peek() {
            if b == b'"' || b == b'\\' || b < 0x20 {
                break;
            }
            self.i += 1;
        }
    }

    /// One escape, after its backslash: one character.
    fn escape(&mut self, out: &mut String) -> Option<()> {
        let c = match self.next()? {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let n = self.hex4()?;
                let c = match n {
                    // A trailing surrogate first, or a leading one without its trailing one,
                    // is an error (serde_json reads strings as UTF-8).
                    0xdc00..=0xdfff => return None,
                    0xd800..=0xdbff => {
                        if self.next()? != b'\\' || self.next()? != b'u' {
                            return None;
                        }
                        let n2 = self.hex4()?;
                        if !(0xdc00..=0xdfff).contains(&n2) {
                            return None;
                        }
                        char::from_u32((((n - 0xd800) << 10) | (n2 - 0xdc00)) + 0x1_0000)?
                    }
                    _ => char::from_u32(n)?,
                };
                out.push(c);
                return Some(());
            }
            _ => return None,
        };
        out.push(c);
        Some(())
    }

    fn hex4(&mut self) -> Option<u32> {
        let mut n = 0u32;
        for _ in 0..4 {
            let d = char::from(self.next()?).to_digit(16)?;
            n = (n << 4) | d;
        }
        Some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    // On wasm32-unknown-unknown the tests run under wasm-bindgen-test (Cargo.toml).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn quoted(s: &str) -> String {
        let mut out = Vec::new();
        string(&mut out, s);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let mut all: String = (0u8..0x80).map(char::from).collect();
        all.push_str("é€😀\u{7f}\u{80}\u{2028}/");
        for s in [
            "",
            "plain",
            "a\"b",
            "back\\slash",
            "\\\"",
            "tab\tnl\ncr\rff\x0cbs\x08",
            "\x00\x01\x1f",
            "clé €",
            "😀",
            "\"\"",
            "end\\",
            &all,
        ] {
            assert_eq!(quoted(s), serde_json::to_string(s).unwrap(), "{s:?}");
            assert!(quoted(s).len() <= max_string_len(s));
        }
        assert_eq!(quoted("\x00\x1f"), r#""\u0000\u001f""#);
    }

    #[test]
    fn bytes_are_written_as_their_text_is_or_refused_when_not_utf8() {
        // Every length around the 8-byte chunks, each byte of each class at each place.
        for len in 0..20 {
            for at in 0..len {
                for b in [b'a', b'"', b'\\', 0x00, 0x1f, 0x7f, 0x80, 0xc3, 0xff] {
                    let mut bytes = vec![b'x'; len];
                    bytes[at] = b;
                    let mut out = b"[".to_vec();
                    let written = string_bytes(&mut out, &bytes);
                    match std::str::from_utf8(&bytes) {
                        Ok(text) => {
                            assert!(written);
                            assert_eq!(out[1..], *serde_json::to_string(text).unwrap().as_bytes());
                        }
                        Err(_) => {
                            assert!(!written, "{bytes:?}");
                            assert_eq!(out, b"[", "nothing written");
                        }
                    }
                }
            }
        }
        let mut out = Vec::new();
        assert!(string_bytes(&mut out, "clé 😀 \"q\"".as_bytes()));
        assert_eq!(
            out,
            serde_json::to_string("clé 😀 \"q\"").unwrap().as_bytes()
        );
    }

    #[test]
    fn the_scan_stops_at_the_first_byte_to_escape() {
        for len in 0..24 {
            assert_eq!(plain_prefix(&vec![b'a'; len]), len / 8 * 8);
            for at in 0..len {
                for special in [b'"', b'\\', 0x00, 0x1f] {
                    let mut bytes = vec![0xffu8; len];
                    bytes[at] = special;
                    // Another one after it never hides it.
                    if at + 1 < len {
                        bytes[at + 1] = b'"';
                    }
                    let found = plain_prefix(&bytes);
                    assert_eq!(found, if at < len / 8 * 8 { at } else { len / 8 * 8 });
                }
            }
        }
        assert_eq!(plain_prefix(b" !#[]~\x7f\x20"), 8);
    }

    #[test]
    fn numbers_are_written_in_decimal() {
        for n in [0, 1, 9, 10, 201, 65535, 1 << 32, u64::MAX] {
            let mut out = Vec::new();
            number(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
    }

    /// What serde_json makes of `doc`, in the same terms.
    fn oracle(doc: &[u8]) -> Option<Json<'static>> {
        serde_json::from_slice::<Value>(doc)
            .ok()
            .map(Json::from_value)
    }

    /// Objects compared as serde_json's maps are: each name once (the last), in any order.
    fn normal(j: Json<'_>) -> Json<'static> {
        match j {
            Json::Null => Json::Null,
            Json::Bool(b) => Json::Bool(b),
            Json::Number(n) => Json::Number(n),
            Json::String(s) => Json::String(Cow::Owned(s.into_owned())),
            Json::Array(a) => Json::Array(a.into_iter().map(normal).collect()),
            Json::Object(m) => {
                let mut out: Vec<(Cow<'static, str>, Json<'static>)> = Vec::new();
                for (k, v) in m {
                    out.retain(|(n, _)| *n != k);
                    out.push((Cow::Owned(k.into_owned()), normal(v)));
                }
                out.sort_by(|a, b| a.0.cmp(&b.0));
                Json::Object(out)
            }
        }
    }

    #[test]
    fn reads_what_serde_json_reads_and_refuses_what_it_refuses() {
        let docs: Vec<Vec<u8>> = [
            // The backend's answers.
            r#"{"lease_token":"Zm9v","lease_expires_at":"2026-01-01T00:00:00Z"}"#,
            r#"{"idempotency_key":"k","response":{"response_status":201,"response_body":"AP8K","response_headers":[{"key":"a","value":"1"},{"key":"b","value":["1","2"]}]},"extra":{"x":[1,2,{"y":null}]}}"#,
            r#"{"type":"urn:idempotency:problem:malformed-key","title":"t","status":422,"detail":"d","error":"d"}"#,
            r#"{"results":[{"status":200,"body":{"idempotency_key":"k","expires_at":"x"}},{"status":403,"body":{"type":"t"}}]}"#,
            // Shapes and whitespace.
            " \t\r\n{ \"a\" : [ 1 , 2 ] , \"b\" : { } , \"c\" : [ ] } \n",
            "[]",
            "{}",
            "null",
            "true",
            "false",
            "0",
            "-0",
            "-12",
            "12",
            "18446744073709551615",
            "18446744073709551616",
            "123456789012345678901234567890",
            r#"{"a":1,"a":2}"#,
            r#"{"a":1,"b":2,"a":"x"}"#,
            // Strings.
            r#""a\"b\\c\/d\b\f\n\r\t""#,
            r#""\u00e9\u20AC\ud83d\ude00""#,
            r#""\u0000""#,
            "\"caf\u{e9} \u{1f600}\"",
            "\"\x7f\"",
            // Refused.
            "",
            " ",
            "{",
            "[1,]",
            "[1 2]",
            r#"{"a":1,}"#,
            r#"{"a" 1}"#,
            r#"{a:1}"#,
            r#"{"a":1}x"#,
            r#"{"a":1}{}"#,
            "01",
            "-",
            "--1",
            "+1",
            ".5",
            "1.",
            "nul",
            "nulll",
            "True",
            "\"\x01\"",
            "\"a\nb\"",
            r#""\x""#,
            r#""\u12""#,
            r#""\u12g4""#,
            r#""\ud83d""#,
            r#""\ud83dx""#,
            r#""\ud83d\n""#,
            r#""\ud83d\u0041""#,
            r#""\ude00""#,
            "\"unterminated",
            "\"\\",
            // Left to serde_json.
            "1.5",
            "[1.5,2]",
            "{\"a\":1e5,\"b\":[-2.5E+3,7]}",
            "{\"a\":1e400,\"b\":1}",
            "201.0",
            "1e3",
            "-1E-3",
            "1e400",
            "1.",
            "[1.5,{\"a\":2e2}]",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .chain([
            b"\"\xff\"".to_vec(),
            b"\"\xc3\"".to_vec(),
            b"\"\xc3\\u00a9\"".to_vec(),
            b"\"\\u00a9\xa9\"".to_vec(),
            b"\xef\xbb\xbf{}".to_vec(),
            "9".repeat(301).into_bytes(),
            "9".repeat(400).into_bytes(),
            format!("{}{}", "[".repeat(127), "]".repeat(127)).into_bytes(),
            format!("{}{}", "[".repeat(128), "]".repeat(128)).into_bytes(),
            format!("{}1{}", "{\"a\":".repeat(127), "}".repeat(127)).into_bytes(),
            format!("{}1{}", "{\"a\":".repeat(128), "}".repeat(128)).into_bytes(),
        ])
        .collect();
        // Strings read eight bytes at a time: each special byte at each place of a chunk.
        let mut docs = docs;
        for at in 0..20 {
            for special in [
                "\\\"", "\\\\", "\\n", "\\u00e9", "\n", "\x01", "\x1f", "é", "\x7f", "~",
            ] {
                let mut s = "a".repeat(24);
                s.insert_str(at, special);
                docs.push(format!("[\"{s}\",\"{}\"]", "b".repeat(at)).into_bytes());
            }
            let mut raw = b"\"".to_vec();
            raw.extend(std::iter::repeat_n(b'c', at));
            raw.push(0xff);
            raw.extend(b"cccccccc\"");
            docs.push(raw);
        }
        for doc in &docs {
            let ours = parse(doc).map(normal);
            assert_eq!(
                ours,
                oracle(doc).map(normal),
                "{:?}",
                String::from_utf8_lossy(doc)
            );
        }
    }

    #[test]
    fn strings_without_escapes_are_borrowed_and_repeats_give_the_last() {
        let doc = br#"{"a":"x","b":"y\"","a":"z"}"#;
        let j = parse(doc).unwrap();
        assert!(matches!(j.get("a"), Some(Json::String(Cow::Borrowed("z")))));
        assert!(matches!(j.get("b"), Some(Json::String(Cow::Owned(s))) if s == "y\""));
        assert_eq!(j.get("c"), None);
        assert_eq!(Json::Null.get("a"), None);
        assert_eq!(parse(b"[1]").unwrap().get("a"), None);
    }
}
