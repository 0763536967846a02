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

use idempotency_spec::{AllocateRequest, Capture, Header, HeaderValue, problem_type};
use serde_json::Value;

use crate::config::Config;

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
    /// Reads `:status`, `retry-after` and Kong's `:dispatch_status` from the answer's headers.
    pub fn from_headers(headers: &[(String, String)], body: Vec<u8>) -> CallAnswer {
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let status = get(":status").and_then(|s| s.trim().parse::<u16>().ok());
        let failure = match (status, get(":dispatch_status")) {
            (None, Some(d)) => Some(d),
            (None, None) => Some("no answer".to_string()),
            _ => None,
        };
        CallAnswer {
            status,
            retry_after: get("retry-after"),
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

/// The answer's body as JSON (`Null` when it is not JSON).
///
/// The backend's answers are read as JSON values and picked apart by hand rather than
/// through serde's derived deserializers: those, with the float formatting their type errors
/// pull in, would cost about 30 KiB of the Wasm module; and a missing or mistyped field is
/// then simply `None`, never an error message to format.
fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or(Value::Null)
}

fn take_string(v: &mut Value, name: &str) -> Option<String> {
    match v.get_mut(name).map(Value::take)? {
        Value::String(s) => Some(s),
        _ => None,
    }
}

/// The capture of a 200 allocate answer (`{"response": {…}}`), the body moved, not copied.
pub fn capture_of(mut answer: Value) -> Option<Capture> {
    let mut r = answer.get_mut("response").map(Value::take)?;
    let response_status = u16::try_from(r.get("response_status")?.as_u64()?).ok()?;
    let response_body = take_string(&mut r, "response_body")?;
    let response_headers = r
        .get_mut("response_headers")?
        .as_array_mut()?
        .iter_mut()
        .map(|h| {
            let key = take_string(h, "key")?;
            let value = match h.get_mut("value").map(Value::take)? {
                Value::String(s) => HeaderValue::One(s),
                Value::Array(items) => HeaderValue::Many(
                    items
                        .into_iter()
                        .map(|i| match i {
                            Value::String(s) => Some(s),
                            _ => None,
                        })
                        .collect::<Option<Vec<String>>>()?,
                ),
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
        Some(202) => match take_string(&mut json(&answer.body), "lease_token") {
            Some(lease_token) if !lease_token.is_empty() => Allocation::Proceed { lease_token },
            _ => Allocation::ServerError("202 without a lease token".to_string()),
        },
        Some(200) => match capture_of(json(&answer.body)) {
            Some(c) => Allocation::Replay(Box::new(c)),
            None => Allocation::ServerError("200 with an unreadable capture".to_string()),
        },
        Some(409) => Allocation::Conflict {
            retry_after: answer.retry_after.clone(),
        },
        Some(422) => {
            if json(&answer.body).get("type").and_then(Value::as_str)
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
            let statuses: Option<Vec<Option<u16>>> = json(&answer.body)
                .get("results")
                .and_then(Value::as_array)
                .filter(|results| results.len() == n)
                .map(|results| {
                    results
                        .iter()
                        .map(|r| {
                            r.get("status")
                                .and_then(Value::as_u64)
                                .and_then(|s| u16::try_from(s).ok())
                        })
                        .collect()
                });
            statuses.unwrap_or_else(|| vec![None; n])
        }
        status => vec![status; n],
    }
}

/// The body of an allocation; `wait` asks the backend to wait for the holder.
pub fn allocate_body(cfg: &Config, key: &str, fingerprint: Option<String>, wait: bool) -> Vec<u8> {
    serde_json::to_vec(&AllocateRequest {
        idempotency_key: key.to_string(),
        fingerprint,
        lease_ms: Some(cfg.lease_ms),
        wait_ms: wait.then_some(cfg.wait_ms),
    })
    .unwrap_or_default()
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

    /// `,"request_id":…,"traceparent":…` for a batch item (nothing when there is neither).
    pub fn batch_fields(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in [
            ("request_id", &self.request_id),
            ("traceparent", &self.traceparent),
        ] {
            if let Some(value) = value
                && let Ok(quoted) = serde_json::to_vec(value)
            {
                out.extend_from_slice(b",\"");
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(b"\":");
                out.extend_from_slice(&quoted);
            }
        }
        out
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

/// The headers of a call to the backend.
pub fn call_headers<'a>(
    method: &'a str,
    path: &'a str,
    authority: &'a str,
    bearer: Option<&'a str>,
    context: &CallContext,
) -> Vec<(&'static str, String)> {
    let mut h = vec![
        (":method", method.to_string()),
        (":path", path.to_string()),
        (":authority", authority.to_string()),
        ("content-type", "application/json".to_string()),
        ("accept", "application/json".to_string()),
    ];
    if let Some(t) = bearer {
        let mut value = String::with_capacity(7 + t.len());
        value.push_str("Bearer ");
        value.push_str(t);
        h.push(("authorization", value));
    }
    for (name, value) in [
        ("traceparent", &context.traceparent),
        ("tracestate", &context.tracestate),
        ("x-request-id", &context.request_id),
    ] {
        if let Some(value) = value {
            h.push((name, value.clone()));
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    // On wasm32-unknown-unknown the tests run under wasm-bindgen-test (Cargo.toml).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

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
        let a = CallAnswer::from_headers(&[], vec![]);
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
    }

    #[test]
    fn allocate_body_carries_lease_fingerprint_and_wait() {
        let cfg =
            Config::parse(br#"{"server":{"upstream":"b:1"},"conflict":"wait","wait_ms":5000}"#)
                .unwrap();
        let r: AllocateRequest =
            serde_json::from_slice(&allocate_body(&cfg, "k", Some("f".into()), true)).unwrap();
        assert_eq!(r.lease_ms, Some(60_000));
        assert_eq!(r.wait_ms, Some(5000));
        assert_eq!(r.fingerprint.as_deref(), Some("f"));
        let r: AllocateRequest =
            serde_json::from_slice(&allocate_body(&cfg, "k", None, false)).unwrap();
        assert_eq!(r.wait_ms, None);
        assert_eq!(r.fingerprint, None);
    }

    #[test]
    fn call_headers_include_bearer_when_set() {
        let none = CallContext::default();
        let h = call_headers("PUT", "/api/v2/captures", "b:1", Some("tok"), &none);
        assert!(h.contains(&(":authority", "b:1".to_string())));
        assert!(h.contains(&("authorization", "Bearer tok".to_string())));
        assert!(
            !call_headers("PUT", "/p", "a", None, &none)
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
        let h = call_headers("PUT", "/p", "a", None, &cx);
        assert!(h.contains(&("traceparent", TP.to_string())));
        assert!(h.contains(&("tracestate", "vendor=1".to_string())));
        assert!(h.contains(&("x-request-id", "req-1".to_string())));
        assert_eq!(
            String::from_utf8(cx.batch_fields()).unwrap(),
            format!(r#","request_id":"req-1","traceparent":"{TP}""#)
        );
        assert!(CallContext::default().batch_fields().is_empty());
        assert!(call_headers("PUT", "/p", "a", None, &CallContext::default()).len() == 5);
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
        assert_eq!(
            String::from_utf8(quoted.batch_fields()).unwrap(),
            r#","request_id":"a\"b\\c""#
        );
    }
}
