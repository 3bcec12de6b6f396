//! The ledger's Redis script and what its answers mean: the once-only rule and global counts
//! decided atomically, one `EVALSHA` per like (see `ledger` for when it runs).

use fanfare_protocol::Action;

use super::keys;

/// KEYS: pairs hash, count, keys list of this user, version, digest hash. ARGV: user, key,
/// want (1/0), ts, event id, replay (1/0). Returns {count, kind (0 applied, 1 duplicate, 2
/// resent), version, original (resent) or stamp (applied)}.
///
/// Each pair holds its state and stamp. A live action (replay 0) is the pair's newest by
/// definition — Redis runs one script at a time — so it never compares node clocks: its stamp
/// is `max(ts, stored stamp + 1)` (hybrid), and only "already in that state" makes it a
/// duplicate. A replayed event (decided by a node while Redis was away) is stale if its stamp
/// is older than the stored one: last writer wins by stamp. The digest sums halves of
/// SHA-1(event id) over the applied events (`event_log::event_digest` computes the same in
/// the worker).
/// Each remembered key carries its event (`key \n event id \n want \n ts \n version`; keys
/// cannot contain control characters), so a re-sent key can be re-emitted under its original
/// event id when the node that applied it died before storing it.
pub(super) const APPLY: &str = r"
local count = tonumber(redis.call('GET', KEYS[2]) or '0')
for _, entry in ipairs(redis.call('LRANGE', KEYS[3], 0, 3)) do
  local nl = string.find(entry, '\n', 1, true)
  local key = nl and string.sub(entry, 1, nl - 1) or entry
  if key == ARGV[2] then return {count, 2, 0, nl and string.sub(entry, nl + 1) or ''} end
end
local state = redis.call('HGET', KEYS[1], ARGV[1])
local liked, ts = false, 0
if state then
  liked = string.sub(state, 1, 1) == '1'
  ts = tonumber(string.sub(state, 3)) or 0
end
local want = ARGV[3] == '1'
local at = tonumber(ARGV[4])
if liked == want then return {count, 1, 0, ''} end
if ARGV[6] == '1' then
  if at < ts then return {count, 1, 0, ''} end
elseif at <= ts then
  at = ts + 1
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3] .. ':' .. at)
if want then count = count + 1 else count = math.max(count - 1, 0) end
redis.call('SET', KEYS[2], count)
local version = redis.call('INCR', KEYS[4])
local hash = redis.sha1hex(ARGV[5])
redis.call('HINCRBY', KEYS[5], 'a', tonumber(string.sub(hash, 1, 7), 16))
redis.call('HINCRBY', KEYS[5], 'b', tonumber(string.sub(hash, 8, 14), 16))
redis.call('LPUSH', KEYS[3], ARGV[2] .. '\n' .. ARGV[5] .. '\n' .. ARGV[3] .. '\n' .. at .. '\n' .. version)
redis.call('LTRIM', KEYS[3], 0, 3)
redis.call('PEXPIRE', KEYS[3], 604800000)
return {count, 0, version, tostring(at)}
";

/// The script's KEYS for one pair, in its order.
pub(super) fn script_keys(track: &str, user: &str) -> [String; 5] {
    let track_keys = keys::TrackKeys::new(track);
    [
        track_keys.pairs,
        track_keys.count,
        keys::user_keys(track, user),
        track_keys.version,
        track_keys.digest,
    ]
}

pub(super) enum Kind {
    /// With the pair's new version and the stamp Redis gave the action.
    Applied {
        version: u64,
        stamp: i64,
    },
    Duplicate,
    /// A remembered key, with the event it made (absent for entries of older versions).
    Resent(Option<Original>),
}

/// The event a remembered key made, as the script stored it.
pub(super) struct Original {
    pub event_id: String,
    pub action: Action,
    pub at_ms: i64,
    pub version: u64,
}

impl Original {
    pub fn parse(text: &str) -> Option<Original> {
        let mut parts = text.split('\n');
        let event_id = parts.next()?.to_owned();
        let action = if parts.next()? == "1" {
            Action::Like
        } else {
            Action::Unlike
        };
        let at_ms = parts.next()?.parse().ok()?;
        let version = parts.next()?.parse().ok()?;
        Some(Original {
            event_id,
            action,
            at_ms,
            version,
        })
    }
}
