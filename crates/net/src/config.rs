//! A node's identity and its allow-list, as files in its home:
//! `node.key` (the Ed25519 secret, mode 0600) and `node.toml` (its name,
//! where it listens, and the peers it trusts: name ↔ key ↔ addresses).

use libp2p::identity::{Keypair, PeerId, ed25519};
use libp2p::multiaddr::{Multiaddr, Protocol};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Peers one node's allow-list may hold: each is a link with its own
/// queues, heartbeats and reconnects.
pub const MAX_PEERS: usize = 256;
/// Addresses one peer (or the node's own listener) may have.
pub const MAX_ADDRESSES: usize = 8;
/// Largest `node.toml` read: far more than [`MAX_PEERS`] entries need.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// A node's files in its home.
#[derive(Debug, Clone)]
pub struct Files {
    pub key: PathBuf,
    pub config: PathBuf,
}

impl Files {
    pub fn in_home(home: &Path) -> Files {
        Files {
            key: home.join("node.key"),
            config: home.join("node.toml"),
        }
    }

    /// Whether `spindle node init` was run in this home.
    pub fn initialised(&self) -> bool {
        self.config.exists()
    }
}

/// `node.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub name: String,
    #[serde(default)]
    pub listen: Vec<String>,
    #[serde(default, rename = "peer")]
    pub peers: Vec<PeerEntry>,
}

/// One allow-listed peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerEntry {
    pub name: String,
    /// Its public key, as its peer id (`spindle node id` prints it).
    pub key: String,
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// A peer as the node uses it: checked and parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub id: PeerId,
    pub addresses: Vec<Multiaddr>,
}

/// What is wrong with a node's files or a change to them.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error(
        "this node is already `{0}` (node.toml and node.key exist): to start over with a new key, remove both"
    )]
    AlreadyInitialised(String),
    #[error(
        "this node has no name and key yet: run `spindle node init --name NAME --listen IP:PORT`"
    )]
    NotInitialised,
    #[error("{0}")]
    BadEntry(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ConfigError + '_ {
    move |source| ConfigError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Reads an address as `IP:PORT` or as a multiaddr (`/ip4/…/tcp/…`).
pub fn parse_address(text: &str) -> Result<Multiaddr, ConfigError> {
    if let Ok(sock) = text.parse::<SocketAddr>() {
        let ip = match sock.ip() {
            std::net::IpAddr::V4(v4) => Protocol::Ip4(v4),
            std::net::IpAddr::V6(v6) => Protocol::Ip6(v6),
        };
        return Ok(Multiaddr::empty().with(ip).with(Protocol::Tcp(sock.port())));
    }
    let addr: Multiaddr = text.parse().map_err(|_| {
        ConfigError::BadEntry(format!(
            "address {:?} is neither IP:PORT nor a multiaddr: give e.g. 127.0.0.1:7701",
            spindle_types::id::shown(text)
        ))
    })?;
    let tcp = addr.iter().any(|p| matches!(p, Protocol::Tcp(_)));
    let ip = addr
        .iter()
        .any(|p| matches!(p, Protocol::Ip4(_) | Protocol::Ip6(_)));
    if !tcp || !ip {
        return Err(ConfigError::BadEntry(format!(
            "address {addr} is not an IP and TCP port: give e.g. /ip4/127.0.0.1/tcp/7701"
        )));
    }
    Ok(addr)
}

/// Reads a peer's key (its peer id text); it must be an Ed25519 key.
pub fn parse_key(text: &str) -> Result<PeerId, ConfigError> {
    let bad = || {
        ConfigError::BadEntry(format!(
            "key {:?} is not a node key: copy it from `spindle node id` on that node",
            spindle_types::id::shown(text)
        ))
    };
    let id: PeerId = text.parse().map_err(|_| bad())?;
    // An Ed25519 peer id carries its key inline (an identity multihash).
    if id.as_ref().code() != 0 {
        return Err(bad());
    }
    Ok(id)
}

impl PeerEntry {
    pub fn check(&self) -> Result<Peer, ConfigError> {
        spindle_types::id::validate_node_name(&self.name)
            .map_err(|e| ConfigError::BadEntry(format!("peer name: {e}")))?;
        if self.addresses.len() > MAX_ADDRESSES {
            return Err(ConfigError::BadEntry(format!(
                "peer {} has {} addresses, at most {MAX_ADDRESSES}",
                self.name,
                self.addresses.len()
            )));
        }
        Ok(Peer {
            name: self.name.clone(),
            id: parse_key(&self.key)?,
            addresses: self
                .addresses
                .iter()
                .map(|a| parse_address(a))
                .collect::<Result<_, _>>()?,
        })
    }
}

impl NodeConfig {
    /// Checks every entry: names follow the id rules and are unique, keys
    /// are node keys and unique, addresses parse, counts are in bounds.
    pub fn check(&self, own: &PeerId) -> Result<(Vec<Multiaddr>, Vec<Peer>), ConfigError> {
        spindle_types::id::validate_node_name(&self.name)
            .map_err(|e| ConfigError::BadEntry(format!("name: {e}")))?;
        if self.listen.len() > MAX_ADDRESSES {
            return Err(ConfigError::BadEntry(format!(
                "{} listen addresses, at most {MAX_ADDRESSES}",
                self.listen.len()
            )));
        }
        if self.peers.len() > MAX_PEERS {
            return Err(ConfigError::BadEntry(format!(
                "{} peers, at most {MAX_PEERS}",
                self.peers.len()
            )));
        }
        let listen = self
            .listen
            .iter()
            .map(|a| parse_address(a))
            .collect::<Result<_, _>>()?;
        let mut peers: Vec<Peer> = vec![];
        for entry in &self.peers {
            let p = entry.check()?;
            if p.name == self.name || p.id == *own {
                return Err(ConfigError::BadEntry(format!(
                    "peer {} is this node itself",
                    p.name
                )));
            }
            if let Some(twin) = peers.iter().find(|q| q.name == p.name || q.id == p.id) {
                return Err(ConfigError::BadEntry(format!(
                    "peers {} and {} share a name or key: each peer needs its own",
                    twin.name, p.name
                )));
            }
            peers.push(p);
        }
        Ok((listen, peers))
    }

    /// Reads and checks `node.toml`.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let meta = fs::metadata(path).map_err(io(path))?;
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                why: format!("{} bytes, at most {MAX_CONFIG_BYTES}", meta.len()),
            });
        }
        let text = fs::read_to_string(path).map_err(io(path))?;
        toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            path: path.to_owned(),
            why: e.to_string(),
        })
    }

    /// Writes `node.toml` whole or not at all (a temporary file renamed
    /// over it).
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let text = toml::to_string(self).expect("a node config always encodes");
        write_atomic(path, text.as_bytes(), 0o644)
    }
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ConfigError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))?;
    Ok(())
}

