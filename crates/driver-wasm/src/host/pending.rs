//! The requests a process awaits, and the one timer for their deadlines.

use super::*;

/// Hashes request numbers. They are handed out by the bus, one after the
/// other, never chosen by a guest, so a multiply spreads them well and the
/// general-purpose (DoS-resistant) hasher would only cost time per message.
#[derive(Default)]
pub(super) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A request this process sent and awaits a response to.
pub(super) struct Pending {
    pub(super) target: Arc<Address>,
    pub(super) request: Request,
    pub(super) context: Option<Vec<u8>>,
    pub(super) deadline: Instant,
}

/// What an awaited request keeps in the host until it is answered: all of
/// it but the blob (which travels and is not kept).
pub(super) fn kept_bytes(request: &Request, context: Option<&[u8]>) -> usize {
    let caps: usize = request
        .capabilities
        .iter()
        .map(|c| c.params.len() + std::mem::size_of::<Capability>())
        .sum();
    request.body.len()
        + request.metadata.as_ref().map_or(0, String::len)
        + context.map_or(0, <[u8]>::len)
        + caps
}

impl ProcessHost {
    /// Takes an awaited request off the table (its bytes with it).
    pub(super) fn take_pending(&mut self, id: &u64) -> Option<Pending> {
        let p = self.pending.remove(id)?;
        self.pending_bytes -= kept_bytes(&p.request, p.context.as_deref());
        Some(p)
    }

    /// A pending request whose time is up, returned as a timeout error.
    pub(super) fn expire(&mut self, now: Instant) -> Option<wit::SendError> {
        let id = *self
            .pending
            .iter()
            .find(|(_, p)| p.deadline <= now)
            .map(|(id, _)| id)?;
        let p = self.take_pending(&id)?;
        Some(send_error(
            SendErrorKind::Timeout,
            &p.target,
            Message::Request(p.request),
            p.context,
        ))
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.deadline).min()
    }

    /// Waits for mail, or until `deadline`. A closed mailbox or a message
    /// that arrives after a kill is `Killed`.
    pub(super) async fn wake(&mut self, deadline: Option<Instant>) -> Wake {
        let env = match deadline {
            None => self.mailbox.recv().await,
            Some(d) => {
                if self.armed.is_none_or(|a| d < a) {
                    let at = tokio::time::Instant::from_std(d);
                    match &mut self.timer {
                        Some(t) => t.as_mut().reset(at),
                        None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
                    }
                    self.armed = Some(d);
                }
                let timer = self.timer.as_mut().expect("armed above");
                tokio::select! {
                    biased;
                    env = self.mailbox.recv() => env,
                    _ = timer.as_mut() => {
                        self.armed = None;
                        return Wake::Deadline;
                    }
                }
            }
        };
        match env {
            Some(env) if !self.is_killed() => Wake::Mail(env),
            _ => Wake::Killed,
        }
    }
}
