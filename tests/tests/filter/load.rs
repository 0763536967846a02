//! Bursts and long runs: what single requests never show (HOSTS.md, "Three bugs of
//! ngx_wasm_module"). In ngx mode the test host crashes the worker on a root dispatch from a
//! call's answer, hangs it on a dispatch after an empty answer, and counts every connection
//! slot a root call leaks; a filter that triggers any of them fails here.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use idempotency_tests::{ClientResponse, Mode, Reply, Upstream};
use serde_json::json;

use crate::both_modes;
use crate::support::{E2e, Target, metric, problem, problem_of};

/// Runs `work` while the clock moves a tick every tick of real time (so that records flow
/// from the queue while requests keep coming, and the queue's deadlines mean what they mean
/// on a real gateway), then settles with a last tick.
async fn with_ticks<T>(t: &E2e, work: impl std::future::Future<Output = T>) -> T {
    let done = Arc::new(AtomicBool::new(false));
    let ticking = async {
        let mut clock = tokio::time::interval(t.tick);
        while !done.load(Ordering::SeqCst) {
            clock.tick().await;
            t.host().advance(t.tick).await;
        }
    };
    let working = async {
        let out = work.await;
        done.store(true, Ordering::SeqCst);
        out
    };
    let (out, ()) = tokio::join!(working, ticking);
    t.tick().await;
    out
}

async fn a_burst_of_keyed_requests_with_duplicates_executes_each_key_once(mode: Mode) {
    const KEYS: usize = 300;
    const COPIES: usize = 4;
    // As the real run that found the bugs: 160 connections at a time.
    const AT_ONCE: usize = 160;
    let t = E2e::start(mode, json!({})).await;
    t.api.reply("/orders", Reply::new(201).body("created"));
    let answers: Vec<ClientResponse> = with_ticks(&t, async {
        let permits = Arc::new(tokio::sync::Semaphore::new(AT_ONCE));
        let mut tasks = tokio::task::JoinSet::new();
        // Each key's copies spread over the burst: some before the first finished, some after.
        for copy in 0..COPIES {
            for k in 0..KEYS {
                let r = t.post(
                    "/orders",
                    Some(&format!("\"burst-{k}\"")),
                    format!("{{\"k\":{k}}}"),
                );
                let permit = permits.clone().acquire_owned().await.unwrap();
                tasks.spawn(async move {
                    let answer = r.send().await;
                    drop(permit);
                    (copy, answer)
                });
            }
        }
        let mut all = Vec::new();
        while let Some(done) = tasks.join_next().await {
            let (_, answer) = done.unwrap();
            all.push(answer.expect("every client gets an answer"));
        }
        all
    })
    .await;
    let mut created = 0;
    for r in &answers {
        match r.status {
            201 if r.header("idempotent-replayed").is_none() => created += 1,
            201 => assert_eq!(r.text(), "created"),
            409 => assert_eq!(problem_of(r).0, problem::IN_FLIGHT),
            s => panic!("unexpected {s}: {}", r.text()),
        }
    }
    assert_eq!(created, KEYS, "each key executed once");
    assert_eq!(
        t.api.count("/orders"),
        KEYS,
        "the upstream saw each key once"
    );
    assert_eq!(
        t.metric(metric::RECORDED),
        KEYS as i64,
        "every record was sent"
    );
    assert_eq!(
        t.metric(metric::RECORD_FAILED) + t.metric(metric::QUEUE_DROPPED),
        0
    );
    // Every retry now replays.
    for k in (0..KEYS).step_by(37) {
        let retry = t
            .send(
                "/orders",
                &format!("\"burst-{k}\""),
                format!("{{\"k\":{k}}}"),
            )
            .await;
        assert_eq!(retry.header("idempotent-replayed"), Some("true"), "key {k}");
    }
    assert_eq!(t.api.count("/orders"), KEYS);
    if mode == Mode::Ngx {
        assert_eq!(t.host().leaked_connections(), 0);
        assert_eq!(t.host().instances(), 1, "the worker never crashed");
    }
    t.finish().await;
}

async fn thousands_of_sequential_keyed_requests_leak_no_connection(mode: Mode) {
    const N: usize = 2000;
    // A small worker: a leak of one slot in a hundred requests would exhaust it.
    let t = E2e::setup(mode)
        .host(|h| h.worker_connections(16))
        .start()
        .await;
    t.api.reply("/pay", Reply::new(201).body("paid"));
    for i in 0..N {
        let r = t.send("/pay", &format!("\"seq-{i}\""), "{}").await;
        assert_eq!(r.status, 201, "request {i}: {}", r.text());
        // A tick every few requests: several records are due at each.
        if i % 7 == 6 {
            t.host().advance(t.tick).await;
        }
    }
    t.tick().await;
    assert_eq!(t.api.count("/pay"), N);
    assert_eq!(t.metric(metric::RECORDED), N as i64);
    if mode == Mode::Ngx {
        assert_eq!(t.host().leaked_connections(), 0, "no slot leaked");
        assert_eq!(t.host().connections_in_use(), 0);
    }
    t.finish().await;
}

/// A stand-in backend that answers every allocation with `reply`.
async fn answering(reply: Reply) -> Upstream {
    let stand_in = Upstream::start().await;
    stand_in.reply("PUT /api/v2/captures", reply);
    stand_in
}

async fn conflict_wait_against_an_empty_409_or_a_204_answers_the_client(mode: Mode) {
    for (reply, status, kind) in [
        (Reply::new(409), 409, problem::IN_FLIGHT),
        (
            Reply::new(409).header("retry-after", "3"),
            409,
            problem::IN_FLIGHT,
        ),
        (Reply::new(204), 503, problem::BACKEND_UNAVAILABLE),
    ] {
        let stand_in = answering(reply).await;
        let t = E2e::setup(mode)
            .config(json!({"conflict": "wait", "wait_ms": 500}))
            .target(Target::At(stand_in.addr()))
            .start()
            .await;
        t.api.reply("/pay", Reply::new(201).body("paid"));
        let r = tokio::time::timeout(
            Duration::from_secs(20),
            t.post("/pay", Some("\"k-empty\""), "{\"amount\":1}").send(),
        )
        .await
        .expect("no hang: the client gets an answer")
        .unwrap();
        assert_eq!(problem_of(&r), (kind.to_string(), status));
        assert_eq!(t.api.count("/pay"), 0, "not forwarded");
        // One allocation, already with wait_ms: nothing is sent again from its answer.
        let allocations = stand_in.requests();
        assert_eq!(allocations.len(), 1);
        let body: serde_json::Value = serde_json::from_slice(&allocations[0].body).unwrap();
        assert_eq!(body["wait_ms"], 500);
        t.finish().await;
    }
}

both_modes!(
    a_burst_of_keyed_requests_with_duplicates_executes_each_key_once,
    thousands_of_sequential_keyed_requests_leak_no_connection,
    conflict_wait_against_an_empty_409_or_a_204_answers_the_client,
);
