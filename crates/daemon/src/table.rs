//! The persisted process table: `table.json`, written atomically and durably.

use spindle_kernel::{TABLE_VERSION, TableSnapshot};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error(
        "{path} was written by a newer Spindle (table version {found}, this one reads up to {TABLE_VERSION}): upgrade spindle"
    )]
    TooNew { path: PathBuf, found: u32 },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source} (the previous table is kept)")]
    Write { path: PathBuf, source: io::Error },
}

/// Reads the table. A missing file is an empty node. A file that is not a
/// table is moved aside (never deleted) and reported, so the node still
/// boots and nothing is lost.
pub fn load(path: &Path) -> Result<Option<TableSnapshot>, TableError> {
    let text = match fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TableError::Read {
                path: path.into(),
                source,
            });
        }
    };
    #[derive(serde::Deserialize)]
    struct Version {
        version: u32,
    }
    match serde_json::from_slice::<Version>(&text) {
        Ok(v) if v.version > TABLE_VERSION => {
            return Err(TableError::TooNew {
                path: path.into(),
                found: v.version,
            });
        }
        _ => {}
    }
    match serde_json::from_slice::<TableSnapshot>(&text) {
        Ok(t) => Ok(Some(t)),
        Err(e) => {
            let aside = spindle_store::move_aside(path).map_err(|source| TableError::Read {
                path: path.into(),
                source,
            })?;
            tracing::error!(
                "{} is not a valid process table ({e}); moved it to {} and starting with an empty table",
                path.display(),
                aside.display()
            );
            Ok(None)
        }
    }
}

/// Writes the table durably: temp file, fsync, rename over, fsync the directory.
/// On failure (a full disk) the previous table stays in place.
pub fn save(path: &Path, table: &TableSnapshot) -> Result<(), TableError> {
    let text = serde_json::to_vec_pretty(table).expect("the table serialises");
    spindle_store::write_durable(path, &text).map_err(|source| TableError::Write {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> TableSnapshot {
        TableSnapshot {
            owned: false,
            version: TABLE_VERSION,
            node_tag: "abc".into(),
            next_num: 7,
            processes: vec![],
        }
    }

    #[test]
    fn round_trip_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("table.json");
        assert!(load(&p).unwrap().is_none());
        save(&p, &table()).unwrap();
        assert_eq!(load(&p).unwrap().unwrap(), table());
        assert!(!dir.path().join("table.json.tmp").exists());
    }

    #[test]
    fn corrupt_table_is_moved_aside_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("table.json");
        fs::write(&p, "{ not json").unwrap();
        assert!(load(&p).unwrap().is_none());
        let aside: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("corrupt"))
            .collect();
        assert_eq!(aside.len(), 1);
        assert_eq!(fs::read_to_string(aside[0].path()).unwrap(), "{ not json");
    }

    #[test]
    fn newer_table_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("table.json");
        fs::write(&p, r#"{"version": 99}"#).unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("newer Spindle") && e.contains("upgrade"), "{e}");
    }

    #[test]
    fn failed_write_keeps_the_old_table() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("table.json");
        save(&p, &table()).unwrap();
        // A directory where the temp file should go makes the write fail.
        fs::create_dir(dir.path().join("table.json.tmp")).unwrap();
        let mut t = table();
        t.next_num = 99;
        assert!(save(&p, &t).is_err());
        assert_eq!(load(&p).unwrap().unwrap().next_num, 7);
    }
}
