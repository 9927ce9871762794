//! The control API from Node, as an embedding app sees it: the figures of
//! `node/api.js` (real `node`, the real daemon), as table rows.

use crate::Row;
use std::process::Command;

pub(crate) fn run(rows: &mut Vec<Row>) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/node/api.js");
    let scratch = tempfile::tempdir().expect("a scratch directory");
    let out = Command::new("node")
        .arg(script)
        .arg(crate::sibling("spindle"))
        .arg(scratch.path())
        .output();
    let figures: serde_json::Value = match out {
        Ok(o) if o.status.success() => {
            serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null)
        }
        Ok(o) => {
            eprintln!("node/api.js failed: {}", String::from_utf8_lossy(&o.stderr));
            serde_json::Value::Null
        }
        Err(e) => {
            eprintln!("node/api.js could not run (is node on the PATH?): {e}");
            serde_json::Value::Null
        }
    };
    let ms = |k: &str| match figures[k].as_f64() {
        Some(v) => format!("{v:.2} ms"),
        None => "not measured (see above)".into(),
    };
    rows.push(Row {
        metric: "Node API: connect() with no daemon → first start resolved (median of 5)".into(),
        target: "≤ 50 ms".into(),
        measured: ms("first_start_ms"),
    });
    rows.push(Row {
        metric: "Node API: list() with 100 processes (median of 200)".into(),
        target: "≤ 2 ms".into(),
        measured: ms("list_100_ms"),
    });
    rows.push(Row {
        metric: "Node API, owned: owner SIGKILLed → last service gone (grace 200 ms)".into(),
        target: "≤ grace + 100 ms".into(),
        measured: ms("owner_gone_ms"),
    });
}
