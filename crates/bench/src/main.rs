//! `spindle-bench`: measures a real daemon (the `spindle` binary beside this
//! one) driving real helper programs (`spindle-testbin`), and prints a table
//! of figures against the targets. Build everything first:
//! `cargo build --release --workspace --bins && target/release/spindle-bench`.
//! `--wasm`: only the wasm processes, native processes on the bus
//! (in-process, on the daemon's own driver and bus) and the runtime modules;
//! `--ipc`: only native processes on the bus; `--db`: only the modules;
//! `--api`: only the Node control API (real `node`); `--scale`: only
//! spawn and lifecycle at scale (the `spawner` guest in the real daemon),
//! then 100,000 idle wasm processes (`--many`: only those; they need
//! `vm.max_map_count` raised, and say so when it is not);
//! `--timers`: only the timer module; `--net`: only node to node (two
//! daemons on loopback).
//!
//! Each scenario gets a fresh node in a temporary home. Waits poll the
//! daemon with deadlines; times are wall-clock, CPU is the daemon's own
//! user+system time from `/proc`.

use spindle_client::Client;
use spindle_types::control::{DaemonStatus, ProcessInfo, StateLabel};
use spindle_types::manifest::RawProcess;
use spindle_types::{ProcessSpec, Selector};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod api;
mod net;
mod scale;
mod timers;
mod wasm;

const DEADLINE: Duration = Duration::from_secs(120);

pub(crate) struct Row {
    pub(crate) metric: String,
    pub(crate) target: String,
    pub(crate) measured: String,
}

fn sibling(name: &str) -> PathBuf {
    let p = std::env::current_exe()
        .expect("own path")
        .with_file_name(name);
    if !p.exists() {
        eprintln!(
            "{} is missing: build the workspace first (cargo build --release --workspace --bins)",
            p.display()
        );
        std::process::exit(2);
    }
    p
}

struct Node {
    _dir: tempfile::TempDir,
    home: PathBuf,
    client: Client,
    pid: i32,
    testbin: String,
}

impl Node {
    fn new() -> Node {
        Node::in_dir(tempfile::tempdir().expect("temp dir"))
    }

    /// A node whose home is `home` in `dir` (set up there already, or not).
    fn in_dir(dir: tempfile::TempDir) -> Node {
        let home = dir.path().join("home");
        let client = Client::connect_or_start(&home, &sibling("spindle")).expect("daemon");
        let pid = client.daemon_pid as i32;
        Node {
            _dir: dir,
            home,
            client,
            pid,
            testbin: sibling("spindle-testbin").to_string_lossy().into_owned(),
        }
    }

