//! CPU and memory of a process, from `/proc/<pid>/stat`.

use std::time::{Duration, Instant};

/// CPU time (user + system) and resident set size of one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawUsage {
    pub cpu: Duration,
    pub rss_bytes: u64,
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as u64 } else { 4096 }
}

pub fn read_usage(pid: i32) -> Option<RawUsage> {
    let text = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    let close = text.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&text[close + 1..]).ok()?;
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    // Fields after the name start at field 3 (state): utime is field 14,
    // stime 15, rss 24.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let rss: u64 = f.get(21)?.parse().ok()?;
    let ticks = utime + stime;
    let hz = clock_ticks();
    Some(RawUsage {
        cpu: Duration::from_micros(ticks * 1_000_000 / hz),
        rss_bytes: rss * page_size(),
    })
}

/// Turns successive samples into a CPU percentage.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuMeter {
    last: Option<(Duration, Instant)>,
    pub percent: Option<f32>,
    pub rss_bytes: Option<u64>,
}

impl CpuMeter {
    pub fn sample(&mut self, pid: i32, now: Instant) -> Option<RawUsage> {
        let u = read_usage(pid)?;
        if let Some((cpu, at)) = self.last {
            let wall = now.saturating_duration_since(at).as_secs_f32();
            if wall > 0.0 {
                self.percent = Some(100.0 * u.cpu.saturating_sub(cpu).as_secs_f32() / wall);
            }
        }
        self.last = Some((u.cpu, now));
        self.rss_bytes = Some(u.rss_bytes);
        Some(u)
    }
}
