//! What each backend answer means for the request, and the calls the filter makes.
//!
//! Allocate (`PUT {prefix}/captures`): 202 → proceed with the lease; 200 → replay (a wait for
//! the first request, when the backend says it waited); 409 → conflict; 422 → mismatch (unless
//! the backend says the key itself is malformed, which is the filter's fault: a server error);
//! anything else, no answer, or a failed call → server error, handled per `on_server_error`.
//! With `conflict: wait` the first allocation already carries `wait_ms`: nothing is ever sent
//! again from a call's answer (on Kong that can hang the worker, HOSTS.md bug 2).
//!
//! Batch (`POST {prefix}/captures/batch`): each item's status, for the queue.
//!
//! Every call of a request carries the request's trace context and id ([`CallContext`]), so
//! that the backend's span joins the gateway's trace and its log line names the request.

use idempotency_spec::{Capture, Header, HeaderValue, problem_type};
use serde_json::Value;

use crate::config::Config;
use crate::json::{self, Json};

/// The answer of a call as the filter sees it: `None` status when the call failed (Envoy: no
/// headers; Kong: `:dispatch_status` set, no `:status`).
#[derive(Debug, Clone, Default)]
pub struct CallAnswer {
    pub status: Option<u16>,
    pub retry_after: Option<String>,
    pub failure: Option<String>,
    /// The backend waited (`wait_ms`) for another request holding the key
    /// (`Idempotency-Waited-Ms`).
    pub waited: bool,
    pub body: Vec<u8>,
}

impl CallAnswer {
    /// Reads `:status`, `retry-after` and Kong's `:dispatch_status` from the answer's headers
    /// (as bytes or text; invalid UTF-8 replaced).
    pub fn from_headers<N: AsRef<[u8]>, V: AsRef<[u8]>>(
        headers: &[(N, V)],
        body: Vec<u8>,
    ) -> CallAnswer {
        let get = |name: &str| crate::pairs::get(headers, name);
        let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
        let status = crate::pairs::status(headers);
        let failure = match (status, get(":dispatch_status")) {
            (None, Some(d)) => Some(text(d)),
            (None, None) => Some("no answer".to_string()),
            _ => None,
        };
        CallAnswer {
            status,
            retry_after: get("retry-after").map(text),
            failure,
            waited: get(idempotency_spec::WAITED_HEADER).is_some(),
            body,
        }
    }

    pub fn describe(&self) -> String {
        match (self.status, &self.failure) {
            (Some(s), _) => format!("status {s}"),
            (None, Some(f)) => format!("call failed ({f})"),
            (None, None) => "call failed".to_string(),
        }
    }
}

/// The meaning of an allocate answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allocation {
    /// 202: the request holds the key; go on to the upstream.
    Proceed { lease_token: String },
    /// 200: the key completed earlier; replay this.
    Replay(Box<Capture>),
    /// 409: another request holds the key.
    Conflict { retry_after: Option<String> },
    /// 422: the key was used with another request.
    Mismatch,
    /// Anything else.
    ServerError(String),
}

/// The answer's body as JSON (`Null` when it is not JSON), read by [`crate::json`]: strings
/// borrowed from the body, nothing else built; a missing or mistyped field is then simply
/// `None`, never an error message to format.
fn json(body: &[u8]) -> Json<'_> {
    json::parse(body).unwrap_or(Json::Null)
}

/// The capture of a 200 allocate answer (`{"response": {…}}`), from serde_json's tree (the
/// fuzz target's entry point; the filter reads the body with [`crate::json`]).
pub fn capture_of(answer: Value) -> Option<Capture> {
    capture_in(&Json::from_value(answer))
}

/// The capture of a 200 allocate answer (`{"response": {…}}`).
fn capture_in(answer: &Json<'_>) -> Option<Capture> {
    let text = |v: &Json<'_>| v.as_str().map(str::to_owned);
    let r = answer.get("response")?;
    let response_status = u16::try_from(r.get("response_status")?.as_u64()?).ok()?;
    let response_body = text(r.get("response_body")?)?;
    let Json::Array(items) = r.get("response_headers")? else {
        return None;
    };
    let response_headers = items
        .iter()
        .map(|h| {
            let key = text(h.get("key")?)?;
            let value = match h.get("value")? {
                Json::String(s) => HeaderValue::One(s.to_string()),
                Json::Array(items) => {
                    HeaderValue::Many(items.iter().map(text).collect::<Option<Vec<String>>>()?)
                }
                _ => return None,
            };
            Some(Header { key, value })
        })
        .collect::<Option<Vec<Header>>>()?;
    Some(Capture {
        response_status,
        response_body,
        response_headers,
    })
}

