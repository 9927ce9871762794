//! Two daemons in network namespaces of their own, joined by a veth pair
//! this test makes (and removes): the link between them is cut and healed.
//! A request in flight when the cable goes is `offline` within the
//! heartbeat's bound, sends while it is cut are `offline` at once, and
//! after the heal traffic resumes by itself, nothing delivered twice.

mod common;
use common::net::*;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

/// The namespaces and their veth pair; removed however the test ends.
struct Cable {
    a: String,
    b: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Cable {
    fn new() -> Cable {
        let tag = std::process::id() % 100_000;
        let cable = Cable {
            a: format!("spa{tag}"),
            b: format!("spb{tag}"),
        };
        let (a, b) = (&cable.a, &cable.b);
        ip(&["netns", "add", a]);
        ip(&["netns", "add", b]);
        ip(&[
            "link",
            "add",
            &format!("v{a}"),
            "type",
            "veth",
            "peer",
            "name",
            &format!("v{b}"),
        ]);
        ip(&["link", "set", &format!("v{a}"), "netns", a]);
        ip(&["link", "set", &format!("v{b}"), "netns", b]);
        for (ns, addr) in [(a, "10.213.0.1/30"), (b, "10.213.0.2/30")] {
            ip(&["-n", ns, "addr", "add", addr, "dev", &format!("v{ns}")]);
            ip(&["-n", ns, "link", "set", &format!("v{ns}"), "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        cable
    }

    fn cut(&self) {
        ip(&[
            "-n",
            &self.a,
            "link",
            "set",
            &format!("v{}", self.a),
            "down",
        ]);
    }

    fn heal(&self) {
        ip(&["-n", &self.a, "link", "set", &format!("v{}", self.a), "up"]);
    }
}

impl Drop for Cable {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs the CLI inside namespace `ns`; a daemon it starts lives there.
fn in_ns(ns: &str, node: &Node, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, spindle_bin(), "--home"])
        .arg(node.home())
        .args(args)
        .current_dir(node.dir.path())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("ip netns exec");
    assert!(
        out.status.success(),
        "spindle {args:?} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn key_of(node: &Node) -> String {
    node.ok(&["node", "id"])
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string()
}

#[test]
#[ignore = "needs root: makes network namespaces and a veth pair"]
fn a_cut_cable_is_offline_in_time_and_heals_by_itself() {
    let cable = Cable::new();
    let (alice, bob) = (Node::new(), Node::new());
    in_ns(
        &cable.a,
        &alice,
        &[
            "node",
            "init",
            "--name",
            "alice",
            "--listen",
            "10.213.0.1:7701",
        ],
    );
    in_ns(
        &cable.b,
        &bob,
        &[
            "node",
            "init",
            "--name",
            "bob",
            "--listen",
            "10.213.0.2:7702",
        ],
    );
    in_ns(&cable.a, &alice, &["ls"]);
    in_ns(&cable.b, &bob, &["ls"]);
    alice.ok(&[
        "node",
        "peer",
        "add",
        "bob",
        &key_of(&bob),
        "10.213.0.2:7702",
    ]);
    bob.ok(&[
        "node",
        "peer",
        "add",
        "alice",
        &key_of(&alice),
        "10.213.0.1:7701",
    ]);
    let echo = spindle_guests::path("echo");
    for name in ["echo", "slow"] {
        bob.ok(&[
            "start",
            echo.to_str().unwrap(),
            "--name",
            name,
            "--package",
            "demo:spindle",
            "--public",
            "--network",
        ]);
    }
    alice.ok(&[
        "start",
        echo.to_str().unwrap(),
        "--name",
        "client",
        "--package",
        "demo:spindle",
        "--network",
    ]);
    until("the link across the cable", || {
        answers(&alice, "bob@echo:demo:spindle").then_some(())
    });

    // Cut with a request in flight.
    let held = alice.spawn(&[
        "send",
        "--timeout",
        "60s",
        "bob@slow:demo:spindle",
        "sleep 30000",
    ]);
    until("the request in flight", || {
        (in_flight(&alice) == 1).then_some(())
    });
    let cut_at = Instant::now();
    cable.cut();
    let (at, out) = finished(held);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("offline"), "{err}");
    let took = at.duration_since(cut_at);
    assert!(took < Duration::from_secs(3), "offline after {took:?}");
    let t = Instant::now();
    let down = alice.fails(&["send", "bob@echo:demo:spindle", "hi"]);
    assert!(down.contains("offline"), "{down}");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());

    // Heal: the link comes back by itself, and one-way messages sent after
    // it all arrive, once.
    cable.heal();
    until("traffic to resume after the heal", || {
        answers(&alice, "bob@echo:demo:spindle").then_some(())
    });
    let out = alice.ok(&[
        "send",
        "--timeout",
        "60s",
        "local@client:demo:spindle",
        "flood bob@echo:demo:spindle 2000",
    ]);
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(words.len(), 4, "{out}");
    assert_eq!(words[1], words[3], "sent and counted differ: {out}");

    let _ = alice.run(&["daemon", "stop"]);
    let _ = bob.run(&["daemon", "stop"]);
    drop(cable);
}
