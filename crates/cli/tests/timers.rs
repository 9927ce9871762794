//! The timer module end to end: a wasm process setting, cancelling and
//! sleeping on timers through a real daemon, and a durable timer that
//! outlives a kill -9 of the daemon.

mod common;

use common::*;
use std::time::{SystemTime, UNIX_EPOCH};

const TK: &str = "local@tk:clock:acme";

fn start_timekeeper(n: &Node) {
    n.start_guest("timekeeper", "tk", "clock:acme");
}

fn ask(n: &Node, what: &str) -> String {
    n.ok(&["send", TK, what, "--timeout", "10s"])
        .trim()
        .to_string()
}

fn ask_maybe(n: &Node, what: &str) -> Option<String> {
    let out = n.run(&["send", TK, what, "--timeout", "2s"]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn id_of(answer: &str) -> String {
    answer
        .strip_prefix("set ")
        .unwrap_or_else(|| panic!("not a timer set: {answer}"))
        .to_string()
}

fn fired_has(n: &Node, event: &str) -> Option<()> {
    ask_maybe(n, "fired")?
        .split(',')
        .any(|e| e == event)
        .then_some(())
}

#[test]
fn a_process_sets_cancels_and_sleeps_on_timers() {
    let n = Node::new();
    start_timekeeper(&n);
    let slept = ask(&n, "sleep 40");
    let ms: u64 = slept.strip_prefix("slept ").unwrap().parse().unwrap();
    assert!(ms >= 40, "{slept}");

    let alpha = id_of(&ask(&n, "set 50 alpha"));
    let beta = id_of(&ask(&n, "set 600000 beta"));
    assert_eq!(ask(&n, &format!("cancel {beta}")), "true");
    assert_eq!(ask(&n, &format!("cancel {beta}")), "false");
    let soon = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 50;
    let gamma = id_of(&ask(&n, &format!("at {soon} gamma")));
    until("the timers' events", || {
        fired_has(&n, &format!("{alpha}:fired:alpha"))?;
        fired_has(&n, &format!("{beta}:cancelled:beta"))?;
        fired_has(&n, &format!("{gamma}:fired:gamma"))
    });

    // The module answers the operator too, and names a bad request.
    let out = n.run(&["send", "local@timer:sys:spindle", r#"{"op":"later"}"#]);
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("bad-request") && said.contains("unknown op"),
        "{said}"
    );
    let pending = n.ok(&["send", "local@timer:sys:spindle", r#"{"op":"pending"}"#]);
    assert!(pending.contains(r#""pending":0"#), "{pending}");
}

#[test]
fn a_durable_timer_outlives_a_kill_9_of_the_daemon() {
    let n = Node::new();
    start_timekeeper(&n);
    let plain = id_of(&ask(&n, "set 800 plain"));
    let durable = id_of(&ask(&n, "durable 1500 nightly"));
    // On disk (within the journal's commit window).
    until("the durable timer's row", || {
        records(&n.home())
            .get("timer")
            .is_some_and(|rows| rows.len() == 1)
            .then_some(())
    });
    let pid = n.daemon_pid();
    // SAFETY: signalling the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    until("the daemon gone", || (!alive(pid)).then_some(()));
    n.ok(&["ls"]);
    // The process is back in a new run; the durable timer comes to it as
    // a request with its context.
    until("the durable timer in the new run", || {
        fired_has(&n, &format!("{durable}:fired:\"nightly\""))
    });
    let events = ask(&n, "fired");
    assert!(
        !events.contains(&plain),
        "a plain timer died with its run: {events}"
    );
    until("the fired timer's row gone", || {
        records(&n.home())
            .get("timer")
            .is_none_or(Vec::is_empty)
            .then_some(())
    });
}
