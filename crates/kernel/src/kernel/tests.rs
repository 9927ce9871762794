//! Supervision tested with a fake driver and a manual clock: instants are
//! made up, effects are inspected, and the fake driver checks the invariant
//! that a process never has two live runs.

use super::*;
use crate::snapshot::Desired;
use proptest::prelude::*;
use spindle_types::{OnExit, RestartSchedule, manifest::RawProcess};
use std::collections::HashMap;
use std::path::Path;

fn spec(name: &str) -> ProcessSpec {
    RawProcess {
        name: Some(name.into()),
        command: Some("sleep".into()),
        ..Default::default()
    }
    .into_spec(1, Path::new("/"))
    .unwrap()
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// A driver that starts everything instantly and remembers live runs.
struct Fake {
    k: Kernel,
    t0: Instant,
    now: Instant,
    live: HashMap<ProcessNum, RunId>,
    spawns: Vec<(ProcessNum, Instant)>,
    asked: Vec<ProcessNum>,
    killed: Vec<ProcessNum>,
    exits: Vec<(ProcessNum, ExitInfo, Option<Duration>)>,
    settled: Vec<ProcessNum>,
    next_pid: u32,
}

impl Fake {
    fn new() -> Self {
        let t0 = Instant::now();
        Fake {
            k: Kernel::new("test"),
            t0,
            now: t0,
            live: HashMap::new(),
            spawns: vec![],
            asked: vec![],
            killed: vec![],
            exits: vec![],
            settled: vec![],
            next_pid: 100,
        }
    }
    fn wall(&self) -> u64 {
        self.now.duration_since(self.t0).as_millis() as u64
    }
    fn pump(&mut self) {
        loop {
            let effects = self.k.take_effects();
            if effects.is_empty() {
                return;
            }
            for e in effects {
                match e {
                    Effect::Spawn { num, run, .. } => {
                        assert!(!self.live.contains_key(&num), "two live runs of {num}");
                        self.live.insert(num, run);
                        self.spawns.push((num, self.now));
                        self.next_pid += 1;
                        let (now, wall) = (self.now, self.wall());
                        self.k
                            .spawned(num, run, Ok::<_, String>(Some(self.next_pid)), now, wall);
                    }
                    Effect::AskStop { num, .. } => self.asked.push(num),
                    Effect::Kill { num, .. } => self.killed.push(num),
                    Effect::Exited {
                        num,
                        info,
                        restart_in,
                        ..
                    } => self.exits.push((num, info, restart_in)),
                    Effect::Settled { num } => self.settled.push(num),
                    Effect::Removed { .. } => {}
                }
            }
        }
    }
    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.k.tick(self.now);
        self.pump();
    }
    fn start(&mut self, s: ProcessSpec) -> ProcessNum {
        let n = self.k.start(s, self.now).unwrap();
        self.pump();
        n
    }
    fn exit(&mut self, num: ProcessNum, status: ExitStatus) {
        let run = self.live.remove(&num).expect("exit of a live run");
        let (now, wall) = (self.now, self.wall());
        self.k.exited(num, run, status, None, now, wall);
        self.pump();
    }
    fn state(&self, num: ProcessNum) -> &State {
        &self.k.get(num).unwrap().state
    }
    fn last_exit(&self) -> &(ProcessNum, ExitInfo, Option<Duration>) {
        self.exits.last().unwrap()
    }
}

#[test]
fn start_runs_and_persists() {
    let mut f = Fake::new();
    let n = f.start(spec("api"));
    assert!(matches!(f.state(n), State::Running { pid: Some(101), .. }));
    let c = f.k.take_changes();
    assert_eq!(c.put.len(), 1, "{c:?}");
    assert_eq!(c.put[0].num, n);
    // The record reserves a block of ids beyond the one given.
    assert_eq!(
        c.meta.as_ref().map(|m| m.next_num),
        Some(n.0 + IDS_RESERVED)
    );
    assert!(f.k.take_changes().is_empty(), "each change is taken once");
    assert_eq!(f.k.get(n).unwrap().desired, Desired::Running);
}

#[test]
fn crash_loop_follows_schedule_exactly() {
    let mut f = Fake::new();
    let n = f.start(spec("crasher"));
    let expected = [
        100, 500, 1_000, 10_000, 30_000, 60_000, 300_000, 900_000, 900_000,
    ];
    for (i, &delay) in expected.iter().enumerate() {
        f.advance(ms(3));
        f.exit(n, ExitStatus::Code(1));
        assert_eq!(f.last_exit().2, Some(ms(delay)), "restart {i}");
        // Not a moment early.
        f.advance(ms(delay - 1));
        assert_eq!(f.spawns.len(), i + 1);
        assert!(matches!(f.state(n), State::Backoff { .. }));
        assert_eq!(f.k.next_deadline(), Some(f.now + ms(1)));
        f.advance(ms(1));
        assert_eq!(f.spawns.len(), i + 2);
    }
    assert_eq!(f.k.get(n).unwrap().restarts, expected.len() as u32);
}

