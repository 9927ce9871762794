//! A native process on the bus, written against the same `spindle_process`
//! API as the wasm examples; built for the host, it talks to the node over
//! its IPC channel:
//!
//! ```sh
//! cargo build --manifest-path examples/Cargo.toml -p native-echo --release
//! spindle start --ipc --name necho --public -- examples/target/release/native-echo
//! ```
//!
//! Any request is answered with its own body, except: `call <address>
//! <timeout-ms> <body>` asks that address and answers `ok <body>` or
//! `err <kind>`; `save <text>` / `load` keep text in durable state;
//! `bench <address> <n>` makes n round trips; `flood <address> <n>` sends n
//! one-way `s` and then asks for that address's `count`; `blobtrip
//! <address> <bytes>` sends a blob of that size to be reflected and answers
//! `ok <bytes back> in <µs>` once it is back and intact (the time from the
//! send to the blob back in hand). Capabilities: `spawn
//! <name> <component>` starts a private wasm child and answers its address;
//! `grant <address> <to>` sends `"take"` (JSON) to `<to>` with the right to message
//! `<address>` attached and answers with the reply; `caps` lists what this
//! process holds; `drop <address>` gives up the right to message it.
//! `kv <db> <key> <value>` sets the key in the kv module and answers with
//! what it reads back.

use spindle_process::{
    Address, Capability, Request, Response, Spawn, await_message, drop_capabilities, get_blob,
    get_state, on_stopping, our_capabilities, set_state, spawn,
};
use std::time::{Duration, Instant};

fn main() {
    spindle_process::install_panic_hook();
    let our = spindle_process::our();
    on_stopping(|| println!("native-echo: stopping cleanly"));
    println!("native-echo: up as {our}");
    run();
}

fn call(target: &Address, body: &[u8], timeout: Duration) -> Result<Vec<u8>, String> {
    Request::to(target.clone())
        .body(body.to_vec())
        .expects_response(timeout)
        .send_and_await_response()
        .map(|m| m.body().to_vec())
        .map_err(|e| e.kind.to_string())
}

