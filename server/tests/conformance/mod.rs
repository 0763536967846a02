//! The store conformance suite: every rule of ARCHITECTURE.md's "Semantics", run against any
//! [`Store`] through the trait alone.
//!
//! A store's test file declares the suite with a factory that opens a fresh, empty store:
//!
//! ```ignore
//! mod common;
//! #[macro_use]
//! mod conformance;
//!
//! async fn open() -> conformance::Harness { /* a fresh store, and what keeps it alive */ }
//!
//! conformance_suite!(open);
//! ```
//!
//! Each case becomes one `#[tokio::test]`. Cases use their own keys, so a factory may hand out
//! stores that share a backend (one Redis, one MongoDB database) as long as it is empty or the
//! keys are prefixed per run (see [`Harness::prefix`]). A factory may also return
//! `Option<Harness>`: `None` skips the case (a backend that is not configured; the factory says
//! so, once).
//!
//! A backend that is slow to set up (a Redis Cluster takes two seconds to form) can run the
//! whole suite in ONE test, the cases one after the other on harnesses made from one shared
//! context: `conformance_suite!(sequential test_name, setup, factory)`, where `setup()` returns
//! the context and `factory(&context)` a harness.
//!
//! Time is real: leases and retentions of a few hundred milliseconds, waited for by polling
//! until a deadline, never by a fixed sleep standing in for an event. No assertion is about
//! how long something took.

#![allow(dead_code)]

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use idempotency_server::store::{
    Allocate, AllocateOutcome, BatchOp, BatchOutcome, Record, RecordOutcome, Release,
    ReleaseOutcome, Store, now_ms,
};
use idempotency_spec::{Capture, Header, HeaderValue};

use crate::common::eventually;

/// A store under test and whatever must outlive it (a temporary directory, a server process).
pub struct Harness {
    pub store: Arc<dyn Store>,
    /// Prepended to every key of the suite, so that runs sharing a backend do not meet.
    pub prefix: String,
    /// How far the store's clock may be from this process's (a store that uses its own clock
    /// on another host): comparisons of its instants with ours allow that much.
    pub clock_skew: Duration,
    /// The store keeps an expired lease for the takeover window, so that the allocation that
    /// takes it over says so (`taken_over`). MongoDB's TTL monitor may delete it at any time
    /// after its expiry: there a takeover is not always known.
    pub keeps_expired_leases: bool,
    _guard: Box<dyn Any + Send + Sync>,
}

impl Harness {
    pub fn new(store: Arc<dyn Store>, guard: impl Any + Send + Sync) -> Harness {
        Harness {
            store,
            prefix: String::new(),
            clock_skew: Duration::ZERO,
            keeps_expired_leases: true,
            _guard: Box::new(guard),
        }
    }

    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Harness {
        self.prefix = prefix.into();
        self
    }

    pub fn with_clock_skew(mut self, skew: Duration) -> Harness {
        self.clock_skew = skew;
        self
    }

    /// A store whose expired leases may be deleted at any time (see `keeps_expired_leases`).
    pub fn forgetting_expired_leases(mut self) -> Harness {
        self.keeps_expired_leases = false;
        self
    }

    fn skew_ms(&self) -> u64 {
        self.clock_skew.as_millis() as u64
    }

    pub async fn finish(self) {
        self.store.shutdown().await.expect("the store shuts down");
    }
}

