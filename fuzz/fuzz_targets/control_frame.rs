//! Control-socket frames: a request or an error; every spec in a start
//! request can be checked.
#![no_main]
use spindle_types::control::Request;
libfuzzer_sys::fuzz_target!(|line: &[u8]| {
    if let Ok(Request::Start { specs, .. }) = serde_json::from_slice::<Request>(line) {
        for s in specs {
            let _ = s.check();
        }
    }
});
