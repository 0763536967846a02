//! The MongoDB store: the old server's database, shared by any number of server processes.
//! MongoDB 4.4 or later: the driver (`mongodb` 3.x) needs wire version 9, and refuses older
//! servers at server selection ([`classify`] makes that fatal at start).
//!
//! # One document per key
//!
//! ```text
//! { idempotency_key: K,                 // unique index
//!   status: "allocated" | "completed",
//!   lease_token: "9f1c…",               // while allocated
//!   fingerprint: "…",                   // when one was presented
//!   capture: { response_status, response_body, response_headers: [{key, value}] },
//!   expires_at: ISODate(…) }            // the lease's end, or the retention's; TTL index
//! ```
//!
//! `expires_at` is a real BSON date with a TTL index (`expireAfterSeconds: 0`), so MongoDB
//! deletes expired documents by itself (the old server put its TTL on the string key, and
//! nothing ever expired). As in every store, a document whose `expires_at` has passed is free
//! to every operation whether or not the TTL monitor (which runs about once a minute) has
//! deleted it yet: the operations compare `expires_at` with the clock themselves.
//!
//! # Each operation is one atomic command on one document
//!
//! - **allocate**: ONE `findOneAndUpdate` with `upsert` and an update pipeline
//!   ([`allocate_update`]): if the document is live it is left as it is, otherwise (none, or
//!   expired) it becomes a new allocation with the caller's token. MongoDB runs a
//!   single-document update atomically, so two allocations of one key never both find it free.
//!   The document after the update tells the answer ([`allocate_outcome`]): ours (our new
//!   token) → 202; otherwise it was live and unchanged → 422, 409 or the replay, decided as the
//!   state machine does.
//! - **record**: `findOneAndUpdate` matching only a live allocation held with the presented
//!   token ([`holder_filter`]); no match → 403. A capture whose document would pass MongoDB's
//!   16 MiB is not sent at all ([`completed_document_size`]) → 413.
//! - **release**: `deleteOne` with the same filter; nothing deleted → 403.
//!
//! Two first allocations of a new key may both try to insert; the unique index lets one in and
//! fails the other with a duplicate-key error (E11000), which is retried (it then finds the
//! document), never answered 500.
//!
//! Every command, and every index the store creates, names the simple (binary) collation: a
//! collection created with a default collation (case-insensitive, say) would otherwise give it
//! to our filters and indexes, and two keys differing in case would be one key.
//!
//! # Time
//!
//! The pipelines and filters use `$$NOW`, MongoDB's clock, not the server process's: every
//! process sharing the database sees the same instant. On a replica set it is the primary's
//! clock, which the TTL monitor also uses. On a sharded cluster mongos evaluates `$$NOW` for a
//! findAndModify and an update and sends it to the shard with the command (mongo's
//! `cluster_find_and_modify_cmd.cpp`: "Append mongoS' runtime constants to the command object
//! before forwarding it to the shard"), while each shard's TTL monitor runs on that shard's
//! clock; see README (Sharding) for what skew between them can do.
//!
//! # Durability and consistency
//!
//! Writes use write concern `majority` with a time-out (`--mongodb-write-timeout`) and
//! `j: true`: an answer is sent once a majority of the replica set has the change in its
//! journal, so a failover does not roll it back. A write concern time-out is a 503 (the change
//! may exist on the primary only). Every decision is made by the write command itself, on the
//! primary, under the document's lock: it reads the latest state of the document there,
//! including every write acknowledged before it (they are majority-committed, so a new primary
//! has them too). Read-your-writes across processes therefore needs no causal session and no
//! read concern: none of the commands sent (findAndModify, update, delete, listIndexes,
//! createIndexes, ping) takes one (in the driver only find, aggregate, count and distinct
//! carry a read concern), so the store sets none. The driver retries a write once after a
//! network error or a failover (retryable writes, with a transaction number, so never twice).
//!
//! # The old server's documents, and a fleet of old and new servers
//!
//! The old server's documents have no `expires_at` and no lease token. A migration at start,
//! and again every [`MIGRATION_INTERVAL`] while old servers may still write, gives each one an
//! `expires_at` ([`migration_filter`]): a completed capture is replayed for one more
//! retention, an allocation gets the default lease (the old server's allocations never
//! expired). Until then a document without `expires_at` counts as live. An old allocation
//! holds no token: an old client (no token) can record it, a token never matches it.
//!
//! While old and new servers share the collection, an old server can also record an
//! allocation a new server made: its record matches any `status: "allocated"` and only sets
//! `status` and `capture`, so the document is completed but keeps the lease's token and
//! `expires_at`, and would be deleted at the lease's end instead of after the retention. The
//! same migration finds those ([`stray_filter`], served by a partial index that holds only
//! them) and gives them the retention from now, without the token.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use idempotency_spec::{Capture, MAX_FINGERPRINT_LEN};
use mongodb::bson::{self, Bson, DateTime, Document, doc, oid::ObjectId};
use mongodb::error::{Error as MongoError, ErrorKind, WriteFailure};
use mongodb::options::{
    Acknowledgment, ClientOptions, Collation, CollectionOptions, IndexOptions, ReturnDocument,
    WriteConcern,
};
use mongodb::{Client, Collection, Database, IndexModel};

use super::{
    Allocate, AllocateOutcome, Closed, Entry, Record, RecordOutcome, Release, ReleaseOutcome,
    StartAttempt, Store, StoreError, UnixMillis, fingerprints_conflict, new_lease_token,
    retry_start,
};
use crate::config::redact_url;

const KEY: &str = "idempotency_key";
const STATUS: &str = "status";
const TOKEN: &str = "lease_token";
const FINGERPRINT: &str = "fingerprint";
const CAPTURE: &str = "capture";
const EXPIRES_AT: &str = "expires_at";
/// In an allocation that took an expired lease over: `true` (absent otherwise).
const TAKEN_OVER: &str = "taken_over";
const ALLOCATED: &str = "allocated";
const COMPLETED: &str = "completed";

/// The partial index that holds only the documents an old server completed from a new
/// server's allocation ([`stray_filter`]): empty while no old server writes, so it costs
/// nothing on the hot path, and it lets the migration find them without a collection scan.
pub const STRAY_INDEX: &str = "completed_with_lease_token";

/// MongoDB's duplicate-key error.
const DUPLICATE_KEY: i32 = 11000;
/// How often an allocation that met a duplicate-key error is tried again. One retry finds the
/// document the other allocation inserted; more only guard against a pathological race.
const DUPLICATE_RETRIES: usize = 5;
/// How often the migration runs after the start. Short, because a document an old server
/// completed from a new allocation is free from its lease's end until the migration fixes it;
/// cheap, because both of its updates are served by an index that is empty in the steady state.
pub const MIGRATION_INTERVAL: Duration = Duration::from_secs(5);

/// The largest document MongoDB stores: `BSONObjMaxUserSize`, 16 MiB (mongo's
/// `src/mongo/bson/util/builder.h`). A completed document holds the whole capture.
pub const MAX_DOCUMENT_BYTES: usize = 16 * 1024 * 1024;

/// How the MongoDB store is opened.
#[derive(Debug, Clone)]
pub struct MongoOptions {
    pub uri: String,
    pub database: String,
    pub collection: String,
    /// The write concern's time-out: how long a write waits for a majority.
    pub write_timeout: Duration,
    /// Server selection and connection time-out; with `write_timeout`, the most an operation
    /// may take before it is a 503. Values in the URI (`serverSelectionTimeoutMS`,
    /// `connectTimeoutMS`) win.
    pub timeout: Duration,
    /// How long `open` keeps trying to reach MongoDB and create the indexes.
    pub start_timeout: Duration,
    /// The lease the migration gives an old server's allocation.
    pub default_lease: Duration,
    /// The retention the migration gives an old server's capture.
    pub retention: Duration,
}

/// The MongoDB store.
pub struct MongoStore {
    client: Client,
    database: Database,
    collection: Collection<Document>,
    timeout: Duration,
    default_lease: Duration,
    retention: Duration,
    last_migration: Mutex<Instant>,
    closed: Closed,
}

impl MongoStore {
    /// Connect, create the indexes and migrate the old server's documents, retrying for
    /// `options.start_timeout` (MongoDB may start after the server). Fails with one line
    /// naming the deployment (without its password) and the cause.
    pub async fn open(options: MongoOptions) -> anyhow::Result<MongoStore> {
        let target = redact_url(&options.uri);
        let store = retry_start(
            &format!("MongoDB at {target}"),
            options.start_timeout,
            || MongoStore::connect(&options),
        )
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the MongoDB store at {target}: {e}"))?;
        tracing::info!(
            mongodb = %target,
            database = %options.database,
            collection = %options.collection,
            "mongodb store open"
        );
        Ok(store)
    }

