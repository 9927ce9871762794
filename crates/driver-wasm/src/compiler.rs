//! Where a component is compiled.
//!
//! Compiling is the one step of a wasm process that costs the node before
//! any budget of the process applies, and what it costs is up to the
//! component's author: cranelift's working set grows with the component
//! (tens of MiB for small ones), its code is several MiB more, and the
//! allocator keeps most of what it freed. A daemon therefore compiles in a
//! helper: its own binary, run for one compile ([`Compiler::Helper`]). None
//! of the compiler's memory stays in the daemon, and a hostile component's
//! compile is bounded by the helper's budgets ([`COMPILE_CPU_SECONDS`],
//! [`COMPILE_ADDRESS_SPACE`]; the kernel's OOM killer picks the helper
//! first). It ends as that component's error, never the daemon's.
//! Embedders and tests may compile in their own threads
//! ([`Compiler::InProcess`]).
//!
//! The helper reads the component on stdin and says how it went in one line
//! on stdout: `ok` followed by the artifact, `invalid <why>` (the
//! component's fault) or `failed <why>`. The daemon keeps the artifact in
//! its cache (or, when that cannot be written, runs it from memory), and
//! learns of a killed helper from the missing line. The exit status is only
//! a detail of the message, because the native driver reaps every child of
//! the daemon that ends and may have collected it first.

use crate::runtime::{MAX_COMPONENT_BYTES, WasmError, engine_config, quiet};
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

/// CPU time a helper may use for one compile (all its threads together):
/// compiling a large real component (tens of MiB, such as an interpreter)
/// takes well under a minute here. At the limit the kernel stops it.
pub const COMPILE_CPU_SECONDS: u64 = 300;
/// Address space a helper may map for one compile. Cranelift needs tens of
/// MiB for a small component and a few GiB for the largest allowed
/// ([`MAX_COMPONENT_BYTES`]); an allocation past this fails and the helper
/// ends, not the daemon.
pub const COMPILE_ADDRESS_SPACE: u64 = 8 << 30;
/// Threads a helper compiles with, at most (one a core below that): each
/// takes an allocator arena's and a stack's address space from
/// [`COMPILE_ADDRESS_SPACE`], and more than a few gain a compile little.
pub const COMPILE_THREADS: usize = 4;
/// Allocator arenas a helper may have: its threads share them rather than
/// each reserving 64 MiB of address space.
const COMPILE_ARENAS: &str = "2";
/// The helper's name in `ps` and `top`.
const HELPER_NAME: &std::ffi::CStr = c"spindle-compile";
/// Longest result line read from a helper.
const RESULT_BYTES: u64 = 4096;
/// Largest artifact a helper may hand back: a compiled component is a few
/// times its size ([`MAX_COMPONENT_BYTES`]), a pathological one (a million
/// empty functions in 4 MB) about fifty.
pub const MAX_ARTIFACT_BYTES: u64 = 1 << 30;
/// The helper's verdicts.
const OK: &str = "ok";
const INVALID: &str = "invalid ";
const FAILED: &str = "failed ";

/// Where the node compiles components.
#[derive(Debug, Clone)]
pub enum Compiler {
    /// In the daemon's own (blocking) threads.
    InProcess,
    /// `program args… --parent PID`, which must run [`helper_main`].
    Helper {
        program: PathBuf,
        args: Vec<OsString>,
    },
}

impl Compiler {
    /// The running binary (the very file it was started from, even if
    /// replaced since, so the artifact always fits this engine) with `args`
    /// that lead to [`helper_main`].
    pub fn this_binary(args: &[&str]) -> Compiler {
        Compiler::Helper {
            program: "/proc/self/exe".into(),
            args: args.iter().map(OsString::from).collect(),
        }
    }
}

/// How one compile in a helper ended, from its result line and, if known,
/// its exit status.
fn verdict(path: &Path, said: &str, ended: Option<Ended>) -> Result<(), WasmError> {
    let line = said.lines().next().unwrap_or("").trim_end();
    if line == OK {
        return Ok(());
    }
    if let Some(why) = line.strip_prefix(INVALID) {
        return Err(WasmError::Invalid {
            path: path.into(),
            message: why.into(),
        });
    }
    let message = match (line.strip_prefix(FAILED), ended) {
        (Some(why), _) => why.to_string(),
        (None, Some(Ended::Signal(sig))) => {
            format!("the compiler was stopped by signal {sig}{}", budget_note())
        }
        (None, Some(Ended::Code(code))) => {
            format!(
                "the compiler exited with code {code} and no result{}",
                budget_note()
            )
        }
        (None, None) => format!("the compiler ended with no result{}", budget_note()),
    };
    Err(WasmError::Compiler {
        path: path.into(),
        message,
    })
}

fn budget_note() -> String {
    format!(
        " (its budget: {COMPILE_CPU_SECONDS} s of CPU, {} GiB of memory; a component that needs more is too large to run here)",
        COMPILE_ADDRESS_SPACE >> 30
    )
}

