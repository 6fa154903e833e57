//! The end-to-end comparison harness (issue: performance). In ONE run it starts a private
//! PostgreSQL 15 and Redis (with native TLS), Portcullis (the release binary, as its own
//! process) and, when installed, stunnel4, haproxy and pgbouncer as the front-ends users would
//! pick instead; then runs the workloads interleaved, `E2E_ROUNDS` times (default 3), and
//! prints one table: median (min–max) and the ratio to direct access, plus front-end CPU per
//! 100k requests (from /proc) and Portcullis's RSS per idle authenticated TLS connection.
//! The table is also written as JSON to `target/e2e-bench.json`.
//!
//! `cargo bench --bench e2e` (apt-get install -y stunnel4 haproxy pgbouncer for the comparison
//! columns). Knobs: E2E_ROUNDS, E2E_REDIS_REQUESTS (default 200000), E2E_PG_SECONDS (default 5),
//! E2E_IDLE_CONNECTIONS (default 10000, or what the open-files hard limit allows), E2E_ONLY (comma list: redis,latency,pg,pgconnect,idle),
//! E2E_BIN (another portcullis binary, to compare builds), E2E_TARGETS (comma list of column
//! names, e.g. native-tls,portcullis-pool, to run only those and the direct baseline: for profiling),
//! E2E_PIPELINE (the redis-benchmark -P depths of the throughput rows, default 16,1).
//! No assertions: timings never go in tests.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn wait_port(port: u16) -> bool {
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if t.elapsed() > Duration::from_secs(10) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // fields 14 and 15 (utime, stime) are at 11 and 12 after the command name
    (ticks(11) + ticks(12)) / 100.0
}

/// A front-end process, stopped on drop.
struct Front {
    name: &'static str,
    child: Child,
    port: u16,
    /// The process doing the work (runuser forks the real one).
    cpu_pid: u32,
}

impl Drop for Front {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a front-end; its output goes to `<name>.log` in the bench directory.
fn spawn(name: &'static str, mut cmd: Command, port: u16, dir: &Path) -> Option<Front> {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).ok()?;
    let child = cmd.stdin(Stdio::null()).stdout(log.try_clone().ok()?).stderr(log).spawn().ok()?;
    let cpu_pid = child.id();
    let f = Front { name, child, port, cpu_pid };
    if wait_port(port) {
        Some(f)
    } else {
        let log = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
        eprintln!("{name} did not start; left out:\n{log}");
        None
    }
}

fn installed(bin: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {bin}")]).output().is_ok_and(|o| o.status.success())
}

/// Portcullis and the ports of its Postgres listeners, one-to-one and `pool = "session"`, and
/// of its `pool = "multiplex"` Redis listener (the Front's port is the one-to-one Redis one).
fn portcullis(dir: &Path, pg_port: u16, redis_port: u16) -> (Front, u16, u16, u16) {
    let c = certs();
    let pg = pg();
    let r = redis();
    std::fs::write(dir.join("runtime.pass"), &pg.runtime_password).unwrap();
    std::fs::write(dir.join("redis.pass"), &r.password).unwrap();
    let users = format!(
        "[[users]]\nname = \"app\"\npostgres_scram = \"{}\"\nredis_argon2 = \"{}\"\n",
        postgres_protocol::password::scram_sha_256(APP_PASSWORD.as_bytes()),
        portcullis::auth::argon::hash(REDIS_APP_PW.as_bytes()).unwrap()
    );
    std::fs::write(dir.join("users.toml"), users).unwrap();
    let (pp, rp) = (portcullis::demo::free_port().unwrap(), portcullis::demo::free_port().unwrap());
    let pool_port = portcullis::demo::free_port().unwrap();
    let mux_port = portcullis::demo::free_port().unwrap();
    let config = format!(
        r#"[admin]
listen = "127.0.0.1:0"
[tls]
cert = "{c}/server.crt"
key = "{c}/server.key"
[limits]
max_connections = 50000
max_connections_per_source = 50000
[[postgres]]
name = "pg"
listen = "127.0.0.1:{pp}"
upstream = "127.0.0.1:{pg_port}"
users_file = "{d}/users.toml"
upstream_user = "app_runtime"
upstream_password_file = "{d}/runtime.pass"
allow = ["127.0.0.0/8"]
[[postgres]]
name = "pgpool"
listen = "127.0.0.1:{pool_port}"
upstream = "127.0.0.1:{pg_port}"
users_file = "{d}/users.toml"
upstream_user = "app_runtime"
upstream_password_file = "{d}/runtime.pass"
allow = ["127.0.0.0/8"]
pool = "session"
[[redis]]
name = "cache"
listen = "127.0.0.1:{rp}"
upstream = "127.0.0.1:{redis_port}"
users_file = "{d}/users.toml"
upstream_user = "portcullis"
upstream_password_file = "{d}/redis.pass"
[[redis]]
name = "cachemux"
listen = "127.0.0.1:{mux_port}"
upstream = "127.0.0.1:{redis_port}"
users_file = "{d}/users.toml"
upstream_user = "portcullis"
upstream_password_file = "{d}/redis.pass"
pool = "multiplex"
"#,
        c = c.display(),
        d = dir.display()
    );
    std::fs::write(dir.join("portcullis.toml"), config).unwrap();
    let bin = std::env::var("E2E_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_portcullis").to_string());
    let mut cmd = Command::new(bin);
    cmd.args(["run", "--config"]).arg(dir.join("portcullis.toml")).env("PORTCULLIS_LOG", "warn");
    let f = spawn("portcullis", cmd, rp, dir).expect("portcullis starts");
    assert!(wait_port(pp) && wait_port(pool_port) && wait_port(mux_port));
    (f, pp, pool_port, mux_port)
}

