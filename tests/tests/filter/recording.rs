//! When the capture is stored: `record: deferred` (queued, sent from the root context's
//! tick), `inline` (Envoy holds the end of the response until the capture is stored, so a
//! retry right after the response replays; Kong cannot call from a response phase and falls
//! back to deferred), `auto` (inline on Envoy, deferred on Kong).

use idempotency_tests::{Mode, Reply};
use serde_json::json;

use crate::both_modes;
use crate::support::{E2e, metric, problem, problem_of};

/// Sends the first request and its immediate retry (no tick in between); returns the retry's
/// status.
async fn first_then_immediate_retry(t: &E2e, key: &str) -> u16 {
    let first = t.send("/jobs", key, "{}").await;
    assert_eq!(first.status, 202);
    let retry = t.send("/jobs", key, "{}").await;
    if retry.status == 409 {
        assert_eq!(problem_of(&retry).0, problem::IN_FLIGHT);
    } else {
        assert_eq!((retry.status, retry.text().as_str()), (202, "queued"));
        assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    }
    retry.status
}

async fn record_deferred_stores_from_the_tick(mode: Mode) {
    let t = E2e::start(mode, json!({"record": "deferred"})).await;
    t.api.reply("/jobs", Reply::new(202).body("queued"));
    assert_eq!(
        first_then_immediate_retry(&t, "\"k-def\"").await,
        409,
        "not stored yet"
    );
    assert_eq!(t.metric(metric::RECORDED), 0);
    t.tick().await;
    assert_eq!(t.metric(metric::RECORDED), 1, "stored from the tick");
    let r = t.send("/jobs", "\"k-def\"", "{}").await;
    assert_eq!(r.header("idempotent-replayed"), Some("true"));
    assert_eq!(t.api.count("/jobs"), 1);
    t.finish().await;
}

async fn record_inline_replays_right_after_the_response_on_envoy_and_falls_back_on_kong(
    mode: Mode,
) {
    for record in ["inline", "auto"] {
        let t = E2e::start(mode, json!({"record": record})).await;
        t.api.reply("/jobs", Reply::new(202).body("queued"));
        let retry = first_then_immediate_retry(&t, "\"k-inline\"").await;
        match mode {
            // The end of the response was held until the capture was stored.
            Mode::Envoy => {
                assert_eq!(retry, 202, "{record}: replayed at once");
                assert_eq!(t.metric(metric::RECORDED), 1);
            }
            // No call from a response phase on Kong: the tick records it.
            Mode::Ngx => {
                assert_eq!(retry, 409, "{record}: deferred on Kong");
                assert_eq!(t.metric(metric::RECORDED), 0);
                t.tick().await;
                assert_eq!(t.metric(metric::RECORDED), 1);
                let r = t.send("/jobs", "\"k-inline\"", "{}").await;
                assert_eq!(r.header("idempotent-replayed"), Some("true"));
            }
        }
        assert_eq!(t.api.count("/jobs"), 1, "{record}");
        t.finish().await;
    }
}

async fn a_body_in_several_pieces_and_a_bodyless_response_are_recorded(mode: Mode) {
    // Kong gives no end_of_stream to a Content-Length body that comes in several calls: the
    // response ends in on_log, complete because the bytes seen match Content-Length.
    let t = E2e::setup(mode)
        .host(|b| b.response_chunk_size(100))
        .start()
        .await;
    let body: Vec<u8> = (0..1000u32).map(|i| (i % 256) as u8).collect();
    t.api.reply("/pieces", Reply::new(200).body(body.clone()));
    t.api
        .reply("/chunked", Reply::new(200).body(body.clone()).chunked(300));
    t.api.reply("/nothing", Reply::new(204));
    // Envoy drops content-type from a body-less local reply: the replay restores it.
    t.api.reply(
        "/empty",
        Reply::new(201).header("content-type", "application/json"),
    );
    for path in ["/pieces", "/chunked", "/nothing", "/empty"] {
        let first = t.send(path, "\"k-pieces\"", "{}").await;
        t.tick().await;
        let retry = t.send(path, "\"k-pieces\"", "{}").await;
        assert_eq!(retry.status, first.status, "{path}");
        assert_eq!(retry.body, first.body, "{path}");
        assert_eq!(
            retry.header("content-type"),
            first.header("content-type"),
            "{path}"
        );
        assert_eq!(retry.header("idempotent-replayed"), Some("true"), "{path}");
        assert_eq!(t.api.count(path), 1, "{path}");
    }
    assert_eq!(t.metric(metric::RECORDED), 4);
    t.finish().await;
}

/// Envoy raises the head of an upstream response without a body with end_stream set (its
/// HTTP/1 codec waits for the message to complete), so the filter records from
/// `on_http_response_headers` and holds the head: the client gets the response only once the
/// capture is stored. Each of twenty keys, at once, with no tick: the retry replays, every
/// record went inline and none was queued again.
#[tokio::test]
async fn an_envoy_response_without_a_body_is_held_until_its_inline_record_is_stored() {
    let t = E2e::start(Mode::Envoy, json!({"record": "inline"})).await;
    t.api.reply(
        "/created",
        Reply::new(201).header("content-type", "application/json"),
    );
    t.api.reply("/nothing", Reply::new(204));
    for i in 0..20 {
        for path in ["/created", "/nothing"] {
            let key = format!("\"k-bodyless-{i}\"");
            let first = t.send(path, &key, "{}").await;
            let retry = t.send(path, &key, "{}").await;
            assert_eq!(retry.status, first.status, "{path} {i}");
            assert_eq!(
                retry.header("idempotent-replayed"),
                Some("true"),
                "{path} {i}: stored before the response reached the client"
            );
        }
    }
    assert_eq!(t.api.count("/created") + t.api.count("/nothing"), 40);
    assert_eq!(t.metric(metric::RECORDED), 40);
    t.host().settle().await;
    assert!(
        t.host().logs_containing("queued").is_empty(),
        "no record was queued again: {:?}",
        t.host().logs_containing("queued")
    );
    t.finish().await;
}

both_modes!(
    record_deferred_stores_from_the_tick,
    record_inline_replays_right_after_the_response_on_envoy_and_falls_back_on_kong,
    a_body_in_several_pieces_and_a_bodyless_response_are_recorded,
);