fn run() {
    loop {
        let Ok(msg) = await_message() else { continue };
        if !msg.is_request() {
            continue;
        }
        let text = String::from_utf8_lossy(msg.body()).into_owned();
        let mut words = text.splitn(4, ' ');
        let answer: Vec<u8> = match words.next().unwrap_or_default() {
            "call" => {
                let (target, ms, inner) = (words.next(), words.next(), words.next());
                match (
                    target.and_then(Address::parse),
                    ms.and_then(|m| m.parse().ok()),
                ) {
                    (Some(t), Some(ms)) => {
                        match call(
                            &t,
                            inner.unwrap_or("").as_bytes(),
                            Duration::from_millis(ms),
                        ) {
                            Ok(b) => [b"ok ".as_slice(), &b].concat(),
                            Err(kind) => format!("err {kind}").into_bytes(),
                        }
                    }
                    _ => b"err bad call".to_vec(),
                }
            }
            "save" => match set_state(text.trim_start_matches("save ").as_bytes()) {
                Ok(()) => b"saved".to_vec(),
                Err(e) => format!("err {e}").into_bytes(),
            },
            "load" => get_state().unwrap_or_default(),
            "spawn" => {
                let (name, path) = (words.next(), words.next());
                let answer = match (name, path) {
                    (Some(name), Some(path)) => spawn(&Spawn {
                        name: Some(name.to_string()),
                        ..Spawn::new(path)
                    })
                    .map(|a| a.to_string()),
                    _ => Err("give a name and a component".into()),
                };
                answer.unwrap_or_else(|e| format!("err {e}")).into_bytes()
            }
            "grant" => match (
                words.next().and_then(Address::parse),
                words.next().and_then(Address::parse),
            ) {
                (Some(what), Some(to)) => Request::to(to)
                    .json(&"take")
                    .capabilities(vec![Capability::messaging(&what)])
                    .expects_response(Duration::from_secs(5))
                    .send_and_await_response()
                    .map(|m| m.body().to_vec())
                    .unwrap_or_else(|e| format!("err {}", e.kind).into_bytes()),
                _ => b"err bad addresses".to_vec(),
            },
            "caps" => {
                let mut held: Vec<String> = our_capabilities()
                    .iter()
                    .map(|c| format!("{} {}", c.issuer, c.params))
                    .collect();
                held.sort();
                held.join("\n").into_bytes()
            }
            "kv" => {
                // Sets a key in a database of this package and reads it back.
                let (db, key, value) = (words.next(), words.next(), words.next());
                let run = || -> Result<Vec<u8>, spindle_process::DbError> {
                    let db = spindle_process::kv::open(db.unwrap_or("native"))?;
                    let key = key.unwrap_or("k");
                    db.set(key, value.unwrap_or("").as_bytes().to_vec())?;
                    Ok(db.get(key)?.unwrap_or_default())
                };
                run().unwrap_or_else(|e| format!("err {e}").into_bytes())
            }
            "vfs" => {
                // Writes a file in this package's drive `files` and reads it back.
                let (path, text) = (words.next().unwrap_or("native.txt"), words.next());
                let run = || -> Result<Vec<u8>, spindle_process::vfs::VfsError> {
                    let d = spindle_process::vfs::drive("files")?;
                    d.write(path, text.unwrap_or("").as_bytes().to_vec())?;
                    d.read(path)
                };
                run().unwrap_or_else(|e| format!("err {e}").into_bytes())
            }
            "drop" => match words.next().and_then(Address::parse) {
                Some(a) => {
                    drop_capabilities(&[Capability::messaging(&a)]);
                    b"dropped".to_vec()
                }
                None => b"err bad address".to_vec(),
            },
            "blobtrip" => {
                let target = words.next().and_then(Address::parse);
                let size: usize = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
                let blob = pattern(size);
                let sent = fingerprint(&blob);
                match target {
                    None => b"err bad target".to_vec(),
                    Some(t) => {
                        // Timed: from the send to the blob back in hand.
                        let start = Instant::now();
                        let back = Request::to(t)
                            .body(b"reflect".to_vec())
                            .blob(blob)
                            .expects_response(Duration::from_secs(30))
                            .send_and_await_response()
                            .map(|_| get_blob());
                        let took = start.elapsed().as_micros();
                        match back {
                            Err(e) => format!("err {}", e.kind).into_bytes(),
                            Ok(None) => b"err no blob back".to_vec(),
                            Ok(Some(b))
                                if b.bytes.len() == size && fingerprint(&b.bytes) == sent =>
                            {
                                format!("ok {size} in {took} µs").into_bytes()
                            }
                            Ok(Some(b)) => {
                                format!("err blob changed ({} bytes back)", b.bytes.len())
                                    .into_bytes()
                            }
                        }
                    }
                }
            }
            op @ ("bench" | "flood") => {
                let target = words.next().and_then(Address::parse);
                let n: u64 = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
                let Some(target) = target else {
                    let _ = Response::new().body("err bad target").send();
                    continue;
                };
                if op == "bench" {
                    let ok = (0..n)
                        .filter(|_| call(&target, b"x", Duration::from_secs(5)).is_ok())
                        .count();
                    format!("ok {ok}").into_bytes()
                } else {
                    let sent = (0..n)
                        .filter(|_| {
                            Request::to(target.clone())
                                .body(b"s".to_vec())
                                .send()
                                .is_ok()
                        })
                        .count();
                    let counted =
                        call(&target, b"count", Duration::from_secs(60)).unwrap_or_default();
                    format!("sent {sent} counted {}", String::from_utf8_lossy(&counted))
                        .into_bytes()
                }
            }
            _ => msg.body().to_vec(),
        };
        let _ = Response::new().body(answer).send();
    }
}

/// `size` bytes of a 251-byte pattern (so a shifted or reordered copy differs).
fn pattern(size: usize) -> Vec<u8> {
    let unit: Vec<u8> = (0..251u8).collect();
    let mut out = Vec::with_capacity(size);
    while out.len() < size {
        let n = (size - out.len()).min(unit.len());
        out.extend_from_slice(&unit[..n]);
    }
    out
}

/// A position-sensitive checksum, cheap enough for megabytes.
fn fingerprint(bytes: &[u8]) -> u64 {
    bytes.chunks(8).enumerate().fold(0u64, |acc, (i, c)| {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        acc.wrapping_add(u64::from_le_bytes(w).wrapping_mul(i as u64 | 1))
    })
}
