//! Redis ACL rules (`+@all -@dangerous -flushall +client|setname ~app:*`), read left to right
//! as Redis reads them, and the decision for one command: a pure function of the rules, the
//! command's identity (name, subcommand, categories) and its keys.

use super::glob;

/// A rule string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ACL rule {token:?}: {why}")]
pub struct RuleError {
    /// The offending token.
    pub token: String,
    /// What is wrong.
    pub why: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum CmdRule {
    All(bool),
    Category(bool, String),
    Command(bool, String),
    Sub(bool, String, String),
}

/// Parsed rules for one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclRules {
    cmds: Vec<CmdRule>,
    /// `None`: every key (no `~` rule given, or `allkeys`/`~*`); `Some`: only these patterns.
    keys: Option<Vec<Vec<u8>>>,
}

/// What the decision looks at: a command as the command table knows it.
#[derive(Debug, Clone, Copy)]
pub struct CommandRef<'a> {
    /// Full ACL name, lowercase: `get`, `client|setname`.
    pub name: &'a str,
    /// Top-level command, lowercase: `get`, `client`.
    pub parent: &'a str,
    /// ACL categories without `@`.
    pub categories: &'a [String],
    /// First argument (lowercase), for `+select|0`-style first-arg rules on plain commands.
    pub first_arg: Option<&'a str>,
}

/// The keys a command touches, as far as they can be told.
#[derive(Debug, Clone)]
pub enum Keys<'a> {
    /// These keys (possibly none).
    Known(Vec<&'a [u8]>),
    /// Movable keys that could not be resolved.
    Unresolvable,
}

/// Proof that policy allowed a command; forwarding takes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permit(());

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// The command (or subcommand) is not allowed: `-NOPERM … run the '<name>' command`.
    Command(String),
    /// A key is outside the user's patterns: `-NOPERM … access one of the keys …`.
    Keys,
}

impl Denial {
    /// The Redis 7 error line (without CRLF).
    pub fn message(&self) -> String {
        match self {
            Denial::Command(name) => format!("-NOPERM this user has no permissions to run the '{name}' command"),
            Denial::Keys => "-NOPERM this user has no permissions to access one of the keys used as arguments".into(),
        }
    }
}

/// The verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Forward it.
    Allow(Permit),
    /// Answer with the denial in its place.
    Deny(Denial),
}

impl AclRules {
    /// Parses a space-separated rule string.
    pub fn parse(s: &str) -> Result<AclRules, RuleError> {
        let mut cmds = Vec::new();
        let mut keys: Option<Vec<Vec<u8>>> = None;
        let err = |token: &str, why| RuleError { token: token.to_string(), why };
        for tok in s.split_whitespace() {
            let lower = tok.to_ascii_lowercase();
            match lower.as_str() {
                "allcommands" => cmds.push(CmdRule::All(true)),
                "nocommands" => cmds.push(CmdRule::All(false)),
                "allkeys" => keys = None,
                "resetkeys" => keys = Some(Vec::new()),
                _ => {}
            }
            if matches!(lower.as_str(), "allcommands" | "nocommands" | "allkeys" | "resetkeys") {
                continue;
            }
            if let Some(p) = tok.strip_prefix('~') {
                if p == "*" {
                    keys = None;
                } else if let Some(k) = keys.as_mut() {
                    k.push(p.as_bytes().to_vec());
                } else {
                    keys = Some(vec![p.as_bytes().to_vec()]);
                }
                continue;
            }
            let (allow, rest) = match lower.as_bytes().first() {
                Some(b'+') => (true, &lower[1..]),
                Some(b'-') => (false, &lower[1..]),
                _ => {
                    return Err(err(
                        tok,
                        "only command rules (+cmd -cmd +@cat -@cat +cmd|sub), key patterns (~glob, allkeys, resetkeys), allcommands and nocommands are supported",
                    ));
                }
            };
            if rest.is_empty() {
                return Err(err(tok, "empty command name"));
            }
            if let Some(cat) = rest.strip_prefix('@') {
                if cat == "all" {
                    cmds.push(CmdRule::All(allow));
                } else {
                    cmds.push(CmdRule::Category(allow, cat.to_string()));
                }
            } else if let Some((c, sub)) = rest.split_once('|') {
                if c.is_empty() || sub.is_empty() || sub.contains('|') {
                    return Err(err(tok, "expected command|subcommand"));
                }
                cmds.push(CmdRule::Sub(allow, c.to_string(), sub.to_string()));
            } else {
                cmds.push(CmdRule::Command(allow, rest.to_string()));
            }
        }
        Ok(AclRules { cmds, keys })
    }

