//! `pool = "multiplex"`: upstream connections shared by the clients of a listener that log in
//! upstream with the same credentials (as Envoy's and twemproxy's Redis proxies do). Each
//! client's batch of requests is queued to the connection's task, which writes every batch
//! queued since its last write in one syscall, reads the replies in large reads, and hands
//! each client the bytes of its own replies as they come (never re-encoded), in order; a large
//! one goes at the pace its client takes it (`STREAM_AHEAD`). Redis then
//! reads and answers many clients' requests per system call instead of one client's.
//!
//! Only stateless commands are shared: a client that sends one that needs a connection of its
//! own (`CommandInfo::own_connection`) first gets every shared reply it is owed, then gets a
//! dedicated connection for the rest of its session (`session.rs`). Shared connections are
//! per protocol (RESP2 or RESP3, chosen by the clients' HELLO), on database 0, and close when
//! the last client using them goes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::codec::ReplyKind;
use super::scan::Scanner;
use crate::config::SecretRef;
use crate::net::memory::{Held, RequestMemory};
use crate::net::stream::Stream;

/// One client batch: its request bytes and how many top-level replies they produce.
pub(super) struct Job {
    pub(super) bytes: Bytes,
    pub(super) frames: u32,
    pub(super) reply: Arc<Client>,
}

/// Where a client's replies go, and what of them waits there.
pub(super) struct Client {
    tx: mpsc::UnboundedSender<Delivery>,
    /// Reply bytes delivered and not yet taken by the client's session.
    waiting: AtomicUsize,
    /// Told `TooLarge`: the rest of its replies are dropped (its session ends).
    refused: AtomicBool,
    /// Its session took delivered bytes (see `STREAM_AHEAD`).
    drained: tokio::sync::Notify,
    /// It took nothing for `STREAM_STALL_MAX` while a reply streamed to it: its replies are not
    /// paced (until it takes bytes again).
    stalled: AtomicBool,
}

impl Client {
    fn new(tx: mpsc::UnboundedSender<Delivery>) -> Arc<Client> {
        Arc::new(Client {
            tx,
            waiting: AtomicUsize::new(0),
            refused: AtomicBool::new(false),
            drained: tokio::sync::Notify::new(),
            stalled: AtomicBool::new(false),
        })
    }

    fn send(&self, d: Delivery) {
        let _ = self.tx.send(d);
    }
}

/// Reply bytes that may wait for one client (beyond a first reply, which may take up to the
/// whole budget): a client that does not read cannot take the budget from the others.
const CLIENT_WAITING_MAX: u64 = 64 * 1024 * 1024;

/// Replies smaller than this are copied out of the read buffer when handed over.
const COPY_BELOW: usize = 16 * 1024;

/// The charge of delivered replies: the process-wide budget and the client's share.
pub(super) struct Charge {
    _global: Held,
    client: Arc<Client>,
    n: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.client.waiting.fetch_sub(self.n, Relaxed);
        // it takes bytes: a reply streaming to it is paced again (a write only when it had stalled)
        if self.client.stalled.load(Relaxed) {
            self.client.stalled.store(false, Relaxed);
        }
        self.client.drained.notify_one();
    }
}

/// Bytes of a reply being streamed that may wait for its client before the shared connection
/// reads on: the reply goes at the pace its client takes it (every other reply on the
/// connection comes after it anyway), not into memory.
const STREAM_AHEAD: usize = 256 * 1024;

/// A reply still arriving starts to stream once this much of it is in (the tail of an ordinary
/// read stays for the next one: whole replies take the session's fast path).
const STREAM_MIN: usize = 16 * 1024;

/// How long a streamed reply's client may take no bytes at all before the shared connection
/// reads on regardless (charging the bytes to the budget, as for any client that does not
/// read, until it takes some again): a client that stops reading does not stall the others.
const STREAM_STALL_MAX: std::time::Duration = std::time::Duration::from_millis(500);

/// What a client gets from the shared connection.
pub(super) enum Delivery {
    /// Reply bytes in order: `frames` replies complete in them, and the budget charge they
    /// hold until the client has taken them. `whole`: they are exactly those replies (no part
    /// of one before them or after them).
    Replies { bytes: Bytes, frames: u32, whole: bool, charge: Charge },
    /// The shared connection is gone: these replies will not come.
    Failed,
    /// The replies owed would take the proxy over its buffer budget: they will not come.
    TooLarge,
}