/// The node's key: read from `node.key`.
pub fn load_key(path: &Path) -> Result<Keypair, ConfigError> {
    let meta = fs::metadata(path).map_err(io(path))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(ConfigError::Invalid {
            path: path.to_owned(),
            why: "the node's secret key is readable by others: chmod 600 it".into(),
        });
    }
    let mut bytes = fs::read(path).map_err(io(path))?;
    let bad = || ConfigError::Invalid {
        path: path.to_owned(),
        why: "not a node key (64 bytes of Ed25519 keypair)".into(),
    };
    if bytes.len() != 64 {
        return Err(bad());
    }
    let pair = ed25519::Keypair::try_from_bytes(&mut bytes).map_err(|_| bad())?;
    Ok(pair.into())
}

/// `spindle node init`: a new key and a config naming the node. Refused
/// if the home already has either.
pub fn init(files: &Files, name: &str, listen: Vec<String>) -> Result<PeerId, ConfigError> {
    let config = NodeConfig {
        name: name.into(),
        listen,
        peers: vec![],
    };
    let pair = ed25519::Keypair::generate();
    let id = PeerId::from(libp2p::identity::PublicKey::from(pair.public()));
    // Bad input is reported as such even on a node that is already set up.
    config.check(&id)?;
    if let Ok(existing) = NodeConfig::load(&files.config) {
        return Err(ConfigError::AlreadyInitialised(existing.name));
    }
    if files.key.exists() {
        return Err(ConfigError::AlreadyInitialised(name.into()));
    }
    write_atomic(&files.key, &pair.to_bytes(), 0o600)?;
    config.save(&files.config)?;
    Ok(id)
}

