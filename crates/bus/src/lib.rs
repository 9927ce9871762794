//! # spindle-bus: how messages travel between processes
//!
//! Every running process that takes part in messaging has an [`Endpoint`] in
//! the [`Bus`]: its address, whether it is public, and the sending half of its
//! bounded mailbox. Delivery does not go through the kernel task or any other
//! central loop: the sender's own task looks the target up in a read-mostly
//! table (one `RwLock` read), checks the capability, and pushes into the
//! target's mailbox. At a full mailbox, [`Bus::send`] makes the sender wait
//! up to [`MAILBOX_WAIT`], then fail with `MailboxFull`; [`Bus::send_now`]
//! fails at once, for senders that wait themselves ([`Bus::wait_for_room`]).
//! Either way backpressure slows the sender without blocking anyone else,
//! and no queue is unbounded. A [`Service`] of the node's own (a runtime
//! module such as `kv`) sits behind an endpoint instead of a mailbox: the
//! sender's task hands it the message directly, after the same checks.
//!
//! Capabilities (`{issuer, params}`) are held per process id and outlive a
//! process's runs, so a restart keeps what it held and what it granted. The
//! kernel revokes everything a process issued when it is killed. A bus made
//! with [`Bus::open`] also keeps them in the node's journal ([`persist`]), so they outlive
//! the daemon too. A process may message another if the target is public or
//! it holds the target's messaging capability; it may attach a capability to
//! a message only if it holds it or is its issuer — the bus decides, not the
//! sender.
//!
//! A target on another node goes to the node's [`Remote`] (the links to
//! its peers, `spindle-net`) after the same checks, plus one: a process
//! needs the [`Capability::network`] right to send off the node, and to be
//! reached from it. What comes in from a peer enters by
//! [`Bus::deliver_remote`], where the receiving side's rules apply.
//!
//! Requests are numbered by the bus; a response carries the number of the
//! request it answers and goes to that request's `rsvp`. Tracking of
//! outstanding requests (contexts, timeouts, late responses) belongs to the
//! requester's own host, next to its mailbox.

mod caps;
mod message;
pub mod persist;
mod reply;
mod spawn;
pub mod trace;

pub use message::{
    Blob, Capability, Envelope, Message, Request, Response, SendError, SendErrorKind,
    UNCOUNTED_BYTES,
};
pub use reply::Reply;
pub use spawn::{
    FileStamp, Found, MAX_COMPONENT_PATH, PathRefused, SpawnCall, SpawnError, confine,
};

use spindle_store::journal::Journal;
use spindle_types::{Address, ProcessId};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::mpsc;

/// Messages a mailbox holds before senders have to wait.
pub const MAILBOX_CAPACITY: usize = 1024;
/// Bytes one mailbox may hold by default ([`spindle_types::limits::MAILBOX_BYTES`]).
pub const MAILBOX_BYTES: usize = spindle_types::limits::MAILBOX_BYTES as usize;
/// Bytes all mailboxes of the node may hold together.
pub const NODE_QUEUED_BYTES: usize = spindle_types::limits::NODE_QUEUED_BYTES as usize;
/// Bytes the mailboxes of one package may hold together: a quarter of the
/// node's, so one package filling its processes' mailboxes leaves the rest.
pub const PACKAGE_QUEUED_BYTES: usize = NODE_QUEUED_BYTES / 4;
pub use spindle_types::limits::{DEFAULT_AWAIT, MAILBOX_WAIT, MAX_AWAIT};
/// Requests one process may await responses to at once (a wasm process's
/// awaited table, a native process's bridge): past it a send is refused
/// `mailbox-full` until some are answered.
pub const MAX_AWAITED: usize = 4096;
/// Rights (holder and capability) on other nodes the processes of one
/// package may give: the record of them is this node's to keep (in memory
/// and on disk), so each package has its own budget and none can spend
/// another's — and a package's short-lived children share it, so the
/// record stays bounded however many come and go.
pub const MAX_REMOTE_HOLDERS: usize = 4096;

/// When a response awaited for `timeout` from now is due: at most
/// [`MAX_AWAIT`] away, whatever a process asked for.
pub fn deadline_after(timeout: Duration) -> std::time::Instant {
    let now = std::time::Instant::now();
    let wait = timeout.min(MAX_AWAIT);
    now.checked_add(wait).unwrap_or(now)
}

/// The `params` of a messaging capability.
pub const MESSAGING: &str = spindle_abi::MESSAGING_PARAMS;

/// Something in the node itself that takes messages (a runtime module such
/// as `kv`): called on the sender's own task, after the bus's checks, with
/// each message for it. It answers at once (a cached read) or hands the
/// message to a thread of its own and answers later; it never blocks.
pub trait Service: Send + Sync + 'static {
    fn handle(&self, env: Envelope);

    /// A run of `process` came onto the bus (its mailbox is ready).
    fn arrived(&self, _process: &ProcessId) {}

    /// A run of `process` left the bus: what it kept here for that run
    /// alone may go.
    fn departed(&self, _process: &ProcessId) {}

    /// `process` is gone for good (deleted): nothing of it may outlive it.
    fn forgotten(&self, _process: &ProcessId) {}
}

/// The node's links to other nodes: takes a message for a process on
/// another node, queues it on that node's link, or says at once why not
/// (`Offline`: an unknown node, or a link that is down; `MailboxFull`: the
/// link's queue is full). Never blocks.
pub trait Remote: Send + Sync + 'static {
    fn send(&self, env: Envelope) -> Result<(), Undelivered>;
}

