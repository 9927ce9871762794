//! `spindle demo`, the README's main command, through the real binary: it
//! shows every part it names and leaves nothing behind.

mod common;

use common::*;
use std::process::Command;

#[test]
fn the_demo_shows_the_whole_system_and_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let mark = format!("SPINDLE_DEMO_TEST={}", std::process::id());
    let (key, value) = mark.split_once('=').unwrap();
    let out = Command::new(spindle_bin())
        .arg("demo")
        .env("TMPDIR", tmp.path())
        .env(key, value)
        .env_remove("SPINDLE_HOME")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // In order: the wasm round trip, its crash and the state it comes back
    // with, the jobs (one retried), the Node API with its events, the stop.
    let mut rest: &str = &said;
    for want in [
        "{\"count\":5}",
        "ended before it responded",
        "the node restarted it (restarts 1), last exit: crashed (trap): asked to crash at count 5",
        "{\"count\":5}",
        "{\"result\":49}",
        "{\"result\":9}",
        "{\"count\":6}",
        "started → exited (crashed 1) → restarting in 100 ms → stopped",
        "starting at 5",
        "both workers down",
    ] {
        let at = rest
            .find(want)
            .unwrap_or_else(|| panic!("no {want:?} after the earlier lines in:\n{said}"));
        rest = &rest[at + want.len()..];
    }
    assert_eq!(with_env(&mark), Vec::<i32>::new(), "left running:\n{said}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().collect();
    assert!(left.is_empty(), "left in TMPDIR: {left:?}");
}
