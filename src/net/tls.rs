//! Server-side TLS: the rustls configuration, built once per certificate generation and
//! swapped whole on reload (SIGHUP or a change of the files' content, which also catches the
//! symlink swap of Kubernetes Secret volumes). Each connection snapshots the generation it is
//! served with, so channel binding always uses the certificate that connection saw.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use sha2::Digest;

use crate::config::{ClientAuth, TlsConfig, TlsMinVersion};

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or parsed.
    #[error("{path}: {msg}")]
    File {
        /// Which file.
        path: String,
        /// What went wrong.
        msg: String,
    },
    /// rustls refused the combination.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn file_err(p: &Path, msg: impl std::fmt::Display) -> TlsError {
    TlsError::File { path: p.display().to_string(), msg: msg.to_string() }
}

/// Reads a PEM certificate chain.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no certificate found"));
    }
    Ok(certs)
}

/// Reads a PEM private key.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_err(path, e))
}

/// Reads a PEM CA bundle into a root store.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(path)? {
        roots.add(c).map_err(|e| file_err(path, e))?;
    }
    Ok(roots)
}

/// The crypto provider: ring, with the TLS 1.2 suites limited to ECDHE + AEAD.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.retain(|s| match s {
        rustls::SupportedCipherSuite::Tls13(_) => true,
        rustls::SupportedCipherSuite::Tls12(s) => {
            let name = format!("{:?}", s.common.suite);
            name.contains("ECDHE") && (name.contains("GCM") || name.contains("CHACHA20_POLY1305"))
        }
    });
    Arc::new(p)
}

/// The `tls-server-end-point` channel-binding data (RFC 5929): the hash of the leaf
/// certificate with its signature's hash function (SHA-256 for MD5/SHA-1/unknown).
pub fn server_end_point(cert: &CertificateDer<'_>) -> Vec<u8> {
    let oid = x509_parser::parse_x509_certificate(cert.as_ref())
        .map(|(_, c)| c.signature_algorithm.algorithm.to_id_string())
        .unwrap_or_default();
    match oid.as_str() {
        // ecdsa-with-SHA384, sha384WithRSAEncryption, RSASSA-PSS is treated as SHA-256
        "1.2.840.10045.4.3.3" | "1.2.840.113549.1.1.12" => sha2::Sha384::digest(cert.as_ref()).to_vec(),
        "1.2.840.10045.4.3.4" | "1.2.840.113549.1.1.13" => sha2::Sha512::digest(cert.as_ref()).to_vec(),
        _ => sha2::Sha256::digest(cert.as_ref()).to_vec(),
    }
}

/// notAfter of a certificate, Unix seconds.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    x509_parser::parse_x509_certificate(cert.as_ref()).ok().map(|(_, c)| c.validity().not_after.timestamp())
}

/// One generation of server TLS material.
#[derive(Debug)]
pub struct Served {
    /// For Postgres listeners (ALPN `postgresql` when the client offers ALPN).
    pub postgres: Arc<ServerConfig>,
    /// For protocols without ALPN.
    pub plain: Arc<ServerConfig>,
    /// Channel-binding data of the served leaf certificate.
    pub end_point: Vec<u8>,
    /// notAfter of the served leaf, Unix seconds.
    pub not_after: Option<i64>,
    /// A secret derived from the private key (stable across restarts, changes with the key):
    /// keys the mock SCRAM salts of unknown users.
    pub mock_secret: [u8; 32],
    /// Content hash of the files, to notice changes.
    fingerprint: Vec<u8>,
}

fn fingerprint(cfg: &TlsConfig) -> Vec<u8> {
    let mut h = sha2::Sha256::new();
    for p in [Some(&cfg.cert), Some(&cfg.key), cfg.client_ca.as_ref()].into_iter().flatten() {
        // An unreadable file hashes as empty: the load that follows reports the error.
        h.update(std::fs::read(p).unwrap_or_default());
        h.update([0u8]);
    }
    h.finalize().to_vec()
}

