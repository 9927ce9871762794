//! The network's tasks: the libp2p swarm (owned by one task), the
//! listener's inbound streams, and one task per peer that keeps its link
//! up. Of two peers, the one whose key sorts first opens the link's one
//! stream (its *dialer*); the other only dials connections (its
//! *connector*), so a link also comes up when only one side knows the
//! other's address, and two links never race.

use crate::config::{Identity, Peer};
use crate::link::{self, PeerLink};
use crate::{NetError, Shared, wire};
use libp2p::futures::StreamExt;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, noise, tcp, yamux};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// First wait before redialing a peer that could not be reached; doubled
/// on each failure up to [`MAX_BACKOFF`], and back to this once linked.
pub const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// Longest wait between dials: a peer that comes back is linked again
/// within it.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How long a dial and the opening of its stream may take (a peer that
/// accepts TCP but never answers the handshake is frozen).
pub const DIAL_WITHIN: Duration = Duration::from_secs(2);
/// Connections one peer may hold: its link's, and one more while a link
/// that ended is torn down; more are closed at once (each costs a socket
/// and buffers).
pub const MAX_CONNECTIONS_PER_PEER: u32 = 2;
/// Streams one connection may carry: a link uses one (another may be
/// opening while a refused one closes); a peer that opens more is refused
/// by the multiplexer, which then keeps no buffers for them.
const MAX_STREAMS: usize = 8;
/// Idle connections stay: a link's heartbeats, not an idle timer, decide
/// when a peer is gone.
const IDLE_CONNECTION: Duration = Duration::from_secs(365 * 24 * 3600);

pub(crate) enum Command {
    /// A new allow-list.
    Peers(Vec<Peer>),
    Dial {
        peer: PeerId,
        addresses: Vec<Multiaddr>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Disconnect(PeerId),
}

type NodeSwarm = Swarm<libp2p_stream::Behaviour>;

fn build(identity: &Identity) -> Result<NodeSwarm, NetError> {
    let transport = |e: &dyn std::fmt::Display| NetError::Transport(e.to_string());
    Ok(
        libp2p::SwarmBuilder::with_existing_identity(identity.key.clone())
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                || {
                    let mut c = yamux::Config::default();
                    c.set_max_num_streams(MAX_STREAMS);
                    c
                },
            )
            .map_err(|e| transport(&e))?
            .with_behaviour(|_| libp2p_stream::Behaviour::new())
            .map_err(|e| transport(&e))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION))
            .build(),
    )
}

/// Starts the network on the current tokio runtime (the daemon's own
/// thread): the swarm's task, and one task per peer. Returns once it
/// listens, or why it could not. On the thread that runs the processes, a
/// message goes from a process to its link and from the link to a process
/// without waking another thread.
pub(crate) fn spawn(
    identity: Identity,
    shared: Arc<Shared>,
    listening: Arc<RwLock<Vec<String>>>,
) -> Result<mpsc::UnboundedSender<Command>, NetError> {
    let (commands, rx) = mpsc::unbounded_channel();
    let mut swarm = build(&identity)?;
    for address in &identity.listen {
        swarm
            .listen_on(address.clone())
            .map_err(|e| NetError::Listen {
                address: address.to_string(),
                why: e.to_string(),
            })?;
    }
    let mut control = swarm.behaviour().new_control();
    let incoming = control
        .accept(StreamProtocol::new(wire::PROTOCOL))
        .map_err(|e| NetError::Transport(e.to_string()))?;
    tokio::spawn(serve(
        swarm,
        control,
        incoming,
        shared,
        listening,
        commands.clone(),
        rx,
    ));
    Ok(commands)
}

