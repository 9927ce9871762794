//! A process's request to start a wasm child, carried to the node's control
//! loop (which owns the kernel) from wherever the process runs: a wasm host
//! or the bridge of a native process's IPC channel.
//!
//! A child runs in its parent's package, so its component must be one the
//! package ships: the path a process gives is taken relative to its own
//! folder (a wasm parent's component folder, a native parent's working
//! directory) and may not leave it — no absolute paths, no `..`, no
//! symbolic link that points outside ([`SpawnCall::resolve`]).

use crate::Capability;
use spindle_types::{Address, OnExit};
use std::path::{Component, Path, PathBuf};
use tokio::sync::oneshot;

/// Longest component path a process may give.
pub const MAX_COMPONENT_PATH: usize = 1024;

/// A process asked to spawn a child; the control loop starts it and answers.
#[derive(Debug)]
pub struct SpawnCall {
    pub parent: Address,
    pub name: Option<String>,
    /// The parent's folder: the child's component must be inside it.
    pub dir: PathBuf,
    /// The child's component, as the parent gave it (relative to `dir`).
    pub component: String,
    /// The component once found inside `dir` (by the wasm host that makes
    /// the call, or by the stage before the loop for a native bridge's);
    /// `None` until then, or if the path was refused.
    pub resolved: Option<Found>,
    pub on_exit: OnExit,
    pub public: bool,
    /// Capabilities of the parent the child receives (checked to be the parent's).
    pub capabilities: Vec<Capability>,
    /// Processes that may message the child (the parent may anyway).
    pub grant_to: Vec<Address>,
    pub reply: oneshot::Sender<Result<Address, SpawnError>>,
}

/// Why a process's spawn did not start a child.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error(transparent)]
    Path(#[from] PathRefused),
    /// The child's spec breaks a rule every spec obeys.
    #[error("the child's `{key}`: {message}")]
    Spec { key: &'static str, message: String },
    /// A budget of the parent, its package or the node is spent.
    #[error("{0}")]
    Budget(String),
    /// The component does not load, or the address is taken.
    #[error("{0}")]
    Refused(String),
    #[error("the node is shutting down")]
    ShuttingDown,
}

/// Why a component path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathRefused {
    #[error("give the child's component as a path relative to the parent's folder")]
    Empty,
    #[error("component path is {0} bytes, more than {MAX_COMPONENT_PATH}")]
    TooLong(usize),
    #[error(
        "component path {0:?} is absolute: give it relative to the parent's folder, which it may not leave"
    )]
    Absolute(String),
    #[error(
        "component path {0:?} leaves the parent's folder (`..`): components of other folders are not the package's"
    )]
    Escapes(String),
    #[error("component {0:?} is a link to outside the parent's folder")]
    LinksOut(String),
    #[error("component {path:?} cannot be read: {why}")]
    Unreadable { path: String, why: String },
}

/// A component file a spawn named, as its lookup found it: where it is
/// (a path free of links) and which file of which contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub path: PathBuf,
    pub stamp: FileStamp,
}

/// Identifies a file's contents cheaply (size, time, and which file): a
/// changed file, or another file at the same path, is loaded afresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
    file: (u64, u64),
}

impl FileStamp {
    pub fn of(meta: &std::fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            len: meta.len(),
            modified: meta.modified().ok(),
            file: (meta.dev(), meta.ino()),
        }
    }

    /// The file's size in bytes.
    pub fn bytes(&self) -> u64 {
        self.len
    }

    /// The stamp of the file `fd` is open on (an `O_PATH` descriptor will do).
    fn of_fd(fd: std::os::fd::OwnedFd) -> std::io::Result<FileStamp> {
        Ok(FileStamp::of(&std::fs::File::from(fd).metadata()?))
    }
}

impl SpawnCall {
    /// The component inside the parent's folder.
    pub fn resolve(&self) -> Result<Found, PathRefused> {
        match &self.resolved {
            Some(p) => Ok(p.clone()),
            None => confine(&self.dir, &self.component),
        }
    }

