//! The embedded store: a [redb](https://docs.rs/redb) file in the data dir, written with group
//! commit through a journal.
//!
//! redb is a pure-Rust, ACID, crash-safe key-value store (copy-on-write B-trees, checksummed
//! commit slots): nothing to build in C, nothing to run beside the server.
//!
//! # Group commit, and a sync that overlaps the next batch
//!
//! A sync costs a fixed time whatever it carries, so one sync per operation caps throughput at
//! the disk's sync rate. Here one dedicated thread, the *writer*, applies every change.
//! Operations arrive on a channel; the writer takes everything queued (up to a bound) and
//! applies it all as one batch with the pure state machine of [`crate::store`]. Because one
//! thread applies every change in order, operations on one key are serialized: the per-key
//! atomicity comes for free, also within a batch (a later operation reads what an earlier one
//! wrote in the same batch).
//!
//! A batch that changed something is made durable by its [`journal`] record alone: the writer
//! appends the batch's changes to the journal and syncs it, or hands the batch's answers to a
//! second thread, the *syncer*, which runs one `fdatasync` of the journal for everything handed
//! to it meanwhile and only then answers. So the sync of one batch can overlap the work of the
//! next, and a sync writes one place of a pre-grown file instead of a dozen scattered pages.
//! While syncs are fast (under [`INLINE_SYNC_BELOW`] on average, as on an SSD) the writer makes
//! the sync itself: the overlap would save less than the two thread hand-offs cost.
//!
//! # redb gets the batches at checkpoints
//!
//! The writer does not write to redb. It reads a key through a [`View`]: the batch's own
//! changes, then what the batches since the last checkpoints changed (in-memory maps, key →
//! entry), then a snapshot of redb's last durable commit (which it skips for a fresh key
//! that the caller's read found absent from the same snapshot: [`Absent`]). Every so often
//! (100 ms, or 8 MiB of journal) a *checkpoint* on a thread of its own (`store-checkpoint`)
//! applies the journal's records since the last one to redb in one transaction, runs the
//! purges waiting for it, and commits durably; the journal then starts over (the next generation, in the other journal
//! file: see [`journal`]). Meanwhile the writer goes on (up to
//! [`EmbeddedOptions::max_staged_bytes`] of journal, then it waits for the checkpoint); once
//! the checkpoint is on disk it reads those keys from redb again. The B-tree inserts and
//! redb's commit are then paid once per checkpoint, off the writer, whose cycle (apply,
//! journal, sync, answer) is what bounds the rate of durable allocations: this gave 8–19 % more allocations per second than the
//! writer committing each batch to redb itself, without a sync, in four series of alternating
//! `wrk` runs at 32 connections (1 % in a fifth), and 5 % more replays (bench/experiments.md). At
//! open, redb comes back at its last durable commit and the journal's records after it are
//! applied again, those of a checkpoint that did not land included.
//!
//! No answer is sent before its change is durable, and no answer depends on a change that is
//! not: a batch that changed nothing (replays, 409s, 403s, a readiness probe) pays no sync,
//! but while an earlier batch's sync is pending its answers wait for it. An allocation of a
//! key that is live (a replay, a 409, a 422) is answered on the caller's thread without the
//! writer: from the view, once the batch that wrote the key's entry is durable, or else from
//! redb's snapshot, which holds durable commits only.
//!
//! # Layout
//!
//! - `captures`: key → [`Entry`] in a compact binary form ([`codec`]: what the disk holds per
//!   capture; a base64 body is kept as the bytes it encodes). Older data dirs hold JSON,
//!   which is still read.
//! - `expiry`: `(purge_at_ms, key)` → `()`, an index kept in step with `captures`, so that the
//!   purge is a range scan over what has expired and never a full table walk. An entry is
//!   purged at its expiry, a lease [`TAKEOVER_WINDOW`](super::TAKEOVER_WINDOW) later
//!   ([`Entry::purge_at`]), so that its takeover is seen.
//! - `meta`: the journal's generation (see [`journal`]).
//!
//! Deleted entries free their pages, which redb reuses for later writes: with the purge running,
//! the file stays at the size of the live data plus the high-water mark of what was in flight.
//!
//! # One process per data dir
//!
//! `<data-dir>/LOCK` is locked exclusively (`File::try_lock`, an OS lock released when the
//! process dies, even by SIGKILL) before the database is opened, and holds the owner's pid, so
//! that a second process fails at once naming the dir and the holder.
//!
//! # After a failed write
//!
//! A failed write or sync (disk full, read-only, I/O error) stops the store: from then on it
//! refuses everything (503), since after a failed sync nothing it holds in memory can be
//! trusted. The server runs it inside [`Reopening`], which then closes it and opens the data
//! dir again, as a restart would, once a second at most, until that succeeds.

mod codec;
mod journal;
mod reopen;

pub use reopen::Reopening;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter};
use redb::{Database, ReadOnlyTable, ReadableDatabase as _, ReadableTable, Table, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use journal::Journal;

use super::{
    Allocate, AllocateOutcome, BatchOp, BatchOutcome, Change, Entry, Record, RecordOutcome,
    Release, ReleaseOutcome, Store, StoreError, UnixMillis, now_ms,
};

const CAPTURES: TableDefinition<&str, &[u8]> = TableDefinition::new("captures");
const EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("expiry");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// In `meta`: the generation of the journal records that come after this durable commit.
const GENERATION: &str = "journal_generation";

/// The database file inside the data dir.
pub const DB_FILE: &str = "captures.redb";
/// The lock file inside the data dir.
pub const LOCK_FILE: &str = "LOCK";
/// The journal files inside the data dir (one per parity of the generation, see [`journal`]).
pub const JOURNAL_FILES: [&str; 2] = journal::FILES;

/// How the embedded store is opened.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    pub data_dir: PathBuf,
    /// The most operations one transaction carries. 1 disables group commit in the writer
    /// (syncs still carry every batch journaled meanwhile).
    pub max_batch: usize,
    /// A batch also stops growing past this many bytes of captures, so that a burst of large
    /// records does not build one huge transaction.
    pub max_batch_bytes: usize,
    /// Operations that may wait for the writer before callers are slowed down (backpressure).
    pub queue: usize,
    /// A checkpoint (a durable redb commit, after which the journal starts over) is made once
    /// the journal holds this many bytes...
    pub checkpoint_bytes: u64,
    /// ...or this long after the last one, whichever comes first: it bounds the journal's
    /// size, the work of an open after a crash, and what redb keeps unsynced in memory.
    pub checkpoint_interval: Duration,
    /// Checkpoints run on a thread of their own while the writer stages the batches that come
    /// meanwhile (the default). `false`: the writer makes them itself, and waits (the
    /// benchmark's comparison with `checkpoint_bytes: 0`, a durable commit per batch).
    pub background_checkpoints: bool,
    /// While a checkpoint runs, the batches after it wait in memory for the next one (in the
    /// view, and as journal records). Once they hold this many bytes of journal the writer
    /// waits for the checkpoint to land before it applies more: backpressure, should redb
    /// fall behind the journal.
    pub max_staged_bytes: u64,
    /// How long the purge keeps an expired lease ([`super::TAKEOVER_WINDOW`]).
    pub takeover_window: Duration,
    /// The writer syncs a batch's journal record itself while a sync takes less than this
    /// (its recent average), and hands it to the syncer thread otherwise
    /// ([`INLINE_SYNC_BELOW`]). `Duration::ZERO`: always the syncer.
    pub inline_sync_below: Duration,
}

/// The default [`EmbeddedOptions::inline_sync_below`]. Handing a batch to the syncer lets the
/// writer apply the next batch during the sync, at the price of two thread hand-offs (writer →
/// syncer → callers) which, on cores kept busy by the HTTP side, cost more than a fast sync:
/// with syncs of about 0.15 ms (this project's 2-core machines), syncing on the writer gave
/// about 19 % more allocations per second at 32 connections (`wrk`, three alternating runs of
/// each). A slow sync (a spinning disk, a network volume without a write cache: several
/// milliseconds) is where the overlap pays: the batches that arrive during it are applied
/// meanwhile, and all of them are made durable by the next sync. A millisecond lies between.
pub const INLINE_SYNC_BELOW: Duration = Duration::from_millis(1);

