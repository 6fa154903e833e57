//! Private PostgreSQL instances from the system binaries: used by `portcullis demo` and by the
//! integration tests. Each has a bootstrap superuser `postgres`, a least-privilege runtime role
//! `app_runtime`, a superuser `rogue_admin` (for the rejection tests) and a database `app`.

use std::io;
use std::net::TcpListener as StdListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the PostgreSQL 15 server binaries are.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A running private PostgreSQL.
#[derive(Debug)]
pub struct PgInstance {
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// Password of the bootstrap superuser `postgres`.
    pub postgres_password: String,
    /// Password of `app_runtime`.
    pub runtime_password: String,
    /// Password of `rogue_admin`.
    pub rogue_password: String,
    /// The server log (log_connections = on).
    pub log: PathBuf,
    dir: Option<tempfile::TempDir>,
    data: PathBuf,
    ssl: bool,
    socket_dir: PathBuf,
    child: Option<Child>,
    owner: Option<(u32, u32)>,
}

fn random_password() -> String {
    let mut b = [0u8; 18];
    rand::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> io::Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A detached watchdog: once process `watched` is gone, it signals `child` (then kills it) and
/// removes `dir`. Test binaries need it: their statics are never dropped.
fn spawn_watchdog(watched: u32, child: u32, signal: &str, dir: PathBuf) -> io::Result<()> {
    let script = format!(
        "while kill -0 {watched} 2>/dev/null; do sleep 0.5; done; kill -{signal} {child} 2>/dev/null; sleep 2; kill -KILL {child} 2>/dev/null; rm -rf '{}'",
        dir.display()
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()?;
    Ok(())
}

/// True while a process of process group `pgid` is alive.
fn kill_tree_alive(pgid: u32) -> bool {
    std::fs::read_dir("/proc").into_iter().flatten().flatten().any(|e| {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { return false };
        // pid (comm) state ppid pgrp ...: comm may hold spaces, so split after the last ')';
        // a zombie (Z) is gone for our purpose, whoever reaps it
        let Some((_, rest)) = stat.rsplit_once(')') else { return false };
        let f: Vec<&str> = rest.split_whitespace().collect();
        f.first() != Some(&"Z") && f.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(pgid)
    })
}

/// uid/gid of the `postgres` system user when we are root (PostgreSQL refuses to run as root).
fn postgres_owner() -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let me = std::fs::metadata("/proc/self").ok()?.uid();
    if me != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&"postgres") && f.len() > 3).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

impl PgInstance {
    fn cmd(&self, bin: &str) -> Command {
        let mut c = Command::new(Path::new(PG_BIN).join(bin));
        if let Some((uid, gid)) = self.owner {
            c.uid(uid).gid(gid);
        }
        c.env_remove("PGPASSWORD").env_remove("PGHOST").env_remove("PGPORT");
        c
    }

