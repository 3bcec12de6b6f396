//! Validation: banned users, blocked tracks, and track id rules from the deployment config.
//!
//! Config (all optional, comma-separated lists): `banned_users`, `blocked_tracks` (an entry
//! ending in `*` blocks a prefix), `allowed_track_prefixes` (if set, a track must start with
//! one of them), `max_track_len`.

wit_bindgen::generate!({ world: "validator", path: "../../wit" });

use fanfare::plugin::host;

mod logic;

struct Plugin;

/// Config is fixed for the life of an instance (a reload makes new instances): read it once.
static CONFIG: std::sync::OnceLock<logic::Rules> = std::sync::OnceLock::new();

impl Guest for Plugin {
    fn validate(request: LikeRequest) -> Verdict {
        let rules = CONFIG.get_or_init(|| logic::Rules::from_config(|key| host::config(key)));
        match rules.check(&request.user, &request.track) {
            Ok(()) => Verdict::Accept,
            Err(reason) => {
                host::log(
                    host::Level::Debug,
                    &format!("rejected {}: {reason}", request.user),
                );
                Verdict::Reject(reason)
            }
        }
    }
}

export!(Plugin);