/// A client's link to a shared connection.
pub(super) struct Link {
    jobs: mpsc::UnboundedSender<Job>,
    client: Arc<Client>,
    /// Deliveries for this client.
    pub(super) rx: mpsc::UnboundedReceiver<Delivery>,
    /// Replies owed by the shared connection (sent minus delivered).
    pub(super) outstanding: u64,
    /// Per batch sent and not fully answered: its replies still owed and its request bytes.
    inflight: VecDeque<(u32, usize)>,
    /// Request bytes of those batches.
    inflight_bytes: usize,
    /// The shared connection's protocol (2 or 3) and its own reply to `HELLO <proto>`.
    pub(super) proto: u8,
    pub(super) hello: Bytes,
}

/// Request bytes a client may have on a shared connection, unanswered, before the proxy stops
/// reading its further requests (per-client flow control, as a dedicated connection's socket
/// buffers give; the batch that crosses it still goes).
pub(super) const INFLIGHT_MAX: usize = 256 * 1024;
/// Reply bytes waiting for a client beyond which its further requests are not read.
const REPLIES_WAITING_MAX: usize = 1024 * 1024;

impl Link {
    /// Queues a batch. False when the shared connection is gone (nothing was sent).
    pub(super) fn send(&mut self, bytes: Bytes, frames: u32) -> bool {
        let len = bytes.len();
        let ok = self.jobs.send(Job { bytes, frames, reply: self.client.clone() }).is_ok();
        if ok && frames > 0 {
            self.outstanding += u64::from(frames);
            self.inflight.push_back((frames, len));
            self.inflight_bytes += len;
        }
        ok
    }

    /// `frames` replies arrived.
    pub(super) fn answered(&mut self, mut frames: u32) {
        self.outstanding = self.outstanding.saturating_sub(u64::from(frames));
        while frames > 0 {
            let Some(front) = self.inflight.front_mut() else { break };
            let n = front.0.min(frames);
            front.0 -= n;
            frames -= n;
            if front.0 == 0 {
                self.inflight_bytes -= front.1;
                self.inflight.pop_front();
            }
        }
    }

    /// False while this client has too much unanswered on the shared connection, or too many
    /// replies waiting for it to take them.
    pub(super) fn may_send(&self) -> bool {
        self.inflight_bytes < INFLIGHT_MAX && self.client.waiting.load(Relaxed) < REPLIES_WAITING_MAX
    }

    /// The next delivery (`Failed` if the shared connection's task is gone without a word).
    pub(super) async fn recv(&mut self) -> Delivery {
        tokio::select! {
            biased;
            d = self.rx.recv() => d.unwrap_or(Delivery::Failed),
            _ = self.jobs.closed(), if self.outstanding > 0 => self.rx.try_recv().unwrap_or(Delivery::Failed),
        }
    }

    /// True while the shared connection is up.
    pub(super) fn alive(&self) -> bool {
        !self.jobs.is_closed()
    }
}

type Creds = (Option<String>, Option<SecretRef>);

/// A shared connection: upstream, credentials, protocol, its HELLO reply, its task's queue.
#[derive(Debug)]
struct Entry {
    upstream: String,
    creds: Creds,
    proto: u8,
    hello: Bytes,
    jobs: mpsc::WeakUnboundedSender<Job>,
}

/// The listener's shared connections, by upstream address and credentials.
#[derive(Debug, Default)]
pub struct MuxPool {
    conns: Mutex<Vec<Entry>>,
    /// One opener at a time per shared connection (clients that log in together join the
    /// connection the first of them opens, rather than each opening one).
    gates: Mutex<Vec<GateEntry>>,
}

/// A gate with its key: upstream address, credentials, protocol.
type GateEntry = (String, Creds, u8, Arc<Gate>);

