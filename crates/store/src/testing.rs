//! For tests of what the node keeps on disk: a disk that runs full.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A size-limited tmpfs mounted at a directory, unmounted on drop (needs
/// root, as `mount` does).
pub struct TinyDisk(PathBuf);

impl TinyDisk {
    /// Mounts a tmpfs with `opts` (e.g. `size=2m`) at `at`, made if missing;
    /// `None` if it cannot be mounted.
    pub fn mount(at: &Path, opts: &str) -> Option<TinyDisk> {
        std::fs::create_dir_all(at).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| TinyDisk(at.to_path_buf()))
    }

    /// Mounts it again with `opts` (e.g. a larger `size`); panics if it cannot.
    pub fn remount(&self, opts: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "remount {} with {opts}", self.0.display());
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
