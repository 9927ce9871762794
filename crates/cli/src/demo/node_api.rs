//! The demo's Node part: the `spindle` package (clients/node, embedded in the
//! binary) is written into the demo's home beside a short script
//! (`node-api.js`), which `node` runs against the demo's node. Without
//! `node` on `PATH` this part is skipped, saying so.

use crate::commands::Failure;
use std::path::Path;
use std::process::Command;

/// The package's files, as `node_modules/spindle/<file>`.
const PACKAGE: [(&str, &str); 2] = [
    (
        "index.js",
        include_str!("../../../../clients/node/index.js"),
    ),
    (
        "package.json",
        include_str!("../../../../clients/node/package.json"),
    ),
];

/// What the demo runs with `node`.
const SCRIPT: &str = include_str!("node-api.js");

pub fn show(home: &Path) -> Result<(), Failure> {
    let dir = home.join("node");
    let package = dir.join("node_modules/spindle");
    std::fs::create_dir_all(&package)?;
    for (file, text) in PACKAGE {
        std::fs::write(package.join(file), text)?;
    }
    std::fs::write(dir.join("node-api.js"), SCRIPT)?;
    let out = match Command::new("node")
        .arg("node-api.js")
        .current_dir(&dir)
        .env("SPINDLE_HOME", home)
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("(`node` is not on PATH: this part needs Node 18 or later)");
            return Ok(());
        }
        Err(e) => return Err(format!("running node: {e}").into()),
    };
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        return Err(format!(
            "the Node part failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(())
}
