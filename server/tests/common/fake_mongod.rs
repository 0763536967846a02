//! A scripted MongoDB peer on loopback, for what a real server cannot be had for here: it
//! speaks the wire protocol the driver speaks (OP_MSG, opcode 2013), answers the handshake
//! (`hello`) with the wire version a test chooses, and answers every other command with what
//! the test's script returns. It records each command it received, so that a test can check
//! what the store sends (filters, collations, write concern) through the real driver.
//!
//! It is not a MongoDB: it evaluates no filter or pipeline. What it proves is the driver and
//! the store's handling of the answers a test scripts (as documented for MongoDB), and the
//! exact commands the store sends.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use mongodb::bson::{Bson, DateTime, Document, doc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The wire version of MongoDB 4.2 (the driver needs 9, MongoDB 4.4).
pub const WIRE_4_2: i32 = 8;
/// The wire version of MongoDB 6.0.
pub const WIRE_6_0: i32 = 17;

const OP_MSG: i32 = 2013;

/// What the script answers to one command (its name and its body, document sequences folded
/// in as arrays).
pub type Script = dyn Fn(&str, &Document) -> Document + Send + Sync;

pub struct FakeMongod {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Document>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeMongod {
    pub async fn start(
        wire_version: i32,
        script: impl Fn(&str, &Document) -> Document + Send + Sync + 'static,
    ) -> FakeMongod {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Script> = Arc::new(script);
        let task = {
            let received = received.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (received, script) = (received.clone(), script.clone());
                    tokio::spawn(serve(stream, wire_version, received, script));
                }
            })
        };
        FakeMongod {
            addr,
            received,
            task,
        }
    }

    pub fn uri(&self) -> String {
        // One host, no replica set: the driver sees a standalone (no retryable writes).
        format!("mongodb://{}/?directConnection=true", self.addr)
    }

    /// Every command received but the handshakes, in order.
    pub fn commands(&self) -> Vec<Document> {
        self.received.lock().unwrap().clone()
    }

    /// The bodies of the commands named `name`.
    pub fn named(&self, name: &str) -> Vec<Document> {
        self.commands()
            .into_iter()
            .filter(|c| c.keys().next().map(String::as_str) == Some(name))
            .collect()
    }
}

impl Drop for FakeMongod {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `{ok: 1}` plus `fields`.
pub fn ok(fields: Document) -> Document {
    let mut reply = doc! { "ok": 1.0 };
    reply.extend(fields);
    reply
}

/// A command error as a server sends it.
pub fn error(code: i32, name: &str, message: &str) -> Document {
    doc! { "ok": 0.0, "code": code, "codeName": name, "errmsg": message }
}

/// A cursor that holds everything in its first batch.
pub fn cursor(ns: &str, batch: Vec<Document>) -> Document {
    ok(doc! { "cursor": { "id": 0_i64, "ns": ns, "firstBatch": batch } })
}

fn hello(wire_version: i32) -> Document {
    ok(doc! {
        "helloOk": true,
        "isWritablePrimary": true,
        "ismaster": true,
        "maxBsonObjectSize": 16 * 1024 * 1024,
        "maxMessageSizeBytes": 48_000_000,
        "maxWriteBatchSize": 100_000,
        "localTime": DateTime::now(),
        "logicalSessionTimeoutMinutes": 30,
        "connectionId": 1,
        "minWireVersion": 0,
        "maxWireVersion": wire_version,
    })
}

async fn serve(
    mut stream: TcpStream,
    wire_version: i32,
    received: Arc<Mutex<Vec<Document>>>,
    script: Arc<Script>,
) {
    loop {
        let mut header = [0u8; 16];
        if stream.read_exact(&mut header).await.is_err() {
            return;
        }
        let int = |at: usize| i32::from_le_bytes(header[at..at + 4].try_into().unwrap());
        let (length, request_id, op_code) = (int(0), int(4), int(12));
        let mut message = vec![0u8; usize::try_from(length).unwrap() - 16];
        if stream.read_exact(&mut message).await.is_err() {
            return;
        }
        assert_eq!(op_code, OP_MSG, "the driver speaks OP_MSG only");
        let body = parse_op_msg(&message);
        let name = body.keys().next().cloned().unwrap_or_default();
        let reply = if name == "hello" || name.eq_ignore_ascii_case("ismaster") {
            hello(wire_version)
        } else {
            received.lock().unwrap().push(body.clone());
            script(&name, &body)
        };
        let bytes = reply.to_vec().unwrap();
        let mut out = Vec::with_capacity(bytes.len() + 21);
        let total = i32::try_from(16 + 4 + 1 + bytes.len()).unwrap();
        out.extend_from_slice(&total.to_le_bytes());
        out.extend_from_slice(&request_id.wrapping_add(1_000_000).to_le_bytes());
        out.extend_from_slice(&request_id.to_le_bytes());
        out.extend_from_slice(&OP_MSG.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.push(0);
        out.extend_from_slice(&bytes);
        if stream.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// An OP_MSG's body (section kind 0) with its document sequences (kind 1) added as arrays.
fn parse_op_msg(message: &[u8]) -> Document {
    let flags = u32::from_le_bytes(message[0..4].try_into().unwrap());
    // A checksum (flag bit 0) takes the last four bytes.
    let end = if flags & 1 == 1 {
        message.len() - 4
    } else {
        message.len()
    };
    let mut at = 4;
    let mut body = Document::new();
    let mut sequences = Vec::new();
    let size = |at: usize| {
        usize::try_from(i32::from_le_bytes(message[at..at + 4].try_into().unwrap())).unwrap()
    };
    while at < end {
        let kind = message[at];
        at += 1;
        match kind {
            0 => {
                let length = size(at);
                body = Document::from_reader(&message[at..at + length]).unwrap();
                at += length;
            }
            1 => {
                let length = size(at);
                let section = &message[at + 4..at + length];
                let nul = section.iter().position(|b| *b == 0).unwrap();
                let identifier = String::from_utf8(section[..nul].to_vec()).unwrap();
                let mut documents = Vec::new();
                let mut offset = nul + 1;
                while offset < section.len() {
                    let doc_length = usize::try_from(i32::from_le_bytes(
                        section[offset..offset + 4].try_into().unwrap(),
                    ))
                    .unwrap();
                    documents.push(Bson::Document(
                        Document::from_reader(&section[offset..offset + doc_length]).unwrap(),
                    ));
                    offset += doc_length;
                }
                sequences.push((identifier, documents));
                at += length;
            }
            other => panic!("OP_MSG section kind {other}"),
        }
    }
    for (identifier, documents) in sequences {
        body.insert(identifier, documents);
    }
    body
}
