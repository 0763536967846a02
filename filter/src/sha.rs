//! SHA-256 that looks its first block up before it compresses it.
//!
//! Both digests of a keyed request begin with a block that is the same on nearly every request
//! an instance sees: the scope's holds its version tag, the method and the start of the host;
//! the fingerprint's its tag, the method, the path's length and its first bytes. An instance
//! keeps the state after the last few such blocks ([`CACHED`]), so that a request on a route
//! it has served hashes one block fewer for each digest, the way HMAC keeps the state after
//! its padded key. The digest is the same either way (the tests compare it with `sha2`'s on
//! every length and split, looked up or not).
//!
//! What it gives, in the fuel example (`bench/limits.md`, Fuel): a keyed request on a route the
//! instance has served costs about 3,770 Wasm instructions fewer per digest (a block is about
//! 4,900); on a route it has not, the lookup and the keeping cost about 1,800 more per digest
//! than plain SHA-256 (the example's `new route` column).
//!
//! Only a first block made of bytes the caller passed as *common* ([`Sha::update_common`]:
//! tags, the route, header names) is looked up and kept: a block that holds a scope header's
//! value or the start of a body is hashed as usual, so the cache never keeps them.
//!
//! What is kept is `sha2`'s hasher after the block, cloned on a hit: its own framing, which
//! passes a body's blocks to the compression function together, costs about 100 instructions
//! a block less than one of ours around `sha2::compress256` did (`bench/experiments.md`).

use std::cell::RefCell;

use sha2::{Digest, Sha256};

const BLOCK: usize = 64;

/// How many first blocks an instance remembers (about 180 bytes each): two per route and
/// method (scope and fingerprint) for several routes. The order is least recently used, with a
/// new block entering in the middle (as InnoDB's buffer pool does): a hit moves its block to
/// the front and requests on ever new paths churn the back half only, so the blocks most
/// requests share stay, and a block seen again before eight others is kept.
pub const CACHED: usize = 16;

/// A first block (as eight words: comparing `[u8; 64]` is a byte loop on wasm32) and the
/// hasher after it.
type Entry = ([u64; BLOCK / 8], Sha256);

/// The blocks, and their order of use by index (moving a byte is cheaper than an entry).
#[derive(Default)]
struct FirstBlocks {
    entries: Vec<Entry>,
    order: Vec<u8>,
}

thread_local! {
    static FIRST_BLOCKS: RefCell<FirstBlocks> = RefCell::default();
}

/// A SHA-256 being computed.
#[derive(Clone)]
pub struct Sha {
    /// The first block while it fills; `head_len == BLOCK` once `state` has it.
    head: [u8; BLOCK],
    head_len: usize,
    /// Whether every byte of `head` came through [`Sha::update_common`].
    common: bool,
    state: Sha256,
}

impl Default for Sha {
    fn default() -> Self {
        Sha::new()
    }
}

impl Sha {
    pub fn new() -> Sha {
        Sha {
            head: [0; BLOCK],
            head_len: 0,
            common: true,
            state: Sha256::new(),
        }
    }

    /// Bytes that many requests share (a tag, the route, a header's name): a first block made
    /// of them only is looked up, and kept.
    pub fn update_common(&mut self, bytes: impl AsRef<[u8]>) {
        self.absorb(bytes.as_ref());
    }

    /// A field both digests are made of: its length (8 bytes, big-endian), then its bytes,
    /// so that no two sequences of fields hash the same. Common, as in [`Sha::update_common`].
    pub fn field_common(&mut self, bytes: &[u8]) {
        self.update_common((bytes.len() as u64).to_be_bytes());
        self.update_common(bytes);
    }

    /// [`Sha::field_common`] of other bytes (a header's value).
    pub fn field(&mut self, bytes: &[u8]) {
        self.update((bytes.len() as u64).to_be_bytes());
        self.update(bytes);
    }

