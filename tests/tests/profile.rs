//! The profiling aid (`idempotency_tests::profile`) and its flame graph: what it counts is
//! the fuel the host charges, whole, per stack of named functions. A binary of its own: the
//! profile is one per process, and the switch would profile the instances of other tests.

mod support;

use idempotency_tests::{Host, Mode, build, flame, profile};
use support::Env;

fn folded_total(folded: &str) -> u64 {
    folded
        .lines()
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
        .sum()
}

fn charged(host: &Host) -> u64 {
    let fuel = host.fuel();
    fuel.root + fuel.requests.iter().map(|r| r.fuel).sum::<u64>()
}

#[tokio::test]
async fn a_profile_counts_the_fuel_the_host_charges_per_stack_of_named_functions() {
    for mode in [Mode::Ngx, Mode::Envoy] {
        let env = Env::new(mode).await;
        // A host made before the switch is turned on, as in the benchmark suite: its engine
        // has no epoch checks, and its calls must not be counted once the switch is on.
        let plain = env.host().await;
        profile::set_enabled(true);
        let host = Host::builder(mode, build::wasm_with_names("host-fixture"))
            .upstream(env.up.addr())
            .cluster("backend", env.backend.addr())
            .start()
            .await
            .expect("the fixture loads");
        let r = host.client().request("GET", "/").send().await.unwrap();
        assert_eq!(r.status, 200);
        host.settle().await;
        profile::reset();
        let before = charged(&host);
        for _ in 0..3 {
            for h in [&host, &plain] {
                let r = env.dispatching(h, "request_headers").send().await.unwrap();
                assert_eq!(r.status, 200, "{mode}");
                h.settle().await;
            }
        }
        let after = charged(&host);
        profile::set_enabled(false);
        let folded = profile::folded();

        assert!(after > before, "{mode}: the requests burnt fuel");
        assert_eq!(
            folded_total(&folded),
            after - before,
            "{mode}: every instruction charged is in the profile, once"
        );
        // Each stack starts at the callback the host called, and names the module's functions.
        for line in folded.lines() {
            let outer = line.split(';').next().unwrap();
            assert!(
                !outer.contains("<function"),
                "{mode}: a stack starts at a callback: {line}"
            );
        }
        assert!(
            folded.lines().any(|l| l.contains(";host_fixture::")),
            "{mode}: the fixture's own functions are named:\n{folded}"
        );
        assert!(
            folded.lines().any(|l| l.contains("dispatch_http_call")),
            "{mode}: the dispatch made in on_request_headers is in it"
        );
        let svg = flame::svg(&folded, "fixture", "instructions");
        assert!(svg.contains(&format!("all: {} instructions (100.00 %)", after - before)));
        host.finish().await;
        plain.finish().await;
    }
}
