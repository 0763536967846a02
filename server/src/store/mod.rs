//! The store: one trait every backend implements, the operations' outcomes, and the per-key
//! state machine they all follow.
//!
//! A key is *free* (no entry, or an expired one), *allocated* (a lease token, a lease expiry, a
//! fingerprint) or *completed* (a capture, a fingerprint, an expiry at the end of the retention).
//! The rules are written once, as pure functions over `(current entry, request, now)` that return
//! the outcome and the change to apply ([`allocate`], [`record`], [`release`]). The embedded
//! store runs them inside its write transaction; a store that cannot run Rust next to its data
//! (a Lua script in Redis, an update pipeline in MongoDB) re-implements them atomically and
//! proves it by passing the same conformance suite (`server/tests/conformance`).
//!
//! Expiry is decided by reading, not by deleting: an entry whose expiry has passed is free, to
//! every operation, whether or not a purge has removed it yet. So a store's answers never depend
//! on when its purge (or TTL monitor, or key expiry) runs.

pub mod embedded;
pub mod metered;
pub mod mongodb;
pub mod redis;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use idempotency_spec::Capture;
use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch: the one clock of every entry, comparable across processes
/// (within the hosts' clock skew) and as cheap to store and index as an integer.
pub type UnixMillis = u64;

/// The current wall-clock time, in [`UnixMillis`].
pub fn now_ms() -> UnixMillis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `now + d`, saturating instead of overflowing for absurd durations.
pub fn after(now: UnixMillis, d: Duration) -> UnixMillis {
    now.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// How long a store keeps a lease after it expired, so that the allocation that takes it over
/// is told so ([`AllocateOutcome::Allocated`]'s `taken_over`): the embedded store's purge and
/// Redis's key expiry leave an expired lease this much longer (MongoDB's TTL monitor deletes
/// it within a minute, on its own schedule). An expired lease is free all the same: this never
/// changes an answer, only what the next allocation is counted as. As long as the default
/// lease, so that it at most doubles what unrecorded leases take.
pub const TAKEOVER_WINDOW: Duration = Duration::from_secs(60);

/// A new lease token: 128 random bits, hex-encoded. Unguessable, so that only the holder of an
/// allocation can record or release it (when it presents its token).
pub fn new_lease_token() -> String {
    // rand's thread-local CSPRNG (ChaCha12, seeded and periodically reseeded from the OS):
    // unguessable like the OS source, without a `getrandom` system call per allocation (about
    // 1 % of the server's samples under load: bench/limits.md). It panics if the OS source
    // cannot seed it: falling back to a predictable token would silently weaken the lease.
    let bytes: [u8; 16] = rand::random();
    // One allocation (every allocation of a key makes a token: no string per byte).
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut token = String::with_capacity(32);
    for b in bytes {
        token.push(char::from(HEX[usize::from(b >> 4)]));
        token.push(char::from(HEX[usize::from(b & 15)]));
    }
    token
}

/// The API's request to allocate a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocate {
    pub key: String,
    /// `None` and `Some("")` both mean "no fingerprint": nothing to compare.
    pub fingerprint: Option<String>,
    /// How long the allocation holds the key unless recorded or released.
    pub lease: Duration,
}

/// The API's request to record the response of an allocated key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: String,
    /// `None`: any live allocation may be recorded (the old clients send no token).
    pub lease_token: Option<String>,
    pub capture: Capture,
    /// How long the capture is replayed; the key is free afterwards.
    pub retention: Duration,
}

/// The API's request to give a key back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub key: String,
    /// `None`: any live allocation may be released (the same rule as [`Record`]).
    pub lease_token: Option<String>,
}

/// One operation of a batch (`POST /api/v2/captures/batch`): a record or a release, each
/// applied exactly as the single call would apply it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOp {
    Record(Record),
    Release(Release),
}

