//! The StartupMessage: parsing, protocol-version negotiation, and the first policy layer
//! (who may not log in through the proxy at all), decided before any upstream contact.

use bytes::Bytes;

use super::codec::Body;
use super::reply::PgRefusal;
use crate::metrics::PgRejectReason;

/// A parsed StartupMessage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Startup {
    /// Requested minor protocol version (major is always 3).
    pub minor: u16,
    /// The login user.
    pub user: String,
    /// Database (PostgreSQL defaults it to the user name).
    pub database: Option<String>,
    /// All parameters other than `_pq_.*`, in the order sent.
    pub params: Vec<(String, String)>,
    /// `_pq_.*` protocol options we do not support (named in NegotiateProtocolVersion).
    pub unsupported_options: Vec<String>,
}

impl Startup {
    /// Parses a startup packet body (after the length; starts with the version).
    pub fn parse(body: Bytes) -> Result<Startup, PgRefusal> {
        let bad = |m: &str| PgRefusal::Protocol(format!("invalid startup packet layout: {m}"));
        let mut b = Body(body);
        let version = b.i32().map_err(|_| bad("missing version"))? as u32;
        let (major, minor) = ((version >> 16) as u16, (version & 0xffff) as u16);
        if major != 3 {
            return Err(PgRefusal::UnsupportedProtocol(major, minor));
        }
        let mut params: Vec<(String, String)> = Vec::new();
        let mut unsupported_options = Vec::new();
        loop {
            let k = b.cstr().map_err(|_| bad("expected string"))?;
            if k.is_empty() {
                break;
            }
            // Values are any bytes to PostgreSQL (e.g. a Latin-1 application_name).
            let v = b.cstr_lossy().map_err(|_| bad("expected terminator as last byte"))?;
            if k.starts_with("_pq_.") {
                unsupported_options.push(k);
            } else {
                // A repeated name: PostgreSQL keeps the last value, so do we (one check, one forward).
                params.retain(|(existing, _)| *existing != k);
                params.push((k, v));
            }
        }
        if !b.rest().is_empty() {
            return Err(bad("expected terminator as last byte"));
        }
        let get = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let user = get("user").filter(|u| !u.is_empty()).ok_or(PgRefusal::NoUser)?;
        let database = get("database").filter(|d| !d.is_empty());
        Ok(Startup { minor, user, database, params, unsupported_options })
    }

    /// Whether PostgreSQL 15 would answer with NegotiateProtocolVersion.
    pub fn needs_negotiation(&self) -> bool {
        self.minor > 0 || !self.unsupported_options.is_empty()
    }

    /// The value of a parameter.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// Parameters to send upstream: everything but user/database/replication (set by the proxy).
    pub fn forwarded_params(&self) -> impl Iterator<Item = &(String, String)> {
        self.params.iter().filter(|(k, _)| !matches!(k.as_str(), "user" | "database" | "replication"))
    }
}

/// A policy refusal of a login: the metric reason and the text after "not allowed through this proxy: ".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginRejection {
    /// Metric / audit reason.
    pub reason: PgRejectReason,
    /// Client-facing reason.
    pub text: &'static str,
}

const ROLE_GUCS: [&str; 2] = ["role", "session_authorization"];

fn sets_role(name: &str) -> bool {
    let n = name.trim().to_ascii_lowercase().replace('-', "_");
    ROLE_GUCS.contains(&n.as_str())
}

