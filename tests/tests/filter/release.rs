//! Responses that are not stored release the key, so that a retry executes again: a 503, a
//! response over `max_capture_bytes` (which passes untouched), an upstream that breaks
//! mid-response, a response header that is not UTF-8.

use idempotency_tests::{Mode, Reply};
use serde_json::json;

use crate::both_modes;
use crate::support::{E2e, metric};

async fn a_503_from_the_upstream_releases_the_key_and_the_retry_executes_again(mode: Mode) {
    let t = E2e::start(mode, json!({})).await;
    t.api.reply(
        "/charge",
        Reply::new(503).header("retry-after", "1").body("busy"),
    );
    let r = t.send("/charge", "\"k-503\"", "{}").await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (503, "busy"),
        "passes untouched"
    );
    t.tick().await;
    assert_eq!(t.metric(metric::RELEASED), 1);
    t.api.reply("/charge", Reply::new(201).body("charged"));
    let retry = t.send("/charge", "\"k-503\"", "{}").await;
    assert_eq!((retry.status, retry.text().as_str()), (201, "charged"));
    assert_eq!(
        retry.header("idempotent-replayed"),
        None,
        "executed, not replayed"
    );
    assert_eq!(t.api.count("/charge"), 2);
    t.tick().await;
    let again = t.send("/charge", "\"k-503\"", "{}").await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(t.api.count("/charge"), 2);
    t.finish().await;
}

async fn an_oversized_response_passes_untouched_and_releases_the_key(mode: Mode) {
    let t = E2e::start(mode, json!({"max_capture_bytes": 1024})).await;
    let big: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    for (path, reply) in [
        ("/export", Reply::new(200).body(big.clone())),
        // Without Content-Length the size shows only as the body passes.
        ("/stream", Reply::new(200).body(big.clone()).chunked(1000)),
    ] {
        t.api.reply(path, reply);
        let r = t.send(path, "\"k-big\"", "{}").await;
        assert_eq!((r.status, r.body.len()), (200, big.len()), "{path}");
        assert_eq!(r.body, big, "{path}: untouched");
        t.tick().await;
        let retry = t.send(path, "\"k-big\"", "{}").await;
        assert_eq!(retry.body, big);
        assert_eq!(
            retry.header("idempotent-replayed"),
            None,
            "{path}: executed again"
        );
        assert_eq!(t.api.count(path), 2, "{path}");
        t.tick().await;
    }
    assert_eq!(t.metric(metric::RELEASED), 4);
    assert_eq!(t.metric(metric::RECORDED), 0);
    t.finish().await;
}

async fn an_upstream_that_breaks_mid_response_releases_the_key(mode: Mode) {
    let t = E2e::start(mode, json!({})).await;
    t.api.reply(
        "/broken",
        Reply::new(200).body(vec![b'x'; 2000]).truncate(500),
    );
    let r = t.post("/broken", Some("\"k-broken\""), "{}").send().await;
    assert!(r.is_err(), "the client sees a broken response");
    t.tick().await;
    assert_eq!(t.metric(metric::RELEASED), 1);
    assert_eq!(t.metric(metric::RECORDED), 0);
    t.api.reply("/broken", Reply::new(200).body("whole"));
    let retry = t.send("/broken", "\"k-broken\"", "{}").await;
    assert_eq!((retry.status, retry.text().as_str()), (200, "whole"));
    assert_eq!(t.api.count("/broken"), 2);
    t.finish().await;
}

async fn a_response_header_that_is_not_utf8_passes_and_releases_the_key(mode: Mode) {
    let t = E2e::start(mode, json!({})).await;
    t.api.reply(
        "/files",
        Reply::new(201)
            .header("content-disposition", b"attachment; filename=caf\xe9.txt")
            .body("file"),
    );
    let r = t.send("/files", "\"k-latin1\"", "{}").await;
    assert_eq!((r.status, r.text().as_str()), (201, "file"));
    let raw = r
        .headers
        .iter()
        .find(|(k, _)| k == "content-disposition")
        .map(|(_, v)| v.clone());
    assert!(raw.is_some(), "the header reaches the client");
    t.tick().await;
    // The backend stores text: this response cannot be replayed exactly, so it is not stored.
    assert_eq!(t.metric(metric::RELEASED), 1);
    let retry = t.send("/files", "\"k-latin1\"", "{}").await;
    assert_eq!(retry.status, 201);
    assert_eq!(t.api.count("/files"), 2);
    t.finish().await;
}

async fn store_status_decides_what_is_stored(mode: Mode) {
    for (store_status, stored) in [(json!(["100-499"]), true), (json!(["2xx"]), false)] {
        let t = E2e::start(mode, json!({"store_status": store_status})).await;
        t.api
            .reply("/items/9", Reply::new(404).body("no such item"));
        let r = t.send("/items/9", "\"k-404\"", "{}").await;
        assert_eq!(r.status, 404);
        t.tick().await;
        let retry = t.send("/items/9", "\"k-404\"", "{}").await;
        assert_eq!((retry.status, retry.text().as_str()), (404, "no such item"));
        let replayed = retry.header("idempotent-replayed") == Some("true");
        assert_eq!(replayed, stored, "{store_status}");
        assert_eq!(t.api.count("/items/9"), if stored { 1 } else { 2 });
        t.finish().await;
    }
}

both_modes!(
    store_status_decides_what_is_stored,
    a_503_from_the_upstream_releases_the_key_and_the_retry_executes_again,
    an_oversized_response_passes_untouched_and_releases_the_key,
    an_upstream_that_breaks_mid_response_releases_the_key,
    a_response_header_that_is_not_utf8_passes_and_releases_the_key,
);
