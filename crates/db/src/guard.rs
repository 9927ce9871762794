//! What a process's SQL may do: touch its own database, and nothing else.
//!
//! Every connection the module opens carries a [`Guard`]: SQLite's
//! authorizer, consulted as each statement is compiled, plus limits
//! (`SQLITE_LIMIT_ATTACHED = 0`), defensive mode (no writable schema, no
//! shadow-table writes) and untrusted schemas, and a progress handler that
//! ends a statement running past [`MAX_STATEMENT_TIME`]. The module's own
//! statements (its transactions and savepoints, the kv table) run with the
//! guard open; a process's run inside [`Guard::guest`], where the
//! authorizer refuses:
//!
//! - `ATTACH` / `DETACH` (another file, another package's data);
//! - transaction and savepoint statements (the module's group commit is
//!   the only transaction; a process's `COMMIT` would end it early);
//! - every `PRAGMA` outside [`PRAGMAS`] (journals, synchronous, files,
//!   other schemas), and pragmas on any schema but `main`;
//! - extension loading and file functions;
//! - temporary tables, views, triggers and indexes (they live outside the
//!   database's file);
//!
//! and [`check_statement`] refuses `VACUUM` (whose `INTO` writes a file
//! anywhere), which the authorizer does not see. rusqlite's prepare
//! refuses a second statement after the first, so one call is one
//! statement. A refusal says what was refused, and nothing of the
//! statement ran.

use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::limits::Limit;
use rusqlite::{Connection, config::DbConfig};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest a process's statement may run: it holds its database's writer
/// (and a thread) meanwhile, so a runaway `WITH RECURSIVE` must end.
pub const MAX_STATEMENT_TIME: Duration = Duration::from_secs(5);
/// Largest string or blob a statement may make (`SQLITE_LIMIT_LENGTH`):
/// whatever it makes must fit in an answer.
pub const MAX_VALUE_BYTES: i32 = 16 << 20;
/// VM steps between looks at the clock (about 100 µs of work).
const PROGRESS_STEPS: i32 = 10_000;

/// Pragmas a process may run, and whether it may set them: they read its
/// own schema or set values that live in its own file's header.
pub const PRAGMAS: &[(&str, bool)] = &[
    ("application_id", true),
    ("collation_list", false),
    ("data_version", false),
    ("foreign_key_check", false),
    ("foreign_key_list", false),
    ("freelist_count", false),
    ("function_list", false),
    ("index_info", false),
    ("index_list", false),
    ("index_xinfo", false),
    ("integrity_check", false),
    ("module_list", false),
    ("page_count", false),
    ("page_size", false),
    ("pragma_list", false),
    ("quick_check", false),
    ("schema_version", false),
    ("table_info", false),
    ("table_list", false),
    ("table_xinfo", false),
    ("user_version", true),
];

/// Functions a process may not call.
const FUNCTIONS: &[&str] = &[
    "load_extension",
    "fts3_tokenizer",
    "readfile",
    "writefile",
    "edit",
];

/// Why a process's statement did not run.
#[derive(Debug, PartialEq)]
pub enum GuestError {
    /// The guard refused part of it: what, and why.
    Refused(String),
    /// It ran past [`MAX_STATEMENT_TIME`] and was stopped (nothing applied).
    TooLong,
    /// SQLite's own error.
    Sql(rusqlite::Error),
}

#[derive(Default)]
struct State {
    /// A process's statement is being compiled or run.
    guest: AtomicBool,
    started: Mutex<Option<Instant>>,
    /// The first refusal of the statement being compiled.
    refused: Mutex<Option<String>>,
}

/// The guard of one connection.
pub struct Guard {
    state: Arc<State>,
}

