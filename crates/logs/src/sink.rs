use crate::{LogFile, MAX_LINE};
use memchr::{memchr, memrchr};
use std::io;
use std::sync::Arc;
use std::time::SystemTime;

/// Which output stream a sink captures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Out,
    Err,
}

/// Whole lines as written to the file, published to followers.
#[derive(Debug, Clone)]
pub struct LogChunk {
    pub stream: Stream,
    pub lines: Arc<[u8]>,
}

/// Per-line changes applied before writing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shaping {
    pub strip_ansi: bool,
    pub timestamps: bool,
}

impl Shaping {
    fn is_identity(&self) -> bool {
        !self.strip_ansi && !self.timestamps
    }
}

/// Turns arbitrary chunks of one stream into whole-line appends. See the crate docs.
#[derive(Debug)]
pub struct LineSink {
    file: Arc<LogFile>,
    stream: Stream,
    shaping: Shaping,
    partial: Vec<u8>,
    out: Vec<u8>,
    tap: Option<crate::LogTap>,
    /// Bytes that could not be written (e.g. disk full), for reporting.
    pub lost_bytes: u64,
}

impl LineSink {
    pub fn new(
        file: Arc<LogFile>,
        stream: Stream,
        shaping: Shaping,
        tap: Option<crate::LogTap>,
    ) -> Self {
        LineSink {
            file,
            stream,
            shaping,
            partial: Vec::new(),
            out: Vec::new(),
            tap,
            lost_bytes: 0,
        }
    }

    pub fn file(&self) -> &Arc<LogFile> {
        &self.file
    }

    /// Takes the next chunk of output. Complete lines are written now, in one
    /// append; an unfinished line waits for the rest.
    pub fn feed(&mut self, data: &[u8]) -> io::Result<()> {
        let mut rest = data;
        let stamp = self.stamp();
        if !self.partial.is_empty() {
            match memchr(b'\n', rest) {
                Some(i) => {
                    self.partial.extend_from_slice(&rest[..=i]);
                    rest = &rest[i + 1..];
                    let line = std::mem::take(&mut self.partial);
                    self.push_line(&line, stamp.as_deref());
                    self.partial = line;
                    self.partial.clear();
                }
                None => {
                    self.partial.extend_from_slice(rest);
                    rest = &[];
                }
            }
        }
        if let Some(last) = memrchr(b'\n', rest) {
            let (complete, tail) = rest.split_at(last + 1);
            if self.out.is_empty() && self.shaping.is_identity() {
                // The common case: the chunk's lines go out untouched, uncopied.
                self.write(complete)?;
            } else {
                self.push_lines(complete, stamp.as_deref());
            }
            self.partial.extend_from_slice(tail);
        } else {
            self.partial.extend_from_slice(rest);
        }
        while self.partial.len() >= MAX_LINE {
            let cut: Vec<u8> = self.partial.drain(..MAX_LINE).collect();
            self.push_unterminated(&cut, stamp.as_deref());
        }
        self.flush()
    }

    /// The stream ended: an unfinished last line is completed and written.
    pub fn finish(&mut self) -> io::Result<()> {
        if !self.partial.is_empty() {
            let stamp = self.stamp();
            let line = std::mem::take(&mut self.partial);
            self.push_unterminated(&line, stamp.as_deref());
        }
        self.flush()
    }

    fn stamp(&self) -> Option<String> {
        self.shaping
            .timestamps
            .then(|| humantime::format_rfc3339_millis(SystemTime::now()).to_string())
    }

    fn push_unterminated(&mut self, bytes: &[u8], stamp: Option<&str>) {
        let mut line = Vec::with_capacity(bytes.len() + 1);
        line.extend_from_slice(bytes);
        line.push(b'\n');
        self.push_line(&line, stamp);
    }

    fn push_lines(&mut self, complete: &[u8], stamp: Option<&str>) {
        if self.shaping.is_identity() {
            self.out.extend_from_slice(complete);
            return;
        }
        for line in complete.split_inclusive(|&b| b == b'\n') {
            self.push_line(line, stamp);
        }
    }

