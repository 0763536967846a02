//! Scope under load: two tenants (two `authorization` values) send the same keys, one first
//! then the other, the other way round, and both at once. A key under one scope never
//! replays another scope's response: each tenant's answers are its own execution, executed
//! once per tenant.

use std::collections::HashMap;
use std::sync::Arc;

use idempotency_tests::{ClientResponse, Mode};
use serde_json::json;

use crate::both_modes;
use crate::common::TestServer;
use crate::harness::Gateway;

const TENANTS: [&str; 2] = ["Bearer tenant-alpha-7f3a", "Bearer tenant-bravo-91c2"];
const KEYS: usize = 300;
/// Keys in flight at once: at most 4 requests each, 400 in all. On ngx each holds a slot of
/// the worker's 1024 (`worker_connections`) for its client connection and one for its call or
/// its upstream exchange; all 300 keys at once (600 requests) could take them all when the
/// answers are slow, and the upstream exchanges that find none get 500, as nginx gives.
const AT_ONCE: usize = 100;

/// One request of `tenant` for shared key `i`.
async fn send(gw: &Gateway, tenant: usize, i: usize) -> (usize, usize, ClientResponse) {
    let r = gw
        .request(&format!("shared-{i}"))
        .header("authorization", TENANTS[tenant])
        .send()
        .await
        .expect("an answer");
    (tenant, i, r)
}

async fn two_tenants_with_the_same_keys_never_see_each_others_responses(mode: Mode) {
    let backend = TestServer::start().await;
    let gw = Arc::new(Gateway::start(mode, backend.addr, json!({})).await);
    let answers = gw
        .with_ticks(async {
            let permits = Arc::new(tokio::sync::Semaphore::new(AT_ONCE));
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..KEYS {
                let gw = gw.clone();
                let permit = permits.clone().acquire_owned().await.unwrap();
                tasks.spawn(async move {
                    let _permit = permit;
                    match i % 3 {
                        // Alpha first, then bravo; bravo first, then alpha.
                        0 | 1 => {
                            let first = i % 3;
                            let a = send(&gw, first, i).await;
                            let b = send(&gw, 1 - first, i).await;
                            vec![a, b]
                        }
                        // Both at once, twice each.
                        _ => {
                            let (a, b, c, d) = tokio::join!(
                                send(&gw, 0, i),
                                send(&gw, 1, i),
                                send(&gw, 1, i),
                                send(&gw, 0, i)
                            );
                            vec![a, b, c, d]
                        }
                    }
                });
            }
            let mut all = Vec::new();
            while let Some(done) = tasks.join_next().await {
                all.extend(done.unwrap());
            }
            all
        })
        .await;
    // What the upstream executed, per (tenant, key): the body it answered.
    let mut executed: HashMap<(usize, usize), Vec<Vec<u8>>> = HashMap::new();
    for (n, seen) in gw.api.requests().iter().enumerate() {
        let auth = seen
            .header("authorization")
            .expect("the upstream gets the credentials");
        let tenant = TENANTS.iter().position(|t| *t == auth).unwrap();
        let i: usize = seen.path.rsplit('-').next().unwrap().parse().unwrap();
        let body = format!("upstream POST {} #{}", seen.path, n + 1).into_bytes();
        executed.entry((tenant, i)).or_default().push(body);
    }
    for tenant in 0..2 {
        for i in 0..KEYS {
            let count = executed.get(&(tenant, i)).map_or(0, Vec::len);
            if count != 1 {
                // What this tenant was answered for the key.
                let got: Vec<String> = answers
                    .iter()
                    .filter(|(t, k, _)| (*t, *k) == (tenant, i))
                    .map(|(_, _, r)| format!("{} {}", r.status, r.text()))
                    .collect();
                assert_eq!(
                    count, 1,
                    "tenant {tenant}, key {i}: executed once; its answers: {got:?}"
                );
            }
        }
    }
    // Then each tenant retries every key: its own response, replayed.
    let mut all = answers;
    for i in 0..KEYS {
        all.push(send(&gw, 0, i).await);
        all.push(send(&gw, 1, i).await);
    }
    for (tenant, i, r) in &all {
        match r.status {
            200 => assert_eq!(
                Some(&r.body),
                executed[&(*tenant, *i)].first(),
                "tenant {tenant}, key {i}: its own response, never the other's"
            ),
            409 => {}
            s => panic!("tenant {tenant}, key {i}: status {s}: {}", r.text()),
        }
    }
    let gw = Arc::into_inner(gw).expect("no request left");
    gw.finish().await;
    backend.stop().await;
}

both_modes!(two_tenants_with_the_same_keys_never_see_each_others_responses);
