//! The MongoDB store against a real MongoDB, when `MONGODB_URI` names one (a replica set: the
//! store writes with write concern majority): the conformance suite, the indexes, and the
//! migration of the old server's documents. Without `MONGODB_URI` every test here is skipped,
//! and one line on stderr says so.
//!
//! ```sh
//! MONGODB_URI=mongodb://127.0.0.1:27017/?replicaSet=rs0 cargo test -p idempotency-server --test store_mongodb
//! ```
//!
//! `scripts/mongodb-suite` runs it (with `shared_store`) against each deployment given. The
//! fault case needs the server started with `--setParameter enableTestCommands=1` (the
//! `failCommand` fail point); where it is refused, that case says so on stderr and passes.
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

use idempotency_server::store::mongodb::{
    STRAY_INDEX, migration_filter, stray_filter, stray_update,
};
use idempotency_server::store::{
    Allocate, AllocateOutcome, Record, RecordOutcome, Release, ReleaseOutcome, Store, now_ms,
};
use idempotency_server::{MongoOptions, MongoStore};
use idempotency_spec::{Capture, Header, HeaderValue, problem_type};
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
            .with_clock_skew(Duration::from_secs(1))
            // Its TTL monitor deletes an expired lease whenever it runs (once a minute).
            .forgetting_expired_leases(),
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
    let stray = indexes
        .iter()
        .find(|i| i.keys == doc! { "lease_token": 1 })
        .expect("the migration's partial index");
    assert_eq!(
        stray.options.as_ref().unwrap().partial_filter_expression,
        Some(stray_filter())
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

fn allocation(key: &str) -> Allocate {
    Allocate {
        key: key.into(),
        fingerprint: Some("f".into()),
        lease: Duration::from_secs(60),
    }
}

async fn lease_of(store: &MongoStore, key: &str) -> String {
    match store.allocate(allocation(key)).await.unwrap() {
        AllocateOutcome::Allocated { lease_token, .. } => lease_token,
        other => panic!("expected a lease, got {other:?}"),
    }
}

fn small_capture(body: &str) -> Capture {
    Capture {
        response_status: 201,
        response_body: body.into(),
        response_headers: vec![Header {
            key: "Content-Type".into(),
            value: HeaderValue::One("application/json".into()),
        }],
    }
}

/// A rolling upgrade, step by step, with the old Go server's own commands (NOTES.md) next to
/// the new store on one collection.
#[tokio::test]
async fn a_fleet_of_old_and_new_servers_on_one_collection() {
    let Some(uri) = uri() else { return };
    let scratch = Scratch::new(uri.clone()).await;
    let store = MongoStore::open(options(uri.clone(), &scratch.name))
        .await
        .unwrap();

    // A new server allocates K; an old server records it: its filter matches any allocated
    // document, its update sets status and capture only.
    let token = lease_of(&store, "Sw").await;
    let old_record = scratch
        .collection
        .find_one_and_update(
            doc! { "idempotency_key": "Sw", "status": "allocated" },
            doc! { "$set": { "status": "completed", "capture": {
            "response_status": 201, "response_body": "b2xk", "response_headers": [] } } },
        )
        .await
        .unwrap();
    assert!(old_record.is_some());
    let stray = scratch
        .collection
        .find_one(doc! { "idempotency_key": "Sw" })
        .await
        .unwrap()
        .unwrap();
    // Completed, but with the lease's token and end: the TTL monitor would delete it then.
    assert_eq!(stray.get_str("lease_token").unwrap(), token);
    let lease_end = stray.get_datetime("expires_at").unwrap().timestamp_millis();
    // The new holder's record now finds no allocation: 403, and the old capture stands.
    let refused = store
        .record(Record {
            key: "Sw".into(),
            lease_token: Some(token.clone()),
            capture: small_capture("new"),
            retention: Duration::from_secs(3600),
        })
        .await
        .unwrap();
    assert_eq!(refused, RecordOutcome::Forbidden);

    // An old server allocates another key: an upsert with no expiry.
    scratch
        .collection
        .find_one_and_update(
            doc! { "idempotency_key": "T2xk" },
            doc! { "$set": { "idempotency_key": "T2xk" }, "$setOnInsert": { "status": "allocated" } },
        )
        .upsert(true)
        .await
        .unwrap();

    // A new server starts (or the next migration runs): both are migrated.
    let before = now_ms();
    let second = MongoStore::open(options(uri, &scratch.name)).await.unwrap();
    let migrated = scratch
        .collection
        .find_one(doc! { "idempotency_key": "Sw" })
        .await
        .unwrap()
        .unwrap();
    assert!(!migrated.contains_key("lease_token"), "{migrated}");
    let expires = migrated
        .get_datetime("expires_at")
        .unwrap()
        .timestamp_millis();
    // The retention (3600 s) from the migration, on MongoDB's clock (1 s of skew allowed).
    let skew = 1_000;
    assert!(
        expires >= before as i64 + 3_600_000 - skew && expires > lease_end,
        "{migrated}"
    );
    // Nothing left for either migration filter.
    for filter in [migration_filter(), stray_filter()] {
        assert_eq!(scratch.collection.count_documents(filter).await.unwrap(), 0);
    }
    match second.allocate(allocation("Sw")).await.unwrap() {
        AllocateOutcome::Completed(capture) => assert_eq!(capture.response_body, "b2xk"),
        other => panic!("expected the old server's capture, got {other:?}"),
    }
    // The old allocation has the default lease now: in flight, and an old client (no token)
    // can still release it.
    assert!(matches!(
        second.allocate(allocation("T2xk")).await.unwrap(),
        AllocateOutcome::InFlight { .. }
    ));
    assert_eq!(
        second
            .release(Release {
                key: "T2xk".into(),
                lease_token: None
            })
            .await
            .unwrap(),
        ReleaseOutcome::Released
    );
    second.shutdown().await.unwrap();
    store.shutdown().await.unwrap();
    scratch.remove().await;
}

/// The migration's two updates are served by indexes (no collection scan every few seconds):
/// what the query planner chooses, which only a real server can tell.
#[tokio::test]
async fn the_migration_is_served_by_indexes() {
    let Some(uri) = uri() else { return };
    let scratch = Scratch::new(uri.clone()).await;
    let store = MongoStore::open(options(uri, &scratch.name)).await.unwrap();
    let database = scratch.collection.namespace().db;
    let client = mongodb::Client::with_uri_str(&scratch.uri).await.unwrap();
    for (filter, index) in [
        (stray_filter(), STRAY_INDEX),
        (migration_filter(), "expires_at_1"),
    ] {
        let explain = client
            .database(&database)
            .run_command(doc! {
                "explain": { "update": &scratch.name, "updates": [{
                    "q": filter, "u": stray_update(1000), "multi": true,
                    "collation": { "locale": "simple" } }] },
                "verbosity": "queryPlanner",
            })
            .await
            .unwrap();
        let plan = explain.to_string();
        assert!(plan.contains(index), "{index}: {plan}");
        assert!(!plan.contains("COLLSCAN"), "{index}: {plan}");
    }
    store.shutdown().await.unwrap();
    scratch.remove().await;
}

/// A record whose document would pass 16 MiB is refused before it is sent (413 in the API),
/// and the allocation stays.
#[tokio::test]
async fn a_capture_too_large_for_a_document_is_refused_and_the_lease_stays() {
    let Some(uri) = uri() else { return };
    let scratch = Scratch::new(uri.clone()).await;
    let store = MongoStore::open(options(uri, &scratch.name)).await.unwrap();
    let token = lease_of(&store, "Ymln").await;
    let crowded = Capture {
        response_status: 200,
        response_body: String::new(),
        response_headers: vec![Header {
            key: "x-many".into(),
            value: HeaderValue::Many(vec![String::new(); 1_500_000]),
        }],
    };
    let outcome = store
        .record(Record {
            key: "Ymln".into(),
            lease_token: Some(token.clone()),
            capture: crowded,
            retention: Duration::from_secs(60),
        })
        .await
        .unwrap();
    assert_eq!(
        outcome,
        RecordOutcome::TooLarge {
            limit: 16 * 1024 * 1024
        }
    );
    let outcome = store
        .record(Record {
            key: "Ymln".into(),
            lease_token: Some(token),
            capture: small_capture("fits"),
            retention: Duration::from_secs(60),
        })
        .await
        .unwrap();
    assert!(
        matches!(outcome, RecordOutcome::Stored { .. }),
        "{outcome:?}"
    );
    store.shutdown().await.unwrap();
    scratch.remove().await;
}

/// A collection created with a case-insensitive default collation: the store's indexes and
/// commands use the simple one, so keys that differ in case stay two keys.
#[tokio::test]
async fn a_collection_default_collation_does_not_apply() {
    let Some(uri) = uri() else { return };
    let scratch = Scratch::new(uri.clone()).await;
    let client = mongodb::Client::with_uri_str(&uri).await.unwrap();
    client
        .database(&database())
        .run_command(
            doc! { "create": &scratch.name, "collation": { "locale": "en", "strength": 2 } },
        )
        .await
        .unwrap();
    let store = MongoStore::open(options(uri, &scratch.name)).await.unwrap();
    lease_of(&store, "YWJj").await;
    // "YWJJ" is another key (base64 of other bytes): a lease of its own, not a 409.
    lease_of(&store, "YWJJ").await;
    store.shutdown().await.unwrap();
    scratch.remove().await;
}

/// Indexes a real server keeps as they were created: the legacy shell's doubles serve, a
/// partial unique index stops the start naming it.
#[tokio::test]
async fn existing_indexes_as_other_tools_created_them() {
    let Some(uri) = uri() else { return };
    let client = mongodb::Client::with_uri_str(&uri).await.unwrap();
    let db = client.database(&database());

    let scratch = Scratch::new(uri.clone()).await;
    db.run_command(doc! { "createIndexes": &scratch.name, "indexes": [
        { "key": { "idempotency_key": 1.0 }, "name": "idempotency_key_1", "unique": true },
        { "key": { "expires_at": 1.0 }, "name": "expires_at_1", "expireAfterSeconds": 0.0 },
    ] })
    .await
    .unwrap();
    MongoStore::open(options(uri.clone(), &scratch.name))
        .await
        .unwrap()
        .shutdown()
        .await
        .unwrap();
    scratch.remove().await;

    let scratch = Scratch::new(uri.clone()).await;
    db.run_command(doc! { "createIndexes": &scratch.name, "indexes": [
        { "key": { "idempotency_key": 1 }, "name": "by_key", "unique": true,
          "partialFilterExpression": { "status": "completed" } },
    ] })
    .await
    .unwrap();
    let error = MongoStore::open(options(uri, &scratch.name))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("by_key") && error.contains("partial"),
        "{error}"
    );
    scratch.remove().await;
}

