//! # spindle-ipc: native processes on the message bus
//!
//! A native process started with `ipc = true` gets one end of a Unix socket
//! pair as its fd 3, announced with `NODE_CHANNEL_FD=3`: the channel Node
//! opens for `process.send` / `process.on('message')`, so a Node child is on
//! the bus with no library at all. Frames are one JSON value per line in
//! both directions ([`frame`]); the daemon's end is served by a [`Bridge`]
//! ([`bridge`]), which puts the process on the bus under its own address —
//! the same addresses, capability checks and request/response semantics as a
//! wasm process, with the source always set by the node.

pub mod bridge;
pub mod frame;
mod io;

pub use bridge::{Bridge, Spawner};
