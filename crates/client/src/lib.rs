//! # spindle-client: talk to a node's daemon
//!
//! A small blocking client over the daemon's Unix socket (`<home>/spindle.sock`):
//! connect, exchange `hello` (a protocol mismatch is a clear error), then one
//! request, one response — or a stream of log lines. It needs no async
//! runtime, so the CLI starts and answers in a few milliseconds.
//!
//! [`Client::connect_or_start`] starts the daemon when none answers, the way
//! `pm2` does: it runs `<spindle> daemon run` in a new session, detached, with
//! its output going to `<home>/daemon.log`, and waits (with a deadline) until
//! the socket answers. Two clients racing to start it are harmless: the daemon
//! holds a lock on its home, so the loser exits and both clients connect to
//! the winner.

use spindle_types::control::{
    DaemonStatus, ErrorKind, LogStream, PROTOCOL_VERSION, ProcessInfo, Request, Response,
};
use spindle_types::{ProcessNum, ProcessSpec, Selector};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a started daemon has to begin answering.
pub const START_DEADLINE: Duration = Duration::from_secs(10);
/// How long an ordinary request may take before the daemon is called hung.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a daemon that answered `shutdown` may take to exit.
pub const EXIT_DEADLINE: Duration = Duration::from_secs(10);
/// Beyond the longest grace, what a daemon stop may take (closing files,
/// the last writes to disk).
pub const SHUTDOWN_MARGIN: Duration = Duration::from_secs(30);

/// Whether `pid` names a live (not zombie) process.
fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no daemon answers at {0}: run any spindle command (it starts one), or `spindle daemon run`"
    )]
    NotRunning(PathBuf),
    #[error("the daemon could not be started: {detail} (see {log})")]
    StartFailed { detail: String, log: PathBuf },
    #[error("{0}")]
    VersionMismatch(String),
    #[error("{message}")]
    Daemon { kind: ErrorKind, message: String },
    #[error("the daemon answered something unexpected: {0}")]
    Protocol(String),
    #[error("talking to the daemon failed: {0}")]
    Io(#[from] io::Error),
}

/// The most a failed start's log is read for its error.
const START_LOG_READ: u64 = 64 << 10;

/// The error a daemon that failed to start wrote last (its fatal one),
/// from what it logged past `from`.
fn last_error(log: &Path, from: u64) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(log).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(
        from.max(len.saturating_sub(START_LOG_READ)),
    ))
    .ok()?;
    let mut text = String::new();
    f.take(START_LOG_READ).read_to_string(&mut text).ok()?;
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix("spindle: error: "))
        .map(str::to_string)
}

/// The node home: `$SPINDLE_HOME`, else `~/.spindle`.
pub fn default_home() -> PathBuf {
    if let Some(h) = std::env::var_os("SPINDLE_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/tmp".into());
    home.join(".spindle")
}

pub fn socket_path(home: &Path) -> PathBuf {
    home.join("spindle.sock")
}

pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    pub daemon_pid: u32,
    pub daemon_version: String,
}

