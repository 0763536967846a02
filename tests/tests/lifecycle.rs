//! Loading, configuration, the root context's ticks and the clock, traps.

mod support;

use std::time::Duration;

use idempotency_tests::{FailurePolicy, Host, Level, Mode, ViolationKind, build};
use support::Env;

#[tokio::test]
async fn a_module_importing_an_unknown_function_fails_to_load_naming_it() {
    // (module (import "env" "proxy_teleport" (func)))
    let bytes: &[u8] = &[
        0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version
        0x01, 0x04, 0x01, 0x60, 0x00, 0x00, // type section: () -> ()
        0x02, 0x16, 0x01, 0x03, b'e', b'n', b'v', 0x0e, b'p', b'r', b'o', b'x', b'y', b'_', b't',
        b'e', b'l', b'e', b'p', b'o', b'r', b't', 0x00, 0x00,
    ];
    // Cargo's scratch directory for integration tests, inside the target directory: not /tmp,
    // where a file per run would pile up.
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bad-import.wasm");
    std::fs::write(&path, bytes).unwrap();
    for mode in [Mode::Ngx, Mode::Envoy] {
        let err = Host::builder(mode, &path)
            .start()
            .await
            .err()
            .expect("load fails");
        assert!(
            format!("{err:#}").contains("env::proxy_teleport"),
            "{mode}: {err:#}"
        );
    }
}

#[tokio::test]
async fn on_configure_gets_the_configuration_and_false_fails_the_load() {
    for mode in [Mode::Ngx, Mode::Envoy] {
        let host = Host::builder(mode, build::fixture())
            .config("a=1;b")
            .start()
            .await
            .unwrap();
        host.assert_logged("on_configure config=\"a=1;b\"");
        host.finish().await;
        let err = Host::builder(mode, build::fixture())
            .config("configure=false")
            .start()
            .await
            .err()
            .expect("on_configure false fails the load");
        assert!(
            format!("{err:#}").contains("on_configure returned false"),
            "{err:#}"
        );
    }
}

/// The `now_ms` each tick logged.
fn tick_times(host: &Host) -> Vec<u128> {
    host.logs()
        .iter()
        .filter_map(|l| l.message.split_once("now_ms=")?.1.parse().ok())
        .collect()
}

#[tokio::test]
async fn ticks_fire_on_the_test_clock_and_the_time_matches_it() {
    for mode in [Mode::Ngx, Mode::Envoy] {
        let host = Host::builder(mode, build::fixture())
            .config("tick_ms=100")
            .start()
            .await
            .unwrap();
        let start_ms = host.now_ns() / 1_000_000;
        assert_eq!(host.callbacks("tick"), 0, "no tick before the clock moves");
        host.advance(Duration::from_millis(350)).await;
        let times = tick_times(&host);
        assert_eq!(times.len(), 3, "{mode}: {}", host.dump_logs());
        for (i, t) in times.iter().enumerate() {
            assert_eq!(*t, (start_ms + 100 * (i as u64 + 1)) as u128, "{mode}");
        }
        assert_eq!(host.metric("fixture_ticks").unwrap().value, 3);
        host.advance(Duration::from_millis(50)).await;
        assert_eq!(host.callbacks("tick"), 4);
        host.finish().await;
    }
}

#[tokio::test]
async fn set_tick_period_once_per_root_context_in_ngx_only() {
    let err = Host::builder(Mode::Ngx, build::fixture())
        .config("tick_ms=100;tick_twice")
        .start()
        .await
        .err()
        .expect("ngx: a second set_tick_period traps");
    assert!(
        format!("{err:#}").contains("tick_period already set"),
        "{err:#}"
    );

    let host = Host::builder(Mode::Envoy, build::fixture())
        .config("tick_ms=100;tick_twice")
        .start()
        .await
        .expect("envoy: the period may change");
    host.advance(Duration::from_millis(450)).await;
    assert_eq!(host.callbacks("tick"), 2, "the second period (200 ms) wins");
    host.finish().await;
}

