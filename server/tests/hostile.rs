//! Hostile input over real HTTP: bodies at and over the limit, deeply nested JSON, invalid
//! UTF-8, a capture with a huge header array, keys and fields at their length limits, and
//! slow clients (slow-loris heads and bodies, silent connections). Each answer is what the
//! contract says (a problem, never a 5xx), nothing is lost or changed by a refused request,
//! and the server keeps serving everyone else. The warning of a server exposed without a
//! token is read from the real binary's stderr.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Answer, DEADLINE, TestServer, binary, response};
use idempotency_spec::problem_type;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An answer read off a raw connection.
#[derive(Debug)]
struct Raw {
    status: u16,
    /// Lowercase names.
    headers: Vec<(String, String)>,
    body: Value,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn assert_problem(&self, status: u16, kind: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{self:?}"
        );
        assert_eq!(self.body["type"], kind, "{self:?}");
        assert_eq!(self.body["status"], status, "{self:?}");
    }
}

/// Reads one HTTP/1.1 answer from `stream` (the server closes the connection after it, or
/// sends its Content-Length).
async fn read_answer(stream: &mut TcpStream) -> Raw {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(at) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let n = tokio::time::timeout(DEADLINE, stream.read(&mut chunk))
            .await
            .expect("an answer in time")
            .expect("reading the answer");
        assert!(
            n > 0,
            "closed before an answer: {:?}",
            String::from_utf8_lossy(&bytes)
        );
        bytes.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(bytes[..head_end].to_vec()).expect("an ASCII head");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map(|(_, v)| v.parse().unwrap())
        .expect("a Content-Length");
    let mut body = bytes[head_end + 4..].to_vec();
    while body.len() < length {
        let n = tokio::time::timeout(DEADLINE, stream.read(&mut chunk))
            .await
            .expect("the body in time")
            .expect("reading the body");
        assert!(n > 0, "closed within the body");
        body.extend_from_slice(&chunk[..n]);
    }
    Raw {
        status,
        headers,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    }
}

/// Sends `request` as is on a new connection and reads the answer.
async fn raw(addr: SocketAddr, request: &[u8]) -> Raw {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    read_answer(&mut stream).await
}

/// A request with a body and its exact Content-Length.
fn request(method: &str, path: &str, extra: impl AsRef<[u8]>, body: &[u8]) -> Vec<u8> {
    let mut r =
        format!("{method} {path} HTTP/1.1\r\nhost: backend\r\nconnection: close\r\n").into_bytes();
    r.extend_from_slice(extra.as_ref());
    r.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
    r.extend_from_slice(body);
    r
}

