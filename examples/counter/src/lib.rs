//! A counter whose count survives crashes and daemon restarts: every change
//! is saved with `set_state` (durable when it returns) before it is answered.
//!
//! Requests (JSON): `{"add": 5}` → `{"count": 12}`; `"get"` → `{"count": 12}`;
//! `"crash"` panics (the node restarts it, and the count is still there).

use serde::{Deserialize, Serialize};
use spindle_process::{Address, Response, await_message, get_state_json, println, set_state_json};

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Command {
    Add(u64),
    Get,
    Crash,
}

#[derive(Serialize)]
struct Count {
    count: u64,
}

spindle_process::init!(run);

fn run(our: Address) {
    let mut count: u64 = get_state_json().unwrap_or(0);
    println!("{our}: starting at {count}");
    loop {
        let Ok(msg) = await_message() else { continue };
        if !msg.is_request() {
            continue;
        }
        match msg.json::<Command>() {
            Ok(Command::Add(n)) => {
                count += n;
                if let Err(e) = set_state_json(&count) {
                    println!("could not save the count: {e}");
                }
            }
            Ok(Command::Get) => {}
            Ok(Command::Crash) => panic!("asked to crash at count {count}"),
            Err(e) => {
                println!("ignoring a request I do not understand: {e}");
                continue;
            }
        }
        let _ = Response::new().json(&Count { count }).send();
    }
}
