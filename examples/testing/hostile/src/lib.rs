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
//! - `extremes <address>`: calls each host import with sizes, lengths and
//!   timeouts at or past their limits (raw bindings, so no library check
//!   stands between it and the node); answers `name=result` pairs, `;`
//!   between them.
//! - `panic-huge`: panics with a 1 MiB message.
//! - `on-exit-flood`: sets an on-exit policy of 1,000 requests.
//! - `leftovers`: looks for what an earlier process in its pool slot left
//!   behind — in a static buffer (zero in the component's image), on the
//!   heap (a fresh allocation's bytes) and on its stack — answers `clean`
//!   or `dirty <where>`, then fills all three with [`MARK`] so a process
//!   after it would find them if the slot were not reset.
//! - `ping`: `pong` (it is still alive).

use spindle_process::bindings::spindle::process::host;
use spindle_process::wit;
use spindle_process::{
    Address, OnExit, Request, Response, Spawn, await_message, kv, spawn, sqlite,
};
use std::time::Duration;

spindle_process::init!(run);

/// What `leftovers` writes, for a later process of the slot to look for.
const MARK: u8 = 0xa5;
/// A run this long of [`MARK`] is what `leftovers` left: nothing else the
/// guest keeps (ids, times, pointers) looks like it.
const MARK_RUN: usize = 64;
/// Bytes of each region `leftovers` looks at: several pages.
const LOOKED_AT: usize = 16 << 10;
static mut LEFT: [u8; LOOKED_AT] = [0; LOOKED_AT];

/// Looks at the static buffer, a fresh heap allocation and a stretch of
/// stack for [`MARK`]s, then leaves its own.
fn leftovers() -> String {
    let mut dirty = Vec::new();
    let left = &raw mut LEFT;
    // SAFETY: the guest is single-threaded; the buffer is only used here.
    let left = unsafe { &mut *left };
    if marked(|i| left[i]) {
        dirty.push("static");
    }
    left.fill(MARK);
    let layout = std::alloc::Layout::from_size_align(LOOKED_AT, 4096).expect("a layout");
    // SAFETY: a valid layout; the bytes are read as they were handed out
    // (volatile, so the read is not assumed away), then written.
    unsafe {
        let p = std::alloc::alloc(layout);
        if !p.is_null() {
            if marked(|i| std::ptr::read_volatile(p.add(i))) {
                dirty.push("heap");
            }
            // Never freed: the process ends with it.
            std::ptr::write_bytes(p, MARK, LOOKED_AT);
        }
    }
    if stack_marked() {
        dirty.push("stack");
    }
    if dirty.is_empty() {
        "clean".into()
    } else {
        format!("dirty {}", dirty.join(","))
    }
}

/// Whether the [`LOOKED_AT`] bytes `at` reads hold a run of [`MARK_RUN`] marks.
fn marked(at: impl Fn(usize) -> u8) -> bool {
    let mut run = 0;
    for i in 0..LOOKED_AT {
        run = if at(i) == MARK { run + 1 } else { 0 };
        if run >= MARK_RUN {
            return true;
        }
    }
    false
}

/// Reads a stretch of fresh stack, then marks it.
#[inline(never)]
fn stack_marked() -> bool {
    let mut frame = std::mem::MaybeUninit::<[u8; LOOKED_AT]>::uninit();
    let p = frame.as_mut_ptr().cast::<u8>();
    // SAFETY: the frame's bytes are read as the stack holds them (volatile),
    // then written; nothing else uses them.
    unsafe {
        let found = marked(|i| std::ptr::read_volatile(p.add(i)));
        std::ptr::write_bytes(p, MARK, LOOKED_AT);
        std::hint::black_box(&frame);
        found
    }
}

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

