//! Hostile traffic, generated (proptest, fixed seed, a bounded number of cases per mode):
//! arbitrary requests and upstream responses through the real filter in the test host, with
//! the real backend. Headers with odd bytes (tabs, obs-text above 0x7F, quotes, repeats), an
//! `Idempotency-Key` that is anything, bodies of odd sizes around the limits, chunk
//! boundaries anywhere (the client's, the upstream's and the host's own), upstream statuses
//! 200-599 and responses that break off. Each case sends a request and its retry, and checks
//! what the client sees and what the host saw:
//!
//! - the filter never traps (no trap in the host's log, one instance), breaks no host rule
//!   (no violation) and leaves no call in flight past its request, in either mode;
//! - a response is the upstream's, untouched, or one of the filter's own problems (and then
//!   the upstream never ran);
//! - a replay is exactly the first response (status and body), the upstream ran once, and a
//!   response that broke off is never replayed;
//! - no key and no body of the case is in a log line of the filter, even a refused one, nor
//!   (`E2e::finish`) what reached the upstream in the backend's.
//!
//! `PROPTEST_CASES=500 cargo test -p idempotency-tests --test filter hostile` runs more cases
//! (64 per mode by default); `PROPTEST_SEED` (a number) another sequence.

use std::cell::{Cell, RefCell};
use std::time::Duration;

use idempotency_tests::secrets::{Secrets, filter_lines};
use idempotency_tests::{ClientResponse, Mode, Reply};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::json;

use crate::support::E2e;

/// The limits every case runs under: small, so that generated bodies cross them.
const MAX_REQUEST_BODY: usize = 2048;
const MAX_CAPTURE: usize = 2048;

/// One generated exchange.
#[derive(Debug, Clone)]
struct Case {
    method: &'static str,
    /// The `Idempotency-Key` header values (none, one, or a repeated header).
    keys: Vec<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    /// Sent chunked, in pieces of this size.
    chunked: Option<usize>,
    /// Host chunk sizes (request, response): where the filter's callbacks cut the bodies.
    request_chunk: usize,
    response_chunk: usize,
    /// Envoy: `envoy.request_body: await` (the body fingerprinted) instead of `skip`.
    envoy_await: bool,
    reply: ReplySpec,
}

#[derive(Debug, Clone)]
struct ReplySpec {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    chunked: Option<usize>,
    /// Breaks off after this many body bytes (Content-Length announced whole).
    truncate: Option<usize>,
}

/// Bytes a header value may carry through an HTTP/1.1 client (no CR, LF, NUL or DEL), the
/// odd ones often: tab, space, quotes, backslash, obs-text.
fn value_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        4 => 0x21u8..=0x7e,
        1 => Just(b'\t'),
        1 => Just(b' '),
        1 => Just(b'"'),
        1 => Just(b'\\'),
        2 => 0x80u8..=0xff,
    ];
    proptest::collection::vec(byte, 0..max)
}

/// Printable text (and tab): a value the backend can store, so the response can be replayed.
fn text_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![8 => 0x20u8..=0x7e, 1 => Just(b'\t')];
    proptest::collection::vec(byte, 0..max)
}

/// Header names: tokens, a few that mean something to the filter or a host.
fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z][a-z0-9!#$%&'*+.^_`|~-]{0,11}".prop_map(|s| format!("x-{s}")),
        1 => Just("authorization".to_string()),
        1 => Just("content-type".to_string()),
        1 => Just("set-cookie".to_string()),
        1 => Just("X-Mixed-Case".to_string()),
    ]
}

fn key_values() -> impl Strategy<Value = Vec<Vec<u8>>> {
    let one = prop_oneof![
        // A well-formed key, quoted or bare.
        6 => "[a-zA-Z0-9-]{1,40}".prop_map(|k| format!("\"{k}\"").into_bytes()),
        2 => "[a-zA-Z0-9-]{1,40}".prop_map(String::into_bytes),
        // Anything at all, around the 255-character limit too.
        2 => value_bytes(300),
        1 => Just(format!("\"{}\"", "k".repeat(255)).into_bytes()),
        1 => Just(format!("\"{}\"", "k".repeat(256)).into_bytes()),
    ];
    prop_oneof![
        1 => Just(Vec::new()),
        6 => one.clone().prop_map(|k| vec![k]),
        1 => (one.clone(), one).prop_map(|(a, b)| vec![a, b]),
    ]
}