/// One attempt at a time at something several sessions want at once (opening a shared
/// connection, fetching the command table).
#[derive(Debug, Default)]
pub(super) struct Gate {
    pub(super) turn: tokio::sync::Mutex<()>,
    /// Failed attempts so far: a client that waited for an attempt that failed does not queue
    /// another one behind it (with an upstream that times out, each would wait for all before).
    pub(super) failures: AtomicUsize,
}

impl MuxPool {
    /// A link to the live shared connection for `upstream`, `creds` and protocol `proto`, if
    /// there is one.
    pub(super) fn link(&self, upstream: &str, creds: &Creds, proto: u8) -> Option<Link> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        // A connection whose task has ended is never handed out (idle links may still hold it).
        conns.retain(|e| e.jobs.upgrade().is_some_and(|tx| !tx.is_closed()));
        let e = conns.iter().find(|e| e.upstream == upstream && &e.creds == creds && e.proto == proto)?;
        let jobs = e.jobs.upgrade()?;
        (!jobs.is_closed()).then(|| new_link(jobs, proto, e.hello.clone()))
    }

    /// The opening gate for `upstream`, `creds` and `proto` (the keys come from the
    /// configuration's users, so the list stays small).
    pub(super) fn gate(&self, upstream: &str, creds: &Creds, proto: u8) -> Arc<Gate> {
        let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((.., g)) = gates.iter().find(|(u, c, p, _)| u == upstream && c == creds && *p == proto) {
            return g.clone();
        }
        let g = Arc::new(Gate::default());
        gates.push((upstream.to_string(), creds.clone(), proto, g.clone()));
        g
    }

    /// Starts a shared connection over `io` (logged in with `creds`, speaking `proto`, whose
    /// HELLO reply was `hello`) and links to it.
    pub(super) fn start(
        &self,
        upstream: &str,
        creds: Creds,
        proto: u8,
        hello: Bytes,
        io: Stream,
        shared: Arc<crate::app::Shared>,
    ) -> Link {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(io, rx, shared));
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.retain(|e| e.jobs.strong_count() > 0);
        conns.push(Entry { upstream: upstream.to_string(), creds, proto, hello: hello.clone(), jobs: tx.downgrade() });
        new_link(tx, proto, hello)
    }
}

fn new_link(jobs: mpsc::UnboundedSender<Job>, proto: u8, hello: Bytes) -> Link {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = Client::new(tx);
    Link { jobs, client, rx, outstanding: 0, inflight: VecDeque::new(), inflight_bytes: 0, proto, hello }
}

/// A job whose replies are being read.
struct Waiting {
    /// The last job of its write.
    ends_write: bool,
    frames_left: u32,
    /// Frames complete in the buffer, not yet delivered.
    ready: u32,
    /// Bytes of its reply still arriving already handed to the client (streamed).
    streamed: usize,
    reply: Arc<Client>,
}

/// Writes a shared connection has unanswered before it holds further batches back.
const WRITES_IN_FLIGHT: usize = 1;
/// Scheduler rounds a write waits for more batches (while each round brings some).
const YIELDS_MAX: usize = 4;
/// Largest write assembled from queued batches.
const WRITE_MAX: usize = 256 * 1024;
const READ_MIN: usize = 16 * 1024;
const READ_MAX: usize = 256 * 1024;

