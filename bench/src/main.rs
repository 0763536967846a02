//! The performance suite (README, Performance): every figure against a bare baseline measured
//! in the same run, medians of several runs, written to `BENCHMARKS.md` with a PNG plot and a
//! flame graph (SVG) of the filter's fuel.
//!
//! ```sh
//! scripts/bench            # installs what is missing, builds, runs everything (~12 min)
//! ```
//!
//! Parts, in order: the backend under wrk against bare axum (embedded store, Redis with
//! `appendfsync always` and `everysec`); the disk and memory of 100,000 stored captures; the
//! embedded store alone as concurrency grows, against the disk's raw sync rate; the filter in
//! the test host against a no-op filter (fuel, memory per request in flight, whole-path
//! latency). Bounded: every run has a fixed duration or count, and everything talks to
//! loopback only. Beside the suite: `path` (the whole path alone, to profile) and `ab` (two
//! builds of the backend compared, to measure a change).

mod backend;
mod baseline;
mod filter;
mod report;
mod store;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use idempotency_tests::Mode;

#[derive(Parser)]
enum Cmd {
    /// Run the suite and write the report.
    Run(Args),
    /// The bare baseline server (started by `run`): answers the three files' bytes.
    Baseline {
        #[arg(long)]
        listen: SocketAddr,
        allocated: PathBuf,
        recorded: PathBuf,
        replay: PathBuf,
    },
    /// The whole path only (filter against the no-op filter, each of `PATHS`), printed and
    /// not written: the part to run under a profiler.
    Path {
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        #[arg(long, default_value_os_t = std::env::temp_dir())]
        dir: PathBuf,
    },
    /// Two builds of the backend compared (a change measured, not a goal): each on the
    /// embedded store, under `wrk -t1 -c32` in turn, with keep-alive (or `--new-connection`);
    /// the medians of their requests per second and of their CPU time per request (user and
    /// system, from `/proc/<pid>/stat`).
    Ab {
        #[arg(long, default_value_t = 8)]
        runs: usize,
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        #[arg(long, default_value_os_t = std::env::temp_dir())]
        dir: PathBuf,
        /// The size of the replayed captures' body: `x` repeated, which is canonical base64
        /// (what the filter records) when a multiple of 4.
        #[arg(long, default_value_t = backend::BODY_BYTES)]
        body_bytes: usize,
        /// A new connection per request (`Connection: close`), as ngx_wasm_module makes its
        /// calls, instead of keep-alive.
        #[arg(long)]
        new_connection: bool,
        /// Allocations of fresh keys, or replays of 1,000 recorded keys.
        #[arg(value_enum)]
        scenario: Compared,
        /// The build measured first in each turn: a binary taking `--listen` and
        /// `--data-dir`, or a wrapper script that sets environment variables first.
        a: PathBuf,
        /// The other build.
        b: PathBuf,
    },
}

/// What `ab` runs.
#[derive(Clone, Copy, clap::ValueEnum)]
enum Compared {
    Allocate,
    Replay,
}

#[derive(Parser, Clone)]
pub struct Args {
    /// Runs of each measurement (the report gives their medians).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Seconds of each wrk run.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Connections of each wrk run.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Captures stored for the disk figure.
    #[arg(long, default_value_t = 100_000)]
    captures: usize,
    /// Where the report goes (the plot goes next to it, `<stem>-store.png`).
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// The command line the report names.
    #[arg(long, default_value = "scripts/bench")]
    command: String,
    /// The font of the plot's labels (Debian's fonts-dejavu-core).
    #[arg(
        long,
        default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    )]
    font: PathBuf,
    /// Where data dirs and Redis files go (the disk under test).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
}

/// One backend figure: the medians of a server's runs in one scenario and load.
pub struct Figure {
    pub scenario: backend::Scenario,
    pub load: &'static str,
    pub server: &'static str,
    pub run: backend::Run,
}

pub fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

