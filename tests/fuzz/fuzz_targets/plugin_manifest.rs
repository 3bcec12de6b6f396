//! Operators hot-reload plugin manifests; a broken file must be refused with an error, never
//! crash the node.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = fanfare_protocol::manifest::parse(text, std::path::Path::new("/nonexistent"));
    }
});
