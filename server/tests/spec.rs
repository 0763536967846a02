//! `spec/openapi.yaml` stays true to the code: its examples are the wire types, its problem
//! types are the ones the server sends, and its request examples get the documented answers
//! from the real server.

mod common;

use common::TestServer;
use idempotency_spec::{
    AllocateRequest, Allocated, BatchAnswer, BatchOperation, CaptureRecord, Pong, Problem,
    Recorded, ReleaseRequest, Released, problem_type,
};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

fn spec() -> Value {
    serde_yaml_ng::from_str(idempotency_server::api::OPENAPI_YAML).expect("the spec is YAML")
}

/// Follow a local `$ref` ("#/components/...").
fn resolve<'a>(spec: &'a Value, node: &'a Value) -> &'a Value {
    match node.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let pointer = reference.strip_prefix('#').expect("a local reference");
            resolve(spec, spec.pointer(pointer).expect("the reference resolves"))
        }
        None => node,
    }
}

/// Every example value of a media type, by name.
fn examples<'a>(spec: &'a Value, media: &'a Value) -> Vec<(String, &'a Value)> {
    media["examples"]
        .as_object()
        .map(|all| {
            all.iter()
                .map(|(name, example)| (name.clone(), &resolve(spec, example)["value"]))
                .collect()
        })
        .unwrap_or_default()
}

fn decode<T: DeserializeOwned>(what: &str, value: &Value) -> T {
    serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{what}: {e}\n{value:#}"))
}

fn operation<'a>(spec: &'a Value, path: &str, method: &str) -> &'a Value {
    &spec["paths"][path][method]
}

fn request_examples<'a>(spec: &'a Value, method: &str) -> Vec<(String, &'a Value)> {
    let body = &operation(spec, "/api/v2/captures", method)["requestBody"];
    examples(spec, &body["content"]["application/json"])
}

#[test]
fn every_example_is_a_wire_type() {
    let spec = spec();
    let mut problems = 0;
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let body = &op["requestBody"]["content"]["application/json"];
            for (name, value) in examples(&spec, body) {
                let what = format!("{method} {path} request {name}");
                match method.as_str() {
                    "post" if path == "/api/v2/captures/batch" => {
                        let operations = &value["operations"];
                        drop(decode::<Vec<BatchOperation>>(&what, operations));
                    }
                    "put" => drop(decode::<AllocateRequest>(&what, value)),
                    "post" => drop(decode::<CaptureRecord>(&what, value)),
                    "delete" => drop(decode::<ReleaseRequest>(&what, value)),
                    other => panic!("{what}: unexpected body on {other}"),
                }
            }
            for (status, answer) in op["responses"].as_object().unwrap() {
                let answer = resolve(&spec, answer);
                for (media_type, media) in answer["content"].as_object().unwrap() {
                    for (name, value) in examples(&spec, media) {
                        let what = format!("{method} {path} {status} {name}");
                        match (media_type.as_str(), method.as_str(), status.as_str()) {
                            ("application/problem+json", _, _) => {
                                let problem: Problem = decode(&what, value);
                                assert_eq!(problem.status.to_string(), *status, "{what}");
                                assert_eq!(problem.error.as_ref(), Some(&problem.detail));
                                problems += 1;
                            }
                            _ if path == "/api/v2/captures/batch" => {
                                let answer: BatchAnswer<Value> = decode(&what, value);
                                for result in answer.results {
                                    match (result.status, &result.body) {
                                        (200, Some(body)) => drop(decode::<Recorded>(&what, body)),
                                        // Prefer: return=minimal.
                                        (200, None) => {}
                                        (_, Some(body)) => drop(decode::<Problem>(&what, body)),
                                        (_, None) => {
                                            panic!("{what}: a failure without its problem")
                                        }
                                    }
                                }
                            }
                            (_, "put", "200") => drop(decode::<CaptureRecord>(&what, value)),
                            (_, "put", "202") => drop(decode::<Allocated>(&what, value)),
                            (_, "post", "200") => drop(decode::<Recorded>(&what, value)),
                            (_, "delete", "200") => drop(decode::<Released>(&what, value)),
                            _ if path == "/-/ping" => drop(decode::<Pong>(&what, value)),
                            _ => {}
                        }
                    }
                }
            }
        }
    }
    assert!(problems >= 10, "problem examples checked: {problems}");
}

