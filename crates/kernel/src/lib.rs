//! # spindle-kernel: the process table and its lifecycle
//!
//! The kernel decides; drivers act. It owns the table of processes and moves
//! each one through its states (`Starting → Running → Stopping → Backoff /
//! Stopped`), applying the on-exit policy and the restart schedule. It never
//! makes an OS call, never reads a clock and never spawns a task: every input
//! carries the current `Instant`, and every decision comes out as an
//! [`Effect`] for the caller to carry out (spawn this run, ask that one to
//! stop, SIGKILL a tree, persist the table). That makes the whole of
//! supervision testable with a fake driver and a manual clock, and lets the
//! daemon run it on one task so lifecycle changes are ordered and race-free.
//!
//! How it is driven (the daemon's loop):
//! 1. a command (`start`, `stop`, `restart`, `delete`, `shutdown`) or a driver
//!    event (`spawned`, `exited`) comes in with `now`;
//! 2. the caller drains [`Kernel::take_effects`] and executes them in order,
//!    feeding results back (a `Spawn` yields `spawned`);
//! 3. it sleeps until [`Kernel::next_deadline`] and calls [`Kernel::tick`].
//!
//! Runs are numbered: every spawn gets a fresh `RunId`, and events for a run
//! that is no longer current are ignored, so a late exit can never touch a
//! newer run. A process has at most one live run at a time.
//!
//! What it does not do: signals, pipes, logs, files. Persistence is the
//! [`TableChanges`] the daemon takes after each step and writes as rows
//! (a transient child that never restarts is never written); message routing between
//! processes is not the kernel task's job (it must not funnel through here).

mod kernel;
mod snapshot;

pub use kernel::{
    AfterStop, Effect, Entry, Kernel, KernelError, RunId, State, StopCause, TableChanges,
};
pub use snapshot::{Desired, SavedProcess, TABLE_VERSION, TableMeta, TableSnapshot};
