//! Envoy and Istio as they are (issue 9): a Pause in the request headers holds the body back
//! unless `allow_on_headers_stop_iteration` (Envoy 1.35+), so `envoy.request_body` decides how
//! a body is fingerprinted; the host is detected on Envoy 1.29 to current; Envoy's own answers
//! are never stored; Istio's cluster names make no authority; a reconfiguration cancels the
//! queue's calls; calls can fail synchronously; gRPC passes untouched. Envoy mode only, except
//! where Kong's equivalent is shown.

use std::time::Duration;

use idempotency_tests::{Mode, Reply, Upstream};
use serde_json::json;

use crate::support::{E2e, Target, metric, problem, problem_of};

#[tokio::test]
async fn by_default_a_keyed_body_is_allocated_from_the_headers_and_never_hangs() {
    // No allow_on_headers_stop_iteration: what Envoy before 1.35 and Istio give.
    let t = E2e::start(Mode::Envoy, json!({})).await;
    t.api.reply("/orders", Reply::new(201).body("created"));
    let first = tokio::time::timeout(
        Duration::from_secs(20),
        t.post("/orders", Some("\"k-skip\""), "{\"qty\":1}").send(),
    )
    .await
    .expect("no hang: the allocation is made from the headers")
    .unwrap();
    assert_eq!((first.status, first.text().as_str()), (201, "created"));
    assert_eq!(
        t.api.count_body(b"{\"qty\":1}"),
        1,
        "the upstream got the body"
    );
    let retry = t.send("/orders", "\"k-skip\"", "{\"qty\":1}").await;
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    // The declared length is in the fingerprint: a body of another length is refused…
    let longer = t.send("/orders", "\"k-skip\"", "{\"qty\":10}").await;
    assert_eq!(problem_of(&longer), (problem::MISMATCH.to_string(), 422));
    // …one of the same length is not (the bytes are not hashed): the documented risk.
    let same_length = t.send("/orders", "\"k-skip\"", "{\"qty\":2}").await;
    assert_eq!(same_length.header("idempotent-replayed"), Some("true"));
    assert_eq!(t.api.count("/orders"), 1, "executed once");
    t.finish().await;
}

#[tokio::test]
async fn await_needs_the_1_35_knob_and_then_fingerprints_the_body() {
    // Without the knob: the body waits for the headers, which wait for the body.
    let t = E2e::start(Mode::Envoy, json!({"envoy": {"request_body": "await"}})).await;
    let hung = tokio::time::timeout(
        Duration::from_secs(2),
        t.post("/orders", Some("\"k-await\""), "{\"qty\":1}").send(),
    )
    .await;
    assert!(
        hung.is_err(),
        "await without the knob hangs, as the README warns"
    );
    assert_eq!(t.api.count("/orders"), 0, "and nothing was executed");
    drop(t);
    let t = E2e::setup(Mode::Envoy).body_fingerprinted().start().await;
    t.api.reply("/orders", Reply::new(201).body("created"));
    let first = t.send("/orders", "\"k-await\"", "{\"qty\":1}").await;
    assert_eq!(first.status, 201);
    let same_length = t.send("/orders", "\"k-await\"", "{\"qty\":2}").await;
    assert_eq!(
        problem_of(&same_length),
        (problem::MISMATCH.to_string(), 422)
    );
    assert_eq!(t.api.count("/orders"), 1);
    t.finish().await;
}

#[tokio::test]
async fn stream_lets_the_headers_reach_the_upstream_before_the_allocation() {
    let t = E2e::start(Mode::Envoy, json!({"envoy": {"request_body": "stream"}})).await;
    t.api.reply("/orders", Reply::new(201).body("created"));
    let first = t.send("/orders", "\"k-stream\"", "{\"qty\":1}").await;
    assert_eq!(first.status, 201);
    // The body is fingerprinted: the same length with other bytes is a mismatch…
    let other = t.send("/orders", "\"k-stream\"", "{\"qty\":2}").await;
    assert_eq!(problem_of(&other), (problem::MISMATCH.to_string(), 422));
    let retry = t.send("/orders", "\"k-stream\"", "{\"qty\":1}").await;
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    // …but each of them reached the upstream's headers first: an upstream that acts before
    // it reads the body would have executed three times (the documented risk).
    assert_eq!(
        t.api.count("/orders"),
        1,
        "executed once by a body-reading upstream"
    );
    assert_eq!(
        t.api.heads("/orders"),
        3,
        "the upstream saw three requests start"
    );
    t.finish().await;
}

