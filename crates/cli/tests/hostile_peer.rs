//! A hostile peer: allow-listed (the right key), then the wrong frames —
//! garbage, a huge length, half a frame and silence, blob bytes for no
//! message, another node's name, a flood into a full mailbox. Each costs
//! only its own link: it is closed (and logged with why), while the node
//! and its link to an honest peer carry on.

mod common;
use common::net::*;
use common::*;
use libp2p::futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId, StreamProtocol, noise, tcp, yamux};
use spindle_net::wire::{self, Frame, Header, Hello, Kind};

/// One connection and stream to alice, as mallory.
struct Link {
    stream: libp2p::Stream,
    pump: tokio::task::JoinHandle<()>,
}

async fn open(key: &Keypair, alice: PeerId, at: &Multiaddr) -> Link {
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .unwrap()
        .build();
    let mut control = swarm.behaviour().new_control();
    swarm
        .dial(
            libp2p::swarm::dial_opts::DialOpts::peer_id(alice)
                .addresses(vec![at.clone()])
                .build(),
        )
        .unwrap();
    let pump = tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    let stream = tokio::time::timeout(
        DEADLINE,
        control.open_stream(alice, StreamProtocol::new(wire::PROTOCOL)),
    )
    .await
    .expect("a stream within the deadline")
    .expect("a stream");
    Link { stream, pump }
}

fn hello(name: &str) -> Vec<u8> {
    let mut b = vec![];
    wire::encode_hello(
        &mut b,
        &Hello {
            version: wire::VERSION,
            name: name.into(),
        },
    );
    b
}

/// Reads one frame; `None` once the stream is closed.
async fn next_frame(stream: &mut libp2p::Stream) -> Option<Vec<u8>> {
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix).await.ok()?;
    let mut frame = vec![0; u32::from_le_bytes(prefix) as usize];
    stream.read_exact(&mut frame).await.ok()?;
    Some(frame)
}

/// Sends `bytes` after a good HELLO, then reads until alice closes the
/// stream (within the deadline).
async fn closed_after(link: &mut Link, bytes: &[u8]) {
    link.stream.write_all(&hello("mallory")).await.unwrap();
    link.stream.write_all(bytes).await.unwrap();
    link.stream.flush().await.unwrap();
    tokio::time::timeout(DEADLINE, async {
        while next_frame(&mut link.stream).await.is_some() {}
    })
    .await
    .expect("alice closes the link");
}

fn request(id: u64, to: &str, body: &[u8]) -> Vec<u8> {
    claiming(id, to, body, vec![])
}

/// A request with capabilities attached: claims alice must check.
fn claiming(id: u64, to: &str, body: &[u8], capabilities: Vec<spindle_bus::Capability>) -> Vec<u8> {
    let from: spindle_types::ProcessId = "m:demo:spindle".parse().unwrap();
    let header = Header {
        id,
        source: from.clone(),
        target: to.parse().unwrap(),
        rsvp: Some(from),
        rsvp_here: false,
        kind: Kind::Request {
            inherit: false,
            expects_response_ms: Some(30_000),
        },
        metadata: None,
        body_len: body.len() as u32,
        blob: None,
        capabilities,
    };
    let mut b = vec![];
    wire::encode_message(&mut b, &header, body, None).unwrap();
    b
}