#[tokio::test]
async fn set_tick_period_from_an_http_context_is_ignored_in_ngx() {
    for mode in [Mode::Ngx, Mode::Envoy] {
        let env = Env::new(mode).await;
        let host = env.host().await;
        let r = host
            .client()
            .request("GET", "/")
            .header("x-fixture-set-tick", "100")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        host.advance(Duration::from_millis(250)).await;
        let expected = if mode == Mode::Ngx { 0 } else { 2 };
        assert_eq!(host.callbacks("tick"), expected, "{mode}");
        host.finish().await;
    }
}

#[tokio::test]
async fn ngx_a_trap_resets_the_instance_and_its_client_gets_500() {
    let env = Env::new(Mode::Ngx).await;
    let host = env.host().await;
    let global =
        |r: &idempotency_tests::ClientResponse| r.header("x-fixture-global").map(str::to_string);
    let c = host.client();
    let r1 = c
        .request("GET", "/")
        .header("x-fixture-global", "1")
        .send()
        .await
        .unwrap();
    let r2 = c
        .request("GET", "/")
        .header("x-fixture-global", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(
        (global(&r1), global(&r2)),
        (Some("1".into()), Some("2".into()))
    );
    let r3 = c
        .request("GET", "/")
        .header("x-fixture-panic-in", "request_headers")
        .send()
        .await
        .unwrap();
    assert_eq!(r3.status, 500);
    host.assert_logged("fixture panic in request_headers");
    let r4 = c
        .request("GET", "/")
        .header("x-fixture-global", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r4.status, 200);
    assert_eq!(global(&r4), Some("1".into()), "module globals were lost");
    assert_eq!(host.instances(), 2);
    assert_eq!(
        host.logs_containing("on_vm_start").len(),
        2,
        "vm start runs again"
    );
    assert_eq!(
        host.logs_containing("on_configure").len(),
        2,
        "configure runs again"
    );
    assert_eq!(
        env.up.count("/"),
        3,
        "the trapped request never reached the upstream"
    );
    host.finish().await;
}

#[tokio::test]
async fn ngx_a_trap_fails_the_other_in_flight_requests_of_the_instance() {
    let env = Env::new(Mode::Ngx).await;
    env.backend.reply("/call", idempotency_tests::Reply::hang());
    let host = env.host().await;
    let waiting = env
        .dispatching(&host, "request_headers")
        .header("x-fixture-dispatch-timeout-ms", "2000")
        .send();
    let waiting = tokio::spawn(waiting);
    // Let the first request reach its pause on the call.
    while host
        .logs_containing("dispatch in request_headers")
        .is_empty()
    {
        tokio::task::yield_now().await;
    }
    let trapping = host
        .client()
        .request("GET", "/")
        .header("x-fixture-panic-in", "request_headers")
        .send()
        .await
        .unwrap();
    assert_eq!(trapping.status, 500);
    let waiting = waiting.await.unwrap().unwrap();
    assert_eq!(
        waiting.status, 500,
        "its instance is gone: it fails at its next step"
    );
    assert!(host.logs_containing("call response").is_empty());
    assert_eq!(env.up.total(), 0);
    host.finish().await;
}

#[tokio::test]
async fn envoy_fail_closed_a_trap_fails_the_vm_every_stream_gets_503() {
    let env = Env::new(Mode::Envoy).await;
    let host = env
        .builder()
        .failure_policy(FailurePolicy::FailClosed)
        .start()
        .await
        .unwrap();
    let c = host.client();
    let r = c
        .request("GET", "/")
        .header("x-fixture-panic-in", "request_headers")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status, 503);
    let after = c.get("/").await.unwrap();
    assert_eq!(after.status, 503, "the VM stays failed");
    assert_eq!(host.instances(), 1, "no new instance");
    assert_eq!(env.up.total(), 0);
    assert!(!host.logs_at_least(Level::Critical).is_empty());
    host.finish().await;
}

