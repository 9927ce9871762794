//! What each command does: build requests, talk to the daemon, print.

use crate::cli::{Cli, Cmd, DaemonCmd, DbCmd, StartArgs, Targets, VfsCmd};
use spindle_client::{Client, ClientError, default_home};
use spindle_types::control::{LogStream, Response, StateLabel};
use spindle_types::manifest::{DelayValue, RawProcess, parse_manifest};
use spindle_types::{ProcessNum, ProcessSpec, Selector};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// An error for the user: one line saying what and how to fix it.
pub type Failure = Box<dyn std::error::Error>;

/// How long `stop`/`delete` wait for processes to be gone before returning.
const STOP_WAIT: Duration = Duration::from_secs(60);

/// What a daemon's compile helper is asked to run: `spindle daemon compile`.
const COMPILE_HELPER: &[&str] = &["daemon", "compile"];

/// How this binary's daemons compile components.
pub fn compiler() -> spindle_daemon::Compiler {
    spindle_daemon::Compiler::this_binary(COMPILE_HELPER)
}

pub fn run(cli: Cli) -> Result<(), Failure> {
    let home = cli.home.clone().unwrap_or_else(default_home);
    match cli.cmd {
        Cmd::Daemon {
            cmd: DaemonCmd::Run { owner },
        } => daemon_run(&home, owner),
        Cmd::Daemon {
            cmd: DaemonCmd::Compile { .. },
        } => Err("`spindle daemon compile` is the daemon's compile helper, not a command".into()),
        Cmd::Daemon {
            cmd: DaemonCmd::Status,
        } => match Client::connect(&home) {
            Ok(mut c) => {
                let s = c.status()?;
                println!(
                    "daemon running: pid {}, spindle {} (protocol {}), up {}, {} processes ({} running), rss {}, {} late responses dropped, home {}",
                    s.pid,
                    s.version,
                    s.protocol,
                    crate::table::uptime(s.uptime_ms),
                    s.processes,
                    s.running,
                    s.rss_bytes
                        .map(spindle_types::units::format_size)
                        .unwrap_or_else(|| "?".into()),
                    s.late_responses,
                    s.home.display()
                );
                Ok(())
            }
            Err(ClientError::NotRunning(_)) => {
                println!("daemon not running (home {})", home.display());
                Ok(())
            }
            Err(e) => Err(e.into()),
        },
        Cmd::Daemon {
            cmd: DaemonCmd::Stop,
        } => match Client::connect(&home) {
            Ok(c) => {
                let pid = c.daemon_pid;
                c.shutdown()?;
                println!("daemon (pid {pid}) stopped");
                Ok(())
            }
            Err(ClientError::NotRunning(_)) => {
                println!("daemon not running (home {})", home.display());
                Ok(())
            }
            Err(e) => Err(e.into()),
        },
        Cmd::Demo => crate::demo::run(),
        Cmd::Run { manifest } => crate::run::run(cli.home.clone(), &manifest),
        Cmd::Db { cmd } => db(&home, cmd),
        Cmd::Vfs { cmd } => vfs(&home, cmd),
        Cmd::Node { cmd } => crate::node::run(&home, cmd),
        cmd => {
            let mut client = connect(&home)?;
            match cmd {
                Cmd::Start(args) => {
                    let specs = specs_from(*args)?;
                    let ids = client.start(specs)?;
                    println!("started {}", ids_text(&ids));
                    print_table(&mut client)
                }
                Cmd::Ls { json } => {
                    let list = client.list()?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&list)?);
                    } else {
                        print!("{}", crate::table::render(&list));
                    }
                    Ok(())
                }
                Cmd::Stop(t) => {
                    let ids = for_each_target(&mut client, t, Client::stop)?;
                    wait_stopped(&mut client, &ids)?;
                    println!("stopped {}", ids_text(&ids));
                    print_table(&mut client)
                }
                Cmd::Restart(t) => {
                    let ids = for_each_target(&mut client, t, Client::restart)?;
                    println!("restarting {}", ids_text(&ids));
                    print_table(&mut client)
                }
                Cmd::Delete(t) => {
                    let ids = for_each_target(&mut client, t, Client::delete)?;
                    wait_stopped(&mut client, &ids)?;
                    println!("deleted {}", ids_text(&ids));
                    Ok(())
                }
                Cmd::Logs {
                    target,
                    follow,
                    lines,
                    err,
                    out,
                } => logs(&mut client, &target, follow, lines, err, out),
                Cmd::Trace {
                    address,
                    package,
                    json,
                } => crate::trace::run(&mut client, address, package, json),
                Cmd::Send {
                    address,
                    body,
                    timeout,
                } => {
                    let timeout = spindle_types::units::parse_duration(&timeout)
                        .map_err(|e| format!("--timeout: {e}"))?;
                    let most = spindle_types::limits::MAX_AWAIT;
                    if timeout > most {
                        return Err(format!(
                            "--timeout: {} is longer than a response may be awaited ({}): give less",
                            spindle_types::units::format_duration(timeout),
                            spindle_types::units::format_duration(most)
                        )
                        .into());
                    }
                    let target: spindle_types::Address = address.parse()?;
                    let reply = client.send(&target.to_string(), &body, timeout)?;
                    println!("{reply}");
                    Ok(())
                }
                Cmd::Daemon { .. }
                | Cmd::Demo
                | Cmd::Run { .. }
                | Cmd::Db { .. }
                | Cmd::Node { .. }
                | Cmd::Vfs { .. } => {
                    unreachable!("handled above")
                }
            }
        }
    }
}

