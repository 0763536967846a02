//! The HTTP server under the router: hyper (through hyper-util's auto builder, HTTP/1.1 and
//! HTTP/2 with prior knowledge, as `axum::serve` runs it) with the two read time-outs
//! `axum::serve` has no setting for, so that a slow or silent client holds a connection for a
//! bounded time and never the others' service:
//!
//! - **the head** (`--header-read-timeout`): hyper's HTTP/1 header read time-out, from the
//!   moment the server waits for a request head (an idle keep-alive connection included) to
//!   its last header line; then the connection is closed without an answer (no request was
//!   read to answer). Before hyper knows the protocol, the first bytes (up to the 24 of the
//!   HTTP/2 preface) are under the same deadline ([`FirstBytes`]): hyper-util's version
//!   detection has none, and a client that connects and sends nothing would stay for ever.
//!   [`FirstBytes`] also reads those first bytes ahead, so that a new connection's request is
//!   read in one system call, not the detection's 24 bytes and then the rest.
//! - **the body** (`--body-read-timeout`): the whole body must arrive within this time from
//!   the head on ([`TimedBody`]); the body extractor then answers 408 (`request-timeout`)
//!   and the connection is closed.
//!
//! On Linux the listener is also set to accept a connection only once its first bytes have
//! arrived ([`defer_accept`]), as nginx's `deferred` and HAProxy's `defer-accept` do.
//!
//! HTTP/2 streams get the body time-out; hyper has no per-stream header time-out, so an
//! HTTP/2 client is trusted with its HEADERS frames (no gateway this backend serves speaks
//! HTTP/2 to it: Kong's calls are HTTP/1.1, and so are Envoy's unless the cluster is
//! configured otherwise).

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::body::{Bytes, HttpBody};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::service::Service as _;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};

/// The read time-outs of every connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// The request head (and the wait for it on an idle connection).
    pub header_read: Duration,
    /// The whole request body, from the head on.
    pub body_read: Duration,
}

/// Serves `router` on `listener` until `shutdown` resolves; then stops accepting and returns
/// once every connection has finished its requests in flight and closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    timeouts: Timeouts,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header_read);
    // Dead peers of an HTTP/2 connection are found by ping (hyper's own time-out for it).
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(timeouts.header_read);
    defer_accept(&listener);
    let graceful = GracefulShutdown::new();
    let app = TowerToHyperService::new(router);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let app = app.clone();
        let body_read = timeouts.body_read;
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            app.call(request.map(|body| TimedBody::new(body, body_read)))
        });
        let io = TokioIo::new(FirstBytes::new(stream, timeouts.header_read));
        let connection = builder.serve_connection(io, service).into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // A client that went away, sent garbage or timed out: its own business, not the
            // server's; nothing else to do with it.
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// How long the kernel holds a connection that has sent nothing before it hands it over
/// anyway (then [`FirstBytes`] applies): the value nginx and HAProxy set. The kernel counts
/// it in retransmissions of its SYN-ACK, so a silent client is accepted after about 3 s.
#[cfg(target_os = "linux")]
const DEFER_ACCEPT_SECONDS: libc::c_int = 1;

/// `TCP_DEFER_ACCEPT` on the listener: `accept` returns a connection once its first bytes are
/// there, not on the handshake's last ACK. Every gateway call on Kong is a new connection
/// (ngx_wasm_module keeps none alive), and without it each one costs a wake-up of its task
/// for the read that finds nothing yet: with it, 0.83 to 0.89 of the CPU per allocation and
/// 1.06 to 1.12 times the allocations per second with a new connection per request
/// (`bench/limits.md`). A connection that never sends anything is not the server's to hold
/// meanwhile. Where the option cannot be set, connections are accepted as before.
#[cfg(target_os = "linux")]
pub fn defer_accept(listener: &TcpListener) {
    use std::os::fd::AsRawFd;
    let seconds = DEFER_ACCEPT_SECONDS;
    // SAFETY: `setsockopt` reads `size_of::<c_int>()` bytes from a pointer to a live `c_int`,
    // on a descriptor the listener owns for the length of the call.
    let set = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&raw const seconds).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set != 0 {
        let error = io::Error::last_os_error();
        tracing::warn!(%error, "TCP_DEFER_ACCEPT not set: connections accepted on their handshake");
    }
}

/// Elsewhere, connections are accepted on their handshake.
#[cfg(not(target_os = "linux"))]
pub fn defer_accept(_listener: &TcpListener) {}

