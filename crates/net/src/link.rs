//! One peer's link: its record (one per allow-listed peer), what it has
//! queued and awaits, and the task that serves its stream (its reader and
//! writer are in their own files).

mod reader;
mod writer;

use crate::Shared;
use crate::config::Peer;
use crate::wire::{self, Frame, Hello};
use libp2p::PeerId;
use libp2p::futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use spindle_bus::{Envelope, Message, SendErrorKind, Undelivered, deadline_after};
use spindle_types::{Address, id::LOCAL_NODE};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{Notify, mpsc};

/// How often a link says it is alive (a PING), whatever else it sends.
pub const HEARTBEAT: Duration = Duration::from_millis(250);
/// A link that has heard nothing from its peer for this long is dead: a
/// frozen or partitioned peer is noticed within it plus one heartbeat.
pub const DEAD_AFTER: Duration = Duration::from_secs(1);
/// How long a peer has to say HELLO once its stream is open.
pub const HELLO_WITHIN: Duration = Duration::from_secs(2);
/// Messages one link may have queued to send: past it a sender gets
/// `mailbox-full`, as at a full mailbox.
pub const LINK_QUEUE: usize = 4096;
/// Bytes one link may have queued to send (the weight of its messages).
pub const LINK_QUEUED_BYTES: usize = 4 * spindle_bus::MAILBOX_BYTES;
/// Messages one process may have queued on one link: a process that
/// floods a peer takes a quarter of the link, and the others still get on.
pub const SOURCE_QUEUE: usize = LINK_QUEUE / 4;
/// Bytes one process may have queued on one link: one largest message.
pub const SOURCE_QUEUED_BYTES: usize = spindle_bus::MAILBOX_BYTES;
/// Requests one link may await responses to: each is failed `offline` at
/// once if the link goes down.
pub const MAX_IN_FLIGHT: usize = 65_536;
/// Requests one process may await through one link: as many as it may
/// await at all.
pub const SOURCE_IN_FLIGHT: usize = spindle_bus::MAX_AWAITED;

/// When a stream's peer was last heard from (any byte of any frame): set
/// by its reader, read by its watchdog.
pub(crate) struct Heard {
    since: Instant,
    micros: AtomicU64,
}

impl Heard {
    fn new() -> Heard {
        Heard {
            since: Instant::now(),
            micros: AtomicU64::new(0),
        }
    }

    pub(crate) fn now(&self) {
        let us = self.since.elapsed().as_micros() as u64;
        self.micros.store(us, Ordering::Relaxed);
    }

    fn at(&self) -> Instant {
        self.since + Duration::from_micros(self.micros.load(Ordering::Relaxed))
    }
}

/// A request sent on the link whose response is awaited.
struct InFlight {
    /// The target, on the peer (what the failure comes from).
    from: Arc<Address>,
    rsvp: Arc<Address>,
    /// The process that sent it (its [`SOURCE_IN_FLIGHT`] budget).
    source: spindle_types::ProcessId,
    deadline: Instant,
}

/// What a link's writer sends: a message from this node (counted against
/// the link's and its source's budgets), this node's refusal of a peer's
/// request (not counted: the peer's requests are bounded by its own
/// queue), or the answer to a PING.
pub(crate) enum Outgoing {
    Message(Envelope),
    Refusal(Envelope),
    Pong(u64),
}

/// What one process has queued on a link, and awaits through it.
#[derive(Debug, Default, Clone, Copy)]
struct Queued {
    messages: usize,
    bytes: usize,
    awaited: usize,
}

impl Queued {
    fn idle(&self) -> bool {
        self.messages == 0 && self.awaited == 0
    }
}

pub(crate) enum State {
    Down {
        why: Option<String>,
    },
    /// A stream is being opened or greeted: one at a time per peer.
    Opening,
    Up {
        tx: mpsc::Sender<Outgoing>,
        since: Instant,
    },
}

/// One allow-listed peer and its link.
pub(crate) struct PeerLink {
    pub name: String,
    pub id: PeerId,
    pub addresses: Vec<libp2p::Multiaddr>,
    state: Mutex<State>,
    in_flight: Mutex<HashMap<u64, InFlight>>,
    /// Bytes (weights) queued to send ([`LINK_QUEUED_BYTES`]).
    pub(crate) queued: AtomicUsize,
    /// What each process has queued ([`SOURCE_QUEUE`], [`SOURCE_QUEUED_BYTES`]).
    by_source: Mutex<HashMap<spindle_types::ProcessId, Queued>>,
    /// Set when the peer leaves the allow-list (its dialer stops).
    pub gone: std::sync::atomic::AtomicBool,
    /// Set for a record a reload added, until its dialer starts.
    pub fresh: std::sync::atomic::AtomicBool,
    /// Told when the peer leaves the allow-list: its link ends.
    pub removed: Notify,
    /// Told when a connection to the peer is established (by either
    /// side): the node that opens the stream need not wait out its backoff.
    pub connected: Notify,
    pub(crate) rtt_us: AtomicU64,
    /// Wall clock (ms since the epoch) of the last frame heard; 0: never.
    pub(crate) last_seen_ms: AtomicU64,
}

