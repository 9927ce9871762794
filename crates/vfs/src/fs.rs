//! The file operations, confined to a drive.
//!
//! Every path below a drive is opened with `openat2` relative to the
//! drive's directory with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_XDEV`: the kernel itself refuses anything that would leave
//! it — `..`, a symlink (planted by anyone), a mount point — so a checked
//! [`VfsPath`] plus this is two locks, not one. Names are then acted on
//! with the `*at` calls on the opened parent, never by a path string.
//!
//! Durability: a write goes to a temporary file in the vfs's own `.tmp`
//! directory (same file system), is synced, renamed over its target, and
//! the target's directory synced — old or new after any crash. An append
//! is synced before it is acknowledged, and on failure (a full disk) the
//! file is cut back to where it was, so nothing is half-written.

use crate::path::{MAX_DEPTH, VfsPath};
use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{Mode, SFlag, fstat, fstatat, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes one read may return: larger files are read in ranges.
pub const MAX_READ: u64 = 16 << 20;
/// Entries one `list` returns (the rest are counted, not sent).
pub const MAX_LIST: usize = 10_000;
/// The copy buffer: a copy of any size holds this much at once.
const COPY_CHUNK: usize = 1 << 20;
/// What a file or directory costs its package at least (a block of the
/// disk and its name): so a million empty files are not free.
pub const ENTRY_BYTES: u64 = 4096;

/// What an entry of `size` bytes costs its package (`None`: absent).
pub fn charge(size: Option<u64>) -> u64 {
    size.map_or(0, |s| s.max(ENTRY_BYTES))
}

/// Why a file operation failed. The kind is what the requester hears.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    #[error("no such {what}: {path}")]
    NotFound { what: &'static str, path: String },
    #[error("{0} is a directory")]
    IsDir(String),
    #[error("{0} is not a directory")]
    NotDir(String),
    #[error("{0} is not a regular file")]
    NotFile(String),
    #[error("directory {0} is not empty: remove what is in it first, or use remove_tree")]
    NotEmpty(String),
    #[error("{0} leads out of its drive (a symlink or a mount point): it is not followed")]
    Escape(String),
    #[error("{0} would put directories more than {MAX_DEPTH} deep below the drive")]
    TooDeep(String),
    #[error("{path} is {size} bytes: read it in ranges of at most {MAX_READ} (offset, length)")]
    TooBig { path: String, size: u64 },
    #[error("the disk is full: nothing was written to {0}")]
    DiskFull(String),
    #[error("the vfs directory is read-only: nothing was written to {0}")]
    ReadOnly(String),
    #[error("{path}: {why}")]
    Io { path: String, why: String },
}

impl FsError {
    pub fn kind(&self) -> &'static str {
        match self {
            FsError::NotFound { .. } => "not-found",
            FsError::IsDir(_)
            | FsError::NotDir(_)
            | FsError::NotFile(_)
            | FsError::NotEmpty(_)
            | FsError::TooDeep(_)
            | FsError::TooBig { .. } => "bad-request",
            FsError::Escape(_) => "no-access",
            FsError::DiskFull(_) => "disk-full",
            FsError::ReadOnly(_) => "read-only",
            FsError::Io { .. } => "storage",
        }
    }

    /// The error of `errno` while working on `path` (what the requester named).
    pub fn of(errno: Errno, path: &VfsPath) -> FsError {
        let p = path.to_string();
        match errno {
            Errno::ENOENT => FsError::NotFound {
                what: "file or directory",
                path: p,
            },
            Errno::EISDIR => FsError::IsDir(p),
            Errno::ENOTDIR => FsError::NotDir(p),
            Errno::ENOTEMPTY | Errno::EEXIST => FsError::NotEmpty(p),
            // A FIFO without a reader, a device: opened non-blocking, refused.
            Errno::ENXIO | Errno::ENODEV => FsError::NotFile(p),
            Errno::ELOOP | Errno::EXDEV | Errno::EAGAIN => FsError::Escape(p),
            Errno::ENOSPC | Errno::EDQUOT => FsError::DiskFull(p),
            Errno::EROFS => FsError::ReadOnly(p),
            e => FsError::Io {
                path: p,
                why: e.desc().into(),
            },
        }
    }

    fn io(e: std::io::Error, path: &VfsPath) -> FsError {
        FsError::of(e.raw_os_error().map_or(Errno::EIO, Errno::from_raw), path)
    }
}

