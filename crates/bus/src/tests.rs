use super::*;
use std::time::Instant;

fn addr(p: &str) -> Address {
    format!("local@{p}:demo:spindle").parse().unwrap()
}

fn request(source: &Address, target: &Address, caps: Vec<Capability>) -> Envelope {
    Envelope {
        id: 1,
        source: source.clone().into(),
        target: target.clone().into(),
        rsvp: None,
        message: Message::Request(Request {
            inherit: false,
            expects_response: None,
            body: b"hi".to_vec(),
            metadata: None,
            capabilities: caps,
        }),
        blob: None,
    }
}

#[tokio::test(flavor = "current_thread")]
async fn capabilities_decide_who_may_send() {
    let bus = Bus::new("local");
    let (a, b, c) = (addr("a"), addr("b"), addr("c"));
    let _ra = bus.register(a.clone(), false).unwrap();
    let mut rb = bus.register(b.clone(), false).unwrap();
    let mut rc = bus.register(c.clone(), true).unwrap();
    assert_eq!(
        bus.register(b.clone(), true).unwrap_err(),
        BusError::AddressTaken(b.clone())
    );

    // Offline is its own error, not a timeout.
    let (kind, _) = bus
        .send(request(&a, &addr("nobody"), vec![]), false)
        .await
        .unwrap_err();
    assert_eq!(kind, SendErrorKind::Offline);
    // b is private: a needs b's messaging capability.
    let (kind, _) = bus.send(request(&a, &b, vec![]), false).await.unwrap_err();
    assert_eq!(kind, SendErrorKind::NoCapability);
    // c is public.
    bus.send(request(&a, &c, vec![]), false).await.unwrap();
    assert!(rc.try_recv().is_some());
    bus.grant(&a.process, [Capability::messaging(&b)]);
    bus.send(request(&a, &b, vec![]), false).await.unwrap();
    assert!(rb.try_recv().is_some());
    // The kernel itself needs no capability.
    bus.send(request(&addr("kernel"), &b, vec![]), true)
        .await
        .unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn capabilities_cannot_be_forged() {
    let bus = Bus::new("local");
    let (a, b, c) = (addr("a"), addr("b"), addr("c"));
    let _ra = bus.register(a.clone(), false).unwrap();
    let mut rb = bus.register(b.clone(), true).unwrap();
    // a attaches c's messaging capability, which it neither holds nor issued.
    let forged = Capability::messaging(&c);
    let (kind, _) = bus
        .send(request(&a, &b, vec![forged.clone()]), false)
        .await
        .unwrap_err();
    assert_eq!(kind, SendErrorKind::Invalid);
    // Its own capability (issuer = a) it may give.
    let own = Capability::messaging(&a);
    bus.send(request(&a, &b, vec![own]), false).await.unwrap();
    assert!(rb.try_recv().is_some());
    // Once held, it may pass c's on.
    bus.grant(&a.process, [forged.clone()]);
    bus.send(request(&a, &b, vec![forged]), false)
        .await
        .unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn killing_an_issuer_revokes_what_it_issued() {
    let bus = Bus::new("local");
    let (a, b) = (addr("a"), addr("b"));
    bus.grant(
        &a.process,
        [Capability::messaging(&b), Capability::messaging(&addr("x"))],
    );
    bus.revoke_issued_by(&b);
    assert_eq!(
        bus.capabilities(&a.process),
        vec![Capability::messaging(&addr("x"))]
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_full_mailbox_slows_its_senders_only() {
    let bus = Bus::new("local");
    let (a, slow, fast) = (addr("a"), addr("slow"), addr("fast"));
    let _ra = bus.register(a.clone(), true).unwrap();
    let mut rs = bus.register(slow.clone(), true).unwrap();
    let mut rf = bus.register(fast.clone(), true).unwrap();
    for _ in 0..MAILBOX_CAPACITY {
        bus.send(request(&a, &slow, vec![]), false).await.unwrap();
    }
    let t = Instant::now();
    let (kind, back) = bus
        .send(request(&a, &slow, vec![]), false)
        .await
        .unwrap_err();
    assert_eq!(kind, SendErrorKind::MailboxFull);
    assert_eq!(*back.target, slow, "the message comes back to its sender");
    assert!(t.elapsed() >= MAILBOX_WAIT, "the sender was slowed first");
    // Another process is unaffected.
    bus.send(request(&a, &fast, vec![]), false).await.unwrap();
    assert!(rf.try_recv().is_some());
    // Senders that back off themselves are refused at once, and can wait for room.
    let t = Instant::now();
    let (kind, _) = bus.send_now(request(&a, &slow, vec![]), false).unwrap_err();
    assert_eq!(kind, SendErrorKind::MailboxFull);
    assert!(t.elapsed() < MAILBOX_WAIT);
    assert!(!bus.wait_for_room(&slow.process).await, "nobody drains it");
    assert!(rs.try_recv().is_some());
    assert!(bus.wait_for_room(&slow.process).await);
    bus.send_now(request(&a, &slow, vec![]), false).unwrap();
    // A kept endpoint stops working once its process leaves the bus.
    let kept = bus.endpoint(&slow.process).unwrap();
    // Once the receiver is gone, sends fail Offline.
    bus.unregister(&slow.process);
    assert!(!kept.is_on_bus());
    let (kind, _) = bus
        .send_now_to(&kept, request(&a, &slow, vec![]), false)
        .unwrap_err();
    assert_eq!(kind, SendErrorKind::Offline);
    let (kind, _) = bus
        .send(request(&a, &slow, vec![]), false)
        .await
        .unwrap_err();
    assert_eq!(kind, SendErrorKind::Offline);
}

/// A bus on the journal in `dir`, as the node opens it.
fn open(dir: &std::path::Path) -> Bus {
    let (journal, records) = spindle_store::journal::Journal::open(&dir.join("node.db")).unwrap();
    let rows = records.get(persist::KIND).cloned().unwrap_or_default();
    Bus::open("local", journal, &rows)
}

#[tokio::test(flavor = "current_thread")]
async fn capabilities_outlive_the_bus_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (addr("a"), addr("b"), addr("c"));
    {
        let bus = open(dir.path());
        bus.grant(
            &a.process,
            [Capability::messaging(&b), Capability::messaging(&c)],
        );
        bus.grant(&b.process, [Capability::messaging(&c)]);
        bus.revoke(&a.process, &[Capability::messaging(&c)]);
        bus.persisted().await.unwrap();
    }
    let bus = open(dir.path());
    assert_eq!(
        bus.capabilities(&a.process),
        vec![Capability::messaging(&b)]
    );
    assert!(bus.holds(&b.process, &Capability::messaging(&c)));

    // What a killed issuer gave out is gone for good, and so are forgotten holders.
    bus.revoke_issued_by(&c);
    bus.forget(&a.process);
    bus.persisted().await.unwrap();
    drop(bus);
    let bus = open(dir.path());
    assert!(bus.capabilities(&a.process).is_empty());
    assert!(bus.capabilities(&b.process).is_empty());
}

#[tokio::test(flavor = "current_thread")]
async fn a_transient_childs_rights_are_never_written_until_it_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (parent, child, other, remote) = (addr("parent"), addr("child"), addr("other"), addr("r"));
    // A right issued elsewhere (another node) that happens to share the
    // child's process id is not the child's: it is written.
    let namesake = Capability::messaging(&Address {
        node: "bob".into(),
        process: child.process.clone(),
    });
    {
        let bus = open(dir.path());
        bus.unsaved(&child.process);
        bus.grant(&parent.process, [Capability::messaging(&child)]);
        bus.grant(&child.process, [Capability::messaging(&other)]);
        bus.grant(&other.process, [namesake.clone()]);
        assert_eq!(
            bus.journal().unwrap().commit(),
            1,
            "one batch: the namesake's row only"
        );
        bus.persisted().await.unwrap();
        // In memory the rights hold as any other.
        assert!(bus.holds(&parent.process, &Capability::messaging(&child)));
        assert!(bus.holds(&child.process, &Capability::messaging(&other)));
    }
    let bus = open(dir.path());
    assert!(bus.capabilities(&parent.process).is_empty());
    assert!(bus.capabilities(&child.process).is_empty());
    assert_eq!(bus.capabilities(&other.process), vec![namesake.clone()]);

    // Its end writes nothing either; afterwards a process of its name is
    // written as usual.
    bus.unsaved(&child.process);
    bus.grant(&parent.process, [Capability::messaging(&child)]);
    bus.revoke_issued_by(&child);
    bus.forget(&child.process);
    let before = bus.journal().unwrap().commit();
    assert_eq!(before, 0, "nothing staged for the child's whole life");
    bus.grant(&child.process, [Capability::messaging(&other)]);
    bus.persisted().await.unwrap();
    drop(bus);
    let bus = open(dir.path());
    assert_eq!(
        bus.capabilities(&child.process),
        vec![Capability::messaging(&other)]
    );

    // A child that is kept (it chose to restart, so its row is written)
    // has what it holds and issued written with it.
    bus.forget(&child.process);
    bus.unsaved(&child.process);
    bus.grant(&parent.process, [Capability::messaging(&child)]);
    bus.grant(&child.process, [Capability::messaging(&other)]);
    bus.keep(&child.process);
    bus.grant(&remote.process, [Capability::messaging(&child)]);
    bus.persisted().await.unwrap();
    drop(bus);
    let bus = open(dir.path());
    assert_eq!(
        bus.capabilities(&parent.process),
        vec![Capability::messaging(&child)]
    );
    assert_eq!(
        bus.capabilities(&child.process),
        vec![Capability::messaging(&other)]
    );
    assert!(bus.holds(&remote.process, &Capability::messaging(&child)));

    // Marked unsaved again (transient once more), its written rows go at
    // once: nothing of it can outlive it on disk.
    bus.unsaved(&child.process);
    bus.revoke_issued_by(&child);
    bus.forget(&child.process);
    bus.persisted().await.unwrap();
    drop(bus);
    let bus = open(dir.path());
    assert!(bus.capabilities(&parent.process).is_empty());
    assert!(bus.capabilities(&child.process).is_empty());
    assert!(!bus.holds(&remote.process, &Capability::messaging(&child)));
}

#[tokio::test(flavor = "current_thread")]
async fn retain_drops_holders_and_issuers_that_no_longer_exist() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, gone) = (addr("a"), addr("b"), addr("gone"));
    // A right issued by a process of another node is that node's to
    // judge, whatever the process's name.
    let remote = Capability::messaging(&Address {
        node: "bob".into(),
        process: gone.process.clone(),
    });
    let bus = open(dir.path());
    bus.grant(
        &a.process,
        [Capability::messaging(&b), Capability::messaging(&gone)],
    );
    bus.grant(&b.process, [remote.clone()]);
    bus.grant(&gone.process, [Capability::messaging(&a)]);
    bus.retain(|p| p != &gone.process);
    bus.persisted().await.unwrap();
    drop(bus);
    let bus = open(dir.path());
    assert_eq!(
        bus.capabilities(&a.process),
        vec![Capability::messaging(&b)]
    );
    assert_eq!(bus.capabilities(&b.process), vec![remote]);
    assert!(bus.capabilities(&gone.process).is_empty());
}

