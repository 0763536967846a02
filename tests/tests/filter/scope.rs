//! The key's scope: two clients (two `authorization` values) that send the same key never see
//! each other's responses; the route is part of the scope too.

use idempotency_tests::{Mode, Reply};
use serde_json::json;

use crate::both_modes;
use crate::support::E2e;

async fn the_same_key_under_two_authorization_values_executes_twice_without_cross_replay(
    mode: Mode,
) {
    let t = E2e::start(mode, json!({})).await;
    t.api.reply(
        "/orders",
        Reply::new(201)
            .header("content-type", "text/plain")
            .body("created"),
    );
    let as_client = |auth: &'static [u8]| {
        t.post("/orders", Some("\"shared-key\""), "{\"qty\":1}")
            .header_bytes("authorization", auth)
    };
    // Alice, Bob, and a value that is not UTF-8 (hashed as bytes, never confused with
    // another that would decode the same).
    let clients: [&'static [u8]; 4] = [
        b"Bearer alice",
        b"Bearer bob",
        b"Bearer caf\xe9",
        b"Bearer caf\xe8",
    ];
    for auth in clients {
        let r = as_client(auth).send().await.unwrap();
        assert_eq!(r.status, 201);
        assert_eq!(r.header("idempotent-replayed"), None, "{auth:?}: executed");
    }
    assert_eq!(
        t.api.count("/orders"),
        clients.len(),
        "one execution per client"
    );
    let seen: Vec<Vec<u8>> = t
        .api
        .requests()
        .iter()
        .map(|s| {
            s.headers
                .iter()
                .find(|(k, _)| k == "authorization")
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(
        seen,
        clients.map(<[u8]>::to_vec).to_vec(),
        "each under its own credentials"
    );
    t.tick().await;
    // Each retry replays its own client's response, and only that one.
    for auth in clients {
        let r = as_client(auth).send().await.unwrap();
        assert_eq!((r.status, r.text().as_str()), (201, "created"));
        assert_eq!(r.header("idempotent-replayed"), Some("true"), "{auth:?}");
    }
    // The same key without credentials, or on another route, is yet another key.
    let r = t.send("/orders", "\"shared-key\"", "{\"qty\":1}").await;
    assert_eq!(r.header("idempotent-replayed"), None);
    let r = t
        .post("/orders/bulk", Some("\"shared-key\""), "{\"qty\":1}")
        .header("authorization", "Bearer alice")
        .send()
        .await
        .unwrap();
    assert_eq!(r.header("idempotent-replayed"), None);
    assert_eq!(t.api.total(), clients.len() + 2);
    t.finish().await;
}

both_modes!(the_same_key_under_two_authorization_values_executes_twice_without_cross_replay);
