//! Metric names. Counters, defined through proxy-wasm `define_metric`.
//!
//! Every name starts with the filter's name, `idempotency_`:
//! - Envoy and Istio keep a Wasm metric as `wasmcustom.<name>` and strip that namespace in
//!   `/stats/prometheus` (envoyproxy/envoy#17357), so Prometheus sees `idempotency_…`.
//! - ngx_wasm_module stores a metric as `pw.<filter>.<name>` and Kong's Prometheus plugin
//!   (`kong/plugins/prometheus/wasmx.lua`) exports it with dots turned into underscores:
//!   `pw_idempotency_idempotency_…`.

/// One counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// A request of a configured method without the key header (`require_key: false`).
    NoKey,
    /// The key was allocated: the request went to the upstream.
    Allocated,
    /// A stored response was replayed.
    Replayed,
    /// A concurrent duplicate got 409.
    Conflict,
    /// A concurrent duplicate waited (`conflict: wait`) and got the first response.
    Waited,
    /// The key was reused with another request: 422.
    Mismatch,
    /// `require_key: true` and no key: 400.
    MissingKey,
    /// A malformed key: 400.
    InvalidKey,
    /// A body over `max_request_body_bytes`, or spooled to disk: 413.
    TooLarge,
    /// Kong: a body of unknown length (`Transfer-Encoding`) under `fingerprint`: 411.
    LengthRequired,
    /// The backend failed and the request got 503 (`on_server_error: reject`).
    ServerError,
    /// The backend failed and the request went on without idempotency (`pass`).
    PassedOnError,
    /// A response was recorded.
    Recorded,
    /// A key was released.
    Released,
    /// A record or release call finally failed (refused, or out of attempts).
    RecordFailed,
    /// A record or release was dropped because the queue was full.
    QueueDropped,
    /// A gRPC request with a key (or any, under `require_key`) passed untouched: its response
    /// cannot be replayed exactly. One without a key counts as [`Metric::NoKey`].
    Grpc,
}

impl Metric {
    pub const ALL: [Metric; 17] = [
        Metric::NoKey,
        Metric::Allocated,
        Metric::Replayed,
        Metric::Conflict,
        Metric::Waited,
        Metric::Mismatch,
        Metric::MissingKey,
        Metric::InvalidKey,
        Metric::TooLarge,
        Metric::LengthRequired,
        Metric::ServerError,
        Metric::PassedOnError,
        Metric::Recorded,
        Metric::Released,
        Metric::RecordFailed,
        Metric::QueueDropped,
        Metric::Grpc,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Metric::NoKey => "idempotency_requests_no_key_total",
            Metric::Allocated => "idempotency_requests_allocated_total",
            Metric::Replayed => "idempotency_requests_replayed_total",
            Metric::Conflict => "idempotency_requests_conflict_total",
            Metric::Waited => "idempotency_requests_waited_total",
            Metric::Mismatch => "idempotency_requests_mismatch_total",
            Metric::MissingKey => "idempotency_requests_missing_key_total",
            Metric::InvalidKey => "idempotency_requests_invalid_key_total",
            Metric::TooLarge => "idempotency_requests_too_large_total",
            Metric::LengthRequired => "idempotency_requests_length_required_total",
            Metric::ServerError => "idempotency_requests_server_error_total",
            Metric::PassedOnError => "idempotency_requests_passed_on_error_total",
            Metric::Recorded => "idempotency_recorded_total",
            Metric::Released => "idempotency_released_total",
            Metric::RecordFailed => "idempotency_record_failed_total",
            Metric::QueueDropped => "idempotency_queue_dropped_total",
            Metric::Grpc => "idempotency_requests_grpc_passed_total",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    // On wasm32-unknown-unknown the tests run under wasm-bindgen-test (Cargo.toml).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn names_are_distinct_prefixed_and_prometheus_safe() {
        let mut names: Vec<&str> = Metric::ALL.iter().map(|m| m.name()).collect();
        for (i, m) in Metric::ALL.iter().enumerate() {
            assert_eq!(m.index(), i);
        }
        for n in &names {
            assert!(n.starts_with("idempotency_"), "{n}");
            assert!(
                n.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{n}"
            );
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Metric::ALL.len());
    }
}
