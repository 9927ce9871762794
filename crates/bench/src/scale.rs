//! Spawn and lifecycle at scale, as a user's process sees them: a wasm
//! parent (the `spawner` guest) in the real daemon times its own `spawn()`
//! calls, with few and with many live children; one manifest of many
//! processes is started through the CLI's path; and the table's cost on disk.

use crate::{Node, Row};
use spindle_types::ProcessSpec;
use spindle_types::manifest::RawProcess;
use std::time::Instant;

/// Spawns per sample.
const CHUNK: u64 = 500;
/// Transactions timed.
const TRANSACTIONS: u64 = 1_000;
/// Processes of the full node: as many as the wasm pool takes with room for
/// the spawner, its children and the slots kept from processes' spawns.
const FILL: usize = spindle_driver_wasm::runtime::MAX_WASM_PROCESSES as usize
    - spindle_daemon::budget::OPERATOR_RESERVE
    - CHUNK as usize
    - 8;

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
    let raw = RawProcess {
        name: Some(name.into()),
        wasm: Some(
            spindle_guests::path("spawner")
                .to_string_lossy()
                .into_owned(),
        ),
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

pub(crate) fn run(rows: &mut Vec<Row>) {
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
    let mut n = Node::new();
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
    let engine_up = n.rss();
    let fill: Vec<ProcessSpec> = (0..FILL)
        .map(|i| spawner(&n, &format!("idle-{i}"), "fill:spindle"))
        .collect();
    let t = Instant::now();
    n.client.start(fill).expect("start the manifest");
    n.wait("every process running", |l| {
        l.iter()
            .filter(|p| p.state == spindle_types::control::StateLabel::Running)
            .count()
            == FILL + 2
    });
    let all_running = t.elapsed();
    let per_process = n.rss().saturating_sub(engine_up) / FILL as u64;
    n.client
        .start(vec![spawner(&n, "spawner", "bench:spindle")])
        .expect("start the spawner");
    let many = ask(&mut n, serde_json::json!({ "idle": CHUNK }));
    let late_quick = ask(&mut n, serde_json::json!({ "transactions": TRANSACTIONS }));
    let on_disk = disk(&n);
    drop(n);

    rows.push(Row {
        metric: format!(
            "spawn as the parent sees it (guest-timed spawn(), real daemon): 0 → {CHUNK} live / {FILL} → {} live",
            FILL + CHUNK as usize
        ),
        target: "≤ 20 µs median, the same at both".into(),
        measured: format!("{} / {}", us(&few), us(&many)),
    });
    rows.push(Row {
        metric: format!(
            "transaction: spawn a child, await its answer, it returns (0 / {FILL} live)"
        ),
        target: "≤ 50 µs".into(),
        measured: format!("{} / {}", us(&quick), us(&late_quick)),
    });
    rows.push(Row {
        metric: "daemon RSS: no process / the wasm engine up and 2 idle processes".into(),
        target: "– / ≤ 16 MiB".into(),
        measured: format!(
            "{:.1} / {:.1} MiB",
            idle_node as f64 / (1 << 20) as f64,
            engine_up as f64 / (1 << 20) as f64
        ),
    });
    rows.push(Row {
        metric: format!("memory per idle wasm process, daemon RSS over {FILL}"),
        target: "≤ 32 KiB".into(),
        measured: format!("{:.1} KiB", per_process as f64 / 1024.0),
    });
    rows.push(Row {
        metric: format!("{FILL} wasm processes from one start → all running"),
        target: "≤ 1 s (10,000)".into(),
        measured: format!("{:.2} s", all_running.as_secs_f64()),
    });
    rows.push(Row {
        metric: format!(
            "the node's table and capabilities on disk, {} processes",
            FILL + CHUNK as usize
        ),
        target: "O(1) per change".into(),
        measured: format!("{:.1} MiB", on_disk as f64 / (1 << 20) as f64),
    });
}
