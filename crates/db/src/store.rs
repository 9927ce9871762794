//! One database: a SQLite file in WAL mode with `synchronous = FULL` (a
//! commit is on disk before it returns), a write connection that commits
//! every write waiting for it in one transaction (group commit: one fsync
//! for many writers), a read connection for reads that miss the cache and
//! for scans and queries, and for kv a cache of values by key. No database
//! has threads of its own: all of them share one [`Pool`] of
//! [`POOL_THREADS`], taken in turn, at most [`THREADS_PER_GROUP`] per
//! package, so opening many databases costs file handles, not threads.

use crate::guard::{Guard, GuestError, MAX_STATEMENT_TIME};
use rusqlite::{Connection, OpenFlags, params};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

/// Writes one commit takes at most: a bound on how long one batch keeps
/// later writers waiting.
const MAX_BATCH: usize = 1024;
/// Cached kv values per database; past this the cache starts afresh.
const MAX_CACHE_BYTES: usize = 16 << 20;
/// Cached kv values of all databases together: open databases are many,
/// the node's memory is one.
pub const MAX_NODE_CACHE_BYTES: usize = 256 << 20;
/// Values larger than this are read from the file each time.
const MAX_CACHED_VALUE: usize = 256 << 10;
/// How long a connection waits for a lock held by another connection
/// (the CLI's read-only dump, say) before failing.
const BUSY_TIMEOUT_MS: u64 = 5_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Kv,
    Sql,
}

impl Kind {
    pub fn dir(self) -> &'static str {
        match self {
            Kind::Kv => "kv",
            Kind::Sql => "sqlite",
        }
    }
}

/// Why a database operation failed, as its caller hears it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DbError {
    #[error("no database {0}: open it first (only its own package can create it)")]
    NoSuchDb(String),
    #[error(
        "database file {0} is not a database (corrupt or overwritten): nothing was changed; restore it from a backup or move it aside to start afresh"
    )]
    Corrupt(PathBuf),
    #[error("the disk holding {0} is full: nothing was written; free space and retry")]
    DiskFull(PathBuf),
    #[error("{0} is read-only: nothing was written; make the node's data directory writable")]
    ReadOnly(PathBuf),
    #[error("{path}: {why}")]
    Storage { path: PathBuf, why: String },
    /// The caller's own statement failed (SQL error, constraint): nothing of it applied.
    #[error("{0}")]
    Statement(String),
    /// The guard refused the caller's statement ([`crate::guard`]): nothing of it ran.
    #[error("refused: {0}; nothing of the statement ran")]
    Refused(String),
    /// The database's queue is full: nothing was done; slow down and retry.
    #[error("{0}: nothing was done; wait for answers before sending more")]
    OverBudget(String),
}

impl DbError {
    /// The error's kind as the protocol names it.
    pub fn kind(&self) -> &'static str {
        match self {
            DbError::NoSuchDb(_) => "no-such-db",
            DbError::Corrupt(_) => "corrupt",
            DbError::DiskFull(_) => "disk-full",
            DbError::ReadOnly(_) => "read-only",
            DbError::Storage { .. } => "storage",
            DbError::Statement(_) => "statement",
            DbError::Refused(_) => "refused",
            DbError::OverBudget(_) => "over-budget",
        }
    }

    pub(crate) fn of(path: &Path, e: rusqlite::Error) -> DbError {
        use rusqlite::ErrorCode as C;
        match e.sqlite_error_code() {
            Some(C::NotADatabase | C::DatabaseCorrupt) => DbError::Corrupt(path.into()),
            Some(C::DiskFull) => DbError::DiskFull(path.into()),
            Some(C::ReadOnly | C::CannotOpen | C::PermissionDenied) if read_only(path) => {
                DbError::ReadOnly(path.into())
            }
            _ => DbError::Storage {
                path: path.into(),
                why: e.to_string(),
            },
        }
    }
}

/// Whether `path`'s directory cannot be written.
fn read_only(path: &Path) -> bool {
    let dir = path.parent().unwrap_or(Path::new("."));
    let probe = dir.join(".spindle-write-probe");
    match std::fs::write(&probe, b"") {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            false
        }
        Err(_) => true,
    }
}

/// A kv change.
#[derive(Debug, Clone)]
pub enum KvOp {
    Set(Vec<u8>, Arc<[u8]>),
    Delete(Vec<u8>),
}

