//! Any text a client can send goes through `protocol::decode`: it must answer (a frame or an
//! error), never panic. Invalid UTF-8 never reaches it (tungstenite checks), so inputs are
//! turned into text first.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = fanfare_protocol::decode(&text);
});
