//! The module's workers and their queues: one queue per package whose files
//! a job reads or changes, and packages served in turn, one job of a
//! package at a time.
//!
//! So the changes to one package's files never race each other (its quota
//! count and its appends stay exact without a lock per file), and a package
//! never holds more than one worker while another waits: a flood of slow
//! requests (a deep `remove_tree`, a 1 GiB copy) delays its own package.

use spindle_types::PackageId;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// One request's file work.
pub(crate) type Job = Box<dyn FnOnce() + Send>;

pub(crate) struct Sched {
    state: Mutex<State>,
    ready: Condvar,
    /// Jobs waiting on the whole node.
    limit: usize,
}

#[derive(Default)]
struct State {
    /// Jobs waiting, by the package they touch.
    queues: HashMap<PackageId, VecDeque<Job>>,
    /// Packages with a job waiting and none running, in the order served.
    turn: VecDeque<PackageId>,
    running: HashSet<PackageId>,
    waiting: usize,
    stop: bool,
}

impl Sched {
    /// Starts `workers` threads; at most `limit` jobs wait at once.
    pub fn start(workers: usize, limit: usize) -> std::io::Result<Arc<Sched>> {
        let s = Arc::new(Sched {
            state: Mutex::default(),
            ready: Condvar::new(),
            limit,
        });
        for i in 0..workers {
            let s = s.clone();
            std::thread::Builder::new()
                .name(format!("spindle-vfs-{i}"))
                .spawn(move || s.work())?;
        }
        Ok(s)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `job` on `package`'s queue; gives it back if the node's
    /// queue is full.
    pub fn submit(&self, package: &PackageId, job: Job) -> Result<(), Job> {
        let mut st = self.lock();
        if st.waiting >= self.limit || st.stop {
            return Err(job);
        }
        st.waiting += 1;
        let q = st.queues.entry(package.clone()).or_default();
        q.push_back(job);
        let first = q.len() == 1;
        if first && !st.running.contains(package) {
            st.turn.push_back(package.clone());
        }
        drop(st);
        self.ready.notify_one();
        Ok(())
    }

    /// Ends the workers once nothing waits.
    pub fn stop(&self) {
        self.lock().stop = true;
        self.ready.notify_all();
    }

    fn work(&self) {
        let mut st = self.lock();
        loop {
            let Some(package) = st.turn.pop_front() else {
                if st.stop {
                    return;
                }
                st = self.ready.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            };
            let Some(job) = st.queues.get_mut(&package).and_then(VecDeque::pop_front) else {
                continue;
            };
            st.waiting -= 1;
            st.running.insert(package.clone());
            drop(st);
            // A job answers its request even if it panics (the module
            // wraps it); this guard keeps the package's turn either way.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            st = self.lock();
            st.running.remove(&package);
            if st.queues.get(&package).is_some_and(|q| !q.is_empty()) {
                st.turn.push_back(package);
                self.ready.notify_one();
            } else {
                st.queues.remove(&package);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    fn pkg(p: &str) -> PackageId {
        p.parse().unwrap()
    }

    /// Waits until `f`, within a deadline.
    fn until(f: impl Fn() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < end, "timed out");
            std::thread::yield_now();
        }
    }

    #[test]
    fn one_package_runs_one_job_at_a_time_and_others_get_their_turn() {
        let s = Sched::start(4, 1000).unwrap();
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        // A gate holds the flood's jobs until another package has run.
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        for _ in 0..20 {
            let (running, most, done, gate) =
                (running.clone(), most.clone(), done.clone(), gate.clone());
            s.submit(
                &pkg("flood:x"),
                Box::new(move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    let (open, cv) = &*gate;
                    let mut g = open.lock().unwrap();
                    while !*g {
                        g = cv.wait(g).unwrap();
                    }
                    running.fetch_sub(1, Ordering::SeqCst);
                    done.fetch_add(1, Ordering::SeqCst);
                }),
            )
            .map_err(|_| "full")
            .unwrap();
        }
        // Another package is served while the flood's first job holds a worker.
        let other = Arc::new(AtomicUsize::new(0));
        let o = other.clone();
        s.submit(
            &pkg("other:x"),
            Box::new(move || {
                o.fetch_add(1, Ordering::SeqCst);
            }),
        )
        .map_err(|_| "full")
        .unwrap();
        until(|| other.load(Ordering::SeqCst) == 1);
        {
            let (open, cv) = &*gate;
            *open.lock().unwrap() = true;
            cv.notify_all();
        }
        until(|| done.load(Ordering::SeqCst) == 20);
        assert_eq!(
            most.load(Ordering::SeqCst),
            1,
            "a package ran two jobs at once"
        );
        s.stop();
    }

    #[test]
    fn a_full_queue_gives_the_job_back_and_a_panic_keeps_the_turn() {
        let s = Sched::start(1, 2).unwrap();
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().unwrap();
        let g = gate.clone();
        s.submit(&pkg("a:x"), Box::new(move || drop(g.lock())))
            .map_err(|_| ())
            .unwrap();
        // The first is running (or about to); two more fill the queue.
        until(|| s.lock().waiting == 0);
        s.submit(&pkg("a:x"), Box::new(|| panic!("host code panics")))
            .map_err(|_| ())
            .unwrap();
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        s.submit(
            &pkg("a:x"),
            Box::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
            }),
        )
        .map_err(|_| ())
        .unwrap();
        assert!(s.submit(&pkg("b:x"), Box::new(|| {})).is_err());
        drop(held);
        until(|| ran.load(Ordering::SeqCst) == 1);
        s.stop();
    }
}
