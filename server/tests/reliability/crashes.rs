//! Crashes: the backend SIGKILLed under load and restarted on its data, and the gateway's
//! instance reset with records still queued. What may happen is bounded by the promise: a
//! record the backend acknowledged is never lost (its key replays that response for ever);
//! a key whose record was lost is executed at most once more, and only after its lease
//! expired; nothing is ever replayed that its key did not execute.

use std::collections::HashMap;
use std::time::Duration;

use idempotency_tests::Mode;
use serde_json::json;

use crate::both_modes;
use crate::common::{ServerProcess, TestServer};
use crate::harness::{Gateway, Ledger, Load, Seen, Sent, Tap};

/// What the keys of a crash run went through, for the report.
#[derive(Debug, Default)]
pub struct Cases {
    /// Executed once; the retry replays that execution.
    pub once_and_replayed: usize,
    /// Its record was lost: executed a second time once the lease expired, and that
    /// execution replays now.
    pub twice_record_lost: usize,
    /// Of those replayed, recorded although the backend never said so (it stored the
    /// record, then failed before its answer reached the filter).
    pub recorded_unacknowledged: usize,
}

/// The promise after a crash, key by key; returns how many keys went which way.
///
/// - Every answer ever seen is sound: an execution of its key, a replay byte-identical to
///   one, a 409 with `Retry-After`, or a 503 while the backend was away.
/// - Every key was executed at most twice, and its last answer replays its last
///   execution.
/// - A record the backend acknowledged is never lost: it is the last execution of its key
///   (nothing executed after it), and what its key replays.
pub fn check_after_crash(
    load: &Load,
    ledger: &Ledger,
    answers: &[&[Sent]],
    last: &[Sent],
    acked: &HashMap<String, Vec<Vec<u8>>>,
) -> Cases {
    for (n, sent) in answers.iter().enumerate() {
        ledger
            .tally(sent)
            .assert_sound(&format!("answers of phase {n}"));
    }
    let last: HashMap<&str, &Sent> = last.iter().map(|s| (s.key.as_str(), s)).collect();
    let mut cases = Cases::default();
    for i in 0..load.keys {
        let key = load.key(i);
        let executions = ledger.executions.get(&key).cloned().unwrap_or_default();
        let records = acked.get(&key).map_or(&[][..], Vec::as_slice);
        assert!(
            records.len() <= 1,
            "{key}: {} records acknowledged (a completed key takes no second record)",
            records.len()
        );
        let final_answer = last[key.as_str()].answer.as_ref().expect("an answer");
        assert_eq!(
            final_answer.header("idempotent-replayed"),
            Some("true"),
            "{key}: once settled, every key replays"
        );
        assert_eq!(
            executions.last().map(Vec::as_slice),
            Some(final_answer.body.as_slice()),
            "{key}: the replay is its last execution"
        );
        match records.first() {
            Some(record) => assert_eq!(
                record, &final_answer.body,
                "{key}: the acknowledged record is what it replays"
            ),
            None => cases.recorded_unacknowledged += 1,
        }
        match executions.len() {
            1 => cases.once_and_replayed += 1,
            2 => cases.twice_record_lost += 1,
            n => panic!("{key}: executed {n} times"),
        }
    }
    cases
}

/// After a fault injected during `load` (whose answers are `sent`): each key sent until its
/// answer is final, then once more; the promise checked ([`check_after_crash`]). Returns the
/// cases and how many answers were 503 during the fault.
pub async fn settle_and_check(
    load: &Load,
    gw: &Gateway,
    tap: &Tap,
    sent: &[Sent],
) -> (Cases, usize) {
    let outage = Ledger::of(gw).tally(sent).get(Seen::Unavailable);
    let settling = load.until_settled(gw, Duration::from_secs(120)).await;
    let last = load.retry(gw).await;
    let cases = check_after_crash(
        load,
        &Ledger::of(gw),
        &[sent, &settling, &last],
        &last,
        &tap.acknowledged_records(),
    );
    (cases, outage)
}

