//! The command table: arity, flags, ACL categories and key positions of every command, read
//! from the upstream's `COMMAND` reply (so modules and versions are exact), with a snapshot of
//! Redis 7.0.15's reply built in as the fallback.

use rustc_hash::FxHashMap;

use redis_protocol::resp2::types::OwnedFrame;

use crate::policy::redis_acl::{CommandRef, Keys};

/// `COMMAND` of Redis 7.0.15, captured raw.
const SNAPSHOT: &[u8] = include_bytes!("commands-7.0.15.resp");

/// Where a command's keys start (a key spec's begin_search).
#[derive(Debug, Clone, PartialEq, Eq)]
enum BeginSearch {
    Index(i64),
    Keyword { keyword: String, startfrom: i64 },
}

/// How many keys follow (a key spec's find_keys).
#[derive(Debug, Clone, PartialEq, Eq)]
enum FindKeys {
    Range { lastkey: i64, keystep: i64, limit: i64 },
    KeyNum { keynumidx: i64, firstkey: i64, keystep: i64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct KeySpec {
    begin: BeginSearch,
    find: FindKeys,
    /// Key spec flags (RW, OW, RM, RO, access, update, insert, delete, …), upper/lower as Redis sends them.
    flags: Vec<String>,
}

/// One command (or subcommand).
#[derive(Debug, Clone)]
pub struct CommandInfo {
    /// Lowercase ACL name: `get`, `client|setname`.
    pub name: String,
    /// Arity: positive = exact argument count (with the name), negative = at least.
    pub arity: i64,
    /// Flags (`write`, `readonly`, `movablekeys`, …).
    pub flags: Vec<String>,
    /// ACL categories without `@`.
    pub categories: Vec<String>,
    /// Needs a connection of its own (`pool = "multiplex"`): it blocks, changes or reads the
    /// connection's state, or is an administrative command.
    pub own_connection: bool,
    key_specs: Vec<KeySpec>,
    first_key: i64,
    last_key: i64,
    step: i64,
    subcommands: FxHashMap<Vec<u8>, CommandInfo>,
}

impl CommandInfo {
    /// The top-level name (`client` for `client|setname`).
    pub fn parent(&self) -> &str {
        // a byte search: this runs for every request ('|' is ASCII, so a char boundary)
        match self.name.bytes().position(|b| b == b'|') {
            Some(p) => &self.name[..p],
            None => &self.name,
        }
    }

    /// True when the argument count fits the arity (args include the command name).
    pub fn arity_ok(&self, argc: usize) -> bool {
        let argc = argc as i64;
        if self.arity >= 0 { argc == self.arity } else { argc >= -self.arity }
    }

    /// True when the command has this flag.
    pub fn has_flag(&self, f: &str) -> bool {
        self.flags.iter().any(|x| x.eq_ignore_ascii_case(f))
    }

    /// The identity policy decides on.
    pub fn acl_ref<'a>(&'a self, first_arg: Option<&'a str>) -> CommandRef<'a> {
        CommandRef { name: &self.name, parent: self.parent(), categories: &self.categories, first_arg }
    }

    /// Keys this call may create or re-create (for the TTL policy), from the key specs' flags
    /// (OW, insert, update); None when they cannot be told.
    pub fn written_keys<'a, A: AsRef<[u8]>>(&self, args: &'a [A]) -> Option<Vec<&'a [u8]>> {
        if !self.has_flag("write") {
            return Some(Vec::new());
        }
        if self.key_specs.is_empty() {
            return match self.keys(args) {
                Keys::Known(k) => Some(k),
                Keys::Unresolvable => None,
            };
        }
        let mut out = Vec::new();
        for (i, spec) in self.key_specs.iter().enumerate() {
            // Keys the command may create or re-create: overwritten (OW), or written with insert
            // or update semantics. Sources that are only read or deleted are not.
            let has = |f: &str| spec.flags.iter().any(|x| x.eq_ignore_ascii_case(f));
            if has("not_key") || !(has("OW") || has("insert") || has("update")) {
                continue;
            }
            let one = CommandInfo { key_specs: vec![self.key_specs[i].clone()], ..self.clone_shallow() };
            match one.keys(args) {
                Keys::Known(k) => out.extend(k),
                Keys::Unresolvable => return None,
            }
        }
        Some(out)
    }

