//! # spindle-vfs: the file module `local@vfs:sys:spindle`
//!
//! Files for processes, reached by messages: drives per package at
//! `<home>/vfs/<package>/<drive>/…`, named in requests as
//! `/<package>/<drive>/a/b` ([`path`]). Contents travel as blobs; there is
//! no cursor: every read names its range, so no two readers share state.
//!
//! The module is a [`Service`] on the bus. A request is parsed, its paths
//! checked and its rights decided on the sender's task; the file work runs
//! on the module's own threads ([`WORKERS`], a bounded queue), so a slow
//! disk never holds a sender's task and the files open at once are bounded
//! (two per worker at most). Each package may have [`MAX_QUEUED_PER_PACKAGE`]
//! requests waiting; past that it hears `over-budget` and nobody else waits.
//!
//! Access as for the databases: a drive's own package (and the node) may
//! do anything; another package needs a `read` or `write` capability the
//! module issued on the owner's `grant`. Confinement: paths are checked
//! ([`path`]) and opened beneath the drive with symlinks and mount points
//! refused by the kernel ([`fs`]). A size budget per package
//! ([`MAX_PACKAGE_BYTES`]) is reserved before anything is written, so going
//! over it is a `quota` error with nothing half-written.
//!
//! Durability: a write replaces its file atomically (old or new after any
//! crash) and is acknowledged once synced; an append is acknowledged once
//! synced; directory changes are synced too.

pub mod fs;
pub mod path;
#[cfg(test)]
mod tests;

use fs::{FsError, Root};
use path::VfsPath;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use spindle_bus::{Bus, Capability, Envelope, Message, Reply, Service};
use spindle_types::{Address, PackageId, ProcessId};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// The module's process name (package `sys:spindle`).
pub const VFS: &str = spindle_abi::module::VFS;
/// Threads doing the file work: each holds at most two files open.
pub const WORKERS: usize = 4;
/// Requests waiting for a worker, on the whole node.
pub const QUEUE: usize = 1024;
/// Requests of one package waiting or in work at once: a package that
/// floods the module waits for itself.
pub const MAX_QUEUED_PER_PACKAGE: usize = 64;
/// Bytes of files one package may keep in its drives together.
pub const MAX_PACKAGE_BYTES: u64 = 1 << 30;

/// Why the module could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bus(#[from] spindle_bus::BusError),
    #[error("the vfs directory {0}: {1}")]
    Dir(std::path::PathBuf, std::io::Error),
    #[error("no threads for the vfs: {0}")]
    Threads(std::io::Error),
}

/// Budgets of the module (lowered in tests).
#[derive(Debug, Clone, Copy)]
pub struct Budgets {
    pub package_bytes: u64,
    pub queued_per_package: usize,
}

const BUDGETS: Budgets = Budgets {
    package_bytes: MAX_PACKAGE_BYTES,
    queued_per_package: MAX_QUEUED_PER_PACKAGE,
};

/// Puts the module on `bus`, its drives under `dir` (`<home>/vfs`).
pub fn start(dir: &Path, bus: &Arc<Bus>) -> Result<(), StartError> {
    start_with(dir, bus, BUDGETS)
}

pub fn start_with(dir: &Path, bus: &Arc<Bus>, budgets: Budgets) -> Result<(), StartError> {
    let root = Root::open(dir).map_err(|e| StartError::Dir(dir.to_path_buf(), e))?;
    // What each package keeps, once at boot; from then on every change is counted.
    let mut used = HashMap::new();
    for (package, _) in root.drives() {
        if let Ok(p) = package.parse::<PackageId>() {
            used.entry(p).or_insert_with(|| root.usage(&package));
        }
    }
    let me = bus.address(ProcessId {
        process: VFS.into(),
        package: PackageId::system(),
    });
    let (jobs, rx) = sync_channel::<Job>(QUEUE);
    let shared = Arc::new(Shared {
        root,
        me: Arc::new(me.clone()),
        bus: Arc::downgrade(bus),
        budgets,
        packages: Mutex::new(Packages {
            used,
            queued: HashMap::new(),
        }),
    });
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..WORKERS {
        let rx = rx.clone();
        std::thread::Builder::new()
            .name(format!("spindle-vfs-{i}"))
            .spawn(move || work(&rx))
            .map_err(StartError::Threads)?;
    }
    bus.register_service(me, true, Arc::new(Module { shared, jobs }))?;
    Ok(())
}

