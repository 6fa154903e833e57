//! Upstream faults against the real servers: the network path to PostgreSQL / Redis is cut
//! mid-session (a relay between proxy and server that the test can sever and restore), or the
//! upstream accepts and never answers. Affected clients get the protocol's error (FATAL 08006,
//! `-ERR upstream unavailable`) and are closed; other clients are unaffected; new sessions
//! work once the path is back; `/readyz` follows.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

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
