//! The ledger's Redis scripts and what their answers mean: the once-only rule, the pair
//! registers and global counts. A live like costs two commands: [`READ`] before the event is
//! committed (for its stamp), [`MERGE`] after (see `ledger` for the order and why).

use fanfare_protocol::Action;

use super::keys;

/// KEYS: pairs hash, count, keys list of this user. ARGV: user, key. Returns
/// {count, 2, original} for a remembered key (as [`MERGE`] stores it), else {count, 0,
/// register or ''}: what a live decision needs, read in one command, changing nothing.
pub const READ: &str = r"
local count = tonumber(redis.call('GET', KEYS[2]) or '0')
for _, entry in ipairs(redis.call('LRANGE', KEYS[3], 0, 3)) do
  local nl = string.find(entry, '\n', 1, true)
  local key = nl and string.sub(entry, 1, nl - 1) or entry
  if key == ARGV[2] then return {count, 2, nl and string.sub(entry, nl + 1) or ''} end
end
return {count, 0, redis.call('HGET', KEYS[1], ARGV[1]) or ''}
";

/// KEYS: pairs hash, count, keys list of this user, version. ARGV: user, key, want (1/0),
/// stamp, event id, channel ('' = publish nothing), node, track. Returns {count, kind
/// (0 changed, 1 unchanged or older, 2 resent), version, stamp}; for a resent key {count, 2,
/// the version its event made (0: it changed nothing), its event id}, so a merge of an event
/// that a replay or a worker merged first can tell it is the same event, not a re-send.
///
/// Each pair holds a last-writer-wins register `state:stamp:event id`, ordered by (stamp, event
/// id); the count is the number of registers whose state is "liked" and changes only when a
/// register's state does (no clamps). An event changes the register only if it is newer; an
/// older one leaves everything, its key included, as it was (its user has moved on since). An
/// event that leaves the state as it was (a like of a liked pair) still advances the register:
/// it is the user's latest word, so an older opposite action merged later stays stale. The same
/// merge serves a node's live like (its stamp came from [`READ`]: after the pair's), a node's
/// replay of what it decided while Redis was away, and a worker's stored batch: merging an event
/// twice, or events in any order, ends in the same registers and counts.
///
/// A merge that changes the count publishes the change on the track's channel, in the bus's
/// wire form (`farm::bus`), atomically with it: a live like costs no separate `PUBLISH`, and
/// the order on the channel is the order of the versions.
///
/// Each remembered key carries its event (`key \n event id \n want \n stamp \n version`, version
/// 0 for an action that changed nothing; keys cannot contain control characters), so a
/// re-sent key is recognised on any node and can be re-emitted under its original event id
/// when the node that accepted it died before it was shipped.
pub const MERGE: &str = r"
local function parse(state)
  if not state then return false, 0, '' end
  local liked = string.sub(state, 1, 1) == '1'
  local sep = string.find(state, ':', 3, true)
  if sep then return liked, tonumber(string.sub(state, 3, sep - 1)) or 0, string.sub(state, sep + 1) end
  return liked, tonumber(string.sub(state, 3)) or 0, ''
end
local count = tonumber(redis.call('GET', KEYS[2]) or '0')
for _, entry in ipairs(redis.call('LRANGE', KEYS[3], 0, 3)) do
  local nl = string.find(entry, '\n', 1, true)
  local key = nl and string.sub(entry, 1, nl - 1) or entry
  if key == ARGV[2] then
    local fields = {}
    for field in string.gmatch(entry, '[^\n]+') do fields[#fields + 1] = field end
    return {count, 2, tonumber(fields[5] or '0') or 0, fields[2] or ''}
  end
end
local liked, ts, id = parse(redis.call('HGET', KEYS[1], ARGV[1]))
local want = ARGV[3] == '1'
local at = tonumber(ARGV[4])
local newer = at > ts or (at == ts and ARGV[5] > id)
if not newer then return {count, 1, 0, tostring(at)} end
local changed = liked ~= want
local version = 0
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3] .. ':' .. at .. ':' .. ARGV[5])
if changed then
  if want then count = count + 1 else count = count - 1 end
  redis.call('SET', KEYS[2], count)
  version = redis.call('INCR', KEYS[4])
  if ARGV[6] and ARGV[6] ~= '' then
    redis.call('PUBLISH', ARGV[6], cjson.encode({n = ARGV[7], t = ARGV[8], c = count,
      v = version, d = want and 1 or -1, u = ARGV[1], k = ARGV[2],
      a = want and 'like' or 'unlike'}))
  end
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

