//! The modules on a real bus, as a process reaches them: requests in,
//! responses (and blobs) back, files on disk.

use serde_json::{Value, json};
use std::sync::Arc;

mod common;
use common::*;

#[tokio::test(flavor = "current_thread")]
async fn kv_sets_gets_scans_and_transactions_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let bus = node(dir.path());
        let mut p = Caller::new(&bus, "local@api:shop:acme");
        assert_eq!(
            p.kv(json!({"op": "open", "db": "orders"})).await,
            json!({"ok": true})
        );
        let bin = [0u8, 255, 10, 13];
        let (r, _) = p
            .ask(
                "kv",
                json!({"op": "set", "db": "orders", "key": "a/1"}),
                Some(&bin),
            )
            .await;
        assert_eq!(r, json!({"ok": true}));
        let (r, blob) = p
            .ask(
                "kv",
                json!({"op": "get", "db": "orders", "key": "a/1"}),
                None,
            )
            .await;
        assert_eq!(
            (r, blob.as_deref()),
            (json!({"found": true}), Some(&bin[..])),
            "binary-exact, in the blob"
        );
        p.kv(json!({"op": "set", "db": "orders", "key": "a/2", "value": "two"}))
            .await;
        p.kv(json!({"op": "set", "db": "orders", "key": "b/1", "value": "other"}))
            .await;
        p.kv(json!({"op": "set", "db": "orders", "key_base64": "YS//", "value": "raw key"}))
            .await;
        let (r, blob) = p
            .ask(
                "kv",
                json!({"op": "scan", "db": "orders", "prefix": "a/"}),
                None,
            )
            .await;
        assert_eq!(r, json!({"count": 3, "more": false}));
        let blob = blob.unwrap();
        let mut pairs = Vec::new();
        let mut at = 0;
        while at < blob.len() {
            let n = u32::from_le_bytes(blob[at..at + 4].try_into().unwrap()) as usize;
            let k = blob[at + 4..at + 4 + n].to_vec();
            at += 4 + n;
            let n = u32::from_le_bytes(blob[at..at + 4].try_into().unwrap()) as usize;
            let v = blob[at + 4..at + 4 + n].to_vec();
            at += 4 + n;
            pairs.push((k, v));
        }
        assert_eq!(
            pairs,
            vec![
                (b"a/1".to_vec(), bin.to_vec()),
                (b"a/2".to_vec(), b"two".to_vec()),
                (b"a/\xff".to_vec(), b"raw key".to_vec())
            ]
        );
        // A transaction: nothing shows until it commits; a rolled back one never.
        let tx = p.kv(json!({"op": "begin", "db": "orders"})).await["tx"]
            .as_u64()
            .unwrap();
        p.kv(json!({"op": "set", "db": "orders", "key": "t/1", "value": "x", "tx": tx}))
            .await;
        p.kv(json!({"op": "delete", "db": "orders", "key": "a/2", "tx": tx}))
            .await;
        let got = p
            .kv(json!({"op": "get", "db": "orders", "key": "t/1", "text": true}))
            .await;
        assert_eq!(got, json!({"found": false}));
        assert_eq!(
            p.kv(json!({"op": "commit", "tx": tx})).await,
            json!({"ok": true})
        );
        let got = p
            .kv(json!({"op": "get", "db": "orders", "key": "t/1", "text": true}))
            .await;
        assert_eq!(got, json!({"found": true, "value": "x"}));
        let tx = p.kv(json!({"op": "begin", "db": "orders"})).await["tx"]
            .as_u64()
            .unwrap();
        p.kv(json!({"op": "set", "db": "orders", "key": "t/2", "value": "never", "tx": tx}))
            .await;
        p.kv(json!({"op": "rollback", "tx": tx})).await;
        assert_eq!(
            p.kv(json!({"op": "commit", "tx": tx})).await["error"],
            "no-such-tx"
        );
    }
    // A new node on the same files: everything acknowledged is there.
    let bus = node(dir.path());
    let mut p = Caller::new(&bus, "local@api:shop:acme");
    for (k, v) in [
        ("a/2", None),
        ("b/1", Some("other")),
        ("t/1", Some("x")),
        ("t/2", None),
    ] {
        let got = p
            .kv(json!({"op": "get", "db": "orders", "key": k, "text": true}))
            .await;
        let want = match v {
            Some(v) => json!({"found": true, "value": v}),
            None => json!({"found": false}),
        };
        assert_eq!(got, want, "{k}");
    }
    let listed = spindle_db::list(dir.path());
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].1.as_str(), listed[0].2.as_str()),
        ("shop:acme", "orders")
    );
    let mut out = Vec::new();
    spindle_db::dump(
        dir.path(),
        spindle_db::store::Kind::Kv,
        "shop:acme",
        "orders",
        &mut out,
    )
    .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains("\"a/1\"\tbase64:AP8KDQ==") && text.contains("\"t/1\"\t\"x\""),
        "{text}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn other_packages_need_a_grant_and_a_refused_write_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let bus = node(dir.path());
    let mut owner = Caller::new(&bus, "local@api:shop:acme");
    let mut other = Caller::new(&bus, "local@report:books:acme");
    owner
        .kv(json!({"op": "set", "db": "orders", "key": "k", "value": "mine"}))
        .await;
    let theirs = |op: &str| json!({"op": op, "db": "orders", "package": "shop:acme", "key": "k", "value": "stolen", "text": true});
    let r = other.kv(theirs("set")).await;
    assert_eq!(r["error"], "no-access", "{r}");
    assert!(r["message"].as_str().unwrap().contains("grant"), "{r}");
    assert_eq!(other.kv(theirs("get")).await["error"], "no-access");
    // Nor may it grant itself anything, or create databases in that package.
    let grant = json!({"op": "grant", "db": "orders", "package": "shop:acme", "to": "local@report:books:acme", "access": "write"});
    assert_eq!(other.kv(grant.clone()).await["error"], "no-access");
    assert_eq!(
        owner
            .kv(json!({"op": "get", "db": "orders", "key": "k", "text": true}))
            .await["value"],
        "mine"
    );
    // Granted read: reads, still cannot write.
    let read =
        json!({"op": "grant", "db": "orders", "to": "local@report:books:acme", "access": "read"});
    assert_eq!(owner.kv(read).await, json!({"ok": true}));
    assert_eq!(other.kv(theirs("get")).await["value"], "mine");
    assert_eq!(other.kv(theirs("set")).await["error"], "no-access");
    assert_eq!(owner.kv(grant).await, json!({"ok": true}));
    assert_eq!(other.kv(theirs("set")).await, json!({"ok": true}));
    assert_eq!(
        owner
            .kv(json!({"op": "get", "db": "orders", "key": "k", "text": true}))
            .await["value"],
        "stolen"
    );
    // An unknown database of another package is not created by reading it.
    assert_eq!(
        other
            .kv(json!({"op": "get", "db": "nothing", "package": "shop:acme", "key": "k"}))
            .await["error"],
        "no-access"
    );
    let r = owner
        .kv(json!({"op": "get", "db": "nothing", "key": "k"}))
        .await;
    assert_eq!(r["error"], "no-such-db", "{r}");
    // Bad requests say what is wrong.
    assert!(
        owner
            .kv(json!({"op": "get", "db": "Bad Name", "key": "k"}))
            .await["message"]
            .as_str()
            .unwrap()
            .contains("a-z")
    );
    assert_eq!(
        owner.kv(json!({"op": "fly", "db": "orders"})).await["error"],
        "bad-request"
    );
    let (r, _) = owner.ask("kv", json!("not an object"), None).await;
    assert_eq!(r["error"], "bad-request");
}