    /// Initialises and starts a cluster in a fresh temporary directory. With `watch_pid`, a
    /// watchdog stops the server and removes the directory when that process exits (for test
    /// binaries, whose statics are never dropped).
    /// `tls`: a (certificate, key) pair to serve with `ssl = on` (plaintext stays allowed).
    pub fn start(watch_pid: Option<u32>, tls: Option<(&Path, &Path)>) -> io::Result<PgInstance> {
        if !Path::new(PG_BIN).join("postgres").exists() {
            return Err(io::Error::other(format!(
                "PostgreSQL 15 server binaries not found in {PG_BIN}: apt-get install -y postgresql-15"
            )));
        }
        let dir = tempfile::Builder::new().prefix("portcullis-pg-").tempdir()?;
        let owner = postgres_owner();
        let data = dir.path().join("data");
        let socket_dir = dir.path().join("sock");
        std::fs::create_dir(&socket_dir)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        }
        let pwfile = dir.path().join("pw");
        let mut inst = PgInstance {
            port: free_port()?,
            postgres_password: random_password(),
            runtime_password: random_password(),
            rogue_password: random_password(),
            log: dir.path().join("postgres.log"),
            data: data.clone(),
            ssl: tls.is_some(),
            socket_dir: socket_dir.clone(),
            dir: None,
            child: None,
            owner,
        };
        std::fs::write(&pwfile, &inst.postgres_password)?;
        std::fs::write(&inst.log, "")?;
        if let Some((uid, gid)) = owner {
            for p in [&socket_dir, &pwfile, &inst.log] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid))?;
            }
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
        }
        let out = inst
            .cmd("initdb")
            .args(["-D"])
            .arg(&data)
            .args(["-U", "postgres", "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-sync"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!("initdb failed: {}", String::from_utf8_lossy(&out.stderr))));
        }
        let _ = std::fs::remove_file(&pwfile);
        if let Some((cert, key)) = tls {
            use std::os::unix::fs::PermissionsExt;
            for (src, name) in [(cert, "server.crt"), (key, "server.key")] {
                let dst = data.join(name);
                std::fs::copy(src, &dst)?;
                std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o600))?;
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::chown(&dst, Some(uid), Some(gid))?;
                }
            }
        }
        inst.spawn()?;
        match watch_pid {
            Some(pid) => {
                let child = inst.child.as_ref().map(|c| c.id()).unwrap_or_default();
                spawn_watchdog(pid, child, "INT", dir.keep())?;
            }
            None => inst.dir = Some(dir),
        }
        inst.wait_ready()?;
        inst.psql_admin(&format!(
            "CREATE ROLE app_runtime LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEROLE NOCREATEDB PASSWORD '{}';
             CREATE ROLE rogue_admin LOGIN SUPERUSER PASSWORD '{}';",
            inst.runtime_password, inst.rogue_password
        ))?;
        inst.psql_admin("CREATE DATABASE app OWNER app_runtime")?;
        Ok(inst)
    }

    /// Starts the server process on the existing data directory and port.
    fn spawn(&mut self) -> io::Result<()> {
        let log = std::fs::OpenOptions::new().append(true).open(&self.log)?;
        let ssl: &[&str] = if self.ssl { &["-c", "ssl=on"] } else { &[] };
        let child = self
            .cmd("postgres")
            .arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.socket_dir.display()))
            .args(["-c", "log_connections=on", "-c", "fsync=off", "-c", "max_connections=200"])
            .args(ssl)
            .stdout(Stdio::null())
            .stderr(log)
            // its own process group: `kill` takes the postmaster and every backend at once
            .process_group(0)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// Kills the server as a crash would: SIGKILL to the postmaster and every backend, no
    /// goodbye on any connection. Fault tests then `restart` it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]).status();
            let _ = child.wait();
            // wait until no backend is left attached to the shared memory
            let t = Instant::now();
            while kill_tree_alive(child.id()) {
                if t.elapsed() > Duration::from_secs(10) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Starts the server again on the same data directory and port (crash recovery runs) and
    /// waits until it accepts connections. Not for instances a watchdog looks after.
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        self.spawn()?;
        self.wait_ready()
    }

    fn wait_ready(&self) -> io::Result<()> {
        let t = Instant::now();
        loop {
            let ok = self
                .cmd("pg_isready")
                .args(["-q", "-h"])
                .arg(&self.socket_dir)
                .args(["-p", &self.port.to_string(), "-U", "postgres"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(30) {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                return Err(io::Error::other(format!("postgres did not start within 30s:\n{log}")));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs SQL as the bootstrap superuser over the Unix socket (never through the proxy).
    pub fn psql_admin(&self, sql: &str) -> io::Result<String> {
        self.psql_admin_db("postgres", sql)
    }

    /// The same, in database `db`.
    pub fn psql_admin_db(&self, db: &str, sql: &str) -> io::Result<String> {
        let out = self
            .cmd("psql")
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.socket_dir)
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", db, "-c", sql])
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!("psql failed: {}", String::from_utf8_lossy(&out.stderr))));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The server log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the server (fast shutdown) and removes its directory.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.dir.take();
    }
}

impl Drop for PgInstance {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running private Redis: `default` user disabled, ACL user `portcullis` for the proxy.
#[derive(Debug)]
pub struct RedisInstance {
    /// TCP port on 127.0.0.1 (plaintext).
    pub port: u16,
    /// Native TLS port, when started with TLS material.
    pub tls_port: Option<u16>,
    /// Password of the ACL user `portcullis`.
    pub password: String,
    dir: Option<tempfile::TempDir>,
    conf: PathBuf,
    child: Option<Child>,
}

impl RedisInstance {
    /// Starts `redis-server` in a fresh directory. `tls`: (cert, key, ca) for a native TLS port.
    /// With `watch_pid`, a watchdog stops it when that process exits.
    pub fn start(watch_pid: Option<u32>, tls: Option<(&Path, &Path, &Path)>) -> io::Result<RedisInstance> {
        let dir = tempfile::Builder::new().prefix("portcullis-redis-").tempdir()?;
        let port = free_port()?;
        let password = random_password();
        let mut conf = format!(
            "port {port}\nbind 127.0.0.1\nsave \"\"\nappendonly no\ndir {d}\nlogfile {d}/redis.log\nprotected-mode yes\n\
             user default off\nuser portcullis on >{password} ~* &* +@all\n",
            d = dir.path().display()
        );
        let mut tls_port = None;
        if let Some((cert, key, ca)) = tls {
            let p = free_port()?;
            conf.push_str(&format!(
                "tls-port {p}\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\ntls-auth-clients no\n",
                cert.display(),
                key.display(),
                ca.display()
            ));
            tls_port = Some(p);
        }
        let conf_path = dir.path().join("redis.conf");
        std::fs::write(&conf_path, conf)?;
        let mut inst = RedisInstance { port, tls_port, password, dir: None, conf: conf_path, child: None };
        inst.spawn()?;
        match watch_pid {
            Some(pid) => {
                let child = inst.child.as_ref().map(|c| c.id()).unwrap_or_default();
                spawn_watchdog(pid, child, "TERM", dir.keep())?;
            }
            None => inst.dir = Some(dir),
        }
        inst.wait_ready()?;
        Ok(inst)
    }

    fn spawn(&mut self) -> io::Result<()> {
        let child = Command::new("redis-server")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| io::Error::other(format!("redis-server: {e} (apt-get install -y redis-server)")))?;
        self.child = Some(child);
        Ok(())
    }

    fn wait_ready(&self) -> io::Result<()> {
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if t.elapsed() > Duration::from_secs(20) {
                return Err(io::Error::other("redis-server did not start within 20s"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Kills the server with SIGKILL (a crash: no reply to anyone). Fault tests then `restart` it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (empty: persistence is off). Not for instances a
    /// watchdog looks after.
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        self.spawn()?;
        self.wait_ready()
    }

    /// Stops the server.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.dir.take();
    }
}

impl Drop for RedisInstance {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `portcullis demo`: a private PostgreSQL and Redis, dev certificates and users, the proxy in
/// front on the dev config's ports; prints ready-to-paste psql / redis-cli lines; Ctrl-C cleans up.
pub async fn run_demo(config_path: &Path) -> Result<(), String> {
    let certs = Path::new("certs-dev");
    if !certs.join("server.crt").exists() {
        crate::certs::write_dev_pki(certs, "app").map_err(|e| e.to_string())?;
        println!("wrote dev certificates to {}", certs.display());
    }
    let pg = tokio::task::spawn_blocking(|| PgInstance::start(None, None))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let redis = tokio::task::spawn_blocking(|| RedisInstance::start(None, None))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let work = tempfile::Builder::new().prefix("portcullis-demo-").tempdir().map_err(|e| e.to_string())?;
    let redis_pw = work.path().join("redis-upstream.pass");
    std::fs::write(&redis_pw, &redis.password).map_err(|e| e.to_string())?;
    let runtime_pw = work.path().join("pg-runtime.pass");
    std::fs::write(&runtime_pw, &pg.runtime_password).map_err(|e| e.to_string())?;
    let app_password = "app-dev-password";
    let users = work.path().join("users.toml");
    std::fs::write(
        &users,
        format!(
            "[[users]]\nname = \"app\"\npostgres_scram = \"{}\"\nredis_argon2 = \"{}\"\ncert_subjects = [\"CN=app\"]\n",
            postgres_protocol::password::scram_sha_256(app_password.as_bytes()),
            crate::auth::argon::hash(app_password.as_bytes())?
        ),
    )
    .map_err(|e| e.to_string())?;
    let mut cfg = crate::config::load(config_path).map_err(|e| e.to_string())?;
    for p in &mut cfg.postgres {
        p.upstream = format!("127.0.0.1:{}", pg.port);
        p.upstream_password = Some(crate::config::SecretRef::File(runtime_pw.clone()));
        p.users_file = Some(users.clone());
    }
    for r in &mut cfg.redis {
        r.upstream = format!("127.0.0.1:{}", redis.port);
        r.upstream_user = Some("portcullis".into());
        r.upstream_password = Some(crate::config::SecretRef::File(redis_pw.clone()));
        r.users_file = users.clone();
    }
    let running = crate::app::Running::start(cfg).await.map_err(|e| e.to_string())?;
    let (_, addr) = running.postgres_addrs.first().cloned().ok_or("no postgres listener")?;
    println!(
        "\nPortcullis demo is up (PostgreSQL 15 on 127.0.0.1:{}, admin on http://{}).",
        pg.port, running.admin_addr
    );
    println!("Connect through the proxy (SCRAM-SHA-256-PLUS, TLS verified):\n");
    println!(
        "  PGSSLROOTCERT=certs-dev/ca.crt PGPASSWORD={app_password} psql \"host=localhost port={} user=app dbname=app sslmode=verify-full channel_binding=require\"\n",
        addr.port()
    );
    println!("The bootstrap superuser is refused:\n");
    println!(
        "  PGSSLROOTCERT=certs-dev/ca.crt psql \"host=localhost port={} user=postgres dbname=app sslmode=verify-full\"\n",
        addr.port()
    );
    if let Some((_, raddr)) = running.redis_addrs.first() {
        println!("Redis through the proxy (TLS, local AUTH, dangerous commands denied):\n");
        println!(
            "  redis-cli --tls --cacert certs-dev/ca.crt -h localhost -p {} --user app --pass {app_password} --no-auth-warning PING\n",
            raddr.port()
        );
    }
    println!("Ctrl-C stops everything.");
    let _ = tokio::signal::ctrl_c().await;
    running.drain().await;
    drop(pg);
    drop(redis);
    drop(work);
    println!("stopped; private PostgreSQL and Redis removed");
    Ok(())
}
