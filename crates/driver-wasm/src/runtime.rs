//! The engine and the size of its pool, the compiled-component cache, and
//! the epoch ticker.

use crate::bindings::ProcessPre;
use crate::compiler::Compiler;
use crate::host::ProcessHost;
use spindle_bus::{FileStamp, Found};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine};

/// How often the epoch advances while wasm processes run: the preemption
/// quantum. Short enough that a busy loop delays others by about this much.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);
/// The most wasm processes a node runs at once, whatever the kernel
/// allows: the largest instance pool. Slots are reserved up front (address
/// space, not memory: about 0.6 GiB of it per slot).
pub const MAX_WASM_PROCESSES: u32 = 131_072;
/// The smallest pool, however few mappings the kernel allows.
pub const MIN_WASM_PROCESSES: u32 = 1_024;
/// The pool of a node whose operator asked for no other size. A pool's
/// bookkeeping is resident from the start (about 360 bytes a slot: 3.6 MiB
/// for this one, 60 MiB for the largest), so a machine that allows more
/// mappings does not make every node pay for slots it never uses.
pub const DEFAULT_WASM_PROCESSES: u32 = 10_240;
/// The daemon's environment variable that sizes the pool (a number of
/// processes), read when the daemon starts.
pub const POOL_ENV: &str = "SPINDLE_WASM_PROCESSES";
/// Memory mappings one pool slot costs the daemon (its stack's guard, its
/// memories' and tables' accessible parts split the pool's reservations):
/// the kernel's `vm.max_map_count` is what bounds the pool.
pub const MAPS_PER_PROCESS: u64 = 6;
/// Mappings kept for everything else the daemon maps (its binary and
/// libraries, threads' stacks, databases).
pub const MAPS_KEPT: u64 = 4_096;
/// Where Linux says how many mappings a process may have.
pub const MAX_MAP_COUNT_FILE: &str = "/proc/sys/vm/max_map_count";

/// How many wasm processes the node can run at once: `asked` (by
/// [`POOL_ENV`]; [`DEFAULT_WASM_PROCESSES`] if not), as far as the
/// kernel's mapping limit, if known, leaves room (Linux's default,
/// 65,530, about 10,000), within [`MIN_WASM_PROCESSES`]..=[`MAX_WASM_PROCESSES`].
pub fn pool_size(max_map_count: Option<u64>, asked: Option<u32>) -> u32 {
    // A limit that cannot be read limits nothing that was asked.
    let fits = max_map_count.map_or(u32::MAX, |maps| {
        u32::try_from(maps.saturating_sub(MAPS_KEPT) / MAPS_PER_PROCESS).unwrap_or(u32::MAX)
    });
    asked
        .unwrap_or(DEFAULT_WASM_PROCESSES)
        .min(fits)
        .clamp(MIN_WASM_PROCESSES, MAX_WASM_PROCESSES)
}

/// The `vm.max_map_count` a pool of `processes` needs.
pub fn maps_needed(processes: u32) -> u64 {
    u64::from(processes) * MAPS_PER_PROCESS + MAPS_KEPT
}

/// The pool size the operator asked for in [`POOL_ENV`], if any.
pub fn pool_asked() -> Result<Option<u32>, WasmError> {
    let Some(v) = std::env::var_os(POOL_ENV) else {
        return Ok(None);
    };
    v.to_str()
        .and_then(|t| t.trim().replace('_', "").parse::<u32>().ok())
        .filter(|n| (MIN_WASM_PROCESSES..=MAX_WASM_PROCESSES).contains(n))
        .map(Some)
        .ok_or_else(|| WasmError::PoolSetting {
            value: v.to_string_lossy().into_owned(),
        })
}