/// The shared connection's task: ends when the upstream fails or no client links to it.
async fn run(mut io: Stream, mut jobs: mpsc::UnboundedReceiver<Job>, shared: Arc<crate::app::Shared>) {
    let memory = shared.request_memory.clone();
    let mut waiting: VecDeque<Waiting> = VecDeque::new();
    let mut buf = BytesMut::with_capacity(READ_MIN);
    let mut scanner = Scanner::default();
    let mut out: Vec<u8> = Vec::new();
    let mut held = Held::new(memory.clone());
    let mut want = READ_MIN;
    // writes whose replies are not all in
    let mut writes = 0usize;
    let failed = loop {
        // A reply being streamed waits for its client to take what it has (see STREAM_AHEAD).
        let pace = waiting.front().map(|w| &w.reply).filter(|c| {
            waiting[0].streamed > 0
                && c.waiting.load(Relaxed) > STREAM_AHEAD
                && !c.stalled.load(Relaxed)
                && !c.refused.load(Relaxed)
                && !c.tx.is_closed()
        });
        let pace = pace.cloned();
        tokio::select! {
            taken = async {
                match &pace {
                    Some(c) => tokio::time::timeout(STREAM_STALL_MAX, c.drained.notified()).await.is_ok(),
                    None => std::future::pending().await,
                }
            }, if pace.is_some() => {
                if !taken && let Some(c) = &pace {
                    c.stalled.store(true, Relaxed);
                }
            }
            // Nagle's rule for the shared connection: while writes are unanswered, batches
            // queue up and go together (however many clients, one write per round trip);
            // an idle connection writes at once.
            j = jobs.recv(), if writes < WRITES_IN_FLIGHT => {
                let Some(first) = j else { break false };
                // Let the other clients made ready by the same poll queue their batches first,
                // as long as more keep coming: every batch queued by then goes in one write.
                let mut batch = vec![first];
                let mut size = batch[0].bytes.len();
                for round in 0..YIELDS_MAX {
                    tokio::task::yield_now().await;
                    let before = batch.len();
                    while size < WRITE_MAX {
                        match jobs.try_recv() {
                            Ok(j) => {
                                size += j.bytes.len();
                                batch.push(j);
                            }
                            Err(_) => break,
                        }
                    }
                    if (round > 0 && batch.len() == before) || size >= WRITE_MAX {
                        break;
                    }
                }
                let res = if batch.len() == 1 || size > WRITE_MAX {
                    // one batch, or large ones: written as they are (no copy)
                    let mut res = Ok(());
                    for j in &batch {
                        res = io.write_all(&j.bytes).await;
                        if res.is_err() {
                            break;
                        }
                    }
                    res
                } else {
                    out.clear();
                    for j in &batch {
                        out.extend_from_slice(&j.bytes);
                    }
                    io.write_all(&out).await
                };
                if out.capacity() > WRITE_MAX * 2 {
                    out = Vec::new();
                }
                for j in batch {
                    if j.frames > 0 {
                        waiting.push_back(Waiting {
                            ends_write: false,
                            frames_left: j.frames,
                            ready: 0,
                            streamed: 0,
                            reply: j.reply,
                        });
                    }
                }
                if let Some(w) = waiting.back_mut()
                    && !w.ends_write
                {
                    w.ends_write = true;
                    writes += 1;
                }
                if res.is_err() || io.flush().await.is_err() {
                    break true;
                }
            }
            r = async {
                if buf.capacity() - buf.len() < want / 4 {
                    buf.reserve(want);
                }
                io.read_buf(&mut buf).await
            }, if pace.is_none() => {
                let n = match r {
                    Ok(0) | Err(_) => break true,
                    Ok(n) => n,
                };
                if n >= want / 2 {
                    want = (want * 2).min(READ_MAX);
                }
                let limit = shared.config().limits.max_buffered_bytes;
                if !deliver(&mut buf, &mut scanner, &mut waiting, &mut held, limit, &mut writes) {
                    tracing::warn!("malformed or unasked-for reply on a shared upstream connection");
                    break true;
                }
                // A reply still arriving is held against the buffer budget. Past it, its client
                // gets an error instead, and since the rest of the stream cannot be read without
                // holding that reply, the shared connection ends (its other clients are told).
                if !held.hold(buf.len(), limit) {
                    tracing::warn!(pending = buf.len(), "buffer memory budget exhausted: dropping a shared connection");
                    // (a push arriving is nobody's reply: then all of them are just told it failed)
                    if !matches!(scanner.partial(), Some((.., b'>')))
                        && let Some(w) = waiting.pop_front()
                    {
                        w.reply.send(Delivery::TooLarge);
                    }
                    break true;
                }
                if buf.capacity() > READ_MAX * 4 && buf.len() <= READ_MAX {
                    buf = BytesMut::from(&buf[..]);
                }
            }
        }
    };
    drop(held);
    if failed {
        tracing::warn!("shared upstream connection lost");
    }
    // Everyone still owed a reply, queued or in the channel, learns it will not come.
    jobs.close();
    for w in waiting {
        w.reply.send(Delivery::Failed);
    }
    while let Ok(j) = jobs.try_recv() {
        if j.frames > 0 {
            j.reply.send(Delivery::Failed);
        }
    }
    let _ = io.shutdown().await;
}