/// One request's file work, run on a worker.
type Job = Box<dyn FnOnce() + Send>;

fn work(rx: &Mutex<Receiver<Job>>) {
    loop {
        let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        match job {
            // A job answers its request even if it panics (see `Module::handle`).
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}

struct Module {
    shared: Arc<Shared>,
    jobs: SyncSender<Job>,
}

struct Shared {
    root: Root,
    me: Arc<Address>,
    bus: Weak<Bus>,
    budgets: Budgets,
    packages: Mutex<Packages>,
}

/// What each package uses: bytes kept, requests queued.
struct Packages {
    used: HashMap<PackageId, u64>,
    queued: HashMap<PackageId, usize>,
}

/// A request's fields (each op reads the ones it needs).
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Req {
    op: String,
    path: Option<String>,
    to: Option<String>,
    drive: Option<String>,
    offset: Option<u64>,
    length: Option<u64>,
    access: Option<String>,
}

/// A refused request: its kind (`bad-request`, `no-access`, `not-found`,
/// `quota`, `disk-full`, `read-only`, `storage`, `over-budget`) and what
/// to do.
#[derive(Debug)]
pub struct Refusal(pub &'static str, pub String);

fn bad(message: impl Into<String>) -> Refusal {
    Refusal("bad-request", message.into())
}

impl From<FsError> for Refusal {
    fn from(e: FsError) -> Refusal {
        Refusal(e.kind(), e.to_string())
    }
}

impl From<path::PathError> for Refusal {
    fn from(e: path::PathError) -> Refusal {
        bad(e.to_string())
    }
}

/// What an operation needs of a drive.
pub use spindle_abi::Access;

#[derive(Serialize)]
struct Params<'a> {
    drive: &'a str,
    package: String,
    access: &'static str,
}

/// The right to `access` drive `drive` of `package`, issued by the module at `module`.
pub fn capability(
    module: &Address,
    package: &PackageId,
    drive: &str,
    access: Access,
) -> Capability {
    let params = Params {
        drive,
        package: package.to_string(),
        access: access.name(),
    };
    Capability {
        issuer: module.clone(),
        params: serde_json::to_string(&params).expect("params serialise"),
    }
}

/// The operations, what each needs, and on which paths.
enum Op {
    CreateDrive(VfsPath),
    Read {
        path: VfsPath,
        offset: u64,
        length: Option<u64>,
    },
    Write(VfsPath, Vec<u8>),
    Append(VfsPath, Vec<u8>),
    Metadata(VfsPath),
    List(VfsPath),
    Mkdir(VfsPath),
    Remove(VfsPath),
    RemoveDir(VfsPath),
    RemoveTree(VfsPath),
    Rename(VfsPath, VfsPath),
    Copy(VfsPath, VfsPath),
    Grant {
        drive: VfsPath,
        to: ProcessId,
        access: Access,
        revoke: bool,
    },
}

impl Module {
    /// Reads a request into an operation, its paths checked.
    fn parse(&self, env: &Envelope, body: &[u8]) -> Result<Op, Refusal> {
        let req: Req = serde_json::from_slice(body).map_err(|e| {
            bad(format!(
                "not a vfs request ({e}): send JSON like {{\"op\":\"read\",\"path\":\"/<package>/<drive>/a.txt\"}}"
            ))
        })?;
        let own = &env.source.process.package;
        let path = || -> Result<VfsPath, Refusal> {
            let p = req
                .path
                .as_deref()
                .ok_or_else(|| bad("name the file: `path` (/<package>/<drive>/…)"))?;
            Ok(VfsPath::parse(p)?)
        };
        let to = || -> Result<VfsPath, Refusal> {
            let p = req
                .to
                .as_deref()
                .ok_or_else(|| bad("name where it goes: `to` (/<package>/<drive>/…)"))?;
            Ok(VfsPath::parse(p)?)
        };
        let not_root = |p: VfsPath| -> Result<VfsPath, Refusal> {
            if p.is_root() {
                Err(bad(format!(
                    "{p} is a drive's root: name a file or directory in it"
                )))
            } else {
                Ok(p)
            }
        };
        let blob = || -> Result<Vec<u8>, Refusal> {
            env.blob
                .as_ref()
                .map(|b| b.bytes.clone())
                .ok_or_else(|| bad("the contents go in the request's blob"))
        };
        Ok(match req.op.as_str() {
            "create_drive" => {
                let drive = req
                    .drive
                    .as_deref()
                    .ok_or_else(|| bad("name the drive: `drive`"))?;
                path::check_drive(drive)?;
                Op::CreateDrive(VfsPath {
                    package: own.clone(),
                    drive: drive.into(),
                    parts: vec![],
                })
            }
            "read" => Op::Read {
                path: not_root(path()?)?,
                offset: req.offset.unwrap_or(0),
                length: req.length,
            },
            "write" => Op::Write(not_root(path()?)?, blob()?),
            "append" => Op::Append(not_root(path()?)?, blob()?),
            "metadata" => Op::Metadata(path()?),
            "list" => Op::List(path()?),
            "mkdir" => Op::Mkdir(not_root(path()?)?),
            "remove" => Op::Remove(not_root(path()?)?),
            "remove_dir" => Op::RemoveDir(not_root(path()?)?),
            "remove_tree" => Op::RemoveTree(not_root(path()?)?),
            "rename" => {
                let (from, to) = (not_root(path()?)?, not_root(to()?)?);
                if from.package != to.package {
                    return Err(bad(
                        "rename within one package's drives; copy across packages, then remove",
                    ));
                }
                Op::Rename(from, to)
            }
            "copy" => Op::Copy(not_root(path()?)?, not_root(to()?)?),
            op @ ("grant" | "revoke") => {
                let drive = req
                    .drive
                    .as_deref()
                    .ok_or_else(|| bad("name the drive: `drive`"))?;
                path::check_drive(drive)?;
                let to: Address = req
                    .to
                    .as_deref()
                    .ok_or_else(|| bad("name the grantee: `to`"))?
                    .parse()
                    .map_err(|e| bad(format!("`to`: {e}")))?;
                let a = req.access.as_deref().unwrap_or("read");
                let access = Access::parse(a).ok_or_else(|| {
                    bad(format!(
                        "`access` {:?}: give \"read\" or \"write\"",
                        spindle_types::id::shown(a)
                    ))
                })?;
                Op::Grant {
                    drive: VfsPath {
                        package: own.clone(),
                        drive: drive.into(),
                        parts: vec![],
                    },
                    to: to.process,
                    access,
                    revoke: op == "revoke",
                }
            }
            other => {
                return Err(bad(format!(
                    "unknown op {:?}: create_drive, read, write, append, metadata, list, mkdir, remove, remove_dir, remove_tree, rename, copy, grant, revoke",
                    spindle_types::id::shown(other)
                )));
            }
        })
    }

    /// Checks `source` may do `op`.
    fn check(&self, bus: &Bus, source: &Address, op: &Op) -> Result<(), Refusal> {
        let need = |p: &VfsPath, a: Access| self.allowed(bus, source, p, a);
        match op {
            Op::CreateDrive(_) | Op::Grant { .. } => Ok(()),
            Op::Read { path, .. } | Op::Metadata(path) | Op::List(path) => need(path, Access::Read),
            Op::Write(p, _)
            | Op::Append(p, _)
            | Op::Mkdir(p)
            | Op::Remove(p)
            | Op::RemoveDir(p)
            | Op::RemoveTree(p) => need(p, Access::Write),
            Op::Rename(a, b) => need(a, Access::Write).and_then(|()| need(b, Access::Write)),
            Op::Copy(a, b) => need(a, Access::Read).and_then(|()| need(b, Access::Write)),
        }
    }

    fn allowed(
        &self,
        bus: &Bus,
        source: &Address,
        p: &VfsPath,
        need: Access,
    ) -> Result<(), Refusal> {
        let own = &source.process.package;
        if *own == p.package || own.is_system() {
            return Ok(());
        }
        let holds = |a| {
            bus.holds(
                &source.process,
                &capability(&self.shared.me, &p.package, &p.drive, a),
            )
        };
        if holds(Access::Write) || (need == Access::Read && holds(Access::Read)) {
            return Ok(());
        }
        Err(Refusal(
            "no-access",
            format!(
                "{source} may not {} drive {} of {}: that package can grant it (`grant`)",
                need.name(),
                p.drive,
                p.package
            ),
        ))
    }
}

impl Shared {
    fn packages(&self) -> MutexGuard<'_, Packages> {
        self.packages.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `bytes` of `package`'s budget, or refuses with `quota`.
    fn reserve(&self, package: &PackageId, bytes: u64) -> Result<(), Refusal> {
        let mut p = self.packages();
        let used = p.used.entry(package.clone()).or_default();
        match used.checked_add(bytes) {
            Some(n) if n <= self.budgets.package_bytes => {
                *used = n;
                Ok(())
            }
            _ => Err(Refusal(
                "quota",
                format!(
                    "package {package} keeps {} of its {} bytes of files: this needs {bytes} more; remove some first",
                    *used, self.budgets.package_bytes
                ),
            )),
        }
    }

    /// Gives `bytes` back to `package`'s budget.
    fn release(&self, package: &PackageId, bytes: u64) {
        if let Some(used) = self.packages().used.get_mut(package) {
            *used = used.saturating_sub(bytes);
        }
    }

    /// Does `op` (on a worker): the answer's body and blob.
    fn run(&self, op: Op) -> Result<(Value, Option<Vec<u8>>), Refusal> {
        let drive = |p: &VfsPath| -> Result<OwnedFd, Refusal> { Ok(self.root.drive(p)?) };
        let done = || Ok((json!({"ok": true}), None));
        match op {
            Op::CreateDrive(p) => {
                let created = self.root.create_drive(&p)?;
                Ok((json!({"ok": true, "created": created}), None))
            }
            Op::Read {
                path,
                offset,
                length,
            } => {
                let (size, bytes) = fs::read(&drive(&path)?, &path, offset, length)?;
                let n = bytes.len();
                Ok((
                    json!({"size": size, "offset": offset, "length": n}),
                    Some(bytes),
                ))
            }
            Op::Write(p, data) => {
                let d = drive(&p)?;
                let (old, new) = (fs::size_of(&d, &p)?.unwrap_or(0), data.len() as u64);
                // Only growth needs room; a smaller file gives room back.
                self.reserve(&p.package, new.saturating_sub(old))?;
                match self.root.write(&d, &p, &data) {
                    Ok(()) => {
                        self.release(&p.package, old.saturating_sub(new));
                        Ok((json!({"ok": true, "size": new}), None))
                    }
                    Err(e) => {
                        self.release(&p.package, new.saturating_sub(old));
                        Err(e.into())
                    }
                }
            }
            Op::Append(p, data) => {
                let d = drive(&p)?;
                self.reserve(&p.package, data.len() as u64)?;
                match fs::append(&d, &p, &data) {
                    Ok(size) => Ok((json!({"ok": true, "size": size}), None)),
                    Err(e) => {
                        self.release(&p.package, data.len() as u64);
                        Err(e.into())
                    }
                }
            }
            Op::Metadata(p) => {
                let m = fs::metadata(&drive(&p)?, &p)?;
                Ok((
                    json!({"kind": m.kind.name(), "size": m.size, "modified_ms": m.modified_ms}),
                    None,
                ))
            }
            Op::List(p) => {
                let (entries, total) = fs::list(&drive(&p)?, &p)?;
                let entries: Vec<Value> = entries
                    .iter()
                    .map(|e| json!({"name": e.name, "kind": e.meta.kind.name(), "size": e.meta.size}))
                    .collect();
                Ok((json!({"entries": entries, "total": total}), None))
            }
            Op::Mkdir(p) => {
                fs::mkdir(&drive(&p)?, &p)?;
                done()
            }
            Op::Remove(p) => {
                let freed = fs::remove(&drive(&p)?, &p)?;
                self.release(&p.package, freed);
                done()
            }
            Op::RemoveDir(p) => {
                fs::remove_dir(&drive(&p)?, &p)?;
                done()
            }
            Op::RemoveTree(p) => match fs::remove_tree(&drive(&p)?, &p) {
                Ok(freed) => {
                    self.release(&p.package, freed);
                    done()
                }
                Err((e, freed)) => {
                    self.release(&p.package, freed);
                    Err(e.into())
                }
            },
            Op::Rename(a, b) => {
                let (da, db) = (drive(&a)?, drive(&b)?);
                let replaced = fs::size_of(&db, &b)?;
                fs::rename(&da, &a, &db, &b)?;
                self.release(&b.package, replaced.unwrap_or(0));
                done()
            }
            Op::Copy(a, b) => {
                let (da, db) = (drive(&a)?, drive(&b)?);
                let size = fs::size_of(&da, &a)?.ok_or_else(|| FsError::NotFound {
                    what: "file",
                    path: a.to_string(),
                })?;
                let old = fs::size_of(&db, &b)?.unwrap_or(0);
                self.reserve(&b.package, size.saturating_sub(old))?;
                match self.root.copy(&da, &a, &db, &b) {
                    Ok(copied) => {
                        // What was reserved against what is there now (the
                        // source may have changed size meanwhile).
                        let reserved = old.max(size);
                        if copied > reserved {
                            self.reserve_after(&b.package, copied - reserved);
                        } else {
                            self.release(&b.package, reserved - copied);
                        }
                        Ok((json!({"ok": true, "size": copied}), None))
                    }
                    Err(e) => {
                        self.release(&b.package, size.saturating_sub(old));
                        Err(e.into())
                    }
                }
            }
            Op::Grant {
                drive: d,
                to,
                access,
                revoke,
            } => {
                self.root.drive(&d)?;
                let bus = self
                    .bus
                    .upgrade()
                    .ok_or_else(|| Refusal("storage", "the node is stopping".into()))?;
                let cap = capability(&self.me, &d.package, &d.drive, access);
                if revoke {
                    bus.revoke(&to, &[cap]);
                } else {
                    bus.grant(&to, [cap]);
                }
                bus.persisted_blocking().map_err(|why| {
                    Refusal(
                        "storage",
                        format!("in effect, but not saved to disk: {why}"),
                    )
                })?;
                done()
            }
        }
    }

    /// Counts bytes already written (a source that grew while copied).
    fn reserve_after(&self, package: &PackageId, bytes: u64) {
        if bytes > 0 {
            let mut p = self.packages();
            let used = p.used.entry(package.clone()).or_default();
            *used = used.saturating_add(bytes);
        }
    }
}

/// The package a request is queued against: while it waits or works, it
/// counts; it stops counting when dropped (its job done, or never run).
struct Queued {
    shared: Arc<Shared>,
    package: PackageId,
}

impl Drop for Queued {
    fn drop(&mut self) {
        let mut p = self.shared.packages();
        if let Some(n) = p.queued.get_mut(&self.package) {
            *n -= 1;
            if *n == 0 {
                p.queued.remove(&self.package);
            }
        }
    }
}

impl Service for Module {
    fn handle(&self, env: Envelope) {
        let Message::Request(r) = &env.message else {
            return;
        };
        let reply = Reply::to(self.shared.bus.clone(), self.shared.me.clone(), &env);
        let Some(bus) = self.shared.bus.upgrade() else {
            return;
        };
        let op = match self
            .parse(&env, &r.body)
            .and_then(|op| self.check(&bus, &env.source, &op).map(|()| op))
        {
            Ok(op) => op,
            Err(Refusal(kind, message)) => return reply.refuse(kind, &message),
        };
        let package = env.source.process.package.clone();
        {
            let mut p = self.shared.packages();
            let n = p.queued.entry(package.clone()).or_default();
            if *n >= self.shared.budgets.queued_per_package {
                drop(p);
                return reply.refuse(
                    "over-budget",
                    &format!(
                        "package {package} has {} vfs requests waiting: await some answers first",
                        self.shared.budgets.queued_per_package
                    ),
                );
            }
            *n += 1;
        }
        let queued = Queued {
            shared: self.shared.clone(),
            package,
        };
        let shared = self.shared.clone();
        let job: Job = Box::new(move || {
            let _queued = queued;
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| shared.run(op)))
                .unwrap_or_else(|_| {
                    tracing::error!("a vfs request panicked; its requester is told");
                    Err(Refusal(
                        "storage",
                        "the request failed inside the node".into(),
                    ))
                });
            match outcome {
                Ok((body, blob)) => reply.ok(body, blob),
                Err(Refusal(kind, message)) => reply.refuse(kind, &message),
            }
        });
        match self.jobs.try_send(job) {
            Ok(()) => {}
            // The job is dropped here: its package stops counting it. Its
            // reply went with it, so the requester is told by the module.
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                Reply::to(self.shared.bus.clone(), self.shared.me.clone(), &env).refuse(
                    "over-budget",
                    "the vfs has too many requests waiting: try again shortly",
                );
            }
        }
    }
}