/// What `axum::serve` does after a failed accept: a connection-level error (the client gave
/// up before it was accepted) is ignored; anything else (out of file descriptors) is logged
/// and accepting pauses a second, rather than spinning on the error.
async fn accept_failed(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accepting a connection failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// The HTTP/2 connection preface: what hyper-util's version detection reads first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A connection whose first bytes must arrive within a deadline: until they show which
/// protocol it speaks (a byte that is not the HTTP/2 preface's, or the whole preface), a read
/// that finds nothing after the deadline fails with `TimedOut`, which ends the connection.
/// After that hyper's own time-outs apply and this is a plain pass-through.
///
/// Until then it also reads ahead: hyper-util's version detection asks for 24 bytes (the
/// preface's length), and hyper would then read the rest of the request in a second system
/// call. A read of up to [`FIRST_READ`] bytes takes the whole of a usual request at once (an
/// allocation's is about 200 bytes); what the detection did not take is handed to hyper's
/// next reads from here. One `recvfrom` per new connection fewer (bench/experiments.md).
pub struct FirstBytes<S> {
    inner: S,
    /// `None` once the protocol is known.
    deadline: Option<Pin<Box<Sleep>>>,
    /// How many bytes matched the HTTP/2 preface so far.
    matched: usize,
    /// Bytes read ahead and not handed over yet, from `given` on.
    ahead: Vec<u8>,
    given: usize,
}

/// How much the first read takes, into a buffer on the stack: a request head and a small
/// body. A larger request is read on by hyper itself, as without the read-ahead.
const FIRST_READ: usize = 4096;

impl<S> FirstBytes<S> {
    pub fn new(inner: S, limit: Duration) -> FirstBytes<S> {
        FirstBytes {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(limit))),
            matched: 0,
            ahead: Vec::new(),
            given: 0,
        }
    }

    /// Hands over as much of what was read ahead as `buf` takes; frees the buffer once all
    /// of it went.
    fn give(&mut self, buf: &mut ReadBuf<'_>) {
        let rest = self.ahead.get(self.given..).unwrap_or_default();
        let n = rest.len().min(buf.remaining());
        buf.put_slice(rest.get(..n).unwrap_or_default());
        self.given += n;
        if self.given == self.ahead.len() {
            self.ahead = Vec::new();
            self.given = 0;
        }
    }

    /// Looks at bytes just read: does the protocol show?
    fn saw(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if H2_PREFACE.get(self.matched) == Some(&b) {
                self.matched += 1;
                if self.matched == H2_PREFACE.len() {
                    self.deadline = None;
                    return;
                }
            } else {
                self.deadline = None;
                return;
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FirstBytes<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.given < this.ahead.len() {
            this.give(buf);
            return Poll::Ready(Ok(()));
        }
        if this.deadline.is_none() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        // On the stack: a read that finds nothing (the deadline's case) allocates nothing.
        let mut space = [0u8; FIRST_READ];
        let mut own = ReadBuf::new(&mut space);
        match Pin::new(&mut this.inner).poll_read(cx, &mut own) {
            Poll::Ready(Ok(())) => {
                let read = own.filled();
                this.saw(read);
                let (now, later) = read.split_at(read.len().min(buf.remaining()));
                buf.put_slice(now);
                // Kept only when the caller's buffer was too small for the read (hyper-util's
                // 24 bytes): one allocation of the rest, instead of a system call.
                if !later.is_empty() {
                    this.ahead = later.to_vec();
                    this.given = 0;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.deadline.as_mut().map(|d| d.as_mut().poll(cx)) {
                Some(Poll::Ready(())) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request within the header read time-out",
                ))),
                _ => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FirstBytes<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The error a [`TimedBody`] ends with when its deadline passes first.
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeout {
    pub limit: Duration,
}

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the request body did not arrive within {} ms",
            self.limit.as_millis()
        )
    }
}

impl StdError for BodyTimeout {}

/// The limit of the body time-out `error` (or one of its causes) is, if it is one: how the
/// body extractor tells a slow client (408) from a broken one (400).
pub fn body_timeout(error: &(dyn StdError + 'static)) -> Option<Duration> {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(timeout) = e.downcast_ref::<BodyTimeout>() {
            return Some(timeout.limit);
        }
        cause = e.source();
    }
    None
}

/// A request body that must end within `limit` of the request's head. The timer is made
/// when the body is first read (a request whose body is never read costs none), but counts
/// from the head. Size hints pass through, so a `Content-Length` over the body limit is
/// still refused before a byte is read.
pub struct TimedBody {
    inner: Incoming,
    deadline: Instant,
    limit: Duration,
    timer: Option<Pin<Box<Sleep>>>,
}

