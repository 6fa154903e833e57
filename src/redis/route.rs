//! What happens to each request of an authenticated (or not yet authenticated) Redis client:
//! answered by the proxy, denied, rewritten, or forwarded as its original bytes — in the order
//! Redis itself checks things (QUIT, unknown command, arity, authentication, ACL, MULTI).

use bytes::{Bytes, BytesMut};

use super::codec::{self, ArgRef, ProtocolError};
use super::command::{Lookup, cstr_eq, cstr_lower};
use super::login::{OK, UPSTREAM_DOWN};
use super::replies::{Effect, Slot, SubKind};
use super::session::{Piece, ReplyMode, Session, error_line, sanitize};
use crate::audit::Event;
use crate::net::memory::FREE_PER_CONNECTION;
use crate::net::stream::Stream;
use crate::policy::redis_acl::{Decision, Keys};

const NOAUTH: &[u8] = b"-NOAUTH Authentication required.\r\n";
const EXECABORT: &[u8] = b"-EXECABORT Transaction discarded because of previous errors.\r\n";
/// Commands a client may send before authenticating (Redis has no such cap; its per-request
/// unauthenticated caps apply too).
const PREAUTH_MAX_COMMANDS: u32 = 32;
/// Request bytes a client may send before authenticating: room for AUTH / HELLO with Redis's
/// largest unauthenticated argument (16 KiB) several times over, not for a flood.
const PREAUTH_MAX_BYTES: u64 = 64 * 1024;
/// Redis's default `client-query-buffer-limit`.
pub(super) const QUERY_BUFFER_LIMIT: usize = 1024 * 1024 * 1024;

/// The outcome of handling one read's worth of requests.
pub(super) struct Batch {
    /// The frozen bytes the requests were parsed from.
    pub(super) bytes: Bytes,
    /// What goes upstream, in order.
    pub(super) pieces: Vec<Piece>,
    /// A later request must be parsed again under the new authentication state.
    pub(super) reparse: bool,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn unknown_command(args: &[&[u8]]) -> Bytes {
    let mut list = String::new();
    for a in args.iter().skip(1) {
        if list.len() >= 128 {
            break;
        }
        let room = 128 - list.len();
        let s = sanitize(a);
        let s: String = s.chars().take(room).collect();
        list.push_str(&format!("'{s}' "));
    }
    let name: String = sanitize(args[0]).chars().take(128).collect();
    error_line(&format!("-ERR unknown command '{name}', with args beginning with: {list}"))
}

fn unknown_subcommand(args: &[&[u8]]) -> Bytes {
    let sub: String = sanitize(args[1]).chars().take(128).collect();
    let container = sanitize(args[0]).to_ascii_uppercase();
    error_line(&format!("-ERR unknown subcommand '{sub}'. Try {container} HELP."))
}

impl Session {
    /// Queues a slot through the CLIENT REPLY emulation: for a request whose reply is off (or
    /// skipped), the upstream still answers and the proxy drops the answer; proxy-made replies
    /// are dropped.
    pub(super) fn expect(&mut self, slot: Slot) {
        if self.hide_current {
            if let Some(h) = slot.hidden() {
                self.replies.push(h);
            }
        } else {
            self.replies.push(slot);
        }
    }

    /// A reply the proxy makes, in its place.
    pub(super) fn local(&mut self, b: impl Into<Bytes>) {
        self.expect(Slot::Local(b.into()));
    }

    /// A local error for a request inside MULTI marks the transaction failed, as Redis does.
    fn local_error(&mut self, b: Bytes) {
        if self.in_multi {
            self.multi_dirty = true;
        }
        self.local(b);
    }

    fn deny(&mut self, reply: Bytes, command: &str, key: Option<&[u8]>) {
        self.shared.metrics.redis_command(&self.cfg.name, Some(command));
        let key_text = key.map(|k| self.key_for_audit(k));
        let mut r = self.record(Event::RedisDenied);
        r.outcome = Some("denied");
        r.command = Some(command);
        r.key = key_text.as_deref();
        r.emit();
        self.local_error(reply);
    }