/// The default [`EmbeddedOptions::checkpoint_interval`]. A checkpoint runs beside the writer,
/// but its page writes and sync share the disk with the journal's syncs, so the batches journaled
/// meanwhile wait longer for theirs: under fresh allocations at 32 connections a checkpoint
/// once a second took about 27 ms, and the batches journaled during it were the slowest 1 % of the
/// answers (a p99 of 9–11 ms). Ten times a second each is shorter and the p99 was 4–5 ms
/// (6.6 ms once) at the same throughput (`wrk --latency`, alternating runs). (When the writer
/// itself made the checkpoints, ten a second cost up to a third of the store's throughput:
/// it waited for each.)
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);

impl EmbeddedOptions {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        EmbeddedOptions {
            data_dir: data_dir.into(),
            max_batch: 1024,
            max_batch_bytes: 64 << 20,
            queue: 8192,
            checkpoint_bytes: 8 << 20,
            checkpoint_interval: CHECKPOINT_INTERVAL,
            background_checkpoints: true,
            max_staged_bytes: 32 << 20,
            takeover_window: super::TAKEOVER_WINDOW,
            inline_sync_below: INLINE_SYNC_BELOW,
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
    #[error("cannot replay the journal {path}: {why}")]
    Journal { path: PathBuf, why: String },
}

/// Counters and histograms of the writer and the syncer: for the benchmark, the shutdown log,
/// and the server's metrics (`idempotency_server_embedded_*`, [`Store::register_metrics`]).
/// Each update is one atomic add.
#[derive(Debug, Clone)]
struct Counters {
    operations: IntCounter,
    reads: IntCounter,
    batches: IntCounter,
    commits: IntCounter,
    syncs: IntCounter,
    writer_syncs: IntCounter,
    checkpoints: IntCounter,
    staged: IntCounter,
    purged: IntCounter,
    /// Operations per batch: the group commit's batch size.
    batch_operations: Histogram,
    /// Until a batch's journal record is synced, and each checkpoint (the family, and its two
    /// children).
    commit: HistogramVec,
    journal_commit: Histogram,
    checkpoint_commit: Histogram,
}

impl Counters {
    /// Adds them to the server's metrics (`GET /metrics`).
    fn register(&self, registry: &prometheus::Registry) {
        let c = self.clone();
        let collectors: [Box<dyn prometheus::core::Collector>; 11] = [
            Box::new(c.operations),
            Box::new(c.reads),
            Box::new(c.batches),
            Box::new(c.commits),
            Box::new(c.syncs),
            Box::new(c.writer_syncs),
            Box::new(c.checkpoints),
            Box::new(c.staged),
            Box::new(c.purged),
            Box::new(c.batch_operations),
            Box::new(c.commit),
        ];
        for collector in collectors {
            if let Err(e) = registry.register(collector) {
                tracing::warn!(error = %e, "the embedded store's metrics are registered already");
            }
        }
    }
}

impl Default for Counters {
    fn default() -> Counters {
        let counter = |name: &str, help: &str| {
            IntCounter::new(format!("{}embedded_{name}", crate::metrics::PREFIX), help)
                .expect("a valid metric")
        };
        let commit = HistogramVec::new(
            HistogramOpts::new(
                format!("{}embedded_commit_duration_seconds", crate::metrics::PREFIX),
                "Until a batch's journal record is synced, from its write (journal); each checkpoint, applying the journal's batches to redb and committing durably (checkpoint).",
            )
            .buckets(crate::metrics::LATENCY_BUCKETS.to_vec()),
            &["kind"],
        )
        .expect("a valid metric");
        Counters {
            operations: counter(
                "operations_total",
                "Allocations, records and releases the embedded store applied, including those answered by a read.",
            ),
            reads: counter(
                "reads_total",
                "Allocations of a live key answered on the caller's thread from the store's view, without the writer.",
            ),
            batches: counter(
                "transactions_total",
                "Batches the writer applied (each carries one or more of the callers' commands).",
            ),
            commits: counter(
                "commits_total",
                "Batches that changed something (each one journal record).",
            ),
            syncs: counter(
                "syncs_total",
                "Syncs to disk: fdatasync of the journal (each covers every transaction journaled before it) and durable commits.",
            ),
            writer_syncs: counter(
                "writer_syncs_total",
                "Syncs of the journal made by the writer thread itself (while syncs are fast), not handed to the syncer; part of syncs_total.",
            ),
            checkpoints: counter(
                "checkpoints_total",
                "Checkpoints that applied the journal's batches to redb, durably (the journal then started over).",
            ),
            staged: counter(
                "staged_total",
                "Batches that changed something while a checkpoint ran beside the writer (the next checkpoint applies them to redb).",
            ),
            purged: counter("purged_total", "Expired entries deleted by the purge."),
            batch_operations: Histogram::with_opts(
                HistogramOpts::new(
                    format!("{}embedded_transaction_operations", crate::metrics::PREFIX),
                    "Operations (allocations, records, releases, batch items) per batch of the writer: the group commit's batch size.",
                )
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0]),
            )
            .expect("a valid metric"),
            journal_commit: commit.with_label_values(&["journal"]),
            checkpoint_commit: commit.with_label_values(&["checkpoint"]),
            commit,
        }
    }
}

/// A snapshot of the store's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Allocations, records and releases applied (including those answered by a read).
    pub operations: u64,
    /// Allocations of a live key answered on the caller's thread, without the writer.
    pub reads: u64,
    /// Batches the writer applied (each carries one or more of the callers' commands).
    pub batches: u64,
    /// Batches that changed something (each one journal record).
    pub commits: u64,
    /// Syncs to disk: of the journal (each carries every batch journaled before it), and
    /// durable redb commits (checkpoints).
    pub syncs: u64,
    /// Of the journal's syncs, those the writer made itself (fast syncs), not the syncer.
    pub writer_syncs: u64,
    /// Checkpoints that applied the journal's batches to redb (the journal then started over).
    pub checkpoints: u64,
    /// Batches that changed something while a checkpoint ran beside the writer.
    pub staged: u64,
    /// Expired entries deleted by the purge.
    pub purged: u64,
}

/// What the store's callers, the writer and the syncer share.
#[derive(Debug, Default)]
struct Shared {
    counters: Counters,
    /// Every batch up to this number is durable.
    durable: AtomicU64,
    /// A write or a sync failed: nothing is acknowledged any more until a restart (after a
    /// failed `fdatasync` the kernel may have dropped the unwritten pages; a later sync that
    /// succeeds proves nothing).
    failed: AtomicBool,
    /// A moving average of the journal's sync time, in nanoseconds (0 until the first).
    sync_nanos: AtomicU64,
}

/// The store as the writer left it: redb's last durable commit under what redb does not hold
/// yet (it gets that at the next checkpoint). Read by the writer and by the callers' reads;
/// changed (under the lock, so that a read sees one state) as batches apply and checkpoints
/// begin and land.
struct View {
    /// redb as of the last checkpoint that landed (only checkpoints commit to redb, durably).
    /// `None` once the writer has exited: a read transaction keeps the file open.
    snapshot: Option<ReadOnlyTable<&'static str, &'static [u8]>>,
    /// Which snapshot `snapshot` is (one more at each checkpoint that lands): a key a caller
    /// found in neither the staged maps nor this snapshot is still absent from it.
    epoch: u64,
    /// What the batches since the last checkpoint began changed.
    current: HashMap<String, Staged>,
    /// What the checkpoint running now applies to redb (empty once it has landed).
    frozen: HashMap<String, Staged>,
}

/// What a caller's read of an allocation's key found: `Some(epoch)` if the key was in neither
/// the view's staged maps nor its snapshot `epoch`. The writer then reads only the staged maps
/// (where a change made since would be) while that snapshot is still the view's, and spares
/// itself the B-tree lookup of a fresh key, which the caller has made already.
type Absent = Option<u64>;

/// A key's last entry in the [`View`] (encoded; `None`: deleted), and the number of the batch
/// that wrote it: a caller answers from it only once that batch is durable.
struct Staged {
    batch: u64,
    entry: Option<Vec<u8>>,
}

