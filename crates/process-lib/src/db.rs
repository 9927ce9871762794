//! The node's runtime modules `kv` and `sqlite`, as Rust calls: each is a
//! request to `<node>@kv:sys:spindle` or `<node>@sqlite:sys:spindle`
//! (bodies JSON, values in blobs), so they work the same from a wasm process
//! and from a native one.
//!
//! ```ignore
//! let db = kv::open("orders")?;
//! db.set("a/1", b"first".to_vec())?;
//! let tx = db.begin()?;
//! tx.set("a/2", b"second".to_vec())?;
//! tx.commit()?;                          // both or neither, durably
//! for (k, v) in db.scan("a/")? { … }
//!
//! let app = sqlite::open("app")?;
//! app.write("INSERT INTO t (name) VALUES (?1)", &[SqlValue::from("ann")])?;
//! let rows = app.query("SELECT id, name FROM t", &[])?;
//! ```

use crate::{Address, Request};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::time::Duration;

/// How long a database call waits for the module (a write waits for its
/// group commit; a large scan or query for the reader).
pub const DB_TIMEOUT: Duration = Duration::from_secs(30);

/// A failed database call: `kind` as the module names it (`no-access`,
/// `no-such-db`, `no-such-tx`, `disk-full`, `read-only`, `corrupt`,
/// `statement`, `bad-request`, `storage`, or a send error's kind).
pub type DbError = crate::ModuleError;

/// Who may be granted what.
pub use spindle_abi::Access;

/// A request to a module (fields left out when empty).
#[derive(Serialize, Default)]
struct Call<'a> {
    op: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    db: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    package: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prefix: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prefix_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tx: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    to: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    access: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sql: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    params: Option<Value>,
}

/// Bytes as text if they are, else base64 (for the `…_base64` field).
fn text_or_base64(bytes: &[u8]) -> (Option<&str>, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(t) => (Some(t), None),
        Err(_) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ),
    }
}

impl<'a> Call<'a> {
    fn key(mut self, bytes: &'a [u8]) -> Self {
        (self.key, self.key_base64) = text_or_base64(bytes);
        self
    }

    fn prefix(mut self, bytes: &'a [u8]) -> Self {
        (self.prefix, self.prefix_base64) = text_or_base64(bytes);
        self
    }

    /// A call about transaction `tx` (which knows its database).
    fn tx(op: &'a str, tx: u64) -> Self {
        Call {
            op,
            tx: Some(tx),
            ..Call::default()
        }
    }
}

/// A module's answer (each op fills the fields it has).
#[derive(Deserialize, Default)]
#[serde(default)]
struct Answer {
    error: Option<String>,
    message: String,
    found: bool,
    count: Option<u64>,
    tx: u64,
    changes: u64,
    last_insert_rowid: i64,
    columns: Vec<String>,
    rows: Option<Vec<Vec<Value>>>,
}

/// A database of a module, named for requests.
#[derive(Debug, Clone)]
struct Db {
    /// The module's name (`kv`, `sqlite`).
    module: &'static str,
    name: String,
    package: Option<String>,
}

impl Db {
    /// Names the database and opens it (with `package`, another package's).
    fn open(module: &'static str, name: &str, package: Option<&str>) -> Result<Db, DbError> {
        let db = Db {
            module,
            name: name.into(),
            package: package.map(str::to_string),
        };
        db.send(&db.call("open"), None)?;
        Ok(db)
    }

    fn call<'a>(&'a self, op: &'a str) -> Call<'a> {
        Call {
            op,
            db: Some(&self.name),
            package: self.package.as_deref(),
            ..Call::default()
        }
    }

    /// Sends `call` (and `blob`); the answer and its blob.
    fn send(
        &self,
        call: &Call,
        blob: Option<Vec<u8>>,
    ) -> Result<(Answer, Option<Vec<u8>>), DbError> {
        let msg = crate::module::call(self.module, call, blob, DB_TIMEOUT)?;
        let answer: Answer = msg.json().map_err(DbError::bad_response)?;
        if let Some(e) = DbError::refused(&answer.error, &answer.message) {
            return Err(e);
        }
        let blob = if answer.found || answer.count.is_some() || answer.rows.is_some() {
            crate::get_blob().map(|b| b.bytes)
        } else {
            None
        };
        Ok((answer, blob))
    }

    fn grant(&self, to: &Address, access: Access, op: &str) -> Result<(), DbError> {
        let call = Call {
            to: Some(to.as_str()),
            access: Some(access.name()),
            ..self.call(op)
        };
        self.send(&call, None).map(|_| ())
    }
}

pub mod kv {
    //! Key-value databases: `kv::open("name")`.
    use super::*;

