//! The command line. Process flags mirror the manifest's keys.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "spindle",
    version,
    about = "A fault-tolerant process kernel: run, supervise and restart processes",
    after_help = "The first command starts the daemon if none runs. Home: --home, $SPINDLE_HOME, or ~/.spindle."
)]
pub struct Cli {
    /// Node home directory (default: $SPINDLE_HOME, else ~/.spindle)
    #[arg(long, global = true, value_name = "DIR")]
    pub home: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Start processes: a manifest (app.toml), a component (app.wasm), or a command after `--`
    Start(Box<StartArgs>),
    /// Send a request to a process and print its response
    Send {
        /// node@process:package:publisher (see `spindle ls`)
        address: String,
        /// The request body (JSON, or any text)
        body: String,
        /// How long to wait for the response
        #[arg(long, default_value = "5s")]
        timeout: String,
    },
    /// List processes
    #[command(alias = "list")]
    Ls {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Stop processes gracefully (stop signal, grace, then SIGKILL of the whole tree)
    Stop(Targets),
    /// Restart processes (stop gracefully, start again at once)
    Restart(Targets),
    /// Stop processes and remove them from the table
    Delete(Targets),
    /// Stream, live, the messages to and from a process (or a package, or
    /// all), with spawns, exits and restarts in between
    Trace {
        /// node@process:package:publisher or process:package:publisher (default: everything)
        address: Option<String>,
        /// Only messages to or from processes of this package:publisher
        #[arg(long, conflicts_with = "address")]
        package: Option<String>,
        /// One JSON object per line
        #[arg(long)]
        json: bool,
    },
    /// Show a process's log; --follow streams new lines
    Logs {
        /// Id, name, or `all`
        target: String,
        /// Keep streaming new lines
        #[arg(short, long)]
        follow: bool,
        /// Past lines to show first
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
        /// Only stderr
        #[arg(long, conflicts_with = "out")]
        err: bool,
        /// Only stdout
        #[arg(long)]
        out: bool,
    },
    /// Manage the daemon
    Daemon {
        #[command(subcommand)]
        cmd: DaemonCmd,
    },
    /// Inspect the kv and sqlite modules' databases (read-only; the daemon may run)
    Db {
        #[command(subcommand)]
        cmd: DbCmd,
    },
    /// Look into the vfs module's drives (read-only; the daemon may run)
    Vfs {
        #[command(subcommand)]
        cmd: VfsCmd,
    },
    /// This node on the network: its name and key, and the peers it trusts
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// Boot a throw-away node with example processes and show what it does
    Demo,
    /// Run a manifest in the foreground on a private node: output to stdout
    /// prefixed by process name; SIGINT/SIGTERM stop everything (as PID 1 in
    /// a container, it also reaps orphans)
    Run {
        /// The manifest (TOML) with [[process]] tables
        manifest: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// Give this node a name and a new key (node.key, node.toml in its home)
    Init {
        /// The node's name, as other nodes address it (`NAME@process:…`)
        #[arg(long)]
        name: String,
        /// Where to listen for peers, IP:PORT (repeatable; none: dial only)
        #[arg(long, value_name = "IP:PORT")]
        listen: Vec<String>,
    },
    /// Print this node's name, key and listen addresses
    Id,
    /// Manage the allow-list of peers
    Peer {
        #[command(subcommand)]
        cmd: PeerCmd,
    },
    /// List the peers: name, link, last heard, round trip, key, addresses
    Peers {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PeerCmd {
    /// Trust a peer: its name, its key (from `spindle node id` there), its addresses
    Add {
        name: String,
        key: String,
        /// IP:PORT where it listens (none: it dials this node)
        addresses: Vec<String>,
    },
    /// Stop trusting a peer (its link ends)
    Remove { name: String },
}

#[derive(Debug, Subcommand)]
pub enum VfsCmd {
    /// List a drive or a directory in it: kind, size, name
    Ls {
        /// <package>/<drive>[/path], e.g. demo:spindle/files/reports
        path: String,
    },
    /// Print a file of a drive
    Cat {
        /// <package>/<drive>/path, e.g. demo:spindle/files/a.txt
        path: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum DbCmd {
    /// List the databases: module, package, name, size
    Ls,
    /// Print a database: kv pairs one per line, or sqlite as SQL
    Dump {
        /// The owning package, package:publisher
        package: String,
        /// The database's name
        db: String,
        /// Which module's database, when both have one of that name
        #[arg(long, value_parser = ["kv", "sqlite"])]
        module: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DaemonCmd {
    /// Show whether the daemon runs, and its pid, version and memory
    Status,
    /// Stop every process gracefully, then the daemon
    Stop,
    /// Run the daemon in the foreground (what the first client command starts)
    Run {
        /// An owned node: stop everything and exit when process PID ends
        /// (the app that embeds Spindle); the node starts empty
        #[arg(long, value_name = "PID")]
        owner: Option<u32>,
    },
    /// The daemon's compile helper: a component on stdin, the verdict and
    /// the artifact on stdout (run by the daemon, one compile each)
    #[command(hide = true)]
    Compile {
        /// The daemon that runs it: the helper never outlives it
        #[arg(long, value_name = "PID")]
        parent: u32,
    },
}

#[derive(Debug, Args)]
pub struct Targets {
    /// Ids or names (a name applies to every process bearing it)
    #[arg(required_unless_present = "all")]
    pub targets: Vec<String>,
    /// Every process
    #[arg(long, conflicts_with = "targets")]
    pub all: bool,
}

#[derive(Debug, Args, Default)]
pub struct StartArgs {
    /// A manifest file (TOML) with [[process]] tables, or a wasm component
    #[arg(value_name = "MANIFEST|COMPONENT")]
    pub manifest: Option<PathBuf>,
    /// Package of a process on the message bus, package:publisher (default app:local)
    #[arg(long)]
    pub package: Option<String>,
    /// Let any local process message this process
    #[arg(long)]
    pub public: bool,
    /// Let this process send to and be reached from processes on other
    /// nodes (see `spindle node`)
    #[arg(long)]
    pub network: bool,
    /// Give a native process an IPC channel to the message bus (fd 3, Node's
    /// process.send works as is)
    #[arg(long)]
    pub ipc: bool,
    /// Watchdog for an --ipc process: silent this long (e.g. 5s), it is
    /// killed and restarted as crashed
    #[arg(long, value_name = "DURATION")]
    pub heartbeat: Option<String>,
    /// Name (optional, may repeat)
    #[arg(long)]
    pub name: Option<String>,
    /// Working directory (default: the current one)
    #[arg(long)]
    pub cwd: Option<String>,
    /// Environment variable, KEY=VALUE (repeatable)
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Log file for stdout and stderr
    #[arg(long)]
    pub log: Option<String>,
    /// Separate log file for stderr
    #[arg(long)]
    pub err_log: Option<String>,
    /// Delays before consecutive restarts, e.g. 100ms,1s,10s (last repeats; 0 = never)
    #[arg(long, value_name = "DELAYS")]
    pub restart_at: Option<String>,
    /// Uptime after which the schedule starts over (default 30m)
    #[arg(long, value_name = "DURATION")]
    pub restart_ok: Option<String>,
    /// none | restart | requests (default restart)
    #[arg(long)]
    pub on_exit: Option<String>,
    /// Time between the stop signal and SIGKILL (default 200ms)
    #[arg(long)]
    pub grace: Option<String>,
    /// Signal that asks the process to stop (default SIGTERM)
    #[arg(long)]
    pub stop_signal: Option<String>,
    /// Remove ANSI escapes from logged lines
    #[arg(long)]
    pub strip_ansi: bool,
    /// Prefix logged lines with a UTC timestamp
    #[arg(long)]
    pub timestamps: bool,
    /// Restart the process (as crashed) above this resident memory, e.g. 512MiB
    #[arg(long)]
    pub max_memory: Option<String>,
    /// Rotate the log file at this size (default 64MiB)
    #[arg(long)]
    pub log_max_size: Option<String>,
    /// Rotated log files kept (default 3)
    #[arg(long)]
    pub log_keep: Option<u32>,
    /// Children the process may have at once (default 1000)
    #[arg(long)]
    pub max_children: Option<u32>,
    /// Bytes its mailbox may hold, e.g. 8MiB (default 64MiB)
    #[arg(long)]
    pub mailbox_size: Option<String>,
    /// The command to run and its arguments
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}