async fn serve(
    mut swarm: NodeSwarm,
    control: libp2p_stream::Control,
    mut incoming: libp2p_stream::IncomingStreams,
    shared: Arc<Shared>,
    listening: Arc<RwLock<Vec<String>>>,
    commands: mpsc::UnboundedSender<Command>,
    mut rx: mpsc::UnboundedReceiver<Command>,
) {
    let peers: Vec<Arc<PeerLink>> = shared
        .peers
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .cloned()
        .collect();
    for peer in peers {
        start_dialer(&shared, peer, &commands, &control);
    }
    let mut dials: HashMap<ConnectionId, oneshot::Sender<Result<(), String>>> = HashMap::new();
    loop {
        tokio::select! {
            event = swarm.select_next_some() => match event {
                SwarmEvent::NewListenAddr { address, .. } => {
                    tracing::info!("node {} listens on {address}", shared.name);
                    listening.write().unwrap_or_else(|p| p.into_inner()).push(address.to_string());
                }
                SwarmEvent::ConnectionEstablished { peer_id, connection_id, num_established, .. } => {
                    match shared.peer_by_id(&peer_id) {
                        Some(peer) if num_established.get() > MAX_CONNECTIONS_PER_PEER => {
                            tracing::warn!("closed a connection from {}: it has {MAX_CONNECTIONS_PER_PEER} already", peer.name);
                            let _ = swarm.close_connection(connection_id);
                        }
                        Some(peer) => peer.connected.notify_one(),
                        None => {
                            tracing::warn!("refused a connection from {peer_id}: not on the allow-list");
                            let _ = swarm.disconnect_peer_id(peer_id);
                        }
                    }
                    if let Some(reply) = dials.remove(&connection_id) {
                        let _ = reply.send(Ok(()));
                    }
                }
                SwarmEvent::OutgoingConnectionError { connection_id, error, .. } => {
                    if let Some(reply) = dials.remove(&connection_id) {
                        let _ = reply.send(Err(error.to_string()));
                    }
                }
                _ => {}
            },
            Some(command) = rx.recv() => match command {
                Command::Dial { peer, addresses, reply } => {
                    if swarm.is_connected(&peer) {
                        let _ = reply.send(Ok(()));
                        continue;
                    }
                    let opts = DialOpts::peer_id(peer)
                        .addresses(addresses)
                        .condition(PeerCondition::Always)
                        .build();
                    let id = opts.connection_id();
                    match swarm.dial(opts) {
                        Ok(()) => { dials.insert(id, reply); }
                        Err(e) => { let _ = reply.send(Err(e.to_string())); }
                    }
                }
                Command::Disconnect(peer) => {
                    // Only if no new link came up meanwhile: the peer may
                    // have reconnected while the old one was torn down.
                    if shared.peer_by_id(&peer).is_none_or(|p| p.is_down()) {
                        let _ = swarm.disconnect_peer_id(peer);
                    }
                }
                Command::Peers(new) => {
                    for gone in reload(&shared, new) {
                        let _ = swarm.disconnect_peer_id(gone);
                    }
                    let fresh: Vec<Arc<PeerLink>> = shared
                        .peers
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .values()
                        .filter(|p| p.fresh.swap(false, Ordering::AcqRel))
                        .cloned()
                        .collect();
                    for peer in fresh {
                        start_dialer(&shared, peer, &commands, &control);
                    }
                }
            },
            Some((from, stream)) = incoming.next() => {
                accept(&shared, &commands, from, stream);
            }
        }
    }
}

/// Takes a new allow-list: peers removed or changed lose their record
/// (their links end; removed or re-keyed ones, the rights this node gave
/// them); returns their ids. New records are marked fresh.
fn reload(shared: &Shared, new: Vec<Peer>) -> Vec<PeerId> {
    let mut peers = shared.peers.write().unwrap_or_else(|p| p.into_inner());
    let mut gone = vec![];
    peers.retain(|name, link| {
        let keep = new
            .iter()
            .any(|p| p.name == *name && p.id == link.id && p.addresses == link.addresses);
        if !keep {
            link.gone.store(true, Ordering::Release);
            link.removed.notify_one();
            gone.push(link.id);
            // Rights given to its processes were given to that key: a name
            // that leaves, or comes back with another key, keeps none.
            if !new.iter().any(|p| p.name == *name && p.id == link.id) {
                shared.bus.forget_node(name);
            }
        }
        keep
    });
    for p in new {
        if !peers.contains_key(&p.name) {
            let link = PeerLink::new(p);
            link.fresh.store(true, Ordering::Release);
            peers.insert(link.name.clone(), Arc::new(link));
        }
    }
    gone
}

