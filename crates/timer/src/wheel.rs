//! The pending timers, as a data structure with no clock and no bus.
//!
//! Timers live in a slab (`slots`, a free list through the vacant ones);
//! deadlines are a binary heap of `(deadline, slot, generation)`, so the
//! next deadline is the heap's top and taking what is due costs
//! `O(log n)` each. A cancelled or dropped timer leaves its heap entry
//! behind: the entry's generation no longer matches its slot, and it is
//! skipped when it comes up; when stale entries outnumber live ones the
//! heap is swept. Each owner (a process) keeps its timers by id, which is
//! what `cancel`, a run's end and a deletion need, and is counted against
//! the budgets ([`Budgets`]) with its package and the node.
//!
//! A timer keeps its slot, its id and its place in the budgets from
//! [`Wheel::set`] until it is over, whatever it is doing meanwhile
//! ([`Slot`]): waiting for its deadline, out for delivery on the firing
//! thread ([`Due`], ended by [`Wheel::finish`], [`Wheel::retry`] or
//! [`Wheel::park`]), or parked until its owner is back on the bus. So an
//! id is never in use twice and nothing is counted twice or not at all.
//!
//! A timer costs 64 bytes in the slab, 16 in the heap and 5–10 in its
//! owner's index (about 90 in all, 110 with the vectors' spare room).

use spindle_types::{Address, PackageId, ProcessId};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

/// How many timers may be pending.
#[derive(Debug, Clone, Copy)]
pub struct Budgets {
    pub process: u32,
    pub package: u32,
    pub node: u32,
    /// Durable timers of one process (each is a row on disk).
    pub durable: u32,
    /// Bytes of durable timers' contexts of one package (kept in memory
    /// and on disk, read at every boot).
    pub context: usize,
}

/// What a durable timer keeps beyond a plain one: it outlives runs and
/// the daemon, so it carries its own wall-clock deadline and context.
#[derive(Debug, Clone)]
pub struct Durable {
    /// The deadline as wall-clock milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// JSON text the owner gave, handed back when it fires.
    pub context: Option<String>,
    /// The requester's endpoint as it was when the timer was set: while it
    /// is still on the bus, the run that set the timer awaits its answer
    /// (`None` for a timer read from disk).
    pub run: Option<std::sync::Weak<spindle_bus::Endpoint>>,
}

/// A timer to set.
#[derive(Debug, Clone)]
pub struct Timer {
    pub owner: Arc<Address>,
    /// Where the answer goes (`None`: nobody awaits one; it fires as a
    /// request to the owner).
    pub rsvp: Option<Arc<Address>>,
    /// The number of the request that set it (what its answer carries).
    pub request: u64,
    pub id: u64,
    pub durable: Option<Box<Durable>>,
    /// Its deadline in the wheel's time, as [`Wheel::set`] was given it
    /// (what lateness is measured from, however often it is retried).
    pub deadline: u64,
    /// Answers that found the owner's mailbox full so far.
    pub tries: u32,
}

impl Timer {
    fn context_len(&self) -> usize {
        self.durable
            .as_ref()
            .and_then(|d| d.context.as_ref())
            .map_or(0, String::len)
    }
}

/// A timer out for delivery: the firing thread holds it, the wheel keeps
/// its place until [`Wheel::finish`], [`Wheel::retry`] or [`Wheel::park`].
#[derive(Debug)]
pub struct Due {
    pub timer: Timer,
    /// Its deadline, in the wheel's time.
    pub deadline: u64,
    slot: u32,
    generation: u32,
    /// Its owner's arrivals when it was taken (see [`Wheel::park`]).
    arrivals: u64,
}

/// Which timer out for delivery a [`Due`] is, kept aside in case its
/// delivery never comes back ([`Wheel::abandon`]).
#[derive(Debug, Clone, Copy)]
pub struct DueKey {
    slot: u32,
    generation: u32,
}

impl Due {
    pub fn key(&self) -> DueKey {
        DueKey {
            slot: self.slot,
            generation: self.generation,
        }
    }
}

/// What [`Wheel::park`] did with a timer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parked {
    /// Kept until its owner is on the bus again.
    Kept,
    /// Its owner came back meanwhile: due again now.
    Again,
    /// Its owner was deleted meanwhile: it is over.
    Over,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetError {
    #[error("{what} already has {limit} timers pending")]
    Quota { what: String, limit: u32 },
    #[error("package {package} already keeps {limit} bytes of durable timers' contexts")]
    ContextQuota { package: PackageId, limit: usize },
    #[error("{owner} already has timer {id} pending: choose another id")]
    IdInUse { owner: ProcessId, id: u64 },
}

