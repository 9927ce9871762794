//! The node's timer module as Rust calls: a timer is a request to
//! `<node>@timer:sys:spindle` that the module answers at its deadline, so
//! these work the same from a wasm process and from a native one.
//!
//! ```ignore
//! timer::sleep(Duration::from_millis(50))?;          // waits; other messages wait their turn
//! let id = timer::set(Duration::from_secs(5), b"retry job 7".to_vec())?;
//! timer::cancel(id)?;                                  // its answer comes at once, cancelled
//! timer::set_durable(Duration::from_secs(3600), &json!({"job": 7}))?;
//! // … in the receive loop:
//! if let Some(Ok(fired)) = timer::event(&msg) { /* fired.id, fired.context, fired.late */ }
//! ```
//!
//! A timer set with [`set`] arrives as the response to its request, with
//! the context given here. A durable one ([`set_durable`]) outlives this
//! run and the node: it comes as a request from the module, to this run
//! or the process's next one, with the context (JSON) kept with the timer.

use crate::{Address, Message, Request};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long past its deadline a timer's answer is awaited before the
/// request times out (a node under load may be late; a lost answer must
/// not hang the process).
pub const SLACK: Duration = Duration::from_secs(60);

/// A timer, as [`cancel`] names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TimerId(pub u64);

/// A failed timer call: `kind` as the module names it (`bad-request`,
/// `quota`, `id-in-use`), or a send error's kind.
pub type TimerError = crate::ModuleError;

/// A timer that fired, or was cancelled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fired {
    pub id: TimerId,
    pub cancelled: bool,
    /// How long after its deadline it was delivered.
    pub late: Duration,
    /// The context it was set with.
    pub context: Option<Vec<u8>>,
}

fn module() -> Address {
    crate::module::address(spindle_abi::module::TIMER)
}

/// Ids this process chooses: seeded from the clock, so a durable timer of
/// an earlier run never shares an id with a new one, and below 2^63 (the
/// module's own ids are above).
fn next_id() -> TimerId {
    const MODULE_IDS: u64 = 1 << 63;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            % (MODULE_IDS / 2)
            + 1
    };
    if NEXT.load(Ordering::Relaxed) == 0 {
        let _ = NEXT.compare_exchange(0, seed(), Ordering::Relaxed, Ordering::Relaxed);
    }
    TimerId(NEXT.fetch_add(1, Ordering::Relaxed) % MODULE_IDS)
}

#[derive(Serialize)]
struct Call<'a> {
    op: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unix_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    durable: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    ack: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<&'a RawValue>,
}

impl Call<'_> {
    fn after(d: Duration, id: TimerId) -> Call<'static> {
        Call {
            op: "after",
            ms: Some(d.as_millis().min(u64::MAX as u128) as u64),
            unix_ms: None,
            id: Some(id.0),
            durable: false,
            ack: false,
            context: None,
        }
    }
}

/// The module's answer.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Answer<'a> {
    error: Option<String>,
    message: String,
    timer: Option<u64>,
    status: Option<String>,
    cancelled: bool,
    #[serde(borrow)]
    context: Option<&'a RawValue>,
}

fn refused(a: &Answer) -> Option<TimerError> {
    TimerError::refused(&a.error, &a.message)
}

/// Sends `call`, awaits the module's answer for `timeout`, and reads it
/// with `then` (a refusal is the error).
fn ask<T>(
    call: &Call,
    timeout: Duration,
    then: impl FnOnce(&Answer) -> T,
) -> Result<T, TimerError> {
    let msg = crate::module::call(spindle_abi::module::TIMER, call, None, timeout)?;
    let answer: Answer = serde_json::from_slice(msg.body()).map_err(TimerError::bad_response)?;
    refused(&answer).map_or_else(|| Ok(then(&answer)), Err)
}

/// How long the answer to a timer `d` away is awaited.
fn awaited(d: Duration) -> Duration {
    d.saturating_add(SLACK).min(spindle_abi::MAX_AWAIT)
}

/// Waits `d` (other messages wait in the mailbox meanwhile).
pub fn sleep(d: Duration) -> Result<(), TimerError> {
    if d > spindle_abi::MAX_AWAIT {
        return Err(too_far(d));
    }
    ask(&Call::after(d, next_id()), awaited(d), |_| ())
}

