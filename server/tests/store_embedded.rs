//! The embedded store: the conformance suite, plus what only it has (reopening a data dir, the
//! dir lock, group commit's bookkeeping, the purge reclaiming space).

mod common;
#[macro_use]
mod conformance;

use std::sync::Arc;
use std::time::Duration;

use idempotency_server::store::embedded::{DB_FILE, JOURNAL_FILES, OpenError};
use idempotency_server::store::{
    Allocate, AllocateOutcome, Record, RecordOutcome, Release, ReleaseOutcome, Store, StoreError,
    now_ms,
};
use idempotency_server::{EmbeddedOptions, EmbeddedStore};

async fn open_in(dir: &std::path::Path) -> Result<EmbeddedStore, OpenError> {
    open_with(EmbeddedOptions::new(dir)).await
}

/// Opens the store (a blocking call) off the runtime's threads.
async fn open_with(options: EmbeddedOptions) -> Result<EmbeddedStore, OpenError> {
    tokio::task::spawn_blocking(move || EmbeddedStore::open(options))
        .await
        .unwrap()
}

async fn embedded() -> conformance::Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(dir.path()).await.unwrap();
    conformance::Harness::new(Arc::new(store), dir)
}

conformance_suite!(embedded);

const HOUR: Duration = Duration::from_secs(3600);

fn alloc(key: &str, lease: Duration) -> Allocate {
    Allocate {
        key: key.into(),
        fingerprint: None,
        lease,
    }
}

fn rec(key: &str, token: &str, retention: Duration) -> Record {
    Record {
        key: key.into(),
        lease_token: Some(token.into()),
        capture: conformance::capture(key),
        retention,
    }
}

async fn lease(store: &EmbeddedStore, key: &str, lease: Duration) -> String {
    match store.allocate(alloc(key, lease)).await.unwrap() {
        AllocateOutcome::Allocated { lease_token, .. } => lease_token,
        other => panic!("expected a lease, got {other:?}"),
    }
}

/// Leaves "done" recorded, "held" in flight and "gone" released.
async fn three_fates(store: &EmbeddedStore) {
    let token = lease(store, "done", HOUR).await;
    store.record(rec("done", &token, HOUR)).await.unwrap();
    lease(store, "held", HOUR).await;
    let token = lease(store, "gone", HOUR).await;
    let release = Release {
        key: "gone".into(),
        lease_token: Some(token),
    };
    assert_eq!(
        store.release(release).await.unwrap(),
        ReleaseOutcome::Released
    );
}

/// What [`three_fates`] left: a replay, a 409 and a new lease.
async fn assert_three_fates(store: &EmbeddedStore) {
    assert_eq!(
        store.allocate(alloc("done", HOUR)).await.unwrap(),
        AllocateOutcome::Completed(conformance::capture("done"))
    );
    assert!(matches!(
        store.allocate(alloc("held", HOUR)).await.unwrap(),
        AllocateOutcome::InFlight { .. }
    ));
    assert!(matches!(
        store.allocate(alloc("gone", HOUR)).await.unwrap(),
        AllocateOutcome::Allocated { .. }
    ));
}

/// A shutdown's last checkpoint puts into redb what only the journal held: the data dir
/// opens with the journal gone and every answer is the same.
#[tokio::test]
async fn everything_acknowledged_survives_a_reopen_in_redb_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = EmbeddedOptions::new(dir.path());
    // No checkpoint before the shutdown's.
    options.checkpoint_interval = HOUR;
    let store = open_with(options.clone()).await.unwrap();
    three_fates(&store).await;
    assert_eq!(store.stats().checkpoints, 0);
    store.shutdown().await.unwrap();
    for file in JOURNAL_FILES {
        std::fs::remove_file(dir.path().join(file)).unwrap();
    }

    let store = open_with(options).await.unwrap();
    assert_three_fates(&store).await;
    store.shutdown().await.unwrap();
}

