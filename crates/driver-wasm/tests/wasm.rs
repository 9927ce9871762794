//! The wasm driver with real guest components (built from `examples/`).

use spindle_bus::{Bus, Envelope, Message, Request};
use spindle_driver_wasm::{WasmDriver, WasmError, WasmEvent};
use spindle_logs::LogHub;
use spindle_types::manifest::RawProcess;
use spindle_types::{Address, ExitStatus, ProcessNum, ProcessSpec};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const DEADLINE: Duration = Duration::from_secs(20);

struct Rig {
    _dir: tempfile::TempDir,
    driver: WasmDriver,
    events: mpsc::UnboundedReceiver<WasmEvent>,
    bus: Arc<Bus>,
    tester: Arc<Address>,
    inbox: spindle_bus::Mailbox,
    /// Guests' spawn calls, as the control loop receives them.
    spawns: mpsc::Receiver<spindle_bus::SpawnCall>,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let bus = Arc::new(Bus::new("local"));
        let (driver, events, spawns) = WasmDriver::new(
            &dir.path().join("cache"),
            64,
            spindle_driver_wasm::Compiler::InProcess,
            bus.clone(),
            Arc::new(LogHub::new()),
            &dir.path().join("logs"),
            &dir.path().join("state"),
        )
        .unwrap();
        let tester: Address = "local@tester:sys:spindle".parse().unwrap();
        let inbox = bus.register(tester.clone(), false).unwrap();
        let tester = Arc::new(tester);
        Rig {
            _dir: dir,
            driver,
            events,
            bus,
            tester,
            inbox,
            spawns,
        }
    }

    fn spec(&self, name: &str, guest: &str, max_memory: Option<&str>) -> ProcessSpec {
        RawProcess {
            name: Some(name.into()),
            wasm: Some(spindle_guests::path(guest).to_string_lossy().into()),
            package: Some("demo:spindle".into()),
            max_memory: max_memory.map(str::to_string),
            ..Default::default()
        }
        .into_spec(1, Path::new("/"))
        .unwrap()
    }

    /// Sends `body` to `target` and waits for the response body.
    async fn ask(&mut self, target: &Address, body: &[u8]) -> Vec<u8> {
        let id = self.bus.next_id();
        let env = Envelope::request(
            id,
            self.tester.clone(),
            Arc::new(target.clone()),
            Some(self.tester.clone()),
            body.to_vec(),
            Some(DEADLINE),
        );
        self.bus.send(env, true).await.map_err(|(k, _)| k).unwrap();
        let reply = tokio::time::timeout(DEADLINE, self.inbox.recv())
            .await
            .expect("a response in time")
            .unwrap();
        assert_eq!(reply.id, id);
        match reply.message {
            Message::Response(r, _) => r.body,
            other => panic!("response expected, got {other:?}"),
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
        self.bus.send(env, true).await.map_err(|(k, _)| k).unwrap();
    }

    async fn exit(&mut self) -> (ProcessNum, ExitStatus, Option<String>) {
        match tokio::time::timeout(DEADLINE, self.events.recv())
            .await
            .expect("an exit")
            .unwrap()
        {
            WasmEvent::Exited {
                num,
                run,
                status,
                detail,
                ..
            } => {
                self.driver.ended(num, run);
                (num, status, detail)
            }
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn counter_keeps_its_count_across_a_crash() {
    let mut rig = Rig::new();
    let spec = rig.spec("counter", "counter", None);
    let addr = rig.driver.spawn(ProcessNum(1), 1, &spec, None).unwrap();
    assert_eq!(addr.to_string(), "local@counter:demo:spindle");
    assert_eq!(rig.ask(&addr, br#"{"add":5}"#).await, br#"{"count":5}"#);
    assert_eq!(rig.ask(&addr, br#"{"add":2}"#).await, br#"{"count":7}"#);
    rig.tell(&addr, br#""crash""#).await;
    let (num, status, detail) = rig.exit().await;
    assert_eq!((num, status), (ProcessNum(1), ExitStatus::Trap));
    assert!(detail.unwrap().contains("asked to crash at count 7"));
    // A new run picks up the saved count.
    let addr = rig.driver.spawn(ProcessNum(1), 2, &spec, None).unwrap();
    assert_eq!(rig.ask(&addr, br#""get""#).await, br#"{"count":7}"#);
}

#[tokio::test(flavor = "current_thread")]
async fn a_busy_loop_neither_starves_others_nor_resists_a_kill() {
    let mut rig = Rig::new();
    let looper = rig
        .driver
        .spawn(ProcessNum(1), 1, &rig.spec("looper", "echo", None), None)
        .unwrap();
    let echo = rig
        .driver
        .spawn(ProcessNum(2), 1, &rig.spec("echo", "echo", None), None)
        .unwrap();
    rig.tell(&looper, b"loop").await;
    // The echo answers while the looper spins on the same thread.
    for i in 0..20u8 {
        assert_eq!(rig.ask(&echo, &[i]).await, [i]);
    }
    let t = Instant::now();
    rig.driver.kill(ProcessNum(1), 1);
    let (num, status, detail) = rig.exit().await;
    assert_eq!((num, status), (ProcessNum(1), ExitStatus::Trap));
    assert!(detail.unwrap().contains("killed"));
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "killed promptly: {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "current_thread")]
async fn the_memory_cap_traps_the_process_only() {
    let mut rig = Rig::new();
    let hog = rig
        .driver
        .spawn(
            ProcessNum(1),
            1,
            &rig.spec("hog", "echo", Some("8MiB")),
            None,
        )
        .unwrap();
    rig.tell(&hog, b"grow").await;
    let (_, status, detail) = rig.exit().await;
    assert_eq!(status, ExitStatus::Trap);
    let detail = detail.unwrap();
    assert!(
        detail.contains("memory") || detail.contains("alloc"),
        "{detail}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn init_returning_is_completion() {
    let mut rig = Rig::new();
    let e = rig
        .driver
        .spawn(ProcessNum(3), 1, &rig.spec("e", "echo", None), None)
        .unwrap();
    rig.tell(&e, b"exit").await;
    assert_eq!(rig.exit().await.1, ExitStatus::Code(0));
    assert!(!rig.bus.is_registered(&e.process), "off the bus once gone");
}

#[tokio::test(flavor = "current_thread")]
async fn a_full_pool_is_a_clear_error_for_the_next_process_only() {
    let mut rig = Rig::new();
    let pool = rig.driver.pool();
    let mut live = vec![];
    for i in 0..pool {
        let spec = rig.spec(&format!("e{i}"), "echo", None);
        live.push(
            rig.driver
                .spawn(ProcessNum(100 + u64::from(i)), 1, &spec, None)
                .unwrap(),
        );
    }
    let spec = rig.spec("over", "echo", None);
    let over = rig
        .driver
        .spawn(ProcessNum(99), 1, &spec, None)
        .unwrap_err();
    assert!(
        over.to_string()
            .contains(&format!("already runs {pool} wasm processes")),
        "{over}"
    );
    // Those running are untouched; one that ends makes room.
    assert_eq!(rig.ask(&live[0], b"hi").await, b"hi");
    rig.tell(&live[1], b"exit").await;
    assert_eq!(rig.exit().await.1, ExitStatus::Code(0));
    let next = rig.driver.spawn(ProcessNum(99), 1, &spec, None).unwrap();
    assert_eq!(rig.ask(&next, b"there").await, b"there");
}

#[tokio::test(flavor = "current_thread")]
async fn bad_components_are_clear_errors() {
    let mut rig = Rig::new();
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"\0asm\x01\0\0\0garbage").unwrap();
    let mut spec = rig.spec("junk", "echo", None);
    spec.program = spindle_types::Program::Wasm {
        path: junk.clone(),
        package: "demo:spindle".parse().unwrap(),
        public: false,
    };
    match rig.driver.preflight(&spec) {
        Err(WasmError::Invalid { path, .. }) => assert_eq!(path, junk),
        other => panic!("invalid expected, got {other:?}"),
    }
    spec.program = spindle_types::Program::Wasm {
        path: dir.path().join("missing.wasm"),
        package: "demo:spindle".parse().unwrap(),
        public: false,
    };
    let e = rig.driver.preflight(&spec).unwrap_err().to_string();
    assert!(e.contains("missing.wasm"), "{e}");
}

impl Rig {
    fn public_spec(&self, name: &str, guest: &str) -> ProcessSpec {
        let mut s = self.spec(name, guest, None);
        if let spindle_types::Program::Wasm { public, .. } = &mut s.program {
            *public = true;
        }
        s
    }
}

#[tokio::test(flavor = "current_thread")]
async fn wasm_to_wasm_requests_obey_capabilities_and_fail_clearly() {
    let mut rig = Rig::new();
    let a = rig
        .driver
        .spawn(ProcessNum(1), 1, &rig.spec("a", "echo", None), None)
        .unwrap();
    let b = rig
        .driver
        .spawn(ProcessNum(2), 1, &rig.spec("b", "echo", None), None)
        .unwrap();
    let silent = rig
        .driver
        .spawn(
            ProcessNum(3),
            1,
            &rig.public_spec("silent", "counter"),
            None,
        )
        .unwrap();
    let call = |to: &Address, ms: u64, body: &str| format!("call {to} {ms} {body}").into_bytes();
    // b is private and a holds no capability for it.
    assert_eq!(
        rig.ask(&a, &call(&b, 1000, "hi")).await,
        b"err no-capability"
    );
    rig.bus
        .grant(&a.process, [spindle_bus::Capability::messaging(&b)]);
    assert_eq!(rig.ask(&a, &call(&b, 1000, "hi")).await, b"ok hi");
    // Five mailboxes' worth, one-way: the sender is slowed while b's mailbox
    // is full (it waits for room), and nothing is lost.
    assert_eq!(
        rig.ask(&a, format!("flood {b} 5000").as_bytes()).await,
        b"sent 5000 counted 5000"
    );
    // A new run of b is reached too (a's kept route to the old one is stale).
    rig.driver.kill(ProcessNum(2), 1);
    assert_eq!(rig.exit().await.0, ProcessNum(2));
    assert_eq!(rig.ask(&a, &call(&b, 1000, "gone")).await, b"err offline");
    rig.driver
        .spawn(ProcessNum(2), 2, &rig.spec("b", "echo", None), None)
        .unwrap();
    assert_eq!(rig.ask(&a, &call(&b, 1000, "back")).await, b"ok back");
    // An address the kernel cannot read is refused as invalid, not sent.
    assert_eq!(
        rig.ask(&a, b"call local@Not-Lowercase:demo:spindle 1000 hi")
            .await,
        b"err invalid"
    );
    // Nobody there: offline, at once, not a timeout.
    let ghost: Address = "local@ghost:demo:spindle".parse().unwrap();
    let t = Instant::now();
    assert_eq!(rig.ask(&a, &call(&ghost, 5000, "hi")).await, b"err offline");
    assert!(t.elapsed() < Duration::from_secs(1));
    // The counter ignores what it does not understand: a timeout, on time.
    let t = Instant::now();
    assert_eq!(
        rig.ask(&a, &call(&silent, 150, "nonsense")).await,
        b"err timeout"
    );
    assert!(t.elapsed() >= Duration::from_millis(150));
    // An answer after the timeout is dropped and counted, not delivered.
    let bus = rig.bus.clone();
    let late = move || {
        bus.late_responses
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(late(), 0);
    assert_eq!(
        rig.ask(&a, &call(&b, 20, "sleep 200")).await,
        b"err timeout"
    );
    let end = Instant::now() + Duration::from_secs(10);
    while late() == 0 {
        assert!(Instant::now() < end, "the late response was never counted");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // a is still serving, and saw only its own timeout.
    assert_eq!(rig.ask(&a, &call(&b, 1000, "again")).await, b"ok again");
    assert_eq!(late(), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn middleware_inherits_the_route_and_never_touches_the_blob() {
    let mut rig = Rig::new();
    let mw = rig
        .driver
        .spawn(
            ProcessNum(1),
            1,
            &rig.public_spec("middleware", "middleware"),
            None,
        )
        .unwrap();
    let backend = rig
        .driver
        .spawn(ProcessNum(2), 1, &rig.public_spec("backend", "echo"), None)
        .unwrap();
    let blob: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    let sum: u64 = blob.iter().map(|&x| x as u64).sum();
    let id = rig.bus.next_id();
    let env = Envelope {
        id,
        source: rig.tester.clone(),
        target: Arc::new(mw.clone()),
        rsvp: Some(rig.tester.clone()),
        message: Message::Request(Request {
            inherit: false,
            expects_response: Some(DEADLINE),
            body: b"blob".to_vec(),
            metadata: None,
            capabilities: vec![],
        }),
        blob: Some(Arc::new(spindle_bus::Blob {
            mime: None,
            bytes: blob,
        })),
    };
    rig.bus.send(env, true).await.map_err(|(k, _)| k).unwrap();
    let reply = tokio::time::timeout(DEADLINE, rig.inbox.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.id, id, "answers the original request");
    assert_eq!(*reply.source, backend, "straight from the backend");
    let Message::Response(r, _) = reply.message else {
        panic!("a response")
    };
    assert_eq!(
        String::from_utf8(r.body).unwrap(),
        format!("{} {sum} {{\"via\":\"middleware\"}}", 1 << 20)
    );
}

/// A spawn call as a guest's host makes it, with a component in `dir`.
fn spawn_call(
    dir: &Path,
    component: &str,
) -> (
    spindle_bus::SpawnCall,
    tokio::sync::oneshot::Receiver<Result<Address, spindle_bus::SpawnError>>,
) {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let call = spindle_bus::SpawnCall {
        parent: "local@parent:demo:spindle".parse().unwrap(),
        name: Some("child".into()),
        dir: dir.into(),
        component: component.into(),
        resolved: None,
        on_exit: Default::default(),
        public: false,
        capabilities: vec![],
        grant_to: vec![],
        reply,
    };
    (call, answer)
}

#[tokio::test(flavor = "current_thread")]
async fn spawned_components_are_compiled_before_the_control_loop_sees_them() {
    let mut rig = Rig::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.wasm"), b"\0asm\x0d\0\x01\0garbage").unwrap();
    std::fs::copy(spindle_guests::path("echo"), dir.path().join("echo.wasm")).unwrap();
    let calls = rig.driver.spawn_calls();
    // One that does not compile is answered without reaching the loop.
    let (call, answer) = spawn_call(dir.path(), "bad.wasm");
    calls.send(call).await.unwrap();
    let why = tokio::time::timeout(DEADLINE, answer)
        .await
        .expect("an answer in time")
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(why.contains("not a valid WebAssembly component"), "{why}");
    // One that compiles reaches the loop loaded: its start compiles nothing.
    let (call, _answer) = spawn_call(dir.path(), "echo.wasm");
    calls.send(call).await.unwrap();
    let seen = tokio::time::timeout(DEADLINE, rig.spawns.recv())
        .await
        .expect("the call in time")
        .unwrap();
    assert_eq!(seen.component, "echo.wasm");
    assert!(rig.driver.loader().is_ready(&dir.path().join("echo.wasm")));
    assert!(
        rig.spawns.try_recv().is_err(),
        "the bad spawn reached the loop"
    );
}
