//! The Redis store against a real `redis-server` each test starts: the conformance suite, plus
//! what only Redis has (it expires the keys itself, the scripts come back after a flush,
//! acknowledged writes survive a restart with the AOF, the store reconnects, WAIT for
//! replicas, two stores on one Redis).

mod common;
#[macro_use]
mod conformance;

use std::sync::Arc;
use std::time::Duration;

use common::eventually;
use common::redis_server::RedisServer;
use idempotency_server::store::{
    Allocate, AllocateOutcome, BatchOp, BatchOutcome, Record, RecordOutcome, Release,
    ReleaseOutcome, Store, StoreError, TAKEOVER_WINDOW,
};
use idempotency_server::{RedisOptions, RedisStore, RedisTarget};

fn options(server: &RedisServer) -> RedisOptions {
    RedisOptions::new(RedisTarget::Single(server.url()))
}

async fn open(server: &RedisServer) -> RedisStore {
    RedisStore::open(options(server)).await.unwrap()
}

async fn redis() -> conformance::Harness {
    let server = RedisServer::start().await;
    let store = open(&server).await;
    conformance::Harness::new(Arc::new(store), server)
}

conformance_suite!(redis);

const HOUR: Duration = Duration::from_secs(3600);

fn alloc(key: &str, lease: Duration) -> Allocate {
    Allocate {
        key: key.into(),
        fingerprint: None,
        lease,
    }
}

fn rec(key: &str, token: &str) -> Record {
    Record {
        key: key.into(),
        lease_token: Some(token.into()),
        capture: conformance::capture(key),
        retention: HOUR,
    }
}

async fn lease(store: &dyn Store, key: &str, lease: Duration) -> (String, u64) {
    match store.allocate(alloc(key, lease)).await.unwrap() {
        AllocateOutcome::Allocated {
            lease_token,
            lease_expires_at,
            ..
        } => (lease_token, lease_expires_at),
        other => panic!("expected a lease, got {other:?}"),
    }
}

async fn pexpiretime(c: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PEXPIRETIME")
        .arg(key)
        .query_async(c)
        .await
        .unwrap()
}

