//! A profile of the guest: which of the module's functions its instructions (fuel) are spent
//! in. A profiling aid, off unless `IDEMPOTENCY_HOST_PROFILE` is set (the fuel example then
//! prints it) or [`set_enabled`] turns it on (the benchmark suite's flame graph); a module
//! built with names ([`crate::build::wasm_with_names`]) gives them, else function numbers.
//! The counts are kept per stack: [`report`] sums them per function and per caller, [`folded`]
//! lists them for [`crate::flame`] to draw.
//!
//! wasmtime checks an *epoch* deadline at every function entry and loop header; with the
//! deadline at the current epoch every check calls back, and the callback reads the store's
//! fuel and the guest's stack ([`WasmBacktrace`]). The fuel burnt since the previous check is
//! counted for the function that was on top then (self) and for every function on its stack
//! (total). Counts, not samples: the same module and requests give the same profile. Fuel is
//! flushed to the store at calls and returns, so the work a function does after a callee
//! returns is counted with that callee: a small blur, at the edges of calls.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use wasmtime::{Store, UpdateDeadline, WasmBacktrace};

use crate::contexts::World;

#[derive(Default)]
struct Profile {
    /// Per stack, innermost frame first: the fuel burnt with that stack. The per-function
    /// and per-caller tables of [`report`] and the folded stacks of [`folded`] are read off it.
    by_stack: HashMap<Vec<String>, u64>,
    /// Per function, how many checks it had at each offset in its body: those at the smallest
    /// are its entries (a call), the others loop headers.
    checks: HashMap<String, BTreeMap<usize, u64>>,
    /// The fuel left and the stack at the last check.
    last_fuel: u64,
    last_stack: Vec<String>,
}

impl Profile {
    fn charge(&mut self, fuel_now: u64) {
        let burnt = self.last_fuel.saturating_sub(fuel_now);
        self.last_fuel = fuel_now;
        if burnt == 0 {
            return;
        }
        *self.by_stack.entry(self.last_stack.clone()).or_default() += burnt;
    }
}

static PROFILE: Mutex<Option<Profile>> = Mutex::new(None);

/// Turned on by [`set_enabled`]; the environment variable is read once.
static SWITCH: AtomicBool = AtomicBool::new(false);

/// Whether the profile is on (`IDEMPOTENCY_HOST_PROFILE` set, or [`set_enabled`]): asked when
/// a host is made, whose instances are then profiled for their life (on an engine of their
/// own, with the epoch checks) and the others never.
pub fn enabled() -> bool {
    static ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    SWITCH.load(Ordering::Relaxed)
        || *ENV.get_or_init(|| std::env::var_os("IDEMPOTENCY_HOST_PROFILE").is_some())
}

/// Turns the profile on or off for the hosts made from now on, whatever the environment
/// says: for a process that profiles one host among others.
pub fn set_enabled(on: bool) {
    SWITCH.store(on, Ordering::Relaxed);
}

/// Makes `store` call back at every epoch check.
pub fn attach(store: &mut Store<World>) {
    PROFILE.lock().unwrap().get_or_insert_with(Profile::default);
    store.set_epoch_deadline(0);
    store.epoch_deadline_callback(|ctx| {
        let fuel = ctx.get_fuel().unwrap_or(0);
        let trace = WasmBacktrace::capture(&ctx);
        let stack: Vec<String> = trace.frames().iter().map(name).collect();
        let offset = trace.frames().first().and_then(|f| f.func_offset());
        if let Some(p) = PROFILE.lock().unwrap().as_mut() {
            p.charge(fuel);
            if let (Some(top), Some(offset)) = (stack.first(), offset) {
                *p.checks
                    .entry(top.clone())
                    .or_default()
                    .entry(offset)
                    .or_default() += 1;
            }
            p.last_stack = stack;
        }
        Ok(UpdateDeadline::Continue(0))
    });
}

fn name(frame: &wasmtime::FrameInfo) -> String {
    frame
        .func_name()
        .map(demangle)
        .unwrap_or_else(|| format!("<function {}>", frame.func_index()))
}