    fn key_for_audit(&self, k: &[u8]) -> String {
        if !self.cfg.redact_keys {
            return String::from_utf8_lossy(k).into_owned();
        }
        use hmac::{Hmac, KeyInit, Mac};
        let mut m = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&self.l.key_hash_secret).expect("any key length");
        m.update(k);
        let d = m.finalize().into_bytes();
        format!("hmac:{}", d.iter().take(12).map(|b| format!("{b:02x}")).collect::<String>())
    }

    /// Before authentication: QUIT, unknown command, arity, then NOAUTH unless the command
    /// may run unauthenticated (AUTH, HELLO, RESET). Nothing goes upstream.
    async fn route_unauthenticated(&mut self, args: &[&[u8]], up: &mut Option<Stream>, pieces: &mut Vec<Piece>) {
        self.preauth_commands += 1;
        if self.preauth_commands > PREAUTH_MAX_COMMANDS {
            self.local(ProtocolError("too many commands before authentication".into()).reply());
            self.quitting = true;
            self.audit(Event::ConnRejected, "refused", Some("preauth_commands"));
            return;
        }
        if cstr_eq(args[0], b"quit") {
            self.local(Bytes::from_static(OK));
            self.quitting = true;
            return;
        }
        let commands = self.commands.clone();
        let info = match commands.resolve(args) {
            Lookup::Command(i) => i,
            Lookup::UnknownSubcommand(_) => return self.local(unknown_subcommand(args)),
            Lookup::Unknown => return self.local(unknown_command(args)),
        };
        if !info.arity_ok(args.len()) {
            return self.local(error_line(&format!("-ERR wrong number of arguments for '{}' command", info.name)));
        }
        match info.name.as_str() {
            "auth" => self.handle_auth(args, up, pieces).await,
            // on a shared connection of the protocol asked for (a SETNAME in it is kept by the proxy)
            "hello" => self.handle_hello(args, up, pieces).await,
            "reset" => self.local(Bytes::from_static(b"+RESET\r\n")),
            _ => self.local(Bytes::from_static(NOAUTH)),
        }
    }

