use crate::snapshot::{Desired, SavedProcess, TABLE_VERSION, TableMeta, TableSnapshot};
use spindle_types::{
    ExitInfo, ExitReason, ExitStatus, PackageId, ProcessId, ProcessNum, ProcessSpec,
    RestartDecision, Selector, spec::StopSignal,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Number of one spawn of one process; events naming an older run are stale.
pub type RunId = u64;

/// Why a stop was asked for; decides the exit reason the run ends with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopCause {
    /// A user (or another process with the right) stopped it: `Killed`.
    User,
    /// The node is stopping: `Shutdown`.
    Shutdown,
    /// The kernel stopped it for misbehaving (e.g. a memory limit): `Crashed`.
    Fault(String),
}

/// What to do once a stopping run has exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterStop {
    Stay,
    Restart,
    Delete,
}

/// Where a process is in its life. Each state carries the data that only
/// makes sense in it.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    /// A spawn was requested; the driver has not confirmed it yet.
    Starting {
        run: RunId,
        since: Instant,
    },
    Running {
        run: RunId,
        pid: Option<u32>,
        since: Instant,
    },
    /// Asked to stop; SIGKILL follows at `deadline` unless it exits first.
    Stopping {
        run: RunId,
        pid: Option<u32>,
        since: Instant,
        deadline: Instant,
        killed: bool,
        cause: StopCause,
        then: AfterStop,
    },
    /// Waiting out the restart schedule.
    Backoff {
        until: Instant,
    },
    Stopped,
}

impl State {
    /// The current run, while one exists.
    pub fn run(&self) -> Option<RunId> {
        match self {
            State::Starting { run, .. }
            | State::Running { run, .. }
            | State::Stopping { run, .. } => Some(*run),
            _ => None,
        }
    }
    pub fn is_live(&self) -> bool {
        self.run().is_some()
    }
    pub fn pid(&self) -> Option<u32> {
        match self {
            State::Running { pid, .. } | State::Stopping { pid, .. } => *pid,
            _ => None,
        }
    }
    /// When [`Kernel::tick`] has something to do for this state.
    pub fn deadline(&self) -> Option<Instant> {
        match self {
            State::Backoff { until } => Some(*until),
            State::Stopping {
                deadline,
                killed: false,
                ..
            } => Some(*deadline),
            _ => None,
        }
    }
    /// When the current run started.
    pub fn since(&self) -> Option<Instant> {
        match self {
            State::Starting { since, .. }
            | State::Running { since, .. }
            | State::Stopping { since, .. } => Some(*since),
            _ => None,
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone)]
pub struct Entry {
    pub num: ProcessNum,
    pub spec: Arc<ProcessSpec>,
    pub state: State,
    pub desired: Desired,
    /// Automatic restarts made so far.
    pub restarts: u32,
    /// Position in the restart schedule (consecutive short runs).
    pub attempt: u32,
    pub last_exit: Option<ExitInfo>,
}

impl Entry {
    /// Whether its row is kept on disk: everything but a transient child
    /// that never restarts (it is gone after its run; a reboot ends it).
    pub fn durable(&self) -> bool {
        !self.spec.transient || matches!(self.spec.on_exit, spindle_types::OnExit::Restart)
    }

    fn saved(&self) -> SavedProcess {
        SavedProcess {
            num: self.num,
            spec: (*self.spec).clone(),
            desired: self.desired,
            restarts: self.restarts,
            last_exit: self.last_exit.clone(),
        }
    }
}

/// Moves `e` to `new`, keeping the index of deadlines in step.
fn set_state(timers: &mut BTreeSet<(Instant, ProcessNum)>, e: &mut Entry, new: State) {
    if let Some(d) = e.state.deadline() {
        timers.remove(&(d, e.num));
    }
    if let Some(d) = new.deadline() {
        timers.insert((d, e.num));
    }
    e.state = new;
}

/// What changed in the persisted table since the last
/// [`Kernel::take_changes`]: rows to write, rows to remove, and the table's
/// own record when it changed. Each change costs the same however large the
/// table is.
#[derive(Debug, Default, PartialEq)]
pub struct TableChanges {
    pub meta: Option<TableMeta>,
    pub put: Vec<SavedProcess>,
    pub delete: Vec<ProcessNum>,
}

impl TableChanges {
    pub fn is_empty(&self) -> bool {
        self.meta.is_none() && self.put.is_empty() && self.delete.is_empty()
    }
}

/// Something the kernel decided that the caller must carry out, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Start a new run; answer with [`Kernel::spawned`].
    Spawn {
        num: ProcessNum,
        run: RunId,
        spec: Arc<ProcessSpec>,
    },
    /// Ask the run to stop politely (stop signal, or `stopping` message).
    AskStop {
        num: ProcessNum,
        run: RunId,
        signal: StopSignal,
    },
    /// Grace is over: SIGKILL the run's whole process tree.
    Kill { num: ProcessNum, run: RunId },
    /// A run ended; `restart_in` says when the next one starts, if any.
    Exited {
        num: ProcessNum,
        info: ExitInfo,
        restart_in: Option<Duration>,
        /// It is a transient child (a spawn's job): no news when it completes.
        transient: bool,
    },
    /// It was waiting to restart and now stays stopped (no run ended: a
    /// stop during backoff).
    Settled { num: ProcessNum },
    /// The entry is gone from the table: release what belongs to it.
    Removed { num: ProcessNum },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    #[error("no process matches {0:?}: see `spindle ls` for ids and names")]
    NotFound(String),
    #[error("the daemon is shutting down and starts nothing new")]
    ShuttingDown,
}

