//! Two real daemons on loopback, each in its own home, linked as peers:
//! requests from the CLI and from wasm processes cross nodes with the
//! local rules, and a peer that dies or freezes is `offline` in time.

mod common;
use common::net::*;
use common::*;
use std::time::{Duration, Instant};

fn link_of(node: &Node, peer: &str) -> String {
    peer_row(node, peer)["link"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn wait_linked(a: &Node, b: &Node) {
    until("the link to come up", || {
        (link_of(a, "bob") == "up" && link_of(b, "alice") == "up").then_some(())
    });
}

/// alice and bob, each trusting the other, linked.
fn pair() -> (Node, Node) {
    let (alice, bob) = (Node::new(), Node::new());
    let (akey, aaddr) = on_network(&alice, "alice");
    let (bkey, baddr) = on_network(&bob, "bob");
    alice.ok(&["node", "peer", "add", "bob", &bkey, &baddr]);
    bob.ok(&["node", "peer", "add", "alice", &akey, &aaddr]);
    wait_linked(&alice, &bob);
    (alice, bob)
}

fn start_echo(node: &Node, name: &str, flags: &[&str]) {
    let path = spindle_guests::path("echo");
    let mut args = vec![
        "start",
        path.to_str().unwrap(),
        "--name",
        name,
        "--package",
        "demo:spindle",
    ];
    args.extend_from_slice(flags);
    node.ok(&args);
}

fn stop_daemon(node: &Node) {
    let _ = node.run(&["daemon", "stop"]);
}

#[test]
fn requests_cross_nodes_with_the_local_rules() {
    let (alice, bob) = pair();
    start_echo(&bob, "echo", &["--public", "--network"]);
    start_echo(&bob, "shut", &["--public"]);
    start_echo(&alice, "client", &["--network"]);
    start_echo(&alice, "nonet", &[]);

    // The operator's request, answered across the link.
    assert_eq!(
        alice.ok(&["send", "bob@echo:demo:spindle", "hi"]).trim(),
        "hi"
    );
    // wasm to wasm: a process with the network right gets every answer; a
    // process without it is refused every time.
    assert_eq!(
        alice
            .ok(&[
                "send",
                "local@client:demo:spindle",
                "bench bob@echo:demo:spindle 200"
            ])
            .trim(),
        "ok 200"
    );
    assert_eq!(
        alice
            .ok(&[
                "send",
                "local@nonet:demo:spindle",
                "bench bob@echo:demo:spindle 5"
            ])
            .trim(),
        "ok 0"
    );
    // A target without the network right cannot be reached from another
    // node, even though it is public here.
    let refused = alice.fails(&["send", "bob@shut:demo:spindle", "hi"]);
    assert!(refused.contains("no capability"), "{refused}");
    assert_eq!(
        bob.ok(&["send", "local@shut:demo:spindle", "hi"]).trim(),
        "hi"
    );
    // The node's own modules are never reachable from a peer.
    let module = alice.fails(&["send", "bob@kv:sys:spindle", "{}"]);
    assert!(module.contains("no capability"), "{module}");
    // An unknown node, or a process the peer does not have: offline.
    let t = Instant::now();
    let unknown = alice.fails(&["send", "carol@echo:demo:spindle", "hi"]);
    assert!(unknown.contains("offline"), "{unknown}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let absent = alice.fails(&["send", "bob@nobody:demo:spindle", "hi"]);
    assert!(absent.contains("offline"), "{absent}");
    // Delivered, but not answered in time: `timeout`, not `offline`; the
    // answer that comes later is dropped as late, and the next is on time.
    let slow = alice.fails(&[
        "send",
        "--timeout",
        "200ms",
        "bob@echo:demo:spindle",
        "sleep 600",
    ]);
    assert!(
        slow.contains("no response from bob@echo:demo:spindle within 200ms"),
        "{slow}"
    );
    assert_eq!(
        alice.ok(&["send", "bob@echo:demo:spindle", "after"]).trim(),
        "after"
    );

    // `inherit` across nodes: bob's echo hands alice's request on — to
    // another process on bob, or back to one on alice — and the answer
    // goes straight to the requester.
    start_echo(&bob, "backend", &["--public", "--network"]);
    start_echo(&alice, "worker", &["--public", "--network"]);
    assert_eq!(
        alice
            .ok(&[
                "send",
                "bob@echo:demo:spindle",
                "fwd local@backend:demo:spindle over there"
            ])
            .trim(),
        "over there"
    );
    assert_eq!(
        alice
            .ok(&[
                "send",
                "local@client:demo:spindle",
                "call bob@echo:demo:spindle 5000 fwd alice@worker:demo:spindle back here"
            ])
            .trim(),
        "ok back here"
    );
    // The request handed back is no longer awaited through the link: the
    // peer cannot hand it back twice, and a link that goes down later
    // fails nothing that was answered.
    assert_eq!(in_flight(&alice), 0);

    // One-way messages from one process to another: every one that was
    // accepted arrives, once.
    let out = alice.ok(&[
        "send",
        "--timeout",
        "60s",
        "local@client:demo:spindle",
        "flood bob@echo:demo:spindle 3000",
    ]);
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(words.len(), 4, "{out}");
    assert_eq!(words[1], words[3], "sent and counted differ: {out}");
    assert!(words[1].parse::<u64>().unwrap() > 0, "{out}");

    stop_daemon(&alice);
    stop_daemon(&bob);
}

#[test]
fn node_commands_explain_bad_input() {
    let node = Node::new();
    let err = node.fails(&["node", "peer", "add", "bob", "12D3KooWbad", "127.0.0.1:1"]);
    assert!(err.contains("spindle node init"), "{err}");
    node.ok(&["node", "init", "--name", "alice"]);
    let again = node.fails(&["node", "init", "--name", "alice"]);
    assert!(again.contains("already"), "{again}");
    let key = node.fails(&["node", "peer", "add", "bob", "not-a-key", "127.0.0.1:1"]);
    assert!(key.contains("not a node key"), "{key}");
    let name = node.fails(&["node", "init", "--name", "local"]);
    assert!(name.contains("local"), "{name}");
    let addr = Node::new().fails(&["node", "init", "--name", "x", "--listen", "nowhere"]);
    assert!(addr.contains("IP:PORT"), "{addr}");
    // A node never initialised is `local` only, and says how to change it.
    let lone = Node::new();
    assert!(lone.ok(&["node", "peers"]).contains("node init"));
    stop_daemon(&lone);
    stop_daemon(&node);
}

/// bob's daemon, stopped by SIGSTOP, is let go again however the test ends.
struct Frozen(i32);

impl Frozen {
    fn freeze(pid: i32) -> Frozen {
        // SAFETY: signalling a daemon this test started.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// A request bob's `slow` holds for a long time, sent from alice's CLI.
fn held_request(alice: &Node) -> std::process::Child {
    alice.spawn(&[
        "send",
        "--timeout",
        "60s",
        "bob@slow:demo:spindle",
        "sleep 30000",
    ])
}

/// alice's link to bob carries the request and awaits its answer.
fn wait_in_flight(alice: &Node) {
    until("the request to be in flight", || {
        (in_flight(alice) == 1).then_some(())
    });
}

#[test]
fn a_dead_or_frozen_peer_is_offline_in_time_and_comes_back() {
    let (alice, bob) = pair();
    start_echo(&bob, "echo", &["--public", "--network"]);
    start_echo(&bob, "slow", &["--public", "--network"]);
    until("bob's echo to answer", || {
        answers(&alice, "bob@echo:demo:spindle").then_some(())
    });

    // kill -9 with a request in flight: it fails `offline` at once, not
    // `timeout` a minute later.
    let held = held_request(&alice);
    wait_in_flight(&alice);
    let killed = Instant::now();
    // SAFETY: signalling a daemon this test started.
    unsafe { libc::kill(bob.daemon_pid(), libc::SIGKILL) };
    let (at, out) = finished(held);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("offline"), "{err}");
    let took = at.duration_since(killed);
    assert!(took < Duration::from_secs(2), "offline after {took:?}");
    // While bob is down, sends fail `offline` at once.
    let t = Instant::now();
    let down = alice.fails(&["send", "bob@echo:demo:spindle", "hi"]);
    assert!(down.contains("offline"), "{down}");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());

    // bob comes back, listening on a new port (`127.0.0.1:0`) that alice's
    // allow-list does not know: the link comes up by itself all the same,
    // through the connection bob makes, and traffic resumes.
    bob.ok(&["ls"]);
    until("traffic to resume after the restart", || {
        answers(&alice, "bob@echo:demo:spindle").then_some(())
    });

    // A frozen peer: detected by heartbeats, the request in flight fails
    // `offline` within the bound.
    let held = held_request(&alice);
    wait_in_flight(&alice);
    let frozen_at = Instant::now();
    let frozen = Frozen::freeze(bob.daemon_pid());
    let (at, out) = finished(held);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("offline"), "{err}");
    let took = at.duration_since(frozen_at);
    assert!(took < Duration::from_secs(3), "offline after {took:?}");
    let t = Instant::now();
    let down = alice.fails(&["send", "bob@echo:demo:spindle", "hi"]);
    assert!(down.contains("offline"), "{down}");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    drop(frozen);
    until("traffic to resume after the thaw", || {
        answers(&alice, "bob@echo:demo:spindle").then_some(())
    });

    stop_daemon(&alice);
    stop_daemon(&bob);
}

/// Byte sum of the blob `blobto` sends.
fn pattern_sum(n: u64) -> u64 {
    (0..n).map(|i| i % 251).sum()
}

#[test]
fn blobs_small_and_large_cross_nodes_whole_both_ways() {
    let (alice, bob) = pair();
    let big = ["--public", "--network", "--max-memory", "256MiB"];
    start_echo(&bob, "echo", &big);
    start_echo(&alice, "sender", &big);

    // Small and large blobs arrive whole; `reflect` sends the blob back
    // (inherited), so it crosses the link both ways.
    for n in [0u64, 1000, 70_000, 1 << 20] {
        let out = alice.ok(&[
            "send",
            "--timeout",
            "30s",
            "local@sender:demo:spindle",
            &format!("blobto bob@echo:demo:spindle {n} blob"),
        ]);
        assert_eq!(
            out.trim(),
            format!("ok {n} {} -|0 0", pattern_sum(n)),
            "{n}"
        );
        let back = alice.ok(&[
            "send",
            "--timeout",
            "30s",
            "local@sender:demo:spindle",
            &format!("blobto bob@echo:demo:spindle {n} reflect"),
        ]);
        assert_eq!(
            back.trim(),
            format!("ok reflected|{n} {}", pattern_sum(n)),
            "{n}"
        );
    }

    // A blob near the limit, in a couple of hundred chunks.
    let n: u64 = 48 << 20;
    let out = alice.ok(&[
        "send",
        "--timeout",
        "60s",
        "local@sender:demo:spindle",
        &format!("blobto bob@echo:demo:spindle {n} blob"),
    ]);
    assert_eq!(out.trim(), format!("ok {n} {} -|0 0", pattern_sum(n)));

    stop_daemon(&alice);
    stop_daemon(&bob);
}

/// The walk-through in examples/network/README.md, step by step.
#[test]
fn the_network_example_walks_through() {
    let (alice, bob) = pair();
    let peer = spindle_guests::path("peer");
    for node in [&alice, &bob] {
        node.ok(&[
            "start",
            peer.to_str().unwrap(),
            "--name",
            "peer",
            "--package",
            "demo:spindle",
            "--public",
            "--network",
        ]);
    }
    let out = alice.ok(&["send", "bob@peer:demo:spindle", "hi from the operator"]);
    assert!(
        out.starts_with("heard \"hi from the operator\" from alice@cli-"),
        "{out}"
    );
    for (from, to) in [(&alice, "bob"), (&bob, "alice")] {
        let out = from.ok(&[
            "send",
            "local@peer:demo:spindle",
            &format!("ping {to}@peer:demo:spindle"),
        ]);
        let here = if to == "bob" { "alice" } else { "bob" };
        assert!(
            out.starts_with(&format!(
                "{to}@peer:demo:spindle answered: heard \"hello\" from {here}@peer:demo:spindle ("
            )),
            "{out}"
        );
    }
    let out = alice.ok(&[
        "send",
        "--timeout",
        "30s",
        "local@peer:demo:spindle",
        "blob bob@peer:demo:spindle 8000000",
    ]);
    assert!(
        out.starts_with(
            "sent 8000000 bytes to bob@peer:demo:spindle: \"got 8000000 bytes\"; 8000000 bytes came back;"
        ),
        "{out}"
    );
    bob.ok(&["daemon", "stop"]);
    let out = alice.ok(&[
        "send",
        "local@peer:demo:spindle",
        "ping bob@peer:demo:spindle",
    ]);
    assert_eq!(out.trim(), "bob@peer:demo:spindle did not answer: offline");
    bob.ok(&["ls"]);
    until("the link to come back", || {
        let out = alice.ok(&[
            "send",
            "local@peer:demo:spindle",
            "ping bob@peer:demo:spindle",
        ]);
        out.contains(" answered: ").then_some(())
    });
    stop_daemon(&alice);
    stop_daemon(&bob);
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn json(node: &Node, to: &str, body: &str) -> serde_json::Value {
    let out = node.ok(&["send", to, body]);
    serde_json::from_str(out.trim()).unwrap_or_else(|_| panic!("{out}"))
}

#[test]
fn native_processes_and_the_node_and_python_clients_cross_nodes() {
    let (alice, bob) = pair();
    start_echo(&bob, "echo", &["--public", "--network"]);
    start_echo(&alice, "echo", &["--public", "--network"]);
    let net = ["--public", "--network"];
    let native = spindle_guests::native("native-echo");
    alice.on_bus("necho", &net, &[native.to_str().unwrap()], "");
    alice.on_bus(
        "nc",
        &net,
        &["node", &fixture("ipc-client.js")],
        "client: up",
    );
    alice.on_bus(
        "pc",
        &net,
        &["python3", &fixture("ipc-client.py")],
        "python: up",
    );
    let aio = fixture("ipc-client-async.py");
    alice.on_bus("ac", &net, &["python3", &aio], "asyncio: up");
    let py = fixture("ipc-client.py");
    alice.on_bus("pn", &["--public"], &["python3", &py], "python: up");

    // A native Rust process: a request, and a blob that goes there and back.
    let necho = "local@necho:t:spindle";
    assert_eq!(
        alice
            .ok(&["send", necho, "call bob@echo:demo:spindle 5000 hi"])
            .trim(),
        "ok hi"
    );
    let trip = alice.ok(&[
        "send",
        "--timeout",
        "30s",
        necho,
        "blobtrip bob@echo:demo:spindle 1000000",
    ]);
    assert!(trip.starts_with("ok 1000000 in "), "{trip}");
    // The Node and Python clients (blocking and asyncio) ask bob's echo.
    for (svc, said) in [
        ("local@nc:t:spindle", "via client"),
        ("local@pc:t:spindle", "from python"),
        ("local@ac:t:spindle", "from asyncio"),
    ] {
        let got = json(&alice, svc, r#"{"ask":"bob@echo:demo:spindle"}"#);
        assert_eq!(
            got,
            serde_json::json!({"got": said, "from": "bob@echo:demo:spindle"}),
            "{svc}"
        );
    }
    // Failures keep their kinds: an absent process is offline; a process
    // without the network right may not reach another node.
    let got = json(
        &alice,
        "local@pc:t:spindle",
        r#"{"ask":"bob@ghost:demo:spindle"}"#,
    );
    assert_eq!(got, serde_json::json!({"kind": "offline"}));
    let got = json(
        &alice,
        "local@pn:t:spindle",
        r#"{"ask":"bob@echo:demo:spindle"}"#,
    );
    assert_eq!(got, serde_json::json!({"kind": "no-capability"}));
    // The other way: bob's CLI and bob's wasm echo reach alice's Python
    // service; one without the right is refused.
    assert_eq!(
        json(&bob, "alice@pc:t:spindle", r#"{"x":1}"#),
        serde_json::json!({"py": {"x": 1}})
    );
    assert_eq!(
        bob.ok(&[
            "send",
            "local@echo:demo:spindle",
            r#"call alice@pc:t:spindle 5000 "hey""#
        ])
        .trim(),
        r#"ok {"py":"hey"}"#
    );
    let refused = bob.fails(&["send", "alice@pn:t:spindle", "{}"]);
    assert!(refused.contains("no capability"), "{refused}");
    stop_daemon(&alice);
    stop_daemon(&bob);
}

#[test]
fn three_nodes_each_link_on_its_own() {
    let nodes = [Node::new(), Node::new(), Node::new()];
    let names = ["alice", "bob", "carol"];
    let ids: Vec<(String, String)> = nodes
        .iter()
        .zip(names)
        .map(|(n, name)| on_network(n, name))
        .collect();
    for (i, n) in nodes.iter().enumerate() {
        for (j, (key, addr)) in ids.iter().enumerate() {
            if i != j {
                n.ok(&["node", "peer", "add", names[j], key, addr]);
            }
        }
        start_echo(n, "echo", &["--public", "--network"]);
    }
    // Every node reaches every other; a wasm process on alice talks to two
    // nodes in turn.
    for (i, n) in nodes.iter().enumerate() {
        for (j, to) in names.iter().enumerate() {
            if i != j {
                until("the link", || {
                    n.run(&[
                        "send",
                        "--timeout",
                        "1s",
                        &format!("{to}@echo:demo:spindle"),
                        "hi",
                    ])
                    .status
                    .success()
                    .then_some(())
                });
            }
        }
    }
    for to in ["bob", "carol"] {
        let out = nodes[0].ok(&[
            "send",
            "local@echo:demo:spindle",
            &format!("bench {to}@echo:demo:spindle 100"),
        ]);
        assert_eq!(out.trim(), "ok 100", "{to}");
    }
    // carol goes: alice's and bob's link to each other does not notice.
    // SAFETY: signalling a daemon this test started.
    unsafe { libc::kill(nodes[2].daemon_pid(), libc::SIGKILL) };
    until("carol to be offline", || {
        let out = nodes[0].run(&["send", "carol@echo:demo:spindle", "hi"]);
        String::from_utf8_lossy(&out.stderr)
            .contains("offline")
            .then_some(())
    });
    let out = nodes[0].ok(&[
        "send",
        "local@echo:demo:spindle",
        "bench bob@echo:demo:spindle 100",
    ]);
    assert_eq!(out.trim(), "ok 100");
    for n in &nodes[..2] {
        stop_daemon(n);
    }
}

#[test]
fn a_right_given_across_nodes_is_checked_by_the_node_that_gave_it() {
    let (alice, bob) = pair();
    let native = spindle_guests::native("native-echo");
    // A private process on alice, reachable only by those it gives the right.
    alice.on_bus("necho", &["--network"], &[native.to_str().unwrap()], "");
    let py = fixture("ipc-client.py");
    let net = ["--public", "--network"];
    bob.on_bus("pc", &net, &["python3", &py], "python: up");
    bob.on_bus("pn", &net, &["python3", &py], "python: up");
    let ask = r#"{"ask":"alice@necho:t:spindle"}"#;
    let refused = serde_json::json!({"kind": "no-capability"});
    assert_eq!(json(&bob, "local@pc:t:spindle", ask), refused);

    // necho gives bob's pc the right to message it; pc keeps it.
    let out = alice.ok(&[
        "send",
        "local@necho:t:spindle",
        "grant local@necho:t:spindle bob@pc:t:spindle",
    ]);
    assert!(out.contains("held"), "{out}");
    let caps = json(&bob, "local@pc:t:spindle", r#""caps""#);
    assert!(
        caps.to_string().contains("alice@necho:t:spindle"),
        "pc holds the right: {caps}"
    );
    assert_eq!(
        json(&bob, "local@pc:t:spindle", ask),
        serde_json::json!({"got": "from python", "from": "alice@necho:t:spindle"})
    );
    // Another process on bob was given nothing, and cannot claim it.
    assert_eq!(json(&bob, "local@pn:t:spindle", ask), refused);

    // alice stops trusting bob: the rights alice gave bob's processes go
    // with it, even when bob is trusted again.
    let bob_row = alice.ok(&["node", "peers", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&bob_row).unwrap();
    let (bkey, baddr) = (
        v["peers"][0]["key"].as_str().unwrap().to_string(),
        v["peers"][0]["addresses"][0].as_str().unwrap().to_string(),
    );
    alice.ok(&["node", "peer", "remove", "bob"]);
    alice.ok(&["node", "peer", "add", "bob", &bkey, &baddr]);
    wait_linked(&alice, &bob);
    assert_eq!(json(&bob, "local@pc:t:spindle", ask), refused);
    stop_daemon(&alice);
    stop_daemon(&bob);
}

#[test]
fn a_name_given_another_key_while_the_daemon_was_stopped_inherits_no_rights() {
    let (alice, bob) = pair();
    let native = spindle_guests::native("native-echo");
    alice.on_bus("necho", &["--network"], &[native.to_str().unwrap()], "");
    let py = fixture("ipc-client.py");
    bob.on_bus(
        "pc",
        &["--public", "--network"],
        &["python3", &py],
        "python: up",
    );
    alice.ok(&[
        "send",
        "local@necho:t:spindle",
        "grant local@necho:t:spindle bob@pc:t:spindle",
    ]);
    let ask = r#"{"ask":"alice@necho:t:spindle"}"#;
    assert_eq!(json(&bob, "local@pc:t:spindle", ask)["got"], "from python");

    // With alice's daemon stopped, `bob` is given another node's key.
    let alice_row = peer_row(&bob, "alice");
    let (akey, aaddr) = (
        alice_row["key"].as_str().unwrap().to_string(),
        alice_row["addresses"][0].as_str().unwrap().to_string(),
    );
    stop_daemon(&alice);
    stop_daemon(&bob);
    let other = Node::new();
    let (okey, oaddr) = on_network(&other, "bob");
    alice.ok(&["node", "peer", "remove", "bob"]);
    alice.ok(&["node", "peer", "add", "bob", &okey, &oaddr]);
    other.ok(&["node", "peer", "add", "alice", &akey, &aaddr]);
    alice.ok(&["ls"]);
    other.on_bus(
        "pc",
        &["--public", "--network"],
        &["python3", &py],
        "python: up",
    );
    until("the new bob's link", || {
        (peer_row(&alice, "bob")["link"] == "up").then_some(())
    });
    // Its pc has the same address as the old bob's, and none of its rights.
    assert_eq!(
        json(&other, "local@pc:t:spindle", ask),
        serde_json::json!({"kind": "no-capability"})
    );
    stop_daemon(&alice);
    stop_daemon(&other);
}
