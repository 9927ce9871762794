//! # spindle-abi: what a process and its node agree on
//!
//! The names and numbers both sides of the process boundary use, defined
//! once: the node's crates use them, and so does the guest library
//! (`spindle_process`), which is built for wasm and must not depend on the
//! node. Nothing here does I/O or has a dependency.

use std::time::Duration;

/// Metadata of the request the node sends a process to ask it to stop
/// (before its grace runs out and it is killed).
pub const STOPPING_METADATA: &str = r#"{"spindle":"stopping"}"#;

/// `params` of the right to send requests to a process: the capability
/// `{issuer: <that process>, params: "\"messaging\""}`.
pub const MESSAGING_PARAMS: &str = "\"messaging\"";

/// The node's kernel, as a process sees it: the source of the stop request.
pub const KERNEL_PROCESS: &str = "kernel";
/// Issuer of the network right: `local@net:sys:spindle`.
pub const NETWORK_PROCESS: &str = "net";
/// `params` of the network right (send to and be reached from other nodes).
pub const NETWORK_PARAMS: &str = "\"network\"";
/// The package (`sys:spindle`) of the node's own processes and modules.
pub const SYSTEM_PACKAGE: &str = "sys";
pub const SYSTEM_PUBLISHER: &str = "spindle";

/// Timeout of a request that awaits a response and names none.
pub const DEFAULT_AWAIT: Duration = Duration::from_secs(5);

/// Longest a response may be awaited (a process's, or `spindle send`'s): a
/// longer timeout a process asks for is taken as this; the CLI refuses one.
pub const MAX_AWAIT: Duration = Duration::from_secs(7 * 24 * 3600);

/// A right to a module's resource (a database, a drive), as its owner
/// grants it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    Read,
    /// Includes read.
    Write,
}

impl Access {
    pub fn name(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
        }
    }

    pub fn parse(text: &str) -> Option<Access> {
        match text {
            "read" => Some(Access::Read),
            "write" => Some(Access::Write),
            _ => None,
        }
    }
}

/// The node's runtime modules, by process name (package `sys:spindle`).
pub mod module {
    pub const KV: &str = "kv";
    pub const SQLITE: &str = "sqlite";
    pub const TIMER: &str = "timer";
    pub const VFS: &str = "vfs";
}

/// How long a send may wait for room in a full mailbox, per try, before it
/// is `mailbox-full`.
pub const MAILBOX_WAIT: Duration = Duration::from_millis(100);

/// Why a message was not delivered, as every protocol of the node spells it
/// (WIT, IPC frames, the control socket, the clients).
pub mod kind {
    /// No process at that address (or it left the bus).
    pub const OFFLINE: &str = "offline";
    /// No response within the request's timeout.
    pub const TIMEOUT: &str = "timeout";
    /// The target is not public and the sender holds no messaging right to it.
    pub const NO_CAPABILITY: &str = "no-capability";
    /// The target's mailbox stayed full (or the sender's own budget is spent).
    pub const MAILBOX_FULL: &str = "mailbox-full";
    /// Nothing to respond to, a malformed message, or a forged capability.
    pub const INVALID: &str = "invalid";
    /// The target ended while it held the request, before it responded.
    pub const EXITED: &str = "exited";
    /// Every kind.
    pub const ALL: [&str; 6] = [
        OFFLINE,
        TIMEOUT,
        NO_CAPABILITY,
        MAILBOX_FULL,
        INVALID,
        EXITED,
    ];
}
