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
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use spindle_abi::kind;
use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Timeout reported on a received request that expects a response (the
/// channel does not carry the requester's).
const RECEIVED_TIMEOUT_MS: u64 = spindle_abi::DEFAULT_AWAIT.as_millis() as u64;

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
    /// The bytes of a blob no longer referred to, kept for the next one: a
    /// process that handles large blobs reuses memory it has touched
    /// instead of faulting in fresh pages for each (16 MiB of fresh pages
    /// cost more than copying them through the socket).
    spare: Vec<u8>,
    /// The request being handled, if it expects a response.
    handling: Option<u64>,
    on_exit: Option<wit::OnExit>,
}

impl State {
    /// `blob` is now the last message's; the one it replaces is spare.
    fn keep_blob(&mut self, blob: Option<wit::Blob>) {
        if let Some(old) = std::mem::replace(&mut self.last_blob, blob)
            && old.bytes.capacity() > self.spare.capacity()
        {
            self.spare = old.bytes;
        }
    }
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
    let mut line = serde_json::to_vec(frame).expect("frames serialise");
    line.push(b'\n');
    write_line(&line, None)
}

/// Writes a frame's line; a blob announced in it follows, raw.
fn write_line(line: &[u8], blob: Option<&wit::Blob>) -> std::io::Result<()> {
    let mut w = channel().writer.lock().unwrap_or_else(|p| p.into_inner());
    w.write_all(line)?;
    match blob {
        Some(b) => w.write_all(&b.bytes),
        None => Ok(()),
    }
}

/// A request or response as this process sends it (fields left out when empty).
#[derive(Serialize)]
struct Out<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    inherit: Option<Inherit>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    capabilities: Vec<CapOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    blob_bytes: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    blob_mime: Option<&'a str>,
}

/// A request inherits from the request being handled (its number); a
/// response, the blob of the request it answers.
#[derive(Serialize)]
#[serde(untagged)]
enum Inherit {
    From(u64),
    Blob(bool),
}

#[derive(Serialize)]
struct CapOut<'a> {
    issuer: &'a str,
    params: &'a str,
}

impl<'a> Out<'a> {
    fn new(
        kind: &'static str,
        body: &'a [u8],
        metadata: Option<&'a str>,
        caps: &'a [wit::Capability],
        blob: Option<&'a wit::Blob>,
    ) -> Out<'a> {
        // A body that is JSON (on one line) travels as that JSON, as it is;
        // any other, as base64.
        let json = std::str::from_utf8(body)
            .ok()
            .filter(|t| !t.is_empty() && !t.contains('\n'))
            .and_then(|t| serde_json::from_str::<&RawValue>(t).ok());
        Out {
            kind,
            target: None,
            id: None,
            timeout_ms: None,
            body: json,
            body_base64: (json.is_none() && !body.is_empty())
                .then(|| base64::engine::general_purpose::STANDARD.encode(body)),
            metadata,
            inherit: None,
            capabilities: caps
                .iter()
                .map(|c| CapOut {
                    issuer: &c.issuer,
                    params: &c.params,
                })
                .collect(),
            blob_bytes: blob.map(|b| b.bytes.len()),
            blob_mime: blob.and_then(|b| b.mime.as_deref()),
        }
    }

    fn line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).expect("frames serialise");
        line.push(b'\n');
        line
    }
}

/// How long a process awaiting a response polls its channel before it
/// blocks. A response from a wasm process takes the node some 10–20 µs;
/// waking a process that went to sleep costs several µs more on each side
/// (more on a virtual machine), so a short spin shortens round trips by
/// about a quarter, for at most this much CPU per awaited response.
const AWAIT_SPIN: Duration = Duration::from_micros(50);

