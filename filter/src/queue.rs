//! The deferred record/release queue: bounded, in module memory, shared by the root and HTTP
//! contexts of one Wasm instance (one per Kong worker, one per Envoy worker thread).
//!
//! HTTP contexts push; the root context's tick sends what is due (at most [`MAX_IN_FLIGHT`]
//! calls at once) and handles the answers: 2xx settles, a retryable failure (no answer, 5xx,
//! 408, 429) is retried with exponential backoff up to `queue.max_attempts` sends, anything
//! else fails at once. A push over `queue.max_entries` or `queue.max_bytes` is dropped and
//! counted. The queue is lost when the instance is reset (a trap on Kong, a VM reload): the
//! backend's lease then frees the key, so the retry executes again.
//!
//! Time is passed in (milliseconds), so all of it is tested natively.

use std::collections::VecDeque;
use std::rc::Rc;

use crate::config::{QueueConfig, Server};

/// Calls in flight from the tick at most.
pub const MAX_IN_FLIGHT: usize = 32;
/// First retry delay; doubles with each attempt.
pub const BACKOFF_BASE_MS: u64 = 200;
/// Longest retry delay.
pub const BACKOFF_MAX_MS: u64 = 10_000;

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
    pub body: Vec<u8>,
    /// Sends so far.
    pub attempts: u32,
    pub max_attempts: u32,
    /// Not before this instant (ms).
    pub due_ms: u64,
    /// The same call may already have been applied (an inline call cut short): a 403 then
    /// means done, not failed.
    pub tolerate_403: bool,
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
        }
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

/// The queue.
#[derive(Debug, Default)]
pub struct Queue {
    pending: VecDeque<Entry>,
    in_flight: Vec<(u32, Entry)>,
    bytes: usize,
}

impl Queue {
    pub fn len(&self) -> usize {
        self.pending.len() + self.in_flight.len()
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

    /// Takes the next call due at `now_ms`, if a send slot is free.
    pub fn take_due(&mut self, now_ms: u64) -> Option<Entry> {
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            return None;
        }
        let i = self.pending.iter().position(|e| e.due_ms <= now_ms)?;
        let e = self.pending.remove(i)?;
        self.bytes = self.bytes.saturating_sub(e.body.len());
        Some(e)
    }

    /// A taken call was dispatched under `token`.
    pub fn sent(&mut self, token: u32, mut e: Entry) {
        e.attempts = e.attempts.saturating_add(1);
        self.bytes = self.bytes.saturating_add(e.body.len());
        self.in_flight.push((token, e));
    }

    /// A taken call could not be dispatched: counts as an attempt without an answer.
    pub fn send_failed(&mut self, mut e: Entry, now_ms: u64) -> Settled {
        e.attempts = e.attempts.saturating_add(1);
        self.settle(e, None, now_ms)
    }

    /// The answer to the call sent under `token`; `None` when the token is not the queue's.
    pub fn answered(&mut self, token: u32, status: Option<u16>, now_ms: u64) -> Option<Settled> {
        let i = self.in_flight.iter().position(|(t, _)| *t == token)?;
        let (_, e) = self.in_flight.swap_remove(i);
        self.bytes = self.bytes.saturating_sub(e.body.len());
        Some(self.settle(e, status, now_ms))
    }