fn main() -> anyhow::Result<()> {
    match Cmd::parse() {
        Cmd::Baseline {
            listen,
            allocated,
            recorded,
            replay,
        } => baseline::run(listen, [allocated, recorded, replay]),
        Cmd::Run(args) => runtime()?.block_on(run(args)),
        Cmd::Path { runs, seconds, dir } => runtime()?.block_on(path(runs, seconds, dir)),
        Cmd::Ab {
            runs,
            seconds,
            dir,
            body_bytes,
            new_connection,
            scenario,
            a,
            b,
        } => runtime()?.block_on(ab(
            runs,
            seconds,
            dir,
            body_bytes,
            new_connection,
            scenario,
            [a, b],
        )),
    }
}

/// The first keyed requests drawn in the fuel's flame graph: several, so that work done once
/// for all of them (the deferred queue's buffer growing) is a sliver of it.
const FLAME_REQUESTS: u32 = 20;

/// The whole paths measured: each host mode with its `record` setting. Kong can only defer
/// (no dispatch from response phases); Envoy defers too when told, and holds the end of the
/// response until the capture is stored by default (`auto`: inline), which the goal's path (a
/// deferred record) is not, so both are reported.
const PATHS: [(Mode, &str); 3] = [
    (Mode::Ngx, "deferred"),
    (Mode::Envoy, "deferred"),
    (Mode::Envoy, "inline"),
];

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

async fn path(runs: usize, seconds: f64, dir: PathBuf) -> anyhow::Result<()> {
    let wasm = filter::wasm();
    let backend = backend::embedded(&dir).await?;
    for (mode, record) in PATHS {
        let l = filter::latency(mode, record, &wasm, backend.addr, runs, seconds).await?;
        println!(
            "{} (record: {}): maximum {:.0} req/s, at {:.0} req/s: filter p50/p99 {:.2}/{:.2} ms, no-op {:.2}/{:.2} ms",
            l.mode,
            l.record,
            l.max_rps,
            l.rate,
            l.filter.0 / 1e3,
            l.filter.1 / 1e3,
            l.noop.0 / 1e3,
            l.noop.1 / 1e3
        );
    }
    Ok(())
}

/// A file written next to the report: `BENCHMARKS.md` → `BENCHMARKS-<suffix>`.
fn beside(report: &std::path::Path, suffix: &str) -> PathBuf {
    let stem = report
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("BENCHMARKS");
    report.with_file_name(format!("{stem}-{suffix}"))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let font: &'static [u8] = Box::leak(
        std::fs::read(&args.font)
            .map_err(|e| {
                anyhow::anyhow!(
                    "{}: {e} (apt-get install -y fonts-dejavu-core, or --font)",
                    args.font.display()
                )
            })?
            .into_boxed_slice(),
    );
    let dir = args.dir.clone();

    eprintln!("backend: wrk -t1 -c{} against bare axum", args.connections);
    let replay_prefix = format!("replay{}", std::process::id());
    let replay_keys = 1000;
    let mut servers = vec![
        backend::embedded(&dir).await?,
        backend::redis(&dir, "always").await?,
        backend::redis(&dir, "everysec").await?,
    ];
    let mut answers = None;
    for server in &servers {
        answers = Some(
            backend::seed(
                server.addr,
                &replay_prefix,
                replay_keys,
                backend::BODY_BYTES,
            )
            .await?,
        );
    }
    let answers = answers.expect("servers were seeded");
    servers.push(backend::baseline(&dir, answers).await?);
    let wrk = backend::Wrk::new(args.seconds, args.connections)?;
    let figures = backend::suite(&servers, &wrk, args.runs, &replay_prefix, replay_keys).await?;
    drop(servers);

    eprintln!("disk: {} captures of a 1 KiB body", args.captures);
    let disk = backend::disk(&dir, args.captures).await?;

    eprintln!("embedded store alone: concurrency 1 to 256");
    let sweep = store::sweep(&dir, args.runs, 1.0).await?;
    let plot = beside(&args.out, "store.png");
    store::plot(&sweep, &plot, font)?;

    eprintln!("filter: building idempotency.wasm and the no-op filter");
    let wasm = filter::wasm();
    let backend = backend::embedded(&dir).await?;
    let mut fuel = Vec::new();
    let mut memory = Vec::new();
    let mut latency = Vec::new();
    for mode in [Mode::Ngx, Mode::Envoy] {
        for size in [1024, 64 * 1024] {
            fuel.push(
                idempotency_tests::measure::fuel(
                    mode,
                    size,
                    &wasm.filter,
                    &wasm.noop,
                    backend.addr,
                )
                .await?,
            );
        }
        memory.push(filter::memory(mode, &wasm, backend.addr, args.runs).await?);
    }
    eprintln!("  where a keyed request's fuel goes: a flame graph");
    let flame = beside(&args.out, "fuel.svg");
    std::fs::write(&flame, filter::flame(backend.addr, FLAME_REQUESTS).await?)?;
    for (mode, record) in PATHS {
        eprintln!("  whole path, {mode}, record: {record}");
        latency.push(
            filter::latency(
                mode,
                record,
                &wasm,
                backend.addr,
                args.runs,
                args.seconds as f64,
            )
            .await?,
        );
    }
    drop(backend);

    let report = report::Report {
        args: &args,
        figures: &figures,
        disk: &disk,
        sweep: &sweep,
        plot: &plot,
        flame: &flame,
        fuel: &fuel,
        memory: &memory,
        latency: &latency,
        minutes: started.elapsed().as_secs_f64() / 60.0,
    };
    std::fs::write(&args.out, report.render())?;
    eprintln!(
        "wrote {}, {} and {} in {:.1} min",
        args.out.display(),
        plot.display(),
        flame.display(),
        started.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}

