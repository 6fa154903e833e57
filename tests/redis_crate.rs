//! The `redis` crate (tokio + rustls), as applications use it, through the proxy: connection
//! setup with credentials in the URL, commands, atomic pipelines, denials as errors, pub/sub,
//! and RESP3.

mod support;

use futures_util::StreamExt;
use redis::AsyncCommands;
use support::*;

fn client(port: u16, user: &str, pw: &str, query: &str) -> redis::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = std::fs::read(certs().join("ca.crt")).unwrap();
    redis::Client::build_with_tls(
        format!("rediss://{user}:{pw}@localhost:{port}/{query}"),
        redis::TlsCertificates { client_tls: None, root_cert: Some(ca) },
    )
    .unwrap()
}

#[tokio::test]
async fn commands_pipelines_and_denials() {
    let p = redis_proxy("", "").await;
    let c = client(p.redis_port(), "app", REDIS_APP_PW, "");
    let mut con = c.get_multiplexed_async_connection().await.expect("connects and authenticates");
    let _: () = con.set("crate:k", b"v\r\n\0".as_slice()).await.unwrap();
    let v: Vec<u8> = con.get("crate:k").await.unwrap();
    assert_eq!(v, b"v\r\n\0");
    let (a, b): (i64, i64) =
        redis::pipe().atomic().incr("crate:n", 1).incr("crate:n", 2).query_async(&mut con).await.unwrap();
    assert_eq!((a, b), (1, 3));
    let e = redis::cmd("FLUSHALL").query_async::<()>(&mut con).await.unwrap_err();
    assert_eq!(e.code(), Some("NOPERM"), "{e}");
    assert!(e.to_string().contains("no permissions to run the 'flushall' command"), "{e}");
    // the connection is still usable after a denial
    let n: i64 = con.del(&["crate:k", "crate:n"]).await.unwrap();
    assert_eq!(n, 2);
    // wrong password: the client gets WRONGPASS at connect time
    let bad = client(p.redis_port(), "app", "nope", "");
    let e = bad.get_multiplexed_async_connection().await.unwrap_err();
    assert!(format!("{e:?}").contains("AuthenticationFailed"), "{e:?}");
}

#[tokio::test]
async fn pubsub_through_the_proxy() {
    let p = redis_proxy("", "").await;
    let c = client(p.redis_port(), "app", REDIS_APP_PW, "");
    let mut pubsub = c.get_async_pubsub().await.unwrap();
    pubsub.subscribe("crate-news").await.unwrap();
    let mut con = c.get_multiplexed_async_connection().await.unwrap();
    let receivers: i64 = con.publish("crate-news", "hello").await.unwrap();
    assert_eq!(receivers, 1);
    let msg =
        tokio::time::timeout(std::time::Duration::from_secs(5), pubsub.on_message().next()).await.unwrap().unwrap();
    assert_eq!(msg.get_channel_name(), "crate-news");
    assert_eq!(msg.get_payload::<String>().unwrap(), "hello");
}

#[tokio::test]
async fn resp3_connection() {
    let p = redis_proxy("", "").await;
    let c = client(p.redis_port(), "app", REDIS_APP_PW, "?protocol=resp3");
    let mut con = c.get_multiplexed_async_connection().await.expect("HELLO 3 with AUTH through the proxy");
    let _: () = con.hset("crate:h", "f", "1").await.unwrap();
    let m: std::collections::HashMap<String, String> = con.hgetall("crate:h").await.unwrap();
    assert_eq!(m.get("f").map(String::as_str), Some("1"));
    let missing: Option<String> = con.get("crate:missing").await.unwrap();
    assert_eq!(missing, None);
    let _: i64 = con.del("crate:h").await.unwrap();
}
