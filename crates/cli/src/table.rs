//! The `ls` table.

use spindle_types::control::{ProcessInfo, StateLabel};
use spindle_types::units::{format_duration, format_size};
use std::time::Duration;

/// Compact uptime: 45s, 12m, 3h, 2d.
pub fn uptime(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn state(p: &ProcessInfo) -> String {
    match (p.state, p.restart_in_ms) {
        (StateLabel::Backoff, Some(ms)) => {
            format!("backoff {}", format_duration(Duration::from_millis(ms)))
        }
        (s, _) => s.to_string(),
    }
}

pub fn render(list: &[ProcessInfo]) -> String {
    let header = [
        "id",
        "name",
        "state",
        "pid",
        "uptime",
        "restarts",
        "cpu",
        "mem",
        "address",
        "last exit",
    ];
    let rows: Vec<[String; 10]> = list
        .iter()
        .map(|p| {
            [
                p.id.to_string(),
                p.name.clone().unwrap_or_else(|| {
                    format!("({})", p.command.split_whitespace().next().unwrap_or("?"))
                }),
                state(p),
                p.pid.map(|x| x.to_string()).unwrap_or_else(|| "-".into()),
                p.uptime_ms.map(uptime).unwrap_or_else(|| "-".into()),
                p.restarts.to_string(),
                p.cpu_percent
                    .map(|c| format!("{c:.0}%"))
                    .unwrap_or_else(|| "-".into()),
                p.memory_bytes
                    .map(format_size)
                    .unwrap_or_else(|| "-".into()),
                match (&p.address, p.connected) {
                    (Some(a), Some(false)) => format!("{a} (not connected)"),
                    (Some(a), _) => a.clone(),
                    (None, _) => "-".into(),
                },
                p.last_exit
                    .as_ref()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    if rows.is_empty() {
        return "no processes: start one with `spindle start -- COMMAND` or `spindle start app.toml`\n".into();
    }
    columns(&header, &rows)
}

/// Left-aligned columns, two spaces apart, under a header; the last column
/// is not padded.
pub fn columns<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&header.map(String::from));
    for r in rows {
        line(r);
    }
    out
}
