//! Accepting client connections: admission (CIDR allow-list, connection limits), a session id
//! and a tracing span per connection, then the protocol's handler. Lockout is checked by the
//! protocol once it can answer in its own words.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use dashmap::DashMap;
use ipnet::IpNet;
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use crate::app::Shared;
use crate::audit::{Event, Record};
use crate::metrics::{ConnOutcome, Protocol};

/// Open-connection counts, global and per source address (IPv6 by /64).
#[derive(Debug, Default)]
pub struct ConnCounter {
    total: AtomicUsize,
    per_source: DashMap<IpAddr, usize>,
    refusing: AtomicUsize,
}

/// Connections over the limit that are being told so (in the protocol's words) at once; past
/// this, excess connections are closed without a word so a flood cannot pin descriptors.
const MAX_REFUSING: usize = 256;

/// A slot for answering one over-the-limit connection; released on drop.
#[derive(Debug)]
pub struct RefusalSlot(Arc<ConnCounter>);

impl Drop for RefusalSlot {
    fn drop(&mut self) {
        self.0.refusing.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Holds one slot in the counters; released on drop.
#[derive(Debug)]
pub struct ConnPermit {
    counter: Arc<ConnCounter>,
    listener_count: Arc<AtomicUsize>,
    ip: IpAddr,
    gauge: prometheus::IntGauge,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.counter.total.fetch_sub(1, Ordering::Relaxed);
        self.listener_count.fetch_sub(1, Ordering::Relaxed);
        self.gauge.dec();
        if let dashmap::Entry::Occupied(mut e) = self.counter.per_source.entry(self.ip) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

/// Why admission said no (the protocol answers it, e.g. SQLSTATE 53300, within a short deadline).
#[derive(Debug)]
pub enum AdmitRefusal {
    /// Global, per-listener or per-source limit reached.
    LimitReached(RefusalSlot),
}

/// What the accept loop hands a protocol handler.
#[derive(Debug)]
pub struct Accepted {
    /// The client's TCP connection (TCP_NODELAY set).
    pub tcp: TcpStream,
    /// Client address.
    pub peer: SocketAddr,
    /// Session id for logs and audit.
    pub session: String,
    /// The admission slot, or why there is none.
    pub admission: Result<ConnPermit, AdmitRefusal>,
}

/// The static description of a listener for the accept loop.
#[derive(Debug, Clone)]
pub struct ListenerSpec {
    /// Listener name (metric label).
    pub name: String,
    /// Protocol (metric label).
    pub protocol: Protocol,
    /// Allowed source networks; empty = any.
    pub allow: Vec<IpNet>,
    /// Per-listener connection limit.
    pub max_connections: Option<usize>,
}

static SESSION_SEQ: AtomicU64 = AtomicU64::new(1);

fn next_session_id() -> String {
    format!("{:x}-{}", std::process::id(), SESSION_SEQ.fetch_add(1, Ordering::Relaxed))
}

fn allowed(allow: &[IpNet], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    allow.is_empty() || allow.iter().any(|n| n.contains(&ip))
}

/// Admission's verdict on a new connection.
enum Verdict {
    /// Admitted, or over a limit but to be told so in the protocol's words.
    Serve(Result<ConnPermit, AdmitRefusal>),
    /// Over a limit with too many refusals already in flight: close at once.
    Drop,
}

fn admit(shared: &Shared, spec: &ListenerSpec, listener_count: &Arc<AtomicUsize>, ip: IpAddr) -> Verdict {
    let ip = crate::auth::lockout::source_key(ip);
    let limits = shared.config().limits.clone();
    let counter = shared.conns.clone();
    let total = counter.total.fetch_add(1, Ordering::Relaxed) + 1;
    let on_listener = listener_count.fetch_add(1, Ordering::Relaxed) + 1;
    let from_source = {
        let mut e = counter.per_source.entry(ip).or_insert(0);
        *e += 1;
        *e
    };
    let gauge = shared.metrics.active(&spec.name, spec.protocol);
    gauge.inc();
    let permit = ConnPermit { counter, listener_count: listener_count.clone(), ip, gauge };
    if total > limits.max_connections
        || from_source > limits.max_connections_per_source
        || spec.max_connections.is_some_and(|m| on_listener > m)
    {
        drop(permit);
        let counter = shared.conns.clone();
        if counter.refusing.fetch_add(1, Ordering::Relaxed) >= MAX_REFUSING {
            counter.refusing.fetch_sub(1, Ordering::Relaxed);
            return Verdict::Drop;
        }
        return Verdict::Serve(Err(AdmitRefusal::LimitReached(RefusalSlot(counter))));
    }
    Verdict::Serve(Ok(permit))
}

/// The listener's admission settings as the (reloaded) config has them; a listener missing
/// from it keeps its own (it goes at the next restart, with address changes).
fn refresh(spec: &mut ListenerSpec, cfg: &crate::config::Config) {
    let found = match spec.protocol {
        Protocol::Postgres => cfg.postgres.iter().find(|l| l.name == spec.name).map(|l| (&l.allow, l.max_connections)),
        Protocol::Redis => cfg.redis.iter().find(|l| l.name == spec.name).map(|l| (&l.allow, l.max_connections)),
    };
    if let Some((allow, max)) = found {
        if *allow != spec.allow {
            tracing::info!(listener = %spec.name, "allow-list reloaded");
            spec.allow = allow.clone();
        }
        spec.max_connections = max;
    }
}

/// Accepts until shutdown; each admitted connection runs `handle` in its own task, tracked
/// for draining.
pub async fn accept_loop<F, Fut>(listener: TcpListener, spec: ListenerSpec, shared: Arc<Shared>, handle: F)
where
    F: Fn(Accepted) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut spec = spec;
    let listener_count = Arc::new(AtomicUsize::new(0));
    let mut seen = shared.config();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(listener = %spec.name, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let session = next_session_id();
        let now = shared.config();
        if !Arc::ptr_eq(&now, &seen) {
            // reloaded: the allow-list and the per-listener limit apply to new connections
            refresh(&mut spec, &now);
            seen = now;
        }
        if !allowed(&spec.allow, peer.ip()) {
            shared.metrics.connection(&spec.name, spec.protocol, ConnOutcome::NotAllowed);
            let mut r = Record::new(Event::ConnRejected);
            r.listener = Some(&spec.name);
            r.protocol = Some(spec.protocol.as_str());
            r.session = Some(&session);
            r.peer = Some(peer);
            r.outcome = Some("refused");
            r.reason = Some("source_not_allowed");
            r.emit();
            drop(tcp);
            continue;
        }
        let _ = tcp.set_nodelay(true);
        crate::net::set_keepalive(&tcp);
        let Verdict::Serve(admission) = admit(&shared, &spec, &listener_count, peer.ip()) else {
            shared.metrics.connection(&spec.name, spec.protocol, ConnOutcome::LimitReached);
            drop(tcp);
            continue;
        };
        let span = tracing::info_span!("conn", listener = %spec.name, session = %session, peer = %peer);
        let fut = handle(Accepted { tcp, peer, session, admission });
        shared.tracker.spawn(fut.instrument(span));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_matches_v4_mapped() {
        let allow: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        assert!(allowed(&allow, "127.0.0.1".parse().unwrap()));
        assert!(allowed(&allow, "::ffff:127.0.0.2".parse().unwrap()));
        assert!(allowed(&allow, "::1".parse().unwrap()));
        assert!(!allowed(&allow, "10.1.2.3".parse().unwrap()));
        assert!(allowed(&[], "10.1.2.3".parse().unwrap()));
    }
}
