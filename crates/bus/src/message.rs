//! Messages as the host sees them.

use spindle_types::Address;
use std::sync::Arc;
use std::time::Duration;

/// A right issued by `issuer`; `params` is JSON text.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Capability {
    pub issuer: Address,
    pub params: String,
}

impl Capability {
    /// The right to send to and be reached from other nodes (`--network`),
    /// issued by the node itself; a parent passes it to a child like any
    /// capability it holds.
    pub fn network() -> Capability {
        Capability {
            issuer: Address {
                node: spindle_types::id::LOCAL_NODE.into(),
                process: spindle_types::ProcessId {
                    process: spindle_abi::NETWORK_PROCESS.into(),
                    package: spindle_types::PackageId::system(),
                },
            },
            params: spindle_abi::NETWORK_PARAMS.into(),
        }
    }

    /// The right to send requests to `target`.
    pub fn messaging(target: &Address) -> Capability {
        Capability {
            issuer: target.clone(),
            params: crate::MESSAGING.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub mime: Option<String>,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub inherit: bool,
    pub expects_response: Option<Duration>,
    pub body: Vec<u8>,
    pub metadata: Option<String>,
    pub capabilities: Vec<Capability>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub inherit: bool,
    pub body: Vec<u8>,
    pub metadata: Option<String>,
    pub capabilities: Vec<Capability>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Request(Request),
    /// With the requester's context, filled in on delivery.
    Response(Response, Option<Vec<u8>>),
    /// The request numbered by the envelope's `id` failed where it was (its
    /// target ended holding it): sent by the node, in place of a response,
    /// to the request's `rsvp`. The requester's host turns it into a send
    /// error carrying its own copy of the request and context.
    Failed(SendErrorKind),
}

impl Message {
    pub fn capabilities(&self) -> &[Capability] {
        match self {
            Message::Request(r) => &r.capabilities,
            Message::Response(r, _) => &r.capabilities,
            Message::Failed(_) => &[],
        }
    }

    /// The capabilities it carries, to change (a message that crosses
    /// nodes names its own node's issuers by name).
    pub fn capabilities_mut(&mut self) -> Option<&mut Vec<Capability>> {
        match self {
            Message::Request(r) => Some(&mut r.capabilities),
            Message::Response(r, _) => Some(&mut r.capabilities),
            Message::Failed(_) => None,
        }
    }

    /// Whether this answers the request it is numbered after (a response,
    /// or word that it failed).
    pub fn is_answer(&self) -> bool {
        matches!(self, Message::Response(..) | Message::Failed(_))
    }
}

/// A message in flight. Addresses are shared (`Arc`): a process's own
/// address goes into every message it sends, and cloning four strings per
/// hop was a measurable share of a round trip.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// For a request: its number. For a response: the number of the request answered.
    pub id: u64,
    pub source: Arc<Address>,
    pub target: Arc<Address>,
    /// Requests: where responses go (the requester, or its requester when inherited).
    pub rsvp: Option<Arc<Address>>,
    pub message: Message,
    /// Shared, so inheriting it down a chain of processes never copies it.
    pub blob: Option<Arc<Blob>>,
}

/// Messages up to this size are not counted against byte budgets (see
/// [`Envelope::weight`]).
pub const UNCOUNTED_BYTES: usize = 4096;

impl Envelope {
    /// Bytes it holds on the sender's behalf while queued: what mailbox
    /// budgets count. A small message weighs nothing: the mailbox's count
    /// of messages already bounds what small ones hold
    /// ([`UNCOUNTED_BYTES`] × capacity), and it keeps the common message
    /// off the counters.
    pub fn weight(&self) -> usize {
        let (body, meta) = match &self.message {
            Message::Request(r) => (r.body.len(), r.metadata.as_ref().map_or(0, String::len)),
            Message::Response(r, _) => (r.body.len(), r.metadata.as_ref().map_or(0, String::len)),
            Message::Failed(_) => (0, 0),
        };
        let total = body + meta + self.blob.as_ref().map_or(0, |b| b.bytes.len());
        if total <= UNCOUNTED_BYTES { 0 } else { total }
    }

    /// A plain request: `body`, no metadata, capabilities or blob; responses
    /// (if `expects_response`) go to `rsvp`.
    pub fn request(
        id: u64,
        source: Arc<Address>,
        target: Arc<Address>,
        rsvp: Option<Arc<Address>>,
        body: Vec<u8>,
        expects_response: Option<Duration>,
    ) -> Envelope {
        Envelope {
            id,
            source,
            target,
            rsvp,
            message: Message::Request(Request {
                inherit: false,
                expects_response,
                body,
                metadata: None,
                capabilities: vec![],
            }),
            blob: None,
        }
    }
}

/// Why a send failed. Node-to-node frames carry it by variant index
/// (postcard): new kinds go at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SendErrorKind {
    Offline,
    Timeout,
    NoCapability,
    MailboxFull,
    Invalid,
    /// The target ended while it held the request, before it responded.
    Exited,
}

impl SendErrorKind {
    /// The kind as every protocol of the node spells it (WIT, IPC frames,
    /// the control socket).
    pub fn name(self) -> &'static str {
        use spindle_abi::kind;
        match self {
            SendErrorKind::Offline => kind::OFFLINE,
            SendErrorKind::Timeout => kind::TIMEOUT,
            SendErrorKind::NoCapability => kind::NO_CAPABILITY,
            SendErrorKind::MailboxFull => kind::MAILBOX_FULL,
            SendErrorKind::Invalid => kind::INVALID,
            SendErrorKind::Exited => kind::EXITED,
        }
    }
}

impl std::fmt::Display for SendErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SendErrorKind::Offline => "offline: no process at that address",
            SendErrorKind::Timeout => "timeout: no response in time",
            SendErrorKind::NoCapability => {
                "no capability: the target is not public and the sender may not message it"
            }
            SendErrorKind::MailboxFull => "mailbox full: the target is not keeping up",
            SendErrorKind::Invalid => {
                "invalid: nothing to respond to, or a capability the sender does not hold"
            }
            SendErrorKind::Exited => "exited: the target ended before it responded",
        })
    }
}

/// A message that could not be delivered, with its context.
#[derive(Debug, Clone)]
pub struct SendError {
    pub kind: SendErrorKind,
    pub target: Address,
    pub message: Message,
    pub context: Option<Vec<u8>>,
}
