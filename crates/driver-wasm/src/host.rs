//! The `spindle:process/host` imports for one process: its mailbox, the
//! requests it awaits, the message it is handling, its blob, state and log.
//!
//! Two kinds of failure are kept apart (as in wasmtime's WASI): an error the
//! guest can handle comes back as a WIT `result` (`send-error`, a state
//! write that failed); only a kill, or a guest misusing the world, traps.

use crate::bindings::spindle::process::{host, types as wit};
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
    pub spawns: mpsc::Sender<crate::SpawnCall>,
    /// Runs that have reached their first `receive` (are up and waiting).
    pub ready: std::sync::atomic::AtomicU64,
}

/// Hashes request numbers. They are handed out by the bus, one after the
/// other, never chosen by a guest, so a multiply spreads them well and the
/// general-purpose (DoS-resistant) hasher would only cost time per message.
#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A request this process sent and awaits a response to.
struct Pending {
    target: Arc<Address>,
    request: Request,
    context: Option<Vec<u8>>,
    deadline: Instant,
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
    deferred: VecDeque<Envelope>,
    handling: Option<Handling>,
    last: Option<Last>,
    pub(crate) on_exit: wit::OnExit,
    pub(crate) out: Arc<Mutex<LineSink>>,
    pub(crate) panic: Option<String>,
    /// Set when the run is killed. The driver also takes the process off the
    /// bus, which closes its mailbox and so wakes a waiting `receive`.
    pub(crate) kill: Arc<AtomicBool>,
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

/// The trap that ends a killed process.
pub(crate) fn killed() -> TrapError {
    TrapError::msg("killed")
}

pub(crate) fn to_wit_addr(a: &Address) -> wit::Address {
    a.to_string()
}

/// An address a guest gave, if it is one.
pub(crate) fn from_wit_addr(a: &str) -> Option<Address> {
    a.parse().ok()
}

fn to_wit_cap(c: &Capability) -> wit::Capability {
    wit::Capability {
        issuer: to_wit_addr(&c.issuer),
        params: c.params.clone(),
    }
}

/// A guest's capabilities, if every issuer is an address (a capability that
/// names no process cannot be held, so it is never valid to attach).
fn from_wit_caps(caps: &[wit::Capability]) -> Option<Vec<Capability>> {
    caps.iter()
        .map(|c| {
            Some(Capability {
                issuer: from_wit_addr(&c.issuer)?,
                params: c.params.clone(),
            })
        })
        .collect()
}

/// A guest's request, or the request back if a capability in it is malformed.
pub(crate) fn from_wit_request(r: wit::Request) -> Result<Request, wit::Request> {
    let Some(capabilities) = from_wit_caps(&r.capabilities) else {
        return Err(r);
    };
    Ok(Request {
        inherit: r.inherit,
        expects_response: r.expects_response.map(Duration::from_millis),
        body: r.body,
        metadata: r.metadata,
        capabilities,
    })
}

fn to_wit_request(r: Request) -> wit::Request {
    wit::Request {
        inherit: r.inherit,
        expects_response: r.expects_response.map(|d| d.as_millis() as u64),
        body: r.body,
        metadata: r.metadata,
        capabilities: r.capabilities.iter().map(to_wit_cap).collect(),
    }
}

fn to_wit_message(m: Message) -> wit::Message {
    match m {
        // `accept` turns these into send errors; none reaches a guest as a message.
        Message::Failed(_) => wit::Message::Response((
            wit::Response {
                inherit: false,
                body: vec![],
                metadata: None,
                capabilities: vec![],
            },
            None,
        )),
        Message::Request(r) => wit::Message::Request(to_wit_request(r)),
        Message::Response(r, context) => wit::Message::Response((
            wit::Response {
                inherit: r.inherit,
                body: r.body,
                metadata: r.metadata,
                capabilities: r.capabilities.iter().map(to_wit_cap).collect(),
            },
            context,
        )),
    }
}

pub(crate) fn from_wit_blob(b: wit::Blob) -> Blob {
    Blob {
        mime: b.mime,
        bytes: b.bytes,
    }
}

fn to_wit_kind(k: SendErrorKind) -> wit::SendErrorKind {
    match k {
        SendErrorKind::Exited => wit::SendErrorKind::Exited,
        SendErrorKind::Offline => wit::SendErrorKind::Offline,
        SendErrorKind::Timeout => wit::SendErrorKind::Timeout,
        SendErrorKind::NoCapability => wit::SendErrorKind::NoCapability,
        SendErrorKind::MailboxFull => wit::SendErrorKind::MailboxFull,
        SendErrorKind::Invalid => wit::SendErrorKind::Invalid,
    }
}

fn send_error(
    kind: SendErrorKind,
    target: &Address,
    message: Message,
    context: Option<Vec<u8>>,
) -> wit::SendError {
    wit::SendError {
        kind: to_wit_kind(kind),
        target: to_wit_addr(target),
        message: to_wit_message(message),
        context,
    }
}

/// A request the kernel could not even read (a malformed target or
/// capability), returned as `invalid` exactly as the guest gave it.
fn invalid_request(
    target: wit::Address,
    request: wit::Request,
    context: Option<Vec<u8>>,
) -> wit::SendError {
    wit::SendError {
        kind: wit::SendErrorKind::Invalid,
        target,
        message: wit::Message::Request(request),
        context,
    }
}

/// What ended a wait. Lives on the stack for one wait only: boxing the
/// envelope would cost an allocation per message on the hot path.
#[allow(clippy::large_enum_variant)]
enum Wake {
    Killed,
    Mail(Envelope),
    Deadline,
}

/// What `receive` hands the guest.
type Received = Result<(wit::Address, wit::Message), wit::SendError>;

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
        kill: Arc<AtomicBool>,
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
            deferred: VecDeque::new(),
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
    fn target(&mut self, text: &str) -> Option<Arc<Address>> {
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
    fn source_text(&mut self, a: &Arc<Address>) -> wit::Address {
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
        self.kill.load(Ordering::Acquire)
    }

    fn check_alive(&self) -> Result<(), TrapError> {
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
    fn accept(&mut self, env: Envelope) -> Option<Received> {
        let mut message = env.message;
        if let Message::Failed(kind) = message {
            // Word about a request no longer awaited (timed out) is late.
            let p = self.pending.remove(&env.id)?;
            return Some(Err(send_error(
                kind,
                &p.target,
                Message::Request(p.request),
                p.context,
            )));
        }
        if let Message::Response(_, context) = &mut message {
            match self.pending.remove(&env.id) {
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

    /// A pending request whose time is up, returned as a timeout error.
    fn expire(&mut self, now: Instant) -> Option<wit::SendError> {
        let id = *self
            .pending
            .iter()
            .find(|(_, p)| p.deadline <= now)
            .map(|(id, _)| id)?;
        let p = self.pending.remove(&id)?;
        Some(send_error(
            SendErrorKind::Timeout,
            &p.target,
            Message::Request(p.request),
            p.context,
        ))
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.deadline).min()
    }

    /// Waits for mail, or until `deadline`. A closed mailbox or a message
    /// that arrives after a kill is `Killed`.
    async fn wake(&mut self, deadline: Option<Instant>) -> Wake {
        let env = match deadline {
            None => self.mailbox.recv().await,
            Some(d) => {
                if self.armed.is_none_or(|a| d < a) {
                    let at = tokio::time::Instant::from_std(d);
                    match &mut self.timer {
                        Some(t) => t.as_mut().reset(at),
                        None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
                    }
                    self.armed = Some(d);
                }
                let timer = self.timer.as_mut().expect("armed above");
                tokio::select! {
                    biased;
                    env = self.mailbox.recv() => env,
                    _ = timer.as_mut() => {
                        self.armed = None;
                        return Wake::Deadline;
                    }
                }
            }
        };
        match env {
            Some(env) if !self.is_killed() => Wake::Mail(env),
            _ => Wake::Killed,
        }
    }

    fn mark_ready(&mut self) {
        if !self.waited {
            self.waited = true;
            self.shared.ready.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// What can be returned without waiting: a set-aside message, an expired
    /// request, or (if `mailbox`) queued mail.
    fn poll_now(&mut self, mailbox: bool) -> Option<Received> {
        while let Some(env) = self.deferred.pop_front() {
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
    fn send(
        &mut self,
        target: Arc<Address>,
        request: Request,
        context: Option<Vec<u8>>,
        blob: Option<wit::Blob>,
    ) -> Result<Option<u64>, wit::SendError> {
        let inherited = self.handling.as_ref().filter(|_| request.inherit);
        let blob = blob
            .map(|b| Arc::new(from_wit_blob(b)))
            .or_else(|| inherited.and_then(|c| c.blob.clone()));
        let (id, rsvp) = match (request.expects_response, inherited) {
            (Some(_), _) => (self.shared.bus.next_id(), Some(self.our.clone())),
            (None, Some(c)) => (c.id, c.rsvp.clone()),
            (None, None) => (self.shared.bus.next_id(), None),
        };
        let awaits = request.expects_response;
        if let Some(timeout) = awaits {
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
        match self.send_routed(env) {
            Ok(()) => Ok(awaits.map(|_| id)),
            Err((kind, env)) => {
                if awaits.is_some() {
                    self.pending.remove(&id);
                }
                Err(send_error(kind, &target, env.message, context))
            }
        }
    }

    /// Sends through the kept endpoint of the last target when it is the
    /// same one (a new one is looked up and kept).
    fn send_routed(&mut self, env: Envelope) -> Result<(), spindle_bus::Undelivered> {
        if let Some((to, ep)) = &self.route
            && Arc::ptr_eq(to, &env.target)
            && ep.is_on_bus()
        {
            return self.shared.bus.send_now_to(ep, env, false);
        }
        let Some(ep) = self.shared.bus.endpoint(&env.target.process) else {
            return Err((SendErrorKind::Offline, Box::new(env)));
        };
        let to = env.target.clone();
        let r = self.shared.bus.send_now_to(&ep, env, false);
        self.route = Some((to, ep));
        r
    }

    /// Waits until capability changes are on disk. A failed write is logged
    /// by the writer and noted in this process's log; the change holds in
    /// memory either way, so the process carries on.
    async fn caps_persisted(&mut self) {
        if let Err(why) = self.shared.bus.persisted().await {
            self.log_line(&format!("spindle: capabilities not saved: {why}"));
        }
    }

    fn state_path(&self) -> PathBuf {
        self.shared
            .state_dir
            .join(format!("{}.state", self.our.process))
    }
}

impl wit::Host for ProcessHost {}

impl host::Host for ProcessHost {
    fn our(&mut self) -> Result<wit::Address, TrapError> {
        Ok(to_wit_addr(&self.our))
    }

    async fn receive(&mut self) -> Result<Received, TrapError> {
        self.mark_ready();
        loop {
            self.check_alive()?;
            if let Some(r) = self.poll_now(false) {
                return Ok(r);
            }
            let deadline = self.next_deadline();
            match self.wake(deadline).await {
                Wake::Killed => return Err(killed()),
                Wake::Mail(env) => {
                    if let Some(r) = self.accept(env) {
                        return Ok(r);
                    }
                }
                Wake::Deadline => {}
            }
        }
    }

    fn try_receive(&mut self) -> Result<Option<Received>, TrapError> {
        self.mark_ready();
        self.check_alive()?;
        let r = self.poll_now(true);
        self.check_alive()?;
        Ok(r)
    }

    fn send_request(
        &mut self,
        target: wit::Address,
        request: wit::Request,
        context: Option<Vec<u8>>,
        blob: Option<wit::Blob>,
    ) -> Result<Result<(), wit::SendError>, TrapError> {
        self.check_alive()?;
        let Some(to) = self.target(&target) else {
            return Ok(Err(invalid_request(target, request, context)));
        };
        let request = match from_wit_request(request) {
            Ok(r) => r,
            Err(r) => return Ok(Err(invalid_request(target, r, context))),
        };
        let r = self.send(to, request, context, blob);
        Ok(r.map(|_| ()))
    }

    async fn send_and_await_response(
        &mut self,
        target: wit::Address,
        mut request: wit::Request,
        blob: Option<wit::Blob>,
    ) -> Result<Result<(wit::Address, wit::Message), wit::SendError>, TrapError> {
        self.check_alive()?;
        if request.expects_response.is_none() {
            request.expects_response = Some(DEFAULT_AWAIT.as_millis() as u64);
        }
        let Some(to) = self.target(&target) else {
            return Ok(Err(invalid_request(target, request, None)));
        };
        let request = match from_wit_request(request) {
            Ok(r) => r,
            Err(r) => return Ok(Err(invalid_request(target, r, None))),
        };
        let id = match self.send(to, request, None, blob) {
            Ok(Some(id)) => id,
            Ok(None) => unreachable!("a response is expected"),
            Err(e) => return Ok(Err(e)),
        };
        loop {
            // A response already waiting (a runtime module answers on the
            // sender's own task) is taken without a timer or a yield.
            let ready = match self.mailbox.try_recv() {
                Some(env) if !self.is_killed() => Wake::Mail(env),
                _ => {
                    let deadline = self.pending.get(&id).map(|p| p.deadline);
                    self.wake(deadline).await
                }
            };
            match ready {
                Wake::Killed => return Err(killed()),
                Wake::Mail(env) => {
                    if env.id == id && env.message.is_answer() {
                        if let Some(r) = self.accept(env) {
                            return Ok(r);
                        }
                    } else if self.deferred.len() >= MAX_DEFERRED
                        && matches!(env.message, Message::Request(_))
                    {
                        // No room to set it aside: its sender hears so now.
                        let bus = self.shared.bus.clone();
                        bus.fail_held(&self.our, env, SendErrorKind::MailboxFull);
                    } else {
                        self.deferred.push_back(env);
                    }
                }
                // The timer may have been set for an earlier request.
                Wake::Deadline => {
                    let due = self
                        .pending
                        .get(&id)
                        .is_some_and(|p| p.deadline <= Instant::now());
                    if due && let Some(p) = self.pending.remove(&id) {
                        return Ok(Err(send_error(
                            SendErrorKind::Timeout,
                            &p.target,
                            Message::Request(p.request),
                            p.context,
                        )));
                    }
                }
            }
        }
    }

    fn send_response(
        &mut self,
        response: wit::Response,
        blob: Option<wit::Blob>,
    ) -> Result<Result<(), wit::SendError>, TrapError> {
        self.check_alive()?;
        let Some(capabilities) = from_wit_caps(&response.capabilities) else {
            return Ok(Err(wit::SendError {
                kind: wit::SendErrorKind::Invalid,
                target: to_wit_addr(&self.our),
                message: wit::Message::Response((response, None)),
                context: None,
            }));
        };
        let resp = Response {
            inherit: response.inherit,
            body: response.body,
            metadata: response.metadata,
            capabilities,
        };
        let Some(cur) = self.handling.as_mut() else {
            let me = self.our.clone();
            return Ok(Err(send_error(
                SendErrorKind::Invalid,
                &me,
                Message::Response(resp, None),
                None,
            )));
        };
        // Nobody awaits a response (or it was already sent): nothing to do.
        let Some(rsvp) = cur.rsvp.take() else {
            return Ok(Ok(()));
        };
        let blob = blob
            .map(|b| Arc::new(from_wit_blob(b)))
            .or_else(|| resp.inherit.then(|| cur.blob.clone()).flatten());
        let env = Envelope {
            id: cur.id,
            source: self.our.clone(),
            target: rsvp.clone(),
            rsvp: None,
            message: Message::Response(resp, None),
            blob,
        };
        match self.send_routed(env) {
            Ok(()) => Ok(Ok(())),
            Err((kind, env)) => Ok(Err(send_error(kind, &rsvp, env.message, None))),
        }
    }

    async fn wait_for_room(&mut self, target: Option<wit::Address>) -> Result<bool, TrapError> {
        self.check_alive()?;
        let target = match target {
            Some(t) => self.target(&t),
            None => self.handling.as_ref().and_then(|h| h.rsvp.clone()),
        };
        Ok(match target {
            Some(t) => self.shared.bus.wait_for_room(&t.process).await,
            None => false,
        })
    }

    fn has_blob(&mut self) -> Result<bool, TrapError> {
        Ok(self.last.as_ref().is_some_and(|l| l.blob.is_some()))
    }

    fn get_blob(&mut self) -> Result<Option<wit::Blob>, TrapError> {
        Ok(self
            .last
            .as_ref()
            .and_then(|l| l.blob.as_ref())
            .map(|b| wit::Blob {
                mime: b.mime.clone(),
                bytes: b.bytes.clone(),
            }))
    }

    async fn set_state(&mut self, bytes: Vec<u8>) -> Result<Result<(), String>, TrapError> {
        self.check_alive()?;
        let path = self.state_path();
        let shown = path.display().to_string();
        let r = tokio::task::spawn_blocking(move || spindle_store::write_durable(&path, &bytes))
            .await
            .map_err(|e| TrapError::msg(e.to_string()))?;
        Ok(r.map_err(|e| format!("cannot save state to {shown}: {e}")))
    }

    fn get_state(&mut self) -> Result<Option<Vec<u8>>, TrapError> {
        Ok(std::fs::read(self.state_path()).ok())
    }

    fn clear_state(&mut self) -> Result<Result<(), String>, TrapError> {
        let path = self.state_path();
        Ok(match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("cannot clear state {}: {e}", path.display())),
        })
    }

    fn get_on_exit(&mut self) -> Result<wit::OnExit, TrapError> {
        Ok(self.on_exit.clone())
    }

    fn set_on_exit(&mut self, on_exit: wit::OnExit) -> Result<(), TrapError> {
        self.on_exit = on_exit;
        Ok(())
    }

    async fn spawn(
        &mut self,
        name: Option<String>,
        wasm_path: String,
        on_exit: wit::OnExit,
        request_capabilities: Vec<wit::Capability>,
        grant_to: Vec<wit::Address>,
        public: bool,
    ) -> Result<Result<wit::Address, String>, TrapError> {
        self.check_alive()?;
        let Some(caps) = from_wit_caps(&request_capabilities) else {
            return Ok(Err(
                "a capability to give the child names an issuer that is not an address (node@process:package:publisher)".into(),
            ));
        };
        let mut grantees = Vec::with_capacity(grant_to.len());
        for g in &grant_to {
            match from_wit_addr(g) {
                Some(a) => grantees.push(a),
                None => {
                    return Ok(Err(format!(
                        "grant-to `{g}` is not an address (node@process:package:publisher)"
                    )));
                }
            }
        }
        if let Some(c) = caps
            .iter()
            .find(|c| !self.shared.bus.may_attach(&self.our, c))
        {
            return Ok(Err(format!(
                "cannot give the child a capability this process does not hold: issuer {}, params {}",
                c.issuer, c.params
            )));
        }
        let (reply, answer) = oneshot::channel();
        let call = crate::SpawnCall {
            parent: (*self.our).clone(),
            name,
            dir: self.component_dir.clone(),
            component: wasm_path,
            on_exit: crate::driver::on_exit_from_wit(&on_exit),
            public,
            capabilities: caps,
            grant_to: grantees,
            reply,
        };
        if self.shared.spawns.send(call).await.is_err() {
            return Ok(Err("the node is shutting down".into()));
        }
        let child = match answer.await {
            Ok(Ok(child)) => child,
            Ok(Err(why)) => return Ok(Err(why)),
            Err(_) => return Ok(Err("the node is shutting down".into())),
        };
        // The capabilities that came with the child are durable before the
        // parent learns of it.
        self.caps_persisted().await;
        Ok(Ok(to_wit_addr(&child)))
    }

    fn our_capabilities(&mut self) -> Result<Vec<wit::Capability>, TrapError> {
        Ok(self
            .shared
            .bus
            .capabilities(&self.our.process)
            .iter()
            .map(to_wit_cap)
            .collect())
    }

    async fn save_capabilities(&mut self, caps: Vec<wit::Capability>) -> Result<(), TrapError> {
        // Only what actually arrived with the last message can be kept.
        let arrived = self.last.as_ref().map(|l| l.caps.as_slice()).unwrap_or(&[]);
        let keep: Vec<Capability> = from_wit_caps(&caps)
            .unwrap_or_default()
            .into_iter()
            .filter(|c| arrived.contains(c))
            .collect();
        self.shared.bus.grant(&self.our.process, keep);
        self.caps_persisted().await;
        Ok(())
    }

    async fn drop_capabilities(&mut self, caps: Vec<wit::Capability>) -> Result<(), TrapError> {
        // Malformed ones cannot be held, so there is nothing to drop for them.
        let caps: Vec<Capability> = caps
            .iter()
            .filter_map(|c| from_wit_caps(std::slice::from_ref(c)))
            .flatten()
            .collect();
        self.shared.bus.revoke(&self.our.process, &caps);
        self.caps_persisted().await;
        Ok(())
    }

    fn print(&mut self, text: String) -> Result<(), TrapError> {
        self.log_line(&text);
        Ok(())
    }

    fn report_panic(&mut self, message: String) -> Result<(), TrapError> {
        self.log_line(&format!("panic: {message}"));
        self.panic = Some(message);
        Ok(())
    }
}

pub use spindle_bus::DEFAULT_AWAIT;
/// Messages set aside while a process awaits one response: as many as its
/// mailbox holds. Requests beyond it fail to their senders as `mailbox-full`.
pub const MAX_DEFERRED: usize = spindle_bus::MAILBOX_CAPACITY;

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
        for env in self.deferred.drain(..) {
            bus.fail_held(&self.our, env, SendErrorKind::Exited);
        }
        bus.drain_ended(&self.our, &mut self.mailbox);
    }
}