/// This node's own name and its links ([`Bus::connect`]).
struct Network {
    name: String,
    remote: Arc<dyn Remote>,
}

/// Where an endpoint's messages go.
enum Inbox {
    Mailbox(mpsc::Sender<Slot>, Arc<Queued>),
    Service(Arc<dyn Service>),
}

/// A message in a mailbox's channel. One whose bytes are counted gives them
/// back when it leaves the channel by any way — read, drained, or dropped
/// with the channel after the mailbox is gone (a sender holding a permit can
/// still put one in after the mailbox's last drain).
///
/// Boxed, pointer-sized: the channel allocates its slots in blocks of 32,
/// and 32 inline envelopes (144 bytes each) would cost every idle process
/// 4.5 KiB; boxed, the block is 256 bytes, for one allocation per message.
type Slot = Box<Counted>;

struct Counted {
    /// Always there until [`Counted::open`] takes it.
    env: Option<Envelope>,
    refund: Option<Arc<Queued>>,
}

impl Counted {
    fn slot(env: Envelope, weight: usize, queued: &Arc<Queued>) -> Slot {
        Box::new(Counted {
            env: Some(env),
            refund: (weight > 0).then(|| queued.clone()),
        })
    }

    /// The message, its bytes given back.
    fn open(mut self) -> Envelope {
        self.refund();
        self.env.take().expect("a slot is opened once")
    }

    fn refund(&mut self) {
        if let (Some(queued), Some(env)) = (self.refund.take(), &self.env) {
            queued.give(env.weight());
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.refund();
    }
}

/// Bytes queued in one mailbox, in its package's and in all of the node's.
#[derive(Debug)]
struct Queued {
    here: AtomicUsize,
    /// This mailbox's budget.
    cap: usize,
    /// Bytes queued in the mailboxes of its package ([`PACKAGE_QUEUED_BYTES`]).
    package: Arc<AtomicUsize>,
    node: Arc<AtomicUsize>,
    /// A sender waits for bytes to drain ([`Bus::wait_for_room`]).
    waiting: AtomicBool,
    room: tokio::sync::Notify,
}

impl Queued {
    /// Counts `n` more bytes in, if the budgets have room: this mailbox's,
    /// its package's and the node's. What the node itself sends (module
    /// answers, stop requests) is held to the mailbox's alone, so a package
    /// that fills the node's budget cannot silence the node.
    fn take(&self, n: usize, from_node: bool) -> bool {
        if n == 0 {
            return true;
        }
        let here = self.here.fetch_add(n, Ordering::AcqRel);
        let package = self.package.fetch_add(n, Ordering::AcqRel);
        let node = self.node.fetch_add(n, Ordering::AcqRel);
        let over = here.saturating_add(n) > self.cap
            || (!from_node
                && (package.saturating_add(n) > PACKAGE_QUEUED_BYTES
                    || node.saturating_add(n) > NODE_QUEUED_BYTES));
        if over {
            self.here.fetch_sub(n, Ordering::AcqRel);
            self.package.fetch_sub(n, Ordering::AcqRel);
            self.node.fetch_sub(n, Ordering::AcqRel);
        }
        !over
    }

    fn give(&self, n: usize) {
        if n > 0 {
            let before = self.here.fetch_sub(n, Ordering::AcqRel);
            self.package.fetch_sub(n, Ordering::AcqRel);
            self.node.fetch_sub(n, Ordering::AcqRel);
            if self.waiting.load(Ordering::Acquire) && before - n < self.room_again() {
                self.waiting.store(false, Ordering::Release);
                self.room.notify_waiters();
            }
        }
    }

    /// A mailbox full of bytes has room again once it holds less than half.
    fn room_again(&self) -> usize {
        self.cap / 2
    }

    /// Waits (until `until`) for the mailbox to fall below half its budget.
    async fn drained(&self, until: tokio::time::Instant) -> bool {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.waiting.store(true, Ordering::Release);
            if self.here.load(Ordering::Acquire) < self.room_again() {
                return true;
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return self.here.load(Ordering::Acquire) < self.room_again();
            }
        }
    }
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Inbox::Mailbox(..) => "mailbox",
            Inbox::Service(_) => "service",
        })
    }
}

/// A registered process's public face. A sender may keep one (from
/// [`Bus::endpoint`]) to send to the same target again without a lookup; it
/// stops working, with `Offline`, once the target is off the bus.
#[derive(Debug)]
pub struct Endpoint {
    pub address: Address,
    pub public: bool,
    inbox: Inbox,
    /// Cleared when the process leaves the bus (its mailbox may still be
    /// draining, but nothing new may enter it).
    on_bus: std::sync::atomic::AtomicBool,
}

impl Endpoint {
    /// False once the process has left the bus: look it up again (a new run
    /// has a new endpoint).
    pub fn is_on_bus(&self) -> bool {
        self.on_bus.load(Ordering::Acquire)
    }

    /// Whether a service of the node's own answers here (a delivery to it
    /// runs the service), rather than a mailbox (a delivery only queues).
    pub fn is_service(&self) -> bool {
        matches!(self.inbox, Inbox::Service(_))
    }
}

/// The receiving side handed to the process's host.
#[derive(Debug)]
pub struct Mailbox {
    rx: mpsc::Receiver<Slot>,
    queued: Arc<Queued>,
}