impl View {
    fn staged(&self, key: &str) -> Option<&Staged> {
        self.current.get(key).or_else(|| self.frozen.get(key))
    }

    /// The raw entry of a key, expired or not (see [`read`]), given `staged`, its
    /// [`View::staged`] (which the caller looks up first: a caller's read checks its batch).
    /// The snapshot is not read if `absent` says a read of this one found nothing.
    fn entry(
        &self,
        key: &str,
        staged: Option<&Staged>,
        absent: Absent,
    ) -> Result<Result<Option<Entry>, StoreError>, redb::Error> {
        match staged {
            Some(staged) => Ok(decode_staged(key, staged.entry.as_deref())),
            None if absent == Some(self.epoch) => Ok(Ok(None)),
            None => match &self.snapshot {
                Some(snapshot) => read(snapshot, key),
                None => Ok(Err(StoreError::Closed)),
            },
        }
    }
}

/// `captures` as of redb's last commit (which is durable: only checkpoints commit).
fn snapshot(db: &Database) -> Result<ReadOnlyTable<&'static str, &'static [u8]>, redb::Error> {
    Ok(db.begin_read()?.open_table(CAPTURES)?)
}

fn decode_staged(key: &str, bytes: Option<&[u8]>) -> Result<Option<Entry>, StoreError> {
    bytes
        .map(|bytes| decoded(key, codec::decode(bytes)))
        .transpose()
}

// Nothing panics while holding the view's lock; a poisoned one is used as it is.
fn read_view(view: &RwLock<View>) -> RwLockReadGuard<'_, View> {
    view.read().unwrap_or_else(PoisonError::into_inner)
}

