//! The filter's cost per request in Wasm instructions (wasmtime fuel, as the test host counts
//! it per callback), in both modes, for request and response bodies of 1 KiB and 64 KiB:
//!
//! ```sh
//! cargo run -p idempotency-tests --example fuel
//! ```
//!
//! Each scenario is measured on an instance that has served a keyed request already (an
//! instance detects its host once, on its first request, and makes its base64 tables on its
//! first body: `idempotency::b64`).
//!
//! Fuel counts the guest's instructions, so the figures do not depend on how the host itself
//! was compiled (a debug build gives the same numbers as `--release`). Per scenario:
//! - no key: a POST without `Idempotency-Key` (the filter only looks);
//! - first: the allocation, the copy of the response and its record (on Kong the record is
//!   sent from the root context's tick, whose cost is added);
//! - replay: the retry, answered from the stored capture (fix-ups included);
//! - conflict: a duplicate while the first is in flight (409).
//!
//! With `IDEMPOTENCY_HOST_PROFILE=<n>` it sends instead `n` first requests (1 KiB bodies, or
//! `IDEMPOTENCY_PROFILE_BODY` bytes) per mode and prints where their instructions went, by
//! guest function (`idempotency_tests::profile`, on a build of the module that keeps its
//! functions' names); with `IDEMPOTENCY_PROFILE_SVG=<dir>` also draws them as flame graphs,
//! `<dir>/fuel-ngx.svg` and `<dir>/fuel-envoy.svg`.

#[path = "../tests/filter/support.rs"]
#[allow(unused_macros, unused_imports)]
mod support;

use std::time::Duration;

use idempotency_tests::{Host, Mode, Reply, Upstream, build};
use serde_json::json;
use support::E2e;

/// Fuel of the last request the host saw.
fn last_request_fuel(t: &E2e) -> u64 {
    t.host().fuel().requests.last().map_or(0, |r| r.fuel)
}

/// Fuel of the same keyed request through the no-op filter (`tests/noop`), on an instance
/// that served one before: the floor.
async fn floor(mode: Mode, size: usize) -> u64 {
    let api = Upstream::start().await;
    let body: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
    api.reply("/orders", Reply::new(201).body(body.clone()));
    let host = Host::builder(mode, build::wasm("noop-filter"))
        .upstream(api.addr())
        .client_body_buffer_size(1 << 20)
        .start()
        .await
        .unwrap();
    for _ in 0..2 {
        let r = host
            .client()
            .request("POST", "/orders")
            .header("content-type", "application/octet-stream")
            .header("idempotency-key", "\"floor\"")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status, 201);
        host.settle().await;
    }
    let fuel = host.fuel().requests.last().map_or(0, |r| r.fuel);
    host.finish().await;
    fuel
}

/// The filter in `mode` in front of an upstream answering 201 with `size` bytes, after a first
/// keyed request that is not measured: an instance detects its host on its first request (a
/// property read or two, and a log line) and makes its base64 tables on the first body it
/// records, once for all the requests it will serve. The body of the requests to send.
async fn start(mode: Mode, size: usize) -> (E2e, Vec<u8>) {
    // Kong: a body buffer as large as the bodies (README: nginx_http_client_body_buffer_size).
    let t = E2e::setup(mode)
        .config(json!({"max_request_body_bytes": 1 << 20}))
        .host(|b| b.client_body_buffer_size(1 << 20))
        .start()
        .await;
    let body: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
    t.api.reply(
        "/orders",
        Reply::new(201)
            .header("content-type", "application/octet-stream")
            .header("set-cookie", "a=1")
            .header("set-cookie", "b=2")
            .body(body.clone()),
    );
    let r = t.send("/orders", "\"warm-up\"", body.clone()).await;
    assert_eq!(r.status, 201);
    t.host().settle().await;
    t.tick().await;
    (t, body)
}

