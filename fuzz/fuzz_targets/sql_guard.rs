//! A process's SQL under the guard: answered, and no file but its own
//! database is ever touched.
#![no_main]
use spindle_db::guard::{Guard, first_keyword};
use std::sync::OnceLock;

struct Db {
    dir: tempfile::TempDir,
    conn: rusqlite::Connection,
    guard: Guard,
}

// SAFETY of sharing: libFuzzer runs the target on one thread.
struct One(std::sync::Mutex<Db>);

fn db() -> &'static One {
    static DB: OnceLock<One> = OnceLock::new();
    DB.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = rusqlite::Connection::open(dir.path().join("own.sqlite")).unwrap();
        let guard = Guard::install(&mut conn).unwrap();
        conn.execute_batch("CREATE TABLE IF NOT EXISTS t (x)").unwrap();
        One(std::sync::Mutex::new(Db { dir, conn, guard }))
    })
}

libfuzzer_sys::fuzz_target!(|sql: &str| {
    let _ = first_keyword(sql);
    let d = db().0.lock().unwrap_or_else(|p| p.into_inner());
    let _ = d.guard.guest(sql, || d.conn.prepare(sql)?.execute([]));
    for e in std::fs::read_dir(d.dir.path()).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(name.starts_with("own.sqlite"), "a file appeared: {name}");
    }
});