    fn spec(&self, name: &str, command: &str, args: &[&str]) -> RawProcess {
        RawProcess {
            name: Some(name.into()),
            command: Some(command.into()),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn build(&self, raw: RawProcess) -> ProcessSpec {
        raw.into_spec(1, &self.home).expect("valid spec")
    }

    fn list(&mut self) -> Vec<ProcessInfo> {
        self.client.list().expect("list")
    }

    fn wait(&mut self, what: &str, mut cond: impl FnMut(&[ProcessInfo]) -> bool) {
        self.wait_for(what, Duration::from_micros(500), |n| cond(&n.list()));
    }

    /// Waits on the daemon's counts (what `list` would be too large to
    /// carry for the largest runs).
    fn wait_status(&mut self, what: &str, mut cond: impl FnMut(&DaemonStatus) -> bool) {
        self.wait_for(what, Duration::from_millis(10), |n| {
            cond(&n.client.status().expect("status"))
        });
    }

    /// Polls `cond` every `every` until it holds, within [`DEADLINE`].
    fn wait_for(&mut self, what: &str, every: Duration, mut cond: impl FnMut(&mut Node) -> bool) {
        let end = Instant::now() + DEADLINE;
        while !cond(self) {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(every);
        }
    }

    fn rss(&self) -> u64 {
        rss_of(&self.pid.to_string())
    }

    /// The daemon's anonymous resident memory: RSS without the clean
    /// file pages (its binary's code, mapped artifacts) the kernel may drop
    /// and read again.
    fn rss_anon(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        kib_field(&s, "RssAnon:") * 1024
    }

    /// The daemon's proportional set size: pages it shares (the page
    /// cache behind every instance's copy-on-write memory image) count
    /// once among their sharers, not once per mapping as in RSS.
    fn pss(&self) -> u64 {
        let s =
            std::fs::read_to_string(format!("/proc/{}/smaps_rollup", self.pid)).unwrap_or_default();
        kib_field(&s, "Pss:") * 1024
    }

    fn cpu(&self) -> Duration {
        cpu_of(self.pid)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(c) = Client::connect(&self.home) {
            let _ = c.shutdown();
        }
    }
}

fn cpu_of(pid: i32) -> Duration {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| !r.trim_start().starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

/// This process's resident memory.
fn own_rss() -> u64 {
    rss_of("self")
}

/// The resident memory of process `pid` (`self`: this one).
fn rss_of(pid: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    kib_field(&s, "VmRSS:") * 1024
}

/// The value of a `/proc` line such as `VmRSS:   1234 kB`, in KiB (0 if absent).
fn kib_field(text: &str, field: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn running(l: &[ProcessInfo]) -> usize {
    l.iter().filter(|p| p.state == StateLabel::Running).count()
}

fn live(l: &[ProcessInfo]) -> usize {
    l.iter().filter(|p| p.pid.is_some()).count()
}

fn sleepers(n: &Node, count: usize) -> Vec<ProcessSpec> {
    (0..count)
        .map(|i| n.build(n.spec(&format!("sleep-{i}"), "sleep", &["3600"])))
        .collect()
}

fn bench_processes(rows: &mut Vec<Row>) {
    let mut n = Node::new();
    std::thread::sleep(Duration::from_millis(300));
    let idle0 = n.rss();

    let t = Instant::now();
    n.client.start(sleepers(&n, 100)).expect("start");
    n.wait("100 running", |l| running(l) == 100);
    let start100 = t.elapsed();

    // Let the sampler and allocator settle, then read memory.
    std::thread::sleep(Duration::from_millis(1200));
    let idle100 = n.rss();

    let mut samples: Vec<Duration> = (0..200)
        .map(|_| {
            let t = Instant::now();
            n.list();
            t.elapsed()
        })
        .collect();
    samples.sort();
    let ls_p50 = samples[samples.len() / 2];
    let cli = Instant::now();
    let out = std::process::Command::new(sibling("spindle"))
        .arg("--home")
        .arg(&n.home)
        .arg("ls")
        .output()
        .expect("spindle ls");
    let cli_ls = cli.elapsed();
    assert!(out.status.success());

    let ignorer = n.build(RawProcess {
        grace: Some("200ms".into()),
        ..n.spec("ignorer", &n.testbin.clone(), &["ignore-term"])
    });
    n.client.start(vec![ignorer]).expect("start ignorer");
    n.wait("101 running", |l| running(l) == 101);
    let ignorer_pid = n
        .list()
        .iter()
        .find(|p| p.name.as_deref() == Some("ignorer"))
        .and_then(|p| p.pid)
        .expect("ignorer pid") as i32;
    let t = Instant::now();
    n.client.stop(Selector::All).expect("stop all");
    let mut hundred = None;
    let end = Instant::now() + DEADLINE;
    while alive(ignorer_pid) {
        if hundred.is_none() {
            let l = n.list();
            if l.iter()
                .filter(|p| p.name.as_deref() != Some("ignorer"))
                .all(|p| p.pid.is_none())
            {
                hundred = Some(t.elapsed());
            }
        }
        assert!(Instant::now() < end, "ignorer never died");
        std::thread::sleep(Duration::from_micros(200));
    }
    let ignorer_gone = t.elapsed();
    let hundred = hundred.unwrap_or(ignorer_gone);

    // 10 processes, for the middle RSS figure.
    let mut n10 = Node::new();
    n10.client.start(sleepers(&n10, 10)).expect("start 10");
    n10.wait("10 running", |l| running(l) == 10);
    std::thread::sleep(Duration::from_millis(1200));
    let idle10 = n10.rss();

    rows.push(Row {
        metric: "daemon RSS idle, 0 / 10 / 100 processes".into(),
        target: "≤ 8 / – / ≤ 12 MiB".into(),
        measured: format!("{} / {} / {}", mib(idle0), mib(idle10), mib(idle100)),
    });
    rows.push(Row {
        metric: "start 100 processes → all reported running".into(),
        target: "≤ 200 ms".into(),
        measured: ms(start100),
    });
    rows.push(Row {
        metric: "`ls` round trip, 100 processes (client p50 / CLI process)".into(),
        target: "≤ 10 ms".into(),
        measured: format!("{} / {}", ms(ls_p50), ms(cli_ls)),
    });
    rows.push(Row {
        metric: "stop all 100 (+1 SIGTERM-ignorer)".into(),
        target: "≤ 200 ms".into(),
        measured: ms(hundred),
    });
    rows.push(Row {
        metric: "SIGTERM-ignorer gone after stop (grace 200 ms)".into(),
        target: "≤ 250 ms".into(),
        measured: ms(ignorer_gone),
    });
}

/// Checks a flood log: every line whole, every writer's sequence complete.
fn verify(path: &Path, writers: &[&str], lines: usize) -> (usize, usize) {
    let text = std::fs::read(path).unwrap_or_default();
    let mut next = vec![0usize; writers.len()];
    let mut torn = 0;
    for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let ok = line.len() == 99 && line[1] == b' ' && line[10] == b' ';
        let w = writers.iter().position(|t| line.starts_with(t.as_bytes()));
        match (ok, w) {
            (true, Some(w)) => {
                let seq: usize = std::str::from_utf8(&line[2..10])
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(usize::MAX);
                if seq == next[w] {
                    next[w] += 1;
                } else {
                    torn += 1;
                }
            }
            _ => torn += 1,
        }
    }
    let lost = writers.len() * lines - next.iter().sum::<usize>();
    (lost, torn)
}

fn bench_logs(rows: &mut Vec<Row>, writers: &[&str], lines: usize) {
    let mut n = Node::new();
    let log = n.home.join("flood.log");
    let specs: Vec<ProcessSpec> = writers
        .iter()
        .map(|w| {
            n.build(RawProcess {
                log: Some(log.to_string_lossy().into_owned()),
                on_exit: Some("none".into()),
                log_max_size: Some("4GiB".into()),
                ..n.spec(
                    w,
                    &n.testbin.clone(),
                    &["flood", w, &lines.to_string(), "100", "4096"],
                )
            })
        })
        .collect();
    let cpu0 = n.cpu();
    let t = Instant::now();
    n.client.start(specs).expect("start flooders");
    let want = (writers.len() * lines * 100) as u64;
    let end = Instant::now() + DEADLINE;
    while std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0) < want {
        assert!(Instant::now() < end, "flood never finished");
        std::thread::sleep(Duration::from_millis(1));
    }
    let took = t.elapsed();
    n.wait("flooders done", |l| live(l) == 0);
    let cpu = n.cpu() - cpu0;
    let (lost, torn) = verify(&log, writers, lines);
    rows.push(Row {
        metric: format!(
            "{}M lines × 100 B, {} writer{}{}: time / daemon CPU / lost / torn",
            lines * writers.len() / 1_000_000,
            writers.len(),
            if writers.len() > 1 { "s" } else { "" },
            if writers.len() > 1 {
                " into one file"
            } else {
                ""
            }
        ),
        target: if writers.len() == 1 {
            "CPU ≤ 0.4 s, 0 lost/torn".into()
        } else {
            "0 torn, 0 lost".into()
        },
        measured: format!(
            "{:.2} s / {:.2} s / {lost} / {torn}",
            took.as_secs_f64(),
            cpu.as_secs_f64()
        ),
    });
}

fn bench_crash_loop(rows: &mut Vec<Row>) {
    let mut n = Node::new();
    let schedule = [100u64, 200, 400, 800];
    let spec = n.build(RawProcess {
        restart_at: Some(
            schedule
                .iter()
                .map(|d| spindle_types::manifest::DelayValue::Text(format!("{d}ms")))
                .collect(),
        ),
        ..n.spec("crasher", &n.testbin.clone(), &["crash", "1"])
    });
    n.client.start(vec![spec]).expect("start crasher");
    n.wait("4 restarts", |l| l[0].restarts >= 4);
    let log = n.list()[0].log_out.clone();
    let starts: Vec<u128> = std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("start ")?.parse().ok())
        .collect();
    let errors: Vec<i128> = starts
        .windows(2)
        .zip(schedule)
        .map(|(w, d)| (w[1] - w[0]) as i128 / 1000 - d as i128 * 1000)
        .collect();
    let worst = errors.iter().map(|e| e.abs()).max().unwrap_or(0);
    n.client.stop(Selector::All).ok();
    rows.push(Row {
        metric: "crash-loop delay error vs schedule (start→start minus delay, worst)".into(),
        target: "≤ 10 ms".into(),
        measured: format!(
            "{:.2} ms (each: {})",
            worst as f64 / 1e3,
            errors
                .iter()
                .map(|e| format!("{:+.2}", *e as f64 / 1e3))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    });
}

fn read_pids(file: &Path) -> Vec<(String, i32)> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (r, p) = l.split_once(' ')?;
            Some((r.to_string(), p.parse().ok()?))
        })
        .collect()
}

