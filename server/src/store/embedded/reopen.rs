//! The embedded store after a failed write: closed and opened again, as a restart would.
//!
//! A write or a sync that fails (the disk full, remounted read-only, an I/O error) makes the
//! store refuse everything from then on (see `Shared::failed`): after a failed sync, nothing
//! it holds in memory can be trusted. Rather than wait for an operator to restart the
//! process, [`Reopening`] does what a restart does: it closes the failed store (which
//! releases the data dir) and opens the dir again, so that redb comes back at its last
//! durable commit and the journal's records after it are applied again. Nothing
//! acknowledged is lost that way, since an answer is only sent once its change is durable.
//!
//! While the cause lasts (the disk still full) the open fails too; it is tried again at most
//! once per [`RETRY`], and until one succeeds every operation is answered
//! [`StoreError::Unavailable`] (503).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::RwLock;

use super::{EmbeddedOptions, EmbeddedStore};
use crate::store::{
    Allocate, AllocateOutcome, BatchOp, BatchOutcome, Record, RecordOutcome, Release,
    ReleaseOutcome, Store, StoreError,
};

/// The shortest time between two attempts to open the store again.
pub const RETRY: Duration = Duration::from_secs(1);

/// The embedded store, opened again in place after a failed write.
pub struct Reopening {
    options: EmbeddedOptions,
    /// The first store's counters, which every store after it counts into (the server
    /// registers them once).
    counters: super::Counters,
    state: RwLock<State>,
}

struct State {
    /// `None` after a failed attempt to open it again (the cause still there).
    store: Option<Arc<EmbeddedStore>>,
    /// No attempt before this instant.
    next_attempt: Instant,
    /// The server shut the store down: it stays closed.
    closed: bool,
}

impl Reopening {
    /// Wraps a store opened with `options`.
    pub fn new(store: EmbeddedStore, options: EmbeddedOptions) -> Reopening {
        Reopening {
            options,
            counters: store.shared.counters.clone(),
            state: RwLock::new(State {
                store: Some(Arc::new(store)),
                next_attempt: Instant::now(),
                closed: false,
            }),
        }
    }

    /// The store to use now: the current one while it is healthy, else one opened again (or
    /// the reason there is none).
    async fn store(&self) -> Result<Arc<EmbeddedStore>, StoreError> {
        {
            let state = self.state.read().await;
            if state.closed {
                return Err(StoreError::Closed);
            }
            if let Some(store) = &state.store
                && !store.has_failed()
            {
                return Ok(store.clone());
            }
        }
        self.reopen().await
    }

    async fn reopen(&self) -> Result<Arc<EmbeddedStore>, StoreError> {
        let mut state = self.state.write().await;
        if state.closed {
            return Err(StoreError::Closed);
        }
        // Another caller may have reopened it while this one waited for the lock.
        if let Some(store) = &state.store
            && !store.has_failed()
        {
            return Ok(store.clone());
        }
        let now = Instant::now();
        if now < state.next_attempt {
            return Err(StoreError::Unavailable(
                "a write to disk failed; the store is being opened again".into(),
            ));
        }
        state.next_attempt = now + RETRY;
        if let Some(failed) = state.store.take() {
            // Releases the data dir and its lock; what it refuses meanwhile is answered 503.
            let _ = failed.shutdown().await;
        }
        let options = self.options.clone();
        // The new store counts into the first one's metrics (registered once, at start).
        let counters = self.counters.clone();
        let opened =
            tokio::task::spawn_blocking(move || EmbeddedStore::open_counting(options, counters))
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        match opened {
            Ok(store) => {
                tracing::warn!("embedded store opened again after a failed write");
                let store = Arc::new(store);
                state.store = Some(store.clone());
                Ok(store)
            }
            Err(e) => {
                tracing::error!(error = %e, "the embedded store cannot be opened again yet");
                Err(StoreError::Unavailable(format!(
                    "a write to disk failed, and opening the store again failed: {e}"
                )))
            }
        }
    }
}

#[async_trait]
impl Store for Reopening {
    fn name(&self) -> &'static str {
        "embedded"
    }

    fn register_metrics(&self, registry: &prometheus::Registry) {
        self.counters.register(registry);
    }

    async fn allocate(&self, request: Allocate) -> Result<AllocateOutcome, StoreError> {
        self.store().await?.allocate(request).await
    }

    async fn record(&self, request: Record) -> Result<RecordOutcome, StoreError> {
        self.store().await?.record(request).await
    }

    async fn release(&self, request: Release) -> Result<ReleaseOutcome, StoreError> {
        self.store().await?.release(request).await
    }

    async fn batch(&self, operations: Vec<BatchOp>) -> Vec<Result<BatchOutcome, StoreError>> {
        match self.store().await {
            Ok(store) => store.batch(operations).await,
            Err(e) => operations
                .iter()
                .map(|_| Err(StoreError::Unavailable(e.to_string())))
                .collect(),
        }
    }

    async fn ready(&self) -> Result<(), StoreError> {
        self.store().await?.ready().await
    }

    async fn purge_expired(&self, limit: usize) -> Result<usize, StoreError> {
        self.store().await?.purge_expired(limit).await
    }

    async fn shutdown(&self) -> Result<(), StoreError> {
        let mut state = self.state.write().await;
        state.closed = true;
        match state.store.take() {
            Some(store) => store.shutdown().await,
            None => Ok(()),
        }
    }
}