/// What a SQL write changed.
#[derive(Debug, Clone, Copy)]
pub struct Changed {
    pub rows: u64,
    pub last_insert_rowid: i64,
}

pub type Done<T> = Box<dyn FnOnce(Result<T, DbError>) + Send>;

enum Write {
    /// Applied together or not at all (a transaction is one of these).
    Kv(Vec<KvOp>, Done<()>),
    Sql(String, Vec<rusqlite::types::Value>, Done<Changed>),
}

type ReadJob = Box<dyn FnOnce(Result<&Conn, &DbError>) + Send>;

/// A connection with its guard: a process's statements run through
/// [`Guard::guest`], the module's own directly.
pub struct Conn {
    conn: Connection,
    pub guard: Guard,
}

impl std::ops::Deref for Conn {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

impl Conn {
    fn guarded(mut conn: Connection, path: &Path) -> Result<Conn, DbError> {
        let guard = Guard::install(&mut conn).map_err(|e| DbError::of(path, e))?;
        Ok(Conn { conn, guard })
    }
}

#[derive(Default)]
struct Cache {
    values: HashMap<Vec<u8>, Option<Arc<[u8]>>>,
    bytes: usize,
    /// Bumped by every commit: a read that started before one may not
    /// put what it read into the cache.
    generation: u64,
}

fn entry_size(key: &[u8], value: &Option<Arc<[u8]>>) -> usize {
    key.len() + value.as_ref().map_or(0, |v| v.len())
}

impl Cache {
    /// Caches `value` for `key`, counting its bytes here and in the node's
    /// `total`; past either budget this cache starts afresh.
    fn put(&mut self, key: Vec<u8>, value: Option<Arc<[u8]>>, total: &AtomicUsize) {
        if let Some(old) = self.values.remove(&key) {
            let n = entry_size(&key, &old);
            self.bytes -= n;
            total.fetch_sub(n, Ordering::AcqRel);
        }
        if value.as_ref().is_some_and(|v| v.len() > MAX_CACHED_VALUE) {
            return;
        }
        let size = entry_size(&key, &value);
        if self.bytes + size > MAX_CACHE_BYTES
            || total.load(Ordering::Acquire) + size > MAX_NODE_CACHE_BYTES
        {
            self.clear(total);
            if total.load(Ordering::Acquire) + size > MAX_NODE_CACHE_BYTES {
                return;
            }
        }
        self.bytes += size;
        total.fetch_add(size, Ordering::AcqRel);
        self.values.insert(key, value);
    }

    fn clear(&mut self, total: &AtomicUsize) {
        total.fetch_sub(self.bytes, Ordering::AcqRel);
        self.bytes = 0;
        self.values.clear();
    }
}

/// An open database. Its work runs on the shared [`Pool`]: at most one
/// task writes it at a time (so writes stay in order and batch into one
/// commit) and at most one reads it.
pub struct Database {
    pub kind: Kind,
    pub path: PathBuf,
    /// Whose it is: the pool's fairness counts tasks per group (package).
    group: Arc<str>,
    pool: Arc<Pool>,
    queues: Mutex<Queues>,
    writer: Mutex<Conn>,
    /// Opened with the first read.
    reader: Mutex<Option<Result<Conn, DbError>>>,
    cache: RwLock<Cache>,
}

/// Work waiting for a database, and whether a pool task is on it.
#[derive(Default)]
struct Queues {
    writes: VecDeque<Write>,
    /// Bytes the queued writes hold ([`MAX_QUEUED_WRITE_BYTES`]).
    write_bytes: usize,
    reads: VecDeque<ReadJob>,
    writing: bool,
    reading: bool,
}

/// Writes one database may have waiting: senders that do not wait for
/// answers are told to, instead of the queue growing.
pub const MAX_QUEUED_WRITES: usize = 16_384;
/// Bytes the waiting writes of one database may hold.
pub const MAX_QUEUED_WRITE_BYTES: usize = 128 << 20;
/// Reads one database may have waiting.
pub const MAX_QUEUED_READS: usize = 4_096;

impl Write {
    fn bytes(&self) -> usize {
        match self {
            Write::Kv(ops, _) => ops
                .iter()
                .map(|o| match o {
                    KvOp::Set(k, v) => k.len() + v.len(),
                    KvOp::Delete(k) => k.len(),
                })
                .sum(),
            Write::Sql(sql, params, _) => {
                use rusqlite::types::Value as V;
                sql.len()
                    + params
                        .iter()
                        .map(|p| match p {
                            V::Text(t) => t.len(),
                            V::Blob(b) => b.len(),
                            _ => 8,
                        })
                        .sum::<usize>()
            }
        }
    }

