//! The three bugs of ngx_wasm_module a filter must steer around (HOSTS.md, "Three bugs of
//! ngx_wasm_module"), each shown firing with the fixture filter in ngx mode, and the same
//! actions harmless in envoy mode:
//! 1. a root dispatch inside the root's own `on_http_call_response` after a complete answer
//!    crashes the worker;
//! 2. an HTTP-context dispatch with a body from `on_http_call_response` after an empty-bodied
//!    answer hangs the worker;
//! 3. overlapping root calls, and root dispatches that fail synchronously, leak the worker's
//!    connection slots until it refuses everything.

mod support;

use std::time::Duration;

use idempotency_tests::{Host, Mode, Reply, ViolationKind};
use support::Env;

/// Polls `check` until it holds (the host cannot settle while a request is held upstream).
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !check() {
        assert!(start.elapsed() < Duration::from_secs(20), "never: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn violations_of(host: &Host, kind: ViolationKind) -> usize {
    host.violations().iter().filter(|v| v.kind == kind).count()
}

/// A host whose root context dispatches one call per tick (1 s) to the backend, and again
/// from each answer's `on_http_call_response`.
async fn redispatching_root(env: &Env, target: &str) -> Host {
    env.builder()
        .config(format!(
            "tick_ms=1000;tick_dispatch={target};redispatch_in_call_response"
        ))
        .start()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_root_dispatch_from_its_own_call_response_crashes_the_ngx_worker() {
    let env = Env::new(Mode::Ngx).await;
    env.backend.reply("/tick", Reply::text("tock"));
    let host = redispatching_root(&env, &env.target()).await;
    host.expect_violation(ViolationKind::RootDispatchFromCallResponse);
    // A request in flight on the worker when it dies: held in the upstream.
    env.up.hold("/r");
    let client = host.client();
    let in_flight = tokio::spawn(async move { client.get("/r").await });
    eventually("the request reached the upstream", || {
        env.up.count("/r") == 1
    })
    .await;
    host.advance(Duration::from_secs(1)).await;
    eventually("the worker crashed", || {
        violations_of(&host, ViolationKind::RootDispatchFromCallResponse) == 1
    })
    .await;
    // Its client sees a dead worker's connection: closed, no response.
    let lost = in_flight.await.unwrap();
    assert!(lost.is_err(), "no response from a dead worker: {lost:?}");
    env.up.release("/r");
    // The master started a new worker: a fresh instance, configured, serving.
    assert_eq!(host.instances(), 2);
    assert_eq!(host.logs_containing("on_configure config=").len(), 2);
    let after = host.client().get("/r").await.unwrap();
    assert_eq!(after.status, 200);
    host.settle().await;
    host.finish().await;
}

#[tokio::test]
async fn a_root_dispatch_after_a_failed_call_does_not_crash_ngx_nor_anything_on_envoy() {
    // ngx: a failed call (refused) reaches the callback before its socket is closed.
    let env = Env::new(Mode::Ngx).await;
    let dead = idempotency_tests::DeadPort::new();
    let host = redispatching_root(&env, &dead.addr.to_string()).await;
    host.advance(Duration::from_secs(1)).await;
    host.settle().await;
    assert_eq!(
        host.logs_containing("root dispatch from call response: Ok")
            .len(),
        1
    );
    assert_eq!(host.instances(), 1);
    host.finish().await;
    // Envoy: a dispatch from any callback is fine.
    let env = Env::new(Mode::Envoy).await;
    env.backend.reply("/tick", Reply::text("tock"));
    let host = redispatching_root(&env, &env.target()).await;
    host.advance(Duration::from_secs(1)).await;
    host.settle().await;
    assert_eq!(
        env.backend.count("/tick"),
        2,
        "the tick's call and the one from its answer"
    );
    assert_eq!(host.instances(), 1);
    host.finish().await;
}

/// A request whose call's answer dispatches a second call with a body.
fn redispatching_request(env: &Env, host: &Host) -> idempotency_tests::ClientRequest {
    env.dispatching(host, "request_headers,call_response")
}

#[tokio::test]
async fn an_http_dispatch_after_an_empty_answer_hangs_the_ngx_worker() {
    let env = Env::new(Mode::Ngx).await;
    env.backend.reply("/call", Reply::new(204));
    let host = env.host().await;
    host.expect_violation(ViolationKind::DispatchAfterEmptyAnswer);
    let hung = tokio::time::timeout(
        Duration::from_secs(2),
        redispatching_request(&env, &host).send(),
    )
    .await;
    assert!(hung.is_err(), "the request hangs: {hung:?}");
    assert_eq!(
        violations_of(&host, ViolationKind::DispatchAfterEmptyAnswer),
        1
    );
    host.assert_logged("send() returned zero");
    // And so does every request on that worker from then on.
    let next = tokio::time::timeout(Duration::from_secs(1), host.client().get("/other")).await;
    assert!(next.is_err(), "a hung worker serves nothing: {next:?}");
    assert_eq!(env.up.count("/other"), 0);
    host.settle().await;
    host.finish().await;
}

#[tokio::test]
async fn a_dispatch_from_a_call_response_after_a_body_is_fine_on_ngx_and_anything_on_envoy() {
    // ngx: the answer had a body: the second call goes out and answers.
    let env = Env::new(Mode::Ngx).await;
    env.backend.reply("/call", Reply::text("ok"));
    let host = env.host().await;
    let r = redispatching_request(&env, &host).send().await.unwrap();
    assert_eq!((r.status, r.header("x-fixture-call")), (200, Some("200")));
    assert_eq!(env.backend.count("/call"), 2);
    host.finish().await;
    // Envoy: even after an empty answer.
    let env = Env::new(Mode::Envoy).await;
    env.backend.reply("/call", Reply::new(204));
    let host = env.host().await;
    let r = redispatching_request(&env, &host).send().await.unwrap();
    assert_eq!((r.status, r.header("x-fixture-call")), (200, Some("204")));
    assert_eq!(env.backend.count("/call"), 2);
    host.finish().await;
}

#[tokio::test]
async fn overlapping_root_calls_leak_ngx_connections_until_the_worker_refuses_everything() {
    let env = Env::new(Mode::Ngx).await;
    env.backend.reply("/tick", Reply::text("tock"));
    // Two calls per tick: the first to complete finds the other pending and leaks its fake
    // connection. Each call in flight holds two slots (its fake connection, its socket).
    let host = env
        .builder()
        .worker_connections(4)
        .config(format!(
            "tick_ms=1000;tick_dispatch={};tick_calls=2",
            env.target()
        ))
        .start()
        .await
        .unwrap();
    host.expect_violation(ViolationKind::ConnectionLeaked);
    let mut leaked = Vec::new();
    for _ in 0..5 {
        host.advance(Duration::from_secs(1)).await;
        host.settle().await;
        leaked.push(host.leaked_connections());
    }
    // Tick 1: both calls answered, one slot lost. Then too few slots for two sockets: the
    // calls fail at once (a broken connection), still overlapping, still leaking; from
    // the fourth tick only one call can be made, and nothing more is lost: 3 of 4 gone.
    assert_eq!(leaked, [1, 2, 3, 3, 3]);
    assert_eq!(violations_of(&host, ViolationKind::ConnectionLeaked), 3);
    assert_eq!(
        host.connections_in_use(),
        0,
        "every live connection was given back"
    );
    host.assert_logged("dispatch_status=Some(\"broken connection\")");
    assert_eq!(
        env.backend.count("/tick"),
        3,
        "the first tick's two calls and one of the second's got out"
    );
    // The worker now fails every request, with or without a filter: the client's
    // connection takes the last slot and nginx cannot reach the upstream (500).
    let r = host.client().get("/r").await.unwrap();
    assert_eq!(r.status, 500);
    assert_eq!(env.up.count("/r"), 0);
    host.assert_logged("4 worker_connections are not enough");
    host.finish().await;
}

#[tokio::test]
async fn a_root_dispatch_that_fails_synchronously_leaks_an_ngx_connection() {
    let env = Env::new(Mode::Ngx).await;
    let host = env
        .builder()
        .config(format!(
            "tick_ms=1000;tick_dispatch={};tick_no_method",
            env.target()
        ))
        .start()
        .await
        .unwrap();
    host.expect_violation(ViolationKind::ConnectionLeaked);
    host.advance(Duration::from_secs(2)).await;
    host.settle().await;
    // An error status, not a trap: the instance lives on.
    assert_eq!(
        host.logs_containing("tick dispatch: Err(InternalFailure)")
            .len(),
        2
    );
    assert_eq!(host.instances(), 1);
    assert_eq!(host.leaked_connections(), 2);
    assert_eq!(violations_of(&host, ViolationKind::ConnectionLeaked), 2);
    host.finish().await;
}

#[tokio::test]
async fn with_no_ngx_connection_left_the_upstream_gets_none_and_calls_fail() {
    let env = Env::new(Mode::Ngx).await;
    env.backend.reply("/call", Reply::text("ok"));
    // One slot: the client's connection takes it.
    let host = env.builder().worker_connections(1).start().await.unwrap();
    let r = env
        .dispatching(&host, "request_headers")
        .send()
        .await
        .unwrap();
    host.settle().await;
    assert_eq!(r.status, 500, "nginx cannot connect to the upstream");
    host.assert_logged("result=dispatch_status:broken connection");
    assert_eq!(env.backend.count("/call"), 0);
    assert_eq!(env.up.count("/r"), 0);
    host.assert_logged("1 worker_connections are not enough");
    host.finish().await;
}

#[tokio::test]
async fn envoy_has_no_connection_budget_to_leak() {
    let env = Env::new(Mode::Envoy).await;
    env.backend.reply("/tick", Reply::text("tock"));
    let host = env
        .builder()
        .worker_connections(2)
        .config(format!(
            "tick_ms=1000;tick_dispatch={};tick_calls=3",
            env.target()
        ))
        .start()
        .await
        .unwrap();
    host.advance(Duration::from_secs(5)).await;
    host.settle().await;
    assert_eq!(env.backend.count("/tick"), 15);
    assert_eq!(host.leaked_connections(), 0);
    assert_eq!(host.client().get("/r").await.unwrap().status, 200);
    host.finish().await;
}
