//! The `portcullis` command line (clap). Everything else lives in the library.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::prelude::*;

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "TLS-terminating, authenticating sidecar proxy for PostgreSQL and Redis"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the configured listeners (SIGHUP reloads, SIGTERM drains).
    Run {
        /// Config file.
        #[arg(long, short, default_value = "config/dev.toml")]
        config: PathBuf,
    },
    /// Validate the config and print the security lint; exit 1 on any error finding.
    Check {
        /// Config file.
        #[arg(long, short, default_value = "config/dev.toml")]
        config: PathBuf,
        /// Lint the config alone: do not read the certificate, users and secret files it names
        /// (for config templates checked in CI).
        #[arg(long)]
        offline: bool,
    },
    /// Probe a running proxy's admin endpoint (container HEALTHCHECK): exit 0 when healthy.
    Health {
        /// Config file (its `[admin] listen` is probed).
        #[arg(long, short, default_value = "config/dev.toml")]
        config: PathBuf,
        /// Probe /readyz instead of /healthz.
        #[arg(long)]
        ready: bool,
    },
    /// Development certificates.
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// User secrets.
    User {
        #[command(subcommand)]
        cmd: UserCmd,
    },
    /// Posture evidence: log in as the runtime role and check its privileges, RLS on the
    /// protected tables, PUBLIC's grants, and that deny_users are refused; exit 1 on a failure.
    AuditPostgres {
        /// Config file.
        #[arg(long, short, default_value = "config/dev.toml")]
        config: PathBuf,
        /// Only this listener.
        #[arg(long)]
        listener: Option<String>,
        /// Database to inspect.
        #[arg(long, default_value = "postgres")]
        database: String,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// A private PostgreSQL with the proxy in front, on the dev config; Ctrl-C cleans up.
    Demo {
        /// Config file (its listeners are used; upstream and users are the demo's own).
        #[arg(long, short, default_value = "config/dev.toml")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Write an ECDSA dev CA, a server certificate (localhost, 127.0.0.1, ::1) and a client certificate (CN app).
    Dev {
        /// Output directory.
        #[arg(long, default_value = "certs-dev")]
        out: PathBuf,
    },
    /// Issue a new server key and certificate from an existing dev CA (a renewal drill).
    RenewServer {
        /// Directory holding the dev CA (`ca.key`).
        #[arg(long, default_value = "certs-dev")]
        pki: PathBuf,
        /// Where to write server.crt and server.key (default: the PKI directory).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum UserCmd {
    /// Read a password on stdin and print its verifier for the users file.
    Hash {
        /// Which verifier: SCRAM-SHA-256 (postgres) or Argon2id PHC (redis).
        #[arg(long, value_enum)]
        protocol: HashProtocol,
        /// Postgres: reuse the salt and iteration count of this existing verifier, so the old
        /// and new verifiers can be listed together in `postgres_scram` during a rotation.
        #[arg(long, value_name = "VERIFIER")]
        same_salt_as: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum HashProtocol {
    Postgres,
    Redis,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PORTCULLIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Operational logs go to stderr; audit events (target "audit") are JSON lines on stdout.
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(tracing_subscriber::filter::filter_fn(|m| m.target() != "audit"))
        .with_filter(filter);
    let audit = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stdout)
        .without_time()
        .with_level(false)
        .with_target(false)
        .with_ansi(false)
        .with_filter(tracing_subscriber::filter::filter_fn(|m| m.target() == "audit"));
    tracing_subscriber::registry().with(logs).with(audit).init();
}

fn read_password() -> anyhow::Result<String> {
    let mut s = String::new();
    std::io::stdin().read_to_string(&mut s).context("reading the password from stdin")?;
    let pw = s.lines().next().unwrap_or_default().to_string();
    anyhow::ensure!(!pw.is_empty(), "empty password on stdin");
    Ok(pw)
}

/// GET `path` on the admin endpoint; the HTTP status. (A status line is all a probe needs.)
fn probe(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<u16> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(3);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut head = [0u8; 32];
    let n = s.read(&mut head)?;
    let line = String::from_utf8_lossy(&head[..n]);
    line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("not an HTTP response")
}

/// jemalloc: long-lived sessions interleaved with short-lived TLS handshake buffers fragment
/// glibc's heap (idle memory per connection measured ~50 KiB with it, see benches/e2e.rs).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("portcullis: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Run { config } => {
            init_tracing();
            let cfg = portcullis::config::load(&config)?;
            match raise_open_files_limit() {
                // each proxied connection holds two descriptors, plus listeners and files
                Ok(n) if n < (cfg.limits.max_connections as u64).saturating_mul(2).saturating_add(64) => {
                    tracing::warn!(
                        open_files = n,
                        max_connections = cfg.limits.max_connections,
                        "the open-files limit is below 2 x max_connections: connections may fail (raise ulimit -n)"
                    )
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "could not read or raise the open-files limit"),
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(cfg.limits.worker_threads)
                .enable_all()
                .build()?;
            rt.block_on(portcullis::app::run(cfg))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Check { config, offline } => {
            let cfg = match portcullis::config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    println!("error   PC000  {e}");
                    println!("\n1 error, 0 warnings");
                    return Ok(ExitCode::from(1));
                }
            };
            let findings = if offline {
                portcullis::config::lint::lint_offline(&cfg)
            } else {
                portcullis::config::lint::lint(&cfg)
            };
            for f in &findings {
                println!("{f}");
            }
            let errors = findings.iter().filter(|f| f.severity == portcullis::config::lint::Severity::Error).count();
            println!(
                "\n{} error{}, {} warning{} in {}",
                errors,
                if errors == 1 { "" } else { "s" },
                findings.len() - errors,
                if findings.len() - errors == 1 { "" } else { "s" },
                config.display()
            );
            Ok(if errors > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
        }
        Cmd::Certs { cmd: CertsCmd::Dev { out } } => {
            portcullis::certs::write_dev_pki(&out, "app")?;
            println!("wrote ca.crt ca.key server.crt server.key client.crt client.key to {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Certs { cmd: CertsCmd::RenewServer { pki, out } } => {
            let out = out.unwrap_or_else(|| pki.clone());
            portcullis::certs::renew_dev_server_cert(&pki, &out)?;
            println!("wrote server.crt server.key to {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::User { cmd: UserCmd::Hash { protocol, same_salt_as } } => {
            let pw = read_password()?;
            match (protocol, same_salt_as) {
                (HashProtocol::Postgres, None) => {
                    println!("{}", postgres_protocol::password::scram_sha_256(pw.as_bytes()))
                }
                (HashProtocol::Postgres, Some(v)) => {
                    use portcullis::auth::scram::ScramVerifier;
                    let old = ScramVerifier::parse(&v).context("--same-salt-as is not a SCRAM-SHA-256 verifier")?;
                    println!("{}", ScramVerifier::from_password(&pw, &old.salt, old.iterations).encode());
                }
                (HashProtocol::Redis, Some(_)) => anyhow::bail!("--same-salt-as applies to --protocol postgres only"),
                (HashProtocol::Redis, None) => {
                    use argon2::PasswordHasher;
                    let h = argon2::Argon2::default()
                        .hash_password(pw.as_bytes())
                        .map_err(|e| anyhow::anyhow!("argon2: {e}"))?;
                    println!("{h}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Health { config, ready } => {
            let cfg = portcullis::config::load(&config)?;
            let mut addr = cfg.admin_listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            let path = if ready { "/readyz" } else { "/healthz" };
            match probe(addr, path) {
                Ok(200) => Ok(ExitCode::SUCCESS),
                Ok(status) => {
                    eprintln!("portcullis health: {path} answered {status}");
                    Ok(ExitCode::from(1))
                }
                Err(e) => {
                    eprintln!("portcullis health: {addr}: {e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        Cmd::AuditPostgres { config, listener, database, json } => {
            let cfg = portcullis::config::load(&config)?;
            let rt = tokio::runtime::Runtime::new()?;
            let checks = rt
                .block_on(portcullis::posture::audit(&cfg, listener.as_deref(), &database))
                .map_err(|e| anyhow::anyhow!(e))?;
            let failed = checks.iter().filter(|c| !c.ok).count();
            if json {
                println!("{}", serde_json::to_string_pretty(&checks)?);
            } else {
                for c in &checks {
                    println!("{}  {:<12} {:<40} {}", if c.ok { "PASS" } else { "FAIL" }, c.listener, c.check, c.detail);
                }
                println!("\n{} checks, {} failed", checks.len(), failed);
            }
            Ok(if failed > 0 || checks.is_empty() { ExitCode::from(1) } else { ExitCode::SUCCESS })
        }
        Cmd::Demo { config } => {
            init_tracing();
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(portcullis::demo::run_demo(&config)).map_err(|e| anyhow::anyhow!(e))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Raises this process's soft limit on open files to its hard limit (as HAProxy and nginx do:
/// every proxied connection needs two descriptors) and returns the limit now in force.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            lim = want;
        }
    }
    Ok(lim.rlim_cur)
}