/// Process ids reserved on disk at a time. An id is never given twice in
/// a node's life, so logs and state files of an earlier process are never
/// another's; a reboot continues past the reserved block (up to this many
/// ids are skipped), and a burst of spawns writes the table's record once
/// per block instead of once per spawn — a transient child then costs no
/// write at all.
pub const IDS_RESERVED: u64 = 1024;

/// The process table and every lifecycle decision. See the crate docs.
#[derive(Debug)]
pub struct Kernel {
    procs: BTreeMap<ProcessNum, Entry>,
    next_num: u64,
    /// Ids below this are accounted for on disk (the table's record
    /// holds it; never below `next_num`): ids are given out of blocks of
    /// [`IDS_RESERVED`], so a start writes the record once per block
    /// rather than each time.
    reserved: u64,
    next_run: RunId,
    node_tag: String,
    /// A node owned by an app (see the daemon's `owner`): its table is
    /// never restored, by it or by any later daemon of its home.
    owned: bool,
    shutting_down: bool,
    effects: Vec<Effect>,
    /// Deadlines of entries in backoff or stopping, soonest first.
    timers: BTreeSet<(Instant, ProcessNum)>,
    /// Entries by name (most names have one).
    by_name: HashMap<String, BTreeSet<ProcessNum>>,
    /// Children in the table, by parent, and by the parent's package.
    children: HashMap<ProcessId, u32>,
    spawned: HashMap<PackageId, u32>,
    /// Entries whose row changed since the last [`Kernel::take_changes`].
    dirty: BTreeSet<ProcessNum>,
    /// Entries whose row is on disk.
    on_disk: HashSet<ProcessNum>,
    meta_dirty: bool,
}

impl Kernel {
    pub fn new(node_tag: impl Into<String>) -> Self {
        Kernel {
            procs: BTreeMap::new(),
            next_num: 1,
            reserved: 1,
            next_run: 1,
            node_tag: node_tag.into(),
            owned: false,
            shutting_down: false,
            effects: Vec::new(),
            timers: BTreeSet::new(),
            by_name: HashMap::new(),
            children: HashMap::new(),
            spawned: HashMap::new(),
            dirty: BTreeSet::new(),
            on_disk: HashSet::new(),
            meta_dirty: false,
        }
    }

    /// The table of an owned node after a daemon start: empty, but with the
    /// saved node tag (so the previous run's leftovers are found) and ids
    /// that continue (so logs and state of earlier runs are not reused).
    pub fn fresh(snapshot: &TableSnapshot) -> Self {
        let mut k = Kernel::new(snapshot.node_tag.clone());
        k.next_num = snapshot
            .processes
            .iter()
            .map(|p| p.num.0 + 1)
            .fold(snapshot.next_num, u64::max);
        k.reserved = k.next_num;
        // The rows of the earlier run go.
        k.dirty.extend(snapshot.processes.iter().map(|p| p.num));
        k.on_disk.extend(snapshot.processes.iter().map(|p| p.num));
        k.meta_dirty = true;
        k
    }

    /// Marks the node as owned by an app ([`Kernel::fresh`]).
    pub fn set_owned(&mut self, owned: bool) {
        if self.owned != owned {
            self.owned = owned;
            self.meta_dirty = true;
        }
    }

