//! A link's reader: frames from the peer, checked, turned into envelopes
//! for the bus; a chunked blob is put together before its message goes on.

use super::{Heard, Outgoing, PeerLink, wall_ms};
use crate::Shared;
use crate::wire::{self, BlobHead, Frame, Header, Kind};
use libp2p::futures::{AsyncRead, AsyncReadExt};
use spindle_bus::{Blob, Envelope, Message, Request, Response, SendErrorKind};
use spindle_types::{Address, id::LOCAL_NODE};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

/// Bytes read from a stream at a time: a large frame grows its buffer as
/// its bytes arrive, never by what its prefix claims.
pub(super) const READ_CHUNK: usize = 64 << 10;
/// A buffer grown past this by one large frame is given back after it.
const KEEP_BUFFER: usize = 256 << 10;

/// Reads one frame of at most `max` bytes into `buf` (its bytes after the
/// length prefix).
pub(super) async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    last: &Heard,
    max: usize,
) -> Result<(), String> {
    let mut prefix = [0u8; 4];
    reader
        .read_exact(&mut prefix)
        .await
        .map_err(|e| format!("the stream ended: {e}"))?;
    let len = wire::frame_len(prefix).map_err(|e| e.to_string())?;
    if len > max {
        return Err(format!(
            "a frame of {len} bytes where at most {max} may come"
        ));
    }
    buf.clear();
    if buf.capacity() > KEEP_BUFFER && len < READ_CHUNK {
        buf.shrink_to(READ_CHUNK);
    }
    while buf.len() < len {
        // At most READ_CHUNK more than has arrived: a length prefix alone
        // never makes the buffer large.
        let start = buf.len();
        buf.resize(start + (len - start).min(READ_CHUNK), 0);
        let n = reader
            .read(&mut buf[start..])
            .await
            .map_err(|e| format!("the stream broke: {e}"))?;
        buf.truncate(start + n);
        if n == 0 {
            return Err("the stream ended inside a frame".into());
        }
        last.now();
    }
    last.now();
    Ok(())
}

/// A message whose blob is still arriving in BLOB frames. A link holds at
/// most one (the sender streams one blob at a time), of at most
/// [`wire::MAX_PAYLOAD`] bytes.
struct Assembly {
    header: Header,
    body: Vec<u8>,
    blob: Vec<u8>,
    len: usize,
}

pub(super) async fn read_loop<R: AsyncRead + Unpin>(
    shared: &Shared,
    peer: &PeerLink,
    reader: &mut R,
    buf: &mut Vec<u8>,
    last: &Heard,
    tx: &mpsc::Sender<Outgoing>,
) -> String {
    let mut assembling: Option<Assembly> = None;
    let mut stalled = Stalled::default();
    loop {
        if let Err(why) = read_frame(reader, buf, last, wire::MAX_FRAME).await {
            return why;
        }
        peer.last_seen_ms.store(wall_ms(), Ordering::Relaxed);
        let frame = match wire::decode(buf) {
            Ok(f) => f,
            Err(e) => return bad(peer, &e.to_string()),
        };
        let (header, body, blob) = match frame {
            Frame::Ping(nonce) => {
                let _ = tx.try_send(Outgoing::Pong(nonce));
                continue;
            }
            Frame::Pong(nonce) => {
                peer.rtt_us
                    .store(micros_since(nonce).max(1), Ordering::Relaxed);
                continue;
            }
            Frame::Hello(_) => return bad(peer, "it said HELLO twice"),
            Frame::Message { header, body, blob } => match &header.blob {
                Some(BlobHead {
                    inline: false, len, ..
                }) if *len > 0 => {
                    if assembling.is_some() {
                        return bad(peer, "it announced a blob before the last one was done");
                    }
                    // Reserved as announced (at most MAX_PAYLOAD, checked
                    // by the decoder): pages no byte reaches cost nothing.
                    let len = *len as usize;
                    assembling = Some(Assembly {
                        len,
                        header: *header,
                        body: body.to_vec(),
                        blob: Vec::with_capacity(len),
                    });
                    continue;
                }
                _ => (*header, body.to_vec(), blob.map(<[u8]>::to_vec)),
            },
            Frame::Blob { id, bytes } => {
                let Some(a) = assembling.as_mut().filter(|a| a.header.id == id) else {
                    return bad(peer, "it sent blob bytes for no message it announced");
                };
                if a.blob.len().saturating_add(bytes.len()) > a.len {
                    return bad(peer, "it sent more blob bytes than it announced");
                }
                a.blob.extend_from_slice(bytes);
                if a.blob.len() < a.len {
                    continue;
                }
                let Some(a) = assembling.take() else { continue };
                (a.header, a.body, Some(a.blob))
            }
        };
        let env = inbound(&shared.name, peer, header, body, blob);
        deliver(shared, peer, tx, &mut stalled, env).await;
    }
}

/// A peer that broke the protocol: logged, and its link closes.
fn bad(peer: &PeerLink, why: &str) -> String {
    tracing::warn!("link to {}: {why}; closing it", peer.name);
    format!("it broke the link protocol: {why}")
}

