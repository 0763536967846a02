//! The backend from outside: the release binary on loopback under `wrk`, against the bare
//! baseline answering the same bytes, for each store.
//!
//! Why wrk: a load generator in C on epoll costs the shared cores little per request, so the
//! servers get most of them (client and server share this machine's two cores), and it is
//! what the issue's figures were taken with. Each scenario is a Lua script (below) that makes
//! every key fresh, or the one of a recorded capture; `Connection: close` makes wrk open a new
//! connection for every request, as ngx_wasm_module does for every call it dispatches.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use idempotency_tests::Client;

use crate::{Figure, median};

/// wrk's Lua. `init` takes the key prefix (fresh per run) and, for replays, how many keys were
/// recorded; `done` prints one line the suite reads.
const COMMON: &str = r#"
local prefix, keys, n = "", 0, 0
local json = {["Content-Type"] = "application/json"}
local replay = {["Content-Type"] = "application/json", ["X-Bench"] = "replay"}
local record = {["Content-Type"] = "application/json", ["X-Bench"] = "record"}
-- wrk.format(method, path, headers, body) sends `headers` instead of wrk.headers: the
-- command line's -H headers (Connection: close) are copied into each table here, or every
-- "new connection" run would have kept its connections alive.
function init(args)
  prefix = args[1]; keys = tonumber(args[2] or "0")
  for _, h in ipairs({json, replay, record}) do
    for name, value in pairs(wrk.headers) do
      if h[name] == nil then h[name] = value end
    end
  end
end
local function key(i) return string.format('%s-%09d', prefix, i) end
local function allocate(k, h) return wrk.format("PUT", "/api/v2/captures", h or json, '{"idempotency_key":"' .. k .. '"}') end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH %d %d %d %d %d %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"#;

/// Every request allocates a key never seen.
const ALLOCATE: &str = r#"
function request() n = n + 1; return allocate(key(n)) end
"#;

/// Replays of the recorded keys `0..keys`, in turn.
const REPLAY: &str = r#"
function request() n = n + 1; return allocate(key(n % keys), replay) end
"#;

/// Allocate, record, replay: request 3t allocates key t, 3t+1 records key t-256 and 3t+2
/// replays key t-512, long after their previous step was answered (at most 32 requests are
/// in flight). The record carries no lease token (the old clients' form; any live allocation
/// may be recorded). The first 512 steps allocate keys of their own.
const CYCLE: &str = r#"
local L = 256
function request()
  n = n + 1
  local t, step = math.floor(n / 3), n % 3
  if step == 1 and t > L then
    return wrk.format("POST", "/api/v2/captures", record,
      '{"idempotency_key":"' .. key(t - L) .. '","response":' .. CAPTURE .. '}')
  elseif step == 2 and t > 2 * L then
    return allocate(key(t - 2 * L), replay)
  elseif step == 0 then
    return allocate(key(t))
  end
  return allocate(key(n) .. "w")
end
"#;

/// The size of the body of [`capture`] in the suite.
pub const BODY_BYTES: usize = 512;

/// The capture the cycle and the replays record: a body of `body_bytes` and two headers.
pub fn capture(body_bytes: usize) -> serde_json::Value {
    serde_json::json!({
        "response_status": 201,
        "response_body": "x".repeat(body_bytes),
        "response_headers": [
            { "key": "Content-Type", "value": "application/json" },
            { "key": "Location", "value": "/orders/42" }
        ]
    })
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Scenario {
    Allocate,
    Cycle,
    Replay,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Allocate => "allocate (fresh keys)",
            Scenario::Cycle => "allocate, record, replay",
            Scenario::Replay => "replay only",
        }
    }

    fn script(self) -> String {
        let body = match self {
            Scenario::Allocate => ALLOCATE,
            Scenario::Replay => REPLAY,
            Scenario::Cycle => CYCLE,
        };
        let capture = format!("CAPTURE = [[{}]]\n", capture(BODY_BYTES));
        format!("{capture}{COMMON}{body}")
    }
}

