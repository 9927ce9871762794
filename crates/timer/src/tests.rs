use super::*;
use serde_json::{Value, json};
use spindle_bus::Mailbox;
use std::collections::HashMap;
use std::time::Instant;

/// Long enough for any answer on a loaded machine; every wait is on a
/// condition, bounded by this.
const PATIENCE: Duration = Duration::from_secs(10);

fn addr(p: &str) -> Arc<Address> {
    Arc::new(format!("local@{p}:demo:spindle").parse().unwrap())
}

fn timer_address() -> Arc<Address> {
    Arc::new("local@timer:sys:spindle".parse().unwrap())
}

/// A request to the module from `from`, expecting a response (or not).
fn ask(bus: &Bus, from: &Arc<Address>, body: Value, expects: bool) -> u64 {
    let id = bus.next_id();
    let env = Envelope {
        id,
        source: from.clone(),
        target: timer_address(),
        rsvp: expects.then(|| from.clone()),
        message: Message::Request(Request {
            inherit: false,
            // As long as any answer may be awaited: these tests wait on
            // their own deadlines.
            expects_response: expects.then_some(spindle_bus::MAX_AWAIT),
            body: serde_json::to_vec(&body).unwrap(),
            metadata: None,
            capabilities: vec![],
        }),
        blob: None,
    };
    bus.send_now(env, false).unwrap();
    id
}

async fn next(mailbox: &mut Mailbox) -> Envelope {
    tokio::time::timeout(PATIENCE, mailbox.recv())
        .await
        .expect("an answer in time")
        .expect("the mailbox is open")
}

fn body(env: &Envelope) -> Value {
    match &env.message {
        Message::Request(r) => serde_json::from_slice(&r.body).unwrap(),
        Message::Response(r, _) => serde_json::from_slice(&r.body).unwrap(),
        Message::Failed(k) => json!({ "failed": k.name() }),
    }
}

fn late_us(env: &Envelope) -> u64 {
    let meta = match &env.message {
        Message::Request(r) => r.metadata.clone(),
        Message::Response(r, _) => r.metadata.clone(),
        Message::Failed(_) => None,
    };
    let v: Value = serde_json::from_str(&meta.expect("metadata")).unwrap();
    v["late_us"].as_u64().expect("late_us")
}

/// Waits until `n` timers are pending (a fired one is over just after
/// its answer is delivered).
async fn settles(t: &Timers, n: usize) {
    let deadline = Instant::now() + PATIENCE;
    while t.len() != n {
        assert!(
            Instant::now() < deadline,
            "{} timers pending, not {n}",
            t.len()
        );
        std::thread::yield_now();
    }
}

fn node() -> (Arc<Bus>, Timers) {
    let bus = Arc::new(Bus::new("local"));
    let timers = start(&bus, &[]).unwrap();
    (bus, timers)
}

#[tokio::test(flavor = "current_thread")]
async fn a_timer_is_answered_at_its_deadline_with_its_request_number() {
    let (bus, _t) = node();
    let a = addr("a");
    let mut mb = bus.register((*a).clone(), false).unwrap();
    let started = Instant::now();
    let first = ask(&bus, &a, json!({"op":"after","ms":80,"id":2}), true);
    let second = ask(&bus, &a, json!({"op":"after","ms":20,"id":1}), true);
    // The earlier deadline comes first, whatever the order set.
    let env = next(&mut mb).await;
    assert_eq!(env.id, second);
    assert!(env.message.is_answer());
    assert_eq!(body(&env), json!({"timer":1,"status":"fired"}));
    assert!(started.elapsed() >= Duration::from_millis(20));
    let env = next(&mut mb).await;
    assert_eq!(env.id, first);
    assert!(started.elapsed() >= Duration::from_millis(80));
    assert!(late_us(&env) < PATIENCE.as_micros() as u64);
    assert!(mb.try_recv().is_none());
}