    fn clone_shallow(&self) -> CommandInfo {
        CommandInfo {
            name: self.name.clone(),
            arity: self.arity,
            flags: self.flags.clone(),
            categories: Vec::new(),
            own_connection: self.own_connection,
            key_specs: Vec::new(),
            first_key: self.first_key,
            last_key: self.last_key,
            step: self.step,
            subcommands: FxHashMap::default(),
        }
    }

    /// The keys of a call `args` (args[0] is the command name), from the key specs, or the
    /// legacy (first, last, step) triple when there are none.
    pub fn keys<'a, A: AsRef<[u8]>>(&self, args: &'a [A]) -> Keys<'a> {
        let mut out: Vec<&'a [u8]> = Vec::new();
        let argc = args.len() as i64;
        if self.key_specs.is_empty() {
            if self.has_flag("movablekeys") {
                return Keys::Unresolvable;
            }
            if self.first_key > 0 {
                let last = if self.last_key < 0 { argc + self.last_key } else { self.last_key };
                let mut i = self.first_key;
                while i <= last && i < argc {
                    out.push(args[i as usize].as_ref());
                    i += self.step.max(1);
                }
            }
            return Keys::Known(out);
        }
        for spec in &self.key_specs {
            if spec.flags.iter().any(|f| f.eq_ignore_ascii_case("not_key")) {
                continue; // e.g. SPUBLISH's shard channel: not a key for ACL purposes
            }
            if spec.flags.iter().any(|f| f.eq_ignore_ascii_case("incomplete")) {
                return Keys::Unresolvable; // e.g. MIGRATE: Redis itself needs command code to find them
            }
            let start = match &spec.begin {
                BeginSearch::Index(i) => *i,
                BeginSearch::Keyword { keyword, startfrom } => {
                    // Commands compare keywords C-string style (up to a NUL), so do we; a keyword
                    // given twice is ambiguous (GEORADIUS uses the last STORE): unresolvable.
                    let is_kw = |i: &i64| cstr_eq(args[*i as usize].as_ref(), keyword.as_bytes());
                    let hits: Vec<i64> = if *startfrom >= 0 {
                        (*startfrom..argc).filter(is_kw).collect()
                    } else {
                        (1..=(argc + startfrom).max(0)).rev().filter(is_kw).collect()
                    };
                    match hits.as_slice() {
                        [] => continue, // keyword absent: this spec has no keys in this call
                        [i] => i + 1,
                        _ => return Keys::Unresolvable,
                    }
                }
            };
            if start <= 0 || start > argc {
                continue;
            }
            match &spec.find {
                FindKeys::Range { lastkey, keystep, limit } => {
                    let step = (*keystep).max(1);
                    let last = if *lastkey >= 0 {
                        start + lastkey
                    } else if *limit > 1 {
                        start + (argc - start) / limit - 1
                    } else {
                        argc + lastkey
                    };
                    let mut i = start;
                    while i <= last && i < argc {
                        out.push(args[i as usize].as_ref());
                        i += step;
                    }
                }
                FindKeys::KeyNum { keynumidx, firstkey, keystep } => {
                    let idx = start + keynumidx;
                    let Some(n) = args
                        .get(idx as usize)
                        .and_then(|a| std::str::from_utf8(a.as_ref()).ok())
                        .and_then(|s| s.parse::<i64>().ok())
                    else {
                        return Keys::Unresolvable;
                    };
                    if n < 0 {
                        return Keys::Unresolvable;
                    }
                    let first = start + firstkey;
                    let step = (*keystep).max(1);
                    for k in 0..n {
                        let i = first + k * step;
                        match args.get(i as usize) {
                            Some(a) => out.push(a.as_ref()),
                            None => return Keys::Unresolvable,
                        }
                    }
                }
            }
        }
        Keys::Known(out)
    }
}

/// The bytes of an argument up to its first NUL (how Redis's C code reads options).
pub fn cstr(a: &[u8]) -> &[u8] {
    a.iter().position(|b| *b == 0).map_or(a, |n| &a[..n])
}

