//! # spindle-store: what Spindle must not lose
//!
//! The node's records — the process table and the capabilities — are rows
//! of one SQLite database written by a group-committing [`journal`]: a
//! change costs the same however many records there are.
//!
//! Every other file the node keeps between runs (process state, files of
//! earlier versions) is replaced whole, the same way: write a temporary file
//! beside it, fsync it, rename it over the old one, fsync the directory.
//! Whatever happens — a full disk, a kill -9 at any instant — the path holds
//! either the complete old contents or the complete new ones, and once
//! [`write_durable`] returns the new contents survive a power cut.
//!
//! A file that turns out not to be what it should be is never deleted:
//! [`move_aside`] renames it to `<name>.corrupt-<unix seconds>` so the node can
//! start without it and an operator can still look at it.

pub mod journal;
pub mod testing;

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Replaces `path` with `bytes` durably (see the crate docs). On failure the
/// old contents stay in place and no temporary file is left behind.
pub fn write_durable(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let write = || -> io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// Renames a corrupt `path` to `<path>.corrupt-<unix seconds>`; returns the new name.
pub fn move_aside(path: &Path) -> io::Result<PathBuf> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".corrupt-{secs}"));
    let aside = PathBuf::from(aside);
    fs::rename(path, &aside)?;
    Ok(aside)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("table.json");
        write_durable(&p, b"one").unwrap();
        write_durable(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_failed_write_keeps_the_old_contents() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        write_durable(&p, b"old").unwrap();
        // The temporary cannot be created where a directory of its name sits.
        fs::create_dir(dir.path().join("x.tmp")).unwrap();
        assert!(write_durable(&p, b"new").is_err());
        assert_eq!(fs::read(&p).unwrap(), b"old");
    }

    #[test]
    fn corrupt_files_are_renamed_not_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("caps.json");
        fs::write(&p, b"garbage").unwrap();
        let aside = move_aside(&p).unwrap();
        assert!(!p.exists());
        assert!(aside.to_string_lossy().contains("caps.json.corrupt-"));
        assert_eq!(fs::read(aside).unwrap(), b"garbage");
    }
}