/// Splits `options` as PostgreSQL's `pg_split_opts` does (whitespace; backslash escapes).
fn split_options(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Switches of the postgres backend that take an argument (its getopt string
/// `B:bc:C:D:d:EeFf:h:ijk:lN:nOPp:r:S:sTt:v:W:-:`).
const SWITCHES_WITH_ARG: &[u8] = b"BcCDdfhkNprStvW-";

/// The GUC names that `options` sets, walking the tokens as PostgreSQL's getopt does
/// (grouped flags such as `-ecrole=x`, and `-c`/`--` with the value in the next token).
fn option_gucs(tokens: &[String]) -> Vec<String> {
    let mut names = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let tok = tokens[i].as_bytes();
        i += 1;
        if tok.first() != Some(&b'-') || tok.len() < 2 {
            continue; // getopt stops at non-options; PostgreSQL then errors out. Nothing set.
        }
        let mut j = 1;
        while j < tok.len() {
            let flag = tok[j];
            j += 1;
            if !SWITCHES_WITH_ARG.contains(&flag) {
                continue;
            }
            let arg = if j < tok.len() {
                String::from_utf8_lossy(&tok[j..]).into_owned()
            } else if i < tokens.len() {
                i += 1;
                tokens[i - 1].clone()
            } else {
                String::new()
            };
            if (flag == b'c' || flag == b'-')
                && let Some((name, _)) = arg.split_once('=')
            {
                names.push(name.to_string());
            }
            break;
        }
    }
    names
}

/// First layer of DESIGN §2a: refuse by name (deny_users, case-insensitive), replication
/// connections, and any attempt to set role/session_authorization at login.
pub fn check_login(s: &Startup, deny_users: &[String]) -> Result<(), LoginRejection> {
    if deny_users.iter().any(|d| d.eq_ignore_ascii_case(&s.user)) {
        return Err(LoginRejection { reason: PgRejectReason::DenyList, text: "bootstrap or administrative user" });
    }
    if let Some(r) = s.get("replication")
        && !matches!(r.to_ascii_lowercase().as_str(), "false" | "off" | "no" | "0")
    {
        return Err(LoginRejection {
            reason: PgRejectReason::Replication,
            text: "replication connections are not allowed",
        });
    }
    let role_param = s.params.iter().any(|(k, _)| sets_role(k));
    let role_option = s.get("options").is_some_and(|o| option_gucs(&split_options(o)).iter().any(|n| sets_role(n)));
    if role_param || role_option {
        return Err(LoginRejection {
            reason: PgRejectReason::RoleOption,
            text: "setting role or session_authorization at login is not allowed",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};

    fn packet(version: i32, params: &[(&str, &str)]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_i32(version);
        for (k, v) in params {
            b.put_slice(k.as_bytes());
            b.put_u8(0);
            b.put_slice(v.as_bytes());
            b.put_u8(0);
        }
        b.put_u8(0);
        b.freeze()
    }

    fn startup(params: &[(&str, &str)]) -> Startup {
        Startup::parse(packet(196_608, params)).unwrap()
    }

    #[test]
    fn parses_and_negotiates() {
        let s = Startup::parse(packet(196_610, &[("user", "app"), ("_pq_.foo", "1"), ("database", "d")])).unwrap();
        assert_eq!((s.minor, s.user.as_str(), s.database.as_deref()), (2, "app", Some("d")));
        assert_eq!(s.unsupported_options, vec!["_pq_.foo".to_string()]);
        assert!(s.needs_negotiation());
        assert!(!startup(&[("user", "app")]).needs_negotiation());
    }

    #[test]
    fn bad_packets() {
        assert_eq!(
            Startup::parse(packet(4 << 16, &[("user", "a")])).unwrap_err(),
            PgRefusal::UnsupportedProtocol(4, 0)
        );
        assert_eq!(Startup::parse(packet(196_608, &[("database", "a")])).unwrap_err(), PgRefusal::NoUser);
        assert!(matches!(Startup::parse(Bytes::from_static(b"\0\x03\0\0user\0x")), Err(PgRefusal::Protocol(_))));
        assert!(matches!(Startup::parse(Bytes::from_static(b"\0\x03")), Err(PgRefusal::Protocol(_))));
    }

    #[test]
    fn login_policy_table() {
        let deny = vec!["postgres".to_string()];
        type Case<'a> = (&'a [(&'a str, &'a str)], Option<PgRejectReason>);
        let cases: &[Case] = &[
            (&[("user", "app")], None),
            (&[("user", "postgres")], Some(PgRejectReason::DenyList)),
            (&[("user", "PoStGrEs")], Some(PgRejectReason::DenyList)),
            (&[("user", "postgres2")], None),
            (&[("user", "app"), ("replication", "database")], Some(PgRejectReason::Replication)),
            (&[("user", "app"), ("replication", "true")], Some(PgRejectReason::Replication)),
            (&[("user", "app"), ("replication", "false")], None),
            (&[("user", "app"), ("options", "-c role=postgres")], Some(PgRejectReason::RoleOption)),
            (&[("user", "app"), ("options", "-crole=postgres")], Some(PgRejectReason::RoleOption)),
            (&[("user", "app"), ("options", "--role=postgres")], Some(PgRejectReason::RoleOption)),
            (&[("user", "app"), ("options", "-c session-authorization=x")], Some(PgRejectReason::RoleOption)),
            (&[("user", "app"), ("options", "-c SESSION_AUTHORIZATION=x")], Some(PgRejectReason::RoleOption)),
            (&[("user", "app"), ("options", "-c search_path=a\\ role=b")], None),
            (&[("user", "app"), ("options", "-c search_path=public")], None),
            (&[("user", "app"), ("role", "postgres")], Some(PgRejectReason::RoleOption)),
        ];
        for (params, want) in cases {
            let got = check_login(&startup(params), &deny).err().map(|r| r.reason);
            assert_eq!(got, *want, "{params:?}");
        }
    }
}