#[tokio::test(flavor = "current_thread")]
async fn a_cancel_answers_the_timer_at_once_and_only_its_owner_may() {
    let (bus, _t) = node();
    let (a, b) = (addr("a"), addr("b"));
    let mut ma = bus.register((*a).clone(), false).unwrap();
    let mut mb = bus.register((*b).clone(), false).unwrap();
    let timer = ask(&bus, &a, json!({"op":"after","ms":60_000,"id":7}), true);
    // b's cancel finds no timer 7 of its own.
    ask(&bus, &b, json!({"op":"cancel","id":7}), true);
    assert_eq!(body(&next(&mut mb).await), json!({"cancelled": false}));
    let cancel = ask(&bus, &a, json!({"op":"cancel","id":7}), true);
    let mut answers = HashMap::new();
    for _ in 0..2 {
        let env = next(&mut ma).await;
        answers.insert(env.id, body(&env));
    }
    assert_eq!(answers[&timer], json!({"timer":7,"status":"cancelled"}));
    assert_eq!(answers[&cancel], json!({"cancelled": true}));
    ask(&bus, &a, json!({"op":"pending"}), true);
    assert_eq!(body(&next(&mut ma).await), json!({"pending":0,"durable":0}));
}

#[tokio::test(flavor = "current_thread")]
async fn bad_requests_are_refused_with_what_to_send() {
    let (bus, t) = node();
    let a = addr("a");
    let mut mb = bus.register((*a).clone(), false).unwrap();
    for (req, kind, says) in [
        (json!({"op":"sleep"}), "bad-request", "unknown op"),
        (json!({"op":"after"}), "bad-request", "`after` takes `ms`"),
        (
            json!({"op":"at","ms":5}),
            "bad-request",
            "`at` takes `unix_ms`",
        ),
        (
            json!({"op":"after","ms":u64::MAX}),
            "bad-request",
            "at most",
        ),
        (
            json!({"op":"after","ms":1,"id":u64::MAX}),
            "bad-request",
            "the module's",
        ),
        (
            json!({"op":"after","ms":1,"context":1}),
            "bad-request",
            "durable timers only",
        ),
        (
            json!({"op":"after","ms":1,"bogus":1}),
            "bad-request",
            "unknown field",
        ),
        (json!({"op":"cancel"}), "bad-request", "`id`"),
        (
            json!({"op":"after","ms":1,"ack":true}),
            "bad-request",
            "`ack` is for durable",
        ),
        (
            json!({"op":"after","ms":1,"durable":true,"context":"x".repeat(MAX_CONTEXT)}),
            "quota",
            "context",
        ),
    ] {
        ask(&bus, &a, req.clone(), true);
        let b = body(&next(&mut mb).await);
        assert_eq!(b["error"], kind, "{req}: {b}");
        assert!(b["message"].as_str().unwrap().contains(says), "{req}: {b}");
    }
    // Further off than its answer is awaited.
    let far = json!({"op":"after","ms":PATIENCE.as_millis() as u64 + 1});
    let env = Envelope::request(
        bus.next_id(),
        a.clone(),
        timer_address(),
        Some(a.clone()),
        serde_json::to_vec(&far).unwrap(),
        Some(PATIENCE),
    );
    bus.send_now(env, false).unwrap();
    let b = body(&next(&mut mb).await);
    assert_eq!(b["error"], "bad-request", "{b}");
    assert!(
        b["message"].as_str().unwrap().contains("awaited for"),
        "{b}"
    );
    // Not JSON at all.
    let env = Envelope::request(
        bus.next_id(),
        a.clone(),
        timer_address(),
        Some(a.clone()),
        b"\xff{".to_vec(),
        Some(PATIENCE),
    );
    bus.send_now(env, false).unwrap();
    assert_eq!(body(&next(&mut mb).await)["error"], "bad-request");
    assert!(t.is_empty());
}