    fn refuse(self, e: DbError) {
        match self {
            Write::Kv(_, done) => done(Err(e)),
            Write::Sql(_, _, done) => done(Err(e)),
        }
    }
}

impl Database {
    /// Opens (with `create`, creates) the database at `path`, its work to
    /// run on `pool` counted against `group`.
    pub fn open(
        kind: Kind,
        path: &Path,
        create: bool,
        group: &str,
        pool: &Arc<Pool>,
    ) -> Result<Arc<Database>, DbError> {
        if !create && !path.exists() {
            return Err(DbError::NoSuchDb(path.display().to_string()));
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| match e.kind() {
                std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied => {
                    DbError::ReadOnly(path.into())
                }
                std::io::ErrorKind::StorageFull => DbError::DiskFull(path.into()),
                _ => DbError::Storage {
                    path: path.into(),
                    why: e.to_string(),
                },
            })?;
        }
        let writer = open_writer(kind, path)?;
        Ok(Arc::new(Database {
            kind,
            path: path.into(),
            group: group.into(),
            pool: pool.clone(),
            queues: Mutex::default(),
            writer: Mutex::new(writer),
            reader: Mutex::new(None),
            cache: RwLock::default(),
        }))
    }

    /// Nothing waits for it and no task is on it.
    pub fn is_idle(&self) -> bool {
        let q = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        !q.writing && !q.reading && q.writes.is_empty() && q.reads.is_empty()
    }

    /// A cached kv value: `Some(None)` is a key known to be absent.
    pub fn cached(&self, key: &[u8]) -> Option<Option<Arc<[u8]>>> {
        let c = self.cache.read().unwrap_or_else(|p| p.into_inner());
        c.values.get(key).cloned()
    }

    /// Reads `key` from the file (off the caller's thread) and caches it.
    pub fn get(self: &Arc<Self>, key: Vec<u8>, done: Done<Option<Arc<[u8]>>>) {
        let db = self.clone();
        let generation = self.cache_generation();
        self.read(Box::new(move |conn| {
            let got = conn.map_err(Clone::clone).and_then(|c| {
                c.prepare_cached("SELECT v FROM kv WHERE k = ?1")
                    .and_then(|mut s| {
                        let mut rows = s.query(params![key])?;
                        match rows.next()? {
                            Some(r) => Ok(Some(Arc::<[u8]>::from(r.get::<_, Vec<u8>>(0)?))),
                            None => Ok(None),
                        }
                    })
                    .map_err(|e| DbError::of(&db.path, e))
            });
            if let Ok(v) = &got {
                let mut c = db.cache.write().unwrap_or_else(|p| p.into_inner());
                if c.generation == generation {
                    c.put(key, v.clone(), &db.pool.cached);
                }
            }
            done(got)
        }));
    }

    fn cache_generation(&self) -> u64 {
        self.cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .generation
    }

    /// Runs `job` on a pool thread with the database's read-only connection.
    pub fn read(self: &Arc<Self>, job: ReadJob) {
        let mut q = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if q.reads.len() >= MAX_QUEUED_READS {
            drop(q);
            return job(Err(&DbError::OverBudget(format!(
                "{} has {MAX_QUEUED_READS} reads waiting",
                self.path.display()
            ))));
        }
        q.reads.push_back(job);
        if !std::mem::replace(&mut q.reading, true) {
            drop(q);
            self.pool.submit(Task {
                db: self.clone(),
                lane: Lane::Read,
            });
        }
    }

    /// Applies `ops` atomically and durably; `done` hears when they are on disk.
    pub fn write_kv(self: &Arc<Self>, ops: Vec<KvOp>, done: Done<()>) {
        self.write(Write::Kv(ops, done));
    }

    pub fn write_sql(
        self: &Arc<Self>,
        sql: String,
        params: Vec<rusqlite::types::Value>,
        done: Done<Changed>,
    ) {
        self.write(Write::Sql(sql, params, done));
    }