/// Alternating runs of `scenario` against the two builds, a line per run, then the medians
/// and their ratios (B over A). CPU time per request is the steadier figure on a machine
/// whose disk moves the rate several-fold between runs.
async fn ab(
    runs: usize,
    seconds: u64,
    dir: PathBuf,
    body_bytes: usize,
    new_connection: bool,
    scenario: Compared,
    builds: [PathBuf; 2],
) -> anyhow::Result<()> {
    let servers = [
        backend::embedded_build(&dir, &builds[0], "A").await?,
        backend::embedded_build(&dir, &builds[1], "B").await?,
    ];
    let replay_prefix = format!("ab{}", std::process::id());
    let (scenario, keys) = match scenario {
        Compared::Allocate => (backend::Scenario::Allocate, 0),
        Compared::Replay => (backend::Scenario::Replay, 1000),
    };
    if keys > 0 {
        for server in &servers {
            backend::seed(server.addr, &replay_prefix, keys, body_bytes).await?;
        }
    }
    let wrk = backend::Wrk::new(seconds, 32)?;
    let mut rates = [Vec::new(), Vec::new()];
    let mut cpu = [Vec::new(), Vec::new()];
    for i in 1..=runs {
        let mut line = format!("run {i}:");
        for (s, server) in servers.iter().enumerate() {
            let prefix = match scenario {
                backend::Scenario::Replay => replay_prefix.clone(),
                _ => format!("{replay_prefix}x{i}{}", server.name),
            };
            let before = backend::cpu_seconds(server.pid())?;
            let run = wrk
                .run(server.addr, scenario, new_connection, &prefix, keys)
                .await?;
            let used = backend::cpu_seconds(server.pid())? - before;
            anyhow::ensure!(
                run.requests > 0 && run.errors == 0,
                "{} answered {} requests, {} errors",
                builds[s].display(),
                run.requests,
                run.errors
            );
            let us = used * 1e6 / run.requests as f64;
            line += &format!("   {} {:.0} req/s {us:.2} µs/req", server.name, run.rps);
            rates[s].push(run.rps);
            cpu[s].push(us);
        }
        println!("{line}");
    }
    let [ra, rb] = rates.map(median);
    let [ca, cb] = cpu.map(median);
    println!(
        "medians: A {ra:.0} req/s {ca:.2} µs/req; B {rb:.0} req/s {cb:.2} µs/req; \
         B/A {:.3} in req/s, {:.3} in CPU per request",
        rb / ra,
        cb / ca
    );
    Ok(())
}
