//! What the fuel example (`examples/fuel.rs`, README: Filter, Benchmarks) and the performance
//! suite (`idempotency-bench`, BENCHMARKS.md) share, so that both print the same figures for
//! the same request: a gateway in front of an upstream that calls a backend, the filter's fuel
//! per request against the no-op filter's, and the profile of first requests.
//!
//! Every figure is taken on an instance that has served one keyed request already: an instance
//! detects its host on its first request (a property read or two, and a log line), and makes
//! its base64 tables on the first body it records or replays, once for all the requests after.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::{ClientRequest, Host, Mode, Reply, Upstream, profile};

/// The filter's tick (`tick_ms`): the deferred records are sent from it.
pub const TICK: Duration = Duration::from_millis(20);

/// One host (a worker) running `module` in `mode`, in front of `api`, calling `backend`;
/// `record` is the filter's `record` setting (`auto`, its default: inline on Envoy, deferred
/// on Kong).
pub async fn gateway(
    mode: Mode,
    module: &Path,
    api: &Upstream,
    backend: SocketAddr,
    record: &str,
) -> anyhow::Result<Host> {
    let upstream = match mode {
        Mode::Ngx => backend.to_string(),
        Mode::Envoy => "idempotency".into(),
    };
    let config = serde_json::json!({
        "server": { "upstream": upstream },
        "max_request_body_bytes": 1 << 20,
        "tick_ms": TICK.as_millis() as u64,
        "record": record,
    });
    Host::builder(mode, module)
        .filter_name("idempotency")
        .upstream(api.addr())
        .cluster("idempotency", backend)
        // Kong: a body buffer as large as the bodies (README: nginx_http_client_body_buffer_size).
        .client_body_buffer_size(1 << 20)
        .config(config.to_string())
        .start()
        .await
}

/// A POST of `body` to `/orders` through `host`, with `key` as the key (an sf-string) when
/// given, to send now or from a task of its own.
pub fn request(host: &Host, key: Option<&str>, body: &[u8]) -> ClientRequest {
    request_on(host, None, "/orders", key, body)
}

/// [`request`] to `path` (which may have a query) under another `Host` when given.
fn request_on(
    host: &Host,
    authority: Option<&str>,
    path: &str,
    key: Option<&str>,
    body: &[u8],
) -> ClientRequest {
    let mut request = host
        .client()
        .request("POST", path)
        .header("content-type", "application/octet-stream");
    if let Some(authority) = authority {
        request = request.header("host", authority);
    }
    if let Some(key) = key {
        request = request.header("idempotency-key", format!("\"{key}\""));
    }
    request.body(body.to_vec())
}

/// [`request`] sent: its status.
pub async fn post(host: &Host, key: Option<&str>, body: &[u8]) -> anyhow::Result<u16> {
    Ok(request(host, key, body).send().await?.status)
}

/// Once nothing is in flight, one tick (the deferred records are sent), then settled again.
pub async fn tick(host: &Host) {
    host.settle().await;
    host.advance(TICK).await;
    host.settle().await;
}

