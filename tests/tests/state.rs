//! Shared data, metrics, properties, logs, fuel, and many requests in one instance.

mod support;

use std::time::Duration;

use idempotency_tests::{Level, MetricKind, Mode, Reply, Source};
use support::Env;

#[tokio::test]
async fn shared_data_cas_zero_follows_each_hosts_rule() {
    for mode in [Mode::Ngx, Mode::Envoy] {
        let env = Env::new(mode).await;
        let host = env.host().await;
        let set = |spec: &str| {
            host.client()
                .request("GET", "/")
                .header("x-fixture-shared-set", spec)
                .header("x-fixture-shared-get", "k")
        };
        let r = set("k=a").send().await.unwrap();
        assert_eq!(r.header("x-fixture-shared-set"), Some("ok"));
        let first_cas = host.shared_data("k").unwrap().1;
        assert_eq!(
            r.header("x-fixture-shared-get"),
            Some(format!("a;cas={first_cas}").as_str())
        );
        let r = set("k=b").send().await.unwrap();
        match mode {
            Mode::Ngx => {
                assert_eq!(r.header("x-fixture-shared-set"), Some("cas_mismatch"));
                assert_eq!(host.shared_data("k").unwrap().0, b"a");
            }
            Mode::Envoy => {
                assert_eq!(r.header("x-fixture-shared-set"), Some("ok"));
                assert_eq!(host.shared_data("k").unwrap().0, b"b");
            }
        }
        let cas = host.shared_data("k").unwrap().1;
        let r = set(&format!("k=c;cas={cas}")).send().await.unwrap();
        assert_eq!(
            r.header("x-fixture-shared-set"),
            Some("ok"),
            "{mode}: the right CAS wins"
        );
        let r = set(&format!("k=d;cas={cas}")).send().await.unwrap();
        assert_eq!(
            r.header("x-fixture-shared-set"),
            Some("cas_mismatch"),
            "a stale CAS loses"
        );
        assert_eq!(host.shared_data("k").unwrap().0, b"c");
        host.finish().await;
    }
}

#[tokio::test]
async fn metrics_are_defined_incremented_recorded_and_readable() {
    for mode in [Mode::Ngx, Mode::Envoy] {
        let env = Env::new(mode).await;
        let host = env.host().await;
        for i in 1..=2 {
            let r = host
                .client()
                .request("GET", "/")
                .header("x-fixture-metric", "hits")
                .header("x-fixture-gauge", "level=7")
                .header("x-fixture-histogram", format!("sizes={}", i * 10))
                .send()
                .await
                .unwrap();
            assert_eq!(
                r.header("x-fixture-metric-value"),
                Some(i.to_string().as_str())
            );
        }
        let hits = host.metric("hits").unwrap();
        assert_eq!((hits.kind, hits.value), (MetricKind::Counter, 2));
        assert_eq!(host.metric("level").unwrap().value, 7);
        assert_eq!(host.metric("sizes").unwrap().samples, vec![10, 20]);
        host.finish().await;
    }
}

#[tokio::test]
async fn properties_as_each_host_names_and_encodes_them() {
    let names = [
        "request.path",
        "request.method",
        "request.scheme",
        "request.host",
        "source.address",
        "plugin_name",
        "ngx.request_uri",
        "kong.route_id",
        "kong.router.route",
        "xds.route_name",
        "route_name",
        "request.size",
        "node",
        "xds.node",
    ];
    for mode in [Mode::Ngx, Mode::Envoy] {
        let env = Env::new(mode).await;
        let host = env
            .builder()
            .filter_name("idem")
            .route_name("orders")
            .start()
            .await
            .unwrap();
        let mut req = host.client().request("POST", "/p?q=1").body("12345");
        for n in names {
            req = req.header("x-fixture-property", n);
        }
        let r = req.send().await.unwrap();
        let prop = |n: &str| {
            r.header(&format!("x-prop-{n}"))
                .unwrap_or("<missing>")
                .to_string()
        };
        assert_eq!(prop("request.path"), "/p?q=1", "{mode}");
        assert_eq!(prop("request.method"), "POST");
        assert_eq!(prop("request.scheme"), "http");
        assert_eq!(prop("plugin_name"), "idem");
        match mode {
            Mode::Ngx => {
                assert_eq!(
                    prop("request.host"),
                    "test-host",
                    "$hostname, not the Host header"
                );
                assert_eq!(prop("source.address"), "127.0.0.1");
                assert_eq!(prop("ngx.request_uri"), "/p?q=1");
                assert!(prop("kong.route_id").len() == 36);
                assert!(prop("kong.router.route").contains("\"name\":\"orders\""));
                assert_eq!(prop("xds.route_name"), "<none>");
                assert_eq!(prop("route_name"), "<none>", "not supported in ngx");
                assert_eq!(prop("request.size"), "5", "$content_length as text");
                assert_eq!(prop("node"), "<none>");
                host.assert_logged("\"node\" property not supported");
            }
            Mode::Envoy => {
                assert_eq!(prop("request.host"), host.addr().to_string(), ":authority");
                assert!(prop("source.address").starts_with("127.0.0.1:"), "ip:port");
                assert_eq!(prop("ngx.request_uri"), "<none>");
                assert_eq!(prop("kong.route_id"), "<none>");
                assert_eq!(prop("xds.route_name"), "orders");
                // Envoy 1.33 removed the old top-level names (envoy_rules.rs: by version).
                assert_eq!(prop("route_name"), "<none>");
                assert_eq!(prop("request.size"), "int:5", "int64, little-endian");
                assert_eq!(prop("node"), "<none>");
                assert_ne!(prop("xds.node"), "<none>");
            }
        }
        host.finish().await;
    }
}

