//! Starting a child: resolve, prepare, clone (sharing memory until exec), exec.

use spindle_types::Program;
use std::collections::BTreeMap;
use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

/// Why a process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("executable `{command}` not found in PATH ({path}): install it, or give its full path")]
    NotFound { command: String, path: String },
    #[error("executable `{0}` does not exist: check the path")]
    Missing(PathBuf),
    #[error("`{0}` is not an executable file: check the path, or run `chmod +x` on it")]
    NotExecutable(PathBuf),
    #[error("working directory `{path}` cannot be used: {source}")]
    Cwd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("log file `{path}` cannot be opened: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{0}` is a wasm component, not an executable")]
    NotNative(PathBuf),
    #[error("`{path}` could not be started: {source}")]
    Exec {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Finds the file `command` names: a path (anything with a `/`) as it is, a
/// bare name through `PATH` — the process's own `PATH` when its spec sets one.
pub fn resolve(command: &str, cwd: &Path, path_var: Option<&str>) -> Result<PathBuf, SpawnError> {
    use std::os::unix::fs::PermissionsExt;
    if command.contains('/') {
        let p = cwd.join(command);
        let meta = std::fs::metadata(&p).map_err(|_| SpawnError::Missing(p.clone()))?;
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            return Err(SpawnError::NotExecutable(p));
        }
        return Ok(p);
    }
    let path: OsString = match path_var {
        Some(p) => p.into(),
        None => std::env::var_os("PATH").unwrap_or_default(),
    };
    which::which_in(command, Some(&path), cwd).map_err(|_| SpawnError::NotFound {
        command: command.into(),
        path: path.to_string_lossy().into_owned(),
    })
}

/// Checks that `program` can be started: the executable resolves and the
/// working directory is a directory.
pub fn preflight(program: &Program, env_path: Option<&str>) -> Result<PathBuf, SpawnError> {
    match program {
        Program::Native { command, cwd, .. } => {
            match std::fs::metadata(cwd) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(SpawnError::Cwd {
                        path: cwd.clone(),
                        source: std::io::Error::other("not a directory"),
                    });
                }
                Err(source) => {
                    return Err(SpawnError::Cwd {
                        path: cwd.clone(),
                        source,
                    });
                }
            }
            resolve(command, cwd, env_path)
        }
        Program::Wasm { path, .. } => Err(SpawnError::NotNative(path.clone())),
    }
}

