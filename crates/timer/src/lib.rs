//! # spindle-timer: the timer module `local@timer:sys:spindle`
//!
//! A process asks for a timer with a request that expects a response
//! (`{"op":"after","ms":N}`, or `{"op":"at","unix_ms":T}`), and the module
//! answers it at the deadline: the requester's context comes back with the
//! answer, so a timer is just a slow response (the Kinode way). A request
//! that expects no response fires as a request to its sender instead.
//! `{"op":"cancel","id":N}` takes a timer out; its own request is then
//! answered at once with `"status":"cancelled"`, so nobody waits for it.
//!
//! The module is a [`Service`] on the bus: a request is handled on the
//! sender's task (parsed, budgeted, put in the [`wheel`]), and one thread
//! of the module's own sleeps until the earliest deadline and answers what
//! is due. Every answer says how late it is in its metadata
//! (`{"late_us":N}`).
//!
//! Timers belong to the run that set them: when a process leaves the bus
//! its plain timers go with it. A durable timer (`"durable": true`) is a
//! row in the node's journal (within its commit window of the request) and
//! outlives the run and the daemon: if the run that set it still awaits
//! it, it is answered as any timer; otherwise it arrives as a request to
//! its process (with the `context` JSON it was set with), as soon as the
//! process is on the bus again. A process deleted takes its timers along.
//!
//! Budgets ([`MAX_PER_PROCESS`], [`MAX_PER_PACKAGE`], [`MAX_TIMERS`],
//! [`MAX_DURABLE_PER_PROCESS`]) make a flood a `quota` error for the
//! process that floods, and nobody else.

pub mod wheel;

use serde::Deserialize;
use serde_json::value::RawValue;
use spindle_bus::{Bus, Envelope, Message, Reply, Request, Response, SendErrorKind, Service};
use spindle_store::journal::Journal;
use spindle_types::{Address, PackageId, ProcessId};
use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use wheel::{Budgets, Due, Durable, Parked, SetError, Timer, Wheel};

/// The module's process name (package `sys:spindle`).
pub const TIMER: &str = spindle_abi::module::TIMER;
/// Timers one process may have pending: about 8 MiB of the node's memory.
pub const MAX_PER_PROCESS: u32 = 131_072;
/// Timers the processes of one package may have pending together: a
/// quarter of the node's, so one package cannot take them all.
pub const MAX_PER_PACKAGE: u32 = MAX_TIMERS / 4;
/// Timers pending on the node: about 128 MiB at most.
pub const MAX_TIMERS: u32 = 2_000_000;
/// Durable timers one process may have pending: each is a row on disk,
/// read at every boot.
pub const MAX_DURABLE_PER_PROCESS: u32 = 1_000;
/// Bytes of a durable timer's `context` (JSON kept on disk with it).
pub const MAX_CONTEXT: usize = 4096;
/// Bytes of durable timers' contexts the processes of one package may
/// keep together (in memory, on disk, and read at every boot).
pub const MAX_CONTEXT_PER_PACKAGE: usize = 16 << 20;
/// The furthest deadline a timer may have.
pub const MAX_DELAY: Duration = Duration::from_secs(366 * 24 * 3600);
/// How long an answer that found its mailbox full first waits before it
/// is tried again; each further wait doubles, up to [`FULL_RETRY_MAX`]. A
/// plain timer's requester hears `mailbox-full` once the waits add up to
/// [`spindle_bus::MAILBOX_WAIT`], as a node's sender would; a durable
/// timer is tried until it lands. (Doubling keeps a process that never
/// reads its mailbox from costing the firing thread a try per timer per
/// millisecond.)
pub const FULL_RETRY: Duration = Duration::from_millis(1);
pub const FULL_RETRY_MAX: Duration = Duration::from_secs(1);
/// Timers answered per pass of the firing thread before it looks at the
/// clock again.
const FIRE_BATCH: usize = 1024;
/// The journal's kind for durable timers.
pub const KIND: &str = "timer";
/// Version of a durable timer's row; a newer one is left alone, not misread.
const ROW_VERSION: u32 = 1;

const BUDGETS: Budgets = Budgets {
    process: MAX_PER_PROCESS,
    package: MAX_PER_PACKAGE,
    node: MAX_TIMERS,
    durable: MAX_DURABLE_PER_PROCESS,
    context: MAX_CONTEXT_PER_PACKAGE,
};