/// A slot of the slab. Every state but `Vacant` is a pending timer,
/// counted in its owner's index and the budgets.
enum Slot {
    /// `generation`: the next tenant's, so a heap entry of an earlier
    /// tenant never matches a later one.
    Vacant { next: u32, generation: u32 },
    /// Waiting for its deadline (it has an entry in the heap).
    Waiting { timer: Timer, generation: u32 },
    /// Out for delivery on the firing thread. `over`: its run ended or
    /// its owner was deleted meanwhile, so it is not to come back.
    Firing {
        owner: Arc<Address>,
        id: u64,
        durable: bool,
        context: usize,
        generation: u32,
        over: bool,
    },
    /// A durable timer that fired while its owner was off the bus.
    Parked { timer: Timer, generation: u32 },
}

/// What the counts need of a slot's tenant.
struct Tenant<'a> {
    owner: &'a ProcessId,
    id: u64,
    durable: bool,
    context: usize,
    generation: u32,
}

impl Slot {
    fn tenant(&self) -> Option<Tenant<'_>> {
        match self {
            Slot::Vacant { .. } => None,
            Slot::Waiting { timer, generation } | Slot::Parked { timer, generation } => {
                Some(Tenant {
                    owner: &timer.owner.process,
                    id: timer.id,
                    durable: timer.durable.is_some(),
                    context: timer.context_len(),
                    generation: *generation,
                })
            }
            Slot::Firing {
                owner,
                id,
                durable,
                context,
                generation,
                ..
            } => Some(Tenant {
                owner: &owner.process,
                id: *id,
                durable: *durable,
                context: *context,
                generation: *generation,
            }),
        }
    }
}

/// No vacant slot.
const NONE: u32 = u32::MAX;

/// The id of the timer in `slot` (every slot an [`Index`] holds is taken).
fn id_in(slots: &[Slot], slot: u32) -> u64 {
    slots[slot as usize].tenant().map_or(u64::MAX, |t| t.id)
}

/// An owner's timers by id. It holds slots only — the id is read from the
/// slot — so an entry costs 5 bytes where a map of id → slot takes 17. Ids
/// are the process's choice: they are hashed with a keyed hash
/// ([`RandomState`]), so no choice of ids makes the index slow.
#[derive(Default)]
struct Index(hashbrown::HashTable<u32>);

impl Index {
    fn get(&self, keys: &RandomState, slots: &[Slot], id: u64) -> Option<u32> {
        self.0
            .find(keys.hash_one(id), |&s| id_in(slots, s) == id)
            .copied()
    }

    fn contains(&self, keys: &RandomState, slots: &[Slot], id: u64) -> bool {
        self.get(keys, slots, id).is_some()
    }

    /// Adds `slot` (already holding timer `id`, which is not indexed yet).
    fn insert(&mut self, keys: &RandomState, slots: &[Slot], id: u64, slot: u32) {
        self.0
            .insert_unique(keys.hash_one(id), slot, |&s| keys.hash_one(id_in(slots, s)));
    }

    /// Removes timer `id` (before its slot is vacated).
    fn remove(&mut self, keys: &RandomState, slots: &[Slot], id: u64) {
        if let Ok(e) = self
            .0
            .find_entry(keys.hash_one(id), |&s| id_in(slots, s) == id)
        {
            e.remove();
        }
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn slots(&self) -> Vec<u32> {
        self.0.iter().copied().collect()
    }
}

#[derive(Default)]
struct Owner {
    /// Pending timers by id (in every state).
    by_id: Index,
    /// The slots of its parked timers.
    parked: Vec<u32>,
    durable: u32,
    /// How often it came on the bus while it had timers.
    arrivals: u64,
}

#[derive(Default)]
struct Usage {
    timers: u32,
    context: usize,
}

pub struct Wheel {
    budgets: Budgets,
    slots: Vec<Slot>,
    vacant: u32,
    heap: BinaryHeap<Reverse<(u64, u32, u32)>>,
    owners: HashMap<ProcessId, Owner>,
    /// The keys of the owners' indexes.
    keys: RandomState,
    packages: HashMap<PackageId, Usage>,
    /// Pending timers (every slot not vacant).
    live: usize,
    /// Ids the wheel gives timers set without one: from the top half, so
    /// they never meet the ids processes choose from the bottom half.
    next_auto: u64,
}

/// Ids at or above this are the wheel's own ([`Wheel::auto_id`]).
pub const AUTO_IDS: u64 = 1 << 63;

impl Wheel {
    pub fn new(budgets: Budgets) -> Wheel {
        Wheel {
            budgets,
            slots: Vec::new(),
            vacant: NONE,
            heap: BinaryHeap::new(),
            owners: HashMap::new(),
            keys: RandomState::new(),
            packages: HashMap::new(),
            live: 0,
            next_auto: AUTO_IDS,
        }
    }

