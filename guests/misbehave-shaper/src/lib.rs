//! A deliberately bad shaper for the host's tests. Config `mode`: `trap` (panics), `loop`
//! (never returns), `huge` (returns a frame over the host's size limit); anything else
//! returns a small valid frame. The canary update (track `fanfare:canary`) always succeeds.

wit_bindgen::generate!({ world: "shaper", path: "../../wit" });

use fanfare::plugin::host;

struct Plugin;

impl Guest for Plugin {
    fn shape(update: Update) -> String {
        if update.track == "fanfare:canary" {
            return String::from(r#"{"type":"likes"}"#);
        }
        match host::config("mode").as_deref() {
            Some("trap") => panic!("misbehave-shaper: trapping on purpose"),
            Some("loop") => {
                let mut spins: u64 = 0;
                loop {
                    spins = std::hint::black_box(spins.wrapping_add(1));
                }
            }
            Some("huge") => "x".repeat(200 * 1024),
            _ => format!(
                r#"{{"type":"likes","track":"{}","count":{}}}"#,
                update.track, update.count
            ),
        }
    }
}

export!(Plugin);