/// The daemon's log: plain lines on stderr, at `level` and above.
pub fn init_logging(level: tracing::Level) {
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_target(false)
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .init();
}

fn daemon_run(home: &Path, owner: Option<u32>) -> Result<(), Failure> {
    init_logging(tracing::Level::INFO);
    spindle_daemon::run(home, owner, compiler()).map_err(|e| {
        tracing::error!("{e}");
        e.into()
    })
}

/// Connects to the daemon of `home`, starting it if needed.
pub fn connect(home: &Path) -> Result<Client, Failure> {
    let exe = std::env::current_exe()?;
    Ok(Client::connect_or_start(home, &exe)?)
}

fn ids_text(ids: &[ProcessNum]) -> String {
    let list: Vec<String> = ids.iter().map(|n| n.to_string()).collect();
    match ids.len() {
        0 => "nothing".into(),
        1 => format!("process {}", list[0]),
        _ => format!("processes {}", list.join(", ")),
    }
}

fn print_table(client: &mut Client) -> Result<(), Failure> {
    print!("{}", crate::table::render(&client.list()?));
    Ok(())
}

fn for_each_target(
    client: &mut Client,
    t: Targets,
    f: fn(&mut Client, Selector) -> Result<Vec<ProcessNum>, ClientError>,
) -> Result<Vec<ProcessNum>, Failure> {
    let selectors: Vec<Selector> = if t.all {
        vec![Selector::All]
    } else {
        t.targets
            .iter()
            .map(|s| s.parse::<Selector>())
            .collect::<Result<_, _>>()?
    };
    let mut ids = vec![];
    for sel in selectors {
        ids.extend(f(client, sel)?);
    }
    ids.sort();
    ids.dedup();
    Ok(ids)
}

