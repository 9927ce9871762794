//! Where the guest components built from `examples/` are, for tests and
//! benchmarks: `spindle_test_guests::path("counter")`; and the native
//! example built for this machine: `spindle_test_guests::native("native-echo")`.

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
