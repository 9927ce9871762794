//! # spindle-types: the vocabulary every other layer speaks
//!
//! This crate holds the data Spindle is made of and nothing that touches the
//! outside world: no files, no sockets, no clocks of its own.
//!
//! - [`id`]: process numbers (the unique handle `ls` shows), names (optional,
//!   repeatable), selectors (`all`, an id, or a name), and the Kinode-style
//!   `package:publisher`, `process:package:publisher`, `node@process:…` ids.
//! - [`units`]: durations (`100ms`, `30m`) and sizes (`512MiB`) as users write them.
//! - [`restart`]: the restart schedule, a pure function of (attempt, uptime).
//! - [`exit`]: how a run ended (`Completed`, `Crashed`, `Killed`, `Shutdown`) and
//!   the on-exit policy that decides what happens next.
//! - [`spec`]: a fully validated description of one process, as the daemon
//!   persists and runs it.
//! - [`manifest`]: the TOML manifest and the command-line flags that mirror it,
//!   turned into specs with errors that name the key and the fix.
//! - [`control`]: the versioned control protocol between client and daemon.
//!
//! Everything is `serde`-serialisable so the same types cross the control socket
//! and land in the persisted process table.

pub mod control;
pub mod exit;
pub mod fault;
pub mod id;
pub mod limits;
pub mod manifest;
pub mod restart;
pub mod spec;
pub mod units;

pub use exit::{ExitInfo, ExitReason, ExitStatus, OnExit};
pub use id::{Address, PackageId, ProcessId, ProcessNum, Selector};
pub use restart::{RestartDecision, RestartSchedule};
pub use spec::{LogSpec, ProcessSpec, Program};