fn write_view(view: &RwLock<View>) -> RwLockWriteGuard<'_, View> {
    view.write().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// What a sync of the journal takes lately: the average of the last few, each weighing
    /// an eighth, so that one slow sync does not flip the writer's choice.
    fn sync_time(&self) -> Duration {
        Duration::from_nanos(self.sync_nanos.load(Ordering::Relaxed))
    }

    fn observe_sync(&self, took: Duration) {
        let took = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let average = self.sync_nanos.load(Ordering::Relaxed);
        let next = if average == 0 {
            took
        } else {
            average - average / 8 + took / 8
        };
        // The writer and the syncer may both sync for a moment; a lost update is harmless.
        self.sync_nanos.store(next.max(1), Ordering::Relaxed);
    }

    fn failed(&self) -> Result<(), StoreError> {
        if self.failed.load(Ordering::Acquire) {
            Err(StoreError::Unavailable(
                "a write to disk failed earlier; restart the server".into(),
            ))
        } else {
            Ok(())
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Command {
    /// With the lease token it gets if it takes the key, drawn by the caller, and what the
    /// caller's read found: work kept off the writer, the one thread every change goes through.
    Allocate(Allocate, String, Absent, Reply<AllocateOutcome>),
    Record(Record, Reply<RecordOutcome>),
    Release(Release, Reply<ReleaseOutcome>),
    /// Applied in the transaction of the batch it lands in, like as many single operations.
    Batch(Vec<BatchOp>, Reply<Vec<Result<BatchOutcome, StoreError>>>),
    Purge(usize, Reply<usize>),
    Ping(Reply<()>),
    Shutdown(Reply<()>),
    /// From the checkpoint thread when its commit is over: the writer, idle maybe, lands it
    /// (reads its keys from redb again, and begins the next checkpoint if one is due). With
    /// the checkpoint's number: the writer may have landed it already, and begun another,
    /// which this must not make it wait for.
    Checkpointed(u64),
}

impl Command {
    /// Answer with an error without applying anything.
    fn fail(self, error: StoreError) {
        // A caller that went away does not need its answer.
        match self {
            Command::Allocate(_, _, _, r) => drop(r.send(Err(error))),
            Command::Record(_, r) => drop(r.send(Err(error))),
            Command::Release(_, r) => drop(r.send(Err(error))),
            Command::Batch(_, r) => drop(r.send(Err(error))),
            Command::Purge(_, r) => drop(r.send(Err(error))),
            Command::Ping(r) | Command::Shutdown(r) => drop(r.send(Err(error))),
            Command::Checkpointed(_) => {}
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

/// The embedded store. Cheap to share: callers hold the channel to the writer, and the
/// database for the reads that need no writer.
pub struct EmbeddedStore {
    commands: mpsc::Sender<Command>,
    /// Set when the shutdown begins: reads leave everything to the writer from then on.
    closed: AtomicBool,
    /// The store as the writer left it, which reads look up.
    view: Arc<RwLock<View>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    shared: Arc<Shared>,
    data_dir: PathBuf,
}

impl EmbeddedStore {
    /// Lock the data dir, open (or create, or repair after a crash) the database, apply the
    /// journal's records since its last durable commit, and start the writer and syncer
    /// threads. Blocking: call it from `spawn_blocking` inside a runtime.
    pub fn open(options: EmbeddedOptions) -> Result<EmbeddedStore, OpenError> {
        EmbeddedStore::open_counting(options, Counters::default())
    }

    /// Opens it counting into `counters` (those of a store it replaces: [`Reopening`]).
    fn open_counting(
        options: EmbeddedOptions,
        counters: Counters,
    ) -> Result<EmbeddedStore, OpenError> {
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
        let journal_path = dir.join(JOURNAL_FILES[0]);
        let journal_io = |source| OpenError::Io {
            what: "open the journal",
            path: journal_path.clone(),
            source,
        };
        // One durable transaction: the tables (created up front, so that reads never meet a
        // missing one), the journal's records applied again (of redb's generation, and of the
        // next one if a checkpoint was under way), and a generation after both, so that those
        // records never count twice.
        let txn = db.begin_write().map_err(|e| db_error(e.into()))?;
        let (mut journal, generation, replayed) = {
            let mut captures = txn.open_table(CAPTURES).map_err(|e| db_error(e.into()))?;
            let mut expiry = txn.open_table(EXPIRY).map_err(|e| db_error(e.into()))?;
            let mut meta = txn.open_table(META).map_err(|e| db_error(e.into()))?;
            let generation = meta
                .get(GENERATION)
                .map_err(|e| db_error(e.into()))?
                .map_or(0, |v| v.value());
            let (journal, records) = Journal::open(&dir, generation).map_err(journal_io)?;
            for record in &records {
                replay(&mut captures, &mut expiry, record, options.takeover_window).map_err(
                    |why| OpenError::Journal {
                        path: journal_path.clone(),
                        why,
                    },
                )?;
            }
            meta.insert(GENERATION, generation + 2)
                .map_err(|e| db_error(e.into()))?;
            (journal, generation + 2, records.len())
        };
        txn.commit().map_err(|e| db_error(e.into()))?;
        journal.restart(generation);
        if replayed > 0 {
            tracing::info!(
                records = replayed,
                "applied the journal's batches since the last checkpoint"
            );
        }

        let db = Arc::new(db);
        let shared = Arc::new(Shared {
            counters,
            ..Shared::default()
        });
        let (to_syncer, synced) = std::sync::mpsc::channel();
        let syncer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("store-syncer".into())
                .spawn(move || sync(synced, &shared))
                .map_err(|source| OpenError::Io {
                    what: "start the syncer thread for",
                    path: path.clone(),
                    source,
                })?
        };
        let (commands, receiver) = mpsc::channel(options.queue.max(1));
        let snapshot = snapshot(&db).map_err(db_error)?;
        let view = Arc::new(RwLock::new(View {
            snapshot: Some(snapshot),
            epoch: 0,
            current: HashMap::new(),
            frozen: HashMap::new(),
        }));
        let writer = Writer {
            db: db.clone(),
            journal,
            generation,
            to_syncer: Some(to_syncer),
            syncer: Some(syncer),
            _lock: lock,
            commands: receiver,
            shared: shared.clone(),
            number: 0,
            last_checkpoint: Instant::now(),
            view: view.clone(),
            changes: HashMap::new(),
            records: Vec::new(),
            purges: Vec::new(),
            running: None,
            checkpoints: 0,
            wake: commands.downgrade(),
            payload: Vec::new(),
            options: options.clone(),
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
            closed: AtomicBool::new(false),
            view,
            writer: Mutex::new(Some(handle)),
            shared,
            data_dir: dir,
        })
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// A write or a sync failed: the store refuses everything until it is opened again
    /// ([`Reopening`] does that in place).
    pub fn has_failed(&self) -> bool {
        self.shared.failed.load(Ordering::SeqCst)
    }

    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        Stats {
            operations: c.operations.get(),
            reads: c.reads.get(),
            batches: c.batches.get(),
            commits: c.commits.get(),
            syncs: c.syncs.get(),
            writer_syncs: c.writer_syncs.get(),
            checkpoints: c.checkpoints.get(),
            staged: c.staged.get(),
            purged: c.purged.get(),
        }
    }

    /// Send one command to the writer and wait for its answer, which comes once what it
    /// depends on is durable.
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

    /// An allocation of a live key changes nothing (a replay, a 409, a 422): answered on the
    /// caller's thread, without a trip through the writer, when what it reads is durable: the
    /// key's entry in the [`View`] once its batch is synced, or else in redb, which holds only
    /// durable commits. `Err`: the writer must answer (a free key, a batch not synced yet, an
    /// error, a store shut down), with what the read found of a key that is not there at all.
    fn allocate_by_reading(&self, request: &Allocate) -> Result<AllocateOutcome, Absent> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(None);
        }
        let view = read_view(&self.view);
        let staged = view.staged(&request.key);
        if staged.is_some_and(|staged| staged.batch > self.shared.durable.load(Ordering::SeqCst)) {
            return Err(None);
        }
        let current = match view.entry(&request.key, staged, None) {
            Ok(Ok(Some(current))) => current,
            Ok(Ok(None)) if staged.is_none() => return Err(Some(view.epoch)),
            _ => return Err(None),
        };
        drop(view);
        if self.shared.failed.load(Ordering::SeqCst) {
            return Err(None);
        }
        let now = now_ms();
        if !current.is_live(now) {
            return Err(None);
        }
        match super::allocate(Some(&current), request, now, String::new) {
            (outcome, Change::None) => {
                let c = &self.shared.counters;
                c.operations.inc();
                c.reads.inc();
                Ok(outcome)
            }
            _ => Err(None),
        }
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    fn name(&self) -> &'static str {
        "embedded"
    }

    async fn allocate(&self, request: Allocate) -> Result<AllocateOutcome, StoreError> {
        let absent = match self.allocate_by_reading(&request) {
            Ok(outcome) => return Ok(outcome),
            Err(absent) => absent,
        };
        let token = super::new_lease_token();
        self.call(|reply| Command::Allocate(request, token, absent, reply))
            .await
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

    fn register_metrics(&self, registry: &prometheus::Registry) {
        self.shared.counters.register(registry);
    }

    async fn shutdown(&self) -> Result<(), StoreError> {
        let Some(handle) = self.writer.lock().expect("writer handle").take() else {
            return Ok(()); // already shut down
        };
        // No more reads: the writer closes the file as it exits (dropping the view's snapshot
        // waits for the reads in progress).
        self.closed.store(true, Ordering::SeqCst);
        // Everything queued before this command is applied and made durable first.
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
            syncs = stats.syncs,
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

/// The writer thread's state: it alone writes to the journal and decides what redb gets.
struct Writer {
    db: Arc<Database>,
    journal: Journal,
    /// What redb's last durable commit stored in `meta` (the journal's records carry it).
    generation: u64,
    to_syncer: Option<std::sync::mpsc::Sender<ToSync>>,
    syncer: Option<JoinHandle<()>>,
    // Dropped after `db` (fields drop in order): the dir stays locked until the file is closed.
    _lock: DirLock,
    commands: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
    /// The number of the last batch that changed something.
    number: u64,
    last_checkpoint: Instant,
    /// redb and what it does not hold yet (shared with the callers' reads).
    view: Arc<RwLock<View>>,
    /// The changes of the batch being applied (moved into the view once it is done).
    changes: HashMap<String, Option<Vec<u8>>>,
    /// The journal records since the last checkpoint began, in order: the next one applies
    /// them to redb.
    records: Vec<Vec<u8>>,
    /// Purges for the next checkpoint, which runs them in its transaction and answers them.
    purges: Vec<(usize, Reply<usize>)>,
    /// The checkpoint running beside the writer, if any.
    running: Option<Running>,
    /// How many checkpoints were begun beside the writer.
    checkpoints: u64,
    /// The writer's own channel, for the checkpoint thread's [`Command::Checkpointed`] (weak:
    /// the channel still closes when the store's handles are gone).
    wake: mpsc::WeakSender<Command>,
    /// The journal record of the batch being applied, reused.
    payload: Vec<u8>,
    options: EmbeddedOptions,
}

/// An answer computed inside the transaction, sent once the batch's fate is known.
type Pending = Box<dyn FnOnce(Option<&StoreError>) + Send>;

/// Answers the syncer sends after a sync that covers batch `number`.
struct ToSync {
    number: u64,
    pending: Vec<Pending>,
    /// When its commit began, for a batch that changed something (its commit latency).
    committed: Option<Instant>,
    /// The journal file its record went to (the syncer syncs the newest batch's file: the
    /// writer syncs a file's last records itself before it moves to the other one).
    file: Arc<File>,
}

/// A checkpoint on the `store-checkpoint` thread.
struct Running {
    /// Its number, one more than the last one's.
    number: u64,
    committing: JoinHandle<Result<(), StoreError>>,
    /// The generation it stores, if it applies records (a purge alone stores none).
    generation: Option<u64>,
    /// The last batch it holds.
    upto: u64,
}

/// What one checkpoint does, in one durable redb transaction: the journal records since the
/// last one applied in order, the purges run, and the journal's next generation stored.
struct Checkpoint {
    db: Arc<Database>,
    records: Vec<Vec<u8>>,
    purges: Vec<(usize, Reply<usize>)>,
    generation: Option<u64>,
    shared: Arc<Shared>,
    takeover_window: Duration,
}

impl Checkpoint {
    /// Commit it (durably: a sync), then answer its purges. A failure stops the store.
    fn run(self) -> Result<(), StoreError> {
        let started = Instant::now();
        let mut rows = Vec::with_capacity(self.purges.len());
        let mut purged = 0;
        let committed = (|| -> Result<bool, StoreError> {
            let txn = self.db.begin_write().map_err(unavailable)?;
            let mut wrote = !self.records.is_empty();
            {
                let mut captures = txn.open_table(CAPTURES).map_err(unavailable)?;
                let mut expiry = txn.open_table(EXPIRY).map_err(unavailable)?;
                for record in &self.records {
                    replay(&mut captures, &mut expiry, record, self.takeover_window)
                        .map_err(StoreError::Unavailable)?;
                }
                // The purges see every change made before them (each came after the batches
                // whose records are here), and the next checkpoint applies the later ones on
                // top: an entry they delete is one that any later change replaces anyway.
                let now = now_ms();
                for (limit, _) in &self.purges {
                    let (consumed, deleted) = purge(
                        &mut captures,
                        &mut expiry,
                        self.takeover_window,
                        now,
                        *limit,
                    )
                    .map_err(unavailable)?;
                    wrote |= consumed > 0;
                    purged += deleted;
                    rows.push(consumed);
                }
                if let Some(generation) = self.generation {
                    let mut meta = txn.open_table(META).map_err(unavailable)?;
                    meta.insert(GENERATION, generation).map_err(unavailable)?;
                }
            }
            if wrote {
                txn.commit().map_err(unavailable)?;
            } else {
                txn.abort().map_err(unavailable)?;
            }
            Ok(wrote)
        })();
        let c = &self.shared.counters;
        let outcome = match committed {
            Ok(wrote) => {
                if wrote {
                    c.syncs.inc();
                    c.checkpoint_commit.observe(started.elapsed().as_secs_f64());
                }
                c.purged.inc_by(purged as u64);
                Ok(())
            }
            Err(e) => {
                // As for a failed write on the writer: nothing more is acknowledged.
                tracing::error!(error = %e, "a checkpoint failed");
                self.shared.failed.store(true, Ordering::SeqCst);
                Err(e)
            }
        };
        for (i, (_, reply)) in self.purges.into_iter().enumerate() {
            let answer = match &outcome {
                Ok(()) => Ok(rows[i]),
                Err(e) => Err(unavailable(e)),
            };
            let _ = reply.send(answer);
        }
        outcome
    }
}

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

/// The syncer thread: one `fdatasync` of the journal for everything handed over since the
/// last one, then the answers. Ends when the writer drops its sender.
fn sync(batches: std::sync::mpsc::Receiver<ToSync>, shared: &Shared) {
    while let Ok(first) = batches.recv() {
        let mut ready = vec![first];
        ready.extend(batches.try_iter());
        let upto = ready.iter().map(|b| b.number).max().unwrap_or(0);
        let file = ready
            .last()
            .map(|b| b.file.clone())
            .expect("one batch at least");
        let outcome = if let Err(e) = shared.failed() {
            Err(e)
        } else if shared.durable.load(Ordering::SeqCst) >= upto {
            Ok(()) // a checkpoint or the writer made them durable meanwhile
        } else {
            sync_journal(&file, upto, shared)
        };
        let error = outcome.err();
        for batch in ready {
            if let (None, Some(committed)) = (&error, batch.committed) {
                shared
                    .counters
                    .journal_commit
                    .observe(committed.elapsed().as_secs_f64());
            }
            for done in batch.pending {
                done(error.as_ref());
            }
        }
    }
}

/// One `fdatasync` of the journal, after which every batch up to `upto` is durable; its time
/// goes into [`Shared::sync_time`]. A failure stops the store.
fn sync_journal(file: &File, upto: u64, shared: &Shared) -> Result<(), StoreError> {
    let started = Instant::now();
    match file.sync_data() {
        Ok(()) => {
            shared.observe_sync(started.elapsed());
            shared.counters.syncs.inc();
            shared.durable.fetch_max(upto, Ordering::SeqCst);
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, "syncing the journal failed");
            shared.failed.store(true, Ordering::SeqCst);
            Err(unavailable(e))
        }
    }
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
            while operations < self.options.max_batch && bytes < self.options.max_batch_bytes {
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
        // Refuse what is still queued; let the syncer answer what it holds; the database (and
        // the lock) close when `self` drops, before the shutdown is answered.
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            command.fail(StoreError::Closed);
        }
        for (_, reply) in self.purges.drain(..) {
            let _ = reply.send(Err(StoreError::Closed));
        }
        drop(self.to_syncer.take());
        if let Some(syncer) = self.syncer.take() {
            let _ = syncer.join();
        }
        // A checkpoint still running (the store was dropped without a shutdown) holds the
        // database: the dir stays locked until it is over.
        if let Some(running) = self.running.take() {
            let _ = running.committing.join();
        }
        write_view(&self.view).snapshot = None;
        drop(self);
        if let Some((reply, flushed)) = shutdown {
            let _ = reply.send(flushed);
        }
    }

    /// Apply one batch over the view and redb's snapshot, journal what it changed, and answer
    /// it (or hand its answers to the syncer); then begin a checkpoint if one is due. If the
    /// batch carried a shutdown, returns its reply and whether everything before it was made
    /// durable in redb (commands after it are refused).
    fn apply(&mut self, batch: Vec<Command>) -> Option<(Reply<()>, Result<(), StoreError>)> {
        // The checkpoint thread's wake-up alone is not a batch: nobody sent it.
        if batch
            .iter()
            .any(|command| !matches!(command, Command::Checkpointed(_)))
        {
            self.shared.counters.batches.inc();
        }
        let operations: usize = batch
            .iter()
            .map(|command| match command {
                Command::Allocate(..) | Command::Record(..) | Command::Release(..) => 1,
                Command::Batch(ops, _) => ops.len(),
                Command::Purge(..)
                | Command::Ping(_)
                | Command::Shutdown(_)
                | Command::Checkpointed(_) => 0,
            })
            .sum();
        if operations > 0 {
            self.shared
                .counters
                .batch_operations
                .observe(operations as f64);
        }
        if let Err(e) = self.shared.failed() {
            for (_, reply) in self.purges.drain(..) {
                let _ = reply.send(Err(unavailable(&e)));
            }
            return fail_all(batch, &e);
        }
        // A checkpoint that is over lands first (a shutdown waits for it; its `Checkpointed`
        // comes as its thread ends).
        let over = self.running.as_ref().is_some_and(|r| {
            r.committing.is_finished()
                || batch.iter().any(|c| match c {
                    Command::Shutdown(_) => true,
                    Command::Checkpointed(number) => *number == r.number,
                    _ => false,
                })
        });
        // Backpressure: past the bound, the batches wait for redb to catch up.
        let full = self.running.is_some() && self.journal.len() >= self.options.max_staged_bytes;
        if (over || full)
            && let Err(e) = self.land()
        {
            return fail_all(batch, &e);
        }

        let mut pending: Vec<Pending> = Vec::with_capacity(batch.len());
        let mut rest = batch.into_iter();
        self.payload.clear();
        self.changes.clear();
        let applied = execute_all(
            &mut Tables {
                view: &self.view,
                changes: &mut self.changes,
                counters: &self.shared.counters,
                journal: &mut self.payload,
                takeover_window: self.options.takeover_window,
            },
            &mut rest,
            &mut pending,
        );
        let done = match applied {
            Ok(done) => done,
            Err(e) => {
                // A read of redb failed: nothing was written; the batch fails.
                tracing::error!(error = %e, "a batch could not be applied");
                return answer_all(Err(unavailable(e)), rest, None);
            }
        };
        self.purges.extend(done.purges);
        let shutdown = done.shutdown;
        if done.changed {
            // Into the view before anything is answered, tagged with the batch's number so
            // that the callers' reads wait for its sync.
            let number = self.number + 1;
            let mut view = write_view(&self.view);
            for (key, entry) in self.changes.drain() {
                view.current.insert(
                    key,
                    Staged {
                        batch: number,
                        entry,
                    },
                );
            }
            drop(view);
            self.records.push(self.payload.clone());
            if self.running.is_some() {
                self.shared.counters.staged.inc();
            }
        }
        // The writer makes the checkpoint itself, right after, at a shutdown (redb is then
        // self-contained) and without background checkpoints; it makes the batch durable, so
        // the batch's journal record needs no sync.
        let inline =
            shutdown.is_some() || (!self.options.background_checkpoints && self.checkpoint_due());
        let outcome = if done.changed {
            self.journal_batch(pending, !inline)
        } else {
            // Nothing to make durable: no sync; the answers wait only for an earlier batch's.
            self.after_durable(pending)
        };
        let outcome = if inline {
            outcome.and_then(|pending| self.begin_checkpoint(false).map(|()| pending))
        } else {
            if outcome.is_ok()
                && self.running.is_none()
                && self.checkpoint_due()
                && let Err(e) = self.begin_checkpoint(true)
            {
                // The batch is durable all the same; the store refuses what comes next.
                tracing::error!(error = %e, "cannot begin a checkpoint");
            }
            outcome
        };
        answer_all(outcome, rest, shutdown)
    }

    /// A checkpoint is due: purges wait for it, or the journal has records and the last
    /// checkpoint began long enough ago (or the journal is long).
    fn checkpoint_due(&self) -> bool {
        !self.purges.is_empty()
            || (!self.records.is_empty()
                && (self.journal.len() >= self.options.checkpoint_bytes
                    || self.last_checkpoint.elapsed() >= self.options.checkpoint_interval))
    }

    /// The answers of a batch that changed nothing: sent now, or by the syncer once the
    /// batches before it are durable.
    fn after_durable(&self, pending: Vec<Pending>) -> Result<Vec<Pending>, StoreError> {
        if self.shared.durable.load(Ordering::SeqCst) < self.number {
            self.to_syncer(self.number, pending, None)
        } else {
            Ok(pending)
        }
    }

    /// Journal the batch, and (with `sync`) make it durable here or hand its answers to the
    /// syncer. Returns what is still to be answered here (nothing, unless it failed: then the
    /// error).
    fn journal_batch(
        &mut self,
        pending: Vec<Pending>,
        sync: bool,
    ) -> Result<Vec<Pending>, StoreError> {
        let number = self.number + 1;
        let committed = Instant::now();
        if let Err(e) = self.journal.append(&self.payload) {
            // The view holds a change the journal does not: acknowledge nothing from now on.
            tracing::error!(error = %e, "a batch could not be journaled");
            self.shared.failed.store(true, Ordering::SeqCst);
            return Err(unavailable(e));
        }
        self.number = number;
        self.shared.counters.commits.inc();
        if !sync {
            return Ok(pending);
        }
        if self.shared.sync_time() < self.options.inline_sync_below {
            // A short sync: made here, which saves the two hand-offs of the syncer's path; it
            // also covers every batch handed to the syncer before (their answers wait for
            // the syncer, which finds them durable).
            sync_journal(self.journal.file(), number, &self.shared)?;
            self.shared.counters.writer_syncs.inc();
            self.shared
                .counters
                .journal_commit
                .observe(committed.elapsed().as_secs_f64());
            return Ok(pending);
        }
        self.to_syncer(number, pending, Some(committed))
    }

    fn to_syncer(
        &self,
        number: u64,
        pending: Vec<Pending>,
        committed: Option<Instant>,
    ) -> Result<Vec<Pending>, StoreError> {
        let syncer = self.to_syncer.as_ref().ok_or(StoreError::Closed)?;
        syncer
            .send(ToSync {
                number,
                pending,
                committed,
                file: self.journal.file().clone(),
            })
            .map_err(|_| StoreError::Unavailable("the syncer thread is gone".into()))?;
        Ok(Vec::new())
    }

    /// Begin a checkpoint of what the journal holds since the last one (and of the purges
    /// waiting): on a thread of its own while the writer goes on (`background`), or here, and
    /// landed before this returns. Records start a new journal generation, in the other file.
    fn begin_checkpoint(&mut self, background: bool) -> Result<(), StoreError> {
        // One at a time: a shutdown landed the running one before its batch.
        debug_assert!(self.running.is_none(), "one checkpoint at a time");
        if self.records.is_empty() && self.purges.is_empty() {
            return Ok(());
        }
        let generation = if self.records.is_empty() {
            None
        } else {
            // Every record of this generation on disk before the first of the next one: the
            // syncer syncs the newest batch's file only. (A checkpoint made here lands before
            // the next record: it makes them durable itself.)
            if background && self.shared.durable.load(Ordering::SeqCst) < self.number {
                sync_journal(self.journal.file(), self.number, &self.shared)?;
                self.shared.counters.writer_syncs.inc();
            }
            Some(self.generation + 1)
        };
        {
            let mut view = write_view(&self.view);
            view.frozen = std::mem::take(&mut view.current);
        }
        if let Some(generation) = generation {
            self.journal.restart(generation);
        }
        self.last_checkpoint = Instant::now();
        let upto = self.number;
        let checkpoint = Checkpoint {
            db: self.db.clone(),
            records: std::mem::take(&mut self.records),
            purges: std::mem::take(&mut self.purges),
            generation,
            shared: self.shared.clone(),
            takeover_window: self.options.takeover_window,
        };
        if !background {
            let committed = checkpoint.run();
            return self.landed(committed, generation, upto);
        }
        let wake = self.wake.clone();
        self.checkpoints += 1;
        let number = self.checkpoints;
        let spawned = std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || {
                let committed = checkpoint.run();
                // Never blocks: with the queue full the writer has work, and at its next batch
                // it finds this thread finished. (Gone: the store is.)
                if let Some(commands) = wake.upgrade() {
                    let _ = commands.try_send(Command::Checkpointed(number));
                }
                committed
            });
        match spawned {
            Ok(committing) => {
                self.running = Some(Running {
                    number,
                    committing,
                    generation,
                    upto,
                });
                Ok(())
            }
            Err(e) => {
                // What it carried is in the journal and the view only: stop, and let a reopen
                // apply the journal.
                self.shared.failed.store(true, Ordering::SeqCst);
                Err(unavailable(e))
            }
        }
    }

    /// Wait for the checkpoint beside the writer and account for it.
    fn land(&mut self) -> Result<(), StoreError> {
        let Some(running) = self.running.take() else {
            return Ok(());
        };
        let committed = running.committing.join().unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "the checkpoint thread panicked".into(),
            ))
        });
        self.landed(committed, running.generation, running.upto)
    }

    /// A checkpoint is over: everything up to batch `upto` is durable in redb (at
    /// `generation`, if it applied records), and the writer reads it from there.
    fn landed(
        &mut self,
        committed: Result<(), StoreError>,
        generation: Option<u64>,
        upto: u64,
    ) -> Result<(), StoreError> {
        if let Err(e) = committed {
            self.shared.failed.store(true, Ordering::SeqCst);
            return Err(e);
        }
        if let Some(generation) = generation {
            self.generation = generation;
            self.shared.durable.fetch_max(upto, Ordering::SeqCst);
            self.shared.counters.checkpoints.inc();
        }
        let snapshot = snapshot(&self.db).map_err(|e| {
            self.shared.failed.store(true, Ordering::SeqCst);
            unavailable(e)
        })?;
        // One change for the readers: what the checkpoint applied, now read from redb.
        let old = {
            let mut view = write_view(&self.view);
            let old = view.snapshot.replace(snapshot);
            view.epoch += 1;
            (old, std::mem::take(&mut view.frozen))
        };
        drop(old); // (outside the lock)
        Ok(())
    }
}

