//! The frames two nodes exchange on their one stream (`docs/network.md`).
//!
//! ```text
//! frame   = len:u32 LE | kind:u8 | payload          (len counts kind + payload)
//! HELLO   = postcard(Hello)                          first frame each way
//! PING    = nonce:u64 LE                             answered by PONG, same nonce
//! PONG    = nonce:u64 LE
//! MESSAGE = header_len:u32 LE | postcard(Header) | body | blob?
//! BLOB    = id:u64 LE | bytes                        the next bytes of message id's blob
//! ```
//!
//! A blob up to [`INLINE_BLOB`] rides in its MESSAGE frame. A larger one
//! follows its MESSAGE in BLOB frames of at most [`BLOB_CHUNK`] bytes, and
//! other messages go between them: a large blob never holds a small
//! message back by more than one chunk. The sender streams one blob at a
//! time, so BLOB frames always continue the last message announced with
//! one, which is delivered once its last byte is in.
//!
//! Everything here is read from a peer, so it is hostile input: lengths are
//! checked against [`MAX_FRAME`] before anything is allocated, every split is
//! checked arithmetic, and a frame that does not decode is an error — which
//! closes that link and nothing else. Addresses travel as process ids only:
//! a message's source node is always the authenticated peer and its target
//! node always the receiver, so neither can be claimed on the wire.

use serde::{Deserialize, Serialize};
use spindle_bus::{Capability, SendErrorKind};
use spindle_types::ProcessId;

/// Version of this protocol; a peer speaking another is refused at HELLO.
pub const VERSION: u16 = 3;
/// The libp2p protocol of Spindle's stream.
pub const PROTOCOL: &str = "/spindle/link/3";
/// Largest body, metadata or blob a message may carry: what one mailbox
/// may hold, so nothing a peer sends is larger than a local send could be.
pub const MAX_PAYLOAD: usize = spindle_bus::MAILBOX_BYTES;
/// Largest header (ids, options, metadata): ids are short, metadata is
/// a line of JSON.
pub const MAX_HEADER: usize = 64 << 10;
/// Largest HELLO: a version and a node name (names are short), so a peer
/// cannot make the greeting itself large.
pub const MAX_HELLO: usize = 1024;
/// Largest blob sent inside its MESSAGE frame; larger ones go in chunks.
pub const INLINE_BLOB: usize = 64 << 10;
/// Most blob bytes in one BLOB frame: what a small message may wait behind.
pub const BLOB_CHUNK: usize = 256 << 10;
/// Largest frame on the wire: a full body, an inline blob and a header.
pub const MAX_FRAME: usize = MAX_PAYLOAD + INLINE_BLOB + MAX_HEADER + 8;

const HELLO: u8 = 1;
const PING: u8 = 2;
const PONG: u8 = 3;
const MESSAGE: u8 = 4;
const BLOB: u8 = 5;

/// The first frame each way: who the sender says it is. Its key was
/// already proved by the transport's handshake; the name must be the one
/// the receiver's allow-list gives that key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u16,
    pub name: String,
}

/// What a message says, but its body and blob (which follow it raw).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub id: u64,
    /// On the sending node.
    pub source: ProcessId,
    /// On the receiving node.
    pub target: ProcessId,
    /// Where responses go (a request only): on the sending node, or with
    /// `rsvp_here` on the receiving one — a request the receiver sent, handed
    /// back to it with `inherit`.
    pub rsvp: Option<ProcessId>,
    pub rsvp_here: bool,
    pub kind: Kind,
    pub metadata: Option<String>,
    pub body_len: u32,
    pub blob: Option<BlobHead>,
    /// Attached capabilities: claims the receiver checks (a right issued
    /// on the receiver by its own record; one issued on the sender is the
    /// sender's word).
    pub capabilities: Vec<Capability>,
}

/// A message's blob, as its header announces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobHead {
    pub mime: Option<String>,
    pub len: u32,
    /// Its bytes end the MESSAGE frame; otherwise BLOB frames bring them.
    pub inline: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    Request {
        inherit: bool,
        expects_response_ms: Option<u64>,
    },
    Response {
        inherit: bool,
    },
    /// The request numbered `id` failed where it went.
    Failed(SendErrorKind),
}

