//! The `spindle:process/host` imports for one process: its mailbox, the
//! requests it awaits, the message it is handling, its blob, state and log.
//!
//! Two kinds of failure are kept apart (as in wasmtime's WASI): an error the
//! guest can handle comes back as a WIT `result` (`send-error`, a state
//! write that failed); only a kill, or a guest misusing the world, traps.

mod calls;
mod convert;
mod pending;

use crate::bindings::spindle::process::types as wit;
use convert::*;
pub(crate) use convert::{from_wit_addr, from_wit_blob, from_wit_request, to_wit_addr};
use pending::{IdHasher, Pending};
use spindle_bus::{
    Blob, Bus, Capability, Envelope, Mailbox, Message, Request, Response, SendErrorKind,
};
use spindle_logs::LineSink;
use spindle_types::{Address, ProcessNum};
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use wasmtime::component::ResourceTable;
use wasmtime::{Error as TrapError, StoreLimits};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// What the host of every process shares.
pub struct Shared {
    pub bus: Arc<Bus>,
    pub state_dir: PathBuf,
    /// Spawn calls whose component may need compiling (the stage before
    /// the loop, `warm_spawns`).
    pub spawns: mpsc::Sender<crate::SpawnCall>,
    /// Spawn calls ready for the control loop: their component is loaded,
    /// or their path was refused (the loop reports it).
    pub to_loop: mpsc::Sender<crate::SpawnCall>,
    pub loader: crate::runtime::Loader,
    /// Runs that have reached their first `receive` (are up and waiting).
    pub ready: std::sync::atomic::AtomicU64,
    /// Instantiations done, and the nanoseconds they took together (for
    /// benchmarks: the step wasmtime's own figures are about).
    pub instantiated: [std::sync::atomic::AtomicU64; 2],
}

/// The request being handled: where `send-response` goes, and what an
/// inheriting request passes on. A response received (awaited or not) does
/// not replace it.
struct Handling {
    id: u64,
    rsvp: Option<Arc<Address>>,
    blob: Option<Arc<Blob>>,
}

/// The last message received, of either kind: what `get-blob` and
/// `save-capabilities` refer to.
struct Last {
    blob: Option<Arc<Blob>>,
    caps: Vec<Capability>,
}

/// The store data of one wasm process.
pub struct ProcessHost {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limits: StoreLimits,
    pub(crate) shared: Arc<Shared>,
    pub(crate) num: ProcessNum,
    pub(crate) our: Arc<Address>,
    pub(crate) mailbox: Mailbox,
    pending: HashMap<u64, Pending, BuildHasherDefault<IdHasher>>,
    /// Bytes `pending` keeps ([`MAX_AWAITED_BYTES`], [`pending::kept_bytes`]).
    pending_bytes: usize,
    deferred: VecDeque<Envelope>,
    /// Bytes the set-aside messages hold ([`MAX_DEFERRED_BYTES`]).
    deferred_bytes: usize,
    handling: Option<Handling>,
    last: Option<Last>,
    pub(crate) on_exit: wit::OnExit,
    pub(crate) out: Arc<Mutex<LineSink>>,
    pub(crate) panic: Option<String>,
    /// Set when the run is killed. The driver also takes the process off the
    /// bus, which closes its mailbox and so wakes a waiting `receive`.
    pub(crate) kill: Arc<Kill>,
    /// Fires at the earliest deadline of an awaited response (created on
    /// first use). It is moved only when an earlier deadline appears or it
    /// fires, not on every request.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: Option<Instant>,
    pub(crate) component_dir: PathBuf,
    waited: bool,
    /// The last target this process sent to, parsed, and its endpoint: a
    /// process mostly talks to a few peers, and comparing the text is cheaper
    /// than parsing it and looking it up again.
    target_cache: Option<(String, Arc<Address>)>,
    route: Option<(Arc<Address>, Arc<spindle_bus::Endpoint>)>,
    /// The text of the last source handed to the guest, for the same reason.
    source_cache: Option<(Arc<Address>, String)>,
}

impl WasiView for ProcessHost {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// A run's kill switch: a flag the host checks at every call and epoch
/// tick, and a wakeup for a run parked in a host future that never calls
/// back into the host (a WASI sleep, say), so a kill never waits for it.
#[derive(Default)]
pub(crate) struct Kill {
    set: AtomicBool,
    /// The run's task, woken by a kill.
    task: futures_util::task::AtomicWaker,
}

impl Kill {
    pub fn kill(&self) {
        self.set.store(true, Ordering::Release);
        self.task.wake();
    }

    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }
}

