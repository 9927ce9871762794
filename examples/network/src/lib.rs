//! `peer`: one process on each of two nodes (see README.md here).
//!
//! - `ping <address>`: greets that process, awaits its answer, and says
//!   what came back and how long it took — or why nothing did
//!   (`offline` when its node cannot be reached).
//! - `blob <address> <bytes>`: sends a blob of that size; the other side
//!   answers with what it got and sends the blob back.
//! - a request with a blob: answered `got N bytes`, with the blob back.
//! - anything else: answered `heard "<body>" from <sender>` — the sender's
//!   address as this node knows it, its node name given by the link's key.

use spindle_process::{Address, Request, Response, await_message, get_blob, has_blob};
use std::time::{Duration, Instant};

spindle_process::init!(run);

const WAIT: Duration = Duration::from_secs(30);

fn run(_our: Address) {
    loop {
        let Ok(msg) = await_message() else { continue };
        if !msg.is_request() {
            continue;
        }
        let text = String::from_utf8_lossy(msg.body()).into_owned();
        let mut words = text.split_whitespace();
        let answer = match (words.next(), words.next().and_then(Address::parse)) {
            (Some("ping"), Some(to)) => ping(to),
            (Some("blob"), Some(to)) => {
                let n = words.next().and_then(|n| n.parse().ok()).unwrap_or(1 << 20);
                blob(to, n)
            }
            _ if has_blob() => {
                let n = get_blob().map_or(0, |b| b.bytes.len());
                // `inherit` sends the request's blob back without copying it.
                let _ = Response::new()
                    .inherit(true)
                    .body(format!("got {n} bytes"))
                    .send();
                continue;
            }
            _ => format!("heard {text:?} from {}", msg.source()),
        };
        let _ = Response::new().body(answer).send();
    }
}

fn ping(to: Address) -> String {
    let t = Instant::now();
    match Request::to(to.clone())
        .body("hello")
        .expects_response(WAIT)
        .send_and_await_response()
    {
        Ok(m) => format!(
            "{to} answered: {} ({} µs)",
            String::from_utf8_lossy(m.body()),
            t.elapsed().as_micros()
        ),
        Err(e) => format!("{to} did not answer: {}", e.kind),
    }
}

fn blob(to: Address, n: usize) -> String {
    let bytes: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    let t = Instant::now();
    match Request::to(to.clone())
        .body("blob")
        .blob(bytes)
        .expects_response(WAIT)
        .send_and_await_response()
    {
        Ok(m) => {
            let back = get_blob().map_or(0, |b| b.bytes.len());
            format!(
                "sent {n} bytes to {to}: {:?}; {back} bytes came back; {} ms in all",
                String::from_utf8_lossy(m.body()),
                t.elapsed().as_millis()
            )
        }
        Err(e) => format!("{to} did not take the blob: {}", e.kind),
    }
}
