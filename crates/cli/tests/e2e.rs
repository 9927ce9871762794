//! End to end: the real `spindle` binary, a real daemon in a temporary home,
//! real helper programs. Conditions are waited on with deadlines.

mod common;

use common::*;
use spindle_types::ExitReason;
use spindle_types::control::StateLabel;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn start_ls_stop_by_name() {
    let n = Node::new();
    let tb = testbin();
    let out = n.ok(&["start", "--name", "api", "--", &tb, "catch-term"]);
    assert!(out.contains("started process 1"), "{out}");
    let p = until("running", || {
        let p = n.get(1);
        (p.state == StateLabel::Running).then_some(p)
    });
    let pid = p.pid.unwrap() as i32;
    assert!(alive(pid));
    // Nothing leaks into the child: stdin, stdout, stderr and no more —
    // once it runs its own program (before its exec, the daemon's
    // descriptors marked close-on-exec are still there).
    until("the child's first line", || {
        std::fs::read_to_string(&p.log_out)
            .ok()
            .filter(|s| s.starts_with("ready"))
    });
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    assert_eq!(fds, 3, "a child holds only its three standard descriptors");
    let table = n.ok(&["ls"]);
    assert!(
        table.contains("api") && table.contains("running"),
        "{table}"
    );
    let json: serde_json::Value = serde_json::from_str(&n.ok(&["ls", "--json"])).unwrap();
    assert_eq!(json[0]["name"], "api");

    // Shrugs off SIGTERM: stop returns once SIGKILL after the grace has
    // done it — and the polite signal did come first.
    let t = Instant::now();
    n.ok(&["stop", "api"]);
    assert!(t.elapsed() >= Duration::from_millis(200), "grace honoured");
    assert!(!alive(pid));
    let p = n.get(1);
    let said = std::fs::read_to_string(&p.log_out).unwrap();
    assert_eq!(said, "ready\nterm\n", "SIGTERM before the kill");
    assert_eq!(p.state, StateLabel::Stopped);
    assert_eq!(p.last_exit.unwrap().reason, ExitReason::Killed);
    // Socket is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(n.home().join("spindle.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn manifest_names_repeat_and_bad_input_starts_nothing() {
    let n = Node::new();
    let tb = testbin();
    std::fs::create_dir(n.dir.path().join("svc")).unwrap();
    let good = n.write(
        "app.toml",
        &format!(
            r#"
[[process]]
name = "web"
command = "{tb}"
args = ["print", "one"]
cwd = "svc"
log = "logs/web.log"

[[process]]
name = "web"
command = "{tb}"
args = ["print", "two"]
cwd = "svc"
log = "logs/web.log"
"#
        ),
    );
    let bad_key = n.write(
        "bad.toml",
        &format!("[[process]]\ncommand = \"{tb}\"\ngrace = \"soonish\"\n"),
    );
    let e = n.fails(&["start", bad_key.to_str().unwrap()]);
    assert!(e.contains("bad.toml") && e.contains("`grace`"), "{e}");
    let missing = n.write(
        "missing.toml",
        &format!(
            "[[process]]\ncommand = \"{tb}\"\nargs = [\"print\", \"x\"]\n[[process]]\nname = \"ghost\"\ncommand = \"no-such-binary-here\"\n"
        ),
    );
    let e = n.fails(&["start", missing.to_str().unwrap()]);
    assert!(
        e.contains("ghost")
            && e.contains("no-such-binary-here")
            && e.contains("nothing was started"),
        "{e}"
    );
    assert!(n.list().is_empty(), "nothing started half-way");

    n.ok(&["start", good.to_str().unwrap()]);
    let merged = n.dir.path().join("logs/web.log");
    until("both lines in the shared log", || {
        let t = std::fs::read_to_string(&merged).unwrap_or_default();
        (t.lines().filter(|l| *l == "one" || *l == "two").count() == 2).then_some(())
    });
    let out = n.ok(&["stop", "web"]);
    assert!(out.contains("stopped processes 1, 2"), "{out}");
    assert!(n.list().iter().all(|p| p.state == StateLabel::Stopped));
    let e = n.fails(&["stop", "nosuch"]);
    assert!(
        e.contains("no process matches") && e.contains("spindle ls"),
        "{e}"
    );
    n.ok(&["delete", "--all"]);
    assert!(n.list().is_empty());
}

#[test]
fn crash_loop_backs_off_by_the_schedule() {
    let n = Node::new();
    let tb = testbin();
    n.ok(&[
        "start",
        "--name",
        "crasher",
        "--restart-at",
        "50ms,100ms,200ms,5s",
        "--",
        &tb,
        "crash",
        "3",
    ]);
    let p = until("three restarts then a long backoff", || {
        let p = n.get(1);
        (p.restarts == 3 && p.state == StateLabel::Backoff).then_some(p)
    });
    let e = p.last_exit.unwrap();
    assert_eq!(e.reason, ExitReason::Crashed);
    assert_eq!(e.status, Some(spindle_types::ExitStatus::Code(3)));
    assert!(p.restart_in_ms.unwrap() > 4000, "now waiting the 5s step");
    // The log holds one start line per run, and the runs are spaced by the schedule.
    let log = std::fs::read_to_string(&p.log_out).unwrap();
    let starts: Vec<u128> = log
        .lines()
        .filter_map(|l| l.strip_prefix("start ")?.parse().ok())
        .collect();
    assert_eq!(starts.len(), 4);
    for (w, want) in starts.windows(2).zip([50u128, 100, 200]) {
        let gap_ms = (w[1] - w[0]) / 1_000_000;
        assert!(gap_ms >= want, "gap {gap_ms}ms < schedule {want}ms");
    }
    // Killing it during backoff cancels the pending restart.
    n.ok(&["stop", "crasher"]);
    assert_eq!(n.get(1).state, StateLabel::Stopped);
}

