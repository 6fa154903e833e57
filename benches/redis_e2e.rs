//! End-to-end Redis throughput, side by side in one run: redis-benchmark straight to a private
//! Redis (plaintext, and its native TLS) versus through Portcullis (TLS 1.3, local AUTH, ACL
//! policy on every command). Run with `cargo bench --bench redis_e2e` (needs redis-server).
//! Prints one table; no assertions.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;

use support::*;

fn bench(port: u16, tls: bool, user: &str, pw: &str, args: &[&str]) -> Vec<(String, f64)> {
    let mut cmd = Command::new("redis-benchmark");
    if tls {
        cmd.args(["--tls", "--cacert"]).arg(certs().join("ca.crt"));
    }
    let out = cmd
        .args(["-h", if tls { "localhost" } else { "127.0.0.1" }, "-p", &port.to_string(), "--user", user, "-a", pw])
        .args(args)
        .args(["-q"])
        .output()
        .expect("redis-benchmark runs");
    assert!(out.status.success(), "redis-benchmark: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .split(['\n', '\r'])
        .filter_map(|l| {
            let (name, rest) = l.trim().split_once(": ")?;
            let rps = rest.split_whitespace().next()?.parse().ok()?;
            rest.contains("requests per second").then(|| (name.to_string(), rps))
        })
        .collect()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let r = redis();
    let proxy = rt.block_on(redis_proxy("[limits]\nmax_connections_per_source = 10000\n", ""));
    let n = std::env::var("REDIS_E2E_REQUESTS").unwrap_or_else(|_| "200000".into());
    println!("{:<34} {:>14} {:>14} {:>14}", "redis-benchmark (50 clients)", "direct plain", "direct TLS", "proxy TLS");
    for (label, extra) in [("pipeline 16", vec!["-P", "16"]), ("no pipeline", vec!["-P", "1"])] {
        let mut args = vec!["-t", "set,get", "-c", "50", "-n", n.as_str()];
        args.extend(extra);
        let plain = bench(r.port, false, "portcullis", &r.password, &args);
        let native = bench(r.tls_port.expect("TLS port"), true, "portcullis", &r.password, &args);
        let proxied = bench(proxy.redis_port(), true, "app", REDIS_APP_PW, &args);
        for (i, (name, p)) in plain.iter().enumerate() {
            let t = native.get(i).map_or(0.0, |x| x.1);
            let x = proxied.get(i).map_or(0.0, |x| x.1);
            println!(
                "{:<34} {p:>14.0} {t:>14.0} {x:>14.0}   (proxy vs native TLS {:+.1}%)",
                format!("{name}, {label}"),
                (x / t - 1.0) * 100.0
            );
        }
    }
    // The TTL policy's cost: pipelined writes through a proxy whose rule matches
    // redis-benchmark's keys ("key:*" and "mylist": SET gets EX appended, LPUSH is followed by
    // EXPIRE NX) vs one whose rule matches nothing.
    let limits = "[limits]\nmax_connections_per_source = 10000\n";
    let matching = rt.block_on(redis_proxy(
        limits,
        "ttl = [ { pattern = \"key:*\", default = \"30m\", max = \"24h\" }, { pattern = \"mylist\", default = \"30m\", max = \"24h\" } ]",
    ));
    let other =
        rt.block_on(redis_proxy(limits, "ttl = [ { pattern = \"nomatch:*\", default = \"30m\", max = \"24h\" } ]"));
    let args = ["-t", "set,lpush", "-c", "50", "-n", n.as_str(), "-P", "16"];
    let o = bench(other.redis_port(), true, "app", REDIS_APP_PW, &args);
    let m = bench(matching.redis_port(), true, "app", REDIS_APP_PW, &args);
    println!();
    println!("{:<34} {:>14} {:>14}", "TTL policy, pipeline 16", "non-matching", "matching");
    for ((name, a), (_, b)) in o.iter().zip(&m) {
        println!("{name:<34} {a:>14.0} {b:>14.0}   ({:+.1}%)", (b / a - 1.0) * 100.0);
    }
}
