//! `pool = "session"`: upstream sessions reused across clients, as PgBouncer's session mode.
//! A session whose client left cleanly (Terminate or EOF between requests, every request
//! answered) is reset — `ROLLBACK` if a transaction was open, then `DISCARD ALL` (PgBouncer's
//! `server_reset_query`) — and parked. The next client logging in with the same upstream user,
//! database and startup parameters gets it: the proxy replays the session's ParameterStatus
//! messages (as they stand after the reset), a fresh proxy cancel key and ReadyForQuery.
//! A parked session is held by nobody else, checked for liveness when taken, and closed after
//! `pool_idle_timeout`; at most `pool_size` are parked per key and `pool_max_parked` in all
//! (the longest parked is closed to make room).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::codec::{self, Body, MsgReader};
use crate::net::stream::Stream;

/// How long the reset may take before the session is given up.
const RESET_DEADLINE: Duration = Duration::from_secs(5);
/// A session parked longer than this is asked whether it is alive before it is handed out.
const CHECK_AFTER: Duration = Duration::from_secs(15);
/// How long that answer may take.
const CHECK_DEADLINE: Duration = Duration::from_secs(2);
/// Asked at every reset: the role may have been altered since the session logged in
/// (`is_superuser` is reported once, at login).
const ROLE_CHECK: &str = "SELECT rolsuper OR rolbypassrls OR NOT rolcanlogin OR coalesce(rolvaliduntil < now(), false) FROM pg_roles WHERE rolname = session_user";

/// What a client must be told about an upstream session in place of its startup exchange.
#[derive(Debug, Clone, Default)]
pub struct UpstreamStartup {
    /// ParameterStatus frames by name, in the order the server sent them.
    pub params: Vec<(String, Bytes)>,
    /// BackendKeyData of the upstream session.
    pub pid: i32,
    /// Its cancel secret.
    pub secret: i32,
    /// `is_superuser` as reported.
    pub is_superuser: Option<bool>,
    /// When the upstream session was opened (for `pool_max_lifetime`).
    pub opened: Option<Instant>,
}

impl UpstreamStartup {
    /// Records (or updates) a ParameterStatus message.
    pub fn set_param(&mut self, frame: &Bytes, body: &Bytes) {
        let mut b = Body(body.clone());
        let (Ok(name), Ok(value)) = (b.cstr(), b.cstr_lossy()) else { return };
        if name == "is_superuser" {
            self.is_superuser = Some(value == "on");
        }
        match self.params.iter_mut().find(|(n, _)| *n == name) {
            Some(p) => p.1 = frame.clone(),
            None => self.params.push((name, frame.clone())),
        }
    }
}

/// A parked upstream session.
#[derive(Debug)]
pub struct Pooled {
    /// The stream, between requests, transaction idle.
    pub io: Stream,
    /// What to replay to the client that takes it.
    pub startup: UpstreamStartup,
    parked: Instant,
}

/// Which sessions may be handed to which client: upstream user, database and every startup
/// parameter the client sent (they shape the session: `options`, `application_name`, ...).
pub fn pool_key(user: &str, database: &str, params: &[(String, String)]) -> String {
    let mut p: Vec<&(String, String)> = params.iter().collect();
    p.sort();
    let mut k = format!("{user}\0{database}");
    for (n, v) in p {
        k.push('\0');
        k.push_str(n);
        k.push('=');
        k.push_str(v);
    }
    k
}

/// The parked sessions of one listener.
#[derive(Debug, Default)]
pub struct SessionPool {
    idle: Mutex<HashMap<String, Vec<Pooled>>>,
}

impl SessionPool {
    /// Parked sessions, all keys.
    pub fn idle(&self) -> usize {
        self.idle.lock().map(|m| m.values().map(Vec::len).sum()).unwrap_or(0)
    }

    /// A live parked session for `key` (most recently parked first); stale, too old and dead
    /// ones are closed.
    pub async fn checkout(&self, key: &str, idle_timeout: Duration, max_lifetime: Duration) -> Option<Pooled> {
        loop {
            let p = {
                let mut m = self.idle.lock().ok()?;
                let v = m.get_mut(key)?;
                let p = v.pop();
                if v.is_empty() {
                    m.remove(key);
                }
                p?
            };
            let too_old = p.startup.opened.is_none_or(|t| t.elapsed() >= max_lifetime);
            if p.parked.elapsed() >= idle_timeout || too_old {
                close(p.io).await;
                continue;
            }
            let mut p = p;
            // Between requests the server sends nothing; anything readable now (EOF, an
            // error after an administrator's terminate, a notice) means: not this one.
            let mut probe = [0u8; 1];
            if tokio::time::timeout(Duration::ZERO, p.io.read(&mut probe)).await.is_ok() {
                continue;
            }
            // Parked a while: a silently dropped path reads as nothing at all; ask (a Sync is
            // answered by ReadyForQuery, as PgBouncer's server_check_query would be).
            if p.parked.elapsed() >= CHECK_AFTER {
                let mut r = MsgReader::new(p.io, BytesMut::new());
                let alive = tokio::time::timeout(CHECK_DEADLINE, async {
                    codec::send(&mut r.io, b"S\0\0\0\x04").await.ok()?;
                    let m = r.message(64).await.ok()?;
                    (m.tag == b'Z' && m.body.first() == Some(&b'I')).then_some(())
                })
                .await;
                if !matches!(alive, Ok(Some(()))) || !r.buf.is_empty() {
                    close(r.io).await;
                    continue;
                }
                p.io = r.io;
            }
            return Some(p);
        }
    }

