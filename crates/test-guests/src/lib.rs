//! Where the guest components built from `examples/` are, for tests and
//! benchmarks: `spindle_test_guests::path("counter")`.

use std::path::PathBuf;

/// The directory holding `<name>.wasm` for every guest crate.
pub const DIR: &str = env!("SPINDLE_GUEST_DIR");

/// The component built from the guest crate `name`.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from(DIR).join(format!("{name}.wasm"))
}
