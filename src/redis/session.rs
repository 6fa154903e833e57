//! One Redis client connection: TLS from the first byte → local authentication (AUTH,
//! HELLO AUTH, or a mapped client certificate) → an upstream connection logged in with the
//! proxy's credentials for that user → the command loop: requests parsed in batches, each
//! allowed, denied or rewritten by policy, allowed ones forwarded as their original bytes in one
//! write per batch; replies framed back and interleaved with the proxy's own in order.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::RedisListener;
use super::codec::{self, ParsedRequest, ProtocolError, frame_reply};
use super::command::CommandTable;
use super::replies::{Effect, Out, Replies, Slot, SubKind};
use crate::app::Shared;
use crate::audit::{Event, Record};
use crate::config::{ListenerTls, RedisListener as RedisConfig, SecretRef};
use crate::metrics::{ConnOutcome, Protocol};
use crate::net::listener::Accepted;
use crate::net::stream::Stream;
use crate::net::upstream::{UpstreamError, dial};
use crate::policy::redis_acl::{AclRules, Decision, Keys};

const REDIS: Protocol = Protocol::Redis;
const READ_BUF: usize = 64 * 1024;
/// Commands a client may send before authenticating (Redis has none; its per-request caps apply too).
const PREAUTH_MAX_COMMANDS: u32 = 32;

const TLS_REQUIRED: &[u8] = b"-ERR TLS is required by this server (use rediss:// or --tls)\r\n";
const MAX_CLIENTS: &[u8] = b"-ERR max number of clients reached\r\n";
const NOAUTH: &[u8] = b"-NOAUTH Authentication required.\r\n";
const NOAUTH_HELLO: &[u8] = b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time\r\n";
const WRONGPASS: &[u8] = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n";
const LOCKED_OUT: &[u8] = b"-ERR too many failed authentication attempts\r\n";
const UPSTREAM_DOWN: &[u8] = b"-ERR upstream unavailable\r\n";
const EXECABORT: &[u8] = b"-EXECABORT Transaction discarded because of previous errors.\r\n";
const OK: &[u8] = b"+OK\r\n";

/// Who the client is, once authenticated.
#[derive(Debug, Clone)]
struct Identity {
    name: String,
    rules: AclRules,
    up_user: Option<String>,
    up_pass: Option<SecretRef>,
}

impl Identity {
    fn upstream_creds(&self) -> (Option<String>, Option<SecretRef>) {
        (self.up_user.clone(), self.up_pass.clone())
    }
}

/// `CLIENT REPLY` state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplyMode {
    On,
    Off,
    Skip,
}

/// What goes upstream for one batch.
enum Piece {
    Raw(Range<usize>),
    Owned(Vec<u8>),
}

struct Session {
    l: Arc<RedisListener>,
    shared: Arc<Shared>,
    cfg: Arc<RedisConfig>,
    peer: SocketAddr,
    id: String,
    tls_version: &'static str,
    client_cert: Option<String>,
    identity: Option<Identity>,
    ever_authenticated: bool,
    /// The credentials the upstream connection is logged in with (None: not logged in).
    upstream_creds: Option<(Option<String>, Option<SecretRef>)>,
    commands: Arc<CommandTable>,
    replies: Replies,
    in_multi: bool,
    multi_dirty: bool,
    reply_mode: ReplyMode,
    preauth_commands: u32,
    /// The effect of the next forwarded command's reply (RESET, HELLO <v>).
    next_effect: Effect,
    /// Stop reading the client; end once every reply is out.
    quitting: bool,
    up_bytes: u64,
    down_bytes: u64,
}

fn lower(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_ascii_lowercase()
}

fn error_line(msg: &str) -> Bytes {
    Bytes::from(format!("{msg}\r\n"))
}

