//! Loading: an invalid configuration is one log line naming the field, and the load fails
//! (`on_configure` false); the metrics the filter defines are README's, by name.

use idempotency_tests::{Host, Level, LoadFailure, Mode, Source};

use crate::both_modes;
use crate::support::{E2e, filter_wasm};

async fn an_invalid_configuration_is_one_line_naming_the_field_and_the_load_fails(mode: Mode) {
    let cases: [(&str, &str); 7] = [
        ("", "server.upstream"),
        ("{\"server\": {}}", "server.upstream"),
        (
            "{\"server\": {\"upstream\": \"b:1\", \"timeout_ms\": 0}}",
            "server.timeout_ms",
        ),
        (
            "{\"server\": {\"upstream\": \"b:1\"}, \"conflict\": \"maybe\"}",
            "conflict",
        ),
        (
            "{\"server\": {\"upstream\": \"b:1\"}, \"store_status\": [\"2x\"]}",
            "store_status[0]",
        ),
        (
            "{\"server\": {\"upstream\": \"b:1\"}, \"lease_ms\": \"60s\"}",
            "lease_ms",
        ),
        (
            "{\"server\": {\"upstream\": \"b:1\"}, \"bogus\": true}",
            "bogus",
        ),
    ];
    for (config, field) in cases {
        let err = Host::builder(mode, filter_wasm())
            .filter_name("idempotency")
            .config(config)
            .start()
            .await
            .err()
            .unwrap_or_else(|| panic!("{config:?} must not load"));
        assert!(
            format!("{err:#}").contains("on_configure returned false"),
            "{config:?}: {err:#}"
        );
        let logs = &err
            .downcast_ref::<LoadFailure>()
            .expect("the load's logs")
            .logs;
        let lines: Vec<&str> = logs
            .iter()
            .filter(|l| l.source == Source::Filter && l.level >= Level::Warn)
            .map(|l| l.message.as_str())
            .collect();
        assert_eq!(lines.len(), 1, "{config:?}: one line: {lines:?}");
        assert!(
            lines[0].contains(&format!("{field}:")),
            "{config:?}: the line names {field}: {}",
            lines[0]
        );
        assert!(!lines[0].contains('\n'), "one line");
    }
}

/// README's Metrics table: the names in its first column.
fn readme_metric_names() -> Vec<String> {
    let readme = std::fs::read_to_string(idempotency_tests::build::workspace().join("README.md"))
        .expect("README.md");
    let section = readme
        .split("\n### Metrics\n")
        .nth(1)
        .expect("README has a Metrics section");
    let section = section.split("\n### ").next().unwrap_or(section);
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`'))
        .map(|(name, _)| name.to_string())
        .collect()
}

async fn the_metrics_are_readmes_by_name(mode: Mode) {
    let t = E2e::start(mode, serde_json::json!({})).await;
    let mut defined: Vec<String> = t.host().metrics().into_iter().map(|m| m.name).collect();
    defined.sort();
    let mut documented = readme_metric_names();
    documented.sort();
    assert!(!documented.is_empty());
    assert_eq!(
        defined, documented,
        "defined at start, named as README says"
    );
    assert!(t.host().metrics().iter().all(|m| m.value == 0));
    t.finish().await;
}

both_modes!(
    an_invalid_configuration_is_one_line_naming_the_field_and_the_load_fails,
    the_metrics_are_readmes_by_name,
);
