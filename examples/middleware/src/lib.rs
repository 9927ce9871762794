//! Forwards every request to its sibling `backend` with `inherit`: the
//! backend's response goes straight back to the original requester (the
//! middleware never sees it), and the request's blob travels on without ever
//! being loaded here. It stamps `metadata` so the backend can tell.

use spindle_process::{Address, Request, await_message, println};

spindle_process::init!(run);

fn run(our: Address) {
    let backend = our.sibling("backend");
    loop {
        let Ok(msg) = await_message() else { continue };
        if !msg.is_request() {
            continue;
        }
        let forwarded = Request::to(backend.clone())
            .inherit(true)
            .body(msg.body().to_vec())
            .metadata(r#"{"via":"middleware"}"#)
            .send();
        if let Err(e) = forwarded {
            println!("cannot forward to {backend}: {e}");
        }
    }
}