/// Case-insensitive comparison of an argument, read as a C string, with a keyword.
pub fn cstr_eq(a: &[u8], keyword: &[u8]) -> bool {
    cstr(a).eq_ignore_ascii_case(keyword)
}

/// An argument read as a C string, lowercased (options, subcommand names).
pub fn cstr_lower(a: &[u8]) -> String {
    String::from_utf8_lossy(cstr(a)).to_ascii_lowercase()
}

/// `name` lowercased (into `buf` when it fits: no allocation on the hot path). Bytes, not
/// text: a name that is not ASCII simply matches no command.
fn lower<'b>(name: &[u8], buf: &'b mut [u8; 32]) -> std::borrow::Cow<'b, [u8]> {
    if name.len() > buf.len() {
        return std::borrow::Cow::Owned(name.to_ascii_lowercase());
    }
    let out = &mut buf[..name.len()];
    out.copy_from_slice(name);
    out.make_ascii_lowercase();
    std::borrow::Cow::Borrowed(out)
}

/// What a request names.
#[derive(Debug, Clone, Copy)]
pub enum Lookup<'a> {
    /// A known command or subcommand.
    Command(&'a CommandInfo),
    /// A known container (CLIENT, CONFIG, ...) with an unknown or missing subcommand.
    UnknownSubcommand(&'a CommandInfo),
    /// Not a command.
    Unknown,
}

/// All commands, by lowercase name.
#[derive(Debug, Clone, Default)]
pub struct CommandTable {
    /// FxHash: the keys are the server's command names, looked up on every request (no
    /// client can insert, so no hash flooding).
    commands: FxHashMap<Vec<u8>, CommandInfo>,
    /// True when this came from the built-in snapshot, not the upstream.
    pub fallback: bool,
}

fn text(f: &OwnedFrame) -> Option<String> {
    match f {
        OwnedFrame::SimpleString(b) | OwnedFrame::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        _ => None,
    }
}

fn int(f: &OwnedFrame) -> Option<i64> {
    match f {
        OwnedFrame::Integer(i) => Some(*i),
        _ => None,
    }
}

fn arr(f: &OwnedFrame) -> &[OwnedFrame] {
    match f {
        OwnedFrame::Array(a) => a,
        _ => &[],
    }
}

/// A flat `[k, v, k, v]` array as a lookup.
fn field<'a>(a: &'a [OwnedFrame], key: &str) -> Option<&'a OwnedFrame> {
    a.chunks(2).find(|kv| text(&kv[0]).is_some_and(|k| k == key)).and_then(|kv| kv.get(1))
}

fn key_spec(f: &OwnedFrame) -> Option<KeySpec> {
    let a = arr(f);
    let flags = arr(field(a, "flags")?).iter().filter_map(text).collect();
    let bs = arr(field(a, "begin_search")?);
    let bs_spec = arr(field(bs, "spec")?);
    let begin = match text(field(bs, "type")?)?.as_str() {
        "index" => BeginSearch::Index(int(field(bs_spec, "index")?)?),
        "keyword" => BeginSearch::Keyword {
            keyword: text(field(bs_spec, "keyword")?)?,
            startfrom: int(field(bs_spec, "startfrom")?)?,
        },
        _ => return None,
    };
    let fk = arr(field(a, "find_keys")?);
    let fk_spec = arr(field(fk, "spec")?);
    let find = match text(field(fk, "type")?)?.as_str() {
        "range" => FindKeys::Range {
            lastkey: int(field(fk_spec, "lastkey")?)?,
            keystep: int(field(fk_spec, "keystep")?)?,
            limit: int(field(fk_spec, "limit")?)?,
        },
        "keynum" => FindKeys::KeyNum {
            keynumidx: int(field(fk_spec, "keynumidx")?)?,
            firstkey: int(field(fk_spec, "firstkey")?)?,
            keystep: int(field(fk_spec, "keystep")?)?,
        },
        _ => return None,
    };
    Some(KeySpec { begin, find, flags })
}