    /// Pending timers, parked and firing ones included.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Pending timers of `owner` (all, and durable).
    pub fn pending(&self, owner: &ProcessId) -> (usize, u32) {
        self.owners
            .get(owner)
            .map_or((0, 0), |o| (o.by_id.len(), o.durable))
    }

    /// Durable timers of `owner` that fired while it was off the bus.
    pub fn parked(&self, owner: &ProcessId) -> usize {
        self.owners.get(owner).map_or(0, |o| o.parked.len())
    }

    /// Every process with a timer pending.
    pub fn owners(&self) -> impl Iterator<Item = &ProcessId> {
        self.owners.keys()
    }

    /// How often `owner`'s timer `id` found the mailbox full.
    #[cfg(test)]
    pub(crate) fn tries(&self, owner: &ProcessId, id: u64) -> Option<u32> {
        let slot = self
            .owners
            .get(owner)?
            .by_id
            .get(&self.keys, &self.slots, id)?;
        match &self.slots[slot as usize] {
            Slot::Waiting { timer, .. } | Slot::Parked { timer, .. } => Some(timer.tries),
            _ => None,
        }
    }

    /// Heap entries, stale ones included (bounded by [`Wheel::sweep`]).
    pub fn heap_len(&self) -> usize {
        self.heap.len()
    }

    /// The earliest deadline (possibly of a timer since cancelled: taking
    /// what is due then takes nothing).
    pub fn next_deadline(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse((d, _, _))| *d)
    }

    /// A fresh id for a timer of `owner` set without one.
    pub fn auto_id(&mut self, owner: &ProcessId) -> u64 {
        let in_use = |id| {
            self.owners
                .get(owner)
                .is_some_and(|o| o.by_id.contains(&self.keys, &self.slots, id))
        };
        // An owner has at most `budgets.process` ids: this ends.
        let mut id = self.next_auto;
        while in_use(id) {
            id = id.checked_add(1).unwrap_or(AUTO_IDS);
        }
        self.next_auto = id.checked_add(1).unwrap_or(AUTO_IDS);
        id
    }

    /// Sets `timer` to fire at `deadline`, within the budgets. Returns
    /// whether it is now the earliest.
    pub fn set(&mut self, mut timer: Timer, deadline: u64) -> Result<bool, SetError> {
        let owner = &timer.owner.process;
        let b = self.budgets;
        let (count, durable, in_use) = self.owners.get(owner).map_or((0, 0, false), |o| {
            (
                o.by_id.len(),
                o.durable,
                o.by_id.contains(&self.keys, &self.slots, timer.id),
            )
        });
        if in_use {
            return Err(SetError::IdInUse {
                owner: owner.clone(),
                id: timer.id,
            });
        }
        let quota = |what: String, limit| Err(SetError::Quota { what, limit });
        if count >= b.process as usize {
            return quota(format!("process {owner}"), b.process);
        }
        if timer.durable.is_some() && durable >= b.durable {
            return quota(format!("process {owner} (durable)"), b.durable);
        }
        let usage = self.packages.get(&owner.package);
        if usage.map_or(0, |u| u.timers) >= b.package {
            return quota(format!("package {}", owner.package), b.package);
        }
        if usage
            .map_or(0, |u| u.context)
            .saturating_add(timer.context_len())
            > b.context
        {
            return Err(SetError::ContextQuota {
                package: owner.package.clone(),
                limit: b.context,
            });
        }
        if self.live >= b.node as usize {
            return quota("the node".into(), b.node);
        }
        if timer.id >= self.next_auto {
            // A timer read from disk with an id of the wheel's.
            self.next_auto = timer.id.checked_add(1).unwrap_or(AUTO_IDS);
        }
        let earliest = self.next_deadline().is_none_or(|d| deadline < d);
        timer.deadline = deadline;
        let slot = self.occupy(timer);
        self.wait(slot, deadline);
        Ok(earliest)
    }

