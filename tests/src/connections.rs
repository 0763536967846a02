//! ngx: the worker's connections (`worker_connections`), a fixed number of slots that every
//! client connection, upstream exchange and dispatched call takes while it lasts, and that a
//! root context's call can lose for good (HOSTS.md, "Three bugs of ngx_wasm_module", bug 3).
//!
//! Every root-context call gets a fake connection besides its socket; the host frees it when
//! the call completes, but only if no other call of that root context is pending then; and a
//! root dispatch that fails synchronously never frees its own. Such a slot is leaked: when
//! the leaked and the live ones reach `worker_connections`, nginx refuses every new client
//! connection ("N worker_connections are not enough"), answers 500 where it cannot reach the
//! upstream, and every call fails. A new worker (after a crash) starts with all its slots.
//!
//! Envoy has no such budget here: its slots are unlimited.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// The slots of one worker. Shared by the accept loop (client connections) and the worker
/// thread (upstream exchanges, calls).
#[derive(Debug)]
pub struct Slots {
    limit: usize,
    used: AtomicUsize,
    leaked: AtomicUsize,
    /// Bumped when the worker is replaced: slots taken before belong to the dead one.
    epoch: AtomicU64,
}

/// One slot in use; given back when dropped, unless [`Slot::leak`] lost it.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    epoch: u64,
}

impl Slots {
    /// `limit` slots (`usize::MAX`: no budget).
    pub fn new(limit: usize) -> Arc<Slots> {
        Arc::new(Slots {
            limit,
            used: AtomicUsize::new(0),
            leaked: AtomicUsize::new(0),
            epoch: AtomicU64::new(0),
        })
    }

    /// A free slot, or `None` when the live and the leaked ones use them all.
    pub fn take(self: &Arc<Self>) -> Option<Slot> {
        let leaked = self.leaked.load(Ordering::SeqCst);
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                (used.saturating_add(leaked) < self.limit).then_some(used + 1)
            })
            .ok()?;
        Some(Slot {
            slots: self.clone(),
            epoch: self.epoch.load(Ordering::SeqCst),
        })
    }

    /// One slot lost for good without ever being in use (a dispatch that failed
    /// synchronously); nothing when none is left.
    pub fn leak_one(&self) {
        let used = self.used.load(Ordering::SeqCst);
        let _ = self
            .leaked
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |leaked| {
                (used.saturating_add(leaked) < self.limit).then_some(leaked + 1)
            });
    }

    /// Slots lost for good so far (in this worker).
    pub fn leaked(&self) -> usize {
        self.leaked.load(Ordering::SeqCst)
    }

    /// Slots in use now.
    pub fn in_use(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A new worker: every slot free (those still held belong to the dead worker).
    pub fn reset(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.used.store(0, Ordering::SeqCst);
        self.leaked.store(0, Ordering::SeqCst);
    }
}

impl Slot {
    /// The slot is never given back (the host lost it).
    pub fn leak(self) {
        let slots = self.slots.clone();
        if self.epoch == slots.epoch.load(Ordering::SeqCst) {
            slots.leaked.fetch_add(1, Ordering::SeqCst);
        }
        // Dropping `self` gives the in-use count back: it moved to the leaked ones.
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.epoch == self.slots.epoch.load(Ordering::SeqCst) {
            let _ = self
                .slots
                .used
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| u.checked_sub(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_taken_given_back_and_leaked() {
        let slots = Slots::new(3);
        let a = slots.take().unwrap();
        let b = slots.take().unwrap();
        let c = slots.take().unwrap();
        assert!(slots.take().is_none(), "all in use");
        drop(a);
        assert_eq!(slots.in_use(), 2);
        b.leak();
        assert_eq!((slots.in_use(), slots.leaked()), (1, 1));
        slots.leak_one();
        assert_eq!(slots.leaked(), 2);
        assert!(slots.take().is_none(), "one in use, two leaked");
        slots.leak_one();
        assert_eq!(slots.leaked(), 2, "nothing left to leak");
        drop(c);
        let d = slots.take().unwrap();
        assert!(slots.take().is_none());
        slots.reset();
        drop(d);
        assert_eq!((slots.in_use(), slots.leaked()), (0, 0), "the new worker's");
        assert!(slots.take().is_some());
    }
}
