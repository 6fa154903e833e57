//! `pool = "multiplex"`: clients with the same upstream credentials share upstream connections
//! until one sends a command that needs a connection of its own. The oracle is the real Redis:
//! what a client sees through a shared connection is what it sees directly, in order, and a
//! client that moves to its own connection (MULTI, SELECT, a blocking command, HELLO, ...)
//! first gets every shared reply it is owed. (The rest of the Redis suite also runs in this
//! mode: `PORTCULLIS_TEST_REDIS_POOL=multiplex` in scripts/test.)

mod support;

use portcullis::demo::RedisInstance;
use support::*;

const MUX: &str = "pool = \"multiplex\"";

/// The proxy's upstream connections on `r` (from CLIENT LIST, as the runtime user).
async fn upstream_conns(r: &RedisInstance) -> usize {
    let mut admin = RawRedis::direct_to(r.port, "portcullis", &r.password).await;
    let list = admin.call(&["CLIENT", "LIST"]).await;
    let text = String::from_utf8_lossy(&list).to_string();
    // every proxy connection logs in as `portcullis`; minus this admin connection
    text.lines().filter(|l| l.contains(" user=portcullis ")).count() - 1
}

async fn login(port: u16) -> RawRedis {
    let mut c = RawRedis::proxy(port).await;
    assert_eq!(c.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
    c
}

fn cmd(args: &[&str]) -> Vec<u8> {
    let v: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    portcullis::redis::codec::encode_command(&v)
}

#[tokio::test]
async fn clients_share_upstream_connections_and_each_gets_its_own_replies() {
    let r = RedisInstance::start(Some(std::process::id()), None).expect("redis-server starts");
    let p = redis_proxy_for(&r, "", MUX).await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(login(p.redis_port()).await);
    }
    // Every client pipelines its own writes and reads in one go, all at once.
    let mut tasks = Vec::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut pipe = Vec::new();
            for j in 0..200 {
                pipe.extend(cmd(&["SET", &format!("mx:{i}:{j}"), &format!("v{i}-{j}")]));
                pipe.extend(cmd(&["GET", &format!("mx:{i}:{j}")]));
                pipe.extend(cmd(&["INCR", &format!("mx:{i}:n")]));
            }
            c.send_raw(&pipe).await;
            for j in 0..200 {
                assert_eq!(c.read(false).await, b"+OK\r\n");
                let v = format!("v{i}-{j}");
                assert_eq!(c.read(false).await, format!("${}\r\n{v}\r\n", v.len()).into_bytes());
                assert_eq!(c.read(false).await, format!(":{}\r\n", j + 1).into_bytes());
            }
            c
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.unwrap());
    }
    let shared = upstream_conns(&r).await;
    assert_eq!(shared, 1, "20 clients, one shared upstream connection");
    // A client that asks for connection state gets a connection of its own; the others stay.
    assert_eq!(clients[0].call(&["SELECT", "1"]).await, b"+OK\r\n");
    assert_eq!(upstream_conns(&r).await, 2);
    assert_eq!(clients[0].call(&["GET", "mx:0:0"]).await, b"$-1\r\n", "database 1 is its own");
    assert_eq!(clients[1].call(&["GET", "mx:0:0"]).await, b"$4\r\nv0-0\r\n", "the others stay on 0");
    let m = p.metrics();
    for (event, n) in [("opened", 1), ("joined", 19), ("moved", 1)] {
        let line = format!("portcullis_redis_multiplex_total{{event=\"{event}\",listener=\"cache\"}} {n}\n");
        assert!(m.contains(&line), "{line} in\n{m}");
    }
    drop(clients);
    // The shared connection closes with its last client.
    for _ in 0..100 {
        if upstream_conns(&r).await == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("upstream connections left after every client went: {}", upstream_conns(&r).await);
}

