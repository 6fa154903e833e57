//! Reply ordering: every request the session handles leaves a slot here (so many upstream
//! replies to pass on, a reply the proxy makes itself, upstream replies to swallow); upstream
//! bytes are framed and matched to slots so proxy-made replies land exactly where Redis would
//! have put its own. Pub/sub messages (RESP2 subscribed mode, RESP3 pushes) pass through
//! without consuming a slot. No I/O here.

use std::collections::{HashSet, VecDeque};
use std::ops::Range;

use bytes::Bytes;

use super::codec::ReplyKind;

/// Which subscription family an argument-less unsubscribe concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SubKind {
    Channel,
    Pattern,
    Shard,
}

/// A state change that takes effect once a reply has gone by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Effect {
    None,
    /// HELLO <v>: the reply stream switches protocol after a successful reply.
    Hello(u8),
    /// RESET: back to RESP2, no subscriptions.
    Reset,
    /// The proxy's own AUTH upstream (re-authentication): an error reply means the session
    /// can no longer be trusted to run as the new user (`auth_rejected`).
    AuthCheck,
    /// EXEC of a transaction the proxy added commands to: its array loses their results (the
    /// mask is the next in `exec_masks`).
    ExecStrip,
}

/// What one request expects back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Slot {
    /// `n` upstream replies; `visible`: they go to the client (else they are dropped: the
    /// proxy's own commands, or CLIENT REPLY OFF/SKIP); `sub`: a (P|S)(UN)SUBSCRIBE request,
    /// whose replies update the subscription state.
    Forward { n: u32, effect: Effect, visible: bool, sub: bool },
    /// Argument-less (P|S)UNSUBSCRIBE: one reply per subscription at that point, at least one.
    UnsubAll { kind: SubKind, visible: bool },
    /// A reply the proxy makes.
    Local(Bytes),
}

impl Slot {
    /// `n` replies for the client.
    pub(super) fn forward(n: u32) -> Slot {
        Slot::Forward { n, effect: Effect::None, visible: true, sub: false }
    }

    /// `n` replies the client must not see.
    pub(super) fn swallow(n: u32) -> Slot {
        Slot::Forward { n, effect: Effect::None, visible: false, sub: false }
    }

    /// The same slot, hidden from the client (CLIENT REPLY OFF/SKIP); None for local replies.
    pub(super) fn hidden(self) -> Option<Slot> {
        match self {
            Slot::Forward { n, effect, sub, .. } => Some(Slot::Forward { n, effect, visible: false, sub }),
            Slot::UnsubAll { kind, .. } => Some(Slot::UnsubAll { kind, visible: false }),
            Slot::Local(_) => None,
        }
    }
}

/// A piece of output for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Out {
    /// Bytes of the upstream chunk being processed.
    Upstream(Range<usize>),
    /// A proxy-made reply.
    Local(Bytes),
}

/// The ordering state of one session.
#[derive(Debug, Default)]
pub(super) struct Replies {
    queue: VecDeque<Slot>,
    /// Replies are RESP3 (after a successful HELLO 3).
    pub(super) resp3: bool,
    channels: HashSet<Vec<u8>>,
    patterns: HashSet<Vec<u8>>,
    shard: HashSet<Vec<u8>>,
    /// Set when an `AuthCheck` reply was an error; the session reads and clears it.
    pub(super) auth_rejected: bool,
    /// Where the reply being read stands (resumable across reads).
    scanner: super::scan::Scanner,
    /// Keep-masks of pending `ExecStrip` EXECs, in order.
    exec_masks: VecDeque<Vec<bool>>,
    /// Upstream replies expected so far (the frame count of what goes to a shared connection).
    pub(super) frames_expected: u64,
    /// Part of the reply still arriving has gone to the client (streamed): nothing may be
    /// written in its place or before its end.
    pub(super) mid_reply: bool,
}