/// Where a batch's operations read and write, the counters they add to, and the journal
/// record their changes are written to.
struct Tables<'t> {
    /// redb and what it does not hold yet.
    view: &'t RwLock<View>,
    /// This batch's changes, over the view: each key's entry (encoded), or `None` if deleted.
    changes: &'t mut HashMap<String, Option<Vec<u8>>>,
    counters: &'t Counters,
    journal: &'t mut Vec<u8>,
    takeover_window: Duration,
}

impl Tables<'_> {
    /// The raw entry of a key, expired or not (see [`read`]): this batch's change, the view's,
    /// or redb's (see [`View::entry`] for `absent`).
    fn get(
        &self,
        key: &str,
        absent: Absent,
    ) -> Result<Result<Option<Entry>, StoreError>, redb::Error> {
        match self.changes.get(key) {
            Some(entry) => Ok(decode_staged(key, entry.as_deref())),
            None => {
                let view = read_view(self.view);
                view.entry(key, view.staged(key), absent)
            }
        }
    }
}

/// What [`execute`] did with a command.
enum Executed {
    /// Applied (its answer queued); whether it wrote anything.
    Done { wrote: bool },
    /// A purge: for the next checkpoint.
    Purge(usize, Reply<usize>),
    /// A shutdown: the batch ends here.
    Shutdown(Reply<()>),
}

