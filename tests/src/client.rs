//! A small HTTP/1.1 client for tests: it returns the status, the reason phrase, every
//! header with repeated names kept (in order per name) and the body bytes. It can also
//! send a request and go away before the answer (a client disconnect).

use std::net::SocketAddr;

use anyhow::{Result, anyhow};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// What a client saw.
#[derive(Clone, Debug)]
pub struct ClientResponse {
    pub status: u16,
    /// The reason phrase as sent (may be empty).
    pub reason: String,
    /// Lowercase names; a repeated name keeps every value.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl ClientResponse {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of a header, in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A request being built.
#[derive(Clone, Debug)]
pub struct ClientRequest {
    addr: SocketAddr,
    method: String,
    path: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    /// Send the body with `Transfer-Encoding: chunked`, in pieces of this size.
    chunked: Option<usize>,
}

impl ClientRequest {
    /// Sends the body with `Transfer-Encoding: chunked` (no Content-Length), written in
    /// pieces of `piece` bytes; an empty body is then the last chunk alone.
    pub fn chunked(mut self, piece: usize) -> Self {
        self.chunked = Some(piece.max(1));
        self
    }

    pub fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers
            .push((name.to_string(), value.into().into_bytes()));
        self
    }

    /// A header whose value is raw bytes (not necessarily UTF-8: obs-text).
    pub fn header_bytes(mut self, name: &str, value: &[u8]) -> Self {
        self.headers.push((name.to_string(), value.to_vec()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Sends it on a new connection and reads the whole response.
    pub async fn send(self) -> Result<ClientResponse> {
        let stream = TcpStream::connect(self.addr).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        let _conn = Closer::spawn(conn);
        let mut builder = hyper::Request::builder()
            .method(self.method.as_str())
            .uri(self.path.as_str());
        if !self
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("host"))
        {
            builder = builder.header("host", self.addr.to_string());
        }
        for (k, v) in &self.headers {
            builder = builder.header(k.as_str(), hyper::header::HeaderValue::from_bytes(v)?);
        }
        let body: BoxBody<Bytes, std::convert::Infallible> = match self.chunked {
            None => Full::new(Bytes::from(self.body)).boxed(),
            Some(piece) => {
                builder = builder.header("transfer-encoding", "chunked");
                let frames: std::collections::VecDeque<Bytes> = self
                    .body
                    .chunks(piece)
                    .map(Bytes::copy_from_slice)
                    .collect();
                StreamBody::new(Pieces(frames)).boxed()
            }
        };
        let request = builder.body(body)?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let reason = match response.extensions().get::<hyper::ext::ReasonPhrase>() {
            Some(r) => String::from_utf8_lossy(r.as_bytes()).into_owned(),
            None => status.canonical_reason().unwrap_or("").to_string(),
        };
        let headers = response
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| anyhow!("reading the response body: {e}"))?
            .to_bytes()
            .to_vec();
        Ok(ClientResponse {
            status: status.as_u16(),
            reason,
            headers,
            body,
        })
    }

    /// Sends the request bytes and closes the connection at once (the client goes
    /// away before the answer).
    pub async fn send_and_disconnect(self) -> Result<()> {
        drop(self.send_and_hold().await?);
        Ok(())
    }

    /// Sends the request bytes and keeps the connection open without reading the answer;
    /// dropping the returned connection closes it (the client goes away when the test says).
    pub async fn send_and_hold(self) -> Result<HeldConnection> {
        let mut stream = TcpStream::connect(self.addr).await?;
        let mut bytes = format!(
            "{} {} HTTP/1.1\r\nhost: {}\r\n",
            self.method, self.path, self.addr
        )
        .into_bytes();
        for (k, v) in &self.headers {
            bytes.extend_from_slice(k.as_bytes());
            bytes.extend_from_slice(b": ");
            bytes.extend_from_slice(v);
            bytes.extend_from_slice(b"\r\n");
        }
        bytes.extend_from_slice(format!("content-length: {}\r\n\r\n", self.body.len()).as_bytes());
        bytes.extend_from_slice(&self.body);
        stream.write_all(&bytes).await?;
        stream.flush().await?;
        Ok(HeldConnection(stream))
    }
}

/// A connection whose request was sent and whose answer is never read; dropping it closes
/// the connection.
pub struct HeldConnection(#[allow(dead_code)] TcpStream);

/// A client of one host (or any HTTP/1.1 server).
#[derive(Clone, Debug)]
pub struct Client {
    addr: SocketAddr,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Client {
        Client { addr }
    }

    pub fn request(&self, method: &str, path: &str) -> ClientRequest {
        ClientRequest {
            addr: self.addr,
            method: method.to_string(),
            path: path.to_string(),
            headers: Vec::new(),
            body: Vec::new(),
            chunked: None,
        }
    }

    pub async fn get(&self, path: &str) -> Result<ClientResponse> {
        self.request("GET", path).send().await
    }

    pub async fn post(&self, path: &str, body: impl Into<Vec<u8>>) -> Result<ClientResponse> {
        self.request("POST", path).body(body).send().await
    }
}

/// Body pieces as a stream of frames (each ready at once).
struct Pieces(std::collections::VecDeque<Bytes>);

impl futures_core::Stream for Pieces {
    type Item = Result<hyper::body::Frame<Bytes>, std::convert::Infallible>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::task::Poll::Ready(self.0.pop_front().map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// Drives a hyper client connection and closes it when dropped: held for an exchange's
/// scope, it ends the connection once the exchange is over, whichever way it ends (a
/// time-out included), however long the server would keep it alive. No socket of the test
/// host outlives its exchange (ngx closes each call's connection; Envoy would pool it).
pub struct Closer(tokio::task::JoinHandle<()>);

impl Closer {
    pub fn spawn<F>(conn: F) -> Closer
    where
        F: std::future::Future + Send + 'static,
    {
        Closer(tokio::spawn(async move {
            let _ = conn.await;
        }))
    }
}

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.abort();
    }
}
