//! Base64, the two alphabets the filter uses: the standard one with padding (captured bodies,
//! as the backend stores them) and the URL-safe one without (backend keys; bodies of older
//! captures).
//!
//! Why not the `base64` crate: it cost about 27 Wasm instructions per byte of a recorded body
//! and 5 KiB of the module. Here the standard alphabet, which carries the bodies, costs about
//! 14 per byte encoded and 17 per byte decoded, with 12 KiB of tables ([`Wide`]): encoding
//! looks up two symbols at once (12 bits of input); decoding looks up each symbol's bits
//! already in their place in the output, so that four symbols are three ORs and a store (the
//! way Chromium's modp_b64 decodes). The URL-safe alphabet, for a key's few dozen bytes, goes
//! symbol by symbol (about 23 per byte). Decoding is exactly as strict as the crate's
//! `STANDARD` and `URL_SAFE_NO_PAD` engines (canonical padding or none, no unused bits set, no
//! byte outside the alphabet): the unit tests compare the two on every input of a generated
//! set.

use std::cell::RefCell;

/// One of the two encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alphabet {
    /// The standard alphabet, padded with `=` to a multiple of four.
    Standard,
    /// The URL-safe alphabet, without padding.
    UrlSafeNoPad,
}

pub const STANDARD: Alphabet = Alphabet::Standard;
pub const URL_SAFE_NO_PAD: Alphabet = Alphabet::UrlSafeNoPad;

/// An alphabet's tables.
struct Tables {
    symbols: &'static [u8; 64],
    /// Each byte's value as a symbol, [`INVALID`] for a byte outside the alphabet.
    values: &'static [u8; 256],
    padded: bool,
    /// Whether long strings go through [`Wide`] (the standard alphabet's).
    wide: bool,
}

const INVALID: u8 = 0xff;
/// Set in a decoded group's fourth byte, which a valid group leaves zero.
const INVALID_BITS: u32 = 0xff00_0000;

const STANDARD_SYMBOLS: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URL_SAFE_SYMBOLS: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
static STANDARD_VALUES: [u8; 256] = values(STANDARD_SYMBOLS);
static URL_SAFE_VALUES: [u8; 256] = values(URL_SAFE_SYMBOLS);

static STANDARD_TABLES: Tables = Tables {
    symbols: STANDARD_SYMBOLS,
    values: &STANDARD_VALUES,
    padded: true,
    wide: true,
};

static URL_SAFE_TABLES: Tables = Tables {
    symbols: URL_SAFE_SYMBOLS,
    values: &URL_SAFE_VALUES,
    padded: false,
    wide: false,
};

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

/// The standard alphabet's tables that take a group at a time.
struct Wide {
    built: bool,
    /// The two symbols of each 12 bits, the first in the low byte.
    pairs: [u16; 4096],
    /// For the symbol at each place of a group of four, its bits where they go in the
    /// group's three bytes read as a little-endian `u32` (whatever the target: words are
    /// written with `to_le_bytes`); [`INVALID_BITS`] for a byte outside the alphabet.
    placed: [[u32; 256]; 4],
}

thread_local! {
    /// Made in place on first use (about 68,000 instructions, once per instance), not at
    /// compile time: 12 KiB in the module's data would take it over its size limit
    /// (`tests/tests/filter/size.rs`), while zeros cost the module nothing. A Wasm instance
    /// has one thread; its thread-locals sit at fixed addresses, which the loads take as
    /// offsets.
    static WIDE: RefCell<Wide> = const {
        RefCell::new(Wide {
            built: false,
            pairs: [0; 4096],
            placed: [[0; 256]; 4],
        })
    };
}

/// Runs `f` on the tables, made first if need be.
#[inline(always)]
fn with_wide<T>(f: impl FnOnce(&Wide) -> T) -> T {
    WIDE.with(|w| {
        if !w.borrow().built {
            w.borrow_mut().build();
        }
        f(&w.borrow())
    })
}

