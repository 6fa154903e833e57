//! Criterion micro-benchmarks of the per-request and per-login work: RESP batch parse +
//! command classification, the ACL policy decision, the TTL rewrite plan, SCRAM server
//! verification, and an Argon2id verification served from the cache.
//! `cargo bench --bench micro` (HTML reports under target/criterion/).

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use portcullis::auth::scram::{
    SCRAM_SHA_256, ScramClient, ScramServer, ScramVerifier, prepare_password, salted_password,
};
use portcullis::policy::redis_acl::Keys;
use portcullis::policy::{AclRules, Decision};
use portcullis::redis::codec::{self, Limits};
use portcullis::redis::command::{CommandTable, Lookup};

/// What redis-benchmark -P 16 sends: 16 GET/SET requests in one read.
fn batch() -> Bytes {
    let mut b = Vec::new();
    for i in 0..8 {
        let k = format!("key:{i:012}");
        b.extend_from_slice(&codec::encode_command(&[b"SET", k.as_bytes(), &[b'x'; 64]]));
        b.extend_from_slice(&codec::encode_command(&[b"GET", k.as_bytes()]));
    }
    Bytes::from(b)
}

fn resp(c: &mut Criterion) {
    let table = CommandTable::builtin();
    let rules = AclRules::parse("+@all -@dangerous ~app:* ~key:*").unwrap();
    let buf = batch();
    let limits = Limits::default();
    let mut g = c.benchmark_group("redis");
    g.throughput(Throughput::Elements(16));
    g.bench_function("parse 16-request batch", |b| {
        b.iter(|| {
            let mut at = 0;
            let mut n = 0;
            while let Some(r) = codec::parse_request(black_box(&buf), at, &limits, false).unwrap() {
                at = r.raw.end;
                n += 1;
            }
            n
        })
    });
    g.bench_function("parse + classify + decide 16-request batch", |b| {
        b.iter(|| {
            let mut at = 0;
            let mut allowed = 0;
            while let Some(r) = codec::parse_request(black_box(&buf), at, &limits, false).unwrap() {
                at = r.raw.end;
                let args = codec::resolve(&buf, &r);
                if let Lookup::Command(info) = table.resolve(&args) {
                    let keys = info.keys(&args);
                    if matches!(rules.decide(&info.acl_ref(None), &keys), Decision::Allow(_)) {
                        allowed += 1;
                    }
                }
            }
            allowed
        })
    });
    g.finish();
    let args: Vec<&[u8]> = vec![b"SET", b"key:000000000001", b"v"];
    let Lookup::Command(set) = table.resolve(&args) else { panic!("SET is known") };
    c.bench_function("policy decision (SET, key patterns)", |b| {
        b.iter(|| {
            matches!(rules.decide(&set.acl_ref(None), &Keys::Known(vec![black_box(args[1])])), Decision::Allow(_))
        })
    });
    let ttl = vec![portcullis::config::TtlRule {
        pattern: "key:*".into(),
        default: std::time::Duration::from_secs(1800),
        max: std::time::Duration::from_secs(86400),
        allow_scripts: false,
    }];
    c.bench_function("TTL plan (SET on a governed key: EX appended)", |b| {
        b.iter(|| portcullis::redis::ttl::plan(set, black_box(&args), &ttl, 1_700_000_000_000))
    });
}

fn scram(c: &mut Criterion) {
    let v = ScramVerifier::from_password("app-password", b"0123456789abcdef", 4096);
    // The client's PBKDF2 is done once, outside; per iteration: the client's cheap HMACs and
    // the server's start + finish (what the proxy does per login).
    let salted = salted_password(prepare_password("app-password").as_bytes(), &v.salt, v.iterations);
    c.bench_function("SCRAM server verify (start + finish)", |b| {
        b.iter_batched(
            || {
                let (client, first) = ScramClient::start();
                (client, first)
            },
            |(client, first)| {
                let (server, server_first) =
                    ScramServer::start(vec![v.clone()], SCRAM_SHA_256, false, first.as_bytes()).unwrap();
                let (_, fin) = client.respond(server_first.as_bytes(), |_, _| salted).unwrap();
                server.finish(fin.as_bytes(), None).unwrap()
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

fn argon(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let pool = portcullis::auth::argon::Argon2Pool::new(2);
    let phc = portcullis::auth::argon::hash(b"redis-password").unwrap();
    assert!(rt.block_on(pool.verify("app", &phc, b"redis-password")), "first verification fills the cache");
    c.bench_function("Argon2id verify, cache hit", |b| {
        b.iter(|| rt.block_on(pool.verify("app", black_box(&phc), b"redis-password")))
    });
}

criterion_group!(benches, resp, scram, argon);
criterion_main!(benches);