type Res<T> = Result<T, FsError>;

fn confined() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_XDEV
}

/// Opens `rel` below `dir` with `flags`, confined.
fn open(dir: impl AsFd, rel: &str, flags: OFlag, path: &VfsPath) -> Res<OwnedFd> {
    let mut how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .resolve(confined());
    // A mode is for files being made only (else openat2 refuses it).
    if flags.contains(OFlag::O_CREAT) {
        how = how.mode(Mode::from_bits_truncate(0o640));
    }
    openat2(dir, rel, how).map_err(|e| FsError::of(e, path))
}

/// What a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    /// Anything else (a symlink, a socket…): listed, never opened.
    Other,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Other => "other",
        }
    }

    fn of(mode: u32) -> Kind {
        match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
            SFlag::S_IFREG => Kind::File,
            SFlag::S_IFDIR => Kind::Dir,
            _ => Kind::Other,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    pub size: u64,
    /// Milliseconds since the Unix epoch.
    pub modified_ms: u64,
}

fn meta(st: &nix::sys::stat::FileStat) -> Meta {
    Meta {
        kind: Kind::of(st.st_mode),
        size: st.st_size.max(0) as u64,
        modified_ms: (st.st_mtime.max(0) as u64)
            .saturating_mul(1000)
            .saturating_add(st.st_mtime_nsec.max(0) as u64 / 1_000_000),
    }
}

/// The vfs's directory: drives at `<package>/<drive>`, temporary files in
/// `.tmp`.
pub struct Root {
    dir: OwnedFd,
    tmp: OwnedFd,
    next_tmp: AtomicU64,
}

impl Root {
    /// Opens (making it if need be) the vfs directory `path`; what an
    /// earlier daemon left in `.tmp` (writes cut short) is removed.
    pub fn open(path: &std::path::Path) -> std::io::Result<Root> {
        std::fs::create_dir_all(path.join(".tmp"))?;
        for e in std::fs::read_dir(path.join(".tmp"))?.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        let dir = File::open(path)?.into();
        let tmp = File::open(path.join(".tmp"))?.into();
        Ok(Root {
            dir,
            tmp,
            next_tmp: AtomicU64::new(0),
        })
    }

    /// The vfs directory `path` as it is, for reading (`spindle vfs ls`):
    /// nothing is made or removed.
    pub fn open_read_only(path: &std::path::Path) -> std::io::Result<Root> {
        let dir: OwnedFd = File::open(path)?.into();
        let tmp = dir.try_clone()?;
        Ok(Root {
            dir,
            tmp,
            next_tmp: AtomicU64::new(0),
        })
    }

    /// The directory of `path`'s drive.
    pub fn drive(&self, path: &VfsPath) -> Res<OwnedFd> {
        let rel = format!("{}/{}", path.package, path.drive);
        open(&self.dir, &rel, OFlag::O_PATH | OFlag::O_DIRECTORY, path).map_err(|e| match e {
            FsError::NotFound { .. } => FsError::NotFound {
                what: "drive",
                path: format!(
                    "/{}/{} (create it first: create_drive)",
                    path.package, path.drive
                ),
            },
            e => e,
        })
    }

    /// Makes `path`'s drive; false if it was there.
    pub fn create_drive(&self, path: &VfsPath) -> Res<bool> {
        let package = path.package.to_string();
        match mkdirat(&self.dir, package.as_str(), Mode::from_bits_truncate(0o750)) {
            Ok(()) => sync_dir(&self.dir, path)?,
            Err(Errno::EEXIST) => {}
            Err(e) => return Err(FsError::of(e, path)),
        }
        let pkg = open(
            &self.dir,
            &package,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            path,
        )?;
        let made = match mkdirat(&pkg, path.drive.as_str(), Mode::from_bits_truncate(0o750)) {
            Ok(()) => true,
            Err(Errno::EEXIST) => false,
            Err(e) => return Err(FsError::of(e, path)),
        };
        self.drive(path)?;
        if made {
            sync_dir(&pkg, path)?;
        }
        Ok(made)
    }