#[test]
fn legacy_capability_files_are_read_refused_or_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("capabilities.json");
    assert!(persist::load_legacy(&file).unwrap().is_empty());
    std::fs::write(
        &file,
        r#"{"version": 1, "holders": [{"process": "a:demo:spindle", "capabilities": [{"issuer": "local@b:demo:spindle", "params": "\"messaging\""}]}]}"#,
    )
    .unwrap();
    let caps = persist::load_legacy(&file).unwrap();
    assert_eq!(caps[&addr("a").process].len(), 1, "{caps:?}");

    std::fs::write(&file, r#"{"version": 99, "holders": []}"#).unwrap();
    let e = persist::load_legacy(&file).unwrap_err().to_string();
    assert!(e.contains("newer Spindle") && e.contains("upgrade"), "{e}");

    std::fs::write(&file, "{ not json").unwrap();
    assert!(persist::load_legacy(&file).unwrap().is_empty());
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("corrupt"))
        .collect();
    assert_eq!(aside.len(), 1);
    assert_eq!(
        std::fs::read_to_string(aside[0].path()).unwrap(),
        "{ not json"
    );
}

#[test]
fn a_damaged_capability_row_is_left_out_and_the_rest_stand() {
    let good = persist::key(&addr("a").process, &Capability::messaging(&addr("b")));
    let rows = vec![
        ("[\"not a process\", 1]".to_string(), vec![]),
        (good, vec![]),
    ];
    let bus = Bus::open(
        "local",
        spindle_store::journal::Journal::open(&tempfile::tempdir().unwrap().path().join("n.db"))
            .unwrap()
            .0,
        &rows,
    );
    assert_eq!(
        bus.capabilities(&addr("a").process),
        vec![Capability::messaging(&addr("b"))]
    );
}

