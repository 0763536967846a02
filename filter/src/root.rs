//! The root context: configuration, the tick that sends the deferred queue, and the answers
//! to the queue's calls. Root-context calls may outlive any request.
//!
//! The queue is sent from `on_tick` only, one batch call in flight per root context, never
//! from `on_http_call_response`: on Kong a root dispatch made from its own call's answer
//! crashes the worker, and overlapping root calls leak its connections (HOSTS.md, "Three bugs
//! of ngx_wasm_module"; see [`crate::queue`]).

use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, LogLevel, MapType};

use crate::config::Config;
use crate::decision::{CallAnswer, CallContext, batch_statuses};
use crate::filter::Http;
use crate::metrics::Metric;
use crate::queue::{Op, Settled};
use crate::shared::{Endpoint, call_backend, count, define_metrics, log, now_ms, with_queue};

pub struct Root {
    /// This root context's id: its batch in flight is its own.
    id: u32,
    config: Option<Rc<Config>>,
    tick_set: bool,
}

impl Root {
    pub fn new(id: u32) -> Root {
        Root {
            id,
            config: None,
            tick_set: false,
        }
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let raw = crate::shared::header_map(MapType::HttpCallResponseHeaders);
        let headers = crate::pairs::parse(&raw).unwrap_or_default();
        let body = if body_size > 0 {
            hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                .ok()
                .flatten()
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let answer = CallAnswer::from_headers(&headers, body);
        let now = now_ms();
        let Some(n) = with_queue(|q| q.batch_len(token)) else {
            return;
        };
        let statuses = batch_statuses(&answer, n);
        if let Some(settled) = with_queue(|q| q.answered(token, &statuses, now)) {
            // The answer is only described in the lines of entries not done (a `format!`).
            let all_done = settled.iter().all(|s| matches!(s, Settled::Done(_)));
            let what = if all_done {
                String::new()
            } else {
                answer.describe()
            };
            report(&settled, &what);
        }
        // Nothing is sent from here: the next tick sends what is due.
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
        send_due(self.id);
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http::new(self.config.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One tick's work: settle the batches past their deadline, then send what is due as one
/// batch, unless this root context still has one in flight.
fn send_due(root: u32) {
    let now = now_ms();
    let expired = with_queue(|q| q.expire(now));
    if !expired.is_empty() {
        report(&expired, "no answer before its deadline");
    }
    let Some(batch) = with_queue(|q| q.take_batch(root, now)) else {
        return;
    };
    let target = batch.target.clone();
    let body = batch.body();
    // A batch carries many requests: each item names its own (see `queue::Batch::body`),
    // the call none.
    match call_backend(
        &target,
        "POST",
        Endpoint::Batch,
        &body,
        target.timeout_ms,
        &CallContext::default(),
    ) {
        Ok(token) => with_queue(|q| q.sent(root, token, batch, now)),
        Err(status) => {
            let settled = with_queue(|q| q.send_failed(batch, now));
            report(
                &settled,
                &format!("dispatch failed (status {})", status as u32),
            );
        }
    }
}

/// Counts each settled entry, and logs one line per operation that is retried or failed.
fn report(settled: &[Settled], what: &str) {
    let total = settled.len();
    for op in [Op::Record, Op::Release] {
        let (mut retrying, mut failed) = (0, 0);
        for s in settled {
            match *s {
                Settled::Done(o) if o == op => count(match op {
                    Op::Record => Metric::Recorded,
                    Op::Release => Metric::Released,
                }),
                Settled::Retrying(o) if o == op => retrying += 1,
                Settled::Failed(o) if o == op => {
                    count(Metric::RecordFailed);
                    failed += 1;
                }
                _ => {}
            }
        }
        if retrying > 0 {
            log(
                LogLevel::Info,
                &format!(
                    "{} will be retried ({retrying} of a batch of {total}): {what}",
                    op.name()
                ),
            );
        }
        if failed > 0 {
            log(
                LogLevel::Warn,
                &format!(
                    "{} failed ({failed} of a batch of {total}): {what} (the lease will free the key)",
                    op.name()
                ),
            );
        }
    }
}
