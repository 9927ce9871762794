use super::*;
use spindle_bus::{Blob, Mailbox, Request};
use std::os::unix::fs::FileExt;
use std::time::Duration;

const PATIENCE: Duration = Duration::from_secs(10);

fn addr(p: &str) -> Arc<Address> {
    Arc::new(p.parse().unwrap())
}

struct Node {
    dir: tempfile::TempDir,
    bus: Arc<Bus>,
}

fn node_with(budgets: Budgets) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let bus = Arc::new(Bus::new("local"));
    start_with(&dir.path().join("vfs"), &bus, budgets).unwrap();
    Node { dir, bus }
}

fn node() -> Node {
    node_with(BUDGETS)
}

/// A process on the bus that talks to the module.
struct Proc {
    me: Arc<Address>,
    mb: Mailbox,
}

impl Node {
    fn proc(&self, address: &str) -> Proc {
        let me = addr(address);
        let mb = self.bus.register((*me).clone(), false).unwrap();
        Proc { me, mb }
    }

    fn disk(&self, rel: &str) -> std::path::PathBuf {
        self.dir.path().join("vfs").join(rel)
    }
}

impl Proc {
    async fn ask(
        &mut self,
        bus: &Bus,
        body: Value,
        blob: Option<&[u8]>,
    ) -> (Value, Option<Vec<u8>>) {
        let id = bus.next_id();
        let env = Envelope {
            id,
            source: self.me.clone(),
            target: addr("local@vfs:sys:spindle"),
            rsvp: Some(self.me.clone()),
            message: Message::Request(Request {
                inherit: false,
                expects_response: Some(PATIENCE),
                body: serde_json::to_vec(&body).unwrap(),
                metadata: None,
                capabilities: vec![],
            }),
            blob: blob.map(|b| {
                Arc::new(Blob {
                    mime: None,
                    bytes: b.to_vec(),
                })
            }),
        };
        bus.send_now(env, false).unwrap();
        let env = tokio::time::timeout(PATIENCE, self.mb.recv())
            .await
            .expect("an answer in time")
            .expect("the mailbox is open");
        assert_eq!(env.id, id);
        let Message::Response(r, _) = &env.message else {
            panic!("not a response: {env:?}")
        };
        (
            serde_json::from_slice(&r.body).unwrap(),
            env.blob.as_ref().map(|b| b.bytes.clone()),
        )
    }

    /// Asks, and expects success.
    async fn ok(
        &mut self,
        bus: &Bus,
        body: Value,
        blob: Option<&[u8]>,
    ) -> (Value, Option<Vec<u8>>) {
        let (v, b) = self.ask(bus, body.clone(), blob).await;
        assert!(v.get("error").is_none(), "{body} → {v}");
        (v, b)
    }

    /// Asks, and expects a refusal of `kind`; returns its message.
    async fn refused(&mut self, bus: &Bus, body: Value, blob: Option<&[u8]>, kind: &str) -> String {
        let (v, _) = self.ask(bus, body.clone(), blob).await;
        assert_eq!(v["error"], kind, "{body} → {v}");
        v["message"].as_str().unwrap().to_string()
    }
}

const A: &str = "local@a:demo:spindle";
const F: &str = "/demo:spindle/files";

fn at(rel: &str) -> String {
    format!("{F}/{rel}")
}

