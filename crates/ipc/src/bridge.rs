//! The bridge between one native process's IPC channel and the bus.
//!
//! Two tasks per run. The reader takes frames from the process, checks them
//! and sends them on the bus as the process (its address is the source,
//! whatever the frame says); a full mailbox makes it wait, so a process that
//! floods the bus is slowed by the socket filling up, not by the daemon's
//! memory growing. The writer takes the process's mailbox and the reader's
//! replies and writes them out; a process that does not read fills its
//! socket, then its mailbox, and its senders get `mailbox-full`. Requests the
//! process awaits are tracked here (its own id, context, deadline), as the
//! wasm host tracks them for a guest.
//!
//! Whatever a process writes — not JSON, an unknown type, a forged source,
//! a frame over [`MAX_FRAME`](crate::frame::MAX_FRAME), a channel closed
//! mid-frame — costs only it: an error frame back, or the channel closed,
//! with the reason logged.

use crate::frame::{self, BlobIn, Call, FrameError, FromProcess, Json, MAX_FRAME};
use crate::io::{ChannelReader, ChannelWriter};
use serde_json::{Value, json};
use spindle_bus::{
    Blob, Bus, Capability, Envelope, Mailbox, Message, Request, Response, SendErrorKind, SpawnCall,
};
use spindle_types::Address;
use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;

/// Frames queued for the writer (replies, errors, `stopping`): a process
/// that sends faster than it reads waits here.
const OUT_QUEUE: usize = 256;
/// Requests a process may leave unanswered before the oldest is forgotten
/// (a response to a forgotten one is refused as having nothing to answer).
const MAX_UNANSWERED: usize = 4096;
use spindle_bus::MAX_AWAITED;
/// Capabilities that came with messages and may still be saved, per run; past
/// this the oldest offer lapses (a process keeps what it means to keep soon
/// after it arrives).
const MAX_OFFERED: usize = 4096;

/// How a bridge reaches the node's control loop to start wasm children.
#[derive(Clone)]
pub struct Spawner {
    pub calls: mpsc::Sender<SpawnCall>,
    /// Where a relative component path is taken from: the process's
    /// working directory.
    pub dir: PathBuf,
}

/// Capabilities delivered to the process that it may save: a wasm process
/// may keep what came with its last message; a native one handles messages
/// concurrently, so any recent offer counts.
#[derive(Default)]
struct Offered {
    set: HashSet<Capability>,
    order: VecDeque<Capability>,
}