pub fn allocation(answer: &CallAnswer) -> Allocation {
    match answer.status {
        Some(202) => match json(&answer.body)
            .get("lease_token")
            .and_then(Json::as_str)
            .map(str::to_owned)
        {
            Some(lease_token) if !lease_token.is_empty() => Allocation::Proceed { lease_token },
            _ => Allocation::ServerError("202 without a lease token".to_string()),
        },
        Some(200) => match capture_in(&json(&answer.body)) {
            Some(c) => Allocation::Replay(Box::new(c)),
            None => Allocation::ServerError("200 with an unreadable capture".to_string()),
        },
        Some(409) => Allocation::Conflict {
            retry_after: answer.retry_after.clone(),
        },
        Some(422) => {
            if json(&answer.body).get("type").and_then(Json::as_str)
                == Some(problem_type::MALFORMED_KEY)
            {
                Allocation::ServerError("the backend refused the key as malformed".to_string())
            } else {
                Allocation::Mismatch
            }
        }
        _ => Allocation::ServerError(answer.describe()),
    }
}

/// Each item's status in the answer to a batch of `n` (`None` where there is none: the call
/// failed, or a 200 whose results cannot be read or do not match the batch). Another status
/// of the whole call (401, 404 of a backend without the batch, 503…) is every item's.
pub fn batch_statuses(answer: &CallAnswer, n: usize) -> Vec<Option<u16>> {
    match answer.status {
        Some(200) => {
            let doc = json(&answer.body);
            let statuses: Option<Vec<Option<u16>>> = match doc.get("results") {
                Some(Json::Array(results)) if results.len() == n => Some(
                    results
                        .iter()
                        .map(|r| {
                            r.get("status")
                                .and_then(Json::as_u64)
                                .and_then(|s| u16::try_from(s).ok())
                        })
                        .collect(),
                ),
                _ => None,
            };
            statuses.unwrap_or_else(|| vec![None; n])
        }
        status => vec![status; n],
    }
}

/// The body of an allocation (an [`idempotency_spec::AllocateRequest`], its fields in their
/// order); `wait` asks the backend to wait for the holder.
pub fn allocate_body(cfg: &Config, key: &str, fingerprint: Option<&[u8]>, wait: bool) -> Vec<u8> {
    let fp_len = fingerprint.map_or(0, json::max_string_len);
    let mut out = Vec::with_capacity(128 + json::max_string_len(key) + fp_len);
    out.extend_from_slice(b"{");
    json::field(&mut out, "idempotency_key", key);
    if let Some(fp) = fingerprint {
        out.push(b',');
        json::key(&mut out, "fingerprint");
        // The filter's are ASCII ([`crate::fingerprint::Fingerprint::finish`]); bytes that
        // are not UTF-8 would still make a JSON string.
        if !json::string_bytes(&mut out, fp) {
            json::string(&mut out, &String::from_utf8_lossy(fp));
        }
    }
    out.push(b',');
    json::key(&mut out, "lease_ms");
    json::number(&mut out, cfg.lease_ms);
    if wait {
        out.push(b',');
        json::key(&mut out, "wait_ms");
        json::number(&mut out, cfg.wait_ms);
    }
    out.push(b'}');
    out
}

/// What a call to the backend passes on of the request it is made for: its W3C trace context
/// (`traceparent`, and `tracestate` with it) and its `x-request-id`, each only when well
/// formed (a malformed one is dropped, as W3C Trace Context asks of a traceparent, rather
/// than passed to the backend's log). Empty for the calls of no single request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallContext {
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    pub request_id: Option<String>,
}

impl CallContext {
    /// From the request's headers (`get` gives a header's value by name).
    pub fn of<'a>(get: impl Fn(&str) -> Option<&'a [u8]>) -> CallContext {
        let traceparent = get("traceparent")
            .filter(|v| is_traceparent(v))
            .and_then(text);
        let tracestate = traceparent.as_ref().and(
            get("tracestate")
                .filter(|v| v.len() <= 512 && v.iter().all(|b| (0x20..0x7f).contains(b)))
                .and_then(text),
        );
        CallContext {
            traceparent,
            tracestate,
            request_id: get("x-request-id")
                .filter(|v| !v.is_empty() && v.len() <= 128 && v.iter().all(u8::is_ascii_graphic))
                .and_then(text),
        }
    }

    /// `,"request_id":…,"traceparent":…` of a batch item, written at the end of `out`
    /// (nothing when there is neither).
    pub fn write_batch_fields(&self, out: &mut Vec<u8>) {
        for (name, value) in [
            ("request_id", &self.request_id),
            ("traceparent", &self.traceparent),
        ] {
            if let Some(value) = value {
                out.push(b',');
                json::key(out, name);
                json::string(out, value);
            }
        }
    }
}