    /// Puts back a timer read from disk, whatever the budgets say now: it
    /// was within them when set (and those of processes since deleted must
    /// not crowd out the others before they are dropped). False if its id
    /// is in use.
    pub fn restore(&mut self, mut timer: Timer, deadline: u64) -> bool {
        let owner = &timer.owner.process;
        if self
            .owners
            .get(owner)
            .is_some_and(|o| o.by_id.contains(&self.keys, &self.slots, timer.id))
        {
            return false;
        }
        if timer.id >= self.next_auto {
            self.next_auto = timer.id.checked_add(1).unwrap_or(AUTO_IDS);
        }
        timer.deadline = deadline;
        let slot = self.occupy(timer);
        self.wait(slot, deadline);
        true
    }

    /// Puts a new timer in a vacant slot and counts it (its budgets checked).
    fn occupy(&mut self, timer: Timer) -> u32 {
        let owner = timer.owner.process.clone();
        let (id, durable, context) = (timer.id, timer.durable.is_some(), timer.context_len());
        let slot = match self.vacant {
            NONE => {
                self.slots.push(Slot::Waiting {
                    timer,
                    generation: 0,
                });
                u32::try_from(self.slots.len() - 1).expect("the node budget bounds the slab")
            }
            v => {
                let Slot::Vacant { next, generation } = self.slots[v as usize] else {
                    unreachable!("the free list holds vacant slots only")
                };
                self.vacant = next;
                self.slots[v as usize] = Slot::Waiting { timer, generation };
                v
            }
        };
        let usage = self.packages.entry(owner.package.clone()).or_default();
        usage.timers += 1;
        usage.context += context;
        let o = self.owners.entry(owner).or_default();
        o.by_id.insert(&self.keys, &self.slots, id, slot);
        if durable {
            o.durable += 1;
        }
        self.live += 1;
        slot
    }

    /// Gives the waiting timer in `slot` its heap entry.
    fn wait(&mut self, slot: u32, deadline: u64) {
        if let Some(t) = self.slots[slot as usize].tenant() {
            let generation = t.generation;
            self.heap.push(Reverse((deadline, slot, generation)));
        }
    }

    /// Takes up to `max` timers due at `now` into `out`, for delivery.
    pub fn take_due(&mut self, now: u64, max: usize, out: &mut Vec<Due>) {
        while out.len() < max {
            let Some(&Reverse((deadline, slot, generation))) = self.heap.peek() else {
                break;
            };
            if deadline > now {
                break;
            }
            self.heap.pop();
            let cell = &mut self.slots[slot as usize];
            if !matches!(cell, Slot::Waiting { generation: g, .. } if *g == generation) {
                continue;
            }
            let (id, durable, context, owner) = match &*cell {
                Slot::Waiting { timer, .. } => (
                    timer.id,
                    timer.durable.is_some(),
                    timer.context_len(),
                    timer.owner.clone(),
                ),
                _ => unreachable!("matched above"),
            };
            let arrivals = self.owners.get(&owner.process).map_or(0, |o| o.arrivals);
            let Slot::Waiting { timer, .. } = std::mem::replace(
                cell,
                Slot::Firing {
                    owner,
                    id,
                    durable,
                    context,
                    generation,
                    over: false,
                },
            ) else {
                unreachable!("matched above")
            };
            out.push(Due {
                timer,
                deadline,
                slot,
                generation,
                arrivals,
            });
        }
        self.sweep();
    }

    /// Whether `due` is still out for delivery (and if so, whether it is
    /// over meanwhile).
    fn firing(&self, due: &Due) -> Option<bool> {
        match self.slots.get(due.slot as usize)? {
            Slot::Firing {
                generation, over, ..
            } if *generation == due.generation => Some(*over),
            _ => None,
        }
    }

    /// The delivery of `key` was lost (the code delivering it panicked): it
    /// is over, so its id and budget are not held for ever.
    pub fn abandon(&mut self, key: DueKey) {
        if matches!(
            self.slots.get(key.slot as usize),
            Some(Slot::Firing { generation, .. }) if *generation == key.generation
        ) {
            self.vacate(key.slot);
        }
    }