/// Starts `fork-tree` as "forker" (process 1) and returns its four pids
/// (main, child, setsid grandchild, double-forked daemon).
fn start_forker(n: &Node) -> Vec<i32> {
    let pidfile = n.dir.path().join("pids");
    n.ok(&[
        "start",
        "--name",
        "forker",
        "--",
        &testbin(),
        "fork-tree",
        pidfile.to_str().unwrap(),
    ]);
    until("four processes", || {
        let t = std::fs::read_to_string(&pidfile).unwrap_or_default();
        let pids: Vec<i32> = t
            .lines()
            .filter_map(|l| l.split_once(' ')?.1.parse().ok())
            .collect();
        (pids.len() == 4).then_some(pids)
    })
}

#[test]
fn stop_kills_the_whole_tree() {
    let n = Node::new();
    let pids = start_forker(&n);
    n.ok(&["stop", "forker"]);
    until("no survivors (plain, setsid, double-fork)", || {
        pids.iter().all(|p| !alive(*p)).then_some(())
    });
}

#[test]
fn daemon_kill_leaves_no_orphans_and_no_duplicates() {
    let n = Node::new();
    let tb = testbin();
    let pidfile = n.dir.path().join("pids");
    let first = start_forker(&n);
    n.ok(&["start", "--name", "plain", "--", &tb, "ignore-term"]);
    let plain = n.get(2).pid.unwrap() as i32;
    let tag = n.node_tag();
    let daemon = n.daemon_pid();
    // SAFETY: killing the daemon we started.
    unsafe { libc::kill(daemon, libc::SIGKILL) };
    until("daemon gone", || (!alive(daemon)).then_some(()));
    // Its direct children die with it.
    until("direct children gone", || {
        (!alive(plain) && !alive(first[0])).then_some(())
    });
    // The next daemon kills the detached leftovers and starts one fresh copy.
    std::fs::remove_file(&pidfile).unwrap();
    n.ok(&["ls"]);
    until("old tree gone", || {
        first.iter().all(|p| !alive(*p)).then_some(())
    });
    until("restarted", || {
        let l = n.list();
        (l.len() == 2 && l.iter().all(|p| p.state == StateLabel::Running)).then_some(())
    });
    until("exactly one copy of each", || {
        let t = std::fs::read_to_string(&pidfile).unwrap_or_default();
        let fresh = t.lines().count() == 4;
        // 4 from the forker tree, 1 plain.
        (fresh && tagged(&format!("{tag}.")).len() == 5).then_some(())
    });
}

#[test]
fn reboot_restarts_what_was_running() {
    let n = Node::new();
    let tb = testbin();
    n.ok(&["start", "--name", "keep", "--", &tb, "ignore-term"]);
    n.ok(&["start", "--name", "parked", "--", &tb, "ignore-term"]);
    n.ok(&[
        "start",
        "--name",
        "once",
        "--on-exit",
        "none",
        "--",
        &tb,
        "ignore-term",
    ]);
    n.ok(&["stop", "parked"]);
    let out = n.ok(&["daemon", "stop"]);
    assert!(out.contains("stopped"), "{out}");
    assert!(n.ok(&["daemon", "status"]).contains("not running"));
    assert!(tagged(&format!("{}.", n.node_tag())).is_empty(), "all down");
    n.ok(&["ls"]); // starts a new daemon
    let list = n.list();
    let by_name = |name: &str| {
        list.iter()
            .find(|p| p.name.as_deref() == Some(name))
            .unwrap()
            .clone()
    };
    assert_ne!(by_name("keep").state, StateLabel::Stopped);
    assert_eq!(by_name("parked").state, StateLabel::Stopped);
    assert_eq!(by_name("once").state, StateLabel::Stopped);
    assert!(n.ok(&["daemon", "status"]).contains("daemon running"));
}

