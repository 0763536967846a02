//! The deferred queue: a record that fails to send (backend down at tick time) is retried
//! with backoff until the backend is back; what does not fit in a full queue is dropped and
//! counted (its key then waits for its lease).

use std::time::Duration;

use idempotency_tests::{Mode, Reply};
use serde_json::json;

use crate::both_modes;
use crate::support::{E2e, metric};

async fn a_record_that_fails_to_send_is_retried_until_the_backend_is_back(mode: Mode) {
    let mut t = E2e::start(mode, json!({"record": "deferred"})).await;
    t.api.reply("/orders", Reply::new(201).body("created"));
    let first = t.send("/orders", "\"k-retry\"", "{}").await;
    assert_eq!(first.status, 201);
    // The backend goes down before the tick sends the record.
    t.backend.as_mut().unwrap().stop().await;
    t.tick().await;
    assert_eq!(t.metric(metric::RECORDED), 0);
    t.host().assert_logged("record will be retried");
    // Back (same port, same data): the next attempt, after its backoff (200 ms), succeeds.
    t.backend.as_mut().unwrap().restart().await;
    t.host().advance(Duration::from_millis(200)).await;
    t.host().settle().await;
    assert_eq!(t.metric(metric::RECORDED), 1);
    assert_eq!(t.metric(metric::RECORD_FAILED), 0);
    let retry = t.send("/orders", "\"k-retry\"", "{}").await;
    assert_eq!((retry.status, retry.text().as_str()), (201, "created"));
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(t.api.count("/orders"), 1);
    t.finish().await;
}

async fn a_full_queue_drops_and_counts(mode: Mode) {
    let t = E2e::start(
        mode,
        json!({"record": "deferred", "queue": {"max_entries": 1}}),
    )
    .await;
    t.api.reply("/orders", Reply::new(201).body("created"));
    // Two responses end before any tick: the second record does not fit.
    for key in ["\"k-q1\"", "\"k-q2\""] {
        assert_eq!(t.send("/orders", key, "{}").await.status, 201);
    }
    assert_eq!(t.metric(metric::QUEUE_DROPPED), 1);
    t.host().assert_logged("queue full, record dropped");
    t.tick().await;
    assert_eq!(t.metric(metric::RECORDED), 1);
    let replayed = t.send("/orders", "\"k-q1\"", "{}").await;
    assert_eq!(replayed.header("idempotent-replayed"), Some("true"));
    // The dropped one stays allocated until its lease expires: its retry gets 409.
    let held = t.send("/orders", "\"k-q2\"", "{}").await;
    assert_eq!(held.status, 409);
    assert_eq!(t.api.count("/orders"), 2);
    t.finish().await;
}

both_modes!(
    a_record_that_fails_to_send_is_retried_until_the_backend_is_back,
    a_full_queue_drops_and_counts,
);
