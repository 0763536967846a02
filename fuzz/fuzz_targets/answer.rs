//! The backend's answers, as the filter reads them: any status and any body (a broken or
//! hostile backend, a proxy in between). Nothing panics; a replay is only ever built from a
//! capture that reads whole; a batch answer gives exactly one status per entry.
#![no_main]

use arbitrary::Arbitrary;
use idempotency::decision::{Allocation, CallAnswer, allocation, batch_statuses, capture_of};
use idempotency::replay;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    status: Option<u16>,
    retry_after: Option<String>,
    entries: u8,
    body: &'a [u8],
}

fuzz_target!(|input: Input<'_>| {
    let answer = CallAnswer {
        status: input.status,
        retry_after: input.retry_after,
        failure: None,
        waited: false,
        body: input.body.to_vec(),
    };
    match allocation(&answer) {
        Allocation::Proceed { lease_token } => {
            assert_eq!(input.status, Some(202));
            assert!(!lease_token.is_empty());
        }
        Allocation::Replay(capture) => {
            assert_eq!(input.status, Some(200));
            // Whatever was stored, the replay is built or refused, never a panic.
            let _ = replay::from_capture(&capture, &["x-secret".into()], "Idempotent-Replayed");
        }
        Allocation::Conflict { .. } => assert_eq!(input.status, Some(409)),
        Allocation::Mismatch => assert_eq!(input.status, Some(422)),
        Allocation::ServerError(why) => assert!(!why.is_empty()),
    }
    if let Ok(value) = serde_json::from_slice(input.body) {
        let _ = capture_of(value);
    }
    let n = usize::from(input.entries);
    assert_eq!(batch_statuses(&answer, n).len(), n);
});
