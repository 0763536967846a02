//! The captures backend of the idempotency gateway filter.
//!
//! The filter *allocates* an `Idempotency-Key` before a request reaches the upstream and
//! *records* the upstream's response after it; a retry gets that response replayed, a
//! concurrent duplicate 409, the same key with another payload 422. This crate serves that API
//! (`spec/openapi.yaml`) over one [`Store`] trait, with an embedded, durable store by default,
//! and Redis and MongoDB for several server processes sharing their keys ([`open_store`]).
//!
//! # Modules, one concept each
//!
//! | module | what it is |
//! | --- | --- |
//! | [`config`] | flags with environment fallbacks (clap), validated; one line on error |
//! | [`api`] | every route, the handlers, the body extractor, the bearer-token check |
//! | [`http`] | the HTTP server under the router: hyper with the header and body read time-outs, the listener's deferred accept |
//! | [`error`] | the one error type, rendered as RFC 9457 problem+json with the old `error` member |
//! | [`store`] | the [`Store`] trait, the outcomes, and the pure per-key state machine |
//! | [`store::embedded`] | redb in the data dir, one writer thread with group commit through a journal, the dir lock; opened again in place after a failed write |
//! | [`store::redis`] | Redis or Redis Cluster: one hash per key, one Lua script per operation |
//! | [`store::mongodb`] | MongoDB: one document per key, one atomic command per operation |
//! | [`wait`] | `wait_ms`: per-key notifications in this process plus polling with backoff |
//! | [`purge`] | the background task deleting expired entries |
//! | [`shutdown`] | the signals, and the order of a graceful shutdown |
//! | [`logging`] | tracing to stderr, `RUST_LOG`, `LOG_FORMAT`; OpenTelemetry traces over OTLP |
//! | [`metrics`] | the Prometheus metrics of `GET /metrics` |
//!
//! The binary (`src/main.rs`) only parses the configuration, installs logging, and calls
//! [`run`].
//!
//! # Running the server in-process (tests, benchmarks)
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! let dir = std::env::temp_dir().join("captures-test");
//! let mut config = idempotency_server::Config::new(&dir); // the binary's defaults
//! config.retention = std::time::Duration::from_secs(1);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let addr = listener.local_addr()?;
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let server = tokio::spawn(idempotency_server::serve(config, listener, async {
//!     let _ = stopped.await;
//! }));
//! // ... talk to http://{addr}/api/v2/captures ...
//! let _ = stop.send(());
//! server.await??; // graceful: requests finished, store flushed and closed, dir unlocked
//! # let _ = addr; Ok(()) }
//! ```
//!
//! [`serve_with_store`] takes any `Arc<dyn Store>` instead (a store opened by the caller, for
//! its statistics, or another implementation).

// The docs are a map for contributors (`cargo doc --document-private-items`): a module's
// overview names the private pieces it is made of.
#![allow(rustdoc::private_intra_doc_links)]

pub mod api;
pub mod config;
pub mod error;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod purge;
pub mod shutdown;
pub mod store;
pub mod wait;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;

use config::non_empty;
pub use config::{Config, StoreKind};
pub use store::Store;
pub use store::embedded::{EmbeddedOptions, EmbeddedStore, Reopening};
pub use store::mongodb::{MongoOptions, MongoStore};
pub use store::redis::{RedisOptions, RedisStore, RedisTarget};

/// The binary's whole life: open the store (taking the data dir's lock), listen on
/// `config.listen`, serve until SIGINT or SIGTERM, shut down gracefully.
pub async fn run(config: Config) -> anyhow::Result<()> {
    // The store first: a second process on the same data dir fails on the lock, with its own
    // message, before it would fail on the port.
    let store = open_store(&config).await?;
    let listener = match TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            let _ = store.shutdown().await;
            return Err(e).with_context(|| format!("cannot listen on {}", config.listen));
        }
    };
    serve_with_store(config, store, listener, shutdown::signal()).await
}

/// Open the store the configuration names ([`Config::store_kind`]).
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    match config.store_kind() {
        StoreKind::Embedded => {
            let options = EmbeddedOptions::new(&config.data_dir);
            let opening = options.clone();
            let store = tokio::task::spawn_blocking(move || EmbeddedStore::open(opening))
                .await
                .context("opening the embedded store")??;
            // Opened again in place after a failed write (a full or read-only disk).
            Ok(Arc::new(Reopening::new(store, options)))
        }
        StoreKind::Redis => Ok(Arc::new(RedisStore::open(redis_options(config)).await?)),
        StoreKind::Mongodb => Ok(Arc::new(MongoStore::open(mongo_options(config)).await?)),
    }
}