#[tokio::test(flavor = "current_thread")]
async fn an_id_in_use_is_refused_and_the_first_timer_stands() {
    let (bus, t) = node();
    let a = addr("a");
    let mut mb = bus.register((*a).clone(), false).unwrap();
    let first = ask(&bus, &a, json!({"op":"after","ms":30,"id":5}), true);
    ask(&bus, &a, json!({"op":"after","ms":1,"id":5}), true);
    assert_eq!(body(&next(&mut mb).await)["error"], "id-in-use");
    assert_eq!(t.len(), 1);
    assert_eq!(next(&mut mb).await.id, first);
}

#[tokio::test(flavor = "current_thread")]
async fn a_process_over_its_budget_gets_quota_and_others_are_untouched() {
    let bus = Arc::new(Bus::new("local"));
    let budgets = Budgets {
        process: 3,
        package: 5,
        node: 100,
        durable: 1,
        context: 1 << 20,
    };
    let _t = start_with(&bus, &[], budgets).unwrap();
    let (a, b, c) = (addr("a"), addr("b"), addr("c"));
    let other: Arc<Address> = Arc::new("local@d:other:spindle".parse().unwrap());
    let mut ma = bus.register((*a).clone(), false).unwrap();
    let mut mb = bus.register((*b).clone(), false).unwrap();
    let mut mc = bus.register((*c).clone(), false).unwrap();
    let mut md = bus.register((*other).clone(), false).unwrap();
    for _ in 0..3 {
        ask(&bus, &a, json!({"op":"after","ms":60_000}), true);
    }
    ask(&bus, &a, json!({"op":"after","ms":1}), true);
    let refused = body(&next(&mut ma).await);
    assert_eq!(refused["error"], "quota");
    assert!(refused["message"].as_str().unwrap().contains("process"));
    // b may still set its own, up to the package's budget.
    ask(&bus, &b, json!({"op":"after","ms":1,"durable":true}), true);
    assert_eq!(body(&next(&mut mb).await)["status"], "fired");
    ask(
        &bus,
        &b,
        json!({"op":"after","ms":60_000,"durable":true}),
        true,
    );
    ask(
        &bus,
        &b,
        json!({"op":"after","ms":60_000,"durable":true}),
        true,
    );
    assert!(
        body(&next(&mut mb).await)["message"]
            .as_str()
            .unwrap()
            .contains("durable")
    );
    ask(&bus, &b, json!({"op":"after","ms":60_000}), true);
    ask(&bus, &c, json!({"op":"after","ms":1}), true);
    assert!(
        body(&next(&mut mc).await)["message"]
            .as_str()
            .unwrap()
            .contains("package demo:spindle")
    );
    // Another package is untouched.
    ask(&bus, &other, json!({"op":"after","ms":1}), true);
    assert_eq!(body(&next(&mut md).await)["status"], "fired");
}

