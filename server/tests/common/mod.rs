//! Helpers of the HTTP tests: a client that returns what a user sees (status, headers, JSON),
//! the server in-process on an ephemeral port with a temporary data dir, the real binary as a
//! child process, and polling until a deadline (never a sleep standing in for an event).

#![allow(dead_code)]

pub mod fake_mongod;
pub mod prometheus;
pub mod redis_server;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idempotency_server::{Config, Store};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// How long anything awaited may take before the test fails (generous for a loaded CI).
pub const DEADLINE: Duration = Duration::from_secs(20);

/// An answer as a user sees it.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
    /// The body as JSON (`Null` when it is not JSON).
    pub json: Value,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn content_type(&self) -> &str {
        self.header("content-type").unwrap_or("")
    }

    /// Assert an RFC 9457 problem with this status and type, carrying the old `error` member;
    /// returns its `detail`.
    pub fn assert_problem(&self, status: u16, kind: &str) -> String {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.content_type(), "application/problem+json", "{self:?}");
        assert_eq!(self.json["type"], kind, "{self:?}");
        assert_eq!(self.json["status"], status, "{self:?}");
        assert!(self.json["title"].is_string(), "{self:?}");
        let detail = self.json["detail"].as_str().expect("a detail").to_owned();
        assert_eq!(
            self.json["error"], detail,
            "the old `error` member repeats the detail"
        );
        detail
    }

    pub fn lease_token(&self) -> String {
        assert_eq!(self.status, 202, "{self:?}");
        self.json["lease_token"]
            .as_str()
            .expect("a lease token")
            .to_owned()
    }

    pub fn retry_after(&self) -> u64 {
        self.header("retry-after")
            .expect("a Retry-After header")
            .parse()
            .expect("Retry-After in seconds")
    }
}

/// A client of one server.
#[derive(Clone)]
pub struct Client {
    pub base: String,
    http: reqwest::Client,
    token: Option<String>,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Client {
        Client {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            token: None,
        }
    }

    /// The same client, sending `Authorization: Bearer <token>`.
    pub fn with_token(&self, token: &str) -> Client {
        Client {
            token: Some(token.to_owned()),
            ..self.clone()
        }
    }

    /// Send `body` as is, without a Content-Type (as the old clients may).
    pub async fn send(&self, method: &str, path: &str, body: Option<String>) -> Answer {
        self.send_with(method, path, body, &[]).await
    }

    pub async fn send_with(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let body_text = body.clone();
        if let Some(body) = body {
            request = request.body(body);
        }
        remember_secrets(body_text.as_deref(), self.token.as_deref());
        let response = request.send().await.expect("the server answers");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.expect("a body");
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Answer {
            status,
            headers,
            text,
            json,
        }
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send("GET", path, None).await
    }

    pub async fn allocate(&self, body: Value) -> Answer {
        self.send("PUT", "/api/v2/captures", Some(body.to_string()))
            .await
    }

    pub async fn record(&self, body: Value) -> Answer {
        self.send("POST", "/api/v2/captures", Some(body.to_string()))
            .await
    }

    pub async fn release(&self, body: Value) -> Answer {
        self.send("DELETE", "/api/v2/captures", Some(body.to_string()))
            .await
    }

    /// Allocate `key` and expect a lease; returns its token.
    pub async fn lease(&self, key: &str) -> String {
        self.allocate(json!({ "idempotency_key": key }))
            .await
            .lease_token()
    }
}

/// A capture as the filter or the old plugin records it.
pub fn response(tag: &str) -> Value {
    json!({
        "response_status": 201,
        "response_body": format!("{{\"id\":\"{tag}\"}}"),
        "response_headers": [{ "key": "Content-Type", "value": "application/json" }]
    })
}

