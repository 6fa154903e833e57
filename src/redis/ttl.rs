//! The TTL policy (seed 000, P1.4: session/chat keys always expire): for a command touching
//! keys that match a listener's `ttl` rule, decide how it must change. Pure: no I/O.
//!
//! - `SET` without an expiry gets `EX <default>`; `KEEPTTL` becomes `EX <default>`; expiries
//!   beyond `max` are clamped (`SET`, `SETEX`, `PSETEX`, `EXPIRE*`, `PEXPIRE*`, `GETEX`,
//!   `RESTORE`); `GETEX … PERSIST` becomes `EX <default>`.
//! - `PERSIST` on a matching key is denied.
//! - Any other write command on a matching key is followed by `EXPIRE <key> <default> NX`
//!   (the key specs of the upstream's COMMAND tell which keys a command writes).
//! - Scripts declaring a matching key are denied unless the rule says `allow_scripts`.

use super::command::{CommandInfo, cstr_lower};
use crate::config::TtlRule;
use crate::policy::glob;

/// What was done, for `redis_ttl_rewrites_total{rule, action}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TtlAction {
    /// An expiry was added.
    Appended,
    /// An expiry was shortened to `max`.
    Clamped,
    /// `EXPIRE <key> <default> NX` follows the command.
    Injected,
    /// The command was refused.
    Denied,
}

impl TtlAction {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            TtlAction::Appended => "appended",
            TtlAction::Clamped => "clamped",
            TtlAction::Injected => "injected",
            TtlAction::Denied => "denied",
        }
    }
}

/// The decision for one command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TtlPlan {
    /// Arguments to send instead of the original ones.
    pub rewrite: Option<Vec<Vec<u8>>>,
    /// `(key, seconds)` for `EXPIRE key seconds NX` right after the command.
    pub inject: Vec<(Vec<u8>, u64)>,
    /// `(key, seconds)` for `EXPIRE key seconds LT` after those: RENAME/RENAMENX/COPY carry the
    /// source's TTL, which may be longer than the destination rule's `max`.
    pub clamp_after: Vec<(Vec<u8>, u64)>,
    /// Refusal text (a full `-NOPERM …` line without CRLF).
    pub deny: Option<String>,
    /// (rule pattern, action) for metrics.
    pub actions: Vec<(String, TtlAction)>,
}

fn rule_for<'a>(rules: &'a [TtlRule], key: &[u8]) -> Option<&'a TtlRule> {
    rules.iter().find(|r| glob::matches(r.pattern.as_bytes(), key))
}

fn int(b: &[u8]) -> Option<i64> {
    super::codec::strict_int(b)
}

fn s(n: i64) -> Vec<u8> {
    n.to_string().into_bytes()
}

/// Clamps an expiry argument `out[i]` of the given unit; returns true when changed. An absolute
/// time beyond the limit becomes the relative `max` (so Redis's clock, not the proxy's, counts):
/// the option or command name at `name_at` is switched to its relative form. Values Redis would
/// reject (overflow) are left for Redis to reject.
fn clamp(out: &mut [Vec<u8>], i: usize, unit: Unit, rule: &TtlRule, now_ms: u64, name_at: Option<usize>) -> bool {
    let Some(v) = out.get(i).and_then(|a| int(a)) else { return false };
    let (max_s, max_ms) = (rule.max.as_secs() as i64, rule.max.as_millis() as i64);
    let (limit, redis_accepts) = match unit {
        Unit::Secs => (max_s, v <= i64::MAX / 1000),
        Unit::Millis => (max_ms, v <= i64::MAX - now_ms as i64),
        Unit::UnixSecs => ((now_ms / 1000) as i64 + max_s, v <= i64::MAX / 1000),
        Unit::UnixMillis => (now_ms as i64 + max_ms, true),
    };
    if v <= limit || !redis_accepts {
        return false;
    }
    match (unit, name_at) {
        (Unit::UnixSecs | Unit::UnixMillis, Some(n)) => {
            let relative = relative_name(&out[n], matches!(unit, Unit::UnixSecs));
            out[n] = relative;
            out[i] = s(if matches!(unit, Unit::UnixSecs) { max_s } else { max_ms });
        }
        _ => out[i] = s(limit),
    }
    true
}

