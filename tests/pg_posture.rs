//! `portcullis audit-postgres` against a real database set up right and wrong: the runtime
//! role's privileges, RLS on protected tables, PUBLIC's grants, and the deny-list probe.

mod support;

use std::process::Command;

use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

fn setup() {
    static DONE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        pg().psql_admin_db(
            "app",
            "create table if not exists public.profiles(id int);
         alter table public.profiles enable row level security;
         alter table public.profiles force row level security;
         revoke all on public.profiles from public;
         create table if not exists public.leaky(id int);
         grant select on public.leaky to public;",
        )
        .unwrap();
    });
}

fn audit(p: &Proxy) -> (i32, serde_json::Value, String) {
    let out = Command::new(BIN)
        .args(["audit-postgres", "--database", "app", "--json", "--config"])
        .arg(&p.config_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), v, format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
}

fn result(v: &serde_json::Value, check: &str) -> Option<bool> {
    v.as_array()?.iter().find(|c| c["check"] == check).and_then(|c| c["ok"].as_bool())
}

#[tokio::test]
async fn a_database_set_up_right_passes() {
    setup();
    let p = proxy("", "protected_tables = [\"public.profiles\"]").await;
    let (code, v, text) = tokio::task::spawn_blocking(move || {
        let r = audit(&p);
        drop(p);
        r
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{text}");
    for c in [
        "runtime_login",
        "runtime_not_superuser",
        "runtime_not_bypassrls",
        "runtime_not_createrole",
        "runtime_not_createdb",
        "runtime_not_replication",
        "runtime_not_member_of_superuser",
        "public_no_create_on_schema_public",
        "rls_enabled:public.profiles",
        "rls_forced:public.profiles",
        "public_no_grants:public.profiles",
        "deny_user_refused:postgres",
    ] {
        assert_eq!(result(&v, c), Some(true), "{c}: {text}");
    }
}

#[tokio::test]
async fn a_database_set_up_wrong_fails_with_the_reasons() {
    setup();
    let p = proxy(
        "",
        "upstream_user = \"rogue_admin\"\nupstream_password_file = \"{DIR}/rogue.pass\"\nprotected_tables = [\"public.leaky\", \"public.missing\"]",
    )
    .await;
    let (code, v, text) = tokio::task::spawn_blocking(move || {
        let r = audit(&p);
        drop(p);
        r
    })
    .await
    .unwrap();
    assert_eq!(code, 1, "{text}");
    for c in [
        "runtime_not_superuser",
        "rls_enabled:public.leaky",
        "rls_forced:public.leaky",
        "public_no_grants:public.leaky",
        "rls_enabled:public.missing",
    ] {
        assert_eq!(result(&v, c), Some(false), "{c}: {text}");
    }
    assert_eq!(result(&v, "deny_user_refused:postgres"), Some(true), "{text}");
}

#[tokio::test]
async fn the_proxy_exports_posture_gauges() {
    setup();
    let p = proxy(
        "",
        "protected_tables = [\"public.profiles\", \"public.leaky\"]\nposture_database = \"app\"\nposture_interval = \"1s\"",
    )
    .await;
    let want = [
        r#"portcullis_pg_posture_ok{check="rls_forced:public.profiles",listener="main"} 1"#,
        r#"portcullis_pg_posture_ok{check="rls_enabled:public.leaky",listener="main"} 0"#,
        r#"portcullis_pg_posture_ok{check="runtime_not_superuser",listener="main"} 1"#,
        r#"portcullis_pg_posture_ok{check="deny_user_refused:postgres",listener="main"} 1"#,
    ];
    let mut m = String::new();
    for _ in 0..100 {
        m = p.metrics();
        if want.iter().all(|w| m.contains(w)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for w in want {
        assert!(m.contains(w), "{w} in {m}");
    }
}
