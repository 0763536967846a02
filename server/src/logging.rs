//! Logging and traces: `tracing` to stderr, filtered by `RUST_LOG` (default `info`), as JSON
//! lines or human-readable ones (`LOG_FORMAT`); and, when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, the spans of the API's requests exported as
//! OpenTelemetry traces over OTLP (HTTP/protobuf), configured by OpenTelemetry's standard
//! environment variables (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`, `OTEL_EXPORTER_OTLP_HEADERS`,
//! `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_BSP_*`; `OTEL_SDK_DISABLED=true` or
//! `OTEL_TRACES_EXPORTER=none` turn it off).
//!
//! A request that carries a W3C `traceparent` continues the caller's trace ([`continue_trace`]);
//! a batch links to the trace of each item ([`link_current_span`]).
//!
//! Why OTLP over HTTP/protobuf with reqwest's blocking client: it is what every collector takes
//! (port 4318), and it needs neither tonic nor a second HTTP stack beside hyper; the SDK's batch
//! processor runs on a thread of its own, which a blocking client suits. Plain `http://` only
//! (no TLS is built in): send to a collector next to the server.
//!
//! The spans are at debug level and the OpenTelemetry layer has a filter of its own (the
//! server's spans, and its warnings and errors as span events), independent of `RUST_LOG`: with
//! no exporter and `RUST_LOG` at info a span is never created, so traces cost nothing when off.

use std::io::IsTerminal;

use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{LevelFilter, filter_fn};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::LogFormat;

/// The `service.name` of the traces unless `OTEL_SERVICE_NAME` (or `OTEL_RESOURCE_ATTRIBUTES`)
/// names one.
pub const SERVICE_NAME: &str = "idempotency-server";

/// What [`init`] installed; [`Telemetry::shutdown`] exports the spans still buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether traces are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Export what is buffered and stop the exporter (at the end of the process).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "the last traces could not be exported");
        }
    }
}

/// Install the global subscriber: the log, and the trace exporter when it is configured. An
/// invalid `RUST_LOG` or OpenTelemetry setting is a configuration error (one line).
/// Call it outside any async runtime (the exporter's HTTP client makes one of its own).
pub fn init(format: LogFormat) -> Result<Telemetry, String> {
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env()
        .map_err(|e| format!("RUST_LOG is not a valid log filter: {e}"))?;
    let log = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    let provider = exporter()?;
    let traces = provider
        .as_ref()
        .map(|p| trace_layer(p.tracer("idempotency-server")));
    tracing_subscriber::registry()
        .with(log)
        .with(traces)
        .try_init()
        .map_err(|e| format!("cannot install the logger: {e}"))?;
    Ok(Telemetry { provider })
}

/// The layer that turns the server's spans into OpenTelemetry spans of `tracer`, with its own
/// filter: the server's spans (whatever `RUST_LOG` says), and its warnings and errors as events
/// of the span they happen in.
pub fn trace_layer<S>(tracer: opentelemetry_sdk::trace::SdkTracer) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(filter_fn(|meta| {
            meta.target().starts_with("idempotency_server")
                && (meta.is_span() || *meta.level() <= tracing::Level::WARN)
        }))
}

/// Whether OpenTelemetry's variables ask for traces; an error for a setting this server
/// cannot follow.
fn exporting() -> Result<bool, String> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(false);
    }
    match var("OTEL_TRACES_EXPORTER").as_deref().map(str::trim) {
        None | Some("otlp") => {}
        Some("none") => return Ok(false),
        Some(other) => {
            return Err(format!(
                "OTEL_TRACES_EXPORTER={other} is not supported: otlp or none"
            ));
        }
    }
    let endpoints: Vec<String> = [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .into_iter()
    .filter_map(var)
    .collect();
    let Some(endpoint) = endpoints.first() else {
        return Ok(false);
    };
    if !endpoint.starts_with("http://") {
        return Err(format!(
            "the OTLP endpoint {endpoint:?} is not http://: TLS is not built in (send to a collector next to the server)"
        ));
    }
    for name in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(protocol) = var(name)
            && protocol.trim() != "http/protobuf"
        {
            return Err(format!(
                "{name}={protocol} is not supported: only http/protobuf is built in"
            ));
        }
    }
    Ok(true)
}

/// The tracer provider exporting over OTLP, when the environment asks for it.
fn exporter() -> Result<Option<SdkTracerProvider>, String> {
    if !exporting()? {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| format!("cannot set up the OTLP exporter: {e}"))?;
    let mut resource = opentelemetry_sdk::Resource::builder().with_attribute(
        opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
    );
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
    if !named {
        resource = resource.with_service_name(SERVICE_NAME);
    }
    // The sampler (OTEL_TRACES_SAMPLER, default parent-based always-on) and the batch
    // processor's limits (OTEL_BSP_*) come from the environment, as the SDK reads them.
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build(),
    ))
}

/// The headers of a request, as OpenTelemetry's propagators read them.
struct Headers<'a>(&'a axum::http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(axum::http::HeaderName::as_str).collect()
    }
}

/// One header, for [`link_current_span`].
struct Traceparent<'a>(&'a str);

impl Extractor for Traceparent<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

/// Make `span` a child of the caller's span when the request carries a valid W3C
/// `traceparent` (and its `tracestate`); otherwise it starts a trace.
pub fn continue_trace(span: &tracing::Span, headers: &axum::http::HeaderMap) {
    // From an empty context: `extract` alone falls back to the current one.
    let parent = TraceContextPropagator::new()
        .extract_with_context(&opentelemetry::Context::new(), &Headers(headers));
    if parent.span().span_context().is_valid() {
        // Only fails when no OpenTelemetry layer is installed: then there is nothing to join.
        let _ = span.set_parent(parent);
    }
}

/// Link the current span (a batch's) to the trace of `traceparent` (one of its items), when
/// it is a valid one and the span is recorded.
pub fn link_current_span(traceparent: &str) {
    let span = tracing::Span::current();
    if span.is_disabled() {
        return;
    }
    // From an empty context: `extract` alone falls back to the current one, the batch's own.
    let cx = TraceContextPropagator::new()
        .extract_with_context(&opentelemetry::Context::new(), &Traceparent(traceparent));
    let context = cx.span().span_context().clone();
    if context.is_valid() {
        span.add_link(context);
    }
}