/// Polls the channel until it is readable or `AWAIT_SPIN` has passed.
fn spin_until_readable(reader: &BufReader<UnixStream>) {
    use std::os::fd::AsRawFd;
    if !reader.buffer().is_empty() {
        return;
    }
    let mut fds = libc::pollfd {
        fd: reader.get_ref().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let start = Instant::now();
    while start.elapsed() < AWAIT_SPIN {
        // SAFETY: one valid pollfd; a zero timeout never blocks.
        if unsafe { libc::poll(&mut fds, 1, 0) } != 0 {
            return;
        }
        std::hint::spin_loop();
    }
}

/// The next frame; `spin`: poll a little before blocking (a response is due).
fn read_frame_spinning(spin: bool) -> Frame {
    let ch = channel();
    ch.waiting.store(true, Ordering::Relaxed);
    let mut reader = ch.reader.lock().unwrap_or_else(|p| p.into_inner());
    if spin {
        spin_until_readable(&reader);
    }
    let mut line = Vec::new();
    let n = reader.read_until(b'\n', &mut line);
    // The node closed the channel: it is stopping this process.
    if !matches!(n, Ok(n) if n > 0) {
        std::process::exit(0);
    }
    let frame: In = serde_json::from_slice(&line).unwrap_or_default();
    let blob = if let Some(len) = frame.blob_bytes {
        let mut bytes = std::mem::take(&mut state().spare);
        bytes.clear();
        bytes.resize(len, 0);
        if std::io::Read::read_exact(&mut *reader, &mut bytes).is_err() {
            std::process::exit(0);
        }
        Some(wit::Blob {
            mime: frame.blob_mime.clone(),
            bytes,
        })
    } else {
        frame.blob_base64.as_deref().map(|b| wit::Blob {
            mime: frame.blob_mime.clone(),
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

/// A frame from the node (fields it does not send stay empty).
#[derive(Deserialize, Default)]
struct In {
    #[serde(rename = "type", default)]
    kind: String,
    id: Option<u64>,
    #[serde(default)]
    source: String,
    #[serde(default, deserialize_with = "present")]
    body: Option<Box<RawValue>>,
    body_base64: Option<String>,
    metadata: Option<String>,
    #[serde(default)]
    expects_response: bool,
    blob_bytes: Option<usize>,
    blob_base64: Option<String>,
    blob_mime: Option<String>,
    #[serde(default)]
    capabilities: Vec<CapIn>,
    /// Of an error frame.
    #[serde(rename = "kind")]
    error_kind: Option<String>,
    message: Option<String>,
    /// Of a reply.
    error: Option<String>,
    address: Option<String>,
}

#[derive(Deserialize)]
struct CapIn {
    issuer: String,
    params: String,
}

/// A field that is there, even as `null` (which is a body too).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

impl In {
    fn body(&self) -> Vec<u8> {
        match (&self.body_base64, &self.body) {
            (Some(b), _) => base64::engine::general_purpose::STANDARD
                .decode(b)
                .unwrap_or_default(),
            (None, Some(v)) => v.get().as_bytes().to_vec(),
            (None, None) => Vec::new(),
        }
    }

    fn capabilities(&mut self) -> Vec<wit::Capability> {
        std::mem::take(&mut self.capabilities)
            .into_iter()
            .map(|c| wit::Capability {
                issuer: c.issuer,
                params: c.params,
            })
            .collect()
    }
}

fn caps_json(caps: &[wit::Capability]) -> Value {
    caps.iter()
        .map(|c| json!({"issuer": c.issuer, "params": c.params}))
        .collect()
}

fn kind_of(name: &str) -> wit::SendErrorKind {
    match name {
        kind::OFFLINE => wit::SendErrorKind::Offline,
        kind::TIMEOUT => wit::SendErrorKind::Timeout,
        kind::NO_CAPABILITY => wit::SendErrorKind::NoCapability,
        kind::MAILBOX_FULL => wit::SendErrorKind::MailboxFull,
        kind::EXITED => wit::SendErrorKind::Exited,
        _ => wit::SendErrorKind::Invalid,
    }
}

type Received = Result<(String, wit::Message), wit::SendError>;

/// A frame and the blob that came with it.
type Frame = (In, Option<wit::Blob>);

/// Turns a frame into what `receive` returns; `None` for frames that are
/// not messages (a refusal of ours, housekeeping).
fn interpret((mut f, blob): Frame) -> Option<Received> {
    let mut st = state();
    match f.kind.as_str() {
        "request" => {
            st.handling = if f.expects_response { f.id } else { None };
            st.keep_blob(blob);
            Some(Ok((
                std::mem::take(&mut f.source),
                wit::Message::Request(wit::Request {
                    inherit: false,
                    expects_response: f.expects_response.then_some(RECEIVED_TIMEOUT_MS),
                    body: f.body(),
                    metadata: f.metadata.take(),
                    capabilities: f.capabilities(),
                }),
            )))
        }
        "response" => {
            let (_, _, context) = st.awaited.remove(&f.id?)?;
            st.keep_blob(blob);
            Some(Ok((
                std::mem::take(&mut f.source),
                wit::Message::Response((
                    wit::Response {
                        inherit: false,
                        body: f.body(),
                        metadata: f.metadata.take(),
                        capabilities: f.capabilities(),
                    },
                    context,
                )),
            )))
        }
        "error" => {
            let Some((target, request, context)) = f.id.and_then(|id| st.awaited.remove(&id))
            else {
                eprintln!(
                    "spindle refused a message: {}",
                    f.message.as_deref().unwrap_or("?")
                );
                return None;
            };
            Some(Err(wit::SendError {
                kind: kind_of(f.error_kind.as_deref().unwrap_or_default()),
                target,
                message: wit::Message::Request(request),
                context,
            }))
        }
        "stopping" => Some(Ok((
            // The node's own address for the stop request, as a wasm
            // process sees it.
            format!(
                "local@{}:{}:{}",
                spindle_abi::KERNEL_PROCESS,
                spindle_abi::SYSTEM_PACKAGE,
                spindle_abi::SYSTEM_PUBLISHER
            ),
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
    let meta = request.metadata.as_deref();
    let mut frame = Out::new("request", &request.body, meta, &request.capabilities, blob);
    frame.target = Some(target);
    if request.inherit {
        let mut st = state();
        if let Some(parent) = st.handling {
            frame.inherit = Some(Inherit::From(parent));
            // Without a response of its own, the route passes on.
            if request.expects_response.is_none() {
                st.handling = None;
            }
        }
    }
    let id = request.expects_response.map(|_| {
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
        id
    });
    frame.id = id;
    frame.timeout_ms = request.expects_response;
    write_line(&frame.line(), blob).map_err(|e| wit::SendError {
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

fn read_frame() -> Frame {
    read_frame_spinning(false)
}

/// Reads frames until one of `types` with our `id`; others wait in
/// `deferred` for `receive`.
fn read_until(id: u64, types: &[&str]) -> Frame {
    loop {
        let f = read_frame_spinning(true);
        if f.0.id == Some(id) && types.contains(&f.0.kind.as_str()) {
            return f;
        }
        state().deferred.push_back(f);
    }
}

/// A call to the node (`frame` without its `id`): the reply, or why it failed.
fn call(mut frame: Value) -> Result<In, String> {
    called_in();
    let id = {
        let mut st = state();
        st.next_id += 1;
        st.next_id
    };
    frame["id"] = id.into();
    write_frame(&frame).map_err(|e| format!("the node's channel failed: {e}"))?;
    let (mut reply, _) = read_until(id, &["reply"]);
    match reply.error.take() {
        Some(why) => Err(why),
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
    let meta = response.metadata.as_deref();
    let mut frame = Out::new(
        "response",
        &response.body,
        meta,
        &response.capabilities,
        blob,
    );
    frame.id = Some(id);
    if response.inherit {
        frame.inherit = Some(Inherit::Blob(true));
    }
    write_line(&frame.line(), blob).map_err(|e| wit::SendError {
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
    Ok(reply.address.unwrap_or_default())
}

pub fn our_capabilities() -> Vec<wit::Capability> {
    call(json!({"type": "capabilities"}))
        .map(|mut r| r.capabilities())
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
