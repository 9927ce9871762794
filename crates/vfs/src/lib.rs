//! # spindle-vfs: the file module `local@vfs:sys:spindle`
//!
//! Files for processes, reached by messages: drives per package at
//! `<home>/vfs/<package>/<drive>/…`, named in requests as
//! `/<package>/<drive>/a/b` ([`path`]). Contents travel as blobs; there is
//! no cursor: every read names its range, so no two readers share state.
//!
//! The module is a [`Service`] on the bus. A request is parsed, its paths
//! checked and its rights decided on the sender's task; the file work runs
//! on the module's own threads ([`WORKERS`]; [`sched`]: one queue per
//! package, served in turn, one job of a package at a time), so a slow disk
//! never holds a sender's task, the files open at once are bounded (two per
//! worker at most), one package's changes never race each other, and a
//! flood delays only its own package. Each package may have
//! [`MAX_QUEUED_PER_PACKAGE`] requests waiting, and the node
//! [`MAX_QUEUED_BYTES`] of contents; past that it hears `over-budget`.
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
mod sched;
#[cfg(test)]
mod tests;

use fs::{FsError, Root};
use path::VfsPath;
use sched::{Job, Sched};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use spindle_bus::Blob;
use spindle_bus::{Bus, Capability, Envelope, Message, Reply, Service};
use spindle_types::{Address, PackageId, ProcessId};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::Path;
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
/// Bytes of files one package may keep in its drives together (every file
/// and directory counts at least [`fs::ENTRY_BYTES`]).
pub const MAX_PACKAGE_BYTES: u64 = 1 << 30;
/// Bytes of contents (write and append blobs) waiting for a worker on the
/// whole node.
pub const MAX_QUEUED_BYTES: usize = 256 << 20;

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
    for package in root.packages() {
        if let Ok(p) = package.parse::<PackageId>() {
            used.insert(p, root.usage(&package));
        }
    }
    let me = bus.address(ProcessId {
        process: VFS.into(),
        package: PackageId::system(),
    });
    let sched = Sched::start(WORKERS, QUEUE).map_err(StartError::Threads)?;
    let shared = Arc::new(Shared {
        root,
        me: Arc::new(me.clone()),
        bus: Arc::downgrade(bus),
        budgets,
        packages: Mutex::new(Packages {
            used,
            queued: HashMap::new(),
            queued_bytes: 0,
        }),
    });
    bus.register_service(me, true, Arc::new(Module { shared, sched }))?;
    Ok(())
}

struct Module {
    shared: Arc<Shared>,
    sched: Arc<Sched>,
}

impl Drop for Module {
    fn drop(&mut self) {
        self.sched.stop();
    }
}

struct Shared {
    root: Root,
    me: Arc<Address>,
    bus: Weak<Bus>,
    budgets: Budgets,
    packages: Mutex<Packages>,
}

/// What each package uses: bytes kept, requests queued; and the contents
/// queued on the node.
struct Packages {
    used: HashMap<PackageId, u64>,
    queued: HashMap<PackageId, usize>,
    queued_bytes: usize,
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
    Write(VfsPath, Arc<Blob>),
    Append(VfsPath, Arc<Blob>),
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
        /// `None`: both (a revoke).
        access: Option<Access>,
        revoke: bool,
    },
}

impl Op {
    /// The package whose files the operation reads or changes: its queue.
    fn package(&self) -> &PackageId {
        match self {
            Op::CreateDrive(p)
            | Op::Read { path: p, .. }
            | Op::Write(p, _)
            | Op::Append(p, _)
            | Op::Metadata(p)
            | Op::List(p)
            | Op::Mkdir(p)
            | Op::Remove(p)
            | Op::RemoveDir(p)
            | Op::RemoveTree(p)
            | Op::Rename(p, _)
            | Op::Copy(_, p)
            | Op::Grant { drive: p, .. } => &p.package,
        }
    }