    /// A kv database of this process's package (or, with [`open_in`],
    /// another package's, if it granted access).
    #[derive(Debug, Clone)]
    pub struct Kv(Db);

    /// Opens the database `name` of this process's package, creating it.
    pub fn open(name: &str) -> Result<Kv, DbError> {
        Db::open("kv", name, None).map(Kv)
    }

    /// Opens another package's database (it must exist, and that package
    /// must have granted this process access).
    pub fn open_in(package: &str, name: &str) -> Result<Kv, DbError> {
        Db::open("kv", name, Some(package)).map(Kv)
    }

    impl Kv {
        pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, DbError> {
            let (answer, blob) = self.0.send(&self.0.call("get").key(key.as_ref()), None)?;
            Ok(answer.found.then(|| blob.unwrap_or_default()))
        }

        /// Sets `key`; returns once it is on disk.
        pub fn set(&self, key: impl AsRef<[u8]>, value: impl Into<Vec<u8>>) -> Result<(), DbError> {
            self.write("set", key.as_ref(), Some(value.into()), None)
        }

        pub fn delete(&self, key: impl AsRef<[u8]>) -> Result<(), DbError> {
            self.write("delete", key.as_ref(), None, None)
        }

        fn write(
            &self,
            op: &str,
            key: &[u8],
            value: Option<Vec<u8>>,
            tx: Option<u64>,
        ) -> Result<(), DbError> {
            let mut call = Call {
                tx,
                ..self.0.call(op).key(key)
            };
            // An empty value goes in the body: a blob of no bytes is no blob.
            let blob = match value {
                Some(v) if v.is_empty() => {
                    call.value = Some("");
                    None
                }
                v => v,
            };
            self.0.send(&call, blob).map(|_| ())
        }

        /// Every pair whose key starts with `prefix`, in key order (at most
        /// 10,000; the module says `more` past that: scan from the last key).
        pub fn scan(&self, prefix: impl AsRef<[u8]>) -> Result<Vec<(Vec<u8>, Vec<u8>)>, DbError> {
            let (_, blob) = self
                .0
                .send(&self.0.call("scan").prefix(prefix.as_ref()), None)?;
            Ok(decode_pairs(&blob.unwrap_or_default()))
        }

        /// Begins a transaction: its writes apply together at `commit`, or
        /// not at all.
        pub fn begin(&self) -> Result<Tx<'_>, DbError> {
            let (answer, _) = self.0.send(&self.0.call("begin"), None)?;
            Ok(Tx {
                kv: self,
                id: answer.tx,
                open: true,
            })
        }

        /// Lets `to` read (or read and write) this database.
        pub fn grant(&self, to: &Address, access: Access) -> Result<(), DbError> {
            self.0.grant(to, access, "grant")
        }

        pub fn revoke(&self, to: &Address, access: Access) -> Result<(), DbError> {
            self.0.grant(to, access, "revoke")
        }
    }

    /// An open transaction; dropped without `commit`, it is rolled back.
    pub struct Tx<'a> {
        kv: &'a Kv,
        id: u64,
        open: bool,
    }

    impl Tx<'_> {
        pub fn set(&self, key: impl AsRef<[u8]>, value: impl Into<Vec<u8>>) -> Result<(), DbError> {
            self.kv
                .write("set", key.as_ref(), Some(value.into()), Some(self.id))
        }

        pub fn delete(&self, key: impl AsRef<[u8]>) -> Result<(), DbError> {
            self.kv.write("delete", key.as_ref(), None, Some(self.id))
        }

        /// Applies every write, atomically; returns once they are on disk.
        pub fn commit(mut self) -> Result<(), DbError> {
            self.open = false;
            self.kv
                .0
                .send(&Call::tx("commit", self.id), None)
                .map(|_| ())
        }

        pub fn rollback(mut self) -> Result<(), DbError> {
            self.open = false;
            self.kv
                .0
                .send(&Call::tx("rollback", self.id), None)
                .map(|_| ())
        }
    }

    impl Drop for Tx<'_> {
        fn drop(&mut self) {
            if self.open {
                let call = Call::tx("rollback", self.id);
                let _ = Request::to(crate::module::address(self.kv.0.module))
                    .json(&call)
                    .send();
            }
        }
    }

    /// Pairs in the scan encoding: `[len u32 LE][key][len u32 LE][value]`…
    pub fn decode_pairs(mut bytes: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let take = |bytes: &mut &[u8]| -> Option<Vec<u8>> {
            let n = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
            let v = bytes.get(4..4 + n)?.to_vec();
            *bytes = &bytes[4 + n..];
            Some(v)
        };
        let mut out = Vec::new();
        while let (Some(k), Some(v)) = (take(&mut bytes), take(&mut bytes)) {
            out.push((k, v));
        }
        out
    }
}

