//! Backend faults, seen from the filter: the backend down, silent beyond `timeout_ms`,
//! answering garbage, a 500, a body that is not an answer, a truncated body, or closing the
//! connection in the middle of its status line. For each, both `on_server_error` settings in
//! both host modes: every client gets its answer within the time-out (503, or the upstream's
//! response with `pass`), no request reaches the upstream twice, the filter never traps.
//! Then the same faults on the record call only: the client still gets the upstream's
//! response, once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use idempotency_tests::{DeadPort, Mode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::both_modes;
use crate::harness::Gateway;

/// What a faulty backend does with a call, given its request head.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Nothing listens.
    Down,
    /// Reads the call and never answers (the connection stays open).
    Silent,
    /// Bytes that are not HTTP.
    Garbage,
    /// `500 Internal Server Error`.
    ServerError,
    /// A 202 whose body is not JSON.
    NotAnAnswer,
    /// A 202 announcing 200 bytes, sending 11, then closing.
    Truncated,
    /// `HTTP/1.1 20`, then the connection closes.
    ClosedMidAnswer,
}

const FAULTS: [Fault; 7] = [
    Fault::Down,
    Fault::Silent,
    Fault::Garbage,
    Fault::ServerError,
    Fault::NotAnAnswer,
    Fault::Truncated,
    Fault::ClosedMidAnswer,
];