    /// Rebuilds the table after a daemon start: what was meant to run and
    /// restarts on exit is started again; everything else is listed stopped.
    pub fn restore(snapshot: TableSnapshot, now: Instant) -> Self {
        let mut k = Kernel::new(snapshot.node_tag);
        k.next_num = snapshot.next_num;
        for saved in snapshot.processes {
            k.next_num = k.next_num.max(saved.num.0 + 1);
            let saved_desired = saved.desired;
            let resume = saved.desired == Desired::Running
                && saved.spec.on_exit.restarts_after(ExitReason::Crashed);
            let entry = Entry {
                num: saved.num,
                spec: Arc::new(saved.spec),
                state: State::Stopped,
                desired: if resume {
                    Desired::Running
                } else {
                    Desired::Stopped
                },
                restarts: saved.restarts,
                attempt: 0,
                last_exit: saved.last_exit,
            };
            let num = entry.num;
            if entry.desired != saved_desired {
                k.dirty.insert(num);
            }
            k.on_disk.insert(num);
            k.insert(entry);
            if resume {
                k.spawn(num, now);
            }
        }
        k.reserved = k.next_num;
        k.meta_dirty = true;
        k
    }

    pub fn node_tag(&self) -> &str {
        &self.node_tag
    }

    /// The persisted view of the table.
    pub fn snapshot(&self) -> TableSnapshot {
        TableSnapshot {
            version: TABLE_VERSION,
            node_tag: self.node_tag.clone(),
            owned: self.owned,
            next_num: self.reserved,
            processes: self
                .procs
                .values()
                .filter(|e| e.durable())
                .map(Entry::saved)
                .collect(),
        }
    }

    /// The table's own record.
    pub fn meta(&self) -> TableMeta {
        TableMeta {
            version: TABLE_VERSION,
            node_tag: self.node_tag.clone(),
            owned: self.owned,
            next_num: self.reserved,
        }
    }

    /// What changed on disk since the last call (see [`TableChanges`]).
    pub fn take_changes(&mut self) -> TableChanges {
        let mut out = TableChanges {
            meta: std::mem::take(&mut self.meta_dirty).then(|| self.meta()),
            ..Default::default()
        };
        for num in std::mem::take(&mut self.dirty) {
            match self.procs.get(&num).filter(|e| e.durable()) {
                Some(e) => {
                    out.put.push(e.saved());
                    self.on_disk.insert(num);
                }
                None => {
                    if self.on_disk.remove(&num) {
                        out.delete.push(num);
                    }
                }
            }
        }
        out
    }

    /// Whether `num`'s row is on disk (staged by the last
    /// [`Kernel::take_changes`] or earlier, and not deleted since).
    pub fn is_on_disk(&self, num: ProcessNum) -> bool {
        self.on_disk.contains(&num)
    }