    /// [`SpawnCall::resolve`], remembering the path found for whoever
    /// handles the call next.
    pub fn resolve_once(&mut self) -> Result<Found, PathRefused> {
        let found = self.resolve();
        self.resolved = found.as_ref().ok().cloned();
        found
    }
}

/// `rel` inside `dir`, refused if it is absolute, climbs out with `..`, or
/// resolves (through symbolic links) to somewhere outside `dir`.
pub fn confine(dir: &Path, rel: &str) -> Result<Found, PathRefused> {
    if rel.is_empty() {
        return Err(PathRefused::Empty);
    }
    if rel.len() > MAX_COMPONENT_PATH {
        return Err(PathRefused::TooLong(rel.len()));
    }
    let given = Path::new(rel);
    let mut lexical = PathBuf::new();
    for part in given.components() {
        match part {
            Component::Normal(p) => lexical.push(p),
            Component::CurDir => {}
            Component::ParentDir => return Err(PathRefused::Escapes(rel.into())),
            Component::RootDir | Component::Prefix(_) => {
                return Err(PathRefused::Absolute(rel.into()));
            }
        }
    }
    if lexical.as_os_str().is_empty() {
        return Err(PathRefused::Empty);
    }
    let unreadable = |e: std::io::Error| PathRefused::Unreadable {
        path: rel.into(),
        why: e.kind().to_string(),
    };
    // Rebuilt from its parts, so a `.` inside `dir` is not kept.
    let direct: PathBuf = dir.components().chain(lexical.components()).collect();
    match open_unlinked(dir, &direct) {
        Some(Ok(stamp)) => {
            return Ok(Found {
                path: direct,
                stamp,
            });
        }
        // A link on the way (or a kernel without openat2): resolved below.
        Some(Err(e)) if e.raw_os_error() != Some(libc::ELOOP) && !no_openat2(&e) => {
            return Err(unreadable(e));
        }
        _ => {}
    }
    match resolve_beneath(dir, &lexical) {
        Ok(found) => Ok(found),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => Err(PathRefused::LinksOut(rel.into())),
        // A kernel without openat2 (before 5.6), or no /proc: resolve the
        // long way, a lookup per path component.
        Err(e) if no_openat2(&e) || e.kind() == std::io::ErrorKind::Unsupported => {
            let root = dir.canonicalize().map_err(unreadable)?;
            let path = root.join(&lexical).canonicalize().map_err(unreadable)?;
            if !path.starts_with(&root) {
                return Err(PathRefused::LinksOut(rel.into()));
            }
            let stamp = FileStamp::of(&std::fs::metadata(&path).map_err(unreadable)?);
            Ok(Found { path, stamp })
        }
        Err(e) => Err(unreadable(e)),
    }
}

/// `openat2` is missing (ENOSYS) or filtered out (EPERM).
fn no_openat2(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM))
}

/// The common case in one lookup: `path` (`dir` joined with a plain
/// relative path) reached without following any link, which makes it the
/// file's own path and inside `dir`. `None` when `dir` is not a plain
/// absolute path (it has `..` parts), so the result would not be.
fn open_unlinked(dir: &Path, path: &Path) -> Option<std::io::Result<FileStamp>> {
    use nix::fcntl::{AT_FDCWD, OFlag, OpenHow, ResolveFlag, openat2};
    let mut parts = dir.components();
    let plain = parts.next() == Some(Component::RootDir)
        && parts.all(|p| matches!(p, Component::Normal(_)));
    if !plain {
        return None;
    }
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
    Some(
        openat2(AT_FDCWD, path, how)
            .map_err(std::io::Error::from)
            .and_then(FileStamp::of_fd),
    )
}