/// A capture that redb does not hold yet (no checkpoint since it was recorded) is replayed
/// from the writer's view on the caller's thread, once its batch is durable: no batch of the
/// writer for it. So is one in redb (put there by the shutdown's checkpoint, read after a
/// reopen).
#[tokio::test]
async fn a_replay_is_read_without_the_writer_before_and_after_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = EmbeddedOptions::new(dir.path());
    options.checkpoint_interval = HOUR;
    let store = open_with(options.clone()).await.unwrap();
    let token = lease(&store, "done", HOUR).await;
    store.record(rec("done", &token, HOUR)).await.unwrap();
    let replays = |store: EmbeddedStore| async move {
        let before = store.stats();
        for _ in 0..3 {
            assert_eq!(
                store.allocate(alloc("done", HOUR)).await.unwrap(),
                AllocateOutcome::Completed(conformance::capture("done"))
            );
        }
        let after = store.stats();
        assert_eq!(after.reads, before.reads + 3, "{after:?}");
        assert_eq!(after.batches, before.batches, "{after:?}");
        store
    };
    let store = replays(store).await;
    assert_eq!(store.stats().checkpoints, 0);
    store.shutdown().await.unwrap();
    // Reopened: in redb now, the view empty.
    let store = replays(open_with(options).await.unwrap()).await;
    store.shutdown().await.unwrap();
}

/// The files as a crash would leave them, while `store` runs: what the kernel holds for them
/// (redb keeps its unsynced pages in its own memory until a checkpoint writes them).
fn crash_copy(from: &std::path::Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().unwrap();
    for file in std::iter::once(DB_FILE).chain(JOURNAL_FILES) {
        std::fs::copy(from.join(file), to.path().join(file)).unwrap();
    }
    to
}

#[tokio::test]
async fn what_only_the_journal_holds_survives_a_crash_and_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = EmbeddedOptions::new(dir.path());
    // No checkpoint while the test runs: every answer is durable through the journal alone.
    options.checkpoint_interval = HOUR;
    let open = |options: EmbeddedOptions| async move { open_with(options).await.unwrap() };
    let store = open(options.clone()).await;
    three_fates(&store).await;
    assert_eq!(store.stats().checkpoints, 0);
    let crashed = crash_copy(dir.path());
    store.shutdown().await.unwrap();

    // Reopened after the crash, then more work, then another crash.
    options.data_dir = crashed.path().to_owned();
    let store = open(options.clone()).await;
    lease(&store, "later", HOUR).await;
    let crashed_again = crash_copy(crashed.path());
    store.shutdown().await.unwrap();

    options.data_dir = crashed_again.path().to_owned();
    let store = open(options).await;
    assert_three_fates(&store).await;
    assert!(matches!(
        store.allocate(alloc("later", HOUR)).await.unwrap(),
        AllocateOutcome::InFlight { .. }
    ));
    store.shutdown().await.unwrap();
}

