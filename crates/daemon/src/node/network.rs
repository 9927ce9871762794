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

/// The key each peer had, by name, as the journal holds them: rights held
/// by a peer's processes were given to that key.
pub(super) struct PeerKeys(Vec<(String, Vec<u8>)>);

impl PeerKeys {
    pub(super) fn load(rows: &[(String, Vec<u8>)]) -> PeerKeys {
        PeerKeys(rows.to_vec())
    }

    /// Rights given to peers' processes stay with the keys they were
    /// given to: those of a node that left the allow-list (`peers`, name
    /// → key), whose name now has another key, or whose key the journal
    /// never had, are dropped. The journal then holds the keys of `peers`.
    fn settle(&mut self, bus: &Bus, journal: &Journal, peers: &[(String, String)]) {
        let had = |name: &str, key: &str| {
            self.0
                .iter()
                .any(|(n, k)| n == name && k.as_slice() == key.as_bytes())
        };
        bus.retain_nodes(|node| peers.iter().any(|(n, k)| n == node && had(n, k)));
        for (name, _) in &self.0 {
            if !peers.iter().any(|(n, k)| n == name && had(n, k)) {
                journal.delete(PEER_KEY_KIND, name.clone());
            }
        }
        for (name, key) in peers {
            if !had(name, key) {
                journal.put(PEER_KEY_KIND, name.clone(), key.clone().into_bytes());
            }
        }
        self.0 = peers
            .iter()
            .map(|(n, k)| (n.clone(), k.clone().into_bytes()))
            .collect();
    }
}

fn keys_of(id: &Identity) -> Vec<(String, String)> {
    id.peers
        .iter()
        .map(|p| (p.name.clone(), p.id.to_string()))
        .collect()
}

impl Network {
    /// Starts the links of a home that has a name and key, and settles the
    /// rights peers' processes hold against its allow-list.
    pub(super) fn start(
        home: &std::path::Path,
        bus: &Arc<Bus>,
        journal: &Journal,
        keys: &mut PeerKeys,
    ) -> Network {
        let files = Files::in_home(home);
        let started = Identity::load(&files)
            .map_err(spindle_net::NetError::from)
            .and_then(|id| {
                id.map(|id| {
                    keys.settle(bus, journal, &keys_of(&id));
                    Net::start(id, bus.clone())
                })
                .transpose()
            });
        match started {
            Ok(None) => {
                keys.settle(bus, journal, &[]);
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
                    self.peer_keys
                        .settle(self.wasm.bus(), &self.journal, &keys_of(&id));
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
                self.network = Network::start(
                    &self.paths.home,
                    self.wasm.bus(),
                    &self.journal,
                    &mut self.peer_keys,
                );
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
