//! `pool = "session"` against real PostgreSQL 15: a client that leaves cleanly leaves its
//! upstream session, reset with DISCARD ALL, to the next client with the same upstream user,
//! database and startup parameters; nothing of the first client's session state survives;
//! sessions are never shared; dirty, dead and stale sessions are not reused.

mod support;

use std::time::Duration;

use support::*;

async fn backend_pid(c: &tokio_postgres::Client) -> i32 {
    c.query_one("select pg_backend_pid()", &[]).await.unwrap().get(0)
}

/// Waits until the previous client's session has been reset and parked.
async fn parked(p: &Proxy, n: usize) {
    for _ in 0..50 {
        if p.running.pg_listeners()[0].pool.idle() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no session parked: {}", p.metrics());
}

fn counter(m: &str, result: &str) -> u64 {
    let needle = format!("portcullis_pg_pool_checkouts_total{{listener=\"main\",result=\"{result}\"}} ");
    m.lines().find_map(|l| l.strip_prefix(&needle)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn a_clean_session_is_reset_and_reused() {
    let p = proxy("", "pool = \"session\"").await;
    let a = connect(p.port(), "app", APP_PASSWORD, "").await.unwrap();
    let pid = backend_pid(&a).await;
    // Leave every kind of session state behind, and a transaction open.
    a.batch_execute(
        "set work_mem = '1234kB';
         create temp table scratch(x int);
         prepare leftover as select 1;
         listen some_channel;
         select pg_advisory_lock(4242);
         set role none;
         begin;
         insert into scratch values (1);",
    )
    .await
    .unwrap();
    drop(a);
    parked(&p, 1).await;

    let b = connect(p.port(), "app", APP_PASSWORD, "").await.unwrap();
    assert_eq!(backend_pid(&b).await, pid, "the parked upstream session was handed over");
    let row = b
        .query_one(
            "select current_setting('work_mem'),
                    (select count(*) from pg_prepared_statements where name = 'leftover'),
                    (select count(*) from pg_listening_channels()),
                    (select count(*) from pg_locks where locktype = 'advisory'),
                    to_regclass('pg_temp.scratch') is null,
                    current_user::text, txid_current_if_assigned() is null",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "4MB", "SET reset");
    assert_eq!(row.get::<_, i64>(1), 0, "prepared statements deallocated");
    assert_eq!(row.get::<_, i64>(2), 0, "LISTEN undone");
    assert_eq!(row.get::<_, i64>(3), 0, "advisory locks released");
    assert!(row.get::<_, bool>(4), "temp table dropped");
    assert_eq!(row.get::<_, String>(5), "app_runtime");
    assert!(row.get::<_, bool>(6), "not inside the previous client's transaction");
    let m = p.metrics();
    assert_eq!((counter(&m, "miss"), counter(&m, "hit")), (1, 1), "{m}");

    // While b holds it, another client gets its own upstream session.
    let c = connect(p.port(), "app", APP_PASSWORD, "").await.unwrap();
    assert_ne!(backend_pid(&c).await, pid, "never shared while a client holds it");

    // Cancel reaches the reused session through the new proxy key.
    let token = b.cancel_token();
    let q = tokio::spawn(async move { b.query("select pg_sleep(20)", &[]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel_query(tokio_postgres_rustls::MakeRustlsConnect::new(client_tls(false))).await.unwrap();
    let res = tokio::time::timeout(Duration::from_secs(3), q).await.expect("cancelled").unwrap();
    assert_eq!(db_error(&res.expect_err("cancelled")).0, "57014");
}

#[tokio::test]
async fn different_parameters_and_dirty_sessions_get_their_own() {
    let p = proxy("", "pool = \"session\"").await;
    let a = connect(p.port(), "app", APP_PASSWORD, "application_name=one").await.unwrap();
    let pid_one = backend_pid(&a).await;
    drop(a);
    parked(&p, 1).await;
    let b = connect(p.port(), "app", APP_PASSWORD, "application_name=two").await.unwrap();
    assert_ne!(backend_pid(&b).await, pid_one, "other startup parameters, other session");
    let name: String = b.query_one("show application_name", &[]).await.unwrap().get(0);
    assert_eq!(name, "two");

    // A client that vanishes with a query running leaves nothing reusable.
    let pid_b = backend_pid(&b).await;
    let q = tokio::spawn(async move { b.query("select pg_sleep(2)", &[]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    q.abort();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = connect(p.port(), "app", APP_PASSWORD, "application_name=two").await.unwrap();
    assert_ne!(backend_pid(&c).await, pid_b, "a session with a request in flight is not parked");

    // A parked session whose backend died is skipped, not handed out.
    let one = connect(p.port(), "app", APP_PASSWORD, "application_name=one").await.unwrap();
    assert_eq!(backend_pid(&one).await, pid_one, "the application_name=one session was parked");
    drop(one);
    parked(&p, 1).await;
    pg().psql_admin(&format!("select pg_terminate_backend({pid_one})")).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fresh = connect(p.port(), "app", APP_PASSWORD, "application_name=one").await.expect("a fresh login");
    assert_ne!(backend_pid(&fresh).await, pid_one);
    assert_eq!(fresh.query_one("select 1", &[]).await.unwrap().get::<_, i32>(0), 1);
}

#[tokio::test]
async fn parked_sessions_expire_and_the_pool_is_bounded() {
    let p = proxy("", "pool = \"session\"\npool_size = 2\npool_idle_timeout = \"1s\"").await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(connect(p.port(), "app", APP_PASSWORD, "").await.unwrap());
    }
    let mut pids = Vec::new();
    for c in &clients {
        pids.push(backend_pid(c).await);
    }
    drop(clients);
    parked(&p, 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(p.running.pg_listeners()[0].pool.idle(), 2, "at most pool_size parked");
    let count = |pids: &[i32]| {
        let list = pids.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",");
        pg().psql_admin(&format!("select count(*) from pg_stat_activity where pid in ({list})")).unwrap()
    };
    assert_eq!(count(&pids).trim(), "2", "the third upstream session was closed");
    tokio::time::sleep(Duration::from_millis(4500)).await;
    assert_eq!(p.running.pg_listeners()[0].pool.idle(), 0, "expired after pool_idle_timeout");
    assert_eq!(count(&pids).trim(), "0", "and closed at PostgreSQL");
    assert!(p.metrics().contains("portcullis_pg_pool_idle{listener=\"main\"} 0"), "{}", p.metrics());
}

#[test]
fn pool_needs_a_proxy_side_identity() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("p.toml");
    std::fs::write(
        &f,
        "[tls]\ncert = \"c\"\nkey = \"k\"\n[[postgres]]\nname = \"m\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:5432\"\nauth = \"passthrough\"\npool = \"session\"\n",
    )
    .unwrap();
    let e = portcullis::config::load(&f).unwrap_err().to_string();
    assert!(e.contains("pool = \"session\" needs auth scram or cert"), "{e}");
    std::fs::write(
        &f,
        "[tls]\ncert = \"c\"\nkey = \"k\"\n[[postgres]]\nname = \"m\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:5432\"\nusers_file = \"u\"\npool = \"transaction\"\n",
    )
    .unwrap();
    let e = portcullis::config::load(&f).unwrap_err().to_string();
    assert!(e.contains("expected none or session"), "{e}");
}

#[tokio::test]
async fn a_role_altered_while_in_use_is_not_parked() {
    pg().psql_admin("create role pool_rt login password 'pool-rt-pw-5e4d' in role app_runtime").unwrap();
    let p = proxy("", "pool = \"session\"\nupstream_user = \"pool_rt\"\nupstream_password_file = \"{DIR}/pool.pass\"")
        .await;
    std::fs::write(p.dir.path().join("pool.pass"), "pool-rt-pw-5e4d").unwrap();
    let a = connect(p.port(), "app", APP_PASSWORD, "").await.unwrap();
    let pid = backend_pid(&a).await;
    // promoted while a client holds the session: the login-time is_superuser=off is stale
    pg().psql_admin("alter role pool_rt superuser").unwrap();
    drop(a);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(p.running.pg_listeners()[0].pool.idle(), 0, "the reset's role check refused to park it");
    let gone = pg().psql_admin(&format!("select count(*) from pg_stat_activity where pid = {pid}")).unwrap();
    assert_eq!(gone.trim(), "0", "and closed it");
    let e = connect(p.port(), "app", APP_PASSWORD, "").await.expect_err("a fresh login is a superuser session");
    assert_eq!(db_error(&e).0, "42501");
    pg().psql_admin("alter role pool_rt nosuperuser").unwrap();
    let c = connect(p.port(), "app", APP_PASSWORD, "").await.expect("fine again");
    let user: String = c.query_one("select current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(user, "pool_rt");
}

/// Clients choose their startup parameters, so they choose how many pool keys there are: the
/// listener keeps at most `pool_max_parked` sessions across all keys, closing the one parked
/// longest to make room, and a client of the newest key still gets its parked session.
#[tokio::test]
async fn parked_sessions_are_bounded_across_keys() {
    let p = proxy("", "pool = \"session\"\npool_size = 2\npool_max_parked = 3").await;
    let mut pids = Vec::new();
    for i in 0..5 {
        let c = connect(p.port(), "app", APP_PASSWORD, &format!("application_name=key{i}")).await.unwrap();
        pids.push(backend_pid(&c).await);
        drop(c);
        parked(&p, (i + 1).min(3)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(p.running.pg_listeners()[0].pool.idle(), 3, "at most pool_max_parked in all");
    let alive = |pid: i32| {
        pg().psql_admin(&format!("select count(*) from pg_stat_activity where pid = {pid}")).unwrap().trim() == "1"
    };
    assert!(!alive(pids[0]) && !alive(pids[1]), "the two parked longest were closed at PostgreSQL");
    assert!(pids[2..].iter().all(|p| alive(*p)), "the newest three are parked");
    let c = connect(p.port(), "app", APP_PASSWORD, "application_name=key4").await.unwrap();
    assert_eq!(backend_pid(&c).await, pids[4], "and handed out");
}