/// The outcome of one [`BatchOp`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOutcome {
    Record(RecordOutcome),
    Release(ReleaseOutcome),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllocateOutcome {
    /// The key was free (or its lease had expired): the caller holds it now. 202.
    Allocated {
        lease_token: String,
        lease_expires_at: UnixMillis,
        /// The key held an expired lease, which this allocation took over: its holder never
        /// recorded or released it (a lost record, or an upstream slower than the lease).
        /// Known while the store still keeps the expired lease ([`TAKEOVER_WINDOW`]); after
        /// that a takeover looks like a first allocation. Only for the metrics: the answer
        /// is the same 202.
        taken_over: bool,
    },
    /// The key was recorded earlier: replay this. 200.
    Completed(Capture),
    /// Another request holds a live lease until `lease_expires_at`. 409.
    InFlight { lease_expires_at: UnixMillis },
    /// The key is allocated or completed with another fingerprint. 422.
    FingerprintMismatch,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordOutcome {
    /// The capture is stored and replayed until `expires_at`. 200.
    Stored { expires_at: UnixMillis },
    /// Not allocated, already completed, lease expired or taken over, or another token. 403.
    Forbidden,
    /// The capture is larger than this store can keep as one entry (a MongoDB document is at
    /// most `limit` bytes of BSON, which can be more than the JSON the caller sent): nothing
    /// changes, the allocation stays as it was. 413. Only a store with such a limit returns it.
    TooLarge { limit: usize },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// The key is free again. 200.
    Released,
    /// The same cases as [`RecordOutcome::Forbidden`]. 403.
    Forbidden,
}

/// A failure of the store itself (I/O, a closed writer, an unreachable database): answered
/// with 503, never used for bad input.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store is shut down")]
    Closed,
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// A shared store did not answer within `--store-timeout`.
    #[error("the store did not answer in time: {0}")]
    TimedOut(String),
    #[error("a stored entry cannot be decoded: {0}")]
    Corrupt(String),
}

/// A stored entry that cannot be decoded, said without its contents: serde's message quotes
/// the value it stumbled on (a body, a header, a token), which must never reach a log.
pub(crate) fn undecodable(what: &str, e: &serde_json::Error) -> StoreError {
    StoreError::Corrupt(format!(
        "{what}: {:?} error at line {} column {}",
        e.classify(),
        e.line(),
        e.column()
    ))
}

/// Whether a shared store (Redis, MongoDB) was shut down: from then on its operations fail
/// with [`StoreError::Closed`].
#[derive(Debug, Default)]
pub(crate) struct Closed(AtomicBool);

impl Closed {
    pub(crate) fn check(&self) -> Result<(), StoreError> {
        if self.0.load(Ordering::Acquire) {
            Err(StoreError::Closed)
        } else {
            Ok(())
        }
    }

    /// Closes it; `true` the first time.
    pub(crate) fn close(&self) -> bool {
        !self.0.swap(true, Ordering::AcqRel)
    }
}

/// Why an attempt to open a shared store (Redis, MongoDB) failed.
#[derive(Debug)]
pub(crate) enum StartAttempt {
    /// Worth retrying: the store may not be up yet (refused, timed out, no primary).
    Transient(String),
    /// Retrying cannot help (a malformed URL, refused credentials, a conflicting index).
    Fatal(String),
}