/// With a checkpoint begun after every batch that changed something (`checkpoint_bytes: 0`),
/// most batches arrive while one runs beside the writer and are staged: journaled as the next
/// generation, in the other journal file, and applied to redb only after it. A crash image
/// then (redb at its last durable commit, both journal files) holds every acknowledged change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_was_staged_beside_a_checkpoint_survives_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = EmbeddedOptions::new(dir.path());
    options.checkpoint_bytes = 0;
    let store = Arc::new(open_with(options.clone()).await.unwrap());
    // Rounds of concurrent work until batches were staged (a checkpoint takes at least a sync,
    // so the first rounds nearly always are): each key allocated, then recorded, released,
    // or left in flight.
    let mut keys = Vec::new();
    for round in 0..100 {
        let tasks: Vec<_> = (0..24)
            .map(|i| {
                let store = store.clone();
                let key = format!("k-{round}-{i}");
                tokio::spawn(async move {
                    let token = lease(&store, &key, HOUR).await;
                    match i % 3 {
                        0 => assert!(matches!(
                            store.record(rec(&key, &token, HOUR)).await.unwrap(),
                            RecordOutcome::Stored { .. }
                        )),
                        1 => assert_eq!(
                            store
                                .release(Release {
                                    key: key.clone(),
                                    lease_token: Some(token),
                                })
                                .await
                                .unwrap(),
                            ReleaseOutcome::Released
                        ),
                        _ => {}
                    }
                    (key, i % 3)
                })
            })
            .collect();
        for task in tasks {
            keys.push(task.await.unwrap());
        }
        if round >= 3 && store.stats().staged > 0 {
            break;
        }
    }
    let stats = store.stats();
    assert!(stats.staged > 0 && stats.checkpoints > 0, "{stats:?}");
    // Every answer is in: nothing more is written but a checkpoint that may still be running.
    let crashed = crash_copy(dir.path());
    store.shutdown().await.unwrap();

    options.data_dir = crashed.path().to_owned();
    let store = open_with(options).await.unwrap();
    for (key, fate) in &keys {
        let outcome = store.allocate(alloc(key, HOUR)).await.unwrap();
        match fate {
            0 => assert_eq!(
                outcome,
                AllocateOutcome::Completed(conformance::capture(key)),
                "{key}"
            ),
            1 => assert!(
                matches!(outcome, AllocateOutcome::Allocated { .. }),
                "{key}"
            ),
            _ => assert!(matches!(outcome, AllocateOutcome::InFlight { .. }), "{key}"),
        }
    }
    store.shutdown().await.unwrap();
}

/// With no room for batches beside a checkpoint (`max_staged_bytes: 0`), the writer waits for
/// each checkpoint to land before it applies the next batch: none is journaled while one
/// runs, and the answers are the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_staged_bound_the_writer_waits_for_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = EmbeddedOptions::new(dir.path());
    options.checkpoint_bytes = 0;
    options.max_staged_bytes = 0;
    let store = Arc::new(open_with(options).await.unwrap());
    // Six waves, each sent once the last one is answered: at least six batches journaled,
    // each of which begins a checkpoint (`checkpoint_bytes: 0`) that the next one finds
    // running unless it already landed. (One wave of 300 may form a single batch, and then
    // no checkpoint has landed when the stats are read.)
    for wave in 0..6 {
        allocate_concurrently(&store, wave * 50..(wave + 1) * 50).await;
    }
    let stats = store.stats();
    assert!(stats.commits >= 6, "{stats:?}");
    // Each batch after the first was applied only once the checkpoint before it had landed.
    assert!(stats.checkpoints >= stats.commits - 1, "{stats:?}");
    assert_eq!(stats.staged, 0, "{stats:?}");
    for i in 0..300 {
        assert!(matches!(
            store.allocate(alloc(&format!("k{i}"), HOUR)).await.unwrap(),
            AllocateOutcome::InFlight { .. }
        ));
    }
    store.shutdown().await.unwrap();
}

/// The checkpoint thread's wake-up, which lands a checkpoint on an idle writer, is not
/// counted as a batch: one allocation, its checkpoint landed, one batch.
#[tokio::test]
async fn a_checkpoint_landing_alone_is_not_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = EmbeddedOptions::new(dir.path());
    options.checkpoint_bytes = 0;
    let store = open_with(options).await.unwrap();
    lease(&store, "k", HOUR).await;
    let stats = common::eventually("the checkpoint to land", || async {
        let stats = store.stats();
        (stats.checkpoints == 1).then_some(stats)
    })
    .await;
    assert_eq!((stats.batches, stats.commits), (1, 1), "{stats:?}");
    store.shutdown().await.unwrap();
}

