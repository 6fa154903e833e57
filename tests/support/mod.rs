//! Test harness: one private PostgreSQL 15 per test binary (real server, ephemeral port,
//! `log_connections = on`), dev certificates, and a proxy per test built from a TOML snippet.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use portcullis::app::Running;
use portcullis::demo::PgInstance;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// The shared PostgreSQL of this test binary (stopped by a watchdog when the binary exits).
pub fn pg() -> &'static PgInstance {
    static PG: OnceLock<PgInstance> = OnceLock::new();
    PG.get_or_init(|| {
        let c = certs();
        PgInstance::start(Some(std::process::id()), Some((&c.join("server.crt"), &c.join("server.key"))))
            .expect("PostgreSQL 15 must start for these tests (apt-get install postgresql-15)")
    })
}

/// Dev PKI shared by the tests of this binary.
pub fn certs() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // One PKI per test binary, regenerated each run, under target/ (no /tmp litter).
        let exe = std::env::current_exe().unwrap();
        let name = exe.file_name().unwrap().to_string_lossy().into_owned();
        let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pki-{name}"));
        let _ = std::fs::remove_dir_all(&d);
        portcullis::certs::write_dev_pki(&d, "app").unwrap();
        d
    })
}

/// Password of the proxy user `app` in test users files.
pub const APP_PASSWORD: &str = "app-test-pw-5f2c9a";
/// Password of the proxy user `rogue` (mapped to upstream `rogue_admin`).
pub const ROGUE_PASSWORD: &str = "rogue-test-pw-8d1e77";

/// A proxy running in this test's runtime, with its files.
pub struct Proxy {
    pub running: Running,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

impl Proxy {
    pub fn addr(&self) -> std::net::SocketAddr {
        self.running.postgres_addrs[0].1
    }
    pub fn port(&self) -> u16 {
        self.addr().port()
    }
    pub fn metrics(&self) -> String {
        self.running.shared().metrics.render()
    }
    /// Open client connections, all listeners (`portcullis_connections_active`).
    pub fn active(&self) -> i64 {
        active_in(&self.metrics())
    }
}

/// The sum of `portcullis_connections_active` in a metrics text.
pub fn active_in(metrics: &str) -> i64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("portcullis_connections_active"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
        .sum()
}

/// Resident memory of process `pid` in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Writes a config (with `[tls]` pointing at the shared dev PKI, a users file with `app` and
/// `rogue`, and the runtime password file) and starts the proxy. `listener_extra` is appended
/// inside the `[[postgres]]` table; `top_extra` goes before it.
pub async fn proxy(top_extra: &str, listener_extra: &str) -> Proxy {
    proxy_with_upstream(top_extra, listener_extra, &format!("127.0.0.1:{}", pg().port)).await
}

pub async fn proxy_with_upstream(top_extra: &str, listener_extra: &str, upstream: &str) -> Proxy {
    proxy_for(pg(), top_extra, listener_extra, upstream).await
}

/// The same, in front of a given PostgreSQL (tests that kill and restart their own server).
pub async fn proxy_for(pg: &PgInstance, top_extra: &str, listener_extra: &str, upstream: &str) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let c = certs();
    std::fs::write(dir.path().join("runtime.pass"), format!("{}\n", pg.runtime_password)).unwrap();
    std::fs::write(dir.path().join("rogue.pass"), &pg.rogue_password).unwrap();
    let users = format!(
        r#"
[[users]]
name = "app"
postgres_scram = "{app}"
cert_subjects = ["CN=app"]

[[users]]
name = "rogue"
postgres_scram = "{rogue}"
upstream_user = "rogue_admin"
upstream_password_file = "{dir}/rogue.pass"

[[users]]
name = "postgres"
postgres_scram = "{app}"
"#,
        app = postgres_protocol::password::scram_sha_256(APP_PASSWORD.as_bytes()),
        rogue = postgres_protocol::password::scram_sha_256(ROGUE_PASSWORD.as_bytes()),
        dir = dir.path().display()
    );
    std::fs::write(dir.path().join("users.toml"), users).unwrap();
    let top_has_tls = top_extra.contains("[tls]");
    let tls = if top_has_tls {
        String::new()
    } else {
        format!(
            "[tls]\ncert = \"{c}/server.crt\"\nkey = \"{c}/server.key\"\nclient_ca = \"{c}/ca.crt\"\n",
            c = c.display()
        )
    };
    let config = format!(
        r#"
[admin]
listen = "127.0.0.1:0"
{tls}
{top_extra}

[[postgres]]
name = "main"
listen = "127.0.0.1:{port}"
upstream = "{upstream}"
users_file = "{dir}/users.toml"
{runtime}
deny_users = ["postgres"]
{allow}
{listener_extra}
"#,
        // Port 0 (no race between tests) unless the config file itself must name the bound
        // port: audit-postgres probes the listener it reads from the file.
        port = if listener_extra.contains("protected_tables") { portcullis::demo::free_port().unwrap() } else { 0 },
        runtime = if listener_extra.contains("upstream_user") {
            String::new()
        } else {
            format!(
                "upstream_user = \"app_runtime\"\nupstream_password_file = \"{}/runtime.pass\"",
                dir.path().display()
            )
        },
        listener_extra = listener_extra.replace("{DIR}", &dir.path().display().to_string()),
        dir = dir.path().display(),
        allow = if listener_extra.contains("allow") { "" } else { "allow = [\"127.0.0.0/8\"]" },
    );
    let config_path = dir.path().join("portcullis.toml");
    std::fs::write(&config_path, config).unwrap();
    let cfg = portcullis::config::load(&config_path).unwrap_or_else(|e| panic!("test config: {e}"));
    let running = Running::start(cfg).await.unwrap();
    Proxy { running, dir, config_path }
}

