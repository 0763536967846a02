//! The MongoDB store through the real driver against a scripted wire-protocol peer
//! (`common::fake_mongod`), since no MongoDB runs here: what the store sends (every filter
//! and index with the simple collation, the write concern, no read concern) and what it does
//! with the answers a MongoDB gives in the cases a desk review found: a server older than
//! 4.4, an index created by the legacy shell, a partial unique index, a mongos without a
//! primary at start, a write concern error. The answers scripted here are MongoDB's as its
//! manual and source give them; `store_mongodb.rs` runs the same store against a real one.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::fake_mongod::{FakeMongod, WIRE_4_2, WIRE_6_0, cursor, error, ok};
use common::{TestServer, run_to_exit};
use idempotency_server::store::mongodb::STRAY_INDEX;
use idempotency_server::store::{Allocate, Store, StoreError};
use idempotency_server::{MongoOptions, MongoStore};
use idempotency_spec::problem_type;
use mongodb::bson::{Bson, Document, doc};
use serde_json::json;

fn options(uri: String) -> MongoOptions {
    MongoOptions {
        uri,
        database: "idempotent-requests".into(),
        collection: "captures".into(),
        write_timeout: Duration::from_secs(1),
        timeout: Duration::from_secs(2),
        start_timeout: Duration::from_secs(2),
        default_lease: Duration::from_secs(60),
        retention: Duration::from_secs(3600),
    }
}

const NS: &str = "idempotent-requests.captures";

/// The indexes as the server creates them, as `listIndexes` lists them.
fn the_servers_indexes() -> Vec<Document> {
    vec![
        doc! { "v": 2, "key": { "_id": 1 }, "name": "_id_" },
        doc! { "v": 2, "key": { "idempotency_key": 1 }, "name": "idempotency_key_1", "unique": true },
        doc! { "v": 2, "key": { "expires_at": 1 }, "name": "expires_at_1", "expireAfterSeconds": 0 },
        doc! { "v": 2, "key": { "lease_token": 1 }, "name": STRAY_INDEX,
        "partialFilterExpression": { "status": "completed", "lease_token": { "$exists": true } } },
    ]
}

/// A MongoDB with `indexes` on the collection, accepting everything else.
fn with_indexes(indexes: Vec<Document>) -> impl Fn(&str, &Document) -> Document + Send + Sync {
    move |name, _| match name {
        "listIndexes" => cursor(NS, indexes.clone()),
        "update" => ok(doc! { "n": 0, "nModified": 0 }),
        _ => ok(doc! {}),
    }
}

#[tokio::test]
async fn a_mongodb_older_than_4_4_stops_the_start_at_once_naming_the_versions() {
    let mongod = FakeMongod::start(WIRE_4_2, with_indexes(the_servers_indexes())).await;
    let error = MongoStore::open(options(mongod.uri()))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("MongoDB 4.4 or later is required"),
        "{error}"
    );
    assert!(error.contains("wire version 8"), "{error}");
    // Not retried until --store-start-timeout: that would end "(still failing after 2s)".
    assert!(!error.contains("still failing"), "{error}");

    // The binary: one line, exit status 1.
    let dir = tempfile::tempdir().unwrap();
    let uri = mongod.uri();
    let (status, stderr) = run_to_exit(
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            dir.path().to_str().unwrap(),
        ],
        &[("MONGODB_URI", &uri), ("STORE_START_TIMEOUT", "60s")],
    )
    .await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("MongoDB 4.4 or later is required"),
        "{stderr}"
    );
}

#[tokio::test]
async fn an_index_the_legacy_shell_created_with_doubles_lets_the_store_open() {
    // Every number a double, as the legacy mongo shell sends them.
    let indexes = vec![
        doc! { "v": 2.0, "key": { "_id": 1.0 }, "name": "_id_" },
        doc! { "v": 2.0, "key": { "idempotency_key": 1.0 }, "name": "idempotency_key_1", "unique": true },
        doc! { "v": 2.0, "key": { "expires_at": 1.0 }, "name": "expires_at_1", "expireAfterSeconds": 0.0 },
        the_servers_indexes()[3].clone(),
    ];
    let mongod = FakeMongod::start(WIRE_6_0, with_indexes(indexes)).await;
    let store = MongoStore::open(options(mongod.uri())).await.unwrap();
    // They serve: nothing created.
    assert!(
        mongod.named("createIndexes").is_empty(),
        "{:?}",
        mongod.commands()
    );
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_partial_or_case_insensitive_unique_index_stops_the_start_naming_it() {
    for (option, value, why) in [
        (
            "partialFilterExpression",
            Bson::Document(doc! { "status": "allocated" }),
            "is partial",
        ),
        (
            "collation",
            Bson::Document(doc! { "locale": "en", "strength": 2 }),
            "collation",
        ),
    ] {
        let mut indexes = the_servers_indexes();
        indexes[1].insert(option, value);
        let mongod = FakeMongod::start(WIRE_6_0, with_indexes(indexes)).await;
        let error = MongoStore::open(options(mongod.uri()))
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("idempotency_key_1")
                && error.contains(why)
                && error.contains("dropIndex"),
            "{error}"
        );
        assert!(mongod.named("createIndexes").is_empty());
    }
}

fn is_simple(command: &Document) -> bool {
    command.get_document("collation").ok() == Some(&doc! { "locale": "simple" })
}

