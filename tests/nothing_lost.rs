//! Nothing lost, nothing reordered: the same workload directly and through the proxy gives
//! byte-identical results (compared by SHA-256): 100,000 pipelined Redis commands with values
//! from 0 bytes to 1 MiB (also with the TTL policy governing every key), and a 100 MB
//! PostgreSQL COPY in and out.

mod support;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A deterministic mixed workload; keys carry `prefix` (replies never echo keys).
fn workload(prefix: &str) -> Vec<Vec<u8>> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut cmds = Vec::with_capacity(100_000);
    for i in 0..100_000u64 {
        let k = format!("{prefix}:{}", rnd() % 2000);
        let r = rnd();
        let size = match r % 1000 {
            0 => (rnd() % (1 << 20)) as usize, // up to 1 MiB, one in a thousand
            1..=20 => (rnd() % 65536) as usize,
            _ => (rnd() % 200) as usize,
        };
        let val: Vec<u8> = (0..size).map(|j| (j as u64 ^ i) as u8).collect();
        let enc = |args: &[&[u8]]| portcullis::redis::codec::encode_command(args);
        let cmd = match r % 10 {
            0..=2 => enc(&[b"SET", k.as_bytes(), &val]),
            3..=5 => enc(&[b"GET", k.as_bytes()]),
            6 => enc(&[b"APPEND", k.as_bytes(), &val[..val.len().min(100)]]),
            7 => enc(&[b"LPUSH", format!("{k}:l").as_bytes(), &val[..val.len().min(300)]]),
            8 => enc(&[b"LRANGE", format!("{k}:l").as_bytes(), b"0", b"2"]),
            _ => enc(&[b"HSET", format!("{k}:h").as_bytes(), b"f", &val[..val.len().min(500)]]),
        };
        cmds.push(cmd);
    }
    cmds
}

/// Writes every command (batches of 500) while a reader hashes the replies; returns the
/// reply stream's hash and length.
async fn run<S: AsyncRead + AsyncWrite + Send + 'static>(io: S, cmds: Vec<Vec<u8>>) -> ([u8; 32], u64) {
    let (mut rd, mut wr) = tokio::io::split(io);
    let n = cmds.len();
    let reader = tokio::spawn(async move {
        let mut h = Sha256::new();
        let mut buf: Vec<u8> = Vec::new();
        let (mut got, mut total) = (0usize, 0u64);
        let mut tmp = vec![0u8; 256 * 1024];
        while got < n {
            while let Some((len, _)) = portcullis::redis::codec::frame_reply(&buf, false).unwrap() {
                h.update(&buf[..len]);
                total += len as u64;
                buf.drain(..len);
                got += 1;
                if got == n {
                    break;
                }
            }
            if got == n {
                break;
            }
            let r = tokio::time::timeout(std::time::Duration::from_secs(30), rd.read(&mut tmp)).await;
            let k = r.expect("replies keep coming").unwrap();
            assert!(k > 0, "connection closed after {got} of {n} replies");
            buf.extend_from_slice(&tmp[..k]);
        }
        (h.finalize().into(), total)
    });
    for chunk in cmds.chunks(500) {
        wr.write_all(&chunk.concat()).await.unwrap();
    }
    wr.flush().await.unwrap();
    let out = reader.await.unwrap();
    drop(wr);
    out
}