#[test]
fn logs_show_history_and_follow_live_lines() {
    let n = Node::new();
    let tb = testbin();
    n.ok(&[
        "start", "--name", "talker", "--", &tb, "print", "first", "second",
    ]);
    let p = until("lines written", || {
        let p = n.get(1);
        (std::fs::read_to_string(&p.log_err)
            .unwrap_or_default()
            .lines()
            .count()
            == 2)
            .then_some(p)
    });
    assert_ne!(p.log_out, p.log_err, "separate files by default");
    let out = n.ok(&["logs", "talker", "--lines", "1", "--out"]);
    assert_eq!(out, "second\n");
    let err = n.ok(&["logs", "talker", "--err"]);
    assert_eq!(err, "err:first\nerr:second\n");

    let mut follower = Command::new(spindle_bin())
        .arg("--home")
        .arg(n.home())
        .args(["logs", "talker", "--follow", "--lines", "0", "--out"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    // Restart until the follower has seen a fresh run's first line (it may
    // subscribe after the first restart's output).
    let seen = until("a live line", || {
        n.ok(&["restart", "talker"]);
        rx.recv_timeout(Duration::from_millis(500)).ok()
    });
    assert_eq!(seen, "first");
    follower.kill().unwrap();
    follower.wait().unwrap();
}

#[test]
fn bad_clients_get_clear_errors_and_the_daemon_survives() {
    use std::io::{BufRead, BufReader, Write};
    let n = Node::new();
    n.ok(&["ls"]);
    let sock = n.home().join("spindle.sock");
    let talk = |lines: &[&str]| -> Vec<String> {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        for l in lines {
            s.write_all(l.as_bytes()).unwrap();
            s.write_all(b"\n").unwrap();
        }
        let mut r = BufReader::new(s);
        let mut out = vec![];
        for _ in lines {
            let mut buf = String::new();
            if r.read_line(&mut buf).unwrap() == 0 {
                break;
            }
            out.push(buf);
        }
        out
    };
    let r = talk(&[r#"{"op":"hello","protocol":999,"version":"9.9.9"}"#]);
    assert!(
        r[0].contains("version_mismatch") && r[0].contains("protocol 999"),
        "{r:?}"
    );
    let r = talk(&[r#"{"op":"list"}"#]);
    assert!(r[0].contains("hello first"), "{r:?}");
    let r = talk(&[
        r#"{"op":"hello","protocol":1,"version":"x"}"#,
        "this is not json",
    ]);
    assert!(
        r[1].contains("bad_request") && r[1].contains("unreadable"),
        "{r:?}"
    );
    // An oversized frame ends that connection with a clear error, nothing more.
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let big = vec![b'x'; spindle_types::control::MAX_FRAME + 10];
    let _ = s.write_all(&big);
    let mut answer = String::new();
    let _ = BufReader::new(&s).read_line(&mut answer);
    assert!(answer.contains("control frame over"), "{answer:?}");
    assert!(n.ok(&["daemon", "status"]).contains("daemon running"));
    let e = n.fails(&["stop", "12abc!"]);
    assert!(e.contains("12abc!"), "{e}");
    let e = n.fails(&["start", "--grace", "later", "--", "true"]);
    assert!(e.contains("--grace"), "{e}");
    let e = n.fails(&["start"]);
    assert!(e.contains("nothing to start"), "{e}");
}

#[test]
fn memory_cap_restarts_the_process_as_crashed() {
    let n = Node::new();
    let tb = testbin();
    n.ok(&[
        "start",
        "--name",
        "hog",
        "--max-memory",
        "16MiB",
        "--",
        &tb,
        "memory",
        "64",
    ]);
    let p = until("the cap to trip", || {
        let p = n.get(1);
        p.last_exit
            .clone()
            .filter(|_| p.restarts >= 1)
            .map(|e| (p, e))
    });
    assert_eq!(p.1.reason, ExitReason::Crashed);
    assert!(
        p.1.detail
            .unwrap()
            .contains("memory limit 16.0MiB exceeded")
    );
}

#[test]
fn two_writers_into_one_file_never_tear() {
    let n = Node::new();
    let tb = testbin();
    let log = n.dir.path().join("merged.log");
    const LINES: usize = 50_000;
    for tag in ["a", "b"] {
        n.ok(&[
            "start",
            "--name",
            tag,
            "--log",
            log.to_str().unwrap(),
            "--on-exit",
            "none",
            "--",
            &tb,
            "flood",
            tag,
            &LINES.to_string(),
            "100",
            "4096",
        ]);
    }
    until("all lines", || {
        (std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0) == (2 * LINES * 100) as u64)
            .then_some(())
    });
    let text = std::fs::read_to_string(&log).unwrap();
    let mut next = [0usize; 2];
    for line in text.lines() {
        assert_eq!(line.len(), 99, "torn line: {line:?}");
        let w = if line.starts_with("a ") { 0 } else { 1 };
        let seq: usize = line[2..10].parse().unwrap();
        assert_eq!(seq, next[w], "lost or reordered line");
        next[w] += 1;
    }
    assert_eq!(next, [LINES, LINES]);
}

#[test]
fn a_full_disk_is_reported_and_harms_nothing_else() {
    let n = Node::new();
    let tb = testbin();
    n.ok(&[
        "start",
        "--name",
        "full",
        "--log",
        "/dev/full",
        "--",
        &tb,
        "print",
        "x",
    ]);
    n.ok(&["start", "--name", "fine", "--", &tb, "print", "ok"]);
    until("the write error in the daemon log", || {
        let t = std::fs::read_to_string(n.home().join("daemon.log")).unwrap_or_default();
        (t.contains("/dev/full") && t.contains("No space left on device")).then_some(())
    });
    let fine = n.get(2);
    until("the healthy process logs", || {
        (std::fs::read_to_string(&fine.log_out).unwrap_or_default() == "ok\n").then_some(())
    });
    assert_eq!(
        n.get(1).state,
        StateLabel::Running,
        "the process is unharmed"
    );
    assert!(n.ok(&["daemon", "status"]).contains("daemon running"));
}

#[test]
fn wasm_counter_over_send_survives_crashes_and_daemon_restarts() {
    let n = Node::new();
    let counter = spindle_guests::path("counter");
    let out = n.ok(&[
        "start",
        counter.to_str().unwrap(),
        "--name",
        "counter",
        "--package",
        "demo:spindle",
    ]);
    assert!(
        out.contains("local@counter:demo:spindle"),
        "ls shows the address: {out}"
    );
    let addr = "local@counter:demo:spindle";
    assert_eq!(
        n.ok(&["send", addr, r#"{"add":5}"#]).trim(),
        r#"{"count":5}"#
    );
    assert_eq!(
        n.ok(&["send", addr, r#"{"add":2}"#]).trim(),
        r#"{"count":7}"#
    );
    // A crash: the requester hears at once that the target ended holding
    // its request (not a timeout later), the reason is in ls, and the
    // process restarts by its schedule.
    let asked = Instant::now();
    let e = n.fails(&["send", addr, r#""crash""#, "--timeout", "20s"]);
    assert!(e.contains("ended before it responded"), "{e}");
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "it waited for the timeout"
    );
    let p = until("restarted after the crash", || {
        let p = n.get(1);
        (p.restarts == 1 && p.state == StateLabel::Running).then_some(p)
    });
    let exit = p.last_exit.unwrap();
    assert_eq!(exit.reason, ExitReason::Crashed);
    assert!(exit.detail.unwrap().contains("asked to crash at count 7"));
    assert_eq!(n.ok(&["send", addr, r#""get""#]).trim(), r#"{"count":7}"#);
    // A daemon restart: the count is still there.
    n.ok(&["daemon", "stop"]);
    assert_eq!(n.ok(&["send", addr, r#""get""#]).trim(), r#"{"count":7}"#);
    // Errors say what happened: no such process is not a timeout.
    let e = n.fails(&["send", "local@nobody:demo:spindle", "{}"]);
    assert!(e.contains("offline"), "{e}");
    let e = n.fails(&["send", "not-an-address", "{}"]);
    assert!(e.contains("node@process:package:publisher"), "{e}");
}

#[test]
fn capabilities_survive_a_daemon_kill() {
    let n = Node::new();
    let echo = spindle_guests::path("echo");
    let echo = echo.to_str().unwrap();
    for name in ["hub", "other"] {
        n.ok(&[
            "start",
            echo,
            "--name",
            name,
            "--package",
            "t:spindle",
            "--public",
        ]);
    }
    let hub = "local@hub:t:spindle";
    // The hub spawns a private child and so holds the capability to message it.
    let kid = n.ok(&["send", hub, "spawn kid"]).trim().to_string();
    assert_eq!(kid, "local@kid:t:spindle");
    let call = |from: &str, body: &str| {
        n.ok(&["send", from, &format!("call {kid} 5000 {body}")])
            .trim()
            .to_string()
    };
    assert_eq!(call(hub, "one"), "ok one");
    let denied = call("local@other:t:spindle", "x");
    assert!(denied.starts_with("err no-capability"), "{denied}");

    // kill -9 of the daemon: the capability comes back with the processes.
    let pid = n.daemon_pid();
    // SAFETY: signalling the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    until("the old daemon gone", || (!alive(pid)).then_some(()));
    n.ok(&["ls"]);
    until("all three running again", || {
        let l = n.list();
        (l.len() == 3 && l.iter().all(|p| p.state == StateLabel::Running)).then_some(())
    });
    assert_eq!(call(hub, "two"), "ok two");
    let denied = call("local@other:t:spindle", "x");
    assert!(denied.starts_with("err no-capability"), "{denied}");
    let rows: Vec<String> = records(&n.home())["capability"]
        .iter()
        .map(|(k, _)| k.clone())
        .collect();
    assert!(
        rows.iter()
            .any(|k| k.contains("hub:t:spindle") && k.contains("local@kid:t:spindle")),
        "{rows:?}"
    );

    // Deleting the child revokes what it issued: a new `kid` is not reachable
    // on the old grant.
    n.ok(&["delete", "kid"]);
    n.ok(&["start", echo, "--name", "kid", "--package", "t:spindle"]);
    assert!(call(hub, "three").starts_with("err no-capability"));
}

#[test]
fn a_node_service_is_on_the_bus_with_no_library() {
    let n = Node::new();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ipc-echo.js");
    let out = n.ok(&[
        "start",
        "--name",
        "api",
        "--package",
        "t:spindle",
        "--public",
        "--ipc",
        "--grace",
        "5s",
        "--",
        "node",
        script,
    ]);
    assert!(
        out.contains("local@api:t:spindle"),
        "ls shows the address: {out}"
    );
    let api = "local@api:t:spindle";
    until("node up", || {
        std::fs::read_to_string(&n.get(1).log_out)
            .unwrap_or_default()
            .contains("node: up as local@api:t:spindle")
            .then_some(())
    });
    assert_eq!(n.get(1).connected, Some(true), "ls shows it connected");
    // The operator asks Node.
    let got: serde_json::Value =
        serde_json::from_str(n.ok(&["send", api, r#"{"x":1}"#]).trim()).unwrap();
    assert_eq!(got["echo"], serde_json::json!({"x": 1}));
    assert!(got["from"].as_str().unwrap().ends_with(":sys:spindle"));
    // A wasm process asks Node, and Node asks the wasm process.
    let w = start_echo(&n, "w");
    let w = w.as_str();
    let got = n.ok(&["send", w, &format!("call {api} 5000 [1,2]")]);
    let (ok, json) = got.trim().split_once(' ').unwrap();
    assert_eq!(ok, "ok");
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(
        (v["echo"].clone(), v["from"].as_str()),
        (serde_json::json!([1, 2]), Some(w))
    );
    let got: serde_json::Value =
        serde_json::from_str(n.ok(&["send", api, &format!(r#"{{"ask":"{w}"}}"#)]).trim()).unwrap();
    assert_eq!(got, serde_json::json!({"got": "from node", "from": w}));
    // A graceful stop is a message it handles, well inside the grace.
    let t = Instant::now();
    n.ok(&["stop", "api"]);
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "stopped by message, not by the kill"
    );
    let log = std::fs::read_to_string(&n.get(1).log_out).unwrap();
    assert!(log.contains("node: stopping cleanly"), "{log}");
    assert_eq!(n.get(1).connected, Some(false));
    assert_eq!(n.get(2).connected, None, "a wasm process has no channel");
    let e = n.fails(&["send", api, "{}"]);
    assert!(e.contains("offline"), "{e}");
}

/// Starts `command` as a public process on the bus named `name`, waits
/// for its log to say `up`, and returns its address.
fn start_on_bus(n: &Node, name: &str, extra: &[&str], command: &[&str], up: &str) -> String {
    let mut flags = vec!["--public"];
    flags.extend_from_slice(extra);
    n.on_bus(name, &flags, command, up)
}

/// Starts the echo guest as a public process `name` of package `t:spindle`;
/// returns its address.
fn start_echo(n: &Node, name: &str) -> String {
    let echo = spindle_guests::path("echo");
    n.ok(&[
        "start",
        echo.to_str().unwrap(),
        "--name",
        name,
        "--package",
        "t:spindle",
        "--public",
    ]);
    format!("local@{name}:t:spindle")
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn send_json(n: &Node, to: &str, body: &str) -> serde_json::Value {
    serde_json::from_str(n.ok(&["send", to, body]).trim()).unwrap()
}

#[test]
fn client_libraries_for_node_and_python() {
    let n = Node::new();
    let w = start_echo(&n, "w");
    let w = w.as_str();
    let js = fixture("ipc-client.js");
    let py = fixture("ipc-client.py");
    let aio = fixture("ipc-client-async.py");
    let nc = start_on_bus(
        &n,
        "nc",
        &["--heartbeat", "1s"],
        &["node", &js],
        "client: up",
    );
    let pc = start_on_bus(&n, "pc", &[], &["python3", &py], "python: up");
    let ac = start_on_bus(&n, "ac", &[], &["python3", &aio], "asyncio: up");
    for (svc, said) in [
        (&nc, "via client"),
        (&pc, "from python"),
        (&ac, "from asyncio"),
    ] {
        // Each asks the wasm process and answers with what it got.
        let got = send_json(&n, svc, &format!(r#"{{"ask":"{w}"}}"#));
        assert_eq!(got, serde_json::json!({"got": said, "from": w}), "{svc}");
    }
    assert_eq!(
        send_json(&n, &pc, r#"{"x":1}"#),
        serde_json::json!({"py": {"x": 1}})
    );
    assert_eq!(send_json(&n, &ac, "[7]"), serde_json::json!({"aio": [7]}));
    // The asyncio client spawns a wasm child and talks to it.
    let echo = n.ship("echo");
    let spawn = serde_json::json!({"spawn": echo, "name": "aiokid"}).to_string();
    assert_eq!(
        send_json(&n, &ac, &spawn),
        serde_json::json!({"child": "local@aiokid:t:spindle", "got": "hello child"})
    );
    assert_eq!(
        send_json(&n, &nc, r#""early""#),
        serde_json::json!("answered early")
    );
    // Failures come back as their kind, not as a timeout.
    let got = send_json(&n, &nc, r#"{"missing":"local@ghost:t:spindle"}"#);
    assert_eq!(got, serde_json::json!({"kind": "offline"}));
    let got = send_json(&n, &pc, r#"{"ask":"local@ghost:t:spindle"}"#);
    assert_eq!(got, serde_json::json!({"kind": "offline"}));

    // The Node client's heartbeats keep its watchdog (1s) quiet…
    let nc_id = n.id_of("nc");
    until("3 heartbeat periods of uptime", || {
        let p = n.get(nc_id.0);
        (p.uptime_ms.unwrap_or(0) >= 3000).then_some(p)
    });
    assert_eq!(n.get(nc_id.0).restarts, 0);
    // …until its event loop hangs: then it is killed and restarted as crashed.
    assert_eq!(n.ok(&["send", &nc, r#""hang""#]).trim(), r#""hanging""#);
    let p = until("restarted after the hang", || {
        let p = n.get(nc_id.0);
        (p.restarts == 1).then_some(p)
    });
    let exit = p.last_exit.unwrap();
    assert_eq!(exit.reason, ExitReason::Crashed);
    assert!(exit.detail.unwrap().contains("heartbeat lost"));

    // Python stops by message too.
    n.ok(&["stop", "pc", "ac"]);
    for (name, said) in [
        ("pc", "python: stopping cleanly"),
        ("ac", "asyncio: stopping cleanly"),
    ] {
        let id = n.id_of(name);
        let log = std::fs::read_to_string(&n.get(id.0).log_out).unwrap();
        assert!(log.contains(said), "{log}");
    }
}

#[test]
fn a_native_rust_process_uses_the_same_api_as_wasm() {
    let n = Node::new();
    let w = start_echo(&n, "w");
    let w = w.as_str();
    let exe = spindle_guests::native("native-echo");
    let ne = start_on_bus(&n, "ne", &[], &[exe.to_str().unwrap()], "native-echo: up");
    assert_eq!(n.ok(&["send", &ne, "hello"]).trim(), "hello");
    // Native → wasm and wasm → native, with the same calls on both sides.
    assert_eq!(
        n.ok(&["send", &ne, &format!("call {w} 2000 hi")]).trim(),
        "ok hi"
    );
    assert_eq!(
        n.ok(&["send", w, &format!("call {ne} 2000 yo")]).trim(),
        "ok yo"
    );
    assert_eq!(
        n.ok(&["send", &ne, "call local@ghost:t:spindle 2000 x"])
            .trim(),
        "err offline"
    );
    // A 3 MiB blob goes out raw, through the wasm process untouched, and back.
    let trip = n.ok(&["send", &ne, &format!("blobtrip {w} 3145728")]);
    assert!(trip.starts_with("ok 3145728 in "), "{trip}");
    // Durable state survives a restart.
    assert_eq!(
        n.ok(&["send", &ne, "save kept across runs"]).trim(),
        "saved"
    );
    n.ok(&["restart", "ne"]);
    until("up again", || {
        let p = n
            .list()
            .into_iter()
            .find(|p| p.name.as_deref() == Some("ne"))?;
        (p.state == StateLabel::Running && p.connected == Some(true)).then_some(())
    });
    until("answering again", || {
        let out = n.run(&["send", &ne, "load", "--timeout", "500ms"]);
        (String::from_utf8_lossy(&out.stdout).trim() == "kept across runs").then_some(())
    });
    n.ok(&["stop", "ne"]);
    let id = n.id_of("ne");
    let log = std::fs::read_to_string(&n.get(id.0).log_out).unwrap();
    assert!(log.contains("native-echo: stopping cleanly"), "{log}");
}

#[test]
fn capabilities_and_spawn_over_the_channel_as_for_wasm() {
    let n = Node::new();
    let echo = n.ship("echo");
    let exe = spindle_guests::native("native-echo");
    let ne = start_on_bus(&n, "ne", &[], &[exe.to_str().unwrap()], "native-echo: up");
    let js = fixture("ipc-client.js");
    let nc = start_on_bus(&n, "nc", &[], &["node", &js], "client: up");
    let py = fixture("ipc-client.py");
    let pc = start_on_bus(&n, "pc", &[], &["python3", &py], "python: up");

    // A native Rust process spawns a private wasm child; it may message it.
    let kid = n.ok(&["send", &ne, &format!("spawn kid {echo}")]);
    let kid = kid.trim();
    assert_eq!(kid, "local@kid:t:spindle");
    let talk = format!("{kid} \"messaging\"");
    assert!(n.ok(&["send", &ne, "caps"]).contains(&talk));
    assert_eq!(
        n.ok(&["send", &ne, &format!("call {kid} 2000 hi")]).trim(),
        "ok hi"
    );
    // Nobody else may, as for a wasm process's private child.
    let ask = format!(r#"{{"ask":"{kid}"}}"#);
    assert_eq!(
        send_json(&n, &nc, &format!(r#"{{"missing":"{kid}"}}"#)),
        serde_json::json!({"kind": "no-capability"})
    );
    // Rust attaches the right to a request to Node, which keeps it…
    let got = n.ok(&["send", &ne, &format!("grant {kid} {nc}")]);
    assert_eq!(got.trim(), r#"{"held":1}"#);
    assert_eq!(
        send_json(&n, &nc, &ask),
        serde_json::json!({"got": "via client", "from": kid})
    );
    // …and hands it on to Python, which keeps it too.
    let pass = |what: &str| format!(r#"{{"pass":"{what}","to":"{pc}"}}"#);
    assert_eq!(
        send_json(&n, &nc, &pass(kid)),
        serde_json::json!({"held": 1})
    );
    assert_eq!(
        send_json(&n, &pc, &ask),
        serde_json::json!({"got": "from python", "from": kid})
    );
    let held = send_json(&n, &pc, r#""caps""#);
    assert_eq!(
        held,
        serde_json::json!([{"issuer": kid, "params": "\"messaging\""}])
    );
    // A right Node does not hold cannot be attached: refused, not delivered.
    assert_eq!(
        send_json(&n, &nc, &pass("local@vault:t:spindle")),
        serde_json::json!({"kind": "invalid"})
    );
    // Given up, it is gone.
    assert_eq!(
        n.ok(&["send", &ne, &format!("drop {kid}")]).trim(),
        "dropped"
    );
    assert!(!n.ok(&["send", &ne, "caps"]).contains(&talk));
    assert_eq!(
        n.ok(&["send", &ne, &format!("call {kid} 2000 hi")]).trim(),
        "err no-capability"
    );
    // A bad component is a clear error to the caller; nothing starts.
    n.write("junk.wasm", "not wasm");
    let got = n.ok(&["send", &ne, "spawn junk junk.wasm"]);
    assert!(
        got.contains("junk.wasm") && got.contains("not a valid WebAssembly component"),
        "{got}"
    );
    // Only components inside the process's own folder: no absolute path,
    // no `..`, and never a word of a file's contents in the error.
    let outside = spindle_guests::path("echo");
    let got = n.ok(&["send", &ne, &format!("spawn abs {}", outside.display())]);
    assert!(got.contains("absolute"), "{got}");
    let got = n.ok(&["send", &ne, "spawn up ../echo.wasm"]);
    assert!(got.contains("leaves the parent's folder"), "{got}");
    n.write("secret.wasm", "root:x:0:0:root:/root:/bin/bash");
    let got = n.ok(&["send", &ne, "spawn peek secret.wasm"]);
    assert!(got.contains("not a WebAssembly file"), "{got}");
    assert!(!got.contains("root") && !got.contains("0x72"), "{got}");
    for name in ["abs", "up", "peek"] {
        assert!(!n.list().iter().any(|p| p.name.as_deref() == Some(name)));
    }
    assert!(!n.list().iter().any(|p| p.name.as_deref() == Some("junk")));
}

#[test]
fn bad_components_start_nothing() {
    let n = Node::new();
    let junk = n.write("junk.wasm", "not wasm at all");
    let e = n.fails(&["start", junk.to_str().unwrap()]);
    assert!(
        e.contains("junk.wasm") && e.contains("not a valid WebAssembly component"),
        "{e}"
    );
    // Past the magic number the daemon's compile helper judges it: the same
    // clear error, and the helper leaves nothing behind — no child of the
    // daemon, no half-written artifact.
    let bad = n.write(
        "bad.wasm",
        "\0asm\x0d\0\x01\0 and then nothing a parser accepts",
    );
    let e = n.fails(&["start", bad.to_str().unwrap()]);
    assert!(
        e.contains("bad.wasm") && e.contains("not a valid WebAssembly component"),
        "{e}"
    );
    let daemon = n.daemon_pid();
    let children = || {
        std::fs::read_dir(format!("/proc/{daemon}/task"))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("children")).ok())
            .collect::<String>()
    };
    assert_eq!(children().trim(), "", "the helper is gone");
    let counter = spindle_guests::path("counter");
    n.ok(&["start", counter.to_str().unwrap(), "--name", "c"]);
    // The artifact is whole and the daemon runs it.
    let cache: Vec<String> = std::fs::read_dir(n.home().join("cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        cache.len() == 1 && cache[0].ends_with(".cwasm"),
        "{cache:?}"
    );
    assert_eq!(children().trim(), "", "the helper is gone");
    let e = n.fails(&["start", counter.to_str().unwrap(), "--name", "c"]);
    assert!(e.contains("already used"), "{e}");
    assert_eq!(n.list().len(), 1);
}

#[test]
fn parent_runs_jobs_in_workers_and_retries_crashed_ones() {
    let n = Node::new();
    let parent = spindle_guests::path("parent");
    n.ok(&[
        "start",
        parent.to_str().unwrap(),
        "--name",
        "parent",
        "--package",
        "demo:spindle",
        "--public",
    ]);
    let addr = "local@parent:demo:spindle";
    assert_eq!(
        n.ok(&["send", addr, r#"{"job":{"id":1,"input":7}}"#])
            .trim(),
        r#"{"accepted":1}"#
    );
    // A negative input crashes the first worker; the parent retries from its state.
    n.ok(&["send", addr, r#"{"job":{"id":2,"input":-3}}"#]);
    for (id, want) in [(1, r#"{"result":49}"#), (2, r#"{"result":9}"#)] {
        until("the job's result", || {
            let got = n.ok(&["send", addr, &format!(r#"{{"result":{id}}}"#)]);
            (got.trim() == want).then_some(())
        });
    }
    // The crash was reported with its reason in the parent's log.
    let log = std::fs::read_to_string(&n.get(1).log_out).unwrap();
    assert!(
        log.contains("job 2: worker crashed, retrying (attempt 2)"),
        "{log}"
    );
    // Workers are transactions: gone from the table once done.
    until("workers gone", || (n.list().len() == 1).then_some(()));
}

#[test]
fn stopping_a_wasm_process_runs_its_on_stopping_hook() {
    let n = Node::new();
    let echo = spindle_guests::path("echo");
    n.ok(&[
        "start",
        echo.to_str().unwrap(),
        "--name",
        "echo",
        "--grace",
        "5s",
    ]);
    until("running", || {
        (n.get(1).state == StateLabel::Running).then_some(())
    });
    let t = Instant::now();
    n.ok(&["stop", "echo"]);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "it left on the message, not at the kill"
    );
    let p = n.get(1);
    assert_eq!(p.last_exit.unwrap().reason, ExitReason::Killed);
    let log = std::fs::read_to_string(&p.log_out).unwrap();
    assert!(log.contains("echo: stopping cleanly"), "{log}");
}

#[test]
fn a_home_of_an_earlier_version_is_imported_once_and_keeps_running() {
    let n = Node::new();
    let home = n.home();
    std::fs::create_dir_all(&home).unwrap();
    let tag = format!("import{}", std::process::id());
    let table = serde_json::json!({
        "version": 1, "node_tag": tag, "next_num": 8,
        "processes": [{
            "num": 7,
            "spec": {
                "name": "old", "program": { "native": { "command": "sleep", "args": ["1000"], "cwd": "/",
                    "ipc": { "package": "demo:spindle", "public": false } } },
                "env": {}, "log": { "out": null, "err": null, "strip_ansi": false, "timestamps": false, "max_size": 67108864, "keep": 3 },
                "restart": { "delays": [100], "ok": 1800000 }, "on_exit": "restart", "grace": 200,
                "stop_signal": "SIGTERM", "max_memory": null
            },
            "desired": "running", "restarts": 2, "last_exit": null
        }]
    });
    std::fs::write(home.join("table.json"), table.to_string()).unwrap();
    let caps = r#"{"version": 1, "holders": [{"process": "old:demo:spindle", "capabilities": [{"issuer": "local@old:demo:spindle", "params": "\"messaging\""}]}]}"#;
    std::fs::write(home.join("capabilities.json"), caps).unwrap();

    n.ok(&["ls"]);
    until("the imported process running", || {
        n.list().into_iter().find(|p| {
            p.id == spindle_types::ProcessNum(7)
                && p.state == StateLabel::Running
                && p.restarts == 2
        })
    });
    assert_eq!(
        n.node_tag(),
        tag,
        "the node keeps its tag (leftovers stay findable)"
    );
    assert!(!home.join("table.json").exists());
    assert!(
        home.join("table.json.imported").exists(),
        "the old file is kept"
    );
    assert!(home.join("capabilities.json.imported").exists());
    let rows = records(&home);
    assert_eq!(rows["capability"].len(), 1, "{rows:?}");
    // A later process gets a fresh id, after the imported ones.
    n.ok(&["start", "--name", "new", "--", "sleep", "1000"]);
    assert_eq!(n.id_of("new"), spindle_types::ProcessNum(8));
    n.ok(&["daemon", "stop"]);
    // A capabilities file found again later is not imported a second time.
    let other = r#"{"version": 1, "holders": [{"process": "old:demo:spindle", "capabilities": [{"issuer": "local@old:demo:spindle", "params": "\"other\""}]}]}"#;
    std::fs::write(home.join("capabilities.json"), other).unwrap();
    n.ok(&["ls"]);
    assert!(!home.join("capabilities.json").exists());
    assert_eq!(records(&home)["capability"].len(), 1, "imported twice");
    n.ok(&["daemon", "stop"]);
}

#[test]
fn spawns_acknowledged_before_they_are_durable_come_back_whole_or_not_at_all() {
    let n = Node::new();
    let echo = spindle_guests::path("echo");
    let echo = echo.to_str().unwrap();
    n.ok(&[
        "start",
        echo,
        "--name",
        "hub",
        "--package",
        "t:spindle",
        "--public",
    ]);
    let hub = "local@hub:t:spindle";
    let mut c = n.client();
    const KIDS: usize = 40;
    for i in 0..KIDS {
        let kid = c
            .send(
                hub,
                &format!("spawn kid{i}"),
                std::time::Duration::from_secs(10),
            )
            .unwrap();
        assert_eq!(kid.trim(), format!("local@kid{i}:t:spindle"));
    }
    // Killed right after the last answer: the latest spawns may not be on
    // disk yet (they were acknowledged within the journal's window).
    let pid = n.daemon_pid();
    // SAFETY: signalling the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    until("the old daemon gone", || (!alive(pid)).then_some(()));
    n.ok(&["ls"]);
    let rows = records(&n.home());
    let names: std::collections::BTreeSet<String> = rows["process"]
        .iter()
        .filter_map(|(_, v)| {
            let p: serde_json::Value = serde_json::from_slice(v).unwrap();
            p["spec"]["name"].as_str().map(str::to_string)
        })
        .filter(|n| n.starts_with("kid"))
        .collect();
    let held: std::collections::BTreeSet<String> = rows
        .get("capability")
        .into_iter()
        .flatten()
        .filter_map(|(k, _)| {
            let (holder, issuer, _): (String, String, String) = serde_json::from_str(k).unwrap();
            let kid = issuer.strip_prefix("local@")?.strip_suffix(":t:spindle")?;
            (holder == "hub:t:spindle" && kid.starts_with("kid")).then(|| kid.to_string())
        })
        .collect();
    // Every child on disk has the capability that came with it, and no
    // capability outlives a child that is not there.
    assert_eq!(names, held, "children and their capabilities differ");
    assert!(!names.is_empty(), "none of {KIDS} children was on disk");
    until("every child back", || {
        let l = n.list();
        let running = l
            .iter()
            .filter(|p| p.name.as_deref().is_some_and(|x| names.contains(x)))
            .filter(|p| p.state == StateLabel::Running)
            .count();
        (running == names.len()).then_some(())
    });
}

#[test]
fn transient_children_leave_nothing_on_disk_and_nothing_to_a_namesake() {
    let n = Node::new();
    let spawner = spindle_guests::path("spawner");
    let spawner = spawner.to_str().unwrap();
    n.ok(&[
        "start",
        spawner,
        "--name",
        "boss",
        "--package",
        "t:spindle",
        "--public",
    ]);
    let boss = "local@boss:t:spindle";
    let mut c = n.client();
    // Idle children (they stay, and never restart), then quick ones (they
    // answer once and end).
    for ask in [r#"{"idle": 20}"#, r#"{"transactions": 20}"#] {
        let answer: serde_json::Value =
            serde_json::from_str(&c.send(boss, ask, Duration::from_secs(30)).unwrap()).unwrap();
        assert_eq!(answer["n"], 20, "{ask}: {answer}");
    }
    // What is on disk once the daemon has stopped: the parent, and none of
    // its children or their rights.
    n.ok(&["daemon", "stop"]);
    let rows = records(&n.home());
    let child = |s: &str| s.contains("idle-") || s.contains("quick-");
    let rows_of_children: Vec<&String> = rows
        .get("capability")
        .into_iter()
        .flatten()
        .map(|(k, _)| k)
        .filter(|k| child(k))
        .collect();
    assert!(
        rows_of_children.is_empty(),
        "rights of transient children were written: {rows_of_children:?}"
    );
    let processes: Vec<String> = rows["process"]
        .iter()
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .collect();
    assert_eq!(processes.len(), 1, "{processes:?}");
    // A durable process of a child's name, after the reboot, holds nothing
    // and nobody holds a right to it.
    n.ok(&[
        "start",
        spawner,
        "--name",
        "idle-1",
        "--package",
        "t:spindle",
    ]);
    until("idle-1 running", || {
        n.list()
            .iter()
            .any(|p| p.name.as_deref() == Some("idle-1") && p.state == StateLabel::Running)
            .then_some(())
    });
    n.ok(&["daemon", "stop"]);
    let rows = records(&n.home());
    let naming_it: Vec<&String> = rows
        .get("capability")
        .into_iter()
        .flatten()
        .map(|(k, _)| k)
        .filter(|k| k.contains("idle-1"))
        .collect();
    assert!(naming_it.is_empty(), "{naming_it:?}");
}

#[test]
#[ignore = "needs root: mounts a 200 KiB tmpfs as the cache (.ci/run runs it with --ignored)"]
fn a_cache_that_cannot_be_written_still_runs_the_component() {
    let n = Node::new();
    let cache = n.home().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let _disk = spindle_store::testing::TinyDisk::mount(&cache, "size=200k")
        .expect("mount -t tmpfs (needs root)");
    // The counter's artifact (about 560 KiB) does not fit: it runs from
    // memory, and the full disk keeps no half of it.
    let counter = spindle_guests::path("counter");
    n.ok(&[
        "start",
        counter.to_str().unwrap(),
        "--name",
        "c",
        "--package",
        "t:spindle",
    ]);
    assert_eq!(
        n.ok(&["send", "local@c:t:spindle", r#"{"add":5}"#]).trim(),
        r#"{"count":5}"#
    );
    let left: Vec<_> = std::fs::read_dir(&cache).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
    n.ok(&["daemon", "stop"]);
}