/// Declares one `#[tokio::test]` per case of the suite, each on a store from `$factory`.
macro_rules! conformance_suite {
    // The internal rules come first: `sequential ...` would otherwise parse as a factory path.
    (@with_cases ($($head:tt)*)) => {
        conformance_suite!($($head)*;
            allocate_free_key_gives_a_lease,
            allocate_on_a_live_lease_is_in_flight,
            expired_lease_is_taken_over,
            only_an_expired_lease_is_taken_over,
            old_token_is_refused_after_takeover,
            record_then_allocate_replays,
            record_without_token_completes_any_live_allocation,
            record_keeps_array_header_values_and_large_bodies,
            record_is_forbidden_unless_allocated_and_live,
            record_with_another_token_is_forbidden,
            record_after_the_lease_expired_is_forbidden,
            release_frees_the_key,
            release_is_forbidden_unless_held,
            fingerprint_mismatch_while_allocated,
            fingerprint_mismatch_when_completed,
            fingerprints_compare_only_when_both_present,
            expired_lease_is_taken_over_with_another_fingerprint,
            completed_capture_expires_after_retention,
            purge_never_changes_an_answer,
            keys_are_independent,
            concurrent_allocations_of_one_key_give_one_lease,
            concurrent_allocations_over_a_thousand_keys,
            concurrent_takeovers_give_one_lease,
            concurrent_records_store_once,
            batch_answers_each_item_as_its_single_call,
            batch_of_many_items_applies_them_all,
            concurrent_batches_and_records_store_once,
            ready_answers,
        );
    };
    (@cases $factory:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                // `Option::from` takes a `Harness` or an `Option<Harness>` (None: skipped).
                let Some(harness) = Option::<conformance::Harness>::from($factory().await) else {
                    return;
                };
                conformance::$case(&harness).await;
                harness.finish().await;
            }
        )*
    };
    (@sequential $test:ident, $setup:path, $factory:path; $($case:ident),* $(,)?) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            let context = $setup().await;
            $(
                // Shown with the failure (the test's output is captured): which case failed.
                println!("conformance case {}", stringify!($case));
                let harness = $factory(&context).await;
                conformance::$case(&harness).await;
                harness.finish().await;
            )*
        }
    };
    (sequential $test:ident, $setup:path, $factory:path) => {
        conformance_suite!(@with_cases (@sequential $test, $setup, $factory));
    };
    ($factory:path) => {
        conformance_suite!(@with_cases (@cases $factory));
    };
}

const LONG: Duration = Duration::from_secs(3600);
const SHORT: Duration = Duration::from_millis(200);

fn key(h: &Harness, name: &str) -> String {
    format!("{}{name}", h.prefix)
}

fn alloc(key: &str, fingerprint: Option<&str>, lease: Duration) -> Allocate {
    Allocate {
        key: key.to_owned(),
        fingerprint: fingerprint.map(str::to_owned),
        lease,
    }
}

pub fn capture(tag: &str) -> Capture {
    Capture {
        response_status: 201,
        response_body: format!("body of {tag}"),
        response_headers: vec![Header {
            key: "Content-Type".into(),
            value: HeaderValue::One("application/json".into()),
        }],
    }
}

fn rec(key: &str, token: Option<&str>, capture: Capture, retention: Duration) -> Record {
    Record {
        key: key.to_owned(),
        lease_token: token.map(str::to_owned),
        capture,
        retention,
    }
}

fn rel(key: &str, token: Option<&str>) -> Release {
    Release {
        key: key.to_owned(),
        lease_token: token.map(str::to_owned),
    }
}

/// Allocate and expect a lease; returns its token and expiry, and whether it took an expired
/// lease over.
async fn any_lease(store: &dyn Store, request: Allocate) -> (String, u64, bool) {
    match store.allocate(request).await.unwrap() {
        AllocateOutcome::Allocated {
            lease_token,
            lease_expires_at,
            taken_over,
        } => (lease_token, lease_expires_at, taken_over),
        other => panic!("expected a lease, got {other:?}"),
    }
}

/// Allocate a key that held no lease and expect a lease (not a takeover); returns its token
/// and expiry.
async fn lease(store: &dyn Store, request: Allocate) -> (String, u64) {
    let (token, expires, taken_over) = any_lease(store, request).await;
    assert!(!taken_over, "no lease was taken over");
    (token, expires)
}

/// Wait until the wall clock has passed `at` (a lease's or a retention's end), by the store's
/// clock too.
async fn until_past(h: &Harness, at: u64) {
    let at = at + h.skew_ms();
    eventually("the clock to pass an expiry", || async {
        (now_ms() > at).then_some(())
    })
    .await
}

pub async fn allocate_free_key_gives_a_lease(h: &Harness) {
    let k = key(h, "free");
    let before = now_ms();
    let (token, expires) = lease(&*h.store, alloc(&k, None, Duration::from_secs(60))).await;
    assert!(!token.is_empty());
    let skew = h.skew_ms();
    assert!(
        expires + skew >= before + 60_000,
        "the lease lasts as asked"
    );
    assert!(expires <= now_ms() + 60_000 + skew);
}

