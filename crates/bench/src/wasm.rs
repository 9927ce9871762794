//! Wasm-process figures, measured in-process on the driver and bus the
//! daemon uses (a current-thread runtime, like the daemon's), with the guest
//! components built from `examples/`.

use crate::{Row, own_rss as rss};
use spindle_bus::{Bus, Envelope, Mailbox, Message};
use spindle_driver_wasm::{WasmDriver, WasmEvent};
use spindle_logs::LogHub;
use spindle_types::manifest::RawProcess;
use spindle_types::{Address, ProcessNum, ProcessSpec};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const DEADLINE: Duration = Duration::from_secs(60);
/// Processes for the spawn, memory and scale figures.
const MANY: u64 = 10_000;
/// Instantiations timed into fresh slots: what the default pool has left
/// beside [`MANY`].
const FRESH: u64 = 200;

struct Bench {
    _dir: tempfile::TempDir,
    driver: WasmDriver,
    events: mpsc::UnboundedReceiver<WasmEvent>,
    bus: Arc<Bus>,
    tester: Arc<Address>,
    inbox: Mailbox,
}

fn spec(name: Option<&str>, guest: &str, public: bool) -> ProcessSpec {
    RawProcess {
        name: name.map(str::to_string),
        wasm: Some(spindle_guests::path(guest).to_string_lossy().into()),
        package: Some("bench:spindle".into()),
        public: Some(public),
        ..Default::default()
    }
    .into_spec(1, Path::new("/"))
    .expect("valid spec")
}

impl Bench {
    fn new() -> Bench {
        let dir = tempfile::tempdir().expect("temp dir");
        let bus = Arc::new(Bus::new("local"));
        let (driver, events, _spawns) = WasmDriver::new(
            &dir.path().join("cache"),
            spindle_driver_wasm::runtime::pool_size(
                spindle_driver_wasm::runtime::max_map_count(),
                None,
            ),
            spindle_driver_wasm::Compiler::InProcess,
            bus.clone(),
            Arc::new(LogHub::new()),
            &dir.path().join("logs"),
            &dir.path().join("state"),
        )
        .expect("driver");
        let tester: Address = "local@bench:sys:spindle".parse().expect("address");
        let inbox = bus.register(tester.clone(), false).expect("register");
        spindle_db::start(&dir.path().join("db"), &bus).expect("the runtime modules");
        spindle_vfs::start(&dir.path().join("vfs"), &bus).expect("the vfs module");
        let tester = Arc::new(tester);
        Bench {
            _dir: dir,
            driver,
            events,
            bus,
            tester,
            inbox,
        }
    }

    async fn until_ready(&self, count: u64) {
        let end = Instant::now() + DEADLINE;
        while self.driver.ready_count() < count {
            assert!(Instant::now() < end, "processes never became ready");
            tokio::task::yield_now().await;
        }
    }

    async fn ask(&mut self, target: &Address, body: &[u8]) -> String {
        let id = self.bus.next_id();
        let env = Envelope::request(
            id,
            self.tester.clone(),
            Arc::new(target.clone()),
            Some(self.tester.clone()),
            body.to_vec(),
            Some(DEADLINE),
        );
        self.bus
            .send(env, true)
            .await
            .map_err(|(k, _)| k)
            .expect("send");
        loop {
            let env = tokio::time::timeout(DEADLINE, self.inbox.recv())
                .await
                .expect("an answer")
                .expect("open inbox");
            if env.id == id
                && let Message::Response(r, _) = env.message
            {
                return String::from_utf8_lossy(&r.body).into_owned();
            }
        }
    }

    async fn tell(&self, target: &Address, body: &[u8]) {
        let env = Envelope::request(
            self.bus.next_id(),
            self.tester.clone(),
            Arc::new(target.clone()),
            None,
            body.to_vec(),
            None,
        );
        self.bus
            .send(env, true)
            .await
            .map_err(|(k, _)| k)
            .expect("send");
    }