    /// `due` was delivered (or cannot be): it is over.
    pub fn finish(&mut self, due: &Due) {
        if self.firing(due).is_some() {
            self.vacate(due.slot);
        }
    }

    /// `due` found its owner's mailbox full: due again at `deadline`,
    /// unless it is over meanwhile. Returns whether it is kept.
    pub fn retry(&mut self, mut due: Due, deadline: u64) -> bool {
        match self.firing(&due) {
            Some(false) => {
                due.timer.tries = due.timer.tries.saturating_add(1);
                self.slots[due.slot as usize] = Slot::Waiting {
                    timer: due.timer,
                    generation: due.generation,
                };
                self.wait(due.slot, deadline);
                true
            }
            Some(true) => {
                self.vacate(due.slot);
                false
            }
            None => false,
        }
    }

    /// `due`, a durable timer, found its owner off the bus: kept until the
    /// owner is back ([`Wheel::arrived`]), or due again at `now` if it came
    /// back meanwhile.
    pub fn park(&mut self, due: Due, now: u64) -> Parked {
        match self.firing(&due) {
            Some(false) => {}
            Some(true) => {
                self.vacate(due.slot);
                return Parked::Over;
            }
            None => return Parked::Over,
        }
        let owner = due.timer.owner.process.clone();
        let o = self
            .owners
            .get_mut(&owner)
            .expect("a counted timer's owner");
        if o.arrivals != due.arrivals {
            self.slots[due.slot as usize] = Slot::Waiting {
                timer: due.timer,
                generation: due.generation,
            };
            self.wait(due.slot, now);
            return Parked::Again;
        }
        o.parked.push(due.slot);
        self.slots[due.slot as usize] = Slot::Parked {
            timer: due.timer,
            generation: due.generation,
        };
        Parked::Kept
    }

    /// Takes `owner`'s timer `id` out (it was cancelled): `None` if it is
    /// not pending, or already out for delivery.
    pub fn cancel(&mut self, owner: &ProcessId, id: u64) -> Option<Timer> {
        let slot = self
            .owners
            .get(owner)?
            .by_id
            .get(&self.keys, &self.slots, id)?;
        if matches!(self.slots[slot as usize], Slot::Firing { .. }) {
            return None;
        }
        let t = self.vacate(slot);
        self.sweep();
        t
    }

    /// The end of a run of `owner`: its timers that belong to that run
    /// alone (not durable) are dropped. Returns how many.
    pub fn departed(&mut self, owner: &ProcessId) -> usize {
        let Some(o) = self.owners.get(owner) else {
            return 0;
        };
        let slots = o.by_id.slots();
        let mut dropped = 0;
        for slot in slots {
            match &self.slots[slot as usize] {
                Slot::Waiting { timer, .. } if timer.durable.is_none() => {
                    self.vacate(slot);
                }
                Slot::Firing { durable: false, .. } => self.mark_over(slot),
                _ => continue,
            }
            dropped += 1;
        }
        self.sweep();
        dropped
    }

    /// `owner` is gone for good: every timer of its is dropped. Returns
    /// the ids of the durable ones (their records must go).
    pub fn forgotten(&mut self, owner: &ProcessId) -> Vec<u64> {
        let Some(o) = self.owners.get(owner) else {
            return vec![];
        };
        let slots = o.by_id.slots();
        let mut durable = Vec::new();
        for slot in slots {
            let cell = &self.slots[slot as usize];
            if let Some(t) = cell.tenant()
                && t.durable
            {
                durable.push(t.id);
            }
            if matches!(cell, Slot::Firing { .. }) {
                self.mark_over(slot);
            } else {
                self.vacate(slot);
            }
        }
        self.sweep();
        durable
    }

    /// `owner` is on the bus again: its parked timers are due now.
    /// Returns whether there were any.
    pub fn arrived(&mut self, owner: &ProcessId, now: u64) -> bool {
        let Some(o) = self.owners.get_mut(owner) else {
            return false;
        };
        o.arrivals += 1;
        let parked = std::mem::take(&mut o.parked);
        let any = !parked.is_empty();
        for slot in parked {
            let cell = &mut self.slots[slot as usize];
            if let Slot::Parked { .. } = cell {
                let Slot::Parked { timer, generation } = std::mem::replace(
                    cell,
                    Slot::Vacant {
                        next: NONE,
                        generation: 0,
                    },
                ) else {
                    unreachable!("matched above")
                };
                *cell = Slot::Waiting { timer, generation };
                self.wait(slot, now);
            }
        }
        any
    }