/// Clients that log in at the same moment (an application's pool filling up, redis-benchmark's
/// 50 clients) join one shared connection: one opens it, the others wait for it rather than
/// each opening their own. Against an upstream that is down, every one of them gets the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_logging_in_together_join_one_connection() {
    let r = RedisInstance::start(Some(std::process::id()), None).expect("redis-server starts");
    let p = redis_proxy_for(&r, "", MUX).await;
    let n = 30;
    let clients = redis_clients_at_once(p.redis_port(), n, |i, mut c| async move {
        let mut pipe = cmd(&["AUTH", "app", REDIS_APP_PW]);
        pipe.extend(cmd(&["SET", &format!("together:{i}"), "x"]));
        c.send_raw(&pipe).await;
        assert_eq!(c.read(false).await, b"+OK\r\n");
        assert_eq!(c.read(false).await, b"+OK\r\n");
        c
    })
    .await;
    assert_eq!(upstream_conns(&r).await, 1, "{n} clients logging in at once, one shared connection");
    let m = p.metrics();
    for (event, k) in [("opened", 1), ("joined", n - 1)] {
        let line = format!("portcullis_redis_multiplex_total{{event=\"{event}\",listener=\"cache\"}} {k}\n");
        assert!(m.contains(&line), "{line} in\n{m}");
    }
    drop(clients);

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let down = redis_proxy("", &format!("{MUX}\nupstream = \"127.0.0.1:{closed}\"")).await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let port = down.redis_port();
        tasks.push(tokio::spawn(async move {
            let mut c = RawRedis::proxy(port).await;
            c.call(&["AUTH", "app", REDIS_APP_PW]).await
        }));
    }
    for t in tasks {
        let reply = tokio::time::timeout(std::time::Duration::from_secs(30), t).await.expect("no client waits forever");
        assert_eq!(reply.unwrap(), b"-ERR upstream unavailable\r\n", "each is told");
    }
}

/// CLIENT SETNAME / GETNAME are emulated on a shared connection with Redis's own replies and
/// checks (a direct connection is the oracle), so named clients stay shared; one that then moves
/// to its own connection takes its name there, where CLIENT INFO shows it.
#[tokio::test]
async fn client_names_are_kept_on_shared_connections() {
    let r = RedisInstance::start(Some(std::process::id()), None).expect("redis-server starts");
    let p = redis_proxy_for(&r, "", MUX).await;
    let mut a = login(p.redis_port()).await;
    let mut b = login(p.redis_port()).await;
    let mut direct = RawRedis::direct_to(r.port, "portcullis", &r.password).await;
    let steps: &[&[&str]] = &[
        &["CLIENT", "GETNAME"],
        &["CLIENT", "SETNAME", "app-1"],
        &["CLIENT", "GETNAME"],
        &["CLIENT", "SETNAME", "bad name"],
        &["CLIENT", "SETNAME", "new\nline"],
        &["CLIENT", "GETNAME"],
        &["CLIENT", "SETNAME", ""],
        &["CLIENT", "GETNAME"],
        &["client", "setname", "app-2"],
        &["CLIENT", "SETNAME"],
        &["CLIENT", "GETNAME", "extra"],
    ];
    for step in steps {
        assert_eq!(
            String::from_utf8_lossy(&a.call(step).await),
            String::from_utf8_lossy(&direct.call(step).await),
            "{step:?}"
        );
    }
    assert_eq!(b.call(&["CLIENT", "GETNAME"]).await, b"$-1\r\n", "a name is its own client's");
    assert!(!p.metrics().contains("event=\"moved\""), "nobody moved:\n{}", p.metrics());
    let info = String::from_utf8_lossy(&a.call(&["CLIENT", "INFO"]).await).to_string();
    assert!(info.contains(" name=app-2 "), "its own connection carries the name: {info}");
    assert_eq!(a.call(&["CLIENT", "GETNAME"]).await, b"$5\r\napp-2\r\n", "now from Redis itself");
    assert_eq!(b.call(&["CLIENT", "GETNAME"]).await, b"$-1\r\n");

    // An upstream user that may not name its connections: the client's own connection serves
    // unnamed, its replies in step.
    let r = RedisInstance::start(Some(std::process::id()), None).expect("redis-server starts");
    let mut admin = RawRedis::direct_to(r.port, "portcullis", &r.password).await;
    assert_eq!(admin.call(&["ACL", "SETUSER", "portcullis", "-client|setname"]).await, b"+OK\r\n");
    let p = redis_proxy_for(&r, "", MUX).await;
    let mut a = login(p.redis_port()).await;
    assert_eq!(a.call(&["CLIENT", "SETNAME", "app-3"]).await, b"+OK\r\n");
    let info = String::from_utf8_lossy(&a.call(&["CLIENT", "INFO"]).await).to_string();
    assert!(info.contains(" name= ") && info.contains(" cmd=client|info "), "its own reply, unnamed: {info}");
    assert_eq!(a.call(&["PING"]).await, b"+PONG\r\n");
}