impl Offered {
    fn add(&mut self, caps: &[Capability]) {
        for c in caps {
            if self.set.insert(c.clone()) {
                self.order.push_back(c.clone());
            }
        }
        while self.order.len() > MAX_OFFERED {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }
}

/// A request the process sent and awaits an answer to.
struct Awaited {
    /// The process's own number for it.
    id: u64,
    target: String,
    context: Option<Json>,
    deadline: Instant,
}

#[derive(Default)]
struct State {
    /// By bus number.
    awaited: HashMap<u64, Awaited>,
    /// Requests delivered to the process that expect a response or carry a
    /// blob, by bus number: what a response or an inheriting request needs.
    unanswered: HashMap<u64, Incoming>,
    offered: Offered,
    /// When the writer's deadline timer fires, if it is set: the reader
    /// wakes the writer only for an earlier deadline.
    timer_at: Option<Instant>,
}

struct Incoming {
    /// Where a response goes; `None` if none is expected.
    rsvp: Option<Arc<Address>>,
    blob: Option<Arc<Blob>>,
}

/// A running bridge. Dropping it leaves the tasks running until the
/// channel closes or the process leaves the bus.
pub struct Bridge {
    out: mpsc::Sender<Vec<u8>>,
    connected: Arc<AtomicBool>,
    heard: Arc<Heard>,
    fault: Arc<Mutex<Option<String>>>,
}

/// Runs one of the bridge's tasks; a panic in it is recorded as the
/// bridge's fault (the daemon then ends the process as crashed) and the
/// channel counts as gone, instead of the task vanishing unseen.
async fn guarded(
    me: Arc<Address>,
    fault: Arc<Mutex<Option<String>>>,
    connected: Arc<AtomicBool>,
    task: impl std::future::Future<Output = ()>,
) {
    use futures_util::FutureExt as _;
    if let Err(payload) = std::panic::AssertUnwindSafe(task).catch_unwind().await {
        let text = spindle_types::fault::panic_text(&*payload);
        let why = format!("host error: its IPC bridge failed ({text})");
        tracing::error!("{me}: {why}");
        connected.store(false, Ordering::Release);
        fault
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(why);
    }
}

/// When the process last sent a frame, for the watchdog.
struct Heard {
    since: Instant,
    /// Milliseconds after `since`.
    last: std::sync::atomic::AtomicU64,
}

impl Heard {
    fn now(&self) {
        let ms = self.since.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }
}

impl Bridge {
    /// Bridges `channel` (the daemon's end) for the process at `me`, whose
    /// mailbox is `mailbox`; `spawner`, if any, serves its spawn calls. Must
    /// run inside the daemon's runtime.
    pub fn start(
        channel: OwnedFd,
        me: Address,
        bus: Arc<Bus>,
        mailbox: Mailbox,
        spawner: Option<Spawner>,
    ) -> std::io::Result<Bridge> {
        let (read, write) = crate::io::split(channel.into())?;
        let (out, out_rx) = mpsc::channel(OUT_QUEUE);
        let connected = Arc::new(AtomicBool::new(true));
        let state = Arc::new(Mutex::new(State::default()));
        let deadlines = Arc::new(Notify::new());
        let (closed_tx, closed) = watch::channel(false);
        let raw_blobs = Arc::new(AtomicBool::new(false));
        let heard = Arc::new(Heard {
            since: Instant::now(),
            last: 0.into(),
        });
        let me = Arc::new(me);
        let fault: Arc<Mutex<Option<String>>> = Arc::default();
        tokio::spawn(guarded(
            me.clone(),
            fault.clone(),
            connected.clone(),
            Reader {
                me: me.clone(),
                bus: bus.clone(),
                out: out.clone(),
                state: state.clone(),
                deadlines: deadlines.clone(),
                connected: connected.clone(),
                heard: heard.clone(),
                raw_blobs: raw_blobs.clone(),
                spawner,
                last_target: None,
            }
            .run(BufReader::new(read), closed_tx),
        ));
        tokio::spawn(guarded(
            me.clone(),
            fault.clone(),
            connected.clone(),
            Writer {
                me,
                bus,
                state,
                deadlines,
                raw_blobs,
                last_source: None,
            }
            .run(write, mailbox, out_rx, closed),
        ));
        Ok(Bridge {
            out,
            connected,
            heard,
            fault,
        })
    }

    /// Why the bridge failed, if host code serving it panicked: the
    /// process is to end as crashed with this detail.
    pub fn fault(&self) -> Option<String> {
        self.fault.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How long since the process last sent anything (or since the run
    /// started, if it never has).
    pub fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.heard.last.load(Ordering::Relaxed));
        self.heard.since.elapsed().saturating_sub(last)
    }