    async fn connect(options: &MongoOptions) -> Result<MongoStore, StartAttempt> {
        let mut client_options = ClientOptions::parse(&options.uri)
            .await
            .map_err(start_failure)?;
        client_options
            .app_name
            .get_or_insert_with(|| "idempotency-server".into());
        client_options
            .server_selection_timeout
            .get_or_insert(options.timeout);
        client_options
            .connect_timeout
            .get_or_insert(options.timeout);
        let client = Client::with_options(client_options).map_err(start_failure)?;
        let database = client.database(&options.database);
        // Set on the collection, so that it holds whatever the URI says. No read concern: no
        // command of the store takes one (module doc).
        let collection = database.collection_with_options(
            &options.collection,
            CollectionOptions::builder()
                .write_concern(write_concern(options.write_timeout))
                .build(),
        );
        let store = MongoStore {
            client,
            database,
            collection,
            timeout: options.timeout + options.write_timeout,
            default_lease: options.default_lease,
            retention: options.retention,
            last_migration: Mutex::new(Instant::now()),
            closed: Closed::default(),
        };
        store.ensure_indexes().await?;
        store.migrate().await.map_err(start_failure)?;
        Ok(store)
    }

    /// Create the indexes that are missing ([`missing_indexes`]); an existing index that
    /// cannot serve stops the start with a message naming it.
    async fn ensure_indexes(&self) -> Result<(), StartAttempt> {
        let mut existing = Vec::new();
        match self.collection.list_indexes().await {
            Ok(cursor) => {
                // As plain documents, not the driver's `IndexModel`: an index some tool created
                // with an unusual type for a field (the legacy shell's `expireAfterSeconds:
                // 0.0`, a double where `IndexModel` wants an unsigned integer) must not make
                // the collection unreadable; `ExistingIndex` coerces what it inspects.
                let mut cursor = cursor.with_type::<Document>();
                while cursor.advance().await.map_err(start_failure)? {
                    let spec: Document = cursor.deserialize_current().map_err(start_failure)?;
                    existing.push(ExistingIndex::from_spec(&spec));
                }
            }
            // A collection that does not exist yet has no index.
            Err(e) if command_code(&e) == Some(NAMESPACE_NOT_FOUND) => {}
            Err(e) => return Err(start_failure(e)),
        }
        let missing = missing_indexes(&existing).map_err(StartAttempt::Fatal)?;
        if !missing.is_empty() {
            tracing::info!(
                indexes = ?missing.iter().map(|m| m.keys.clone()).collect::<Vec<_>>(),
                "creating the MongoDB indexes"
            );
            self.collection
                .create_indexes(missing)
                .await
                .map_err(start_failure)?;
        }
        Ok(())
    }

    /// Give the old server's documents an expiry, and the retention to those an old server
    /// completed from a new allocation; see the module doc.
    async fn migrate(&self) -> Result<u64, MongoError> {
        let old = self
            .collection
            .update_many(
                migration_filter(),
                migration_update(millis(self.default_lease), millis(self.retention)),
            )
            .collation(simple_collation())
            .await?;
        let strays = self
            .collection
            .update_many(stray_filter(), stray_update(millis(self.retention)))
            .collation(simple_collation())
            .await?;
        if old.modified_count > 0 {
            tracing::info!(
                documents = old.modified_count,
                "gave the old server's documents an expiry"
            );
        }
        if strays.modified_count > 0 {
            tracing::info!(
                documents = strays.modified_count,
                "gave the retention to captures an old server recorded on a new allocation"
            );
        }
        Ok(old.modified_count + strays.modified_count)
    }

    /// Run one command within the operation's time limit.
    async fn call<T>(
        &self,
        call: impl Future<Output = Result<T, MongoError>>,
    ) -> Result<T, Failure> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result.map_err(|e| classify(&e)),
            Err(_) => Err(Failure::TimedOut(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        }
    }
}

/// The write concern of every write: a majority, journaled, within `timeout`.
pub fn write_concern(timeout: Duration) -> WriteConcern {
    WriteConcern::builder()
        .w(Acknowledgment::Majority)
        .w_timeout(timeout)
        .journal(true)
        .build()
}