/// Handles one accepted connection.
pub async fn handle(acc: Accepted, l: Arc<RedisListener>, shared: Arc<Shared>) {
    let Accepted { tcp, peer, session, admission } = acc;
    let cfg = l.config();
    let commands = l.commands();
    let mut s = Session {
        l,
        shared: shared.clone(),
        cfg,
        peer,
        id: session,
        tls_version: "none",
        client_cert: None,
        identity: None,
        ever_authenticated: false,
        upstream_creds: None,
        commands,
        replies: Replies::default(),
        in_multi: false,
        multi_dirty: false,
        reply_mode: ReplyMode::On,
        preauth_commands: 0,
        next_effect: Effect::None,
        quitting: false,
        up_bytes: 0,
        down_bytes: 0,
    };
    let started = Instant::now();
    let limit = shared.config().limits.handshake_timeout;
    let client = tokio::select! {
        r = tokio::time::timeout(limit, s.accept(tcp, admission.is_ok())) => match r {
            Ok(Ok(c)) => c,
            Ok(Err(outcome)) => { shared.metrics.connection(&s.cfg.name, REDIS, outcome); return; }
            Err(_) => {
                shared.metrics.connection(&s.cfg.name, REDIS, ConnOutcome::Timeout);
                s.audit(Event::ConnRejected, "refused", Some("login_timeout"));
                return;
            }
        },
        _ = shared.kill.cancelled() => return,
    };
    let outcome = s.run(client, Instant::now() + limit).await;
    let (bin, bout) = shared.metrics.bytes(&s.cfg.name);
    bin.inc_by(s.up_bytes);
    bout.inc_by(s.down_bytes);
    shared.metrics.connection(&s.cfg.name, REDIS, outcome);
    if s.ever_authenticated {
        let mut r = s.record(Event::SessionEnd);
        r.outcome = Some(outcome.as_str());
        r.duration_ms = Some(started.elapsed().as_millis() as u64);
        r.bytes_in = Some(s.up_bytes);
        r.bytes_out = Some(s.down_bytes);
        r.emit();
    }
    drop(admission);
}

async fn read_opt<S: AsyncRead + Unpin>(s: &mut Option<S>, buf: &mut BytesMut) -> std::io::Result<usize> {
    match s {
        Some(s) => {
            buf.reserve(READ_BUF);
            s.read_buf(buf).await
        }
        None => std::future::pending().await,
    }
}

