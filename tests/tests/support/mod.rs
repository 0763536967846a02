//! Shared set-up for the host's own tests: the fixture filter, a route upstream and a
//! backend for dispatched calls.
#![allow(dead_code)]

use idempotency_tests::{ClientRequest, Host, HostBuilder, Mode, Upstream, build};

pub struct Env {
    pub mode: Mode,
    /// The route's upstream.
    pub up: Upstream,
    /// The target of dispatched calls.
    pub backend: Upstream,
}

impl Env {
    pub async fn new(mode: Mode) -> Env {
        Env {
            mode,
            up: Upstream::start().await,
            backend: Upstream::start().await,
        }
    }

    /// A fixture host with the upstream and (envoy) the `backend` cluster.
    pub fn builder(&self) -> HostBuilder {
        Host::builder(self.mode, build::fixture())
            .upstream(self.up.addr())
            .cluster("backend", self.backend.addr())
    }

    pub async fn host(&self) -> Host {
        self.builder().start().await.expect("the fixture loads")
    }

    /// What the fixture passes as the dispatch upstream: `host:port` (ngx) or the
    /// cluster name (envoy).
    pub fn target(&self) -> String {
        match self.mode {
            Mode::Ngx => self.backend.addr().to_string(),
            Mode::Envoy => "backend".into(),
        }
    }

    /// A request asking the fixture to dispatch in `phase`.
    pub fn dispatching(&self, host: &Host, phase: &str) -> ClientRequest {
        host.client()
            .request("GET", "/r")
            .header("x-fixture-dispatch-in", phase)
            .header("x-fixture-dispatch-to", self.target())
    }
}

/// The sizes and end_of_stream flags the fixture logged for a body callback
/// (`on_request_body` / `on_response_body`).
pub fn body_calls(host: &Host, callback: &str) -> Vec<(usize, bool)> {
    host.logs()
        .iter()
        .filter_map(|l| {
            let rest = l.message.split_once(&format!("{callback} size="))?.1;
            let (size, eos) = rest.split_once(" eos=")?;
            Some((size.parse().ok()?, eos.trim() == "true"))
        })
        .collect()
}
