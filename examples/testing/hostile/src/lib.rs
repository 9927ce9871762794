//! Test guest: a process that tries what no process may do to another,
//! written only against the public guest library (and its raw bindings
//! where the library guards a value). Each request names one attempt and
//! is answered with what the node said, so a test can assert it was
//! refused or bounded:
//!
//! - `attach <path>`: `query` with `ATTACH DATABASE '<path>'`, then
//!   `write` with `/**/ATTACH`; answers both error kinds.
//! - `commit`: `write` with `/**/COMMIT`; the error kind.
//! - `blob-range`: a raw sqlite write whose blob parameter points at
//!   offset `u64::MAX`; the error kind.
//! - `flood <address> <n> <bytes>`: `n` one-way requests of `bytes` each;
//!   answers `sent <s> refused <r>`.
//! - `dbs <n>`: opens `n` kv databases (a write each); `opened <k>` and the
//!   first error, if any.
//! - `spawn-many <n>`: spawns `n` idle children of itself; `spawned <k>`
//!   and the first error.
//! - `spawn-path <path>`: one spawn of that path; the error (or address).
//! - `await-forever <address>`: a request awaiting a response for
//!   `u64::MAX` ms; `ok <body>` or `err <kind>`.
//! - `ping`: `pong` (it is still alive).

use spindle_process::{
    Address, OnExit, Request, Response, Spawn, await_message, kv, spawn, sqlite,
};
use std::time::Duration;

spindle_process::init!(run);

fn answer(text: impl Into<Vec<u8>>) {
    let _ = Response::new().body(text).send();
}

fn sqlite_address() -> Address {
    Address::parse("local@sqlite:sys:spindle").expect("the module's address")
}

/// A raw request to the sqlite module: its error kind, or `ok`.
fn raw_sql(body: serde_json::Value, blob: Option<Vec<u8>>) -> String {
    let mut r = Request::to(sqlite_address())
        .json(&body)
        .expects_response(Duration::from_secs(10));
    if let Some(b) = blob {
        r = r.blob(b);
    }
    match r.send_and_await_response() {
        Ok(m) => {
            let v: serde_json::Value = m.json().unwrap_or_default();
            v.get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("ok")
                .to_string()
        }
        Err(e) => format!("send {}", e.kind),
    }
}

fn run(_our: Address) {
    loop {
        let Ok(msg) = await_message() else { continue };
        if !msg.is_request() {
            continue;
        }
        let text = String::from_utf8_lossy(msg.body()).into_owned();
        let mut words = text.split(' ');
        let op = words.next().unwrap_or_default();
        let args: Vec<&str> = words.collect();
        match op {
            "ping" => answer("pong"),
            "attach" => {
                let path = args.join(" ");
                let db = sqlite::open("mine");
                let read = match &db {
                    Ok(db) => db
                        .query(&format!("ATTACH DATABASE '{path}' AS y"), &[])
                        .map(|_| "ok".to_string())
                        .unwrap_or_else(|e| e.kind),
                    Err(e) => e.kind.clone(),
                };
                let write = match &db {
                    Ok(db) => db
                        .write(&format!("/**/ATTACH '{path}' AS y2"), &[])
                        .map(|_| "ok".to_string())
                        .unwrap_or_else(|e| e.kind),
                    Err(e) => e.kind.clone(),
                };
                answer(format!("{read} {write}"));
            }
            "commit" => {
                let r = sqlite::open("mine")
                    .and_then(|db| db.write("/**/COMMIT", &[]))
                    .map(|_| "ok".to_string())
                    .unwrap_or_else(|e| e.kind);
                answer(r);
            }
            "blob-range" => {
                let body = serde_json::json!({
                    "op": "write", "db": "mine", "sql": "SELECT ?1",
                    "params": [{"blob": [u64::MAX, 1]}],
                });
                answer(raw_sql(body, Some(vec![1, 2, 3])));
            }
            "flood" => {
                let target = args.first().and_then(|a| Address::parse(a));
                let n: usize = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(0);
                let bytes: usize = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(0);
                let Some(target) = target else {
                    answer("err bad target");
                    continue;
                };
                let (mut sent, mut refused) = (0, 0);
                for _ in 0..n {
                    match Request::to(target.clone())
                        .body(b"s".to_vec())
                        .blob(vec![0x5a; bytes])
                        .send()
                    {
                        Ok(()) => sent += 1,
                        Err(_) => refused += 1,
                    }
                }
                answer(format!("sent {sent} refused {refused}"));
            }
            "dbs" => {
                let n: usize = args.first().and_then(|n| n.parse().ok()).unwrap_or(0);
                let mut opened = 0;
                let mut first = String::new();
                for i in 0..n {
                    match kv::open(&format!("h{i}")).and_then(|db| db.set("k", b"v".to_vec())) {
                        Ok(()) => opened += 1,
                        Err(e) if first.is_empty() => first = e.kind,
                        Err(_) => {}
                    }
                }
                answer(format!("opened {opened} {first}"));
            }
            "spawn-many" => {
                let n: usize = args.first().and_then(|n| n.parse().ok()).unwrap_or(0);
                let mut spawned = 0;
                let mut first = String::new();
                for _ in 0..n {
                    match spawn(&Spawn {
                        on_exit: OnExit::None,
                        ..Spawn::new("hostile.wasm")
                    }) {
                        Ok(_) => spawned += 1,
                        Err(e) => {
                            first = e;
                            break;
                        }
                    }
                }
                answer(format!("spawned {spawned} {first}"));
            }
            "spawn-path" => {
                let r = spawn(&Spawn::new(args.join(" ")))
                    .map(|a| a.to_string())
                    .unwrap_or_else(|e| format!("refused: {e}"));
                answer(r);
            }
            "await-forever" => {
                let Some(target) = args.first().and_then(|a| Address::parse(a)) else {
                    answer("err bad target");
                    continue;
                };
                let r = Request::to(target)
                    .body(b"hello".to_vec())
                    .expects_response(Duration::from_millis(u64::MAX))
                    .send_and_await_response();
                match r {
                    Ok(m) => answer(format!("ok {}", String::from_utf8_lossy(m.body()))),
                    Err(e) => answer(format!("err {}", e.kind)),
                }
            }
            _ => answer("unknown"),
        }
    }
}
