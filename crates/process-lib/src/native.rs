//! The same calls as the wasm imports, for a native process on the bus: one
//! API, two transports. A native process started with `ipc = true` has its
//! channel on fd `NODE_CHANNEL_FD` (3), one JSON frame per line (see the
//! node's `spindle_ipc::frame`); this module speaks it, blocking, with the
//! standard library.
//!
//! What differs from a wasm process: contexts stay here (the node never sees
//! them); state files are written by the process itself, durably, where the
//! node says (`SPINDLE_STATE_DIR`); blobs travel raw after their frame (this
//! transport says `hello` with `raw_blobs`), so they are read with the
//! message rather than lazily; capabilities that came with any recent
//! message (not only the last) may be saved; a spawned child's component
//! path is taken from the process's working directory. With a watchdog (`SPINDLE_HEARTBEAT_MS`) a thread sends
//! heartbeats while the process is waiting for mail or has called in within
//! the period, so a process stuck elsewhere stops them.

use crate::wit;
use base64::Engine as _;
use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The node's own address for the stop request (as a wasm process sees it).
const KERNEL: &str = "local@kernel:sys:spindle";
/// Timeout reported on a received request that expects a response (the
/// channel does not carry the requester's).
const RECEIVED_TIMEOUT_MS: u64 = 5_000;

struct Channel {
    writer: Mutex<UnixStream>,
    reader: Mutex<BufReader<UnixStream>>,
    state: Mutex<State>,
    /// Heartbeat bookkeeping: when the process last called in, and whether it
    /// is waiting for mail now.
    since: Instant,
    active_ms: AtomicU64,
    waiting: AtomicBool,
}

#[derive(Default)]
struct State {
    next_id: u64,
    /// Requests of ours awaiting an answer: id → (target, request, context).
    awaited: HashMap<u64, (String, wit::Request, Option<Vec<u8>>)>,
    /// Frames (with their blobs) read while awaiting a particular response.
    deferred: VecDeque<Frame>,
    /// The blob of the last message received.
    last_blob: Option<wit::Blob>,
    /// The request being handled, if it expects a response.
    handling: Option<u64>,
    on_exit: Option<wit::OnExit>,
}

fn channel() -> &'static Channel {
    static CHANNEL: OnceLock<Channel> = OnceLock::new();
    CHANNEL.get_or_init(|| {
        let fd: i32 = std::env::var("NODE_CHANNEL_FD")
            .ok()
            .and_then(|v| v.parse().ok())
            .expect("no IPC channel: start this process with `spindle start --ipc -- …`");
        // SAFETY: the node gave this process the descriptor for this purpose;
        // nothing else in the process owns it.
        let stream = unsafe { UnixStream::from_raw_fd(fd) };
        let reader = stream.try_clone().expect("clone the IPC channel");
        let ch = Channel {
            writer: Mutex::new(stream),
            reader: Mutex::new(BufReader::new(reader)),
            state: Mutex::new(State::default()),
            since: Instant::now(),
            active_ms: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
        };
        let mut hello = serde_json::to_vec(&json!({"type": "hello", "raw_blobs": true}))
            .expect("frames serialise");
        hello.push(b'\n');
        ch.writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_all(&hello)
            .expect("the node's IPC channel");
        if let Some(period) = std::env::var("SPINDLE_HEARTBEAT_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&ms| ms > 0)
            .map(Duration::from_millis)
        {
            std::thread::spawn(move || heartbeats(period));
        }
        ch
    })
}

/// The transport's bookkeeping (never held across a read or write).
fn state() -> std::sync::MutexGuard<'static, State> {
    channel().state.lock().unwrap_or_else(|p| p.into_inner())
}

fn heartbeats(period: Duration) {
    let every = (period / 3).max(Duration::from_millis(100));
    loop {
        std::thread::sleep(every);
        let ch = channel();
        let last = Duration::from_millis(ch.active_ms.load(Ordering::Relaxed));
        let fresh = ch.since.elapsed().saturating_sub(last) < period;
        if (ch.waiting.load(Ordering::Relaxed) || fresh)
            && write_frame(&json!({"type": "heartbeat"})).is_err()
        {
            return;
        }
    }
}

fn called_in() {
    let ch = channel();
    let ms = ch.since.elapsed().as_millis() as u64;
    ch.active_ms.store(ms, Ordering::Relaxed);
}

fn write_frame(frame: &Value) -> std::io::Result<()> {
    write_frame_with(frame, None)
}