/// A purge that arrives while a checkpoint runs waits for it, and is answered when it is over
/// even if nothing else comes (the checkpoint thread wakes the writer): here each allocation
/// begins a checkpoint and the purge right after it is the only command queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_held_back_by_a_checkpoint_is_answered_when_it_is_over() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = EmbeddedOptions::new(dir.path());
    options.checkpoint_bytes = 0;
    let store = open_with(options).await.unwrap();
    for i in 0..50 {
        lease(&store, &format!("k-{i}"), Duration::from_millis(1)).await;
        let purged = tokio::time::timeout(Duration::from_secs(20), store.purge_expired(1000))
            .await
            .expect("the purge is answered");
        assert!(purged.is_ok(), "{purged:?}");
    }
    let stats = store.stats();
    assert!(stats.checkpoints > 0, "{stats:?}");
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn one_store_per_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(dir.path()).await.unwrap();
    let Err(error) = open_in(dir.path()).await else {
        panic!("a second store opened the same data dir");
    };
    let line = error.to_string();
    assert!(matches!(error, OpenError::Locked { .. }), "{line}");
    assert!(line.contains(&dir.path().display().to_string()), "{line}");
    assert!(
        line.contains(&format!("pid {}", std::process::id())),
        "{line}"
    );
    // Closing the first releases the dir.
    store.shutdown().await.unwrap();
    open_in(dir.path()).await.unwrap().shutdown().await.unwrap();
}

#[tokio::test]
async fn after_shutdown_operations_fail_and_shutdown_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(dir.path()).await.unwrap();
    store.shutdown().await.unwrap();
    store.shutdown().await.unwrap();
    assert!(matches!(
        store.allocate(alloc("k", HOUR)).await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(store.ready().await, Err(StoreError::Closed)));
}

#[tokio::test]
async fn answers_that_change_nothing_pay_no_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = EmbeddedOptions::new(dir.path());
    // No checkpoint begun by the record meanwhile (it would count its own commit).
    options.checkpoint_interval = HOUR;
    let store = open_with(options).await.unwrap();
    let token = lease(&store, "k", HOUR).await;
    store.record(rec("k", &token, HOUR)).await.unwrap();
    let before = store.stats();
    for _ in 0..20 {
        // Replays, refused records, readiness, an empty purge: all read-only.
        store.allocate(alloc("k", HOUR)).await.unwrap();
        assert_eq!(
            store.record(rec("k", &token, HOUR)).await.unwrap(),
            RecordOutcome::Forbidden
        );
        store.ready().await.unwrap();
        store.purge_expired(100).await.unwrap();
    }
    let after = store.stats();
    assert_eq!(after.commits, before.commits);
    assert_eq!(after.operations, before.operations + 40);
    store.shutdown().await.unwrap();
}