pub async fn allocate_on_a_live_lease_is_in_flight(h: &Harness) {
    let k = key(h, "busy");
    let (_, expires) = lease(&*h.store, alloc(&k, None, LONG)).await;
    for _ in 0..3 {
        assert_eq!(
            h.store.allocate(alloc(&k, None, LONG)).await.unwrap(),
            AllocateOutcome::InFlight {
                lease_expires_at: expires
            }
        );
    }
}

/// While the lease lives: in flight. Once it expired: a new lease with a new token, which
/// says it took the expired one over.
async fn take_over(h: &Harness, k: &str, first_token: &str, fingerprint: Option<&str>) -> String {
    let (new, taken_over) = eventually("the takeover of an expired lease", || async {
        match h.store.allocate(alloc(k, fingerprint, LONG)).await.unwrap() {
            AllocateOutcome::InFlight { .. } => None,
            AllocateOutcome::Allocated {
                lease_token,
                taken_over,
                ..
            } => Some((lease_token, taken_over)),
            other => panic!("expected in flight, then a new lease; got {other:?}"),
        }
    })
    .await;
    assert_ne!(new, first_token, "a takeover issues a new token");
    if h.keeps_expired_leases {
        assert!(
            taken_over,
            "the new lease says it took the expired one over"
        );
    }
    new
}

pub async fn expired_lease_is_taken_over(h: &Harness) {
    let k = key(h, "takeover");
    let (first, _) = lease(&*h.store, alloc(&k, None, SHORT)).await;
    let second = take_over(h, &k, &first, None).await;
    // The new holder records with its token.
    let stored = h
        .store
        .record(rec(&k, Some(&second), capture("t"), LONG))
        .await
        .unwrap();
    assert!(matches!(stored, RecordOutcome::Stored { .. }));
}

/// A key that never held a lease, one whose lease was released, and one whose capture's
/// retention ended are allocated as new, not taken over.
pub async fn only_an_expired_lease_is_taken_over(h: &Harness) {
    let k = key(h, "not-taken");
    let (token, _) = lease(&*h.store, alloc(&k, None, LONG)).await;
    h.store.release(rel(&k, Some(&token))).await.unwrap();
    let (token, _) = lease(&*h.store, alloc(&k, None, LONG)).await;
    let RecordOutcome::Stored { expires_at } = h
        .store
        .record(rec(&k, Some(&token), capture("r"), SHORT))
        .await
        .unwrap()
    else {
        panic!("expected stored");
    };
    until_past(h, expires_at).await;
    lease(&*h.store, alloc(&k, None, LONG)).await;
}

pub async fn old_token_is_refused_after_takeover(h: &Harness) {
    let k = key(h, "stale");
    let (first, _) = lease(&*h.store, alloc(&k, None, SHORT)).await;
    let second = take_over(h, &k, &first, None).await;
    assert_eq!(
        h.store
            .record(rec(&k, Some(&first), capture("old"), LONG))
            .await
            .unwrap(),
        RecordOutcome::Forbidden
    );
    assert_eq!(
        h.store.release(rel(&k, Some(&first))).await.unwrap(),
        ReleaseOutcome::Forbidden
    );
    // The new holder is untouched.
    assert!(matches!(
        h.store.allocate(alloc(&k, None, LONG)).await.unwrap(),
        AllocateOutcome::InFlight { .. }
    ));
    assert_eq!(
        h.store.release(rel(&k, Some(&second))).await.unwrap(),
        ReleaseOutcome::Released
    );
}

pub async fn record_then_allocate_replays(h: &Harness) {
    let k = key(h, "replay");
    let (token, _) = lease(&*h.store, alloc(&k, None, LONG)).await;
    let before = now_ms();
    let outcome = h
        .store
        .record(rec(
            &k,
            Some(&token),
            capture("replay"),
            Duration::from_secs(60),
        ))
        .await
        .unwrap();
    let RecordOutcome::Stored { expires_at } = outcome else {
        panic!("expected stored, got {outcome:?}");
    };
    let skew = h.skew_ms();
    assert!(expires_at + skew >= before + 60_000 && expires_at <= now_ms() + 60_000 + skew);
    for _ in 0..2 {
        assert_eq!(
            h.store.allocate(alloc(&k, None, LONG)).await.unwrap(),
            AllocateOutcome::Completed(capture("replay"))
        );
    }
}

