//! # spindle_process: Spindle processes in Rust
//!
//! A Spindle process is a WebAssembly component that exports `init` and talks
//! to its node through the `spindle:process` imports. This crate wraps those
//! imports in a small, typed API:
//!
//! ```ignore
//! use spindle_process::{Address, Message, Request, Response, await_message, println};
//!
//! spindle_process::init!(run);
//!
//! fn run(our: Address) {
//!     println!("{our} up");
//!     loop {
//!         match await_message() {
//!             Ok(msg) if msg.is_request() => {
//!                 Response::new().body(msg.body().to_vec()).send().ok();
//!             }
//!             _ => {}
//!         }
//!     }
//! }
//! ```
//!
//! Build with `cargo build --target wasm32-wasip2 --release`: the output is
//! already a component. A panic is reported to the node before the process
//! traps, so its crash log says why.
//!
//! Bodies are bytes; `.json(&value)` and [`Message::json`] do serde for you.
//! Blobs are lazy: a process that forwards a message with `inherit` never
//! copies its blob.
//!
//! The node's runtime modules are Rust calls too, the same from a wasm
//! process and a native one: [`kv`] and [`sqlite`] (databases), [`timer`]
//! (timers, durable ones included) and [`vfs`] (files in drives).

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "process",
        default_bindings_module: "spindle_process::bindings",
        pub_export_macro: true,
        export_macro_name: "export_process",
        generate_all,
    });
}

// One API, two transports: the component's imports in a wasm process, the
// IPC channel (fd 3) in a native one.
#[cfg(target_family = "wasm")]
use bindings::spindle::process::host;
mod db;
mod module;
#[cfg(not(target_family = "wasm"))]
mod native;
pub mod timer;
pub mod vfs;
pub use bindings::spindle::process::types::{self as wit, Blob, Capability, OnExit, SendErrorKind};
pub use db::{Access, DbError, kv, sqlite};
pub use module::ModuleError;
#[cfg(not(target_family = "wasm"))]
use native as host;
use serde::{Serialize, de::DeserializeOwned};
use std::fmt;
use std::time::Duration;

/// Declares `f(our: Address)` as the process's entry point.
#[macro_export]
macro_rules! init {
    ($f:path) => {
        struct __SpindleProcess;
        impl $crate::bindings::Guest for __SpindleProcess {
            fn init(our: String) {
                $crate::install_panic_hook();
                $f($crate::Address::from_host(our))
            }
        }
        $crate::bindings::export_process!(__SpindleProcess with_types_in $crate::bindings);
    };
}

/// Prints a line to the process log.
#[macro_export]
macro_rules! println {
    ($($t:tt)*) => { $crate::print(&format!($($t)*)) };
}

/// Makes a panic report its message to the node before the process traps.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = match info.payload().downcast_ref::<&str>() {
            Some(s) => (*s).to_string(),
            None => info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "panic".into()),
        };
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        host::report_panic(&format!("{msg}{at}"));
    }));
}

pub fn print(text: &str) {
    host::print(text)
}

pub fn our() -> Address {
    Address::from_host(host::our())
}

