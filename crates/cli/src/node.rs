//! `spindle node`: this node's name and key, and the peers it trusts.
//!
//! The files (`node.key`, `node.toml`) are written here, whole or not at
//! all; a running daemon is then asked to read them again.

use crate::cli::{NodeCmd, PeerCmd};
use crate::commands::{Failure, connect};
use spindle_client::{Client, ClientError};
use spindle_net::config::{self, Files, NodeConfig, PeerEntry};
use spindle_types::control::NodeInfo;
use std::path::Path;

pub fn run(home: &Path, cmd: NodeCmd) -> Result<(), Failure> {
    let files = Files::in_home(home);
    match cmd {
        NodeCmd::Init { name, listen } => {
            std::fs::create_dir_all(home)?;
            for a in &listen {
                config::parse_address(a)?;
            }
            let key = config::init(&files, &name, listen.clone())?;
            println!("node {name} {key}");
            if listen.is_empty() {
                println!("listening nowhere: peers cannot dial it, it dials them");
            } else {
                println!("listening on {}", listen.join(" "));
            }
            reload_if_running(home)
        }
        NodeCmd::Id => {
            let info = running(home)?;
            let config = NodeConfig::load(&files.config).map_err(|e| match e {
                config::ConfigError::Io { source, .. }
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    Failure::from(config::ConfigError::NotInitialised)
                }
                e => e.into(),
            })?;
            let key = config::load_key(&files.key)?.public().to_peer_id();
            // The daemon knows the real addresses (a port 0 is chosen at
            // listening); without one, the configured ones.
            let listening = info
                .filter(|i| i.name.as_deref() == Some(config.name.as_str()))
                .map(|i| i.listening)
                .unwrap_or(config.listen);
            println!("{} {key} {}", config.name, listening.join(" "));
            Ok(())
        }
        NodeCmd::Peer {
            cmd:
                PeerCmd::Add {
                    name,
                    key,
                    addresses,
                },
        } => {
            let peer = config::add_peer(
                &files,
                PeerEntry {
                    name,
                    key,
                    addresses,
                },
            )?;
            println!("peer {} {} added", peer.name, peer.id);
            reload_if_running(home)
        }
        NodeCmd::Peer {
            cmd: PeerCmd::Remove { name },
        } => {
            if !config::remove_peer(&files, &name)? {
                return Err(format!("no peer named {name}: see `spindle node peers`").into());
            }
            println!("peer {name} removed");
            reload_if_running(home)
        }
        NodeCmd::Peers { json } => {
            let info = connect(home)?.node()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print!("{}", render(&info));
            }
            Ok(())
        }
    }
}

/// The running daemon's view, if a daemon runs.
fn running(home: &Path) -> Result<Option<NodeInfo>, Failure> {
    match Client::connect(home) {
        Ok(mut c) => Ok(Some(c.node()?)),
        Err(ClientError::NotRunning(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn reload_if_running(home: &Path) -> Result<(), Failure> {
    match Client::connect(home) {
        Ok(mut c) => {
            c.node_reload()?;
            println!("the running daemon took the change");
            Ok(())
        }
        Err(ClientError::NotRunning(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn render(info: &NodeInfo) -> String {
    let mut out = String::new();
    match (&info.name, &info.error) {
        (_, Some(e)) => out.push_str(&format!("network not running: {e}\n")),
        (None, None) => {
            out.push_str("this node is `local` only: `spindle node init --name NAME --listen IP:PORT` puts it on a network\n");
            return out;
        }
        (Some(name), None) => out.push_str(&format!(
            "node {name} {} listening on {}\n",
            info.key.as_deref().unwrap_or("?"),
            if info.listening.is_empty() {
                "nothing".to_string()
            } else {
                info.listening.join(" ")
            }
        )),
    }
    if info.peers.is_empty() {
        out.push_str("no peers: `spindle node peer add NAME KEY IP:PORT`\n");
        return out;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let rows: Vec<[String; 7]> = info
        .peers
        .iter()
        .map(|p| {
            let link = match (&*p.link, &p.why, p.up_ms) {
                ("up", _, Some(ms)) => format!("up {}", crate::table::uptime(ms)),
                ("down", Some(why), _) => format!("down: {why}"),
                (l, _, _) => l.to_string(),
            };
            [
                p.name.clone(),
                link,
                p.last_seen_ms
                    .map(|t| format!("{} ago", crate::table::uptime(now.saturating_sub(t))))
                    .unwrap_or_else(|| "never".into()),
                p.rtt_us
                    .map(|us| format!("{:.2}ms", us as f64 / 1000.0))
                    .unwrap_or_else(|| "-".into()),
                p.in_flight.to_string(),
                p.key.clone(),
                p.addresses.join(" "),
            ]
        })
        .collect();
    let header = [
        "peer",
        "link",
        "last seen",
        "rtt",
        "in flight",
        "key",
        "addresses",
    ];
    out.push_str(&crate::table::columns(&header, &rows));
    out
}
