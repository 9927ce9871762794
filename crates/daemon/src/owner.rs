//! An owned node: the daemon of an app that embeds Spindle lives only as
//! long as the app (`spindle daemon run --owner <pid>`).
//!
//! The app is watched through a pidfd, which names that process and no
//! later one that reuses its pid, and becomes readable when it ends — by
//! exit, an uncaught exception, a signal, SIGKILL, a crash. Then the daemon
//! stops every process as `daemon stop` does (the stop request or signal,
//! then after its grace the whole tree is SIGKILLed) and exits.
//!
//! An owned node starts empty: what the previous run of the app left
//! behind is killed (as every daemon kills leftovers), and nothing of its
//! table is started again — the app starts its services itself, so a
//! restored set would be a second one.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use tokio::io::unix::AsyncFd;

/// The app that owns this node.
pub struct Owner {
    pub pid: u32,
    fd: AsyncFd<OwnedFd>,
}

impl Owner {
    /// Starts watching `pid`; an error if it is not running (then there is
    /// nobody to serve).
    pub fn watch(pid: u32) -> io::Result<Owner> {
        let raw = i32::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the fd was just returned to us and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: the OwnedFd is moved into the AsyncFd, which keeps it
        // open, and always the same descriptor, for its whole life.
        let fd = unsafe {
            AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
                .map_err(io::Error::from)?
        };
        Ok(Owner { pid, fd })
    }

    /// Resolves once the owner has ended.
    pub async fn gone(&self) {
        // A pidfd polls readable once its process has exited, and stays so
        // (an error of the watch ends the node too: it cannot tell).
        let _ = self.fd.readable().await;
    }
}