/// The pool of this machine: what the operator asked for, as far as its
/// kernel allows.
pub fn pool_here() -> Result<u32, WasmError> {
    let asked = pool_asked()?;
    let maps = max_map_count();
    let pool = pool_size(maps, asked);
    match (asked, maps) {
        (Some(a), _) if a > pool => tracing::warn!(
            "{POOL_ENV}={a}, but the kernel's mapping limit (vm.max_map_count {}) allows {pool} wasm processes: raise it to {} for {a}",
            maps.map_or_else(|| "unreadable".to_string(), |m| m.to_string()),
            maps_needed(a)
        ),
        _ => tracing::info!("the wasm pool holds {pool} processes"),
    }
    Ok(pool)
}

/// How to make the pool larger, if it can be: the pool is sized when the
/// daemon starts.
fn raise_hint(pool: u32) -> String {
    if pool >= MAX_WASM_PROCESSES {
        return String::new();
    }
    let want = pool.saturating_mul(2).min(MAX_WASM_PROCESSES);
    let maps = max_map_count();
    let sysctl = match maps {
        Some(m) if m < maps_needed(want) => format!(
            " with `sysctl -w vm.max_map_count={}` (now {m})",
            maps_needed(want).next_power_of_two()
        ),
        _ => String::new(),
    };
    format!(", or restart the daemon with {POOL_ENV}={want}{sysctl}")
}

/// This machine's `vm.max_map_count`, if it can be read.
pub fn max_map_count() -> Option<u64> {
    std::fs::read_to_string(MAX_MAP_COUNT_FILE)
        .ok()?
        .trim()
        .parse()
        .ok()
}
/// Largest linear memory any wasm process may have (its `max_memory` must be
/// at most this): the size of each pooled memory slot.
pub const MAX_WASM_MEMORY: usize = spindle_types::spec::MAX_WASM_MEMORY as usize;
/// Core instances a component may need: the program, the small shim and
/// fixup modules a component's lowered imports are made of, and the WASI
/// adapter of a program built for preview 1. Only a count: it costs the
/// pool nothing.
const CORE_INSTANCES_PER_PROCESS: u32 = 4;
/// Linear memories a component may have: the program's. An adapter or a
/// shim uses the program's memory (a component toolchain allows it no
/// other). Each slot of the pool keeps about 190 bytes of bookkeeping
/// resident whether used or not (a second memory a process cost the node
/// 1.9 MiB at the default pool) and reserves its address space.
const MEMORIES_PER_PROCESS: u32 = 1;
/// Tables a component may have: the program's, its shim's, and one an
/// adapter may bring (about 32 bytes of resident bookkeeping a slot).
const TABLES_PER_PROCESS: u32 = 3;
/// Memory kept resident in a freed slot (reset in place rather than handed
/// back to the kernel): none. Kept blindly, wasmtime resets the kept part
/// whether or not the process touched it (measured with 64 KiB: 10,000
/// stopped in 5.2 s instead of 0.38 s; 100,000 in over 40 s and +4 GiB
/// resident, vs 8.9 s). Kept with its `PAGEMAP_SCAN` reset (only the pages
/// the process wrote are copied back), 16 KiB made a transaction 60 → 40 µs
/// and a restart 38–63 → 20–29 µs, but that reset skips a written page that
/// is swapped out or being migrated when the slot is freed, and neither
/// resets nor decommits it: the next process in the slot could read it (and,
/// in a table, call a stale function reference). A slot handed back whole
/// has no such gap. (The async stacks keep nothing either: they are not
/// zeroed between processes, so keeping them resident would save nothing.)
const KEEP_RESIDENT: usize = 0;
/// Freed slots whose memory is handed back to the kernel together. One at a
/// time: a slot waiting in a batch cannot be reused, so a restart then lands
/// in a cold slot (measured: restart 56–59 µs unbatched, 78–88 µs in
/// batches of 32, for no gain in spawns).
const DECOMMIT_BATCH: usize = 1;