/// A pipeline that moves to a connection of its own half-way answers exactly as Redis does:
/// the shared replies first, then the transaction that saw their writes.
#[tokio::test]
async fn moving_to_an_own_connection_mid_pipeline_keeps_order_and_writes() {
    let p = redis_proxy("", MUX).await;
    let mut pipe = Vec::new();
    for args in [
        &["SET", "mxo:k", "1"][..],
        &["INCR", "mxo:k"],
        &["CLIENT", "REPLY", "SKIP"],
        &["INCR", "mxo:k"],
        &["MULTI"],
        &["INCR", "mxo:k"],
        &["RPUSH", "mxo:l", "a"],
        &["EXEC"],
        &["GET", "mxo:k"],
        &["WATCH", "mxo:k"],
        &["UNWATCH"],
        &["LPOP", "mxo:l"],
    ] {
        pipe.extend(cmd(args));
    }
    // the direct side: a plain connection as the same rules' oracle
    acl_user("oracle-mxo", "oracle-pw", "+@all -@dangerous -@scripting -dump").await;
    let mut direct = RawRedis::direct_as("oracle-mxo", "oracle-pw").await;
    let mut proxied = login(p.redis_port()).await;
    let n = 10; // CLIENT REPLY SKIP and the INCR it skips answer nothing
    let mut got = (Vec::new(), Vec::new());
    let mut admin = RawRedis::direct_as("portcullis", &redis().password).await;
    admin.call(&["DEL", "mxo:k", "mxo:l"]).await;
    proxied.send_raw(&pipe).await;
    for _ in 0..n {
        got.0.extend(proxied.read(false).await);
    }
    admin.call(&["DEL", "mxo:k", "mxo:l"]).await;
    direct.send_raw(&pipe).await;
    for _ in 0..n {
        got.1.extend(direct.read(false).await);
    }
    assert_eq!(String::from_utf8_lossy(&got.0), String::from_utf8_lossy(&got.1));
    assert!(
        got.0.ends_with(b"*2\r\n:4\r\n:1\r\n$1\r\n4\r\n+OK\r\n+OK\r\n$1\r\na\r\n"),
        "{}",
        String::from_utf8_lossy(&got.0)
    );
}

/// A blocking command moves its client off the shared connection: the others are not held up.
#[tokio::test]
async fn a_blocking_client_does_not_hold_up_the_others() {
    let p = redis_proxy("", MUX).await;
    let mut admin = RawRedis::direct_as("portcullis", &redis().password).await;
    admin.call(&["DEL", "mxb:q"]).await;
    let mut blocked = login(p.redis_port()).await;
    let mut other = login(p.redis_port()).await;
    assert_eq!(blocked.call(&["SET", "mxb:x", "1"]).await, b"+OK\r\n");
    blocked.send(&["BLPOP", "mxb:q", "0"]).await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    for i in 0..100 {
        assert_eq!(other.call(&["INCR", "mxb:n"]).await.first(), Some(&b':'), "request {i}");
    }
    assert_eq!(other.call(&["RPUSH", "mxb:q", "woke"]).await, b":1\r\n");
    assert_eq!(blocked.read(false).await, b"*2\r\n$5\r\nmxb:q\r\n$4\r\nwoke\r\n");
    assert_eq!(blocked.call(&["GET", "mxb:x"]).await, b"$1\r\n1\r\n");
}