/// EXEC's array without the elements `mask` says to drop; None when the reply is not an array
/// of exactly `mask.len()` elements (nil after WATCH, EXECABORT, ...): then it goes as is.
fn strip_exec(frame: &[u8], mask: &[bool]) -> Option<Bytes> {
    if frame.first() != Some(&b'*') {
        return None;
    }
    let eol = frame.windows(2).position(|w| w == b"\r\n")?;
    let n: usize = std::str::from_utf8(&frame[1..eol]).ok()?.parse().ok()?;
    if n != mask.len() {
        return None;
    }
    let body = &frame[eol + 2..];
    let mut scanner = super::scan::Scanner::default();
    let mut out = format!("*{}\r\n", mask.iter().filter(|k| **k).count()).into_bytes();
    let mut pos = 0;
    for keep in mask {
        let (start, end, _) = scanner.next(body, true).ok()??;
        debug_assert_eq!(start, pos);
        if *keep {
            out.extend_from_slice(&body[start..end]);
        }
        pos = end;
    }
    (pos == body.len()).then(|| Bytes::from(out))
}

fn is_message(kind: &str) -> bool {
    matches!(kind, "message" | "pmessage" | "smessage")
}

fn is_sub_reply(kind: &str) -> bool {
    matches!(kind, "subscribe" | "unsubscribe" | "psubscribe" | "punsubscribe" | "ssubscribe" | "sunsubscribe")
}

/// (kind, channel) of a subscription confirmation frame.
fn sub_reply_parts(frame: &[u8], resp3: bool) -> Option<(String, Option<Vec<u8>>)> {
    fn text2(f: &redis_protocol::resp2::types::OwnedFrame) -> Option<Vec<u8>> {
        use redis_protocol::resp2::types::OwnedFrame as F;
        match f {
            F::BulkString(b) | F::SimpleString(b) => Some(b.clone()),
            _ => None,
        }
    }
    fn text3(f: &redis_protocol::resp3::types::OwnedFrame) -> Option<Vec<u8>> {
        use redis_protocol::resp3::types::OwnedFrame as F;
        match f {
            F::BlobString { data, .. } | F::SimpleString { data, .. } => Some(data.clone()),
            _ => None,
        }
    }
    let items: Vec<Option<Vec<u8>>> = if resp3 {
        use redis_protocol::resp3::types::OwnedFrame as F;
        match redis_protocol::resp3::decode::complete::decode(frame).ok()??.0 {
            F::Push { data, .. } | F::Array { data, .. } => data.iter().map(text3).collect(),
            _ => return None,
        }
    } else {
        use redis_protocol::resp2::types::OwnedFrame as F;
        match redis_protocol::resp2::decode::decode(frame).ok()??.0 {
            F::Array(data) => data.iter().map(text2).collect(),
            _ => return None,
        }
    };
    let kind = String::from_utf8_lossy(items.first()?.as_ref()?).to_ascii_lowercase();
    Some((kind, items.get(1).cloned().flatten()))
}

impl Replies {
    /// Registers the keep-mask for the next `ExecStrip` slot.
    pub(super) fn expect_exec_mask(&mut self, mask: Vec<bool>) {
        self.exec_masks.push_back(mask);
    }

    /// Adds a request's slot.
    pub(super) fn push(&mut self, slot: Slot) {
        match slot {
            Slot::Forward { n: 0, .. } => return,
            Slot::Forward { n, .. } => self.frames_expected += u64::from(n),
            _ => {}
        }
        self.queue.push_back(slot);
    }

    /// True when no reply is outstanding.
    pub(super) fn idle(&self) -> bool {
        self.queue.is_empty()
    }

    /// True when the client still waits for a reply it will see (not only hidden ones: the
    /// proxy's own commands, CLIENT REPLY OFF/SKIP).
    pub(super) fn owes_visible(&self) -> bool {
        self.queue.iter().any(|s| match s {
            Slot::Forward { visible, .. } | Slot::UnsubAll { visible, .. } => *visible,
            Slot::Local(_) => true,
        })
    }

    /// True while subscribed to anything.
    pub(super) fn subscribed(&self) -> bool {
        !(self.channels.is_empty() && self.patterns.is_empty() && self.shard.is_empty())
    }

    /// Moves proxy-made replies at the front of the queue to `out`.
    pub(super) fn drain_locals(&mut self, out: &mut Vec<Out>) {
        while let Some(Slot::Local(_)) = self.queue.front() {
            if let Some(Slot::Local(b)) = self.queue.pop_front() {
                out.push(Out::Local(b));
            }
        }
    }