    fn settle(&mut self, mut e: Entry, status: Option<u16>, now_ms: u64) -> Settled {
        let op = e.op;
        match classify(status, e.tolerate_403) {
            Class::Done => Settled::Done(op),
            Class::Fail => Settled::Failed(op),
            Class::Retry if e.attempts < e.max_attempts => {
                e.due_ms = now_ms.saturating_add(backoff_ms(e.attempts));
                // Re-queue without the bounds check: the entry was already counted.
                self.bytes = self.bytes.saturating_add(e.body.len());
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
    BACKOFF_BASE_MS
        .saturating_mul(1u64 << shift)
        .min(BACKOFF_MAX_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Rc<Server> {
        Rc::new(Server {
            upstream: "b:1".into(),
            authority: "b:1".into(),
            path_prefix: "/api/v2".into(),
            captures_path: "/api/v2/captures".into(),
            token: None,
            timeout_ms: 100,
        })
    }

    fn limits(max_entries: usize, max_bytes: usize) -> QueueConfig {
        QueueConfig {
            max_entries,
            max_bytes,
            max_attempts: 3,
        }
    }

    fn entry(n: usize) -> Entry {
        Entry::new(Op::Record, target(), vec![0; n], 3, 0)
    }

    #[test]
    fn bounds_drop_what_does_not_fit() {
        let mut q = Queue::default();
        let l = limits(2, 100);
        assert!(q.push(entry(10), &l));
        assert!(q.push(entry(10), &l));
        assert!(!q.push(entry(10), &l), "entries bound");
        let mut q = Queue::default();
        assert!(q.push(entry(60), &l));
        assert!(!q.push(entry(41), &l), "bytes bound");
        assert!(q.push(entry(40), &l));
        assert_eq!(q.bytes(), 100);
    }

    #[test]
    fn in_flight_calls_count_against_the_bounds() {
        let mut q = Queue::default();
        let l = limits(1, 100);
        assert!(q.push(entry(10), &l));
        let e = q.take_due(0).unwrap();
        q.sent(7, e);
        assert_eq!(q.len(), 1);
        assert_eq!(q.bytes(), 10);
        assert!(!q.push(entry(1), &l));
        assert_eq!(q.answered(7, Some(200), 5), Some(Settled::Done(Op::Record)));
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
        assert_eq!(q.answered(7, Some(200), 5), None, "unknown token");
    }

    #[test]
    fn retries_with_backoff_then_fails() {
        let mut q = Queue::default();
        let l = limits(10, 1000);
        q.push(entry(1), &l);
        let e = q.take_due(0).unwrap();
        q.sent(1, e);
        assert_eq!(
            q.answered(1, Some(503), 1000),
            Some(Settled::Retrying(Op::Record))
        );
        assert!(q.take_due(1000).is_none(), "not due before the backoff");
        let e = q.take_due(1000 + backoff_ms(1)).unwrap();
        assert_eq!(e.attempts, 1);
        q.sent(2, e);
        assert_eq!(
            q.answered(2, None, 2000),
            Some(Settled::Retrying(Op::Record))
        );
        let e = q.take_due(10_000).unwrap();
        assert_eq!(
            q.send_failed(e, 10_000),
            Settled::Failed(Op::Record),
            "third attempt was the last"
        );
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn refusals_fail_at_once_and_403_may_mean_done() {
        let mut q = Queue::default();
        let l = limits(10, 1000);
        q.push(entry(1), &l);
        let e = q.take_due(0).unwrap();
        q.sent(1, e);
        assert_eq!(
            q.answered(1, Some(403), 0),
            Some(Settled::Failed(Op::Record))
        );
        let mut e = entry(1);
        e.tolerate_403 = true;
        q.push(e, &l);
        let e = q.take_due(0).unwrap();
        q.sent(2, e);
        assert_eq!(q.answered(2, Some(403), 0), Some(Settled::Done(Op::Record)));
        assert_eq!(classify(Some(400), false), Class::Fail);
        assert_eq!(classify(Some(429), false), Class::Retry);
        assert_eq!(classify(Some(204), false), Class::Done);
    }

    #[test]
    fn send_slots_are_bounded() {
        let mut q = Queue::default();
        let l = limits(100, 10_000);
        for _ in 0..MAX_IN_FLIGHT + 1 {
            q.push(entry(1), &l);
        }
        for t in 0..MAX_IN_FLIGHT {
            let e = q.take_due(0).unwrap();
            q.sent(t as u32, e);
        }
        assert!(q.take_due(0).is_none());
        q.answered(0, Some(200), 0);
        assert!(q.take_due(0).is_some());
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