/// What the fault sends (`None`: nothing, ever).
fn bytes_of(fault: Fault) -> Option<&'static [u8]> {
    match fault {
        Fault::Down | Fault::Silent => None,
        Fault::Garbage => Some(b"\x00\x01\xfe garbage \r\n\r\n"),
        Fault::ServerError => {
            Some(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n")
        }
        Fault::NotAnAnswer => Some(
            b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: 9\r\n\r\nnot json!",
        ),
        Fault::Truncated => Some(
            b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n{\"lease_tok",
        ),
        Fault::ClosedMidAnswer => Some(b"HTTP/1.1 20"),
    }
}

/// A grant of the allocation, as the real backend gives it.
const GRANTED: &[u8] = b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: 63\r\n\r\n{\"lease_token\":\"t-1\",\"lease_expires_at\":\"2100-01-01T00:00:00Z\"}";

/// A backend on raw TCP: reads one call (head and `content-length` body), then answers what
/// `answer` says for its head, and closes.
async fn raw_backend(
    answer: impl Fn(&str) -> Option<&'static [u8]> + Send + Sync + 'static,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                let head = loop {
                    let Ok(n) = stream.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        break String::from_utf8_lossy(&seen[..end + 4]).into_owned();
                    }
                };
                match answer(&head) {
                    Some(bytes) => {
                        let _ = stream.write_all(bytes).await;
                        let _ = stream.shutdown().await;
                    }
                    // Silent: hold the connection until the peer goes.
                    None => {
                        while let Ok(n) = stream.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Where the backend with `fault` answers, and for `Down` the port that refuses connections
/// (refused while it lives).
async fn faulty(fault: Fault) -> (SocketAddr, Option<DeadPort>) {
    match fault {
        Fault::Down => {
            let dead = DeadPort::new();
            (dead.addr, Some(dead))
        }
        f => (raw_backend(move |_| bytes_of(f)).await, None),
    }
}

const TIMEOUT_MS: u64 = 500;
/// Every answer comes within the time-out, plus this much for a loaded machine.
const SLACK: Duration = Duration::from_secs(5);

/// Sends `n` keyed requests at once, each with its own body: returns the answers and how long
/// the slowest took.
async fn burst(gw: &Gateway, tag: &str, n: usize) -> (Vec<(u16, String)>, Duration) {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        // Two requests per key: the duplicate must not reach the upstream twice either.
        let key = format!("{tag}-{}", i / 2);
        let request = gw
            .host
            .client()
            .request("POST", &format!("/orders/{key}"))
            .header("idempotency-key", format!("\"{key}\""))
            .body(format!("{{\"order\":\"{key}\",\"copy\":{i}}}"));
        tasks.spawn(async move {
            let r = request
                .send()
                .await
                .expect("an answer, not a broken connection");
            (r.status, r.text())
        });
    }
    let mut answers = Vec::new();
    while let Some(done) = tasks.join_next().await {
        answers.push(done.unwrap());
    }
    (answers, started.elapsed())
}

fn config(on_server_error: &str) -> Value {
    json!({"on_server_error": on_server_error, "server": {"timeout_ms": TIMEOUT_MS}})
}

async fn every_allocation_fault_gives_the_configured_outcome_in_time(mode: Mode) {
    for fault in FAULTS {
        for on_error in ["reject", "pass"] {
            let what = format!("{fault:?} with {on_error}");
            let (backend, _down) = faulty(fault).await;
            let gw = Gateway::start(mode, backend, config(on_error)).await;
            let (answers, slowest) = gw.with_ticks(burst(&gw, "fault", 20)).await;
            assert!(
                slowest < Duration::from_millis(TIMEOUT_MS) + SLACK,
                "{what}: a client waited {slowest:?}"
            );
            for (status, text) in &answers {
                match on_error {
                    "reject" => {
                        assert_eq!(*status, 503, "{what}: {text}");
                        assert!(text.contains("backend-unavailable"), "{what}: {text}");
                    }
                    _ => assert_eq!(*status, 200, "{what}: {text}"),
                }
            }
            let executed = gw.api.requests();
            match on_error {
                "reject" => assert!(executed.is_empty(), "{what}: nothing forwarded"),
                _ => {
                    assert_eq!(executed.len(), answers.len(), "{what}: each forwarded");
                    let mut bodies: Vec<&[u8]> =
                        executed.iter().map(|s| s.body.as_slice()).collect();
                    bodies.sort();
                    bodies.dedup();
                    assert_eq!(bodies.len(), answers.len(), "{what}: none forwarded twice");
                }
            }
            assert!(
                gw.host.logs_containing("trap").is_empty(),
                "{what}: the filter never traps"
            );
            assert_eq!(gw.host.instances(), 1, "{what}: the instance lived");
            gw.finish().await;
        }
    }
}

async fn a_fault_on_the_record_still_gives_the_client_its_response_once(mode: Mode) {
    for fault in FAULTS {
        let what = format!("{fault:?} on the record");
        let backend = raw_backend(move |head| {
            if head.starts_with("PUT ") {
                Some(GRANTED)
            } else if let Fault::Down = fault {
                // Gone between the allocation and the record: closed without a byte.
                Some(b"")
            } else {
                bytes_of(fault)
            }
        })
        .await;
        let gw = Gateway::start(mode, backend, config("reject")).await;
        let (answers, slowest) = gw
            .with_ticks(async {
                let mut all = Vec::new();
                let mut slowest = Duration::ZERO;
                // One key at a time: each is granted, executed, then its record fails.
                for i in 0..5 {
                    let (mut a, s) = burst(&gw, &format!("rec{i}"), 1).await;
                    all.append(&mut a);
                    slowest = slowest.max(s);
                }
                (all, slowest)
            })
            .await;
        assert!(
            slowest < Duration::from_millis(TIMEOUT_MS) + SLACK,
            "{what}: a client waited {slowest:?}"
        );
        for (status, text) in &answers {
            assert_eq!(*status, 200, "{what}: the upstream's response: {text}");
        }
        assert_eq!(gw.api.requests().len(), 5, "{what}: each executed once");
        assert!(gw.host.logs_containing("trap").is_empty(), "{what}");
        gw.finish().await;
    }
}

both_modes!(
    every_allocation_fault_gives_the_configured_outcome_in_time,
    a_fault_on_the_record_still_gives_the_client_its_response_once,
);