    /// After authentication. Returns true when the request's own bytes go upstream.
    async fn route_authenticated(&mut self, args: &[&[u8]], up: &mut Option<Stream>, pieces: &mut Vec<Piece>) -> bool {
        if cstr_eq(args[0], b"quit") {
            // Redis 7.0 answers QUIT before looking it up: +OK after the pending replies, close.
            self.local(Bytes::from_static(OK));
            self.quitting = true;
            return false;
        }
        let commands = self.commands.clone();
        let info = match commands.resolve(args) {
            Lookup::Command(i) => i,
            Lookup::UnknownSubcommand(_) => {
                self.local_error(unknown_subcommand(args));
                return false;
            }
            Lookup::Unknown => {
                self.local_error(unknown_command(args));
                return false;
            }
        };
        if !info.arity_ok(args.len()) {
            self.local_error(error_line(&format!("-ERR wrong number of arguments for '{}' command", info.name)));
            return false;
        }
        // HELLO, first in a batch with nothing owed, switches shared connections.
        let hello_shared =
            info.name == "hello" && pieces.is_empty() && self.mux.as_ref().is_none_or(|m| m.outstanding == 0);
        if self.sharing() && info.own_connection && !hello_shared {
            // This client moves to a connection of its own: at once when the shared one owes
            // it nothing, else once every shared reply is in (this request and the rest wait,
            // unparsed; what this batch has for the shared connection goes first).
            if !pieces.is_empty() || self.mux.as_ref().is_some_and(|m| m.outstanding > 0) {
                self.pin_wanted = true;
                return false;
            }
            self.pinned = true;
            self.mux = None;
            self.shared.metrics.redis_multiplex(&self.cfg.name, "moved");
        }
        // Commands that may run unauthenticated are not subject to ACL rules (as in Redis).
        match info.name.as_str() {
            "auth" | "hello" if self.in_multi || self.replies.subscribed() => {
                let name = info.name.clone();
                let msg = if self.in_multi {
                    format!("-ERR {} inside MULTI is not supported through this proxy", name.to_uppercase())
                } else {
                    format!(
                        "-ERR Can't execute '{name}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context"
                    )
                };
                self.local_error(error_line(&msg));
                return false;
            }
            "auth" => {
                self.handle_auth(args, up, pieces).await;
                return false;
            }
            "hello" => {
                self.handle_hello(args, up, pieces).await;
                return false;
            }
            _ => {}
        }
        let reachable = if self.sharing() && self.mux_ready() {
            true
        } else if self.sharing() {
            let creds = self.identity.as_ref().map(|i| i.upstream_creds()).unwrap_or_default();
            self.ensure_mux(&creds).await
        } else {
            self.ensure_upstream(up).await
        };
        if !reachable {
            self.local_error(Bytes::from_static(UPSTREAM_DOWN));
            return false;
        }
        if info.name == "reset" {
            // RESET turns replies back on and answers +RESET; the client is unauthenticated again.
            self.reply_mode = ReplyMode::On;
            self.hide_current = false;
            self.expect(Slot::Forward { n: 1, effect: Effect::Reset, visible: true, sub: false });
            self.identity = None;
            self.upstream_creds = None;
            self.in_multi = false;
            self.multi_dirty = false;
            self.multi_mask.clear();
            self.preauth_commands = 0;
            self.preauth_bytes = 0;
            self.rearm_auth_deadline();
            return true;
        }
        let Some(id) = self.identity.as_ref() else { return false };
        if matches!(info.name.as_str(), "monitor" | "sync" | "psync" | "replconf") {
            // MONITOR would stream every client's commands, SYNC/PSYNC every write and the whole
            // dataset, to this one: values included, key patterns bypassed. Never through the proxy.
            let name = info.name.clone();
            let reply = error_line(&format!("-NOPERM this user has no permissions to run the '{name}' command"));
            self.deny(reply, &name, None);
            return false;
        }
        // Only `+cmd|arg` rules look at a plain command's first argument.
        let first_arg = if info.name.as_bytes().contains(&b'|') || !id.rules.has_subcommand_rules() {
            None
        } else {
            args.get(1).map(|a| cstr_lower(a))
        };
        let keys = if id.rules.restricts_keys() { info.keys(args) } else { Keys::Known(Vec::new()) };
        let first_key = match &keys {
            Keys::Known(k) => k.first().map(|k| k.to_vec()),
            Keys::Unresolvable => None,
        };
        if let Decision::Deny(d) = id.rules.decide(&info.acl_ref(first_arg.as_deref()), &keys) {
            let name = info.name.clone();
            self.deny(error_line(&d.message()), &name, first_key.as_deref());
            return false;
        }
        // The TTL policy: rewrite, deny, or follow with EXPIRE … NX.
        let plan = if self.cfg.ttl.is_empty() {
            super::ttl::TtlPlan::default()
        } else {
            super::ttl::plan(info, args, &self.cfg.ttl, now_ms())
        };
        for (rule, action) in &plan.actions {
            self.shared.metrics.redis_ttl(&self.cfg.name, rule, action.as_str());
        }
        if let Some(msg) = plan.deny {
            let name = info.name.clone();
            self.deny(error_line(&msg), &name, first_key.as_deref());
            return false;
        }
        let injected: Vec<Vec<u8>> = plan
            .inject
            .iter()
            .map(|(k, secs)| codec::encode_command(&[b"EXPIRE", k, secs.to_string().as_bytes(), b"NX"]))
            .chain(
                plan.clamp_after
                    .iter()
                    .map(|(k, secs)| codec::encode_command(&[b"EXPIRE", k, secs.to_string().as_bytes(), b"LT"])),
            )
            .collect();
        if let Some(new_args) = plan.rewrite {
            let v: Vec<&[u8]> = new_args.iter().map(Vec::as_slice).collect();
            pieces.push(Piece::Owned(codec::encode_command(&v)));
            self.expect(Slot::forward(1));
            if self.in_multi {
                self.multi_mask.push(true);
            }
            self.shared.metrics.redis_allowed(&self.cfg.name, 1);
            self.queue_injections(injected, pieces);
            return false;
        }
        let argc = args.len() as u32;
        match info.name.as_str() {
            // A nested MULTI is an error upstream and leaves the transaction (and its dirt) as is.
            "multi" if !self.in_multi => {
                self.in_multi = true;
                self.multi_dirty = false;
            }
            "exec" if self.in_multi && self.multi_dirty => {
                self.in_multi = false;
                self.multi_dirty = false;
                self.multi_mask.clear();
                pieces.push(Piece::Owned(b"*1\r\n$7\r\nDISCARD\r\n".to_vec()));
                self.expect(Slot::swallow(1));
                self.local(Bytes::from_static(EXECABORT));
                return false;
            }
            "exec" => {
                self.in_multi = false;
                self.multi_dirty = false;
                let mask = std::mem::take(&mut self.multi_mask);
                if mask.iter().any(|keep| !keep) {
                    // The proxy's EXPIREs ran inside the transaction: drop their results.
                    self.replies.expect_exec_mask(mask);
                    self.expect(Slot::Forward { n: 1, effect: Effect::ExecStrip, visible: true, sub: false });
                    return true;
                }
            }
            "discard" => {
                self.in_multi = false;
                self.multi_dirty = false;
                self.multi_mask.clear();
            }
            "client|setname" if self.sharing() => {
                // Emulated on a shared connection (whose name is not this client's), with Redis's
                // own check; an empty name clears it.
                let name = args[2];
                if super::login::valid_client_name(name) {
                    self.client_name = (!name.is_empty()).then(|| name.to_vec());
                    self.local(Bytes::from_static(OK));
                } else {
                    self.local_error(error_line(
                        "-ERR Client names cannot contain spaces, newlines or special characters.",
                    ));
                }
                return false;
            }
            "client|getname" if self.sharing() => {
                let reply = match &self.client_name {
                    Some(n) => {
                        let mut b = format!("${}\r\n", n.len()).into_bytes();
                        b.extend_from_slice(n);
                        b.extend_from_slice(b"\r\n");
                        Bytes::from(b)
                    }
                    None if self.replies.resp3 => Bytes::from_static(b"_\r\n"),
                    None => Bytes::from_static(b"$-1\r\n"),
                };
                self.local(reply);
                return false;
            }
            "client|reply" => {
                // Emulated, never forwarded: the upstream always answers, the proxy drops.
                if self.in_multi {
                    self.local_error(error_line("-ERR CLIENT REPLY inside MULTI is not supported through this proxy"));
                    return false;
                }
                if self.replies.subscribed() && !self.replies.resp3 {
                    self.local(error_line("-ERR Can't execute 'client|reply': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context"));
                    return false;
                }
                match cstr_lower(args[2]).as_str() {
                    "on" => {
                        self.reply_mode = ReplyMode::On;
                        self.hide_current = false;
                        self.local(Bytes::from_static(OK));
                    }
                    "off" => self.reply_mode = ReplyMode::Off,
                    "skip" => {
                        if self.reply_mode == ReplyMode::On {
                            self.reply_mode = ReplyMode::Skip;
                        }
                    }
                    _ => self.local(error_line("-ERR syntax error")),
                }
                return false;
            }
            "subscribe" | "psubscribe" | "ssubscribe" | "unsubscribe" | "punsubscribe" | "sunsubscribe" => {
                if self.in_multi {
                    let msg =
                        format!("-ERR {} inside MULTI is not supported through this proxy", info.name.to_uppercase());
                    self.local_error(error_line(&msg));
                    return false;
                }
                let kind = match info.name.as_str() {
                    "unsubscribe" => Some(SubKind::Channel),
                    "punsubscribe" => Some(SubKind::Pattern),
                    "sunsubscribe" => Some(SubKind::Shard),
                    _ => None,
                };
                match kind {
                    Some(kind) if argc == 1 => self.expect(Slot::UnsubAll { kind, visible: true }),
                    _ => self.expect(Slot::Forward { n: argc - 1, effect: Effect::None, visible: true, sub: true }),
                }
                return true;
            }
            _ => {}
        }
        self.expect(Slot::forward(1));
        // Queued upstream (MULTI itself and WATCH are run at once, not queued).
        if self.in_multi && info.name != "multi" && info.name != "watch" {
            self.multi_mask.push(true);
        }
        self.queue_injections(injected, &mut Vec::new());
        true
    }