#[test]
fn the_documented_problem_types_are_the_ones_sent() {
    let spec = spec();
    let documented: Vec<&str> =
        spec["components"]["schemas"]["Problem"]["properties"]["type"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
    let sent = [
        problem_type::MALFORMED_PAYLOAD,
        problem_type::UNAUTHORIZED,
        problem_type::NOT_ALLOCATED,
        problem_type::REQUEST_TIMEOUT,
        problem_type::IN_FLIGHT,
        problem_type::PAYLOAD_TOO_LARGE,
        problem_type::MALFORMED_KEY,
        problem_type::FINGERPRINT_MISMATCH,
        problem_type::STORE_UNAVAILABLE,
        problem_type::ABOUT_BLANK,
    ];
    assert_eq!(documented, sent);
    let description = spec["info"]["description"].as_str().unwrap();
    for kind in sent {
        assert!(description.contains(kind), "{kind} is not in the table");
    }
}

#[tokio::test]
async fn the_request_examples_get_the_documented_answers() {
    let spec = spec();
    let server = TestServer::start().await;
    let c = &server.client;
    // Allocations of fresh keys: 202 with the documented shape.
    for (name, body) in request_examples(&spec, "put") {
        let answer = c.allocate(body.clone()).await;
        assert_eq!(answer.status, 202, "{name}: {answer:?}");
        let _: Allocated = decode(&name, &answer.json);
    }
    // Records: the old plugin's (no token) completes its allocation; the replay is it.
    for (name, body) in request_examples(&spec, "post") {
        let key = body["idempotency_key"].as_str().unwrap();
        let mut body = body.clone();
        if body.get("lease_token").is_some() {
            let fresh = format!("{key}x");
            body["idempotency_key"] = json!(fresh);
            body["lease_token"] = json!(c.lease(&fresh).await);
        }
        let key = body["idempotency_key"].as_str().unwrap().to_owned();
        let answer = c.record(body.clone()).await;
        assert_eq!(answer.status, 200, "{name}: {answer:?}");
        let _: Recorded = decode(&name, &answer.json);
        let replay = c.allocate(json!({ "idempotency_key": key })).await;
        assert_eq!(replay.json["response"], body["response"], "{name}");
    }
    // The batch: each item with its own fresh lease, each answered 200.
    let body = &operation(&spec, "/api/v2/captures/batch", "post")["requestBody"];
    for (name, example) in examples(&spec, &body["content"]["application/json"]) {
        let mut example = example.clone();
        for op in example["operations"].as_array_mut().unwrap() {
            let key = format!("{}b", op["idempotency_key"].as_str().unwrap());
            op["lease_token"] = json!(c.lease(&key).await);
            op["idempotency_key"] = json!(key);
        }
        let answer = c
            .send("POST", "/api/v2/captures/batch", Some(example.to_string()))
            .await;
        assert_eq!(answer.status, 200, "{name}: {answer:?}");
        let answer: BatchAnswer<Value> = decode(&name, &answer.json);
        assert!(answer.results.iter().all(|r| r.status == 200), "{name}");
    }
    // Release: with its own lease.
    for (name, body) in request_examples(&spec, "delete") {
        let key = format!("{}r", body["idempotency_key"].as_str().unwrap());
        let token = c.lease(&key).await;
        let answer = c
            .release(json!({ "idempotency_key": key, "lease_token": token }))
            .await;
        assert_eq!(answer.status, 200, "{name}: {answer:?}");
    }
    server.stop().await;
}