/// A rustls client config trusting the dev CA (ring provider), optionally with the client cert.
pub fn client_tls(with_client_cert: bool) -> rustls::ClientConfig {
    client_tls_versions(with_client_cert, &[&rustls::version::TLS13, &rustls::version::TLS12], certs())
}

pub fn client_tls_versions(
    with_client_cert: bool,
    versions: &[&'static rustls::SupportedProtocolVersion],
    pki: &Path,
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(pki.join("ca.crt")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    if with_client_cert {
        let chain: Vec<_> =
            CertificateDer::pem_file_iter(pki.join("client.crt")).unwrap().map(|c| c.unwrap()).collect();
        let key = PrivateKeyDer::from_pem_file(pki.join("client.key")).unwrap();
        b.with_client_auth_cert(chain, key).unwrap()
    } else {
        b.with_no_client_auth()
    }
}

/// Connects with tokio-postgres over rustls; `extra` is appended to the connection string.
pub async fn connect(
    port: u16,
    user: &str,
    password: &str,
    extra: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    connect_tls(port, user, password, extra, client_tls(false)).await
}

pub async fn connect_tls(
    port: u16,
    user: &str,
    password: &str,
    extra: &str,
    tls: rustls::ClientConfig,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let conn_str =
        format!("host=localhost port={port} user={user} password={password} dbname=app sslmode=require {extra}");
    let (client, conn) =
        conn_str.parse::<tokio_postgres::Config>()?.connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// The error of a connection attempt that must fail.
pub fn refused<T>(r: Result<T, tokio_postgres::Error>, what: &str) -> tokio_postgres::Error {
    match r {
        Ok(_) => panic!("expected a refusal: {what}"),
        Err(e) => e,
    }
}

/// SQLSTATE and message of a tokio-postgres error (panics if it is not a server error).
pub fn db_error(e: &tokio_postgres::Error) -> (String, String) {
    let d = e.as_db_error().unwrap_or_else(|| panic!("expected a server error, got: {e:?}"));
    (d.code().code().to_string(), d.message().to_string())
}

/// SSLRequest + TLS + a StartupMessage by hand; returns the first backend message.
pub async fn tls_startup(port: u16, params: &[(&str, &str)]) -> (u8, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(b[0], b'S');
    let mut tls = tls_connect(s, client_tls(false)).await;
    tls.write_all(&raw::startup(196_608, params)).await.unwrap();
    raw::read_msg(&mut tls).await.unwrap()
}

/// A TLS client handshake over `s` to "localhost".
pub async fn tls_connect(
    s: tokio::net::TcpStream,
    cfg: rustls::ClientConfig,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, s).await.unwrap()
}

/// Raw plaintext helpers for byte-level tests.
pub mod raw {
    use tokio::io::{AsyncRead, AsyncReadExt};

    /// A StartupMessage with a version and parameters.
    pub fn startup(version: i32, params: &[(&str, &str)]) -> Vec<u8> {
        let mut b = vec![0, 0, 0, 0];
        b.extend_from_slice(&version.to_be_bytes());
        for (k, v) in params {
            b.extend_from_slice(k.as_bytes());
            b.push(0);
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        b.push(0);
        let n = b.len() as i32;
        b[0..4].copy_from_slice(&n.to_be_bytes());
        b
    }

    /// Reads one typed backend message: (tag, body).
    pub async fn read_msg<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<(u8, Vec<u8>)> {
        let mut head = [0u8; 5];
        s.read_exact(&mut head).await?;
        let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        s.read_exact(&mut body).await?;
        Ok((head[0], body))
    }

    /// Fields of an ErrorResponse body by code byte.
    pub fn fields(body: &[u8]) -> Vec<(u8, String)> {
        portcullis::postgres::codec::error_fields(body)
    }

    /// (SQLSTATE, message) of an ErrorResponse body.
    pub fn code_and_message(body: &[u8]) -> (String, String) {
        let f = fields(body);
        let get = |c| f.iter().find(|(k, _)| *k == c).map(|(_, v)| v.clone()).unwrap_or_default();
        (get(b'C'), get(b'M'))
    }
}

// ---------------------------------------------------------------------------------------------
// Redis

use portcullis::demo::RedisInstance;

/// The shared Redis of this test binary (native TLS port too, with the dev PKI).
pub fn redis() -> &'static RedisInstance {
    static R: OnceLock<RedisInstance> = OnceLock::new();
    R.get_or_init(|| {
        let c = certs();
        RedisInstance::start(
            Some(std::process::id()),
            Some((&c.join("server.crt"), &c.join("server.key"), &c.join("ca.crt"))),
        )
        .expect("redis-server must start for these tests (apt-get install redis-server)")
    })
}

/// Redis passwords of the test users.
pub const REDIS_APP_PW: &str = "redis-app-pw-31f0";
pub const REDIS_KEYS_PW: &str = "redis-keys-pw-77aa";
pub const REDIS_ADMIN_PW: &str = "redis-admin-pw-c3d2";

/// A proxy with one `[[redis]]` listener in front of the shared Redis. Users: `app` (listener
/// default rules), `keys` (`+@all -@dangerous ~app:* ~session:*`), `admin` (`+@all`), and a
/// certificate user `certapp` (CN=app).
pub async fn redis_proxy(top_extra: &str, listener_extra: &str) -> Proxy {
    redis_proxy_for(redis(), top_extra, listener_extra).await
}

/// True when this run puts Redis listeners in `pool = "multiplex"` mode (scripts/test runs the
/// Redis suites a second time so); a few fault assertions differ by design there.
pub fn redis_multiplexed() -> bool {
    std::env::var("PORTCULLIS_TEST_REDIS_POOL").is_ok_and(|v| v == "multiplex")
}

/// The same, in front of a given Redis (tests that count what reaches the upstream use their own).
pub async fn redis_proxy_for(r: &RedisInstance, top_extra: &str, listener_extra: &str) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let c = certs();
    std::fs::write(dir.path().join("redis.pass"), &r.password).unwrap();
    let hash = |pw: &str| portcullis::auth::argon::hash(pw.as_bytes()).unwrap();
    let users = format!(
        r#"
[[users]]
name = "app"
redis_argon2 = "{app}"

[[users]]
name = "keys"
redis_argon2 = "{keys}"
redis_rules = "+@all -@dangerous ~app:* ~session:*"

[[users]]
name = "admin"
redis_argon2 = "{admin}"
redis_rules = "+@all"

[[users]]
name = "certapp"
cert_subjects = ["CN=app"]
"#,
        app = hash(REDIS_APP_PW),
        keys = hash(REDIS_KEYS_PW),
        admin = hash(REDIS_ADMIN_PW),
    );
    std::fs::write(dir.path().join("users.toml"), users).unwrap();
    let tls = if top_extra.contains("[tls]") {
        String::new()
    } else {
        format!(
            "[tls]\ncert = \"{c}/server.crt\"\nkey = \"{c}/server.key\"\nclient_ca = \"{c}/ca.crt\"\n",
            c = c.display()
        )
    };
    // The whole Redis suite runs again with shared upstream connections (scripts/test).
    let pool = match std::env::var("PORTCULLIS_TEST_REDIS_POOL") {
        Ok(v) if !listener_extra.contains("pool =") => format!("pool = \"{v}\""),
        _ => String::new(),
    };
    let upstream = if listener_extra.contains("upstream =") {
        String::new()
    } else {
        format!("upstream = \"127.0.0.1:{}\"", r.port)
    };
    let config = format!(
        r#"
[admin]
listen = "127.0.0.1:0"
{tls}
{top_extra}

[[redis]]
name = "cache"
listen = "127.0.0.1:0"
{upstream}
users_file = "{dir}/users.toml"
upstream_user = "portcullis"
upstream_password_file = "{dir}/redis.pass"
{pool}
{listener_extra}
"#,
        dir = dir.path().display()
    );
    let config_path = dir.path().join("portcullis.toml");
    std::fs::write(&config_path, config).unwrap();
    let cfg = portcullis::config::load(&config_path).unwrap_or_else(|e| panic!("test config: {e}"));
    let running = Running::start(cfg).await.unwrap();
    Proxy { running, dir, config_path }
}

impl Proxy {
    pub fn redis_port(&self) -> u16 {
        self.running.redis_addrs[0].1.port()
    }
}

/// A raw RESP client (TLS to the proxy, or plaintext straight to Redis) for byte-exact tests.
pub struct RawRedis {
    io: Box<dyn RawIo>,
    buf: Vec<u8>,
}

pub trait RawIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> RawIo for T {}

impl RawRedis {
    /// TLS to the proxy.
    pub async fn proxy(port: u16) -> RawRedis {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        RawRedis { io: Box::new(tls_connect(tcp, client_tls(false)).await), buf: Vec::new() }
    }

    /// TLS with the client certificate (CN=app).
    pub async fn proxy_with_cert(port: u16) -> RawRedis {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        RawRedis { io: Box::new(tls_connect(tcp, client_tls(true)).await), buf: Vec::new() }
    }

    /// Plaintext to the proxy (to see the TLS refusal).
    pub async fn plain(port: u16) -> RawRedis {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        RawRedis { io: Box::new(tcp), buf: Vec::new() }
    }

    /// Plaintext straight to the shared Redis (the oracle), unauthenticated.
    pub async fn direct() -> RawRedis {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", redis().port)).await.unwrap();
        RawRedis { io: Box::new(tcp), buf: Vec::new() }
    }

    /// Straight to Redis as an ACL user (created with `acl_user`).
    pub async fn direct_as(user: &str, pw: &str) -> RawRedis {
        RawRedis::direct_to(redis().port, user, pw).await
    }

    /// Straight to the Redis on `port` as an ACL user.
    pub async fn direct_to(port: u16, user: &str, pw: &str) -> RawRedis {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut r = RawRedis { io: Box::new(tcp), buf: Vec::new() };
        assert_eq!(r.call(&["AUTH", user, pw]).await, b"+OK\r\n");
        r
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.io.write_all(bytes).await.unwrap();
        self.io.flush().await.unwrap();
    }

    pub async fn send(&mut self, args: &[&str]) {
        let v: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.send_raw(&portcullis::redis::codec::encode_command(&v)).await;
    }

    /// Reads one reply (RESP2 or RESP3 framing), raw.
    pub async fn read(&mut self, resp3: bool) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        loop {
            if let Some((len, _)) = portcullis::redis::codec::frame_reply(&self.buf, resp3).unwrap() {
                return self.buf.drain(..len).collect();
            }
            let mut tmp = vec![0u8; 65536];
            let n = tokio::time::timeout(std::time::Duration::from_secs(10), self.io.read(&mut tmp))
                .await
                .expect("reply within 10 s")
                .unwrap();
            assert!(
                n > 0,
                "connection closed while waiting for a reply; have {:?}",
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }

    pub async fn call(&mut self, args: &[&str]) -> Vec<u8> {
        self.send(args).await;
        self.read(false).await
    }

    /// Everything until the server closes the connection (or it fails), raw.
    pub async fn read_to_end(&mut self) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut tmp = vec![0u8; 65536];
        loop {
            match tokio::time::timeout(std::time::Duration::from_secs(10), self.io.read(&mut tmp)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&tmp[..n]),
                Ok(_) => return std::mem::take(&mut self.buf),
                Err(_) => panic!("not closed within 10 s"),
            }
        }
    }

    /// True when the server closed the connection (after any pending bytes).
    pub async fn closed(&mut self) -> bool {
        use tokio::io::AsyncReadExt;
        let mut tmp = [0u8; 1024];
        matches!(
            tokio::time::timeout(std::time::Duration::from_secs(5), self.io.read(&mut tmp)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

/// `n` TLS clients of the Redis listener on `port`, each connected and then released at the
/// same moment to run `f(i, client)` (to log in together, say); what each gave, in order.
pub async fn redis_clients_at_once<T, F, Fut>(port: u16, n: usize, f: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize, RawRedis) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (barrier, f) = (barrier.clone(), f.clone());
        tasks.push(tokio::spawn(async move {
            let c = RawRedis::proxy(port).await;
            barrier.wait().await;
            f(i, c).await
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Creates (or replaces) an ACL user on the shared Redis: the oracle for policy decisions.
pub async fn acl_user(name: &str, pw: &str, rules: &str) {
    let mut admin = RawRedis::direct_as("portcullis", &redis().password).await;
    let mut args = vec!["ACL", "SETUSER", name, "reset", "on"];
    let pass = format!(">{pw}");
    args.push(&pass);
    args.push("&*");
    let parts: Vec<&str> = rules.split_whitespace().collect();
    if !parts.iter().any(|p| p.starts_with('~') || *p == "allkeys") {
        args.push("~*");
    }
    args.extend(parts);
    assert_eq!(admin.call(&args).await, b"+OK\r\n");
}
