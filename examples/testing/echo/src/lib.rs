//! Test guest. Any request is answered with its own body, except:
//! `loop` spins forever, `grow` allocates until the memory cap stops it,
//! `panic` panics, `exit` returns from `init`, `blob` answers with the size
//! and byte sum of the request's blob and its metadata, and
//! `call <address> <timeout-ms> <body>` sends `body` to that address, awaits
//! the response and answers with `ok <body>` or `err <kind>`.
//! `spawn <name>` starts a private, always-restarted copy of echo under that
//! name (so only this process may message it) and answers with its address.
//! `sleep <ms>` answers `slept` after that long. `reflect` answers with the
//! request's own blob (inherited: it never enters this process).
//! For benchmarks: `bench <address> <n>` makes n request/response round trips
//! to that address; `s` is counted silently; `count` answers with the count;
//! `flood <address> <n>` sends n `s` one-way, then awaits that address's count.
//! `blobto <address> <n> <body>` sends `body` with an n-byte blob (byte i is
//! i % 251) and answers `ok <response body>|<its blob's size> <byte sum>`.
//! `fwd <address> <body>` hands the request on to that address with
//! `inherit` and `body`: the answer goes to the requester, not here.
//! `blobtime <address> <n>` makes that blob first, then sends it with the
//! body `x` (answered without the blob entering the target) and answers
//! with the microseconds from send to answer.

use spindle_process::{Address, OnExit, Request, Response, Spawn, await_message, get_blob, spawn};
use std::time::Duration;

spindle_process::init!(run);

fn stopping() {
    spindle_process::println!("echo: stopping cleanly");
}

