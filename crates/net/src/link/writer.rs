//! A link's writer: frames for the peer from the link's queue, batched
//! into few writes, with a PING every [`HEARTBEAT`]. A message with a
//! large blob goes out in chunks with the rest of the traffic between
//! them; later messages from the same process wait behind it, so each
//! process's messages still arrive in the order it sent them.

use super::{HEARTBEAT, Outgoing, PeerLink};
use crate::wire::{self, BlobHead, Header, Kind};
use libp2p::futures::{AsyncWrite, AsyncWriteExt};
use spindle_bus::{Envelope, Message};
use spindle_types::{ProcessId, id::LOCAL_NODE};
use std::collections::{HashMap, VecDeque};
use std::time::{Instant, SystemTime};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;

/// Bytes the writer gathers from its queue into one write.
const WRITE_BATCH: usize = 256 << 10;

/// Messages that go out one chunk at a time, in order: those with a large
/// blob, and those queued behind one from the same source. Whatever is
/// still here when the link ends gives its room on the link back.
struct Bulk<'a> {
    peer: &'a PeerLink,
    queue: VecDeque<Streaming>,
    /// How many of the queue's messages each source has there.
    sources: HashMap<ProcessId, usize>,
}

impl Drop for Bulk<'_> {
    fn drop(&mut self) {
        for s in self.queue.drain(..).filter(|s| s.counted) {
            self.peer.release(&s.env);
        }
    }
}

struct Streaming {
    env: Envelope,
    /// Counted against the link's budgets (not a refusal).
    counted: bool,
    /// Blob bytes sent so far; `None` until its MESSAGE frame is out.
    sent: Option<usize>,
}

fn large(env: &Envelope) -> bool {
    env.blob
        .as_ref()
        .is_some_and(|b| b.bytes.len() > wire::INLINE_BLOB)
}

impl<'a> Bulk<'a> {
    fn new(peer: &'a PeerLink) -> Bulk<'a> {
        Bulk {
            peer,
            queue: VecDeque::new(),
            sources: HashMap::new(),
        }
    }

    /// Takes the next thing from the queue: into `out` at once, or into
    /// the bulk queue when it is large or its source has a message there.
    fn take(&mut self, out: &mut Vec<u8>, next: Outgoing) {
        let peer = self.peer;
        let (env, counted) = match next {
            Outgoing::Pong(nonce) => return wire::encode_ping(out, nonce, true),
            Outgoing::Message(env) => (env, true),
            Outgoing::Refusal(env) => (env, false),
        };
        if large(&env) || self.sources.contains_key(&env.source.process) {
            *self.sources.entry(env.source.process.clone()).or_default() += 1;
            self.queue.push_back(Streaming {
                env,
                counted,
                sent: None,
            });
        } else {
            put(peer, out, &env, counted);
        }
    }

    /// Puts the next frame of the first bulk message into `out`: the
    /// message, or the start of a BLOB frame — whose bytes, returned, go
    /// out from the blob itself, not copied.
    fn step(&mut self, out: &mut Vec<u8>) -> Option<Chunk> {
        let peer = self.peer;
        let front = self.queue.front_mut()?;
        let mut chunk = None;
        let done = match (front.sent, front.env.blob.as_ref()) {
            (None, _) if !large(&front.env) => {
                put(peer, out, &front.env, front.counted);
                true
            }
            (None, _) => {
                if encode(out, &front.env) {
                    front.sent = Some(0);
                    false
                } else {
                    dropped(peer);
                    true
                }
            }
            (Some(sent), Some(blob)) => {
                let end = blob.bytes.len().min(sent + wire::BLOB_CHUNK);
                wire::encode_blob_head(out, front.env.id, end - sent);
                chunk = Some(Chunk {
                    blob: blob.clone(),
                    range: sent..end,
                });
                front.sent = Some(end);
                end == blob.bytes.len()
            }
            (Some(_), None) => true,
        };
        if !done {
            return chunk;
        }
        let finished = self.queue.pop_front()?;
        // A small one gave its room back in `put`.
        if large(&finished.env) && finished.counted {
            peer.release(&finished.env);
        }
        let source = &finished.env.source.process;
        if let Some(n) = self.sources.get_mut(source) {
            *n -= 1;
            if *n == 0 {
                self.sources.remove(source);
            }
        }
        chunk
    }
}

/// Blob bytes that follow the frame start at the end of the writer's buffer.
struct Chunk {
    blob: std::sync::Arc<spindle_bus::Blob>,
    range: std::ops::Range<usize>,
}

pub(super) async fn write_loop<W: AsyncWrite + Unpin>(
    peer: &PeerLink,
    writer: &mut W,
    rx: &mut mpsc::Receiver<Outgoing>,
) -> String {
    let mut out = Vec::with_capacity(WRITE_BATCH);
    let mut bulk = Bulk::new(peer);
    let mut next_ping = Instant::now() + HEARTBEAT;
    loop {
        if bulk.queue.is_empty() {
            tokio::select! {
                next = rx.recv() => {
                    let Some(next) = next else { return "the link's queue closed".into() };
                    bulk.take(&mut out, next);
                }
                _ = tokio::time::sleep_until(next_ping.into()) => {}
            }
        }
        while out.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(next) => bulk.take(&mut out, next),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return "the link's queue closed".into(),
            }
        }
        let now = Instant::now();
        if now >= next_ping {
            let nonce = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64);
            wire::encode_ping(&mut out, nonce, false);
            next_ping = now + HEARTBEAT;
        }
        let chunk = if out.len() < WRITE_BATCH {
            bulk.step(&mut out)
        } else {
            None
        };
        if out.is_empty() {
            continue;
        }
        if let Err(e) = writer.write_all(&out).await {
            return format!("writing failed: {e}");
        }
        if let Some(c) = &chunk
            && let Err(e) = writer.write_all(&c.blob.bytes[c.range.clone()]).await
        {
            return format!("writing failed: {e}");
        }
        if let Err(e) = writer.flush().await {
            return format!("writing failed: {e}");
        }
        out.clear();
        if out.capacity() > 4 * WRITE_BATCH {
            out.shrink_to(WRITE_BATCH);
        }
        if !bulk.queue.is_empty() {
            // A fast socket never makes a write wait: between chunks the
            // thread's other links (and this one's reader) get their turn.
            tokio::task::yield_now().await;
        }
    }
}