#[tokio::test(flavor = "current_thread")]
async fn a_run_takes_its_plain_timers_with_it_and_a_durable_one_comes_to_the_next_run() {
    let (bus, t) = node();
    let a = addr("a");
    let mb = bus.register((*a).clone(), false).unwrap();
    ask(&bus, &a, json!({"op":"after","ms":60_000}), true);
    ask(
        &bus,
        &a,
        json!({"op":"after","ms":30,"id":9,"durable":true,"context":{"job":"nightly"}}),
        true,
    );
    assert_eq!(t.len(), 2);
    bus.unregister(&a.process);
    drop(mb);
    // The plain one went with the run; the durable one fires while the
    // process is off the bus, and waits for it.
    assert_eq!(t.len(), 1);
    let deadline = Instant::now() + PATIENCE;
    while t.shared.lock().wheel.parked(&a.process) == 0 {
        assert!(Instant::now() < deadline, "the durable timer never fired");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(t.len(), 1, "a parked durable timer is still pending");
    let mut mb = bus.register((*a).clone(), false).unwrap();
    let env = next(&mut mb).await;
    assert!(matches!(env.message, Message::Request(ref r) if r.expects_response.is_none()));
    assert_eq!(
        body(&env),
        json!({"timer":9,"status":"fired","context":{"job":"nightly"}})
    );
    assert!(late_us(&env) < PATIENCE.as_micros() as u64);
    settles(&t, 0).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_timer_that_expects_no_response_comes_as_a_request() {
    let (bus, _t) = node();
    let a = addr("a");
    let mut mb = bus.register((*a).clone(), false).unwrap();
    ask(&bus, &a, json!({"op":"after","ms":5,"id":3}), false);
    let env = next(&mut mb).await;
    assert!(!env.message.is_answer());
    assert_eq!(env.source, timer_address());
    assert_eq!(body(&env), json!({"timer":3,"status":"fired"}));
}

#[tokio::test(flavor = "current_thread")]
async fn a_deleted_process_takes_its_durable_timers_along() {
    let (bus, t) = node();
    let a = addr("a");
    let _mb = bus.register((*a).clone(), false).unwrap();
    ask(
        &bus,
        &a,
        json!({"op":"after","ms":60_000,"durable":true}),
        true,
    );
    assert_eq!(t.len(), 1);
    bus.forget(&a.process);
    assert!(t.is_empty());
}

#[tokio::test(flavor = "current_thread")]
async fn durable_timers_outlive_the_node_and_fire_late_with_their_context() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.db");
    let a = addr("a");
    {
        let (journal, _) = Journal::open(&path).unwrap();
        let bus = Arc::new(Bus::open("local", journal.clone(), &[]));
        let t = start(&bus, &[]).unwrap();
        let _mb = bus.register((*a).clone(), false).unwrap();
        ask(
            &bus,
            &a,
            json!({"op":"after","ms":40,"id":1,"durable":true,"context":[1,2]}),
            true,
        );
        ask(&bus, &a, json!({"op":"after","ms":40,"id":2}), true);
        ask(
            &bus,
            &a,
            json!({"op":"after","ms":60_000,"id":3,"durable":true}),
            true,
        );
        // Cancelled: its row goes.
        ask(&bus, &a, json!({"op":"cancel","id":3}), true);
        assert_eq!(t.len(), 2);
        journal.flush_blocking().unwrap();
        journal.close();
    }
    // The node is down past the deadline.
    tokio::time::sleep(Duration::from_millis(60)).await;
    let (journal, records) = Journal::open(&path).unwrap();
    let rows = records.get(KIND).cloned().unwrap_or_default();
    assert_eq!(rows.len(), 1, "one durable timer pending: {rows:?}");
    let bus = Arc::new(Bus::open("local", journal.clone(), &[]));
    let t = start(&bus, &rows).unwrap();
    assert_eq!(t.len(), 1);
    let mut mb = bus.register((*a).clone(), false).unwrap();
    let env = next(&mut mb).await;
    assert_eq!(
        body(&env),
        json!({"timer":1,"status":"fired","context":[1,2]})
    );
    assert!(late_us(&env) >= 20_000, "late {}", late_us(&env));
    assert!(mb.try_recv().is_none());
    // Fired: its row is gone too.
    journal.flush_blocking().unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = spindle_store::journal::read(&path).unwrap();
        if left.get(KIND).is_none_or(Vec::is_empty) {
            break;
        }
        assert!(Instant::now() < deadline, "the fired timer's row stays");
        journal.flush_blocking().unwrap();
    }
}

