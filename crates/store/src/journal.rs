//! The node's records: one SQLite database (`node.db`, WAL), a row per
//! record, so a change costs the same whatever the number of records.
//!
//! Records are `(kind, key) → value` rows; the process table and the
//! capability table are kinds of their own. A change is *staged*
//! ([`Journal::put`], [`Journal::delete`]) and made durable by a
//! [`Journal::commit`], which hands everything staged so far to the writer
//! thread as one batch and returns that batch's generation. The writer
//! commits every batch waiting for it in one transaction (group commit: a
//! burst of changes costs one fsync), then reports the generation durable;
//! [`Journal::durable`] waits for it. A batch is whole or absent after any
//! crash: it is never split across transactions.
//!
//! Whoever may run ahead of the disk — a spawn returns to its parent before
//! its child's row is durable — asks [`Journal::lag`] first: how long the
//! oldest batch not yet durable has waited. Past [`COMMIT_WINDOW`] they wait
//! for the disk instead, so the changes a crash can take with it are those
//! of the last `COMMIT_WINDOW` (plus the batch being written).
//!
//! A failed commit (a full disk) is retried every [`RETRY_EVERY`] with the
//! same batches and everything since; waiters are told why it failed.

use rusqlite::{Connection, params};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How far a caller that does not wait for the disk may run ahead of it:
/// past this, changes wait to be durable before they are acknowledged.
pub const COMMIT_WINDOW: Duration = Duration::from_millis(10);
/// How often a commit that failed is tried again.
pub const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Changes in effect in memory but not (yet) on disk: why the last commit
/// failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotSaved(pub String);

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot open {path}: {source} (move it aside to start with an empty node)")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("{path} is damaged and cannot be moved aside: {source}")]
    SetAside {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the journal's writer: {0}")]
    Thread(std::io::Error),
}

/// One staged change.
#[derive(Debug, Clone)]
enum Change {
    Put {
        kind: &'static str,
        key: String,
        value: Vec<u8>,
    },
    Delete {
        kind: &'static str,
        key: String,
    },
}

/// What a batch carries to the writer.
struct Batch {
    generation: u64,
    changes: Vec<Change>,
}

/// The outcome of the writer's latest commit.
#[derive(Debug, Clone, Default)]
struct Written {
    /// Every batch up to this one is covered.
    generation: u64,
    /// Every batch up to this one is on disk.
    durable: u64,
    /// Why the commit of the batches after `durable` failed, if it did.
    error: Option<String>,
}

impl Written {
    /// The outcome for the batch `generation`, once covered.
    fn outcome(&self, generation: u64) -> Option<Result<(), NotSaved>> {
        if generation <= self.durable {
            Some(Ok(()))
        } else if generation <= self.generation {
            Some(Err(NotSaved(self.error.clone().unwrap_or_default())))
        } else {
            None
        }
    }
}

struct Staged {
    changes: Vec<Change>,
    /// The generation the last committed batch got.
    generation: u64,
    /// When each batch not yet durable was committed, oldest first.
    in_flight: std::collections::VecDeque<(u64, Instant)>,
    to_writer: Option<mpsc::Sender<Batch>>,
}

/// The node's records on disk. Cheap to clone; see the module docs.
#[derive(Clone)]
pub struct Journal {
    staged: Arc<Mutex<Staged>>,
    written: watch::Receiver<Written>,
    /// The same reports, for waiters outside an async runtime.
    reported: Arc<(Mutex<Written>, Condvar)>,
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    path: PathBuf,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("path", &self.path).finish()
    }
}

/// Every record, by kind, as read at open.
pub type Records = HashMap<String, Vec<(String, Vec<u8>)>>;

fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let c = Connection::open(path)?;
    // WAL with FULL sync: a commit is durable when it returns.
    c.pragma_update(None, "journal_mode", "wal")?;
    c.pragma_update(None, "synchronous", "full")?;
    c.execute_batch(
        "CREATE TABLE IF NOT EXISTS records (
             kind TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
             PRIMARY KEY (kind, key)) WITHOUT ROWID;",
    )?;
    Ok(c)
}

/// Reads every record of the database at `path` (for tools and tests; the
/// node reads them through [`Journal::open`]).
pub fn read(path: &Path) -> rusqlite::Result<Records> {
    let c = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    read_all(&c)
}

