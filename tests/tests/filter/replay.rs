//! The first request executes once; its retry is replayed byte for byte.

use idempotency_tests::{Mode, Reply};
use serde_json::json;

use crate::both_modes;
use crate::support::{E2e, entity_headers, metric};

/// A binary body with 0x00 and 0xFF that ends with a line feed of its own.
fn binary_body() -> Vec<u8> {
    let mut b: Vec<u8> = (0..=255u8).rev().collect();
    b.extend_from_slice(b"\x00\xff\n");
    b
}

async fn first_request_executes_once_and_its_retry_is_replayed_byte_for_byte(mode: Mode) {
    let t = E2e::start(mode, json!({})).await;
    // No Content-Type: a host default must not appear in the replay either.
    t.api.reply(
        "/orders",
        Reply::new(201)
            .header("link", "</orders/1/items>; rel=related")
            .header("set-cookie", "session=s3cret; Path=/")
            .header("link", "</orders/1/invoice>; rel=related")
            .header("location", "/orders/1")
            .body(binary_body()),
    );
    let first = t
        .send(
            "/orders",
            "\"8e03978e-40d5-43e8-bc93-6894a57f9324\"",
            "{\"qty\":1}",
        )
        .await;
    assert_eq!(first.status, 201);
    assert_eq!(first.body, binary_body());
    assert_eq!(
        first.header("set-cookie"),
        Some("session=s3cret; Path=/"),
        "the original response keeps its cookie"
    );
    assert_eq!(first.header("idempotent-replayed"), None);
    assert_eq!(t.api.count("/orders"), 1);
    // Kong records from the tick; Envoy already did, inline.
    t.tick().await;

    let retry = t
        .send(
            "/orders",
            "\"8e03978e-40d5-43e8-bc93-6894a57f9324\"",
            "{\"qty\":1}",
        )
        .await;
    assert_eq!(
        t.api.count("/orders"),
        1,
        "the retry does not reach the upstream"
    );
    assert_eq!(retry.status, 201);
    assert_eq!(
        retry.body,
        binary_body(),
        "byte for byte: no extra line feed"
    );
    assert_eq!(
        retry.header_all("link"),
        vec![
            "</orders/1/items>; rel=related",
            "</orders/1/invoice>; rel=related"
        ],
        "a repeated header keeps every value, in order"
    );
    assert_eq!(
        retry.header("set-cookie"),
        None,
        "a cookie is a credential: never stored, never replayed"
    );
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(
        retry.header("content-type"),
        None,
        "no defaulted Content-Type"
    );
    if let Some(cl) = retry.header("content-length") {
        assert_eq!(cl, retry.body.len().to_string(), "no stale Content-Length");
    }
    let mut expected = entity_headers(&first);
    expected.retain(|(n, _)| n != "set-cookie");
    expected.push(("idempotent-replayed".into(), "true".into()));
    // Every header; the values of a repeated name in order (the order between different
    // names carries no meaning, and ngx's fix-up re-adds a repeated header last).
    let by_name = |mut h: Vec<(String, String)>| {
        h.sort_by(|a, b| a.0.cmp(&b.0));
        h
    };
    assert_eq!(
        by_name(entity_headers(&retry)),
        by_name(expected),
        "every header"
    );

    // And again: a replay is repeatable.
    let again = t
        .send(
            "/orders",
            "\"8e03978e-40d5-43e8-bc93-6894a57f9324\"",
            "{\"qty\":1}",
        )
        .await;
    assert_eq!((again.status, again.body.clone()), (201, binary_body()));
    assert_eq!(t.api.count("/orders"), 1);
    assert_eq!(t.metric(metric::ALLOCATED), 1);
    assert_eq!(t.metric(metric::RECORDED), 1);
    assert_eq!(t.metric(metric::REPLAYED), 2);
    t.finish().await;
}

async fn strip_on_replay_and_an_empty_replay_header(mode: Mode) {
    let t = E2e::start(
        mode,
        json!({"strip_on_replay": ["X-Request-Cost"], "replay_header": ""}),
    )
    .await;
    t.api.reply(
        "/login",
        Reply::new(200)
            .header("content-type", "application/json")
            .header("set-cookie", "session=1")
            .header("x-request-cost", "3")
            .body("{\"ok\":true}"),
    );
    let first = t.send("/login", "\"k-strip\"", "{}").await;
    assert_eq!(
        first.header("x-request-cost"),
        Some("3"),
        "the original keeps it"
    );
    t.tick().await;
    let retry = t.send("/login", "\"k-strip\"", "{}").await;
    assert_eq!(
        (retry.status, retry.text().as_str()),
        (200, "{\"ok\":true}")
    );
    assert_eq!(retry.header("x-request-cost"), None, "stripped on replay");
    assert_eq!(retry.header("set-cookie"), None, "never replayed");
    assert_eq!(retry.header("content-type"), Some("application/json"));
    assert_eq!(
        retry.header("idempotent-replayed"),
        None,
        "no replay header"
    );
    assert_eq!(t.api.count("/login"), 1);
    assert_eq!(t.metric(metric::REPLAYED), 1);
    t.finish().await;
}

both_modes!(
    first_request_executes_once_and_its_retry_is_replayed_byte_for_byte,
    strip_on_replay_and_an_empty_replay_header,
);
