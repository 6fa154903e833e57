//! Prometheus for real: the alert rules pass `promtool check rules` and their unit tests, the
//! example scrape config passes `promtool check config`, and a real Prometheus server scraping a
//! running proxy sees the target up and the security series after some traffic.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const PROM_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/prometheus");

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(PROM_DIR)
        .output()
        .expect("promtool (Debian package prometheus) must be installed");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?}: {text}");
    text
}

#[test]
fn alert_rules_check_and_unit_tests_pass() {
    assert!(promtool(&["check", "rules", "alerts.yml"]).contains("SUCCESS: 7 rules found"));
    assert!(promtool(&["test", "rules", "alerts_test.yml"]).contains("SUCCESS"));
}

#[test]
fn example_scrape_config_is_valid() {
    promtool(&["check", "config", "scrape.yml"]);
}

async fn http_json(port: u16, path: &str) -> serde_json::Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    // chunked or not, the JSON object is the part between the first '{' and the last '}'
    let json = &body[body.find('{').unwrap_or(0)..=body.rfind('}').unwrap_or(0)];
    serde_json::from_str(json).unwrap_or(serde_json::Value::Null)
}

fn result_count(v: &serde_json::Value) -> usize {
    v["data"]["result"].as_array().map_or(0, Vec::len)
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_proxy() {
    let pgp = proxy("", "").await;
    let rp = redis_proxy("", "").await;
    // traffic: a login, a failed login, a plaintext attempt, a denied Redis command
    connect(pgp.port(), "app", APP_PASSWORD, "").await.expect("login");
    let _ = connect(pgp.port(), "app", "wrong", "").await.expect_err("bad password");
    let mut r = RawRedis::proxy(rp.redis_port()).await;
    assert_eq!(r.call(&["AUTH", "app", REDIS_APP_PW]).await, b"+OK\r\n");
    assert!(r.call(&["FLUSHALL"]).await.starts_with(b"-NOPERM"));
    let mut plain = RawRedis::plain(rp.redis_port()).await;
    plain.send_raw(b"PING\r\n").await;
    let _ = plain.read(false).await;

    let dir = tempfile::tempdir().unwrap();
    let port = portcullis::demo::free_port().unwrap();
    let cfg = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: portcullis\n    static_configs:\n      - targets: ['{}', '{}']\n",
        pgp.running.admin_addr, rp.running.admin_addr
    );
    std::fs::write(dir.path().join("prometheus.yml"), cfg).unwrap();
    let mut prom = Command::new("prometheus")
        .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (Debian package prometheus) must be installed");
    let ask = |q: &str| {
        format!(
            "/api/v1/query?query={}",
            q.replace(' ', "%20")
                .replace('"', "%22")
                .replace('{', "%7B")
                .replace('}', "%7D")
                .replace('=', "%3D")
                .replace('!', "%21")
        )
    };
    let t = Instant::now();
    let mut up = 0;
    while t.elapsed() < Duration::from_secs(30) {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            up = result_count(&http_json(port, &ask("up{job=\"portcullis\"} == 1")).await);
            if up == 2 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let results = async {
        let mut found = Vec::new();
        for q in [
            "portcullis_connections_total",
            "portcullis_auth_attempts_total{result=\"failure\"} > 0",
            "portcullis_redis_denied_total{command=\"flushall\"} > 0",
            "portcullis_tls_cert_expiry_timestamp_seconds > time()",
            "portcullis_tls_handshakes_total{version=\"plaintext\"} > 0",
        ] {
            found.push((q, result_count(&http_json(port, &ask(q)).await)));
        }
        found
    }
    .await;
    let _ = prom.kill();
    let _ = prom.wait();
    assert_eq!(up, 2, "both proxies scraped and up");
    for (q, n) in results {
        assert!(n > 0, "no series for {q}");
    }
}