/// How a helper ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Code(i32),
    Signal(i32),
}

/// Compiles `bytes` (the component at `path`) in a helper; returns the
/// artifact.
pub(crate) fn in_helper(
    program: &Path,
    args: &[OsString],
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<u8>, WasmError> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(COMPILE_THREADS);
    let mut child = Command::new(program)
        .arg0(std::ffi::OsStr::from_bytes(HELPER_NAME.to_bytes()))
        .args(args)
        .arg("--parent")
        .arg(std::process::id().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .env("RAYON_NUM_THREADS", threads.to_string())
        .env("MALLOC_ARENA_MAX", COMPILE_ARENAS)
        .spawn()
        .map_err(|e| WasmError::Compiler {
            path: path.into(),
            message: format!(
                "cannot start the compiler ({} {}, this very binary): {e}",
                program.display(),
                args.iter()
                    .map(|a| a.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        })?;
    // Taken before the helper can end: it first waits for its input.
    let handle = pidfd_open(child.id());
    if let Some(mut input) = child.stdin.take() {
        // A helper that ended early has its say below.
        let _ = input.write_all(bytes);
    }
    let mut said = Vec::new();
    let mut artifact = Vec::new();
    if let Some(output) = child.stdout.take() {
        let mut output = std::io::BufReader::new(output);
        let _ =
            std::io::BufRead::read_until(&mut (&mut output).take(RESULT_BYTES), b'\n', &mut said);
        if said == format!("{OK}\n").as_bytes() {
            let _ = output
                .take(MAX_ARTIFACT_BYTES + 1)
                .read_to_end(&mut artifact);
        }
    }
    let ended = handle.and_then(|h| wait_pidfd(&h));
    verdict(path, &String::from_utf8_lossy(&said), ended)?;
    if artifact.len() as u64 > MAX_ARTIFACT_BYTES {
        return Err(WasmError::Invalid {
            path: path.into(),
            message: format!(
                "its compiled form is larger than a component's may be ({MAX_ARTIFACT_BYTES} bytes)"
            ),
        });
    }
    // A helper that ended with its artifact half-said is not `ok`.
    match ended {
        Some(Ended::Code(0)) | None => Ok(artifact),
        Some(_) => verdict(path, "", ended).map(|()| artifact),
    }
}

/// A handle on the child `pid` that stays its own even once reaped.
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: a plain system call; a non-negative result is a new descriptor
    // this process owns.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: just opened, owned by nobody else.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `waitid`'s id type for a pidfd (Linux 5.4), which the libc crate does
/// not name.
const P_PIDFD: libc::idtype_t = 3;

/// Waits for the child behind `handle` and reaps it; None if another
/// reaper came first (or the kernel is too old to wait on a pidfd).
fn wait_pidfd(handle: &OwnedFd) -> Option<Ended> {
    // SAFETY: siginfo_t is plain data; waitid fills it for this one child.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        if libc::waitid(
            P_PIDFD,
            handle.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED,
        ) != 0
        {
            return None;
        }
        let status = info.si_status();
        match info.si_code {
            libc::CLD_EXITED => Some(Ended::Code(status)),
            libc::CLD_KILLED | libc::CLD_DUMPED => Some(Ended::Signal(status)),
            _ => None,
        }
    }
}

/// The helper's whole life: takes its budgets, reads a component on stdin,
/// and prints its verdict (and, if `ok`, the artifact) on stdout. `parent`
/// is the daemon that started it: the helper never outlives it.
pub fn helper_main(parent: u32) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    let said = match compile_here(parent) {
        Ok(artifact) => writeln!(stdout, "{OK}")
            .and_then(|()| stdout.write_all(&artifact))
            .and_then(|()| stdout.flush()),
        Err(e) => {
            let line = match e {
                HelperError::Invalid(why) => format!("{INVALID}{why}"),
                HelperError::Failed(why) => format!("{FAILED}{why}"),
            };
            // One line, whatever the compiler said.
            let _ = writeln!(stdout, "{}", line.replace('\n', " "));
            return ExitCode::FAILURE;
        }
    };
    match said {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

enum HelperError {
    Invalid(String),
    Failed(String),
}

fn compile_here(parent: u32) -> Result<Vec<u8>, HelperError> {
    take_budgets(parent)
        .map_err(|e| HelperError::Failed(format!("cannot take its budgets: {e}")))?;
    let mut bytes = Vec::new();
    std::io::stdin()
        .take(MAX_COMPONENT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| HelperError::Failed(format!("cannot read the component: {e}")))?;
    if bytes.len() as u64 > MAX_COMPONENT_BYTES {
        return Err(HelperError::Invalid(format!(
            "larger than a component may be ({MAX_COMPONENT_BYTES} bytes)"
        )));
    }
    let engine = wasmtime::Engine::new(&engine_config(None))
        .map_err(|e| HelperError::Failed(format!("no engine: {e}")))?;
    engine
        .precompile_component(&bytes)
        .map_err(|e| HelperError::Invalid(quiet(&e.root_cause().to_string())))
}

/// Dies with `parent`, and holds to the compile's budgets.
fn take_budgets(parent: u32) -> std::io::Result<()> {
    let check = |r: libc::c_int| {
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // Never above what the helper was already held to: raising a hard
    // limit is not allowed, and would not be a budget.
    let limit = |resource, soft: u64, hard: u64| {
        let mut now = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: a plain system call filling the struct.
        check(unsafe { libc::getrlimit(resource, &mut now) })?;
        let lim = libc::rlimit {
            rlim_cur: soft.min(now.rlim_max),
            rlim_max: hard.min(now.rlim_max),
        };
        // SAFETY: a plain system call on a filled struct.
        check(unsafe { libc::setrlimit(resource, &lim) })
    };
    // SAFETY: plain system calls.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) })?;
    // SAFETY: a NUL-terminated name of at most 16 bytes.
    let _ = unsafe { libc::prctl(libc::PR_SET_NAME, HELPER_NAME.as_ptr()) };
    // The daemon died before the line above took effect: do not outlive it.
    // SAFETY: as above.
    if unsafe { libc::getppid() } as u32 != parent {
        return Err(std::io::Error::other("the daemon that started it is gone"));
    }
    // SIGXCPU at the limit, SIGKILL a second later.
    limit(
        libc::RLIMIT_CPU,
        COMPILE_CPU_SECONDS,
        COMPILE_CPU_SECONDS + 1,
    )?;
    limit(
        libc::RLIMIT_AS,
        COMPILE_ADDRESS_SPACE,
        COMPILE_ADDRESS_SPACE,
    )?;
    limit(libc::RLIMIT_CORE, 0, 0)?;
    // Out of memory, the kernel ends the helper rather than anyone else
    // (best effort: the file may be read-only in a container).
    let _ = std::fs::write("/proc/self/oom_score_adj", "1000");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_helpers_line_is_its_verdict_and_a_missing_line_says_why() {
        let p = Path::new("/x/app.wasm");
        assert!(verdict(p, "ok\n", Some(Ended::Code(0))).is_ok());
        // The line decides, even when the status was collected elsewhere.
        assert!(verdict(p, "ok\n", None).is_ok());
        match verdict(p, "invalid bad section\n", Some(Ended::Code(1))) {
            Err(WasmError::Invalid { message, .. }) => assert_eq!(message, "bad section"),
            other => panic!("{other:?}"),
        }
        match verdict(p, "failed cannot write\n", None) {
            Err(WasmError::Compiler { message, .. }) => assert_eq!(message, "cannot write"),
            other => panic!("{other:?}"),
        }
        let killed = verdict(p, "", Some(Ended::Signal(libc::SIGKILL))).unwrap_err();
        let text = killed.to_string();
        assert!(
            text.contains("/x/app.wasm") && text.contains("signal 9"),
            "{text}"
        );
        assert!(text.contains("300 s of CPU"), "{text}");
        let gone = verdict(p, "garbage", None).unwrap_err().to_string();
        assert!(gone.contains("no result"), "{gone}");
    }

    /// A helper is any program that keeps the protocol: these stand-ins show
    /// what the daemon does with each way one can end.
    #[test]
    fn a_helper_that_is_killed_or_fails_is_the_components_error() {
        let p = Path::new("/x/app.wasm");
        let sh = |script: &str| {
            in_helper(
                Path::new("/bin/sh"),
                &["-c".into(), script.into(), "helper".into()],
                p,
                b"\0asm....",
            )
        };
        match sh("cat >/dev/null; kill -9 $$") {
            Err(WasmError::Compiler { message, .. }) => {
                assert!(message.contains("signal 9"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        match sh("cat >/dev/null; echo 'invalid not a component'; exit 1") {
            Err(WasmError::Invalid { message, .. }) => assert_eq!(message, "not a component"),
            other => panic!("{other:?}"),
        }
        // One that never reads its input, and says nothing.
        match sh("exit 3") {
            Err(WasmError::Compiler { message, .. }) => {
                assert!(message.contains("code 3"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        // It is told who its daemon is, and what follows `ok` is the
        // artifact, all of it.
        let said = sh("cat >/dev/null; [ \"$2\" = \"$PPID\" ] && printf 'ok\\nART\\nIFACT'");
        assert_eq!(said.unwrap(), b"ART\nIFACT");
        // Killed halfway through its artifact: not a result.
        match sh("cat >/dev/null; printf 'ok\\npart'; kill -9 $$") {
            Err(WasmError::Compiler { message, .. }) => {
                assert!(message.contains("signal 9"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            in_helper(Path::new("/nonexistent/helper"), &[], p, b""),
            Err(WasmError::Compiler { .. })
        ));
    }
}