/// RESP3 (HELLO 3) and HELLO AUTH get a connection of their own; pub/sub too.
#[tokio::test]
async fn hello_and_pubsub_clients_work_on_their_own_connections() {
    let p = redis_proxy("", MUX).await;
    let mut c = RawRedis::proxy(p.redis_port()).await;
    c.send(&["HELLO", "3", "AUTH", "app", REDIS_APP_PW]).await;
    let hello = c.read(true).await;
    assert!(hello.starts_with(b"%"), "{}", String::from_utf8_lossy(&hello));
    assert_eq!(c.call(&["SET", "mxh:k", "v"]).await, b"+OK\r\n");
    c.send(&["HGETALL", "mxh:none"]).await;
    assert_eq!(c.read(true).await, b"%0\r\n", "RESP3 map: the connection speaks RESP3");
    let mut sub = login(p.redis_port()).await;
    assert_eq!(sub.call(&["SET", "mxh:before", "1"]).await, b"+OK\r\n");
    sub.send(&["SUBSCRIBE", "mxh:chan"]).await;
    assert_eq!(sub.read(false).await, b"*3\r\n$9\r\nsubscribe\r\n$8\r\nmxh:chan\r\n:1\r\n");
    let mut publisher = login(p.redis_port()).await;
    assert_eq!(publisher.call(&["PUBLISH", "mxh:chan", "hi"]).await, b":1\r\n");
    assert_eq!(sub.read(false).await, b"*3\r\n$7\r\nmessage\r\n$8\r\nmxh:chan\r\n$2\r\nhi\r\n");
}

/// The shared connection's Redis restarts: a client owed a reply is told and closed, an idle
/// one carries on over a new shared connection.
#[tokio::test]
async fn a_lost_shared_connection_fails_those_owed_replies_and_is_replaced() {
    // (two idle clients: the dead connection's sender outlives its task in their links)
    let mut r = RedisInstance::start(Some(std::process::id()), None).expect("redis-server starts");
    let p = redis_proxy_for(&r, "", MUX).await;
    // different users, the same upstream credentials: the same shared connection
    let mut waiting = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(waiting.call(&["AUTH", "admin", REDIS_ADMIN_PW]).await, b"+OK\r\n");
    let mut idle = login(p.redis_port()).await;
    let mut idle2 = login(p.redis_port()).await;
    assert_eq!(idle2.call(&["PING"]).await, b"+PONG\r\n");
    assert_eq!(waiting.call(&["SET", "k", "1"]).await, b"+OK\r\n");
    assert_eq!(idle.call(&["GET", "k"]).await, b"$1\r\n1\r\n");
    // a slow script keeps the shared connection's reply owed while Redis goes away
    waiting.send(&["EVAL", "local t = redis.call('TIME') while true do end", "0"]).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    r.kill();
    assert_eq!(waiting.read(false).await, b"-ERR upstream unavailable\r\n");
    assert!(waiting.closed().await);
    r.restart().expect("redis restarts");
    let mut ok = false;
    for _ in 0..50 {
        let got = idle.call(&["PING"]).await;
        if got == b"+PONG\r\n" {
            ok = true;
            break;
        }
        assert_eq!(got, b"-ERR upstream unavailable\r\n");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ok, "the idle client works again once Redis is back");
    // and a new client is not handed the dead connection
    let mut fresh = login(p.redis_port()).await;
    assert_eq!(fresh.call(&["PING"]).await, b"+PONG\r\n");
    drop(idle2);
}

/// A client whose shared replies are still owed when it asks for a connection of its own: the
/// request waits (unparsed) until they are in, then runs on the new connection, after them.
#[tokio::test]
async fn a_move_waits_for_the_replies_the_shared_connection_owes() {
    let p = redis_proxy("", MUX).await;
    let mut c = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(c.call(&["AUTH", "admin", REDIS_ADMIN_PW]).await, b"+OK\r\n");
    assert_eq!(c.call(&["DEL", "mxw:k"]).await.first(), Some(&b':'));
    // a script that keeps Redis (and so the shared reply) busy for 300 ms
    let busy = "local t = redis.call('TIME') local s = t[1] * 1000000 + t[2] \
                repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - s > 300000 return 1";
    c.send(&["EVAL", busy, "0"]).await;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let mut pipe = Vec::new();
    for args in
        [&["SET", "mxw:k", "1"][..], &["INCR", "mxw:k"], &["MULTI"], &["INCR", "mxw:k"], &["EXEC"], &["GET", "mxw:k"]]
    {
        pipe.extend(cmd(args));
    }
    c.send_raw(&pipe).await;
    let mut got = Vec::new();
    for _ in 0..7 {
        got.extend(c.read(false).await);
    }
    assert_eq!(String::from_utf8_lossy(&got), ":1\r\n+OK\r\n:2\r\n+OK\r\n+QUEUED\r\n*1\r\n:3\r\n$1\r\n3\r\n");
}

