//! Operations under load, against real PostgreSQL 15 and Redis: rotating the server
//! certificate, a client's password and the upstream runtime passwords while clients keep
//! working (zero failed requests, open sessions stay, new sessions use the new material), and
//! SIGTERM-style drain under load (every request the proxy accepted is answered; nothing
//! executes without its answer reaching the client).

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use portcullis::app::Running;
use portcullis::auth::scram::ScramVerifier;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OLD_PW: &str = "app-old-pw-1a2b3c";
const NEW_PW: &str = "app-new-pw-4d5e6f";

/// Atomic file replacement, as an operator's tooling (or kubelet) does it.
fn replace(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn users_file(scram: &[String], argon: &[String]) -> String {
    let q = |v: &[String]| v.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ");
    format!("[[users]]\nname = \"app\"\npostgres_scram = [{}]\nredis_argon2 = [{}]\n", q(scram), q(argon))
}

/// A proxy with one Postgres and one Redis listener sharing a users file, the server
/// certificate behind a directory symlink (`tls -> tls-a`, swapped like a Kubernetes Secret).
/// `runtime`: the Postgres role and Redis ACL user (with their passwords) the proxy logs in as.
async fn rotation_proxy(limits: &str, runtime: Runtime) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("tls-a")).unwrap();
    for f in ["server.crt", "server.key"] {
        std::fs::copy(certs().join(f), d.join("tls-a").join(f)).unwrap();
    }
    std::os::unix::fs::symlink("tls-a", d.join("tls")).unwrap();
    std::fs::write(d.join("runtime.pass"), format!("{}\n", runtime.pg_password)).unwrap();
    std::fs::write(d.join("redis.pass"), &runtime.redis_password).unwrap();
    let scram = postgres_protocol::password::scram_sha_256(OLD_PW.as_bytes());
    let argon = portcullis::auth::argon::hash(OLD_PW.as_bytes()).unwrap();
    std::fs::write(d.join("users.toml"), users_file(&[scram], &[argon])).unwrap();
    let config = format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[tls]
cert = "{d}/tls/server.crt"
key = "{d}/tls/server.key"
client_ca = "{ca}"

[lockout]
max_failures = 1000

{limits}

[[postgres]]
name = "pg"
listen = "127.0.0.1:0"
upstream = "127.0.0.1:{pg_port}"
users_file = "{d}/users.toml"
upstream_user = "{pg_user}"
upstream_password_file = "{d}/runtime.pass"
allow = ["127.0.0.0/8"]

[[redis]]
name = "cache"
listen = "127.0.0.1:0"
upstream = "127.0.0.1:{redis_port}"
users_file = "{d}/users.toml"
upstream_user = "{redis_user}"
upstream_password_file = "{d}/redis.pass"
"#,
        d = d.display(),
        ca = certs().join("ca.crt").display(),
        pg_port = pg().port,
        redis_port = redis().port,
        pg_user = runtime.pg_user,
        redis_user = runtime.redis_user,
    );
    let config_path = d.join("portcullis.toml");
    std::fs::write(&config_path, config).unwrap();
    let cfg = portcullis::config::load(&config_path).unwrap_or_else(|e| panic!("test config: {e}"));
    let running = Running::start(cfg).await.unwrap();
    Proxy { running, dir, config_path }
}

/// Upstream identities of one test: its own, so that changing their passwords cannot disturb
/// the other tests of this binary.
struct Runtime {
    pg_user: String,
    pg_password: String,
    redis_user: String,
    redis_password: String,
}

/// Creates a Postgres login role that is a member of `app_runtime` (its privileges, not a
/// superuser) and a Redis ACL user like the proxy's.
async fn runtime(name: &str) -> Runtime {
    let pw = format!("{name}-pg-pw-0a9b8c");
    pg().psql_admin(&format!("create role {name} login password '{pw}' in role app_runtime")).unwrap();
    let rpw = format!("{name}-redis-pw-7d6e5f");
    acl_user(name, &rpw, "+@all").await;
    Runtime { pg_user: name.into(), pg_password: pw, redis_user: name.into(), redis_password: rpw }
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// TLS to the Redis listener (direct TLS) or the Postgres one (after SSLRequest).
async fn tls_to(port: u16, ssl_request: bool) -> std::io::Result<Tls> {
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    if ssl_request {
        tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await?;
        let mut b = [0u8; 1];
        tcp.read_exact(&mut b).await?;
    }
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(client_tls(false))).connect(name, tcp).await
}