pub async fn record_without_token_completes_any_live_allocation(h: &Harness) {
    let k = key(h, "tokenless");
    lease(&*h.store, alloc(&k, None, LONG)).await;
    assert!(matches!(
        h.store
            .record(rec(&k, None, capture("old client"), LONG))
            .await
            .unwrap(),
        RecordOutcome::Stored { .. }
    ));
    assert_eq!(
        h.store.allocate(alloc(&k, None, LONG)).await.unwrap(),
        AllocateOutcome::Completed(capture("old client"))
    );
}

pub async fn record_keeps_array_header_values_and_large_bodies(h: &Harness) {
    let k = key(h, "cookies");
    let (token, _) = lease(&*h.store, alloc(&k, None, LONG)).await;
    let capture = Capture {
        response_status: 200,
        response_body: "x".repeat(1 << 20),
        response_headers: vec![
            Header {
                key: "Set-Cookie".into(),
                value: HeaderValue::Many(vec!["a=1; Path=/".into(), "b=2; Path=/".into()]),
            },
            Header {
                key: "X-One".into(),
                value: HeaderValue::One("1".into()),
            },
        ],
    };
    let stored = h
        .store
        .record(rec(&k, Some(&token), capture.clone(), LONG))
        .await
        .unwrap();
    assert!(matches!(stored, RecordOutcome::Stored { .. }));
    assert_eq!(
        h.store.allocate(alloc(&k, None, LONG)).await.unwrap(),
        AllocateOutcome::Completed(capture)
    );
}

pub async fn record_is_forbidden_unless_allocated_and_live(h: &Harness) {
    // Never allocated.
    let k = key(h, "never");
    assert_eq!(
        h.store
            .record(rec(&k, None, capture("x"), LONG))
            .await
            .unwrap(),
        RecordOutcome::Forbidden
    );
    // Already completed: a second record does not overwrite the first.
    let k = key(h, "twice");
    let (token, _) = lease(&*h.store, alloc(&k, None, LONG)).await;
    h.store
        .record(rec(&k, Some(&token), capture("first"), LONG))
        .await
        .unwrap();
    for token in [Some(token.as_str()), None] {
        assert_eq!(
            h.store
                .record(rec(&k, token, capture("second"), LONG))
                .await
                .unwrap(),
            RecordOutcome::Forbidden
        );
    }
    assert_eq!(
        h.store.allocate(alloc(&k, None, LONG)).await.unwrap(),
        AllocateOutcome::Completed(capture("first"))
    );
}

pub async fn record_with_another_token_is_forbidden(h: &Harness) {
    let k = key(h, "mismatch");
    let (token, _) = lease(&*h.store, alloc(&k, None, LONG)).await;
    assert_eq!(
        h.store
            .record(rec(&k, Some("not-the-token"), capture("x"), LONG))
            .await
            .unwrap(),
        RecordOutcome::Forbidden
    );
    // The holder still can.
    assert!(matches!(
        h.store
            .record(rec(&k, Some(&token), capture("x"), LONG))
            .await
            .unwrap(),
        RecordOutcome::Stored { .. }
    ));
}

pub async fn record_after_the_lease_expired_is_forbidden(h: &Harness) {
    let k = key(h, "late");
    let (token, expires) = lease(&*h.store, alloc(&k, None, SHORT)).await;
    until_past(h, expires).await;
    // Nobody took the key over; the lease is gone all the same, with or without its token.
    for token in [Some(token.as_str()), None] {
        assert_eq!(
            h.store
                .record(rec(&k, token, capture("late"), LONG))
                .await
                .unwrap(),
            RecordOutcome::Forbidden
        );
    }
    assert_eq!(
        h.store.release(rel(&k, Some(&token))).await.unwrap(),
        ReleaseOutcome::Forbidden
    );
    // And the key is free: the next allocation takes the expired lease over.
    let (_, _, taken_over) = any_lease(&*h.store, alloc(&k, None, LONG)).await;
    assert!(taken_over || !h.keeps_expired_leases);
}

