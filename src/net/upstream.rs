//! Dialling upstream servers: TCP with a deadline, and (when configured) TLS verified against
//! the listener's CA and server name (verify-full).

use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::stream::Stream;
use super::tls::{TlsError, load_roots, provider};
use crate::config::UpstreamTls;

/// Why the upstream could not be reached. Never shown to clients (they see the listener name).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// TCP connect failed or timed out.
    #[error("connect to upstream failed: {0}")]
    Connect(std::io::Error),
    /// The deadline passed.
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    /// TLS to the upstream failed (verification or handshake).
    #[error("TLS to upstream failed: {0}")]
    Tls(std::io::Error),
    /// The upstream refused TLS.
    #[error("upstream refused TLS")]
    TlsRefused,
    /// The upstream broke the protocol.
    #[error("upstream protocol error: {0}")]
    Protocol(String),
    /// The upstream refused the runtime credentials or the session.
    #[error("upstream refused the login: {0}")]
    Refused(String),
}

/// A verified TLS client towards one upstream.
#[derive(Clone)]
pub struct UpstreamTlsClient {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for UpstreamTlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UpstreamTlsClient({:?})", self.server_name)
    }
}

impl UpstreamTlsClient {
    /// Builds the client from `upstream_tls` (CA file + server name).
    pub fn new(cfg: &UpstreamTls, alpn: Option<&[u8]>) -> Result<UpstreamTlsClient, TlsError> {
        let roots = load_roots(&cfg.ca)?;
        let mut cc = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        if let Some(a) = alpn {
            cc.alpn_protocols = vec![a.to_vec()];
        }
        let server_name = ServerName::try_from(cfg.server_name.clone())
            .map_err(|e| TlsError::File { path: "upstream_tls.server_name".into(), msg: e.to_string() })?;
        Ok(UpstreamTlsClient { connector: TlsConnector::from(Arc::new(cc)), server_name })
    }

    /// TLS handshake over an open TCP connection.
    pub async fn connect(&self, tcp: TcpStream) -> Result<Stream, UpstreamError> {
        let s = self.connector.connect(self.server_name.clone(), tcp).await.map_err(UpstreamError::Tls)?;
        Ok(Stream::Client(Box::new(s)))
    }
}

/// Dials `addr` (`host:port`) with a deadline; TCP_NODELAY on.
pub async fn dial(addr: &str, deadline: Duration) -> Result<TcpStream, UpstreamError> {
    let tcp = tokio::time::timeout(deadline, TcpStream::connect(addr))
        .await
        .map_err(|_| UpstreamError::Timeout(deadline))?
        .map_err(UpstreamError::Connect)?;
    let _ = tcp.set_nodelay(true);
    super::set_keepalive(&tcp);
    Ok(tcp)
}
