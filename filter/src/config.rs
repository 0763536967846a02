//! The filter's configuration: one JSON object, the same bytes in Kong, Envoy and Istio.
//!
//! `spec/filter-config.schema.json` is the one source of the names, types, ranges and
//! defaults; this parser implements exactly that schema (a native test validates sample
//! configurations with both and compares the defaults). Errors name the field with its dotted
//! path (`server.timeout_ms`) and the problem, in one line; unknown fields are rejected by name.
//!
//! The parser works on a `serde_json::Value` by hand rather than through `#[derive]`, so that
//! every error names its field, and to keep the Wasm module small.

use serde_json::{Map, Value};
use std::fmt;
use std::rc::Rc;

/// The longest `wait_ms` the backend honours.
pub const MAX_WAIT_MS: u64 = idempotency_spec::MAX_WAIT_MS;

/// A configuration error: the field (dotted path) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "invalid configuration: {}", self.problem)
        } else {
            write!(f, "invalid configuration: {}: {}", self.field, self.problem)
        }
    }
}

/// `s` quoted for an error message, as JSON writes a string (not `{:?}`, whose escaping
/// machinery added 2.6 KiB to the module for a few error lines).
pub fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// A string [`quoted`] without its quotes.
fn unquoted(q: &str) -> &str {
    q.strip_prefix('"')
        .and_then(|q| q.strip_suffix('"'))
        .unwrap_or(q)
}

fn err(field: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.to_string(),
        problem: problem.into(),
    }
}

/// What to do when the backend cannot be asked (no answer, an error status, a failed call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnServerError {
    /// Answer 503 problem+json.
    Reject,
    /// Forward the request without idempotency (logged and counted).
    Pass,
}

/// What a concurrent duplicate gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    /// 409 with `Retry-After`.
    Reject,
    /// Wait (through the backend's `wait_ms`) for the first request and get its response.
    Wait,
}

/// How the record or release call is sent at the end of the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordMode {
    /// Queued in module memory, sent from the root context's tick.
    Deferred,
    /// Sent from the HTTP context, holding the end of the response until it is answered
    /// (never on Kong, which forbids calls in response phases: there it falls back to
    /// deferred).
    Inline,
    /// Inline where the host is known to allow it (Envoy), deferred elsewhere.
    Auto,
}

/// How a keyed request's body is fingerprinted on Envoy (`envoy.request_body`). Envoy turns a
/// filter's Pause in `on_http_request_headers` into StopAllIterationAndWatermark: no body
/// callback comes until the filter resumes, unless the Wasm filter is configured with
/// `allow_on_headers_stop_iteration` (Envoy 1.35+; proxy-wasm-cpp-host#143,
/// envoyproxy/envoy#40213). Kong delivers the body whole before the upstream and ignores this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvoyBody {
    /// Allocate from the headers (request paused); the fingerprint covers method, path,
    /// content-type and the declared Content-Length, not the body bytes.
    Skip,
    /// Hold the headers until the body is read and fingerprinted (needs the 1.35 knob).
    Await,
    /// Let the headers go upstream, hold the body until it is fingerprinted and allocated.
    Stream,
}

impl EnvoyBody {
    pub fn as_str(self) -> &'static str {
        match self {
            EnvoyBody::Skip => "skip",
            EnvoyBody::Await => "await",
            EnvoyBody::Stream => "stream",
        }
    }
}

/// A set of HTTP statuses, as inclusive ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSet(pub Vec<(u16, u16)>);

impl StatusSet {
    pub fn contains(&self, status: u16) -> bool {
        self.0.iter().any(|&(lo, hi)| lo <= status && status <= hi)
    }

    /// Parses one item: `201`, `200-299` or `2xx`.
    pub fn parse_item(item: &str) -> Option<(u16, u16)> {
        fn status(s: &str) -> Option<u16> {
            let b = s.as_bytes();
            if b.len() != 3 || !b.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let n: u16 = s.parse().ok()?;
            (100..=599).contains(&n).then_some(n)
        }
        if let Some(class) = item.strip_suffix("xx") {
            let d = status(&format!("{class}00"))?;
            return Some((d, d.checked_add(99)?));
        }
        match item.split_once('-') {
            Some((lo, hi)) => Some((status(lo)?, status(hi)?)),
            None => status(item).map(|s| (s, s)),
        }
    }
}

