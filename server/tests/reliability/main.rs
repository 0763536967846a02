//! Reliability of the whole path (issue 12): the product filter in the test host, the real
//! backend, the counting upstream, under load and under faults. Every run is seeded (see
//! [`harness::seed`]), loopback only, and bounded in time; RELIABILITY.md lists what each
//! test tried and what held, and how to run the longer versions.
//!
//! - [`exactly_once`]: 2,000 keys × 16 copies in both host modes, on the embedded store and
//!   on Redis, with `conflict: wait`, and with two backends on one Redis taking turns.
//! - [`crashes`]: the backend SIGKILLed under that load and restarted on its data; the
//!   gateway's instance reset with records queued.
//! - [`faults`]: the backend down, silent, answering garbage, 500, not an answer, a
//!   truncated body or closing mid-answer, on the allocation and on the record.
//! - [`store_faults`]: Redis restarted under load and paused beyond the store time-out; the
//!   embedded store on a full disk and on a disk that turns read-only.
//! - [`security`]: two tenants sending the same keys, in both orders and at once.

#[path = "../common/mod.rs"]
mod common;
mod harness;

mod crashes;
mod exactly_once;
mod faults;
mod security;
mod store_faults;

/// Runs an `async fn(Mode)` as one test per host mode: `<name>::ngx` and `<name>::envoy`.
#[macro_export]
macro_rules! both_modes {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn ngx() {
                $crate::bounded(super::$name(idempotency_tests::Mode::Ngx)).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn envoy() {
                $crate::bounded(super::$name(idempotency_tests::Mode::Envoy)).await
            }
        }
    )*};
}

/// One test at a time: each loads both cores on its own, and two at once would make each
/// other's time-outs fire (what a test then reports is the machine, not the code).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A test fails instead of hanging: none takes more than ten minutes at the CI size, even on a
/// slow machine (a longer run, `RELIABILITY_KEYS` above 2,000, gets proportionally longer).
pub async fn bounded(test: impl std::future::Future<Output = ()>) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let minutes = 10 * harness::keys().div_ceil(2000).max(1) as u64;
    if tokio::time::timeout(std::time::Duration::from_secs(60 * minutes), test)
        .await
        .is_err()
    {
        panic!("the test did not finish within {minutes} minutes");
    }
}
