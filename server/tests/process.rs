//! The real binary: durability across SIGKILL, the data-dir lock, invalid configuration,
//! start-up failures and the graceful shutdown on SIGTERM.

mod common;

use std::collections::HashMap;

use common::{ServerProcess, response, run_to_exit};
use serde_json::json;

/// Only non-empty lines: what an operator reads.
fn lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| !l.trim().is_empty()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]).await;
    let mut calls = tokio::task::JoinSet::new();
    // Recorded keys, allocated-only keys, released keys: all at once.
    for i in 0..300 {
        let c = server.client.clone();
        calls.spawn(async move {
            let key = format!("rec-{i}");
            let token = c.lease(&key).await;
            let answer = c
                .record(json!({ "idempotency_key": key, "lease_token": token, "response": response(&key) }))
                .await;
            assert_eq!(answer.status, 200, "{answer:?}");
            (key, "recorded")
        });
    }
    for i in 0..50 {
        let c = server.client.clone();
        calls.spawn(async move {
            let key = format!("held-{i}");
            c.lease(&key).await;
            (key, "held")
        });
        let c = server.client.clone();
        calls.spawn(async move {
            let key = format!("released-{i}");
            let token = c.lease(&key).await;
            let answer = c
                .release(json!({ "idempotency_key": key, "lease_token": token }))
                .await;
            assert_eq!(answer.status, 200, "{answer:?}");
            (key, "released")
        });
    }
    let mut acknowledged = HashMap::new();
    while let Some(joined) = calls.join_next().await {
        let (key, state) = joined.unwrap();
        acknowledged.insert(key, state);
    }
    // Right after the last answer: no flush, no shutdown.
    server.kill().await;

    let server = ServerProcess::start(dir.path(), &[]).await;
    let c = &server.client;
    for (key, state) in &acknowledged {
        let answer = c.allocate(json!({ "idempotency_key": key })).await;
        match *state {
            "recorded" => {
                assert_eq!(answer.status, 200, "{key}: {answer:?}");
                assert_eq!(answer.json["response"], response(key));
            }
            "held" => assert_eq!(answer.status, 409, "{key}: {answer:?}"),
            _ => assert_eq!(answer.status, 202, "{key}: {answer:?}"),
        }
    }
    assert_eq!(acknowledged.len(), 400);
}

#[tokio::test]
async fn a_second_process_on_the_same_data_dir_fails_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let first = ServerProcess::start(dir.path(), &[]).await;
    let data_dir = dir.path().to_str().unwrap();
    let (status, stderr) =
        run_to_exit(&["--listen", "127.0.0.1:0", "--data-dir", data_dir], &[]).await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    let lines = lines(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains(data_dir), "{stderr}");
    assert!(
        lines[0].contains(&format!("pid {}", first.pid())),
        "{stderr}"
    );
    // The first one is unaffected.
    assert_eq!(first.client.get("/-/ready").await.status, 200);
}

#[tokio::test]
async fn an_invalid_configuration_is_one_line_and_exit_status_2() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    // (flags, environment, what the line must name)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (vec!["--retention", "soon"], vec![], "--retention"),
        (vec![], vec![("RETENTION", "forever")], "--retention"),
        (vec!["--listen", "nowhere"], vec![], "--listen"),
        (vec!["--store", "floppy"], vec![], "floppy"),
        (vec!["--bogus"], vec![], "--bogus"),
        (vec!["--default-lease", "25h"], vec![], "--max-lease"),
        (
            vec![],
            vec![("DEFAULT_LEASE", "2h"), ("MAX_LEASE", "1m")],
            "--max-lease",
        ),
        (vec!["--body-limit", "lots"], vec![], "--body-limit"),
        (
            vec![],
            vec![("RUST_LOG", "idempotency_server=loudest")],
            "RUST_LOG",
        ),
        (vec!["--store", "redis"], vec![], "REDIS_URL"),
        (vec![], vec![("STORE", "mongodb")], "MONGODB_URI"),
        (
            vec!["--store", "redis", "--redis-url", "rediss://cache:6380"],
            vec![],
            "rediss://",
        ),
        (
            vec![],
            vec![("MONGODB_URI", "mongodb://db"), ("BODY_LIMIT", "64MiB")],
            "--body-limit",
        ),
    ];
    for (args, env, mentions) in cases {
        let mut all = vec!["--data-dir", data_dir, "--listen", "127.0.0.1:0"];
        all.extend_from_slice(&args);
        let (status, stderr) = run_to_exit(&all, &env).await;
        assert_eq!(status.code(), Some(2), "{args:?} {env:?}: {stderr}");
        let lines = lines(&stderr);
        assert_eq!(lines.len(), 1, "{args:?} {env:?}: {stderr}");
        assert!(
            lines[0].starts_with("idempotency-server: invalid configuration: "),
            "{stderr}"
        );
        assert!(lines[0].contains(mentions), "{args:?} {env:?}: {stderr}");
    }
}