/// Hands every complete reply in `buf` to the client it answers. False on a malformed stream
/// (or replies nobody asked for).
fn deliver(
    buf: &mut BytesMut,
    scanner: &mut Scanner,
    waiting: &mut VecDeque<Waiting>,
    held: &mut Held,
    limit: u64,
    writes: &mut usize,
) -> bool {
    let memory = held.budget().clone();
    let memory = &memory;
    let mut end_of_ready = 0;
    loop {
        let next = match scanner.next(buf, false) {
            Ok(n) => n,
            Err(_) => return false,
        };
        let Some((start, end, kind)) = next else { break };
        if matches!(kind, ReplyKind::Push(_)) {
            // No client on a shared connection subscribes or tracks (they move to their own),
            // so a push answers no request here: say, an invalidation another client redirected
            // to this connection (CLIENT TRACKING … REDIRECT <id>). It is dropped: counted as a
            // reply it would misroute the rest; ending the connection would let anyone end it.
            // (Redis writes a push between replies, never inside one.)
            if end_of_ready > 0
                && let Some(w) = waiting.front_mut()
            {
                hand_so_far(w, take_front(buf, scanner, held, limit, end_of_ready), 0, memory, limit);
                end_of_ready = 0;
            }
            take_front(buf, scanner, held, limit, end - start);
            tracing::debug!("dropped a push on a shared upstream connection");
            continue;
        }
        let Some(w) = waiting.front_mut() else { return false };
        w.frames_left -= 1;
        w.ready += 1;
        end_of_ready = end;
        if w.frames_left == 0 {
            let chunk = take_front(buf, scanner, held, limit, end_of_ready);
            end_of_ready = 0;
            if let Some(w) = waiting.pop_front() {
                if w.ends_write {
                    *writes -= 1;
                }
                hand(&w.reply, w.ready, chunk, (w.streamed, 0), memory, limit);
            }
        }
    }
    // The head job's complete replies so far go now (its last ones are still arriving), with
    // what has come of the one still arriving: its client streams it (a large value is not
    // held here whole). A push is dropped whole, so none of one goes.
    let streaming = waiting.front().is_some_and(|w| w.streamed > 0);
    let upto = match scanner.partial() {
        Some((start, walked, top))
            if (walked - start >= STREAM_MIN || (streaming && walked > start)) && top != b'>' =>
        {
            debug_assert_eq!(start, end_of_ready);
            walked
        }
        _ => end_of_ready,
    };
    if upto > 0
        && let Some(w) = waiting.front_mut()
    {
        let part = upto - end_of_ready;
        hand_so_far(w, take_front(buf, scanner, held, limit, upto), part, memory, limit);
    }
    true
}

/// Takes `n` scanned bytes off the front of the read buffer: the scanner is told, and the
/// buffer's charge is lowered to what stays (bytes handed to a client are charged there, not
/// twice).
fn take_front(buf: &mut BytesMut, scanner: &mut Scanner, held: &mut Held, limit: u64, n: usize) -> Bytes {
    let chunk = buf.split_to(n).freeze();
    scanner.consumed(n);
    let _ = held.hold(buf.len(), limit);
    chunk
}

/// Hands the head job's complete replies so far (`chunk`) to its client; the rest follow.
/// `part`: bytes at its end of a reply still arriving (the rest of one streamed before, when
/// no reply completes in it).
fn hand_so_far(w: &mut Waiting, chunk: Bytes, part: usize, memory: &Arc<RequestMemory>, limit: u64) {
    let completes = w.ready > 0;
    hand(&w.reply, w.ready, chunk, (w.streamed, part), memory, limit);
    w.streamed = if completes { part } else { w.streamed + part };
    w.ready = 0;
}