/// EXAT → EX, PXAT → PX, EXPIREAT → EXPIRE, PEXPIREAT → PEXPIRE (keeping the caller's case style).
fn relative_name(name: &[u8], secs: bool) -> Vec<u8> {
    match cstr_lower(name).as_str() {
        "expireat" => b"EXPIRE".to_vec(),
        "pexpireat" => b"PEXPIRE".to_vec(),
        _ if secs => b"EX".to_vec(),
        _ => b"PX".to_vec(),
    }
}

#[derive(Debug, Clone, Copy)]
enum Unit {
    Secs,
    Millis,
    UnixSecs,
    UnixMillis,
}

fn unit_of(opt: &str) -> Option<Unit> {
    match opt {
        "ex" => Some(Unit::Secs),
        "px" => Some(Unit::Millis),
        "exat" => Some(Unit::UnixSecs),
        "pxat" => Some(Unit::UnixMillis),
        _ => None,
    }
}

/// Decides what the TTL policy does to `args` (a command the ACL policy already allowed).
pub fn plan(info: &CommandInfo, args: &[&[u8]], rules: &[TtlRule], now_ms: u64) -> TtlPlan {
    let mut p = TtlPlan::default();
    if rules.is_empty() {
        return p;
    }
    let key_rule = |i: usize| args.get(i).and_then(|k| rule_for(rules, k));
    let owned = || args.iter().map(|a| a.to_vec()).collect::<Vec<_>>();
    let default_s = |r: &TtlRule| r.default.as_secs() as i64;
    let note = |p: &mut TtlPlan, r: &TtlRule, a: TtlAction| p.actions.push((r.pattern.clone(), a));
    match info.name.as_str() {
        "set" => {
            let Some(r) = key_rule(1) else { return p };
            let mut out = owned();
            let opts: Vec<String> = out.iter().skip(3).map(|a| cstr_lower(a)).collect();
            let explicit = opts.iter().filter(|o| unit_of(o).is_some()).count();
            let keepttl = opts.iter().filter(|o| *o == "keepttl").count();
            if keepttl > 0 && explicit > 0 {
                return p; // Redis rejects the combination: let it.
            }
            let mut i = 3;
            while i < out.len() {
                let opt = cstr_lower(&out[i]);
                if opt == "keepttl" {
                    out.splice(i..=i, [b"EX".to_vec(), s(default_s(r))]);
                    note(&mut p, r, TtlAction::Appended);
                    i += 2;
                    continue;
                }
                if let Some(u) = unit_of(&opt) {
                    if clamp(&mut out, i + 1, u, r, now_ms, Some(i)) {
                        note(&mut p, r, TtlAction::Clamped);
                    }
                    i += 2;
                    continue;
                }
                i += 1;
            }
            if explicit == 0 && keepttl == 0 {
                out.push(b"EX".to_vec());
                out.push(s(default_s(r)));
                note(&mut p, r, TtlAction::Appended);
            }
            if !p.actions.is_empty() {
                p.rewrite = Some(out);
            }
        }
        "setex" | "psetex" | "expire" | "pexpire" | "expireat" | "pexpireat" => {
            let Some(r) = key_rule(1) else { return p };
            let unit = match info.name.as_str() {
                "setex" | "expire" => Unit::Secs,
                "psetex" | "pexpire" => Unit::Millis,
                "expireat" => Unit::UnixSecs,
                _ => Unit::UnixMillis,
            };
            let mut out = owned();
            if clamp(&mut out, 2, unit, r, now_ms, Some(0)) {
                note(&mut p, r, TtlAction::Clamped);
                p.rewrite = Some(out);
            }
        }
        "getex" => {
            let Some(r) = key_rule(1) else { return p };
            let mut out = owned();
            let opts: Vec<String> = out.iter().skip(2).map(|a| cstr_lower(a)).collect();
            if opts.iter().filter(|o| unit_of(o).is_some() || *o == "persist").count() > 1 {
                return p; // Redis rejects more than one expiry option: let it.
            }
            let mut i = 2;
            while i < out.len() {
                let opt = cstr_lower(&out[i]);
                if opt == "persist" {
                    out.splice(i..=i, [b"EX".to_vec(), s(default_s(r))]);
                    note(&mut p, r, TtlAction::Appended);
                    i += 2;
                } else if let Some(u) = unit_of(&opt) {
                    if clamp(&mut out, i + 1, u, r, now_ms, Some(i)) {
                        note(&mut p, r, TtlAction::Clamped);
                    }
                    i += 2;
                } else {
                    i += 1;
                }
            }
            if !p.actions.is_empty() {
                p.rewrite = Some(out);
            }
        }
        "restore" => {
            let Some(r) = key_rule(1) else { return p };
            let mut out = owned();
            let abs = out.iter().skip(4).position(|a| cstr_lower(a) == "absttl").map(|i| i + 4);
            let max_ms = r.max.as_millis() as i64;
            match out.get(2).and_then(|a| int(a)) {
                Some(0) => {
                    out[2] = s(r.default.as_millis() as i64);
                    if let Some(i) = abs {
                        out.remove(i);
                    }
                    note(&mut p, r, TtlAction::Appended);
                    p.rewrite = Some(out);
                }
                Some(v) if (abs.is_some() && v > now_ms as i64 + max_ms) || (abs.is_none() && v > max_ms) => {
                    out[2] = s(max_ms);
                    if let Some(i) = abs {
                        out.remove(i);
                    }
                    note(&mut p, r, TtlAction::Clamped);
                    p.rewrite = Some(out);
                }
                _ => {}
            }
        }
        "move" => {
            // MOVE carries a key to another DB, beyond the EXPIREs the proxy sends in this one.
            if let Some(r) = key_rule(1) {
                note(&mut p, r, TtlAction::Denied);
                p.deny = Some(format!(
                    "-NOPERM MOVE is refused: the key is under the TTL policy '{}' (keys must expire)",
                    r.pattern
                ));
            }
        }
        "persist" => {
            if let Some(r) = key_rule(1) {
                note(&mut p, r, TtlAction::Denied);
                p.deny = Some(format!(
                    "-NOPERM PERSIST is refused: the key is under the TTL policy '{}' (keys must expire)",
                    r.pattern
                ));
            }
        }
        _ if info.categories.iter().any(|c| c == "scripting") => {
            let keys = match info.keys(args) {
                crate::policy::redis_acl::Keys::Known(k) => k,
                crate::policy::redis_acl::Keys::Unresolvable => Vec::new(),
            };
            if let Some(r) = keys.iter().filter_map(|k| rule_for(rules, k)).find(|r| !r.allow_scripts) {
                note(&mut p, r, TtlAction::Denied);
                p.deny = Some(format!(
                    "-NOPERM scripts may not write keys under the TTL policy '{}' (set allow_scripts to permit)",
                    r.pattern
                ));
            }
        }
        _ => match info.written_keys(args) {
            None => {
                // Keys that cannot be told may be matching keys written without a TTL: refuse.
                if let Some(r) = rules.first() {
                    note(&mut p, r, TtlAction::Denied);
                    p.deny =
                        Some(format!("-NOPERM the keys of '{}' cannot be checked against the TTL policy", info.name));
                }
            }
            Some(keys) => {
                let governed = keys.iter().find_map(|k| rule_for(rules, k));
                if let Some(r) = governed {
                    // COPY … DB n writes in another DB, beyond the EXPIREs sent in this one; a
                    // blocking write may complete after this client is gone, before its EXPIRE.
                    let other_db = info.name == "copy" && args.iter().skip(3).any(|a| cstr_lower(a) == "db");
                    if other_db || info.has_flag("blocking") {
                        note(&mut p, r, TtlAction::Denied);
                        p.deny = Some(format!(
                            "-NOPERM '{}' is refused here: a key under the TTL policy '{}' could be written without an expiry",
                            info.name, r.pattern
                        ));
                        return p;
                    }
                }
                let carries_ttl = matches!(info.name.as_str(), "rename" | "renamenx" | "copy");
                for k in keys {
                    if let Some(r) = rule_for(rules, k)
                        && !p.inject.iter().any(|(x, _)| x.as_slice() == k)
                    {
                        p.inject.push((k.to_vec(), r.default.as_secs()));
                        if carries_ttl {
                            p.clamp_after.push((k.to_vec(), r.max.as_secs()));
                        }
                        note(&mut p, r, TtlAction::Injected);
                    }
                }
            }
        },
    }
    p
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::redis::command::CommandTable;

    fn rules() -> Vec<TtlRule> {
        vec![
            TtlRule {
                pattern: "session:*".into(),
                default: Duration::from_secs(1800),
                max: Duration::from_secs(86400),
                allow_scripts: false,
            },
            TtlRule {
                pattern: "chat:*".into(),
                default: Duration::from_secs(604800),
                max: Duration::from_secs(2592000),
                allow_scripts: true,
            },
        ]
    }

    const NOW: u64 = 1_700_000_000_000;

    fn run(cmd: &str) -> TtlPlan {
        let t = CommandTable::builtin();
        let args: Vec<&[u8]> = cmd.split(' ').map(str::as_bytes).collect();
        plan(t.lookup(&args).expect("known command"), &args, &rules(), NOW)
    }

    fn rewritten(cmd: &str) -> Option<String> {
        run(cmd)
            .rewrite
            .map(|a| a.iter().map(|x| String::from_utf8_lossy(x).into_owned()).collect::<Vec<_>>().join(" "))
    }

    #[test]
    fn set_family() {
        assert_eq!(rewritten("SET session:1 v").as_deref(), Some("SET session:1 v EX 1800"));
        assert_eq!(rewritten("SET session:1 v NX GET").as_deref(), Some("SET session:1 v NX GET EX 1800"));
        assert_eq!(rewritten("SET session:1 v EX 100"), None);
        assert_eq!(rewritten("SET session:1 v EX 999999").as_deref(), Some("SET session:1 v EX 86400"));
        assert_eq!(rewritten("SET session:1 v px 999999999").as_deref(), Some("SET session:1 v px 86400000"));
        let exat = format!("SET session:1 v EXAT {}", NOW / 1000 + 10 * 86400);
        assert_eq!(rewritten(&exat).as_deref(), Some("SET session:1 v EX 86400"), "relative: Redis's clock counts");
        assert_eq!(rewritten("SET session:1 v EX 10 KEEPTTL"), None, "Redis rejects it; so be it");
        assert_eq!(rewritten("SET session:1 v EX 9223372036854775807"), None, "Redis rejects the overflow");
        assert_eq!(rewritten("SET session:1 v KEEPTTL").as_deref(), Some("SET session:1 v EX 1800"));
        assert_eq!(rewritten("SET other:1 v"), None);
        assert_eq!(rewritten("SET chat:9 v").as_deref(), Some("SET chat:9 v EX 604800"));
        assert_eq!(run("SET session:1 v").actions, vec![("session:*".to_string(), TtlAction::Appended)]);
    }

    #[test]
    fn expiry_commands_are_clamped() {
        assert_eq!(rewritten("SETEX session:1 999999 v").as_deref(), Some("SETEX session:1 86400 v"));
        assert_eq!(rewritten("PSETEX session:1 100 v"), None);
        assert_eq!(rewritten("EXPIRE session:1 999999 GT").as_deref(), Some("EXPIRE session:1 86400 GT"));
        assert_eq!(rewritten("PEXPIRE session:1 86400001").as_deref(), Some("PEXPIRE session:1 86400000"));
        let at = format!("EXPIREAT session:1 {}", NOW / 1000 + 2 * 86400);
        assert_eq!(rewritten(&at).as_deref(), Some("EXPIRE session:1 86400"));
        assert_eq!(rewritten("GETEX session:1 EX 10 PERSIST"), None);
        assert_eq!(rewritten("GETEX session:1 PERSIST").as_deref(), Some("GETEX session:1 EX 1800"));
        assert_eq!(rewritten("GETEX session:1 EX 999999").as_deref(), Some("GETEX session:1 EX 86400"));
        assert_eq!(rewritten("RESTORE session:1 0 payload").as_deref(), Some("RESTORE session:1 1800000 payload"));
        assert_eq!(rewritten("EXPIRE other 999999"), None);
    }

    #[test]
    fn moves_across_dbs_and_blocking_writes_are_refused() {
        assert!(run("MOVE session:1 1").deny.is_some());
        assert!(run("MOVE other 1").deny.is_none());
        assert!(run("COPY other session:1 DB 1").deny.is_some());
        assert!(run("COPY other session:1").deny.is_none());
        assert!(run("BLMOVE src session:1 LEFT RIGHT 0").deny.is_some());
        assert!(run("BLMOVE src other LEFT RIGHT 0").deny.is_none());
        assert!(run("BLPOP session:1 0").deny.is_none(), "a pop creates nothing");
    }

    #[test]
    fn persist_and_scripts() {
        assert!(run("PERSIST session:1").deny.unwrap().contains("TTL policy 'session:*'"));
        assert_eq!(run("PERSIST other").deny, None);
        assert!(run("EVAL s 0 session:1").deny.is_none(), "an argument, not a declared key");
        assert!(run("EVAL s 1 session:1").deny.is_some());
        assert!(run("EVAL s 1 chat:1").deny.is_none(), "allow_scripts");
        assert!(run("FCALL f 1 session:2").deny.is_some());
    }

    #[test]
    fn other_writes_get_expire_nx_from_key_specs() {
        let inj = |c: &str| {
            run(c).inject.iter().map(|(k, s)| format!("{} {s}", String::from_utf8_lossy(k))).collect::<Vec<_>>()
        };
        assert_eq!(inj("HSET session:1 f v"), vec!["session:1 1800"]);
        assert_eq!(inj("LPUSH chat:1 m"), vec!["chat:1 604800"]);
        assert_eq!(inj("INCR session:2"), vec!["session:2 1800"]);
        assert_eq!(inj("MSET a 1 session:3 2 chat:4 3"), vec!["session:3 1800", "chat:4 604800"]);
        assert_eq!(inj("RENAME other session:5"), vec!["session:5 1800"]);
        assert_eq!(inj("LMOVE src session:6 LEFT RIGHT"), vec!["session:6 1800"]);
        assert_eq!(inj("ZUNIONSTORE session:7 2 a b"), vec!["session:7 1800"]);
        assert_eq!(inj("SETNX session:8 v"), vec!["session:8 1800"]);
        assert_eq!(inj("COPY other session:9"), vec!["session:9 1800"]);
        assert_eq!(run("RENAME chat:1 session:1").clamp_after, vec![(b"session:1".to_vec(), 86400)]);
        assert!(run("HSET session:1 f v").clamp_after.is_empty());
        assert!(inj("GET session:1").is_empty(), "reads write nothing");
        assert!(inj("DEL session:1").is_empty(), "deletes create nothing");
        assert!(inj("HSET other f v").is_empty());
    }
}
