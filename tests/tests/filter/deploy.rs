//! `deploy/prometheus/alerts.yml` and `deploy/grafana/idempotency.json` against what really
//! runs: both files have the structure Prometheus and Grafana load, `promtool` accepts the
//! rules and passes their unit tests (`alerts.test.yml`) when it is installed, and every
//! metric they name, with every label value they match exactly, is in a scrape of the real
//! backend or in the gateway's scrape of the filter (Kong's names and Envoy's, from the
//! compiled filter in the test host).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use idempotency_tests::{Client, Mode, Reply};
use serde_json::{Value, json};

use crate::prometheus::{self, Exposition};
use crate::support::E2e;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

/// The alerts the issue asks for, by what they watch.
const REQUIRED_ALERTS: [&str; 6] = [
    "IdempotencyBackendErrors",        // backend errors
    "IdempotencyStoreLatencyHigh",     // store latency
    "IdempotencyConflictRateHigh",     // conflict rate
    "IdempotencyRecordFailures",       // record failures (backend)
    "IdempotencyFilterRecordFailures", // record failures (gateway)
    "IdempotencyFilterQueueDrops",     // queue drops
];

/// Every rule's expression, after checking the structure Prometheus loads.
fn alert_expressions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(deploy("prometheus/alerts.yml")).unwrap();
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("alerts.yml is YAML");
    let groups = doc["groups"].as_sequence().expect("groups: a list");
    assert!(!groups.is_empty());
    let mut names = BTreeSet::new();
    let mut out = Vec::new();
    for group in groups {
        assert!(group["name"].as_str().is_some_and(|n| !n.is_empty()));
        for rule in group["rules"].as_sequence().expect("rules: a list") {
            let alert = rule["alert"].as_str().expect("every rule is an alert");
            assert!(names.insert(alert.to_owned()), "{alert} twice");
            let expr = rule["expr"].as_str().expect("expr").to_owned();
            let r#for = rule["for"].as_str().expect("for: a duration");
            assert!(
                r#for.ends_with('m') && r#for[..r#for.len() - 1].parse::<u32>().is_ok(),
                "{alert}: for {for}"
            );
            let severity = rule["labels"]["severity"].as_str();
            assert!(
                matches!(severity, Some("warning" | "critical")),
                "{alert}: severity {severity:?}"
            );
            for annotation in ["summary", "description"] {
                assert!(
                    rule["annotations"][annotation]
                        .as_str()
                        .is_some_and(|a| !a.is_empty()),
                    "{alert}: no {annotation}"
                );
            }
            out.push((alert.to_owned(), expr));
        }
    }
    for required in REQUIRED_ALERTS {
        assert!(names.contains(required), "no alert {required}");
    }
    out
}

/// Every panel's queries, after checking the structure Grafana loads, each with the
/// dashboard's variables put in (`$__rate_interval`, `$job`).
fn dashboard_expressions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(deploy("grafana/idempotency.json")).unwrap();
    let d: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert_eq!(d["uid"], "idempotency");
    assert!(d["title"].is_string() && d["schemaVersion"].is_u64());
    let variables: Vec<&str> = d["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .map(|v| v["name"].as_str().expect("a variable's name"))
        .collect();
    assert_eq!(variables, ["datasource", "job"]);
    let mut ids = BTreeSet::new();
    let mut out = Vec::new();
    for panel in d["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().expect("title").to_owned();
        assert!(
            ids.insert(panel["id"].as_u64().expect("id")),
            "{title}: id twice"
        );
        for field in ["x", "y", "w", "h"] {
            assert!(panel["gridPos"][field].is_u64(), "{title}: gridPos.{field}");
        }
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            assert!(target["refId"].is_string(), "{title}: refId");
            let expr = target["expr"].as_str().expect("expr");
            out.push((
                title.clone(),
                expr.replace("$__rate_interval", "5m").replace("$job", ".*"),
            ));
        }
    }
    out
}

/// A name of one of our metrics starts here (`idempotency_…`, and Kong's
/// `pw_idempotency_…`).
fn starts_name(expr: &str, at: usize) -> bool {
    let before = expr[..at].chars().next_back();
    !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && (expr[at..].starts_with("idempotency_") || expr[at..].starts_with("pw_idempotency_"))
}

