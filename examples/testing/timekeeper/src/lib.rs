//! Test guest for the timer module. Each request is a command; the
//! response is its outcome (`err <kind>` on failure):
//! `set <ms> <context>` and `durable <ms> <context>` (`set <id>`),
//! `at <unix_ms> <context>`, `cancel <id>` (`true`/`false`),
//! `sleep <ms>` (`slept <ms>`: how long it took), `fired` (every timer
//! event since the run began: `<id>:<fired|cancelled>:<context>` joined by
//! `,`, oldest first; a refused timer as `err:<kind>`).
//! Timed, for benchmarks: `precision <pending> <ms> <rounds>` sets
//! `pending` timers an hour away, then `rounds` timers `ms` away one after
//! another, and answers `ok p50 <ns> max <ns>` (how late each fired,
//! as the guest sees it); the far timers go when the run ends.

use spindle_process::timer::{self, TimerId};
use spindle_process::{Address, Message, Request, Response, await_message};
use std::time::{Duration, Instant, SystemTime};

spindle_process::init!(run);

fn run(_our: Address) {
    let mut events: Vec<String> = Vec::new();
    loop {
        let Ok(msg) = await_message() else { continue };
        if let Some(e) = timer::event(&msg) {
            events.push(match e {
                Ok(f) => format!(
                    "{}:{}:{}",
                    f.id.0,
                    if f.cancelled { "cancelled" } else { "fired" },
                    String::from_utf8_lossy(&f.context.unwrap_or_default())
                ),
                Err(e) => format!("err:{}", e.kind),
            });
            continue;
        }
        if !msg.is_request() {
            continue;
        }
        let answer = handle(&msg, &events).unwrap_or_else(|e| format!("err {e}"));
        let _ = Response::new().body(answer).send();
    }
}

fn handle(msg: &Message, events: &[String]) -> Result<String, timer::TimerError> {
    let text = String::from_utf8_lossy(msg.body()).into_owned();
    let mut w = text.split(' ');
    let op = w.next().unwrap_or_default();
    let mut num = || w.next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
    let ms = Duration::from_millis;
    Ok(match op {
        "set" => {
            let d = num();
            let ctx = text.splitn(3, ' ').nth(2).unwrap_or_default();
            format!("set {}", timer::set(ms(d), ctx.as_bytes().to_vec())?.0)
        }
        "at" => {
            let at = SystemTime::UNIX_EPOCH + ms(num());
            let ctx = text.splitn(3, ' ').nth(2).unwrap_or_default();
            format!("set {}", timer::set_at(at, ctx.as_bytes().to_vec())?.0)
        }
        "durable" => {
            let d = num();
            let ctx = text.splitn(3, ' ').nth(2).unwrap_or_default();
            format!("set {}", timer::set_durable(ms(d), &ctx)?.0)
        }
        "cancel" => timer::cancel(TimerId(num()))?.to_string(),
        "sleep" => {
            let t = Instant::now();
            timer::sleep(ms(num()))?;
            format!("slept {}", t.elapsed().as_millis())
        }
        "fired" => events.join(","),
        "precision" => {
            let (pending, d, rounds) = (num(), num(), num());
            precision(pending, ms(d), rounds)?
        }
        _ => "err unknown command".into(),
    })
}

fn precision(pending: u64, d: Duration, rounds: u64) -> Result<String, timer::TimerError> {
    // The far timers expect no response (a process awaits at most a few
    // thousand responses at once): they would come as requests in an hour.
    let module = Address::parse("local@timer:sys:spindle").expect("the module's address");
    for _ in 0..pending {
        Request::to(module.clone())
            .json(&serde_json::json!({"op": "after", "ms": 3_600_000}))
            .send()
            .map_err(timer::TimerError::from)?;
    }
    let mut late = Vec::with_capacity(rounds as usize);
    for _ in 0..rounds {
        let t = Instant::now();
        timer::sleep(d)?;
        late.push(t.elapsed().saturating_sub(d));
    }
    late.sort();
    let p50 = late.get(late.len() / 2).copied().unwrap_or_default();
    let max = late.last().copied().unwrap_or_default();
    Ok(format!("ok p50 {} max {}", p50.as_nanos(), max.as_nanos()))
}
