//! Boot and the control loop. See the crate docs.

mod attached;
mod control;
mod effects;
mod network;
mod spawning;

use attached::{Attached, OnBus};

use crate::server::{self, Call, Follow, Reply};
use crate::{DaemonError, Paths, table};
use spindle_bus::Bus;
use spindle_driver_native::{DriverEvent, NativeDriver, child_signal};
use spindle_driver_wasm::{Compiler, SpawnCall, WasmDriver, WasmEvent};
use spindle_ipc::{Bridge, Spawner};
use spindle_kernel::{Effect, Kernel, State};
use spindle_logs::{LogHub, tail_lines};
use spindle_store::journal::Journal;
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

/// Boots the node in `home` and serves until SIGTERM/SIGINT, a `shutdown`
/// request, or — for a node `owner` owns ([`crate::owner`]) — the end of
/// that process. Blocks; builds its own single-threaded runtime. Wasm
/// components are compiled by `compiler` (a helper process, for a daemon:
/// see [`spindle_driver_wasm::compiler`]).
pub fn run(
    home: &std::path::Path,
    owner: Option<u32>,
    compiler: Compiler,
) -> Result<(), DaemonError> {
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
    let served = runtime.block_on(serve(paths, owner, compiler));
    // A compile still running on a blocking thread does not hold the
    // daemon up: its helper dies with the daemon (PDEATHSIG).
    runtime.shutdown_timeout(SHUTDOWN_LEFTOVERS);
    served
}

/// Compiles (or maps from the cache) every component the table names,
/// several at a time, before the loop's first spawns: restoring the table
/// then compiles nothing on the control loop. A component that fails is
/// reported by its process's start.
async fn warm_table(loader: &spindle_driver_wasm::runtime::Loader, kernel: &Kernel) {
    let components: HashSet<(std::path::PathBuf, bool)> = kernel
        .entries()
        .filter_map(|e| match &e.spec.program {
            Program::Wasm { path, .. } => Some((path.clone(), e.spec.parent.is_some())),
            Program::Native { .. } => None,
        })
        .collect();
    let mut warming = tokio::task::JoinSet::new();
    for (path, confined) in components {
        let loader = loader.clone();
        warming.spawn(async move {
            let _ = loader.warm(&path, confined).await;
        });
    }
    while warming.join_next().await.is_some() {}
}

/// How long a stopping daemon waits for work still running on blocking
/// threads (a component's compile) before it exits without it.
const SHUTDOWN_LEFTOVERS: std::time::Duration = std::time::Duration::from_millis(500);

