//! Load benchmark of the embedded store's group commit, over real HTTP on loopback.
//!
//! ```sh
//! cargo run --release -p idempotency-server --example load -- --clients 64 --keys 100
//! ```
//!
//! Starts the server in-process with the embedded store in a temporary directory and drives
//! `--clients` concurrent clients, each allocating and then recording `--keys` distinct keys
//! (two durable writes per key). It runs the workload twice: with group commit, then with one
//! sync per operation (`max_batch = 1`, what a naive store does), and prints for each the
//! throughput and how many commits (each one sync to disk) carried the operations. Bounded:
//! it stops after the given number of keys, and talks to 127.0.0.1 only.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use idempotency_server::{Config, EmbeddedOptions, EmbeddedStore, Store};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Keys each client allocates and records.
    #[arg(long, default_value_t = 100)]
    keys: usize,
    /// Size of each recorded response body, in bytes.
    #[arg(long, default_value_t = 512)]
    body: usize,
    /// Run only the group-commit pass.
    #[arg(long)]
    group_commit_only: bool,
}

struct Pass {
    name: &'static str,
    seconds: f64,
    requests: usize,
    operations: u64,
    commits: u64,
}

async fn pass(name: &'static str, max_batch: usize, args: &Args) -> anyhow::Result<Pass> {
    let dir = tempfile::tempdir()?;
    let mut options = EmbeddedOptions::new(dir.path());
    options.max_batch = max_batch;
    let store = Arc::new(tokio::task::spawn_blocking(move || EmbeddedStore::open(options)).await??);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}/api/v2/captures", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(idempotency_server::serve_with_store(
        Config::new(dir.path()),
        store.clone() as Arc<dyn Store>,
        listener,
        async {
            let _ = stopped.await;
        },
    ));

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.clients)
        .timeout(Duration::from_secs(60))
        .build()?;
    let body = "x".repeat(args.body);
    let before = store.stats();
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    // Keys are base64url: letters, digits, '-' and '_'.
    let tag = name.replace(' ', "_");
    for client in 0..args.clients {
        let (http, base, body, keys) = (http.clone(), base.clone(), body.clone(), args.keys);
        let tag = tag.clone();
        clients.spawn(async move {
            for k in 0..keys {
                let key = format!("{tag}-{client}-{k}");
                let allocated = http
                    .put(&base)
                    .body(json!({ "idempotency_key": key }).to_string())
                    .send()
                    .await?;
                anyhow::ensure!(allocated.status() == 202, "allocate: {}", allocated.status());
                let token = allocated.json::<serde_json::Value>().await?["lease_token"].clone();
                let recorded = http
                    .post(&base)
                    .body(
                        json!({
                            "idempotency_key": key,
                            "lease_token": token,
                            "response": {
                                "response_status": 201,
                                "response_body": body,
                                "response_headers": [{ "key": "Content-Type", "value": "text/plain" }]
                            }
                        })
                        .to_string(),
                    )
                    .send()
                    .await?;
                anyhow::ensure!(recorded.status() == 200, "record: {}", recorded.status());
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = clients.join_next().await {
        done??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let after = store.stats();
    let _ = stop.send(());
    server.await??;
    Ok(Pass {
        name,
        seconds,
        requests: args.clients * args.keys * 2,
        operations: after.operations - before.operations,
        commits: after.commits - before.commits,
    })
}

fn report(p: &Pass) {
    println!(
        "{:<24} {:>8} requests in {:>6.2} s = {:>8.0} req/s | {:>6} store operations in {:>6} commits ({:>5.1} ops/commit, {:>6.0} syncs/s)",
        p.name,
        p.requests,
        p.seconds,
        p.requests as f64 / p.seconds,
        p.operations,
        p.commits,
        p.operations as f64 / p.commits.max(1) as f64,
        p.commits as f64 / p.seconds,
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "{} clients x {} keys, allocate + record each ({} B bodies), embedded store on a temp dir",
        args.clients, args.keys, args.body
    );
    let grouped = pass("group commit", 1024, &args).await?;
    report(&grouped);
    if !args.group_commit_only {
        let single = pass("one sync per operation", 1, &args).await?;
        report(&single);
        println!(
            "group commit: {:.1}x the throughput with {:.1}x fewer syncs",
            (grouped.requests as f64 / grouped.seconds) / (single.requests as f64 / single.seconds),
            single.commits as f64 / grouped.commits.max(1) as f64
        );
    }
    Ok(())
}