    /// The timer out for delivery in `slot` is not to come back.
    fn mark_over(&mut self, slot: u32) {
        if let Slot::Firing { over, .. } = &mut self.slots[slot as usize] {
            *over = true;
        }
    }

    /// Ends the timer in `slot`: the slot is vacated and the counts drop.
    /// Returns the timer, unless it was out for delivery.
    fn vacate(&mut self, slot: u32) -> Option<Timer> {
        let t = self.slots[slot as usize].tenant()?;
        let (owner, id, durable, context) = (t.owner.clone(), t.id, t.durable, t.context);
        let next_generation = t.generation.wrapping_add(1);
        let parked = matches!(self.slots[slot as usize], Slot::Parked { .. });
        // Out of the index first: it reads ids from the slots.
        if let Some(o) = self.owners.get_mut(&owner) {
            o.by_id.remove(&self.keys, &self.slots, id);
            if parked {
                o.parked.retain(|s| *s != slot);
            }
            if durable {
                o.durable -= 1;
            }
            if o.by_id.is_empty() {
                self.owners.remove(&owner);
            }
        }
        let old = std::mem::replace(
            &mut self.slots[slot as usize],
            Slot::Vacant {
                next: self.vacant,
                generation: next_generation,
            },
        );
        self.vacant = slot;
        self.live -= 1;
        if let Some(u) = self.packages.get_mut(&owner.package) {
            u.timers -= 1;
            u.context -= context;
            if u.timers == 0 {
                self.packages.remove(&owner.package);
            }
        }
        match old {
            Slot::Waiting { timer, .. } | Slot::Parked { timer, .. } => Some(timer),
            Slot::Firing { .. } | Slot::Vacant { .. } => None,
        }
    }

    /// Drops stale heap entries once they outnumber the live ones.
    fn sweep(&mut self) {
        if self.heap.len() <= 2 * self.live + 1024 {
            return;
        }
        let slots = &self.slots;
        self.heap.retain(|Reverse((_, s, g))| {
            matches!(&slots[*s as usize], Slot::Waiting { generation, .. } if generation == g)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Clone)]
    enum Op {
        Set {
            owner: usize,
            id: u64,
            after: u64,
            durable: bool,
        },
        Cancel {
            owner: usize,
            id: u64,
        },
        /// The clock moves on and what is due goes out for delivery.
        Due {
            advance: u64,
        },
        /// One timer out for delivery comes back: delivered, mailbox full,
        /// or (durable) owner off the bus.
        Release {
            which: usize,
            how: u8,
        },
        Departed {
            owner: usize,
        },
        Forgotten {
            owner: usize,
        },
        Arrived {
            owner: usize,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..4usize, 0..6u64, 0..50u64, any::<bool>())
                .prop_map(|(owner, id, after, durable)| Op::Set { owner, id, after, durable }),
            2 => (0..4usize, 0..6u64).prop_map(|(owner, id)| Op::Cancel { owner, id }),
            3 => (0..30u64).prop_map(|advance| Op::Due { advance }),
            4 => (any::<usize>(), 0..3u8).prop_map(|(which, how)| Op::Release { which, how }),
            1 => (0..4usize).prop_map(|owner| Op::Departed { owner }),
            1 => (0..4usize).prop_map(|owner| Op::Forgotten { owner }),
            1 => (0..4usize).prop_map(|owner| Op::Arrived { owner }),
        ]
    }

    /// Owners 0–2 share a package; 3 has its own.
    fn owner(i: usize) -> Arc<Address> {
        let package = if i < 3 {
            "demo:spindle"
        } else {
            "other:spindle"
        };
        Arc::new(format!("local@p{i}:{package}").parse().unwrap())
    }

    fn owner_index(a: &Address) -> usize {
        a.process.process.as_str()[1..].parse().unwrap()
    }

    /// Every durable timer of the proptest carries this many bytes.
    const CONTEXT: &str = "[1,2,3,4]";

    const B: Budgets = Budgets {
        process: 4,
        package: 7,
        node: 9,
        durable: 2,
        context: 3 * CONTEXT.len(),
    };

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum State {
        Waiting(u64),
        Firing { over: bool, arrived: bool },
        Parked,
    }

    /// The model: every pending timer by (owner, id), with whether it is
    /// durable and what it is doing.
    #[derive(Default)]
    struct Model {
        pending: BTreeMap<(usize, u64), (bool, State)>,
    }