/// One decoded frame. A message's body and blob borrow from the frame's
/// buffer until the receiver copies them out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    Hello(Hello),
    Ping(u64),
    Pong(u64),
    /// `blob` holds an inline blob's bytes; a blob that is not inline
    /// comes in [`Frame::Blob`]s.
    Message {
        header: Box<Header>,
        body: &'a [u8],
        blob: Option<&'a [u8]>,
    },
    /// The next bytes of the blob of the message numbered `id`.
    Blob {
        id: u64,
        bytes: &'a [u8],
    },
}

/// Why bytes from a peer are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("a frame of {0} bytes is over the limit of {MAX_FRAME}")]
    TooLarge(u64),
    #[error("an empty frame")]
    Empty,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("a {0} frame is cut short or too long")]
    BadLength(&'static str),
    #[error("a {what} frame does not decode: {why}")]
    Undecodable { what: &'static str, why: String },
}

/// Reads a frame's length prefix: the bytes that follow it, once checked.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, WireError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len == 0 {
        return Err(WireError::Empty);
    }
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len as u64));
    }
    Ok(len)
}

/// Decodes one frame (the bytes after its length prefix).
pub fn decode(frame: &[u8]) -> Result<Frame<'_>, WireError> {
    let (&kind, payload) = frame.split_first().ok_or(WireError::Empty)?;
    match kind {
        HELLO => {
            let hello: Hello =
                postcard::from_bytes(payload).map_err(|e| undecodable("hello", e))?;
            Ok(Frame::Hello(hello))
        }
        PING | PONG => {
            let nonce: [u8; 8] = payload
                .try_into()
                .map_err(|_| WireError::BadLength("ping"))?;
            let nonce = u64::from_le_bytes(nonce);
            Ok(if kind == PING {
                Frame::Ping(nonce)
            } else {
                Frame::Pong(nonce)
            })
        }
        MESSAGE => decode_message(payload),
        BLOB => {
            let (id, bytes) = payload
                .split_first_chunk::<8>()
                .ok_or(WireError::BadLength("blob"))?;
            if bytes.is_empty() || bytes.len() > BLOB_CHUNK {
                return Err(WireError::BadLength("blob"));
            }
            Ok(Frame::Blob {
                id: u64::from_le_bytes(*id),
                bytes,
            })
        }
        other => Err(WireError::UnknownKind(other)),
    }
}

fn decode_message(payload: &[u8]) -> Result<Frame<'_>, WireError> {
    let short = WireError::BadLength("message");
    let (len, rest) = payload.split_first_chunk::<4>().ok_or(short.clone())?;
    let header_len = u32::from_le_bytes(*len) as usize;
    if header_len > MAX_HEADER || header_len > rest.len() {
        return Err(short);
    }
    let (header, rest) = rest.split_at(header_len);
    let header: Header = postcard::from_bytes(header).map_err(|e| undecodable("message", e))?;
    let body_len = header.body_len as usize;
    if body_len > MAX_PAYLOAD || body_len > rest.len() {
        return Err(short);
    }
    let (body, blob) = rest.split_at(body_len);
    let blob = match &header.blob {
        Some(b) if b.inline && b.len as usize == blob.len() && blob.len() <= INLINE_BLOB => {
            Some(blob)
        }
        Some(b) if !b.inline && b.len as usize <= MAX_PAYLOAD && blob.is_empty() => None,
        None if blob.is_empty() => None,
        _ => return Err(short),
    };
    if header
        .metadata
        .as_ref()
        .is_some_and(|m| m.len() > MAX_HEADER)
    {
        return Err(short);
    }
    Ok(Frame::Message {
        header: Box::new(header),
        body,
        blob,
    })
}

fn undecodable(what: &'static str, e: postcard::Error) -> WireError {
    WireError::Undecodable {
        what,
        why: e.to_string(),
    }
}

/// Why a frame was not encoded (a local message too large for the wire).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("the message is over the wire's limits (body and blob ≤ {MAX_PAYLOAD} bytes each)")]
    TooLarge,
}

/// Appends a HELLO frame to `out`.
pub fn encode_hello(out: &mut Vec<u8>, hello: &Hello) {
    let payload = postcard::to_stdvec(hello).expect("a hello always encodes");
    put_frame(out, HELLO, &[&payload]);
}