/// The backend: where every call goes. Shared (`Rc`) with the queued calls, which keep the
/// backend of the configuration that queued them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// `host:port` on Kong; a cluster name on Envoy (`outbound|PORT||HOST` on Istio).
    pub upstream: String,
    /// `:authority` (Host) of the calls; default: `upstream`.
    pub authority: String,
    /// Prefix of `/captures`; default `/api/v2`.
    pub path_prefix: String,
    /// The path of the captures resource, `{path_prefix}/captures`.
    pub captures_path: String,
    /// The path of the batch operation the queue sends, `{path_prefix}/captures/batch`.
    pub batch_path: String,
    pub timeout_ms: u64,
    /// Bearer token for the backend's `API_TOKEN`.
    pub token: Option<String>,
    /// `Bearer {token}`: the `authorization` of every call, built once.
    pub authorization: Option<String>,
    /// Whether ngx_wasm_module takes the calls to this server as they are
    /// ([`crate::host::ngx_dispatchable`] of both paths), decided once.
    pub ngx_dispatchable: bool,
}

impl Server {
    pub fn new(
        upstream: String,
        authority: String,
        path_prefix: String,
        timeout_ms: u64,
        token: Option<String>,
    ) -> Server {
        let mut server = Server {
            upstream,
            authority,
            captures_path: format!("{path_prefix}/captures"),
            batch_path: format!("{path_prefix}/captures/batch"),
            path_prefix,
            timeout_ms,
            authorization: token.as_ref().map(|t| format!("Bearer {t}")),
            token,
            ngx_dispatchable: false,
        };
        // Every call is a PUT, POST or DELETE of one of the two paths.
        server.ngx_dispatchable =
            crate::host::ngx_dispatchable(&server, "POST", &server.captures_path)
                && crate::host::ngx_dispatchable(&server, "POST", &server.batch_path);
        server
    }
}

/// What makes up a key's scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// Request header names (lower case) whose values are part of the key.
    pub headers: Vec<String>,
    /// Whether method, host and path (without query) are part of the key.
    pub route: bool,
}

/// Bounds of the deferred record/release queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    pub max_entries: usize,
    pub max_bytes: usize,
    pub max_attempts: u32,
}

/// The parsed, validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub server: Rc<Server>,
    /// The key header's name as configured (matched case-insensitively).
    pub header: String,
    pub methods: Vec<String>,
    pub require_key: bool,
    pub scope: Scope,
    pub fingerprint: bool,
    pub lease_ms: u64,
    pub max_request_body_bytes: u64,
    pub max_capture_bytes: u64,
    pub store_status: StatusSet,
    /// Empty: no replay header.
    pub replay_header: String,
    /// Lower-case header names never replayed.
    pub strip_on_replay: Vec<String>,
    pub on_server_error: OnServerError,
    pub conflict: Conflict,
    pub wait_ms: u64,
    pub record: RecordMode,
    pub tick_ms: u64,
    pub queue: QueueConfig,
    pub envoy_body: EnvoyBody,
}

/// Whether `s` is an HTTP token (RFC 9110 §5.6.2): a header name or a method.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_visible_ascii(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// `^(/[^/?#\s]+)*$` restricted to visible ASCII: empty, or `/segment` repeated.
fn is_path_prefix(s: &str) -> bool {
    if s.is_empty() {
        return true;
    }
    let Some(rest) = s.strip_prefix('/') else {
        return false;
    };
    rest.split('/').all(|seg| {
        !seg.is_empty()
            && seg
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && !b"?#".contains(&b))
    })
}

/// One JSON object being read: tracks its path and which fields were seen.
struct Obj<'a> {
    path: String,
    map: &'a Map<String, Value>,
    known: &'static [&'static str],
}

