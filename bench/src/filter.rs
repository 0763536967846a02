//! The filter in the test host (`idempotency-tests`, through its public API only), against a
//! no-op proxy-wasm filter (`tests/noop`) in the same host: what a request costs in memory
//! while it is in flight and in latency on the whole path (filter, allocation in the real
//! backend, upstream, record), per host mode, and where its Wasm instructions go. Its fuel
//! per request is measured by `idempotency_tests::measure`, which the fuel example shares.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use idempotency_tests::measure::{TICK, gateway, post, request, upstream_count};
use idempotency_tests::{Host, Mode, Reply, Upstream, build};

use crate::median;

pub struct Wasm {
    pub filter: PathBuf,
    pub noop: PathBuf,
}

pub fn wasm() -> Wasm {
    Wasm {
        filter: build::wasm("idempotency"),
        noop: build::wasm("noop-filter"),
    }
}

/// The resident memory of this process.
fn rss() -> anyhow::Result<u64> {
    crate::backend::rss(std::process::id())
}

/// Memory per request in flight (held in the upstream, after its allocation), in bytes, with
/// `n` such requests through `module`: how much this process's RSS grows (the host's
/// connections and tasks included), and how much the Wasm instance's linear memory does.
async fn in_flight_memory(
    mode: Mode,
    module: &Path,
    backend: SocketAddr,
    n: usize,
) -> anyhow::Result<(f64, f64)> {
    let api = Upstream::start().await;
    api.reply("/orders", Reply::new(201).body(vec![b'r'; 1024]));
    let h = gateway(mode, module, &api, backend, "auto").await?;
    let body = vec![b'q'; 1024];
    let tag = format!(
        "mem-{}-{}-{}",
        mode.name(),
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    );
    // Warm: one request through, so that lazily made state exists before the measurement.
    post(&h, Some(&format!("{tag}-warm")), &body).await?;
    h.advance(TICK).await;
    h.settle().await;
    let before = rss()?;
    let wasm_before = h.wasm_memory().await.context("no Wasm instance")?;
    api.hold("/orders");
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..n {
        let request = request(&h, Some(&format!("{tag}-{i}")), &body);
        clients.spawn(async move { request.send().await });
    }
    upstream_count(&api, n + 1).await?;
    let during = rss()?;
    let wasm_during = h.wasm_memory().await.context("no Wasm instance")?;
    api.release("/orders");
    while let Some(done) = clients.join_next().await {
        done??;
    }
    h.advance(TICK).await;
    h.finish().await;
    Ok((
        during.saturating_sub(before) as f64 / n as f64,
        wasm_during.saturating_sub(wasm_before) as f64 / n as f64,
    ))
}

/// Requests held in flight for the memory figure.
pub const IN_FLIGHT: usize = 512;

/// Per request held in flight: the growth of the host process's RSS, and of the Wasm
/// instance's linear memory (the filter's own: deterministic, in 64 KiB pages).
pub struct Memory {
    pub mode: &'static str,
    pub filter_rss: f64,
    pub noop_rss: f64,
    pub filter_wasm: f64,
    pub noop_wasm: f64,
}

pub async fn memory(
    mode: Mode,
    wasm: &Wasm,
    backend: SocketAddr,
    runs: usize,
) -> anyhow::Result<Memory> {
    // One round first that is not counted: the process's own pools (the allocator's arenas,
    // tokio's) grow once and are reused after, while each host's Wasm memory is new.
    in_flight_memory(mode, &wasm.filter, backend, IN_FLIGHT).await?;
    let (mut filter_rss, mut noop_rss) = (Vec::new(), Vec::new());
    let (mut filter_wasm, mut noop_wasm) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (rss, wasm_memory) = in_flight_memory(mode, &wasm.noop, backend, IN_FLIGHT).await?;
        noop_rss.push(rss);
        noop_wasm.push(wasm_memory);
        let (rss, wasm_memory) = in_flight_memory(mode, &wasm.filter, backend, IN_FLIGHT).await?;
        filter_rss.push(rss);
        filter_wasm.push(wasm_memory);
    }
    Ok(Memory {
        mode: mode.name(),
        filter_rss: median(filter_rss),
        noop_rss: median(noop_rss),
        filter_wasm: median(filter_wasm),
        noop_wasm: median(noop_wasm),
    })
}

/// Percentile `p` (0..100) of sorted latencies, in microseconds.
fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1e6
}

/// Keeps the host's virtual clock moving with real time (the deferred queue is sent from the
/// tick), until stopped.
struct Clock(tokio::task::JoinHandle<()>);

impl Clock {
    fn start(host: Arc<Host>) -> Clock {
        Clock(tokio::spawn(async move {
            let mut every = tokio::time::interval(TICK);
            loop {
                every.tick().await;
                host.advance(TICK).await;
            }
        }))
    }

    async fn stop(self) {
        self.0.abort();
        let _ = self.0.await;
    }
}

const LATENCY_BODY: &[u8] =
    br#"{"order":{"sku":"A-1234","quantity":2,"note":"leave at the door"}}"#;