    /// Whether the process still holds its end of the channel.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Asks the process to stop (`{"type":"stopping"}`); false if the
    /// channel is gone or clogged, and the caller should signal instead.
    pub fn ask_stop(&self) -> bool {
        self.is_connected() && self.out.try_send(frame::stopping()).is_ok()
    }
}

struct Reader {
    me: Arc<Address>,
    bus: Arc<Bus>,
    out: mpsc::Sender<Vec<u8>>,
    state: Arc<Mutex<State>>,
    deadlines: Arc<Notify>,
    connected: Arc<AtomicBool>,
    heard: Arc<Heard>,
    /// Set when the process says it reads raw blobs.
    raw_blobs: Arc<AtomicBool>,
    spawner: Option<Spawner>,
    /// The last target named, parsed: a process mostly talks to the same few.
    last_target: Option<(String, Arc<Address>)>,
}

/// Bytes of a raw blob that must arrive before the whole of it is allocated.
const RAW_BLOB_STEP: usize = 64 << 10;

/// A blob from a frame, its raw bytes read from `input` if they follow it.
async fn read_blob(
    blob: Option<BlobIn>,
    input: &mut BufReader<ChannelReader>,
) -> std::io::Result<Option<Arc<Blob>>> {
    Ok(match blob {
        None => None,
        Some(BlobIn::Inline { mime, bytes }) => Some(Arc::new(Blob { mime, bytes })),
        Some(BlobIn::Raw { mime, len }) => {
            // The whole blob is allocated only once its first bytes have
            // come: a process that declares 64 MiB and sends nothing holds
            // nothing. (The buffer is zeroed lazily by the allocator.)
            let head_len = len.min(RAW_BLOB_STEP);
            let mut head = vec![0; head_len];
            input.read_exact(&mut head).await?;
            let bytes = if head_len == len {
                head
            } else {
                let mut all = vec![0; len];
                all[..head_len].copy_from_slice(&head);
                input.read_exact(&mut all[head_len..]).await?;
                all
            };
            Some(Arc::new(Blob { mime, bytes }))
        }
    })
}

impl Reader {
    async fn run(mut self, mut input: BufReader<ChannelReader>, closed: watch::Sender<bool>) {
        let me_text = self.me.to_string();
        let mut line = Vec::new();
        let why = loop {
            line.clear();
            let limit = (MAX_FRAME + 1) as u64;
            match (&mut input).take(limit).read_until(b'\n', &mut line).await {
                Ok(0) => break None,
                Ok(_) if line.last() != Some(&b'\n') => {
                    break Some(if line.len() > MAX_FRAME {
                        format!(
                            "a frame over {} MiB: channel closed (send large data in pieces)",
                            MAX_FRAME >> 20
                        )
                    } else {
                        "the channel closed in the middle of a frame".to_string()
                    });
                }
                Ok(_) => {
                    self.heard.now();
                    line.pop();
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    let mut f = match frame::parse(&line, &me_text) {
                        Ok(f) => f,
                        Err(e) => {
                            self.refuse(&e).await;
                            continue;
                        }
                    };
                    let declared = match &mut f {
                        FromProcess::Request { blob, .. } | FromProcess::Response { blob, .. } => {
                            blob.take()
                        }
                        _ => None,
                    };
                    match read_blob(declared, &mut input).await {
                        Ok(blob) => self.handle(f, blob).await,
                        Err(e) => {
                            break Some(format!(
                                "the channel closed in the middle of a blob ({e})"
                            ));
                        }
                    }
                }
                Err(e) => break Some(format!("reading the channel failed: {e}")),
            }
        };
        if let Some(why) = why {
            tracing::warn!("{}: {why}", self.me);
        }
        self.connected.store(false, Ordering::Release);
        let _ = closed.send(true);
    }

    /// Refuses a request of the process's (its own `id`, if it gave one) as `invalid`.
    async fn invalid(&self, id: Option<u64>, target: &str, why: &str, context: Option<&Json>) {
        let _ = self
            .out
            .send(frame::error(
                id,
                "invalid",
                Some(target),
                why,
                context.map(Json::raw),
            ))
            .await;
    }

    async fn refuse(&self, e: &FrameError) {
        tracing::warn!("{}: refused a frame: {e}", self.me);
        self.refuse_text(&e.to_string()).await;
    }

    /// Says a frame of the process's was refused (it names no request of its own).
    async fn refuse_text(&self, why: &str) {
        let _ = self
            .out
            .send(frame::error(None, "invalid", None, why, None))
            .await;
    }

    /// Why the process may not attach `caps`, if it may not: each must be
    /// one it holds or issued (the bus checks again on delivery).
    fn not_ours(&self, caps: &[Capability]) -> Option<String> {
        let c = caps.iter().find(|c| !self.bus.may_attach(&self.me, c))?;
        Some(format!(
            "cannot attach a capability this process does not hold: issuer {}, params {}",
            c.issuer, c.params
        ))
    }

    /// What this process holds, as a reply's fields.
    fn held(&self) -> Value {
        json!({ "capabilities": self.bus.capabilities(&self.me.process) })
    }

    /// Waits until capability changes are on disk; a failed write is said
    /// to the process (the change holds in memory and is retried).
    async fn persisted(&self) -> Result<(), String> {
        self.bus
            .persisted()
            .await
            .map_err(|why| self.not_saved(why))
    }

    /// What the process is told when a capability change is not on disk.
    fn not_saved(&self, why: spindle_bus::persist::NotSaved) -> String {
        tracing::warn!("{}: capabilities not saved: {why}", self.me);
        format!("capabilities not saved to disk ({why}); they hold until the node restarts")
    }

