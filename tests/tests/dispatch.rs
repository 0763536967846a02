//! `dispatch_http_call`: where it is allowed, what the backend receives, how failures
//! are delivered, and calls that outlive their request.

mod support;

use std::time::Duration;

use idempotency_tests::{Mode, Reply, ViolationKind};
use support::Env;

/// Dispatches in `phase` and returns (client status, `x-fixture-call`).
async fn dispatch_in(env: &Env, phase: &str) -> (u16, Option<String>) {
    let host = env.host().await;
    let r = env.dispatching(&host, phase).send().await.unwrap();
    host.settle().await;
    host.finish().await;
    (r.status, r.header("x-fixture-call").map(str::to_string))
}

#[tokio::test]
async fn ngx_dispatch_works_in_request_phases_and_traps_in_response_phases() {
    let env = Env::new(Mode::Ngx).await;
    assert_eq!(
        dispatch_in(&env, "request_headers").await,
        (200, Some("200".into()))
    );
    let host = env.host().await;
    let r = env
        .dispatching(&host, "request_body")
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!((r.status, r.header("x-fixture-call")), (200, Some("200")));
    assert_eq!(
        env.up.requests().last().unwrap().header("x-fixture-call"),
        Some("200")
    );
    host.finish().await;
    let host = env.host().await;
    let r = env
        .dispatching(&host, "response_headers")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status, 500, "the trap answers 500");
    host.assert_logged("dispatch failed: bad step");
    host.finish().await;
    let host = env.host().await;
    let r = env.dispatching(&host, "response_body").send().await;
    assert!(
        r.is_err(),
        "the headers went out: the trap breaks the response"
    );
    host.settle().await;
    host.assert_logged("dispatch failed: bad step");
    host.finish().await;
    let host = env.host().await;
    let r = env.dispatching(&host, "log").send().await.unwrap();
    assert_eq!(r.status, 200, "on_log runs after the response");
    host.settle().await;
    host.assert_logged("dispatch failed: bad step");
    host.finish().await;
    assert_eq!(env.backend.count("/call"), 2);
}

#[tokio::test]
async fn envoy_dispatch_works_in_every_phase() {
    let env = Env::new(Mode::Envoy).await;
    for phase in ["request_headers", "response_headers"] {
        assert_eq!(
            dispatch_in(&env, phase).await,
            (200, Some("200".into())),
            "{phase}"
        );
    }
    let host = env.host().await;
    // In the body the headers are gone: the answer shows in the log.
    let r = env
        .dispatching(&host, "response_body")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    host.settle().await;
    host.assert_logged("result=200");
    let r = env
        .dispatching(&host, "request_body")
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(r.header("x-fixture-call"), Some("200"));
    let r = env.dispatching(&host, "log").send().await.unwrap();
    assert_eq!(r.status, 200);
    host.settle().await;
    host.assert_logged("dispatch in log: Ok(");
    host.finish().await;
}

#[tokio::test]
async fn a_call_from_a_tick_works_in_both_hosts() {
    for mode in [Mode::Ngx, Mode::Envoy] {
        let env = Env::new(mode).await;
        let config = format!("tick_ms=100;tick_dispatch={}", env.target());
        let host = env.builder().config(config).start().await.unwrap();
        host.advance(Duration::from_millis(100)).await;
        host.settle().await;
        host.assert_logged("root call response");
        assert_eq!(env.backend.count("/tick"), 1, "{mode}");
        host.finish().await;
    }
}

#[tokio::test]
async fn ngx_sends_a_new_connection_close_request_with_host_from_authority() {
    let env = Env::new(Mode::Ngx).await;
    let host = env.host().await;
    env.dispatching(&host, "request_headers")
        .send()
        .await
        .unwrap();
    let seen = env.backend.requests().pop().unwrap();
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("POST", "/call")
    );
    assert_eq!(seen.header("host"), Some("backend"));
    assert_eq!(seen.header("connection"), Some("close"));
    assert_eq!(seen.header("content-length"), Some("9"));
    assert_eq!(seen.header("x-from"), Some("fixture"));
    assert_eq!(seen.body, b"call body");
    host.finish().await;
}

