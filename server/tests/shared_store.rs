//! Two real server processes (the binary) behind the same API on one shared store, as users
//! run them behind a load balancer: a key allocated through one is in flight on the other and
//! replayed there once recorded; 64 concurrent allocations through both give one 202; a
//! `wait_ms` on one returns what was recorded (or released) through the other; `/-/ready`
//! follows the store; an unreachable store fails the start with one line.
//!
//! Always on a Redis the test starts; on MongoDB too when `MONGODB_URI` is set.

mod common;

use std::sync::Once;

use common::redis_server::RedisServer;
use common::{ServerProcess, eventually, response, run_to_exit};
use idempotency_spec::problem_type;
use serde_json::json;
use tempfile::TempDir;

/// Two server processes on one store, and what keeps the store alive.
struct Pair {
    a: ServerProcess,
    b: ServerProcess,
    /// Keys unique to this run (the store may be shared with other runs).
    prefix: String,
    _dirs: [TempDir; 2],
}

impl Pair {
    async fn start(store_args: &[&str]) -> Pair {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let a = ServerProcess::start(dirs[0].path(), store_args).await;
        let b = ServerProcess::start(dirs[1].path(), store_args).await;
        // Hex digits are valid base64url: a valid key prefix no other run uses.
        let prefix = idempotency_server::store::new_lease_token();
        Pair {
            a,
            b,
            prefix,
            _dirs: dirs,
        }
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
}

fn redis_args(redis: &RedisServer) -> Vec<String> {
    vec![
        "--store".into(),
        "redis".into(),
        "--redis-url".into(),
        redis.url(),
    ]
}

/// The MongoDB of `MONGODB_URI`, or `None` (said once on stderr).
fn mongodb_args() -> Option<Vec<String>> {
    static SKIP: Once = Once::new();
    match std::env::var("MONGODB_URI") {
        Ok(uri) if !uri.trim().is_empty() => Some(vec![
            "--store".into(),
            "mongodb".into(),
            "--mongodb-uri".into(),
            uri,
            "--mongodb-database".into(),
            std::env::var("MONGODB_DATABASE").unwrap_or_else(|_| "idempotency-tests".into()),
            "--mongodb-collection".into(),
            "shared-store".into(),
        ]),
        _ => {
            SKIP.call_once(|| {
                use std::io::Write as _;
                let _ = writeln!(
                    std::io::stderr(),
                    "shared_store: MongoDB cases SKIPPED, MONGODB_URI is not set"
                );
            });
            None
        }
    }
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

async fn in_flight_on_the_other_then_replayed(args: &[&str]) {
    let pair = Pair::start(args).await;
    let key = pair.key("shared");
    let token = pair.a.client.lease(&key).await;
    let answer = pair
        .b
        .client
        .allocate(json!({ "idempotency_key": key }))
        .await;
    answer.assert_problem(409, problem_type::IN_FLIGHT);
    assert!(answer.retry_after() >= 1);
    // The holder's token works on either process: the lease is in the store.
    let recorded = pair
        .b
        .client
        .record(json!({ "idempotency_key": key, "lease_token": token, "response": response("s") }))
        .await;
    assert_eq!(recorded.status, 200, "{recorded:?}");
    for process in [&pair.a, &pair.b] {
        let replay = process
            .client
            .allocate(json!({ "idempotency_key": key }))
            .await;
        assert_eq!(replay.status, 200, "{replay:?}");
        assert_eq!(replay.json["response"], response("s"));
    }
}

async fn one_202_for_64_concurrent_allocations_through_both(args: &[&str]) {
    let pair = Pair::start(args).await;
    let key = pair.key("race");
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..64 {
        let client = if i % 2 == 0 { &pair.a } else { &pair.b }.client.clone();
        let key = key.clone();
        calls.spawn(async move {
            client
                .allocate(json!({ "idempotency_key": key }))
                .await
                .status
        });
    }
    let mut statuses = Vec::new();
    while let Some(status) = calls.join_next().await {
        statuses.push(status.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 202).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 409).count(),
        63,
        "{statuses:?}"
    );
}

/// A `wait_ms` on B while A holds the key: A records (or releases) only once B says it waits,
/// and B's waiting call answers with what A did. B learns it by polling the store: nothing
/// tells it across processes.
async fn a_wait_on_one_ends_with_what_the_other_did(args: &[&str]) {
    let mut pair = Pair::start(args).await;
    for ending in ["record", "release"] {
        let key = pair.key(ending);
        let token = pair.a.client.lease(&key).await;
        let waiter = {
            let client = pair.b.client.clone();
            let key = key.clone();
            tokio::spawn(async move {
                client
                    .allocate(json!({ "idempotency_key": key, "wait_ms": 20_000 }))
                    .await
            })
        };
        pair.b
            .log_line(|l| {
                l["fields"]["message"] == "waiting for the holder of the key"
                    && l["fields"]["key"] == idempotency_spec::key_digest(key.as_str())
            })
            .await;
        let body =
            json!({ "idempotency_key": key, "lease_token": token, "response": response(ending) });
        let done = if ending == "record" {
            pair.a.client.record(body).await
        } else {
            pair.a.client.release(body).await
        };
        assert_eq!(done.status, 200, "{done:?}");
        let answer = waiter.await.unwrap();
        if ending == "record" {
            assert_eq!(answer.status, 200, "{answer:?}");
            assert_eq!(answer.json["response"], response("record"));
        } else {
            // Released: the waiter got the key.
            assert_ne!(answer.lease_token(), token);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_key_allocated_through_one_process_is_in_flight_on_the_other_then_replayed() {
    let redis = RedisServer::start().await;
    in_flight_on_the_other_then_replayed(&strs(&redis_args(&redis))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_64_concurrent_allocations_through_two_processes_give_one_202() {
    let redis = RedisServer::start().await;
    one_202_for_64_concurrent_allocations_through_both(&strs(&redis_args(&redis))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_wait_ms_on_one_process_returns_what_the_other_recorded_or_released() {
    let redis = RedisServer::start().await;
    a_wait_on_one_ends_with_what_the_other_did(&strs(&redis_args(&redis))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_a_key_allocated_through_one_process_is_in_flight_on_the_other_then_replayed() {
    let Some(args) = mongodb_args() else { return };
    in_flight_on_the_other_then_replayed(&strs(&args)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_64_concurrent_allocations_through_two_processes_give_one_202() {
    let Some(args) = mongodb_args() else { return };
    one_202_for_64_concurrent_allocations_through_both(&strs(&args)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_wait_ms_on_one_process_returns_what_the_other_recorded_or_released() {
    let Some(args) = mongodb_args() else { return };
    a_wait_on_one_ends_with_what_the_other_did(&strs(&args)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_follows_redis_down_and_back() {
    let mut redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &strs(&redis_args(&redis))).await;
    let c = &server.client;
    let ready = c.get("/-/ready").await;
    assert_eq!(ready.status, 200, "{ready:?}");
    assert_eq!(ready.json["store"], "redis");

    redis.kill();
    let answer = c.get("/-/ready").await;
    answer.assert_problem(503, problem_type::STORE_UNAVAILABLE);
    let answer = c.allocate(json!({ "idempotency_key": "down" })).await;
    answer.assert_problem(503, problem_type::STORE_UNAVAILABLE);
    assert_eq!(answer.retry_after(), 1);

    redis.restart().await;
    eventually("ready again", || async {
        (c.get("/-/ready").await.status == 200).then_some(())
    })
    .await;
    c.lease("down").await;
}

#[tokio::test]
async fn an_unreachable_store_fails_the_start_with_one_line_and_status_1() {
    let dead = idempotency_tests::DeadPort::new();
    let closed = dead.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let redis = format!("redis://:s3cret@127.0.0.1:{closed}/0");
    let mongo = format!("mongodb://root:s3cret@127.0.0.1:{closed}");
    let quick = [("STORE_START_TIMEOUT", "300ms"), ("STORE_TIMEOUT", "200ms")];
    // (flags, environment, what the line must name)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec!["--store", "redis", "--redis-url", &redis],
            vec![],
            "Redis",
        ),
        (
            vec![],
            vec![("STORE", "redis"), ("REDIS_URL", &redis)],
            "Redis",
        ),
        // MONGODB_URI alone selects MongoDB, as the old server did.
        (vec![], vec![("MONGODB_URI", &mongo)], "MongoDB"),
    ];
    for (args, env, names) in cases {
        let mut all = vec!["--listen", "127.0.0.1:0", "--data-dir", data_dir];
        all.extend_from_slice(&args);
        let env: Vec<(&str, &str)> = env.into_iter().chain(quick).collect();
        let (status, stderr) = run_to_exit(&all, &env).await;
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let last = lines.last().copied().unwrap_or("");
        assert_eq!(status.code(), Some(1), "{args:?} {env:?}: {stderr}");
        assert!(last.starts_with("idempotency-server: "), "{stderr}");
        assert!(last.contains(names), "{stderr}");
        assert!(last.contains(&format!("127.0.0.1:{closed}")), "{stderr}");
        assert!(!stderr.contains("s3cret"), "{stderr}");
    }
}

#[tokio::test]
async fn an_explicit_store_wins_over_mongodb_uri() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens at that URI: only the embedded store can make this server start.
    let server = ServerProcess::start_with_env(
        dir.path(),
        &["--store", "embedded"],
        &[("MONGODB_URI", "mongodb://127.0.0.1:1")],
    )
    .await;
    let ready = server.client.get("/-/ready").await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json["store"], "embedded");
}