    async fn call(&self, call: Call) -> Result<Value, String> {
        match call {
            Call::Capabilities => Ok(self.held()),
            Call::SaveCapabilities(caps) => {
                let keep: Vec<Capability> = {
                    let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                    caps.into_iter()
                        .filter(|c| st.offered.set.contains(c))
                        .collect()
                };
                self.bus.grant(&self.me.process, keep);
                self.persisted().await?;
                Ok(self.held())
            }
            Call::DropCapabilities(caps) => {
                self.bus.revoke(&self.me.process, &caps);
                self.persisted().await?;
                Ok(self.held())
            }
            Call::Spawn(s) => {
                let Some(spawner) = &self.spawner else {
                    return Err("this node does not start wasm processes".into());
                };
                if let Some(why) = self.not_ours(&s.capabilities) {
                    return Err(format!("cannot give it to the child: {why}"));
                }
                let (reply, answer) = oneshot::channel();
                let call = SpawnCall {
                    parent: (*self.me).clone(),
                    name: s.name,
                    dir: spawner.dir.clone(),
                    component: s.wasm,
                    resolved: None,
                    on_exit: s.on_exit,
                    public: s.public,
                    capabilities: s.capabilities,
                    grant_to: s.grant_to,
                    reply,
                };
                let gone = || "the node is shutting down".to_string();
                spawner.calls.send(call).await.map_err(|_| gone())?;
                let child = answer
                    .await
                    .map_err(|_| gone())?
                    .map_err(|e| e.to_string())?;
                // What came with the child lands in the journal's next group
                // commit; the parent runs ahead of the disk only within its window.
                self.bus
                    .persisted_within_window()
                    .await
                    .map_err(|why| self.not_saved(why))?;
                Ok(json!({ "address": child.to_string() }))
            }
        }
    }

    /// `text` as an address (the last one named is kept parsed).
    fn target(&mut self, text: &str) -> Option<Arc<Address>> {
        if let Some((t, a)) = &self.last_target
            && t == text
        {
            return Some(a.clone());
        }
        let a = Arc::new(text.parse::<Address>().ok()?);
        self.last_target = Some((text.to_string(), a.clone()));
        Some(a)
    }

