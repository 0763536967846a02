//! Traffic through the filter: statuses, headers, bodies and their chunks, local
//! responses, Pause/resume, buffering, Content-Length, client disconnects.

mod support;

use idempotency_tests::{Mode, Reply, ViolationKind};
use support::{Env, body_calls};

#[tokio::test]
async fn the_client_sees_the_upstreams_status_repeated_headers_and_binary_body() {
    for mode in [Mode::Ngx, Mode::Envoy] {
        let env = Env::new(mode).await;
        let body: Vec<u8> = (0..=255u8).collect();
        env.up.reply(
            "/bin",
            Reply::new(201)
                .header("set-cookie", "a=1")
                .header("set-cookie", "b=2")
                .header("x-one", "1")
                .body(body.clone()),
        );
        let host = env.host().await;
        let r = host
            .client()
            .post("/bin", vec![0u8, 159, 146, 150])
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{mode}");
        assert_eq!(r.header_all("set-cookie"), vec!["a=1", "b=2"]);
        assert_eq!(r.header("x-one"), Some("1"));
        assert_eq!(r.body, body);
        assert_eq!(env.up.count_body(&[0, 159, 146, 150]), 1);
        assert_eq!(env.up.count("/bin"), 1);
        host.finish().await;
    }
}

#[tokio::test]
async fn response_bodies_reach_the_filter_in_the_chunks_the_test_chooses() {
    for mode in [Mode::Ngx, Mode::Envoy] {
        let env = Env::new(mode).await;
        env.up.reply("/cl", Reply::text("x".repeat(25)));
        env.up
            .reply("/chunked", Reply::text("y".repeat(25)).chunked(7));
        let host = env.builder().response_chunk_size(10).start().await.unwrap();
        let r = host.client().get("/cl").await.unwrap();
        assert_eq!(r.body.len(), 25);
        host.settle().await;
        let expected = match mode {
            // ngx: end_of_stream only on a call carrying the whole body (fidelity.rs).
            Mode::Ngx => vec![(10, false), (10, false), (5, false)],
            Mode::Envoy => vec![(10, false), (10, false), (5, true)],
        };
        assert_eq!(
            body_calls(&host, "on_response_body"),
            expected,
            "{mode}: with a Content-Length the last chunk carries end_of_stream (Envoy)"
        );
        host.finish().await;
        let host = env.builder().response_chunk_size(10).start().await.unwrap();
        let r = host.client().get("/chunked").await.unwrap();
        assert_eq!(r.body.len(), 25);
        host.settle().await;
        assert_eq!(
            body_calls(&host, "on_response_body"),
            vec![(10, false), (10, false), (5, false), (0, true)],
            "{mode}: a chunked upstream ends with an empty end_of_stream call"
        );
        host.finish().await;
    }
}

#[tokio::test]
async fn ngx_the_request_body_comes_whole_envoy_in_chunks() {
    for mode in [Mode::Ngx, Mode::Envoy] {
        let env = Env::new(mode).await;
        let host = env.builder().request_chunk_size(4).start().await.unwrap();
        let r = host.client().post("/", "0123456789").await.unwrap();
        assert_eq!(r.status, 200);
        host.settle().await;
        let calls = body_calls(&host, "on_request_body");
        match mode {
            Mode::Ngx => assert_eq!(calls, vec![(10, true)]),
            Mode::Envoy => assert_eq!(calls, vec![(4, false), (4, false), (2, true)]),
        }
        assert_eq!(env.up.count_body(b"0123456789"), 1);
        host.finish().await;
    }
}

#[tokio::test]
async fn ngx_a_body_past_client_body_buffer_size_reaches_the_filter_empty() {
    let env = Env::new(Mode::Ngx).await;
    let host = env
        .builder()
        .client_body_buffer_size(100)
        .start()
        .await
        .unwrap();
    let body = vec![b'z'; 200];
    let r = host.client().post("/big", body.clone()).await.unwrap();
    assert_eq!(r.status, 200);
    host.settle().await;
    // The filter is told the body's size (the temp file's) but cannot read it.
    assert_eq!(body_calls(&host, "on_request_body"), vec![(200, true)]);
    host.assert_logged("request body at eos: 0 bytes");
    host.assert_logged("cannot read request body buffered to file");
    assert_eq!(
        env.up.count_body(&body),
        1,
        "the upstream still gets the whole body"
    );
    let small = host.client().post("/small", vec![b'z'; 100]).await.unwrap();
    assert_eq!(small.status, 200);
    host.settle().await;
    host.assert_logged("request body at eos: 100 bytes");
    host.finish().await;
}