/// One server under test.
pub struct Server {
    pub name: &'static str,
    pub addr: SocketAddr,
    child: Child,
    /// Its data dir (the embedded store), or Redis's.
    _dir: tempfile::TempDir,
    redis: Option<Child>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(redis) = &mut self.redis {
            let _ = redis.kill();
            let _ = redis.wait();
        }
    }
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

async fn wait_listening(addr: SocketAddr, child: &mut Child, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited: {status}");
        }
        if Instant::now() > deadline {
            bail!("{what} did not listen on {addr} within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The release binary next to this one (`cargo build --release` builds both).
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    anyhow::ensure!(
        path.exists(),
        "{} is missing: build it with `cargo build --release -p idempotency-server`",
        path.display()
    );
    Ok(path)
}

/// The backend on the embedded store (a temp dir on the same disk as the data would be).
pub async fn embedded(dir_in: &Path) -> anyhow::Result<Server> {
    embedded_build(dir_in, &sibling("idempotency-server")?, "embedded").await
}

/// [`embedded`] with another build of the backend: `binary` takes `--listen` and
/// `--data-dir` (a wrapper script that sets environment variables first will do).
pub async fn embedded_build(
    dir_in: &Path,
    binary: &Path,
    name: &'static str,
) -> anyhow::Result<Server> {
    let dir = tempfile::tempdir_in(dir_in)?;
    let addr = free_addr();
    let what = binary.display().to_string();
    let mut child = Command::new(binary)
        .args(["--listen", &addr.to_string(), "--data-dir"])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    wait_listening(addr, &mut child, &what).await?;
    Ok(Server {
        name,
        addr,
        child,
        _dir: dir,
        redis: None,
    })
}

/// The backend on a Redis of its own with an AOF synced `always` or `everysec`.
pub async fn redis(dir_in: &Path, appendfsync: &'static str) -> anyhow::Result<Server> {
    let dir = tempfile::tempdir_in(dir_in)?;
    let redis_addr = free_addr();
    let mut redis = Command::new("redis-server")
        .args([
            "--port",
            &redis_addr.port().to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            appendfsync,
        ])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .spawn()
        .context("starting redis-server (apt-get install -y redis-server)")?;
    wait_listening(redis_addr, &mut redis, "redis-server").await?;
    let addr = free_addr();
    let mut child = Command::new(sibling("idempotency-server")?)
        .args(["--listen", &addr.to_string(), "--store", "redis"])
        .args(["--redis-url", &format!("redis://{redis_addr}")])
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting idempotency-server")?;
    wait_listening(addr, &mut child, "idempotency-server (redis)").await?;
    Ok(Server {
        name: if appendfsync == "always" {
            "redis always"
        } else {
            "redis everysec"
        },
        addr,
        child,
        _dir: dir,
        redis: Some(redis),
    })
}

/// The bare baseline, answering `answers` (allocated, recorded, replay).
pub async fn baseline(dir_in: &Path, answers: [Vec<u8>; 3]) -> anyhow::Result<Server> {
    let dir = tempfile::tempdir_in(dir_in)?;
    let mut files = Vec::new();
    for (name, bytes) in ["allocated", "recorded", "replay"].iter().zip(answers) {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes)?;
        files.push(path);
    }
    let addr = free_addr();
    let mut child = Command::new(std::env::current_exe()?)
        .args(["baseline", "--listen", &addr.to_string()])
        .args(&files)
        .spawn()
        .context("starting the baseline")?;
    wait_listening(addr, &mut child, "the baseline").await?;
    Ok(Server {
        name: "bare axum",
        addr,
        child,
        _dir: dir,
        redis: None,
    })
}

async fn call(addr: SocketAddr, method: &str, body: serde_json::Value) -> anyhow::Result<Vec<u8>> {
    let r = Client::new(addr)
        .request(method, "/api/v2/captures")
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await?;
    anyhow::ensure!(r.status < 300, "{method}: {} {}", r.status, r.text());
    Ok(r.body)
}

fn replay_key(prefix: &str, i: usize) -> String {
    format!("{prefix}-{i:09}")
}

