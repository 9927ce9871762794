//! # spindle-net: links between nodes
//!
//! A node with a name (`spindle node init`) has an Ed25519 key — its
//! libp2p identity — and an allow-list of peers, each a name, a key and
//! addresses ([`config`]). It keeps one link to each peer: one TCP
//! connection (Noise, Yamux) carrying one long-lived stream of Spindle's
//! own frames ([`wire`]). Of two peers, the one whose key sorts first dials
//! and redials with backoff; the other listens, so there is never a second
//! link to settle.
//!
//! The bus hands this crate every message for another node ([`Net`] is
//! its [`Remote`]): it goes on that peer's link queue at once, or fails at
//! once — `offline` for an unknown node or a link that is not up,
//! `mailbox-full` for a full queue. Requests awaiting a response are
//! remembered per link; when a link ends (the peer closed it, its
//! heartbeats stopped for [`link::DEAD_AFTER`], it broke the protocol)
//! each of them fails `offline` at once.
//!
//! A peer is untrusted input: it proves its key in the handshake, must
//! give the name its key has here, and can never name another node as a
//! message's source — the wire carries process ids only; the source node
//! is the authenticated peer. Whatever it sends that breaks the protocol
//! closes its link and nothing else. Its frames are size-capped, its queue
//! is bounded both ways, and delivery into this node follows the bus's
//! rules for a remote sender ([`spindle_bus::Bus::deliver_remote`]).
//!
//! The network runs as tasks on the runtime that starts it — in the
//! daemon, the one thread that also runs the processes: the swarm is owned
//! by one task, and a message between a process and its link never wakes
//! another thread (on a round trip, a hop between threads costs more than
//! the rest of the node's work).

pub mod config;
mod link;
mod swarm;
pub mod wire;

pub use config::{ConfigError, Files, Identity, NodeConfig, PeerEntry};
pub use link::{DEAD_AFTER, HEARTBEAT, LinkStatus, PeerStatus};

use link::PeerLink;
use spindle_bus::{Bus, Envelope, Remote, Undelivered};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use tokio::sync::mpsc;

/// Why the network could not start.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {address}: {why}")]
    Listen { address: String, why: String },
    #[error("the network's transport could not be set up: {0}")]
    Transport(String),
}

/// What the node's links share between the bus's callers and the
/// network's tasks.
pub(crate) struct Shared {
    pub name: String,
    pub own: libp2p::PeerId,
    pub bus: Arc<Bus>,
    /// One record per allow-listed peer, by name.
    pub peers: RwLock<HashMap<String, Arc<PeerLink>>>,
}

impl Shared {
    pub fn peer(&self, name: &str) -> Option<Arc<PeerLink>> {
        self.peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    pub fn peer_by_id(&self, id: &libp2p::PeerId) -> Option<Arc<PeerLink>> {
        self.peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|p| p.id == *id)
            .cloned()
    }

    /// Whether this node opens the link's stream to `peer` (its key sorts
    /// first) or waits for the peer to open it. Both sides dial
    /// connections, so a link comes up when either knows where the other is.
    pub fn dials(&self, peer: &libp2p::PeerId) -> bool {
        self.own.to_bytes() < peer.to_bytes()
    }
}

/// The node's links ([`start`]); the bus's [`Remote`].
#[derive(Clone)]
pub struct Net {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<swarm::Command>,
    listening: Arc<RwLock<Vec<String>>>,
}

impl Net {
    /// Starts the network of an initialised node on the current tokio
    /// runtime: listens on its addresses, dials its peers, and connects
    /// `bus` to it.
    pub fn start(identity: Identity, bus: Arc<Bus>) -> Result<Net, NetError> {
        let shared = Arc::new(Shared {
            name: identity.name.clone(),
            own: identity.peer_id(),
            bus: bus.clone(),
            peers: RwLock::new(
                identity
                    .peers
                    .iter()
                    .map(|p| (p.name.clone(), Arc::new(PeerLink::new(p.clone()))))
                    .collect(),
            ),
        });
        let listening = Arc::new(RwLock::new(vec![]));
        let commands = swarm::spawn(identity, shared.clone(), listening.clone())?;
        let net = Net {
            shared,
            commands,
            listening,
        };
        bus.connect(net.shared.name.clone(), Arc::new(net.clone()));
        Ok(net)
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The node's key, as its peer id.
    pub fn key(&self) -> String {
        self.shared.own.to_string()
    }

    /// Where the node listens (once it does).
    pub fn listening(&self) -> Vec<String> {
        self.listening
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every allow-listed peer and its link.
    pub fn peers(&self) -> Vec<PeerStatus> {
        let mut all: Vec<PeerStatus> = self
            .shared
            .peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|p| p.status())
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Takes a new allow-list (`node.toml` changed): new peers are dialed,
    /// removed ones lose their link, changed ones are linked anew.
    pub fn reload(&self, identity: &Identity) {
        let _ = self
            .commands
            .send(swarm::Command::Peers(identity.peers.clone()));
    }
}

impl Remote for Net {
    fn send(&self, env: Envelope) -> Result<(), Undelivered> {
        match self.shared.peer(&env.target.node) {
            Some(peer) => peer.send(env),
            None => Err((spindle_bus::SendErrorKind::Offline, Box::new(env))),
        }
    }
}
