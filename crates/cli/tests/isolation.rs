//! One process can never hurt another: a hostile guest (written against
//! the public guest library only) tries each way in, through the real
//! daemon, and each is refused or bounded — while other processes go on
//! answering and the daemon stops cleanly at the end.

mod common;

use common::*;
use std::process::{Command, Stdio};

fn send(n: &Node, to: &str, body: &str) -> String {
    n.ok(&["send", to, body, "--timeout", "60s"])
        .trim()
        .to_string()
}

/// Runs the CLI and waits for it within the helpers' deadline: a command
/// that hangs fails the test.
fn returns(n: &Node, args: &[&str]) -> std::process::ExitStatus {
    let mut child = Command::new(spindle_bin())
        .arg("--home")
        .arg(n.home())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    until("the command returns", || child.try_wait().unwrap())
}

fn threads_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the daemon's threads in /proc")
        .count()
}

/// Starts a copy of `guest` (shipped into the test's folder) as a public
/// process of `package`.
fn start(n: &Node, guest: &str, name: &str, package: &str) -> String {
    let file = n.ship(guest);
    n.ok(&[
        "start",
        &file,
        "--name",
        name,
        "--package",
        package,
        "--public",
    ]);
    let addr = format!("local@{name}:{package}");
    until("it answers", || {
        let out = n.run(&["send", &addr, "ping", "--timeout", "1s"]);
        out.status.success().then_some(())
    });
    addr
}

#[test]
fn a_hostile_process_is_refused_or_bounded_and_hurts_nobody() {
    let n = Node::new();
    let evil = start(&n, "hostile", "evil", "evil:test");
    let victim = start(&n, "echo", "victim", "good:test");
    let pid = n.client().status().unwrap().pid;

    // Another package's database, made by the operator.
    let made = n.ok(&[
        "send",
        "local@sqlite:sys:spindle",
        r#"{"op":"write","db":"vault","package":"good:test","sql":"CREATE TABLE t (x)"}"#,
    ]);
    assert!(!made.contains("error"), "{made}");
    n.ok(&[
        "send",
        "local@sqlite:sys:spindle",
        r#"{"op":"write","db":"vault","package":"good:test","sql":"INSERT INTO t VALUES ('gold')"}"#,
    ]);
    let vault = n.home().join("db/sqlite/good:test/vault.sqlite");
    assert!(vault.exists());

    // SQL reaches only its own database, and only as one statement.
    assert_eq!(
        send(&n, &evil, &format!("attach {}", vault.display())),
        "refused refused"
    );
    assert_eq!(send(&n, &evil, "commit"), "refused");
    // A hostile parameter is a bad request, not a panic of the daemon.
    assert_eq!(send(&n, &evil, "blob-range"), "bad-request");
    assert_eq!(send(&n, &evil, "ping"), "pong");
    let dump = n.ok(&["db", "dump", "good:test", "vault"]);
    assert!(dump.contains("'gold'") && !dump.contains("y2"), "{dump}");

    // A flood of large messages to a busy process is held back by its
    // mailbox's budget; the daemon does not grow with it.
    // (The victim sleeps through the flood; this send's own wait ends at once.)
    let _ = n.run(&["send", &victim, "sleep 10000", "--timeout", "1ms"]);
    let flood = send(&n, &evil, &format!("flood {victim} 16 8388608"));
    let sent: usize = flood.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(sent <= 8, "{flood}: more than the mailbox's 64 MiB queued");
    assert!(
        flood.ends_with(&format!("refused {}", 16 - sent)),
        "{flood}"
    );
    let rss = n
        .client()
        .status()
        .unwrap()
        .rss_bytes
        .expect("the daemon reports its RSS");
    assert!(rss < 400 << 20, "daemon RSS {} MiB", rss >> 20);

    // Databases cost handles, bounded, and no threads of their own.
    let before = threads_of(pid);
    assert_eq!(send(&n, &evil, "dbs 300"), "opened 300");
    let grew = threads_of(pid).saturating_sub(before);
    assert!(grew <= 8, "{grew} more threads for 300 databases");

    // Spawn stays inside the package's folder and never shows a file.
    let abs = send(&n, &evil, "spawn-path /etc/passwd");
    assert!(
        abs.starts_with("refused") && abs.contains("absolute"),
        "{abs}"
    );
    assert!(!abs.contains("root") && !abs.contains("0x72"), "{abs}");
    let up = send(&n, &evil, "spawn-path ../echo.wasm");
    assert!(up.contains("leaves the parent's folder"), "{up}");
    n.write("notes.wasm", "root:x:0:0:root:/root:/bin/bash");
    let junk = send(&n, &evil, "spawn-path notes.wasm");
    assert!(junk.contains("not a WebAssembly file"), "{junk}");
    assert!(!junk.contains("root:x") && !junk.contains("0x72"), "{junk}");
    // A FIFO would block whoever reads it: it is not a component.
    let fifo = n.dir.path().join("pipe.wasm");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let pipe = send(&n, &evil, "spawn-path pipe.wasm");
    assert!(pipe.contains("not a regular file"), "{pipe}");
    assert_eq!(send(&n, &victim, "after the pipe"), "after the pipe");

    // A spawn loop stops at the parent's budget, and the operator (and
    // any other package) can still start processes.
    let many = send(&n, &evil, "spawn-many 1100");
    assert!(
        many.starts_with("spawned 1000 ") && many.contains("budget"),
        "{many}"
    );
    let other = start(&n, "echo", "late", "other:test");
    assert_eq!(send(&n, &other, "hi"), "hi");

    // A timeout at the very end of the range is a long wait, not a panic.
    assert_eq!(
        send(&n, &evil, &format!("await-forever {victim}")),
        "ok hello"
    );

    // Everyone else still answers.
    assert_eq!(send(&n, &victim, "still here"), "still here");
    assert_eq!(send(&n, &evil, "ping"), "pong");

    // And the daemon stops, children and all, within the helper's deadline.
    assert!(returns(&n, &["daemon", "stop"]).success());
    until("the daemon is gone", || (!alive(pid as i32)).then_some(()));
}