#[tokio::test]
async fn envoy_fail_open_skips_a_failed_filter() {
    let env = Env::new(Mode::Envoy).await;
    let host = env.builder().fail_open(true).start().await.unwrap();
    let c = host.client();
    let r = c
        .request("GET", "/")
        .header("x-fixture-panic-in", "request_headers")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status, 503);
    let after = c
        .request("GET", "/x")
        .header("x-fixture-global", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(after.status, 200);
    assert_eq!(
        after.header("x-fixture-global"),
        None,
        "the filter did not run"
    );
    assert_eq!(env.up.count("/x"), 1);
    host.finish().await;
}

#[tokio::test]
async fn a_trap_in_a_tick_resets_ngx_and_fails_envoy() {
    for mode in [Mode::Ngx, Mode::Envoy] {
        let env = Env::new(mode).await;
        let host = env
            .builder()
            .config("tick_ms=10;tick_panic_at=2")
            .failure_policy(FailurePolicy::FailClosed)
            .start()
            .await
            .unwrap();
        host.advance(Duration::from_millis(100)).await;
        assert_eq!(
            host.callbacks("tick"),
            2,
            "{mode}: ticks stop with the instance"
        );
        host.assert_logged("fixture panic in tick");
        let r = host.client().get("/").await.unwrap();
        match mode {
            Mode::Ngx => {
                assert_eq!(r.status, 200, "a fresh instance serves the next request");
                assert_eq!(host.instances(), 2);
            }
            Mode::Envoy => assert_eq!(r.status, 503),
        }
        host.finish().await;
    }
}

#[tokio::test]
async fn envoy_fail_reload_the_default_from_1_33_reloads_the_vm_after_a_backoff() {
    let env = Env::new(Mode::Envoy).await;
    // Envoy 1.33+ defaults to FAIL_RELOAD; before, to FAIL_CLOSED.
    for (minor, reloads) in [(36, true), (33, true), (32, false)] {
        let host = env.builder().envoy_version(1, minor).start().await.unwrap();
        let c = host.client();
        let counted = c
            .request("GET", "/")
            .header("x-fixture-global", "1")
            .send()
            .await
            .unwrap();
        assert_eq!(counted.header("x-fixture-global"), Some("1"));
        let r = c
            .request("GET", "/")
            .header("x-fixture-panic-in", "request_headers")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status, 503, "1.{minor}: the stream that trapped");
        let during = c.get("/").await.unwrap();
        assert_eq!(during.status, 503, "1.{minor}: the VM is failed meanwhile");
        host.advance(Duration::from_secs(1)).await;
        let after = c
            .request("GET", "/")
            .header("x-fixture-global", "1")
            .send()
            .await
            .unwrap();
        if reloads {
            assert_eq!(after.status, 200, "1.{minor}: a new VM after the backoff");
            assert_eq!(
                after.header("x-fixture-global"),
                Some("1"),
                "its memory is new"
            );
            assert_eq!(host.instances(), 2);
            assert_eq!(host.logs_containing("on_configure config=").len(), 2);
        } else {
            assert_eq!(after.status, 503, "1.{minor}: FAIL_CLOSED, failed for good");
            assert_eq!(host.instances(), 1);
        }
        host.finish().await;
    }
}

#[tokio::test]
async fn a_violation_fails_the_test_unless_expected() {
    let env = Env::new(Mode::Ngx).await;
    let host = env.host().await;
    let r = host
        .client()
        .request("GET", "/")
        .header("x-fixture-set-body", "a longer body than the upstream's")
        .send()
        .await;
    assert!(
        r.is_err(),
        "the client cannot read a body shorter/longer than its length"
    );
    host.settle().await;
    assert_eq!(host.unexpected_violations().len(), 1);
    let finished = tokio::spawn(async move { host.finish().await }).await;
    assert!(
        finished.is_err(),
        "finish() panics on an unexpected violation"
    );
    let host = env.host().await;
    host.expect_violation(ViolationKind::BodyChangedAfterContentLength);
    let _ = host
        .client()
        .request("GET", "/")
        .header("x-fixture-set-body", "a longer body than the upstream's")
        .send()
        .await;
    host.finish().await;
}