impl Client {
    /// Connects to a running daemon.
    pub fn connect(home: &Path) -> Result<Client, ClientError> {
        let sock = socket_path(home);
        let stream = UnixStream::connect(&sock).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                ClientError::NotRunning(sock.clone())
            }
            _ => ClientError::Io(e),
        })?;
        stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        let mut client = Client {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            daemon_pid: 0,
            daemon_version: String::new(),
        };
        let hello = Request::Hello {
            protocol: PROTOCOL_VERSION,
            version: env!("CARGO_PKG_VERSION").into(),
        };
        let dying = |kind: io::ErrorKind| {
            matches!(
                kind,
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            )
        };
        match client.write_request(&hello).and_then(|_| client.recv()) {
            Ok(Some(Response::Hello { pid, version, .. })) => {
                client.daemon_pid = pid;
                client.daemon_version = version;
                Ok(client)
            }
            // A daemon on its way out (killed, its last threads still closing
            // the socket) drops the greeting: it is not running.
            Ok(None) => Err(ClientError::NotRunning(sock)),
            Err(ClientError::Io(e)) if dying(e.kind()) => Err(ClientError::NotRunning(sock)),
            Ok(Some(other)) => Err(ClientError::Protocol(format!("{other:?}"))),
            Err(e) => Err(e),
        }
    }

    /// Connects, starting the daemon (`exe daemon run`) first if none answers.
    pub fn connect_or_start(home: &Path, exe: &Path) -> Result<Client, ClientError> {
        match Client::connect(home) {
            Err(ClientError::NotRunning(_)) => {}
            other => return other,
        }
        let log_path = home.join("daemon.log");
        let start_failed = |detail: String| ClientError::StartFailed {
            detail,
            log: log_path.clone(),
        };
        std::fs::create_dir_all(home)
            .map_err(|e| start_failed(format!("cannot create {}: {e}", home.display())))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| start_failed(format!("cannot open {}: {e}", log_path.display())))?;
        let logged_before = log.metadata().map_or(0, |m| m.len());
        let mut cmd = Command::new(exe);
        cmd.args(["daemon", "run"])
            .env("SPINDLE_HOME", home)
            .env_remove("SPINDLE_TAG")
            .env_remove("SPINDLE_ID")
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: setsid is async-signal-safe; it detaches the daemon from our
        // terminal and process group.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| start_failed(format!("cannot run {}: {e}", exe.display())))?;
        let end = Instant::now() + START_DEADLINE;
        loop {
            match Client::connect(home) {
                Ok(c) => return Ok(c),
                Err(ClientError::NotRunning(_)) => {}
                Err(e) => return Err(e),
            }
            if let Ok(Some(status)) = child.try_wait() {
                // It exited: another daemon may have won the race for the lock.
                if let Ok(c) = Client::connect(home) {
                    return Ok(c);
                }
                let why = last_error(&log_path, logged_before)
                    .map_or_else(String::new, |e| format!(": {e}"));
                return Err(start_failed(format!("it exited with {status}{why}")));
            }
            if Instant::now() > end {
                return Err(start_failed(format!(
                    "it did not answer within {}s",
                    START_DEADLINE.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn write_request(&mut self, req: &Request) -> Result<(), ClientError> {
        let mut line = serde_json::to_vec(req).expect("requests serialise");
        line.push(b'\n');
        self.writer.write_all(&line)?;
        Ok(())
    }

    fn recv(&mut self) -> Result<Option<Response>, ClientError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        match serde_json::from_str::<Response>(&line)
            .map_err(|e| ClientError::Protocol(format!("{e}: {line}")))?
        {
            Response::Error { kind, message } => Err(match kind {
                ErrorKind::VersionMismatch => ClientError::VersionMismatch(message),
                _ => ClientError::Daemon { kind, message },
            }),
            r => Ok(Some(r)),
        }
    }

    /// One request, one response.
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        self.write_request(req)?;
        self.recv()?.ok_or_else(|| {
            ClientError::Protocol("the daemon closed the connection without answering".into())
        })
    }

    pub fn start(&mut self, specs: Vec<ProcessSpec>) -> Result<Vec<ProcessNum>, ClientError> {
        match self.call(&Request::Start {
            specs,
            if_absent: false,
        })? {
            Response::Started { ids } => Ok(ids),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    pub fn list(&mut self) -> Result<Vec<ProcessInfo>, ClientError> {
        match self.call(&Request::List)? {
            Response::List { processes } => Ok(processes),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    fn done(&mut self, req: Request) -> Result<Vec<ProcessNum>, ClientError> {
        match self.call(&req)? {
            Response::Done { ids } => Ok(ids),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    pub fn stop(&mut self, target: Selector) -> Result<Vec<ProcessNum>, ClientError> {
        self.done(Request::Stop { target })
    }

    pub fn restart(&mut self, target: Selector) -> Result<Vec<ProcessNum>, ClientError> {
        self.done(Request::Restart { target })
    }

    pub fn delete(&mut self, target: Selector) -> Result<Vec<ProcessNum>, ClientError> {
        self.done(Request::Delete { target })
    }

    pub fn status(&mut self) -> Result<DaemonStatus, ClientError> {
        match self.call(&Request::Status)? {
            Response::Status(s) => Ok(s),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// The node's name, key, listeners and peers.
    pub fn node(&mut self) -> Result<spindle_types::control::NodeInfo, ClientError> {
        self.node_call(Request::Node)
    }

    /// Has the daemon read `node.toml` again (after it changed).
    pub fn node_reload(&mut self) -> Result<spindle_types::control::NodeInfo, ClientError> {
        self.node_call(Request::NodeReload)
    }

    fn node_call(&mut self, req: Request) -> Result<spindle_types::control::NodeInfo, ClientError> {
        match self.call(&req)? {
            Response::Node(n) => Ok(n),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Sends `body` to the process at `target` and returns its response body.
    pub fn send(
        &mut self,
        target: &str,
        body: &str,
        timeout: Duration,
    ) -> Result<String, ClientError> {
        let timeout = timeout.min(spindle_types::limits::MAX_AWAIT);
        self.writer
            .set_read_timeout(Some(timeout.saturating_add(REQUEST_TIMEOUT)))?;
        let r = self.call(&Request::Send {
            target: target.into(),
            body: body.into(),
            timeout_ms: timeout.as_millis() as u64,
        });
        self.writer.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        match r? {
            Response::Reply { body, .. } => Ok(body),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Asks the daemon to stop every process and exit; returns once the
    /// daemon process is gone (so a new one can start at once).
    /// Waits within the longest grace a process may have plus
    /// [`SHUTDOWN_MARGIN`].
    pub fn shutdown(mut self) -> Result<(), ClientError> {
        // Every process is stopped at once and none may take longer than
        // the longest grace a spec can give: past that, the daemon is hung.
        let deadline = spindle_types::spec::MAX_GRACE + SHUTDOWN_MARGIN;
        self.writer.set_read_timeout(Some(deadline))?;
        self.write_request(&Request::Shutdown)?;
        // The answer comes when every process is down; the connection then
        // closes as the daemon exits. Either ends this part of the wait.
        match self.recv() {
            Err(ClientError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ClientError::Protocol(format!(
                    "the daemon (pid {}) did not stop within {}s: look at its log, or kill it",
                    self.daemon_pid,
                    deadline.as_secs()
                )));
            }
            Ok(_) | Err(ClientError::Io(_)) => {}
            Err(e) => return Err(e),
        }
        let end = Instant::now() + EXIT_DEADLINE;
        while pid_alive(self.daemon_pid) {
            if Instant::now() > end {
                return Err(ClientError::Protocol(format!(
                    "the daemon (pid {}) said it stopped but is still running",
                    self.daemon_pid
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Streams log lines to `each` (past lines first; with `follow`, live
    /// lines until `each` returns false or the daemon goes away).
    pub fn logs(
        &mut self,
        target: Selector,
        lines: usize,
        follow: bool,
        stream: LogStream,
        mut each: impl FnMut(Response) -> bool,
    ) -> Result<(), ClientError> {
        if follow {
            self.writer.set_read_timeout(None)?;
        }
        self.write_request(&Request::Logs {
            target,
            lines,
            follow,
            stream,
        })?;
        while let Some(resp) = self.recv()? {
            if matches!(resp, Response::LogEnd) || !each(resp) {
                break;
            }
        }
        Ok(())
    }

    /// Streams the bus's traffic matching `process` (an address or process
    /// id) or `package` — everything if neither — with lifecycle events in
    /// between: `each` gets `traced`, `trace_gap`, `event` and `event_gap`
    /// frames until it returns false or the daemon ends.
    pub fn trace(
        &mut self,
        process: Option<String>,
        package: Option<String>,
        mut each: impl FnMut(Response) -> bool,
    ) -> Result<(), ClientError> {
        self.writer.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        match self.call(&Request::Trace { process, package })? {
            Response::Tracing => {}
            other => return Err(ClientError::Protocol(format!("{other:?}"))),
        }
        self.writer.set_read_timeout(None)?;
        while let Some(resp) = self.recv()? {
            if !each(resp) {
                break;
            }
        }
        Ok(())
    }
}
