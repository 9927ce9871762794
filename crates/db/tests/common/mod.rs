//! What the modules' tests share: a caller on a real bus.

#![allow(dead_code)]

use serde_json::Value;
use spindle_bus::{Blob, Bus, Envelope, Mailbox, Message, Request};
use spindle_types::Address;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub const DEADLINE: Duration = Duration::from_secs(10);

pub struct Caller {
    pub bus: Arc<Bus>,
    pub me: Arc<Address>,
    pub inbox: Mailbox,
}

impl Caller {
    pub fn new(bus: &Arc<Bus>, addr: &str) -> Caller {
        let me: Address = addr.parse().unwrap();
        let inbox = bus.register(me.clone(), false).unwrap();
        Caller {
            bus: bus.clone(),
            me: Arc::new(me),
            inbox,
        }
    }

    /// Sends `body` (and `blob`) to `module`; the response body and blob.
    pub async fn ask(
        &mut self,
        module: &str,
        body: Value,
        blob: Option<&[u8]>,
    ) -> (Value, Option<Vec<u8>>) {
        self.ask_bytes(module, serde_json::to_vec(&body).unwrap(), blob)
            .await
    }

    /// Sends a body that may not be JSON at all.
    pub async fn ask_raw(&mut self, module: &str, body: Vec<u8>) -> (Value, Option<Vec<u8>>) {
        self.ask_bytes(module, body, None).await
    }

    async fn ask_bytes(
        &mut self,
        module: &str,
        body: Vec<u8>,
        blob: Option<&[u8]>,
    ) -> (Value, Option<Vec<u8>>) {
        let id = self.bus.next_id();
        let env = Envelope {
            id,
            source: self.me.clone(),
            target: Arc::new(format!("local@{module}:sys:spindle").parse().unwrap()),
            rsvp: Some(self.me.clone()),
            message: Message::Request(Request {
                inherit: false,
                expects_response: Some(DEADLINE),
                body,
                metadata: None,
                capabilities: vec![],
            }),
            blob: blob.map(|b| {
                Arc::new(Blob {
                    mime: None,
                    bytes: b.to_vec(),
                })
            }),
        };
        self.bus.send(env, false).await.map_err(|(k, _)| k).unwrap();
        loop {
            let env = tokio::time::timeout(DEADLINE, self.inbox.recv())
                .await
                .expect("an answer in time")
                .unwrap();
            if env.id == id
                && let Message::Response(r, _) = env.message
            {
                return (
                    serde_json::from_slice(&r.body).unwrap(),
                    env.blob.map(|b| b.bytes.clone()),
                );
            }
        }
    }

    pub async fn kv(&mut self, body: Value) -> Value {
        self.ask("kv", body, None).await.0
    }
}

pub fn node(dir: &Path) -> Arc<Bus> {
    let bus = Arc::new(Bus::new("local"));
    spindle_db::start(dir, &bus).unwrap();
    bus
}
