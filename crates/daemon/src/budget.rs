//! What processes may start on their own: children per parent, processes
//! per package, and the room the node keeps for everyone else.
//!
//! Children count while they are in the table, whatever their state.
//! Only spawns made by processes are counted against these budgets; the
//! operator's starts are not, and a share of the wasm pool
//! ([`OPERATOR_RESERVE`]) is kept out of processes' reach so one package
//! spawning without end can never stop another package — or the operator
//! — from starting processes. Exhausting a budget is an error to the
//! process that asked, naming the budget.

use spindle_driver_wasm::driver::address_of;
use spindle_kernel::{Entry, Kernel};
use spindle_types::ProcessId;

pub use spindle_types::limits::{MAX_CHILDREN, MAX_PACKAGE_SPAWNED};
/// Wasm pool slots that processes' own spawns may never take: kept for
/// the operator's starts and other packages' restarts.
pub const OPERATOR_RESERVE: usize = 512;

/// Why a process may not spawn now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    #[error(
        "{parent} already has {limit} children (its budget, `max_children`): wait for some to end, or reuse them"
    )]
    Children { parent: ProcessId, limit: u32 },
    #[error(
        "package {package} already runs {MAX_PACKAGE_SPAWNED} spawned processes (its budget): wait for some to end"
    )]
    Package { package: String },
    #[error(
        "the node is near its limit of {pool} wasm processes; the last {OPERATOR_RESERVE} are kept for the operator: try again later"
    )]
    Node { pool: usize },
}

/// The table's entry at address `id` on node `node`: found by name (or, for
/// an unnamed process, by the id its address carries), never by a scan.
pub fn entry_at<'k>(kernel: &'k Kernel, node: &str, id: &ProcessId) -> Option<&'k Entry> {
    let is_it = |e: &&Entry| address_of(node, e.num, &e.spec).is_some_and(|a| a.process == *id);
    kernel.named(&id.process).find(is_it).or_else(|| {
        let num = id.process.parse::<u64>().ok()?;
        kernel.get(spindle_types::ProcessNum(num)).filter(is_it)
    })
}

/// Checks that `parent` (on node `node`) may spawn one more child, given
/// the table's counts of its children and of its package's, and the wasm
/// processes running now (`live_wasm`, of a pool of `pool`): each a lookup,
/// whatever the table's size.
pub fn admit(
    kernel: &Kernel,
    node: &str,
    parent: &ProcessId,
    live_wasm: usize,
    pool: usize,
) -> Result<(), BudgetError> {
    let max_children =
        entry_at(kernel, node, parent).map_or(MAX_CHILDREN, |e| e.spec.budgets.max_children());
    // Every child in the table counts, running or not: one that stopped
    // itself for good still holds a row (transient ones leave).
    if kernel.children_of(parent) >= max_children {
        return Err(BudgetError::Children {
            parent: parent.clone(),
            limit: max_children,
        });
    }
    if kernel.spawned_in(&parent.package) >= MAX_PACKAGE_SPAWNED {
        return Err(BudgetError::Package {
            package: parent.package.to_string(),
        });
    }
    if live_wasm + OPERATOR_RESERVE >= pool {
        return Err(BudgetError::Node { pool });
    }
    Ok(())
}
