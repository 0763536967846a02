//! The shipped kits' filter configurations, run: the compiled `idempotency.wasm` in the test
//! host with the exact JSON each kit file carries (Kong's `kong/kong.yml` and
//! `kong/kong-plugin.yml` in ngx mode; `envoy/envoy.yaml`, Istio's `WasmPlugin` and the
//! README's `EnvoyFilter` alternative in envoy mode), against the real backend in-process
//! with the API token the kit sends, and the host settings the kit sets (Kong's body buffer,
//! Envoy's buffer limit, `allow_on_headers_stop_iteration`, the pinned Envoy version). Each
//! shows what a client sees: a keyed POST executes once, and its retry is replayed with
//! `Idempotent-Replayed: true`.
//!
//! The kits' other checks (parsing, names, API types) are `tests/kits` (Python).

#[path = "filter/support.rs"]
mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use idempotency_tests::{Host, HostBuilder, Mode, Reply, Upstream};
use serde_json::Value;
use support::{Backend, bounded, filter_wasm};

fn root() -> PathBuf {
    idempotency_tests::build::workspace()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

fn yaml(rel: &str) -> Value {
    serde_yaml_ng::from_str(&read(rel)).unwrap_or_else(|e| panic!("parsing {rel}: {e}"))
}

/// The `yaml` code blocks of a Markdown file.
fn markdown_yaml(rel: &str) -> Vec<Value> {
    read(rel)
        .split("```yaml\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .map(|b| serde_yaml_ng::from_str(b).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .collect()
}

/// kong.conf's `key = value` settings.
fn kong_conf(key: &str) -> Option<String> {
    read("kong/kong.conf").lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (!l.trim_start().starts_with('#') && k.trim() == key).then(|| v.trim().to_string())
    })
}

/// An nginx size (`8k`, `1m`, bytes).
fn nginx_size(v: &str) -> usize {
    let (digits, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
    let n: usize = digits.parse().unwrap();
    n * match unit.to_ascii_lowercase().as_str() {
        "" => 1,
        "k" => 1024,
        "m" => 1024 * 1024,
        other => panic!("unit {other}"),
    }
}

/// The only filter of the only chain of `kong/kong.yml`'s route.
fn kong_chain_config() -> Value {
    let doc = yaml("kong/kong.yml");
    let route = &doc["services"][0]["routes"][0];
    assert_eq!(
        route["filter_chains"][0]["filters"][0]["name"],
        "idempotency"
    );
    route["filter_chains"][0]["filters"][0]["config"].clone()
}

/// The filter plugin of `kong/kong-plugin.yml`'s route.
fn kong_plugin_config() -> Value {
    let doc = yaml("kong/kong-plugin.yml");
    let plugin = &doc["services"][0]["routes"][0]["plugins"][0];
    assert_eq!(plugin["name"], "idempotency");
    plugin["config"].clone()
}

/// The Wasm filter's `PluginConfig` in an HTTP filter list.
fn wasm_plugin_config(http_filters: &Value) -> Value {
    http_filters
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "envoy.filters.http.wasm")
        .expect("an envoy.filters.http.wasm filter")["typed_config"]["config"]
        .clone()
}

fn envoy_listener() -> Value {
    yaml("envoy/envoy.yaml")["static_resources"]["listeners"][0].clone()
}

fn envoy_plugin() -> Value {
    let hcm = &envoy_listener()["filter_chains"][0]["filters"][0]["typed_config"];
    wasm_plugin_config(&hcm["http_filters"])
}

fn readme_envoyfilter_plugin() -> Value {
    let ef = markdown_yaml("envoy/istio/README.md")
        .into_iter()
        .find(|b| b["kind"] == "EnvoyFilter")
        .expect("the README's EnvoyFilter");
    let value = &ef["spec"]["configPatches"][0]["patch"]["value"];
    wasm_plugin_config(&Value::Array(vec![value.clone()]))
}

