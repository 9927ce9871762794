//! How a run ended and what the process asked to happen then.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The raw status the OS (or a wasm runtime) reported for the main process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
    /// A wasm process trapped (panic, out-of-bounds, memory cap, killed).
    Trap,
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => write!(f, "signal {s}"),
            ExitStatus::Trap => f.write_str("trap"),
        }
    }
}

/// Why a run ended, as the kernel classifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitReason {
    /// Ran to completion: exit code 0 (or `init` returned).
    Completed,
    /// Non-zero exit, a signal nobody asked for, a trap, a panic, a limit.
    Crashed,
    /// Stopped or killed on purpose, by a user or by the kernel.
    Killed,
    /// The node (daemon) was stopping.
    Shutdown,
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ExitReason::Completed => "completed",
            ExitReason::Crashed => "crashed",
            ExitReason::Killed => "killed",
            ExitReason::Shutdown => "shutdown",
        })
    }
}

/// Everything recorded about the end of one run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    pub reason: ExitReason,
    pub status: Option<ExitStatus>,
    /// A human explanation when the status alone does not say it
    /// (e.g. "memory limit 512.0MiB exceeded", "executable not found").
    pub detail: Option<String>,
    /// Wall-clock time of the exit, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// How long the run lasted, in milliseconds.
    pub uptime_ms: u64,
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.reason)?;
        if let Some(s) = self.status {
            write!(f, " ({s})")?;
        }
        if let Some(d) = &self.detail {
            write!(f, ": {d}")?;
        }
        Ok(())
    }
}

/// What happens when a process exits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnExit {
    /// Never restarted.
    None,
    /// Restarted by the schedule after `Completed` or `Crashed`; never after `Killed`.
    #[default]
    Restart,
    /// Not restarted; the stored requests are sent on the process's behalf.
    /// (The messages carried are set by the process once the bus exists.)
    Requests(Vec<serde_json::Value>),
}

impl OnExit {
    /// Whether a run that ended for `reason` should be restarted.
    pub fn restarts_after(&self, reason: ExitReason) -> bool {
        matches!(self, OnExit::Restart)
            && matches!(reason, ExitReason::Completed | ExitReason::Crashed)
    }

    pub fn label(&self) -> &'static str {
        match self {
            OnExit::None => "none",
            OnExit::Restart => "restart",
            OnExit::Requests(_) => "requests",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_is_never_honoured_after_kill() {
        use ExitReason::*;
        let r = OnExit::Restart;
        assert!(r.restarts_after(Completed));
        assert!(r.restarts_after(Crashed));
        assert!(!r.restarts_after(Killed));
        assert!(!r.restarts_after(Shutdown));
        for reason in [Completed, Crashed, Killed, Shutdown] {
            assert!(!OnExit::None.restarts_after(reason));
            assert!(!OnExit::Requests(vec![]).restarts_after(reason));
        }
    }
}