#[derive(Debug, thiserror::Error)]
pub enum WasmError {
    #[error("cannot read component {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid WebAssembly component: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error(
        "{path} does not fit Spindle's process world (spindle:process@0.2.0): {message}; build it against crates/process-lib"
    )]
    Link { path: PathBuf, message: String },
    #[error("the wasm engine could not be set up: {0}")]
    Engine(String),
    #[error(
        "{POOL_ENV}={value} is not a number of wasm processes from {MIN_WASM_PROCESSES} to {MAX_WASM_PROCESSES}: fix or unset it"
    )]
    PoolSetting { value: String },
    #[error(transparent)]
    Bus(#[from] spindle_bus::BusError),
    #[error("not a wasm process")]
    NotWasm,
    #[error("the node already runs {pool} wasm processes, all its pool holds: stop some first{}", raise_hint(*pool))]
    PoolFull { pool: u32 },
    #[error("the compiler failed on {path}: {message}")]
    Compiler { path: PathBuf, message: String },
}

/// Components compiled at once, off the control loop: a package that spawns
/// large components waits for its own compiles, and others' starts (of
/// components already loaded) do not wait at all.
pub const COMPILES_AT_ONCE: usize = 2;

/// The node's engine, made when the first wasm process needs it, shared by
/// the driver and its [`Loader`]s.
pub(crate) struct LazyRuntime {
    cache_dir: PathBuf,
    max_processes: u32,
    compiler: Compiler,
    made: Mutex<Option<Arc<Runtime>>>,
}

impl LazyRuntime {
    /// The pool the engine has (or will have when made).
    pub(crate) fn max_processes(&self) -> u32 {
        self.max_processes
    }

    pub(crate) fn new(cache_dir: &Path, max_processes: u32, compiler: Compiler) -> LazyRuntime {
        LazyRuntime {
            cache_dir: cache_dir.into(),
            max_processes,
            compiler,
            made: Mutex::new(None),
        }
    }

    pub(crate) fn get(&self) -> Result<Arc<Runtime>, WasmError> {
        let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = &*made {
            return Ok(r.clone());
        }
        let r = Arc::new(Runtime::new(
            &self.cache_dir,
            self.max_processes,
            self.compiler.clone(),
        )?);
        *made = Some(r.clone());
        Ok(r)
    }

