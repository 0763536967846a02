//! The API over real HTTP, against the server in-process with the embedded store in a
//! temporary directory: every status of every endpoint, the old server's and the old Lua
//! plugin's cases, leases, fingerprints, retention, release, wait_ms, auth and concurrency.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::{Answer, TestServer, eventually, response, waiting_on, watch_waits};
use idempotency_server::store::{
    Allocate, AllocateOutcome, Record, RecordOutcome, Release, ReleaseOutcome, Store, StoreError,
};
use idempotency_spec::problem_type;
use serde_json::{Value, json};

const OLD_KEY_MESSAGE: &str =
    "Malformed idempotency key. Use URL safe base64 encoding without padding";
const OLD_FORBIDDEN_MESSAGE: &str = "Capture has been completed or has not been allocated";

fn assert_lease(answer: &Answer) {
    assert_eq!(answer.status, 202, "{answer:?}");
    assert_eq!(answer.content_type(), "application/json");
    assert!(!answer.lease_token().is_empty());
    let expires = answer.json["lease_expires_at"].as_str().unwrap();
    humantime::parse_rfc3339(expires).expect("lease_expires_at is RFC 3339");
}

#[tokio::test]
async fn the_old_servers_cases() {
    let server = TestServer::start().await;
    let c = &server.client;
    // Keys the old server accepted: a short one, a UUID with one extra character, a
    // pre-encoded one.
    for key in [
        "qwe",
        "8e03978e-40d5-43e8-bc93-6894a57f93241",
        "QkE2OTlCQjctNTg2QS00Qzk4LTk2OEYtRUY4NjVFRTBDODVG",
    ] {
        assert_lease(&c.allocate(json!({ "idempotency_key": key })).await);
    }
    // And the one it refused.
    let answer = c.allocate(json!({ "idempotency_key": "==qwe--" })).await;
    assert_eq!(
        answer.assert_problem(422, problem_type::MALFORMED_KEY),
        OLD_KEY_MESSAGE
    );
    // Record without allocation.
    let answer = c
        .record(json!({ "idempotency_key": "never", "response": response("x") }))
        .await;
    assert_eq!(
        answer.assert_problem(403, problem_type::NOT_ALLOCATED),
        OLD_FORBIDDEN_MESSAGE
    );
    // Allocate, record, allocate again: the same response.
    let key = "QUxMT0NBVEUtUkVDT1JELUFMTE9DQVRF";
    c.lease(key).await;
    let recorded = c
        .record(json!({ "idempotency_key": key, "response": response("same") }))
        .await;
    assert_eq!(recorded.status, 200, "{recorded:?}");
    assert_eq!(recorded.json["idempotency_key"], key);
    humantime::parse_rfc3339(recorded.json["expires_at"].as_str().unwrap()).unwrap();
    let replay = c.allocate(json!({ "idempotency_key": key })).await;
    assert_eq!(replay.status, 200);
    assert_eq!(replay.content_type(), "application/json");
    assert_eq!(
        replay.json,
        json!({ "idempotency_key": key, "response": response("same") })
    );
    server.stop().await;
}

#[tokio::test]
async fn the_old_lua_plugins_record_with_an_array_header_value() {
    let server = TestServer::start().await;
    let c = &server.client;
    c.lease("bHVh").await;
    // What the plugin sends for two Set-Cookie headers: one entry, an array value; no token.
    let capture = json!({
        "response_status": 200,
        "response_body": "H4sIAAAAAAAAA6tWyk5NzStRslIqS8wpTgUAaJ4QvxMAAAA",
        "response_headers": [
            { "key": "content-type", "value": "application/json" },
            { "key": "set-cookie", "value": ["a=1; Path=/", "b=2; Path=/"] }
        ]
    });
    let answer = c
        .record(json!({ "idempotency_key": "bHVh", "response": capture }))
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let replay = c.allocate(json!({ "idempotency_key": "bHVh" })).await;
    assert_eq!(replay.status, 200);
    assert_eq!(replay.json["response"], capture);
    server.stop().await;
}

#[tokio::test]
async fn a_live_lease_is_409_with_retry_after() {
    let server = TestServer::start().await;
    let c = &server.client;
    c.allocate(json!({ "idempotency_key": "busy", "lease_ms": 30_000 }))
        .await;
    let answer = c.allocate(json!({ "idempotency_key": "busy" })).await;
    answer.assert_problem(409, problem_type::IN_FLIGHT);
    let retry_after = answer.retry_after();
    assert!((1..=30).contains(&retry_after), "{retry_after}");
    server.stop().await;
}

