//! The Lua scripts that change an entry. Each touches one entry's keys only (the data key and
//! its lock share a hash tag, so one Cluster slot), and each gives the entry a new **write
//! version**: `max(previous + 1, now)`, where *previous* is read from the entry's own header in
//! Redis and *now* is the server's clock (`TIME`) in microseconds, read inside the script.
//!
//! Why both: *previous + 1* alone restarts at 1 whenever the key disappears behind the cache's
//! back (`FLUSHALL`, `FLUSHDB`, eviction under `maxmemory` of the entry and its tombstone, an
//! operator's `DEL`, a decode-error eviction), and a node still holding version 5 would then
//! ignore the announcement of the new version 1. The server's clock alone would let two writes
//! in one microsecond tie. Together, on one server, a version is always above every version the
//! key had before, whatever removed it: while the key exists by *previous + 1*, and once it is
//! gone because the clock has moved on since the last write (a script takes well over a
//! microsecond, so *previous + 1* never runs ahead of the clock by more than the writes of the
//! last microsecond). What remains is a server clock stepping back (an NTP step, or a failover
//! to a replica whose clock is behind) while a key is absent: a failover is already a gap (every
//! node drops L1), and the bus's heartbeat reads the server's clock (`INFO server`'s
//! `server_time_usec`) and treats a step back as a gap too. Microseconds since 1970 stay below
//! 2^53 until the year 2255, so Lua's doubles hold them exactly.
//!
//! Scripts that call `TIME` are fine under effects replication (the only mode since Redis 7;
//! replicas receive the `SET` with the computed bytes). Deletes leave a tombstone that keeps
//! the version (and reads as a miss), so a delete's version is known to later writers.
//!
//! A script may announce the change: it appends the new version (8 bytes, little endian) to a
//! message given by the caller and publishes it, in the same atomic step as the write, so no
//! change exists without its announcement.

use std::sync::LazyLock;

/// Shared helpers, prepended to every script: `version_of(key)` reads the write version from
/// an entry's header (0 if absent, not an entry, or beyond `MAX_WRITE_VERSION`); `server_now()`
/// is `TIME` in µs; `next_version(key)` is `max(version_of(key) + 1, server_now())`; `pack(v)` is its 8-byte encoding; `wake(lock,
/// notices, data)` deletes a lock and, if it existed, publishes `data` on `notices`;
/// `announce(v, channel, message)` publishes `message .. pack(v)` unless the channel is empty.
const LIB: &str = r"
local function version_of(key)
  local h = redis.call('GETRANGE', key, 0, 21)
  if #h < 22 or string.sub(h, 1, 4) ~= '\193MLC' then return 0 end
  local v = 0
  for i = 22, 15, -1 do v = v * 256 + string.byte(h, i) end
  -- Beyond MAX_WRITE_VERSION (2^52): not a version of ours; Lua's doubles lose +1 from 2^53.
  if v > 4503599627370496 then return 0 end
  return v
end
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function next_version(key)
  local v = version_of(key) + 1
  local now = server_now()
  if now > v then v = now end
  return v
end
local function pack(v)
  local t = {}
  for i = 1, 8 do t[i] = string.char(v % 256); v = math.floor(v / 256) end
  return table.concat(t)
end
-- Breaks the lock and, if there was one, wakes its waiters. Without a lock nobody waits on
-- it (a waiter that saw one polls until it is gone): no notice, one message less per write.
local function wake(lock, notices, data)
  if redis.call('DEL', lock) == 1 then redis.call('PUBLISH', notices, data) end
end
local function announce(v, channel, message)
  if channel ~= '' then redis.call('PUBLISH', channel, message .. pack(v)) end
end
";

/// `KEYS[1]` data, `KEYS[2]` lock; `ARGV`: bytes, ttl ms, notice channel, announce channel,
/// announce message, proposed version (0: none), carrying message. Writes, stamps the next
/// version (see the module docs), breaks the lock (waking its waiters, if there was one),
/// announces. Returns `{version, carried, now}` (`now`: the server's clock in µs).
///
/// A proposed version p is taken instead of the computed one only while the key exists (a
/// version of ours is there, `previous` > 0) and `previous < p <= now` with p at most 10 ms
/// behind `now`: then p is above every version the key ever had (those before it last
/// vanished were below the clock when it was written again, and so below `previous`), and
/// still below the clock, as the module's argument needs. The 10 ms bound covers an entry
/// put back behind the cache's back with an older header (`RESTORE` of a dump, `COPY`): a
/// version proposed from it is still above every version written more than 10 ms ago. The carrying message, signed by the writer with p inside, is published
/// instead of the announcement (`carried` = 1). Otherwise nothing changes (`carried` = 0).
const OVERWRITE_BODY: &str = r"
local previous = version_of(KEYS[1])
local now = server_now()
local v = math.max(previous + 1, now)
local p = tonumber(ARGV[6]) or 0
local carried = 0
if previous > 0 and p > previous and p <= now and p >= now - 10000 then v = p; carried = 1 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SETRANGE', KEYS[1], 14, pack(v))
wake(KEYS[2], ARGV[3], KEYS[1])
if carried == 1 then
  redis.call('PUBLISH', ARGV[4], ARGV[7])
