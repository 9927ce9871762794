//! A process's log tap: written lines, for followers (`logs --follow`).
//! The channel is made when the first follower comes, so a process nobody
//! follows costs a pointer, not a channel's slots.

use crate::LogChunk;
use std::sync::{Arc, OnceLock};
use tokio::sync::broadcast;

/// Chunks of log lines a follower may fall behind before it is told it
/// missed some.
pub const TAP_CAPACITY: usize = 1024;

/// See the module docs. Clones share one tap.
#[derive(Debug, Clone, Default)]
pub struct LogTap(Arc<OnceLock<broadcast::Sender<LogChunk>>>);

impl LogTap {
    /// A follower's end (the channel is made now if it is the first).
    pub fn subscribe(&self) -> broadcast::Receiver<LogChunk> {
        self.0
            .get_or_init(|| broadcast::channel(TAP_CAPACITY).0)
            .subscribe()
    }

    /// Hands `chunk` to the followers, if there are any.
    pub fn send(&self, chunk: impl FnOnce() -> LogChunk) {
        if let Some(tx) = self.0.get()
            && tx.receiver_count() > 0
        {
            let _ = tx.send(chunk());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Stream;

    #[test]
    fn lines_reach_followers_and_nothing_is_made_without_one() {
        let tap = LogTap::default();
        tap.send(|| unreachable!("no follower: the chunk is never built"));
        assert!(tap.0.get().is_none());
        let mut rx = tap.clone().subscribe();
        tap.send(|| LogChunk {
            stream: Stream::Out,
            lines: Arc::from(&b"hi\n"[..]),
        });
        assert_eq!(&*rx.try_recv().unwrap().lines, b"hi\n");
    }
}