/// Waits until none of `ids` has a live run (or they are gone).
fn wait_stopped(client: &mut Client, ids: &[ProcessNum]) -> Result<(), Failure> {
    let end = Instant::now() + STOP_WAIT;
    loop {
        let live = client
            .list()?
            .into_iter()
            .filter(|p| ids.contains(&p.id))
            .any(|p| {
                matches!(
                    p.state,
                    StateLabel::Starting | StateLabel::Running | StateLabel::Stopping
                )
            });
        if !live {
            return Ok(());
        }
        if Instant::now() > end {
            return Err("processes are still stopping; see `spindle ls`".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn logs(
    client: &mut Client,
    target: &str,
    follow: bool,
    lines: usize,
    err: bool,
    out: bool,
) -> Result<(), Failure> {
    let sel: Selector = target.parse()?;
    let stream = match (err, out) {
        (true, _) => LogStream::Err,
        (_, true) => LogStream::Out,
        _ => LogStream::Both,
    };
    // Prefix lines with their process only when several match.
    let many = match &sel {
        Selector::Id(_) => false,
        Selector::All => client.list()?.len() > 1,
        Selector::Name(name) => {
            client
                .list()?
                .iter()
                .filter(|p| p.name.as_deref() == Some(name))
                .count()
                > 1
        }
    };
    use std::io::Write;
    let stdout = std::io::stdout();
    let mut w = stdout.lock();
    client.logs(sel, lines, follow, stream, |resp| {
        let ok = match resp {
            Response::LogLine { id, name, line, .. } if many => {
                let who = name.unwrap_or_else(|| id.to_string());
                writeln!(w, "{who}|{id} {line}")
            }
            Response::LogLine { line, .. } => writeln!(w, "{line}"),
            Response::LogGap { id, missed } => {
                writeln!(w, "[spindle: {missed} chunks of output from process {id} skipped: reading too slowly]")
            }
            _ => Ok(()),
        };
        ok.and_then(|_| w.flush()).is_ok()
    })?;
    Ok(())
}

/// Turns `start`'s arguments into specs: a manifest, or one command with flags.
pub fn specs_from(args: StartArgs) -> Result<Vec<ProcessSpec>, Failure> {
    let cwd = std::env::current_dir()?;
    let wasm = args
        .manifest
        .as_ref()
        .filter(|p| p.extension().is_some_and(|e| e == "wasm"))
        .map(|p| p.to_string_lossy().into_owned());
    match (&args.manifest, args.command.is_empty()) {
        (Some(_), false) => Err("give either a manifest or a command after `--`, not both".into()),
        (None, true) => Err(
            "nothing to start: give a manifest (spindle start app.toml), a component (spindle start app.wasm) or a command (spindle start -- node server.js)"
                .into(),
        ),
        (Some(_), true) if wasm.is_some() => from_flags(args, wasm, &cwd),
        (Some(path), true) => {
            if has_process_flags(&args) {
                return Err(format!(
                    "flags such as --name apply to a command after `--`; set keys in {} instead",
                    path.display()
                )
                .into());
            }
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read manifest {}: {e}", path.display()))?;
            let abs: PathBuf = cwd.join(path);
            let base = abs.parent().unwrap_or(&cwd);
            parse_manifest(&text, base)
                .map_err(|e| format!("manifest {}: {e}", path.display()).into())
        }
        (None, false) => from_flags(args, None, &cwd),
    }
}

/// One process from `start`'s flags: a command, or a component.
fn from_flags(
    args: StartArgs,
    wasm: Option<String>,
    cwd: &Path,
) -> Result<Vec<ProcessSpec>, Failure> {
    {
        {
            let mut env = std::collections::BTreeMap::new();
            for kv in &args.env {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| format!("--env {kv:?}: write KEY=VALUE"))?;
                env.insert(k.to_string(), v.to_string());
            }
            let raw = RawProcess {
                name: args.name,
                command: args.command.first().cloned(),
                args: args.command.get(1..).unwrap_or_default().to_vec(),
                wasm,
                package: args.package,
                public: args.public.then_some(true),
                network: args.network.then_some(true),
                ipc: args.ipc.then_some(true),
                heartbeat: args.heartbeat,
                cwd: args.cwd,
                env,
                log: args.log,
                err_log: args.err_log,
                restart_at: args.restart_at.map(|s| {
                    s.split(',')
                        .map(|d| match d.trim() {
                            "0" => DelayValue::Int(0),
                            t => DelayValue::Text(t.to_string()),
                        })
                        .filter(|d| !matches!(d, DelayValue::Text(t) if t.is_empty()))
                        .collect()
                }),
                restart_ok: args.restart_ok,
                on_exit: args.on_exit,
                grace: args.grace,
                stop_signal: args.stop_signal,
                strip_ansi: args.strip_ansi.then_some(true),
                timestamps: args.timestamps.then_some(true),
                max_memory: args.max_memory,
                log_max_size: args.log_max_size,
                log_keep: args.log_keep,
                max_children: args.max_children,
                mailbox_size: args.mailbox_size,
            };
            let spec = raw.into_spec(1, cwd).map_err(|e| {
                // Flags, not manifest keys: `--restart-at` for `restart_at`.
                let flag = format!("--{}", e.key.replace('_', "-"));
                format!("{flag}: {}", e.message)
            })?;
            Ok(vec![spec])
        }
    }
}

fn has_process_flags(a: &StartArgs) -> bool {
    a.package.is_some()
        || a.public
        || a.network
        || a.ipc
        || a.heartbeat.is_some()
        || a.name.is_some()
        || a.cwd.is_some()
        || !a.env.is_empty()
        || a.log.is_some()
        || a.err_log.is_some()
        || a.restart_at.is_some()
        || a.restart_ok.is_some()
        || a.on_exit.is_some()
        || a.grace.is_some()
        || a.stop_signal.is_some()
        || a.strip_ansi
        || a.timestamps
        || a.max_memory.is_some()
        || a.log_max_size.is_some()
        || a.max_children.is_some()
        || a.mailbox_size.is_some()
        || a.log_keep.is_some()
}

/// `spindle db`: reads the files directly (SQLite readers never block the
/// daemon's writers), so it works whether or not the daemon runs.
fn vfs(home: &Path, cmd: VfsCmd) -> Result<(), Failure> {
    let dir = home.join("vfs");
    match cmd {
        VfsCmd::Ls { path } => {
            let (entries, total) = spindle_vfs::ls(&dir, &path)?;
            for e in &entries {
                println!(
                    "{:<5} {:>10} {}",
                    e.meta.kind.name(),
                    spindle_types::units::format_size(e.meta.size),
                    e.name
                );
            }
            if total > entries.len() {
                println!("… and {} more", total - entries.len());
            }
            Ok(())
        }
        VfsCmd::Cat { path } => {
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            spindle_vfs::cat(&dir, &path, &mut out)?;
            Ok(())
        }
    }
}

fn db(home: &Path, cmd: DbCmd) -> Result<(), Failure> {
    use spindle_db::store::Kind;
    let dir = home.join("db");
    match cmd {
        DbCmd::Ls => {
            let all = spindle_db::list(&dir);
            if all.is_empty() {
                println!("no databases (home {})", home.display());
            }
            for (kind, package, name, size) in all {
                println!(
                    "{:<7} {:<24} {:<24} {}",
                    kind.dir(),
                    package,
                    name,
                    spindle_types::units::format_size(size)
                );
            }
            Ok(())
        }
        DbCmd::Dump {
            package,
            db,
            module,
        } => {
            let has = |k: Kind| {
                spindle_db::list(&dir)
                    .iter()
                    .any(|(kind, p, n, _)| *kind == k && p == &package && n == &db)
            };
            let kind = match module.as_deref() {
                Some("kv") => Kind::Kv,
                Some(_) => Kind::Sql,
                None if has(Kind::Kv) && has(Kind::Sql) => {
                    return Err(format!(
                        "both kv and sqlite have a database {db} of {package}: say which with --module"
                    )
                    .into());
                }
                None if has(Kind::Sql) => Kind::Sql,
                None => Kind::Kv,
            };
            let mut out = std::io::stdout().lock();
            spindle_db::dump(&dir, kind, &package, &db, &mut out)?;
            Ok(())
        }
    }
}
