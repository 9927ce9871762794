//! The vfs module end to end: the `filer` guest in a real daemon, the
//! `spindle vfs` commands, another package's access, and a kill -9 of the
//! daemon in the middle of writes and appends.

mod common;

use common::*;

const FILER: &str = "local@filer:files:acme";
const OTHER: &str = "local@other:peek:acme";

fn start_filer(n: &Node, name: &str, package: &str) {
    n.start_guest("filer", name, package);
}

fn ask(n: &Node, to: &str, what: &str) -> String {
    until("an answer", || {
        let out = n.run(&["send", to, what, "--timeout", "10s"]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    })
}

#[test]
fn a_process_keeps_files_and_the_cli_reads_them() {
    let n = Node::new();
    start_filer(&n, "filer", "files:acme");
    assert_eq!(ask(&n, FILER, "mkdir reports/2026"), "ok");
    assert_eq!(
        ask(&n, FILER, "write reports/2026/q1.txt first quarter"),
        "ok"
    );
    assert_eq!(ask(&n, FILER, "append log one\n"), "size 4");
    assert_eq!(ask(&n, FILER, "append log two\n"), "size 8");
    assert_eq!(ask(&n, FILER, "range reports/2026/q1.txt 6 7"), "quarter");
    let ls = ask(&n, FILER, "ls ");
    assert!(ls.starts_with("log:file:8,reports:dir:"), "{ls}");
    let escaped = ask(&n, FILER, "read ../../../etc/passwd");
    assert!(escaped.starts_with("err bad-request"), "{escaped}");
    // The CLI reads the drive with the daemon up, and down.
    let ls = n.ok(&["vfs", "ls", "files:acme/files/reports/2026"]);
    assert!(ls.contains("q1.txt") && ls.contains("file"), "{ls}");
    n.ok(&["daemon", "stop"]);
    assert_eq!(
        n.ok(&["vfs", "cat", "files:acme/files/reports/2026/q1.txt"]),
        "first quarter"
    );
    let err = n.fails(&["vfs", "cat", "files:acme/files/../x"]);
    assert!(err.contains("not allowed"), "{err}");
    let err = n.fails(&["vfs", "ls", "files:acme/nodrive"]);
    assert!(err.contains("no such drive"), "{err}");
}

#[test]
fn another_package_reads_only_what_it_was_granted() {
    let n = Node::new();
    start_filer(&n, "filer", "files:acme");
    start_filer(&n, "other", "peek:acme");
    assert_eq!(ask(&n, FILER, "write secret.txt mine"), "ok");
    let refused = ask(&n, OTHER, "theirs files:acme files secret.txt");
    assert!(refused.starts_with("err no-access"), "{refused}");
    assert_eq!(ask(&n, FILER, &format!("grant {OTHER} read")), "ok");
    assert_eq!(ask(&n, OTHER, "theirs files:acme files secret.txt"), "mine");
    assert_eq!(
        std::fs::read(n.home().join("vfs/files:acme/files/secret.txt")).unwrap(),
        b"mine"
    );
}

#[test]
fn every_acknowledged_write_and_append_survives_a_kill_9_of_the_daemon() {
    let n = Node::new();
    start_filer(&n, "filer", "files:acme");
    assert_eq!(ask(&n, FILER, "write state none"), "ok");
    // Churn in the background (the CLI stops waiting; the process goes on).
    let _ = n.run(&["send", FILER, "churn 1000000", "--timeout", "1s"]);
    let out_log = || {
        std::fs::read_dir(n.home().join("logs"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                name.starts_with("filer-") && name.ends_with("-out.log")
            })
    };
    let acked = || -> Vec<u64> {
        out_log()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("acked ")?.parse().ok())
            .collect()
    };
    until("a few hundred rounds acknowledged", || {
        (acked().len() >= 300).then_some(())
    });
    let pid = n.daemon_pid();
    // SAFETY: signalling the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    until("the daemon gone", || (!alive(pid)).then_some(()));
    // Whatever was acknowledged before the kill (the log may lag) is on disk.
    let last = *acked().last().expect("rounds acknowledged");
    let drive = n.home().join("vfs/files:acme/files");
    let log = std::fs::read_to_string(drive.join("log")).unwrap();
    let recs: Vec<u64> = log
        .lines()
        .map(|l| {
            l.strip_prefix("rec ")
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("a torn record {l:?}"))
        })
        .collect();
    assert!(log.ends_with('\n'), "a torn last record");
    assert_eq!(
        recs,
        (0..recs.len() as u64).collect::<Vec<_>>(),
        "records lost or doubled"
    );
    assert!(
        recs.len() as u64 > last,
        "acknowledged {last}, kept {}",
        recs.len()
    );
    let state = std::fs::read_to_string(drive.join("state")).unwrap();
    let at: u64 = state
        .strip_prefix("state ")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a torn state file {state:?}"));
    assert!(at >= last, "acknowledged state {last}, found {at}");
    // The next daemon clears what a cut-short write left, and the process
    // goes on with its files.
    n.ok(&["ls"]);
    let read = ask(&n, FILER, "read state");
    assert!(read.starts_with("state "), "{read}");
    assert_eq!(
        std::fs::read_dir(n.home().join("vfs/.tmp"))
            .unwrap()
            .count(),
        0,
        "temporary files left"
    );
}

#[test]
fn a_native_process_uses_the_same_drives() {
    let n = Node::new();
    let ne = n.start_native_echo("ne", "files:acme");
    assert_eq!(ask(&n, &ne, "vfs shared.txt from-native"), "from-native");
    // The same drive a wasm process of the package sees.
    start_filer(&n, "filer", "files:acme");
    assert_eq!(ask(&n, FILER, "read shared.txt"), "from-native");
}
