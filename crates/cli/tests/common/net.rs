//! Nodes on a network in the tests: initialised, listening on loopback,
//! and their links as `spindle node peers --json` shows them.

use super::{Node, until};

/// Initialises `node` as `name`, listening on a loopback port of its own
/// choosing, and starts its daemon; returns its key and address.
pub fn on_network(node: &Node, name: &str) -> (String, String) {
    node.ok(&["node", "init", "--name", name, "--listen", "127.0.0.1:0"]);
    node.ok(&["ls"]);
    until("the node to listen", || {
        let id = node.ok(&["node", "id"]);
        let parts: Vec<&str> = id.split_whitespace().collect();
        (parts.len() == 3 && parts[0] == name && parts[2].contains("/tcp/"))
            .then(|| (parts[1].to_string(), parts[2].to_string()))
    })
}

/// `node`'s row for `peer` (null when it has none).
pub fn peer_row(node: &Node, peer: &str) -> serde_json::Value {
    let info: serde_json::Value =
        serde_json::from_str(&node.ok(&["node", "peers", "--json"])).unwrap();
    info["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == peer)
        .cloned()
        .unwrap_or_default()
}

/// Requests `node` awaits answers to through its first link.
pub fn in_flight(node: &Node) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&node.ok(&["node", "peers", "--json"])).unwrap();
    v["peers"][0]["in_flight"]
        .as_u64()
        .unwrap_or_else(|| panic!("no in_flight in {v}"))
}

/// Whether `node` gets an answer from `address` within a second.
pub fn answers(node: &Node, address: &str) -> bool {
    node.run(&["send", "--timeout", "1s", address, "hi"])
        .status
        .success()
}
