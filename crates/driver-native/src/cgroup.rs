//! Process-tree membership from cgroup v2, where a writable hierarchy exists.
//!
//! Each run gets its own cgroup, `<daemon's cgroup>/spindle-<node tag>/p<id>-r<run>`,
//! and the child moves itself into it before exec. Nothing can leave a cgroup
//! by forking, changing session or clearing its environment, so the cgroup's
//! members are exactly the run's processes: the `/proc` heuristics remain as a
//! second net (and the only one where no cgroup is available). Killing uses
//! `cgroup.kill` (Linux 5.14+) or SIGKILL to every member. Only membership is
//! used: no controllers need to be enabled, so this also works on hybrid
//! hierarchies. Emptied cgroups are removed; ones that are still draining are
//! retried later.

use std::ffi::CString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The node's cgroup directory, if cgroup v2 is mounted and writable here.
#[derive(Debug, Clone)]
pub struct Cgroups {
    root: PathBuf,
}

/// Where the cgroup2 hierarchy is mounted, from `/proc/self/mountinfo`.
fn cgroup2_mount() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        pre.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// This process's own cgroup path within the v2 hierarchy.
fn own_cgroup() -> Option<String> {
    let text = fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

impl Cgroups {
    /// Sets up the node's cgroup directory, or says why it cannot.
    pub fn detect(node_tag: &str) -> Result<Cgroups, String> {
        let mount = cgroup2_mount().ok_or("no cgroup2 hierarchy is mounted")?;
        let own = own_cgroup().ok_or("this process has no cgroup v2 path")?;
        let base = mount.join(own.trim_start_matches('/'));
        let root = base.join(format!("spindle-{node_tag}"));
        fs::create_dir_all(&root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
        // Probe: can a child cgroup be made and removed here?
        let probe = root.join("probe");
        fs::create_dir(&probe)
            .and_then(|_| fs::remove_dir(&probe))
            .map_err(|e| format!("cannot manage cgroups under {}: {e}", root.display()))?;
        Ok(Cgroups { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the cgroup for one run; returns the `cgroup.procs` path the
    /// child writes itself into.
    pub fn create(&self, num: u64, run: u64) -> io::Result<(PathBuf, CString)> {
        let dir = self.root.join(format!("p{num}-r{run}"));
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_encoded_bytes())
            .map_err(io::Error::other)?;
        Ok((dir, procs))
    }

    /// Every cgroup under the node's directory (runs of this or an earlier daemon).
    pub fn all(&self) -> Vec<PathBuf> {
        fs::read_dir(&self.root)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Pids in the cgroup `dir` and any cgroups below it.
pub fn members(dir: &Path) -> Vec<i32> {
    let mut out: Vec<i32> = fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                out.extend(members(&e.path()));
            }
        }
    }
    out
}

/// SIGKILLs everything in the cgroup: `cgroup.kill` where the kernel has it,
/// else each member.
pub fn kill(dir: &Path) {
    if fs::write(dir.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    for pid in members(dir) {
        // SAFETY: sending a signal has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Removes an emptied cgroup (and emptied children); false while it still
/// has members.
pub fn remove(dir: &Path) -> bool {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                remove(&e.path());
            }
        }
    }
    match fs::remove_dir(dir) {
        Ok(()) => true,
        Err(e) => e.kind() == io::ErrorKind::NotFound,
    }
}

/// Called in the forked child before exec: move this process into the cgroup
/// whose `cgroup.procs` path is `procs`. Only async-signal-safe calls.
pub fn join_in_child(procs: &CString) -> io::Result<()> {
    // SAFETY: open/write/close on a valid C string path and a static buffer.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = libc::write(fd, b"0".as_ptr().cast(), 1);
        libc::close(fd);
        if n != 1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