/// The leaf certificate a new connection is served.
async fn served_cert(port: u16, ssl_request: bool) -> Vec<u8> {
    let s = tls_to(port, ssl_request).await.expect("TLS handshake");
    s.get_ref().1.peer_certificates().expect("server sent a certificate")[0].to_vec()
}

fn cert_der(path: &Path) -> Vec<u8> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::pem_file_iter(path).unwrap().next().unwrap().unwrap().to_vec()
}

/// A minimal RESP client over TLS that reports a closed connection instead of panicking.
struct Resp {
    io: Tls,
    buf: Vec<u8>,
}

impl Resp {
    async fn connect(port: u16) -> std::io::Result<Resp> {
        Ok(Resp { io: tls_to(port, false).await?, buf: Vec::new() })
    }

    async fn send(&mut self, cmds: &[Vec<&str>]) -> std::io::Result<()> {
        let mut out = Vec::new();
        for c in cmds {
            let v: Vec<&[u8]> = c.iter().map(|a| a.as_bytes()).collect();
            out.extend_from_slice(&portcullis::redis::codec::encode_command(&v));
        }
        self.io.write_all(&out).await?;
        self.io.flush().await
    }

    /// One reply; `None` when the connection ended first.
    async fn read(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some((len, _)) = portcullis::redis::codec::frame_reply(&self.buf, false).unwrap() {
                return Some(self.buf.drain(..len).collect());
            }
            let mut tmp = [0u8; 16384];
            match tokio::time::timeout(Duration::from_secs(10), self.io.read(&mut tmp)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&tmp[..n]),
                _ => return None,
            }
        }
    }

    async fn call(&mut self, cmd: &[&str]) -> Option<Vec<u8>> {
        self.send(&[cmd.to_vec()]).await.ok()?;
        self.read().await
    }
}

/// Shared state of the load generators.
#[derive(Default)]
struct Load {
    stop: AtomicBool,
    password: RwLock<String>,
    pg_persistent: AtomicU64,
    pg_sessions: AtomicU64,
    redis_persistent: AtomicU64,
    redis_sessions: AtomicU64,
    failures: Mutex<Vec<String>>,
}

impl Load {
    fn fail(&self, what: String) {
        self.failures.lock().unwrap().push(what);
    }
    fn password(&self) -> String {
        self.password.read().unwrap().clone()
    }
}

/// Continuous load: persistent sessions (each must stay open) and new sessions in a loop.
fn start_load(pg_port: u16, redis_port: u16, load: &Arc<Load>) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for i in 0..3 {
        let load = load.clone();
        tasks.push(tokio::spawn(async move {
            let c = connect(pg_port, "app", &load.password(), "").await.expect("persistent session opens");
            let pid: i32 = c.query_one("select pg_backend_pid()", &[]).await.unwrap().get(0);
            let mut n = 0i64;
            while !load.stop.load(Relaxed) {
                match c.query_one("select $1::int8 + 1, pg_backend_pid()", &[&n]).await {
                    Ok(r) if r.get::<_, i64>(0) == n + 1 && r.get::<_, i32>(1) == pid => {
                        load.pg_persistent.fetch_add(1, Relaxed);
                    }
                    other => {
                        load.fail(format!("pg persistent {i}: {other:?}"));
                        return;
                    }
                }
                n += 1;
            }
        }));
    }
    for i in 0..2 {
        let load = load.clone();
        tasks.push(tokio::spawn(async move {
            while !load.stop.load(Relaxed) {
                match connect(pg_port, "app", &load.password(), "").await {
                    Ok(c) => match c.query_one("select current_user::text", &[]).await {
                        Ok(r) if r.get::<_, String>(0).ends_with("_runtime") => {
                            load.pg_sessions.fetch_add(1, Relaxed);
                        }
                        other => load.fail(format!("pg session {i}: {other:?}")),
                    },
                    Err(e) => load.fail(format!("pg connect {i}: {e:?}")),
                }
            }
        }));
    }
    for i in 0..3 {
        let load = load.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = Resp::connect(redis_port).await.expect("persistent Redis session opens");
            let key = format!("rot:persistent:{i}");
            assert_eq!(r.call(&["AUTH", "app", &load.password()]).await.as_deref(), Some(&b"+OK\r\n"[..]));
            assert!(r.call(&["DEL", &key]).await.is_some());
            let mut n = 0u64;
            while !load.stop.load(Relaxed) {
                // a pipeline of 8 INCRs, answered in order
                if r.send(&vec![vec!["INCR", key.as_str()]; 8]).await.is_err() {
                    load.fail(format!("redis persistent {i}: write failed"));
                    return;
                }
                for _ in 0..8 {
                    n += 1;
                    let want = format!(":{n}\r\n");
                    match r.read().await {
                        Some(got) if got == want.as_bytes() => {
                            load.redis_persistent.fetch_add(1, Relaxed);
                        }
                        other => {
                            load.fail(format!("redis persistent {i}: {:?}", other.map(String::from_utf8)));
                            return;
                        }
                    }
                }
            }
        }));
    }
    for i in 0..2 {
        let load = load.clone();
        tasks.push(tokio::spawn(async move {
            while !load.stop.load(Relaxed) {
                let Ok(mut r) = Resp::connect(redis_port).await else {
                    load.fail(format!("redis connect {i}: TLS handshake failed"));
                    continue;
                };
                let auth = r.call(&["AUTH", "app", &load.password()]).await;
                let set = r.call(&["SET", &format!("rot:session:{i}"), "v"]).await;
                match (auth.as_deref(), set.as_deref()) {
                    (Some(b"+OK\r\n"), Some(b"+OK\r\n")) => {
                        load.redis_sessions.fetch_add(1, Relaxed);
                    }
                    other => load.fail(format!("redis session {i}: {other:?}")),
                }
            }
        }));
    }
    tasks
}

