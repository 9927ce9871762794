//! `spindle trace` end to end: a real daemon, the `timekeeper` guest, and
//! the CLI streaming what crosses the bus.

mod common;

use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const TK: &str = "local@tk:clock:acme";

/// A running `spindle trace --json`, its frames read on a thread.
struct Trace {
    child: Child,
    frames: mpsc::Receiver<Value>,
}

impl Trace {
    fn start(n: &Node, args: &[&str]) -> Trace {
        let mut child = Command::new(spindle_bin())
            .arg("--home")
            .arg(n.home())
            .arg("trace")
            .args(args)
            .arg("--json")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, frames) = mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines() {
                let Ok(line) = line else { return };
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not a JSON frame ({e}): {line}"));
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        Trace { child, frames }
    }

    /// Frames until one satisfies `f` (it included), within the deadline.
    fn until(&self, what: &str, f: impl Fn(&Value) -> bool) -> Vec<Value> {
        let end = Instant::now() + DEADLINE;
        let mut seen = vec![];
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.frames.recv_timeout(left) {
                Ok(v) => {
                    let done = f(&v);
                    seen.push(v);
                    if done {
                        return seen;
                    }
                }
                Err(_) => panic!("no {what} in the trace; saw {seen:#?}"),
            }
        }
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn traced<'a>(v: &'a Value, kind: &str, source: &str, target: &str) -> Option<&'a Value> {
    (v["type"] == "traced"
        && v["kind"] == kind
        && v["source"].as_str()?.contains(source)
        && v["target"].as_str()?.contains(target))
    .then_some(v)
}

/// Sends `sleep 1` to the timekeeper until the trace shows it (the tap is
/// made when the daemon reads the trace request, a moment after the CLI
/// starts).
fn wait_for_tap(n: &Node, t: &Trace) {
    let end = Instant::now() + DEADLINE;
    loop {
        n.ok(&["send", TK, "sleep 1", "--timeout", "5s"]);
        if let Ok(v) = t.frames.recv_timeout(Duration::from_millis(200))
            && v["type"] == "traced"
        {
            return;
        }
        assert!(Instant::now() < end, "the trace never started");
    }
}

#[test]
fn trace_shows_requests_responses_refusals_and_lifecycle() {
    let n = Node::new();
    n.start_guest("timekeeper", "tk", "clock:acme");
    let all = Trace::start(&n, &[]);
    let only_tk = Trace::start(&n, &[TK]);
    wait_for_tap(&n, &all);
    wait_for_tap(&n, &only_tk);

    // Through the timekeeper to the timer module and back.
    n.ok(&["send", TK, "sleep 30", "--timeout", "5s"]);
    // (Frames of the `sleep 1`s before may come first.)
    let slow = |v: &Value| {
        v["since_request_us"]
            .as_u64()
            .is_some_and(|us| us >= 30_000)
    };
    let seen = all.until("the answer to the CLI", |v| {
        traced(v, "response", "tk:clock:acme", "cli-").is_some_and(slow)
    });
    let fired = seen
        .iter()
        .rev()
        .find_map(|v| traced(v, "response", "timer:sys:spindle", "tk:clock:acme"))
        .expect("the timer's answer");
    assert!(slow(fired), "{fired}");
    let request = seen
        .iter()
        .find(|v| {
            traced(v, "request", "tk:clock:acme", "timer:sys:spindle").is_some()
                && v["id"] == fired["id"]
        })
        .expect("the timer request");
    assert_eq!(request["outcome"], "delivered");
    assert!(request["expects_ms"].as_u64().unwrap() >= 30, "{request}");
    // The request was shown before its answer.
    let pos = |x: &Value| seen.iter().position(|v| v == x).unwrap();
    assert!(pos(request) < pos(fired));

    // A refusal names its reason; the filtered trace does not show it.
    n.fails(&["send", "local@nobody:clock:acme", "hi", "--timeout", "1s"]);
    let seen = all.until("the refused request", |v| {
        traced(v, "request", "cli-", "nobody:clock:acme").is_some()
    });
    assert_eq!(seen.last().unwrap()["outcome"], "offline");

    // Lifecycle in between: a restart of tk.
    n.ok(&["restart", "tk"]);
    let seen = only_tk.until("tk started again", |v| {
        v["type"] == "event" && v["event"] == "started"
    });
    assert_eq!(seen.last().unwrap()["address"], TK);
    assert!(
        !seen
            .iter()
            .any(|v| v["target"].as_str().is_some_and(|t| t.contains("nobody"))),
        "the filtered trace showed another process's traffic: {seen:#?}"
    );
}

#[test]
fn a_bad_filter_is_an_error_naming_the_form() {
    let n = Node::new();
    n.ok(&["ls"]);
    let err = n.fails(&["trace", "not an address"]);
    assert!(err.contains("process:package:publisher"), "{err}");
    let err = n.fails(&["trace", "--package", "nopublisher"]);
    assert!(err.contains("package:publisher"), "{err}");
}

#[test]
fn a_trace_whose_reader_stops_ends_even_when_the_bus_is_quiet() {
    let n = Node::new();
    n.start_guest("timekeeper", "tk", "clock:acme");
    let mut child = Command::new(spindle_bin())
        .arg("--home")
        .arg(n.home())
        .args(["trace", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // A reader that stops after the last record of a round (the answer to
    // the CLI's request): the pipe closes and the bus goes quiet.
    let out = BufReader::new(child.stdout.take().unwrap());
    let (tx, seen) = mpsc::channel();
    std::thread::spawn(move || {
        for line in out.lines() {
            let Ok(line) = line else { return };
            let v: Value = serde_json::from_str(&line).unwrap();
            if traced(&v, "response", "tk:clock:acme", "cli-").is_some() {
                let _ = tx.send(());
                return;
            }
        }
    });
    let end = Instant::now() + DEADLINE;
    loop {
        n.ok(&["send", TK, "sleep 1", "--timeout", "5s"]);
        if seen.recv_timeout(Duration::from_millis(200)).is_ok() {
            break;
        }
        assert!(Instant::now() < end, "the trace never showed a round");
    }
    until("the trace to end with nobody reading", || {
        child.try_wait().unwrap().map(drop)
    });
}