async fn a_backend_killed_under_load_loses_no_acknowledged_record(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let backend = ServerProcess::start(dir.path(), &[]).await;
    let tap = Tap::start(vec![backend.addr]).await;
    // Short leases: a key whose record died with the backend is free again soon after.
    let gw = Gateway::start(mode, tap.addr, json!({"lease_ms": 3000})).await;
    let load = Load::new(&format!("sigkill-{mode}"), crate::harness::keys(), 16);
    let (sent, restarted) = load
        .run_with_fault(&gw, load.keys / 3, async {
            backend.kill().await;
            let restarted = ServerProcess::start(dir.path(), &[]).await;
            tap.set_backends(vec![restarted.addr]);
            restarted
        })
        .await;
    let unanswered = tap.unanswered();
    let (cases, outage) = settle_and_check(&load, &gw, &tap, &sent).await;
    assert!(
        unanswered > 0 || outage > 0,
        "the kill hit calls in flight or later ones"
    );
    eprintln!(
        "{}: {} keys; SIGKILL after {} executions: {} calls broken, {} answers 503 during \
         the outage; {cases:?}",
        load.tag,
        load.keys,
        load.keys / 3,
        unanswered,
        outage
    );
    assert_eq!(cases.once_and_replayed + cases.twice_record_lost, load.keys);
    gw.finish().await;
    drop(restarted);
}

async fn a_gateway_instance_reset_loses_its_queue_and_the_lease_frees_the_keys(_: Mode) {
    // ngx only: a trap recycles the instance and its memory, queue included. (Envoy records
    // inline: nothing waits in memory for a tick.)
    let mode = Mode::Ngx;
    let backend = TestServer::start().await;
    let tap = Tap::start(vec![backend.addr]).await;
    let gw = Gateway::start(mode, tap.addr, json!({"lease_ms": 3000})).await;
    let load = Load::new("reset", 80, 1);
    // The first 30 keys are recorded (a tick sends the queue); the last 50 are executed and
    // wait in the queue for the next tick when the instance traps: those 50 records are lost.
    let first: Vec<usize> = (0..30).collect();
    let queued: Vec<usize> = (30..80).collect();
    for i in &first {
        let r = gw.request(&load.key(*i)).send().await.unwrap();
        assert_eq!(r.status, 200);
    }
    gw.host.settle().await;
    gw.host.advance(gw.tick).await;
    gw.host.settle().await;
    for i in &queued {
        let r = gw.request(&load.key(*i)).send().await.unwrap();
        assert_eq!(r.status, 200);
    }
    gw.host.settle().await;
    gw.host.trap_instance().await;
    let predicted_lost = queued.len();
    let acked = tap.acknowledged_records();
    assert_eq!(
        acked.len(),
        first.len(),
        "only the first keys were recorded"
    );

    // Until the leases expire, the lost keys are held: 409, never executed again, never
    // replayed. Then each executes once more, is recorded, and replays that execution.
    let settling = load.until_settled(&gw, Duration::from_secs(60)).await;
    for i in &queued {
        let key = load.key(*i);
        let first_answer = settling.iter().find(|s| s.key == key).unwrap();
        assert_eq!(
            first_answer.answer.as_ref().unwrap().status,
            409,
            "{key}: held by its lease right after the reset"
        );
    }
    let last = load.retry(&gw).await;
    let ledger = Ledger::of(&gw);
    let acked = tap.acknowledged_records();
    let cases = check_after_crash(&load, &ledger, &[&settling, &last], &last, &acked);
    eprintln!("reset: {predicted_lost} records predicted lost; {cases:?}");
    assert_eq!(cases.twice_record_lost, predicted_lost, "as predicted");
    assert_eq!(cases.once_and_replayed, first.len());
    for i in &first {
        assert_eq!(
            ledger.count(&load.key(*i)),
            1,
            "a recorded key never executes again"
        );
    }
    assert_eq!(
        gw.host
            .logs_containing("instance trapped, it will be recycled")
            .len(),
        1
    );
    gw.finish().await;
    backend.stop().await;
}

both_modes!(a_backend_killed_under_load_loses_no_acknowledged_record);

mod a_gateway_instance_reset_loses_its_queue_and_the_lease_frees_the_keys {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ngx() {
        crate::bounded(
            super::a_gateway_instance_reset_loses_its_queue_and_the_lease_frees_the_keys(
                idempotency_tests::Mode::Ngx,
            ),
        )
        .await
    }
}
