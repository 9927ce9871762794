//! Spawn and lifecycle at scale, as a user's process sees them: a wasm
//! parent (the `spawner` guest) in the real daemon times its own `spawn()`
//! calls, with few and with many live children; one manifest of many
//! processes is started through the CLI's path; and the table's cost on disk.

use crate::{Node, Row};
use spindle_driver_wasm::runtime::{POOL_ENV, maps_needed, max_map_count, pool_size};
use spindle_types::manifest::RawProcess;
use spindle_types::{ProcessSpec, Selector};
use std::time::Instant;

/// Spawns per sample.
const CHUNK: u64 = 500;
/// Transactions timed.
const TRANSACTIONS: u64 = 1_000;
/// Processes of the full node: the target's 10,000 when the kernel's
/// mapping limit gives a pool for them (and the spawner, its children and
/// the slots kept from processes' spawns), else what Linux's default limit
/// allows ([`FILL_AT_DEFAULT`]).
const FILL: usize = 10_000;
/// The full node's processes at the default `vm.max_map_count` (65,530).
const FILL_AT_DEFAULT: usize = 9_200;
/// Idle wasm processes held at once by the largest run.
const MANY: usize = 100_000;
/// The pool its daemon is started with.
const MANY_POOL: u32 = MANY as u32 + 1_024;
/// Processes per `start` call: a control frame holds a few thousand specs.
const START_BATCH: usize = 5_000;
/// Processes of the largest run asked something.
const ASKED: usize = 100;

const SPAWNER: &str = "local@spawner:bench:spindle";

fn ask(n: &mut Node, body: serde_json::Value) -> serde_json::Value {
    let reply = n
        .client
        .send(SPAWNER, &body.to_string(), spindle_types::limits::MAX_AWAIT)
        .expect("the spawner answers");
    serde_json::from_str(&reply).expect("json")
}

fn us(v: &serde_json::Value) -> String {
    match (v["median_us"].as_f64(), v["p90_us"].as_f64()) {
        (Some(m), Some(p)) => format!("{m:.1} µs (p90 {p:.1})"),
        _ => format!("failed: {v}"),
    }
}

fn spawner(n: &Node, name: &str, package: &str) -> ProcessSpec {
    guest(n, "spawner", name, package)
}

fn guest(n: &Node, guest: &str, name: &str, package: &str) -> ProcessSpec {
    let raw = RawProcess {
        name: Some(name.into()),
        wasm: Some(spindle_guests::path(guest).to_string_lossy().into_owned()),
        package: Some(package.into()),
        public: Some(true),
        ..Default::default()
    };
    n.build(raw)
}