pub async fn release_frees_the_key(h: &Harness) {
    let k = key(h, "release");
    let (token, _) = lease(&*h.store, alloc(&k, None, LONG)).await;
    assert_eq!(
        h.store.release(rel(&k, Some(&token))).await.unwrap(),
        ReleaseOutcome::Released
    );
    // Released once: a second release, or a record, of that lease is refused.
    assert_eq!(
        h.store.release(rel(&k, Some(&token))).await.unwrap(),
        ReleaseOutcome::Forbidden
    );
    assert_eq!(
        h.store
            .record(rec(&k, Some(&token), capture("x"), LONG))
            .await
            .unwrap(),
        RecordOutcome::Forbidden
    );
    let (again, _) = lease(&*h.store, alloc(&k, None, LONG)).await;
    assert_ne!(again, token);
    // Without a token: any live allocation (the record rule).
    assert_eq!(
        h.store.release(rel(&k, None)).await.unwrap(),
        ReleaseOutcome::Released
    );
    lease(&*h.store, alloc(&k, None, LONG)).await;
}

pub async fn release_is_forbidden_unless_held(h: &Harness) {
    let k = key(h, "unheld");
    assert_eq!(
        h.store.release(rel(&k, None)).await.unwrap(),
        ReleaseOutcome::Forbidden
    );
    let (token, _) = lease(&*h.store, alloc(&k, None, LONG)).await;
    assert_eq!(
        h.store.release(rel(&k, Some("other"))).await.unwrap(),
        ReleaseOutcome::Forbidden
    );
    h.store
        .record(rec(&k, Some(&token), capture("done"), LONG))
        .await
        .unwrap();
    for token in [Some(token.as_str()), None] {
        assert_eq!(
            h.store.release(rel(&k, token)).await.unwrap(),
            ReleaseOutcome::Forbidden
        );
    }
    assert_eq!(
        h.store.allocate(alloc(&k, None, LONG)).await.unwrap(),
        AllocateOutcome::Completed(capture("done"))
    );
}

pub async fn fingerprint_mismatch_while_allocated(h: &Harness) {
    let k = key(h, "fp-allocated");
    let (_, expires) = lease(&*h.store, alloc(&k, Some("digest-a"), LONG)).await;
    assert_eq!(
        h.store
            .allocate(alloc(&k, Some("digest-b"), LONG))
            .await
            .unwrap(),
        AllocateOutcome::FingerprintMismatch
    );
    assert_eq!(
        h.store
            .allocate(alloc(&k, Some("digest-a"), LONG))
            .await
            .unwrap(),
        AllocateOutcome::InFlight {
            lease_expires_at: expires
        }
    );
}

pub async fn fingerprint_mismatch_when_completed(h: &Harness) {
    let k = key(h, "fp-completed");
    let (token, _) = lease(&*h.store, alloc(&k, Some("digest-a"), LONG)).await;
    h.store
        .record(rec(&k, Some(&token), capture("fp"), LONG))
        .await
        .unwrap();
    assert_eq!(
        h.store
            .allocate(alloc(&k, Some("digest-b"), LONG))
            .await
            .unwrap(),
        AllocateOutcome::FingerprintMismatch
    );
    assert_eq!(
        h.store
            .allocate(alloc(&k, Some("digest-a"), LONG))
            .await
            .unwrap(),
        AllocateOutcome::Completed(capture("fp"))
    );
}

