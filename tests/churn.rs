//! Connection churn leaves nothing behind: after 100,000 connections opened and closed on each
//! protocol (authenticated Redis sessions; Postgres connections abandoned before and during
//! login, and 1,000 full Postgres logins), the proxy's open file descriptors, its sessions and the
//! upstream connections at PostgreSQL and Redis are back at their baseline, and memory has
//! not grown with the count.

mod support;

// The allocator the binary ships with (glibc's arenas keep freed memory per thread, which
// would measure the allocator, not the proxy).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

/// Logged-in Redis clients: the proxy's upstream connections and this admin one (the proxy's
/// health probe, a bare TCP dial that never logs in, may be listed for an instant).
async fn redis_clients(admin: &mut RawRedis) -> usize {
    let list = admin.call(&["CLIENT", "LIST"]).await;
    String::from_utf8_lossy(&list).lines().filter(|l| l.contains(" user=portcullis ")).count()
}

async fn pg_backends() -> usize {
    pg().psql_admin("select count(*) from pg_stat_activity where usename = 'app_runtime'")
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// One round of churn on both listeners: `redis_sessions` authenticated Redis sessions (TLS,
/// AUTH, SET; half closed politely, half dropped), `pg_abandoned` Postgres connections ended
/// before or during login (after TCP connect, after SSLRequest, at the SCRAM challenge), and
/// `pg_logins` full Postgres logins with a query; 100 connections at a time.
async fn churn(pg_port: u16, redis_port: u16, redis_sessions: usize, pg_abandoned: usize, pg_logins: usize) {
    let tls = std::sync::Arc::new(client_tls(false));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..redis_sessions {
        let tls = tls.clone();
        set.spawn(async move {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut s = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.unwrap();
            let mut cmd = portcullis::redis::codec::encode_command(&[b"AUTH", b"app", REDIS_APP_PW.as_bytes()]);
            cmd.extend_from_slice(&portcullis::redis::codec::encode_command(&[
                b"SET",
                format!("churn:{}", i % 10).as_bytes(),
                b"v",
            ]));
            s.write_all(&cmd).await.unwrap();
            let mut b = [0u8; 10];
            s.read_exact(&mut b).await.unwrap();
            assert_eq!(&b, b"+OK\r\n+OK\r\n");
            if i % 2 == 0 {
                let _ = s.shutdown().await; // polite close; the rest just drop
            }
        });
        if set.len() >= 100 {
            set.join_next().await.unwrap().unwrap();
        }
    }
    // Postgres abandoned at every pre-auth step
    for i in 0..pg_abandoned {
        set.spawn(async move {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", pg_port)).await.unwrap();
            match i % 3 {
                0 => {}
                1 => s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await.unwrap(),
                _ => {
                    let (tag, _) = tls_startup(pg_port, &[("user", "app"), ("database", "app")]).await;
                    assert_eq!(tag, b'R', "the SCRAM challenge");
                }
            }
        });
        if set.len() >= 100 {
            set.join_next().await.unwrap().unwrap();
        }
    }
    for _ in 0..pg_logins {
        set.spawn(async move {
            let c = connect(pg_port, "app", APP_PASSWORD, "").await.unwrap();
            assert_eq!(c.query_one("select 1", &[]).await.unwrap().get::<_, i32>(0), 1);
        });
        if set.len() >= 8 {
            set.join_next().await.unwrap().unwrap();
        }
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
}

async fn settle(p: &Proxy, r: &Proxy) {
    for _ in 0..100 {
        if p.active() == 0 && r.active() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_returns_descriptors_sessions_and_upstreams_to_baseline() {
    let limits = "[limits]\nmax_connections_per_source = 100000\n";
    let p = proxy(limits, "").await;
    let r = redis_proxy(limits, "").await;
    let mut admin = RawRedis::direct_as("portcullis", &redis().password).await;
    // one login first: Argon2 verifies once, then the verified-credential cache serves the storm
    let mut first = RawRedis::proxy(r.redis_port()).await;
    assert_eq!(first.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
    drop(first);
    // warm up (lazy statics, thread pools, the command table), then take the baseline
    churn(p.port(), r.redis_port(), 200, 300, 5).await;
    settle(&p, &r).await;
    let (fds0, rss0) = (open_fds(), rss_kib(std::process::id()));
    let (redis0, pg0) = (redis_clients(&mut admin).await, pg_backends().await);
    // 100,000 connections on each protocol
    churn(p.port(), r.redis_port(), 100_000, 99_000, 1_000).await;
    settle(&p, &r).await;
    let (fds1, rss1) = (open_fds(), rss_kib(std::process::id()));
    eprintln!("churn: fds {fds0} -> {fds1}, RSS {rss0} KiB -> {rss1} KiB");
    assert_eq!((p.active(), r.active()), (0, 0), "no session left");
    assert!(fds1 <= fds0 + 5, "file descriptors back at baseline: {fds0} -> {fds1}");
    assert_eq!(redis_clients(&mut admin).await, redis0, "no upstream Redis connection left");
    assert_eq!(pg_backends().await, pg0, "no upstream PostgreSQL session left");
    // 100,000 sessions at ~25 KiB each would be ~2.4 GiB: growth must not scale with the count
    assert!(rss1 < rss0 + 64 * 1024, "memory back near baseline: {rss0} KiB -> {rss1} KiB");
}