#[tokio::test]
async fn the_host_is_detected_on_every_envoy_version_and_records_inline() {
    for minor in [29, 32, 33, 36] {
        let t = E2e::setup(Mode::Envoy)
            .host(move |h| h.envoy_version(1, minor))
            .start()
            .await;
        t.api.reply("/orders", Reply::new(201).body("created"));
        let first = t.send("/orders", "\"k-detect\"", "{}").await;
        assert_eq!(first.status, 201);
        // Detected as Envoy: recorded inline, before the response ended; a retry at once, with
        // no tick, replays.
        assert_eq!(t.metric(metric::RECORDED), 1, "1.{minor}");
        let retry = t.send("/orders", "\"k-detect\"", "{}").await;
        assert_eq!(
            retry.header("idempotent-replayed"),
            Some("true"),
            "1.{minor}"
        );
        t.host().assert_logged("host detected: envoy");
        t.finish().await;
    }
}

#[tokio::test]
async fn envoys_own_answers_are_released_never_stored() {
    // A filter after this one (RBAC) answers 403; `store_status` would keep a 403.
    let t = E2e::setup(Mode::Envoy)
        .config(json!({"store_status": ["100-599"]}))
        .host(|h| h.local_reply_after(403, "rbac_access_denied_matched_policy[none]"))
        .start()
        .await;
    let denied = t.send("/orders", "\"k-rbac\"", "{}").await;
    assert_eq!(denied.status, 403);
    assert_eq!(t.metric(metric::RELEASED), 1);
    assert_eq!(t.metric(metric::RECORDED), 0);
    t.host()
        .assert_logged("releasing: the gateway answered, not the upstream");
    // The retry is a new request (nothing replayed), and so on until the upstream answers.
    let again = t.send("/orders", "\"k-rbac\"", "{}").await;
    assert_eq!(again.status, 403);
    assert_eq!(again.header("idempotent-replayed"), None);
    t.finish().await;
    // The upstream refuses the connection: Envoy's router answers 503 itself.
    let dead = idempotency_tests::DeadPort::new();
    let addr = dead.addr;
    let t = E2e::setup(Mode::Envoy)
        .config(json!({"store_status": ["100-599"]}))
        .host(move |h| h.upstream(addr))
        .start()
        .await;
    let r = t.send("/orders", "\"k-refused\"", "{}").await;
    assert_eq!(r.status, 503);
    assert_eq!(t.metric(metric::RELEASED), 1);
    assert_eq!(t.metric(metric::RECORDED), 0);
    t.finish().await;
}

#[tokio::test]
async fn on_istio_the_calls_carry_the_service_as_authority() {
    let stand_in = Upstream::start().await;
    stand_in.reply(
        "PUT /api/v2/captures",
        Reply::new(202)
            .header("content-type", "application/json")
            .body("{\"lease_token\":\"t\",\"lease_expires_at\":\"2100-01-01T00:00:00Z\"}"),
    );
    let t = E2e::setup(Mode::Envoy)
        .cluster("outbound|8080||idempotency.payments.svc.cluster.local")
        .target(Target::At(stand_in.addr()))
        .start()
        .await;
    let r = t.send("/orders", "\"k-istio\"", "{}").await;
    assert_eq!(r.status, 200, "allocated through the Istio cluster");
    let call = stand_in
        .requests()
        .into_iter()
        .next()
        .expect("the allocation");
    assert_eq!(
        call.header("host"),
        Some("idempotency.payments.svc.cluster.local"),
        "the service, not the cluster name (Envoy refuses | in an authority)"
    );
    t.finish().await;
}

