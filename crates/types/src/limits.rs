//! Limits shared by more than one crate, each defined once with its reason.
pub use spindle_abi::{DEFAULT_AWAIT, MAILBOX_WAIT, MAX_AWAIT};

/// Bytes (bodies, metadata and blobs) a mailbox may hold unless its spec
/// says otherwise (`mailbox_size`): past it a sender gets `mailbox-full`,
/// so a flood of large messages to a busy process is held back by its
/// senders instead of growing the node.
pub const MAILBOX_BYTES: u64 = 64 << 20;
/// Bytes all mailboxes of the node may hold together; no one mailbox may
/// be given more.
pub const NODE_QUEUED_BYTES: u64 = 1 << 30;
/// Smallest mailbox a spec may ask for: room for a few ordinary messages.
pub const MIN_MAILBOX_BYTES: u64 = 64 << 10;
/// Children a process may have at once unless its spec says otherwise
/// (`max_children`): a fan-out of workers fits; a spawn loop stops here.
pub const MAX_CHILDREN: u32 = 1_000;
/// Processes spawned by the processes of one package, at once: no one
/// process may be given more children than this.
pub const MAX_PACKAGE_SPAWNED: u32 = 4_096;
