//! What the daemon keeps for each process beside the kernel's entry: one
//! record per process (its log tap, its place on the bus), made at its
//! first spawn and dropped when it is removed.

use spindle_ipc::Bridge;
use spindle_logs::LogTap;
use spindle_types::Address;

pub(super) struct Attached {
    /// Written log lines, for followers. Outlives runs.
    pub tap: LogTap,
    pub bus: Option<OnBus>,
}

/// A process's place on the bus.
pub(super) enum OnBus {
    /// A wasm process: its address (kept after a run ends, for revocation).
    Wasm(Address),
    /// A native process with an IPC channel: its address, and its bridge
    /// while a run lives.
    Native {
        address: Address,
        bridge: Option<Bridge>,
    },
}

impl Attached {
    pub fn new() -> Attached {
        Attached {
            tap: LogTap::default(),
            bus: None,
        }
    }

    /// The address of a wasm process.
    pub fn wasm(&self) -> Option<&Address> {
        match &self.bus {
            Some(OnBus::Wasm(a)) => Some(a),
            _ => None,
        }
    }

    /// The bridge of a native process's live run.
    pub fn bridge(&self) -> Option<&Bridge> {
        match &self.bus {
            Some(OnBus::Native {
                bridge: Some(b), ..
            }) => Some(b),
            _ => None,
        }
    }

    /// Its address, of either kind.
    pub fn address(&self) -> Option<&Address> {
        match &self.bus {
            Some(OnBus::Wasm(a)) | Some(OnBus::Native { address: a, .. }) => Some(a),
            None => None,
        }
    }
}
