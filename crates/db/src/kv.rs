//! The `kv` module: get, set, delete, scan by prefix, transactions.
//!
//! Keys are text (`key`) or bytes (`key_base64`). A value travels as the
//! message's blob (`set` takes it from the request's, `get` answers with
//! it); `value` in the body is accepted instead, and `"text": true` asks for
//! it back in the body, for senders without blobs (the operator's
//! `spindle send`). `scan` answers with one blob of its pairs, each
//! `[key length: u32 LE][key][value length: u32 LE][value]`.

use crate::access::Access;
use crate::store::{Database, KvOp};
use crate::{Answer, Module, Refusal, Req};
use base64::Engine as _;
use serde_json::{Value, json};
use spindle_bus::Reply;
use spindle_bus::{Blob, Bus};
use spindle_types::{Address, ProcessId};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Pairs one `scan` answers with, at most (and by default).
pub const MAX_SCAN: usize = 10_000;
/// Bytes of pairs one `scan` answers with, at most: past it the answer
/// says `more` (page on from the last key).
pub const MAX_SCAN_BYTES: usize = 16 << 20;
/// Largest value a key may hold: a get answers with it whole.
pub const MAX_VALUE: usize = crate::guard::MAX_VALUE_BYTES as usize;
/// Open transactions on the node, of all processes together.
pub const MAX_OPEN_TX: usize = 4096;
/// Open transactions one process may have.
pub const MAX_TX_PER_PROCESS: usize = 16;
/// Bytes the open transactions of one process may hold before their commits.
pub const MAX_TX_BYTES: usize = 64 << 20;
/// Bytes all open transactions on the node may hold together.
pub const MAX_NODE_TX_BYTES: usize = 512 << 20;
/// A transaction untouched this long is rolled back (its process forgot it).
pub const TX_IDLE: Duration = Duration::from_secs(60);

struct Tx {
    owner: ProcessId,
    db: Arc<Database>,
    ops: Vec<KvOp>,
    bytes: usize,
    touched: Instant,
}

impl Tx {
    /// A transaction is its process's (the node's own senders, one per
    /// `spindle send`, may use any).
    fn may_use(&self, source: &Address) -> bool {
        self.owner == source.process || source.process.package.is_system()
    }
}

#[derive(Default)]
pub(crate) struct Transactions {
    open: HashMap<u64, Tx>,
    next: u64,
}

impl Transactions {
    /// Rolls back transactions idle past [`TX_IDLE`] and those of processes
    /// that have left the bus (the node's own senders come and go per
    /// request, so theirs only expire).
    fn purge(&mut self, bus: &Bus, now: Instant) {
        self.open.retain(|_, t| {
            now.saturating_duration_since(t.touched) < TX_IDLE
                && (t.owner.package.is_system() || bus.is_registered(&t.owner))
        });
    }

