//! Traffic through the proxy after login: the byte path must be invisible to clients —
//! COPY both ways, LISTEN/NOTIFY, large results, pipelining, cancel, many sessions.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use support::*;

async fn app(p: &Proxy) -> tokio_postgres::Client {
    connect(p.port(), "app", APP_PASSWORD, "").await.expect("login")
}

#[tokio::test]
async fn copy_in_and_out_10_mb() {
    let p = proxy("", "").await;
    let c = app(&p).await;
    c.batch_execute("create temp table t (id int, payload text)").await.unwrap();
    let line = format!("{}\n", "x".repeat(1000));
    let mut data = String::new();
    for i in 0..10_600 {
        data.push_str(&format!("{i}\t{line}"));
    }
    let expected = data.clone();
    assert!(data.len() > 10 * 1024 * 1024);
    let sink = c.copy_in("copy t from stdin").await.unwrap();
    futures_util::pin_mut!(sink);
    use futures_util::SinkExt;
    for chunk in data.as_bytes().chunks(64 * 1024) {
        sink.send(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    let n = sink.finish().await.unwrap();
    assert_eq!(n, 10_600);
    let stream = c.copy_out("copy (select * from t order by id) to stdout").await.unwrap();
    use futures_util::TryStreamExt;
    let out: Vec<Bytes> = stream.try_collect().await.unwrap();
    let out: Vec<u8> = out.concat();
    assert_eq!(out.len(), expected.len());
    assert!(out == expected.as_bytes(), "COPY OUT returns exactly what COPY IN sent");
}

#[tokio::test]
async fn listen_notify_carries_the_upstream_backend_pid() {
    let p = proxy("", "").await;
    let conn_str =
        format!("host=localhost port={} user=app password={APP_PASSWORD} dbname=app sslmode=require", p.port());
    let (listener, mut conn) = conn_str
        .parse::<tokio_postgres::Config>()
        .unwrap()
        .connect(tokio_postgres_rustls::MakeRustlsConnect::new(client_tls(false)))
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        use futures_util::StreamExt;
        while let Some(Ok(m)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.process_id(), n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    listener.batch_execute("listen events").await.unwrap();
    let pid: i32 = listener.query_one("select pg_backend_pid()", &[]).await.unwrap().get(0);
    let talker = app(&p).await;
    talker.batch_execute("notify events, 'hello'").await.unwrap();
    let talker_pid: i32 = talker.query_one("select pg_backend_pid()", &[]).await.unwrap().get(0);
    let (npid, chan, payload) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
    assert_eq!((chan.as_str(), payload.as_str()), ("events", "hello"));
    assert_eq!(npid, talker_pid, "NotificationResponse names the sender's upstream pid");
    assert_ne!(pid, talker_pid);
}

#[tokio::test]
async fn large_result_and_pipelined_queries() {
    let p = proxy("", "").await;
    let c = app(&p).await;
    let rows = c.query("select g, repeat('y', 100) from generate_series(1, 200000) g", &[]).await.unwrap();
    assert_eq!(rows.len(), 200_000);
    assert_eq!(rows[199_999].get::<_, i32>(0), 200_000);
    // tokio-postgres pipelines concurrent queries on one connection.
    let stmt = c.prepare("select $1::int * 2").await.unwrap();
    let futs: Vec<_> = (0..200)
        .map(|i| {
            let c = &c;
            let stmt = &stmt;
            async move { c.query_one(stmt, &[&i]).await.unwrap().get::<_, i32>(0) }
        })
        .collect();
    let results = futures_util::future::join_all(futs).await;
    assert_eq!(results, (0..200).map(|i| i * 2).collect::<Vec<_>>());
}

#[tokio::test]
async fn running_query_is_cancelled_within_two_seconds() {
    let p = proxy("", "").await;
    let c = app(&p).await;
    let token = c.cancel_token();
    let started = Instant::now();
    let q = tokio::spawn(async move { c.simple_query("select pg_sleep(30)").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel_query(tokio_postgres_rustls::MakeRustlsConnect::new(client_tls(false))).await.unwrap();
    let res = tokio::time::timeout(Duration::from_secs(2), q).await.expect("cancelled within 2 s").unwrap();
    let e = res.expect_err("query was cancelled");
    assert_eq!(db_error(&e), ("57014".into(), "canceling statement due to user request".into()));
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn cancel_with_a_wrong_key_does_nothing() {
    let p = proxy("", "").await;
    let c = app(&p).await;
    let pid: i32 = c.query_one("select pg_backend_pid()", &[]).await.unwrap().get(0);
    // A CancelRequest naming the real upstream pid but not the proxy's secret.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(p.addr()).await.unwrap();
    s.write_all(&portcullis::postgres::codec::cancel_request(pid, 12345)).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
    let q = tokio::time::timeout(Duration::from_secs(5), c.simple_query("select pg_sleep(0.5)")).await.unwrap();
    assert!(q.is_ok(), "the session is untouched");
}

#[tokio::test]
async fn fifty_concurrent_sessions() {
    let p = proxy("", "").await;
    let port = p.port();
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            tokio::spawn(async move {
                let c = connect(port, "app", APP_PASSWORD, "").await.expect("login");
                let r: i32 = c.query_one("select $1::int", &[&i]).await.unwrap().get(0);
                let pid: i32 = c.query_one("select pg_backend_pid()", &[]).await.unwrap().get(0);
                (r, pid)
            })
        })
        .collect();
    let mut pids = std::collections::HashSet::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let (r, pid) = t.await.unwrap();
        assert_eq!(r, i as i32);
        pids.insert(pid);
    }
    assert_eq!(pids.len(), 50, "one upstream session per client");
}

/// `bytes_total` is current while a session lasts (a pooled or long-lived session would
/// otherwise show nothing until it ends).
#[tokio::test]
async fn bytes_total_counts_while_the_session_is_open() {
    let p = proxy("", "").await;
    let bytes = |dir: &str| {
        let needle = format!("portcullis_bytes_total{{direction=\"{dir}\",listener=\"main\"}} ");
        p.metrics().lines().find_map(|l| l.strip_prefix(&needle)?.parse::<u64>().ok()).unwrap_or(0)
    };
    let c = connect(p.port(), "app", APP_PASSWORD, "").await.unwrap();
    let (up0, down0) = (bytes("client_to_upstream"), bytes("upstream_to_client"));
    let row = c.query_one("select repeat('x', 100000)", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0).len(), 100_000);
    assert!(bytes("upstream_to_client") >= down0 + 100_000, "{}", p.metrics());
    assert!(bytes("client_to_upstream") > up0);
    drop(c);
}