fn text(bytes: &[u8]) -> Option<String> {
    std::str::from_utf8(bytes).ok().map(str::to_owned)
}

fn hex(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

/// A W3C traceparent: `version-trace_id-parent_id-flags` in lowercase hex (2-32-16-2), not
/// version `ff`, neither id all zeros; a later version may add fields after a `-`.
fn is_traceparent(value: &[u8]) -> bool {
    if value.len() < 55 || value.len() > 256 {
        return false;
    }
    let (head, rest) = value.split_at(55);
    let fields: Vec<&[u8]> = head.split(|b| *b == b'-').collect();
    let [version, trace, parent, flags] = fields.as_slice() else {
        return false;
    };
    let zero = |f: &[u8]| f.iter().all(|b| *b == b'0');
    version.len() == 2
        && trace.len() == 32
        && parent.len() == 16
        && flags.len() == 2
        && [*version, *trace, *parent, *flags].into_iter().all(hex)
        && *version != b"ff"
        && !zero(trace)
        && !zero(parent)
        && (rest.is_empty() || (*version != b"00" && rest.first() == Some(&b'-')))
}

/// The headers of a call to the backend, borrowed (`authorization`: the whole value,
/// `Bearer …`). `batch`: the call is a batch, whose answer is read for its statuses only
/// ([`batch_statuses`]), so it asks `Prefer: return=minimal`: the successes come back
/// without their bodies, most of the bytes there were to parse.
pub fn call_headers<'a>(
    method: &'a str,
    path: &'a str,
    authority: &'a str,
    authorization: Option<&'a str>,
    context: &'a CallContext,
    batch: bool,
) -> Vec<(&'static str, &'a str)> {
    let mut h = Vec::with_capacity(10);
    h.extend([
        (":method", method),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/json"),
        ("accept", "application/json"),
    ]);
    for (name, value) in [
        ("authorization", authorization),
        ("traceparent", context.traceparent.as_deref()),
        ("tracestate", context.tracestate.as_deref()),
        ("x-request-id", context.request_id.as_deref()),
    ] {
        if let Some(value) = value {
            h.push((name, value));
        }
    }
    if batch {
        h.push(("prefer", idempotency_spec::PREFER_MINIMAL));
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    // On wasm32-unknown-unknown the tests run under wasm-bindgen-test (Cargo.toml).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    /// What [`CallContext::write_batch_fields`] writes on its own.
    fn batch_fields(cx: &CallContext) -> String {
        let mut out = Vec::new();
        cx.write_batch_fields(&mut out);
        String::from_utf8(out).unwrap()
    }

    fn ans(status: Option<u16>, body: &str) -> CallAnswer {
        CallAnswer {
            status,
            retry_after: Some("2".into()),
            failure: None,
            waited: false,
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn allocate_answers() {
        assert_eq!(
            allocation(&ans(
                Some(202),
                r#"{"lease_token":"t","lease_expires_at":"x"}"#
            )),
            Allocation::Proceed {
                lease_token: "t".into()
            }
        );
        assert!(matches!(
            allocation(&ans(Some(202), "")),
            Allocation::ServerError(_)
        ));
        let rec = r#"{"idempotency_key":"k","response":{"response_status":201,"response_body":"","response_headers":[]}}"#;
        assert!(
            matches!(allocation(&ans(Some(200), rec)), Allocation::Replay(r) if r.response_status == 201)
        );
        assert!(matches!(
            allocation(&ans(Some(200), "{}")),
            Allocation::ServerError(_)
        ));
        assert_eq!(
            allocation(&ans(Some(409), "")),
            Allocation::Conflict {
                retry_after: Some("2".into())
            }
        );
        let mismatch = format!(
            r#"{{"type":"{}","title":"t","status":422,"detail":"d"}}"#,
            problem_type::FINGERPRINT_MISMATCH
        );
        assert_eq!(allocation(&ans(Some(422), &mismatch)), Allocation::Mismatch);
        assert_eq!(allocation(&ans(Some(422), "")), Allocation::Mismatch);
        let malformed = format!(
            r#"{{"type":"{}","title":"t","status":422,"detail":"d"}}"#,
            problem_type::MALFORMED_KEY
        );
        assert!(matches!(
            allocation(&ans(Some(422), &malformed)),
            Allocation::ServerError(_)
        ));
        for s in [400, 401, 403, 500, 503] {
            assert!(matches!(
                allocation(&ans(Some(s), "")),
                Allocation::ServerError(_)
            ));
        }
        assert!(matches!(
            allocation(&ans(None, "")),
            Allocation::ServerError(_)
        ));
    }

    #[test]
    fn captures_are_read_by_hand_with_both_header_shapes() {
        let rec = r#"{"idempotency_key":"k","response":{"response_status":201,"response_body":"AP8K",
            "response_headers":[{"key":"Set-Cookie","value":"a=1"},{"key":"x-many","value":["1","2"]}]}}"#;
        let c = capture_of(serde_json::from_str(rec).unwrap()).unwrap();
        assert_eq!(c.response_status, 201);
        assert_eq!(c.response_body, "AP8K");
        assert_eq!(c.response_headers[0].key, "Set-Cookie");
        assert_eq!(c.response_headers[0].value, HeaderValue::One("a=1".into()));
        assert_eq!(
            c.response_headers[1].value,
            HeaderValue::Many(vec!["1".into(), "2".into()])
        );
        // Anything malformed is None, never a panic.
        for bad in [
            r#"{}"#,
            r#"[]"#,
            r#"{"response":{"response_status":70000,"response_body":"","response_headers":[]}}"#,
            r#"{"response":{"response_status":201.5,"response_body":"","response_headers":[]}}"#,
            r#"{"response":{"response_status":201,"response_body":1,"response_headers":[]}}"#,
            r#"{"response":{"response_status":201,"response_body":"","response_headers":{}}}"#,
            r#"{"response":{"response_status":201,"response_body":"","response_headers":[{"key":"a"}]}}"#,
            r#"{"response":{"response_status":201,"response_body":"","response_headers":[{"key":"a","value":[1]}]}}"#,
        ] {
            assert!(
                capture_of(serde_json::from_str(bad).unwrap()).is_none(),
                "{bad}"
            );
        }
        assert!(matches!(
            allocation(&ans(Some(202), r#"{"lease_token":7}"#)),
            Allocation::ServerError(_)
        ));
        assert!(matches!(
            allocation(&ans(Some(200), "not json")),
            Allocation::ServerError(_)
        ));
    }

    #[test]
    fn call_answer_from_headers() {
        let h = |p: &[(&str, &str)]| {
            p.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>()
        };
        let a = CallAnswer::from_headers(&h(&[(":status", "409"), ("Retry-After", "3")]), vec![]);
        assert_eq!(a.status, Some(409));
        assert_eq!(a.retry_after.as_deref(), Some("3"));
        assert_eq!(a.failure, None);
        let a = CallAnswer::from_headers(&h(&[(":dispatch_status", "timeout")]), vec![]);
        assert_eq!(a.status, None);
        assert_eq!(a.failure.as_deref(), Some("timeout"));
        assert!(a.describe().contains("timeout"));
        let a = CallAnswer::from_headers::<String, String>(&[], vec![]);
        assert_eq!(a.failure.as_deref(), Some("no answer"));
        assert!(!a.waited);
        let a = CallAnswer::from_headers(
            &h(&[(":status", "200"), ("idempotency-waited-ms", "120")]),
            vec![],
        );
        assert!(a.waited);
    }

    #[test]
    fn batch_answers_give_each_item_its_status() {
        let ok = r#"{"results":[{"status":200,"body":{}},{"status":403,"body":{}},{"status":503,"body":{}}]}"#;
        assert_eq!(
            batch_statuses(&ans(Some(200), ok), 3),
            [Some(200), Some(403), Some(503)]
        );
        // Results that do not match the batch, or cannot be read: no status for any.
        assert_eq!(batch_statuses(&ans(Some(200), ok), 2), [None, None]);
        assert_eq!(batch_statuses(&ans(Some(200), "oops"), 2), [None, None]);
        let odd = r#"{"results":[{"status":"200"},{"status":70000}]}"#;
        assert_eq!(batch_statuses(&ans(Some(200), odd), 2), [None, None]);
        // The whole call's status.
        assert_eq!(batch_statuses(&ans(Some(503), ""), 2), [Some(503); 2]);
        assert_eq!(batch_statuses(&ans(Some(404), ""), 1), [Some(404)]);
        assert_eq!(batch_statuses(&ans(None, ""), 2), [None, None]);
        // Prefer: return=minimal: a success by its status alone, a failure with its problem.
        let minimal = r#"{"results":[{"status":200},{"status":403,"body":{"type":"x"}}]}"#;
        assert_eq!(
            batch_statuses(&ans(Some(200), minimal), 2),
            [Some(200), Some(403)]
        );
    }

    #[test]
    fn a_batch_asks_for_its_statuses_alone_and_no_other_call_does() {
        let none = CallContext::default();
        let prefer = |batch| {
            call_headers("POST", "/p", "a", None, &none, batch)
                .into_iter()
                .filter(|(n, _)| *n == "prefer")
                .map(|(_, v)| v)
                .collect::<Vec<_>>()
        };
        assert_eq!(prefer(true), ["return=minimal"]);
        assert!(prefer(false).is_empty());
    }

    #[test]
    fn allocate_body_carries_lease_fingerprint_and_wait() {
        let cfg =
            Config::parse(br#"{"server":{"upstream":"b:1"},"conflict":"wait","wait_ms":5000}"#)
                .unwrap();
        let r: idempotency_spec::AllocateRequest =
            serde_json::from_slice(&allocate_body(&cfg, "k", Some(b"f"), true)).unwrap();
        assert_eq!(r.lease_ms, Some(60_000));
        assert_eq!(r.wait_ms, Some(5000));
        assert_eq!(r.fingerprint.as_deref(), Some("f"));
        let r: idempotency_spec::AllocateRequest =
            serde_json::from_slice(&allocate_body(&cfg, "k", None, false)).unwrap();
        assert_eq!(r.wait_ms, None);
        assert_eq!(r.fingerprint, None);
        let r: idempotency_spec::AllocateRequest =
            serde_json::from_slice(&allocate_body(&cfg, "k", Some(b"f\xff"), false)).unwrap();
        assert_eq!(r.fingerprint.as_deref(), Some("f\u{fffd}"));
    }

    /// Written by hand: byte for byte what serde_json makes of the spec's type.
    #[test]
    fn allocate_body_is_what_serde_json_writes() {
        let cfg = Config::parse(br#"{"server":{"upstream":"b:1"},"wait_ms":5000}"#).unwrap();
        let odd = "a\"b\\c\u{0}\u{1f}é";
        for (key, fp, wait) in [
            ("k", None, false),
            ("a2V5", Some("sha-256:00ff".to_string()), true),
            (odd, Some(odd.to_string()), false),
            (odd, None, true),
        ] {
            let expected = idempotency_spec::AllocateRequest {
                idempotency_key: key.to_string(),
                fingerprint: fp.clone(),
                lease_ms: Some(cfg.lease_ms),
                wait_ms: wait.then_some(cfg.wait_ms),
            };
            assert_eq!(
                String::from_utf8(allocate_body(
                    &cfg,
                    key,
                    fp.as_deref().map(str::as_bytes),
                    wait
                ))
                .unwrap(),
                serde_json::to_string(&expected).unwrap()
            );
        }
    }

    /// Every answer read by hand as it was read through serde_json's `Value`.
    #[test]
    fn answers_read_by_hand_as_through_serde_json() {
        let captures = [
            r#"{"idempotency_key":"k","response":{"response_status":201,"response_body":"AP8K","response_headers":[{"key":"a","value":"1"},{"key":"b","value":["1","2"]}]}}"#,
            r#"{"response":{"response_status":201.0,"response_body":"","response_headers":[]}}"#,
            r#"{"response":{"response_status":201,"response_body":"x","response_body":"y","response_headers":[],"extra":[1,{"a":null}]},"response":{"response_status":204,"response_body":"","response_headers":[{"value":"v","key":"k\u00e9","key":"k2","other":1}]}}"#,
            r#"{"response":{"response_status":201,"response_body":"","response_headers":[{"key":"a","value":[]}]}}"#,
            r#"{"response":{"response_status":201,"response_body":"","response_headers":[{"key":"a","value":null}]}}"#,
            r#"{"response":{"response_status":201,"response_body":"","response_headers":[7]}}"#,
            r#"{"response":[]}"#,
            r#"{"response":{"response_status":-1,"response_body":"","response_headers":[]}}"#,
            r#"{"response":{"response_status":201,"response_body":"\ud800","response_headers":[]}}"#,
        ];
        for doc in captures {
            let by_hand = capture_in(&json(doc.as_bytes()));
            let through_serde = serde_json::from_str(doc).ok().and_then(capture_of);
            assert_eq!(by_hand, through_serde, "{doc}");
        }
        assert_eq!(
            capture_in(&json(captures[2].as_bytes()))
                .unwrap()
                .response_headers[0]
                .key,
            "k2"
        );
        for (body, token) in [
            (
                r#"{"lease_token":"a","lease_expires_at":"x","more":{}}"#,
                Some("a"),
            ),
            (r#"{"lease_token":"a","lease_token":"b"}"#, Some("b")),
            (r#"{"lease_token":"\u0041\n"}"#, Some("A\n")),
            (r#"{"lease_token":"a"} x"#, None),
            (r#"{"lease_token":"a","n":1e999}"#, None),
            (r#"{"lease_token":"a","n":1.5}"#, Some("a")),
            (r#"["lease_token"]"#, None),
        ] {
            let expected = match token {
                Some(t) => Allocation::Proceed {
                    lease_token: t.into(),
                },
                None => Allocation::ServerError("202 without a lease token".into()),
            };
            assert_eq!(allocation(&ans(Some(202), body)), expected, "{body}");
        }
        let malformed = format!(
            r#"{{"status":422,"type":"x","type":"{}"}}"#,
            problem_type::MALFORMED_KEY
        );
        assert!(matches!(
            allocation(&ans(Some(422), &malformed)),
            Allocation::ServerError(_)
        ));
        let batch = r#"{"results":[{"status":200.0},{"status":201,"body":{"a":[]}}],"x":"y"}"#;
        assert_eq!(batch_statuses(&ans(Some(200), batch), 2), [None, Some(201)]);
    }

    #[test]
    fn call_headers_include_bearer_when_set() {
        let none = CallContext::default();
        let h = call_headers(
            "PUT",
            "/api/v2/captures",
            "b:1",
            Some("Bearer tok"),
            &none,
            false,
        );
        assert!(h.contains(&(":authority", "b:1")));
        assert!(h.contains(&("authorization", "Bearer tok")));
        assert!(
            !call_headers("PUT", "/p", "a", None, &none, false)
                .iter()
                .any(|(n, _)| *n == "authorization")
        );
    }

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn context(headers: &[(&str, &str)]) -> CallContext {
        CallContext::of(|name| {
            headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_bytes())
        })
    }

    #[test]
    fn the_requests_trace_context_and_id_go_with_its_calls() {
        let cx = context(&[
            ("traceparent", TP),
            ("tracestate", "vendor=1"),
            ("x-request-id", "req-1"),
        ]);
        let h = call_headers("PUT", "/p", "a", None, &cx, false);
        assert!(h.contains(&("traceparent", TP)));
        assert!(h.contains(&("tracestate", "vendor=1")));
        assert!(h.contains(&("x-request-id", "req-1")));
        assert_eq!(
            batch_fields(&cx),
            format!(r#","request_id":"req-1","traceparent":"{TP}""#)
        );
        assert!(batch_fields(&CallContext::default()).is_empty());
        assert!(call_headers("PUT", "/p", "a", None, &CallContext::default(), false).len() == 5);
    }

    #[test]
    fn only_well_formed_trace_contexts_and_ids_are_passed_on() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
        ] {
            let cx = context(&[("traceparent", bad), ("tracestate", "a=1")]);
            assert_eq!(cx.traceparent, None, "{bad:?}");
            // No tracestate without its traceparent.
            assert_eq!(cx.tracestate, None, "{bad:?}");
        }
        // A later version may carry more.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more";
        assert!(context(&[("traceparent", later)]).traceparent.is_some());
        for bad in ["", "a b", "é", &"x".repeat(129)] {
            assert_eq!(
                context(&[("x-request-id", bad)]).request_id,
                None,
                "{bad:?}"
            );
        }
        // An id with quotes is escaped in a batch item, never spliced raw.
        let quoted = context(&[("x-request-id", r#"a"b\c"#)]);
        assert_eq!(batch_fields(&quoted), r#","request_id":"a\"b\\c""#);
    }
}