/// Allocates `k{i}` for every `i` in `keys` all at once; each gets a lease.
async fn allocate_concurrently(store: &Arc<EmbeddedStore>, keys: std::ops::Range<usize>) {
    let mut tasks = tokio::task::JoinSet::new();
    for i in keys {
        let store = store.clone();
        tasks.spawn(async move { store.allocate(alloc(&format!("k{i}"), HOUR)).await });
    }
    while let Some(joined) = tasks.join_next().await {
        assert!(matches!(
            joined.unwrap().unwrap(),
            AllocateOutcome::Allocated { .. }
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_operations_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open_in(dir.path()).await.unwrap());
    allocate_concurrently(&store, 0..500).await;
    let stats = store.stats();
    // Every operation is accounted for and no batch commits twice. (How many batches form
    // depends on the scheduler; the benchmark measures it.)
    assert_eq!(stats.operations, 500);
    assert!(stats.commits <= stats.batches && stats.commits >= 1);
    store.shutdown().await.unwrap();
}

/// Who syncs the journal follows `inline_sync_below`: the writer itself while syncs are
/// faster than it, the syncer thread otherwise; each acknowledged allocation is there after a
/// reopen either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_journal_is_synced_by_the_writer_or_the_syncer_as_configured() {
    for (below, by_writer) in [(HOUR, true), (Duration::ZERO, false)] {
        let dir = tempfile::tempdir().unwrap();
        let open = |below| {
            let mut options = EmbeddedOptions::new(dir.path());
            options.inline_sync_below = below;
            // No checkpoint meanwhile: every sync counted is the journal's.
            options.checkpoint_interval = HOUR;
            async move { open_with(options).await.unwrap() }
        };
        let store = Arc::new(open(below).await);
        allocate_concurrently(&store, 0..200).await;
        let stats = store.stats();
        assert_eq!(stats.checkpoints, 0);
        assert!(stats.syncs >= 1, "{stats:?}");
        if by_writer {
            assert_eq!(stats.writer_syncs, stats.syncs, "{stats:?}");
        } else {
            assert_eq!(stats.writer_syncs, 0, "{stats:?}");
        }
        store.shutdown().await.unwrap();
        drop(store);
        let store = open(below).await;
        for i in 0..200 {
            assert!(matches!(
                store.allocate(alloc(&format!("k{i}"), HOUR)).await.unwrap(),
                AllocateOutcome::InFlight { .. }
            ));
        }
        store.shutdown().await.unwrap();
    }
}

/// An expired lease stays for the takeover window, so that its takeover is known (and
/// counted), and is purged after it; answers are the same throughout (it is free).
#[tokio::test]
async fn the_purge_keeps_an_expired_lease_for_the_takeover_window() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = EmbeddedOptions::new(dir.path());
    options.takeover_window = Duration::from_secs(2);
    let store = open_with(options).await.unwrap();
    let AllocateOutcome::Allocated {
        lease_expires_at, ..
    } = store
        .allocate(alloc("kept", Duration::from_millis(1)))
        .await
        .unwrap()
    else {
        panic!("expected a lease");
    };
    common::eventually("the lease to expire", || async {
        (now_ms() > lease_expires_at).then_some(())
    })
    .await;
    // Expired, within the window: the purge goes through it and leaves it.
    let before = store.stats().purged;
    store.purge_expired(1000).await.unwrap();
    assert_eq!(store.stats().purged, before);
    // After the window: purged. An allocation now is a first one.
    common::eventually("the purge after the window", || async {
        store.purge_expired(1000).await.unwrap();
        (store.stats().purged == before + 1).then_some(())
    })
    .await;
    assert!(matches!(
        store.allocate(alloc("kept", HOUR)).await.unwrap(),
        AllocateOutcome::Allocated {
            taken_over: false,
            ..
        }
    ));
    store.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_purge_deletes_expired_entries_and_the_file_stops_growing() {
    const ROUNDS: usize = 10;
    const PER_ROUND: usize = 250;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open_in(dir.path()).await.unwrap());
    let body = "b".repeat(4 << 10);
    let mut sizes = Vec::new();
    for round in 0..ROUNDS {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..PER_ROUND {
            let store = store.clone();
            let body = body.clone();
            tasks.spawn(async move {
                let key = format!("r{round}-{i}");
                let AllocateOutcome::Allocated { lease_token, .. } =
                    store.allocate(alloc(&key, HOUR)).await.unwrap()
                else {
                    panic!("expected a lease");
                };
                let mut record = rec(&key, &lease_token, Duration::from_millis(1));
                record.capture.response_body = body;
                store.record(record).await.unwrap();
            });
        }
        while let Some(joined) = tasks.join_next().await {
            joined.unwrap();
        }
        // Every capture of this round has expired (1 ms retention) once the clock moves on.
        let recorded_by = now_ms();
        common::eventually("the retention to pass", || async {
            (now_ms() > recorded_by).then_some(())
        })
        .await;
        let mut purged = 0;
        loop {
            let n = store.purge_expired(200).await.unwrap();
            purged += n;
            if n < 200 {
                break;
            }
        }
        assert_eq!(purged, PER_ROUND, "round {round}");
        sizes.push(std::fs::metadata(dir.path().join(DB_FILE)).unwrap().len());
    }
    assert_eq!(store.stats().purged, (ROUNDS * PER_ROUND) as u64);
    // Freed pages are reused: the file follows what is live at once (one round, 1 MiB), not
    // the total written (10 rounds, 10 MiB). Its size wanders with how the batches fell and
    // redb grows it by doubling (pages freed while a checkpoint runs are reused after it), so
    // the later rounds may take one doubling over the first two; without reuse they would
    // hold five times what those two wrote.
    let early = *sizes[..2].iter().max().unwrap();
    let late = *sizes[ROUNDS / 2..].iter().max().unwrap();
    assert!(late <= 2 * early, "the file kept growing: {sizes:?}");
    store.shutdown().await.unwrap();
}