/// What the commands of a batch did.
#[derive(Default)]
struct Batch {
    /// Something was written.
    changed: bool,
    /// Purges, for the next checkpoint.
    purges: Vec<(usize, Reply<usize>)>,
    /// The batch ended at a shutdown (the commands after it are left in the iterator).
    shutdown: Option<Reply<()>>,
}

/// Apply a batch's commands in order, up to a shutdown (their answers are queued in `pending`).
fn execute_all(
    tables: &mut Tables<'_>,
    commands: &mut impl Iterator<Item = Command>,
    pending: &mut Vec<Pending>,
) -> Result<Batch, redb::Error> {
    let now = now_ms();
    let mut batch = Batch::default();
    for command in commands {
        match execute(tables, command, pending, now)? {
            Executed::Done { wrote } => batch.changed |= wrote,
            Executed::Purge(limit, reply) => batch.purges.push((limit, reply)),
            Executed::Shutdown(reply) => {
                batch.shutdown = Some(reply);
                break;
            }
        }
    }
    Ok(batch)
}

/// Apply one command of a batch (its answer is queued in `pending`).
fn execute(
    tables: &mut Tables<'_>,
    command: Command,
    pending: &mut Vec<Pending>,
    now: UnixMillis,
) -> Result<Executed, redb::Error> {
    let wrote = match command {
        Command::Allocate(request, token, absent, reply) => {
            operate(tables, &request.key, absent, reply, pending, |current| {
                super::allocate(current, &request, now, || token)
            })?
        }
        Command::Record(request, reply) => {
            operate(tables, &request.key, None, reply, pending, |current| {
                super::record(current, &request, now)
            })?
        }
        Command::Release(request, reply) => {
            operate(tables, &request.key, None, reply, pending, |current| {
                super::release(current, &request, now)
            })?
        }
        Command::Batch(operations, reply) => {
            let mut results = Vec::with_capacity(operations.len());
            let mut wrote = false;
            for op in operations {
                let (result, changed) = match op {
                    BatchOp::Record(request) => step(tables, &request.key, None, |current| {
                        super::record(current, &request, now)
                    })
                    .map(|(r, w)| (r.map(BatchOutcome::Record), w))?,
                    BatchOp::Release(request) => step(tables, &request.key, None, |current| {
                        super::release(current, &request, now)
                    })
                    .map(|(r, w)| (r.map(BatchOutcome::Release), w))?,
                };
                wrote |= changed;
                results.push(result);
            }
            pending.push(answer(reply, Ok(results)));
            wrote
        }
        // The purge runs in the next checkpoint's transaction, where the expiry index is.
        Command::Purge(limit, reply) => return Ok(Executed::Purge(limit, reply)),
        Command::Ping(reply) => {
            // A read through the write path: the writer is alive and the table answers.
            if let Some(snapshot) = &read_view(tables.view).snapshot {
                drop(snapshot.first()?);
            }
            pending.push(answer(reply, Ok(())));
            false
        }
        Command::Shutdown(reply) => return Ok(Executed::Shutdown(reply)),
        Command::Checkpointed(_) => false, // landed before the batch was applied
    };
    Ok(Executed::Done { wrote })
}