impl TimedBody {
    pub fn new(inner: Incoming, limit: Duration) -> TimedBody {
        TimedBody {
            inner,
            deadline: Instant::now() + limit,
            limit,
            timer: None,
        }
    }
}

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn StdError + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Some(Err(Box::new(BodyTimeout { limit: this.limit }))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_protocol_shows_at_the_first_byte_of_http1_or_the_whole_preface() {
        let fresh = || FirstBytes::new((), Duration::from_secs(1));
        let mut h1 = fresh();
        h1.saw(b"P");
        assert!(h1.deadline.is_some(), "P could still be the preface");
        h1.saw(b"OST / HTTP/1.1\r\n");
        assert!(h1.deadline.is_none());
        let mut h2 = fresh();
        h2.saw(&H2_PREFACE[..10]);
        assert!(h2.deadline.is_some());
        h2.saw(&H2_PREFACE[10..]);
        assert!(h2.deadline.is_none());
        assert_eq!(h2.matched, 24);
    }

    /// A peer whose bytes arrive in the given chunks, each returned by one read (as much of
    /// it as the reader's buffer takes); it counts the reads, the system calls of a socket.
    struct Peer {
        chunks: std::collections::VecDeque<Vec<u8>>,
        reads: usize,
    }

    impl Peer {
        fn new(chunks: &[&[u8]]) -> Peer {
            Peer {
                chunks: chunks.iter().map(|c| c.to_vec()).collect(),
                reads: 0,
            }
        }
    }

    impl AsyncRead for Peer {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            self.reads += 1;
            if let Some(mut chunk) = self.chunks.pop_front() {
                let n = chunk.len().min(buf.remaining());
                let rest = chunk.split_off(n);
                buf.put_slice(&chunk);
                if !rest.is_empty() {
                    self.chunks.push_front(rest);
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    /// What hyper-util and then hyper read: 24 bytes for the version, then reads of 8 KiB
    /// until the peer has nothing more (a read of 0 bytes).
    async fn read_as_hyper(first: &mut FirstBytes<Peer>) -> Vec<u8> {
        use tokio::io::AsyncReadExt as _;
        let mut got = vec![0u8; 24];
        let n = first.read(&mut got).await.unwrap();
        got.truncate(n);
        let mut buf = vec![0u8; 8192];
        loop {
            let n = first.read(&mut buf).await.unwrap();
            if n == 0 {
                return got;
            }
            got.extend_from_slice(&buf[..n]);
        }
    }

    #[tokio::test]
    async fn a_request_that_arrived_whole_is_read_from_the_socket_once() {
        let request = b"PUT /api/v2/captures HTTP/1.1\r\nhost: b\r\ncontent-type: application/json\r\ncontent-length: 33\r\nconnection: close\r\n\r\n{\"idempotency_key\":\"k-1234567\"}";
        let mut first = FirstBytes::new(Peer::new(&[request]), Duration::from_secs(1));
        let got = read_as_hyper(&mut first).await;
        assert_eq!(got, request);
        assert!(first.deadline.is_none(), "the protocol is known");
        // One read for the whole request, one that found the end; without the read-ahead,
        // one more between them.
        assert_eq!(first.inner.reads, 2);
        assert!(first.ahead.is_empty(), "nothing is kept once handed over");
    }

    #[tokio::test]
    async fn every_byte_passes_in_order_whatever_the_chunks() {
        let large: Vec<u8> = (0..3 * FIRST_READ).map(|i| b'a' + (i % 26) as u8).collect();
        let mut h2 = H2_PREFACE.to_vec();
        h2.extend_from_slice(b"\0\0\0\x04\0\0\0\0\0");
        let cases: [(&str, Vec<&[u8]>); 4] = [
            ("a request longer than the first read", vec![&large[..]]),
            ("the preface and a frame at once", vec![&h2[..]]),
            ("the preface in two reads", vec![&h2[..8], &h2[8..]]),
            (
                "a byte at a time at first",
                vec![&b"P"[..], &b"O"[..], &b"ST / HTTP/1.1\r\n\r\n"[..]],
            ),
        ];
        for (case, chunks) in cases {
            let whole = chunks.concat();
            let mut first = FirstBytes::new(Peer::new(&chunks), Duration::from_secs(1));
            assert_eq!(read_as_hyper(&mut first).await, whole, "{case}");
            assert!(first.deadline.is_none(), "{case}: the protocol is known");
            assert!(first.ahead.is_empty(), "{case}");
        }
    }

    /// What the kernel says of the listener after [`defer_accept`]: a period, where a plain
    /// listener has none.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_listener_defers_accepting_until_the_first_bytes() {
        use std::os::fd::AsRawFd;
        let deferral = |listener: &TcpListener| {
            let mut seconds: libc::c_int = -1;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: `getsockopt` writes at most `len` bytes to a live `c_int`.
            let got = unsafe {
                libc::getsockopt(
                    listener.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_DEFER_ACCEPT,
                    (&raw mut seconds).cast(),
                    &mut len,
                )
            };
            assert_eq!(got, 0, "{}", io::Error::last_os_error());
            seconds
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        assert_eq!(deferral(&listener), 0);
        defer_accept(&listener);
        assert!(deferral(&listener) >= DEFER_ACCEPT_SECONDS);
    }

    #[test]
    fn a_body_timeout_is_found_among_the_causes() {
        #[derive(Debug)]
        struct Wrapper(BodyTimeout);
        impl std::fmt::Display for Wrapper {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("wrapped")
            }
        }
        impl StdError for Wrapper {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let limit = Duration::from_millis(250);
        assert_eq!(body_timeout(&Wrapper(BodyTimeout { limit })), Some(limit));
        assert_eq!(body_timeout(&io::Error::other("no")), None);
    }
}
