//! The host facts the product filter relies on, each checked against the real hosts' source
//! (see the `rules` module and the crate doc for the file and function of each): the
//! end_of_stream flags ngx_wasm_module passes, which body callbacks it makes, and what a local
//! response carries on each host.

mod support;

use idempotency_tests::{Host, Mode, Reply};
use support::{Env, body_calls};

/// The `eos` flag the fixture logged for a header callback (`on_request_headers` /
/// `on_response_headers`), in order.
fn header_eos(host: &Host, callback: &str) -> Vec<bool> {
    host.logs()
        .iter()
        .filter_map(|l| {
            let rest = l.message.split_once(&format!("{callback} n="))?.1;
            let eos = rest.split_once(" eos=")?.1;
            Some(eos.starts_with("true"))
        })
        .collect()
}

/// The response headers the filter saw (`x-fixture-log-response-headers`), last request.
fn seen_response_headers(host: &Host) -> Vec<(String, String)> {
    let logs = host.logs_containing("response headers: ");
    let Some(line) = logs.last() else {
        return Vec::new();
    };
    let list = line.message.split_once("response headers: ").unwrap().1;
    list.split("; ")
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn get<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn header_callbacks_end_of_stream_ngx_always_one_envoy_when_nothing_follows() {
    for mode in [Mode::Ngx, Mode::Envoy] {
        let env = Env::new(mode).await;
        let host = env.host().await;
        host.client().post("/p", "body").await.unwrap();
        host.client().get("/g").await.unwrap();
        host.settle().await;
        let (req, resp) = (
            header_eos(&host, "on_request_headers"),
            header_eos(&host, "on_response_headers"),
        );
        match mode {
            // NGX_HTTP_PROXY_WASM_EOF for both, whatever follows.
            Mode::Ngx => {
                assert_eq!(req, vec![true, true]);
                assert_eq!(resp, vec![true, true]);
            }
            Mode::Envoy => {
                assert_eq!(req, vec![false, true], "a body follows the POST's headers");
                assert_eq!(resp, vec![false, false], "both responses have a body");
            }
        }
        host.finish().await;
    }
}

#[tokio::test]
async fn ngx_calls_on_request_body_only_for_a_non_empty_body() {
    for mode in [Mode::Ngx, Mode::Envoy] {
        let env = Env::new(mode).await;
        let host = env.host().await;
        // Content-Length: 0, and an empty chunked body (the last chunk alone).
        let r = host.client().post("/empty", "").await.unwrap();
        assert_eq!(r.status, 200);
        let r = host
            .client()
            .request("POST", "/empty-chunked")
            .chunked(4)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        host.settle().await;
        let calls = body_calls(&host, "on_request_body");
        match mode {
            Mode::Ngx => assert_eq!(calls, vec![], "{mode}"),
            // Envoy: the empty chunked body ends with decodeData(empty, end_stream).
            Mode::Envoy => assert_eq!(calls, vec![(0, true)], "{mode}"),
        }
        assert_eq!(env.up.count("/empty") + env.up.count("/empty-chunked"), 2);
        // A chunked body with bytes: ngx de-chunks it and delivers it whole.
        let r = host
            .client()
            .request("POST", "/chunked")
            .chunked(3)
            .body("0123456789")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        host.settle().await;
        if mode == Mode::Ngx {
            assert_eq!(body_calls(&host, "on_request_body"), vec![(10, true)]);
        }
        assert_eq!(env.up.count_body(b"0123456789"), 1);
        let seen = env.up.requests();
        assert_eq!(
            seen.last().unwrap().header("transfer-encoding"),
            if mode == Mode::Ngx {
                // proxy_request_buffering: the body goes upstream with a Content-Length.
                None
            } else {
                Some("chunked")
            }
        );
        host.finish().await;
    }
}

#[tokio::test]
async fn ngx_response_end_of_stream_only_when_one_call_carries_the_whole_body() {
    for mode in [Mode::Ngx, Mode::Envoy] {
        let env = Env::new(mode).await;
        env.up.reply("/cl", Reply::text("x".repeat(25)));
        // In one piece.
        let host = env.host().await;
        host.client().get("/cl").await.unwrap();
        host.settle().await;
        assert_eq!(body_calls(&host, "on_response_body"), vec![(25, true)]);
        host.finish().await;
        // In three.
        let host = env.builder().response_chunk_size(10).start().await.unwrap();
        let r = host.client().get("/cl").await.unwrap();
        assert_eq!(r.body.len(), 25);
        host.settle().await;
        let calls = body_calls(&host, "on_response_body");
        match mode {
            // resp_chunk_eof = (resp_chunk_len == resp_content_length_n): never here, and
            // the empty last buffer is not delivered; on_log still runs.
            Mode::Ngx => assert_eq!(calls, vec![(10, false), (10, false), (5, false)]),
            Mode::Envoy => assert_eq!(calls, vec![(10, false), (10, false), (5, true)]),
        }
        host.assert_logged("on_log");
        host.finish().await;
    }
}

#[tokio::test]
async fn local_responses_content_type_and_length_per_host() {
    for mode in [Mode::Ngx, Mode::Envoy] {
        let env = Env::new(mode).await;
        let host = env.host().await;
        let local = |body: &str, ctype: Option<&str>| {
            let mut r = host
                .client()
                .request("GET", "/")
                .header("x-fixture-local", "201")
                .header("x-fixture-log-response-headers", "1");
            if !body.is_empty() {
                r = r.header("x-fixture-local-body", body);
            }
            if let Some(ct) = ctype {
                r = r.header("x-fixture-local-header", format!("content-type: {ct}"));
            }
            r.send()
        };
        // A body without Content-Type: each host's default.
        let r = local("hello", None).await.unwrap();
        host.settle().await;
        let seen = seen_response_headers(&host);
        assert_eq!(get(&seen, "content-type"), Some("text/plain"), "{mode}");
        let with_lf = if mode == Mode::Ngx { "6" } else { "5" };
        assert_eq!(get(&seen, "content-length"), Some(with_lf), "{mode}");
        assert_eq!(r.header("content-type"), Some("text/plain"));
        // A given Content-Type is kept.
        let r = local("{}", Some("application/json")).await.unwrap();
        host.settle().await;
        let seen = seen_response_headers(&host);
        assert_eq!(get(&seen, "content-type"), Some("application/json"));
        assert_eq!(r.header("content-type"), Some("application/json"));
        // No body: ngx says Content-Length 0 and keeps the type; Envoy drops both.
        let r = local("", Some("application/json")).await.unwrap();
        assert!(r.body.is_empty());
        host.settle().await;
        let seen = seen_response_headers(&host);
        match mode {
            Mode::Ngx => {
                assert_eq!(get(&seen, "content-length"), Some("0"));
                assert_eq!(get(&seen, "content-type"), Some("application/json"));
            }
            Mode::Envoy => {
                assert_eq!(get(&seen, "content-length"), None);
                assert_eq!(get(&seen, "content-type"), None);
            }
        }
        // A body-less local reply: on_response_body gets no data; Envoy ends in the
        // headers, ngx delivers the empty last buffer with end_of_stream.
        let last_body_call = body_calls(&host, "on_response_body").last().copied();
        match mode {
            Mode::Ngx => assert_eq!(last_body_call, Some((0, true))),
            Mode::Envoy => assert_eq!(header_eos(&host, "on_response_headers").last(), Some(&true)),
        }
        assert_eq!(env.up.total(), 0);
        host.finish().await;
    }
}

#[tokio::test]
async fn a_local_response_from_on_request_body_replaces_the_upstream() {
    for mode in [Mode::Ngx, Mode::Envoy] {
        let env = Env::new(mode).await;
        let host = env.host().await;
        let r = host
            .client()
            .request("POST", "/")
            .header("x-fixture-local", "413")
            .header("x-fixture-local-in", "request_body")
            .header("x-fixture-local-body", "too big")
            .body("payload")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status, 413, "{mode}");
        let expected = if mode == Mode::Ngx {
            "too big\n"
        } else {
            "too big"
        };
        assert_eq!(r.text(), expected);
        assert_eq!(env.up.total(), 0, "{mode}: the upstream is not asked");
        host.finish().await;
    }
}

#[tokio::test]
async fn envoy_resume_after_pausing_headers_and_body_releases_both() {
    // The pattern of a filter that needs the whole body before deciding: Pause in the
    // headers, StopIterationAndBuffer in the body until its end, a call from the last body
    // callback, resume in the call's answer: continueDecoding sends the headers, then the
    // buffered body with its end. It needs allow_on_headers_stop_iteration (Envoy 1.35+):
    // without it no body callback comes while the headers are held (envoy_rules.rs).
    let env = Env::new(Mode::Envoy).await;
    let host = env
        .builder()
        .allow_on_headers_stop_iteration(true)
        .start()
        .await
        .unwrap();
    let r = host
        .client()
        .request("POST", "/held")
        .header("x-fixture-pause-in", "request_headers,request_body")
        .header("x-fixture-dispatch-in", "request_body")
        .header("x-fixture-dispatch-to", env.target())
        .body("0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(env.up.count_body(b"0123456789"), 1, "the whole body, once");
    assert_eq!(env.backend.count("/call"), 1);
    host.finish().await;
}