    fn made(&self) -> Option<Arc<Runtime>> {
        self.made.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Compiles components ahead of the control loop, on blocking threads, at
/// most [`COMPILES_AT_ONCE`] at a time; the loop's own load then finds the
/// component ready in memory.
#[derive(Clone)]
pub struct Loader {
    runtime: Arc<LazyRuntime>,
    compiling: Arc<tokio::sync::Semaphore>,
}

impl Loader {
    /// Is the component at `path` loaded (and the file unchanged)?
    pub fn is_ready(&self, path: &Path) -> bool {
        self.runtime
            .made()
            .is_some_and(|r| r.cached(path).is_some())
    }

    /// Is the file a spawn found the one loaded (no further lookup)?
    pub fn is_found_ready(&self, found: &Found) -> bool {
        self.runtime
            .made()
            .is_some_and(|r| r.cached_as(&found.path, &found.stamp).is_some())
    }

    pub(crate) fn new(runtime: Arc<LazyRuntime>) -> Loader {
        Loader {
            runtime,
            compiling: Arc::new(tokio::sync::Semaphore::new(COMPILES_AT_ONCE)),
        }
    }

    /// Makes the component at `path` ready to instantiate (see
    /// [`Runtime::load`]); the error is the one a start would report.
    pub async fn warm(&self, path: &Path, confined: bool) -> Result<(), WasmError> {
        if self.is_ready(path) {
            return Ok(());
        }
        let _turn = self.compiling.acquire().await;
        let runtime = self.runtime.clone();
        let owned = path.to_path_buf();
        tokio::task::spawn_blocking(move || runtime.get()?.load(&owned, confined).map(drop))
            .await
            .unwrap_or_else(|e| {
                Err(WasmError::Compiler {
                    path: path.into(),
                    message: match e.try_into_panic() {
                        Ok(p) => spindle_types::fault::panic_text(&*p),
                        Err(e) => e.to_string(),
                    },
                })
            })
    }
}

/// Gives the memory the allocator holds free back to the system: after a
/// compile (the compiler's working set is tens of MiB) or after many
/// processes ended (their host-side records, ~25 KiB each), which it would
/// otherwise keep (in every thread's arena) for the daemon's whole life.
pub(crate) fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory of the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Largest component file the node loads (it is read whole and compiled):
/// well above real guests (~60 KiB to a few MiB).
pub const MAX_COMPONENT_BYTES: u64 = 64 << 20;
/// What every WebAssembly file starts with.
const WASM_MAGIC: &[u8] = b"\0asm";

/// Reads a component file: a regular file (never a FIFO or a device, which
/// could block or never end), at most [`MAX_COMPONENT_BYTES`] of it.
fn read_component(path: &Path, confined: bool) -> std::io::Result<(Vec<u8>, FileStamp)> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = match confined.then(|| open_without_links(path)) {
        Some(Ok(f)) => f,
        // A kernel without openat2 (before 5.6): the last component still
        // may not be a link.
        Some(Err(e)) if e.raw_os_error() != Some(libc::ENOSYS) => return Err(e),
        _ => std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
            .open(path)?,
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mut bytes = Vec::new();
    (&file)
        .take(MAX_COMPONENT_BYTES + 1)
        .read_to_end(&mut bytes)?;
    // Rewritten in place while it was read: not bytes to compile (the next
    // start reads it again).
    if FileStamp::of(&file.metadata()?) != FileStamp::of(&meta) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::Interrupted,
            "it changed while it was read",
        ));
    }
    if bytes.len() as u64 > MAX_COMPONENT_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("larger than a component may be ({MAX_COMPONENT_BYTES} bytes)"),
        ));
    }
    Ok((bytes, FileStamp::of(&meta)))
}

/// Opens `path` for reading, refusing a symbolic link anywhere on it.
fn open_without_links(path: &Path) -> std::io::Result<std::fs::File> {
    use nix::fcntl::{AT_FDCWD, OFlag, OpenHow, ResolveFlag, openat2};
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
    let fd = openat2(AT_FDCWD, path, how).map_err(std::io::Error::from)?;
    Ok(std::fs::File::from(fd))
}

/// A compiler's error without the bytes it quotes (`actual=[0x…]`).
pub(crate) fn quiet(message: &str) -> String {
    match message.find("actual=") {
        Some(at) => message[..at]
            .trim_end()
            .trim_end_matches('-')
            .trim_end()
            .to_string(),
        None => message.to_string(),
    }
}

/// The engine's settings: with the pool of `max_processes` for running
/// processes, or without one for a compile helper. Everything that shapes
/// the compiled code is the same in both, so a helper's artifact loads in
/// the daemon's engine.
pub(crate) fn engine_config(max_processes: Option<u32>) -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    config.memory_reservation(MAX_WASM_MEMORY as u64);
    if let Some(max_processes) = max_processes {
        let mut pool = wasmtime::PoolingAllocationConfig::new();
        // Each component gets at most its share of the pool's totals, so
        // one cannot take others' core instances, memories or tables.
        pool.total_component_instances(max_processes)
            .total_core_instances(max_processes * CORE_INSTANCES_PER_PROCESS)
            .max_core_instances_per_component(CORE_INSTANCES_PER_PROCESS)
            .total_memories(max_processes * MEMORIES_PER_PROCESS)
            .max_memories_per_component(MEMORIES_PER_PROCESS)
            .total_tables(max_processes * TABLES_PER_PROCESS)
            .max_tables_per_component(TABLES_PER_PROCESS)
            .total_stacks(max_processes)
            .max_memory_size(MAX_WASM_MEMORY)
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(KEEP_RESIDENT)
            .async_stack_keep_resident(KEEP_RESIDENT)
            .decommit_batch_size(DECOMMIT_BATCH);
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
    }
    config
}