    async fn exit(&mut self) {
        match tokio::time::timeout(DEADLINE, self.events.recv()).await {
            Ok(Some(WasmEvent::Exited { num, run, .. })) => self.driver.ended(num, run),
            _ => panic!("no exit"),
        }
    }
}

/// Which rows to measure.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Part {
    All,
    Ipc,
    Db,
}

/// The wasm rows, the IPC rows and the database rows (or one part).
pub fn run(rows: &mut Vec<Row>, part: Part) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut b = Bench::new();
        if part == Part::All {
            measure(&mut b, rows).await;
        }
        if part != Part::Ipc {
            measure_db(&mut b, rows).await;
        }
        if part == Part::Db {
            return;
        }
        let peer = b
            .driver
            .spawn(
                ProcessNum(4_000_000),
                1,
                &spec(Some("ipcpeer"), "echo", true),
                None,
            )
            .expect("peer");
        measure_ipc(&mut b, &peer, rows).await;
    });
}

/// Native spawns timed on their own: the `start` call of the native driver
/// (resolve done beforehand), each child reaped before the next.
const NATIVE_SPAWNS: u32 = 200;

/// Mean time for the native driver to start `/bin/true`.
fn native_spawn_each() -> Duration {
    let program = spindle_types::Program::Native {
        command: "/bin/true".into(),
        args: vec![],
        cwd: "/".into(),
        ipc: None,
    };
    let exe = Path::new("/bin/true");
    let t = Instant::now();
    for _ in 0..NATIVE_SPAWNS {
        let child =
            spindle_driver_native::spawn::start(exe, &program, [], None, None).expect("spawn");
        // SAFETY: waitpid on our own child's pid.
        unsafe { libc::waitpid(child.pid, std::ptr::null_mut(), 0) };
    }
    t.elapsed() / NATIVE_SPAWNS
}

/// A Node child on the bus with no library: asked `{"bench": target, "n": n}`,
/// it makes n sequential requests to `target` and answers when done.
const NODE_BENCH: &str = r#"
const waiting = new Map();
let next = 1;
function ask(target) {
  return new Promise((resolve) => {
    const id = next++;
    waiting.set(id, resolve);
    process.send({ type: 'request', target, id, timeout_ms: 5000, body: 'x' });
  });
}
process.on('message', async (m) => {
  if (m.type === 'response' && waiting.has(m.id)) {
    const r = waiting.get(m.id); waiting.delete(m.id); r(m);
  } else if (m.type === 'request' && m.body && m.body.bench) {
    for (let i = 0; i < m.body.n; i++) await ask(m.body.bench);
    process.send({ type: 'response', id: m.id, body: 'done' });
  }
});
"#;
const NODE_TRIPS: u32 = 20_000;

/// A native child on the bus at `name`, its channel bridged as the daemon
/// does it. Killed and reaped when dropped.
struct Bridged {
    pid: i32,
    address: Address,
    _bridge: spindle_ipc::Bridge,
    /// Its stdout and stderr pipes, kept open so its few lines do not fail.
    _output: (std::os::fd::OwnedFd, std::os::fd::OwnedFd),
}