/// A started child: its pid and the read ends of its output pipes.
#[derive(Debug)]
pub struct Child {
    pub pid: i32,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// Stack for the child between `clone` and `execve`: it only makes system
/// calls, so a small one is plenty.
const CHILD_STACK: usize = 64 * 1024;

/// The step at which a child failed before its program ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
enum Step {
    None = 0,
    Session = 1,
    ParentGone = 2,
    Stdio = 3,
    Cwd = 4,
    Exec = 5,
}

/// Everything the child needs, prepared by the parent. The child shares the
/// parent's memory until it execs, so it only reads this and makes system
/// calls: no allocation, no locks, no panics.
struct Plan {
    exe: CString,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    cwd: CString,
    cgroup_procs: Option<CString>,
    parent: libc::pid_t,
    /// Child's stdin, stdout, stderr and (if not -1) fd 3, the IPC channel
    /// (parent-side descriptors, close-on-exec).
    stdio: [RawFd; 4],
    /// Written by the child when it fails: the step and the errno.
    failed: AtomicI32,
    errno: AtomicI32,
}

fn cstring(s: impl Into<Vec<u8>>, what: &str) -> Result<CString, std::io::Error> {
    CString::new(s).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        )
    })
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Starts `exe` as described by `program`, with `env` added to the daemon's
/// environment.
///
/// The child is created with `clone(CLONE_VM | CLONE_VFORK)`, as
/// `posix_spawn` does: it borrows the daemon's memory until it execs instead
/// of copying the daemon's page tables. That copy is what makes `fork` slow
/// in a daemon whose address space holds the wasm instance pool (hundreds of
/// milliseconds with thousands of wasm processes). Everything the child needs
/// is prepared here first; all signals are blocked around the clone so that
/// no handler of the daemon runs on the child's borrowed memory.
pub fn start(
    exe: &Path,
    program: &Program,
    env: impl IntoIterator<Item = (String, String)>,
    cgroup_procs: Option<CString>,
    channel: Option<&OwnedFd>,
) -> Result<Child, SpawnError> {
    let Program::Native {
        command, args, cwd, ..
    } = program
    else {
        return Err(SpawnError::NotNative(exe.to_path_buf()));
    };
    let exec_err = |source| SpawnError::Exec {
        path: exe.to_path_buf(),
        source,
    };
    let exe_c = cstring(exe.as_os_str().as_bytes(), "the executable path").map_err(exec_err)?;
    let argv_c = std::iter::once(command.as_str())
        .chain(args.iter().map(String::as_str))
        .map(|a| cstring(a, "an argument"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(exec_err)?;
    let mut vars: BTreeMap<OsString, OsString> = std::env::vars_os().collect();
    vars.extend(env.into_iter().map(|(k, v)| (k.into(), v.into())));
    let envp_c = vars
        .into_iter()
        .map(|(k, v)| {
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend(v.into_vec());
            cstring(kv, "an environment variable")
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(exec_err)?;
    let cwd_c = cstring(cwd.as_os_str().as_bytes(), "the working directory").map_err(|source| {
        SpawnError::Cwd {
            path: cwd.clone(),
            source,
        }
    })?;
    let null = std::fs::File::open("/dev/null").map_err(exec_err)?;
    let (out_r, out_w) = pipe().map_err(exec_err)?;
    let (err_r, err_w) = pipe().map_err(exec_err)?;

    let nul_terminated = |v: &[CString]| {
        v.iter()
            .map(|c| c.as_ptr())
            .chain([std::ptr::null()])
            .collect::<Vec<_>>()
    };
    let plan = Plan {
        argv: nul_terminated(&argv_c),
        envp: nul_terminated(&envp_c),
        exe: exe_c,
        cwd: cwd_c,
        cgroup_procs,
        parent: std::process::id() as libc::pid_t,
        stdio: [
            null.as_raw_fd(),
            out_w.as_raw_fd(),
            err_w.as_raw_fd(),
            channel.map_or(-1, |c| c.as_raw_fd()),
        ],
        failed: AtomicI32::new(Step::None as i32),
        errno: AtomicI32::new(0),
    };
    let mut stack = vec![std::mem::MaybeUninit::<u8>::uninit(); CHILD_STACK];
    // Stacks grow down; the top must be 16-byte aligned.
    let top = (stack.as_mut_ptr() as usize + CHILD_STACK) & !15;

    let all: u64 = !0;
    let mut saved: u64 = 0;
    // SAFETY: raw rt_sigprocmask with 8-byte masks (the kernel's sigset size),
    // then clone with a private stack; the parent thread is suspended until the
    // child execs or exits (CLONE_VFORK), so `plan` and `stack` outlive its use
    // of them. Blocking every signal, glibc's reserved ones included, keeps
    // the daemon's handlers from running in the child.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &all as *const u64,
            &mut saved as *mut u64,
            8usize,
        );
        let pid = libc::clone(
            child_main,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &plan as *const Plan as *mut libc::c_void,
        );
        let clone_errno = std::io::Error::last_os_error();
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &saved as *const u64,
            std::ptr::null_mut::<u64>(),
            8usize,
        );
        if pid < 0 {
            return Err(exec_err(clone_errno));
        }
        pid
    };
    drop(stack);
    let failed = plan.failed.load(Ordering::Acquire);
    if failed != Step::None as i32 {
        // The child has exited (127): collect it here, it never ran.
        // SAFETY: waitpid on our own child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        let source = std::io::Error::from_raw_os_error(plan.errno.load(Ordering::Acquire));
        return Err(match failed {
            x if x == Step::Cwd as i32 => SpawnError::Cwd {
                path: cwd.clone(),
                source,
            },
            x if x == Step::ParentGone as i32 => {
                exec_err(std::io::Error::other("the daemon exited during the spawn"))
            }
            _ => exec_err(source),
        });
    }
    Ok(Child {
        pid,
        stdout: out_r,
        stderr: err_r,
    })
}

/// The child between `clone` and `execve`. Runs on borrowed memory with every
/// signal blocked: only system calls on the prepared [`Plan`].
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's `Plan`, alive while the parent is suspended.
    let plan = unsafe { &*(arg as *const Plan) };
    let fail = |step: Step| -> libc::c_int {
        // SAFETY: errno of this (borrowed) thread; _exit skips all cleanup.
        unsafe {
            plan.errno
                .store(*libc::__errno_location(), Ordering::Release);
            plan.failed.store(step as i32, Ordering::Release);
            libc::_exit(127)
        }
    };
    // SAFETY: plain system calls on descriptors and C strings the plan owns.
    unsafe {
        if libc::setsid() < 0 {
            return fail(Step::Session);
        }
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
            return fail(Step::Session);
        }
        // The daemon died before prctl took effect: do not outlive it.
        if libc::getppid() != plan.parent {
            return fail(Step::ParentGone);
        }
        if let Some(procs) = &plan.cgroup_procs {
            // Best effort: without the cgroup the /proc heuristics still apply.
            let _ = crate::cgroup::join_in_child(procs);
        }
        for (target, &fd) in plan.stdio.iter().enumerate() {
            let target = target as RawFd;
            let ok = if fd < 0 {
                true
            } else if fd == target {
                // Already in place: just let it survive exec.
                libc::fcntl(fd, libc::F_SETFD, 0) == 0
            } else {
                libc::dup2(fd, target) == target
            };
            if !ok {
                return fail(Step::Stdio);
            }
        }
        if libc::chdir(plan.cwd.as_ptr()) < 0 {
            return fail(Step::Cwd);
        }
        // Default dispositions for every signal, with raw rt_sigaction: glibc's
        // wrappers refuse the signals it reserves (32, 33), which a parent may
        // still have ignored. The kernel's struct: handler, flags, restorer, mask.
        let default_action: [libc::c_ulong; 4] = [libc::SIG_DFL as libc::c_ulong, 0, 0, 0];
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    default_action.as_ptr(),
                    std::ptr::null_mut::<libc::c_void>(),
                    8usize,
                );
            }
        }
        let none: u64 = 0;
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &none as *const u64,
            std::ptr::null_mut::<u64>(),
            8usize,
        );
        libc::execve(plan.exe.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr());
        fail(Step::Exec)
    }
}
