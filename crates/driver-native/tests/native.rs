//! The native driver against real helper programs (`spindle-testbin`).
//! `waitpid(-1)` is process-wide, so these tests take turns.
// Each test owns its runtime and thread; holding the serialising lock across
// awaits is the point.
#![allow(clippy::await_holding_lock)]

use spindle_driver_native::tree::{ProcTable, read_stat};
use spindle_driver_native::{DriverEvent, NativeDriver, SpawnError, child_signal};
use spindle_logs::LogHub;
use spindle_types::manifest::RawProcess;
use spindle_types::spec::StopSignal;
use spindle_types::{ExitStatus, ProcessNum, ProcessSpec};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());
const DEADLINE: Duration = Duration::from_secs(10);

fn testbin() -> String {
    env!("CARGO_BIN_EXE_spindle-testbin").to_string()
}

fn spec(dir: &Path, args: &[&str]) -> ProcessSpec {
    RawProcess {
        command: Some(testbin()),
        args: args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
    .into_spec(1, dir)
    .unwrap()
}

fn alive(pid: i32) -> bool {
    read_stat(pid).is_some_and(|s| s.state != b'Z')
}

/// Polls `cond` until it holds or the deadline passes.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

struct Rig {
    dir: tempfile::TempDir,
    driver: NativeDriver,
    sigchld: tokio::signal::unix::Signal,
}

impl Rig {
    fn new(tag: &str) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let sigchld = child_signal().unwrap();
        let driver =
            NativeDriver::new(tag, &dir.path().join("logs"), Arc::new(LogHub::new())).unwrap();
        Rig {
            dir,
            driver,
            sigchld,
        }
    }

    async fn next_exit(&mut self) -> (ProcessNum, ExitStatus) {
        let end = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(DriverEvent::Exited { num, status, .. }) =
                self.driver.reap().into_iter().next()
            {
                return (num, status);
            }
            tokio::time::timeout_at(end, self.sigchld.recv())
                .await
                .expect("an exit before the deadline");
        }
    }

    fn pids(&self, file: &str) -> Vec<(String, i32)> {
        std::fs::read_to_string(self.dir.path().join(file))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let (role, pid) = l.split_once(' ').unwrap();
                (role.to_string(), pid.parse().unwrap())
            })
            .collect()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn output_goes_to_per_stream_logs() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut rig = Rig::new("t1");
    let s = spec(rig.dir.path(), &["print", "alpha", "beta"]);
    let num = ProcessNum(1);
    rig.driver.spawn(num, 1, &s, None, None).unwrap();
    let (out, err) = rig.driver.log_paths(num, &s);
    until("both logs", || {
        std::fs::read_to_string(&out).unwrap_or_default() == "alpha\nbeta\n"
            && std::fs::read_to_string(&err).unwrap_or_default() == "err:alpha\nerr:beta\n"
    })
    .await;
    rig.driver.kill(&[(num, 1)]);
    assert_eq!(rig.next_exit().await, (num, ExitStatus::Signal(9)));
}