/// The server in this process, on an ephemeral port, with a temporary data dir.
pub struct TestServer {
    pub addr: SocketAddr,
    pub client: Client,
    pub dir: TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_with(|_| {}).await
    }

    /// Start with the binary's defaults, changed by `configure`.
    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> TestServer {
        watch_waits();
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::new(dir.path());
        configure(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(idempotency_server::serve(config, listener, async {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            client: Client::new(addr),
            dir,
            stop: Some(stop),
            task,
        }
    }

    /// Start on a given store (any implementation).
    pub async fn start_on(store: Arc<dyn Store>) -> TestServer {
        watch_waits();
        let dir = tempfile::tempdir().unwrap();
        let config = Config::new(dir.path());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(idempotency_server::serve_with_store(
            config,
            store,
            listener,
            async {
                let _ = stopped.await;
            },
        ));
        TestServer {
            addr,
            client: Client::new(addr),
            dir,
            stop: Some(stop),
            task,
        }
    }

    /// Shut down gracefully and return the data dir; then no log line of this process holds
    /// a key, token or body that a client sent.
    pub async fn stop(mut self) -> TempDir {
        let _ = self.stop.take().unwrap().send(());
        (&mut self.task)
            .await
            .expect("the server task")
            .expect("a clean shutdown");
        assert_nothing_sent_was_logged();
        self.dir
    }
}

/// Poll `attempt` until it returns `Some`, failing the test after [`DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    let mut pause = Duration::from_millis(10);
    loop {
        if let Some(value) = attempt().await {
            return value;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Capture this process's log (once per test binary): every in-process server's events, at
/// every level, for [`waiting_on`] and for the scan of what must never be logged
/// ([`assert_nothing_sent_was_logged`]).
pub fn watch_waits() {
    idempotency_tests::secrets::capture_backend_logs();
}

/// Wait until the in-process server waits on `key`: the synchronisation point of the wait_ms
/// tests (the holder acts only once the waiter is known to wait). The log names the key by
/// its digest, never by itself.
pub async fn waiting_on(key: &str) {
    let wanted = format!("key={}", idempotency_spec::key_digest(key));
    eventually(&format!("a wait on {key}"), || async {
        idempotency_tests::secrets::backend_lines()
            .iter()
            .any(|l| l.contains("waiting for the holder of the key") && l.contains(&wanted))
            .then_some(())
    })
    .await
}

/// Everything the tests' clients sent that must never be logged: keys, lease tokens, the
/// stored bodies, bearer tokens (see [`Client::send_with`]).
static SENT: Mutex<Option<idempotency_tests::secrets::Secrets>> = Mutex::new(None);

fn remember_secrets(body: Option<&str>, token: Option<&str>) {
    fn walk(v: &Value, into: &mut idempotency_tests::secrets::Secrets) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    if let ("idempotency_key" | "lease_token" | "response_body", Value::String(s)) =
                        (k.as_str(), v)
                    {
                        into.add(s);
                    }
                    walk(v, into);
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, into)),
            _ => {}
        }
    }
    let mut sent = SENT.lock().unwrap();
    let secrets = sent.get_or_insert_with(Default::default);
    if let Some(body) = body
        && let Ok(v) = serde_json::from_str::<Value>(body)
    {
        walk(&v, secrets);
    }
    if let Some(token) = token {
        secrets.add(token);
    }
}

/// No in-process server logged anything the tests' clients sent (so far, in this process).
pub fn assert_nothing_sent_was_logged() {
    let secrets = SENT.lock().unwrap().clone().unwrap_or_default();
    let lines = idempotency_tests::secrets::backend_lines();
    secrets.assert_not_in("backend", lines.iter().map(String::as_str));
}

/// Every setting's environment variable: cleared for child processes, so that the machine's
/// environment does not leak into a test.
const CONFIG_ENV: &[&str] = &[
    "LISTEN_ADDR",
    "DATA_DIR",
    "STORE",
    "RETENTION",
    "DEFAULT_LEASE",
    "MAX_LEASE",
    "BODY_LIMIT",
    "API_TOKEN",
    "HEADER_READ_TIMEOUT",
    "BODY_READ_TIMEOUT",
    "LOG_FORMAT",
    "RUST_LOG",
    "STORE_TIMEOUT",
    "STORE_START_TIMEOUT",
    "REDIS_URL",
    "REDIS_CLUSTER_URLS",
    "REDIS_KEY_PREFIX",
    "REDIS_WAIT_REPLICAS",
    "REDIS_WAIT_TIMEOUT",
    "MONGODB_URI",
    "MONGODB_DATABASE",
    "MONGODB_COLLECTION",
    "MONGODB_WRITE_TIMEOUT",
];

