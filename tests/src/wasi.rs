//! The WASI preview1 functions a proxy-wasm module built for `wasm32-wasip1` imports,
//! implemented the way the proxy hosts do (proxy-wasm-cpp-host `exports.cc` implements
//! the same small set): no file system, stdout/stderr go to the log, the clock is the
//! host's virtual clock, `proc_exit` traps. A module importing any other WASI function
//! fails to load, naming it (see [`crate::contexts::compile`]).

use wasmtime::{Caller, Linker};
use wasmtime::{Result, bail};

use crate::abi;
use crate::contexts::World;
use crate::observed::{Level, Source};

/// The WASI functions this host provides.
pub const NAMES: &[&str] = &[
    "fd_write",
    "fd_read",
    "fd_close",
    "fd_seek",
    "fd_fdstat_get",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "environ_get",
    "environ_sizes_get",
    "args_get",
    "args_sizes_get",
    "clock_time_get",
    "clock_res_get",
    "random_get",
    "proc_exit",
    "sched_yield",
    "poll_oneoff",
];

const ESUCCESS: u32 = 0;
const EBADF: u32 = 8;
const ENOSYS: u32 = 52;

const M: &str = "wasi_snapshot_preview1";

pub fn link(linker: &mut Linker<World>) -> Result<()> {
    linker.func_wrap(
        M,
        "fd_write",
        |mut c: Caller<'_, World>, fd: u32, iovs: u32, n: u32, written: u32| -> Result<u32> {
            let mut bytes = Vec::new();
            for i in 0..n {
                let iov = abi::read(&mut c, iovs + i * 8, 8)?;
                let ptr = u32::from_le_bytes(iov[0..4].try_into()?);
                let len = u32::from_le_bytes(iov[4..8].try_into()?);
                bytes.extend(abi::read(&mut c, ptr, len)?);
            }
            let level = match fd {
                1 => Level::Info,
                2 => Level::Error,
                _ => return Ok(EBADF),
            };
            let text = String::from_utf8_lossy(&bytes);
            let text = text.trim_end_matches('\n');
            if !text.is_empty() {
                let world = c.data();
                world.observed.lock().unwrap().log(
                    level,
                    Source::Stdio,
                    world.current,
                    text.to_string(),
                );
            }
            abi::write_u32(&mut c, written, bytes.len() as u32)?;
            Ok(ESUCCESS)
        },
    )?;
    linker.func_wrap(
        M,
        "fd_read",
        |_: Caller<'_, World>, _: u32, _: u32, _: u32, _: u32| Ok(EBADF),
    )?;
    linker.func_wrap(M, "fd_close", |_: Caller<'_, World>, _: u32| Ok(EBADF))?;
    linker.func_wrap(
        M,
        "fd_seek",
        |_: Caller<'_, World>, _: u32, _: i64, _: u32, _: u32| Ok(EBADF),
    )?;
    linker.func_wrap(
        M,
        "fd_fdstat_get",
        |mut c: Caller<'_, World>, fd: u32, ptr: u32| -> Result<u32> {
            if fd > 2 {
                return Ok(EBADF);
            }
            // fdstat: filetype u8 (2 = character device), flags u16, rights u64 x2.
            let mut stat = [0u8; 24];
            stat[0] = 2;
            abi::write(&mut c, ptr, &stat)?;
            Ok(ESUCCESS)
        },
    )?;
    linker.func_wrap(
        M,
        "fd_prestat_get",
        |_: Caller<'_, World>, _: u32, _: u32| Ok(EBADF),
    )?;
    linker.func_wrap(
        M,
        "fd_prestat_dir_name",
        |_: Caller<'_, World>, _: u32, _: u32, _: u32| Ok(EBADF),
    )?;
    for (sizes, get) in [
        ("environ_sizes_get", "environ_get"),
        ("args_sizes_get", "args_get"),
    ] {
        linker.func_wrap(
            M,
            sizes,
            |mut c: Caller<'_, World>, count: u32, size: u32| -> Result<u32> {
                abi::write_u32(&mut c, count, 0)?;
                abi::write_u32(&mut c, size, 0)?;
                Ok(ESUCCESS)
            },
        )?;
        linker.func_wrap(M, get, |_: Caller<'_, World>, _: u32, _: u32| Ok(ESUCCESS))?;
    }
    linker.func_wrap(
        M,
        "clock_time_get",
        |mut c: Caller<'_, World>, _id: u32, _precision: i64, ptr: u32| -> Result<u32> {
            let now = c.data().now_ns;
            abi::write_u64(&mut c, ptr, now)?;
            Ok(ESUCCESS)
        },
    )?;
    linker.func_wrap(
        M,
        "clock_res_get",
        |mut c: Caller<'_, World>, _id: u32, ptr: u32| -> Result<u32> {
            abi::write_u64(&mut c, ptr, 1)?;
            Ok(ESUCCESS)
        },
    )?;
    linker.func_wrap(
        M,
        "random_get",
        |mut c: Caller<'_, World>, ptr: u32, len: u32| -> Result<u32> {
            let mut bytes = Vec::with_capacity(len as usize);
            let world = c.data_mut();
            while bytes.len() < len as usize {
                // xorshift64*: deterministic per host, good enough for hash seeds.
                world.rng ^= world.rng >> 12;
                world.rng ^= world.rng << 25;
                world.rng ^= world.rng >> 27;
                let v = world.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            bytes.truncate(len as usize);
            abi::write(&mut c, ptr, &bytes)?;
            Ok(ESUCCESS)
        },
    )?;
    linker.func_wrap(
        M,
        "proc_exit",
        |_: Caller<'_, World>, code: u32| -> Result<()> { bail!("proc_exit({code})") },
    )?;
    linker.func_wrap(M, "sched_yield", |_: Caller<'_, World>| Ok(ESUCCESS))?;
    linker.func_wrap(
        M,
        "poll_oneoff",
        |_: Caller<'_, World>, _: u32, _: u32, _: u32, _: u32| Ok(ENOSYS),
    )?;
    Ok(())
}
