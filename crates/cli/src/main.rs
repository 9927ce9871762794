//! `spindle`: parse the command line, run it, map errors to an exit code.

mod cli;
mod commands;
mod demo;
mod node;
mod run;
mod table;
mod trace;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    if let cli::Cmd::Daemon {
        cmd: cli::DaemonCmd::Compile { parent },
    } = &args.cmd
    {
        return spindle_daemon::compiler::helper_main(*parent);
    }
    match commands::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spindle: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
