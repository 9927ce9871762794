//! The frames of the IPC channel: one JSON value per line, as Node's own IPC
//! channel speaks them, so `process.send(value)` and
//! `process.on('message', …)` work in a Node child with no library.
//!
//! From the process (`type` says which):
//!
//! - `{"type":"request","target":"local@api:shop:acme","body":…}` — a
//!   request. With `"id": n` and `"timeout_ms": t` a response is expected;
//!   it comes back with the same `id`. Optional: `metadata` (JSON text),
//!   `context` (any JSON value, returned with the response or error),
//!   `inherit` (the `id` of a request being handled: without `timeout_ms`
//!   its response route passes on, so the final response goes straight to
//!   the original requester; without a blob of its own, its blob travels on).
//! - `{"type":"response","id":n,"body":…}` — answers the request that
//!   arrived with `id` n (`"inherit":true`: with that request's blob, if it
//!   brings none).
//! - `{"type":"heartbeat"}` — for the watchdog; any frame counts too.
//! - `{"type":"hello","raw_blobs":true}` — this process reads raw blobs (below).
//! - Calls to the node, each with the process's own `id`, answered by
//!   `{"type":"reply","id":n,…}` (with `"error":"…"` if it failed):
//!   `{"type":"capabilities"}` — what this process holds (`capabilities`
//!   in the reply); `{"type":"save_capabilities","capabilities":[…]}` —
//!   keep capabilities that came with messages to this process (others are
//!   ignored), durably before the reply, which lists what is now held;
//!   `{"type":"drop_capabilities","capabilities":[…]}` — give them up;
//!   `{"type":"spawn","wasm":"path","name":…,"public":false,
//!   "on_exit":"none"|"restart","capabilities":[…],"grant_to":[…]}` — start
//!   a wasm child in this process's package (a relative path is taken from
//!   the process's working directory); the reply has its `address`, and
//!   this process may message it.
//!
//! To the process:
//!
//! - `{"type":"request","id":n,"source":"…","body":…,"expects_response":true}`
//! - `{"type":"response","id":n,"source":"…","body":…,"context":…}`
//! - `{"type":"error","id":n,"kind":"timeout","target":"…","message":"…"}`
//!   — a request of the process's own could not be answered (`id` is its
//!   own); without `id`, a frame it sent was refused.
//! - `{"type":"stopping"}` — the node asks it to stop (graceful stop).
//!
//! Capabilities are `{"issuer":"<address>","params":"<text>"}`, compared
//! exactly. Requests and responses either way may carry them
//! (`capabilities`); one a process attaches must be one it holds or issued,
//! or the message is refused as `invalid`, exactly as for a wasm process.
//!
//! Bodies are bytes. One that is JSON travels as that JSON value (`body`);
//! any other travels as `body_base64`. A process may send either.
//!
//! Blobs (bytes beside a message) travel as `blob_base64` in the JSON, which
//! plain Node can read and write; or raw, with no bloat: `"blob_bytes": n`
//! in the frame and exactly n bytes right after its newline. A process may
//! always send raw blobs; it gets them raw once it has said `hello` with
//! `raw_blobs`. `blob_mime` names the type of either.
//! Objects whose `cmd` starts with `NODE_` are Node's own and are ignored.
//! The source of a frame is never read from it: the node knows who sent it.

use base64::Engine as _;
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;
use spindle_bus::{Capability, Request, Response};
use spindle_types::{Address, OnExit};
use std::borrow::Cow;

/// Longest frame accepted from a process; a longer one ends the channel
/// (there is no telling where the next frame starts).
pub const MAX_FRAME: usize = 16 << 20;
/// Largest raw blob accepted from a process: no mailbox could hold a
/// larger one ([`spindle_bus::MAILBOX_BYTES`]).
pub const MAX_BLOB: usize = spindle_bus::MAILBOX_BYTES;

