use crate::cgroup::{self, Cgroups};
use crate::spawn::{self, SpawnError};
use crate::stats::CpuMeter;
use crate::tree::ProcTable;
use nix::sys::signal::{Signal, kill};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use spindle_kernel::RunId;
use spindle_logs::{LineSink, LogHub, Shaping, Stream};
use spindle_types::spec::StopSignal;
use spindle_types::{Address, ExitStatus, ProcessNum, ProcessSpec};
use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// What the driver reports back to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverEvent {
    Exited {
        num: ProcessNum,
        run: RunId,
        status: ExitStatus,
    },
}

/// A started run.
#[derive(Debug)]
pub struct Spawned {
    pub pid: u32,
    /// The daemon's end of the IPC channel, for a process on the bus.
    pub channel: Option<OwnedFd>,
}

/// Latest CPU and memory figures of a run's main process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    pub cpu_percent: Option<f32>,
    pub rss_bytes: Option<u64>,
}

#[derive(Debug)]
struct LiveRun {
    run: RunId,
    pid: i32,
    meter: CpuMeter,
    cgroup: Option<PathBuf>,
}

/// The SIGCHLD stream the daemon waits on before calling [`NativeDriver::reap`].
/// Create it before the first spawn.
pub fn child_signal() -> io::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
}

fn to_signal(s: StopSignal) -> Signal {
    match s {
        StopSignal::SIGTERM => Signal::SIGTERM,
        StopSignal::SIGINT => Signal::SIGINT,
        StopSignal::SIGHUP => Signal::SIGHUP,
        StopSignal::SIGQUIT => Signal::SIGQUIT,
        StopSignal::SIGUSR1 => Signal::SIGUSR1,
        StopSignal::SIGUSR2 => Signal::SIGUSR2,
        StopSignal::SIGKILL => Signal::SIGKILL,
    }
}

/// Runs native processes for one node. See the crate docs.
#[derive(Debug)]
pub struct NativeDriver {
    node_tag: String,
    self_pid: i32,
    logs_dir: PathBuf,
    hub: Arc<LogHub>,
    runs: HashMap<ProcessNum, LiveRun>,
    by_pid: HashMap<i32, ProcessNum>,
    cgroups: Option<Cgroups>,
    /// Cgroups of ended runs whose members are still dying.
    draining: Vec<PathBuf>,
    /// Where processes on the bus keep durable state (`SPINDLE_STATE_DIR`).
    state_dir: PathBuf,
}

