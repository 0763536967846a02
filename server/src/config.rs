//! Configuration: flags with environment fallbacks (clap), validated as a whole.
//!
//! Every setting has a flag and an environment variable; a flag wins over the variable, which
//! wins over the default. `RUST_LOG` (the log filter) is read by the logging setup, not here.
//! An invalid configuration is reported as ONE line (see [`ConfigError`]) and the binary exits
//! with status 2, so that a supervisor's log shows the cause and not a usage screen.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Which store keeps the captures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// A redb file in `--data-dir`, written with group commit (one process per data dir).
    Embedded,
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, for log collectors.
    Json,
    /// Human-readable lines.
    Pretty,
}

/// The server's configuration.
///
/// For in-process use (tests, benchmarks) start from [`Config::new`] and set fields directly.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "idempotency-server",
    version,
    about = "Allocates idempotency keys and records upstream responses for the gateway filter.",
    long_about = None
)]
pub struct Config {
    /// Address and port to listen on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Directory of the embedded store (created if missing; one process per directory).
    #[arg(long, env = "DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// The store that keeps the captures.
    #[arg(long, env = "STORE", value_enum, default_value_t = StoreKind::Embedded)]
    pub store: StoreKind,

    /// How long a recorded response is replayed; the key is free afterwards ("24h", "90m", "1s").
    #[arg(long, env = "RETENTION", default_value = "24h", value_parser = parse_duration)]
    pub retention: Duration,

    /// How long an allocation holds its key when the caller sends no `lease_ms`.
    #[arg(long, env = "DEFAULT_LEASE", default_value = "60s", value_parser = parse_duration)]
    pub default_lease: Duration,

    /// The longest lease a caller may ask for with `lease_ms` (longer is a 400).
    #[arg(long, env = "MAX_LEASE", default_value = "24h", value_parser = parse_duration)]
    pub max_lease: Duration,

    /// The largest request body accepted (bytes, or with a unit: "8MiB", "512KiB"); larger is a 413.
    #[arg(long, env = "BODY_LIMIT", default_value = "8MiB", value_parser = parse_byte_size)]
    pub body_limit: usize,

    /// When set, `/api/*` requires `Authorization: Bearer <token>`.
    #[arg(long, env = "API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,

    /// Log line format on stderr (the filter comes from RUST_LOG, default "info").
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,
}

/// Why the configuration was not accepted.
#[derive(Debug)]
pub enum ConfigError {
    /// `--help` or `--version`: print it and exit 0.
    Display(clap::Error),
    /// One line describing what is wrong.
    Invalid(String),
}

impl Config {
    /// The defaults of the binary, with `data_dir`, listening on `127.0.0.1:0` (an ephemeral
    /// port; [`crate::serve`] takes an already bound listener anyway).
    pub fn new(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: data_dir.into(),
            store: StoreKind::Embedded,
            retention: Duration::from_secs(24 * 3600),
            default_lease: Duration::from_secs(60),
            max_lease: Duration::from_secs(24 * 3600),
            body_limit: 8 << 20,
            api_token: None,
            log_format: LogFormat::Pretty,
        }
    }

    /// Parse the command line and the environment, then [`Config::validate`].
    pub fn from_args<I, T>(args: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let config = Config::try_parse_from(args).map_err(|e| match e.kind() {
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                ConfigError::Display(e)
            }
            _ => ConfigError::Invalid(one_line(&e)),
        })?;
        config.validate().map_err(ConfigError::Invalid)?;
        Ok(config)
    }

    /// The rules between fields that clap cannot check one value at a time.
    pub fn validate(&self) -> Result<(), String> {
        if self.default_lease < Duration::from_millis(1) {
            return Err("--default-lease must be at least 1ms".into());
        }
        if self.max_lease < self.default_lease {
            return Err(format!(
                "--default-lease ({}) must not exceed --max-lease ({})",
                humantime::format_duration(self.default_lease),
                humantime::format_duration(self.max_lease)
            ));
        }
        if self.retention < Duration::from_millis(1) {
            return Err("--retention must be at least 1ms".into());
        }
        if self.body_limit == 0 {
            return Err("--body-limit must be at least 1 byte".into());
        }
        if let Some(token) = &self.api_token
            && (token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err("--api-token (API_TOKEN) must be non-empty, without spaces".into());
        }
        Ok(())
    }
}

/// clap's message without its usage screen: its first line, without the "error: " prefix.
fn one_line(error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    let first = rendered
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    first.strip_prefix("error: ").unwrap_or(first).to_owned()
}

/// A duration in humantime's syntax ("24h", "1s", "250ms", "1h 30m").
fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. \"24h\", \"250ms\")"))
}

/// Bytes: a plain integer, or with a unit (B, KB, MB, GB, KiB, MiB, GiB), spaces allowed.
fn parse_byte_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size (expected e.g. \"8388608\", \"8MiB\")"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit '{other}' (B, KB, MB, KiB, MiB, ...)"
            ));
        }
    };
    n.checked_mul(factor)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(|| format!("'{s}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        Config::from_args(std::iter::once("idempotency-server").chain(args.iter().copied()))
    }

    fn invalid(args: &[&str]) -> String {
        match parse(args) {
            Err(ConfigError::Invalid(line)) => line,
            other => panic!("expected an invalid configuration, got {other:?}"),
        }
    }

    #[test]
    fn flags_parse() {
        let c = parse(&[
            "--listen",
            "127.0.0.1:9999",
            "--retention",
            "1s",
            "--default-lease",
            "250ms",
            "--max-lease",
            "2m",
            "--body-limit",
            "1KiB",
            "--api-token",
            "s3cret",
            "--log-format",
            "json",
            "--data-dir",
            "/tmp/x",
        ])
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:9999".parse().unwrap());
        assert_eq!(c.retention, Duration::from_secs(1));
        assert_eq!(c.default_lease, Duration::from_millis(250));
        assert_eq!(c.max_lease, Duration::from_secs(120));
        assert_eq!(c.body_limit, 1024);
        assert_eq!(c.api_token.as_deref(), Some("s3cret"));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn invalid_values_are_one_line() {
        for args in [
            &["--retention", "soon"][..],
            &["--listen", "nowhere"],
            &["--store", "floppy"],
            &["--body-limit", "8 parsecs"],
            &["--no-such-flag"],
            &["--default-lease", "25h"],
            &["--default-lease", "0s"],
            &["--api-token", ""],
        ] {
            let line = invalid(args);
            assert!(
                !line.is_empty() && !line.contains('\n'),
                "{args:?}: {line:?}"
            );
        }
        assert!(invalid(&["--default-lease", "25h"]).contains("--max-lease"));
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("8388608"), Ok(8 << 20));
        assert_eq!(parse_byte_size("8MiB"), Ok(8 << 20));
        assert_eq!(parse_byte_size("8 MiB"), Ok(8 << 20));
        assert_eq!(parse_byte_size("2kb"), Ok(2000));
        assert!(parse_byte_size("MiB").is_err());
        assert!(parse_byte_size("-1").is_err());
    }

    #[test]
    fn test_defaults_match_the_binary_defaults() {
        let parsed = parse(&["--listen", "127.0.0.1:0", "--data-dir", "d"]).unwrap();
        let built = Config::new("d");
        assert_eq!(format!("{parsed:?}"), format!("{built:?}"));
    }
}
