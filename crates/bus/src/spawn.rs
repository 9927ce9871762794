//! A process's request to start a wasm child, carried to the node's control
//! loop (which owns the kernel) from wherever the process runs: a wasm host
//! or the bridge of a native process's IPC channel.

use crate::Capability;
use spindle_types::{Address, OnExit};
use std::path::PathBuf;
use tokio::sync::oneshot;

/// A process asked to spawn a child; the control loop starts it and answers.
#[derive(Debug)]
pub struct SpawnCall {
    pub parent: Address,
    pub name: Option<String>,
    /// The child's component (already resolved against the parent's directory).
    pub path: PathBuf,
    pub on_exit: OnExit,
    pub public: bool,
    /// Capabilities of the parent the child receives (checked to be the parent's).
    pub capabilities: Vec<Capability>,
    /// Processes that may message the child (the parent may anyway).
    pub grant_to: Vec<Address>,
    pub reply: oneshot::Sender<Result<Address, String>>,
}