/// Appends a PING (`pong` false) or PONG frame to `out`.
pub fn encode_ping(out: &mut Vec<u8>, nonce: u64, pong: bool) {
    put_frame(out, if pong { PONG } else { PING }, &[&nonce.to_le_bytes()]);
}

/// Appends a MESSAGE frame to `out`; the whole frame goes in one buffer so
/// the link writes it with one call. `blob` is an inline blob's bytes
/// (`None` for a blob sent in [`encode_blob`] chunks after it).
pub fn encode_message(
    out: &mut Vec<u8>,
    header: &Header,
    body: &[u8],
    blob: Option<&[u8]>,
) -> Result<(), EncodeError> {
    let head = postcard::to_stdvec(header).map_err(|_| EncodeError::TooLarge)?;
    let blob_fits = match (&header.blob, blob) {
        (None, None) => true,
        (Some(h), Some(b)) => h.inline && h.len as usize == b.len() && b.len() <= INLINE_BLOB,
        (Some(h), None) => !h.inline && h.len as usize <= MAX_PAYLOAD,
        (None, Some(_)) => false,
    };
    if head.len() > MAX_HEADER
        || body.len() > MAX_PAYLOAD
        || header.body_len as usize != body.len()
        || !blob_fits
    {
        return Err(EncodeError::TooLarge);
    }
    let head_len = (head.len() as u32).to_le_bytes();
    put_frame(out, MESSAGE, &[&head_len, &head, body, blob.unwrap_or(&[])]);
    Ok(())
}

/// Appends a BLOB frame (1 to [`BLOB_CHUNK`] bytes of message `id`'s blob).
pub fn encode_blob(out: &mut Vec<u8>, id: u64, bytes: &[u8]) {
    encode_blob_head(out, id, bytes.len());
    out.extend_from_slice(bytes);
}

/// Appends the start of a BLOB frame of `len` (1 to [`BLOB_CHUNK`]) bytes,
/// for a writer that sends the bytes from where they are.
pub fn encode_blob_head(out: &mut Vec<u8>, id: u64, len: usize) {
    debug_assert!(len > 0 && len <= BLOB_CHUNK);
    out.extend_from_slice(&((1 + 8 + len) as u32).to_le_bytes());
    out.push(BLOB);
    out.extend_from_slice(&id.to_le_bytes());
}

