//! Limits shared by more than one crate, each defined once with its reason.

use std::time::Duration;

/// Timeout of a request that awaits a response and names none.
pub const DEFAULT_AWAIT: Duration = Duration::from_secs(5);
/// Longest a response may be awaited (a process's, or `spindle send`'s): a
/// longer timeout a process asks for is taken as this; the CLI refuses one.
pub const MAX_AWAIT: Duration = Duration::from_secs(7 * 24 * 3600);