/// The metric names `expr` selects, each with its exact label matchers (`label="value"`,
/// and the alternatives of a plain `label=~"a|b"`). `{__name__=~"(pw_idempotency_)?NAME"}`
/// selects both gateways' names.
fn selected(expr: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < expr.len() {
        if let Some(rest) = expr[at..].strip_prefix("(pw_idempotency_)?") {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            at += "(pw_idempotency_)?".len() + name.len();
            out.push((format!("pw_idempotency_{name}"), Vec::new()));
            out.push((name, Vec::new()));
            continue;
        }
        if !expr.is_char_boundary(at) || !starts_name(expr, at) {
            at += 1;
            continue;
        }
        let name: String = expr[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        at += name.len();
        let mut matchers = Vec::new();
        if let Some(inside) = expr[at..].strip_prefix('{') {
            let inside = &inside[..inside.find('}').expect("a closed selector")];
            for matcher in inside.split(',') {
                let matcher = matcher.trim();
                if let Some((label, value)) = matcher.split_once("=~") {
                    let value = value.trim_matches('"');
                    // Only plain alternatives; a real pattern (`5..`) is not checked.
                    if value
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '|')
                    {
                        for v in value.split('|') {
                            matchers.push((label.to_owned(), v.to_owned()));
                        }
                    }
                } else if let Some((label, value)) = matcher.split_once('=') {
                    matchers.push((label.to_owned(), value.trim_matches('"').to_owned()));
                }
            }
        }
        out.push((name, matchers));
    }
    out
}

/// Every label value each sample name has in `scrapes`.
fn exported(scrapes: &[Exposition]) -> BTreeMap<String, BTreeSet<(String, String)>> {
    let mut out: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
    for scrape in scrapes {
        for sample in scrape.families.iter().flat_map(|f| &f.samples) {
            let labels = out.entry(sample.name.clone()).or_default();
            labels.extend(sample.labels.clone());
        }
    }
    out
}

#[test]
fn the_selector_reader_finds_names_and_exact_values() {
    let got = selected(
        r#"sum(rate(idempotency_server_allocations_total{job=~".*",outcome="conflict"}[5m])) / sum(rate({__name__=~"(pw_idempotency_)?idempotency_queue_dropped_total"}[5m])) + idempotency_server_records_total{outcome=~"error|forbidden",status=~"5.."}"#,
    );
    let pair = |l: &str, v: &str| (l.to_owned(), v.to_owned());
    assert_eq!(
        got,
        [
            (
                "idempotency_server_allocations_total".to_owned(),
                vec![pair("outcome", "conflict")]
            ),
            (
                "pw_idempotency_idempotency_queue_dropped_total".to_owned(),
                vec![]
            ),
            ("idempotency_queue_dropped_total".to_owned(), vec![]),
            (
                "idempotency_server_records_total".to_owned(),
                vec![pair("outcome", "error"), pair("outcome", "forbidden")]
            ),
        ]
    );
}

/// `promtool <args>` in `dir`, when promtool is installed: its verdict.
fn promtool(dir: &Path, args: &[&str]) -> Option<Result<(), String>> {
    let output = std::process::Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Some(if output.status.success() {
        Ok(())
    } else {
        Err(said)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alerts_and_the_dashboard_name_only_what_is_exported() {
    let dir = deploy("prometheus");
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["test", "rules", "alerts.test.yml"][..],
    ] {
        match promtool(&dir, args) {
            Some(verdict) => verdict.unwrap_or_else(|e| panic!("promtool {args:?}: {e}")),
            None => eprintln!("SKIPPED promtool {args:?}: promtool is not installed"),
        }
    }

    // What Prometheus would scrape: the backend's /metrics, Kong's and Envoy's pages of the
    // filter's counters.
    let mut scrapes = Vec::new();
    for mode in [Mode::Ngx, Mode::Envoy] {
        let t = E2e::start(mode, json!({})).await;
        if mode == Mode::Ngx {
            // Some traffic first: HTTP requests are counted per route and status once seen.
            t.api.reply("/orders", Reply::new(201).body("{}"));
            assert_eq!(t.send("/orders", "\"k\"", "{}").await.status, 201);
            t.tick().await;
            assert_eq!(t.send("/orders", "\"k\"", "{}").await.status, 201);
            let backend = t.backend.as_ref().expect("the backend").addr;
            let page = Client::new(backend).get("/metrics").await.unwrap();
            assert_eq!(page.status, 200);
            scrapes.push(prometheus::parse(&page.text()).expect("the backend's /metrics"));
        }
        scrapes.push(prometheus::parse(&t.host().prometheus()).expect("the gateway's scrape"));
        t.finish().await;
    }
    let exported = exported(&scrapes);

    let mut checked = 0;
    for (source, expressions) in [
        ("alerts.yml", alert_expressions()),
        ("idempotency.json", dashboard_expressions()),
    ] {
        for (what, expr) in expressions {
            let names = selected(&expr);
            assert!(
                !names.is_empty(),
                "{source} {what}: no metric of ours: {expr}"
            );
            for (name, matchers) in names {
                let labels = exported
                    .get(&name)
                    .unwrap_or_else(|| panic!("{source} {what}: {name} is not exported"));
                for (label, value) in matchers {
                    if label == "job" {
                        continue; // Prometheus's, not ours
                    }
                    assert!(
                        labels.contains(&(label.clone(), value.clone())),
                        "{source} {what}: {name} has no {label}=\"{value}\""
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 40, "only {checked} selections checked");
}
