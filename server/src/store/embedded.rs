//! The embedded store: a [redb](https://docs.rs/redb) file in the data dir, written with group
//! commit.
//!
//! redb is a pure-Rust, ACID, crash-safe key-value store (copy-on-write B-trees, checksummed
//! commit slots): nothing to build in C, nothing to run beside the server, and a commit with
//! `Durability::Immediate` is on disk when it returns.
//!
//! # Group commit
//!
//! A sync costs a fixed time whatever it carries, so one sync per operation caps throughput at
//! the disk's sync rate. Here one dedicated thread, the *writer*, owns every write transaction.
//! Operations arrive on a channel; the writer takes everything queued (up to a bound), applies it
//! all in ONE transaction with the pure state machine of [`crate::store`], commits once, and
//! only then answers every caller. So an answer is never sent before its change is durable, and
//! N concurrent operations share one sync. A batch that changed nothing (replays, 409s, 403s,
//! an empty purge) is aborted instead of committed and pays no sync.
//!
//! Because one thread applies every change in order, operations on one key are serialized: the
//! per-key atomicity comes for free, also within a batch (a later operation reads what an earlier
//! one wrote in the same transaction).
//!
//! # Layout
//!
//! - `captures`: key → [`Entry`] as JSON (small, self-describing, readable in a debugger).
//! - `expiry`: `(expires_at_ms, key)` → `()`, an index kept in step with `captures`, so that the
//!   purge is a range scan over what has expired and never a full table walk.
//!
//! Deleted entries free their pages, which redb reuses for later writes: with the purge running,
//! the file stays at the size of the live data plus the high-water mark of what was in flight.
//!
//! # One process per data dir
//!
//! `<data-dir>/LOCK` is locked exclusively (`File::try_lock`, an OS lock released when the
//! process dies, even by SIGKILL) before the database is opened, and holds the owner's pid, so
//! that a second process fails at once naming the dir and the holder.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use async_trait::async_trait;
use redb::{Database, ReadableTable, Table, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use super::{
    Allocate, AllocateOutcome, BatchOp, BatchOutcome, Change, Entry, Record, RecordOutcome,
    Release, ReleaseOutcome, Store, StoreError, UnixMillis, now_ms,
};

const CAPTURES: TableDefinition<&str, &[u8]> = TableDefinition::new("captures");
const EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("expiry");

/// The database file inside the data dir.
pub const DB_FILE: &str = "captures.redb";
/// The lock file inside the data dir.
pub const LOCK_FILE: &str = "LOCK";

/// How the embedded store is opened.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    pub data_dir: PathBuf,
    /// The most operations one transaction carries. 1 disables group commit (one sync per
    /// operation): only useful to measure what group commit buys.
    pub max_batch: usize,
    /// A batch also stops growing past this many bytes of captures, so that a burst of large
    /// records does not build one huge transaction.
    pub max_batch_bytes: usize,
    /// Operations that may wait for the writer before callers are slowed down (backpressure).
    pub queue: usize,
}

impl EmbeddedOptions {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        EmbeddedOptions {
            data_dir: data_dir.into(),
            max_batch: 1024,
            max_batch_bytes: 64 << 20,
            queue: 8192,
        }
    }
}

/// Why the embedded store could not be opened. Each renders as one line for the operator.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("data dir {dir} is in use by another process ({holder}); one process owns a data dir")]
    Locked { dir: PathBuf, holder: String },
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the store {path}: {source}")]
    Database { path: PathBuf, source: redb::Error },
}

/// Counters of the writer, for the benchmark and the shutdown log.
#[derive(Debug, Default)]
struct Counters {
    operations: AtomicU64,
    batches: AtomicU64,
    commits: AtomicU64,
    purged: AtomicU64,
}

/// A snapshot of the writer's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Allocations, records and releases applied.
    pub operations: u64,
    /// Write transactions begun (each carries one or more commands).
    pub batches: u64,
    /// Transactions committed: each is one sync to disk.
    pub commits: u64,
    /// Expired entries deleted by the purge.
    pub purged: u64,
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Command {
    Allocate(Allocate, Reply<AllocateOutcome>),
    Record(Record, Reply<RecordOutcome>),
    Release(Release, Reply<ReleaseOutcome>),
    /// Applied in the transaction of the batch it lands in, like as many single operations.
    Batch(Vec<BatchOp>, Reply<Vec<Result<BatchOutcome, StoreError>>>),
    Purge(usize, Reply<usize>),
    Ping(Reply<()>),
    Shutdown(Reply<()>),
}

