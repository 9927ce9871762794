//! `spindle demo`: the whole system on a throw-away node in a temporary home.
//! Native services (one crash-loops and is restarted by the schedule, one
//! ignores SIGTERM), wasm processes (a counter whose state survives its
//! crash, a parent that runs each job in a worker process of its own), a
//! request/response round trip, and — when `node` is on `PATH` — a few lines
//! of the Node control API. The components are embedded in the binary, so
//! the demo needs no file beside it; it leaves nothing behind.

use crate::commands::{Failure, connect};
use spindle_client::Client;
use spindle_types::control::{LogStream, ProcessInfo, Response, StateLabel};
use spindle_types::manifest::parse_manifest;
use spindle_types::{ProcessSpec, Selector};
use std::path::Path;
use std::time::{Duration, Instant};

mod node_api;

const MANIFEST: &str = r#"
[[process]]
name = "ticker"
command = "sh"
args = ["-c", "i=0; while true; do i=$((i+1)); echo \"tick $i\"; sleep 0.5; done"]

[[process]]
name = "crasher"
command = "sh"
args = ["-c", "echo 'crasher: starting, will fail in 200ms'; sleep 0.2; echo 'crasher: giving up' >&2; exit 3"]
restart_at = ["100ms", "500ms", "1s", "2s"]

[[process]]
name = "worker"
command = "sh"
args = ["-c", "echo \"worker $SPINDLE_ID ready\"; exec sleep 3600"]

[[process]]
name = "worker"
command = "sh"
args = ["-c", "trap '' TERM; echo \"stubborn worker $SPINDLE_ID ignores SIGTERM\"; while true; do sleep 1; done"]
grace = "300ms"

[[process]]
name = "counter"
wasm = "counter.wasm"
package = "demo:spindle"
public = true

[[process]]
name = "jobs"
wasm = "parent.wasm"
package = "demo:spindle"
public = true
"#;

/// The counter's address (its name and package in the manifest).
const COUNTER: &str = "local@counter:demo:spindle";
/// The parent's address.
const JOBS: &str = "local@jobs:demo:spindle";
/// How long the demo waits for anything it shows: far more than any step takes.
const STEP_DEADLINE: Duration = Duration::from_secs(10);
/// How long a request of the demo may wait for its response.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

pub fn run() -> Result<(), Failure> {
    let home = std::env::temp_dir().join(format!("spindle-demo-{}", std::process::id()));
    let result = show(&home);
    if let Ok(c) = Client::connect(&home) {
        let _ = c.shutdown();
    }
    let _ = std::fs::remove_dir_all(&home);
    result
}

fn show(home: &Path) -> Result<(), Failure> {
    println!("== spindle demo: a throw-away node in {}", home.display());
    let components = home.join("components");
    std::fs::create_dir_all(&components)?;
    for (file, bytes) in spindle_guests::DEMO_COMPONENTS {
        std::fs::write(components.join(file), bytes)?;
    }
    let t0 = Instant::now();
    let mut client = connect(home)?;
    println!(
        "daemon started (pid {}) in {:.1} ms",
        client.daemon_pid,
        t0.elapsed().as_secs_f64() * 1e3
    );
    let specs: Vec<ProcessSpec> = parse_manifest(MANIFEST, &components)?;
    let ids = client.start(specs)?;
    println!(
        "started {} processes: native ticker, crasher (restart_at 100ms, 500ms, 1s, 2s) and two workers sharing one name; wasm counter and jobs",
        ids.len()
    );

    println!("\n== wasm: a request and its response, a crash, the state kept");
    send(&mut client, COUNTER, r#"{"add": 5}"#)?;
    send(&mut client, COUNTER, r#""crash""#)?;
    let counter = wait_for(&mut client, "the counter to be restarted", |l| {
        l.iter()
            .find(|p| p.name.as_deref() == Some("counter"))
            .filter(|p| p.restarts >= 1 && p.state == StateLabel::Running)
            .cloned()
    })?;
    println!(
        "-- the node restarted it (restarts {}), last exit: {}",
        counter.restarts,
        counter
            .last_exit
            .as_ref()
            .map(|e| e.to_string())
            .unwrap_or_default()
    );
    send(&mut client, COUNTER, r#""get""#)?;

    println!("\n== wasm: one worker process per job; a crashed worker is retried");
    // Untimed: a worker's component is compiled at its first spawn.
    for job in [
        r#"{"job": {"id": 1, "input": 7}}"#,
        r#"{"job": {"id": 2, "input": -3}}"#,
    ] {
        let reply = client.send(JOBS, job, SEND_TIMEOUT)?;
        println!("-- spindle send {JOBS} '{job}'\n{reply}");
    }
    for id in [1, 2] {
        let body = format!(r#"{{"result": {id}}}"#);
        let end = Instant::now() + STEP_DEADLINE;
        let reply = loop {
            let reply = client.send(JOBS, &body, SEND_TIMEOUT)?;
            if !reply.contains("pending") || Instant::now() > end {
                break reply;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        println!("-- spindle send {JOBS} '{body}'\n{reply}");
    }

    println!("\n== the Node control API (clients/node) on the same node");
    node_api::show(home)?;

    wait_for(&mut client, "the crasher's third restart", |l| {
        l.iter()
            .find(|p| p.name.as_deref() == Some("crasher") && p.restarts >= 3)
            .map(|_| ())
    })?;
    println!("\n-- spindle ls (at {:.1}s)", t0.elapsed().as_secs_f64());
    print!("{}", crate::table::render(&client.list()?));
    println!();
    for name in ["ticker", "crasher", "counter"] {
        println!("-- spindle logs {name} --lines 4");
        client.logs(
            Selector::Name(name.into()),
            4,
            false,
            LogStream::Both,
            |r| {
                if let Response::LogLine { line, .. } = r {
                    println!("{line}");
                }
                true
            },
        )?;
        println!();
    }
    let t = Instant::now();
    let stopped = client.stop(Selector::Name("worker".into()))?;
    wait_for(&mut client, "the workers to stop", |l| {
        (!l.iter().any(|p| stopped.contains(&p.id) && p.pid.is_some())).then_some(())
    })?;
    println!(
        "-- spindle stop worker: both workers down in {:.0} ms (the stubborn one by SIGKILL after its 300ms grace)",
        t.elapsed().as_secs_f64() * 1e3
    );
    print!("{}", crate::table::render(&client.list()?));
    println!("\n== stopping the demo node");
    Ok(())
}

/// Sends `body` to `target` as `spindle send` does, and prints what came
/// back with the round trip's time.
fn send(client: &mut Client, target: &str, body: &str) -> Result<(), Failure> {
    println!("-- spindle send {target} '{body}'");
    let t = Instant::now();
    match client.send(target, body, SEND_TIMEOUT) {
        Ok(reply) => println!(
            "{reply}    ({:.2} ms round trip)",
            t.elapsed().as_secs_f64() * 1e3
        ),
        Err(e) => println!("error: {e}"),
    }
    Ok(())
}

/// Polls the process list until `done` finds what it looks for.
fn wait_for<T>(
    client: &mut Client,
    what: &str,
    mut done: impl FnMut(&[ProcessInfo]) -> Option<T>,
) -> Result<T, Failure> {
    let end = Instant::now() + STEP_DEADLINE;
    loop {
        if let Some(found) = done(&client.list()?) {
            return Ok(found);
        }
        if Instant::now() > end {
            return Err(format!("the demo waited {STEP_DEADLINE:?} for {what}").into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