fn dropped(peer: &PeerLink) {
    tracing::warn!(
        "link to {}: a message past the wire's limits was dropped",
        peer.name
    );
}

/// Puts a whole message (its blob, if any, inline) into `out`, and gives
/// its room on the link back if it was `counted`.
fn put(peer: &PeerLink, out: &mut Vec<u8>, env: &Envelope, counted: bool) {
    if counted {
        peer.release(env);
    }
    if !encode(out, env) {
        dropped(peer);
    }
}

/// Appends `env`'s MESSAGE frame to `out` (with its blob when that is
/// small; a large one is announced, its chunks follow); false if it
/// cannot go on the wire (a message past the wire's limits, which the
/// node never lets grow so large).
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
    let inline = !large(env);
    let blob = match &env.blob {
        Some(b) => match u32::try_from(b.bytes.len()) {
            Ok(len) => Some(BlobHead {
                mime: b.mime.clone(),
                len,
                inline,
            }),
            Err(_) => return false,
        },
        None => None,
    };
    let header = Header {
        id: env.id,
        source: env.source.process.clone(),
        target: env.target.process.clone(),
        rsvp: env.rsvp.as_ref().map(|r| r.process.clone()),
        rsvp_here: env.rsvp.as_ref().is_some_and(|r| r.node != LOCAL_NODE),
        kind,
        metadata,
        body_len,
        blob,
        capabilities: env.message.capabilities().to_vec(),
    };
    let bytes = env
        .blob
        .as_ref()
        .filter(|_| inline)
        .map(|b| b.bytes.as_slice());
    wire::encode_message(out, &header, body, bytes).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Peer;
    use crate::wire::Frame;
    use spindle_bus::{Blob, Request};
    use spindle_types::Address;
    use std::cell::RefCell;
    use std::pin::Pin;
    use std::rc::Rc;
    use std::sync::Arc;
    use std::task::{Context, Poll};

    /// A socket that takes every write at once and keeps the bytes.
    #[derive(Clone, Default)]
    struct Wire(Rc<RefCell<Vec<u8>>>);

    impl AsyncWrite for Wire {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.0.borrow_mut().extend_from_slice(b);
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// What the wire holds, frame by frame: (message id, blob bytes) for
    /// MESSAGE and BLOB frames.
    fn frames(bytes: &[u8]) -> Vec<(&'static str, u64, usize)> {
        let mut out = vec![];
        let mut at = 0;
        while at + 4 <= bytes.len() {
            let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            match wire::decode(&bytes[at + 4..at + 4 + len]).unwrap() {
                Frame::Message { header, .. } => out.push(("message", header.id, 0)),
                Frame::Blob { id, bytes } => out.push(("blob", id, bytes.len())),
                _ => {}
            }
            at += 4 + len;
        }
        out
    }

    fn env(id: u64, source: &str, blob: usize) -> Envelope {
        let at = |p: &str| {
            Arc::new(Address {
                node: "local".into(),
                process: p.parse().unwrap(),
            })
        };
        Envelope {
            id,
            source: at(source),
            target: at("sink:demo:x"),
            rsvp: None,
            message: Message::Request(Request {
                inherit: false,
                expects_response: None,
                body: b"x".to_vec(),
                metadata: None,
                capabilities: vec![],
            }),
            blob: (blob > 0).then(|| {
                Arc::new(Blob {
                    mime: None,
                    bytes: vec![7; blob],
                })
            }),
        }
    }

    /// Sends `first`, waits until the writer has put one chunk of it on
    /// the wire, then sends `second`; returns the frames written.
    async fn race(first: Envelope, second: Envelope) -> Vec<(&'static str, u64, usize)> {
        let peer = Rc::new(PeerLink::new(Peer {
            name: "bob".into(),
            id: libp2p::PeerId::random(),
            addresses: vec![],
        }));
        let wire = Wire::default();
        let (tx, mut rx) = mpsc::channel(16);
        let writer = {
            let (peer, mut w) = (peer.clone(), wire.clone());
            tokio::task::spawn_local(async move { write_loop(&peer, &mut w, &mut rx).await })
        };
        tx.send(Outgoing::Message(first)).await.unwrap();
        for _ in 0..1000 {
            if frames(&wire.0.borrow()).iter().any(|f| f.0 == "blob") {
                break;
            }
            tokio::task::yield_now().await;
        }
        tx.send(Outgoing::Message(second)).await.unwrap();
        for _ in 0..10_000 {
            if frames(&wire.0.borrow())
                .iter()
                .filter(|f| f.0 == "message")
                .count()
                == 2
                && rx_done(&wire)
            {
                break;
            }
            tokio::task::yield_now().await;
        }
        drop(tx);
        let _ = writer.await;
        let bytes = wire.0.borrow().clone();
        frames(&bytes)
    }

    /// The wire has the 4 MiB blob's last byte.
    fn rx_done(wire: &Wire) -> bool {
        frames(&wire.0.borrow())
            .iter()
            .filter(|f| f.0 == "blob")
            .map(|f| f.2)
            .sum::<usize>()
            == 4 << 20
    }

    fn position(frames: &[(&str, u64, usize)], id: u64, kind: &str) -> usize {
        frames
            .iter()
            .rposition(|f| f.1 == id && f.0 == kind)
            .unwrap()
    }

    #[tokio::test]
    async fn a_small_message_goes_between_a_large_blobs_chunks() {
        let local = tokio::task::LocalSet::new();
        let frames = local
            .run_until(race(
                env(1, "big:demo:x", 4 << 20),
                env(2, "small:demo:x", 0),
            ))
            .await;
        let small = position(&frames, 2, "message");
        let last_chunk = position(&frames, 1, "blob");
        assert!(small < last_chunk, "{frames:?}");
        // At most one chunk went out ahead of it after it was queued.
        let chunks_before = frames[..small].iter().filter(|f| f.0 == "blob").count();
        assert!(chunks_before <= 2, "{chunks_before} chunks first");
    }

    #[test]
    fn what_a_link_held_in_its_bulk_lane_is_given_back_when_it_ends() {
        let peer = PeerLink::new(Peer {
            name: "bob".into(),
            id: libp2p::PeerId::random(),
            addresses: vec![],
        });
        let (big, behind) = (env(1, "big:demo:x", 1 << 20), env(2, "big:demo:x", 0));
        assert!(peer.reserve(&big) && peer.reserve(&behind));
        let mut out = vec![];
        {
            let mut bulk = Bulk::new(&peer);
            bulk.take(&mut out, Outgoing::Message(big));
            bulk.take(&mut out, Outgoing::Message(behind));
            // The blob's MESSAGE frame and one chunk go; then the link ends.
            assert!(bulk.step(&mut out).is_none());
            assert!(bulk.step(&mut out).is_some());
        }
        assert_eq!(peer.queued.load(std::sync::atomic::Ordering::Acquire), 0);
        assert!(peer.by_source().is_empty());
    }

    #[tokio::test]
    async fn a_process_s_next_message_waits_behind_its_own_blob() {
        let local = tokio::task::LocalSet::new();
        let frames = local
            .run_until(race(env(1, "big:demo:x", 4 << 20), env(2, "big:demo:x", 0)))
            .await;
        assert!(
            position(&frames, 2, "message") > position(&frames, 1, "blob"),
            "{frames:?}"
        );
    }
}