impl Served {
    /// Builds the rustls configs from the files named in `cfg`.
    pub fn load(cfg: &TlsConfig) -> Result<Served, TlsError> {
        let fingerprint = fingerprint(cfg);
        let certs = load_certs(&cfg.cert)?;
        let key = load_key(&cfg.key)?;
        let mock_secret: [u8; 32] = {
            let mut h = sha2::Sha256::new();
            h.update(b"portcullis mock SCRAM salt v1\0");
            h.update(key.secret_der());
            h.finalize().into()
        };
        let end_point = server_end_point(&certs[0]);
        let not_after = not_after(&certs[0]);
        let provider = provider();
        let versions: &[&rustls::SupportedProtocolVersion] = match cfg.min_version {
            TlsMinVersion::Tls13 => &[&rustls::version::TLS13],
            TlsMinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        };
        let build = |alpn: Vec<Vec<u8>>| -> Result<Arc<ServerConfig>, TlsError> {
            let builder = ServerConfig::builder_with_provider(provider.clone()).with_protocol_versions(versions)?;
            let builder = match (&cfg.client_ca, cfg.client_auth) {
                (Some(ca), auth) if auth != ClientAuth::None => {
                    let roots = Arc::new(load_roots(ca)?);
                    let v = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
                    let v = if auth == ClientAuth::Optional { v.allow_unauthenticated() } else { v };
                    let v = v.build().map_err(|e| file_err(ca, e))?;
                    builder.with_client_cert_verifier(v)
                }
                _ => builder.with_no_client_auth(),
            };
            let mut sc = builder.with_single_cert(certs.clone(), key.clone_key())?;
            sc.alpn_protocols = alpn;
            Ok(Arc::new(sc))
        };
        Ok(Served {
            postgres: build(vec![b"postgresql".to_vec()])?,
            plain: build(vec![])?,
            end_point,
            not_after,
            mock_secret,
            fingerprint,
        })
    }
}

/// The current generation, swapped on reload.
#[derive(Debug)]
pub struct TlsState {
    current: RwLock<Arc<Served>>,
}

impl TlsState {
    /// Loads the first generation.
    pub fn new(cfg: &TlsConfig) -> Result<TlsState, TlsError> {
        Ok(TlsState { current: RwLock::new(Arc::new(Served::load(cfg)?)) })
    }

    /// The generation new connections are served with.
    pub fn current(&self) -> Arc<Served> {
        self.current.read().map(|g| g.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    /// True when the files' content differs from the served generation.
    pub fn changed(&self, cfg: &TlsConfig) -> bool {
        fingerprint(cfg) != self.current().fingerprint
    }

    /// Loads the files again; on success the new generation serves the next handshakes
    /// (open sessions keep theirs). On failure the old one stays.
    pub fn reload(&self, cfg: &TlsConfig) -> Result<Arc<Served>, TlsError> {
        let served = Arc::new(Served::load(cfg)?);
        match self.current.write() {
            Ok(mut g) => *g = served.clone(),
            Err(p) => *p.into_inner() = served.clone(),
        }
        Ok(served)
    }
}

/// Label value for a negotiated version.
pub fn version_label(v: Option<rustls::ProtocolVersion>) -> &'static str {
    match v {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        Some(_) => "other",
        None => "none",
    }
}

/// The identities a verified client certificate carries: `CN=…`, `DNS:…`, `EMAIL:…`, `URI:…`
/// (SANs first, then the CN).
pub fn cert_subjects(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let mut out = Vec::new();
    let Ok((_, c)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return out;
    };
    if let Ok(Some(san)) = c.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => out.push(format!("DNS:{d}")),
                GeneralName::RFC822Name(e) => out.push(format!("EMAIL:{e}")),
                GeneralName::URI(u) => out.push(format!("URI:{u}")),
                _ => {}
            }
        }
    }
    for cn in c.subject().iter_common_name() {
        if let Ok(s) = cn.as_str() {
            out.push(format!("CN={s}"));
        }
    }
    out
}
