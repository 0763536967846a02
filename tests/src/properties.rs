//! `proxy_get_property`: the properties each real host exposes, under its names and in
//! its encoding. The tables are in the crate doc; the sources:
//!
//! * ngx: `src/common/proxy_wasm/ngx_proxy_wasm_properties.c` (Kong/ngx_wasm_module):
//!   Envoy-style names mapped to nginx variables (`request.path` → `$request_uri`,
//!   `request.host` → `$hostname`, `source.address` → `$remote_addr`, …), any nginx
//!   variable as `ngx.<name>`, `plugin_name` (the filter name), `plugin_root_id` (the
//!   root context id, in decimal); `node`, `route_name`, `cluster_name`, … are "not
//!   supported" (NotFound plus an error log line), `plugin_vm_id` is NYI. Values are the
//!   variables' text. Without a request (root context, ticks) every request-bound
//!   property is NotFound. Kong adds `kong.*` host properties through Lua
//!   (`kong/runloop/wasm.lua`, Kong 3.6+): `kong.route_id`, `kong.service_id`,
//!   `kong.router.route` / `kong.router.service` (the entities as JSON: the route and
//!   service *names* are read there), `kong.version`, `kong.client.protocol`,
//!   `kong.nginx.subsystem`, `kong.node.id`, `kong.request.port`; only during a request.
//! * envoy: Envoy's attributes (`request.*`, `source.*`, `destination.*`,
//!   `connection.*`, `response.*`, `xds.*`) and the Wasm ones (`plugin_name`,
//!   `plugin_root_id`, `plugin_vm_id`, `node`, `route_name`, `cluster_name`). Strings
//!   are raw bytes, integers 8-byte little-endian `int64`; `source.address` and
//!   `destination.address` are `ip:port`. `node` is the serialized `Node` proto.
//!
//! How a filter tells the hosts apart at start (root context, `on_configure`): `node`
//! is present in Envoy and NotFound in ngx; in an HTTP context `ngx.*` variables exist
//! only in ngx.

use crate::contexts::World;
use crate::rules::Mode;

/// The nginx variables the ngx mode knows (`ngx.<name>`), for a request.
fn ngx_variable(world: &World, ctx: u32, name: &str) -> Option<Vec<u8>> {
    let s = world.streams.get(&ctx)?;
    let (uri, args) = match s.path.split_once('?') {
        Some((u, a)) => (u.to_string(), a.to_string()),
        None => (s.path.clone(), String::new()),
    };
    let header = |h: &str| crate::abi::get(&s.request_headers, h).map(|v| v.to_vec());
    let value: String = match name {
        "request_uri" => s.path.clone(),
        "uri" | "document_uri" => uri,
        "args" | "query_string" => args,
        "is_args" => if args.is_empty() { "" } else { "?" }.into(),
        "request_method" => s.method.clone(),
        "scheme" => "http".into(),
        "https" => String::new(),
        "server_protocol" => "HTTP/1.1".into(),
        "remote_addr" | "realip_remote_addr" | "binary_remote_addr" => {
            s.peer.map(|p| p.ip().to_string())?
        }
        "remote_port" | "realip_remote_port" => s.peer.map(|p| p.port().to_string())?,
        "server_addr" => s.local.map(|p| p.ip().to_string())?,
        "server_port" => s.local.map(|p| p.port().to_string())?,
        "server_name" => "kong".into(),
        "hostname" => world.opts.hostname.clone(),
        "host" => {
            let h = header("host").map(|v| String::from_utf8_lossy(&v).into_owned());
            h.map(|h| h.split(':').next().unwrap_or("").to_ascii_lowercase())
                .unwrap_or_else(|| "kong".into())
        }
        "content_length" => return header("content-length"),
        "content_type" => return header("content-type"),
        "request_length" => s.request_size.to_string(),
        "connection" => s.connection_id.to_string(),
        "status" => crate::abi::get(&s.response_headers, ":status")
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_else(|| "000".into()),
        "upstream_addr" => s.upstream_addr.map(|a| a.to_string())?,
        // Empty (not found) for a response nginx or a filter made itself.
        "upstream_status" => s.upstream_status.map(|c| c.to_string())?,
        n if n.starts_with("http_") => {
            return header(&n["http_".len()..].replace('_', "-"));
        }
        n if n.starts_with("sent_http_") => {
            let h = n["sent_http_".len()..].replace('_', "-");
            return crate::abi::get(&s.response_headers, &h).map(|v| v.to_vec());
        }
        _ => return s.properties.get(&format!("ngx.{name}")).cloned(),
    };
    Some(value.into_bytes())
}