/// Waits (polling, with a deadline) until the upstream has seen `n` requests to `/orders`.
pub async fn upstream_count(api: &Upstream, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while api.count("/orders") < n {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the upstream saw {} of {n}",
            api.count("/orders")
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

/// Once a first request is answered, its fuel with its record's: on Kong (`record: auto` is
/// deferred there) the record goes from the next tick, in the root context, whose fuel during
/// that tick is added.
async fn with_record(host: &Host) -> u64 {
    host.settle().await;
    let http = last_fuel(host);
    let root = host.fuel().root;
    tick(host).await;
    http + (host.fuel().root - root)
}

/// The fuel of the last request the host saw.
fn last_fuel(host: &Host) -> u64 {
    host.fuel().requests.last().map_or(0, |r| r.fuel)
}

/// The key of the `n`th keyed request of a measurement: shaped like a UUID, the key clients
/// send, and always 36 characters. The filter checks, copies, hashes and writes the key into
/// its calls, so its length is part of the figure: keys whose length moved with a process id
/// moved it by a few hundred instructions from run to run (bench/experiments.md, Fuel).
pub fn key(mode: Mode, size: usize, n: u32) -> String {
    let mode = match mode {
        Mode::Ngx => 1,
        Mode::Envoy => 2,
    };
    format!("{mode:08x}-{n:04x}-4000-8000-{size:012x}")
}

/// An upstream answering `/orders` with 201 and `size` bytes (and two `Set-Cookie`, which a
/// capture stores), and the request body of the same size.
async fn orders(size: usize) -> (Upstream, Vec<u8>) {
    let body: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
    let api = Upstream::start().await;
    api.reply(
        "/orders",
        Reply::new(201)
            .header("content-type", "application/octet-stream")
            .header("set-cookie", "a=1")
            .header("set-cookie", "b=2")
            .body(body.clone()),
    );
    (api, body)
}

/// Fuel per request for request and response bodies of `size` bytes, in Wasm instructions.
#[derive(Clone, Copy, Debug, Default)]
pub struct FuelRow {
    pub mode: &'static str,
    pub size: usize,
    /// The same keyed request through the no-op filter (`tests/noop`): the floor.
    pub floor: u64,
    /// A POST without a key (the filter only looks).
    pub no_key: u64,
    /// The allocation, the copy of the response and its record (on Kong the record is sent
    /// from the root context's tick, whose fuel is added).
    pub first: u64,
    /// The retry, answered from the stored capture.
    pub replay: u64,
    /// A duplicate while the first is in flight (409).
    pub conflict: u64,
    /// [`FuelRow::first`] on a route the instance has not served (another host, and a query
    /// that makes the path longer): neither digest's first block is cached yet
    /// (`idempotency::sha`). `first` is on the route of the instance's earlier requests.
    pub new_route: u64,
}

/// [`FuelRow`] for `filter`, against `noop`, both calling `backend`.
pub async fn fuel(
    mode: Mode,
    size: usize,
    filter: &Path,
    noop: &Path,
    backend: SocketAddr,
) -> anyhow::Result<FuelRow> {
    let (api, body) = orders(size).await;
    let floor = {
        let noop = gateway(mode, noop, &api, backend, "auto").await?;
        anyhow::ensure!(post(&noop, Some("floor-warm"), &body).await? == 201);
        noop.settle().await;
        anyhow::ensure!(post(&noop, Some("floor"), &body).await? == 201);
        noop.settle().await;
        let floor = last_fuel(&noop);
        noop.finish().await;
        floor
    };

    let t = gateway(mode, filter, &api, backend, "auto").await?;
    anyhow::ensure!(post(&t, Some(&key(mode, size, 0)), &body).await? == 201);
    tick(&t).await;
    anyhow::ensure!(post(&t, None, &body).await? == 201);
    t.settle().await;
    let no_key = last_fuel(&t);
    let first_key = key(mode, size, 1);
    anyhow::ensure!(post(&t, Some(&first_key), &body).await? == 201);
    let first = with_record(&t).await;
    anyhow::ensure!(post(&t, Some(&first_key), &body).await? == 201, "replay");
    t.settle().await;
    let replay = last_fuel(&t);
    // Conflict: a duplicate while the first is held in the upstream.
    let seen = api.count("/orders");
    api.hold("/orders");
    let held = request(&t, Some(&key(mode, size, 2)), &body);
    let held = tokio::spawn(async move { held.send().await });
    upstream_count(&api, seen + 1).await?;
    let status = post(&t, Some(&key(mode, size, 2)), &body).await?;
    anyhow::ensure!(status == 409, "conflict: {status}");
    let conflict = last_fuel(&t);
    api.release("/orders");
    held.await??;
    tick(&t).await;
    let fresh = request_on(
        &t,
        Some("api.example"),
        "/orders?route=new",
        Some(&key(mode, size, 3)),
        &body,
    );
    anyhow::ensure!(fresh.send().await?.status == 201, "new route");
    let new_route = with_record(&t).await;
    t.finish().await;
    Ok(FuelRow {
        mode: mode.name(),
        size,
        floor,
        no_key,
        first,
        replay,
        conflict,
        new_route,
    })
}

/// Where the instructions of first requests go, per function of the module.
pub struct Profile {
    /// The functions that burnt the most, by themselves and with their callees
    /// ([`profile::report`]).
    pub report: String,
    /// Every stack and its count, as flame graphs take them ([`profile::folded`]).
    pub folded: String,
}

/// The profile of `n` first keyed requests with bodies of `size` bytes (the allocation, the
/// copy of the response and its record; on Kong the tick's record is included) through
/// `module`, which should be built with its functions' names
/// ([`crate::build::wasm_with_names`]: the same code, so the same fuel). Exact counts, not
/// samples ([`profile`]). Only this host's instance is profiled: the switch is on while it is
/// made (or all along, with `IDEMPOTENCY_HOST_PROFILE` set).
pub async fn first_requests(
    mode: Mode,
    module: &Path,
    backend: SocketAddr,
    n: u32,
    size: usize,
) -> anyhow::Result<Profile> {
    let (api, body) = orders(size).await;
    profile::set_enabled(true);
    let t = gateway(mode, module, &api, backend, "auto").await;
    let profiled = async {
        let t = t?;
        // The instance's first request is not counted, as in the rows.
        anyhow::ensure!(post(&t, Some(&key(mode, size, 0)), &body).await? == 201);
        tick(&t).await;
        profile::reset();
        for i in 1..=n {
            anyhow::ensure!(post(&t, Some(&key(mode, size, i)), &body).await? == 201);
            tick(&t).await;
        }
        let profile = Profile {
            report: profile::report(60),
            folded: profile::folded(),
        };
        t.finish().await;
        Ok(profile)
    }
    .await;
    profile::set_enabled(false);
    profiled
}
