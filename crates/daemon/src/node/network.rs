//! The node on the network: its links started at boot (when `spindle node
//! init` was run in its home), and the `node` / `node_reload` requests.

use super::*;
use spindle_net::{Files, Identity, LinkStatus, Net};
use spindle_types::control::{NodeInfo, PeerRow};

/// Whether this node takes part in a network.
pub(super) enum Network {
    /// Never initialised: `local` only, listening nowhere.
    Off,
    On(Net),
    /// Initialised, but its files or its listener failed: why.
    Failed(String),
}

/// The journal's kind for the key each allow-listed peer had, by name: a
/// right given to a peer's process was given to that key.
pub(super) const PEER_KEY_KIND: &str = "peer-key";

/// Rights given to peers' processes stay with the keys they were given to:
/// a peer `known` (name → key, as the journal last had them) that left
/// the allow-list, or whose name now has another key, loses them. The
/// journal then holds the keys of `peers`.
fn settle_rights(
    bus: &Bus,
    journal: &Journal,
    known: &[(String, Vec<u8>)],
    peers: &[(String, String)],
) {
    for (name, key) in known {
        if !peers
            .iter()
            .any(|(n, k)| n == name && k.as_bytes() == key.as_slice())
        {
            bus.forget_node(name);
            journal.delete(PEER_KEY_KIND, name.clone());
        }
    }
    for (name, key) in peers {
        if !known
            .iter()
            .any(|(n, k)| n == name && k.as_slice() == key.as_bytes())
        {
            journal.put(PEER_KEY_KIND, name.clone(), key.clone().into_bytes());
        }
    }
}

fn keys_of(id: &Identity) -> Vec<(String, String)> {
    id.peers
        .iter()
        .map(|p| (p.name.clone(), p.id.to_string()))
        .collect()
}

impl Network {
    /// Starts the links of a home that has a name and key. `known` are
    /// the peers' keys the journal holds.
    pub(super) fn start(
        home: &std::path::Path,
        bus: &Arc<Bus>,
        journal: &Journal,
        known: &[(String, Vec<u8>)],
    ) -> Network {
        let files = Files::in_home(home);
        let started = Identity::load(&files)
            .map_err(spindle_net::NetError::from)
            .and_then(|id| {
                id.map(|id| {
                    settle_rights(bus, journal, known, &keys_of(&id));
                    Net::start(id, bus.clone())
                })
                .transpose()
            });
        match started {
            Ok(None) => {
                settle_rights(bus, journal, known, &[]);
                bus.retain_nodes(|_| false);
                Network::Off
            }
            Ok(Some(net)) => {
                tracing::info!("node {} ({}) is on the network", net.name(), net.key());
                Network::On(net)
            }
            Err(e) => {
                tracing::error!("the network did not start, the node runs on its own: {e}");
                Network::Failed(e.to_string())
            }
        }
    }
}

impl Node {
    pub(super) fn node_info(&self) -> Reply {
        let info = match &self.network {
            Network::Off => NodeInfo {
                name: None,
                key: None,
                listening: vec![],
                peers: vec![],
                error: None,
            },
            Network::Failed(why) => NodeInfo {
                name: None,
                key: None,
                listening: vec![],
                peers: vec![],
                error: Some(why.clone()),
            },
            Network::On(net) => NodeInfo {
                name: Some(net.name().into()),
                key: Some(net.key()),
                listening: net.listening(),
                peers: net.peers().into_iter().map(row).collect(),
                error: None,
            },
        };
        Reply::One(Response::Node(info))
    }

    /// `node_reload`: the node's files changed.
    pub(super) fn node_reload(&mut self) -> Reply {
        let files = Files::in_home(&self.paths.home);
        match &self.network {
            Network::On(net) => match Identity::load(&files) {
                Ok(Some(id)) if id.name == net.name() => {
                    let known: Vec<(String, Vec<u8>)> = net
                        .peers()
                        .into_iter()
                        .map(|p| (p.name, p.key.into_bytes()))
                        .collect();
                    settle_rights(self.wasm.bus(), &self.journal, &known, &keys_of(&id));
                    net.reload(&id)
                }
                Ok(Some(id)) => {
                    return err(
                        ErrorKind::BadRequest,
                        format!(
                            "node.toml now names this node `{}`, but it runs as `{}`: restart the daemon to take the new name",
                            id.name,
                            net.name()
                        ),
                    );
                }
                Ok(None) => {
                    return err(
                        ErrorKind::BadRequest,
                        "node.toml is gone: restart the daemon to leave the network",
                    );
                }
                Err(e) => return err(ErrorKind::BadRequest, e.to_string()),
            },
            // A bus takes one name for its life: a node that failed after
            // it had one (never here: a failed start sets none) or a
            // fresh one may start now.
            Network::Off | Network::Failed(_) => {
                self.network =
                    Network::start(&self.paths.home, self.wasm.bus(), &self.journal, &[]);
                if let Network::Failed(why) = &self.network {
                    return err(ErrorKind::BadRequest, why.clone());
                }
            }
        }
        self.node_info()
    }
}

fn row(p: spindle_net::PeerStatus) -> PeerRow {
    let (link, why, up_ms) = match p.link {
        LinkStatus::Up { for_ms } => ("up", None, Some(for_ms)),
        LinkStatus::Opening => ("opening", None, None),
        LinkStatus::Down { why } => ("down", why, None),
    };
    PeerRow {
        name: p.name,
        key: p.key,
        addresses: p.addresses,
        link: link.into(),
        why,
        up_ms,
        last_seen_ms: p.last_seen_ms,
        rtt_us: p.rtt_us,
        in_flight: p.in_flight as u64,
    }
}
