//! The rules, free of host calls so they are unit-tested natively (`cargo test`).

pub struct Rules {
    banned_users: Vec<String>,
    blocked_tracks: Vec<String>,
    allowed_prefixes: Vec<String>,
    max_track_len: usize,
}

fn list(value: Option<String>) -> Vec<String> {
    value
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

impl Rules {
    pub fn from_config(get: impl Fn(&str) -> Option<String>) -> Rules {
        Rules {
            banned_users: list(get("banned_users")),
            blocked_tracks: list(get("blocked_tracks")),
            allowed_prefixes: list(get("allowed_track_prefixes")),
            max_track_len: get("max_track_len")
                .and_then(|v| v.parse().ok())
                .unwrap_or(128),
        }
    }

    pub fn check(&self, user: &str, track: &str) -> Result<(), String> {
        if self.banned_users.iter().any(|u| u == user) {
            return Err("this user may not like tracks".into());
        }
        let blocked = self
            .blocked_tracks
            .iter()
            .any(|rule| match rule.strip_suffix('*') {
                Some(prefix) => track.starts_with(prefix),
                None => rule == track,
            });
        if blocked {
            return Err("likes are closed for this track".into());
        }
        if !self.allowed_prefixes.is_empty()
            && !self
                .allowed_prefixes
                .iter()
                .any(|p| track.starts_with(p.as_str()))
        {
            return Err(format!(
                "track ids must start with one of: {}",
                self.allowed_prefixes.join(", ")
            ));
        }
        if track.len() > self.max_track_len {
            return Err(format!(
                "track ids are at most {} characters here",
                self.max_track_len
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(pairs: &[(&str, &str)]) -> Rules {
        Rules::from_config(|k| {
            pairs
                .iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn bans_blocks_and_prefixes() {
        let r = rules(&[
            ("banned_users", "spam, bot"),
            ("blocked_tracks", "leak:*, t9"),
            ("allowed_track_prefixes", "leak:,t"),
        ]);
        assert!(r.check("ana", "t1").is_ok());
        assert!(r.check("bot", "t1").is_err());
        assert!(r.check("ana", "leak:42").is_err());
        assert!(r.check("ana", "t9").is_err());
        assert!(r.check("ana", "album:1").is_err());
    }

    #[test]
    fn empty_config_accepts_everything_valid() {
        assert!(rules(&[]).check("ana", "x").is_ok());
        assert!(
            rules(&[("max_track_len", "3")])
                .check("ana", "long")
                .is_err()
        );
    }
}
