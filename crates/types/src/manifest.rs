//! The TOML manifest (`[[process]]` tables) and the command-line flags that
//! mirror its keys, turned into validated [`ProcessSpec`]s.
//!
//! Validation is all-or-nothing: one bad key anywhere and no spec comes out,
//! so nothing is started half-way. Every error names the process, the key and
//! what a valid value looks like. Relative paths are resolved against `base`
//! (the manifest's directory, or the caller's working directory for flags);
//! this module does no I/O — whether an executable exists is the daemon's check.

use crate::exit::OnExit;
use crate::id::{PackageId, validate_name};
use crate::restart::RestartSchedule;
use crate::spec::{DEFAULT_GRACE, DEFAULT_PACKAGE, LogSpec, ProcessSpec, Program, StopSignal};
use crate::units::{parse_duration, parse_size};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One `[[process]]` table as written, before validation. The CLI builds the
/// same struct from its flags.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProcess {
    pub name: Option<String>,
    pub command: Option<String>,
    /// A wasm component to run instead of a command.
    pub wasm: Option<String>,
    /// The package (`package:publisher`) of a process on the message bus.
    pub package: Option<String>,
    /// Whether any local process may message this process.
    pub public: Option<bool>,
    /// Whether it may send to and be reached from processes on other nodes.
    pub network: Option<bool>,
    /// A native process gets an IPC channel to the message bus (Node's
    /// `process.send` works with no library).
    pub ipc: Option<bool>,
    /// Watchdog period of a process with `ipc`: silent this long, it is hung.
    pub heartbeat: Option<String>,
    #[serde(default)]
    pub args: Vec<String>,
    pub cwd: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub log: Option<String>,
    pub err_log: Option<String>,
    pub restart_at: Option<Vec<DelayValue>>,
    pub restart_ok: Option<String>,
    pub on_exit: Option<String>,
    pub grace: Option<String>,
    pub stop_signal: Option<String>,
    pub strip_ansi: Option<bool>,
    pub timestamps: Option<bool>,
    pub max_memory: Option<String>,
    pub log_max_size: Option<String>,
    pub log_keep: Option<u32>,
    /// Children the process may have at once.
    pub max_children: Option<u32>,
    /// Bytes its mailbox may hold, e.g. `8MiB`.
    pub mailbox_size: Option<String>,
}

/// The package of a process on the message bus: as given, or the default;
/// never the node's own.
fn bus_package(given: Option<&str>) -> Result<PackageId, String> {
    let package = match given {
        Some(p) => p.parse::<PackageId>().map_err(|e| e.to_string())?,
        None => DEFAULT_PACKAGE.parse().expect("valid default package"),
    };
    if package.is_system() {
        return Err(format!(
            "`{package}` is reserved for the node itself: choose another package"
        ));
    }
    Ok(package)
}

/// A schedule entry: `"100ms"` or the bare integer `0`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DelayValue {
    Text(String),
    Int(i64),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    #[serde(default)]
    process: Vec<RawProcess>,
}