/// Polls `f` until it is true (every 100 ms, at most `secs`).
async fn eventually<F, Fut>(secs: u64, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t = Instant::now();
    while !f().await {
        assert!(t.elapsed() < Duration::from_secs(secs), "not within {secs} s: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn redis_auth_ok(port: u16, pw: &str) -> bool {
    match Resp::connect(port).await {
        Ok(mut r) => r.call(&["AUTH", "app", pw]).await.as_deref() == Some(b"+OK\r\n"),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotations_under_load_fail_no_request() {
    let rt = runtime("rot_runtime").await;
    let (old_pg_runtime, old_redis_runtime) = (rt.pg_password.clone(), rt.redis_password.clone());
    let p = rotation_proxy("", rt).await;
    let d = p.dir.path().to_path_buf();
    let (pg_port, redis_port) = (p.port(), p.redis_port());
    let load = Arc::new(Load::default());
    *load.password.write().unwrap() = OLD_PW.to_string();
    let tasks = start_load(pg_port, redis_port, &load);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 1. Server certificate renewal: a new key and certificate from the same CA, swapped in by
    // a directory symlink flip. New handshakes get it on both listeners.
    let old_cert = cert_der(&d.join("tls/server.crt"));
    portcullis::certs::renew_dev_server_cert(certs(), &d.join("tls-b")).unwrap();
    let new_cert = cert_der(&d.join("tls-b/server.crt"));
    assert_ne!(old_cert, new_cert);
    assert_eq!(served_cert(redis_port, false).await, old_cert);
    std::os::unix::fs::symlink("tls-b", d.join("tls.new")).unwrap();
    std::fs::rename(d.join("tls.new"), d.join("tls")).unwrap();
    eventually(6, "new certificate served (Redis listener)", || async {
        served_cert(redis_port, false).await == new_cert
    })
    .await;
    assert_eq!(served_cert(pg_port, true).await, new_cert, "and on the Postgres listener");

    // 2. The client's password: both verifiers (the SCRAM one sharing the old salt), then the
    // app switches, then the old one goes.
    let users = std::fs::read_to_string(d.join("users.toml")).unwrap();
    let doc: toml::Table = users.parse().unwrap();
    let user = &doc["users"].as_array().unwrap()[0];
    let old_scram = user["postgres_scram"].as_array().unwrap()[0].as_str().unwrap().to_string();
    let old_argon = user["redis_argon2"].as_array().unwrap()[0].as_str().unwrap().to_string();
    let v = ScramVerifier::parse(&old_scram).unwrap();
    let new_scram = ScramVerifier::from_password(NEW_PW, &v.salt, v.iterations).encode();
    let new_argon = portcullis::auth::argon::hash(NEW_PW.as_bytes()).unwrap();
    replace(
        &d.join("users.toml"),
        &users_file(&[old_scram.clone(), new_scram.clone()], &[old_argon, new_argon.clone()]),
    );
    eventually(6, "new client password accepted (Postgres)", || async {
        connect(pg_port, "app", NEW_PW, "").await.is_ok()
    })
    .await;
    eventually(6, "new client password accepted (Redis)", || redis_auth_ok(redis_port, NEW_PW)).await;
    assert!(connect(pg_port, "app", OLD_PW, "").await.is_ok(), "both work during the rotation");
    assert!(redis_auth_ok(redis_port, OLD_PW).await, "both work during the rotation");
    *load.password.write().unwrap() = NEW_PW.to_string();
    tokio::time::sleep(Duration::from_secs(1)).await;
    replace(&d.join("users.toml"), &users_file(&[new_scram], &[new_argon]));
    eventually(6, "old client password refused (Postgres)", || async {
        matches!(connect(pg_port, "app", OLD_PW, "").await, Err(e) if db_error(&e).0 == "28P01")
    })
    .await;
    eventually(6, "old client password refused (Redis)", || async { !redis_auth_ok(redis_port, OLD_PW).await }).await;

    // 3. The upstream runtime passwords: changed at the server first, the secret file a moment
    // later (new upstream logins in between wait for it).
    let new_runtime = "runtime-rotated-pw-9x8y7z";
    pg().psql_admin(&format!("alter role rot_runtime password '{new_runtime}'")).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    replace(&d.join("runtime.pass"), &format!("{new_runtime}\n"));
    let new_redis = "redis-rotated-pw-6w5v4u";
    let mut admin = RawRedis::direct_as("portcullis", &redis().password).await;
    assert_eq!(admin.call(&["ACL", "SETUSER", "rot_runtime", "resetpass", &format!(">{new_redis}")]).await, b"+OK\r\n");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    replace(&d.join("redis.pass"), new_redis);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let before = (load.pg_sessions.load(Relaxed), load.redis_sessions.load(Relaxed));
    tokio::time::sleep(Duration::from_secs(1)).await;
    load.stop.store(true, Relaxed);
    for t in tasks {
        if let Err(e) = t.await {
            load.fail(format!("worker panicked: {e}"));
        }
    }
    let failures = load.failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "{} failed requests: {:?}", failures.len(), &failures[..failures.len().min(5)]);
    let counts = [
        load.pg_persistent.load(Relaxed),
        load.pg_sessions.load(Relaxed),
        load.redis_persistent.load(Relaxed),
        load.redis_sessions.load(Relaxed),
    ];
    assert!(counts.iter().all(|n| *n >= 20), "every kind of load ran throughout: {counts:?}");
    assert!(
        load.pg_sessions.load(Relaxed) > before.0 && load.redis_sessions.load(Relaxed) > before.1,
        "new sessions after the rotation"
    );

    // New sessions use the new material: the old runtime passwords no longer work at the
    // servers, yet the proxy logs in; the metrics saw no failed upstream login.
    let direct = format!(
        "host=127.0.0.1 port={} user=rot_runtime password={old_pg_runtime} dbname=app sslmode=disable",
        pg().port
    );
    let e = match tokio_postgres::connect(&direct, tokio_postgres::NoTls).await {
        Ok(_) => panic!("the old runtime password still works at PostgreSQL"),
        Err(e) => e,
    };
    assert_eq!(db_error(&e).0, "28P01");
    let mut old_login = RawRedis::direct().await;
    assert!(old_login.call(&["AUTH", "rot_runtime", &old_redis_runtime]).await.starts_with(b"-WRONGPASS"));
    let c = connect(pg_port, "app", NEW_PW, "").await.expect("new session after everything rotated");
    let user: String = c.query_one("select current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(user, "rot_runtime");
    assert!(redis_auth_ok(redis_port, NEW_PW).await);
    let m = p.metrics();
    assert!(!m.contains(r#"portcullis_config_reloads_total{result="error"}"#), "every reload succeeded: {m}");
    for l in ["pg", "cache"] {
        assert!(m.contains(&format!("portcullis_upstream_up{{listener=\"{l}\"}} 1")), "{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_under_load_answers_every_accepted_request() {
    let rt = runtime("drain_runtime").await;
    pg().psql_admin_db(
        "app",
        "create table drain_log(worker int, n int); grant select, insert on drain_log to app_runtime;",
    )
    .unwrap();
    let p = rotation_proxy("[limits]\ndrain_timeout = \"1s\"", rt).await;
    let (pg_port, redis_port) = (p.port(), p.redis_port());
    let Proxy { running, dir: _dir, .. } = p;
    let shared = running.shared().clone();
    let started = Arc::new(tokio::sync::Barrier::new(10));

    // Postgres: autocommit inserts (workers 0-2) and two-statement transactions (3-4). Each
    // records what it was told succeeded, and how it ended.
    let mut pg_tasks = Vec::new();
    for w in 0..5i32 {
        let started = started.clone();
        pg_tasks.push(tokio::spawn(async move {
            let mut c = connect(pg_port, "app", OLD_PW, "").await.expect("session opens");
            let mut acked = Vec::new();
            started.wait().await;
            for n in 1.. {
                let r = if w < 3 {
                    c.execute("insert into drain_log values ($1, $2)", &[&w, &n]).await.map(|_| ())
                } else {
                    async {
                        let tx = c.transaction().await?;
                        tx.execute("insert into drain_log values ($1, $2)", &[&w, &n]).await?;
                        tx.execute("insert into drain_log values ($1, $2)", &[&w, &-n]).await?;
                        tx.commit().await
                    }
                    .await
                };
                match r {
                    Ok(()) => acked.push(n),
                    Err(e) => {
                        let how = match e.as_db_error() {
                            Some(d) => d.code().code().to_string(),
                            None if e.is_closed() => "closed".to_string(),
                            None => format!("{e:?}"),
                        };
                        return (w, acked, how);
                    }
                }
            }
            unreachable!()
        }));
    }
    // Redis: pipelines of 16 INCRs (workers 0-2) and MULTI/EXEC blocks (3).
    let mut redis_tasks = Vec::new();
    for w in 0..4usize {
        let started = started.clone();
        redis_tasks.push(tokio::spawn(async move {
            let mut r = Resp::connect(redis_port).await.expect("Redis session opens");
            let key = format!("drain:{w}");
            assert_eq!(r.call(&["AUTH", "app", OLD_PW]).await.as_deref(), Some(&b"+OK\r\n"[..]));
            assert_eq!(r.call(&["DEL", &key]).await.as_deref(), Some(&b":0\r\n"[..]));
            started.wait().await;
            let mut answered = 0u64;
            loop {
                let batch = if w < 3 {
                    vec![vec!["INCR", key.as_str()]; 16]
                } else {
                    vec![vec!["MULTI"], vec!["INCR", key.as_str()], vec!["INCR", key.as_str()], vec!["EXEC"]]
                };
                if r.send(&batch).await.is_err() {
                    return (key, answered);
                }
                for _ in 0..batch.len() {
                    match r.read().await {
                        Some(reply) if w < 3 => {
                            assert!(reply.starts_with(b":"), "{reply:?}");
                            answered += 1;
                        }
                        Some(reply) if reply.starts_with(b"*2\r\n") => answered += 2,
                        Some(reply) => assert!(reply == b"+OK\r\n" || reply == b"+QUEUED\r\n", "{reply:?}"),
                        None => return (key, answered),
                    }
                }
            }
        }));
    }
    started.wait().await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let t = Instant::now();
    let drain = tokio::spawn(running.drain());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(shared.draining.load(Relaxed));
    assert!(connect(pg_port, "app", OLD_PW, "").await.is_err(), "no new sessions while draining");

    let mut direct = RawRedis::direct_as("portcullis", &redis().password).await;
    for t in redis_tasks {
        let (key, answered) = tokio::time::timeout(Duration::from_secs(10), t).await.expect("ends").unwrap();
        assert!(answered > 50, "{key}: load ran ({answered})");
        let v = direct.call(&["GET", &key]).await;
        assert_eq!(
            String::from_utf8_lossy(&v),
            format!("${}\r\n{answered}\r\n", answered.to_string().len()),
            "{key}: every INCR Redis executed was answered, and every answer was executed"
        );
    }
    for t in pg_tasks {
        let (w, acked, how) = tokio::time::timeout(Duration::from_secs(10), t).await.expect("ends").unwrap();
        assert!(acked.len() > 20, "worker {w}: load ran ({})", acked.len());
        assert!(how == "57P01" || how == "closed", "worker {w} ended with 57P01 or a closed connection: {how}");
        let rows = pg()
            .psql_admin_db("app", &format!("select n from drain_log where worker = {w} and n > 0 order by n"))
            .unwrap();
        let rows: Vec<i32> = rows.lines().filter_map(|l| l.trim().parse().ok()).collect();
        assert!(
            rows == acked,
            "worker {w}: committed rows are exactly the acknowledged ones: {} rows (last {:?}), {} acknowledged (last {:?})",
            rows.len(),
            rows.last(),
            acked.len(),
            acked.last()
        );
        if w >= 3 {
            let neg = pg()
                .psql_admin_db("app", &format!("select count(*) from drain_log where worker = {w} and n < 0"))
                .unwrap();
            assert_eq!(neg.trim().parse::<usize>().unwrap(), acked.len(), "whole transactions only");
        }
    }
    tokio::time::timeout(Duration::from_secs(10), drain).await.expect("drain finishes").unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "drain took {:?}", t.elapsed());
    assert_eq!(shared.tracker.len(), 0, "no session left");
}
