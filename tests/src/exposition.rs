//! The filter's metrics as each real host shows them to an operator: what a Prometheus scrape
//! of the gateway returns for them, and the host's own names. The filter defines a metric by
//! a bare name (`proxy_define_metric`); each host stores it under a prefix and exports it in
//! its own way:
//!
//! * ngx: ngx_wasm_module stores it as `pw.<filter>.<name>` in its metrics shm (docs:
//!   "Metrics Prefixing"; `max_metric_name_length`, 256 by default, counts the prefix: a
//!   longer name traps at definition). Kong's Prometheus plugin (`kong/plugins/prometheus/
//!   wasmx.lua`, `metric_data`, Kong 3.8+) lists that shm, turns every `.` into `_`, sorts the
//!   names and writes each as `# HELP <n>` (no text), `# TYPE <n> <type>`, `<n> <value>`:
//!   `pw_idempotency_idempotency_requests_allocated_total 3`.
//! * envoy: the Wasm extension defines it in the custom stat namespace `wasmcustom`
//!   (`source/extensions/common/wasm/`, `CustomMetricNamespace`): `/stats` shows
//!   `wasmcustom.<name>: <value>`; `/stats/prometheus` strips the registered namespace
//!   instead of adding `envoy_` (`source/server/admin/prometheus_stats.cc`, `metricName`;
//!   envoyproxy/envoy#17357), sanitises the name to `[a-zA-Z0-9_]`, drops one that starts with
//!   a digit, and writes counters then gauges, each group `# TYPE <n> <type>`, `<n>{} <value>`
//!   and a blank line.
//!
//! Counters and gauges are rendered; histograms are not (the product filter defines none, and
//! each host bins them its own way).

use crate::observed::{Metric, MetricKind};
use crate::rules::Mode;

/// The name under which the host stores a metric the filter defined as `name`.
pub fn stored_name(mode: Mode, filter: &str, name: &str) -> String {
    match mode {
        Mode::Ngx => format!("pw.{filter}.{name}"),
        Mode::Envoy => format!("wasmcustom.{name}"),
    }
}

/// The longest stored name the host takes (`None`: no limit). ngx: `max_metric_name_length`'s
/// default (`NGX_WA_METRICS_DEFAULT_MAX_NAME_LEN` in ngx_wa.h).
pub fn stored_name_limit(mode: Mode) -> Option<usize> {
    match mode {
        Mode::Ngx => Some(256),
        Mode::Envoy => None,
    }
}

fn kind(metric: &Metric) -> Option<&'static str> {
    match metric.kind {
        MetricKind::Counter => Some("counter"),
        MetricKind::Gauge => Some("gauge"),
        MetricKind::Histogram => None,
    }
}

/// What a Prometheus scrape of the gateway returns for the filter's metrics: Kong's
/// Prometheus plugin (ngx) or Envoy's `/stats/prometheus` (envoy).
pub fn prometheus(mode: Mode, filter: &str, metrics: &[Metric]) -> String {
    match mode {
        Mode::Ngx => {
            let mut named: Vec<(String, &'static str, i64)> = metrics
                .iter()
                .filter_map(|m| {
                    let name = stored_name(mode, filter, &m.name).replace('.', "_");
                    Some((name, kind(m)?, m.value))
                })
                .collect();
            named.sort();
            let mut out = String::new();
            for (name, kind, value) in named {
                out.push_str(&format!(
                    "# HELP {name}\n# TYPE {name} {kind}\n{name} {value}\n"
                ));
            }
            // `ngx.say` ends the output with a line feed of its own.
            out.push('\n');
            out
        }
        Mode::Envoy => {
            let mut out = String::new();
            for group in ["counter", "gauge"] {
                let mut named: Vec<(String, i64)> = metrics
                    .iter()
                    .filter(|m| kind(m) == Some(group))
                    .filter_map(|m| {
                        let stripped = stored_name(mode, filter, &m.name)
                            .strip_prefix("wasmcustom.")?
                            .chars()
                            .map(|c| {
                                if c.is_ascii_alphanumeric() || c == '_' {
                                    c
                                } else {
                                    '_'
                                }
                            })
                            .collect::<String>();
                        let first = stripped.chars().next()?;
                        (!first.is_ascii_digit()).then_some((stripped, m.value))
                    })
                    .collect();
                named.sort();
                for (name, value) in named {
                    out.push_str(&format!("# TYPE {name} {group}\n{name}{{}} {value}\n\n"));
                }
            }
            out
        }
    }
}

/// The host's own listing: Envoy's `/stats` (`wasmcustom.<name>: <value>`, sorted), or the
/// names ngx_wasm_module keeps in its metrics shm (`pw.<filter>.<name>: <value>`).
pub fn stats(mode: Mode, filter: &str, metrics: &[Metric]) -> String {
    let mut lines: Vec<String> = metrics
        .iter()
        .filter(|m| kind(m).is_some())
        .map(|m| format!("{}: {}", stored_name(mode, filter, &m.name), m.value))
        .collect();
    lines.sort();
    lines.iter().map(|l| format!("{l}\n")).collect()
}