/// Why the module could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bus(#[from] spindle_bus::BusError),
    #[error("no thread for the timer module: {0}")]
    Thread(#[from] std::io::Error),
}

/// A handle on the module: the node uses it to drop the durable timers of
/// processes that no longer exist, at boot.
#[derive(Clone)]
pub struct Timers {
    shared: Arc<Shared>,
}

/// Puts the timer module on `bus`, with the durable timers of `rows` (the
/// journal's rows of [`KIND`]).
pub fn start(bus: &Arc<Bus>, rows: &[(String, Vec<u8>)]) -> Result<Timers, StartError> {
    start_with(bus, rows, BUDGETS)
}

fn start_with(
    bus: &Arc<Bus>,
    rows: &[(String, Vec<u8>)],
    budgets: Budgets,
) -> Result<Timers, StartError> {
    let me = bus.address(ProcessId {
        process: TIMER.into(),
        package: PackageId::system(),
    });
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            wheel: Wheel::new(budgets),
            stop: false,
        }),
        wake: Condvar::new(),
        bus: Arc::downgrade(bus),
        journal: bus.journal().cloned(),
        me: Arc::new(me.clone()),
        origin: Instant::now(),
    });
    shared.load(bus, rows);
    let firing = shared.clone();
    std::thread::Builder::new()
        .name("spindle-timer".into())
        .spawn(move || firing.run())?;
    bus.register_service(
        me,
        true,
        Arc::new(Module {
            shared: shared.clone(),
        }),
    )?;
    Ok(Timers { shared })
}

impl Timers {
    /// Drops every timer of processes that are not `known` (deleted while
    /// the daemon was down), records too.
    pub fn retain(&self, known: impl Fn(&ProcessId) -> bool) {
        let gone: Vec<ProcessId> = {
            let st = self.shared.lock();
            st.wheel.owners().filter(|p| !known(p)).cloned().collect()
        };
        for p in gone {
            self.shared.forget(&p);
        }
    }

    /// Pending timers on the node.
    pub fn len(&self) -> usize {
        self.shared.lock().wheel.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The service on the bus. Dropping it (with the bus) ends the firing thread.
struct Module {
    shared: Arc<Shared>,
}

impl Drop for Module {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
    }
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the firing thread: an earlier deadline, or the end.
    wake: Condvar,
    bus: Weak<Bus>,
    journal: Option<Journal>,
    me: Arc<Address>,
    /// The wheel's time is nanoseconds since this.
    origin: Instant,
}

/// The wheel, under the module's one lock. A durable timer's row is
/// staged in the journal while this lock is held ([`Shared::record`],
/// [`Shared::unrecord`]), so the rows of one id change in the order the
/// wheel's timers do. The lock is never held while calling the bus.
struct State {
    wheel: Wheel,
    stop: bool,
}

/// A request's fields (each op reads the ones it needs).
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Req<'a> {
    #[serde(borrow)]
    op: Cow<'a, str>,
    ms: Option<u64>,
    unix_ms: Option<u64>,
    id: Option<u64>,
    durable: bool,
    /// Answer the request at once (`"status":"set"`); the timer then fires
    /// as a request to its process.
    ack: bool,
    #[serde(borrow)]
    context: Option<&'a RawValue>,
}