impl Session {
    fn record(&self, event: Event) -> Record<'_> {
        let mut r = Record::new(event);
        r.listener = Some(&self.cfg.name);
        r.protocol = Some(REDIS.as_str());
        r.session = Some(&self.id);
        r.peer = Some(self.peer);
        r.tls_version = Some(self.tls_version);
        r.client_cert = self.client_cert.as_deref();
        r.user = self.identity.as_ref().map(|i| i.name.as_str());
        r.upstream_user = self.upstream_creds.as_ref().and_then(|c| c.0.as_deref());
        r
    }

    fn audit(&self, event: Event, outcome: &'static str, reason: Option<&str>) {
        let mut r = self.record(event);
        r.outcome = Some(outcome);
        r.reason = reason;
        r.emit();
    }

    /// TLS (from the first byte), admission answers, and a certificate identity if one maps.
    async fn accept(&mut self, tcp: TcpStream, admitted: bool) -> Result<Stream, ConnOutcome> {
        let mut first = [0u8; 1];
        match tcp.peek(&mut first).await {
            Ok(0) | Err(_) => return Err(ConnOutcome::Closed),
            Ok(_) => {}
        }
        let mut io = if self.cfg.tls == ListenerTls::Required {
            if first[0] != 0x16 {
                let mut tcp = tcp;
                let _ = tcp.write_all(TLS_REQUIRED).await;
                let _ = tcp.shutdown().await;
                self.shared.metrics.tls_handshake(&self.cfg.name, "none", false);
                self.audit(Event::ConnRejected, "refused", Some("plaintext"));
                return Err(ConnOutcome::TlsFailed);
            }
            let served = self.shared.tls.current();
            match TlsAcceptor::from(served.plain.clone()).accept(tcp).await {
                Ok(tls) => {
                    self.tls_version = crate::net::tls::version_label(tls.get_ref().1.protocol_version());
                    self.shared.metrics.tls_handshake(&self.cfg.name, self.tls_version, true);
                    Stream::Server(Box::new(tls))
                }
                Err(e) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    self.shared.metrics.tls_handshake(&self.cfg.name, "none", false);
                    self.audit(Event::ConnRejected, "refused", Some("tls_handshake_failed"));
                    return Err(ConnOutcome::TlsFailed);
                }
            }
        } else {
            Stream::Plain(tcp)
        };
        if !admitted {
            let _ = io.write_all(MAX_CLIENTS).await;
            let _ = io.shutdown().await;
            self.audit(Event::ConnRejected, "refused", Some("connection_limit"));
            return Err(ConnOutcome::LimitReached);
        }
        let subjects = match &io {
            Stream::Server(t) => t
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(crate::net::tls::cert_subjects)
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        self.client_cert = subjects.iter().find(|s| s.starts_with("CN=")).cloned();
        if !subjects.is_empty() && !self.shared.lockout.is_locked(self.peer.ip()) {
            let users = self.l.users();
            if let Some(u) = users.by_cert_subjects(subjects.iter().map(String::as_str)) {
                let id = self.identity_for(u);
                self.identity = Some(id);
                self.ever_authenticated = true;
                self.shared.metrics.auth_attempt(&self.cfg.name, REDIS, "cert", true);
                self.audit(Event::AuthOk, "ok", Some("cert"));
            }
        }
        Ok(io)
    }

    fn identity_for(&self, u: &crate::auth::User) -> Identity {
        Identity {
            name: u.name.clone(),
            rules: u.redis_rules.clone().unwrap_or_else(|| self.cfg.default_rules.clone()),
            up_user: u.redis_upstream_user.clone().or_else(|| self.cfg.upstream_user.clone()),
            up_pass: u.redis_upstream_password.clone().or_else(|| self.cfg.upstream_password.clone()),
        }
    }

    /// Verifies a password locally (never forwarded). Err is the reply line.
    async fn authenticate(&mut self, user: &[u8], password: &[u8]) -> Result<Identity, Bytes> {
        let ip = self.peer.ip();
        if self.shared.lockout.is_locked(ip) {
            self.audit(Event::ConnRejected, "refused", Some("locked_out"));
            return Err(Bytes::from_static(LOCKED_OUT));
        }
        let name = String::from_utf8_lossy(user).into_owned();
        let users = self.l.users();
        let found = users.get(&name).and_then(|u| u.redis_argon2.as_ref().map(|phc| (u, phc)));
        let ok = match found {
            Some((_, phc)) => self.l.argon.verify(&name, phc, password).await,
            None => {
                self.l.argon.burn(password).await;
                false
            }
        };
        match (ok, found) {
            (true, Some((u, _))) => {
                let id = self.identity_for(u);
                self.shared.metrics.auth_attempt(&self.cfg.name, REDIS, "password", true);
                let mut r = self.record(Event::AuthOk);
                r.user = Some(&name);
                r.outcome = Some("ok");
                r.reason = Some("password");
                r.emit();
                Ok(id)
            }
            _ => {
                self.shared.metrics.auth_attempt(&self.cfg.name, REDIS, "password", false);
                if self.shared.lockout.record_failure(ip) {
                    self.shared.metrics.lockout();
                    self.audit(Event::Lockout, "locked_out", Some("too_many_failures"));
                }
                let mut r = self.record(Event::AuthFailed);
                r.user = Some(&name);
                r.outcome = Some("refused");
                r.reason = Some("bad_credentials");
                r.emit();
                Err(Bytes::from_static(WRONGPASS))
            }
        }
    }

    /// Opens the upstream connection and logs in with `creds` (before any client traffic).
    async fn connect_upstream(&mut self, creds: &(Option<String>, Option<SecretRef>)) -> Result<Stream, UpstreamError> {
        let limit = self.shared.config().limits.upstream_connect_timeout;
        let t = Instant::now();
        let res = tokio::time::timeout(limit, async {
            let tcp = dial(&self.cfg.upstream, limit).await?;
            let mut io = match self.l.upstream_tls() {
                Some(tls) => tls.connect(tcp).await?,
                None => Stream::Plain(tcp),
            };
            let mut buf = BytesMut::new();
            if let Some(pw) = &creds.1 {
                let pw = pw.read().map_err(UpstreamError::Refused)?;
                let cmd = match &creds.0 {
                    Some(u) => codec::encode_command(&[b"AUTH", u.as_bytes(), pw.expose().as_bytes()]),
                    None => codec::encode_command(&[b"AUTH", pw.expose().as_bytes()]),
                };
                io.write_all(&cmd).await.map_err(UpstreamError::Connect)?;
                io.flush().await.map_err(UpstreamError::Connect)?;
                let reply = read_one_reply(&mut io, &mut buf).await?;
                if reply.as_ref() != OK {
                    return Err(UpstreamError::Refused(String::from_utf8_lossy(&reply).trim_end().to_string()));
                }
            }
            if self.commands.fallback {
                io.write_all(b"*1\r\n$7\r\nCOMMAND\r\n").await.map_err(UpstreamError::Connect)?;
                io.flush().await.map_err(UpstreamError::Connect)?;
                let reply = read_one_reply(&mut io, &mut buf).await?;
                match CommandTable::from_reply(&reply) {
                    Some(t) => {
                        let t = Arc::new(t);
                        self.l.set_commands((*t).clone());
                        self.commands = t;
                    }
                    None => tracing::warn!("upstream COMMAND reply unusable; keeping the built-in command table"),
                }
            }
            Ok(io)
        })
        .await
        .unwrap_or(Err(UpstreamError::Timeout(limit)));
        self.shared.metrics.upstream_connect(&self.cfg.name, t.elapsed().as_secs_f64(), res.is_ok());
        if let Err(e) = &res {
            tracing::warn!(error = %e, "upstream login failed");
            self.audit(Event::ConnRejected, "error", Some("upstream_unavailable"));
        }
        res
    }

    /// Pushes a slot through the CLIENT REPLY filter.
    fn expect(&mut self, slot: Slot) {
        match self.reply_mode {
            ReplyMode::On => self.replies.push(slot),
            ReplyMode::Off => {}
            ReplyMode::Skip => self.reply_mode = ReplyMode::On,
        }
    }

    fn local(&mut self, b: impl Into<Bytes>) {
        self.expect(Slot::Local(b.into()));
    }

    /// Switches to `id`, logging the upstream in with its credentials: directly on a new
    /// connection, or in the stream (its reply handled by `slot_for_auth`) on an existing one.
    async fn become_user(
        &mut self,
        id: Identity,
        up: &mut Option<Stream>,
        pieces: &mut Vec<Piece>,
        reply_to_client: bool,
    ) -> bool {
        let creds = id.upstream_creds();
        if up.is_none() {
            match self.connect_upstream(&creds).await {
                Ok(io) => *up = Some(io),
                Err(_) => {
                    self.local(Bytes::from_static(UPSTREAM_DOWN));
                    return false;
                }
            }
            self.upstream_creds = Some(creds);
            if reply_to_client {
                self.local(Bytes::from_static(OK));
            }
        } else if self.upstream_creds.as_ref() == Some(&creds) {
            if reply_to_client {
                self.local(Bytes::from_static(OK));
            }
        } else {
            let pw = match creds.1.as_ref().map(|p| p.read()) {
                Some(Ok(p)) => Some(p),
                None => None,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "upstream credentials unreadable");
                    self.local(Bytes::from_static(UPSTREAM_DOWN));
                    return false;
                }
            };
            let cmd = match (&creds.0, &pw) {
                (Some(u), Some(p)) => codec::encode_command(&[b"AUTH", u.as_bytes(), p.expose().as_bytes()]),
                (None, Some(p)) => codec::encode_command(&[b"AUTH", p.expose().as_bytes()]),
                // No credentials: the upstream has no auth; nothing to switch.
                _ => Vec::new(),
            };
            if cmd.is_empty() {
                if reply_to_client {
                    self.local(Bytes::from_static(OK));
                }
            } else {
                pieces.push(Piece::Owned(cmd));
                if reply_to_client {
                    self.expect(Slot::Forward { n: 1, effect: Effect::None });
                } else {
                    self.expect(Slot::Swallow(1));
                }
            }
            self.upstream_creds = Some(creds);
        }
        self.identity = Some(id);
        self.ever_authenticated = true;
        true
    }

    async fn handle_auth(&mut self, args: &[Bytes], up: &mut Option<Stream>, pieces: &mut Vec<Piece>) {
        let (user, pass): (&[u8], &[u8]) = match args.len() {
            2 => (b"default", &args[1]),
            3 => (&args[1], &args[2]),
            1 => {
                self.local(error_line("-ERR wrong number of arguments for 'auth' command"));
                return;
            }
            _ => {
                self.local(error_line("-ERR syntax error"));
                return;
            }
        };
        match self.authenticate(user, pass).await {
            Ok(id) => {
                self.become_user(id, up, pieces, true).await;
            }
            Err(reply) => self.local(reply),
        }
    }

    async fn handle_hello(&mut self, args: &[Bytes], up: &mut Option<Stream>, pieces: &mut Vec<Piece>) {
        let mut ver: Option<u8> = None;
        if args.len() >= 2 {
            match std::str::from_utf8(&args[1]).ok().and_then(|s| s.parse::<i64>().ok()) {
                None => {
                    self.local(error_line("-ERR Protocol version is not an integer or out of range"));
                    return;
                }
                Some(v) if v != 2 && v != 3 => {
                    self.local(error_line("-NOPROTO unsupported protocol version"));
                    return;
                }
                Some(v) => ver = Some(v as u8),
            }
        }
        let mut auth: Option<(Bytes, Bytes)> = None;
        let mut setname: Option<Bytes> = None;
        let mut j = 2;
        while j < args.len() {
            let more = args.len() - 1 - j;
            let opt = lower(&args[j]);
            if opt == "auth" && more >= 2 {
                auth = Some((args[j + 1].clone(), args[j + 2].clone()));
                j += 3;
            } else if opt == "setname" && more >= 1 {
                setname = Some(args[j + 1].clone());
                j += 2;
            } else {
                let shown = String::from_utf8_lossy(&args[j]).into_owned();
                self.local(error_line(&format!("-ERR Syntax error in HELLO option '{shown}'")));
                return;
            }
        }
        if let Some((u, p)) = auth {
            match self.authenticate(&u, &p).await {
                Ok(id) => {
                    if !self.become_user(id, up, pieces, false).await {
                        return;
                    }
                }
                Err(reply) => {
                    self.local(reply);
                    return;
                }
            }
        }
        if self.identity.is_none() {
            self.local(Bytes::from_static(NOAUTH_HELLO));
            return;
        }
        let mut cmd: Vec<&[u8]> = vec![b"HELLO"];
        let v = ver.map(|v| v.to_string());
        if let Some(v) = &v {
            cmd.push(v.as_bytes());
        }
        if let Some(n) = &setname {
            cmd.push(b"SETNAME");
            cmd.push(n);
        }
        pieces.push(Piece::Owned(codec::encode_command(&cmd)));
        self.expect(Slot::Forward { n: 1, effect: ver.map_or(Effect::None, Effect::Hello) });
    }

    fn deny(&mut self, reply: Bytes, command: &str, key: Option<&[u8]>) {
        self.shared.metrics.redis_command(&self.cfg.name, Some(command));
        let key_text = key.map(|k| {
            if self.cfg.redact_keys {
                use hmac::{Hmac, KeyInit, Mac};
                let mut m = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&self.l.key_hash_secret)
                    .expect("hmac takes any key length");
                m.update(k);
                let d = m.finalize().into_bytes();
                format!("hmac:{}", d.iter().take(12).map(|b| format!("{b:02x}")).collect::<String>())
            } else {
                String::from_utf8_lossy(k).into_owned()
            }
        });
        let mut r = self.record(Event::RedisDenied);
        r.outcome = Some("denied");
        r.command = Some(command);
        r.key = key_text.as_deref();
        r.emit();
        if self.in_multi {
            self.multi_dirty = true;
        }
        self.local(reply);
    }

    /// Decides one authenticated request. Returns true when its raw bytes go upstream.
    fn route_command(&mut self, args: &[Bytes], name: &str, pieces: &mut Vec<Piece>) -> bool {
        let commands = self.commands.clone();
        let Some(info) = commands.lookup(args) else {
            if commands.fallback {
                let reply = error_line(&format!("-NOPERM this user has no permissions to run the '{name}' command"));
                self.deny(reply, "unknown", None);
                return false;
            }
            // Unknown to the upstream itself: it answers "unknown command" without running anything.
            self.expect(Slot::Forward { n: 1, effect: Effect::None });
            return true;
        };
        if !info.arity_ok(args.len()) {
            if self.in_multi {
                self.multi_dirty = true;
            }
            self.local(error_line(&format!("-ERR wrong number of arguments for '{}' command", info.name)));
            return false;
        }
        let Some(id) = self.identity.as_ref() else { return false };
        let first_arg = if info.name.contains('|') { None } else { args.get(1).map(|a| lower(a)) };
        let keys = if id.rules.restricts_keys() { info.keys(args) } else { Keys::Known(Vec::new()) };
        let first_key = match &keys {
            Keys::Known(k) => k.first().map(|k| k.to_vec()),
            Keys::Unresolvable => None,
        };
        let decision = id.rules.decide(&info.acl_ref(first_arg.as_deref()), &keys);
        if info.name == "monitor" {
            // MONITOR would stream every client's commands (values included) to this one.
            let reply = error_line("-NOPERM this user has no permissions to run the 'monitor' command");
            self.deny(reply, "monitor", None);
            return false;
        }
        if let Decision::Deny(d) = decision {
            let reply = error_line(&d.message());
            let cmd_name = info.name.clone();
            self.deny(reply, &cmd_name, first_key.as_deref());
            return false;
        }
        let argc = args.len() as u32;
        match info.name.as_str() {
            "multi" => {
                self.in_multi = true;
                self.multi_dirty = false;
            }
            "exec" if self.multi_dirty => {
                self.in_multi = false;
                self.multi_dirty = false;
                pieces.push(Piece::Owned(b"*1\r\n$7\r\nDISCARD\r\n".to_vec()));
                self.expect(Slot::Swallow(1));
                self.local(Bytes::from_static(EXECABORT));
                return false;
            }
            "exec" | "discard" => {
                self.in_multi = false;
                self.multi_dirty = false;
            }
            "client|reply" => {
                match args.get(2).map(|a| lower(a)).as_deref() {
                    Some("on") => {
                        self.reply_mode = ReplyMode::On;
                        self.replies.push(Slot::Forward { n: 1, effect: Effect::None });
                    }
                    Some("off") => self.reply_mode = ReplyMode::Off,
                    Some("skip") => {
                        if self.reply_mode == ReplyMode::On {
                            self.reply_mode = ReplyMode::Skip;
                        }
                    }
                    // Anything else: Redis answers with a syntax error.
                    _ => self.expect(Slot::Forward { n: 1, effect: Effect::None }),
                }
                return true;
            }
            "subscribe" | "psubscribe" | "ssubscribe" if !self.in_multi => {
                self.expect(Slot::Forward { n: argc - 1, effect: Effect::None });
                return true;
            }
            "unsubscribe" | "punsubscribe" | "sunsubscribe" if !self.in_multi => {
                if argc > 1 {
                    self.expect(Slot::Forward { n: argc - 1, effect: Effect::None });
                } else {
                    let kind = match info.name.as_str() {
                        "unsubscribe" => SubKind::Channel,
                        "punsubscribe" => SubKind::Pattern,
                        _ => SubKind::Shard,
                    };
                    self.expect(Slot::UnsubAll(kind));
                }
                return true;
            }
            _ => {}
        }
        let effect = std::mem::replace(&mut self.next_effect, Effect::None);
        self.expect(Slot::Forward { n: 1, effect });
        true
    }

    /// Handles every complete request in `cbuf`; returns what to send upstream.
    async fn on_client(&mut self, cbuf: &mut BytesMut, up: &mut Option<Stream>) -> (Bytes, Vec<Piece>, u64) {
        let mut reqs: Vec<ParsedRequest> = Vec::new();
        let mut at = 0;
        let mut perr: Option<ProtocolError> = None;
        // Requests after an AUTH in the same batch are authenticated: parse with the caps of
        // the state at the start of the batch (stricter when unauthenticated), as Redis does.
        let unauth = self.identity.is_none();
        loop {
            match codec::parse_request(cbuf, at, &self.cfg.limits, unauth) {
                Ok(Some(r)) => {
                    at = r.raw.end;
                    reqs.push(r);
                }
                Ok(None) => break,
                Err(e) => {
                    perr = Some(e);
                    break;
                }
            }
        }
        let batch = cbuf.split_to(at).freeze();
        let mut pieces: Vec<Piece> = Vec::new();
        let mut allowed = 0u64;
        for req in &reqs {
            if self.quitting {
                break;
            }
            let args = codec::resolve(&batch, req);
            let Some(first) = args.first() else { continue };
            let name = lower(first);
            if self.identity.is_none() {
                self.preauth_commands += 1;
                if self.preauth_commands > PREAUTH_MAX_COMMANDS {
                    self.local(ProtocolError("too many commands before authentication".into()).reply());
                    self.quitting = true;
                    break;
                }
                match name.as_str() {
                    "auth" => self.handle_auth(&args, up, &mut pieces).await,
                    "hello" => self.handle_hello(&args, up, &mut pieces).await,
                    "quit" => {
                        self.local(Bytes::from_static(OK));
                        self.quitting = true;
                    }
                    "reset" => self.local(Bytes::from_static(b"+RESET\r\n")),
                    _ => self.local(Bytes::from_static(NOAUTH)),
                }
                continue;
            }
            match name.as_str() {
                "auth" => self.handle_auth(&args, up, &mut pieces).await,
                "hello" if args.iter().skip(2).any(|a| a.eq_ignore_ascii_case(b"auth")) => {
                    self.handle_hello(&args, up, &mut pieces).await
                }
                _ => {
                    if up.is_none() {
                        // A certificate identity, or an upstream lost earlier: log in now.
                        let creds = self.identity.as_ref().map(|i| i.upstream_creds()).unwrap_or_default();
                        match self.connect_upstream(&creds).await {
                            Ok(io) => {
                                *up = Some(io);
                                self.upstream_creds = Some(creds);
                            }
                            Err(_) => {
                                self.local(Bytes::from_static(UPSTREAM_DOWN));
                                continue;
                            }
                        }
                    }
                    let effect_reset = name == "reset";
                    let hello_ver = if name == "hello" {
                        args.get(1).and_then(|v| std::str::from_utf8(v).ok()).and_then(|v| v.parse::<u8>().ok())
                    } else {
                        None
                    };
                    // RESET / HELLO <v> change the reply stream once their reply is through.
                    self.next_effect =
                        if effect_reset { Effect::Reset } else { hello_ver.map_or(Effect::None, Effect::Hello) };
                    let forwarded = self.route_command(&args, &name, &mut pieces);
                    self.next_effect = Effect::None;
                    if forwarded {
                        allowed += 1;
                        if effect_reset {
                            self.identity = None;
                            self.upstream_creds = None;
                            self.in_multi = false;
                            self.multi_dirty = false;
                            self.reply_mode = ReplyMode::On;
                            self.preauth_commands = 0;
                        }
                        if name == "quit" {
                            self.quitting = true;
                        }
                        match pieces.last_mut() {
                            Some(Piece::Raw(r)) if r.end == req.raw.start => r.end = req.raw.end,
                            _ => pieces.push(Piece::Raw(req.raw.clone())),
                        }
                    }
                }
            }
        }
        self.shared.metrics.redis_allowed(&self.cfg.name, allowed);
        if let Some(e) = perr {
            tracing::debug!(error = %e, "protocol error from client");
            self.local(e.reply());
            self.quitting = true;
            self.audit(Event::ConnRejected, "refused", Some("protocol_error"));
        }
        (batch, pieces, allowed)
    }

    async fn run(&mut self, mut client: Stream, auth_deadline: Instant) -> ConnOutcome {
        let mut up: Option<Stream> = None;
        let mut cbuf = BytesMut::with_capacity(READ_BUF);
        let mut ubuf = BytesMut::with_capacity(READ_BUF);
        let kill = self.shared.kill.clone();
        let deadline = tokio::time::sleep_until(auth_deadline.into());
        tokio::pin!(deadline);
        loop {
            if self.quitting && self.replies.idle() {
                let _ = client.shutdown().await;
                return ConnOutcome::Closed;
            }
            tokio::select! {
                r = client.read_buf(&mut cbuf), if !self.quitting => {
                    match r {
                        Ok(0) | Err(_) => return ConnOutcome::Closed,
                        Ok(_) => {}
                    }
                    if cbuf.capacity() - cbuf.len() < READ_BUF / 4 {
                        cbuf.reserve(READ_BUF);
                    }
                    let (batch, pieces, _) = self.on_client(&mut cbuf, &mut up).await;
                    if let Some(u) = up.as_mut()
                        && !pieces.is_empty()
                    {
                        let mut sent = 0u64;
                        for p in &pieces {
                            let r = match p {
                                Piece::Raw(r) => { sent += r.len() as u64; u.write_all(&batch[r.clone()]).await }
                                Piece::Owned(v) => u.write_all(v).await,
                            };
                            if r.is_err() {
                                return ConnOutcome::UpstreamFailed;
                            }
                        }
                        if u.flush().await.is_err() {
                            return ConnOutcome::UpstreamFailed;
                        }
                        self.up_bytes += sent;
                    }
                    let mut out = Vec::new();
                    self.replies.drain_locals(&mut out);
                    if self.write_out(&mut client, &Bytes::new(), out).await.is_err() {
                        return ConnOutcome::Closed;
                    }
                }
                r = read_opt(&mut up, &mut ubuf) => {
                    match r {
                        Ok(0) | Err(_) => {
                            // The upstream closed (QUIT, or it went away): what it sent is out; end.
                            let _ = client.shutdown().await;
                            return if self.quitting { ConnOutcome::Closed } else { ConnOutcome::UpstreamFailed };
                        }
                        Ok(_) => {}
                    }
                    let mut out = Vec::new();
                    let used = match self.replies.on_upstream(&ubuf, &mut out) {
                        Ok(n) => n,
                        Err(e) => {
                            tracing::warn!(error = %e, "unparseable upstream reply");
                            return ConnOutcome::UpstreamFailed;
                        }
                    };
                    let chunk = ubuf.split_to(used).freeze();
                    if self.write_out(&mut client, &chunk, out).await.is_err() {
                        return ConnOutcome::Closed;
                    }
                }
                _ = &mut deadline, if !self.ever_authenticated => {
                    self.audit(Event::ConnRejected, "refused", Some("login_timeout"));
                    return ConnOutcome::Timeout;
                }
                _ = kill.cancelled() => return ConnOutcome::Drained,
            }
        }
    }

    async fn write_out(&mut self, client: &mut Stream, chunk: &Bytes, out: Vec<Out>) -> std::io::Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let mut pending: Option<Range<usize>> = None;
        for o in out {
            match o {
                Out::Upstream(r) => match &mut pending {
                    Some(p) if p.end == r.start => p.end = r.end,
                    _ => {
                        if let Some(p) = pending.take() {
                            client.write_all(&chunk[p.clone()]).await?;
                            self.down_bytes += p.len() as u64;
                        }
                        pending = Some(r);
                    }
                },
                Out::Local(b) => {
                    if let Some(p) = pending.take() {
                        client.write_all(&chunk[p.clone()]).await?;
                        self.down_bytes += p.len() as u64;
                    }
                    client.write_all(&b).await?;
                }
            }
        }
        if let Some(p) = pending.take() {
            client.write_all(&chunk[p.clone()]).await?;
            self.down_bytes += p.len() as u64;
        }
        client.flush().await
    }
}

/// Reads exactly one reply (RESP2) during the proxy's own login exchange.
async fn read_one_reply<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
) -> Result<Bytes, UpstreamError> {
    loop {
        if let Some((len, _)) = frame_reply(buf, false).map_err(UpstreamError::Protocol)? {
            return Ok(buf.split_to(len).freeze());
        }
        buf.reserve(READ_BUF);
        let n = tokio::time::timeout(Duration::from_secs(30), io.read_buf(buf))
            .await
            .map_err(|_| UpstreamError::Timeout(Duration::from_secs(30)))?
            .map_err(UpstreamError::Connect)?;
        if n == 0 {
            return Err(UpstreamError::Protocol("upstream closed during login".into()));
        }
    }
}
