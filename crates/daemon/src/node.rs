//! Boot and the control loop. See the crate docs.

use crate::server::{self, Call, Follow, Reply};
use crate::{DaemonError, Paths, table};
use spindle_bus::Bus;
use spindle_driver_native::{DriverEvent, NativeDriver, child_signal};
use spindle_driver_wasm::{SpawnCall, WasmDriver, WasmEvent};
use spindle_ipc::{Bridge, Spawner};
use spindle_kernel::{Effect, Kernel, State};
use spindle_logs::{LogChunk, LogHub, tail_lines};
use spindle_types::control::{
    DaemonStatus, ErrorKind, LogStream, PROTOCOL_VERSION, ProcessInfo, Request, Response,
    StateLabel,
};
use spindle_types::{Address, ProcessId, ProcessNum, ProcessSpec, Program, Selector};
use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{broadcast, mpsc, oneshot};

/// How often CPU and memory are sampled (for `ls` and memory caps).
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Chunks of log lines a follower may fall behind before it is told it missed some.
const TAP_CAPACITY: usize = 1024;
/// Control requests queued for the loop; connections wait when it is full.
const CALL_QUEUE: usize = 256;
/// Bytes read from the end of a log file to serve `logs --lines N`.
const TAIL_BYTES: u64 = 4 << 20;

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn new_node_tag() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// How long a starting daemon waits for the lock of one that is exiting.
const LOCK_WAIT: Duration = Duration::from_secs(3);

/// Takes the home's lock, waiting a little for a daemon that is on its way out.
fn take_lock(mut file: fs::File) -> Result<nix::fcntl::Flock<fs::File>, ()> {
    let end = Instant::now() + LOCK_WAIT;
    loop {
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(l),
            Err((f, _)) if Instant::now() < end => {
                file = f;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return Err(()),
        }
    }
}