/// Hands a message from the peer to the bus.
/// Local processes whose mailbox stayed full through a whole wait: the
/// link refuses their messages at once until one gets in, so a process
/// that never reads holds the link up once, not per message.
#[derive(Default)]
struct Stalled(std::collections::HashSet<spindle_types::ProcessId>);

/// How many stalled targets a link remembers (past it, it forgets them all
/// and may wait once more for each).
const MAX_STALLED: usize = 256;

impl Stalled {
    fn mark(&mut self, p: &spindle_types::ProcessId) {
        if self.0.len() >= MAX_STALLED {
            self.0.clear();
        }
        self.0.insert(p.clone());
    }
}

async fn deliver(
    shared: &Shared,
    peer: &PeerLink,
    tx: &mpsc::Sender<Outgoing>,
    stalled: &mut Stalled,
    env: Envelope,
) {
    // An answer is let in only for a request this link carried there, to
    // the process awaiting it; any other (late, or unasked for) is
    // dropped, as a late one is locally.
    if env.message.is_answer() && !peer.answered(&env) {
        shared.bus.late_responses.fetch_add(1, Ordering::Relaxed);
        return;
    }
    // A request whose answer goes to a process here must be one that
    // process sent there (handed back with `inherit`), or a peer could
    // answer for others.
    if let (Message::Request(_), Some(rsvp)) = (&env.message, &env.rsvp)
        && rsvp.node == LOCAL_NODE
        && !peer.take_carried(env.id, &rsvp.process)
    {
        tracing::warn!(
            "link to {}: a request routed to {} that it was never sent; dropped",
            peer.name,
            rsvp.process
        );
        return;
    }
    let target = (!stalled.0.is_empty()).then(|| env.target.process.clone());
    let delivered = match shared.bus.deliver_remote(env) {
        // A full mailbox holds the link back as it holds a local sender
        // back (up to MAILBOX_WAIT): the peer's queue fills and its
        // senders hear `mailbox-full`, rather than messages vanishing here
        // — once per target that stays full, not for every message.
        Err((SendErrorKind::MailboxFull, env)) if !stalled.0.contains(&env.target.process) => {
            if shared.bus.wait_for_room(&env.target.process).await {
                shared.bus.deliver_remote(*env)
            } else {
                stalled.mark(&env.target.process);
                Err((SendErrorKind::MailboxFull, env))
            }
        }
        other => other,
    };
    // A stalled target that takes a message reads again.
    if let (Ok(()), Some(t)) = (&delivered, target) {
        stalled.0.remove(&t);
    }
    if let Err((kind, env)) = delivered {
        refuse(shared, peer, tx, *env, kind);
    }
}

/// A message from the peer as the bus carries it: its source and rsvp are
/// on the peer (the authenticated node), its target here (`own` is this
/// node's name), and a capability issued here names this node `local`.
fn inbound(
    own: &str,
    peer: &PeerLink,
    h: Header,
    body: Vec<u8>,
    blob: Option<Vec<u8>>,
) -> Envelope {
    let there = |process| {
        Arc::new(Address {
            node: peer.name.clone(),
            process,
        })
    };
    let mut capabilities = h.capabilities;
    for c in capabilities.iter_mut().filter(|c| c.issuer.node == own) {
        c.issuer.node = LOCAL_NODE.into();
    }
    let message = match h.kind {
        Kind::Request {
            inherit,
            expects_response_ms,
        } => Message::Request(Request {
            inherit,
            expects_response: expects_response_ms.map(Duration::from_millis),
            body,
            metadata: h.metadata,
            capabilities,
        }),
        Kind::Response { inherit } => Message::Response(
            Response {
                inherit,
                body,
                metadata: h.metadata,
                capabilities,
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
        rsvp: h.rsvp.map(|process| {
            if h.rsvp_here {
                Arc::new(Address {
                    node: LOCAL_NODE.into(),
                    process,
                })
            } else {
                there(process)
            }
        }),
        message,
        blob: match (h.blob, blob) {
            (Some(head), bytes) => Some(Arc::new(Blob {
                mime: head.mime,
                bytes: bytes.unwrap_or_default(),
            })),
            (None, _) => None,
        },
    }
}

/// Tells the peer that its request was not delivered here (if it awaits
/// an answer); an undeliverable response is only counted.
fn refuse(
    shared: &Shared,
    peer: &PeerLink,
    tx: &mpsc::Sender<Outgoing>,
    env: Envelope,
    kind: SendErrorKind,
) {
    match (&env.message, env.rsvp) {
        // Handed back with `inherit`: its requester is here.
        (Message::Request(_), Some(rsvp)) if rsvp.node == LOCAL_NODE => {
            shared.bus.fail_request(&env.target, env.id, rsvp, kind);
        }
        (Message::Request(_), Some(rsvp)) => {
            let failed = Envelope {
                id: env.id,
                source: env.target,
                target: rsvp,
                rsvp: None,
                message: Message::Failed(kind),
                blob: None,
            };
            if tx.try_send(Outgoing::Refusal(failed)).is_err() {
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
