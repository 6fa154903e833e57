//! Listener modes and the connection lifecycle: cert and passthrough auth, direct TLS,
//! TLS version policy, protocol negotiation, limits, upstream failures, verified upstream TLS,
//! certificate reload, login deadline and drain.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn cert_mode_maps_the_client_certificate_to_the_user() {
    let p = proxy("", "auth = \"cert\"").await;
    let c = connect_tls(p.port(), "app", "", "", client_tls(true)).await.expect("cert login");
    let row = c.query_one("select current_user::text", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "app_runtime");
    // a certificate that maps to another user
    let e = connect_tls(p.port(), "rogue", "", "", client_tls(true)).await.err().unwrap();
    assert_eq!(db_error(&e), ("28000".into(), "certificate authentication failed for user \"rogue\"".into()));
    // no certificate at all
    let e = connect_tls(p.port(), "app", APP_PASSWORD, "", client_tls(false)).await.err().unwrap();
    assert_eq!(db_error(&e), ("28000".into(), "connection requires a valid client certificate".into()));
}

#[tokio::test]
async fn passthrough_lets_the_upstream_authenticate() {
    let p = proxy("", "auth = \"passthrough\"").await;
    let pw = &pg().runtime_password;
    let c = connect(p.port(), "app_runtime", pw, "").await.expect("upstream authenticates");
    let row = c.query_one("select current_user::text", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "app_runtime");
    let e = connect(p.port(), "app_runtime", "wrong", "").await.err().unwrap();
    assert_eq!(db_error(&e), ("28P01".into(), "password authentication failed for user \"app_runtime\"".into()));
    // the superuser check still applies after the upstream's own authentication
    let e = connect(p.port(), "rogue_admin", &pg().rogue_password, "").await.err().unwrap();
    assert_eq!(db_error(&e).0, "42501");
    // and deny_users before it
    let e = connect(p.port(), "postgres", &pg().postgres_password, "").await.err().unwrap();
    assert_eq!(db_error(&e).0, "42501");
    // -PLUS is stripped (the client would bind to the proxy's certificate, the upstream to its
    // own): a client that requires channel binding gives up on its side.
    let e = connect(p.port(), "app_runtime", pw, "channel_binding=require").await.err().unwrap();
    assert!(e.as_db_error().is_none(), "{e}");
}