/// Writes `frame`; a blob is announced in it and its bytes follow, raw.
fn write_frame_with(frame: &Value, blob: Option<&wit::Blob>) -> std::io::Result<()> {
    let mut frame = frame.clone();
    if let Some(b) = blob {
        frame["blob_bytes"] = b.bytes.len().into();
        if let Some(m) = &b.mime {
            frame["blob_mime"] = Value::String(m.clone());
        }
    }
    let mut line = serde_json::to_vec(&frame).expect("frames serialise");
    line.push(b'\n');
    let mut w = channel().writer.lock().unwrap_or_else(|p| p.into_inner());
    w.write_all(&line)?;
    match blob {
        Some(b) => w.write_all(&b.bytes),
        None => Ok(()),
    }
}

fn read_frame() -> Frame {
    let ch = channel();
    ch.waiting.store(true, Ordering::Relaxed);
    let mut reader = ch.reader.lock().unwrap_or_else(|p| p.into_inner());
    let mut line = Vec::new();
    let n = reader.read_until(b'\n', &mut line);
    // The node closed the channel: it is stopping this process.
    if !matches!(n, Ok(n) if n > 0) {
        std::process::exit(0);
    }
    let frame: Value = serde_json::from_slice(&line).unwrap_or(Value::Null);
    let mime = frame["blob_mime"].as_str().map(str::to_string);
    let blob = if let Some(len) = frame["blob_bytes"].as_u64() {
        let mut bytes = vec![0; len as usize];
        if std::io::Read::read_exact(&mut *reader, &mut bytes).is_err() {
            std::process::exit(0);
        }
        Some(wit::Blob { mime, bytes })
    } else {
        frame["blob_base64"].as_str().map(|b| wit::Blob {
            mime,
            bytes: base64::engine::general_purpose::STANDARD
                .decode(b)
                .unwrap_or_default(),
        })
    };
    drop(reader);
    ch.waiting.store(false, Ordering::Relaxed);
    called_in();
    (frame, blob)
}

fn put_body(frame: &mut Value, body: &[u8]) {
    if body.is_empty() {
        return;
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => frame["body"] = v,
        Err(_) => {
            frame["body_base64"] =
                Value::String(base64::engine::general_purpose::STANDARD.encode(body))
        }
    }
}

fn body_of(frame: &Value) -> Vec<u8> {
    if let Some(b) = frame["body_base64"].as_str() {
        return base64::engine::general_purpose::STANDARD
            .decode(b)
            .unwrap_or_default();
    }
    match &frame["body"] {
        Value::Null => Vec::new(),
        v => serde_json::to_vec(v).expect("a JSON value serialises"),
    }
}

fn caps_of(v: &Value) -> Vec<wit::Capability> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| {
            Some(wit::Capability {
                issuer: c["issuer"].as_str()?.to_string(),
                params: c["params"].as_str()?.to_string(),
            })
        })
        .collect()
}

fn caps_json(caps: &[wit::Capability]) -> Value {
    caps.iter()
        .map(|c| json!({"issuer": c.issuer, "params": c.params}))
        .collect()
}

/// Puts what requests and responses share into `frame`.
fn put_message(frame: &mut Value, body: &[u8], metadata: Option<&str>, caps: &[wit::Capability]) {
    put_body(frame, body);
    if let Some(m) = metadata {
        frame["metadata"] = Value::String(m.into());
    }
    if !caps.is_empty() {
        frame["capabilities"] = caps_json(caps);
    }
}

fn kind_of(name: &str) -> wit::SendErrorKind {
    match name {
        "offline" => wit::SendErrorKind::Offline,
        "timeout" => wit::SendErrorKind::Timeout,
        "no-capability" => wit::SendErrorKind::NoCapability,
        "mailbox-full" => wit::SendErrorKind::MailboxFull,
        _ => wit::SendErrorKind::Invalid,
    }
}

type Received = Result<(String, wit::Message), wit::SendError>;

/// A frame and the blob that came with it.
type Frame = (Value, Option<wit::Blob>);