/// One allocation, record or release, the same for the three: read the key's entry, run the
/// state machine on it, write the change (keeping the expiry index in step), count the
/// operation, and queue the answer for when the batch's fate is known. Returns whether
/// anything was written. An entry that cannot be decoded fails this operation only; a database
/// error aborts the batch.
fn operate<T: Send + 'static>(
    tables: &mut Tables<'_>,
    key: &str,
    absent: Absent,
    reply: Reply<T>,
    pending: &mut Vec<Pending>,
    state_machine: impl FnOnce(Option<&Entry>) -> (T, Change),
) -> Result<bool, redb::Error> {
    let (result, changed) = step(tables, key, absent, state_machine)?;
    pending.push(answer(reply, result));
    Ok(changed)
}

/// The part of [`operate`] a batch item shares: read, decide, write, count; the outcome (or the
/// error of an undecodable entry) and whether anything was written.
fn step<T>(
    tables: &mut Tables<'_>,
    key: &str,
    absent: Absent,
    state_machine: impl FnOnce(Option<&Entry>) -> (T, Change),
) -> Result<(Result<T, StoreError>, bool), redb::Error> {
    let mut changed = false;
    let result = match tables.get(key, absent)? {
        Ok(current) => {
            let (outcome, change) = state_machine(current.as_ref());
            changed = write(tables, key, change);
            Ok(outcome)
        }
        Err(e) => Err(e),
    };
    tables.counters.operations.inc();
    Ok((result, changed))
}

/// Send what `outcome` leaves to answer (its error to all of them if it failed), refuse the
/// commands left over (after a shutdown in the batch, or a failure), and return the
/// shutdown's reply with its outcome.
fn answer_all(
    outcome: Result<Vec<Pending>, StoreError>,
    rest: impl Iterator<Item = Command>,
    shutdown: Option<Reply<()>>,
) -> Option<(Reply<()>, Result<(), StoreError>)> {
    let (error, pending) = match outcome {
        Ok(pending) => (None, pending),
        Err(e) => (Some(e), Vec::new()),
    };
    for done in pending {
        done(error.as_ref());
    }
    for command in rest {
        command.fail(error.as_ref().map_or(StoreError::Closed, unavailable));
    }
    shutdown.map(|reply| (reply, error.map_or(Ok(()), Err)))
}

/// Refuse every command of `batch` with `error`, and return a shutdown's reply among them.
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
    captures: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Result<Option<Entry>, StoreError>, redb::Error> {
    let Some(value) = captures.get(key)? else {
        return Ok(Ok(None));
    };
    Ok(decoded(key, codec::decode(value.value())).map(Some))
}

/// A stored entry decoded, or the error of one that cannot be (logged: the data is damaged).
fn decoded(key: &str, entry: Result<Entry, StoreError>) -> Result<Entry, StoreError> {
    entry.map_err(|error| {
        tracing::error!(
            key = %idempotency_spec::key_digest(key),
            %error,
            "an entry cannot be decoded"
        );
        error
    })
}

/// Stage a change in the batch's changes and add it to the journal record (the expiry index
/// follows when a checkpoint applies the record). Returns whether anything was written.
fn write(tables: &mut Tables<'_>, key: &str, change: Change) -> bool {
    match change {
        Change::None => return false,
        Change::Put(entry) => {
            let bytes = codec::encode(&entry);
            journal_put(
                tables.journal,
                key,
                entry.purge_at(tables.takeover_window),
                &bytes,
            );
            tables.changes.insert(key.to_owned(), Some(bytes));
        }
        Change::Delete => {
            journal_delete(tables.journal, key);
            tables.changes.insert(key.to_owned(), None);
        }
    }
    true
}

fn put(
    captures: &mut Table<&str, &[u8]>,
    expiry: &mut Table<(u64, &str), ()>,
    key: &str,
    old_expiry: Option<UnixMillis>,
    expires_at: UnixMillis,
    bytes: &[u8],
) -> Result<(), redb::Error> {
    if let Some(old) = old_expiry {
        expiry.remove((old, key))?;
    }
    captures.insert(key, bytes)?;
    expiry.insert((expires_at, key), ())?;
    Ok(())
}

fn delete(
    captures: &mut Table<&str, &[u8]>,
    expiry: &mut Table<(u64, &str), ()>,
    key: &str,
    old_expiry: Option<UnixMillis>,
) -> Result<(), redb::Error> {
    if let Some(old) = old_expiry {
        expiry.remove((old, key))?;
    }
    captures.remove(key)?;
    Ok(())
}

// A journal record is the batch's changes in order, each `P | key_len u16 | key | purge_at
// u64 | len u32 | entry` or `D | key_len u16 | key` (little endian): applying them again on
// top of any state the batch started from, or already ended in, gives the state it ended in.
// (`purge_at` is the entry's row in the expiry index; records written before leases were kept
// for the takeover window hold a lease's expiry there, which the purge moves, see `purge`.)
const PUT: u8 = b'P';
const DELETE: u8 = b'D';

fn journal_put(journal: &mut Vec<u8>, key: &str, purge_at: UnixMillis, entry: &[u8]) {
    journal_delete_or_put(journal, PUT, key);
    journal.extend_from_slice(&purge_at.to_le_bytes());
    journal.extend_from_slice(&(entry.len() as u32).to_le_bytes());
    journal.extend_from_slice(entry);
}

fn journal_delete(journal: &mut Vec<u8>, key: &str) {
    journal_delete_or_put(journal, DELETE, key);
}

fn journal_delete_or_put(journal: &mut Vec<u8>, op: u8, key: &str) {
    // Keys are at most 255 bytes (the API refuses longer ones; the purge deletes stored keys).
    journal.push(op);
    journal.extend_from_slice(&(key.len() as u16).to_le_bytes());
    journal.extend_from_slice(key.as_bytes());
}

