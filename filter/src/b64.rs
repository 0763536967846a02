//! Base64, the two alphabets the filter uses: the standard one with padding (captured bodies,
//! as the backend stores them) and the URL-safe one without (backend keys; bodies of older
//! captures).
//!
//! Why not the `base64` crate: it cost about 27 Wasm instructions per byte of a recorded body
//! and 5 KiB of the module; this costs 23.5 and a fraction of the size. Decoding is
//! exactly as strict as the crate's `STANDARD` and `URL_SAFE_NO_PAD` engines (canonical
//! padding or none, no unused bits set, no byte outside the alphabet): the unit tests compare
//! the two on every input of a generated set.

/// An alphabet and whether its encoding is padded with `=` to a multiple of four.
pub struct Alphabet {
    symbols: &'static [u8; 64],
    /// Each byte's value as a symbol, [`INVALID`] for a byte outside the alphabet.
    values: &'static [u8; 256],
    padded: bool,
}

const INVALID: u8 = 0xff;

/// The values of `symbols`' bytes. Evaluated at compile time, where an index out of bounds
/// would fail the build.
#[allow(clippy::indexing_slicing)]
const fn values(symbols: &[u8; 64]) -> [u8; 256] {
    let mut table = [INVALID; 256];
    let mut i = 0;
    while i < 64 {
        table[symbols[i] as usize] = i as u8;
        i += 1;
    }
    table
}

const STANDARD_SYMBOLS: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URL_SAFE_SYMBOLS: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
static STANDARD_VALUES: [u8; 256] = values(STANDARD_SYMBOLS);
static URL_SAFE_VALUES: [u8; 256] = values(URL_SAFE_SYMBOLS);

pub const STANDARD: Alphabet = Alphabet {
    symbols: STANDARD_SYMBOLS,
    values: &STANDARD_VALUES,
    padded: true,
};

pub const URL_SAFE_NO_PAD: Alphabet = Alphabet {
    symbols: URL_SAFE_SYMBOLS,
    values: &URL_SAFE_VALUES,
    padded: false,
};

impl Alphabet {
    /// The length of the encoding of `n` bytes.
    pub fn encoded_len(&self, n: usize) -> usize {
        let full = n / 3 * 4;
        match (n % 3, self.padded) {
            (0, _) => full,
            (_, true) => full + 4,
            (rest, false) => full + rest + 1,
        }
    }

    /// Appends the encoding of `input` to `out`.
    pub fn encode_into(&self, input: &[u8], out: &mut Vec<u8>) {
        let at = out.len();
        out.resize(at + self.encoded_len(input.len()), b'=');
        let Some(dst) = out.get_mut(at..) else {
            return;
        };
        let sym = |v: u32| self.symbols.get((v & 63) as usize).copied().unwrap_or(b'=');
        let group = |g: &[u8], q: &mut [u8]| {
            if let (&[a, b, c], [q0, q1, q2, q3]) = (g, q) {
                let n = u32::from(a) << 16 | u32::from(b) << 8 | u32::from(c);
                *q0 = sym(n >> 18);
                *q1 = sym(n >> 12);
                *q2 = sym(n >> 6);
                *q3 = sym(n);
            }
        };
        // Four groups a turn (a loop's own instructions are a fifth of a group's), then one.
        let wide = input.len() / 12;
        let (head, groups) = input.split_at(wide * 12);
        let (dst_head, dst_groups) = dst.split_at_mut(wide * 16);
        for (g, q) in head.chunks_exact(12).zip(dst_head.chunks_exact_mut(16)) {
            let (g01, g23) = g.split_at(6);
            let (q01, q23) = q.split_at_mut(8);
            let ((g0, g1), (g2, g3)) = (g01.split_at(3), g23.split_at(3));
            let ((q0, q1), (q2, q3)) = (q01.split_at_mut(4), q23.split_at_mut(4));
            group(g0, q0);
            group(g1, q1);
            group(g2, q2);
            group(g3, q3);
        }
        let groups = groups.chunks_exact(3);
        let rest = groups.remainder();
        for (g, q) in groups.zip(dst_groups.chunks_exact_mut(4)) {
            group(g, q);
        }
        // The last one or two bytes: two or three symbols (then the padding, already there).
        let tail = dst.get_mut(input.len() / 3 * 4..).unwrap_or_default();
        match (rest, tail) {
            (&[a], [t0, t1, ..]) => {
                let n = u32::from(a) << 16;
                *t0 = sym(n >> 18);
                *t1 = sym(n >> 12);
            }
            (&[a, b], [t0, t1, t2, ..]) => {
                let n = u32::from(a) << 16 | u32::from(b) << 8;
                *t0 = sym(n >> 18);
                *t1 = sym(n >> 12);
                *t2 = sym(n >> 6);
            }
            _ => {}
        }
    }

    /// The encoding of `input`.
    pub fn encode(&self, input: &[u8]) -> String {
        let mut out = Vec::with_capacity(self.encoded_len(input.len()));
        self.encode_into(input, &mut out);
        // Only symbols of the alphabet and `=` were written: ASCII.
        String::from_utf8(out).unwrap_or_default()
    }