/// The node's checked identity and allow-list.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub key: Keypair,
    pub listen: Vec<Multiaddr>,
    pub peers: Vec<Peer>,
}

impl Identity {
    /// Reads both files; `Ok(None)` for a node never initialised.
    pub fn load(files: &Files) -> Result<Option<Identity>, ConfigError> {
        if !files.initialised() {
            return Ok(None);
        }
        let config = NodeConfig::load(&files.config)?;
        let key = load_key(&files.key)?;
        let (listen, peers) =
            config
                .check(&key.public().to_peer_id())
                .map_err(|e| ConfigError::Invalid {
                    path: files.config.clone(),
                    why: e.to_string(),
                })?;
        Ok(Some(Identity {
            name: config.name,
            key,
            listen,
            peers,
        }))
    }

    pub fn peer_id(&self) -> PeerId {
        self.key.public().to_peer_id()
    }
}

/// `spindle node peer add`: adds or replaces the entry named `entry.name`.
pub fn add_peer(files: &Files, entry: PeerEntry) -> Result<Peer, ConfigError> {
    let mut config = NodeConfig::load(&files.config).map_err(|e| match e {
        ConfigError::Io { ref source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            ConfigError::NotInitialised
        }
        e => e,
    })?;
    let own = load_key(&files.key)?.public().to_peer_id();
    let peer = entry.check()?;
    config.peers.retain(|p| p.name != entry.name);
    config.peers.push(entry);
    config.check(&own)?;
    config.save(&files.config)?;
    Ok(peer)
}

/// `spindle node peer remove`: true if there was such a peer.
pub fn remove_peer(files: &Files, name: &str) -> Result<bool, ConfigError> {
    let mut config = NodeConfig::load(&files.config)?;
    let before = config.peers.len();
    config.peers.retain(|p| p.name != name);
    let removed = config.peers.len() != before;
    if removed {
        config.save(&files.config)?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_add_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::in_home(dir.path());
        assert!(Identity::load(&files).unwrap().is_none());
        let id = init(&files, "alice", vec!["127.0.0.1:7701".into()]).unwrap();
        let mode = fs::metadata(&files.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            init(&files, "alice", vec![]),
            Err(ConfigError::AlreadyInitialised(n)) if n == "alice"
        ));
        let other = ed25519::Keypair::generate();
        let other = PeerId::from(libp2p::identity::PublicKey::from(other.public()));
        add_peer(
            &files,
            PeerEntry {
                name: "bob".into(),
                key: other.to_string(),
                addresses: vec!["127.0.0.1:7702".into()],
            },
        )
        .unwrap();
        let me = Identity::load(&files).unwrap().unwrap();
        assert_eq!(me.peer_id(), id);
        assert_eq!(me.name, "alice");
        assert_eq!(me.peers.len(), 1);
        assert_eq!(me.peers[0].id, other);
        assert_eq!(
            me.peers[0].addresses[0].to_string(),
            "/ip4/127.0.0.1/tcp/7702"
        );
        // Its own key, a duplicate or a bad name is refused, and the file
        // stays as it was.
        for (name, key) in [
            ("carol", id.to_string()),
            ("local", other.to_string()),
            ("Bad", other.to_string()),
            ("carol", "not-a-key".into()),
        ] {
            let entry = PeerEntry {
                name: name.into(),
                key,
                addresses: vec![],
            };
            assert!(add_peer(&files, entry).is_err(), "{name}");
        }
        assert_eq!(Identity::load(&files).unwrap().unwrap().peers.len(), 1);
        assert!(remove_peer(&files, "bob").unwrap());
        assert!(Identity::load(&files).unwrap().unwrap().peers.is_empty());
    }

    #[test]
    fn addresses() {
        assert_eq!(
            parse_address("[::1]:9").unwrap().to_string(),
            "/ip6/::1/tcp/9"
        );
        assert!(parse_address("/ip4/1.2.3.4/tcp/5").is_ok());
        assert!(parse_address("/ip4/1.2.3.4/udp/5").is_err());
        assert!(parse_address("example.com:80").is_err());
    }

    #[test]
    fn a_key_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::in_home(dir.path());
        init(&files, "alice", vec![]).unwrap();
        fs::set_permissions(&files.key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Identity::load(&files).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }
}
