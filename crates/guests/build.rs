//! Builds the guest workspace (`examples/`) for wasm32-wasip2 into this
//! crate's OUT_DIR, with its own target directory (so the nested cargo never
//! waits on the outer one's lock), and exports the output directory.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.join("../..");
    for watched in [
        "examples/Cargo.toml",
        "examples/Cargo.lock",
        "examples/counter",
        "examples/middleware",
        "examples/native-echo",
        "examples/network",
        "examples/parent",
        "examples/testing",
        "examples/worker",
        "crates/process-lib",
        "wit",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("guests");
    let status = build(&root, &out, &["--target", "wasm32-wasip2"])
        .status()
        .expect("run cargo for the guest components");
    if !status.success() {
        panic!(
            "building the guest components in examples/ failed; if the target is missing, run `rustup target add wasm32-wasip2`"
        );
    }
    // The native example is built for this machine.
    let status = build(&root, &out, &["-p", "native-echo"])
        .status()
        .expect("run cargo for the native example");
    if !status.success() {
        panic!("building the native example examples/native-echo failed");
    }
    println!(
        "cargo:rustc-env=SPINDLE_GUEST_DIR={}",
        out.join("wasm32-wasip2/release").display()
    );
    println!(
        "cargo:rustc-env=SPINDLE_NATIVE_GUEST_DIR={}",
        out.join("release").display()
    );
}

/// A release build of the guest workspace into `out`, with `extra` arguments,
/// free of the outer build's settings.
fn build(root: &std::path::Path, out: &std::path::Path, extra: &[&str]) -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--locked"])
        .args(extra)
        .arg("--manifest-path")
        .arg(root.join("examples/Cargo.toml"))
        .arg("--target-dir")
        .arg(out)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET");
    cmd
}