/// Sends `frames` complete replies (and the start of one still arriving) to client `c`, charged
/// to the budget while they wait there.
/// `parts`: bytes of the first reply in `chunk` handed before (parts of one reply count as a
/// first reply, not as replies piling up), and bytes at its end of one still arriving.
fn hand(c: &Arc<Client>, frames: u32, chunk: Bytes, parts: (usize, usize), memory: &Arc<RequestMemory>, limit: u64) {
    let (streamed, part) = parts;
    // Every byte waiting for its client is charged (a client that does not read cannot pile
    // up replies beyond the budget, nor beyond its share of it once something waits).
    if c.refused.load(Relaxed) {
        return;
    }
    let n = chunk.len();
    let before = c.waiting.fetch_add(n, Relaxed);
    // A client's share only counts when memory is short: a client reading slowly is slowed
    // down (flow control), not refused, while there is room.
    let share = (limit / 4).min(CLIENT_WAITING_MAX);
    let short = memory.used() > limit / 2;
    // Parts of one reply count as one first reply, unless the client stopped taking them (then
    // they count against its share like replies piling up).
    let others = if c.stalled.load(Relaxed) { before } else { before.saturating_sub(streamed) };
    let charge =
        if short && others > 0 && (before + n) as u64 > share { None } else { Held::whole(memory.clone(), n, limit) };
    // A small piece gets its own allocation rather than keep the whole read buffer alive while
    // it waits.
    let chunk = if n < COPY_BELOW { Bytes::copy_from_slice(&chunk) } else { chunk };
    match charge {
        Some(g) => {
            let whole = streamed == 0 && part == 0;
            c.send(Delivery::Replies {
                bytes: chunk,
                frames,
                whole,
                charge: Charge { _global: g, client: c.clone(), n },
            })
        }
        None => {
            c.waiting.fetch_sub(n, Relaxed);
            c.refused.store(true, Relaxed);
            c.send(Delivery::TooLarge);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::memory::FREE_PER_CONNECTION;

    fn waiting(frames: u32) -> (Waiting, mpsc::UnboundedReceiver<Delivery>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let c = Client::new(tx);
        (Waiting { ends_write: true, frames_left: frames, ready: 0, streamed: 0, reply: c }, rx)
    }

    fn got(rx: &mut mpsc::UnboundedReceiver<Delivery>) -> Vec<(Vec<u8>, u32)> {
        let mut v = Vec::new();
        while let Ok(d) = rx.try_recv() {
            match d {
                Delivery::Replies { bytes, frames, .. } => v.push((bytes.to_vec(), frames)),
                Delivery::Failed => v.push((b"failed".to_vec(), 0)),
                Delivery::TooLarge => v.push((b"toolarge".to_vec(), 0)),
            }
        }
        v
    }

    #[test]
    fn replies_go_to_their_clients_in_order_as_they_arrive() {
        let mem = Arc::new(RequestMemory::default());
        let (a, mut ra) = waiting(2);
        let (b, mut rb) = waiting(1);
        let mut q = VecDeque::from([a, b]);
        let mut s = Scanner::default();
        let mut w = 2;
        let mut held = Held::new(mem.clone());
        let mut buf = BytesMut::from(&b"+OK\r\n$3\r\nab"[..]);
        assert!(deliver(&mut buf, &mut s, &mut q, &mut held, u64::MAX, &mut w));
        assert_eq!(got(&mut ra), vec![(b"+OK\r\n".to_vec(), 1)], "a frame goes at once, a small part waits");
        buf.extend_from_slice(b"c\r\n:1\r\n");
        assert!(deliver(&mut buf, &mut s, &mut q, &mut held, u64::MAX, &mut w));
        assert_eq!(got(&mut ra), vec![(b"$3\r\nabc\r\n".to_vec(), 1)]);
        assert_eq!(got(&mut rb), vec![(b":1\r\n".to_vec(), 1)]);
        assert!(buf.is_empty() && q.is_empty());
        assert_eq!(w, 0, "both writes answered");
        buf.extend_from_slice(b"+unasked\r\n");
        assert!(!deliver(&mut buf, &mut s, &mut q, &mut held, u64::MAX, &mut w), "a reply nobody asked for");
    }

    #[test]
    fn none_of_a_push_still_arriving_is_handed_over() {
        let mem = Arc::new(RequestMemory::default());
        let (a, mut ra) = waiting(1);
        let mut q = VecDeque::from([a]);
        let (mut s, mut w, mut held) = (Scanner::default(), 1, Held::new(mem.clone()));
        let mut buf = BytesMut::from(&b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1"[..]);
        assert!(deliver(&mut buf, &mut s, &mut q, &mut held, u64::MAX, &mut w));
        assert!(got(&mut ra).is_empty());
        buf.extend_from_slice(b"\r\nk\r\n$1\r\nv");
        assert!(deliver(&mut buf, &mut s, &mut q, &mut held, u64::MAX, &mut w));
        buf.extend_from_slice(b"\r\n");
        assert!(deliver(&mut buf, &mut s, &mut q, &mut held, u64::MAX, &mut w));
        let all: Vec<u8> = got(&mut ra).into_iter().flat_map(|(b, _)| b).collect();
        assert_eq!(all, b"$1\r\nv\r\n", "the push dropped whole, the reply streamed");
        assert!(buf.is_empty() && q.is_empty());
    }

    #[test]
    fn a_push_on_a_shared_connection_is_dropped() {
        let mem = Arc::new(RequestMemory::default());
        let (a, mut ra) = waiting(2);
        let (b, mut rb) = waiting(1);
        let mut q = VecDeque::from([a, b]);
        let (mut s, mut w, mut held) = (Scanner::default(), 2, Held::new(mem.clone()));
        let push = ">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n";
        let mut buf = BytesMut::from(format!("{push}:1\r\n{push}+OK\r\n{push}$1\r\nv\r\n{push}").as_bytes());
        assert!(deliver(&mut buf, &mut s, &mut q, &mut held, u64::MAX, &mut w));
        assert_eq!(got(&mut ra), vec![(b":1\r\n".to_vec(), 1), (b"+OK\r\n".to_vec(), 1)], "its replies only");
        assert_eq!(got(&mut rb), vec![(b"$1\r\nv\r\n".to_vec(), 1)], "and the next client's are its own");
        assert!(buf.is_empty() && q.is_empty());
    }

    #[test]
    fn replies_over_the_budget_are_refused() {
        let mem = Arc::new(RequestMemory::default());
        let (a, mut ra) = waiting(1);
        let mut q = VecDeque::from([a]);
        let mut s = Scanner::default();
        let mut w = 1;
        let big = vec![b'x'; FREE_PER_CONNECTION + 10];
        let mut buf = BytesMut::from(format!("${}\r\n", big.len()).as_bytes());
        buf.extend_from_slice(&big);
        buf.extend_from_slice(b"\r\n");
        let mut held = Held::new(mem.clone());
        assert!(deliver(&mut buf, &mut s, &mut q, &mut held, 5, &mut w));
        assert_eq!(got(&mut ra), vec![(b"toolarge".to_vec(), 0)]);
        assert_eq!(mem.used(), 0);
    }

    #[test]
    fn a_reply_handed_over_in_parts_is_one_first_reply() {
        let mem = Arc::new(RequestMemory::default());
        let (a, mut ra) = waiting(1);
        let mut q = VecDeque::from([a]);
        let (mut s, mut w, mut held) = (Scanner::default(), 1, Held::new(mem.clone()));
        let body = vec![b'x'; FREE_PER_CONNECTION + 100_000];
        let mut reply = format!("${}\r\n", body.len()).into_bytes();
        reply.extend_from_slice(&body);
        reply.extend_from_slice(b"\r\n");
        // the whole reply fits the budget, but not twice
        let limit = reply.len() as u64;
        let mut buf = BytesMut::from(&reply[..reply.len() - 10]);
        assert!(deliver(&mut buf, &mut s, &mut q, &mut held, limit, &mut w));
        assert!(held.hold(buf.len(), limit), "what stays is held, as run() does");
        assert!(mem.used() > limit as u64 / 2, "the part handed over waits for the client, charged");
        buf.extend_from_slice(&reply[reply.len() - 10..]);
        assert!(deliver(&mut buf, &mut s, &mut q, &mut held, limit, &mut w));
        // its first part not taken yet: the rest is still the same first reply, not refused
        let parts = got(&mut ra);
        assert_eq!(parts.iter().map(|p| p.1).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(parts.into_iter().flat_map(|p| p.0).collect::<Vec<u8>>(), reply, "handed over, not refused");
        assert_eq!(mem.used(), 0, "released once the client has it");
    }
}