#[tokio::test]
async fn a_local_response_follows_each_hosts_rules() {
    for mode in [Mode::Ngx, Mode::Envoy] {
        let env = Env::new(mode).await;
        let host = env.host().await;
        let r = host
            .client()
            .request("GET", "/")
            .header("x-fixture-local", "403")
            .header("x-fixture-local-body", "denied")
            .header("x-fixture-local-header", "x-a: 1")
            .header("x-fixture-local-header", "x-a: 2")
            .header("x-fixture-add-response-header", "x-added: yes")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status, 403);
        assert_eq!(
            r.header("x-added"),
            Some("yes"),
            "{mode}: on_response_headers runs for it"
        );
        match mode {
            Mode::Ngx => {
                assert_eq!(r.text(), "denied\n", "a line feed is appended");
                assert_eq!(
                    r.header_all("x-a"),
                    vec!["2"],
                    "the last repeated name wins"
                );
                assert_eq!(r.reason, "", "empty reason phrase");
            }
            Mode::Envoy => {
                assert_eq!(r.text(), "denied");
                assert_eq!(r.header_all("x-a"), vec!["1", "2"]);
                assert_eq!(r.reason, "Forbidden");
            }
        }
        assert_eq!(env.up.total(), 0, "the upstream is not asked");
        host.finish().await;
    }
}

#[tokio::test]
async fn ngx_a_local_response_in_response_headers_replaces_status_and_body_only() {
    let env = Env::new(Mode::Ngx).await;
    let host = env.host().await;
    let r = host
        .client()
        .request("GET", "/")
        .header("x-fixture-local", "418")
        .header("x-fixture-local-in", "response_headers")
        .header("x-fixture-local-body", "teapot")
        .header("x-fixture-local-header", "x-ignored: 1")
        .send()
        .await
        .unwrap();
    assert_eq!((r.status, r.text().as_str()), (418, "teapot\n"));
    assert_eq!(r.header("x-ignored"), None);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain"),
        "the upstream's headers stay"
    );
    host.finish().await;
}

#[tokio::test]
async fn pause_in_response_headers_ngx_ignores_it_envoy_waits_for_resume() {
    let env = Env::new(Mode::Ngx).await;
    let host = env.host().await;
    let r = host
        .client()
        .request("GET", "/")
        .header("x-fixture-pause-in", "response_headers")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    host.assert_logged("pause in \"on_response_headers\" is not supported");
    host.finish().await;

    let env = Env::new(Mode::Envoy).await;
    let host = env.host().await;
    // Envoy: the filter pauses on a call and resumes the response in its answer.
    let r = env
        .dispatching(&host, "response_headers")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-fixture-call"), Some("200"));
    assert_eq!(env.backend.count("/call"), 1);
    host.finish().await;
}

#[tokio::test]
async fn pause_in_response_body_buffers_and_resume_there_works_only_in_envoy() {
    for mode in [Mode::Ngx, Mode::Envoy] {
        let env = Env::new(mode).await;
        env.up.reply("/", Reply::text("b".repeat(40)));
        let host = env.builder().response_chunk_size(10).start().await.unwrap();
        let r = host
            .client()
            .request("GET", "/")
            .header("x-fixture-pause-in", "response_body")
            .header("x-fixture-resume-in", "response_body")
            .send()
            .await
            .unwrap();
        assert_eq!(r.body.len(), 40, "{mode}");
        host.settle().await;
        let sizes: Vec<usize> = body_calls(&host, "on_response_body")
            .iter()
            .map(|c| c.0)
            .collect();
        match mode {
            // resume does nothing: the buffer keeps growing.
            Mode::Ngx => assert_eq!(sizes, vec![10, 20, 30, 40]),
            // resume releases the buffer each time.
            Mode::Envoy => assert_eq!(sizes, vec![10, 10, 10, 10]),
        }
        host.finish().await;
    }
}

