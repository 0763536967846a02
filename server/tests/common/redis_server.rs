//! Real `redis-server` processes for the tests: a single Redis, or a Redis Cluster of three
//! primaries, each on free loopback ports with a temporary directory, killed when dropped (and
//! by the kernel if the test process dies first).
//!
//! `redis-server` comes from Debian's `redis-server` package; `scripts/test` installs it when
//! it is missing. Without it the tests fail, saying how to install it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::DEADLINE;

const INSTALL: &str = "redis-server is not installed: the Redis tests start their own. \
                       Install it with `sudo apt-get install -y redis-server` (scripts/test \
                       does this when it is missing)";

/// A free loopback port (the kernel's choice; a clash with another test is retried).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One redis-server process.
pub struct RedisServer {
    child: Child,
    pub port: u16,
    /// Its `--dir`: the AOF and `nodes.conf` live here.
    pub dir: TempDir,
    args: Vec<String>,
}

impl RedisServer {
    /// A Redis without persistence (`--save ''`, no AOF).
    pub async fn start() -> RedisServer {
        RedisServer::start_with(&[]).await
    }

    /// A Redis with extra arguments (`--appendonly yes`, ...), which come last and so win.
    pub async fn start_with(args: &[&str]) -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let mut last_error = String::new();
        // A port can be taken between our probe and redis-server's bind: try another.
        for _ in 0..5 {
            let port = free_port();
            let mut child = spawn(dir.path(), port, &args);
            match wait_until_up(&mut child, port).await {
                Ok(()) => {
                    return RedisServer {
                        child,
                        port,
                        dir,
                        args,
                    };
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_error = e;
                }
            }
        }
        panic!("redis-server did not start: {last_error}");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// SIGKILL: gone at once, no save, no goodbye to the clients.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGSTOP: the process stops answering, its connections stay open (a Redis stalled by
    /// a fork, a swap storm, a paused VM).
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT: it carries on with what it had received.
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        let result = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(result, 0, "kill({signal})");
    }

    /// Start again on the same port and directory (after [`RedisServer::kill`]).
    pub async fn restart(&mut self) {
        self.kill();
        self.child = spawn(self.dir.path(), self.port, &self.args);
        if let Err(e) = wait_until_up(&mut self.child, self.port).await {
            panic!("redis-server did not restart: {e}");
        }
    }

    /// A plain connection, to look at what the store wrote.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(dir: &Path, port: u16, extra: &[String]) -> Child {
    let mut command = Command::new("redis-server");
    command
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--dir", dir.to_str().unwrap()])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .args(["--daemonize", "no"])
        .args(["--logfile", "redis.log"])
        .args(extra)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: prctl in the child between fork and exec, no allocation, async-signal-safe.
    // The kernel kills redis-server when the thread that started it ends (with the test
    // process, at the latest), so that a test that aborts leaves no server behind.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    match command.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("{INSTALL}"),
        Err(e) => panic!("cannot start redis-server: {e}"),
    }
}

/// Poll until the server answers PING with PONG (not LOADING), or fail if it exited.
async fn wait_until_up(child: &mut Child, port: u16) -> Result<(), String> {
    let deadline = Instant::now() + DEADLINE;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Err(format!("redis-server on port {port} exited: {status}"));
        }
        if ping(port).await {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "redis-server on port {port} did not answer in time"
            ));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

async fn ping(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if stream.write_all(b"*1\r\n$4\r\nPING\r\n").await.is_err() {
        return false;
    }
    let mut answer = [0u8; 7];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), stream.read_exact(&mut answer)).await,
        Ok(Ok(_))
    ) && &answer == b"+PONG\r\n"
}

/// A Redis Cluster of three primaries (no replicas), slots split evenly.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub async fn start() -> RedisCluster {
        let mut nodes = Vec::new();
        let mut buses = Vec::new();
        for _ in 0..3 {
            // The cluster bus port is given explicitly (by default it is port + 10000, which
            // may be taken or beyond 65535).
            let bus = free_port();
            nodes.push(
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-port",
                    &bus.to_string(),
                ])
                .await,
            );
            buses.push(bus);
        }
        // What `redis-cli --cluster create` does, without its one-second pauses: give each
        // node a third of the slots, introduce them, and wait until all agree.
        let ranges = [(0, 5460), (5461, 10922), (10923, 16383)];
        for (node, (first, last)) in nodes.iter().zip(ranges) {
            let mut c = node.connection().await;
            let _: () = redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(first)
                .arg(last)
                .query_async(&mut c)
                .await
                .unwrap();
        }
        let mut first = nodes[0].connection().await;
        for (other, bus) in nodes[1..].iter().zip(&buses[1..]) {
            let _: () = redis::cmd("CLUSTER")
                .arg("MEET")
                .arg("127.0.0.1")
                .arg(other.port)
                .arg(bus)
                .query_async(&mut first)
                .await
                .unwrap();
        }
        super::eventually("the cluster to form", || async {
            for node in &nodes {
                let mut c = node.connection().await;
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut c)
                    .await
                    .unwrap();
                if !(info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3")) {
                    return None;
                }
            }
            Some(())
        })
        .await;
        RedisCluster { nodes }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// The nodes as `--redis-cluster-urls` takes them.
    pub fn urls_arg(&self) -> String {
        self.urls().join(",")
    }
}
