//! Exactly once under load: every key sent 16 times with a seeded spread (some copies while
//! the first is in flight, most after it finished), then retried. Every key is executed
//! upstream exactly once; every other answer is a 409 with `Retry-After` (with
//! `conflict: wait`: the first response) or a byte-identical replay; every record the
//! backend acknowledged replays.

use idempotency_server::{Config, StoreKind};
use idempotency_tests::Mode;
use serde_json::{Value, json};

use crate::both_modes;
use crate::common::TestServer;
use crate::common::redis_server::RedisServer;
use crate::harness::{Gateway, Ledger, Load, Seen, Tap, keys};

/// The filter's counters (README's Metrics table).
const RECORDED: &str = "idempotency_recorded_total";
const RECORD_FAILED: &str = "idempotency_record_failed_total";
const QUEUE_DROPPED: &str = "idempotency_queue_dropped_total";

fn embedded(config: &mut Config) {
    config.store = Some(StoreKind::Embedded);
}

fn redis(url: String) -> impl FnOnce(&mut Config) {
    move |config: &mut Config| {
        config.store = Some(StoreKind::Redis);
        config.redis_url = Some(url);
    }
}

/// Runs the load through `gw` and checks the promise; `wait`: the filter has
/// `conflict: wait`, so a duplicate gets the first response instead of a 409.
async fn run_and_check(gw: &Gateway, tap: &Tap, load: &Load, wait: bool) {
    let sent = load.run(gw).await;
    let ledger = Ledger::of(gw);
    ledger.assert_exactly_once(load);
    let tally = ledger.tally(&sent);
    eprintln!("{}: {:?}", load.tag, tally.seen);
    tally.assert_sound(&load.tag);
    assert_eq!(
        tally.get(Seen::Executed),
        load.keys,
        "one execution per key"
    );
    assert_eq!(tally.get(Seen::Unavailable), 0, "no fault, no 503");
    assert!(
        tally.get(Seen::Replayed) > 0,
        "the schedule sends copies after the first finished"
    );
    if wait {
        assert_eq!(
            tally.get(Seen::Conflict),
            0,
            "conflict: wait never answers 409"
        );
    } else {
        assert!(
            tally.get(Seen::Conflict) > 0,
            "the schedule sends copies while the first is in flight"
        );
    }
    assert_eq!(gw.metric(RECORDED), load.keys as i64, "every key recorded");
    assert_eq!(gw.metric(RECORD_FAILED) + gw.metric(QUEUE_DROPPED), 0);
    let acked = tap.acknowledged_records();
    assert_eq!(
        acked.len(),
        load.keys,
        "the backend acknowledged every record"
    );

    // Every retry is a replay of the one execution, byte for byte.
    let retries = load.retry(gw).await;
    let tally = ledger.tally(&retries);
    tally.assert_sound("retries");
    assert_eq!(tally.get(Seen::Replayed), load.keys, "{:?}", tally.seen);
    Ledger::of(gw).assert_exactly_once(load);
}

async fn through_one_backend(mode: Mode, tag: &str, backend: &TestServer, patch: Value) {
    let tap = Tap::start(vec![backend.addr]).await;
    let gw = Gateway::start(mode, tap.addr, patch.clone()).await;
    let load = Load::new(&format!("{tag}-{mode}"), keys(), 16);
    run_and_check(&gw, &tap, &load, patch["conflict"] == "wait").await;
    gw.finish().await;
}

async fn every_key_once_on_the_embedded_store(mode: Mode) {
    let backend = TestServer::start_with(embedded).await;
    through_one_backend(mode, "embedded", &backend, json!({})).await;
    backend.stop().await;
}

async fn every_key_once_on_redis(mode: Mode) {
    let redis_server = RedisServer::start().await;
    let backend = TestServer::start_with(redis(redis_server.url())).await;
    through_one_backend(mode, "redis", &backend, json!({})).await;
    backend.stop().await;
}

async fn with_conflict_wait_every_duplicate_gets_the_first_response(mode: Mode) {
    let backend = TestServer::start_with(embedded).await;
    let patch = json!({"conflict": "wait", "wait_ms": 20_000});
    through_one_backend(mode, "wait", &backend, patch).await;
    backend.stop().await;
}

async fn two_backends_on_one_redis_taking_turns(mode: Mode) {
    let redis_server = RedisServer::start().await;
    let a = TestServer::start_with(redis(redis_server.url())).await;
    let b = TestServer::start_with(redis(redis_server.url())).await;
    let tap = Tap::start(vec![a.addr, b.addr]).await;
    let gw = Gateway::start(mode, tap.addr, json!({})).await;
    let load = Load::new(&format!("two-{mode}"), keys(), 16);
    run_and_check(&gw, &tap, &load, false).await;
    let by = tap.answered_by();
    let (to_a, to_b) = (by[&a.addr], by[&b.addr]);
    assert!(
        to_a.abs_diff(to_b) <= 1,
        "the calls alternate: {to_a} to one, {to_b} to the other"
    );
    gw.finish().await;
    a.stop().await;
    b.stop().await;
}

both_modes!(
    every_key_once_on_the_embedded_store,
    every_key_once_on_redis,
    with_conflict_wait_every_duplicate_gets_the_first_response,
    two_backends_on_one_redis_taking_turns,
);
