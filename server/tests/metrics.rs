//! `GET /metrics` as Prometheus scrapes it: after a scripted sequence of calls the exposition
//! parses (strictly, and with `promtool check metrics` when it is installed) and every counter
//! moved by exactly what the sequence implies; no label carries a key or a token; a failing
//! store is counted by kind.

mod common;

use std::sync::Arc;

use async_trait::async_trait;
use common::prometheus::{self, Exposition};
use common::{Client, TestServer, eventually, response, waiting_on, watch_waits};
use idempotency_server::store::{
    Allocate, AllocateOutcome, Record, RecordOutcome, Release, ReleaseOutcome, Store, StoreError,
    now_ms,
};
use serde_json::json;

/// Scrape, check the text with promtool when there is one, and read it strictly.
async fn scrape(client: &Client) -> (String, Exposition) {
    let answer = client.get("/metrics").await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.content_type(),
        "text/plain; version=0.0.4; charset=utf-8"
    );
    match prometheus::promtool_check(&answer.text) {
        Some(verdict) => verdict.expect("promtool check metrics accepts /metrics"),
        None => eprintln!("SKIPPED promtool check metrics: promtool is not installed"),
    }
    let exposition = prometheus::parse(&answer.text).expect("/metrics is Prometheus text");
    (answer.text, exposition)
}

fn value(e: &Exposition, name: &str, labels: &[(&str, &str)]) -> f64 {
    e.value(name, labels)
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
}

/// Every outcome of a counter family, checked exactly (zeros included).
fn assert_outcomes(e: &Exposition, name: &str, expected: &[(&str, f64)]) {
    let family = e.family(name).unwrap_or_else(|| panic!("no family {name}"));
    assert_eq!(family.kind, "counter");
    assert_eq!(
        family.samples.len(),
        expected.len(),
        "{name}: {:?}",
        family.samples
    );
    for (outcome, n) in expected {
        assert_eq!(
            value(e, name, &[("outcome", outcome)]),
            *n,
            "{name}{{outcome={outcome}}}"
        );
    }
}

fn http(e: &Exposition, route: &str, method: &str, status: &str) -> f64 {
    value(
        e,
        "idempotency_server_http_requests_total",
        &[("route", route), ("method", method), ("status", status)],
    )
}

