//! The guest components built from `examples/`: where they are, for tests
//! and benchmarks (`spindle_guests::path("counter")`, and the native example
//! built for this machine: `spindle_guests::native("native-echo")`), and the
//! few that `spindle demo` carries inside the binary ([`DEMO_COMPONENTS`]).

use std::path::PathBuf;

/// The directory holding `<name>.wasm` for every guest crate.
pub const DIR: &str = env!("SPINDLE_GUEST_DIR");

/// The component built from the guest crate `name`.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from(DIR).join(format!("{name}.wasm"))
}

/// The directory holding the native examples built for this machine.
pub const NATIVE_DIR: &str = env!("SPINDLE_NATIVE_GUEST_DIR");

/// The executable built from the native example crate `name`.
pub fn native(name: &str) -> PathBuf {
    PathBuf::from(NATIVE_DIR).join(name)
}

/// The example components `spindle demo` runs, embedded in the binary so the
/// demo needs no files beside it: `(file name, component)`.
pub const DEMO_COMPONENTS: [(&str, &[u8]); 3] = [
    (
        "counter.wasm",
        include_bytes!(concat!(env!("SPINDLE_GUEST_DIR"), "/counter.wasm")),
    ),
    (
        "parent.wasm",
        include_bytes!(concat!(env!("SPINDLE_GUEST_DIR"), "/parent.wasm")),
    ),
    (
        "worker.wasm",
        include_bytes!(concat!(env!("SPINDLE_GUEST_DIR"), "/worker.wasm")),
    ),
];
