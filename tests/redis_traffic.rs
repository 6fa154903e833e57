//! Redis traffic after authentication. The oracle is the real Redis: for policy, an ACL user
//! created on it with the very rules the proxy enforces answers the same byte stream directly,
//! and the two answers must be identical, denial texts and their places included.

mod support;

use support::*;

const DEFAULT_RULES: &str = "+@all -@dangerous -@scripting -dump";

/// Sends `pipeline` in one write through the proxy (as `user`) and directly (as an ACL user with
/// `rules`), reading `n` replies from each; returns (proxy, direct).
async fn differential(
    p: &Proxy,
    user: &str,
    pw: &str,
    rules: &str,
    pipeline: &[u8],
    n: usize,
    keys: &[&str],
) -> (Vec<u8>, Vec<u8>) {
    let oracle = format!("oracle-{user}");
    acl_user(&oracle, "oracle-pw", rules).await;
    let mut direct = RawRedis::direct_as(&oracle, "oracle-pw").await;
    let mut proxied = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(proxied.call(&["AUTH", user, pw]).await, b"+OK\r\n");
    let mut got = (Vec::new(), Vec::new());
    // Both sides start from the same data: the keys the pipeline touches are cleared first.
    let clear = || async {
        let mut admin = RawRedis::direct_as("portcullis", &redis().password).await;
        for pattern in keys {
            let listed = admin
                .call(&[
                    "EVAL",
                    "for _,k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', k) end return 0",
                    "0",
                    pattern,
                ])
                .await;
            assert_eq!(listed, b":0\r\n");
        }
    };
    clear().await;
    proxied.send_raw(pipeline).await;
    for _ in 0..n {
        got.0.extend(proxied.read(false).await);
    }
    clear().await;
    direct.send_raw(pipeline).await;
    for _ in 0..n {
        got.1.extend(direct.read(false).await);
    }
    got
}

fn cmd(args: &[&[u8]]) -> Vec<u8> {
    portcullis::redis::codec::encode_command(args)
}

