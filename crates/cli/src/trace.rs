//! `spindle trace`: the bus's traffic, one line per message, live.

use crate::commands::Failure;
use spindle_client::Client;
use spindle_types::control::{EventKind, ProcessEvent, Response, TraceKind, TraceRecord};
use std::io::Write;

pub fn run(
    client: &mut Client,
    address: Option<String>,
    package: Option<String>,
    json: bool,
) -> Result<(), Failure> {
    end_when_stdout_closes();
    let stdout = std::io::stdout();
    let mut w = stdout.lock();
    client.trace(address, package, |resp| {
        let ok = if json {
            serde_json::to_string(&resp)
                .map_err(std::io::Error::other)
                .and_then(|line| writeln!(w, "{line}"))
        } else {
            match text(&resp) {
                Some(line) => writeln!(w, "{line}"),
                None => Ok(()),
            }
        };
        // A closed stdout (`| head`) ends the trace.
        ok.and_then(|_| w.flush()).is_ok()
    })?;
    Ok(())
}

/// A trace piped into a reader that stops (`spindle trace | head -3`)
/// ends at once, even while the bus is quiet and nothing is written.
fn end_when_stdout_closes() {
    let _ = std::thread::Builder::new()
        .name("stdout-watch".into())
        .spawn(|| {
            let mut fd = libc::pollfd {
                fd: libc::STDOUT_FILENO,
                events: 0,
                revents: 0,
            };
            loop {
                // SAFETY: one valid pollfd; no events asked, so it returns
                // only for an error or hang-up on stdout (a pipe whose reader
                // is gone), or the timeout.
                let n = unsafe { libc::poll(&mut fd, 1, 1000) };
                if n > 0 && fd.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                    std::process::exit(0);
                }
                if n < 0
                    && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
                {
                    return;
                }
            }
        });
}

/// One frame as a line for people.
fn text(resp: &Response) -> Option<String> {
    Some(match resp {
        Response::Traced(t) => message(t),
        Response::TraceGap { missed } => {
            format!("[spindle: {missed} messages not shown: reading too slowly]")
        }
        Response::Event(e) => event(e),
        Response::EventGap { missed } => {
            format!("[spindle: {missed} lifecycle events not shown: reading too slowly]")
        }
        _ => return None,
    })
}

/// `HH:MM:SS.micros` (UTC) of microseconds since the Unix epoch.
fn clock(us: u64) -> String {
    let secs = us / 1_000_000;
    let day = secs % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        day / 3600,
        day / 60 % 60,
        day % 60,
        us % 1_000_000
    )
}

fn message(t: &TraceRecord) -> String {
    let mut line = format!("{} {} → {} ", clock(t.at_us), t.source, t.target);
    match t.kind {
        TraceKind::Request => line.push_str(&format!("request #{}", t.id)),
        TraceKind::Response => line.push_str(&format!("response #{}", t.id)),
        TraceKind::Failed => line.push_str(&format!(
            "failed #{}: {}",
            t.id,
            t.failure.as_deref().unwrap_or("?")
        )),
    }
    line.push_str(&format!(" body {} B", t.body_bytes));
    if t.blob_bytes > 0 {
        line.push_str(&format!(", blob {} B", t.blob_bytes));
    }
    if let Some(ms) = t.expects_ms {
        line.push_str(&format!(", awaits {ms} ms"));
    }
    if let Some(us) = t.since_request_us {
        line.push_str(&format!(", after {us} µs"));
    }
    if t.outcome != "delivered" {
        line.push_str(&format!(" — refused: {}", t.outcome));
    }
    line
}

fn event(e: &ProcessEvent) -> String {
    let who = match (&e.name, &e.address) {
        (_, Some(a)) => format!("{a} ({})", e.id),
        (Some(n), None) => format!("{n} ({})", e.id),
        (None, None) => format!("process {}", e.id),
    };
    let what = match e.event {
        EventKind::Started => "started".to_string(),
        EventKind::Stopping => "stopping".into(),
        EventKind::Exited => match &e.exit {
            Some(x) => format!("exited: {x}"),
            None => "exited".into(),
        },
        EventKind::Restarting => format!("restarting in {} ms", e.delay_ms.unwrap_or(0)),
        EventKind::Stopped => "stopped".into(),
        EventKind::Deleted => "deleted".into(),
    };
    format!("{} ── {who} {what}", clock(e.at_ms.saturating_mul(1000)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_say_who_what_and_why() {
        let t = TraceRecord {
            at_us: 3_723_000_042,
            source: "local@a:demo:spindle".into(),
            target: "local@b:demo:spindle".into(),
            id: 9,
            kind: TraceKind::Request,
            expects_ms: Some(5000),
            failure: None,
            body_bytes: 4,
            blob_bytes: 0,
            outcome: "no-capability".into(),
            since_request_us: None,
        };
        assert_eq!(
            message(&t),
            "01:02:03.000042 local@a:demo:spindle → local@b:demo:spindle request #9 body 4 B, awaits 5000 ms — refused: no-capability"
        );
    }
}
