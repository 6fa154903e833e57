//! Upstream faults against the real servers: the network path to PostgreSQL / Redis is cut
//! mid-session (a relay between proxy and server that the test can sever and restore), or the
//! upstream accepts and never answers. Affected clients get the protocol's error (FATAL 08006,
//! `-ERR upstream unavailable`) and are closed; other clients are unaffected; new sessions
//! work once the path is back; `/readyz` follows.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use portcullis::demo::{PgInstance, RedisInstance};
use support::*;
use tokio::net::{TcpListener, TcpStream};

/// A TCP relay to `target` on a fixed port: `sever()` drops every relayed connection and stops
/// accepting (connections are refused); `restore()` accepts again.
struct Relay {
    port: u16,
    target: u16,
    up: Arc<AtomicBool>,
    cut: Arc<tokio::sync::Notify>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    async fn start(target: u16) -> Relay {
        let port = portcullis::demo::free_port().unwrap();
        let mut r = Relay {
            port,
            target,
            up: Arc::new(AtomicBool::new(true)),
            cut: Arc::new(tokio::sync::Notify::new()),
            task: None,
        };
        r.restore().await;
        r
    }

    async fn restore(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        self.up.store(true, Relaxed);
        let (target, cut, up) = (self.target, self.cut.clone(), self.up.clone());
        self.task = Some(tokio::spawn(async move {
            loop {
                let Ok((mut c, _)) = listener.accept().await else { return };
                let cut = cut.clone();
                let up = up.clone();
                tokio::spawn(async move {
                    let Ok(mut s) = TcpStream::connect(("127.0.0.1", target)).await else { return };
                    if !up.load(Relaxed) {
                        return;
                    }
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut c, &mut s) => {}
                        _ = cut.notified() => {}
                    }
                });
            }
        }));
    }

    fn sever(&mut self) {
        self.up.store(false, Relaxed);
        if let Some(t) = self.task.take() {
            t.abort();
        }
        self.cut.notify_waiters();
    }
}

