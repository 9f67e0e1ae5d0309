//! The HTTP port's connections, as the gRPC port's: accepted through `serving::incoming` (a
//! pause after a failed accept; closed when silent past `--handshake-timeout-secs` after accept
//! or `--idle-connection-timeout-secs` later), and with `--tls-cert`/`--tls-key` over TLS with the
//! gRPC port's certificate. TLS handshakes run in tasks of their own, each bounded by the
//! handshake timeout, so a slow client holds up no other connection.

use std::net::SocketAddr;
use std::sync::Arc;

use onehead_proto::serving::{self, ConnectionLimits, Guarded};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::server::TlsStream;
use tokio_stream::StreamExt;
use tonic::transport::server::Connected;

/// The acceptor for a PEM certificate chain and private key, offering HTTP/1.1.
pub fn acceptor(cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<TlsAcceptor> {
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("--tls-cert: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| anyhow::anyhow!("--tls-key: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| anyhow::anyhow!("--tls-cert/--tls-key: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Plain connections, guarded, for `axum::serve`.
pub struct PlainListener {
    local: SocketAddr,
    incoming: serving::Incoming,
}

impl PlainListener {
    pub fn new(listener: TcpListener, limits: ConnectionLimits) -> std::io::Result<Self> {
        Ok(PlainListener { local: listener.local_addr()?, incoming: serving::incoming(listener, limits) })
    }
}

/// The next guarded connection and its peer (`incoming` never yields an error, nor ends).
async fn next(incoming: &mut serving::Incoming, local: SocketAddr) -> (Guarded, SocketAddr) {
    loop {
        match incoming.next().await {
            Some(Ok(connection)) => {
                let peer = connection.connect_info().remote_addr().unwrap_or(local);
                return (connection, peer);
            }
            Some(Err(_)) => continue,
            None => std::future::pending().await,
        }
    }
}

impl axum::serve::Listener for PlainListener {
    type Io = Guarded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        next(&mut self.incoming, self.local).await
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// TLS connections, guarded and handshaken, for `axum::serve`.
pub struct TlsListener {
    local: SocketAddr,
    connections: mpsc::Receiver<(TlsStream<Guarded>, SocketAddr)>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, acceptor: TlsAcceptor, limits: ConnectionLimits) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let mut incoming = serving::incoming(listener, limits);
        let handshake = limits.handshake;
        let (tx, connections) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    accepted = next(&mut incoming, local) => accepted,
                    // axum stopped serving: stop accepting.
                    () = tx.closed() => return,
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { local, connections })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<Guarded>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.connections.recv().await {
            Some(connection) => connection,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}
