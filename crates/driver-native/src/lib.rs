//! # spindle-driver-native: executables as supervised OS children
//!
//! The kernel decides *that* a run starts or stops; this driver does it with
//! real processes, and tells the kernel when a run's main process has exited.
//!
//! - **Spawn** ([`spawn`]): the executable is resolved first (a clear error
//!   names a missing one and the `PATH` searched). The child is cloned
//!   sharing the daemon's memory until it execs (`CLONE_VM | CLONE_VFORK`,
//!   like `posix_spawn`), so a daemon with a large address space (the wasm
//!   instance pool) starts children as fast as a small one. It gets its own
//!   session and process group, `PR_SET_PDEATHSIG(SIGKILL)` so it dies with
//!   the daemon, a clean signal mask and default signal dispositions (an
//!   ignored SIGPIPE is not inherited), stdin from `/dev/null`, stdout and
//!   stderr into pipes, and `SPINDLE_TAG=<node>.<id>` in its environment.
//! - **Cgroups** ([`cgroup`]): where a writable cgroup v2 hierarchy exists,
//!   each run also gets a cgroup of its own, joined before exec; its members
//!   are exactly the run's processes, whatever they do.
//! - **Trees** ([`tree`]): the daemon is a child subreaper, so orphans of a
//!   managed process (double-forked daemons included) are re-parented to it
//!   rather than to init. A run's tree is found in one `/proc` scan: the main
//!   process, its process group and session, every process descending from it
//!   by parent links, and every orphan adopted by the daemon whose environment
//!   carries the run's tag — and their descendants. A stop signals the whole
//!   tree; SIGKILL after the grace does too; when the main process exits on its
//!   own, whatever it left behind is killed at once, so a restart can never
//!   meet a copy of its predecessor. A daemon that starts kills leftovers of an
//!   earlier one (found by the node tag) before starting anything.
//! - **Reaping**: one `waitpid(-1, WNOHANG)` loop per SIGCHLD reaps main
//!   processes (reported as exits) and adopted orphans (just reaped).
//! - **IPC channel**: a process on the message bus gets one end of a Unix
//!   socket pair as fd 3, with `NODE_CHANNEL_FD=3`, so a Node child's
//!   `process.send` works with no library; the daemon bridges the other end.
//! - **Logs** ([`capture`]): each stream is read by a task on the daemon's
//!   runtime into one shared scratch buffer and fed to a `spindle_logs::LineSink`.
//! - **Usage** ([`stats`]): CPU and resident memory of a run's main process,
//!   read from `/proc`, for `ls` and memory caps.
//!
//! Everything here runs on the daemon's single control thread (`PDEATHSIG` is
//! tied to the thread that created the child, so spawning must stay on that thread).

pub mod capture;
pub mod cgroup;
pub mod spawn;
pub mod stats;
pub mod tree;

mod driver;

pub use driver::{DriverEvent, NativeDriver, Spawned, Usage, child_signal};
pub use spawn::SpawnError;

/// Environment variable carrying a run's tag (`<node tag>.<process id>`).
pub const TAG_VAR: &str = "SPINDLE_TAG";
/// Environment variable carrying the process's numeric id.
pub const ID_VAR: &str = "SPINDLE_ID";
/// Environment variable carrying the address of a process on the bus.
pub const ADDRESS_VAR: &str = "SPINDLE_ADDRESS";
/// Environment variable naming the directory where a process on the bus
/// keeps its durable state (the node's `state/`, shared with wasm processes).
pub const STATE_DIR_VAR: &str = "SPINDLE_STATE_DIR";
/// Environment variable carrying the watchdog period (ms) of a process with
/// a heartbeat: client libraries send heartbeats well within it.
pub const HEARTBEAT_VAR: &str = "SPINDLE_HEARTBEAT_MS";
/// The child's descriptor for its IPC channel (where Node looks for it).
pub const CHANNEL_FD: i32 = 3;