/// Budgets are set per process in the manifest; each bites at its value.
#[test]
fn budgets_come_from_the_manifest() {
    let n = Node::new();
    n.ship("hostile");
    n.ship("echo");
    let manifest = n.write(
        "app.toml",
        r#"
[[process]]
name = "few"
wasm = "hostile.wasm"
package = "evil:test"
public = true
max_children = 3

[[process]]
name = "small"
wasm = "echo.wasm"
package = "good:test"
public = true
mailbox_size = "1MiB"
"#,
    );
    n.ok(&["start", manifest.to_str().unwrap()]);
    let (few, small) = ("local@few:evil:test", "local@small:good:test");
    for a in [few, small] {
        until("it answers", || {
            n.run(&["send", a, "ping", "--timeout", "1s"])
                .status
                .success()
                .then_some(())
        });
    }
    let many = send(&n, few, "spawn-many 5");
    assert!(
        many.starts_with("spawned 3 ") && many.contains("max_children"),
        "{many}"
    );
    let _ = n.run(&["send", small, "sleep 10000", "--timeout", "1ms"]);
    let flood = send(&n, few, &format!("flood {small} 6 400000"));
    assert!(
        flood.starts_with("sent 2 "),
        "{flood}: a 1 MiB mailbox holds two"
    );
    // A budget beyond what the node allows is refused before anything starts.
    let bad = n.write(
        "bad.toml",
        "[[process]]\nwasm = \"echo.wasm\"\nmailbox_size = \"2GiB\"\n",
    );
    let e = n.fails(&["start", bad.to_str().unwrap()]);
    assert!(e.contains("mailbox_size"), "{e}");
}

/// A kill ends a wasm process at once, even one waiting in a host call that
/// never comes back to wasm (a minute-long sleep).
#[test]
fn a_sleeping_process_is_stopped_within_its_grace() {
    let n = Node::new();
    let sleeper = start(&n, "echo", "sleeper", "good:test");
    let _ = n.run(&["send", &sleeper, "sleep 60000", "--timeout", "1ms"]);
    // The helper's deadline (15 s) is far below the sleep.
    assert!(returns(&n, &["stop", "sleeper"]).success());
    let p = n.get(n.id_of("sleeper").0);
    assert_eq!(p.state, spindle_types::control::StateLabel::Stopped);
}

