//! The restart schedule: how long to wait before each consecutive restart.
//!
//! A pure function of (attempt, uptime of the run that just ended). The kernel
//! keeps `attempt` per process and passes the instants; nothing here reads a
//! clock, so the schedule is tested with made-up instants.
//!
//! The rule: a run that lasted at least `ok` starts the schedule over; any
//! shorter run moves one step further along it, and the last delay repeats
//! forever. A process that ran well for days and then starts crash-looping
//! therefore backs off exactly like a new one: 100 ms, 500 ms, 1 s, … — it can
//! never restart faster than the first delay.

use crate::units::{serde_millis, serde_millis_vec};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Default delays before consecutive restarts; the last one repeats forever.
pub const DEFAULT_DELAYS_MS: [u64; 8] = [100, 500, 1_000, 10_000, 30_000, 60_000, 300_000, 900_000];
/// Default uptime after which a run counts as healthy and the schedule starts over.
pub const DEFAULT_RESTART_OK: Duration = Duration::from_secs(30 * 60);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartSchedule {
    /// Delay before restart number 1, 2, …; the last repeats. `[]` or `[0]`: never restart.
    #[serde(with = "serde_millis_vec")]
    pub delays: Vec<Duration>,
    /// A run at least this long resets the schedule.
    #[serde(with = "serde_millis")]
    pub ok: Duration,
}

impl Default for RestartSchedule {
    fn default() -> Self {
        RestartSchedule {
            delays: DEFAULT_DELAYS_MS
                .iter()
                .map(|&ms| Duration::from_millis(ms))
                .collect(),
            ok: DEFAULT_RESTART_OK,
        }
    }
}

/// What the schedule says after a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartDecision {
    /// The schedule is `[]` or `[0]`.
    Never,
    /// Restart after `delay`; `attempt` is the new position in the schedule.
    After { delay: Duration, attempt: u32 },
}

impl RestartSchedule {
    /// `[]` and `[0]` switch restarts off.
    pub fn never_restarts(&self) -> bool {
        self.delays.is_empty() || (self.delays.len() == 1 && self.delays[0].is_zero())
    }

    /// `attempt`: restarts already made in the current series (0 after a healthy
    /// run or a fresh start); `uptime`: how long the run that just ended lasted.
    pub fn decide(&self, attempt: u32, uptime: Duration) -> RestartDecision {
        if self.never_restarts() {
            return RestartDecision::Never;
        }
        let attempt = if uptime >= self.ok { 0 } else { attempt };
        let index = (attempt as usize).min(self.delays.len() - 1);
        RestartDecision::After {
            delay: self.delays[index],
            attempt: attempt.saturating_add(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn default_schedule_walks_then_repeats() {
        let s = RestartSchedule::default();
        let mut attempt = 0;
        let mut seen = vec![];
        for _ in 0..10 {
            match s.decide(attempt, ms(5)) {
                RestartDecision::After { delay, attempt: a } => {
                    seen.push(delay.as_millis() as u64);
                    attempt = a;
                }
                RestartDecision::Never => panic!("default schedule restarts"),
            }
        }
        assert_eq!(
            seen,
            [
                100, 500, 1_000, 10_000, 30_000, 60_000, 300_000, 900_000, 900_000, 900_000
            ]
        );
    }

    #[test]
    fn healthy_run_starts_over() {
        let s = RestartSchedule::default();
        assert_eq!(
            s.decide(6, Duration::from_secs(31 * 60)),
            RestartDecision::After {
                delay: ms(100),
                attempt: 1
            }
        );
        // Just short of `ok` keeps walking.
        assert_eq!(
            s.decide(6, Duration::from_secs(30 * 60) - ms(1)),
            RestartDecision::After {
                delay: ms(300_000),
                attempt: 7
            }
        );
    }

    #[test]
    fn never_restart_forms() {
        for delays in [vec![], vec![ms(0)]] {
            let s = RestartSchedule {
                delays,
                ok: DEFAULT_RESTART_OK,
            };
            assert_eq!(s.decide(0, ms(1)), RestartDecision::Never);
        }
        // A zero first delay among others is an immediate restart, not "never".
        let s = RestartSchedule {
            delays: vec![ms(0), ms(100)],
            ok: DEFAULT_RESTART_OK,
        };
        assert!(matches!(s.decide(0, ms(1)), RestartDecision::After { .. }));
    }

    fn schedule() -> impl Strategy<Value = RestartSchedule> {
        (
            proptest::collection::vec(1u64..100_000, 1..10),
            1u64..10_000_000,
        )
            .prop_map(|(d, ok)| RestartSchedule {
                delays: d.into_iter().map(ms).collect(),
                ok: ms(ok),
            })
    }

    proptest! {
        /// A crash loop after any history never restarts faster than the
        /// schedule's shortest delay: it cannot spin.
        #[test]
        fn crash_loop_never_spins(s in schedule(), uptimes in proptest::collection::vec(0u64..20_000_000, 1..60)) {
            let min = *s.delays.iter().min().unwrap();
            let mut attempt = 0;
            for up in uptimes {
                match s.decide(attempt, ms(up)) {
                    RestartDecision::After { delay, attempt: a } => {
                        prop_assert!(delay >= min);
                        prop_assert!(s.delays.contains(&delay));
                        attempt = a;
                    }
                    RestartDecision::Never => prop_assert!(false, "positive schedule never says Never"),
                }
            }
        }

        /// The delay depends only on the position reached and the last run's
        /// uptime: after k consecutive short runs it is delays[min(k, len-1)],
        /// whatever came before the last healthy run.
        #[test]
        fn delay_depends_on_current_series_only(s in schedule(), before in 0u32..50, k in 0usize..30) {
            let mut attempt = before;
            // One healthy run resets.
            let mut last = s.decide(attempt, s.ok);
            for _ in 0..k {
                if let RestartDecision::After { attempt: a, .. } = last { attempt = a; }
                last = s.decide(attempt, s.ok / 2);
            }
            let expected = s.delays[k.min(s.delays.len() - 1)];
            prop_assert_eq!(last, RestartDecision::After { delay: expected, attempt: k as u32 + 1 });
        }
    }
}
