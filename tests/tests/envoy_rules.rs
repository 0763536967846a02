//! What a real Envoy does that a filter must not assume away, each shown with the fixture:
//! a Pause in the request headers holds the body back (unless
//! `allow_on_headers_stop_iteration`), the xDS attributes by version, `response.code_details`
//! (and ngx's `$upstream_status`), synchronous call failures, and a reconfiguration that
//! cancels the old root context's calls. (The failure policies are in `lifecycle.rs`.)

mod support;

use std::time::Duration;

use idempotency_tests::{Host, Mode, Reply};
use support::Env;

/// Where in the log a line containing `needle` first appears.
fn first(host: &Host, needle: &str) -> Option<usize> {
    host.logs().iter().position(|l| l.message.contains(needle))
}

#[tokio::test]
async fn envoy_a_pause_in_the_request_headers_holds_the_body_until_resumed() {
    for knob in [false, true] {
        let env = Env::new(Mode::Envoy).await;
        env.backend.reply("/call", Reply::text("ok"));
        let host = env
            .builder()
            .allow_on_headers_stop_iteration(knob)
            .start()
            .await
            .unwrap();
        // The request headers dispatch and pause until the answer resumes them.
        let r = env
            .dispatching(&host, "request_headers")
            .body("payload")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        let answer = first(&host, "call response").expect("the call answered");
        let body = first(&host, "on_request_body").expect("the body reached the filter");
        if knob {
            assert!(
                body < answer,
                "StopIteration: the body comes while the headers wait"
            );
        } else {
            assert!(
                answer < body,
                "StopAllIterationAndWatermark: no body callback before the resume"
            );
        }
        assert_eq!(env.up.count_body(b"payload"), 1, "the upstream got it all");
        host.finish().await;
    }
}

#[tokio::test]
async fn envoy_the_knob_is_refused_before_1_35() {
    let env = Env::new(Mode::Envoy).await;
    let refused = env
        .builder()
        .envoy_version(1, 34)
        .allow_on_headers_stop_iteration(true)
        .start()
        .await;
    assert!(refused.is_err(), "Envoy 1.34 does not know the field");
}

#[tokio::test]
async fn envoy_xds_attributes_by_version() {
    // `xds.node` since 1.29; `node` removed in 1.33.
    for (minor, node, xds_node) in [
        (29, true, true),
        (32, true, true),
        (33, false, true),
        (36, false, true),
    ] {
        let env = Env::new(Mode::Envoy).await;
        let host = env.builder().envoy_version(1, minor).start().await.unwrap();
        let r = host
            .client()
            .request("GET", "/")
            .header("x-fixture-property", "node")
            .header("x-fixture-property", "xds.node")
            .header("x-fixture-property", "route_name")
            .header("x-fixture-property", "xds.route_name")
            .send()
            .await
            .unwrap();
        let present = |name: &str| r.header(&format!("x-prop-{name}")) != Some("<none>");
        assert_eq!(present("node"), node, "1.{minor} node");
        assert_eq!(present("xds.node"), xds_node, "1.{minor} xds.node");
        assert_eq!(present("route_name"), node, "1.{minor} route_name");
        assert!(present("xds.route_name"), "1.{minor} xds.route_name");
        host.finish().await;
    }
}

