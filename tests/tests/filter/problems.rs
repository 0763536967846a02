//! The filter's own answers: 422 for a key reused with another request, 400 for a missing
//! key (`require_key`) or a malformed one, with README's problem types; a request without a
//! key passes untouched when the key is optional.

use idempotency_tests::{Mode, Reply};
use serde_json::json;

use crate::both_modes;
use crate::support::{E2e, metric, problem, problem_of};

async fn a_different_body_with_the_same_key_gets_422(mode: Mode) {
    let t = E2e::setup(mode).body_fingerprinted().start().await;
    t.api.reply("/orders", Reply::new(201).body("created"));
    let first = t.send("/orders", "\"k-422\"", "{\"qty\":1}").await;
    assert_eq!(first.status, 201);
    // While the first is held (Kong: not yet recorded) and once it is recorded.
    for when in ["held", "recorded"] {
        let other = t.send("/orders", "\"k-422\"", "{\"qty\":2}").await;
        assert_eq!(other.status, 422, "{when}: {}", other.text());
        assert_eq!(problem_of(&other), (problem::MISMATCH.to_string(), 422));
        t.tick().await;
    }
    // Another query string is another request too (the fingerprint has the path with query).
    let other = t
        .send("/orders?dry_run=1", "\"k-422\"", "{\"qty\":1}")
        .await;
    assert_eq!(other.status, 422);
    assert_eq!(t.api.count("/orders"), 1);
    assert_eq!(t.metric(metric::MISMATCH), 3);
    t.finish().await;
}

async fn a_missing_key_with_require_key_gets_400(mode: Mode) {
    let t = E2e::start(mode, json!({"require_key": true})).await;
    let r = t.post("/orders", None, "{}").send().await.unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(problem_of(&r), (problem::MISSING_KEY.to_string(), 400));
    // Methods outside `methods` are not concerned.
    let r = t.host().client().get("/orders").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(t.api.count("/orders"), 1);
    assert_eq!(t.metric(metric::MISSING_KEY), 1);
    t.finish().await;
}

async fn without_require_key_a_request_without_a_key_passes_untouched(mode: Mode) {
    let t = E2e::start(mode, json!({})).await;
    t.api.reply("/orders", Reply::new(201).body("created"));
    for _ in 0..2 {
        let r = t.post("/orders", None, "{}").send().await.unwrap();
        assert_eq!((r.status, r.text().as_str()), (201, "created"));
        assert_eq!(r.header("idempotent-replayed"), None);
    }
    assert_eq!(t.api.count("/orders"), 2, "no idempotency without a key");
    assert_eq!(t.metric(metric::NO_KEY), 2);
    assert_eq!(t.metric(metric::ALLOCATED), 0);
    t.finish().await;
}

async fn a_malformed_key_gets_400(mode: Mode) {
    let t = E2e::start(mode, json!({})).await;
    let too_long = format!("\"{}\"", "k".repeat(256));
    let malformed = [
        "\"\"",            // empty sf-string
        "\"unterminated",  // bad sf-string
        "\"a\\qb\"",       // bad escape
        "caf\u{e9}",       // not ASCII (sent as UTF-8 bytes)
        too_long.as_str(), // over 255 characters
    ];
    for key in malformed {
        let r = t.send("/orders", key, "{}").await;
        assert_eq!(r.status, 400, "{key:?}: {}", r.text());
        assert_eq!(
            problem_of(&r),
            (problem::INVALID_KEY.to_string(), 400),
            "{key:?}"
        );
    }
    // The header twice.
    let r = t
        .post("/orders", Some("\"a\""), "{}")
        .header("idempotency-key", "\"b\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(problem_of(&r), (problem::INVALID_KEY.to_string(), 400));
    // A bare token is accepted, as the old plugin did.
    let r = t
        .send("/orders", "8e03978e-40d5-43e8-bc93-6894a57f9324", "{}")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        t.api.count("/orders"),
        1,
        "no malformed key reached the upstream"
    );
    assert_eq!(t.metric(metric::INVALID_KEY), (malformed.len() + 1) as i64);
    t.finish().await;
}

both_modes!(
    a_different_body_with_the_same_key_gets_422,
    a_missing_key_with_require_key_gets_400,
    without_require_key_a_request_without_a_key_passes_untouched,
    a_malformed_key_gets_400,
);
