//! Authentication on a Redis listener: `AUTH`, `HELLO … AUTH`, the certificate identity, and
//! the upstream connection the proxy opens and logs in with its own credentials for that user.
//! The client's credentials never go upstream.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::codec::{self, frame_reply};
use super::command::{CommandTable, cstr_lower};
use super::replies::{Effect, Slot};
use super::session::{Identity, Piece, Session, error_line};
use crate::audit::Event;
use crate::config::SecretRef;
use crate::metrics::Protocol;
use crate::net::stream::Stream;
use crate::net::upstream::{UpstreamError, dial};

const REDIS: Protocol = Protocol::Redis;
pub(super) const WRONGPASS: &[u8] = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n";
const LOCKED_OUT: &[u8] = b"-ERR too many failed authentication attempts\r\n";
const BUSY: &[u8] = b"-ERR authentication is busy, try again\r\n";
pub(super) const UPSTREAM_DOWN: &[u8] = b"-ERR upstream unavailable\r\n";
pub(super) const NOAUTH_HELLO: &[u8] = b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time\r\n";
pub(super) const OK: &[u8] = b"+OK\r\n";
/// How long a password check may wait for a place in the Argon2 pool.
const ARGON_QUEUE_WAIT: Duration = Duration::from_secs(5);

use super::codec::strict_int;

/// Redis's client-name rule: no spaces, newlines or other characters outside '!'..'~'.
pub(super) fn valid_client_name(n: &[u8]) -> bool {
    n.iter().all(|c| (b'!'..=b'~').contains(c))
}

