//! `spindle run MANIFEST`: the foreground mode, as `pm2-runtime` is to PM2
//! (a container's entry point, a terminal session).
//!
//! The node runs in this process, in a private home, so it ends with it:
//! the daemon's loop runs on the main thread, and a second thread starts
//! the manifest's processes over the control socket and prints their
//! output as whole lines prefixed by process name (coloured on a terminal
//! unless `NO_COLOR` is set). SIGINT or SIGTERM stop every process within
//! its grace, then `run` exits 0; a manifest that cannot start exits 1, with
//! nothing left running. As PID 1 it reaps every orphan (the node reaps all
//! of its children, adopted ones included).

use crate::commands::Failure;
use spindle_client::Client;
use spindle_types::Selector;
use spindle_types::control::{LogStream, Response};
use spindle_types::manifest::parse_manifest;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long the node may take to open its socket.
const READY_DEADLINE: Duration = Duration::from_secs(10);
/// Lines of output printed from before the follower attached (all of a
/// fresh node's, in practice).
const BACKLOG: usize = 10_000;
/// Colours for process names (ANSI), in turn by id.
const COLOURS: [&str; 6] = ["36", "33", "32", "35", "34", "31"];

pub fn run(home: Option<PathBuf>, manifest: &Path) -> Result<(), Failure> {
    let text = std::fs::read_to_string(manifest)
        .map_err(|e| format!("cannot read manifest {}: {e}", manifest.display()))?;
    let abs = std::env::current_dir()?.join(manifest);
    let base = abs.parent().unwrap_or(Path::new("/"));
    let specs =
        parse_manifest(&text, base).map_err(|e| format!("manifest {}: {e}", manifest.display()))?;
    let (home, scratch) = match home {
        Some(h) => (h, false),
        None => (
            std::env::temp_dir().join(format!("spindle-run-{}", std::process::id())),
            true,
        ),
    };
    crate::commands::init_logging(tracing::Level::WARN);
    let failed = Arc::new(AtomicBool::new(false));
    let feeder = {
        let (home, failed) = (home.clone(), failed.clone());
        std::thread::spawn(move || feed(&home, specs, &failed))
    };
    let ran = spindle_daemon::run(&home, None, crate::commands::compiler());
    if ran.is_ok() {
        let _ = feeder.join();
    }
    if scratch {
        let _ = std::fs::remove_dir_all(&home);
    }
    ran?;
    if failed.load(Ordering::Acquire) {
        return Err("the manifest's processes could not start; nothing was left running".into());
    }
    Ok(())
}

/// Starts the processes and prints their output until the node ends.
fn feed(home: &Path, specs: Vec<spindle_types::ProcessSpec>, failed: &AtomicBool) {
    // The node closes inherited descriptors as it boots: open none before
    // its socket exists.
    let socket = spindle_client::socket_path(home);
    let end = Instant::now() + READY_DEADLINE;
    let mut client = loop {
        if socket.exists()
            && let Ok(c) = Client::connect(home)
        {
            break c;
        }
        if Instant::now() > end {
            eprintln!(
                "spindle: error: the node did not come up in {}s",
                READY_DEADLINE.as_secs()
            );
            failed.store(true, Ordering::Release);
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    if let Err(e) = client.start(specs) {
        eprintln!("spindle: error: {e}");
        failed.store(true, Ordering::Release);
        // The node is this process: ask it to stop, and let `run` end
        // (`Client::shutdown` would wait for this very process to exit).
        let _ = client.call(&spindle_types::control::Request::Shutdown);
        return;
    }
    let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let Ok(mut follower) = Client::connect(home) else {
        return;
    };
    let stdout = std::io::stdout();
    let mut w = stdout.lock();
    let _ = follower.logs(Selector::All, BACKLOG, true, LogStream::Both, |resp| {
        let ok = match resp {
            Response::LogLine { id, name, line, .. } => {
                let who = name.unwrap_or_else(|| id.to_string());
                if colour {
                    let c = COLOURS[(id.0 as usize) % COLOURS.len()];
                    writeln!(w, "\x1b[{c}m{who}\x1b[0m | {line}")
                } else {
                    writeln!(w, "{who} | {line}")
                }
            }
            Response::LogGap { id, missed } => writeln!(
                w,
                "spindle | {missed} chunks of output from process {id} skipped: reading too slowly"
            ),
            _ => Ok(()),
        };
        ok.and_then(|_| w.flush()).is_ok()
    });
}
