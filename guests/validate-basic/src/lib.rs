//! Validation: banned users, blocked tracks, and track id rules from the deployment config.
//!
//! Config (all optional, comma-separated lists): `banned_users`, `blocked_tracks` (an entry
//! ending in `*` blocks a prefix), `allowed_track_prefixes` (if set, a track must start with
//! one of them), `max_track_len`.

wit_bindgen::generate!({ world: "validator", path: "../../wit" });

use fanfare::plugin::host;

mod logic;

struct Plugin;

impl Guest for Plugin {
    fn validate(request: LikeRequest) -> Verdict {
        let rules = logic::Rules::from_config(|key| host::config(key));
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
