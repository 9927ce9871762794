//! The daemon's end of a channel, read and written without waking the
//! daemon for nothing.
//!
//! A socket registered with the reactor for both directions gets a
//! write-space event every time the process reads what was written to it:
//! on a request/response round trip that is one extra wakeup of the daemon
//! (a cross-CPU interrupt and a context switch) per message. So the read
//! side is registered for readability only, and writes go straight to the
//! non-blocking socket; only a write that finds the socket full registers
//! (a duplicate of the descriptor) for writability, until it is done.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, Interest, ReadBuf};

/// Pieces one `writev` takes (a frame, a blob, and room to spare).
const MAX_PARTS: usize = 4;

/// The reading half: readable interest only.
pub(crate) struct ChannelReader(AsyncFd<Arc<UnixStream>>);

/// The writing half.
pub(crate) struct ChannelWriter(Arc<UnixStream>);

/// Splits a non-blocking socket into its halves. Must run inside the runtime.
pub(crate) fn split(stream: UnixStream) -> io::Result<(ChannelReader, ChannelWriter)> {
    stream.set_nonblocking(true)?;
    let stream = Arc::new(stream);
    let reader = register(stream.clone(), Interest::READABLE)?;
    Ok((ChannelReader(reader), ChannelWriter(stream)))
}

impl AsyncRead for ChannelReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|s| s.get_ref().as_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Not readable after all: readiness is cleared, wait again.
                Err(_) => continue,
            }
        }
    }
}

impl ChannelWriter {
    /// Writes all of `parts`, in order, as few system calls as it takes.
    pub(crate) async fn write_all(&self, parts: &mut [&[u8]]) -> io::Result<()> {
        let mut parts: &mut [&[u8]] = parts;
        // Registered for writability only while the socket is full.
        let mut waiter: Option<AsyncFd<UnixStream>> = None;
        while !parts.is_empty() {
            let n = parts.len().min(MAX_PARTS);
            let slices: [io::IoSlice<'_>; MAX_PARTS] =
                std::array::from_fn(|i| io::IoSlice::new(parts.get(i).copied().unwrap_or(&[])));
            match self.0.as_ref().write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => advance(&mut parts, n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let w = match &waiter {
                        Some(w) => w,
                        None => waiter.insert(register(self.0.try_clone()?, Interest::WRITABLE)?),
                    };
                    w.writable().await?.clear_ready();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Registers a socket it owns with the reactor.
fn register<T: AsRawFd>(socket: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: `socket` owns its descriptor (a `UnixStream`, or an `Arc` of
    // one, which keeps it open), and a `UnixStream`'s descriptor never
    // changes; the `AsyncFd` owns `socket` until it is dropped.
    Ok(unsafe { AsyncFd::register_with_interest(socket, interest) }?)
}

/// Drops the first `n` bytes written from `parts`.
fn advance(parts: &mut &mut [&[u8]], mut n: usize) {
    while let Some(first) = parts.first_mut() {
        if n < first.len() {
            *first = &first[n..];
            return;
        }
        n -= first.len();
        let rest = std::mem::take(parts);
        *parts = &mut rest[1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_drops_what_was_written_across_parts() {
        let (a, b, c) = (&b"frame\n"[..], &b"blob"[..], &b""[..]);
        let mut all = [a, b, c];
        let mut parts: &mut [&[u8]] = &mut all;
        advance(&mut parts, 3);
        assert_eq!(parts, [&b"me\n"[..], b"blob", b""]);
        advance(&mut parts, 4);
        assert_eq!(parts, [&b"lob"[..], b""]);
        advance(&mut parts, 3);
        // An empty part left at the end is dropped with the rest.
        assert!(parts.iter().all(|p| p.is_empty()));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_write_larger_than_the_socket_waits_for_room_and_arrives_whole() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (_reader, writer) = split(ours).unwrap();
        let big: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
        let expected = big.clone();
        let drain = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut theirs = theirs;
            theirs.read_to_end(&mut got).unwrap();
            got
        });
        writer.write_all(&mut [b"head\n", &big]).await.unwrap();
        drop(writer);
        drop(_reader);
        let got = drain.join().unwrap();
        assert_eq!(&got[..5], b"head\n");
        assert!(got[5..] == expected[..], "the blob arrives intact");
    }
}