    /// `line` ends with `\n`.
    fn push_line(&mut self, line: &[u8], stamp: Option<&str>) {
        if let Some(s) = stamp {
            self.out.extend_from_slice(s.as_bytes());
            self.out.push(b' ');
        }
        if self.shaping.strip_ansi && line.contains(&0x1b) {
            self.out
                .extend_from_slice(&strip_ansi_escapes::strip(&line[..line.len() - 1]));
            self.out.push(b'\n');
        } else {
            self.out.extend_from_slice(line);
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        let result = self.write(&out);
        self.out = out;
        self.out.clear();
        result
    }

    fn write(&mut self, lines: &[u8]) -> io::Result<()> {
        if let Some(tap) = &self.tap {
            tap.send(|| LogChunk {
                stream: self.stream,
                lines: Arc::from(lines),
            });
        }
        self.file.append(lines).inspect_err(|_| {
            self.lost_bytes += lines.len() as u64;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LogHub, tail_lines};
    use proptest::prelude::*;
    use std::fs;

    fn sink(hub: &LogHub, path: &std::path::Path, shaping: Shaping) -> LineSink {
        LineSink::new(hub.open(path, u64::MAX, 0), Stream::Out, shaping, None)
    }

    #[test]
    fn holds_partial_lines_until_complete() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let hub = LogHub::new();
        let mut s = sink(&hub, &path, Shaping::default());
        s.feed(b"hel").unwrap();
        assert!(!path.exists(), "opened on the first write, not before");
        s.feed(b"lo\nwor").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"hello\n");
        s.feed(b"ld\nx\ny").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"hello\nworld\nx\n");
        s.finish().unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"hello\nworld\nx\ny\n");
    }

    #[test]
    fn overlong_lines_are_cut_at_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let hub = LogHub::new();
        let mut s = sink(&hub, &path, Shaping::default());
        let big = vec![b'x'; MAX_LINE * 2 + 10];
        s.feed(&big).unwrap();
        let text = fs::read(&path).unwrap();
        assert_eq!(text.len(), 2 * (MAX_LINE + 1));
        assert!(text.split(|&b| b == b'\n').all(|l| l.len() <= MAX_LINE));
        s.feed(b"\n").unwrap();
        assert_eq!(fs::read(&path).unwrap().len(), 2 * (MAX_LINE + 1) + 11);
    }

    #[test]
    fn strips_ansi_and_stamps_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let hub = LogHub::new();
        let mut s = sink(
            &hub,
            &path,
            Shaping {
                strip_ansi: true,
                timestamps: true,
            },
        );
        s.feed(b"\x1b[31mred\x1b[0m\nplain\n").unwrap();
        let text = String::from_utf8(fs::read(&path).unwrap()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].ends_with("Z red"), "{text}");
        assert!(lines[1].ends_with("Z plain"), "{text}");
        assert!(lines[0].starts_with("20"), "{text}");
    }

    #[test]
    fn rotation_never_splits_a_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.log");
        let hub = LogHub::new();
        let file = hub.open(&path, 4096, 2);
        let mut s = LineSink::new(file, Stream::Out, Shaping::default(), None);
        for i in 0..500 {
            s.feed(format!("line {i:05} {}\n", "z".repeat(i % 37)).as_bytes())
                .unwrap();
        }
        let mut all = vec![];
        for p in [
            path.with_extension("log.2"),
            path.with_extension("log.1"),
            path.clone(),
        ] {
            let text = fs::read_to_string(&p).unwrap();
            assert!(fs::metadata(&p).unwrap().len() <= 4096);
            assert!(text.ends_with('\n'));
            all.extend(text.lines().map(str::to_string));
        }
        // The newest lines survive, in order, each whole.
        let last: u32 = all.last().unwrap()[5..10].parse().unwrap();
        assert_eq!(last, 499);
        for w in all.windows(2) {
            let a: u32 = w[0][5..10].parse().unwrap();
            let b: u32 = w[1][5..10].parse().unwrap();
            assert_eq!(a + 1, b);
        }
    }

    #[test]
    fn tail_reads_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.log");
        fs::write(&path, "a\nb\nc\nd\n").unwrap();
        assert_eq!(tail_lines(&path, 2, 1 << 20).unwrap(), ["c", "d"]);
        assert_eq!(
            tail_lines(&path, 10, 1 << 20).unwrap(),
            ["a", "b", "c", "d"]
        );
        assert_eq!(tail_lines(&path, 10, 5).unwrap(), ["c", "d"]);
        assert!(
            tail_lines(&dir.path().join("none"), 3, 100)
                .unwrap()
                .is_empty()
        );
    }

    proptest! {
        /// Any split of any text into chunks, from two writers interleaved
        /// into one file, yields exactly the original lines, none torn.
        #[test]
        fn merged_writers_never_tear(
            a in proptest::collection::vec("[a-z]{0,30}", 1..40),
            b in proptest::collection::vec("[A-Z]{0,30}", 1..40),
            cuts in proptest::collection::vec(1usize..50, 1..200),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("m.log");
            let hub = LogHub::new();
            let mut sa = sink(&hub, &path, Shaping::default());
            let mut sb = sink(&hub, &path, Shaping::default());
            let ta: Vec<u8> = a.iter().flat_map(|l| format!("a:{l}\n").into_bytes()).collect();
            let tb: Vec<u8> = b.iter().flat_map(|l| format!("b:{l}\n").into_bytes()).collect();
            let (mut ia, mut ib) = (0, 0);
            for (k, c) in cuts.iter().cycle().enumerate() {
                if ia >= ta.len() && ib >= tb.len() { break; }
                if k % 2 == 0 && ia < ta.len() {
                    let end = (ia + c).min(ta.len());
                    sa.feed(&ta[ia..end]).unwrap();
                    ia = end;
                } else if ib < tb.len() {
                    let end = (ib + c).min(tb.len());
                    sb.feed(&tb[ib..end]).unwrap();
                    ib = end;
                }
            }
            let text = fs::read_to_string(&path).unwrap();
            let got_a: Vec<&str> = text.lines().filter(|l| l.starts_with("a:")).map(|l| &l[2..]).collect();
            let got_b: Vec<&str> = text.lines().filter(|l| l.starts_with("b:")).map(|l| &l[2..]).collect();
            prop_assert_eq!(got_a, a.iter().map(String::as_str).collect::<Vec<_>>());
            prop_assert_eq!(got_b, b.iter().map(String::as_str).collect::<Vec<_>>());
            prop_assert!(text.lines().all(|l| l.starts_with("a:") || l.starts_with("b:")));
        }
    }
}
