//! `idempotency-server`: parse the configuration, install logging (and traces), run (see the
//! library).
//!
//! Exit status: 0 after a graceful shutdown (or `--help`), 1 when the server cannot start or
//! fails, 2 for an invalid configuration. Each failure is one line on stderr.

use std::process::ExitCode;

use idempotency_server::config::{Config, ConfigError};

/// See `Cargo.toml` for why not the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let config = match Config::from_args(std::env::args_os()) {
        Ok(config) => config,
        Err(ConfigError::Display(help)) => {
            let _ = help.print();
            return ExitCode::SUCCESS;
        }
        Err(ConfigError::Invalid(line)) => return invalid_configuration(&line),
    };
    // Before the runtime: the trace exporter's HTTP client makes a runtime of its own.
    let telemetry = match idempotency_server::logging::init(config.log_format) {
        Ok(telemetry) => telemetry,
        Err(line) => return invalid_configuration(&line),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return failure(&format!("cannot start the runtime: {e}")),
    };
    let served = runtime.block_on(idempotency_server::run(config));
    // The spans still buffered are exported before the process ends.
    telemetry.shutdown();
    match served {
        Ok(()) => ExitCode::SUCCESS,
        // `{:#}`: the whole cause chain on one line.
        Err(e) => failure(&format!("{e:#}")),
    }
}

fn invalid_configuration(line: &str) -> ExitCode {
    eprintln!("idempotency-server: invalid configuration: {line}");
    ExitCode::from(2)
}

fn failure(line: &str) -> ExitCode {
    eprintln!("idempotency-server: {line}");
    ExitCode::from(1)
}