/// A committed event to merge into Redis with [`MERGE`] (a node's live like, its replayed
/// history, or a worker's stored batch).
pub struct EventMerge<'a> {
    pub track: &'a str,
    pub user: &'a str,
    pub key: &'a str,
    pub like: bool,
    pub stamp: i64,
    pub event_id: &'a str,
    /// For a live like: the deciding node, named in what the merge publishes when it changes
    /// the count (that node's own listeners have it already). Replays and worker merges
    /// publish nothing (a refill after a data loss would be a storm of stale news).
    pub announce_as: Option<&'a str>,
}

impl EventMerge<'_> {
    /// Adds this merge to `pipe` as an `EVALSHA` of [`MERGE`] (`sha`: its hash, loaded first).
    pub fn push(&self, pipe: &mut redis::Pipeline, sha: &str) {
        let [pairs, count, keys, version] = script_keys(self.track, self.user);
        pipe.cmd("EVALSHA")
            .arg(sha)
            .arg(4)
            .arg(pairs)
            .arg(count)
            .arg(keys)
            .arg(version)
            .arg(self.argv());
    }

    /// One `EVALSHA` of `script` ([`MERGE`]; loaded on first use).
    pub fn invocation<'s>(&self, script: &'s redis::Script) -> redis::ScriptInvocation<'s> {
        let [pairs, count, keys, version] = script_keys(self.track, self.user);
        let mut invocation = script.key(pairs);
        invocation
            .key(count)
            .key(keys)
            .key(version)
            .arg(self.argv());
        invocation
    }

    fn argv(&self) -> Vec<String> {
        vec![
            self.user.to_owned(),
            self.key.to_owned(),
            if self.like { "1" } else { "0" }.to_owned(),
            self.stamp.to_string(),
            self.event_id.to_owned(),
            self.announce_as
                .map_or_else(String::new, |_| keys::channel(self.track)),
            self.announce_as.unwrap_or_default().to_owned(),
            self.track.to_owned(),
        ]
    }
}

/// What [`READ`] found for a live action.
pub(super) enum Found {
    /// The pair's register (absent for a pair nobody has acted on).
    Pair(Option<Register>),
    /// A remembered key, with the event it made (absent for entries of older versions).
    Resent(Option<Original>),
}

/// A pair's last-writer-wins register as [`MERGE`] stores it: `state:stamp:event id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Register {
    pub liked: bool,
    pub stamp: i64,
}

impl Register {
    /// Reads what [`MERGE`] wrote (`1:1700000000000:<id>`; older entries lack the id).
    pub fn parse(text: &str) -> Option<Register> {
        let mut parts = text.splitn(3, ':');
        let liked = parts.next()? == "1";
        let stamp = parts.next()?.parse().ok()?;
        Some(Register { liked, stamp })
    }
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

#[cfg(test)]
mod tests {
    use super::Register;

    #[test]
    fn registers_read_as_the_merge_writes_them() {
        let liked = Register::parse("1:1700000000123:0190-abc").expect("a register");
        assert_eq!((liked.liked, liked.stamp), (true, 1_700_000_000_123));
        let old = Register::parse("0:42").expect("an entry without an event id");
        assert_eq!((old.liked, old.stamp), (false, 42));
        assert_eq!(Register::parse(""), None);
        assert_eq!(Register::parse("1:not-a-stamp:x"), None);
    }
}
