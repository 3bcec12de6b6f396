//! The ledger's Redis script and what its answers mean: the once-only rule and global counts
//! decided atomically, one `EVALSHA` per like (see `ledger` for when it runs).

use fanfare_protocol::Action;

use super::keys;

/// KEYS: pairs hash, count, keys list of this user, version. ARGV: user, key, want (1/0), ts,
/// event id, replay (1/0). Returns {count, kind (0 changed, 1 unchanged, 2 resent), version,
/// original (resent) or stamp}.
///
/// Each pair holds a last-writer-wins register `state:stamp:event id`, ordered by (stamp, event
/// id); the count is the number of registers whose state is "liked" and changes only when a
/// register's state does (no clamps). A live action (replay 0) is the pair's newest by
/// definition — Redis runs one script at a time — so it never compares node clocks: its stamp
/// is `max(ts, stored stamp + 1)` (hybrid). An action that leaves the state as it was (a like
/// of a liked pair) still advances the register: it is the user's latest word, so an older
/// opposite action replayed later stays stale. A replayed event (decided by a node while
/// Redis was away, or merged by a worker) changes the register only if it is newer; a stale
/// one leaves everything, its key included, as it was (its user has moved on since).
///
/// Each remembered key carries its event (`key \n event id \n want \n stamp \n version`, version
/// 0 for an action that changed nothing; keys cannot contain control characters), so a
/// re-sent key is recognised on any node and can be re-emitted under its original event id
/// when the node that accepted it died before storing it.
pub const APPLY: &str = r"
local count = tonumber(redis.call('GET', KEYS[2]) or '0')
for _, entry in ipairs(redis.call('LRANGE', KEYS[3], 0, 3)) do
  local nl = string.find(entry, '\n', 1, true)
  local key = nl and string.sub(entry, 1, nl - 1) or entry
  if key == ARGV[2] then return {count, 2, 0, nl and string.sub(entry, nl + 1) or ''} end
end
local state = redis.call('HGET', KEYS[1], ARGV[1])
local liked, ts, id = false, 0, ''
if state then
  liked = string.sub(state, 1, 1) == '1'
  local sep = string.find(state, ':', 3, true)
  if sep then
    ts = tonumber(string.sub(state, 3, sep - 1)) or 0
    id = string.sub(state, sep + 1)
  else
    ts = tonumber(string.sub(state, 3)) or 0
  end
end
local want = ARGV[3] == '1'
local at = tonumber(ARGV[4])
if ARGV[6] ~= '1' and at <= ts then at = ts + 1 end
local newer = at > ts or (at == ts and ARGV[5] > id)
local changed = newer and liked ~= want
local version = 0
if not newer then return {count, 1, 0, tostring(at)} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3] .. ':' .. at .. ':' .. ARGV[5])
if changed then
  if want then count = count + 1 else count = count - 1 end
  redis.call('SET', KEYS[2], count)
  version = redis.call('INCR', KEYS[4])
end
redis.call('LPUSH', KEYS[3], ARGV[2] .. '\n' .. ARGV[5] .. '\n' .. ARGV[3] .. '\n' .. at .. '\n' .. version)
redis.call('LTRIM', KEYS[3], 0, 3)
redis.call('PEXPIRE', KEYS[3], 604800000)
if changed then return {count, 0, version, tostring(at)} end
return {count, 1, 0, tostring(at)}
";

/// The script's KEYS for one pair, in its order.
pub fn script_keys(track: &str, user: &str) -> [String; 4] {
    let track_keys = keys::TrackKeys::new(track);
    [
        track_keys.pairs,
        track_keys.count,
        keys::user_keys(track, user),
        track_keys.version,
    ]
}

/// An accepted action to merge into Redis as a replay (a node's own history, or a worker's
/// stored batch).
pub struct Replay<'a> {
    pub track: &'a str,
    pub user: &'a str,
    pub key: &'a str,
    pub like: bool,
    pub stamp: i64,
    pub event_id: &'a str,
}

impl Replay<'_> {
    /// Adds this merge to `pipe` as an `EVALSHA` of [`APPLY`] (`sha`: its hash, loaded first).
    pub fn push(&self, pipe: &mut redis::Pipeline, sha: &str) {
        let [pairs, count, keys, version] = script_keys(self.track, self.user);
        pipe.cmd("EVALSHA")
            .arg(sha)
            .arg(4)
            .arg(pairs)
            .arg(count)
            .arg(keys)
            .arg(version)
            .arg(self.user)
            .arg(self.key)
            .arg(if self.like { "1" } else { "0" })
            .arg(self.stamp)
            .arg(self.event_id)
            .arg("1");
    }
}

pub(super) enum Kind {
    /// The pair's state changed: with the track's new version and the stamp Redis gave it.
    Changed { version: u64, stamp: i64 },
    /// Accepted, state as it was (live), or older than the register (replay).
    Unchanged { stamp: i64 },
    /// A remembered key, with the event it made (absent for entries of older versions).
    Resent(Option<Original>),
}

/// The event a remembered key made, as the script stored it.
pub(super) struct Original {
    pub event_id: String,
    pub action: Action,
    pub at_ms: i64,
    /// 0 when the action changed nothing.
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