/// The most requests per second the host serves through `module`, `concurrency` clients in a
/// closed loop for `seconds`.
async fn max_load(
    host: &Arc<Host>,
    tag: &str,
    concurrency: usize,
    seconds: f64,
) -> anyhow::Result<f64> {
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..concurrency {
        let host = host.clone();
        let tag = tag.to_owned();
        clients.spawn(async move {
            let mut n = 0u64;
            while Instant::now() < until {
                let status = post(&host, Some(&format!("{tag}-{c}-{n}")), LATENCY_BODY).await?;
                anyhow::ensure!(status == 201, "status {status}");
                n += 1;
            }
            anyhow::Ok(n)
        });
    }
    let mut total = 0;
    while let Some(done) = clients.join_next().await {
        total += done??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// Latencies at a fixed rate (an open loop: each request is sent on its schedule whatever the
/// others do, and its latency counts from its scheduled time).
async fn at_rate(
    host: &Arc<Host>,
    tag: &str,
    rate: f64,
    seconds: f64,
) -> anyhow::Result<(f64, f64)> {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let count = (rate * seconds) as u64;
    let start = tokio::time::Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for n in 0..count {
        let due = start + interval * n as u32;
        tokio::time::sleep_until(due).await;
        let host = host.clone();
        let key = format!("{tag}-{n}");
        clients.spawn(async move {
            let status = post(&host, Some(&key), LATENCY_BODY).await?;
            anyhow::ensure!(status == 201, "status {status}");
            anyhow::Ok(due.elapsed())
        });
    }
    let mut latencies = Vec::new();
    while let Some(done) = clients.join_next().await {
        latencies.push(done??);
    }
    latencies.sort();
    Ok((percentile(&latencies, 50.0), percentile(&latencies, 99.0)))
}

pub struct Latency {
    pub mode: &'static str,
    /// The filter's `record` setting: `deferred` (queued, sent from the tick) or `inline`
    /// (the response's end waits for the stored capture).
    pub record: &'static str,
    pub max_rps: f64,
    pub rate: f64,
    pub filter: (f64, f64),
    pub noop: (f64, f64),
}

impl Latency {
    /// What the filter adds over the no-op filter: p50 and p99, in ms.
    pub fn added_ms(&self) -> (f64, f64) {
        (
            (self.filter.0 - self.noop.0) / 1000.0,
            (self.filter.1 - self.noop.1) / 1000.0,
        )
    }
}

/// The whole path at half of the filter's maximum load, filter (with `record` as its
/// `record` setting) against no-op, alternating, medians of `runs`.
pub async fn latency(
    mode: Mode,
    record: &'static str,
    wasm: &Wasm,
    backend: SocketAddr,
    runs: usize,
    seconds: f64,
) -> anyhow::Result<Latency> {
    let api = Upstream::start().await;
    api.reply(
        "/orders",
        Reply::new(201)
            .header("content-type", "application/json")
            .body(r#"{"id":42,"status":"accepted"}"#),
    );
    let filter = Arc::new(gateway(mode, &wasm.filter, &api, backend, record).await?);
    let noop = Arc::new(gateway(mode, &wasm.noop, &api, backend, "auto").await?);
    let clocks = [Clock::start(filter.clone()), Clock::start(noop.clone())];
    let tag = format!("lat-{}-{record}-{}", mode.name(), std::process::id());
    let max_rps = max_load(&filter, &format!("{tag}-max"), 16, seconds).await?;
    let rate = max_rps / 2.0;
    let (mut f50, mut f99, mut n50, mut n99) = (vec![], vec![], vec![], vec![]);
    for run in 0..runs {
        let (p50, p99) = at_rate(&noop, &format!("{tag}-n{run}"), rate, seconds).await?;
        n50.push(p50);
        n99.push(p99);
        let (p50, p99) = at_rate(&filter, &format!("{tag}-f{run}"), rate, seconds).await?;
        f50.push(p50);
        f99.push(p99);
    }
    for clock in clocks {
        clock.stop().await;
    }
    for h in [filter, noop] {
        let h = Arc::try_unwrap(h)
            .ok()
            .context("a clock still holds the host")?;
        h.settle().await;
        h.finish().await;
    }
    Ok(Latency {
        mode: mode.name(),
        record,
        max_rps,
        rate,
        filter: (median(f50), median(f99)),
        noop: (median(n50), median(n99)),
    })
}

/// Where the fixed part of a keyed request's fuel goes: a flame graph (SVG) of `n` first
/// keyed requests with empty bodies on Kong (their records, sent from the tick, included),
/// per function of the module (`idempotency_tests::measure::first_requests`).
pub async fn flame(backend: SocketAddr, n: u32) -> anyhow::Result<String> {
    let module = build::wasm_with_names("idempotency");
    let profile =
        idempotency_tests::measure::first_requests(Mode::Ngx, &module, backend, n, 0).await?;
    let title = format!(
        "idempotency.wasm on Kong (ngx): {n} first keyed requests with empty bodies, their records included"
    );
    Ok(idempotency_tests::flame::svg(
        &profile.folded,
        &title,
        "instructions",
    ))
}
