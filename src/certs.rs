//! `portcullis certs dev`: a development PKI made with rcgen (ECDSA P-256): a CA, a server
//! certificate for localhost/127.0.0.1/::1 and a client certificate with CN `app`.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Errors writing the dev PKI.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// rcgen failed.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// Writing a file failed.
    #[error("{path}: {err}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        err: std::io::Error,
    },
}

fn write(dir: &Path, name: &str, content: &str, private: bool) -> Result<(), CertsError> {
    let path = dir.join(name);
    let io = |err| CertsError::Io { path: path.display().to_string(), err };
    std::fs::write(&path, content).map_err(io)?;
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    Ok(())
}

fn dn(cn: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::OrganizationName, "Portcullis dev");
    d.push(DnType::CommonName, cn);
    d
}

fn ca_params() -> Result<CertificateParams, CertsError> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name = dn("Portcullis dev CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(ca)
}

/// A new server key and certificate (localhost, 127.0.0.1, ::1), as PEM.
fn server_cert(issuer: &Issuer<'_, &KeyPair>) -> Result<(String, String), CertsError> {
    let server_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut server = CertificateParams::new(vec!["localhost".to_string()])?;
    server.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().expect("literal")));
    server.subject_alt_names.push(SanType::IpAddress("::1".parse().expect("literal")));
    server.distinguished_name = dn("localhost");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let server_cert = server.signed_by(&server_key, issuer)?;
    Ok((server_cert.pem(), server_key.serialize_pem()))
}

/// Writes `ca.crt ca.key server.crt server.key client.crt client.key` into `out`.
/// `client_cn` is the client certificate's CN (and DNS SAN `<cn>.internal`).
pub fn write_dev_pki(out: &Path, client_cn: &str) -> Result<(), CertsError> {
    std::fs::create_dir_all(out).map_err(|err| CertsError::Io { path: out.display().to_string(), err })?;
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let ca = ca_params()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, &ca_key);
    let (server_crt, server_key) = server_cert(&issuer)?;

    let client_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut client = CertificateParams::new(vec![format!("{client_cn}.internal")])?;
    client.distinguished_name = dn(client_cn);
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    client.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let client_cert = client.signed_by(&client_key, &issuer)?;

    write(out, "ca.crt", &ca_cert.pem(), false)?;
    write(out, "ca.key", &ca_key.serialize_pem(), true)?;
    write(out, "server.crt", &server_crt, false)?;
    write(out, "server.key", &server_key, true)?;
    write(out, "client.crt", &client_cert.pem(), false)?;
    write(out, "client.key", &client_key.serialize_pem(), true)?;
    Ok(())
}

/// Issues a new server key and certificate from the dev CA in `pki` (its `ca.key`) into
/// `out/server.crt` and `out/server.key`: a certificate renewal, for rotation drills.
pub fn renew_dev_server_cert(pki: &Path, out: &Path) -> Result<(), CertsError> {
    let path = pki.join("ca.key");
    let pem = std::fs::read_to_string(&path).map_err(|err| CertsError::Io { path: path.display().to_string(), err })?;
    let ca_key = KeyPair::from_pem(&pem)?;
    let issuer = Issuer::new(ca_params()?, &ca_key);
    let (crt, key) = server_cert(&issuer)?;
    std::fs::create_dir_all(out).map_err(|err| CertsError::Io { path: out.display().to_string(), err })?;
    write(out, "server.crt", &crt, false)?;
    write(out, "server.key", &key, true)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pki_loads_and_chains() {
        let dir = tempfile::tempdir().unwrap();
        write_dev_pki(dir.path(), "app").unwrap();
        let roots = crate::net::tls::load_roots(&dir.path().join("ca.crt")).unwrap();
        assert_eq!(roots.len(), 1);
        let client = crate::net::tls::load_certs(&dir.path().join("client.crt")).unwrap();
        let subjects = crate::net::tls::cert_subjects(&client[0]);
        assert!(subjects.contains(&"CN=app".to_string()), "{subjects:?}");
        assert!(subjects.contains(&"DNS:app.internal".to_string()), "{subjects:?}");
        crate::net::tls::load_key(&dir.path().join("server.key")).unwrap();
    }

    #[test]
    fn renewed_server_cert_chains_to_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        write_dev_pki(dir.path(), "app").unwrap();
        let out = dir.path().join("renewed");
        renew_dev_server_cert(dir.path(), &out).unwrap();
        let old = std::fs::read(dir.path().join("server.crt")).unwrap();
        let new = std::fs::read(out.join("server.crt")).unwrap();
        assert_ne!(old, new);
        use rustls::client::danger::ServerCertVerifier;
        let roots = crate::net::tls::load_roots(&dir.path().join("ca.crt")).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let chain = crate::net::tls::load_certs(&out.join("server.crt")).unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        verifier
            .verify_server_cert(&chain[0], &[], &name, &[], rustls::pki_types::UnixTime::now())
            .expect("the renewed certificate verifies against the original CA");
    }
}
