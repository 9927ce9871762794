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
use spindle_kernel::{Desired, Kernel};
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

/// Checks that `parent` (on node `node`) may spawn one more child, given
/// the table: one pass counts its children, its package's, the live wasm
/// processes, and finds its own budget (`max_children`).
pub fn admit(
    kernel: &Kernel,
    node: &str,
    parent: &ProcessId,
    pool: usize,
) -> Result<(), BudgetError> {
    let mut children = 0;
    let mut package = 0;
    let mut wasm = 0;
    let mut max_children = MAX_CHILDREN;
    for e in kernel.entries() {
        if address_of(node, e.num, &e.spec).is_some_and(|a| a.process == *parent) {
            max_children = e.spec.budgets.max_children();
        }
        let live = e.state.is_live() || e.desired == Desired::Running;
        if live && matches!(e.spec.program, spindle_types::Program::Wasm { .. }) {
            wasm += 1;
        }
        // Every child in the table counts, running or not: one that stopped
        // itself for good still holds a row (transient ones leave).
        let Some(p) = &e.spec.parent else { continue };
        if p == parent {
            children += 1;
        }
        if p.package == parent.package {
            package += 1;
        }
    }
    if children >= max_children as usize {
        return Err(BudgetError::Children {
            parent: parent.clone(),
            limit: max_children,
        });
    }
    if package >= MAX_PACKAGE_SPAWNED as usize {
        return Err(BudgetError::Package {
            package: parent.package.to_string(),
        });
    }
    if wasm + OPERATOR_RESERVE >= pool {
        return Err(BudgetError::Node { pool });
    }
    Ok(())
}