#[tokio::test(flavor = "current_thread")]
async fn a_corrupt_file_is_reported_and_harms_no_other_database() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("kv/shop:acme/broken.sqlite");
    std::fs::create_dir_all(bad.parent().unwrap()).unwrap();
    let junk = b"this is not a database, but it was someone's data".repeat(100);
    std::fs::write(&bad, &junk).unwrap();
    let bus = node(dir.path());
    let mut p = Caller::new(&bus, "local@api:shop:acme");
    let r = p
        .kv(json!({"op": "set", "db": "broken", "key": "k", "value": "v"}))
        .await;
    assert_eq!(r["error"], "corrupt", "{r}");
    assert!(
        r["message"].as_str().unwrap().contains("broken.sqlite"),
        "{r}"
    );
    assert_eq!(
        std::fs::read(&bad).unwrap(),
        junk,
        "the file is left as it was"
    );
    assert_eq!(
        p.kv(json!({"op": "set", "db": "fine", "key": "k", "value": "v"}))
            .await,
        json!({"ok": true})
    );
}

#[tokio::test(flavor = "current_thread")]
async fn sqlite_writes_and_queries_with_typed_values() {
    let dir = tempfile::tempdir().unwrap();
    let bus = node(dir.path());
    let mut p = Caller::new(&bus, "local@api:shop:acme");
    let w = |sql: &str, params: Value| json!({"op": "write", "db": "app", "sql": sql, "params": params});
    let (r, _) = p
        .ask(
            "sqlite",
            w(
                "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT UNIQUE, score REAL, data BLOB)",
                json!([]),
            ),
            None,
        )
        .await;
    assert_eq!(r["changes"], 0, "{r}");
    let (r, _) = p
        .ask(
            "sqlite",
            w(
                "INSERT INTO t (name, score, data) VALUES (?1, ?2, ?3)",
                json!(["ann", 2.5, {"blob": [1, 3]}]),
            ),
            Some(&[9, 0, 255, 7, 9]),
        )
        .await;
    assert_eq!(r, json!({"changes": 1, "last_insert_rowid": 1}));
    // A failing statement fails alone, and applies nothing.
    let (r, _) = p
        .ask(
            "sqlite",
            w("INSERT INTO t (name) VALUES (?1)", json!(["ann"])),
            None,
        )
        .await;
    assert_eq!(r["error"], "statement", "{r}");
    assert!(r["message"].as_str().unwrap().contains("UNIQUE"), "{r}");
    let (r, _) = p.ask("sqlite", w("/**/COMMIT", json!([])), None).await;
    assert_eq!(r["error"], "refused", "{r}");
    assert!(r["message"].as_str().unwrap().contains("COMMIT"), "{r}");
    let q = json!({"op": "query", "db": "app", "sql": "SELECT id, name, score, data, NULL AS n FROM t WHERE name = ?1", "params": ["ann"]});
    let (r, blob) = p.ask("sqlite", q, None).await;
    assert_eq!(
        r,
        json!({"columns": ["id", "name", "score", "data", "n"], "rows": [[1, "ann", 2.5, {"blob": [0, 3]}, null]]})
    );
    assert_eq!(blob.unwrap(), vec![0, 255, 7]);
    // Queries cannot write.
    let q = json!({"op": "query", "db": "app", "sql": "DELETE FROM t"});
    let (r, _) = p.ask("sqlite", q, None).await;
    assert_eq!(r["error"], "refused", "{r}");
    assert!(r["message"].as_str().unwrap().contains("only reads"), "{r}");
    let mut out = Vec::new();
    spindle_db::dump(
        dir.path(),
        spindle_db::store::Kind::Sql,
        "shop:acme",
        "app",
        &mut out,
    )
    .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains("CREATE TABLE t")
            && text.contains("INSERT INTO \"t\" VALUES (1, 'ann', 2.5, X'00FF07');"),
        "{text}"
    );
}