    async fn handle(&mut self, f: FromProcess, blob: Option<Arc<Blob>>) {
        match f {
            FromProcess::Request {
                target,
                id,
                timeout_ms,
                body,
                metadata,
                context,
                inherit,
                capabilities,
                ..
            } => {
                let Some(to) = self.target(&target) else {
                    let msg = format!(
                        "`target` {target:?} is not an address (node@process:package:publisher)"
                    );
                    self.invalid(id, &target, &msg, context.as_ref()).await;
                    return;
                };
                if let Some(why) = self.not_ours(&capabilities) {
                    self.invalid(id, &target, &why, context.as_ref()).await;
                    return;
                }
                let awaits = id.zip(timeout_ms);
                // Inheriting: the parent's blob if none is given, and (with
                // no response awaited) its number and response route.
                let mut blob = blob;
                let mut route = None;
                if let Some(parent) = inherit {
                    let found = {
                        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                        st.unanswered
                            .get(&parent)
                            .map(|p| (p.blob.clone(), p.rsvp.clone()))
                            .inspect(|(_, rsvp)| {
                                if awaits.is_none() && rsvp.is_some() {
                                    st.unanswered.remove(&parent);
                                }
                            })
                    };
                    let Some((parent_blob, rsvp)) = found else {
                        let msg = format!(
                            "nothing to inherit from: request {parent} expected no response and carried no blob, or was answered"
                        );
                        self.invalid(id, &target, &msg, context.as_ref()).await;
                        return;
                    };
                    if blob.is_none() {
                        blob = parent_blob;
                    }
                    if awaits.is_none() {
                        route = rsvp.map(|r| (parent, r));
                    }
                }
                let number = match &route {
                    Some((parent, _)) => *parent,
                    None => self.bus.next_id(),
                };
                if let Some((id, ms)) = awaits {
                    let deadline =
                        Instant::from_std(spindle_bus::deadline_after(Duration::from_millis(ms)));
                    let full = self
                        .state
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .awaited
                        .len()
                        >= MAX_AWAITED;
                    if full {
                        let why = format!(
                            "mailbox-full: this process already awaits {MAX_AWAITED} responses; wait for some before sending more"
                        );
                        let _ = self
                            .out
                            .send(frame::error(
                                Some(id),
                                SendErrorKind::MailboxFull.name(),
                                Some(&target),
                                &why,
                                context.as_ref().map(Json::raw),
                            ))
                            .await;
                        return;
                    }
                    let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                    st.awaited.insert(
                        number,
                        Awaited {
                            id,
                            target: target.clone(),
                            context: context.clone(),
                            deadline,
                        },
                    );
                    if st.timer_at.is_none_or(|at| deadline < at) {
                        self.deadlines.notify_one();
                    }
                }
                let env = Envelope {
                    id: number,
                    source: self.me.clone(),
                    target: to,
                    rsvp: match route {
                        Some((_, rsvp)) => Some(rsvp),
                        None => awaits.map(|_| self.me.clone()),
                    },
                    message: Message::Request(Request {
                        inherit: inherit.is_some(),
                        expects_response: timeout_ms.map(Duration::from_millis),
                        body,
                        metadata,
                        capabilities,
                    }),
                    blob,
                };
                if let Err((kind, _)) = self.bus.send(env, false).await {
                    self.state
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .awaited
                        .remove(&number);
                    let _ = self
                        .out
                        .send(frame::error(
                            id,
                            kind.name(),
                            Some(&target),
                            &kind.to_string(),
                            context.as_ref().map(Json::raw),
                        ))
                        .await;
                }
            }
            FromProcess::Response {
                id,
                body,
                metadata,
                inherit,
                capabilities,
                ..
            } => {
                if let Some(why) = self.not_ours(&capabilities) {
                    self.refuse_text(&why).await;
                    return;
                }
                let incoming = self
                    .state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .unanswered
                    .remove(&id);
                let (rsvp, parent_blob) = match incoming {
                    Some(Incoming { rsvp, blob }) => (rsvp, blob),
                    None => (None, None),
                };
                let blob = if inherit && blob.is_none() {
                    parent_blob
                } else {
                    blob
                };
                let Some(rsvp) = rsvp else {
                    let msg = format!(
                        "nothing to respond to: request {id} expected no response, was answered, or never came"
                    );
                    self.refuse_text(&msg).await;
                    return;
                };
                let env = Envelope {
                    id,
                    source: self.me.clone(),
                    target: rsvp,
                    rsvp: None,
                    message: Message::Response(
                        Response {
                            inherit,
                            body,
                            metadata,
                            capabilities,
                        },
                        None,
                    ),
                    blob,
                };
                // A requester that is gone or swamped just does not get it.
                let _ = self.bus.send(env, false).await;
            }
            FromProcess::Call { id, call } => {
                let answer = self.call(call).await;
                let _ = self.out.send(frame::reply(id, answer)).await;
            }
            FromProcess::Hello { raw_blobs } => self.raw_blobs.store(raw_blobs, Ordering::Release),
            FromProcess::Heartbeat | FromProcess::Internal => {}
        }
    }
}

struct Writer {
    me: Arc<Address>,
    bus: Arc<Bus>,
    state: Arc<Mutex<State>>,
    deadlines: Arc<Notify>,
    raw_blobs: Arc<AtomicBool>,
    /// The last source written, as text: most messages come from the same few.
    last_source: Option<(Arc<Address>, Arc<str>)>,
}

impl Writer {
    async fn run(
        mut self,
        output: ChannelWriter,
        mut mailbox: Mailbox,
        mut queued: mpsc::Receiver<Vec<u8>>,
        mut closed: watch::Receiver<bool>,
    ) {
        // One timer for every awaited request's deadline: moved when an
        // earlier one appears (the reader notifies) or when it fires, not
        // per frame.
        let mut timer = Box::pin(tokio::time::sleep(Duration::from_secs(3600)));
        let mut armed = false;
        self.serve(
            &output,
            &mut mailbox,
            &mut queued,
            &mut closed,
            &mut timer,
            &mut armed,
        )
        .await;
        // Nothing the process held will be answered now: its requesters
        // hear so at once.
        let held: Vec<(u64, Arc<Address>)> = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.unanswered
                .drain()
                .filter_map(|(id, i)| Some((id, i.rsvp?)))
                .collect()
        };
        for (id, rsvp) in held {
            self.bus
                .fail_request(&self.me, id, rsvp, SendErrorKind::Exited);
        }
        self.bus.drain_ended(&self.me, &mut mailbox);
    }

    async fn serve(
        &mut self,
        output: &ChannelWriter,
        mailbox: &mut Mailbox,
        queued: &mut mpsc::Receiver<Vec<u8>>,
        closed: &mut watch::Receiver<bool>,
        timer: &mut std::pin::Pin<Box<tokio::time::Sleep>>,
        armed: &mut bool,
    ) {
        loop {
            let (bytes, blob) = tokio::select! {
                _ = closed.changed() => return,
                f = queued.recv() => match f {
                    Some(f) => (f, None),
                    None => return,
                },
                env = mailbox.recv() => match env {
                    Some(env) => match self.deliver(env) {
                        Some(out) => out,
                        None => continue,
                    },
                    // Off the bus: the run is over.
                    None => return,
                },
                _ = timer.as_mut(), if *armed => {
                    let out = self.expire();
                    *armed = self.arm(timer);
                    if out.is_empty() {
                        continue;
                    }
                    (out, None)
                }
                _ = self.deadlines.notified() => {
                    *armed = self.arm(timer);
                    continue;
                }
            };
            let blob_bytes = blob.as_deref().map_or(&[][..], |b| b.bytes.as_slice());
            let written = output.write_all(&mut [&bytes, blob_bytes]).await;
            if let Err(e) = written {
                tracing::debug!("{}: writing the channel failed: {e}", self.me);
                return;
            }
        }
    }

