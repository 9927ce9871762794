//! IPC frames from a native process: any line is a frame or an error.
#![no_main]
libfuzzer_sys::fuzz_target!(|line: &[u8]| {
    let _ = spindle_ipc::frame::parse(line, "local@api:shop:acme");
});
