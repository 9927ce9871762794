//! The control protocol between a client (the CLI, tests, dashboards) and the
//! daemon: one JSON object per line over a Unix socket.
//!
//! Every connection opens with `hello`, carrying the protocol version; the
//! daemon answers with its own or with a `version_mismatch` error, so an old
//! CLI talking to a new daemon (or the reverse) fails clearly instead of
//! misreading messages. After the greeting, each request gets one response,
//! except `logs` with `follow`, which streams `log_line`s until the client
//! hangs up.

use crate::exit::ExitInfo;
use crate::id::{ProcessNum, Selector};
use crate::spec::ProcessSpec;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Bumped whenever a message changes shape.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest accepted control frame: a manifest of thousands of processes fits,
/// and a confused peer cannot make the daemon buffer without bound.
pub const MAX_FRAME: usize = 16 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Hello {
        protocol: u32,
        version: String,
    },
    Start {
        specs: Vec<ProcessSpec>,
        /// A spec whose name a process in the table already bears starts
        /// nothing; the ids of those processes are answered with the new.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        if_absent: bool,
    },
    /// Starts processes given as manifest entries (`[[process]]` tables,
    /// as JSON), checked and resolved against `base` by the manifest's own
    /// rules: what the client libraries send. Otherwise as `start`.
    StartEntries {
        processes: Vec<crate::manifest::RawProcess>,
        base: std::path::PathBuf,
        #[serde(default)]
        if_absent: bool,
    },
    List,
    Stop {
        target: Selector,
    },
    Restart {
        target: Selector,
    },
    Delete {
        target: Selector,
    },
    Logs {
        target: Selector,
        /// How many past lines to send first (per stream file).
        lines: usize,
        follow: bool,
        stream: LogStream,
    },
    Status,
    Shutdown,
    /// Streams lifecycle events (`event` frames) until the client hangs up.
    Events,
    /// Streams the messages on the bus that match (`traced` frames), with
    /// lifecycle events (`event` frames) in between, until the client hangs
    /// up (`spindle trace`). `process`: an address (`node@p:pkg:pub`) or
    /// process id (`p:pkg:pub`); `package`: `pkg:pub`; neither: everything.
    Trace {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        process: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        package: Option<String>,
    },
    /// Sends a request to a process on the node's behalf and waits for its
    /// response (`spindle send`).
    Send {
        target: String,
        body: String,
        timeout_ms: u64,
    },
    /// The node's name, key, listeners and peers (`spindle node id`,
    /// `spindle node peers`); answered `node`.
    Node,
    /// Reads `node.toml` again (after `spindle node init` or `peer add`):
    /// starts the network or takes the new allow-list; answered `node`.
    NodeReload,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    Out,
    Err,
    Both,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Hello {
        protocol: u32,
        version: String,
        pid: u32,
        /// The app that owns this node, if an app does (`daemon run --owner`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<u32>,
    },
    Started {
        ids: Vec<ProcessNum>,
    },
    List {
        processes: Vec<ProcessInfo>,
    },
    /// The processes an action applied to.
    Done {
        ids: Vec<ProcessNum>,
    },
    LogLine {
        id: ProcessNum,
        name: Option<String>,
        stream: LogStream,
        line: String,
    },
    /// Output was dropped for a follower that read too slowly: `missed`
    /// counts batches of lines (one batch per read of the process's output).
    LogGap {
        id: ProcessNum,
        missed: u64,
    },
    LogEnd,
    /// The first answer to `events`: every event from here on will come.
    Subscribed,
    /// A lifecycle event, to an `events` subscriber.
    Event(ProcessEvent),
    /// Events were dropped for a subscriber that read too slowly.
    EventGap {
        missed: u64,
    },
    /// The first answer to `trace`: every matching message from here on.
    Tracing,
    /// A message on the bus, to a `trace` subscriber.
    Traced(TraceRecord),
    /// Records were dropped for a `trace` subscriber that read too slowly.
    TraceGap {
        missed: u64,
    },
    Status(DaemonStatus),
    Node(NodeInfo),
    /// The response to a `send`: its body (UTF-8, lossily) and metadata.
    Reply {
        source: String,
        body: String,
        metadata: Option<String>,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
}

/// The node on the network, as `spindle node` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Absent: the node was never initialised and is `local` only.
    pub name: Option<String>,
    /// Its public key, as its peer id.
    pub key: Option<String>,
    pub listening: Vec<String>,
    pub peers: Vec<PeerRow>,
    /// Why the network is not running, when it should be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One allow-listed peer and its link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerRow {
    pub name: String,
    pub key: String,
    pub addresses: Vec<String>,
    /// `up`, `opening` or `down`.
    pub link: String,
    /// `down`: why, once it was tried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    /// `up`: for how long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up_ms: Option<u64>,
    /// Wall clock (ms since the epoch) of the last frame heard from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_ms: Option<u64>,
    /// Round trip of the link's last heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_us: Option<u64>,
    /// Requests sent to it that await its answer.
    #[serde(default)]
    pub in_flight: u64,
}