/// A link as `spindle node peers` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkStatus {
    Up { for_ms: u64 },
    Opening,
    Down { why: Option<String> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub name: String,
    pub key: String,
    pub addresses: Vec<String>,
    pub link: LinkStatus,
    pub last_seen_ms: Option<u64>,
    pub rtt_us: Option<u64>,
    /// Requests carried to it that await its answer.
    pub in_flight: usize,
}

pub(crate) fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl PeerLink {
    pub fn new(peer: Peer) -> PeerLink {
        PeerLink {
            name: peer.name,
            id: peer.id,
            addresses: peer.addresses,
            state: Mutex::new(State::Down { why: None }),
            in_flight: Mutex::default(),
            queued: AtomicUsize::new(0),
            by_source: Mutex::default(),
            gone: Default::default(),
            fresh: Default::default(),
            removed: Notify::new(),
            connected: Notify::new(),
            rtt_us: AtomicU64::new(0),
            last_seen_ms: AtomicU64::new(0),
        }
    }

    pub(crate) fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<u64, InFlight>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the peer's one link slot for a new stream: false if a link is
    /// up or opening already (a second stream is refused).
    pub fn claim(&self) -> bool {
        let mut s = self.state();
        if matches!(*s, State::Down { .. }) {
            *s = State::Opening;
            true
        } else {
            false
        }
    }

    /// Gives the slot back after a stream that never became a link.
    /// Records why a connection to a peer that is down could not be made.
    pub fn unreachable(&self, why: String) {
        let mut s = self.state();
        if let State::Down { why: w } = &mut *s {
            *w = Some(why);
        }
    }

    pub fn is_down(&self) -> bool {
        matches!(*self.state(), State::Down { .. })
    }

    pub fn unclaim(&self, why: String) {
        let mut s = self.state();
        if matches!(*s, State::Opening) {
            *s = State::Down { why: Some(why) };
        }
    }

    pub fn status(&self) -> PeerStatus {
        let link = match &*self.state() {
            State::Up { since, .. } => LinkStatus::Up {
                for_ms: since.elapsed().as_millis() as u64,
            },
            State::Down { why } => LinkStatus::Down { why: why.clone() },
            State::Opening => LinkStatus::Opening,
        };
        let seen = self.last_seen_ms.load(Ordering::Relaxed);
        let rtt = self.rtt_us.load(Ordering::Relaxed);
        PeerStatus {
            name: self.name.clone(),
            key: self.id.to_string(),
            addresses: self.addresses.iter().map(|a| a.to_string()).collect(),
            link,
            last_seen_ms: (seen > 0).then_some(seen),
            rtt_us: (rtt > 0).then_some(rtt),
            in_flight: self.in_flight().len(),
        }
    }

    /// Queues a message from this node for the peer, or says at once why
    /// not. A request awaiting a response is remembered until it is
    /// answered, its requester stops waiting, or the link ends.
    pub fn send(&self, env: Envelope) -> Result<(), Undelivered> {
        let tx = match &*self.state() {
            State::Up { tx, .. } => tx.clone(),
            State::Down { .. } | State::Opening => {
                return Err((SendErrorKind::Offline, Box::new(env)));
            }
        };
        // The source is always this node's; responses come back here, or
        // go to the peer itself (a request of the peer's handed back with
        // `inherit`): a route through a third node is refused.
        if env.source.node != LOCAL_NODE
            || env
                .rsvp
                .as_ref()
                .is_some_and(|r| r.node != LOCAL_NODE && r.node != self.name)
        {
            return Err((SendErrorKind::Invalid, Box::new(env)));
        }
        if !header_fits(&env) {
            return Err((SendErrorKind::Invalid, Box::new(env)));
        }
        if !self.reserve(&env) {
            return Err((SendErrorKind::MailboxFull, Box::new(env)));
        }
        let awaited = match (&env.message, &env.rsvp) {
            // The answer to a request handed back to the peer stays there.
            (Message::Request(r), Some(rsvp)) if rsvp.node == LOCAL_NODE => {
                let mut awaited = self.in_flight();
                if awaited.len() >= MAX_IN_FLIGHT || !self.await_one(&env.source.process) {
                    drop(awaited);
                    self.release(&env);
                    return Err((SendErrorKind::MailboxFull, Box::new(env)));
                }
                // A request handed on with `inherit` carries no wait of its
                // own: its first requester may wait as long as any.
                let wait = r
                    .expects_response
                    .unwrap_or(spindle_types::limits::MAX_AWAIT);
                let old = awaited.insert(
                    env.id,
                    InFlight {
                        from: env.target.clone(),
                        rsvp: rsvp.clone(),
                        source: env.source.process.clone(),
                        deadline: deadline_after(wait),
                    },
                );
                if let Some(old) = old {
                    self.awaited_done(&old);
                }
                Some(env.id)
            }
            _ => None,
        };
        tx.try_send(Outgoing::Message(env)).map_err(|e| {
            if let Some(id) = awaited
                && let Some(f) = self.in_flight().remove(&id)
            {
                self.awaited_done(&f);
            }
            let (kind, out) = match e {
                mpsc::error::TrySendError::Full(o) => (SendErrorKind::MailboxFull, o),
                mpsc::error::TrySendError::Closed(o) => (SendErrorKind::Offline, o),
            };
            match out {
                Outgoing::Message(env) => {
                    self.release(&env);
                    (kind, Box::new(env))
                }
                Outgoing::Refusal(_) | Outgoing::Pong(_) => {
                    unreachable!("a send queues a message")
                }
            }
        })
    }

    fn by_source(&self) -> std::sync::MutexGuard<'_, HashMap<spindle_types::ProcessId, Queued>> {
        self.by_source.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a request `source` awaits through the link; false past its
    /// budget.
    fn await_one(&self, source: &spindle_types::ProcessId) -> bool {
        let mut by = self.by_source();
        let q = by.entry(source.clone()).or_default();
        if q.awaited >= SOURCE_IN_FLIGHT {
            return false;
        }
        q.awaited += 1;
        true
    }

    /// An awaited request is answered, failed or forgotten.
    fn awaited_done(&self, f: &InFlight) {
        let mut by = self.by_source();
        if let Some(q) = by.get_mut(&f.source) {
            q.awaited = q.awaited.saturating_sub(1);
            if q.idle() {
                by.remove(&f.source);
            }
        }
    }

    /// Takes room for `env` in the link's queue, within the link's budget
    /// and its source's; false if there is none.
    fn reserve(&self, env: &Envelope) -> bool {
        let weight = env.weight();
        let mut by = self.by_source();
        let q = by.entry(env.source.process.clone()).or_default();
        if q.messages >= SOURCE_QUEUE || q.bytes + weight > SOURCE_QUEUED_BYTES {
            if q.idle() {
                by.remove(&env.source.process);
            }
            return false;
        }
        if self.queued.fetch_add(weight, Ordering::AcqRel) + weight > LINK_QUEUED_BYTES {
            self.queued.fetch_sub(weight, Ordering::AcqRel);
            if q.idle() {
                by.remove(&env.source.process);
            }
            return false;
        }
        q.messages += 1;
        q.bytes += weight;
        true
    }

    /// Gives back the room `env` took: it was written, or will never be.
    pub(crate) fn release(&self, env: &Envelope) {
        let weight = env.weight();
        let _ = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                Some(q.saturating_sub(weight))
            });
        let mut by = self.by_source();
        if let Some(q) = by.get_mut(&env.source.process) {
            q.messages = q.messages.saturating_sub(1);
            q.bytes = q.bytes.saturating_sub(weight);
            if q.idle() {
                by.remove(&env.source.process);
            }
        }
    }

    /// The link ended: nothing more goes on it, and every request awaiting
    /// a response through it fails `offline` now.
    fn down(&self, shared: &Shared, why: String, rx: &mut mpsc::Receiver<Outgoing>) {
        *self.state() = State::Down {
            why: Some(why.clone()),
        };
        rx.close();
        while let Ok(out) = rx.try_recv() {
            if let Outgoing::Message(env) = out {
                self.release(&env);
            }
        }
        let awaited = std::mem::take(&mut *self.in_flight());
        for (id, f) in awaited {
            self.awaited_done(&f);
            shared
                .bus
                .fail_request(&f.from, id, f.rsvp, SendErrorKind::Offline);
        }
        tracing::info!("link to {} is down: {why}", self.name);
    }

    /// Whether `answer` (from the peer) answers a request awaited through
    /// this link, to that request's rsvp (from whichever process there
    /// answers: a request may be handed on). Forgets it.
    pub(crate) fn answered(&self, answer: &Envelope) -> bool {
        let mut awaited = self.in_flight();
        let matches = awaited
            .get(&answer.id)
            .is_some_and(|f| f.rsvp.process == answer.target.process);
        if matches && let Some(f) = awaited.remove(&answer.id) {
            self.awaited_done(&f);
        }
        matches
    }

    /// Whether the link carried request `id` from `rsvp` to the peer, and
    /// its answer is still awaited; if so the request comes back now
    /// (handed back with `inherit`) and its answer no longer goes through
    /// the link: it is forgotten, so the peer cannot hand it back twice.
    pub(crate) fn take_carried(&self, id: u64, rsvp: &spindle_types::ProcessId) -> bool {
        let mut awaited = self.in_flight();
        let carried = awaited.get(&id).is_some_and(|f| &f.rsvp.process == rsvp);
        if carried && let Some(f) = awaited.remove(&id) {
            self.awaited_done(&f);
        }
        carried
    }

    /// Forgets awaited requests whose requesters have stopped waiting.
    fn expire(&self, now: Instant) {
        self.in_flight().retain(|_, f| {
            let keep = f.deadline > now;
            if !keep {
                self.awaited_done(f);
            }
            keep
        });
    }
}