    /// Resets a session a client left and parks it; closes it when the reset fails or the
    /// key already has `pool_size` parked. With `pool_max_parked` parked in all, the one
    /// parked longest (any key) is closed to make room.
    pub async fn checkin(
        &self,
        key: String,
        io: Stream,
        mut startup: UpstreamStartup,
        in_transaction: bool,
        cfg: &crate::config::PgPool,
    ) {
        let reset = async {
            let mut r = MsgReader::new(io, BytesMut::new());
            if in_transaction {
                run(&mut r, "ROLLBACK", &mut startup).await?;
            }
            run(&mut r, "DISCARD ALL", &mut startup).await?;
            if run(&mut r, ROLE_CHECK, &mut startup).await?.as_deref() != Some("f") {
                // superuser, BYPASSRLS, no longer allowed to log in, or expired: not reusable
                return None;
            }
            if !r.buf.is_empty() {
                return None;
            }
            Some(r.io)
        };
        let Ok(Some(io)) = tokio::time::timeout(RESET_DEADLINE, reset).await else {
            tracing::debug!("upstream session reset failed; closed");
            return;
        };
        if startup.is_superuser != Some(false) {
            return close(io).await;
        }
        let (rejected, evicted) = {
            let Ok(mut m) = self.idle.lock() else { return };
            if m.get(&key).map_or(0, Vec::len) >= cfg.size || cfg.max_parked == 0 {
                (Some(io), Vec::new())
            } else {
                let mut evicted = Vec::new();
                // (a reload may have lowered the cap below what is parked)
                while m.values().map(Vec::len).sum::<usize>() >= cfg.max_parked {
                    // each key's list is oldest first
                    let oldest = m.iter().filter_map(|(k, v)| Some((v.first()?.parked, k.clone()))).min();
                    let Some((_, k)) = oldest else { break };
                    let Some(v) = m.get_mut(&k) else { break };
                    evicted.push(v.remove(0));
                    if v.is_empty() {
                        m.remove(&k);
                    }
                }
                m.entry(key).or_default().push(Pooled { io, startup, parked: Instant::now() });
                (None, evicted)
            }
        };
        if let Some(io) = rejected {
            close(io).await;
        }
        for p in evicted {
            close(p.io).await;
        }
    }

    /// Closes parked sessions idle for `idle_timeout` or open for `max_lifetime`.
    pub async fn prune(&self, idle_timeout: Duration, max_lifetime: Duration) {
        let stale: Vec<Pooled> = {
            let Ok(mut m) = self.idle.lock() else { return };
            let mut out = Vec::new();
            for v in m.values_mut() {
                let (old, keep): (Vec<Pooled>, Vec<Pooled>) = std::mem::take(v).into_iter().partition(|p| {
                    p.parked.elapsed() >= idle_timeout || p.startup.opened.is_none_or(|t| t.elapsed() >= max_lifetime)
                });
                *v = keep;
                out.extend(old);
            }
            m.retain(|_, v| !v.is_empty());
            out
        };
        for p in stale {
            close(p.io).await;
        }
    }
}

/// Runs one simple query during the reset; ParameterStatus messages update `startup`.
/// Returns the first column of the first row, if any (`Some(None)`: no row).
async fn run(r: &mut MsgReader<Stream>, sql: &str, startup: &mut UpstreamStartup) -> Option<Option<String>> {
    let mut q = BytesMut::with_capacity(sql.len() + 6);
    q.extend_from_slice(b"Q");
    q.extend_from_slice(&(sql.len() as i32 + 5).to_be_bytes());
    q.extend_from_slice(sql.as_bytes());
    q.extend_from_slice(b"\0");
    codec::send(&mut r.io, &q).await.ok()?;
    let mut ok = false;
    let mut first: Option<String> = None;
    loop {
        let m = r.message(codec::MAX_BACKEND_LOGIN_MESSAGE).await.ok()?;
        match m.tag {
            b'C' => ok = true,
            b'T' => {}
            b'D' if first.is_none() => {
                let mut b = Body(m.body.clone());
                let cols = b.bytes(2).ok()?;
                if cols.as_ref() != [0, 1] {
                    return None;
                }
                let len = b.i32().ok()?;
                let v = if len < 0 { Bytes::new() } else { b.bytes(len as usize).ok()? };
                first = Some(String::from_utf8_lossy(&v).into_owned());
            }
            b'D' => {}
            b'S' => startup.set_param(&m.frame, &m.body),
            b'N' | b'A' => {}
            b'Z' => return (ok && m.body.first() == Some(&b'I')).then_some(first),
            _ => return None,
        }
    }
}

/// Ends an upstream session politely (Terminate), whatever state it is in.
async fn close(mut io: Stream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = io.write_all(b"X\0\0\0\x04").await;
        let _ = io.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_users_databases_and_parameters() {
        let p = |v: &[(&str, &str)]| v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>();
        let a = pool_key("app_runtime", "app", &p(&[("application_name", "x"), ("client_encoding", "UTF8")]));
        let same = pool_key("app_runtime", "app", &p(&[("client_encoding", "UTF8"), ("application_name", "x")]));
        assert_eq!(a, same, "parameter order does not matter");
        assert_ne!(a, pool_key("other", "app", &p(&[("application_name", "x"), ("client_encoding", "UTF8")])));
        assert_ne!(a, pool_key("app_runtime", "db2", &p(&[("application_name", "x"), ("client_encoding", "UTF8")])));
        assert_ne!(a, pool_key("app_runtime", "app", &p(&[("application_name", "y"), ("client_encoding", "UTF8")])));
        assert_ne!(a, pool_key("app_runtime", "app", &p(&[("client_encoding", "UTF8")])));
    }
}
