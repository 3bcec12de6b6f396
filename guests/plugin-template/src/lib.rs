//! A starting point for a new validation plugin: copy this crate, rename it, change `rules`.
//! See docs/plugins.md for the other slots (rate-limiter, shaper) and how to test and deploy.
//!
//! This template rejects likes on tracks whose id contains the configured `forbidden` text.

wit_bindgen::generate!({ world: "validator", path: "../../wit" });

use fanfare::plugin::host;

struct Plugin;

impl Guest for Plugin {
    fn validate(request: LikeRequest) -> Verdict {
        match rules(&request.track, host::config("forbidden").as_deref()) {
            Ok(()) => Verdict::Accept,
            Err(reason) => Verdict::Reject(reason),
        }
    }
}

/// Plain Rust, so `cargo test` runs it natively without a host.
fn rules(track: &str, forbidden: Option<&str>) -> Result<(), String> {
    match forbidden {
        Some(text) if !text.is_empty() && track.contains(text) => {
            Err(format!("tracks containing '{text}' are not likeable"))
        }
        _ => Ok(()),
    }
}

export!(Plugin);

#[cfg(test)]
mod tests {
    use super::rules;

    #[test]
    fn rejects_only_forbidden_tracks() {
        assert!(rules("demo:1", Some("secret")).is_ok());
        assert!(rules("secret:1", Some("secret")).is_err());
        assert!(rules("secret:1", None).is_ok());
    }
}