#[test]
fn healthy_run_then_crash_loop_backs_off_from_the_start() {
    let mut f = Fake::new();
    let n = f.start(spec("flaky"));
    for _ in 0..4 {
        f.advance(ms(2));
        f.exit(n, ExitStatus::Signal(11));
        let d = f.last_exit().2.unwrap();
        f.advance(d);
    }
    assert_eq!(f.last_exit().2, Some(ms(10_000)));
    // A long healthy run, then the loop begins again: 100ms, 500ms, …
    f.advance(Duration::from_secs(31 * 60));
    let mut delays = vec![];
    for _ in 0..3 {
        f.exit(n, ExitStatus::Code(2));
        let d = f.last_exit().2.unwrap();
        delays.push(d);
        f.advance(d);
        f.advance(ms(1));
    }
    assert_eq!(delays, [ms(100), ms(500), ms(1000)]);
}

#[test]
fn stop_is_graceful_then_kills_and_never_restarts() {
    let mut f = Fake::new();
    let n = f.start(spec("ignorer"));
    f.advance(ms(50));
    f.k.stop(&Selector::Id(n), f.now).unwrap();
    f.pump();
    assert_eq!(f.asked, [n]);
    f.advance(ms(199));
    assert!(f.killed.is_empty());
    f.advance(ms(1));
    assert_eq!(f.killed, [n]);
    f.exit(n, ExitStatus::Signal(9));
    let (_, info, restart_in) = f.last_exit();
    assert_eq!(info.reason, ExitReason::Killed);
    assert_eq!(*restart_in, None);
    assert_eq!(*f.state(n), State::Stopped);
    assert_eq!(f.k.get(n).unwrap().desired, Desired::Stopped);
    f.advance(Duration::from_secs(3600));
    assert_eq!(f.spawns.len(), 1);
}

#[test]
fn stop_during_backoff_cancels_the_restart() {
    let mut f = Fake::new();
    let n = f.start(spec("c"));
    f.exit(n, ExitStatus::Code(3));
    assert!(matches!(f.state(n), State::Backoff { .. }));
    f.k.stop(&Selector::Name("c".into()), f.now).unwrap();
    f.pump();
    assert_eq!(f.k.next_deadline(), None);
    assert_eq!(f.settled, vec![n], "the stop is told though no run ended");
    f.advance(Duration::from_secs(60));
    assert_eq!(f.spawns.len(), 1);
    assert_eq!(*f.state(n), State::Stopped);
}

#[test]
fn on_exit_policies() {
    let mut f = Fake::new();
    let mut s = spec("once");
    s.on_exit = OnExit::None;
    let once = f.start(s);
    f.exit(once, ExitStatus::Code(1));
    assert_eq!(*f.state(once), State::Stopped);
    assert_eq!(f.k.get(once).unwrap().desired, Desired::Stopped);

    let done = f.start(spec("job"));
    f.exit(done, ExitStatus::Code(0));
    assert_eq!(f.last_exit().1.reason, ExitReason::Completed);
    assert_eq!(
        f.last_exit().2,
        Some(ms(100)),
        "restart restarts after Completed"
    );

    let mut s = spec("never");
    s.restart = RestartSchedule {
        delays: vec![ms(0)],
        ..Default::default()
    };
    let never = f.start(s);
    f.exit(never, ExitStatus::Code(1));
    assert_eq!(*f.state(never), State::Stopped);
}

#[test]
fn transient_processes_leave_the_table_when_done() {
    let mut f = Fake::new();
    let mut s = spec("job");
    s.on_exit = OnExit::None;
    s.transient = true;
    let n = f.start(s);
    f.exit(n, ExitStatus::Code(0));
    assert!(f.k.get(n).is_none());
    assert_eq!(
        f.last_exit().1.reason,
        ExitReason::Completed,
        "its exit is still reported"
    );
}

