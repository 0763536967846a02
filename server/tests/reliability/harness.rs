//! The whole path, as the reliability tests drive it: the product filter (`idempotency.wasm`)
//! in the test host (either mode), the real backend behind a tap, the counting upstream, and a
//! client that sends every key many times with a seeded spread.
//!
//! - [`Tap`]: an HTTP proxy between the filter and the backend(s). It forwards each call to
//!   the next backend in turn (two backends alternate), breaks the connection when the
//!   backend did not answer (so the filter sees exactly what a dead backend gives), and keeps
//!   every exchange: which records the backend *acknowledged* is read from there, key by key.
//! - [`Gateway`]: the filter in a host with the counting upstream. The upstream answers
//!   `upstream POST /orders/<key> #<n>`, `n` counting every execution, so each execution's
//!   body is unique: a replay identical to it is a replay of that execution, and a second
//!   execution can never pass for a replay.
//! - [`Load`]: the keys, how many copies of each, how many at once, the seed; [`Load::run`]
//!   sends them while the gateway's clock ticks in step with real time.
//! - [`Ledger`]: what the upstream executed and what every client saw, key by key, and the
//!   checks of the promise (exactly once; every other answer a 409 with `Retry-After` or a
//!   byte-identical replay).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use idempotency_spec::{BATCH_PATH, BatchAnswer, BatchOperation, CAPTURES_PATH, CaptureRecord};
use idempotency_tests::{ClientRequest, ClientResponse, Host, Mode, Upstream, build};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// The seed of every schedule: `RELIABILITY_SEED` when set (to replay a failed run), else a
/// fixed one, so that CI runs the same schedule every time.
pub fn seed() -> u64 {
    let seed = std::env::var("RELIABILITY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x1de3_7e57_2026);
    eprintln!("schedule seed {seed} (RELIABILITY_SEED={seed} replays it)");
    seed
}

/// How many keys the exactly-once runs send: 2,000 in CI, `RELIABILITY_KEYS` for a longer
/// run (RELIABILITY.md gives the 100,000-key figures).
pub fn keys() -> usize {
    std::env::var("RELIABILITY_KEYS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000)
}

/// SplitMix64: a seeded generator, enough for schedules (and no crate for it).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One call that went through the tap.
#[derive(Clone, Debug)]
pub struct Exchange {
    pub method: String,
    pub path: String,
    pub request: Bytes,
    /// `None`: the backend never answered (refused, reset, killed); the filter's connection
    /// was broken too.
    pub status: Option<u16>,
    pub response: Bytes,
    pub backend: SocketAddr,
}

struct TapState {
    backends: Vec<SocketAddr>,
    exchanges: Vec<Exchange>,
}

/// An HTTP proxy in front of the backend(s): round robin per call, every exchange kept.
pub struct Tap {
    pub addr: SocketAddr,
    state: Arc<Mutex<TapState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Tap {
    pub async fn start(backends: Vec<SocketAddr>) -> Tap {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(TapState {
            backends,
            exchanges: Vec::new(),
        }));
        let next = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(tap_loop(listener, state.clone(), next));
        Tap { addr, state, task }
    }

    /// Where the calls go from now on (a restarted backend listens on a new port).
    pub fn set_backends(&self, backends: Vec<SocketAddr>) {
        self.state.lock().unwrap().backends = backends;
    }

    pub fn exchanges(&self) -> Vec<Exchange> {
        self.state.lock().unwrap().exchanges.clone()
    }

    /// How many calls each backend answered.
    pub fn answered_by(&self) -> HashMap<SocketAddr, usize> {
        let mut by = HashMap::new();
        for e in self.state.lock().unwrap().exchanges.iter() {
            if e.status.is_some() {
                *by.entry(e.backend).or_default() += 1;
            }
        }
        by
    }

    /// The records the backend acknowledged, by key (the `<key>` of `/orders/<key>`): a
    /// single record answered 200, or a batch's record operation whose result is 200. Key
    /// and body are read from the capture itself (the upstream's body names its path).
    pub fn acknowledged_records(&self) -> HashMap<String, Vec<Vec<u8>>> {
        let mut acked: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
        let mut add = |r: &CaptureRecord| {
            if let Some((key, body)) = key_of_capture(r) {
                acked.entry(key).or_default().push(body);
            }
        };
        for e in self.exchanges() {
            if e.method != "POST" || e.status != Some(200) {
                continue;
            }
            if e.path == CAPTURES_PATH {
                if let Ok(r) = serde_json::from_slice::<CaptureRecord>(&e.request) {
                    add(&r);
                }
            } else if e.path == BATCH_PATH {
                let ops: Value = serde_json::from_slice(&e.request).unwrap_or(Value::Null);
                let ops: Vec<BatchOperation> =
                    serde_json::from_value(ops["operations"].clone()).unwrap_or_default();
                let answer: BatchAnswer<Value> = match serde_json::from_slice(&e.response) {
                    Ok(a) => a,
                    Err(_) => continue,
                };
                for (op, result) in ops.iter().zip(answer.results.iter()) {
                    if let (BatchOperation::Record(r), 200) = (op, result.status) {
                        add(r);
                    }
                }
            }
        }
        acked
    }

    /// Calls the backend never answered (refused, reset, killed mid-call).
    pub fn unanswered(&self) -> usize {
        self.state
            .lock()
            .unwrap()
            .exchanges
            .iter()
            .filter(|e| e.status.is_none())
            .count()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The key and body of a capture of the counting upstream (`upstream POST /orders/<key> #<n>`).
fn key_of_capture(r: &CaptureRecord) -> Option<(String, Vec<u8>)> {
    let body = base64::engine::general_purpose::STANDARD
        .decode(&r.response.response_body)
        .ok()?;
    let text = std::str::from_utf8(&body).ok()?;
    let path = text.strip_prefix("upstream POST /orders/")?;
    let key = path.split(' ').next()?.to_string();
    Some((key, body))
}

async fn tap_loop(listener: TcpListener, state: Arc<Mutex<TapState>>, next: Arc<AtomicUsize>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        let next = next.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                forward(req, state.clone(), next.fetch_add(1, Ordering::Relaxed))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Forwards one call on a fresh connection to the next backend. When the backend does not
/// answer in full, the error closes the filter's connection without a response.
async fn forward(
    req: hyper::Request<hyper::body::Incoming>,
    state: Arc<Mutex<TapState>>,
    n: usize,
) -> Result<hyper::Response<Full<Bytes>>, std::io::Error> {
    let (parts, body) = req.into_parts();
    let request = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let backend = {
        let s = state.lock().unwrap();
        s.backends[n % s.backends.len()]
    };
    let mut exchange = Exchange {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        // Copies: a `Bytes` from hyper is a view of its 8 KiB read buffer, which it would
        // keep alive (two per call: gigabytes over a long run).
        request: Bytes::copy_from_slice(&request),
        status: None,
        response: Bytes::new(),
        backend,
    };
    let answer = async {
        let stream = tokio::net::TcpStream::connect(backend).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(std::io::Error::other)?;
        let _conn = idempotency_tests::client::Closer::spawn(conn);
        let mut out = hyper::Request::builder()
            .method(parts.method.clone())
            .uri(parts.uri.clone());
        for (k, v) in &parts.headers {
            out = out.header(k, v);
        }
        let response = sender
            .send_request(
                out.body(Full::new(request))
                    .map_err(std::io::Error::other)?,
            )
            .await
            .map_err(std::io::Error::other)?;
        let (head, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(std::io::Error::other)?
            .to_bytes();
        Ok::<_, std::io::Error>((head, body))
    }
    .await;
    match answer {
        Ok((head, body)) => {
            exchange.status = Some(head.status.as_u16());
            exchange.response = Bytes::copy_from_slice(&body);
            state.lock().unwrap().exchanges.push(exchange);
            let mut response = hyper::Response::builder().status(head.status);
            for (k, v) in &head.headers {
                response = response.header(k, v);
            }
            Ok(response.body(Full::new(body)).unwrap())
        }
        Err(e) => {
            state.lock().unwrap().exchanges.push(exchange);
            Err(e)
        }
    }
}

/// The filter in a host of `mode`, calling the backend at `backend`, with the counting
/// upstream behind it.
pub struct Gateway {
    pub mode: Mode,
    pub host: Host,
    pub api: Upstream,
    pub tick: Duration,
    /// Where the in-process backends' log lines of this run start.
    log_mark: usize,
}

impl Gateway {
    /// The filter's configuration is `config` (an object) with `server.upstream` set for the
    /// mode and `server.timeout_ms` 10 s unless given (generous: a debug build on two loaded
    /// cores).
    pub async fn start(mode: Mode, backend: SocketAddr, mut config: Value) -> Gateway {
        let log_mark = idempotency_tests::secrets::backend_mark();
        let api = Upstream::start().await;
        let upstream = match mode {
            Mode::Ngx => backend.to_string(),
            Mode::Envoy => "idempotency".to_string(),
        };
        config["server"]["upstream"] = json!(upstream);
        if config["server"]["timeout_ms"].is_null() {
            config["server"]["timeout_ms"] = json!(10_000);
        }
        let tick = Duration::from_millis(config["tick_ms"].as_u64().unwrap_or(20));
        let host = Host::builder(mode, build::wasm("idempotency"))
            .filter_name("idempotency")
            .upstream(api.addr())
            .cluster("idempotency", backend)
            .config(config.to_string())
            .start()
            .await
            .expect("the filter loads");
        Gateway {
            mode,
            host,
            api,
            tick,
            log_mark,
        }
    }

    /// The keyed POST of `key`: `/orders/<key>`, its own body.
    pub fn request(&self, key: &str) -> ClientRequest {
        self.host
            .client()
            .request("POST", &format!("/orders/{key}"))
            .header("idempotency-key", format!("\"{key}\""))
            .header("content-type", "application/json")
            .body(format!("{{\"order\":\"{key}\"}}"))
    }

    /// A counter of the filter (0 when it was never defined).
    pub fn metric(&self, name: &str) -> i64 {
        self.host.metric(name).map_or(0, |m| m.value)
    }

    /// Runs `work` while the clock moves one tick per tick of real time (records flow from
    /// the queue while requests keep coming), then lets everything settle with a last tick.
    pub async fn with_ticks<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        let done = AtomicBool::new(false);
        let ticking = async {
            let mut clock = tokio::time::interval(self.tick);
            while !done.load(Ordering::SeqCst) {
                clock.tick().await;
                self.host.advance(self.tick).await;
            }
        };
        let working = async {
            let out = work.await;
            done.store(true, Ordering::SeqCst);
            out
        };
        let (out, ()) = tokio::join!(working, ticking);
        self.host.settle().await;
        self.host.advance(self.tick).await;
        self.host.settle().await;
        out
    }

    /// ngx: the worker never crashed and no connection slot leaked; neither the filter nor
    /// an in-process backend logged a key, a credential or a body of the run. Then every
    /// host rule held (`Host::finish`).
    pub async fn finish(self) {
        self.host.settle().await;
        let secrets = idempotency_tests::secrets::Secrets::of_traffic(&self.api);
        idempotency_tests::secrets::assert_not_logged(&self.host, self.log_mark, &secrets);
        if self.mode == Mode::Ngx {
            assert_eq!(self.host.leaked_connections(), 0, "no slot leaked");
        }
        self.host.finish().await;
    }
}

/// The load: `keys` keys named `<tag>-<i>`, each sent `copies` times, `at_once` at a time.
///
/// The schedule (seeded): key `i`'s copies are placed around position `i × copies` of the
/// send order, half of them within a few keys of it (they overlap the first: 409, or a wait)
/// and half anywhere up to two hundred keys later (most come after the first finished and
/// was recorded: a replay; some while its record is still queued: 409). Which copy executes
/// is whichever the schedule sends first.
#[derive(Clone)]
pub struct Load {
    pub tag: String,
    pub keys: usize,
    pub copies: usize,
    pub at_once: usize,
    pub seed: u64,
}

/// One answer a client got (or the error it saw).
pub struct Sent {
    pub key: String,
    pub answer: Result<ClientResponse, String>,
}

impl Load {
    pub fn new(tag: &str, keys: usize, copies: usize) -> Load {
        Load {
            tag: tag.to_string(),
            keys,
            copies,
            at_once: 128,
            seed: seed(),
        }
    }

    pub fn key(&self, i: usize) -> String {
        format!("{}-{i}", self.tag)
    }

    /// The send order: `(position, key index)`, sorted.
    fn schedule(&self) -> Vec<usize> {
        let mut rng = Rng::new(self.seed);
        let copies = self.copies as u64;
        let mut slots: Vec<(u64, usize)> = Vec::with_capacity(self.keys * self.copies);
        for i in 0..self.keys {
            let base = i as u64 * copies;
            for c in 0..copies {
                let offset = if c % 2 == 0 {
                    rng.below(copies * 4)
                } else {
                    rng.below(copies * 200)
                };
                slots.push((base + offset, i));
            }
        }
        slots.sort_unstable();
        slots.into_iter().map(|(_, i)| i).collect()
    }

    /// Sends the whole schedule through `gw` (the clock ticking), and returns every answer.
    pub async fn run(&self, gw: &Gateway) -> Vec<Sent> {
        let order = self.schedule();
        let started = Instant::now();
        let sent = gw
            .with_ticks(async {
                let permits = Arc::new(tokio::sync::Semaphore::new(self.at_once));
                let mut tasks = tokio::task::JoinSet::new();
                for i in order {
                    let key = self.key(i);
                    let request = gw.request(&key);
                    let permit = permits.clone().acquire_owned().await.unwrap();
                    tasks.spawn(async move {
                        let answer = tokio::time::timeout(Duration::from_secs(60), request.send())
                            .await
                            .map_err(|_| "no answer within 60 s (a hang)".to_string())
                            .and_then(|r| r.map_err(|e| format!("{e:#}")));
                        drop(permit);
                        Sent { key, answer }
                    });
                }
                let mut all = Vec::with_capacity(self.keys * self.copies);
                while let Some(done) = tasks.join_next().await {
                    all.push(done.expect("a client task"));
                }
                all
            })
            .await;
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "{}: {} requests in {secs:.1} s ({:.0} requests/s)",
            self.tag,
            sent.len(),
            sent.len() as f64 / secs
        );
        sent
    }

    /// [`Load::run`], with `fault` injected once the upstream has executed `after` requests.
    pub async fn run_with_fault<T>(
        &self,
        gw: &Gateway,
        after: usize,
        fault: impl std::future::Future<Output = T>,
    ) -> (Vec<Sent>, T) {
        let injected = async {
            eventually(
                "the load reached the fault's point",
                Duration::from_secs(300),
                || gw.api.total() >= after,
            )
            .await;
            eprintln!("{}: fault injected after {after} executions", self.tag);
            fault.await
        };
        tokio::join!(self.run(gw), injected)
    }

    /// After a fault: sends each key until its answer is final (not a 409 while a lease
    /// that outlived the fault holds it, not a 503), the clock ticking so that queued
    /// records go out; returns every answer seen on the way.
    pub async fn until_settled(&self, gw: &Gateway, deadline: Duration) -> Vec<Sent> {
        let started = Instant::now();
        gw.with_ticks(async {
            let mut all = Vec::new();
            let mut open: Vec<usize> = (0..self.keys).collect();
            while !open.is_empty() {
                assert!(
                    started.elapsed() < deadline,
                    "{} keys still held or unavailable after {deadline:?}",
                    open.len()
                );
                let round = self.send_each(gw, &open).await;
                open.clear();
                for (i, sent) in round {
                    let status = sent.answer.as_ref().map_or(0, |r| r.status);
                    if status == 409 || status == 503 {
                        open.push(i);
                    }
                    all.push(sent);
                }
                if !open.is_empty() {
                    // Polling: a lease frees its key at its expiry, on the backend's clock.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            all
        })
        .await
    }

    async fn send_each(&self, gw: &Gateway, keys: &[usize]) -> Vec<(usize, Sent)> {
        let permits = Arc::new(tokio::sync::Semaphore::new(self.at_once));
        let mut tasks = tokio::task::JoinSet::new();
        for &i in keys {
            let key = self.key(i);
            let request = gw.request(&key);
            let permit = permits.clone().acquire_owned().await.unwrap();
            tasks.spawn(async move {
                let answer = request.send().await.map_err(|e| format!("{e:#}"));
                drop(permit);
                (i, Sent { key, answer })
            });
        }
        let mut all = Vec::new();
        while let Some(done) = tasks.join_next().await {
            all.push(done.expect("a client task"));
        }
        all
    }

    /// Sends every key once more (no clock needed: nothing is queued by a replay).
    pub async fn retry(&self, gw: &Gateway) -> Vec<Sent> {
        let all: Vec<usize> = (0..self.keys).collect();
        self.send_each(gw, &all)
            .await
            .into_iter()
            .map(|(_, s)| s)
            .collect()
    }
}

/// How one answer reads, given what the upstream executed for its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Seen {
    /// The upstream's own response (not replayed).
    Executed,
    /// `Idempotent-Replayed: true`, byte-identical to one execution of its key.
    Replayed,
    /// 409 in-flight with a `Retry-After`.
    Conflict,
    /// 503 backend-unavailable (only while a fault is injected).
    Unavailable,
}

/// What the upstream executed, key by key: the body of each execution, in order.
pub struct Ledger {
    pub executions: HashMap<String, Vec<Vec<u8>>>,
}

impl Ledger {
    pub fn of(gw: &Gateway) -> Ledger {
        let mut executions: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
        for (n, seen) in gw.api.requests().iter().enumerate() {
            let Some(key) = seen.path.strip_prefix("/orders/") else {
                continue;
            };
            // What the upstream answered it (its default reply): unique per execution.
            let body = format!("upstream POST {} #{}", seen.path, n + 1).into_bytes();
            executions.entry(key.to_string()).or_default().push(body);
        }
        Ledger { executions }
    }

    pub fn count(&self, key: &str) -> usize {
        self.executions.get(key).map_or(0, Vec::len)
    }

    /// Reads one answer; `Err` says why it breaks the promise.
    pub fn read(&self, sent: &Sent) -> Result<Seen, String> {
        let r = sent
            .answer
            .as_ref()
            .map_err(|e| format!("no answer: {e}"))?;
        let executed = self.executions.get(&sent.key).cloned().unwrap_or_default();
        match r.status {
            200 => {
                if !executed.contains(&r.body) {
                    return Err(format!(
                        "a 200 that is none of its executions: {:?}",
                        r.text()
                    ));
                }
                if r.header("content-type") != Some("text/plain") {
                    return Err(format!(
                        "content-type {:?} (the upstream's is text/plain)",
                        r.header("content-type")
                    ));
                }
                match r.header("idempotent-replayed") {
                    None => Ok(Seen::Executed),
                    Some("true") => Ok(Seen::Replayed),
                    Some(other) => Err(format!("idempotent-replayed: {other}")),
                }
            }
            409 => {
                let problem: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
                if problem["type"] != "urn:idempotency:problem:in-flight" {
                    return Err(format!("a 409 that is not in-flight: {}", r.text()));
                }
                match r.header("retry-after").map(str::parse::<u64>) {
                    Some(Ok(_)) => Ok(Seen::Conflict),
                    _ => Err(format!(
                        "a 409 without a Retry-After in seconds: {:?}",
                        r.header("retry-after")
                    )),
                }
            }
            503 => {
                let problem: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
                if problem["type"] == "urn:idempotency:problem:backend-unavailable" {
                    Ok(Seen::Unavailable)
                } else {
                    Err(format!(
                        "a 503 that is not backend-unavailable: {}",
                        r.text()
                    ))
                }
            }
            s => Err(format!("status {s}: {}", r.text())),
        }
    }

    /// Reads every answer: how many of each kind, and the first few that break the promise.
    pub fn tally(&self, sent: &[Sent]) -> Tally {
        let mut tally = Tally::default();
        for s in sent {
            match self.read(s) {
                Ok(seen) => *tally.seen.entry(seen).or_default() += 1,
                Err(why) => {
                    if tally.broken.len() < 20 {
                        tally.broken.push(format!("{}: {why}", s.key));
                    }
                    tally.broken_count += 1;
                }
            }
        }
        tally
    }

    /// Every key executed exactly once; panics listing the first few that were not.
    pub fn assert_exactly_once(&self, load: &Load) {
        let wrong: Vec<String> = (0..load.keys)
            .map(|i| load.key(i))
            .filter(|k| self.count(k) != 1)
            .map(|k| format!("{k} executed {} times", self.count(&k)))
            .collect();
        assert!(
            wrong.is_empty(),
            "{} of {} keys not executed exactly once: {:?}",
            wrong.len(),
            load.keys,
            &wrong[..wrong.len().min(20)]
        );
    }
}

/// The answers of a run, counted by kind.
#[derive(Default, Debug)]
pub struct Tally {
    pub seen: BTreeMap<Seen, usize>,
    pub broken: Vec<String>,
    pub broken_count: usize,
}

impl Tally {
    pub fn get(&self, seen: Seen) -> usize {
        self.seen.get(&seen).copied().unwrap_or(0)
    }

    /// No answer broke the promise.
    pub fn assert_sound(&self, what: &str) {
        assert!(
            self.broken.is_empty(),
            "{what}: {} answers break the promise, the first: {:#?}",
            self.broken_count,
            self.broken
        );
    }
}

/// Polls `check` until it holds (every few milliseconds), failing after `deadline`.
pub async fn eventually(what: &str, deadline: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < deadline,
            "not within {deadline:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