fn count(e: &Exposition, name: &str, label: (&str, &str)) -> f64 {
    value(e, &format!("{name}_count"), &[label])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_counter_moves_by_what_the_calls_imply() {
    watch_waits();
    // The embedded store without a checkpoint during the test (one may begin every 100 ms,
    // and while it runs, reads of live keys go through the writer): the counters then move
    // by the calls alone.
    let store_dir = tempfile::tempdir().unwrap();
    let mut options = idempotency_server::EmbeddedOptions::new(store_dir.path());
    options.checkpoint_interval = std::time::Duration::from_secs(3600);
    let store =
        tokio::task::spawn_blocking(move || idempotency_server::EmbeddedStore::open(options))
            .await
            .unwrap()
            .unwrap();
    let server = TestServer::start_on(Arc::new(store)).await;
    let c = &server.client;
    let alloc = |key: &str, fingerprint: &str| json!({ "idempotency_key": key, "fingerprint": fingerprint });

    // Before anything: every outcome is there, at zero.
    let (_, e) = scrape(c).await;
    assert_eq!(
        value(
            &e,
            "idempotency_server_allocations_total",
            &[("outcome", "allocated")]
        ),
        0.0
    );
    assert_eq!(
        value(
            &e,
            "idempotency_server_build_info",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("store", "embedded")
            ]
        ),
        1.0
    );

    // Allocations: allocated, in flight, another fingerprint, recorded, replayed, malformed.
    let token = c.allocate(alloc("YQ", "f1")).await.lease_token();
    assert_eq!(c.allocate(alloc("YQ", "f1")).await.status, 409);
    assert_eq!(c.allocate(alloc("YQ", "f2")).await.status, 422);
    let recorded = c
        .record(json!({ "idempotency_key": "YQ", "lease_token": token, "response": response("a") }))
        .await;
    assert_eq!(recorded.status, 200);
    assert_eq!(c.allocate(alloc("YQ", "f1")).await.status, 200);
    assert_eq!(
        c.allocate(json!({ "idempotency_key": "not base64!" }))
            .await
            .status,
        422
    );
    assert_eq!(
        c.send("PUT", "/api/v2/captures", Some("[]".into()))
            .await
            .status,
        400
    );
    // Releases: released, then forbidden; a record of a key nobody holds, a malformed one.
    let b = c.lease("Yg").await;
    let release = json!({ "idempotency_key": "Yg", "lease_token": b });
    assert_eq!(c.release(release.clone()).await.status, 200);
    assert_eq!(c.release(release).await.status, 403);
    assert_eq!(
        c.record(json!({ "idempotency_key": "Yw", "response": response("c") }))
            .await
            .status,
        403
    );
    assert_eq!(
        c.record(json!({ "idempotency_key": "no!", "response": response("x") }))
            .await
            .status,
        422
    );
    // A batch: each item counted as its single call.
    let d = c.lease("ZA").await;
    let e_token = c.lease("ZQ").await;
    let batch = c
        .send(
            "POST",
            "/api/v2/captures/batch",
            Some(
                json!({ "operations": [
                    { "op": "record", "idempotency_key": "ZA", "lease_token": d, "response": response("d") },
                    { "op": "release", "idempotency_key": "ZQ", "lease_token": e_token },
                    { "op": "release", "idempotency_key": "Zg" },
                    { "op": "record", "idempotency_key": "no!", "response": response("x") },
                    { "op": "release" },
                    "not an object",
                ] })
                .to_string(),
            ),
        )
        .await;
    let statuses: Vec<u64> = batch.json["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [200, 200, 403, 422, 400, 400]);
    // A takeover of an expired lease.
    let short = c
        .allocate(json!({ "idempotency_key": "dA", "lease_ms": 50 }))
        .await;
    let expires = humantime::parse_rfc3339(short.json["lease_expires_at"].as_str().unwrap())
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    eventually("the lease to expire", || async {
        (now_ms() > expires).then_some(())
    })
    .await;
    assert_eq!(
        c.allocate(json!({ "idempotency_key": "dA" })).await.status,
        202
    );
    // No route, no method.
    assert_eq!(c.get("/nope").await.status, 404);
    assert_eq!(c.send("PATCH", "/api/v2/captures", None).await.status, 405);

    let (text, e) = scrape(c).await;
    assert_outcomes(
        &e,
        "idempotency_server_allocations_total",
        &[
            ("allocated", 5.0), // YQ, Yg, ZA, ZQ, dA
            ("taken_over", 1.0),
            ("replayed", 1.0),
            ("conflict", 1.0),
            ("waited", 0.0),
            ("mismatch", 1.0),
            ("invalid", 2.0),
            ("error", 0.0),
        ],
    );
    assert_outcomes(
        &e,
        "idempotency_server_records_total",
        &[
            ("stored", 2.0),    // YQ, ZA (batch)
            ("forbidden", 1.0), // Yw
            ("too_large", 0.0),
            ("invalid", 3.0), // the malformed key, alone and in the batch; the non-object item
            ("error", 0.0),
        ],
    );
    assert_outcomes(
        &e,
        "idempotency_server_releases_total",
        &[
            ("released", 2.0),  // Yg, ZQ (batch)
            ("forbidden", 2.0), // Yg again, Zg (batch)
            ("invalid", 1.0),   // the item without a key
            ("error", 0.0),
        ],
    );
    let captures = "/api/v2/captures";
    assert_eq!(http(&e, captures, "PUT", "202"), 6.0);
    assert_eq!(http(&e, captures, "PUT", "200"), 1.0);
    assert_eq!(http(&e, captures, "PUT", "409"), 1.0);
    assert_eq!(http(&e, captures, "PUT", "422"), 2.0);
    assert_eq!(http(&e, captures, "PUT", "400"), 1.0);
    assert_eq!(http(&e, captures, "POST", "200"), 1.0);
    assert_eq!(http(&e, captures, "POST", "403"), 1.0);
    assert_eq!(http(&e, captures, "POST", "422"), 1.0);
    assert_eq!(http(&e, captures, "DELETE", "200"), 1.0);
    assert_eq!(http(&e, captures, "DELETE", "403"), 1.0);
    assert_eq!(http(&e, captures, "PATCH", "405"), 1.0);
    assert_eq!(http(&e, "/api/v2/captures/batch", "POST", "200"), 1.0);
    assert_eq!(http(&e, "unmatched", "GET", "404"), 1.0);
    // The first scrape counts once it is answered.
    assert_eq!(http(&e, "/metrics", "GET", "200"), 1.0);
    let requests: f64 = e
        .family("idempotency_server_http_requests_total")
        .unwrap()
        .samples
        .iter()
        .map(|s| s.value)
        .sum();
    assert_eq!(requests, 20.0, "every request once, in one series");

    // Latencies: every operation answered once into its histogram, every store call timed.
    let op = "idempotency_server_operation_duration_seconds";
    assert_eq!(count(&e, op, ("operation", "allocate")), 11.0);
    assert_eq!(count(&e, op, ("operation", "record")), 3.0);
    assert_eq!(count(&e, op, ("operation", "release")), 2.0);
    assert_eq!(count(&e, op, ("operation", "batch")), 1.0);
    let store = "idempotency_server_store_call_duration_seconds";
    assert_eq!(count(&e, store, ("call", "allocate")), 9.0); // the 11 but the 2 refused first
    assert_eq!(count(&e, store, ("call", "record")), 2.0);
    assert_eq!(count(&e, store, ("call", "release")), 2.0);
    assert_eq!(count(&e, store, ("call", "batch")), 1.0);
    let errors: f64 = e
        .family("idempotency_server_store_errors_total")
        .unwrap()
        .samples
        .iter()
        .map(|s| s.value)
        .sum();
    assert_eq!(errors, 0.0);

    // The embedded store: 9 allocations, 2 records, 2 releases and 3 batch items applied; the
    // conflict, the mismatch and the replay answered by a read; the rest in transactions.
    assert_eq!(
        value(&e, "idempotency_server_embedded_operations_total", &[]),
        16.0
    );
    assert_eq!(
        value(&e, "idempotency_server_embedded_reads_total", &[]),
        3.0
    );
    assert_eq!(
        value(
            &e,
            "idempotency_server_embedded_transaction_operations_sum",
            &[]
        ),
        13.0
    );
    assert!(
        value(
            &e,
            "idempotency_server_embedded_commit_duration_seconds_count",
            &[("kind", "journal")]
        ) + value(
            &e,
            "idempotency_server_embedded_commit_duration_seconds_count",
            &[("kind", "checkpoint")]
        ) >= 1.0
    );

    // No key, token or path as sent in a label.
    for secret in [
        "YQ",
        "Yg",
        "ZA",
        "dA",
        "not base64!",
        "/nope",
        &token,
        &b,
        &d,
    ]
    .map(|s| s.to_owned())
    {
        let quoted = format!("\"{secret}\"");
        assert!(!text.contains(&quoted), "{secret} is in a label:\n{text}");
    }

    // A wait: the duplicate waits for the holder's record and is counted once, as waited.
    let w = c.lease("dw").await;
    let waiter = {
        let c = c.clone();
        tokio::spawn(async move {
            c.allocate(json!({ "idempotency_key": "dw", "wait_ms": 10_000 }))
                .await
        })
    };
    waiting_on("dw").await;
    let recorded = c
        .record(json!({ "idempotency_key": "dw", "lease_token": w, "response": response("w") }))
        .await;
    assert_eq!(recorded.status, 200);
    let waited = waiter.await.unwrap();
    assert_eq!(waited.status, 200);
    assert!(waited.header("idempotency-waited-ms").is_some());
    let (_, after) = scrape(c).await;
    let allocations = |e: &Exposition, outcome| {
        value(
            e,
            "idempotency_server_allocations_total",
            &[("outcome", outcome)],
        )
    };
    assert_eq!(allocations(&after, "waited"), 1.0);
    assert_eq!(allocations(&after, "allocated"), 6.0);
    assert_eq!(allocations(&after, "replayed"), 1.0);
    assert_eq!(allocations(&after, "conflict"), 1.0);
    assert_eq!(
        value(
            &after,
            "idempotency_server_allocation_wait_seconds_count",
            &[]
        ),
        1.0
    );
    server.stop().await;
}

/// A store that fails every operation the way a shared store that does not answer in time
/// does.
struct Silent;

#[async_trait]
impl Store for Silent {
    fn name(&self) -> &'static str {
        "silent"
    }
    async fn allocate(&self, _: Allocate) -> Result<AllocateOutcome, StoreError> {
        Err(StoreError::TimedOut("no answer within 2s".into()))
    }
    async fn record(&self, _: Record) -> Result<RecordOutcome, StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }
    async fn release(&self, _: Release) -> Result<ReleaseOutcome, StoreError> {
        Err(StoreError::Closed)
    }
    async fn ready(&self) -> Result<(), StoreError> {
        Err(StoreError::TimedOut("no answer within 2s".into()))
    }
    async fn shutdown(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[tokio::test]
async fn store_failures_are_counted_by_call_and_kind() {
    let server = TestServer::start_on(Arc::new(Silent)).await;
    let c = &server.client;
    assert_eq!(
        c.allocate(json!({ "idempotency_key": "YQ" })).await.status,
        503
    );
    assert_eq!(
        c.record(json!({ "idempotency_key": "YQ", "response": response("a") }))
            .await
            .status,
        503
    );
    assert_eq!(
        c.release(json!({ "idempotency_key": "YQ" })).await.status,
        503
    );
    let batch = c
        .send(
            "POST",
            "/api/v2/captures/batch",
            Some(
                json!({ "operations": [
                    { "op": "record", "idempotency_key": "YQ", "response": response("a") },
                    { "op": "release", "idempotency_key": "Yg" },
                ] })
                .to_string(),
            ),
        )
        .await;
    assert_eq!(batch.status, 200);
    let (_, e) = scrape(c).await;
    let errors = |call: &str, kind: &str| {
        value(
            &e,
            "idempotency_server_store_errors_total",
            &[("call", call), ("kind", kind)],
        )
    };
    assert_eq!(errors("allocate", "timeout"), 1.0);
    assert_eq!(errors("record", "unavailable"), 1.0);
    assert_eq!(errors("release", "closed"), 1.0);
    // The default batch runs the single calls: each item is one record or release call, and
    // one error of the batch.
    assert_eq!(errors("batch", "unavailable"), 1.0);
    assert_eq!(errors("batch", "closed"), 1.0);
    assert_eq!(errors("allocate", "unavailable"), 0.0);
    assert_eq!(
        value(
            &e,
            "idempotency_server_allocations_total",
            &[("outcome", "error")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &e,
            "idempotency_server_records_total",
            &[("outcome", "error")]
        ),
        2.0
    );
    assert_eq!(
        value(
            &e,
            "idempotency_server_releases_total",
            &[("outcome", "error")]
        ),
        2.0
    );
    assert_eq!(
        value(
            &e,
            "idempotency_server_build_info",
            &[("version", env!("CARGO_PKG_VERSION")), ("store", "silent")]
        ),
        1.0
    );
    // Readiness is open and counted too; /metrics stays open without the token.
    assert_eq!(c.get("/-/ready").await.status, 503);
    server.stop().await;
}

#[tokio::test]
async fn metrics_are_open_like_ping_when_the_api_needs_a_token() {
    let server = TestServer::start_with(|config| config.api_token = Some("s3cret".into())).await;
    let c = &server.client;
    assert_eq!(
        c.allocate(json!({ "idempotency_key": "YQ" })).await.status,
        401
    );
    let (text, e) = scrape(c).await;
    assert_eq!(http(&e, "/api/v2/captures", "PUT", "401"), 1.0);
    // Refused before the handler: not an allocation.
    let allocations: f64 = e
        .family("idempotency_server_allocations_total")
        .unwrap()
        .samples
        .iter()
        .map(|s| s.value)
        .sum();
    assert_eq!(allocations, 0.0);
    assert!(!text.contains("s3cret"));
    server.stop().await;
}

/// The reader is strict: what Prometheus would refuse, it refuses.
#[test]
fn the_reader_refuses_what_prometheus_would() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 3\n\
                # TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3\nh_count 2\n";
    let e = prometheus::parse(good).unwrap();
    assert_eq!(e.value("a_total", &[("x", "1")]), Some(3.0));
    assert_eq!(e.value("h_count", &[]), Some(2.0));
    for bad in [
        "a_total 1\n",                                    // no TYPE
        "# TYPE a counter\nb 1\n",                        // another family's sample
        "# TYPE a counter\na 1\n# TYPE a counter\na 2\n", // a family twice
        "# TYPE a counter\na{x=1} 1\n",                   // an unquoted label
        "# TYPE a counter\na{x=\"1\",x=\"2\"} 1\n",       // a label twice
        "# TYPE a counter\na one\n",                      // not a value
        "# TYPE a counter\na -1\n",                       // a negative counter
        "# TYPE a counter\na 1",                          // no final line feed
        "# TYPE 1a counter\n1a 1\n",                      // not a name
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n",
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 3\n",
        "# TYPE a frequency\na 1\n", // not a type
    ] {
        assert!(prometheus::parse(bad).is_err(), "accepted {bad:?}");
    }
}