/// The Redis store's options from the configuration.
pub fn redis_options(config: &Config) -> RedisOptions {
    let cluster = config.redis_cluster();
    let target = if cluster.is_empty() {
        RedisTarget::Single(non_empty(&config.redis_url).unwrap_or_default().to_owned())
    } else {
        RedisTarget::Cluster(cluster.into_iter().map(str::to_owned).collect())
    };
    RedisOptions {
        target,
        key_prefix: config.redis_key_prefix.clone(),
        timeout: config.store_timeout,
        start_timeout: config.store_start_timeout,
        wait_replicas: config.redis_wait_replicas,
        wait_timeout: config.redis_wait_timeout,
    }
}

/// The MongoDB store's options from the configuration.
pub fn mongo_options(config: &Config) -> MongoOptions {
    MongoOptions {
        uri: non_empty(&config.mongodb_uri)
            .unwrap_or_default()
            .to_owned(),
        database: config.mongodb_database.clone(),
        collection: config.mongodb_collection.clone(),
        write_timeout: config.mongodb_write_timeout,
        timeout: config.store_timeout,
        start_timeout: config.store_start_timeout,
        default_lease: config.default_lease,
        retention: config.retention,
    }
}

/// Open the configured store and serve on `listener` until `shutdown` resolves; then shut
/// down gracefully (see [`shutdown`]). Returns once the store is closed.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let store = open_store(&config).await?;
    serve_with_store(config, store, listener, shutdown).await
}

/// Serve `store` on `listener` until `shutdown` resolves, then stop accepting, let requests in
/// flight finish, stop the purge, and shut the store down.
pub async fn serve_with_store(
    config: Config,
    store: Arc<dyn Store>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if let Err(line) = config.validate() {
        let _ = store.shutdown().await;
        anyhow::bail!("invalid configuration: {line}");
    }
    // Every call to the store is measured (and traced), whatever the store.
    let metrics = Arc::new(metrics::Metrics::new(&*store));
    let store: Arc<dyn Store> = Arc::new(store::metered::Metered::new(store, metrics.clone()));
    // One flag for everything that must stop: the listener, waits, the purge.
    let (stopping, stop) = watch::channel(false);
    let waiters = Arc::new(wait::Waiters::new(stop.clone()));
    let state = api::AppState::new(api::Shared {
        store: store.clone(),
        waiters,
        policy: Arc::new(api::Policy {
            default_lease: config.default_lease,
            max_lease: config.max_lease,
            retention: config.retention,
            body_limit: config.body_limit,
            api_token: config.api_token.clone(),
        }),
        metrics,
    });
    let purge = tokio::spawn(purge::run(store.clone(), purge::INTERVAL, stop.clone()));

    let addr = listener
        .local_addr()
        .context("reading the listener's address")?;
    tracing::info!(%addr, store = store.name(), "listening");
    if let Some(warning) = config.exposure_warning(addr) {
        tracing::warn!("{warning}");
    }
    let timeouts = http::Timeouts {
        header_read: config.header_read_timeout,
        body_read: config.body_read_timeout,
    };
    let served = http::serve(listener, api::router(state), timeouts, async move {
        shutdown.await;
        tracing::info!("shutting down: finishing requests in flight");
        let _ = stopping.send(true);
    })
    .await
    .context("serving HTTP");

    // Every connection is closed now: nothing uses the store but the purge.
    let _ = purge.await;
    let closed = store.shutdown().await.context("flushing the store");
    tracing::info!("stopped");
    served.and(closed)
}
