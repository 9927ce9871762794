//! One peer's link: its record (one per allow-listed peer), what it has
//! queued and awaits, and the task that serves its stream.

use crate::Shared;
use crate::config::Peer;
use crate::wire::{self, Frame, Header, Hello, Kind};
use libp2p::PeerId;
use libp2p::futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use spindle_bus::{
    Blob, Envelope, Message, Request, Response, SendErrorKind, Undelivered, deadline_after,
};
use spindle_types::{Address, id::LOCAL_NODE};
use std::cell::Cell;
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
pub const LINK_QUEUED_BYTES: usize = spindle_bus::MAILBOX_BYTES;
/// Requests one link may await responses to: each is failed `offline` at
/// once if the link goes down.
pub const MAX_IN_FLIGHT: usize = 65_536;
/// Bytes the writer gathers from its queue into one write.
const WRITE_BATCH: usize = 256 << 10;
/// Bytes read from a stream at a time: a large frame grows its buffer as
/// its bytes arrive, never by what its prefix claims.
const READ_CHUNK: usize = 64 << 10;

/// A request sent on the link whose response is awaited.
struct InFlight {
    /// The target, on the peer (what the failure comes from).
    from: Arc<Address>,
    rsvp: Arc<Address>,
    deadline: Instant,
}

/// What a link's writer sends: a message, or the answer to a PING.
pub(crate) enum Outgoing {
    Message(Envelope),
    Pong(u64),
}

enum State {
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
    queued: AtomicUsize,
    /// Set when the peer leaves the allow-list (its dialer stops).
    pub gone: std::sync::atomic::AtomicBool,
    /// Set for a record a reload added, until its dialer starts.
    pub fresh: std::sync::atomic::AtomicBool,
    /// Told when the peer leaves the allow-list: its link ends.
    pub removed: Notify,
    /// Told when a connection to the peer is established (by either
    /// side): the node that opens the stream need not wait out its backoff.
    pub connected: Notify,
    rtt_us: AtomicU64,
    /// Wall clock (ms since the epoch) of the last frame heard; 0: never.
    last_seen_ms: AtomicU64,
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

fn wall_ms() -> u64 {
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
            gone: Default::default(),
            fresh: Default::default(),
            removed: Notify::new(),
            connected: Notify::new(),
            rtt_us: AtomicU64::new(0),
            last_seen_ms: AtomicU64::new(0),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
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
        // The source is always this node's; responses can only come back
        // here, so a route through a third node is refused.
        if env.source.node != LOCAL_NODE || env.rsvp.as_ref().is_some_and(|r| r.node != LOCAL_NODE)
        {
            return Err((SendErrorKind::Invalid, Box::new(env)));
        }
        let weight = env.weight();
        if self.queued.fetch_add(weight, Ordering::AcqRel) + weight > LINK_QUEUED_BYTES {
            self.queued.fetch_sub(weight, Ordering::AcqRel);
            return Err((SendErrorKind::MailboxFull, Box::new(env)));
        }
        let awaited = match (&env.message, &env.rsvp) {
            (Message::Request(r), Some(rsvp)) => {
                let mut awaited = self.in_flight();
                if awaited.len() >= MAX_IN_FLIGHT {
                    drop(awaited);
                    self.queued.fetch_sub(weight, Ordering::AcqRel);
                    return Err((SendErrorKind::MailboxFull, Box::new(env)));
                }
                let wait = r.expects_response.unwrap_or(spindle_bus::DEFAULT_AWAIT);
                awaited.insert(
                    env.id,
                    InFlight {
                        from: env.target.clone(),
                        rsvp: rsvp.clone(),
                        deadline: deadline_after(wait),
                    },
                );
                Some(env.id)
            }
            _ => None,
        };
        tx.try_send(Outgoing::Message(env)).map_err(|e| {
            self.queued.fetch_sub(weight, Ordering::AcqRel);
            if let Some(id) = awaited {
                self.in_flight().remove(&id);
            }
            let (kind, out) = match e {
                mpsc::error::TrySendError::Full(o) => (SendErrorKind::MailboxFull, o),
                mpsc::error::TrySendError::Closed(o) => (SendErrorKind::Offline, o),
            };
            match out {
                Outgoing::Message(env) => (kind, Box::new(env)),
                Outgoing::Pong(_) => unreachable!("a send queues a message"),
            }
        })
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
                self.queued.fetch_sub(env.weight(), Ordering::AcqRel);
            }
        }
        let awaited = std::mem::take(&mut *self.in_flight());
        for (id, f) in awaited {
            shared
                .bus
                .fail_request(&f.from, id, f.rsvp, SendErrorKind::Offline);
        }
        tracing::info!("link to {} is down: {why}", self.name);
    }

    /// Whether `answer` (from the peer) answers a request awaited through
    /// this link, to that request's rsvp (from whichever process there
    /// answers: a request may be handed on). Forgets it.
    fn answered(&self, answer: &Envelope) -> bool {
        let mut awaited = self.in_flight();
        let matches = awaited
            .get(&answer.id)
            .is_some_and(|f| f.rsvp.process == answer.target.process);
        if matches {
            awaited.remove(&answer.id);
        }
        matches
    }

    /// Forgets awaited requests whose requesters have stopped waiting.
    fn expire(&self, now: Instant) {
        self.in_flight().retain(|_, f| f.deadline > now);
    }
}

