//! What the calls to the node's runtime modules share: the error they
//! fail with, the modules' addresses, and one request awaiting its answer.

use crate::{Address, Message, Request};
use serde::Serialize;
use std::fmt;
use std::time::Duration;

/// A failed call to a runtime module: `kind` as the module names it
/// (`bad-request`, `no-access`, `quota`, …; each module's docs list its
/// own), `bad-response` for an answer that could not be read, or a send
/// error's kind (`timeout`, `offline`, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleError {
    pub kind: String,
    pub message: String,
}

impl fmt::Display for ModuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for ModuleError {}

impl From<crate::SendError> for ModuleError {
    fn from(e: crate::SendError) -> ModuleError {
        ModuleError {
            kind: e.kind.to_string(),
            message: e.to_string(),
        }
    }
}

impl ModuleError {
    /// An answer that is not what the module sends.
    pub(crate) fn bad_response(e: serde_json::Error) -> ModuleError {
        ModuleError {
            kind: "bad-response".into(),
            message: e.to_string(),
        }
    }

    /// A module's refusal, `{"error": kind, "message": …}`.
    pub(crate) fn refused(kind: &Option<String>, message: &str) -> Option<ModuleError> {
        kind.as_ref().map(|kind| ModuleError {
            kind: kind.clone(),
            message: message.to_string(),
        })
    }
}

/// The address of the runtime module `name` on this process's node.
pub(crate) fn address(name: &str) -> Address {
    Address::from_host(format!("{}@{name}:sys:spindle", crate::our().node()))
}

/// Sends `body` (and `blob`) to module `name` and awaits its answer for `timeout`.
pub(crate) fn call(
    name: &str,
    body: &impl Serialize,
    blob: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Message, ModuleError> {
    let mut r = Request::to(address(name))
        .json(body)
        .expects_response(timeout);
    if let Some(b) = blob {
        r = r.blob(b);
    }
    Ok(r.send_and_await_response()?)
}
