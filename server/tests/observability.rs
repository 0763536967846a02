//! The real binary's traces and logs, as an operator gets them: the spans exported over OTLP
//! (HTTP/protobuf, to a receiver in this test) continue the caller's `traceparent` and carry
//! the request's outcome, a batch links to its items' traces, OpenTelemetry settings the
//! server cannot follow are refused at start, and `LOG_FORMAT=json` gives one JSON object per
//! line with the request id, route, outcome and latency, and no secret at any level.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use common::{ServerProcess, eventually, response, run_to_exit};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, Span};
use prost::Message as _;
use serde_json::json;

/// A collector's OTLP/HTTP endpoint: every export request it received.
struct Receiver {
    addr: SocketAddr,
    exports: Arc<Mutex<Vec<ResourceSpans>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let exports: Arc<Mutex<Vec<ResourceSpans>>> = Arc::default();
        let store = exports.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: Bytes| {
                let store = store.clone();
                async move {
                    let request = ExportTraceServiceRequest::decode(body)
                        .expect("the server sends OTLP protobuf");
                    store.lock().unwrap().extend(request.resource_spans);
                    // An empty ExportTraceServiceResponse.
                    (
                        [("content-type", "application/x-protobuf")],
                        Vec::<u8>::new(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { addr, exports }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far, with its resource's attributes.
    fn spans(&self) -> Vec<(Vec<KeyValue>, Span)> {
        let exports = self.exports.lock().unwrap();
        exports
            .iter()
            .flat_map(|r| {
                let resource = r
                    .resource
                    .as_ref()
                    .map(|r| r.attributes.clone())
                    .unwrap_or_default();
                r.scope_spans
                    .iter()
                    .flat_map(|s| s.spans.clone())
                    .map(move |span| (resource.clone(), span))
            })
            .collect()
    }

    /// Wait for a span matching `matches`.
    async fn span(&self, what: &str, matches: impl Fn(&Span) -> bool) -> (Vec<KeyValue>, Span) {
        eventually(what, || async {
            self.spans().into_iter().find(|(_, s)| matches(s))
        })
        .await
    }
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn text<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    match attribute(attributes, key) {
        Some(any_value::Value::StringValue(s)) => Some(s),
        _ => None,
    }
}

fn int(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match attribute(attributes, key) {
        Some(any_value::Value::IntValue(n)) => Some(*n),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allocation_continues_the_callers_trace_and_a_batch_links_to_its_items() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let endpoint = receiver.endpoint();
    let server = ServerProcess::start_with_env(
        dir.path(),
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_SERVICE_NAME", "idempotency-under-test"),
            // Export every 50 ms rather than every 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            // The log at info: the spans are exported all the same.
            ("RUST_LOG", "info"),
        ],
    )
    .await;
    let c = &server.client;
    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    let allocated = c
        .send_with(
            "PUT",
            "/api/v2/captures",
            Some(json!({ "idempotency_key": "dHJhY2Vk" }).to_string()),
            &[("traceparent", &traceparent), ("x-request-id", "req-42")],
        )
        .await;
    assert_eq!(allocated.status, 202);

    // The request's span: a child of the caller's, a server span named by method and route,
    // carrying the status, the outcome and the key's digest (never the key).
    let (resource, request) = receiver
        .span("the allocation's span", |s| {
            hex(&s.trace_id) == TRACE && s.kind == SpanKind::Server as i32
        })
        .await;
    assert_eq!(request.name, "PUT /api/v2/captures");
    assert_eq!(hex(&request.parent_span_id), PARENT);
    assert_eq!(
        text(&resource, "service.name"),
        Some("idempotency-under-test")
    );
    assert_eq!(
        text(&request.attributes, "http.route"),
        Some("/api/v2/captures")
    );
    assert_eq!(
        text(&request.attributes, "http.request.method"),
        Some("PUT")
    );
    assert_eq!(
        int(&request.attributes, "http.response.status_code"),
        Some(202),
        "{:?}",
        request.attributes
    );
    assert_eq!(
        text(&request.attributes, "idempotency.outcome"),
        Some("allocated")
    );
    assert_eq!(text(&request.attributes, "request_id"), Some("req-42"));
    assert_eq!(
        text(&request.attributes, "idempotency.key"),
        Some(idempotency_spec::key_digest("dHJhY2Vk").as_str())
    );
    // The store call: a client span under it.
    let (_, store) = receiver
        .span("the store call's span", |s| {
            hex(&s.trace_id) == TRACE && s.parent_span_id == request.span_id
        })
        .await;
    assert_eq!(store.name, "allocate");
    assert_eq!(store.kind, SpanKind::Client as i32);
    assert_eq!(text(&store.attributes, "db.system.name"), Some("embedded"));

    // Without a traceparent: a trace of its own.
    let token = allocated.lease_token();
    let recorded = c
        .record(json!({ "idempotency_key": "dHJhY2Vk", "lease_token": token, "response": response("t") }))
        .await;
    assert_eq!(recorded.status, 200);
    let (_, record) = receiver
        .span("the record's span", |s| s.name == "POST /api/v2/captures")
        .await;
    assert_ne!(hex(&record.trace_id), TRACE);
    assert!(record.parent_span_id.is_empty());

    // A batch carries many requests: its span links to each item's trace.
    let items = [
        "0af7651916cd43dd8448eb211c80319c",
        "1af7651916cd43dd8448eb211c80319c",
    ];
    let batch = c
        .send(
            "POST",
            "/api/v2/captures/batch",
            Some(
                json!({ "operations": [
                    { "op": "release", "idempotency_key": "YQ", "traceparent": format!("00-{}-b7ad6b7169203331-01", items[0]), "request_id": "r0" },
                    { "op": "release", "idempotency_key": "Yg", "traceparent": format!("00-{}-b7ad6b7169203331-01", items[1]) },
                    { "op": "release", "idempotency_key": "Yw", "traceparent": "not a traceparent" },
                ] })
                .to_string(),
            ),
        )
        .await;
    assert_eq!(batch.status, 200);
    let (_, batch) = receiver
        .span("the batch's span", |s| {
            s.name == "POST /api/v2/captures/batch"
        })
        .await;
    let linked: Vec<String> = batch.links.iter().map(|l| hex(&l.trace_id)).collect();
    assert_eq!(linked, items);

    // Probes and scrapes make no spans.
    assert_eq!(c.get("/-/ping").await.status, 200);
    assert_eq!(c.get("/metrics").await.status, 200);
    let before = receiver.spans().len();
    // A last traced call, to know the ones before it were exported.
    c.allocate(json!({ "idempotency_key": "bGFzdA" })).await;
    receiver
        .span("the last allocation's span", |s| {
            s.kind == SpanKind::Server as i32 && s.start_time_unix_nano > batch.end_time_unix_nano
        })
        .await;
    assert!(
        receiver
            .spans()
            .iter()
            .all(|(_, s)| !s.name.contains("/-/ping") && !s.name.contains("/metrics")),
        "{before}"
    );
}

#[tokio::test]
async fn opentelemetry_settings_the_server_cannot_follow_are_refused_at_start() {
    for (name, value, says) in [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc", "only http/protobuf"),
        ("OTEL_TRACES_EXPORTER", "zipkin", "otlp or none"),
    ] {
        let (status, stderr) = run_to_exit(
            &[
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                "/nonexistent/never",
            ],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
                (name, value),
            ],
        )
        .await;
        assert_eq!(status.code(), Some(2), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
    }
    let (status, stderr) = run_to_exit(
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            "/nonexistent/never",
        ],
        &[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "https://collector:4318/v1/traces",
        )],
    )
    .await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("TLS is not built in"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_the_request_and_no_secret() {
    const TOKEN: &str = "t0ken-that-must-never-show";
    const KEY: &str = "c2VjcmV0LWtleS10aGF0LW11c3QtbmV2ZXItc2hvdw";
    const BODY: &str = "body-that-must-never-show";
    const FINGERPRINT: &str = "fingerprint-that-must-never-show";
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start_with_env(
        dir.path(),
        &["--api-token", TOKEN],
        // Everything, every crate's trace level included.
        &[("RUST_LOG", "trace")],
    )
    .await;
    let c = server.client.with_token(TOKEN);
    let allocated = c
        .send_with(
            "PUT",
            "/api/v2/captures",
            Some(json!({ "idempotency_key": KEY, "fingerprint": FINGERPRINT }).to_string()),
            &[("x-request-id", "req-7")],
        )
        .await;
    let lease = allocated.lease_token();
    let capture = json!({ "response_status": 201, "response_body": BODY,
        "response_headers": [{ "key": "Set-Cookie", "value": BODY }] });
    assert_eq!(
        c.record(json!({ "idempotency_key": KEY, "lease_token": lease, "response": capture }))
            .await
            .status,
        200
    );
    assert_eq!(
        c.allocate(json!({ "idempotency_key": KEY })).await.status,
        200
    );
    // Refused with the wrong token, and a failing batch item.
    assert_eq!(
        server
            .client
            .with_token("wrong-t0ken")
            .allocate(json!({ "idempotency_key": KEY }))
            .await
            .status,
        401
    );
    let line = server
        .log_line(|l| l["fields"]["message"] == "request" && l["fields"]["outcome"] == "replayed")
        .await;
    let fields = &line["fields"];
    assert_eq!(line["level"], "DEBUG");
    assert_eq!(fields["route"], "/api/v2/captures");
    assert_eq!(fields["method"], "PUT");
    assert_eq!(fields["status"], 200);
    assert_eq!(fields["key"], idempotency_spec::key_digest(KEY));
    assert!(fields["ms"].as_f64().unwrap() > 0.0);
    let first = server
        .log_line(|l| l["fields"]["message"] == "request" && l["fields"]["outcome"] == "allocated")
        .await;
    assert_eq!(first["fields"]["request_id"], "req-7");
    server
        .log_line(|l| l["fields"]["message"] == "request" && l["fields"]["status"] == 401)
        .await;
    server.signal(libc::SIGTERM);
    common::wait_for_exit(&mut server.child).await;
    server
        .log_line(|l| l["fields"]["message"] == "stopped")
        .await;

    // Every line is a JSON object, and none holds a secret: not the API token, the key, the
    // lease token, the fingerprint or any body or header stored.
    assert!(server.lines.len() >= 8, "{:#?}", server.lines);
    for line in &server.lines {
        assert!(line.is_object(), "not a JSON object: {line}");
        let text = line.to_string();
        for secret in [TOKEN, "wrong-t0ken", KEY, lease.as_str(), FINGERPRINT, BODY] {
            assert!(!text.contains(secret), "{secret} logged: {text}");
        }
    }
}

/// The spans still buffered when the server stops are exported before it exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_spans_are_exported_at_shutdown() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let endpoint = receiver.endpoint();
    let mut server = ServerProcess::start_with_env(
        dir.path(),
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            // Far longer than the test: only the shutdown exports it.
            ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
        ],
    )
    .await;
    assert_eq!(
        server
            .client
            .allocate(json!({ "idempotency_key": "c2h1dGRvd24" }))
            .await
            .status,
        202
    );
    server.signal(libc::SIGTERM);
    assert_eq!(
        common::wait_for_exit(&mut server.child).await.code(),
        Some(0)
    );
    let (resource, span) = receiver
        .span("the span exported at shutdown", |s| {
            s.name == "PUT /api/v2/captures"
        })
        .await;
    assert_eq!(text(&resource, "service.name"), Some("idempotency-server"));
    assert_eq!(
        text(&span.attributes, "idempotency.key"),
        Some(idempotency_spec::key_digest("c2h1dGRvd24").as_str())
    );
}
