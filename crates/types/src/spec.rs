//! A validated description of one process: what to run, how to log it, when
//! to restart it and how to stop it. Paths in a spec are absolute: relative
//! paths were resolved against the manifest (or the caller's directory) when
//! the spec was made.

use crate::exit::OnExit;
use crate::id::{PackageId, ProcessId, validate_name};
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
/// Smallest rotation size: a rotated file must hold whole lines.
pub const MIN_LOG_MAX_SIZE: u64 = 4096;
/// Largest linear memory a wasm process may have: the instance pool
/// reserves this much address space for every slot.
pub const MAX_WASM_MEMORY: u64 = 256 << 20;
/// Longest grace a stop may give: a stop that waits longer is a hang.
pub const MAX_GRACE: Duration = Duration::from_secs(3600);
/// Longest delay a restart schedule may name.
pub const MAX_RESTART_DELAY: Duration = Duration::from_secs(24 * 3600);
/// Longest watchdog period.
pub const MAX_HEARTBEAT: Duration = Duration::from_secs(24 * 3600);
/// Steps a restart schedule may have.
pub const MAX_RESTART_STEPS: usize = 64;
/// On-exit requests a process may leave (each is sent when it ends).
pub const MAX_EXIT_REQUESTS: usize = 64;

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
    /// The process that spawned it (its children count against its budget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ProcessId>,
    #[serde(default, skip_serializing_if = "Budgets::is_default")]
    pub budgets: Budgets,
    /// Holds the network right while it runs (`--network`): it may send to
    /// and be reached from processes on other nodes. A spawned child has it
    /// only if its parent passes it on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub network: bool,
}

/// A process's own budgets; `None` takes the node's default
/// ([`crate::limits`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budgets {
    /// Children it may have at once (`max_children`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_children: Option<u32>,
    /// Bytes its mailbox may hold (`mailbox_size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mailbox_bytes: Option<u64>,
}

impl Budgets {
    pub fn is_default(&self) -> bool {
        *self == Budgets::default()
    }

    pub fn max_children(&self) -> u32 {
        self.max_children.unwrap_or(crate::limits::MAX_CHILDREN)
    }

    pub fn mailbox_bytes(&self) -> u64 {
        self.mailbox_bytes.unwrap_or(crate::limits::MAILBOX_BYTES)
    }
}

/// A rule a spec breaks: the manifest key at fault, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub key: &'static str,
    pub message: String,
}

fn broken(key: &'static str, message: impl Into<String>) -> Result<(), Broken> {
    Err(Broken {
        key,
        message: message.into(),
    })
}

fn plain_text(key: &'static str, what: &str, text: &str) -> Result<(), Broken> {
    if text.contains('\0') {
        return broken(key, format!("{what} {text:?} contains a NUL byte"));
    }
    Ok(())
}

impl ProcessSpec {
    /// The rules every spec obeys however it was made (a manifest, flags, a
    /// process's spawn, any client of the control socket): the daemon checks
    /// each spec it is given, whoever built it.
    pub fn check(&self) -> Result<(), Broken> {
        if let Some(n) = &self.name {
            validate_name(n).map_err(|e| Broken {
                key: "name",
                message: e.to_string(),
            })?;
        }
        match &self.program {
            Program::Native {
                command,
                args,
                cwd,
                ipc,
            } => {
                if command.trim().is_empty() {
                    return broken("command", "empty: say what to run");
                }
                plain_text("command", "command", command)?;
                for a in args {
                    plain_text("args", "argument", a)?;
                }
                if !cwd.is_absolute() {
                    return broken("cwd", format!("{} is not an absolute path", cwd.display()));
                }
                if let Some(h) = ipc.as_ref().and_then(Ipc::heartbeat)
                    && !(MIN_HEARTBEAT..=MAX_HEARTBEAT).contains(&h)
                {
                    return broken(
                        "heartbeat",
                        format!(
                            "{} ms: give 1s to {}h",
                            h.as_millis(),
                            MAX_HEARTBEAT.as_secs() / 3600
                        ),
                    );
                }
            }
            Program::Wasm { path, .. } => {
                if !path.is_absolute() {
                    return broken(
                        "wasm",
                        format!("{} is not an absolute path", path.display()),
                    );
                }
                if let Some(m) = self.max_memory
                    && m > MAX_WASM_MEMORY
                {
                    return broken(
                        "max_memory",
                        format!(
                            "{m} bytes is above a wasm process's {} MiB: give 256MiB or less",
                            MAX_WASM_MEMORY >> 20
                        ),
                    );
                }
            }
        }
        for (key, value) in &self.env {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return broken(
                    "env",
                    format!("invalid variable name {key:?}: names cannot be empty or contain `=`"),
                );
            }
            plain_text("env", "value", value)?;
        }
        if self.grace > MAX_GRACE {
            return broken(
                "grace",
                format!(
                    "{:?} is longer than the {}h a stop may wait",
                    self.grace,
                    MAX_GRACE.as_secs() / 3600
                ),
            );
        }
        if self.restart.delays.len() > MAX_RESTART_STEPS {
            return broken(
                "restart_at",
                format!(
                    "{} steps: give at most {MAX_RESTART_STEPS} (the last one repeats)",
                    self.restart.delays.len()
                ),
            );
        }
        if let Some(d) = self.restart.delays.iter().find(|d| **d > MAX_RESTART_DELAY) {
            return broken(
                "restart_at",
                format!("{d:?} is longer than a day: give at most 24h"),
            );
        }
        if self.log.max_size < MIN_LOG_MAX_SIZE {
            return broken(
                "log_max_size",
                format!(
                    "{} bytes is below the 4KiB minimum: a rotated file must hold whole lines",
                    self.log.max_size
                ),
            );
        }
        for (key, p) in [("log", &self.log.out), ("err_log", &self.log.err)] {
            if let Some(p) = p
                && !p.is_absolute()
            {
                return broken(key, format!("{} is not an absolute path", p.display()));
            }
        }
        use crate::limits::{MAX_PACKAGE_SPAWNED, MIN_MAILBOX_BYTES, NODE_QUEUED_BYTES};
        if self.budgets.max_children() > MAX_PACKAGE_SPAWNED {
            return broken(
                "max_children",
                format!(
                    "{} is more than a package may spawn ({MAX_PACKAGE_SPAWNED})",
                    self.budgets.max_children()
                ),
            );
        }
        if !(MIN_MAILBOX_BYTES..=NODE_QUEUED_BYTES).contains(&self.budgets.mailbox_bytes()) {
            return broken(
                "mailbox_size",
                format!(
                    "{} bytes: give 64KiB to 1GiB (the node's budget for all mailboxes)",
                    self.budgets.mailbox_bytes()
                ),
            );
        }
        if let OnExit::Requests(list) = &self.on_exit
            && list.len() > MAX_EXIT_REQUESTS
        {
            return broken(
                "on_exit",
                format!(
                    "{} on-exit requests: at most {MAX_EXIT_REQUESTS}",
                    list.len()
                ),
            );
        }
        Ok(())
    }

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