    fn track(&mut self, kind: &str, channel: Option<Vec<u8>>) {
        let Some(ch) = channel else { return };
        match kind {
            "subscribe" => self.channels.insert(ch),
            "unsubscribe" => self.channels.remove(&ch),
            "psubscribe" => self.patterns.insert(ch),
            "punsubscribe" => self.patterns.remove(&ch),
            "ssubscribe" => self.shard.insert(ch),
            "sunsubscribe" => self.shard.remove(&ch),
            _ => false,
        };
    }

    /// A delivery of `frames` whole replies (`len` bytes) from a shared connection, which has
    /// framed them already: when they all answer plain requests (seen by the client, no effect,
    /// no subscription), what the client gets, without scanning the bytes a second time. None
    /// otherwise, and nothing changed: then `on_upstream` frames them.
    pub(super) fn plain_delivery(&mut self, len: usize, frames: u32) -> Option<Vec<Out>> {
        if frames == 0 || !self.scanner.at_rest() || self.subscribed() {
            return None;
        }
        let mut left = frames;
        let mut forwarded = false;
        for s in &self.queue {
            if left == 0 {
                break;
            }
            match s {
                // proxy-made replies before the first of them go first; between them, the slow path
                Slot::Local(_) if !forwarded => {}
                Slot::Forward { n, effect: Effect::None, visible: true, sub: false } => {
                    forwarded = true;
                    left = left.saturating_sub(*n);
                }
                _ => return None,
            }
        }
        if left > 0 {
            return None;
        }
        let mut out = Vec::new();
        self.drain_locals(&mut out);
        out.push(Out::Upstream(0..len));
        let mut left = frames;
        while left > 0 {
            let Some(Slot::Forward { n, .. }) = self.queue.front_mut() else { break };
            let k = (*n).min(left);
            *n -= k;
            left -= k;
            if *n == 0 {
                self.queue.pop_front();
            }
        }
        self.drain_locals(&mut out);
        Some(out)
    }

    /// Frames the complete replies at the start of `buf`, appending what the client gets to
    /// `out`; returns the bytes consumed (a partial reply stays for the next read).
    pub(super) fn on_upstream(&mut self, buf: &[u8], out: &mut Vec<Out>) -> Result<usize, String> {
        let mut pos = 0;
        loop {
            // HELLO's own reply already speaks the protocol it asked for.
            let resp3 = match self.queue.front() {
                Some(Slot::Forward { effect: Effect::Hello(v), .. }) => *v == 3,
                _ => self.resp3,
            };
            let Some((start, end, kind)) = self.scanner.next(buf, resp3)? else { break };
            debug_assert_eq!(start, pos);
            self.mid_reply = false;
            let frame = start..end;
            pos = end;
            // The request this reply may answer: the first slot that is not a proxy-made reply.
            let front_is_sub = matches!(
                self.queue.iter().find(|s| !matches!(s, Slot::Local(_))),
                Some(Slot::Forward { sub: true, .. }) | Some(Slot::UnsubAll { .. })
            );
            match &kind {
                // Pushes that answer no request: messages, invalidations, ...
                ReplyKind::Push(k) if !(front_is_sub && is_sub_reply(k)) => {
                    out.push(Out::Upstream(frame));
                    continue;
                }
                ReplyKind::Array(k) if !self.resp3 && self.subscribed() && is_message(k) => {
                    out.push(Out::Upstream(frame));
                    continue;
                }
                _ => {}
            }
            self.drain_locals(out);
            if let Some(Slot::UnsubAll { kind: k, visible }) = self.queue.front() {
                let n = match k {
                    SubKind::Channel => self.channels.len(),
                    SubKind::Pattern => self.patterns.len(),
                    SubKind::Shard => self.shard.len(),
                };
                self.queue[0] =
                    Slot::Forward { n: n.max(1) as u32, effect: Effect::None, visible: *visible, sub: true };
            }
            let is_error = kind == ReplyKind::Error;
            if front_is_sub
                && !is_error
                && let Some((k, ch)) = sub_reply_parts(&buf[frame.clone()], resp3)
            {
                self.track(&k, ch);
            }
            match self.queue.front_mut() {
                Some(Slot::Forward { n, effect: Effect::ExecStrip, visible, .. }) => {
                    let mask = self.exec_masks.pop_front().unwrap_or_default();
                    if *visible {
                        match strip_exec(&buf[frame.clone()], &mask) {
                            Some(stripped) => out.push(Out::Local(stripped)),
                            None => out.push(Out::Upstream(frame)),
                        }
                    }
                    *n -= 1;
                    if *n == 0 {
                        self.queue.pop_front();
                    }
                }
                Some(Slot::Forward { n, effect, visible, sub }) => {
                    if *visible {
                        out.push(Out::Upstream(frame));
                    }
                    // A refused SUBSCRIBE answers once, whatever the number of channels.
                    *n = if *sub && is_error { 0 } else { *n - 1 };
                    if *n == 0 {
                        match *effect {
                            Effect::Hello(v) if !is_error => self.resp3 = v == 3,
                            Effect::Reset => {
                                self.resp3 = false;
                                self.channels.clear();
                                self.patterns.clear();
                                self.shard.clear();
                            }
                            Effect::AuthCheck if is_error => self.auth_rejected = true,
                            _ => {}
                        }
                        self.queue.pop_front();
                    }
                }
                // Nothing expected: pass it on.
                _ => out.push(Out::Upstream(frame)),
            }
            if self.auth_rejected {
                // The session ends here: nothing after the refusal goes to the client.
                self.scanner.consumed(pos);
                return Ok(pos);
            }
            // Proxy-made replies it was waiting for go now (before a push that may follow).
            self.drain_locals(out);
        }
        self.drain_locals(out);
        // A reply still arriving that answers a plain request (no effect, no subscription, not
        // an error) needs nothing of its later bytes: what came of it goes on now, so a large
        // value is held a read at a time, not whole. Its slot is settled when it completes.
        if let Some((start, walked, top)) = self.scanner.partial()
            && walked > start
            && !matches!(top, b'>' | b'-' | b'!' | b'|')
            && !self.subscribed()
            && let Some(Slot::Forward { effect: Effect::None, visible, sub: false, .. }) = self.queue.front()
        {
            debug_assert_eq!(start, pos);
            if *visible {
                out.push(Out::Upstream(start..walked));
                self.mid_reply = true;
            }
            pos = walked;
        }
        self.scanner.consumed(pos);
        Ok(pos)
    }
}