#[test]
fn a_hostile_peer_costs_only_its_own_link() {
    let (alice, bob) = (Node::new(), Node::new());
    let (akey, aaddr) = on_network(&alice, "alice");
    let (bkey, baddr) = on_network(&bob, "bob");
    alice.ok(&["node", "peer", "add", "bob", &bkey, &baddr]);
    bob.ok(&["node", "peer", "add", "alice", &akey, &aaddr]);
    let alice_id: PeerId = akey.parse().unwrap();
    // Mallory's key sorts first, so alice takes the stream mallory opens.
    let mallory = std::iter::repeat_with(Keypair::generate_ed25519)
        .find(|k| k.public().to_peer_id().to_bytes() < alice_id.to_bytes())
        .unwrap();
    let mallory_id = mallory.public().to_peer_id().to_string();
    alice.ok(&["node", "peer", "add", "mallory", &mallory_id]);
    for (node, flags) in [
        (&bob, vec!["--public", "--network"]),
        (&alice, vec!["--public", "--network"]),
    ] {
        let path = spindle_guests::path("echo");
        let mut args = vec![
            "start",
            path.to_str().unwrap(),
            "--name",
            "echo",
            "--package",
            "demo:spindle",
        ];
        args.extend(flags);
        node.ok(&args);
    }
    let mut held = start_sink(&alice);
    let path = spindle_guests::path("echo");
    alice.ok(&[
        "start",
        path.to_str().unwrap(),
        "--name",
        "vault",
        "--package",
        "demo:spindle",
        "--network",
    ]);
    let honest = || {
        assert_eq!(
            alice.ok(&["send", "bob@echo:demo:spindle", "hi"]).trim(),
            "hi",
            "the honest peer's link carries on"
        );
    };
    until("the honest link", || {
        alice
            .run(&["send", "--timeout", "1s", "bob@echo:demo:spindle", "hi"])
            .status
            .success()
            .then_some(())
    });
    let at: Multiaddr = aaddr.parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let mut huge = vec![];
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    let mut orphan = vec![];
    wire::encode_blob(&mut orphan, 7, b"bytes for no message");
    let mut half = vec![];
    half.extend_from_slice(&100u32.to_le_bytes());
    half.extend_from_slice(&[4, 0, 0]);
    let cases: [(&str, Vec<u8>, &str); 4] = [
        (
            "an unknown frame kind",
            vec![1, 0, 0, 0, 99],
            "unknown frame kind 99",
        ),
        ("a 4 GiB length", huge, "over the limit"),
        (
            "blob bytes for no message",
            orphan,
            "blob bytes for no message",
        ),
        ("half a frame, then silence", half, "no heartbeat"),
    ];
    for (what, bytes, why) in cases {
        rt.block_on(async {
            let mut link = open(&mallory, alice_id, &at).await;
            closed_after(&mut link, &bytes).await;
            link.pump.abort();
        });
        until(what, || {
            let row = peer_row(&alice, "mallory");
            (row["link"] == "down").then_some(row)
        });
        let row = peer_row(&alice, "mallory");
        let said = row["why"].as_str().unwrap_or_default();
        assert!(said.contains(why), "{what}: {said}");
        honest();
    }

    // Another node's name with mallory's key: refused at HELLO.
    rt.block_on(async {
        let mut link = open(&mallory, alice_id, &at).await;
        link.stream.write_all(&hello("bob")).await.unwrap();
        link.stream.flush().await.unwrap();
        tokio::time::timeout(DEADLINE, async {
            while next_frame(&mut link.stream).await.is_some() {}
        })
        .await
        .expect("alice refuses the link");
        link.pump.abort();
    });
    let said = peer_row(&alice, "mallory")["why"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(said.contains("it says it is \"bob\""), "{said}");
    honest();

    // A private process: a request is refused, and a claimed right to
    // message it is refused too — alice's record says mallory holds none.
    rt.block_on(async {
        let mut link = open(&mallory, alice_id, &at).await;
        link.stream.write_all(&hello("mallory")).await.unwrap();
        let forged =
            spindle_bus::Capability::messaging(&"alice@vault:demo:spindle".parse().unwrap());
        let mut both = request(1, "vault:demo:spindle", b"hi");
        both.extend(claiming(2, "vault:demo:spindle", b"hi", vec![forged]));
        link.stream.write_all(&both).await.unwrap();
        link.stream.flush().await.unwrap();
        let mut kinds = std::collections::BTreeMap::new();
        tokio::time::timeout(DEADLINE, async {
            while kinds.len() < 2 {
                let Some(frame) = next_frame(&mut link.stream).await else {
                    break;
                };
                if let Ok(Frame::Message { header, .. }) = wire::decode(&frame)
                    && let Kind::Failed(k) = header.kind
                {
                    kinds.insert(header.id, k.name());
                }
            }
        })
        .await
        .expect("both refused within the deadline");
        assert_eq!(kinds.get(&1), Some(&"no-capability"), "{kinds:?}");
        assert_eq!(kinds.get(&2), Some(&"invalid"), "{kinds:?}");
        link.pump.abort();
    });
    honest();

    // A flood into a mailbox that is not read: the link waits for room as
    // a local sender would — once — then refuses the rest `mailbox-full`
    // at once (a wait per message would take 30 s for these 300), and
    // alice's other traffic does not wait.
    rt.block_on(async {
        let mut link = open(&mallory, alice_id, &at).await;
        link.stream.write_all(&hello("mallory")).await.unwrap();
        let mut flood = vec![];
        for id in 1..=1324 {
            flood.extend(request(id, "sink:demo:spindle", b"x"));
        }
        link.stream.write_all(&flood).await.unwrap();
        link.stream.flush().await.unwrap();
        let refused = tokio::time::timeout(DEADLINE, async {
            let mut ids = vec![];
            while ids.len() < 250 {
                let Some(frame) = next_frame(&mut link.stream).await else {
                    break;
                };
                if let Ok(Frame::Message { header, .. }) = wire::decode(&frame)
                    && matches!(header.kind, Kind::Failed(k) if k.name() == "mailbox-full")
                {
                    ids.push(header.id);
                }
            }
            ids
        })
        .await
        .expect("the refusals within the deadline");
        assert!(refused.len() >= 250, "{} refused", refused.len());
        assert!(refused.iter().all(|&id| id > 1000), "{refused:?}");
        honest();
        link.pump.abort();
    });
    honest();
    let _ = held.kill();
    let _ = held.wait();
    let _ = bob.run(&["daemon", "stop"]);
    let _ = alice.run(&["daemon", "stop"]);
}

/// A public, networked echo on alice that holds its first request for a
/// long time, so its mailbox fills.
fn start_sink(alice: &Node) -> std::process::Child {
    let path = spindle_guests::path("echo");
    alice.ok(&[
        "start",
        path.to_str().unwrap(),
        "--name",
        "sink",
        "--package",
        "demo:spindle",
        "--public",
        "--network",
    ]);
    alice.spawn(&[
        "send",
        "--timeout",
        "60s",
        "local@sink:demo:spindle",
        "sleep 20000",
    ])
}
