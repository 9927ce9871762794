//! Helpers shared by the end-to-end tests: the real `spindle` binary, a
//! node in a temporary home, waits with deadlines.
#![allow(dead_code)]

pub mod net;

use spindle_client::Client;
use spindle_types::ProcessNum;
use spindle_types::control::ProcessInfo;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const DEADLINE: Duration = Duration::from_secs(15);

pub fn spindle_bin() -> &'static str {
    env!("CARGO_BIN_EXE_spindle")
}

pub fn testbin() -> String {
    let p = Path::new(spindle_bin()).with_file_name("spindle-testbin");
    assert!(
        p.exists(),
        "{} is missing: run the whole workspace's tests (cargo test --workspace)",
        p.display()
    );
    p.to_string_lossy().into_owned()
}

pub fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits for a background command to end, within [`DEADLINE`]; returns
/// when it ended and what it wrote.
pub fn finished(mut child: std::process::Child) -> (Instant, Output) {
    until("the command to end", || child.try_wait().unwrap());
    let at = Instant::now();
    (at, child.wait_with_output().unwrap())
}

pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s
                .rsplit_once(')')
                .map(|(_, r)| r.trim_start().as_bytes()[0]);
            state != Some(b'Z')
        })
        .unwrap_or(false)
}

/// Processes on the machine whose environment carries `prefix` in SPINDLE_TAG.
pub fn tagged(prefix: &str) -> Vec<i32> {
    with_env(&format!("SPINDLE_TAG={prefix}"))
}

/// Live processes on the machine with an environment entry that starts
/// with `entry` (`KEY=value…`).
pub fn with_env(entry: &str) -> Vec<i32> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let hit = env
            .split(|&b| b == 0)
            .any(|kv| kv.starts_with(entry.as_bytes()));
        if hit && alive(pid) {
            out.push(pid);
        }
    }
    out
}

pub struct Node {
    pub dir: tempfile::TempDir,
}

impl Node {
    pub fn new() -> Node {
        Node {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }
    /// The CLI on this node's home, run in its folder.
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(spindle_bin());
        c.arg("--home")
            .arg(self.home())
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        c
    }
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }
    /// Starts a command in the background, its output captured.
    pub fn spawn(&self, args: &[&str]) -> std::process::Child {
        self.command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
    /// Starts `command` as a process on the bus (`--ipc`) of package
    /// `t:spindle` with `flags`, waits for its log to say `up`, and
    /// returns its address.
    pub fn on_bus(&self, name: &str, flags: &[&str], command: &[&str], up: &str) -> String {
        let mut args = vec!["start", "--name", name, "--package", "t:spindle", "--ipc"];
        args.extend_from_slice(flags);
        args.push("--");
        args.extend_from_slice(command);
        self.ok(&args);
        let id = self.id_of(name);
        until(up, || {
            std::fs::read_to_string(&self.get(id.0).log_out)
                .unwrap_or_default()
                .contains(up)
                .then_some(())
        });
        format!("local@{name}:t:spindle")
    }
    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "spindle {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
    /// Runs a command that must fail; returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "spindle {args:?} should fail");
        String::from_utf8(out.stderr).unwrap()
    }
    /// Starts the test guest `guest` as a public process `name` of
    /// `package`; returns its address.
    pub fn start_guest(&self, guest: &str, name: &str, package: &str) -> String {
        let path = spindle_guests::path(guest);
        self.ok(&[
            "start",
            path.to_str().unwrap(),
            "--name",
            name,
            "--package",
            package,
            "--public",
        ]);
        format!("local@{name}:{package}")
    }

    /// Starts the native example (`native-echo`, the guest library over
    /// IPC) as a public process `name` of `package`; returns its address.
    pub fn start_native_echo(&self, name: &str, package: &str) -> String {
        let exe = spindle_guests::native("native-echo");
        self.ok(&[
            "start",
            "--name",
            name,
            "--package",
            package,
            "--public",
            "--ipc",
            "--",
            exe.to_str().unwrap(),
        ]);
        format!("local@{name}:{package}")
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.home()).unwrap()
    }
    pub fn list(&self) -> Vec<ProcessInfo> {
        self.client().list().unwrap()
    }
    /// The id of the process named `name` (the first, if several are).
    pub fn id_of(&self, name: &str) -> ProcessNum {
        self.list()
            .into_iter()
            .find(|p| p.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no process named {name}"))
            .id
    }

    pub fn get(&self, id: u64) -> ProcessInfo {
        self.list()
            .into_iter()
            .find(|p| p.id == ProcessNum(id))
            .expect("process listed")
    }
    pub fn node_tag(&self) -> String {
        node_tag_of(&self.home())
    }
    pub fn daemon_pid(&self) -> i32 {
        self.client().daemon_pid as i32
    }
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
    /// Copies a test guest into the folder processes started here run in
    /// (a process spawns only components inside its own folder); returns
    /// the file name to spawn it by.
    pub fn ship(&self, guest: &str) -> String {
        let name = format!("{guest}.wasm");
        std::fs::copy(spindle_guests::path(guest), self.dir.path().join(&name)).unwrap();
        name
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(c) = Client::connect(&self.home()) {
            let pid = c.daemon_pid as i32;
            let _ = c.shutdown();
            // SAFETY: signalling a pid we started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The node's records in `home` (its `node.db`), by kind.
pub fn records(home: &std::path::Path) -> spindle_store::journal::Records {
    spindle_store::journal::read(&home.join("node.db")).expect("node.db")
}

/// The table's own record in `home`.
pub fn table_record(home: &std::path::Path) -> serde_json::Value {
    let r = records(home);
    let (_, meta) = r["table"]
        .iter()
        .find(|(k, _)| k == "table")
        .expect("the table's record");
    serde_json::from_slice(meta).unwrap()
}

/// The tag of the node in `home`.
pub fn node_tag_of(home: &std::path::Path) -> String {
    table_record(home)["node_tag"].as_str().unwrap().to_string()
}
