//! Manifests: specs that obey every rule, or an error naming the key.
#![no_main]
libfuzzer_sys::fuzz_target!(|text: &str| {
    if let Ok(specs) = spindle_types::manifest::parse_manifest(text, std::path::Path::new("/m")) {
        for s in specs {
            assert!(s.check().is_ok(), "a parsed spec breaks a rule");
        }
    }
});
