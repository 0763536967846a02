//! The release build (`--profile wasm`: opt-level 2, LTO, strip) is at most 300 KiB: every
//! gateway worker loads one instance of it per filter.

use crate::support::filter_wasm;

const LIMIT: u64 = 300 * 1024;

#[test]
fn the_release_build_is_at_most_300_kib() {
    let wasm = filter_wasm();
    let size = std::fs::metadata(&wasm).expect("the built module").len();
    assert!(
        size <= LIMIT,
        "{} is {size} bytes ({:.1} KiB), over {LIMIT} (300 KiB)",
        wasm.display(),
        size as f64 / 1024.0
    );
}