impl Mailbox {
    /// The next message; `None` once the process is off the bus.
    pub async fn recv(&mut self) -> Option<Envelope> {
        Some(self.rx.recv().await?.open())
    }

    /// The next message if one is waiting.
    pub fn try_recv(&mut self) -> Option<Envelope> {
        Some(self.rx.try_recv().ok()?.open())
    }

    /// Lets nothing more in; what is queued can still be taken.
    pub fn close(&mut self) {
        self.rx.close();
    }

    /// Messages queued in it now.
    pub fn len(&self) -> usize {
        self.rx.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// Bytes queued in it now (of messages over [`UNCOUNTED_BYTES`]).
    pub fn queued_bytes(&self) -> usize {
        self.queued.here.load(Ordering::Acquire)
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        // What is still queued leaves the node's count with it now (each
        // slot gives its bytes back as it drops).
        self.rx.close();
        while self.rx.try_recv().is_ok() {}
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    #[error("address {0} is already in use by a running process: choose another name")]
    AddressTaken(Address),
}

/// Who holds which capabilities (the legacy file's form).
pub(crate) type Caps = HashMap<ProcessId, HashSet<Capability>>;
/// The rows naming one process ([`Bus::rows_naming`]): pairs held here, and
/// rights given to processes on other nodes with the package that gave each.
type RowsNaming = (
    Vec<(ProcessId, Capability)>,
    Vec<(Address, Capability, spindle_types::PackageId)>,
);
use caps::Grants;

/// The node's message bus. See the crate docs.
#[derive(Debug)]
pub struct Bus {
    node: String,
    endpoints: RwLock<HashMap<ProcessId, Arc<Endpoint>>>,
    caps: Arc<RwLock<Grants>>,
    /// Keeps `caps` on disk, for a bus made with [`Bus::open`].
    journal: Option<Journal>,
    next_id: AtomicU64,
    /// Bytes queued in all mailboxes ([`NODE_QUEUED_BYTES`]).
    queued: Arc<AtomicUsize>,
    /// Bytes queued in the mailboxes of each package.
    package_queued: std::sync::Mutex<HashMap<spindle_types::PackageId, Arc<AtomicUsize>>>,
    /// Responses that arrived after their request had timed out or been answered.
    pub late_responses: AtomicU64,
    /// The node's services, told of arrivals and departures.
    services: RwLock<Vec<Arc<dyn Service>>>,
    /// Who listens to the traffic ([`Bus::tap`]).
    trace: Arc<trace::Tracers>,
    /// Set once the node has a name and links ([`Bus::connect`]).
    network: std::sync::OnceLock<Network>,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "network {}", self.name)
    }
}

impl std::fmt::Debug for dyn Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("service")
    }
}

impl Bus {
    /// A bus whose capabilities live in memory only.
    pub fn new(node: impl Into<String>) -> Bus {
        Bus {
            node: node.into(),
            endpoints: RwLock::new(HashMap::new()),
            caps: Arc::default(),
            journal: None,
            next_id: AtomicU64::new(1),
            queued: Arc::default(),
            package_queued: Default::default(),
            late_responses: AtomicU64::new(0),
            services: RwLock::default(),
            trace: Arc::default(),
            network: std::sync::OnceLock::new(),
        }
    }

    /// Gives the node its own name (which then means this node, as
    /// `local` always does) and the links that carry messages for other
    /// nodes. Once per bus: false if it was connected already.
    pub fn connect(&self, name: String, remote: Arc<dyn Remote>) -> bool {
        self.network.set(Network { name, remote }).is_ok()
    }

    /// The node's own name, once it has one ([`Bus::connect`]).
    pub fn own_name(&self) -> Option<&str> {
        self.network.get().map(|n| n.name.as_str())
    }

    /// Whether `node` names this node: `local`, or its own name.
    pub fn is_here(&self, node: &str) -> bool {
        node == self.node || self.own_name() == Some(node)
    }

    /// A bus whose capabilities are kept in `journal`, starting from its
    /// capability rows (`rows`, of kind [`persist::KIND`]).
    pub fn open(node: impl Into<String>, journal: Journal, rows: &[(String, Vec<u8>)]) -> Bus {
        let caps = Arc::new(RwLock::new(persist::from_rows(rows)));
        Bus {
            caps,
            journal: Some(journal),
            ..Bus::new(node)
        }
    }

    /// Whether the row of `cap` held by `holder` (a process here, or
    /// `None` for one on another node) is written: neither names a process
    /// whose rights are unsaved ([`Bus::unsaved`]).
    fn written(&self, g: &Grants, holder: Option<&ProcessId>, cap: &Capability) -> bool {
        g.unsaved.is_empty()
            || !(holder.is_some_and(|h| g.unsaved.contains(h))
                || (self.is_here(&cap.issuer.node) && g.unsaved.contains(&cap.issuer.process)))
    }

