//! The TTL policy against a real Redis: keys matching a rule always end up with a TTL in
//! (0, max], whatever the client sends; the replies the client sees are those of the same
//! commands without the policy, except PERSIST (refused).

mod support;

use proptest::prelude::*;
use support::*;

const RULES: &str = "ttl = [ { pattern = \"session:*\", default = \"30m\", max = \"24h\" }, { pattern = \"chat:*\", default = \"7d\", max = \"30d\", allow_scripts = true } ]";

fn cmd(args: &[&[u8]]) -> Vec<u8> {
    portcullis::redis::codec::encode_command(args)
}

/// TTL (seconds) of `key` straight from Redis.
async fn ttl_of(admin: &mut RawRedis, key: &str) -> i64 {
    let r = admin.call(&["TTL", key]).await;
    String::from_utf8_lossy(&r[1..r.len() - 2]).parse().unwrap()
}

#[tokio::test]
async fn every_family_ends_with_a_bounded_ttl() {
    let own = portcullis::demo::RedisInstance::start(None, None).unwrap();
    let p = redis_proxy_for(&own, "", RULES).await;
    let mut c = RawRedis::proxy(p.redis_port()).await;
    assert_eq!(c.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
    let script: &[(&[&str], &[u8])] = &[
        (&["SET", "session:a", "v"], b"+OK\r\n"),
        (&["SET", "session:b", "v", "EX", "999999"], b"+OK\r\n"),
        (&["SET", "session:k", "v", "KEEPTTL"], b"+OK\r\n"),
        (&["HSET", "session:c", "f", "v"], b":1\r\n"),
        (&["LPUSH", "chat:1", "m"], b":1\r\n"),
        (&["SET", "other", "v"], b"+OK\r\n"),
        (&["RENAME", "other", "session:e"], b"+OK\r\n"),
        (&["MSET", "session:m1", "1", "plain", "2"], b"+OK\r\n"),
        (&["SETEX", "chat:2", "99999999", "v"], b"+OK\r\n"),
        (&["GETEX", "session:a", "PERSIST"], b"$1\r\nv\r\n"),
        (&["EXPIRE", "session:c", "999999"], b":1\r\n"),
        (&["INCR", "session:n"], b":1\r\n"),
        (
            &["PERSIST", "session:a"],
            b"-NOPERM PERSIST is refused: the key is under the TTL policy 'session:*' (keys must expire)\r\n",
        ),
        (&["PERSIST", "plain"], b":0\r\n"),
    ];
    for (args, want) in script {
        assert_eq!(String::from_utf8_lossy(&c.call(args).await), String::from_utf8_lossy(want), "{args:?}");
    }
    // MULTI: the key written inside gets its TTL right after EXEC
    c.send_raw(&[cmd(&[b"MULTI"]), cmd(&[b"HSET", b"session:tx", b"f", b"v"]), cmd(&[b"EXEC"])].concat()).await;
    assert_eq!(c.read(false).await, b"+OK\r\n");
    assert_eq!(c.read(false).await, b"+QUEUED\r\n");
    assert_eq!(c.read(false).await, b"*1\r\n:1\r\n");
    assert_eq!(c.call(&["PING"]).await, b"+PONG\r\n", "the injected EXPIRE's reply never reaches the client");
    // CLIENT REPLY OFF: the injected EXPIRE's reply is swallowed all the same
    c.send_raw(
        &[
            cmd(&[b"CLIENT", b"REPLY", b"OFF"]),
            cmd(&[b"HSET", b"session:off", b"f", b"v"]),
            cmd(&[b"CLIENT", b"REPLY", b"ON"]),
            cmd(&[b"PING"]),
        ]
        .concat(),
    )
    .await;
    assert_eq!(c.read(false).await, b"+OK\r\n");
    assert_eq!(c.read(false).await, b"+PONG\r\n");
    // inline requests get their EXPIRE too, in order
    c.send_raw(b"HSET session:inline f v\r\nPING\r\n").await;
    assert_eq!(c.read(false).await, b":1\r\n");
    assert_eq!(c.read(false).await, b"+PONG\r\n");
    // MULTI with a WATCH inside (run at once by Redis, not queued): EXEC still loses only the
    // proxy's results
    c.send_raw(
        &[cmd(&[b"MULTI"]), cmd(&[b"WATCH", b"x"]), cmd(&[b"HSET", b"session:w", b"f", b"v"]), cmd(&[b"EXEC"])]
            .concat(),
    )
    .await;
    assert_eq!(c.read(false).await, b"+OK\r\n");
    assert!(c.read(false).await.starts_with(b"-ERR"));
    assert_eq!(c.read(false).await, b"+QUEUED\r\n");
    assert_eq!(c.read(false).await, b"*1\r\n:1\r\n");
    let mut admin = RawRedis::direct_to(own.port, "portcullis", &own.password).await;
    for (key, lo, hi) in [
        ("session:inline", 1, 1800),
        ("session:w", 1, 1800),
        ("session:off", 1, 1800),
        ("session:a", 1, 1800),
        ("session:b", 86_000, 86_400),
        ("session:k", 1, 1800),
        ("session:c", 86_000, 86_400),
        ("chat:1", 600_000, 604_800),
        ("session:e", 1, 1800),
        ("session:m1", 1, 1800),
        ("chat:2", 2_500_000, 2_592_000),
        ("session:n", 1, 1800),
        ("session:tx", 1, 1800),
    ] {
        let t = ttl_of(&mut admin, key).await;
        assert!((lo..=hi).contains(&t), "{key}: ttl {t} not in {lo}..={hi}");
    }
    assert_eq!(ttl_of(&mut admin, "plain").await, -1, "keys outside the rules are untouched");
    let m = p.metrics();
    for action in ["appended", "clamped", "injected", "denied"] {
        assert!(m.contains(&format!(r#"action="{action}",listener="cache",rule="session:*""#)), "{action}: {m}");
    }
}

#[derive(Debug, Clone)]
enum Op {
    Set(u8, Option<u32>, bool),
    SetEx(u8, u32),
    Expire(u8, u32),
    Persist(u8),
    HSet(u8),
    LPush(u8),
    Incr(u8),
    Append(u8),
    Rename(u8, u8),
    MSet(u8, u8),
    GetEx(u8, bool),
    Del(u8),
    Watch(u8),
    BlPop(u8),
    LMove(u8, u8),
    Multi(Vec<Op>),
}

const KEYS: [&str; 6] = ["session:1", "session:2", "chat:1", "chat:2", "plain:1", "plain:2"];

fn key(i: u8) -> &'static str {
    KEYS[i as usize % KEYS.len()]
}

fn simple_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (any::<u8>(), proptest::option::of(1u32..10_000_000), any::<bool>())
            .prop_map(|(k, ex, keep)| Op::Set(k, ex, keep)),
        (any::<u8>(), 1u32..10_000_000).prop_map(|(k, s)| Op::SetEx(k, s)),
        (any::<u8>(), 1u32..10_000_000).prop_map(|(k, s)| Op::Expire(k, s)),
        any::<u8>().prop_map(Op::Persist),
        any::<u8>().prop_map(Op::HSet),
        any::<u8>().prop_map(Op::LPush),
        any::<u8>().prop_map(Op::Incr),
        any::<u8>().prop_map(Op::Append),
        (any::<u8>(), any::<u8>()).prop_map(|(a, b)| Op::Rename(a, b)),
        (any::<u8>(), any::<u8>()).prop_map(|(a, b)| Op::MSet(a, b)),
        (any::<u8>(), any::<bool>()).prop_map(|(k, p)| Op::GetEx(k, p)),
        any::<u8>().prop_map(Op::Del),
        any::<u8>().prop_map(Op::BlPop),
        (any::<u8>(), any::<u8>()).prop_map(|(a, b)| Op::LMove(a, b)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => simple_op(),
        1 => any::<u8>().prop_map(Op::Watch),
        2 => proptest::collection::vec(simple_op(), 1..4).prop_map(Op::Multi),
    ]
}

/// The commands of one op, and whether its replies may differ with the policy (PERSIST).
fn encode(op: &Op, out: &mut Vec<(Vec<u8>, bool)>) {
    let c = |a: &[&str]| cmd(&a.iter().map(|s| s.as_bytes()).collect::<Vec<_>>());
    match op {
        Op::Set(k, ex, keep) => {
            let mut a = vec!["SET", key(*k), "v"];
            let ex = ex.map(|e| e.to_string());
            if let Some(e) = &ex {
                a.extend(["EX", e.as_str()]);
            } else if *keep {
                a.push("KEEPTTL");
            }
            out.push((c(&a), false));
        }
        Op::SetEx(k, s) => out.push((c(&["SETEX", key(*k), &s.to_string(), "v"]), false)),
        Op::Expire(k, s) => out.push((c(&["EXPIRE", key(*k), &s.to_string()]), false)),
        // PERSIST only on keys outside the rules here: a refused PERSIST inside MULTI aborts the
        // transaction, after which the two runs' data differ by design (tested on its own above).
        // Its reply may still differ: RENAME carries a policy-given TTL to an unmatched name.
        Op::Persist(k) => out.push((c(&["PERSIST", KEYS[4 + (*k as usize % 2)]]), true)),
        Op::HSet(k) => out.push((c(&["HSET", key(*k), "f", "v"]), false)),
        Op::LPush(k) => out.push((c(&["LPUSH", key(*k), "x"]), false)),
        Op::Incr(k) => out.push((c(&["INCR", key(*k)]), false)),
        Op::Append(k) => out.push((c(&["APPEND", key(*k), "x"]), false)),
        Op::Rename(a, b) => out.push((c(&["RENAME", key(*a), key(*b)]), false)),
        Op::MSet(a, b) => out.push((c(&["MSET", key(*a), "1", key(*b), "2"]), false)),
        Op::GetEx(k, persist) => {
            let a = if *persist { vec!["GETEX", key(*k), "PERSIST"] } else { vec!["GETEX", key(*k), "EX", "99999999"] };
            out.push((c(&a), false));
        }
        Op::Del(k) => out.push((c(&["DEL", key(*k)]), false)),
        Op::Watch(k) => out.push((c(&["WATCH", key(*k)]), false)),
        Op::BlPop(k) => out.push((c(&["BLPOP", key(*k), "0.01"]), false)),
        Op::LMove(a, b) => out.push((c(&["LMOVE", key(*a), key(*b), "LEFT", "RIGHT"]), false)),
        Op::Multi(ops) => {
            out.push((c(&["MULTI"]), false));
            let mut any_persist = false;
            for o in ops {
                let mut inner = Vec::new();
                encode(o, &mut inner);
                for (b, p) in inner {
                    any_persist |= p;
                    out.push((b, p));
                }
            }
            // a denied PERSIST inside MULTI aborts the transaction with the policy on
            out.push((c(&["EXEC"]), any_persist));
        }
    }
}

async fn run_ops(port: u16, cmds: &[(Vec<u8>, bool)]) -> Vec<Vec<u8>> {
    let mut c = RawRedis::proxy(port).await;
    assert_eq!(c.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
    let all: Vec<u8> = cmds.iter().flat_map(|(b, _)| b.clone()).collect();
    c.send_raw(&all).await;
    let mut replies = Vec::new();
    for _ in cmds {
        replies.push(c.read(false).await);
    }
    replies
}

#[test]
fn property_matching_keys_always_expire_and_replies_match_the_policy_off() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let on_redis = portcullis::demo::RedisInstance::start(None, None).unwrap();
    let off_redis = portcullis::demo::RedisInstance::start(None, None).unwrap();
    let on = rt.block_on(redis_proxy_for(&on_redis, "", RULES));
    let off = rt.block_on(redis_proxy_for(&off_redis, "", ""));
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 64, ..ProptestConfig::default() });
    runner
        .run(&proptest::collection::vec(op(), 1..40), |ops| {
            let mut cmds = Vec::new();
            let mut watched = false;
            for o in &ops {
                encode(o, &mut cmds);
                watched |= matches!(o, Op::Watch(_));
                // A TTL the policy sets (GETEX PERSIST → EX, an injected EXPIRE) touches the key
                // like any write: an EXEC after a WATCH may then abort where it would not without
                // the policy. That is the documented rewrite at work, not a divergence.
                if watched
                    && matches!(o, Op::Multi(_))
                    && let Some(last) = cmds.last_mut()
                {
                    last.1 = true;
                }
            }
            rt.block_on(async {
                for (r, _) in [(&on_redis, 0), (&off_redis, 1)] {
                    let mut admin = RawRedis::direct_to(r.port, "portcullis", &r.password).await;
                    assert_eq!(admin.call(&["FLUSHALL"]).await, b"+OK\r\n");
                }
                let with = run_ops(on.redis_port(), &cmds).await;
                let without = run_ops(off.redis_port(), &cmds).await;
                // Once a reply the policy may change did change (a transaction aborted by the
                // policy's own write to a watched key), the two keyspaces differ by that documented
                // rewrite, and so may every later reply: compared up to there.
                let mut diverged = false;
                for (i, ((w, wo), (_, may_differ))) in with.iter().zip(&without).zip(&cmds).enumerate() {
                    diverged |= *may_differ && w != wo;
                    if !may_differ && !diverged {
                        prop_assert_eq!(
                            String::from_utf8_lossy(w),
                            String::from_utf8_lossy(wo),
                            "reply {} of {:?}",
                            i,
                            ops
                        );
                    }
                }
                let mut admin = RawRedis::direct_to(on_redis.port, "portcullis", &on_redis.password).await;
                for k in ["session:1", "session:2"] {
                    let t = ttl_of(&mut admin, k).await;
                    prop_assert!(t == -2 || (1..=86_400).contains(&t), "{} ttl {} after {:?}", k, t, ops);
                }
                for k in ["chat:1", "chat:2"] {
                    let t = ttl_of(&mut admin, k).await;
                    prop_assert!(t == -2 || (1..=2_592_000).contains(&t), "{} ttl {} after {:?}", k, t, ops);
                }
                Ok(())
            })
        })
        .unwrap();
}
