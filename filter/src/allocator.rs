//! The module's allocator: size classes in front of the system's.
//!
//! A keyed request allocates and frees a few dozen small blocks (header maps, the key, call
//! bodies, answers), and the `dlmalloc` that Rust's Wasm targets link cost about 270
//! instructions per `malloc` or `free`: an eighth of the request's fixed cost. Here a block of
//! at most [`MAX_SMALL`] bytes (and alignment at most 16) comes from one of nine power-of-two
//! size classes: a free list per class, refilled by carving blocks from a 64 KiB chunk taken
//! from the system allocator. Taking a block or giving one back is a few instructions; larger
//! blocks (a big capture, a big request body) go to the system allocator as before. (Talc,
//! tried in its place, cost more than dlmalloc here: about 5,000 more per keyed request.)
//!
//! Memory: a block is rounded up to its class (at most twice the size asked), and blocks freed
//! stay in their class's list for the next request instead of going back to the system. A
//! Wasm instance's memory never shrinks anyway; what the small classes hold is bounded by the
//! most small blocks ever live at once (a burst's peak), as the system allocator's own heap is.
//!
//! A block goes back to the class its `Layout` names (GlobalAlloc's contract: the layout it was
//! allocated with). Unlike dlmalloc, which reads a block's size from its own header, this
//! trusts that for the buffers a host fills too: the host asks for them through
//! `proxy_on_memory_allocate(size)` and the SDK frees them as `Vec`s of the size the host then
//! reports, which is the size it asked for in both hosts (proxy-wasm-cpp-host's
//! `copyToPointerSize`, ngx_wasm_module's marshalling). A host that asked for more than it
//! reported would only move a block into a smaller class than its own (room wasted, nothing
//! overwritten).
//!
//! A Wasm instance runs one thread (no `atomics` feature: the `cfg` in lib.rs), so the state
//! needs no lock.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::ptr;

/// The largest block served from the size classes.
pub const MAX_SMALL: usize = 4096;
/// The smallest class: room for the free list's link, and the alignment every block has.
const MIN_BLOCK: usize = 16;
/// 16, 32, …, 4096 bytes.
const CLASSES: usize = 9;
/// What a class takes from the system at a time.
const CHUNK: usize = 64 * 1024;

/// The size class of `layout`, or `None` for the system allocator.
fn class(layout: Layout) -> Option<usize> {
    if layout.size() > MAX_SMALL || layout.align() > MIN_BLOCK {
        return None;
    }
    let size = layout.size().max(MIN_BLOCK);
    // 16 → 0, 17..=32 → 1, …, 2049..=4096 → 8.
    Some((usize::BITS - (size - 1).leading_zeros()) as usize - 4)
}

struct State {
    /// Per class, the first free block; each free block holds the address of the next.
    free: [*mut u8; CLASSES],
    /// The part of the current chunk not carved yet.
    next: *mut u8,
    end: *mut u8,
}

/// The allocator: `#[global_allocator]` in lib.rs on Wasm; the unit tests make their own.
pub struct SizeClasses {
    state: UnsafeCell<State>,
}

// SAFETY: the Wasm module runs on one thread (lib.rs installs it only without `atomics`), and
// the unit tests use an instance from one thread at a time.
unsafe impl Sync for SizeClasses {}

impl SizeClasses {
    pub const fn new() -> SizeClasses {
        SizeClasses {
            state: UnsafeCell::new(State {
                free: [ptr::null_mut(); CLASSES],
                next: ptr::null_mut(),
                end: ptr::null_mut(),
            }),
        }
    }
}

impl Default for SizeClasses {
    fn default() -> Self {
        SizeClasses::new()
    }
}

