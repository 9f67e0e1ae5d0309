//! What every onehead gRPC port does below the services: how connections are accepted and
//! closed, and how an oversized message is reported. The router's public port and the worker's
//! port both serve through [`incoming`] and [`oversized_is_resource_exhausted`].
//!
//! tonic alone leaves three holes that a hostile or broken client can use:
//! - its accept loop retries a failed `accept` at once, so when the process is out of file
//!   descriptors (`EMFILE`) it spins at full CPU; [`incoming`] waits before the next try;
//! - a connection that sends nothing is held forever, descriptor and task included;
//!   [`Guarded`] closes one that has sent no byte by `handshake` after accept, or that has moved
//!   no byte either way for `idle` (in-flight streams move bytes: tokens, health checks);
//! - a message over the size limit is answered `OUT_OF_RANGE`, where gRPC specifies
//!   `RESOURCE_EXHAUSTED`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// How long a connection may stay silent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// From accept to the client's first byte (the HTTP/2 preface, or the TLS hello).
    pub handshake: Duration,
    /// No byte read or written for this long closes the connection. A client's channel
    /// reconnects on its next call, as after any closed connection.
    pub idle: Duration,
}

impl ConnectionLimits {
    /// 10 s for a first byte, which a real client sends at once; 5 minutes idle, well above the
    /// router's stream-silence limit, so a connection carrying a live stream is never idle.
    pub const DEFAULT: Self = Self { handshake: Duration::from_secs(10), idle: Duration::from_secs(300) };

    /// The limits as both servers' flags give them: `--handshake-timeout-secs` and
    /// `--idle-connection-timeout-secs`.
    pub fn from_flags(handshake_secs: f64, idle_secs: f64) -> Result<Self, String> {
        Ok(ConnectionLimits {
            handshake: positive_secs("--handshake-timeout-secs", handshake_secs)?,
            idle: positive_secs("--idle-connection-timeout-secs", idle_secs)?,
        })
    }
}

/// A flag's seconds as a duration; zero, negative and non-finite values are refused, naming the
/// flag. The servers' time limits are all given this way.
pub fn positive_secs(flag: &str, secs: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{flag}: expected a positive number of seconds, got {secs}"))
}

/// After a failed accept (mostly `EMFILE`: out of descriptors), the wait before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The connections `listener` accepts, with TCP_NODELAY (without it, small stream messages wait
/// for delayed ACKs: about 40 ms a token on Linux), each closed by `limits`. A failed accept is
/// logged and retried after a pause; the stream never yields an error.
pub fn incoming(listener: TcpListener, limits: ConnectionLimits) -> Incoming {
    Incoming { listener, limits, backoff: None, failures: 0 }
}

/// See [`incoming`].
#[derive(Debug)]
pub struct Incoming {
    listener: TcpListener,
    limits: ConnectionLimits,
    backoff: Option<Pin<Box<Sleep>>>,
    /// Accepts failed in a row: logged at the first and every 100th, not 10 lines a second.
    failures: u64,
}

impl Stream for Incoming {
    type Item = io::Result<Guarded>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(backoff) = &mut self.backoff {
                ready!(backoff.as_mut().poll(cx));
                self.backoff = None;
            }
            match ready!(self.listener.poll_accept(cx)) {
                Ok((stream, _)) => {
                    if self.failures > 0 {
                        tracing::info!(failures = self.failures, "accepting again");
                        self.failures = 0;
                    }
                    // Without NODELAY the connection still works, only slower; nothing to refuse.
                    let _ = stream.set_nodelay(true);
                    return Poll::Ready(Some(Ok(Guarded::new(stream, self.limits))));
                }
                Err(e) => {
                    if self.failures.is_multiple_of(100) {
                        tracing::warn!(error = %e, failures = self.failures + 1, "accept failed; retrying every {ACCEPT_BACKOFF:?}");
                    }
                    self.failures += 1;
                    self.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                }
            }
        }
    }
}

/// An accepted connection that fails its reads with `TimedOut` once it has been silent too long
/// (see [`ConnectionLimits`]); hyper then closes it.
#[derive(Debug)]
pub struct Guarded {
    stream: TcpStream,
    limits: ConnectionLimits,
    /// The client has sent a byte.
    greeted: bool,
    /// Accept, then the last byte read or written.
    last_activity: Instant,
    timer: Pin<Box<Sleep>>,
}

impl Guarded {
    fn new(stream: TcpStream, limits: ConnectionLimits) -> Self {
        let now = Instant::now();
        Guarded {
            stream,
            limits,
            greeted: false,
            last_activity: now,
            timer: Box::pin(tokio::time::sleep(limits.handshake)),
        }
    }

    fn deadline(&self) -> Instant {
        self.last_activity + if self.greeted { self.limits.idle } else { self.limits.handshake }
    }