impl<'a> Obj<'a> {
    fn new(path: &str, v: &'a Value, known: &'static [&'static str]) -> Result<Self, ConfigError> {
        let field = if path.is_empty() { "" } else { path };
        let map = v
            .as_object()
            .ok_or_else(|| err(field, format!("expected an object, got {}", kind(v))))?;
        for k in map.keys() {
            if !known.contains(&k.as_str()) {
                // Escaped: the name is the operator's bytes, and the error is one log line.
                return Err(err(&join(path, unquoted(&quoted(k))), "unknown field"));
            }
        }
        Ok(Obj {
            path: path.to_string(),
            map,
            known,
        })
    }

    fn name(&self, field: &str) -> String {
        debug_assert!(self.known.contains(&field));
        join(&self.path, field)
    }

    fn get(&self, field: &str) -> Option<&'a Value> {
        self.map.get(field)
    }

    fn string(&self, field: &str, default: &str) -> Result<String, ConfigError> {
        Ok(self
            .opt_string(field)?
            .unwrap_or_else(|| default.to_string()))
    }

    fn opt_string(&self, field: &str) -> Result<Option<String>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(err(
                &self.name(field),
                format!("expected a string, got {}", kind(v)),
            )),
        }
    }

    fn boolean(&self, field: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(field) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(err(
                &self.name(field),
                format!("expected true or false, got {}", kind(v)),
            )),
        }
    }

    fn integer(&self, field: &str, default: u64, min: u64, max: u64) -> Result<u64, ConfigError> {
        let Some(v) = self.get(field) else {
            return Ok(default);
        };
        let n = v.as_u64().filter(|n| (min..=max).contains(n));
        n.ok_or_else(|| {
            err(
                &self.name(field),
                format!("expected an integer from {min} to {max}, got {}", show(v)),
            )
        })
    }

    fn enumeration(
        &self,
        field: &str,
        default: &str,
        values: &[&str],
    ) -> Result<String, ConfigError> {
        let s = self.string(field, default)?;
        if values.contains(&s.as_str()) {
            Ok(s)
        } else {
            Err(err(
                &self.name(field),
                format!("expected one of {}, got {}", values.join(", "), quoted(&s)),
            ))
        }
    }

    /// An array of distinct strings, each checked by `item`.
    fn strings(
        &self,
        field: &str,
        default: &[&str],
        max_items: usize,
        item: impl Fn(&str) -> Result<(), String>,
    ) -> Result<Vec<String>, ConfigError> {
        let name = self.name(field);
        let Some(v) = self.get(field) else {
            return Ok(default.iter().map(|s| s.to_string()).collect());
        };
        let arr = v.as_array().ok_or_else(|| {
            err(
                &name,
                format!("expected an array of strings, got {}", kind(v)),
            )
        })?;
        if arr.len() > max_items {
            return Err(err(&name, format!("at most {max_items} items")));
        }
        let mut out: Vec<String> = Vec::with_capacity(arr.len());
        for (i, v) in arr.iter().enumerate() {
            let iname = format!("{name}[{i}]");
            let s = v
                .as_str()
                .ok_or_else(|| err(&iname, format!("expected a string, got {}", kind(v))))?;
            item(s).map_err(|p| err(&iname, p))?;
            if out.iter().any(|o| o == s) {
                return Err(err(&iname, format!("duplicate item {}", quoted(s))));
            }
            out.push(s.to_string());
        }
        Ok(out)
    }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A short rendering of a bad value for an error message (no float formatting: it would
/// pull kilobytes of code into the Wasm module).
fn show(v: &Value) -> String {
    match v {
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => u.to_string(),
            (None, Some(i)) => i.to_string(),
            _ => "a fractional number".to_string(),
        },
        // Escaped, as above: one line whatever the value holds.
        Value::String(s) if s.len() <= 40 => quoted(s),
        other => kind(other).to_string(),
    }
}