#[tokio::test]
async fn dangerous_commands_are_denied_and_data_stays() {
    let p = redis_proxy("", "").await;
    let mut c = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(c.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
    assert_eq!(c.call(&["SET", "keep:me", "1"]).await, b"+OK\r\n");
    for (args, name) in [
        (&["FLUSHALL"][..], "flushall"),
        (&["FLUSHDB"][..], "flushdb"),
        (&["CONFIG", "SET", "maxmemory", "1"][..], "config|set"),
        (&["KEYS", "*"][..], "keys"),
        (&["DEBUG", "SLEEP", "0"][..], "debug"),
        (&["EVAL", "return 1", "0"][..], "eval"),
        (&["DUMP", "keep:me"][..], "dump"),
        (&["CLIENT", "KILL", "ID", "1"][..], "client|kill"),
        (&["MONITOR"][..], "monitor"),
    ] {
        let want = format!("-NOPERM this user has no permissions to run the '{name}' command\r\n");
        assert_eq!(String::from_utf8(c.call(args).await).unwrap(), want);
    }
    assert_eq!(c.call(&["GET", "keep:me"]).await, b"$1\r\n1\r\n");
    // arity errors read like Redis's, before policy (as Redis orders them)
    assert_eq!(c.call(&["GET"]).await, b"-ERR wrong number of arguments for 'get' command\r\n");
    assert_eq!(
        c.call(&["FLUSHALL", "ASYNC", "X", "Y"]).await,
        b"-NOPERM this user has no permissions to run the 'flushall' command\r\n",
        "FLUSHALL's arity is -1: any argument count reaches the ACL check"
    );
    let m = p.metrics();
    assert!(m.contains(r#"portcullis_redis_denied_total{command="flushall",listener="cache"} 2"#), "{m}");
}

#[tokio::test]
async fn ten_thousand_command_pipeline_matches_redis_acl() {
    let p = redis_proxy("", "").await;
    let mut pipeline = Vec::new();
    for i in 0..10_000 {
        let key = format!("pipe:{}", i % 97);
        let c = match i % 7 {
            0 => cmd(&[b"FLUSHALL"]),
            1 => cmd(&[b"SET", key.as_bytes(), b"v"]),
            2 => cmd(&[b"GET", key.as_bytes()]),
            3 => cmd(&[b"CONFIG", b"GET", b"maxmemory"]),
            4 => cmd(&[b"STRLEN", key.as_bytes()]),
            5 => cmd(&[b"KEYS", b"pipe:*"]),
            _ => cmd(&[b"PING"]),
        };
        pipeline.extend(c);
    }
    let (proxied, direct) = differential(&p, "app", REDIS_APP_PW, DEFAULT_RULES, &pipeline, 10_000, &["pipe:*"]).await;
    assert_eq!(proxied.len(), direct.len());
    assert!(proxied == direct, "every reply identical and in order");
    assert_eq!(proxied.windows(7).filter(|w| w == b"NOPERM ").count(), 4286, "3 of every 7 denied");
}

#[tokio::test]
async fn multi_with_a_denied_command_aborts_like_redis() {
    let p = redis_proxy("", "").await;
    let mut pipeline = Vec::new();
    for c in [
        cmd(&[b"DEL", b"tx:a"]),
        cmd(&[b"MULTI"]),
        cmd(&[b"SET", b"tx:a", b"1"]),
        cmd(&[b"FLUSHALL"]),
        cmd(&[b"GET"]),
        cmd(&[b"EXEC"]),
        cmd(&[b"GET", b"tx:a"]),
        cmd(&[b"MULTI"]),
        cmd(&[b"INCR", b"tx:b"]),
        cmd(&[b"EXEC"]),
        cmd(&[b"DEL", b"tx:b"]),
    ] {
        pipeline.extend(c);
    }
    let (proxied, direct) = differential(&p, "app", REDIS_APP_PW, DEFAULT_RULES, &pipeline, 11, &["tx:*"]).await;
    assert_eq!(String::from_utf8_lossy(&proxied), String::from_utf8_lossy(&direct));
    assert!(
        String::from_utf8_lossy(&proxied).contains("-EXECABORT Transaction discarded because of previous errors.\r\n")
    );
}

#[tokio::test]
async fn key_patterns_match_redis_acl() {
    let p = redis_proxy("", "").await;
    let mut pipeline = Vec::new();
    for c in [
        cmd(&[b"SET", b"app:1", b"x"]),
        cmd(&[b"GET", b"app:1"]),
        cmd(&[b"GET", b"other:1"]),
        cmd(&[b"MGET", b"app:1", b"other:1"]),
        cmd(&[b"MSET", b"app:2", b"y", b"session:9", b"z"]),
        cmd(&[b"RENAME", b"app:2", b"elsewhere"]),
        cmd(&[b"DEL", b"app:1", b"app:2", b"session:9"]),
        cmd(&[b"PING"]),
        cmd(&[b"FLUSHDB"]),
    ] {
        pipeline.extend(c);
    }
    let rules = "+@all -@dangerous ~app:* ~session:*";
    let (proxied, direct) =
        differential(&p, "keys", REDIS_KEYS_PW, rules, &pipeline, 9, &["app:*", "session:*", "other:*", "elsewhere"])
            .await;
    assert_eq!(String::from_utf8_lossy(&proxied), String::from_utf8_lossy(&direct));
    assert!(
        String::from_utf8_lossy(&proxied)
            .contains("-NOPERM this user has no permissions to access one of the keys used as arguments\r\n")
    );
}

#[tokio::test]
async fn client_reply_off_and_skip_keep_accounting_exact() {
    let p = redis_proxy("", "").await;
    let mut pipeline = Vec::new();
    for c in [
        cmd(&[b"CLIENT", b"REPLY", b"OFF"]),
        cmd(&[b"SET", b"cr:a", b"1"]),
        cmd(&[b"FLUSHALL"]),
        cmd(&[b"CLIENT", b"REPLY", b"ON"]),
        cmd(&[b"GET", b"cr:a"]),
        cmd(&[b"CLIENT", b"REPLY", b"SKIP"]),
        cmd(&[b"FLUSHALL"]),
        cmd(&[b"CLIENT", b"REPLY", b"SKIP"]),
        cmd(&[b"GET", b"cr:a"]),
        cmd(&[b"FLUSHALL"]),
        cmd(&[b"DEL", b"cr:a"]),
    ] {
        pipeline.extend(c);
    }
    // replies: ON's +OK, GET, FLUSHALL's NOPERM, DEL
    let (proxied, direct) = differential(&p, "app", REDIS_APP_PW, DEFAULT_RULES, &pipeline, 4, &["cr:*"]).await;
    assert_eq!(String::from_utf8_lossy(&proxied), String::from_utf8_lossy(&direct));
}

#[tokio::test]
async fn malformed_frame_closes_only_that_client() {
    let p = redis_proxy("", "").await;
    let mut other = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(other.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
    for bad in [&b"*1\r\n$-5\r\n"[..], b"*1\r\n+OK\r\n", b"*x\r\n"] {
        let mut direct = RawRedis::direct_as("portcullis", &redis().password).await;
        direct.send_raw(bad).await;
        let want = direct.read(false).await;
        let mut c = RawRedis::proxy(p.redis_port()).await;
        assert_eq!(c.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
        c.send_raw(bad).await;
        assert_eq!(String::from_utf8_lossy(&c.read(false).await), String::from_utf8_lossy(&want));
        assert!(c.closed().await, "closed after the protocol error");
    }
    assert_eq!(other.call(&["PING"]).await, b"+PONG\r\n", "other clients unaffected");
}

#[tokio::test]
async fn binary_safe_values_and_a_16_mb_value() {
    let p = redis_proxy("", "").await;
    let mut c = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(c.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
    let key: &[u8] = b"bin:\r\n\0key";
    let val: &[u8] = b"v\r\n\0\xff*1\r\n$3\r\nGET";
    c.send_raw(&cmd(&[b"SET", key, val])).await;
    assert_eq!(c.read(false).await, b"+OK\r\n");
    c.send_raw(&cmd(&[b"GET", key])).await;
    let mut want = format!("${}\r\n", val.len()).into_bytes();
    want.extend_from_slice(val);
    want.extend_from_slice(b"\r\n");
    assert_eq!(c.read(false).await, want);
    let big: Vec<u8> = (0..16 * 1024 * 1024 + 7).map(|i| (i % 251) as u8).collect();
    c.send_raw(&cmd(&[b"SET", b"big:16mb", &big])).await;
    assert_eq!(c.read(false).await, b"+OK\r\n");
    c.send_raw(&cmd(&[b"GET", b"big:16mb"])).await;
    let got = c.read(false).await;
    let header = format!("${}\r\n", big.len());
    assert!(got.starts_with(header.as_bytes()));
    assert!(got[header.len()..got.len() - 2] == big[..], "16 MB value intact");
    assert_eq!(c.call(&["DEL", "big:16mb", "bin:\r\n\0key"]).await, b":2\r\n");
}

#[tokio::test]
async fn pubsub_resp2_and_resp3() {
    let p = redis_proxy("", "").await;
    let mut publisher = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(publisher.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
    // RESP2 subscribed mode
    let mut sub = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(sub.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
    sub.send(&["SUBSCRIBE", "news", "sports"]).await;
    assert_eq!(sub.read(false).await, b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n");
    assert_eq!(sub.read(false).await, b"*3\r\n$9\r\nsubscribe\r\n$6\r\nsports\r\n:2\r\n");
    assert_eq!(publisher.call(&["PUBLISH", "news", "hello"]).await, b":1\r\n");
    assert_eq!(sub.read(false).await, b"*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n");
    sub.send(&["PING"]).await;
    assert_eq!(sub.read(false).await, b"*2\r\n$4\r\npong\r\n$0\r\n\r\n");
    // a denied command while subscribed keeps its place after the pending replies
    sub.send(&["UNSUBSCRIBE"]).await;
    sub.send(&["FLUSHALL"]).await;
    let a = sub.read(false).await;
    let b = sub.read(false).await;
    assert!(a.starts_with(b"*3\r\n$11\r\nunsubscribe\r\n") && b.starts_with(b"*3\r\n$11\r\nunsubscribe\r\n"));
    assert_eq!(sub.read(false).await, b"-NOPERM this user has no permissions to run the 'flushall' command\r\n");
    assert_eq!(sub.call(&["GET", "nope:x"]).await, b"$-1\r\n");
    // RESP3: pushes interleave with replies
    let mut s3 = RawRedis::proxy(p.redis_port()).await;
    s3.send(&["HELLO", "3", "AUTH", "app", REDIS_APP_PW]).await;
    assert!(s3.read(true).await.starts_with(b"%"));
    s3.send(&["SUBSCRIBE", "news"]).await;
    assert_eq!(s3.read(true).await, b">3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n");
    assert_eq!(publisher.call(&["PUBLISH", "news", "again"]).await, b":1\r\n");
    assert_eq!(s3.read(true).await, b">3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nagain\r\n");
    s3.send(&["GET", "nope:y"]).await;
    assert_eq!(s3.read(true).await, b"_\r\n");
    s3.send(&["FLUSHALL"]).await;
    assert_eq!(s3.read(true).await, b"-NOPERM this user has no permissions to run the 'flushall' command\r\n");
}

#[tokio::test]
async fn blocking_commands_wait_and_wake() {
    let p = redis_proxy("", "").await;
    let mut c = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(c.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
    assert_eq!(c.call(&["BLPOP", "block:empty", "0.2"]).await, b"*-1\r\n");
    c.send(&["BLPOP", "block:list", "5"]).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut pusher = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(pusher.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
    assert_eq!(pusher.call(&["RPUSH", "block:list", "item"]).await, b":1\r\n");
    assert_eq!(c.read(false).await, b"*2\r\n$10\r\nblock:list\r\n$4\r\nitem\r\n");
}