#[tokio::test(flavor = "current_thread")]
async fn exit_codes_are_reported() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut rig = Rig::new("t2");
    let s = spec(rig.dir.path(), &["crash", "7"]);
    rig.driver.spawn(ProcessNum(4), 1, &s, None, None).unwrap();
    assert_eq!(rig.next_exit().await, (ProcessNum(4), ExitStatus::Code(7)));
    assert_eq!(rig.driver.live_runs(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn missing_executables_are_clear_errors() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut rig = Rig::new("t3");
    let mut s = spec(rig.dir.path(), &[]);
    s.program = spindle_types::Program::Native {
        command: "no-such-program-xyz".into(),
        args: vec![],
        cwd: rig.dir.path().into(),
        ipc: None,
    };
    let e = rig
        .driver
        .spawn(ProcessNum(1), 1, &s, None, None)
        .unwrap_err();
    assert!(matches!(e, SpawnError::NotFound { .. }));
    assert!(e.to_string().contains("no-such-program-xyz") && e.to_string().contains("PATH"));
    let file = rig.dir.path().join("plain.txt");
    std::fs::write(&file, "not a program").unwrap();
    s.program = spindle_types::Program::Native {
        command: file.to_string_lossy().into(),
        args: vec![],
        cwd: rig.dir.path().into(),
        ipc: None,
    };
    let e = rig
        .driver
        .spawn(ProcessNum(1), 1, &s, None, None)
        .unwrap_err();
    assert!(e.to_string().contains("chmod +x"), "{e}");

    // Executable bit but no valid format: the exec itself fails, in the child.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
    let e = rig
        .driver
        .spawn(ProcessNum(1), 1, &s, None, None)
        .unwrap_err();
    assert!(matches!(e, SpawnError::Exec { .. }), "{e:?}");
    assert!(e.to_string().contains("plain.txt"), "{e}");
    assert!(e.to_string().contains("format"), "{e}");
    // An argument that cannot reach exec is refused before any child exists.
    s.program = spindle_types::Program::Native {
        command: testbin(),
        args: vec!["nul\0byte".into()],
        cwd: rig.dir.path().into(),
        ipc: None,
    };
    let e = rig
        .driver
        .spawn(ProcessNum(1), 1, &s, None, None)
        .unwrap_err();
    assert!(e.to_string().contains("NUL byte"), "{e}");
    // Nothing was left behind: no run, and no zombie of a child that failed
    // before exec (it still bears the name of the thread that cloned it).
    assert_eq!(rig.driver.live_runs(), 0);
    let me = std::process::id() as i32;
    let comm = |pid: i32| std::fs::read_to_string(format!("/proc/{pid}/comm")).ok();
    let own = std::fs::read_to_string("/proc/thread-self/comm").ok();
    let unreaped: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&pid| read_stat(pid).is_some_and(|s| s.ppid == me && s.state == b'Z'))
        .filter(|&pid| comm(pid) == own)
        .collect();
    assert!(
        unreaped.is_empty(),
        "unreaped failed children: {unreaped:?}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn sigterm_ignorer_needs_the_kill() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut rig = Rig::new("t4");
    let s = spec(rig.dir.path(), &["catch-term"]);
    let num = ProcessNum(2);
    let pid = rig.driver.spawn(num, 1, &s, None, None).unwrap().pid as i32;
    let (out, _) = rig.driver.log_paths(num, &s);
    until("ready", || {
        std::fs::read_to_string(&out).unwrap_or_default() == "ready\n"
    })
    .await;
    rig.driver.ask_stop(&[(num, 1, StopSignal::SIGTERM)]);
    // It got the SIGTERM (it says so) and carried on: only the kill ends it.
    until("SIGTERM handled", || {
        std::fs::read_to_string(&out).unwrap_or_default() == "ready\nterm\n"
    })
    .await;
    assert!(alive(pid));
    rig.driver.kill(&[(num, 1)]);
    assert_eq!(rig.next_exit().await, (num, ExitStatus::Signal(9)));
}

#[tokio::test(flavor = "current_thread")]
async fn kill_takes_the_whole_tree() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut rig = Rig::new("t5");
    let s = spec(rig.dir.path(), &["fork-tree", "pids"]);
    let num = ProcessNum(3);
    rig.driver.spawn(num, 1, &s, None, None).unwrap();
    until("four processes", || rig.pids("pids").len() == 4).await;
    let pids = rig.pids("pids");
    let roles: Vec<&str> = pids.iter().map(|(r, _)| r.as_str()).collect();
    for role in ["main", "child", "setsid", "daemon"] {
        assert!(roles.contains(&role), "{roles:?}");
    }
    rig.driver.kill(&[(num, 1)]);
    assert_eq!(rig.next_exit().await.1, ExitStatus::Signal(9));
    until("no survivors", || {
        rig.driver.reap();
        pids.iter().all(|(_, p)| !alive(*p))
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn leftovers_die_with_their_main_process() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut rig = Rig::new("t6");
    let s = spec(rig.dir.path(), &["fork-tree", "pids", "exit"]);
    rig.driver.spawn(ProcessNum(5), 1, &s, None, None).unwrap();
    assert_eq!(rig.next_exit().await, (ProcessNum(5), ExitStatus::Code(3)));
    let pids = rig.pids("pids");
    assert_eq!(pids.len(), 4);
    until("leftovers killed", || {
        rig.driver.reap();
        pids.iter().all(|(_, p)| !alive(*p))
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn children_start_with_default_signal_handling() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut rig = Rig::new("t7");
    // The parent ignores SIGHUP and blocks SIGUSR2; the child must see neither.
    // SAFETY: plain signal-disposition and mask changes on this thread.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR2);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    let mut s = spec(rig.dir.path(), &[]);
    s.program = spindle_types::Program::Native {
        command: "cat".into(),
        args: vec!["/proc/self/status".into()],
        cwd: rig.dir.path().into(),
        ipc: None,
    };
    let num = ProcessNum(6);
    rig.driver.spawn(num, 1, &s, None, None).unwrap();
    assert_eq!(rig.next_exit().await, (num, ExitStatus::Code(0)));
    let (out, _) = rig.driver.log_paths(num, &s);
    until("report", || {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("SigBlk")
    })
    .await;
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("SigIgn:\t0000000000000000"), "{text}");
    assert!(text.contains("SigBlk:\t0000000000000000"), "{text}");
}

#[tokio::test(flavor = "current_thread")]
async fn flood_in_split_chunks_arrives_line_exact() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut rig = Rig::new("t8");
    const LINES: usize = 200_000;
    let s = spec(
        rig.dir.path(),
        &["flood", "w", &LINES.to_string(), "100", "4096"],
    );
    let num = ProcessNum(7);
    rig.driver.spawn(num, 1, &s, None, None).unwrap();
    assert_eq!(rig.next_exit().await, (num, ExitStatus::Code(0)));
    let (out, _) = rig.driver.log_paths(num, &s);
    until("all lines", || {
        std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0) == (LINES * 100) as u64
    })
    .await;
    let text = std::fs::read_to_string(&out).unwrap();
    for (i, line) in text.lines().enumerate() {
        assert_eq!(line.len(), 99, "line {i} torn");
        assert_eq!(&line[..11], format!("w {i:08} "), "line {i} out of order");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_later_daemon_kills_what_an_earlier_one_left() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut rig = Rig::new("t9node");
    let s = spec(rig.dir.path(), &["fork-tree", "pids"]);
    rig.driver.spawn(ProcessNum(1), 1, &s, None, None).unwrap();
    until("four processes", || rig.pids("pids").len() == 4).await;
    let pids = rig.pids("pids");
    // Another node's tag matches nothing.
    assert_eq!(ProcTable::scan().tagged("t9").len(), 0);
    assert_eq!(rig.driver.kill_leftovers(), 4);
    until("all gone", || {
        rig.driver.reap();
        pids.iter().all(|(_, p)| !alive(*p))
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
#[ignore = "needs a writable cgroup v2 hierarchy (root; .ci/run runs it with --ignored)"]
async fn cgroups_catch_what_leaves_session_and_environment() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut rig = Rig::new("t10");
    let s = spec(rig.dir.path(), &["escape", "pids"]);
    let num = ProcessNum(1);
    rig.driver.spawn(num, 1, &s, None, None).unwrap();
    until("hidden grandchild", || rig.pids("pids").len() == 1).await;
    let hidden = rig.pids("pids")[0].1;
    assert_eq!(
        spindle_driver_native::tree::env_var(hidden, spindle_driver_native::TAG_VAR),
        None,
        "no tag to find it by"
    );
    let cgroups = rig.driver.has_cgroups();
    if !cgroups {
        // Nothing else can attribute it: clean up before failing.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(hidden),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert!(cgroups, "no writable cgroup v2 here");
    rig.driver.kill(&[(num, 1)]);
    assert_eq!(rig.next_exit().await.1, ExitStatus::Signal(9));
    until("hidden grandchild gone", || {
        rig.driver.reap();
        !alive(hidden)
    })
    .await;
}
