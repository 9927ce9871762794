//! The timer module's figures: precision with many timers pending, as a
//! wasm process in the real daemon sees it, and the memory a million
//! pending timers cost (in-process, on the module and bus the daemon uses).

use crate::{Node, Row, mib, own_rss as rss};
use spindle_bus::{Bus, Envelope};
use spindle_types::Address;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Timers pending while precision is measured.
const PENDING: u64 = 100_000;
/// Sleeps of 1 ms timed by the guest.
const ROUNDS: u64 = 500;
/// Timers for the memory figure, and how they are spread.
const MILLION: usize = 1_000_000;
const PACKAGES: usize = 4;
const PER_PACKAGE: usize = 2;

pub fn run(rows: &mut Vec<Row>) {
    precision(rows);
    memory(rows);
}

/// The `timekeeper` guest sets PENDING far timers, then times ROUNDS
/// sleeps of 1 ms (request → answer in hand, inside the guest).
fn precision(rows: &mut Vec<Row>) {
    let mut n = Node::new();
    let guest = spindle_guests::path("timekeeper");
    let spec = n.build(spindle_types::manifest::RawProcess {
        name: Some("tk".into()),
        wasm: Some(guest.to_string_lossy().into()),
        package: Some("clock:bench".into()),
        public: Some(true),
        ..Default::default()
    });
    n.client.start(vec![spec]).expect("start timekeeper");
    let tk = "local@tk:clock:bench";
    let ask = |n: &mut Node, what: &str| {
        n.client
            .send(tk, what, Duration::from_secs(120))
            .expect("timekeeper answers")
    };
    // Until it is up; then without timers pending, then with them.
    let end = Instant::now() + crate::DEADLINE;
    while n.client.send(tk, "fired", Duration::from_secs(5)).is_err() {
        assert!(Instant::now() < end, "the timekeeper never answered");
        std::thread::sleep(Duration::from_millis(10));
    }
    let parse = |r: &str| -> (Duration, Duration) {
        let w: Vec<&str> = r.split_whitespace().collect();
        match w.as_slice() {
            ["ok", "p50", p50, "max", max] => (
                Duration::from_nanos(p50.parse().expect("p50")),
                Duration::from_nanos(max.parse().expect("max")),
            ),
            _ => panic!("precision: {r}"),
        }
    };
    let (idle_p50, idle_max) = parse(&ask(&mut n, &format!("precision 0 1 {ROUNDS}")));
    let rss0 = n.rss();
    let (p50, max) = parse(&ask(&mut n, &format!("precision {PENDING} 1 {ROUNDS}")));
    let daemon_growth = n.rss().saturating_sub(rss0);
    let us = |d: Duration| format!("{:.0} µs", d.as_secs_f64() * 1e6);
    rows.push(Row {
        metric: format!(
            "timer: 1 ms sleep from wasm, lateness p50 / max, 0 and {}k pending (real daemon)",
            PENDING / 1000
        ),
        target: "≤ 1 ms".into(),
        measured: format!(
            "{} / {} and {} / {} (daemon RSS +{} for the {}k)",
            us(idle_p50),
            us(idle_max),
            us(p50),
            us(max),
            mib(daemon_growth),
            PENDING / 1000
        ),
    });
}

/// A million timers an hour away, set by 8 processes of 4 packages
/// through the bus (each set is a request the module parses and budgets).
fn memory(rows: &mut Vec<Row>) {
    let bus = Arc::new(Bus::new("local"));
    let timers = spindle_timer::start(&bus, &[]).expect("the timer module");
    let module: Arc<Address> = Arc::new("local@timer:sys:spindle".parse().expect("address"));
    let owners: Vec<Arc<Address>> = (0..PACKAGES * PER_PACKAGE)
        .map(|i| {
            let a: Address = format!("local@p{i}:pkg{}:bench", i / PER_PACKAGE)
                .parse()
                .expect("address");
            Arc::new(a)
        })
        .collect();
    let _mailboxes: Vec<_> = owners
        .iter()
        .map(|a| bus.register((**a).clone(), false).expect("register"))
        .collect();
    let body = br#"{"op":"after","ms":3600000}"#;
    let rss0 = rss();
    let t = Instant::now();
    for i in 0..MILLION {
        let from = &owners[i % owners.len()];
        let env = Envelope::request(
            bus.next_id(),
            from.clone(),
            module.clone(),
            None,
            body.to_vec(),
            None,
        );
        bus.send_now(env, false).expect("the module takes it");
    }
    let took = t.elapsed();
    assert_eq!(timers.len(), MILLION, "every timer pending");
    let grown = rss().saturating_sub(rss0);
    rows.push(Row {
        metric: "timer: 1,000,000 pending (8 processes, 4 packages): memory / set each".into(),
        target: "≤ 100 MiB".into(),
        measured: format!(
            "{} ({} B each) / {:.2} µs",
            mib(grown),
            grown / MILLION as u64,
            took.as_secs_f64() * 1e6 / MILLION as f64
        ),
    });
}
