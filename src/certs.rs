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

/// Writes `ca.crt ca.key server.crt server.key client.crt client.key` into `out`.
/// `client_cn` is the client certificate's CN (and DNS SAN `<cn>.internal`).
pub fn write_dev_pki(out: &Path, client_cn: &str) -> Result<(), CertsError> {
    std::fs::create_dir_all(out).map_err(|err| CertsError::Io { path: out.display().to_string(), err })?;
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name = dn("Portcullis dev CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, &ca_key);

    let server_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut server = CertificateParams::new(vec!["localhost".to_string()])?;
    server.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().expect("literal")));
    server.subject_alt_names.push(SanType::IpAddress("::1".parse().expect("literal")));
    server.distinguished_name = dn("localhost");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let server_cert = server.signed_by(&server_key, &issuer)?;

    let client_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut client = CertificateParams::new(vec![format!("{client_cn}.internal")])?;
    client.distinguished_name = dn(client_cn);
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    client.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let client_cert = client.signed_by(&client_key, &issuer)?;

    write(out, "ca.crt", &ca_cert.pem(), false)?;
    write(out, "ca.key", &ca_key.serialize_pem(), true)?;
    write(out, "server.crt", &server_cert.pem(), false)?;
    write(out, "server.key", &server_key.serialize_pem(), true)?;
    write(out, "client.crt", &client_cert.pem(), false)?;
    write(out, "client.key", &client_key.serialize_pem(), true)?;
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
}