/// `spindle vfs ls`: the entries of `path` under `dir` (`<home>/vfs`), read
/// directly (the daemon may or may not run).
pub fn ls(dir: &Path, path: &str) -> Result<(Vec<fs::Entry>, usize), Refusal> {
    let p = VfsPath::parse(path)?;
    let root = fs::Root::open_read_only(dir).map_err(|e| Refusal("storage", e.to_string()))?;
    let d = root.drive(&p)?;
    let m = fs::metadata(&d, &p)?;
    if m.kind != fs::Kind::Dir {
        let name = p.parts.last().cloned().unwrap_or_default();
        return Ok((vec![fs::Entry { name, meta: m }], 1));
    }
    Ok(fs::list(&d, &p)?)
}

/// `spindle vfs cat`: the file `path` under `dir`, written to `out` in
/// ranges (any size, in bounded memory).
pub fn cat(dir: &Path, path: &str, out: &mut dyn std::io::Write) -> Result<(), Refusal> {
    let p = VfsPath::parse(path)?;
    let root = fs::Root::open_read_only(dir).map_err(|e| Refusal("storage", e.to_string()))?;
    let d = root.drive(&p)?;
    let mut offset = 0u64;
    loop {
        let (size, bytes) = fs::read(&d, &p, offset, Some(fs::MAX_READ))?;
        out.write_all(&bytes)
            .map_err(|e| Refusal("storage", format!("writing it out: {e}")))?;
        offset = offset.saturating_add(bytes.len() as u64);
        if bytes.is_empty() || offset >= size {
            return Ok(());
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.0, self.1)
    }
}

impl std::error::Error for Refusal {}
