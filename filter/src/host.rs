//! Which host runs the filter, and what follows from it.
//!
//! Detection, once per instance, on the first request (in an HTTP context, where both hosts
//! serve properties; root-context property reads are not covered by ngx_wasm_module's tests):
//! - `get_property(["ngx", "hostname"])` answers on ngx_wasm_module (Kong): any `ngx.*` path is
//!   an nginx variable there (`ngx_proxy_wasm_properties.c`); Envoy answers NotFound.
//! - else `get_property(["xds", "node"])` (Envoy 1.29+) or `get_property(["node"])` (until
//!   1.32: removed in 1.33, changelog 1.33.0, envoyproxy/envoy#36619) non-empty: Envoy (and
//!   Istio) serve the bootstrap `Node` message; ngx_wasm_module answers NotFound (`"node"
//!   property not supported`).
//! - neither: an unknown host, treated with the conservative rules (no inline calls in
//!   response phases, no pause in request headers while a body is awaited).

/// The host, as detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// Kong / ngx_wasm_module.
    Ngx,
    /// Envoy or Istio.
    Envoy,
    Unknown,
}

impl Host {
    pub fn detect(ngx_hostname: bool, node: bool) -> Host {
        if ngx_hostname {
            Host::Ngx
        } else if node {
            Host::Envoy
        } else {
            Host::Unknown
        }
    }

    /// Whether `end_of_stream` in `on_http_response_headers` means that no body follows. Not
    /// on ngx_wasm_module, which always passes 1 there (`NGX_HTTP_PROXY_WASM_EOF`), nor on an
    /// unknown host: the response then ends in a body callback or in `on_log`.
    pub fn response_headers_eos_means_no_body(self) -> bool {
        self == Host::Envoy
    }

    /// Whether the response being seen came from the upstream, not from the gateway itself
    /// (Envoy's own replies, 408, 403 from RBAC, 429 from a local rate limit, 503 on a connect
    /// failure, pass the response callbacks like an upstream's). Envoy: `response.code_details`
    /// is `via_upstream` only for the upstream's. Kong: `$upstream_status` is empty for a
    /// response nginx or a plugin made (after a failed connection it holds 502, a status that
    /// is never stored anyway). Unknown host: nothing to ask, so yes. Read in
    /// `on_http_response_headers`.
    pub fn from_upstream(self) -> bool {
        use proxy_wasm::hostcalls::get_property;
        match self {
            Host::Envoy => matches!(
                get_property(vec!["response", "code_details"]),
                Ok(Some(v)) if v == b"via_upstream"
            ),
            Host::Ngx => matches!(
                get_property(vec!["ngx", "upstream_status"]),
                Ok(Some(v)) if !v.is_empty()
            ),
            Host::Unknown => true,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Host::Ngx => "ngx_wasm_module",
            Host::Envoy => "envoy",
            Host::Unknown => "unknown",
        }
    }
}

/// What the request headers do with a body that the fingerprint covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyPlan {
    /// Read the body before allocating; `pause_headers`: hold the headers meanwhile.
    Read { pause_headers: bool },
    /// Allocate from the headers now (the fingerprint without the body bytes).
    FromHeaders,
}

/// Kong delivers the body whole before it contacts the upstream, and would not deliver the
/// body of a request paused in its headers: read it, headers continuing. Envoy (and an
/// unknown host) turns a Pause in the request headers into StopAllIterationAndWatermark
/// unless `allow_on_headers_stop_iteration` is set (Envoy 1.35+): no body callback until the
/// resume. So `envoy.request_body` decides: `skip` allocates from the headers, `await` holds
/// the headers for the body (needs the knob), `stream` lets the headers go upstream first.
pub fn body_plan(host: Host, envoy: crate::config::EnvoyBody) -> BodyPlan {
    use crate::config::EnvoyBody;
    match (host, envoy) {
        (Host::Ngx, _) => BodyPlan::Read {
            pause_headers: false,
        },
        (_, EnvoyBody::Skip) => BodyPlan::FromHeaders,
        (_, EnvoyBody::Await) => BodyPlan::Read {
            pause_headers: true,
        },
        (_, EnvoyBody::Stream) => BodyPlan::Read {
            pause_headers: false,
        },
    }
}

/// Whether record/release are sent inline (from the HTTP context, holding the response).
/// Never on ngx_wasm_module, where a dispatch in a response phase traps.
pub fn inline(mode: crate::config::RecordMode, host: Host) -> bool {
    use crate::config::RecordMode;
    match mode {
        RecordMode::Deferred => false,
        RecordMode::Inline => host != Host::Ngx,
        RecordMode::Auto => host == Host::Envoy,
    }
}