#[tokio::test(flavor = "current_thread")]
async fn unreadable_rows_and_unknown_processes_are_left_out() {
    let bus = Arc::new(Bus::new("local"));
    let good = (
        row_key(&addr("a").process, 1),
        br#"{"v":1,"at_unix_ms":0,"context":null}"#.to_vec(),
    );
    let gone = (
        row_key(&addr("gone").process, 1),
        br#"{"v":1,"at_unix_ms":0,"context":null}"#.to_vec(),
    );
    let rows = vec![
        good,
        gone,
        ("not json".into(), vec![]),
        (row_key(&addr("b").process, 1), b"{}".to_vec()),
        (
            row_key(&addr("c").process, 1),
            br#"{"v":99,"at_unix_ms":0,"context":null}"#.to_vec(),
        ),
    ];
    let t = start(&bus, &rows).unwrap();
    assert_eq!(t.len(), 2);
    t.retain(|p| p.process.as_str() != "gone");
    // Both are due at once: a timer the firing thread holds at the moment
    // of `retain` is marked over and counted until it comes back.
    let deadline = Instant::now() + PATIENCE;
    while t.len() != 1 {
        assert!(Instant::now() < deadline, "{} timers left, not 1", t.len());
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_full_mailbox_delays_the_answer_instead_of_losing_it() {
    let (bus, t) = node();
    let (a, filler) = (addr("a"), addr("filler"));
    let mut mb = bus.register((*a).clone(), true).unwrap();
    let _f = bus.register((*filler).clone(), false).unwrap();
    // Fill a's mailbox, then set the timer.
    let mut queued = 0;
    while bus
        .send_now(
            Envelope::request(0, filler.clone(), a.clone(), None, vec![], None),
            false,
        )
        .is_ok()
    {
        queued += 1;
    }
    assert_eq!(queued, spindle_bus::MAILBOX_CAPACITY);
    let timer = ask(&bus, &a, json!({"op":"after","ms":1,"id":1}), true);
    // The timer fires into the full mailbox, and is kept to try again.
    let deadline = Instant::now() + PATIENCE;
    while t
        .shared
        .lock()
        .wheel
        .tries(&a.process, 1)
        .is_none_or(|n| n == 0)
    {
        assert!(
            Instant::now() < deadline,
            "the timer never found the mailbox full"
        );
        std::thread::yield_now();
    }
    let mut before = 0;
    loop {
        let env = next(&mut mb).await;
        if env.id == timer {
            assert_eq!(body(&env)["status"], "fired");
            break;
        }
        before += 1;
        assert!(before <= queued, "the answer never came");
    }
    assert!(before > 0);
}

#[tokio::test(flavor = "current_thread")]
async fn an_acknowledged_durable_timer_is_answered_at_once_and_fires_as_a_request() {
    let (bus, t) = node();
    let a = addr("a");
    let mut mb = bus.register((*a).clone(), false).unwrap();
    // Further off than any answer may be awaited: with `ack` that is fine.
    let ms = spindle_bus::MAX_AWAIT.as_millis() as u64 + 1;
    let req = ask(
        &bus,
        &a,
        json!({"op":"after","ms":ms,"id":4,"durable":true,"ack":true,"context":{"job":7}}),
        true,
    );
    let env = next(&mut mb).await;
    assert_eq!(env.id, req);
    assert_eq!(body(&env), json!({"timer":4,"status":"set"}));
    assert_eq!(t.len(), 1);
    // Cancelled and set again, close: it comes as a request with its context.
    ask(&bus, &a, json!({"op":"cancel","id":4}), true);
    assert_eq!(body(&next(&mut mb).await), json!({"cancelled": true}));
    ask(
        &bus,
        &a,
        json!({"op":"after","ms":5,"id":4,"durable":true,"ack":true,"context":{"job":7}}),
        true,
    );
    assert_eq!(body(&next(&mut mb).await)["status"], "set");
    let env = next(&mut mb).await;
    assert!(matches!(env.message, Message::Request(_)), "{env:?}");
    assert_eq!(
        body(&env),
        json!({"timer":4,"status":"fired","context":{"job":7}})
    );
    settles(&t, 0).await;
}

#[tokio::test(flavor = "current_thread")]
async fn durable_contexts_are_budgeted_per_package() {
    let bus = Arc::new(Bus::new("local"));
    let context = json!("x".repeat(1000));
    let budgets = Budgets {
        process: 100,
        package: 100,
        node: 100,
        durable: 100,
        context: 2500,
    };
    let _t = start_with(&bus, &[], budgets).unwrap();
    let (a, b) = (addr("a"), addr("b"));
    let other: Arc<Address> = Arc::new("local@d:other:spindle".parse().unwrap());
    let mut ma = bus.register((*a).clone(), false).unwrap();
    let mut mb = bus.register((*b).clone(), false).unwrap();
    let mut md = bus.register((*other).clone(), false).unwrap();
    let set = |from: &Arc<Address>, id: u64| {
        ask(
            &bus,
            from,
            json!({"op":"after","ms":60_000,"id":id,"durable":true,"ack":true,"context":context}),
            true,
        )
    };
    set(&a, 1);
    assert_eq!(body(&next(&mut ma).await)["status"], "set");
    set(&b, 1);
    assert_eq!(body(&next(&mut mb).await)["status"], "set");
    // A third context would take the package over its bytes.
    set(&b, 2);
    let refused = body(&next(&mut mb).await);
    assert_eq!(refused["error"], "quota", "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("package demo:spindle"),
        "{refused}"
    );
    // Another package is untouched; a cancel makes room again.
    set(&other, 1);
    assert_eq!(body(&next(&mut md).await)["status"], "set");
    ask(&bus, &a, json!({"op":"cancel","id":1}), true);
    assert_eq!(body(&next(&mut ma).await)["cancelled"], true);
    set(&b, 2);
    assert_eq!(body(&next(&mut mb).await)["status"], "set");
}

#[tokio::test(flavor = "current_thread")]
async fn timers_into_a_mailbox_never_read_end_and_others_still_fire() {
    let (bus, t) = node();
    let (a, filler, c) = (addr("a"), addr("filler"), addr("c"));
    let _ma = bus.register((*a).clone(), true).unwrap();
    let _f = bus.register((*filler).clone(), false).unwrap();
    let mut mc = bus.register((*c).clone(), false).unwrap();
    while bus
        .send_now(
            Envelope::request(0, filler.clone(), a.clone(), None, vec![], None),
            false,
        )
        .is_ok()
    {}
    // Many timers into a full mailbox, and one for somebody else.
    for id in 0..2000 {
        ask(&bus, &a, json!({"op":"after","ms":0,"id":id}), true);
    }
    let started = Instant::now();
    ask(&bus, &c, json!({"op":"after","ms":1,"id":1}), true);
    let env = next(&mut mc).await;
    assert_eq!(body(&env)["status"], "fired");
    // a's timers give up with mailbox-full (their requests fail) and are gone.
    let deadline = Instant::now() + PATIENCE;
    while !t.is_empty() {
        assert!(Instant::now() < deadline, "{} timers left", t.len());
        std::thread::yield_now();
    }
    assert!(started.elapsed() < PATIENCE);
}

#[tokio::test(flavor = "current_thread")]
async fn a_timer_re_armed_with_its_id_as_it_fires_is_taken() {
    let (bus, t) = node();
    let a = addr("a");
    let mut mb = bus.register((*a).clone(), false).unwrap();
    ask(&bus, &a, json!({"op":"after","ms":0,"id":7}), true);
    for round in 0..50 {
        let env = next(&mut mb).await;
        assert_eq!(
            body(&env)["status"],
            "fired",
            "round {round}: {}",
            body(&env)
        );
        // The id is free the moment its answer is in the mailbox.
        ask(&bus, &a, json!({"op":"after","ms":0,"id":7}), true);
    }
    let env = next(&mut mb).await;
    assert_eq!(body(&env), json!({"timer":7,"status":"fired"}));
    settles(&t, 0).await;
}

#[test]
fn the_waits_of_a_retried_answer_add_up_in_closed_form() {
    for tries in [0, 1, 2, 5, 9, 10, 11, 12, 30, 1000] {
        let summed: Duration = (0..tries).map(backoff).sum();
        assert_eq!(waited(tries), summed, "tries {tries}");
    }
    // Huge counts neither loop nor overflow.
    assert!(waited(u32::MAX) > Duration::from_secs(86_400));
}