impl Wide {
    /// A group `a b c d` of 6-bit values is the bytes `a << 2 | b >> 4`,
    /// `(b & 15) << 4 | c >> 2`, `(c & 3) << 6 | d`.
    #[inline(never)]
    fn build(&mut self) {
        for (row, &hi) in self.pairs.chunks_exact_mut(64).zip(STANDARD_SYMBOLS) {
            for (p, &lo) in row.iter_mut().zip(STANDARD_SYMBOLS) {
                *p = u16::from(hi) | u16::from(lo) << 8;
            }
        }
        for table in &mut self.placed {
            table.fill(INVALID_BITS);
        }
        for (v, &b) in (0u32..).zip(STANDARD_SYMBOLS) {
            let b = usize::from(b);
            let bits = [
                v << 2,
                v >> 4 | (v & 15) << 12,
                (v >> 2) << 8 | (v & 3) << 22,
                v << 16,
            ];
            for (table, bits) in self.placed.iter_mut().zip(bits) {
                if let Some(t) = table.get_mut(b) {
                    *t = bits;
                }
            }
        }
        self.built = true;
    }

    /// Encodes `input` (whole groups of three bytes, four groups at a turn: a loop's own
    /// instructions are a fifth of a group's) into `out`, each group's four symbols one
    /// little-endian word.
    #[inline(always)]
    fn encode(&self, input: &[u8], out: &mut [u8]) {
        let pair = |i: u32| u32::from(self.pairs.get((i & 0xfff) as usize).copied().unwrap_or(0));
        for (g, q) in input.chunks_exact(12).zip(out.chunks_exact_mut(16)) {
            for (g, q) in g.chunks_exact(3).zip(q.chunks_exact_mut(4)) {
                if let &[a, b, c] = g {
                    let n = u32::from(a) << 16 | u32::from(b) << 8 | u32::from(c);
                    q.copy_from_slice(&(pair(n >> 12) | pair(n) << 16).to_le_bytes());
                }
            }
        }
    }

    /// Decodes `input` (whole groups of four symbols, four groups at a turn) into `out`:
    /// each symbol's bits looked up in their place, the four groups made into three words.
    /// Bits of the answer are set if a byte is outside the alphabet.
    #[inline(always)]
    fn decode(&self, input: &[u8], out: &mut [u8]) -> u32 {
        let [p0, p1, p2, p3] = &self.placed;
        let at = |t: &[u32; 256], b: u8| t.get(usize::from(b)).copied().unwrap_or(INVALID_BITS);
        let bits = |q: &[u8]| match q {
            &[a, b, c, d] => at(p0, a) | at(p1, b) | at(p2, c) | at(p3, d),
            _ => INVALID_BITS,
        };
        let mut invalid = 0u32;
        for (q, o) in input.chunks_exact(16).zip(out.chunks_exact_mut(12)) {
            let (q01, q23) = q.split_at(8);
            let ((q0, q1), (q2, q3)) = (q01.split_at(4), q23.split_at(4));
            let [x0, x1, x2, x3] = [bits(q0), bits(q1), bits(q2), bits(q3)];
            invalid |= x0 | x1 | x2 | x3;
            let words = [x0 | x1 << 24, x1 >> 8 | x2 << 16, x2 >> 16 | x3 << 8];
            for (o, w) in o.chunks_exact_mut(4).zip(words) {
                o.copy_from_slice(&w.to_le_bytes());
            }
        }
        invalid & INVALID_BITS
    }
}