/// Whether ngx_wasm_module takes this call as it is, so that it never fails synchronously:
/// the upstream is `host` or `host:port` (a name, an IPv4 address or a bracketed IPv6 one;
/// the port 1 to 65535), not a URL; `:method`, `:path` and `:authority` are not empty
/// (`ngx_http_proxy_wasm_dispatch`: "no :method", "no :path", and the socket's URL parse).
pub fn ngx_dispatchable(server: &crate::config::Server, method: &str, path: &str) -> bool {
    fn host_ok(h: &str) -> bool {
        match h.strip_prefix('[') {
            Some(v6) => v6.strip_suffix(']').is_some_and(|a| {
                !a.is_empty()
                    && a.bytes()
                        .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
            }),
            None => {
                !h.is_empty()
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
            }
        }
    }
    let upstream = server.upstream.as_str();
    let (host, port) = match upstream.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') && (h.starts_with('[') == h.ends_with(']')) => {
            (h, Some(p))
        }
        _ => (upstream, None),
    };
    let port_ok = port.is_none_or(|p| {
        !p.is_empty()
            && p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u16>().is_ok_and(|n| n > 0)
    });
    host_ok(host)
        && port_ok
        && !method.is_empty()
        && path.starts_with('/')
        && !server.authority.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    // On wasm32-unknown-unknown the tests run under wasm-bindgen-test (Cargo.toml).
    use crate::config::RecordMode;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn kong_dispatches_are_checked_before_they_are_made() {
        let server = |upstream: &str, authority: &str| {
            crate::config::Server::new(upstream.into(), authority.into(), String::new(), 1, None)
        };
        for good in [
            "127.0.0.1:9000",
            "localhost:80",
            "backend",
            "[::1]:9000",
            "a-b.c_d:1",
        ] {
            assert!(
                ngx_dispatchable(&server(good, good), "POST", "/captures"),
                "{good}"
            );
        }
        for bad in [
            "http://127.0.0.1:9000",
            "127.0.0.1:9000/api",
            "127.0.0.1:",
            "127.0.0.1:0",
            "127.0.0.1:65536",
            "127.0.0.1:x",
            ":9000",
            "",
            "[::1",
            "outbound|9000||idempotency.default.svc.cluster.local",
        ] {
            assert!(
                !ngx_dispatchable(&server(bad, "a"), "POST", "/captures"),
                "{bad}"
            );
        }
        assert!(!ngx_dispatchable(&server("b:1", ""), "POST", "/captures"));
        assert!(!ngx_dispatchable(&server("b:1", "b"), "", "/captures"));
        assert!(!ngx_dispatchable(&server("b:1", "b"), "POST", ""));
        // Decided once, for the configuration's two paths.
        assert!(server("127.0.0.1:9000", "backend").ngx_dispatchable);
        assert!(!server("http://127.0.0.1:9000", "backend").ngx_dispatchable);
        assert!(!server("127.0.0.1:9000", "").ngx_dispatchable);
    }

    #[test]
    fn detection_and_modes() {
        assert_eq!(Host::detect(true, true), Host::Ngx);
        assert_eq!(Host::detect(false, true), Host::Envoy);
        assert_eq!(Host::detect(false, false), Host::Unknown);
        assert!(inline(RecordMode::Auto, Host::Envoy));
        assert!(!inline(RecordMode::Auto, Host::Ngx));
        assert!(!inline(RecordMode::Auto, Host::Unknown));
        assert!(inline(RecordMode::Inline, Host::Unknown));
        assert!(
            !inline(RecordMode::Inline, Host::Ngx),
            "never a call in a Kong response phase"
        );
        assert!(!inline(RecordMode::Deferred, Host::Envoy));
        use crate::config::EnvoyBody;
        for body in [EnvoyBody::Skip, EnvoyBody::Await, EnvoyBody::Stream] {
            assert_eq!(
                body_plan(Host::Ngx, body),
                BodyPlan::Read {
                    pause_headers: false
                },
                "Kong reads the body whatever the Envoy setting"
            );
        }
        assert_eq!(
            body_plan(Host::Envoy, EnvoyBody::Skip),
            BodyPlan::FromHeaders
        );
        assert_eq!(
            body_plan(Host::Envoy, EnvoyBody::Await),
            BodyPlan::Read {
                pause_headers: true
            }
        );
        assert_eq!(
            body_plan(Host::Unknown, EnvoyBody::Stream),
            BodyPlan::Read {
                pause_headers: false
            }
        );
        assert!(Host::Envoy.response_headers_eos_means_no_body());
        assert!(!Host::Ngx.response_headers_eos_means_no_body());
        assert!(!Host::Unknown.response_headers_eos_means_no_body());
    }
}