/// A process's address, `node@process:package:publisher`. It crosses the
/// host boundary as one string; the parts are read from it on demand.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Address {
    text: String,
    /// Byte offsets of the `@` and the two `:`.
    at: usize,
    colon1: usize,
    colon2: usize,
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Address {
    /// Parses `node@process:package:publisher`.
    pub fn parse(text: &str) -> Option<Address> {
        Address::from_string(text.to_string())
    }

    fn from_string(text: String) -> Option<Address> {
        let at = text.find('@')?;
        let colon1 = at + 1 + text[at + 1..].find(':')?;
        let colon2 = colon1 + 1 + text[colon1 + 1..].find(':')?;
        let well_formed = at > 0
            && colon1 > at + 1
            && colon2 > colon1 + 1
            && colon2 + 1 < text.len()
            && !text[colon2 + 1..].contains(':');
        well_formed.then_some(Address {
            text,
            at,
            colon1,
            colon2,
        })
    }

    /// An address the node gave us. The node only hands out well-formed
    /// addresses; anything else is a broken host, and worth a loud stop.
    #[doc(hidden)]
    pub fn from_host(text: String) -> Address {
        Address::from_string(text).expect("the node gives well-formed addresses")
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn node(&self) -> &str {
        &self.text[..self.at]
    }

    pub fn process(&self) -> &str {
        &self.text[self.at + 1..self.colon1]
    }

    pub fn package(&self) -> &str {
        &self.text[self.colon1 + 1..self.colon2]
    }

    pub fn publisher(&self) -> &str {
        &self.text[self.colon2 + 1..]
    }

    /// Another process of the same package on the same node.
    pub fn sibling(&self, process: &str) -> Address {
        Address::from_host(format!(
            "{}@{process}:{}",
            self.node(),
            &self.text[self.colon1 + 1..]
        ))
    }
}

impl Capability {
    /// The right to message `target`.
    pub fn messaging(target: &Address) -> Capability {
        Capability {
            issuer: target.text.clone(),
            params: spindle_abi::MESSAGING_PARAMS.into(),
        }
    }

    /// Who issued it.
    pub fn issuer(&self) -> Option<Address> {
        Address::parse(&self.issuer)
    }
}

/// A message received.
#[derive(Debug, Clone)]
pub enum Message {
    Request {
        source: Address,
        request: wit::Request,
    },
    Response {
        source: Address,
        response: wit::Response,
        context: Option<Vec<u8>>,
    },
}

impl Message {
    fn from_wit(source: Address, m: wit::Message) -> Message {
        match m {
            wit::Message::Request(request) => Message::Request { source, request },
            wit::Message::Response((response, context)) => Message::Response {
                source,
                response,
                context,
            },
        }
    }

    pub fn source(&self) -> &Address {
        match self {
            Message::Request { source, .. } | Message::Response { source, .. } => source,
        }
    }

    pub fn is_request(&self) -> bool {
        matches!(self, Message::Request { .. })
    }

    pub fn body(&self) -> &[u8] {
        match self {
            Message::Request { request, .. } => &request.body,
            Message::Response { response, .. } => &response.body,
        }
    }

    pub fn metadata(&self) -> Option<&str> {
        match self {
            Message::Request { request, .. } => request.metadata.as_deref(),
            Message::Response { response, .. } => response.metadata.as_deref(),
        }
    }

    pub fn context(&self) -> Option<&[u8]> {
        match self {
            Message::Response { context, .. } => context.as_deref(),
            Message::Request { .. } => None,
        }
    }

    pub fn capabilities(&self) -> &[Capability] {
        match self {
            Message::Request { request, .. } => &request.capabilities,
            Message::Response { response, .. } => &response.capabilities,
        }
    }

    /// The body read as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(self.body())
    }
}

/// A message that could not be delivered.
#[derive(Debug, Clone)]
pub struct SendError {
    pub kind: SendErrorKind,
    pub target: Address,
    pub message: Option<Message>,
    pub context: Option<Vec<u8>>,
}

impl SendError {
    fn from_wit(e: wit::SendError) -> SendError {
        // An invalid request comes back with the target exactly as it was
        // given, so it may not parse: keep what the process wrote.
        let target = Address::from_string(e.target.clone()).unwrap_or(Address {
            at: 0,
            colon1: 0,
            colon2: 0,
            text: e.target,
        });
        SendError {
            kind: e.kind,
            message: Some(Message::from_wit(target.clone(), e.message)),
            target,
            context: e.context,
        }
    }
}

impl fmt::Display for SendErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use spindle_abi::kind;
        f.write_str(match self {
            SendErrorKind::Offline => kind::OFFLINE,
            SendErrorKind::Timeout => kind::TIMEOUT,
            SendErrorKind::NoCapability => kind::NO_CAPABILITY,
            SendErrorKind::MailboxFull => kind::MAILBOX_FULL,
            SendErrorKind::Invalid => kind::INVALID,
            SendErrorKind::Exited => kind::EXITED,
        })
    }
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sending to {} failed: {}", self.target, self.kind)
    }
}

impl std::error::Error for SendError {}

/// Metadata of the message the node sends to ask a process to stop.
pub const STOPPING: &str = spindle_abi::STOPPING_METADATA;

static ON_STOPPING: std::sync::Mutex<Option<fn()>> = std::sync::Mutex::new(None);

/// Runs `hook` when the node asks this process to stop (a graceful `stop`),
/// before it exits. The node kills it anyway once the grace period is over.
pub fn on_stopping(hook: fn()) {
    *ON_STOPPING.lock().unwrap_or_else(|p| p.into_inner()) = Some(hook);
}

fn is_stop_request(source: &str, m: &wit::Message) -> bool {
    matches!(m, wit::Message::Request(r) if r.metadata.as_deref() == Some(STOPPING))
        && Address::parse(source).is_some_and(|a| {
            a.process() == spindle_abi::KERNEL_PROCESS
                && a.package() == spindle_abi::SYSTEM_PACKAGE
                && a.publisher() == spindle_abi::SYSTEM_PUBLISHER
        })
}

