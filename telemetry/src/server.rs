//! `GET /metrics` over plain HTTP/1.1, on its own port, for Prometheus to scrape.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Registry;

/// Serves `registry` on `listener` until the task is dropped. Any path other than `/metrics`
/// gets 404; each connection answers one request.
pub async fn serve_metrics(listener: tokio::net::TcpListener, registry: Registry) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else { continue };
        let registry = registry.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut read = 0;
            // Read until the end of the request head (or a full buffer).
            while read < buf.len() {
                match socket.read(&mut buf[read..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => read += n,
                }
                if buf[..read].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..read]);
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let response = if head.starts_with("GET ") && (path == "/metrics" || path.starts_with("/metrics?")) {
                let body = registry.render();
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_owned()
            };
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}
