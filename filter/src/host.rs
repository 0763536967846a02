//! Which host runs the filter, and what follows from it.
//!
//! Detection, once per instance, on the first request (in an HTTP context, where both hosts
//! serve properties; root-context property reads are not covered by ngx_wasm_module's tests):
//! - `get_property(["ngx", "hostname"])` answers on ngx_wasm_module (Kong): any `ngx.*` path is
//!   an nginx variable there (`ngx_proxy_wasm_properties.c`); Envoy answers NotFound.
//! - else `get_property(["node"])` non-empty: Envoy (and Istio) serve the bootstrap `Node`
//!   message (`PropertyToken::NODE` in Envoy's wasm `context.cc`, available to every plugin);
//!   ngx_wasm_module answers NotFound (`"node" property not supported`).
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

    /// Whether `on_http_request_headers` must pause while the body is awaited. Envoy forwards
    /// the headers to the upstream unless headers are paused (then the body callbacks still
    /// come); ngx_wasm_module would not deliver the body of a request paused in its headers,
    /// and does not contact the upstream before the filter chain is done anyway.
    pub fn pause_headers_for_body(self) -> bool {
        self == Host::Envoy
    }

    /// Whether `end_of_stream` in `on_http_response_headers` means that no body follows. Not
    /// on ngx_wasm_module, which always passes 1 there (`NGX_HTTP_PROXY_WASM_EOF`), nor on an
    /// unknown host: the response then ends in a body callback or in `on_log`.
    pub fn response_headers_eos_means_no_body(self) -> bool {
        self == Host::Envoy
    }

    pub fn name(self) -> &'static str {
        match self {
            Host::Ngx => "ngx_wasm_module",
            Host::Envoy => "envoy",
            Host::Unknown => "unknown",
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RecordMode;

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
        assert!(Host::Envoy.pause_headers_for_body());
        assert!(!Host::Ngx.pause_headers_for_body());
        assert!(!Host::Unknown.pause_headers_for_body());
        assert!(Host::Envoy.response_headers_eos_means_no_body());
        assert!(!Host::Ngx.response_headers_eos_means_no_body());
        assert!(!Host::Unknown.response_headers_eos_means_no_body());
    }
}
