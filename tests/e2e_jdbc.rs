//! pgjdbc (a JDBC-style driver, from Debian's libpostgresql-jdbc-java) through the proxy.

mod support;

use std::process::Command;

use support::*;

const JDBC_JAR: &str = "/usr/share/java/postgresql.jar";

#[tokio::test]
async fn jdbc_driver_works_through_the_proxy() {
    assert!(
        std::path::Path::new(JDBC_JAR).exists(),
        "{JDBC_JAR} missing: apt-get install libpostgresql-jdbc-java (scripts/deps does)"
    );
    let p = proxy("", "").await;
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/jdbc/JdbcSmoke.java");
    let ca = certs().join("ca.crt");
    let port = p.port().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("java")
            .args(["-cp", JDBC_JAR, src, &port])
            .arg(ca)
            .arg(APP_PASSWORD)
            .output()
            .expect("java runs (default-jre-headless)")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    for line in ["user=app_runtime", "prepared_sum=90", "batch=1000", "count=1000"] {
        assert!(text.lines().any(|l| l == line), "{line} in {text}");
    }
    assert!(text.contains("refused postgres 42501"), "{text}");
    assert!(text.contains("refused app 28P01"), "{text}");
}
