//! The deferred record/release queue: bounded, in module memory, shared by the root and HTTP
//! contexts of one Wasm instance (one per Kong worker, one per Envoy worker thread).
//!
//! HTTP contexts push; a root context's tick takes what is due as ONE batch and sends it as
//! one call (`POST {prefix}/captures/batch`), and handles its answer item by item: 2xx
//! settles, a retryable failure (no answer, 5xx, 408, 429) is retried with exponential
//! backoff up to `queue.max_attempts` sends, anything else fails at once. A push over
//! `queue.max_entries` or `queue.max_bytes` is dropped and counted. The queue is lost when the
//! instance is reset (a trap on Kong, a VM reload): the backend's lease then frees the key, so
//! the retry executes again.
//!
//! Why one call per root context at a time, sent from the tick only (HOSTS.md, "Three bugs of
//! ngx_wasm_module"): on Kong a root call that completes while another of the same root
//! context is pending leaks a connection slot of the worker for good, and a root dispatch made
//! inside the root's own `on_http_call_response` crashes the worker. So a root context never
//! has two calls in flight, and never sends from an answer: at most one batch per tick. The
//! same rules hold on every host, so that there is one code path.
//!
//! A batch in flight has a deadline: a call that is never answered (Envoy cancels the calls of
//! a root context deleted by a reconfiguration) is settled as unanswered when it passes, so it
//! cannot stop the queue. An entry whose earlier send went unanswered may have been applied:
//! a 403 then means done.
//!
//! Time is passed in (milliseconds), so all of it is tested natively.

use std::collections::VecDeque;
use std::rc::Rc;

use crate::config::{QueueConfig, Server};
use crate::decision::CallContext;

/// Entries one batch carries at most (the backend takes up to 1000).
pub const MAX_BATCH_ENTRIES: usize = 500;
/// Bytes of entry bodies one batch carries at most, unless its first entry alone is larger
/// (it then goes alone: its single call would be as large). Half the backend's default body
/// limit (8 MiB).
pub const MAX_BATCH_BYTES: usize = 4 << 20;
/// First retry delay; doubles with each attempt.
pub const BACKOFF_BASE_MS: u64 = 200;
/// Longest retry delay.
pub const BACKOFF_MAX_MS: u64 = 10_000;
/// Added to a batch's deadline beyond its time-out: ngx_wasm_module applies the call's
/// time-out to the connect, the send and the read each, so a call may last about three
/// time-outs before the host reports it; the deadline must not free the slot earlier, or a
/// second call would overlap the first (HOSTS.md, bug 3).
pub const DEADLINE_GRACE_MS: u64 = 1_000;

/// Which call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Record,
    Release,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Record => "record",
            Op::Release => "release",
        }
    }

    /// The method of the single call (sent inline, from an HTTP context).
    pub fn method(self) -> &'static str {
        match self {
            Op::Record => "POST",
            Op::Release => "DELETE",
        }
    }
}

/// One queued call.
#[derive(Debug, Clone)]
pub struct Entry {
    pub op: Op,
    /// Where it goes: the backend of the configuration that queued it.
    pub target: Rc<Server>,
    /// The single call's JSON body (an object); a batch carries it with `op` added.
    pub body: Vec<u8>,
    /// Sends so far.
    pub attempts: u32,
    pub max_attempts: u32,
    /// Not before this instant (ms).
    pub due_ms: u64,
    /// The same call may already have been applied (an earlier send went unanswered, or an
    /// inline call was cut short): a 403 then means done, not failed.
    pub tolerate_403: bool,
    /// The request it records or releases: its trace context and id go with its batch item
    /// (a batch call carries many requests, so the call itself carries none).
    pub context: CallContext,
}

impl Entry {
    pub fn new(op: Op, target: Rc<Server>, body: Vec<u8>, max_attempts: u32, now_ms: u64) -> Entry {
        Entry {
            op,
            target,
            body,
            attempts: 0,
            max_attempts: max_attempts.max(1),
            due_ms: now_ms,
            tolerate_403: false,
            context: CallContext::default(),
        }
    }