#[tokio::test]
async fn a_reconfiguration_cancels_the_queues_batch_and_its_deadline_frees_it() {
    // A stand-in backend: allocations granted, the first batch held (never answered before
    // the reconfiguration cancels it), later batches answered.
    let stand_in = Upstream::start().await;
    stand_in.reply(
        "PUT /api/v2/captures",
        Reply::new(202)
            .header("content-type", "application/json")
            .body("{\"lease_token\":\"t\",\"lease_expires_at\":\"2100-01-01T00:00:00Z\"}"),
    );
    stand_in.reply(
        "POST /api/v2/captures/batch",
        Reply::new(200)
            .header("content-type", "application/json")
            .body("{\"results\":[{\"status\":200,\"body\":{}}]}"),
    );
    stand_in.hold("POST /api/v2/captures/batch");
    let config = json!({"record": "deferred", "server": {"timeout_ms": 1000}});
    let t = E2e::setup(Mode::Envoy)
        .config(config.clone())
        .target(Target::At(stand_in.addr()))
        .start()
        .await;
    t.api.reply("/orders", Reply::new(201).body("created"));
    assert_eq!(t.send("/orders", "\"k-reconf\"", "{}").await.status, 201);
    t.host().advance(t.tick).await;
    let batches = || {
        stand_in
            .requests()
            .iter()
            .filter(|s| s.path == "/api/v2/captures/batch")
            .count()
    };
    let start = std::time::Instant::now();
    while stand_in.heads("/api/v2/captures/batch") < 1 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the batch went out"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // The same configuration pushed again (an xDS update): a new root context; the old one's
    // batch is cancelled and its answer never comes.
    let mut same = config.clone();
    same["server"]["upstream"] = json!("idempotency");
    t.host()
        .reconfigure(same.to_string())
        .await
        .expect("the configuration loads");
    stand_in.release("POST /api/v2/captures/batch");
    t.host().settle().await;
    assert_eq!(
        t.metric(metric::RECORDED),
        0,
        "the cancelled batch never settled"
    );
    // Past its deadline (3 time-outs and a second), the entry is sent again.
    t.host().advance(Duration::from_millis(4_000)).await;
    t.host().advance(Duration::from_millis(500)).await;
    t.host().settle().await;
    assert_eq!(t.metric(metric::RECORDED), 1);
    assert_eq!(t.metric(metric::RECORD_FAILED), 0);
    assert_eq!(batches(), 2);
    t.finish().await;
}

#[tokio::test]
async fn a_backend_cluster_without_healthy_host_is_a_backend_error_at_once() {
    for (on_error, status) in [("reject", 503), ("pass", 201)] {
        let t = E2e::setup(Mode::Envoy)
            .config(json!({"on_server_error": on_error}))
            .host(|h| h.unhealthy_cluster("idempotency"))
            .start()
            .await;
        t.api.reply("/orders", Reply::new(201).body("created"));
        let r = tokio::time::timeout(
            Duration::from_secs(20),
            t.post("/orders", Some("\"k-unhealthy\""), "{}").send(),
        )
        .await
        .expect("answered at once")
        .unwrap();
        assert_eq!(r.status, status, "{on_error}");
        if on_error == "reject" {
            assert_eq!(problem_of(&r).0, problem::BACKEND_UNAVAILABLE);
            assert_eq!(t.api.count("/orders"), 0);
        }
        t.finish().await;
    }
}

#[tokio::test]
async fn grpc_requests_pass_untouched_and_are_counted() {
    for mode in [Mode::Ngx, Mode::Envoy] {
        let t = E2e::start(mode, json!({"require_key": true})).await;
        t.api.reply(
            "/pkg.Service/Call",
            Reply::new(200)
                .header("content-type", "application/grpc")
                .body(vec![0, 0, 0, 0, 0]),
        );
        for _ in 0..2 {
            let r = t
                .post("/pkg.Service/Call", Some("\"k-grpc\""), vec![0, 0, 0, 0, 0])
                .header("content-type", "application/grpc+proto")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{mode}");
            assert_eq!(r.header("idempotent-replayed"), None);
        }
        assert_eq!(
            t.api.count("/pkg.Service/Call"),
            2,
            "{mode}: not idempotent, untouched"
        );
        assert_eq!(t.metric(metric::GRPC_PASSED), 2);
        assert_eq!(t.metric(metric::ALLOCATED), 0);
        t.finish().await;
    }
}
