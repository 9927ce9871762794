//! `trace`: the bus's traffic and the processes' lifecycle, live, to one
//! control connection.
//!
//! The control loop makes a tap on the bus ([`spindle_bus::Bus::tap`]) and
//! subscribes to lifecycle events; this streams both as `traced` and
//! `event` frames until the client hangs up. Records a slow client could
//! not take are dropped by the tap (never slowing a sender) and reported as
//! `trace_gap` frames. A response is paired with its request here, to say
//! how long it took.

use spindle_bus::trace::{Tap, TraceFilter, Traced, TracedKind};
use spindle_types::control::{ProcessEvent, Response, TraceKind, TraceRecord};
use spindle_types::{Address, PackageId, ProcessId};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::io::AsyncReadExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::broadcast;

/// Requests remembered for pairing with their responses; the oldest is
/// forgotten first (its response then shows no time).
const PAIRED: usize = 65_536;

/// A trace subscription, as the control loop hands it to the connection.
pub struct Subscription {
    pub tap: Tap,
    pub filter: TraceFilter,
    pub events: broadcast::Receiver<ProcessEvent>,
}

/// The filter `trace` asked for: `process` (an address or process id) or
/// `package`, else everything. The error names what was wrong.
pub fn filter(process: Option<&str>, package: Option<&str>) -> Result<TraceFilter, String> {
    match (process, package) {
        (Some(_), Some(_)) => Err("trace one process or one package, not both".into()),
        (Some(p), None) => p
            .parse::<Address>()
            .map(|a| a.process)
            .or_else(|_| p.parse::<ProcessId>())
            .map(TraceFilter::Process)
            .map_err(|e| {
                format!("{e}: name the process as node@process:package:publisher or process:package:publisher")
            }),
        (None, Some(p)) => p
            .parse::<PackageId>()
            .map(TraceFilter::Package)
            .map_err(|e| format!("{e}: name the package as package:publisher")),
        (None, None) => Ok(TraceFilter::All),
    }
}

/// Whether a lifecycle event belongs in a trace with `filter`.
fn wanted(filter: &TraceFilter, event: &ProcessEvent) -> bool {
    let address = || event.address.as_deref()?.parse::<Address>().ok();
    match filter {
        TraceFilter::All => true,
        TraceFilter::Process(p) => address().is_some_and(|a| &a.process == p),
        TraceFilter::Package(p) => address().is_some_and(|a| &a.process.package == p),
    }
}

fn micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Requests seen, by number, with when they were sent.
#[derive(Default)]
struct Pairs {
    sent: HashMap<u64, u64>,
    order: VecDeque<u64>,
}

impl Pairs {
    fn record(&mut self, t: &Traced) -> TraceRecord {
        let at_us = micros(t.at);
        let (kind, expects_ms, failure, since_request_us) = match t.kind {
            TracedKind::Request { expects } => {
                if expects.is_some() && t.outcome.is_ok() {
                    self.remember(t.id, at_us);
                }
                let ms = expects.map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64);
                (TraceKind::Request, ms, None, None)
            }
            TracedKind::Response => (TraceKind::Response, None, None, self.answered(t.id, at_us)),
            TracedKind::Failed(k) => (
                TraceKind::Failed,
                None,
                Some(k.name().to_string()),
                self.answered(t.id, at_us),
            ),
        };
        TraceRecord {
            at_us,
            source: t.source.to_string(),
            target: t.target.to_string(),
            id: t.id,
            kind,
            expects_ms,
            failure,
            body_bytes: t.body,
            blob_bytes: t.blob,
            outcome: match t.outcome {
                Ok(()) => "delivered".into(),
                Err(k) => k.name().into(),
            },
            since_request_us,
        }
    }

    fn remember(&mut self, id: u64, at_us: u64) {
        if self.order.len() >= PAIRED
            && let Some(old) = self.order.pop_front()
        {
            self.sent.remove(&old);
        }
        if self.sent.insert(id, at_us).is_none() {
            self.order.push_back(id);
        }
    }

    /// The time since request `id`, which is answered now.
    fn answered(&mut self, id: u64, at_us: u64) -> Option<u64> {
        let sent = self.sent.remove(&id)?;
        // `order` keeps its entry until it comes up: bounded by PAIRED all the same.
        Some(at_us.saturating_sub(sent))
    }
}

