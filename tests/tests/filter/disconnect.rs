//! A client that goes away while its allocation is paused: no host rule is broken (on Kong a
//! call in flight past its request would crash the worker), and the key ends up consistent.

use std::time::Duration;

use idempotency_tests::{Mode, Reply, Upstream};
use serde_json::json;

use crate::both_modes;
use crate::support::{E2e, Target, eventually, metric};

async fn a_client_that_disconnects_while_its_allocation_waits(mode: Mode) {
    // The allocation is paused for as long as the test wants: the key is held by a first
    // request (its upstream held), and the second waits for it (`conflict: wait`).
    let t = E2e::start(mode, json!({"conflict": "wait"})).await;
    t.api.reply("/pay", Reply::new(201).body("paid"));
    t.api.hold("/pay");
    let holder = t.post("/pay", Some("\"k-gone\""), "{\"amount\":5}");
    let holder = tokio::spawn(async move { holder.send().await.unwrap() });
    eventually(
        "the holder reached the upstream",
        Duration::from_secs(10),
        || t.api.count("/pay") == 1,
    )
    .await;
    t.post("/pay", Some("\"k-gone\""), "{\"amount\":5}")
        .send_and_disconnect()
        .await
        .unwrap();
    t.client_gone().await;
    t.api.release("/pay");
    let first = holder.await.unwrap();
    assert_eq!((first.status, first.text().as_str()), (201, "paid"));
    // Kong records from the tick; the gone client's wait then gets its answer (a replay
    // nobody reads). Envoy cancelled that wait. (No settle before the tick: on Kong the wait
    // is in flight until the record.)
    t.host().advance(t.tick).await;
    t.host().settle().await;
    assert_eq!(t.api.count("/pay"), 1, "executed once");
    assert_eq!(t.metric(metric::RECORDED), 1);
    let retry = t.send("/pay", "\"k-gone\"", "{\"amount\":5}").await;
    assert_eq!((retry.status, retry.text().as_str()), (201, "paid"));
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(t.api.count("/pay"), 1);
    t.finish().await;
}

async fn a_client_that_disconnects_before_the_allocation_answers(mode: Mode) {
    // A stand-in backend holds the allocation until the client is gone, then grants it.
    let stand_in = Upstream::start().await;
    stand_in.reply(
        "/api/v2/captures",
        Reply::new(202)
            .header("content-type", "application/json")
            .body("{\"lease_token\":\"t-1\",\"lease_expires_at\":\"2100-01-01T00:00:00Z\"}"),
    );
    stand_in.hold("/api/v2/captures");
    let t = E2e::setup(mode)
        .target(Target::At(stand_in.addr()))
        .start()
        .await;
    t.api.reply("/pay", Reply::new(201).body("paid"));
    let client = t
        .post("/pay", Some("\"k-early\""), "{}")
        .send_and_hold()
        .await
        .unwrap();
    eventually(
        "the allocation reached the backend",
        Duration::from_secs(10),
        || stand_in.count("/api/v2/captures") == 1,
    )
    .await;
    drop(client);
    t.client_gone().await;
    stand_in.release("/api/v2/captures");
    t.tick().await;
    let calls: Vec<(String, String)> = stand_in
        .requests()
        .iter()
        .map(|s| {
            (
                s.method.clone(),
                String::from_utf8_lossy(&s.body).into_owned(),
            )
        })
        .collect();
    match mode {
        // The request goes on: the upstream executes it and its response is recorded under
        // the lease it was granted.
        Mode::Ngx => {
            assert_eq!(t.api.count("/pay"), 1);
            assert_eq!(calls.len(), 2, "{calls:?}");
            assert_eq!(calls[1].0, "POST", "recorded");
            assert!(
                calls[1].1.contains("\"lease_token\":\"t-1\""),
                "{}",
                calls[1].1
            );
        }
        // The stream is reset and its call cancelled: the upstream is never asked, and
        // nothing more reaches the backend; a lease it granted meanwhile frees the key when
        // it expires (README: the deferred queue and instance resets).
        Mode::Envoy => {
            assert_eq!(t.api.count("/pay"), 0);
            assert_eq!(calls.len(), 1, "{calls:?}");
        }
    }
    t.finish().await;
}