fn put_frame(out: &mut Vec<u8>, kind: u8, parts: &[&[u8]]) {
    let len = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    out.reserve(4 + len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.push(kind);
    for p in parts {
        out.extend_from_slice(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pid(s: &str) -> ProcessId {
        s.parse().unwrap()
    }

    fn one(buf: &[u8]) -> Frame<'_> {
        let len = frame_len(buf[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, buf.len() - 4, "one frame fills the buffer");
        decode(&buf[4..]).unwrap()
    }

    #[test]
    fn frames_round_trip() {
        let mut b = vec![];
        encode_hello(
            &mut b,
            &Hello {
                version: VERSION,
                name: "alice".into(),
            },
        );
        assert_eq!(
            one(&b),
            Frame::Hello(Hello {
                version: VERSION,
                name: "alice".into()
            })
        );
        b.clear();
        encode_ping(&mut b, 7, true);
        assert_eq!(one(&b), Frame::Pong(7));
        b.clear();
        let header = Header {
            id: 9,
            source: pid("a:demo:x"),
            target: pid("echo:demo:x"),
            rsvp: Some(pid("a:demo:x")),
            rsvp_here: false,
            kind: Kind::Request {
                inherit: false,
                expects_response_ms: Some(5000),
            },
            metadata: Some("{}".into()),
            body_len: 2,
            blob: Some(BlobHead {
                mime: None,
                len: 4,
                inline: true,
            }),
            capabilities: vec![],
        };
        encode_message(&mut b, &header, b"hi", Some(b"blob")).unwrap();
        assert_eq!(
            one(&b),
            Frame::Message {
                header: Box::new(header.clone()),
                body: b"hi",
                blob: Some(b"blob")
            }
        );
        // A large blob: announced, then chunked.
        b.clear();
        let big = Header {
            blob: Some(BlobHead {
                mime: Some("application/octet-stream".into()),
                len: 1 << 20,
                inline: false,
            }),
            ..header
        };
        encode_message(&mut b, &big, b"hi", None).unwrap();
        assert_eq!(
            one(&b),
            Frame::Message {
                header: Box::new(big.clone()),
                body: b"hi",
                blob: None
            }
        );
        b.clear();
        encode_blob(&mut b, 9, &[7; BLOB_CHUNK]);
        assert_eq!(
            one(&b),
            Frame::Blob {
                id: 9,
                bytes: &[7; BLOB_CHUNK]
            }
        );
        // Inline blobs are small; a header that disagrees with its bytes
        // does not encode.
        assert!(encode_message(&mut b, &big, b"hi", Some(b"x")).is_err());
        let mut fat = big.clone();
        fat.blob = Some(BlobHead {
            mime: None,
            len: (INLINE_BLOB + 1) as u32,
            inline: true,
        });
        assert!(encode_message(&mut b, &fat, b"hi", Some(&vec![0; INLINE_BLOB + 1])).is_err());
    }

    #[test]
    fn bad_frames_are_errors() {
        assert_eq!(frame_len(0u32.to_le_bytes()), Err(WireError::Empty));
        assert!(matches!(
            frame_len(u32::MAX.to_le_bytes()),
            Err(WireError::TooLarge(_))
        ));
        assert_eq!(decode(&[9]), Err(WireError::UnknownKind(9)));
        assert_eq!(decode(&[PING, 1, 2]), Err(WireError::BadLength("ping")));
        // A BLOB frame without bytes, or past a chunk.
        assert_eq!(
            decode(&[BLOB, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(WireError::BadLength("blob"))
        );
        let mut over = vec![BLOB, 0, 0, 0, 0, 0, 0, 0, 0];
        over.resize(over.len() + BLOB_CHUNK + 1, 0);
        assert_eq!(decode(&over), Err(WireError::BadLength("blob")));
        // A header longer than the frame.
        assert_eq!(
            decode(&[MESSAGE, 255, 255, 0, 0, 1]),
            Err(WireError::BadLength("message"))
        );
        // A process id that breaks the id rules does not decode.
        let mut b = vec![];
        let header = Header {
            id: 1,
            source: pid("a:b:c"),
            target: pid("a:b:c"),
            rsvp: None,
            rsvp_here: false,
            kind: Kind::Response { inherit: false },
            metadata: None,
            body_len: 0,
            blob: None,
            capabilities: vec![],
        };
        encode_message(&mut b, &header, b"", None).unwrap();
        let text = b.windows(5).position(|w| w == b"a:b:c").unwrap();
        b[text] = b'A';
        assert!(matches!(
            decode(&b[4..]),
            Err(WireError::Undecodable { .. })
        ));
    }

    proptest! {
        /// Whatever a peer sends, decoding returns — a frame or an error —
        /// and never panics or allocates past the frame.
        #[test]
        fn any_bytes_decode_or_fail(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
            if bytes.len() >= 4 {
                let _ = frame_len(bytes[..4].try_into().unwrap());
            }
        }

        /// A message's parts come back as they went.
        #[test]
        fn messages_round_trip(
            id in any::<u64>(),
            body in proptest::collection::vec(any::<u8>(), 0..256),
            blob in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..256)),
            chunked in any::<bool>(),
            meta in proptest::option::of("[ -~]{0,40}"),
            ms in proptest::option::of(any::<u64>()),
        ) {
            let header = Header {
                id,
                source: pid("a:demo:x"),
                target: pid("b:demo:x"),
                rsvp: None,
                rsvp_here: false,
                kind: Kind::Request { inherit: true, expects_response_ms: ms },
                metadata: meta,
                body_len: body.len() as u32,
                blob: blob.as_ref().map(|b| BlobHead {
                    mime: Some("text/plain".into()),
                    len: b.len() as u32,
                    inline: !chunked,
                }),
                capabilities: vec![],
            };
            let inline = if chunked { None } else { blob.as_deref() };
            let mut b = vec![];
            encode_message(&mut b, &header, &body, inline).unwrap();
            let got = one(&b);
            prop_assert_eq!(got, Frame::Message { header: Box::new(header), body: &body, blob: inline });
        }
    }
}