/// Fuzzing entry (`crate::fuzzing::replies`): upstream bytes `data[2..]` answer a queue of
/// slots (mixed from `data[1]`: plain, hidden, proxy-made, (un)subscribe, HELLO, RESET, the
/// proxy's AUTH check) in reads of `data[0] + 1`
/// bytes. What the client gets must not depend on where the reads split, streaming included:
/// it equals what one read of everything gives; an unparseable stream fails either way.
#[doc(hidden)]
pub(crate) fn fuzz_read_splits(data: &[u8]) {
    let (Some(&chunk), Some(&shape), Some(upstream)) = (data.first(), data.get(1), data.get(2..)) else { return };
    let queue = || {
        let mut r = Replies::default();
        for i in 0..64u32 {
            let with = |effect, sub| Slot::Forward { n: 1, effect, visible: true, sub };
            r.push(match (u32::from(shape).wrapping_mul(2 * i + 1) >> (i % 5)) & 15 {
                0..=5 => Slot::forward(1 + i % 2),
                6 | 7 => Slot::swallow(1),
                8 | 9 => Slot::Local(Bytes::from_static(b"-NOPERM local\r\n")),
                10 => with(Effect::None, true),
                11 => with(Effect::Hello(3), false),
                12 => with(Effect::Hello(2), false),
                13 => with(Effect::Reset, false),
                14 => Slot::UnsubAll { kind: SubKind::Channel, visible: true },
                _ => Slot::Forward { n: 1, effect: Effect::AuthCheck, visible: false, sub: false },
            });
        }
        r
    };
    let run = |size: usize| -> Option<Vec<u8>> {
        let mut r = queue();
        let (mut buf, mut got) = (Vec::new(), Vec::new());
        // as the session does once the requests are queued
        let mut first = Vec::new();
        r.drain_locals(&mut first);
        for o in first {
            if let Out::Local(b) = o {
                got.extend_from_slice(&b);
            }
        }
        for piece in upstream.chunks(size.max(1)) {
            buf.extend_from_slice(piece);
            let mut out = Vec::new();
            let used = r.on_upstream(&buf, &mut out).ok()?;
            assert!(used <= buf.len());
            for o in out {
                match o {
                    Out::Upstream(rg) => got.extend_from_slice(&buf[rg]),
                    Out::Local(b) => got.extend_from_slice(&b),
                }
            }
            buf.drain(..used);
            if r.auth_rejected {
                break; // the session ends
            }
        }
        Some(got)
    };
    let (split, whole) = (run(usize::from(chunk) + 1), run(upstream.len()));
    assert_eq!(split.is_some(), whole.is_some(), "an error must not depend on read splits");
    assert!(split == whole, "the client's bytes must not depend on read splits");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(r: &mut Replies, upstream: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let used = r.on_upstream(upstream, &mut out).unwrap();
        assert_eq!(used, upstream.len());
        out.into_iter()
            .map(|o| match o {
                Out::Upstream(rg) => upstream[rg].to_vec(),
                Out::Local(b) => b.to_vec(),
            })
            .collect()
    }

    fn fwd(n: u32) -> Slot {
        Slot::forward(n)
    }

    fn sub(n: u32) -> Slot {
        Slot::Forward { n, effect: Effect::None, visible: true, sub: true }
    }

    #[test]
    fn plain_deliveries_match_the_framing_path() {
        let frames = b"+A\r\n$1\r\nB\r\n:3\r\n";
        let local = || Slot::Local(Bytes::from_static(b"-NOPERM x\r\n"));
        let hello = Slot::Forward { n: 3, effect: Effect::Hello(3), visible: true, sub: false };
        let cases: Vec<(Vec<Slot>, bool)> = vec![
            (vec![fwd(3)], true),
            (vec![fwd(1), fwd(2)], true),
            (vec![local(), fwd(2), fwd(1), local()], true),
            (vec![fwd(4), local()], true), // one still to come: the local waits
            (vec![fwd(1), local(), fwd(2)], false),
            (vec![fwd(1), Slot::swallow(1), fwd(1)], false),
            (vec![fwd(2)], false), // more replies than requests
            (vec![hello], false),
            (vec![fwd(2), sub(1)], false),
        ];
        for (slots, plain) in cases {
            let (mut fast, mut slow) = (Replies::default(), Replies::default());
            for s in &slots {
                fast.push(s.clone());
                slow.push(s.clone());
            }
            let got = fast.plain_delivery(frames.len(), 3);
            assert_eq!(got.is_some(), plain, "{slots:?}");
            let Some(out) = got else {
                assert_eq!(fast.queue, VecDeque::from(slots.clone()), "untouched when not plain");
                continue;
            };
            let bytes: Vec<u8> = out
                .into_iter()
                .flat_map(|o| match o {
                    Out::Upstream(r) => frames[r].to_vec(),
                    Out::Local(b) => b.to_vec(),
                })
                .collect();
            assert_eq!(bytes, run(&mut slow, frames).concat(), "{slots:?}");
            assert_eq!(fast.queue, slow.queue, "{slots:?}");
        }
    }

    #[test]
    fn local_replies_keep_their_place() {
        let mut r = Replies::default();
        r.push(fwd(1));
        r.push(Slot::Local(Bytes::from_static(b"-NOPERM x\r\n")));
        r.push(fwd(1));
        let mut out = Vec::new();
        r.drain_locals(&mut out);
        assert!(out.is_empty(), "the local waits for the first reply");
        let got = run(&mut r, b"+A\r\n+B\r\n");
        assert_eq!(got, vec![b"+A\r\n".to_vec(), b"-NOPERM x\r\n".to_vec(), b"+B\r\n".to_vec()]);
        assert!(r.idle());
    }

    #[test]
    fn swallowed_and_partial_replies() {
        let mut r = Replies::default();
        r.push(Slot::swallow(1));
        r.push(Slot::Local(Bytes::from_static(b"-EXECABORT\r\n")));
        let mut out = Vec::new();
        let used = r.on_upstream(b"+OK\r\n$5\r\nhel", &mut out).unwrap();
        assert_eq!(used, 5);
        assert_eq!(out, vec![Out::Local(Bytes::from_static(b"-EXECABORT\r\n"))]);
    }

    #[test]
    fn resp2_pubsub_messages_do_not_consume_slots() {
        let mut r = Replies::default();
        r.push(sub(2)); // SUBSCRIBE a b
        let sub = b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n";
        assert_eq!(run(&mut r, sub).len(), 2);
        assert!(r.subscribed() && r.idle());
        r.push(Slot::UnsubAll { kind: SubKind::Channel, visible: true });
        r.push(Slot::Local(Bytes::from_static(b"-NOPERM y\r\n")));
        let msg = b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$2\r\nhi\r\n";
        let unsub = b"*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$11\r\nunsubscribe\r\n$1\r\nb\r\n:0\r\n";
        let mut input = msg.to_vec();
        input.extend_from_slice(unsub);
        let got = run(&mut r, &input);
        assert_eq!(got.len(), 4, "message, two unsubscribes, then the local");
        assert_eq!(got[3], b"-NOPERM y\r\n");
        assert!(!r.subscribed() && r.idle());
    }

    #[test]
    fn data_that_looks_like_pubsub_is_just_data() {
        let mut r = Replies::default();
        // LRANGE of a list holding "subscribe", "x": not a subscription
        r.push(fwd(1));
        run(&mut r, b"*2\r\n$9\r\nsubscribe\r\n$1\r\nx\r\n");
        assert!(!r.subscribed());
        // a refused SUBSCRIBE a b answers once
        r.push(sub(2));
        r.push(Slot::Local(Bytes::from_static(b"-L\r\n")));
        let got = run(&mut r, b"-NOPERM channels\r\n");
        assert_eq!(got, vec![b"-NOPERM channels\r\n".to_vec(), b"-L\r\n".to_vec()]);
        assert!(r.idle() && !r.subscribed());
        // hidden replies (CLIENT REPLY OFF) still count, and an AuthCheck error is noticed: the
        // session ends there, nothing after it goes to the client (it ran as the old user)
        r.push(fwd(1));
        r.push(Slot::Forward { n: 1, effect: Effect::AuthCheck, visible: false, sub: false });
        r.push(fwd(1));
        let mut out = Vec::new();
        let upstream = b"+A\r\n-WRONGPASS x\r\n+OK\r\n";
        assert_eq!(r.on_upstream(upstream, &mut out), Ok(upstream.len() - 5));
        assert_eq!(out, vec![Out::Upstream(0..4)]);
        assert!(r.auth_rejected);
    }

    #[test]
    fn resp3_subscribe_behind_a_local_reply_is_still_counted() {
        let mut r = Replies { resp3: true, ..Replies::default() };
        r.push(fwd(1)); // PING
        r.push(Slot::Local(Bytes::from_static(b"-ERR unknown\r\n")));
        r.push(sub(1)); // SUBSCRIBE ch
        r.push(fwd(1)); // GET a
        let got = run(&mut r, b"+PONG\r\n>3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n$2\r\nva\r\n");
        assert_eq!(got.len(), 4);
        assert_eq!(got[1], b"-ERR unknown\r\n");
        assert!(r.idle() && r.subscribed());
    }

    #[test]
    fn exec_array_loses_the_proxys_own_results() {
        let mut r = Replies::default();
        r.expect_exec_mask(vec![true, false, true]);
        r.push(Slot::Forward { n: 1, effect: Effect::ExecStrip, visible: true, sub: false });
        let got = run(&mut r, b"*3\r\n:1\r\n:1\r\n*2\r\n$1\r\na\r\n$1\r\nb\r\n");
        assert_eq!(got, vec![b"*2\r\n:1\r\n*2\r\n$1\r\na\r\n$1\r\nb\r\n".to_vec()]);
        // a nil EXEC (WATCH) passes unchanged and still uses up its mask
        r.expect_exec_mask(vec![false]);
        r.push(Slot::Forward { n: 1, effect: Effect::ExecStrip, visible: true, sub: false });
        assert_eq!(run(&mut r, b"*-1\r\n"), vec![b"*-1\r\n".to_vec()]);
        assert!(r.idle() && r.exec_masks.is_empty());
    }

    #[test]
    fn resp3_pushes_and_hello_switch() {
        let mut r = Replies::default();
        r.push(Slot::Forward { n: 1, effect: Effect::Hello(3), visible: true, sub: false });
        run(&mut r, b"%1\r\n$6\r\nserver\r\n$5\r\nredis\r\n");
        assert!(r.resp3);
        r.push(fwd(1));
        let push = b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nx\r\n";
        let mut input = push.to_vec();
        input.extend_from_slice(b"_\r\n");
        let got = run(&mut r, &input);
        assert_eq!(got.len(), 2);
        assert!(r.idle());
        r.push(Slot::Forward { n: 1, effect: Effect::Reset, visible: true, sub: false });
        run(&mut r, b"+RESET\r\n");
        assert!(!r.resp3);
        // a failed HELLO 3 does not switch
        r.push(Slot::Forward { n: 1, effect: Effect::Hello(3), visible: true, sub: false });
        run(&mut r, b"-NOPROTO unsupported protocol version\r\n");
        assert!(!r.resp3);
    }

    /// Feeds `upstream` in `chunk`-byte reads, as the session does (it drops what was used);
    /// returns what the client got after each read.
    fn feed(r: &mut Replies, upstream: &[u8], chunk: usize) -> Vec<Vec<u8>> {
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for piece in upstream.chunks(chunk) {
            buf.extend_from_slice(piece);
            let mut out = Vec::new();
            let used = r.on_upstream(&buf, &mut out).unwrap();
            let mut now = Vec::new();
            for o in out {
                match o {
                    Out::Upstream(rg) => now.extend_from_slice(&buf[rg]),
                    Out::Local(b) => now.extend_from_slice(&b),
                }
            }
            got.push(now);
            buf.drain(..used);
        }
        assert!(buf.is_empty(), "all of it used by the end");
        got
    }

    #[test]
    fn a_plain_reply_is_streamed_as_it_arrives_and_the_order_kept() {
        let value = vec![b'v'; 10_000];
        let mut big = format!("${}\r\n", value.len()).into_bytes();
        big.extend_from_slice(&value);
        big.extend_from_slice(b"\r\n");
        let mut arr = b"*3\r\n$5\r\nfirst\r\n".to_vec();
        arr.extend_from_slice(&big);
        arr.extend_from_slice(b":7\r\n");
        let local = |t: &'static [u8]| Slot::Local(Bytes::from_static(t));
        for chunk in [1, 7, 1000, 4096] {
            let mut r = Replies::default();
            for s in [local(b"-L1\r\n"), fwd(1), local(b"-L2\r\n"), fwd(1), fwd(1)] {
                r.push(s);
            }
            let upstream = [big.as_slice(), arr.as_slice(), b"+OK\r\n"].concat();
            let got = feed(&mut r, &upstream, chunk);
            let all = got.concat();
            assert_eq!(all, [b"-L1\r\n".as_slice(), &big, b"-L2\r\n", &arr, b"+OK\r\n"].concat(), "chunk {chunk}");
            // streamed: the client had most of the value before its last byte came
            let before_end: usize = got[..got.len() - 1].iter().map(Vec::len).sum();
            assert!(before_end > big.len() + arr.len() - 2 * chunk.max(16), "chunk {chunk}: {before_end}");
            assert!(r.idle());
        }
    }

    #[test]
    fn replies_that_need_their_whole_frame_are_not_streamed() {
        let mut big = b"$3000\r\n".to_vec();
        big.extend_from_slice(&[b'x'; 3000]);
        big.extend_from_slice(b"\r\n");
        let mut blob_err = b"!3000\r\n".to_vec();
        blob_err.extend_from_slice(&[b'e'; 3000]);
        blob_err.extend_from_slice(b"\r\n");
        let hello = Slot::Forward { n: 1, effect: Effect::Hello(3), visible: true, sub: false };
        let exec = Slot::Forward { n: 1, effect: Effect::ExecStrip, visible: true, sub: false };
        let mut exec_reply = b"*1\r\n".to_vec();
        exec_reply.extend_from_slice(&big);
        let cases: Vec<(Slot, &[u8])> = vec![(hello, &big), (exec, &exec_reply), (fwd(1), &blob_err), (sub(1), &big)];
        for (slot, reply) in cases {
            let mut r = Replies::default();
            if matches!(slot, Slot::Forward { effect: Effect::ExecStrip, .. }) {
                r.expect_exec_mask(vec![true]);
            }
            r.push(slot.clone());
            let got = feed(&mut r, reply, 1000);
            assert!(got[..got.len() - 1].iter().all(Vec::is_empty), "{slot:?}: held until whole");
            assert_eq!(got.concat(), reply, "{slot:?}");
        }
        // a hidden reply is dropped as it arrives
        let mut r = Replies::default();
        r.push(Slot::swallow(1));
        r.push(fwd(1));
        let got = feed(&mut r, &[big.as_slice(), b":1\r\n"].concat(), 1000);
        assert_eq!(got.concat(), b":1\r\n");
    }
}