/// A value in a process description that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{at}: key `{key}`: {message}")]
pub struct SpecError {
    /// Which process: `process 2 ("api")`.
    pub at: String,
    pub key: &'static str,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{0}")]
    Toml(#[from] toml::de::Error),
    #[error("no processes: add at least one [[process]] table with a `command`")]
    Empty,
    #[error(transparent)]
    Spec(#[from] SpecError),
}

/// Reads a manifest's text into specs; relative paths resolve against `base`.
pub fn parse_manifest(text: &str, base: &Path) -> Result<Vec<ProcessSpec>, ManifestError> {
    let manifest: Manifest = toml::from_str(text)?;
    if manifest.process.is_empty() {
        return Err(ManifestError::Empty);
    }
    manifest
        .process
        .into_iter()
        .enumerate()
        .map(|(i, raw)| raw.into_spec(i + 1, base).map_err(ManifestError::from))
        .collect()
}

/// Joins `p` onto `base` unless absolute, and folds `.` and `..` lexically so
/// tables and errors show clean paths.
fn resolve(base: &Path, p: &str) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in base.join(p).components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

impl RawProcess {
    /// Validates and resolves this entry; `index` (1-based) names it in errors.
    pub fn into_spec(self, index: usize, base: &Path) -> Result<ProcessSpec, SpecError> {
        let at = match &self.name {
            Some(n) => format!("process {index} ({n:?})"),
            None => format!("process {index}"),
        };
        let err = |key: &'static str, message: String| SpecError {
            at: at.clone(),
            key,
            message,
        };
        if let Some(name) = &self.name {
            validate_name(name).map_err(|e| err("name", e.to_string()))?;
        }
        let cwd = match &self.cwd {
            Some(c) => resolve(base, c),
            None => base.to_path_buf(),
        };
        let program = match (self.command, self.wasm) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "wasm",
                    "give either `command` (an executable) or `wasm` (a component), not both"
                        .into(),
                ));
            }
            (Some(c), None) if !c.trim().is_empty() => {
                let ipc = self.ipc.unwrap_or(false);
                if !ipc
                    && (self.package.is_some() || self.public.is_some() || self.network.is_some())
                {
                    return Err(err(
                        if self.package.is_some() {
                            "package"
                        } else if self.public.is_some() {
                            "public"
                        } else {
                            "network"
                        },
                        "applies to processes on the message bus only (set `ipc = true`, or `wasm = \"app.wasm\"`)".into(),
                    ));
                }
                if !ipc && self.heartbeat.is_some() {
                    return Err(err(
                        "heartbeat",
                        "needs an IPC channel to arrive on: set `ipc = true`".into(),
                    ));
                }
                let heartbeat = match &self.heartbeat {
                    Some(h) => {
                        let d = parse_duration(h).map_err(|e| err("heartbeat", e.to_string()))?;
                        if d < crate::spec::MIN_HEARTBEAT {
                            return Err(err(
                                "heartbeat",
                                format!(
                                    "{h} is shorter than the watchdog's 1s look: use 1s or more"
                                ),
                            ));
                        }
                        Some(d.as_millis() as u64)
                    }
                    None => None,
                };
                let ipc = if ipc {
                    Some(crate::spec::Ipc {
                        package: bus_package(self.package.as_deref())
                            .map_err(|m| err("package", m))?,
                        public: self.public.unwrap_or(false),
                        heartbeat_ms: heartbeat,
                    })
                } else {
                    None
                };
                // A command with a slash is a path: resolve it now, against the
                // process's working directory, so the daemon runs exactly what was meant.
                let command = if c.contains('/') {
                    resolve(&cwd, &c).to_string_lossy().into_owned()
                } else {
                    c
                };
                Program::Native {
                    command,
                    args: self.args,
                    cwd: cwd.clone(),
                    ipc,
                }
            }
            (None, Some(w)) if !w.trim().is_empty() => {
                if !self.args.is_empty() {
                    return Err(err(
                        "args",
                        "a wasm process takes no arguments: send it a request instead".into(),
                    ));
                }
                if self.ipc.is_some() {
                    return Err(err(
                        "ipc",
                        "applies to native processes only: a wasm process is always on the bus"
                            .into(),
                    ));
                }
                let package =
                    bus_package(self.package.as_deref()).map_err(|m| err("package", m))?;
                Program::Wasm {
                    path: resolve(base, &w),
                    package,
                    public: self.public.unwrap_or(false),
                }
            }
            _ => {
                return Err(err(
                    "command",
                    "missing: say what to run, e.g. command = \"node\" (or wasm = \"app.wasm\")"
                        .into(),
                ));
            }
        };
        for key in self.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(err(
                    "env",
                    format!("invalid variable name {key:?}: names cannot be empty or contain `=`"),
                ));
            }
        }

        let mut restart = RestartSchedule::default();
        if let Some(delays) = self.restart_at {
            restart.delays = delays
                .iter()
                .map(|d| match d {
                    DelayValue::Int(0) => Ok(std::time::Duration::ZERO),
                    DelayValue::Int(n) => Err(format!(
                        "bare number {n}: give a unit, e.g. \"{n}ms\" (only 0 may stand alone)"
                    )),
                    DelayValue::Text(t) => parse_duration(t).map_err(|e| e.to_string()),
                })
                .collect::<Result<_, _>>()
                .map_err(|m| err("restart_at", m))?;
        }
        if let Some(ok) = &self.restart_ok {
            restart.ok = parse_duration(ok).map_err(|e| err("restart_ok", e.to_string()))?;
        }
        let on_exit = match self.on_exit.as_deref() {
            None | Some("restart") => OnExit::Restart,
            Some("none") => OnExit::None,
            Some("requests") => OnExit::Requests(vec![]),
            Some(other) => {
                return Err(err(
                    "on_exit",
                    format!("unknown policy {other:?}: use none, restart or requests"),
                ));
            }
        };
        let grace = match &self.grace {
            Some(g) => parse_duration(g).map_err(|e| err("grace", e.to_string()))?,
            None => DEFAULT_GRACE,
        };
        let stop_signal = match &self.stop_signal {
            Some(s) => s.parse::<StopSignal>().map_err(|m| err("stop_signal", m))?,
            None => StopSignal::default(),
        };
        let max_memory = match &self.max_memory {
            Some(m) => Some(parse_size(m).map_err(|e| err("max_memory", e.to_string()))?),
            None => None,
        };
        let mut log = LogSpec {
            out: self.log.as_deref().map(|p| resolve(base, p)),
            err: self.err_log.as_deref().map(|p| resolve(base, p)),
            strip_ansi: self.strip_ansi.unwrap_or(false),
            timestamps: self.timestamps.unwrap_or(false),
            ..LogSpec::default()
        };
        if let Some(s) = &self.log_max_size {
            log.max_size = parse_size(s).map_err(|e| err("log_max_size", e.to_string()))?;
            if log.max_size < 4096 {
                return Err(err(
                    "log_max_size",
                    format!(
                        "{s:?} is below the 4KiB minimum: a rotated file must hold whole lines"
                    ),
                ));
            }
        }
        if let Some(k) = self.log_keep {
            log.keep = k;
        }
        let spec = ProcessSpec {
            name: self.name,
            network: self.network.unwrap_or(false),
            program,
            env: self.env,
            log,
            restart,
            on_exit,
            grace,
            stop_signal,
            max_memory,
            transient: false,
            parent: None,
            budgets: crate::spec::Budgets {
                max_children: self.max_children,
                mailbox_bytes: match &self.mailbox_size {
                    Some(m) => Some(parse_size(m).map_err(|e| err("mailbox_size", e.to_string()))?),
                    None => None,
                },
            },
        };
        spec.check().map_err(|b| err(b.key, b.message))?;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const FULL: &str = r#"
