//! Helper programs that misbehave on purpose, for Spindle's tests and
//! benchmarks: real processes, not mocks of the OS.
//!
//! ```text
//! spindle-testbin crash CODE              print "start <mono-ns>", exit CODE
//! spindle-testbin ignore-term             ignore SIGTERM, print "ready", sleep
//! spindle-testbin fork-tree PIDFILE [exit] child + setsid grandchild + double-forked
//!                                         daemon, all ignoring SIGTERM; pids -> PIDFILE;
//!                                         with `exit`, the main process then exits 3
//! spindle-testbin escape PIDFILE          a grandchild in its own session, re-exec'd with
//!                                         an empty environment ("hidden" -> PIDFILE)
//! spindle-testbin flood TAG LINES LEN CHUNK
//!                                         LINES lines of LEN bytes ("TAG 00000042 xxx…\n")
//!                                         written in CHUNK-byte writes that split lines
//! spindle-testbin memory MIB              touch MIB MiB, print "ready", sleep
//! spindle-testbin print TEXT...           print each TEXT as a line on stdout and
//!                                         "err:TEXT" on stderr, then sleep
//! ```

use std::io::Write;
use std::time::Duration;

fn mono_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

fn sleep_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Notes each SIGTERM on stdout (`term`) and carries on.
extern "C" fn note_term(_: libc::c_int) {
    // SAFETY: write(2) is async-signal-safe; the buffer is static.
    unsafe { libc::write(1, b"term\n".as_ptr().cast(), 5) };
}

fn ignore_term() {
    // SAFETY: setting a signal disposition to SIG_IGN.
    unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
}

fn append_pid(file: &str, role: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .expect("pidfile");
    // One write per line, so a reader never sees half of it.
    f.write_all(format!("{role} {}\n", std::process::id()).as_bytes())
        .expect("write pidfile");
}

fn fork() -> libc::pid_t {
    // SAFETY: the helper is single-threaded when it forks.
    unsafe { libc::fork() }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    match arg(0) {
        "crash" => {
            println!("start {}", mono_ns());
            std::io::stdout().flush().ok();
            std::process::exit(arg(1).parse().unwrap_or(1));
        }
        "ignore-term" => {
            ignore_term();
            println!("ready");
            std::io::stdout().flush().ok();
            sleep_forever();
        }
        // Like ignore-term, but says `term` for each SIGTERM it gets, so a
        // test can see the polite stop arrive before the kill.
        "catch-term" => {
            // SAFETY: installing a handler that only calls write(2).
            unsafe { libc::signal(libc::SIGTERM, note_term as *const () as libc::sighandler_t) };
            println!("ready");
            std::io::stdout().flush().ok();
            sleep_forever();
        }
        "fork-tree" => {
            let file = arg(1).to_string();
            ignore_term();
            append_pid(&file, "main");
            if fork() == 0 {
                append_pid(&file, "child");
                sleep_forever();
            }
            if fork() == 0 {
                // SAFETY: setsid in a fresh child.
                unsafe { libc::setsid() };
                append_pid(&file, "setsid");
                sleep_forever();
            }
            if fork() == 0 {
                // SAFETY: classic double fork: new session, then the
                // intermediate exits so the daemon is orphaned.
                unsafe { libc::setsid() };
                if fork() == 0 {
                    append_pid(&file, "daemon");
                    sleep_forever();
                }
                std::process::exit(0);
            }
            println!("ready");
            std::io::stdout().flush().ok();
            if arg(2) == "exit" {
                // Let the double fork finish so every role is in the file.
                while std::fs::read_to_string(&file)
                    .unwrap_or_default()
                    .lines()
                    .count()
                    < 4
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                std::process::exit(3);
            }
            sleep_forever();
        }
        "escape" => {
            let file = arg(1).to_string();
            if fork() == 0 {
                // SAFETY: a fresh child leaves the session, forks again and
                // the intermediate exits; the grandchild drops its environment.
                unsafe { libc::setsid() };
                if fork() == 0 {
                    use std::os::unix::process::CommandExt;
                    let err = std::process::Command::new(std::env::current_exe().expect("self"))
                        .args(["hide", &file])
                        .env_clear()
                        .exec();
                    panic!("exec failed: {err}");
                }
                std::process::exit(0);
            }
            println!("ready");
            std::io::stdout().flush().ok();
            sleep_forever();
        }
        "hide" => {
            append_pid(arg(1), "hidden");
            sleep_forever();
        }
        "flood" => {
            let tag = arg(1);
            let lines: usize = arg(2).parse().expect("LINES");
            let len: usize = arg(3).parse().expect("LEN");
            let chunk: usize = arg(4).parse().expect("CHUNK");
            let head = tag.len() + 1 + 8 + 1;
            assert!(len > head + 1, "LEN too short for the line header");
            let mut buf = Vec::with_capacity(chunk * 2);
            let mut out = std::io::stdout().lock();
            for i in 0..lines {
                buf.extend_from_slice(format!("{tag} {i:08} ").as_bytes());
                buf.resize(buf.len() + len - head - 1, b'x');
                buf.push(b'\n');
                while buf.len() >= chunk {
                    out.write_all(&buf[..chunk]).expect("write");
                    buf.drain(..chunk);
                }
            }
            out.write_all(&buf).expect("write");
        }
        "memory" => {
            let mib: usize = arg(1).parse().expect("MIB");
            let mut v = vec![0u8; mib << 20];
            for i in (0..v.len()).step_by(4096) {
                v[i] = 1;
            }
            println!("ready {}", v.len());
            std::io::stdout().flush().ok();
            sleep_forever();
        }
        "print" => {
            for t in &args[1..] {
                println!("{t}");
                eprintln!("err:{t}");
            }
            std::io::stdout().flush().ok();
            sleep_forever();
        }
        other => {
            eprintln!("spindle-testbin: unknown helper {other:?}");
            std::process::exit(2);
        }
    }
}
