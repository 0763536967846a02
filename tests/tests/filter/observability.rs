//! What an operator sees of one keyed request, end to end: the gateway's trace continues into
//! the backend (the filter passes the request's `traceparent` and `x-request-id` on its
//! allocation and its inline record; the deferred batch names each request in its item, and
//! the backend's batch span links to the request's trace), the upstream gets the same
//! `traceparent`, and the filter logs one line per decision at info, naming the key by the
//! same digest as the backend's span, never the key, a token or a body.
//!
//! The backend's spans are read with the SDK's in-memory exporter behind the backend's own
//! trace layer, in the binary's one subscriber (`support::spans`); each mode's test picks its
//! own spans out by its trace id.

use idempotency_tests::{Level, Mode, Reply};
use opentelemetry::{Array, Value};
use opentelemetry_sdk::trace::SpanData;

use serde_json::json;

use crate::both_modes;
use crate::support::{E2e, metric};

const PARENT: &str = "00f067aa0ba902b7";

/// The gateway's trace of each mode's request.
fn trace_of(mode: Mode) -> &'static str {
    match mode {
        Mode::Ngx => "4bf92f3577b34da6a3ce929d0e0e4736",
        Mode::Envoy => "5bf92f3577b34da6a3ce929d0e0e4736",
    }
}

const CLIENT_KEY: &str = "order-7f3a-must-never-show";
const CLIENT_TOKEN: &str = "Bearer client-token-must-never-show";
const BODY: &str = "{\"card\":\"body-must-never-show\"}";

fn text(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| match &kv.value {
            Value::String(s) => s.as_str().to_owned(),
            Value::Array(Array::String(a)) => format!("{a:?}"),
            other => other.to_string(),
        })
}

/// The spans named `name` in the trace `trace`, or linked to it.
fn spans(trace: &str, name: &str) -> Vec<SpanData> {
    crate::support::spans()
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|s| {
            s.name == name
                && (s.span_context.trace_id().to_string() == trace
                    || s.links
                        .iter()
                        .any(|l| l.span_context.trace_id().to_string() == trace))
        })
        .collect()
}

async fn the_gateways_trace_goes_through_the_backend_and_the_logs_name_keys_by_digest(mode: Mode) {
    let trace = trace_of(mode);
    let t = E2e::start(mode, json!({})).await;
    t.api.reply("/orders", Reply::new(201).body("{\"id\":7}"));
    let traceparent = format!("00-{trace}-{PARENT}-01");
    let first = t
        .post("/orders", Some(&format!("\"{CLIENT_KEY}\"")), BODY)
        .header("content-type", "application/json")
        .header("authorization", CLIENT_TOKEN)
        .header("traceparent", &traceparent)
        .header("x-request-id", "req-1")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status, 201);
    // The record: inline on Envoy, from the tick's batch on Kong.
    t.tick().await;
    assert_eq!(t.metric(metric::RECORDED), 1);

    // The upstream got the gateway's traceparent, untouched.
    let seen = t.api.requests();
    assert_eq!(seen[0].header("traceparent"), Some(traceparent.as_str()));

    // The allocation's span in the backend: a child of the request's span in the gateway's
    // trace, naming the request.
    let allocations = spans(trace, "PUT /api/v2/captures");
    assert_eq!(allocations.len(), 1);
    let allocation = &allocations[0];
    assert_eq!(allocation.parent_span_id.to_string(), PARENT);
    assert_eq!(text(allocation, "request_id").as_deref(), Some("req-1"));
    assert_eq!(
        text(allocation, "idempotency.outcome").as_deref(),
        Some("allocated")
    );
    let digest = text(allocation, "idempotency.key").expect("the key's digest");
    match mode {
        Mode::Envoy => {
            // The inline record: in the same trace.
            let records = spans(trace, "POST /api/v2/captures");
            assert_eq!(records.len(), 1);
            assert_eq!(text(&records[0], "idempotency.key"), Some(digest.clone()));
            assert_eq!(text(&records[0], "request_id").as_deref(), Some("req-1"));
        }
        Mode::Ngx => {
            // The batch carries no request's trace itself, and links to this one's.
            let batches = spans(trace, "POST /api/v2/captures/batch");
            assert_eq!(batches.len(), 1);
            assert_ne!(batches[0].span_context.trace_id().to_string(), trace);
            let links: Vec<String> = batches[0]
                .links
                .iter()
                .map(|l| l.span_context.trace_id().to_string())
                .collect();
            assert_eq!(links, [trace]);
        }
    }

    // The retry: replayed, and said so in one line.
    let retry = t
        .post("/orders", Some(&format!("\"{CLIENT_KEY}\"")), BODY)
        .header("content-type", "application/json")
        .header("authorization", CLIENT_TOKEN)
        .header("x-request-id", "req-2")
        .send()
        .await
        .unwrap();
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));

    // One info line per decision, with the backend's digest of the key and the request id.
    let info: Vec<String> = t
        .host()
        .logs()
        .into_iter()
        .filter(|l| l.level == Level::Info)
        .map(|l| l.message)
        .collect();
    let decided = |what: &str, id: &str| {
        let line = format!("idempotency: {what}; key={digest} request_id={id}");
        info.iter().filter(|l| **l == line).count()
    };
    assert_eq!(
        decided("allocated: to the upstream", "req-1"),
        1,
        "{info:#?}"
    );
    assert_eq!(decided("replayed: 201", "req-2"), 1, "{info:#?}");
    // Details at debug: how the record went.
    t.host().assert_logged("record: ");
    // No line, at any level, holds the key, the client's token or its body.
    for line in t.host().logs() {
        for secret in [
            CLIENT_KEY,
            "client-token-must-never-show",
            "body-must-never-show",
        ] {
            assert!(!line.message.contains(secret), "{secret} logged: {line}");
        }
    }
    t.finish().await;
}

