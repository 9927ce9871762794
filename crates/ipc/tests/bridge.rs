//! The bridge against a real socket: what a process writes, and what it
//! reads back. Bad input of every kind costs only the process that sent it.

use spindle_bus::{Bus, Envelope, Message};
use spindle_ipc::Bridge;
use spindle_ipc::frame::MAX_FRAME;
use spindle_types::Address;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

const DEADLINE: Duration = Duration::from_secs(10);

fn addr(p: &str) -> Address {
    format!("local@{p}:t:spindle").parse().unwrap()
}

struct Rig {
    bus: Arc<Bus>,
    bridge: Bridge,
    /// The process's end.
    lines: BufReader<tokio::net::unix::OwnedReadHalf>,
    write: tokio::net::unix::OwnedWriteHalf,
}

impl Rig {
    fn new(public: bool) -> Rig {
        let bus = Arc::new(Bus::new("local"));
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let mailbox = bus.register(addr("native"), public).unwrap();
        let bridge = Bridge::start(
            OwnedFd::from(ours),
            addr("native"),
            bus.clone(),
            mailbox,
            None,
        )
        .unwrap();
        theirs.set_nonblocking(true).unwrap();
        let (read, write) = UnixStream::from_std(theirs).unwrap().into_split();
        Rig {
            bus,
            bridge,
            lines: BufReader::new(read),
            write,
        }
    }

    async fn send(&mut self, line: &str) {
        self.write.write_all(line.as_bytes()).await.unwrap();
        self.write.write_all(b"\n").await.unwrap();
    }