async fn through_proxy(port: u16, cmds: Vec<Vec<u8>>) -> ([u8; 32], u64) {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut tls = tls_connect(tcp, client_tls(false)).await;
    let auth = portcullis::redis::codec::encode_command(&[b"AUTH", b"admin", REDIS_ADMIN_PW.as_bytes()]);
    tls.write_all(&auth).await.unwrap();
    let mut ok = [0u8; 5];
    tls.read_exact(&mut ok).await.unwrap();
    assert_eq!(&ok, b"+OK\r\n");
    run(tls, cmds).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_100k_pipelined_commands_identical_direct_and_through_the_proxy() {
    let r = redis();
    let direct = {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", r.port)).await.unwrap();
        let auth = portcullis::redis::codec::encode_command(&[b"AUTH", b"portcullis", r.password.as_bytes()]);
        tcp.write_all(&auth).await.unwrap();
        let mut ok = [0u8; 5];
        tcp.read_exact(&mut ok).await.unwrap();
        run(tcp, workload("nl-direct")).await
    };
    let p = redis_proxy("", "").await;
    let proxied = through_proxy(p.redis_port(), workload("nl-proxy")).await;
    assert!(direct.1 > 50_000_000, "a substantial workload: {} reply bytes", direct.1);
    assert_eq!(proxied, direct, "reply streams identical (sha256, length)");
    // with the TTL policy governing every key of the workload: replies unchanged too
    let ttl = redis_proxy("", "ttl = [ { pattern = \"nl-ttl:*\", default = \"1h\", max = \"1d\" } ]").await;
    let governed = through_proxy(ttl.redis_port(), workload("nl-ttl")).await;
    assert_eq!(governed, direct, "the TTL policy's EXPIREs never show in the reply stream");
    let mut admin = RawRedis::direct_as("portcullis", &r.password).await;
    let t = admin.call(&["TTL", "nl-ttl:7"]).await;
    let secs: i64 = String::from_utf8_lossy(&t[1..t.len() - 2]).parse().unwrap();
    assert!((1..=3600).contains(&secs), "and the keys do get their TTL: {secs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_100_mb_copy_identical_direct_and_through_the_proxy() {
    use futures_util::{SinkExt, TryStreamExt};
    let p = proxy("", "").await;
    pg().psql_admin_db("app", "create table lost_direct(id int, payload text); create table lost_proxy(id int, payload text); grant all on lost_direct, lost_proxy to app_runtime").unwrap();
    let (direct, conn) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=app_runtime password={} dbname=app sslmode=disable",
            pg().port,
            pg().runtime_password
        ),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let proxied = connect(p.port(), "app", APP_PASSWORD, "").await.unwrap();
    // 100 MB of rows with every byte value COPY text format can carry escaped
    let mut data = Vec::with_capacity(105 << 20);
    let mut i = 0u32;
    while data.len() < 100 << 20 {
        data.extend_from_slice(format!("{i}\t").as_bytes());
        for j in 0..1000u32 {
            let b = ((i.wrapping_mul(31) + j) % 94 + 33) as u8; // printable, no backslash games
            data.push(if b == b'\\' { b'/' } else { b });
        }
        data.push(b'\n');
        i += 1;
    }
    let sent = Sha256::digest(&data);
    for (c, table) in [(&direct, "lost_direct"), (&proxied, "lost_proxy")] {
        let sink = c.copy_in(&format!("copy {table} from stdin")).await.unwrap();
        futures_util::pin_mut!(sink);
        for chunk in data.chunks(256 * 1024) {
            sink.send(Bytes::copy_from_slice(chunk)).await.unwrap();
        }
        assert_eq!(sink.finish().await.unwrap(), i as u64);
    }
    let mut sums = Vec::new();
    for (c, table) in [(&direct, "lost_direct"), (&proxied, "lost_proxy")] {
        let stream = c.copy_out(&format!("copy (select * from {table} order by id) to stdout")).await.unwrap();
        futures_util::pin_mut!(stream);
        let mut h = Sha256::new();
        let mut n = 0usize;
        while let Some(chunk) = stream.try_next().await.unwrap() {
            n += chunk.len();
            h.update(&chunk);
        }
        assert_eq!(n, data.len(), "{table}: every byte back");
        sums.push(h.finalize());
    }
    assert_eq!(sums[0], sent, "direct COPY OUT = what was sent");
    assert_eq!(sums[1], sent, "through the proxy: COPY IN and OUT byte-identical");
    let server_side = pg()
        .psql_admin_db("app", "select (select md5(string_agg(payload, '' order by id)) from lost_direct) = (select md5(string_agg(payload, '' order by id)) from lost_proxy)")
        .unwrap();
    assert_eq!(server_side.trim(), "t", "the stored tables are identical");
}
