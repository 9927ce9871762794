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
//! A timer costs about 40 bytes in the slab, 16 in the heap and 16–32 in
//! its owner's index.

use spindle_types::{Address, PackageId, ProcessId};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

/// How many timers may be pending.
#[derive(Debug, Clone, Copy)]
pub struct Budgets {
    pub process: u32,
    pub package: u32,
    pub node: u32,
    /// Durable timers of one process (each is a row on disk).
    pub durable: u32,
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
}

/// A timer taken out of the wheel: due, cancelled, or its owner gone.
#[derive(Debug, Clone)]
pub struct Taken {
    pub timer: Timer,
    /// Its deadline, in the wheel's time (0 for one cancelled or dropped).
    pub deadline: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetError {
    #[error("{what} already has {limit} timers pending")]
    Quota { what: String, limit: u32 },
    #[error("{owner} already has timer {id} pending: choose another id")]
    IdInUse { owner: ProcessId, id: u64 },
}

enum Slot {
    /// `generation`: the next tenant's, so a heap entry of an earlier
    /// tenant never matches a later one.
    Vacant {
        next: u32,
        generation: u32,
    },
    Taken {
        timer: Timer,
        generation: u32,
    },
}

/// No vacant slot.
const NONE: u32 = u32::MAX;

#[derive(Default)]
struct Owner {
    /// Pending timers by id → slot.
    by_id: HashMap<u64, u32>,
    /// Durable timers that fired while the owner was off the bus, waiting
    /// for it to come back.
    parked: Vec<Taken>,
    durable: u32,
}

impl Owner {
    fn count(&self) -> usize {
        self.by_id.len() + self.parked.len()
    }
}

pub struct Wheel {
    budgets: Budgets,
    slots: Vec<Slot>,
    vacant: u32,
    heap: BinaryHeap<Reverse<(u64, u32, u32)>>,
    owners: HashMap<ProcessId, Owner>,
    packages: HashMap<PackageId, u32>,
    /// Pending timers (in the slab, or parked).
    live: usize,
    /// Ids the wheel gives timers set without one: from the top half, so
    /// they never meet the ids processes choose from the bottom half.
    next_auto: u64,
}

/// Ids at or above this are the wheel's own ([`Wheel::set`] with no id).
pub const AUTO_IDS: u64 = 1 << 63;

impl Wheel {
    pub fn new(budgets: Budgets) -> Wheel {
        Wheel {
            budgets,
            slots: Vec::new(),
            vacant: NONE,
            heap: BinaryHeap::new(),
            owners: HashMap::new(),
            packages: HashMap::new(),
            live: 0,
            next_auto: AUTO_IDS,
        }
    }

    /// Pending timers, parked ones included.
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
            .map_or((0, 0), |o| (o.count(), o.durable))
    }

    /// Durable timers of `owner` that fired while it was off the bus.
    pub fn parked(&self, owner: &ProcessId) -> usize {
        self.owners.get(owner).map_or(0, |o| o.parked.len())
    }

    /// Every process with a timer pending.
    pub fn owners(&self) -> impl Iterator<Item = &ProcessId> {
        self.owners.keys()
    }