    /// Queues `EXPIRE … NX` commands after the current request: swallowed replies (`+QUEUED`
    /// inside MULTI, whose EXEC array then loses their results), and the bytes go right after
    /// the request's own (`pieces` when the request was rewritten, else `inject_after`, which
    /// the batch loop appends after the raw bytes).
    fn queue_injections(&mut self, cmds: Vec<Vec<u8>>, pieces: &mut Vec<Piece>) {
        for c in cmds {
            if self.in_multi {
                self.multi_mask.push(false);
            }
            self.expect(Slot::swallow(1));
            if pieces.is_empty() {
                self.inject_after.push(c);
            } else {
                pieces.push(Piece::Owned(c));
            }
        }
    }

    /// Handles every complete request in `cbuf`.
    pub(super) async fn on_client(&mut self, cbuf: &mut BytesMut, up: &mut Option<Stream>) -> Batch {
        // Reloaded listener policy (default rules, TTL rules, limits) applies to open sessions
        // from their next batch on.
        self.cfg = self.l.config();
        let mut reqs = Vec::new();
        let mut at = 0;
        let mut perr: Option<ProtocolError> = None;
        let mut reparse = false;
        let unauth = self.identity.is_none();
        let mut may_authenticate = false;
        if unauth && self.preauth_bytes + cbuf.len() as u64 > PREAUTH_MAX_BYTES {
            cbuf.clear();
            self.replies
                .push(Slot::Local(Bytes::from(ProtocolError("too many bytes before authentication".into()).reply())));
            self.quitting = true;
            self.audit(Event::ConnRejected, "refused", Some("preauth_bytes"));
            return Batch { bytes: Bytes::new(), pieces: Vec::new(), reparse: false };
        }
        loop {
            match codec::parse_request_resume(cbuf, at, &self.cfg.limits, unauth, &mut self.partial) {
                Ok(Some(r)) => {
                    if unauth && let Some(ArgRef::Range(a)) = r.args.first() {
                        let name = &cbuf[a.clone()];
                        may_authenticate |= cstr_eq(name, b"auth") || cstr_eq(name, b"hello");
                    }
                    at = r.raw.end;
                    reqs.push(r);
                }
                Ok(None) => break,
                // Redis applies its unauthenticated caps per request: after an AUTH in this
                // batch, the rest is parsed again once it has been handled.
                Err(e) if unauth && may_authenticate && e.0.starts_with("unauthenticated") => {
                    reparse = true;
                    break;
                }
                Err(e) => {
                    perr = Some(e);
                    break;
                }
            }
        }
        if unauth {
            self.preauth_bytes += at as u64;
        }
        let bytes = cbuf.split_to(at).freeze();
        // What is left is a request still arriving: beyond the connection's free share it is
        // held against the process-wide budget, or refused.
        let pending = cbuf.len() + self.partial.as_ref().map_or(0, |p| p.held_bytes());
        if perr.is_none() && (pending > FREE_PER_CONNECTION || self.held.bytes() > 0) {
            let limit = self.shared.config().limits.max_buffered_bytes;
            if !self.held.hold(pending, limit) {
                tracing::warn!(pending, "request memory budget exhausted: refusing the request");
                perr = Some(ProtocolError("request exceeds the proxy's buffer memory limit".into()));
            }
        }
        if perr.is_some() {
            // The rest of the stream is void: its memory and its charge go now, not when the
            // replies still owed (a BLPOP, say) are out and the connection closes.
            *cbuf = BytesMut::new();
            self.partial = None;
            self.held.hold(0, u64::MAX);
        }
        let mut pieces: Vec<Piece> = Vec::new();
        let mut allowed = 0u64;
        let mut stop: Option<usize> = None;
        // One argument vector for the whole batch: slices of it, no per-request allocation.
        let mut args: Vec<&[u8]> = Vec::new();
        for req in &reqs {
            if self.quitting {
                break;
            }
            let mode_before = self.reply_mode;
            args.clear();
            args.extend(req.args.iter().map(|a| codec::arg(&bytes, a)));
            // CLIENT REPLY: whether this request's replies are seen is settled before it runs.
            self.hide_current = match self.reply_mode {
                ReplyMode::On => false,
                ReplyMode::Off => true,
                ReplyMode::Skip => {
                    self.reply_mode = ReplyMode::On;
                    true
                }
            };
            if args.is_empty() {
                // An empty request still counts as "the next command" for SKIP, as in Redis.
                continue;
            }
            let forward = if self.identity.is_none() {
                self.route_unauthenticated(&args, up, &mut pieces).await;
                false
            } else {
                self.route_authenticated(&args, up, &mut pieces).await
            };
            self.hide_current = false;
            if self.pin_wanted {
                // This request and the rest wait for the move to a connection of its own.
                self.reply_mode = mode_before;
                stop = Some(req.raw.start);
                break;
            }
            if !forward {
                continue;
            }
            allowed += 1;
            let inline = req.args.iter().any(|a| matches!(a, ArgRef::Owned(_)));
            if inline {
                // Redis would tokenize an inline request again: send exactly what was decided on.
                pieces.push(Piece::Owned(codec::encode_command(&args)));
                pieces.extend(self.inject_after.drain(..).map(Piece::Owned));
                continue;
            }
            match pieces.last_mut() {
                Some(Piece::Raw(r)) if r.end == req.raw.start => r.end = req.raw.end,
                _ => pieces.push(Piece::Raw(req.raw.clone())),
            }
            pieces.extend(self.inject_after.drain(..).map(Piece::Owned));
        }
        self.shared.metrics.redis_allowed(&self.cfg.name, allowed);
        if let Some(at) = stop {
            // Unhandled requests go back in front of what is still arriving (no request was
            // partly parsed: a partial parse only survives a read with no complete request).
            let rest = &bytes[at..];
            let mut back = BytesMut::with_capacity(rest.len() + cbuf.len());
            back.extend_from_slice(rest);
            back.extend_from_slice(cbuf);
            *cbuf = back;
            debug_assert!(self.partial.is_none() || at == bytes.len());
            // A protocol error after them is reported after them.
            if perr.is_some() {
                self.deferred_error = perr.take();
            }
        } else if perr.is_none() {
            perr = self.deferred_error.take();
        }
        // A QUIT (or a pre-authentication limit) before it already ends the session: Redis
        // stops reading there, and never sees the bad bytes.
        if let Some(e) = perr.filter(|_| !self.quitting) {
            tracing::debug!(error = %e, "protocol error from client");
            // After CLIENT REPLY OFF, or with a SKIP pending, Redis writes nothing, not even this.
            if self.reply_mode == ReplyMode::On {
                self.replies.push(Slot::Local(Bytes::from(e.reply())));
            }
            self.quitting = true;
            let reason = if e.0.contains("memory limit") { "memory_limit" } else { "protocol_error" };
            self.audit(Event::ConnRejected, "refused", Some(reason));
        }
        Batch { bytes, pieces, reparse: reparse && !self.quitting }
    }
}
