//! # spindle-db: the runtime modules `kv` and `sqlite`
//!
//! Named databases for processes, reached by messages (as Kinode's runtime
//! modules are): requests to `local@kv:sys:spindle` and
//! `local@sqlite:sys:spindle`, each a [`Service`] on the bus, so a request
//! is handled on the sender's own task with no hop through a central loop.
//! A read the cache can answer is answered there and then; everything else
//! goes to the database's own threads ([`store`]): one writer that commits
//! every waiting write in one SQLite transaction (group commit), one reader.
//!
//! A database belongs to a package (`<home>/db/<kind>/<package>/<name>.sqlite`).
//! Its package's processes and the node may do anything with it; any other
//! process needs a capability the module issued on the owner's behalf
//! (`grant`, [`access`]), checked here on every request.
//!
//! Durability: a write is acknowledged only after its transaction is
//! committed with the WAL synced (`synchronous = FULL`), so it survives a
//! kill -9 of the daemon or the process, and a power loss; a kv transaction
//! is one SQLite transaction, all or nothing. A full disk, a read-only data
//! directory or a corrupt file fails the request with its kind and a fix,
//! and touches no other database.
//!
//! Requests are JSON bodies (`op`, `db`, …; see the README); values and
//! binary results travel in the message's blob, never inside the JSON.

pub mod access;
pub mod guard;
pub mod kv;
mod sql;
pub mod store;

use access::Access;
use serde::Deserialize;
use serde_json::{Value, json};
use spindle_bus::{Bus, Envelope, Message, Reply, Service};
use spindle_types::{Address, PackageId, ProcessId};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use store::{Database, DbError, Kind};

/// The process names of the modules (package `sys:spindle`).
pub const KV: &str = "kv";
pub const SQLITE: &str = "sqlite";
/// Longest database name: it is a file name.
pub const MAX_NAME: usize = 64;

/// Databases one package may have open in one module; past it the
/// package's least recently used idle one is closed (it reopens on use).
pub const MAX_OPEN_PER_PACKAGE: usize = 32;
/// Databases open in one module on the whole node, likewise.
pub const MAX_OPEN: usize = 512;

/// Why the modules could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bus(#[from] spindle_bus::BusError),
    #[error("no threads for the databases: {0}")]
    Threads(#[from] std::io::Error),
}

/// Puts both modules on `bus`, their databases under `dir`.
pub fn start(dir: &Path, bus: &Arc<Bus>) -> Result<(), StartError> {
    let pool = store::Pool::start()?;
    for (name, kind) in [(KV, Kind::Kv), (SQLITE, Kind::Sql)] {
        let me = bus.address(ProcessId {
            process: name.into(),
            package: PackageId::system(),
        });
        let module = Arc::new(Module {
            kind,
            me: Arc::new(me.clone()),
            dir: dir.join(kind.dir()),
            bus: Arc::downgrade(bus),
            pool: pool.clone(),
            dbs: Mutex::default(),
            txs: Mutex::default(),
        });
        bus.register_service(me, true, module)?;
    }
    Ok(())
}

/// One module: `kv` or `sqlite`.
pub(crate) struct Module {
    kind: Kind,
    me: Arc<Address>,
    dir: PathBuf,
    bus: Weak<Bus>,
    pool: Arc<store::Pool>,
    dbs: Mutex<OpenDbs>,
    txs: Mutex<kv::Transactions>,
}

/// Open databases by package, then name (looked up without copying
/// either), with when each was last used.
#[derive(Default)]
struct OpenDbs {
    by_package: HashMap<PackageId, HashMap<String, (Arc<Database>, u64)>>,
    count: usize,
    clock: u64,
}