/// Binary comparison of strings, named on every command and index: the collection's default
/// collation, if it has one, must not apply (module doc).
pub fn simple_collation() -> Collation {
    Collation::builder().locale("simple").build()
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// `$$NOW + ms`: a BSON date, on MongoDB's clock.
fn now_plus(ms: i64) -> Bson {
    bson::bson!({ "$add": ["$$NOW", ms] })
}

/// A value from the caller, inside an aggregation expression: `$literal`, so that a string
/// starting with `$` (a response body, a header, a fingerprint) is never read as a field path
/// or an operator.
fn literal(value: impl Into<Bson>) -> Bson {
    bson::bson!({ "$literal": value.into() })
}

/// The document's expiry as the operations see it: `expires_at`, or for an old document that
/// has none yet, the end of time (live until the migration gives it one).
fn effective_expiry() -> Bson {
    bson::bson!({ "$ifNull": [format!("${EXPIRES_AT}"), DateTime::MAX] })
}

/// The one document of a key.
pub fn key_filter(key: &str) -> Document {
    doc! { KEY: key }
}

/// Whether the document is live at `$$NOW`: allocated or completed, and not yet expired. A
/// missing document seen by an upsert has no status: not live.
fn live() -> Bson {
    bson::bson!({ "$and": [
        { "$in": [format!("${STATUS}"), [ALLOCATED, COMPLETED]] },
        { "$gt": [effective_expiry(), "$$NOW"] },
    ] })
}

/// The update pipeline of an allocation, run by `findOneAndUpdate` with `upsert` on
/// [`key_filter`]. The whole state machine's write in one stage:
///
/// - the key is **live** (allocated with a lease that has not expired, or completed within its
///   retention): the document is kept exactly as it is (`$$ROOT`); the caller learns which
///   live state from the document returned ([`allocate_outcome`]);
/// - the key is **free** (no document, so the upsert's `{idempotency_key: K}`; or a document
///   whose `expires_at` has passed: an expired lease or capture): it becomes a new allocation,
///   replacing everything (the old token, fingerprint and capture are forgotten), with the
///   caller's new token, the presented fingerprint (none when absent or empty),
///   `expires_at = $$NOW + lease`, and `taken_over: true` when what it replaced was an
///   (expired) allocation, so that the caller learns it took a lease over (until the TTL
///   monitor deletes an expired lease, within a minute: then it is a first allocation).
pub fn allocate_update(
    key: &str,
    fingerprint: Option<&str>,
    lease_ms: i64,
    token: &str,
) -> Vec<Document> {
    let mut allocation = doc! {
        "_id": "$_id",
        KEY: literal(key),
        STATUS: ALLOCATED,
        TOKEN: literal(token),
        EXPIRES_AT: now_plus(lease_ms),
        // `$$REMOVE`: no field at all, rather than a `false` in every document.
        TAKEN_OVER: { "$cond": [{ "$eq": [format!("${STATUS}"), ALLOCATED] }, true, "$$REMOVE"] },
    };
    if let Some(fingerprint) = fingerprint.filter(|f| !f.is_empty()) {
        allocation.insert(FINGERPRINT, literal(fingerprint));
    }
    vec![doc! {
        "$replaceWith": { "$cond": { "if": live(), "then": "$$ROOT", "else": allocation } }
    }]
}
/// What an allocation answers, from the document `findOneAndUpdate` returned (after the
/// update). Our token in it: the key was free and is ours now (202). Otherwise the pipeline
/// kept a live document, and the state machine's rows apply: a fingerprint mismatch first
/// (422), then in flight (409) or the replay (200).
pub fn allocate_outcome(
    document: &Document,
    token: &str,
    fingerprint: Option<&str>,
) -> Result<AllocateOutcome, StoreError> {
    let entry = decode(document)?;
    match entry {
        Entry::Allocated {
            lease_token,
            lease_expires_at,
            ..
        } if lease_token == token => Ok(AllocateOutcome::Allocated {
            lease_token,
            lease_expires_at,
            taken_over: document.get_bool(TAKEN_OVER).unwrap_or(false),
        }),
        entry if fingerprints_conflict(entry.fingerprint(), fingerprint) => {
            Ok(AllocateOutcome::FingerprintMismatch)
        }
        Entry::Allocated {
            lease_expires_at, ..
        } => Ok(AllocateOutcome::InFlight { lease_expires_at }),
        Entry::Completed { capture, .. } => Ok(AllocateOutcome::Completed(capture)),
    }
}

/// The documents a record or a release may act on: the key's, allocated, with a lease that has
/// not expired at `$$NOW`, and, when a token is presented, held with that token (without one,
/// any live allocation: the old clients). Everything else (no document, completed, expired,
/// taken over, another token) matches nothing: 403.
pub fn holder_filter(key: &str, token: Option<&str>) -> Document {
    let mut filter = doc! { KEY: key, STATUS: ALLOCATED };
    if let Some(token) = token {
        filter.insert(TOKEN, token);
    }
    filter.insert("$expr", doc! { "$gt": [effective_expiry(), "$$NOW"] });
    filter
}

/// The update pipeline of a record, on [`holder_filter`]: completed, with the capture (a
/// `$literal`: it is the caller's data; give it as [`capture_document`]), kept for the
/// retention from `$$NOW`; the allocation's fingerprint stays; the token goes, so it is
/// refused from now on.
pub fn record_update(capture: Document, retention_ms: i64) -> Vec<Document> {
    vec![
        doc! { "$set": {
            STATUS: COMPLETED,
            CAPTURE: literal(capture),
            EXPIRES_AT: now_plus(retention_ms),
        } },
        doc! { "$unset": [TOKEN, TAKEN_OVER] },
    ]
}

/// A capture as the document `record_update` stores.
pub fn capture_document(capture: &Capture) -> Result<Document, StoreError> {
    bson::serialize_to_document(capture)
        .map_err(|e| StoreError::Corrupt(format!("a capture cannot be encoded: {e}")))
}

/// The size in BSON bytes of the document a record would leave for `key` with `capture`
/// (`_id`, key, status, the allocation's fingerprint, the capture, `expires_at`), the
/// fingerprint counted at its largest ([`MAX_FINGERPRINT_LEN`]) since the record does not
/// know it: exact but for that, so never less than what MongoDB will measure.
///
/// BSON is not JSON: every header is a subdocument with its own length, type bytes, field
/// names and array indexes as strings, so a capture of many small headers takes more bytes
/// in BSON than in the JSON the caller sent (up to about four times for empty values), and a
/// record within `--body-limit` can still pass the 16 MiB. A body dominated capture takes
/// about its JSON size.
pub fn completed_document_size(key: &str, capture: &Document) -> Result<usize, StoreError> {
    let encoded = |document: &Document| {
        document
            .to_vec()
            .map(|bytes| bytes.len())
            .map_err(|e| StoreError::Corrupt(format!("a capture cannot be encoded: {e}")))
    };
    // The other fields, with an empty capture (5 bytes: a length and the terminator), then
    // the capture's own bytes in its place.
    let skeleton = doc! {
        "_id": ObjectId::new(),
        KEY: key,
        STATUS: COMPLETED,
        FINGERPRINT: "f".repeat(MAX_FINGERPRINT_LEN),
        CAPTURE: {},
        EXPIRES_AT: DateTime::MAX,
    };
    Ok(encoded(&skeleton)? - 5 + encoded(capture)?)
}

/// The old server's documents: no `expires_at`.
pub fn migration_filter() -> Document {
    doc! { EXPIRES_AT: { "$exists": false } }
}

/// Their expiry from now: the default lease for an allocation, the retention otherwise.
pub fn migration_update(lease_ms: i64, retention_ms: i64) -> Vec<Document> {
    vec![doc! { "$set": { EXPIRES_AT: { "$add": [
        "$$NOW",
        { "$cond": [{ "$eq": [format!("${STATUS}"), ALLOCATED] }, lease_ms, retention_ms] },
    ] } } }]
}

/// The documents an old server completed from a new server's allocation: completed, yet
/// still holding a lease token (a record by a new server removes it). Also the partial
/// filter of [`STRAY_INDEX`], so that the migration's query is served by that index.
pub fn stray_filter() -> Document {
    doc! { STATUS: COMPLETED, TOKEN: { "$exists": true } }
}

/// What a record by a new server would have left: the retention from now (the old server
/// recorded it since the last migration), and no token.
pub fn stray_update(retention_ms: i64) -> Vec<Document> {
    vec![
        doc! { "$set": { EXPIRES_AT: now_plus(retention_ms) } },
        doc! { "$unset": [TOKEN] },
    ]
}

/// A stored document as an [`Entry`]. `expires_at` missing (an old document before its
/// migration): live for ever. A missing token (an old allocation): the empty string, which no
/// filter ever matches. `response_headers: null` (an old capture without headers): none.
pub fn decode(document: &Document) -> Result<Entry, StoreError> {
    let corrupt = |why: &str| {
        let key = document.get_str(KEY).unwrap_or("?");
        StoreError::Corrupt(format!(
            "the document of key {}: {why}",
            idempotency_spec::key_digest(key)
        ))
    };
    let expires_at: UnixMillis = match document.get(EXPIRES_AT) {
        None | Some(Bson::Null) => UnixMillis::MAX,
        Some(Bson::DateTime(at)) => u64::try_from(at.timestamp_millis()).unwrap_or(0),
        Some(_) => return Err(corrupt("expires_at is not a date")),
    };
    let fingerprint = match document.get(FINGERPRINT) {
        None | Some(Bson::Null) => None,
        Some(Bson::String(f)) if f.is_empty() => None,
        Some(Bson::String(f)) => Some(f.clone()),
        Some(_) => return Err(corrupt("fingerprint is not a string")),
    };
    match document.get_str(STATUS) {
        Ok(ALLOCATED) => Ok(Entry::Allocated {
            lease_token: document.get_str(TOKEN).unwrap_or_default().to_owned(),
            lease_expires_at: expires_at,
            fingerprint,
        }),
        Ok(COMPLETED) => {
            let mut capture = document
                .get_document(CAPTURE)
                .map_err(|_| corrupt("a completed document without its capture"))?
                .clone();
            if matches!(capture.get("response_headers"), None | Some(Bson::Null)) {
                capture.insert("response_headers", Bson::Array(Vec::new()));
            }
            let capture: Capture = bson::deserialize_from_document(capture)
                // Not the driver's message: it may quote a value of the capture.
                .map_err(|_| corrupt("its capture is not a capture"))?;
            Ok(Entry::Completed {
                capture,
                expires_at,
                fingerprint,
            })
        }
        _ => Err(corrupt("status is neither allocated nor completed")),
    }
}

/// An index found on the collection, from its `listIndexes` document: the fields the store
/// inspects, each read as MongoDB itself reads it, whatever type the tool that created it
/// stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ExistingIndex {
    pub name: String,
    pub keys: Document,
    pub unique: bool,
    /// `expireAfterSeconds` as a number (NaN when present but not a number).
    pub expire_after_secs: Option<f64>,
    pub partial_filter: Option<Document>,
    /// `None` for the simple collation (no `collation` field, or `locale: "simple"`).
    pub collation: Option<Document>,
}

impl ExistingIndex {
    /// `unique` by BSON truthiness, as mongo's `IndexDescriptor` reads it
    /// (`infoObj[kUniqueFieldName].trueValue()`, `index_descriptor.cpp`): `true`, `1`, `1.0`.
    /// `expireAfterSeconds` as any number: an int, a long, or the legacy shell's double `0.0`.
    /// A partial index is one with the field at all (`_partial(!...eoo())`, same file).
    pub fn from_spec(spec: &Document) -> ExistingIndex {
        let collation = match spec.get("collation") {
            None | Some(Bson::Null) => None,
            Some(Bson::Document(c)) if c.get_str("locale").ok() == Some("simple") => None,
            Some(Bson::Document(c)) => Some(c.clone()),
            Some(other) => Some(doc! { "collation": other.clone() }),
        };
        ExistingIndex {
            name: spec.get_str("name").unwrap_or("?").to_owned(),
            keys: spec.get_document("key").cloned().unwrap_or_default(),
            unique: spec.get("unique").is_some_and(true_value),
            expire_after_secs: spec
                .get("expireAfterSeconds")
                .map(|v| number(v).unwrap_or(f64::NAN)),
            partial_filter: spec.get("partialFilterExpression").map(|f| match f {
                Bson::Document(f) => f.clone(),
                other => doc! { "partialFilterExpression": other.clone() },
            }),
            collation,
        }
    }
}

/// BSON's `trueValue()`: false for `false`, zero, null and undefined; true otherwise.
fn true_value(value: &Bson) -> bool {
    match value {
        Bson::Boolean(b) => *b,
        Bson::Null | Bson::Undefined => false,
        other => number(other).is_none_or(|n| n != 0.0),
    }
}

fn number(value: &Bson) -> Option<f64> {
    match value {
        Bson::Int32(n) => Some(f64::from(*n)),
        Bson::Int64(n) => Some(*n as f64),
        Bson::Double(n) => Some(*n),
        Bson::Decimal128(n) => n.to_string().parse().ok(),
        _ => None,
    }
}

/// Whether `keys` is the ascending index on `field` alone (1 as any number).
fn ascending_on(keys: &Document, field: &str) -> bool {
    keys.len() == 1 && keys.get(field).and_then(number) == Some(1.0)
}

/// Why an index on `idempotency_key` cannot be the unique index the store relies on, if it
/// cannot. Partial: uniqueness holds only among the documents it matches. Not simple
/// collation: keys that differ only in case (or accents) would be one key, and the store's
/// filters, which use the simple collation, could not use the index.
fn unfit_as_unique(index: &ExistingIndex) -> Option<String> {
    if !index.unique {
        Some("is not unique".into())
    } else if let Some(filter) = &index.partial_filter {
        Some(format!(
            "is partial (partialFilterExpression {filter}): keys are unique only among the \
             documents it matches"
        ))
    } else {
        index.collation.as_ref().map(|collation| {
            format!(
                "has the collation {collation}: keys that differ only in case or accents would \
                 be one key"
            )
        })
    }
}

