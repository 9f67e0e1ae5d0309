//! `GET /metrics` over HTTP/1.1, on its own port, for Prometheus to scrape.
//!
//! axum routes the request and hyper serves the connection. Two limits keep a slow or silent
//! client (slowloris) from holding a connection and its task open: hyper's header-read timeout,
//! and a deadline on the whole connection, which answers one request since keep-alive is off.
//! Prometheus opens a new connection per scrape then, which costs nothing at one scrape every
//! few seconds.

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;

use crate::Registry;

/// The content type of the Prometheus text exposition format, version 0.0.4.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How long one connection may take; a field of its own so that tests can shorten it.
#[derive(Clone, Copy, Debug)]
struct Timeouts {
    /// From accepting the connection to the end of the request head.
    header_read: Duration,
    /// From accepting the connection to the end of the response, whatever the client does:
    /// trickling a body, or not reading the response.
    request: Duration,
}

impl Timeouts {
    /// A scrape is one small request, sent at once; 10 s is Prometheus's own default
    /// `scrape_timeout`, after which it has given up on the answer anyway.
    const DEFAULT: Self = Self { header_read: Duration::from_secs(5), request: Duration::from_secs(10) };
}

/// Serves `registry` on `listener` until the task is dropped. Any path other than `/metrics`
/// gets 404; each connection answers one request.
pub async fn serve_metrics(listener: tokio::net::TcpListener, registry: Registry) {
    serve(listener, registry, Timeouts::DEFAULT).await;
}

async fn serve(listener: tokio::net::TcpListener, registry: Registry, timeouts: Timeouts) {
    let app = Router::new().route("/metrics", get(metrics)).with_state(registry);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(timeouts.header_read).keep_alive(false);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Mostly out of file descriptors: wait for some to be freed instead of spinning.
                tracing::debug!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        tokio::spawn(async move {
            // On expiry the connection is dropped, which closes the socket; hyper has already
            // closed it on a header-read timeout or an I/O error, which need no log line either.
            let _ = tokio::time::timeout(timeouts.request, connection).await;
        });
    }
}

async fn metrics(State(registry): State<Registry>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], registry.render())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// Longer than any timeout under test: reaching it means the server left the connection open.
    const PATIENCE: Duration = Duration::from_secs(5);

    async fn start(registry: Registry, timeouts: Timeouts) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, registry, timeouts));
        addr
    }

    fn registry() -> Registry {
        let registry = Registry::default();
        registry.counter("onehead_test_requests_total", "Requests.", &[("kind", "test")]).add(2.0);
        registry
    }

    /// Everything the server sends until it closes the connection (a reset counts as closed).
    async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return out,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Sends `request` and returns the status line, the header lines (lowercase) and the body.
    async fn exchange(addr: SocketAddr, request: &str) -> (String, Vec<String>, String) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let response = tokio::time::timeout(PATIENCE, read_until_closed(&mut stream))
            .await
            .expect("server kept the connection open after answering");
        let response = String::from_utf8(response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").expect("a response head");
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().to_owned();
        (status, lines.map(str::to_ascii_lowercase).collect(), body.to_owned())
    }

    fn get_request(target: &str) -> String {
        format!("GET {target} HTTP/1.1\r\nhost: localhost\r\n\r\n")
    }

    #[tokio::test]
    async fn metrics_answers_with_the_registry() {
        let registry = registry();
        let addr = start(registry.clone(), Timeouts::DEFAULT).await;
        for target in ["/metrics", "/metrics?name[]=onehead_test_requests_total"] {
            let (status, headers, body) = exchange(addr, &get_request(target)).await;
            assert_eq!(status, "HTTP/1.1 200 OK", "{target}");
            assert!(headers.contains(&format!("content-type: {CONTENT_TYPE}")), "{target}: {headers:?}");
            assert_eq!(body, registry.render(), "{target}");
            assert!(body.contains("onehead_test_requests_total{kind=\"test\"} 2\n"), "{body}");
        }
    }

    #[tokio::test]
    async fn other_paths_are_not_found() {
        let addr = start(registry(), Timeouts::DEFAULT).await;
        for target in ["/", "/metric", "/metricsx", "/metrics/x", "/health"] {
            let (status, _, body) = exchange(addr, &get_request(target)).await;
            assert_eq!(status, "HTTP/1.1 404 Not Found", "{target}");
            assert_eq!(body, "", "{target}");
        }
    }

    /// Connects, sends `sent` and nothing more, and returns how long the server took to close
    /// the connection and what it sent before; panics if it stays open for `PATIENCE`.
    async fn cut_off_after(addr: SocketAddr, sent: &str) -> (Duration, String) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let start = Instant::now();
        stream.write_all(sent.as_bytes()).await.unwrap();
        let response = tokio::time::timeout(PATIENCE, read_until_closed(&mut stream))
            .await
            .unwrap_or_else(|_| panic!("connection still open after {PATIENCE:?} with {sent:?} sent"));
        (start.elapsed(), String::from_utf8_lossy(&response).into_owned())
    }

    #[tokio::test]
    async fn header_timeout_cuts_off_silent_and_slow_clients() {
        let header_read = Duration::from_millis(300);
        let addr = start(registry(), Timeouts { header_read, request: Duration::from_secs(60) }).await;
        for sent in ["", "GET /metrics HTTP/1.1\r\nhost: loc"] {
            let (elapsed, response) = cut_off_after(addr, sent).await;
            assert!(elapsed >= header_read, "{sent:?}: closed after {elapsed:?}, before the timeout");
            assert!(!response.contains("200 OK"), "{sent:?}: {response}");
        }
    }

    #[tokio::test]
    async fn request_deadline_cuts_off_what_the_header_timeout_allows() {
        let request = Duration::from_millis(300);
        let addr = start(registry(), Timeouts { header_read: Duration::from_secs(60), request }).await;
        for sent in ["", "GET /metrics HTTP/1.1\r\nhost: loc"] {
            let (elapsed, response) = cut_off_after(addr, sent).await;
            assert!(elapsed >= request, "{sent:?}: closed after {elapsed:?}, before the deadline");
            assert_eq!(response, "", "{sent:?}");
        }
    }
}
