//! The bare baseline: the backend's HTTP stack (axum on tokio's multi-threaded runtime, the
//! same versions and settings, the listener's `TCP_DEFER_ACCEPT` included) with a handler
//! that reads the body and answers the bytes the backend would answer, without looking at
//! them. What the backend costs above it is the product's own work: parsing, the store, the
//! sync.
//!
//! It runs as a process of its own (`idempotency-bench baseline`), like the backend, so that
//! neither shares a runtime with the load generator or the other.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The answers, byte for byte as the backend sends them (taken from it by the suite).
pub struct Answers {
    /// 202 to an allocation.
    pub allocated: Bytes,
    /// 200 to a record.
    pub recorded: Bytes,
    /// 200 to an allocation of a completed key.
    pub replay: Bytes,
}

/// `X-Bench: record` / `X-Bench: replay` tells the baseline which answer a request would get
/// from the backend (the backend ignores the header).
pub const STEP_HEADER: &str = "x-bench";

async fn answer(State(answers): State<Arc<Answers>>, headers: HeaderMap, body: Bytes) -> Response {
    drop(body);
    let (status, bytes) = match headers.get(STEP_HEADER).map(|v| v.as_bytes()) {
        Some(b"record") => (StatusCode::OK, answers.recorded.clone()),
        Some(b"replay") => (StatusCode::OK, answers.replay.clone()),
        _ => (StatusCode::ACCEPTED, answers.allocated.clone()),
    };
    (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
}

pub fn run(listen: SocketAddr, answers: [PathBuf; 3]) -> anyhow::Result<()> {
    let [allocated, recorded, replay] = answers.map(|p| std::fs::read(p).map(Bytes::from));
    let answers = Arc::new(Answers {
        allocated: allocated?,
        recorded: recorded?,
        replay: replay?,
    });
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let route = axum::routing::put(answer).post(answer);
            let app = Router::new()
                .route("/api/v2/captures", route)
                .with_state(answers);
            let listener = tokio::net::TcpListener::bind(listen).await?;
            // The backend's listener setting too: with it bare axum gains as much as the
            // backend does on new connections (bench/limits.md), and the ratio measures the
            // product's work, not a socket option one of them lacks.
            idempotency_server::http::defer_accept(&listener);
            axum::serve(listener, app).await?;
            Ok(())
        })
}
