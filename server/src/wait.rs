//! `wait_ms`: an allocation that finds the key in flight waits for its holder to finish.
//!
//! Two mechanisms, so that it works with every store:
//! - in this process, a registry of per-key [`Notify`]s, fired by the API right after a record or
//!   a release of that key is committed: the waiter retries at once;
//! - across processes (several servers on one Redis or MongoDB), nothing tells us, so the waiter
//!   also retries on a backoff (25 ms doubling to 500 ms), and at the holder's lease expiry.
//!
//! Each retry is an ordinary allocation, so the answer is whatever the key is by then: the
//! capture (200) if the holder recorded, a new lease (202) if it released or its lease expired,
//! still in flight (409) at the deadline. When the server shuts down, waits end early with their
//! current answer, so that shutting down never waits for a wait.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::store::{Allocate, AllocateOutcome, Store, StoreError, now_ms};

const FIRST_BACKOFF: Duration = Duration::from_millis(25);
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// The per-key notifications of this process, and the shutdown flag waits watch.
pub struct Waiters {
    keys: Mutex<HashMap<String, Arc<Notify>>>,
    shutdown: watch::Receiver<bool>,
}

impl Waiters {
    /// `shutdown` turns true when the server begins to shut down.
    pub fn new(shutdown: watch::Receiver<bool>) -> Waiters {
        Waiters {
            keys: Mutex::new(HashMap::new()),
            shutdown,
        }
    }

    /// Wake every wait on `key`. Called after a record or release of it is committed.
    pub fn notify(&self, key: &str) {
        if let Some(notify) = self.keys.lock().expect("waiters").get(key) {
            notify.notify_waiters();
        }
    }

    /// How many keys have a wait registered (for tests: the registry must not leak).
    pub fn registered(&self) -> usize {
        self.keys.lock().expect("waiters").len()
    }

    fn subscribe(&self, key: &str) -> Subscription<'_> {
        let notify = self
            .keys
            .lock()
            .expect("waiters")
            .entry(key.to_owned())
            .or_default()
            .clone();
        Subscription {
            waiters: self,
            key: key.to_owned(),
            notify,
        }
    }
}

/// One wait's registration; the key's entry goes when its last wait does.
struct Subscription<'a> {
    waiters: &'a Waiters,
    key: String,
    notify: Arc<Notify>,
}

impl Drop for Subscription<'_> {
    fn drop(&mut self) {
        let mut keys = self.waiters.keys.lock().expect("waiters");
        // Every clone is made and dropped under this lock: 2 means the map's and ours.
        if Arc::strong_count(&self.notify) == 2 {
            keys.remove(&self.key);
        }
    }
}

/// Allocate, and while the key is in flight wait up to `wait` for it to change. The outcome,
/// and how long it waited when it found the key in flight (`None` when it did not wait), so
/// that the caller can tell a response it waited for from a plain replay.
pub async fn allocate(
    store: &dyn Store,
    waiters: &Waiters,
    request: Allocate,
    wait: Duration,
) -> Result<(AllocateOutcome, Option<Duration>), StoreError> {
    if wait.is_zero() {
        return Ok((store.allocate(request).await?, None));
    }
    let started = Instant::now();
    let deadline = started + wait;
    let subscription = waiters.subscribe(&request.key);
    let mut shutdown = waiters.shutdown.clone();
    let mut backoff = FIRST_BACKOFF;
    let mut waiting = false;
    loop {
        // Created before the attempt: a notification fired between the attempt and the await
        // below is not lost (a `Notified` receives `notify_waiters` from its creation on).
        let notified = subscription.notify.notified();
        let outcome = store.allocate(request.clone()).await?;
        let waited = waiting.then(|| started.elapsed());
        let AllocateOutcome::InFlight { lease_expires_at } = outcome else {
            return Ok((outcome, waited));
        };
        let now = Instant::now();
        if now >= deadline || *shutdown.borrow() {
            return Ok((outcome, Some(started.elapsed())));
        }
        if !waiting {
            tracing::debug!(
                key = %idempotency_spec::key_digest(&request.key),
                "waiting for the holder of the key"
            );
            waiting = true;
        }
        // Retry no later than the lease's end (it may be taken over then) and the deadline.
        let until_lease = Duration::from_millis(lease_expires_at.saturating_sub(now_ms()) + 1);
        let pause = backoff.min(deadline - now).min(until_lease);
        tokio::select! {
            () = notified => {}
            () = tokio::time::sleep(pause) => backoff = (backoff * 2).min(MAX_BACKOFF),
            () = stopping(&mut shutdown) => {}
        }
    }
}

/// Resolves when the server begins to shut down; never if nobody can tell it to.
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    if shutdown.wait_for(|stopping| *stopping).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn registry_entries_go_with_their_last_wait() {
        let (_tx, rx) = watch::channel(false);
        let waiters = Waiters::new(rx);
        let a = waiters.subscribe("k");
        let b = waiters.subscribe("k");
        assert_eq!(waiters.registered(), 1);
        drop(a);
        assert_eq!(waiters.registered(), 1);
        drop(b);
        assert_eq!(waiters.registered(), 0);
    }

    #[tokio::test]
    async fn a_notification_between_attempt_and_wait_is_not_lost() {
        let (_tx, rx) = watch::channel(false);
        let waiters = Waiters::new(rx);
        let subscription = waiters.subscribe("k");
        let notified = subscription.notify.notified();
        waiters.notify("k");
        // Resolves although it was never polled before the notification.
        notified.await;
    }
}