/// Try `attempt` until it succeeds, fails for good, or `within` has passed, pausing 100 ms
/// doubling to 2 s in between: a shared store may start after the server (containers, a
/// restart of both). Each transient failure is logged as a warning.
pub(crate) async fn retry_start<T, F, Fut>(
    what: &str,
    within: Duration,
    mut attempt: F,
) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StartAttempt>>,
{
    let deadline = tokio::time::Instant::now() + within;
    let mut pause = Duration::from_millis(100);
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(StartAttempt::Fatal(why)) => return Err(why),
            Err(StartAttempt::Transient(why)) => {
                if tokio::time::Instant::now() + pause > deadline {
                    return Err(format!(
                        "{why} (still failing after {})",
                        humantime::format_duration(within)
                    ));
                }
                tracing::warn!(store = what, error = %why, "the store does not answer yet; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// A storage backend. Object-safe, used as `Arc<dyn Store>`.
///
/// Every implementation must behave exactly as the state machine below (and ARCHITECTURE.md)
/// says, atomically per key, under concurrent calls and across processes sharing the store, and
/// must make an allocation, a record and a release durable before it returns them.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// A short name for logs: `embedded`, `redis`, ...
    fn name(&self) -> &'static str;

    async fn allocate(&self, request: Allocate) -> Result<AllocateOutcome, StoreError>;

    async fn record(&self, request: Record) -> Result<RecordOutcome, StoreError>;

    async fn release(&self, request: Release) -> Result<ReleaseOutcome, StoreError>;

    /// Many records and releases at once, answered in order, each exactly as its single call
    /// would be (atomic per item; every change durable before this returns). A store that can
    /// do better than one round trip per item overrides it (embedded: one transaction and one
    /// sync; Redis: one pipeline); the default runs the single calls concurrently.
    async fn batch(&self, operations: Vec<BatchOp>) -> Vec<Result<BatchOutcome, StoreError>> {
        batch_concurrently(self, operations).await
    }

    /// A cheap round trip through the store, for `/-/ready`.
    async fn ready(&self) -> Result<(), StoreError>;

    /// Add the store's own metrics to the server's (`GET /metrics`); the default has none.
    fn register_metrics(&self, registry: &prometheus::Registry) {
        let _ = registry;
    }

    /// Delete up to `limit` entries whose expiry has passed; returns how many expired entries
    /// it went through (`limit` means there may be more: call again). Only for stores
    /// that do not expire entries by themselves (a TTL index, key expiry): the default does
    /// nothing. Never changes an answer, only reclaims space (see the module doc).
    async fn purge_expired(&self, limit: usize) -> Result<usize, StoreError> {
        let _ = limit;
        Ok(0)
    }

    /// Flush and close: every operation accepted before is finished and durable when this
    /// returns; later operations fail with [`StoreError::Closed`].
    async fn shutdown(&self) -> Result<(), StoreError>;
}

/// A batch as its single calls, all sent at once and answered in order: the default
/// [`Store::batch`].
pub async fn batch_concurrently<S: Store + ?Sized>(
    store: &S,
    operations: Vec<BatchOp>,
) -> Vec<Result<BatchOutcome, StoreError>> {
    futures_util::future::join_all(operations.into_iter().map(|op| async move {
        match op {
            BatchOp::Record(r) => store.record(r).await.map(BatchOutcome::Record),
            BatchOp::Release(r) => store.release(r).await.map(BatchOutcome::Release),
        }
    }))
    .await
}

/// What a store keeps for a key that is not free.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Entry {
    Allocated {
        lease_token: String,
        lease_expires_at: UnixMillis,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fingerprint: Option<String>,
    },
    Completed {
        capture: Capture,
        expires_at: UnixMillis,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fingerprint: Option<String>,
    },
}

impl Entry {
    /// When this entry stops counting: the lease's end, or the retention's.
    pub fn expires_at(&self) -> UnixMillis {
        match self {
            Entry::Allocated {
                lease_expires_at, ..
            } => *lease_expires_at,
            Entry::Completed { expires_at, .. } => *expires_at,
        }
    }

    /// When a store may delete this entry: at its expiry, except for a lease, which is kept
    /// `takeover_window` longer ([`TAKEOVER_WINDOW`]) so that its takeover is seen.
    pub fn purge_at(&self, takeover_window: Duration) -> UnixMillis {
        match self {
            Entry::Allocated {
                lease_expires_at, ..
            } => after(*lease_expires_at, takeover_window),
            Entry::Completed { expires_at, .. } => *expires_at,
        }
    }

    /// Live until its expiry, free from that millisecond on.
    pub fn is_live(&self, now: UnixMillis) -> bool {
        now < self.expires_at()
    }

    pub fn fingerprint(&self) -> Option<&str> {
        match self {
            Entry::Allocated { fingerprint, .. } | Entry::Completed { fingerprint, .. } => {
                fingerprint.as_deref()
            }
        }
    }
}

/// What an operation does to the stored entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Nothing to write (so nothing to sync).
    None,
    Put(Entry),
    Delete,
}

