//! Taps on the bus: what `spindle trace` shows.
//!
//! A [`Tap`] hears every message that matches its [`TraceFilter`] — who to
//! whom, request or response or failure, sizes, and what became of it
//! (delivered, or the send error's kind) — as a [`Traced`] record. Records
//! travel through a bounded queue ([`TAP_QUEUE`]); a tap whose reader is
//! too slow loses records, never slows a sender, and counts what it lost
//! ([`Tap::take_dropped`]).
//!
//! With nobody tracing, a send pays one relaxed atomic load
//! ([`Tracers::active`]); the record is only built when a tap listens.

use crate::message::{Envelope, Message, SendErrorKind};
use spindle_types::{Address, PackageId, ProcessId};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

/// Records a tap holds before the slowest reader starts losing them.
pub const TAP_QUEUE: usize = 8192;
/// Taps the node keeps at once: each costs every send a filter check.
pub const MAX_TAPS: usize = 16;

/// Which messages a tap hears: those whose source or target matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceFilter {
    All,
    Process(ProcessId),
    Package(PackageId),
}

impl TraceFilter {
    pub fn matches(&self, source: &Address, target: &Address) -> bool {
        match self {
            TraceFilter::All => true,
            TraceFilter::Process(p) => &source.process == p || &target.process == p,
            TraceFilter::Package(p) => &source.process.package == p || &target.process.package == p,
        }
    }
}

/// What kind of message was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TracedKind {
    /// A request; `expects`: how long its response is awaited, if at all.
    Request {
        expects: Option<Duration>,
    },
    Response,
    /// The node telling a requester its request failed (the kind).
    Failed(SendErrorKind),
}

/// One message as a tap hears it.
#[derive(Debug, Clone)]
pub struct Traced {
    pub at: SystemTime,
    pub source: Arc<Address>,
    pub target: Arc<Address>,
    /// The request's number (a response carries the number it answers).
    pub id: u64,
    pub kind: TracedKind,
    pub body: usize,
    pub blob: usize,
    /// Delivered, or why not.
    pub outcome: Result<(), SendErrorKind>,
}

/// What a send looked like before it went (built only while a tap listens).
pub(crate) struct Seen(Traced);

struct Listener {
    filter: TraceFilter,
    tx: mpsc::Sender<Traced>,
    dropped: AtomicU64,
}

/// The bus's taps.
#[derive(Debug, Default)]
pub struct Tracers {
    active: AtomicUsize,
    taps: RwLock<Vec<Arc<Listener>>>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("filter", &self.filter)
            .finish()
    }
}

/// Too many taps at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{MAX_TAPS} traces are already running on this node: stop one first")]
pub struct TooManyTaps;

/// A listening tap: records arrive on [`Tap::recv`]; dropping it stops them.
pub struct Tap {
    rx: mpsc::Receiver<Traced>,
    me: Arc<Listener>,
    tracers: Weak<Tracers>,
}

impl Tap {
    pub async fn recv(&mut self) -> Option<Traced> {
        self.rx.recv().await
    }

    pub fn try_recv(&mut self) -> Option<Traced> {
        self.rx.try_recv().ok()
    }

    /// Records lost since the last call because the queue was full.
    pub fn take_dropped(&self) -> u64 {
        self.me.dropped.swap(0, Ordering::Relaxed)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if let Some(t) = self.tracers.upgrade() {
            let mut taps = t.taps.write().unwrap_or_else(|p| p.into_inner());
            taps.retain(|l| !Arc::ptr_eq(l, &self.me));
            t.active.store(taps.len(), Ordering::Relaxed);
        }
    }
}

impl Tracers {
    /// Whether any tap listens (one relaxed load: the idle cost of tracing).
    #[inline]
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed) != 0
    }

    pub fn tap(self: &Arc<Self>, filter: TraceFilter) -> Result<Tap, TooManyTaps> {
        let mut taps = self.taps.write().unwrap_or_else(|p| p.into_inner());
        if taps.len() >= MAX_TAPS {
            return Err(TooManyTaps);
        }
        let (tx, rx) = mpsc::channel(TAP_QUEUE);
        let me = Arc::new(Listener {
            filter,
            tx,
            dropped: AtomicU64::new(0),
        });
        taps.push(me.clone());
        self.active.store(taps.len(), Ordering::Relaxed);
        Ok(Tap {
            rx,
            me,
            tracers: Arc::downgrade(self),
        })
    }

    /// A send about to go: its record, if anyone listens.
    #[inline]
    pub(crate) fn seen(&self, env: &Envelope) -> Option<Seen> {
        if !self.active() {
            return None;
        }
        let (kind, body) = match &env.message {
            Message::Request(r) => (
                TracedKind::Request {
                    expects: r.expects_response,
                },
                r.body.len(),
            ),
            Message::Response(r, _) => (TracedKind::Response, r.body.len()),
            Message::Failed(k) => (TracedKind::Failed(*k), 0),
        };
        Some(Seen(Traced {
            at: SystemTime::now(),
            source: env.source.clone(),
            target: env.target.clone(),
            id: env.id,
            kind,
            body,
            blob: env.blob.as_ref().map_or(0, |b| b.bytes.len()),
            outcome: Ok(()),
        }))
    }

    /// What became of a send [`Tracers::seen`] recorded.
    pub(crate) fn done(&self, seen: Option<Seen>, outcome: Result<(), SendErrorKind>) {
        let Some(Seen(mut t)) = seen else {
            return;
        };
        t.outcome = outcome;
        let taps = self.taps.read().unwrap_or_else(|p| p.into_inner());
        for l in taps.iter() {
            if !l.filter.matches(&t.source, &t.target) {
                continue;
            }
            if l.tx.try_send(t.clone()).is_err() {
                l.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
