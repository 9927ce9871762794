//! How a service of the node answers a request, from any thread.

use crate::{Blob, Bus, Envelope, Message, Response, SendErrorKind};
use spindle_types::Address;
use std::sync::{Arc, Weak};

/// Where and how to answer one request: made from the request's envelope,
/// sent from whichever thread finishes the work.
#[derive(Debug)]
pub struct Reply {
    bus: Weak<Bus>,
    me: Arc<Address>,
    id: u64,
    rsvp: Option<Arc<Address>>,
}

impl Reply {
    /// The answer to `env`, from the service at `me`.
    pub fn to(bus: Weak<Bus>, me: Arc<Address>, env: &Envelope) -> Reply {
        Reply {
            bus,
            me,
            id: env.id,
            rsvp: env.rsvp.clone(),
        }
    }

    /// Whether anyone awaits the answer.
    pub fn expected(&self) -> bool {
        self.rsvp.is_some()
    }

    /// Answers with `body` (JSON, serialised here) and a blob.
    pub fn ok(self, body: serde_json::Value, blob: Option<Vec<u8>>) {
        self.bytes(serde_json::to_vec(&body).expect("bodies serialise"), blob)
    }

    /// Answers with a body already serialised.
    pub fn bytes(self, body: Vec<u8>, blob: Option<Vec<u8>>) {
        let _ = self.send(
            body,
            None,
            blob.map(|bytes| Arc::new(Blob { mime: None, bytes })),
        );
    }

    /// `{"error": kind, "message": message}`: what every service answers
    /// a request it refuses.
    pub fn refuse(self, kind: &str, message: &str) {
        self.ok(serde_json::json!({"error": kind, "message": message}), None);
    }

    /// Answers with a body, metadata and a shared blob. A requester that is
    /// gone does not hear back; one whose mailbox has no room for the
    /// answer hears that (`mailbox-full`) instead of waiting for its timeout.
    /// Returns whether the answer was delivered.
    pub fn send(
        self,
        body: Vec<u8>,
        metadata: Option<String>,
        blob: Option<Arc<Blob>>,
    ) -> Result<(), SendErrorKind> {
        let (Some(bus), Some(rsvp)) = (self.bus.upgrade(), self.rsvp) else {
            return Err(SendErrorKind::Offline);
        };
        let env = Envelope {
            id: self.id,
            source: self.me,
            target: rsvp,
            rsvp: None,
            message: Message::Response(
                Response {
                    inherit: false,
                    body,
                    metadata,
                    capabilities: vec![],
                },
                None,
            ),
            blob,
        };
        match bus.send_now(env, true) {
            Ok(()) => Ok(()),
            Err((SendErrorKind::MailboxFull, env)) => {
                bus.fail_request(&env.source, env.id, env.target, SendErrorKind::MailboxFull);
                Err(SendErrorKind::MailboxFull)
            }
            Err((kind, _)) => Err(kind),
        }
    }
}