/// Marks every descriptor the daemon inherited above stderr close-on-exec,
/// so none leaks into the processes it starts.
fn close_inherited_fds() {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r != 0 {
        tracing::warn!(
            "cannot mark inherited descriptors close-on-exec: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Raises the soft open-files limit to the hard one: every native process
/// holds two pipes, and a node may run thousands of processes.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Boots the node in `home` and serves until SIGTERM/SIGINT or a `shutdown`
/// request. Blocks; builds its own single-threaded runtime.
pub fn run(home: &std::path::Path) -> Result<(), DaemonError> {
    let paths = Paths::new(home);
    let home_err = |source| DaemonError::Home {
        path: paths.home.clone(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&paths.home)
        .map_err(home_err)?;
    fs::create_dir_all(&paths.logs).map_err(home_err)?;
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&paths.lock)
        .map_err(home_err)?;
    let _lock = take_lock(lock).map_err(|_| DaemonError::AlreadyRunning(paths.home.clone()))?;

    raise_fd_limit();
    close_inherited_fds();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(paths))
}

async fn serve(paths: Paths) -> Result<(), DaemonError> {
    let saved = table::load(&paths.table)?;
    let node_tag = saved
        .as_ref()
        .map(|t| t.node_tag.clone())
        .unwrap_or_else(new_node_tag);
    let _ = fs::remove_file(&paths.socket);
    let listener = UnixListener::bind(&paths.socket).map_err(|source| DaemonError::Socket {
        path: paths.socket.clone(),
        source,
    })?;
    fs::set_permissions(&paths.socket, fs::Permissions::from_mode(0o600))?;

    // SIGCHLD must be watched before the first spawn.
    let mut sigchld = child_signal()?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let hub = Arc::new(LogHub::new());
    let mut driver = NativeDriver::new(&node_tag, &paths.logs, hub.clone())?;
    let bus = Arc::new(Bus::open(NODE_NAME, &paths.capabilities)?);
    // Runtime modules: their addresses are the node's own, on the bus first.
    spindle_db::start(&paths.db, &bus)?;
    let (wasm, mut wasm_events, mut spawn_calls) = WasmDriver::new(
        &paths.home.join("cache"),
        spindle_driver_wasm::runtime::MAX_WASM_PROCESSES,
        bus,
        hub,
        &paths.logs,
        &paths.home.join("state"),
    )?;
    let leftovers = driver.kill_leftovers();
    if leftovers > 0 {
        tracing::warn!(
            "killed {leftovers} processes left running by an earlier daemon of this node"
        );
    }
    let now = Instant::now();
    let kernel = match saved {
        Some(t) => Kernel::restore(t, now),
        None => {
            let mut k = Kernel::new(node_tag);
            k.take_effects();
            k
        }
    };
    // Capabilities of processes that are gone (removed while the previous
    // daemon's last write was in flight) must not pass to a namesake.
    let known: HashSet<ProcessId> = kernel
        .entries()
        .filter_map(|e| wasm.address(e.num, &e.spec))
        .map(|a| a.process)
        .collect();
    wasm.bus()
        .retain(|p| p.package.is_system() || known.contains(p));
    let (calls_tx, mut calls) = mpsc::channel::<Call>(CALL_QUEUE);
    tokio::spawn(server::accept_loop(listener, calls_tx));

    let mut node = Node {
        paths,
        kernel,
        driver,
        wasm,
        addresses: HashMap::new(),
        bridges: HashMap::new(),
        taps: HashMap::new(),
        started: now,
        shutdown_waiters: vec![],
    };
    node.apply();
    tracing::info!(
        "spindle {} node up: pid {}, home {}",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        node.paths.home.display()
    );

    let mut sampler = tokio::time::interval(SAMPLE_EVERY);
    sampler.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let far = || tokio::time::Instant::now() + Duration::from_secs(3600);
    loop {
        let deadline = node
            .kernel
            .next_deadline()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(far);
        tokio::select! {
            Some((req, reply)) = calls.recv() => node.handle(req, reply),
            _ = sigchld.recv() => {
                let now = Instant::now();
                for DriverEvent::Exited { num, run, status } in node.driver.reap() {
                    node.kernel.exited(num, run, status, None, now, wall_ms());
                }
            }
            Some(WasmEvent::Exited { num, run, status, detail, on_exit }) = wasm_events.recv() => {
                node.wasm.ended(num, run);
                node.kernel.set_on_exit(num, on_exit);
                node.kernel.exited(num, run, status, detail, Instant::now(), wall_ms());
            }
            Some(call) = spawn_calls.recv() => node.spawn_for(call),
            _ = tokio::time::sleep_until(deadline) => node.kernel.tick(Instant::now()),
            _ = sampler.tick() => node.sample(),
            _ = sigterm.recv() => node.begin_shutdown(None),
            _ = sigint.recv() => node.begin_shutdown(None),
        }
        node.apply();
        if node.kernel.is_shutting_down() && node.kernel.is_quiescent() {
            break;
        }
    }
    if let Err(why) = node.wasm.bus().persisted().await {
        tracing::error!("capabilities may be out of date on disk: {why}");
    }
    let _ = fs::remove_file(&node.paths.socket);
    for w in node.shutdown_waiters.drain(..) {
        let _ = w.send(Reply::One(Response::Done { ids: vec![] }));
    }
    // Let the connection tasks write those answers before the runtime goes.
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
    tracing::info!("node stopped");
    Ok(())
}

struct Node {
    paths: Paths,
    kernel: Kernel,
    driver: NativeDriver,
    wasm: WasmDriver,
    /// Addresses of wasm processes, by id (also after they stop, for revocation).
    addresses: HashMap<ProcessNum, Address>,
    /// Native processes on the bus: their address and IPC bridge, per live run.
    bridges: HashMap<ProcessNum, (Address, Bridge)>,
    /// Per-process broadcast of written log lines, for followers. Outlives runs.
    taps: HashMap<ProcessNum, broadcast::Sender<LogChunk>>,
    started: Instant,
    shutdown_waiters: Vec<oneshot::Sender<Reply>>,
}

fn err(kind: ErrorKind, message: impl Into<String>) -> Reply {
    Reply::One(Response::Error {
        kind,
        message: message.into(),
    })
}

impl Node {
    /// Carries out the kernel's effects until it has none left, then persists.
    fn apply(&mut self) {
        let mut dirty = false;
        loop {
            let effects = self.kernel.take_effects();
            if effects.is_empty() {
                break;
            }
            let mut asks = vec![];
            let mut kills = vec![];
            for effect in effects {
                match effect {
                    Effect::Spawn { num, run, spec } => {
                        let tap = self
                            .taps
                            .entry(num)
                            .or_insert_with(|| broadcast::channel(TAP_CAPACITY).0)
                            .clone();
                        let result = match &spec.program {
                            Program::Native { .. } => self.spawn_native(num, run, &spec, tap),
                            Program::Wasm { .. } => {
                                self.wasm.spawn(num, run, &spec, Some(tap)).map(|addr| {
                                    self.addresses.insert(num, addr);
                                    None
                                })
                            }
                        };
                        if let Err(e) = &result {
                            tracing::error!("process {num}: {e}");
                        }
                        self.kernel
                            .spawned(num, run, result, Instant::now(), wall_ms());
                    }
                    // A wasm process has no signals: it is asked by message,
                    // and killed when the grace is over.
                    Effect::AskStop { num, run, .. } if self.addresses.contains_key(&num) => {
                        self.wasm.ask_stop(num, run, &self.addresses[&num])
                    }
                    Effect::Kill { num, run } if self.addresses.contains_key(&num) => {
                        self.wasm.kill(num, run)
                    }
                    // A process with an IPC channel is asked by message first.
                    Effect::AskStop { num, run, signal } => {
                        if !self.bridges.get(&num).is_some_and(|(_, b)| b.ask_stop()) {
                            asks.push((num, run, signal))
                        }
                    }
                    Effect::Kill { num, run } => kills.push((num, run)),
                    Effect::Exited {
                        num,
                        info,
                        restart_in,
                    } => {
                        if let Some((addr, _)) = self.bridges.remove(&num) {
                            // Its mailbox closes; its bridge ends.
                            self.wasm.bus().unregister(&addr.process);
                            if info.reason == spindle_types::ExitReason::Killed {
                                self.wasm.bus().revoke_issued_by(&addr);
                            }
                        }
                        if info.reason == spindle_types::ExitReason::Killed
                            && let Some(addr) = self.addresses.get(&num)
                        {
                            // What a killed process issued dies with it.
                            self.wasm.bus().revoke_issued_by(addr);
                        }
                        match restart_in {
                            Some(d) => tracing::info!(
                                "process {num}: {info}; restarting in {}",
                                spindle_types::units::format_duration(d)
                            ),
                            None => tracing::info!("process {num}: {info}"),
                        }
                    }
                    Effect::Removed { num } => {
                        self.taps.remove(&num);
                        if let Some(addr) = self.addresses.remove(&num) {
                            // Gone for good: nothing it held or issued may
                            // pass to a later process of the same name.
                            self.wasm.bus().forget(&addr.process);
                            self.wasm.bus().revoke_issued_by(&addr);
                        }
                    }
                    Effect::Persist => dirty = true,
                }
            }
            self.driver.ask_stop(&asks);
            self.driver.kill(&kills);
        }
        if dirty && let Err(e) = table::save(&self.paths.table, &self.kernel.snapshot()) {
            tracing::error!("{e}");
        }
    }

    fn sample(&mut self) {
        if self.driver.live_runs() == 0 {
            return;
        }
        let now = Instant::now();
        // Watchdogs: a process on the bus that has sent nothing for its
        // heartbeat period is hung.
        for (num, (_, bridge)) in &self.bridges {
            let Some(e) = self.kernel.get(*num) else {
                continue;
            };
            let (Program::Native { ipc: Some(ipc), .. }, Some(run)) =
                (&e.spec.program, e.state.run())
            else {
                continue;
            };
            if let Some(period) = ipc.heartbeat()
                && matches!(e.state, State::Starting { .. } | State::Running { .. })
                && bridge.silent_for() > period
            {
                let detail = format!(
                    "heartbeat lost: nothing on its IPC channel for {} (heartbeat {})",
                    spindle_types::units::format_duration(bridge.silent_for()),
                    spindle_types::units::format_duration(period)
                );
                tracing::warn!("process {num}: {detail}");
                self.kernel.hung(*num, run, detail, now);
            }
        }
        for (num, run, rss) in self.driver.sample(now) {
            let Some(cap) = self.kernel.get(num).and_then(|e| e.spec.max_memory) else {
                continue;
            };
            if rss > cap {
                let detail = format!(
                    "memory limit {} exceeded ({} resident)",
                    spindle_types::units::format_size(cap),
                    spindle_types::units::format_size(rss)
                );
                tracing::warn!("process {num}: {detail}");
                self.kernel.fault(num, run, detail, now);
            }
        }
    }

    fn begin_shutdown(&mut self, waiter: Option<oneshot::Sender<Reply>>) {
        if !self.kernel.is_shutting_down() {
            tracing::info!("shutting down: stopping every process");
        }
        self.kernel.shutdown(Instant::now());
        self.shutdown_waiters.extend(waiter);
    }

    fn handle(&mut self, req: Request, reply: oneshot::Sender<Reply>) {
        let now = Instant::now();
        let answer = match req {
            Request::Hello { .. } => Reply::One(Response::Hello {
                protocol: PROTOCOL_VERSION,
                version: env!("CARGO_PKG_VERSION").into(),
                pid: std::process::id(),
            }),
            Request::Start { specs } => self.start(specs, now),
            Request::List => Reply::One(Response::List {
                processes: self.list(now),
            }),
            Request::Stop { target } => self.act(&target, |k, s| k.stop(s, now)),
            Request::Restart { target } => self.act(&target, |k, s| k.restart(s, now)),
            Request::Delete { target } => self.act(&target, |k, s| k.delete(s, now)),
            Request::Logs {
                target,
                lines,
                follow,
                stream,
            } => self.logs(&target, lines, follow, stream),
            Request::Status => Reply::One(Response::Status(self.status(now))),
            Request::Shutdown => {
                self.begin_shutdown(Some(reply));
                return;
            }
            Request::Send {
                target,
                body,
                timeout_ms,
            } => {
                // Off the control loop: the answer may take a while.
                let bus = self.wasm.bus().clone();
                tokio::spawn(async move {
                    let answer =
                        send_as_operator(bus, &target, body, Duration::from_millis(timeout_ms))
                            .await;
                    let _ = reply.send(answer);
                });
                return;
            }
        };
        let _ = reply.send(answer);
    }

    fn start(&mut self, specs: Vec<ProcessSpec>, now: Instant) -> Reply {
        if self.kernel.is_shutting_down() {
            return err(
                ErrorKind::ShuttingDown,
                "the daemon is stopping and starts nothing new",
            );
        }
        if specs.is_empty() {
            return err(ErrorKind::InvalidSpec, "nothing to start");
        }
        // All or nothing: every spec must be startable before any starts.
        for (i, spec) in specs.iter().enumerate() {
            let who = match &spec.name {
                Some(n) => format!("process {} ({n:?})", i + 1),
                None => format!("process {}", i + 1),
            };
            // Whoever built the spec, it obeys the manifest's rules.
            if let Err(b) = spec.check() {
                return err(
                    ErrorKind::InvalidSpec,
                    format!("{who}: `{}`: {}; nothing was started", b.key, b.message),
                );
            }
            let checked = match &spec.program {
                Program::Native { .. } => NativeDriver::preflight(spec)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
                    .and_then(|_| self.check_address(spec, &specs[..i])),
                Program::Wasm { .. } => self.check_wasm(spec, &specs[..i]),
            };
            if let Err(e) = checked {
                return err(
                    ErrorKind::InvalidSpec,
                    format!("{who}: {e}; nothing was started"),
                );
            }
            for path in [&spec.log.out, &spec.log.err].into_iter().flatten() {
                if let Err(e) = spindle_logs::probe(path) {
                    return err(
                        ErrorKind::InvalidSpec,
                        format!(
                            "{who}: log file {} cannot be opened: {e}; nothing was started",
                            path.display()
                        ),
                    );
                }
            }
        }
        let mut ids = vec![];
        for spec in specs {
            match self.kernel.start(spec, now) {
                Ok(n) => ids.push(n),
                Err(e) => return err(ErrorKind::ShuttingDown, e.to_string()),
            }
        }
        Reply::One(Response::Started { ids })
    }

    fn act(
        &mut self,
        target: &Selector,
        f: impl FnOnce(&mut Kernel, &Selector) -> Result<Vec<ProcessNum>, spindle_kernel::KernelError>,
    ) -> Reply {
        match f(&mut self.kernel, target) {
            Ok(ids) => Reply::One(Response::Done { ids }),
            Err(e @ spindle_kernel::KernelError::NotFound(_)) => {
                err(ErrorKind::NotFound, e.to_string())
            }
            Err(e) => err(ErrorKind::ShuttingDown, e.to_string()),
        }
    }

    fn list(&self, now: Instant) -> Vec<ProcessInfo> {
        self.kernel
            .entries()
            .map(|e| {
                let (state, uptime, restart_in) = match &e.state {
                    State::Starting { .. } => (StateLabel::Starting, None, None),
                    State::Running { since, .. } => (
                        StateLabel::Running,
                        Some(now.saturating_duration_since(*since).as_millis() as u64),
                        None,
                    ),
                    State::Stopping { since, .. } => (
                        StateLabel::Stopping,
                        Some(now.saturating_duration_since(*since).as_millis() as u64),
                        None,
                    ),
                    State::Backoff { until } => (
                        StateLabel::Backoff,
                        None,
                        Some(until.saturating_duration_since(now).as_millis() as u64),
                    ),
                    State::Stopped => (StateLabel::Stopped, None, None),
                };
                let usage = e
                    .state
                    .is_live()
                    .then(|| self.driver.usage(e.num))
                    .flatten();
                let (log_out, log_err) = e.spec.log_paths(&self.paths.logs, e.num.0);
                ProcessInfo {
                    id: e.num,
                    name: e.spec.name.clone(),
                    command: e.spec.program.display(),
                    address: self.wasm.address(e.num, &e.spec).map(|a| a.to_string()),
                    connected: match &e.spec.program {
                        Program::Native { ipc: Some(_), .. } => Some(
                            self.bridges
                                .get(&e.num)
                                .is_some_and(|(_, b)| b.is_connected()),
                        ),
                        _ => None,
                    },
                    state,
                    pid: e.state.pid(),
                    uptime_ms: uptime,
                    restarts: e.restarts,
                    cpu_percent: usage.and_then(|u| u.cpu_percent),
                    memory_bytes: usage.and_then(|u| u.rss_bytes),
                    on_exit: e.spec.on_exit.label().into(),
                    last_exit: e.last_exit.clone(),
                    restart_in_ms: restart_in,
                    log_out,
                    log_err,
                }
            })
            .collect()
    }

    fn logs(&mut self, target: &Selector, lines: usize, follow: bool, stream: LogStream) -> Reply {
        let nums = match self.kernel.select(target) {
            Ok(n) if !n.is_empty() => n,
            Ok(_) => {
                return err(
                    ErrorKind::NotFound,
                    "no processes: start one with `spindle start`",
                );
            }
            Err(e) => return err(ErrorKind::NotFound, e.to_string()),
        };
        let mut backlog = vec![];
        let mut followers = vec![];
        for num in nums {
            let entry = self.kernel.get(num).expect("selected");
            let name = entry.spec.name.clone();
            let (out, errp) = entry.spec.log_paths(&self.paths.logs, num.0);
            let mut files = vec![];
            match stream {
                LogStream::Out => files.push((out.clone(), LogStream::Out)),
                LogStream::Err => files.push((errp.clone(), LogStream::Err)),
                LogStream::Both => {
                    files.push((out.clone(), LogStream::Out));
                    if errp != out {
                        files.push((errp.clone(), LogStream::Err));
                    }
                }
            }
            for (path, s) in files {
                match tail_lines(&path, lines, TAIL_BYTES) {
                    Ok(ls) => backlog.extend(ls.into_iter().map(|line| Response::LogLine {
                        id: num,
                        name: name.clone(),
                        stream: s,
                        line,
                    })),
                    Err(e) => {
                        return err(
                            ErrorKind::Internal,
                            format!("cannot read {}: {e}", path.display()),
                        );
                    }
                }
            }
            if follow {
                let tx = self
                    .taps
                    .entry(num)
                    .or_insert_with(|| broadcast::channel(TAP_CAPACITY).0);
                followers.push(Follow {
                    num,
                    name,
                    stream,
                    rx: tx.subscribe(),
                });
            }
        }
        Reply::Logs {
            backlog,
            follow: followers,
        }
    }

    /// A wasm spec can start: its component loads, and its address is free.
    fn check_wasm(&mut self, spec: &ProcessSpec, earlier: &[ProcessSpec]) -> Result<(), String> {
        self.wasm.preflight(spec).map_err(|e| e.to_string())?;
        self.check_address(spec, earlier)
    }

    /// A process on the bus can start if its address is free (among running
    /// processes and the other specs of the same request).
    fn check_address(&self, spec: &ProcessSpec, earlier: &[ProcessSpec]) -> Result<(), String> {
        let Some(name) = &spec.name else {
            return Ok(());
        };
        let probe = ProcessNum(0);
        let Some(addr) = self.wasm.address(probe, spec) else {
            return Ok(());
        };
        format!("{}", addr.process)
            .parse::<spindle_types::ProcessId>()
            .map_err(|e| format!("name {name:?} cannot be part of an address: {e}"))?;
        let taken = self
            .kernel
            .entries()
            .filter(|e| e.state.is_live() || e.desired == spindle_kernel::Desired::Running)
            .filter_map(|e| self.wasm.address(e.num, &e.spec))
            .chain(earlier.iter().filter_map(|s| self.wasm.address(probe, s)))
            .any(|a| a == addr);
        if taken {
            return Err(format!(
                "address {addr} is already used by another process: choose another name"
            ));
        }
        Ok(())
    }

    /// Starts a native run; one with an IPC channel is put on the bus first
    /// (so its address is taken and messages can wait for it) and bridged.
    fn spawn_native(
        &mut self,
        num: ProcessNum,
        run: spindle_kernel::RunId,
        spec: &ProcessSpec,
        tap: broadcast::Sender<LogChunk>,
    ) -> Result<Option<u32>, String> {
        let Some(addr) = self.wasm.address(num, spec) else {
            return self
                .driver
                .spawn(num, run, spec, Some(tap), None)
                .map(|s| Some(s.pid))
                .map_err(|e| e.to_string());
        };
        let bus = self.wasm.bus();
        let public = spec.program.bus().is_some_and(|(_, p)| p);
        let mailbox = bus
            .register(addr.clone(), public)
            .map_err(|e| e.to_string())?;
        let spawned = match self.driver.spawn(num, run, spec, Some(tap), Some(&addr)) {
            Ok(s) => s,
            Err(e) => {
                bus.unregister(&addr.process);
                return Err(e.to_string());
            }
        };
        let channel = spawned.channel.expect("a channel for a process on the bus");
        let spawner = match &spec.program {
            Program::Native { cwd, .. } => Some(Spawner {
                calls: self.wasm.spawn_calls(),
                dir: cwd.clone(),
            }),
            Program::Wasm { .. } => None,
        };
        match Bridge::start(channel, addr.clone(), bus.clone(), mailbox, spawner) {
            Ok(b) => {
                self.bridges.insert(num, (addr, b));
            }
            // The process runs without the bus; it sees its channel closed.
            Err(e) => {
                bus.unregister(&addr.process);
                tracing::error!("process {num}: its IPC channel could not be served: {e}");
            }
        }
        Ok(Some(spawned.pid))
    }

    /// A wasm process asked to spawn a child: start it through the kernel,
    /// then hand out the capabilities that go with it.
    fn spawn_for(&mut self, call: SpawnCall) {
        let answer = (|| {
            let path = call.resolve().map_err(|e| e.to_string())?;
            let spec = ProcessSpec {
                name: call.name.clone(),
                program: Program::Wasm {
                    path,
                    package: call.parent.process.package.clone(),
                    public: call.public,
                },
                env: Default::default(),
                log: Default::default(),
                restart: Default::default(),
                on_exit: call.on_exit.clone(),
                grace: spindle_types::spec::DEFAULT_GRACE,
                stop_signal: Default::default(),
                max_memory: None,
                transient: !matches!(call.on_exit, spindle_types::OnExit::Restart),
                parent: Some(call.parent.process.clone()),
            };
            spec.check()
                .map_err(|b| format!("the child's {}: {}", b.key, b.message))?;
            crate::budget::admit(
                &self.kernel,
                &call.parent.process,
                spindle_driver_wasm::runtime::MAX_WASM_PROCESSES as usize,
            )
            .map_err(|e| e.to_string())?;
            self.check_wasm(&spec, &[])?;
            let num = self
                .kernel
                .start(spec, Instant::now())
                .map_err(|e| e.to_string())?;
            self.apply();
            let child =
                self.addresses.get(&num).cloned().ok_or_else(|| {
                    format!("the child did not start: see `spindle ls` (id {num})")
                })?;
            let bus = self.wasm.bus();
            let talk = spindle_bus::Capability::messaging(&child);
            bus.grant(&call.parent.process, [talk.clone()]);
            for g in &call.grant_to {
                bus.grant(&g.process, [talk.clone()]);
            }
            bus.grant(&child.process, call.capabilities.iter().cloned());
            Ok(child)
        })();
        let _ = call.reply.send(answer);
    }

    fn status(&self, now: Instant) -> DaemonStatus {
        let rss = fs::read_to_string("/proc/self/statm").ok().and_then(|s| {
            let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
            // SAFETY: sysconf has no preconditions.
            Some(pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64)
        });
        DaemonStatus {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
            protocol: PROTOCOL_VERSION,
            home: self.paths.home.clone(),
            uptime_ms: now.saturating_duration_since(self.started).as_millis() as u64,
            processes: self.kernel.entries().count(),
            running: self.kernel.entries().filter(|e| e.state.is_live()).count(),
            rss_bytes: rss,
            late_responses: self
                .wasm
                .bus()
                .late_responses
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// The node's name in addresses.
pub const NODE_NAME: &str = "local";

/// `spindle send`: a request from the node operator (who needs no capability),
/// answered by the target's response or a clear error kind.
async fn send_as_operator(bus: Arc<Bus>, target: &str, body: String, timeout: Duration) -> Reply {
    use spindle_bus::{Envelope, Message, Request as BusRequest, SendErrorKind};
    use std::sync::atomic::{AtomicU64, Ordering};
    static SENDERS: AtomicU64 = AtomicU64::new(1);
    let target: Address = match target.parse() {
        Ok(a) => a,
        Err(e) => return err(ErrorKind::BadRequest, e.to_string()),
    };
    let me = bus.address(spindle_types::ProcessId {
        process: format!("cli-{}", SENDERS.fetch_add(1, Ordering::Relaxed)),
        package: spindle_types::PackageId::system(),
    });
    let mut inbox = match bus.register(me.clone(), false) {
        Ok(m) => m,
        Err(e) => return err(ErrorKind::Internal, e.to_string()),
    };
    let id = bus.next_id();
    let me = Arc::new(me);
    let env = Envelope {
        id,
        source: me.clone(),
        target: Arc::new(target.clone()),
        rsvp: Some(me.clone()),
        message: Message::Request(BusRequest {
            inherit: false,
            expects_response: Some(timeout),
            body: body.into_bytes(),
            metadata: None,
            capabilities: vec![],
        }),
        blob: None,
    };
    let answer = match bus.send(env, true).await {
        Err((kind, _)) => {
            let k = match kind {
                SendErrorKind::Offline => ErrorKind::Offline,
                SendErrorKind::MailboxFull => ErrorKind::MailboxFull,
                _ => ErrorKind::BadRequest,
            };
            err(k, format!("cannot send to {target}: {kind}"))
        }
        Ok(()) => {
            let wait = async {
                while let Some(env) = inbox.recv().await {
                    if env.id != id {
                        continue;
                    }
                    match env.message {
                        Message::Response(r, _) => return Some(Ok((env.source, r))),
                        Message::Failed(kind) => return Some(Err(kind)),
                        Message::Request(_) => {}
                    }
                }
                None
            };
            match tokio::time::timeout(timeout.min(spindle_bus::MAX_AWAIT), wait).await {
                Ok(Some(Ok((source, r)))) => Reply::One(Response::Reply {
                    source: source.to_string(),
                    body: String::from_utf8_lossy(&r.body).into_owned(),
                    metadata: r.metadata,
                }),
                Ok(Some(Err(kind))) => err(
                    ErrorKind::Exited,
                    format!("{target} ended before it responded ({})", kind.name()),
                ),
                _ => err(
                    ErrorKind::Timeout,
                    format!(
                        "no response from {target} within {}",
                        spindle_types::units::format_duration(timeout)
                    ),
                ),
            }
        }
    };
    bus.unregister(&me.process);
    answer
}