/// The (major, minor) of docker-compose.yml's Envoy image (`envoyproxy/envoy:v1.36.13`).
fn compose_envoy_version() -> (u32, u32) {
    let image = yaml("docker-compose.yml")["services"]["envoy"]["image"]
        .as_str()
        .unwrap()
        .to_string();
    let v = image.split(":v").nth(1).expect("a vX.Y.Z tag");
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap());
    (parts.next().unwrap(), parts.next().unwrap())
}

/// The backend's API_TOKEN where docker-compose.yml runs it (for Kong and Envoy).
fn compose_token() -> Option<String> {
    yaml("docker-compose.yml")["services"]["idempotency"]["environment"]["API_TOKEN"]
        .as_str()
        .map(str::to_string)
}

/// The backend's API_TOKEN where the Kubernetes manifests run it (for Istio).
fn kubernetes_token() -> Option<String> {
    yaml("deploy/kubernetes/secret.yaml")["stringData"]["API_TOKEN"]
        .as_str()
        .map(str::to_string)
}

/// What one kit is: the JSON text the host hands the filter, the token of the backend it
/// is deployed with, and how the host is set.
struct Kit {
    name: &'static str,
    mode: Mode,
    config: String,
    backend_token: Option<String>,
    host: Box<dyn FnOnce(HostBuilder, SocketAddr) -> HostBuilder>,
}

impl Kit {
    fn parsed(&self) -> Value {
        serde_json::from_str(&self.config).unwrap()
    }
}

/// Kong passes the object as JSON (it validated it with idempotency.meta.json); the
/// backend is `host:port`, which Kong's resolver would find: here the in-process backend.
fn kong(name: &'static str, config: Value) -> Kit {
    let upstream = config["server"]["upstream"].as_str().unwrap().to_string();
    let buffer = nginx_size(&kong_conf("nginx_http_client_body_buffer_size").unwrap());
    Kit {
        name,
        mode: Mode::Ngx,
        config: config.to_string(),
        backend_token: compose_token(),
        host: Box::new(move |b, backend| {
            b.resolve(upstream, backend).client_body_buffer_size(buffer)
        }),
    }
}