fn body(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => proptest::collection::vec(any::<u8>(), 0..64),
        2 => proptest::collection::vec(any::<u8>(), 0..max),
        // Around the limit.
        1 => (MAX_REQUEST_BODY - 2..MAX_REQUEST_BODY + 3).prop_map(|n| vec![b'b'; n]),
    ]
}

fn reply() -> impl Strategy<Value = ReplySpec> {
    (
        prop_oneof![4 => Just(201u16), 2 => 200u16..=299, 2 => 300u16..=599],
        // Mostly text (storable), some with odd bytes (the response then passes, released).
        proptest::collection::vec(
            (
                header_name(),
                prop_oneof![6 => text_bytes(40), 1 => value_bytes(40)],
            ),
            0..6,
        ),
        body(MAX_CAPTURE + 600),
        proptest::option::weighted(0.3, 1usize..700),
        proptest::option::weighted(0.1, 0usize..64),
    )
        .prop_map(|(status, headers, body, chunked, truncate)| {
            // A 204 or 304 carries no body (hyper drops it): what the client sees then.
            let body = if matches!(status, 204 | 304) {
                Vec::new()
            } else {
                body
            };
            // Breaking off only means something inside a body.
            let truncate = truncate.filter(|&n| n < body.len() && chunked.is_none());
            ReplySpec {
                status,
                headers,
                body,
                chunked,
                truncate,
            }
        })
}

prop_compose! {
    fn case()(
        method in prop_oneof![6 => Just("POST"), 2 => Just("PATCH"), 1 => Just("PUT"), 1 => Just("GET")],
        keys in key_values(),
        headers in proptest::collection::vec((header_name(), value_bytes(60)), 0..5),
        body in body(MAX_REQUEST_BODY + 600),
        chunked in proptest::option::weighted(0.2, 1usize..900),
        request_chunk in 1usize..3000,
        response_chunk in 1usize..3000,
        envoy_await in any::<bool>(),
        reply in reply(),
    ) -> Case {
        Case { method, keys, headers, body, chunked, request_chunk, response_chunk, envoy_await, reply }
    }
}

/// The filter's own answers, by status: what a refused request may get instead of the
/// upstream's response.
fn is_filter_problem(r: &ClientResponse) -> bool {
    r.header("content-type") == Some("application/problem+json")
        && r.header("idempotent-replayed").is_none()
        && matches!(r.status, 400 | 409 | 411 | 413 | 422)
}

/// What the client got, counted over a run: the generated traffic must reach every outcome
/// (a run where every request was refused would prove nothing about the others).
#[derive(Debug, Default)]
struct Outcomes {
    upstream: u32,
    replayed: u32,
    refused: u32,
    broke_off: u32,
}