/// Waits for the next message; a send error about an earlier request comes as `Err`.
/// A stop request from the node runs the `on_stopping` hook and ends the process.
pub fn await_message() -> Result<Message, SendError> {
    // Queued mail is taken without the cost of a call that may wait.
    let next = host::try_receive().unwrap_or_else(host::receive);
    match next {
        Ok((source, m)) if is_stop_request(&source, &m) => {
            let hook = *ON_STOPPING.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(hook) = hook {
                hook();
            }
            std::process::exit(0)
        }
        Ok((source, m)) => Ok(Message::from_wit(Address::from_host(source), m)),
        Err(e) => Err(SendError::from_wit(e)),
    }
}

/// Builds and sends a request.
#[derive(Debug, Clone)]
pub struct Request {
    target: Option<Address>,
    inner: wit::Request,
    context: Option<Vec<u8>>,
    blob: Option<Blob>,
}

impl Default for Request {
    fn default() -> Self {
        Request::new()
    }
}

impl Request {
    pub fn new() -> Request {
        Request {
            target: None,
            inner: wit::Request {
                inherit: false,
                expects_response: None,
                body: vec![],
                metadata: None,
                capabilities: vec![],
            },
            context: None,
            blob: None,
        }
    }

    pub fn to(target: Address) -> Request {
        Request {
            target: Some(target),
            ..Request::new()
        }
    }

    pub fn target(mut self, target: Address) -> Self {
        self.target = Some(target);
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.inner.body = body.into();
        self
    }

    pub fn json<T: Serialize>(mut self, value: &T) -> Self {
        self.inner.body = serde_json::to_vec(value).expect("serialisable body");
        self
    }

    pub fn metadata(mut self, metadata: impl Into<String>) -> Self {
        self.inner.metadata = Some(metadata.into());
        self
    }

    /// Responses go to the requester of the request being handled, and its
    /// blob travels on unless this request sets one.
    pub fn inherit(mut self, inherit: bool) -> Self {
        self.inner.inherit = inherit;
        self
    }

    pub fn expects_response(mut self, timeout: Duration) -> Self {
        self.inner.expects_response = Some(timeout.as_millis() as u64);
        self
    }

    pub fn context(mut self, context: impl Into<Vec<u8>>) -> Self {
        self.context = Some(context.into());
        self
    }

    pub fn blob(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.blob = Some(Blob {
            mime: None,
            bytes: bytes.into(),
        });
        self
    }

    pub fn capabilities(mut self, caps: Vec<Capability>) -> Self {
        self.inner.capabilities = caps;
        self
    }

    fn target_or_panic(&self) -> &Address {
        self.target
            .as_ref()
            .expect("Request::to(address) before sending")
    }

    pub fn send(self) -> Result<(), SendError> {
        with_room(Some(self.target_or_panic().as_str()), || {
            host::send_request(
                self.target_or_panic().as_str(),
                &self.inner,
                self.context.as_deref(),
                self.blob.as_ref(),
            )
        })
        .map_err(SendError::from_wit)
    }

    /// Sends and waits for the response (other messages wait their turn).
    pub fn send_and_await_response(self) -> Result<Message, SendError> {
        let mut req = self.inner;
        if req.expects_response.is_none() {
            req.expects_response = Some(DEFAULT_TIMEOUT.as_millis() as u64);
        }
        let target = self
            .target
            .as_ref()
            .expect("Request::to(address) before sending");
        match with_room(Some(target.as_str()), || {
            host::send_and_await_response(target.as_str(), &req, self.blob.as_ref())
        }) {
            Ok((source, m)) => Ok(Message::from_wit(Address::from_host(source), m)),
            Err(e) => Err(SendError::from_wit(e)),
        }
    }
}

/// Timeout for `send_and_await_response` when none was set.
pub const DEFAULT_TIMEOUT: Duration = spindle_abi::DEFAULT_AWAIT;

/// How long the node lets a send wait for room in a full mailbox, per try.
pub use spindle_abi::MAILBOX_WAIT;
/// Tries at a full mailbox before a send gives up with `mailbox-full`.
/// Each waits for room for up to [`MAILBOX_WAIT`]; more than one try is only
/// needed when other senders take the room first.
const MAILBOX_TRIES: u32 = 8;

/// Runs `send` until it is not refused for a full mailbox (`target`: whose,
/// `None` for a response): backpressure slows this process, nobody else.
fn with_room<T>(
    target: Option<&str>,
    mut send: impl FnMut() -> Result<T, wit::SendError>,
) -> Result<T, wit::SendError> {
    let mut tries = 0;
    loop {
        match send() {
            Err(e)
                if e.kind == SendErrorKind::MailboxFull
                    && tries < MAILBOX_TRIES
                    && host::wait_for_room(target) =>
            {
                tries += 1;
            }
            r => return r,
        }
    }
}

/// Builds and sends the response to the request being handled.
#[derive(Debug, Clone)]
pub struct Response {
    inner: wit::Response,
    blob: Option<Blob>,
}

impl Default for Response {
    fn default() -> Self {
        Response::new()
    }
}

