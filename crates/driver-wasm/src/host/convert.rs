//! Messages, addresses and capabilities between the bus's types and the
//! guest's (WIT) ones.

use super::*;

pub(crate) fn to_wit_addr(a: &Address) -> wit::Address {
    a.to_string()
}

/// An address a guest gave, if it is one.
pub(crate) fn from_wit_addr(a: &str) -> Option<Address> {
    a.parse().ok()
}

pub(super) fn to_wit_cap(c: &Capability) -> wit::Capability {
    wit::Capability {
        issuer: to_wit_addr(&c.issuer),
        params: c.params.clone(),
    }
}

/// A guest's capabilities, if every issuer is an address (a capability that
/// names no process cannot be held, so it is never valid to attach).
pub(super) fn from_wit_caps(caps: &[wit::Capability]) -> Option<Vec<Capability>> {
    caps.iter()
        .map(|c| {
            Some(Capability {
                issuer: from_wit_addr(&c.issuer)?,
                params: c.params.clone(),
            })
        })
        .collect()
}

/// A guest's request, or the request back if a capability in it is malformed.
pub(crate) fn from_wit_request(r: wit::Request) -> Result<Request, wit::Request> {
    let Some(capabilities) = from_wit_caps(&r.capabilities) else {
        return Err(r);
    };
    Ok(Request {
        inherit: r.inherit,
        expects_response: r.expects_response.map(Duration::from_millis),
        body: r.body,
        metadata: r.metadata,
        capabilities,
    })
}

pub(super) fn to_wit_request(r: Request) -> wit::Request {
    wit::Request {
        inherit: r.inherit,
        expects_response: r.expects_response.map(|d| d.as_millis() as u64),
        body: r.body,
        metadata: r.metadata,
        capabilities: r.capabilities.iter().map(to_wit_cap).collect(),
    }
}

pub(super) fn to_wit_message(m: Message) -> wit::Message {
    match m {
        // `accept` turns these into send errors; none reaches a guest as a message.
        Message::Failed(_) => wit::Message::Response((
            wit::Response {
                inherit: false,
                body: vec![],
                metadata: None,
                capabilities: vec![],
            },
            None,
        )),
        Message::Request(r) => wit::Message::Request(to_wit_request(r)),
        Message::Response(r, context) => wit::Message::Response((
            wit::Response {
                inherit: r.inherit,
                body: r.body,
                metadata: r.metadata,
                capabilities: r.capabilities.iter().map(to_wit_cap).collect(),
            },
            context,
        )),
    }
}

pub(crate) fn from_wit_blob(b: wit::Blob) -> Blob {
    Blob {
        mime: b.mime,
        bytes: b.bytes,
    }
}

pub(super) fn to_wit_kind(k: SendErrorKind) -> wit::SendErrorKind {
    match k {
        SendErrorKind::Exited => wit::SendErrorKind::Exited,
        SendErrorKind::Offline => wit::SendErrorKind::Offline,
        SendErrorKind::Timeout => wit::SendErrorKind::Timeout,
        SendErrorKind::NoCapability => wit::SendErrorKind::NoCapability,
        SendErrorKind::MailboxFull => wit::SendErrorKind::MailboxFull,
        SendErrorKind::Invalid => wit::SendErrorKind::Invalid,
    }
}

pub(super) fn send_error(
    kind: SendErrorKind,
    target: &Address,
    message: Message,
    context: Option<Vec<u8>>,
) -> wit::SendError {
    wit::SendError {
        kind: to_wit_kind(kind),
        target: to_wit_addr(target),
        message: to_wit_message(message),
        context,
    }
}

/// A request the kernel could not even read (a malformed target or
/// capability), returned as `invalid` exactly as the guest gave it.
pub(super) fn invalid_request(
    target: wit::Address,
    request: wit::Request,
    context: Option<Vec<u8>>,
) -> wit::SendError {
    wit::SendError {
        kind: wit::SendErrorKind::Invalid,
        target,
        message: wit::Message::Request(request),
        context,
    }
}