impl OpenDbs {
    /// Closes the least recently used idle database (of `package`, or of
    /// any): one nobody else holds (no transaction, no queued work).
    fn close_one(&mut self, package: Option<&PackageId>) -> Option<Arc<Database>> {
        let mut oldest: Option<(PackageId, String, u64)> = None;
        for (p, m) in &self.by_package {
            if package.is_some_and(|want| want != p) {
                continue;
            }
            for (name, (db, used)) in m {
                let idle = Arc::strong_count(db) == 1 && db.is_idle();
                if idle && oldest.as_ref().is_none_or(|o| *used < o.2) {
                    oldest = Some((p.clone(), name.clone(), *used));
                }
            }
        }
        let (p, name, _) = oldest?;
        let m = self.by_package.get_mut(&p)?;
        let (db, _) = m.remove(&name)?;
        if m.is_empty() {
            self.by_package.remove(&p);
        }
        self.count -= 1;
        Some(db)
    }
}

/// A request's fields (each op reads the ones it needs), borrowed from the
/// body where they can be: a cached get is on this path.
#[derive(Deserialize, Default)]
#[serde(default)]
pub(crate) struct Req<'a> {
    #[serde(borrow)]
    pub op: Cow<'a, str>,
    #[serde(borrow)]
    pub db: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub package: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub key: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub key_base64: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub value: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub prefix: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub prefix_base64: Option<Cow<'a, str>>,
    pub limit: Option<usize>,
    pub tx: Option<u64>,
    pub to: Option<String>,
    pub access: Option<String>,
    /// Return a kv value in the body (`value`) rather than the blob.
    pub text: bool,
    pub sql: Option<String>,
    pub params: Vec<Value>,
}

/// A failed request, as its caller hears it: `{"error": kind, "message": …}`.
#[derive(Debug)]
pub(crate) struct Refusal {
    kind: &'static str,
    message: String,
}

impl Refusal {
    pub fn bad(message: impl Into<String>) -> Refusal {
        Refusal {
            kind: "bad-request",
            message: message.into(),
        }
    }
}

impl From<DbError> for Refusal {
    fn from(e: DbError) -> Refusal {
        Refusal {
            kind: e.kind(),
            message: e.to_string(),
        }
    }
}

/// How the modules answer: a result, or a refusal with its kind.
pub(crate) trait Answer {
    fn deny(self, r: Refusal);
    fn answer(self, r: Result<(Value, Option<Vec<u8>>), Refusal>);
}

impl Answer for Reply {
    fn deny(self, r: Refusal) {
        self.refuse(r.kind, &r.message);
    }

    fn answer(self, r: Result<(Value, Option<Vec<u8>>), Refusal>) {
        match r {
            Ok((body, blob)) => self.ok(body, blob),
            Err(e) => self.deny(e),
        }
    }
}

/// The database a request names, and whose it is.
pub(crate) struct Target<'a> {
    pub package: Cow<'a, PackageId>,
    pub name: &'a str,
}

impl Module {
    fn reply_to(&self, env: &Envelope) -> Reply {
        Reply::to(self.bus.clone(), self.me.clone(), env)
    }

    /// The database `req` names: its own package's unless `package` says.
    pub fn target<'a>(&self, source: &'a Address, req: &'a Req) -> Result<Target<'a>, Refusal> {
        let name = req
            .db
            .as_deref()
            .ok_or_else(|| Refusal::bad("name the database: `db`"))?;
        check_name(name)?;
        let package = match &req.package {
            None => Cow::Borrowed(&source.process.package),
            Some(p) => Cow::Owned(
                p.parse()
                    .map_err(|e| Refusal::bad(format!("`package` {p:?}: {e}")))?,
            ),
        };
        Ok(Target { package, name })
    }

    /// Checks `source` may `need` the target, refusing with `no-access`.
    pub fn check(
        &self,
        bus: &Bus,
        source: &Address,
        t: &Target,
        need: Access,
    ) -> Result<(), Refusal> {
        if access::allowed(bus, &self.me, source, &t.package, t.name, need) {
            return Ok(());
        }
        Err(Refusal {
            kind: "no-access",
            message: format!(
                "{source} may not {} {} database {} of {}: its package can grant it (`grant`)",
                need.name(),
                self.kind.dir(),
                t.name,
                t.package
            ),
        })
    }

    pub fn path(&self, t: &Target) -> PathBuf {
        self.dir
            .join(t.package.to_string())
            .join(format!("{}.sqlite", t.name))
    }

