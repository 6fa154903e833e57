//! Fuzz seeds from real traffic: psql, pgbench (simple and extended protocol), tokio-postgres
//! (prepared statements, COPY, a query cancel), redis-cli, redis-benchmark and the `redis`
//! crate (pipelines, MULTI/EXEC, pub/sub, RESP3 HELLO) talk to the real PostgreSQL and Redis
//! through a TCP relay that records what each client sends. Every captured stream goes
//! through the fuzz entry points (real traffic never trips one of their assertions), Redis
//! streams must parse to the end without a protocol error, and the SCRAM messages extracted
//! from the Postgres streams must be the real client-first / client-final shapes.
//!
//! `FUZZ_CAPTURE=1 cargo test --test fuzz_capture` also writes the captures into
//! `fuzz/corpus/<target>/cap-*` (committed: the seeds `scripts/fuzz` starts from, replayed on
//! stable by tests/fuzz_corpus.rs).

mod support;

use std::process::Command;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Seeds larger than this are cut: libFuzzer mutates small inputs far faster.
const SEED_MAX: usize = 4 * 1024;

/// A relay to `target` that records the bytes each client connection sends.
struct Recorder {
    port: u16,
    streams: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Recorder {
    async fn start(target: u16) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let streams = Arc::new(Mutex::new(Vec::new()));
        let out = streams.clone();
        tokio::spawn(async move {
            while let Ok((c, _)) = listener.accept().await {
                let out = out.clone();
                tokio::spawn(async move {
                    let s = TcpStream::connect(("127.0.0.1", target)).await.unwrap();
                    let (mut cr, mut cw) = c.into_split();
                    let (mut sr, mut sw) = s.into_split();
                    let down = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                        let _ = cw.shutdown().await;
                    });
                    let mut seen = Vec::new();
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                seen.extend_from_slice(&buf[..n]);
                                if sw.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = sw.shutdown().await;
                    let _ = down.await;
                    out.lock().unwrap().push(seen);
                });
            }
        });
        Recorder { port, streams }
    }

    /// The streams of the connections closed so far, once `done` says they are all there (or
    /// after 5 s: the caller's assertions then say what is missing).
    async fn take(&self, done: impl Fn(&[Vec<u8>]) -> bool) -> Vec<Vec<u8>> {
        for _ in 0..100 {
            if done(&self.streams.lock().unwrap()) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        std::mem::take(&mut *self.streams.lock().unwrap())
    }
}

fn save(target: &str, name: &str, data: &[u8]) {
    if std::env::var_os("FUZZ_CAPTURE").is_none() {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("cap-{name}")), &data[..data.len().min(SEED_MAX)]).unwrap();
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("client runs");
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Typed messages after the startup packet of a plaintext Postgres client stream.
fn pg_messages(stream: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    let Some(len) = stream.get(..4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize) else {
        return out;
    };
    let mut at = len;
    while stream.len() >= at + 5 {
        let l = u32::from_be_bytes([stream[at + 1], stream[at + 2], stream[at + 3], stream[at + 4]]) as usize;
        let Some(body) = stream.get(at + 5..at + 1 + l) else { break };
        out.push((stream[at], body));
        at += 1 + l;
    }
    out
}