#[test]
fn restart_replaces_the_run_and_resets_the_schedule() {
    let mut f = Fake::new();
    let n = f.start(spec("api"));
    for _ in 0..3 {
        f.exit(n, ExitStatus::Code(1));
        let d = f.last_exit().2.unwrap();
        f.advance(d);
    }
    f.k.restart(&Selector::Id(n), f.now).unwrap();
    f.pump();
    assert_eq!(f.asked, [n]);
    f.exit(n, ExitStatus::Signal(15));
    assert_eq!(f.last_exit().1.reason, ExitReason::Killed);
    assert!(
        matches!(f.state(n), State::Running { .. }),
        "restarted at once"
    );
    f.exit(n, ExitStatus::Code(1));
    assert_eq!(f.last_exit().2, Some(ms(100)), "schedule starts over");
}

#[test]
fn delete_stops_then_removes() {
    let mut f = Fake::new();
    let a = f.start(spec("a"));
    f.k.delete(&Selector::Id(a), f.now).unwrap();
    f.pump();
    assert!(f.k.get(a).is_some(), "still stopping");
    f.exit(a, ExitStatus::Signal(15));
    assert!(f.k.get(a).is_none());
    let err = f.k.stop(&Selector::Id(a), f.now).unwrap_err();
    assert!(err.to_string().contains("spindle ls"));
}

#[test]
fn names_repeat_and_actions_apply_to_all() {
    let mut f = Fake::new();
    let a = f.start(spec("web"));
    let b = f.start(spec("web"));
    let c = f.start(spec("db"));
    assert_ne!(a, b);
    let hit = f.k.stop(&Selector::Name("web".into()), f.now).unwrap();
    assert_eq!(hit, [a, b]);
    f.pump();
    assert!(matches!(f.state(c), State::Running { .. }));
    assert!(f.k.stop(&Selector::Name("nope".into()), f.now).is_err());
}

#[test]
fn stale_events_are_ignored() {
    let mut f = Fake::new();
    let n = f.start(spec("x"));
    let old = f.live[&n];
    f.exit(n, ExitStatus::Code(1));
    f.advance(ms(100));
    let (now, wall) = (f.now, f.wall());
    f.k.exited(n, old, ExitStatus::Code(1), None, now, wall);
    f.pump();
    assert!(matches!(f.state(n), State::Running { .. }));
}

#[test]
fn spawn_failure_is_a_crash_with_its_reason() {
    let mut f = Fake::new();
    let n = f.k.start(spec("gone"), f.now).unwrap();
    let effects = f.k.take_effects();
    let Effect::Spawn { run, .. } = effects[0] else {
        panic!("spawn first")
    };
    let (now, wall) = (f.now, f.wall());
    f.k.spawned(
        n,
        run,
        Err::<Option<u32>, _>("executable not found"),
        now,
        wall,
    );
    f.pump();
    let (_, info, restart_in) = f.last_exit();
    assert_eq!(info.reason, ExitReason::Crashed);
    assert_eq!(info.detail.as_deref(), Some("executable not found"));
    assert_eq!(*restart_in, Some(ms(100)));
}

#[test]
fn fault_ends_as_crash_and_restarts() {
    let mut f = Fake::new();
    let n = f.start(spec("hog"));
    let run = f.live[&n];
    f.k.fault(n, run, "memory limit exceeded".into(), f.now);
    f.pump();
    assert_eq!(f.asked, [n]);
    f.exit(n, ExitStatus::Signal(15));
    let (_, info, restart_in) = f.last_exit();
    assert_eq!(info.reason, ExitReason::Crashed);
    assert_eq!(info.detail.as_deref(), Some("memory limit exceeded"));
    assert_eq!(*restart_in, Some(ms(100)));
}

#[test]
fn a_hung_run_is_killed_at_once_and_restarted_as_a_crash() {
    let mut f = Fake::new();
    let mut s = spec("stuck");
    s.grace = Duration::from_secs(30);
    let n = f.start(s);
    let run = f.live[&n];
    f.k.hung(n, run, "heartbeat lost".into(), f.now);
    f.pump();
    assert_eq!(f.killed, [n], "no waiting out the 30 s grace");
    f.exit(n, ExitStatus::Signal(9));
    let (_, info, restart_in) = f.last_exit();
    assert_eq!(info.reason, ExitReason::Crashed);
    assert_eq!(info.detail.as_deref(), Some("heartbeat lost"));
    assert_eq!(*restart_in, Some(ms(100)));
    // A stale run is ignored.
    f.k.hung(n, run, "late".into(), f.now);
    f.pump();
    assert_eq!(f.killed, [n]);
}