    async fn read(&mut self) -> serde_json::Value {
        let mut l = String::new();
        tokio::time::timeout(DEADLINE, self.lines.read_line(&mut l))
            .await
            .expect("a frame in time")
            .unwrap();
        serde_json::from_str(&l).unwrap()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn requests_and_responses_cross_both_ways() {
    let mut rig = Rig::new(true);
    let other = addr("other");
    let mut inbox = rig.bus.register(other.clone(), true).unwrap();

    // The process asks, the other answers.
    rig.send(&format!(
        r#"{{"type":"request","target":"{other}","id":7,"timeout_ms":5000,"body":{{"q":1}},"context":"c7"}}"#
    ))
    .await;
    let env = tokio::time::timeout(DEADLINE, inbox.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*env.source, addr("native"), "the node sets the source");
    let Message::Request(r) = &env.message else {
        panic!("a request")
    };
    assert_eq!(r.body, br#"{"q":1}"#);
    let answer = Envelope {
        id: env.id,
        source: Arc::new(other.clone()),
        target: env.rsvp.clone().unwrap(),
        rsvp: None,
        message: Message::Response(
            spindle_bus::Response {
                inherit: false,
                body: b"plain bytes \xff".to_vec(),
                metadata: None,
                capabilities: vec![],
            },
            None,
        ),
        blob: None,
    };
    rig.bus.send(answer, false).await.unwrap();
    let f = rig.read().await;
    assert_eq!(f["type"], "response");
    assert_eq!(f["id"], 7);
    assert_eq!(f["context"], "c7");
    assert_eq!(f["source"], other.to_string());
    assert_eq!(f["body_base64"], "cGxhaW4gYnl0ZXMg/w==");

    // The other asks, the process answers.
    let id = rig.bus.next_id();
    rig.bus
        .send(
            Envelope::request(
                id,
                Arc::new(other.clone()),
                Arc::new(addr("native")),
                Some(Arc::new(other.clone())),
                br#""ping""#.to_vec(),
                Some(DEADLINE),
            ),
            false,
        )
        .await
        .unwrap();
    let f = rig.read().await;
    assert_eq!(
        (f["type"].as_str(), f["body"].as_str()),
        (Some("request"), Some("ping"))
    );
    assert_eq!(f["expects_response"], true);
    rig.send(&format!(
        r#"{{"type":"response","id":{},"body":"pong"}}"#,
        f["id"]
    ))
    .await;
    let env = tokio::time::timeout(DEADLINE, inbox.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(env.id, id);
    assert!(matches!(env.message, Message::Response(r, _) if r.body == br#""pong""#));
    assert!(rig.bridge.is_connected());

    // No answer in time: a timeout error with the process's own id and context.
    rig.send(&format!(
        r#"{{"type":"request","target":"{other}","id":8,"timeout_ms":50,"context":{{"k":8}}}}"#
    ))
    .await;
    let _ = inbox.recv().await;
    let f = rig.read().await;
    assert_eq!(
        (f["type"].as_str(), f["kind"].as_str(), f["id"].as_u64()),
        (Some("error"), Some("timeout"), Some(8))
    );
    assert_eq!(f["context"]["k"], 8);

    // The node asks it to stop.
    assert!(rig.bridge.ask_stop());
    assert_eq!(rig.read().await["type"], "stopping");
}

#[tokio::test(flavor = "current_thread")]
async fn bad_frames_get_errors_and_the_bridge_goes_on() {
    let mut rig = Rig::new(false);
    let private = addr("private");
    let _p = rig.bus.register(private.clone(), false).unwrap();
    let cases = [
        ("{oops", "not JSON"),
        (r#"{"type":"shout"}"#, "unknown message type"),
        (r#"{"type":"request","body":1}"#, "`target`"),
        (
            r#"{"type":"request","target":"local@x:t:spindle","source":"local@kernel:sys:spindle"}"#,
            "set by the node",
        ),
        (
            r#"{"type":"response","id":99,"body":1}"#,
            "nothing to respond to",
        ),
        (
            r#"{"type":"request","target":"Not An Address","id":1}"#,
            "not an address",
        ),
    ];
    for (line, says) in cases {
        rig.send(line).await;
        let f = rig.read().await;
        assert_eq!(f["type"], "error", "{line}");
        let msg = f["message"].as_str().unwrap();
        assert!(msg.contains(says), "{line}: {msg}");
    }
    // Requests that cannot be delivered say why, at once, not as a timeout.
    for (target, kind) in [
        ("local@ghost:t:spindle", "offline"),
        (private.to_string().as_str(), "no-capability"),
    ] {
        rig.send(&format!(
            r#"{{"type":"request","target":"{target}","id":3,"timeout_ms":60000}}"#
        ))
        .await;
        let f = rig.read().await;
        assert_eq!(
            (f["kind"].as_str(), f["id"].as_u64()),
            (Some(kind), Some(3))
        );
    }
    // Node's own housekeeping is ignored; the bridge still answers after all that.
    rig.send(r#"{"cmd":"NODE_HANDLE_ACK"}"#).await;
    rig.send(r#"{"type":"response","id":5}"#).await;
    assert_eq!(rig.read().await["type"], "error");
    assert!(rig.bridge.is_connected());
}

#[tokio::test(flavor = "current_thread")]
async fn oversized_frames_and_half_frames_close_the_channel() {
    let mut rig = Rig::new(true);
    let big = vec![b'x'; MAX_FRAME + 10];
    // The bridge reads and drops it; writing may fail once it has closed.
    let _ = rig.write.write_all(&big).await;
    let mut rest = String::new();
    let n = tokio::time::timeout(DEADLINE, rig.lines.read_line(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0, "the channel is closed: {rest}");
    assert!(!rig.bridge.is_connected());

    let mut rig = Rig::new(true);
    rig.write.write_all(br#"{"type":"heartb"#).await.unwrap();
    rig.write.shutdown().await.unwrap();
    let end = tokio::time::Instant::now() + DEADLINE;
    while rig.bridge.is_connected() {
        assert!(tokio::time::Instant::now() < end, "never noticed the close");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_flood_is_held_back_by_the_channel_not_by_memory() {
    let mut rig = Rig::new(true);
    let sink = addr("sink");
    let mut mailbox = rig.bus.register(sink.clone(), true).unwrap();
    let frame = format!(
        "{{\"type\":\"request\",\"target\":\"{sink}\",\"body\":\"{}\"}}\n",
        "x".repeat(1000)
    );
    let written = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = written.clone();
    let mut write = rig.write;
    let flood = tokio::spawn(async move {
        loop {
            write.write_all(frame.as_bytes()).await.unwrap();
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    // Nobody drains the sink: the process is held back once its mailbox
    // (1,024) and the socket are full, instead of the daemon buffering more.
    let stalled = |last: &mut usize| {
        let now = written.load(std::sync::atomic::Ordering::Relaxed);
        let same = now == *last;
        *last = now;
        same
    };
    // First the real condition: the sink's mailbox is full.
    let end = tokio::time::Instant::now() + DEADLINE;
    while mailbox.len() < spindle_bus::MAILBOX_CAPACITY {
        assert!(
            tokio::time::Instant::now() < end,
            "the mailbox never filled"
        );
        // The flood and the bridge run on this runtime: let them go on.
        tokio::task::yield_now().await;
    }
    assert_eq!(
        mailbox.len(),
        spindle_bus::MAILBOX_CAPACITY,
        "no more than its capacity"
    );
    // Then the process's writes stall (a refused frame per wait at most).
    let mut last = written.load(std::sync::atomic::Ordering::Relaxed);
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if stalled(&mut last) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "the flood was never held back"
        );
    }
    assert!(
        last < spindle_bus::MAILBOX_CAPACITY + 2_000,
        "{last} frames accepted while nothing was drained"
    );
    // Draining lets it go on, and what arrived is intact.
    let mut drained = 0;
    while drained < spindle_bus::MAILBOX_CAPACITY + 100 {
        let env = tokio::time::timeout(DEADLINE, mailbox.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(&env.message, Message::Request(r) if r.body.len() == 1002));
        drained += 1;
    }
    assert!(written.load(std::sync::atomic::Ordering::Relaxed) > last);
    flood.abort();
    let _ = &mut rig.lines;
}

#[tokio::test(flavor = "current_thread")]
async fn blobs_travel_raw_or_as_base64() {
    use tokio::io::AsyncReadExt;
    let mut rig = Rig::new(true);
    let other = addr("other");
    let mut inbox = rig.bus.register(other.clone(), true).unwrap();
    let blob: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();

    // Raw from the process: announced, then the bytes right after the frame.
    rig.send(&format!(
        r#"{{"type":"request","target":"{other}","id":1,"timeout_ms":5000,"blob_bytes":{},"blob_mime":"application/x-test"}}"#,
        blob.len()
    ))
    .await;
    rig.write.write_all(&blob).await.unwrap();
    // A frame right after the blob is read as a frame again.
    rig.send(r#"{"type":"heartbeat"}"#).await;
    let env = tokio::time::timeout(DEADLINE, inbox.recv())
        .await
        .unwrap()
        .unwrap();
    let got = env.blob.clone().expect("a blob");
    assert_eq!(got.bytes, blob);
    assert_eq!(got.mime.as_deref(), Some("application/x-test"));

    // Back to a process that has not said hello: base64 in the JSON.
    let reply = |id| Envelope {
        id,
        source: Arc::new(other.clone()),
        target: Arc::new(addr("native")),
        rsvp: None,
        message: Message::Response(
            spindle_bus::Response {
                inherit: false,
                body: b"\"back\"".to_vec(),
                metadata: None,
                capabilities: vec![],
            },
            None,
        ),
        blob: Some(got.clone()),
    };
    rig.bus.send(reply(env.id), false).await.unwrap();
    let f = rig.read().await;
    assert_eq!(f["id"], 1);
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD
        .decode(f["blob_base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(b64, blob);

    // After hello, raw: the frame says how many bytes follow.
    rig.send(r#"{"type":"hello","raw_blobs":true}"#).await;
    rig.send(&format!(
        r#"{{"type":"request","target":"{other}","id":2,"timeout_ms":5000}}"#
    ))
    .await;
    let env = tokio::time::timeout(DEADLINE, inbox.recv())
        .await
        .unwrap()
        .unwrap();
    rig.bus.send(reply(env.id), false).await.unwrap();
    let f = rig.read().await;
    assert_eq!(
        (f["id"].as_u64(), f["blob_bytes"].as_u64()),
        (Some(2), Some(blob.len() as u64))
    );
    let mut raw = vec![0; blob.len()];
    rig.lines.read_exact(&mut raw).await.unwrap();
    assert_eq!(raw, blob);

    // A blob over the limit is refused without reading it.
    rig.send(&format!(
        r#"{{"type":"request","target":"{other}","blob_bytes":{}}}"#,
        spindle_ipc::frame::MAX_BLOB + 1
    ))
    .await;
    let f = rig.read().await;
    assert!(f["message"].as_str().unwrap().contains("limit"), "{f}");
}

#[tokio::test(flavor = "current_thread")]
async fn an_inheriting_request_passes_the_route_and_the_blob_on() {
    let mut rig = Rig::new(true);
    let (client, backend) = (addr("client"), addr("backend"));
    let mut client_box = rig.bus.register(client.clone(), true).unwrap();
    let mut backend_box = rig.bus.register(backend.clone(), true).unwrap();
    // The client asks the native middleware, with a blob.
    let id = rig.bus.next_id();
    let mut ask = Envelope::request(
        id,
        Arc::new(client.clone()),
        Arc::new(addr("native")),
        Some(Arc::new(client.clone())),
        br#""forward me""#.to_vec(),
        Some(DEADLINE),
    );
    ask.blob = Some(Arc::new(spindle_bus::Blob {
        mime: None,
        bytes: vec![9; 1000],
    }));
    rig.bus.send(ask, false).await.unwrap();
    let f = rig.read().await;
    assert_eq!(f["id"].as_u64(), Some(id));
    // It forwards with inherit: no response of its own awaited, no blob given.
    rig.send(&format!(
        r#"{{"type":"request","target":"{backend}","inherit":{id},"body":"via middleware"}}"#
    ))
    .await;
    let env = tokio::time::timeout(DEADLINE, backend_box.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(env.id, id, "the original request's number");
    assert_eq!(
        env.rsvp.as_deref(),
        Some(&client),
        "responses go to the client"
    );
    assert_eq!(
        env.blob.as_ref().unwrap().bytes,
        vec![9; 1000],
        "the blob travels on"
    );
    // The backend answers the client directly.
    let answer = Envelope {
        id: env.id,
        source: Arc::new(backend.clone()),
        target: env.rsvp.clone().unwrap(),
        rsvp: None,
        message: Message::Response(
            spindle_bus::Response {
                inherit: false,
                body: b"\"done\"".to_vec(),
                metadata: None,
                capabilities: vec![],
            },
            None,
        ),
        blob: None,
    };
    rig.bus.send(answer, false).await.unwrap();
    let back = tokio::time::timeout(DEADLINE, client_box.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((back.id, &*back.source), (id, &backend));
    // The route has passed on: the middleware can no longer answer it.
    rig.send(&format!(r#"{{"type":"response","id":{id},"body":1}}"#))
        .await;
    let f = rig.read().await;
    assert!(
        f["message"]
            .as_str()
            .unwrap()
            .contains("nothing to respond to"),
        "{f}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn capabilities_are_checked_carried_and_kept_as_for_wasm() {
    let mut rig = Rig::new(true);
    let db = addr("db");
    let mut db_inbox = rig.bus.register(db.clone(), false).unwrap();
    let talk = spindle_bus::Capability::messaging(&db);
    let ask_db = format!(r#"{{"type":"request","target":"{db}","id":1,"timeout_ms":5000}}"#);

    // The db is private: without its capability, refused at once.
    rig.send(&ask_db).await;
    let f = rig.read().await;
    assert_eq!(
        (f["type"].as_str(), f["kind"].as_str()),
        (Some("error"), Some("no-capability"))
    );

    // Saving a capability that never came with a message keeps nothing.
    let forged = serde_json::to_value([&talk]).unwrap();
    rig.send(&format!(
        r#"{{"type":"save_capabilities","id":2,"capabilities":{forged}}}"#
    ))
    .await;
    let f = rig.read().await;
    assert_eq!(
        (f["type"].as_str(), f["id"].as_u64()),
        (Some("reply"), Some(2))
    );
    assert_eq!(f["capabilities"], serde_json::json!([]));

    // The db hands its capability over with a request; the process sees it.
    let mut offer = Envelope::request(
        rig.bus.next_id(),
        Arc::new(db.clone()),
        Arc::new(addr("native")),
        None,
        b"take this".to_vec(),
        None,
    );
    if let Message::Request(r) = &mut offer.message {
        r.capabilities = vec![talk.clone()];
    }
    rig.bus.send(offer, false).await.unwrap();
    let f = rig.read().await;
    assert_eq!(f["capabilities"], forged, "the capability arrives as sent");

    // Kept, it is held (and listed); the request goes through.
    rig.send(&format!(
        r#"{{"type":"save_capabilities","id":3,"capabilities":{forged}}}"#
    ))
    .await;
    let f = rig.read().await;
    assert_eq!(f["capabilities"], forged);
    assert!(rig.bus.holds(&addr("native").process, &talk));
    rig.send(r#"{"type":"capabilities","id":4}"#).await;
    assert_eq!(rig.read().await["capabilities"], forged);
    rig.send(&ask_db).await;
    let env = tokio::time::timeout(DEADLINE, db_inbox.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*env.source, addr("native"));

    // Attaching a capability it does not hold: refused, naming it.
    let other = serde_json::to_value([spindle_bus::Capability::messaging(&addr("vault"))]).unwrap();
    rig.send(&format!(
        r#"{{"type":"request","target":"{db}","id":5,"capabilities":{other}}}"#
    ))
    .await;
    let f = rig.read().await;
    assert_eq!(
        (f["kind"].as_str(), f["id"].as_u64()),
        (Some("invalid"), Some(5))
    );
    assert!(f["message"].as_str().unwrap().contains("vault"), "{f}");
    // Attaching one it holds passes it on.
    rig.send(&format!(
        r#"{{"type":"request","target":"{db}","capabilities":{forged}}}"#
    ))
    .await;
    let env = tokio::time::timeout(DEADLINE, db_inbox.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(env.message.capabilities(), &[talk.clone()][..]);

    // Dropped, it is gone, and the db is out of reach again.
    rig.send(&format!(
        r#"{{"type":"drop_capabilities","id":6,"capabilities":{forged}}}"#
    ))
    .await;
    assert_eq!(rig.read().await["capabilities"], serde_json::json!([]));
    rig.send(&ask_db).await;
    assert_eq!(rig.read().await["kind"], "no-capability");

    // No spawner here: the call fails with a reason, and the bridge goes on.
    rig.send(r#"{"type":"spawn","id":7,"wasm":"echo.wasm"}"#)
        .await;
    let f = rig.read().await;
    assert_eq!(f["id"], 7);
    assert!(f["error"].as_str().unwrap().contains("wasm"), "{f}");
    assert!(rig.bridge.is_connected());
}
