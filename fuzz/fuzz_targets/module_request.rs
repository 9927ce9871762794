//! Requests to the kv, sqlite and vfs modules: any body (and blob) is
//! answered, and paths never leave their drive.
#![no_main]
use spindle_bus::{Blob, Bus, Envelope, Mailbox, Message, Request};
use spindle_types::Address;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

struct Node {
    _dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    bus: Arc<Bus>,
    me: Arc<Address>,
    inbox: Mailbox,
}

fn node() -> &'static Mutex<Node> {
    static NODE: OnceLock<Mutex<Node>> = OnceLock::new();
    NODE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let bus = Arc::new(Bus::new("local"));
        spindle_db::start(dir.path(), &bus).unwrap();
        spindle_vfs::start(&dir.path().join("vfs"), &bus).unwrap();
        let me: Address = "local@fuzz:shop:acme".parse().unwrap();
        let inbox = bus.register(me.clone(), false).unwrap();
        Mutex::new(Node {
            _dir: dir,
            rt,
            bus,
            me: Arc::new(me),
            inbox,
        })
    })
}

libfuzzer_sys::fuzz_target!(|input: (u8, Vec<u8>, Vec<u8>)| {
    let (which, body, blob) = input;
    let mut guard = node().lock().unwrap_or_else(|p| p.into_inner());
    let n = &mut *guard;
    let module = ["kv", "sqlite", "vfs"][usize::from(which) % 3];
    let id = n.bus.next_id();
    let env = Envelope {
        id,
        source: n.me.clone(),
        target: Arc::new(format!("local@{module}:sys:spindle").parse().unwrap()),
        rsvp: Some(n.me.clone()),
        message: Message::Request(Request {
            inherit: false,
            expects_response: Some(Duration::from_secs(10)),
            body,
            metadata: None,
            capabilities: vec![],
        }),
        blob: Some(Arc::new(Blob { mime: None, bytes: blob })),
    };
    let (bus, inbox) = (&n.bus, &mut n.inbox);
    n.rt.block_on(async {
        bus.send(env, false).await.map_err(|(k, _)| k).unwrap();
        loop {
            let got = tokio::time::timeout(Duration::from_secs(10), inbox.recv())
                .await
                .expect("every request is answered")
                .unwrap();
            if got.id == id {
                let v: serde_json::Value = serde_json::from_slice(match &got.message {
                    Message::Response(r, _) => &r.body,
                    _ => panic!("not a response"),
                })
                .unwrap();
                assert!(v.is_object());
                return;
            }
        }
    });
});
