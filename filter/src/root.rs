//! The root context: configuration, the tick that sends the deferred queue, and the answers
//! to the queue's calls. Root-context calls may outlive any request (HOSTS.md: allowed in
//! `on_tick` and `on_http_call_response` on Kong).

use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, LogLevel, MapType};

use crate::config::Config;
use crate::decision::CallAnswer;
use crate::filter::Http;
use crate::metrics::Metric;
use crate::queue::{Op, Settled};
use crate::shared::{call_backend, count, define_metrics, log, now_ms, with_queue};

#[derive(Default)]
pub struct Root {
    config: Option<Rc<Config>>,
    tick_set: bool,
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        _body: usize,
        _trailers: usize,
    ) {
        let headers =
            crate::pairs::lossy(crate::shared::header_map(MapType::HttpCallResponseHeaders));
        let answer = CallAnswer::from_headers(&headers, Vec::new());
        let now = now_ms();
        if let Some(settled) = with_queue(|q| q.answered(token, answer.status, now)) {
            report(settled, &answer.describe());
        }
        pump();
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default();
        match Config::parse(&bytes) {
            Ok(cfg) => {
                define_metrics();
                if !self.tick_set {
                    // Once per root context (HOSTS.md).
                    let _ = hostcalls::set_tick_period(Duration::from_millis(cfg.tick_ms));
                    self.tick_set = true;
                }
                log(
                    LogLevel::Info,
                    &format!(
                        "configured: backend {} {}, header {}, record {}",
                        cfg.server.upstream,
                        cfg.server.captures_path,
                        cfg.header,
                        cfg.record.as_str()
                    ),
                );
                self.config = Some(Rc::new(cfg));
                true
            }
            Err(e) => {
                log(LogLevel::Error, &e.to_string());
                false
            }
        }
    }

    fn on_tick(&mut self) {
        pump();
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http::new(self.config.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Sends every queued call that is due, while send slots are free.
pub fn pump() {
    let now = now_ms();
    while let Some(entry) = with_queue(|q| q.take_due(now)) {
        let server = &entry.target;
        match call_backend(server, entry.op.method(), &entry.body, server.timeout_ms) {
            Ok(token) => with_queue(|q| q.sent(token, entry)),
            Err(status) => {
                let settled = with_queue(|q| q.send_failed(entry, now));
                report(
                    settled,
                    &format!("dispatch failed (status {})", status as u32),
                );
            }
        }
    }
}

fn report(settled: Settled, what: &str) {
    match settled {
        Settled::Done(Op::Record) => count(Metric::Recorded),
        Settled::Done(Op::Release) => count(Metric::Released),
        Settled::Retrying(op) => log(
            LogLevel::Info,
            &format!("{} will be retried: {what}", op.name()),
        ),
        Settled::Failed(op) => {
            count(Metric::RecordFailed);
            log(
                LogLevel::Warn,
                &format!("{} failed: {what} (the lease will free the key)", op.name()),
            );
        }
    }
}
