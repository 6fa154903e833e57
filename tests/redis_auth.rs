//! Redis through the proxy, before and at authentication: TLS, the pre-auth refusals (the
//! real Redis is the oracle for every text), local AUTH/HELLO AUTH, lockout, RESET, and that
//! nothing from an unauthenticated client reaches Redis.

mod support;

use support::*;

#[tokio::test]
async fn plaintext_client_gets_the_tls_error() {
    let p = redis_proxy("", "").await;
    let mut s = RawRedis::plain(p.redis_port()).await;
    s.send_raw(b"PING\r\n").await;
    assert_eq!(s.read(false).await, b"-ERR TLS is required by this server (use rediss:// or --tls)\r\n");
    assert!(s.closed().await);
}

/// Clients that connect together (a pool filling up) fetch the upstream's command table once:
/// the first connection fetches it, the others wait for it and use it, instead of each asking
/// Redis for the whole COMMAND reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_connecting_together_fetch_the_command_table_once() {
    let own = portcullis::demo::RedisInstance::start(None, None).unwrap();
    let p = redis_proxy_for(&own, "", "").await;
    let n = 20;
    let _clients = redis_clients_at_once(p.redis_port(), n, |i, mut c| async move {
        assert_eq!(c.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
        assert_eq!(c.call(&["SET", &format!("fetch:{i}"), "v"]).await, b"+OK\r\n", "the upstream's table in force");
        c
    })
    .await;
    let mut admin = RawRedis::direct_to(own.port, "portcullis", &own.password).await;
    let stats = String::from_utf8(admin.call(&["INFO", "commandstats"]).await).unwrap();
    assert!(stats.contains("cmdstat_command:calls=1,"), "{n} clients, one COMMAND fetch:\n{stats}");

    // An upstream that refuses COMMAND: the built-in table serves, and nobody is held up.
    let refusing = portcullis::demo::RedisInstance::start(None, None).unwrap();
    let mut admin = RawRedis::direct_to(refusing.port, "portcullis", &refusing.password).await;
    assert_eq!(admin.call(&["ACL", "SETUSER", "portcullis", "-command"]).await, b"+OK\r\n");
    let p = redis_proxy_for(&refusing, "", "").await;
    let mut tasks = Vec::new();
    for i in 0..n {
        let port = p.redis_port();
        tasks.push(tokio::spawn(async move {
            let mut c = RawRedis::proxy(port).await;
            assert_eq!(c.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
            assert_eq!(c.call(&["SET", &format!("fetch:{i}"), "v"]).await, b"+OK\r\n", "the built-in table");
        }));
    }
    for t in tasks {
        tokio::time::timeout(std::time::Duration::from_secs(30), t).await.expect("nobody waits for long").unwrap();
    }
    let stats = String::from_utf8(admin.call(&["INFO", "commandstats"]).await).unwrap();
    assert!(stats.contains("cmdstat_command:calls=0,"), "refused, never run:\n{stats}");
    let rejected: usize = stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_command:"))
        .and_then(|l| l.split(',').find_map(|f| f.strip_prefix("rejected_calls=")))
        .and_then(|v| v.parse().ok())
        .expect("rejected_calls");
    assert!(rejected < n, "those that waited for a refused fetch do not ask again ({rejected} of {n})");
}

fn command_calls(stats: &[u8]) -> usize {
    String::from_utf8_lossy(stats)
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_command:calls="))
        .and_then(|l| l.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// After a reload to another upstream, a session that took the old upstream's command table
/// (accepted before the reload, authenticated after it) fetches the new upstream's when it
/// connects there, rather than applying the old server's table to the new one; sessions after
/// it take that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_to_another_upstream_fetches_its_command_table() {
    let old = portcullis::demo::RedisInstance::start(None, None).unwrap();
    let new = portcullis::demo::RedisInstance::start(None, None).unwrap();
    let p = redis_proxy_for(&old, "", "").await;
    let mut first = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(first.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
    let mut early = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(early.call(&["PING"]).await, b"-NOAUTH Authentication required.\r\n");
    let mut early2 = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(early2.call(&["PING"]).await, b"-NOAUTH Authentication required.\r\n");

    let cfg = std::fs::read_to_string(&p.config_path).unwrap();
    let moved = cfg.replace(&format!("127.0.0.1:{}\"", old.port), &format!("127.0.0.1:{}\"", new.port));
    assert_ne!(cfg, moved);
    std::fs::write(&p.config_path, moved).unwrap();
    std::fs::write(p.dir.path().join("redis.pass"), &new.password).unwrap();
    p.running.reload().expect("reload");

    let mut admin = RawRedis::direct_to(new.port, "portcullis", &new.password).await;
    assert_eq!(early.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
    assert_eq!(early.call(&["SET", "moved:a", "v"]).await, b"+OK\r\n");
    assert_eq!(command_calls(&admin.call(&["INFO", "commandstats"]).await), 1, "the new upstream's table, fetched");
    let mut later = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(later.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
    assert_eq!(later.call(&["GET", "moved:a"]).await, b"$1\r\nv\r\n", "on the new upstream");
    // another session from before the reload (with multiplexing it joins the new connection)
    assert_eq!(early2.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
    assert_eq!(early2.call(&["GET", "moved:a"]).await, b"$1\r\nv\r\n");
    assert_eq!(command_calls(&admin.call(&["INFO", "commandstats"]).await), 1, "and used by the next sessions");
    assert_eq!(first.call(&["PING"]).await, b"+PONG\r\n", "the session on the old upstream carries on");
}

#[tokio::test]
async fn preauth_commands_get_redis_own_answers_and_never_reach_it() {
    // A private Redis, so that nothing else counts in its stats.
    let own = portcullis::demo::RedisInstance::start(None, None).unwrap();
    let p = redis_proxy_for(&own, "", "").await;
    let mut admin = RawRedis::direct_to(own.port, "portcullis", &own.password).await;
    let stats_before = String::from_utf8(admin.call(&["INFO", "commandstats"]).await).unwrap();
    let mut proxied = RawRedis::proxy(p.redis_port()).await;
    let clients_before = admin.call(&["CLIENT", "LIST"]).await;
    let mut direct = RawRedis::direct().await;
    let cases: &[&[&str]] = &[
        &["GET", "k"],
        &["SET", "k", "v"],
        &["FLUSHALL"],
        &["CONFIG", "GET", "*"],
        &["PING"],
        &["HELLO"],
        &["HELLO", "3"],
        &["HELLO", "3", "SETNAME", "x"],
        &["HELLO", "4"],
        &["HELLO", "x"],
        &["AUTH", "nobody", "wrong"],
        &["AUTH", "wrong"],
        &["AUTH"],
        &["AUTH", "a", "b", "c"],
        &["CLIENT", "SETNAME", "x"],
        &["FOO", "bar", "baz"],
        &["GET"],
        &["CLIENT", "NOSUCH"],
        &["RESET", "x"],
        &["HELLO", "+3"],
        &["HELLO", "03"],
        &["HELLO", "3", "BOGUS"],
        &["HELLO", "3", "SETNAME", "a b"],
    ];
    for args in cases {
        let want = direct.call(args).await;
        let got = proxied.call(args).await;
        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(&want), "{args:?}");
    }
    // RESET is answered before authentication too.
    assert_eq!(proxied.call(&["RESET"]).await, direct.call(&["RESET"]).await);
    // The upstream saw none of it: no new client, no command counted (our own INFO aside).
    let clients_after = admin.call(&["CLIENT", "LIST"]).await;
    // (the proxy's health probe may be connected for an instant: it never logs in)
    let count = |b: &[u8]| String::from_utf8_lossy(b).matches("user=portcullis").count();
    assert_eq!(count(&clients_after), count(&clients_before), "{}", String::from_utf8_lossy(&clients_after));
    assert_eq!(count(&clients_after), 1, "only the admin connection is logged in");
    let stats_after = String::from_utf8(admin.call(&["INFO", "commandstats"]).await).unwrap();
    for cmd in ["cmdstat_get:", "cmdstat_set:", "cmdstat_flushall:", "cmdstat_config|get:"] {
        let count = |s: &str| s.lines().find(|l| l.starts_with(cmd)).map(str::to_string);
        assert_eq!(count(&stats_before), count(&stats_after), "{cmd} reached Redis");
    }
    // QUIT before auth: +OK and close.
    assert_eq!(proxied.call(&["QUIT"]).await, b"+OK\r\n");
    assert!(proxied.closed().await);
}

#[tokio::test]
async fn auth_then_commands_run_as_the_proxy_user() {
    let p = redis_proxy("", "").await;
    let mut c = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(c.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
    assert_eq!(c.call(&["SET", "auth-test:k", "v"]).await, b"+OK\r\n");
    assert_eq!(c.call(&["GET", "auth-test:k"]).await, b"$1\r\nv\r\n");
    // Upstream sees the proxy's ACL user, never the client's.
    assert_eq!(c.call(&["ACL", "WHOAMI"]).await, b"$10\r\nportcullis\r\n");
    // AUTH default-user form with a wrong password: WRONGPASS, session unchanged
    assert_eq!(c.call(&["AUTH", "nope"]).await, b"-WRONGPASS invalid username-password pair or user is disabled.\r\n");
    assert_eq!(c.call(&["GET", "auth-test:k"]).await, b"$1\r\nv\r\n");
}

#[tokio::test]
async fn hello_3_auth_setname_and_reset() {
    let p = redis_proxy("", "").await;
    let mut c = RawRedis::proxy(p.redis_port()).await;
    c.send(&["HELLO", "3", "AUTH", "app", REDIS_APP_PW, "SETNAME", "hello-client"]).await;
    let hello = c.read(true).await;
    assert!(hello.starts_with(b"%"), "RESP3 map: {}", String::from_utf8_lossy(&hello));
    assert!(hello.windows(5).any(|w| w == b":3\r\n$" || w == b"proto"));
    c.send(&["CLIENT", "GETNAME"]).await;
    assert_eq!(c.read(true).await, b"$12\r\nhello-client\r\n");
    // RESP3 null for a missing key
    c.send(&["GET", "no-such-key-xyz"]).await;
    assert_eq!(c.read(true).await, b"_\r\n");
    c.send(&["RESET"]).await;
    assert_eq!(c.read(true).await, b"+RESET\r\n");
    // back to unauthenticated, RESP2
    assert_eq!(c.call(&["GET", "x"]).await, b"-NOAUTH Authentication required.\r\n");
    assert_eq!(c.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
    assert_eq!(c.call(&["GET", "no-such-key-xyz"]).await, b"$-1\r\n");
}

#[tokio::test]
async fn reauth_switches_user_and_policy() {
    let p = redis_proxy("", "").await;
    let mut c = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(c.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
    let denied = b"-NOPERM this user has no permissions to run the 'config|get' command\r\n";
    assert_eq!(c.call(&["CONFIG", "GET", "maxmemory"]).await, denied);
    assert_eq!(c.call(&["AUTH", "admin", REDIS_ADMIN_PW]).await, b"+OK\r\n");
    assert!(c.call(&["CONFIG", "GET", "maxmemory"]).await.starts_with(b"*2\r\n"));
    assert_eq!(c.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
    assert_eq!(c.call(&["CONFIG", "GET", "maxmemory"]).await, denied);
}

#[tokio::test]
async fn wrong_passwords_lead_to_lockout() {
    let p = redis_proxy("[lockout]\nmax_failures = 3\nwindow = \"1m\"\nban = \"1m\"\n", "").await;
    let mut c = RawRedis::proxy(p.redis_port()).await;
    for _ in 0..3 {
        assert_eq!(
            c.call(&["AUTH", "app", "bad"]).await,
            b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
        );
    }
    assert_eq!(c.call(&["AUTH", "app", REDIS_APP_PW]).await, b"-ERR too many failed authentication attempts\r\n");
    let mut other = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(other.call(&["AUTH", "app", REDIS_APP_PW]).await, b"-ERR too many failed authentication attempts\r\n");
    assert!(p.metrics().contains("portcullis_lockouts_total 1"));
}

#[tokio::test]
async fn client_certificate_identity_needs_no_auth() {
    let p = redis_proxy("", "").await;
    let mut c = RawRedis::proxy_with_cert(p.redis_port()).await;
    assert_eq!(c.call(&["PING"]).await, b"+PONG\r\n");
    assert_eq!(c.call(&["FLUSHALL"]).await, b"-NOPERM this user has no permissions to run the 'flushall' command\r\n");
    // without a certificate: NOAUTH
    let mut n = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(n.call(&["PING"]).await, b"-NOAUTH Authentication required.\r\n");
}

#[tokio::test]
async fn upstream_down_is_reported_without_its_address() {
    let dead = portcullis::demo::free_port().unwrap();
    let p = redis_proxy("", &format!("upstream = \"127.0.0.1:{dead}\"")).await;
    let mut c = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(c.call(&["AUTH", "app", REDIS_APP_PW]).await, b"-ERR upstream unavailable\r\n");
    assert!(p.metrics().contains(r#"portcullis_upstream_up{listener="cache"} 0"#), "{}", p.metrics());
    let admin = portcullis::admin::route(p.running.shared(), &hyper::Method::GET, "/readyz");
    assert_eq!(admin.status(), 503);
}

#[tokio::test]
async fn nul_bytes_in_inline_requests_are_harmless() {
    // Redis itself looks for the inline newline with strchr and stalls on a NUL (the request
    // never completes); the proxy ends the line at the NUL instead and answers. Either way
    // nothing runs: this is about not hanging or looping.
    let p = redis_proxy("", "").await;
    let mut proxied = RawRedis::proxy(p.redis_port()).await;
    proxied.send_raw(b"\0\nGET a\0b\r\nPING\r\n").await;
    assert_eq!(proxied.read(false).await, b"-NOAUTH Authentication required.\r\n");
    assert_eq!(proxied.read(false).await, b"-NOAUTH Authentication required.\r\n");
    assert_eq!(proxied.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
    proxied.send_raw(b"SET app:nul x\0ignored\r\nGET app:nul\r\n").await;
    assert_eq!(proxied.read(false).await, b"+OK\r\n");
    assert_eq!(proxied.read(false).await, b"$1\r\nx\r\n");
}

#[tokio::test]
async fn replication_streams_are_never_proxied() {
    let p = redis_proxy("", "").await;
    let mut c = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(c.call(&["AUTH", "admin", REDIS_ADMIN_PW]).await, b"+OK\r\n");
    for (args, name) in [
        (&["PSYNC", "?", "-1"][..], "psync"),
        (&["SYNC"][..], "sync"),
        (&["REPLCONF", "listening-port", "1"][..], "replconf"),
    ] {
        let want = format!("-NOPERM this user has no permissions to run the '{name}' command\r\n");
        assert_eq!(String::from_utf8(c.call(args).await).unwrap(), want);
    }
    assert_eq!(c.call(&["PING"]).await, b"+PONG\r\n");
}
