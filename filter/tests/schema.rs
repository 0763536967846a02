//! `spec/filter-config.schema.json` is the one source of the configuration: this test checks
//! that the parser accepts and refuses what the schema does, that the parser's defaults are
//! the schema's, that Kong's `idempotency.meta.json` carries exactly the schema, and that the
//! README's configuration table lists exactly the schema's fields with their defaults.

use std::path::PathBuf;

use idempotency::config::Config;
use serde_json::{Value, json};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

fn read_json(rel: &str) -> Value {
    let text = std::fs::read_to_string(root().join(rel)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn schema() -> Value {
    read_json("spec/filter-config.schema.json")
}

struct Validator {
    schemas: boon::Schemas,
    index: boon::SchemaIndex,
}

impl Validator {
    fn new() -> Validator {
        let mut schemas = boon::Schemas::new();
        let mut compiler = boon::Compiler::new();
        let url = "file:///filter-config.schema.json";
        compiler.add_resource(url, schema()).unwrap();
        let index = compiler.compile(url, &mut schemas).unwrap();
        Validator { schemas, index }
    }

    fn accepts(&self, v: &Value) -> bool {
        self.schemas.validate(v, self.index).is_ok()
    }
}

/// Sample configurations: (configuration, valid).
fn samples() -> Vec<(Value, bool)> {
    let base = || json!({"server": {"upstream": "127.0.0.1:9000"}});
    let with = |k: &str, v: Value| {
        let mut c = base();
        c.as_object_mut().unwrap().insert(k.to_string(), v);
        c
    };
    let server = |k: &str, v: Value| {
        let mut c = base();
        c["server"]
            .as_object_mut()
            .unwrap()
            .insert(k.to_string(), v);
        c
    };
    vec![
        (base(), true),
        (json!({}), false),
        (json!([]), false),
        (json!("x"), false),
        (json!({"server": {}}), false),
        (json!({"server": "127.0.0.1:9000"}), false),
        (json!({"server": {"upstream": ""}}), false),
        (json!({"server": {"upstream": "a b"}}), false),
        (
            json!({"server": {"upstream": "outbound|8080||idempotency.default.svc.cluster.local"}}),
            true,
        ),
        (with("unknown", json!(1)), false),
        (server("unknown", json!(1)), false),
        (server("authority", json!("backend.internal")), true),
        (server("authority", json!("")), false),
        (server("path_prefix", json!("")), true),
        (server("path_prefix", json!("/x/y")), true),
        (server("path_prefix", json!("/x/")), false),
        (server("path_prefix", json!("x")), false),
        (server("path_prefix", json!("/a?b")), false),
        (server("path_prefix", json!("/a#b")), false),
        (server("timeout_ms", json!(1)), true),
        (server("timeout_ms", json!(60000)), true),
        (server("timeout_ms", json!(0)), false),
        (server("timeout_ms", json!(60001)), false),
        (server("timeout_ms", json!(-5)), false),
        (server("timeout_ms", json!("2000")), false),
        (server("token", json!("s3cr3t.token-_~+/=")), true),
        (server("token", json!("")), false),
        (server("token", json!("with space")), false),
        (with("header", json!("X-Idempotency-Key")), true),
        (with("header", json!("Bad Header")), false),
        (with("header", json!("")), false),
        (with("methods", json!(["POST"])), true),
        (with("methods", json!(["PUT", "POST", "DELETE"])), true),
        (with("methods", json!([])), false),
        (with("methods", json!(["POST", "POST"])), false),
        (with("methods", json!(["PO ST"])), false),
        (with("methods", json!("POST")), false),
        (with("require_key", json!(true)), true),
        (with("require_key", json!("true")), false),
        (with("scope", json!({})), true),
        (with("scope", json!({"headers": [], "route": false})), true),
        (
            with("scope", json!({"headers": ["authorization", "x-tenant"]})),
            true,
        ),
        (with("scope", json!({"headers": ["x tenant"]})), false),
        (with("scope", json!({"route": 1})), false),
        (with("scope", json!({"other": 1})), false),
        (with("fingerprint", json!(false)), true),
        (with("fingerprint", json!(null)), false),
        (with("lease_ms", json!(1000)), true),
        (with("lease_ms", json!(999)), false),
        (with("lease_ms", json!(86400001)), false),
        (with("max_request_body_bytes", json!(0)), true),
        (with("max_request_body_bytes", json!(67108864)), true),
        (with("max_request_body_bytes", json!(67108865)), false),
        (with("max_capture_bytes", json!(16777216)), true),
        (with("max_capture_bytes", json!(16777217)), false),
        (with("store_status", json!([])), true),
        (
            with("store_status", json!(["201", "2xx", "300-399", "4xx"])),
            true,
        ),
        (with("store_status", json!(["600"])), false),
        (with("store_status", json!(["6xx"])), false),
        (with("store_status", json!(["20x"])), false),
        (with("store_status", json!(["200-2999"])), false),
        (with("store_status", json!([201])), false),
        (with("store_status", json!(["201", "201"])), false),
        (with("replay_header", json!("")), true),
        (with("replay_header", json!("X-Replayed")), true),
        (with("replay_header", json!("X Replayed")), false),
        (with("strip_on_replay", json!(["set-cookie", "date"])), true),
        (with("strip_on_replay", json!(["a b"])), false),
        (with("on_server_error", json!("pass")), true),
        (with("on_server_error", json!("ignore")), false),
        (with("conflict", json!("wait")), true),
        (with("conflict", json!("queue")), false),
        (with("wait_ms", json!(30000)), true),
        (with("wait_ms", json!(30001)), false),
        (with("wait_ms", json!(0)), false),
        (with("record", json!("deferred")), true),
        (with("record", json!("inline")), true),
        (with("record", json!("auto")), true),
        (with("record", json!("sync")), false),
        (with("tick_ms", json!(1)), true),
        (with("tick_ms", json!(0)), false),
        (
            with(
                "queue",
                json!({"max_entries": 1, "max_bytes": 1024, "max_attempts": 1}),
            ),
            true,
        ),
        (with("queue", json!({"max_entries": 0})), false),
        (with("queue", json!({"max_bytes": 1023})), false),
        (with("queue", json!({"max_attempts": 21})), false),
        (with("queue", json!({"size": 1})), false),
        (with("envoy", json!({})), true),
        (with("envoy", json!({"request_body": "await"})), true),
        (with("envoy", json!({"request_body": "stream"})), true),
        (with("envoy", json!({"request_body": "skip"})), true),
        (with("envoy", json!({"request_body": "buffer"})), false),
        (with("envoy", json!({"body": "skip"})), false),
    ]
}

#[test]
fn parser_and_schema_accept_and_refuse_the_same_configurations() {
    let v = Validator::new();
    for (config, valid) in samples() {
        let bytes = serde_json::to_vec(&config).unwrap();
        let parsed = Config::parse(&bytes);
        assert_eq!(v.accepts(&config), valid, "schema on {config}");
        assert_eq!(parsed.is_ok(), valid, "parser on {config}: {parsed:?}");
    }
}

/// What a draft-4 schema cannot say: the parser alone refuses these (the schema's
/// descriptions state them).
#[test]
fn constraints_beyond_the_schema_are_exactly_these() {
    let v = Validator::new();
    let only_parser = [
        // A range whose first status exceeds its second.
        json!({"server": {"upstream": "u"}, "store_status": ["499-100"]}),
        // Header names are case-insensitive: these are duplicates.
        json!({"server": {"upstream": "u"}, "methods": ["POST"], "scope": {"headers": ["a", "a"]}}),
        // A replay header a replay cannot carry (any case).
        json!({"server": {"upstream": "u"}, "replay_header": "Transfer-Encoding"}),
    ];
    assert!(v.accepts(&only_parser[0]));
    assert!(Config::from_value(&only_parser[0]).is_err());
    assert!(v.accepts(&only_parser[2]));
    assert!(Config::from_value(&only_parser[2]).is_err());
    // uniqueItems catches exact duplicates in both.
    assert!(!v.accepts(&only_parser[1]));
    assert!(Config::from_value(&only_parser[1]).is_err());
    // Case-different duplicates are accepted by both, and merged by the parser.
    let c = json!({"server": {"upstream": "u"}, "scope": {"headers": ["A", "a"]}});
    assert!(v.accepts(&c));
    assert_eq!(Config::from_value(&c).unwrap().scope.headers, ["a"]);
}

/// Every (dotted path, property schema) of the schema's leaves.
fn leaves(prefix: &str, props: &Value, out: &mut Vec<(String, Value)>) {
    for (name, p) in props.as_object().unwrap() {
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        if p["type"] == "object" {
            leaves(&path, &p["properties"], out);
        } else {
            out.push((path, p.clone()));
        }
    }
}

fn at<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

#[test]
fn defaults_are_the_schemas() {
    let s = schema();
    let mut fields = Vec::new();
    leaves("", &s["properties"], &mut fields);
    let effective = Config::parse(br#"{"server":{"upstream":"127.0.0.1:9000"}}"#)
        .unwrap()
        .to_json();
    for (path, p) in &fields {
        match p.get("default") {
            Some(d) => assert_eq!(at(&effective, path), Some(d), "default of {path}"),
            None => match path.as_str() {
                "server.upstream" => {
                    assert!(s["properties"]["server"]["required"][0] == "upstream")
                }
                "server.authority" => assert_eq!(at(&effective, path).unwrap(), "127.0.0.1:9000"),
                "server.token" => assert_eq!(at(&effective, path), None),
                other => panic!("{other} has no default in the schema"),
            },
        }
    }
    // The effective configuration has no field the schema lacks.
    let mut effective_fields = Vec::new();
    fn walk(prefix: &str, v: &Value, out: &mut Vec<String>) {
        for (k, v) in v.as_object().unwrap() {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if v.is_object() {
                walk(&path, v, out);
            } else {
                out.push(path);
            }
        }
    }
    walk("", &effective, &mut effective_fields);
    for f in &effective_fields {
        assert!(
            fields.iter().any(|(p, _)| p == f),
            "{f} is not in the schema"
        );
    }
    // A full configuration with every field set round-trips through the parser.
    let full = json!({
        "server": {"upstream": "u:1", "authority": "a", "path_prefix": "/p", "timeout_ms": 5, "token": "t"},
        "header": "K", "methods": ["PUT"], "require_key": true,
        "scope": {"headers": ["x"], "route": false}, "fingerprint": false, "lease_ms": 2000,
        "max_request_body_bytes": 1, "max_capture_bytes": 2, "store_status": ["2xx"],
        "replay_header": "", "strip_on_replay": ["date"], "on_server_error": "pass",
        "conflict": "wait", "wait_ms": 3, "record": "inline", "tick_ms": 7,
        "queue": {"max_entries": 8, "max_bytes": 2048, "max_attempts": 2},
        "envoy": {"request_body": "stream"}
    });
    assert!(Validator::new().accepts(&full));
    let mut expected = full.clone();
    expected["server"]["token"] = json!("***");
    expected["store_status"] = json!(["200-299"]);
    assert_eq!(Config::from_value(&full).unwrap().to_json(), expected);
    let mut full_fields = Vec::new();
    walk("", &full, &mut full_fields);
    assert_eq!(
        full_fields.len(),
        fields.len(),
        "the full sample sets every field"
    );
}

#[test]
fn kong_meta_json_carries_the_schema() {
    let meta = read_json("kong/idempotency.meta.json");
    assert_eq!(meta, json!({"config_schema": schema()}));
}

/// The README's "Filter" section has a configuration table: `| \`field\` | default | … |`.
#[test]
fn readme_table_lists_exactly_the_schema_fields_and_defaults() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let section = readme
        .split("\n## Filter")
        .nth(1)
        .expect("README has a ## Filter section");
    let section = section.split("\n## ").next().unwrap();
    let table = section
        .split("### Configuration")
        .nth(1)
        .expect("the Filter section has a ### Configuration table");
    let mut rows = Vec::new();
    for line in table.lines().skip_while(|l| !l.starts_with('|')) {
        if !line.starts_with('|') {
            break;
        }
        let cells: Vec<&str> = line
            .split(" | ")
            .map(|c| c.trim_matches(|c| c == '|' || c == ' '))
            .collect();
        let name = cells[0];
        if let Some(field) = name.strip_prefix('`').and_then(|n| n.strip_suffix('`')) {
            rows.push((field.to_string(), cells[1].to_string()));
        }
    }
    let mut fields = Vec::new();
    leaves("", &schema()["properties"], &mut fields);
    let mut names: Vec<&str> = fields.iter().map(|(p, _)| p.as_str()).collect();
    let mut row_names: Vec<&str> = rows.iter().map(|(p, _)| p.as_str()).collect();
    names.sort_unstable();
    row_names.sort_unstable();
    assert_eq!(row_names, names, "README rows and schema fields");
    for (path, default) in &rows {
        let p = &fields.iter().find(|(f, _)| f == path).unwrap().1;
        match p.get("default") {
            Some(d) => {
                let shown = default
                    .strip_prefix('`')
                    .and_then(|d| d.strip_suffix('`'))
                    .unwrap_or_else(|| panic!("{path}: default {default:?} is not `json`"));
                let shown: Value = serde_json::from_str(shown)
                    .unwrap_or_else(|e| panic!("{path}: default {shown:?} is not JSON: {e}"));
                assert_eq!(&shown, d, "README default of {path}");
            }
            None => assert!(
                !default.starts_with('`'),
                "{path} has no default in the schema"
            ),
        }
    }
}