/// One message on the bus, as `trace` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceRecord {
    /// When it was sent: microseconds since the Unix epoch.
    pub at_us: u64,
    pub source: String,
    pub target: String,
    /// The request's number (a response carries the one it answers).
    pub id: u64,
    pub kind: TraceKind,
    /// `request`: how long its response is awaited (absent: none is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expects_ms: Option<u64>,
    /// `failed`: the request's failure, as its requester hears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    pub body_bytes: usize,
    pub blob_bytes: usize,
    /// `delivered`, or the send error's kind (`offline`, `no-capability`,
    /// `mailbox-full`, …): why it was refused.
    pub outcome: String,
    /// `response` and `failed`: microseconds since its request was sent
    /// (when the request was traced too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_request_us: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TraceKind {
    Request,
    Response,
    Failed,
}

/// What happened to a process, as an `events` subscriber hears it, in the
/// order it happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessEvent {
    pub event: EventKind,
    pub id: ProcessNum,
    pub name: Option<String>,
    /// Its address on the bus, for a process that has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// `started`: the OS pid of a native process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// `exited`: why (reason, code or signal, detail — "heartbeat lost: …").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<crate::ExitInfo>,
    /// `restarting`: in how many milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A run began (a native process: spawned; a wasm one: instantiated).
    Started,
    /// It was asked to stop (its stop request or signal went out).
    Stopping,
    /// A run ended; `exit` says how. A crash is `exit.reason == "crashed"`.
    Exited,
    /// The schedule starts it again after `delay_ms`.
    Restarting,
    /// It ended and stays stopped.
    Stopped,
    /// It left the table.
    Deleted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    VersionMismatch,
    BadRequest,
    NotFound,
    InvalidSpec,
    ShuttingDown,
    Internal,
    /// `send`: no process at that address.
    Offline,
    /// `send`: no response in time.
    Timeout,
    /// `send`: the target's mailbox stayed full.
    MailboxFull,
    /// `send`: the target ended before it responded.
    Exited,
}

/// One row of `ls`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub id: ProcessNum,
    pub name: Option<String>,
    pub command: String,
    /// `node@process:package:publisher`, for processes on the message bus.
    pub address: Option<String>,
    /// For a native process on the bus: whether its IPC channel is open.
    #[serde(default)]
    pub connected: Option<bool>,
    pub state: StateLabel,
    pub pid: Option<u32>,
    pub uptime_ms: Option<u64>,
    pub restarts: u32,
    pub cpu_percent: Option<f32>,
    pub memory_bytes: Option<u64>,
    pub on_exit: String,
    pub last_exit: Option<ExitInfo>,
    /// While in backoff: milliseconds until the next restart.
    pub restart_in_ms: Option<u64>,
    pub log_out: PathBuf,
    pub log_err: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateLabel {
    Starting,
    Running,
    Stopping,
    Backoff,
    Stopped,
}

impl std::fmt::Display for StateLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StateLabel::Starting => "starting",
            StateLabel::Running => "running",
            StateLabel::Stopping => "stopping",
            StateLabel::Backoff => "backoff",
            StateLabel::Stopped => "stopped",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub version: String,
    pub protocol: u32,
    pub home: PathBuf,
    pub uptime_ms: u64,
    pub processes: usize,
    pub running: usize,
    pub rss_bytes: Option<u64>,
    /// Responses dropped because their request had already timed out.
    #[serde(default)]
    pub late_responses: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_tagged_json() {
        let r = Request::Stop {
            target: Selector::Name("api".into()),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"op":"stop","target":{"name":"api"}}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        let hello = r#"{"op":"hello","protocol":1,"version":"0.1.0"}"#;
        assert!(matches!(
            serde_json::from_str::<Request>(hello).unwrap(),
            Request::Hello { protocol: 1, .. }
        ));
    }

    mod hostile {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any line off the control socket: a request or an error, and
            /// any spec in a request can be checked without a panic.
            #[test]
            fn any_frame_is_answered(line in prop::collection::vec(any::<u8>(), 0..300)) {
                if let Ok(Request::Start { specs, .. }) = serde_json::from_slice::<Request>(&line) {
                    for s in specs {
                        let _ = s.check();
                    }
                }
            }

            #[test]
            fn any_text_frame_is_answered(op in "(start|list|stop|send|logs|status|hello)", rest in "\\PC{0,80}") {
                let line = format!(r#"{{"op":"{op}",{rest}}}"#);
                let _ = serde_json::from_str::<Request>(&line);
            }
        }
    }
}