/// Data dirs written before the compact value format hold each entry as its JSON: they are
/// still read (and a body the filter sent as base64, which the store now keeps as its bytes,
/// comes back as the very string recorded, across a reopen).
#[tokio::test]
async fn entries_of_an_older_data_dir_and_base64_bodies_come_back_as_recorded() {
    use idempotency_server::store::Entry;
    use redb::TableDefinition;
    const CAPTURES: TableDefinition<&str, &[u8]> = TableDefinition::new("captures");
    const EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("expiry");

    let dir = tempfile::tempdir().unwrap();
    let old = conformance::capture("old");
    let expires_at = now_ms() + 3_600_000;
    {
        let db = redb::Database::create(dir.path().join(DB_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let entry = Entry::Completed {
                capture: old.clone(),
                expires_at,
                fingerprint: None,
            };
            let json = serde_json::to_vec(&entry).unwrap();
            txn.open_table(CAPTURES)
                .unwrap()
                .insert("old", json.as_slice())
                .unwrap();
            txn.open_table(EXPIRY)
                .unwrap()
                .insert((expires_at, "old"), ())
                .unwrap();
        }
        txn.commit().unwrap();
    }

    let store = open_in(dir.path()).await.unwrap();
    assert_eq!(
        store.allocate(alloc("old", HOUR)).await.unwrap(),
        AllocateOutcome::Completed(old.clone())
    );
    let token = lease(&store, "new", HOUR).await;
    let mut new = conformance::capture("new");
    // What the filter sends: standard base64 with padding, of bytes that are not text.
    new.response_body = "AAECA/z9/v8ZGRkZGRkZGRkZGRkZGRkZGRkZGRkZGQ==".into();
    let record = Record {
        capture: new.clone(),
        ..rec("new", &token, HOUR)
    };
    store.record(record).await.unwrap();
    assert_eq!(
        store.allocate(alloc("new", HOUR)).await.unwrap(),
        AllocateOutcome::Completed(new.clone())
    );
    store.shutdown().await.unwrap();

    let store = open_in(dir.path()).await.unwrap();
    for (key, capture) in [("old", old), ("new", new)] {
        assert_eq!(
            store.allocate(alloc(key, HOUR)).await.unwrap(),
            AllocateOutcome::Completed(capture),
            "{key}"
        );
    }
    store.shutdown().await.unwrap();
}

/// The conformance suite again with every sync on the syncer thread, the path a slow disk
/// takes (on this machine's disks the writer syncs itself: `INLINE_SYNC_BELOW`).
mod synced_by_the_syncer {
    use super::*;

    async fn embedded() -> conformance::Harness {
        let dir = tempfile::tempdir().unwrap();
        let mut options = EmbeddedOptions::new(dir.path());
        options.inline_sync_below = Duration::ZERO;
        let store = open_with(options).await.unwrap();
        conformance::Harness::new(Arc::new(store), dir)
    }

    conformance_suite!(embedded);
}

/// The conformance suite again with a checkpoint begun after every batch that changed
/// something, so that most operations are staged beside one (read through the checkpoint's
/// snapshot and what was staged before them; purges held back until it is over).
mod staged_beside_checkpoints {
    use super::*;

    async fn embedded() -> conformance::Harness {
        let dir = tempfile::tempdir().unwrap();
        let mut options = EmbeddedOptions::new(dir.path());
        options.checkpoint_bytes = 0;
        let store = open_with(options).await.unwrap();
        conformance::Harness::new(Arc::new(store), dir)
    }

    conformance_suite!(embedded);
}