/// Sets a timer `d` from now; it arrives as the response to its request,
/// with `context` (see [`event`]).
pub fn set(d: Duration, context: impl Into<Vec<u8>>) -> Result<TimerId, TimerError> {
    let id = next_id();
    send(&Call::after(d, id), d, context.into())?;
    Ok(id)
}

/// Sets a timer for the wall-clock time `at` (one in the past fires at once).
pub fn set_at(at: SystemTime, context: impl Into<Vec<u8>>) -> Result<TimerId, TimerError> {
    let id = next_id();
    let unix_ms = at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let d = at
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    let call = Call {
        op: "at",
        unix_ms: Some(unix_ms),
        ms: None,
        ..Call::after(d, id)
    };
    send(&call, d, context.into())?;
    Ok(id)
}

/// Sets a durable timer `d` from now: it outlives this run and the node,
/// and comes as a request from the module (see [`event`]), to this run or
/// a later one. `context` (as JSON, at most 4 KiB) is kept with it. Returns
/// once the module has it (a refusal, e.g. `quota`, is the error).
pub fn set_durable<T: Serialize>(d: Duration, context: &T) -> Result<TimerId, TimerError> {
    let id = next_id();
    let json = serde_json::to_string(context).map_err(|e| TimerError {
        kind: "bad-request".into(),
        message: format!("the context is not JSON: {e}"),
    })?;
    let raw = RawValue::from_string(json).map_err(TimerError::bad_response)?;
    let call = Call {
        durable: true,
        ack: true,
        context: Some(&raw),
        ..Call::after(d, id)
    };
    ask(&call, crate::DEFAULT_TIMEOUT, |_| id)
}

fn send(call: &Call, d: Duration, context: Vec<u8>) -> Result<(), TimerError> {
    if d > spindle_abi::MAX_AWAIT {
        return Err(too_far(d));
    }
    Request::to(module())
        .json(call)
        .expects_response(awaited(d))
        .context(context)
        .send()
        .map_err(TimerError::from)
}

/// A timer further off than any response may be awaited.
fn too_far(d: Duration) -> TimerError {
    TimerError {
        kind: "bad-request".into(),
        message: format!(
            "a timer {} s away is further off than a response may be awaited ({} s): use set_durable",
            d.as_secs(),
            spindle_abi::MAX_AWAIT.as_secs()
        ),
    }
}

/// Cancels timer `id`: true if it was pending (its own answer then comes
/// at once, [`Fired::cancelled`]).
pub fn cancel(id: TimerId) -> Result<bool, TimerError> {
    let call = Call {
        op: "cancel",
        id: Some(id.0),
        ms: None,
        unix_ms: None,
        durable: false,
        ack: false,
        context: None,
    };
    ask(&call, crate::DEFAULT_TIMEOUT, |a| a.cancelled)
}

/// Whether `msg` is about a timer: `Some(Ok)` for one that fired or was
/// cancelled, `Some(Err)` for a timer the module refused (the answer to
/// its request), `None` for any other message.
pub fn event(msg: &Message) -> Option<Result<Fired, TimerError>> {
    let from = msg.source();
    if from.process() != spindle_abi::module::TIMER
        || from.package() != spindle_abi::SYSTEM_PACKAGE
        || from.publisher() != spindle_abi::SYSTEM_PUBLISHER
    {
        return None;
    }
    let answer: Answer = serde_json::from_slice(msg.body()).ok()?;
    if let Some(e) = refused(&answer) {
        return Some(Err(e));
    }
    let id = TimerId(answer.timer?);
    let late_us = msg
        .metadata()
        .and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok())
        .and_then(|v| v["late_us"].as_u64())
        .unwrap_or(0);
    let context = match msg.context() {
        Some(c) => Some(c.to_vec()),
        None => answer.context.map(|c| c.get().as_bytes().to_vec()),
    };
    Some(Ok(Fired {
        id,
        cancelled: answer.status.as_deref() == Some("cancelled"),
        late: Duration::from_micros(late_us),
        context,
    }))
}
