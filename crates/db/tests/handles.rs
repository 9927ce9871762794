//! Handles and threads the databases take, measured in a process of
//! their own (other tests would share the counts).

mod common;
use common::*;
use serde_json::json;

fn count_entries(dir: &str) -> usize {
    std::fs::read_dir(dir).expect(dir).count()
}

/// Opening databases costs no threads, and a package holds a bounded
/// number open at once: the node's handles are not its to take.
#[tokio::test(flavor = "current_thread")]
async fn many_databases_cost_no_threads_and_bounded_handles() {
    use spindle_db::MAX_OPEN_PER_PACKAGE;
    let dir = tempfile::tempdir().unwrap();
    let bus = node(dir.path());
    let mut p = Caller::new(&bus, "local@hoarder:shop:acme");
    let threads = count_entries("/proc/self/task");
    let fds = count_entries("/proc/self/fd");
    for i in 0..(MAX_OPEN_PER_PACKAGE * 4) {
        let r = p
            .kv(json!({"op": "set", "db": format!("d{i}"), "key": "k", "value": "v"}))
            .await;
        assert_eq!(r, json!({"ok": true}), "db {i}");
    }
    let grew_threads = count_entries("/proc/self/task").saturating_sub(threads);
    let grew_fds = count_entries("/proc/self/fd").saturating_sub(fds);
    assert!(grew_threads <= 2, "{grew_threads} threads more");
    // A write connection holds the file, its WAL and its shared memory.
    assert!(
        grew_fds <= MAX_OPEN_PER_PACKAGE * 4,
        "{grew_fds} handles more"
    );
    // A closed one reopens on use, with its data.
    let r = p
        .kv(json!({"op": "get", "db": "d0", "key": "k", "text": true}))
        .await;
    assert_eq!(r, json!({"found": true, "value": "v"}));
}