async fn run_case(
    mode: Mode,
    case: Case,
    n: usize,
    seen: &RefCell<Outcomes>,
) -> Result<(), TestCaseError> {
    let mut setup = E2e::setup(mode).config(json!({
        "max_request_body_bytes": MAX_REQUEST_BODY,
        "max_capture_bytes": MAX_CAPTURE,
    }));
    if mode == Mode::Envoy && case.envoy_await {
        setup = setup.body_fingerprinted();
    }
    let (request_chunk, response_chunk) = (case.request_chunk, case.response_chunk);
    let t = setup
        .host(move |h| {
            h.request_chunk_size(request_chunk)
                .response_chunk_size(response_chunk)
        })
        .start()
        .await;
    let path = format!("/hostile/{n}");
    let spec = &case.reply;
    let mut reply = Reply::new(spec.status).body(spec.body.clone());
    for (name, value) in &spec.headers {
        reply = reply.header(name, value);
    }
    if let Some(piece) = spec.chunked {
        reply = reply.chunked(piece);
    }
    if let Some(sent) = spec.truncate {
        reply = reply.truncate(sent);
    }
    t.api.reply(&path, reply);

    let send = || {
        let mut r = t.host().client().request(case.method, &path);
        for key in &case.keys {
            r = r.header_bytes("idempotency-key", key);
        }
        for (name, value) in &case.headers {
            r = r.header_bytes(name, value);
        }
        r = r.body(case.body.clone());
        if let Some(piece) = case.chunked {
            r = r.chunked(piece);
        }
        r.send()
    };

    let mut answers = Vec::new();
    for attempt in 0..2 {
        let before = t.api.count(&path);
        let answer = tokio::time::timeout(Duration::from_secs(20), send())
            .await
            .map_err(|_| TestCaseError::fail(format!("attempt {attempt}: no answer in 20 s")))?;
        // The record or release of the first: sent (Kong: at the next tick) before the retry.
        t.tick().await;
        let executed = t.api.count(&path) - before;
        match &answer {
            Err(e) => {
                prop_assert!(
                    spec.truncate.is_some(),
                    "attempt {attempt}: the client got no response ({e:#}) from an upstream that answered whole"
                );
                seen.borrow_mut().broke_off += 1;
            }
            Ok(r) if r.header("idempotent-replayed").is_some() => {
                prop_assert_eq!(executed, 0, "a replay ran the upstream");
                seen.borrow_mut().replayed += 1;
            }
            Ok(r) if is_filter_problem(r) && r.status != spec.status => {
                prop_assert_eq!(
                    executed,
                    0,
                    "refused with {} yet the upstream ran",
                    r.status
                );
                seen.borrow_mut().refused += 1;
            }
            Ok(r) => {
                seen.borrow_mut().upstream += 1;
                // The upstream's response, untouched.
                prop_assert_eq!(r.status, spec.status, "attempt {}: {}", attempt, r.text());
                if spec.truncate.is_none() {
                    prop_assert_eq!(&r.body, &spec.body, "attempt {}: the body changed", attempt);
                }
            }
        }
        answers.push(answer);
    }

    // The retry: a replay is the first response exactly, and never of one that broke off.
    if let (Ok(first), Ok(retry)) = (&answers[0], &answers[1])
        && retry.header("idempotent-replayed").is_some()
    {
        prop_assert!(
            spec.truncate.is_none(),
            "a response that broke off was replayed"
        );
        prop_assert_eq!(retry.status, first.status);
        prop_assert_eq!(&retry.body, &first.body, "the replayed body differs");
        prop_assert_eq!(
            t.api.count(&path),
            1,
            "replayed, yet the upstream ran twice"
        );
    }

    let host = t.host();
    let traps = host.logs_containing("[wasm] trap");
    prop_assert!(traps.is_empty(), "the filter trapped: {:?}", traps);
    prop_assert_eq!(host.instances(), 1, "the instance was replaced");
    prop_assert_eq!(
        host.calls_outliving_requests(),
        0,
        "a call outlived its request"
    );
    let violations = host.violations();
    prop_assert!(violations.is_empty(), "host rules broken: {:?}", violations);
    // Not even a key the filter refused, or the body of a refused request, is logged
    // (`finish` scans for what reached the upstream).
    let mut sent = Secrets::new();
    for key in &case.keys {
        sent.add(key);
    }
    sent.add(&case.body);
    let leaks = sent.leaks(filter_lines(host).iter().map(String::as_str));
    prop_assert!(leaks.is_empty(), "logged by the filter: {:?}", leaks);
    t.finish().await;
    Ok(())
}

/// The cases of one mode: `PROPTEST_CASES` (64 by default), from a fixed seed.
fn run(mode: Mode) {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let seed: u64 = std::env::var("PROPTEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8] = mode as u8;
    let config = Config {
        cases,
        // Each case starts a host and a backend: a failure is shrunk within bounds.
        max_shrink_iters: 64,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Each case on its own path: a shrunk case never meets an earlier one's key.
    let n = Cell::new(0);
    let seen = RefCell::new(Outcomes::default());
    let result = runner.run(&case(), |case| {
        n.set(n.get() + 1);
        rt.block_on(run_case(mode, case, n.get(), &seen))
    });
    if let Err(e) = result {
        panic!("{mode}: {e}");
    }
    let seen = seen.into_inner();
    eprintln!(
        "{mode}: {} cases, {seen:?} (answers, two per case)",
        n.get()
    );
    assert!(
        seen.upstream > 0 && seen.replayed > 0 && seen.refused > 0 && seen.broke_off > 0,
        "{mode}: the generated traffic missed an outcome: {seen:?}"
    );
}

#[test]
fn arbitrary_traffic_never_traps_the_filter_ngx() {
    run(Mode::Ngx);
}

#[test]
fn arbitrary_traffic_never_traps_the_filter_envoy() {
    run(Mode::Envoy);
}