    /// Sets the timer to the earliest awaited deadline, if that is earlier
    /// than what it is set to; whether it is set.
    fn arm(&self, timer: &mut std::pin::Pin<Box<tokio::time::Sleep>>) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let next = st.awaited.values().map(|a| a.deadline).min();
        if let Some(next) = next
            && st.timer_at.is_none_or(|at| next < at)
        {
            timer.as_mut().reset(next);
            st.timer_at = Some(next);
        }
        st.timer_at.is_some()
    }

    /// A message from the bus as a frame, if it is one the process gets.
    fn source_text(&mut self, source: &Arc<Address>) -> Arc<str> {
        if let Some((a, text)) = &self.last_source
            && (Arc::ptr_eq(a, source) || a == source)
        {
            return text.clone();
        }
        let text: Arc<str> = source.to_string().into();
        self.last_source = Some((source.clone(), text.clone()));
        text
    }

    fn deliver(&mut self, env: Envelope) -> Option<(Vec<u8>, Option<Arc<Blob>>)> {
        let source = self.source_text(&env.source);
        let raw = self.raw_blobs.load(Ordering::Acquire);
        let blob = env.blob;
        let out = blob
            .as_deref()
            .map(|b| (b.mime.as_deref(), b.bytes.as_slice()));
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let line = match env.message {
            Message::Request(r) => {
                let rsvp = env.rsvp.filter(|_| r.expects_response.is_some());
                let expects = rsvp.is_some();
                if expects || blob.is_some() {
                    if st.unanswered.len() >= MAX_UNANSWERED
                        && let Some(&oldest) = st.unanswered.keys().min()
                    {
                        st.unanswered.remove(&oldest);
                    }
                    let blob = blob.clone();
                    st.unanswered.insert(env.id, Incoming { rsvp, blob });
                }
                st.offered.add(&r.capabilities);
                frame::request(env.id, &source, &r, expects, out, raw)
            }
            Message::Failed(kind) => {
                let a = st.awaited.remove(&env.id)?;
                frame::error(
                    Some(a.id),
                    kind.name(),
                    Some(&a.target),
                    &kind.to_string(),
                    a.context.as_ref().map(Json::raw),
                )
            }
            Message::Response(r, _) => match st.awaited.remove(&env.id) {
                Some(a) => {
                    st.offered.add(&r.capabilities);
                    frame::response(
                        a.id,
                        &source,
                        &r,
                        a.context.as_ref().map(Json::raw),
                        out,
                        raw,
                    )
                }
                None => {
                    self.bus.late_responses.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            },
        };
        // Raw: the blob's bytes follow the frame, written from where they are.
        Some((line, blob.filter(|_| raw)))
    }

    /// Error frames for every awaited request whose time is up.
    fn expire(&self) -> Vec<u8> {
        let now = Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.timer_at = None;
        let due: Vec<u64> = st
            .awaited
            .iter()
            .filter(|(_, a)| a.deadline <= now)
            .map(|(n, _)| *n)
            .collect();
        let mut out = Vec::new();
        for n in due {
            if let Some(a) = st.awaited.remove(&n) {
                out.extend(frame::error(
                    Some(a.id),
                    "timeout",
                    Some(&a.target),
                    &SendErrorKind::Timeout.to_string(),
                    a.context.as_ref().map(Json::raw),
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_panicking_bridge_task_is_a_fault_not_a_silence() {
        let fault: Arc<Mutex<Option<String>>> = Arc::default();
        let connected = Arc::new(AtomicBool::new(true));
        let me = Arc::new("local@n:t:spindle".parse().unwrap());
        guarded(me, fault.clone(), connected.clone(), async {
            panic!("a frame the code did not expect");
        })
        .await;
        let why = fault
            .lock()
            .unwrap()
            .clone()
            .expect("the fault is recorded");
        assert!(
            why.starts_with("host error") && why.contains("did not expect"),
            "{why}"
        );
        assert!(!connected.load(Ordering::Acquire));
    }
}