    /// The open database (opened now if need be; created only if `create`).
    pub fn database(&self, t: &Target, create: bool) -> Result<Arc<Database>, Refusal> {
        // Closed databases are dropped after the lock is released (closing
        // checkpoints the file).
        let mut closed = Vec::new();
        let mut dbs = self.dbs.lock().unwrap_or_else(|p| p.into_inner());
        dbs.clock += 1;
        let now = dbs.clock;
        if let Some((db, used)) = dbs
            .by_package
            .get_mut(&*t.package)
            .and_then(|m| m.get_mut(t.name))
        {
            *used = now;
            return Ok(db.clone());
        }
        let mine = dbs.by_package.get(&*t.package).map_or(0, HashMap::len);
        let mut make_room =
            |dbs: &mut OpenDbs, package: Option<&PackageId>| match dbs.close_one(package) {
                Some(db) => {
                    closed.push(db);
                    true
                }
                None => false,
            };
        let room = (mine < MAX_OPEN_PER_PACKAGE || make_room(&mut dbs, Some(&t.package)))
            && (dbs.count < MAX_OPEN || make_room(&mut dbs, None));
        if !room {
            return Err(Refusal {
                kind: "over-budget",
                message: format!(
                    "package {} has {MAX_OPEN_PER_PACKAGE} {} databases busy (or the node {MAX_OPEN}): finish transactions and work on some first",
                    t.package,
                    self.kind.dir()
                ),
            });
        }
        let group = t.package.to_string();
        let db =
            Database::open(self.kind, &self.path(t), create, &group, &self.pool).map_err(|e| {
                match e {
                    DbError::NoSuchDb(_) => {
                        Refusal::from(DbError::NoSuchDb(format!("{} of {}", t.name, t.package)))
                    }
                    e => {
                        tracing::warn!(
                            "{} database {} of {}: {e}",
                            self.kind.dir(),
                            t.name,
                            t.package
                        );
                        Refusal::from(e)
                    }
                }
            })?;
        dbs.by_package
            .entry(t.package.clone().into_owned())
            .or_default()
            .insert(t.name.to_string(), (db.clone(), now));
        dbs.count += 1;
        Ok(db)
    }

    /// `grant` / `revoke`: the owner hands out (or takes back) a right to
    /// its database; answered once the change is on disk.
    fn grant(&self, bus: &Arc<Bus>, source: &Address, req: &Req, reply: Reply) {
        let run = || -> Result<(ProcessId, spindle_bus::Capability), Refusal> {
            let t = self.target(source, req)?;
            let own = &source.process.package;
            if *own != *t.package && !own.is_system() {
                return Err(Refusal {
                    kind: "no-access",
                    message: format!(
                        "only package {} (or the node) may grant access to its database {}",
                        t.package, t.name
                    ),
                });
            }
            let to: Address = req
                .to
                .as_deref()
                .ok_or_else(|| Refusal::bad("name the grantee: `to`"))?
                .parse()
                .map_err(|e| Refusal::bad(format!("`to`: {e}")))?;
            let a = req.access.as_deref().unwrap_or("read");
            let need = Access::parse(a).ok_or_else(|| {
                Refusal::bad(format!("`access` {a:?}: give \"read\" or \"write\""))
            })?;
            Ok((
                to.process,
                access::capability(&self.me, &t.package, t.name, need),
            ))
        };
        match run() {
            Err(e) => reply.deny(e),
            Ok((to, cap)) => {
                if req.op == "grant" {
                    bus.grant(&to, [cap]);
                } else {
                    bus.revoke(&to, &[cap]);
                }
                let bus = bus.clone();
                let finish = async move {
                    match bus.persisted().await {
                        Ok(()) => reply.ok(json!({"ok": true}), None),
                        Err(why) => reply.deny(Refusal {
                            kind: "storage",
                            message: format!("in effect, but not saved to disk: {why}"),
                        }),
                    }
                };
                match tokio::runtime::Handle::try_current() {
                    Ok(h) => {
                        h.spawn(finish);
                    }
                    Err(_) => reply_now(finish),
                }
            }
        }
    }
}