/// A run's future that ends with the `killed` trap as soon as its kill
/// switch is set, even while it waits in a host future that never returns
/// to wasm (dropping the call unwinds its fiber). Costs an atomic load and
/// a waker check per poll.
pub(crate) struct Killable<F> {
    pub run: Pin<Box<F>>,
    pub kill: Arc<Kill>,
}

impl<F, T> std::future::Future for Killable<F>
where
    F: std::future::Future<Output = Result<T, TrapError>>,
{
    type Output = Result<T, TrapError>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        if self.kill.is_set() {
            return std::task::Poll::Ready(Err(killed()));
        }
        self.kill.task.register(cx.waker());
        if self.kill.is_set() {
            return std::task::Poll::Ready(Err(killed()));
        }
        self.run.as_mut().poll(cx)
    }
}

/// The trap that ends a killed process.
pub(crate) fn killed() -> TrapError {
    TrapError::msg("killed")
}

/// What ended a wait. Lives on the stack for one wait only: boxing the
/// envelope would cost an allocation per message on the hot path.
#[allow(clippy::large_enum_variant)]
pub(super) enum Wake {
    Killed,
    Mail(Envelope),
    Deadline,
}

/// What `receive` hands the guest.
pub(super) type Received = Result<(wit::Address, wit::Message), wit::SendError>;

