//! The control socket's requests, one handler each.

use super::*;

impl Node {
    pub(super) fn begin_shutdown(&mut self, waiter: Option<oneshot::Sender<Reply>>) {
        if !self.kernel.is_shutting_down() {
            tracing::info!("shutting down: stopping every process");
        }
        self.kernel.shutdown(Instant::now());
        self.shutdown_waiters.extend(waiter);
    }

    pub(super) fn handle(&mut self, req: Request, reply: oneshot::Sender<Reply>) {
        let now = Instant::now();
        // What changes the table is answered once the change is on disk.
        let changes = matches!(
            req,
            Request::Start { .. }
                | Request::Stop { .. }
                | Request::Restart { .. }
                | Request::Delete { .. }
        );
        let answer = match req {
            // The server answers greetings itself.
            Request::Hello { .. } => {
                err(ErrorKind::Internal, "a greeting reached the control loop")
            }
            Request::Start { specs, if_absent } => self.start(specs, if_absent, now),
            // The server turns entries into specs before they come here.
            Request::StartEntries { .. } => err(
                ErrorKind::Internal,
                "manifest entries reached the control loop unconverted",
            ),
            Request::Events => Reply::Events(self.events.subscribe()),
            Request::Trace { process, package } => self.trace(process, package),
            Request::List => Reply::One(Response::List {
                processes: self.list(now),
            }),
            Request::Stop { target } => self.act(&target, |k, s| k.stop(s, now)),
            Request::Restart { target } => self.act(&target, |k, s| k.restart(s, now)),
            Request::Delete { target } => self.act(&target, |k, s| k.delete(s, now)),
            Request::Logs {
                target,
                lines,
                follow,
                stream,
            } => self.logs(&target, lines, follow, stream),
            Request::Status => Reply::One(Response::Status(self.status(now))),
            Request::Node => self.node_info(),
            Request::NodeReload => self.node_reload(),
            Request::Shutdown => {
                self.begin_shutdown(Some(reply));
                return;
            }
            Request::Send {
                target,
                body,
                timeout_ms,
            } => {
                // Off the control loop: the answer may take a while.
                let bus = self.wasm.bus().clone();
                tokio::spawn(async move {
                    let answer =
                        send_as_operator(bus, &target, body, Duration::from_millis(timeout_ms))
                            .await;
                    let _ = reply.send(answer);
                });
                return;
            }
        };
        if changes {
            self.after_commit.push((reply, answer));
        } else {
            let _ = reply.send(answer);
        }
    }

    /// A tap on the bus for `trace`, with the lifecycle events.
    fn trace(&mut self, process: Option<String>, package: Option<String>) -> Reply {
        let filter = match crate::trace::filter(process.as_deref(), package.as_deref()) {
            Ok(f) => f,
            Err(e) => return err(ErrorKind::BadRequest, e),
        };
        match self.wasm.bus().tap(filter.clone()) {
            Ok(tap) => Reply::Trace(crate::trace::Subscription {
                tap,
                filter,
                events: self.events.subscribe(),
            }),
            Err(e) => err(ErrorKind::BadRequest, e.to_string()),
        }
    }

    /// Starts `specs`, all or nothing; with `if_absent`, those whose name a
    /// process in the table bears are left out and its ids answered instead.
    pub(super) fn start(
        &mut self,
        specs: Vec<ProcessSpec>,
        if_absent: bool,
        now: Instant,
    ) -> Reply {
        if self.kernel.is_shutting_down() {
            return err(
                ErrorKind::ShuttingDown,
                "the daemon is stopping and starts nothing new",
            );
        }
        if specs.is_empty() {
            return err(ErrorKind::InvalidSpec, "nothing to start");
        }
        let mut present = vec![];
        let specs: Vec<ProcessSpec> = if if_absent {
            specs
                .into_iter()
                .filter(|spec| {
                    let Some(name) = &spec.name else { return true };
                    let same: Vec<ProcessNum> = self.kernel.named(name).map(|e| e.num).collect();
                    let absent = same.is_empty();
                    present.extend(same);
                    absent
                })
                .collect()
        } else {
            specs
        };
        // All or nothing: every spec must be startable before any starts.
        let mut claimed = HashSet::new();
        for (i, spec) in specs.iter().enumerate() {
            let who = match &spec.name {
                Some(n) => format!("process {} ({n:?})", i + 1),
                None => format!("process {}", i + 1),
            };
            // Whoever built the spec, it obeys the manifest's rules.
            if let Err(b) = spec.check() {
                return err(
                    ErrorKind::InvalidSpec,
                    format!("{who}: `{}`: {}; nothing was started", b.key, b.message),
                );
            }
            let checked = match &spec.program {
                Program::Native { .. } => NativeDriver::preflight(spec)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
                    .and_then(|_| self.check_address(spec, &claimed)),
                Program::Wasm { .. } => self.check_wasm(spec, &claimed),
            };
            if spec.name.is_some()
                && let Some(a) = self.wasm.address(ProcessNum(0), spec)
            {
                claimed.insert(a);
            }
            if let Err(e) = checked {
                return err(
                    ErrorKind::InvalidSpec,
                    format!("{who}: {e}; nothing was started"),
                );
            }
            for path in [&spec.log.out, &spec.log.err].into_iter().flatten() {
                if let Err(e) = spindle_logs::probe(path) {
                    return err(
                        ErrorKind::InvalidSpec,
                        format!(
                            "{who}: log file {} cannot be opened: {e}; nothing was started",
                            path.display()
                        ),
                    );
                }
            }
        }
        let mut ids = vec![];
        for spec in specs {
            match self.kernel.start(spec, now) {
                Ok(n) => ids.push(n),
                Err(e) => return err(ErrorKind::ShuttingDown, e.to_string()),
            }
        }
        ids.extend(present);
        Reply::One(Response::Started { ids })
    }