/// Writes `artifact` to the cache file `cached` whole or not at all.
fn keep(cached: &Path, artifact: &[u8]) -> std::io::Result<()> {
    // Unique among compiles at once (two paths may hold the same bytes).
    static COMPILES: AtomicUsize = AtomicUsize::new(0);
    let tmp = cached.with_extension(format!("{}.tmp", COMPILES.fetch_add(1, Ordering::Relaxed)));
    let written = std::fs::write(&tmp, artifact).and_then(|()| std::fs::rename(&tmp, cached));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Removes the artifacts a compile left half-written when its daemon died
/// (one daemon uses a home at a time, so none is being written now).
fn sweep_unfinished(cache_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(cache_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "tmp") {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// What loading a component file came to.
#[derive(Clone)]
enum Loaded {
    Ready(ProcessPre<ProcessHost>),
    /// It does not compile or link: the same bytes are never compiled
    /// again (a failed compile may have taken the helper's whole budget).
    Refused(Refusal),
}

#[derive(Clone)]
enum Refusal {
    Invalid(String),
    Link(String),
}

impl Refusal {
    fn of(e: &WasmError) -> Option<Refusal> {
        match e {
            WasmError::Invalid { message, .. } => Some(Refusal::Invalid(message.clone())),
            WasmError::Link { message, .. } => Some(Refusal::Link(message.clone())),
            _ => None,
        }
    }

    fn error(&self, path: &Path) -> WasmError {
        let path = path.into();
        match self {
            Refusal::Invalid(message) => WasmError::Invalid {
                path,
                message: message.clone(),
            },
            Refusal::Link(message) => WasmError::Link {
                path,
                message: message.clone(),
            },
        }
    }
}

/// Refused files remembered at most; past it the refusals are forgotten
/// (and a refused file is judged again), so junk files cost the node
/// bounded memory.
const MAX_REFUSED: usize = 256;

/// Engine + linker + caches, shared by every wasm process of the node.
pub struct Runtime {
    engine: Engine,
    linker: Linker<ProcessHost>,
    compiler: Compiler,
    cache_dir: PathBuf,
    /// Each component file the node has loaded or refused, as it was.
    loaded: Mutex<HashMap<PathBuf, (FileStamp, Loaded)>>,
    ticker: Arc<Ticker>,
}

/// Bumps the engine's epoch while any wasm process runs; parks otherwise,
/// so an idle node costs nothing.
struct Ticker {
    live: AtomicUsize,
    thread: Mutex<Option<std::thread::Thread>>,
}

impl Ticker {
    fn start(engine: Engine) -> Result<Arc<Ticker>, WasmError> {
        let t = Arc::new(Ticker {
            live: AtomicUsize::new(0),
            thread: Mutex::new(None),
        });
        let me = t.clone();
        let handle = std::thread::Builder::new()
            .name("spindle-epoch".into())
            .spawn(move || {
                loop {
                    if me.live.load(Ordering::Acquire) == 0 {
                        std::thread::park();
                        continue;
                    }
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .map_err(|e| WasmError::Engine(format!("no thread for the epoch ticker: {e}")))?;
        *t.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle.thread().clone());
        Ok(t)
    }
}

/// Counts one running wasm process for the ticker while alive.
pub struct TickGuard(Arc<Ticker>);

impl Drop for TickGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Runtime {
    /// An engine whose pool holds `max_processes` wasm processes at once,
    /// compiling with `compiler`.
    pub fn new(
        cache_dir: &Path,
        max_processes: u32,
        compiler: Compiler,
    ) -> Result<Runtime, WasmError> {
        let config = engine_config(Some(max_processes));
        let engine = Engine::new(&config).map_err(|e| WasmError::Engine(e.to_string()))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| WasmError::Engine(e.to_string()))?;
        crate::bindings::Process::add_to_linker::<_, HasSelf<_>>(&mut linker, |h| h)
            .map_err(|e| WasmError::Engine(e.to_string()))?;
        std::fs::create_dir_all(cache_dir).map_err(|source| WasmError::Read {
            path: cache_dir.into(),
            source,
        })?;
        sweep_unfinished(cache_dir);
        let ticker = Ticker::start(engine.clone())?;
        Ok(Runtime {
            engine,
            linker,
            compiler,
            cache_dir: cache_dir.into(),
            loaded: Mutex::new(HashMap::new()),
            ticker,
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Marks a process as running for the epoch ticker until the guard drops.
    pub fn tick_guard(&self) -> TickGuard {
        if self.ticker.live.fetch_add(1, Ordering::AcqRel) == 0
            && let Some(t) = &*self.ticker.thread.lock().unwrap_or_else(|p| p.into_inner())
        {
            t.unpark();
        }
        TickGuard(self.ticker.clone())
    }

    /// The linked, ready-to-instantiate form of the component at `path`:
    /// from memory if the file is unchanged, else from the disk cache, else
    /// compiled (and cached). A `confined` path (a process's spawn, already
    /// resolved inside its folder) is opened without following any
    /// symbolic link, so a link swapped in since cannot lead outside.
    pub fn load(&self, path: &Path, confined: bool) -> Result<ProcessPre<ProcessHost>, WasmError> {
        let meta = std::fs::metadata(path).map_err(|source| WasmError::Read {
            path: path.into(),
            source,
        })?;
        self.load_found(
            &Found {
                path: path.into(),
                stamp: FileStamp::of(&meta),
            },
            confined,
        )
    }

    /// [`Runtime::load`] of a file already looked up (a spawn's component,
    /// [`spindle_bus::confine`]): from memory without another lookup if it
    /// is the file loaded before.
    pub fn load_found(
        &self,
        found: &Found,
        confined: bool,
    ) -> Result<ProcessPre<ProcessHost>, WasmError> {
        let (path, stamp) = (found.path.as_path(), &found.stamp);
        let read_err = |source| WasmError::Read {
            path: path.into(),
            source,
        };
        if stamp.bytes() > MAX_COMPONENT_BYTES {
            return Err(WasmError::Invalid {
                path: path.into(),
                message: format!(
                    "{} bytes, more than a component may have ({MAX_COMPONENT_BYTES})",
                    stamp.bytes()
                ),
            });
        }
        match self.known_as(path, stamp) {
            Some(Loaded::Ready(pre)) => return Ok(pre),
            Some(Loaded::Refused(why)) => return Err(why.error(path)),
            None => {}
        }
        // What is compiled is known by the stamp of the file read (which a
        // swap since the lookup makes another file).
        let (bytes, read) = read_component(path, confined).map_err(read_err)?;
        let made = self.compile_cached(path, &bytes).and_then(|component| {
            self.linker
                .instantiate_pre(&component)
                .and_then(ProcessPre::new)
                .map_err(|e| WasmError::Link {
                    path: path.into(),
                    message: format!("{e:#}"),
                })
        });
        let outcome = match &made {
            Ok(pre) => Loaded::Ready(pre.clone()),
            Err(e) => match Refusal::of(e) {
                Some(why) => Loaded::Refused(why),
                // Not the bytes' fault (no helper, a full disk): tried again.
                None => return made,
            },
        };
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(outcome, Loaded::Refused(_))
            && loaded
                .values()
                .filter(|(_, l)| matches!(l, Loaded::Refused(_)))
                .count()
                >= MAX_REFUSED
        {
            loaded.retain(|_, (_, l)| matches!(l, Loaded::Ready(_)));
        }
        loaded.insert(path.into(), (read, outcome));
        made
    }

    /// The component at `path`, if it is loaded and the file unchanged.
    pub fn cached(&self, path: &Path) -> Option<ProcessPre<ProcessHost>> {
        let meta = std::fs::metadata(path).ok()?;
        self.cached_as(path, &FileStamp::of(&meta))
    }

    fn cached_as(&self, path: &Path, stamp: &FileStamp) -> Option<ProcessPre<ProcessHost>> {
        match self.known_as(path, stamp)? {
            Loaded::Ready(pre) => Some(pre),
            Loaded::Refused(_) => None,
        }
    }

    /// What loading the file at `path` came to, if it is unchanged since.
    fn known_as(&self, path: &Path, stamp: &FileStamp) -> Option<Loaded> {
        let loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        let (s, l) = loaded.get(path)?;
        (s == stamp).then(|| l.clone())
    }

    fn cache_file(&self, bytes: &[u8]) -> PathBuf {
        let mut h = std::hash::DefaultHasher::new();
        bytes.hash(&mut h);
        self.engine.precompile_compatibility_hash().hash(&mut h);
        self.cache_dir
            .join(format!("{:016x}-{}.cwasm", h.finish(), bytes.len()))
    }

    fn compile_cached(&self, path: &Path, bytes: &[u8]) -> Result<Component, WasmError> {
        let cached = self.cache_file(bytes);
        if cached.exists() {
            // SAFETY: the artifact was written by this engine configuration
            // (the key includes its compatibility hash) into the node's
            // private cache directory; wasmtime still checks its header and
            // an unusable file is recompiled below.
            match unsafe { Component::deserialize_file(&self.engine, &cached) } {
                Ok(c) => return Ok(c),
                Err(e) => tracing::warn!(
                    "cached artifact {} unusable ({e}); recompiling",
                    cached.display()
                ),
            }
        }
        // Only what the file is, never what it holds: a process may point
        // the node at any file, and the error goes back to it.
        if !bytes.starts_with(WASM_MAGIC) {
            return Err(WasmError::Invalid {
                path: path.into(),
                message: "it is not a WebAssembly file (build it for wasm32-wasip2)".into(),
            });
        }
        let artifact = match &self.compiler {
            Compiler::Helper { program, args } => {
                crate::compiler::in_helper(program, args, path, bytes)?
            }
            Compiler::InProcess => {
                let made = self.engine.precompile_component(bytes);
                trim_heap();
                made.map_err(|e| WasmError::Invalid {
                    path: path.into(),
                    message: quiet(&e.root_cause().to_string()),
                })?
            }
        };
        let loaded = match keep(&cached, &artifact) {
            // Run from the artifact's file mapping (clean pages the kernel
            // may drop and read again).
            // SAFETY: written just now from a compiler of this engine's
            // settings into the node's private cache directory; wasmtime
            // checks that its header matches this engine.
            Ok(()) => unsafe { Component::deserialize_file(&self.engine, &cached) },
            Err(e) => {
                tracing::warn!(
                    "cannot keep the compiled form of {} in {} ({e}): running it from memory",
                    path.display(),
                    cached.display()
                );
                // SAFETY: as above, straight from the compiler.
                unsafe { Component::deserialize(&self.engine, &artifact) }
            }
        };
        drop(artifact);
        trim_heap();
        loaded.map_err(|e| {
            let _ = std::fs::remove_file(&cached);
            WasmError::Compiler {
                path: path.into(),
                message: format!("the compiled component does not load: {e:#}"),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_is_what_was_asked_as_far_as_the_kernel_allows() {
        // Linux's default leaves room for about 10,000.
        let default = pool_size(Some(65_530), None);
        assert!((10_000..=10_300).contains(&default), "{default}");
        assert!(maps_needed(default) <= 65_530);
        // A machine that allows more does not make the pool larger
        // unasked; asked, it grows as far as the kernel lets it.
        assert_eq!(pool_size(Some(u64::MAX), None), DEFAULT_WASM_PROCESSES);
        assert_eq!(
            pool_size(Some(maps_needed(100_000)), Some(100_000)),
            100_000
        );
        assert_eq!(pool_size(Some(65_530), Some(100_000)), default);
        assert_eq!(
            pool_size(Some(u64::MAX), Some(u32::MAX)),
            MAX_WASM_PROCESSES
        );
        // Unreadable: what was asked; tiny: the floor.
        assert_eq!(pool_size(None, None), DEFAULT_WASM_PROCESSES);
        assert_eq!(pool_size(None, Some(50_000)), 50_000);
        assert_eq!(pool_size(Some(0), Some(50_000)), MIN_WASM_PROCESSES);
    }

    /// A component of two core modules, each with a memory of its own.
    fn two_memories() -> Vec<u8> {
        let module: &[u8] = b"\0asm\x01\0\0\0\x05\x03\x01\x00\x01";
        let mut c = b"\0asm\x0d\0\x01\0".to_vec();
        c.push(1);
        c.push(module.len() as u8);
        c.extend_from_slice(module);
        // Two instances of it.
        c.extend_from_slice(&[2, 7, 2, 0, 0, 0, 0, 0, 0]);
        c
    }

    #[test]
    fn a_component_needing_more_than_a_process_share_of_the_pool_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("two.wasm");
        std::fs::write(&path, two_memories()).unwrap();
        let runtime = Runtime::new(&dir.path().join("cache"), 64, Compiler::InProcess).unwrap();
        let why = match runtime.load(&path, false) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("a component with two memories loaded"),
        };
        assert!(
            why.contains("two.wasm") && why.contains("2 Wasm linear memories"),
            "{why}"
        );
        // Nothing of it is kept to be loaded next time.
        let kept = std::fs::read_dir(dir.path().join("cache")).unwrap().count();
        assert_eq!(kept, 0);
    }

    #[test]
    fn a_refused_file_is_compiled_once_until_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let count = dir.path().join("compiles");
        // A stand-in helper that counts its compiles and refuses each.
        let script = format!(
            "cat >/dev/null; echo x >> {}; echo 'invalid no good'",
            count.display()
        );
        let helper = Compiler::Helper {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into(), "helper".into()],
        };
        let runtime = Runtime::new(&dir.path().join("cache"), 64, helper).unwrap();
        let path = dir.path().join("bad.wasm");
        std::fs::write(&path, b"\0asm\x0d\0\x01\0one").unwrap();
        let compiles = || std::fs::read_to_string(&count).unwrap().lines().count();
        for _ in 0..3 {
            let why = runtime.load(&path, false).err().unwrap().to_string();
            assert!(why.contains("bad.wasm") && why.contains("no good"), "{why}");
        }
        assert_eq!(compiles(), 1);
        // Other bytes are judged afresh.
        std::fs::write(&path, b"\0asm\x0d\0\x01\0other").unwrap();
        assert!(runtime.load(&path, false).is_err());
        assert_eq!(compiles(), 2);
    }

    #[test]
    fn a_confined_component_is_read_through_no_link() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("real")).unwrap();
        std::fs::write(dir.path().join("real/x.wasm"), b"\0asm").unwrap();
        std::os::unix::fs::symlink(dir.path().join("real"), dir.path().join("swapped")).unwrap();
        let direct = dir.path().join("real/x.wasm");
        let linked = dir.path().join("swapped/x.wasm");
        assert_eq!(read_component(&direct, true).unwrap().0, b"\0asm");
        // A directory swapped for a link after the check leads nowhere.
        assert!(read_component(&linked, true).is_err());
        // The operator's own paths may go through links.
        assert_eq!(read_component(&linked, false).unwrap().0, b"\0asm");
        // Never a FIFO.
        let fifo = dir.path().join("real/pipe.wasm");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        assert!(read_component(&fifo, true).is_err());
        assert!(read_component(&fifo, false).is_err());
    }
}