#[tokio::test]
async fn each_key_expires_in_redis_a_takeover_window_after_its_lease_or_at_its_retention_end() {
    let server = RedisServer::start().await;
    let store = open(&server).await;
    let mut c = server.connection().await;
    let window = TAKEOVER_WINDOW.as_millis() as i64;

    // Allocated: the key expires a takeover window after the lease's end, to the millisecond
    // (free from the lease's end; kept so that a takeover is known).
    let (token, lease_end) = lease(&store, "k", HOUR).await;
    assert_eq!(
        pexpiretime(&mut c, "idempotency:k").await,
        lease_end as i64 + window
    );
    // Completed: at the retention's end; the token is gone from the entry.
    let RecordOutcome::Stored { expires_at } = store.record(rec("k", &token)).await.unwrap() else {
        panic!("expected stored");
    };
    assert_eq!(
        pexpiretime(&mut c, "idempotency:k").await,
        expires_at as i64
    );
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg("idempotency:k")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(!fields.contains(&"token".to_string()), "{fields:?}");

    // Released: the key is gone at once.
    let (token, _) = lease(&store, "r", HOUR).await;
    assert_eq!(
        store
            .release(Release {
                key: "r".into(),
                lease_token: Some(token)
            })
            .await
            .unwrap(),
        ReleaseOutcome::Released
    );
    let exists: i64 = redis::cmd("EXISTS")
        .arg("idempotency:r")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(exists, 0);

    // A lease taken over: the new lease's end plus the window, and it says so.
    let (_, first_end) = lease(&store, "t", Duration::from_millis(50)).await;
    eventually("the lease to expire", || async {
        (idempotency_server::store::now_ms() > first_end).then_some(())
    })
    .await;
    let AllocateOutcome::Allocated {
        lease_expires_at,
        taken_over,
        ..
    } = store.allocate(alloc("t", HOUR)).await.unwrap()
    else {
        panic!("expected a lease");
    };
    assert!(taken_over);
    assert_eq!(
        pexpiretime(&mut c, "idempotency:t").await,
        lease_expires_at as i64 + window
    );
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_scripts_are_loaded_again_after_redis_forgets_them() {
    let server = RedisServer::start().await;
    let store = open(&server).await;
    let mut c = server.connection().await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut c)
        .await
        .unwrap();
    // EVALSHA answers NOSCRIPT; the store loads the script and the call succeeds.
    let (token, _) = lease(&store, "k", HOUR).await;
    assert!(matches!(
        store.record(rec("k", &token)).await.unwrap(),
        RecordOutcome::Stored { .. }
    ));
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_batch_is_sent_again_after_redis_forgets_the_scripts() {
    let server = RedisServer::start().await;
    let store = open(&server).await;
    let (a, _) = lease(&store, "a", HOUR).await;
    let (b, _) = lease(&store, "b", HOUR).await;
    let mut c = server.connection().await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut c)
        .await
        .unwrap();
    // Every item of the pipeline answers NOSCRIPT (none ran); they are sent again once.
    let results = store
        .batch(vec![
            BatchOp::Record(rec("a", &a)),
            BatchOp::Release(Release {
                key: "b".into(),
                lease_token: Some(b),
            }),
        ])
        .await;
    assert!(
        matches!(
            results.as_slice(),
            [
                Ok(BatchOutcome::Record(RecordOutcome::Stored { .. })),
                Ok(BatchOutcome::Release(ReleaseOutcome::Released))
            ]
        ),
        "{results:?}"
    );
    store.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_redis_restart_and_the_store_reconnects() {
    // What the README recommends for durability: the AOF, fsynced before each answer.
    let mut server =
        RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]).await;
    let store = open(&server).await;
    let (token, _) = lease(&store, "recorded", HOUR).await;
    store.record(rec("recorded", &token)).await.unwrap();
    let (_, held_until) = lease(&store, "held", HOUR).await;
    let (token, _) = lease(&store, "released", HOUR).await;
    store
        .release(Release {
            key: "released".into(),
            lease_token: Some(token),
        })
        .await
        .unwrap();

    // SIGKILL, right after the last answer.
    server.kill();
    assert!(matches!(
        store.ready().await,
        Err(StoreError::Unavailable(_))
    ));
    server.restart().await;

    // The same store, without being reopened: it reconnects by itself.
    eventually("the store to reconnect", || async {
        store.ready().await.ok()
    })
    .await;
    assert_eq!(
        store.allocate(alloc("recorded", HOUR)).await.unwrap(),
        AllocateOutcome::Completed(conformance::capture("recorded"))
    );
    assert_eq!(
        store.allocate(alloc("held", HOUR)).await.unwrap(),
        AllocateOutcome::InFlight {
            lease_expires_at: held_until
        }
    );
    lease(&store, "released", HOUR).await;
    store.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_on_one_redis_give_one_lease_for_64_concurrent_allocations() {
    let server = RedisServer::start().await;
    let stores: [Arc<dyn Store>; 2] =
        [Arc::new(open(&server).await), Arc::new(open(&server).await)];
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..64 {
        let store = stores[i % 2].clone();
        tasks.spawn(async move { store.allocate(alloc("race", HOUR)).await.unwrap() });
    }
    let mut leases = 0;
    while let Some(outcome) = tasks.join_next().await {
        match outcome.unwrap() {
            AllocateOutcome::Allocated { .. } => leases += 1,
            AllocateOutcome::InFlight { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(leases, 1);
    for store in stores {
        store.shutdown().await.unwrap();
    }
}

/// The `state` field of a key's hash, as this Redis has it.
async fn state(c: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("HGET")
        .arg(format!("idempotency:{key}"))
        .arg("state")
        .query_async(c)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wait_replicas_a_write_is_answered_once_replicas_have_it() {
    // Without the default 5 s pause before a full sync to a new replica.
    let primary = RedisServer::start_with(&["--repl-diskless-sync-delay", "0"]).await;
    let replica = RedisServer::start().await;
    let mut c = replica.connection().await;
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(primary.port)
        .query_async(&mut c)
        .await
        .unwrap();
    let p = primary.connection().await;
    eventually("the replica to be in sync", || {
        let mut p = p.clone();
        async move {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut p)
                .await
                .unwrap();
            (info.contains("connected_slaves:1") && info.contains("state=online")).then_some(())
        }
    })
    .await;

    let mut one = options(&primary);
    one.wait_replicas = 1;
    let store = RedisStore::open(one).await.unwrap();
    let (token, _) = lease(&store, "k", HOUR).await;
    assert!(matches!(
        store.record(rec("k", &token)).await.unwrap(),
        RecordOutcome::Stored { .. }
    ));
    // The replica has the capture.
    assert_eq!(state(&mut c, "k").await.as_deref(), Some("completed"));
    // A batch waits for the replica too: what it answered is on the replica.
    let (token, _) = lease(&store, "kb", HOUR).await;
    let results = store.batch(vec![BatchOp::Record(rec("kb", &token))]).await;
    assert!(
        matches!(
            results.as_slice(),
            [Ok(BatchOutcome::Record(RecordOutcome::Stored { .. }))]
        ),
        "{results:?}"
    );
    assert_eq!(state(&mut c, "kb").await.as_deref(), Some("completed"));
    store.shutdown().await.unwrap();

    // Two replicas asked for, one there: the write is not acknowledged (503).
    let mut two = options(&primary);
    two.wait_replicas = 2;
    two.wait_timeout = Duration::from_millis(100);
    let store = RedisStore::open(two).await.unwrap();
    match store.allocate(alloc("k2", HOUR)).await {
        Err(StoreError::Unavailable(why)) => assert!(why.contains("1 of 2"), "{why}"),
        other => panic!("expected a 503, got {other:?}"),
    }
    // A batch whose writes the replicas do not confirm: every item is a 503.
    let one_more = RedisStore::open(options(&primary)).await.unwrap();
    let (token, _) = lease(&one_more, "k3", HOUR).await;
    let results = store.batch(vec![BatchOp::Record(rec("k3", &token))]).await;
    assert!(
        matches!(results.as_slice(), [Err(StoreError::Unavailable(why))] if why.contains("1 of 2")),
        "{results:?}"
    );
    one_more.shutdown().await.unwrap();
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_redis_fails_the_start_with_one_clear_error() {
    let dead = idempotency_tests::DeadPort::new();
    let port = dead.addr.port();
    let mut options = RedisOptions::new(RedisTarget::Single(format!(
        "redis://:s3cret@127.0.0.1:{port}/0"
    )));
    options.start_timeout = Duration::from_millis(300);
    let Err(error) = RedisStore::open(options).await else {
        panic!("a store opened on a closed port");
    };
    let line = format!("{error:#}");
    assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
    assert!(!line.contains("s3cret"), "{line}");
    assert!(!line.contains('\n'), "{line}");
}

#[tokio::test]
async fn after_shutdown_operations_fail() {
    let server = RedisServer::start().await;
    let store = open(&server).await;
    store.shutdown().await.unwrap();
    assert!(matches!(
        store.allocate(alloc("k", HOUR)).await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(store.ready().await, Err(StoreError::Closed)));
}