impl Response {
    pub fn new() -> Response {
        Response {
            inner: wit::Response {
                inherit: false,
                body: vec![],
                metadata: None,
                capabilities: vec![],
            },
            blob: None,
        }
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.inner.body = body.into();
        self
    }

    pub fn json<T: Serialize>(mut self, value: &T) -> Self {
        self.inner.body = serde_json::to_vec(value).expect("serialisable body");
        self
    }

    pub fn inherit(mut self, inherit: bool) -> Self {
        self.inner.inherit = inherit;
        self
    }

    pub fn blob(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.blob = Some(Blob {
            mime: None,
            bytes: bytes.into(),
        });
        self
    }

    pub fn capabilities(mut self, caps: Vec<Capability>) -> Self {
        self.inner.capabilities = caps;
        self
    }

    pub fn send(self) -> Result<(), SendError> {
        with_room(None, || {
            host::send_response(&self.inner, self.blob.as_ref())
        })
        .map_err(SendError::from_wit)
    }
}

pub fn has_blob() -> bool {
    host::has_blob()
}

/// The last message's blob; its bytes cross into the process only now.
pub fn get_blob() -> Option<Blob> {
    host::get_blob()
}

/// Durable when it returns.
pub fn set_state(bytes: &[u8]) -> Result<(), String> {
    host::set_state(bytes)
}

pub fn get_state() -> Option<Vec<u8>> {
    host::get_state()
}

pub fn clear_state() -> Result<(), String> {
    host::clear_state()
}

pub fn set_state_json<T: Serialize>(value: &T) -> Result<(), String> {
    set_state(&serde_json::to_vec(value).map_err(|e| e.to_string())?)
}

/// The saved state read as JSON; `None` if there is none or it does not parse.
pub fn get_state_json<T: DeserializeOwned>() -> Option<T> {
    serde_json::from_slice(&get_state()?).ok()
}

pub fn get_on_exit() -> OnExit {
    host::get_on_exit()
}

pub fn set_on_exit(on_exit: &OnExit) {
    host::set_on_exit(on_exit)
}

/// A request to fire when this process exits (for `OnExit::Requests`).
pub fn exit_request(
    target: Address,
    body: impl Into<Vec<u8>>,
) -> (wit::Address, wit::Request, Option<Blob>) {
    (
        target.text,
        wit::Request {
            inherit: false,
            expects_response: None,
            body: body.into(),
            metadata: None,
            capabilities: vec![],
        },
        None,
    )
}

/// Options for [`spawn`].
#[derive(Debug, Clone)]
pub struct Spawn {
    pub name: Option<String>,
    pub wasm_path: String,
    pub on_exit: OnExit,
    pub capabilities: Vec<Capability>,
    pub grant_to: Vec<Address>,
    pub public: bool,
}

impl Spawn {
    pub fn new(wasm_path: impl Into<String>) -> Spawn {
        Spawn {
            name: None,
            wasm_path: wasm_path.into(),
            on_exit: OnExit::None,
            capabilities: vec![],
            grant_to: vec![],
            public: false,
        }
    }
}

/// Starts a child process; returns its address.
pub fn spawn(s: &Spawn) -> Result<Address, String> {
    let grant_to: Vec<String> = s.grant_to.iter().map(|a| a.text.clone()).collect();
    host::spawn(
        s.name.as_deref(),
        &s.wasm_path,
        &s.on_exit,
        &s.capabilities,
        &grant_to,
        s.public,
    )
    .map(Address::from_host)
}

pub fn our_capabilities() -> Vec<Capability> {
    host::our_capabilities()
}

pub fn save_capabilities(caps: &[Capability]) {
    host::save_capabilities(caps)
}

pub fn drop_capabilities(caps: &[Capability]) {
    host::drop_capabilities(caps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_into_their_parts() {
        let a = Address::parse("local@counter:demo:spindle").unwrap();
        assert_eq!(
            (a.node(), a.process(), a.package(), a.publisher()),
            ("local", "counter", "demo", "spindle")
        );
        assert_eq!(a.to_string(), "local@counter:demo:spindle");
        let b = a.sibling("worker");
        assert_eq!(b.as_str(), "local@worker:demo:spindle");
        assert_eq!(b.process(), "worker");
        assert_eq!(Capability::messaging(&a).issuer(), Some(a));
    }

    #[test]
    fn malformed_addresses_are_refused() {
        for bad in [
            "",
            "local",
            "@a:b:c",
            "local@:b:c",
            "local@a::c",
            "local@a:b:",
            "local@a:b",
            "local@a:b:c:d",
            "local:a:b:c",
        ] {
            assert!(Address::parse(bad).is_none(), "{bad:?} should not parse");
        }
    }
}