/// A refused re-AUTH after shared requests in the same batch: those requests still go (and
/// answer) and the client keeps its identity, as with Redis.
#[tokio::test]
async fn a_refused_auth_mid_batch_loses_nothing() {
    let p = redis_proxy("", MUX).await;
    let mut c = login(p.redis_port()).await;
    let mut pipe = Vec::new();
    for args in [&["SET", "mxa:k", "v"][..], &["AUTH", "app", "wrong"]] {
        pipe.extend(cmd(args));
    }
    c.send_raw(&pipe).await;
    assert_eq!(c.read(false).await, b"+OK\r\n");
    assert_eq!(c.read(false).await, b"-WRONGPASS invalid username-password pair or user is disabled.\r\n");
    assert_eq!(c.call(&["GET", "mxa:k"]).await, b"$1\r\nv\r\n");
}

/// A client that pipelines reads of a large value and never reads its replies: its replies
/// wait in the proxy charged to `max_buffered_bytes` (here 4 MiB) and its further requests are
/// not read (per-client flow control), so memory stays bounded; the clients sharing its
/// upstream connection carry on; nothing stays charged once it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_neither_grows_memory_nor_stalls_the_others() {
    let p = redis_proxy("[limits]\nmax_buffered_bytes = 4194304\n", MUX).await;
    let mut admin = RawRedis::direct_as("portcullis", &redis().password).await;
    let big = "b".repeat(200 * 1024);
    assert_eq!(admin.call(&["SET", "mxm:big", &big]).await, b"+OK\r\n");
    let mut stuck = login(p.redis_port()).await;
    let mut other = login(p.redis_port()).await;
    assert_eq!(other.call(&["SET", "mxm:small", "s"]).await, b"+OK\r\n");
    // 40 MB of replies asked for, none read
    let get = cmd(&["GET", "mxm:big"]);
    let pipe: Vec<u8> = get.iter().copied().cycle().take(get.len() * 200).collect();
    stuck.send_raw(&pipe).await;
    let limit = 4 * 1024 * 1024;
    for i in 0..200 {
        assert_eq!(other.call(&["GET", "mxm:small"]).await, b"$1\r\ns\r\n", "request {i}");
        let used = p.running.shared().request_memory.used();
        assert!(used <= limit, "{used} bytes charged, over the 4 MiB budget");
    }
    drop(stuck);
    for _ in 0..100 {
        if p.running.shared().request_memory.used() == 0 {
            assert_eq!(other.call(&["GET", "mxm:small"]).await, b"$1\r\ns\r\n");
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("still charged: {}", p.running.shared().request_memory.used());
}

/// A client reading many large replies slowly is slowed down, not refused, while the budget
/// has room (here 96 MiB; a client's share when memory is short is 24 MiB): 40 MiB of replies
/// asked for in one pipeline, more than the sockets hold, read after a pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_of_large_replies_is_not_refused_while_there_is_room() {
    let p = redis_proxy("[limits]\nmax_buffered_bytes = 100663296\n", MUX).await;
    let mut admin = RawRedis::direct_as("portcullis", &redis().password).await;
    let big = "g".repeat(1 << 20);
    assert_eq!(admin.call(&["SET", "mxs:big", &big]).await, b"+OK\r\n");
    let mut c = login(p.redis_port()).await;
    let get = cmd(&["GET", "mxs:big"]);
    let pipe: Vec<u8> = get.iter().copied().cycle().take(get.len() * 40).collect();
    c.send_raw(&pipe).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let want = format!("${}\r\n", big.len()).len() + big.len() + 2;
    for i in 0..40 {
        assert_eq!(c.read(false).await.len(), want, "reply {i}, whole");
    }
    assert_eq!(c.call(&["PING"]).await, b"+PONG\r\n");
}