impl ProcessHost {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        wasi: WasiCtx,
        limits: StoreLimits,
        shared: Arc<Shared>,
        num: ProcessNum,
        our: Arc<Address>,
        mailbox: Mailbox,
        on_exit: wit::OnExit,
        out: Arc<Mutex<LineSink>>,
        kill: Arc<Kill>,
        component_dir: PathBuf,
    ) -> ProcessHost {
        ProcessHost {
            wasi,
            table: ResourceTable::new(),
            limits,
            shared,
            num,
            our,
            mailbox,
            pending: HashMap::default(),
            pending_bytes: 0,
            deferred: VecDeque::new(),
            deferred_bytes: 0,
            handling: None,
            last: None,
            on_exit,
            out,
            panic: None,
            kill,
            timer: None,
            armed: None,
            component_dir,
            waited: false,
            target_cache: None,
            route: None,
            source_cache: None,
        }
    }

    /// The address a guest named as a target, if it is one.
    pub(super) fn target(&mut self, text: &str) -> Option<Arc<Address>> {
        if let Some((t, a)) = &self.target_cache
            && t == text
        {
            return Some(a.clone());
        }
        let a = Arc::new(from_wit_addr(text)?);
        self.target_cache = Some((text.to_owned(), a.clone()));
        Some(a)
    }

    /// `a` as the guest sees it.
    pub(super) fn source_text(&mut self, a: &Arc<Address>) -> wit::Address {
        if let Some((cached, text)) = &self.source_cache
            && Arc::ptr_eq(cached, a)
        {
            return text.clone();
        }
        let text = to_wit_addr(a);
        self.source_cache = Some((a.clone(), text.clone()));
        text
    }

    pub(crate) fn is_killed(&self) -> bool {
        self.kill.is_set()
    }

    pub(super) fn check_alive(&self) -> Result<(), TrapError> {
        if self.is_killed() {
            Err(killed())
        } else {
            Ok(())
        }
    }

    pub(crate) fn log_line(&self, text: &str) {
        let mut sink = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let mut line = String::with_capacity(text.len() + 1);
        line.push_str(text);
        if !line.ends_with('\n') {
            line.push('\n');
        }
        if let Err(e) = sink.feed(line.as_bytes()) {
            tracing::warn!("process {}: log write failed: {e}", self.num);
        }
    }

    /// Takes a delivered envelope: a response is matched to its pending
    /// request (or dropped and counted as late), word that a request failed
    /// becomes its send error; a request becomes the one being handled, and
    /// any message the last one received.
    pub(super) fn accept(&mut self, env: Envelope) -> Option<Received> {
        let mut message = env.message;
        if let Message::Failed(kind) = message {
            // Word about a request no longer awaited (timed out) is late.
            let p = self.take_pending(&env.id)?;
            return Some(Err(send_error(
                kind,
                &p.target,
                Message::Request(p.request),
                p.context,
            )));
        }
        if let Message::Response(_, context) = &mut message {
            match self.take_pending(&env.id) {
                Some(p) => *context = p.context,
                None => {
                    self.shared
                        .bus
                        .late_responses
                        .fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            }
        }
        if matches!(message, Message::Request(_)) {
            self.handling = Some(Handling {
                id: env.id,
                rsvp: env.rsvp,
                blob: env.blob.clone(),
            });
        }
        self.last = Some(Last {
            blob: env.blob,
            caps: message.capabilities().to_vec(),
        });
        Some(Ok((self.source_text(&env.source), to_wit_message(message))))
    }

    pub(super) fn mark_ready(&mut self) {
        if !self.waited {
            self.waited = true;
            self.shared.ready.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// What can be returned without waiting: a set-aside message, an expired
    /// request, or (if `mailbox`) queued mail.
    pub(super) fn poll_now(&mut self, mailbox: bool) -> Option<Received> {
        while let Some(env) = self.undefer() {
            if let Some(r) = self.accept(env) {
                return Some(r);
            }
        }
        if !self.pending.is_empty()
            && let Some(e) = self.expire(Instant::now())
        {
            return Some(Err(e));
        }
        while mailbox && let Some(env) = self.mailbox.try_recv() {
            if self.is_killed() {
                return None;
            }
            if let Some(r) = self.accept(env) {
                return Some(r);
            }
        }
        None
    }

    /// Sends a request; returns its number when a response is expected.
    /// Never waits: a full mailbox is `MailboxFull` at once.
    // The error is handed to the guest as it is; boxing it would only add an
    // allocation to the error path.
    #[allow(clippy::result_large_err)]
    pub(super) fn send(
        &mut self,
        target: Arc<Address>,
        request: Request,
        context: Option<Vec<u8>>,
        blob: Option<wit::Blob>,
    ) -> Result<Option<u64>, wit::SendError> {
        let inherited = self.handling.as_ref().filter(|_| request.inherit);
        let inherits = inherited.is_some_and(|h| h.rsvp.is_some());
        let blob = blob
            .map(|b| Arc::new(from_wit_blob(b)))
            .or_else(|| inherited.and_then(|c| c.blob.clone()));
        let (id, rsvp) = match (request.expects_response, inherited) {
            (Some(_), _) => (self.shared.bus.next_id(), Some(self.our.clone())),
            (None, Some(c)) => (c.id, c.rsvp.clone()),
            (None, None) => (self.shared.bus.next_id(), None),
        };
        let awaits = request.expects_response;
        let kept = pending::kept_bytes(&request, context.as_deref());
        if awaits.is_some()
            && (self.pending.len() >= spindle_bus::MAX_AWAITED
                || self.pending_bytes.saturating_add(kept) > MAX_AWAITED_BYTES)
        {
            // Its own budget of awaited requests is spent: slow down.
            return Err(send_error(
                SendErrorKind::MailboxFull,
                &target,
                Message::Request(request),
                context,
            ));
        }
        if let Some(timeout) = awaits {
            self.pending_bytes += kept;
            self.pending.insert(
                id,
                Pending {
                    target: target.clone(),
                    request: request.clone(),
                    context: context.clone(),
                    deadline: spindle_bus::deadline_after(timeout),
                },
            );
        }
        let env = Envelope {
            id,
            source: self.our.clone(),
            target: target.clone(),
            rsvp,
            message: Message::Request(request),
            blob,
        };
        let forwarded = awaits.is_none() && inherits;
        match self.send_routed(env) {
            Ok(()) => {
                // The request handed on its response route: answering it
                // is now the delegate's (and this process ending no longer
                // fails it).
                if forwarded && let Some(h) = self.handling.as_mut() {
                    h.rsvp = None;
                }
                Ok(awaits.map(|_| id))
            }
            Err((kind, env)) => {
                if awaits.is_some() {
                    self.take_pending(&id);
                }
                Err(send_error(kind, &target, env.message, context))
            }
        }
    }

    /// Sends through the kept endpoint of the last target when it is the
    /// same one (a new one is looked up and kept).
    pub(super) fn send_routed(&mut self, env: Envelope) -> Result<(), spindle_bus::Undelivered> {
        if let Some((to, ep)) = &self.route
            && Arc::ptr_eq(to, &env.target)
            && ep.is_on_bus()
        {
            return self.shared.bus.send_now_to(ep, env, false);
        }
        // Another node's process goes to its link; one not on the bus is
        // offline: the bus says (and traces) which.
        let here = self.shared.bus.is_here(&env.target.node);
        let Some(ep) = here
            .then(|| self.shared.bus.endpoint(&env.target.process))
            .flatten()
        else {
            return self.shared.bus.send_now(env, false);
        };
        let to = env.target.clone();
        let r = self.shared.bus.send_now_to(&ep, env, false);
        self.route = Some((to, ep));
        r
    }

    /// Waits until capability changes are on disk. A failed write is logged
    /// by the writer and noted in this process's log; the change holds in
    /// memory either way, so the process carries on.
    pub(super) async fn caps_persisted(&mut self) {
        if let Err(why) = self.shared.bus.persisted().await {
            self.log_line(&format!("spindle: capabilities not saved: {why}"));
        }
    }

    pub(super) fn state_path(&self) -> PathBuf {
        self.shared
            .state_dir
            .join(format!("{}.state", self.our.process))
    }
}

pub use spindle_bus::DEFAULT_AWAIT;
/// Messages set aside while a process awaits one response: as many as its
/// mailbox holds. Requests beyond it fail to their senders as `mailbox-full`.
pub const MAX_DEFERRED: usize = spindle_bus::MAILBOX_CAPACITY;
/// Bytes the messages set aside while a process awaits one response may
/// hold: they left the mailbox's count, so they are counted here.
pub const MAX_DEFERRED_BYTES: usize = spindle_bus::MAILBOX_BYTES;

impl ProcessHost {
    /// Sets aside a message that arrived while the process awaits another
    /// response. Past [`MAX_DEFERRED`] or [`MAX_DEFERRED_BYTES`] a request
    /// fails to its sender as `mailbox-full`, and anything else is dropped
    /// as late (an awaited response then times out).
    pub(super) fn defer(&mut self, env: Envelope) {
        let weight = env.weight();
        let full = self.deferred.len() >= MAX_DEFERRED
            || self.deferred_bytes.saturating_add(weight) > MAX_DEFERRED_BYTES;
        if !full {
            self.deferred_bytes += weight;
            self.deferred.push_back(env);
        } else if matches!(env.message, Message::Request(_)) {
            let bus = self.shared.bus.clone();
            bus.fail_held(&self.our, env, SendErrorKind::MailboxFull);
        } else {
            self.shared
                .bus
                .late_responses
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(super) fn undefer(&mut self) -> Option<Envelope> {
        let env = self.deferred.pop_front()?;
        self.deferred_bytes -= env.weight();
        Some(env)
    }
}

/// Largest durable state a process keeps (`set-state`): it is written
/// whole, synced, and read whole into the process at each start.
pub const MAX_STATE_BYTES: usize = 16 << 20;
/// Requests an on-exit policy may hold, and their bytes (bodies, metadata,
/// blobs): the host keeps them outside the process's memory, and the node's
/// table keeps them on disk. A process that sets more traps (its own fault).
pub const MAX_ON_EXIT_REQUESTS: usize = 64;
pub const MAX_ON_EXIT_BYTES: usize = 1 << 20;
/// Processes a spawn may let message the child (`grant-to`).
pub const MAX_SPAWN_GRANTS: usize = 256;
/// Longest panic message kept as a run's exit detail (shown by `ls`, kept
/// in the table); the log has it whole.
pub const MAX_PANIC_DETAIL: usize = 4 << 10;

/// An on-exit policy over [`MAX_ON_EXIT_REQUESTS`] or [`MAX_ON_EXIT_BYTES`]:
/// what it is over, for the trap.
pub(super) fn on_exit_over(o: &wit::OnExit) -> Option<String> {
    let wit::OnExit::Requests(list) = o else {
        return None;
    };
    if list.len() > MAX_ON_EXIT_REQUESTS {
        return Some(format!(
            "an on-exit policy of {} requests: at most {MAX_ON_EXIT_REQUESTS}",
            list.len()
        ));
    }
    let bytes: usize = list
        .iter()
        .map(|(target, r, blob)| {
            target.len()
                + r.body.len()
                + r.metadata.as_ref().map_or(0, String::len)
                + r.capabilities
                    .iter()
                    .map(|c| c.issuer.len() + c.params.len())
                    .sum::<usize>()
                + blob.as_ref().map_or(0, |b| b.bytes.len())
        })
        .sum();
    (bytes > MAX_ON_EXIT_BYTES)
        .then(|| format!("an on-exit policy of {bytes} bytes: at most {MAX_ON_EXIT_BYTES}"))
}

/// Bytes a process's awaited requests keep — bodies, metadata, capabilities
/// and contexts (each comes back whole in its send error or response): past
/// it a send is `mailbox-full`.
pub const MAX_AWAITED_BYTES: usize = spindle_bus::MAILBOX_BYTES;

impl ProcessHost {
    /// The run is over: every message it held and will never answer fails
    /// to its requester as `exited` (the request being handled, those set
    /// aside, those still queued), at once rather than at their timeouts.
    pub(crate) fn release_held(&mut self) {
        let bus = self.shared.bus.clone();
        if let Some(h) = self.handling.take()
            && let Some(rsvp) = h.rsvp
        {
            bus.fail_request(&self.our, h.id, rsvp, SendErrorKind::Exited);
        }
        self.deferred_bytes = 0;
        for env in self.deferred.drain(..) {
            bus.fail_held(&self.our, env, SendErrorKind::Exited);
        }
        bus.drain_ended(&self.our, &mut self.mailbox);
    }
}