/// Apply one journal record (see [`journal_put`]) to the tables.
fn replay(
    captures: &mut Table<&str, &[u8]>,
    expiry: &mut Table<(u64, &str), ()>,
    mut record: &[u8],
    takeover_window: Duration,
) -> Result<(), String> {
    fn take<'a>(record: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if record.len() < n {
            return Err("a record ends early".into());
        }
        let (head, tail) = record.split_at(n);
        *record = tail;
        Ok(head)
    }
    let db = |e: redb::Error| e.to_string();
    while let Some((&op, rest)) = record.split_first() {
        record = rest;
        let key_len = u16::from_le_bytes(take(&mut record, 2)?.try_into().expect("2 bytes"));
        let key = std::str::from_utf8(take(&mut record, key_len.into())?)
            .map_err(|_| "a key is not UTF-8".to_owned())?;
        // The entry it replaces, for its row of the expiry index.
        let old_expiry = match read(captures, key).map_err(db)? {
            Ok(current) => current.as_ref().map(|e| e.purge_at(takeover_window)),
            Err(e) => return Err(e.to_string()),
        };
        match op {
            PUT => {
                let purge_at =
                    u64::from_le_bytes(take(&mut record, 8)?.try_into().expect("8 bytes"));
                let len = u32::from_le_bytes(take(&mut record, 4)?.try_into().expect("4 bytes"));
                let bytes = take(&mut record, len as usize)?;
                put(captures, expiry, key, old_expiry, purge_at, bytes).map_err(db)?;
            }
            DELETE => delete(captures, expiry, key, old_expiry).map_err(db)?,
            other => return Err(format!("unknown change {other:#x}")),
        }
    }
    Ok(())
}

/// Delete up to `limit` entries whose time has come ([`Entry::purge_at`]), oldest first.
/// Returns how many index rows were consumed (`limit` means there may be more) and how many
/// entries were deleted.
fn purge(
    captures: &mut Table<&str, &[u8]>,
    expiry: &mut Table<(u64, &str), ()>,
    window: Duration,
    now: UnixMillis,
    limit: usize,
) -> Result<(usize, usize), redb::Error> {
    // Every row due at or before `now` (an entry is free from its expiry on).
    let due: Vec<(u64, String)> = expiry
        .range::<(u64, &str)>(..(now.saturating_add(1), ""))?
        .take(limit)
        .map(|row| row.map(|(k, _)| (k.value().0, k.value().1.to_owned())))
        .collect::<Result<_, _>>()?;
    let mut purged = 0;
    for (at, key) in &due {
        expiry.remove((*at, key.as_str()))?;
        let entry = match captures.get(key.as_str())? {
            Some(value) => codec::decode(value.value()).ok(),
            None => None,
        };
        // The row is the entry's own if it sits at its purge time, or at its expiry: a row
        // written before leases were kept for the takeover window (an older data dir or
        // journal). Any other row is stale (the index changes only with its entry, so this
        // is a safeguard) and only goes.
        let Some(entry) = entry.filter(|e| *at == e.purge_at(window) || *at == e.expires_at())
        else {
            continue;
        };
        let purge_at = entry.purge_at(window);
        if purge_at <= now && !entry.is_live(now) {
            captures.remove(key.as_str())?;
            purged += 1;
        } else {
            // An old row of a lease still in its takeover window: moved to its purge time.
            expiry.insert((purge_at, key.as_str()), ())?;
        }
    }
    Ok((due.len(), purged))
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(60);

    fn lease(expires_at: UnixMillis) -> Entry {
        Entry::Allocated {
            lease_token: "t".into(),
            lease_expires_at: expires_at,
            fingerprint: None,
        }
    }

    /// What `purge` reported (rows consumed, entries deleted), and the index rows and keys
    /// left after it.
    type Purged = ((usize, usize), Vec<(u64, String)>, Vec<String>);

    /// Runs `purge` on a database holding `entries` (key, entry, its row in the expiry
    /// index).
    fn purged(entries: &[(&str, Entry, u64)], now: UnixMillis) -> Purged {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .unwrap();
        let txn = db.begin_write().unwrap();
        let result = {
            let mut captures = txn.open_table(CAPTURES).unwrap();
            let mut expiry = txn.open_table(EXPIRY).unwrap();
            for (key, entry, row) in entries {
                let bytes = codec::encode(entry);
                captures.insert(*key, bytes.as_slice()).unwrap();
                expiry.insert((*row, *key), ()).unwrap();
            }
            let result = purge(&mut captures, &mut expiry, WINDOW, now, 100).unwrap();
            let rows = expiry
                .iter()
                .unwrap()
                .map(|r| {
                    let (k, _) = r.unwrap();
                    (k.value().0, k.value().1.to_owned())
                })
                .collect();
            let keys = captures
                .iter()
                .unwrap()
                .map(|r| r.unwrap().0.value().to_owned())
                .collect();
            (result, rows, keys)
        };
        txn.abort().unwrap();
        result
    }

    #[test]
    fn an_expired_lease_is_purged_a_window_after_its_expiry() {
        let entry = lease(1_000);
        let at = entry.purge_at(WINDOW);
        assert_eq!(at, 61_000);
        // Within the window its row is not due.
        let (_, rows, keys) = purged(&[("k", entry.clone(), at)], 30_000);
        assert_eq!(rows, [(at, "k".to_owned())]);
        assert_eq!(keys, ["k"]);
        let ((rows, deleted), left, keys) = purged(&[("k", entry, at)], at);
        assert_eq!((rows, deleted), (1, 1));
        assert!(left.is_empty() && keys.is_empty());
    }

    #[test]
    fn a_row_at_a_leases_expiry_is_moved_to_its_purge_time() {
        // As a data dir or journal of an earlier version indexed a lease: at its expiry.
        let entry = lease(1_000);
        let ((rows, deleted), left, keys) = purged(&[("old", entry.clone(), 1_000)], 2_000);
        assert_eq!((rows, deleted), (1, 0));
        assert_eq!(left, [(61_000, "old".to_owned())]);
        assert_eq!(keys, ["old"]);
        // Past the window, such a row deletes the entry at once.
        let ((_, deleted), left, keys) = purged(&[("old", entry, 1_000)], 61_000);
        assert_eq!(deleted, 1);
        assert!(left.is_empty() && keys.is_empty());
    }

    #[test]
    fn a_stale_row_goes_and_its_entry_stays() {
        let ((rows, deleted), left, keys) = purged(&[("k", lease(500_000), 1_000)], 2_000);
        assert_eq!((rows, deleted), (1, 0));
        assert!(left.is_empty());
        assert_eq!(keys, ["k"]);
    }

    /// A caller that found a key absent says so, and the writer then skips its own lookup in
    /// redb, but only while redb's snapshot is still the one the caller read. Here a
    /// checkpoint lands between the read and the command: the key is in redb then, in no
    /// staged map, and the command must still find its lease.
    #[tokio::test]
    async fn a_read_that_found_a_key_absent_is_not_trusted_past_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut options = EmbeddedOptions::new(dir.path());
        // Each batch is checkpointed by the writer itself, and landed before it is answered.
        options.background_checkpoints = false;
        options.checkpoint_interval = Duration::ZERO;
        let store = EmbeddedStore::open(options).unwrap();
        let request = |key: &str| Allocate {
            key: key.into(),
            fingerprint: None,
            lease: Duration::from_secs(60),
        };
        let allocate = |key: &'static str, absent: Absent| {
            store.call(move |reply| {
                Command::Allocate(request(key), crate::store::new_lease_token(), absent, reply)
            })
        };

        let stale = store.allocate_by_reading(&request("k")).unwrap_err();
        assert_eq!(stale, Some(0), "absent from the first snapshot");
        let first = store.allocate(request("k")).await.unwrap();
        assert!(
            matches!(first, AllocateOutcome::Allocated { .. }),
            "{first:?}"
        );
        {
            let view = read_view(&store.view);
            assert_eq!(view.epoch, 1, "a checkpoint landed");
            assert!(view.staged("k").is_none(), "the lease is in redb only");
        }
        let again = allocate("k", stale).await.unwrap();
        assert!(
            matches!(again, AllocateOutcome::InFlight { .. }),
            "{again:?}"
        );

        // Read in the snapshot that is still the view's, the caller's word stands.
        let fresh = store.allocate_by_reading(&request("fresh")).unwrap_err();
        assert_eq!(fresh, Some(1));
        let allocated = allocate("fresh", fresh).await.unwrap();
        assert!(
            matches!(allocated, AllocateOutcome::Allocated { .. }),
            "{allocated:?}"
        );
        assert!(matches!(
            store.allocate(request("fresh")).await.unwrap(),
            AllocateOutcome::InFlight { .. }
        ));
        store.shutdown().await.unwrap();
    }
}