    /// True when some rule names a subcommand or first argument (`+client|id`, `+select|0`).
    pub fn has_subcommand_rules(&self) -> bool {
        self.cmds.iter().any(|r| matches!(r, CmdRule::Sub(..)))
    }

    /// True when the user has key restrictions (so key positions matter).
    pub fn restricts_keys(&self) -> bool {
        self.keys.is_some()
    }

    /// Is this command allowed, by name alone?
    pub fn allows_command(&self, c: &CommandRef<'_>) -> bool {
        let mut allowed = false;
        for r in &self.cmds {
            match r {
                CmdRule::All(a) => allowed = *a,
                CmdRule::Category(a, cat) => {
                    if c.categories.iter().any(|x| x == cat) {
                        allowed = *a;
                    }
                }
                CmdRule::Command(a, name) => {
                    if c.parent == name {
                        allowed = *a;
                    }
                }
                CmdRule::Sub(a, name, sub) => {
                    let sub_of_container = c.parent == name && c.name.split_once('|').is_some_and(|(_, s)| s == sub);
                    let first_arg = c.name == name && c.first_arg == Some(sub.as_str());
                    if sub_of_container || first_arg {
                        allowed = *a;
                    }
                }
            }
        }
        allowed
    }

    /// True when nothing is denied: every command and every key (`+@all`, possibly after
    /// other rules, with no later `-` rule, and no key patterns).
    pub fn unrestricted(&self) -> bool {
        let Some(last_all) = self.cmds.iter().rposition(|r| matches!(r, CmdRule::All(true))) else {
            return false;
        };
        self.keys.is_none()
            && self.cmds[last_all..].iter().all(|r| {
                matches!(
                    r,
                    CmdRule::All(true)
                        | CmdRule::Category(true, _)
                        | CmdRule::Command(true, _)
                        | CmdRule::Sub(true, ..)
                )
            })
    }