/// An empty fingerprint is no fingerprint.
fn present(fingerprint: Option<&str>) -> Option<&str> {
    fingerprint.filter(|f| !f.is_empty())
}

/// Fingerprints conflict only when both are present and differ.
pub fn fingerprints_conflict(stored: Option<&str>, presented: Option<&str>) -> bool {
    matches!((present(stored), present(presented)), (Some(a), Some(b)) if a != b)
}

/// Allocate: free → allocated (202); allocated with a live lease → in flight (409); completed →
/// replay (200); a fingerprint mismatch in either live state → 422, checked first. An expired
/// entry is free, so an expired lease is taken over with a new token and fingerprint (and the
/// outcome says it was taken over).
pub fn allocate(
    current: Option<&Entry>,
    request: &Allocate,
    now: UnixMillis,
    new_token: impl FnOnce() -> String,
) -> (AllocateOutcome, Change) {
    match current.filter(|e| e.is_live(now)) {
        None => {
            let taken_over = matches!(current, Some(Entry::Allocated { .. }));
            let lease_token = new_token();
            let lease_expires_at = after(now, request.lease);
            let entry = Entry::Allocated {
                lease_token: lease_token.clone(),
                lease_expires_at,
                fingerprint: present(request.fingerprint.as_deref()).map(str::to_owned),
            };
            (
                AllocateOutcome::Allocated {
                    lease_token,
                    lease_expires_at,
                    taken_over,
                },
                Change::Put(entry),
            )
        }
        Some(entry)
            if fingerprints_conflict(entry.fingerprint(), request.fingerprint.as_deref()) =>
        {
            (AllocateOutcome::FingerprintMismatch, Change::None)
        }
        Some(Entry::Allocated {
            lease_expires_at, ..
        }) => (
            AllocateOutcome::InFlight {
                lease_expires_at: *lease_expires_at,
            },
            Change::None,
        ),
        Some(Entry::Completed { capture, .. }) => {
            (AllocateOutcome::Completed(capture.clone()), Change::None)
        }
    }
}

/// Whether `presented` may act on a live allocation held with `held`: without a token, any
/// allocation (the old clients); with one, only its own.
fn holds(held: &str, presented: Option<&str>) -> bool {
    presented.is_none_or(|token| token == held)
}

/// Record: a live allocation whose token matches (or no token presented) → completed, kept for
/// the retention (200); anything else → 403, and nothing changes.
pub fn record(
    current: Option<&Entry>,
    request: &Record,
    now: UnixMillis,
) -> (RecordOutcome, Change) {
    match current.filter(|e| e.is_live(now)) {
        Some(Entry::Allocated {
            lease_token,
            fingerprint,
            ..
        }) if holds(lease_token, request.lease_token.as_deref()) => {
            let expires_at = after(now, request.retention);
            let entry = Entry::Completed {
                capture: request.capture.clone(),
                expires_at,
                fingerprint: fingerprint.clone(),
            };
            (RecordOutcome::Stored { expires_at }, Change::Put(entry))
        }
        _ => (RecordOutcome::Forbidden, Change::None),
    }
}

