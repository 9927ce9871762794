use super::*;
use std::time::Instant;

fn addr(p: &str) -> Address {
    format!("local@{p}:demo:spindle").parse().unwrap()
}

fn request(source: &Address, target: &Address, caps: Vec<Capability>) -> Envelope {
    Envelope {
        id: 1,
        source: source.clone(),
        target: target.clone(),
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
    assert!(rc.try_recv().is_ok());
    bus.grant(&a.process, [Capability::messaging(&b)]);
    bus.send(request(&a, &b, vec![]), false).await.unwrap();
    assert!(rb.try_recv().is_ok());
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
    assert!(rb.try_recv().is_ok());
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
    let _rs = bus.register(slow.clone(), true).unwrap();
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
    assert_eq!(back.target, slow, "the message comes back to its sender");
    assert!(t.elapsed() >= MAILBOX_WAIT, "the sender was slowed first");
    // Another process is unaffected.
    bus.send(request(&a, &fast, vec![]), false).await.unwrap();
    assert!(rf.try_recv().is_ok());
    // Once the receiver is gone, sends fail Offline.
    bus.unregister(&slow.process);
    let (kind, _) = bus
        .send(request(&a, &slow, vec![]), false)
        .await
        .unwrap_err();
    assert_eq!(kind, SendErrorKind::Offline);
}