impl Session {
    /// Verifies a password locally (never forwarded). Err is the reply line.
    pub(super) async fn authenticate(&mut self, user: &[u8], password: &[u8]) -> Result<Identity, Bytes> {
        let ip = self.peer.ip();
        if self.shared.lockout.is_locked(ip) {
            self.audit(Event::ConnRejected, "refused", Some("locked_out"));
            return Err(Bytes::from_static(LOCKED_OUT));
        }
        let name = String::from_utf8_lossy(user).into_owned();
        let users = self.l.users();
        let found = users.get(&name).filter(|u| !u.redis_argon2.is_empty()).map(|u| (u, &u.redis_argon2));
        let check = async {
            match found {
                Some((_, phcs)) => {
                    // Two hashes while a rotation is in progress: either password works.
                    for phc in phcs {
                        if self.l.argon.verify(&name, phc, password).await {
                            return true;
                        }
                    }
                    false
                }
                None => {
                    self.l.argon.burn(password).await;
                    false
                }
            }
        };
        let Ok(ok) = tokio::time::timeout(ARGON_QUEUE_WAIT, check).await else {
            return Err(Bytes::from_static(BUSY));
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

    /// The identity a users-file entry gives.
    pub(super) fn identity_for(&self, u: &crate::auth::User) -> Identity {
        Identity {
            name: u.name.clone(),
            rules: u.redis_rules.clone().unwrap_or_else(|| self.cfg.default_rules.clone()),
            up_user: u.redis_upstream_user.clone().or_else(|| self.cfg.upstream_user.clone()),
            up_pass: u.redis_upstream_password.clone().or_else(|| self.cfg.upstream_password.clone()),
        }
    }

    /// Opens the upstream connection and logs in with `creds` (before any client traffic);
    /// fetches the upstream's command table while the built-in one is in use; with `hello`,
    /// switches it to that protocol version and returns HELLO's reply.
    pub(super) async fn connect_upstream(
        &mut self,
        creds: &(Option<String>, Option<SecretRef>),
        hello: Option<u8>,
    ) -> Result<(Stream, Option<Bytes>), UpstreamError> {
        let limit = self.shared.config().limits.upstream_connect_timeout;
        let t = Instant::now();
        // The generation first, then the config it dials: a table fetched from an upstream that a
        // reload since replaced is not installed.
        let generation = self.l.command_generation();
        let (cfg, tls) = self.l.upstream_target();
        let upstream = cfg.upstream.clone();
        let res = tokio::time::timeout(limit, async {
            let tcp = dial(&upstream, limit).await?;
            let mut io = match tls {
                Some(tls) => tls.connect(tcp).await?,
                None => Stream::Plain(tcp),
            };
            let mut buf = BytesMut::new();
            if let (user, Some(secret)) = creds {
                // Rotation window: the password was changed at Redis and the secret file follows.
                // WRONGPASS waits (within the connect deadline) for the file to change.
                let wait_until = tokio::time::Instant::now() + limit.saturating_sub(Duration::from_millis(500));
                let mut pw = secret.read().map_err(UpstreamError::Refused)?;
                loop {
                    io.write_all(&auth_line(user.as_deref(), &pw)).await.map_err(UpstreamError::Connect)?;
                    io.flush().await.map_err(UpstreamError::Connect)?;
                    let reply = read_one_reply(&mut io, &mut buf, false).await?;
                    if reply.as_ref() == OK {
                        break;
                    }
                    let refused = || UpstreamError::Refused(String::from_utf8_lossy(&reply).trim_end().to_string());
                    if !reply.starts_with(b"-WRONGPASS") {
                        return Err(refused());
                    }
                    match secret.changed_from(&pw, wait_until).await {
                        Some(next) => {
                            tracing::info!("upstream refused the runtime password; retrying with the rotated one");
                            pw = next;
                        }
                        None => return Err(refused()),
                    }
                }
            }
            // One fetch at a time: sessions connecting together take the first one's table, and
            // those that waited for one that failed keep the built-in table rather than try again.
            // A table from before a reload (another upstream's) is fetched again too.
            let stale = |s: &Self| s.commands.fallback || s.commands_generation != generation;
            let failures = self.l.command_fetch.failures.load(Relaxed);
            let fetch = if stale(self) { Some(self.l.command_fetch.turn.lock().await) } else { None };
            if stale(self) {
                let (g, t) = self.l.command_entry();
                if g == generation && !t.fallback {
                    (self.commands, self.commands_generation) = (t, g);
                }
            }
            if stale(self) && self.l.command_fetch.failures.load(Relaxed) == failures {
                // counted as failed unless it gets a table (an error return included)
                self.l.command_fetch.failures.fetch_add(1, Relaxed);
                io.write_all(b"*1\r\n$7\r\nCOMMAND\r\n").await.map_err(UpstreamError::Connect)?;
                io.flush().await.map_err(UpstreamError::Connect)?;
                let reply = read_one_reply(&mut io, &mut buf, false).await?;
                match CommandTable::from_reply(&reply) {
                    Some(t) => {
                        self.l.command_fetch.failures.fetch_sub(1, Relaxed);
                        // This session keeps the table of the upstream it is connected to.
                        let t = Arc::new(t);
                        if !self.l.set_commands(generation, t.clone()) {
                            tracing::info!(
                                "the listener was reloaded during the COMMAND fetch; not installing its table"
                            );
                        }
                        (self.commands, self.commands_generation) = (t, generation);
                    }
                    None => tracing::warn!("upstream COMMAND reply unusable; keeping the built-in command table"),
                }
            }
            drop(fetch);
            if self.commands_generation != generation {
                // no table of this upstream's (its fetch failed): not the old one's either
                self.adopt_commands(generation);
            }
            let mut hello_reply = None;
            if let Some(v) = hello {
                let cmd = codec::encode_command(&[b"HELLO", v.to_string().as_bytes()]);
                io.write_all(&cmd).await.map_err(UpstreamError::Connect)?;
                io.flush().await.map_err(UpstreamError::Connect)?;
                let reply = read_one_reply(&mut io, &mut buf, v == 3).await?;
                // A server without HELLO still serves RESP2: its refusal is what a client's own
                // HELLO 2 would get. Without RESP3 there is no RESP3 connection.
                if v == 3 && matches!(reply.first(), Some(b'-' | b'!')) {
                    return Err(UpstreamError::Refused(String::from_utf8_lossy(&reply).trim_end().to_string()));
                }
                hello_reply = Some(reply);
            }
            Ok((io, hello_reply))
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

    /// Opens the upstream for the current identity if there is none (a certificate identity,
    /// or an upstream lost earlier). False when it cannot be reached.
    pub(super) async fn ensure_upstream(&mut self, up: &mut Option<Stream>) -> bool {
        if up.is_some() {
            return true;
        }
        let creds = self.identity.as_ref().map(|i| i.upstream_creds()).unwrap_or_default();
        // a client that speaks RESP3 (it moved off a RESP3 shared connection) keeps speaking it
        let hello = self.replies.resp3.then_some(3);
        match self.connect_upstream(&creds, hello).await {
            Ok((mut io, _)) => {
                if !self.name_own_connection(&mut io).await {
                    return false;
                }
                *up = Some(io);
                self.upstream_creds = Some(creds);
                true
            }
            Err(_) => false,
        }
    }

    /// A client that named itself (CLIENT SETNAME) on a shared connection takes the name to its
    /// own connection, where CLIENT LIST / INFO then show it. If the upstream refuses (its ACL
    /// user may not), the connection serves unnamed. False when no whole reply came back: the
    /// connection is then out of step and must not be used.
    async fn name_own_connection(&mut self, io: &mut Stream) -> bool {
        let Some(name) = self.client_name.take() else { return true };
        let cmd = codec::encode_command(&[b"CLIENT", b"SETNAME", &name]);
        let limit = self.shared.config().limits.upstream_connect_timeout;
        let resp3 = self.replies.resp3;
        let named = tokio::time::timeout(limit, async {
            io.write_all(&cmd).await.ok()?;
            io.flush().await.ok()?;
            let mut buf = BytesMut::new();
            read_one_reply(io, &mut buf, resp3).await.ok()
        })
        .await;
        match named {
            Ok(Some(r)) if r.as_ref() == OK => true,
            Ok(Some(r)) => {
                let reply = String::from_utf8_lossy(&r).trim_end().to_string();
                tracing::warn!(%reply, "the upstream did not take the client's name");
                true
            }
            _ => {
                tracing::warn!("no reply to the client's name on its new upstream connection");
                false
            }
        }
    }

    /// True while this client's requests go to a shared upstream connection.
    pub(super) fn sharing(&self) -> bool {
        self.multiplex && !self.pinned
    }

    /// True when the link in use is alive and right for the current identity and protocol: the
    /// common case, checked without copying the credentials (`ensure_mux` does the rest).
    pub(super) fn mux_ready(&self) -> bool {
        let proto = if self.replies.resp3 { 3 } else { 2 };
        match (&self.mux, &self.identity, &self.upstream_creds) {
            (Some(m), Some(id), Some((user, pass))) => {
                m.proto == proto && m.alive() && *user == id.up_user && *pass == id.up_pass
            }
            _ => false,
        }
    }

    /// Takes the listener's table when it is of `generation`, else the built-in one.
    fn adopt_commands(&mut self, generation: u64) {
        let (g, t) = self.l.command_entry();
        self.commands = if g == generation { t } else { Arc::new(CommandTable::builtin()) };
        self.commands_generation = generation;
    }

    /// Links to the shared upstream connection for `creds`, opening one if there is none. False
    /// when it cannot be reached, or when the link in use has died with replies still owed (the
    /// session learns of that from the link).
    pub(super) async fn ensure_mux(&mut self, creds: &(Option<String>, Option<SecretRef>)) -> bool {
        // shared connections speak the protocol their clients asked for (HELLO 2 or 3)
        let proto = if self.replies.resp3 { 3 } else { 2 };
        if let Some(m) = &self.mux {
            let same = self.upstream_creds.as_ref() == Some(creds) && m.proto == proto;
            if m.outstanding > 0 {
                return m.alive() && same;
            }
            if m.alive() && same {
                return true;
            }
        }
        self.mux = None;
        // the address in force now, as the connection opened for it dials
        let upstream = self.l.config().upstream.clone();
        let mut link = self.l.mux.link(&upstream, creds, proto);
        if link.is_none() {
            // One opener at a time: clients logging in together join the first one's connection.
            let gate = self.l.mux.gate(&upstream, creds, proto);
            let failures = gate.failures.load(Relaxed);
            let _turn = gate.turn.lock().await;
            link = self.l.mux.link(&upstream, creds, proto);
            if link.is_none() {
                if gate.failures.load(Relaxed) != failures {
                    // the attempt this client waited for failed just now
                    self.audit(Event::ConnRejected, "error", Some("upstream_unavailable"));
                    return false;
                }
                match self.connect_upstream(creds, Some(proto)).await {
                    Ok((io, hello)) => {
                        self.shared.metrics.redis_multiplex(&self.cfg.name, "opened");
                        let hello = hello.unwrap_or_default();
                        let started = self.l.mux.start(&upstream, creds.clone(), proto, hello, io, self.shared.clone());
                        self.mux = Some(started);
                        self.upstream_creds = Some(creds.clone());
                        return true;
                    }
                    Err(_) => {
                        gate.failures.fetch_add(1, Relaxed);
                        return false;
                    }
                }
            }
        }
        let Some(link) = link else { return false };
        // A table from before a reload is not used on the connection opened after it.
        let generation = self.l.command_generation();
        if self.commands_generation != generation {
            self.adopt_commands(generation);
        }
        self.shared.metrics.redis_multiplex(&self.cfg.name, "joined");
        self.mux = Some(link);
        self.upstream_creds = Some(creds.clone());
        true
    }

    /// Switches to `id`. A new upstream connection logs in directly; an open one is
    /// re-authenticated in the stream, and if the upstream refuses, the session falls back to
    /// unauthenticated (fail closed). `reply_to_client`: the AUTH's own +OK goes to the client.
    pub(super) async fn become_user(
        &mut self,
        id: Identity,
        up: &mut Option<Stream>,
        pieces: &mut Vec<Piece>,
        reply_to_client: bool,
    ) -> bool {
        let creds = id.upstream_creds();
        if up.is_none() {
            let reachable = if self.sharing() {
                self.ensure_mux(&creds).await
            } else {
                let hello = self.replies.resp3.then_some(3);
                match self.connect_upstream(&creds, hello).await {
                    Ok((mut io, _)) => {
                        let in_step = self.name_own_connection(&mut io).await;
                        if in_step {
                            *up = Some(io);
                        }
                        in_step
                    }
                    Err(_) => false,
                }
            };
            if !reachable {
                self.local(Bytes::from_static(UPSTREAM_DOWN));
                return false;
            }
            if reply_to_client {
                self.local(Bytes::from_static(OK));
            }
        } else if self.upstream_creds.as_ref() == Some(&creds) {
            if reply_to_client {
                self.local(Bytes::from_static(OK));
            }
        } else {
            match auth_command(&creds) {
                Err(e) => {
                    tracing::warn!(error = %e, "upstream credentials unreadable");
                    self.local(Bytes::from_static(UPSTREAM_DOWN));
                    return false;
                }
                Ok(None) if self.upstream_creds.as_ref().is_none_or(|c| c.1.is_none()) => {
                    // No credentials before or now: the upstream has no auth; nothing to switch.
                    if reply_to_client {
                        self.local(Bytes::from_static(OK));
                    }
                }
                Ok(None) => {
                    // The upstream is logged in with credentials this user has none of: it
                    // cannot be switched down in place. Refuse rather than keep the old login.
                    tracing::warn!("user has no upstream credentials but the upstream is logged in with some");
                    self.local(Bytes::from_static(UPSTREAM_DOWN));
                    return false;
                }
                Ok(Some(cmd)) => {
                    pieces.push(Piece::Owned(cmd));
                    self.expect(Slot::Forward {
                        n: 1,
                        effect: Effect::AuthCheck,
                        visible: reply_to_client,
                        sub: false,
                    });
                }
            }
        }
        self.upstream_creds = Some(creds);
        self.identity = Some(id);
        self.ever_authenticated = true;
        true
    }

    /// `AUTH [user] pass`.
    pub(super) async fn handle_auth(&mut self, args: &[&[u8]], up: &mut Option<Stream>, pieces: &mut Vec<Piece>) {
        let (user, pass): (&[u8], &[u8]) = match args.len() {
            2 => (b"default", args[1]),
            3 => (args[1], args[2]),
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

    /// `HELLO [protover [AUTH user pass] [SETNAME name]]`, options handled in order as Redis
    /// 7.0 does; forwarded without its AUTH part.
    pub(super) async fn handle_hello(&mut self, args: &[&[u8]], up: &mut Option<Stream>, pieces: &mut Vec<Piece>) {
        let mut ver: Option<u8> = None;
        if args.len() >= 2 {
            match strict_int(args[1]) {
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
        // Sharing: the protocol asked for is settled first, so that an AUTH in it links straight to the
        // shared connection of that protocol; restored if the HELLO fails.
        let was_resp3 = self.replies.resp3;
        let sharing = self.sharing();
        if sharing && let Some(v) = ver {
            self.replies.resp3 = v == 3;
        }
        let mut setname: Option<&[u8]> = None;
        let mut j = 2;
        while j < args.len() {
            let more = args.len() - 1 - j;
            let opt = cstr_lower(args[j]);
            if opt == "auth" && more >= 2 {
                match self.authenticate(args[j + 1], args[j + 2]).await {
                    Ok(id) => {
                        if !self.become_user(id, up, pieces, false).await {
                            self.replies.resp3 = was_resp3;
                            return;
                        }
                    }
                    Err(reply) => {
                        self.replies.resp3 = was_resp3;
                        self.local(reply);
                        return;
                    }
                }
                j += 3;
            } else if opt == "setname" && more >= 1 {
                if !valid_client_name(args[j + 1]) {
                    self.replies.resp3 = was_resp3;
                    self.local(error_line("-ERR Client names cannot contain spaces, newlines or special characters."));
                    return;
                }
                setname = Some(args[j + 1]);
                j += 2;
            } else {
                let shown = super::session::sanitize(args[j]);
                self.replies.resp3 = was_resp3;
                self.local(error_line(&format!("-ERR Syntax error in HELLO option '{shown}'")));
                return;
            }
        }
        if self.identity.is_none() {
            self.replies.resp3 = was_resp3;
            self.local(Bytes::from_static(NOAUTH_HELLO));
            return;
        }
        if sharing {
            // On a shared connection HELLO is answered by the proxy, with the shared connection's
            // own HELLO reply for the protocol asked for (its id is the shared connection's); a
            // name is kept as CLIENT SETNAME's is (set on the client's own connection if it moves).
            let creds = self.identity.as_ref().map(|i| i.upstream_creds()).unwrap_or_default();
            if !self.ensure_mux(&creds).await {
                self.replies.resp3 = was_resp3;
                self.local(Bytes::from_static(UPSTREAM_DOWN));
                return;
            }
            if let Some(n) = setname {
                self.client_name = (!n.is_empty()).then(|| n.to_vec());
            }
            let reply = self.mux.as_ref().map(|m| m.hello.clone()).unwrap_or_default();
            self.local(reply);
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
        if !self.ensure_upstream(up).await {
            self.local(Bytes::from_static(UPSTREAM_DOWN));
            return;
        }
        pieces.push(Piece::Owned(codec::encode_command(&cmd)));
        let effect = ver.map_or(Effect::None, Effect::Hello);
        self.expect(Slot::Forward { n: 1, effect, visible: true, sub: false });
    }
}

/// The AUTH command for `creds` (None when there is no password to send).
fn auth_command(creds: &(Option<String>, Option<SecretRef>)) -> Result<Option<Vec<u8>>, String> {
    let Some(pw) = &creds.1 else { return Ok(None) };
    Ok(Some(auth_line(creds.0.as_deref(), &pw.read()?)))
}

fn auth_line(user: Option<&str>, pw: &crate::config::Secret) -> Vec<u8> {
    match user {
        Some(u) => codec::encode_command(&[b"AUTH", u.as_bytes(), pw.expose().as_bytes()]),
        None => codec::encode_command(&[b"AUTH", pw.expose().as_bytes()]),
    }
}

/// Reads exactly one reply (RESP2) during the proxy's own login exchange.
async fn read_one_reply<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    resp3: bool,
) -> Result<Bytes, UpstreamError> {
    loop {
        if let Some((len, _)) = frame_reply(buf, resp3).map_err(UpstreamError::Protocol)? {
            return Ok(buf.split_to(len).freeze());
        }
        buf.reserve(64 * 1024);
        let n = tokio::time::timeout(Duration::from_secs(30), io.read_buf(buf))
            .await
            .map_err(|_| UpstreamError::Timeout(Duration::from_secs(30)))?
            .map_err(UpstreamError::Connect)?;
        if n == 0 {
            return Err(UpstreamError::Protocol("upstream closed during login".into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protover_parses_like_string2ll() {
        assert_eq!(strict_int(b"3"), Some(3));
        assert_eq!(strict_int(b"-1"), Some(-1));
        for bad in [&b"+3"[..], b"03", b" 3", b"3 ", b"", b"-", b"-0", b"x"] {
            assert_eq!(strict_int(bad), None, "{bad:?}");
        }
        assert!(valid_client_name(b"my-client_1"));
        assert!(!valid_client_name(b"a b") && !valid_client_name(b"a\nb"));
    }
}
