//! The persisted form of the process table: what was asked to run, not what
//! happened to be running — a record of the table ([`TableMeta`]) and a row
//! per process ([`SavedProcess`]). Versioned; older versions stay readable
//! (a fixture of each is kept under test).

use serde::{Deserialize, Serialize};
use spindle_types::{ExitInfo, ProcessNum, ProcessSpec};

/// Version written by this build.
pub const TABLE_VERSION: u32 = 1;

/// Whether the user (or the process's policy) wants it running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Desired {
    Running,
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedProcess {
    pub num: ProcessNum,
    pub spec: ProcessSpec,
    pub desired: Desired,
    pub restarts: u32,
    pub last_exit: Option<ExitInfo>,
}

/// The table's own record (beside one row per process).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableMeta {
    pub version: u32,
    pub node_tag: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub owned: bool,
    pub next_num: u64,
}

/// The whole table: its record and its rows, as read at boot (and as
/// `table.json` held it before the journal).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableSnapshot {
    pub version: u32,
    /// Random tag of this node; marks every process it spawns so a later
    /// daemon can find leftovers of an earlier one.
    pub node_tag: String,
    /// Written by a node an app owns: no daemon restores its processes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub owned: bool,
    pub next_num: u64,
    pub processes: Vec<SavedProcess>,
}