async fn readyz(p: &Proxy) -> u16 {
    let addr = p.running.admin_addr;
    let mut s = TcpStream::connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

async fn eventually_ready(p: &Proxy, want: u16) {
    let t = Instant::now();
    while readyz(p).await != want {
        assert!(t.elapsed() < Duration::from_secs(10), "/readyz did not become {want}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_path_cut_mid_session() {
    let mut relay = Relay::start(pg().port).await;
    let p = proxy_with_upstream("", "", &format!("127.0.0.1:{}", relay.port)).await;
    let other = proxy("", "").await; // another listener, straight to PostgreSQL
    let a = connect(p.port(), "app", APP_PASSWORD, "").await.unwrap();
    let b = connect(other.port(), "app", APP_PASSWORD, "").await.unwrap();
    assert_eq!(a.query_one("select 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    eventually_ready(&p, 200).await;

    // a query in flight when the path is cut
    let q = tokio::spawn(async move {
        let r = a.query_one("select pg_sleep(3)", &[]).await;
        (r, a)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.sever();
    let (r, a) = tokio::time::timeout(Duration::from_secs(5), q).await.expect("answered promptly").unwrap();
    let e = r.expect_err("the session is gone");
    assert_eq!(
        db_error(&e),
        ("08006".into(), "upstream of listener \"main\" is unavailable".into()),
        "FATAL 08006, not a bare EOF"
    );
    assert!(a.is_closed() || a.query_one("select 1", &[]).await.is_err(), "and closed");
    assert_eq!(b.query_one("select 2", &[]).await.unwrap().get::<_, i32>(0), 2, "other sessions unaffected");

    // new sessions are refused with 08006 while it is down; /readyz says so
    let e = connect(p.port(), "app", APP_PASSWORD, "").await.expect_err("upstream down");
    assert_eq!(db_error(&e).0, "08006");
    eventually_ready(&p, 503).await;

    relay.restore().await;
    let c = connect(p.port(), "app", APP_PASSWORD, "").await.expect("works again once it is back");
    assert_eq!(c.query_one("select 3", &[]).await.unwrap().get::<_, i32>(0), 3);
    eventually_ready(&p, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_path_cut_mid_session() {
    let mut relay = Relay::start(redis().port).await;
    let p = redis_proxy("", &format!("upstream = \"127.0.0.1:{}\"", relay.port)).await;
    let other = redis_proxy("", "").await;
    let mut a = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(a.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
    assert_eq!(a.call(&["SET", "fault:a", "1"]).await, b"+OK\r\n");
    let mut b = RawRedis::proxy(other.redis_port()).await;
    assert_eq!(b.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");

    // a blocking command in flight when the path is cut
    a.send(&["BLPOP", "fault:empty", "5"]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.sever();
    let t = Instant::now();
    assert_eq!(a.read(false).await, b"-ERR upstream unavailable\r\n");
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(a.closed().await, "and closed");
    assert_eq!(b.call(&["GET", "fault:a"]).await, b"$1\r\n1\r\n", "other sessions unaffected");

    let mut c = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(c.call(&["AUTH", "app", REDIS_APP_PW]).await, b"-ERR upstream unavailable\r\n");
    relay.restore().await;
    let mut d = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(d.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n", "works again once it is back");
    assert_eq!(d.call(&["GET", "fault:a"]).await, b"$1\r\n1\r\n");
}

/// The path is cut while a large reply is on its way: the client gets the part that came and
/// then the end of the connection, never an error inside the value (part of it has gone out: a
/// plain reply streams, on a shared connection too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_path_cut_mid_reply() {
    let mut relay = Relay::start(redis().port).await;
    let p = redis_proxy("", &format!("upstream = \"127.0.0.1:{}\"", relay.port)).await;
    let mut admin = RawRedis::direct_as("portcullis", &redis().password).await;
    let value = vec![b'v'; 64 << 20];
    admin.send_raw(&portcullis::redis::codec::encode_command(&[b"SET", b"fault:big", &value])).await;
    assert_eq!(admin.read(false).await, b"+OK\r\n");
    let mut a = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(a.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
    // not read yet: the reply backs up in the proxy and the sockets
    a.send(&["GET", "fault:big"]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.sever();
    let header = b"$67108864\r\n";
    let got = a.read_to_end().await;
    assert!(got.starts_with(header), "{:?}", String::from_utf8_lossy(&got[..got.len().min(40)]));
    assert!(got.len() < header.len() + value.len(), "cut short: {}", got.len());
    assert!(got[header.len()..].iter().all(|b| *b == b'v'), "only bytes of the value, no error inside it");
    assert_eq!(admin.call(&["DEL", "fault:big"]).await, b":1\r\n");
}

/// An upstream that accepts and never says a word: logins end at `upstream_connect_timeout`
/// with the protocol's error, not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_answers_times_out_clearly() {
    let hole = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = hole.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut keep = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            keep.push(s);
        }
    });
    let limits = "[limits]\nupstream_connect_timeout = \"1s\"\n";
    let p = proxy_with_upstream(limits, "", &format!("127.0.0.1:{port}")).await;
    let t = Instant::now();
    let e = connect(p.port(), "app", APP_PASSWORD, "").await.expect_err("no upstream login");
    assert_eq!(db_error(&e), ("08006".into(), "upstream of listener \"main\" is unavailable".into()));
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());

    let r = redis_proxy(limits, &format!("upstream = \"127.0.0.1:{port}\"")).await;
    let mut c = RawRedis::proxy(r.redis_port()).await;
    let t = Instant::now();
    assert_eq!(c.call(&["AUTH", "app", REDIS_APP_PW]).await, b"-ERR upstream unavailable\r\n");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert_eq!(c.call(&["PING"]).await, b"-NOAUTH Authentication required.\r\n", "the session stays usable");
    held.abort();
}

/// The PostgreSQL server itself dies (SIGKILL to the postmaster and every backend: a crash,
/// no goodbye on any connection) with a query running: that client gets FATAL 08006 and is
/// closed, an idle session on the same listener is closed too, a session on another listener
/// is unaffected; logins fail with 08006 and `/readyz` is 503 until the server is back, then
/// everything works again without restarting the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_server_killed_mid_session_and_restarted() {
    let mut own =
        tokio::task::spawn_blocking(|| PgInstance::start(None, None).expect("a private PostgreSQL")).await.unwrap();
    let p = proxy_for(&own, "", "", &format!("127.0.0.1:{}", own.port)).await;
    let other = proxy("", "").await;
    let a = connect(p.port(), "app", APP_PASSWORD, "").await.unwrap();
    let idle = connect(p.port(), "app", APP_PASSWORD, "").await.unwrap();
    let b = connect(other.port(), "app", APP_PASSWORD, "").await.unwrap();
    a.batch_execute("create table t(x int); insert into t values (1)").await.unwrap();
    eventually_ready(&p, 200).await;

    let q = tokio::spawn(async move {
        let r = a.query_one("select pg_sleep(5)", &[]).await;
        (r, a)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut own = tokio::task::spawn_blocking(move || {
        own.kill();
        own
    })
    .await
    .unwrap();
    let (r, a) = tokio::time::timeout(Duration::from_secs(5), q).await.expect("answered promptly").unwrap();
    let e = r.expect_err("the server is gone");
    assert_eq!(db_error(&e), ("08006".into(), "upstream of listener \"main\" is unavailable".into()));
    assert!(a.is_closed() || a.query_one("select 1", &[]).await.is_err(), "and closed");
    assert!(idle.query_one("select 1", &[]).await.is_err(), "the idle session on the dead server is closed");
    assert_eq!(b.query_one("select 2", &[]).await.unwrap().get::<_, i32>(0), 2, "other listeners unaffected");

    let e = connect(p.port(), "app", APP_PASSWORD, "").await.expect_err("server down");
    assert_eq!(db_error(&e), ("08006".into(), "upstream of listener \"main\" is unavailable".into()));
    eventually_ready(&p, 503).await;

    let own = tokio::task::spawn_blocking(move || {
        own.restart().expect("PostgreSQL restarts (crash recovery)");
        own
    })
    .await
    .unwrap();
    let c = connect(p.port(), "app", APP_PASSWORD, "").await.expect("works again once it is back");
    assert_eq!(c.query_one("select x from t", &[]).await.unwrap().get::<_, i32>(0), 1);
    eventually_ready(&p, 200).await;
    drop((c, p));
    drop(own);
}

/// The Redis server dies (SIGKILL) under a blocked BLPOP: that client gets `-ERR upstream
/// unavailable` and is closed, an idle session on the same listener is closed, a session on
/// another listener is unaffected; AUTH answers `-ERR upstream unavailable` (and the session
/// stays usable) until the server is back; then new sessions work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_server_killed_mid_session_and_restarted() {
    let mut own = RedisInstance::start(None, None).expect("a private Redis");
    let p = redis_proxy_for(&own, "", "").await;
    let other = redis_proxy("", "").await;
    let mut a = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(a.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
    let mut idle = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(idle.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
    assert_eq!(idle.call(&["SET", "k", "v"]).await, b"+OK\r\n");
    let mut b = RawRedis::proxy(other.redis_port()).await;
    assert_eq!(b.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
    eventually_ready(&p, 200).await;

    // CLIENT REPLY OFF: its pending BLPOP has no reply to replace, so it gets none
    let mut hidden = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(hidden.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
    hidden.send(&["CLIENT", "REPLY", "OFF"]).await;
    hidden.send(&["BLPOP", "fault:empty", "5"]).await;
    a.send(&["BLPOP", "fault:empty", "5"]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    own.kill();
    let t = Instant::now();
    assert_eq!(a.read(false).await, b"-ERR upstream unavailable\r\n");
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(a.closed().await, "and closed");
    let multiplexed = redis_multiplexed();
    if multiplexed {
        // Shared upstream connections: an idle client has nothing on the dead one and stays;
        // while there is no server its requests get the error in their place.
        assert_eq!(idle.call(&["GET", "k"]).await, b"-ERR upstream unavailable\r\n");
    } else {
        assert!(idle.closed().await, "the idle session on the dead server is closed");
    }
    assert!(hidden.closed().await, "closed without a byte: no unasked reply");
    assert_eq!(b.call(&["PING"]).await, b"+PONG\r\n", "other listeners unaffected");

    let mut c = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(c.call(&["AUTH", "app", REDIS_APP_PW]).await, b"-ERR upstream unavailable\r\n");
    eventually_ready(&p, 503).await;

    own.restart().expect("redis-server restarts");
    assert_eq!(c.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n", "the same session, once it is back");
    assert_eq!(c.call(&["GET", "k"]).await, b"$-1\r\n", "a fresh server (persistence is off)");
    if multiplexed {
        assert_eq!(idle.call(&["GET", "k"]).await, b"$-1\r\n", "the idle client carries on, on a new connection");
    }
    let mut d = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(d.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
    assert_eq!(d.call(&["PING"]).await, b"+PONG\r\n");
    eventually_ready(&p, 200).await;
}

fn psql_child(port: u16, app_name: &str, sql: &str) -> std::process::Child {
    std::process::Command::new("psql")
        .env("PGSSLROOTCERT", certs().join("ca.crt"))
        .env("PGPASSWORD", APP_PASSWORD)
        .arg(format!("host=localhost port={port} user=app dbname=app sslmode=verify-full application_name={app_name}"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("psql runs")
}

fn backends_named(app_name: &str) -> usize {
    pg().psql_admin(&format!("select count(*) from pg_stat_activity where application_name = '{app_name}'"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(10), "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// psql killed (SIGKILL: the client vanishes, no Terminate, no CopyFail) in the middle of a
/// COPY FROM STDIN and in the middle of a COPY TO STDOUT it is not reading: each time the
/// proxy closes the upstream session too (the backend is gone from pg_stat_activity), the
/// half-sent COPY is not committed, and no session is left in the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_mid_copy_closes_the_upstream_session() {
    use std::io::Write;
    let p = proxy("", "").await;
    let setup = connect(p.port(), "app", APP_PASSWORD, "").await.unwrap();
    setup.batch_execute("create table vanish_copy(x int, pad text)").await.unwrap();

    // COPY in: a few MB sent, then the client is killed
    let mut child = psql_child(p.port(), "vanish_in", "copy vanish_copy from stdin");
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let row = format!("1\t{}\n", "x".repeat(1000));
        for _ in 0..4000 {
            if stdin.write_all(row.as_bytes()).is_err() {
                return;
            }
        }
        std::thread::sleep(Duration::from_secs(30)); // never ends the COPY: holds stdin open
    });
    until("the COPY reached PostgreSQL", || backends_named("vanish_in") == 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    until("the upstream session of the vanished COPY FROM client is closed", || backends_named("vanish_in") == 0).await;
    let n: i64 = setup.query_one("select count(*) from vanish_copy", &[]).await.unwrap().get(0);
    assert_eq!(n, 0, "nothing of the unfinished COPY committed");
    drop(writer);

    // COPY out that the client stops reading: the proxy and the backend block on writes
    let mut child = psql_child(
        p.port(),
        "vanish_out",
        "copy (select g, repeat('y', 1000) from generate_series(1, 1000000) g) to stdout",
    );
    until("the COPY TO is running", || backends_named("vanish_out") == 1).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(backends_named("vanish_out"), 1, "blocked, not finished: psql's stdout is never read");
    child.kill().unwrap();
    child.wait().unwrap();
    until("the upstream session of the vanished COPY TO client is closed", || backends_named("vanish_out") == 0).await;

    drop(setup);
    let t = Instant::now();
    while p.active() != 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "no session left in the proxy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A client that sends a 200,000-command pipeline and vanishes without reading a reply: the
/// proxy closes its upstream Redis connection (Redis's CLIENT LIST is back to the admin
/// connection alone) and keeps no session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_mid_pipeline_closes_the_upstream_connection() {
    let own = RedisInstance::start(None, None).expect("a private Redis");
    let p = redis_proxy_for(&own, "", "").await;
    let mut admin = RawRedis::direct_to(own.port, "portcullis", &own.password).await;
    // logged-in clients (the proxy's health probe, a bare TCP dial, may be listed for an instant)
    let clients =
        |list: Vec<u8>| String::from_utf8_lossy(&list).lines().filter(|l| l.contains(" user=portcullis ")).count();
    assert_eq!(clients(admin.call(&["CLIENT", "LIST"]).await), 1);

    let mut c = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(c.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
    assert_eq!(clients(admin.call(&["CLIENT", "LIST"]).await), 2);
    let mut pipeline = Vec::new();
    for _ in 0..200_000 {
        pipeline.extend_from_slice(&portcullis::redis::codec::encode_command(&[b"INCR", b"vanish:n"]));
    }
    // write what the socket takes within a second (the client never reads, so the replies
    // back up and the proxy stops reading), then vanish
    let _ = tokio::time::timeout(Duration::from_secs(1), c.send_raw(&pipeline)).await;
    drop(c);
    let t = Instant::now();
    loop {
        let n = clients(admin.call(&["CLIENT", "LIST"]).await);
        if n == 1 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "the upstream connection is closed ({n} clients)");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let executed = admin.call(&["GET", "vanish:n"]).await;
    assert!(executed.starts_with(b"$"), "some of the pipeline ran: {:?}", String::from_utf8_lossy(&executed));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(admin.call(&["GET", "vanish:n"]).await, executed, "and nothing more after the close");
    let t = Instant::now();
    while p.active() != 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "no session left in the proxy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