async fn measure(mode: Mode, size: usize) -> [u64; 4] {
    let (t, body) = start(mode, size).await;
    // No key.
    let r = t.post("/orders", None, body.clone()).send().await.unwrap();
    assert_eq!(r.status, 201);
    t.host().settle().await;
    let no_key = last_request_fuel(&t);
    // First request: allocate, copy, record (Kong: from the tick, in the root context).
    let r = t.send("/orders", "\"bench-1\"", body.clone()).await;
    assert_eq!(r.status, 201);
    t.host().settle().await;
    let http = last_request_fuel(&t);
    let root_before = t.host().fuel().root;
    t.tick().await;
    let record_in_root = t.host().fuel().root - root_before;
    let first = http + record_in_root;
    // Replay.
    let r = t.send("/orders", "\"bench-1\"", body.clone()).await;
    assert_eq!(r.header("idempotent-replayed"), Some("true"));
    t.host().settle().await;
    let replay = last_request_fuel(&t);
    // Conflict: a duplicate while the first is held in the upstream.
    let seen = t.api.count("/orders");
    t.api.hold("/orders");
    let holder = t.post("/orders", Some("\"bench-2\""), body.clone());
    let holder = tokio::spawn(async move { holder.send().await.unwrap() });
    support::eventually(
        "the first is in the upstream",
        Duration::from_secs(10),
        || t.api.count("/orders") == seen + 1,
    )
    .await;
    let r = t.send("/orders", "\"bench-2\"", body.clone()).await;
    assert_eq!(r.status, 409);
    let conflict = last_request_fuel(&t);
    if std::env::var_os("FUEL_PHASES").is_some() {
        for r in t.host().fuel().requests {
            eprintln!("{mode} {size} {} {:?}", r.fuel, r.by_phase);
        }
    }
    t.api.release("/orders");
    holder.await.unwrap();
    t.finish().await;
    [no_key, first, replay, conflict]
}

/// Where the instructions of `n` first requests (allocate, copy, record; Kong: the tick's
/// record) go, per guest function.
async fn profile(mode: Mode, n: usize) {
    let size = std::env::var("IDEMPOTENCY_PROFILE_BODY")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1024);
    let (t, body) = start(mode, size).await;
    idempotency_tests::profile::reset();
    for i in 0..n {
        let r = t
            .send("/orders", &format!("\"profile-{i}\""), body.clone())
            .await;
        assert_eq!(r.status, 201);
        t.host().settle().await;
        t.tick().await;
    }
    println!(
        "\n{mode}: {n} first requests\n{}",
        idempotency_tests::profile::report(60)
    );
    if let Some(dir) = std::env::var_os("IDEMPOTENCY_PROFILE_SVG") {
        let path = std::path::Path::new(&dir).join(format!("fuel-{mode}.svg"));
        let title = format!("idempotency.wasm, {mode}: {n} first requests of {size} bytes");
        let svg = idempotency_tests::flame::svg(
            &idempotency_tests::profile::folded(),
            &title,
            "instructions",
        );
        std::fs::write(&path, svg).unwrap();
        println!("wrote {}", path.display());
    }
    t.finish().await;
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if let Some(n) = std::env::var("IDEMPOTENCY_HOST_PROFILE")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        for mode in [Mode::Ngx, Mode::Envoy] {
            profile(mode, n).await;
        }
        return;
    }
    println!("Wasm instructions (fuel) per request, idempotency.wasm (--profile wasm)");
    println!(
        "{:<6} {:>6} {:>8} {:>14} {:>14} {:>12} {:>12}",
        "mode", "body", "no-op", "no key", "first", "replay", "conflict"
    );
    for mode in [Mode::Ngx, Mode::Envoy] {
        for (label, size) in [("1 KiB", 1024), ("64 KiB", 64 * 1024)] {
            let [no_key, first, replay, conflict] = measure(mode, size).await;
            let floor = floor(mode, size).await;
            let ratio = no_key as f64 / floor as f64;
            println!(
                "{:<6} {:>6} {:>8} {:>8} ({ratio:.1}×) {:>14} {:>12} {:>12}",
                mode.name(),
                label,
                floor,
                no_key,
                first,
                replay,
                conflict
            );
        }
    }
}