    fn write(self: &Arc<Self>, w: Write) {
        let mut q = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let size = w.bytes();
        if q.writes.len() >= MAX_QUEUED_WRITES
            || q.write_bytes.saturating_add(size) > MAX_QUEUED_WRITE_BYTES
        {
            drop(q);
            return w.refuse(DbError::OverBudget(format!(
                "{} has {MAX_QUEUED_WRITES} writes or {} MiB waiting",
                self.path.display(),
                MAX_QUEUED_WRITE_BYTES >> 20
            )));
        }
        q.write_bytes += size;
        q.writes.push_back(w);
        if !std::mem::replace(&mut q.writing, true) {
            drop(q);
            self.pool.submit(Task {
                db: self.clone(),
                lane: Lane::Write,
            });
        }
    }

    /// One turn of a pool task on this database: a batch of writes (one
    /// commit), or of reads. More work left queues the task again, behind
    /// other databases' work.
    fn turn(self: &Arc<Self>, lane: Lane) {
        match lane {
            Lane::Write => {
                let conn = self.writer.lock().unwrap_or_else(|p| p.into_inner());
                // Batch after batch while writes keep coming and no other
                // database waits for a thread: the next commit starts
                // without a hop through the pool.
                loop {
                    let batch: Vec<Write> = {
                        let mut q = self.queues.lock().unwrap_or_else(|p| p.into_inner());
                        let n = q.writes.len().min(MAX_BATCH);
                        let batch: Vec<Write> = q.writes.drain(..n).collect();
                        let taken: usize = batch.iter().map(Write::bytes).sum();
                        q.write_bytes = q.write_bytes.saturating_sub(taken);
                        batch
                    };
                    if batch.is_empty() {
                        break;
                    }
                    commit(&conn, self, batch);
                    if self.pool.others_wait() {
                        break;
                    }
                }
            }
            Lane::Read => {
                let jobs: Vec<ReadJob> = {
                    let mut q = self.queues.lock().unwrap_or_else(|p| p.into_inner());
                    let n = q.reads.len().min(READS_PER_TURN);
                    q.reads.drain(..n).collect()
                };
                let mut reader = self.reader.lock().unwrap_or_else(|p| p.into_inner());
                let conn = reader.get_or_insert_with(|| open_reader(&self.path));
                for job in jobs {
                    match &*conn {
                        Ok(c) => job(Ok(c)),
                        Err(e) => job(Err(e)),
                    }
                }
            }
        }
    }

    /// After a turn: queue the task again if work is left, else stand down.
    fn after_turn(self: &Arc<Self>, lane: Lane) {
        let mut q = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let more = match lane {
            Lane::Write => !q.writes.is_empty(),
            Lane::Read => !q.reads.is_empty(),
        };
        if !more {
            match lane {
                Lane::Write => q.writing = false,
                Lane::Read => q.reading = false,
            }
            return;
        }
        drop(q);
        self.pool.submit(Task {
            db: self.clone(),
            lane,
        });
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let mut c = self.cache.write().unwrap_or_else(|p| p.into_inner());
        c.clear(&self.pool.cached);
    }
}

/// Reads one turn of a pool task takes before other databases get a go.
const READS_PER_TURN: usize = 64;
/// Threads of the pool all databases share: enough for several fsyncs
/// to overlap on different files, few enough to cost nothing per database.
pub const POOL_THREADS: usize = 8;
/// Pool threads one group (package) may hold at once: its slow statements
/// never take the whole pool from the others.
pub const THREADS_PER_GROUP: usize = 2;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Lane {
    Write,
    Read,
}

/// A database with work on one lane.
struct Task {
    db: Arc<Database>,
    lane: Lane,
}

#[derive(Default)]
struct Sched {
    queue: VecDeque<Task>,
    /// Tasks running now, per group.
    running: HashMap<Arc<str>, usize>,
}

/// The threads every database's work runs on ([`POOL_THREADS`]), taken in
/// turn with at most [`THREADS_PER_GROUP`] per package.
pub struct Pool {
    sched: Mutex<Sched>,
    ready: Condvar,
    /// Bytes cached by all databases ([`MAX_NODE_CACHE_BYTES`]).
    cached: AtomicUsize,
}

