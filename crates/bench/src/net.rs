//! Node to node, as processes see it: two real daemons on loopback, each
//! in its own home, linked as peers. The echo guest times nothing itself;
//! each figure is the operator's request to a guest on alice (which then
//! talks to bob) timed from here, over enough work that the one control
//! round trip vanishes. Side by side, in this process: a raw TCP ping-pong
//! and a bare libp2p stream ping-pong — the floors under the link — and the
//! daemon's memory per idle peer link, against in-process peers.

use crate::wasm::median;
use crate::{DEADLINE, Node, Row, sibling};
use libp2p::futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, noise, tcp, yamux};
use spindle_types::manifest::RawProcess;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// Round trips per figure.
const ROUND_TRIPS: u64 = 20_000;
/// One-way messages sent.
const ONE_WAY: u64 = 200_000;
/// The blob: as large as a mailbox takes with its request's small body.
const BLOB: u64 = spindle_types::limits::MAILBOX_BYTES - 1024;
/// Idle peers linked to one daemon for its memory per link.
const IDLE_PEERS: usize = 64;
/// The ping-pongs' message.
const PING: usize = 64;

fn cli(home: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(sibling("spindle"))
        .arg("--home")
        .arg(home)
        .args(args)
        .output()
        .expect("spindle");
    assert!(
        out.status.success(),
        "spindle {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A daemon on the network: its key and listen address.
fn on_network(name: &str) -> (Node, String, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    cli(
        &dir.path().join("home"),
        &["node", "init", "--name", name, "--listen", "127.0.0.1:0"],
    );
    let mut n = Node::in_dir(dir);
    let (key, addr) = wait("the node to listen", || {
        let info = n.client.node().ok()?;
        Some((info.key?, info.listening.first()?.clone()))
    });
    (n, key, addr)
}

fn link_up(n: &mut Node, peer: &str) -> bool {
    n.client
        .node()
        .map(|i| i.peers.iter().any(|p| p.name == peer && p.link == "up"))
        .unwrap_or(false)
}

fn echo(n: &Node, name: &str) -> spindle_types::ProcessSpec {
    n.build(RawProcess {
        name: Some(name.into()),
        wasm: Some(spindle_guests::path("echo").to_string_lossy().into_owned()),
        package: Some("bench:spindle".into()),
        public: Some(true),
        network: Some(true),
        max_memory: Some("256MiB".into()),
        ..Default::default()
    })
}

fn ask(n: &mut Node, to: &str, body: &str) -> (Duration, String) {
    let t = Instant::now();
    let reply = n
        .client
        .send(to, body, spindle_types::limits::MAX_AWAIT)
        .expect("the guest answers");
    (t.elapsed(), reply)
}

const CLIENT: &str = "local@client:bench:spindle";

pub(crate) fn run(rows: &mut Vec<Row>) {
    let (mut alice, akey, aaddr) = on_network("alice");
    let (mut bob, bkey, baddr) = on_network("bob");
    cli(&alice.home, &["node", "peer", "add", "bob", &bkey, &baddr]);
    cli(&bob.home, &["node", "peer", "add", "alice", &akey, &aaddr]);
    wait("the link", || {
        (link_up(&mut alice, "bob") && link_up(&mut bob, "alice")).then_some(())
    });
    alice
        .client
        .start(vec![echo(&alice, "client"), echo(&alice, "near")])
        .expect("start alice's guests");
    bob.client
        .start(vec![echo(&bob, "echo")])
        .expect("start bob's echo");
    wait("bob's echo", || {
        alice
            .client
            .send("bob@echo:bench:spindle", "hi", Duration::from_secs(1))
            .ok()
    });

    let trips = |n: &mut Node, target: &str| {
        let (t, reply) = ask(n, CLIENT, &format!("bench {target} {ROUND_TRIPS}"));
        assert_eq!(reply, format!("ok {ROUND_TRIPS}"), "{target}");
        t / ROUND_TRIPS as u32
    };
    let remote_rtt = trips(&mut alice, "bob@echo:bench:spindle");
    let local_rtt = trips(&mut alice, "local@near:bench:spindle");

    let (flood_t, flood) = ask(
        &mut alice,
        CLIENT,
        &format!("flood bob@echo:bench:spindle {ONE_WAY}"),
    );
    let words: Vec<&str> = flood.split_whitespace().collect();
    let sent: u64 = words.get(1).and_then(|w| w.parse().ok()).unwrap_or(0);
    let counted: u64 = words.get(3).and_then(|w| w.parse().ok()).unwrap_or(0);

    // Timed by the guest from its send to the answer (the blob made
    // before, and never copied into the target).
    let blob = |n: &mut Node, target: &str| {
        let (_, reply) = ask(n, CLIENT, &format!("blobtime {target} {BLOB}"));
        let us: f64 = reply.parse().unwrap_or_else(|_| panic!("{reply}"));
        BLOB as f64 / us
    };
    let remote_blob = blob(&mut alice, "bob@echo:bench:spindle");
    let local_blob = blob(&mut alice, "local@near:bench:spindle");

    // Offline: a peer that refuses connections (allow-listed, nothing
    // listening), and bob frozen with a request in flight.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let port = closed.local_addr().expect("its address").port();
    drop(closed);
    let carol = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id()
        .to_string();
    cli(
        &alice.home,
        &[
            "node",
            "peer",
            "add",
            "carol",
            &carol,
            &format!("127.0.0.1:{port}"),
        ],
    );
    wait("carol's dial to fail", || {
        let info = alice.client.node().ok()?;
        info.peers
            .iter()
            .any(|p| p.name == "carol" && p.why.is_some())
            .then_some(())
    });
    let refused: Vec<Duration> = (0..200)
        .map(|_| {
            let t = Instant::now();
            let r = alice
                .client
                .send("carol@echo:bench:spindle", "hi", Duration::from_secs(5));
            assert!(r.is_err());
            t.elapsed()
        })
        .collect();
    let refused = median(refused);
    let held = {
        let home = alice.home.clone();
        std::thread::spawn(move || {
            let mut c = spindle_client::Client::connect(&home).expect("client");
            let sent = Instant::now();
            let r = c.send(
                "bob@echo:bench:spindle",
                "sleep 20000",
                Duration::from_secs(60),
            );
            (Instant::now(), sent, r.is_err())
        })
    };
    wait("the request in flight", || {
        let info = alice.client.node().ok()?;
        info.peers
            .iter()
            .any(|p| p.name == "bob" && p.in_flight == 1)
            .then_some(())
    });
    let frozen_at = Instant::now();
    // SAFETY: signalling the daemon this benchmark started.
    unsafe { libc::kill(bob.pid, libc::SIGSTOP) };
    let (failed_at, _, failed) = held.join().expect("the held request");
    let frozen = failed_at.duration_since(frozen_at);
    // SAFETY: as above.
    unsafe { libc::kill(bob.pid, libc::SIGCONT) };
    assert!(failed, "the held request should fail offline");
    drop(bob);

    let per_link = idle_links(&mut alice);
    drop(alice);

    let tcp = tcp_rtt();
    let p2p = libp2p_rtt();

    rows.push(Row {
        metric: format!(
            "request→response, wasm ↔ wasm on two nodes (guest loop of {ROUND_TRIPS}) / on one node"
        ),
        target: "≤ 60 µs".into(),
        measured: format!(
            "{:.1} µs / {:.1} µs",
            remote_rtt.as_secs_f64() * 1e6,
            local_rtt.as_secs_f64() * 1e6
        ),
    });
    rows.push(Row {
        metric: format!(
            "  floors in this process: raw TCP / bare libp2p stream ping-pong, {PING} B"
        ),
        target: "–".into(),
        measured: format!(
            "{:.1} µs / {:.1} µs",
            tcp.as_secs_f64() * 1e6,
            p2p.as_secs_f64() * 1e6
        ),
    });
    rows.push(Row {
        metric: format!(
            "one-way messages, one wasm sender → one remote receiver ({sent} of {ONE_WAY} accepted, {counted} counted)"
        ),
        target: "≥ 100k/s".into(),
        measured: format!("{:.0}k/s", counted as f64 / flood_t.as_secs_f64() / 1e3),
    });
    rows.push(Row {
        metric: format!(
            "{} MiB blob, wasm to wasm across nodes / on one node (guest-timed send → answer)",
            BLOB >> 20
        ),
        target: "≥ 500 MB/s".into(),
        measured: format!("{remote_blob:.0} MB/s / {local_blob:.0} MB/s"),
    });
    rows.push(Row {
        metric:
            "offline: peer refuses connections (operator send) / peer frozen, request in flight"
                .into(),
        target: "≤ 5 ms / ≤ 2 s".into(),
        measured: format!(
            "{:.2} ms / {:.2} s",
            refused.as_secs_f64() * 1e3,
            frozen.as_secs_f64()
        ),
    });
    rows.push(Row {
        metric: format!("daemon memory per idle peer link (RSS over {IDLE_PEERS} links)"),
        target: "≤ 64 KiB".into(),
        measured: format!("{:.1} KiB", per_link as f64 / 1024.0),
    });
}

/// `IDLE_PEERS` in-process nodes linked to `n`'s daemon: its RSS growth
/// per link.
fn idle_links(n: &mut Node) -> u64 {
    let own = n.client.node().expect("node").key.expect("a key");
    let listen = n.client.node().expect("node").listening[0].clone();
    let dirs: Vec<tempfile::TempDir> = (0..IDLE_PEERS)
        .map(|_| tempfile::tempdir().expect("temp dir"))
        .collect();
    let mut config = std::fs::read_to_string(n.home.join("node.toml")).expect("node.toml");
    for (i, d) in dirs.iter().enumerate() {
        let files = spindle_net::config::Files::in_home(d.path());
        let name = format!("idle{i}");
        let key = spindle_net::config::init(&files, &name, vec![]).expect("init");
        spindle_net::config::add_peer(
            &files,
            spindle_net::config::PeerEntry {
                name: "alice".into(),
                key: own.clone(),
                addresses: vec![listen.clone()],
            },
        )
        .expect("peer");
        config.push_str(&format!(
            "\n[[peer]]\nname = \"{name}\"\nkey = \"{key}\"\naddresses = []\n"
        ));
    }
    // The peers' networks, on a runtime of their own.
    let homes: Vec<std::path::PathBuf> = dirs.iter().map(|d| d.path().to_owned()).collect();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (up, ready) = std::sync::mpsc::channel();
    let peers = on_thread(move || {
        Box::pin(async move {
            let nets: Vec<spindle_net::Net> = homes
                .iter()
                .enumerate()
                .map(|(i, home)| {
                    let files = spindle_net::config::Files::in_home(home);
                    let identity = spindle_net::config::Identity::load(&files)
                        .expect("identity")
                        .expect("initialised");
                    let bus = std::sync::Arc::new(spindle_bus::Bus::new(format!("idle{i}")));
                    spindle_net::Net::start(identity, bus).expect("a peer")
                })
                .collect();
            let _ = up.send(());
            let _ = stopped.await;
            drop(nets);
        })
    });
    ready.recv_timeout(DEADLINE).expect("the idle peers start");
    std::thread::sleep(Duration::from_millis(500));
    let before = n.rss();
    std::fs::write(n.home.join("node.toml"), config).expect("node.toml");
    n.client.node_reload().expect("reload");
    wait("the idle links", || {
        let info = n.client.node().ok()?;
        (info.peers.iter().filter(|p| p.link == "up").count() == IDLE_PEERS).then_some(())
    });
    // Heartbeats run a few rounds before memory is read.
    std::thread::sleep(Duration::from_secs(2));
    let after = n.rss();
    let _ = stop.send(());
    let _ = peers.join();
    after.saturating_sub(before) / IDLE_PEERS as u64
}

fn tcp_rtt() -> Duration {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_nodelay(true).expect("nodelay");
        let mut buf = [0u8; PING];
        while s.read_exact(&mut buf).is_ok() {
            if s.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let mut c = std::net::TcpStream::connect(addr).expect("connect");
    c.set_nodelay(true).expect("nodelay");
    let mut buf = [7u8; PING];
    let trips: Vec<Duration> = (0..ROUND_TRIPS)
        .map(|_| {
            let t = Instant::now();
            c.write_all(&buf).expect("write");
            c.read_exact(&mut buf).expect("read");
            t.elapsed()
        })
        .collect();
    drop(c);
    let _ = server.join();
    median(trips)
}

const BARE: StreamProtocol = StreamProtocol::new("/spindle-bench/ping/1");

fn swarm() -> Swarm<libp2p_stream::Behaviour> {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("tcp")
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

/// Runs `f` on a thread of its own with a current-thread runtime, as the
/// node's network thread runs.
fn on_thread<T: Send + 'static>(
    f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>> + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f())
    })
}