#[tokio::test]
async fn a_new_collection_gets_the_three_indexes_and_the_migration_with_the_simple_collation() {
    let mongod = FakeMongod::start(WIRE_6_0, |name, _| match name {
        "listIndexes" => error(26, "NamespaceNotFound", "ns does not exist"),
        "update" => ok(doc! { "n": 0, "nModified": 0 }),
        _ => ok(doc! {}),
    })
    .await;
    let store = MongoStore::open(options(mongod.uri())).await.unwrap();
    let created = mongod.named("createIndexes");
    assert_eq!(created.len(), 1, "{created:?}");
    let indexes = created[0].get_array("indexes").unwrap();
    let keys: Vec<&Document> = indexes
        .iter()
        .map(|i| i.as_document().unwrap().get_document("key").unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            &doc! { "idempotency_key": 1 },
            &doc! { "expires_at": 1 },
            &doc! { "lease_token": 1 }
        ]
    );
    for index in indexes {
        let index = index.as_document().unwrap();
        assert!(is_simple(index), "{index}");
    }
    let stray = indexes[2].as_document().unwrap();
    assert_eq!(stray.get_str("name").unwrap(), STRAY_INDEX);
    assert_eq!(
        stray.get_document("partialFilterExpression").unwrap(),
        &doc! { "status": "completed", "lease_token": { "$exists": true } }
    );
    // The migration: two updates, many documents each, the second one the strays.
    let updates = mongod.named("update");
    assert_eq!(updates.len(), 2, "{updates:?}");
    let statements: Vec<&Document> = updates
        .iter()
        .map(|u| u.get_array("updates").unwrap()[0].as_document().unwrap())
        .collect();
    assert_eq!(
        statements[0].get_document("q").unwrap(),
        &doc! { "expires_at": { "$exists": false } }
    );
    assert_eq!(
        statements[1].get_document("q").unwrap(),
        &doc! { "status": "completed", "lease_token": { "$exists": true } }
    );
    for statement in statements {
        assert_eq!(statement.get_bool("multi").ok(), Some(true));
        assert!(is_simple(statement), "{statement}");
    }
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_mongos_without_a_primary_at_start_is_waited_for() {
    // mongos answers FailedToSatisfyReadPreference while a shard elects a primary; then it
    // answers.
    let failures = Arc::new(AtomicUsize::new(0));
    let seen = failures.clone();
    let indexes = the_servers_indexes();
    let mongod = FakeMongod::start(WIRE_6_0, move |name, _| match name {
        "listIndexes" if seen.fetch_add(1, Ordering::SeqCst) < 2 => error(
            133,
            "FailedToSatisfyReadPreference",
            "Could not find host matching read preference { mode: \"primary\" } for set rs0",
        ),
        "listIndexes" => cursor(NS, indexes.clone()),
        "update" => ok(doc! { "n": 0, "nModified": 0 }),
        _ => ok(doc! {}),
    })
    .await;
    let mut options = options(mongod.uri());
    options.start_timeout = Duration::from_secs(20);
    let store = MongoStore::open(options).await.unwrap();
    assert_eq!(mongod.named("listIndexes").len(), 3);
    store.shutdown().await.unwrap();
}

/// An allocation: what is sent (one findAndModify, upsert, simple collation, a journaled
/// majority, no read concern), and a write concern error in its answer: the change may exist
/// on the primary alone, so it is not acknowledged, a 503.
#[tokio::test]
async fn an_allocation_not_acknowledged_by_a_majority_is_503() {
    let indexes = the_servers_indexes();
    let mongod = FakeMongod::start(WIRE_6_0, move |name, body| match name {
        "listIndexes" => cursor(NS, indexes.clone()),
        "update" => ok(doc! { "n": 0, "nModified": 0 }),
        "findAndModify" => {
            // The pipeline's allocation, as MongoDB would have applied it.
            let token = body.get_array("update").unwrap()[0]
                .as_document()
                .and_then(|s| s.get_document("$replaceWith").ok())
                .and_then(|r| r.get_document("$cond").ok())
                .and_then(|c| c.get_document("else").ok())
                .and_then(|e| e.get_document("lease_token").ok())
                .and_then(|t| t.get_str("$literal").ok())
                .unwrap()
                .to_owned();
            ok(doc! {
                "lastErrorObject": { "n": 1, "updatedExisting": false },
                "value": { "idempotency_key": "a2V5", "status": "allocated",
                    "lease_token": token, "expires_at": mongodb::bson::DateTime::now() },
                "writeConcernError": { "code": 64, "codeName": "WriteConcernTimeout",
                    "errmsg": "waiting for replication timed out", "errInfo": { "wtimeout": true } },
            })
        }
        _ => ok(doc! {}),
    })
    .await;
    let store = Arc::new(MongoStore::open(options(mongod.uri())).await.unwrap());
    let direct = store
        .allocate(Allocate {
            key: "a2V5".into(),
            fingerprint: None,
            lease: Duration::from_secs(60),
        })
        .await;
    assert!(
        matches!(&direct, Err(StoreError::Unavailable(why)) if why.contains("majority")),
        "{direct:?}"
    );
    let sent = mongod.named("findAndModify");
    let command = sent.last().unwrap();
    assert_eq!(command.get_bool("upsert").ok(), Some(true));
    assert!(is_simple(command), "{command}");
    assert_eq!(
        command.get_document("writeConcern").unwrap(),
        &doc! { "w": "majority", "wtimeout": 1000, "j": true }
    );
    assert!(!command.contains_key("readConcern"), "{command}");

    let server = TestServer::start_on(store).await;
    let answer = server
        .client
        .allocate(json!({ "idempotency_key": "a2V5" }))
        .await;
    answer.assert_problem(503, problem_type::STORE_UNAVAILABLE);
    server.stop().await;
}
