//! Shaping: the protocol-v1 `likes` frame, with options.
//!
//! Config: `hide_users` = "true" replaces user ids in `recent` with "someone";
//! `max_recent` keeps only the newest N likes (default 10); `include_recent` = "false" drops
//! the list entirely.

wit_bindgen::generate!({ world: "shaper", path: "../../wit" });

use fanfare::plugin::host;

mod logic;

struct Plugin;

/// Config is fixed for the life of an instance (a reload makes new instances): read it once.
static CONFIG: std::sync::OnceLock<logic::Options> = std::sync::OnceLock::new();

impl Guest for Plugin {
    fn shape(update: Update) -> String {
        let options = CONFIG.get_or_init(|| logic::Options::from_config(|key| host::config(key)));
        logic::shape(&options, &update)
    }
}

export!(Plugin);