    /// Bytes of contents it carries (held while it waits).
    fn weight(&self) -> usize {
        match self {
            Op::Write(_, b) | Op::Append(_, b) => b.bytes.len(),
            _ => 0,
        }
    }
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
        let blob = || -> Result<Arc<Blob>, Refusal> {
            env.blob
                .clone()
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
                // A revoke that names no access takes both.
                let access = match req.access.as_deref() {
                    None if op == "revoke" => None,
                    None => Some(Access::Read),
                    Some(a) => Some(Access::parse(a).ok_or_else(|| {
                        bad(format!(
                            "`access` {:?}: give \"read\" or \"write\"",
                            spindle_types::id::shown(a)
                        ))
                    })?),
                };
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

    /// Changes `package`'s count by `delta` bytes: growth is reserved (or
    /// refused with `quota`), shrinking given back.
    fn adjust(&self, package: &PackageId, delta: i128) -> Result<(), Refusal> {
        if delta > 0 {
            self.reserve(package, u64::try_from(delta).unwrap_or(u64::MAX))
        } else {
            self.release(package, u64::try_from(-delta).unwrap_or(u64::MAX));
            Ok(())
        }
    }

    /// Does `op` (on a worker, its package's only job running): the
    /// answer's body and blob. Growth is reserved before the disk is
    /// touched and given back if the operation fails.
    fn run(&self, op: Op) -> Result<(Value, Option<Vec<u8>>), Refusal> {
        use fs::{ENTRY_BYTES, charge};
        let drive = |p: &VfsPath| -> Result<OwnedFd, Refusal> { Ok(self.root.drive(p)?) };
        let done = || Ok((json!({"ok": true}), None));
        // Reserves `grow` for `f`; gives it back if `f` fails.
        let with = |package: &PackageId, grow: i128, f: &mut dyn FnMut() -> Result<(), FsError>| {
            self.adjust(package, grow)?;
            f().map_err(|e| {
                let _ = self.adjust(package, -grow);
                Refusal::from(e)
            })
        };
        match op {
            Op::CreateDrive(p) => {
                self.reserve(&p.package, ENTRY_BYTES)?;
                let created = self.root.create_drive(&p).inspect_err(|_| {
                    self.release(&p.package, ENTRY_BYTES);
                })?;
                if !created {
                    self.release(&p.package, ENTRY_BYTES);
                }
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
                let old = fs::size_of(&d, &p)?;
                let new = data.bytes.len() as u64;
                let grow = i128::from(charge(Some(new))) - i128::from(charge(old));
                with(&p.package, grow, &mut || {
                    self.root.write(&d, &p, &data.bytes)
                })?;
                Ok((json!({"ok": true, "size": new}), None))
            }
            Op::Append(p, data) => {
                let d = drive(&p)?;
                let old = fs::size_of(&d, &p)?;
                let new = old.unwrap_or(0).saturating_add(data.bytes.len() as u64);
                let grow = i128::from(charge(Some(new))) - i128::from(charge(old));
                let mut size = 0;
                with(&p.package, grow, &mut || {
                    size = fs::append(&d, &p, &data.bytes)?;
                    Ok(())
                })?;
                Ok((json!({"ok": true, "size": size}), None))
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
                let d = drive(&p)?;
                // Each directory it will make counts (one made meanwhile by
                // nobody else: this package's jobs run one at a time).
                let most = ENTRY_BYTES.saturating_mul(fs::missing(&d, &p)? as u64);
                self.reserve(&p.package, most)?;
                match fs::mkdir(&d, &p) {
                    Ok(made) => {
                        self.release(&p.package, most.saturating_sub(ENTRY_BYTES * made as u64));
                        done()
                    }
                    Err((e, made)) => {
                        self.release(&p.package, most.saturating_sub(ENTRY_BYTES * made as u64));
                        Err(e.into())
                    }
                }
            }
            Op::Remove(p) => {
                let freed = fs::remove(&drive(&p)?, &p)?;
                self.release(&p.package, freed);
                done()
            }
            Op::RemoveDir(p) => {
                fs::remove_dir(&drive(&p)?, &p)?;
                self.release(&p.package, ENTRY_BYTES);
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
                match fs::rename(&da, &a, &db, &b)? {
                    fs::Renamed::Same => {}
                    fs::Renamed::Replaced(charged) => self.release(&b.package, charged),
                }
                done()
            }
            Op::Copy(a, b) => {
                let (da, db) = (drive(&a)?, drive(&b)?);
                let size = fs::size_of(&da, &a)?.ok_or_else(|| FsError::NotFound {
                    what: "file",
                    path: a.to_string(),
                })?;
                let old = fs::size_of(&db, &b)?;
                let grow = i128::from(charge(Some(size))) - i128::from(charge(old));
                let mut copied = 0;
                // At most the bytes reserved, should the source grow meanwhile.
                with(&b.package, grow, &mut || {
                    copied = self.root.copy(&da, &a, &db, &b, size)?;
                    Ok(())
                })?;
                // A source that shrank meanwhile: what was not copied goes back.
                self.release(&b.package, charge(Some(size)) - charge(Some(copied)));
                Ok((json!({"ok": true, "size": copied}), None))
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
                let caps: Vec<Capability> = match access {
                    Some(a) => vec![capability(&self.me, &d.package, &d.drive, a)],
                    None => [Access::Read, Access::Write]
                        .map(|a| capability(&self.me, &d.package, &d.drive, a))
                        .into(),
                };
                if revoke {
                    bus.revoke(&to, &caps);
                } else {
                    bus.grant(&to, caps);
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
}

/// A request queued for a worker: while it waits or works it counts
/// against its sender's package and (its contents) the node; it stops
/// counting when dropped (its job done, or never run).
struct Queued {
    shared: Arc<Shared>,
    package: PackageId,
    bytes: usize,
}

impl Drop for Queued {
    fn drop(&mut self) {
        let mut p = self.shared.packages();
        p.queued_bytes = p.queued_bytes.saturating_sub(self.bytes);
        if let Some(n) = p.queued.get_mut(&self.package) {
            *n -= 1;
            if *n == 0 {
                p.queued.remove(&self.package);
            }
        }
    }
}

impl Shared {
    /// Counts a request of `package` carrying `bytes`, or says why not.
    fn enqueue(self: &Arc<Self>, package: &PackageId, bytes: usize) -> Result<Queued, Refusal> {
        let mut p = self.packages();
        let n = p.queued.get(package).copied().unwrap_or(0);
        if n >= self.budgets.queued_per_package {
            return Err(Refusal(
                "over-budget",
                format!(
                    "package {package} has {} vfs requests waiting: await some answers first",
                    self.budgets.queued_per_package
                ),
            ));
        }
        if p.queued_bytes.saturating_add(bytes) > MAX_QUEUED_BYTES {
            return Err(Refusal(
                "over-budget",
                format!(
                    "the vfs holds {MAX_QUEUED_BYTES} bytes of contents waiting to be written: try again shortly"
                ),
            ));
        }
        *p.queued.entry(package.clone()).or_default() += 1;
        p.queued_bytes += bytes;
        Ok(Queued {
            shared: self.clone(),
            package: package.clone(),
            bytes,
        })
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
        let queued = self
            .parse(&env, &r.body)
            .and_then(|op| self.check(&bus, &env.source, &op).map(|()| op))
            .and_then(|op| {
                let q = self
                    .shared
                    .enqueue(&env.source.process.package, op.weight())?;
                Ok((op, q))
            });
        let (op, queued) = match queued {
            Ok(x) => x,
            Err(Refusal(kind, message)) => return reply.refuse(kind, &message),
        };
        let package = op.package().clone();
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
        if self.sched.submit(&package, job).is_err() {
            // The job is dropped here (its count with it); its reply went
            // with it, so the module answers afresh.
            Reply::to(self.shared.bus.clone(), self.shared.me.clone(), &env).refuse(
                "over-budget",
                "the vfs has too many requests waiting: try again shortly",
            );
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