/// Streams `sub` to the client until it hangs up (or the daemon ends).
pub async fn stream(
    r: &mut tokio::io::BufReader<OwnedReadHalf>,
    w: &mut OwnedWriteHalf,
    mut sub: Subscription,
) -> io::Result<()> {
    crate::server::write(w, &Response::Tracing).await?;
    let mut pairs = Pairs::default();
    let mut probe = [0u8; 64];
    loop {
        tokio::select! {
            got = sub.tap.recv() => {
                let Some(t) = got else { return Ok(()) };
                crate::server::write(w, &Response::Traced(pairs.record(&t))).await?;
                // What was queued came before what was lost (the queue was
                // full then): the gap is told once the queue is drained.
                while let Some(t) = sub.tap.try_recv() {
                    crate::server::write(w, &Response::Traced(pairs.record(&t))).await?;
                }
                let missed = sub.tap.take_dropped();
                if missed > 0 {
                    crate::server::write(w, &Response::TraceGap { missed }).await?;
                }
            }
            got = sub.events.recv() => match got {
                Ok(event) if wanted(&sub.filter, &event) => {
                    crate::server::write(w, &Response::Event(event)).await?
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    crate::server::write(w, &Response::EventGap { missed }).await?
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            },
            n = r.read(&mut probe) => match n {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spindle_bus::SendErrorKind;
    use std::sync::Arc;
    use std::time::Duration;

    fn traced(id: u64, kind: TracedKind, at_ms: u64) -> Traced {
        Traced {
            at: UNIX_EPOCH + Duration::from_millis(at_ms),
            source: Arc::new("local@a:demo:spindle".parse().unwrap()),
            target: Arc::new("local@b:demo:spindle".parse().unwrap()),
            id,
            kind,
            body: 3,
            blob: 0,
            outcome: Ok(()),
        }
    }

    #[test]
    fn a_response_says_how_long_after_its_request_it_came() {
        let mut p = Pairs::default();
        let expects = Some(Duration::from_secs(5));
        let req = p.record(&traced(7, TracedKind::Request { expects }, 1000));
        assert_eq!(req.kind, TraceKind::Request);
        assert_eq!(req.expects_ms, Some(5000));
        let resp = p.record(&traced(7, TracedKind::Response, 1003));
        assert_eq!(resp.since_request_us, Some(3000));
        // Answered once: a second response has nothing to pair with.
        assert_eq!(
            p.record(&traced(7, TracedKind::Response, 1004))
                .since_request_us,
            None
        );
        let failed = p.record(&traced(8, TracedKind::Failed(SendErrorKind::Timeout), 1));
        assert_eq!(failed.failure.as_deref(), Some("timeout"));
    }

    #[test]
    fn pairing_memory_is_bounded() {
        let mut p = Pairs::default();
        let expects = Some(Duration::from_secs(5));
        for id in 0..(PAIRED as u64 + 100) {
            p.record(&traced(id, TracedKind::Request { expects }, 0));
        }
        assert_eq!(p.sent.len(), PAIRED);
        assert!(p.order.len() <= PAIRED);
        assert_eq!(
            p.record(&traced(0, TracedKind::Response, 1))
                .since_request_us,
            None
        );
    }

    #[test]
    fn filters_name_what_was_wrong() {
        assert_eq!(filter(None, None).unwrap(), TraceFilter::All);
        assert!(matches!(
            filter(Some("local@echo:demo:spindle"), None).unwrap(),
            TraceFilter::Process(p) if p.process.as_str() == "echo"
        ));
        assert!(matches!(
            filter(Some("echo:demo:spindle"), None).unwrap(),
            TraceFilter::Process(_)
        ));
        assert!(
            filter(Some("no such"), None)
                .unwrap_err()
                .contains("process:package:publisher")
        );
        assert!(
            filter(None, Some("x"))
                .unwrap_err()
                .contains("package:publisher")
        );
        assert!(filter(Some("a:b:c"), Some("b:c")).is_err());
    }
}