impl Command {
    /// Answer with an error without applying anything.
    fn fail(self, error: StoreError) {
        // A caller that went away does not need its answer.
        match self {
            Command::Allocate(_, r) => drop(r.send(Err(error))),
            Command::Record(_, r) => drop(r.send(Err(error))),
            Command::Release(_, r) => drop(r.send(Err(error))),
            Command::Batch(_, r) => drop(r.send(Err(error))),
            Command::Purge(_, r) => drop(r.send(Err(error))),
            Command::Ping(r) | Command::Shutdown(r) => drop(r.send(Err(error))),
        }
    }

    /// Roughly how much this command adds to a transaction.
    fn weight(&self) -> usize {
        fn record(r: &Record) -> usize {
            r.capture.response_body.len() + 256
        }
        match self {
            Command::Record(r, _) => record(r),
            Command::Batch(ops, _) => ops
                .iter()
                .map(|op| match op {
                    BatchOp::Record(r) => record(r),
                    BatchOp::Release(_) => 256,
                })
                .sum(),
            _ => 256,
        }
    }

    /// How many operations this command counts for against the batch bound.
    fn operations(&self) -> usize {
        match self {
            Command::Batch(ops, _) => ops.len().max(1),
            _ => 1,
        }
    }
}

/// The embedded store. Cheap to share: callers only hold the channel to the writer.
pub struct EmbeddedStore {
    commands: mpsc::Sender<Command>,
    writer: Mutex<Option<JoinHandle<()>>>,
    counters: Arc<Counters>,
    data_dir: PathBuf,
}

impl EmbeddedStore {
    /// Lock the data dir, open (or create, or repair after a crash) the database and start the
    /// writer thread. Blocking: call it from `spawn_blocking` inside a runtime.
    pub fn open(options: EmbeddedOptions) -> Result<EmbeddedStore, OpenError> {
        let dir = options.data_dir.clone();
        std::fs::create_dir_all(&dir).map_err(|source| OpenError::Io {
            what: "create the data dir",
            path: dir.clone(),
            source,
        })?;
        let lock = DirLock::acquire(&dir)?;
        let path = dir.join(DB_FILE);
        let db_error = |source: redb::Error| OpenError::Database {
            path: path.clone(),
            source,
        };
        let db = Database::builder()
            .set_repair_callback(|session| {
                tracing::warn!(
                    progress = session.progress(),
                    "repairing the store after an unclean shutdown"
                );
            })
            .create(&path)
            .map_err(|e| db_error(e.into()))?;
        // Create both tables up front, so that reads never meet a missing table.
        let txn = db.begin_write().map_err(|e| db_error(e.into()))?;
        txn.open_table(CAPTURES).map_err(|e| db_error(e.into()))?;
        txn.open_table(EXPIRY).map_err(|e| db_error(e.into()))?;
        txn.commit().map_err(|e| db_error(e.into()))?;

        let (commands, receiver) = mpsc::channel(options.queue.max(1));
        let counters = Arc::new(Counters::default());
        let writer = Writer {
            db,
            _lock: lock,
            commands: receiver,
            counters: counters.clone(),
            max_batch: options.max_batch.max(1),
            max_batch_bytes: options.max_batch_bytes.max(1),
        };
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run())
            .map_err(|source| OpenError::Io {
                what: "start the writer thread for",
                path: path.clone(),
                source,
            })?;
        tracing::info!(path = %path.display(), "embedded store open");
        Ok(EmbeddedStore {
            commands,
            writer: Mutex::new(Some(handle)),
            counters,
            data_dir: dir,
        })
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn stats(&self) -> Stats {
        Stats {
            operations: self.counters.operations.load(Ordering::Relaxed),
            batches: self.counters.batches.load(Ordering::Relaxed),
            commits: self.counters.commits.load(Ordering::Relaxed),
            purged: self.counters.purged.load(Ordering::Relaxed),
        }
    }