/// Whether `env`'s header stays within the wire's [`wire::MAX_HEADER`]:
/// ids are short; what grows is metadata, capabilities and a blob's mime
/// (each counted with room to spare for its encoding).
fn header_fits(env: &Envelope) -> bool {
    let metadata = match &env.message {
        Message::Request(r) => r.metadata.as_ref().map_or(0, String::len),
        Message::Response(r, _) => r.metadata.as_ref().map_or(0, String::len),
        Message::Failed(_) => 0,
    };
    let capabilities: usize = env
        .message
        .capabilities()
        .iter()
        .map(|c| c.params.len() + c.issuer.to_string().len() + 16)
        .sum();
    let mime = env
        .blob
        .as_ref()
        .and_then(|b| b.mime.as_ref())
        .map_or(0, String::len);
    metadata + capabilities + mime + 1024 <= wire::MAX_HEADER
}

/// Serves one peer's stream, once [`PeerLink::claim`]ed, until it ends;
/// then marks the link down and returns why.
pub(crate) async fn run<S>(shared: &Shared, peer: &PeerLink, stream: S) -> String
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut reader, mut writer) = stream.split();
    let mut buf = Vec::with_capacity(reader::READ_CHUNK);
    // HELLO both ways: the peer must give the name its key has here.
    let mut out = vec![];
    wire::encode_hello(
        &mut out,
        &Hello {
            version: wire::VERSION,
            name: shared.name.clone(),
        },
    );
    let hello = async {
        writer.write_all(&out).await.map_err(|e| e.to_string())?;
        writer.flush().await.map_err(|e| e.to_string())?;
        let last = Heard::new();
        reader::read_frame(&mut reader, &mut buf, &last, wire::MAX_HELLO).await?;
        match wire::decode(&buf).map_err(|e| e.to_string())? {
            Frame::Hello(h) if h.version != wire::VERSION => Err(format!(
                "it speaks version {} of the link protocol, this node {}",
                h.version,
                wire::VERSION
            )),
            Frame::Hello(h) if h.name != peer.name => Err(format!(
                "its key is {}'s here, but it says it is {:?}",
                peer.name,
                spindle_types::id::shown(&h.name)
            )),
            // A peer removed while it greeted gets no link.
            Frame::Hello(_) if peer.gone.load(Ordering::Acquire) => {
                Err("the peer was removed from the allow-list".into())
            }
            Frame::Hello(_) => Ok(()),
            _ => Err("its first frame is not HELLO".into()),
        }
    };
    if let Err(why) = match tokio::time::timeout(HELLO_WITHIN, hello).await {
        Ok(r) => r,
        Err(_) => Err(format!("no HELLO within {HELLO_WITHIN:?}")),
    } {
        tracing::warn!("link to {} refused: {why}", peer.name);
        peer.unclaim(why.clone());
        return why;
    }
    let (tx, mut rx) = mpsc::channel(LINK_QUEUE);
    let since = Instant::now();
    *peer.state() = State::Up {
        tx: tx.clone(),
        since,
    };
    peer.rtt_us.store(0, Ordering::Relaxed);
    tracing::info!("link to {} is up", peer.name);
    let last = Heard::new();
    let why = tokio::select! {
        // Removal first: a removed peer's buffered frames are not read.
        biased;
        _ = peer.removed.notified() => "the peer was removed from the allow-list".into(),
        why = reader::read_loop(shared, peer, &mut reader, &mut buf, &last, &tx) => why,
        why = writer::write_loop(peer, &mut writer, &mut rx) => why,
        why = watchdog(peer, &last) => why,
    };
    drop(tx);
    peer.down(shared, why.clone(), &mut rx);
    let _ = tokio::time::timeout(HEARTBEAT, writer.close()).await;
    why
}