fn read_all(c: &Connection) -> rusqlite::Result<Records> {
    let mut out = Records::new();
    let mut q = c.prepare("SELECT kind, key, value FROM records ORDER BY kind, key")?;
    let rows = q.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, Vec<u8>>(2)?,
        ))
    })?;
    for row in rows {
        let (kind, key, value) = row?;
        out.entry(kind).or_default().push((key, value));
    }
    Ok(out)
}

impl Journal {
    /// Opens (or creates) the database at `path`, reads every record, and
    /// starts the writer.
    pub fn open(path: &Path) -> Result<(Journal, Records), JournalError> {
        let open_err = |source| JournalError::Open {
            path: path.into(),
            source,
        };
        let conn = connect(path).map_err(open_err)?;
        let records = read_all(&conn).map_err(open_err)?;
        let (to_writer, batches) = mpsc::channel::<Batch>();
        let (tell, written) = watch::channel(Written::default());
        let reported: Arc<(Mutex<Written>, Condvar)> = Arc::default();
        let at = path.to_path_buf();
        let report = reported.clone();
        let handle = std::thread::Builder::new()
            .name("spindle-journal".into())
            .spawn(move || {
                writer(&at, conn, batches, |w| {
                    // The async view first: whoever wakes on the condvar
                    // then sees the same outcome everywhere.
                    tell.send_replace(w.clone());
                    let (m, cv) = &*report;
                    *m.lock().unwrap_or_else(|p| p.into_inner()) = w;
                    cv.notify_all();
                })
            })
            .map_err(JournalError::Thread)?;
        Ok((
            Journal {
                staged: Arc::new(Mutex::new(Staged {
                    changes: vec![],
                    generation: 0,
                    in_flight: Default::default(),
                    to_writer: Some(to_writer),
                })),
                written,
                reported,
                writer: Arc::new(Mutex::new(Some(handle))),
                path: path.into(),
            },
            records,
        ))
    }