fn wait_pids(file: &Path, count: usize) -> Vec<(String, i32)> {
    let end = Instant::now() + DEADLINE;
    loop {
        let p = read_pids(file);
        if p.len() >= count {
            return p;
        }
        assert!(Instant::now() < end, "forker never finished");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn bench_trees(rows: &mut Vec<Row>) {
    let mut n = Node::new();
    let file = n.home.join("pids");
    let spec = n.build(n.spec(
        "forker",
        &n.testbin.clone(),
        &["fork-tree", file.to_str().unwrap()],
    ));
    n.client.start(vec![spec]).expect("start forker");
    let pids = wait_pids(&file, 4);
    n.client.stop(Selector::All).expect("stop");
    n.wait("stopped", |l| live(l) == 0);
    std::thread::sleep(Duration::from_millis(50));
    let survivors = |role: &str, pids: &[(String, i32)]| {
        pids.iter().filter(|(r, p)| r == role && alive(*p)).count()
    };
    rows.push(Row {
        metric: "grandchildren surviving stop (plain / setsid / double-fork)".into(),
        target: "0 / 0 / 0".into(),
        measured: format!(
            "{} / {} / {}",
            survivors("child", &pids),
            survivors("setsid", &pids),
            survivors("daemon", &pids)
        ),
    });

    // Daemon SIGKILL: what survives it, and what a new daemon does.
    let mut n = Node::new();
    let file = n.home.join("pids");
    let mut specs = sleepers(&n, 10);
    specs.push(n.build(n.spec(
        "forker",
        &n.testbin.clone(),
        &["fork-tree", file.to_str().unwrap()],
    )));
    n.client.start(specs).expect("start");
    let tree = wait_pids(&file, 4);
    n.wait("11 running", |l| running(l) == 11);
    let direct: Vec<i32> = n
        .list()
        .iter()
        .filter_map(|p| p.pid.map(|x| x as i32))
        .collect();
    // SAFETY: killing the daemon this benchmark started.
    unsafe { libc::kill(n.pid, libc::SIGKILL) };
    let end = Instant::now() + Duration::from_secs(5);
    while direct.iter().any(|p| alive(*p)) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(1));
    }
    let direct_left = direct.iter().filter(|p| alive(**p)).count();
    let detached_left = tree.iter().filter(|(_, p)| alive(*p)).count();
    std::fs::remove_file(&file).ok();
    n.client = Client::connect_or_start(&n.home, &sibling("spindle")).expect("new daemon");
    n.pid = n.client.daemon_pid as i32;
    n.wait("11 running again", |l| running(l) == 11);
    wait_pids(&file, 4);
    let old_after = tree.iter().filter(|(_, p)| alive(*p)).count();
    let new_tree = read_pids(&file).len();
    rows.push(Row {
        metric: "after daemon SIGKILL: direct children left / detached left / old copies after restart"
            .into(),
        target: "0 / – / 0".into(),
        measured: format!(
            "{direct_left} / {detached_left} (killed by the next daemon) / {old_after} (one fresh tree of {new_tree})"
        ),
    });
}

