//! Reading a child's output pipe into a line sink.

use spindle_logs::LineSink;
use std::cell::RefCell;
use std::io;
use std::os::fd::OwnedFd;
use tokio::net::unix::pipe;

/// Bytes read per `read` call. One buffer serves every pipe (the daemon's
/// control thread reads them one at a time), so per-process memory stays at
/// the unfinished line only.
pub const READ_CHUNK: usize = 256 * 1024;
/// Reads made per wake-up before yielding to other tasks: a flooding process
/// cannot starve the control loop.
const READS_PER_WAKE: usize = 16;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; READ_CHUNK]);
}

/// Copies everything from `fd` into `sink` until end of file, then completes
/// a last unfinished line. Write errors (a full disk) are reported once per
/// stream and counted; reading goes on so the child never blocks on a full pipe.
pub async fn capture(fd: OwnedFd, mut sink: LineSink, label: String) {
    let rx = match pipe::Receiver::from_owned_fd(fd) {
        Ok(rx) => rx,
        Err(e) => {
            tracing::error!("{label}: cannot read output pipe: {e}");
            return;
        }
    };
    let mut reported = false;
    let mut report = |e: io::Error, sink: &LineSink| {
        if !reported {
            tracing::error!(
                "{label}: writing {} failed: {e}; output is dropped until writing works again",
                sink.file().path().display()
            );
            reported = true;
        }
    };
    loop {
        if rx.readable().await.is_err() {
            break;
        }
        let mut eof = false;
        let mut drained = false;
        SCRATCH.with_borrow_mut(|buf| {
            for _ in 0..READS_PER_WAKE {
                match rx.try_read(buf) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => {
                        if let Err(e) = sink.feed(&buf[..n]) {
                            report(e, &sink);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        drained = true;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        eof = true;
                        break;
                    }
                }
            }
        });
        if eof {
            break;
        }
        if !drained {
            tokio::task::yield_now().await;
        }
    }
    if let Err(e) = sink.finish() {
        report(e, &sink);
    }
    if sink.lost_bytes > 0 {
        tracing::error!(
            "{label}: {} bytes of output could not be written",
            sink.lost_bytes
        );
    }
}