#[tokio::test]
async fn envoy_response_code_details_name_who_answered() {
    let env = Env::new(Mode::Envoy).await;
    let host = env.host().await;
    let details = |r: &idempotency_tests::ClientResponse| {
        r.header("x-rprop-response.code_details")
            .unwrap_or_default()
            .to_string()
    };
    let upstream = host
        .client()
        .request("GET", "/")
        .header("x-fixture-response-property", "response.code_details")
        .send()
        .await
        .unwrap();
    assert_eq!(details(&upstream), "via_upstream");
    host.finish().await;
    // The upstream refuses the connection: Envoy's router answers 503 itself.
    let dead = idempotency_tests::DeadPort::new();
    let host = env.builder().upstream(dead.addr).start().await.unwrap();
    let refused = host
        .client()
        .request("GET", "/")
        .header("x-fixture-response-property", "response.code_details")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status, 503);
    assert!(
        details(&refused).starts_with("upstream_reset_before_response_started"),
        "{}",
        details(&refused)
    );
    host.finish().await;
    // A filter after this one answers (RBAC): its reply passes this filter's response
    // callbacks like the upstream's would.
    let host = env
        .builder()
        .local_reply_after(403, "rbac_access_denied_matched_policy[none]")
        .start()
        .await
        .unwrap();
    let denied = host
        .client()
        .request("GET", "/")
        .header("x-fixture-response-property", "response.code_details")
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status, 403);
    assert_eq!(details(&denied), "rbac_access_denied_matched_policy[none]");
    assert_eq!(
        env.up.total(),
        1,
        "only the first host reached the upstream"
    );
    host.finish().await;
}

#[tokio::test]
async fn ngx_upstream_status_is_empty_for_what_nginx_answered_itself() {
    let env = Env::new(Mode::Ngx).await;
    let host = env.host().await;
    let ask = |host: &Host| {
        host.client()
            .request("GET", "/")
            .header("x-fixture-response-property", "ngx.upstream_status")
    };
    let upstream = ask(&host).send().await.unwrap();
    assert_eq!(upstream.header("x-rprop-ngx.upstream_status"), Some("200"));
    let local = ask(&host)
        .header("x-fixture-local", "201")
        .send()
        .await
        .unwrap();
    assert_eq!(local.status, 201);
    assert_eq!(local.header("x-rprop-ngx.upstream_status"), Some("<none>"));
    host.finish().await;
}

#[tokio::test]
async fn envoy_a_call_to_a_cluster_without_healthy_host_fails_at_once_without_an_answer() {
    let env = Env::new(Mode::Envoy).await;
    let host = env
        .builder()
        .unhealthy_cluster("backend")
        .start()
        .await
        .unwrap();
    let r = env
        .dispatching(&host, "request_headers")
        .send()
        .await
        .unwrap();
    assert_eq!(r.header("x-fixture-call"), Some("error:InternalFailure"));
    host.settle().await;
    assert!(host.logs_containing("call response").is_empty());
    assert_eq!(env.backend.total(), 0);
    host.finish().await;
}

#[tokio::test]
async fn envoy_a_reconfiguration_cancels_the_old_root_contexts_calls() {
    let env = Env::new(Mode::Envoy).await;
    env.backend.reply("/tick", Reply::text("tock"));
    env.backend.hold("/tick");
    let config = format!("tick_ms=1000;tick_dispatch={}", env.target());
    let host = env.builder().config(config.clone()).start().await.unwrap();
    let counted = |host: &Host| {
        host.client()
            .request("GET", "/")
            .header("x-fixture-global", "1")
            .send()
    };
    counted(&host).await.unwrap();
    host.advance(Duration::from_secs(1)).await;
    let start = std::time::Instant::now();
    while env.backend.count("/tick") < 1 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the tick's call went out"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    host.reconfigure(config)
        .await
        .expect("the new configuration loads");
    env.backend.release("/tick");
    host.settle().await;
    assert!(
        host.logs_containing("root call response").is_empty(),
        "the old root context's call never answers"
    );
    assert_eq!(host.logs_containing("on_configure config=").len(), 2);
    let after = counted(&host).await.unwrap();
    assert_eq!(
        after.header("x-fixture-global"),
        Some("2"),
        "the same VM: module memory kept"
    );
    // A new root context (its own tick count starts again), whose calls are answered.
    host.advance(Duration::from_secs(1)).await;
    host.settle().await;
    assert_eq!(host.logs_containing("on_tick #1 ").len(), 2);
    assert_eq!(host.logs_containing("root call response").len(), 1);
    host.finish().await;
}