/// Serves one peer's stream, once [`PeerLink::claim`]ed, until it ends;
/// then marks the link down and returns why.
pub(crate) async fn run<S>(shared: &Shared, peer: &PeerLink, stream: S) -> String
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut reader, mut writer) = stream.split();
    let mut buf = Vec::with_capacity(READ_CHUNK);
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
        let last = Cell::new(Instant::now());
        read_frame(&mut reader, &mut buf, &last).await?;
        match wire::decode(&buf).map_err(|e| e.to_string())? {
            Frame::Hello(h) if h.version != wire::VERSION => Err(format!(
                "it speaks version {} of the link protocol, this node {}",
                h.version,
                wire::VERSION
            )),
            Frame::Hello(h) if h.name != peer.name => Err(format!(
                "its key is {}'s here, but it says it is {:?}",
                peer.name, h.name
            )),
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
    let last = Cell::new(Instant::now());
    let why = tokio::select! {
        why = read_loop(shared, peer, &mut reader, &mut buf, &last, &tx) => why,
        why = write_loop(peer, &mut writer, &mut rx) => why,
        why = watchdog(peer, &last) => why,
        _ = peer.removed.notified() => "the peer was removed from the allow-list".into(),
    };
    drop(tx);
    peer.down(shared, why.clone(), &mut rx);
    let _ = tokio::time::timeout(HEARTBEAT, writer.close()).await;
    why
}

