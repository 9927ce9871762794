//! The `sqlite` module: `write` (one statement, durable when answered) and
//! `query` (rows), with typed parameters and results.
//!
//! Parameters are JSON: `null`, numbers (integers stay integers), strings,
//! booleans (as 0/1), and bytes as `{"blob":[offset,length]}` into the
//! request's blob (or `{"base64":"…"}`). Results come back as
//! `{"columns":[…],"rows":[[…],…]}` with the same types; a blob column is
//! `{"blob":[offset,length]}` into the response's blob.

use crate::access::Access;
use crate::guard::{GuestError, first_keyword};
use crate::store::{DbError, too_long};
use crate::{Answer, Module, Refusal, Req};
use base64::Engine as _;
use rusqlite::types::Value as Sql;
use serde_json::{Value, json};
use spindle_bus::Reply;
use spindle_bus::{Blob, Bus};
use spindle_types::Address;
use std::sync::Arc;

/// Rows one query may answer with: more is an error asking for a `LIMIT`
/// (a silently cut result would be wrong).
pub const MAX_ROWS: usize = 10_000;
/// Bytes of blobs one query may answer with (an answer must fit a mailbox).
pub const MAX_RESULT_BYTES: usize = 16 << 20;

pub(crate) fn to_sql(v: &Value, blob: Option<&Blob>) -> Result<Sql, Refusal> {
    Ok(match v {
        Value::Null => Sql::Null,
        Value::Bool(b) => Sql::Integer(*b as i64),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Sql::Integer(i),
            None => Sql::Real(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Sql::Text(s.clone()),
        Value::Object(o) if o.len() == 1 && o.contains_key("blob") => {
            let range = o["blob"]
                .as_array()
                .and_then(|a| Some((a.first()?.as_u64()?, a.get(1)?.as_u64()?)));
            let bytes = blob.map(|b| b.bytes.as_slice()).unwrap_or_default();
            let within = range.and_then(|(off, len)| {
                let start = usize::try_from(off).ok()?;
                bytes.get(start..start.checked_add(usize::try_from(len).ok()?)?)
            });
            match within {
                Some(slice) => Sql::Blob(slice.to_vec()),
                None => {
                    return Err(Refusal::bad(format!(
                        "parameter {v}: [offset, length] outside the request's blob ({} bytes)",
                        bytes.len()
                    )));
                }
            }
        }
        Value::Object(o) if o.len() == 1 && o.contains_key("base64") => {
            let text = o["base64"].as_str().unwrap_or_default();
            Sql::Blob(
                base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(|e| Refusal::bad(format!("parameter {v}: {e}")))?,
            )
        }
        other => {
            return Err(Refusal::bad(format!(
                "parameter {other}: use null, a number, a string, a boolean, {{\"blob\":[offset,length]}} or {{\"base64\":…}}"
            )));
        }
    })
}

fn from_sql(v: rusqlite::types::ValueRef<'_>, blob: &mut Vec<u8>) -> Value {
    use rusqlite::types::ValueRef as R;
    match v {
        R::Null => Value::Null,
        R::Integer(i) => i.into(),
        R::Real(f) => f.into(),
        R::Text(t) => String::from_utf8_lossy(t).into_owned().into(),
        R::Blob(b) => {
            let at = blob.len();
            blob.extend_from_slice(b);
            json!({"blob": [at, b.len()]})
        }
    }
}

impl Module {
    pub(crate) fn sql(
        &self,
        bus: &Arc<Bus>,
        source: &Address,
        req: Req,
        blob: Option<Arc<Blob>>,
        reply: Reply,
    ) {
        let prepared = (|| {
            let t = self.target(source, &req)?;
            let need = match &*req.op {
                "query" | "open" => Access::Read,
                "write" => Access::Write,
                other => {
                    return Err(Refusal::bad(format!(
                        "unknown sqlite op {other:?}: use open, write, query, grant, revoke"
                    )));
                }
            };
            self.check(bus, source, &t, need)?;
            let owner = source.process.package == *t.package || source.process.package.is_system();
            let db = self.database(&t, owner && req.op != "query")?;
            let params = req
                .params
                .iter()
                .map(|p| to_sql(p, blob.as_deref()))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((db, params))
        })();
        let (db, params) = match prepared {
            Ok(p) => p,
            Err(e) => return reply.deny(e),
        };
        let sql = req.sql.clone().unwrap_or_default();
        match &*req.op {
            "open" => reply.ok(json!({"ok": true}), None),
            "write" => {
                db.write_sql(sql, params, Box::new(move |r| {
                    reply.answer(r.map(|c| (json!({"changes": c.rows, "last_insert_rowid": c.last_insert_rowid}), None)).map_err(Refusal::from))
                }));
            }
            _ => {
                let path = db.path.clone();
                db.read(Box::new(move |conn| {
                    let run = || -> Result<(Value, Option<Vec<u8>>), Refusal> {
                        let conn = conn.map_err(|e| Refusal::from(e.clone()))?;
                        let ran = conn.guard.guest(&sql, || {
                            let mut stmt = conn.prepare_cached(&sql)?;
                            if !stmt.readonly() {
                                return Ok(Err(DbError::Refused(format!(
                                    "{} through `query`, which only reads: send it as `write`",
                                    first_keyword(&sql)
                                ))
                                .into()));
                            }
                            let columns: Vec<String> =
                                stmt.column_names().map(|c| c.to_string()).collect();
                            let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
                            let mut out = Vec::new();
                            let mut bytes = Vec::new();
                            while let Some(r) = rows.next()? {
                                if bytes.len() > MAX_RESULT_BYTES {
                                    return Ok(Err(Refusal::bad(format!(
                                        "more than {} MiB of blobs in the result: add a LIMIT and page through {}",
                                        MAX_RESULT_BYTES >> 20,
                                        path.display()
                                    ))));
                                }
                                if out.len() == MAX_ROWS {
                                    return Ok(Err(Refusal::bad(format!(
                                        "more than {MAX_ROWS} rows: add a LIMIT and page through {}",
                                        path.display()
                                    ))));
                                }
                                out.push(Value::Array(
                                    (0..columns.len())
                                        .map(|i| {
                                            r.get_ref(i)
                                                .map(|v| from_sql(v, &mut bytes))
                                                .unwrap_or(Value::Null)
                                        })
                                        .collect(),
                                ));
                            }
                            let blob = (!bytes.is_empty()).then_some(bytes);
                            Ok(Ok((json!({"columns": columns, "rows": out}), blob)))
                        });
                        match ran {
                            Ok(answer) => answer,
                            Err(GuestError::Refused(why)) => Err(DbError::Refused(why).into()),
                            Err(GuestError::TooLong) => Err(too_long().into()),
                            Err(GuestError::Sql(e)) => {
                                Err(DbError::Statement(e.to_string()).into())
                            }
                        }
                    };
                    reply.answer(run());
                }));
            }
        }
    }
}

/// The schema, then every table's rows as INSERT statements.
pub(crate) fn dump(
    conn: &rusqlite::Connection,
    out: &mut dyn std::io::Write,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut tables = Vec::new();
    let mut stmt = conn.prepare("SELECT name, sql FROM sqlite_schema WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' ORDER BY type DESC, name")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let name: String = r.get(0)?;
        let sql: String = r.get(1)?;
        writeln!(out, "{sql};")?;
        if sql
            .trim_start()
            .to_ascii_uppercase()
            .starts_with("CREATE TABLE")
        {
            tables.push(name);
        }
    }
    for t in tables {
        let quoted = format!("\"{}\"", t.replace('"', "\"\""));
        let mut stmt = conn.prepare(&format!("SELECT * FROM {quoted}"))?;
        let n = stmt.column_count();
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let vals: Vec<String> = (0..n)
                .map(|i| match r.get_ref(i) {
                    Ok(rusqlite::types::ValueRef::Null) | Err(_) => "NULL".to_string(),
                    Ok(rusqlite::types::ValueRef::Integer(v)) => v.to_string(),
                    Ok(rusqlite::types::ValueRef::Real(v)) => format!("{v:?}"),
                    Ok(rusqlite::types::ValueRef::Text(t)) => {
                        format!("'{}'", String::from_utf8_lossy(t).replace('\'', "''"))
                    }
                    Ok(rusqlite::types::ValueRef::Blob(b)) => format!(
                        "X'{}'",
                        b.iter().map(|x| format!("{x:02X}")).collect::<String>()
                    ),
                })
                .collect();
            writeln!(out, "INSERT INTO {quoted} VALUES ({});", vals.join(", "))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_keep_their_types() {
        let blob = Blob {
            mime: None,
            bytes: vec![1, 2, 3, 4],
        };
        let ps = json!([null, 7, 2.5, "x", true, {"blob": [1, 2]}, {"base64": "AAE="}]);
        let got: Vec<Sql> = ps
            .as_array()
            .unwrap()
            .iter()
            .map(|p| to_sql(p, Some(&blob)).unwrap())
            .collect();
        assert_eq!(
            got,
            vec![
                Sql::Null,
                Sql::Integer(7),
                Sql::Real(2.5),
                Sql::Text("x".into()),
                Sql::Integer(1),
                Sql::Blob(vec![2, 3]),
                Sql::Blob(vec![0, 1])
            ]
        );
        assert!(
            to_sql(&json!({"blob": [3, 5]}), Some(&blob)).is_err(),
            "outside the blob"
        );
        assert!(to_sql(&json!([1]), None).is_err());
        for extreme in [
            json!({"blob": [u64::MAX, 1]}),
            json!({"blob": [1, u64::MAX]}),
            json!({"blob": [u64::MAX, u64::MAX]}),
            json!({"blob": [-1, 2]}),
        ] {
            assert!(to_sql(&extreme, Some(&blob)).is_err(), "{extreme}");
        }
    }
}