    /// Send one command to the writer and wait for its answer, which comes after the commit.
    async fn call<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        // Dropped without an answer: the transaction carrying it failed part-way (or the
        // writer died). Operations refused because of a shutdown are answered `Closed`.
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the operation was not applied".into()))?
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    fn name(&self) -> &'static str {
        "embedded"
    }

    async fn allocate(&self, request: Allocate) -> Result<AllocateOutcome, StoreError> {
        self.call(|reply| Command::Allocate(request, reply)).await
    }

    async fn record(&self, request: Record) -> Result<RecordOutcome, StoreError> {
        self.call(|reply| Command::Record(request, reply)).await
    }

    async fn release(&self, request: Release) -> Result<ReleaseOutcome, StoreError> {
        self.call(|reply| Command::Release(request, reply)).await
    }

    /// One command: every item lands in the same transaction and shares its one sync.
    async fn batch(&self, operations: Vec<BatchOp>) -> Vec<Result<BatchOutcome, StoreError>> {
        let n = operations.len();
        match self.call(|reply| Command::Batch(operations, reply)).await {
            Ok(results) => results,
            // Nothing of it was acknowledged: every item fails alike.
            Err(e) => (0..n)
                .map(|_| Err(StoreError::Unavailable(e.to_string())))
                .collect(),
        }
    }

    async fn ready(&self) -> Result<(), StoreError> {
        self.call(Command::Ping).await
    }

    async fn purge_expired(&self, limit: usize) -> Result<usize, StoreError> {
        self.call(|reply| Command::Purge(limit, reply)).await
    }

    async fn shutdown(&self) -> Result<(), StoreError> {
        let Some(handle) = self.writer.lock().expect("writer handle").take() else {
            return Ok(()); // already shut down
        };
        // Everything queued before this command is applied and committed first.
        let flushed = self.call(Command::Shutdown).await;
        // The thread closes the database and unlocks the data dir as it exits.
        tokio::task::spawn_blocking(move || handle.join())
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
            .map_err(|_| StoreError::Unavailable("the writer thread panicked".into()))?;
        let stats = self.stats();
        tracing::info!(
            operations = stats.operations,
            commits = stats.commits,
            purged = stats.purged,
            "embedded store closed"
        );
        flushed
    }
}

/// The exclusive lock on `<data-dir>/LOCK`, held for as long as the store is open.
struct DirLock {
    _file: File,
}

impl DirLock {
    fn acquire(dir: &Path) -> Result<DirLock, OpenError> {
        let path = dir.join(LOCK_FILE);
        let io = |what, source| OpenError::Io {
            what,
            path: path.clone(),
            source,
        };
        // Not truncated on open: the holder's pid is in it until we own the lock.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io("open the lock file", e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path)
                    .ok()
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "holder unknown".into());
                return Err(OpenError::Locked {
                    dir: dir.to_owned(),
                    holder,
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io("lock", e)),
        }
        file.set_len(0).map_err(|e| io("write", e))?;
        writeln!(file, "pid {}", std::process::id()).map_err(|e| io("write", e))?;
        Ok(DirLock { _file: file })
    }
}

/// The writer thread's state: it alone writes to the database.
struct Writer {
    db: Database,
    // Dropped after `db` (fields drop in order): the dir stays locked until the file is closed.
    _lock: DirLock,
    commands: mpsc::Receiver<Command>,
    counters: Arc<Counters>,
    max_batch: usize,
    max_batch_bytes: usize,
}

/// An answer computed inside the transaction, sent once the commit's fate is known.
type Pending = Box<dyn FnOnce(Option<&StoreError>) + Send>;

