//! End-to-end PostgreSQL throughput, side by side in one run: pgbench straight to a private
//! PostgreSQL 15 (TLS 1.3, SCRAM) versus pgbench through Portcullis (TLS 1.3, SCRAM-PLUS at the
//! proxy, SCRAM upstream). Run with `cargo bench --bench pg_e2e` (needs postgresql-15).
//! Prints one table; no assertions (timings never go in tests).

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;

use support::*;

fn pgbench(port: u16, user: &str, password: &str, args: &[&str]) -> String {
    let out = Command::new("pgbench")
        .env("PGSSLROOTCERT", certs().join("ca.crt"))
        .env("PGPASSWORD", password)
        .env("PGSSLMODE", "verify-full")
        .args(["-h", "localhost", "-p", &port.to_string(), "-U", user])
        .args(args)
        .arg("app")
        .output()
        .expect("pgbench runs");
    assert!(out.status.success(), "pgbench: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tps(report: &str) -> f64 {
    report
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let pg = pg();
    let proxy = rt.block_on(proxy("[limits]\nmax_connections_per_source = 10000\n", ""));
    let direct_port = pg.port;
    let runtime_pw = pg.runtime_password.clone();
    pgbench(direct_port, "app_runtime", &runtime_pw, &["-i", "-s", "4", "-q"]);
    let secs = std::env::var("PG_E2E_SECONDS").unwrap_or_else(|_| "10".into());
    println!("{:<44} {:>12} {:>12}", "workload (pgbench, 8 clients, TLS 1.3)", "direct tps", "proxy tps");
    for (name, args) in [
        ("select-only, simple protocol", vec!["-S", "-n", "-c", "8", "-j", "2", "-T", &secs]),
        ("select-only, prepared", vec!["-S", "-n", "-M", "prepared", "-c", "8", "-j", "2", "-T", &secs]),
        ("tpcb-like", vec!["-n", "-c", "8", "-j", "2", "-T", &secs]),
        ("connect per transaction (-C), select-only", vec!["-S", "-n", "-C", "-c", "8", "-j", "2", "-T", &secs]),
    ] {
        let d = tps(&pgbench(direct_port, "app_runtime", &runtime_pw, &args));
        let p = tps(&pgbench(proxy.port(), "app", APP_PASSWORD, &args));
        println!("{name:<44} {d:>12.0} {p:>12.0}   ({:+.1}%)", (p / d - 1.0) * 100.0);
    }
    drop(proxy);
}