    /// Stages the rows of capabilities `holder`, a process here, gained
    /// and lost (those that are written at all).
    fn stage<'a>(
        &self,
        g: &Grants,
        holder: &ProcessId,
        added: impl IntoIterator<Item = &'a Capability>,
        removed: impl IntoIterator<Item = &'a Capability>,
    ) {
        if let Some(j) = &self.journal {
            for c in added
                .into_iter()
                .filter(|c| self.written(g, Some(holder), c))
            {
                j.put(persist::KIND, persist::key(holder, c), vec![]);
            }
            for c in removed
                .into_iter()
                .filter(|c| self.written(g, Some(holder), c))
            {
                j.delete(persist::KIND, persist::key(holder, c));
            }
        }
    }

    /// Stages the rows of rights `holder`, a process on another node, lost.
    fn stage_lost_there(&self, g: &Grants, holder: &Address, removed: &Capability) {
        if let Some(j) = &self.journal
            && self.written(g, None, removed)
        {
            j.delete(persist::KIND, persist::key(holder, removed));
        }
    }

    /// Records rights a process of package `giver` gave `holder`, a
    /// process on another node.
    fn stage_given(
        &self,
        g: &Grants,
        holder: &Address,
        giver: &spindle_types::PackageId,
        added: &[Capability],
    ) {
        if let Some(j) = &self.journal {
            for c in added.iter().filter(|c| self.written(g, None, c)) {
                j.put(
                    persist::KIND,
                    persist::key(holder, c),
                    giver.to_string().into_bytes(),
                );
            }
        }
    }

    /// The rows naming `process`: the rights it holds, and those it issued
    /// to holders here and (with who gave each) on other nodes.
    fn rows_naming(&self, g: &Grants, process: &ProcessId) -> RowsNaming {
        let issuer = self.address(process.clone());
        let mut here: Vec<(ProcessId, Capability)> = g
            .here
            .held(process)
            .into_iter()
            .map(|c| (process.clone(), c))
            .collect();
        here.extend(
            g.here
                .issued_by(&issuer)
                .into_iter()
                .map(|(h, c, ())| (h, c)),
        );
        (here, g.there.issued_by(&issuer))
    }

    /// The rights `process` holds and issues are not written from now on:
    /// it is a transient child, whose end nothing on disk has to record.
    /// Until [`Bus::keep`] or [`Bus::forget`]. Rows already written for it
    /// (a child that was kept earlier and is transient again, a right
    /// granted before its run began) are deleted now, so none outlives it.
    pub fn unsaved(&self, process: &ProcessId) {
        let mut caps = self.caps.write().unwrap_or_else(|p| p.into_inner());
        if caps.unsaved.contains(process) {
            return;
        }
        let (here, there) = self.rows_naming(&caps, process);
        for (holder, c) in &here {
            self.stage(&caps, holder, [], [c]);
        }
        for (holder, c, _) in &there {
            self.stage_lost_there(&caps, holder, c);
        }
        caps.unsaved.insert(process.clone());
    }

    /// `process` is on disk now (a transient child that chose to restart):
    /// the rights it holds and issued are written, from now on too.
    pub fn keep(&self, process: &ProcessId) {
        let mut caps = self.caps.write().unwrap_or_else(|p| p.into_inner());
        if !caps.unsaved.remove(process) {
            return;
        }
        let (here, there) = self.rows_naming(&caps, process);
        for (holder, c) in &here {
            self.stage(&caps, holder, [c], []);
        }
        for (holder, c, giver) in there {
            self.stage_given(&caps, &holder, &giver, &[c]);
        }
    }

    /// Waits until every capability change made so far is on disk (at once
    /// for an in-memory bus). An error says why the last write failed; the
    /// change is in effect in memory regardless.
    pub async fn persisted(&self) -> Result<(), persist::NotSaved> {
        match &self.journal {
            Some(j) => j.flush().await,
            None => Ok(()),
        }
    }

    /// [`Bus::persisted`] for a thread outside any runtime.
    pub fn persisted_blocking(&self) -> Result<(), persist::NotSaved> {
        match &self.journal {
            Some(j) => j.flush_blocking(),
            None => Ok(()),
        }
    }

    /// For changes that may be acknowledged before they are durable (a
    /// spawn's): returns at once while the journal keeps up — its oldest
    /// commit not yet durable is younger than
    /// [`COMMIT_WINDOW`](spindle_store::journal::COMMIT_WINDOW) — and waits
    /// like [`Bus::persisted`] otherwise.
    pub async fn persisted_within_window(&self) -> Result<(), persist::NotSaved> {
        match &self.journal {
            Some(j) if j.failing() || j.lag() > spindle_store::journal::COMMIT_WINDOW => {
                j.flush().await
            }
            _ => Ok(()),
        }
    }

    /// Drops holders that are not `known`, and capabilities issued by
    /// processes here that are not `known` — say, at boot, those of processes
    /// that no longer exist, so a later process with the same name inherits
    /// nothing. Rights issued on other nodes are theirs to judge.
    pub fn retain(&self, known: impl Fn(&ProcessId) -> bool) {
        let mut caps = self.caps.write().unwrap_or_else(|p| p.into_inner());
        for (holder, c) in caps.here.remove_where(|h, c| {
            !known(h) || (self.is_here(&c.issuer.node) && !known(&c.issuer.process))
        }) {
            self.stage(&caps, &holder, [], [&c]);
        }
        for (holder, c) in caps.there.remove_where(|_, c| !known(&c.issuer.process)) {
            self.stage_lost_there(&caps, &holder, &c);
        }
    }

    /// Drops the rights given to processes of nodes that are not `known`
    /// (at boot: nodes no longer on the allow-list).
    pub fn retain_nodes(&self, known: impl Fn(&str) -> bool) {
        let mut caps = self.caps.write().unwrap_or_else(|p| p.into_inner());
        for (holder, c) in caps.there.remove_where(|h, _| !known(&h.node)) {
            self.stage_lost_there(&caps, &holder, &c);
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The journal this bus keeps its capabilities in ([`Bus::open`]); the
    /// node's services keep their durable records there too.
    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }

    pub fn address(&self, process: ProcessId) -> Address {
        Address {
            node: self.node.clone(),
            process,
        }
    }

    /// A fresh request number.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Puts a process on the bus; returns its mailbox (of [`MAILBOX_BYTES`]).
    pub fn register(&self, address: Address, public: bool) -> Result<Mailbox, BusError> {
        self.register_sized(address, public, MAILBOX_BYTES)
    }

    /// [`Bus::register`] with a mailbox of `bytes` (at most the node's budget).
    pub fn register_sized(
        &self,
        address: Address,
        public: bool,
        bytes: usize,
    ) -> Result<Mailbox, BusError> {
        let mut eps = self.endpoints.write().unwrap_or_else(|p| p.into_inner());
        if eps.contains_key(&address.process) {
            return Err(BusError::AddressTaken(address));
        }
        let process = address.process.clone();
        let (tx, rx) = mpsc::channel(MAILBOX_CAPACITY);
        let queued = Arc::new(Queued {
            here: AtomicUsize::new(0),
            cap: bytes.min(NODE_QUEUED_BYTES),
            node: self.queued.clone(),
            package: self
                .package_queued
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(address.process.package.clone())
                .or_default()
                .clone(),
            waiting: AtomicBool::new(false),
            room: tokio::sync::Notify::new(),
        });
        eps.insert(
            address.process.clone(),
            Arc::new(Endpoint {
                address,
                public,
                inbox: Inbox::Mailbox(tx, queued.clone()),
                on_bus: std::sync::atomic::AtomicBool::new(true),
            }),
        );
        drop(eps);
        self.tell_services(|s| s.arrived(&process));
        Ok(Mailbox { rx, queued })
    }

    /// Puts a service of the node's own on the bus at `address`.
    pub fn register_service(
        &self,
        address: Address,
        public: bool,
        service: Arc<dyn Service>,
    ) -> Result<(), BusError> {
        let mut eps = self.endpoints.write().unwrap_or_else(|p| p.into_inner());
        if eps.contains_key(&address.process) {
            return Err(BusError::AddressTaken(address));
        }
        eps.insert(
            address.process.clone(),
            Arc::new(Endpoint {
                address,
                public,
                inbox: Inbox::Service(service.clone()),
                on_bus: std::sync::atomic::AtomicBool::new(true),
            }),
        );
        drop(eps);
        self.services
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(service);
        Ok(())
    }

    /// Tells every service something (outside the endpoint table's lock).
    fn tell_services(&self, what: impl Fn(&dyn Service)) {
        let services = self.services.read().unwrap_or_else(|p| p.into_inner());
        for s in services.iter() {
            what(&**s);
        }
    }

    /// Listens to every message that matches `filter` (`spindle trace`).
    pub fn tap(&self, filter: trace::TraceFilter) -> Result<trace::Tap, trace::TooManyTaps> {
        self.trace.tap(filter)
    }

    /// Takes a process off the bus (its run ended). Messages to it now fail `Offline`.
    pub fn unregister(&self, process: &ProcessId) {
        let gone = self
            .endpoints
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(process);
        if let Some(ep) = gone {
            ep.on_bus.store(false, Ordering::Release);
            self.tell_services(|s| s.departed(process));
        }
    }

    pub fn is_registered(&self, process: &ProcessId) -> bool {
        self.endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(process)
    }

    /// The endpoint of `process`, if it is on the bus.
    pub fn endpoint(&self, process: &ProcessId) -> Option<Arc<Endpoint>> {
        self.lookup(process)
    }

    fn lookup(&self, process: &ProcessId) -> Option<Arc<Endpoint>> {
        self.endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(process)
            .cloned()
    }

    /// Capabilities `process` holds.
    pub fn capabilities(&self, process: &ProcessId) -> Vec<Capability> {
        let caps = self.caps.read().unwrap_or_else(|p| p.into_inner());
        caps.here.held(process)
    }

    pub fn holds(&self, process: &ProcessId, cap: &Capability) -> bool {
        let caps = self.caps.read().unwrap_or_else(|p| p.into_inner());
        caps.here.holds(process, cap)
    }

    /// Gives `process` capabilities (the kernel's decision: callers check
    /// that the giver may give them).
    pub fn grant(&self, process: &ProcessId, new: impl IntoIterator<Item = Capability>) {
        let mut caps = self.caps.write().unwrap_or_else(|p| p.into_inner());
        let added: Vec<Capability> = new
            .into_iter()
            .filter(|c| caps.here.insert(process, c.clone()))
            .collect();
        self.stage(&caps, process, &added, []);
    }

    pub fn revoke(&self, process: &ProcessId, gone: &[Capability]) {
        let mut caps = self.caps.write().unwrap_or_else(|p| p.into_inner());
        let removed: Vec<&Capability> = gone
            .iter()
            .filter(|c| caps.here.remove(process, c))
            .collect();
        self.stage(&caps, process, [], removed);
    }

    /// Revokes, from every holder, every capability `issuer` issued (it was killed).
    pub fn revoke_issued_by(&self, issuer: &Address) {
        let mut caps = self.caps.write().unwrap_or_else(|p| p.into_inner());
        for (holder, c) in caps.here.remove_issued_by(issuer) {
            self.stage(&caps, &holder, [], [&c]);
        }
        for (holder, c) in caps.there.remove_issued_by(issuer) {
            self.stage_lost_there(&caps, &holder, &c);
        }
    }

    /// Forgets every right processes of node `node` were given here: it
    /// left the allow-list, or its name now belongs to another key.
    pub fn forget_node(&self, node: &str) {
        self.retain_nodes(|n| n != node);
    }

    /// Whether `holder`, a process on another node, holds `cap` by this
    /// node's record.
    fn held_there(&self, holder: &Address, cap: &Capability) -> bool {
        let caps = self.caps.read().unwrap_or_else(|p| p.into_inner());
        caps.there.holds(holder, cap)
    }

    /// Forgets everything `process` holds (it was deleted), and that its
    /// rights were unsaved: a later process of its name is written as usual.
    pub fn forget(&self, process: &ProcessId) {
        let mut caps = self.caps.write().unwrap_or_else(|p| p.into_inner());
        let gone = caps.here.remove_holder(process);
        self.stage(&caps, process, [], &gone);
        caps.unsaved.remove(process);
        drop(caps);
        self.tell_services(|s| s.forgotten(process));
    }

    /// Tells whoever awaits request `id` (at `rsvp`) that it failed at
    /// `from` with `kind`, at once rather than at its timeout.
    pub fn fail_request(
        &self,
        from: &Arc<Address>,
        id: u64,
        rsvp: Arc<Address>,
        kind: SendErrorKind,
    ) {
        let env = Envelope {
            id,
            source: from.clone(),
            target: rsvp,
            rsvp: None,
            message: Message::Failed(kind),
            blob: None,
        };
        // A requester that is gone has nobody to tell; a swamped one hears
        // at its timeout instead.
        let _ = self.send_now(env, true);
    }

    /// A message `from` received and will never answer (it ended, or had
    /// no room to keep it): a request awaiting a response fails with `kind`.
    pub fn fail_held(&self, from: &Arc<Address>, env: Envelope, kind: SendErrorKind) {
        if let (Message::Request(_), Some(rsvp)) = (&env.message, env.rsvp) {
            self.fail_request(from, env.id, rsvp, kind);
        }
    }

    /// Closes the mailbox of a process that has ended (it should be off the
    /// bus already) and fails every request still queued in it.
    pub fn drain_ended(&self, from: &Arc<Address>, mailbox: &mut Mailbox) {
        mailbox.close();
        while let Some(env) = mailbox.try_recv() {
            self.fail_held(from, env, SendErrorKind::Exited);
        }
    }

    /// May `sender` attach `cap` to a message? Only if it holds it or issued it.
    pub fn may_attach(&self, sender: &Address, cap: &Capability) -> bool {
        &cap.issuer == sender || self.holds(&sender.process, cap)
    }

    /// Delivers `env` to its target's mailbox. Requests need the target to be
    /// public or the sender (unless `privileged`) to hold its messaging
    /// capability; attached capabilities must be the sender's to give.
    pub async fn send(
        &self,
        env: Envelope,
        privileged: bool,
    ) -> Result<(), (SendErrorKind, Envelope)> {
        if !self.is_here(&env.target.node) {
            return self.send_remote(env, privileged).map_err(|(k, e)| (k, *e));
        }
        let mut seen = self.trace.seen(&env);
        let sent = match self.try_send(env, privileged, &mut seen) {
            Ok(()) => Ok(()),
            Err(Refused::Now(kind, env)) => Err((kind, *env)),
            // The rare slow path is boxed: awaited inline, its timer would
            // make every sender's future (moved on each host call) large.
            Err(Refused::Full(tx, queued, env)) => {
                Box::pin(wait_for_room(tx, queued, env, &self.trace, &mut seen)).await
            }
        };
        self.trace
            .done(seen, sent.as_ref().map(|_| ()).map_err(|(k, _)| *k));
        sent
    }

    /// Like [`Bus::send`], but a full mailbox is `MailboxFull` at once: for
    /// senders that do their own backing off (wasm processes, whose guest
    /// library retries for [`MAILBOX_WAIT`]).
    pub fn send_now(&self, env: Envelope, privileged: bool) -> Result<(), Undelivered> {
        if !self.is_here(&env.target.node) {
            return self.send_remote(env, privileged);
        }
        let Some(target) = self.lookup(&env.target.process) else {
            self.trace
                .done(self.trace.seen(&env), Err(SendErrorKind::Offline));
            return Err((SendErrorKind::Offline, Box::new(env)));
        };
        self.send_now_to(&target, env, privileged)
    }

    /// [`Bus::send_now`] to an endpoint the sender kept.
    pub fn send_now_to(
        &self,
        target: &Endpoint,
        env: Envelope,
        privileged: bool,
    ) -> Result<(), Undelivered> {
        let mut seen = self.trace.seen(&env);
        let sent = match self.deliver(target, env, privileged, &mut seen) {
            Ok(()) => Ok(()),
            Err(Refused::Now(kind, env)) => Err((kind, env)),
            Err(Refused::Full(_, _, env)) => Err((SendErrorKind::MailboxFull, env)),
        };
        self.trace
            .done(seen, sent.as_ref().map(|_| ()).map_err(|(k, _)| *k));
        sent
    }

    /// A message for another node: the sender (unless `privileged`) needs
    /// the network right, and its attached capabilities must be its to
    /// give; then the link takes it or says why not. A right issued here
    /// that goes with it is recorded as the target's: this node checks it
    /// when the target uses it.
    fn send_remote(&self, env: Envelope, privileged: bool) -> Result<(), Undelivered> {
        let seen = self.trace.seen(&env);
        let sent = if !privileged && !self.holds(&env.source.process, &Capability::network()) {
            Err((SendErrorKind::NoCapability, Box::new(env)))
        } else {
            match self.rights_across(&env, privileged) {
                Err(kind) => Err((kind, Box::new(env))),
                Ok(given) => {
                    let holder = env.target.clone();
                    let giver = env.source.process.package.clone();
                    let mut env = env;
                    // On the wire, a right issued here names this node.
                    if let (Some(name), Some(caps)) =
                        (self.own_name(), env.message.capabilities_mut())
                    {
                        for c in caps.iter_mut().filter(|c| self.is_here(&c.issuer.node)) {
                            c.issuer.node = name.to_string();
                        }
                    }
                    let sent = match self.network.get() {
                        Some(n) => n.remote.send(env),
                        None => Err((SendErrorKind::Offline, Box::new(env))),
                    };
                    if sent.is_ok() && !given.is_empty() {
                        let mut caps = self.caps.write().unwrap_or_else(|p| p.into_inner());
                        let added: Vec<Capability> = given
                            .into_iter()
                            .filter(|c| caps.there.give(&holder, c.clone(), giver.clone()))
                            .collect();
                        self.stage_given(&caps, &holder, &giver, &added);
                    }
                    sent
                }
            }
        };
        self.trace
            .done(seen, sent.as_ref().map(|_| ()).map_err(|(k, _)| *k));
        sent
    }

    /// The rights issued here that `env` gives a process on another node,
    /// or why it may not go: an attached capability must be the sender's
    /// to give, not one of the node's own (`sys:spindle`), and issued here
    /// (the sender's package giving at most [`MAX_REMOTE_HOLDERS`]) or on
    /// the target's node (a
    /// third node's could not be checked there).
    fn rights_across(
        &self,
        env: &Envelope,
        privileged: bool,
    ) -> Result<Vec<Capability>, SendErrorKind> {
        let mut given = vec![];
        for cap in env.message.capabilities() {
            if (!privileged && !self.may_attach(&env.source, cap))
                || cap.issuer.process.package.is_system()
            {
                return Err(SendErrorKind::Invalid);
            }
            if self.is_here(&cap.issuer.node) {
                let cap = Capability {
                    issuer: Address {
                        node: spindle_types::id::LOCAL_NODE.into(),
                        process: cap.issuer.process.clone(),
                    },
                    params: cap.params.clone(),
                };
                let caps = self.caps.read().unwrap_or_else(|p| p.into_inner());
                // Counting those this message gives already.
                if !caps.there.holds(&env.target, &cap)
                    && caps.there.given_by(&env.source.process.package) + given.len()
                        >= MAX_REMOTE_HOLDERS
                {
                    return Err(SendErrorKind::Invalid);
                }
                drop(caps);
                given.push(cap);
            } else if cap.issuer.node != env.target.node {
                return Err(SendErrorKind::Invalid);
            }
        }
        Ok(given)
    }

    /// Whether a message from another node may be delivered to `target`.
    /// Its attached capabilities are claims: one issued here must be the
    /// sender's by this node's record; one issued on the sender's node is
    /// that node's word; any other is refused. A request needs a target
    /// outside the node's own package that holds the network right, and is
    /// public or has given the sender the right to message it.
    fn admit_remote(&self, target: &Endpoint, env: &Envelope) -> Result<(), SendErrorKind> {
        for cap in env.message.capabilities() {
            let claim_ok = if cap.issuer.process.package.is_system() {
                false
            } else if self.is_here(&cap.issuer.node) {
                self.held_there(&env.source, cap)
            } else {
                cap.issuer.node == env.source.node
            };
            if !claim_ok {
                return Err(SendErrorKind::Invalid);
            }
        }
        if env.message.is_answer() {
            return Ok(());
        }
        let t = &target.address;
        if t.process.package.is_system() || !self.holds(&t.process, &Capability::network()) {
            return Err(SendErrorKind::NoCapability);
        }
        if !target.public && !self.held_there(&env.source, &Capability::messaging(t)) {
            return Err(SendErrorKind::NoCapability);
        }
        Ok(())
    }

    /// A message from a process on another node (its source and rsvp name
    /// that node; its target is here), admitted by [`Bus::admit_remote`]'s
    /// rules: a process on another node holds only the rights this node
    /// recorded as given to it. The link lets through only answers to
    /// requests it carried. Never waits: a full mailbox is `MailboxFull` at
    /// once; the link decides whether to wait for room (once per target
    /// that stays full, so one busy process holds up the link once).
    pub fn deliver_remote(&self, env: Envelope) -> Result<(), Undelivered> {
        let mut seen = self.trace.seen(&env);
        let refused = match self.lookup(&env.target.process) {
            None => Err(SendErrorKind::Offline),
            Some(t) => self.admit_remote(&t, &env).map(|()| t),
        };
        let sent = match refused {
            Err(kind) => Err((kind, Box::new(env))),
            Ok(target) => match self.deliver(&target, env, true, &mut seen) {
                Ok(()) => Ok(()),
                Err(Refused::Now(kind, env)) => Err((kind, env)),
                Err(Refused::Full(_, _, env)) => Err((SendErrorKind::MailboxFull, env)),
            },
        };
        self.trace
            .done(seen, sent.as_ref().map(|_| ()).map_err(|(k, _)| *k));
        sent
    }

    /// Waits up to [`MAILBOX_WAIT`] for `target`'s mailbox to have room;
    /// false if it stayed full or `target` is not on the bus.
    pub async fn wait_for_room(&self, target: &ProcessId) -> bool {
        let Some(ep) = self.lookup(target) else {
            return false;
        };
        let Inbox::Mailbox(tx, queued) = &ep.inbox else {
            return true;
        };
        let until = tokio::time::Instant::now() + MAILBOX_WAIT;
        // Full of bytes rather than messages: room comes as it is read.
        if queued.here.load(Ordering::Acquire) >= queued.room_again()
            && !queued.drained(until).await
        {
            return false;
        }
        // A permit reserves a slot; dropping it gives the slot back, so this
        // only learns that there is room.
        matches!(
            tokio::time::timeout(MAILBOX_WAIT, tx.reserve()).await,
            Ok(Ok(_))
        )
    }

    /// Everything of [`Bus::send`] that needs no waiting.
    fn try_send(
        &self,
        env: Envelope,
        privileged: bool,
        seen: &mut Option<trace::Seen>,
    ) -> Result<(), Refused> {
        let Some(target) = self.lookup(&env.target.process) else {
            return Err(Refused::Now(SendErrorKind::Offline, Box::new(env)));
        };
        self.deliver(&target, env, privileged, seen)
    }

    /// `seen`: the send's trace record, told here for a service (before
    /// the service answers, so a tap hears the request first).
    fn deliver(
        &self,
        target: &Endpoint,
        env: Envelope,
        privileged: bool,
        seen: &mut Option<trace::Seen>,
    ) -> Result<(), Refused> {
        if !target.is_on_bus() {
            return Err(Refused::Now(SendErrorKind::Offline, Box::new(env)));
        }
        if !privileged {
            let caps = env.message.capabilities();
            if caps.iter().any(|c| !self.may_attach(&env.source, c)) {
                return Err(Refused::Now(SendErrorKind::Invalid, Box::new(env)));
            }
            if matches!(env.message, Message::Request(_))
                && !target.public
                && !self.holds(&env.source.process, &Capability::messaging(&target.address))
            {
                return Err(Refused::Now(SendErrorKind::NoCapability, Box::new(env)));
            }
        }
        let (tx, queued) = match &target.inbox {
            Inbox::Mailbox(tx, queued) => (tx, queued),
            Inbox::Service(s) => {
                self.trace.done(seen.take(), Ok(()));
                s.handle(env);
                return Ok(());
            }
        };
        let weight = env.weight();
        if weight > 0 && !queued.take(weight, env.source.process.package.is_system()) {
            return Err(Refused::Now(SendErrorKind::MailboxFull, Box::new(env)));
        }
        // A permit first, so a tap hears of the message before its
        // receiver can (and answer it).
        match tx.try_reserve() {
            Ok(permit) => {
                self.trace.done(seen.take(), Ok(()));
                permit.send(Counted::slot(env, weight, queued));
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(())) => {
                queued.give(weight);
                Err(Refused::Now(SendErrorKind::Offline, Box::new(env)))
            }
            Err(mpsc::error::TrySendError::Full(())) => {
                queued.give(weight);
                Err(Refused::Full(tx.clone(), queued.clone(), Box::new(env)))
            }
        }
    }
}

