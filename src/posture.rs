//! `portcullis audit-postgres`: posture evidence (seed 000 §6 "role/privilege verification
//! queries, RLS verification"). Logs in as the runtime role a Postgres listener uses and checks
//! what the security plan requires; probes the proxy with each `deny_users` name.

use std::sync::Arc;

use serde::Serialize;

use crate::config::{Config, PostgresListener};

/// One check's result.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Check {
    /// Listener the check ran for.
    pub listener: String,
    /// Stable id, e.g. `runtime_not_superuser`, `rls_forced:public.users`.
    pub check: String,
    /// Passed.
    pub ok: bool,
    /// What was found.
    pub detail: String,
}

fn check(l: &PostgresListener, id: impl Into<String>, ok: bool, detail: impl Into<String>) -> Check {
    Check { listener: l.name.clone(), check: id.into(), ok, detail: detail.into() }
}

/// Accepts any server certificate: the deny-list probe sends no secret, it only reads the
/// proxy's refusal.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Logs in through the proxy listener as `user`; the SQLSTATE of its refusal (None if it let
/// the login proceed to authentication or could not be reached).
async fn probe_login(l: &PostgresListener, user: &str, database: &str) -> Result<Option<String>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut addr = l.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let mut tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("proxy {addr}: {e}"))?;
    tcp.write_all(&crate::postgres::codec::SSL_REQUEST).await.map_err(|e| e.to_string())?;
    let mut b = [0u8; 1];
    tcp.read_exact(&mut b).await.map_err(|e| e.to_string())?;
    let startup =
        crate::postgres::codec::startup_message(&[("user".into(), user.into()), ("database".into(), database.into())]);
    let mut msg = Vec::new();
    if b[0] == b'S' {
        let provider = crate::net::tls::provider();
        let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
        let mut tls =
            tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.map_err(|e| e.to_string())?;
        tls.write_all(&startup).await.map_err(|e| e.to_string())?;
        let _ = tls.read_to_end(&mut msg).await;
    } else {
        tcp.write_all(&startup).await.map_err(|e| e.to_string())?;
        let _ = tcp.read_to_end(&mut msg).await;
    }
    if msg.first() != Some(&b'E') || msg.len() < 5 {
        return Ok(None);
    }
    let fields = crate::postgres::codec::error_fields(&msg[5..]);
    Ok(fields.into_iter().find(|(c, _)| *c == b'C').map(|(_, v)| v))
}

async fn connect(l: &PostgresListener, database: &str) -> Result<tokio_postgres::Client, String> {
    let user = l.upstream_user.clone().ok_or("listener has no upstream_user")?;
    let password = l.upstream_password.as_ref().ok_or("listener has no upstream password")?.read()?;
    let (host, port) = l.upstream.rsplit_once(':').ok_or("upstream must be host:port")?;
    let mut c = tokio_postgres::Config::new();
    c.user(&user).password(password.expose()).dbname(database).port(port.parse().map_err(|_| "bad upstream port")?);
    c.connect_timeout(std::time::Duration::from_secs(10));
    let client = match &l.upstream_tls {
        Some(t) => {
            c.host(&t.server_name);
            if let Ok(ip) = host.parse() {
                c.hostaddr(ip);
            } else {
                c.host(host);
            }
            c.ssl_mode(tokio_postgres::config::SslMode::Require);
            let roots = crate::net::tls::load_roots(&t.ca).map_err(|e| e.to_string())?;
            let tls = rustls::ClientConfig::builder_with_provider(crate::net::tls::provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            let (client, conn) =
                c.connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls)).await.map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            client
        }
        None => {
            c.host(host);
            let (client, conn) = c.connect(tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            client
        }
    };
    Ok(client)
}

/// Runs every check for the Postgres listeners of `cfg` (or only `only`), in `database`.
pub async fn audit(cfg: &Config, only: Option<&str>, database: &str) -> Result<Vec<Check>, String> {
    let mut out = Vec::new();
    for l in cfg.postgres.iter().filter(|l| only.is_none_or(|n| n == l.name)) {
        let c = match connect(l, database).await {
            Ok(c) => c,
            Err(e) => {
                out.push(check(l, "runtime_login", false, e));
                continue;
            }
        };
        out.push(check(
            l,
            "runtime_login",
            true,
            format!("logged in as {}", l.upstream_user.as_deref().unwrap_or("?")),
        ));
        let row = c
            .query_one(
                "select rolsuper, rolbypassrls, rolcreaterole, rolcreatedb, rolreplication from pg_roles where rolname = current_user",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        for (i, id) in ["superuser", "bypassrls", "createrole", "createdb", "replication"].iter().enumerate() {
            let has: bool = row.get(i);
            out.push(check(
                l,
                format!("runtime_not_{id}"),
                !has,
                if has { format!("the runtime role has {id}") } else { format!("no {id}") },
            ));
        }
        let member_of_super: i64 = c
            .query_one(
                "select count(*) from pg_roles r where r.rolsuper and pg_has_role(current_user, r.oid, 'MEMBER') and r.rolname <> current_user",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        out.push(check(
            l,
            "runtime_not_member_of_superuser",
            member_of_super == 0,
            format!("{member_of_super} superuser role(s) reachable by SET ROLE"),
        ));
        let public_create: bool = c
            .query_one("select has_schema_privilege('public', 'public', 'CREATE')", &[])
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        out.push(check(
            l,
            "public_no_create_on_schema_public",
            !public_create,
            if public_create { "PUBLIC may CREATE in schema public" } else { "revoked" },
        ));
        for t in &l.protected_tables {
            let (schema, table) = t.split_once('.').unwrap_or(("public", t.as_str()));
            let row = c
                .query_opt(
                    "select c.relrowsecurity, c.relforcerowsecurity,
                            (select count(*) from aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a where a.grantee = 0)
                     from pg_class c join pg_namespace n on n.oid = c.relnamespace where n.nspname = $1 and c.relname = $2",
                    &[&schema, &table],
                )
                .await
                .map_err(|e| e.to_string())?;
            match row {
                None => out.push(check(l, format!("rls_enabled:{t}"), false, "table not found")),
                Some(r) => {
                    let (en, forced, public): (bool, bool, i64) = (r.get(0), r.get(1), r.get(2));
                    out.push(check(
                        l,
                        format!("rls_enabled:{t}"),
                        en,
                        if en { "enabled" } else { "row level security is off" },
                    ));
                    out.push(check(
                        l,
                        format!("rls_forced:{t}"),
                        forced,
                        if forced { "forced" } else { "the owner bypasses RLS (not FORCEd)" },
                    ));
                    out.push(check(
                        l,
                        format!("public_no_grants:{t}"),
                        public == 0,
                        format!("{public} privilege(s) granted to PUBLIC"),
                    ));
                }
            }
        }
        for d in &l.deny_users {
            let res = probe_login(l, d, database).await;
            let (ok, detail) = match res {
                Ok(Some(code)) if code == "42501" => (true, "refused by the proxy (42501)".to_string()),
                Ok(Some(code)) => (false, format!("answered {code}, not the deny-list refusal")),
                Ok(None) => (false, "the proxy did not refuse the name".to_string()),
                Err(e) => (false, e),
            };
            out.push(check(l, format!("deny_user_refused:{d}"), ok, detail));
        }
    }
    Ok(out)
}
