use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

/// One log file on disk, shared by every sink that writes to it. It is
/// opened on the first write, so a process that never writes (most idle wasm
/// processes) holds no file descriptor.
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    max_size: u64,
    keep: u32,
    state: Mutex<Option<FileState>>,
}

#[derive(Debug)]
struct FileState {
    file: File,
    size: u64,
}

fn open_append(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

impl LogFile {
    /// A log file at `path`, opened (and created) on first write.
    pub fn new(path: &Path, max_size: u64, keep: u32) -> LogFile {
        LogFile {
            path: path.to_path_buf(),
            max_size,
            keep,
            state: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `lines`, which must consist of whole lines, in one write.
    /// Rotates first when the file would grow past its maximum size.
    pub fn append(&self, lines: &[u8]) -> io::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            let file = open_append(&self.path)?;
            let size = file.metadata()?.len();
            *guard = Some(FileState { file, size });
        }
        let st = guard.as_mut().expect("opened above");
        if st.size > 0 && st.size + lines.len() as u64 > self.max_size {
            self.rotate(st)?;
        }
        st.file.write_all(lines)?;
        st.size += lines.len() as u64;
        Ok(())
    }

    fn rotate(&self, st: &mut FileState) -> io::Result<()> {
        let numbered = |i: u32| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{i}"));
            PathBuf::from(p)
        };
        if self.keep == 0 {
            st.file = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&self.path)?;
            st.file.seek(SeekFrom::End(0))?;
        } else {
            for i in (1..self.keep).rev() {
                let from = numbered(i);
                if from.exists() {
                    fs::rename(&from, numbered(i + 1))?;
                }
            }
            fs::rename(&self.path, numbered(1))?;
            st.file = open_append(&self.path)?;
        }
        st.size = 0;
        Ok(())
    }
}

/// Checks that `path` can be appended to (creating it and its directory),
/// without keeping it open: the early, clear error before anything starts.
pub fn probe(path: &Path) -> io::Result<()> {
    open_append(path).map(drop)
}

/// Shares one [`LogFile`] per path among all writers of this node.
#[derive(Debug, Default)]
pub struct LogHub {
    files: Mutex<HashMap<PathBuf, Weak<LogFile>>>,
    /// Map size after the last pruning of dropped files; pruning again only
    /// once it has doubled keeps opening O(1) amortised.
    pruned_at: std::sync::atomic::AtomicUsize,
}

impl LogHub {
    pub fn new() -> Self {
        Self::default()
    }

    /// The shared handle for `path` (opened on its first write). The first
    /// holder's rotation settings apply while the file is shared.
    pub fn open(&self, path: &Path, max_size: u64, keep: u32) -> Arc<LogFile> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = files.get(path).and_then(Weak::upgrade) {
            return f;
        }
        use std::sync::atomic::Ordering;
        if files.len() >= 2 * self.pruned_at.load(Ordering::Relaxed).max(64) {
            files.retain(|_, w| w.strong_count() > 0);
            self.pruned_at.store(files.len(), Ordering::Relaxed);
        }
        let f = Arc::new(LogFile::new(path, max_size, keep));
        files.insert(path.to_path_buf(), Arc::downgrade(&f));
        f
    }
}

/// The last `n` lines of the file at `path` (reading at most `max_bytes` from
/// its end), without the trailing newline. A missing file has no lines.
pub fn tail_lines(path: &Path, n: usize, max_bytes: u64) -> io::Result<Vec<String>> {
    if n == 0 {
        return Ok(vec![]);
    }
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let start = len.saturating_sub(max_bytes);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::with_capacity((len - start) as usize);
    f.read_to_end(&mut buf)?;
    let mut text: &[u8] = &buf;
    if start > 0 {
        // Drop the partial first line.
        match memchr::memchr(b'\n', text) {
            Some(i) => text = &text[i + 1..],
            None => return Ok(vec![]),
        }
    }
    let text = text.strip_suffix(b"\n").unwrap_or(text);
    if text.is_empty() {
        return Ok(vec![]);
    }
    let lines: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
    let from = lines.len().saturating_sub(n);
    Ok(lines[from..]
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect())
}