    /// `Ready(error)` once the connection has been silent past its deadline; otherwise arms the
    /// timer for the deadline, so that the pending read is woken then.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            let deadline = self.deadline();
            if Instant::now() >= deadline {
                let what = if self.greeted { "idle" } else { "silent since accept" };
                let limit = if self.greeted { self.limits.idle } else { self.limits.handshake };
                return Poll::Ready(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connection closed: {what} for {limit:?}"),
                ));
            }
            if self.timer.deadline() != deadline {
                self.timer.as_mut().reset(deadline);
            }
            ready!(self.timer.as_mut().poll(cx));
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    self.greeted = true;
                    self.last_activity = Instant::now();
                }
                Poll::Ready(result)
            }
            Poll::Pending => self.poll_expired(cx).map(Err),
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let written = ready!(Pin::new(&mut self.stream).poll_write(cx, data));
        // The server's own first bytes (its HTTP/2 settings) do not greet it; once the client
        // has, answers count as activity like requests do.
        if self.greeted && matches!(written, Ok(n) if n > 0) {
            self.last_activity = Instant::now();
        }
        Poll::Ready(written)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = ready!(Pin::new(&mut self.stream).poll_write_vectored(cx, bufs));
        if self.greeted && matches!(written, Ok(n) if n > 0) {
            self.last_activity = Instant::now();
        }
        Poll::Ready(written)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl Connected for Guarded {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

/// tonic answers a request message over the size limit with `OUT_OF_RANGE`; gRPC's status-code
/// table says `RESOURCE_EXHAUSTED`, which is what clients retry-or-not on. Rewrites the status of
/// such a response, keeping its message (which names the size and the limit). For
/// `Server::builder().layer(tower::util::MapResponseLayer::new(oversized_is_resource_exhausted))`.
pub fn oversized_is_resource_exhausted<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    if let Some(status) = tonic::Status::from_header_map(headers)
        && status.code() == tonic::Code::OutOfRange
        && status.message().contains("message length too large")
    {
        headers.insert("grpc-status", http::HeaderValue::from(tonic::Code::ResourceExhausted as i32));
    }
    response
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn pair(limits: ConnectionLimits) -> (TcpStream, Guarded) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let mut incoming = incoming(listener, limits);
        let server = tokio_stream::StreamExt::next(&mut incoming).await.unwrap().unwrap();
        (client, server)
    }

    /// Timer deadlines are kept to the millisecond.
    fn assert_about(elapsed: Duration, expected: Duration) {
        assert!(elapsed >= expected && elapsed <= expected + Duration::from_millis(2), "{elapsed:?}, not {expected:?}");
    }

    const SHORT: ConnectionLimits =
        ConnectionLimits { handshake: Duration::from_millis(100), idle: Duration::from_millis(300) };

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_never_speaks_times_out_after_the_handshake_limit() {
        let (_client, mut server) = pair(SHORT).await;
        let started = Instant::now();
        let err = server.read(&mut [0; 8]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("silent since accept"), "{err}");
        assert_about(started.elapsed(), SHORT.handshake);
    }

    #[tokio::test(start_paused = true)]
    async fn traffic_either_way_keeps_a_connection_open_and_silence_closes_it() {
        let (mut client, server) = pair(SHORT).await;
        client.write_all(b"hi").await.unwrap();
        let (mut reader, mut writer) = tokio::io::split(server);
        let mut buf = [0; 2];
        reader.read_exact(&mut buf).await.unwrap();
        // While a read waits, the server writes every 200 ms (under the 300 ms idle limit), as
        // a stream of tokens does: the connection stays open; the idle limit runs from the last.
        let started = Instant::now();
        let writes = async {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                writer.write_all(b"t").await.unwrap();
            }
        };
        let (read, ()) = tokio::join!(reader.read(&mut buf), writes);
        let err = read.unwrap_err();
        assert!(err.to_string().contains("idle for 300ms"), "{err}");
        assert_about(started.elapsed(), Duration::from_millis(5 * 200 + 300));
    }

    #[tokio::test(start_paused = true)]
    async fn the_servers_own_greeting_does_not_count_as_the_clients() {
        let (_client, mut server) = pair(SHORT).await;
        server.write_all(b"settings").await.unwrap();
        let started = Instant::now();
        assert!(server.read(&mut [0; 8]).await.is_err());
        assert_about(started.elapsed(), SHORT.handshake);
    }

    #[test]
    fn only_the_oversized_message_status_is_rewritten() {
        let response = |status: tonic::Status| {
            let mut r = http::Response::new(());
            status.add_header(r.headers_mut()).unwrap();
            oversized_is_resource_exhausted(r)
        };
        let oversized = tonic::Status::out_of_range(
            "Error, decoded message length too large: found 5000000 bytes, the limit is: 4194304 bytes",
        );
        let r = response(oversized);
        let status = tonic::Status::from_header_map(r.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("found 5000000 bytes"), "{}", status.message());
        let other = response(tonic::Status::out_of_range("top_n_logprobs: 30 is over 20"));
        assert_eq!(tonic::Status::from_header_map(other.headers()).unwrap().code(), tonic::Code::OutOfRange);
        let ok = oversized_is_resource_exhausted(http::Response::new(()));
        assert!(ok.headers().is_empty());
    }
}