fn parse_command(f: &OwnedFrame) -> Option<CommandInfo> {
    let a = arr(f);
    if a.len() < 7 {
        return None;
    }
    let mut specs = Vec::new();
    let mut movable_unknown = false;
    if let Some(s) = a.get(8) {
        for spec in arr(s) {
            match key_spec(spec) {
                Some(k) => specs.push(k),
                None => movable_unknown = true, // an unknown spec type: treat keys as unresolvable
            }
        }
    }
    let mut info = CommandInfo {
        name: text(&a[0])?.to_ascii_lowercase(),
        arity: int(&a[1])?,
        flags: arr(&a[2]).iter().filter_map(text).collect(),
        first_key: int(&a[3])?,
        last_key: int(&a[4])?,
        step: int(&a[5])?,
        categories: arr(&a[6]).iter().filter_map(text).map(|c| c.trim_start_matches('@').to_string()).collect(),
        key_specs: specs,
        subcommands: FxHashMap::default(),
        own_connection: false,
    };
    info.own_connection = needs_own_connection(&info);
    if movable_unknown {
        info.key_specs.clear();
        info.flags.push("movablekeys".into());
    }
    if let Some(subs) = a.get(9) {
        for s in arr(subs) {
            if let Some(sub) = parse_command(s) {
                let short = sub.name.split_once('|').map(|(_, s)| s.to_string()).unwrap_or_default();
                info.subcommands.insert(short.into_bytes(), sub);
            }
        }
    }
    Some(info)
}

/// Whether a command must run on a connection of its own rather than one shared by several
/// clients: blocking commands (they would hold up everyone), transactions and WATCH, pub/sub
/// subscriptions, connection state (SELECT, CLIENT, HELLO, AUTH, RESET, READONLY, ...) and
/// administrative commands. Stateless exceptions in those categories are shared.
fn needs_own_connection(info: &CommandInfo) -> bool {
    if matches!(info.parent(), "ping" | "echo" | "publish" | "spublish" | "pubsub" | "command") {
        return false;
    }
    // CLIENT SETINFO (Redis 7.2+; go-redis, redis-py, Lettuce and Jedis send it at connect) only
    // labels the connection in CLIENT LIST, where the clients sharing one are one client anyway:
    // the label goes on the shared connection, the reply is Redis's own.
    if info.name == "client|setinfo" {
        return false;
    }
    // CLIENT SETNAME / GETNAME are emulated while shared (the name goes to the client's own
    // connection if it moves to one).
    if matches!(info.name.as_str(), "client|setname" | "client|getname") {
        return false;
    }
    info.has_flag("blocking")
        || info
            .categories
            .iter()
            .any(|c| matches!(c.as_str(), "connection" | "transaction" | "pubsub" | "blocking" | "admin"))
        || matches!(info.parent(), "select" | "wait" | "waitaof" | "client" | "reset" | "hello" | "auth" | "quit")
        // the Lua debugger takes over the connection for the next EVAL
        || info.name == "script|debug"
}

impl CommandTable {
    /// Builds the table from a raw RESP2 `COMMAND` reply.
    pub fn from_reply(raw: &[u8]) -> Option<CommandTable> {
        let (frame, _) = redis_protocol::resp2::decode::decode(raw).ok()??;
        let mut commands = FxHashMap::default();
        for c in arr(&frame) {
            if let Some(info) = parse_command(c) {
                commands.insert(info.name.clone().into_bytes(), info);
            }
        }
        (!commands.is_empty()).then_some(CommandTable { commands, fallback: false })
    }

    /// The built-in Redis 7.0.15 table.
    pub fn builtin() -> CommandTable {
        let mut t = CommandTable::from_reply(SNAPSHOT).unwrap_or_default();
        t.fallback = true;
        t
    }

