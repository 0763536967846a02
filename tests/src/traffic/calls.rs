//! Dispatch: the calls a callback made, sent once it returns, and their answers; and what
//! ngx_wasm_module's connection bookkeeping does with a root context's calls (HOSTS.md bug 3,
//! [`crate::connections`]). The bugs a call made in `on_http_call_response` triggers (1: a
//! crash, 2: a hang) are recognised where the call is made (`hostcalls::plan_call`) and take
//! effect in the event loop once the event is handled.

use crate::connections::Slot;
use crate::contexts::{Action, CallResponse};
use crate::dispatch::Outcome;
use crate::host::Event;
use crate::observed::{Level, ViolationKind};

use super::Worker;

/// What the worker keeps of a call in flight.
pub(super) struct InFlight {
    /// The request that dispatched it (none for the root context).
    request: Option<u64>,
    /// It was sent with a body (ngx bug 2 needs one).
    had_body: bool,
    /// ngx: a root call's fake connection.
    fake_connection: Option<Slot>,
}

impl Worker {
    /// Everything a callback may leave for the worker besides the stream's own state:
    /// dispatched calls (each on a connection slot of its own), root dispatches that failed
    /// synchronously, and the tick period.
    pub(super) fn after_call(&mut self) {
        let Some(vm) = self.vm.as_mut() else { return };
        let generation = vm.generation;
        let world = vm.world();
        let calls = std::mem::take(&mut world.dispatches);
        let failed = std::mem::take(&mut world.sync_failures);
        let tick = world.tick_changed.then_some(world.tick_period_ms);
        world.tick_changed = false;
        for _ in 0..failed {
            // ngx bug 3: the fake connection of a root dispatch that failed is never freed.
            self.slots.leak_one();
            self.observed.lock().unwrap().violation(
                ViolationKind::ConnectionLeaked,
                format!(
                    "a root dispatch failed synchronously: its connection slot is lost for good ({} of {} leaked)",
                    self.slots.leaked(),
                    self.slots.limit()
                ),
            );
        }
        // Each call's socket takes its slot now, all before any is sent (nginx connects them
        // in one turn of its loop): whether one gets a slot never depends on another's answer.
        let calls: Vec<_> = calls
            .into_iter()
            .map(|call| {
                let slot = self.slots.take();
                (call, slot)
            })
            .collect();
        for (mut call, slot) in calls {
            let token = call.token;
            self.calls.insert(
                (generation, token),
                InFlight {
                    request: self.by_ctx.get(&call.owner).copied(),
                    had_body: !call.body.is_empty(),
                    fake_connection: call.fake_connection.take(),
                },
            );
            let poster = self.poster.clone();
            let Some(slot) = slot else {
                // No connection for the socket: the call fails (ngx: a broken connection).
                let limit = self.slots.limit();
                self.host_log(
                    Level::Error,
                    call.owner,
                    format!("{limit} worker_connections are not enough"),
                );
                poster.post(Event::CallDone {
                    generation,
                    token,
                    outcome: Outcome::Refused,
                });
                continue;
            };
            let mode = self.mode;
            let guard = crate::host::PendingGuard::new(&poster.pending);
            self.runtime.spawn(async move {
                let _guard = guard;
                let outcome = crate::dispatch::perform(mode, call).await;
                // The socket is closed before the answer reaches the filter.
                drop(slot);
                poster.post(Event::CallDone {
                    generation,
                    token,
                    outcome,
                });
            });
        }
        if let Some(period) = tick {
            let period = period.filter(|p| *p > 0).map(|p| p as u64 * 1_000_000);
            self.tick_period = period;
            self.next_tick = period.map(|p| self.now_ns + p);
        }
    }

    pub(super) fn call_done(&mut self, generation: u64, token: u32, outcome: Outcome) {
        let call = self.calls.remove(&(generation, token));
        let Some(vm) = self.vm.as_mut() else { return };
        if vm.generation != generation || vm.trapped {
            // The instance that dispatched it is gone: its request fails now.
            if let Some(id) = call.and_then(|c| c.request)
                && self.reqs.contains_key(&id)
            {
                self.fail_dead(id);
            }
            return;
        }
        let Some(owner) = vm.world().calls.remove(&token) else {
            // Cancelled (its request ended).
            return;
        };
        let (had_body, fake_connection) =
            call.map_or((false, None), |c| (c.had_body, c.fake_connection));
        if let Some(fake) = fake_connection {
            // ngx bug 3: the host finalizes a root call's fake request only when no other
            // call of that root context is pending.
            let root = vm.world().root_id;
            let others = vm.world().calls.values().filter(|o| **o == root).count();
            if others > 0 && self.mode.worker_connections_leak() {
                fake.leak();
                self.observed.lock().unwrap().violation(
                    ViolationKind::ConnectionLeaked,
                    format!(
                        "root call {token} completed while {others} other root call(s) were pending: its connection slot is lost for good ({} of {} leaked)",
                        self.slots.leaked(),
                        self.slots.limit()
                    ),
                );
            }
        }
        let vm = self.vm.as_mut().unwrap();
        let delivered = crate::dispatch::deliver(self.mode, outcome);
        let n_headers = if delivered.dispatch_status.is_some() {
            0
        } else {
            delivered.headers.len() as u32
        };
        let body_len = delivered.body.len() as u32;
        let world = vm.world();
        world.call = Some(CallResponse {
            headers: delivered.headers,
            body: delivered.body,
            trailers: Vec::new(),
            dispatch_status: delivered.dispatch_status,
            request_had_body: had_body,
        });
        world.status = delivered.status;
        let request = self.by_ctx.get(&owner).copied();
        if let Some(id) = request
            && !self.alive(id)
        {
            self.fail_dead(id);
            return;
        }
        let vm = self.vm.as_mut().unwrap();
        let result = vm.call_response(owner, token, n_headers, body_len, 0);
        let world = vm.world();
        world.call = None;
        world.status = (0, String::new());
        match request {
            Some(id) => {
                if self
                    .after_callback(
                        id,
                        "on_http_call_response",
                        result.map(|_| Action::Continue),
                    )
                    .is_some()
                {
                    self.drive(id);
                }
            }
            None => {
                self.after_call();
                if let Err(trap) = result {
                    self.trap(None, "on_http_call_response", trap);
                }
            }
        }
    }
}