impl Alphabet {
    fn tables(self) -> &'static Tables {
        match self {
            Alphabet::Standard => &STANDARD_TABLES,
            Alphabet::UrlSafeNoPad => &URL_SAFE_TABLES,
        }
    }

    /// The length of the encoding of `n` bytes.
    pub fn encoded_len(&self, n: usize) -> usize {
        let full = n / 3 * 4;
        match (n % 3, self.tables().padded) {
            (0, _) => full,
            (_, true) => full + 4,
            (rest, false) => full + rest + 1,
        }
    }

    /// Appends the encoding of `input` to `out`.
    pub fn encode_into(&self, input: &[u8], out: &mut Vec<u8>) {
        let t = self.tables();
        let at = out.len();
        out.resize(at + self.encoded_len(input.len()), b'=');
        let Some(dst) = out.get_mut(at..) else {
            return;
        };
        let bulk = if t.wide { input.len() / 12 * 12 } else { 0 };
        let (head, groups) = input.split_at(bulk);
        let (dst_head, dst_groups) = dst.split_at_mut(bulk / 3 * 4);
        if bulk > 0 {
            with_wide(|w| w.encode(head, dst_head));
        }
        // Then (or for the other alphabet, throughout) a group at a time, symbol by symbol.
        let sym = |v: u32| t.symbols.get((v & 63) as usize).copied().unwrap_or(b'=');
        let groups = groups.chunks_exact(3);
        let rest = groups.remainder();
        for (g, q) in groups.zip(dst_groups.chunks_exact_mut(4)) {
            if let (&[a, b, c], [q0, q1, q2, q3]) = (g, q) {
                let n = u32::from(a) << 16 | u32::from(b) << 8 | u32::from(c);
                (*q0, *q1, *q2, *q3) = (sym(n >> 18), sym(n >> 12), sym(n >> 6), sym(n));
            }
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
        let t = self.tables();
        let data = if t.padded {
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
        let bulk = if t.wide { full / 4 } else { 0 };
        let (head, quads) = data.split_at(bulk * 16);
        let (out_head, out_quads) = out.split_at_mut(bulk * 12);
        let invalid = if bulk > 0 {
            with_wide(|w| w.decode(head, out_head))
        } else {
            0
        };
        // Then (or for the other alphabet, throughout) a group at a time, symbol by symbol; a
        // byte outside the alphabet sets the high bits of `bad`.
        let mut bad = 0u8;
        let mut value = |b: u8| {
            let v = t.values.get(usize::from(b)).copied().unwrap_or(INVALID);
            bad |= v;
            u32::from(v)
        };
        for (q, o) in quads.chunks_exact(4).zip(out_quads.chunks_exact_mut(3)) {
            if let (&[a, b, c, d], [o0, o1, o2]) = (q, o) {
                let n = value(a) << 18 | value(b) << 12 | value(c) << 6 | value(d);
                *o0 = (n >> 16) as u8;
                *o1 = (n >> 8) as u8;
                *o2 = n as u8;
            }
        }
        // The last two or three symbols: one or two bytes, and the unused bits zero.
        let rest = data.get(full * 4..).unwrap_or_default();
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
        (invalid == 0 && bad & 0xc0 == 0 && unused == 0).then_some(out)
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
        // Past 12 bytes the bulk is decoded four groups at a turn: lengths around and well
        // past it, with noise anywhere in them.
        for len in (0..40).chain([47, 48, 49, 96, 255, 1024]) {
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

    /// A byte outside the alphabet is refused at every place of the groups decoded four at a
    /// time, and of those decoded one by one after them; one of the other alphabet too.
    #[test]
    fn a_stray_byte_anywhere_is_refused() {
        let bytes: Vec<u8> = (0..=255).cycle().take(57).collect();
        let encoded = crate_b64::STANDARD.encode(&bytes).into_bytes();
        assert_eq!(STANDARD.decode(&encoded), Some(bytes));
        for i in 0..encoded.len() - 1 {
            for stray in [b'-', b'_', b'=', b'"', b'\\', b'\n', 0, 0x80, 0xff] {
                let mut c = encoded.clone();
                c[i] = stray;
                assert_eq!(STANDARD.decode(&c), None, "{stray} at {i}");
            }
        }
    }
}
