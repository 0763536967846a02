//! The Redis store: one Redis (`--redis-url`) or a Redis Cluster (`--redis-cluster-urls`),
//! shared by any number of server processes.
//!
//! # One key, one script, one step
//!
//! Each idempotency key is ONE Redis hash, `<prefix><key>`: `state` (`allocated` or
//! `completed`), `expires_at` (ms since the epoch: the lease's end or the retention's),
//! `token` (while allocated), `fingerprint` (when one was presented) and `capture` (the
//! response as JSON, once completed). Each operation is ONE Lua script over that one key
//! (`redis/allocate.lua`, `redis/record.lua`, `redis/release.lua`): Redis runs a script
//! atomically, so the read, the decision of the state machine of [`crate::store`] and the write
//! happen with nothing else on the key in between, whichever process sent them. One key per
//! call also means no cross-slot work in a cluster: the script goes to the key's primary.
//!
//! The scripts are loaded once (`SCRIPT LOAD` at start, on every node of a cluster) and
//! called by their SHA1 (`EVALSHA`); after a Redis restart or failover that lost them, the
//! `NOSCRIPT` answer makes [`Script`] load them again and retry, once.
//!
//! # Time
//!
//! The scripts read Redis's own clock (`TIME`), not the server process's: every process
//! sharing the Redis sees the same instant, so their clocks need not agree, and the decisions
//! of the scripts agree with Redis's own key expiry (`PEXPIREAT` at the entry's `expires_at`,
//! or for a lease [`TAKEOVER_WINDOW`](super::TAKEOVER_WINDOW) later, so that the allocation
//! that takes an expired lease over is told so), which reclaims the memory of expired keys. As everywhere, an entry whose `expires_at` has
//! passed is free to every operation whether or not Redis has deleted it yet. (Redis 7
//! replicates a script's effects, not the script, so reading `TIME` before writing is allowed
//! and replicas and the AOF get the absolute `PEXPIREAT`.)
//!
//! # Durability
//!
//! An answer is sent once Redis has acknowledged the script. What that acknowledgement is
//! worth is Redis's configuration: with `appendonly yes` and `appendfsync always` the change is
//! in the primary's fsynced AOF; with `everysec` up to about a second of acknowledged writes
//! can be lost in a crash of the host; replication is asynchronous. `--redis-wait-replicas N`
//! adds `WAIT N` after each write (on the key's primary): the answer then waits until N
//! replicas have the change, and is a 503 if they do not within `--redis-wait-timeout`.
//! See the README's durability table.

use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::ClusterClient;
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use ::redis::{Cmd, Pipeline, RedisError, RedisFuture, Script, ScriptInvocation, Value};
use async_trait::async_trait;
use idempotency_spec::Capture;

use super::{
    Allocate, AllocateOutcome, BatchOp, BatchOutcome, Closed, Record, RecordOutcome, Release,
    ReleaseOutcome, StartAttempt, Store, StoreError, new_lease_token, retry_start,
};
use crate::config::redact_url;

/// Where the Redis is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One Redis (its primary), e.g. `redis://127.0.0.1:6379/0`.
    Single(String),
    /// Some nodes of a Redis Cluster; the others are discovered.
    Cluster(Vec<String>),
}

/// How the Redis store is opened.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub target: RedisTarget,
    /// Prepended to every key.
    pub key_prefix: String,
    /// The most one operation may take (connecting included) before it is a 503.
    pub timeout: Duration,
    /// How long `open` keeps trying to reach Redis.
    pub start_timeout: Duration,
    /// Replicas that must have a write before it is answered (`WAIT`); 0: none.
    pub wait_replicas: u32,
    pub wait_timeout: Duration,
}

impl RedisOptions {
    /// Defaults of the binary for `target`.
    pub fn new(target: RedisTarget) -> RedisOptions {
        RedisOptions {
            target,
            key_prefix: "idempotency:".into(),
            timeout: Duration::from_secs(2),
            start_timeout: Duration::from_secs(30),
            wait_replicas: 0,
            wait_timeout: Duration::from_secs(1),
        }
    }