/// Every host import called with sizes, lengths and timeouts at or past
/// its limits is an error for the caller alone: the daemon holds no more
/// than the budgets allow, and everyone goes on answering.
#[test]
fn every_import_at_its_limits_is_an_error_for_the_caller_alone() {
    let n = Node::new();
    let evil = start(&n, "hostile", "evil", "evil:test");
    let victim = start(&n, "echo", "victim", "good:test");
    let out = send(&n, &evil, &format!("extremes {victim}"));
    let got: std::collections::HashMap<&str, &str> =
        out.split(';').filter_map(|kv| kv.split_once('=')).collect();
    let said = |k: &str| {
        *got.get(k)
            .unwrap_or_else(|| panic!("no {k} in {out:.2000}"))
    };
    // Nothing a process hands the node is echoed back at its size.
    assert!(out.len() < 8 << 10, "{} bytes of answers", out.len());
    assert_eq!(said("send-empty-target"), "invalid");
    assert_eq!(said("send-long-target"), "invalid");
    assert_eq!(said("send-forged-caps"), "invalid");
    // The host keeps the contexts of awaited requests: they are counted
    // (64 MiB), so 1 MiB contexts stop short of 64.
    let (kept, why) = said("await-contexts").split_once('/').unwrap();
    assert!(kept.parse::<usize>().unwrap() < 64, "{kept}");
    assert_eq!(why, "mailbox-full");
    assert_eq!(said("await-offline"), "offline");
    assert_eq!(said("room-garbage"), "false");
    assert!(said("state-over").contains("more than a process may keep"));
    assert_eq!(said("state-empty"), "ok");
    assert_eq!(said("state-read"), "Some(0)");
    assert!(said("spawn-long-name").contains("too long (102400 bytes"));
    assert!(said("spawn-long-path").contains("more than 1024"));
    assert!(said("spawn-forged-caps").contains("not an address"));
    assert!(said("spawn-many-grants").contains("at most 256"));
    // Forged capabilities cannot be saved.
    assert_eq!(said("caps-held"), "0");
    assert_eq!(said("print"), "ok");
    assert_eq!(send(&n, &victim, "still here"), "still here");
    assert_eq!(send(&n, &evil, "ping"), "pong");

    // Its own faults end it alone, with a bounded report: a 1 MiB panic
    // message is kept as a short exit detail (the log has it whole) ...
    let id = n.id_of("evil").0;
    let _ = n.run(&["send", &evil, "panic-huge", "--timeout", "5s"]);
    let exit = until("the crash is recorded", || n.get(id).last_exit);
    let detail = exit.detail.unwrap_or_default();
    assert!(
        detail.starts_with("pppp") && detail.len() < 8 << 10,
        "{}",
        detail.len()
    );
    // ... and an on-exit policy over its budget traps it, saying why.
    until("it is back", || {
        n.run(&["send", &evil, "ping", "--timeout", "1s"])
            .status
            .success()
            .then_some(())
    });
    let _ = n.run(&["send", &evil, "on-exit-flood", "--timeout", "5s"]);
    let exit = until("the trap is recorded", || {
        n.get(id)
            .last_exit
            .filter(|e| e.detail.as_deref().is_some_and(|d| d.contains("on-exit")))
    });
    assert!(
        exit.detail.unwrap().contains("1000 requests: at most 64"),
        "the trap names the budget"
    );
    assert_eq!(send(&n, &victim, "after"), "after");
}

#[test]
fn a_pool_size_that_is_no_number_stops_the_daemon_with_a_clear_error() {
    let n = Node::new();
    let out = Command::new(spindle_bin())
        .arg("--home")
        .arg(n.home())
        .arg("ls")
        .env("SPINDLE_WASM_PROCESSES", "lots")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    // The CLI says why, and where the daemon's log is.
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("SPINDLE_WASM_PROCESSES=lots is not a number of wasm processes"),
        "{said}"
    );
    assert!(said.contains("daemon.log"), "{said}");
    // Unset, the same home starts.
    n.ok(&["ls"]);
}

/// A pool slot goes from one process to the next with nothing of the first
/// in it: each process of the same component (the pool gives a component
/// back the slot it had) finds its static data, heap and stack as fresh as
/// the first did — however its memory was reset.
#[test]
fn a_process_finds_nothing_an_earlier_process_left_in_its_slot() {
    let n = Node::new();
    let file = n.ship("hostile");
    let addr = "local@heir:heirs:test";
    let mut found = Vec::new();
    for round in 0..4 {
        n.ok(&[
            "start",
            &file,
            "--name",
            "heir",
            "--package",
            "heirs:test",
            "--public",
        ]);
        until("it answers", || {
            let out = n.run(&["send", addr, "ping", "--timeout", "1s"]);
            out.status.success().then_some(())
        });
        found.push(send(&n, addr, "leftovers"));
        if round == 0 {
            // The check sees its own marks: it would see a predecessor's.
            let again = send(&n, addr, "leftovers");
            assert!(again.contains("static"), "{again}");
        }
        n.ok(&["delete", "heir"]);
    }
    assert!(found.iter().all(|f| f == "clean"), "{found:?}");
}