/// `uri` with `appName` set, so that a fail point can aim at this test's client alone.
fn with_app_name(uri: &str, app: &str) -> String {
    let (base, query) = uri.split_once('?').unwrap_or((uri, ""));
    let base = if base.matches('/').count() < 3 {
        format!("{base}/")
    } else {
        base.to_owned()
    };
    let query = query
        .split('&')
        .filter(|p| !p.is_empty() && !p.to_ascii_lowercase().starts_with("appname="))
        .chain(std::iter::once(format!("appName={app}").as_str()))
        .collect::<Vec<_>>()
        .join("&");
    format!("{base}?{query}")
}

/// The fault case: the primary applies an allocation but a majority does not acknowledge it in
/// time (a write concern error on findAndModify, injected by the `failCommand` fail point).
/// The API answers 503 (the change may be on the primary alone), and the key is then held by
/// that lease, exactly as after a lost answer: a retry gets 409.
#[tokio::test]
async fn a_write_concern_error_on_an_allocation_is_503() {
    let Some(uri) = uri() else { return };
    let scratch = Scratch::new(uri.clone()).await;
    let app = format!("fault{}", std::process::id());
    let admin = mongodb::Client::with_uri_str(&uri)
        .await
        .unwrap()
        .database("admin");
    let configured = admin
        .run_command(doc! {
            "configureFailPoint": "failCommand",
            "mode": { "times": 1 },
            "data": {
                "failCommands": ["findAndModify"],
                "appName": &app,
                "writeConcernError": {
                    "code": 64, "codeName": "WriteConcernTimeout",
                    "errmsg": "injected: waiting for replication timed out",
                    "errInfo": { "wtimeout": true },
                },
            },
        })
        .await;
    if let Err(e) = configured {
        let _ = writeln!(
            std::io::stderr(),
            "store_mongodb: a_write_concern_error_on_an_allocation_is_503 SKIPPED: the \
             failCommand fail point is refused (start the server with --setParameter \
             enableTestCommands=1): {e}"
        );
        scratch.remove().await;
        return;
    }
    let store = MongoStore::open(options(with_app_name(&uri, &app), &scratch.name))
        .await
        .unwrap();
    let server = common::TestServer::start_on(Arc::new(store)).await;
    let answer = server
        .client
        .allocate(serde_json::json!({ "idempotency_key": "ZmF1bHQ" }))
        .await;
    answer.assert_problem(503, problem_type::STORE_UNAVAILABLE);
    let retry = server
        .client
        .allocate(serde_json::json!({ "idempotency_key": "ZmF1bHQ" }))
        .await;
    assert_eq!(retry.status, 409, "{retry:?}");
    server.stop().await;
    admin
        .run_command(doc! { "configureFailPoint": "failCommand", "mode": "off" })
        .await
        .unwrap();
    scratch.remove().await;
}

#[test]
fn app_names_are_added_to_any_uri() {
    assert_eq!(
        with_app_name("mongodb://db:27017", "t"),
        "mongodb://db:27017/?appName=t"
    );
    assert_eq!(
        with_app_name("mongodb://a,b/?replicaSet=rs0&appName=x", "t"),
        "mongodb://a,b/?replicaSet=rs0&appName=t"
    );
    assert_eq!(
        with_app_name("mongodb+srv://u:p@c.example/db?w=1", "t"),
        "mongodb+srv://u:p@c.example/db?w=1&appName=t"
    );
}