/// A message [`Bus::send_now`] could not deliver, with why (boxed, as it
/// travels in the mailbox).
pub type Undelivered = (SendErrorKind, Box<Envelope>);

/// Why [`Bus::try_send`] did not deliver.
enum Refused {
    Now(SendErrorKind, Box<Envelope>),
    /// The mailbox is full: wait for room on this sender.
    Full(mpsc::Sender<Slot>, Arc<Queued>, Box<Envelope>),
}

/// Waits up to [`MAILBOX_WAIT`] for room in a full mailbox.
async fn wait_for_room(
    tx: mpsc::Sender<Slot>,
    queued: Arc<Queued>,
    env: Box<Envelope>,
    trace: &trace::Tracers,
    seen: &mut Option<trace::Seen>,
) -> Result<(), (SendErrorKind, Envelope)> {
    let permit = match tokio::time::timeout(MAILBOX_WAIT, tx.reserve()).await {
        Ok(Ok(p)) => p,
        Ok(Err(_)) => return Err((SendErrorKind::Offline, *env)),
        Err(_) => return Err((SendErrorKind::MailboxFull, *env)),
    };
    let weight = env.weight();
    if weight > 0 && !queued.take(weight, env.source.process.package.is_system()) {
        return Err((SendErrorKind::MailboxFull, *env));
    }
    // The mailbox went away while this sender waited: its process is gone.
    // (Should it go in the instant after this look, the message's bytes
    // come back when the channel drops it.)
    if tx.is_closed() {
        queued.give(weight);
        return Err((SendErrorKind::Offline, *env));
    }
    trace.done(seen.take(), Ok(()));
    permit.send(Counted::slot(*env, weight, &queued));
    Ok(())
}

#[cfg(test)]
mod tests;
