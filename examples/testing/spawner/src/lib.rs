//! Benchmark guest: the parent's view of a spawn. Its children are copies of
//! this component; a child named `idle-…` waits for messages (and answers
//! each), one named `quick-…` answers one request and returns from `init`.
//!
//! - `{"idle": N}` spawns N idle children (they stay) and answers with the
//!   timing of each `spawn()` call: `{"n", "median_us", "p90_us", "mean_us"}`.
//! - `{"transactions": N}` runs N transactions one after another: spawn a
//!   quick child, hand it its job and await the answer (the child then
//!   ends). Answers with the same figures, per transaction.
//! - `"ping"` answers `"pong"` (a child or the parent).

use spindle_process::{Address, Request, Response, Spawn, await_message, spawn};
use std::time::Instant;

spindle_process::init!(run);

fn run(our: Address) {
    if our.process().starts_with("quick-") {
        // One job, then the end.
        loop {
            if let Ok(m) = await_message()
                && m.is_request()
            {
                let _ = Response::new().body("done").send();
                return;
            }
        }
    }
    let mut next = 0u64;
    loop {
        let Ok(msg) = await_message() else { continue };
        if !msg.is_request() {
            continue;
        }
        let Ok(ask) = serde_json::from_slice::<serde_json::Value>(msg.body()) else {
            continue;
        };
        let answer = if let Some(n) = ask["idle"].as_u64() {
            let mut us = Vec::with_capacity(n as usize);
            for _ in 0..n {
                next += 1;
                let mut s = Spawn::new("spawner.wasm");
                s.name = Some(format!("idle-{next}"));
                let t = Instant::now();
                if let Err(e) = spawn(&s) {
                    us.clear();
                    us.push(-1.0);
                    spindle_process::println!("spawn {next} failed: {e}");
                    break;
                }
                us.push(t.elapsed().as_secs_f64() * 1e6);
            }
            figures(us)
        } else if let Some(n) = ask["transactions"].as_u64() {
            let mut us = Vec::with_capacity(n as usize);
            for _ in 0..n {
                next += 1;
                let mut s = Spawn::new("spawner.wasm");
                s.name = Some(format!("quick-{next}"));
                let t = Instant::now();
                let done = spawn(&s).map_err(|e| e.to_string()).and_then(|child| {
                    Request::to(child)
                        .body("job")
                        .expects_response(std::time::Duration::from_secs(10))
                        .send_and_await_response()
                        .map_err(|e| e.to_string())
                });
                if let Err(e) = done {
                    spindle_process::println!("transaction {next} failed: {e}");
                    us.clear();
                    us.push(-1.0);
                    break;
                }
                us.push(t.elapsed().as_secs_f64() * 1e6);
            }
            figures(us)
        } else {
            serde_json::json!("pong")
        };
        let _ = Response::new().json(&answer).send();
    }
}

fn figures(mut us: Vec<f64>) -> serde_json::Value {
    if us.is_empty() || us[0] < 0.0 {
        return serde_json::json!({"error": "a spawn failed: see the log"});
    }
    us.sort_by(f64::total_cmp);
    let at = |q: f64| us[((us.len() - 1) as f64 * q) as usize];
    serde_json::json!({
        "n": us.len(),
        "median_us": at(0.5),
        "p90_us": at(0.9),
        "mean_us": us.iter().sum::<f64>() / us.len() as f64,
    })
}