/// A stream a peer opened: served if the peer is allow-listed, is the one
/// that dials, and has no link yet.
fn accept(
    shared: &Arc<Shared>,
    commands: &mpsc::UnboundedSender<Command>,
    from: PeerId,
    stream: libp2p::Stream,
) {
    let Some(peer) = shared.peer_by_id(&from) else {
        tracing::warn!("refused a stream from {from}: not on the allow-list");
        return;
    };
    if shared.dials(&from) {
        tracing::warn!(
            "refused a stream from {}: this node dials it, not the other way",
            peer.name
        );
        return;
    }
    if !peer.claim() {
        tracing::warn!(
            "refused a second stream from {}: it has a link already",
            peer.name
        );
        return;
    }
    let shared = shared.clone();
    let commands = commands.clone();
    tokio::spawn(async move {
        link::run(&shared, &peer, stream).await;
        let _ = commands.send(Command::Disconnect(peer.id));
    });
}

fn start_dialer(
    shared: &Arc<Shared>,
    peer: Arc<PeerLink>,
    commands: &mpsc::UnboundedSender<Command>,
    control: &libp2p_stream::Control,
) {
    if shared.dials(&peer.id) {
        tokio::spawn(dialer(
            shared.clone(),
            peer,
            commands.clone(),
            control.clone(),
        ));
    } else if !peer.addresses.is_empty() {
        tokio::spawn(connector(peer, commands.clone()));
    }
}

/// Asks the swarm for a connection to `peer` (at once when it has one).
async fn connect(peer: &PeerLink, commands: &mpsc::UnboundedSender<Command>) -> Result<(), String> {
    let (reply, answer) = oneshot::channel();
    commands
        .send(Command::Dial {
            peer: peer.id,
            addresses: peer.addresses.clone(),
            reply,
        })
        .map_err(|_| "the network stopped".to_string())?;
    answer
        .await
        .map_err(|_| "the network stopped".to_string())?
}

/// Waits `backoff`, or less if a connection to the peer comes up.
async fn pause(peer: &PeerLink, backoff: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(backoff) => {}
        _ = peer.connected.notified() => {}
    }
}

/// For a peer that opens the stream itself: while its link is down, keeps
/// a connection to it so it can.
async fn connector(peer: Arc<PeerLink>, commands: mpsc::UnboundedSender<Command>) {
    let mut backoff = MIN_BACKOFF;
    while !peer.gone.load(Ordering::Acquire) {
        if peer.is_down() {
            match tokio::time::timeout(DIAL_WITHIN, connect(&peer, &commands)).await {
                Ok(Ok(())) => backoff = MIN_BACKOFF,
                Ok(Err(why)) => {
                    tracing::debug!("could not reach {}: {why}", peer.name);
                    peer.unreachable(format!("unreachable: {why}"));
                }
                Err(_) => {
                    peer.unreachable(format!("unreachable: no answer within {DIAL_WITHIN:?}"))
                }
            }
        } else {
            backoff = MIN_BACKOFF;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Keeps a link to `peer` up: dials, opens the stream, serves it, and
/// after it ends (or a dial fails) tries again after a backoff — or at
/// once when the peer connects to this node.
async fn dialer(
    shared: Arc<Shared>,
    peer: Arc<PeerLink>,
    commands: mpsc::UnboundedSender<Command>,
    mut control: libp2p_stream::Control,
) {
    let mut backoff = MIN_BACKOFF;
    while !peer.gone.load(Ordering::Acquire) {
        if peer.claim() {
            let mut reached = false;
            let opened = tokio::time::timeout(DIAL_WITHIN, async {
                connect(&peer, &commands).await?;
                reached = true;
                control
                    .open_stream(peer.id, StreamProtocol::new(wire::PROTOCOL))
                    .await
                    .map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {DIAL_WITHIN:?}")));
            match opened {
                Ok(stream) => {
                    let linked = link::run(&shared, &peer, stream).await;
                    tracing::debug!("link to {} ended: {linked}", peer.name);
                    backoff = MIN_BACKOFF;
                }
                Err(why) => {
                    tracing::debug!("could not reach {}: {why}", peer.name);
                    peer.unclaim(format!("unreachable: {why}"));
                }
            }
            // A connection that carried no link, or a link that ended, is
            // dropped; a dial that failed left none (and the peer may have
            // connected meanwhile).
            if reached {
                let _ = commands.send(Command::Disconnect(peer.id));
            }
        }
        pause(&peer, backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