#[test]
fn shutdown_and_restore() {
    let mut f = Fake::new();
    let keep = f.start(spec("keep"));
    let stopped = f.start(spec("stopped"));
    let mut s = spec("oneshot");
    s.on_exit = OnExit::None;
    let oneshot = f.start(s);
    f.k.stop(&Selector::Id(stopped), f.now).unwrap();
    f.pump();
    f.exit(stopped, ExitStatus::Signal(15));
    f.k.shutdown(f.now);
    f.pump();
    assert!(f.k.start(spec("late"), f.now).is_err());
    f.exit(keep, ExitStatus::Signal(15));
    f.exit(oneshot, ExitStatus::Signal(15));
    assert!(f.k.is_quiescent());
    assert_eq!(f.last_exit().1.reason, ExitReason::Shutdown);
    assert_eq!(f.k.next_deadline(), None, "no restart while shutting down");

    let snap = f.k.snapshot();
    let json = serde_json::to_string(&snap).unwrap();
    let back: TableSnapshot = serde_json::from_str(&json).unwrap();
    let mut k = Kernel::restore(back, f.now);
    let spawned: BTreeSet<ProcessNum> = k
        .take_effects()
        .into_iter()
        .filter_map(|e| match e {
            Effect::Spawn { num, .. } => Some(num),
            _ => None,
        })
        .collect();
    assert_eq!(spawned, BTreeSet::from([keep]));
    // Ids continue past the block the earlier daemon had reserved.
    assert_eq!(
        k.start(spec("new"), f.now).unwrap(),
        ProcessNum(1 + IDS_RESERVED),
        "ids never reused"
    );
}

#[test]
fn ids_are_reserved_in_blocks_so_a_transient_child_writes_nothing() {
    let mut f = Fake::new();
    let parent = f.start(spec("parent"));
    let first = f.k.take_changes();
    let reserved = first.meta.expect("the first id reserves a block").next_num;
    assert_eq!(reserved, parent.0 + IDS_RESERVED);
    let transient = |n: u64| {
        let mut s = spec(&format!("child-{n}"));
        s.on_exit = OnExit::None;
        s.transient = true;
        s
    };
    // The rest of the block: no row, no record.
    for i in 1..IDS_RESERVED {
        let child = f.start(transient(i));
        f.exit(child, ExitStatus::Code(0));
        assert!(f.k.take_changes().is_empty(), "child {i} wrote something");
    }
    // The next id starts another block.
    let next = f.start(transient(IDS_RESERVED));
    assert_eq!(next.0, reserved);
    let c = f.k.take_changes();
    assert_eq!(c.meta.map(|m| m.next_num), Some(reserved + IDS_RESERVED));
    assert!(c.put.is_empty(), "a transient child has no row");
    // After a reboot no id of either block is given again.
    let k2 = Kernel::restore(f.k.snapshot(), f.now);
    assert_eq!(k2.meta().next_num, reserved + IDS_RESERVED);
}

#[test]
fn old_table_format_stays_readable() {
    let text = include_str!("../../tests/fixtures/table-v1.json");
    let snap: TableSnapshot = serde_json::from_str(text).unwrap();
    assert_eq!(snap.version, 1);
    let k = Kernel::restore(snap, Instant::now());
    let api = k.get(ProcessNum(1)).unwrap();
    assert_eq!(api.spec.name.as_deref(), Some("api"));
    assert!(matches!(api.state, State::Starting { .. }));
    assert_eq!(k.get(ProcessNum(2)).unwrap().state, State::Stopped);
}

#[derive(Debug, Clone)]
enum Op {
    Start,
    Exit(usize, i32),
    Stop(usize),
    Restart(usize),
    Delete(usize),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        Just(Op::Start),
        (0usize..6, -1i32..3).prop_map(|(i, c)| Op::Exit(i, c)),
        (0usize..6).prop_map(Op::Stop),
        (0usize..6).prop_map(Op::Restart),
        (0usize..6).prop_map(Op::Delete),
        (0u64..2_000).prop_map(Op::Advance),
    ]
}