fn combined_pem(dir: &Path) -> PathBuf {
    let c = certs();
    let mut pem = std::fs::read_to_string(c.join("server.crt")).unwrap();
    pem.push_str(&std::fs::read_to_string(c.join("server.key")).unwrap());
    let p = dir.join("combined.pem");
    std::fs::write(&p, pem).unwrap();
    p
}

fn stunnel(dir: &Path, redis_port: u16) -> Option<Front> {
    if !installed("stunnel4") {
        return None;
    }
    let port = portcullis::demo::free_port().unwrap();
    let c = certs();
    let conf = dir.join("stunnel.conf");
    std::fs::write(
        &conf,
        format!(
            "foreground = yes\npid =\n[redis]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{redis_port}\n\
             cert = {}\nkey = {}\nsslVersionMin = TLSv1.3\n",
            c.join("server.crt").display(),
            c.join("server.key").display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new("stunnel4");
    cmd.arg(&conf);
    spawn("stunnel", cmd, port, dir)
}

fn haproxy(dir: &Path, redis_port: u16) -> Option<Front> {
    if !installed("haproxy") {
        return None;
    }
    let port = portcullis::demo::free_port().unwrap();
    let conf = dir.join("haproxy.cfg");
    std::fs::write(
        &conf,
        format!(
            "global\n  maxconn 9000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n\
             frontend f\n  bind 127.0.0.1:{port} ssl crt {} ssl-min-ver TLSv1.3\n  default_backend b\n\
             backend b\n  server r 127.0.0.1:{redis_port}\n",
            combined_pem(dir).display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new("haproxy");
    cmd.args(["-db", "-f"]).arg(&conf);
    spawn("haproxy", cmd, port, dir)
}

/// PgBouncer in session mode with TLS to clients (it refuses to run as root: as `postgres`).
fn pgbouncer(dir: &Path, pg_port: u16) -> Option<Front> {
    if !installed("pgbouncer") {
        return None;
    }
    let port = portcullis::demo::free_port().unwrap();
    let pg = pg();
    let c = certs();
    let bdir = dir.join("pgbouncer");
    std::fs::create_dir_all(&bdir).unwrap();
    for f in ["server.crt", "server.key"] {
        std::fs::copy(c.join(f), bdir.join(f)).unwrap();
    }
    std::fs::write(bdir.join("userlist.txt"), format!("\"app\" \"{APP_PASSWORD}\"\n")).unwrap();
    std::fs::write(
        bdir.join("pgbouncer.ini"),
        format!(
            "[databases]\napp = host=127.0.0.1 port={pg_port} dbname=app user=app_runtime password={pw}\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = scram-sha-256\nauth_file = {d}/userlist.txt\npool_mode = session\n\
             max_client_conn = 20000\ndefault_pool_size = 20\n\
             client_tls_sslmode = require\nclient_tls_cert_file = {d}/server.crt\nclient_tls_key_file = {d}/server.key\n\
             client_tls_protocols = tlsv1.3\nlogfile = {d}/pgbouncer.log\n",
            pw = pg.runtime_password,
            d = bdir.display()
        ),
    )
    .unwrap();
    let _ = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&bdir).status();
    let _ = Command::new("chmod").args(["0755"]).arg(dir).status();
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "postgres", "--", "pgbouncer"]).arg(bdir.join("pgbouncer.ini"));
    let mut f = spawn("pgbouncer", cmd, port, dir)?;
    // runuser forks pgbouncer: account the CPU of the real process
    if let Some(pid) = child_pid(f.child.id()) {
        f.cpu_pid = pid;
    }
    Some(f)
}

fn child_pid(parent: u32) -> Option<u32> {
    let out = Command::new("pgrep").args(["-P", &parent.to_string()]).output().ok()?;
    String::from_utf8_lossy(&out.stdout).lines().next()?.trim().parse().ok()
}

/// One Redis target: where, TLS or not, credentials, and the process to charge CPU to.
#[derive(Clone)]
struct RedisTarget {
    name: &'static str,
    port: u16,
    tls: bool,
    user: String,
    pw: String,
    pid: Option<u32>,
}

/// redis-benchmark --csv: per test (rps, p50 ms, p99 ms).
fn redis_benchmark(t: &RedisTarget, args: &[&str]) -> BTreeMap<String, (f64, f64, f64)> {
    let mut cmd = Command::new("redis-benchmark");
    if t.tls {
        cmd.args(["--tls", "--cacert"]).arg(certs().join("ca.crt"));
    }
    let out = cmd
        .args(["-h", if t.tls { "localhost" } else { "127.0.0.1" }, "-p", &t.port.to_string()])
        .args(["--user", &t.user, "-a", &t.pw, "--csv"])
        .args(args)
        .output()
        .expect("redis-benchmark runs");
    assert!(out.status.success(), "redis-benchmark {}: {}", t.name, String::from_utf8_lossy(&out.stderr));
    let mut res = BTreeMap::new();
    for l in String::from_utf8_lossy(&out.stdout).lines().skip(1) {
        let f: Vec<String> = l.split(',').map(|x| x.trim_matches('"').to_string()).collect();
        if f.len() >= 7 {
            let n = |i: usize| f[i].parse::<f64>().unwrap_or(0.0);
            res.insert(f[0].clone(), (n(1), n(4), n(6)));
        }
    }
    res
}

fn pgbench(port: u16, user: &str, pw: &str, args: &[&str]) -> (f64, f64) {
    let out = Command::new("pgbench")
        .env("PGSSLROOTCERT", certs().join("ca.crt"))
        .env("PGPASSWORD", pw)
        .env("PGSSLMODE", "require")
        .args(["-h", "localhost", "-p", &port.to_string(), "-U", user])
        .args(args)
        .arg("app")
        .output()
        .expect("pgbench runs");
    assert!(out.status.success(), "pgbench on {port}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let find = |prefix: &str, idx: usize| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(idx))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    (find("tps = ", 2), find("number of transactions actually processed: ", 5))
}

#[derive(Default)]
struct Samples(BTreeMap<(String, String), Vec<f64>>);

impl Samples {
    fn add(&mut self, row: &str, col: &str, v: f64) {
        self.0.entry((row.to_string(), col.to_string())).or_default().push(v);
    }
    fn stats(&self, row: &str, col: &str) -> Option<(f64, f64, f64)> {
        let mut v = self.0.get(&(row.to_string(), col.to_string()))?.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        Some((v[v.len() / 2], v[0], v[v.len() - 1]))
    }
}

/// The soft limit on open files, raised to the hard one (children inherit it).
fn raise_fd_limit() -> u64 {
    let hard = Command::new("sh")
        .args(["-c", "ulimit -Hn"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<u64>().ok())
        .unwrap_or(1024);
    let _ = Command::new("prlimit")
        .args(["--pid", &std::process::id().to_string(), &format!("--nofile={hard}:{hard}")])
        .status();
    hard
}

/// Opens `n` idle authenticated TLS connections to each listener and returns Portcullis's RSS
/// growth per connection (KiB) for Redis and Postgres.
fn idle_rss(
    rt: &tokio::runtime::Runtime,
    pid: u32,
    redis_port: u16,
    pg_port: u16,
    n: usize,
    pg_n: usize,
) -> (f64, f64) {
    rt.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut admin = RawRedis::direct_as("portcullis", &redis().password).await;
        admin.call(&["CONFIG", "SET", "maxclients", "60000"]).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Postgres first (freed Redis sessions would leave reusable heap behind).
        let base = rss_kib(pid);
        let mut pgs = Vec::new();
        for _ in 0..pg_n {
            if let Ok(c) = connect(pg_port, "app", APP_PASSWORD, "").await {
                pgs.push(c);
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let pg_per = (rss_kib(pid).saturating_sub(base)) as f64 / pgs.len().max(1) as f64;
        let pg_opened = pgs.len();
        drop(pgs);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let base = rss_kib(pid);
        let mut conns = Vec::with_capacity(n);
        let tls = std::sync::Arc::new(client_tls(false));
        for chunk in 0..n.div_ceil(200) {
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..200.min(n - chunk * 200) {
                let tls = tls.clone();
                set.spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await.ok()?;
                    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                    let mut s = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.ok()?;
                    let auth = portcullis::redis::codec::encode_command(&[b"AUTH", b"app", REDIS_APP_PW.as_bytes()]);
                    s.write_all(&auth).await.ok()?;
                    let mut b = [0u8; 5];
                    s.read_exact(&mut b).await.ok()?;
                    (&b == b"+OK\r\n").then_some(s)
                });
            }
            while let Some(r) = set.join_next().await {
                if let Ok(Some(s)) = r {
                    conns.push(s);
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let redis_per = (rss_kib(pid).saturating_sub(base)) as f64 / conns.len().max(1) as f64;
        let opened = conns.len();
        drop(conns);
        eprintln!("idle: {opened} Redis and {pg_opened} Postgres connections opened");
        (redis_per, pg_per)
    })
}

fn main() {
    let fd_limit = raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let only = env_or("E2E_ONLY", "redis,latency,pg,pgconnect,idle");
    let run = |what: &str| only.split(',').any(|w| w == what);
    let rounds: usize = env_or("E2E_ROUNDS", "3").parse().unwrap_or(3);
    let n = env_or("E2E_REDIS_REQUESTS", "200000");
    let secs = env_or("E2E_PG_SECONDS", "5");
    // Portcullis holds two descriptors per proxied connection (client and upstream).
    let idle_default = (fd_limit.saturating_sub(500) / 2).min(10_000).to_string();
    let idle_n: usize = env_or("E2E_IDLE_CONNECTIONS", &idle_default).parse().unwrap_or(1000);
    let dir = tempfile::tempdir().unwrap();
    let (pg, r) = (pg(), redis());
    let (proxy, proxy_pg, proxy_pool, proxy_mux) = portcullis(dir.path(), pg.port, r.port);
    let fronts: Vec<Front> = [stunnel(dir.path(), r.port), haproxy(dir.path(), r.port)].into_iter().flatten().collect();
    let bouncer = pgbouncer(dir.path(), pg.port);

    let (ru, rp) = ("portcullis".to_string(), r.password.clone());
    let mut redis_targets = vec![
        RedisTarget { name: "direct", port: r.port, tls: false, user: ru.clone(), pw: rp.clone(), pid: None },
        RedisTarget {
            name: "native-tls",
            port: r.tls_port.expect("Redis built with TLS"),
            tls: true,
            user: ru.clone(),
            pw: rp.clone(),
            pid: None,
        },
    ];
    for f in &fronts {
        redis_targets.push(RedisTarget {
            name: f.name,
            port: f.port,
            tls: true,
            user: ru.clone(),
            pw: rp.clone(),
            pid: Some(f.cpu_pid),
        });
    }
    redis_targets.push(RedisTarget {
        name: "portcullis",
        port: proxy.port,
        tls: true,
        user: "app".into(),
        pw: REDIS_APP_PW.into(),
        pid: Some(proxy.child.id()),
    });
    // the "pool" column: Postgres session pooling, Redis multiplexing
    redis_targets.push(RedisTarget {
        name: "portcullis-pool",
        port: proxy_mux,
        tls: true,
        user: "app".into(),
        pw: REDIS_APP_PW.into(),
        pid: Some(proxy.child.id()),
    });
    let targets = env_or("E2E_TARGETS", "");
    let depths = env_or("E2E_PIPELINE", "16,1");
    let wanted = |name: &str| targets.is_empty() || targets.split(',').any(|t| t == name);
    redis_targets.retain(|t| t.name == "direct" || wanted(t.name));
    let mut s = Samples::default();
    let mut cpu = Samples::default();
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        if run("redis") {
            for (label, p) in [("P16", "16"), ("P1", "1")] {
                if !depths.split(',').any(|d| d == p) {
                    continue;
                }
                for t in &redis_targets {
                    let c0 = t.pid.map(cpu_seconds);
                    let res = redis_benchmark(t, &["-t", "get,set", "-c", "50", "-d", "64", "-P", p, "-n", &n]);
                    if let (Some(pid), Some(c0)) = (t.pid, c0) {
                        let reqs = 2.0 * n.parse::<f64>().unwrap_or(1.0);
                        cpu.add(&format!("redis {label}"), t.name, (cpu_seconds(pid) - c0) / reqs * 1e6);
                    }
                    for (test, (rps, _, _)) in res {
                        s.add(&format!("redis {test} -P {p} (rps)"), t.name, rps);
                    }
                }
            }
        }
        if run("latency") {
            for t in &redis_targets {
                let res = redis_benchmark(t, &["-t", "get", "-c", "1", "-P", "1", "-d", "64", "-n", "20000"]);
                if let Some((_, p50, p99)) = res.get("GET") {
                    s.add("redis GET -c 1 p50 (µs)", t.name, p50 * 1000.0);
                    s.add("redis GET -c 1 p99 (µs)", t.name, p99 * 1000.0);
                }
            }
        }
        if round == 0 && (run("pg") || run("pgconnect")) {
            pgbench(pg.port, "app_runtime", &pg.runtime_password, &["-i", "-s", "4", "-q"]);
        }
        let mut pg_targets = vec![("direct-tls", pg.port, "app_runtime", pg.runtime_password.as_str(), None)];
        if let Some(b) = &bouncer {
            pg_targets.push(("pgbouncer", b.port, "app", APP_PASSWORD, Some(b.cpu_pid)));
        }
        pg_targets.push(("portcullis", proxy_pg, "app", APP_PASSWORD, Some(proxy.child.id())));
        pg_targets.push(("portcullis-pool", proxy_pool, "app", APP_PASSWORD, Some(proxy.child.id())));
        pg_targets.retain(|t| t.0 == "direct-tls" || wanted(t.0));
        for (kind, args) in [
            ("pg", vec!["-S", "-n", "-c", "8", "-j", "2", "-T", secs.as_str()]),
            ("pgconnect", vec!["-S", "-n", "-C", "-c", "8", "-j", "2", "-T", secs.as_str()]),
        ] {
            if !run(kind) {
                continue;
            }
            let row = if kind == "pg" { "pgbench -S -c 8 (tps)" } else { "pgbench -S -C -c 8 (tps)" };
            for (name, port, user, pw, pid) in &pg_targets {
                let c0 = pid.map(cpu_seconds);
                let (tps, txns) = pgbench(*port, user, pw, &args);
                s.add(row, name, tps);
                if let (Some(pid), Some(c0)) = (pid, c0) {
                    cpu.add(row, name, (cpu_seconds(*pid) - c0) / txns.max(1.0) * 1e6);
                }
            }
        }
    }
    let mut cols: Vec<&str> = redis_targets.iter().map(|t| t.name).collect();
    for c in ["direct-tls", "pgbouncer"] {
        cols.push(c);
    }
    let mut json = serde_json::Map::new();
    println!("\n{:<28} {}", "median (min–max) ×direct", cols.iter().map(|c| format!("{c:>26}")).collect::<String>());
    let rows: Vec<String> =
        s.0.keys().map(|k| k.0.clone()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    for row in &rows {
        let base_col = if row.starts_with("pgbench") { "direct-tls" } else { "direct" };
        let base = s.stats(row, base_col).map(|x| x.0);
        let mut line = format!("{row:<28}");
        let mut jrow = serde_json::Map::new();
        for c in &cols {
            match s.stats(row, c) {
                Some((med, lo, hi)) => {
                    let ratio = base.map(|b| med / b).unwrap_or(f64::NAN);
                    line.push_str(&format!("{:>26}", format!("{med:.0} ({lo:.0}–{hi:.0}) {ratio:.2}×")));
                    jrow.insert(
                        c.to_string(),
                        serde_json::json!({"median": med, "min": lo, "max": hi, "ratio": ratio}),
                    );
                }
                None => line.push_str(&format!("{:>26}", "–")),
            }
        }
        println!("{line}");
        json.insert(row.clone(), serde_json::Value::Object(jrow));
    }
    println!("\nfront-end CPU µs per request (median)");
    let cpu_rows: Vec<String> =
        cpu.0.keys().map(|k| k.0.clone()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    for row in &cpu_rows {
        let mut line = format!("{row:<28}");
        for c in &cols {
            match cpu.stats(row, c) {
                Some((med, _, _)) => {
                    line.push_str(&format!("{:>26}", format!("{med:.2}")));
                    json.insert(format!("cpu µs/req {row} {c}"), serde_json::json!(med));
                }
                None => line.push_str(&format!("{:>26}", "–")),
            }
        }
        println!("{line}");
    }
    if run("idle") {
        // A fresh process: the benchmarks' freed buffers would absorb the growth.
        let idle_dir = dir.path().join("idle");
        std::fs::create_dir_all(&idle_dir).unwrap();
        let (fresh, fresh_pg, _, _) = portcullis(&idle_dir, pg.port, r.port);
        let (redis_kib, pg_kib) = idle_rss(&rt, fresh.child.id(), fresh.port, fresh_pg, idle_n, 150);
        println!(
            "\nPortcullis RSS per idle authenticated TLS connection: Redis {redis_kib:.1} KiB ({idle_n} connections), Postgres {pg_kib:.1} KiB (150: PostgreSQL's max_connections)"
        );
        json.insert("rss KiB per idle redis connection".into(), serde_json::json!(redis_kib));
        json.insert("rss KiB per idle postgres connection".into(), serde_json::json!(pg_kib));
    }
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/e2e-bench.json");
    std::fs::write(&out, serde_json::to_string_pretty(&serde_json::Value::Object(json)).unwrap()).unwrap();
    println!("\nwritten to {}", out.display());
    drop(fronts);
    drop(bouncer);
    drop(proxy);
}