    /// The same entry, for the request of `context`.
    pub fn for_request(mut self, context: CallContext) -> Entry {
        self.context = context;
        self
    }
}

/// Entries sent (or to be sent) together as one batch call, all to one target.
#[derive(Debug)]
pub struct Batch {
    pub target: Rc<Server>,
    pub entries: Vec<Entry>,
}

impl Batch {
    /// The body of `POST {prefix}/captures/batch`: `{"operations": [...]}`, each entry's own
    /// body with `"op"` added, and its request's `request_id` and `traceparent` when it has
    /// them (spliced, not parsed again: every body is a JSON object).
    pub fn body(&self) -> Vec<u8> {
        let size: usize = self.entries.iter().map(|e| e.body.len() + 40).sum();
        let mut out = Vec::with_capacity(size + 20);
        out.extend_from_slice(b"{\"operations\":[");
        for (i, e) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"op\":\"");
            out.extend_from_slice(e.op.name().as_bytes());
            out.push(b'"');
            e.context.write_batch_fields(&mut out);
            match e.body.strip_prefix(b"{") {
                // `{}`: nothing after the op.
                Some(rest) if rest.first() == Some(&b'}') => out.extend_from_slice(rest),
                Some(rest) => {
                    out.push(b',');
                    out.extend_from_slice(rest);
                }
                // Never built so (the bodies are serialized objects): an empty item the
                // backend answers 400 for, rather than a malformed batch.
                None => out.push(b'}'),
            }
        }
        out.extend_from_slice(b"]}");
        out
    }
}

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Done(Op),
    /// Queued again for a later attempt.
    Retrying(Op),
    /// Given up (refused, or out of attempts).
    Failed(Op),
}