fn answer<T: Send + 'static>(reply: Reply<T>, result: Result<T, StoreError>) -> Pending {
    Box::new(move |commit_error| {
        let result = match (commit_error, result) {
            (Some(e), Ok(_)) => Err(StoreError::Unavailable(e.to_string())),
            (_, result) => result,
        };
        let _ = reply.send(result);
    })
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl Writer {
    fn run(mut self) {
        let mut shutdown = None;
        while shutdown.is_none() {
            let Some(first) = self.commands.blocking_recv() else {
                break; // every sender is gone
            };
            let mut bytes = first.weight();
            let mut operations = first.operations();
            let mut batch = vec![first];
            while operations < self.max_batch && bytes < self.max_batch_bytes {
                match self.commands.try_recv() {
                    Ok(command) => {
                        bytes += command.weight();
                        operations += command.operations();
                        batch.push(command);
                    }
                    Err(_) => break,
                }
            }
            shutdown = self.apply(batch);
        }
        // Refuse what is still queued; the database (and the lock) close when `self` drops, at
        // the end of this function, before the shutdown is answered.
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            command.fail(StoreError::Closed);
        }
        drop(self);
        if let Some((reply, flushed)) = shutdown {
            let _ = reply.send(flushed);
        }
    }

    /// Apply one batch in one transaction and answer it. If the batch carried a shutdown, returns
    /// its reply and whether what came before it was committed (commands after it are refused).
    fn apply(&mut self, batch: Vec<Command>) -> Option<(Reply<()>, Result<(), StoreError>)> {
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        let txn = match self.db.begin_write() {
            Ok(txn) => txn,
            Err(e) => {
                tracing::error!(error = %e, "cannot begin a write transaction");
                return fail_all(batch, &unavailable(e));
            }
        };
        let mut pending: Vec<Pending> = Vec::with_capacity(batch.len());
        let mut shutdown = None;
        let mut changed = false;
        let mut rest = batch.into_iter();
        let applied: Result<(), redb::Error> = (|| {
            let mut tables = Tables {
                captures: txn.open_table(CAPTURES)?,
                expiry: txn.open_table(EXPIRY)?,
                counters: &self.counters,
            };
            let now = now_ms();
            for command in rest.by_ref() {
                match command {
                    Command::Allocate(request, reply) => {
                        changed |=
                            operate(&mut tables, &request.key, reply, &mut pending, |current| {
                                super::allocate(current, &request, now, super::new_lease_token)
                            })?;
                    }
                    Command::Record(request, reply) => {
                        changed |=
                            operate(&mut tables, &request.key, reply, &mut pending, |current| {
                                super::record(current, &request, now)
                            })?;
                    }
                    Command::Release(request, reply) => {
                        changed |=
                            operate(&mut tables, &request.key, reply, &mut pending, |current| {
                                super::release(current, &request, now)
                            })?;
                    }
                    Command::Batch(operations, reply) => {
                        let mut results = Vec::with_capacity(operations.len());
                        for op in operations {
                            let (result, wrote) = match op {
                                BatchOp::Record(request) => {
                                    step(&mut tables, &request.key, |current| {
                                        super::record(current, &request, now)
                                    })
                                    .map(|(r, w)| (r.map(BatchOutcome::Record), w))?
                                }
                                BatchOp::Release(request) => {
                                    step(&mut tables, &request.key, |current| {
                                        super::release(current, &request, now)
                                    })
                                    .map(|(r, w)| (r.map(BatchOutcome::Release), w))?
                                }
                            };
                            changed |= wrote;
                            results.push(result);
                        }
                        pending.push(answer(reply, Ok(results)));
                    }
                    Command::Purge(limit, reply) => {
                        let (rows, purged) =
                            purge(&mut tables.captures, &mut tables.expiry, now, limit)?;
                        changed |= rows > 0;
                        self.counters
                            .purged
                            .fetch_add(purged as u64, Ordering::Relaxed);
                        pending.push(answer(reply, Ok(rows)));
                    }
                    Command::Ping(reply) => {
                        // A read through the write path: the writer is alive and the table
                        // answers.
                        tables.captures.first()?;
                        pending.push(answer(reply, Ok(())));
                    }
                    Command::Shutdown(reply) => {
                        shutdown = Some(reply);
                        break;
                    }
                }
            }
            Ok(())
        })();

        let outcome: Result<(), StoreError> = match applied {
            Err(e) => {
                tracing::error!(error = %e, "a write transaction failed; rolled back");
                let _ = txn.abort();
                Err(unavailable(e))
            }
            Ok(()) if changed => match txn.commit() {
                Ok(()) => {
                    self.counters.commits.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                Err(e) => {
                    // redb refuses further writes after a failed commit; every later operation
                    // answers 503 and /-/ready turns 503, until a restart repairs the file.
                    tracing::error!(error = %e, "a commit failed");
                    Err(unavailable(e))
                }
            },
            // Nothing to make durable: no sync.
            Ok(()) => txn.abort().map_err(unavailable),
        };
        let error = outcome.err();
        for done in pending {
            done(error.as_ref());
        }
        // Left over: after a shutdown in the batch (closed), or after a failure (unavailable).
        for command in rest {
            command.fail(error.as_ref().map_or(StoreError::Closed, unavailable));
        }
        shutdown.map(|reply| (reply, error.map_or(Ok(()), Err)))
    }
}

/// The tables of one write transaction, and the counters its operations add to.
struct Tables<'t> {
    captures: Table<'t, &'static str, &'static [u8]>,
    expiry: Table<'t, (u64, &'static str), ()>,
    counters: &'t Counters,
}

