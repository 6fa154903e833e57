//! Logins through the proxy in front of a real PostgreSQL 15: SCRAM (with and without channel
//! binding), refusals with their exact SQLSTATE and text, lockout, and the two layers of
//! bootstrap/superuser rejection.

mod support;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn scram_login_reaches_upstream_as_the_runtime_role() {
    let p = proxy("", "").await;
    let c = connect(p.port(), "app", APP_PASSWORD, "").await.expect("login through the proxy");
    let row = c.query_one("select current_user::text, session_user::text", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "app_runtime");
    assert_eq!(row.get::<_, String>(1), "app_runtime");
    // extended protocol with parameters
    let row = c.query_one("select $1::int + 1", &[&41i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    assert!(p.metrics().contains(r#"portcullis_auth_attempts_total{listener="main",method="scram-plus",protocol="postgres",result="success"} 1"#),
        "{}", p.metrics());
}

#[tokio::test]
async fn channel_binding_required_and_disabled_both_work() {
    let p = proxy("", "").await;
    let c = connect(p.port(), "app", APP_PASSWORD, "channel_binding=require").await.expect("SCRAM-SHA-256-PLUS");
    assert_eq!(c.query_one("select 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    let c = connect(p.port(), "app", APP_PASSWORD, "channel_binding=disable").await.expect("plain SCRAM-SHA-256");
    assert_eq!(c.query_one("select 2", &[]).await.unwrap().get::<_, i32>(0), 2);
    let m = p.metrics();
    assert!(m.contains(r#"method="scram-plus",protocol="postgres",result="success"} 1"#), "{m}");
    assert!(m.contains(r#"method="scram",protocol="postgres",result="success"} 1"#), "{m}");
}

#[tokio::test]
async fn wrong_password_and_unknown_user_read_like_postgres() {
    let p = proxy("", "").await;
    // The oracle: PostgreSQL's own answer to a wrong password.
    let direct = format!("host=127.0.0.1 port={} user=app_runtime password=nope dbname=app", pg().port)
        .parse::<tokio_postgres::Config>()
        .unwrap()
        .connect(tokio_postgres::NoTls)
        .await;
    let direct = refused(direct, "wrong password refused directly");
    let (code, msg) = db_error(&direct);
    assert_eq!((code.as_str(), msg.as_str()), ("28P01", "password authentication failed for user \"app_runtime\""));

    let e = connect(p.port(), "app", "wrong", "").await.expect_err("wrong password refused");
    assert_eq!(db_error(&e), ("28P01".into(), "password authentication failed for user \"app\"".into()));
    let e = connect(p.port(), "nosuchuser", "whatever", "").await.expect_err("unknown user refused");
    assert_eq!(db_error(&e), ("28P01".into(), "password authentication failed for user \"nosuchuser\"".into()));
    // and the good password still works
    connect(p.port(), "app", APP_PASSWORD, "").await.expect("good password");
}

#[tokio::test]
async fn lockout_after_repeated_failures_refuses_even_good_passwords() {
    let p = proxy("[lockout]\nmax_failures = 3\nwindow = \"1m\"\nban = \"1m\"\n", "").await;
    connect(p.port(), "app", APP_PASSWORD, "").await.expect("good password before lockout");
    for _ in 0..3 {
        let e = connect(p.port(), "app", "bad", "").await.err().unwrap();
        assert_eq!(db_error(&e).0, "28P01");
    }
    let e = connect(p.port(), "app", APP_PASSWORD, "").await.expect_err("locked out");
    assert_eq!(db_error(&e), ("28000".into(), "too many failed authentication attempts".into()));
    let m = p.metrics();
    assert!(m.contains("portcullis_lockouts_total 1"), "{m}");
    assert!(m.contains(r#"outcome="locked_out""#), "{m}");
}

#[tokio::test]
async fn bootstrap_user_is_refused_before_any_upstream_contact() {
    let p = proxy("", "").await;
    let before = pg().log_text();
    // `postgres` even has a valid verifier in the users file: the name alone is enough.
    for user in ["postgres", "POSTGRES"] {
        let e = connect(p.port(), user, APP_PASSWORD, "").await.expect_err("bootstrap user refused");
        assert_eq!(
            db_error(&e),
            (
                "42501".into(),
                format!("login as \"{user}\" is not allowed through this proxy: bootstrap or administrative user")
            )
        );
    }
    let after = pg().log_text();
    let new = &after[before.len()..];
    assert!(!new.lines().any(|l| l.contains("127.0.0.1") && l.contains("user=postgres")), "upstream saw: {new}");
    assert!(
        p.metrics().contains(r#"portcullis_pg_rejected_total{listener="main",reason="deny_users"} 2"#),
        "{}",
        p.metrics()
    );
    assert!(!p.metrics().contains("portcullis_upstream_connect_seconds_count{listener=\"main\"} 1"));
    // the positive control: a normal login is seen by the upstream
    connect(p.port(), "app", APP_PASSWORD, "").await.unwrap();
    let log = pg().log_text();
    assert!(log.contains("connection authorized: user=app_runtime"), "{log}");
}

#[tokio::test]
async fn role_options_and_replication_are_refused() {
    let p = proxy("", "").await;
    let e = connect(p.port(), "app", APP_PASSWORD, "options='-c role=postgres'").await.err().unwrap();
    assert_eq!(
        db_error(&e),
        ("42501".into(), "login as \"app\" is not allowed through this proxy: setting role or session_authorization at login is not allowed".into())
    );
    let e = connect(p.port(), "app", APP_PASSWORD, "options='-c session_authorization=postgres'").await.err().unwrap();
    assert_eq!(db_error(&e).0, "42501");
    // tokio-postgres cannot ask for replication: speak the protocol by hand.
    let (tag, body) = tls_startup(p.port(), &[("user", "app"), ("database", "app"), ("replication", "database")]).await;
    assert_eq!(tag, b'E');
    assert_eq!(
        raw::code_and_message(&body),
        (
            "42501".into(),
            "login as \"app\" is not allowed through this proxy: replication connections are not allowed".into()
        )
    );
    // harmless options pass through to the upstream
    let c = connect(p.port(), "app", APP_PASSWORD, "options='-c search_path=pg_catalog'").await.unwrap();
    let row = c.query_one("show search_path", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "pg_catalog");
}

#[tokio::test]
async fn superuser_runtime_session_is_ended_before_ready_for_query() {
    let p = proxy("", "").await;
    let before = pg().log_text().len();
    let e = connect(p.port(), "rogue", ROGUE_PASSWORD, "").await.expect_err("superuser session refused");
    assert_eq!(
        db_error(&e),
        (
            "42501".into(),
            "login as \"rogue\" is not allowed through this proxy: the upstream session has superuser privileges"
                .into()
        )
    );
    // It was refused *after* upstream authentication: the upstream did authorize it.
    let log = pg().log_text();
    assert!(log[before..].contains("connection authorized: user=rogue_admin"), "{}", &log[before..]);
    assert!(p.metrics().contains(r#"portcullis_pg_rejected_total{listener="main",reason="superuser"} 1"#));
}

#[tokio::test]
async fn deny_superuser_false_lets_a_maintenance_listener_through() {
    let p = proxy("", "deny_superuser = false").await;
    let c = connect(p.port(), "rogue", ROGUE_PASSWORD, "").await.expect("maintenance listener");
    let row = c.query_one("select current_setting('is_superuser')", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "on");
}

#[tokio::test]
async fn plaintext_startup_is_refused_with_the_design_text() {
    let p = proxy("", "").await;
    let e = format!("host=127.0.0.1 port={} user=app password=x dbname=app sslmode=disable", p.port())
        .parse::<tokio_postgres::Config>()
        .unwrap()
        .connect(tokio_postgres::NoTls)
        .await;
    let e = refused(e, "plaintext refused");
    assert_eq!(
        db_error(&e),
        ("28000".into(), "TLS is required by this server (use sslmode=require or stronger)".into())
    );
    // byte level: the refusal is one FATAL ErrorResponse, then close
    let mut s = TcpStream::connect(p.addr()).await.unwrap();
    s.write_all(&raw::startup(196_608, &[("user", "app")])).await.unwrap();
    let (tag, body) = raw::read_msg(&mut s).await.unwrap();
    assert_eq!(tag, b'E');
    assert!(raw::fields(&body).contains(&(b'S', "FATAL".into())));
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).await.unwrap(), 0, "connection closed after the error");
}

#[tokio::test]
async fn gssenc_request_gets_n_then_ssl_works() {
    let p = proxy("", "").await;
    let mut s = TcpStream::connect(p.addr()).await.unwrap();
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]).await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(b[0], b'N');
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await.unwrap();
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(b[0], b'S');
    // (Documented difference: a GSSAPI-enabled PostgreSQL may answer 'G'; the proxy never
    // offers GSS encryption, as libpq's gssencmode=prefer expects from a non-GSS server.)
}