fn token_item(s: &str) -> Result<(), String> {
    if is_token(s) && s.len() <= 256 {
        Ok(())
    } else {
        Err(format!(
            "{} is not an HTTP token (RFC 9110), at most 256 characters",
            quoted(s)
        ))
    }
}

pub const DEFAULT_HEADER: &str = "Idempotency-Key";
pub const DEFAULT_METHODS: &[&str] = &["POST", "PATCH"];
pub const DEFAULT_SCOPE_HEADERS: &[&str] = &["authorization"];
pub const DEFAULT_PATH_PREFIX: &str = "/api/v2";
pub const DEFAULT_STORE_STATUS: &[&str] = &["100-499"];
pub const DEFAULT_REPLAY_HEADER: &str = "Idempotent-Replayed";

impl RecordMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordMode::Deferred => "deferred",
            RecordMode::Inline => "inline",
            RecordMode::Auto => "auto",
        }
    }
}

impl Config {
    /// Parses the plugin configuration bytes.
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(err(
                "server.upstream",
                "required (the configuration is empty; it must be a JSON object)",
            ));
        }
        let v: Value =
            serde_json::from_slice(bytes).map_err(|e| err("", format!("not JSON: {e}")))?;
        Config::from_value(&v)
    }

    pub fn from_value(v: &Value) -> Result<Config, ConfigError> {
        const TOP: &[&str] = &[
            "server",
            "header",
            "methods",
            "require_key",
            "scope",
            "fingerprint",
            "lease_ms",
            "max_request_body_bytes",
            "max_capture_bytes",
            "store_status",
            "replay_header",
            "strip_on_replay",
            "on_server_error",
            "conflict",
            "wait_ms",
            "record",
            "tick_ms",
            "queue",
            "envoy",
        ];
        let top = Obj::new("", v, TOP)?;
        // What an absent optional object reads as: every field its default.
        let absent = Value::Object(Map::new());

        // server
        let server_v = top.get("server").ok_or_else(|| err("server", "required"))?;
        let so = Obj::new(
            "server",
            server_v,
            &[
                "upstream",
                "authority",
                "path_prefix",
                "timeout_ms",
                "token",
            ],
        )?;
        let upstream = so
            .opt_string("upstream")?
            .ok_or_else(|| err("server.upstream", "required"))?;
        if !is_visible_ascii(&upstream) || upstream.len() > 1024 {
            return Err(err(
                "server.upstream",
                "must be 1 to 1024 visible ASCII characters (host:port on Kong, a cluster name on Envoy)",
            ));
        }
        let authority = match so.opt_string("authority")? {
            None => default_authority(&upstream),
            Some(a) if is_visible_ascii(&a) && a.len() <= 1024 => a,
            Some(_) => {
                return Err(err(
                    "server.authority",
                    "must be 1 to 1024 visible ASCII characters",
                ));
            }
        };
        let path_prefix = so.string("path_prefix", DEFAULT_PATH_PREFIX)?;
        if !is_path_prefix(&path_prefix) || path_prefix.len() > 256 {
            return Err(err(
                "server.path_prefix",
                format!(
                    "{} must be empty or /segment… without a trailing slash, query or fragment",
                    quoted(&path_prefix)
                ),
            ));
        }
        let timeout_ms = so.integer("timeout_ms", 2000, 1, 60_000)?;
        let token = so.opt_string("token")?;
        if let Some(t) = &token
            && (!is_visible_ascii(t) || t.len() > 4096)
        {
            return Err(err(
                "server.token",
                "must be 1 to 4096 visible ASCII characters",
            ));
        }

        // the key
        let header = top.string("header", DEFAULT_HEADER)?;
        token_item(&header).map_err(|p| err("header", p))?;
        let methods = top.strings("methods", DEFAULT_METHODS, 32, token_item)?;
        if methods.is_empty() {
            return Err(err("methods", "at least one method"));
        }
        let require_key = top.boolean("require_key", false)?;

        let sc = Obj::new(
            "scope",
            top.get("scope").unwrap_or(&absent),
            &["headers", "route"],
        )?;
        let scope = Scope {
            headers: lower_dedup(sc.strings("headers", DEFAULT_SCOPE_HEADERS, 32, token_item)?),
            route: sc.boolean("route", true)?,
        };
        let fingerprint = top.boolean("fingerprint", true)?;
        let lease_ms = top.integer("lease_ms", 60_000, 1000, 86_400_000)?;
        let max_request_body_bytes =
            top.integer("max_request_body_bytes", 1_048_576, 0, 67_108_864)?;
        let max_capture_bytes = top.integer("max_capture_bytes", 1_048_576, 0, 16_777_216)?;

        let store_items = top.strings("store_status", DEFAULT_STORE_STATUS, 64, |s| {
            let bad = || {
                format!(
                    "{} is not a status (201), a range (200-299) or a class (2xx) within 100-599",
                    quoted(s)
                )
            };
            let (lo, hi) = StatusSet::parse_item(s).ok_or_else(bad)?;
            if lo > hi {
                return Err(format!(
                    "{}: the range is empty (its first status exceeds its second)",
                    quoted(s)
                ));
            }
            Ok(())
        })?;
        // Each range once: "3xx" and "300-399" are one range, and the effective configuration
        // (`to_json`) shows it once, so that it parses back to this one.
        let mut ranges = Vec::new();
        for range in store_items.iter().filter_map(|s| StatusSet::parse_item(s)) {
            if !ranges.contains(&range) {
                ranges.push(range);
            }
        }
        let store_status = StatusSet(ranges);

        let replay_header = top.string("replay_header", DEFAULT_REPLAY_HEADER)?;
        if !replay_header.is_empty() {
            token_item(&replay_header).map_err(|p| err("replay_header", p))?;
        }
        // A replay is sent with this header: one that describes the connection or the framing
        // (`TE: true`, `Content-Length: true`) would break the response the client gets.
        if crate::capture::HOP_BY_HOP
            .iter()
            .any(|h| replay_header.eq_ignore_ascii_case(h))
        {
            return Err(err(
                "replay_header",
                format!(
                    "{} is a hop-by-hop header or Content-Length, which a replay cannot carry",
                    quoted(&replay_header)
                ),
            ));
        }
        let strip_on_replay = lower_dedup(top.strings("strip_on_replay", &[], 64, token_item)?);

        let on_server_error = match top
            .enumeration("on_server_error", "reject", &["reject", "pass"])?
            .as_str()
        {
            "pass" => OnServerError::Pass,
            _ => OnServerError::Reject,
        };
        let conflict = match top
            .enumeration("conflict", "reject", &["reject", "wait"])?
            .as_str()
        {
            "wait" => Conflict::Wait,
            _ => Conflict::Reject,
        };
        let wait_ms = top.integer("wait_ms", 10_000, 1, MAX_WAIT_MS)?;
        let record = match top
            .enumeration("record", "auto", &["deferred", "inline", "auto"])?
            .as_str()
        {
            "deferred" => RecordMode::Deferred,
            "inline" => RecordMode::Inline,
            _ => RecordMode::Auto,
        };
        let tick_ms = top.integer("tick_ms", 20, 1, 60_000)?;

        let q = Obj::new(
            "queue",
            top.get("queue").unwrap_or(&absent),
            &["max_entries", "max_bytes", "max_attempts"],
        )?;
        let queue = QueueConfig {
            max_entries: usize::try_from(q.integer("max_entries", 1000, 1, 100_000)?)
                .unwrap_or(1000),
            max_bytes: usize::try_from(q.integer("max_bytes", 33_554_432, 1024, 268_435_456)?)
                .unwrap_or(33_554_432),
            max_attempts: u32::try_from(q.integer("max_attempts", 5, 1, 20)?).unwrap_or(5),
        };
        let envoy = Obj::new(
            "envoy",
            top.get("envoy").unwrap_or(&absent),
            &["request_body"],
        )?;
        let envoy_body = match envoy
            .enumeration("request_body", "skip", &["skip", "await", "stream"])?
            .as_str()
        {
            "await" => EnvoyBody::Await,
            "stream" => EnvoyBody::Stream,
            _ => EnvoyBody::Skip,
        };

        Ok(Config {
            server: Rc::new(Server::new(
                upstream,
                authority,
                path_prefix,
                timeout_ms,
                token,
            )),
            header,
            methods,
            require_key,
            scope,
            fingerprint,
            lease_ms,
            max_request_body_bytes,
            max_capture_bytes,
            store_status,
            replay_header,
            strip_on_replay,
            on_server_error,
            conflict,
            wait_ms,
            record,
            tick_ms,
            queue,
            envoy_body,
        })
    }

    /// The effective configuration as JSON, every field present (defaults filled in), in the
    /// schema's shape; `server.token` is shown as `"***"` when set. Logged at start, and used
    /// by the tests to compare the defaults with the schema's.
    pub fn to_json(&self) -> Value {
        let mut server = serde_json::json!({
            "upstream": self.server.upstream,
            "authority": self.server.authority,
            "path_prefix": self.server.path_prefix,
            "timeout_ms": self.server.timeout_ms,
        });
        if self.server.token.is_some()
            && let Some(m) = server.as_object_mut()
        {
            m.insert("token".into(), Value::from("***"));
        }
        let store: Vec<String> = self
            .store_status
            .0
            .iter()
            .map(|&(lo, hi)| {
                if lo == hi {
                    format!("{lo}")
                } else {
                    format!("{lo}-{hi}")
                }
            })
            .collect();
        serde_json::json!({
            "server": server,
            "header": self.header,
            "methods": self.methods,
            "require_key": self.require_key,
            "scope": { "headers": self.scope.headers, "route": self.scope.route },
            "fingerprint": self.fingerprint,
            "lease_ms": self.lease_ms,
            "max_request_body_bytes": self.max_request_body_bytes,
            "max_capture_bytes": self.max_capture_bytes,
            "store_status": store,
            "replay_header": self.replay_header,
            "strip_on_replay": self.strip_on_replay,
            "on_server_error": match self.on_server_error { OnServerError::Reject => "reject", OnServerError::Pass => "pass" },
            "conflict": match self.conflict { Conflict::Reject => "reject", Conflict::Wait => "wait" },
            "wait_ms": self.wait_ms,
            "record": self.record.as_str(),
            "tick_ms": self.tick_ms,
            "queue": {
                "max_entries": self.queue.max_entries,
                "max_bytes": self.queue.max_bytes,
                "max_attempts": self.queue.max_attempts,
            },
            "envoy": { "request_body": self.envoy_body.as_str() },
        })
    }

    /// Whether `method` is one the filter applies to.
    pub fn applies_to(&self, method: &str) -> bool {
        self.methods.iter().any(|m| m == method)
    }
}