pub async fn fingerprints_compare_only_when_both_present(h: &Harness) {
    // Stored none: any presented fingerprint is in flight / replayed.
    let k = key(h, "fp-none");
    let (token, _) = lease(&*h.store, alloc(&k, None, LONG)).await;
    assert!(matches!(
        h.store
            .allocate(alloc(&k, Some("any"), LONG))
            .await
            .unwrap(),
        AllocateOutcome::InFlight { .. }
    ));
    h.store
        .record(rec(&k, Some(&token), capture("none"), LONG))
        .await
        .unwrap();
    assert_eq!(
        h.store
            .allocate(alloc(&k, Some("any"), LONG))
            .await
            .unwrap(),
        AllocateOutcome::Completed(capture("none"))
    );
    // Stored one, presented none or empty: no comparison.
    let k = key(h, "fp-some");
    lease(&*h.store, alloc(&k, Some("digest"), LONG)).await;
    for presented in [None, Some("")] {
        assert!(matches!(
            h.store.allocate(alloc(&k, presented, LONG)).await.unwrap(),
            AllocateOutcome::InFlight { .. }
        ));
    }
    // Stored empty is stored none.
    let k = key(h, "fp-empty");
    lease(&*h.store, alloc(&k, Some(""), LONG)).await;
    assert!(matches!(
        h.store
            .allocate(alloc(&k, Some("digest"), LONG))
            .await
            .unwrap(),
        AllocateOutcome::InFlight { .. }
    ));
}

pub async fn expired_lease_is_taken_over_with_another_fingerprint(h: &Harness) {
    let k = key(h, "fp-takeover");
    let (first, expires) = lease(&*h.store, alloc(&k, Some("digest-a"), SHORT)).await;
    // An expired lease is a free key: no comparison, and the new fingerprint is the one kept.
    until_past(h, expires).await;
    let (second, _, taken_over) = any_lease(&*h.store, alloc(&k, Some("digest-b"), LONG)).await;
    assert_ne!(second, first);
    assert!(taken_over || !h.keeps_expired_leases);
    assert_eq!(
        h.store
            .allocate(alloc(&k, Some("digest-a"), LONG))
            .await
            .unwrap(),
        AllocateOutcome::FingerprintMismatch
    );
}

pub async fn completed_capture_expires_after_retention(h: &Harness) {
    let k = key(h, "retention");
    let (token, _) = lease(&*h.store, alloc(&k, Some("digest-a"), LONG)).await;
    let RecordOutcome::Stored { expires_at } = h
        .store
        .record(rec(&k, Some(&token), capture("r"), SHORT))
        .await
        .unwrap()
    else {
        panic!("expected stored");
    };
    // Replayed until the retention's end, then free (fingerprint forgotten too).
    until_past(h, expires_at).await;
    lease(&*h.store, alloc(&k, Some("digest-b"), LONG)).await;
}

pub async fn purge_never_changes_an_answer(h: &Harness) {
    let k = key(h, "purged");
    let (token, expires) = lease(&*h.store, alloc(&k, None, SHORT)).await;
    let done = key(h, "purged-done");
    let (done_token, _) = lease(&*h.store, alloc(&done, None, LONG)).await;
    h.store
        .record(rec(&done, Some(&done_token), capture("kept"), LONG))
        .await
        .unwrap();
    until_past(h, expires).await;
    while h.store.purge_expired(1000).await.unwrap() >= 1000 {}
    assert_eq!(
        h.store
            .record(rec(&k, Some(&token), capture("x"), LONG))
            .await
            .unwrap(),
        RecordOutcome::Forbidden
    );
    // Taken over (the purge keeps an expired lease for the takeover window).
    let (_, _, taken_over) = any_lease(&*h.store, alloc(&k, None, LONG)).await;
    assert!(taken_over || !h.keeps_expired_leases);
    // A live entry survives the purge.
    assert_eq!(
        h.store.allocate(alloc(&done, None, LONG)).await.unwrap(),
        AllocateOutcome::Completed(capture("kept"))
    );
}

pub async fn keys_are_independent(h: &Harness) {
    let a = key(h, "indep-a");
    let b = key(h, "indep-b");
    let (token, _) = lease(&*h.store, alloc(&a, Some("x"), LONG)).await;
    lease(&*h.store, alloc(&b, Some("y"), LONG)).await;
    h.store
        .record(rec(&a, Some(&token), capture("a"), LONG))
        .await
        .unwrap();
    assert!(matches!(
        h.store.allocate(alloc(&b, Some("y"), LONG)).await.unwrap(),
        AllocateOutcome::InFlight { .. }
    ));
    assert_eq!(
        h.store
            .record(rec(&b, Some(&token), capture("b"), LONG))
            .await
            .unwrap(),
        RecordOutcome::Forbidden
    );
}