fn big(source: &Address, target: &Address, bytes: usize) -> Envelope {
    let mut env = request(source, target, vec![]);
    env.blob = Some(Arc::new(Blob {
        mime: None,
        bytes: vec![7; bytes],
    }));
    env
}

#[tokio::test(flavor = "current_thread")]
async fn queued_bytes_are_budgeted_per_mailbox_and_per_node() {
    let bus = Bus::new("local");
    let (a, busy, other) = (addr("a"), addr("busy"), addr("other"));
    let _ra = bus.register(a.clone(), true).unwrap();
    let mut rb = bus.register(busy.clone(), true).unwrap();
    let mut ro = bus.register(other.clone(), true).unwrap();
    let piece = 8 << 20;
    let weight = big(&a, &busy, piece).weight();
    let mut sent = 0;
    let refused = loop {
        match bus.send_now(big(&a, &busy, piece), false) {
            Ok(()) => sent += 1,
            Err((kind, _)) => break kind,
        }
        assert!(sent <= MAILBOX_BYTES / weight, "the budget did not hold");
    };
    assert_eq!(refused, SendErrorKind::MailboxFull);
    assert_eq!(sent, MAILBOX_BYTES / weight);
    assert!(rb.queued_bytes() <= MAILBOX_BYTES);
    // Another mailbox has its own budget.
    bus.send_now(big(&a, &other, piece), false).unwrap();
    assert!(ro.try_recv().is_some());
    // Reading makes room; a waiting sender learns of it.
    let waiter = bus.wait_for_room(&busy.process);
    let reader = async {
        while rb.queued_bytes() >= MAILBOX_BYTES / 2 {
            rb.recv().await.unwrap();
        }
    };
    let (room, ()) = tokio::join!(waiter, reader);
    assert!(room);
    bus.send_now(big(&a, &busy, piece), false).unwrap();
    // A mailbox dropped with mail in it gives its bytes back to the node.
    drop(rb);
    bus.unregister(&busy.process);
    assert_eq!(bus.queued.load(Ordering::Acquire), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn the_node_budget_holds_across_mailboxes() {
    let bus = Bus::new("local");
    let a = addr("a");
    let _ra = bus.register(a.clone(), true).unwrap();
    let piece = 16 << 20;
    let per = MAILBOX_BYTES / piece;
    let mut boxes = vec![];
    let mut sent = 0usize;
    let mut refused = false;
    for i in 0..(NODE_QUEUED_BYTES / MAILBOX_BYTES + 2) {
        let t = addr(&format!("t{i}"));
        boxes.push(bus.register(t.clone(), true).unwrap());
        for _ in 0..per {
            match bus.send_now(big(&a, &t, piece), false) {
                Ok(()) => sent += piece,
                Err((SendErrorKind::MailboxFull, _)) => refused = true,
                Err((k, _)) => panic!("{k}"),
            }
        }
    }
    assert!(refused, "the node's budget never bit");
    assert!(sent <= NODE_QUEUED_BYTES);
    assert!(bus.queued.load(Ordering::Acquire) <= NODE_QUEUED_BYTES);
}

#[tokio::test(flavor = "current_thread")]
async fn one_package_cannot_spend_the_node_budget_nor_silence_the_node() {
    let bus = Bus::new("local");
    let piece = 16 << 20;
    let a = addr("a");
    let _ra = bus.register(a.clone(), true).unwrap();
    // Many mailboxes of one package: together they stop at the package's share.
    let mut boxes = vec![];
    let mut held = 0usize;
    for i in 0..(PACKAGE_QUEUED_BYTES / MAILBOX_BYTES + 2) {
        let t = addr(&format!("p{i}"));
        boxes.push(bus.register(t.clone(), true).unwrap());
        while bus.send_now(big(&a, &t, piece), false).is_ok() {
            held += piece;
        }
    }
    assert!(held <= PACKAGE_QUEUED_BYTES, "{held}");
    assert!(held >= PACKAGE_QUEUED_BYTES - 2 * piece, "{held}");
    // Another package still has room.
    let other: Address = "local@o:other:spindle".parse().unwrap();
    let mut ro = bus.register(other.clone(), true).unwrap();
    bus.send_now(big(&a, &other, piece), false).unwrap();
    assert!(ro.try_recv().is_some());
    // The node's own messages are held to the mailbox's budget only: the
    // last mailbox is empty, but its package's share is spent.
    let last = addr(&format!("p{}", boxes.len() - 1));
    assert!(bus.send_now(big(&a, &last, piece), false).is_err());
    let kernel: Address = "local@kernel:sys:spindle".parse().unwrap();
    bus.send_now(big(&kernel, &last, piece), true).unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn a_message_sent_after_its_mailbox_is_gone_gives_its_bytes_back() {
    let bus = Bus::new("local");
    let (a, t) = (addr("a"), addr("t"));
    let _ra = bus.register(a.clone(), true).unwrap();
    let rt = bus.register(t.clone(), true).unwrap();
    let ep = bus.lookup(&t.process).unwrap();
    let Inbox::Mailbox(tx, queued) = &ep.inbox else {
        unreachable!()
    };
    // A sender that won a slot (a permit) as the mailbox went away: its
    // message enters a channel nobody will read again.
    let permit = tx.clone().reserve_owned().await.unwrap();
    drop(rt);
    let env = big(&a, &t, 1 << 20);
    let weight = env.weight();
    assert!(queued.take(weight, false));
    assert_eq!(bus.queued.load(Ordering::Acquire), weight);
    permit.send(Counted::slot(env, weight, queued));
    bus.unregister(&t.process);
    drop(ep);
    assert_eq!(bus.queued.load(Ordering::Acquire), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn a_tap_hears_what_matches_with_its_outcome_and_counts_what_it_lost() {
    let bus = Bus::new("local");
    let (a, b, other) = (
        addr("a"),
        addr("b"),
        "local@x:other:spindle".parse::<Address>().unwrap(),
    );
    let _ra = bus.register(a.clone(), true).unwrap();
    let mut rb = bus.register(b.clone(), false).unwrap();
    let mut rx = bus.register(other.clone(), true).unwrap();
    let mut all = bus.tap(trace::TraceFilter::All).unwrap();
    let mut just_b = bus
        .tap(trace::TraceFilter::Process(b.process.clone()))
        .unwrap();
    let mut other_pkg = bus
        .tap(trace::TraceFilter::Package(other.process.package.clone()))
        .unwrap();
    // Refused (b is private), then delivered, then offline.
    bus.send(request(&a, &b, vec![]), false).await.unwrap_err();
    bus.grant(&a.process, [Capability::messaging(&b)]);
    bus.send(request(&a, &b, vec![]), false).await.unwrap();
    assert!(rb.try_recv().is_some());
    bus.send_now(request(&a, &addr("nobody"), vec![]), false)
        .unwrap_err();
    bus.send_now(request(&a, &other, vec![]), false).unwrap();
    assert!(rx.try_recv().is_some());
    let outcomes = |tap: &mut trace::Tap| {
        std::iter::from_fn(|| tap.try_recv())
            .map(|t| (t.target.process.process.to_string(), t.outcome))
            .collect::<Vec<_>>()
    };
    let b_ = || "b".to_string();
    assert_eq!(
        outcomes(&mut all),
        vec![
            (b_(), Err(SendErrorKind::NoCapability)),
            (b_(), Ok(())),
            ("nobody".into(), Err(SendErrorKind::Offline)),
            ("x".into(), Ok(())),
        ]
    );
    assert_eq!(
        outcomes(&mut just_b),
        vec![(b_(), Err(SendErrorKind::NoCapability)), (b_(), Ok(()))]
    );
    assert_eq!(outcomes(&mut other_pkg), vec![("x".into(), Ok(()))]);
    // A reader that never reads loses records, and the sender never waits.
    for _ in 0..trace::TAP_QUEUE + 10 {
        bus.send_now(request(&a, &other, vec![]), false).unwrap();
        assert!(rx.try_recv().is_some());
    }
    assert_eq!(all.take_dropped(), 10);
    assert_eq!(all.take_dropped(), 0);
    // Dropped taps stop costing anything.
    drop((all, just_b, other_pkg));
    assert!(!bus.trace.active());
    let taps: Vec<_> = (0..trace::MAX_TAPS)
        .map(|_| bus.tap(trace::TraceFilter::All).unwrap())
        .collect();
    assert_eq!(
        bus.tap(trace::TraceFilter::All).err(),
        Some(trace::TooManyTaps)
    );
    drop(taps);
}

/// Takes every message for other nodes.
#[derive(Default)]
struct Wire(std::sync::Mutex<Vec<Envelope>>);

impl Remote for Wire {
    fn send(&self, env: Envelope) -> Result<(), Undelivered> {
        self.0.lock().unwrap().push(env);
        Ok(())
    }
}

fn on(node: &str, p: &str) -> Address {
    format!("{node}@{p}:demo:spindle").parse().unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn rights_given_across_nodes_are_kept_checked_and_dropped_here() {
    let dir = tempfile::tempdir().unwrap();
    let wire = Arc::new(Wire::default());
    let bus = open(dir.path());
    bus.connect("alice".into(), wire.clone());
    let (vault, q) = (addr("vault"), on("bob", "q"));
    let _rv = bus.register(vault.clone(), false).unwrap();
    bus.grant(&vault.process, [Capability::network()]);

    // bob@q has no right to the private vault, and cannot claim one.
    let from_q = |caps| Envelope {
        source: q.clone().into(),
        target: vault.clone().into(),
        ..request(&q, &vault, caps)
    };
    let (kind, _) = bus.deliver_remote(from_q(vec![])).unwrap_err();
    assert_eq!(kind, SendErrorKind::NoCapability);
    let forged = Capability::messaging(&vault);
    let (kind, _) = bus
        .deliver_remote(from_q(vec![forged.clone()]))
        .unwrap_err();
    assert_eq!(kind, SendErrorKind::Invalid);

    // The vault gives it: the right goes on the wire naming this node, and
    // this node records bob@q as its holder.
    bus.send(
        request(&vault, &q, vec![Capability::messaging(&vault)]),
        false,
    )
    .await
    .unwrap();
    let sent = wire.0.lock().unwrap().pop().unwrap();
    assert_eq!(
        sent.message.capabilities(),
        [Capability::messaging(&on("alice", "vault"))]
    );
    bus.deliver_remote(from_q(vec![])).unwrap();
    bus.deliver_remote(from_q(vec![forged.clone()])).unwrap();
    // A right of a third node, or of the node itself, does not go.
    let third = Capability::messaging(&on("carol", "x"));
    bus.grant(&vault.process, [third.clone()]);
    for cap in [third, Capability::network()] {
        let (kind, _) = bus
            .send(request(&vault, &q, vec![cap]), false)
            .await
            .unwrap_err();
        assert_eq!(kind, SendErrorKind::Invalid);
    }

    // The record is on disk; bob leaving the allow-list drops it.
    bus.persisted().await.unwrap();
    drop(bus);
    let bus = open(dir.path());
    let _rv = bus.register(vault.clone(), false).unwrap();
    bus.deliver_remote(from_q(vec![])).unwrap();
    bus.retain_nodes(|n| n == "carol");
    let (kind, _) = bus.deliver_remote(from_q(vec![])).unwrap_err();
    assert_eq!(kind, SendErrorKind::NoCapability);
}

#[tokio::test(flavor = "current_thread")]
async fn one_process_gives_rights_to_a_bounded_number_of_remote_processes() {
    let bus = Bus::new("local");
    let wire = Arc::new(Wire::default());
    bus.connect("alice".into(), wire.clone());
    let vault = addr("vault");
    // Of another package: its budget is its own.
    let other: Address = "local@other:else:spindle".parse().unwrap();
    bus.grant(&vault.process, [Capability::network()]);
    bus.grant(
        &other.process,
        [Capability::network(), Capability::messaging(&vault)],
    );
    let give = |from: &Address, i: usize| {
        request(
            from,
            &on("bob", &format!("q{i}")),
            vec![Capability::messaging(&vault)],
        )
    };
    // A process of another package holding vault's right spends its own
    // package's budget giving it, not vault's.
    for i in 0..MAX_REMOTE_HOLDERS {
        bus.send(give(&other, MAX_REMOTE_HOLDERS + i), false)
            .await
            .unwrap();
        wire.0.lock().unwrap().clear();
    }
    let (kind, _) = bus.send(give(&other, 0), false).await.unwrap_err();
    assert_eq!(kind, SendErrorKind::Invalid);
    for i in 0..MAX_REMOTE_HOLDERS {
        bus.send(give(&vault, i), false).await.unwrap();
        wire.0.lock().unwrap().clear();
    }
    let (kind, _) = bus
        .send(give(&vault, 2 * MAX_REMOTE_HOLDERS), false)
        .await
        .unwrap_err();
    assert_eq!(kind, SendErrorKind::Invalid);
    // One that holds it already may be sent it again.
    bus.send(give(&vault, 0), false).await.unwrap();
    // A short-lived process of vault's package shares that budget: children
    // that come and go cannot grow the record without bound.
    let child = addr("child");
    bus.grant(
        &child.process,
        [Capability::network(), Capability::messaging(&vault)],
    );
    let (kind, _) = bus
        .send(give(&child, 3 * MAX_REMOTE_HOLDERS), false)
        .await
        .unwrap_err();
    assert_eq!(kind, SendErrorKind::Invalid);
}
