//! `dispatch_http_call` over the network: a real HTTP/1.1 call over loopback with the
//! call's time-out, and how each host reports the outcome to `on_http_call_response`.
//!
//! * ngx (ngx_http_proxy_wasm_dispatch.c): every call opens a new connection and sends
//!   `Connection: close`, `Host` from `:authority` (else the `host:port` string) and a
//!   `Content-Length`. A failed call reaches `on_http_call_response` with no headers, no
//!   body and a `:dispatch_status` pseudo-header (`timeout`, `broken connection`,
//!   `resolver failure`; Kong/ngx_wasm_module PR #625).
//! * envoy (`Context::onHttpCallSuccess/Failure`): the async client runs Envoy's router,
//!   so a refused connection or a reset before headers comes back as a 503 response
//!   (body `upstream connect error or disconnect/reset before headers. reset reason: …`,
//!   envoyproxy/envoy#27311) and a time-out as 504 `upstream request timeout`; only a
//!   reset after the headers is a failure: 0 headers, and `proxy_get_status` gives
//!   `BrokenConnection` (11) / `reset`.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use tokio::net::TcpStream;

use crate::abi::Pairs;
use crate::contexts::DispatchRequest;
use crate::rules::Mode;

/// How a call ended, before each host's translation.
#[derive(Clone, Debug)]
pub enum Outcome {
    Response {
        headers: Pairs,
        body: Vec<u8>,
    },
    Timeout,
    /// No connection could be made.
    Refused,
    /// The connection broke before the response head.
    ResetBeforeHeaders,
    /// The connection broke after the response head.
    ResetAfterHeaders,
    /// The name did not resolve (ngx only).
    Resolver,
}

/// Sends the call and waits for the whole response (or the time-out).
pub async fn perform(mode: Mode, call: DispatchRequest) -> Outcome {
    let addr = match call.target {
        Ok(addr) => addr,
        Err(_) => return Outcome::Resolver,
    };
    let exchange = async move {
        let stream = match TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(_) => return Outcome::Refused,
        };
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, conn) = match hyper::client::conn::http1::handshake(io).await {
            Ok(x) => x,
            Err(_) => return Outcome::ResetBeforeHeaders,
        };
        let _conn = crate::client::Closer::spawn(conn);
        let host = call.authority.clone().unwrap_or_else(|| addr.to_string());
        let mut builder = Request::builder()
            .method(call.method.as_str())
            .uri(call.path.as_str())
            .header("host", host);
        if mode == Mode::Ngx {
            builder = builder.header("connection", "close");
        }
        for (k, v) in &call.headers {
            if k == "host" {
                continue;
            }
            builder = builder.header(k.as_str(), v.as_slice());
        }
        builder = builder.header("content-length", call.body.len().to_string());
        let request = match builder.body(Full::new(Bytes::from(call.body.clone()))) {
            Ok(r) => r,
            Err(_) => return Outcome::ResetBeforeHeaders,
        };
        let response = match sender.send_request(request).await {
            Ok(r) => r,
            Err(_) => return Outcome::ResetBeforeHeaders,
        };
        let mut headers: Pairs = vec![(":status".into(), response.status().as_str().into())];
        for (k, v) in response.headers() {
            headers.push((k.as_str().to_string(), v.as_bytes().to_vec()));
        }
        match response.into_body().collect().await {
            Ok(body) => Outcome::Response {
                headers,
                body: body.to_bytes().to_vec(),
            },
            Err(_) => Outcome::ResetAfterHeaders,
        }
    };
    match call.timeout {
        Some(t) => match tokio::time::timeout(t, exchange).await {
            Ok(outcome) => outcome,
            Err(_) => Outcome::Timeout,
        },
        None => exchange.await,
    }
}

/// What `on_http_call_response` sees: headers, body, ngx `:dispatch_status`, and the
/// `proxy_get_status` pair.
pub struct Delivered {
    pub headers: Pairs,
    pub body: Vec<u8>,
    pub dispatch_status: Option<String>,
    pub status: (u32, String),
}

/// The body of Envoy's router reply (503) when the upstream refuses the connection, for a
/// call as for a route.
pub const ENVOY_REFUSED: &str = "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure, transport failure reason: delayed connect error: 111";
/// The same when the connection breaks before the response head.
pub const ENVOY_RESET: &str = "upstream connect error or disconnect/reset before headers. reset reason: connection termination";

fn envoy_local(code: u16, body: &str) -> Delivered {
    Delivered {
        headers: vec![
            (":status".into(), code.to_string().into_bytes()),
            ("content-length".into(), body.len().to_string().into_bytes()),
            ("content-type".into(), b"text/plain".to_vec()),
        ],
        body: body.as_bytes().to_vec(),
        dispatch_status: None,
        status: (0, String::new()),
    }
}

/// Translates an outcome the way the mode's host reports it.
pub fn deliver(mode: Mode, outcome: Outcome) -> Delivered {
    let failed = |s: &str| Delivered {
        headers: Vec::new(),
        body: Vec::new(),
        dispatch_status: Some(s.to_string()),
        status: (0, String::new()),
    };
    match (mode, outcome) {
        (_, Outcome::Response { headers, body }) => Delivered {
            headers,
            body,
            dispatch_status: None,
            status: (0, String::new()),
        },
        (Mode::Ngx, Outcome::Timeout) => failed("timeout"),
        (Mode::Ngx, Outcome::Resolver) => failed("resolver failure"),
        (Mode::Ngx, _) => failed("broken connection"),
        (Mode::Envoy, Outcome::Timeout) => envoy_local(504, "upstream request timeout"),
        (Mode::Envoy, Outcome::Refused) => envoy_local(503, ENVOY_REFUSED),
        (Mode::Envoy, Outcome::ResetBeforeHeaders | Outcome::Resolver) => {
            envoy_local(503, ENVOY_RESET)
        }
        (Mode::Envoy, Outcome::ResetAfterHeaders) => Delivered {
            headers: Vec::new(),
            body: Vec::new(),
            dispatch_status: None,
            status: (crate::abi::status::BROKEN_CONNECTION, "reset".into()),
        },
    }
}

/// The default ngx time-out for a call with timeout 0 (proxy_wasm_socket_*_timeout).
pub const NGX_DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