pub mod sqlite {
    //! SQLite databases: `sqlite::open("name")`.
    use super::*;

    /// A value in a statement's parameters or a query's rows.
    #[derive(Debug, Clone, PartialEq)]
    pub enum SqlValue {
        Null,
        Integer(i64),
        Real(f64),
        Text(String),
        Blob(Vec<u8>),
    }

    impl From<i64> for SqlValue {
        fn from(v: i64) -> SqlValue {
            SqlValue::Integer(v)
        }
    }
    impl From<f64> for SqlValue {
        fn from(v: f64) -> SqlValue {
            SqlValue::Real(v)
        }
    }
    impl From<&str> for SqlValue {
        fn from(v: &str) -> SqlValue {
            SqlValue::Text(v.into())
        }
    }
    impl From<String> for SqlValue {
        fn from(v: String) -> SqlValue {
            SqlValue::Text(v)
        }
    }
    impl From<Vec<u8>> for SqlValue {
        fn from(v: Vec<u8>) -> SqlValue {
            SqlValue::Blob(v)
        }
    }

    /// What a write changed.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Written {
        pub changes: u64,
        pub last_insert_rowid: i64,
    }

    /// A query's result.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Rows {
        pub columns: Vec<String>,
        pub rows: Vec<Vec<SqlValue>>,
    }

    #[derive(Debug, Clone)]
    pub struct Sqlite(Db);

    /// Opens the database `name` of this process's package, creating it.
    pub fn open(name: &str) -> Result<Sqlite, DbError> {
        Db::open("sqlite", name, None).map(Sqlite)
    }

    /// Opens another package's database (it must have granted access).
    pub fn open_in(package: &str, name: &str) -> Result<Sqlite, DbError> {
        Db::open("sqlite", name, Some(package)).map(Sqlite)
    }

    /// Parameters as JSON, their bytes gathered into one blob.
    fn params(values: &[SqlValue]) -> (Value, Option<Vec<u8>>) {
        let mut blob = Vec::new();
        let list = values
            .iter()
            .map(|v| match v {
                SqlValue::Null => Value::Null,
                SqlValue::Integer(i) => (*i).into(),
                SqlValue::Real(f) => (*f).into(),
                SqlValue::Text(t) => t.clone().into(),
                SqlValue::Blob(b) => {
                    let at = blob.len();
                    blob.extend_from_slice(b);
                    json!({"blob": [at, b.len()]})
                }
            })
            .collect();
        (Value::Array(list), (!blob.is_empty()).then_some(blob))
    }

    fn value(v: &Value, blob: &[u8]) -> SqlValue {
        match v {
            Value::Null => SqlValue::Null,
            Value::Number(n) => match n.as_i64() {
                Some(i) => SqlValue::Integer(i),
                None => SqlValue::Real(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => SqlValue::Text(s.clone()),
            Value::Bool(b) => SqlValue::Integer(*b as i64),
            other => {
                let at = other["blob"][0].as_u64().unwrap_or(0) as usize;
                let len = other["blob"][1].as_u64().unwrap_or(0) as usize;
                SqlValue::Blob(blob.get(at..at + len).unwrap_or_default().to_vec())
            }
        }
    }

    impl Sqlite {
        /// Runs one statement; returns once it is on disk.
        pub fn write(&self, sql: &str, values: &[SqlValue]) -> Result<Written, DbError> {
            let (ps, blob) = params(values);
            let call = Call {
                sql: Some(sql),
                params: Some(ps),
                ..self.0.call("write")
            };
            let (answer, _) = self.0.send(&call, blob)?;
            Ok(Written {
                changes: answer.changes,
                last_insert_rowid: answer.last_insert_rowid,
            })
        }

        pub fn query(&self, sql: &str, values: &[SqlValue]) -> Result<Rows, DbError> {
            let (ps, blob) = params(values);
            let call = Call {
                sql: Some(sql),
                params: Some(ps),
                ..self.0.call("query")
            };
            let (answer, blob) = self.0.send(&call, blob)?;
            let blob = blob.unwrap_or_default();
            let rows = answer
                .rows
                .unwrap_or_default()
                .iter()
                .map(|r| r.iter().map(|v| value(v, &blob)).collect())
                .collect();
            Ok(Rows {
                columns: answer.columns,
                rows,
            })
        }

        pub fn grant(&self, to: &Address, access: Access) -> Result<(), DbError> {
            self.0.grant(to, access, "grant")
        }

        pub fn revoke(&self, to: &Address, access: Access) -> Result<(), DbError> {
            self.0.grant(to, access, "revoke")
        }
    }
}
