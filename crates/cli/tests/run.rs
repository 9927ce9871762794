//! `spindle run`: the foreground mode, through the real binary.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

const APP: &str = r#"
[[process]]
name = "talker"
command = "sh"
args = ["-c", "echo hello; echo oops >&2; (sleep 0.2 &); exec sleep 1000"]
grace = "2s"

[[process]]
name = "quiet"
command = "sleep"
args = ["1000"]
"#;

/// Reads `child`'s stdout until `want` lines arrived (within the deadline).
fn lines(child: &mut Child, want: usize) -> Vec<String> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (0..want)
        .map(|_| rx.recv_timeout(DEADLINE).expect("a line in time"))
        .collect()
}

fn sigterm(pid: u32) {
    // SAFETY: kill with a pid this test started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
}

#[test]
fn run_prints_prefixed_lines_and_a_sigterm_stops_everything_with_exit_0() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("app.toml"), APP).unwrap();
    let mut child = Command::new(spindle_bin())
        .args(["run", "app.toml"])
        .current_dir(dir.path())
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut got = lines(&mut child, 2);
    got.sort();
    assert_eq!(got, ["talker | hello", "talker | oops"]);
    let pid = child.id();
    // Its private node's processes, by the node's tag.
    let tag = node_tag_of(&std::env::temp_dir().join(format!("spindle-run-{pid}")));
    let services = tagged(&tag);
    assert!(services.len() >= 2, "{services:?}");
    sigterm(pid);
    let status = until("run exits", || child.try_wait().unwrap());
    assert!(status.success(), "{status:?}");
    assert!(services.iter().all(|&p| !alive(p)), "a service survived");
    assert!(tagged(&tag).is_empty());
}

#[test]
fn a_manifest_that_cannot_start_exits_non_zero_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.toml"),
        "[[process]]\nname = \"a\"\ncommand = \"sleep\"\nargs = [\"1000\"]\n\n[[process]]\nname = \"b\"\ncommand = \"/nonexistent/program\"\n",
    )
    .unwrap();
    let out = Command::new(spindle_bin())
        .args(["run", "bad.toml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/program"), "{err}");
}

/// As PID 1 of a PID namespace (a container's entry point): orphans are
/// reaped, and SIGTERM stops everything with exit code 0.
#[test]
#[ignore = "needs root: unshare --pid --fork --mount-proc"]
fn as_pid_1_it_reaps_orphans_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("app.toml"), APP).unwrap();
    let mut child = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount-proc",
            spindle_bin(),
            "run",
            "app.toml",
        ])
        .current_dir(dir.path())
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .spawn()
        .expect("unshare runs");
    lines(&mut child, 2);
    // `spindle run` is unshare's child, PID 1 inside.
    let run = until("PID 1 of the namespace", || {
        let kids =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id())).ok()?;
        kids.split_whitespace().next()?.parse::<i32>().ok()
    });
    // The talker's orphaned `sleep 0.2` is reaped once it ends: no zombie
    // stays a child of PID 1.
    until("no zombie under PID 1", || {
        let kids =
            std::fs::read_to_string(format!("/proc/{run}/task/{run}/children")).unwrap_or_default();
        let zombies = kids
            .split_whitespace()
            .filter_map(|k| k.parse::<i32>().ok())
            .filter(|&k| {
                std::fs::read_to_string(format!("/proc/{k}/stat"))
                    .map(|s| {
                        s.rsplit_once(')')
                            .map(|(_, r)| r.trim_start().starts_with('Z'))
                    })
                    .ok()
                    .flatten()
                    .unwrap_or(false)
            })
            .count();
        let orphan_gone = !kids.split_whitespace().any(|k| {
            std::fs::read_to_string(format!("/proc/{k}/cmdline")).is_ok_and(|c| c.contains("0.2"))
        });
        (zombies == 0 && orphan_gone).then_some(())
    });
    sigterm(run as u32);
    let status = until("run exits", || child.try_wait().unwrap());
    assert!(status.success(), "{status:?}");
}
