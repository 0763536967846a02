//! Configuration: flags with environment fallbacks (clap), validated as a whole.
//!
//! Every setting has a flag and an environment variable; a flag wins over the variable, which
//! wins over the default. `RUST_LOG` (the log filter) is read by the logging setup, not here.
//!
//! The store: `--store` (`STORE`) when given; otherwise `mongodb` when `MONGODB_URI` is set (and
//! not empty), as the old server did, else `embedded` (see [`Config::store_kind`]).
//! An invalid configuration is reported as ONE line (see [`ConfigError`]) and the binary exits
//! with status 2, so that a supervisor's log shows the cause and not a usage screen.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};

/// Which store keeps the captures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// A redb file in `--data-dir`, written with group commit (one process per data dir).
    Embedded,
    /// Redis or Redis Cluster (`--redis-url` or `--redis-cluster-urls`), shared by any number of
    /// server processes.
    Redis,
    /// MongoDB (`--mongodb-uri`), shared by any number of server processes.
    Mongodb,
}

impl StoreKind {
    /// The name used by `--store`, logs and `/-/ready`.
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Embedded => "embedded",
            StoreKind::Redis => "redis",
            StoreKind::Mongodb => "mongodb",
        }
    }
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

    /// The store that keeps the captures. When not given: mongodb if MONGODB_URI is set, else
    /// embedded.
    #[arg(long, env = "STORE", value_enum)]
    pub store: Option<StoreKind>,

    /// How long one call to a shared store (Redis, MongoDB) may take, connecting included,
    /// before the request is answered 503.
    #[arg(long, env = "STORE_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub store_timeout: Duration,

    /// How long the server keeps trying to reach a shared store at start (and to prepare it:
    /// Redis's scripts, MongoDB's indexes) before it gives up and exits with status 1.
    #[arg(long, env = "STORE_START_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub store_start_timeout: Duration,

    /// The Redis server (`redis://[user:password@]host:port/db`, or `unix:///path`).
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// Redis Cluster: some of its nodes, comma-separated (`redis://10.0.0.1:6379,redis://10.0.0.2:6379`);
    /// the others are discovered.
    #[arg(
        long,
        env = "REDIS_CLUSTER_URLS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub redis_cluster_urls: Vec<String>,

    /// Prepended to every key the server writes in Redis.
    #[arg(long, env = "REDIS_KEY_PREFIX", default_value = "idempotency:")]
    pub redis_key_prefix: String,

    /// After each write, wait until this many replicas have it (Redis WAIT); 0: do not wait.
    #[arg(long, env = "REDIS_WAIT_REPLICAS", default_value_t = 0)]
    pub redis_wait_replicas: u32,

    /// How long a write waits for --redis-wait-replicas before it is answered 503.
    #[arg(long, env = "REDIS_WAIT_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub redis_wait_timeout: Duration,

    /// The MongoDB deployment (`mongodb://...` or `mongodb+srv://...`). When set, and --store is
    /// not, the store is mongodb.
    #[arg(long, env = "MONGODB_URI", hide_env_values = true)]
    pub mongodb_uri: Option<String>,

    /// The MongoDB database.
    #[arg(long, env = "MONGODB_DATABASE", default_value = "idempotent-requests")]
    pub mongodb_database: String,

    /// The MongoDB collection, one document per key.
    #[arg(long, env = "MONGODB_COLLECTION", default_value = "captures")]
    pub mongodb_collection: String,

    /// How long a write waits for a majority of the replica set before it is answered 503
    /// (the write concern's wtimeout).
    #[arg(long, env = "MONGODB_WRITE_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub mongodb_write_timeout: Duration,

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

    /// How long a client may take to send a request's head (request line and headers) once
    /// the server waits for one, an idle keep-alive connection included; then the connection
    /// is closed without an answer. Bounds what a slow or silent client holds.
    #[arg(long, env = "HEADER_READ_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// How long a client may take to send a request's whole body, from its head on; then the
    /// answer is 408 and the connection is closed.
    #[arg(long, env = "BODY_READ_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub body_read_timeout: Duration,

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
            store: None,
            store_timeout: Duration::from_secs(2),
            store_start_timeout: Duration::from_secs(30),
            redis_url: None,
            redis_cluster_urls: Vec::new(),
            redis_key_prefix: "idempotency:".into(),
            redis_wait_replicas: 0,
            redis_wait_timeout: Duration::from_secs(1),
            mongodb_uri: None,
            mongodb_database: "idempotent-requests".into(),
            mongodb_collection: "captures".into(),
            mongodb_write_timeout: Duration::from_secs(1),
            retention: Duration::from_secs(24 * 3600),
            default_lease: Duration::from_secs(60),
            max_lease: Duration::from_secs(24 * 3600),
            body_limit: 8 << 20,
            api_token: None,
            header_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(30),
            log_format: LogFormat::Pretty,
        }
    }

    /// The warning to log when the server listens on `addr` beyond loopback without an API
    /// token: anyone who reaches the port can then allocate, record and release any key (and
    /// so replay a stored response to someone else, or free a key to have a request run
    /// twice). `None` when the address is loopback or a token is set.
    pub fn exposure_warning(&self, addr: std::net::SocketAddr) -> Option<String> {
        if addr.ip().is_loopback() || non_empty(&self.api_token).is_some() {
            return None;
        }
        Some(format!(
            "SECURITY WARNING: listening on {addr}, beyond loopback, without API_TOKEN: anyone \
             who reaches this port can read, record and release every key; set API_TOKEN (and \
             the filter's server.token), or listen on 127.0.0.1"
        ))
    }

    /// Parse the command line and the environment, then [`Config::validate`].
    pub fn from_args<I, T>(args: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Config::parse_with(Config::command(), args)
    }

    fn parse_with<I, T>(command: clap::Command, args: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let invalid = |e: clap::Error| match e.kind() {
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                ConfigError::Display(e)
            }
            _ => ConfigError::Invalid(one_line(&e)),
        };
        let matches = command.try_get_matches_from(args).map_err(invalid)?;
        let config = Config::from_arg_matches(&matches).map_err(invalid)?;
        config.validate().map_err(ConfigError::Invalid)?;
        Ok(config)
    }

    /// The store to open: `--store` when given, else mongodb when `MONGODB_URI` is set (not
    /// empty), else embedded.
    pub fn store_kind(&self) -> StoreKind {
        self.store
            .unwrap_or(if non_empty(&self.mongodb_uri).is_some() {
                StoreKind::Mongodb
            } else {
                StoreKind::Embedded
            })
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
        if self.header_read_timeout < Duration::from_millis(1) {
            return Err("--header-read-timeout must be at least 1ms".into());
        }
        if self.body_read_timeout < Duration::from_millis(1) {
            return Err("--body-read-timeout must be at least 1ms".into());
        }
        if let Some(token) = &self.api_token
            && (token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err("--api-token (API_TOKEN) must be non-empty, without spaces".into());
        }
        match self.store_kind() {
            StoreKind::Embedded => {}
            StoreKind::Redis => self.validate_redis()?,
            StoreKind::Mongodb => self.validate_mongodb()?,
        }
        Ok(())
    }

    fn validate_shared(&self) -> Result<(), String> {
        if self.store_timeout < Duration::from_millis(1) {
            return Err("--store-timeout must be at least 1ms".into());
        }
        Ok(())
    }

    /// `--redis-cluster-urls` without the blank ones, trimmed.
    pub fn redis_cluster(&self) -> Vec<&str> {
        self.redis_cluster_urls
            .iter()
            .map(|u| u.trim())
            .filter(|u| !u.is_empty())
            .collect()
    }

    fn validate_redis(&self) -> Result<(), String> {
        self.validate_shared()?;
        let cluster = self.redis_cluster();
        let urls: Vec<&str> = match (non_empty(&self.redis_url), cluster.is_empty()) {
            (None, true) => {
                return Err(
                    "--store redis needs --redis-url (REDIS_URL) or --redis-cluster-urls \
                     (REDIS_CLUSTER_URLS)"
                        .into(),
                );
            }
            (Some(_), false) => {
                return Err(
                    "--redis-url (REDIS_URL) and --redis-cluster-urls (REDIS_CLUSTER_URLS) \
                     exclude each other: give one"
                        .into(),
                );
            }
            (Some(url), true) => vec![url],
            (None, false) => cluster,
        };
        for url in urls {
            let scheme = url.split_once("://").map(|(s, _)| s);
            match scheme {
                Some("redis" | "unix" | "redis+unix") => {}
                Some("rediss") => {
                    return Err(
                        "rediss:// (TLS) is not supported by this build; use redis:// (through a \
                         TLS tunnel or proxy if the network needs one)"
                            .into(),
                    );
                }
                _ => {
                    return Err(format!(
                        "a Redis URL starts with redis:// or unix:// (got {})",
                        redact_url(url)
                    ));
                }
            }
        }
        if self.redis_key_prefix.is_empty() {
            return Err("--redis-key-prefix (REDIS_KEY_PREFIX) must not be empty".into());
        }
        if self.redis_wait_replicas > 0 && self.redis_wait_timeout < Duration::from_millis(1) {
            return Err("--redis-wait-timeout must be at least 1ms".into());
        }
        Ok(())
    }

    fn validate_mongodb(&self) -> Result<(), String> {
        self.validate_shared()?;
        let Some(uri) = non_empty(&self.mongodb_uri) else {
            return Err("--store mongodb needs --mongodb-uri (MONGODB_URI)".into());
        };
        if !(uri.starts_with("mongodb://") || uri.starts_with("mongodb+srv://")) {
            return Err(format!(
                "--mongodb-uri (MONGODB_URI) starts with mongodb:// or mongodb+srv:// (got {})",
                redact_url(uri)
            ));
        }
        if self.mongodb_database.is_empty() || self.mongodb_collection.is_empty() {
            return Err("--mongodb-database and --mongodb-collection must not be empty".into());
        }
        if self.mongodb_write_timeout < Duration::from_millis(1) {
            return Err("--mongodb-write-timeout must be at least 1ms".into());
        }
        // A document holds the whole capture and MongoDB refuses documents over 16 MiB.
        if self.body_limit > MONGODB_MAX_BODY {
            return Err(format!(
                "--body-limit must be at most 15MiB with --store mongodb (a MongoDB document \
                 is at most 16 MiB and holds the whole response), got {}",
                self.body_limit
            ));
        }
        Ok(())
    }
}