impl Guard {
    /// Puts the guard on `conn`.
    pub fn install(conn: &mut Connection) -> rusqlite::Result<Guard> {
        conn.set_limit(Limit::SQLITE_LIMIT_ATTACHED, 0)?;
        // No string or blob a statement makes may be larger than a message.
        conn.set_limit(Limit::SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)?;
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)?;
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_TRUSTED_SCHEMA, false)?;
        let state = Arc::new(State::default());
        let auth = state.clone();
        conn.authorizer(Some(move |ctx: AuthContext<'_>| {
            if !auth.guest.load(Ordering::Relaxed) {
                return Authorization::Allow;
            }
            match judge(&ctx) {
                Ok(()) => Authorization::Allow,
                Err(why) => {
                    let mut r = auth.refused.lock().unwrap_or_else(|p| p.into_inner());
                    r.get_or_insert(why);
                    Authorization::Deny
                }
            }
        }))?;
        let clock = state.clone();
        conn.progress_handler(
            PROGRESS_STEPS,
            Some(move || {
                clock.guest.load(Ordering::Relaxed)
                    && clock
                        .started
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .is_some_and(|t| t.elapsed() > MAX_STATEMENT_TIME)
            }),
        )?;
        Ok(Guard { state })
    }

    /// Runs a process's statement: compiled and run under the guard.
    pub fn guest<T>(
        &self,
        sql: &str,
        run: impl FnOnce() -> rusqlite::Result<T>,
    ) -> Result<T, GuestError> {
        check_statement(sql)?;
        let s = &self.state;
        *s.refused.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *s.started.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        s.guest.store(true, Ordering::Relaxed);
        let out = run();
        s.guest.store(false, Ordering::Relaxed);
        let started = s.started.lock().unwrap_or_else(|p| p.into_inner()).take();
        let refused = s.refused.lock().unwrap_or_else(|p| p.into_inner()).take();
        out.map_err(|e| {
            if let Some(why) = refused {
                return GuestError::Refused(why);
            }
            if e.sqlite_error_code() == Some(rusqlite::ErrorCode::OperationInterrupted)
                && started.is_some_and(|t| t.elapsed() > MAX_STATEMENT_TIME)
            {
                return GuestError::TooLong;
            }
            if matches!(e, rusqlite::Error::MultipleStatement) {
                return GuestError::Refused(
                    "more than one statement: send one statement per call".into(),
                );
            }
            GuestError::Sql(e)
        })
    }
}

/// What the authorizer allows a process's statement.
fn judge(ctx: &AuthContext<'_>) -> Result<(), String> {
    let schema = ctx.database_name;
    let main_only = |what: &str| match schema {
        None | Some("main") => Ok(()),
        Some("temp") => Err(format!(
            "{what} in the temp schema: temporary tables, views, triggers and indexes live outside the database's file; create ordinary ones"
        )),
        Some(other) => Err(format!(
            "{what} in schema {other:?}: a statement reaches only its own database"
        )),
    };
    match ctx.action {
        AuthAction::Attach { .. } | AuthAction::Detach { .. } => Err(
            "ATTACH and DETACH: a statement reaches only its own database; open another through the module (`open`, or `open_in` with a grant)".into(),
        ),
        AuthAction::Transaction { .. } | AuthAction::Savepoint { .. } => Err(
            "BEGIN, COMMIT, ROLLBACK, SAVEPOINT and RELEASE belong to the module: each write is its own transaction"
                .into(),
        ),
        AuthAction::Pragma {
            pragma_name,
            pragma_value,
        } => {
            let name = pragma_name.to_ascii_lowercase();
            if !matches!(schema, None | Some("main")) {
                return Err(format!(
                    "PRAGMA {pragma_name} on schema {:?}: only the database's own (main)",
                    schema.unwrap_or_default()
                ));
            }
            match PRAGMAS.iter().find(|(p, _)| *p == name) {
                Some((_, settable)) if pragma_value.is_none() || *settable => Ok(()),
                Some(_) => Err(format!("PRAGMA {pragma_name} = …: it may be read, not set")),
                None => Err(format!(
                    "PRAGMA {pragma_name}: the module keeps the database's files, journal and settings; allowed are {}",
                    PRAGMAS.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
                )),
            }
        }
        AuthAction::Function { function_name } => {
            let name = function_name.to_ascii_lowercase();
            if FUNCTIONS.contains(&name.as_str()) {
                Err(format!("function {function_name}(): it reaches outside the database"))
            } else {
                Ok(())
            }
        }
        AuthAction::CreateTempIndex { .. }
        | AuthAction::CreateTempTable { .. }
        | AuthAction::CreateTempTrigger { .. }
        | AuthAction::CreateTempView { .. } => Err(
            "temporary tables, views, triggers and indexes: they live outside the database's file; create ordinary ones"
                .into(),
        ),
        AuthAction::Unknown { code, .. } => Err(format!("an unknown action ({code})")),
        AuthAction::Select | AuthAction::Recursive => Ok(()),
        AuthAction::Read { .. } => main_only("reading"),
        AuthAction::Insert { .. } | AuthAction::Update { .. } | AuthAction::Delete { .. } => {
            main_only("writing")
        }
        _ => main_only("a schema change"),
    }
}

