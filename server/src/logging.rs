//! Logging: `tracing` to stderr, filtered by `RUST_LOG` (default `info`), as JSON lines or
//! human-readable ones (`LOG_FORMAT`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

use crate::config::LogFormat;

/// Install the global subscriber. An invalid `RUST_LOG` is a configuration error (one line).
pub fn init(format: LogFormat) -> Result<(), String> {
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env()
        .map_err(|e| format!("RUST_LOG is not a valid log filter: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Pretty => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
    installed.map_err(|e| format!("cannot install the logger: {e}"))
}

/// What a log line says of an idempotency key: a short digest, never the key. A key is
/// chosen by the client and may carry anything (an order number, an e-mail address); the
/// digest lets one process's lines about one key be told apart and correlated, and nothing
/// more. Keyed with a per-process random key (std's SipHash `RandomState`), so that it
/// cannot be reversed by hashing guesses, nor compared across processes.
pub fn key_digest(key: &str) -> String {
    use std::hash::BuildHasher as _;
    static STATE: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let hash = STATE
        .get_or_init(std::collections::hash_map::RandomState::new)
        .hash_one(key);
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::key_digest;

    #[test]
    fn a_key_digest_is_stable_in_a_process_and_hides_the_key() {
        let key = "order-4711-alice@example.com";
        assert_eq!(key_digest(key), key_digest(key));
        assert_ne!(key_digest(key), key_digest("order-4712-alice@example.com"));
        assert_eq!(key_digest(key).len(), 16);
        assert!(!key_digest(key).contains("4711"));
    }
}