    /// The earliest deadline (possibly of a timer since cancelled: taking
    /// what is due then takes nothing).
    pub fn next_deadline(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse((d, _, _))| *d)
    }

    /// A fresh id for a timer set without one.
    pub fn auto_id(&mut self) -> u64 {
        let id = self.next_auto;
        self.next_auto = self.next_auto.checked_add(1).unwrap_or(AUTO_IDS);
        id
    }

    /// Sets `timer` to fire at `deadline`, within the budgets. Returns
    /// whether it is now the earliest.
    pub fn set(&mut self, timer: Timer, deadline: u64) -> Result<bool, SetError> {
        let owner = &timer.owner.process;
        let b = self.budgets;
        let (count, durable, in_use) = self.owners.get(owner).map_or((0, 0, false), |o| {
            (o.count(), o.durable, o.by_id.contains_key(&timer.id))
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
        if self.packages.get(&owner.package).copied().unwrap_or(0) >= b.package {
            return quota(format!("package {}", owner.package), b.package);
        }
        if self.live >= b.node as usize {
            return quota("the node".into(), b.node);
        }
        Ok(self.insert(timer, deadline))
    }

    /// Puts a timer in (its budgets checked, or it was pending before).
    fn insert(&mut self, timer: Timer, deadline: u64) -> bool {
        let owner = timer.owner.process.clone();
        let id = timer.id;
        let is_durable = timer.durable.is_some();
        let slot = match self.vacant {
            NONE => {
                self.slots.push(Slot::Taken {
                    timer,
                    generation: 0,
                });
                (self.slots.len() - 1) as u32
            }
            v => {
                let Slot::Vacant { next, generation } = self.slots[v as usize] else {
                    unreachable!("the free list holds vacant slots only")
                };
                self.vacant = next;
                self.slots[v as usize] = Slot::Taken { timer, generation };
                v
            }
        };
        let generation = match &self.slots[slot as usize] {
            Slot::Taken { generation, .. } => *generation,
            Slot::Vacant { .. } => unreachable!("just filled"),
        };
        let earliest = self.next_deadline().is_none_or(|d| deadline < d);
        self.heap.push(Reverse((deadline, slot, generation)));
        let o = self.owners.entry(owner.clone()).or_default();
        o.by_id.insert(id, slot);
        if is_durable {
            o.durable += 1;
        }
        *self.packages.entry(owner.package).or_default() += 1;
        self.live += 1;
        earliest
    }

    /// Takes up to `max` timers due at `now` into `out`.
    pub fn take_due(&mut self, now: u64, max: usize, out: &mut Vec<Taken>) {
        while out.len() < max {
            let Some(&Reverse((deadline, slot, generation))) = self.heap.peek() else {
                break;
            };
            if deadline > now {
                break;
            }
            self.heap.pop();
            if let Some(t) = self.remove(slot, generation, deadline) {
                out.push(t);
            }
        }
        self.sweep();
    }

    /// Takes `owner`'s timer `id` out (it was cancelled).
    pub fn cancel(&mut self, owner: &ProcessId, id: u64) -> Option<Taken> {
        let o = self.owners.get_mut(owner)?;
        if let Some(i) = o.parked.iter().position(|t| t.timer.id == id) {
            let t = o.parked.swap_remove(i);
            self.forget_one(&t.timer);
            return Some(t);
        }
        let slot = *o.by_id.get(&id)?;
        let generation = self.generation(slot)?;
        self.remove(slot, generation, 0)
    }

    /// The end of a run of `owner`: its timers that belong to that run
    /// alone (not durable) are dropped. Returns how many.
    pub fn departed(&mut self, owner: &ProcessId) -> usize {
        let Some(o) = self.owners.get_mut(owner) else {
            return 0;
        };
        let slots: Vec<u32> = o.by_id.values().copied().collect();
        let mut dropped = 0;
        for slot in slots {
            let volatile = matches!(
                &self.slots[slot as usize],
                Slot::Taken { timer, .. } if timer.durable.is_none()
            );
            if volatile && let Some(g) = self.generation(slot) {
                self.remove(slot, g, 0);
                dropped += 1;
            }
        }
        self.sweep();
        dropped
    }

    /// `owner` is gone for good: every timer of its is dropped, parked
    /// ones too. Returns the durable ones (their records must go).
    pub fn forgotten(&mut self, owner: &ProcessId) -> Vec<Taken> {
        let Some(o) = self.owners.get_mut(owner) else {
            return vec![];
        };
        let parked = std::mem::take(&mut o.parked);
        let slots: Vec<u32> = o.by_id.values().copied().collect();
        let mut gone: Vec<Taken> = Vec::new();
        for t in parked {
            self.forget_one(&t.timer);
            gone.push(t);
        }
        for slot in slots {
            if let Some(g) = self.generation(slot)
                && let Some(t) = self.remove(slot, g, 0)
            {
                gone.push(t);
            }
        }
        self.sweep();
        gone.retain(|t| t.timer.durable.is_some());
        gone
    }

    /// Keeps a durable timer that fired while its owner was off the bus
    /// until the owner comes back ([`Wheel::arrived`]). It stays counted.
    pub fn park(&mut self, t: Taken) {
        let owner = t.timer.owner.process.clone();
        *self.packages.entry(owner.package.clone()).or_default() += 1;
        self.live += 1;
        let o = self.owners.entry(owner).or_default();
        if t.timer.durable.is_some() {
            o.durable += 1;
        }
        o.parked.push(t);
    }

    /// Puts back a timer taken out (its answer found the mailbox full):
    /// due again at `deadline`, counted as before.
    pub fn put_back(&mut self, t: Taken, deadline: u64) {
        self.insert(t.timer, deadline);
    }

    /// `owner` is on the bus again: the timers parked for it, to deliver now.
    pub fn arrived(&mut self, owner: &ProcessId) -> Vec<Taken> {
        let Some(o) = self.owners.get_mut(owner) else {
            return vec![];
        };
        let parked = std::mem::take(&mut o.parked);
        for t in &parked {
            self.forget_one(&t.timer);
        }
        parked
    }

    /// The generation of the timer in `slot`.
    fn generation(&self, slot: u32) -> Option<u32> {
        match self.slots.get(slot as usize)? {
            Slot::Taken { generation, .. } => Some(*generation),
            Slot::Vacant { .. } => None,
        }
    }

    /// Takes the timer out of `slot` if it is still the tenant of
    /// `generation`; the slot is vacated and the counts drop. `deadline`
    /// is the heap's (0 where it does not matter: a cancel, a run's end).
    fn remove(&mut self, slot: u32, generation: u32, deadline: u64) -> Option<Taken> {
        match self.slots.get(slot as usize) {
            Some(Slot::Taken { generation: g, .. }) if *g == generation => {}
            _ => return None,
        }
        let Slot::Taken { timer, .. } = std::mem::replace(
            &mut self.slots[slot as usize],
            Slot::Vacant {
                next: self.vacant,
                generation: generation.wrapping_add(1),
            },
        ) else {
            unreachable!("matched above")
        };
        self.vacant = slot;
        let o = self
            .owners
            .get_mut(&timer.owner.process)
            .expect("a pending timer's owner is known");
        o.by_id.remove(&timer.id);
        self.forget_one(&timer);
        Some(Taken { timer, deadline })
    }

    /// Uncounts one timer that has left (the slab or the parked list).
    fn forget_one(&mut self, timer: &Timer) {
        let owner = &timer.owner.process;
        self.live -= 1;
        if let Some(n) = self.packages.get_mut(&owner.package) {
            *n -= 1;
            if *n == 0 {
                self.packages.remove(&owner.package);
            }
        }
        if let Some(o) = self.owners.get_mut(owner) {
            if timer.durable.is_some() {
                o.durable -= 1;
            }
            if o.count() == 0 {
                self.owners.remove(owner);
            }
        }
    }

    /// Drops stale heap entries once they outnumber the live ones.
    fn sweep(&mut self) {
        if self.heap.len() <= 2 * self.live + 1024 {
            return;
        }
        let slots = &self.slots;
        self.heap.retain(|Reverse((_, s, g))| {
            matches!(&slots[*s as usize], Slot::Taken { generation, .. } if generation == g)
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
        Due {
            advance: u64,
        },
        Departed {
            owner: usize,
        },
        Forgotten {
            owner: usize,
        },
        /// The next durable timer due is parked, then its owner arrives.
        ParkAndArrive {
            owner: usize,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..4usize, 0..6u64, 0..50u64, any::<bool>())
                .prop_map(|(owner, id, after, durable)| Op::Set { owner, id, after, durable }),
            2 => (0..4usize, 0..6u64).prop_map(|(owner, id)| Op::Cancel { owner, id }),
            3 => (0..30u64).prop_map(|advance| Op::Due { advance }),
            1 => (0..4usize).prop_map(|owner| Op::Departed { owner }),
            1 => (0..4usize).prop_map(|owner| Op::Forgotten { owner }),
            1 => (0..4usize).prop_map(|owner| Op::ParkAndArrive { owner }),
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

    const B: Budgets = Budgets {
        process: 4,
        package: 7,
        node: 9,
        durable: 2,
    };

    /// The model: every pending timer by (owner, id), with its deadline
    /// and whether it is durable.
    #[derive(Default)]
    struct Model {
        pending: BTreeMap<(usize, u64), (u64, bool)>,
    }

    impl Model {
        fn count(&self, f: impl Fn(usize, bool) -> bool) -> usize {
            self.pending
                .iter()
                .filter(|((o, _), (_, d))| f(*o, *d))
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
                || self.pending.len() >= B.node as usize
            {
                return Err("quota");
            }
            self.pending.insert((o, id), (deadline, durable));
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// The wheel agrees with a plain map on what is pending, what a
        /// budget refuses, and what is due, through cancels, runs ending,
        /// deletions and parking.
        #[test]
        fn the_wheel_agrees_with_a_map(ops in proptest::collection::vec(op(), 1..120)) {
            let mut w = Wheel::new(B);
            let mut m = Model::default();
            let mut now = 0u64;
            for op in ops {
                match op {
                    Op::Set { owner: o, id, after, durable } => {
                        let t = Timer {
                            owner: owner(o),
                            rsvp: None,
                            request: 0,
                            id,
                            durable: durable.then(|| Box::new(Durable { at_unix_ms: 0, context: None, run: None })),
                        };
                        let got = w.set(t, now + after).map(|_| ()).map_err(|e| match e {
                            SetError::IdInUse { .. } => "in use",
                            SetError::Quota { .. } => "quota",
                        });
                        prop_assert_eq!(got, m.set(o, id, now + after, durable));
                    }
                    Op::Cancel { owner: o, id } => {
                        let got = w.cancel(&owner(o).process, id).map(|t| t.timer.id);
                        prop_assert_eq!(got, m.pending.remove(&(o, id)).map(|_| id));
                    }
                    Op::Due { advance } => {
                        now += advance;
                        let mut out = vec![];
                        w.take_due(now, usize::MAX, &mut out);
                        let mut got: Vec<(String, u64)> = out.iter().map(|t| (t.timer.owner.process.process.to_string(), t.timer.id)).collect();
                        got.sort();
                        for t in &out {
                            prop_assert!(t.deadline <= now);
                        }
                        let due: Vec<(usize, u64)> = m.pending.iter().filter(|(_, (d, _))| *d <= now).map(|(k, _)| *k).collect();
                        let mut want: Vec<(String, u64)> = due.iter().map(|(o, id)| (format!("p{o}"), *id)).collect();
                        want.sort();
                        for k in due {
                            m.pending.remove(&k);
                        }
                        prop_assert_eq!(got, want);
                    }
                    Op::Departed { owner: o } => {
                        let before = m.pending.len();
                        m.pending.retain(|(x, _), (_, d)| *x != o || *d);
                        prop_assert_eq!(w.departed(&owner(o).process), before - m.pending.len());
                    }
                    Op::Forgotten { owner: o } => {
                        let durable = m.count(|x, d| x == o && d);
                        m.pending.retain(|(x, _), _| *x != o);
                        prop_assert_eq!(w.forgotten(&owner(o).process).len(), durable);
                    }
                    Op::ParkAndArrive { owner: o } => {
                        // Take everything of o that is due as if its
                        // process were off the bus: durable ones park.
                        let mut out = vec![];
                        w.take_due(now, usize::MAX, &mut out);
                        for t in out {
                            let k = (t.timer.owner.process.process.as_str()[1..].parse::<usize>().unwrap(), t.timer.id);
                            if k.0 == o && t.timer.durable.is_some() {
                                w.park(t);
                            } else {
                                m.pending.remove(&k);
                            }
                        }
                        prop_assert_eq!(w.len(), m.pending.len());
                        let back = w.arrived(&owner(o).process);
                        for t in back {
                            w.put_back(t, now);
                        }
                    }
                }
                prop_assert_eq!(w.len(), m.pending.len());
                for o in 0..4 {
                    let (all, durable) = w.pending(&owner(o).process);
                    prop_assert_eq!(all, m.count(|x, _| x == o));
                    prop_assert_eq!(durable as usize, m.count(|x, d| x == o && d));
                }
            }
        }
    }
}