impl Pool {
    /// Starts the pool's threads; fails only if none could be started.
    pub fn start() -> Result<Arc<Pool>, std::io::Error> {
        let pool = Arc::new(Pool {
            sched: Mutex::default(),
            ready: Condvar::new(),
            cached: AtomicUsize::new(0),
        });
        let mut started = 0;
        let mut failed = None;
        for i in 0..POOL_THREADS {
            let me = pool.clone();
            match std::thread::Builder::new()
                .name(format!("spindle-db-{i}"))
                .spawn(move || me.work())
            {
                Ok(_) => started += 1,
                Err(e) => failed = Some(e),
            }
        }
        match (started, failed) {
            (0, Some(e)) => Err(e),
            (_, Some(e)) => {
                tracing::warn!("database pool: {started} of {POOL_THREADS} threads ({e})");
                Ok(pool)
            }
            _ => Ok(pool),
        }
    }

    /// Whether any task waits for a thread.
    fn others_wait(&self) -> bool {
        !self
            .sched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .queue
            .is_empty()
    }

    fn submit(&self, task: Task) {
        let mut s = self.sched.lock().unwrap_or_else(|p| p.into_inner());
        s.queue.push_back(task);
        drop(s);
        self.ready.notify_one();
    }

    fn work(&self) {
        let mut s = self.sched.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let next = s
                .queue
                .iter()
                .position(|t| s.running.get(&t.db.group).copied().unwrap_or(0) < THREADS_PER_GROUP);
            let Some(at) = next else {
                s = self.ready.wait(s).unwrap_or_else(|p| p.into_inner());
                continue;
            };
            let Some(task) = s.queue.remove(at) else {
                continue;
            };
            *s.running.entry(task.db.group.clone()).or_default() += 1;
            drop(s);
            // A panic in one job must cost neither the thread nor the
            // database: the job's caller hears nothing (and times out),
            // everything else goes on.
            let ran =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| task.db.turn(task.lane)));
            if ran.is_err() {
                tracing::error!(
                    "{}: a database job panicked; its caller gets no answer",
                    task.db.path.display()
                );
            }
            task.db.after_turn(task.lane);
            s = self.sched.lock().unwrap_or_else(|p| p.into_inner());
            let mut was_full = false;
            if let Some(n) = s.running.get_mut(&task.db.group) {
                was_full = *n >= THREADS_PER_GROUP;
                *n -= 1;
                if *n == 0 {
                    s.running.remove(&task.db.group);
                }
            }
            // A task of that group that waited for its share may run now
            // (this thread looks first; another is woken only if this one
            // alone cannot take them all). Every other task was announced
            // when it was submitted: waking every thread at each task's end
            // would cost each point query a herd of wake-ups.
            if was_full && s.queue.len() > 1 {
                self.ready.notify_one();
            }
        }
    }
}

fn open_writer(kind: Kind, path: &Path) -> Result<Conn, DbError> {
    let err = |e| DbError::of(path, e);
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(err)?;
    conn.busy_timeout(std::time::Duration::from_millis(BUSY_TIMEOUT_MS))
        .map_err(err)?;
    // WAL: readers never block the writer; FULL: the WAL is synced at every
    // commit, so an acknowledged write survives a crash of the daemon, of
    // the process, and of the machine.
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(err)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(err)?;
    if kind == Kind::Kv {
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID",
        )
        .map_err(err)?;
    }
    Conn::guarded(conn, path)
}

fn open_reader(path: &Path) -> Result<Conn, DbError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| DbError::of(path, e))?;
    conn.busy_timeout(std::time::Duration::from_millis(BUSY_TIMEOUT_MS))
        .map_err(|e| DbError::of(path, e))?;
    Conn::guarded(conn, path)
}

/// What a write that never ran changed (its outcome is replaced by the
/// batch's failure).
const NOTHING: Changed = Changed {
    rows: 0,
    last_insert_rowid: 0,
};

/// The outcome of one write in a batch, before the commit.
enum Outcome {
    Kv(Vec<KvOp>, Done<()>),
    /// With the statement, should the batch have to run again.
    Sql(
        Result<Changed, DbError>,
        Done<Changed>,
        String,
        Vec<rusqlite::types::Value>,
    ),
}

