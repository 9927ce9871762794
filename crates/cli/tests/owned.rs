//! Owned mode through the Node API: an app that owns its node never leaves
//! a service behind, however it ends, and never gets a second set.
//! Real `node` and `python3`, the real daemon.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The services' grace in the owner fixture.
const GRACE: Duration = Duration::from_secs(5);

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Runs a Node fixture with `args`; its stdout is piped.
fn node(script: &str, args: &[&str]) -> Child {
    Command::new("node")
        .arg(fixture(script))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("node runs")
}

/// Runs a Python fixture with `args`; its stdout is piped.
fn python(script: &str, args: &[&str]) -> Owner {
    Owner(
        Command::new("python3")
            .arg(fixture(script))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs"),
    )
}

/// The first line `child` prints, as JSON, within the deadline.
fn first_line(child: &mut Child) -> serde_json::Value {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(DEADLINE * 2)
        .expect("the fixture printed its line in time");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

/// One set of the owner fixture's services, by program: what `tagged`
/// processes of one node must come to.
fn one_set() -> std::collections::BTreeMap<String, usize> {
    [
        ("owned-service.js", 1),
        ("owned-service.py", 1),
        ("sh", 1),
        ("sleep", 2),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The node's processes by program (a script's name for node and python).
fn programs(tag: &str) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    for pid in tagged(tag) {
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<String> = cmd
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let base = |s: &str| s.rsplit('/').next().unwrap_or_default().to_string();
        let exe = base(args.first().map(String::as_str).unwrap_or_default());
        let name = match exe.as_str() {
            e if e.starts_with("node") || e.starts_with("python") => {
                base(args.get(1).map(String::as_str).unwrap_or_default())
            }
            _ => exe,
        };
        *out.entry(name).or_default() += 1;
    }
    out
}

struct App {
    dir: tempfile::TempDir,
}

impl App {
    fn new() -> App {
        App {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }
    /// The app has just ended: within the services' grace and a second,
    /// every service and the daemon are gone, nothing of the node is left,
    /// and the Node service's stopping handler ran.
    fn all_gone_in_grace(&self, services: &[i32], daemon: i32, tag: &str, what: &str) {
        let ended = Instant::now();
        until("every service and the daemon are gone", || {
            (services.iter().all(|&p| !alive(p)) && !alive(daemon)).then_some(())
        });
        let took = ended.elapsed();
        assert!(took <= GRACE + Duration::from_secs(1), "{what}: {took:?}");
        assert!(
            tagged(tag).is_empty(),
            "{what}: something of the node is left"
        );
        let mark = std::fs::read_to_string(self.dir.path().join("stopped")).unwrap_or_default();
        assert!(
            mark.contains("stopped cleanly"),
            "{what}: the Node service's stopping handler did not run"
        );
    }

    fn owner(&self, mode: &str) -> (Owner, serde_json::Value) {
        let home = self.home();
        let mut child = node(
            "owner.js",
            &[
                mode,
                home.to_str().unwrap(),
                spindle_bin(),
                self.dir.path().to_str().unwrap(),
            ],
        );
        let said = first_line(&mut child);
        assert_eq!(said["running"], 3, "{said}");
        assert_eq!(
            said["again"], 3,
            "a second connect saw another node: {said}"
        );
        (Owner(child), said)
    }
}

/// The app's process; killed if a test ends early, so a failing test
/// leaves no owner (and so no node) behind.
struct Owner(Child);

impl std::ops::Deref for Owner {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Owner {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill with a pid we started.
    unsafe { libc::kill(pid as i32, sig) };
}

#[test]
fn an_owned_node_ends_with_its_app_however_the_app_ends() {
    for mode in ["sigkill", "sigterm", "exit", "throw"] {
        let app = App::new();
        let wait = if mode.starts_with("sig") {
            "wait"
        } else {
            mode
        };
        let (mut owner, said) = app.owner(wait);
        let daemon = said["daemon"].as_i64().unwrap() as i32;
        let tag = node_tag_of(&app.home());
        // node, python3, sh and its two sleeps.
        until("the services and the grandchildren run", || {
            (programs(&tag) == one_set()).then_some(())
        });
        let services = tagged(&tag);
        match mode {
            "sigkill" => signal(owner.id(), libc::SIGKILL),
            "sigterm" => signal(owner.id(), libc::SIGTERM),
            _ => {
                use std::io::Write;
                let mut go = owner.stdin.take().unwrap();
                go.write_all(b"go\n").unwrap();
            }
        }
        until("the app ends", || owner.try_wait().unwrap());
        app.all_gone_in_grace(&services, daemon, &tag, mode);
    }
}

#[test]
fn an_app_started_again_after_its_node_crashed_runs_one_set() {
    let app = App::new();
    let (mut first, said) = app.owner("wait");
    let tag = node_tag_of(&app.home());
    until("the services and the grandchildren run", || {
        (programs(&tag) == one_set()).then_some(())
    });
    let before = tagged(&tag);
    // Another instance of the app is refused the node, and stops nothing.
    let home = app.home();
    let mut other = Owner(node(
        "owner.js",
        &[
            "wait",
            home.to_str().unwrap(),
            spindle_bin(),
            app.dir.path().to_str().unwrap(),
        ],
    ));
    let refused = first_line(&mut other);
    assert_eq!(refused["kind"], "owned_elsewhere", "{refused}");
    assert!(
        before.iter().all(|&p| alive(p)),
        "the other instance stopped something"
    );
    // The node dies hard, and so does the app.
    signal(said["daemon"].as_i64().unwrap() as u32, libc::SIGKILL);
    signal(first.id(), libc::SIGKILL);
    until("the app ends", || first.try_wait().unwrap());
    // Started again: whatever the crash left is killed before anything starts.
    let (mut second, said) = app.owner("wait");
    assert!(
        before.iter().all(|&p| !alive(p)),
        "a leftover of the first run survives"
    );
    until("one set runs, not two", || {
        (programs(&tag) == one_set()).then_some(())
    });
    signal(second.id(), libc::SIGKILL);
    until("the app ends", || second.try_wait().unwrap());
    let daemon = said["daemon"].as_i64().unwrap() as i32;
    until("the node is gone", || {
        (tagged(&tag).is_empty() && !alive(daemon)).then_some(())
    });
}

#[test]
fn bad_options_are_refused_with_the_clis_errors_and_nothing_starts() {
    let app = App::new();
    let home = app.home();
    let mut child = node("owner-bad.js", &[home.to_str().unwrap(), spindle_bin()]);
    let said = first_line(&mut child);
    let text = |k: &str| said[k].as_str().unwrap_or_default().to_string();
    assert!(
        text("unknown").contains("unknown option `restartEvery`"),
        "{said}"
    );
    assert!(
        text("duration").contains("restart_at") && text("duration").contains("soon"),
        "{said}"
    );
    assert!(text("missing").contains("/nonexistent/program"), "{said}");
    assert!(text("half").contains("grace"), "{said}");
    assert_eq!(said["count"], 0, "something started: {said}");
    until("the app ends", || child.try_wait().unwrap());
}

#[test]
fn a_python_owner_owns_its_node_the_same_way_blocking_or_asyncio() {
    for how in ["blocking", "async"] {
        let app = App::new();
        let home = app.home();
        let mut child = python(
            "owner.py",
            &[
                how,
                home.to_str().unwrap(),
                spindle_bin(),
                app.dir.path().to_str().unwrap(),
            ],
        );
        let said = first_line(&mut child);
        assert_eq!(said["running"], 3, "{how}: {said}");
        let daemon = said["daemon"].as_i64().unwrap() as i32;
        let tag = node_tag_of(&home);
        until("the services and the grandchildren run", || {
            (programs(&tag) == one_set()).then_some(())
        });
        let services = tagged(&tag);
        signal(child.id(), libc::SIGKILL);
        until("the app ends", || child.try_wait().unwrap());
        app.all_gone_in_grace(&services, daemon, &tag, how);
    }
}

#[test]
fn events_arrive_in_order_with_their_reasons() {
    let app = App::new();
    let home = app.home();
    let mut child = Owner(node("events.js", &[home.to_str().unwrap(), spindle_bin()]));
    let said = first_line(&mut child);
    let events = said.as_array().unwrap_or_else(|| panic!("{said}"));
    let of = |name: &str| -> Vec<&serde_json::Value> {
        events.iter().filter(|e| e["name"] == name).collect()
    };
    // A crash, the schedule's delay, the next start: in that order.
    let crash: Vec<&str> = of("crash")
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        &crash[..4],
        ["started", "exited", "restarting", "started"],
        "{crash:?}"
    );
    let exit = of("crash")[1];
    assert_eq!(exit["reason"], "crashed", "{exit}");
    assert_eq!(exit["code"], 3, "{exit}");
    assert_eq!(of("crash")[2]["delay"], 50);
    // Stopped during its hour-long backoff: `stopped` follows at once.
    let last = &crash[crash.len() - 2..];
    assert_eq!(last, ["restarting", "stopped"], "{crash:?}");
    assert_eq!(of("crash")[crash.len() - 2]["delay"], 3_600_000);
    // A stop: asked, ended as killed, stays stopped; then deleted (by id).
    let calm: Vec<&str> = of("calm")
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        calm,
        ["started", "stopping", "exited", "stopped"],
        "{calm:?}"
    );
    assert_eq!(of("calm")[2]["reason"], "killed");
    assert!(
        of("calm")[0]["pid"].as_u64().is_some(),
        "started carries the pid"
    );
    let id = of("calm")[0]["id"].clone();
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "deleted" && e["id"] == id),
        "{said}"
    );
    until("the app ends", || child.try_wait().unwrap());
}

#[test]
fn python_hears_the_same_events() {
    let app = App::new();
    let home = app.home();
    let mut child = python("events.py", &[home.to_str().unwrap(), spindle_bin()]);
    let said = first_line(&mut child);
    let kinds: Vec<&str> = said
        .as_array()
        .unwrap_or_else(|| panic!("{said}"))
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["started", "exited", "restarting", "started"],
        "{said}"
    );
    assert_eq!(said[1]["reason"], "crashed");
    assert_eq!(said[1]["code"], 3);
    assert_eq!(said[2]["delay"], 50);
    until("the app ends", || child.try_wait().unwrap());
}