/// A package's SQL reaches its own database and nothing else: not another
/// package's file (ATTACH, however it is hidden), not the module's
/// transaction, and a hostile parameter is an error, not a panic.
#[tokio::test(flavor = "current_thread")]
async fn sql_is_confined_to_its_own_database() {
    let dir = tempfile::tempdir().unwrap();
    let bus = node(dir.path());
    let mut owner = Caller::new(&bus, "local@vault:bank:acme");
    let mut thief = Caller::new(&bus, "local@api:shop:acme");
    let w = |db: &str, sql: &str| json!({"op": "write", "db": db, "sql": sql});
    let q = |db: &str, sql: &str| json!({"op": "query", "db": db, "sql": sql});
    for sql in ["CREATE TABLE t (x)", "INSERT INTO t VALUES ('gold')"] {
        let (r, _) = owner.ask("sqlite", w("vault", sql), None).await;
        assert!(r.get("error").is_none(), "{r}");
    }
    let (r, _) = thief
        .ask("sqlite", w("mine", "CREATE TABLE t (x)"), None)
        .await;
    assert!(r.get("error").is_none(), "{r}");
    let vault = dir.path().join("sqlite/bank:acme/vault.sqlite");
    assert!(vault.exists());
    let v = vault.display();
    for (op, sql) in [
        ("query", format!("ATTACH DATABASE '{v}' AS y")),
        ("write", format!("/**/ATTACH '{v}' AS y2")),
        ("write", format!("-- note\nATTACH '{v}' AS y3")),
        ("query", format!("VACUUM INTO '{v}.copy'")),
        ("write", "PRAGMA journal_mode = DELETE".to_string()),
        (
            "write",
            "INSERT INTO t VALUES (1); DELETE FROM t".to_string(),
        ),
    ] {
        let body = if op == "query" {
            q("mine", &sql)
        } else {
            w("mine", &sql)
        };
        let (r, _) = thief.ask("sqlite", body, None).await;
        assert_eq!(r["error"], "refused", "{sql}: {r}");
    }
    // Nothing left over: the other file unchanged, no copy made.
    let (r, _) = owner
        .ask("sqlite", q("vault", "SELECT x FROM t"), None)
        .await;
    assert_eq!(r["rows"], json!([["gold"]]));
    assert!(
        !dir.path()
            .join("sqlite/bank:acme/vault.sqlite.copy")
            .exists()
    );
    let (r, _) = thief
        .ask("sqlite", q("mine", "SELECT count(*) FROM t"), None)
        .await;
    assert_eq!(
        r["rows"],
        json!([[0]]),
        "nothing of the two-statement call ran"
    );
    // Offsets and lengths at their extremes are a bad request.
    for range in [
        json!([u64::MAX, 1]),
        json!([1, u64::MAX]),
        json!([u64::MAX, u64::MAX]),
    ] {
        let body =
            json!({"op": "write", "db": "mine", "sql": "SELECT ?1", "params": [{"blob": range}]});
        let (r, _) = thief.ask("sqlite", body, Some(&[1, 2, 3])).await;
        assert_eq!(r["error"], "bad-request", "{r}");
    }
    // And the module still answers.
    let (r, _) = thief
        .ask("sqlite", w("mine", "INSERT INTO t VALUES (1)"), None)
        .await;
    assert_eq!(r["changes"], 1, "{r}");
}