#[tokio::test]
async fn a_port_in_use_is_one_line_and_exit_status_1() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (status, stderr) = run_to_exit(
        &[
            "--listen",
            &addr,
            "--data-dir",
            dir.path().to_str().unwrap(),
        ],
        &[("RUST_LOG", "off")],
    )
    .await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    let lines = lines(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains(&addr), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_request_in_flight_then_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(dir.path(), &[]).await;
    let c = server.client.clone();
    c.lease("held").await;
    // A call in flight: it waits (up to 20 s) for the holder, who never records.
    let waiter = {
        let c = c.clone();
        tokio::spawn(async move {
            c.allocate(json!({ "idempotency_key": "held", "wait_ms": 20_000 }))
                .await
        })
    };
    // The server says it is waiting: the request is in flight. (It names the key by its
    // digest, the one the filter logs too, never by itself.)
    let waiting = server
        .log_line(|l| {
            l["fields"]["message"] == "waiting for the holder of the key"
                && l["fields"]["key"] == idempotency_spec::key_digest("held")
        })
        .await;
    let digest = waiting["fields"]["key"].as_str().unwrap_or_default();
    assert_eq!(digest.len(), 12, "{waiting}");
    assert!(!digest.contains("held"), "{waiting}");
    server.signal(libc::SIGTERM);
    // The request in flight gets its full answer (the key's state now: still in flight)...
    let answer = waiter.await.unwrap();
    answer.assert_problem(409, idempotency_spec::problem_type::IN_FLIGHT);
    // ...and the process stops cleanly, having flushed and closed the store.
    let status = common::wait_for_exit(&mut server.child).await;
    assert_eq!(status.code(), Some(0));
    server
        .log_line(|l| l["fields"]["message"] == "stopped")
        .await;
    drop(server);

    // The allocation made before the shutdown is still there.
    let server = ServerProcess::start(dir.path(), &[]).await;
    let answer = server
        .client
        .allocate(json!({ "idempotency_key": "held" }))
        .await;
    assert_eq!(answer.status, 409);
}

/// At the most verbose level (`RUST_LOG=trace`), through every endpoint and its failures, the
/// binary never logs a key, a lease token, a stored body, or a bearer token (right or wrong).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_line_at_any_level_holds_a_key_a_token_or_a_body() {
    const TOKEN: &str = "canary-api-token-5e1f";
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start_with_env(
        dir.path(),
        &[],
        &[("API_TOKEN", TOKEN), ("RUST_LOG", "trace")],
    )
    .await;
    let c = server.client.with_token(TOKEN);
    let key = "canary-key-0d6b9a";
    let body = "canary-body-c0ffee";
    let capture = json!({
        "response_status": 201,
        "response_body": body,
        "response_headers": [{"key": "Content-Type", "value": "text/plain"}]
    });
    let lease = c
        .allocate(json!({"idempotency_key": key, "fingerprint": "canary-print-1"}))
        .await
        .lease_token();
    // A duplicate, a mismatch, a wait that times out, a release with a wrong token.
    c.allocate(json!({"idempotency_key": key, "fingerprint": "canary-print-1", "wait_ms": 50}))
        .await
        .assert_problem(409, idempotency_spec::problem_type::IN_FLIGHT);
    assert_eq!(
        c.allocate(json!({"idempotency_key": key, "fingerprint": "canary-print-2"}))
            .await
            .status,
        422
    );
    assert_eq!(
        c.release(json!({"idempotency_key": key, "lease_token": "canary-wrong-lease"}))
            .await
            .status,
        403,
        "another lease's token"
    );
    let recorded = c
        .record(json!({"idempotency_key": key, "lease_token": lease, "response": capture}))
        .await;
    assert_eq!(recorded.status, 200, "{recorded:?}");
    assert_eq!(
        c.allocate(json!({"idempotency_key": key})).await.status,
        200,
        "replayed"
    );
    // A batch, a record of a key never allocated, malformed bodies, a wrong token.
    let batch = c
        .send(
            "POST",
            "/api/v2/captures/batch",
            Some(
                json!({"operations": [
                    {"op": "record", "idempotency_key": "canary-unallocated-1", "response": capture},
                    {"op": "release", "idempotency_key": "canary-unallocated-2"}
                ]})
                .to_string(),
            ),
        )
        .await;
    assert_eq!(batch.status, 200, "{batch:?}");
    for malformed in [
        "{\"idempotency_key\": [\"canary-array-key\"]}".to_string(),
        "{\"idempotency_key\": \"canary-bad key with spaces\"}".to_string(),
        format!("{{\"idempotency_key\": \"{key}\", \"canary-field\": \"canary-value\""),
    ] {
        let a = c.send("PUT", "/api/v2/captures", Some(malformed)).await;
        assert!(matches!(a.status, 400 | 422), "{a:?}");
    }
    let wrong = server.client.with_token("canary-wrong-token-77");
    assert_eq!(
        wrong.allocate(json!({"idempotency_key": key})).await.status,
        401
    );
    server.signal(libc::SIGTERM);
    common::wait_for_exit(&mut server.child).await;
    let lines: Vec<String> = server.all_lines().iter().map(|l| l.to_string()).collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("TRACE") || l.contains("DEBUG")),
        "the most verbose level was on: {lines:#?}"
    );
    let leaks: Vec<&String> = lines.iter().filter(|l| l.contains("canary")).collect();
    assert!(leaks.is_empty(), "logged: {leaks:#?}");
}