/// The indexes to create, given those that exist:
///
/// - unique on `idempotency_key`, simple collation, not partial (the old server's, unique with
///   a useless TTL on the string, is accepted as it is);
/// - a TTL index (`expireAfterSeconds: 0`) on `expires_at`, not partial (a partial one would
///   leave the documents outside its filter for ever);
/// - [`STRAY_INDEX`], the partial index of the migration ([`stray_filter`]).
///
/// An existing index on `idempotency_key` or `expires_at` that cannot serve is an error naming
/// it, with what to do: the server does not drop an operator's index.
pub fn missing_indexes(existing: &[ExistingIndex]) -> Result<Vec<IndexModel>, String> {
    let options = || IndexOptions::builder().collation(simple_collation());
    let mut missing = Vec::new();

    let on_key: Vec<&ExistingIndex> = existing
        .iter()
        .filter(|i| ascending_on(&i.keys, KEY))
        .collect();
    if !on_key.iter().any(|i| unfit_as_unique(i).is_none()) {
        if let Some(index) = on_key.first() {
            let why = unfit_as_unique(index).unwrap_or_default();
            return Err(format!(
                "the index {} on {KEY} {why}, so two servers could allocate one key twice; drop \
                 it (db.<collection>.dropIndex(\"{}\")) and the server creates a unique one",
                index.name, index.name
            ));
        }
        missing.push(
            IndexModel::builder()
                .keys(doc! { KEY: 1 })
                .options(options().unique(true).build())
                .build(),
        );
    }

    let on_expiry: Vec<&ExistingIndex> = existing
        .iter()
        .filter(|i| ascending_on(&i.keys, EXPIRES_AT))
        .collect();
    let serves_ttl =
        |i: &&ExistingIndex| i.expire_after_secs == Some(0.0) && i.partial_filter.is_none();
    if !on_expiry.iter().any(serves_ttl) {
        if let Some(index) = on_expiry.first() {
            return Err(format!(
                "the index {} on {EXPIRES_AT} is not a TTL index with expireAfterSeconds 0 over \
                 every document, so documents would not be deleted at their expiry; drop it \
                 (db.<collection>.dropIndex(\"{}\")) and the server creates the right one",
                index.name, index.name
            ));
        }
        missing.push(
            IndexModel::builder()
                .keys(doc! { EXPIRES_AT: 1 })
                .options(options().expire_after(Duration::ZERO).build())
                .build(),
        );
    }

    let stray = existing.iter().find(|i| i.name == STRAY_INDEX);
    match stray {
        Some(index)
            if ascending_on(&index.keys, TOKEN)
                && index.partial_filter.as_ref() == Some(&stray_filter())
                && index.collation.is_none() => {}
        Some(index) => {
            return Err(format!(
                "the index {STRAY_INDEX} is not the server's ({{{TOKEN}: 1}}, partial on {}): \
                 drop it (db.<collection>.dropIndex(\"{}\")) and the server creates it",
                stray_filter(),
                index.name
            ));
        }
        None => missing.push(
            IndexModel::builder()
                .keys(doc! { TOKEN: 1 })
                .options(
                    options()
                        .name(STRAY_INDEX.to_owned())
                        .partial_filter_expression(stray_filter())
                        .build(),
                )
                .build(),
        ),
    }
    Ok(missing)
}

/// What a driver error means here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// E11000: another allocation inserted the document first; try again.
    DuplicateKey,
    /// The document would exceed MongoDB's 16 MiB (BSONObjectTooLarge, or "Resulting document
    /// after update is larger than 16777216", 17419 before 6.0): a record's 413.
    TooLarge,
    /// MongoDB is unreachable, has no primary, timed out, or did not reach a majority: a 503,
    /// and at start, worth retrying.
    Transient(String),
    /// Retrying cannot help (refused credentials, a bad URI, a conflicting index, a MongoDB
    /// older than the driver supports): a 503, and at start, a failure at once.
    Permanent(String),
    /// No answer within `--store-timeout`: a 503, and at start, worth retrying.
    TimedOut(String),
}

impl From<Failure> for StoreError {
    fn from(failure: Failure) -> StoreError {
        match failure {
            Failure::DuplicateKey => {
                StoreError::Unavailable("a duplicate key error persisted".into())
            }
            Failure::TooLarge => {
                StoreError::Unavailable("a document would exceed MongoDB's 16 MiB".into())
            }
            Failure::Transient(why) | Failure::Permanent(why) => StoreError::Unavailable(why),
            Failure::TimedOut(why) => StoreError::TimedOut(why),
        }
    }
}

const NAMESPACE_NOT_FOUND: i32 = 26;
/// The document-too-large codes of an update: BSONObjectTooLarge (10334) and the older 17419
/// (mongo's `update_stage.cpp` / `update.cpp`: "Resulting document after update is larger
/// than").
const TOO_LARGE_CODES: &[i32] = &[10334, 17419];

/// Server error codes that mean "not now", from mongo's `src/mongo/base/error_codes.yml`:
/// every code of the `RetriableError` and `NotPrimaryError` categories, plus the codes a
/// deployment in the middle of an election, a restart or a failover returns that those
/// categories leave out (LegacyNotPrimary, which the driver's SDAM spec list also counts as
/// "not writable primary"; Interrupted; mongos's FailedToSatisfyReadPreference; the time-outs;
/// an index build of another server starting at the same time, which createIndexes reports
/// rather than waits for, as mongo's own jstests expect). At start they are retried for
/// `--store-start-timeout`; later each is a 503.
const TRANSIENT_CODES: &[i32] = &[
    6,        // HostUnreachable (RetriableError)
    7,        // HostNotFound (RetriableError)
    50,       // MaxTimeMSExpired
    64,       // WriteConcernTimeout, formerly WriteConcernFailed (wtimeout)
    89,       // NetworkTimeout (RetriableError)
    91,       // ShutdownInProgress (RetriableError)
    133,      // FailedToSatisfyReadPreference: mongos finds no primary for a shard
    134,      // ReadConcernMajorityNotAvailableYet (RetriableError)
    189,      // PrimarySteppedDown (NotPrimaryError, RetriableError)
    202,      // NetworkInterfaceExceededTimeLimit: mongos → shard time-out
    262,      // ExceededTimeLimit (RetriableError)
    276,      // IndexBuildAborted: a build interrupted (a stepdown); createIndexes again
    285,      // IndexBuildAlreadyInProgress: another server is building the same index
    358,      // InternalTransactionNotSupported (RetriableError)
    402,      // ResourceExhausted (RetriableError)
    406,      // MigrationBlockingOperationCoordinatorCleaningUp (RetriableError)
    407,      // PooledConnectionAcquisitionExceededTimeLimit (RetriableError)
    412,      // UpdatesStillPending (RetriableError)
    453,      // InterruptedDueToReshardingCriticalSection (RetriableError)
    462,      // IngressRequestRateLimitExceeded (RetriableError)
    9001,     // SocketException (RetriableError)
    10058,    // LegacyNotPrimary (the driver's NOTWRITABLEPRIMARY_CODES)
    10107,    // NotWritablePrimary (NotPrimaryError, RetriableError)
    11600,    // InterruptedAtShutdown (RetriableError)
    11601,    // Interrupted (an operation killed, e.g. by killOp)
    11602,    // InterruptedDueToReplStateChange (NotPrimaryError, RetriableError)
    13435,    // NotPrimaryNoSecondaryOk (NotPrimaryError, RetriableError)
    13436,    // NotPrimaryOrSecondary (NotPrimaryError, RetriableError)
    50915,    // BackupCursorOpenConflictWithCheckpoint (RetriableError)
    91331,    // RetriableRemoteCommandFailure (RetriableError)
    10045600, // InterruptedDueToFCVChange (RetriableError)
];

/// What the driver says when the deployment's wire version is outside its range (mongodb
/// 3.x, `sdam/description/server.rs`: "Server at … reports wire version 8, but this version
/// of the MongoDB Rust driver requires at least 9 (MongoDB 4.4)."), returned as a server
/// selection error at once, for every operation: never worth retrying.
const INCOMPATIBLE_SERVER: &str = "this version of the MongoDB Rust driver";

fn command_code(error: &MongoError) -> Option<i32> {
    match error.kind.as_ref() {
        ErrorKind::Command(e) => Some(e.code),
        ErrorKind::Write(WriteFailure::WriteError(e)) => Some(e.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(e)) => Some(e.code),
        _ => None,
    }
}

