//! One job, then exit. The result goes back to the parent as an on-exit
//! request (so it is sent even though nobody awaits this process). A job with
//! a negative input crashes on its first attempt: the parent's crash notice,
//! set at spawn, then fires instead, and the parent retries.

use serde::Deserialize;
use spindle_process::{OnExit, await_message, exit_request, get_on_exit, set_on_exit};

#[derive(Deserialize)]
struct Job {
    id: u64,
    input: i64,
    attempt: u32,
}

spindle_process::init!(run);

fn run(_our: spindle_process::Address) {
    let (parent, job) = loop {
        match await_message() {
            Ok(msg) if msg.is_request() => match msg.json::<Job>() {
                Ok(job) => break (msg.source().clone(), job),
                Err(_) => continue,
            },
            _ => continue,
        }
    };
    if job.input < 0 && job.attempt == 1 {
        panic!(
            "job {} cannot take a negative input on a first attempt",
            job.id
        );
    }
    let result = job.input * job.input;
    let done = serde_json::json!({"done": {"id": job.id, "result": result}});
    // Replace the crash notice with the result; keep nothing else.
    debug_assert!(matches!(get_on_exit(), OnExit::Requests(_)));
    set_on_exit(&OnExit::Requests(vec![exit_request(
        parent,
        serde_json::to_vec(&done).unwrap(),
    )]));
}