both_modes!(the_gateways_trace_goes_through_the_backend_and_the_logs_name_keys_by_digest);

/// Every counter the filter defines, in the order of `filter/src/metrics.rs`.
const FILTER_METRICS: [&str; 17] = [
    metric::NO_KEY,
    metric::ALLOCATED,
    metric::REPLAYED,
    metric::CONFLICT,
    metric::WAITED,
    metric::MISMATCH,
    metric::MISSING_KEY,
    metric::INVALID_KEY,
    metric::TOO_LARGE,
    metric::LENGTH_REQUIRED,
    metric::SERVER_ERROR,
    metric::PASSED_ON_ERROR,
    metric::RECORDED,
    metric::RELEASED,
    metric::RECORD_FAILED,
    metric::QUEUE_DROPPED,
    metric::GRPC_PASSED,
];

/// The name a Prometheus scrape of the gateway gives the filter's metric `name`.
pub fn exported(mode: Mode, name: &str) -> String {
    match mode {
        Mode::Ngx => format!("pw_idempotency_{name}"),
        Mode::Envoy => name.to_owned(),
    }
}

/// A scripted sequence through the filter, then the gateway's scrape as Kong's Prometheus
/// plugin or Envoy's `/stats/prometheus` writes it: strict Prometheus text, every counter of
/// the filter under the host's name (`pw_idempotency_…` on Kong, the bare name on Envoy), each
/// at exactly what the sequence implies; and the host's own listing (`pw.idempotency.…` in
/// ngx_wasm_module's shm, `wasmcustom.…` in Envoy's `/stats`).
async fn the_filters_metrics_reach_the_gateways_scrape_under_the_hosts_names(mode: Mode) {
    let t = E2e::start(mode, json!({})).await;
    t.api.reply("/orders", Reply::new(201).body("{\"id\":1}"));
    // No key: passed; two keyed requests, each then replayed once; a malformed key; the same
    // key with another body (of another length: on Envoy the fingerprint covers the length).
    assert_eq!(
        t.post("/orders", None, "{}").send().await.unwrap().status,
        201
    );
    for key in ["\"k-1\"", "\"k-2\""] {
        assert_eq!(t.send("/orders", key, "{\"n\":1}").await.status, 201);
        t.tick().await;
        let replay = t.send("/orders", key, "{\"n\":1}").await;
        assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    }
    assert_eq!(t.send("/orders", "\"unterminated", "{}").await.status, 400);
    assert_eq!(t.send("/orders", "\"k-1\"", "{\"n\":22}").await.status, 422);
    t.tick().await;

    let expected = |name: &str| match name {
        metric::NO_KEY | metric::INVALID_KEY | metric::MISMATCH => 1.0,
        metric::ALLOCATED | metric::REPLAYED | metric::RECORDED => 2.0,
        _ => 0.0,
    };
    let text = t.host().prometheus();
    let scrape = crate::prometheus::parse(&text)
        .unwrap_or_else(|e| panic!("the gateway's scrape is not Prometheus text: {e}\n{text}"));
    assert_eq!(scrape.families.len(), FILTER_METRICS.len(), "{text}");
    for name in FILTER_METRICS {
        let family = scrape
            .family(&exported(mode, name))
            .unwrap_or_else(|| panic!("{name} is not in the scrape:\n{text}"));
        assert_eq!(family.kind, "counter");
        assert_eq!(family.samples.len(), 1);
        assert!(family.samples[0].labels.is_empty());
        assert_eq!(family.samples[0].value, expected(name), "{name}");
    }
    // The names README's filter metrics table gives, the same list.
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    for name in FILTER_METRICS {
        assert!(
            readme.contains(&format!("| `{name}` |")),
            "{name} not in README"
        );
    }

    let stats = t.host().stats();
    for name in FILTER_METRICS {
        let line = match mode {
            Mode::Ngx => format!("pw.idempotency.{name}: {}\n", expected(name)),
            Mode::Envoy => format!("wasmcustom.{name}: {}\n", expected(name)),
        };
        assert!(stats.contains(&line), "{line:?} not in\n{stats}");
    }
    t.finish().await;
}

both_modes!(the_filters_metrics_reach_the_gateways_scrape_under_the_hosts_names);