#[tokio::test]
async fn ngx_failed_calls_carry_dispatch_status() {
    let env = Env::new(Mode::Ngx).await;
    env.backend.reply("/call", Reply::hang());
    let host = env.host().await;
    let dead = idempotency_tests::DeadPort::new();
    let closed = dead.addr.to_string();
    let cases = [
        (env.target(), "dispatch_status:timeout"),
        (closed, "dispatch_status:broken connection"),
        (
            "no-such-host.invalid:80".to_string(),
            "dispatch_status:resolver failure",
        ),
    ];
    for (to, expected) in cases {
        let r = host
            .client()
            .request("GET", "/")
            .header("x-fixture-dispatch-in", "request_headers")
            .header("x-fixture-dispatch-to", to.as_str())
            .header("x-fixture-dispatch-timeout-ms", "100")
            .send()
            .await
            .unwrap();
        assert_eq!(r.header("x-fixture-call"), Some(expected), "{to}");
    }
    host.assert_logged("headers=0 body=0");
    host.finish().await;
}

#[tokio::test]
async fn ngx_a_url_or_a_missing_method_traps() {
    let env = Env::new(Mode::Ngx).await;
    let host = env.host().await;
    let url = host
        .client()
        .request("GET", "/")
        .header("x-fixture-dispatch-in", "request_headers")
        .header(
            "x-fixture-dispatch-to",
            format!("http://{}", env.backend.addr()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(url.status, 500);
    let no_method = env
        .dispatching(&host, "request_headers")
        .header("x-fixture-dispatch-no-method", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(no_method.status, 500);
    host.assert_logged("dispatch failed: no :method");
    // No port means 80 (nothing listens there in the test: a broken connection).
    let no_port = host
        .client()
        .request("GET", "/")
        .header("x-fixture-dispatch-in", "request_headers")
        .header("x-fixture-dispatch-to", "127.0.0.1")
        .send()
        .await
        .unwrap();
    assert_eq!(no_port.status, 200);
    assert!(
        no_port
            .header("x-fixture-call")
            .unwrap()
            .starts_with("dispatch_status:")
    );
    host.finish().await;
}

#[tokio::test]
async fn envoy_failed_calls_and_bad_arguments() {
    let env = Env::new(Mode::Envoy).await;
    env.backend.reply("/call", Reply::hang());
    let dead = idempotency_tests::DeadPort::new();
    let closed = dead.addr;
    let host = env
        .builder()
        .cluster("closed", closed)
        .start()
        .await
        .unwrap();
    let call = |to: &str| {
        host.client()
            .request("GET", "/")
            .header("x-fixture-dispatch-in", "request_headers")
            .header("x-fixture-dispatch-to", to)
            .header("x-fixture-dispatch-timeout-ms", "100")
    };
    let r = call("backend").send().await.unwrap();
    assert_eq!(
        r.header("x-fixture-call"),
        Some("504"),
        "a time-out is the router's 504"
    );
    let r = call("closed").send().await.unwrap();
    assert_eq!(
        r.header("x-fixture-call"),
        Some("503"),
        "a refused connection is a 503"
    );
    let r = call("unknown").send().await.unwrap();
    assert_eq!(r.header("x-fixture-call"), Some("error:BadArgument"));
    let r = call("backend")
        .header("x-fixture-dispatch-no-method", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.header("x-fixture-call"), Some("error:BadArgument"));
    host.finish().await;
}

#[tokio::test]
async fn a_call_still_in_flight_when_its_request_ends() {
    for mode in [Mode::Ngx, Mode::Envoy] {
        let env = Env::new(mode).await;
        env.backend.reply(
            "/call",
            Reply::text("late").delay(Duration::from_millis(1000)),
        );
        let host = env.host().await;
        if mode == Mode::Ngx {
            host.expect_violation(ViolationKind::DispatchOutlivedRequest);
        }
        let r = env
            .dispatching(&host, "request_headers")
            .header("x-fixture-dispatch-continue", "1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        host.settle().await;
        let violations = host.violations();
        match mode {
            Mode::Ngx => {
                assert_eq!(violations.len(), 1, "a real nginx worker crashes");
                assert_eq!(violations[0].kind, ViolationKind::DispatchOutlivedRequest);
            }
            Mode::Envoy => assert!(violations.is_empty(), "envoy cancels the call"),
        }
        assert!(host.logs_containing("call response").is_empty());
        host.finish().await;
    }
}
