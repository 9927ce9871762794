//! # spindle-daemon: one node
//!
//! Composes the kernel, the native driver, log capture and the control socket
//! into the long-running daemon. [`run`] boots a node in its home directory
//! (`$SPINDLE_HOME`, default `~/.spindle`) and serves until told to stop.
//!
//! Boot, in order: create the home (mode 0700); take `daemon.lock` (one daemon
//! per home, ever); read the table from `node.db`; kill whatever an earlier daemon of this
//! node left running (it may have been SIGKILLed: its direct children died by
//! `PDEATHSIG`, its double-forked grandchildren are found by their tag); bind
//! `spindle.sock` (mode 0600); become a child subreaper; restart what the table
//! says should run.
//!
//! One task owns the kernel and the driver: the control loop ([`node`]) waits
//! on control requests, SIGCHLD, the kernel's next deadline, a one-second
//! usage sampler and SIGTERM/SIGINT; every input goes to the kernel, whose
//! effects are then carried out in order. Lifecycle changes are therefore
//! ordered and race-free without locks. Control connections ([`server`]) are
//! tasks of their own that only parse, forward and write back; log followers
//! read from per-process broadcast channels and never touch the loop.
//!
//! The table is persisted as rows of the node's journal ([`table`]): after
//! every step of the loop, the rows that changed are staged and committed
//! (group commit) — whenever what should run changes, not on every exit.
//! Shutdown stops every process gracefully (reason `Shutdown`), keeps them
//! marked to run, writes the table, and removes the socket.

pub mod budget;
pub mod node;
pub mod owner;
pub mod server;
pub mod table;
pub mod trace;

use std::path::{Path, PathBuf};

pub use node::run;
pub use spindle_driver_wasm::{Compiler, compiler};

/// Where a node keeps its files.
#[derive(Debug, Clone)]
pub struct Paths {
    pub home: PathBuf,
    pub socket: PathBuf,
    pub lock: PathBuf,
    /// The node's records: the process table and the capabilities
    /// (see [`table`] and `spindle_bus::persist`).
    pub journal: PathBuf,
    /// Where earlier versions kept the table and the capabilities; read
    /// once, imported, and renamed `<name>.imported`.
    pub legacy_table: PathBuf,
    pub legacy_capabilities: PathBuf,
    pub logs: PathBuf,
    pub daemon_log: PathBuf,
    /// The `kv` and `sqlite` modules' databases (see `spindle_db`).
    pub db: PathBuf,
    /// The `vfs` module's drives (see `spindle_vfs`).
    pub vfs: PathBuf,
}

impl Paths {
    pub fn new(home: &Path) -> Paths {
        Paths {
            home: home.to_path_buf(),
            socket: home.join("spindle.sock"),
            lock: home.join("daemon.lock"),
            journal: home.join("node.db"),
            legacy_table: home.join("table.json"),
            legacy_capabilities: home.join("capabilities.json"),
            logs: home.join("logs"),
            daemon_log: home.join("daemon.log"),
            db: home.join("db"),
            vfs: home.join("vfs"),
        }
    }
}

/// Why the daemon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(
        "another daemon already runs for {0} (it holds daemon.lock): use it, or `spindle daemon stop` first"
    )]
    AlreadyRunning(PathBuf),
    #[error("cannot use home directory {path}: {source}")]
    Home {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Table(#[from] table::TableError),
    #[error(transparent)]
    Capabilities(#[from] spindle_bus::persist::CapsFileError),
    #[error(transparent)]
    Journal(#[from] spindle_store::journal::JournalError),
    #[error("cannot import into {path}: {why} (the files of the earlier version are kept)")]
    Import { path: PathBuf, why: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the runtime modules could not start: {0}")]
    Modules(#[from] spindle_db::StartError),
    #[error("the timer module could not start: {0}")]
    Timers(#[from] spindle_timer::StartError),
    #[error("the vfs module could not start: {0}")]
    Vfs(#[from] spindle_vfs::StartError),
    #[error(transparent)]
    Wasm(#[from] spindle_driver_wasm::runtime::WasmError),
    #[error("cannot watch owner process {pid}: {source} (an owned node serves a running app)")]
    Owner { pid: u32, source: std::io::Error },
}
