//! End to end with the built binary and the real client tools: psql (verify-full, channel
//! binding), pgbench, promtool on /metrics, signals (SIGHUP reload, SIGTERM drain), the CLI,
//! and the captured logs and audit trail checked for secrets.

mod support;

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

struct Proc {
    child: Child,
    pg_port: u16,
    admin_port: u16,
    _dir: tempfile::TempDir,
    dir_path: std::path::PathBuf,
}

fn write_config(dir: &Path, pg_port: u16, admin_port: u16) {
    let c = certs().display().to_string();
    let pg = pg();
    std::fs::write(dir.join("runtime.pass"), &pg.runtime_password).unwrap();
    std::fs::write(
        dir.join("users.toml"),
        format!(
            "[[users]]\nname = \"app\"\npostgres_scram = \"{}\"\n",
            postgres_protocol::password::scram_sha_256(APP_PASSWORD.as_bytes())
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("portcullis.toml"),
        format!(
            r#"[admin]
listen = "127.0.0.1:{admin_port}"
[tls]
cert = "{c}/server.crt"
key = "{c}/server.key"
[lockout]
max_failures = 100
[[postgres]]
name = "main"
listen = "127.0.0.1:{pg_port}"
upstream = "127.0.0.1:{up}"
users_file = "{d}/users.toml"
upstream_user = "app_runtime"
upstream_password_file = "{d}/runtime.pass"
deny_users = ["postgres"]
"#,
            up = pg.port,
            d = dir.display()
        ),
    )
    .unwrap();
}

fn start_binary() -> Proc {
    let dir = tempfile::tempdir().unwrap();
    let pg_port = portcullis::demo::free_port().unwrap();
    let admin_port = portcullis::demo::free_port().unwrap();
    write_config(dir.path(), pg_port, admin_port);
    let child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(dir.path().join("portcullis.toml"))
        .env("PORTCULLIS_LOG", "debug")
        .stdout(std::fs::File::create(dir.path().join("audit.log")).unwrap())
        .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", admin_port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "binary did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let dir_path = dir.path().to_path_buf();
    Proc { child, pg_port, admin_port, _dir: dir, dir_path }
}

fn psql(port: u16, user: &str, password: &str, extra: &str, sql: &str) -> std::process::Output {
    Command::new("psql")
        .env("PGSSLROOTCERT", certs().join("ca.crt"))
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .arg(format!("host=localhost port={port} user={user} dbname=app sslmode=verify-full {extra}"))
        .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("psql runs")
}

fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn signal(child: &Child, sig: &str) {
    assert!(Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap().success());
}

#[test]
fn psql_pgbench_promtool_signals_and_no_secret_in_logs() {
    let mut p = start_binary();
    // psql: verify-full + SCRAM-SHA-256-PLUS
    let out = psql(p.pg_port, "app", APP_PASSWORD, "channel_binding=require", "select current_user");
    assert!(out.status.success(), "psql: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "app_runtime");
    // psql sees the exact refusals
    let out = psql(p.pg_port, "app", "wrong-password-123", "", "select 1");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("password authentication failed for user \"app\""));
    let out = psql(p.pg_port, "postgres", &pg().postgres_password, "", "select 1");
    assert!(String::from_utf8_lossy(&out.stderr).contains("login as \"postgres\" is not allowed through this proxy"));
    let out = Command::new("psql")
        .env("PGPASSWORD", APP_PASSWORD)
        .arg(format!("host=127.0.0.1 port={} user=app dbname=app sslmode=disable", p.pg_port))
        .args(["-X", "-c", "select 1"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("TLS is required by this server (use sslmode=require or stronger)")
    );

    // pgbench: init and a fixed number of transactions on 4 clients, no errors
    let bench = |args: &[&str]| {
        Command::new("pgbench")
            .env("PGSSLROOTCERT", certs().join("ca.crt"))
            .env("PGPASSWORD", APP_PASSWORD)
            .env("PGSSLMODE", "verify-full")
            .args(["-h", "localhost", "-p", &p.pg_port.to_string(), "-U", "app"])
            .args(args)
            .arg("app")
            .output()
            .unwrap()
    };
    let out = bench(&["-i", "-s", "1", "-q"]);
    assert!(out.status.success(), "pgbench -i: {}", String::from_utf8_lossy(&out.stderr));
    let out = bench(&["-c", "4", "-j", "2", "-t", "100", "-n"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pgbench: {text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("number of transactions actually processed: 400/400"), "{text}");
    assert!(text.contains("number of failed transactions: 0"), "{text}");

    // /metrics passes promtool
    let (status, metrics) = http_get(p.admin_port, "/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("portcullis_build_info"));
    assert!(metrics.contains("portcullis_tls_cert_expiry_timestamp_seconds{cert=\"server\"}"));
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) must be installed");
    promtool.stdin.take().unwrap().write_all(metrics.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // `portcullis health` (the container HEALTHCHECK) probes the admin endpoint
    let health = |extra: &[&str]| {
        Command::new(BIN)
            .args(["health", "--config"])
            .arg(p.dir_path.join("portcullis.toml"))
            .args(extra)
            .status()
            .unwrap()
    };
    assert!(health(&[]).success());
    assert!(health(&["--ready"]).success());

    // SIGHUP reload with a broken config: refused, old config keeps serving
    let cfg_path = p.dir_path.join("portcullis.toml");
    let good = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(&cfg_path, format!("{good}\nbogus_key = 1\n")).unwrap();
    signal(&p.child, "-HUP");
    std::thread::sleep(Duration::from_millis(500));
    let (_, metrics) = http_get(p.admin_port, "/metrics");
    assert!(metrics.contains("portcullis_config_reloads_total{result=\"error\"} 1"), "{metrics}");
    let out = psql(p.pg_port, "app", APP_PASSWORD, "", "select 1");
    assert!(out.status.success());
    std::fs::write(&cfg_path, good).unwrap();

    // SIGTERM with an open session: not ready, the session finishes, then exit 0
    let session = Command::new("psql")
        .env("PGSSLROOTCERT", certs().join("ca.crt"))
        .env("PGPASSWORD", APP_PASSWORD)
        .arg(format!("host=localhost port={} user=app dbname=app sslmode=verify-full", p.pg_port))
        .args(["-X", "-At", "-c", "select pg_sleep(1.5)", "-c", "select 'finished'"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    signal(&p.child, "-TERM");
    std::thread::sleep(Duration::from_millis(200));
    let (status, _) = http_get(p.admin_port, "/readyz");
    assert_eq!(status, 503, "draining");
    let out = session.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("finished"), "accepted session finished during drain");
    let t = Instant::now();
    let code = loop {
        if let Some(s) = p.child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "exits after drain");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(code.success());
    assert!(!health(&[]).success(), "nothing answers once it has stopped");

    // The captured logs and the audit trail: never a password.
    let audit = std::fs::read_to_string(p.dir_path.join("audit.log")).unwrap();
    let logs = std::fs::read_to_string(p.dir_path.join("stderr.log")).unwrap();
    for secret in
        [APP_PASSWORD, "wrong-password-123", &pg().runtime_password, &pg().postgres_password, &pg().rogue_password]
    {
        assert!(!audit.contains(secret), "audit leaks a secret");
        assert!(!logs.contains(secret), "logs leak a secret");
    }
    let events: Vec<serde_json::Value> = audit.lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    let has = |ev: &str, f: &dyn Fn(&serde_json::Value) -> bool| events.iter().any(|e| e["event"] == ev && f(e));
    assert!(has("auth_ok", &|e| e["user"] == "app" && e["tls_version"] == "TLSv1.3"));
    assert!(has("auth_failed", &|e| e["user"] == "app" && e["reason"] == "bad_credentials"));
    assert!(has("pg_login_rejected", &|e| e["user"] == "postgres" && e["reason"] == "deny_users"));
    assert!(has("conn_rejected", &|e| e["reason"] == "plaintext"));
    assert!(has("session_end", &|e| e["upstream_user"] == "app_runtime" && e["bytes_out"].as_u64().unwrap_or(0) > 0));
    assert!(has("config_reload", &|e| e["outcome"] == "error"));
    for e in &events {
        assert!(e["ts"].is_string() && e["event"].is_string());
    }
}

#[test]
fn cli_check_hash_and_certs() {
    let dir = tempfile::tempdir().unwrap();
    // certs dev
    let out = Command::new(BIN).args(["certs", "dev", "--out"]).arg(dir.path()).output().unwrap();
    assert!(out.status.success());
    for f in ["ca.crt", "ca.key", "server.crt", "server.key", "client.crt", "client.key"] {
        assert!(dir.path().join(f).exists(), "{f}");
    }
    // user hash: a verifier the proxy accepts, and never the password itself
    let mut child = Command::new(BIN)
        .args(["user", "hash", "--protocol", "postgres"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"s3cret-hash-me\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let verifier = String::from_utf8(out.stdout).unwrap();
    assert!(verifier.starts_with("SCRAM-SHA-256$4096:"));
    assert!(!verifier.contains("s3cret"));
    assert!(portcullis::auth::scram::ScramVerifier::parse(verifier.trim()).is_some());
    let mut child = Command::new(BIN)
        .args(["user", "hash", "--protocol", "redis"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"s3cret-hash-me\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(String::from_utf8(out.stdout).unwrap().starts_with("$argon2id$v=19$"));

    // check: a clean config passes; insecure ones fail with ids
    let write = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    };
    std::fs::write(dir.path().join("rt.pass"), "x").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path().join("rt.pass"), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    std::fs::write(dir.path().join("users.toml"), "").unwrap();
    let d = dir.path().display();
    let base = |admin: &str, extra: &str| {
        format!(
            "[admin]\nlisten = \"{admin}\"\n[tls]\ncert = \"{d}/server.crt\"\nkey = \"{d}/server.key\"\n[[postgres]]\nname = \"m\"\nlisten = \"127.0.0.1:6432\"\nupstream = \"127.0.0.1:5432\"\nusers_file = \"{d}/users.toml\"\nupstream_user = \"app_runtime\"\nupstream_password_file = \"{d}/rt.pass\"\n{extra}"
        )
    };
    let run_check = |p: &Path| Command::new(BIN).args(["check", "--config"]).arg(p).output().unwrap();
    let good = write("good.toml", &base("127.0.0.1:9898", "deny_users = [\"postgres\"]\n"));
    let out = run_check(&good);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let bad = write(
        "bad.toml",
        &base("203.0.113.7:9898", "deny_users = []\ndeny_superuser = false\ntls = \"disabled\"\n")
            .replace("127.0.0.1:6432", "0.0.0.0:6432"),
    );
    let out = run_check(&bad);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    // --offline: the config's own findings, without reading the files it names
    let out = Command::new(BIN).args(["check", "--offline", "--config"]).arg(&bad).output().unwrap();
    let offline = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{offline}");
    assert!(offline.contains("PC004") && !offline.contains("PC015"), "{offline}");
    for id in ["PC001", "PC003", "PC004", "PC005"] {
        assert!(text.contains(id), "{id} in {text}");
    }
    // inline secrets and unknown keys are config errors with a line number
    let inline =
        write("inline.toml", &base("127.0.0.1:9898", "deny_users = [\"postgres\"]\nupstream_password = \"hunter2\"\n"));
    let out = run_check(&inline);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(text.contains("PC000") && text.contains("inline.toml:14:21:") && text.contains("inline secrets"), "{text}");
    assert!(!text.contains("hunter2"));
}

#[test]
fn run_fails_fast_on_a_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(&p, "[tls]\ncert = \"x\"\nkey = \"y\"\nmin_version = \"1.1\"\n").unwrap();
    let out = Command::new(BIN).args(["run", "--config"]).arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("c.toml:4:") && err.contains("min_version"), "{err}");
}

#[test]
fn demo_prints_a_working_psql_line_and_cleans_up_on_ctrl_c() {
    use std::io::BufRead;
    let cwd = tempfile::tempdir().unwrap();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/dev.toml");
    let mut child = Command::new(BIN)
        .args(["demo", "--config"])
        .arg(&config)
        .current_dir(cwd.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut psql_line, mut pg_port, mut redis_line) = (None, None, None);
    let t = Instant::now();
    while psql_line.is_none() || redis_line.is_none() {
        assert!(t.elapsed() < Duration::from_secs(60), "demo did not come up");
        let line = lines.next().expect("demo output").unwrap();
        if let Some(rest) = line.split("PostgreSQL 15 on 127.0.0.1:").nth(1) {
            pg_port = rest.split(|c: char| !c.is_ascii_digit()).next().map(str::to_string);
        }
        if line.contains("channel_binding=require") {
            psql_line = Some(line.trim().to_string());
        }
        if line.contains("redis-cli --tls") {
            redis_line = Some(line.trim().to_string());
        }
    }
    assert!(cwd.path().join("certs-dev/ca.crt").exists(), "dev certificates generated");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("{} -X -At -c 'select current_user'", psql_line.unwrap()))
        .current_dir(cwd.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "app_runtime");
    let out = Command::new("sh").arg("-c").arg(redis_line.unwrap()).current_dir(cwd.path()).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "PONG", "{}", String::from_utf8_lossy(&out.stderr));
    signal(&child, "-INT");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(child.wait().unwrap().success());
    assert!(rest.iter().any(|l| l.contains("private PostgreSQL and Redis removed")), "{rest:?}");
    let port: u16 = pg_port.expect("demo names its PostgreSQL port").parse().unwrap();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "private PostgreSQL stopped");
}

#[test]
fn redis_cli_and_redis_benchmark_through_the_binary_without_leaking_secrets() {
    let r = redis();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let c = certs().display().to_string();
    let port = portcullis::demo::free_port().unwrap();
    let admin = portcullis::demo::free_port().unwrap();
    std::fs::write(dir.path().join("redis.pass"), &r.password).unwrap();
    let app_pw = "cli-app-secret-91ab";
    let keys_pw = "cli-keys-secret-02cd";
    std::fs::write(
        dir.path().join("users.toml"),
        format!(
            "[[users]]\nname = \"app\"\nredis_argon2 = \"{}\"\n\n[[users]]\nname = \"keys\"\nredis_argon2 = \"{}\"\nredis_rules = \"+@all -@dangerous ~app:*\"\n",
            portcullis::auth::argon::hash(app_pw.as_bytes()).unwrap(),
            portcullis::auth::argon::hash(keys_pw.as_bytes()).unwrap()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("p.toml"),
        format!(
            "[admin]\nlisten = \"127.0.0.1:{admin}\"\n[tls]\ncert = \"{c}/server.crt\"\nkey = \"{c}/server.key\"\n[lockout]\nmax_failures = 100\n\
             [[redis]]\nname = \"cache\"\nlisten = \"127.0.0.1:{port}\"\nupstream = \"127.0.0.1:{}\"\nusers_file = \"{d}/users.toml\"\n\
             upstream_user = \"portcullis\"\nupstream_password_file = \"{d}/redis.pass\"\n\
             ttl = [ {{ pattern = \"key:*\", default = \"1h\", max = \"1d\" }} ]\n",
            r.port
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(dir.path().join("p.toml"))
        .env("PORTCULLIS_LOG", "debug")
        .stdout(std::fs::File::create(dir.path().join("audit.log")).unwrap())
        .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", admin)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "binary did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let cli = |user: &str, pw: &str, args: &[&str]| {
        let out = Command::new("redis-cli")
            .args(["--tls", "--cacert", &format!("{c}/ca.crt"), "-h", "localhost", "-p", &port.to_string()])
            .args(["--user", user, "--pass", pw, "--no-auth-warning"])
            .args(args)
            .output()
            .expect("redis-cli runs");
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    };
    assert_eq!(cli("app", app_pw, &["PING"]).trim(), "PONG");
    assert_eq!(cli("app", app_pw, &["SET", "app:cli", "secret-value-5d5d"]).trim(), "OK");
    assert_eq!(cli("app", app_pw, &["GET", "app:cli"]).trim(), "secret-value-5d5d");
    assert!(
        cli("app", app_pw, &["FLUSHALL"]).contains("NOPERM this user has no permissions to run the 'flushall' command")
    );
    assert!(cli("app", "wrong-pw-7777", &["PING"]).contains("WRONGPASS"));
    assert!(
        cli("keys", keys_pw, &["GET", "private:thing"])
            .contains("NOPERM this user has no permissions to access one of the keys")
    );
    // plaintext redis-cli is told to use TLS
    let out = Command::new("redis-cli").args(["-h", "127.0.0.1", "-p", &port.to_string(), "PING"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("TLS is required by this server"), "{out:?}");
    // redis-benchmark over TLS: completes, no errors
    let out = Command::new("redis-benchmark")
        .args(["--tls", "--cacert", &format!("{c}/ca.crt"), "-h", "localhost", "-p", &port.to_string()])
        .args(["--user", "app", "-a", app_pw, "-t", "set,get,incr,lpush", "-n", "2000", "-c", "10", "-P", "4", "-q"])
        .output()
        .expect("redis-benchmark runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    for t in ["SET:", "GET:", "INCR:", "LPUSH:"] {
        assert!(text.contains(t), "{t} in {text}");
    }
    // redis-benchmark's keys ("key:…") fall under a TTL rule: they were all given one
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let ttl = rt.block_on(async {
        let mut admin = RawRedis::direct_as("portcullis", &r.password).await;
        admin.call(&["TTL", "key:__rand_int__"]).await
    });
    let ttl: i64 = String::from_utf8_lossy(&ttl[1..ttl.len() - 2]).parse().unwrap();
    assert!((1..=3600).contains(&ttl), "benchmark key TTL {ttl}");
    // (redis-benchmark warns that it could not read CONFIG: denied by policy, as for a Redis ACL user)
    assert!(!text.contains("ERR") && !text.contains("NOPERM") && !text.contains("Error"), "{text}");

    signal(&child, "-TERM");
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(10), "exits after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    let audit = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
    let logs = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap();
    for secret in [app_pw, keys_pw, "wrong-pw-7777", "secret-value-5d5d", "private:thing", r.password.as_str()] {
        assert!(!audit.contains(secret), "audit leaks {secret}");
        assert!(!logs.contains(secret), "logs leak {secret}");
    }
    let events: Vec<serde_json::Value> = audit.lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    assert!(events.iter().any(|e| e["event"] == "redis_denied" && e["command"] == "flushall" && e["user"] == "app"));
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "redis_denied" && e["key"].as_str().is_some_and(|k| k.starts_with("hmac:")))
    );
    assert!(events.iter().any(|e| e["event"] == "auth_failed" && e["protocol"] == "redis"));
}
