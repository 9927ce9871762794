//! Who holds which capabilities, indexed both ways: by holder (every check
//! on a send) and by issuer (revoking what a killed process issued), so
//! neither walks the whole table; and, for rights given across nodes, who
//! gave each one (each giver's record is bounded on its own).

use crate::Capability;
use spindle_types::{Address, PackageId, ProcessId};
use std::collections::{HashMap, HashSet};
use std::hash::Hash;

/// The node's record of capabilities: those its processes hold, and those
/// its processes issued to processes on other nodes. The issuing node
/// keeps that record and checks it; the other node cannot forge it.
#[derive(Debug, Default)]
pub(crate) struct Grants {
    pub here: CapTable<ProcessId>,
    /// Holders on other nodes (`bob@q:pkg:pub`) of rights issued here,
    /// each with the package here whose process gave it.
    pub there: CapTable<Address, PackageId>,
    /// Processes whose rights are never written: transient children not
    /// on disk (a reboot ends them, and the boot drops every right naming
    /// a process that is not in the table). A spawn's grants then cost no
    /// write, and neither does its end.
    pub unsaved: HashSet<ProcessId>,
}

/// Capabilities by holder, each with who gave it (`G`; nobody in
/// particular for the node's own processes).
#[derive(Debug)]
pub(crate) struct CapTable<H, G = ()> {
    /// By holder, then by issuer: the params held, and who gave each.
    held: HashMap<H, HashMap<Address, HashMap<String, G>>>,
    /// Holders of some capability of each issuer.
    issued: HashMap<Address, HashSet<H>>,
    /// How many of the pairs each giver gave.
    given: HashMap<G, usize>,
}

impl<H, G> Default for CapTable<H, G> {
    fn default() -> Self {
        CapTable {
            held: HashMap::new(),
            issued: HashMap::new(),
            given: HashMap::new(),
        }
    }
}

impl<H: Clone + Eq + Hash> CapTable<H> {
    /// Adds `cap` to `holder`'s; false if it held it already.
    pub(crate) fn insert(&mut self, holder: &H, cap: Capability) -> bool {
        self.give(holder, cap, ())
    }
}

impl<H: Clone + Eq + Hash, G: Clone + Eq + Hash> CapTable<H, G> {
    /// Whether `holder` holds `cap`.
    pub(crate) fn holds(&self, holder: &H, cap: &Capability) -> bool {
        self.held
            .get(holder)
            .and_then(|by| by.get(&cap.issuer))
            .is_some_and(|ps| ps.contains_key(&cap.params))
    }

    /// How many pairs `giver` gave.
    pub(crate) fn given_by(&self, giver: &G) -> usize {
        self.given.get(giver).copied().unwrap_or(0)
    }

    /// Everything `holder` holds.
    pub(crate) fn held(&self, holder: &H) -> Vec<Capability> {
        self.held
            .get(holder)
            .into_iter()
            .flat_map(|by| {
                by.iter().flat_map(|(issuer, ps)| {
                    ps.keys().map(|p| Capability {
                        issuer: issuer.clone(),
                        params: p.clone(),
                    })
                })
            })
            .collect()
    }

    /// Adds `cap` to `holder`'s, given by `giver`; false if it held it
    /// already (its giver stays the first).
    pub(crate) fn give(&mut self, holder: &H, cap: Capability, giver: G) -> bool {
        let by = self.held.entry(holder.clone()).or_default();
        let ps = by.entry(cap.issuer.clone()).or_default();
        if ps.contains_key(&cap.params) {
            return false;
        }
        ps.insert(cap.params, giver.clone());
        *self.given.entry(giver).or_default() += 1;
        self.issued
            .entry(cap.issuer)
            .or_default()
            .insert(holder.clone());
        true
    }

    /// Takes `cap` from `holder`; false if it did not hold it.
    pub(crate) fn remove(&mut self, holder: &H, cap: &Capability) -> bool {
        let Some(by) = self.held.get_mut(holder) else {
            return false;
        };
        let Some(ps) = by.get_mut(&cap.issuer) else {
            return false;
        };
        let Some(giver) = ps.remove(&cap.params) else {
            return false;
        };
        ungive(&mut self.given, &giver);
        if ps.is_empty() {
            by.remove(&cap.issuer);
            if let Some(hs) = self.issued.get_mut(&cap.issuer) {
                hs.remove(holder);
                if hs.is_empty() {
                    self.issued.remove(&cap.issuer);
                }
            }
        }
        if by.is_empty() {
            self.held.remove(holder);
        }
        true
    }

    /// Everything `holder` holds, taken away.
    pub(crate) fn remove_holder(&mut self, holder: &H) -> Vec<Capability> {
        let gone = self.held(holder);
        for c in &gone {
            self.remove(holder, c);
        }
        gone
    }

    /// Every `(holder, capability, giver)` issued by `issuer`.
    pub(crate) fn issued_by(&self, issuer: &Address) -> Vec<(H, Capability, G)> {
        let mut out = vec![];
        for holder in self.issued.get(issuer).into_iter().flatten() {
            let given = self.held.get(holder).and_then(|by| by.get(issuer));
            for (params, giver) in given.into_iter().flatten() {
                out.push((
                    holder.clone(),
                    Capability {
                        issuer: issuer.clone(),
                        params: params.clone(),
                    },
                    giver.clone(),
                ));
            }
        }
        out
    }

