//! End-to-end tests of the product filter (issue 4): `idempotency.wasm` in the test host, in
//! both modes (each test runs as `<name>::ngx` and `<name>::envoy`), against the real backend
//! in-process (embedded store) and the counting upstream. Each test asserts what a client
//! sees, and ends with `finish()`: no host rule was broken.

mod support;

mod backend;
mod bodies;
mod concurrency;
mod config;
mod deploy;
mod disconnect;
mod envoy;
mod hostile;
mod load;
mod observability;
mod problems;
/// The strict reader of Prometheus text the backend's tests use.
#[path = "../../../server/tests/common/prometheus.rs"]
mod prometheus;
mod queue;
mod recording;
mod release;
mod replay;
mod scope;
mod size;
