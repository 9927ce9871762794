//! The persisted process table: a record of the table and one row per
//! process in the node's journal (`node.db`, see
//! [`spindle_store::journal`]), so a lifecycle change writes one row
//! whatever the table's size. `table.json`, the whole-file form of earlier
//! versions, is read once and imported ([`load_legacy`]).

use spindle_kernel::{SavedProcess, TABLE_VERSION, TableChanges, TableMeta, TableSnapshot};
use spindle_store::journal::{Journal, Records};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The journal's kind for the table's own record (one row, [`META_KEY`]).
pub const META_KIND: &str = "table";
pub const META_KEY: &str = "table";
/// The record that says `capabilities.json` was imported.
pub const CAPS_IMPORTED_KEY: &str = "capabilities-imported";
/// The journal's kind for process rows, keyed by id.
pub const PROCESS_KIND: &str = "process";

/// The table as the journal holds it: `None` for a node that never wrote
/// one. A row that cannot be read is reported and left out; the rest of
/// the table stands.
pub fn from_records(records: &Records) -> Result<Option<TableSnapshot>, TableError> {
    let Some((_, meta)) = records
        .get(META_KIND)
        .and_then(|rows| rows.iter().find(|(k, _)| k == META_KEY))
    else {
        return Ok(None);
    };
    #[derive(serde::Deserialize)]
    struct Version {
        version: u32,
    }
    if let Ok(v) = serde_json::from_slice::<Version>(meta)
        && v.version > TABLE_VERSION
    {
        return Err(TableError::TooNew {
            path: "node.db".into(),
            found: v.version,
        });
    }
    let meta: TableMeta = serde_json::from_slice(meta).map_err(|e| TableError::Row {
        key: META_KEY.into(),
        why: e.to_string(),
    })?;
    let mut processes: Vec<SavedProcess> = vec![];
    for (key, row) in records.get(PROCESS_KIND).into_iter().flatten() {
        match serde_json::from_slice::<SavedProcess>(row) {
            Ok(p) if p.num.0.to_string() == *key => processes.push(p),
            Ok(p) => tracing::error!(
                "process row {} in node.db holds process {}; it is left out",
                spindle_types::id::shown(key),
                p.num
            ),
            Err(e) => tracing::error!(
                "process row {} in node.db cannot be read ({e}); that process is left out",
                spindle_types::id::shown(key)
            ),
        }
    }
    processes.sort_by_key(|p| p.num);
    Ok(Some(TableSnapshot {
        version: meta.version,
        node_tag: meta.node_tag,
        owned: meta.owned,
        next_num: meta.next_num,
        processes,
    }))
}

/// Stages what changed for the journal's next commit.
pub fn stage(journal: &Journal, changes: TableChanges) {
    if let Some(meta) = changes.meta {
        journal.put(META_KIND, META_KEY, json(&meta));
    }
    for p in changes.put {
        journal.put(PROCESS_KIND, p.num.0.to_string(), json(&p));
    }
    for num in changes.delete {
        journal.delete(PROCESS_KIND, num.0.to_string());
    }
}

/// Stages a whole table (an import of `table.json`).
pub fn stage_all(journal: &Journal, table: &TableSnapshot) {
    stage(
        journal,
        TableChanges {
            meta: Some(TableMeta {
                version: TABLE_VERSION,
                node_tag: table.node_tag.clone(),
                owned: table.owned,
                next_num: table.next_num,
            }),
            put: table.processes.clone(),
            delete: vec![],
        },
    );
}

fn json(v: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec(v).expect("the table serialises")
}

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error(
        "{path} was written by a newer Spindle (table version {found}, this one reads up to {TABLE_VERSION}): upgrade spindle"
    )]
    TooNew { path: PathBuf, found: u32 },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("the table's record in node.db cannot be read ({key}): {why}")]
    Row { key: String, why: String },
}

/// Reads the table. A missing file is an empty node. A file that is not a
/// table is moved aside (never deleted) and reported, so the node still
/// boots and nothing is lost.
pub fn load_legacy(path: &Path) -> Result<Option<TableSnapshot>, TableError> {
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

    fn reopen(p: &Path) -> Records {
        Journal::open(p).unwrap().1
    }

    #[test]
    fn the_table_round_trips_through_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("node.db");
        let (j, records) = Journal::open(&p).unwrap();
        assert!(from_records(&records).unwrap().is_none(), "a new node");
        let mut t = table();
        let raw = spindle_types::manifest::RawProcess {
            name: Some("api".into()),
            command: Some("sleep".into()),
            ..Default::default()
        };
        t.processes.push(SavedProcess {
            num: spindle_types::ProcessNum(3),
            spec: raw.into_spec(1, dir.path()).unwrap(),
            desired: spindle_kernel::Desired::Running,
            restarts: 2,
            last_exit: None,
        });
        stage_all(&j, &t);
        j.flush_blocking().unwrap();
        assert_eq!(from_records(&reopen(&p)).unwrap().unwrap(), t);
        // A delete removes the row, and nothing else.
        stage(
            &j,
            TableChanges {
                delete: vec![spindle_types::ProcessNum(3)],
                ..Default::default()
            },
        );
        j.flush_blocking().unwrap();
        assert_eq!(from_records(&reopen(&p)).unwrap().unwrap(), table());
    }

    #[test]
    fn a_damaged_row_is_left_out_and_a_newer_table_refused() {
        let mut records = Records::new();
        records.insert(
            META_KIND.into(),
            vec![(META_KEY.into(), serde_json::to_vec(&table()).unwrap())],
        );
        records.insert(
            PROCESS_KIND.into(),
            vec![("1".into(), b"{ not json".to_vec())],
        );
        let t = from_records(&records).unwrap().unwrap();
        assert!(t.processes.is_empty());
        assert_eq!(t.next_num, 7);
        records.insert(
            META_KIND.into(),
            vec![(META_KEY.into(), br#"{"version": 99}"#.to_vec())],
        );
        let e = from_records(&records).unwrap_err().to_string();
        assert!(e.contains("newer Spindle") && e.contains("upgrade"), "{e}");
    }

    #[test]
    fn legacy_round_trip_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("table.json");
        assert!(load_legacy(&p).unwrap().is_none());
        fs::write(&p, serde_json::to_vec(&table()).unwrap()).unwrap();
        assert_eq!(load_legacy(&p).unwrap().unwrap(), table());
    }

    #[test]
    fn corrupt_legacy_table_is_moved_aside_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("table.json");
        fs::write(&p, "{ not json").unwrap();
        assert!(load_legacy(&p).unwrap().is_none());
        let aside: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("corrupt"))
            .collect();
        assert_eq!(aside.len(), 1);
        assert_eq!(fs::read_to_string(aside[0].path()).unwrap(), "{ not json");
    }

    #[test]
    fn newer_legacy_table_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("table.json");
        fs::write(&p, r#"{"version": 99}"#).unwrap();
        let e = load_legacy(&p).unwrap_err().to_string();
        assert!(e.contains("newer Spindle") && e.contains("upgrade"), "{e}");
    }
}
