//! A validated description of one process: what to run, how to log it, when
//! to restart it and how to stop it. Paths in a spec are absolute: relative
//! paths were resolved against the manifest (or the caller's directory) when
//! the spec was made.

use crate::exit::OnExit;
use crate::id::PackageId;
use crate::restart::RestartSchedule;
use crate::units::serde_millis;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default grace between the polite stop request and SIGKILL.
pub const DEFAULT_GRACE: Duration = Duration::from_millis(200);
/// Default size at which a log file is rotated (rotation never splits a line).
pub const DEFAULT_LOG_MAX_SIZE: u64 = 64 << 20;
/// Default number of rotated log files kept beside the live one.
pub const DEFAULT_LOG_KEEP: u32 = 3;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessSpec {
    pub name: Option<String>,
    pub program: Program,
    /// Variables added to (or overriding) the daemon's environment.
    pub env: BTreeMap<String, String>,
    pub log: LogSpec,
    pub restart: RestartSchedule,
    pub on_exit: OnExit,
    #[serde(with = "serde_millis")]
    pub grace: Duration,
    pub stop_signal: StopSignal,
    /// Resident-memory cap in bytes; a process above it is restarted as crashed.
    pub max_memory: Option<u64>,
    /// Removed from the table once it ends for good (a transaction spawned by
    /// another process), so short-lived children do not pile up.
    #[serde(default)]
    pub transient: bool,
}

impl ProcessSpec {
    /// The files stdout and stderr go to, for the process numbered `num`,
    /// in the node's `logs_dir`.
    pub fn log_paths(&self, logs_dir: &Path, num: u64) -> (PathBuf, PathBuf) {
        let label = self.name.clone().unwrap_or_else(|| self.program.label());
        self.log.paths(logs_dir, &label, num)
    }
}

/// What runs: an executable as an OS child, or a wasm component in-process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Program {
    Native {
        /// As written: a bare name is looked up in `PATH`, anything with a `/`
        /// is an absolute path.
        command: String,
        args: Vec<String>,
        cwd: PathBuf,
        /// On the message bus through an IPC channel (fd 3, spoken like
        /// Node's), at `node@<name or id>:<package>`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ipc: Option<Ipc>,
    },
    Wasm {
        /// The component file (absolute).
        path: PathBuf,
        /// The package the process belongs to: its address is
        /// `node@<name or id>:<package>`.
        package: PackageId,
        /// Any local process may message a public one; others need its
        /// messaging capability.
        public: bool,
    },
}

/// How a native process takes part in messaging.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipc {
    /// Its address is `node@<name or id>:<package>`.
    pub package: PackageId,
    /// Any local process may message a public one.
    pub public: bool,
    /// Watchdog: a run that sends nothing on its channel for this many
    /// milliseconds is taken as hung, killed and restarted as crashed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_ms: Option<u64>,
}

/// Shortest watchdog period: the daemon looks at its watchdogs once a second.
pub const MIN_HEARTBEAT: Duration = Duration::from_secs(1);

impl Ipc {
    pub fn heartbeat(&self) -> Option<Duration> {
        self.heartbeat_ms.map(Duration::from_millis)
    }
}

impl Program {
    /// The package a process on the bus belongs to, and whether it is
    /// public; `None` for a native process without an IPC channel.
    pub fn bus(&self) -> Option<(&PackageId, bool)> {
        match self {
            Program::Native { ipc: Some(i), .. } => Some((&i.package, i.public)),
            Program::Native { ipc: None, .. } => None,
            Program::Wasm {
                package, public, ..
            } => Some((package, *public)),
        }
    }
}

/// Package of processes on the bus started without one.
pub const DEFAULT_PACKAGE: &str = "app:local";

impl Program {
    /// A short label for tables: the command's file name.
    pub fn label(&self) -> String {
        match self {
            Program::Native { command, .. } => Path::new(command)
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| command.clone()),
            Program::Wasm { path, .. } => path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "wasm".into()),
        }
    }

    /// The whole command line, for display.
    pub fn display(&self) -> String {
        match self {
            Program::Native { command, args, .. } => std::iter::once(command.as_str())
                .chain(args.iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join(" "),
            Program::Wasm { path, .. } => path.display().to_string(),
        }
    }
}

/// Where output goes and how it is shaped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogSpec {
    /// stdout (and stderr, unless `err` is set). `None`: a file per stream in the
    /// node's log directory.
    pub out: Option<PathBuf>,
    /// stderr, when it should be kept apart from `out`.
    pub err: Option<PathBuf>,
    pub strip_ansi: bool,
    pub timestamps: bool,
    pub max_size: u64,
    pub keep: u32,
}

impl Default for LogSpec {
    fn default() -> Self {
        LogSpec {
            out: None,
            err: None,
            strip_ansi: false,
            timestamps: false,
            max_size: DEFAULT_LOG_MAX_SIZE,
            keep: DEFAULT_LOG_KEEP,
        }
    }
}

impl LogSpec {
    /// The files stdout and stderr are written to, for the process numbered
    /// `num` with display label `label`, in the node's `logs_dir`.
    pub fn paths(&self, logs_dir: &Path, label: &str, num: u64) -> (PathBuf, PathBuf) {
        match (&self.out, &self.err) {
            (Some(out), Some(err)) => (out.clone(), err.clone()),
            (Some(out), None) => (out.clone(), out.clone()),
            (None, err) => (
                logs_dir.join(format!("{label}-{num}-out.log")),
                err.clone()
                    .unwrap_or_else(|| logs_dir.join(format!("{label}-{num}-err.log"))),
            ),
        }
    }
}

/// The signal sent to ask a process to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum StopSignal {
    #[default]
    SIGTERM,
    SIGINT,
    SIGHUP,
    SIGQUIT,
    SIGUSR1,
    SIGUSR2,
    SIGKILL,
}

impl std::str::FromStr for StopSignal {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let up = s.trim().to_ascii_uppercase();
        let bare = up.strip_prefix("SIG").unwrap_or(&up);
        Ok(match bare {
            "TERM" => StopSignal::SIGTERM,
            "INT" => StopSignal::SIGINT,
            "HUP" => StopSignal::SIGHUP,
            "QUIT" => StopSignal::SIGQUIT,
            "USR1" => StopSignal::SIGUSR1,
            "USR2" => StopSignal::SIGUSR2,
            "KILL" => StopSignal::SIGKILL,
            _ => {
                return Err(format!(
                    "unknown signal {s:?}: use one of SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGKILL"
                ));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_paths() {
        let dir = Path::new("/h/logs");
        let mut l = LogSpec::default();
        assert_eq!(
            l.paths(dir, "api", 3),
            (dir.join("api-3-out.log"), dir.join("api-3-err.log"))
        );
        l.out = Some("/x/merged.log".into());
        assert_eq!(
            l.paths(dir, "api", 3),
            ("/x/merged.log".into(), "/x/merged.log".into())
        );
        l.err = Some("/x/err.log".into());
        assert_eq!(
            l.paths(dir, "api", 3),
            ("/x/merged.log".into(), "/x/err.log".into())
        );
    }

    #[test]
    fn signals() {
        assert_eq!("SIGTERM".parse::<StopSignal>(), Ok(StopSignal::SIGTERM));
        assert_eq!("int".parse::<StopSignal>(), Ok(StopSignal::SIGINT));
        assert!(
            "SIGFOO"
                .parse::<StopSignal>()
                .unwrap_err()
                .contains("SIGTERM")
        );
    }
}
