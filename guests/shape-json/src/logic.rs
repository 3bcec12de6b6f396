//! Frame building, unit-tested natively (`cargo test`).

use serde_json::{Value, json};

use crate::fanfare::plugin::types::{Action, Update};

pub struct Options {
    pub hide_users: bool,
    pub max_recent: usize,
    pub include_recent: bool,
}

impl Options {
    pub fn from_config(get: impl Fn(&str) -> Option<String>) -> Options {
        Options {
            hide_users: get("hide_users").is_some_and(|v| v == "true"),
            max_recent: get("max_recent").and_then(|v| v.parse().ok()).unwrap_or(10),
            include_recent: get("include_recent").is_none_or(|v| v != "false"),
        }
    }
}

pub fn shape(options: &Options, update: &Update) -> String {
    let mut frame = json!({
        "type": "likes",
        "track": update.track,
        "count": update.count,
        "delta": update.delta,
    });
    if options.include_recent {
        let skip = update.recent.len().saturating_sub(options.max_recent);
        let recent: Vec<Value> = update.recent[skip..]
            .iter()
            .map(|like| {
                let user = if options.hide_users {
                    "someone"
                } else {
                    like.user.as_str()
                };
                let action = match like.action {
                    Action::Like => "like",
                    Action::Unlike => "unlike",
                };
                json!({ "user": user, "id": like.id, "action": action })
            })
            .collect();
        frame["recent"] = Value::Array(recent);
    }
    frame.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanfare::plugin::types::RecentLike;

    fn update() -> Update {
        let like = |user: &str, id: &str| RecentLike {
            user: user.into(),
            id: id.into(),
            action: Action::Like,
        };
        Update {
            track: "t".into(),
            count: 5,
            delta: 2,
            recent: vec![like("ana", "k1"), like("bob", "k2")],
        }
    }

    #[test]
    fn default_is_the_protocol_v1_frame() {
        let options = Options::from_config(|_| None);
        let frame: Value = serde_json::from_str(&shape(&options, &update())).unwrap();
        assert_eq!(
            frame,
            json!({"type":"likes","track":"t","count":5,"delta":2,"recent":[
                {"user":"ana","id":"k1","action":"like"},{"user":"bob","id":"k2","action":"like"}]})
        );
    }

    #[test]
    fn hides_users_and_trims_recent() {
        let options = Options {
            hide_users: true,
            max_recent: 1,
            include_recent: true,
        };
        let frame: Value = serde_json::from_str(&shape(&options, &update())).unwrap();
        assert_eq!(
            frame["recent"],
            json!([{"user":"someone","id":"k2","action":"like"}])
        );
    }
}