fn main() {
    let mut rows = vec![];
    let flag = |f: &str| std::env::args().any(|a| a == f);
    if flag("--api") {
        eprintln!("the Node control API …");
        api::run(&mut rows);
        print_table(rows);
        return;
    }
    if flag("--timers") {
        eprintln!("the timer module …");
        timers::run(&mut rows);
        print_table(rows);
        return;
    }
    if flag("--net") {
        eprintln!("node to node …");
        net::run(&mut rows);
        print_table(rows);
        return;
    }
    if flag("--many") {
        eprintln!("{} idle wasm processes …", 100_000);
        scale::hundred_thousand(&mut rows);
        print_table(rows);
        return;
    }
    if flag("--scale") {
        eprintln!("spawn and lifecycle at scale …");
        scale::run(&mut rows);
        eprintln!("{} idle wasm processes …", 100_000);
        scale::hundred_thousand(&mut rows);
        print_table(rows);
        return;
    }
    if flag("--wasm") || flag("--ipc") || flag("--db") {
        eprintln!("wasm processes …");
        let part = if flag("--ipc") {
            wasm::Part::Ipc
        } else if flag("--db") {
            wasm::Part::Db
        } else {
            wasm::Part::All
        };
        wasm::run(&mut rows, part);
        print_table(rows);
        return;
    }
    eprintln!("processes: start, ls, stop …");
    bench_processes(&mut rows);
    eprintln!("log capture, 1 writer …");
    bench_logs(&mut rows, &["a"], 1_000_000);
    eprintln!("log capture, 2 writers …");
    bench_logs(&mut rows, &["a", "b"], 500_000);
    eprintln!("crash loop …");
    bench_crash_loop(&mut rows);
    eprintln!("process trees …");
    bench_trees(&mut rows);
    eprintln!("wasm processes …");
    wasm::run(&mut rows, wasm::Part::All);
    eprintln!("spawn and lifecycle at scale …");
    scale::run(&mut rows);
    scale::hundred_thousand(&mut rows);
    eprintln!("the timer module …");
    timers::run(&mut rows);
    eprintln!("node to node …");
    net::run(&mut rows);
    eprintln!("the Node control API …");
    api::run(&mut rows);
    print_table(rows);
}

fn print_table(rows: Vec<Row>) {
    let w0 = rows
        .iter()
        .map(|r| r.metric.chars().count())
        .max()
        .unwrap_or(0);
    let w1 = rows
        .iter()
        .map(|r| r.target.chars().count())
        .max()
        .unwrap_or(0);
    println!("| {:<w0$} | {:<w1$} | measured |", "metric", "target");
    println!("|{}|{}|---|", "-".repeat(w0 + 2), "-".repeat(w1 + 2));
    for r in rows {
        println!("| {:<w0$} | {:<w1$} | {} |", r.metric, r.target, r.measured);
    }
}
