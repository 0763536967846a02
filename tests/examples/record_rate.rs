//! The record rate one Kong worker holds: how fast the filter's deferred queue gets records
//! to the backend, now that it sends one batch call per tick (HOSTS.md, "Three bugs of
//! ngx_wasm_module"; README, `queue.*`).
//!
//! ```sh
//! cargo run --release -p idempotency-tests --example record_rate
//! ```
//!
//! The product filter in the test host's ngx mode, the real backend in-process (embedded
//! store in a temporary directory), the counting upstream, and a clock that moves one tick
//! (`tick_ms`, 20 ms by default) every 20 ms of real time, as a real worker's timer does. Two
//! runs:
//! - drain: `--backlog` responses end while the clock stands still (their records queue up,
//!   `queue.max_entries` raised to hold them all); then the clock runs and the time until the
//!   last record is stored gives the records per second the queue sends;
//! - sustained: keyed requests at `--rate` per second for `--seconds`, with the default
//!   queue bounds, while the clock runs: records per second stored, and the drops (none is
//!   the goal).
//!
//! A record costs the worker a request first (allocation, upstream, response), so the
//! sustained run is bounded by how many requests this machine pushes through one host; the
//! drain run measures the queue alone.

#[path = "../tests/filter/support.rs"]
#[allow(unused_macros, unused_imports)]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap_free::Args;
use idempotency_tests::{Mode, Reply};
use serde_json::json;
use support::{E2e, metric};

/// The command line, read by hand (the tests crate has no argument parser).
mod clap_free {
    pub struct Args {
        pub backlog: usize,
        pub rate: usize,
        pub seconds: u64,
        pub tick_ms: u64,
    }

    impl Args {
        pub fn parse() -> Args {
            let mut a = Args {
                backlog: 20_000,
                rate: 5_000,
                seconds: 5,
                tick_ms: 20,
            };
            let argv: Vec<String> = std::env::args().skip(1).collect();
            for pair in argv.chunks(2) {
                let value = pair.get(1).and_then(|v| v.parse().ok());
                match (pair[0].as_str(), value) {
                    ("--backlog", Some(v)) => a.backlog = v as usize,
                    ("--rate", Some(v)) => a.rate = v as usize,
                    ("--seconds", Some(v)) => a.seconds = v,
                    ("--tick-ms", Some(v)) => a.tick_ms = v,
                    (flag, _) => panic!(
                        "unknown or incomplete option {flag}: --backlog N --rate N --seconds N --tick-ms N"
                    ),
                }
            }
            a
        }
    }
}

/// Moves the host's clock one tick per tick of real time until `stop`.
async fn run_clock(t: &E2e, stop: &AtomicBool) {
    let mut clock = tokio::time::interval(t.tick);
    while !stop.load(Ordering::SeqCst) {
        clock.tick().await;
        t.host().advance(t.tick).await;
    }
}

/// Sends `n` keyed requests, `at_once` at a time, and waits for their answers.
async fn requests(t: &E2e, prefix: &str, n: usize, at_once: usize) {
    let permits = Arc::new(tokio::sync::Semaphore::new(at_once));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let r = t.post("/orders", Some(&format!("\"{prefix}-{i}\"")), "{}");
        let permit = permits.clone().acquire_owned().await.unwrap();
        tasks.spawn(async move {
            let answer = r.send().await.expect("an answer");
            drop(permit);
            assert_eq!(answer.status, 201);
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

async fn drain(args: &Args) {
    let t = E2e::start(
        Mode::Ngx,
        json!({"tick_ms": args.tick_ms, "queue": {"max_entries": args.backlog.max(1000)}}),
    )
    .await;
    t.api.reply("/orders", Reply::new(201).body("created"));
    // The clock stands still: every record stays queued.
    requests(&t, "drain", args.backlog, 64).await;
    t.host().settle().await;
    assert_eq!(t.metric(metric::RECORDED), 0);
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let target = args.backlog as i64;
    let waiting = async {
        while t.metric(metric::RECORDED) < target {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        stop.store(true, Ordering::SeqCst);
    };
    tokio::join!(waiting, run_clock(&t, &stop));
    let seconds = started.elapsed().as_secs_f64();
    let ticks = (seconds * 1000.0 / args.tick_ms as f64).round();
    println!(
        "drain      {:>6} queued records stored in {seconds:6.3} s ({ticks:.0} ticks of {} ms) = {:>7.0} records/s",
        args.backlog,
        args.tick_ms,
        args.backlog as f64 / seconds
    );
    assert_eq!(t.metric(metric::QUEUE_DROPPED), 0);
    t.finish().await;
}

async fn sustained(args: &Args) {
    let t = E2e::start(Mode::Ngx, json!({"tick_ms": args.tick_ms})).await;
    t.api.reply("/orders", Reply::new(201).body("created"));
    let stop = AtomicBool::new(false);
    let total = args.rate * args.seconds as usize;
    let started = Instant::now();
    let load = async {
        // Paced: one slice of requests per millisecond, up to the rate.
        let per_ms = (args.rate as f64 / 1000.0).max(0.001);
        let permits = Arc::new(tokio::sync::Semaphore::new(256));
        let mut tasks = tokio::task::JoinSet::new();
        let mut sent = 0usize;
        let mut pace = tokio::time::interval(Duration::from_millis(1));
        while sent < total {
            pace.tick().await;
            let due = ((started.elapsed().as_secs_f64() * 1000.0 * per_ms) as usize).min(total);
            while sent < due {
                let r = t.post("/orders", Some(&format!("\"sustained-{sent}\"")), "{}");
                let permit = permits.clone().acquire_owned().await.unwrap();
                tasks.spawn(async move {
                    let answer = r.send().await.expect("an answer");
                    drop(permit);
                    assert_eq!(answer.status, 201);
                });
                sent += 1;
            }
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        let sending = started.elapsed().as_secs_f64();
        // The last records.
        while t.metric(metric::RECORDED) + t.metric(metric::QUEUE_DROPPED) < total as i64 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        stop.store(true, Ordering::SeqCst);
        sending
    };
    let (sending, ()) = tokio::join!(load, run_clock(&t, &stop));
    let seconds = started.elapsed().as_secs_f64();
    let recorded = t.metric(metric::RECORDED);
    println!(
        "sustained  {total:>6} requests sent in {sending:6.3} s = {:>7.0} requests/s; {recorded} records stored in {seconds:6.3} s = {:>7.0} records/s; {} dropped",
        total as f64 / sending,
        recorded as f64 / seconds,
        t.metric(metric::QUEUE_DROPPED)
    );
    t.finish().await;
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    drain(&args).await;
    sustained(&args).await;
}