[[process]]
name = "api"
command = "node"
args = ["server.js"]
cwd = "services/first"
env = { PORT = "8080" }
log = "logs/api.log"
restart_at = ["100ms", "500ms", "1s", "10s", "30s", "1m", "5m", "15m"]
restart_ok = "30m"
on_exit = "restart"
grace = "200ms"
stop_signal = "SIGTERM"
strip_ansi = true
max_memory = "512MiB"

[[process]]
command = "./bin/worker"
restart_at = [0]
on_exit = "none"
"#;

    #[test]
    fn full_manifest() {
        let specs = parse_manifest(FULL, Path::new("/srv/app")).unwrap();
        assert_eq!(specs.len(), 2);
        let api = &specs[0];
        assert_eq!(api.name.as_deref(), Some("api"));
        assert_eq!(
            api.program,
            Program::Native {
                command: "node".into(),
                args: vec!["server.js".into()],
                cwd: "/srv/app/services/first".into(),
                ipc: None,
            }
        );
        assert_eq!(api.env["PORT"], "8080");
        assert_eq!(
            api.log.out.as_deref(),
            Some(Path::new("/srv/app/logs/api.log"))
        );
        assert_eq!(api.restart.delays.len(), 8);
        assert_eq!(api.restart.ok, Duration::from_secs(1800));
        assert_eq!(api.grace, Duration::from_millis(200));
        assert!(api.log.strip_ansi);
        assert_eq!(api.max_memory, Some(512 << 20));
        let worker = &specs[1];
        assert!(worker.restart.never_restarts());
        assert_eq!(worker.on_exit, OnExit::None);
        match &worker.program {
            Program::Native { command, .. } => assert_eq!(command, "/srv/app/bin/worker"),
            other => panic!("native expected, got {other:?}"),
        }
    }

    fn error_of(text: &str) -> String {
        parse_manifest(text, Path::new("/m"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn wasm_processes() {
        let specs = parse_manifest(
            "[[process]]\nname = \"counter\"\nwasm = \"build/counter.wasm\"\npackage = \"demo:spindle\"\npublic = true\nmax_memory = \"16MiB\"\n",
            Path::new("/srv"),
        )
        .unwrap();
        assert_eq!(
            specs[0].program,
            Program::Wasm {
                path: "/srv/build/counter.wasm".into(),
                package: "demo:spindle".parse().unwrap(),
                public: true
            }
        );
        let e = error_of("[[process]]\nwasm = \"a.wasm\"\ncommand = \"x\"\n");
        assert!(e.contains("not both"), "{e}");
        let e = error_of("[[process]]\nwasm = \"a.wasm\"\npackage = \"nocolon\"\n");
        assert!(
            e.contains("`package`") && e.contains("package:publisher"),
            "{e}"
        );
        let e = error_of("[[process]]\nwasm = \"a.wasm\"\npackage = \"sys:spindle\"\n");
        assert!(e.contains("`package`") && e.contains("reserved"), "{e}");
        let e = error_of("[[process]]\ncommand = \"x\"\npublic = true\n");
        assert!(
            e.contains("message bus only") && e.contains("ipc = true"),
            "{e}"
        );
        let e = error_of("[[process]]\nwasm = \"a.wasm\"\nipc = true\n");
        assert!(
            e.contains("`ipc`") && e.contains("native processes only"),
            "{e}"
        );
        let e = error_of("[[process]]\ncommand = \"x\"\nheartbeat = \"5s\"\n");
        assert!(e.contains("`heartbeat`") && e.contains("ipc = true"), "{e}");
        let e = error_of("[[process]]\ncommand = \"x\"\nipc = true\nheartbeat = \"10ms\"\n");
        assert!(e.contains("`heartbeat`") && e.contains("1s"), "{e}");
        let e = error_of("[[process]]\ncommand = \"x\"\nipc = true\npackage = \"sys:spindle\"\n");
        assert!(e.contains("`package`") && e.contains("reserved"), "{e}");
    }

    #[test]
    fn native_processes_join_the_bus_with_ipc() {
        let specs = parse_manifest(
            "[[process]]\nname = \"api\"\ncommand = \"node\"\nipc = true\npackage = \"shop:acme\"\npublic = true\n",
            Path::new("/srv"),
        )
        .unwrap();
        assert_eq!(
            specs[0].program.bus(),
            Some((&"shop:acme".parse::<PackageId>().unwrap(), true))
        );
        let specs = parse_manifest(
            "[[process]]\ncommand = \"node\"\nipc = true\n",
            Path::new("/srv"),
        )
        .unwrap();
        assert_eq!(
            specs[0]
                .program
                .bus()
                .map(|(p, public)| (p.to_string(), public)),
            Some((DEFAULT_PACKAGE.to_string(), false))
        );
        let specs = parse_manifest("[[process]]\ncommand = \"node\"\n", Path::new("/srv")).unwrap();
        assert_eq!(specs[0].program.bus(), None);
    }

    #[test]
    fn errors_name_the_key() {
        let e = error_of("[[process]]\ncommand = \"x\"\ngrace = \"soon\"\n");
        assert!(
            e.contains("process 1") && e.contains("`grace`") && e.contains("200ms"),
            "{e}"
        );
        let e = error_of("[[process]]\ncommand = \"x\"\nrestrt_at = [\"1s\"]\n");
        assert!(e.contains("unknown field `restrt_at`"), "{e}");
        let e = error_of("[[process]]\nname = \"a\"\ncommand = \"x\"\n[[process]]\nname = \"b\"\n");
        assert!(
            e.contains("process 2 (\"b\")") && e.contains("`command`"),
            "{e}"
        );
        let e = error_of("[[process]]\ncommand = \"x\"\nrestart_at = [100]\n");
        assert!(e.contains("`restart_at`") && e.contains("100ms"), "{e}");
        let e = error_of("[[process]]\ncommand = \"x\"\non_exit = \"sometimes\"\n");
        assert!(e.contains("none, restart or requests"), "{e}");
        let e = error_of("[[process]]\ncommand = \"x\"\nname = \"12\"\n");
        assert!(e.contains("`name`") && e.contains("all digits"), "{e}");
        let e = error_of("[[process]]\ncommand = \"x\"\nmax_memory = \"big\"\n");
        assert!(e.contains("`max_memory`") && e.contains("512MiB"), "{e}");
        let e = error_of("");
        assert!(e.contains("no processes"), "{e}");
        let e = error_of("[[process]\n");
        assert!(!e.is_empty());
    }

    mod hostile {
        use super::*;
        use proptest::prelude::*;

        const KEYS: &[&str] = &[
            "name",
            "command",
            "wasm",
            "args",
            "cwd",
            "env",
            "log",
            "err_log",
            "restart_at",
            "restart_ok",
            "on_exit",
            "grace",
            "stop_signal",
            "strip_ansi",
            "timestamps",
            "max_memory",
            "log_max_size",
            "log_keep",
            "package",
            "public",
            "network",
            "ipc",
            "heartbeat",
        ];

        /// A TOML value of the kinds a manifest may hold, or may wrongly hold.
        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                "\\PC{0,10}".prop_map(|s| format!("{s:?}")),
                any::<i64>().prop_map(|n| n.to_string()),
                any::<bool>().prop_map(|b| b.to_string()),
                Just("\"18446744073709551615s\"".to_string()),
                Just("\"99999999999GiB\"".to_string()),
                Just("\"0\"".to_string()),
                Just("[\"1ms\", 0, \"1h\"]".to_string()),
                Just("{ A = \"b\" }".to_string()),
                Just("[]".to_string()),
            ]
        }

        proptest! {
            /// Any text: a manifest or an error naming what is wrong.
            #[test]
            fn any_text_is_answered(text in "\\PC{0,200}") {
                let _ = parse_manifest(&text, Path::new("/m"));
            }

            /// Entries with any keys and values: parsed specs obey every rule.
            #[test]
            fn every_parsed_spec_obeys_the_rules(
                entries in prop::collection::vec(
                    prop::collection::vec((prop::sample::select(KEYS), value()), 0..8), 1..3)
            ) {
                let mut text = String::new();
                for e in &entries {
                    text.push_str("[[process]]\ncommand = \"x\"\n");
                    let mut seen = std::collections::HashSet::from(["command"]);
                    for (k, v) in e {
                        if seen.insert(*k) {
                            text.push_str(&format!("{k} = {v}\n"));
                        }
                    }
                }
                if let Ok(specs) = parse_manifest(&text, Path::new("/m")) {
                    for s in specs {
                        prop_assert!(s.check().is_ok(), "{text}");
                    }
                }
            }
        }
    }
}