impl NativeDriver {
    /// Makes this process a child subreaper, so orphans of managed processes
    /// come back to it instead of escaping to init.
    pub fn new(node_tag: &str, logs_dir: &Path, hub: Arc<LogHub>) -> io::Result<Self> {
        // SAFETY: plain prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let cgroups = match Cgroups::detect(node_tag) {
            Ok(c) => {
                tracing::info!(
                    "tracking process trees with cgroups under {}",
                    c.root().display()
                );
                Some(c)
            }
            Err(why) => {
                tracing::info!("tracking process trees through /proc only: {why}");
                None
            }
        };
        Ok(NativeDriver {
            node_tag: node_tag.into(),
            self_pid: std::process::id() as i32,
            logs_dir: logs_dir.into(),
            hub,
            runs: HashMap::new(),
            by_pid: HashMap::new(),
            cgroups,
            draining: Vec::new(),
            // The node keeps `state/` beside `logs/`.
            state_dir: logs_dir.with_file_name("state"),
        })
    }

    /// Whether runs are tracked by cgroup as well as through `/proc`.
    pub fn has_cgroups(&self) -> bool {
        self.cgroups.is_some()
    }

    /// Kills (SIGKILL) every process an earlier daemon of this node left
    /// behind: everything in the node's cgroups, and everything carrying the
    /// node tag. Call before starting anything. Returns how many there were.
    pub fn kill_leftovers(&mut self) -> usize {
        let mut pids = ProcTable::scan().tagged(&self.node_tag);
        if let Some(c) = &self.cgroups {
            for dir in c.all() {
                pids.extend(cgroup::members(&dir));
                cgroup::kill(&dir);
                self.draining.push(dir);
            }
        }
        pids.sort_unstable();
        pids.dedup();
        for &pid in &pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        pids.len()
    }

    /// Removes cgroups of ended runs once they are empty.
    fn tidy(&mut self) {
        self.draining.retain(|d| !cgroup::remove(d));
    }

    fn tag(&self, num: ProcessNum) -> String {
        format!("{}.{}", self.node_tag, num)
    }

    /// The files a process's stdout and stderr go to.
    pub fn log_paths(&self, num: ProcessNum, spec: &ProcessSpec) -> (PathBuf, PathBuf) {
        spec.log_paths(&self.logs_dir, num.0)
    }

    /// Checks everything that can be checked before starting: executable,
    /// working directory.
    pub fn preflight(spec: &ProcessSpec) -> Result<PathBuf, SpawnError> {
        spawn::preflight(&spec.program, spec.env.get("PATH").map(String::as_str))
    }

    /// Starts a run; returns the main process's pid, and with an `address`
    /// (a process on the message bus) the daemon's end of its IPC channel:
    /// the child's end is its fd 3, announced the way Node expects
    /// (`NODE_CHANNEL_FD=3`, JSON serialization), with `SPINDLE_ADDRESS`.
    pub fn spawn(
        &mut self,
        num: ProcessNum,
        run: RunId,
        spec: &ProcessSpec,
        tap: Option<spindle_logs::LogTap>,
        address: Option<&Address>,
    ) -> Result<Spawned, SpawnError> {
        let exe = Self::preflight(spec)?;
        let (out_path, err_path) = self.log_paths(num, spec);
        let open = |p: &Path| {
            // Fail before spawning if the file cannot be written at all.
            spindle_logs::probe(p).map_err(|source| SpawnError::Log {
                path: p.to_path_buf(),
                source,
            })?;
            Ok::<_, SpawnError>(self.hub.open(p, spec.log.max_size, spec.log.keep))
        };
        let out_file = open(&out_path)?;
        let err_file = open(&err_path)?;
        let channel = match address {
            Some(_) => Some(
                socketpair(
                    AddressFamily::Unix,
                    SockType::Stream,
                    None,
                    SockFlag::SOCK_CLOEXEC,
                )
                .map_err(|e| SpawnError::Exec {
                    path: exe.clone(),
                    source: e.into(),
                })?,
            ),
            None => None,
        };
        let channel_env = address.map(|a| {
            [
                ("NODE_CHANNEL_FD".to_string(), crate::CHANNEL_FD.to_string()),
                (
                    "NODE_CHANNEL_SERIALIZATION_MODE".to_string(),
                    "json".to_string(),
                ),
                (crate::ADDRESS_VAR.to_string(), a.to_string()),
                (
                    crate::STATE_DIR_VAR.to_string(),
                    self.state_dir.to_string_lossy().into_owned(),
                ),
            ]
        });
        let heartbeat_env = match &spec.program {
            spindle_types::Program::Native { ipc: Some(i), .. } => i.heartbeat_ms,
            _ => None,
        }
        .map(|ms| (crate::HEARTBEAT_VAR.to_string(), ms.to_string()));
        let env = spec
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .chain([
                (crate::TAG_VAR.to_string(), self.tag(num)),
                (crate::ID_VAR.to_string(), num.to_string()),
            ])
            .chain(channel_env.into_iter().flatten())
            .chain(heartbeat_env);
        let cg = self.cgroups.as_ref().and_then(|c| {
            c.create(num.0, run)
                .inspect_err(|e| tracing::warn!("process {num}: no cgroup for this run: {e}"))
                .ok()
        });
        let (cg_dir, cg_procs) = match cg {
            Some((dir, procs)) => (Some(dir), Some(procs)),
            None => (None, None),
        };
        let child = match spawn::start(
            &exe,
            &spec.program,
            env,
            cg_procs,
            channel.as_ref().map(|(_, theirs)| theirs),
        ) {
            Ok(c) => c,
            Err(e) => {
                self.draining.extend(cg_dir);
                self.tidy();
                return Err(e);
            }
        };
        let shaping = Shaping {
            strip_ansi: spec.log.strip_ansi,
            timestamps: spec.log.timestamps,
        };
        let label = format!("process {num}");
        tokio::spawn(crate::capture::capture(
            child.stdout,
            LineSink::new(out_file, Stream::Out, shaping, tap.clone()),
            label.clone(),
        ));
        tokio::spawn(crate::capture::capture(
            child.stderr,
            LineSink::new(err_file, Stream::Err, shaping, tap),
            label,
        ));
        self.runs.insert(
            num,
            LiveRun {
                run,
                pid: child.pid,
                meter: CpuMeter::default(),
                cgroup: cg_dir,
            },
        );
        self.by_pid.insert(child.pid, num);
        Ok(Spawned {
            pid: child.pid as u32,
            channel: channel.map(|(ours, _)| ours),
        })
    }

    /// Sends the polite stop signal to the whole tree of each run.
    pub fn ask_stop(&mut self, targets: &[(ProcessNum, RunId, StopSignal)]) {
        if targets.is_empty() {
            return;
        }
        let table = ProcTable::scan();
        for &(num, run, sig) in targets {
            self.signal_tree(&table, num, run, to_signal(sig));
        }
    }

    /// SIGKILLs the whole tree of each run.
    pub fn kill(&mut self, targets: &[(ProcessNum, RunId)]) {
        if targets.is_empty() {
            return;
        }
        let table = ProcTable::scan();
        for &(num, run) in targets {
            self.signal_tree(&table, num, run, Signal::SIGKILL);
            if let Some(dir) = self.runs.get(&num).and_then(|l| l.cgroup.as_ref()) {
                cgroup::kill(dir);
            }
        }
    }

    fn signal_tree(&self, table: &ProcTable, num: ProcessNum, run: RunId, sig: Signal) {
        let Some(live) = self.runs.get(&num).filter(|l| l.run == run) else {
            return;
        };
        let mut pids = table.members(live.pid, &self.tag(num), self.self_pid);
        if let Some(dir) = &live.cgroup {
            pids.extend(cgroup::members(dir));
            pids.sort_unstable();
            pids.dedup();
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), sig);
        }
    }

    /// Collects every child that has exited. Main processes come back as
    /// exits — after what they left behind has been killed; adopted orphans
    /// are just reaped.
    pub fn reap(&mut self) -> Vec<DriverEvent> {
        let mut events = vec![];
        let mut ended = vec![];
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, ExitStatus::Signal(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            };
            let (pid, status) = (status.0.as_raw(), status.1);
            if let Some(num) = self.by_pid.remove(&pid)
                && let Some(live) = self.runs.remove(&num)
            {
                ended.push((num, live.pid, live.cgroup));
                events.push(DriverEvent::Exited {
                    num,
                    run: live.run,
                    status,
                });
            }
        }
        if !ended.is_empty() {
            let table = ProcTable::scan();
            for (num, pid, cg) in ended {
                let mut left = table.members(pid, &self.tag(num), self.self_pid);
                if let Some(dir) = cg {
                    left.extend(cgroup::members(&dir));
                    cgroup::kill(&dir);
                    self.draining.push(dir);
                }
                left.sort_unstable();
                left.dedup();
                for member in left {
                    tracing::info!(
                        "process {num}: killing {member}, left behind by its main process {pid}"
                    );
                    let _ = kill(Pid::from_raw(member), Signal::SIGKILL);
                }
            }
        }
        if !self.draining.is_empty() {
            self.tidy();
        }
        events
    }

    /// Samples CPU and memory of every live run; returns (num, run, rss) of
    /// each, for the caller to hold against memory caps.
    pub fn sample(&mut self, now: Instant) -> Vec<(ProcessNum, RunId, u64)> {
        self.tidy();
        let mut sampled = vec![];
        for (&num, live) in self.runs.iter_mut() {
            if let Some(u) = live.meter.sample(live.pid, now) {
                sampled.push((num, live.run, u.rss_bytes));
            }
        }
        sampled
    }

    /// Latest figures for a live run.
    pub fn usage(&self, num: ProcessNum) -> Option<Usage> {
        self.runs.get(&num).map(|l| Usage {
            cpu_percent: l.meter.percent,
            rss_bytes: l.meter.rss_bytes,
        })
    }

    pub fn live_runs(&self) -> usize {
        self.runs.len()
    }
}

impl Drop for NativeDriver {
    /// Leaves no empty cgroups behind (a non-empty one stays for the next
    /// daemon to clean up).
    fn drop(&mut self) {
        self.tidy();
        if let Some(c) = &self.cgroups {
            let _ = std::fs::remove_dir(c.root());
        }
    }
}