/// A blob a frame carries or announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobIn {
    /// In the frame (`blob_base64`).
    Inline {
        mime: Option<String>,
        bytes: Vec<u8>,
    },
    /// `len` raw bytes follow the frame.
    Raw { mime: Option<String>, len: usize },
}

/// What a process sent.
#[derive(Debug, Clone, PartialEq)]
pub enum FromProcess {
    Request {
        target: String,
        /// The process's own number for it; with `timeout_ms`, a response is expected.
        id: Option<u64>,
        timeout_ms: Option<u64>,
        body: Vec<u8>,
        metadata: Option<String>,
        context: Option<Json>,
        blob: Option<BlobIn>,
        /// The request being handled whose route and blob this one inherits.
        inherit: Option<u64>,
        capabilities: Vec<Capability>,
    },
    Response {
        id: u64,
        body: Vec<u8>,
        metadata: Option<String>,
        blob: Option<BlobIn>,
        inherit: bool,
        capabilities: Vec<Capability>,
    },
    /// A call to the node, answered by a `reply` with the same `id`.
    Call {
        id: u64,
        call: Call,
    },
    Heartbeat,
    Hello {
        raw_blobs: bool,
    },
    /// Node's own housekeeping (`{"cmd":"NODE_…"}`).
    Internal,
}

/// What a process asks of the node itself.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    Capabilities,
    SaveCapabilities(Vec<Capability>),
    DropCapabilities(Vec<Capability>),
    Spawn(Spawn),
}

/// A wasm child to start (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Spawn {
    pub wasm: String,
    pub name: Option<String>,
    pub public: bool,
    pub on_exit: OnExit,
    pub capabilities: Vec<Capability>,
    pub grant_to: Vec<Address>,
}

/// Why a frame was refused: said back to the process, and logged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("not JSON ({0}): send one JSON value per line")]
    NotJson(String),
    #[error(
        "unknown message type {0:?}: send {{\"type\":\"request\"|\"response\"|\"heartbeat\", …}}"
    )]
    UnknownType(String),
    #[error("a {kind} needs `{field}`")]
    Missing {
        kind: &'static str,
        field: &'static str,
    },
    #[error("`{field}` is not valid: {why}")]
    Invalid { field: &'static str, why: String },
    #[error("`source` is set by the node, not by the process (it said {0:?})")]
    Forged(String),
}

/// A JSON value kept as the text it came in (a request's context, say), to
/// be written back as it was.
#[derive(Debug, Clone)]
pub struct Json(Box<RawValue>);

impl Json {
    pub fn raw(&self) -> &RawValue {
        &self.0
    }
}

impl PartialEq for Json {
    fn eq(&self, other: &Json) -> bool {
        self.0.get() == other.0.get()
    }
}

/// A field present in the frame, even as `null`, kept as its text (an
/// `Option` alone would read `null` as absent).
#[derive(Default)]
struct Present<'a>(Option<&'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for Present<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&RawValue>::deserialize(d).map(|v| Present(Some(v)))
    }
}

// Fields are borrowed from the line where they can be: parsing a frame is on
// every message's path.
#[derive(Deserialize)]
struct Raw<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    cmd: Option<Cow<'a, str>>,
    #[serde(borrow)]
    target: Option<Cow<'a, str>>,
    #[serde(borrow)]
    source: Option<&'a RawValue>,
    id: Option<u64>,
    timeout_ms: Option<u64>,
    #[serde(default, borrow)]
    body: Present<'a>,
    #[serde(borrow)]
    body_base64: Option<Cow<'a, str>>,
    #[serde(borrow)]
    metadata: Option<&'a RawValue>,
    #[serde(borrow)]
    context: Option<&'a RawValue>,
    #[serde(borrow)]
    blob_base64: Option<Cow<'a, str>>,
    blob_bytes: Option<usize>,
    blob_mime: Option<String>,
    raw_blobs: Option<bool>,
    #[serde(borrow)]
    inherit: Option<&'a RawValue>,
    #[serde(borrow)]
    capabilities: Option<&'a RawValue>,
    wasm: Option<String>,
    name: Option<String>,
    public: Option<bool>,
    on_exit: Option<String>,
    grant_to: Option<Vec<String>>,
}

