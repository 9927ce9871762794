//! Test guest for the runtime modules. Each request is a command; the
//! response is its outcome (`err <kind>` on failure):
//! `set <db> <key> <value>`, `get <db> <key>` (the value, or `none`),
//! `setin`/`getin <package> <db> …` (another package's database),
//! `grant <db> <address> <read|write>`, `tx <db> <k=v>…` (one transaction),
//! `txdrop <db> <k=v>…` (begun, written, rolled back), `scan <db> <prefix>`
//! (`k=v,k=v`), `sqlw <db> <sql>` (changes), `sqlq <db> <sql>` (rows).
//! Timed, for benchmarks (answers `ok <n> p50 <ns> total <ns>`):
//! `kvsets <db> <n>`, `kvgets <db> <n>` (timed as a whole: its p50 is the
//! mean), `sqlgets <db> <n>`.

use spindle_process::sqlite::SqlValue;
use spindle_process::{Access, Address, Response, await_message, kv, sqlite};
use std::time::{Duration, Instant};

spindle_process::init!(run);

fn run(_our: Address) {
    loop {
        let Ok(msg) = await_message() else { continue };
        if !msg.is_request() {
            continue;
        }
        let text = String::from_utf8_lossy(msg.body()).into_owned();
        let answer = handle(&text).unwrap_or_else(|e| format!("err {}", e));
        let _ = Response::new().body(answer).send();
    }
}

fn pairs<'a>(words: impl Iterator<Item = &'a str>) -> Vec<(&'a str, &'a str)> {
    words.filter_map(|w| w.split_once('=')).collect()
}

fn timed(
    n: usize,
    mut f: impl FnMut(usize) -> Result<(), spindle_process::DbError>,
) -> Result<String, spindle_process::DbError> {
    let mut each = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        f(i)?;
        each.push(t.elapsed());
    }
    let total = start.elapsed();
    each.sort();
    let p50 = each.get(n / 2).copied().unwrap_or(Duration::ZERO);
    Ok(format!(
        "ok {n} p50 {} total {}",
        p50.as_nanos(),
        total.as_nanos()
    ))
}

fn handle(text: &str) -> Result<String, spindle_process::DbError> {
    let mut w = text.split(' ');
    let op = w.next().unwrap_or_default();
    let mut arg = || w.next().unwrap_or_default().to_string();
    Ok(match op {
        "set" => {
            let (db, k, v) = (arg(), arg(), arg());
            kv::open(&db)?.set(k, v)?;
            "ok".into()
        }
        "get" => {
            let (db, k) = (arg(), arg());
            show(kv::open(&db)?.get(k)?)
        }
        "setin" => {
            let (p, db, k, v) = (arg(), arg(), arg(), arg());
            kv::open_in(&p, &db)?.set(k, v)?;
            "ok".into()
        }
        "getin" => {
            let (p, db, k) = (arg(), arg(), arg());
            show(kv::open_in(&p, &db)?.get(k)?)
        }
        "grant" => {
            let (db, to, access) = (arg(), arg(), arg());
            let to = Address::parse(&to).ok_or_else(|| bad("bad address"))?;
            let access = if access == "write" {
                Access::Write
            } else {
                Access::Read
            };
            kv::open(&db)?.grant(&to, access)?;
            "ok".into()
        }
        "tx" | "txdrop" => {
            let db = kv::open(&arg())?;
            let tx = db.begin()?;
            let rest: Vec<String> = std::iter::from_fn(|| w.next().map(str::to_string)).collect();
            for (k, v) in pairs(rest.iter().map(String::as_str)) {
                tx.set(k, v)?;
            }
            if op == "tx" {
                tx.commit()?
            } else {
                tx.rollback()?
            }
            "ok".into()
        }
        "scan" => {
            let (db, prefix) = (arg(), arg());
            kv::open(&db)?
                .scan(prefix)?
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{}={}",
                        String::from_utf8_lossy(k),
                        String::from_utf8_lossy(v)
                    )
                })
                .collect::<Vec<_>>()
                .join(",")
        }
        "sqlw" | "sqlq" => {
            let db = sqlite::open(&arg())?;
            let sql: Vec<&str> = std::iter::from_fn(|| w.next()).collect();
            let sql = sql.join(" ");
            if op == "sqlw" {
                db.write(&sql, &[])?.changes.to_string()
            } else {
                format!("{:?}", db.query(&sql, &[])?.rows)
            }
        }
        "kvsets" => {
            let (db, n) = (kv::open(&arg())?, arg().parse().unwrap_or(0));
            let me = spindle_process::our();
            timed(n, |i| {
                db.set(format!("{}/{i}", me.process()), vec![7u8; 100])
            })?
        }
        "kvgets" => {
            // Timed as a whole: reading the clock (a host call) around each
            // get would cost a tenth of it.
            let (db, n) = (kv::open(&arg())?, arg().parse().unwrap_or(0usize));
            db.set("hot", vec![1u8; 100])?;
            let start = Instant::now();
            for _ in 0..n {
                db.get("hot")?;
            }
            let total = start.elapsed();
            let each = total / n.max(1) as u32;
            format!("ok {n} p50 {} total {}", each.as_nanos(), total.as_nanos())
        }
        "sqlgets" => {
            let (db, n) = (sqlite::open(&arg())?, arg().parse().unwrap_or(0));
            db.write(
                "CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, name TEXT)",
                &[],
            )?;
            db.write("INSERT OR REPLACE INTO t VALUES (1, 'one')", &[])?;
            timed(n, |_| {
                db.query("SELECT name FROM t WHERE id = ?1", &[SqlValue::Integer(1)])
                    .map(|_| ())
            })?
        }
        other => format!("err unknown command {other:?}"),
    })
}

fn show(v: Option<Vec<u8>>) -> String {
    v.map_or_else(
        || "none".into(),
        |v| String::from_utf8_lossy(&v).into_owned(),
    )
}

fn bad(why: &str) -> spindle_process::DbError {
    spindle_process::DbError {
        kind: "bad-request".into(),
        message: why.into(),
    }
}
