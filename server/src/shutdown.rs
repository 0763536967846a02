//! Shutdown: the signals that start it, and the order in which the server stops.
//!
//! SIGINT or SIGTERM starts a graceful shutdown (see [`crate::serve_with_store`]):
//! 1. the listener stops accepting; idle keep-alive connections are closed;
//! 2. requests in flight finish (a `wait_ms` allocation ends its wait early and answers with the
//!    key's current state);
//! 3. the purge task stops;
//! 4. the store flushes and closes (the embedded writer commits what is queued, closes the
//!    database and unlocks the data dir);
//! 5. the process exits with status 0.

/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM.
pub async fn signal() {
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut stream) => {
                stream.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}