/// Waits until the server closes `stream` (a read returns 0 or fails), reading and dropping
/// whatever it sends; fails after [`DEADLINE`]. Returns how long after `started` that was.
async fn closed_by_the_server(stream: &mut TcpStream, started: Instant) -> Duration {
    let mut sink = [0u8; 1024];
    loop {
        match tokio::time::timeout(DEADLINE, stream.read(&mut sink)).await {
            Err(_) => panic!("the server did not close the connection within {DEADLINE:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

/// A record of `key` whose JSON is exactly `size` bytes (the body padded to it).
fn record_of_size(key: &str, token: &str, size: usize) -> String {
    let mut capture = response("x");
    capture["response_body"] = Value::String(String::new());
    let base = json!({ "idempotency_key": key, "lease_token": token, "response": capture })
        .to_string()
        .len();
    assert!(size >= base, "{size} < {base}");
    capture["response_body"] = Value::String("b".repeat(size - base));
    let body =
        json!({ "idempotency_key": key, "lease_token": token, "response": capture }).to_string();
    assert_eq!(body.len(), size);
    body
}

#[tokio::test]
async fn a_body_at_the_limit_is_read_and_one_byte_over_is_413_with_nothing_changed() {
    let server = TestServer::start_with(|c| c.body_limit = 4096).await;
    let c = &server.client;
    let token = c.lease("limit").await;
    // One byte over: refused, and the allocation is as it was.
    let over = record_of_size("limit", &token, 4097);
    let answer = c.send("POST", "/api/v2/captures", Some(over)).await;
    answer.assert_problem(413, problem_type::PAYLOAD_TOO_LARGE);
    assert_eq!(
        c.allocate(json!({ "idempotency_key": "limit" }))
            .await
            .status,
        409,
        "still allocated"
    );
    // Exactly the limit: stored, and replayed.
    let exact = record_of_size("limit", &token, 4096);
    let answer = c
        .send("POST", "/api/v2/captures", Some(exact.clone()))
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let replay = c.allocate(json!({ "idempotency_key": "limit" })).await;
    assert_eq!(replay.status, 200, "{replay:?}");
    let sent: Value = serde_json::from_str(&exact).unwrap();
    assert_eq!(replay.json["response"], sent["response"]);

    // A Content-Length over the limit is refused before a byte of the body is sent.
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(
            b"PUT /api/v2/captures HTTP/1.1\r\nhost: b\r\ncontent-length: 1073741824\r\n\r\n",
        )
        .await
        .unwrap();
    read_answer(&mut stream)
        .await
        .assert_problem(413, problem_type::PAYLOAD_TOO_LARGE);
    // A chunked body that passes the limit: refused as it goes.
    let mut chunked = b"PUT /api/v2/captures HTTP/1.1\r\nhost: b\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
    for _ in 0..5 {
        chunked.extend_from_slice(b"400\r\n");
        chunked.extend_from_slice(&[b' '; 1024]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    raw(server.addr, &chunked)
        .await
        .assert_problem(413, problem_type::PAYLOAD_TOO_LARGE);
    // The batch: the limit applies to the whole of it.
    let batch = json!({ "operations": [{ "op": "release", "idempotency_key": "limit", "lease_token": "x".repeat(5000) }] });
    c.send("POST", "/api/v2/captures/batch", Some(batch.to_string()))
        .await
        .assert_problem(413, problem_type::PAYLOAD_TOO_LARGE);
    server.stop().await;
}

#[tokio::test]
async fn deeply_nested_json_is_400_and_the_server_stays_up() {
    let server = TestServer::start().await;
    let c = &server.client;
    let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    // In an unknown field: ignored, as unknown fields are (serde_json skips a value without
    // recursing, so no depth costs stack), even two million levels deep.
    for (key, nested) in [
        ("deep-arrays", deep(2_000_000)),
        (
            "deep-objects",
            format!("{}1{}", r#"{"a":"#.repeat(500_000), "}".repeat(500_000)),
        ),
    ] {
        let body = format!(r#"{{"idempotency_key": "{key}", "x": {nested}}}"#);
        let answer = c.send("PUT", "/api/v2/captures", Some(body)).await;
        assert_eq!(answer.status, 202, "{key}: {answer:?}");
    }
    // Where a value is read (the key): refused at serde_json's depth limit.
    let answer = c
        .send(
            "PUT",
            "/api/v2/captures",
            Some(format!(r#"{{"idempotency_key": {}}}"#, deep(100_000))),
        )
        .await;
    answer.assert_problem(400, problem_type::MALFORMED_PAYLOAD);
    // A header value and a batch item, nested.
    let record = format!(
        r#"{{"idempotency_key": "deep", "response": {{"response_status": 200, "response_body": "",
            "response_headers": [{{"key": "a", "value": {}}}]}}}}"#,
        deep(100_000)
    );
    c.send("POST", "/api/v2/captures", Some(record))
        .await
        .assert_problem(400, problem_type::MALFORMED_PAYLOAD);
    let batch = format!(r#"{{"operations": [{}]}}"#, deep(100_000));
    c.send("POST", "/api/v2/captures/batch", Some(batch))
        .await
        .assert_problem(400, problem_type::MALFORMED_PAYLOAD);
    // Nested as deep as serde_json reads (its limit is 128), within an item: that item is
    // answered 400 on its own.
    let batch = format!(
        r#"{{"operations": [{{"op": "release", "idempotency_key": "deep", "x": {}}}, 7]}}"#,
        deep(120)
    );
    let answer = c.send("POST", "/api/v2/captures/batch", Some(batch)).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.json["results"][0]["status"], 403, "{answer:?}");
    assert_eq!(answer.json["results"][1]["status"], 400, "{answer:?}");
    // The key was never touched by what was refused, and the server still answers.
    assert_eq!(
        c.allocate(json!({ "idempotency_key": "deep" }))
            .await
            .status,
        202
    );
    assert_eq!(c.get("/-/ping").await.status, 200);
    server.stop().await;
}

#[tokio::test]
async fn invalid_utf8_anywhere_is_a_4xx_problem() {
    let server = TestServer::start_with(|c| c.api_token = Some("s3cret".into())).await;
    let auth = "authorization: Bearer s3cret\r\n";
    // In the body: raw bytes, an unpaired surrogate escape, a byte above 0x7F in a key.
    for body in [
        &b"{\"idempotency_key\": \"\xff\xfe\"}"[..],
        br#"{"idempotency_key": "\ud800"}"#,
        b"{\"idempotency_key\": \"k\", \"fingerprint\": \"\xc3\x28\"}",
        b"\xef\xbb\xbf{\"idempotency_key\": \"bom\"}",
    ] {
        raw(server.addr, &request("PUT", "/api/v2/captures", auth, body))
            .await
            .assert_problem(400, problem_type::MALFORMED_PAYLOAD);
    }
    // A key that is valid UTF-8 but not base64url: 422.
    raw(
        server.addr,
        &request(
            "PUT",
            "/api/v2/captures",
            auth,
            "{\"idempotency_key\": \"clé\"}".as_bytes(),
        ),
    )
    .await
    .assert_problem(422, problem_type::MALFORMED_KEY);
    // In the token: not UTF-8, so not the token.
    let body = br#"{"idempotency_key": "k"}"#;
    raw(
        server.addr,
        &request(
            "PUT",
            "/api/v2/captures",
            b"authorization: Bearer s3cr\xe9t\r\n",
            body,
        ),
    )
    .await
    .assert_problem(401, problem_type::UNAUTHORIZED);
    // In the path: no such route.
    let answer = raw(
        server.addr,
        b"GET /-/p\xffng HTTP/1.1\r\nhost: b\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(
        (400..500).contains(&answer.status),
        "a path with a raw 0xFF: {answer:?}"
    );
    raw(
        server.addr,
        b"GET /api/v2/%FF%FE HTTP/1.1\r\nhost: b\r\nconnection: close\r\n\r\n",
    )
    .await
    .assert_problem(404, problem_type::ABOUT_BLANK);
    // Nothing was allocated by any of it.
    let ok = raw(server.addr, &request("PUT", "/api/v2/captures", auth, body)).await;
    assert_eq!(ok.status, 202, "{ok:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_capture_with_a_huge_header_array_is_stored_and_replayed_whole() {
    let server = TestServer::start().await;
    let c = &server.client;
    // 150,000 headers (about 4 MiB of JSON, within the 8 MiB limit), and one header with
    // 150,000 values.
    let many: Vec<Value> = (0..150_000)
        .map(|i| json!({ "key": format!("x-{i}"), "value": "" }))
        .collect();
    let values: Vec<String> = (0..150_000).map(|i| i.to_string()).collect();
    for (key, headers) in [
        ("many-headers", Value::Array(many)),
        (
            "many-values",
            json!([{ "key": "set-cookie", "value": values }]),
        ),
    ] {
        let token = c.lease(key).await;
        let started = Instant::now();
        let record = c
            .record(
                json!({ "idempotency_key": key, "lease_token": token, "response": {
                "response_status": 200, "response_body": "", "response_headers": headers } }),
            )
            .await;
        assert_eq!(record.status, 200, "{key}: {}", record.text);
        let replay = c.allocate(json!({ "idempotency_key": key })).await;
        assert_eq!(replay.status, 200);
        assert_eq!(
            replay.json["response"]["response_headers"], headers,
            "{key}"
        );
        assert!(
            started.elapsed() < DEADLINE,
            "{key}: {:?} to store and replay",
            started.elapsed()
        );
    }
    // Past the body limit it is a 413, the key still held.
    let token = c.lease("too-many").await;
    let many: Vec<Value> = (0..400_000)
        .map(|i| json!({ "key": format!("x-{i}"), "value": "" }))
        .collect();
    let answer = c
        .record(
            json!({ "idempotency_key": "too-many", "lease_token": token, "response": {
            "response_status": 200, "response_body": "", "response_headers": many } }),
        )
        .await;
    answer.assert_problem(413, problem_type::PAYLOAD_TOO_LARGE);
    assert_eq!(
        c.allocate(json!({ "idempotency_key": "too-many" }))
            .await
            .status,
        409
    );
    server.stop().await;
}

#[tokio::test]
async fn keys_and_fields_at_their_limits() {
    let server = TestServer::start().await;
    let c = &server.client;
    let malformed = |a: &Answer| a.assert_problem(400, problem_type::MALFORMED_PAYLOAD);
    // The key: 1 and 1400 characters are keys, 0 and 1401 are not.
    for key in ["k".to_string(), "K".repeat(1400)] {
        let answer = c.allocate(json!({ "idempotency_key": key })).await;
        assert_eq!(answer.status, 202, "{} characters: {answer:?}", key.len());
    }
    for key in [String::new(), "K".repeat(1401)] {
        c.allocate(json!({ "idempotency_key": key }))
            .await
            .assert_problem(422, problem_type::MALFORMED_KEY);
    }
    // The fingerprint: 1024 printable ASCII characters, no more, nothing else.
    let answer = c
        .allocate(json!({ "idempotency_key": "fp", "fingerprint": "~".repeat(1024) }))
        .await;
    assert_eq!(answer.status, 202, "{answer:?}");
    malformed(
        &c.allocate(json!({ "idempotency_key": "fp2", "fingerprint": "f".repeat(1025) }))
            .await,
    );
    // 512 characters of "é" are 1024 bytes: not ASCII.
    malformed(
        &c.allocate(json!({ "idempotency_key": "fp2", "fingerprint": "é".repeat(512) }))
            .await,
    );
    malformed(
        &c.allocate(json!({ "idempotency_key": "fp2", "fingerprint": "a\u{7f}" }))
            .await,
    );
    // lease_ms: 1 to the maximum lease; wait_ms: 0 to 30000; both may be written 3000.0.
    for (field, ok, bad) in [
        ("lease_ms", 86_400_000u64, 86_400_001u64),
        ("wait_ms", 30_000, 30_001),
    ] {
        let key = format!("{field}-ok");
        let answer = c
            .allocate(json!({ "idempotency_key": key, field: ok }))
            .await;
        assert_eq!(answer.status, 202, "{field} {ok}: {answer:?}");
        malformed(
            &c.allocate(json!({ "idempotency_key": "x", field: bad }))
                .await,
        );
        malformed(
            &c.allocate(json!({ "idempotency_key": "x", field: u64::MAX }))
                .await,
        );
        malformed(
            &c.allocate(json!({ "idempotency_key": "x", field: 1.5 }))
                .await,
        );
        malformed(
            &c.allocate(json!({ "idempotency_key": "x", field: -1 }))
                .await,
        );
    }
    let answer = c
        .send(
            "PUT",
            "/api/v2/captures",
            Some(r#"{"idempotency_key": "float", "lease_ms": 3000.0, "wait_ms": null}"#.into()),
        )
        .await;
    assert_eq!(answer.status, 202, "{answer:?}");
    // A lease token of a megabyte: not the lease's, so 403, and the lease is untouched.
    let token = c.lease("big-token").await;
    let answer = c
        .release(json!({ "idempotency_key": "big-token", "lease_token": "t".repeat(1 << 20) }))
        .await;
    answer.assert_problem(403, problem_type::NOT_ALLOCATED);
    let answer = c
        .release(json!({ "idempotency_key": "big-token", "lease_token": token }))
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    // A status written 201.0 is 201.
    let token = c.lease("status").await;
    let answer = c
        .send(
            "POST",
            "/api/v2/captures",
            Some(format!(
                r#"{{"idempotency_key": "status", "lease_token": "{token}", "response":
                    {{"response_status": 201.0, "response_body": "", "response_headers": []}}}}"#
            )),
        )
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let replay = c.allocate(json!({ "idempotency_key": "status" })).await;
    assert_eq!(replay.json["response"]["response_status"], 201);
    server.stop().await;
}

/// The server with short read time-outs, for the slow clients.
async fn impatient_server() -> TestServer {
    TestServer::start_with(|c| {
        c.header_read_timeout = Duration::from_millis(500);
        c.body_read_timeout = Duration::from_millis(500);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_silent_clients_are_cut_off_and_the_others_served_meanwhile() {
    let server = impatient_server().await;
    let addr = server.addr;
    // 20 connections that never send a byte, 20 that send their head one byte every 100 ms
    // (it would take seconds), all at once.
    let mut slow = tokio::task::JoinSet::new();
    for i in 0..40 {
        slow.spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let connected = Instant::now();
            if i % 2 == 1 {
                let head = b"PUT /api/v2/captures HTTP/1.1\r\nhost: b\r\nx-slow: ";
                for b in head {
                    if stream.write_all(&[*b]).await.is_err() {
                        break;
                    }
                    // The slow client's own pace, not a synchronisation.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            closed_by_the_server(&mut stream, connected).await
        });
    }
    // Meanwhile, everyone else is served at once.
    let c = &server.client;
    for i in 0..50 {
        let started = Instant::now();
        let answer = c
            .allocate(json!({ "idempotency_key": format!("other-{i}") }))
            .await;
        assert_eq!(answer.status, 202);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "an allocation took {:?} beside the slow clients",
            started.elapsed()
        );
    }
    // Each slow connection was closed by the server, after the time-out and not before.
    while let Some(took) = slow.join_next().await {
        let took = took.unwrap();
        assert!(took >= Duration::from_millis(450), "closed after {took:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_request_head_sent_too_slowly_gets_no_answer_and_changes_nothing() {
    let server = impatient_server().await;
    let body = br#"{"idempotency_key": "slow-head"}"#;
    let full = request("PUT", "/api/v2/captures", "", body);
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let connected = Instant::now();
    // Everything but the last line feed of the head.
    let head_end = full.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 3;
    stream.write_all(&full[..head_end]).await.unwrap();
    let took = closed_by_the_server(&mut stream, connected).await;
    assert!(took >= Duration::from_millis(450), "closed after {took:?}");
    // The allocation never happened.
    let answer = server
        .client
        .allocate(json!({ "idempotency_key": "slow-head" }))
        .await;
    assert_eq!(answer.status, 202, "{answer:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_body_sent_too_slowly_is_408_and_changes_nothing() {
    let server = impatient_server().await;
    let c = &server.client;
    let token = c.lease("slow-body").await;
    let record =
        json!({ "idempotency_key": "slow-body", "lease_token": token, "response": response("x") })
            .to_string();
    let full = request("POST", "/api/v2/captures", "", record.as_bytes());
    let head_end = full.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    // The head, then the body a byte every 100 ms: each read is prompt, the whole is not.
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(&full[..head_end]).await.unwrap();
    let started = Instant::now();
    let trickle = {
        let (mut reader, mut writer) = stream.into_split();
        let body = full[head_end..].to_vec();
        let writing = tokio::spawn(async move {
            for b in body {
                if writer.write_all(&[b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let mut bytes = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, reader.read_to_end(&mut bytes)).await;
        writing.abort();
        bytes
    };
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(450),
        "answered after {took:?}"
    );
    let text = String::from_utf8_lossy(&trickle);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    assert!(text.contains(problem_type::REQUEST_TIMEOUT), "{text}");
    // The record never happened: the lease still holds the key, and its token still works.
    assert_eq!(
        c.allocate(json!({ "idempotency_key": "slow-body" }))
            .await
            .status,
        409
    );
    let answer = c.send("POST", "/api/v2/captures", Some(record)).await;
    assert_eq!(answer.status, 200, "{answer:?}");

    // A body that stops half-way: the same 408.
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let half = request(
        "PUT",
        "/api/v2/captures",
        "",
        br#"{"idempotency_key": "half"}"#,
    );
    stream.write_all(&half[..half.len() - 5]).await.unwrap();
    read_answer(&mut stream)
        .await
        .assert_problem(408, problem_type::REQUEST_TIMEOUT);
    assert_eq!(
        c.allocate(json!({ "idempotency_key": "half" }))
            .await
            .status,
        202
    );
    server.stop().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_time_out() {
    let server = impatient_server().await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"GET /-/ping HTTP/1.1\r\nhost: b\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_answer(&mut stream).await.status, 200);
    let answered = Instant::now();
    // Kept alive, then nothing more is sent.
    let took = closed_by_the_server(&mut stream, answered).await;
    assert!(took >= Duration::from_millis(450), "closed after {took:?}");
    server.stop().await;
}

/// The real binary's stderr until it listens, with `--listen addr` and the environment given.
async fn start_up_lines(listen: &str, env: &[(&str, &str)]) -> Vec<Value> {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--listen",
        listen,
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--log-format",
        "json",
    ];
    let mut child = binary(&args, env)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let stderr = child.stderr.take().unwrap();
    // Read on a thread: a line that never comes must fail the test, not hang it.
    let (sent, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if sent.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = received
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no \"listening\" line: {lines:#?}"));
        let value: Value = serde_json::from_str(&line).unwrap_or(Value::String(line));
        let listening = value["fields"]["message"] == "listening";
        lines.push(value);
        if listening {
            break;
        }
    }
    // The warning comes right after it: read what the next moment brings.
    while let Ok(line) = received.recv_timeout(Duration::from_millis(500)) {
        lines.push(serde_json::from_str(&line).unwrap_or(Value::String(line)));
    }
    let _ = child.kill();
    let _ = child.wait();
    lines
}

fn warnings(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l["level"] == "WARN")
        .map(|l| {
            l["fields"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn listening_beyond_loopback_without_a_token_is_warned_about_at_start() {
    // The default listen address is 0.0.0.0: the case that matters.
    let exposed = start_up_lines("0.0.0.0:0", &[]).await;
    let warned = warnings(&exposed);
    assert_eq!(warned.len(), 1, "{exposed:#?}");
    assert!(warned[0].starts_with("SECURITY WARNING"), "{warned:?}");
    assert!(warned[0].contains("API_TOKEN"), "{warned:?}");
    assert!(warned[0].contains("0.0.0.0:"), "{warned:?}");
    // With a token, or on loopback: nothing to warn about.
    let with_token = start_up_lines("0.0.0.0:0", &[("API_TOKEN", "s3cret")]).await;
    assert_eq!(
        warnings(&with_token),
        Vec::<String>::new(),
        "{with_token:#?}"
    );
    let loopback = start_up_lines("127.0.0.1:0", &[]).await;
    assert_eq!(warnings(&loopback), Vec::<String>::new(), "{loopback:#?}");
}