impl Outcome {
    /// The write again, to run in a fresh transaction.
    fn again(self) -> Write {
        match self {
            Outcome::Kv(ops, done) => Write::Kv(ops, done),
            Outcome::Sql(_, done, sql, params) => Write::Sql(sql, params, done),
        }
    }
}

/// Whether a statement's failure is the statement's doing (not the disk's,
/// nor the file's): when it ends the batch's transaction, the others of the
/// batch run again without it.
fn statement_fault(e: &GuestError) -> Option<DbError> {
    use rusqlite::ErrorCode as C;
    match e {
        GuestError::TooLong => Some(too_long()),
        GuestError::Refused(why) => Some(DbError::Refused(why.clone())),
        GuestError::Sql(e) => match e.sqlite_error_code() {
            Some(
                C::DiskFull
                | C::ReadOnly
                | C::DatabaseCorrupt
                | C::NotADatabase
                | C::CannotOpen
                | C::PermissionDenied
                | C::SystemIoFailure
                | C::OutOfMemory,
            ) => None,
            _ => Some(DbError::Statement(e.to_string())),
        },
    }
}

fn commit(conn: &Conn, db: &Database, batch: Vec<Write>) {
    let path = &db.path;
    let fail_all = |outcomes: Vec<Outcome>, e: DbError| {
        tracing::warn!("{}: a commit failed: {e}", path.display());
        for o in outcomes {
            match o {
                Outcome::Kv(_, done) => done(Err(e.clone())),
                Outcome::Sql(_, done, ..) => done(Err(e.clone())),
            }
        }
    };
    let mut outcomes = Vec::with_capacity(batch.len());
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        let e = DbError::of(path, e);
        let all = batch
            .into_iter()
            .map(|w| match w {
                Write::Kv(ops, done) => Outcome::Kv(ops, done),
                Write::Sql(sql, params, done) => Outcome::Sql(Ok(NOTHING), done, sql, params),
            })
            .collect();
        return fail_all(all, e);
    }
    let mut broken: Option<DbError> = None;
    let mut batch = batch.into_iter();
    while let Some(w) = batch.next() {
        if broken.is_some() {
            outcomes.push(match w {
                Write::Kv(ops, done) => Outcome::Kv(ops, done),
                Write::Sql(sql, params, done) => Outcome::Sql(Ok(NOTHING), done, sql, params),
            });
            continue;
        }
        match w {
            Write::Kv(ops, done) => {
                if let Err(e) = apply_kv(conn, &ops) {
                    broken = Some(DbError::of(path, e));
                }
                outcomes.push(Outcome::Kv(ops, done));
            }
            Write::Sql(sql, params, done) => match apply_sql(conn, &sql, &params) {
                // A failure that ended the whole transaction (a full disk,
                // a statement stopped for its time) fails the batch; a
                // statement's own failure only it.
                Err(e) if conn.is_autocommit() => {
                    if let Some(own) = statement_fault(&e) {
                        // The statement ended the transaction itself (`OR
                        // ROLLBACK`, `RAISE(ROLLBACK)`, its time): it fails
                        // alone, and the rest of the batch runs again.
                        tracing::warn!("{}: a statement ended its batch: {own}", path.display());
                        done(Err(own));
                        let rest: Vec<Write> = outcomes
                            .into_iter()
                            .map(Outcome::again)
                            .chain(batch)
                            .collect();
                        if !rest.is_empty() {
                            commit(conn, db, rest);
                        }
                        return;
                    }
                    broken = Some(match e {
                        GuestError::Sql(e) => DbError::of(path, e),
                        GuestError::TooLong => too_long(),
                        GuestError::Refused(why) => DbError::Refused(why),
                    });
                    outcomes.push(Outcome::Sql(Ok(NOTHING), done, sql, params));
                }
                result => {
                    let result = result.map_err(|e| match e {
                        GuestError::Sql(e) => match DbError::of(path, e) {
                            DbError::Storage { why, .. } => DbError::Statement(why),
                            other => other,
                        },
                        GuestError::TooLong => too_long(),
                        GuestError::Refused(why) => DbError::Refused(why),
                    });
                    outcomes.push(Outcome::Sql(result, done, sql, params));
                }
            },
        }
    }
    if let Some(e) = broken {
        let _ = conn.execute_batch("ROLLBACK");
        return fail_all(outcomes, e);
    }
    if let Err(e) = conn.execute_batch("COMMIT") {
        let _ = conn.execute_batch("ROLLBACK");
        return fail_all(outcomes, DbError::of(path, e));
    }
    // On disk: now visible in the cache, then acknowledged.
    {
        let mut c = db.cache.write().unwrap_or_else(|p| p.into_inner());
        c.generation += 1;
        for o in &outcomes {
            if let Outcome::Kv(ops, _) = o {
                for op in ops {
                    match op {
                        KvOp::Set(k, v) => c.put(k.clone(), Some(v.clone()), &db.pool.cached),
                        KvOp::Delete(k) => c.put(k.clone(), None, &db.pool.cached),
                    }
                }
            }
        }
    }
    for o in outcomes {
        match o {
            Outcome::Kv(_, done) => done(Ok(())),
            Outcome::Sql(r, done, ..) => done(r),
        }
    }
}

