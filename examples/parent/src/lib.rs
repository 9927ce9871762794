//! A daemon that runs risky work in transactions (the founding notes' process
//! roles): one worker process per job. The parent owns the state — the jobs
//! and their results — so a crashed worker is simply started again from it.
//!
//! - `{"job": {"id": 1, "input": 7}}` → `{"accepted": 1}`: saves the job,
//!   spawns `worker.wasm` with `on_exit = requests([{"crashed": 1}])`, and
//!   sends it the job. The worker replaces that on-exit request with its
//!   result before it returns, so either way the parent hears back.
//! - `{"done": {...}}` / `{"crashed": id}` arrive from exiting workers.
//!   A crashed job is retried up to `MAX_ATTEMPTS` times.
//! - `{"result": 1}` → `{"result": 49}`, `{"pending": 1}` or `{"failed": 1}`.

use serde::{Deserialize, Serialize};
use spindle_process::{
    Address, OnExit, Request, Response, Spawn, await_message, exit_request, get_state_json,
    println, set_state_json, spawn,
};
use std::collections::BTreeMap;

/// Attempts per job before it is marked failed.
const MAX_ATTEMPTS: u32 = 3;

#[derive(Serialize, Deserialize, Clone)]
pub struct Job {
    pub id: u64,
    pub input: i64,
    #[serde(default)]
    pub attempt: u32,
}

#[derive(Serialize, Deserialize, Default)]
struct State {
    pending: BTreeMap<u64, Job>,
    results: BTreeMap<u64, i64>,
    failed: Vec<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum In {
    Job(Job),
    Done { id: u64, result: i64 },
    Crashed(u64),
    Result(u64),
}

spindle_process::init!(run);

fn run(our: Address) {
    let mut state: State = get_state_json().unwrap_or_default();
    println!("{our}: {} jobs pending", state.pending.len());
    // Jobs that were running when the node went down start again.
    for job in state.pending.values().cloned().collect::<Vec<_>>() {
        start_worker(&our, job);
    }
    loop {
        let Ok(msg) = await_message() else { continue };
        if !msg.is_request() {
            continue;
        }
        let Ok(input) = msg.json::<In>() else {
            println!("unknown request from {}", msg.source());
            continue;
        };
        match input {
            In::Job(mut job) => {
                job.attempt = 1;
                state.pending.insert(job.id, job.clone());
                save(&state);
                let _ = Response::new()
                    .json(&serde_json::json!({"accepted": job.id}))
                    .send();
                start_worker(&our, job);
            }
            In::Done { id, result } => {
                state.pending.remove(&id);
                state.results.insert(id, result);
                save(&state);
            }
            In::Crashed(id) => {
                let Some(mut job) = state.pending.remove(&id) else {
                    continue;
                };
                if job.attempt >= MAX_ATTEMPTS {
                    println!("job {id} failed {MAX_ATTEMPTS} times; giving up");
                    state.failed.push(id);
                } else {
                    job.attempt += 1;
                    println!(
                        "job {id}: worker crashed, retrying (attempt {})",
                        job.attempt
                    );
                    state.pending.insert(id, job.clone());
                    start_worker(&our, job);
                }
                save(&state);
            }
            In::Result(id) => {
                let answer = if let Some(r) = state.results.get(&id) {
                    serde_json::json!({"result": r})
                } else if state.failed.contains(&id) {
                    serde_json::json!({"failed": id})
                } else {
                    serde_json::json!({"pending": id})
                };
                let _ = Response::new().json(&answer).send();
            }
        }
    }
}

fn save(state: &State) {
    if let Err(e) = set_state_json(state) {
        println!("cannot save state: {e}");
    }
}

fn start_worker(our: &Address, job: Job) {
    let notice = serde_json::to_vec(&serde_json::json!({"crashed": job.id})).unwrap();
    let mut s = Spawn::new("worker.wasm");
    s.on_exit = OnExit::Requests(vec![exit_request(our.clone(), notice)]);
    match spawn(&s) {
        Ok(worker) => {
            if let Err(e) = Request::to(worker).json(&job).send() {
                println!("job {}: cannot reach the worker: {e}", job.id);
            }
        }
        Err(e) => println!("job {}: cannot spawn a worker: {e}", job.id),
    }
}
