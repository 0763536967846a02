//! Concurrent duplicates: exactly one upstream execution; the others get 409, or with
//! `conflict: wait` the first request's response.

use std::time::Duration;

use idempotency_tests::{ClientResponse, Mode, Reply};
use serde_json::json;
use tokio::task::JoinHandle;

use crate::both_modes;
use crate::support::{E2e, eventually, metric, problem, problem_of};

const N: usize = 32;

/// Sends `N` identical keyed requests at once.
fn duplicates(t: &E2e) -> Vec<JoinHandle<ClientResponse>> {
    (0..N)
        .map(|_| {
            let r = t.post("/transfers", Some("\"dup-1\""), "{\"amount\":100}");
            tokio::spawn(async move { r.send().await.unwrap() })
        })
        .collect()
}

async fn thirty_two_concurrent_duplicates_execute_once_the_others_get_409(mode: Mode) {
    let t = E2e::start(mode, json!({})).await;
    t.api.reply(
        "/transfers",
        Reply::new(201)
            .header("content-type", "application/json")
            .body("{\"id\":7}"),
    );
    // The first request to get the key stays in the upstream until every other got its answer.
    t.api.hold("/transfers");
    let handles = duplicates(&t);
    eventually(
        "one execution, 31 conflicts",
        Duration::from_secs(20),
        || t.api.count("/transfers") == 1 && t.metric(metric::CONFLICT) == (N - 1) as i64,
    )
    .await;
    t.api.release("/transfers");
    let mut created = 0;
    for h in handles {
        let r = h.await.unwrap();
        match r.status {
            201 => {
                created += 1;
                assert_eq!(r.text(), "{\"id\":7}");
            }
            409 => {
                assert_eq!(problem_of(&r), (problem::IN_FLIGHT.to_string(), 409));
                let ra = r.header("retry-after").expect("Retry-After on 409");
                assert!(
                    !ra.is_empty() && ra.bytes().all(|b| b.is_ascii_digit()),
                    "a number of seconds: {ra:?}"
                );
            }
            s => panic!("unexpected status {s}: {}", r.text()),
        }
    }
    assert_eq!(created, 1);
    assert_eq!(
        t.api.count("/transfers"),
        1,
        "exactly one upstream execution"
    );
    assert_eq!(t.metric(metric::ALLOCATED), 1);
    // Recorded (inline on Envoy, from the tick on Kong): a retry replays it.
    t.tick().await;
    let retry = t.send("/transfers", "\"dup-1\"", "{\"amount\":100}").await;
    assert_eq!((retry.status, retry.text().as_str()), (201, "{\"id\":7}"));
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(t.api.count("/transfers"), 1);
    t.finish().await;
}

async fn with_conflict_wait_all_thirty_two_get_the_same_response(mode: Mode) {
    let t = E2e::start(mode, json!({"conflict": "wait"})).await;
    t.api.reply(
        "/transfers",
        Reply::new(201)
            .header("content-type", "application/json")
            .header("link", "</s>; rel=next")
            .header("link", "</t>; rel=last")
            .body("{\"id\":8}"),
    );
    t.api.hold("/transfers");
    let handles = duplicates(&t);
    eventually(
        "the first reached the upstream",
        Duration::from_secs(20),
        || t.api.count("/transfers") == 1,
    )
    .await;
    t.api.release("/transfers");
    // Kong records from the tick: move the clock until every duplicate has its answer.
    let start = std::time::Instant::now();
    while !handles.iter().all(JoinHandle::is_finished) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the duplicates never got an answer"
        );
        t.host().advance(t.tick).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for h in handles {
        let r = h.await.unwrap();
        assert_eq!((r.status, r.text().as_str()), (201, "{\"id\":8}"));
        assert_eq!(
            r.header_all("link"),
            vec!["</s>; rel=next", "</t>; rel=last"]
        );
    }
    assert_eq!(
        t.api.count("/transfers"),
        1,
        "exactly one upstream execution"
    );
    assert_eq!(t.metric(metric::ALLOCATED), 1);
    // Each duplicate's one allocation waited at the backend, which says so: counted exactly.
    assert_eq!(
        t.metric(metric::WAITED),
        (N - 1) as i64,
        "the others waited for it"
    );
    assert_eq!(t.metric(metric::REPLAYED), 0);
    assert_eq!(t.metric(metric::CONFLICT), 0);
    t.finish().await;
}

/// What the bench reports as the filter's memory per request in flight: the growth of the
/// instance's linear memory (whole 64 KiB pages) while distinct keyed requests are held in
/// the upstream; Wasm memory never shrinks, so it stays grown after they end.
async fn requests_held_in_flight_grow_the_instances_memory_which_stays_grown(mode: Mode) {
    const HELD: usize = 256;
    let t = E2e::start(mode, json!({})).await;
    t.api.reply("/held", Reply::new(201).body(vec![b'r'; 1024]));
    let first = t
        .post("/held", Some("\"held-warm\""), "{}")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status, 201);
    t.tick().await;
    let before = t.host().wasm_memory().await.expect("an instance");
    assert!(before > 0 && before % 65536 == 0, "whole pages: {before}");
    t.api.hold("/held");
    let handles: Vec<JoinHandle<ClientResponse>> = (0..HELD)
        .map(|i| {
            let r = t.post("/held", Some(&format!("\"held-{i}\"")), vec![b'q'; 1024]);
            tokio::spawn(async move { r.send().await.unwrap() })
        })
        .collect();
    eventually(
        "every request in the upstream",
        Duration::from_secs(20),
        || t.api.count("/held") == HELD + 1,
    )
    .await;
    let during = t.host().wasm_memory().await.expect("an instance");
    // Each holds at least its context, key and fingerprint state: 256 of them take pages.
    assert!(
        during > before,
        "{HELD} requests held: {before} → {during} bytes"
    );
    t.api.release("/held");
    for h in handles {
        assert_eq!(h.await.unwrap().status, 201);
    }
    t.tick().await;
    let after = t.host().wasm_memory().await.expect("an instance");
    assert!(after >= during, "never shrinks: {during} → {after} bytes");
    t.finish().await;
}

both_modes!(
    thirty_two_concurrent_duplicates_execute_once_the_others_get_409,
    with_conflict_wait_all_thirty_two_get_the_same_response,
    requests_held_in_flight_grow_the_instances_memory_which_stays_grown,
);
