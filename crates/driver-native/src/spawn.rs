//! Starting a child: resolve, prepare, fork, exec.

use spindle_types::Program;
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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

/// Forks and execs `exe` as described by `program`, with `env` added to the
/// daemon's environment.
pub fn start(
    exe: &Path,
    program: &Program,
    env: impl IntoIterator<Item = (String, String)>,
    cgroup_procs: Option<std::ffi::CString>,
) -> Result<Child, SpawnError> {
    let Program::Native { command, args, cwd } = program else {
        return Err(SpawnError::NotNative(exe.to_path_buf()));
    };
    let mut cmd = Command::new(exe);
    cmd.arg0(command)
        .args(args)
        .current_dir(cwd)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe calls (setsid, prctl, getppid, rt_sigaction,
    // sigprocmask, open/write/close).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The daemon died between fork and prctl: do not outlive it.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("daemon exited during spawn"));
            }
            if let Some(procs) = &cgroup_procs {
                // Best effort: without the cgroup the /proc heuristics still apply.
                let _ = crate::cgroup::join_in_child(procs);
            }
            // Raw rt_sigaction: glibc's wrappers refuse the signals it reserves
            // (32, 33), which a parent may still have ignored. Layout of the
            // kernel's struct: handler, flags, restorer, mask.
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
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| SpawnError::Exec {
        path: exe.to_path_buf(),
        source,
    })?;
    let pid = child.id() as i32;
    let stdout = child.stdout.take().expect("piped").into();
    let stderr = child.stderr.take().expect("piped").into();
    // The handle is dropped without waiting: the driver's reaper collects it.
    drop(child);
    Ok(Child {
        pid,
        stdout,
        stderr,
    })
}