fn disk(n: &Node) -> u64 {
    ["node.db", "node.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(n.home.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

/// The pool a full node of `fill` processes needs.
fn pool_for(fill: usize) -> u32 {
    (fill + CHUNK as usize + spindle_daemon::budget::OPERATOR_RESERVE + 8) as u32
}

/// A node whose daemon is started with a pool of `pool` (by a CLI command
/// whose environment asks for it; the bench then connects to it).
fn node_with_pool(pool: u32) -> Node {
    let dir = tempfile::tempdir().expect("temp dir");
    let started = std::process::Command::new(crate::sibling("spindle"))
        .arg("ls")
        .env("SPINDLE_HOME", dir.path().join("home"))
        .env(POOL_ENV, pool.to_string())
        .output()
        .expect("run spindle ls");
    assert!(started.status.success(), "{started:?}");
    Node::in_dir(dir)
}

pub(crate) fn run(rows: &mut Vec<Row>) {
    let fits = |fill| pool_size(max_map_count(), Some(pool_for(fill))) >= pool_for(fill);
    let fill_n = if fits(FILL) { FILL } else { FILL_AT_DEFAULT };
    assert!(
        fits(fill_n),
        "the pool is smaller than the full node's {fill_n} processes"
    );
    // An empty node: the spawner and its children only.
    let mut n = Node::new();
    n.client
        .start(vec![spawner(&n, "spawner", "bench:spindle")])
        .expect("start the spawner");
    let quick = ask(&mut n, serde_json::json!({ "transactions": TRANSACTIONS }));
    let few = ask(&mut n, serde_json::json!({ "idle": CHUNK }));
    drop(n);

    // A full node: one start of many processes (another package's), then
    // the same spawns among them.
    let mut n = node_with_pool(pool_for(fill_n));
    let idle_node = n.rss();
    let two: Vec<ProcessSpec> = (0..2)
        .map(|i| spawner(&n, &format!("idle-first-{i}"), "fill:spindle"))
        .collect();
    n.client.start(two).expect("start two idle processes");
    n.wait("two running", |l| {
        l.iter()
            .filter(|p| p.state == spindle_types::control::StateLabel::Running)
            .count()
            == 2
    });
    let (engine_up, engine_up_pss, engine_up_anon) = (n.rss(), n.pss(), n.rss_anon());
    let fill: Vec<ProcessSpec> = (0..fill_n)
        .map(|i| spawner(&n, &format!("idle-{i}"), "fill:spindle"))
        .collect();
    let t = Instant::now();
    n.client.start(fill).expect("start the manifest");
    n.wait("every process running", |l| {
        l.iter()
            .filter(|p| p.state == spindle_types::control::StateLabel::Running)
            .count()
            == fill_n + 2
    });
    let all_running = t.elapsed();
    let per_process = n.rss().saturating_sub(engine_up) / fill_n as u64;
    let per_process_pss = n.pss().saturating_sub(engine_up_pss) / fill_n as u64;
    n.client
        .start(vec![spawner(&n, "spawner", "bench:spindle")])
        .expect("start the spawner");
    let many = ask(&mut n, serde_json::json!({ "idle": CHUNK }));
    let late_quick = ask(&mut n, serde_json::json!({ "transactions": TRANSACTIONS }));
    let on_disk = disk(&n);
    drop(n);

    rows.push(Row {
        metric: format!(
            "spawn as the parent sees it (guest-timed spawn(), real daemon): 0 → {CHUNK} live / {fill_n} → {} live",
            fill_n + CHUNK as usize
        ),
        target: "≤ 20 µs median, the same at both".into(),
        measured: format!("{} / {}", us(&few), us(&many)),
    });
    rows.push(Row {
        metric: format!(
            "transaction: spawn a child, await its answer, it returns (0 / {fill_n} live)"
        ),
        target: "≤ 50 µs".into(),
        measured: format!("{} / {}", us(&quick), us(&late_quick)),
    });
    rows.push(Row {
        metric:
            "daemon RSS: no process / the wasm engine up and 2 idle processes (of it anonymous)"
                .into(),
        target: "– / ≤ 16 MiB".into(),
        measured: format!(
            "{:.1} / {:.1} MiB ({:.1} MiB)",
            idle_node as f64 / (1 << 20) as f64,
            engine_up as f64 / (1 << 20) as f64,
            engine_up_anon as f64 / (1 << 20) as f64
        ),
    });
    rows.push(Row {
        metric: format!("memory per idle wasm process, daemon RSS / PSS over {fill_n}"),
        target: "≤ 32 KiB".into(),
        measured: format!(
            "{:.1} / {:.1} KiB",
            per_process as f64 / 1024.0,
            per_process_pss as f64 / 1024.0
        ),
    });
    rows.push(Row {
        metric: format!("{fill_n} wasm processes from one start → all running"),
        target: "≤ 1 s (10,000)".into(),
        measured: format!("{:.2} s", all_running.as_secs_f64()),
    });
    rows.push(Row {
        metric: format!(
            "the node's table and capabilities on disk, {} processes",
            fill_n + CHUNK as usize
        ),
        target: "O(1) per change".into(),
        measured: format!("{:.1} MiB", on_disk as f64 / (1 << 20) as f64),
    });
}

/// The largest run: [`MANY`] idle wasm processes (the echo guest) started
/// through the CLI's path, a sample of them asked, all stopped. It needs a
/// pool that large, which Linux's default `vm.max_map_count` does not give.
pub(crate) fn hundred_thousand(rows: &mut Vec<Row>) {
    let metric =
        format!("{MANY} concurrent idle wasm processes: all running / answered / all stopped");
    let target = "start, answer and stop cleanly".to_string();
    let pool = pool_size(max_map_count(), Some(MANY_POOL));
    if (pool as usize) < MANY {
        rows.push(Row {
            metric,
            target,
            measured: format!(
                "not run: vm.max_map_count {} gives a pool of {pool}; {MANY} need {} (`sysctl -w vm.max_map_count={}`; the bench asks for the pool with {POOL_ENV})",
                max_map_count().map_or_else(|| "(unreadable)".into(), |m| m.to_string()),
                maps_needed(MANY_POOL),
                maps_needed(MANY_POOL).next_power_of_two()
            ),
        });
        return;
    }
    let mut n = node_with_pool(MANY_POOL);
    let t = Instant::now();
    let names: Vec<String> = (0..MANY).map(|i| format!("idle-{i}")).collect();
    for batch in names.chunks(START_BATCH) {
        let specs = batch
            .iter()
            .map(|name| guest(&n, "echo", name, "many:spindle"))
            .collect();
        n.client.start(specs).expect("start a batch");
    }
    n.wait_status("every process running", |s| s.running == MANY);
    let all_running = t.elapsed();
    let rss = n.rss();
    let mut answered = 0;
    for name in names.iter().step_by(MANY / ASKED) {
        let reply = n
            .client
            .send(
                &format!("local@{name}:many:spindle"),
                "hi",
                std::time::Duration::from_secs(5),
            )
            .expect("an answer");
        answered += usize::from(reply == "hi");
    }
    let t = Instant::now();
    n.client.stop(Selector::All).expect("stop all");
    n.wait_status("every process stopped", |s| s.running == 0);
    let all_stopped = t.elapsed();
    drop(n);
    rows.push(Row {
        metric,
        target,
        measured: format!(
            "{:.1} s / {answered} of {ASKED} / {:.1} s; daemon RSS {:.2} GiB, {:.1} KiB a process",
            all_running.as_secs_f64(),
            all_stopped.as_secs_f64(),
            rss as f64 / (1u64 << 30) as f64,
            rss as f64 / MANY as f64 / 1024.0
        ),
    });
}
