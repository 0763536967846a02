//! The counting upstream: a real HTTP/1.1 server on loopback that stands for the API
//! behind the gateway. It counts executions (a request whose body it received whole)
//! per path and per request body, and answers what the test scripted for the path:
//! any status, headers (repeated names too), body (binary too), a delay, a chunked
//! (no Content-Length) reply, or no reply at all.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use tokio::net::TcpListener;

/// A scripted answer.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub delay: Duration,
    /// Send without Content-Length (chunked transfer encoding), in these pieces.
    pub chunked: Option<usize>,
    /// Never answer (for time-outs); the connection stays open.
    pub hang: bool,
    /// Announce the whole body's Content-Length, send this many bytes, then break the
    /// connection (an upstream that fails mid-response).
    pub truncate: Option<usize>,
}

impl Reply {
    pub fn new(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            delay: Duration::ZERO,
            chunked: None,
            hang: false,
            truncate: None,
        }
    }

    /// 200 with a text body.
    pub fn text(body: impl Into<String>) -> Reply {
        Reply::new(200)
            .header("content-type", "text/plain")
            .body(body.into().into_bytes())
    }

    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Reply {
        self.headers
            .push((name.to_ascii_lowercase(), value.as_ref().to_vec()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Reply {
        self.body = body.into();
        self
    }

    pub fn delay(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }

    /// Chunked transfer encoding, the body written in pieces of `piece` bytes.
    pub fn chunked(mut self, piece: usize) -> Reply {
        self.chunked = Some(piece.max(1));
        self
    }

    /// Sends Content-Length for the whole body but only its first `sent` bytes, then breaks
    /// the connection.
    pub fn truncate(mut self, sent: usize) -> Reply {
        self.truncate = Some(sent);
        self
    }

    pub fn hang() -> Reply {
        let mut r = Reply::new(200);
        r.hang = true;
        r
    }
}

/// A request the upstream executed.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// Lowercase names, repeats kept.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

#[derive(Default)]
struct State {
    replies: HashMap<String, Reply>,
    seen: Vec<Seen>,
    /// The path of every request whose head arrived, whether its body did or not.
    heads: Vec<String>,
    /// Paths whose answers wait for [`Upstream::release`].
    held: std::collections::HashSet<String>,
    /// The body of every answer, in order.
    answered: Vec<Vec<u8>>,
}

/// The counting upstream.
pub struct Upstream {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    gate: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    /// Starts on a free loopback port.
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the upstream");
        let addr = listener.local_addr().expect("upstream address");
        let state = Arc::new(Mutex::new(State::default()));
        let gate = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(serve(listener, state.clone(), gate.clone()));
        Upstream {
            addr,
            state,
            gate,
            task,
        }
    }

    /// Holds the answers for a path (query ignored), or for one method on it
    /// (`"POST /path"`): its requests are counted when their body is received, then wait
    /// until [`Upstream::release`] (with the same string).
    pub fn hold(&self, path: &str) {
        self.state.lock().unwrap().held.insert(path.to_string());
    }

    /// Lets the held requests of a path (and later ones) be answered.
    pub fn release(&self, path: &str) {
        self.state.lock().unwrap().held.remove(path);
        self.gate.notify_waiters();
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Scripts the answer for a path (without query), or for one method on it
    /// (`"PUT /path"`, which comes first); it stays until replaced. Other paths get
    /// `200 upstream <method> <path> #<n>`.
    pub fn reply(&self, path: &str, reply: Reply) {
        self.state
            .lock()
            .unwrap()
            .replies
            .insert(path.to_string(), reply);
    }

    /// Executions of a path (query ignored).
    pub fn count(&self, path: &str) -> usize {
        let state = self.state.lock().unwrap();
        state
            .seen
            .iter()
            .filter(|s| s.path.split('?').next() == Some(path))
            .count()
    }

    /// Requests of a path (query ignored) whose head arrived, including those whose body
    /// never did: what an upstream that acts on the headers alone would have executed.
    pub fn heads(&self, path: &str) -> usize {
        let state = self.state.lock().unwrap();
        state
            .heads
            .iter()
            .filter(|p| p.split('?').next() == Some(path))
            .count()
    }

    /// Executions with this exact request body.
    pub fn count_body(&self, body: &[u8]) -> usize {
        let state = self.state.lock().unwrap();
        state.seen.iter().filter(|s| s.body == body).count()
    }

    /// Every execution, in order.
    pub fn requests(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// The body of every answer sent (or begun), in order.
    pub fn response_bodies(&self) -> Vec<Vec<u8>> {
        self.state.lock().unwrap().answered.clone()
    }

    pub fn total(&self) -> usize {
        self.state.lock().unwrap().seen.len()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

async fn serve(listener: TcpListener, state: Arc<Mutex<State>>, gate: Arc<tokio::sync::Notify>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        let gate = gate.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req| handle(req, state.clone(), gate.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<Mutex<State>>,
    gate: Arc<tokio::sync::Notify>,
) -> Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    state.lock().unwrap().heads.push(
        parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default(),
    );
    let body = match body.collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(_) => return Ok(Response::new(empty())),
    };
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let bare = path.split('?').next().unwrap_or("").to_string();
    let reply = {
        let mut state = state.lock().unwrap();
        state.seen.push(Seen {
            method: parts.method.to_string(),
            path: path.clone(),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
                .collect(),
            body,
        });
        let n = state.seen.len();
        let reply = state
            .replies
            .get(&format!("{} {bare}", parts.method))
            .or_else(|| state.replies.get(&bare))
            .cloned()
            .unwrap_or_else(|| Reply::text(format!("upstream {} {} #{n}", parts.method, bare)));
        state.answered.push(reply.body.clone());
        reply
    };
    let with_method = format!("{} {bare}", parts.method);
    loop {
        let released = gate.notified();
        tokio::pin!(released);
        released.as_mut().enable();
        {
            let state = state.lock().unwrap();
            if !state.held.contains(&bare) && !state.held.contains(&with_method) {
                break;
            }
        }
        released.await;
    }
    if reply.hang {
        std::future::pending::<()>().await;
    }
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut builder = Response::builder().status(reply.status);
    for (k, v) in &reply.headers {
        builder = builder.header(k.as_str(), v.as_slice());
    }
    let body: Body = match (reply.truncate, reply.chunked) {
        (Some(sent), _) => {
            builder = builder.header("content-length", reply.body.len().to_string());
            let head = Bytes::copy_from_slice(reply.body.get(..sent).unwrap_or(&reply.body));
            http_body_util::StreamBody::new(Truncated {
                head: Some(head),
                pause: Box::pin(tokio::time::sleep(Duration::from_millis(50))),
            })
            .boxed()
        }
        (None, Some(piece)) => {
            let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = reply
                .body
                .chunks(piece)
                .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
                .collect();
            http_body_util::StreamBody::new(Iter(frames.into_iter())).boxed()
        }
        (None, None) => {
            builder = builder.header("content-length", reply.body.len().to_string());
            http_body_util::Full::new(Bytes::from(reply.body))
                .map_err(|never| match never {})
                .boxed()
        }
    };
    Ok(builder
        .body(body)
        .unwrap_or_else(|_| Response::new(empty())))
}

fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

/// The first bytes of a body, then (once they went out) an error: hyper breaks the
/// connection mid-body.
struct Truncated {
    head: Option<Bytes>,
    pause: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl futures_core::Stream for Truncated {
    type Item = Result<Frame<Bytes>, std::io::Error>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if let Some(head) = self.head.take() {
            return std::task::Poll::Ready(Some(Ok(Frame::data(head))));
        }
        // Pending a moment, so that the head and the first bytes are flushed.
        match self.pause.as_mut().poll(cx) {
            std::task::Poll::Pending => std::task::Poll::Pending,
            std::task::Poll::Ready(()) => {
                std::task::Poll::Ready(Some(Err(std::io::Error::other("upstream broke mid-body"))))
            }
        }
    }
}

/// An iterator as a stream (every item ready at once).
struct Iter<I>(I);

impl<I: Iterator + Unpin> futures_core::Stream for Iter<I> {
    type Item = I::Item;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<I::Item>> {
        std::task::Poll::Ready(self.0.next())
    }
}

/// A loopback address where nothing listens, for as long as the value lives: connections to
/// it are refused. The port stays bound (a socket that never listens, which refuses them as
/// a closed port does) so that nothing else can take it meanwhile: a listener bound and
/// dropped frees its port for the next `bind(…:0)`, and once the test host's own listener
/// got it, so that the host proxied to itself until its headers passed the limit (a 431 where
/// the test expected Envoy's 503).
pub struct DeadPort {
    _socket: tokio::net::TcpSocket,
    pub addr: SocketAddr,
}

impl DeadPort {
    pub fn new() -> DeadPort {
        // No SO_REUSEADDR: no other socket may bind the port while this one holds it.
        let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("a loopback port");
        let addr = socket.local_addr().expect("the bound address");
        DeadPort {
            _socket: socket,
            addr,
        }
    }
}

impl Default for DeadPort {
    fn default() -> DeadPort {
        DeadPort::new()
    }
}
