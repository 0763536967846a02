//! The backend down or too slow: `on_server_error: reject` answers 503, `pass` forwards
//! without idempotency (counted); a backend slower than `server.timeout_ms` does not make the
//! client wait longer (a stand-in that never answers plays the backend).

use std::time::Duration;

use idempotency_tests::{ClientResponse, DeadPort, Mode, Reply, Upstream};
use serde_json::json;

use crate::both_modes;
use crate::support::{E2e, Target, metric, problem, problem_of};

/// The client must get its answer: a hang fails the test here, not at the global bound.
async fn answered(
    r: impl std::future::Future<Output = anyhow::Result<ClientResponse>>,
) -> ClientResponse {
    tokio::time::timeout(Duration::from_secs(20), r)
        .await
        .expect("the client got an answer (the time-out held)")
        .unwrap()
}

async fn backend_down_rejects_with_503(mode: Mode) {
    let dead = DeadPort::new();
    let t = E2e::setup(mode).target(Target::At(dead.addr)).start().await;
    let r = answered(t.post("/pay", Some("\"k-down\""), "{}").send()).await;
    assert_eq!(r.status, 503);
    assert_eq!(
        problem_of(&r),
        (problem::BACKEND_UNAVAILABLE.to_string(), 503)
    );
    assert_eq!(t.api.count("/pay"), 0, "not forwarded");
    assert_eq!(t.metric(metric::SERVER_ERROR), 1);
    t.host().assert_logged("backend error, answering 503");
    t.finish().await;
}

async fn backend_down_with_pass_forwards_and_counts(mode: Mode) {
    let dead = DeadPort::new();
    let t = E2e::setup(mode)
        .config(json!({"on_server_error": "pass"}))
        .target(Target::At(dead.addr))
        .start()
        .await;
    t.api.reply("/pay", Reply::new(201).body("paid"));
    for _ in 0..2 {
        let r = answered(t.post("/pay", Some("\"k-pass\""), "{}").send()).await;
        assert_eq!((r.status, r.text().as_str()), (201, "paid"));
        assert_eq!(r.header("idempotent-replayed"), None);
    }
    assert_eq!(t.api.count("/pay"), 2, "forwarded without idempotency");
    assert_eq!(t.metric(metric::PASSED_ON_ERROR), 2);
    assert_eq!(t.metric(metric::SERVER_ERROR), 0);
    t.host().assert_logged("forwarding without idempotency");
    t.tick().await;
    assert_eq!(
        t.metric(metric::RECORDED) + t.metric(metric::RELEASED),
        0,
        "nothing to end"
    );
    t.finish().await;
}

async fn a_backend_slower_than_timeout_ms_gives_the_configured_outcome(mode: Mode) {
    // A stand-in that accepts the call and never answers.
    let stand_in = Upstream::start().await;
    stand_in.reply("/api/v2/captures", Reply::hang());
    for (on_error, expected) in [("reject", 503), ("pass", 201)] {
        let t = E2e::setup(mode)
            .config(json!({"server": {"timeout_ms": 300}, "on_server_error": on_error}))
            .target(Target::At(stand_in.addr()))
            .start()
            .await;
        t.api.reply("/pay", Reply::new(201).body("paid"));
        let r = answered(t.post("/pay", Some("\"k-slow\""), "{}").send()).await;
        assert_eq!(r.status, expected, "{on_error}");
        if on_error == "reject" {
            assert_eq!(problem_of(&r).0, problem::BACKEND_UNAVAILABLE);
            assert_eq!(t.api.count("/pay"), 0);
        } else {
            assert_eq!(t.api.count("/pay"), 1);
            assert_eq!(t.metric(metric::PASSED_ON_ERROR), 1);
        }
        t.finish().await;
    }
    assert_eq!(
        stand_in.count("/api/v2/captures"),
        2,
        "the calls did reach it"
    );
}

async fn the_backend_token_is_sent_and_a_wrong_one_is_a_backend_error(mode: Mode) {
    for (token, expected) in [("s3cret", 201), ("wrong", 503)] {
        let t = E2e::setup(mode)
            .config(json!({"server": {"token": token}}))
            .target(Target::BackendWithToken("s3cret"))
            .start()
            .await;
        t.api.reply("/pay", Reply::new(201).body("paid"));
        let r = t.send("/pay", "\"k-token\"", "{}").await;
        assert_eq!(r.status, expected, "token {token}");
        if expected == 201 {
            t.tick().await;
            let retry = t.send("/pay", "\"k-token\"", "{}").await;
            assert_eq!(retry.header("idempotent-replayed"), Some("true"));
            assert_eq!(t.metric(metric::RECORDED), 1);
        } else {
            // A 401 from the backend is a backend error.
            assert_eq!(problem_of(&r).0, problem::BACKEND_UNAVAILABLE);
            assert_eq!(t.api.count("/pay"), 0);
        }
        t.finish().await;
    }
}

both_modes!(
    the_backend_token_is_sent_and_a_wrong_one_is_a_backend_error,
    backend_down_rejects_with_503,
    backend_down_with_pass_forwards_and_counts,
    a_backend_slower_than_timeout_ms_gives_the_configured_outcome,
);