/// Envoy gets the StringValue's text as it is; the backend is the cluster it names.
fn envoy(
    name: &'static str,
    plugin: Value,
    buffer_limit: Option<usize>,
    backend_token: Option<String>,
) -> Kit {
    let config = plugin["configuration"]["value"]
        .as_str()
        .unwrap()
        .to_string();
    let cluster = serde_json::from_str::<Value>(&config).unwrap()["server"]["upstream"]
        .as_str()
        .unwrap()
        .to_string();
    let allow = plugin["allow_on_headers_stop_iteration"]
        .as_bool()
        .unwrap_or(false);
    let root_id = plugin["root_id"].as_str().unwrap_or_default().to_string();
    let vm_id = plugin["vm_config"]["vm_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (major, minor) = compose_envoy_version();
    Kit {
        name,
        mode: Mode::Envoy,
        config,
        backend_token,
        host: Box::new(move |b, backend| {
            let b = b
                .cluster(cluster, backend)
                .allow_on_headers_stop_iteration(allow)
                .envoy_version(major, minor)
                .root_id(root_id)
                .vm_id(vm_id);
            match buffer_limit {
                Some(limit) => b.buffer_limit(limit),
                None => b,
            }
        }),
    }
}

/// Istio turns `pluginConfig` into its JSON text; the backend is `outbound|PORT||HOST`.
fn istio(envoy_version: (u32, u32)) -> Kit {
    let wp = yaml("envoy/istio/wasmplugin.yaml");
    let config = wp["spec"]["pluginConfig"].clone();
    let cluster = config["server"]["upstream"].as_str().unwrap().to_string();
    Kit {
        name: "envoy/istio/wasmplugin.yaml",
        mode: Mode::Envoy,
        config: config.to_string(),
        backend_token: kubernetes_token(),
        host: Box::new(move |b, backend| {
            b.cluster(cluster, backend)
                .envoy_version(envoy_version.0, envoy_version.1)
        }),
    }
}

/// A keyed POST and its retry through the kit's filter: one execution, one replay.
async fn one_execution_one_replay(kit: Kit) {
    let config = kit.parsed();
    let mut backend = Backend::start_with_token(kit.backend_token.as_deref()).await;
    let api = Upstream::start().await;
    api.reply(
        "/orders",
        Reply::new(201)
            .header("content-type", "application/json")
            .header("location", "/orders/1")
            .body(r#"{"order":1}"#),
    );
    let builder = Host::builder(kit.mode, filter_wasm())
        .filter_name("idempotency")
        .upstream(api.addr())
        .config(kit.config.clone());
    let host = (kit.host)(builder, backend.addr)
        .start()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{}: the filter refuses the kit's configuration: {e:?}",
                kit.name
            )
        });
    let send = || {
        host.client()
            .request("POST", "/orders")
            .header("idempotency-key", "\"order-1\"")
            .header("content-type", "application/json")
            .body(r#"{"item":"book"}"#)
            .send()
    };

    let first = send().await.unwrap();
    assert_eq!(
        first.status,
        201,
        "{}: {}\n{}",
        kit.name,
        first.text(),
        host.dump_logs()
    );
    assert_eq!(first.header("idempotent-replayed"), None, "{}", kit.name);
    assert_eq!(api.count("/orders"), 1, "{}", kit.name);

    // Kong records from the root context's tick (one batch per tick); Envoy already has.
    let tick = Duration::from_millis(config["tick_ms"].as_u64().unwrap_or(20));
    host.settle().await;
    host.advance(tick).await;
    host.settle().await;

    let retry = send().await.unwrap();
    assert_eq!(
        retry.status,
        201,
        "{}: {}\n{}",
        kit.name,
        retry.text(),
        host.dump_logs()
    );
    assert_eq!(
        retry.header("idempotent-replayed"),
        Some("true"),
        "{}",
        kit.name
    );
    assert_eq!(retry.body, first.body, "{}", kit.name);
    assert_eq!(retry.header("location"), Some("/orders/1"), "{}", kit.name);
    assert_eq!(
        api.count("/orders"),
        1,
        "{}: the retry did not execute",
        kit.name
    );

    host.finish().await;
    backend.stop().await;
}

#[tokio::test]
async fn kong_filter_chain_kit() {
    bounded(one_execution_one_replay(kong(
        "kong/kong.yml",
        kong_chain_config(),
    )))
    .await
}

#[tokio::test]
async fn kong_plugin_kit() {
    bounded(one_execution_one_replay(kong(
        "kong/kong-plugin.yml",
        kong_plugin_config(),
    )))
    .await
}

#[tokio::test]
async fn envoy_kit() {
    let limit = envoy_listener()["per_connection_buffer_limit_bytes"]
        .as_u64()
        .map(|l| l as usize);
    assert!(
        limit.is_some(),
        "envoy.yaml sets the listener's buffer limit"
    );
    bounded(one_execution_one_replay(envoy(
        "envoy/envoy.yaml",
        envoy_plugin(),
        limit,
        compose_token(),
    )))
    .await
}

/// The Istio kit keeps `request_body: skip`, which works on every Envoy the filter supports:
/// the oldest (1.32) and the one Envoy kit pins.
#[tokio::test]
async fn istio_kit_on_the_oldest_envoy() {
    bounded(one_execution_one_replay(istio((1, 32)))).await
}

#[tokio::test]
async fn istio_kit_on_the_pinned_envoy() {
    bounded(one_execution_one_replay(istio(compose_envoy_version()))).await
}

#[tokio::test]
async fn istio_envoyfilter_alternative() {
    bounded(one_execution_one_replay(envoy(
        "envoy/istio/README.md (EnvoyFilter)",
        readme_envoyfilter_plugin(),
        None,
        kubernetes_token(),
    )))
    .await
}