/// Records `keys` captures of a `body_bytes` body under `prefix` (what the replay scenario
/// replays), 32 at a time, and returns the backend's three answers as bytes (202, record 200,
/// replay 200) for the baseline.
pub async fn seed(
    addr: SocketAddr,
    prefix: &str,
    keys: usize,
    body_bytes: usize,
) -> anyhow::Result<[Vec<u8>; 3]> {
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..32 {
        let prefix = prefix.to_owned();
        tasks.spawn(async move {
            let mut answers = None;
            for i in (worker..keys).step_by(32) {
                let key = replay_key(&prefix, i);
                let allocated = call(addr, "PUT", serde_json::json!({ "idempotency_key": key }));
                let allocated = allocated.await?;
                let recorded =
                    serde_json::json!({ "idempotency_key": key, "response": capture(body_bytes) });
                let recorded = call(addr, "POST", recorded).await?;
                let replay = call(addr, "PUT", serde_json::json!({ "idempotency_key": key }));
                answers = Some([allocated, recorded, replay.await?]);
            }
            anyhow::Ok(answers)
        });
    }
    let mut answers = None;
    while let Some(done) = tasks.join_next().await {
        answers = answers.or(done??);
    }
    answers.context("no key was seeded")
}

/// One wrk run's figures.
#[derive(Clone, Copy, Debug, Default)]
pub struct Run {
    /// Requests answered (with [`medians`]: all the runs').
    pub requests: u64,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub errors: u64,
}

pub struct Wrk {
    script_dir: tempfile::TempDir,
    pub seconds: u64,
    pub connections: usize,
}

impl Wrk {
    pub fn new(seconds: u64, connections: usize) -> anyhow::Result<Wrk> {
        let script_dir = tempfile::tempdir()?;
        for s in [Scenario::Allocate, Scenario::Cycle, Scenario::Replay] {
            std::fs::write(script_dir.path().join(format!("{s:?}.lua")), s.script())?;
        }
        Ok(Wrk {
            script_dir,
            seconds,
            connections,
        })
    }

    /// One run of `scenario` against `addr`; `close`: a new connection per request.
    pub async fn run(
        &self,
        addr: SocketAddr,
        scenario: Scenario,
        close: bool,
        prefix: &str,
        keys: usize,
    ) -> anyhow::Result<Run> {
        let script = self.script_dir.path().join(format!("{scenario:?}.lua"));
        let mut command = tokio::process::Command::new("wrk");
        command
            .args(["-t1", &format!("-c{}", self.connections)])
            .arg(format!("-d{}s", self.seconds))
            .arg("-s")
            .arg(&script);
        if close {
            command.args(["-H", "Connection: close"]);
        }
        let output = command
            .arg(format!("http://{addr}"))
            .args(["--", prefix, &keys.to_string()])
            .output()
            .await
            .context("running wrk (apt-get install -y wrk)")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("BENCH "))
            .with_context(|| format!("wrk printed no figures: {stdout}"))?;
        let n: Vec<f64> = line
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0.0))
            .collect();
        anyhow::ensure!(n.len() == 6, "wrk's figures: {line}");
        Ok(Run {
            requests: n[0] as u64,
            rps: n[0] / (n[1] / 1e6),
            p50_us: n[2],
            p99_us: n[3],
            p999_us: n[4],
            errors: n[5] as u64,
        })
    }
}

/// The medians of a server's runs.
pub fn medians(runs: &[Run]) -> Run {
    let pick = |f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
    Run {
        requests: runs.iter().map(|r| r.requests).sum(),
        rps: pick(|r| r.rps),
        p50_us: pick(|r| r.p50_us),
        p99_us: pick(|r| r.p99_us),
        p999_us: pick(|r| r.p999_us),
        errors: runs.iter().map(|r| r.errors).sum(),
    }
}