#[tokio::test(flavor = "current_thread")]
async fn files_are_written_read_in_ranges_appended_listed_and_removed() {
    let n = node();
    let mut a = n.proc(A);
    let bus = &n.bus;
    let (v, _) = a
        .ok(bus, json!({"op":"create_drive","drive":"files"}), None)
        .await;
    assert_eq!(v["created"], true);
    let (v, _) = a
        .ok(bus, json!({"op":"create_drive","drive":"files"}), None)
        .await;
    assert_eq!(v["created"], false);
    a.ok(bus, json!({"op":"mkdir","path":at("a/b")}), None)
        .await;
    a.ok(
        bus,
        json!({"op":"write","path":at("a/b/c.txt")}),
        Some(b"hello world"),
    )
    .await;
    let (v, blob) = a
        .ok(bus, json!({"op":"read","path":at("a/b/c.txt")}), None)
        .await;
    assert_eq!(blob.as_deref(), Some(&b"hello world"[..]));
    assert_eq!(v["size"], 11);
    let (v, blob) = a
        .ok(
            bus,
            json!({"op":"read","path":at("a/b/c.txt"),"offset":6,"length":3}),
            None,
        )
        .await;
    assert_eq!(blob.as_deref(), Some(&b"wor"[..]));
    assert_eq!(v["length"], 3);
    // Past the end: nothing, not an error.
    let (_, blob) = a
        .ok(
            bus,
            json!({"op":"read","path":at("a/b/c.txt"),"offset":100}),
            None,
        )
        .await;
    assert_eq!(blob.as_deref(), Some(&b""[..]));
    let (v, _) = a
        .ok(bus, json!({"op":"append","path":at("log")}), Some(b"1\n"))
        .await;
    assert_eq!(v["size"], 2);
    let (v, _) = a
        .ok(bus, json!({"op":"append","path":at("log")}), Some(b"2\n"))
        .await;
    assert_eq!(v["size"], 4);
    assert_eq!(
        std::fs::read(n.disk("demo:spindle/files/log")).unwrap(),
        b"1\n2\n"
    );
    let (v, _) = a
        .ok(bus, json!({"op":"metadata","path":at("a/b/c.txt")}), None)
        .await;
    assert_eq!(
        (v["kind"].as_str(), v["size"].as_u64()),
        (Some("file"), Some(11))
    );
    assert!(v["modified_ms"].as_u64().unwrap() > 0);
    let (v, _) = a.ok(bus, json!({"op":"list","path":F}), None).await;
    let names: Vec<&str> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "log"]);
    // Rename, copy, remove.
    a.ok(
        bus,
        json!({"op":"rename","path":at("log"),"to":at("a/log")}),
        None,
    )
    .await;
    a.ok(
        bus,
        json!({"op":"copy","path":at("a/log"),"to":at("copy")}),
        None,
    )
    .await;
    let (_, blob) = a
        .ok(bus, json!({"op":"read","path":at("copy")}), None)
        .await;
    assert_eq!(blob.as_deref(), Some(&b"1\n2\n"[..]));
    a.refused(
        bus,
        json!({"op":"remove_dir","path":at("a")}),
        None,
        "bad-request",
    )
    .await;
    a.ok(bus, json!({"op":"remove","path":at("copy")}), None)
        .await;
    a.ok(bus, json!({"op":"remove_tree","path":at("a")}), None)
        .await;
    let (v, _) = a.ok(bus, json!({"op":"list","path":F}), None).await;
    assert_eq!(v["total"], 0);
    a.refused(
        bus,
        json!({"op":"read","path":at("a/b/c.txt")}),
        None,
        "not-found",
    )
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn escapes_are_refused_and_symlinks_never_followed() {
    let n = node();
    let mut a = n.proc(A);
    let bus = &n.bus;
    a.ok(bus, json!({"op":"create_drive","drive":"files"}), None)
        .await;
    // A secret beside the vfs, and a symlink to it planted in the drive.
    std::fs::write(n.dir.path().join("secret"), b"do not read").unwrap();
    std::os::unix::fs::symlink(
        n.dir.path().join("secret"),
        n.disk("demo:spindle/files/link"),
    )
    .unwrap();
    std::os::unix::fs::symlink("/", n.disk("demo:spindle/files/rootlink")).unwrap();
    for path in [
        at("../../secret"),
        at("a/../../x"),
        "/demo:spindle/../secret".into(),
        at("./x"),
    ] {
        a.refused(bus, json!({"op":"read","path":path}), None, "bad-request")
            .await;
    }
    let m = a
        .refused(
            bus,
            json!({"op":"read","path":at("link")}),
            None,
            "no-access",
        )
        .await;
    assert!(!m.contains("do not read"), "{m}");
    a.refused(
        bus,
        json!({"op":"read","path":at("rootlink/etc/passwd")}),
        None,
        "no-access",
    )
    .await;
    a.refused(
        bus,
        json!({"op":"write","path":at("rootlink/tmp/x")}),
        Some(b"x"),
        "no-access",
    )
    .await;
    // A link is not a file to append to.
    a.refused(
        bus,
        json!({"op":"append","path":at("link")}),
        Some(b"x"),
        "bad-request",
    )
    .await;
    assert_eq!(
        std::fs::read(n.dir.path().join("secret")).unwrap(),
        b"do not read"
    );
    // A FIFO planted in the drive holds no worker: it is not a file.
    let fifo = n.disk("demo:spindle/files/fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    a.refused(
        bus,
        json!({"op":"read","path":at("fifo")}),
        None,
        "bad-request",
    )
    .await;
    a.refused(
        bus,
        json!({"op":"append","path":at("fifo")}),
        Some(b"x"),
        "bad-request",
    )
    .await;
    // The link itself may be listed and removed; its target stays.
    let (v, _) = a.ok(bus, json!({"op":"list","path":F}), None).await;
    assert!(
        v["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "link" && e["kind"] == "other")
    );
    a.ok(bus, json!({"op":"remove","path":at("link")}), None)
        .await;
    assert!(n.dir.path().join("secret").exists());
    // Unknown fields and ops are named.
    let m = a
        .refused(
            bus,
            json!({"op":"read","path":at("x"),"bogus":1}),
            None,
            "bad-request",
        )
        .await;
    assert!(m.contains("bogus"), "{m}");
    let m = a
        .refused(bus, json!({"op":"chmod"}), None, "bad-request")
        .await;
    assert!(m.contains("unknown op"), "{m}");
}

#[tokio::test(flavor = "current_thread")]
async fn another_package_needs_a_grant_and_a_refusal_changes_nothing() {
    let n = node();
    let (mut a, mut b) = (n.proc(A), n.proc("local@b:other:spindle"));
    let bus = &n.bus;
    a.ok(bus, json!({"op":"create_drive","drive":"files"}), None)
        .await;
    a.ok(bus, json!({"op":"write","path":at("doc")}), Some(b"v1"))
        .await;
    let m = b
        .refused(
            bus,
            json!({"op":"read","path":at("doc")}),
            None,
            "no-access",
        )
        .await;
    assert!(m.contains("grant"), "{m}");
    b.refused(
        bus,
        json!({"op":"write","path":at("doc")}),
        Some(b"evil"),
        "no-access",
    )
    .await;
    b.refused(
        bus,
        json!({"op":"remove_tree","path":at("doc")}),
        None,
        "no-access",
    )
    .await;
    assert_eq!(
        std::fs::read(n.disk("demo:spindle/files/doc")).unwrap(),
        b"v1"
    );
    // Only the owner grants.
    b.refused(
        bus,
        json!({"op":"grant","drive":"files","to":"local@b:other:spindle"}),
        None,
        "not-found",
    )
    .await;
    a.ok(
        bus,
        json!({"op":"grant","drive":"files","to":"local@b:other:spindle","access":"read"}),
        None,
    )
    .await;
    let (_, blob) = b.ok(bus, json!({"op":"read","path":at("doc")}), None).await;
    assert_eq!(blob.as_deref(), Some(&b"v1"[..]));
    b.refused(
        bus,
        json!({"op":"write","path":at("doc")}),
        Some(b"evil"),
        "no-access",
    )
    .await;
    a.ok(
        bus,
        json!({"op":"revoke","drive":"files","to":"local@b:other:spindle","access":"read"}),
        None,
    )
    .await;
    b.refused(
        bus,
        json!({"op":"read","path":at("doc")}),
        None,
        "no-access",
    )
    .await;
}

const E: usize = fs::ENTRY_BYTES as usize;

fn small_budget() -> Budgets {
    Budgets {
        package_bytes: 4 * fs::ENTRY_BYTES,
        queued_per_package: MAX_QUEUED_PER_PACKAGE,
    }
}

#[tokio::test(flavor = "current_thread")]
async fn over_its_budget_a_package_gets_quota_and_nothing_is_half_written() {
    let n = node_with(small_budget());
    let mut a = n.proc(A);
    let bus = &n.bus;
    // The drive costs one entry; x two more.
    a.ok(bus, json!({"op":"create_drive","drive":"files"}), None)
        .await;
    a.ok(
        bus,
        json!({"op":"write","path":at("x")}),
        Some(&vec![1u8; 2 * E]),
    )
    .await;
    // Replacing x with as much is within budget (the old contents go).
    a.ok(
        bus,
        json!({"op":"write","path":at("x")}),
        Some(&vec![2u8; 2 * E]),
    )
    .await;
    let m = a
        .refused(
            bus,
            json!({"op":"append","path":at("x")}),
            Some(&vec![3u8; E + 1]),
            "quota",
        )
        .await;
    assert!(m.contains("demo:spindle"), "{m}");
    a.refused(
        bus,
        json!({"op":"write","path":at("y")}),
        Some(&vec![3u8; E + 1]),
        "quota",
    )
    .await;
    a.refused(
        bus,
        json!({"op":"copy","path":at("x"),"to":at("z")}),
        None,
        "quota",
    )
    .await;
    assert_eq!(
        std::fs::read(n.disk("demo:spindle/files/x")).unwrap(),
        vec![2u8; 2 * E]
    );
    assert!(!n.disk("demo:spindle/files/y").exists());
    assert!(!n.disk("demo:spindle/files/z").exists());
    // Renaming a file onto itself frees nothing.
    a.ok(
        bus,
        json!({"op":"rename","path":at("x"),"to":at("x")}),
        None,
    )
    .await;
    a.refused(
        bus,
        json!({"op":"write","path":at("y")}),
        Some(&vec![3u8; E + 1]),
        "quota",
    )
    .await;
    // Another package is untouched; a removal makes room.
    let mut b = n.proc("local@b:other:spindle");
    b.ok(bus, json!({"op":"create_drive","drive":"files"}), None)
        .await;
    b.ok(
        bus,
        json!({"op":"write","path":"/other:spindle/files/y"}),
        Some(&vec![4u8; 3 * E]),
    )
    .await;
    a.ok(bus, json!({"op":"remove","path":at("x")}), None).await;
    a.ok(
        bus,
        json!({"op":"append","path":at("x")}),
        Some(&vec![3u8; 2 * E]),
    )
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn files_and_directories_cost_at_least_an_entry() {
    let n = node_with(small_budget());
    let mut a = n.proc(A);
    let bus = &n.bus;
    a.ok(bus, json!({"op":"create_drive","drive":"files"}), None)
        .await;
    // Three directories fill the budget; a fourth, or an empty file, does not fit.
    a.ok(bus, json!({"op":"mkdir","path":at("a/b/c")}), None)
        .await;
    a.refused(bus, json!({"op":"mkdir","path":at("d")}), None, "quota")
        .await;
    a.refused(
        bus,
        json!({"op":"write","path":at("empty")}),
        Some(b""),
        "quota",
    )
    .await;
    // Those there already cost nothing more; removing them gives room back.
    a.ok(bus, json!({"op":"mkdir","path":at("a/b")}), None)
        .await;
    a.ok(bus, json!({"op":"remove_tree","path":at("a")}), None)
        .await;
    for i in 0..3 {
        a.ok(
            bus,
            json!({"op":"write","path":at(&format!("f{i}"))}),
            Some(b"1"),
        )
        .await;
    }
    a.refused(
        bus,
        json!({"op":"append","path":at("f3")}),
        Some(b"1"),
        "quota",
    )
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_rename_may_not_nest_directories_past_the_limit() {
    let n = node();
    let mut a = n.proc(A);
    let bus = &n.bus;
    a.ok(bus, json!({"op":"create_drive","drive":"files"}), None)
        .await;
    let chain = |c: &str, k: usize| {
        (0..k)
            .map(|i| format!("{c}{i}"))
            .collect::<Vec<_>>()
            .join("/")
    };
    a.ok(bus, json!({"op":"mkdir","path":at(&chain("a", 40))}), None)
        .await;
    a.ok(bus, json!({"op":"mkdir","path":at(&chain("b", 40))}), None)
        .await;
    let m = a
        .refused(
            bus,
            json!({"op":"rename","path":at("a0"),"to":at(&format!("{}/a0", chain("b", 40)))}),
            None,
            "bad-request",
        )
        .await;
    assert!(m.contains("deep"), "{m}");
    // Within the limit it moves.
    a.ok(
        bus,
        json!({"op":"rename","path":at("a0"),"to":at("b0/a0")}),
        None,
    )
    .await;
    a.ok(bus, json!({"op":"remove_tree","path":at("b0")}), None)
        .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_package_flooding_the_module_waits_for_itself() {
    let n = node_with(Budgets {
        package_bytes: MAX_PACKAGE_BYTES,
        queued_per_package: 0,
    });
    let (mut a, mut b) = (n.proc(A), n.proc("local@b:sys:spindle"));
    let bus = &n.bus;
    let m = a
        .refused(
            bus,
            json!({"op":"create_drive","drive":"files"}),
            None,
            "over-budget",
        )
        .await;
    assert!(m.contains("demo:spindle"), "{m}");
    // The budget is per package: the node's own is refused too here (0), but nothing else is held.
    b.refused(bus, json!({"op":"list","path":F}), None, "over-budget")
        .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_gigabyte_file_is_read_and_appended_in_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let drive = dir.path().join("vfs/demo:spindle/files");
    std::fs::create_dir_all(&drive).unwrap();
    // Sparse: a gigabyte of size without a gigabyte of disk.
    let f = std::fs::File::create(drive.join("big.bin")).unwrap();
    f.set_len(1 << 30).unwrap();
    f.write_at(b"tail", (1 << 30) - 4).unwrap();
    drop(f);
    let bus = Arc::new(Bus::new("local"));
    start_with(
        &dir.path().join("vfs"),
        &bus,
        Budgets {
            package_bytes: 2 << 30,
            queued_per_package: MAX_QUEUED_PER_PACKAGE,
        },
    )
    .unwrap();
    let mut a = Proc {
        me: addr(A),
        mb: bus.register((*addr(A)).clone(), false).unwrap(),
    };
    let m = a
        .refused(
            &bus,
            json!({"op":"read","path":at("big.bin")}),
            None,
            "bad-request",
        )
        .await;
    assert!(m.contains("in ranges"), "{m}");
    let (v, blob) = a
        .ok(
            &bus,
            json!({"op":"read","path":at("big.bin"),"offset":(1u64 << 30) - 4,"length":4}),
            None,
        )
        .await;
    assert_eq!(blob.as_deref(), Some(&b"tail"[..]));
    assert_eq!(v["size"], 1u64 << 30);
    let (v, _) = a
        .ok(
            &bus,
            json!({"op":"append","path":at("big.bin")}),
            Some(b"more"),
        )
        .await;
    assert_eq!(v["size"], (1u64 << 30) + 4);
    let (_, blob) = a
        .ok(&bus, json!({"op":"read","path":at("big.bin"),"offset":(1u64 << 30) - 4,"length":fs::MAX_READ}), None)
        .await;
    assert_eq!(blob.as_deref(), Some(&b"tailmore"[..]));
}

#[test]
fn the_cli_reads_drives_directly() {
    let dir = tempfile::tempdir().unwrap();
    let drive = dir.path().join("demo:spindle/files");
    std::fs::create_dir_all(drive.join("sub")).unwrap();
    std::fs::write(drive.join("a.txt"), b"hello").unwrap();
    let (entries, total) = ls(dir.path(), "demo:spindle/files").unwrap();
    assert_eq!(total, 2);
    assert_eq!(entries[0].name, "a.txt");
    let mut out = Vec::new();
    cat(dir.path(), "/demo:spindle/files/a.txt", &mut out).unwrap();
    assert_eq!(out, b"hello");
    let e = ls(dir.path(), "demo:spindle/nope").unwrap_err();
    assert_eq!(e.0, "not-found");
    assert!(cat(dir.path(), "demo:spindle/files/../x", &mut out).is_err());
}

/// Needs root (a tmpfs mount).
#[tokio::test(flavor = "current_thread")]
#[ignore = "needs root: mounts a small tmpfs to fill"]
async fn a_full_disk_fails_the_write_and_leaves_the_old_contents() {
    let dir = tempfile::tempdir().unwrap();
    let vfs = dir.path().join("vfs");
    let _disk = spindle_store::testing::TinyDisk::mount(&vfs, "size=1m").expect("mount a tmpfs");
    let bus = Arc::new(Bus::new("local"));
    start(&vfs, &bus).unwrap();
    let mut a = Proc {
        me: addr(A),
        mb: bus.register((*addr(A)).clone(), false).unwrap(),
    };
    a.ok(&bus, json!({"op":"create_drive","drive":"files"}), None)
        .await;
    a.ok(&bus, json!({"op":"write","path":at("x")}), Some(b"old"))
        .await;
    a.ok(
        &bus,
        json!({"op":"append","path":at("log")}),
        Some(b"kept\n"),
    )
    .await;
    let big = vec![7u8; 2 << 20];
    let m = a
        .refused(
            &bus,
            json!({"op":"write","path":at("x")}),
            Some(&big),
            "disk-full",
        )
        .await;
    assert!(m.contains("nothing was written"), "{m}");
    a.refused(
        &bus,
        json!({"op":"append","path":at("log")}),
        Some(&big),
        "disk-full",
    )
    .await;
    assert_eq!(
        std::fs::read(vfs.join("demo:spindle/files/x")).unwrap(),
        b"old"
    );
    assert_eq!(
        std::fs::read(vfs.join("demo:spindle/files/log")).unwrap(),
        b"kept\n"
    );
    assert_eq!(
        std::fs::read_dir(vfs.join(".tmp")).unwrap().count(),
        0,
        "a temporary file was left"
    );
    // And the budget was given back: a small write still fits.
    a.ok(
        &bus,
        json!({"op":"append","path":at("log")}),
        Some(b"more\n"),
    )
    .await;
}