/// Release: the same token rule as [`record`]; the key becomes free (200). Anything else → 403.
pub fn release(
    current: Option<&Entry>,
    request: &Release,
    now: UnixMillis,
) -> (ReleaseOutcome, Change) {
    match current.filter(|e| e.is_live(now)) {
        Some(Entry::Allocated { lease_token, .. })
            if holds(lease_token, request.lease_token.as_deref()) =>
        {
            (ReleaseOutcome::Released, Change::Delete)
        }
        _ => (ReleaseOutcome::Forbidden, Change::None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use idempotency_spec::{Header, HeaderValue};

    const NOW: UnixMillis = 1_000_000;
    const LEASE: Duration = Duration::from_millis(500);
    const RETENTION: Duration = Duration::from_secs(10);

    fn alloc(fingerprint: Option<&str>) -> Allocate {
        Allocate {
            key: "k".into(),
            fingerprint: fingerprint.map(str::to_owned),
            lease: LEASE,
        }
    }

    fn capture() -> Capture {
        Capture {
            response_status: 201,
            response_body: "body".into(),
            response_headers: vec![Header {
                key: "Set-Cookie".into(),
                value: HeaderValue::Many(vec!["a=1".into(), "b=2".into()]),
            }],
        }
    }

    fn rec(token: Option<&str>) -> Record {
        Record {
            key: "k".into(),
            lease_token: token.map(str::to_owned),
            capture: capture(),
            retention: RETENTION,
        }
    }

    fn allocated(token: &str, fingerprint: Option<&str>) -> Entry {
        Entry::Allocated {
            lease_token: token.into(),
            lease_expires_at: NOW + 500,
            fingerprint: fingerprint.map(str::to_owned),
        }
    }

    fn completed(fingerprint: Option<&str>) -> Entry {
        Entry::Completed {
            capture: capture(),
            expires_at: NOW + 10_000,
            fingerprint: fingerprint.map(str::to_owned),
        }
    }

    #[test]
    fn free_key_is_allocated_with_a_lease() {
        let (outcome, change) = allocate(None, &alloc(Some("f")), NOW, || "t".into());
        assert_eq!(
            outcome,
            AllocateOutcome::Allocated {
                lease_token: "t".into(),
                lease_expires_at: NOW + 500,
                taken_over: false,
            }
        );
        assert_eq!(change, Change::Put(allocated("t", Some("f"))));
    }

    #[test]
    fn empty_fingerprint_is_not_stored() {
        let (_, change) = allocate(None, &alloc(Some("")), NOW, || "t".into());
        assert_eq!(change, Change::Put(allocated("t", None)));
    }

    #[test]
    fn live_lease_is_in_flight() {
        let entry = allocated("t", None);
        let (outcome, change) = allocate(Some(&entry), &alloc(None), NOW + 499, || unreachable!());
        assert_eq!(
            outcome,
            AllocateOutcome::InFlight {
                lease_expires_at: NOW + 500
            }
        );
        assert_eq!(change, Change::None);
    }

    #[test]
    fn expired_lease_is_taken_over_with_a_new_token_and_fingerprint() {
        let entry = allocated("old", Some("f1"));
        let (outcome, change) =
            allocate(Some(&entry), &alloc(Some("f2")), NOW + 500, || "new".into());
        assert_eq!(
            outcome,
            AllocateOutcome::Allocated {
                lease_token: "new".into(),
                lease_expires_at: NOW + 1000,
                taken_over: true,
            }
        );
        assert_eq!(
            change,
            Change::Put(Entry::Allocated {
                lease_token: "new".into(),
                lease_expires_at: NOW + 1000,
                fingerprint: Some("f2".into())
            })
        );
    }

    #[test]
    fn completed_key_replays() {
        let entry = completed(None);
        let (outcome, change) = allocate(Some(&entry), &alloc(Some("f")), NOW, || unreachable!());
        assert_eq!(outcome, AllocateOutcome::Completed(capture()));
        assert_eq!(change, Change::None);
    }

    #[test]
    fn fingerprint_mismatch_is_checked_before_in_flight_and_replay() {
        for entry in [allocated("t", Some("f1")), completed(Some("f1"))] {
            let (outcome, change) =
                allocate(Some(&entry), &alloc(Some("f2")), NOW, || unreachable!());
            assert_eq!(outcome, AllocateOutcome::FingerprintMismatch);
            assert_eq!(change, Change::None);
        }
    }

    #[test]
    fn fingerprints_compare_only_when_both_present() {
        assert!(!fingerprints_conflict(None, Some("a")));
        assert!(!fingerprints_conflict(Some("a"), None));
        assert!(!fingerprints_conflict(Some(""), Some("a")));
        assert!(!fingerprints_conflict(Some("a"), Some("")));
        assert!(!fingerprints_conflict(Some("a"), Some("a")));
        assert!(fingerprints_conflict(Some("a"), Some("b")));
    }

    #[test]
    fn completed_capture_expires_after_retention() {
        let entry = completed(None);
        let (outcome, _) = allocate(Some(&entry), &alloc(None), NOW + 10_000, || "t".into());
        // A new allocation, not a takeover: the capture was recorded.
        assert!(matches!(
            outcome,
            AllocateOutcome::Allocated {
                taken_over: false,
                ..
            }
        ));
    }

    #[test]
    fn a_lease_is_purged_a_window_after_its_expiry_a_capture_at_it() {
        let window = Duration::from_secs(60);
        assert_eq!(allocated("t", None).purge_at(window), NOW + 500 + 60_000);
        assert_eq!(completed(None).purge_at(window), NOW + 10_000);
    }

    #[test]
    fn record_completes_a_live_allocation_with_or_without_its_token() {
        let entry = allocated("t", Some("f"));
        for token in [Some("t"), None] {
            let (outcome, change) = record(Some(&entry), &rec(token), NOW + 100);
            assert_eq!(
                outcome,
                RecordOutcome::Stored {
                    expires_at: NOW + 100 + 10_000
                }
            );
            assert_eq!(
                change,
                Change::Put(Entry::Completed {
                    capture: capture(),
                    expires_at: NOW + 10_100,
                    fingerprint: Some("f".into())
                })
            );
        }
    }

    #[test]
    fn record_is_forbidden_otherwise() {
        let live = allocated("t", None);
        let done = completed(None);
        let cases: [(Option<&Entry>, Option<&str>, UnixMillis); 5] = [
            (None, None, NOW),
            (Some(&live), Some("other"), NOW),
            (Some(&live), Some("t"), NOW + 500),
            (Some(&live), None, NOW + 500),
            (Some(&done), None, NOW),
        ];
        for (current, token, now) in cases {
            let (outcome, change) = record(current, &rec(token), now);
            assert_eq!(outcome, RecordOutcome::Forbidden, "{current:?} {token:?}");
            assert_eq!(change, Change::None);
        }
    }

    #[test]
    fn release_frees_a_live_allocation() {
        let entry = allocated("t", None);
        let request = Release {
            key: "k".into(),
            lease_token: Some("t".into()),
        };
        assert_eq!(
            release(Some(&entry), &request, NOW),
            (ReleaseOutcome::Released, Change::Delete)
        );
        let without = Release {
            lease_token: None,
            ..request.clone()
        };
        assert_eq!(
            release(Some(&entry), &without, NOW),
            (ReleaseOutcome::Released, Change::Delete)
        );
        let other = Release {
            lease_token: Some("x".into()),
            ..request.clone()
        };
        assert_eq!(
            release(Some(&entry), &other, NOW).0,
            ReleaseOutcome::Forbidden
        );
        assert_eq!(
            release(Some(&entry), &request, NOW + 500).0,
            ReleaseOutcome::Forbidden
        );
        assert_eq!(
            release(Some(&completed(None)), &request, NOW).0,
            ReleaseOutcome::Forbidden
        );
        assert_eq!(release(None, &request, NOW).0, ReleaseOutcome::Forbidden);
    }

    #[test]
    fn entries_round_trip_through_json() {
        for entry in [allocated("t", Some("f")), completed(None)] {
            let bytes = serde_json::to_vec(&entry).unwrap();
            assert_eq!(serde_json::from_slice::<Entry>(&bytes).unwrap(), entry);
        }
    }

    #[test]
    fn lease_tokens_are_distinct_and_opaque() {
        // Each thread has its own generator: tokens made on several threads at once (as the
        // HTTP tasks do) must still never repeat, which a generator seeded alike per thread
        // would break.
        let threads: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(|| (0..500).map(|_| new_lease_token()).collect::<Vec<_>>()))
            .collect();
        let tokens: Vec<String> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        for token in &tokens {
            assert_eq!(token.len(), 32, "{token}");
            assert!(
                token
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
                "{token}"
            );
        }
        let distinct: std::collections::HashSet<&String> = tokens.iter().collect();
        assert_eq!(distinct.len(), tokens.len());
    }
}
