//! The purge: a background task that deletes expired entries, so that the store's disk use
//! follows the live data.
//!
//! It never changes an answer (an expired entry is free whether or not it was deleted, see
//! [`crate::store`]); it only reclaims space. It runs every [`INTERVAL`], deletes in batches of
//! [`BATCH`] so that no single transaction grows large, and stops when the server shuts down.
//! Stores that expire entries by themselves (a TTL index, key expiry) inherit the no-op
//! [`Store::purge_expired`], and the loop costs nothing.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::store::Store;

/// How often the purge looks for expired entries. A look that finds none writes nothing and,
/// in the embedded store, pays no sync.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// The most entries deleted in one transaction.
pub const BATCH: usize = 1000;

/// Run until `stop` turns true (or its sender goes away).
pub async fn run(store: Arc<dyn Store>, interval: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|stopping| *stopping) => return,
        }
        loop {
            match store.purge_expired(BATCH).await {
                // A full batch: there may be more; go on unless we are stopping.
                Ok(n) if n >= BATCH => {
                    tracing::debug!(entries = n, "purged expired entries");
                    if *stop.borrow() {
                        return;
                    }
                }
                Ok(0) => break,
                Ok(n) => {
                    tracing::debug!(entries = n, "purged expired entries");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "purge failed; retrying later");
                    break;
                }
            }
        }
    }
}