    pub(super) fn act(
        &mut self,
        target: &Selector,
        f: impl FnOnce(&mut Kernel, &Selector) -> Result<Vec<ProcessNum>, spindle_kernel::KernelError>,
    ) -> Reply {
        match f(&mut self.kernel, target) {
            Ok(ids) => Reply::One(Response::Done { ids }),
            Err(e @ spindle_kernel::KernelError::NotFound(_)) => {
                err(ErrorKind::NotFound, e.to_string())
            }
            Err(e) => err(ErrorKind::ShuttingDown, e.to_string()),
        }
    }

    pub(super) fn list(&self, now: Instant) -> Vec<ProcessInfo> {
        self.kernel
            .entries()
            .map(|e| {
                let (state, uptime, restart_in) = match &e.state {
                    State::Starting { .. } => (StateLabel::Starting, None, None),
                    State::Running { since, .. } => (
                        StateLabel::Running,
                        Some(now.saturating_duration_since(*since).as_millis() as u64),
                        None,
                    ),
                    State::Stopping { since, .. } => (
                        StateLabel::Stopping,
                        Some(now.saturating_duration_since(*since).as_millis() as u64),
                        None,
                    ),
                    State::Backoff { until } => (
                        StateLabel::Backoff,
                        None,
                        Some(until.saturating_duration_since(now).as_millis() as u64),
                    ),
                    State::Stopped => (StateLabel::Stopped, None, None),
                };
                let usage = e
                    .state
                    .is_live()
                    .then(|| self.driver.usage(e.num))
                    .flatten();
                let (log_out, log_err) = e.spec.log_paths(&self.paths.logs, e.num.0);
                ProcessInfo {
                    id: e.num,
                    name: e.spec.name.clone(),
                    command: e.spec.program.display(),
                    address: self.wasm.address(e.num, &e.spec).map(|a| a.to_string()),
                    connected: match &e.spec.program {
                        Program::Native { ipc: Some(_), .. } => Some(
                            self.procs
                                .get(&e.num)
                                .and_then(Attached::bridge)
                                .is_some_and(Bridge::is_connected),
                        ),
                        _ => None,
                    },
                    state,
                    pid: e.state.pid(),
                    uptime_ms: uptime,
                    restarts: e.restarts,
                    cpu_percent: usage.and_then(|u| u.cpu_percent),
                    memory_bytes: usage.and_then(|u| u.rss_bytes),
                    on_exit: e.spec.on_exit.label().into(),
                    last_exit: e.last_exit.clone(),
                    restart_in_ms: restart_in,
                    log_out,
                    log_err,
                }
            })
            .collect()
    }

    pub(super) fn logs(
        &mut self,
        target: &Selector,
        lines: usize,
        follow: bool,
        stream: LogStream,
    ) -> Reply {
        let nums = match self.kernel.select(target) {
            Ok(n) if !n.is_empty() => n,
            Ok(_) => {
                return err(
                    ErrorKind::NotFound,
                    "no processes: start one with `spindle start`",
                );
            }
            Err(e) => return err(ErrorKind::NotFound, e.to_string()),
        };
        let mut backlog = vec![];
        let mut followers = vec![];
        for num in nums {
            let entry = self.kernel.get(num).expect("selected");
            let name = entry.spec.name.clone();
            let (out, errp) = entry.spec.log_paths(&self.paths.logs, num.0);
            let mut files = vec![];
            match stream {
                LogStream::Out => files.push((out.clone(), LogStream::Out)),
                LogStream::Err => files.push((errp.clone(), LogStream::Err)),
                LogStream::Both => {
                    files.push((out.clone(), LogStream::Out));
                    if errp != out {
                        files.push((errp.clone(), LogStream::Err));
                    }
                }
            }
            for (path, s) in files {
                match tail_lines(&path, lines, TAIL_BYTES) {
                    Ok(ls) => backlog.extend(ls.into_iter().map(|line| Response::LogLine {
                        id: num,
                        name: name.clone(),
                        stream: s,
                        line,
                    })),
                    Err(e) => {
                        return err(
                            ErrorKind::Internal,
                            format!("cannot read {}: {e}", path.display()),
                        );
                    }
                }
            }
            if follow {
                let tx = &self.attached(num).tap;
                followers.push(Follow {
                    num,
                    name,
                    stream,
                    rx: tx.subscribe(),
                });
            }
        }
        Reply::Logs {
            backlog,
            follow: followers,
        }
    }