/// The real binary, as a test runs it.
pub fn binary(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_idempotency-server"));
    for name in CONFIG_ENV {
        command.env_remove(name);
    }
    // OpenTelemetry's settings too: a collector configured on this machine is not the test's.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("OTEL_") {
            command.env_remove(name);
        }
    }
    command.args(args).envs(env.iter().copied());
    command
}

/// Run the binary until it exits (it is expected to fail at start); returns its status and
/// stderr.
pub async fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String) {
    let mut child = binary(args, env)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let status = wait_for_exit(&mut child).await;
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status, stderr)
}

/// Wait for a child to exit, killing it and failing the test after [`DEADLINE`].
pub async fn wait_for_exit(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the process did not exit");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The binary running as a server on an ephemeral port, its JSON log lines read as they come.
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub client: Client,
    log: mpsc::UnboundedReceiver<Value>,
    /// Every line read so far.
    pub lines: Vec<Value>,
}

impl ServerProcess {
    pub async fn start(data_dir: &Path, args: &[&str]) -> ServerProcess {
        ServerProcess::start_with_env(data_dir, args, &[]).await
    }

    /// Start with some configuration variables set (the others are cleared).
    pub async fn start_with_env(
        data_dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> ServerProcess {
        let dir = data_dir.to_str().unwrap();
        let mut all = vec![
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            dir,
            "--log-format",
            "json",
        ];
        all.extend_from_slice(args);
        let mut env = env.to_vec();
        if !env.iter().any(|(name, _)| *name == "RUST_LOG") {
            env.push(("RUST_LOG", "info,idempotency_server=debug"));
        }
        let mut child = binary(&all, &env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let stderr = child.stderr.take().unwrap();
        let (lines, log) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let value = serde_json::from_str(&line).unwrap_or(Value::String(line));
                if lines.send(value).is_err() {
                    break;
                }
            }
        });
        let mut process = ServerProcess {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            client: Client::new(SocketAddr::from(([127, 0, 0, 1], 0))),
            log,
            lines: Vec::new(),
        };
        let listening = process
            .log_line(|l| l["fields"]["message"] == "listening")
            .await;
        let addr: SocketAddr = listening["fields"]["addr"]
            .as_str()
            .expect("the listening address")
            .parse()
            .unwrap();
        process.addr = addr;
        process.client = Client::new(addr);
        process
    }

    /// Wait for a log line matching `matches` (looking at those already read first).
    pub async fn log_line(&mut self, matches: impl Fn(&Value) -> bool) -> Value {
        if let Some(line) = self.lines.iter().find(|l| matches(l)) {
            return line.clone();
        }
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            match tokio::time::timeout_at(deadline, self.log.recv()).await {
                Ok(Some(line)) => {
                    self.lines.push(line.clone());
                    if matches(&line) {
                        return line;
                    }
                }
                Ok(None) => panic!("the server's log ended: {:#?}", self.lines),
                Err(_) => panic!("no such log line in time: {:#?}", self.lines),
            }
        }
    }

    /// Every line logged so far, reading what has not been read yet (after a request, its
    /// lines may still be on their way: call once the process has exited for all of them).
    pub fn all_lines(&mut self) -> Vec<Value> {
        while let Ok(line) = self.log.try_recv() {
            self.lines.push(line);
        }
        self.lines.clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        let result = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(result, 0, "kill({signal})");
    }

    /// SIGKILL: no chance to flush anything.
    pub async fn kill(mut self) {
        self.child.kill().unwrap();
        wait_for_exit(&mut self.child).await;
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // A failing test must not leave a server behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
