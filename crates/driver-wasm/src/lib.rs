//! # spindle-driver-wasm: WebAssembly components as Spindle processes
//!
//! One wasmtime [`Engine`](wasmtime::Engine) per node; one `Store` per
//! process, run as a task on the daemon's runtime.
//!
//! - **Loading** ([`runtime`]): a component is compiled once and the compiled
//!   artifact is cached on disk, keyed by the file's contents and the engine's
//!   compatibility hash (so an engine or wasmtime change is a miss, never a
//!   wrong load). Linking happens once per component too: processes start
//!   from a cached `ProcessPre`. A file that is not a valid component, or
//!   imports what Spindle does not provide, is a clear error naming the file.
//!   A daemon compiles in a helper process with its own budgets
//!   ([`compiler`]), so the compiler's memory never stays in the daemon.
//! - **Isolation**: a per-process memory cap (`StoreLimits`, trapping on a
//!   failed grow), and epoch interruption: a ticker thread bumps the epoch
//!   every [`EPOCH_TICK`](runtime::EPOCH_TICK) while wasm processes run; a
//!   process past its deadline yields to the runtime (so a busy loop cannot
//!   starve other processes or timers), and a killed one traps at its next
//!   tick or host call; a kill also closes its mailbox, waking a `receive`.
//! - **The host** ([`host`]): the `spindle:process/host` imports — receive
//!   with request tracking (contexts, timeouts, late responses dropped and
//!   counted), send, await, respond, lazy blobs, durable state, on-exit,
//!   spawn, capabilities, print, panic reports — over the [`spindle_bus`].
//!   Only imports that may wait are async; sends never wait (a full mailbox
//!   is `mailbox-full` at once, and the guest may `wait-for-room`).
//! - **Exit** ([`driver`]): `init` returning is exit code 0; a trap is
//!   `ExitStatus::Trap` with the guest's panic message (or the trap) as
//!   detail. On-exit requests are sent by the exiting process's host, with
//!   its address as source.

pub mod compiler;
pub mod driver;
pub mod host;
pub mod runtime;

pub use compiler::Compiler;
pub use driver::{WasmDriver, WasmEvent};
pub use runtime::{Runtime, WasmError};
pub use spindle_bus::SpawnCall;

/// Bindings for the `spindle:process` world.
pub mod bindings {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "process",
        // Only what may wait is async: a synchronous import costs the guest
        // less per call (no boxed future), and sends and polls never wait.
        imports: {
            "spindle:process/host.receive": async | trappable,
            "spindle:process/host.send-and-await-response": async | trappable,
            "spindle:process/host.wait-for-room": async | trappable,
            "spindle:process/host.set-state": async | trappable,
            "spindle:process/host.spawn": async | trappable,
            "spindle:process/host.save-capabilities": async | trappable,
            "spindle:process/host.drop-capabilities": async | trappable,
            default: trappable,
        },
        exports: { default: async },
    });
}