    /// The decision for a command and its keys. Scripts (`@scripting`: EVAL, FCALL, FUNCTION,
    /// SCRIPT) run upstream as the proxy's own user, beyond the reach of these rules, so they
    /// are allowed only to users whose rules restrict nothing.
    pub fn decide(&self, c: &CommandRef<'_>, keys: &Keys<'_>) -> Decision {
        if !self.allows_command(c) || (c.categories.iter().any(|x| x == "scripting") && !self.unrestricted()) {
            return Decision::Deny(Denial::Command(c.name.to_string()));
        }
        if let Some(patterns) = &self.keys {
            let ok = match keys {
                Keys::Unresolvable => false,
                Keys::Known(ks) => ks.iter().all(|k| patterns.iter().any(|p| glob::matches(p, k))),
            };
            if !ok {
                return Decision::Deny(Denial::Keys);
            }
        }
        Decision::Allow(Permit(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd<'a>(name: &'a str, cats: &'a [String]) -> CommandRef<'a> {
        let parent = name.split('|').next().unwrap_or(name);
        CommandRef { name, parent, categories: cats, first_arg: None }
    }

    fn cats(c: &[&str]) -> Vec<String> {
        c.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn left_to_right_like_redis() {
        let get = cats(&["read", "string", "fast"]);
        let flushall = cats(&["keyspace", "write", "slow", "dangerous"]);
        let setname = cats(&["slow", "connection"]);
        let kill = cats(&["admin", "slow", "dangerous", "connection"]);
        let eval = cats(&["slow", "scripting"]);
        let dump = cats(&["keyspace", "read", "slow"]);
        let default = AclRules::parse("+@all -@dangerous -@scripting -dump").unwrap();
        let table: &[(&AclRules, CommandRef, bool)] = &[
            (&default, cmd("get", &get), true),
            (&default, cmd("flushall", &flushall), false),
            (&default, cmd("client|setname", &setname), true),
            (&default, cmd("client|kill", &kill), false),
            (&default, cmd("eval", &eval), false),
            (&default, cmd("dump", &dump), false),
        ];
        for (rules, c, want) in table {
            assert_eq!(rules.allows_command(c), *want, "{}", c.name);
        }
        let r = AclRules::parse("-@all +get +client|setname").unwrap();
        assert!(r.allows_command(&cmd("get", &get)));
        assert!(r.allows_command(&cmd("client|setname", &setname)));
        assert!(!r.allows_command(&cmd("client|kill", &kill)));
        // a later rule wins
        let r = AclRules::parse("+@all -get +get").unwrap();
        assert!(r.allows_command(&cmd("get", &get)));
        let r = AclRules::parse("+client -client|kill").unwrap();
        assert!(r.allows_command(&cmd("client|setname", &setname)));
        assert!(!r.allows_command(&cmd("client|kill", &kill)));
        // first-arg rules on plain commands
        let select = cats(&["keyspace", "fast"]);
        let r = AclRules::parse("-@all +select|0").unwrap();
        let mut c = cmd("select", &select);
        c.first_arg = Some("0");
        assert!(r.allows_command(&c));
        c.first_arg = Some("1");
        assert!(!r.allows_command(&c));
        // nothing allowed by default
        assert!(!AclRules::parse("").unwrap().allows_command(&cmd("get", &get)));
    }

    #[test]
    fn scripts_only_for_unrestricted_users() {
        let eval = cats(&["slow", "scripting"]);
        let c = cmd("eval", &eval);
        let none = Keys::Known(vec![]);
        assert!(matches!(AclRules::parse("+@all").unwrap().decide(&c, &none), Decision::Allow(_)));
        for rules in ["+@all -flushall", "+@all ~app:*", "+@all -@dangerous", "+@scripting +get", "-@all +@all -get"] {
            let r = AclRules::parse(rules).unwrap();
            assert_eq!(r.decide(&c, &none), Decision::Deny(Denial::Command("eval".into())), "{rules}");
        }
        assert!(AclRules::parse("-get +@all").unwrap().unrestricted());
    }

    #[test]
    fn key_patterns() {
        let get = cats(&["read"]);
        let r = AclRules::parse("+@all ~app:* ~session:*").unwrap();
        let c = cmd("get", &get);
        assert_eq!(r.decide(&c, &Keys::Known(vec![b"app:1"])), Decision::Allow(Permit(())));
        assert_eq!(r.decide(&c, &Keys::Known(vec![b"app:1", b"other"])), Decision::Deny(Denial::Keys));
        assert_eq!(r.decide(&c, &Keys::Unresolvable), Decision::Deny(Denial::Keys));
        assert_eq!(r.decide(&c, &Keys::Known(vec![])), Decision::Allow(Permit(())));
        let all = AclRules::parse("+@all ~app:* allkeys").unwrap();
        assert!(!all.restricts_keys());
        assert!(AclRules::parse("+@all resetkeys").unwrap().restricts_keys());
        assert_eq!(
            Denial::Command("client|kill".into()).message(),
            "-NOPERM this user has no permissions to run the 'client|kill' command"
        );
    }

    #[test]
    fn unsupported_tokens_are_errors() {
        for bad in ["on", ">password", "&chan", "%R~x", "+", "+a|", "+a|b|c"] {
            assert!(AclRules::parse(&format!("+@all {bad}")).is_err(), "{bad}");
        }
    }
}