/// Reads one frame (a line without its newline). `me` is the sender's own
/// address: a `source` naming anyone else is refused as forged.
pub fn parse(line: &[u8], me: &str) -> Result<FromProcess, FrameError> {
    let raw: Raw = serde_json::from_slice(line).map_err(|e| FrameError::NotJson(e.to_string()))?;
    if raw.cmd.as_deref().is_some_and(|c| c.starts_with("NODE_")) {
        return Ok(FromProcess::Internal);
    }
    if let Some(s) = raw.source
        && serde_json::from_str::<Cow<str>>(s.get()).ok().as_deref() != Some(me)
    {
        return Err(FrameError::Forged(s.get().to_string()));
    }
    let kind = raw.kind.as_deref().unwrap_or_default();
    let blob = || blob_of(&raw);
    let body = || body_of(raw.body.0, raw.body_base64.as_deref());
    let metadata = || {
        raw.metadata
            .map(|m| match serde_json::from_str::<String>(m.get()) {
                Ok(text) => text,
                Err(_) => m.get().to_string(),
            })
    };
    match kind {
        "request" => Ok(FromProcess::Request {
            target: raw
                .target
                .as_deref()
                .ok_or(FrameError::Missing {
                    kind: "request",
                    field: "target",
                })?
                .to_string(),
            id: raw.id,
            timeout_ms: raw.timeout_ms,
            body: body()?,
            metadata: metadata(),
            context: raw.context.map(|c| Json(c.to_owned())),
            blob: blob()?,
            inherit: match raw.inherit.map(RawValue::get) {
                None | Some("false") => None,
                Some(v) => Some(v.parse::<u64>().map_err(|_| FrameError::Invalid {
                    field: "inherit",
                    why: "give the `id` of the request being handled".into(),
                })?),
            },
            capabilities: capabilities_of(&raw)?,
        }),
        "response" => Ok(FromProcess::Response {
            id: raw.id.ok_or(FrameError::Missing {
                kind: "response",
                field: "id",
            })?,
            body: body()?,
            metadata: metadata(),
            blob: blob()?,
            inherit: raw.inherit.is_some_and(|v| v.get() == "true"),
            capabilities: capabilities_of(&raw)?,
        }),
        "heartbeat" => Ok(FromProcess::Heartbeat),
        "hello" => Ok(FromProcess::Hello {
            raw_blobs: raw.raw_blobs.unwrap_or(false),
        }),
        call @ ("capabilities" | "save_capabilities" | "drop_capabilities" | "spawn") => {
            let kind = match call {
                "capabilities" => "capabilities call",
                "spawn" => "spawn call",
                _ => "capabilities change",
            };
            let id = raw.id.ok_or(FrameError::Missing { kind, field: "id" })?;
            let call = match call {
                "capabilities" => Call::Capabilities,
                "save_capabilities" => Call::SaveCapabilities(capabilities_of(&raw)?),
                "drop_capabilities" => Call::DropCapabilities(capabilities_of(&raw)?),
                _ => Call::Spawn(spawn_of(&raw)?),
            };
            Ok(FromProcess::Call { id, call })
        }
        other => Err(FrameError::UnknownType(other.to_string())),
    }
}

fn capabilities_of(raw: &Raw) -> Result<Vec<Capability>, FrameError> {
    match raw.capabilities.map(RawValue::get) {
        None | Some("null") => Ok(Vec::new()),
        Some(text) => serde_json::from_str::<Vec<Capability>>(text).map_err(|e| {
            FrameError::Invalid {
                field: "capabilities",
                why: format!(
                    "{e}: give a list of {{\"issuer\":\"node@process:package:publisher\",\"params\":\"…\"}}"
                ),
            }
        }),
    }
}