#[tokio::test]
async fn a_filter_can_tell_the_hosts_apart_from_its_root_context() {
    for (mode, expected) in [(Mode::Ngx, true), (Mode::Envoy, false)] {
        let host = idempotency_tests::Host::builder(mode, idempotency_tests::build::fixture())
            .config("root_property=xds.node")
            .start()
            .await
            .unwrap();
        let none = !host
            .logs_containing("root property xds.node = <none>")
            .is_empty();
        assert_eq!(none, expected, "{mode}: {}", host.dump_logs());
        host.finish().await;
    }
}

#[tokio::test]
async fn logs_are_captured_with_level_and_source() {
    let env = Env::new(Mode::Ngx).await;
    let host = env.host().await;
    host.client()
        .request("GET", "/")
        .header("x-fixture-panic-in", "request_headers")
        .send()
        .await
        .unwrap();
    let logs = host.logs();
    let info = logs
        .iter()
        .find(|l| l.message.contains("on_request_headers"))
        .unwrap();
    assert_eq!((info.level, info.source), (Level::Info, Source::Filter));
    assert!(info.context_id > 1);
    let panic = logs
        .iter()
        .find(|l| {
            l.message.contains("fixture panic in request_headers") && l.source == Source::Filter
        })
        .expect("the SDK's panic hook logs through proxy_log");
    assert_eq!(panic.level, Level::Critical);
    assert!(
        logs.iter()
            .any(|l| l.source == Source::Host && l.level == Level::Error)
    );
    host.finish().await;
}

#[tokio::test]
async fn fuel_is_counted_per_request_and_for_the_root() {
    for mode in [Mode::Ngx, Mode::Envoy] {
        let env = Env::new(mode).await;
        let host = env.builder().config("tick_ms=10").start().await.unwrap();
        let root_after_start = host.fuel().root;
        assert!(root_after_start > 0, "vm start and configure burn fuel");
        host.client().get("/a").await.unwrap();
        host.client().post("/b", vec![b'x'; 1000]).await.unwrap();
        host.advance(Duration::from_millis(10)).await;
        host.settle().await;
        let fuel = host.fuel();
        assert_eq!(fuel.requests.len(), 2);
        assert_eq!(fuel.requests[0].path, "/a");
        assert!(fuel.requests.iter().all(|r| r.fuel > 0));
        let phases: Vec<&str> = fuel.requests[1]
            .by_phase
            .iter()
            .map(|(p, _)| p.name())
            .collect();
        assert!(
            phases.contains(&"request_body") && phases.contains(&"log"),
            "{phases:?}"
        );
        assert!(fuel.root > root_after_start, "the tick adds to the root");
        host.finish().await;
    }
}

#[tokio::test]
async fn many_requests_interleave_in_one_instance() {
    for mode in [Mode::Ngx, Mode::Envoy] {
        let env = Env::new(mode).await;
        env.backend
            .reply("/call", Reply::text("ok").delay(Duration::from_millis(50)));
        let host = env.host().await;
        let n = 20;
        let mut tasks = Vec::new();
        for _ in 0..n {
            let req = env
                .dispatching(&host, "request_headers")
                .header("x-fixture-global", "1");
            tasks.push(tokio::spawn(req.send()));
        }
        let mut globals = Vec::new();
        for t in tasks {
            let r = t.await.unwrap().unwrap();
            assert_eq!(r.header("x-fixture-call"), Some("200"));
            globals.push(
                r.header("x-fixture-global")
                    .unwrap()
                    .parse::<u32>()
                    .unwrap(),
            );
        }
        globals.sort();
        assert_eq!(
            globals,
            (1..=n).collect::<Vec<_>>(),
            "{mode}: one module memory"
        );
        assert_eq!(host.instances(), 1);
        // Every request was paused on its call at the same time as others.
        let logs = host.logs();
        let first_answer = logs
            .iter()
            .position(|l| l.message.contains("call response"))
            .unwrap();
        let dispatched_before = logs[..first_answer]
            .iter()
            .filter(|l| l.message.contains("dispatch in request_headers"))
            .count();
        assert!(dispatched_before > 1, "{mode}: requests interleave");
        assert_eq!(env.up.total(), n as usize);
        host.finish().await;
    }
}