#[tokio::test]
async fn malformed_payloads_are_400() {
    let server = TestServer::start().await;
    let c = &server.client;
    let path = "/api/v2/captures";
    let bodies: Vec<(&str, Option<String>)> = vec![
        ("PUT", Some("not json".into())),
        ("PUT", Some("".into())),
        ("PUT", None),
        ("PUT", Some(r#"["qwe"]"#.into())),
        ("PUT", Some(r#""qwe""#.into())),
        ("PUT", Some(r#"{"idempotency_key": "qwe""#.into())),
        ("PUT", Some("{}".into())),
        ("PUT", Some(r#"{"idempotency_key": 42}"#.into())),
        ("PUT", Some(r#"{"idempotency_key": null}"#.into())),
        (
            "PUT",
            Some(r#"{"idempotency_key": "qwe", "lease_ms": 0}"#.into()),
        ),
        (
            "PUT",
            Some(r#"{"idempotency_key": "qwe", "lease_ms": -5}"#.into()),
        ),
        (
            "PUT",
            Some(r#"{"idempotency_key": "qwe", "lease_ms": 86400001}"#.into()),
        ),
        (
            "PUT",
            Some(r#"{"idempotency_key": "qwe", "lease_ms": "60"}"#.into()),
        ),
        (
            "PUT",
            Some(r#"{"idempotency_key": "qwe", "wait_ms": 30001}"#.into()),
        ),
        (
            "PUT",
            Some(r#"{"idempotency_key": "qwe", "fingerprint": 7}"#.into()),
        ),
        (
            "PUT",
            Some(json!({ "idempotency_key": "qwe", "fingerprint": "f".repeat(1025) }).to_string()),
        ),
        ("POST", Some("nope".into())),
        ("POST", Some(r#"{"idempotency_key": "qwe"}"#.into())),
        (
            "POST",
            Some(r#"{"idempotency_key": "qwe", "response": null}"#.into()),
        ),
        (
            "POST",
            Some(r#"{"idempotency_key": "qwe", "response": {}}"#.into()),
        ),
        (
            "POST",
            Some(
                json!({ "idempotency_key": "qwe", "response": {
                    "response_status": 99, "response_body": "", "response_headers": [] } })
                .to_string(),
            ),
        ),
        (
            "POST",
            Some(
                json!({ "idempotency_key": "qwe", "response": {
                    "response_status": 600, "response_body": "", "response_headers": [] } })
                .to_string(),
            ),
        ),
        (
            "POST",
            Some(
                json!({ "idempotency_key": "qwe", "response": {
                    "response_status": 200, "response_body": "",
                    "response_headers": [{ "key": "a", "value": 1 }] } })
                .to_string(),
            ),
        ),
        (
            "POST",
            Some(
                json!({ "idempotency_key": "qwe", "response": {
                    "response_status": 200, "response_headers": [] } })
                .to_string(),
            ),
        ),
        ("DELETE", Some("[]".into())),
        ("DELETE", Some(r#"{"lease_token": "t"}"#.into())),
    ];
    for (method, body) in bodies {
        let answer = c.send(method, path, body.clone()).await;
        let detail = answer.assert_problem(400, problem_type::MALFORMED_PAYLOAD);
        assert!(
            detail.starts_with("Malformed payload"),
            "{method} {body:?}: {detail}"
        );
    }
    // A missing field is named.
    let answer = c
        .send("POST", path, Some(r#"{"idempotency_key": "qwe"}"#.into()))
        .await;
    assert!(answer.json["detail"].as_str().unwrap().contains("response"));
    server.stop().await;
}

#[tokio::test]
async fn a_malformed_key_is_422_after_the_payload_checks() {
    let server = TestServer::start().await;
    let c = &server.client;
    let long = "k".repeat(1401);
    for key in ["==qwe--", "a+b/c", "", "with space", long.as_str()] {
        let record = json!({ "idempotency_key": key, "response": response("x") });
        let release = json!({ "idempotency_key": key, "lease_token": "t" });
        for answer in [
            c.allocate(json!({ "idempotency_key": key })).await,
            c.record(record).await,
            c.release(release).await,
        ] {
            assert_eq!(
                answer.assert_problem(422, problem_type::MALFORMED_KEY),
                OLD_KEY_MESSAGE
            );
        }
    }
    assert_lease(
        &c.allocate(json!({ "idempotency_key": "k".repeat(1400) }))
            .await,
    );
    // Out-of-range values are reported before the key.
    let answer = c
        .allocate(json!({ "idempotency_key": "==qwe--", "lease_ms": 0 }))
        .await;
    answer.assert_problem(400, problem_type::MALFORMED_PAYLOAD);
    server.stop().await;
}

#[tokio::test]
async fn unknown_fields_and_any_content_type_are_accepted() {
    let server = TestServer::start().await;
    let c = &server.client;
    let body = json!({ "idempotency_key": "extra", "future_field": { "x": 1 } }).to_string();
    let answer = c
        .send_with(
            "PUT",
            "/api/v2/captures",
            Some(body),
            &[("content-type", "text/plain")],
        )
        .await;
    assert_lease(&answer);
    let answer = c
        .record(json!({
            "idempotency_key": "extra",
            "response": response("x"),
            "unknown": true
        }))
        .await;
    assert_eq!(answer.status, 200);
    server.stop().await;
}

#[tokio::test]
async fn bodies_over_the_limit_are_413() {
    let server = TestServer::start_with(|c| c.body_limit = 2048).await;
    let c = &server.client;
    c.lease("big").await;
    let mut big = response("x");
    big["response_body"] = Value::String("b".repeat(4096));
    let answer = c
        .record(json!({ "idempotency_key": "big", "response": big }))
        .await;
    let detail = answer.assert_problem(413, problem_type::PAYLOAD_TOO_LARGE);
    assert!(detail.contains("2048"), "{detail}");
    let answer = c
        .send("PUT", "/api/v2/captures", Some(" ".repeat(4096)))
        .await;
    answer.assert_problem(413, problem_type::PAYLOAD_TOO_LARGE);
    // Just under the limit is fine.
    let mut fits = response("x");
    fits["response_body"] = Value::String("b".repeat(1500));
    let answer = c
        .record(json!({ "idempotency_key": "big", "response": fits }))
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    server.stop().await;
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_and_its_token_refused() {
    let server = TestServer::start().await;
    let c = &server.client;
    let first = c
        .allocate(json!({ "idempotency_key": "lease", "lease_ms": 200 }))
        .await
        .lease_token();
    // In flight while the lease lives, then taken over with a new token.
    let second = eventually("the lease to expire", || async {
        let answer = c.allocate(json!({ "idempotency_key": "lease" })).await;
        match answer.status {
            409 => None,
            202 => Some(answer.lease_token()),
            _ => panic!("{answer:?}"),
        }
    })
    .await;
    assert_ne!(first, second);
    let stale = c
        .record(json!({ "idempotency_key": "lease", "lease_token": first, "response": response("late") }))
        .await;
    stale.assert_problem(403, problem_type::NOT_ALLOCATED);
    let stale = c
        .release(json!({ "idempotency_key": "lease", "lease_token": first }))
        .await;
    stale.assert_problem(403, problem_type::NOT_ALLOCATED);
    let fresh = c
        .record(json!({ "idempotency_key": "lease", "lease_token": second, "response": response("new") }))
        .await;
    assert_eq!(fresh.status, 200);
    let replay = c.allocate(json!({ "idempotency_key": "lease" })).await;
    assert_eq!(replay.json["response"], response("new"));
    server.stop().await;
}

#[tokio::test]
async fn another_token_is_refused() {
    let server = TestServer::start().await;
    let c = &server.client;
    c.lease("tokens").await;
    let answer = c
        .record(json!({ "idempotency_key": "tokens", "lease_token": "0000", "response": response("x") }))
        .await;
    assert_eq!(
        answer.assert_problem(403, problem_type::NOT_ALLOCATED),
        OLD_FORBIDDEN_MESSAGE
    );
    let answer = c
        .release(json!({ "idempotency_key": "tokens", "lease_token": "0000" }))
        .await;
    answer.assert_problem(403, problem_type::NOT_ALLOCATED);
    // A completed key refuses a second record.
    c.record(json!({ "idempotency_key": "tokens", "response": response("x") }))
        .await;
    let answer = c
        .record(json!({ "idempotency_key": "tokens", "response": response("y") }))
        .await;
    answer.assert_problem(403, problem_type::NOT_ALLOCATED);
    server.stop().await;
}

#[tokio::test]
async fn a_fingerprint_mismatch_is_its_own_422_in_both_states() {
    let server = TestServer::start().await;
    let c = &server.client;
    let token = c
        .allocate(json!({ "idempotency_key": "fp", "fingerprint": "sha-256=aaa" }))
        .await
        .lease_token();
    let mismatch = c
        .allocate(json!({ "idempotency_key": "fp", "fingerprint": "sha-256=bbb" }))
        .await;
    mismatch.assert_problem(422, problem_type::FINGERPRINT_MISMATCH);
    assert_ne!(
        problem_type::FINGERPRINT_MISMATCH,
        problem_type::MALFORMED_KEY
    );
    // Same fingerprint, or none: in flight.
    for body in [
        json!({ "idempotency_key": "fp", "fingerprint": "sha-256=aaa" }),
        json!({ "idempotency_key": "fp" }),
    ] {
        assert_eq!(c.allocate(body).await.status, 409);
    }
    c.record(json!({ "idempotency_key": "fp", "lease_token": token, "response": response("fp") }))
        .await;
    let mismatch = c
        .allocate(json!({ "idempotency_key": "fp", "fingerprint": "sha-256=bbb" }))
        .await;
    mismatch.assert_problem(422, problem_type::FINGERPRINT_MISMATCH);
    let replay = c
        .allocate(json!({ "idempotency_key": "fp", "fingerprint": "sha-256=aaa" }))
        .await;
    assert_eq!(replay.status, 200);
    server.stop().await;
}

#[tokio::test]
async fn a_capture_expires_after_the_retention() {
    let server = TestServer::start_with(|c| c.retention = Duration::from_secs(1)).await;
    let c = &server.client;
    c.lease("retained").await;
    let recorded = c
        .record(json!({ "idempotency_key": "retained", "response": response("r") }))
        .await;
    assert_eq!(recorded.status, 200);
    // Replayed, then free once the retention has passed.
    eventually("the retention to pass", || async {
        let answer = c.allocate(json!({ "idempotency_key": "retained" })).await;
        match answer.status {
            200 => {
                assert_eq!(answer.json["response"], response("r"));
                None
            }
            202 => Some(()),
            _ => panic!("{answer:?}"),
        }
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn release_frees_the_key() {
    let server = TestServer::start().await;
    let c = &server.client;
    let token = c.lease("rel").await;
    let answer = c
        .release(json!({ "idempotency_key": "rel", "lease_token": token }))
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.json, json!({ "idempotency_key": "rel" }));
    // Free: allocated again, with a new token; the old one is refused.
    let again = c.lease("rel").await;
    assert_ne!(again, token);
    let answer = c
        .release(json!({ "idempotency_key": "rel", "lease_token": token }))
        .await;
    answer.assert_problem(403, problem_type::NOT_ALLOCATED);
    // Never allocated; completed.
    let answer = c
        .release(json!({ "idempotency_key": "never", "lease_token": "t" }))
        .await;
    answer.assert_problem(403, problem_type::NOT_ALLOCATED);
    c.record(json!({ "idempotency_key": "rel", "lease_token": again, "response": response("x") }))
        .await;
    let answer = c
        .release(json!({ "idempotency_key": "rel", "lease_token": again }))
        .await;
    answer.assert_problem(403, problem_type::NOT_ALLOCATED);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_ms_returns_the_capture_recorded_during_the_wait() {
    watch_waits();
    let server = TestServer::start().await;
    let c = server.client.clone();
    let token = c.lease("waited").await;
    let waiter = {
        let c = c.clone();
        tokio::spawn(async move {
            c.allocate(json!({ "idempotency_key": "waited", "wait_ms": 20_000 }))
                .await
        })
    };
    waiting_on("waited").await;
    let recorded = c
        .record(
            json!({ "idempotency_key": "waited", "lease_token": token, "response": response("w") }),
        )
        .await;
    assert_eq!(recorded.status, 200);
    let answer = waiter.await.unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.json["response"], response("w"));
    // It says it waited (a plain replay does not, even with wait_ms).
    let waited: u64 = answer
        .header("idempotency-waited-ms")
        .expect("the header of an allocation that waited")
        .parse()
        .expect("milliseconds");
    assert!(waited < 20_000, "{waited}");
    let replay = c
        .allocate(json!({ "idempotency_key": "waited", "wait_ms": 20_000 }))
        .await;
    assert_eq!(replay.status, 200);
    assert_eq!(replay.header("idempotency-waited-ms"), None);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_ms_allocates_when_the_holder_releases() {
    watch_waits();
    let server = TestServer::start().await;
    let c = server.client.clone();
    let token = c.lease("handed-over").await;
    let waiter = {
        let c = c.clone();
        tokio::spawn(async move {
            c.allocate(json!({ "idempotency_key": "handed-over", "wait_ms": 20_000 }))
                .await
        })
    };
    waiting_on("handed-over").await;
    let released = c
        .release(json!({ "idempotency_key": "handed-over", "lease_token": token }))
        .await;
    assert_eq!(released.status, 200);
    let answer = waiter.await.unwrap();
    assert_lease(&answer);
    assert_ne!(answer.lease_token(), token);
    assert!(answer.header("idempotency-waited-ms").is_some());
    server.stop().await;
}

#[tokio::test]
async fn wait_ms_allocates_when_the_holders_lease_expires() {
    let server = TestServer::start().await;
    let c = &server.client;
    let first = c
        .allocate(json!({ "idempotency_key": "lapsed", "lease_ms": 300 }))
        .await
        .lease_token();
    let answer = c
        .allocate(json!({ "idempotency_key": "lapsed", "wait_ms": 20_000 }))
        .await;
    assert_lease(&answer);
    assert_ne!(answer.lease_token(), first);
    server.stop().await;
}

#[tokio::test]
async fn wait_ms_answers_409_at_the_deadline() {
    let server = TestServer::start().await;
    let c = &server.client;
    c.lease("stuck").await;
    let answer = c
        .allocate(json!({ "idempotency_key": "stuck", "wait_ms": 300 }))
        .await;
    answer.assert_problem(409, problem_type::IN_FLIGHT);
    assert!(answer.retry_after() >= 1);
    let waited: u64 = answer
        .header("idempotency-waited-ms")
        .expect("waited until the deadline")
        .parse()
        .unwrap();
    assert!(waited >= 300, "{waited}");
    // A free key is allocated at once: no wait, no header.
    let fresh = c
        .allocate(json!({ "idempotency_key": "fresh", "wait_ms": 300 }))
        .await;
    assert_lease(&fresh);
    assert_eq!(fresh.header("idempotency-waited-ms"), None);
    server.stop().await;
}

/// `POST /api/v2/captures/batch` and the answer of each item, as a user reads them.
fn results(answer: &Answer) -> Vec<(u64, Value)> {
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.content_type(), "application/json");
    answer.json["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| (r["status"].as_u64().unwrap(), r["body"].clone()))
        .collect()
}

#[tokio::test]
async fn a_batch_answers_each_item_as_its_single_call_would() {
    let server = TestServer::start().await;
    let c = &server.client;
    let done = c.lease("YmF0Y2gtZG9uZQ").await;
    let freed = c.lease("YmF0Y2gtZnJlZWQ").await;
    let old = c.lease("YmF0Y2gtb2xk").await;
    let answer = c
        .send(
            "POST",
            "/api/v2/captures/batch",
            Some(
                json!({ "operations": [
                    { "op": "record", "idempotency_key": "YmF0Y2gtZG9uZQ", "lease_token": done, "response": response("d") },
                    { "op": "release", "idempotency_key": "YmF0Y2gtZnJlZWQ", "lease_token": freed },
                    { "op": "record", "idempotency_key": "bmV2ZXI", "response": response("n") },
                    { "op": "record", "idempotency_key": "==", "response": response("k") },
                    { "op": "record", "idempotency_key": "YmF0Y2gtb2xk" },
                    { "op": "record", "idempotency_key": "YmF0Y2gtb2xk", "response": { "response_status": 99, "response_body": "", "response_headers": [] } },
                    { "op": "upsert", "idempotency_key": "YmF0Y2gtb2xk" },
                    ["not", "an", "object"],
                    { "op": "release", "idempotency_key": "YmF0Y2gtb2xk" },
                ]})
                .to_string(),
            ),
        )
        .await;
    let r = results(&answer);
    assert_eq!(r.len(), 9, "one result per operation, in order");
    // 200 with the single call's bodies.
    assert_eq!(r[0].0, 200);
    assert_eq!(r[0].1["idempotency_key"], "YmF0Y2gtZG9uZQ");
    humantime::parse_rfc3339(r[0].1["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!(r[1], (200, json!({ "idempotency_key": "YmF0Y2gtZnJlZWQ" })));
    // The single call's problems, with the old `error` member.
    let problem = |i: usize, status: u64, kind: &str| {
        assert_eq!(r[i].0, status, "item {i}: {:?}", r[i]);
        assert_eq!(r[i].1["type"], kind, "item {i}");
        assert_eq!(r[i].1["status"], status, "item {i}");
        assert_eq!(r[i].1["error"], r[i].1["detail"], "item {i}");
        r[i].1["detail"].as_str().unwrap().to_owned()
    };
    assert_eq!(
        problem(2, 403, problem_type::NOT_ALLOCATED),
        OLD_FORBIDDEN_MESSAGE
    );
    assert_eq!(
        problem(3, 422, problem_type::MALFORMED_KEY),
        OLD_KEY_MESSAGE
    );
    assert!(problem(4, 400, problem_type::MALFORMED_PAYLOAD).contains("response"));
    assert!(problem(5, 400, problem_type::MALFORMED_PAYLOAD).contains("response_status"));
    assert!(problem(6, 400, problem_type::MALFORMED_PAYLOAD).contains("upsert"));
    problem(7, 400, problem_type::MALFORMED_PAYLOAD);
    // The items around the bad ones were applied.
    assert_eq!(r[8], (200, json!({ "idempotency_key": "YmF0Y2gtb2xk" })));
    let replay = c
        .allocate(json!({ "idempotency_key": "YmF0Y2gtZG9uZQ" }))
        .await;
    assert_eq!(replay.json["response"], response("d"));
    for free in ["YmF0Y2gtZnJlZWQ", "YmF0Y2gtb2xk"] {
        assert_lease(&c.allocate(json!({ "idempotency_key": free })).await);
    }
    assert_ne!(old, "");
    server.stop().await;
}

#[tokio::test]
async fn a_batch_sent_with_prefer_return_minimal_answers_successes_by_their_status_alone() {
    let server = TestServer::start().await;
    let c = &server.client;
    let batch = |prefer: Vec<&'static str>, ops: Value| async move {
        let headers: Vec<(&str, &str)> = prefer.iter().map(|p| ("prefer", *p)).collect();
        c.send_with(
            "POST",
            "/api/v2/captures/batch",
            Some(json!({ "operations": ops }).to_string()),
            &headers,
        )
        .await
    };
    // Every spelling RFC 7240 allows: among other preferences, in a second header, quoted,
    // with parameters, in another case.
    for (i, prefer) in [
        vec!["return=minimal"],
        vec!["respond-async, wait=10", "RETURN = \"minimal\"; x=1"],
        vec!["handling=lenient,return=minimal"],
    ]
    .into_iter()
    .enumerate()
    {
        let key = format!("bWluaW1hbC0{i}");
        let token = c.lease(&key).await;
        let answer = batch(
            prefer,
            json!([
                { "op": "record", "idempotency_key": key, "lease_token": token, "response": response("m") },
                { "op": "release", "idempotency_key": "bmV2ZXI", "lease_token": "x" },
            ]),
        )
        .await;
        assert_eq!(answer.header("preference-applied"), Some("return=minimal"));
        assert_eq!(answer.json["results"][0], json!({ "status": 200 }), "{i}");
        // A failure keeps its problem: a minimal answer is for successes.
        assert_eq!(answer.json["results"][1]["status"], 403, "{i}");
        assert_eq!(
            answer.json["results"][1]["body"]["type"],
            problem_type::NOT_ALLOCATED
        );
        // Applied all the same.
        let replay = c.allocate(json!({ "idempotency_key": key })).await;
        assert_eq!(replay.json["response"], response("m"));
    }
    // Another preference, or none: the whole answer.
    for prefer in [
        vec![],
        vec!["return=representation"],
        vec!["return-minimal"],
    ] {
        let answer = batch(
            prefer.clone(),
            json!([{ "op": "release", "idempotency_key": "bWluaW1hbC0w", "lease_token": "x" }]),
        )
        .await;
        assert_eq!(answer.header("preference-applied"), None, "{prefer:?}");
        assert_eq!(results(&answer)[0].0, 403, "{prefer:?}");
        let key = "bm9uZQ";
        let token = c.lease(key).await;
        let answer = batch(
            prefer.clone(),
            json!([{ "op": "release", "idempotency_key": key, "lease_token": token }]),
        )
        .await;
        assert_eq!(
            results(&answer),
            vec![(200, json!({ "idempotency_key": key }))]
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn a_batch_is_bounded_and_checked_as_a_whole_first() {
    let server = TestServer::start_with(|c| c.body_limit = 64 * 1024).await;
    let c = &server.client;
    let batch = |body: Value| c.send("POST", "/api/v2/captures/batch", Some(body.to_string()));
    let empty = batch(json!({ "operations": [] })).await;
    assert_eq!(results(&empty), vec![]);
    let too_many: Vec<Value> = (0..=idempotency_spec::MAX_BATCH_OPERATIONS)
        .map(|_| json!({ "op": "release", "idempotency_key": "a" }))
        .collect();
    let detail = batch(json!({ "operations": too_many }))
        .await
        .assert_problem(400, problem_type::MALFORMED_PAYLOAD);
    assert!(detail.contains("at most 1000"), "{detail}");
    batch(json!({ "operation": [] }))
        .await
        .assert_problem(400, problem_type::MALFORMED_PAYLOAD);
    batch(json!([]))
        .await
        .assert_problem(400, problem_type::MALFORMED_PAYLOAD);
    let big = "x".repeat(64 * 1024);
    batch(json!({ "operations": [{ "op": "record", "idempotency_key": "a", "response": response(&big) }] }))
        .await
        .assert_problem(413, problem_type::PAYLOAD_TOO_LARGE);
    let wrong_method = c
        .send("PUT", "/api/v2/captures/batch", Some("{}".into()))
        .await;
    assert_eq!(wrong_method.status, 405);
    server.stop().await;
}

#[tokio::test]
async fn with_an_api_token_the_api_needs_it_and_the_rest_stays_open() {
    let server = TestServer::start_with(|c| c.api_token = Some("s3cret-token".into())).await;
    let anonymous = &server.client;
    let body = json!({ "idempotency_key": "auth" });
    for client in [
        anonymous.clone(),
        anonymous.with_token("wrong"),
        anonymous.with_token("s3cret-token-but-longer"),
    ] {
        let answer = client.allocate(body.clone()).await;
        answer.assert_problem(401, problem_type::UNAUTHORIZED);
        assert_eq!(answer.header("www-authenticate"), Some("Bearer"));
        let answer = client
            .record(json!({ "idempotency_key": "auth", "response": response("x") }))
            .await;
        answer.assert_problem(401, problem_type::UNAUTHORIZED);
        let answer = client
            .send(
                "POST",
                "/api/v2/captures/batch",
                Some(json!({ "operations": [] }).to_string()),
            )
            .await;
        answer.assert_problem(401, problem_type::UNAUTHORIZED);
        let answer = client
            .send(
                "DELETE",
                "/api/v2/captures",
                Some(json!({ "idempotency_key": "auth" }).to_string()),
            )
            .await;
        answer.assert_problem(401, problem_type::UNAUTHORIZED);
        // The token is checked before the body is read: a malformed body is not the first
        // thing a caller without the token learns about.
        let answer = client
            .send("PUT", "/api/v2/captures", Some("not json".into()))
            .await;
        answer.assert_problem(401, problem_type::UNAUTHORIZED);
    }
    let answer = anonymous
        .send_with(
            "PUT",
            "/api/v2/captures",
            Some(body.to_string()),
            &[("authorization", "Basic czNjcmV0LXRva2Vu")],
        )
        .await;
    assert_eq!(answer.status, 401);
    let authorized = anonymous.with_token("s3cret-token");
    assert_lease(&authorized.allocate(body.clone()).await);
    let batch = authorized
        .send(
            "POST",
            "/api/v2/captures/batch",
            Some(json!({ "operations": [] }).to_string()),
        )
        .await;
    assert_eq!(batch.status, 200, "{batch:?}");
    for path in ["/-/ping", "/-/ready", "/openapi.yaml"] {
        assert_eq!(anonymous.get(path).await.status, 200, "{path}");
    }
    server.stop().await;
}

#[tokio::test]
async fn ping_ready_and_the_spec() {
    let server = TestServer::start().await;
    let c = &server.client;
    let ping = c.get("/-/ping").await;
    assert_eq!(ping.status, 200);
    assert_eq!(ping.json, json!({ "message": "pong" }));
    let ready = c.get("/-/ready").await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json["status"], "ready");
    let spec = c.get("/openapi.yaml").await;
    assert_eq!(spec.status, 200);
    assert_eq!(spec.content_type(), "application/yaml");
    assert_eq!(spec.text, idempotency_server::api::OPENAPI_YAML);
    assert!(spec.text.contains("/api/v2/captures:"));
    server.stop().await;
}

#[tokio::test]
async fn unknown_routes_and_methods_are_problems() {
    let server = TestServer::start().await;
    let c = &server.client;
    let answer = c.get("/api/v2/nothing").await;
    answer.assert_problem(404, problem_type::ABOUT_BLANK);
    let answer = c.get("/api/v2/captures").await;
    answer.assert_problem(405, problem_type::ABOUT_BLANK);
    let allow = answer.header("allow").unwrap_or("");
    for method in ["PUT", "POST", "DELETE"] {
        assert!(allow.contains(method), "{allow}");
    }
    let answer = c.send("POST", "/-/ping", None).await;
    answer.assert_problem(405, problem_type::ABOUT_BLANK);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_allocations_of_one_key_give_one_202() {
    let server = TestServer::start().await;
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let c = server.client.clone();
        calls.spawn(async move {
            c.allocate(json!({ "idempotency_key": "race" }))
                .await
                .status
        });
    }
    let mut statuses = Vec::new();
    while let Some(status) = calls.join_next().await {
        statuses.push(status.unwrap());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 202).count(), 1);
    assert_eq!(statuses.iter().filter(|s| **s == 409).count(), 63);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_allocations_over_a_thousand_keys_give_one_202_each() {
    let server = TestServer::start().await;
    // At most 256 calls in flight (each is a connection, and machines limit open files); the
    // three calls for one key are queued together, so they are in flight together.
    let permits = Arc::new(tokio::sync::Semaphore::new(256));
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..1000 {
        for _ in 0..3 {
            let c = server.client.clone();
            let permits = permits.clone();
            calls.spawn(async move {
                let _permit = permits.acquire().await.unwrap();
                let answer = c
                    .allocate(json!({ "idempotency_key": format!("key-{i}") }))
                    .await;
                (i, answer.status)
            });
        }
    }
    let mut leases = vec![0; 1000];
    while let Some(joined) = calls.join_next().await {
        let (i, status) = joined.unwrap();
        match status {
            202 => leases[i] += 1,
            409 => {}
            other => panic!("key-{i}: {other}"),
        }
    }
    assert!(leases.iter().all(|n| *n == 1), "{leases:?}");
    server.stop().await;
}

/// A store that is down: every operation fails.
struct DownStore;

#[async_trait]
impl Store for DownStore {
    fn name(&self) -> &'static str {
        "down"
    }
    async fn allocate(&self, _: Allocate) -> Result<AllocateOutcome, StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }
    async fn record(&self, _: Record) -> Result<RecordOutcome, StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }
    async fn release(&self, _: Release) -> Result<ReleaseOutcome, StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }
    async fn ready(&self) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }
    async fn shutdown(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[tokio::test]
async fn a_store_that_is_down_is_503_and_not_ready() {
    let server = TestServer::start_on(Arc::new(DownStore)).await;
    let c = &server.client;
    let answer = c.get("/-/ready").await;
    answer.assert_problem(503, problem_type::STORE_UNAVAILABLE);
    let answer = c.allocate(json!({ "idempotency_key": "k" })).await;
    answer.assert_problem(503, problem_type::STORE_UNAVAILABLE);
    assert_eq!(answer.retry_after(), 1);
    // A batch is answered; each item the store could not apply is its own 503.
    let batch = c
        .send(
            "POST",
            "/api/v2/captures/batch",
            Some(
                json!({ "operations": [
                    { "op": "release", "idempotency_key": "k" },
                    { "op": "release", "idempotency_key": "==" },
                ]})
                .to_string(),
            ),
        )
        .await;
    let r = results(&batch);
    assert_eq!(r[0].0, 503);
    assert_eq!(r[0].1["type"], problem_type::STORE_UNAVAILABLE);
    assert_eq!(r[1].0, 422, "bad input is still the caller's fault");
    // Bad input is still the caller's fault, not the store's.
    let answer = c.allocate(json!({ "idempotency_key": "==" })).await;
    assert_eq!(answer.status, 422);
    assert_eq!(c.get("/-/ping").await.status, 200);
    server.stop().await;
}

/// The embedded store behind the MongoDB store's own size check of a record
/// (`completed_document_size` against `MAX_DOCUMENT_BYTES`, as `MongoStore::record` applies
/// it before sending anything): what the API answers for a capture that passes the body limit
/// yet would pass MongoDB's 16 MiB, without a MongoDB.
struct MongoSized {
    inner: idempotency_server::EmbeddedStore,
    _dir: tempfile::TempDir,
}

#[async_trait]
impl Store for MongoSized {
    fn name(&self) -> &'static str {
        "mongo-sized"
    }
    async fn allocate(&self, request: Allocate) -> Result<AllocateOutcome, StoreError> {
        self.inner.allocate(request).await
    }
    async fn record(&self, request: Record) -> Result<RecordOutcome, StoreError> {
        use idempotency_server::store::mongodb::{
            MAX_DOCUMENT_BYTES, capture_document, completed_document_size,
        };
        let capture = capture_document(&request.capture)?;
        if completed_document_size(&request.key, &capture)? > MAX_DOCUMENT_BYTES {
            return Ok(RecordOutcome::TooLarge {
                limit: MAX_DOCUMENT_BYTES,
            });
        }
        self.inner.record(request).await
    }
    async fn release(&self, request: Release) -> Result<ReleaseOutcome, StoreError> {
        self.inner.release(request).await
    }
    async fn ready(&self) -> Result<(), StoreError> {
        self.inner.ready().await
    }
    async fn shutdown(&self) -> Result<(), StoreError> {
        self.inner.shutdown().await
    }
}

#[tokio::test]
async fn a_capture_too_large_for_the_store_is_413_and_the_key_stays_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let inner = idempotency_server::EmbeddedStore::open(idempotency_server::EmbeddedOptions::new(
        dir.path(),
    ))
    .unwrap();
    let server = TestServer::start_on(Arc::new(MongoSized { inner, _dir: dir })).await;
    let c = &server.client;
    let token = c.lease("YmlnaGVhZGVycw").await;
    // 1.5 million empty values of one header: about 4.5 MB of JSON, within the default 8 MiB
    // body limit, but every value is an element of its own in BSON (type, index, length,
    // terminator): about 21 MB.
    let values = vec![""; 1_500_000];
    let crowded = json!({
        "response_status": 200,
        "response_body": "",
        "response_headers": [{ "key": "x-many", "value": values }],
    });
    let body =
        json!({ "idempotency_key": "YmlnaGVhZGVycw", "lease_token": token, "response": crowded });
    assert!(body.to_string().len() < 8 << 20);
    let answer = c.record(body).await;
    let detail = answer.assert_problem(413, problem_type::PAYLOAD_TOO_LARGE);
    assert!(detail.contains("16777216"), "{detail}");
    // Nothing changed: the lease still holds the key, and its holder can record a smaller
    // response (or release it).
    let again = c
        .allocate(json!({ "idempotency_key": "YmlnaGVhZGVycw" }))
        .await;
    assert_eq!(again.status, 409, "{again:?}");
    let recorded = c
        .record(json!({ "idempotency_key": "YmlnaGVhZGVycw", "lease_token": token, "response": response("small") }))
        .await;
    assert_eq!(recorded.status, 200, "{recorded:?}");
    server.stop().await;
}