/// Run `per_key` allocations of each key, all at once; returns how many leases each key gave.
async fn race(store: &Arc<dyn Store>, keys: &[String], per_key: usize) -> HashMap<String, usize> {
    let mut tasks = tokio::task::JoinSet::new();
    for k in keys {
        for _ in 0..per_key {
            let store = store.clone();
            let k = k.clone();
            tasks.spawn(async move {
                let outcome = store.allocate(alloc(&k, None, LONG)).await.unwrap();
                (k, outcome)
            });
        }
    }
    let mut leases: HashMap<String, usize> = keys.iter().map(|k| (k.clone(), 0)).collect();
    while let Some(joined) = tasks.join_next().await {
        let (k, outcome) = joined.unwrap();
        match outcome {
            AllocateOutcome::Allocated { .. } => *leases.get_mut(&k).unwrap() += 1,
            AllocateOutcome::InFlight { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    leases
}

pub async fn concurrent_allocations_of_one_key_give_one_lease(h: &Harness) {
    let k = key(h, "race-one");
    let leases = race(&h.store, std::slice::from_ref(&k), 64).await;
    assert_eq!(
        leases[&k], 1,
        "64 concurrent allocations, exactly one lease"
    );
}

pub async fn concurrent_allocations_over_a_thousand_keys(h: &Harness) {
    let keys: Vec<String> = (0..1000).map(|i| key(h, &format!("race-{i}"))).collect();
    let leases = race(&h.store, &keys, 4).await;
    let wrong: Vec<_> = leases.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        wrong.is_empty(),
        "keys without exactly one lease: {wrong:?}"
    );
}

pub async fn concurrent_takeovers_give_one_lease(h: &Harness) {
    let k = key(h, "race-takeover");
    let (_, expires) = lease(&*h.store, alloc(&k, None, SHORT)).await;
    until_past(h, expires).await;
    let leases = race(&h.store, std::slice::from_ref(&k), 32).await;
    assert_eq!(leases[&k], 1, "one takeover of an expired lease");
}

pub async fn concurrent_records_store_once(h: &Harness) {
    let k = key(h, "race-record");
    let (token, _) = lease(&*h.store, alloc(&k, None, LONG)).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..16 {
        let store = h.store.clone();
        let (k, token) = (k.clone(), token.clone());
        tasks.spawn(async move {
            let token = (i % 2 == 0).then_some(token);
            let outcome = store
                .record(rec(&k, token.as_deref(), capture(&format!("r{i}")), LONG))
                .await
                .unwrap();
            (i, outcome)
        });
    }
    let mut winners = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (i, outcome) = joined.unwrap();
        if matches!(outcome, RecordOutcome::Stored { .. }) {
            winners.push(i);
        }
    }
    assert_eq!(winners.len(), 1, "exactly one record wins: {winners:?}");
    assert_eq!(
        h.store.allocate(alloc(&k, None, LONG)).await.unwrap(),
        AllocateOutcome::Completed(capture(&format!("r{}", winners[0])))
    );
}

/// A batch: every item gets what its single call would have got, applied in order (a later
/// item sees what an earlier one of the same batch did), and each change lasts.
pub async fn batch_answers_each_item_as_its_single_call(h: &Harness) {
    let [done, other, freed, never] =
        ["b-done", "b-other", "b-freed", "b-never"].map(|n| key(h, n));
    let (done_token, _) = lease(&*h.store, alloc(&done, None, LONG)).await;
    let (other_token, _) = lease(&*h.store, alloc(&other, None, LONG)).await;
    let (freed_token, _) = lease(&*h.store, alloc(&freed, None, LONG)).await;
    let results = h
        .store
        .batch(vec![
            BatchOp::Record(rec(&done, Some(&done_token), capture("done"), LONG)),
            BatchOp::Record(rec(&other, Some("another-token"), capture("x"), LONG)),
            BatchOp::Release(rel(&freed, Some(&freed_token))),
            BatchOp::Record(rec(&never, None, capture("never"), LONG)),
            // The same key again, after the record above in this very batch.
            BatchOp::Record(rec(&done, Some(&done_token), capture("again"), LONG)),
            BatchOp::Release(rel(&done, Some(&done_token))),
            BatchOp::Release(rel(&other, Some(&other_token))),
        ])
        .await;
    let outcomes: Vec<BatchOutcome> = results
        .into_iter()
        .map(|r| r.expect("every item is answered"))
        .collect();
    assert_eq!(outcomes.len(), 7);
    assert!(
        matches!(
            outcomes[0],
            BatchOutcome::Record(RecordOutcome::Stored { .. })
        ),
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes[1..],
        [
            BatchOutcome::Record(RecordOutcome::Forbidden),
            BatchOutcome::Release(ReleaseOutcome::Released),
            BatchOutcome::Record(RecordOutcome::Forbidden),
            BatchOutcome::Record(RecordOutcome::Forbidden),
            BatchOutcome::Release(ReleaseOutcome::Forbidden),
            BatchOutcome::Release(ReleaseOutcome::Released),
        ]
    );
    assert_eq!(
        h.store.allocate(alloc(&done, None, LONG)).await.unwrap(),
        AllocateOutcome::Completed(capture("done")),
        "the first record of the batch is stored, not the second"
    );
    for free in [&other, &freed, &never] {
        let (token, _) = lease(&*h.store, alloc(free, None, LONG)).await;
        assert!(!token.is_empty(), "{free} is free after the batch");
    }
    assert!(h.store.batch(Vec::new()).await.is_empty());
}

/// A batch as large as the filter's queue sends: all of it applied, each item its own answer.
pub async fn batch_of_many_items_applies_them_all(h: &Harness) {
    let keys: Vec<String> = (0..300).map(|i| key(h, &format!("b-many-{i}"))).collect();
    let mut operations = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let (token, _) = lease(&*h.store, alloc(k, None, LONG)).await;
        operations.push(if i % 3 == 0 {
            BatchOp::Release(rel(k, Some(&token)))
        } else {
            BatchOp::Record(rec(k, Some(&token), capture(k), LONG))
        });
    }
    let results = h.store.batch(operations).await;
    assert_eq!(results.len(), keys.len());
    for (i, (k, result)) in keys.iter().zip(results).enumerate() {
        let outcome = result.expect("answered");
        if i % 3 == 0 {
            assert_eq!(
                outcome,
                BatchOutcome::Release(ReleaseOutcome::Released),
                "{k}"
            );
            assert!(matches!(
                h.store.allocate(alloc(k, None, LONG)).await.unwrap(),
                AllocateOutcome::Allocated { .. }
            ));
        } else {
            assert!(
                matches!(outcome, BatchOutcome::Record(RecordOutcome::Stored { .. })),
                "{k}: {outcome:?}"
            );
            assert_eq!(
                h.store.allocate(alloc(k, None, LONG)).await.unwrap(),
                AllocateOutcome::Completed(capture(k))
            );
        }
    }
}