/// client-first and client-final of the SCRAM exchange in a captured Postgres stream.
fn scram_messages(stream: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let sasl: Vec<&[u8]> = pg_messages(stream).into_iter().filter(|(t, _)| *t == b'p').map(|(_, b)| b).collect();
    let initial = sasl.first()?;
    let mech_end = initial.iter().position(|b| *b == 0)?;
    let first = initial.get(mech_end + 5..)?.to_vec();
    Some((first, sasl.get(1)?.to_vec()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_clients_traffic_is_captured_and_goes_through_the_fuzz_targets() {
    let pg = pg();
    let rec = Recorder::start(pg.port).await;
    let conn =
        |extra: &str| format!("host=127.0.0.1 port={} user=app_runtime dbname=app sslmode=disable {extra}", rec.port);
    let psql = |extra: &str, sql: &str| {
        let mut c = Command::new("psql");
        c.env("PGPASSWORD", &pg.runtime_password).arg(conn(extra)).args(["-X", "-At", "-c", sql]);
        c
    };
    run(&mut psql("application_name=psql", "select 1; create table if not exists cap(x int, y text)"));
    run(&mut psql("options='-c statement_timeout=5s'", "insert into cap values (1, 'a'); select * from cap"));
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(script.path(), "\\set a random(1, 100)\nselect :a, 'x';\nselect count(*) from cap where x = :a;\n")
        .unwrap();
    for mode in ["simple", "extended", "prepared"] {
        run(Command::new("pgbench")
            .env("PGPASSWORD", &pg.runtime_password)
            .args(["-n", "-t", "5", "-M", mode, "-f"])
            .arg(script.path())
            .arg(conn("")));
    }
    // tokio-postgres: extended protocol with types, COPY in and out, a cancel request
    let (client, connection) =
        tokio_postgres::connect(&format!("{} password={}", conn(""), pg.runtime_password), tokio_postgres::NoTls)
            .await
            .unwrap();
    let driver = tokio::spawn(connection);
    let st = client.prepare("select $1::int + 1, $2::text").await.unwrap();
    let row = client.query_one(&st, &[&41i32, &"t"]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    let sink = client.copy_in("copy cap from stdin").await.unwrap();
    futures_util::pin_mut!(sink);
    use futures_util::SinkExt;
    sink.send(Bytes::from_static(b"2\tb\n3\tc\n")).await.unwrap();
    sink.close().await.unwrap();
    let cancel = client.cancel_token();
    let sleeping = tokio::spawn(async move {
        let r = client.simple_query("select pg_sleep(10)").await;
        drop(client);
        r
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
    assert!(sleeping.await.unwrap().is_err(), "cancelled");
    let _ = driver.await;

    let is_cancel = |s: &Vec<u8>| s.get(4..8) == Some(&80_877_102i32.to_be_bytes()[..]);
    let streams = rec.take(|s| s.len() >= 7 && s.iter().any(is_cancel)).await;
    assert!(streams.len() >= 7, "psql x2, pgbench x3, tokio-postgres, cancel: {}", streams.len());
    // (a thread of its own: the Postgres entry point runs its own small runtime)
    std::thread::spawn(move || check_pg_streams(&streams)).join().unwrap();
}

fn check_pg_streams(streams: &[Vec<u8>]) {
    let (mut startups, mut cancels, mut scrams) = (0, 0, 0);
    for (i, s) in streams.iter().enumerate() {
        portcullis::fuzzing::pg_first_packet(s);
        let code = s.get(4..8).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        match code {
            Some(196_608) => startups += 1,
            Some(80_877_102) => cancels += 1,
            other => panic!("a real client's first packet: {other:?}"),
        }
        save("pg_first_packet", &format!("{i}"), s);
        if let Some((first, fin)) = scram_messages(s) {
            assert!(first.starts_with(b"n,,n=,r=") || first.starts_with(b"y,,n=,r="), "{first:?}");
            assert!(fin.starts_with(b"c=biws,r=") || fin.starts_with(b"c=eSws,r="), "{fin:?}");
            let mut seed = vec![0u8];
            seed.extend_from_slice(&first);
            seed.push(0xff);
            seed.extend_from_slice(&fin);
            portcullis::fuzzing::scram(&seed);
            save("scram", &format!("{i}"), &seed);
            scrams += 1;
        }
    }
    assert_eq!((startups, cancels), (streams.len() - 1, 1));
    assert_eq!(scrams, startups, "every login was SCRAM-SHA-256");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_clients_traffic_is_captured_and_goes_through_the_fuzz_targets() {
    let r = redis();
    let rec = Recorder::start(r.port).await;
    let port = rec.port.to_string();
    let cli = |args: &[&str]| {
        let mut c = Command::new("redis-cli");
        c.args(["-p", &port, "--user", "portcullis", "--pass", &r.password, "--no-auth-warning"]).args(args);
        c
    };
    run(&mut cli(&["SET", "session:cap", "v", "EX", "60"]));
    run(&mut cli(&["-3", "HGETALL", "nothing"]));
    run(&mut cli(&["EVAL", "return redis.call('GET', KEYS[1])", "1", "session:cap"]));
    let mut pipe = cli(&["--pipe"]);
    pipe.stdin(std::process::Stdio::piped());
    let mut child = pipe.stdout(std::process::Stdio::null()).spawn().unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        for i in 0..50 {
            write!(stdin, "SET chat:{i} hello\r\nLPUSH chat:list:{i} a b c\r\nEXPIRE chat:{i} 100\r\n").unwrap();
        }
    }
    assert!(child.wait().unwrap().success());
    // -n a multiple of -P: with a short last batch, redis-benchmark 7.0 can free its only client
    // before counting the last replies and abort with "All clients disconnected" (its own race,
    // seen here without any proxy about once in a hundred runs).
    run(Command::new("redis-benchmark").args([
        "-p",
        &port,
        "--user",
        "portcullis",
        "-a",
        &r.password,
        "-t",
        "set,get,incr,lpush,rpop,sadd,hset,zadd,mset",
        "-n",
        "96",
        "-c",
        "1",
        "-P",
        "16",
        "-d",
        "64",
        "-q",
    ]));
    // the redis crate: RESP3, pipelines, MULTI/EXEC, pub/sub
    let url = format!("redis://portcullis:{}@127.0.0.1:{}/?protocol=resp3", r.password, rec.port);
    let client = redis::Client::open(url).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let (a, b): (i64, i64) =
        redis::pipe().atomic().incr("cap:n", 1).incr("cap:n", 2).query_async(&mut con).await.unwrap();
    assert_eq!(b - a, 2);
    let _: () = redis::pipe()
        .set("session:x", "v")
        .hset("session:h", "f", "v")
        .expire("session:h", 10)
        .query_async(&mut con)
        .await
        .unwrap();
    drop(con);
    let mut ps = client.get_async_pubsub().await.unwrap();
    ps.subscribe("cap:channel").await.unwrap();
    ps.psubscribe("cap:*").await.unwrap();
    drop(ps);
    drop(client);

    let streams = rec.take(|s| s.len() >= 15).await;
    assert!(streams.len() >= 15, "redis-cli x4, redis-benchmark x9, the redis crate x2: {}", streams.len());
    let limits = portcullis::redis::codec::Limits::default();
    let mut requests = 0;
    // the test instance's (random) password is blanked out of the seeds, same length
    let blank = |s: &[u8]| {
        let pw = r.password.as_bytes();
        let mut out = s.to_vec();
        let mut at = 0;
        while let Some(i) = out[at..].windows(pw.len()).position(|w| w == pw) {
            out[at + i..at + i + pw.len()].fill(b'p');
            at += i + pw.len();
        }
        out
    };
    for (i, s) in streams.iter().enumerate() {
        let mut at = 0;
        while at < s.len() {
            match portcullis::redis::codec::parse_request_resume(s, at, &limits, false, &mut None) {
                Ok(Some(req)) => {
                    at = req.raw.end;
                    requests += 1;
                }
                other => panic!("a real client's stream parses to its end: {other:?} at {at} of {}", s.len()),
            }
        }
        let mut seed = vec![0u8];
        seed.extend_from_slice(s);
        portcullis::fuzzing::resp_batch(&seed);
        portcullis::fuzzing::ttl(s);
        save("resp_batch", &format!("{i}"), &blank(&seed));
        save("ttl", &format!("{i}"), &blank(s));
    }
    assert!(requests > 1000, "{requests} requests captured");
}