/// The statement's first keyword (after comments and `EXPLAIN`), upper-case.
pub fn first_keyword(sql: &str) -> String {
    let mut rest = sql;
    loop {
        // Empty statements before the first are skipped, as SQLite does.
        rest = rest.trim_start().trim_start_matches(';');
        if rest.starts_with(|c: char| c.is_whitespace() || c == ';') {
            continue;
        }
        if let Some(r) = rest.strip_prefix("--") {
            rest = r.split_once('\n').map_or("", |(_, after)| after);
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.split_once("*/").map_or("", |(_, after)| after);
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let word = rest[..end].to_ascii_uppercase();
            match word.as_str() {
                "EXPLAIN" => rest = &rest[end..],
                "QUERY" | "PLAN" => rest = &rest[end..],
                _ => return word,
            }
        }
    }
}

/// Refusals the authorizer cannot make: `VACUUM` has no action of its own.
pub fn check_statement(sql: &str) -> Result<(), GuestError> {
    if first_keyword(sql) == "VACUUM" {
        return Err(GuestError::Refused(
            "VACUUM: it rewrites the whole file (and VACUUM INTO writes another)".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn guarded() -> (tempfile::TempDir, Connection, Guard) {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("own.sqlite")).unwrap();
        let g = Guard::install(&mut conn).unwrap();
        conn.execute_batch("CREATE TABLE t (x)").unwrap();
        (dir, conn, g)
    }

    fn exec(conn: &Connection, g: &Guard, sql: &str) -> Result<usize, GuestError> {
        g.guest(sql, || conn.prepare(sql)?.execute([]))
    }

    fn refused(r: Result<usize, GuestError>) -> String {
        match r {
            Err(GuestError::Refused(why)) => why,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn another_file_is_out_of_reach() {
        let (dir, conn, g) = guarded();
        let other = dir.path().join("other.sqlite");
        Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE secret (x); INSERT INTO secret VALUES ('vault')")
            .unwrap();
        for sql in [
            format!("ATTACH DATABASE '{}' AS y", other.display()),
            format!("/**/ATTACH '{}' AS y", other.display()),
            format!("-- x\nattach '{}' as y", other.display()),
        ] {
            let why = refused(exec(&conn, &g, &sql));
            assert!(why.contains("ATTACH"), "{why}");
        }
        let why = refused(exec(
            &conn,
            &g,
            &format!("VACUUM INTO '{}'", dir.path().join("copy").display()),
        ));
        assert!(why.contains("VACUUM"), "{why}");
        assert!(!dir.path().join("copy").exists());
        assert!(refused(exec(&conn, &g, "SELECT load_extension('x')")).contains("load_extension"));
    }

    #[test]
    fn the_modules_transaction_is_its_own() {
        let (_dir, conn, g) = guarded();
        conn.execute_batch("BEGIN IMMEDIATE; SAVEPOINT one")
            .unwrap();
        for sql in [
            "/**/COMMIT",
            "END",
            "ROLLBACK",
            "SAVEPOINT x",
            "RELEASE one",
            "BEGIN",
        ] {
            let why = refused(exec(&conn, &g, sql));
            assert!(why.contains("module"), "{sql}: {why}");
            assert!(!conn.is_autocommit(), "{sql} ended the transaction");
        }
        // The module's own statements pass.
        conn.execute_batch("RELEASE one; COMMIT").unwrap();
    }

    #[test]
    fn pragmas_that_touch_files_or_settings_are_refused() {
        let (_dir, conn, g) = guarded();
        for sql in [
            "PRAGMA journal_mode = DELETE",
            "PRAGMA synchronous = OFF",
            "PRAGMA temp.table_info(t)",
            "PRAGMA writable_schema = 1",
            "PRAGMA schema_version = 7",
            "pragma main.journal_mode",
        ] {
            let why = refused(exec(&conn, &g, sql));
            assert!(why.contains("PRAGMA"), "{sql}: {why}");
        }
        let mut st = conn.prepare("PRAGMA table_info(t)").unwrap();
        drop(st.query([]).unwrap());
        drop(st);
        g.guest("PRAGMA user_version = 3", || {
            conn.execute_batch("PRAGMA user_version = 3")
        })
        .unwrap();
        let v: i64 = g
            .guest("PRAGMA user_version", || {
                conn.query_row("PRAGMA user_version", [], |r| r.get(0))
            })
            .unwrap();
        assert_eq!(v, 3);
    }

    #[test]
    fn one_statement_per_call() {
        let (_dir, conn, g) = guarded();
        let why = refused(exec(
            &conn,
            &g,
            "INSERT INTO t VALUES (1); INSERT INTO t VALUES (2)",
        ));
        assert!(why.contains("one statement"), "{why}");
        let n: i64 = conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0, "nothing of a refused call ran");
        // A trailing comment is not a statement.
        assert_eq!(
            exec(&conn, &g, "INSERT INTO t VALUES (1); -- done").unwrap(),
            1
        );
        assert!(refused(exec(&conn, &g, "CREATE TEMP TABLE x (y)")).contains("temporary"));
        assert!(
            refused(exec(&conn, &g, "CREATE VIRTUAL TABLE temp.v USING fts5(a)")).contains("temp")
        );
        // Nothing a statement makes is larger than an answer may be.
        let huge = "SELECT length(zeroblob(100000000))";
        assert!(matches!(
            g.guest(huge, || conn.query_row(huge, [], |r| r.get::<_, i64>(0))),
            Err(GuestError::Sql(_))
        ));
        exec(&conn, &g, "CREATE TABLE u (y)").unwrap();
    }

    #[test]
    fn a_runaway_statement_ends() {
        let (_dir, conn, g) = guarded();
        let sql = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c";
        let started = Instant::now();
        let r = g.guest(sql, || conn.query_row(sql, [], |r| r.get::<_, i64>(0)));
        assert_eq!(r, Err(GuestError::TooLong));
        assert!(started.elapsed() < MAX_STATEMENT_TIME * 3);
        // The connection is usable afterwards.
        assert_eq!(exec(&conn, &g, "INSERT INTO t VALUES (1)").unwrap(), 1);
    }

    #[test]
    fn first_keywords() {
        assert_eq!(first_keyword("  /* a */ -- b\n vacuum"), "VACUUM");
        assert_eq!(
            first_keyword("EXPLAIN QUERY PLAN VACUUM INTO 'x'"),
            "VACUUM"
        );
        assert_eq!(first_keyword("select 1"), "SELECT");
        assert_eq!(first_keyword(" ;; ; VACUUM INTO 'x'"), "VACUUM");
        assert_eq!(first_keyword("/* unterminated"), "");
        assert_eq!(first_keyword("-- only"), "");
    }

    proptest! {
        /// Whatever text comes, the guard answers (never panics) and
        /// nothing outside the database changes.
        #[test]
        fn any_text_is_answered(sql in "\\PC{0,80}", prefix in "(/\\*\\*/|-- \n| |ATTACH |VACUUM |PRAGMA )*") {
            let (dir, conn, g) = guarded();
            let text = format!("{prefix}{sql}");
            let _ = exec(&conn, &g, &text);
            let _ = first_keyword(&text);
            let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with("own.sqlite"))
                .collect();
            prop_assert!(files.is_empty(), "files appeared: {files:?}");
        }
    }
}