    /// [`Journal::open`]; a file that is not a database (or a damaged one)
    /// is moved aside — never deleted — and an empty one started. Returns
    /// where it went.
    pub fn open_or_set_aside(
        path: &Path,
    ) -> Result<(Journal, Records, Option<PathBuf>), JournalError> {
        match Journal::open(path) {
            Err(JournalError::Open { source, .. })
                if matches!(
                    source.sqlite_error_code(),
                    Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
                ) =>
            {
                let aside = crate::move_aside(path).map_err(|source| JournalError::SetAside {
                    path: path.into(),
                    source,
                })?;
                for suffix in ["-wal", "-shm"] {
                    let mut side = path.as_os_str().to_owned();
                    side.push(suffix);
                    let _ = crate::move_aside(Path::new(&side));
                }
                let (j, r) = Journal::open(path)?;
                Ok((j, r, Some(aside)))
            }
            other => other.map(|(j, r)| (j, r, None)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Staged> {
        self.staged.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stages `kind`/`key` = `value` for the next commit.
    pub fn put(&self, kind: &'static str, key: impl Into<String>, value: Vec<u8>) {
        self.lock().changes.push(Change::Put {
            kind,
            key: key.into(),
            value,
        });
    }

    /// Stages the removal of `kind`/`key` for the next commit.
    pub fn delete(&self, kind: &'static str, key: impl Into<String>) {
        self.lock().changes.push(Change::Delete {
            kind,
            key: key.into(),
        });
    }

    /// Hands everything staged to the writer as one batch; returns the
    /// generation to wait for (that of the last batch if nothing was staged).
    pub fn commit(&self) -> u64 {
        let mut s = self.lock();
        if s.changes.is_empty() {
            return s.generation;
        }
        s.generation += 1;
        let batch = Batch {
            generation: s.generation,
            changes: std::mem::take(&mut s.changes),
        };
        let generation = s.generation;
        let durable = self.written.borrow().durable;
        while s.in_flight.front().is_some_and(|(g, _)| *g <= durable) {
            s.in_flight.pop_front();
        }
        s.in_flight.push_back((generation, Instant::now()));
        // Sent under the lock: batches reach the writer in generation order.
        if let Some(tx) = &s.to_writer {
            let _ = tx.send(batch);
        }
        generation
    }

    /// How long the oldest batch not yet durable has waited (zero if none).
    /// A batch whose commit failed is not durable: while the disk fails,
    /// the lag grows.
    pub fn lag(&self) -> Duration {
        let durable = self.written.borrow().durable;
        let mut s = self.lock();
        while s.in_flight.front().is_some_and(|(g, _)| *g <= durable) {
            s.in_flight.pop_front();
        }
        s.in_flight
            .front()
            .map_or(Duration::ZERO, |(_, at)| at.elapsed())
    }

    /// Whether the last commit failed (and the disk is behind).
    pub fn failing(&self) -> bool {
        let w = self.written.borrow();
        w.error.is_some() && w.generation > w.durable
    }

    /// Waits until every batch up to `generation` is on disk, or the commit
    /// covering it failed.
    pub async fn durable(&self, generation: u64) -> Result<(), NotSaved> {
        let mut rx = self.written.clone();
        loop {
            if let Some(outcome) = rx.borrow_and_update().outcome(generation) {
                return outcome;
            }
            if rx.changed().await.is_err() {
                return Err(NotSaved("the journal's writer has stopped".into()));
            }
        }
    }

    /// Commits what is staged and waits for it (and everything before it) on
    /// disk.
    pub async fn flush(&self) -> Result<(), NotSaved> {
        let generation = self.commit();
        self.durable(generation).await
    }

    /// [`Journal::flush`] for callers outside an async runtime.
    pub fn flush_blocking(&self) -> Result<(), NotSaved> {
        let generation = self.commit();
        let (m, cv) = &*self.reported;
        let mut w = m.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(outcome) = w.outcome(generation) {
                return outcome;
            }
            let gone = self
                .writer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .is_none_or(|h| h.is_finished());
            if gone {
                return Err(NotSaved("the journal's writer has stopped".into()));
            }
            w = cv
                .wait_timeout(w, RETRY_EVERY)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Commits what is staged, stops the writer after its last commit, and
    /// waits for it. Later changes are not written.
    pub fn close(&self) {
        self.commit();
        self.lock().to_writer = None;
        if let Some(h) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
    }
}

/// The writer thread: commits every waiting batch in one transaction,
/// reports, and retries a failed commit. Ends when every sender is gone
/// (after committing what it was given).
fn writer(
    path: &Path,
    mut conn: Connection,
    batches: mpsc::Receiver<Batch>,
    tell: impl Fn(Written),
) {
    let mut waiting: Vec<Batch> = vec![];
    let mut failing = false;
    let mut durable = 0;
    loop {
        let closed = if waiting.is_empty() {
            match batches.recv() {
                Ok(b) => {
                    waiting.push(b);
                    false
                }
                Err(_) => true,
            }
        } else if failing {
            match batches.recv_timeout(RETRY_EVERY) {
                Ok(b) => {
                    waiting.push(b);
                    false
                }
                Err(mpsc::RecvTimeoutError::Timeout) => false,
                Err(mpsc::RecvTimeoutError::Disconnected) => true,
            }
        } else {
            false
        };
        // Group commit: everything that arrived meanwhile goes in too.
        while let Ok(b) = batches.try_recv() {
            waiting.push(b);
        }
        if let Some(last) = waiting.last().map(|b| b.generation) {
            match apply(&mut conn, &waiting) {
                Ok(()) => {
                    waiting.clear();
                    if failing {
                        tracing::info!(
                            "the node's records are written to {} again",
                            path.display()
                        );
                    }
                    failing = false;
                    durable = last;
                    tell(Written {
                        generation: last,
                        durable,
                        error: None,
                    });
                }
                Err(e) => {
                    let error = format!(
                        "cannot write {}: {e} (the change holds in memory; retrying every {}s)",
                        path.display(),
                        RETRY_EVERY.as_secs()
                    );
                    if !failing {
                        tracing::error!("{error}");
                    }
                    failing = true;
                    tell(Written {
                        generation: last,
                        durable,
                        error: Some(error),
                    });
                    if closed {
                        return;
                    }
                    continue;
                }
            }
        }
        if closed {
            return;
        }
    }
}

fn apply(conn: &mut Connection, batches: &[Batch]) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut put = tx.prepare_cached(
            "INSERT INTO records (kind, key, value) VALUES (?1, ?2, ?3)
             ON CONFLICT (kind, key) DO UPDATE SET value = excluded.value",
        )?;
        let mut delete = tx.prepare_cached("DELETE FROM records WHERE kind = ?1 AND key = ?2")?;
        for change in batches.iter().flat_map(|b| &b.changes) {
            match change {
                Change::Put { kind, key, value } => {
                    put.execute(params![kind, key, value])?;
                }
                Change::Delete { kind, key } => {
                    delete.execute(params![kind, key])?;
                }
            }
        }
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_changes_are_durable_after_a_flush_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("node.db");
        let (j, records) = Journal::open(&p).unwrap();
        assert!(records.is_empty());
        j.put("process", "1", b"one".to_vec());
        j.put("process", "2", b"two".to_vec());
        j.put("process", "1", b"uno".to_vec());
        j.delete("process", "2");
        j.put("meta", "table", b"{}".to_vec());
        j.flush_blocking().unwrap();
        assert_eq!(j.lag(), Duration::ZERO);
        j.close();
        let (_j, records) = Journal::open(&p).unwrap();
        assert_eq!(records["process"], vec![("1".to_string(), b"uno".to_vec())]);
        assert_eq!(records["meta"].len(), 1);
    }

    #[test]
    fn a_failed_commit_is_not_durable_and_earlier_ones_stay_so() {
        let w = Written {
            generation: 5,
            durable: 3,
            error: Some("disk full".into()),
        };
        assert_eq!(w.outcome(2), Some(Ok(())));
        assert_eq!(w.outcome(3), Some(Ok(())));
        assert_eq!(w.outcome(4), Some(Err(NotSaved("disk full".into()))));
        assert_eq!(w.outcome(6), None, "not covered yet");
    }

    #[test]
    #[ignore = "needs root: mounts a 512 KiB tmpfs (.ci/run runs it with --ignored)"]
    fn a_full_disk_is_reported_never_durable_and_the_retry_lands_it_all() {
        let dir = tempfile::tempdir().unwrap();
        let disk = crate::testing::TinyDisk::mount(dir.path(), "size=512k")
            .expect("mount -t tmpfs (needs root)");
        let p = dir.path().join("node.db");
        let (j, _) = Journal::open(&p).unwrap();
        let mut written = 0;
        let failed = loop {
            assert!(
                written < 200,
                "a 512 KiB disk took {written} rows of 16 KiB"
            );
            j.put("blob", written.to_string(), vec![7; 16 << 10]);
            written += 1;
            if let Err(e) = j.flush_blocking() {
                break e;
            }
        };
        assert!(failed.0.contains("node.db"), "{failed}");
        assert!(j.failing(), "the failure is known");
        assert!(j.lag() > Duration::ZERO, "a failed batch is not durable");
        // Room again: the writer's retry lands every row, the failed ones too.
        disk.remount("size=16m");
        let end = Instant::now() + Duration::from_secs(10);
        while j.flush_blocking().is_err() {
            assert!(Instant::now() < end, "the retry never landed");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!j.failing());
        j.close();
        assert_eq!(read(&p).unwrap()["blob"].len(), written);
    }

    #[test]
    fn nothing_staged_commits_nothing_and_waits_for_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(&dir.path().join("node.db")).unwrap();
        assert_eq!(j.commit(), 0);
        j.flush_blocking().unwrap();
        j.put("k", "a", vec![]);
        assert_eq!(j.commit(), 1);
        assert_eq!(j.commit(), 1);
        j.flush_blocking().unwrap();
    }

    #[test]
    fn close_writes_what_was_staged() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("node.db");
        let (j, _) = Journal::open(&p).unwrap();
        for i in 0..1000 {
            j.put("process", i.to_string(), vec![1; 10]);
            if i % 10 == 0 {
                j.commit();
            }
        }
        j.close();
        assert_eq!(read(&p).unwrap()["process"].len(), 1000);
    }

    #[test]
    fn a_file_that_is_not_a_database_is_a_clear_error_or_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("node.db");
        std::fs::write(&p, vec![7u8; 4096]).unwrap();
        let e = Journal::open(&p).unwrap_err().to_string();
        assert!(e.contains("node.db") && e.contains("move it aside"), "{e}");
        let (j, records, aside) = Journal::open_or_set_aside(&p).unwrap();
        assert!(records.is_empty());
        let aside = aside.expect("moved aside");
        assert_eq!(
            std::fs::read(&aside).unwrap(),
            vec![7u8; 4096],
            "kept, not deleted"
        );
        j.put("k", "a", vec![1]);
        j.flush_blocking().unwrap();
    }
}