/// A push that answers no request — an invalidation another client redirects to the shared
/// RESP3 connection (CLIENT TRACKING … REDIRECT <its id>) — is dropped: the clients on that
/// connection get their own replies, in order, and keep their connection.
#[tokio::test]
async fn a_push_redirected_to_a_shared_connection_is_dropped() {
    let r = RedisInstance::start(Some(std::process::id()), None).expect("redis-server starts");
    let p = redis_proxy_for(&r, "", MUX).await;
    let mut three = RawRedis::proxy(p.redis_port()).await;
    three.send(&["HELLO", "3", "AUTH", "app", REDIS_APP_PW]).await;
    assert!(three.read(true).await.starts_with(b"%7\r\n"));
    let mut admin = RawRedis::direct_to(r.port, "portcullis", &r.password).await;
    let list = String::from_utf8_lossy(&admin.call(&["CLIENT", "LIST"]).await).to_string();
    let shared = list
        .lines()
        .find(|l| l.contains(" resp=3") && l.contains(" user=portcullis "))
        .and_then(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .expect("the shared RESP3 connection in CLIENT LIST")
        .to_string();
    assert_eq!(admin.call(&["CLIENT", "TRACKING", "ON", "REDIRECT", &shared]).await, b"+OK\r\n");
    for i in 0..5 {
        let key = format!("tracked:{i}");
        assert_eq!(admin.call(&["GET", &key]).await, b"$-1\r\n");
        assert_eq!(admin.call(&["SET", &key, "v"]).await, b"+OK\r\n", "sends an invalidation to the shared connection");
        three.send(&["GET", &key]).await;
        assert_eq!(three.read(true).await, b"$1\r\nv\r\n", "its own reply, not the push");
    }
    three.send(&["PING"]).await;
    assert_eq!(three.read(true).await, b"+PONG\r\n");
    let list = String::from_utf8_lossy(&admin.call(&["CLIENT", "LIST"]).await).to_string();
    assert!(list.lines().any(|l| l.starts_with(&format!("id={shared} "))), "the same shared connection:\n{list}");
}

/// HELLO without SETNAME keeps a client on shared connections, of the protocol it asks for
/// (the reply is the shared connection's own HELLO reply); when a RESP3 client moves to its
/// own connection, that one speaks RESP3 too; HELLO … SETNAME shares too, its name kept.
#[tokio::test]
async fn hello_clients_share_connections_of_their_protocol() {
    let r = RedisInstance::start(Some(std::process::id()), None).expect("redis-server starts");
    let p = redis_proxy_for(&r, "", MUX).await;
    let mut three = RawRedis::proxy(p.redis_port()).await;
    three.send(&["HELLO", "3", "AUTH", "app", REDIS_APP_PW]).await;
    let hello_a = three.read(true).await;
    let opened = "portcullis_redis_multiplex_total{event=\"opened\",listener=\"cache\"} 1\n";
    assert!(p.metrics().contains(opened), "HELLO 3 AUTH opens the RESP3 connection only\n{}", p.metrics());
    let mut two = login(p.redis_port()).await;
    assert!(hello_a.starts_with(b"%7\r\n"), "{}", String::from_utf8_lossy(&hello_a));
    assert!(String::from_utf8_lossy(&hello_a).contains("$5\r\nproto\r\n:3\r\n"));
    let mut three_b = login(p.redis_port()).await;
    three_b.send(&["HELLO", "3"]).await;
    assert_eq!(three_b.read(true).await, hello_a, "the same shared connection's reply");
    assert_eq!(two.call(&["GET", "nothing"]).await, b"$-1\r\n");
    three.send(&["HGETALL", "nothing"]).await;
    assert_eq!(three.read(true).await, b"%0\r\n", "RESP3 map");
    three_b.send(&["GET", "nothing"]).await;
    assert_eq!(three_b.read(true).await, b"_\r\n", "RESP3 null");
    assert_eq!(two.call(&["HGETALL", "nothing"]).await, b"*0\r\n", "RESP2 array");
    assert_eq!(upstream_conns(&r).await, 2, "one shared connection per protocol");
    // a RESP3 client moving to its own connection keeps RESP3
    let mut pipe = Vec::new();
    for args in [&["MULTI"][..], &["HGETALL", "nothing"], &["EXEC"]] {
        pipe.extend(cmd(args));
    }
    three.send_raw(&pipe).await;
    assert_eq!(three.read(true).await, b"+OK\r\n");
    assert_eq!(three.read(true).await, b"+QUEUED\r\n");
    assert_eq!(three.read(true).await, b"*1\r\n%0\r\n");
    assert_eq!(upstream_conns(&r).await, 3);
    // HELLO 2 on the RESP2 client: its shared connection's reply
    two.send(&["HELLO", "2"]).await;
    let hello_two = two.read(false).await;
    assert!(hello_two.starts_with(b"*14\r\n"), "{}", String::from_utf8_lossy(&hello_two));
    // HELLO … SETNAME (go-redis with a ClientName) stays shared: the proxy keeps the name, and
    // sets it on the client's own connection if it moves to one
    let mut named = RawRedis::proxy(p.redis_port()).await;
    named.send(&["HELLO", "3", "AUTH", "app", REDIS_APP_PW, "SETNAME", "mine"]).await;
    assert_eq!(named.read(true).await, hello_a, "the shared RESP3 connection's reply");
    named.send(&["CLIENT", "GETNAME"]).await;
    assert_eq!(named.read(true).await, b"$4\r\nmine\r\n");
    assert_eq!(upstream_conns(&r).await, 3, "no connection of its own");
    named.send(&["HELLO", "3", "SETNAME", "bad name"]).await;
    assert_eq!(named.read(true).await, b"-ERR Client names cannot contain spaces, newlines or special characters.\r\n");
    named.send(&["CLIENT", "INFO"]).await;
    let info = String::from_utf8_lossy(&named.read(true).await).to_string();
    assert!(info.contains(" name=mine ") && info.contains(" resp=3"), "its own connection, named, RESP3: {info}");
    assert_eq!(upstream_conns(&r).await, 4);
}

/// A large value streams from a shared connection at the pace its client takes it: a 24 MiB
/// value comes back byte for byte under an 8 MiB budget. A client that asks for one (and 40
/// more replies that stream) and stops reading holds the connection only for a moment, once:
/// then it reads on (charging what waits for that client), and a client sharing the connection
/// gets its reply, in order after them, within the read timeout (40 stalls would exceed it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_value_streams_and_a_stalled_reader_does_not_hold_the_others() {
    let own = RedisInstance::start(None, None).expect("redis-server starts");
    let p = redis_proxy_for(&own, "[limits]\nmax_buffered_bytes = 8388608\n", MUX).await;
    let mut admin = RawRedis::direct_to(own.port, "portcullis", &own.password).await;
    let big: Vec<u8> = (0..24 << 20).map(|i| (i % 253) as u8).collect();
    admin.send_raw(&portcullis::redis::codec::encode_command(&[b"SET", b"mxst:big", &big])).await;
    assert_eq!(admin.read(false).await, b"+OK\r\n");
    assert_eq!(admin.call(&["SET", "mxst:small", "s"]).await, b"+OK\r\n");
    assert_eq!(admin.call(&["SET", "mxst:mid", &"m".repeat(40 * 1024)]).await, b"+OK\r\n");
    drop(admin);

    let mut reader = login(p.redis_port()).await;
    let got = reader.call(&["GET", "mxst:big"]).await;
    let header = format!("${}\r\n", big.len());
    assert!(got.starts_with(header.as_bytes()) && got[header.len()..got.len() - 2] == big[..], "byte for byte");

    let mut stuck = login(p.redis_port()).await;
    let mut other = login(p.redis_port()).await;
    assert_eq!(upstream_conns(&own).await, 1, "all three share one connection");
    // one large value, then 40 more requests, each its own batch, all of whose replies stream
    stuck.send(&["GET", "mxst:big"]).await;
    for _ in 0..40 {
        stuck.send(&["GET", "mxst:mid"]).await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(other.call(&["GET", "mxst:small"]).await, b"$1\r\ns\r\n", "not held up for good");
    assert_eq!(reader.call(&["GET", "mxst:small"]).await, b"$1\r\ns\r\n");
    drop(stuck);
    assert_eq!(other.call(&["PING"]).await, b"+PONG\r\n");
}