    fn tmp_name(&self) -> String {
        format!(
            "w-{}-{}",
            std::process::id(),
            self.next_tmp.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Packages with drives, as their directories are named (what does
    /// not name a package — `.tmp` — is not one).
    pub fn packages(&self) -> Vec<String> {
        let mut out: Vec<String> = entries(&self.dir, ".")
            .into_iter()
            .filter(|p| p.parse::<spindle_types::PackageId>().is_ok())
            .collect();
        out.sort();
        out
    }

    /// What `package`'s drives cost it ([`charge`] of every entry).
    pub fn usage(&self, package: &str) -> u64 {
        let Ok(fd) = openat2(
            &self.dir,
            package,
            OpenHow::new()
                .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
                .resolve(confined()),
        ) else {
            return 0;
        };
        tree_size(fd, 0)
    }
}

/// Names in directory `rel` of `dir` (unreadable: none).
fn entries(dir: impl AsFd, rel: &str) -> Vec<String> {
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(confined());
    let Ok(fd) = openat2(dir, rel, how) else {
        return vec![];
    };
    let Ok(mut d) = nix::dir::Dir::from_fd(fd) else {
        return vec![];
    };
    d.iter()
        .flatten()
        .filter_map(|e| e.file_name().to_str().ok().map(str::to_string))
        .filter(|n| n != "." && n != "..")
        .collect()
}

/// The names in `d`, but `.` and `..`.
fn names(d: &mut nix::dir::Dir) -> Vec<std::ffi::CString> {
    d.iter()
        .flatten()
        .map(|e| e.file_name().to_owned())
        .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
        .collect()
}

/// What the entries below `dir` cost (symlinks are not followed; a tree
/// deeper than the vfs makes is counted to its limit).
fn tree_size(dir: OwnedFd, depth: usize) -> u64 {
    if depth > MAX_DEPTH + 1 {
        return 0;
    }
    let Ok(mut d) = nix::dir::Dir::from_fd(dir) else {
        return 0;
    };
    let names = names(&mut d);
    let mut total = 0u64;
    for n in names {
        let Ok(st) = fstatat(&d, n.as_c_str(), nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) else {
            continue;
        };
        match Kind::of(st.st_mode) {
            Kind::File => total = total.saturating_add(charge(Some(st.st_size.max(0) as u64))),
            Kind::Dir => {
                total = total.saturating_add(ENTRY_BYTES);
                let how = OpenHow::new()
                    .flags(
                        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
                    )
                    .resolve(confined());
                if let Ok(sub) = openat2(&d, n.as_c_str(), how) {
                    total = total.saturating_add(tree_size(sub, depth + 1));
                }
            }
            Kind::Other => total = total.saturating_add(ENTRY_BYTES),
        }
    }
    total
}

fn sync_dir(dir: impl AsFd, path: &VfsPath) -> Res<()> {
    nix::unistd::fsync(dir).map_err(|e| FsError::of(e, path))
}

/// The open parent directory of `path` and its last name.
fn parent<'p>(drive: &OwnedFd, path: &'p VfsPath) -> Res<(OwnedFd, &'p str)> {
    let (rel, last) = path
        .split_last()
        .ok_or_else(|| FsError::IsDir(path.to_string()))?;
    let dir = open(drive, &rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY, path)?;
    Ok((dir, last))
}

/// The regular file at `path`, opened with `flags`, and its metadata.
fn file(drive: &OwnedFd, path: &VfsPath, flags: OFlag) -> Res<(File, Meta)> {
    // Non-blocking, so a FIFO planted in a drive cannot hold a worker in
    // `open`; it is then refused as not a regular file. (No effect on
    // regular files.)
    let fd = open(drive, &path.relative(), flags | OFlag::O_NONBLOCK, path)?;
    let st = fstat(&fd).map_err(|e| FsError::of(e, path))?;
    let m = meta(&st);
    if m.kind != Kind::File {
        return Err(match m.kind {
            Kind::Dir => FsError::IsDir(path.to_string()),
            _ => FsError::NotFile(path.to_string()),
        });
    }
    Ok((File::from(fd), m))
}

/// Metadata of `path` (the drive's root too).
pub fn metadata(drive: &OwnedFd, path: &VfsPath) -> Res<Meta> {
    let fd = open(drive, &path.relative(), OFlag::O_PATH, path)?;
    fstat(&fd)
        .map(|st| meta(&st))
        .map_err(|e| FsError::of(e, path))
}

/// Reads `length` bytes (all, if `None`) of `path` from `offset`: the
/// file's size and the bytes.
pub fn read(
    drive: &OwnedFd,
    path: &VfsPath,
    offset: u64,
    length: Option<u64>,
) -> Res<(u64, Vec<u8>)> {
    let (f, m) = file(drive, path, OFlag::O_RDONLY)?;
    let available = m.size.saturating_sub(offset);
    let want = match length {
        Some(l) => l.min(available),
        None => available,
    };
    if want > MAX_READ {
        return Err(FsError::TooBig {
            path: path.to_string(),
            size: m.size,
        });
    }
    let mut buf = vec![0u8; want as usize];
    let mut got = 0usize;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], offset.saturating_add(got as u64)) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FsError::io(e, path)),
        }
    }
    buf.truncate(got);
    Ok((m.size, buf))
}