/// Reads one frame into `buf` (its bytes after the length prefix).
async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    last: &Cell<Instant>,
) -> Result<(), String> {
    let mut prefix = [0u8; 4];
    reader
        .read_exact(&mut prefix)
        .await
        .map_err(|e| format!("the stream ended: {e}"))?;
    let len = wire::frame_len(prefix).map_err(|e| e.to_string())?;
    buf.clear();
    if buf.capacity() > WRITE_BATCH && len < READ_CHUNK {
        buf.shrink_to(READ_CHUNK);
    }
    let mut chunk = [0u8; 4096];
    while buf.len() < len {
        let want = (len - buf.len()).min(chunk.len());
        let n = reader
            .read(&mut chunk[..want])
            .await
            .map_err(|e| format!("the stream broke: {e}"))?;
        if n == 0 {
            return Err("the stream ended inside a frame".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        last.set(Instant::now());
    }
    last.set(Instant::now());
    Ok(())
}

async fn read_loop<R: AsyncRead + Unpin>(
    shared: &Shared,
    peer: &PeerLink,
    reader: &mut R,
    buf: &mut Vec<u8>,
    last: &Cell<Instant>,
    tx: &mpsc::Sender<Outgoing>,
) -> String {
    loop {
        if let Err(why) = read_frame(reader, buf, last).await {
            return why;
        }
        peer.last_seen_ms.store(wall_ms(), Ordering::Relaxed);
        let frame = match wire::decode(buf) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("link to {}: {e}; closing it", peer.name);
                return format!("it sent a bad frame: {e}");
            }
        };
        match frame {
            Frame::Ping(nonce) => {
                let _ = tx.try_send(Outgoing::Pong(nonce));
            }
            Frame::Pong(nonce) => {
                peer.rtt_us
                    .store(micros_since(nonce).max(1), Ordering::Relaxed);
            }
            Frame::Hello(_) => return "it said HELLO twice".into(),
            Frame::Message { header, body, blob } => {
                let env = inbound(peer, *header, body, blob);
                // An answer is let in only for a request this link carried
                // there, to the process awaiting it; any other (late, or
                // unasked for) is dropped, as a late one is locally.
                if env.message.is_answer() && !peer.answered(&env) {
                    shared.bus.late_responses.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let delivered = match shared.bus.deliver_remote(env) {
                    // A full mailbox holds the link back as it holds a
                    // local sender back (up to MAILBOX_WAIT): the peer's
                    // queue fills and its senders hear `mailbox-full`,
                    // rather than messages vanishing here.
                    Err((SendErrorKind::MailboxFull, env)) => {
                        if shared.bus.wait_for_room(&env.target.process).await {
                            shared.bus.deliver_remote(*env)
                        } else {
                            Err((SendErrorKind::MailboxFull, env))
                        }
                    }
                    other => other,
                };
                if let Err((kind, env)) = delivered {
                    refuse(peer, tx, *env, kind);
                }
            }
        }
    }
}

/// A message from the peer as the bus carries it: its source and rsvp are
/// on the peer (the authenticated node), its target here.
fn inbound(peer: &PeerLink, h: Header, body: &[u8], blob: Option<&[u8]>) -> Envelope {
    let there = |process| {
        Arc::new(Address {
            node: peer.name.clone(),
            process,
        })
    };
    let body = body.to_vec();
    let message = match h.kind {
        Kind::Request {
            inherit,
            expects_response_ms,
        } => Message::Request(Request {
            inherit,
            expects_response: expects_response_ms.map(Duration::from_millis),
            body,
            metadata: h.metadata,
            capabilities: vec![],
        }),
        Kind::Response { inherit } => Message::Response(
            Response {
                inherit,
                body,
                metadata: h.metadata,
                capabilities: vec![],
            },
            None,
        ),
        Kind::Failed(kind) => Message::Failed(kind),
    };
    Envelope {
        id: h.id,
        source: there(h.source),
        target: Arc::new(Address {
            node: LOCAL_NODE.into(),
            process: h.target,
        }),
        rsvp: h.rsvp.map(there),
        message,
        blob: match (h.blob, blob) {
            (Some(mime), Some(bytes)) => Some(Arc::new(Blob {
                mime,
                bytes: bytes.to_vec(),
            })),
            _ => None,
        },
    }
}

/// Tells the peer that its request was not delivered here (if it awaits
/// an answer); an undeliverable response is only counted.
fn refuse(peer: &PeerLink, tx: &mpsc::Sender<Outgoing>, env: Envelope, kind: SendErrorKind) {
    match (&env.message, env.rsvp) {
        (Message::Request(_), Some(rsvp)) => {
            let failed = Envelope {
                id: env.id,
                source: env.target,
                target: rsvp,
                rsvp: None,
                message: Message::Failed(kind),
                blob: None,
            };
            if tx.try_send(Outgoing::Message(failed)).is_err() {
                tracing::debug!("link to {}: no room to refuse a request", peer.name);
            }
        }
        _ => tracing::debug!("link to {}: a message was not delivered: {kind}", peer.name),
    }
}

fn micros_since(nonce: u64) -> u64 {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    now.saturating_sub(nonce)
}

/// Appends `env`'s frame to `out`; false if it cannot go on the wire (a
/// message past the wire's limits, which the node never lets grow so
/// large).
fn encode(out: &mut Vec<u8>, env: &Envelope) -> bool {
    let (kind, body, metadata): (Kind, &[u8], Option<String>) = match &env.message {
        Message::Request(r) => (
            Kind::Request {
                inherit: r.inherit,
                expects_response_ms: r.expects_response.map(|d| d.as_millis() as u64),
            },
            &r.body,
            r.metadata.clone(),
        ),
        Message::Response(r, _) => (
            Kind::Response { inherit: r.inherit },
            &r.body,
            r.metadata.clone(),
        ),
        Message::Failed(k) => (Kind::Failed(*k), &[], None),
    };
    let Ok(body_len) = u32::try_from(body.len()) else {
        return false;
    };
    let header = Header {
        id: env.id,
        source: env.source.process.clone(),
        target: env.target.process.clone(),
        rsvp: env.rsvp.as_ref().map(|r| r.process.clone()),
        kind,
        metadata,
        body_len,
        blob: env.blob.as_ref().map(|b| b.mime.clone()),
    };
    wire::encode_message(
        out,
        &header,
        body,
        env.blob.as_ref().map(|b| b.bytes.as_slice()),
    )
    .is_ok()
}

async fn write_loop<W: AsyncWrite + Unpin>(
    peer: &PeerLink,
    writer: &mut W,
    rx: &mut mpsc::Receiver<Outgoing>,
) -> String {
    let mut out = Vec::with_capacity(WRITE_BATCH);
    let mut beat = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            next = rx.recv() => {
                let Some(env) = next else { return "the link's queue closed".into() };
                put(peer, &mut out, env);
                while out.len() < WRITE_BATCH {
                    match rx.try_recv() {
                        Ok(env) => put(peer, &mut out, env),
                        Err(_) => break,
                    }
                }
            }
            _ = beat.tick() => {
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as u64);
                wire::encode_ping(&mut out, now, false);
            }
        }
        if let Err(e) = writer.write_all(&out).await {
            return format!("writing failed: {e}");
        }
        if let Err(e) = writer.flush().await {
            return format!("writing failed: {e}");
        }
        out.clear();
        if out.capacity() > 4 * WRITE_BATCH {
            out.shrink_to(WRITE_BATCH);
        }
    }
}

fn put(peer: &PeerLink, out: &mut Vec<u8>, next: Outgoing) {
    let env = match next {
        Outgoing::Pong(nonce) => return wire::encode_ping(out, nonce, true),
        Outgoing::Message(env) => env,
    };
    peer.queued.fetch_sub(env.weight(), Ordering::AcqRel);
    if !encode(out, &env) {
        tracing::warn!(
            "link to {}: a message past the wire's limits was dropped",
            peer.name
        );
    }
}

/// Ends the link when the peer has been silent for [`DEAD_AFTER`], and
/// forgets awaited requests nobody waits for any more.
async fn watchdog(peer: &PeerLink, last: &Cell<Instant>) -> String {
    let mut tick = tokio::time::interval(HEARTBEAT / 2);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let silent = now.saturating_duration_since(last.get());
        if silent > DEAD_AFTER {
            return format!("no heartbeat for {} ms", silent.as_millis());
        }
        peer.expire(now);
    }
}