    /// Every `(holder, capability)` issued by `issuer`, taken away: a
    /// lookup per holder, whatever else they hold.
    pub(crate) fn remove_issued_by(&mut self, issuer: &Address) -> Vec<(H, Capability)> {
        let mut gone = vec![];
        for holder in self.issued.remove(issuer).into_iter().flatten() {
            let Some(by) = self.held.get_mut(&holder) else {
                continue;
            };
            for (params, giver) in by.remove(issuer).into_iter().flatten() {
                ungive(&mut self.given, &giver);
                gone.push((
                    holder.clone(),
                    Capability {
                        issuer: issuer.clone(),
                        params,
                    },
                ));
            }
            if by.is_empty() {
                self.held.remove(&holder);
            }
        }
        gone
    }

    /// Every `(holder, capability)` pair for which `gone` says so, taken away.
    pub(crate) fn remove_where(
        &mut self,
        gone: impl Fn(&H, &Capability) -> bool,
    ) -> Vec<(H, Capability)> {
        let out: Vec<(H, Capability)> = self
            .pairs()
            .filter(|(h, c)| gone(h, c))
            .map(|(h, c)| (h.clone(), c))
            .collect();
        for (h, c) in &out {
            self.remove(h, c);
        }
        out
    }

    /// Every `(holder, capability)` pair.
    pub(crate) fn pairs(&self) -> impl Iterator<Item = (&H, Capability)> {
        self.held.iter().flat_map(|(h, by)| {
            by.iter().flat_map(move |(issuer, ps)| {
                ps.keys().map(move |p| {
                    (
                        h,
                        Capability {
                            issuer: issuer.clone(),
                            params: p.clone(),
                        },
                    )
                })
            })
        })
    }
}

/// One pair fewer given by `giver`.
fn ungive<G: Eq + Hash>(given: &mut HashMap<G, usize>, giver: &G) {
    if let Some(n) = given.get_mut(giver) {
        *n -= 1;
        if *n == 0 {
            given.remove(giver);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(i: u8) -> ProcessId {
        format!("p{i}:demo:spindle").parse().unwrap()
    }
    fn cap(issuer: u8, p: u8) -> Capability {
        Capability {
            issuer: format!("local@p{issuer}:demo:spindle").parse().unwrap(),
            params: format!("\"{p}\""),
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8, u8, u8),
        Remove(u8, u8, u8),
        RemoveHolder(u8),
        RemoveIssuedBy(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..4u8, 0..4u8, 0..2u8).prop_map(|(h, i, p)| Op::Insert(h, i, p)),
            (0..4u8, 0..4u8, 0..2u8).prop_map(|(h, i, p)| Op::Remove(h, i, p)),
            (0..4u8).prop_map(Op::RemoveHolder),
            (0..4u8).prop_map(Op::RemoveIssuedBy),
        ]
    }

    proptest! {
        /// The table answers as a plain set of pairs would, its issuer
        /// index always names exactly the holders of each issuer's grants,
        /// and each giver's count is what it gave.
        #[test]
        fn agrees_with_a_set_of_pairs(ops in proptest::collection::vec(op(), 0..60)) {
            let mut t = CapTable::<ProcessId, u8>::default();
            let mut model: HashMap<(ProcessId, Capability), u8> = HashMap::new();
            for op in ops {
                match op {
                    Op::Insert(h, i, p) => {
                        let giver = (h + p) % 2;
                        let new = !model.contains_key(&(id(h), cap(i, p)));
                        model.entry((id(h), cap(i, p))).or_insert(giver);
                        prop_assert_eq!(t.give(&id(h), cap(i, p), giver), new);
                    }
                    Op::Remove(h, i, p) => {
                        let had = model.remove(&(id(h), cap(i, p))).is_some();
                        prop_assert_eq!(t.remove(&id(h), &cap(i, p)), had);
                    }
                    Op::RemoveHolder(h) => {
                        let n = t.remove_holder(&id(h)).len();
                        let before = model.len();
                        model.retain(|(x, _), _| x != &id(h));
                        prop_assert_eq!(n, before - model.len());
                    }
                    Op::RemoveIssuedBy(i) => {
                        let issuer = cap(i, 0).issuer;
                        let n = t.remove_issued_by(&issuer).len();
                        let before = model.len();
                        model.retain(|(_, c), _| c.issuer != issuer);
                        prop_assert_eq!(n, before - model.len());
                    }
                }
                let pairs: HashSet<(ProcessId, Capability)> =
                    t.pairs().map(|(h, c)| (h.clone(), c)).collect();
                for (h, c) in model.keys() {
                    prop_assert!(t.holds(h, c));
                }
                prop_assert_eq!(&pairs, &model.keys().cloned().collect());
                for g in 0..2u8 {
                    let gave = model.values().filter(|&&x| x == g).count();
                    prop_assert_eq!(t.given_by(&g), gave);
                }
                let mut index: HashMap<Address, HashSet<ProcessId>> = HashMap::new();
                for (h, c) in model.keys() {
                    index.entry(c.issuer.clone()).or_default().insert(h.clone());
                }
                prop_assert_eq!(&t.issued, &index);
            }
        }
    }
}