/// Turns a frame into what `receive` returns; `None` for frames that are
/// not messages (a refusal of ours, housekeeping).
fn interpret((f, blob): Frame) -> Option<Received> {
    let mut st = state();
    let id = f["id"].as_u64();
    match f["type"].as_str() {
        Some("request") => {
            let expects = f["expects_response"].as_bool() == Some(true);
            st.handling = if expects { id } else { None };
            st.last_blob = blob;
            Some(Ok((
                f["source"].as_str().unwrap_or_default().to_string(),
                wit::Message::Request(wit::Request {
                    inherit: false,
                    expects_response: expects.then_some(RECEIVED_TIMEOUT_MS),
                    body: body_of(&f),
                    metadata: f["metadata"].as_str().map(str::to_string),
                    capabilities: caps_of(&f["capabilities"]),
                }),
            )))
        }
        Some("response") => {
            let (_, _, context) = st.awaited.remove(&id?)?;
            st.last_blob = blob;
            Some(Ok((
                f["source"].as_str().unwrap_or_default().to_string(),
                wit::Message::Response((
                    wit::Response {
                        inherit: false,
                        body: body_of(&f),
                        metadata: f["metadata"].as_str().map(str::to_string),
                        capabilities: caps_of(&f["capabilities"]),
                    },
                    context,
                )),
            )))
        }
        Some("error") => {
            let Some((target, request, context)) = id.and_then(|id| st.awaited.remove(&id)) else {
                eprintln!(
                    "spindle refused a message: {}",
                    f["message"].as_str().unwrap_or("?")
                );
                return None;
            };
            Some(Err(wit::SendError {
                kind: kind_of(f["kind"].as_str().unwrap_or_default()),
                target,
                message: wit::Message::Request(request),
                context,
            }))
        }
        Some("stopping") => Some(Ok((
            KERNEL.to_string(),
            wit::Message::Request(wit::Request {
                inherit: false,
                expects_response: None,
                body: b"stopping".to_vec(),
                metadata: Some(crate::STOPPING.to_string()),
                capabilities: vec![],
            }),
        ))),
        _ => None,
    }
}

pub fn our() -> String {
    std::env::var("SPINDLE_ADDRESS").expect("SPINDLE_ADDRESS: start this process with `--ipc`")
}

pub fn receive() -> Received {
    loop {
        let queued = state().deferred.pop_front();
        let f = queued.unwrap_or_else(read_frame);
        if let Some(r) = interpret(f) {
            return r;
        }
    }
}

pub fn try_receive() -> Option<Received> {
    called_in();
    loop {
        let queued = state().deferred.pop_front()?;
        if let Some(r) = interpret(queued) {
            return Some(r);
        }
    }
}

fn send(
    target: &str,
    request: &wit::Request,
    context: Option<&[u8]>,
    blob: Option<&wit::Blob>,
) -> Result<Option<u64>, wit::SendError> {
    called_in();
    let mut frame = json!({"type": "request", "target": target});
    let meta = request.metadata.as_deref();
    put_message(&mut frame, &request.body, meta, &request.capabilities);
    if request.inherit {
        let mut st = state();
        if let Some(parent) = st.handling {
            frame["inherit"] = parent.into();
            // Without a response of its own, the route passes on.
            if request.expects_response.is_none() {
                st.handling = None;
            }
        }
    }
    let id = request.expects_response.map(|timeout| {
        let mut st = state();
        st.next_id += 1;
        let id = st.next_id;
        st.awaited.insert(
            id,
            (
                target.to_string(),
                request.clone(),
                context.map(<[u8]>::to_vec),
            ),
        );
        frame["id"] = id.into();
        frame["timeout_ms"] = timeout.into();
        id
    });
    write_frame_with(&frame, blob).map_err(|e| wit::SendError {
        kind: wit::SendErrorKind::Offline,
        target: format!("{target} (the node's channel failed: {e})"),
        message: wit::Message::Request(request.clone()),
        context: context.map(<[u8]>::to_vec),
    })?;
    Ok(id)
}

pub fn send_request(
    target: &str,
    request: &wit::Request,
    context: Option<&[u8]>,
    blob: Option<&wit::Blob>,
) -> Result<(), wit::SendError> {
    send(target, request, context, blob).map(|_| ())
}

pub fn send_and_await_response(
    target: &str,
    request: &wit::Request,
    blob: Option<&wit::Blob>,
) -> Received {
    let Some(id) = send(target, request, None, blob)? else {
        unreachable!("a response is expected")
    };
    loop {
        let f = read_until(id, &["response", "error"]);
        if let Some(r) = interpret(f) {
            return r;
        }
    }
}

/// Reads frames until one of `types` with our `id`; others wait in
/// `deferred` for `receive`.
fn read_until(id: u64, types: &[&str]) -> Frame {
    loop {
        let f = read_frame();
        let t = f.0["type"].as_str().unwrap_or_default();
        if f.0["id"].as_u64() == Some(id) && types.contains(&t) {
            return f;
        }
        state().deferred.push_back(f);
    }
}

