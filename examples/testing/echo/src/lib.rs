//! Test guest. Any request is answered with its own body, except:
//! `loop` spins forever, `grow` allocates until the memory cap stops it,
//! `panic` panics, `exit` returns from `init`.

use spindle_process::{Address, Response, await_message};

spindle_process::init!(run);

fn run(_our: Address) {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        let Ok(msg) = await_message() else { continue };
        if !msg.is_request() {
            continue;
        }
        match msg.body() {
            b"loop" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            b"grow" => loop {
                hoard.push(vec![1u8; 1 << 20]);
            },
            b"panic" => panic!("echo was asked to panic"),
            b"exit" => return,
            body => {
                let _ = Response::new().body(body.to_vec()).send();
            }
        }
    }
}