    fn describe(&self) -> String {
        match &self.target {
            RedisTarget::Single(url) => redact_url(url),
            RedisTarget::Cluster(urls) => format!(
                "the cluster of {}",
                urls.iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// The three scripts, each the state machine's operation of the same name.
struct Scripts {
    allocate: Script,
    record: Script,
    release: Script,
}

impl Scripts {
    fn new() -> Scripts {
        Scripts {
            allocate: Script::new(include_str!("redis/allocate.lua")),
            record: Script::new(include_str!("redis/record.lua")),
            release: Script::new(include_str!("redis/release.lua")),
        }
    }
}

/// A connection to a single Redis (reconnecting by itself) or to a cluster (following its
/// slots); both are cheap handles over multiplexed connections, cloned per call.
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

/// The Redis store.
pub struct RedisStore {
    connection: Connection,
    scripts: Scripts,
    prefix: String,
    timeout: Duration,
    wait_replicas: u32,
    wait_timeout: Duration,
    closed: Closed,
}

/// The longest lease or retention handed to a script, in ms (about 35,000 years): past it a
/// Lua number (a double) would lose milliseconds. Longer durations are clamped.
const MAX_MS: u64 = 1 << 50;
// A Lua number is a double: every integer up to 2^53 is exact, and any instant until the year
// 2100 plus MAX_MS is below that.
const _: () = assert!(MAX_MS + 4_102_444_800_000 < 1 << 53);

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).min(MAX_MS)
}

impl RedisStore {
    /// Connect and load the scripts, retrying for `options.start_timeout` (Redis may start
    /// after the server). Fails with one line naming the Redis (without its password).
    pub async fn open(options: RedisOptions) -> anyhow::Result<RedisStore> {
        let target = options.describe();
        let store = retry_start(&format!("Redis at {target}"), options.start_timeout, || {
            RedisStore::connect(&options)
        })
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the Redis store at {target}: {e}"))?;
        tracing::info!(redis = %target, "redis store open");
        Ok(store)
    }

    async fn connect(options: &RedisOptions) -> Result<RedisStore, StartAttempt> {
        let timeout = options.timeout;
        // A WAIT holds its answer for up to its own timeout.
        let response_timeout = timeout + options.wait_timeout;
        let connect = async {
            match &options.target {
                RedisTarget::Single(url) => {
                    let client = ::redis::Client::open(url.as_str()).map_err(fatal)?;
                    let config = ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(timeout))
                        .set_response_timeout(Some(response_timeout))
                        // Reconnections (after a Redis restart) are tried in the background,
                        // a few times, quickly; a call meanwhile is a 503.
                        .set_number_of_retries(2)
                        .set_max_delay(Duration::from_millis(500));
                    ConnectionManager::new_with_config(client, config)
                        .await
                        .map(Connection::Single)
                        .map_err(transient)
                }
                RedisTarget::Cluster(urls) => {
                    let client = ClusterClient::builder(urls.iter().map(String::as_str))
                        .connection_timeout(timeout)
                        .response_timeout(response_timeout)
                        .build()
                        .map_err(fatal)?;
                    client
                        .get_async_connection()
                        .await
                        .map(Connection::Cluster)
                        .map_err(transient)
                }
            }
        };
        let mut connection = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| StartAttempt::Transient(format!("no answer within {timeout:?}")))??;
        let scripts = Scripts::new();
        for script in [&scripts.allocate, &scripts.record, &scripts.release] {
            tokio::time::timeout(timeout, script.load_async(&mut connection))
                .await
                .map_err(|_| StartAttempt::Transient("loading the scripts timed out".into()))?
                .map_err(transient)?;
        }
        Ok(RedisStore {
            connection,
            scripts,
            prefix: options.key_prefix.clone(),
            timeout,
            wait_replicas: options.wait_replicas,
            wait_timeout: options.wait_timeout,
            closed: Closed::default(),
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// The prefixed key and the `record.lua` invocation of a record.
    fn record_script(&self, request: &Record) -> (String, ScriptInvocation<'_>) {
        let key = self.key(&request.key);
        let capture = serde_json::to_vec(&request.capture).expect("a capture always encodes");
        let (presented, token) = presented(request.lease_token.as_deref());
        let mut script = self.scripts.record.prepare_invoke();
        script
            .key(&key)
            .arg(presented)
            .arg(token)
            .arg(millis(request.retention))
            .arg(capture);
        (key, script)
    }

    /// The prefixed key and the `release.lua` invocation of a release.
    fn release_script(&self, request: &Release) -> (String, ScriptInvocation<'_>) {
        let key = self.key(&request.key);
        let (presented, token) = presented(request.lease_token.as_deref());
        let mut script = self.scripts.release.prepare_invoke();
        script.key(&key).arg(presented).arg(token);
        (key, script)
    }

    /// Run one call to Redis within the operation's time limit.
    async fn call<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.closed.check()?;
        let limit = self.timeout
            + if self.wait_replicas > 0 {
                self.wait_timeout
            } else {
                Duration::ZERO
            };
        tokio::time::timeout(limit, call)
            .await
            .unwrap_or_else(|_| Err(StoreError::TimedOut(format!("no answer within {limit:?}"))))
    }

    /// Run one operation's script (invoked on `key`), read its answer with `parse`, and when
    /// that answer is a write (`wrote`), wait for the replicas ([`RedisStore::replicate`]).
    async fn run<T>(
        &self,
        key: &str,
        script: &ScriptInvocation<'_>,
        parse: impl FnOnce(Value) -> Result<T, StoreError>,
        wrote: impl FnOnce(&T) -> bool,
    ) -> Result<T, StoreError> {
        self.call(async {
            let mut connection = self.connection.clone();
            let value: Value = script
                .invoke_async(&mut connection)
                .await
                .map_err(unavailable)?;
            let outcome = parse(value)?;
            if wrote(&outcome) {
                self.replicate(&mut connection, key).await?;
            }
            Ok(outcome)
        })
        .await
    }

    /// With `--redis-wait-replicas`, wait until that many replicas have this connection's
    /// writes so far (so the one just made), on the key's primary.
    async fn replicate(&self, connection: &mut Connection, key: &str) -> Result<(), StoreError> {
        if self.wait_replicas == 0 {
            return Ok(());
        }
        let mut wait = ::redis::cmd("WAIT");
        wait.arg(self.wait_replicas).arg(millis(self.wait_timeout));
        let acknowledged: i64 = match connection {
            Connection::Single(c) => wait.query_async(c).await.map_err(unavailable)?,
            Connection::Cluster(c) => {
                let route = Route::with_key(key.as_bytes(), SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                let value = c.route_command(wait, routing).await.map_err(unavailable)?;
                ::redis::from_redis_value(value).map_err(unavailable)?
            }
        };
        if acknowledged < i64::from(self.wait_replicas) {
            return Err(StoreError::Unavailable(format!(
                "the write reached {acknowledged} of {} replicas within {:?}",
                self.wait_replicas, self.wait_timeout
            )));
        }
        Ok(())
    }
}

/// Sends `scripts` as one pipeline; each item's answer, a script's error as a
/// `Value::ServerError` in its place (the others still count).
async fn pipeline<'a>(
    connection: &mut Connection,
    scripts: impl Iterator<Item = &'a ScriptInvocation<'a>>,
) -> Result<Vec<Value>, StoreError> {
    let mut pipe = ::redis::pipe();
    pipe.ignore_errors();
    for script in scripts {
        pipe.invoke_script(script);
    }
    pipe.query_async(connection).await.map_err(unavailable)
}

fn fatal(e: RedisError) -> StartAttempt {
    StartAttempt::Fatal(e.to_string())
}

fn transient(e: RedisError) -> StartAttempt {
    StartAttempt::Transient(e.to_string())
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

#[async_trait]
impl Store for RedisStore {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn allocate(&self, request: Allocate) -> Result<AllocateOutcome, StoreError> {
        let key = self.key(&request.key);
        let token = new_lease_token();
        let mut script = self.scripts.allocate.key(&key);
        script
            .arg(request.fingerprint.as_deref().unwrap_or(""))
            .arg(millis(request.lease))
            .arg(&token)
            .arg(millis(super::TAKEOVER_WINDOW));
        self.run(
            &key,
            &script,
            |value| parse_allocate(value, token),
            |outcome| matches!(outcome, AllocateOutcome::Allocated { .. }),
        )
        .await
    }

    async fn record(&self, request: Record) -> Result<RecordOutcome, StoreError> {
        let (key, script) = self.record_script(&request);
        self.run(&key, &script, parse_record, |outcome| {
            matches!(outcome, RecordOutcome::Stored { .. })
        })
        .await
    }

    async fn release(&self, request: Release) -> Result<ReleaseOutcome, StoreError> {
        let (key, script) = self.release_script(&request);
        self.run(&key, &script, parse_release, |outcome| {
            *outcome == ReleaseOutcome::Released
        })
        .await
    }

    /// One Redis: one pipeline, every item's script in one round trip, then one `WAIT` when
    /// replicas are awaited. A cluster refuses a pipeline across slots (`CROSSSLOT`), so there
    /// each item is its own call, all sent at once: the cluster client multiplexes them onto
    /// its connection to each primary, which is a pipeline per node on the wire.
    async fn batch(&self, operations: Vec<BatchOp>) -> Vec<Result<BatchOutcome, StoreError>> {
        if matches!(self.connection, Connection::Cluster(_)) {
            return super::batch_concurrently(self, operations).await;
        }
        let n = operations.len();
        let run = self.call(async {
            let scripts: Vec<(String, ScriptInvocation<'_>)> = operations
                .iter()
                .map(|op| match op {
                    BatchOp::Record(r) => self.record_script(r),
                    BatchOp::Release(r) => self.release_script(r),
                })
                .collect();
            let mut connection = self.connection.clone();
            let mut values = pipeline(&mut connection, scripts.iter().map(|(_, s)| s)).await?;
            // A Redis that lost the scripts (a restart, a failover) ran none of those items:
            // load the scripts again and send just those, once.
            let missing: Vec<usize> = (0..values.len())
                .filter(|&i| matches!(&values[i], Value::ServerError(e) if e.kind() == Some(::redis::ServerErrorKind::NoScript)))
                .collect();
            if !missing.is_empty() {
                for script in [&self.scripts.record, &self.scripts.release] {
                    script
                        .load_async(&mut connection)
                        .await
                        .map_err(unavailable)?;
                }
                let again = pipeline(&mut connection, missing.iter().map(|&i| &scripts[i].1)).await?;
                for (i, value) in missing.into_iter().zip(again) {
                    values[i] = value;
                }
            }
            let mut written = Vec::new();
            let results: Vec<Result<BatchOutcome, StoreError>> = operations
                .iter()
                .zip(values)
                .zip(&scripts)
                .map(|((op, value), (key, _))| {
                    let outcome = match (op, value) {
                        (_, Value::ServerError(e)) => Err(unavailable(e)),
                        (BatchOp::Record(_), v) => parse_record(v).map(BatchOutcome::Record),
                        (BatchOp::Release(_), v) => parse_release(v).map(BatchOutcome::Release),
                    };
                    if matches!(
                        outcome,
                        Ok(BatchOutcome::Record(RecordOutcome::Stored { .. })
                            | BatchOutcome::Release(ReleaseOutcome::Released))
                    ) {
                        written.push(key.as_str());
                    }
                    outcome
                })
                .collect();
            // Every write of this batch, before any of it is answered: one WAIT covers every
            // write the connection made so far.
            if let Some(key) = written.first() {
                self.replicate(&mut connection, key).await?;
            }
            Ok(results)
        });
        match run.await {
            Ok(results) => results,
            // No answer, or no replica acknowledgement: nothing of it can be confirmed.
            Err(e) => (0..n)
                .map(|_| Err(StoreError::Unavailable(e.to_string())))
                .collect(),
        }
    }

    /// `PING`; on a cluster, every primary must answer.
    async fn ready(&self) -> Result<(), StoreError> {
        self.call(async {
            let mut connection = self.connection.clone();
            let _: Value = ::redis::cmd("PING")
                .query_async(&mut connection)
                .await
                .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    /// Nothing to flush: every answer was sent after Redis acknowledged its write. Later calls
    /// fail with [`StoreError::Closed`]; the connections close when the store is dropped.
    async fn shutdown(&self) -> Result<(), StoreError> {
        self.closed.close();
        Ok(())
    }
}

/// The token arguments of `record.lua` and `release.lua`: `'1'` and the token when one is
/// presented, `'0'` and `''` when not (an old client: any live allocation).
fn presented(token: Option<&str>) -> (&'static str, &str) {
    match token {
        Some(token) => ("1", token),
        None => ("0", ""),
    }
}

/// A script's answer: its first element names the case.
fn reply(value: Value) -> Result<(String, Vec<Value>), StoreError> {
    let Value::Array(mut items) = value else {
        return Err(StoreError::Corrupt(format!(
            "unexpected script answer ({})",
            kind(&value)
        )));
    };
    if items.is_empty() {
        return Err(StoreError::Corrupt("an empty script answer".into()));
    }
    let rest = items.split_off(1);
    let case = text(items.remove(0))?;
    Ok((case, rest))
}

fn text(value: Value) -> Result<String, StoreError> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes)
            .map_err(|_| StoreError::Corrupt("a script answer is not UTF-8".into())),
        Value::SimpleString(s) => Ok(s),
        other => Err(StoreError::Corrupt(format!(
            "expected a string, got {}",
            kind(&other)
        ))),
    }
}

fn instant(values: &[Value]) -> Result<u64, StoreError> {
    match values.first() {
        Some(Value::Int(ms)) => {
            u64::try_from(*ms).map_err(|_| StoreError::Corrupt(format!("a negative instant {ms}")))
        }
        other => Err(StoreError::Corrupt(format!(
            "expected an instant, got {}",
            other.map_or("nothing", kind)
        ))),
    }
}

/// `allocate.lua`'s answer; `token` is the one the script was given for a new lease.
fn parse_allocate(value: Value, token: String) -> Result<AllocateOutcome, StoreError> {
    let (case, rest) = reply(value)?;
    match case.as_str() {
        "allocated" => Ok(AllocateOutcome::Allocated {
            lease_token: token,
            lease_expires_at: instant(&rest)?,
            taken_over: matches!(rest.get(1), Some(Value::Int(1))),
        }),
        "in_flight" => Ok(AllocateOutcome::InFlight {
            lease_expires_at: instant(&rest)?,
        }),
        "completed" => match rest.into_iter().next() {
            Some(Value::BulkString(json)) => serde_json::from_slice::<Capture>(&json)
                .map(AllocateOutcome::Completed)
                .map_err(|e| super::undecodable("a stored capture", &e)),
            other => Err(StoreError::Corrupt(format!(
                "a completed entry without its capture ({})",
                other.as_ref().map_or("nothing", kind)
            ))),
        },
        "mismatch" => Ok(AllocateOutcome::FingerprintMismatch),
        other => Err(corrupt(other, rest)),
    }
}

/// `record.lua`'s answer.
fn parse_record(value: Value) -> Result<RecordOutcome, StoreError> {
    let (case, rest) = reply(value)?;
    match case.as_str() {
        "stored" => Ok(RecordOutcome::Stored {
            expires_at: instant(&rest)?,
        }),
        "forbidden" => Ok(RecordOutcome::Forbidden),
        other => Err(corrupt(other, rest)),
    }
}

/// `release.lua`'s answer.
fn parse_release(value: Value) -> Result<ReleaseOutcome, StoreError> {
    let (case, rest) = reply(value)?;
    match case.as_str() {
        "released" => Ok(ReleaseOutcome::Released),
        "forbidden" => Ok(ReleaseOutcome::Forbidden),
        other => Err(corrupt(other, rest)),
    }
}

/// What kind of value Redis answered, for an error message: never the value itself, which
/// may hold a capture.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Nil => "nil",
        Value::Int(_) => "an integer",
        Value::BulkString(_) => "a bulk string",
        Value::Array(_) => "an array",
        Value::SimpleString(_) => "a simple string",
        Value::Okay => "OK",
        Value::ServerError(_) => "an error",
        _ => "another type",
    }
}

/// `{'corrupt', why}` from a script, or a case no script answers.
fn corrupt(case: &str, rest: Vec<Value>) -> StoreError {
    let why = rest
        .into_iter()
        .next()
        .and_then(|v| text(v).ok())
        .unwrap_or_default();
    let error = if case == "corrupt" {
        StoreError::Corrupt(why)
    } else {
        StoreError::Corrupt(format!("unexpected script answer {case:?} {why}"))
    };
    tracing::error!(error = %error, "a Redis entry cannot be used");
    error
}

#[cfg(test)]
mod tests {
    use super::*;
    use idempotency_spec::{Header, HeaderValue};

    fn answer(case: &str, rest: Vec<Value>) -> Value {
        let mut items = vec![Value::BulkString(case.as_bytes().to_vec())];
        items.extend(rest);
        Value::Array(items)
    }

    #[test]
    fn allocate_answers() {
        assert_eq!(
            parse_allocate(
                answer("allocated", vec![Value::Int(42), Value::Int(0)]),
                "t".into()
            )
            .unwrap(),
            AllocateOutcome::Allocated {
                lease_token: "t".into(),
                lease_expires_at: 42,
                taken_over: false,
            }
        );
        assert_eq!(
            parse_allocate(
                answer("allocated", vec![Value::Int(42), Value::Int(1)]),
                "t".into()
            )
            .unwrap(),
            AllocateOutcome::Allocated {
                lease_token: "t".into(),
                lease_expires_at: 42,
                taken_over: true,
            }
        );
        assert_eq!(
            parse_allocate(answer("in_flight", vec![Value::Int(7)]), "t".into()).unwrap(),
            AllocateOutcome::InFlight {
                lease_expires_at: 7
            }
        );
        assert_eq!(
            parse_allocate(answer("mismatch", vec![]), "t".into()).unwrap(),
            AllocateOutcome::FingerprintMismatch
        );
        let capture = Capture {
            response_status: 201,
            response_body: "$not-a-field-path".into(),
            response_headers: vec![Header {
                key: "Set-Cookie".into(),
                value: HeaderValue::Many(vec!["a=1".into(), "b=2".into()]),
            }],
        };
        let json = serde_json::to_vec(&capture).unwrap();
        assert_eq!(
            parse_allocate(
                answer("completed", vec![Value::BulkString(json)]),
                "t".into()
            )
            .unwrap(),
            AllocateOutcome::Completed(capture)
        );
    }

    #[test]
    fn what_no_script_answers_is_an_error_not_an_outcome() {
        for value in [
            answer(
                "corrupt",
                vec![Value::BulkString(b"an entry in state x".to_vec())],
            ),
            answer("completed", vec![Value::Nil]),
            answer("completed", vec![Value::BulkString(b"{not json".to_vec())]),
            answer("allocated", vec![]),
            answer("allocated", vec![Value::Int(-1)]),
            answer("surprise", vec![]),
            Value::Array(vec![]),
            Value::Okay,
        ] {
            assert!(
                matches!(
                    parse_allocate(value.clone(), "t".into()),
                    Err(StoreError::Corrupt(_))
                ),
                "{value:?}"
            );
        }
        assert!(matches!(
            parse_record(answer("released", vec![])),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            parse_release(answer("stored", vec![Value::Int(1)])),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn record_and_release_answers() {
        assert_eq!(
            parse_record(answer("stored", vec![Value::Int(99)])).unwrap(),
            RecordOutcome::Stored { expires_at: 99 }
        );
        assert_eq!(
            parse_record(answer("forbidden", vec![])).unwrap(),
            RecordOutcome::Forbidden
        );
        assert_eq!(
            parse_release(answer("released", vec![])).unwrap(),
            ReleaseOutcome::Released
        );
        assert_eq!(
            parse_release(answer("forbidden", vec![])).unwrap(),
            ReleaseOutcome::Forbidden
        );
    }

    #[test]
    fn durations_handed_to_lua_stay_exact() {
        assert_eq!(millis(Duration::from_millis(1500)), 1500);
        assert_eq!(millis(Duration::from_secs(u64::MAX)), MAX_MS);
    }
}