/// One allocation, record or release, the same for the three: read the key's entry, run the
/// state machine on it, write the change (keeping the expiry index in step), count the
/// operation, and queue the answer for when the commit's fate is known. Returns whether
/// anything was written. An entry that cannot be decoded fails this operation only; a database
/// error aborts the batch.
fn operate<T: Send + 'static>(
    tables: &mut Tables<'_>,
    key: &str,
    reply: Reply<T>,
    pending: &mut Vec<Pending>,
    state_machine: impl FnOnce(Option<&Entry>) -> (T, Change),
) -> Result<bool, redb::Error> {
    let (result, changed) = step(tables, key, state_machine)?;
    pending.push(answer(reply, result));
    Ok(changed)
}

/// The part of [`operate`] a batch item shares: read, decide, write, count; the outcome (or the
/// error of an undecodable entry) and whether anything was written.
fn step<T>(
    tables: &mut Tables<'_>,
    key: &str,
    state_machine: impl FnOnce(Option<&Entry>) -> (T, Change),
) -> Result<(Result<T, StoreError>, bool), redb::Error> {
    let mut changed = false;
    let result = match read(&tables.captures, key)? {
        Ok(current) => {
            let (outcome, change) = state_machine(current.as_ref());
            changed = write(
                &mut tables.captures,
                &mut tables.expiry,
                key,
                current.as_ref(),
                change,
            )?;
            Ok(outcome)
        }
        Err(e) => Err(e),
    };
    tables.counters.operations.fetch_add(1, Ordering::Relaxed);
    Ok((result, changed))
}

fn fail_all(
    batch: Vec<Command>,
    error: &StoreError,
) -> Option<(Reply<()>, Result<(), StoreError>)> {
    let mut shutdown = None;
    for command in batch {
        match command {
            Command::Shutdown(reply) => shutdown = Some((reply, Err(unavailable(error)))),
            other => other.fail(unavailable(error)),
        }
    }
    shutdown
}

/// The raw entry of a key, expired or not. The outer error is the database's (it aborts the
/// batch), the inner one a single undecodable entry (it fails that operation only).
fn read(
    captures: &Table<&str, &[u8]>,
    key: &str,
) -> Result<Result<Option<Entry>, StoreError>, redb::Error> {
    let Some(value) = captures.get(key)? else {
        return Ok(Ok(None));
    };
    Ok(serde_json::from_slice(value.value())
        .map(Some)
        .map_err(|e| {
            tracing::error!(key, error = %e, "an entry cannot be decoded");
            StoreError::Corrupt(e.to_string())
        }))
}

/// Apply a change, keeping the expiry index in step. Returns whether anything was written.
fn write(
    captures: &mut Table<&str, &[u8]>,
    expiry: &mut Table<(u64, &str), ()>,
    key: &str,
    current: Option<&Entry>,
    change: Change,
) -> Result<bool, redb::Error> {
    let new = match change {
        Change::None => return Ok(false),
        Change::Put(entry) => Some(entry),
        Change::Delete => None,
    };
    if let Some(old) = current {
        expiry.remove((old.expires_at(), key))?;
    }
    match new {
        Some(entry) => {
            let bytes = serde_json::to_vec(&entry).expect("an entry always encodes");
            captures.insert(key, bytes.as_slice())?;
            expiry.insert((entry.expires_at(), key), ())?;
        }
        None => {
            captures.remove(key)?;
        }
    }
    Ok(true)
}

/// Delete up to `limit` entries whose expiry has passed, oldest first. Returns how many index
/// rows were consumed (`limit` means there may be more) and how many entries were deleted.
fn purge(
    captures: &mut Table<&str, &[u8]>,
    expiry: &mut Table<(u64, &str), ()>,
    now: UnixMillis,
    limit: usize,
) -> Result<(usize, usize), redb::Error> {
    // Everything that expired at or before `now` (an entry is free from its expiry on).
    let due: Vec<(u64, String)> = expiry
        .range::<(u64, &str)>(..(now.saturating_add(1), ""))?
        .take(limit)
        .map(|row| row.map(|(k, _)| (k.value().0, k.value().1.to_owned())))
        .collect::<Result<_, _>>()?;
    let mut purged = 0;
    for (at, key) in &due {
        expiry.remove((*at, key.as_str()))?;
        // The index row may be stale only if the entry changed without it, which `write` never
        // does; still, delete the entry only if it really is the expired one.
        let expired = match captures.get(key.as_str())? {
            Some(value) => serde_json::from_slice::<Entry>(value.value())
                .map(|e| e.expires_at() == *at && !e.is_live(now))
                .unwrap_or(false),
            None => false,
        };
        if expired {
            captures.remove(key.as_str())?;
            purged += 1;
        }
    }
    Ok((due.len(), purged))
}