/// Transactions are a process's own budget: a few at a time, dropped when
/// the process leaves the bus, never the node's to run out of.
#[tokio::test(flavor = "current_thread")]
async fn transactions_are_budgeted_per_process_and_end_with_it() {
    use spindle_db::kv::MAX_TX_PER_PROCESS;
    let dir = tempfile::tempdir().unwrap();
    let bus = node(dir.path());
    let mut a = Caller::new(&bus, "local@a:shop:acme");
    let mut b = Caller::new(&bus, "local@b:shop:acme");
    let begin = json!({"op": "begin", "db": "orders"});
    let mut first = None;
    for _ in 0..MAX_TX_PER_PROCESS {
        let r = a.kv(begin.clone()).await;
        first.get_or_insert(r["tx"].as_u64().expect("a transaction"));
    }
    let r = a.kv(begin.clone()).await;
    assert_eq!(r["error"], "over-budget", "{r}");
    // Another process of the same package is not hurt by it.
    assert!(b.kv(begin.clone()).await["tx"].is_u64());
    // When a's run ends (it leaves the bus), its transactions go with it.
    bus.unregister(&a.me.process);
    assert!(b.kv(begin.clone()).await["tx"].is_u64());
    let mut a = Caller::new(&bus, "local@a:shop:acme");
    let r = a
        .kv(json!({"op": "set", "db": "orders", "tx": first.unwrap(), "key": "k", "value": "v"}))
        .await;
    assert_eq!(r["error"], "no-such-tx", "{r}");
    assert!(a.kv(begin).await["tx"].is_u64(), "the budget is free again");
}