/// The `:authority` of the calls when none is configured: the upstream, except an Istio
/// cluster name (`outbound|PORT|SUBSET|HOST`), whose `|` Envoy refuses in an authority
/// (`HeaderUtility::authorityIsValid`): its HOST then, the backend's service name.
pub fn default_authority(upstream: &str) -> String {
    let parts: Vec<&str> = upstream.split('|').collect();
    match parts.as_slice() {
        ["outbound" | "inbound", port, _subset, host]
            if !host.is_empty() && !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) =>
        {
            (*host).to_string()
        }
        _ => upstream.to_string(),
    }
}

fn lower_dedup(names: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for n in names {
        let l = n.to_ascii_lowercase();
        if !out.contains(&l) {
            out.push(l);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    // On wasm32-unknown-unknown the tests run under wasm-bindgen-test (Cargo.toml).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s.as_bytes())
    }

    #[test]
    fn minimal_config_takes_every_default() {
        let c = parse(r#"{"server":{"upstream":"127.0.0.1:9000"}}"#).unwrap();
        assert_eq!(c.server.authority, "127.0.0.1:9000");
        assert_eq!(c.server.path_prefix, "/api/v2");
        assert_eq!(c.server.captures_path, "/api/v2/captures");
        assert_eq!(c.server.batch_path, "/api/v2/captures/batch");
        // Istio: the authority defaults to the service behind the cluster name.
        let istio = parse(
            r#"{"server":{"upstream":"outbound|8080||idempotency.default.svc.cluster.local"}}"#,
        )
        .unwrap();
        assert_eq!(
            istio.server.authority,
            "idempotency.default.svc.cluster.local"
        );
        assert_eq!(default_authority("outbound|8080|v1|h"), "h");
        assert_eq!(default_authority("outbound|x||h"), "outbound|x||h");
        assert_eq!(default_authority("backend"), "backend");
        assert_eq!(default_authority("127.0.0.1:9000"), "127.0.0.1:9000");
        assert_eq!(c.server.timeout_ms, 2000);
        assert_eq!(c.server.token, None);
        assert_eq!(c.header, "Idempotency-Key");
        assert_eq!(c.methods, ["POST", "PATCH"]);
        assert!(!c.require_key);
        assert_eq!(c.scope.headers, ["authorization"]);
        assert!(c.scope.route);
        assert!(c.fingerprint);
        assert_eq!(c.lease_ms, 60_000);
        assert_eq!(c.max_request_body_bytes, 1_048_576);
        assert_eq!(c.max_capture_bytes, 1_048_576);
        assert!(c.store_status.contains(100) && c.store_status.contains(499));
        assert!(!c.store_status.contains(500) && !c.store_status.contains(503));
        assert_eq!(c.replay_header, "Idempotent-Replayed");
        assert!(c.strip_on_replay.is_empty());
        assert_eq!(c.on_server_error, OnServerError::Reject);
        assert_eq!(c.conflict, Conflict::Reject);
        assert_eq!(c.wait_ms, 10_000);
        assert_eq!(c.record, RecordMode::Auto);
        assert_eq!(c.tick_ms, 20);
        assert_eq!(c.queue.max_attempts, 5);
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse(r#"{"server":{"upstream":"x","timeout_ms":"2s"}}"#).unwrap_err();
        assert_eq!(e.field, "server.timeout_ms");
        assert!(e.to_string().contains("server.timeout_ms"), "{e}");
        let e = parse(r#"{"server":{"upstream":"x","tiemout_ms":1}}"#).unwrap_err();
        assert_eq!(e.field, "server.tiemout_ms");
        assert_eq!(e.problem, "unknown field");
        let e = parse(r#"{"server":{"upstream":"x"},"methods":["POST","POST"]}"#).unwrap_err();
        assert_eq!(e.field, "methods[1]");
        let e = parse(r#"{"server":{}}"#).unwrap_err();
        assert_eq!(e.field, "server.upstream");
        let e = parse(r#"{}"#).unwrap_err();
        assert_eq!(e.field, "server");
        let e = parse("").unwrap_err();
        assert_eq!(e.field, "server.upstream");
        let e = parse("not json").unwrap_err();
        assert!(e.problem.starts_with("not JSON"));
        let e = parse(r#"{"server":{"upstream":"x"},"wait_ms":30001}"#).unwrap_err();
        assert_eq!(e.field, "wait_ms");
        let e = parse(r#"{"server":{"upstream":"x"},"record":"later"}"#).unwrap_err();
        assert_eq!(e.field, "record");
        let e = parse(r#"{"server":{"upstream":"x"},"store_status":["499-100"]}"#).unwrap_err();
        assert_eq!(e.field, "store_status[0]");
        let e =
            parse(r#"{"server":{"upstream":"x"},"scope":{"headers":["bad header"]}}"#).unwrap_err();
        assert_eq!(e.field, "scope.headers[0]");
    }

    #[test]
    fn the_replay_header_is_never_one_a_replay_cannot_carry() {
        // Found by the fuzzer (fuzz/fuzz_targets/replay.rs): `"replay_header": "TE"` was
        // taken, and every replay carried `TE: true`.
        for name in [
            "TE",
            "content-length",
            "Transfer-Encoding",
            "connection",
            "Upgrade",
        ] {
            let e = parse(&format!(
                r#"{{"server":{{"upstream":"x"}},"replay_header":"{name}"}}"#
            ))
            .unwrap_err();
            assert_eq!(e.field, "replay_header", "{name}");
        }
        assert!(parse(r#"{"server":{"upstream":"x"},"replay_header":"X-Replayed"}"#).is_ok());
    }

    #[test]
    fn the_effective_configuration_parses_back_to_itself() {
        // Found by the fuzzer: "3xx" and "300-399" were two items and one range, shown twice
        // by to_json, which then did not parse (a duplicate item).
        let c =
            parse(r#"{"server":{"upstream":"x"},"store_status":["3xx","300-399","201"]}"#).unwrap();
        assert_eq!(c.store_status, StatusSet(vec![(300, 399), (201, 201)]));
        assert_eq!(Config::from_value(&c.to_json()), Ok(c));
    }

    #[test]
    fn an_error_is_one_line_whatever_the_names_and_values_hold() {
        // Found by the fuzzer (fuzz/fuzz_targets/config.rs): an unknown field's name, or a
        // short string value, with a line break made a two-line log message.
        let e = parse(r#"{"server":{"upst\nm":"x"}}"#).unwrap_err();
        assert_eq!(e.field, r"server.upst\nm");
        let e = parse(r#"{"server":{"upstream":"x"},"lease_ms":"a\r\nb"}"#).unwrap_err();
        assert!(e.problem.ends_with(r#"got "a\r\nb""#), "{e}");
        for e in [
            parse(r#"{"server":{"upst\nm":"x"}}"#),
            parse(r#"{"server":{"upstream":"x"},"lease_ms":"a\r\nb"}"#),
            parse(r#"{"server":{"upstream":"x"},"record":"a\nb"}"#),
            parse(r#"{"server":{"upstream":"x"},"methods":["a\nb"]}"#),
            parse(r#"{"server":{"upstream":"x"},"server\n":1}"#),
        ] {
            let line = e.unwrap_err().to_string();
            assert!(!line.contains(['\n', '\r']), "{line:?}");
        }
    }

    #[test]
    fn status_items() {
        assert_eq!(StatusSet::parse_item("201"), Some((201, 201)));
        assert_eq!(StatusSet::parse_item("2xx"), Some((200, 299)));
        assert_eq!(StatusSet::parse_item("200-299"), Some((200, 299)));
        assert_eq!(StatusSet::parse_item("600"), None);
        assert_eq!(StatusSet::parse_item("6xx"), None);
        assert_eq!(StatusSet::parse_item("20"), None);
        assert_eq!(StatusSet::parse_item("+20"), None);
        assert_eq!(StatusSet::parse_item("xx"), None);
    }

    #[test]
    fn scope_headers_are_lower_case() {
        let c = parse(
            r#"{"server":{"upstream":"x"},"scope":{"headers":["X-Tenant","Authorization"]}}"#,
        )
        .unwrap();
        assert_eq!(c.scope.headers, ["x-tenant", "authorization"]);
        assert!(c.scope.route);
    }

    #[test]
    fn path_prefix_rule() {
        assert!(is_path_prefix(""));
        assert!(is_path_prefix("/api/v2"));
        assert!(!is_path_prefix("/api/"));
        assert!(!is_path_prefix("api"));
        assert!(!is_path_prefix("//"));
        assert!(!is_path_prefix("/a?b"));
    }

    #[test]
    fn token_is_masked_in_the_effective_config() {
        let c = parse(r#"{"server":{"upstream":"x","token":"s3cret"}}"#).unwrap();
        assert_eq!(c.server.token.as_deref(), Some("s3cret"));
        assert_eq!(c.server.authorization.as_deref(), Some("Bearer s3cret"));
        assert!(!c.to_json().to_string().contains("s3cret"));
    }
}
