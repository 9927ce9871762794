//! Runs wasm processes: one task and one `Store` each.

use crate::bindings::ProcessPre;
use crate::bindings::spindle::process::types as wit;
use crate::compiler::Compiler;
use crate::host::{self, ProcessHost, Shared};
pub use crate::runtime::MAX_WASM_PROCESSES;
use crate::runtime::{LazyRuntime, Loader, Runtime, TickGuard, WasmError};
use spindle_bus::{Bus, Capability, Envelope, Message, SpawnCall};
use spindle_kernel::RunId;
use spindle_logs::{LineSink, LogHub, Shaping, Stream};
use spindle_types::{
    Address, ExitStatus, OnExit, PackageId, ProcessId, ProcessNum, ProcessSpec, Program,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use wasmtime::{Store, StoreLimitsBuilder, UpdateDeadline};

/// Memory cap of a wasm process whose spec sets none: room for ordinary
/// services, small enough that a runaway one is stopped long before the node
/// feels it.
pub const DEFAULT_MEMORY_CAP: usize = 64 << 20;
pub use spindle_abi::STOPPING_METADATA;
/// Spawn calls from guests queued for the control loop.
const SPAWN_QUEUE: usize = 256;

/// What the driver reports to the control loop.
#[derive(Debug)]
pub enum WasmEvent {
    Exited {
        num: ProcessNum,
        run: RunId,
        status: ExitStatus,
        detail: Option<String>,
        /// The policy in force at exit (the process may have changed it).
        on_exit: OnExit,
    },
}

/// One on-exit request, as stored in a spec (`OnExit::Requests`).
#[derive(serde::Serialize, serde::Deserialize)]
struct ExitRequest {
    target: Address,
    inherit: bool,
    body: Vec<u8>,
    metadata: Option<String>,
    capabilities: Vec<Capability>,
    blob: Option<(Option<String>, Vec<u8>)>,
}

pub(crate) fn on_exit_from_wit(o: &wit::OnExit) -> OnExit {
    match o {
        wit::OnExit::None => OnExit::None,
        wit::OnExit::Restart => OnExit::Restart,
        wit::OnExit::Requests(list) => OnExit::Requests(
            // One with a malformed target or capability could never be
            // delivered: it is left out, like a request to a target that is gone.
            list.iter()
                .filter_map(|(target, req, blob)| {
                    let request = host::from_wit_request(req.clone()).ok()?;
                    let value = serde_json::to_value(ExitRequest {
                        target: host::from_wit_addr(target)?,
                        inherit: request.inherit,
                        body: request.body,
                        metadata: request.metadata,
                        capabilities: request.capabilities,
                        blob: blob.as_ref().map(|b| (b.mime.clone(), b.bytes.clone())),
                    });
                    Some(value.expect("exit requests serialise"))
                })
                .collect(),
        ),
    }
}

fn on_exit_to_wit(o: &OnExit) -> wit::OnExit {
    match o {
        OnExit::None => wit::OnExit::None,
        OnExit::Restart => wit::OnExit::Restart,
        OnExit::Requests(list) => wit::OnExit::Requests(
            list.iter()
                .filter_map(|v| serde_json::from_value::<ExitRequest>(v.clone()).ok())
                .map(|r| {
                    (
                        host::to_wit_addr(&r.target),
                        wit::Request {
                            inherit: r.inherit,
                            expects_response: None,
                            body: r.body,
                            metadata: r.metadata,
                            capabilities: r
                                .capabilities
                                .iter()
                                .map(|c| wit::Capability {
                                    issuer: host::to_wit_addr(&c.issuer),
                                    params: c.params.clone(),
                                })
                                .collect(),
                        },
                        r.blob.map(|(mime, bytes)| wit::Blob { mime, bytes }),
                    )
                })
                .collect(),
        ),
    }
}

/// WASI stdout/stderr of a process, into its log.
#[derive(Clone)]
struct LogOut(Arc<Mutex<LineSink>>);

impl wasmtime_wasi::cli::IsTerminal for LogOut {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for LogOut {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl tokio::io::AsyncWrite for LogOut {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut sink = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // A failed write (full disk) must not kill the process: it is dropped
        // and counted by the sink.
        let _ = sink.feed(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

struct LiveWasm {
    run: RunId,
    kill: Arc<host::Kill>,
    process: ProcessId,
}

/// Starts and stops wasm processes for one node. The engine is created with
/// the first wasm process: a node that runs none pays nothing for it (no
/// pool reservations, no ticker thread).
pub struct WasmDriver {
    runtime: Arc<LazyRuntime>,
    shared: Arc<Shared>,
    hub: Arc<LogHub>,
    logs_dir: PathBuf,
    runs: HashMap<ProcessNum, LiveWasm>,
    /// The most runs live since the heap was last trimmed ([`TRIM_AFTER_ENDS`]).
    peak_runs: usize,
    /// The component a spawn's checks just loaded, for the start that
    /// follows them ([`WasmDriver::prepare`]); taken by that start, and
    /// dropped when the spawn is answered ([`WasmDriver::unprepare`]).
    prepared: Option<(PathBuf, ProcessPre<ProcessHost>)>,
    events: mpsc::UnboundedSender<WasmEvent>,
}

/// Runs that end between two trims of the heap: once this many, and at
/// least half of those live at their peak, have ended, the allocator gives
/// their freed records back (a few trims after a burst, never one per
/// exit: a trim walks the whole heap; measured: 163 MiB back after 9,000
/// ended, in a blocking thread's few tens of milliseconds).
const TRIM_AFTER_ENDS: usize = 1024;

/// Hands processes' spawn calls to the control loop once their component is
/// compiled, so the loop never compiles one. A component that does not load
/// is answered here, with the error the loop would give.
async fn warm_spawns(
    mut asked: mpsc::Receiver<SpawnCall>,
    ready: mpsc::Sender<SpawnCall>,
    loader: Loader,
) {
    while let Some(mut call) = asked.recv().await {
        // Resolved once (here, unless the caller did): the loop uses what
        // was found.
        // A refused path is the loop's to report.
        let path = match call.resolve_once() {
            Ok(found) if !loader.is_found_ready(&found) => found.path,
            _ => {
                if ready.send(call).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let (ready, loader) = (ready.clone(), loader.clone());
        tokio::spawn(async move {
            match loader.warm(&path, true).await {
                Ok(()) => {
                    let _ = ready.send(call).await;
                }
                Err(e) => {
                    let _ = call
                        .reply
                        .send(Err(spindle_bus::SpawnError::Refused(e.to_string())));
                }
            }
        });
    }
}

/// The address a process of `spec` numbered `num` has on the bus (a wasm
/// process, or a native one with an IPC channel).
pub fn address_of(node: &str, num: ProcessNum, spec: &ProcessSpec) -> Option<Address> {
    let (package, _) = spec.program.bus()?;
    Some(Address {
        node: node.into(),
        process: ProcessId {
            process: spec.name.clone().unwrap_or_else(|| num.to_string()),
            package: package.clone(),
        },
    })
}

impl WasmDriver {
    /// The driver, the stream of its events, and the stream of guests' spawn
    /// calls. The engine (pooling `max_processes`, caching compiled components
    /// in `cache_dir`, compiling with `compiler`) is made when first needed.
    pub fn new(
        cache_dir: &Path,
        max_processes: u32,
        compiler: Compiler,
        bus: Arc<Bus>,
        hub: Arc<LogHub>,
        logs_dir: &Path,
        state_dir: &Path,
    ) -> std::io::Result<(
        WasmDriver,
        mpsc::UnboundedReceiver<WasmEvent>,
        mpsc::Receiver<SpawnCall>,
    )> {
        std::fs::create_dir_all(state_dir)?;
        let (events, events_rx) = mpsc::unbounded_channel();
        let (spawns, asked) = mpsc::channel(SPAWN_QUEUE);
        let (ready, spawns_rx) = mpsc::channel(SPAWN_QUEUE);
        let runtime = Arc::new(LazyRuntime::new(cache_dir, max_processes, compiler));
        let loader = Loader::new(runtime.clone());
        tokio::spawn(warm_spawns(asked, ready.clone(), loader.clone()));
        Ok((
            WasmDriver {
                runtime,
                shared: Arc::new(Shared {
                    bus,
                    state_dir: state_dir.into(),
                    spawns,
                    to_loop: ready,
                    loader,
                    ready: Default::default(),
                    instantiated: Default::default(),
                }),
                hub,
                logs_dir: logs_dir.into(),
                runs: HashMap::new(),
                peak_runs: 0,
                prepared: None,
                events,
            },
            events_rx,
            spawns_rx,
        ))
    }

    pub fn bus(&self) -> &Arc<Bus> {
        &self.shared.bus
    }

    /// Where spawn calls go (the stream returned by [`WasmDriver::new`]),
    /// for native processes' bridges.
    pub fn spawn_calls(&self) -> mpsc::Sender<SpawnCall> {
        self.shared.spawns.clone()
    }

    pub fn address(&self, num: ProcessNum, spec: &ProcessSpec) -> Option<Address> {
        address_of(self.shared.bus.node(), num, spec)
    }

    fn runtime(&mut self) -> Result<Arc<Runtime>, WasmError> {
        self.runtime.get()
    }

    /// Compiles components off the control loop (for whoever hands the loop
    /// a start: the control server).
    pub fn loader(&self) -> Loader {
        self.shared.loader.clone()
    }

    /// Loads (compiles or fetches from cache) the component, so a bad file is
    /// an error before anything starts.
    pub fn preflight(&mut self, spec: &ProcessSpec) -> Result<(), WasmError> {
        match &spec.program {
            Program::Wasm { path, .. } => self
                .runtime()?
                .load(path, spec.parent.is_some())
                .map(|_| ()),
            Program::Native { .. } => Ok(()),
        }
    }

    /// Loads the component a process's spawn found (see
    /// [`Runtime::load_found`]) so a bad file is an error before anything
    /// starts, and keeps it for the start that follows.
    pub fn prepare(&mut self, found: &spindle_bus::Found) -> Result<(), WasmError> {
        let pre = self.runtime()?.load_found(found, true)?;
        self.prepared = Some((found.path.clone(), pre));
        Ok(())
    }

    /// Drops what [`WasmDriver::prepare`] kept, if no start took it (the
    /// spawn was refused): a later start loads its file afresh.
    pub fn unprepare(&mut self) {
        self.prepared = None;
    }

    /// Starts a run; returns the process's address.
    pub fn spawn(
        &mut self,
        num: ProcessNum,
        run: RunId,
        spec: &ProcessSpec,
        tap: Option<spindle_logs::LogTap>,
    ) -> Result<Address, WasmError> {
        let (Program::Wasm { path, public, .. }, Some(our)) =
            (&spec.program, self.address(num, spec))
        else {
            return Err(WasmError::NotWasm);
        };
        let pool = self.pool();
        if !self.runs.contains_key(&num) && self.runs.len() >= pool as usize {
            return Err(WasmError::PoolFull { pool });
        }
        let prepared = self.prepared.take().filter(|(p, _)| p == path);
        let runtime = self.runtime()?;
        let pre: ProcessPre<ProcessHost> = match prepared {
            Some((_, pre)) => pre,
            None => runtime.load(path, spec.parent.is_some())?,
        };
        let our = Arc::new(our);
        let (out_path, err_path) = spec.log_paths(&self.logs_dir, num.0);
        let open = |p: &Path| self.hub.open(p, spec.log.max_size, spec.log.keep);
        let shaping = Shaping {
            strip_ansi: spec.log.strip_ansi,
            timestamps: spec.log.timestamps,
        };
        let out = Arc::new(Mutex::new(LineSink::new(
            open(&out_path),
            Stream::Out,
            shaping,
            tap.clone(),
        )));
        let err = Arc::new(Mutex::new(LineSink::new(
            open(&err_path),
            Stream::Err,
            shaping,
            tap,
        )));
        let mailbox = self.shared.bus.register_sized(
            (*our).clone(),
            *public,
            spec.budgets.mailbox_bytes() as usize,
        )?;
        let wasi = wasmtime_wasi::WasiCtxBuilder::new()
            .stdout(LogOut(out.clone()))
            .stderr(LogOut(err))
            .build();
        let cap = spec
            .max_memory
            .map(|m| m as usize)
            .unwrap_or(DEFAULT_MEMORY_CAP);
        let limits = StoreLimitsBuilder::new()
            .memory_size(cap)
            .trap_on_grow_failure(true)
            .build();
        let kill = Arc::new(host::Kill::default());
        let host = ProcessHost::new(
            wasi,
            limits,
            self.shared.clone(),
            num,
            our.clone(),
            mailbox,
            on_exit_to_wit(&spec.on_exit),
            out,
            kill.clone(),
            path.parent().map(Path::to_path_buf).unwrap_or_default(),
        );
        let mut store = Store::new(runtime.engine(), host);
        store.limiter(|h| &mut h.limits);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|ctx| {
            if ctx.data().is_killed() {
                return Err(host::killed());
            }
            Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(tokio::task::yield_now()),
            ))
        });
        let guard = runtime.tick_guard();
        let report = EndReport {
            events: self.events.clone(),
            num,
            run,
            bus: self.shared.bus.clone(),
            our: our.clone(),
            on_exit: spec.on_exit.clone(),
            sent: false,
        };
        tokio::spawn(run_process(pre, store, report, guard));
        self.peak_runs = self.peak_runs.max(self.runs.len() + 1);
        self.runs.insert(
            num,
            LiveWasm {
                run,
                kill,
                process: our.process.clone(),
            },
        );
        Ok((*our).clone())
    }

    /// Asks a run to stop: a request from the node (`local@kernel:sys:spindle`,
    /// metadata `{"spindle":"stopping"}`) that the guest library turns into its
    /// `on_stopping` hook and an exit. The kernel's grace timer still ends it
    /// with [`WasmDriver::kill`] if it does not go.
    pub fn ask_stop(&mut self, num: ProcessNum, run: RunId, address: &Address) {
        if self.runs.get(&num).is_none_or(|l| l.run != run) {
            return;
        }
        let bus = self.shared.bus.clone();
        let env = Envelope {
            id: bus.next_id(),
            source: Arc::new(bus.address(ProcessId {
                process: spindle_abi::KERNEL_PROCESS.into(),
                package: PackageId::system(),
            })),
            target: Arc::new(address.clone()),
            rsvp: None,
            message: Message::Request(spindle_bus::Request {
                inherit: false,
                expects_response: None,
                body: b"stopping".to_vec(),
                metadata: Some(STOPPING_METADATA.into()),
                capabilities: vec![],
            }),
            blob: None,
        };
        tokio::spawn(async move {
            let _ = bus.send(env, true).await;
        });
    }

    /// Ends a run: it traps at its next host call or epoch tick. Taking it
    /// off the bus closes its mailbox, which wakes it if it is waiting.
    pub fn kill(&mut self, num: ProcessNum, run: RunId) {
        if let Some(l) = self.runs.get(&num).filter(|l| l.run == run) {
            l.kill.kill();
            self.shared.bus.unregister(&l.process);
        }
    }

    /// The run ended (its exit event was handled).
    pub fn ended(&mut self, num: ProcessNum, run: RunId) {
        if self.runs.get(&num).is_some_and(|l| l.run == run) {
            self.runs.remove(&num);
        }
        let ended = self.peak_runs.saturating_sub(self.runs.len());
        if ended >= TRIM_AFTER_ENDS.max(self.peak_runs / 2) {
            self.peak_runs = self.runs.len();
            tokio::task::spawn_blocking(crate::runtime::trim_heap);
        }
    }

    pub fn live_runs(&self) -> usize {
        self.runs.len()
    }

    /// How many wasm processes can run at once (the engine's pool,
    /// [`crate::runtime::pool_size`]).
    pub fn pool(&self) -> u32 {
        self.runtime.max_processes()
    }

    /// Runs started so far that reached their first `receive`.
    pub fn ready_count(&self) -> u64 {
        self.shared.ready.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Instantiations so far, and the time they took together.
    pub fn instantiations(&self) -> (u64, Duration) {
        let [n, nanos] = self
            .shared
            .instantiated
            .each_ref()
            .map(|a| a.load(std::sync::atomic::Ordering::Relaxed));
        (n, Duration::from_nanos(nanos))
    }
}

/// Why a run trapped, for exit details: the trap's own words, or the root
/// cause of the error (not the wasm backtrace wrapped around it).
fn describe(e: &wasmtime::Error) -> String {
    if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
        return trap.to_string();
    }
    e.root_cause().to_string()
}

/// The report of a run's end to the control loop, sent exactly once: by
/// the run's task when it finishes, or — if the task unwinds past it or is
/// dropped — by its drop, so the kernel never waits for a run that is gone.
struct EndReport {
    events: mpsc::UnboundedSender<WasmEvent>,
    num: ProcessNum,
    run: RunId,
    bus: Arc<Bus>,
    our: Arc<Address>,
    /// The spec's policy, for an end the run could not report itself.
    on_exit: OnExit,
    sent: bool,
}

impl EndReport {
    fn send(mut self, status: ExitStatus, detail: Option<String>, on_exit: OnExit) {
        self.sent = true;
        let _ = self.events.send(WasmEvent::Exited {
            num: self.num,
            run: self.run,
            status,
            detail,
            on_exit,
        });
    }
}

impl Drop for EndReport {
    fn drop(&mut self) {
        if self.sent {
            return;
        }
        self.bus.unregister(&self.our.process);
        let why = "host error: the process's task ended without finishing its run";
        tracing::error!("process {}: {why}", self.num);
        let _ = self.events.send(WasmEvent::Exited {
            num: self.num,
            run: self.run,
            status: ExitStatus::Trap,
            detail: Some(why.into()),
            on_exit: self.on_exit.clone(),
        });
    }
}

async fn run_process(
    pre: ProcessPre<ProcessHost>,
    mut store: Store<ProcessHost>,
    report: EndReport,
    _ticking: TickGuard,
) {
    use futures_util::FutureExt as _;
    let our = host::to_wit_addr(&store.data().our);
    // Host code runs inside these calls on the process's behalf: a panic in
    // it ends this process as crashed, not the daemon's task.
    let kill = store.data().kill.clone();
    let shared = store.data().shared.clone();
    let ran = std::panic::AssertUnwindSafe(host::Killable {
        run: Box::pin(async {
            let t = Instant::now();
            let made = pre.instantiate_async(&mut store).await;
            let took = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
            let [n, nanos] = &shared.instantiated;
            n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            nanos.fetch_add(took, std::sync::atomic::Ordering::Relaxed);
            match made {
                Ok(p) => p.call_init(&mut store, &our).await,
                Err(e) => Err(e),
            }
        }),
        kill,
    })
    .catch_unwind()
    .await;
    let h = store.data_mut();
    let (status, detail) = match ran {
        Err(payload) => {
            let why = format!(
                "host error: {}",
                spindle_types::fault::panic_text(&*payload)
            );
            tracing::error!("process {} ({}): {why}", report.num, h.our);
            h.log_line(&format!("[spindle] process ended by a {why}"));
            (ExitStatus::Trap, Some(why))
        }
        Ok(result) => {
            let exit_code = result
                .as_ref()
                .err()
                .and_then(|e| e.downcast_ref::<wasmtime_wasi::I32Exit>())
                .map(|x| x.0);
            match result {
                Ok(()) => (ExitStatus::Code(0), None),
                // The guest called `exit`: an ordinary exit with that code.
                Err(_) if exit_code.is_some() => (ExitStatus::Code(exit_code.unwrap_or(0)), None),
                Err(e) => {
                    let why = h.panic.take().unwrap_or_else(|| describe(&e));
                    if !h.is_killed() {
                        h.log_line(&format!("[spindle] process trapped: {why}"));
                    }
                    (ExitStatus::Trap, Some(why))
                }
            }
        }
    };
    let on_exit = on_exit_from_wit(&h.on_exit);
    if let wit::OnExit::Requests(list) = h.on_exit.clone() {
        for (target, req, blob) in list {
            // Malformed ones cannot be delivered, like those to a target that is gone.
            let (Some(target), Ok(mut request)) =
                (host::from_wit_addr(&target), host::from_wit_request(req))
            else {
                continue;
            };
            request.expects_response = None;
            let env = Envelope {
                id: h.shared.bus.next_id(),
                source: h.our.clone(),
                target: Arc::new(target),
                rsvp: None,
                message: Message::Request(request),
                blob: blob.map(|b| Arc::new(host::from_wit_blob(b))),
            };
            // A target that is gone simply does not get it.
            let _ = h.shared.bus.send(env, false).await;
        }
    }
    h.shared.bus.unregister(&h.our.process);
    h.release_held();
    let _ = h.out.lock().unwrap_or_else(|p| p.into_inner()).finish();
    report.send(status, detail, on_exit);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(bus: &Arc<Bus>) -> (EndReport, mpsc::UnboundedReceiver<WasmEvent>) {
        let (events, rx) = mpsc::unbounded_channel();
        let our = Arc::new(bus.address("p:demo:spindle".parse().unwrap()));
        let _mailbox = bus.register((*our).clone(), false).unwrap();
        (
            EndReport {
                events,
                num: ProcessNum(7),
                run: 3,
                bus: bus.clone(),
                our,
                on_exit: OnExit::Restart,
                sent: false,
            },
            rx,
        )
    }

    #[test]
    fn a_run_that_unwinds_still_reports_its_end() {
        let bus = Arc::new(Bus::new("local"));
        let (r, mut rx) = report(&bus);
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _r = r;
            panic!("host code failed");
        }));
        assert!(unwound.is_err());
        let Ok(WasmEvent::Exited {
            num,
            run,
            status,
            detail,
            on_exit,
        }) = rx.try_recv()
        else {
            panic!("no exit reported");
        };
        assert_eq!((num, run, status), (ProcessNum(7), 3, ExitStatus::Trap));
        assert!(detail.unwrap().starts_with("host error"));
        assert_eq!(on_exit, OnExit::Restart, "restarted by its schedule");
        assert!(!bus.is_registered(&"p:demo:spindle".parse().unwrap()));
        assert!(rx.try_recv().is_err(), "exactly one report");
    }

    #[test]
    fn a_finished_run_reports_once() {
        let bus = Arc::new(Bus::new("local"));
        let (r, mut rx) = report(&bus);
        r.send(ExitStatus::Code(0), None, OnExit::None);
        assert!(matches!(
            rx.try_recv(),
            Ok(WasmEvent::Exited {
                status: ExitStatus::Code(0),
                ..
            })
        ));
        assert!(rx.try_recv().is_err(), "exactly one report");
    }
}