proptest! {
    /// Whatever happens, no process ever has two live runs (the fake driver
    /// asserts it on every spawn), a user stop is never followed by an
    /// automatic restart, and nothing restarts before its delay.
    #[test]
    fn lifecycle_invariants(ops in proptest::collection::vec(op(), 1..80)) {
        let mut f = Fake::new();
        let mut nums: Vec<ProcessNum> = vec![];
        for op in ops {
            let pick = |i: usize| nums.get(i % nums.len().max(1)).copied();
            match op {
                Op::Start => nums.push(f.start(spec("p"))),
                Op::Exit(i, c) => {
                    if let Some(n) = pick(i) && f.live.contains_key(&n) {
                        f.exit(n, if c < 0 { ExitStatus::Signal(9) } else { ExitStatus::Code(c) });
                    }
                }
                Op::Stop(i) => {
                    if let Some(n) = pick(i) && f.k.get(n).is_some() {
                        f.k.stop(&Selector::Id(n), f.now).unwrap();
                        f.pump();
                        let spawns = f.spawns.len();
                        if f.live.contains_key(&n) { f.exit(n, ExitStatus::Signal(15)); }
                        f.advance(ms(3_600_000));
                        let respawned = f.spawns[spawns..].iter().any(|(m, _)| *m == n);
                        prop_assert!(!respawned, "stopped process restarted");
                    }
                }
                Op::Restart(i) => {
                    if let Some(n) = pick(i) && f.k.get(n).is_some() {
                        f.k.restart(&Selector::Id(n), f.now).unwrap();
                        f.pump();
                    }
                }
                Op::Delete(i) => {
                    if let Some(n) = pick(i) && f.k.get(n).is_some() {
                        f.k.delete(&Selector::Id(n), f.now).unwrap();
                        f.pump();
                    }
                }
                Op::Advance(d) => f.advance(ms(d)),
            }
            for e in f.k.entries() {
                prop_assert_eq!(e.state.is_live(), f.live.contains_key(&e.num));
            }
        }
    }
}

#[test]
fn an_owned_table_is_never_restored_and_its_ids_go_on() {
    let mut f = Fake::new();
    f.k.set_owned(true);
    let a = f.start(spec("a"));
    let b = f.start(spec("b"));
    let snap: TableSnapshot =
        serde_json::from_str(&serde_json::to_string(&f.k.snapshot()).unwrap()).unwrap();
    assert!(snap.owned, "the table says it is an owned node's");
    // Whoever boots on it next (owned again or not) starts nothing of it.
    let mut k = Kernel::fresh(&snap);
    assert_eq!(k.entries().count(), 0);
    assert!(
        !k.take_effects()
            .iter()
            .any(|e| matches!(e, Effect::Spawn { .. })),
        "an owned node's process was started again"
    );
    assert_eq!(
        k.node_tag(),
        snap.node_tag,
        "leftovers are still found by tag"
    );
    let c = k.start(spec("c"), Instant::now()).unwrap();
    assert!(c > a && c > b, "ids are not reused: {c:?}");
    assert!(!k.snapshot().owned);
}

#[test]
fn a_change_writes_its_own_row_and_a_transient_child_none() {
    let mut f = Fake::new();
    let keep = f.start(spec("keep"));
    let mut child = spec("child");
    child.transient = true;
    child.on_exit = OnExit::None;
    child.parent = Some("parent:demo:spindle".parse().unwrap());
    let c = f.start(child);
    let changes = f.k.take_changes();
    assert_eq!(
        changes.put.iter().map(|p| p.num).collect::<Vec<_>>(),
        vec![keep],
        "the transient child is not written"
    );
    assert_eq!(f.k.children_of(&"parent:demo:spindle".parse().unwrap()), 1);
    // Its run ends and it leaves the table: nothing to delete on disk.
    f.exit(c, ExitStatus::Code(0));
    assert!(f.k.get(c).is_none());
    assert_eq!(f.k.children_of(&"parent:demo:spindle".parse().unwrap()), 0);
    assert!(f.k.take_changes().delete.is_empty());
    // A stop changes one row; a delete removes it.
    f.k.stop(&Selector::Id(keep), f.now).unwrap();
    f.pump();
    assert_eq!(f.k.take_changes().put.len(), 1);
    f.exit(keep, ExitStatus::Signal(15));
    f.k.delete(&Selector::Id(keep), f.now).unwrap();
    f.pump();
    assert_eq!(f.k.take_changes().delete, vec![keep]);
}

#[test]
fn deadlines_come_from_an_index_that_follows_every_state() {
    let mut f = Fake::new();
    let a = f.start(spec("a"));
    let b = f.start(spec("b"));
    assert_eq!(f.k.next_deadline(), None);
    f.exit(a, ExitStatus::Code(1));
    let backoff = f.k.next_deadline().expect("a restart is due");
    f.k.stop(&Selector::Id(b), f.now).unwrap();
    f.pump();
    // Two deadlines: a's restart and b's grace; the sooner first.
    assert!(f.k.next_deadline().unwrap() <= backoff);
    f.exit(b, ExitStatus::Signal(15));
    assert_eq!(f.k.next_deadline(), Some(backoff), "b's grace is gone");
    f.advance(Duration::from_secs(60));
    assert!(matches!(f.state(a), State::Running { .. }));
    assert_eq!(f.k.next_deadline(), None);
}