    impl Model {
        fn count(&self, f: impl Fn(usize, bool) -> bool) -> usize {
            self.pending
                .iter()
                .filter(|((o, _), (d, _))| f(*o, *d))
                .count()
        }

        fn set(
            &mut self,
            o: usize,
            id: u64,
            deadline: u64,
            durable: bool,
        ) -> Result<(), &'static str> {
            if self.pending.contains_key(&(o, id)) {
                return Err("in use");
            }
            let same_package = |x: usize| (x < 3) == (o < 3);
            if self.count(|x, _| x == o) >= B.process as usize
                || (durable && self.count(|x, d| x == o && d) >= B.durable as usize)
                || self.count(|x, _| same_package(x)) >= B.package as usize
                || (durable
                    && (self.count(|x, d| same_package(x) && d) + 1) * CONTEXT.len() > B.context)
                || self.pending.len() >= B.node as usize
            {
                return Err("quota");
            }
            self.pending
                .insert((o, id), (durable, State::Waiting(deadline)));
            Ok(())
        }
    }

    fn timer(o: usize, id: u64, durable: bool) -> Timer {
        Timer {
            owner: owner(o),
            rsvp: None,
            request: 0,
            id,
            durable: durable.then(|| {
                Box::new(Durable {
                    at_unix_ms: 0,
                    context: Some(CONTEXT.into()),
                    run: None,
                })
            }),
            deadline: 0,
            tries: 0,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        /// The wheel agrees with a plain map on what is pending, what a
        /// budget refuses, what is due and what may be cancelled, through
        /// deliveries that race with cancels, runs ending, deletions and
        /// arrivals.
        #[test]
        fn the_wheel_agrees_with_a_map(ops in proptest::collection::vec(op(), 1..150)) {
            let mut w = Wheel::new(B);
            let mut m = Model::default();
            let mut held: Vec<Due> = Vec::new();
            let mut now = 0u64;
            for op in ops {
                match op {
                    Op::Set { owner: o, id, after, durable } => {
                        let got = w.set(timer(o, id, durable), now + after).map(|_| ()).map_err(|e| match e {
                            SetError::IdInUse { .. } => "in use",
                            SetError::Quota { .. } | SetError::ContextQuota { .. } => "quota",
                        });
                        prop_assert_eq!(got, m.set(o, id, now + after, durable));
                    }
                    Op::Cancel { owner: o, id } => {
                        let got = w.cancel(&owner(o).process, id).map(|t| t.id);
                        let want = match m.pending.get(&(o, id)) {
                            Some((_, State::Waiting(_) | State::Parked)) => {
                                m.pending.remove(&(o, id));
                                Some(id)
                            }
                            _ => None,
                        };
                        prop_assert_eq!(got, want);
                    }
                    Op::Due { advance } => {
                        now += advance;
                        let before = held.len();
                        w.take_due(now, usize::MAX, &mut held);
                        let mut got: Vec<(usize, u64)> = held[before..].iter().map(|d| (owner_index(&d.timer.owner), d.timer.id)).collect();
                        got.sort();
                        for d in &held[before..] {
                            prop_assert!(d.deadline <= now);
                        }
                        let mut want = vec![];
                        for (k, (_, s)) in m.pending.iter_mut() {
                            if let State::Waiting(d) = *s && d <= now {
                                *s = State::Firing { over: false, arrived: false };
                                want.push(*k);
                            }
                        }
                        prop_assert_eq!(got, want);
                    }
                    Op::Release { which, how } => {
                        if held.is_empty() {
                            continue;
                        }
                        let due = held.swap_remove(which % held.len());
                        let k = (owner_index(&due.timer.owner), due.timer.id);
                        let (durable, state) = m.pending[&k];
                        let State::Firing { over, arrived } = state else {
                            panic!("held but not firing in the model: {k:?} {state:?}");
                        };
                        match how {
                            0 => {
                                w.finish(&due);
                                m.pending.remove(&k);
                            }
                            1 => {
                                prop_assert_eq!(w.retry(due, now + 1), !over);
                                if over {
                                    m.pending.remove(&k);
                                } else {
                                    m.pending.insert(k, (durable, State::Waiting(now + 1)));
                                }
                            }
                            _ if durable => {
                                let got = w.park(due, now);
                                let want = if over {
                                    m.pending.remove(&k);
                                    Parked::Over
                                } else if arrived {
                                    m.pending.insert(k, (durable, State::Waiting(now)));
                                    Parked::Again
                                } else {
                                    m.pending.insert(k, (durable, State::Parked));
                                    Parked::Kept
                                };
                                prop_assert_eq!(got, want);
                            }
                            _ => {
                                w.finish(&due);
                                m.pending.remove(&k);
                            }
                        }
                    }
                    Op::Departed { owner: o } => {
                        let mut dropped = 0;
                        m.pending.retain(|(x, _), (d, s)| {
                            if *x != o || *d {
                                return true;
                            }
                            dropped += 1;
                            match s {
                                State::Firing { over, .. } => {
                                    *over = true;
                                    true
                                }
                                _ => false,
                            }
                        });
                        prop_assert_eq!(w.departed(&owner(o).process), dropped);
                    }
                    Op::Forgotten { owner: o } => {
                        let mut durable: Vec<u64> = m.pending.iter().filter(|((x, _), (d, _))| *x == o && *d).map(|((_, id), _)| *id).collect();
                        m.pending.retain(|(x, _), (_, s)| {
                            if *x != o {
                                return true;
                            }
                            match s {
                                State::Firing { over, .. } => {
                                    *over = true;
                                    true
                                }
                                _ => false,
                            }
                        });
                        let mut got = w.forgotten(&owner(o).process);
                        got.sort();
                        durable.sort();
                        prop_assert_eq!(got, durable);
                    }
                    Op::Arrived { owner: o } => {
                        let mut any = false;
                        for ((x, _), (_, s)) in m.pending.iter_mut() {
                            if *x != o {
                                continue;
                            }
                            match s {
                                State::Parked => {
                                    *s = State::Waiting(now);
                                    any = true;
                                }
                                State::Firing { arrived, .. } => *arrived = true,
                                State::Waiting(_) => {}
                            }
                        }
                        prop_assert_eq!(w.arrived(&owner(o).process, now), any);
                    }
                }
                prop_assert_eq!(w.len(), m.pending.len());
                prop_assert!(w.heap_len() <= 2 * w.len() + 1024 + 1);
                for o in 0..4 {
                    let (all, durable) = w.pending(&owner(o).process);
                    prop_assert_eq!(all, m.count(|x, _| x == o));
                    prop_assert_eq!(durable as usize, m.count(|x, d| x == o && d));
                    let parked = m.pending.iter().filter(|((x, _), (_, s))| *x == o && *s == State::Parked).count();
                    prop_assert_eq!(w.parked(&owner(o).process), parked);
                }
            }
        }
    }

    /// A delivery that never comes back gives its id and budget back.
    #[test]
    fn an_abandoned_delivery_frees_its_timer() {
        let mut w = Wheel::new(B);
        w.set(timer(0, 1, true), 0).unwrap();
        let mut out = vec![];
        w.take_due(0, 10, &mut out);
        let key = out[0].key();
        assert_eq!(w.len(), 1);
        w.abandon(key);
        assert!(w.is_empty());
        // Twice, or after the slot was reused, it is nothing.
        w.set(timer(0, 1, true), 5).unwrap();
        w.abandon(key);
        assert_eq!(w.len(), 1);
    }

    /// Auto ids skip ids a timer read from disk already has.
    #[test]
    fn auto_ids_never_meet_ids_in_use() {
        let mut w = Wheel::new(B);
        w.set(timer(0, AUTO_IDS, false), 10).unwrap();
        w.set(timer(0, AUTO_IDS + 2, false), 10).unwrap();
        let a = w.auto_id(&owner(0).process);
        assert_eq!(a, AUTO_IDS + 3);
        let mut w = Wheel::new(B);
        w.set(timer(1, AUTO_IDS + 1, false), 10).unwrap();
        let next = w.auto_id(&owner(1).process);
        assert!(next > AUTO_IDS + 1, "{next}");
    }

    /// Cancels of timers whose heap entries are far off keep the heap
    /// bounded by the live timers.
    #[test]
    fn set_and_cancel_in_a_loop_keeps_the_heap_bounded() {
        let mut w = Wheel::new(B);
        for i in 0..100_000u64 {
            w.set(timer(0, i, false), u64::MAX / 2).unwrap();
            assert!(w.cancel(&owner(0).process, i).is_some());
        }
        assert!(w.heap_len() <= 1024 + 1, "{}", w.heap_len());
        assert!(w.is_empty());
    }
}