    pub(super) fn status(&self, now: Instant) -> DaemonStatus {
        let rss = fs::read_to_string("/proc/self/statm").ok().and_then(|s| {
            let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
            // SAFETY: sysconf has no preconditions.
            Some(pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64)
        });
        DaemonStatus {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
            protocol: PROTOCOL_VERSION,
            home: self.paths.home.clone(),
            uptime_ms: now.saturating_duration_since(self.started).as_millis() as u64,
            processes: self.kernel.entries().count(),
            running: self.kernel.entries().filter(|e| e.state.is_live()).count(),
            rss_bytes: rss,
            late_responses: self
                .wasm
                .bus()
                .late_responses
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// `spindle send`: a request from the node operator (who needs no capability),
/// answered by the target's response or a clear error kind.
async fn send_as_operator(bus: Arc<Bus>, target: &str, body: String, timeout: Duration) -> Reply {
    use spindle_bus::{Envelope, Message, Request as BusRequest, SendErrorKind};
    use std::sync::atomic::{AtomicU64, Ordering};
    static SENDERS: AtomicU64 = AtomicU64::new(1);
    let target: Address = match target.parse() {
        Ok(a) => a,
        Err(e) => return err(ErrorKind::BadRequest, e.to_string()),
    };
    let me = bus.address(spindle_types::ProcessId {
        process: format!("cli-{}", SENDERS.fetch_add(1, Ordering::Relaxed)),
        package: spindle_types::PackageId::system(),
    });
    let mut inbox = match bus.register(me.clone(), false) {
        Ok(m) => m,
        Err(e) => return err(ErrorKind::Internal, e.to_string()),
    };
    let id = bus.next_id();
    let me = Arc::new(me);
    let env = Envelope {
        id,
        source: me.clone(),
        target: Arc::new(target.clone()),
        rsvp: Some(me.clone()),
        message: Message::Request(BusRequest {
            inherit: false,
            expects_response: Some(timeout),
            body: body.into_bytes(),
            metadata: None,
            capabilities: vec![],
        }),
        blob: None,
    };
    let answer = match bus.send(env, true).await {
        Err((kind, _)) => {
            let k = match kind {
                SendErrorKind::Offline => ErrorKind::Offline,
                SendErrorKind::MailboxFull => ErrorKind::MailboxFull,
                _ => ErrorKind::BadRequest,
            };
            err(k, format!("cannot send to {target}: {kind}"))
        }
        Ok(()) => {
            let wait = async {
                while let Some(env) = inbox.recv().await {
                    if env.id != id {
                        continue;
                    }
                    match env.message {
                        Message::Response(r, _) => return Some(Ok((env.source, r))),
                        Message::Failed(kind) => return Some(Err(kind)),
                        Message::Request(_) => {}
                    }
                }
                None
            };
            match tokio::time::timeout(timeout.min(spindle_bus::MAX_AWAIT), wait).await {
                Ok(Some(Ok((source, r)))) => Reply::One(Response::Reply {
                    source: source.to_string(),
                    body: String::from_utf8_lossy(&r.body).into_owned(),
                    metadata: r.metadata,
                }),
                Ok(Some(Err(kind))) => match kind {
                    SendErrorKind::Exited => err(
                        ErrorKind::Exited,
                        format!("{target} ended before it responded ({})", kind.name()),
                    ),
                    // Word from another node: its link went down, or that
                    // node refused the request.
                    SendErrorKind::Offline => {
                        err(ErrorKind::Offline, format!("cannot reach {target}: {kind}"))
                    }
                    SendErrorKind::MailboxFull => {
                        err(ErrorKind::MailboxFull, format!("{target}: {kind}"))
                    }
                    SendErrorKind::Timeout => err(ErrorKind::Timeout, format!("{target}: {kind}")),
                    SendErrorKind::NoCapability | SendErrorKind::Invalid => err(
                        ErrorKind::BadRequest,
                        format!("{target} refused the request: {kind}"),
                    ),
                },
                _ => err(
                    ErrorKind::Timeout,
                    format!(
                        "no response from {target} within {}",
                        spindle_types::units::format_duration(timeout)
                    ),
                ),
            }
        }
    };
    bus.unregister(&me.process);
    answer
}