    /// Any other bytes.
    pub fn update(&mut self, bytes: impl AsRef<[u8]>) {
        let bytes = bytes.as_ref();
        if self.head_len < BLOCK && !bytes.is_empty() {
            self.common = false;
        }
        self.absorb(bytes);
    }

    fn absorb(&mut self, mut bytes: &[u8]) {
        if self.head_len < BLOCK {
            let n = (BLOCK - self.head_len).min(bytes.len());
            let (now, rest) = bytes.split_at(n);
            if let Some(to) = self.head.get_mut(self.head_len..self.head_len + n) {
                to.copy_from_slice(now);
            }
            self.head_len += n;
            bytes = rest;
            if self.head_len < BLOCK {
                return;
            }
            if self.common {
                self.state = after_first_block(&self.head);
            } else {
                self.state.update(self.head);
            }
        }
        self.state.update(bytes);
    }

    pub fn finalize(mut self) -> [u8; 32] {
        if self.head_len < BLOCK {
            // Shorter than a block: nothing to look up.
            let head = self.head.get(..self.head_len).unwrap_or_default();
            self.state.update(head);
        }
        self.state.finalize().into()
    }
}

/// A block as the cache compares it.
fn words(block: &[u8]) -> [u64; BLOCK / 8] {
    let mut words = [0u64; BLOCK / 8];
    for (w, b) in words.iter_mut().zip(block.chunks_exact(8)) {
        *w = u64::from_le_bytes(b.try_into().unwrap_or_default());
    }
    words
}

/// The hasher after `block`, from the cache or computed (and then cached).
fn after_first_block(block: &[u8; BLOCK]) -> Sha256 {
    let words = words(block);
    FIRST_BLOCKS.with(|cache| {
        let cache = &mut *cache.borrow_mut();
        // Found by position, then cloned: a `find_map` that cloned in its closure cost about 220
        // instructions more a hit.
        let found = cache.order.iter().position(|&i| {
            cache
                .entries
                .get(usize::from(i))
                .is_some_and(|(w, _)| *w == words)
        });
        if let Some(at) = found {
            let i = cache.order.get(at).copied().unwrap_or_default();
            if let Some((_, state)) = cache.entries.get(usize::from(i)) {
                let state = state.clone();
                if let Some(used) = cache.order.get_mut(..=at) {
                    used.rotate_right(1);
                }
                return state;
            }
        }
        let mut state = Sha256::new();
        state.update(block);
        let entry = (words, state.clone());
        let slot = if cache.entries.len() < CACHED {
            cache.entries.push(entry);
            Some(cache.entries.len() - 1)
        } else {
            // The least recently used block's place.
            let last = cache.order.pop().map(usize::from);
            if let Some(e) = last.and_then(|i| cache.entries.get_mut(i)) {
                *e = entry;
            }
            last
        };
        if let Some(slot) = slot {
            let middle = cache.order.len().min(CACHED / 2);
            cache.order.insert(middle, slot as u8);
        }
        state
    })
}