/// `mailbox-full` for `SendErrorKind::MailboxFull`.
fn kind(e: &wit::SendError) -> String {
    let name = format!("{:?}", e.kind);
    let name = name.rsplit("::").next().unwrap_or_default();
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('-');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

fn raw_request(expects: Option<u64>, body: Vec<u8>) -> wit::Request {
    wit::Request {
        inherit: false,
        expects_response: expects,
        body,
        metadata: None,
        capabilities: vec![],
    }
}

fn garbage_caps(n: usize) -> Vec<wit::Capability> {
    (0..n)
        .map(|i| wit::Capability {
            issuer: format!("nobody{i}"),
            params: "\"messaging\"".into(),
        })
        .collect()
}

/// Each import with values at or past its limits; what each returned.
fn extremes(target: &str) -> String {
    let mut out: Vec<String> = vec![];
    let mut note = |name: &str, what: String| out.push(format!("{name}={what}"));
    let long = "x".repeat(100 << 10);
    let one_way = |to: &str, r: &wit::Request| match host::send_request(to, r, None, None) {
        Ok(()) => "ok".to_string(),
        Err(e) => kind(&e),
    };
    note("send-empty-target", one_way("", &raw_request(None, vec![])));
    note(
        "send-long-target",
        one_way(&long, &raw_request(None, vec![])),
    );
    let mut forged = raw_request(None, vec![]);
    forged.capabilities = garbage_caps(10_000);
    forged.metadata = Some(long.clone());
    note("send-forged-caps", one_way(target, &forged));
    // Awaited requests with large contexts: the host keeps the contexts, so
    // they count against the process's awaited budget.
    let context = vec![0u8; 1 << 20];
    let (mut kept, mut first) = (0, String::new());
    for _ in 0..100 {
        match host::send_request(
            target,
            &raw_request(Some(u64::MAX), b"ctx".to_vec()),
            Some(&context),
            None,
        ) {
            Ok(()) => kept += 1,
            Err(e) => {
                first = kind(&e);
                break;
            }
        }
    }
    note("await-contexts", format!("{kept}/{first}"));
    let awaited = |to: &str, ms| match host::send_and_await_response(
        to,
        &raw_request(Some(ms), b"hi".to_vec()),
        None,
    ) {
        Ok(_) => "ok".to_string(),
        Err(e) => kind(&e),
    };
    note("await-zero", awaited(target, 0));
    note("await-offline", awaited("local@nobody:evil:test", u64::MAX));
    note("room-garbage", host::wait_for_room(Some(&long)).to_string());
    note("room-none", host::wait_for_room(None).to_string());
    note("blob-none", format!("{}", host::get_blob().is_some()));
    let state = |bytes: &[u8]| match host::set_state(bytes) {
        Ok(()) => "ok".to_string(),
        Err(e) => e,
    };
    note("state-over", state(&vec![1u8; (16 << 20) + 1]));
    note("state-empty", state(&[]));
    note(
        "state-read",
        format!("{:?}", host::get_state().map(|s| s.len())),
    );
    let _ = host::clear_state();
    let spawn = |name: Option<&str>, path: &str, caps: &[wit::Capability], grants: &[String]| {
        match host::spawn(name, path, &wit::OnExit::None, caps, grants, false) {
            Ok(a) => format!("ok {a}"),
            Err(e) => e,
        }
    };
    note(
        "spawn-long-name",
        spawn(Some(&long), "hostile.wasm", &[], &[]),
    );
    note("spawn-long-path", spawn(None, &long, &[], &[]));
    note(
        "spawn-forged-caps",
        spawn(None, "hostile.wasm", &garbage_caps(10_000), &[]),
    );
    let grants: Vec<String> = (0..1_000)
        .map(|i| format!("local@g{i}:evil:test"))
        .collect();
    note(
        "spawn-many-grants",
        spawn(None, "hostile.wasm", &[], &grants),
    );
    host::save_capabilities(&garbage_caps(100_000));
    host::drop_capabilities(&garbage_caps(100_000));
    note("caps-held", host::our_capabilities().len().to_string());
    host::print(&"p".repeat(1 << 20));
    note("print", "ok".into());
    out.join(";")
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
            "leftovers" => answer(leftovers()),
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
            "extremes" => {
                let target = args.first().copied().unwrap_or_default().to_string();
                answer(extremes(&target));
            }
            "panic-huge" => panic!("{}", "p".repeat(1 << 20)),
            "on-exit-flood" => {
                let one = (
                    "local@nobody:evil:test".to_string(),
                    raw_request(None, vec![]),
                    None,
                );
                host::set_on_exit(&wit::OnExit::Requests(vec![one; 1_000]));
                answer("set");
            }
            _ => answer("unknown"),
        }
    }
}
