//! Test guest for the vfs module. Each request is a command; the response
//! is its outcome (`err <kind>: <message>` on failure):
//! `write <path> <text>`, `append <path> <text>` (`size <n>`),
//! `read <path>` (the text), `range <path> <offset> <length>`,
//! `ls <path>` (`name:kind:size` joined by `,`), `mkdir <path>`,
//! `rm <path>`, `rmtree <path>`, `mv <from> <to>`,
//! `grant <address> <read|write>`, `theirs <package> <drive> <path>` (reads
//! another package's file), all in its drive `files`.
//! `churn <n>`: n rounds of appending `rec <i>\n` to `log` and replacing
//! `state` with `state <i>`, printing `acked <i>` to stdout after both are
//! acknowledged — for kill -9 tests.

use spindle_process::vfs::{self, Drive};
use spindle_process::{Access, Address, Message, Response, await_message};

spindle_process::init!(run);

fn run(_our: Address) {
    let files = match vfs::drive("files") {
        Ok(d) => d,
        Err(e) => {
            println!("no drive: {e}");
            return;
        }
    };
    loop {
        let Ok(msg) = await_message() else { continue };
        if !msg.is_request() {
            continue;
        }
        let answer = handle(&files, &msg).unwrap_or_else(|e| format!("err {e}"));
        let _ = Response::new().body(answer).send();
    }
}

fn handle(d: &Drive, msg: &Message) -> Result<String, vfs::VfsError> {
    let text = String::from_utf8_lossy(msg.body()).into_owned();
    let mut w = text.splitn(3, ' ');
    let op = w.next().unwrap_or_default();
    let a = w.next().unwrap_or_default();
    let rest = w.next().unwrap_or_default();
    let num = |s: &str| s.parse::<u64>().unwrap_or(0);
    Ok(match op {
        "write" => {
            d.write(a, rest.as_bytes().to_vec())?;
            "ok".into()
        }
        "append" => format!("size {}", d.append(a, rest.as_bytes().to_vec())?),
        "read" => String::from_utf8_lossy(&d.read(a)?).into_owned(),
        "range" => {
            let (off, len) = rest.split_once(' ').unwrap_or((rest, "0"));
            String::from_utf8_lossy(&d.read_range(a, num(off), num(len))?).into_owned()
        }
        "ls" => d
            .list(a)?
            .iter()
            .map(|e| format!("{}:{}:{}", e.name, e.kind, e.size))
            .collect::<Vec<_>>()
            .join(","),
        "mkdir" => {
            d.mkdir(a)?;
            "ok".into()
        }
        "rm" => {
            d.remove(a)?;
            "ok".into()
        }
        "rmtree" => {
            d.remove_tree(a)?;
            "ok".into()
        }
        "mv" => {
            d.rename(a, rest)?;
            "ok".into()
        }
        "grant" => {
            let access = if rest == "write" {
                Access::Write
            } else {
                Access::Read
            };
            let to = Address::parse(a).ok_or_else(|| vfs::VfsError {
                kind: "bad-request".into(),
                message: format!("not an address: {a}"),
            })?;
            d.grant(&to, access)?;
            "ok".into()
        }
        "theirs" => {
            let (drive, path) = rest.split_once(' ').unwrap_or((rest, ""));
            let theirs = Drive::of(a, drive);
            String::from_utf8_lossy(&theirs.read(path)?).into_owned()
        }
        "churn" => {
            for i in 0..num(a) {
                d.append("log", format!("rec {i}\n").into_bytes())?;
                d.write("state", format!("state {i}").into_bytes())?;
                println!("acked {i}");
            }
            "churned".into()
        }
        _ => "err unknown command".into(),
    })
}