fn ngx_property(world: &World, ctx: Option<u32>, path: &str) -> Option<Vec<u8>> {
    let opts = &world.opts;
    match path {
        "plugin_name" => return Some(opts.filter_name.clone().into_bytes()),
        "plugin_root_id" => return Some(world.root_id.to_string().into_bytes()),
        _ => {}
    }
    let ctx = ctx?;
    let var = |name: &str| ngx_variable(world, ctx, name);
    let s = world.streams.get(&ctx)?;
    let kong = |v: &str| Some(v.as_bytes().to_vec());
    match path {
        "request.path" => var("request_uri"),
        "request.url_path" => var("uri"),
        "request.host" => var("hostname"),
        "request.scheme" => var("scheme"),
        "request.method" => var("request_method"),
        "request.useragent" => var("http_user_agent"),
        "request.protocol" => var("server_protocol"),
        "request.query" => var("args"),
        "request.id" => crate::abi::get(&s.request_headers, "x-request-id").map(<[u8]>::to_vec),
        "request.referer" => crate::abi::get(&s.request_headers, "referer").map(<[u8]>::to_vec),
        "request.size" => var("content_length"),
        "request.total_size" => var("request_length"),
        "response.code" => var("status"),
        "source.address" => var("remote_addr"),
        "source.port" => var("remote_port"),
        "connection.id" => var("connection"),
        "upstream.address" => s.upstream_addr.map(|a| a.ip().to_string().into_bytes()),
        "upstream.port" => s.upstream_addr.map(|a| a.port().to_string().into_bytes()),
        "kong.route_id" => kong(&opts.route_id),
        "kong.service_id" => kong(&opts.service_id),
        "kong.router.route" => kong(&format!(
            r#"{{"id":"{}","name":"{}","paths":["/"],"protocols":["http","https"]}}"#,
            opts.route_id, opts.route_name
        )),
        "kong.router.service" => kong(&format!(
            r#"{{"id":"{}","name":"{}","protocol":"http","host":"{}","port":{}}}"#,
            opts.service_id,
            opts.service_name,
            opts.upstream
                .map(|a| a.ip().to_string())
                .unwrap_or_default(),
            opts.upstream.map(|a| a.port()).unwrap_or(80)
        )),
        "kong.version" => kong(&opts.kong_version),
        "kong.client.protocol" => kong("http"),
        "kong.nginx.subsystem" => kong("http"),
        "kong.node.id" => kong(&opts.node_id),
        "kong.request.port" => s.local.map(|a| a.port().to_string().into_bytes()),
        p if p.starts_with("request.headers.") => {
            crate::abi::get(&s.request_headers, &p["request.headers.".len()..]).map(<[u8]>::to_vec)
        }
        p if p.starts_with("response.headers.") => {
            crate::abi::get(&s.response_headers, &p["response.headers.".len()..])
                .map(<[u8]>::to_vec)
        }
        p if p.starts_with("ngx.") => var(&p[4..]),
        p if p.starts_with("kong.") => s.properties.get(p).cloned(),
        _ => None,
    }
}

/// Envoy's `Node` proto, serialized: `id` (field 1) and `user_agent_name` (field 6).
fn envoy_node(id: &str) -> Vec<u8> {
    let mut out = vec![0x0a, id.len() as u8];
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(&[0x32, 5]);
    out.extend_from_slice(b"envoy");
    out
}

fn int(v: i64) -> Option<Vec<u8>> {
    Some(v.to_le_bytes().to_vec())
}

/// Envoy renamed its xDS attributes: the `xds.*` names exist since 1.29, the old top-level
/// ones (`node`, `route_name`, `cluster_name`, `listener_direction`, …) were removed in 1.33
/// (changelog 1.33.0, "Remove previously deprecated xDS attributes from get_property",
/// envoyproxy/envoy#36619). The path as the filter asked for it, or `None` when this
/// version does not know it.
fn envoy_xds_name(version: (u32, u32), path: &str) -> Option<&str> {
    const OLD: &[&str] = &[
        "node",
        "cluster_name",
        "cluster_metadata",
        "listener_direction",
        "listener_metadata",
        "route_name",
        "route_metadata",
        "upstream_host_metadata",
        "filter_chain_name",
    ];
    if let Some(name) = path.strip_prefix("xds.") {
        return (version >= (1, 29) && OLD.contains(&name)).then_some(name);
    }
    if OLD.contains(&path) {
        return (version < (1, 33)).then_some(path);
    }
    Some(path)
}

