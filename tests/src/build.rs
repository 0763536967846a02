//! Building Wasm modules for tests: `cargo build -p <package> --target wasm32-wasip1
//! --profile wasm` into its own target directory (`<workspace>/target/wasm-tests`), so
//! it never waits on the build lock of the cargo that runs the tests. Once per package
//! per test binary. A copy that keeps its functions' names, for profiles, is built into
//! another (`target/wasm-names`), so that neither build undoes the other.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the workspace")
        .to_path_buf()
}

fn cells() -> &'static Mutex<HashMap<String, Arc<OnceLock<PathBuf>>>> {
    static CELLS: OnceLock<Mutex<HashMap<String, Arc<OnceLock<PathBuf>>>>> = OnceLock::new();
    CELLS.get_or_init(Default::default)
}

/// Builds a workspace package for wasm32-wasip1 and returns its `.wasm` (the cdylib
/// `<package with - as _>.wasm`). Panics with the build output if it fails.
pub fn wasm(package: &str) -> PathBuf {
    built(package, false)
}

/// [`wasm`] with the module's `name` section kept (the `wasm` profile strips it), so that a
/// profile names the functions. The same code: only the names differ.
pub fn wasm_with_names(package: &str) -> PathBuf {
    built(package, true)
}

fn built(package: &str, names: bool) -> PathBuf {
    let cell = cells()
        .lock()
        .unwrap()
        .entry(format!("{package} {names}"))
        .or_default()
        .clone();
    cell.get_or_init(|| build(package, names)).clone()
}

/// The fixture filter (`tests/fixture`).
pub fn fixture() -> PathBuf {
    wasm("host-fixture")
}

fn build(package: &str, names: bool) -> PathBuf {
    let root = workspace();
    let target_dir = root
        .join("target")
        .join(if names { "wasm-names" } else { "wasm-tests" });
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let sysroot = Command::new("rustc")
        .args(["--print", "sysroot"])
        .current_dir(&root)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if let Some(sysroot) = sysroot
        && !sysroot.is_empty()
        && !Path::new(&sysroot)
            .join("lib/rustlib/wasm32-wasip1")
            .exists()
    {
        panic!(
            "the wasm32-wasip1 target is not installed for {sysroot}: run `rustup target add wasm32-wasip1`"
        );
    }
    let mut command = Command::new(cargo);
    if names {
        command.env("CARGO_PROFILE_WASM_STRIP", "false");
    }
    let output = command
        .args([
            "build",
            "--quiet",
            "-p",
            package,
            "--target",
            "wasm32-wasip1",
            "--profile",
            "wasm",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .current_dir(&root)
        .output()
        .unwrap_or_else(|e| panic!("running cargo to build {package}: {e}"));
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stderr.contains("wasm32-wasip1") && stderr.contains("target may not be installed") {
            panic!("run rustup target add wasm32-wasip1\n{stderr}");
        }
        panic!("building {package} for wasm32-wasip1 failed:\n{stderr}");
    }
    let artefact = target_dir
        .join("wasm32-wasip1")
        .join("wasm")
        .join(format!("{}.wasm", package.replace('-', "_")));
    assert!(artefact.exists(), "{} was not produced", artefact.display());
    artefact
}
