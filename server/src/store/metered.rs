//! A store measured: every call to the inner store timed (`store_call_duration_seconds`), its
//! failures counted by kind (`store_errors_total`), and the calls of the API's operations run
//! in a `store` span of the request's trace (not the purge's, every second, nor readiness
//! probes: they would bury the traces that matter). The server wraps whatever store it serves
//! in it, so that every store is measured alike.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use tracing::Instrument as _;

use super::{
    Allocate, AllocateOutcome, BatchOp, BatchOutcome, Record, RecordOutcome, Release,
    ReleaseOutcome, Store, StoreError,
};
use crate::metrics::{Label as _, Metrics, StoreCall};

pub struct Metered {
    inner: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl Metered {
    pub fn new(inner: Arc<dyn Store>, metrics: Arc<Metrics>) -> Metered {
        Metered { inner, metrics }
    }

    /// The span of one call: debug, so that it costs nothing unless traces are exported (or
    /// the log is at debug).
    fn span(&self, call: StoreCall) -> tracing::Span {
        tracing::debug_span!(
            "store",
            otel.name = call.as_str(),
            otel.kind = "client",
            db.system.name = self.inner.name(),
            otel.status_code = tracing::field::Empty,
        )
    }

    async fn measure<T>(
        &self,
        call: StoreCall,
        run: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let span = match call {
            StoreCall::Ready | StoreCall::Purge => tracing::Span::none(),
            _ => self.span(call),
        };
        let started = Instant::now();
        let result = run.instrument(span.clone()).await;
        self.metrics.store_call(call, started.elapsed());
        if let Err(error) = &result {
            self.metrics.store_error(call, error);
            span.record("otel.status_code", "ERROR");
        }
        result
    }
}

#[async_trait]
impl Store for Metered {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn allocate(&self, request: Allocate) -> Result<AllocateOutcome, StoreError> {
        self.measure(StoreCall::Allocate, self.inner.allocate(request))
            .await
    }

    async fn record(&self, request: Record) -> Result<RecordOutcome, StoreError> {
        self.measure(StoreCall::Record, self.inner.record(request))
            .await
    }

    async fn release(&self, request: Release) -> Result<ReleaseOutcome, StoreError> {
        self.measure(StoreCall::Release, self.inner.release(request))
            .await
    }

    /// One call for the batch; each item that failed is one error.
    async fn batch(&self, operations: Vec<BatchOp>) -> Vec<Result<BatchOutcome, StoreError>> {
        let span = self.span(StoreCall::Batch);
        let started = Instant::now();
        let results = self.inner.batch(operations).instrument(span.clone()).await;
        self.metrics.store_call(StoreCall::Batch, started.elapsed());
        let mut failed = false;
        for error in results.iter().filter_map(|r| r.as_ref().err()) {
            self.metrics.store_error(StoreCall::Batch, error);
            failed = true;
        }
        if failed {
            span.record("otel.status_code", "ERROR");
        }
        results
    }

    async fn ready(&self) -> Result<(), StoreError> {
        self.measure(StoreCall::Ready, self.inner.ready()).await
    }

    async fn purge_expired(&self, limit: usize) -> Result<usize, StoreError> {
        self.measure(StoreCall::Purge, self.inner.purge_expired(limit))
            .await
    }

    fn register_metrics(&self, registry: &prometheus::Registry) {
        self.inner.register_metrics(registry);
    }

    async fn shutdown(&self) -> Result<(), StoreError> {
        self.inner.shutdown().await
    }
}