    /// Resolves `args` (args[0] = name) to the command or, for containers, the subcommand.
    /// Names with a NUL byte are never commands (Redis's hash-then-strcasecmp lookup could
    /// otherwise alias them).
    pub fn resolve<A: AsRef<[u8]>>(&self, args: &[A]) -> Lookup<'_> {
        let Some(first) = args.first().map(AsRef::as_ref) else { return Lookup::Unknown };
        if first.contains(&0) {
            return Lookup::Unknown;
        }
        let mut buf = [0u8; 32];
        let Some(top) = self.commands.get(lower(first, &mut buf).as_ref()) else {
            return Lookup::Unknown;
        };
        if top.subcommands.is_empty() {
            return Lookup::Command(top);
        }
        match args.get(1).map(AsRef::as_ref) {
            None => Lookup::Command(top), // arity decides: "wrong number of arguments for 'client'"
            Some(sub) if sub.contains(&0) => Lookup::UnknownSubcommand(top),
            Some(sub) => match top.subcommands.get(lower(sub, &mut buf).as_ref()) {
                Some(s) => Lookup::Command(s),
                None => Lookup::UnknownSubcommand(top),
            },
        }
    }

    /// The command or subcommand `args` names, if known.
    pub fn lookup<A: AsRef<[u8]>>(&self, args: &[A]) -> Option<&CommandInfo> {
        match self.resolve(args) {
            Lookup::Command(c) => Some(c),
            _ => None,
        }
    }

    /// Every command and subcommand.
    pub fn all(&self) -> Vec<&CommandInfo> {
        let mut out = Vec::new();
        for c in self.commands.values() {
            if c.subcommands.is_empty() {
                out.push(c);
            } else {
                out.extend(c.subcommands.values());
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Number of top-level commands.
    pub fn len(&self) -> usize {
        self.commands.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn args(s: &str) -> Vec<Bytes> {
        s.split(' ').map(|a| Bytes::copy_from_slice(a.as_bytes())).collect()
    }

    /// A Redis 7.2 COMMAND entry for CLIENT with its SETINFO and SETNAME subcommands.
    fn client_entry_7_2() -> Vec<u8> {
        fn arr(items: &[Vec<u8>]) -> Vec<u8> {
            let mut v = format!("*{}\r\n", items.len()).into_bytes();
            items.iter().for_each(|i| v.extend_from_slice(i));
            v
        }
        let bulk = |s: &str| format!("${}\r\n{s}\r\n", s.len()).into_bytes();
        let int = |n: i64| format!(":{n}\r\n").into_bytes();
        let strs = |xs: &[&str]| arr(&xs.iter().map(|x| bulk(x)).collect::<Vec<_>>());
        let cmd = |name: &str, arity: i64, subs: Vec<Vec<u8>>| {
            arr(&[
                bulk(name),
                int(arity),
                strs(&["noscript", "loading", "stale"]),
                int(0),
                int(0),
                int(0),
                strs(&["@slow", "@connection"]),
                strs(&[]),
                strs(&[]),
                arr(&subs),
            ])
        };
        let subs = vec![cmd("client|setinfo", 4, vec![]), cmd("client|setname", 3, vec![])];
        arr(&[cmd("client", -2, subs)])
    }

    #[test]
    fn client_setinfo_stays_on_a_shared_connection() {
        let t = CommandTable::from_reply(&client_entry_7_2()).expect("a COMMAND reply");
        let own = |s: &str| t.lookup(&args(s)).map(|i| i.own_connection);
        assert_eq!(own("CLIENT SETINFO LIB-NAME go-redis"), Some(false), "labels the shared connection");
        assert_eq!(own("client setname app"), Some(false), "emulated while shared");
    }

    #[test]
    fn stateful_blocking_and_admin_commands_need_their_own_connection() {
        let t = CommandTable::builtin();
        let own = |s: &str| t.lookup(&args(s)).map(|i| i.own_connection);
        for shared in [
            "GET k",
            "SET k v",
            "INCR k",
            "MGET a b",
            "EVAL s 0",
            "PUBLISH c m",
            "PING",
            "ECHO x",
            "SCAN 0",
            "DEL k",
            "OBJECT ENCODING k",
            "PUBSUB CHANNELS",
            "COMMAND DOCS",
            "XADD s * f v",
            "FLUSHALL",
            "CLIENT SETNAME n",
            "CLIENT GETNAME",
        ] {
            assert_eq!(own(shared), Some(false), "{shared}");
        }
        for own_conn in [
            "MULTI",
            "EXEC",
            "WATCH k",
            "UNWATCH",
            "DISCARD",
            "SELECT 1",
            "BLPOP k 0",
            "BRPOPLPUSH a b 0",
            "XREAD STREAMS s 0",
            "SUBSCRIBE c",
            "PSUBSCRIBE p",
            "SSUBSCRIBE c",
            "CLIENT ID",
            "CLIENT REPLY OFF",
            "HELLO 3",
            "AUTH p",
            "RESET",
            "READONLY",
            "WAIT 1 0",
            "CONFIG GET x",
            "DEBUG SLEEP 1",
            "MONITOR",
            "SCRIPT DEBUG YES",
        ] {
            assert_eq!(own(own_conn), Some(true), "{own_conn}");
        }
    }

    fn keys(t: &CommandTable, s: &str) -> Option<Vec<String>> {
        let a = args(s);
        match t.lookup(&a).unwrap().keys(&a) {
            Keys::Known(k) => Some(k.iter().map(|k| String::from_utf8_lossy(k).into_owned()).collect()),
            Keys::Unresolvable => None,
        }
    }

    #[test]
    fn builtin_snapshot_parses() {
        let t = CommandTable::builtin();
        assert!(t.fallback);
        assert!(t.len() > 200, "{}", t.len());
        let get = t.lookup(&args("GET k")).unwrap();
        assert_eq!(get.name, "get");
        assert!(get.categories.contains(&"read".to_string()));
        let setname = t.lookup(&args("client SETNAME x")).unwrap();
        assert_eq!(setname.name, "client|setname");
        assert!(!setname.categories.contains(&"dangerous".to_string()));
        let kill = t.lookup(&args("CLIENT kill x")).unwrap();
        assert!(kill.categories.contains(&"dangerous".to_string()));
        assert!(t.lookup(&args("FLUSHALL")).unwrap().categories.contains(&"dangerous".to_string()));
        assert!(t.lookup(&args("nosuchcmd")).is_none());
        assert!(get.arity_ok(2) && !get.arity_ok(3));
        assert!(t.lookup(&args("mset a b")).unwrap().arity_ok(3));
    }

    #[test]
    fn key_positions_from_key_specs() {
        let t = CommandTable::builtin();
        let k = |s| keys(&t, s);
        assert_eq!(k("GET a"), Some(vec!["a".into()]));
        assert_eq!(k("MSET a 1 b 2"), Some(vec!["a".into(), "b".into()]));
        assert_eq!(k("MGET a b c"), Some(vec!["a".into(), "b".into(), "c".into()]));
        assert_eq!(k("EVAL s 2 k1 k2 a1"), Some(vec!["k1".into(), "k2".into()]));
        assert_eq!(k("EVAL s x k1"), None);
        assert_eq!(k("XREAD COUNT 2 STREAMS s1 s2 0 0"), Some(vec!["s1".into(), "s2".into()]));
        assert_eq!(k("ZUNIONSTORE dst 2 a b"), Some(vec!["dst".into(), "a".into(), "b".into()]));
        assert_eq!(k("RENAME a b"), Some(vec!["a".into(), "b".into()]));
        assert_eq!(k("PING"), Some(vec![]));
        assert_eq!(k("BLPOP a b 0"), Some(vec!["a".into(), "b".into()]));
        assert_eq!(k("GEORADIUS k 0 0 1 km STORE a STORE b"), None, "ambiguous keyword");
        assert_eq!(k("MIGRATE h 1 k 0 5"), None, "incomplete key spec");
        assert_eq!(k("SPUBLISH chan msg"), Some(vec![]), "not_key spec");
        let a: Vec<Bytes> = vec![
            Bytes::from_static(b"XREAD"),
            Bytes::from_static(b"STREAMS\0x"),
            Bytes::from_static(b"secret"),
            Bytes::from_static(b"0"),
        ];
        match t.lookup(&a).unwrap().keys(&a) {
            Keys::Known(k) => assert_eq!(k, vec![&b"secret"[..]], "keywords compare as C strings"),
            Keys::Unresolvable => panic!("resolvable"),
        }
        assert!(matches!(t.resolve(&args("CLIENT nosuch")), Lookup::UnknownSubcommand(_)));
        assert!(matches!(t.resolve(&[Bytes::from_static(b"GET\0x")]), Lookup::Unknown));
    }
}
