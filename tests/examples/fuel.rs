//! The filter's cost per request in Wasm instructions (wasmtime fuel, as the test host counts
//! it per callback), in both modes, for request and response bodies of 1 KiB and 64 KiB:
//!
//! ```sh
//! cargo run -p idempotency-tests --example fuel
//! ```
//!
//! The requests and the way they are measured are the performance suite's
//! (`idempotency_tests::measure`), so the figures are BENCHMARKS.md's fuel rows; this runs
//! them alone, against the real backend in-process. Fuel counts the guest's instructions, so
//! the figures do not depend on how the host itself was compiled (a debug build gives the
//! same numbers as `--release`). Per scenario:
//! - no key: a POST without `Idempotency-Key` (the filter only looks);
//! - first: the allocation, the copy of the response and its record (on Kong the record is
//!   sent from the root context's tick, whose cost is added);
//! - replay: the retry, answered from the stored capture (fix-ups included);
//! - conflict: a duplicate while the first is in flight (409);
//! - new route: a first request on a route the instance has not served, whose digests' first
//!   blocks are not cached yet (`idempotency::sha`); `first` is on a route it has.
//!
//! With `IDEMPOTENCY_HOST_PROFILE=<n>` it sends instead `n` first requests (1 KiB bodies, or
//! `IDEMPOTENCY_PROFILE_BODY` bytes) per mode and prints where their instructions went, by
//! guest function (`idempotency_tests::profile`, on a build of the module that keeps its
//! functions' names); with `IDEMPOTENCY_PROFILE_SVG=<dir>` also draws them as flame graphs,
//! `<dir>/fuel-ngx.svg` and `<dir>/fuel-envoy.svg`.

#[path = "../tests/filter/support.rs"]
#[allow(unused_macros, unused_imports)]
mod support;

use idempotency_tests::{Mode, build, measure};

/// Where the instructions of `n` first requests go, per guest function, in each mode.
async fn profile(n: u32) {
    let size = std::env::var("IDEMPOTENCY_PROFILE_BODY")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1024);
    let module = build::wasm_with_names("idempotency");
    let backend = support::Backend::start().await;
    for mode in [Mode::Ngx, Mode::Envoy] {
        let profile = measure::first_requests(mode, &module, backend.addr, n, size)
            .await
            .unwrap();
        println!("\n{mode}: {n} first requests\n{}", profile.report);
        if let Some(dir) = std::env::var_os("IDEMPOTENCY_PROFILE_SVG") {
            let path = std::path::Path::new(&dir).join(format!("fuel-{mode}.svg"));
            let title = format!("idempotency.wasm, {mode}: {n} first requests of {size} bytes");
            let svg = idempotency_tests::flame::svg(&profile.folded, &title, "instructions");
            std::fs::write(&path, svg).unwrap();
            println!("wrote {}", path.display());
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if let Some(n) = std::env::var("IDEMPOTENCY_HOST_PROFILE")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        profile(n).await;
        return;
    }
    let (filter, noop) = (build::wasm("idempotency"), build::wasm("noop-filter"));
    let backend = support::Backend::start().await;
    println!("Wasm instructions (fuel) per request, idempotency.wasm (--profile wasm)");
    println!(
        "{:<6} {:>6} {:>8} {:>14} {:>14} {:>12} {:>12} {:>12}",
        "mode", "body", "no-op", "no key", "first", "replay", "conflict", "new route"
    );
    for mode in [Mode::Ngx, Mode::Envoy] {
        for (label, size) in [("1 KiB", 1024), ("64 KiB", 64 * 1024)] {
            let row = measure::fuel(mode, size, &filter, &noop, backend.addr)
                .await
                .unwrap();
            let ratio = row.no_key as f64 / row.floor as f64;
            println!(
                "{:<6} {:>6} {:>8} {:>8} ({ratio:.1}×) {:>14} {:>12} {:>12} {:>12}",
                mode.name(),
                label,
                row.floor,
                row.no_key,
                row.first,
                row.replay,
                row.conflict,
                row.new_route
            );
        }
    }
}