/// A call to the node (`frame` without its `id`): the reply's fields, or
/// why it failed.
fn call(mut frame: Value) -> Result<Value, String> {
    called_in();
    let id = {
        let mut st = state();
        st.next_id += 1;
        st.next_id
    };
    frame["id"] = id.into();
    write_frame(&frame).map_err(|e| format!("the node's channel failed: {e}"))?;
    let (reply, _) = read_until(id, &["reply"]);
    match reply["error"].as_str() {
        Some(why) => Err(why.to_string()),
        None => Ok(reply),
    }
}

pub fn send_response(
    response: &wit::Response,
    blob: Option<&wit::Blob>,
) -> Result<(), wit::SendError> {
    called_in();
    let handling = state().handling.take();
    // Nobody awaits a response: nothing to do, as for a wasm process.
    let Some(id) = handling else {
        return Ok(());
    };
    let mut frame = json!({"type": "response", "id": id});
    let meta = response.metadata.as_deref();
    put_message(&mut frame, &response.body, meta, &response.capabilities);
    if response.inherit {
        frame["inherit"] = Value::Bool(true);
    }
    write_frame_with(&frame, blob).map_err(|e| wit::SendError {
        kind: wit::SendErrorKind::Offline,
        target: format!("the node's channel failed: {e}"),
        message: wit::Message::Response((response.clone(), None)),
        context: None,
    })
}

/// The node holds a send back itself while the target's mailbox is full.
pub fn wait_for_room(_target: Option<&str>) -> bool {
    false
}

pub fn has_blob() -> bool {
    state().last_blob.is_some()
}

pub fn get_blob() -> Option<wit::Blob> {
    state().last_blob.clone()
}

fn state_path() -> Result<std::path::PathBuf, String> {
    let dir = std::env::var("SPINDLE_STATE_DIR")
        .map_err(|_| "no state directory: SPINDLE_STATE_DIR is not set".to_string())?;
    let me = our();
    let id = me.split_once('@').map_or(me.as_str(), |(_, p)| p);
    Ok(std::path::Path::new(&dir).join(format!("{id}.state")))
}

pub fn set_state(bytes: &[u8]) -> Result<(), String> {
    let path = state_path()?;
    let tmp = path.with_extension("state.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot save state to {}: {e}", path.display())
    })
}

pub fn get_state() -> Option<Vec<u8>> {
    std::fs::read(state_path().ok()?).ok()
}

pub fn clear_state() -> Result<(), String> {
    let path = state_path()?;
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot clear state {}: {e}", path.display())),
    }
}

pub fn get_on_exit() -> wit::OnExit {
    let st = state();
    st.on_exit.clone().unwrap_or(wit::OnExit::None)
}

/// Kept for `get_on_exit`; a native process's on-exit is its spec's.
pub fn set_on_exit(on_exit: &wit::OnExit) {
    state().on_exit = Some(on_exit.clone());
}

pub fn spawn(
    name: Option<&str>,
    wasm_path: &str,
    on_exit: &wit::OnExit,
    caps: &[wit::Capability],
    grant_to: &[String],
    public: bool,
) -> Result<String, String> {
    let on_exit = match on_exit {
        wit::OnExit::None => "none",
        wit::OnExit::Restart => "restart",
        wit::OnExit::Requests(_) => {
            return Err("a child's exit requests are set by the child (`set_on_exit`)".into());
        }
    };
    let reply = call(json!({
        "type": "spawn",
        "wasm": wasm_path,
        "name": name,
        "on_exit": on_exit,
        "public": public,
        "capabilities": caps_json(caps),
        "grant_to": grant_to,
    }))?;
    Ok(reply["address"].as_str().unwrap_or_default().to_string())
}

pub fn our_capabilities() -> Vec<wit::Capability> {
    call(json!({"type": "capabilities"}))
        .map(|r| caps_of(&r["capabilities"]))
        .unwrap_or_default()
}

/// As for a wasm process, a failure is not returned: the node logs it (and
/// keeps the change in memory).
pub fn save_capabilities(caps: &[wit::Capability]) {
    let _ = call(json!({"type": "save_capabilities", "capabilities": caps_json(caps)}));
}

pub fn drop_capabilities(caps: &[wit::Capability]) {
    let _ = call(json!({"type": "drop_capabilities", "capabilities": caps_json(caps)}));
}

pub fn print(text: &str) {
    println!("{text}");
}

pub fn report_panic(message: &str) {
    eprintln!("panicked: {message}");
}