/// Before a call into the guest, with the fuel the store holds.
pub fn enter(export: &str, fuel: u64) {
    if let Some(p) = PROFILE.lock().unwrap().as_mut() {
        p.last_fuel = fuel;
        p.last_stack = vec![export.to_string()];
    }
}

/// After a call into the guest: what it burnt after its last check.
pub fn leave(fuel: u64) {
    if let Some(p) = PROFILE.lock().unwrap().as_mut() {
        p.charge(fuel);
    }
}

/// Forgets what was counted so far.
pub fn reset() {
    if let Some(p) = PROFILE.lock().unwrap().as_mut() {
        *p = Profile::default();
    }
}

/// The `top` functions by their fuel on top of the stack (with their calls: the checks at the
/// entry of their body), then by their fuel anywhere on it, then per caller.
pub fn report(top: usize) -> String {
    let guard = PROFILE.lock().unwrap();
    let Some(p) = guard.as_ref() else {
        return "no profile (IDEMPOTENCY_HOST_PROFILE is not set)\n".into();
    };
    // Per function: (fuel with it on top of the stack, fuel with it anywhere on it, once
    // however often it recurs); per (function, its caller): fuel with that function on top.
    let mut by_function: HashMap<&str, (u64, u64)> = HashMap::new();
    let mut by_caller: HashMap<(&str, &str), u64> = HashMap::new();
    for (stack, &burnt) in &p.by_stack {
        if let Some(top) = stack.first() {
            let caller = stack.get(1).map_or("", String::as_str);
            *by_caller.entry((top, caller)).or_default() += burnt;
        }
        let mut seen = HashSet::new();
        for (i, name) in stack.iter().enumerate() {
            let entry = by_function.entry(name).or_default();
            if i == 0 {
                entry.0 += burnt;
            }
            if seen.insert(name) {
                entry.1 += burnt;
            }
        }
    }
    let total: u64 = p.by_stack.values().sum();
    let mut rows: Vec<_> = by_function.into_iter().collect();
    let calls = |name: &str| {
        p.checks
            .get(name)
            .and_then(|c| c.values().next().copied())
            .unwrap_or(0)
    };
    let mut out = format!("{total} fuel in all\n    self   total    calls  function\n");
    rows.sort_by(|a, b| b.1.0.cmp(&a.1.0).then(b.1.1.cmp(&a.1.1)));
    for (name, (own, all)) in rows.iter().take(top) {
        let _ = writeln!(out, "{own:>8} {all:>8} {:>8}  {name}", calls(name));
    }
    out.push_str("\nby total:\n");
    rows.sort_by_key(|r| std::cmp::Reverse(r.1.1));
    for (name, (own, all)) in rows.iter().take(top) {
        let _ = writeln!(out, "{own:>8} {all:>8}  {name}");
    }
    out.push_str("\nself, by caller:\n");
    let mut pairs: Vec<_> = by_caller.into_iter().collect();
    pairs.sort_by_key(|p| std::cmp::Reverse(p.1));
    for ((name, caller), own) in pairs.iter().take(top) {
        let _ = writeln!(out, "{own:>8}  {name}  <-  {caller}");
    }
    out
}

/// The counts per stack in the folded format of flame graph tools (Brendan Gregg's
/// `flamegraph.pl`, inferno, speedscope): a line per stack, its frames outermost first joined
/// by `;`, a space, the fuel; sorted by stack.
pub fn folded() -> String {
    let guard = PROFILE.lock().unwrap();
    let Some(p) = guard.as_ref() else {
        return String::new();
    };
    let mut sorted: BTreeMap<String, u64> = BTreeMap::new();
    for (stack, burnt) in &p.by_stack {
        // Outermost first; `;` separates frames, so one inside a name (`[u8; 32]`) becomes `,`.
        let frames: Vec<String> = stack.iter().rev().map(|f| f.replace(';', ",")).collect();
        *sorted.entry(frames.join(";")).or_default() += burnt;
    }
    let mut out = String::new();
    for (stack, fuel) in sorted {
        let _ = writeln!(out, "{stack} {fuel}");
    }
    out
}

/// A symbol demangled, without its hash.
fn demangle(name: &str) -> String {
    format!("{:#}", rustc_demangle::demangle(name))
}