/// The size of the regular file at `path`, if there is one.
pub fn size_of(drive: &OwnedFd, path: &VfsPath) -> Res<Option<u64>> {
    match metadata(drive, path) {
        Ok(m) if m.kind == Kind::File => Ok(Some(m.size)),
        Ok(m) if m.kind == Kind::Dir => Err(FsError::IsDir(path.to_string())),
        Ok(_) => Err(FsError::NotFile(path.to_string())),
        Err(FsError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

impl Root {
    /// Replaces `path` with `data`, atomically and durably.
    pub fn write(&self, drive: &OwnedFd, path: &VfsPath, data: &[u8]) -> Res<()> {
        self.replace(drive, path, |f| f.write_all(data))
    }

    /// Copies `from` (of `from_drive`) to `to`, atomically and durably, in
    /// chunks, at most `most` bytes (what was reserved): the bytes copied.
    pub fn copy(
        &self,
        from_drive: &OwnedFd,
        from: &VfsPath,
        drive: &OwnedFd,
        to: &VfsPath,
        most: u64,
    ) -> Res<u64> {
        let (src, m) = file(from_drive, from, OFlag::O_RDONLY)?;
        let mut src = src.take(most);
        let mut buf = vec![0u8; COPY_CHUNK.min(m.size.min(most) as usize).max(1)];
        let mut copied = 0u64;
        self.replace(drive, to, |f| {
            loop {
                let n = src.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                f.write_all(&buf[..n])?;
                copied += n as u64;
            }
        })?;
        Ok(copied)
    }

    /// Writes a temporary file with `fill`, syncs it, renames it over
    /// `path` and syncs `path`'s directory; on failure nothing is left.
    fn replace(
        &self,
        drive: &OwnedFd,
        path: &VfsPath,
        fill: impl FnOnce(&mut File) -> std::io::Result<()>,
    ) -> Res<()> {
        let (dir, last) = parent(drive, path)?;
        if let Ok(st) = fstatat(&dir, last, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
            && Kind::of(st.st_mode) == Kind::Dir
        {
            return Err(FsError::IsDir(path.to_string()));
        }
        let name = self.tmp_name();
        let tmp = open(
            &self.tmp,
            &name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
            path,
        )?;
        let mut f = File::from(tmp);
        let done = fill(&mut f)
            .and_then(|()| f.sync_all())
            .map_err(|e| FsError::io(e, path))
            .and_then(|()| {
                nix::fcntl::renameat(&self.tmp, name.as_str(), &dir, last)
                    .map_err(|e| FsError::of(e, path))
            });
        if done.is_err() {
            let _ = unlinkat(&self.tmp, name.as_str(), UnlinkatFlags::NoRemoveDir);
            return done;
        }
        sync_dir(&dir, path)
    }
}

/// Appends `data` to `path` (made if missing) and syncs it: the new size.
/// On failure the file is as it was.
pub fn append(drive: &OwnedFd, path: &VfsPath, data: &[u8]) -> Res<u64> {
    let (dir, last) = parent(drive, path)?;
    let existed = fstatat(&dir, last, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).is_ok();
    let (mut f, m) = file(
        drive,
        path,
        OFlag::O_WRONLY | OFlag::O_APPEND | OFlag::O_CREAT,
    )?;
    let wrote = f.write_all(data).and_then(|()| f.sync_data());
    if let Err(e) = wrote {
        let _ = f.set_len(m.size);
        let _ = f.sync_data();
        return Err(FsError::io(e, path));
    }
    if !existed {
        sync_dir(&dir, path)?;
    }
    Ok(m.size.saturating_add(data.len() as u64))
}

/// How many directories of `path` (it and its parents) are not there yet.
pub fn missing(drive: &OwnedFd, path: &VfsPath) -> Res<usize> {
    for (i, _) in path.parts.iter().enumerate() {
        let rel = path.parts[..=i].join("/");
        match open(drive, &rel, OFlag::O_PATH | OFlag::O_DIRECTORY, path) {
            Ok(_) => {}
            Err(FsError::NotFound { .. }) => return Ok(path.parts.len() - i),
            Err(e) => return Err(e),
        }
    }
    Ok(0)
}

/// Makes directory `path` and its parents (those there already are fine):
/// how many it made (so far, if it fails part-way).
pub fn mkdir(drive: &OwnedFd, path: &VfsPath) -> Result<usize, (FsError, usize)> {
    let mut made = 0;
    let mut at: OwnedFd =
        open(drive, ".", OFlag::O_RDONLY | OFlag::O_DIRECTORY, path).map_err(|e| (e, made))?;
    for name in &path.parts {
        match mkdirat(&at, name.as_str(), Mode::from_bits_truncate(0o750)) {
            Ok(()) => {
                made += 1;
                sync_dir(&at, path).map_err(|e| (e, made))?;
            }
            Err(Errno::EEXIST) => {}
            Err(e) => return Err((FsError::of(e, path), made)),
        }
        at = open(&at, name, OFlag::O_RDONLY | OFlag::O_DIRECTORY, path).map_err(|e| (e, made))?;
    }
    Ok(made)
}

/// Removes the file `path`: what it cost ([`charge`]).
pub fn remove(drive: &OwnedFd, path: &VfsPath) -> Res<u64> {
    let (dir, last) = parent(drive, path)?;
    let st = fstatat(&dir, last, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
        .map_err(|e| FsError::of(e, path))?;
    let m = meta(&st);
    if m.kind == Kind::Dir {
        return Err(FsError::IsDir(path.to_string()));
    }
    unlinkat(&dir, last, UnlinkatFlags::NoRemoveDir).map_err(|e| FsError::of(e, path))?;
    sync_dir(&dir, path)?;
    Ok(if m.kind == Kind::File {
        charge(Some(m.size))
    } else {
        ENTRY_BYTES
    })
}

/// Removes the empty directory `path`.
pub fn remove_dir(drive: &OwnedFd, path: &VfsPath) -> Res<()> {
    let (dir, last) = parent(drive, path)?;
    unlinkat(&dir, last, UnlinkatFlags::RemoveDir).map_err(|e| FsError::of(e, path))?;
    sync_dir(&dir, path)
}

/// Removes `path` and everything below it: the bytes freed (so far, if it
/// fails part-way: `Err` carries them).
pub fn remove_tree(drive: &OwnedFd, path: &VfsPath) -> Result<u64, (FsError, u64)> {
    let (dir, last) = parent(drive, path).map_err(|e| (e, 0))?;
    let st = fstatat(&dir, last, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
        .map_err(|e| (FsError::of(e, path), 0))?;
    if Kind::of(st.st_mode) != Kind::Dir {
        return remove(drive, path).map_err(|e| (e, 0));
    }
    let mut freed = 0;
    let sub = open(&dir, last, OFlag::O_RDONLY | OFlag::O_DIRECTORY, path).map_err(|e| (e, 0))?;
    empty_tree(sub, path, 0, &mut freed).map_err(|e| (e, freed))?;
    unlinkat(&dir, last, UnlinkatFlags::RemoveDir).map_err(|e| (FsError::of(e, path), freed))?;
    freed += ENTRY_BYTES;
    sync_dir(&dir, path).map_err(|e| (e, freed))?;
    Ok(freed)
}

fn empty_tree(dir: OwnedFd, path: &VfsPath, depth: usize, freed: &mut u64) -> Res<()> {
    if depth > MAX_DEPTH {
        return Err(FsError::Io {
            path: path.to_string(),
            why: format!("deeper than {MAX_DEPTH} directories"),
        });
    }
    let mut d = nix::dir::Dir::from_fd(dir).map_err(|e| FsError::of(e, path))?;
    let names = names(&mut d);
    for n in names {
        let st = fstatat(&d, n.as_c_str(), nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| FsError::of(e, path))?;
        let m = meta(&st);
        if m.kind == Kind::Dir {
            let how = OpenHow::new()
                .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
                .resolve(confined());
            let sub = openat2(&d, n.as_c_str(), how).map_err(|e| FsError::of(e, path))?;
            empty_tree(sub, path, depth + 1, freed)?;
            unlinkat(&d, n.as_c_str(), UnlinkatFlags::RemoveDir)
                .map_err(|e| FsError::of(e, path))?;
            *freed = freed.saturating_add(ENTRY_BYTES);
        } else {
            unlinkat(&d, n.as_c_str(), UnlinkatFlags::NoRemoveDir)
                .map_err(|e| FsError::of(e, path))?;
            *freed = freed.saturating_add(if m.kind == Kind::File {
                charge(Some(m.size))
            } else {
                ENTRY_BYTES
            });
        }
    }
    Ok(())
}

/// What a rename did.
#[derive(Debug, PartialEq, Eq)]
pub enum Renamed {
    /// `from` and `to` are the same file: nothing.
    Same,
    /// Done; what the entry it replaced at `to` cost (0 if none).
    Replaced(u64),
}

/// Renames `from` to `to` (a file at `to` is replaced). A directory may
/// not end up deeper than [`MAX_DEPTH`] below its drive.
pub fn rename(from_drive: &OwnedFd, from: &VfsPath, drive: &OwnedFd, to: &VfsPath) -> Res<Renamed> {
    let (a, a_name) = parent(from_drive, from)?;
    let (b, b_name) = parent(drive, to)?;
    let src = fstatat(&a, a_name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
        .map_err(|e| FsError::of(e, from))?;
    let dst = fstatat(&b, b_name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).ok();
    if dst.is_some_and(|d| (d.st_dev, d.st_ino) == (src.st_dev, src.st_ino)) {
        return Ok(Renamed::Same);
    }
    if Kind::of(src.st_mode) == Kind::Dir {
        let sub = open(&a, a_name, OFlag::O_RDONLY | OFlag::O_DIRECTORY, from)?;
        if to.parts.len().saturating_add(depth(sub, 0)) > MAX_DEPTH {
            return Err(FsError::TooDeep(to.to_string()));
        }
    }
    let replaced = dst.map_or(0, |d| match Kind::of(d.st_mode) {
        Kind::File => charge(Some(d.st_size.max(0) as u64)),
        _ => ENTRY_BYTES,
    });
    nix::fcntl::renameat(&a, a_name, &b, b_name).map_err(|e| FsError::of(e, to))?;
    sync_dir(&b, to)?;
    sync_dir(&a, from)?;
    Ok(Renamed::Replaced(replaced))
}

/// How deep the directories below `dir` go (0: none), counted up to just
/// past [`MAX_DEPTH`].
fn depth(dir: OwnedFd, at: usize) -> usize {
    if at > MAX_DEPTH {
        return at;
    }
    let Ok(mut d) = nix::dir::Dir::from_fd(dir) else {
        return at;
    };
    let mut deepest = at;
    for n in names(&mut d) {
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
            .resolve(confined());
        if let Ok(sub) = openat2(&d, n.as_c_str(), how) {
            deepest = deepest.max(depth(sub, at + 1));
            if deepest > MAX_DEPTH {
                break;
            }
        }
    }
    deepest
}

/// One entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub meta: Meta,
}

/// The directory `path`: its entries by name (at most [`MAX_LIST`]), and
/// how many there are in all.
pub fn list(drive: &OwnedFd, path: &VfsPath) -> Res<(Vec<Entry>, usize)> {
    let fd = open(
        drive,
        &path.relative(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY,
        path,
    )?;
    let mut d = nix::dir::Dir::from_fd(fd).map_err(|e| FsError::of(e, path))?;
    let mut names = names(&mut d);
    let total = names.len();
    names.sort();
    names.truncate(MAX_LIST);
    let mut out = Vec::new();
    for n in names {
        let Ok(name) = n.to_str() else { continue };
        let Ok(st) = fstatat(&d, n.as_c_str(), nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) else {
            continue;
        };
        out.push(Entry {
            name: name.to_string(),
            meta: meta(&st),
        });
    }
    Ok((out, total))
}