async fn a_client_that_disconnects_while_the_upstream_works(mode: Mode) {
    let t = E2e::start(mode, json!({})).await;
    t.api.reply("/pay", Reply::new(201).body("paid"));
    t.api.hold("/pay");
    let client = t
        .post("/pay", Some("\"k-mid\""), "{}")
        .send_and_hold()
        .await
        .unwrap();
    eventually("the upstream got it", Duration::from_secs(10), || {
        t.api.count("/pay") == 1
    })
    .await;
    drop(client);
    t.client_gone().await;
    t.api.release("/pay");
    t.tick().await;
    let retry = t.send("/pay", "\"k-mid\"", "{}").await;
    assert_eq!((retry.status, retry.text().as_str()), (201, "paid"));
    match mode {
        // The request went on: its response was recorded, the retry replays it.
        Mode::Ngx => {
            assert_eq!(retry.header("idempotent-replayed"), Some("true"));
            assert_eq!(t.api.count("/pay"), 1);
            assert_eq!(t.metric(metric::RECORDED), 1);
        }
        // The stream was reset: no response to record, the key was released.
        Mode::Envoy => {
            assert_eq!(retry.header("idempotent-replayed"), None);
            assert_eq!(t.api.count("/pay"), 2);
            assert_eq!(t.metric(metric::RELEASED), 1);
        }
    }
    t.finish().await;
}

/// The record calls a stand-in backend received: single ones (inline) and batches (the
/// queue's, one record each here).
fn records(stand_in: &Upstream) -> usize {
    stand_in
        .requests()
        .iter()
        .filter(|s| {
            s.method == "POST"
                && matches!(
                    s.path.as_str(),
                    "/api/v2/captures" | "/api/v2/captures/batch"
                )
        })
        .count()
}

async fn a_client_that_goes_away_while_the_inline_record_is_in_flight(mode: Mode) {
    // A stand-in backend: allocations granted at once, records held until the test says.
    let stand_in = Upstream::start().await;
    stand_in.reply(
        "PUT /api/v2/captures",
        Reply::new(202)
            .header("content-type", "application/json")
            .body("{\"lease_token\":\"t-2\",\"lease_expires_at\":\"2100-01-01T00:00:00Z\"}"),
    );
    stand_in.reply(
        "POST /api/v2/captures",
        Reply::new(200)
            .header("content-type", "application/json")
            .body("{\"idempotency_key\":\"k\",\"expires_at\":\"2100-01-01T00:00:00Z\"}"),
    );
    stand_in.reply(
        "POST /api/v2/captures/batch",
        Reply::new(200)
            .header("content-type", "application/json")
            .body("{\"results\":[{\"status\":200,\"body\":{}}]}"),
    );
    stand_in.hold("POST /api/v2/captures");
    let t = E2e::setup(mode)
        .target(Target::At(stand_in.addr()))
        .start()
        .await;
    t.api.reply("/pay", Reply::new(201).body("paid"));
    let client = t
        .post("/pay", Some("\"k-inline-gone\""), "{}")
        .send_and_hold()
        .await
        .unwrap();
    match mode {
        // The end of the response is held on the inline record; the client goes away then:
        // the stream is reset, the call cancelled, and the record queued again.
        Mode::Envoy => {
            eventually(
                "the inline record was sent",
                Duration::from_secs(10),
                || records(&stand_in) == 1,
            )
            .await;
            drop(client);
            t.client_gone().await;
            stand_in.release("POST /api/v2/captures");
            t.tick().await;
            assert_eq!(records(&stand_in), 2, "sent again from the queue");
        }
        // Kong records from the tick, whether the client is still there or not.
        Mode::Ngx => {
            eventually("the upstream answered", Duration::from_secs(10), || {
                t.api.count("/pay") == 1
            })
            .await;
            drop(client);
            stand_in.release("POST /api/v2/captures");
            t.tick().await;
            assert_eq!(records(&stand_in), 1);
        }
    }
    assert_eq!(t.metric(metric::RECORDED), 1);
    assert_eq!(t.metric(metric::RECORD_FAILED), 0);
    t.finish().await;
}

both_modes!(
    a_client_that_goes_away_while_the_inline_record_is_in_flight,
    a_client_that_disconnects_while_its_allocation_waits,
    a_client_that_disconnects_before_the_allocation_answers,
    a_client_that_disconnects_while_the_upstream_works,
);
