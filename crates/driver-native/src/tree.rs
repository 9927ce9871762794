//! Process trees from one scan of `/proc`.

use std::collections::{HashMap, HashSet};
use std::fs;

/// The ids `/proc/<pid>/stat` gives for one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    pub state: u8,
}

/// Reads `/proc/<pid>/stat`; `None` if the process is gone.
pub fn read_stat(pid: i32) -> Option<ProcStat> {
    let text = fs::read(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(pid, &text)
}

/// Parses a stat line; the command name may hold spaces and parentheses, so
/// fields are counted from the last `)`.
pub fn parse_stat(pid: i32, text: &[u8]) -> Option<ProcStat> {
    let close = text.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&text[close + 1..]).ok()?;
    let mut f = rest.split_ascii_whitespace();
    let state = f.next()?.as_bytes()[0];
    let ppid = f.next()?.parse().ok()?;
    let pgid = f.next()?.parse().ok()?;
    let sid = f.next()?.parse().ok()?;
    Some(ProcStat {
        pid,
        ppid,
        pgid,
        sid,
        state,
    })
}

/// The value of `var` in the environment `pid` started with.
pub fn env_var(pid: i32, var: &str) -> Option<String> {
    let env = fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{var}=");
    env.split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(prefix.as_bytes()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// A snapshot of every process on the machine.
#[derive(Debug, Default)]
pub struct ProcTable {
    procs: Vec<ProcStat>,
    children: HashMap<i32, Vec<i32>>,
}

impl ProcTable {
    pub fn scan() -> ProcTable {
        let mut procs = Vec::new();
        if let Ok(dir) = fs::read_dir("/proc") {
            for ent in dir.flatten() {
                let Some(pid) = ent.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                if let Some(st) = read_stat(pid) {
                    // Zombies are already dead; they only wait to be reaped.
                    if st.state != b'Z' {
                        procs.push(st);
                    }
                }
            }
        }
        let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
        for p in &procs {
            children.entry(p.ppid).or_default().push(p.pid);
        }
        ProcTable { procs, children }
    }

    pub fn contains(&self, pid: i32) -> bool {
        self.procs.iter().any(|p| p.pid == pid)
    }

    /// Every live process of the run whose main process is (or was) `main`:
    /// its group and session, its descendants, and the orphans `adopter` took
    /// in that carry `tag` in `TAG_VAR`, with their descendants.
    pub fn members(&self, main: i32, tag: &str, adopter: i32) -> Vec<i32> {
        let mut roots: Vec<i32> = self
            .procs
            .iter()
            .filter(|p| p.pid == main || p.pgid == main || p.sid == main)
            .map(|p| p.pid)
            .collect();
        for p in self.procs.iter().filter(|p| p.ppid == adopter) {
            if env_var(p.pid, crate::TAG_VAR).as_deref() == Some(tag) {
                roots.push(p.pid);
            }
        }
        self.closure(roots)
    }

    /// Every live process whose tag starts with `<node_tag>.`, with descendants:
    /// what an earlier daemon of this node left behind.
    pub fn tagged(&self, node_tag: &str) -> Vec<i32> {
        let prefix = format!("{node_tag}.");
        let me = std::process::id() as i32;
        let roots = self
            .procs
            .iter()
            .filter(|p| p.pid != me)
            .filter(|p| env_var(p.pid, crate::TAG_VAR).is_some_and(|t| t.starts_with(&prefix)))
            .map(|p| p.pid)
            .collect();
        self.closure(roots)
    }

    fn closure(&self, roots: Vec<i32>) -> Vec<i32> {
        let mut seen: HashSet<i32> = HashSet::new();
        let mut stack = roots;
        while let Some(pid) = stack.pop() {
            if seen.insert(pid)
                && let Some(kids) = self.children.get(&pid)
            {
                stack.extend(kids);
            }
        }
        let mut out: Vec<i32> = seen.into_iter().collect();
        out.sort_unstable();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_names() {
        let s = parse_stat(42, b"42 (a (b) c) S 1 42 40 0 -1").unwrap();
        assert_eq!((s.ppid, s.pgid, s.sid, s.state), (1, 42, 40, b'S'));
        assert!(parse_stat(1, b"garbage").is_none());
    }

    #[test]
    fn scan_finds_self() {
        let me = std::process::id() as i32;
        let t = ProcTable::scan();
        assert!(t.contains(me));
        assert!(t.members(me, "none", -1).contains(&me));
    }
}