impl Drop for Bridged {
    fn drop(&mut self) {
        // SAFETY: killing and reaping the child this bench started.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

fn start_bridged(b: &Bench, exe: &Path, args: &[String], name: &str) -> Option<Bridged> {
    let program = spindle_types::Program::Native {
        command: exe.to_string_lossy().into(),
        args: args.to_vec(),
        cwd: "/".into(),
        ipc: None,
    };
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().ok()?;
    let theirs = std::os::fd::OwnedFd::from(theirs);
    let address: Address = format!("local@{name}:bench:spindle").parse().ok()?;
    let mailbox = b.bus.register(address.clone(), true).ok()?;
    let env = [
        ("NODE_CHANNEL_FD".to_string(), "3".to_string()),
        (
            "NODE_CHANNEL_SERIALIZATION_MODE".to_string(),
            "json".to_string(),
        ),
        ("SPINDLE_ADDRESS".to_string(), address.to_string()),
    ];
    let child =
        spindle_driver_native::spawn::start(exe, &program, env, None, Some(&theirs)).ok()?;
    drop(theirs);
    let bridge =
        spindle_ipc::Bridge::start(ours.into(), address.clone(), b.bus.clone(), mailbox, None)
            .ok()?;
    Some(Bridged {
        pid: child.pid,
        address,
        _bridge: bridge,
        _output: (child.stdout, child.stderr),
    })
}

/// Mean request→response time between a Node child (plain `process.send`,
/// through the IPC bridge) and the wasm process `peer`; `None` without node.
async fn node_round_trip(b: &mut Bench, peer: &Address) -> Option<Duration> {
    let node = which_node()?;
    let script = b._dir.path().join("bench.js");
    std::fs::write(&script, NODE_BENCH).ok()?;
    let child = start_bridged(b, &node, &[script.to_string_lossy().into()], "nodebench")?;
    let me = child.address.clone();
    // Warm up (Node's start, the JIT), then measure.
    let warm = b
        .ask(&me, format!(r#"{{"bench":"{peer}","n":2000}}"#).as_bytes())
        .await;
    assert_eq!(warm, r#""done""#);
    let t = Instant::now();
    let r = b
        .ask(
            &me,
            format!(r#"{{"bench":"{peer}","n":{NODE_TRIPS}}}"#).as_bytes(),
        )
        .await;
    let each = t.elapsed() / NODE_TRIPS;
    assert_eq!(r, r#""done""#);
    Some(each)
}

const NATIVE_TRIPS: u64 = 50_000;
const NATIVE_ONE_WAY: u64 = 200_000;

/// The native Rust example (same `spindle_process` API) against the wasm
/// process `peer`: mean round trip, and one-way messages per second.
async fn native_rust(b: &mut Bench, peer: &Address) -> Option<(Duration, f64)> {
    let exe = spindle_guests::native("native-echo");
    let child = start_bridged(b, &exe, &[], "rustbench")?;
    let me = child.address.clone();
    assert_eq!(
        b.ask(&me, format!("bench {peer} 1000").as_bytes()).await,
        "ok 1000"
    );
    let t = Instant::now();
    let r = b
        .ask(&me, format!("bench {peer} {NATIVE_TRIPS}").as_bytes())
        .await;
    let trip = t.elapsed() / NATIVE_TRIPS as u32;
    assert_eq!(r, format!("ok {NATIVE_TRIPS}"));
    let counted = b.ask(peer, b"count").await.parse::<u64>().unwrap_or(0);
    let t = Instant::now();
    let r = b
        .ask(&me, format!("flood {peer} {NATIVE_ONE_WAY}").as_bytes())
        .await;
    let rate = NATIVE_ONE_WAY as f64 / t.elapsed().as_secs_f64();
    assert_eq!(
        r,
        format!("sent {NATIVE_ONE_WAY} counted {}", counted + NATIVE_ONE_WAY)
    );
    Some((trip, rate))
}

const BLOB: usize = 16 << 20;
const BLOB_TRIPS: u32 = 7;

/// A 16 MiB blob from the native Rust process through the wasm process
/// `peer` (reflected, never loaded) and back, against a bare copy of 16 MiB
/// through a socket: (trip, bare copy).
async fn blob_trip(b: &mut Bench, peer: &Address) -> Option<(Duration, Duration)> {
    let exe = spindle_guests::native("native-echo");
    let child = start_bridged(b, &exe, &[], "blobbench")?;
    let me = child.address.clone();
    let ask = format!("blobtrip {peer} {BLOB}");
    // The process times the trip itself (send → blob back in hand), so
    // making and checking the pattern is not counted. Medians of both: a
    // 16 MiB copy on a shared machine has outliers either way.
    let mut trips = Vec::new();
    for round in 0..=BLOB_TRIPS {
        let r = b.ask(&me, ask.as_bytes()).await;
        let us: u64 = r
            .strip_prefix(&format!("ok {BLOB} in "))
            .and_then(|t| t.strip_suffix(" µs"))
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("blobtrip: {r}"));
        // The first round warms up (first touch of the buffers).
        if round > 0 {
            trips.push(Duration::from_micros(us));
        }
    }
    // The same bytes through a bare socket pair, writer on its own thread,
    // written from where they are and read into a fresh buffer.
    let (mut tx, mut rx) = std::os::unix::net::UnixStream::pair().ok()?;
    let data = std::sync::Arc::new(vec![7u8; BLOB]);
    let mut bare = Vec::new();
    for _ in 0..BLOB_TRIPS {
        let t = Instant::now();
        let out = data.clone();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            tx.write_all(&out).map(|_| tx)
        });
        let mut back = vec![0u8; BLOB];
        std::io::Read::read_exact(&mut rx, &mut back).ok()?;
        tx = writer.join().ok()?.ok()?;
        bare.push(t.elapsed());
    }
    Some((median(trips), median(bare)))
}

/// The mean instantiation between two of the driver's counts.
fn per_instantiation(before: (u64, Duration), after: (u64, Duration)) -> Duration {
    let n = after.0.saturating_sub(before.0).max(1);
    after.1.saturating_sub(before.1) / u32::try_from(n).unwrap_or(u32::MAX)
}

pub(crate) fn median(mut d: Vec<Duration>) -> Duration {
    d.sort();
    d[d.len() / 2]
}

fn which_node() -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join("node"))
        .find(|p| p.is_file())
}

async fn measure(b: &mut Bench, rows: &mut Vec<Row>) {
    let native_alone = native_spawn_each();
    // Warm the compiled-component cache and the linker.
    let echo = spec(None, "echo", true);
    b.driver
        .spawn(ProcessNum(1_000_000), 1, &echo, None)
        .expect("spawn");
    b.until_ready(1).await;

    // Spawn MANY until each one's init runs (reaches receive).
    let base = b.driver.ready_count();
    let rss0 = rss();
    let t = Instant::now();
    for i in 0..MANY {
        b.driver
            .spawn(ProcessNum(i + 1), 1, &echo, None)
            .expect("spawn");
    }
    let calls = t.elapsed();
    b.until_ready(base + MANY).await;
    let spawn_each = t.elapsed() / MANY as u32;
    eprintln!(
        "spawn: {:.1} µs in the call, {:.1} µs in the task (instantiate + init), each",
        calls.as_secs_f64() * 1e6 / MANY as f64,
        (t.elapsed() - calls).as_secs_f64() * 1e6 / MANY as f64
    );
    let per_process = (rss().saturating_sub(rss0)) / MANY;
    let native_mixed = native_spawn_each();

    // Instantiation alone, one at a time (nothing else runs meanwhile),
    // each into a slot no process has used: the pool's slots past the
    // 10,000 live ones.
    let made0 = b.driver.instantiations();
    for i in 0..FRESH {
        let ready = b.driver.ready_count();
        b.driver
            .spawn(ProcessNum(4_000_000 + i), 1, &echo, None)
            .expect("spawn");
        b.until_ready(ready + 1).await;
    }
    let fresh = per_instantiation(made0, b.driver.instantiations());
    for i in 0..FRESH {
        b.driver.kill(ProcessNum(4_000_000 + i), 1);
    }
    for _ in 0..FRESH {
        b.exit().await;
    }

    // All of them answer, then all stop cleanly.
    let t = Instant::now();
    for i in (0..MANY).step_by((MANY / 100) as usize) {
        let addr = b.driver.address(ProcessNum(i + 1), &echo).expect("address");
        assert_eq!(b.ask(&addr, b"hi").await, "hi");
    }
    for i in 0..MANY {
        b.driver.kill(ProcessNum(i + 1), 1);
    }
    for _ in 0..MANY {
        b.exit().await;
    }
    let scale = t.elapsed();

    // Restart of a crashed process: exit seen → new run's init reached.
    let crasher = spec(Some("crasher"), "echo", true);
    let addr = b
        .driver
        .spawn(ProcessNum(2_000_000), 1, &crasher, None)
        .expect("spawn");
    b.until_ready(b.driver.ready_count()).await;
    const RESTARTS: u32 = 200;
    let mut restart_total = Duration::ZERO;
    let made0 = b.driver.instantiations();
    for run in 2..2 + RESTARTS as u64 {
        b.tell(&addr, b"panic").await;
        b.exit().await;
        let ready = b.driver.ready_count();
        let t = Instant::now();
        b.driver
            .spawn(ProcessNum(2_000_000), run, &crasher, None)
            .expect("respawn");
        b.until_ready(ready + 1).await;
        restart_total += t.elapsed();
    }
    let reused = per_instantiation(made0, b.driver.instantiations());

    // Round trips and one-way messages between two processes.
    let a = b
        .driver
        .spawn(
            ProcessNum(3_000_000),
            1,
            &spec(Some("a"), "echo", true),
            None,
        )
        .expect("a");
    let peer = b
        .driver
        .spawn(
            ProcessNum(3_000_001),
            1,
            &spec(Some("b"), "echo", true),
            None,
        )
        .expect("b");
    const TRIPS: u64 = 100_000;
    let t = Instant::now();
    let r = b.ask(&a, format!("bench {peer} {TRIPS}").as_bytes()).await;
    let trip = t.elapsed() / TRIPS as u32;
    assert_eq!(r, format!("ok {TRIPS}"));
    let (untraced, traced, seen, lost) = traced_trips(b, &a, &peer).await;
    const ONE_WAY: u64 = 500_000;
    let t = Instant::now();
    let r = b
        .ask(&a, format!("flood {peer} {ONE_WAY}").as_bytes())
        .await;
    let rate = ONE_WAY as f64 / t.elapsed().as_secs_f64();
    assert_eq!(r, format!("sent {ONE_WAY} counted {ONE_WAY}"));

    let us = |d: Duration| format!("{:.1} µs", d.as_secs_f64() * 1e6);
    rows.push(Row {
        metric: "wasm: spawn (cached component) → init running, each of 10,000".into(),
        target: "≤ 15 µs".into(),
        measured: us(spawn_each),
    });
    rows.push(Row {
        metric: "wasm: instantiate alone, into a fresh pool slot / a slot the component had".into(),
        target: "≤ 15 µs".into(),
        measured: format!("{} / {}", us(fresh), us(reused)),
    });
    rows.push(Row {
        metric: "wasm: restart of a crashed process (exit → init running)".into(),
        target: "≤ 50 µs".into(),
        measured: us(restart_total / RESTARTS),
    });
    rows.push(Row {
        metric: "wasm: request→response round trip, two processes".into(),
        target: "≤ 4 µs".into(),
        measured: us(trip),
    });
    rows.push(Row {
        metric: "wasm: round trip, nobody tracing / a trace of everything".into(),
        target: "≤ +1% / ≤ +20%".into(),
        measured: format!(
            "{} / {} ({:+.0}%; {seen} records read, {lost} lost)",
            us(untraced),
            us(traced),
            (traced.as_secs_f64() / untraced.as_secs_f64() - 1.0) * 100.0
        ),
    });
    rows.push(Row {
        metric: "wasm: one-way messages/s, one sender → one receiver".into(),
        target: "≥ 500k/s".into(),
        measured: format!("{:.0}k/s", rate / 1e3),
    });
    rows.push(Row {
        metric: "wasm: memory per idle process (parked in receive)".into(),
        target: "≤ 48 KiB".into(),
        measured: format!("{:.1} KiB", per_process as f64 / 1024.0),
    });
    rows.push(Row {
        metric: "native spawn (start call), no wasm engine → 10,000 wasm processes live".into(),
        target: "unaffected".into(),
        measured: format!("{} → {}", us(native_alone), us(native_mixed)),
    });
    rows.push(Row {
        metric: "wasm: 10,000 concurrent processes: start, answer, stop".into(),
        target: "clean".into(),
        measured: format!(
            "clean; 100 answered + all stopped in {:.2} s",
            scale.as_secs_f64()
        ),
    });
}

/// Round trips between `a` and `peer` with nobody tracing and with a tap
/// on everything, read on a thread of its own (as the daemon's trace
/// connection reads it): medians of alternating rounds, and how many
/// records the tap delivered.
async fn traced_trips(
    b: &mut Bench,
    a: &Address,
    peer: &Address,
) -> (Duration, Duration, u64, u64) {
    const ROUND: u64 = 20_000;
    const ROUNDS: usize = 5;
    let mut idle = Vec::new();
    let mut traced = Vec::new();
    let (mut seen, mut lost) = (0, 0);
    for _ in 0..ROUNDS {
        let t = Instant::now();
        assert_eq!(
            b.ask(a, format!("bench {peer} {ROUND}").as_bytes()).await,
            format!("ok {ROUND}")
        );
        idle.push(t.elapsed() / ROUND as u32);
        let mut tap = b
            .bus
            .tap(spindle_bus::trace::TraceFilter::All)
            .expect("a tap");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let reader = std::thread::spawn(move || {
            let mut n = 0u64;
            loop {
                while tap.try_recv().is_some() {
                    n += 1;
                }
                if stopped.load(std::sync::atomic::Ordering::Acquire) {
                    return (n, tap.take_dropped());
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        let t = Instant::now();
        assert_eq!(
            b.ask(a, format!("bench {peer} {ROUND}").as_bytes()).await,
            format!("ok {ROUND}")
        );
        traced.push(t.elapsed() / ROUND as u32);
        stop.store(true, std::sync::atomic::Ordering::Release);
        let (read, dropped) = reader.join().expect("the reader");
        seen += read;
        lost += dropped;
    }
    (median(idle), median(traced), seen, lost)
}

/// Native processes on the bus against the wasm process `peer`.
async fn measure_ipc(b: &mut Bench, peer: &Address, rows: &mut Vec<Row>) {
    let node_trip = node_round_trip(b, peer).await;
    let native = native_rust(b, peer).await;
    let blob = blob_trip(b, peer).await;
    let us = |d: Duration| format!("{:.1} µs", d.as_secs_f64() * 1e6);
    rows.push(Row {
        metric: "native Rust process (spindle_process) ↔ wasm: request→response round trip".into(),
        target: "≤ 25 µs".into(),
        measured: native.map_or_else(|| "-".into(), |(t, _)| us(t)),
    });
    rows.push(Row {
        metric: "native Rust process → wasm: one-way messages/s".into(),
        target: "≥ 200k/s".into(),
        measured: native.map_or_else(|| "-".into(), |(_, r)| format!("{:.0}k/s", r / 1e3)),
    });
    rows.push(Row {
        metric: "16 MiB blob native → wasm → native, vs a bare socket copy of 16 MiB".into(),
        target: "≤ 3×".into(),
        measured: blob.map_or_else(
            || "-".into(),
            |(trip, bare)| {
                format!(
                    "{:.1}× ({:.1} ms vs {:.1} ms)",
                    trip.as_secs_f64() / bare.as_secs_f64(),
                    trip.as_secs_f64() * 1e3,
                    bare.as_secs_f64() * 1e3
                )
            },
        ),
    });
    rows.push(Row {
        metric: "Node (plain process.send) ↔ wasm process: request→response round trip".into(),
        target: "≤ 150 µs".into(),
        measured: node_trip.map_or_else(|| "node not found".into(), us),
    });
}

/// Concurrent durable kv writers.
const KV_WRITERS: u64 = 16;
/// Sets each writer makes.
const KV_SETS: u64 = 2_000;
/// Cached gets, and SQLite point queries, from one process.
const KV_GETS: u64 = 100_000;
const SQL_GETS: u64 = 20_000;

/// `ok <n> p50 <ns> total <ns>` → (p50, total).
fn timed_answer(r: &str) -> (Duration, Duration) {
    let w: Vec<&str> = r.split(' ').collect();
    assert!(w.len() == 6 && w[0] == "ok", "dbuser: {r}");
    let ns = |s: &str| Duration::from_nanos(s.parse().expect("nanoseconds"));
    (ns(w[3]), ns(w[5]))
}

/// The runtime modules, from wasm processes (the `dbuser` guest).
/// Rounds of the vfs figure (each: an append and a write, both synced).
const VFS_ROUNDS: u64 = 300;

async fn measure_db(b: &mut Bench, rows: &mut Vec<Row>) {
    let users: Vec<Address> = (0..KV_WRITERS)
        .map(|i| {
            let name = format!("dbuser{i}");
            b.driver
                .spawn(
                    ProcessNum(5_000_000 + i),
                    1,
                    &spec(Some(&name), "dbuser", true),
                    None,
                )
                .expect("dbuser")
        })
        .collect();
    // Open the database once, then all writers at once.
    assert_eq!(b.ask(&users[0], b"set bench warm up").await, "ok");
    let t = Instant::now();
    let mut ids = Vec::new();
    for u in &users {
        let id = b.bus.next_id();
        let env = Envelope::request(
            id,
            b.tester.clone(),
            Arc::new(u.clone()),
            Some(b.tester.clone()),
            format!("kvsets bench {KV_SETS}").into_bytes(),
            Some(DEADLINE),
        );
        b.bus
            .send(env, true)
            .await
            .map_err(|(k, _)| k)
            .expect("send");
        ids.push(id);
    }
    let mut p50s = Vec::new();
    while p50s.len() < ids.len() {
        let env = tokio::time::timeout(DEADLINE, b.inbox.recv())
            .await
            .expect("writers finish")
            .expect("open inbox");
        if let Message::Response(r, _) = env.message
            && ids.contains(&env.id)
        {
            p50s.push(timed_answer(&String::from_utf8_lossy(&r.body)).0);
        }
    }
    let wall = t.elapsed();
    p50s.sort();
    let set_rate = (KV_WRITERS * KV_SETS) as f64 / wall.as_secs_f64();
    let set_p50 = p50s[p50s.len() / 2];
    let (_, gets) = timed_answer(
        &b.ask(&users[0], format!("kvgets bench {KV_GETS}").as_bytes())
            .await,
    );
    let get_rate = KV_GETS as f64 / gets.as_secs_f64();
    let (sql_p50, sql_total) = timed_answer(
        &b.ask(&users[1], format!("sqlgets app {SQL_GETS}").as_bytes())
            .await,
    );
    // Files: a durable append and an atomic write per round, from wasm.
    let filer = b
        .driver
        .spawn(
            ProcessNum(5_100_000),
            1,
            &spec(Some("filer"), "filer", true),
            None,
        )
        .expect("filer");
    assert_eq!(b.ask(&filer, b"write warm up").await, "ok");
    let t = Instant::now();
    assert_eq!(
        b.ask(&filer, format!("churn {VFS_ROUNDS}").as_bytes())
            .await,
        "churned"
    );
    let vfs_round = t.elapsed() / VFS_ROUNDS as u32;
    let us = |d: Duration| format!("{:.1} µs", d.as_secs_f64() * 1e6);
    rows.push(Row {
        metric:
            "vfs: from wasm, a durable append + an atomic durable write (each synced), per pair"
                .into(),
        target: "–".into(),
        measured: us(vfs_round),
    });
    rows.push(Row {
        metric: format!("kv: durable set from wasm, {KV_WRITERS} concurrent writers: rate / p50"),
        target: "≥ 20k/s / ≤ 1 ms".into(),
        measured: format!("{:.1}k/s / {}", set_rate / 1e3, us(set_p50)),
    });
    rows.push(Row {
        metric: "kv: cached get from one wasm process".into(),
        target: "≥ 300k/s".into(),
        measured: format!("{:.0}k/s", get_rate / 1e3),
    });
    rows.push(Row {
        metric: "sqlite: point query round trip from wasm (mean / p50)".into(),
        target: "≤ 30 µs".into(),
        measured: format!("{} / {}", us(sql_total / SQL_GETS as u32), us(sql_p50)),
    });
}
