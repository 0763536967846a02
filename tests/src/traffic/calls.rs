//! Dispatch: the calls a callback made, sent once it returns, and their answers.

use crate::contexts::{Action, CallResponse};
use crate::host::Event;

use super::Worker;

impl Worker {
    /// Everything a callback may leave for the worker besides the stream's own state:
    /// dispatched calls and the tick period.
    pub(super) fn after_call(&mut self) {
        let Some(vm) = self.vm.as_mut() else { return };
        let generation = vm.generation;
        let world = vm.world();
        let calls = std::mem::take(&mut world.dispatches);
        let tick = world.tick_changed.then_some(world.tick_period_ms);
        world.tick_changed = false;
        for call in calls {
            if let Some(id) = self.by_ctx.get(&call.owner) {
                self.call_owners.insert((generation, call.token), *id);
            }
            let poster = self.poster.clone();
            let mode = self.mode;
            let guard = crate::host::PendingGuard::new(&poster.pending);
            self.runtime.spawn(async move {
                let _guard = guard;
                let token = call.token;
                let outcome = crate::dispatch::perform(mode, call).await;
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

    pub(super) fn call_done(
        &mut self,
        generation: u64,
        token: u32,
        outcome: crate::dispatch::Outcome,
    ) {
        let owner_request = self.call_owners.remove(&(generation, token));
        let Some(vm) = self.vm.as_mut() else { return };
        if vm.generation != generation || vm.trapped {
            // The instance that dispatched it is gone: its request fails now.
            if let Some(id) = owner_request
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
