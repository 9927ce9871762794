//! Test guest. Any request is answered with its own body, except:
//! `loop` spins forever, `grow` allocates until the memory cap stops it,
//! `panic` panics, `exit` returns from `init`, `blob` answers with the size
//! and byte sum of the request's blob and its metadata, and
//! `call <address> <timeout-ms> <body>` sends `body` to that address, awaits
//! the response and answers with `ok <body>` or `err <kind>`.

use spindle_process::{Address, Request, Response, await_message, get_blob};
use std::time::Duration;

spindle_process::init!(run);

fn run(_our: Address) {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
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
            b"blob" => {
                let (len, sum) = get_blob()
                    .map(|b| (b.bytes.len(), b.bytes.iter().map(|&x| x as u64).sum::<u64>()))
                    .unwrap_or((0, 0));
                let meta = msg.metadata().unwrap_or("-").to_string();
                let _ = Response::new().body(format!("{len} {sum} {meta}")).send();
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
