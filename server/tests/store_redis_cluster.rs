//! The Redis store on a real Redis Cluster of three primaries started by the test: the whole
//! conformance suite, in one test (a cluster takes about two seconds to form, so the cases share
//! one, each with its own key prefix), and a check that the keys really spread over the nodes
//! and that WAIT goes to the key's primary.

mod common;
#[macro_use]
mod conformance;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::redis_server::RedisCluster;
use idempotency_server::store::{Allocate, AllocateOutcome, Store, StoreError};
use idempotency_server::{RedisOptions, RedisStore, RedisTarget};

fn options(cluster: &RedisCluster) -> RedisOptions {
    RedisOptions::new(RedisTarget::Cluster(cluster.urls()))
}

async fn harness(cluster: &RedisCluster) -> conformance::Harness {
    static CASE: AtomicUsize = AtomicUsize::new(0);
    let store = RedisStore::open(options(cluster)).await.unwrap();
    let case = CASE.fetch_add(1, Ordering::Relaxed);
    conformance::Harness::new(Arc::new(store), ()).with_prefix(format!("case{case}-"))
}

conformance_suite!(sequential conformance_on_a_cluster, RedisCluster::start, harness);

fn alloc(key: &str) -> Allocate {
    Allocate {
        key: key.into(),
        fingerprint: None,
        lease: Duration::from_secs(3600),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_spread_over_every_primary_and_wait_goes_to_the_keys_primary() {
    let cluster = RedisCluster::start().await;
    let store = RedisStore::open(options(&cluster)).await.unwrap();
    for i in 0..30 {
        assert!(matches!(
            store.allocate(alloc(&format!("spread-{i}"))).await.unwrap(),
            AllocateOutcome::Allocated { .. }
        ));
    }
    for node in &cluster.nodes {
        let mut c = node.connection().await;
        let size: i64 = redis::cmd("DBSIZE").query_async(&mut c).await.unwrap();
        assert!(size > 0, "the node on port {} holds no key", node.port);
    }
    store.ready().await.unwrap();
    store.shutdown().await.unwrap();

    // No replicas here: a WAIT for one, sent to the key's primary, counts none, and the
    // allocation is not acknowledged.
    let mut waiting = options(&cluster);
    waiting.wait_replicas = 1;
    waiting.wait_timeout = Duration::from_millis(50);
    let store = RedisStore::open(waiting).await.unwrap();
    match store.allocate(alloc("waited")).await {
        Err(StoreError::Unavailable(why)) => assert!(why.contains("0 of 1"), "{why}"),
        other => panic!("expected a 503, got {other:?}"),
    }
    store.shutdown().await.unwrap();
}
