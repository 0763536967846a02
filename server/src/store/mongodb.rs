//! The MongoDB store: the old server's database, shared by any number of server processes.
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
//!   token ([`holder_filter`]); no match → 403.
//! - **release**: `deleteOne` with the same filter; nothing deleted → 403.
//!
//! Two first allocations of a new key may both try to insert; the unique index lets one in and
//! fails the other with a duplicate-key error (E11000), which is retried (it then finds the
//! document), never answered 500.
//!
//! # Time
//!
//! The pipelines and filters use `$$NOW`, the clock of the MongoDB primary, not the server
//! process's: every process sharing the database sees the same instant, and the TTL monitor
//! works on the same clock.
//!
//! # Durability and consistency
//!
//! Writes use write concern `majority` with a time-out (`--mongodb-write-timeout`) and
//! `j: true`: an answer is sent once a majority of the replica set has the change in its
//! journal, so a failover does not roll it back. A write concern time-out is a 503 (the change
//! may exist on the primary only). Every decision is made by the write command itself, on the
//! primary, under the document's lock: it reads the latest state of the document there,
//! including every write acknowledged before it (they are majority-committed, so a new primary
//! has them too). Read-your-writes across processes therefore needs no causal session nor a
//! linearizable read; the collection's read concern is `majority` so that any read made with
//! it sees only what cannot be rolled back. The driver retries a write once after a network
//! error or a failover (retryable writes, with a transaction number, so never twice).
//!
//! # The old server's documents
//!
//! They have no `expires_at` and no lease token. A migration at start (and again every minute,
//! for documents an old server still writes during a rolling upgrade) gives each one an
//! `expires_at`: a completed capture is replayed for one more retention, an allocation gets
//! the default lease (the old server's allocations never expired). Until then a document
//! without `expires_at` counts as live. An old allocation holds no token: an old client (no
//! token) can record it, a token never matches it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use idempotency_spec::Capture;
use mongodb::bson::{self, Bson, DateTime, Document, doc};
use mongodb::error::{Error as MongoError, ErrorKind, WriteFailure};
use mongodb::options::{
    Acknowledgment, ClientOptions, CollectionOptions, IndexOptions, ReadConcern, ReturnDocument,
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
const ALLOCATED: &str = "allocated";
const COMPLETED: &str = "completed";

/// MongoDB's duplicate-key error.
const DUPLICATE_KEY: i32 = 11000;
/// How often an allocation that met a duplicate-key error is tried again. One retry finds the
/// document the other allocation inserted; more only guard against a pathological race.
const DUPLICATE_RETRIES: usize = 5;
/// How often the migration of the old server's documents runs after the start.
const MIGRATION_INTERVAL: Duration = Duration::from_secs(60);

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
        // Set on the collection, so that they hold whatever the URI says.
        let collection = database.collection_with_options(
            &options.collection,
            CollectionOptions::builder()
                .write_concern(write_concern(options.write_timeout))
                .read_concern(ReadConcern::majority())
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

    /// Create the unique index on the key and the TTL index on `expires_at`, unless they exist
    /// (the old server's unique index is kept as it is).
    async fn ensure_indexes(&self) -> Result<(), StartAttempt> {
        let mut existing = Vec::new();
        match self.collection.list_indexes().await {
            Ok(mut cursor) => {
                while cursor.advance().await.map_err(start_failure)? {
                    let model: IndexModel = cursor.deserialize_current().map_err(start_failure)?;
                    existing.push(ExistingIndex::from(model));
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

    /// Give every document without `expires_at` (the old server's) one; see the module doc.
    async fn migrate(&self) -> Result<u64, MongoError> {
        let result = self
            .collection
            .update_many(
                migration_filter(),
                migration_update(millis(self.default_lease), millis(self.retention)),
            )
            .await?;
        if result.modified_count > 0 {
            tracing::info!(
                documents = result.modified_count,
                "gave the old server's documents an expiry"
            );
        }
        Ok(result.modified_count)
    }

    /// Run one command within the operation's time limit.
    async fn call<T>(
        &self,
        call: impl Future<Output = Result<T, MongoError>>,
    ) -> Result<T, Failure> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result.map_err(|e| classify(&e)),
            Err(_) => Err(Failure::Transient(format!(
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

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// `$$NOW + ms`: a BSON date, on the primary's clock.
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
///   caller's new token, the presented fingerprint (none when absent or empty) and
///   `expires_at = $$NOW + lease`.
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
/// `$literal`: it is the caller's data), kept for the retention from `$$NOW`; the allocation's
/// fingerprint stays; the token goes, so it is refused from now on.
pub fn record_update(capture: &Capture, retention_ms: i64) -> Result<Vec<Document>, StoreError> {
    let capture = bson::serialize_to_document(capture)
        .map_err(|e| StoreError::Corrupt(format!("a capture cannot be encoded: {e}")))?;
    Ok(vec![
        doc! { "$set": {
            STATUS: COMPLETED,
            CAPTURE: literal(capture),
            EXPIRES_AT: now_plus(retention_ms),
        } },
        doc! { "$unset": [TOKEN] },
    ])
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

/// A stored document as an [`Entry`]. `expires_at` missing (an old document before its
/// migration): live for ever. A missing token (an old allocation): the empty string, which no
/// filter ever matches. `response_headers: null` (an old capture without headers): none.
pub fn decode(document: &Document) -> Result<Entry, StoreError> {
    let corrupt = |why: &str| {
        let key = document.get_str(KEY).unwrap_or("?");
        StoreError::Corrupt(format!("the document of {key}: {why}"))
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
                .map_err(|e| corrupt(&format!("its capture: {e}")))?;
            Ok(Entry::Completed {
                capture,
                expires_at,
                fingerprint,
            })
        }
        _ => Err(corrupt("status is neither allocated nor completed")),
    }
}

/// An index found on the collection.
#[derive(Debug, Clone, PartialEq)]
pub struct ExistingIndex {
    pub name: String,
    pub keys: Document,
    pub unique: bool,
    pub expire_after: Option<Duration>,
}

impl From<IndexModel> for ExistingIndex {
    fn from(model: IndexModel) -> ExistingIndex {
        let options = model.options.unwrap_or_default();
        ExistingIndex {
            name: options.name.unwrap_or_default(),
            keys: model.keys,
            unique: options.unique.unwrap_or(false),
            expire_after: options.expire_after,
        }
    }
}

/// Whether `keys` is the ascending index on `field` alone (1 as an int, a long or a double).
fn ascending_on(keys: &Document, field: &str) -> bool {
    keys.len() == 1
        && match keys.get(field) {
            Some(Bson::Int32(1)) | Some(Bson::Int64(1)) => true,
            Some(Bson::Double(d)) => *d == 1.0,
            _ => false,
        }
}

/// The indexes to create, given those that exist: a unique index on `idempotency_key` (the old
/// server's, unique with a useless TTL on the string, is accepted as it is) and a TTL index
/// (`expireAfterSeconds: 0`) on `expires_at`. An existing index on either field that cannot
/// serve is an error naming it, with what to do: the server does not drop an operator's
/// index.
pub fn missing_indexes(existing: &[ExistingIndex]) -> Result<Vec<IndexModel>, String> {
    let mut missing = Vec::new();
    match existing.iter().find(|i| ascending_on(&i.keys, KEY)) {
        Some(index) if index.unique => {}
        Some(index) => {
            return Err(format!(
                "the index {} on {KEY} is not unique, so two servers could allocate one key \
                 twice; drop it (db.<collection>.dropIndex(\"{}\")) and the server creates a \
                 unique one",
                index.name, index.name
            ));
        }
        None => missing.push(
            IndexModel::builder()
                .keys(doc! { KEY: 1 })
                .options(IndexOptions::builder().unique(true).build())
                .build(),
        ),
    }
    match existing.iter().find(|i| ascending_on(&i.keys, EXPIRES_AT)) {
        Some(index) if index.expire_after == Some(Duration::ZERO) => {}
        Some(index) => {
            return Err(format!(
                "the index {} on {EXPIRES_AT} is not a TTL index with expireAfterSeconds 0, so \
                 documents would not expire at their expiry; drop it and the server creates \
                 the right one",
                index.name
            ));
        }
        None => missing.push(
            IndexModel::builder()
                .keys(doc! { EXPIRES_AT: 1 })
                .options(IndexOptions::builder().expire_after(Duration::ZERO).build())
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
    /// MongoDB is unreachable, has no primary, timed out, or did not reach a majority: a 503,
    /// and at start, worth retrying.
    Transient(String),
    /// Retrying cannot help (refused credentials, a bad URI, a conflicting index): a 503, and
    /// at start, a failure at once.
    Permanent(String),
}

impl From<Failure> for StoreError {
    fn from(failure: Failure) -> StoreError {
        match failure {
            Failure::DuplicateKey => {
                StoreError::Unavailable("a duplicate key error persisted".into())
            }
            Failure::Transient(why) | Failure::Permanent(why) => StoreError::Unavailable(why),
        }
    }
}

const NAMESPACE_NOT_FOUND: i32 = 26;

/// Server error codes that mean "not now": no primary, shutting down, a network or time-out
/// error reported by the server, a write concern not satisfied.
const TRANSIENT_CODES: &[i32] = &[
    6,     // HostUnreachable
    7,     // HostNotFound
    50,    // MaxTimeMSExpired
    64,    // WriteConcernFailed (wtimeout)
    89,    // NetworkTimeout
    91,    // ShutdownInProgress
    189,   // PrimarySteppedDown
    262,   // ExceededTimeLimit
    9001,  // SocketException
    10107, // NotWritablePrimary
    11600, // InterruptedAtShutdown
    11602, // InterruptedDueToReplStateChange
    13435, // NotPrimaryNoSecondaryOk
    13436, // NotPrimaryOrSecondary
];

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
    if command_code(error) == Some(DUPLICATE_KEY) {
        return Failure::DuplicateKey;
    }
    if error.contains_label("RetryableWriteError")
        || error.contains_label("TransientTransactionError")
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
        Failure::DuplicateKey => StartAttempt::Fatal(error.kind.to_string()),
        Failure::Transient(why) => StartAttempt::Transient(why),
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
                        .return_document(ReturnDocument::After)
                        .projection(doc! { "_id": 0 })
                        .into_future(),
                )
                .await;
            return match result {
                Ok(Some(document)) => allocate_outcome(&document, &token, fingerprint),
                Ok(None) => Err(StoreError::Corrupt("an upsert returned no document".into())),
                Err(Failure::DuplicateKey) if attempt < DUPLICATE_RETRIES => {
                    tracing::debug!(key = %request.key, "concurrent first allocations; retrying");
                    continue;
                }
                Err(failure) => Err(failure.into()),
            };
        }
    }

    async fn record(&self, request: Record) -> Result<RecordOutcome, StoreError> {
        self.closed.check()?;
        let update = record_update(&request.capture, millis(request.retention))?;
        let document = self
            .call(
                self.collection
                    .find_one_and_update(
                        holder_filter(&request.key, request.lease_token.as_deref()),
                        update,
                    )
                    .return_document(ReturnDocument::After)
                    .projection(doc! { "_id": 0, EXPIRES_AT: 1 })
                    .into_future(),
            )
            .await
            .map_err(StoreError::from)?;
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

    /// MongoDB expires documents itself (the TTL index); this only reruns the migration of the
    /// old server's documents once a minute.
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
        let update = record_update(&capture("$status"), 86_400_000).unwrap();
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
                doc! { "$unset": ["lease_token"] },
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
        let record = record_update(&capture(hostile), 1).unwrap();
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
                lease_expires_at: 5_000
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

    fn index(name: &str, keys: Document, unique: bool, ttl: Option<u64>) -> ExistingIndex {
        ExistingIndex {
            name: name.into(),
            keys,
            unique,
            expire_after: ttl.map(Duration::from_secs),
        }
    }

    #[test]
    fn indexes_are_created_when_missing() {
        let missing = missing_indexes(&[index("_id_", doc! { "_id": 1 }, false, None)]).unwrap();
        assert_eq!(missing.len(), 2);
        assert_eq!(missing[0].keys, doc! { "idempotency_key": 1 });
        assert_eq!(missing[0].options.as_ref().unwrap().unique, Some(true));
        assert_eq!(missing[1].keys, doc! { "expires_at": 1 });
        assert_eq!(
            missing[1].options.as_ref().unwrap().expire_after,
            Some(Duration::ZERO)
        );
        // Both there (the old server's unique index, TTL on the string included): nothing.
        let existing = [
            index(
                "idempotency_key_1",
                doc! { "idempotency_key": 1 },
                true,
                Some(86_400),
            ),
            index("expires_at_1", doc! { "expires_at": 1_i64 }, false, Some(0)),
            // A hashed shard key index on the key does not count, nor conflict.
            index(
                "idempotency_key_hashed",
                doc! { "idempotency_key": "hashed" },
                false,
                None,
            ),
        ];
        assert!(missing_indexes(&existing).unwrap().is_empty());
    }

    #[test]
    fn an_index_that_cannot_serve_is_an_error_naming_it() {
        let not_unique = [index("by_key", doc! { "idempotency_key": 1 }, false, None)];
        let error = missing_indexes(&not_unique).unwrap_err();
        assert!(
            error.contains("by_key") && error.contains("unique"),
            "{error}"
        );
        let not_ttl = [
            index("k", doc! { "idempotency_key": 1 }, true, None),
            index("by_expiry", doc! { "expires_at": 1 }, false, Some(3600)),
        ];
        let error = missing_indexes(&not_ttl).unwrap_err();
        assert!(error.contains("by_expiry"), "{error}");
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
    fn writes_wait_for_a_journaled_majority() {
        let wc = write_concern(Duration::from_millis(1500));
        assert_eq!(wc.w, Some(Acknowledgment::Majority));
        assert_eq!(wc.w_timeout, Some(Duration::from_millis(1500)));
        assert_eq!(wc.journal, Some(true));
    }
}