#[tokio::test]
async fn tls12_client_is_refused_under_min_13_and_accepted_under_min_12() {
    let p = proxy("", "").await;
    let tls12 = client_tls_versions(false, &[&rustls::version::TLS12], certs());
    let e = connect_tls(p.port(), "app", APP_PASSWORD, "", tls12.clone()).await.expect_err("TLS 1.2 refused");
    assert!(e.as_db_error().is_none(), "refused in the handshake: {e}");
    assert!(
        p.metrics().contains(r#"portcullis_tls_handshakes_total{listener="main",result="failure",version="none"} 1"#),
        "{}",
        p.metrics()
    );
    let c = certs().display().to_string();
    let p12 =
        proxy(&format!("[tls]\ncert = \"{c}/server.crt\"\nkey = \"{c}/server.key\"\nmin_version = \"1.2\"\n"), "")
            .await;
    connect_tls(p12.port(), "app", APP_PASSWORD, "", tls12).await.expect("TLS 1.2 allowed when configured");
    assert!(p12.metrics().contains(r#"version="TLSv1.2""#));
}

#[tokio::test]
async fn direct_tls_requires_alpn_postgresql() {
    let p = proxy("", "").await;
    // With ALPN: the startup goes through (bootstrap user → 42501 proves the full path ran).
    let mut cfg = client_tls(false);
    cfg.alpn_protocols = vec![b"postgresql".to_vec()];
    let mut s = tls_connect(TcpStream::connect(p.addr()).await.unwrap(), cfg).await;
    s.write_all(&raw::startup(196_608, &[("user", "postgres")])).await.unwrap();
    let (tag, body) = raw::read_msg(&mut s).await.unwrap();
    assert_eq!(tag, b'E');
    assert_eq!(raw::code_and_message(&body).0, "42501");
    // Without ALPN: refused, as PostgreSQL 17 does.
    let mut s = tls_connect(TcpStream::connect(p.addr()).await.unwrap(), client_tls(false)).await;
    let (tag, body) = raw::read_msg(&mut s).await.unwrap();
    assert_eq!(tag, b'E');
    assert_eq!(
        raw::code_and_message(&body),
        ("08P01".into(), "received direct SSL connection request without ALPN protocol negotiation extension".into())
    );
}

#[tokio::test]
async fn protocol_3_2_request_gets_the_same_negotiation_as_postgres_15() {
    let p = proxy("", "").await;
    let params = [("user", "app_runtime"), ("database", "app"), ("_pq_.test_option", "1")];
    // Directly (plaintext is allowed by the test server): the oracle.
    let mut d = TcpStream::connect(("127.0.0.1", pg().port)).await.unwrap();
    d.write_all(&raw::startup(196_610, &params)).await.unwrap();
    let direct = raw::read_msg(&mut d).await.unwrap();
    assert_eq!(direct.0, b'v');
    // Through the proxy (TLS).
    let through = tls_startup(p.port(), &params).await;
    assert_eq!(through, direct, "NegotiateProtocolVersion identical byte for byte");
}

#[tokio::test]
async fn connection_limit_answers_53300() {
    let p = proxy("[limits]\nmax_connections_per_source = 2\n", "").await;
    let a = connect(p.port(), "app", APP_PASSWORD, "").await.unwrap();
    let _b = connect(p.port(), "app", APP_PASSWORD, "").await.unwrap();
    let e = connect(p.port(), "app", APP_PASSWORD, "").await.expect_err("third refused");
    assert_eq!(db_error(&e), ("53300".into(), "sorry, too many clients already".into()));
    drop(a);
    // the slot frees when a session ends
    let mut ok = false;
    for _ in 0..50 {
        if connect(p.port(), "app", APP_PASSWORD, "").await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "a slot was released");
}

#[tokio::test]
async fn upstream_down_names_the_listener_and_readyz_turns_503() {
    let dead = portcullis::demo::free_port().unwrap();
    let p = proxy_with_upstream("", "", &format!("127.0.0.1:{dead}")).await;
    let e = connect(p.port(), "app", APP_PASSWORD, "").await.expect_err("upstream down");
    let (code, msg) = db_error(&e);
    assert_eq!((code.as_str(), msg.as_str()), ("08006", "upstream of listener \"main\" is unavailable"));
    assert!(!msg.contains(&dead.to_string()));
    let status = http_status(p.running.admin_addr, "/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(http_status(p.running.admin_addr, "/healthz").await, 200);
    // a healthy proxy is ready
    let good = proxy("", "").await;
    assert_eq!(http_status(good.running.admin_addr, "/readyz").await, 200);
}

#[tokio::test]
async fn verified_upstream_tls() {
    let c = certs().display().to_string();
    let p = proxy("", &format!("upstream_tls = {{ ca = \"{c}/ca.crt\", server_name = \"localhost\" }}")).await;
    let client = connect(p.port(), "app", APP_PASSWORD, "").await.expect("login over upstream TLS");
    let ssl: bool =
        client.query_one("select ssl from pg_stat_ssl where pid = pg_backend_pid()", &[]).await.unwrap().get(0);
    assert!(ssl, "the upstream session is encrypted");
    // a name the upstream certificate does not carry fails verification
    let bad = proxy("", &format!("upstream_tls = {{ ca = \"{c}/ca.crt\", server_name = \"db.example\" }}")).await;
    let e = connect(bad.port(), "app", APP_PASSWORD, "").await.err().unwrap();
    assert_eq!(db_error(&e).0, "08006");
}

#[tokio::test]
async fn certificate_reload_keeps_open_sessions_and_serves_the_new_cert() {
    // The proxy serves a copy of the PKI that the test then replaces with a new one.
    let old = certs();
    let dir = tempfile::tempdir().unwrap();
    for f in ["server.crt", "server.key", "ca.crt"] {
        std::fs::copy(old.join(f), dir.path().join(f)).unwrap();
    }
    let d = dir.path().display().to_string();
    let p = proxy(&format!("[tls]\ncert = \"{d}/server.crt\"\nkey = \"{d}/server.key\"\n"), "").await;
    let open = connect(p.port(), "app", APP_PASSWORD, "").await.unwrap();
    let new_pki = tempfile::tempdir().unwrap();
    portcullis::certs::write_dev_pki(new_pki.path(), "app").unwrap();
    std::fs::copy(new_pki.path().join("server.key"), dir.path().join("server.key")).unwrap();
    std::fs::copy(new_pki.path().join("server.crt"), dir.path().join("server.crt")).unwrap();
    p.running.reload().expect("reload");
    // the open session still works
    assert_eq!(open.query_one("select 7", &[]).await.unwrap().get::<_, i32>(0), 7);
    // new handshakes get the new certificate: the old CA no longer verifies it, the new one does
    assert!(connect(p.port(), "app", APP_PASSWORD, "").await.is_err());
    let tls = client_tls_versions(false, &[&rustls::version::TLS13], new_pki.path());
    let c = connect_tls(p.port(), "app", APP_PASSWORD, "channel_binding=require", tls).await.expect("new cert served");
    assert_eq!(c.query_one("select 8", &[]).await.unwrap().get::<_, i32>(0), 8);
    assert!(p.metrics().contains(r#"portcullis_config_reloads_total{result="success"}"#));
    // a broken certificate is refused and the current one keeps serving
    std::fs::write(dir.path().join("server.crt"), "not a certificate").unwrap();
    assert!(p.running.reload().is_ok(), "config itself is fine");
    let tls = client_tls_versions(false, &[&rustls::version::TLS13], new_pki.path());
    connect_tls(p.port(), "app", APP_PASSWORD, "", tls).await.expect("still serving the last good cert");
    assert!(p.metrics().contains(r#"portcullis_config_reloads_total{result="error"} 1"#), "{}", p.metrics());
}

#[tokio::test]
async fn login_deadline_closes_silent_clients() {
    let p = proxy("[limits]\nhandshake_timeout = \"500ms\"\n", "").await;
    let mut s = TcpStream::connect(p.addr()).await.unwrap();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await.expect("closed by the deadline");
    assert_eq!(r.unwrap(), 0);
    assert!(p.metrics().contains(r#"outcome="timeout""#));
}

#[tokio::test]
async fn drain_stops_accepting_and_lets_sessions_finish() {
    let p = proxy("[limits]\ndrain_timeout = \"10s\"\n", "").await;
    let c = connect(p.port(), "app", APP_PASSWORD, "").await.unwrap();
    let shared = p.running.shared().clone();
    let admin = p.running.admin_addr;
    let port = p.port();
    let Proxy { running, dir: _dir, .. } = p;
    let drain = tokio::spawn(running.drain());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(http_status(admin, "/readyz").await, 503);
    assert!(shared.draining.load(std::sync::atomic::Ordering::Relaxed));
    // the open session keeps working while draining
    assert_eq!(c.query_one("select 9", &[]).await.unwrap().get::<_, i32>(0), 9);
    // no new sessions
    assert!(connect(port, "app", APP_PASSWORD, "").await.is_err());
    drop(c);
    tokio::time::timeout(Duration::from_secs(5), drain).await.expect("drain ends once sessions close").unwrap();
}

async fn http_status(addr: std::net::SocketAddr, path: &str) -> u16 {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn sources_outside_the_allow_list_are_dropped_before_tls() {
    let p = proxy("", "allow = [\"10.0.0.0/8\"]").await;
    let e = connect(p.port(), "app", APP_PASSWORD, "").await.expect_err("refused");
    assert!(e.as_db_error().is_none(), "dropped without a protocol answer: {e}");
    assert!(p.metrics().contains(r#"outcome="not_allowed""#), "{}", p.metrics());
    let ok = proxy("", "allow = [\"127.0.0.1/32\"]").await;
    connect(ok.port(), "app", APP_PASSWORD, "").await.expect("allowed source");
}

#[tokio::test]
async fn plaintext_cancel_request_as_libpq_15_sends_it() {
    let p = proxy("", "").await;
    // sslmode=prefer so that the cancel may go in the clear (tokio-postgres keeps the sslmode).
    let c = connect(p.port(), "app", APP_PASSWORD, "sslmode=prefer").await.unwrap();
    let token = c.cancel_token();
    let q = tokio::spawn(async move { c.simple_query("select pg_sleep(30)").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // NoTls: the CancelRequest goes in the clear, as libpq before 17 sends it.
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let res = tokio::time::timeout(Duration::from_secs(2), q).await.expect("cancelled within 2 s").unwrap();
    assert_eq!(db_error(&res.expect_err("cancelled")).0, "57014");
}

#[tokio::test]
async fn kubernetes_style_symlink_swap_is_picked_up_without_a_signal() {
    // secret volume layout: tls.crt -> ..data/tls.crt, ..data -> ..2026_01
    let vol = tempfile::tempdir().unwrap();
    let v = vol.path();
    let gen1 = v.join("..gen1");
    std::fs::create_dir(&gen1).unwrap();
    std::fs::copy(certs().join("server.crt"), gen1.join("tls.crt")).unwrap();
    std::fs::copy(certs().join("server.key"), gen1.join("tls.key")).unwrap();
    std::os::unix::fs::symlink("..gen1", v.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/tls.crt", v.join("tls.crt")).unwrap();
    std::os::unix::fs::symlink("..data/tls.key", v.join("tls.key")).unwrap();
    let d = v.display();
    let p = proxy(&format!("[tls]\ncert = \"{d}/tls.crt\"\nkey = \"{d}/tls.key\"\n"), "").await;
    let open = connect(p.port(), "app", APP_PASSWORD, "").await.unwrap();
    // the kubelet writes a new generation and swaps ..data atomically
    let new_pki = tempfile::tempdir().unwrap();
    portcullis::certs::write_dev_pki(new_pki.path(), "app").unwrap();
    let gen2 = v.join("..gen2");
    std::fs::create_dir(&gen2).unwrap();
    std::fs::copy(new_pki.path().join("server.crt"), gen2.join("tls.crt")).unwrap();
    std::fs::copy(new_pki.path().join("server.key"), gen2.join("tls.key")).unwrap();
    std::os::unix::fs::symlink("..gen2", v.join("..data_tmp")).unwrap();
    std::fs::rename(v.join("..data_tmp"), v.join("..data")).unwrap();
    let tls = client_tls_versions(false, &[&rustls::version::TLS13], new_pki.path());
    let mut served_new = false;
    for _ in 0..60 {
        if connect_tls(p.port(), "app", APP_PASSWORD, "", tls.clone()).await.is_ok() {
            served_new = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served_new, "new certificate served within 6 s without SIGHUP");
    assert_eq!(open.query_one("select 1", &[]).await.unwrap().get::<_, i32>(0), 1, "open session kept");
}

#[tokio::test]
async fn users_file_change_rotates_a_client_password() {
    // Polling with the new password fails until the reload: keep those failures from locking us out.
    let p = proxy("[lockout]\nmax_failures = 1000\n", "").await;
    connect(p.port(), "app", APP_PASSWORD, "").await.expect("old password");
    let users_path = p.dir.path().join("users.toml");
    let users = std::fs::read_to_string(&users_path).unwrap();
    let old_verifier = users.lines().find(|l| l.starts_with("postgres_scram")).unwrap().to_string();
    let new_verifier = format!("postgres_scram = \"{}\"", postgres_protocol::password::scram_sha_256(b"rotated-pw-77"));
    std::fs::write(&users_path, users.replacen(&old_verifier, &new_verifier, 1)).unwrap();
    let mut rotated = false;
    for _ in 0..60 {
        if connect(p.port(), "app", "rotated-pw-77", "").await.is_ok() {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(rotated, "new password accepted after the file changed: {}", p.metrics());
    let e = connect(p.port(), "app", APP_PASSWORD, "").await.expect_err("old password refused");
    assert_eq!(db_error(&e).0, "28P01");
    // a broken users file is refused; the last good one keeps working
    std::fs::write(&users_path, "[[users]]\nname = 1\n").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    connect(p.port(), "app", "rotated-pw-77", "").await.expect("last good users file still in force");
    assert!(p.metrics().contains(r#"portcullis_config_reloads_total{result="error"} 1"#), "{}", p.metrics());
}

#[tokio::test]
async fn passthrough_over_upstream_tls_explains_channel_binding() {
    let c = certs().display().to_string();
    let p = proxy(
        "",
        &format!("auth = \"passthrough\"\nupstream_tls = {{ ca = \"{c}/ca.crt\", server_name = \"localhost\" }}"),
    )
    .await;
    let pw = &pg().runtime_password;
    // A TLS client not offered -PLUS answers 'y'; PostgreSQL on TLS would call that a downgrade.
    let e = connect(p.port(), "app_runtime", pw, "").await.expect_err("refused with a reason");
    assert_eq!(
        db_error(&e),
        ("08P01".into(), "channel binding cannot pass through this proxy: connect with channel_binding=disable".into())
    );
    let c = connect(p.port(), "app_runtime", pw, "channel_binding=disable").await.expect("works without binding");
    let ssl: bool = c.query_one("select ssl from pg_stat_ssl where pid = pg_backend_pid()", &[]).await.unwrap().get(0);
    assert!(ssl);
}

#[tokio::test]
async fn session_ends_when_the_upstream_backend_is_terminated() {
    let p = proxy("", "").await;
    let c = connect(p.port(), "app", APP_PASSWORD, "").await.unwrap();
    let pid: i32 = c.query_one("select pg_backend_pid()", &[]).await.unwrap().get(0);
    let active = r#"portcullis_connections_active{listener="main",protocol="postgres"}"#;
    assert!(p.metrics().contains(&format!("{active} 1")));
    pg().psql_admin(&format!("select pg_terminate_backend({pid})")).unwrap();
    // The client stays idle (sends nothing): the proxy must still end the session.
    let mut ended = false;
    for _ in 0..40 {
        if p.metrics().contains(&format!("{active} 0")) {
            ended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ended, "session ended by the upstream's close: {}", p.metrics());
    let e = c.simple_query("select 1").await.expect_err("connection is gone");
    assert!(e.is_closed() || e.as_db_error().is_some_and(|d| d.code().code() == "57P01"), "{e}");
}

#[tokio::test]
async fn drain_deadline_ends_idle_sessions_with_57p01() {
    let p = proxy("[limits]\ndrain_timeout = \"300ms\"\n", "").await;
    let conn_str =
        format!("host=localhost port={} user=app password={APP_PASSWORD} dbname=app sslmode=require", p.port());
    let (client, conn) = conn_str
        .parse::<tokio_postgres::Config>()
        .unwrap()
        .connect(tokio_postgres_rustls::MakeRustlsConnect::new(client_tls(false)))
        .await
        .unwrap();
    let conn_result = tokio::spawn(conn);
    assert_eq!(client.query_one("select 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    let Proxy { running, dir: _dir, .. } = p;
    tokio::time::timeout(Duration::from_secs(5), running.drain()).await.expect("drain finishes");
    let res = tokio::time::timeout(Duration::from_secs(2), conn_result).await.unwrap().unwrap();
    let e = res.expect_err("the connection was ended");
    assert_eq!(db_error(&e), ("57P01".into(), "terminating connection due to administrator command".into()));
}

/// A reload applies a changed allow-list to new connections (open sessions stay): the proxy's
/// own address taken off the list is refused at accept, put back it is served again.
#[tokio::test]
async fn allow_list_changes_apply_on_reload() {
    let p = proxy("", "").await;
    let open = connect(p.port(), "app", APP_PASSWORD, "").await.unwrap();
    let text = std::fs::read_to_string(&p.config_path).unwrap();
    assert!(text.contains("allow = [\"127.0.0.0/8\"]"));
    std::fs::write(&p.config_path, text.replace("allow = [\"127.0.0.0/8\"]", "allow = [\"10.0.0.0/8\"]")).unwrap();
    p.running.reload().expect("reload");
    let e = connect(p.port(), "app", APP_PASSWORD, "").await.expect_err("127.0.0.1 is no longer allowed");
    assert!(e.as_db_error().is_none(), "closed at accept, before a word: {e}");
    assert!(p.metrics().contains(r#"outcome="not_allowed""#), "{}", p.metrics());
    assert_eq!(open.query_one("select 1", &[]).await.unwrap().get::<_, i32>(0), 1, "open sessions stay");
    std::fs::write(&p.config_path, &text).unwrap();
    p.running.reload().expect("reload");
    let c = connect(p.port(), "app", APP_PASSWORD, "").await.expect("allowed again");
    assert_eq!(c.query_one("select 2", &[]).await.unwrap().get::<_, i32>(0), 2);
}