/// Classify a driver error (see [`Failure`]).
pub fn classify(error: &MongoError) -> Failure {
    let why = error.kind.to_string();
    match command_code(error) {
        Some(DUPLICATE_KEY) => return Failure::DuplicateKey,
        Some(code) if TOO_LARGE_CODES.contains(&code) => return Failure::TooLarge,
        _ => {}
    }
    if let ErrorKind::ServerSelection { message, .. } = error.kind.as_ref()
        && message.contains(INCOMPATIBLE_SERVER)
    {
        return Failure::Permanent(format!("MongoDB 4.4 or later is required: {message}"));
    }
    if error.contains_label("RetryableWriteError")
        || error.contains_label("TransientTransactionError")
        || error.contains_label("RetryableError")
    {
        return Failure::Transient(why);
    }
    match error.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteConcernError(e)) => Failure::Transient(format!(
            "not acknowledged by a majority: {} ({})",
            e.message, e.code_name
        )),
        ErrorKind::Io(_)
        | ErrorKind::ServerSelection { .. }
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::DnsResolve { .. }
        | ErrorKind::Shutdown => Failure::Transient(why),
        ErrorKind::Command(e) if TRANSIENT_CODES.contains(&e.code) => Failure::Transient(why),
        ErrorKind::Write(WriteFailure::WriteError(e)) if TRANSIENT_CODES.contains(&e.code) => {
            Failure::Transient(why)
        }
        _ => Failure::Permanent(why),
    }
}

fn start_failure(error: MongoError) -> StartAttempt {
    match classify(&error) {
        Failure::Transient(why) | Failure::Permanent(why)
            if matches!(error.kind.as_ref(), ErrorKind::InvalidArgument { .. }) =>
        {
            StartAttempt::Fatal(why)
        }
        Failure::DuplicateKey | Failure::TooLarge => StartAttempt::Fatal(error.kind.to_string()),
        Failure::Transient(why) | Failure::TimedOut(why) => StartAttempt::Transient(why),
        Failure::Permanent(why) => StartAttempt::Fatal(why),
    }
}