#[tokio::test]
async fn ngx_response_buffers_overflow_withholds_end_of_stream_on_content_length() {
    let env = Env::new(Mode::Ngx).await;
    env.up.reply("/cl", Reply::text("c".repeat(100)));
    env.up
        .reply("/chunked", Reply::text("c".repeat(100)).chunked(10));
    for (path, final_eos) in [("/cl", false), ("/chunked", true)] {
        let host = env
            .builder()
            .response_chunk_size(10)
            .response_body_buffers(2, 16)
            .start()
            .await
            .unwrap();
        let r = host
            .client()
            .request("GET", path)
            .header("x-fixture-pause-in", "response_body")
            .header("x-fixture-pause-always", "1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.body.len(), 100, "the client still gets the body");
        host.settle().await;
        let calls = body_calls(&host, "on_response_body");
        assert_eq!(
            &calls[..4],
            &[(10, false), (20, false), (30, false), (40, false)][..]
        );
        assert_eq!(calls.iter().any(|c| c.1), final_eos, "{path}: {calls:?}");
        if final_eos {
            assert_eq!(*calls.last().unwrap(), (0, true));
        }
        host.assert_logged("on_log");
        host.finish().await;
    }
}

#[tokio::test]
async fn envoy_buffering_past_the_limit_gives_413_or_500() {
    let env = Env::new(Mode::Envoy).await;
    let host = env
        .builder()
        .request_chunk_size(16)
        .buffer_limit(64)
        .start()
        .await
        .unwrap();
    let r = host
        .client()
        .request("POST", "/")
        .header("x-fixture-pause-in", "request_body")
        .header("x-fixture-pause-always", "1")
        .body(vec![b'q'; 200])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status, 413);
    assert_eq!(env.up.count("/"), 0, "the body never reached the upstream");
    // Within the limit the buffered request goes on whole.
    let r = host
        .client()
        .request("POST", "/")
        .header("x-fixture-pause-in", "request_body")
        .body(vec![b'q'; 60])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    host.settle().await;
    assert!(host.logs_containing("request body at eos: 60 bytes").len() == 1);
    env.up.reply("/big", Reply::text("r".repeat(200)));
    let r = host
        .client()
        .request("GET", "/big")
        .header("x-fixture-pause-in", "response_headers,response_body")
        .header("x-fixture-pause-always", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status, 500, "the response headers were not sent yet");
    host.finish().await;
}

#[tokio::test]
async fn changing_a_body_whose_content_length_was_sent_is_a_violation() {
    for mode in [Mode::Ngx, Mode::Envoy] {
        let env = Env::new(mode).await;
        let host = env.host().await;
        host.expect_violation(ViolationKind::BodyChangedAfterContentLength);
        let r = host
            .client()
            .request("GET", "/")
            .header("x-fixture-set-body", "a different, longer body")
            .send()
            .await;
        assert!(r.is_err(), "{mode}: the client cannot read it");
        host.settle().await;
        assert_eq!(host.violations().len(), 1);
        // Removing Content-Length in response headers first makes it legal.
        let r = host
            .client()
            .request("GET", "/")
            .header("x-fixture-remove-content-length", "1")
            .header("x-fixture-set-body", "a different, longer body")
            .send()
            .await
            .unwrap();
        assert_eq!(r.text(), "a different, longer body");
        assert_eq!(r.header("content-length"), None);
        assert_eq!(r.header("transfer-encoding"), Some("chunked"));
        host.settle().await;
        assert_eq!(host.violations().len(), 1);
        host.finish().await;
    }
}

#[tokio::test]
async fn a_client_that_goes_away_while_paused_on_a_call() {
    for mode in [Mode::Ngx, Mode::Envoy] {
        let env = Env::new(mode).await;
        env.backend.reply(
            "/call",
            Reply::text("ok").delay(std::time::Duration::from_millis(1000)),
        );
        let host = env.host().await;
        env.dispatching(&host, "request_headers")
            .send_and_disconnect()
            .await
            .unwrap();
        while host
            .logs_containing("client closed the connection")
            .is_empty()
        {
            tokio::task::yield_now().await;
        }
        host.settle().await;
        match mode {
            Mode::Ngx => {
                // The call completes, its answer runs, the request goes on, on_log runs.
                host.assert_logged("call response");
                assert_eq!(env.up.count("/r"), 1);
            }
            Mode::Envoy => {
                // The stream is reset: the call is cancelled, the upstream not asked.
                assert!(host.logs_containing("call response").is_empty());
                assert_eq!(env.up.count("/r"), 0);
            }
        }
        host.assert_logged("on_log");
        host.finish().await;
    }
}