/// Resolves `rel` inside `dir` in one lookup that the kernel keeps beneath
/// `dir` (`RESOLVE_BENEATH`: no `..` out, no absolute or outward link;
/// `EXDEV` if it would leave), and names what it found.
fn resolve_beneath(dir: &Path, rel: &Path) -> std::io::Result<Found> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag, open, openat2};
    use std::os::fd::AsRawFd;
    let root = open(
        dir,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let found = openat2(&root, rel, how)?;
    let real = std::fs::read_link(format!("/proc/self/fd/{}", found.as_raw_fd())).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            std::io::Error::from(std::io::ErrorKind::Unsupported)
        } else {
            e
        }
    })?;
    // Replaced or removed between the lookup and now: not a path to load.
    if real.as_os_str().as_encoded_bytes().ends_with(b" (deleted)") {
        return Err(std::io::ErrorKind::NotFound.into());
    }
    Ok(Found {
        path: real,
        stamp: FileStamp::of_fd(found)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_component_stays_in_its_folder() {
        let outer = tempfile::tempdir().unwrap();
        let dir = outer.path().join("pkg");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/child.wasm"), b"x").unwrap();
        std::fs::write(outer.path().join("other.wasm"), b"x").unwrap();
        std::os::unix::fs::symlink(outer.path().join("other.wasm"), dir.join("link.wasm")).unwrap();
        std::os::unix::fs::symlink("sub/child.wasm", dir.join("inner.wasm")).unwrap();
        let inside = dir.canonicalize().unwrap().join("sub/child.wasm");
        let found = |rel: &str| confine(&dir, rel).map(|f| f.path);
        assert_eq!(found("sub/child.wasm").unwrap(), inside);
        assert_eq!(found("./sub/./child.wasm").unwrap(), inside);
        assert_eq!(found("inner.wasm").unwrap(), inside);
        assert!(matches!(
            confine(&dir, "../other.wasm"),
            Err(PathRefused::Escapes(_))
        ));
        assert!(matches!(
            confine(&dir, "sub/../../other.wasm"),
            Err(PathRefused::Escapes(_))
        ));
        assert!(matches!(
            confine(&dir, "/etc/passwd"),
            Err(PathRefused::Absolute(_))
        ));
        assert!(matches!(
            confine(&dir, "link.wasm"),
            Err(PathRefused::LinksOut(_))
        ));
        assert!(matches!(confine(&dir, ""), Err(PathRefused::Empty)));
        assert!(matches!(confine(&dir, "."), Err(PathRefused::Empty)));
        assert!(matches!(
            confine(&dir, "none.wasm"),
            Err(PathRefused::Unreadable { .. })
        ));
        let long = "a/".repeat(MAX_COMPONENT_PATH);
        assert!(matches!(confine(&dir, &long), Err(PathRefused::TooLong(_))));
    }

    /// The folder itself may be reached through links (the one lookup that
    /// follows none then gives way to the full resolution); what comes back
    /// is the file's own path, and the stamp is the file's.
    #[test]
    fn a_folder_behind_a_link_resolves_to_the_real_file() {
        let outer = tempfile::tempdir().unwrap();
        let real = outer.path().join("real");
        std::fs::create_dir_all(&real).unwrap();
        std::fs::write(real.join("c.wasm"), b"abc").unwrap();
        std::os::unix::fs::symlink(&real, outer.path().join("via")).unwrap();
        let canon = real.canonicalize().unwrap().join("c.wasm");
        let meta = std::fs::metadata(&canon).unwrap();
        let dotted = PathBuf::from(format!("{}/./", real.display()));
        for dir in [
            outer.path().join("via"),
            real.clone(),
            real.join("../real"),
            dotted,
        ] {
            let f = confine(&dir, "c.wasm").unwrap();
            assert_eq!(f.path.as_os_str(), canon.as_os_str(), "from {dir:?}");
            assert_eq!(f.stamp, FileStamp::of(&meta));
            assert_eq!(f.stamp.bytes(), 3);
        }
    }

    proptest! {
        /// Whatever path a process gives, what comes back is inside its folder.
        #[test]
        fn never_outside(rel in "[a-z./]{0,24}") {
            let outer = tempfile::tempdir().unwrap();
            let dir = outer.path().join("pkg");
            std::fs::create_dir_all(dir.join("a")).unwrap();
            std::fs::write(dir.join("a/b"), b"x").unwrap();
            std::fs::write(outer.path().join("b"), b"x").unwrap();
            if let Ok(f) = confine(&dir, &rel) {
                let p = f.path;
                prop_assert!(p.starts_with(dir.canonicalize().unwrap()), "{rel:?} → {p:?}");
            }
        }
    }
}