fn apply_kv(conn: &Connection, ops: &[KvOp]) -> rusqlite::Result<()> {
    for op in ops {
        match op {
            KvOp::Set(k, v) => {
                conn.prepare_cached("INSERT OR REPLACE INTO kv (k, v) VALUES (?1, ?2)")?
                    .execute(params![k, &v[..]])?;
            }
            KvOp::Delete(k) => {
                conn.prepare_cached("DELETE FROM kv WHERE k = ?1")?
                    .execute(params![k])?;
            }
        }
    }
    Ok(())
}

/// A statement stopped at [`MAX_STATEMENT_TIME`].
pub(crate) fn too_long() -> DbError {
    DbError::Statement(format!(
        "the statement ran longer than {} s and was stopped (nothing of it applied): add an index, a LIMIT, or split the work",
        MAX_STATEMENT_TIME.as_secs()
    ))
}

/// One statement inside the batch's transaction, in a savepoint of its own.
fn apply_sql(
    conn: &Conn,
    sql: &str,
    params: &[rusqlite::types::Value],
) -> Result<Changed, GuestError> {
    conn.execute_batch("SAVEPOINT one")
        .map_err(GuestError::Sql)?;
    let run = || {
        conn.guard.guest(sql, || {
            let mut stmt = conn.prepare_cached(sql)?;
            let rows = stmt.execute(rusqlite::params_from_iter(params.iter()))? as u64;
            Ok(Changed {
                rows,
                last_insert_rowid: conn.last_insert_rowid(),
            })
        })
    };
    match run() {
        Ok(c) => {
            conn.execute_batch("RELEASE one").map_err(GuestError::Sql)?;
            Ok(c)
        }
        Err(e) => {
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK TO one; RELEASE one");
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A statement that ends the batch's transaction itself fails alone:
    /// the writes around it still commit.
    #[test]
    fn a_statement_that_rolls_the_batch_back_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::start().unwrap();
        let db =
            Database::open(Kind::Sql, &dir.path().join("a.sqlite"), true, "p:q", &pool).unwrap();
        {
            let conn = db.writer.lock().unwrap();
            conn.execute_batch(
                "CREATE TABLE t (x); CREATE TABLE u (x UNIQUE); INSERT INTO u VALUES (1)",
            )
            .unwrap();
        }
        let heard = Arc::new(Mutex::new(Vec::new()));
        let write = |sql: &str| {
            let heard = heard.clone();
            let sql = sql.to_string();
            let tag = sql.clone();
            Write::Sql(
                sql,
                vec![],
                Box::new(move |r| heard.lock().unwrap().push((tag, r.is_ok()))),
            )
        };
        let batch = vec![
            write("INSERT INTO t VALUES (1)"),
            write("INSERT OR ROLLBACK INTO u VALUES (1)"),
            write("INSERT INTO t VALUES (2)"),
        ];
        {
            let conn = db.writer.lock().unwrap();
            commit(&conn, &db, batch);
        }
        let mut got = heard.lock().unwrap().clone();
        got.sort();
        assert_eq!(
            got,
            vec![
                ("INSERT INTO t VALUES (1)".to_string(), true),
                ("INSERT INTO t VALUES (2)".to_string(), true),
                ("INSERT OR ROLLBACK INTO u VALUES (1)".to_string(), false),
            ]
        );
        let conn = db.writer.lock().unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2, "both innocent writes are on disk");
    }
}