/// How an answer status is handled.
pub fn classify(status: Option<u16>, tolerate_403: bool) -> Class {
    match status {
        Some(s) if (200..300).contains(&s) => Class::Done,
        Some(403) if tolerate_403 => Class::Done,
        None | Some(408) | Some(429) => Class::Retry,
        Some(s) if s >= 500 => Class::Retry,
        Some(_) => Class::Fail,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Done,
    Retry,
    Fail,
}

/// A batch in flight: who sent it, under which token, until when it may stay unanswered.
#[derive(Debug)]
struct InFlight {
    root: u32,
    token: u32,
    deadline_ms: u64,
    entries: Vec<Entry>,
}

/// The queue.
#[derive(Debug, Default)]
pub struct Queue {
    pending: VecDeque<Entry>,
    in_flight: Vec<InFlight>,
    bytes: usize,
}

impl Queue {
    /// Entries queued or in flight.
    pub fn len(&self) -> usize {
        self.pending.len()
            + self
                .in_flight
                .iter()
                .map(|f| f.entries.len())
                .sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Queues a call; `false` when it is dropped for the bounds.
    pub fn push(&mut self, e: Entry, limits: &QueueConfig) -> bool {
        let bytes = self.bytes.saturating_add(e.body.len());
        if self.len() >= limits.max_entries || bytes > limits.max_bytes {
            return false;
        }
        self.bytes = bytes;
        self.pending.push_back(e);
        true
    }

    /// How many entries the batch in flight under `token` carries.
    pub fn batch_len(&self, token: u32) -> Option<usize> {
        self.in_flight
            .iter()
            .find(|f| f.token == token)
            .map(|f| f.entries.len())
    }

    /// Whether the root context `root` has a batch in flight.
    pub fn busy(&self, root: u32) -> bool {
        self.in_flight.iter().any(|f| f.root == root)
    }

    /// The batch `root` may send at `now_ms`: the due entries that go where the first due one
    /// goes, in order, within [`MAX_BATCH_ENTRIES`] and [`MAX_BATCH_BYTES`] (at least one).
    /// `None` when `root` has a batch in flight or nothing is due. The entries stay counted in
    /// the bounds until they settle.
    pub fn take_batch(&mut self, root: u32, now_ms: u64) -> Option<Batch> {
        if self.busy(root) {
            return None;
        }
        let first = self.pending.iter().position(|e| e.due_ms <= now_ms)?;
        let target = self.pending.get(first)?.target.clone();
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        let mut i = first;
        while entries.len() < MAX_BATCH_ENTRIES {
            let Some(e) = self.pending.get(i) else { break };
            let same = Rc::ptr_eq(&e.target, &target) || *e.target == *target;
            if !same || e.due_ms > now_ms {
                i += 1;
                continue;
            }
            let len = e.body.len();
            if !entries.is_empty() && bytes.saturating_add(len) > MAX_BATCH_BYTES {
                break;
            }
            bytes = bytes.saturating_add(len);
            // Taken out where it stands: the next one moves to `i`.
            if let Some(e) = self.pending.remove(i) {
                entries.push(e);
            }
        }
        Some(Batch { target, entries })
    }

    /// A taken batch was dispatched by `root` under `token` at `now_ms`.
    pub fn sent(&mut self, root: u32, token: u32, batch: Batch, now_ms: u64) {
        let timeout = batch.target.timeout_ms;
        let deadline_ms = now_ms
            // Not `saturating_mul`, whose overflow check is a 128-bit multiply (`__multi3`)
            // on wasm32 (as is `min(u64::MAX / 3)`, which LLVM reads as that check): a bound
            // far above any timeout the configuration allows, under which `* 3` cannot overflow.
            .saturating_add(timeout.min(1 << 53) * 3)
            .saturating_add(DEADLINE_GRACE_MS);
        let entries = batch
            .entries
            .into_iter()
            .map(|mut e| {
                e.attempts = e.attempts.saturating_add(1);
                e
            })
            .collect();
        self.in_flight.push(InFlight {
            root,
            token,
            deadline_ms,
            entries,
        });
    }

    /// A taken batch could not be dispatched: an attempt without an answer for each entry.
    pub fn send_failed(&mut self, batch: Batch, now_ms: u64) -> Vec<Settled> {
        batch
            .entries
            .into_iter()
            .map(|mut e| {
                e.attempts = e.attempts.saturating_add(1);
                self.settle(e, None, now_ms)
            })
            .collect()
    }

    /// The answer to the batch sent under `token`: `statuses` holds each entry's status, in
    /// order (`None` for an entry without one: the call failed, or its answer was
    /// unreadable). `None` when the token is not one of the queue's batches (it passed its
    /// deadline, or it is another context's call).
    pub fn answered(
        &mut self,
        token: u32,
        statuses: &[Option<u16>],
        now_ms: u64,
    ) -> Option<Vec<Settled>> {
        let i = self.in_flight.iter().position(|f| f.token == token)?;
        let batch = self.in_flight.swap_remove(i);
        Some(
            batch
                .entries
                .into_iter()
                .enumerate()
                .map(|(n, e)| {
                    let status = statuses.get(n).copied().flatten();
                    self.settle(e, status, now_ms)
                })
                .collect(),
        )
    }

    /// Settles the batches whose deadline passed as unanswered (their answer will be ignored);
    /// their roots may send again.
    pub fn expire(&mut self, now_ms: u64) -> Vec<Settled> {
        let mut settled = Vec::new();
        let mut i = 0;
        while i < self.in_flight.len() {
            if self
                .in_flight
                .get(i)
                .is_some_and(|f| f.deadline_ms <= now_ms)
            {
                let batch = self.in_flight.swap_remove(i);
                for e in batch.entries {
                    settled.push(self.settle(e, None, now_ms));
                }
            } else {
                i += 1;
            }
        }
        settled
    }

    fn settle(&mut self, mut e: Entry, status: Option<u16>, now_ms: u64) -> Settled {
        let op = e.op;
        let class = classify(status, e.tolerate_403);
        if class != Class::Retry || e.attempts >= e.max_attempts {
            self.bytes = self.bytes.saturating_sub(e.body.len());
        }
        match class {
            Class::Done => Settled::Done(op),
            Class::Fail => Settled::Failed(op),
            Class::Retry if e.attempts < e.max_attempts => {
                e.due_ms = now_ms.saturating_add(backoff_ms(e.attempts));
                // Unanswered: it may have been applied, and then its retry gets 403.
                e.tolerate_403 |= status.is_none();
                // Still counted in the bounds: it never left them.
                self.pending.push_back(e);
                Settled::Retrying(op)
            }
            Class::Retry => Settled::Failed(op),
        }
    }
}

/// The delay before the next send after `attempts` sends.
pub fn backoff_ms(attempts: u32) -> u64 {
    let shift = attempts.saturating_sub(1).min(16);
    // 200 << 16 is far from overflowing (and a plain shift, unlike `saturating_mul`, needs no
    // 128-bit multiply on wasm32).
    (BACKOFF_BASE_MS << shift).min(BACKOFF_MAX_MS)
}

#[cfg(test)]
mod tests {
    use super::*;
    // On wasm32-unknown-unknown the tests run under wasm-bindgen-test (Cargo.toml).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn target(upstream: &str) -> Rc<Server> {
        Rc::new(Server::new(
            upstream.into(),
            upstream.into(),
            "/api/v2".into(),
            100,
            None,
        ))
    }

    fn limits(max_entries: usize, max_bytes: usize) -> QueueConfig {
        QueueConfig {
            max_entries,
            max_bytes,
            max_attempts: 3,
        }
    }

    fn sized(n: usize) -> Entry {
        Entry::new(Op::Record, target("b:1"), vec![b'x'; n], 3, 0)
    }

    fn entry(key: &str) -> Entry {
        let body = format!("{{\"idempotency_key\":\"{key}\"}}").into_bytes();
        Entry::new(Op::Record, target("b:1"), body, 3, 0)
    }

    fn keys(batch: &Batch) -> Vec<String> {
        batch
            .entries
            .iter()
            .map(|e| {
                let v: serde_json::Value = serde_json::from_slice(&e.body).unwrap();
                v["idempotency_key"].as_str().unwrap().to_string()
            })
            .collect()
    }

    const ROOT: u32 = 1;

    #[test]
    fn bounds_drop_what_does_not_fit() {
        let mut q = Queue::default();
        let l = limits(2, 100);
        assert!(q.push(sized(10), &l));
        assert!(q.push(sized(10), &l));
        assert!(!q.push(sized(10), &l), "entries bound");
        let mut q = Queue::default();
        assert!(q.push(sized(60), &l));
        assert!(!q.push(sized(41), &l), "bytes bound");
        assert!(q.push(sized(40), &l));
        assert_eq!(q.bytes(), 100);
    }

    #[test]
    fn a_batch_in_flight_counts_against_the_bounds_until_it_settles() {
        let mut q = Queue::default();
        let l = limits(2, 100);
        assert!(q.push(sized(10), &l));
        assert!(q.push(sized(10), &l));
        let b = q.take_batch(ROOT, 0).unwrap();
        assert_eq!(b.entries.len(), 2);
        q.sent(ROOT, 7, b, 0);
        assert_eq!((q.len(), q.bytes()), (2, 20));
        assert!(!q.push(sized(1), &l));
        assert_eq!(
            q.answered(7, &[Some(200), Some(200)], 5),
            Some(vec![Settled::Done(Op::Record); 2])
        );
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
        assert_eq!(q.answered(7, &[Some(200)], 5), None, "unknown token");
    }

    #[test]
    fn one_batch_per_root_context_at_a_time() {
        let mut q = Queue::default();
        let l = limits(100, 10_000);
        q.push(entry("a"), &l);
        let b = q.take_batch(ROOT, 0).unwrap();
        q.sent(ROOT, 1, b, 0);
        q.push(entry("b"), &l);
        assert!(q.busy(ROOT));
        assert!(q.take_batch(ROOT, 0).is_none(), "its call is in flight");
        // Another root context (another filter in the chain) has its own slot.
        let other = q.take_batch(2, 0).unwrap();
        assert_eq!(keys(&other), ["b"]);
        q.sent(2, 2, other, 0);
        q.answered(1, &[Some(200)], 1);
        assert!(!q.busy(ROOT));
    }

    #[test]
    fn a_batch_takes_what_is_due_for_one_target_in_order() {
        let mut q = Queue::default();
        let l = limits(100, 10_000);
        q.push(entry("a"), &l);
        let mut later = entry("later");
        later.due_ms = 50;
        q.push(later, &l);
        let mut elsewhere = entry("elsewhere");
        elsewhere.target = target("c:2");
        q.push(elsewhere, &l);
        q.push(entry("b"), &l);
        let b = q.take_batch(ROOT, 10).unwrap();
        assert_eq!(keys(&b), ["a", "b"]);
        assert_eq!(b.target.upstream, "b:1");
        q.sent(ROOT, 1, b, 10);
        q.answered(1, &[Some(200), Some(200)], 10);
        // The other backend's entry next, then the one not yet due.
        let b = q.take_batch(ROOT, 10).unwrap();
        assert_eq!(keys(&b), ["elsewhere"]);
        q.sent(ROOT, 2, b, 10);
        q.answered(2, &[Some(200)], 10);
        assert!(q.take_batch(ROOT, 10).is_none());
        assert_eq!(keys(&q.take_batch(ROOT, 50).unwrap()), ["later"]);
    }

    #[test]
    fn a_batch_is_bounded_in_entries_and_bytes() {
        let mut q = Queue::default();
        let l = limits(10_000, usize::MAX);
        for i in 0..MAX_BATCH_ENTRIES + 3 {
            q.push(entry(&i.to_string()), &l);
        }
        assert_eq!(
            q.take_batch(ROOT, 0).unwrap().entries.len(),
            MAX_BATCH_ENTRIES
        );
        let mut q = Queue::default();
        q.push(sized(MAX_BATCH_BYTES / 2), &l);
        q.push(sized(MAX_BATCH_BYTES / 2), &l);
        q.push(sized(1), &l);
        assert_eq!(q.take_batch(ROOT, 0).unwrap().entries.len(), 2);
        // An entry larger than the bound goes alone.
        let mut q = Queue::default();
        q.push(sized(MAX_BATCH_BYTES + 1), &l);
        q.push(sized(1), &l);
        assert_eq!(q.take_batch(ROOT, 0).unwrap().entries.len(), 1);
        assert_eq!(q.take_batch(7, 0).unwrap().entries.len(), 1);
    }

    #[test]
    fn each_entry_settles_by_its_own_status() {
        let mut q = Queue::default();
        let l = limits(100, 10_000);
        for k in ["done", "refused", "retried", "unanswered"] {
            q.push(entry(k), &l);
        }
        let b = q.take_batch(ROOT, 0).unwrap();
        q.sent(ROOT, 1, b, 0);
        let settled = q
            .answered(1, &[Some(200), Some(403), Some(503)], 1000)
            .unwrap();
        assert_eq!(
            settled,
            [
                Settled::Done(Op::Record),
                Settled::Failed(Op::Record),
                Settled::Retrying(Op::Record),
                Settled::Retrying(Op::Record),
            ]
        );
        assert!(
            q.take_batch(ROOT, 1000).is_none(),
            "not due before the backoff"
        );
        let b = q.take_batch(ROOT, 1000 + backoff_ms(1)).unwrap();
        assert_eq!(keys(&b), ["retried", "unanswered"]);
        assert!(
            !b.entries[0].tolerate_403,
            "it was answered 503: nothing was applied"
        );
        assert!(
            b.entries[1].tolerate_403,
            "unanswered: it may have been applied"
        );
        q.sent(ROOT, 2, b, 2000);
        assert_eq!(
            q.answered(2, &[Some(200), Some(403)], 2000).unwrap(),
            [Settled::Done(Op::Record), Settled::Done(Op::Record)]
        );
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn retries_with_backoff_then_fails() {
        let mut q = Queue::default();
        let l = limits(10, 1000);
        q.push(sized(1), &l);
        let b = q.take_batch(ROOT, 0).unwrap();
        q.sent(ROOT, 1, b, 0);
        assert_eq!(
            q.answered(1, &[Some(503)], 1000).unwrap(),
            [Settled::Retrying(Op::Record)]
        );
        let b = q.take_batch(ROOT, 1000 + backoff_ms(1)).unwrap();
        assert_eq!(b.entries[0].attempts, 1);
        q.sent(ROOT, 2, b, 2000);
        assert_eq!(
            q.answered(2, &[None], 2000).unwrap(),
            [Settled::Retrying(Op::Record)]
        );
        let b = q.take_batch(ROOT, 10_000).unwrap();
        assert_eq!(
            q.send_failed(b, 10_000),
            [Settled::Failed(Op::Record)],
            "the third attempt was the last"
        );
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn a_batch_never_answered_is_settled_at_its_deadline() {
        let mut q = Queue::default();
        let l = limits(10, 1000);
        q.push(entry("a"), &l);
        let b = q.take_batch(ROOT, 0).unwrap();
        // Time-out 100 ms: the host reports within three of them; then the grace.
        q.sent(ROOT, 1, b, 0);
        let deadline = 300 + DEADLINE_GRACE_MS;
        assert!(q.expire(deadline - 1).is_empty());
        assert!(q.busy(ROOT));
        assert_eq!(q.expire(deadline), [Settled::Retrying(Op::Record)]);
        assert!(!q.busy(ROOT), "the root may send again");
        assert_eq!(
            q.answered(1, &[Some(200)], deadline),
            None,
            "a late answer is ignored"
        );
        let b = q.take_batch(ROOT, deadline + backoff_ms(1)).unwrap();
        assert!(b.entries[0].tolerate_403);
    }

    #[test]
    fn the_batch_body_is_each_body_with_its_op_and_request() {
        let mut q = Queue::default();
        let l = limits(10, 1000);
        q.push(entry("a"), &l);
        let mut release = entry("b");
        release.op = Op::Release;
        q.push(release, &l);
        q.push(
            Entry::new(Op::Record, target("b:1"), b"{}".to_vec(), 1, 0),
            &l,
        );
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = CallContext {
            traceparent: Some(traceparent.into()),
            tracestate: Some("not=sent".into()),
            request_id: Some(r#"r"1"#.into()),
        };
        q.push(entry("c").for_request(context.clone()), &l);
        q.push(
            Entry::new(Op::Release, target("b:1"), b"{}".to_vec(), 1, 0).for_request(context),
            &l,
        );
        let body = q.take_batch(ROOT, 0).unwrap().body();
        let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(
            v,
            serde_json::json!({"operations": [
                {"op": "record", "idempotency_key": "a"},
                {"op": "release", "idempotency_key": "b"},
                {"op": "record"},
                // Each request's id and traceparent with its own item.
                {"op": "record", "request_id": "r\"1", "traceparent": traceparent, "idempotency_key": "c"},
                {"op": "release", "request_id": "r\"1", "traceparent": traceparent},
            ]})
        );
    }

    #[test]
    fn statuses_are_classified() {
        assert_eq!(classify(Some(403), false), Class::Fail);
        assert_eq!(classify(Some(403), true), Class::Done);
        assert_eq!(classify(Some(400), false), Class::Fail);
        assert_eq!(classify(Some(429), false), Class::Retry);
        assert_eq!(classify(Some(408), false), Class::Retry);
        assert_eq!(classify(None, false), Class::Retry);
        assert_eq!(classify(Some(204), false), Class::Done);
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff_ms(1), 200);
        assert_eq!(backoff_ms(2), 400);
        assert_eq!(backoff_ms(3), 800);
        assert_eq!(backoff_ms(30), BACKOFF_MAX_MS);
        assert_eq!(backoff_ms(0), 200);
    }
}