fn spawn_of(raw: &Raw) -> Result<Spawn, FrameError> {
    let wasm = raw.wasm.clone().ok_or(FrameError::Missing {
        kind: "spawn call",
        field: "wasm",
    })?;
    let on_exit = match raw.on_exit.as_deref() {
        None | Some("none") => OnExit::None,
        Some("restart") => OnExit::Restart,
        Some(other) => {
            return Err(FrameError::Invalid {
                field: "on_exit",
                why: format!("{other:?}: give \"none\" or \"restart\""),
            });
        }
    };
    let grant_to = raw
        .grant_to
        .iter()
        .flatten()
        .map(|g| {
            g.parse::<Address>().map_err(|e| FrameError::Invalid {
                field: "grant_to",
                why: format!("{g:?} is not an address (node@process:package:publisher): {e}"),
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(Spawn {
        wasm,
        name: raw.name.clone(),
        public: raw.public.unwrap_or(false),
        on_exit,
        capabilities: capabilities_of(raw)?,
        grant_to,
    })
}

fn blob_of(raw: &Raw) -> Result<Option<BlobIn>, FrameError> {
    let mime = raw.blob_mime.clone();
    match (&raw.blob_base64, raw.blob_bytes) {
        (Some(_), Some(_)) => Err(FrameError::Invalid {
            field: "blob_bytes",
            why: "give `blob_base64` or `blob_bytes`, not both".into(),
        }),
        (Some(text), None) => base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map(|bytes| Some(BlobIn::Inline { mime, bytes }))
            .map_err(|e| FrameError::Invalid {
                field: "blob_base64",
                why: e.to_string(),
            }),
        (None, Some(len)) if len > MAX_BLOB => Err(FrameError::Invalid {
            field: "blob_bytes",
            why: format!("{len} bytes is over the {} MiB limit", MAX_BLOB >> 20),
        }),
        (None, Some(len)) => Ok(Some(BlobIn::Raw { mime, len })),
        (None, None) => Ok(None),
    }
}

fn body_of(body: Option<&RawValue>, b64: Option<&str>) -> Result<Vec<u8>, FrameError> {
    match (body, b64) {
        (Some(_), Some(_)) => Err(FrameError::Invalid {
            field: "body",
            why: "give `body` or `body_base64`, not both".into(),
        }),
        (None, Some(text)) => base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(|e| FrameError::Invalid {
                field: "body_base64",
                why: e.to_string(),
            }),
        // The JSON text exactly as the process wrote it.
        (Some(v), None) => Ok(v.get().as_bytes().to_vec()),
        (None, None) => Ok(Vec::new()),
    }
}

/// A frame being written: a JSON object, field by field, straight into
/// bytes (no intermediate map), ending in its newline.
struct Out(Vec<u8>);

impl Out {
    fn new(kind: &str) -> Out {
        let mut out = Out(Vec::with_capacity(128));
        out.0.extend_from_slice(b"{\"type\":");
        out.string(kind);
        out
    }

    fn key(&mut self, key: &str) {
        self.0.extend_from_slice(b",\"");
        self.0.extend_from_slice(key.as_bytes());
        self.0.extend_from_slice(b"\":");
    }

    fn string(&mut self, text: &str) {
        serde_json::to_writer(&mut self.0, text).expect("strings serialise");
    }

    fn str(&mut self, key: &str, text: &str) {
        self.key(key);
        self.string(text);
    }

    fn num(&mut self, key: &str, n: u64) {
        use std::io::Write as _;
        self.key(key);
        write!(self.0, "{n}").expect("a Vec takes every write");
    }

    /// `json` must be one JSON value with no newline in it.
    fn raw(&mut self, key: &str, json: &str) {
        self.key(key);
        self.0.extend_from_slice(json.as_bytes());
    }

    fn value(&mut self, key: &str, v: &impl serde::Serialize) {
        self.key(key);
        serde_json::to_writer(&mut self.0, v).expect("values serialise");
    }

    /// Bytes: as the JSON they are, if they are JSON, else as base64.
    fn body(&mut self, body: &[u8]) {
        if body.is_empty() {
            return;
        }
        match as_json(body) {
            Some(text) if !text.contains('\n') => self.raw("body", text),
            // JSON over several lines is put on one.
            Some(text) => {
                let v: Value = serde_json::from_str(text).expect("checked to be JSON");
                self.value("body", &v);
            }
            None => self.str(
                "body_base64",
                &base64::engine::general_purpose::STANDARD.encode(body),
            ),
        }
    }

    fn blob(&mut self, blob: BlobOut, raw: bool) {
        let Some((mime, bytes)) = blob else {
            return;
        };
        if let Some(m) = mime {
            self.str("blob_mime", m);
        }
        if raw {
            self.num("blob_bytes", bytes.len() as u64);
        } else {
            self.str(
                "blob_base64",
                &base64::engine::general_purpose::STANDARD.encode(bytes),
            );
        }
    }

    /// What requests and responses share: body, metadata, capabilities.
    fn message(&mut self, body: &[u8], metadata: Option<&str>, caps: &[Capability]) {
        self.body(body);
        if let Some(m) = metadata {
            self.str("metadata", m);
        }
        if !caps.is_empty() {
            self.value("capabilities", &caps);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.0.extend_from_slice(b"}\n");
        self.0
    }
}

/// `bytes` as JSON text, if they are one valid JSON value in UTF-8.
fn as_json(bytes: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(bytes).ok()?;
    serde_json::from_str::<serde::de::IgnoredAny>(text).ok()?;
    Some(text)
}

/// A blob going out with a frame: its type and bytes.
pub type BlobOut<'a> = Option<(Option<&'a str>, &'a [u8])>;

/// A request to the process. With `raw` and a blob, the frame announces
/// `blob_bytes`: the caller writes the blob's bytes right after it.
pub fn request(
    id: u64,
    source: &str,
    r: &Request,
    expects_response: bool,
    blob: BlobOut,
    raw: bool,
) -> Vec<u8> {
    let mut f = Out::new("request");
    f.num("id", id);
    f.str("source", source);
    f.message(&r.body, r.metadata.as_deref(), &r.capabilities);
    f.blob(blob, raw);
    if expects_response {
        f.raw("expects_response", "true");
    }
    f.finish()
}

/// A response to the process (see [`request`] for `blob` and `raw`).
pub fn response(
    id: u64,
    source: &str,
    r: &Response,
    context: Option<&RawValue>,
    blob: BlobOut,
    raw: bool,
) -> Vec<u8> {
    let mut f = Out::new("response");
    f.num("id", id);
    f.str("source", source);
    f.message(&r.body, r.metadata.as_deref(), &r.capabilities);
    f.blob(blob, raw);
    if let Some(c) = context {
        f.raw("context", c.get());
    }
    f.finish()
}

/// The answer to a call of the process's (`id` is its own): `fields` on
/// success, or the error.
pub fn reply(id: u64, answer: Result<Value, String>) -> Vec<u8> {
    let mut f = Out::new("reply");
    f.num("id", id);
    match answer {
        Ok(Value::Object(fields)) => {
            for (k, v) in &fields {
                f.value(k, v);
            }
        }
        Ok(_) => {}
        Err(why) => f.str("error", &why),
    }
    f.finish()
}

/// A request of the process's own (`id`) failed, or (no `id`) a frame of
/// its was refused.
pub fn error(
    id: Option<u64>,
    kind: &str,
    target: Option<&str>,
    message: &str,
    context: Option<&RawValue>,
) -> Vec<u8> {
    let mut f = Out::new("error");
    f.str("kind", kind);
    f.str("message", message);
    if let Some(id) = id {
        f.num("id", id);
    }
    if let Some(t) = target {
        f.str("target", t);
    }
    if let Some(c) = context {
        f.raw("context", c.get());
    }
    f.finish()
}

pub fn stopping() -> Vec<u8> {
    Out::new("stopping").finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn raw_json(text: &str) -> Json {
        Json(RawValue::from_string(text.into()).unwrap())
    }

    const ME: &str = "local@api:shop:acme";

    fn req(body: &[u8]) -> Request {
        Request {
            inherit: false,
            expects_response: None,
            body: body.to_vec(),
            metadata: None,
            capabilities: vec![],
        }
    }

    fn cap(issuer: &str, params: &str) -> Capability {
        Capability {
            issuer: issuer.parse().unwrap(),
            params: params.into(),
        }
    }

    #[test]
    fn capabilities_travel_exactly_both_ways() {
        let c = cap("local@db:shop:acme", r#"{"read": true}"#);
        let mut r = req(b"hi");
        r.capabilities = vec![c.clone(), Capability::messaging(&c.issuer)];
        let out = request(1, "local@db:shop:acme", &r, false, None, false);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["capabilities"][0]["params"], json!(r#"{"read": true}"#));
        // What a process got, it can attach again and the node reads the same.
        let back = json!({"type": "response", "id": 1, "capabilities": v["capabilities"]});
        let f = parse(back.to_string().as_bytes(), ME).unwrap();
        assert!(
            matches!(f, FromProcess::Response { capabilities, .. } if capabilities == r.capabilities)
        );
        let e = parse(
            br#"{"type":"request","target":"local@db:a:b","capabilities":[{"issuer":"nobody","params":"x"}]}"#,
            ME,
        )
        .unwrap_err();
        assert!(e.to_string().contains("capabilities"), "{e}");
    }

    #[test]
    fn calls_parse_and_say_what_is_missing() {
        let f = parse(br#"{"type":"capabilities","id":2}"#, ME).unwrap();
        assert_eq!(
            f,
            FromProcess::Call {
                id: 2,
                call: Call::Capabilities
            }
        );
        let f = parse(
            br#"{"type":"save_capabilities","id":3,"capabilities":[{"issuer":"local@db:a:b","params":"\"messaging\""}]}"#,
            ME,
        )
        .unwrap();
        assert_eq!(
            f,
            FromProcess::Call {
                id: 3,
                call: Call::SaveCapabilities(vec![cap("local@db:a:b", "\"messaging\"")])
            }
        );
        let f = parse(
            br#"{"type":"spawn","id":4,"wasm":"w.wasm","name":"kid","on_exit":"restart","grant_to":["local@db:a:b"]}"#,
            ME,
        )
        .unwrap();
        let FromProcess::Call {
            call: Call::Spawn(s),
            ..
        } = f
        else {
            panic!("{f:?}")
        };
        assert_eq!(s.on_exit, OnExit::Restart);
        assert_eq!(s.grant_to.len(), 1);
        assert!(!s.public);
        let e = parse(br#"{"type":"capabilities"}"#, ME).unwrap_err();
        assert!(e.to_string().contains("`id`"), "{e}");
        let e = parse(br#"{"type":"spawn","id":1}"#, ME).unwrap_err();
        assert!(e.to_string().contains("`wasm`"), "{e}");
        let e = parse(
            br#"{"type":"spawn","id":1,"wasm":"w","on_exit":"often"}"#,
            ME,
        )
        .unwrap_err();
        assert!(e.to_string().contains("restart"), "{e}");
        let e = parse(
            br#"{"type":"spawn","id":1,"wasm":"w","grant_to":["me"]}"#,
            ME,
        )
        .unwrap_err();
        assert!(e.to_string().contains("grant_to"), "{e}");
        let l = reply(4, Ok(json!({"address": "local@kid:a:b"})));
        let v: Value = serde_json::from_slice(&l).unwrap();
        assert_eq!(
            v,
            json!({"type": "reply", "id": 4, "address": "local@kid:a:b"})
        );
        let v: Value = serde_json::from_slice(&reply(5, Err("no".into()))).unwrap();
        assert_eq!(v["error"], json!("no"));
    }

    #[test]
    fn requests_and_responses_parse() {
        let f = parse(
            br#"{"type":"request","target":"local@db:shop:acme","id":4,"timeout_ms":500,"body":{"get":1},"context":[1]}"#,
            ME,
        )
        .unwrap();
        assert_eq!(
            f,
            FromProcess::Request {
                target: "local@db:shop:acme".into(),
                id: Some(4),
                timeout_ms: Some(500),
                body: br#"{"get":1}"#.to_vec(),
                metadata: None,
                context: Some(raw_json("[1]")),
                blob: None,
                inherit: None,
                capabilities: vec![],
            }
        );
        let f = parse(br#"{"type":"response","id":9,"body_base64":"AAEC"}"#, ME).unwrap();
        assert_eq!(
            f,
            FromProcess::Response {
                id: 9,
                body: vec![0, 1, 2],
                metadata: None,
                blob: None,
                inherit: false,
                capabilities: vec![],
            }
        );
        assert_eq!(
            parse(br#"{"cmd":"NODE_HANDLE_ACK"}"#, ME).unwrap(),
            FromProcess::Internal
        );
        // Its own address as source is harmless.
        assert!(
            parse(
                br#"{"type":"heartbeat","source":"local@api:shop:acme"}"#,
                ME
            )
            .is_ok()
        );
    }

    #[test]
    fn bodies_keep_their_exact_bytes() {
        let text = |body: &[u8]| {
            let l = request(1, ME, &req(body), false, None, false);
            assert_eq!(l.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
            // Read back as a process would send it.
            let line = String::from_utf8(l.clone()).unwrap();
            let sent = line.trim_end().replacen("request", "response", 1);
            let f = parse(sent.as_bytes(), ME).unwrap();
            let FromProcess::Response { body: back, .. } = f else {
                panic!("{f:?}")
            };
            (String::from_utf8_lossy(&l).into_owned(), back)
        };
        // JSON as written, spaces and all.
        let (line, back) = text(br#"{"a": [1, 2.50]}"#);
        assert!(line.contains(r#""body":{"a": [1, 2.50]}"#), "{line}");
        assert_eq!(back, br#"{"a": [1, 2.50]}"#);
        // JSON over several lines goes on one (its value is the same).
        let (_, back) = text(b"{\n\"a\": 1\n}");
        assert_eq!(back, br#"{"a":1}"#);
        // Not JSON, or not UTF-8: base64, byte for byte.
        for odd in [
            &b"plain words"[..],
            b"\"\xff\"",
            b"{\"a\":1} trailing",
            b" ",
        ] {
            let (line, back) = text(odd);
            assert!(line.contains("body_base64"), "{line}");
            assert_eq!(back, odd);
        }
        // `null` is a body too.
        let f = parse(br#"{"type":"response","id":1,"body":null}"#, ME).unwrap();
        assert!(matches!(f, FromProcess::Response { body, .. } if body == b"null"));
    }

    #[test]
    fn bad_frames_say_what_is_wrong() {
        let e = parse(b"{not json", ME).unwrap_err();
        assert!(matches!(e, FrameError::NotJson(_)), "{e}");
        let e = parse(br#"{"type":"shout"}"#, ME).unwrap_err();
        assert!(e.to_string().contains("\"shout\"") && e.to_string().contains("request"));
        let e = parse(br#"{"type":"request","body":1}"#, ME).unwrap_err();
        assert!(e.to_string().contains("`target`"), "{e}");
        let e = parse(br#"{"type":"response"}"#, ME).unwrap_err();
        assert!(e.to_string().contains("`id`"), "{e}");
        let e = parse(
            br#"{"type":"request","target":"local@db:a:b","source":"local@admin:sys:spindle"}"#,
            ME,
        )
        .unwrap_err();
        assert!(matches!(e, FrameError::Forged(_)), "{e}");
        let e = parse(br#"{"type":"response","id":1,"body_base64":"!!"}"#, ME).unwrap_err();
        assert!(e.to_string().contains("body_base64"), "{e}");
    }

    #[test]
    fn bodies_travel_as_json_when_they_are_json() {
        let l = request(3, ME, &req(br#"{"a":1}"#), true, None, false);
        let v: Value = serde_json::from_slice(&l).unwrap();
        assert_eq!(v["body"], json!({"a":1}));
        assert_eq!(v["expects_response"], json!(true));
        assert_eq!(*l.last().unwrap(), b'\n');
        let r = Response {
            inherit: false,
            body: vec![0xff, 0x00],
            metadata: None,
            capabilities: vec![],
        };
        let ctx = raw_json(r#""ctx""#);
        let l = response(3, ME, &r, Some(ctx.raw()), None, false);
        let v: Value = serde_json::from_slice(&l).unwrap();
        assert_eq!(v["body_base64"], json!("/wA="));
        assert_eq!(v["context"], json!("ctx"));
        // And back: what one side writes, the other reads as the same bytes.
        let back = parse(
            format!(
                r#"{{"type":"response","id":3,"body_base64":{}}}"#,
                v["body_base64"]
            )
            .as_bytes(),
            ME,
        )
        .unwrap();
        assert!(matches!(back, FromProcess::Response { body, .. } if body == [0xff, 0x00]));
    }

    mod hostile {
        use super::*;
        use proptest::prelude::*;

        /// A JSON value of any shape, a few levels deep.
        fn any_json() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                any::<u64>().prop_map(serde_json::Value::from),
                any::<f64>()
                    .prop_filter("finite", |f| f.is_finite())
                    .prop_map(serde_json::Value::from),
                "\\PC{0,12}".prop_map(serde_json::Value::from),
            ];
            leaf.prop_recursive(3, 24, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                    prop::collection::btree_map(
                        prop_oneof![
                            Just("type".to_string()),
                            Just("id".to_string()),
                            Just("target".to_string()),
                            Just("body".to_string()),
                            Just("body_base64".to_string()),
                            Just("timeout_ms".to_string()),
                            Just("blob_bytes".to_string()),
                            Just("blob_base64".to_string()),
                            Just("inherit".to_string()),
                            Just("capabilities".to_string()),
                            Just("context".to_string()),
                            "[a-z_]{1,8}",
                        ],
                        inner,
                        0..6,
                    )
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                ]
            })
        }

        fn frame_type() -> impl Strategy<Value = &'static str> {
            prop_oneof![
                Just("request"),
                Just("response"),
                Just("heartbeat"),
                Just("hello"),
                Just("capabilities"),
                Just("save_capabilities"),
                Just("drop_capabilities"),
                Just("spawn"),
                Just("other"),
            ]
        }

        proptest! {
            /// Any bytes at all: an answer (a frame or an error), never a panic.
            #[test]
            fn any_bytes_are_answered(line in prop::collection::vec(any::<u8>(), 0..256)) {
                let _ = parse(&line, ME);
            }

            /// Frames shaped like real ones, with every field any value.
            #[test]
            fn any_frame_shape_is_answered(kind in frame_type(), mut fields in any_json()) {
                if let serde_json::Value::Object(m) = &mut fields {
                    m.insert("type".into(), kind.into());
                }
                let line = serde_json::to_vec(&fields).unwrap();
                let _ = parse(&line, ME);
            }

            /// Numbers at their extremes where sizes, ids and timeouts go.
            #[test]
            fn extreme_numbers_are_answered(id in any::<u64>(), t in any::<u64>(), len in any::<u64>()) {
                for line in [
                    format!(r#"{{"type":"request","id":{id},"target":"local@a:b:c","body":1,"timeout_ms":{t}}}"#),
                    format!(r#"{{"type":"request","target":"local@a:b:c","body":1,"blob_bytes":{len}}}"#),
                    format!(r#"{{"type":"response","id":{id},"body":1,"blob_bytes":{len}}}"#),
                    format!(r#"{{"type":"request","id":{id},"target":"local@a:b:c","body":1,"inherit":{t}}}"#),
                ] {
                    let _ = parse(line.as_bytes(), ME);
                }
            }
        }
    }
}
