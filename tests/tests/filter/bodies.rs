//! Request bodies: over `max_request_body_bytes` → 413 (by Content-Length; on Envoy also
//! streamed past the limit); on Kong a body nginx spooled to disk → 413 naming the setting
//! to raise, and a body of unknown length (chunked) → 411 since Kong gives no callback for
//! an empty one; on Envoy chunked bodies, empty or not, are fingerprinted whole.

use idempotency_tests::{Mode, Reply};
use serde_json::json;

use crate::both_modes;
use crate::support::{E2e, detail_of, metric, problem, problem_of};

async fn a_body_over_max_request_body_bytes_gets_413(mode: Mode) {
    let t = E2e::setup(mode)
        .body_fingerprinted()
        .config(json!({"max_request_body_bytes": 1024}))
        .host(|b| b.request_chunk_size(256))
        .start()
        .await;
    let r = t.send("/upload", "\"k-413\"", vec![b'a'; 1025]).await;
    assert_eq!(r.status, 413);
    assert_eq!(
        problem_of(&r),
        (problem::PAYLOAD_TOO_LARGE.to_string(), 413)
    );
    // At the limit it goes through.
    let r = t.send("/upload", "\"k-413\"", vec![b'a'; 1024]).await;
    assert_eq!(r.status, 200);
    let mut expected_413 = 1;
    if mode == Mode::Envoy {
        // Streamed (chunked, no Content-Length): refused once the bytes pass the limit.
        let r = t
            .post("/upload", Some("\"k-413-chunked\""), vec![b'b'; 4096])
            .chunked(512)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status, 413);
        assert_eq!(problem_of(&r).0, problem::PAYLOAD_TOO_LARGE);
        expected_413 += 1;
    }
    assert_eq!(
        t.api.count("/upload"),
        1,
        "no oversized body reached the upstream"
    );
    assert_eq!(t.metric(metric::TOO_LARGE), expected_413);
    t.finish().await;
}

async fn chunked_bodies_are_fingerprinted_on_envoy_and_refused_411_on_kong(mode: Mode) {
    let t = E2e::setup(mode).body_fingerprinted().start().await;
    t.api.reply("/events", Reply::new(201).body("stored"));
    for (key, body) in [("\"k-chunked\"", &b"{\"n\":1}"[..]), ("\"k-empty\"", b"")] {
        let r = t
            .post("/events", Some(key), body)
            .chunked(3)
            .send()
            .await
            .unwrap();
        match mode {
            Mode::Envoy => {
                assert_eq!(r.status, 201, "{key}");
                t.tick().await;
                let retry = t
                    .post("/events", Some(key), body)
                    .chunked(3)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(retry.header("idempotent-replayed"), Some("true"), "{key}");
                // The body is in the fingerprint: another one is refused.
                let other = t
                    .post("/events", Some(key), "x")
                    .chunked(3)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(other.status, 422, "{key}");
            }
            Mode::Ngx => {
                assert_eq!(r.status, 411, "{key}");
                assert_eq!(problem_of(&r), (problem::LENGTH_REQUIRED.to_string(), 411));
                assert!(detail_of(&r).contains("Content-Length"));
            }
        }
    }
    match mode {
        Mode::Envoy => assert_eq!(t.api.count("/events"), 2),
        Mode::Ngx => {
            assert_eq!(t.api.count("/events"), 0, "never forwarded unallocated");
            assert_eq!(t.metric(metric::LENGTH_REQUIRED), 2);
            // With Content-Length the same request goes through.
            let r = t.send("/events", "\"k-chunked\"", "{\"n\":1}").await;
            assert_eq!(r.status, 201);
        }
    }
    t.finish().await;
}

async fn without_fingerprint_a_chunked_body_needs_no_length(mode: Mode) {
    let t = E2e::start(mode, json!({"fingerprint": false})).await;
    t.api.reply("/events", Reply::new(201).body("stored"));
    let r = t
        .post("/events", Some("\"k-nofp\""), "{\"n\":1}")
        .chunked(3)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    t.tick().await;
    let retry = t
        .post("/events", Some("\"k-nofp\""), "{\"n\":1}")
        .chunked(3)
        .send()
        .await
        .unwrap();
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(t.api.count("/events"), 1);
    t.finish().await;
}

async fn ngx_a_body_spooled_to_disk_gets_413_naming_the_kong_setting(mode: Mode) {
    let t = E2e::setup(mode)
        .host(|b| b.client_body_buffer_size(1024))
        .start()
        .await;
    let r = t.send("/upload", "\"k-spooled\"", vec![b'c'; 2048]).await;
    match mode {
        Mode::Ngx => {
            assert_eq!(r.status, 413);
            assert_eq!(problem_of(&r), (problem::BODY_SPOOLED.to_string(), 413));
            assert!(
                detail_of(&r).contains("nginx_http_client_body_buffer_size"),
                "{}",
                detail_of(&r)
            );
            assert_eq!(t.api.count("/upload"), 0);
            assert_eq!(t.metric(metric::TOO_LARGE), 1);
        }
        // Envoy has no such buffer: the body is fingerprinted and forwarded.
        Mode::Envoy => {
            assert_eq!(r.status, 200);
            assert_eq!(t.api.count("/upload"), 1);
        }
    }
    t.finish().await;
}

both_modes!(
    a_body_over_max_request_body_bytes_gets_413,
    chunked_bodies_are_fingerprinted_on_envoy_and_refused_411_on_kong,
    without_fingerprint_a_chunked_body_needs_no_length,
    ngx_a_body_spooled_to_disk_gets_413_naming_the_kong_setting,
);