/// A batch item is atomic like its single call: racing single records and batches of the same
/// key, exactly one stores.
pub async fn concurrent_batches_and_records_store_once(h: &Harness) {
    let k = key(h, "race-batch");
    let (token, _) = lease(&*h.store, alloc(&k, None, LONG)).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..16 {
        let store = h.store.clone();
        let (k, token) = (k.clone(), token.clone());
        tasks.spawn(async move {
            let record = rec(&k, Some(&token), capture(&format!("r{i}")), LONG);
            let stored = if i % 2 == 0 {
                let outcome = store.batch(vec![BatchOp::Record(record)]).await;
                matches!(
                    outcome.as_slice(),
                    [Ok(BatchOutcome::Record(RecordOutcome::Stored { .. }))]
                )
            } else {
                matches!(
                    store.record(record).await.unwrap(),
                    RecordOutcome::Stored { .. }
                )
            };
            (i, stored)
        });
    }
    let mut winners = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (i, stored) = joined.unwrap();
        if stored {
            winners.push(i);
        }
    }
    assert_eq!(winners.len(), 1, "exactly one record wins: {winners:?}");
    assert_eq!(
        h.store.allocate(alloc(&k, None, LONG)).await.unwrap(),
        AllocateOutcome::Completed(capture(&format!("r{}", winners[0])))
    );
}

pub async fn ready_answers(h: &Harness) {
    h.store.ready().await.expect("a fresh store is ready");
}