async fn serve(paths: Paths, owner: Option<u32>, compiler: Compiler) -> Result<(), DaemonError> {
    let owner = owner
        .map(|pid| {
            crate::owner::Owner::watch(pid).map_err(|source| DaemonError::Owner { pid, source })
        })
        .transpose()?;
    // The pool's setting is checked before anything is touched.
    let pool = spindle_driver_wasm::runtime::pool_here()?;
    let (journal, records, aside) = Journal::open_or_set_aside(&paths.journal)?;
    if let Some(aside) = aside {
        tracing::error!(
            "{} was not a database; moved it to {} and starting with an empty node",
            paths.journal.display(),
            aside.display()
        );
    }
    let mut saved = table::from_records(&records)?;
    // A home of an earlier version: its table and capabilities files are
    // imported once.
    let import_table = saved.is_none() && paths.legacy_table.exists();
    if import_table {
        saved = table::load_legacy(&paths.legacy_table)?;
        if let Some(t) = &saved {
            table::stage_all(&journal, t);
        }
    }
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
    let cap_rows = records
        .get(spindle_bus::persist::KIND)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let bus = Arc::new(Bus::open(NODE_NAME, journal.clone(), cap_rows));
    // The capabilities file is imported once: a marker row goes in with
    // them (a node may rightly hold no capability rows).
    let caps_done = records
        .get(table::META_KIND)
        .is_some_and(|rows| rows.iter().any(|(k, _)| k == table::CAPS_IMPORTED_KEY));
    let import_caps = !caps_done && paths.legacy_capabilities.exists();
    if import_caps {
        for (holder, set) in spindle_bus::persist::load_legacy(&paths.legacy_capabilities)? {
            bus.grant(&holder, set);
        }
        journal.put(table::META_KIND, table::CAPS_IMPORTED_KEY, b"true".to_vec());
    }
    if import_table || import_caps {
        journal.flush_blocking().map_err(|e| DaemonError::Import {
            path: paths.journal.clone(),
            why: e.to_string(),
        })?;
    }
    // Files whose contents are in node.db (imported now or before) are
    // renamed, never deleted.
    for (in_db, path) in [
        (saved.is_some(), &paths.legacy_table),
        (caps_done || import_caps, &paths.legacy_capabilities),
    ] {
        if !in_db || !path.exists() {
            continue;
        }
        let mut done = path.as_os_str().to_owned();
        done.push(".imported");
        fs::rename(path, &done)?;
        tracing::info!(
            "imported {} into {}",
            path.display(),
            paths.journal.display()
        );
    }
    // Links to other nodes, when this home has a name and key.
    let mut peer_keys = network::PeerKeys::load(
        records
            .get(network::PEER_KEY_KIND)
            .map(Vec::as_slice)
            .unwrap_or_default(),
    );
    let network = network::Network::start(&paths.home, &bus, &journal, &mut peer_keys);
    // Runtime modules: their addresses are the node's own, on the bus first.
    spindle_db::start(&paths.db, &bus)?;
    spindle_vfs::start(&paths.vfs, &bus)?;
    let timer_rows = records
        .get(spindle_timer::KIND)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let timers = spindle_timer::start(&bus, timer_rows)?;
    let (wasm, mut wasm_events, mut spawn_calls) = WasmDriver::new(
        &paths.home.join("cache"),
        pool,
        compiler,
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
    let mut kernel = match saved {
        // An owned node starts empty (its app starts its services), and so
        // does any daemon that finds an owned node's table.
        Some(t) if owner.is_some() || t.owned => Kernel::fresh(&t),
        Some(t) => Kernel::restore(t, now),
        None => {
            let mut k = Kernel::new(node_tag);
            k.take_effects();
            k
        }
    };
    kernel.set_owned(owner.is_some());
    // Capabilities of processes that are gone (removed while the previous
    // daemon's last write was in flight) must not pass to a namesake.
    let known: HashSet<ProcessId> = kernel
        .entries()
        .filter_map(|e| wasm.address(e.num, &e.spec))
        .map(|a| a.process)
        .collect();
    wasm.bus()
        .retain(|p| p.package.is_system() || known.contains(p));
    // Durable timers are kept for processes of the table only (an
    // operator's `send` has an address of one request's lifetime).
    timers.retain(|p| known.contains(p));
    let (calls_tx, mut calls) = mpsc::channel::<Call>(CALL_QUEUE);
    tokio::spawn(server::accept_loop(
        listener,
        calls_tx,
        wasm.loader(),
        owner.as_ref().map(|o| o.pid),
    ));

    warm_table(&wasm.loader(), &kernel).await;
    let mut node = Node {
        paths,
        journal,
        kernel,
        driver,
        wasm,
        procs: HashMap::new(),
        events: broadcast::channel(EVENT_QUEUE).0,
        started: now,
        shutdown_waiters: vec![],
        after_commit: vec![],
        network,
        peer_keys,
    };
    node.apply();
    node.persist();
    tracing::info!(
        "spindle {} node up: pid {}, home {}",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        node.paths.home.display()
    );

    let mut sampler = tokio::time::interval(SAMPLE_EVERY);
    sampler.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let far = || tokio::time::Instant::now() + Duration::from_secs(3600);
    let owner_gone = async {
        match &owner {
            Some(o) => o.gone().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(owner_gone);
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
            // Polled until the owner ends, never after (a shutdown is then under way).
            () = &mut owner_gone, if !node.kernel.is_shutting_down() => {
                let pid = owner.as_ref().map_or(0, |o| o.pid);
                tracing::info!("owner {pid} ended: stopping every process, then the node");
                node.begin_shutdown(None);
            }
        }
        node.apply();
        node.persist();
        if node.kernel.is_shutting_down() && node.kernel.is_quiescent() {
            break;
        }
    }
    if let Err(why) = node.journal.flush().await {
        tracing::error!("the table and capabilities may be out of date on disk: {why}");
    }
    node.journal.close();
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

/// Events kept for a slow `events` subscriber before it is told it missed some.
const EVENT_QUEUE: usize = 1024;

struct Node {
    paths: Paths,
    /// The table's and the capabilities' rows on disk.
    journal: Journal,
    kernel: Kernel,
    driver: NativeDriver,
    wasm: WasmDriver,
    /// One record per process: its log tap and its place on the bus.
    procs: HashMap<ProcessNum, Attached>,
    /// Lifecycle events for `events` subscribers (built only while one listens).
    events: broadcast::Sender<spindle_types::control::ProcessEvent>,
    started: Instant,
    shutdown_waiters: Vec<oneshot::Sender<Reply>>,
    /// Answers to requests that changed the table, sent once the step's
    /// commit is durable.
    after_commit: Vec<(oneshot::Sender<Reply>, Reply)>,
    network: network::Network,
    peer_keys: network::PeerKeys,
}

fn err(kind: ErrorKind, message: impl Into<String>) -> Reply {
    Reply::One(Response::Error {
        kind,
        message: message.into(),
    })
}

/// The node's name in addresses.
pub const NODE_NAME: &str = "local";

impl Node {
    /// Stages the rows the last step changed and commits them with whatever
    /// else is staged (the capabilities granted in the same step): the
    /// writer makes them durable in its next group commit. The step's
    /// control requests are answered when it is.
    fn persist(&mut self) {
        let changes = self.kernel.take_changes();
        // A transient child that chose to restart is on disk from now on,
        // its rights with it (in the same commit).
        for p in changes.put.iter().filter(|p| p.spec.transient) {
            if let Some(addr) = self.wasm.address(p.num, &p.spec) {
                self.wasm.bus().keep(&addr.process);
            }
        }
        if !changes.is_empty() {
            table::stage(&self.journal, changes);
        }
        let generation = self.journal.commit();
        if self.after_commit.is_empty() {
            return;
        }
        // Off the loop: the answers wait for the disk, the loop does not.
        let answers = std::mem::take(&mut self.after_commit);
        let journal = self.journal.clone();
        tokio::spawn(async move {
            // A failed write is logged by the journal; the change holds in
            // memory and is retried, so the answer stands.
            let _ = journal.durable(generation).await;
            for (reply, answer) in answers {
                let _ = reply.send(answer);
            }
        });
    }

    /// The record of process `num`, made at its first use.
    fn attached(&mut self, num: ProcessNum) -> &mut Attached {
        self.procs.entry(num).or_insert_with(Attached::new)
    }
}
