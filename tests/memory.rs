//! Total memory stays bounded under 10,000 connections, whatever they send: the built binary
//! (its own process, jemalloc as shipped) with `max_connections = 10000` takes 5,000 Redis and
//! 5,000 Postgres TLS connections that each hold the most an unauthenticated client can make
//! it buffer (Redis: a request just under the 64 KiB pre-authentication budget; Postgres: a
//! startup packet one byte short of PostgreSQL's 10,000-byte maximum). Its RSS grows by no
//! more than the documented bound, 32 KiB per connection plus what it holds; the 10,001st
//! connection is refused; and it all comes back down when the clients leave.

mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");
const EACH: usize = 5_000;
/// What an idle authenticated TLS session costs (README, Performance: 25–32 KiB measured).
const PER_CONNECTION: u64 = 32 * 1024;

fn active(admin: u16) -> i64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", admin)).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    active_in(&out)
}

/// The largest request an unauthenticated Redis client may leave half-sent: five arguments of
/// Redis's unauthenticated maximum (16 KiB), cut just under the 64 KiB budget.
fn redis_preauth_max() -> Vec<u8> {
    let mut b = b"*5\r\n$4\r\nAUTH\r\n".to_vec();
    for _ in 0..3 {
        b.extend_from_slice(b"$16384\r\n");
        b.extend_from_slice(&[b'x'; 16384]);
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(b"$16384\r\n");
    b.resize(64 * 1024 - 100, b'y');
    b
}

/// A startup packet that declares PostgreSQL's maximum length and stops one byte short.
fn pg_startup_max() -> Vec<u8> {
    let mut b = 10_000u32.to_be_bytes().to_vec();
    b.extend_from_slice(&196_608u32.to_be_bytes());
    b.extend_from_slice(b"user\0app\0options\0");
    b.resize(9_999, b'z');
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_under_10000_connections() {
    // this process holds the 10,000 client ends (and the proxy inherits the limit): 30,000
    // open files when allowed to raise the hard limit (root), else the hard limit
    let me = std::process::id().to_string();
    let raised = Command::new("prlimit").args(["--pid", &me, "--nofile=30000:30000"]).status().unwrap().success();
    if !raised {
        let hard = Command::new("sh").args(["-c", "ulimit -Hn"]).output().unwrap();
        let hard = String::from_utf8_lossy(&hard.stdout).trim().to_string();
        assert!(hard == "unlimited" || hard.parse::<u64>().unwrap() >= 10_500, "open files hard limit {hard}");
        let st = Command::new("prlimit").args(["--pid", &me, &format!("--nofile={hard}:{hard}")]).status().unwrap();
        assert!(st.success(), "prlimit");
    }
    let dir = tempfile::tempdir().unwrap();
    let c = certs();
    std::fs::write(dir.path().join("runtime.pass"), &pg().runtime_password).unwrap();
    std::fs::write(dir.path().join("redis.pass"), &redis().password).unwrap();
    std::fs::write(
        dir.path().join("users.toml"),
        format!(
            "[[users]]\nname = \"app\"\npostgres_scram = \"{}\"\nredis_argon2 = \"{}\"\n",
            postgres_protocol::password::scram_sha_256(APP_PASSWORD.as_bytes()),
            portcullis::auth::argon::hash(REDIS_APP_PW.as_bytes()).unwrap()
        ),
    )
    .unwrap();
    let free = || portcullis::demo::free_port().unwrap();
    let (admin, pg_port, redis_port) = (free(), free(), free());
    let d = dir.path().display();
    std::fs::write(
        dir.path().join("portcullis.toml"),
        format!(
            r#"
[admin]
listen = "127.0.0.1:{admin}"
[tls]
cert = "{c}/server.crt"
key = "{c}/server.key"
[limits]
max_connections = 10000
max_connections_per_source = 100000
handshake_timeout = "300s"
[[postgres]]
name = "main"
listen = "127.0.0.1:{pg_port}"
upstream = "127.0.0.1:{pgu}"
users_file = "{d}/users.toml"
upstream_user = "app_runtime"
upstream_password_file = "{d}/runtime.pass"
[[redis]]
name = "cache"
listen = "127.0.0.1:{redis_port}"
upstream = "127.0.0.1:{ru}"
users_file = "{d}/users.toml"
upstream_user = "portcullis"
upstream_password_file = "{d}/redis.pass"
"#,
            c = c.display(),
            pgu = pg().port,
            ru = redis().port,
        ),
    )
    .unwrap();
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(dir.path().join("portcullis.toml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id();
    let _child = KillOnDrop(child);
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", admin)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "binary did not start");
        std::thread::sleep(Duration::from_millis(50));
    }

    let tls = Arc::new(client_tls(false));
    let open = |port: u16, pg: bool, payload: Arc<Vec<u8>>| {
        let tls = tls.clone();
        async move {
            let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            if pg {
                tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await.unwrap();
                let mut b = [0u8; 1];
                tcp.read_exact(&mut b).await.unwrap();
                assert_eq!(b[0], b'S');
            }
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut s = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.unwrap();
            s.write_all(&payload).await.unwrap();
            s.flush().await.unwrap();
            s
        }
    };
    // warm up (thread pools, lazy statics, the first TLS sessions), then the baseline
    let (rp, pp) = (Arc::new(redis_preauth_max()), Arc::new(pg_startup_max()));
    let mut warm = Vec::new();
    for _ in 0..50 {
        warm.push(open(redis_port, false, rp.clone()).await);
        warm.push(open(pg_port, true, pp.clone()).await);
    }
    drop(warm);
    let t = Instant::now();
    while active(admin) != 0 {
        assert!(t.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss0 = rss_kib(pid);

    let mut held = Vec::with_capacity(2 * EACH);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..2 * EACH {
        let pg = i % 2 == 1;
        set.spawn(open(if pg { pg_port } else { redis_port }, pg, if pg { pp.clone() } else { rp.clone() }));
        if set.len() >= 200 {
            held.push(set.join_next().await.unwrap().unwrap());
        }
    }
    while let Some(s) = set.join_next().await {
        held.push(s.unwrap());
    }
    let t = Instant::now();
    while active(admin) != (2 * EACH) as i64 {
        assert!(t.elapsed() < Duration::from_secs(30), "{} of 10000 connections open", active(admin));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss1 = rss_kib(pid);
    let held_bytes = (EACH * (rp.len() + pp.len())) as u64;
    let bound_kib = ((2 * EACH) as u64 * PER_CONNECTION + held_bytes) / 1024;
    eprintln!(
        "10,000 connections: RSS {rss0} KiB -> {rss1} KiB (+{} KiB, {} KiB per connection); bound +{bound_kib} KiB",
        rss1 - rss0,
        (rss1 - rss0) / (2 * EACH) as u64
    );
    assert!(rss1 - rss0 <= bound_kib, "RSS grew {} KiB, bound {bound_kib} KiB", rss1 - rss0);

    // the 10,001st is refused: max_connections is the other half of the bound
    let mut extra = RawRedis::proxy(redis_port).await;
    assert_eq!(extra.read(false).await, b"-ERR max number of clients reached\r\n");
    assert!(extra.closed().await);

    drop(held);
    let t = Instant::now();
    while active(admin) != 0 {
        assert!(t.elapsed() < Duration::from_secs(30), "{} connections left", active(admin));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