/// One package's slow statements hold at most its share of the threads:
/// another package's query is answered while they run.
#[tokio::test(flavor = "current_thread")]
async fn slow_statements_of_one_package_do_not_stall_another() {
    let dir = tempfile::tempdir().unwrap();
    let bus = node(dir.path());
    // Long enough to outlast the other package's query by far; each ends by itself.
    let runaway = json!({"op": "query", "db": "slow", "sql": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000) SELECT count(*) FROM c"});
    let mut slow = vec![];
    for i in 0..spindle_db::store::POOL_THREADS {
        let mut c = Caller::new(&bus, &format!("local@s{i}:slow:acme"));
        let r = c
            .ask("sqlite", json!({"op": "open", "db": "slow"}), None)
            .await
            .0;
        assert_eq!(r, json!({"ok": true}));
        slow.push(c);
    }
    let mut fast = Caller::new(&bus, "local@f:fast:acme");
    assert_eq!(
        fast.ask("sqlite", json!({"op": "open", "db": "quick"}), None)
            .await
            .0,
        json!({"ok": true})
    );
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = vec![];
    for mut c in slow {
        let (q, done) = (runaway.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let r = c.ask("sqlite", q, None).await.0;
            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            r
        }));
    }
    // Give the runaways the pool first.
    tokio::task::yield_now().await;
    let r = fast
        .ask(
            "sqlite",
            json!({"op": "query", "db": "quick", "sql": "SELECT 42"}),
            None,
        )
        .await
        .0;
    assert_eq!(r["rows"], json!([[42]]));
    assert_eq!(
        done.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the other package's query waited for the runaways"
    );
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r["rows"], json!([[3000000]]), "{r}");
    }
}

mod hostile {
    use super::*;
    use proptest::prelude::*;

    fn field() -> impl Strategy<Value = (String, Value)> {
        let key = prop::sample::select(vec![
            "op",
            "db",
            "package",
            "key",
            "key_base64",
            "value",
            "prefix",
            "prefix_base64",
            "limit",
            "tx",
            "to",
            "access",
            "text",
            "sql",
            "params",
        ]);
        let value = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            prop::sample::select(vec![
                "get",
                "set",
                "delete",
                "scan",
                "begin",
                "commit",
                "rollback",
                "open",
                "grant",
                "revoke",
                "write",
                "query",
                "mine",
                "read",
                "write",
                "local@x:y:z",
                "a:b",
                "SELECT 1",
                "ATTACH 'x' AS y",
                "/**/COMMIT",
                "AA==",
                "!!",
            ])
            .prop_map(Value::from),
            "\\PC{0,12}".prop_map(Value::from),
            prop::collection::vec(
                prop_oneof![
                    any::<i64>().prop_map(Value::from),
                    Just(json!({"blob": [u64::MAX, 1]})),
                    Just(json!({"blob": [0, 2]})),
                    Just(json!({"base64": "%%"})),
                    Just(json!({"x": 1})),
                ],
                0..3
            )
            .prop_map(Value::from),
        ];
        (key.prop_map(String::from), value)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        /// Any request body, to either module: an answer, never a panic
        /// or silence, and the module answers the next request.
        #[test]
        fn any_request_is_answered(
            fields in prop::collection::vec(field(), 0..6),
            module in prop::sample::select(vec!["kv", "sqlite"]),
            raw in prop::collection::vec(any::<u8>(), 0..40),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let bus = node(dir.path());
                let mut p = Caller::new(&bus, "local@fuzz:shop:acme");
                let body: serde_json::Map<String, Value> = fields.into_iter().collect();
                let (r, _) = p.ask(module, Value::Object(body), Some(&[1, 2, 3])).await;
                assert!(r.is_object(), "{r}");
                let (r, _) = p.ask_raw(module, raw.clone()).await;
                assert!(r.is_object(), "{r}");
                let ok = p.kv(json!({"op": "set", "db": "after", "key": "k", "value": "v"})).await;
                assert_eq!(ok, json!({"ok": true}));
            });
        }
    }
}