    /// Bytes held by `owner`'s transactions, and by all.
    fn held(&self, owner: &ProcessId) -> (usize, usize, usize) {
        let mut mine = 0;
        let mut count = 0;
        let mut all = 0;
        for t in self.open.values() {
            all += t.bytes;
            if t.owner == *owner {
                mine += t.bytes;
                count += 1;
            }
        }
        (count, mine, all)
    }
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn bytes_of(
    text: &Option<Cow<str>>,
    b64_text: &Option<Cow<str>>,
    what: &str,
) -> Result<Option<Vec<u8>>, Refusal> {
    match (text, b64_text) {
        (Some(t), None) => Ok(Some(t.as_bytes().to_vec())),
        (None, Some(b)) => b64()
            .decode(b.as_bytes())
            .map(Some)
            .map_err(|e| Refusal::bad(format!("`{what}_base64`: {e}"))),
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(Refusal::bad(format!(
            "give `{what}` or `{what}_base64`, not both"
        ))),
    }
}

fn key_of(req: &Req) -> Result<Vec<u8>, Refusal> {
    bytes_of(&req.key, &req.key_base64, "key")?
        .ok_or_else(|| Refusal::bad("name the key: `key` or `key_base64`"))
}

/// The first key after every key starting with `prefix`, if there is one.
pub fn after_prefix(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Appends one pair in the scan encoding.
pub fn encode_pair(out: &mut Vec<u8>, k: &[u8], v: &[u8]) {
    out.extend_from_slice(&(k.len() as u32).to_le_bytes());
    out.extend_from_slice(k);
    out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    out.extend_from_slice(v);
}

/// Answers a get: the value in the blob, or (`text`) in the body.
fn answer_get(reply: Reply, value: Option<Arc<[u8]>>, text: bool) {
    // The usual answers, serialised once.
    const FOUND: &[u8] = br#"{"found":true}"#;
    const MISSING: &[u8] = br#"{"found":false}"#;
    match (value, text) {
        (None, _) => reply.bytes(MISSING.to_vec(), None),
        (Some(v), false) => reply.bytes(FOUND.to_vec(), Some(v.to_vec())),
        (v, true) => {
            let (body, blob) = found(v, true);
            reply.ok(body, blob)
        }
    }
}

/// A value answered in the body or the blob.
fn found(value: Option<Arc<[u8]>>, text: bool) -> (Value, Option<Vec<u8>>) {
    match value {
        None => (json!({"found": false}), None),
        Some(v) if text => match std::str::from_utf8(&v) {
            Ok(t) => (json!({"found": true, "value": t}), None),
            Err(_) => (
                json!({"found": true, "value_base64": b64().encode(&v)}),
                None,
            ),
        },
        Some(v) => (json!({"found": true}), Some(v.to_vec())),
    }
}

impl Module {
    /// One kv request: answered (now or by a database thread), or refused
    /// with the reply handed back.
    pub(crate) fn kv(
        &self,
        bus: &Arc<Bus>,
        source: &Address,
        req: Req,
        blob: Option<Arc<Blob>>,
        reply: Reply,
    ) -> Result<(), (Reply, Refusal)> {
        macro_rules! tri {
            ($e:expr) => {
                match $e {
                    Ok(v) => v,
                    Err(e) => return Err((reply, e)),
                }
            };
        }
        // Transactions name no database: theirs is known.
        match &*req.op {
            "commit" | "rollback" => {
                let id = tri!(
                    req.tx
                        .ok_or_else(|| Refusal::bad("name the transaction: `tx`"))
                );
                let tx = {
                    let mut txs = self.txs.lock().unwrap_or_else(|p| p.into_inner());
                    match txs.open.get(&id) {
                        Some(t) if t.may_use(source) => txs.open.remove(&id),
                        _ => None,
                    }
                };
                let tx = tri!(tx.ok_or_else(|| Refusal {
                    kind: "no-such-tx",
                    message: format!("no open transaction {id} of this process (committed, rolled back, or never begun)"),
                }));
                if req.op == "rollback" || tx.ops.is_empty() {
                    reply.ok(json!({"ok": true}), None);
                } else {
                    tx.db.write_kv(
                        tx.ops,
                        Box::new(move |r| {
                            reply.answer(
                                r.map(|()| (json!({"ok": true}), None))
                                    .map_err(Refusal::from),
                            )
                        }),
                    );
                }
                return Ok(());
            }
            _ => {}
        }
        let t = tri!(self.target(source, &req));
        let need = match &*req.op {
            "get" | "scan" | "open" => Access::Read,
            _ => Access::Write,
        };
        tri!(self.check(bus, source, &t, need));
        let owner = source.process.package == *t.package || source.process.package.is_system();
        let create = owner && matches!(&*req.op, "open" | "set" | "delete" | "begin");
        let db = tri!(self.database(&t, create));
        match &*req.op {
            "open" => reply.ok(json!({"ok": true}), None),
            "get" => {
                let text = req.text;
                // A text key is looked up in the cache as it is, uncopied.
                if let (Some(k), None) = (&req.key, &req.key_base64)
                    && let Some(v) = db.cached(k.as_bytes())
                {
                    answer_get(reply, v, text);
                    return Ok(());
                }
                let key = tri!(key_of(&req));
                match db.cached(&key) {
                    Some(v) => answer_get(reply, v, text),
                    None => db.get(
                        key,
                        Box::new(move |r| match r {
                            Ok(v) => answer_get(reply, v, text),
                            Err(e) => reply.deny(e.into()),
                        }),
                    ),
                }
            }
            "set" | "delete" => {
                let key = tri!(key_of(&req));
                let op = if req.op == "set" {
                    let value: Arc<[u8]> = match (&req.value, &blob) {
                        (Some(v), _) => v.as_bytes().into(),
                        (None, Some(b)) => b.bytes.as_slice().into(),
                        (None, None) => {
                            return Err((
                                reply,
                                Refusal::bad("a set needs a value: the blob, or `value`"),
                            ));
                        }
                    };
                    if value.len() > MAX_VALUE {
                        return Err((
                            reply,
                            Refusal::bad(format!(
                                "a value of {} bytes: at most {} MiB (it must fit in an answer); split it",
                                value.len(),
                                MAX_VALUE >> 20
                            )),
                        ));
                    }
                    KvOp::Set(key, value)
                } else {
                    KvOp::Delete(key)
                };
                match req.tx {
                    Some(id) => {
                        let mut txs = self.txs.lock().unwrap_or_else(|p| p.into_inner());
                        let owner = match txs.open.get(&id) {
                            Some(tx) if tx.may_use(source) && Arc::ptr_eq(&tx.db, &db) => {
                                tx.owner.clone()
                            }
                            _ => {
                                drop(txs);
                                return Err((
                                    reply,
                                    Refusal {
                                        kind: "no-such-tx",
                                        message: format!(
                                            "no open transaction {id} of this process on database {}",
                                            t.name
                                        ),
                                    },
                                ));
                            }
                        };
                        let size = match &op {
                            KvOp::Set(k, v) => k.len() + v.len(),
                            KvOp::Delete(k) => k.len(),
                        };
                        let (_, mine, all) = txs.held(&owner);
                        if mine.saturating_add(size) > MAX_TX_BYTES
                            || all.saturating_add(size) > MAX_NODE_TX_BYTES
                        {
                            drop(txs);
                            return Err((
                                reply,
                                Refusal {
                                    kind: "over-budget",
                                    message: format!(
                                        "transaction {id} would take this process's open transactions over {} MiB (or the node's over {} MiB): commit in smaller transactions",
                                        MAX_TX_BYTES >> 20,
                                        MAX_NODE_TX_BYTES >> 20
                                    ),
                                },
                            ));
                        }
                        if let Some(tx) = txs.open.get_mut(&id) {
                            tx.bytes += size;
                            tx.touched = Instant::now();
                            tx.ops.push(op);
                        }
                        drop(txs);
                        reply.ok(json!({"ok": true}), None);
                    }
                    None => db.write_kv(
                        vec![op],
                        Box::new(move |r| {
                            reply.answer(
                                r.map(|()| (json!({"ok": true}), None))
                                    .map_err(Refusal::from),
                            )
                        }),
                    ),
                }
            }
            "begin" => {
                let now = Instant::now();
                let mut txs = self.txs.lock().unwrap_or_else(|p| p.into_inner());
                txs.purge(bus, now);
                let (mine, _, _) = txs.held(&source.process);
                if mine >= MAX_TX_PER_PROCESS || txs.open.len() >= MAX_OPEN_TX {
                    drop(txs);
                    return Err((
                        reply,
                        Refusal {
                            kind: "over-budget",
                            message: format!(
                                "{MAX_TX_PER_PROCESS} transactions of this process are open (or {MAX_OPEN_TX} on the node): commit or roll back some"
                            ),
                        },
                    ));
                }
                txs.next += 1;
                let id = txs.next;
                txs.open.insert(
                    id,
                    Tx {
                        owner: source.process.clone(),
                        db,
                        ops: Vec::new(),
                        bytes: 0,
                        touched: now,
                    },
                );
                drop(txs);
                reply.ok(json!({"tx": id}), None);
            }
            "scan" => {
                let prefix =
                    tri!(bytes_of(&req.prefix, &req.prefix_base64, "prefix")).unwrap_or_default();
                let limit = req.limit.unwrap_or(MAX_SCAN).min(MAX_SCAN);
                let path = db.path.clone();
                db.read(Box::new(move |conn| {
                    let run = || -> Result<(Value, Option<Vec<u8>>), Refusal> {
                        let conn = conn.map_err(|e| Refusal::from(e.clone()))?;
                        let end = after_prefix(&prefix);
                        let fail = |e| Refusal::from(crate::store::DbError::of(&path, e));
                        let mut stmt = conn
                            .prepare_cached("SELECT k, v FROM kv WHERE k >= ?1 AND (?2 IS NULL OR k < ?2) ORDER BY k LIMIT ?3")
                            .map_err(fail)?;
                        let mut rows = stmt
                            .query(rusqlite::params![prefix, end, (limit + 1) as i64])
                            .map_err(fail)?;
                        let mut out = Vec::new();
                        let mut count = 0;
                        let mut more = false;
                        while let Some(r) = rows.next().map_err(fail)? {
                            if count == limit || out.len() >= MAX_SCAN_BYTES {
                                more = true;
                                break;
                            }
                            let k: Vec<u8> = r.get(0).unwrap_or_default();
                            let v: Vec<u8> = r.get(1).unwrap_or_default();
                            encode_pair(&mut out, &k, &v);
                            count += 1;
                        }
                        Ok((json!({"count": count, "more": more}), Some(out)))
                    };
                    reply.answer(run());
                }));
            }
            other => {
                return Err((
                    reply,
                    Refusal::bad(format!(
                        "unknown kv op {other:?}: use open, get, set, delete, scan, begin, commit, rollback, grant, revoke"
                    )),
                ));
            }
        }
        Ok(())
    }
}

/// One line a pair: `key<TAB>value`, each a JSON string if it is text,
/// else `base64:…`.
pub(crate) fn dump(
    conn: &rusqlite::Connection,
    out: &mut dyn std::io::Write,
) -> Result<(), Box<dyn std::error::Error>> {
    let show = |b: &[u8]| match std::str::from_utf8(b) {
        Ok(t) => serde_json::to_string(t).expect("strings serialise"),
        Err(_) => format!("base64:{}", b64().encode(b)),
    };
    let mut stmt = conn.prepare("SELECT k, v FROM kv ORDER BY k")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let k: Vec<u8> = r.get(0)?;
        let v: Vec<u8> = r.get(1)?;
        writeln!(out, "{}\t{}", show(&k), show(&v))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_end_of_a_prefix() {
        assert_eq!(after_prefix(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(after_prefix(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(after_prefix(b"\xff\xff"), None);
        assert_eq!(after_prefix(b""), None);
    }

    proptest! {
        #[test]
        fn every_key_with_the_prefix_is_below_its_end_and_no_other(prefix in proptest::collection::vec(any::<u8>(), 0..4), key in proptest::collection::vec(any::<u8>(), 0..6)) {
            let inside = key >= prefix && after_prefix(&prefix).is_none_or(|end| key < end);
            prop_assert_eq!(inside, key.starts_with(&prefix));
        }
    }
}