/// Runs a short future to completion off any runtime (tests without one).
fn reply_now(f: impl std::future::Future<Output = ()>) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(f);
}

impl Service for Module {
    fn handle(&self, env: Envelope) {
        let reply = self.reply_to(&env);
        let Message::Request(r) = &env.message else {
            return;
        };
        let Some(bus) = self.bus.upgrade() else {
            return;
        };
        let req: Req = match serde_json::from_slice(&r.body) {
            Ok(q) => q,
            Err(e) => {
                return reply.deny(Refusal::bad(format!(
                    "the body is not a request ({e}): send JSON like {{\"op\":\"get\",\"db\":\"…\",\"key\":\"…\"}}"
                )));
            }
        };
        if req.op == "grant" || req.op == "revoke" {
            return self.grant(&bus, &env.source, &req, reply);
        }
        let blob = env.blob.clone();
        match self.kind {
            Kind::Kv => {
                if let Err((reply, e)) = self.kv(&bus, &env.source, req, blob, reply) {
                    reply.deny(e);
                }
            }
            Kind::Sql => self.sql(&bus, &env.source, req, blob, reply),
        }
    }
}

/// Database names are file names: lower-case letters, digits, `-`, `_`.
pub(crate) fn check_name(name: &str) -> Result<(), Refusal> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(Refusal::bad(format!(
            "database name {name:?}: use 1–{MAX_NAME} of a-z, 0-9, '-', '_'"
        )))
    }
}

/// The databases under `dir` (`<home>/db`): kind, package, name, bytes.
pub fn list(dir: &Path) -> Vec<(Kind, String, String, u64)> {
    let mut out = Vec::new();
    for kind in [Kind::Kv, Kind::Sql] {
        let Ok(packages) = std::fs::read_dir(dir.join(kind.dir())) else {
            continue;
        };
        for p in packages.flatten() {
            let Ok(files) = std::fs::read_dir(p.path()) else {
                continue;
            };
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                let Some(db) = name.strip_suffix(".sqlite") else {
                    continue;
                };
                let size = ["", "-wal"]
                    .iter()
                    .filter_map(|s| std::fs::metadata(format!("{}{s}", f.path().display())).ok())
                    .map(|m| m.len())
                    .sum();
                out.push((
                    kind,
                    p.file_name().to_string_lossy().into_owned(),
                    db.to_string(),
                    size,
                ));
            }
        }
    }
    out.sort_by(|a, b| (a.0.dir(), &a.1, &a.2).cmp(&(b.0.dir(), &b.1, &b.2)));
    out
}

/// Why a dump could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("no {kind} database {name} of {package} (see `spindle db ls`)")]
    NoSuchDb {
        kind: &'static str,
        package: String,
        name: String,
    },
    #[error("{path}: {why}")]
    Read { path: PathBuf, why: String },
    #[error("writing the dump: {0}")]
    Write(#[from] std::io::Error),
}

/// Writes a readable copy of a database to `out`: kv pairs one per line
/// (text as JSON strings, other bytes as `base64:`), or SQL (schema and
/// rows as INSERTs). Reads a consistent snapshot; the daemon may run.
pub fn dump(
    dir: &Path,
    kind: Kind,
    package: &str,
    name: &str,
    out: &mut dyn std::io::Write,
) -> Result<(), DumpError> {
    let path = dir
        .join(kind.dir())
        .join(package)
        .join(format!("{name}.sqlite"));
    if !path.exists() {
        return Err(DumpError::NoSuchDb {
            kind: kind.dir(),
            package: package.into(),
            name: name.into(),
        });
    }
    let read = |why: String| DumpError::Read {
        path: path.clone(),
        why,
    };
    let conn =
        rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| read(e.to_string()))?;
    conn.execute_batch("BEGIN")
        .map_err(|e| read(e.to_string()))?;
    match kind {
        Kind::Kv => kv::dump(&conn, out),
        Kind::Sql => sql::dump(&conn, out),
    }
    .map_err(|e| read(e.to_string()))?;
    out.flush()?;
    Ok(())
}