#[async_trait]
impl Store for MongoStore {
    fn name(&self) -> &'static str {
        "mongodb"
    }

    async fn allocate(&self, request: Allocate) -> Result<AllocateOutcome, StoreError> {
        self.closed.check()?;
        let token = new_lease_token();
        let fingerprint = request.fingerprint.as_deref();
        let update = allocate_update(&request.key, fingerprint, millis(request.lease), &token);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = self
                .call(
                    self.collection
                        .find_one_and_update(key_filter(&request.key), update.clone())
                        .upsert(true)
                        .collation(simple_collation())
                        .return_document(ReturnDocument::After)
                        .projection(doc! { "_id": 0 })
                        .into_future(),
                )
                .await;
            return match result {
                Ok(Some(document)) => allocate_outcome(&document, &token, fingerprint),
                Ok(None) => Err(StoreError::Corrupt("an upsert returned no document".into())),
                Err(Failure::DuplicateKey) if attempt < DUPLICATE_RETRIES => {
                    tracing::debug!(
                        key = %idempotency_spec::key_digest(&request.key),
                        "concurrent first allocations; retrying"
                    );
                    continue;
                }
                Err(failure) => Err(failure.into()),
            };
        }
    }

    async fn record(&self, request: Record) -> Result<RecordOutcome, StoreError> {
        self.closed.check()?;
        let capture = capture_document(&request.capture)?;
        // Refused before it is sent: MongoDB would refuse the document anyway, and this way the
        // caller learns why (413) instead of a 503 to retry in vain.
        if completed_document_size(&request.key, &capture)? > MAX_DOCUMENT_BYTES {
            return Ok(RecordOutcome::TooLarge {
                limit: MAX_DOCUMENT_BYTES,
            });
        }
        let update = record_update(capture, millis(request.retention));
        let result = self
            .call(
                self.collection
                    .find_one_and_update(
                        holder_filter(&request.key, request.lease_token.as_deref()),
                        update,
                    )
                    .collation(simple_collation())
                    .return_document(ReturnDocument::After)
                    .projection(doc! { "_id": 0, EXPIRES_AT: 1 })
                    .into_future(),
            )
            .await;
        let document = match result {
            // The estimate is an upper bound for the documents this server writes; a document
            // some other writer enlarged can still pass the limit: the same answer.
            Err(Failure::TooLarge) => {
                return Ok(RecordOutcome::TooLarge {
                    limit: MAX_DOCUMENT_BYTES,
                });
            }
            other => other.map_err(StoreError::from)?,
        };
        match document {
            None => Ok(RecordOutcome::Forbidden),
            Some(document) => match document.get(EXPIRES_AT) {
                Some(Bson::DateTime(at)) => Ok(RecordOutcome::Stored {
                    expires_at: u64::try_from(at.timestamp_millis()).unwrap_or(0),
                }),
                _ => Err(StoreError::Corrupt(
                    "a recorded document without expires_at".into(),
                )),
            },
        }
    }

    async fn release(&self, request: Release) -> Result<ReleaseOutcome, StoreError> {
        self.closed.check()?;
        let deleted = self
            .call(
                self.collection
                    .delete_one(holder_filter(&request.key, request.lease_token.as_deref()))
                    .collation(simple_collation())
                    .into_future(),
            )
            .await
            .map_err(StoreError::from)?;
        Ok(if deleted.deleted_count == 1 {
            ReleaseOutcome::Released
        } else {
            ReleaseOutcome::Forbidden
        })
    }

    /// `ping` on the primary: ready means writes can be served.
    async fn ready(&self) -> Result<(), StoreError> {
        self.closed.check()?;
        self.call(self.database.run_command(doc! { "ping": 1 }).into_future())
            .await
            .map_err(StoreError::from)?;
        Ok(())
    }

    /// MongoDB expires documents itself (the TTL index); this only reruns the migration (the
    /// old server's documents, and those an old server recorded) every
    /// [`MIGRATION_INTERVAL`].
    async fn purge_expired(&self, _limit: usize) -> Result<usize, StoreError> {
        self.closed.check()?;
        {
            let mut last = self.last_migration.lock().expect("migration clock");
            if last.elapsed() < MIGRATION_INTERVAL {
                return Ok(0);
            }
            *last = Instant::now();
        }
        self.call(self.migrate()).await.map_err(StoreError::from)?;
        Ok(0)
    }

    /// Nothing to flush: every answer was sent after its write was acknowledged. Closes the
    /// connections.
    async fn shutdown(&self) -> Result<(), StoreError> {
        if self.closed.close() {
            self.client.clone().shutdown().await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use idempotency_spec::{Header, HeaderValue};
    use mongodb::error::{CommandError, WriteConcernError, WriteError};

    use super::*;

    fn capture(body: &str) -> Capture {
        Capture {
            response_status: 201,
            response_body: body.into(),
            response_headers: vec![
                Header {
                    key: "Set-Cookie".into(),
                    value: HeaderValue::Many(vec!["a=1".into(), "b=2".into()]),
                },
                Header {
                    key: "X-Price".into(),
                    value: HeaderValue::One("$5".into()),
                },
            ],
        }
    }

    #[test]
    fn allocation_is_one_conditional_replacement() {
        let update = allocate_update("a2V5", Some("fp"), 60_000, "tok");
        let live = doc! { "$and": [
            { "$in": ["$status", ["allocated", "completed"]] },
            { "$gt": [{ "$ifNull": ["$expires_at", DateTime::MAX] }, "$$NOW"] },
        ] };
        assert_eq!(
            update,
            vec![doc! { "$replaceWith": { "$cond": {
                "if": live,
                "then": "$$ROOT",
                "else": {
                    "_id": "$_id",
                    "idempotency_key": { "$literal": "a2V5" },
                    "status": "allocated",
                    "lease_token": { "$literal": "tok" },
                    "expires_at": { "$add": ["$$NOW", 60_000_i64] },
                    "taken_over": { "$cond": [{ "$eq": ["$status", "allocated"] }, true, "$$REMOVE"] },
                    "fingerprint": { "$literal": "fp" },
                },
            } } }]
        );
    }

    #[test]
    fn an_absent_or_empty_fingerprint_is_not_stored() {
        for fingerprint in [None, Some("")] {
            let update = allocate_update("k", fingerprint, 1, "t");
            let allocation = update[0]
                .get_document("$replaceWith")
                .and_then(|r| r.get_document("$cond"))
                .and_then(|c| c.get_document("else"))
                .unwrap();
            assert!(!allocation.contains_key("fingerprint"), "{allocation}");
        }
    }

    #[test]
    fn record_and_release_match_only_a_live_allocation_held_with_the_token() {
        let expr = doc! { "$gt": [{ "$ifNull": ["$expires_at", DateTime::MAX] }, "$$NOW"] };
        assert_eq!(
            holder_filter("k", Some("t")),
            doc! { "idempotency_key": "k", "status": "allocated", "lease_token": "t", "$expr": expr.clone() }
        );
        // Without a token (old clients): any live allocation.
        assert_eq!(
            holder_filter("k", None),
            doc! { "idempotency_key": "k", "status": "allocated", "$expr": expr }
        );
        // An empty token is a token: it matches no allocation (tokens are never empty).
        assert_eq!(
            holder_filter("k", Some("")).get_str("lease_token").ok(),
            Some("")
        );
    }

    #[test]
    fn record_completes_with_the_capture_as_a_literal() {
        let update = record_update(capture_document(&capture("$status")).unwrap(), 86_400_000);
        assert_eq!(
            update,
            vec![
                doc! { "$set": {
                    "status": "completed",
                    "capture": { "$literal": {
                        "response_status": 201,
                        "response_body": "$status",
                        "response_headers": [
                            { "key": "Set-Cookie", "value": ["a=1", "b=2"] },
                            { "key": "X-Price", "value": "$5" },
                        ],
                    } },
                    "expires_at": { "$add": ["$$NOW", 86_400_000_i64] },
                } },
                doc! { "$unset": ["lease_token", "taken_over"] },
            ]
        );
    }

    /// Every string a caller chose (key, token, fingerprint, capture) sits under a `$literal`
    /// in the pipelines: none can be read as a field path or an operator.
    #[test]
    fn callers_strings_never_reach_an_expression_unquoted() {
        fn unquoted(value: &Bson, found: &mut Vec<String>) {
            match value {
                Bson::String(s) => found.push(s.clone()),
                Bson::Array(items) => items.iter().for_each(|v| unquoted(v, found)),
                Bson::Document(d) => {
                    for (k, v) in d {
                        if k != "$literal" {
                            unquoted(v, found);
                        }
                    }
                }
                _ => {}
            }
        }
        let hostile = "$$ROOT";
        let mut found = Vec::new();
        let allocate = allocate_update(hostile, Some(hostile), 1, hostile);
        let record = record_update(capture_document(&capture(hostile)).unwrap(), 1);
        for stage in allocate.iter().chain(&record) {
            unquoted(&Bson::Document(stage.clone()), &mut found);
        }
        // "$$ROOT" appears once, as the pipeline's own "keep the document".
        assert_eq!(
            found.iter().filter(|s| *s == hostile).count(),
            1,
            "{found:?}"
        );
    }

    #[test]
    fn old_documents_get_an_expiry_by_status() {
        assert_eq!(
            migration_filter(),
            doc! { "expires_at": { "$exists": false } }
        );
        assert_eq!(
            migration_update(60_000, 86_400_000),
            vec![doc! { "$set": { "expires_at": { "$add": [
                "$$NOW",
                { "$cond": [{ "$eq": ["$status", "allocated"] }, 60_000_i64, 86_400_000_i64] },
            ] } } }]
        );
    }

    fn at(ms: i64) -> Bson {
        Bson::DateTime(DateTime::from_millis(ms))
    }

    #[test]
    fn documents_decode_into_entries() {
        let allocated = doc! {
            "idempotency_key": "k", "status": "allocated", "lease_token": "t",
            "fingerprint": "f", "expires_at": at(1_000),
        };
        assert_eq!(
            decode(&allocated).unwrap(),
            Entry::Allocated {
                lease_token: "t".into(),
                lease_expires_at: 1_000,
                fingerprint: Some("f".into())
            }
        );
        let completed = doc! {
            "idempotency_key": "k", "status": "completed", "fingerprint": "",
            "capture": bson::serialize_to_document(&capture("b")).unwrap(),
            "expires_at": at(2_000),
        };
        assert_eq!(
            decode(&completed).unwrap(),
            Entry::Completed {
                capture: capture("b"),
                expires_at: 2_000,
                fingerprint: None
            }
        );
    }

    #[test]
    fn the_old_servers_documents_decode_as_live_until_migrated() {
        // As the Go server wrote them: no lease, no fingerprint, no expires_at; a capture's
        // headers may be null, its status a 64-bit integer.
        let old_allocated = doc! { "idempotency_key": "k", "status": "allocated" };
        assert_eq!(
            decode(&old_allocated).unwrap(),
            Entry::Allocated {
                lease_token: String::new(),
                lease_expires_at: u64::MAX,
                fingerprint: None
            }
        );
        let old_completed = doc! {
            "idempotency_key": "k", "status": "completed",
            "capture": {
                "response_status": 200_i64,
                "response_body": "H4sIAAAAAAAAA",
                "response_headers": Bson::Null,
            },
        };
        assert_eq!(
            decode(&old_completed).unwrap(),
            Entry::Completed {
                capture: Capture {
                    response_status: 200,
                    response_body: "H4sIAAAAAAAAA".into(),
                    response_headers: vec![],
                },
                expires_at: u64::MAX,
                fingerprint: None
            }
        );
    }

    #[test]
    fn undecodable_documents_are_errors() {
        for document in [
            doc! { "idempotency_key": "k" },
            doc! { "idempotency_key": "k", "status": "pending", "expires_at": at(1) },
            doc! { "idempotency_key": "k", "status": "completed", "expires_at": at(1) },
            doc! { "idempotency_key": "k", "status": "allocated", "expires_at": "tomorrow" },
            doc! { "idempotency_key": "k", "status": "allocated", "expires_at": at(1), "fingerprint": 7 },
            doc! { "idempotency_key": "k", "status": "completed", "expires_at": at(1),
            "capture": { "response_status": "ok" } },
        ] {
            assert!(
                matches!(decode(&document), Err(StoreError::Corrupt(_))),
                "{document}"
            );
        }
    }

    #[test]
    fn the_document_after_the_update_tells_the_allocation_its_answer() {
        let ours = doc! { "idempotency_key": "k", "status": "allocated", "lease_token": "mine", "expires_at": at(5_000) };
        assert_eq!(
            allocate_outcome(&ours, "mine", None).unwrap(),
            AllocateOutcome::Allocated {
                lease_token: "mine".into(),
                lease_expires_at: 5_000,
                taken_over: false,
            }
        );
        let taken = doc! { "idempotency_key": "k", "status": "allocated", "lease_token": "mine",
        "expires_at": at(5_000), "taken_over": true };
        assert_eq!(
            allocate_outcome(&taken, "mine", None).unwrap(),
            AllocateOutcome::Allocated {
                lease_token: "mine".into(),
                lease_expires_at: 5_000,
                taken_over: true,
            }
        );
        let theirs = doc! { "idempotency_key": "k", "status": "allocated", "lease_token": "theirs",
        "fingerprint": "a", "expires_at": at(5_000) };
        assert_eq!(
            allocate_outcome(&theirs, "mine", Some("a")).unwrap(),
            AllocateOutcome::InFlight {
                lease_expires_at: 5_000
            }
        );
        assert_eq!(
            allocate_outcome(&theirs, "mine", None).unwrap(),
            AllocateOutcome::InFlight {
                lease_expires_at: 5_000
            }
        );
        assert_eq!(
            allocate_outcome(&theirs, "mine", Some("b")).unwrap(),
            AllocateOutcome::FingerprintMismatch
        );
        let done = doc! { "idempotency_key": "k", "status": "completed", "fingerprint": "a",
        "capture": bson::serialize_to_document(&capture("x")).unwrap(),
        "expires_at": at(9_000) };
        assert_eq!(
            allocate_outcome(&done, "mine", Some("a")).unwrap(),
            AllocateOutcome::Completed(capture("x"))
        );
        assert_eq!(
            allocate_outcome(&done, "mine", Some("b")).unwrap(),
            AllocateOutcome::FingerprintMismatch
        );
        // An old allocation (no token) is in flight, never mistaken for ours.
        let old = doc! { "idempotency_key": "k", "status": "allocated" };
        assert_eq!(
            allocate_outcome(&old, "mine", None).unwrap(),
            AllocateOutcome::InFlight {
                lease_expires_at: u64::MAX
            }
        );
    }

    /// An index as `listIndexes` returns it.
    fn spec(name: &str, key: Document) -> Document {
        doc! { "v": 2, "key": key, "name": name }
    }

    fn existing(specs: &[Document]) -> Vec<ExistingIndex> {
        specs.iter().map(ExistingIndex::from_spec).collect()
    }

    /// The three indexes as the server creates them (what `listIndexes` shows afterwards: the
    /// simple collation is not shown).
    fn the_servers_indexes() -> Vec<Document> {
        let mut key = spec("idempotency_key_1", doc! { "idempotency_key": 1 });
        key.insert("unique", true);
        let mut ttl = spec("expires_at_1", doc! { "expires_at": 1 });
        ttl.insert("expireAfterSeconds", 0);
        let mut stray = spec(STRAY_INDEX, doc! { "lease_token": 1 });
        stray.insert("partialFilterExpression", stray_filter());
        vec![spec("_id_", doc! { "_id": 1 }), key, ttl, stray]
    }

    #[test]
    fn indexes_are_created_when_missing_with_the_simple_collation() {
        let missing = missing_indexes(&existing(&[spec("_id_", doc! { "_id": 1 })])).unwrap();
        let keys: Vec<&Document> = missing.iter().map(|m| &m.keys).collect();
        assert_eq!(
            keys,
            [
                &doc! { "idempotency_key": 1 },
                &doc! { "expires_at": 1 },
                &doc! { "lease_token": 1 },
            ]
        );
        let options: Vec<&IndexOptions> = missing
            .iter()
            .map(|m| m.options.as_ref().unwrap())
            .collect();
        assert_eq!(options[0].unique, Some(true));
        assert_eq!(options[1].expire_after, Some(Duration::ZERO));
        assert_eq!(options[2].name.as_deref(), Some(STRAY_INDEX));
        assert_eq!(options[2].partial_filter_expression, Some(stray_filter()));
        for option in options {
            assert_eq!(
                option.collation.as_ref().map(|c| c.locale.as_str()),
                Some("simple"),
                "{option:?}"
            );
        }
        // All there: nothing to create.
        assert!(
            missing_indexes(&existing(&the_servers_indexes()))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn the_old_servers_unique_index_and_a_hashed_shard_key_index_are_kept() {
        let mut specs = the_servers_indexes();
        // The Go server's: unique, with a TTL on the string that never expires anything.
        specs[1] = doc! { "v": 2, "key": { "idempotency_key": 1 }, "name": "idempotency_key_1",
        "unique": true, "expireAfterSeconds": 86_400 };
        specs.push(spec(
            "idempotency_key_hashed",
            doc! { "idempotency_key": "hashed" },
        ));
        assert!(missing_indexes(&existing(&specs)).unwrap().is_empty());
    }

    /// The legacy mongo shell sends every number as a double, and MongoDB stores the spec as
    /// given: `{expireAfterSeconds: 0.0}`, `{unique: 1.0}`, `{key: {expires_at: 1.0}}`. The
    /// driver's `IndexModel` wants a u64 there, and since its options are a flattened
    /// `Option`, one field it cannot decode silently drops them all (no name, not unique, no
    /// TTL): the start was refused for an index that serves. Read as a plain document it is
    /// the TTL index it is.
    #[test]
    fn an_index_the_legacy_shell_created_with_doubles_serves() {
        let specs = vec![
            spec("_id_", doc! { "_id": 1 }),
            doc! { "v": 2.0, "key": { "idempotency_key": 1.0 }, "name": "idempotency_key_1", "unique": 1.0 },
            doc! { "v": 2.0, "key": { "expires_at": 1.0 }, "name": "expires_at_1", "expireAfterSeconds": 0.0 },
            doc! { "v": 2, "key": { "lease_token": 1_i64 }, "name": STRAY_INDEX,
            "partialFilterExpression": stray_filter() },
        ];
        let model: IndexModel = bson::deserialize_from_document(specs[2].clone()).unwrap();
        assert!(model.options.is_none(), "{model:?}");
        assert_eq!(
            ExistingIndex::from_spec(&specs[2]).expire_after_secs,
            Some(0.0)
        );
        assert!(missing_indexes(&existing(&specs)).unwrap().is_empty());
    }

    #[test]
    fn an_index_on_the_key_that_is_not_plainly_unique_is_refused_naming_it() {
        let mut cases = Vec::new();
        let mut not_unique = the_servers_indexes();
        not_unique[1].remove("unique");
        cases.push((not_unique, "is not unique"));
        // unique: false, or 0, is not unique either (BSON truthiness).
        let mut zero = the_servers_indexes();
        zero[1].insert("unique", 0);
        cases.push((zero, "is not unique"));
        let mut partial = the_servers_indexes();
        partial[1].insert("partialFilterExpression", doc! { "status": "completed" });
        cases.push((partial, "is partial"));
        let mut case_insensitive = the_servers_indexes();
        case_insensitive[1].insert("collation", doc! { "locale": "en", "strength": 2 });
        cases.push((case_insensitive, "collation"));
        for (specs, why) in cases {
            let error = missing_indexes(&existing(&specs)).unwrap_err();
            assert!(
                error.contains("idempotency_key_1")
                    && error.contains(why)
                    && error.contains("dropIndex"),
                "{error}"
            );
        }
        // The simple collation, spelt out, is no collation.
        let mut simple = the_servers_indexes();
        simple[1].insert("collation", doc! { "locale": "simple" });
        assert!(missing_indexes(&existing(&simple)).unwrap().is_empty());
    }

    #[test]
    fn an_expiry_index_that_would_not_delete_every_document_at_its_expiry_is_refused() {
        for (field, value) in [
            ("expireAfterSeconds", Bson::Int32(3600)),
            ("expireAfterSeconds", Bson::String("0".into())),
            (
                "partialFilterExpression",
                Bson::Document(doc! { "status": "allocated" }),
            ),
        ] {
            let mut specs = the_servers_indexes();
            specs[2].insert(field, value);
            let error = missing_indexes(&existing(&specs)).unwrap_err();
            assert!(error.contains("expires_at_1"), "{error}");
        }
        let mut no_ttl = the_servers_indexes();
        no_ttl[2].remove("expireAfterSeconds");
        assert!(
            missing_indexes(&existing(&no_ttl))
                .unwrap_err()
                .contains("expires_at_1")
        );
    }

    #[test]
    fn an_index_with_the_migrations_name_but_another_spec_is_refused() {
        let mut specs = the_servers_indexes();
        specs[3].insert("partialFilterExpression", doc! { "status": "completed" });
        let error = missing_indexes(&existing(&specs)).unwrap_err();
        assert!(error.contains(STRAY_INDEX), "{error}");
    }

    fn command_error(code: i32, name: &str) -> MongoError {
        let e: CommandError = bson::deserialize_from_document(
            doc! { "code": code, "codeName": name, "errmsg": format!("{name} happened") },
        )
        .unwrap();
        MongoError::from(ErrorKind::Command(e))
    }

    #[test]
    fn driver_errors_map_to_retry_or_503() {
        // Two concurrent first upserts: retried, as a command error or a write error.
        assert_eq!(
            classify(&command_error(11000, "DuplicateKey")),
            Failure::DuplicateKey
        );
        let write: WriteError = bson::deserialize_from_document(
            doc! { "code": 11000, "errmsg": "E11000 duplicate key error" },
        )
        .unwrap();
        assert_eq!(
            classify(&MongoError::from(ErrorKind::Write(
                WriteFailure::WriteError(write)
            ))),
            Failure::DuplicateKey
        );
        // A majority not reached in time: the write is not acknowledged, a 503.
        let wtimeout: WriteConcernError = bson::deserialize_from_document(doc! {
            "code": 64, "codeName": "WriteConcernFailed",
            "errmsg": "waiting for replication timed out", "errInfo": { "wtimeout": true },
        })
        .unwrap();
        let failure = classify(&MongoError::from(ErrorKind::Write(
            WriteFailure::WriteConcernError(wtimeout),
        )));
        assert!(
            matches!(&failure, Failure::Transient(why) if why.contains("majority")),
            "{failure:?}"
        );
        // The network, a stepped-down primary: transient.
        let refused = MongoError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(matches!(classify(&refused), Failure::Transient(_)));
        assert!(matches!(
            classify(&command_error(10107, "NotWritablePrimary")),
            Failure::Transient(_)
        ));
        assert!(matches!(
            classify(&command_error(64, "WriteConcernFailed")),
            Failure::Transient(_)
        ));
        // Refused credentials: permanent (no retry at start), still a 503 at run time.
        let unauthorized = classify(&command_error(13, "Unauthorized"));
        assert!(matches!(unauthorized, Failure::Permanent(_)));
        assert!(matches!(
            StoreError::from(unauthorized),
            StoreError::Unavailable(_)
        ));
        // Every failure is a store error (503), never an outcome.
        for failure in [
            Failure::DuplicateKey,
            Failure::Transient("x".into()),
            Failure::Permanent("y".into()),
        ] {
            assert!(matches!(
                StoreError::from(failure),
                StoreError::Unavailable(_)
            ));
        }
    }

    #[test]
    fn at_start_only_transient_failures_are_retried() {
        assert!(matches!(
            start_failure(MongoError::from(std::io::Error::from(
                std::io::ErrorKind::TimedOut
            ))),
            StartAttempt::Transient(_)
        ));
        assert!(matches!(
            start_failure(command_error(13, "Unauthorized")),
            StartAttempt::Fatal(_)
        ));
        assert!(matches!(
            start_failure(command_error(85, "IndexOptionsConflict")),
            StartAttempt::Fatal(_)
        ));
    }

    #[test]
    fn a_deployment_between_primaries_is_retried_at_start() {
        for (code, name) in [
            (133, "FailedToSatisfyReadPreference"),
            (10058, "LegacyNotPrimary"),
            (10107, "NotWritablePrimary"),
            (11601, "Interrupted"),
            (11602, "InterruptedDueToReplStateChange"),
            (13435, "NotPrimaryNoSecondaryOk"),
            (189, "PrimarySteppedDown"),
            (91, "ShutdownInProgress"),
            (6, "HostUnreachable"),
            (285, "IndexBuildAlreadyInProgress"),
        ] {
            assert!(
                matches!(
                    start_failure(command_error(code, name)),
                    StartAttempt::Transient(_)
                ),
                "{name}"
            );
        }
        // The same code as a write error (an update's writeErrors): the same.
        let write: WriteError =
            bson::deserialize_from_document(doc! { "code": 10107, "errmsg": "not primary" })
                .unwrap();
        assert!(matches!(
            start_failure(MongoError::from(ErrorKind::Write(
                WriteFailure::WriteError(write)
            ))),
            StartAttempt::Transient(_)
        ));
        // What no retry mends stays fatal.
        for (code, name) in [
            (18, "AuthenticationFailed"),
            (85, "IndexOptionsConflict"),
            (2, "BadValue"),
        ] {
            assert!(
                matches!(
                    start_failure(command_error(code, name)),
                    StartAttempt::Fatal(_)
                ),
                "{name}"
            );
        }
    }

    #[test]
    fn a_document_too_large_for_mongodb_is_its_own_failure() {
        for (code, name) in [(10334, "BSONObjectTooLarge"), (17419, "Location17419")] {
            assert_eq!(classify(&command_error(code, name)), Failure::TooLarge);
        }
        // Outside a record (which answers 413) it is a store failure like any other.
        assert!(matches!(
            StoreError::from(Failure::TooLarge),
            StoreError::Unavailable(_)
        ));
    }

    fn headers(count: usize, value: &str) -> Capture {
        Capture {
            response_status: 200,
            response_body: String::new(),
            response_headers: (0..count)
                .map(|i| Header {
                    key: format!("x-{i}"),
                    value: HeaderValue::One(value.into()),
                })
                .collect(),
        }
    }

    /// The estimate is the size of the document the record leaves, counting the fingerprint at
    /// its largest: exact with such a fingerprint, an upper bound otherwise.
    #[test]
    fn the_size_of_a_completed_document_is_estimated_exactly() {
        let key = "a2V5".repeat(350);
        for capture in [
            capture("body"),
            headers(1000, "v"),
            capture(&"b".repeat(70_000)),
        ] {
            let captured = capture_document(&capture).unwrap();
            let estimate = completed_document_size(&key, &captured).unwrap();
            let mut stored = doc! {
                "_id": ObjectId::new(),
                "idempotency_key": &key,
                "status": "completed",
                "fingerprint": "f".repeat(MAX_FINGERPRINT_LEN),
                "capture": captured.clone(),
                "expires_at": DateTime::now(),
            };
            assert_eq!(estimate, stored.to_vec().unwrap().len());
            stored.insert("fingerprint", "short");
            assert!(estimate > stored.to_vec().unwrap().len());
        }
    }

    /// What `--body-limit` (at most 15 MiB with this store) lets through and MongoDB cannot
    /// store: many small headers, larger in BSON than in the JSON the caller sent. A body of
    /// the same JSON size fits: the limit's 1 MiB below 16 MiB is the headroom for the key,
    /// the fingerprint and the headers' framing.
    #[test]
    fn many_small_headers_within_the_body_limit_can_exceed_the_document_limit() {
        let crowded = headers(420_000, "");
        let json = serde_json::to_vec(&serde_json::json!({
            "idempotency_key": "a2V5", "response": crowded,
        }))
        .unwrap();
        assert!(
            json.len() < crate::config::MONGODB_MAX_BODY,
            "{}",
            json.len()
        );
        let size = completed_document_size("a2V5", &capture_document(&crowded).unwrap()).unwrap();
        assert!(size > MAX_DOCUMENT_BYTES, "{size}");

        let body = Capture {
            response_body: "b".repeat(crate::config::MONGODB_MAX_BODY - 200),
            ..headers(20, "value")
        };
        let size =
            completed_document_size(&"k".repeat(1400), &capture_document(&body).unwrap()).unwrap();
        assert!(size <= MAX_DOCUMENT_BYTES, "{size}");
    }

    /// Which documents a filter of equalities and `$exists` matches, as MongoDB reads them;
    /// anything else is not supported here (so a test cannot pass by not understanding one).
    fn matches(filter: &Document, document: &Document) -> bool {
        filter.iter().all(|(field, condition)| match condition {
            Bson::Document(operator) if operator.keys().any(|k| k.starts_with('$')) => {
                match operator.get("$exists") {
                    Some(Bson::Boolean(exists)) if operator.len() == 1 => {
                        document.contains_key(field) == *exists
                    }
                    _ => panic!("not supported here: {operator}"),
                }
            }
            value => document.get(field) == Some(value),
        })
    }

    /// The old Go server's record, as NOTES.md has it: `findOneAndUpdate({idempotency_key: K,
    /// status: "allocated"}, {$set: {status: "completed", capture}})`.
    fn old_server_records(document: &mut Document, capture: &Capture) -> bool {
        let key = document.get_str("idempotency_key").unwrap().to_owned();
        if !matches(
            &doc! { "idempotency_key": key, "status": "allocated" },
            document,
        ) {
            return false;
        }
        document.insert("status", "completed");
        document.insert("capture", capture_document(capture).unwrap());
        true
    }

    /// The documents a fleet of old and new servers leaves in the collection, step by step, and
    /// what the migration does with each.
    #[test]
    fn a_mixed_fleet_step_by_step() {
        let lease_end = at(1_000_000);
        // 1. A new server allocates K (the "else" branch of `allocate_update`, evaluated).
        let mut document = doc! {
            "_id": ObjectId::new(), "idempotency_key": "Sw", "status": "allocated",
            "lease_token": "t", "fingerprint": "f", "expires_at": lease_end.clone(),
        };
        // Nothing for the migration: it has an expiry and no capture.
        assert!(!matches(&migration_filter(), &document));
        assert!(!matches(&stray_filter(), &document));

        // 2. An old server records it (its record matches any allocated document).
        assert!(old_server_records(&mut document, &capture("old")));
        // The capture is replayed, but only until the lease's end, and the token is left.
        assert_eq!(
            decode(&document).unwrap(),
            Entry::Completed {
                capture: capture("old"),
                expires_at: 1_000_000,
                fingerprint: Some("f".into())
            }
        );
        // 3. The migration finds it, and only by the stray filter (served by its index).
        assert!(!matches(&migration_filter(), &document));
        assert!(matches(&stray_filter(), &document));
        assert_eq!(
            stray_update(3_600_000),
            vec![
                doc! { "$set": { "expires_at": { "$add": ["$$NOW", 3_600_000_i64] } } },
                doc! { "$unset": ["lease_token"] },
            ]
        );
        // 4. After it (the two stages above, applied): retention from now, no token; the
        // migration never looks at it again, and neither record nor release can act on it.
        document.insert("expires_at", at(1_000_000 + 3_600_000));
        document.remove("lease_token");
        assert!(!matches(&migration_filter(), &document));
        assert!(!matches(&stray_filter(), &document));
        assert!(!matches(
            &doc! { "idempotency_key": "Sw", "status": "allocated" },
            &document
        ));
        assert!(matches!(
            decode(&document).unwrap(),
            Entry::Completed {
                expires_at: 4_600_000,
                ..
            }
        ));

        // An old server allocates another key: its upsert inserts {K, status: allocated}
        // (`$setOnInsert`), no expiry: the first migration filter, not the stray one.
        let old_allocation =
            doc! { "_id": ObjectId::new(), "idempotency_key": "T2xk", "status": "allocated" };
        assert!(matches(&migration_filter(), &old_allocation));
        assert!(!matches(&stray_filter(), &old_allocation));
        // An old server records its own allocation: no expiry, no token: the first filter.
        let mut old_capture = old_allocation.clone();
        assert!(old_server_records(&mut old_capture, &capture("x")));
        assert!(matches(&migration_filter(), &old_capture));
        assert!(!matches(&stray_filter(), &old_capture));
        // A new server's record leaves no token: the steady state holds no stray.
        let recorded = doc! { "_id": ObjectId::new(), "idempotency_key": "TmV3", "status": "completed",
        "capture": capture_document(&capture("n")).unwrap(), "expires_at": lease_end };
        assert!(!matches(&migration_filter(), &recorded));
        assert!(!matches(&stray_filter(), &recorded));
        // The old server's record of an allocation whose lease expired, or that a new server
        // took over meanwhile, still matches `status: allocated`: it completes it (README,
        // mixed fleets), and the new holder's own record then finds no allocation: 403.
        let mut taken_over = doc! { "_id": ObjectId::new(), "idempotency_key": "VG8", "status": "allocated",
        "lease_token": "new-holder", "expires_at": at(9_000_000) };
        assert!(old_server_records(&mut taken_over, &capture("first")));
        assert!(!matches(
            &holder_filter_without_expr("VG8", "new-holder"),
            &taken_over
        ));
    }

    /// [`holder_filter`] without its `$expr` (the time), for [`matches`].
    fn holder_filter_without_expr(key: &str, token: &str) -> Document {
        let mut filter = holder_filter(key, Some(token));
        filter.remove("$expr");
        filter
    }

    #[test]
    fn writes_wait_for_a_journaled_majority() {
        let wc = write_concern(Duration::from_millis(1500));
        assert_eq!(wc.w, Some(Acknowledgment::Majority));
        assert_eq!(wc.w_timeout, Some(Duration::from_millis(1500)));
        assert_eq!(wc.journal, Some(true));
    }
}