/// Every scenario, with keep-alive and with a new connection per request, each server in
/// turn within each repetition (so that a noisy moment hits all of them), medians of `runs`.
pub async fn suite(
    servers: &[Server],
    wrk: &Wrk,
    runs: usize,
    replay_prefix: &str,
    replay_keys: usize,
) -> anyhow::Result<Vec<Figure>> {
    let mut figures = Vec::new();
    let mut fresh = 0u64;
    for scenario in [Scenario::Allocate, Scenario::Replay, Scenario::Cycle] {
        for close in [false, true] {
            let mut results: Vec<Vec<Run>> = vec![Vec::new(); servers.len()];
            for _ in 0..runs {
                for (server, results) in servers.iter().zip(&mut results) {
                    fresh += 1;
                    let prefix = match scenario {
                        Scenario::Replay => replay_prefix.to_owned(),
                        _ => format!("r{}x{fresh}", std::process::id()),
                    };
                    let run = wrk
                        .run(server.addr, scenario, close, &prefix, replay_keys)
                        .await?;
                    results.push(run);
                }
            }
            let load = if close {
                "new connection per request"
            } else {
                "keep-alive"
            };
            for (server, results) in servers.iter().zip(&results) {
                let m = medians(results);
                eprintln!(
                    "  {:<26} {:<27} {:<15} {:>9.0} req/s  p50 {:>6.0} us  p99 {:>6.0} us  p99.9 {:>6.0} us  errors {}",
                    scenario.name(),
                    load,
                    server.name,
                    m.rps,
                    m.p50_us,
                    m.p99_us,
                    m.p999_us,
                    m.errors
                );
                figures.push(Figure {
                    scenario,
                    load,
                    server: server.name,
                    run: m,
                });
            }
        }
    }
    Ok(figures)
}

/// The CPU time a process has used (user and system, all its threads), in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After the command's name (in parentheses, which may hold spaces): the fields from the
    // third on; `utime` and `stime` are the 14th and 15th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("no command name")?
        .1
        .split_whitespace()
        .collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i - 3)
            .context("a short stat line")?
            .parse::<f64>()?)
    };
    // In clock ticks of USER_HZ, which Linux fixes at 100 on every architecture it exposes it.
    Ok((ticks(14)? + ticks(15)?) / 100.0)
}

/// The resident memory of a process, in bytes.
pub fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kib * 1024)
}

/// What storing `count` captures of a 1 KiB body takes: the data dir's size against the
/// captures' own bytes (the `response` object as sent), and the backend's RSS.
pub struct Disk {
    pub count: usize,
    pub payload: u64,
    /// The blocks the data dir's files hold on the disk (what `du` counts).
    pub disk: u64,
    /// The files' lengths: larger, since redb extends its file ahead by doubling, with a
    /// sparse tail that holds no blocks until pages are written there.
    pub apparent: u64,
    pub rss: u64,
}

/// A 1 KiB body as the filter records it: base64 (RFC 4648 §4) of 768 bytes, here
/// pseudo-random (xorshift), so that nothing on the way could shrink it by compressing.
fn body() -> String {
    use base64::Engine as _;
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let raw: Vec<u8> = (0..768)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    base64::engine::general_purpose::STANDARD.encode(raw)
}

pub async fn disk(dir_in: &Path, count: usize) -> anyhow::Result<Disk> {
    let server = embedded(dir_in).await?;
    let addr = server.addr;
    let response = serde_json::json!({
        "response_status": 201,
        "response_body": body(),
        "response_headers": [{ "key": "Content-Type", "value": "application/octet-stream" }]
    });
    let payload = response.to_string().len() as u64 * count as u64;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..32 {
        let response = response.clone();
        tasks.spawn(async move {
            for i in (worker..count).step_by(32) {
                let key = format!("disk-{i:09}");
                call(addr, "PUT", serde_json::json!({ "idempotency_key": key })).await?;
                let record = serde_json::json!({ "idempotency_key": key, "response": response });
                call(addr, "POST", record).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    // The files as they stand: redb's (grown ahead by doubling, sparse beyond what it has
    // written) and the journal (at most its checkpoint size plus a step).
    use std::os::unix::fs::MetadataExt as _;
    let (mut disk, mut apparent) = (0, 0);
    for entry in std::fs::read_dir(server._dir.path())? {
        let metadata = entry?.metadata()?;
        disk += metadata.blocks() * 512;
        apparent += metadata.len();
    }
    Ok(Disk {
        count,
        payload,
        disk,
        apparent,
        rss: rss(server.pid())?,
    })
}
