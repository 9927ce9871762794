//! `spindle demo`: a throw-away node in a temporary home, a few example
//! processes (one crash-loops and is restarted by the schedule), and what
//! `ls` and `logs` show about them. Leaves nothing behind.

use crate::commands::{Failure, connect};
use spindle_types::ProcessSpec;
use spindle_types::control::{LogStream, Response};
use spindle_types::manifest::parse_manifest;
use spindle_types::{ProcessNum, Selector};
use std::time::{Duration, Instant};

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
"#;

pub fn run() -> Result<(), Failure> {
    let home = std::env::temp_dir().join(format!("spindle-demo-{}", std::process::id()));
    let result = show(&home);
    if let Ok(c) = spindle_client::Client::connect(&home) {
        let _ = c.shutdown();
    }
    let _ = std::fs::remove_dir_all(&home);
    result
}

fn show(home: &std::path::Path) -> Result<(), Failure> {
    println!("== spindle demo: a throw-away node in {}", home.display());
    let t0 = Instant::now();
    let mut client = connect(home)?;
    println!(
        "daemon started (pid {}) in {:.1} ms",
        client.daemon_pid,
        t0.elapsed().as_secs_f64() * 1e3
    );
    let specs: Vec<ProcessSpec> = parse_manifest(MANIFEST, &std::env::temp_dir())?;
    let ids = client.start(specs)?;
    println!(
        "started {} processes: a ticker, a crasher (restart_at 100ms, 500ms, 1s, 2s), two workers sharing one name\n",
        ids.len()
    );
    for wait in [300u64, 1200, 2500] {
        std::thread::sleep(Duration::from_millis(wait));
        println!("-- spindle ls (at {:.1}s)", t0.elapsed().as_secs_f64());
        print!("{}", crate::table::render(&client.list()?));
        println!();
    }
    for (name, stream) in [("ticker", LogStream::Both), ("crasher", LogStream::Both)] {
        println!("-- spindle logs {name} --lines 4");
        client.logs(Selector::Name(name.into()), 4, false, stream, |r| {
            if let Response::LogLine { line, .. } = r {
                println!("{line}");
            }
            true
        })?;
        println!();
    }
    let t = Instant::now();
    let stopped = client.stop(Selector::Name("worker".into()))?;
    wait_down(&mut client, &stopped)?;
    println!(
        "-- spindle stop worker: both workers down in {:.0} ms (the stubborn one by SIGKILL after its 300ms grace)",
        t.elapsed().as_secs_f64() * 1e3
    );
    print!("{}", crate::table::render(&client.list()?));
    println!("\n== stopping the demo node");
    Ok(())
}

fn wait_down(client: &mut spindle_client::Client, ids: &[ProcessNum]) -> Result<(), Failure> {
    let end = Instant::now() + Duration::from_secs(10);
    while client
        .list()?
        .iter()
        .any(|p| ids.contains(&p.id) && p.pid.is_some())
    {
        if Instant::now() > end {
            return Err("workers did not stop".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}
