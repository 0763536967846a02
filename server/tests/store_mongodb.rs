//! The MongoDB store against a real MongoDB, when `MONGODB_URI` names one (a replica set: the
//! store writes with write concern majority): the conformance suite, the indexes, and the
//! migration of the old server's documents. Without `MONGODB_URI` every test here is skipped,
//! and one line on stderr says so.
//!
//! ```sh
//! MONGODB_URI=mongodb://127.0.0.1:27017/?replicaSet=rs0 cargo test -p idempotency-server --test store_mongodb
//! ```
//!
//! The tests share one collection (`MONGODB_TEST_COLLECTION`, default `conformance`) in
//! `MONGODB_DATABASE` (default `idempotency-tests`), each with its own key prefix; what they
//! leave expires through the TTL index.

mod common;
#[macro_use]
mod conformance;

use std::io::Write as _;
use std::sync::{Arc, Once};
use std::time::Duration;

use idempotency_server::store::{Allocate, AllocateOutcome, Store};
use idempotency_server::{MongoOptions, MongoStore};
use mongodb::bson::{Document, doc};

/// The MongoDB to test against, or `None` after saying once that the tests are skipped.
fn uri() -> Option<String> {
    static SKIP: Once = Once::new();
    match std::env::var("MONGODB_URI") {
        Ok(uri) if !uri.trim().is_empty() => Some(uri),
        _ => {
            SKIP.call_once(|| {
                // Straight to stderr: the test harness captures println!, not this.
                let _ = writeln!(
                    std::io::stderr(),
                    "store_mongodb: SKIPPED, MONGODB_URI is not set (set it to a MongoDB \
                     replica set to run the MongoDB store's tests)"
                );
            });
            None
        }
    }
}

fn database() -> String {
    std::env::var("MONGODB_DATABASE").unwrap_or_else(|_| "idempotency-tests".into())
}

fn options(uri: String, collection: &str) -> MongoOptions {
    MongoOptions {
        uri,
        database: database(),
        collection: collection.into(),
        write_timeout: Duration::from_secs(5),
        timeout: Duration::from_secs(5),
        start_timeout: Duration::from_secs(30),
        default_lease: Duration::from_secs(60),
        retention: Duration::from_secs(3600),
    }
}

/// A prefix no other run uses.
fn unique(tag: &str) -> String {
    format!(
        "{tag}-{}-{}-",
        std::process::id(),
        idempotency_server::store::new_lease_token()
    )
}

async fn mongodb() -> Option<conformance::Harness> {
    let uri = uri()?;
    let collection =
        std::env::var("MONGODB_TEST_COLLECTION").unwrap_or_else(|_| "conformance".into());
    let store = MongoStore::open(options(uri, &collection)).await.unwrap();
    Some(
        conformance::Harness::new(Arc::new(store), ())
            .with_prefix(unique("case"))
            // The store decides with the MongoDB primary's clock, maybe on another host.
            .with_clock_skew(Duration::from_secs(1)),
    )
}

conformance_suite!(mongodb);

/// A fresh collection for one test, dropped at its end.
struct Scratch {
    uri: String,
    name: String,
    collection: mongodb::Collection<Document>,
}

impl Scratch {
    async fn new(uri: String) -> Scratch {
        let client = mongodb::Client::with_uri_str(&uri).await.unwrap();
        let name = format!("scratch{}", unique("").replace('-', ""));
        let collection = client.database(&database()).collection(&name);
        Scratch {
            uri,
            name,
            collection,
        }
    }

    async fn remove(self) {
        self.collection.drop().await.unwrap();
    }
}

#[tokio::test]
async fn the_indexes_are_created_at_start_unique_key_and_ttl() {
    let Some(uri) = uri() else { return };
    let scratch = Scratch::new(uri.clone()).await;
    let store = MongoStore::open(options(uri, &scratch.name)).await.unwrap();
    let mut indexes = Vec::new();
    let mut cursor = scratch.collection.list_indexes().await.unwrap();
    while cursor.advance().await.unwrap() {
        let model: mongodb::IndexModel = cursor.deserialize_current().unwrap();
        indexes.push(model);
    }
    let key = indexes
        .iter()
        .find(|i| i.keys == doc! { "idempotency_key": 1 })
        .expect("an index on idempotency_key");
    assert_eq!(key.options.as_ref().unwrap().unique, Some(true));
    let ttl = indexes
        .iter()
        .find(|i| i.keys == doc! { "expires_at": 1 })
        .expect("an index on expires_at");
    assert_eq!(
        ttl.options.as_ref().unwrap().expire_after,
        Some(Duration::ZERO)
    );
    // Opening again finds them and creates nothing.
    MongoStore::open(options(scratch.uri.clone(), &scratch.name))
        .await
        .unwrap()
        .shutdown()
        .await
        .unwrap();
    store.shutdown().await.unwrap();
    scratch.remove().await;
}

#[tokio::test]
async fn the_old_servers_documents_are_replayed_then_expire() {
    let Some(uri) = uri() else { return };
    let scratch = Scratch::new(uri.clone()).await;
    // As the Go server left them: no lease, no expiry.
    scratch
        .collection
        .insert_many([
            doc! { "idempotency_key": "b2xk", "status": "completed", "capture": {
            "response_status": 201, "response_body": "H4sI", "response_headers": [
                { "key": "Content-Type", "value": "application/json" } ] } },
            doc! { "idempotency_key": "aGVsZA", "status": "allocated" },
        ])
        .await
        .unwrap();
    let store = MongoStore::open(options(uri, &scratch.name)).await.unwrap();
    // The migration gave both an expiry.
    let left: u64 = scratch
        .collection
        .count_documents(doc! { "expires_at": { "$exists": false } })
        .await
        .unwrap();
    assert_eq!(left, 0);
    let allocate = |key: &str| Allocate {
        key: key.into(),
        fingerprint: Some("f".into()),
        lease: Duration::from_secs(60),
    };
    match store.allocate(allocate("b2xk")).await.unwrap() {
        AllocateOutcome::Completed(capture) => assert_eq!(capture.response_body, "H4sI"),
        other => panic!("expected the old capture, got {other:?}"),
    }
    // The old allocation now has the default lease (it had none): in flight until it ends.
    assert!(matches!(
        store.allocate(allocate("aGVsZA")).await.unwrap(),
        AllocateOutcome::InFlight { .. }
    ));
    store.shutdown().await.unwrap();
    scratch.remove().await;
}