/// The largest `--body-limit` the MongoDB store accepts: a document holds the capture, and a
/// BSON document is at most 16 MiB.
pub const MONGODB_MAX_BODY: usize = 15 << 20;

/// The value, trimmed, when it is set and not empty: an empty variable counts as unset.
pub fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

/// A URL for a message: without the password it may carry (`redis://user:***@host`).
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((credentials, host)) => {
            let user = credentials.split_once(':').map_or(credentials, |(u, _)| u);
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_owned(),
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

    /// Parse flags only: the machine's environment (a MONGODB_URI set to run the MongoDB
    /// suite, say) must not change what these tests see.
    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let command = Config::command().mut_args(|arg| arg.env(None));
        Config::parse_with(
            command,
            std::iter::once("idempotency-server").chain(args.iter().copied()),
        )
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
            &["--header-read-timeout", "0s"],
            &["--body-read-timeout", "soon"],
            &["--store", "redis"],
            &["--store", "redis", "--redis-url", "http://x"],
            &["--store", "redis", "--redis-url", "rediss://x"],
            &[
                "--store",
                "redis",
                "--redis-url",
                "redis://a",
                "--redis-cluster-urls",
                "redis://b",
            ],
            &["--store", "mongodb"],
            &["--store", "mongodb", "--mongodb-uri", "postgres://x"],
            &["--mongodb-uri", "mongodb://x", "--body-limit", "16MiB"],
            &[
                "--store-timeout",
                "0s",
                "--store",
                "redis",
                "--redis-url",
                "redis://x",
            ],
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
    fn the_store_is_the_flag_else_mongodb_when_a_uri_is_set_else_embedded() {
        let kind = |args: &[&str]| parse(args).unwrap().store_kind();
        assert_eq!(kind(&[]), StoreKind::Embedded);
        assert_eq!(kind(&["--mongodb-uri", "mongodb://db"]), StoreKind::Mongodb);
        // An explicit --store wins over the URI.
        assert_eq!(
            kind(&["--mongodb-uri", "mongodb://db", "--store", "embedded"]),
            StoreKind::Embedded
        );
        assert_eq!(
            kind(&[
                "--mongodb-uri",
                "mongodb://db",
                "--store",
                "redis",
                "--redis-url",
                "redis://r"
            ]),
            StoreKind::Redis
        );
        // An empty URI is no URI.
        assert_eq!(kind(&["--mongodb-uri", ""]), StoreKind::Embedded);
        assert!(invalid(&["--store", "mongodb"]).contains("MONGODB_URI"));
        assert!(invalid(&["--store", "redis"]).contains("REDIS_URL"));
    }

    #[test]
    fn redis_and_mongodb_settings_parse() {
        let c = parse(&[
            "--store",
            "redis",
            "--redis-cluster-urls",
            "redis://a:1,redis://b:2",
            "--redis-wait-replicas",
            "1",
            "--redis-wait-timeout",
            "250ms",
            "--store-timeout",
            "3s",
        ])
        .unwrap();
        assert_eq!(c.redis_cluster_urls, ["redis://a:1", "redis://b:2"]);
        assert_eq!(c.redis_wait_replicas, 1);
        assert_eq!(c.redis_wait_timeout, Duration::from_millis(250));
        assert_eq!(c.store_timeout, Duration::from_secs(3));
        let c = parse(&["--mongodb-uri", "mongodb+srv://u:p@cluster.example"]).unwrap();
        assert_eq!(c.mongodb_database, "idempotent-requests");
        assert_eq!(c.mongodb_collection, "captures");
        assert_eq!(c.mongodb_write_timeout, Duration::from_secs(1));
    }

    #[test]
    fn urls_in_messages_hide_their_password() {
        assert_eq!(
            redact_url("mongodb://root:password123@localhost:27017/db"),
            "mongodb://root:***@localhost:27017/db"
        );
        assert_eq!(
            redact_url("redis://:s3cret@10.0.0.1:6379/0"),
            "redis://:***@10.0.0.1:6379/0"
        );
        assert_eq!(
            redact_url("redis://10.0.0.1:6379/0"),
            "redis://10.0.0.1:6379/0"
        );
        let line = invalid(&["--store", "mongodb", "--mongodb-uri", "http://u:pw@h"]);
        assert!(!line.contains("pw"), "{line}");
    }

    #[test]
    fn read_timeouts_parse() {
        let c = parse(&[
            "--header-read-timeout",
            "250ms",
            "--body-read-timeout",
            "2m",
        ])
        .unwrap();
        assert_eq!(c.header_read_timeout, Duration::from_millis(250));
        assert_eq!(c.body_read_timeout, Duration::from_secs(120));
    }

    #[test]
    fn listening_beyond_loopback_without_a_token_is_a_warning() {
        let mut c = Config::new("d");
        let warned = |c: &Config, addr: &str| c.exposure_warning(addr.parse().unwrap());
        assert!(warned(&c, "0.0.0.0:8080").unwrap().contains("API_TOKEN"));
        assert!(warned(&c, "[::]:8080").is_some());
        assert!(warned(&c, "10.1.2.3:8080").is_some());
        assert!(warned(&c, "127.0.0.1:8080").is_none());
        assert!(warned(&c, "127.8.9.1:8080").is_none());
        assert!(warned(&c, "[::1]:8080").is_none());
        c.api_token = Some("s3cret".into());
        assert!(warned(&c, "0.0.0.0:8080").is_none());
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