/// The cached blocks, most recently used first.
#[cfg(test)]
fn cached() -> Vec<[u64; BLOCK / 8]> {
    FIRST_BLOCKS.with(|c| {
        let c = c.borrow();
        c.order
            .iter()
            .map(|&i| c.entries[usize::from(i)].0)
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    // On wasm32-unknown-unknown the tests run under wasm-bindgen-test (Cargo.toml).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn plain(bytes: &[u8]) -> [u8; 32] {
        Sha256::digest(bytes).into()
    }

    /// Ours over `pieces`, the first `common` of them passed as common bytes.
    fn ours(pieces: &[&[u8]], common: usize) -> [u8; 32] {
        let mut s = Sha::new();
        for (i, p) in pieces.iter().enumerate() {
            if i < common {
                s.update_common(p);
            } else {
                s.update(p);
            }
        }
        s.finalize()
    }

    fn input(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn the_same_digest_on_every_length_and_split_looked_up_or_not() {
        for len in 0..=300 {
            let bytes = input(len, len as u8);
            let want = plain(&bytes);
            // Common bytes: the first time the first block is computed, then it is a hit
            // (twice, so that a hit that moved its entry is a hit again). Then the same bytes
            // not common, never looked up.
            for common in [1, 1, 1, 0] {
                assert_eq!(ours(&[&bytes], common), want, "{len} bytes whole");
                for cut in [1, 7, 55, 56, 63, 64, 65, 100, 128, 129] {
                    if cut <= len {
                        let (a, b) = bytes.split_at(cut);
                        assert_eq!(ours(&[a, b], common), want, "{len} cut at {cut}");
                        assert_eq!(ours(&[a, &[], b], common), want, "{len} cut at {cut}");
                        assert_eq!(ours(&[a, b], 2), want, "{len} cut at {cut}");
                    }
                }
                let singles: Vec<&[u8]> = bytes.chunks(1).collect();
                assert_eq!(ours(&singles, common * len), want, "{len} one at a time");
                let (a, b) = bytes.split_at(len / 2);
                assert_eq!(ours(&[a, b], common), want, "{len} in halves");
            }
        }
    }

    #[test]
    fn a_block_that_differs_in_one_byte_is_a_miss() {
        // Same first 63 bytes, then each last byte: never another block's state.
        let mut bytes = input(100, 3);
        for last in 0..=255u8 {
            bytes[63] = last;
            assert_eq!(ours(&[&bytes[..64], &bytes[64..]], 1), plain(&bytes));
        }
        // Every bit of the block, one at a time.
        let base = input(64, 9);
        for at in 0..64 * 8 {
            let mut b = base.clone();
            b[at / 8] ^= 1 << (at % 8);
            let want = plain(&[&b[..], b"tail"].concat());
            assert_eq!(ours(&[&b, b"tail"], 1), want, "bit {at}");
        }
        assert!(cached().len() <= CACHED);
    }

    #[test]
    fn only_a_block_of_common_bytes_is_kept() {
        let tag = input(40, 1);
        let value = input(40, 2);
        let block = [&tag[..], &value[..24]].concat();
        // The block ends in a value: not kept.
        let want = plain(&[&tag[..], &value[..]].concat());
        assert_eq!(ours(&[&tag, &value], 1), want);
        assert!(!cached().contains(&words(&block)));
        // The same bytes as common ones: kept.
        assert_eq!(ours(&[&tag, &value], 2), want);
        assert!(cached().contains(&words(&block)));
    }

    #[test]
    fn blocks_many_requests_share_stay_while_new_ones_churn() {
        // Two blocks every request shares (a route's scope and fingerprint).
        let (scope, fingerprint) = (input(64, 1), input(64, 2));
        let request = || {
            let want = plain(&[&scope[..], b"value"].concat());
            assert_eq!(ours(&[&scope, b"value"], 1), want);
            assert_eq!(ours(&[&fingerprint], 1), plain(&fingerprint));
        };
        request();
        request();
        // Then a stream of blocks seen once each, far more than the cache holds, with a
        // request on the route now and then.
        for n in 0..(8 * CACHED) {
            let cold = input(64, 100 + n as u8);
            assert_eq!(ours(&[&cold], 1), plain(&cold));
            if n % (CACHED / 2) == 0 {
                request();
            }
        }
        let now = cached();
        assert_eq!(now.len(), CACHED);
        assert!(
            now.contains(&words(&scope)),
            "the route's scope block stays"
        );
        assert!(now.contains(&words(&fingerprint)), "and its fingerprint's");
        // A new route, seen again before eight others: kept, at the front.
        let new = input(64, 7);
        assert_eq!(ours(&[&new], 1), plain(&new));
        assert_eq!(
            cached()[CACHED / 2],
            words(&new),
            "a new block enters in the middle"
        );
        for n in 0..(CACHED / 2 - 1) {
            let cold = input(64, 200 + n as u8);
            assert_eq!(ours(&[&cold], 1), plain(&cold));
        }
        assert_eq!(ours(&[&new], 1), plain(&new));
        assert_eq!(cached()[0], words(&new), "a hit moves it to the front");
    }
}