/// Not inlined: with LTO every `drop` of a `String` or a `Vec` would carry its own copy (20 KiB
/// more module for a few instructions less per call).
unsafe impl GlobalAlloc for SizeClasses {
    #[inline(never)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(c) = class(layout) else {
            // SAFETY: the caller's contract (a non-zero size) passes on unchanged.
            return unsafe { System.alloc(layout) };
        };
        // SAFETY: one thread, and no call below re-enters this allocator.
        let s = unsafe { &mut *self.state.get() };
        let Some(head) = s.free.get_mut(c) else {
            return ptr::null_mut(); // no such class: `class` gives 0 to 8
        };
        if !head.is_null() {
            let block = *head;
            // SAFETY: a free block of this class holds the next free block's address in its
            // first word, written by `dealloc`; blocks are 16-aligned.
            *head = unsafe { block.cast::<*mut u8>().read() };
            return block;
        }
        let size = MIN_BLOCK << c;
        if (s.end as usize) - (s.next as usize) < size {
            // The rest of the old chunk (less than one block of this class) is left unused.
            // SAFETY: CHUNK is non-zero and a valid layout with alignment 16.
            let chunk =
                unsafe { System.alloc(Layout::from_size_align_unchecked(CHUNK, MIN_BLOCK)) };
            if chunk.is_null() {
                return chunk;
            }
            s.next = chunk;
            // SAFETY: the end of the chunk just allocated.
            s.end = unsafe { chunk.add(CHUNK) };
        }
        let block = s.next;
        // SAFETY: `size` bytes are left in the chunk (checked above).
        s.next = unsafe { block.add(size) };
        block
    }

    #[inline(never)]
    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        let Some(c) = class(layout) else {
            // SAFETY: a block of this layout came from the system allocator (`alloc`).
            return unsafe { System.dealloc(block, layout) };
        };
        // SAFETY: one thread; the block is at least 16 bytes, 16-aligned, and no longer used.
        let s = unsafe { &mut *self.state.get() };
        if let Some(head) = s.free.get_mut(c) {
            unsafe { block.cast::<*mut u8>().write(*head) };
            *head = block;
        }
    }

    #[inline(never)]
    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees a valid layout for `new_size` with this alignment.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (class(layout), class(new_layout)) {
            // The block already has room (its class's whole size).
            (Some(a), Some(b)) if a == b => block,
            // SAFETY: both layouts are the system allocator's.
            (None, None) => unsafe { System.realloc(block, layout, new_size) },
            _ => {
                // SAFETY: the caller's contract; the old block is valid for `layout.size()`.
                let new = unsafe { self.alloc(new_layout) };
                if !new.is_null() {
                    unsafe {
                        ptr::copy_nonoverlapping(block, new, layout.size().min(new_size));
                        self.dealloc(block, layout);
                    }
                }
                new
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    // On wasm32-unknown-unknown the tests run under wasm-bindgen-test (Cargo.toml), where this
    // allocator is also the global one.
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    #[test]
    fn classes_round_up_to_powers_of_two() {
        assert_eq!(class(layout(1, 1)), Some(0));
        assert_eq!(class(layout(16, 8)), Some(0));
        assert_eq!(class(layout(17, 1)), Some(1));
        assert_eq!(class(layout(4096, 16)), Some(8));
        assert_eq!(class(layout(4097, 1)), None);
        assert_eq!(class(layout(8, 32)), None, "over-aligned: the system's");
    }

    /// Many live blocks of every size: none overlaps another, each keeps what was written to
    /// it, each is aligned as asked; freed blocks are reused by their class.
    #[test]
    fn blocks_are_disjoint_aligned_and_reused() {
        let a = SizeClasses::new();
        let mut live: Vec<(*mut u8, Layout, u8)> = Vec::new();
        let sizes = [1, 7, 16, 24, 33, 100, 500, 1024, 3000, 4096, 5000, 70_000];
        for round in 0..40u8 {
            for (i, &size) in sizes.iter().enumerate() {
                let l = layout(size, if i % 3 == 0 { 16 } else { 8 });
                let p = unsafe { a.alloc(l) };
                assert!(!p.is_null());
                assert_eq!(p as usize % l.align(), 0);
                let tag = round.wrapping_mul(31).wrapping_add(i as u8);
                unsafe { ptr::write_bytes(p, tag, size) };
                live.push((p, l, tag));
            }
        }
        let mut spans: Vec<(usize, usize)> = live
            .iter()
            .map(|(p, l, _)| (*p as usize, *p as usize + l.size()))
            .collect();
        spans.sort();
        assert!(
            spans.windows(2).all(|w| w[0].1 <= w[1].0),
            "two live blocks overlap"
        );
        for (p, l, tag) in &live {
            let bytes = unsafe { std::slice::from_raw_parts(*p, l.size()) };
            assert!(bytes.iter().all(|b| b == tag), "a block was overwritten");
        }
        // Freed, then asked for again: the same blocks come back (last freed, first served).
        let (p, l, _) = live.pop().unwrap();
        unsafe { a.dealloc(p, l) };
        let small = live.iter().position(|(_, l, _)| l.size() == 100).unwrap();
        let (p, l, _) = live.swap_remove(small);
        unsafe { a.dealloc(p, l) };
        assert_eq!(
            unsafe { a.alloc(layout(120, 8)) },
            p,
            "a 128-byte block is reused"
        );
        for (p, l, _) in live {
            unsafe { a.dealloc(p, l) };
        }
    }

    #[test]
    fn realloc_keeps_the_bytes_across_classes_and_the_system() {
        let a = SizeClasses::new();
        let mut l = layout(10, 1);
        let mut p = unsafe { a.alloc(l) };
        unsafe { ptr::copy_nonoverlapping(b"0123456789".as_ptr(), p, 10) };
        for new_size in [12, 16, 40, 4096, 9000, 100_000, 300, 10] {
            let q = unsafe { a.realloc(p, l, new_size) };
            assert!(!q.is_null());
            let kept = unsafe { std::slice::from_raw_parts(q, 10) };
            assert_eq!(kept, b"0123456789", "growing to {new_size}");
            if class(l).is_some() && class(l) == class(layout(new_size, 1)) {
                assert_eq!(q, p, "within its class a block stays where it is");
            }
            p = q;
            l = layout(new_size, 1);
        }
        unsafe { a.dealloc(p, l) };
    }
}