    /// Entries named `name`.
    pub fn named(&self, name: &str) -> impl Iterator<Item = &Entry> {
        self.by_name
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|n| self.procs.get(n))
    }

    /// Children of `parent` in the table, whatever their state.
    pub fn children_of(&self, parent: &ProcessId) -> u32 {
        self.children.get(parent).copied().unwrap_or(0)
    }

    /// Processes in the table spawned by processes of `package`.
    pub fn spawned_in(&self, package: &PackageId) -> u32 {
        self.spawned.get(package).copied().unwrap_or(0)
    }

    /// Adds `entry` to the table and its indexes.
    fn insert(&mut self, entry: Entry) {
        if let Some(name) = &entry.spec.name {
            self.by_name
                .entry(name.clone())
                .or_default()
                .insert(entry.num);
        }
        if let Some(p) = &entry.spec.parent {
            *self.children.entry(p.clone()).or_default() += 1;
            *self.spawned.entry(p.package.clone()).or_default() += 1;
        }
        if let Some(d) = entry.state.deadline() {
            self.timers.insert((d, entry.num));
        }
        self.procs.insert(entry.num, entry);
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.procs.values()
    }

    pub fn get(&self, num: ProcessNum) -> Option<&Entry> {
        self.procs.get(&num)
    }

    /// Effects decided since the last call, in the order to carry them out.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// True when no process has a live run.
    pub fn is_quiescent(&self) -> bool {
        self.procs.values().all(|e| !e.state.is_live())
    }

    /// Adds a process and starts its first run.
    pub fn start(&mut self, spec: ProcessSpec, now: Instant) -> Result<ProcessNum, KernelError> {
        if self.shutting_down {
            return Err(KernelError::ShuttingDown);
        }
        let num = ProcessNum(self.next_num);
        self.next_num += 1;
        if self.next_num > self.reserved {
            self.reserved = num.0.saturating_add(IDS_RESERVED);
            self.meta_dirty = true;
        }
        self.insert(Entry {
            num,
            spec: Arc::new(spec),
            state: State::Stopped,
            desired: Desired::Running,
            restarts: 0,
            attempt: 0,
            last_exit: None,
        });
        self.spawn(num, now);
        self.dirty.insert(num);
        Ok(num)
    }

    /// Ids matching `sel`, or `NotFound` when none does (`all` on an empty
    /// table matches nothing and is not an error).
    pub fn select(&self, sel: &Selector) -> Result<Vec<ProcessNum>, KernelError> {
        let found: Vec<ProcessNum> = match sel {
            Selector::All => return Ok(self.procs.keys().copied().collect()),
            Selector::Id(n) => self.procs.get(n).map(|e| e.num).into_iter().collect(),
            Selector::Name(name) => self.named(name).map(|e| e.num).collect(),
        };
        if found.is_empty() {
            Err(KernelError::NotFound(sel.to_string()))
        } else {
            Ok(found)
        }
    }

    /// Stops the selected processes (graceful, then SIGKILL after grace);
    /// cancels pending restarts. They stay in the table, stopped.
    pub fn stop(&mut self, sel: &Selector, now: Instant) -> Result<Vec<ProcessNum>, KernelError> {
        let nums = self.select(sel)?;
        for &num in &nums {
            self.set_desired(num, Desired::Stopped);
            self.begin_stop(num, StopCause::User, AfterStop::Stay, now);
        }
        Ok(nums)
    }

    /// Restarts the selected processes now: a live run is stopped gracefully
    /// first; a stopped or backing-off one starts at once. Resets the schedule.
    pub fn restart(
        &mut self,
        sel: &Selector,
        now: Instant,
    ) -> Result<Vec<ProcessNum>, KernelError> {
        if self.shutting_down {
            return Err(KernelError::ShuttingDown);
        }
        let nums = self.select(sel)?;
        for &num in &nums {
            self.set_desired(num, Desired::Running);
            let e = self.procs.get_mut(&num).expect("selected");
            e.attempt = 0;
            if e.state.is_live() {
                self.begin_stop(num, StopCause::User, AfterStop::Restart, now);
            } else {
                self.spawn(num, now);
            }
        }
        Ok(nums)
    }

    /// Stops the selected processes and removes them from the table.
    pub fn delete(&mut self, sel: &Selector, now: Instant) -> Result<Vec<ProcessNum>, KernelError> {
        let nums = self.select(sel)?;
        for &num in &nums {
            if self.procs[&num].state.is_live() {
                self.begin_stop(num, StopCause::User, AfterStop::Delete, now);
            } else {
                self.remove(num);
            }
        }
        Ok(nums)
    }

    /// Stops a misbehaving run (e.g. over its memory cap); it ends `Crashed`
    /// with `detail`, and the on-exit policy applies as for any crash.
    pub fn fault(&mut self, num: ProcessNum, run: RunId, detail: String, now: Instant) {
        if self.procs.get(&num).and_then(|e| e.state.run()) == Some(run) {
            self.begin_stop(num, StopCause::Fault(detail), AfterStop::Stay, now);
        }
    }

    /// Ends a run that stopped answering (its heartbeats stopped): killed at
    /// once, as there is no point asking it politely, and ended `Crashed`
    /// with `detail`; the on-exit policy applies as for any crash.
    pub fn hung(&mut self, num: ProcessNum, run: RunId, detail: String, now: Instant) {
        if self.procs.get(&num).and_then(|e| e.state.run()) != Some(run) {
            return;
        }
        self.begin_stop(num, StopCause::Fault(detail), AfterStop::Stay, now);
        if let Some(e) = self.procs.get_mut(&num)
            && let State::Stopping { killed, .. } = &mut e.state
            && !*killed
        {
            *killed = true;
            self.effects.push(Effect::Kill { num, run });
        }
    }

    /// The node is stopping: every live run is stopped with reason `Shutdown`,
    /// pending restarts are dropped, and what should run stays marked so the
    /// next daemon starts it again.
    pub fn shutdown(&mut self, now: Instant) {
        self.shutting_down = true;
        let nums: Vec<ProcessNum> = self.procs.keys().copied().collect();
        for num in nums {
            self.begin_stop(num, StopCause::Shutdown, AfterStop::Stay, now);
        }
    }

    /// The driver's answer to `Spawn`: the OS pid, or why it could not start
    /// (which counts as a crash of a zero-length run).
    pub fn spawned<E: std::fmt::Display>(
        &mut self,
        num: ProcessNum,
        run: RunId,
        result: Result<Option<u32>, E>,
        now: Instant,
        wall_ms: u64,
    ) {
        let Some(e) = self.procs.get_mut(&num) else {
            return;
        };
        match (&e.state, result) {
            (State::Starting { run: r, since }, Ok(pid)) if *r == run => {
                e.state = State::Running {
                    run,
                    pid,
                    since: *since,
                };
            }
            (State::Stopping { run: r, .. }, Ok(pid)) if *r == run => {
                if let State::Stopping { pid: p, .. } = &mut e.state {
                    *p = pid;
                }
            }
            (State::Starting { run: r, .. } | State::Stopping { run: r, .. }, Err(why))
                if *r == run =>
            {
                self.finish_run(num, None, Some(why.to_string()), now, wall_ms);
            }
            _ => {}
        }
    }

    /// The driver saw the run end (its main process exited, or its wasm
    /// instance returned or trapped); `detail` says why when the status
    /// alone does not (a panic message).
    pub fn exited(
        &mut self,
        num: ProcessNum,
        run: RunId,
        status: ExitStatus,
        detail: Option<String>,
        now: Instant,
        wall_ms: u64,
    ) {
        if self.procs.get(&num).and_then(|e| e.state.run()) == Some(run) {
            self.finish_run(num, Some(status), detail, now, wall_ms);
        }
    }

    /// A process changed its own on-exit policy while running.
    pub fn set_on_exit(&mut self, num: ProcessNum, on_exit: spindle_types::OnExit) {
        if let Some(e) = self.procs.get_mut(&num)
            && e.spec.on_exit != on_exit
        {
            Arc::make_mut(&mut e.spec).on_exit = on_exit;
            self.dirty.insert(num);
        }
    }

    /// Fires what is due at `now`: restarts whose backoff is over, SIGKILL for
    /// stops whose grace is over.
    pub fn tick(&mut self, now: Instant) {
        let mut due_spawn = vec![];
        while let Some(&(at, num)) = self.timers.first()
            && at <= now
        {
            self.timers.pop_first();
            let Some(e) = self.procs.get_mut(&num) else {
                continue;
            };
            match &mut e.state {
                State::Backoff { until } if *until == at => due_spawn.push(num),
                State::Stopping {
                    run,
                    deadline,
                    killed,
                    ..
                } if !*killed && *deadline == at => {
                    *killed = true;
                    self.effects.push(Effect::Kill { num, run: *run });
                }
                _ => {}
            }
        }
        for num in due_spawn {
            self.procs.get_mut(&num).expect("due").restarts += 1;
            self.dirty.insert(num);
            self.spawn(num, now);
        }
    }

    /// The earliest instant at which [`Kernel::tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.first().map(|(at, _)| *at)
    }

    fn spawn(&mut self, num: ProcessNum, now: Instant) {
        let run = self.next_run;
        self.next_run += 1;
        let e = self.procs.get_mut(&num).expect("spawn of a known process");
        debug_assert!(!e.state.is_live(), "one live run per process");
        set_state(&mut self.timers, e, State::Starting { run, since: now });
        self.effects.push(Effect::Spawn {
            num,
            run,
            spec: e.spec.clone(),
        });
    }

    fn set_desired(&mut self, num: ProcessNum, desired: Desired) {
        let e = self.procs.get_mut(&num).expect("known process");
        if e.desired != desired {
            e.desired = desired;
            self.dirty.insert(num);
        }
    }

    fn remove(&mut self, num: ProcessNum) {
        if let Some(e) = self.procs.remove(&num) {
            if let Some(name) = &e.spec.name
                && let Some(set) = self.by_name.get_mut(name)
            {
                set.remove(&num);
                if set.is_empty() {
                    self.by_name.remove(name);
                }
            }
            if let Some(p) = &e.spec.parent {
                for count in [self.children.get_mut(p), self.spawned.get_mut(&p.package)]
                    .into_iter()
                    .flatten()
                {
                    *count = count.saturating_sub(1);
                }
                if self.children.get(p) == Some(&0) {
                    self.children.remove(p);
                }
                if self.spawned.get(&p.package) == Some(&0) {
                    self.spawned.remove(&p.package);
                }
            }
            if let Some(d) = e.state.deadline() {
                self.timers.remove(&(d, num));
            }
        }
        self.dirty.insert(num);
        self.effects.push(Effect::Removed { num });
    }

    fn begin_stop(&mut self, num: ProcessNum, cause: StopCause, then: AfterStop, now: Instant) {
        let e = self.procs.get_mut(&num).expect("known process");
        let grace = e.spec.grace;
        let signal = e.spec.stop_signal;
        match &mut e.state {
            State::Starting { run, since } | State::Running { run, since, .. } => {
                let (run, since, pid) = (*run, *since, e.state.pid());
                let stopping = State::Stopping {
                    run,
                    pid,
                    since,
                    deadline: now + grace,
                    killed: false,
                    cause,
                    then,
                };
                set_state(&mut self.timers, e, stopping);
                self.effects.push(Effect::AskStop { num, run, signal });
            }
            State::Stopping {
                cause: c, then: t, ..
            } => {
                // Already on its way out: a stronger intent wins (delete over
                // stop over restart), and a user stop overrides a fault.
                let new = then;
                *t = match (*t, new) {
                    (AfterStop::Delete, _) | (_, AfterStop::Delete) => AfterStop::Delete,
                    (_, n) => n,
                };
                if matches!(cause, StopCause::User | StopCause::Shutdown) {
                    *c = cause;
                }
            }
            State::Backoff { .. } => {
                set_state(&mut self.timers, e, State::Stopped);
                match then {
                    AfterStop::Delete => self.remove(num),
                    AfterStop::Restart => self.spawn(num, now),
                    AfterStop::Stay => self.effects.push(Effect::Settled { num }),
                }
            }
            State::Stopped => {}
        }
    }

    fn finish_run(
        &mut self,
        num: ProcessNum,
        status: Option<ExitStatus>,
        detail: Option<String>,
        now: Instant,
        wall_ms: u64,
    ) {
        let e = self.procs.get_mut(&num).expect("known process");
        let since = e.state.since().unwrap_or(now);
        let uptime = now.saturating_duration_since(since);
        let (reason, reason_detail, then) = match &e.state {
            State::Stopping { cause, then, .. } => match cause {
                StopCause::User => (ExitReason::Killed, None, *then),
                StopCause::Shutdown => (ExitReason::Shutdown, None, *then),
                StopCause::Fault(d) => (ExitReason::Crashed, Some(d.clone()), *then),
            },
            _ => {
                let reason = match status {
                    Some(ExitStatus::Code(0)) => ExitReason::Completed,
                    _ => ExitReason::Crashed,
                };
                (reason, None, AfterStop::Stay)
            }
        };
        // The stop's own explanation (a fault) wins over the driver's.
        let detail = reason_detail.or(detail);
        let info = ExitInfo {
            reason,
            status,
            detail,
            at_ms: wall_ms,
            uptime_ms: uptime.as_millis() as u64,
        };
        e.last_exit = Some(info.clone());
        set_state(&mut self.timers, e, State::Stopped);
        let transient = e.spec.transient;
        self.dirty.insert(num);

        let mut restart_in = None;
        match then {
            AfterStop::Delete => {
                self.effects.push(Effect::Exited {
                    num,
                    info,
                    restart_in: None,
                    transient,
                });
                self.remove(num);
                return;
            }
            AfterStop::Restart if !self.shutting_down => {
                restart_in = Some(Duration::ZERO);
                self.spawn(num, now);
            }
            _ if self.shutting_down => {}
            _ if e.desired == Desired::Running && e.spec.on_exit.restarts_after(reason) => {
                match e.spec.restart.decide(e.attempt, uptime) {
                    RestartDecision::After { delay, attempt } => {
                        e.attempt = attempt;
                        set_state(&mut self.timers, e, State::Backoff { until: now + delay });
                        restart_in = Some(delay);
                    }
                    RestartDecision::Never => self.set_desired(num, Desired::Stopped),
                }
            }
            _ => {
                if reason != ExitReason::Shutdown {
                    self.set_desired(num, Desired::Stopped);
                }
            }
        }
        let gone = restart_in.is_none() && !self.shutting_down && transient;
        self.effects.push(Effect::Exited {
            num,
            info,
            restart_in,
            transient,
        });
        if gone {
            self.remove(num);
        }
    }
}

#[cfg(test)]
mod tests;