fn run(_our: Address) {
    spindle_process::on_stopping(stopping);
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    let mut sunk: u64 = 0;
    loop {
        let Ok(msg) = await_message() else { continue };
        if !msg.is_request() {
            continue;
        }
        match msg.body() {
            b"loop" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            b"grow" => loop {
                hoard.push(vec![1u8; 1 << 20]);
            },
            b"panic" => panic!("echo was asked to panic"),
            b"exit" => return,
            b"s" => sunk += 1,
            b"reflect" => {
                let _ = Response::new().inherit(true).body("reflected").send();
            }
            b"count" => {
                let _ = Response::new().body(sunk.to_string()).send();
            }
            body if body.starts_with(b"bench ") || body.starts_with(b"flood ") => {
                let text = String::from_utf8_lossy(body).into_owned();
                let mut parts = text.split(' ');
                let op = parts.next().unwrap_or_default();
                let target = parts.next().and_then(Address::parse);
                let n: u64 = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0);
                let Some(target) = target else {
                    let _ = Response::new().body("err bad target").send();
                    continue;
                };
                let answer = if op == "bench" {
                    let mut ok = 0;
                    for _ in 0..n {
                        if Request::to(target.clone())
                            .body(b"x".to_vec())
                            .expects_response(Duration::from_secs(5))
                            .send_and_await_response()
                            .is_ok()
                        {
                            ok += 1;
                        }
                    }
                    format!("ok {ok}")
                } else {
                    let mut sent = 0;
                    for _ in 0..n {
                        if Request::to(target.clone())
                            .body(b"s".to_vec())
                            .send()
                            .is_ok()
                        {
                            sent += 1;
                        }
                    }
                    // The link or mailbox may still be full of the flood:
                    // the count is asked again until it gets in (each try
                    // already waits for room as the guest library does).
                    let mut counted = String::new();
                    for _ in 0..100 {
                        match Request::to(target.clone())
                            .body(b"count".to_vec())
                            .expects_response(Duration::from_secs(60))
                            .send_and_await_response()
                        {
                            Ok(m) => {
                                counted = String::from_utf8_lossy(m.body()).into_owned();
                                break;
                            }
                            Err(e)
                                if matches!(
                                    e.kind,
                                    spindle_process::SendErrorKind::MailboxFull
                                ) => {}
                            Err(_) => break,
                        }
                    }
                    format!("sent {sent} counted {counted}")
                };
                let _ = Response::new().body(answer).send();
            }
            body if body.starts_with(b"fwd ") => {
                let text = String::from_utf8_lossy(&body[4..]).into_owned();
                let (to, inner) = text.split_once(' ').unwrap_or((&text, ""));
                if let Some(to) = Address::parse(to) {
                    let _ = Request::to(to)
                        .inherit(true)
                        .body(inner.as_bytes().to_vec())
                        .send();
                }
            }
            body if body.starts_with(b"blobtime ") => {
                let text = String::from_utf8_lossy(body).into_owned();
                let mut parts = text.split(' ').skip(1);
                let target = parts.next().and_then(Address::parse);
                let n: usize = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0);
                let answer = match target {
                    Some(t) => {
                        let blob: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
                        let start = std::time::Instant::now();
                        match Request::to(t)
                            .body(b"x".to_vec())
                            .blob(blob)
                            .expects_response(Duration::from_secs(60))
                            .send_and_await_response()
                        {
                            Ok(_) => start.elapsed().as_micros().to_string(),
                            Err(e) => format!("err {}", e.kind),
                        }
                    }
                    None => "err bad target".to_string(),
                };
                let _ = Response::new().body(answer).send();
            }
            body if body.starts_with(b"blobto ") => {
                let text = String::from_utf8_lossy(body).into_owned();
                let mut parts = text.splitn(4, ' ').skip(1);
                let target = parts.next().and_then(Address::parse);
                let n: usize = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0);
                let inner = parts.next().unwrap_or("").to_string();
                let answer = match target {
                    Some(t) => {
                        let blob: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
                        match Request::to(t)
                            .body(inner.into_bytes())
                            .blob(blob)
                            .expects_response(Duration::from_secs(60))
                            .send_and_await_response()
                        {
                            Ok(m) => {
                                let (len, sum) = get_blob()
                                    .map(|b| {
                                        (
                                            b.bytes.len(),
                                            b.bytes.iter().map(|&x| x as u64).sum::<u64>(),
                                        )
                                    })
                                    .unwrap_or((0, 0));
                                format!("ok {}|{len} {sum}", String::from_utf8_lossy(m.body()))
                            }
                            Err(e) => format!("err {}", e.kind),
                        }
                    }
                    None => "err bad target".to_string(),
                };
                let _ = Response::new().body(answer).send();
            }
            b"blob" => {
                let (len, sum) = get_blob()
                    .map(|b| {
                        (
                            b.bytes.len(),
                            b.bytes.iter().map(|&x| x as u64).sum::<u64>(),
                        )
                    })
                    .unwrap_or((0, 0));
                let meta = msg.metadata().unwrap_or("-").to_string();
                let _ = Response::new().body(format!("{len} {sum} {meta}")).send();
            }
            body if body.starts_with(b"sleep ") => {
                let ms = String::from_utf8_lossy(&body[6..]).parse().unwrap_or(0);
                std::thread::sleep(Duration::from_millis(ms));
                let _ = Response::new().body("slept").send();
            }
            body if body.starts_with(b"spawn ") => {
                let name = String::from_utf8_lossy(&body[6..]).into_owned();
                let answer = match spawn(&Spawn {
                    name: Some(name),
                    on_exit: OnExit::Restart,
                    ..Spawn::new("echo.wasm")
                }) {
                    Ok(child) => child.to_string(),
                    Err(e) => format!("err {e}"),
                };
                let _ = Response::new().body(answer).send();
            }
            body if body.starts_with(b"call ") => {
                let text = String::from_utf8_lossy(body).into_owned();
                let mut parts = text.splitn(4, ' ').skip(1);
                let (target, timeout, inner) = (
                    parts.next().and_then(Address::parse),
                    parts.next().and_then(|t| t.parse::<u64>().ok()),
                    parts.next().unwrap_or(""),
                );
                let answer = match (target, timeout) {
                    (Some(t), Some(ms)) => match Request::to(t)
                        .body(inner.as_bytes().to_vec())
                        .expects_response(Duration::from_millis(ms))
                        .send_and_await_response()
                    {
                        Ok(m) => format!("ok {}", String::from_utf8_lossy(m.body())),
                        Err(e) => format!("err {}", e.kind),
                    },
                    _ => "err bad call".to_string(),
                };
                let _ = Response::new().body(answer).send();
            }
            body => {
                let _ = Response::new().body(body.to_vec()).send();
            }
        }
    }
}