else
  announce(v, ARGV[4], ARGV[5])
end
return {v, carried, now}
";

/// `KEYS[1]` data, `KEYS[2]` lock; `ARGV`: tombstone bytes, minimum ttl ms, notice channel,
/// announce channel, announce message. Replaces the entry with a tombstone that lives at least
/// as long as the old entry would have, stamps the next version, breaks the lock (waking its
/// waiters, if there was one), announces. Returns `{existed, version}`.
const REMOVE_BODY: &str = r"
local v = next_version(KEYS[1])
local existed = 0
local flags = redis.call('GETRANGE', KEYS[1], 5, 5)
local pttl = redis.call('PTTL', KEYS[1])
if pttl ~= -2 and flags ~= '\4' then existed = 1 end
local ttl = tonumber(ARGV[2])
if pttl > ttl then ttl = pttl end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
redis.call('SETRANGE', KEYS[1], 14, pack(v))
wake(KEYS[2], ARGV[3], KEYS[1])
announce(v, ARGV[4], ARGV[5])
return {existed, v}
";

/// `KEYS[1]` lock, `KEYS[2]` data; `ARGV`: token, bytes, ttl ms, notice channel. While the
/// lock holds the token: writes, stamps the next version, releases the lock, wakes waiters.
/// Returns the version, or 0 if the lock was lost.
const COMPLETE_BODY: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local v = next_version(KEYS[2])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('SETRANGE', KEYS[2], 14, pack(v))
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[4], KEYS[2])
return v
";

/// `KEYS[1]` data, `KEYS[2]` lock; `ARGV`: last byte to read, token, lock ttl ms. Reads the
/// entry as a read does (bytes up to the limit, length, PTTL) and, unless it is fresh, tries
/// to take the lock in the same step. Returns `{bytes, length, pttl, locked}` with `locked` 1
/// (taken), -1 (held by someone else) or 0 (not tried: the entry is fresh).
const READ_OR_LOCK_BODY: &str = r"
local v = redis.call('GETRANGE', KEYS[1], 0, ARGV[1])
local len = redis.call('STRLEN', KEYS[1])
local pttl = redis.call('PTTL', KEYS[1])
local fresh = false
if pttl ~= -2 and #v >= 42 and string.sub(v, 1, 4) == '\193MLC' then
  local tombstone = math.floor(string.byte(v, 6) / 4) % 2 == 1
  local function u64(at)
    local n = 0
    for i = at + 7, at, -1 do n = n * 256 + string.byte(v, i) end
    return n
  end
  if not tombstone then
    if pttl == -1 then fresh = true else fresh = (u64(31) - pttl) < u64(23) end
  end
end
local locked = 0
if not fresh then
  if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then locked = 1 else locked = -1 end
end
return {v, len, pttl, locked}
";

fn script(body: &str) -> String {
    format!("{LIB}{body}")
}

pub(crate) static OVERWRITE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(&script(OVERWRITE_BODY)));
pub(crate) static REMOVE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(&script(REMOVE_BODY)));
pub(crate) static READ_OR_LOCK: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(&script(READ_OR_LOCK_BODY)));
pub(crate) static COMPLETE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(&script(COMPLETE_BODY)));
/// The text of [`COMPLETE`], for pipelines of `EVAL` (a pipeline cannot load scripts).
pub(crate) static COMPLETE_SRC: LazyLock<String> = LazyLock::new(|| script(COMPLETE_BODY));

/// A write script's `EVALSHA` command, built once: [`ScriptCall::new`] with the number of
/// keys, then the keys, then the arguments ([`Connection::invoke_write`]).
///
/// [`Connection::invoke_write`]: crate::Connection::invoke_write
pub(crate) struct ScriptCall {
    pub(crate) script: &'static redis::Script,
    pub(crate) cmd: redis::Cmd,
    pub(crate) keys_left: usize,
}

impl ScriptCall {
    pub(crate) fn new(script: &'static redis::Script, keys: usize) -> Self {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash()).arg(keys);
        ScriptCall {
            script,
            cmd,
            keys_left: keys,
        }
    }

    pub(crate) fn key(mut self, key: impl redis::ToRedisArgs) -> Self {
        self.keys_left -= 1;
        self.cmd.arg(key);
        self
    }

    pub(crate) fn arg(mut self, arg: impl redis::ToRedisArgs) -> Self {
        debug_assert_eq!(self.keys_left, 0, "keys go before arguments");
        self.cmd.arg(arg);
        self
    }
}