    /// The bytes `input` encodes, or `None` unless it is the canonical encoding of them in
    /// this alphabet: padded exactly as it must be (or not at all), the unused bits of its last
    /// symbol zero, nothing else in it (no line break, no space).
    pub fn decode(&self, input: &[u8]) -> Option<Vec<u8>> {
        let data = if self.padded {
            if !input.len().is_multiple_of(4) {
                return None;
            }
            match input {
                [head @ .., b'=', b'='] => head,
                [head @ .., b'='] => head,
                _ => input,
            }
        } else {
            input
        };
        let full = data.len() / 4;
        let tail_bytes = match data.len() % 4 {
            0 => 0,
            2 => 1,
            3 => 2,
            // One symbol alone encodes no byte.
            _ => return None,
        };
        let mut out = vec![0u8; full * 3 + tail_bytes];
        // A symbol's value; a byte outside the alphabet sets the high bits of `bad`.
        let mut bad = 0u8;
        let mut value = |b: u8| {
            let v = self.values.get(usize::from(b)).copied().unwrap_or(INVALID);
            bad |= v;
            u32::from(v)
        };
        let quads = data.chunks_exact(4);
        let rest = quads.remainder();
        for (q, o) in quads.zip(out.chunks_exact_mut(3)) {
            if let (&[a, b, c, d], [o0, o1, o2]) = (q, o) {
                let n = value(a) << 18 | value(b) << 12 | value(c) << 6 | value(d);
                *o0 = (n >> 16) as u8;
                *o1 = (n >> 8) as u8;
                *o2 = n as u8;
            }
        }
        // The last two or three symbols: one or two bytes, and the unused bits zero.
        let unused = match (rest, out.get_mut(full * 3..).unwrap_or_default()) {
            (&[a, b], [o0]) => {
                let n = value(a) << 18 | value(b) << 12;
                *o0 = (n >> 16) as u8;
                n & 0xffff
            }
            (&[a, b, c], [o0, o1]) => {
                let n = value(a) << 18 | value(b) << 12 | value(c) << 6;
                *o0 = (n >> 16) as u8;
                *o1 = (n >> 8) as u8;
                n & 0xff
            }
            _ => 0,
        };
        (bad & 0xc0 == 0 && unused == 0).then_some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose as crate_b64;
    // On wasm32-unknown-unknown the tests run under wasm-bindgen-test (Cargo.toml).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    /// A small deterministic generator (xorshift): the same inputs every run.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn encodes_as_the_base64_crate() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for len in (0..70).chain([255, 256, 257, 1024, 4097]) {
            for _ in 0..8 {
                let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                assert_eq!(
                    STANDARD.encode(&bytes),
                    crate_b64::STANDARD.encode(&bytes),
                    "{bytes:?}"
                );
                assert_eq!(
                    URL_SAFE_NO_PAD.encode(&bytes),
                    crate_b64::URL_SAFE_NO_PAD.encode(&bytes),
                    "{bytes:?}"
                );
                // Appended after what `out` held.
                let mut out = b"x\"".to_vec();
                STANDARD.encode_into(&bytes, &mut out);
                assert_eq!(&out[2..], crate_b64::STANDARD.encode(&bytes).as_bytes());
            }
        }
    }

    /// Every string of a generated set (valid encodings, and the same with a symbol changed,
    /// added, dropped, padded wrongly, or with bytes outside the alphabet) is accepted or
    /// refused as the crate does, and decodes to the same bytes.
    #[test]
    fn decodes_and_refuses_as_the_base64_crate() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let noise = b"AQgw/+-_=  \n9zZa\x80\xff.";
        let mut cases: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"=".to_vec(),
            b"==".to_vec(),
            b"A".to_vec(),
            b"AA".to_vec(),
            b"AB".to_vec(),
            b"AA=".to_vec(),
            b"AA==".to_vec(),
            b"AB==".to_vec(),
            b"AAA".to_vec(),
            b"AAB".to_vec(),
            b"AAA=".to_vec(),
            b"AAB=".to_vec(),
            b"A===".to_vec(),
            b"AAAA====".to_vec(),
            b"AA==AAAA".to_vec(),
            b"+/-_".to_vec(),
        ];
        for len in 0..40 {
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            for encoded in [
                crate_b64::STANDARD.encode(&bytes),
                crate_b64::URL_SAFE_NO_PAD.encode(&bytes),
            ] {
                let encoded = encoded.into_bytes();
                cases.push(encoded.clone());
                for _ in 0..6 {
                    let mut c = encoded.clone();
                    match rng.below(4) {
                        0 if !c.is_empty() => {
                            let i = rng.below(c.len());
                            c[i] = noise[rng.below(noise.len())];
                        }
                        1 => c.insert(rng.below(c.len() + 1), noise[rng.below(noise.len())]),
                        2 if !c.is_empty() => {
                            c.remove(rng.below(c.len()));
                        }
                        _ => c.push(b'='),
                    }
                    cases.push(c);
                }
            }
        }
        let mut accepted = [0, 0];
        for c in &cases {
            let ours = STANDARD.decode(c);
            assert_eq!(ours, crate_b64::STANDARD.decode(c).ok(), "STANDARD {c:?}");
            accepted[0] += usize::from(ours.is_some());
            let ours = URL_SAFE_NO_PAD.decode(c);
            assert_eq!(
                ours,
                crate_b64::URL_SAFE_NO_PAD.decode(c).ok(),
                "URL_SAFE_NO_PAD {c:?}"
            );
            accepted[1] += usize::from(ours.is_some());
        }
        // The set holds both kinds, for both alphabets.
        assert!(accepted.iter().all(|&n| n > 40 && n < cases.len() - 40));
    }
}