/// A refused request: its kind and what to do.
struct Refusal(&'static str, String);

fn bad(message: impl Into<String>) -> Refusal {
    Refusal("bad-request", message.into())
}

impl From<SetError> for Refusal {
    fn from(e: SetError) -> Refusal {
        match e {
            SetError::Quota { .. } | SetError::ContextQuota { .. } => Refusal(
                "quota",
                format!("{e}: let some fire or cancel them before setting more"),
            ),
            SetError::IdInUse { .. } => Refusal("id-in-use", e.to_string()),
        }
    }
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The key of a durable timer's row: `[process, id]` as JSON.
fn row_key(owner: &ProcessId, id: u64) -> String {
    serde_json::to_string(&(owner.to_string(), id)).expect("strings serialise")
}

#[derive(serde::Serialize, Deserialize)]
struct Row<'a> {
    v: u32,
    at_unix_ms: u64,
    #[serde(borrow)]
    context: Option<&'a RawValue>,
}

impl Service for Module {
    fn handle(&self, env: Envelope) {
        let Message::Request(r) = &env.message else {
            return;
        };
        let reply = Reply::to(self.shared.bus.clone(), self.shared.me.clone(), &env);
        let outcome = serde_json::from_slice::<Req>(&r.body)
            .map_err(|e| bad(format!("not a timer request ({e}): send {{\"op\":\"after\",\"ms\":N}}, {{\"op\":\"at\",\"unix_ms\":T}} or {{\"op\":\"cancel\",\"id\":N}}")))
            .and_then(|req| self.shared.request(&env, &req));
        match outcome {
            // A timer set: answered when it fires.
            Ok(None) => {}
            Ok(Some(body)) => reply.ok(body, None),
            Err(Refusal(kind, message)) => {
                if reply.expected() {
                    reply.refuse(kind, &message)
                } else {
                    tracing::debug!("timer request from {} refused: {message}", env.source)
                }
            }
        }
    }

    fn arrived(&self, process: &ProcessId) {
        self.shared.arrived(process);
    }

    fn departed(&self, process: &ProcessId) {
        self.shared.lock().wheel.departed(process);
    }

    fn forgotten(&self, process: &ProcessId) {
        self.shared.forget(process);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    /// One request: `Ok(None)` for a timer set (answered when it fires),
    /// else the answer's body.
    fn request(&self, env: &Envelope, req: &Req) -> Result<Option<serde_json::Value>, Refusal> {
        let owner = &env.source.process;
        match &*req.op {
            "after" | "at" => self.set(env, req),
            "cancel" => {
                let id = req
                    .id
                    .ok_or_else(|| bad("name the timer to cancel: `id`"))?;
                let taken = {
                    let mut st = self.lock();
                    let t = st.wheel.cancel(owner, id);
                    if let Some(t) = &t {
                        self.unrecord(&mut st, t);
                    }
                    t
                };
                let found = taken.is_some();
                if let Some(t) = taken {
                    self.cancelled(&t);
                }
                Ok(Some(serde_json::json!({ "cancelled": found })))
            }
            "pending" => {
                let (all, durable) = self.lock().wheel.pending(owner);
                Ok(Some(
                    serde_json::json!({ "pending": all, "durable": durable }),
                ))
            }
            other => Err(bad(format!(
                "unknown op {:?}: after, at, cancel or pending",
                spindle_types::id::shown(other)
            ))),
        }
    }

    /// Sets a timer: `Ok(None)` if its request is answered when it fires,
    /// `Ok(Some(body))` if at once (`ack`).
    fn set(&self, env: &Envelope, req: &Req) -> Result<Option<serde_json::Value>, Refusal> {
        let now = self.now();
        let wall = unix_ms_now();
        let max_ms = MAX_DELAY.as_millis() as u64;
        let delay_ms = match (&*req.op, req.ms, req.unix_ms) {
            ("after", Some(ms), None) => ms,
            ("at", None, Some(at)) => at.saturating_sub(wall),
            ("after", ..) => return Err(bad("`after` takes `ms`, the delay in milliseconds")),
            _ => {
                return Err(bad(
                    "`at` takes `unix_ms`, the deadline in milliseconds since the Unix epoch",
                ));
            }
        };
        if delay_ms > max_ms {
            return Err(bad(format!(
                "a timer may be at most {max_ms} ms ({} days) away",
                MAX_DELAY.as_secs() / 86_400
            )));
        }
        if req.id.is_some_and(|id| id >= wheel::AUTO_IDS) {
            return Err(bad(format!(
                "timer ids from {} up are the module's: choose a smaller one",
                wheel::AUTO_IDS
            )));
        }
        if req.context.is_some() && !req.durable {
            return Err(bad(
                "`context` is kept with durable timers only: a timer that expects a response gets the request's own context back",
            ));
        }
        if let Some(c) = req.context
            && c.get().len() > MAX_CONTEXT
        {
            return Err(Refusal(
                "quota",
                format!("a durable timer's context may hold {MAX_CONTEXT} bytes of JSON"),
            ));
        }
        let ack = req.ack && env.rsvp.is_some();
        // An answer nobody waits for any more would hold the timer (and
        // its budget) for nothing.
        if !ack
            && let Message::Request(r) = &env.message
            && let Some(timeout) = r.expects_response
            && u128::from(delay_ms) >= timeout.min(spindle_bus::MAX_AWAIT).as_millis()
        {
            return Err(bad(format!(
                "the timer is {delay_ms} ms away but its answer is awaited for {} ms only: await it longer, or set it with \"ack\": true (durable) to hear of it as a request",
                timeout.min(spindle_bus::MAX_AWAIT).as_millis()
            )));
        }
        if req.ack && !req.durable {
            return Err(bad(
                "`ack` is for durable timers, which fire as a request to their process; a plain one is answered when it fires",
            ));
        }
        let deadline = now.saturating_add(delay_ms.saturating_mul(1_000_000));
        let bus = self
            .bus
            .upgrade()
            .ok_or_else(|| bad("the node is stopping"))?;
        let rsvp = if ack { None } else { env.rsvp.clone() };
        let durable = req.durable.then(|| {
            Box::new(Durable {
                at_unix_ms: wall.saturating_add(delay_ms),
                context: req.context.map(|c| c.get().to_owned()),
                run: rsvp
                    .as_ref()
                    .and_then(|r| bus.endpoint(&r.process))
                    .map(|e| Arc::downgrade(&e)),
            })
        });
        let mut st = self.lock();
        let id = match req.id {
            Some(id) => id,
            None => st.wheel.auto_id(&env.source.process),
        };
        let timer = Timer {
            owner: env.source.clone(),
            rsvp,
            request: env.id,
            id,
            durable,
            deadline: 0,
            tries: 0,
        };
        let row = timer.durable.as_ref().map(|d| Row {
            v: ROW_VERSION,
            at_unix_ms: d.at_unix_ms,
            context: req.context,
        });
        let earliest = st.wheel.set(timer, deadline)?;
        if let (Some(j), Some(row)) = (&self.journal, row) {
            j.put(
                KIND,
                row_key(&env.source.process, id),
                serde_json::to_vec(&row).expect("rows serialise"),
            );
            j.commit();
        }
        drop(st);
        if earliest {
            self.wake.notify_one();
        }
        Ok(ack.then(|| serde_json::json!({ "timer": id, "status": "set" })))
    }

    /// Reads the durable timers kept in the journal.
    fn load(&self, bus: &Bus, rows: &[(String, Vec<u8>)]) {
        let now = self.now();
        let wall = unix_ms_now();
        let mut st = self.lock();
        for (key, value) in rows {
            let parsed = serde_json::from_str::<(String, u64)>(key)
                .map_err(|e| e.to_string())
                .and_then(|(p, id)| Ok((p.parse::<ProcessId>().map_err(|e| e.to_string())?, id)))
                .and_then(|(p, id)| {
                    let row: Row = serde_json::from_slice(value).map_err(|e| e.to_string())?;
                    if row.v > ROW_VERSION {
                        return Err(format!("written by a newer Spindle (version {})", row.v));
                    }
                    Ok((
                        p,
                        id,
                        row.at_unix_ms,
                        row.context.map(|c| c.get().to_owned()),
                    ))
                });
            let (process, id, at_unix_ms, context) = match parsed {
                Ok(t) => t,
                Err(why) => {
                    tracing::error!(
                        "timer row {} in node.db cannot be read ({why}); it is left out",
                        spindle_types::id::shown(key)
                    );
                    continue;
                }
            };
            let left_ms = at_unix_ms
                .saturating_sub(wall)
                .min(MAX_DELAY.as_millis() as u64);
            let timer = Timer {
                owner: Arc::new(bus.address(process)),
                rsvp: None,
                request: 0,
                id,
                durable: Some(Box::new(Durable {
                    at_unix_ms,
                    context,
                    run: None,
                })),
                deadline: 0,
                tries: 0,
            };
            if !st
                .wheel
                .restore(timer, now.saturating_add(left_ms.saturating_mul(1_000_000)))
            {
                tracing::error!("durable timer row {key} is there twice; the second is left out");
            }
        }
    }

    /// Sleeps until the earliest deadline, answers what is due, again.
    fn run(&self) {
        let mut due = Vec::with_capacity(FIRE_BATCH);
        loop {
            let mut st = self.lock();
            loop {
                if st.stop {
                    return;
                }
                let now = self.now();
                st.wheel.take_due(now, FIRE_BATCH, &mut due);
                if !due.is_empty() {
                    break;
                }
                st = match st.wheel.next_deadline() {
                    Some(d) => {
                        let wait = Duration::from_nanos(d.saturating_sub(now));
                        self.wake
                            .wait_timeout(st, wait)
                            .unwrap_or_else(|p| p.into_inner())
                            .0
                    }
                    None => self.wake.wait(st).unwrap_or_else(|p| p.into_inner()),
                };
            }
            drop(st);
            let Some(bus) = self.bus.upgrade() else {
                return;
            };
            // Owners whose mailbox was full in this batch: their other
            // timers wait their turn without trying.
            let mut full: HashSet<ProcessId> = HashSet::new();
            for t in due.drain(..) {
                // A panic here would stop every timer of the node: it ends
                // this one instead (its row stays, to fire at the next boot).
                let key = t.key();
                let fired = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    if full.contains(&t.timer.owner.process) {
                        self.mailbox_full(&bus, t);
                    } else if let Some(owner) = self.fire(&bus, t) {
                        full.insert(owner);
                    }
                }));
                if fired.is_err() {
                    tracing::error!("delivering a timer panicked; it is dropped");
                    self.lock().wheel.abandon(key);
                }
            }
        }
    }

    /// Answers a timer that is due. Returns its owner if the owner's
    /// mailbox was full.
    fn fire(&self, bus: &Bus, t: Due) -> Option<ProcessId> {
        let awaited = self.awaited(&t.timer);
        let mut outcome = if awaited {
            let late = self.now().saturating_sub(t.timer.deadline) / 1_000;
            self.answer(bus, &t.timer, "fired", late, Some(&t))
        } else {
            self.fire_as_request(bus, &t)
        };
        if awaited
            && t.timer.durable.is_some()
            && matches!(outcome, Err(e) if e != SendErrorKind::MailboxFull)
        {
            // The run that awaited it is gone: it goes to the process itself.
            outcome = self.fire_as_request(bus, &t);
        }
        match outcome {
            // Over already (see `Shared::send`).
            Ok(()) => {}
            Err(SendErrorKind::MailboxFull) => {
                let owner = t.timer.owner.process.clone();
                self.mailbox_full(bus, t);
                return Some(owner);
            }
            Err(_) if t.timer.durable.is_some() => {
                let mut st = self.lock();
                let now = self.now();
                let timer = (t.timer.owner.process.clone(), t.timer.id);
                if st.wheel.park(t, now) == Parked::Over {
                    // Its process was deleted meanwhile.
                    self.unrecord_key(&mut st, &timer.0, timer.1);
                }
            }
            // Nobody is left to hear a plain one.
            Err(_) => self.lock().wheel.finish(&t),
        }
        None
    }

    /// A timer out for delivery is over: out of the wheel, its row deleted.
    fn over(&self, t: &Due) {
        let mut st = self.lock();
        st.wheel.finish(t);
        self.unrecord(&mut st, &t.timer);
    }

    /// `t`'s answer found its owner's mailbox full: tried again later
    /// ([`FULL_RETRY`]); a plain timer's requester is told once the waits
    /// add up to [`spindle_bus::MAILBOX_WAIT`].
    fn mailbox_full(&self, bus: &Bus, t: Due) {
        if t.timer.durable.is_none() && waited(t.timer.tries) >= spindle_bus::MAILBOX_WAIT {
            self.lock().wheel.finish(&t);
            if let Some(rsvp) = t.timer.rsvp.clone() {
                bus.fail_request(&self.me, t.timer.request, rsvp, SendErrorKind::MailboxFull);
            }
            return;
        }
        let again = self
            .now()
            .saturating_add(backoff(t.timer.tries).as_nanos() as u64);
        let mut st = self.lock();
        let timer = (
            t.timer.owner.process.clone(),
            t.timer.id,
            t.timer.durable.is_some(),
        );
        if !st.wheel.retry(t, again) && timer.2 {
            self.unrecord_key(&mut st, &timer.0, timer.1);
        }
    }

    /// Whether the run that set `t` still awaits its answer.
    fn awaited(&self, t: &Timer) -> bool {
        t.rsvp.is_some()
            && t.durable.as_ref().is_none_or(|d| {
                d.run
                    .as_ref()
                    .and_then(Weak::upgrade)
                    .is_some_and(|e| e.is_on_bus())
            })
    }

    /// Answers the request that set `t`.
    fn answer(
        &self,
        bus: &Bus,
        t: &Timer,
        status: &str,
        late_us: u64,
        ends: Option<&Due>,
    ) -> Result<(), SendErrorKind> {
        let Some(rsvp) = t.rsvp.clone() else {
            return Ok(());
        };
        let env = Envelope {
            id: t.request,
            source: self.me.clone(),
            target: rsvp,
            rsvp: None,
            message: Message::Response(
                Response {
                    inherit: false,
                    body: format!(r#"{{"timer":{},"status":"{status}"}}"#, t.id).into_bytes(),
                    metadata: Some(format!(r#"{{"late_us":{late_us}}}"#)),
                    capabilities: vec![],
                },
                None,
            ),
            blob: None,
        };
        self.send(bus, env, ends)
    }

    /// Sends `t` to its owner as a request (nobody awaits an answer).
    fn fire_as_request(&self, bus: &Bus, due: &Due) -> Result<(), SendErrorKind> {
        let t = &due.timer;
        let (late_us, context) = match &t.durable {
            Some(d) => (
                unix_ms_now()
                    .saturating_sub(d.at_unix_ms)
                    .saturating_mul(1_000),
                d.context.as_deref(),
            ),
            None => (self.now().saturating_sub(t.deadline) / 1_000, None),
        };
        let body = match context {
            Some(c) => format!(r#"{{"timer":{},"status":"fired","context":{c}}}"#, t.id),
            None => format!(r#"{{"timer":{},"status":"fired"}}"#, t.id),
        };
        let env = Envelope {
            id: bus.next_id(),
            source: self.me.clone(),
            target: t.owner.clone(),
            rsvp: None,
            message: Message::Request(Request {
                inherit: false,
                expects_response: None,
                body: body.into_bytes(),
                metadata: Some(format!(r#"{{"late_us":{late_us}}}"#)),
                capabilities: vec![],
            }),
            blob: None,
        };
        self.send(bus, env, Some(due))
    }

    /// Sends `env`. Delivered, the timer `ends` (one out for delivery) is
    /// over; to a mailbox both happen under the module's lock (a delivery
    /// there only queues, it runs nothing), so no request of the owner's
    /// finds the timer between its answer and its end: re-arming the same
    /// id at once works.
    fn send(&self, bus: &Bus, env: Envelope, ends: Option<&Due>) -> Result<(), SendErrorKind> {
        let ep = bus.endpoint(&env.target.process);
        let (Some(t), Some(ep)) = (ends, ep.filter(|e| !e.is_service())) else {
            bus.send_now(env, true).map_err(|(kind, _)| kind)?;
            if let Some(t) = ends {
                self.over(t);
            }
            return Ok(());
        };
        let mut st = self.lock();
        bus.send_now_to(&ep, env, true).map_err(|(kind, _)| kind)?;
        st.wheel.finish(t);
        self.unrecord(&mut st, &t.timer);
        Ok(())
    }

    /// A cancelled timer's own request is answered now.
    fn cancelled(&self, t: &Timer) {
        if let Some(bus) = self.bus.upgrade()
            && self.awaited(t)
        {
            let _ = self.answer(&bus, t, "cancelled", 0, None);
        }
    }

    /// A timer that has left for good: its row goes too (staged while
    /// the lock, `_st`, is held).
    fn unrecord(&self, st: &mut State, t: &Timer) {
        if t.durable.is_some() {
            self.unrecord_key(st, &t.owner.process, t.id);
        }
    }

    fn unrecord_key(&self, _st: &mut State, owner: &ProcessId, id: u64) {
        if let Some(j) = &self.journal {
            j.delete(KIND, row_key(owner, id));
            j.commit();
        }
    }

    fn arrived(&self, process: &ProcessId) {
        let now = self.now();
        if self.lock().wheel.arrived(process, now) {
            self.wake.notify_one();
        }
    }

    fn forget(&self, process: &ProcessId) {
        let mut st = self.lock();
        for id in st.wheel.forgotten(process) {
            self.unrecord_key(&mut st, process, id);
        }
    }
}

/// The wait before try `tries + 1` of an answer that found its mailbox full.
fn backoff(tries: u32) -> Duration {
    FULL_RETRY
        .saturating_mul(1 << tries.min(16))
        .min(FULL_RETRY_MAX)
}

/// The waits of the first `tries` tries, added up (in closed form: a
/// durable timer's tries grow without end).
fn waited(tries: u32) -> Duration {
    // Doubling from FULL_RETRY reaches FULL_RETRY_MAX after `doubling` tries.
    let doubling = (0..=16u32)
        .find(|&n| backoff(n) >= FULL_RETRY_MAX)
        .unwrap_or(16);
    let n = tries.min(doubling);
    let ramp = FULL_RETRY.saturating_mul((1u32 << n).saturating_sub(1));
    ramp.saturating_add(FULL_RETRY_MAX.saturating_mul(tries.saturating_sub(doubling)))
}

#[cfg(test)]
mod tests;