/// Ends the link when the peer has been silent for [`DEAD_AFTER`], and
/// forgets awaited requests nobody waits for any more.
async fn watchdog(peer: &PeerLink, last: &Heard) -> String {
    let mut tick = tokio::time::interval(HEARTBEAT / 2);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let silent = now.saturating_duration_since(last.at());
        if silent > DEAD_AFTER {
            return format!("no heartbeat for {} ms", silent.as_millis());
        }
        peer.expire(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spindle_bus::Request;

    fn env(id: u64, source: &str, bytes: usize) -> Envelope {
        let at = |node: &str, p: &str| {
            Arc::new(Address {
                node: node.into(),
                process: p.parse().unwrap(),
            })
        };
        Envelope {
            id,
            source: at(LOCAL_NODE, source),
            target: at("bob", "sink:demo:x"),
            rsvp: None,
            message: Message::Request(Request {
                inherit: false,
                expects_response: None,
                body: vec![0; bytes],
                metadata: None,
                capabilities: vec![],
            }),
            blob: None,
        }
    }

    fn up() -> (PeerLink, mpsc::Receiver<Outgoing>) {
        let link = PeerLink::new(Peer {
            name: "bob".into(),
            id: PeerId::random(),
            addresses: vec![],
        });
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        *link.state() = State::Up {
            tx,
            since: Instant::now(),
        };
        (link, rx)
    }

    #[test]
    fn one_process_takes_only_its_share_of_a_link() {
        let (link, mut rx) = up();
        for i in 0..SOURCE_QUEUE as u64 {
            assert!(link.send(env(i, "flood:demo:x", 1)).is_ok());
        }
        let (kind, _) = link.send(env(0, "flood:demo:x", 1)).unwrap_err();
        assert_eq!(kind, SendErrorKind::MailboxFull);
        // Another process still gets on.
        assert!(link.send(env(0, "other:demo:x", 1)).is_ok());
        // Bytes too: one largest message per process.
        let big = SOURCE_QUEUED_BYTES / 2 + 1;
        assert!(link.send(env(1, "big:demo:x", big)).is_ok());
        let (kind, _) = link.send(env(2, "big:demo:x", big)).unwrap_err();
        assert_eq!(kind, SendErrorKind::MailboxFull);
        // What is written gives its room back.
        while let Ok(Outgoing::Message(e)) = rx.try_recv() {
            link.release(&e);
        }
        assert!(link.send(env(3, "big:demo:x", big)).is_ok());
        assert!(link.send(env(0, "flood:demo:x", 1)).is_ok());
        assert_eq!(link.by_source().len(), 2);
    }

    #[test]
    fn one_process_awaits_only_its_share_through_a_link() {
        let (link, mut rx) = up();
        let asking = |id: u64, source: &str| {
            let mut e = env(id, source, 1);
            e.rsvp = Some(e.source.clone());
            e
        };
        for id in 0..SOURCE_IN_FLIGHT as u64 {
            assert!(link.send(asking(id, "asker:demo:x")).is_ok());
            while let Ok(Outgoing::Message(e)) = rx.try_recv() {
                link.release(&e);
            }
        }
        let (kind, _) = link.send(asking(1 << 40, "asker:demo:x")).unwrap_err();
        assert_eq!(kind, SendErrorKind::MailboxFull);
        assert!(link.send(asking(1 << 41, "other:demo:x")).is_ok());
        // An answer frees its slot.
        let answer = Envelope {
            message: Message::Failed(SendErrorKind::Timeout),
            ..env(0, "x:demo:x", 0)
        };
        let answer = Envelope {
            target: Arc::new(Address {
                node: LOCAL_NODE.into(),
                process: "asker:demo:x".parse().unwrap(),
            }),
            ..answer
        };
        assert!(link.answered(&answer));
        assert!(link.send(asking(1 << 42, "asker:demo:x")).is_ok());
    }
}