fn envoy_property(world: &World, ctx: Option<u32>, path: &str) -> Option<Vec<u8>> {
    let opts = &world.opts;
    let path = envoy_xds_name(opts.envoy_version, path)?;
    match path {
        "plugin_name" => return Some(opts.filter_name.clone().into_bytes()),
        "plugin_root_id" => return Some(opts.root_id.clone().into_bytes()),
        "plugin_vm_id" => return Some(opts.vm_id.clone().into_bytes()),
        "node" => return Some(envoy_node(&opts.node_id)),
        "listener_direction" => return int(1),
        _ => {}
    }
    let s = world.streams.get(&ctx?)?;
    let header = |h: &str| crate::abi::get(&s.request_headers, h).map(<[u8]>::to_vec);
    let path_q = s.path.clone();
    match path {
        "request.path" => header(":path"),
        "request.url_path" => {
            let p = String::from_utf8_lossy(&header(":path")?).into_owned();
            Some(p.split('?').next().unwrap_or("").as_bytes().to_vec())
        }
        "request.host" => header(":authority"),
        "request.scheme" => header(":scheme"),
        "request.method" => header(":method"),
        "request.referer" => header("referer"),
        "request.useragent" => header("user-agent"),
        "request.id" => header("x-request-id"),
        "request.protocol" => Some(b"HTTP/1.1".to_vec()),
        "request.query" => Some(path_q.split_once('?').map(|x| x.1).unwrap_or("").into()),
        // Envoy: the Content-Length when there is one, else the bytes received.
        "request.size" => {
            let cl = header("content-length")
                .and_then(|v| String::from_utf8_lossy(&v).trim().parse::<i64>().ok());
            int(cl.unwrap_or(s.request_size as i64))
        }
        "source.address" => s.peer.map(|a| a.to_string().into_bytes()),
        "source.port" => int(s.peer?.port() as i64),
        "destination.address" => s.local.map(|a| a.to_string().into_bytes()),
        "destination.port" => int(s.local?.port() as i64),
        "connection.id" => int(s.connection_id as i64),
        "response.code" => {
            let code = crate::abi::get(&s.response_headers, ":status")?;
            int(String::from_utf8_lossy(code).parse().ok()?)
        }
        "route_name" => Some(opts.route_name.clone().into_bytes()),
        "cluster_name" => Some(opts.service_name.clone().into_bytes()),
        "response.code_details" => s.code_details.clone().map(String::into_bytes),
        "upstream.address" => s.upstream_addr.map(|a| a.to_string().into_bytes()),
        "upstream.port" => int(s.upstream_addr?.port() as i64),
        p if p.starts_with("request.headers.") => header(&p["request.headers.".len()..]),
        p if p.starts_with("response.headers.") => {
            crate::abi::get(&s.response_headers, &p["response.headers.".len()..])
                .map(<[u8]>::to_vec)
        }
        p => s.properties.get(p).cloned(),
    }
}

/// The value of a property for the current context, `None` when the host has none.
/// `path` is the SDK's NUL-separated path, already split.
pub fn get(world: &World, parts: &[String]) -> Option<Vec<u8>> {
    let path = parts.join(".");
    let ctx = (world.current != world.root_id).then_some(world.current);
    match world.mode {
        Mode::Ngx => {
            let value = ngx_property(world, ctx, &path);
            if value.is_none() {
                let (level, message) = match path.as_str() {
                    "node"
                    | "cluster_name"
                    | "cluster_metadata"
                    | "listener_direction"
                    | "listener_metadata"
                    | "route_name"
                    | "route_metadata"
                    | "upstream_host_metadata" => (
                        crate::observed::Level::Error,
                        format!("\"{path}\" property not supported"),
                    ),
                    "plugin_vm_id" => (
                        crate::observed::Level::Error,
                        format!("NYI - \"{path}\" property"),
                    ),
                    _ => (
                        crate::observed::Level::Error,
                        format!("property \"{path}\" not found"),
                    ),
                };
                world.host_log(level, message);
            }
            value
        }
        Mode::Envoy => envoy_property(world, ctx, &path),
    }
}

/// `proxy_set_property`: Envoy keeps any path as filter state (readable back);
/// ngx accepts only `ngx.*` variables (NotFound otherwise).
pub fn set(world: &mut World, parts: &[String], value: &[u8]) -> bool {
    let path = parts.join(".");
    let mode = world.mode;
    let Some(stream) = world.stream() else {
        return false;
    };
    if mode == Mode::Ngx && !path.starts_with("ngx.") {
        return false;
    }
    stream.properties.insert(path, value.to_vec());
    true
}