fn libp2p_rtt() -> Duration {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel::<(PeerId, Multiaddr)>();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let server = on_thread(move || {
        Box::pin(async move {
            let mut s = swarm();
            s.listen_on("/ip4/127.0.0.1/tcp/0".parse().expect("address"))
                .expect("listen");
            let mut incoming = s.behaviour().new_control().accept(BARE).expect("accept");
            let id = *s.local_peer_id();
            let echo = async move {
                while let Some((_, mut stream)) = incoming.next().await {
                    let mut buf = [0u8; PING];
                    while stream.read_exact(&mut buf).await.is_ok() {
                        if stream.write_all(&buf).await.is_err() || stream.flush().await.is_err() {
                            break;
                        }
                    }
                }
            };
            let events = async move {
                loop {
                    if let libp2p::swarm::SwarmEvent::NewListenAddr { address, .. } =
                        s.select_next_some().await
                    {
                        let _ = addr_tx.send((id, address));
                    }
                }
            };
            tokio::select! {
                _ = echo => {}
                _ = events => {}
                _ = done_rx => {}
            }
        })
    });
    let (peer, address) = addr_rx
        .recv_timeout(DEADLINE)
        .expect("the bare server listens");
    let client = on_thread(move || {
        Box::pin(async move {
            let mut s = swarm();
            let mut control = s.behaviour().new_control();
            s.dial(
                libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                    .addresses(vec![address])
                    .build(),
            )
            .expect("dial");
            let pump = async move {
                loop {
                    s.select_next_some().await;
                }
            };
            let measure = async move {
                let mut stream = control.open_stream(peer, BARE).await.expect("a stream");
                let mut buf = [7u8; PING];
                let mut trips = Vec::with_capacity(ROUND_TRIPS as usize);
                for _ in 0..ROUND_TRIPS {
                    let t = Instant::now();
                    stream.write_all(&buf).await.expect("write");
                    stream.flush().await.expect("flush");
                    stream.read_exact(&mut buf).await.expect("read");
                    trips.push(t.elapsed());
                }
                trips
            };
            tokio::select! {
                trips = measure => trips,
                _ = pump => unreachable!("the swarm's events never end"),
            }
        })
    });
    let trips = client.join().expect("the bare client");
    let _ = done_tx.send(());
    let _ = server.join();
    median(trips)
}
