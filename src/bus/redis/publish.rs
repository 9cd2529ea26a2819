//! Publishing: the Lua scripts that append and publish atomically, and how a batch is cut into
//! script calls.
//!
//! # Two scripts
//! The general script ([`general_script`]) takes any mix of messages: per message 5 keys and 6
//! arguments, a `PTTL` per user and call, and the channel message built per recipient. Most
//! calls are simpler: every message is one of a whole event's, standing for that event only
//! (with the rate limit off, all of them). Those go through the fast path ([`whole_script`]):
//! 2 keys per message, one stream id and one channel message per event shared by its
//! recipients, and no TTL read ([`TtlMemo`] says when a refresh is due). Session 8 measured
//! only a third of the general script's cost in its commands (`docs/benchmarks.md`); the fast
//! path took Redis from 6.5 to 3.5 µs per message on the consume benchmark. The fast path gives
//! a call back, having written nothing, when one of its events went out in parts before; it
//! then goes through the general script, which checks such an event per user.
//!
//! # Exactly once per user, cheaply
//! A partition replayed by another consumer (after a crash or a rebalance) must not reach a user
//! twice. Two guards serve that, both written in the same atomic call as the messages they cover:
//! - **per event** (`fc:event:<id>`, standalone Redis only): when a call holds *all* of an
//!   event's messages (a whole run, see [`Outgoing::whole_event`]), one `SET NX GET` decides for
//!   all of them. Its value says how the event went out the first time: `all` (whole, so a repeat
//!   is dropped entirely) or `some` (in parts, so each part is checked per user).
//! - **per user** (`fc:{user}:seen:<window>` sets): for an event's messages that go out in parts
//!   (a recipient's message was held by the rate limit and leaves later, coalesced) and on a
//!   cluster, where a call must stay within one user's slot.
//!
//! The per-user guard costs Redis three commands per message and a set member per user and
//! event; the per-event one a single `SET` per event. With 20 recipients per event that took
//! Redis from 13.2–14.4 to 12.0–12.5 µs per message, and sending each payload once per call
//! (see [`distinct_payloads`]) to 8.7–9.1 µs (`docs/benchmarks.md`).
//!
//! A part message of an event first delivered whole is dropped (its user had it); a whole run of
//! an event first delivered in parts is checked per user (some users may have missed it).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redis::RedisError;

use super::{Conn, RedisBus, keys};
use crate::bus::Outgoing;

/// A history starting: shared by both publish scripts. A stream found missing (new, expired
/// while idle, or evicted) is the only time the epoch is read: while the stream lives, its meta
/// key (which outlives it) holds the epoch the subscribers already know. Positions before now
/// cannot be continued from: 'floor' marks where this lifetime's entries start (a read while the
/// stream was missing may have handed out a later top). The caller tells the channel the epoch
/// with the first entry, whose id must be `first` (above the floor even within its millisecond).
const START_HISTORY: &str = r#"
local function start_history(meta, new_epoch)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local floor = string.format('%d-0', now + 1)
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then
    epoch = new_epoch .. string.sub(redis.sha1hex(meta), 1, 6)
    floor = '0-0'
    redis.call('HSET', meta, 'epoch', epoch, 'floor', floor)
  else
    floor = redis.call('HGET', meta, 'top') or floor
    redis.call('HSET', meta, 'floor', floor)
  end
  redis.call('HDEL', meta, 'top')
  local first = '*'
  local ms, seq = string.match(floor, '^(%d+)-(%d+)$')
  if ms and tonumber(ms) >= now then
    first = ms .. '-' .. (tonumber(seq) + 1)
  end
  return epoch, first, tonumber(ms) or 0
end
"#;

/// The general publish script: any mix of messages (see [`general_script`]).
const GENERAL_BODY: &str = r#"
-- Appends messages in order, then publishes each channel's share once: its messages of this
-- call, each as '<stream id> <payload bytes>\n<payload>', the first after a new stream as
-- '<epoch>:<stream id> …' (see the module doc of `mod.rs`).
-- Per message 5 KEYS: stream, seen ids (current window), seen ids (previous window), channel,
-- meta; then one KEY per event guard; then, when ARGV 8 is '1', the batch's abort key. Shared
-- ARGV: 1 max length, 2 max age ms, 3 window ms, 4 PUBLISH or SPUBLISH, 5 message count, 6 the
-- random part of a new epoch, 7 the meta key's TTL ms, 8 abort key given; then per message 6
-- ARGV: payload number, event id ('' = not guarded), oldest id to keep ('' = no age trim this
-- time), event guard (0 = per user only; g > 0: all of the event's messages are in this call,
-- guard key g; -g: a part of the event, guard key g), covered events ('' or a kind, 'sum' or
-- 'any', then every event id the message stands for, '\n'-separated), their guard keys
-- (space-separated numbers, '' on a cluster); then the payloads, each once.
-- Returns the number published; -1 when an earlier call of the batch aborted it; or, with
-- nothing written, a flat list of (message index from 0, '\n'-separated events its user had)
-- for each 'sum' message whose user had some but not all of its events: the caller rebuilds
-- those without them and sends this call and the rest of its batch again.
local maxlen, age, window, publish = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local maxage = tonumber(age)
local count = tonumber(ARGV[5])
local new_epoch, meta_ttl = ARGV[6], ARGV[7]
local abort = nil
if ARGV[8] == '1' then
  abort = KEYS[#KEYS]
  if redis.call('EXISTS', abort) == 1 then return -1 end
end
local payloads = 8 + count * 6
local guard_base = count * 5

local function covered(a)
  local kind, ids, gs = nil, {}, {}
  for id in string.gmatch(ARGV[a + 5], '[^\n]+') do
    if kind == nil then kind = id else ids[#ids + 1] = id end
  end
  for g in string.gmatch(ARGV[a + 6], '%d+') do gs[#gs + 1] = tonumber(g) end
  return kind, ids, gs
end

-- First, reading only: which events of a message standing for several has its user had?
local skip, conflicts = {}, {}
for i = 0, count - 1 do
  local a = 8 + i * 6
  if ARGV[a + 5] ~= '' then
    local k = i * 5
    local kind, ids, gs = covered(a)
    local had = {}
    for n, id in ipairs(ids) do
      local seen = redis.call('SISMEMBER', KEYS[k + 2], id) == 1
        or redis.call('SISMEMBER', KEYS[k + 3], id) == 1
      if not seen and gs[n] then
        seen = redis.call('GET', KEYS[guard_base + gs[n]]) == 'all'
      end
      if seen then had[#had + 1] = id end
    end
    if #ids > 0 and #had == #ids then
      skip[i] = true
    elseif #had > 0 and kind == 'sum' then
      conflicts[#conflicts + 1] = i
      conflicts[#conflicts + 1] = table.concat(had, '\n')
    end
  end
end
if #conflicts > 0 then
  -- The batch's later calls must not overtake the rebuilt messages.
  if abort then redis.call('SET', abort, '1', 'PX', 60000) end
  return conflicts
end

local published = 0
local channels, entries, guards = {}, {}, {}
-- Per user touched by this call (by meta key): the stream's TTL and, when it was missing, the
-- epoch to announce.
local users = {}
for i = 0, count - 1 do
  local k, a = i * 5, 8 + i * 6
  local payload, event, oldest, g = ARGV[payloads + tonumber(ARGV[a + 1])], ARGV[a + 2], ARGV[a + 3], tonumber(ARGV[a + 4])
  local fresh, per_user = true, event ~= ''
  if skip[i] then
    fresh = false
  elseif ARGV[a + 5] ~= '' then
    -- Stands for several events: remember each for this user, and mark each event as
    -- delivered in parts (a later whole delivery of it is then checked per user).
    per_user = false
    local _, ids, gs = covered(a)
    for n, id in ipairs(ids) do
      redis.call('SADD', KEYS[k + 2], id)
      if gs[n] then
        redis.call('SET', KEYS[guard_base + gs[n]], 'some', 'NX', 'PX', window * 2)
      end
    end
    if redis.call('PTTL', KEYS[k + 2]) < 0 then
      redis.call('PEXPIRE', KEYS[k + 2], window * 2)
    end
  elseif per_user and g ~= 0 then
    local key = KEYS[guard_base + math.abs(g)]
    local state = guards[key]
    if state == nil then
      -- 'all': delivered whole before; 'some': delivered in parts; 'whole': whole, by this call.
      state = redis.call('SET', key, g > 0 and 'all' or 'some', 'NX', 'GET', 'PX', window * 2)
        or (g > 0 and 'whole' or 'some')
      guards[key] = state
    end
    if state == 'all' then
      fresh = false
    elseif state == 'whole' and g > 0 then
      per_user = false
    end
  end
  if fresh and per_user then
    if redis.call('SISMEMBER', KEYS[k + 3], event) == 1 or redis.call('SADD', KEYS[k + 2], event) == 0 then
      fresh = false
    elseif redis.call('PTTL', KEYS[k + 2]) < 0 then
      -- A new window's set: it must outlive the next window. PTTL is a read; a PEXPIRE per
      -- message would be a write (and replicated).
      redis.call('PEXPIRE', KEYS[k + 2], window * 2)
    end
  end
  if fresh then
    local stream, meta = KEYS[k + 1], KEYS[k + 5]
    local u = users[meta]
    if u == nil then
      u = {ttl = redis.call('PTTL', stream)}
      if u.ttl == -2 then
        -- Rare: the stream is gone; a history starts (see START_HISTORY).
        u.epoch, u.first_id = start_history(meta, new_epoch)
        u.announce = u.epoch .. ':'
      end
      users[meta] = u
    end
    local id = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, u.first_id or '*', 'm', payload)
    u.first_id = nil
    if oldest ~= '' then
      redis.call('XTRIM', stream, 'MINID', '~', oldest)
    end
    -- Keep the stream for at least `age` after this entry: refresh (to 2 x age) only once less
    -- than `age` is left, so most calls read the TTL instead of writing it. The meta key's TTL
    -- moves with it and is longer, so the epoch outlives the entries.
    if u.ttl < maxage then
      redis.call('PEXPIRE', stream, maxage * 2)
      redis.call('PEXPIRE', meta, meta_ttl)
      u.ttl = maxage * 2
    end
    local channel = KEYS[k + 4]
    local mine = entries[channel]
    if mine == nil then
      mine = {}
      entries[channel] = mine
      channels[#channels + 1] = channel
    end
    if u.announce then
      mine[#mine + 1] = u.announce .. id .. ' ' .. #payload .. '\n' .. payload
      u.announce = nil
    else
      mine[#mine + 1] = id .. ' ' .. #payload .. '\n' .. payload
    end
    published = published + 1
  end
end
for _, channel in ipairs(channels) do
  local mine = entries[channel]
  -- Most channels get one message per call: publish it as it is, without a concat's copy.
  redis.call(publish, channel, #mine == 1 and mine[1] or table.concat(mine))
end
return published
"#;

/// The general script: messages of any kind, in order. Per message 5 KEYS and 6 ARGV.
pub(super) fn general_script() -> String {
    [START_HISTORY, GENERAL_BODY].concat()
}

/// The fast path's script (see [`whole_script`]).
const WHOLE_BODY: &str = r#"
-- Whole events on standalone Redis, the common case: every message of the call belongs to an
-- event whose recipients are all in this call, and none stands for other events.
-- KEYS: 1 the id counter; per message (from 1) its stream 2m and its channel 2m+1; then the
-- event guards (guard g at 2 x count + 1 + g); then, when ARGV 5 is '1', the batch's abort key.
-- ARGV: 1 max length, 2 message count, 3 run count, 4 the guards' TTL ms, 5 abort key given,
-- 6 max age ms, 7 meta TTL ms, 8 the random part of a new epoch, 9 oldest id to keep; then
-- lists of message numbers, space-separated: 10 trim by age, 11 refresh the stream's and meta
-- key's TTLs, 12 hold for a later message of the same user; then per run (consecutive messages
-- of one event with one payload) 3 ARGV: guard number, message count, payload.
-- Returns the number published; -1 when an earlier call of the batch aborted it; -2 with
-- nothing written when an event went out in parts before (the caller sends the call again
-- through the general script, which checks such an event per user).
local maxlen, count, runs = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local guard_ttl, maxage, meta_ttl, new_epoch = ARGV[4], tonumber(ARGV[6]), ARGV[7], ARGV[8]
local guard_base = 2 * count + 1
local abort = nil
if ARGV[5] == '1' then
  abort = KEYS[#KEYS]
  if redis.call('EXISTS', abort) == 1 then return -1 end
end
local function numbers(list)
  local set = {}
  for n in string.gmatch(list, '%d+') do set[tonumber(n)] = true end
  return set
end

-- Reading only: how each event went out before, if it did.
local states = {}
for r = 0, runs - 1 do
  local g = tonumber(ARGV[12 + r * 3 + 1])
  if states[g] == nil then
    states[g] = redis.call('GET', KEYS[guard_base + g]) or 'new'
    if states[g] == 'some' then
      if abort then redis.call('SET', abort, '1', 'PX', 60000) end
      return -2
    end
  end
end

-- One id per run, the same in every recipient's stream, so the channel message is built once
-- per run instead of once per message (a copy of the payload that cost Redis about 0.6 µs per
-- message): the later of now and the last id handed out, whose sequence goes on.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local seq = 0
local last = redis.call('GET', KEYS[1])
if last then
  local ms, s = string.match(last, '^(%d+)-(%d+)$')
  if ms and tonumber(ms) >= now then
    now, seq = tonumber(ms), tonumber(s) + 1
  end
end
local trim, refresh, hold = numbers(ARGV[10]), numbers(ARGV[11]), numbers(ARGV[12])
local oldest = ARGV[9]
local held, held_order = {}, {}
-- A user's messages of this call go out as one channel message (one push for a gateway to
-- parse): held until the user's last one. That one may be skipped (its event went out whole
-- before, a replay after a crash): whatever is still held at the end goes out then.
local function publish(m, channel, msg)
  local mine = held[channel]
  if hold[m] then
    if mine then
      mine[#mine + 1] = msg
    else
      held[channel] = {msg}
      held_order[#held_order + 1] = channel
    end
  elseif mine then
    mine[#mine + 1] = msg
    held[channel] = nil
    redis.call('PUBLISH', channel, table.concat(mine))
  else
    redis.call('PUBLISH', channel, msg)
  end
end

local m, published, id = 0, 0, nil
for r = 0, runs - 1 do
  local a = 12 + r * 3
  local g, n, payload = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), ARGV[a + 3]
  if states[g] == 'all' then
    m = m + n
  else
    if states[g] == 'new' then
      redis.call('SET', KEYS[guard_base + g], 'all', 'PX', guard_ttl)
      states[g] = 'sent'
    end
    id = now .. '-' .. seq
    seq = seq + 1
    local tail = ' ' .. #payload .. '\n' .. payload
    local framed = id .. tail
    for _ = 1, n do
      m = m + 1
      local stream = KEYS[2 * m]
      local msg = framed
      local got = redis.pcall('XADD', stream, 'NOMKSTREAM', 'MAXLEN', '~', maxlen, id, 'm', payload)
      if type(got) ~= 'string' then
        if got == false then
          -- The stream is missing: a history starts.
          local meta = string.sub(stream, 1, -4) .. 'meta'
          local epoch, first, floor_ms = start_history(meta, new_epoch)
          -- The run's id, when it is above the floor, keeps this stream on the shared ids
          -- (Redis's pick could be above the next run's id, which would then be refused).
          if first == '*' and now > floor_ms then
            first = id
          end
          got = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, first, 'm', payload)
          redis.call('PEXPIRE', stream, maxage * 2)
          redis.call('PEXPIRE', meta, meta_ttl)
          msg = epoch .. ':' .. got .. tail
        else
          -- The stream's top is at or past the id (written by the general script in this
          -- millisecond): Redis picks the next one.
          got = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'm', payload)
          msg = got .. tail
        end
      end
      if trim[m] then
        redis.call('XTRIM', stream, 'MINID', '~', oldest)
      end
      if refresh[m] then
        -- Keeps the stream for at least the max age after this entry (see the caller).
        redis.call('PEXPIRE', stream, maxage * 2)
        redis.call('PEXPIRE', string.sub(stream, 1, -4) .. 'meta', meta_ttl)
      end
      publish(m, KEYS[2 * m + 1], msg)
      published = published + 1
    end
  end
end
for _, channel in ipairs(held_order) do
  local mine = held[channel]
  if mine then
    redis.call('PUBLISH', channel, table.concat(mine))
  end
end
if id then
  redis.call('SET', KEYS[1], id, 'PX', 86400000)
end
return published
"#;

/// The fast path's script: only whole events (their recipients all in the call, no message
/// standing for several events), on standalone Redis. Per message 2 KEYS and no ARGV; each
/// run of an event's messages sharing a payload carries it once with one stream id for all of
/// them; no `PTTL` (the caller says which streams need their TTL refreshed). It reaches a
/// user's meta key by name from the stream's, which standalone Redis allows (a cluster would
/// refuse an undeclared key; clusters use the general script).
pub(super) fn whole_script() -> String {
    [START_HISTORY, WHOLE_BODY].concat()
}

/// Messages per script call on standalone Redis: enough to spread the call's fixed cost, few
/// enough that one call never blocks Redis for long. A whole event may make a call longer.
const MESSAGES_PER_CALL: usize = 256;

/// The largest event kept whole in one call (so guarded once); a bigger one (a space with more
/// members) goes out in parts of [`MESSAGES_PER_CALL`], guarded per user, rather than block
/// Redis for one long call.
const MAX_WHOLE_EVENT: usize = 1024;

/// A message placed in a call: `whole` when the call holds all of its event's messages.
#[derive(Debug, Clone, Copy)]
struct Placed<'a> {
    msg: &'a Outgoing,
    whole: bool,
}

/// Cuts a batch into standalone script calls, in order: about [`MESSAGES_PER_CALL`] messages
/// each, never splitting a whole event of up to [`MAX_WHOLE_EVENT`] messages.
fn standalone_calls(batch: &[Outgoing]) -> Vec<Vec<Placed<'_>>> {
    let mut calls: Vec<Vec<Placed<'_>>> = Vec::new();
    let mut call: Vec<Placed<'_>> = Vec::new();
    let mut at = 0;
    while at < batch.len() {
        let run = Outgoing::whole_run(&batch[at..]).filter(|n| *n <= MAX_WHOLE_EVENT);
        let (n, whole) = run.map_or((1, false), |n| (n, true));
        if !call.is_empty() && call.len() + n > MESSAGES_PER_CALL {
            calls.push(std::mem::take(&mut call));
        }
        call.extend(batch[at..at + n].iter().map(|msg| Placed { msg, whole }));
        at += n;
    }
    if !call.is_empty() {
        calls.push(call);
    }
    calls
}

/// A call's payloads, each once, and the number (from 1) of each message's payload.
struct Payloads<'a> {
    distinct: Vec<&'a Bytes>,
    numbers: Vec<usize>,
}

/// Numbers payloads so that a run of messages sharing one (an event's recipients) sends it once.
/// Redis's Lua hashes every byte of every string it is given, so a 1 KiB payload sent 20 times
/// cost Redis about 2 µs per message, before the bytes on the wire.
fn distinct_payloads<'a>(payloads: impl Iterator<Item = &'a Bytes>) -> Payloads<'a> {
    let mut distinct: Vec<&Bytes> = Vec::new();
    let mut numbers = Vec::new();
    for payload in payloads {
        let same = distinct.last().is_some_and(|last| *last == payload);
        if !same {
            distinct.push(payload);
        }
        numbers.push(distinct.len());
    }
    Payloads { distinct, numbers }
}

/// How many times a batch is rebuilt around events its users already had before giving up (each
/// round removes what was found; more rounds mean another consumer keeps publishing the same
/// events at the same moment).
const MAX_REBUILDS: usize = 8;

/// The `covers` ARGV of a message: its kind and event ids, or '' when it stands for one event.
fn covers_arg(msg: &Outgoing) -> Vec<u8> {
    let Some(covers) = msg.covers.as_ref().filter(|c| !c.event_ids.is_empty()) else {
        return Vec::new();
    };
    let mut arg = Vec::from(if covers.sums_changes() {
        &b"sum"[..]
    } else {
        &b"any"[..]
    });
    for id in &covers.event_ids {
        arg.push(b'\n');
        arg.extend_from_slice(id.as_bytes());
    }
    arg
}

/// What one publish attempt left to do.
enum Attempt {
    Done,
    /// These messages (rebuilt around events their users had, and the rest of the batch).
    Again(Vec<Outgoing>),
    /// These messages, through the general script only.
    General(Vec<Outgoing>),
}

/// What one script call answered.
enum CallResult {
    Published,
    /// An earlier call of the batch found conflicts: this one wrote nothing.
    Aborted,
    /// The fast path found an event that went out in parts before; nothing written: the call
    /// goes again through the general script.
    NeedsGeneral,
    /// Nothing written: these messages (index in the call) must be rebuilt without these events.
    Conflicts(Vec<(usize, Vec<String>)>),
}

fn call_result(value: redis::Value) -> Result<CallResult, RedisError> {
    match value {
        redis::Value::Int(n) if n >= 0 => Ok(CallResult::Published),
        redis::Value::Int(-2) => Ok(CallResult::NeedsGeneral),
        redis::Value::Int(_) => Ok(CallResult::Aborted),
        redis::Value::Array(items) => {
            let mut conflicts = Vec::new();
            let mut items = items.into_iter();
            while let (Some(index), Some(had)) = (items.next(), items.next()) {
                let index: usize = redis::from_redis_value(index)?;
                let had: String = redis::from_redis_value(had)?;
                conflicts.push((index, had.split('\n').map(str::to_owned).collect()));
            }
            Ok(CallResult::Conflicts(conflicts))
        }
        other => Err(RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "unexpected publish script reply",
            format!("{other:?}"),
        ))),
    }
}

/// The messages of `call` to send again: each conflicting one rebuilt without the events its
/// user had (or left out when nothing is left), the others as they were.
fn rebuilt(call: &[Placed<'_>], conflicts: &[(usize, Vec<String>)]) -> Vec<Outgoing> {
    let mut again = Vec::with_capacity(call.len());
    for (i, placed) in call.iter().enumerate() {
        let had = conflicts
            .iter()
            .find(|(at, _)| *at == i)
            .map(|(_, had)| had);
        match (
            had,
            placed.msg.covers.as_ref().and_then(|c| c.without.as_ref()),
        ) {
            (Some(had), Some(without)) => {
                let had: Vec<&str> = had.iter().map(String::as_str).collect();
                tracing::info!(user = %placed.msg.user, had = ?had, "a coalesced message is rebuilt without events its user already had");
                again.extend(without(&had));
            }
            _ => again.push(placed.msg.clone()),
        }
    }
    again
}

/// When this process last refreshed each user's stream TTL, so the fast path needs no `PTTL`
/// per user and call (a quarter of Redis's time per message in session 8's measurement).
///
/// A refresh sets the TTL to twice the maximum age; one is due once half the maximum age has
/// passed since this process's last, so at every append at least 1.5 times the maximum age is
/// left. Nothing else shortens a stream's TTL; a stream that vanished (flushed, evicted, a Redis
/// restart) is found missing by the append itself and starts anew with its TTL. Another
/// process's refreshes are not known here and only make this one's redundant. Forgetting (the
/// map is cleared when it grows past [`TtlMemo::MAX_USERS`], and on restart) costs a refresh.
#[derive(Default)]
pub(super) struct TtlMemo {
    refreshed: Mutex<HashMap<Arc<str>, Instant>>,
}

impl TtlMemo {
    const MAX_USERS: usize = 1 << 20;

    /// Which of `users` need their TTL refreshed at `now` (at most once each).
    fn due<'u>(
        &self,
        users: impl Iterator<Item = &'u Arc<str>>,
        now: Instant,
        every: Duration,
    ) -> Vec<&'u Arc<str>> {
        let Ok(refreshed) = self.refreshed.lock() else {
            // A poisoned lock: refresh everyone (correct, only slower).
            let mut all: Vec<&Arc<str>> = users.collect();
            all.sort();
            all.dedup();
            return all;
        };
        let mut asked: HashSet<&str> = HashSet::new();
        users
            .filter(|user| asked.insert(user))
            .filter(|user| {
                refreshed
                    .get(*user)
                    .is_none_or(|at| now.saturating_duration_since(*at) >= every)
            })
            .collect()
    }

    /// Records refreshes that Redis carried out (their call succeeded), as of `at`: a time
    /// before the refresh, so the TTL lasts at least twice the maximum age from it.
    fn record(&self, users: &[Arc<str>], at: Instant) {
        if users.is_empty() {
            return;
        }
        if let Ok(mut refreshed) = self.refreshed.lock() {
            if refreshed.len() + users.len() > Self::MAX_USERS {
                refreshed.clear();
            }
            for user in users {
                refreshed.insert(user.clone(), at);
            }
        }
    }
}

/// Whether a call can take the fast path: every message is one of a whole event's and stands
/// for that event only.
fn whole_only(call: &[Placed<'_>]) -> bool {
    call.iter().all(|p| {
        p.whole
            && p.msg.event_id.is_some()
            && p.msg.covers.as_ref().is_none_or(|c| c.event_ids.is_empty())
    })
}

/// A fast-path call under construction: what it refreshes, recorded once it succeeded.
struct WholeCall {
    cmd: redis::Cmd,
    refreshed: Vec<Arc<str>>,
}

/// Event guard keys of one call, numbered from 1 in order of first use.
#[derive(Default)]
struct GuardKeys<'a> {
    number_of: HashMap<&'a str, usize>,
    keys: Vec<&'a str>,
}

impl<'a> GuardKeys<'a> {
    fn number(&mut self, event: &'a str) -> usize {
        *self.number_of.entry(event).or_insert_with(|| {
            self.keys.push(event);
            self.keys.len()
        })
    }
}

impl RedisBus {
    /// One script call publishing `messages` in order. On a cluster (`standalone` false) the
    /// channel is a shard channel, and events are guarded per user only: an event's guard key
    /// would be in another slot than the user's keys. `abort` names the batch's abort key
    /// (standalone batches of several calls).
    fn invocation(
        &self,
        messages: &[Placed<'_>],
        window: u64,
        oldest: &mut impl FnMut() -> Option<u64>,
        standalone: bool,
        abort: Option<&str>,
    ) -> redis::Cmd {
        let o = &self.options;
        let mut guard_keys = GuardKeys::default();
        let mut guards: Vec<i64> = Vec::with_capacity(messages.len());
        let mut cover_guards: Vec<String> = Vec::with_capacity(messages.len());
        for p in messages {
            let covered = p.msg.covers.as_ref().filter(|c| !c.event_ids.is_empty());
            match (covered, p.msg.event_id.as_deref()) {
                (Some(covers), _) => {
                    guards.push(0);
                    cover_guards.push(if standalone {
                        covers
                            .event_ids
                            .iter()
                            .map(|id| guard_keys.number(id).to_string())
                            .collect::<Vec<_>>()
                            .join(" ")
                    } else {
                        String::new()
                    });
                }
                (None, Some(event)) if standalone => {
                    let g = guard_keys.number(event) as i64;
                    guards.push(if p.whole { g } else { -g });
                    cover_guards.push(String::new());
                }
                _ => {
                    guards.push(0);
                    cover_guards.push(String::new());
                }
            }
        }
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash())
            .arg(messages.len() * 5 + guard_keys.keys.len() + usize::from(abort.is_some()));
        for p in messages {
            let user = &p.msg.user;
            cmd.arg(keys::stream(user))
                .arg(keys::seen(user, window))
                .arg(keys::seen(user, window.saturating_sub(1)))
                .arg(keys::channel(user))
                .arg(keys::meta(user));
        }
        for event in &guard_keys.keys {
            cmd.arg(keys::event(event));
        }
        if let Some(abort) = abort {
            cmd.arg(abort);
        }
        cmd.arg(o.stream_max_len)
            .arg(o.stream_max_age.as_millis().max(1) as u64)
            .arg(o.dedup_window.as_millis().max(1) as u64)
            .arg(if standalone { "PUBLISH" } else { "SPUBLISH" })
            .arg(messages.len())
            .arg(super::history::epoch_base())
            .arg(o.meta_ttl().as_millis() as u64)
            .arg(if abort.is_some() { "1" } else { "0" });
        let payloads = distinct_payloads(messages.iter().map(|p| &p.msg.payload));
        for (((p, guard), number), cover_guards) in messages
            .iter()
            .zip(guards)
            .zip(&payloads.numbers)
            .zip(&cover_guards)
        {
            cmd.arg(number)
                .arg(p.msg.event_id.as_deref().unwrap_or(""))
                .arg(oldest().map(|ms| ms.to_string()).unwrap_or_default())
                .arg(guard)
                .arg(covers_arg(p.msg))
                .arg(cover_guards);
        }
        for payload in payloads.distinct {
            cmd.arg(&payload[..]);
        }
        cmd
    }

    /// One fast-path call (see [`whole_script`]): runs of an event's messages sharing a payload,
    /// the TTLs due for a refresh, and which messages wait for a later one of their user.
    fn whole_invocation(
        &self,
        call: &[Placed<'_>],
        window_ms: u64,
        oldest: &mut impl FnMut() -> Option<u64>,
        abort: Option<&str>,
        now: Instant,
    ) -> WholeCall {
        let o = &self.options;
        let mut guard_keys = GuardKeys::default();
        // (guard number, messages, payload)
        let mut runs: Vec<(usize, usize, &Bytes)> = Vec::new();
        for p in call {
            let g = guard_keys.number(p.msg.event_id.as_deref().unwrap_or(""));
            match runs.last_mut() {
                Some((guard, n, payload)) if *guard == g && **payload == p.msg.payload => *n += 1,
                _ => runs.push((g, 1, &p.msg.payload)),
            }
        }
        let list = |numbers: &mut String, m: usize| {
            if !numbers.is_empty() {
                numbers.push(' ');
            }
            numbers.push_str(&m.to_string());
        };
        let (mut trim, mut oldest_id) = (String::new(), None);
        for m in 1..=call.len() {
            if let Some(ms) = oldest() {
                oldest_id = Some(ms);
                list(&mut trim, m);
            }
        }
        let due = self
            .ttl_memo
            .due(call.iter().map(|p| &p.msg.user), now, o.stream_max_age / 2);
        let due: HashSet<&str> = due.into_iter().map(|u| &**u).collect();
        let (mut refresh, mut refreshed) = (String::new(), Vec::new());
        let mut asked: HashSet<&str> = HashSet::new();
        for (i, p) in call.iter().enumerate() {
            if asked.insert(&p.msg.user) && due.contains(&*p.msg.user) {
                list(&mut refresh, i + 1);
                refreshed.push(p.msg.user.clone());
            }
        }
        // A message whose user has a later one in this call is held until that one.
        let mut hold = String::new();
        let mut later: HashSet<&str> = HashSet::new();
        let mut holds = vec![false; call.len()];
        for (i, p) in call.iter().enumerate().rev() {
            holds[i] = !later.insert(&p.msg.user);
        }
        for (i, _) in holds.iter().enumerate().filter(|(_, h)| **h) {
            list(&mut hold, i + 1);
        }
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.whole_script.get_hash())
            .arg(1 + call.len() * 2 + guard_keys.keys.len() + usize::from(abort.is_some()))
            .arg(keys::LAST_ID);
        for p in call {
            cmd.arg(keys::stream(&p.msg.user))
                .arg(keys::channel(&p.msg.user));
        }
        for event in &guard_keys.keys {
            cmd.arg(keys::event(event));
        }
        if let Some(abort) = abort {
            cmd.arg(abort);
        }
        cmd.arg(o.stream_max_len)
            .arg(call.len())
            .arg(runs.len())
            .arg(window_ms * 2)
            .arg(if abort.is_some() { "1" } else { "0" })
            .arg(o.stream_max_age.as_millis().max(1) as u64)
            .arg(o.meta_ttl().as_millis() as u64)
            .arg(super::history::epoch_base())
            .arg(oldest_id.map(|ms| ms.to_string()).unwrap_or_default())
            .arg(trim)
            .arg(refresh)
            .arg(hold);
        for (g, n, payload) in runs {
            cmd.arg(g).arg(n).arg(&payload[..]);
        }
        WholeCall { cmd, refreshed }
    }

    /// Publishes `batch`, rebuilding coalesced messages around events their users already had
    /// (a batch replayed after a consumer crash, grouped differently) until nothing conflicts.
    pub(super) async fn publish_once(&self, batch: &[Outgoing]) -> Result<(), RedisError> {
        let mut fast = true;
        let mut again = match self.publish_attempt(batch, fast).await? {
            Attempt::Done => return Ok(()),
            Attempt::Again(again) => again,
            Attempt::General(again) => {
                fast = false;
                again
            }
        };
        for _ in 1..MAX_REBUILDS {
            match self.publish_attempt(&again, fast).await? {
                Attempt::Done => return Ok(()),
                Attempt::Again(next) => again = next,
                Attempt::General(next) => {
                    fast = false;
                    again = next;
                }
            }
        }
        Err(RedisError::from((
            redis::ErrorKind::Client,
            "coalesced messages kept conflicting with deliveries of another consumer",
        )))
    }

    /// One attempt: done, or what to send again (rebuilt, or through the general script only).
    /// `fast` lets calls of whole events take the fast path.
    async fn publish_attempt(&self, batch: &[Outgoing], fast: bool) -> Result<Attempt, RedisError> {
        if batch.is_empty() {
            return Ok(Attempt::Done);
        }
        let started = Instant::now();
        let window_ms = self.options.dedup_window.as_millis().max(1) as u64;
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let window = now_ms / window_ms;
        // Trimming by age costs an XTRIM; length trimming (every XADD) and the key's expiry keep
        // memory bounded in between, so about one message in 64 asks for it.
        let age_ms = self.options.stream_max_age.as_millis() as u64;
        let mut trim_every = || {
            let n = self.trim_counter.fetch_add(1, Relaxed);
            n.is_multiple_of(64).then(|| now_ms.saturating_sub(age_ms))
        };
        match self.publisher.clone() {
            Conn::Standalone(mut c) => {
                let calls = standalone_calls(batch);
                // Several calls: one that finds conflicts stops the later ones, which must not
                // overtake its rebuilt messages.
                let abort = (calls.len() > 1).then(|| keys::abort(rand::random::<u64>()));
                let mut pipe = redis::pipe();
                let mut refreshed: Vec<Vec<Arc<str>>> = Vec::with_capacity(calls.len());
                for call in &calls {
                    if fast && whole_only(call) {
                        let whole = self.whole_invocation(
                            call,
                            window_ms,
                            &mut trim_every,
                            abort.as_deref(),
                            started,
                        );
                        pipe.add_command(whole.cmd);
                        refreshed.push(whole.refreshed);
                    } else {
                        pipe.add_command(self.invocation(
                            call,
                            window,
                            &mut trim_every,
                            true,
                            abort.as_deref(),
                        ));
                        refreshed.push(Vec::new());
                    }
                }
                let replies: Vec<redis::Value> = pipe.query_async(&mut c).await?;
                for (at, reply) in replies.into_iter().enumerate() {
                    let rest = || calls[at + 1..].iter().flatten().map(|p| p.msg.clone());
                    match call_result(reply)? {
                        CallResult::Published => self.ttl_memo.record(&refreshed[at], started),
                        CallResult::Conflicts(conflicts) => {
                            let mut again = rebuilt(&calls[at], &conflicts);
                            again.extend(rest());
                            return Ok(Attempt::Again(again));
                        }
                        CallResult::NeedsGeneral => {
                            let mut again: Vec<Outgoing> =
                                calls[at].iter().map(|p| p.msg.clone()).collect();
                            again.extend(rest());
                            return Ok(Attempt::General(again));
                        }
                        CallResult::Aborted => {
                            return Err(RedisError::from((
                                redis::ErrorKind::Client,
                                "a publish call was aborted without a conflict before it",
                            )));
                        }
                    }
                }
                Ok(Attempt::Done)
            }
            Conn::Cluster(c) => {
                // A script call must stay within one slot: one call per user (its keys share a
                // hash tag), all sent at once, each message guarded per user.
                let mut per_user: HashMap<&str, Vec<Placed<'_>>> = HashMap::new();
                for msg in batch {
                    per_user
                        .entry(&msg.user)
                        .or_default()
                        .push(Placed { msg, whole: false });
                }
                let calls: Vec<Vec<Placed<'_>>> = per_user.into_values().collect();
                let sends = calls.iter().map(|msgs| {
                    let cmd = self.invocation(msgs, window, &mut trim_every, false, None);
                    let mut c = c.clone();
                    async move { cmd.query_async::<redis::Value>(&mut c).await }
                });
                let sends: Vec<_> = sends.collect();
                let replies = futures_util::future::try_join_all(sends).await?;
                let mut again = Vec::new();
                for (call, reply) in calls.iter().zip(replies) {
                    if let CallResult::Conflicts(conflicts) = call_result(reply)? {
                        again.extend(rebuilt(call, &conflicts));
                    }
                }
                Ok(if again.is_empty() {
                    Attempt::Done
                } else {
                    Attempt::Again(again)
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn event(id: &str, users: usize) -> Vec<Outgoing> {
        let mut msgs: Vec<Outgoing> = (0..users)
            .map(|u| {
                Outgoing::for_event(
                    Arc::from(format!("u{u}")),
                    Bytes::from_static(b"{}"),
                    Some(Arc::from(id)),
                )
            })
            .collect();
        Outgoing::mark_whole_event(&mut msgs);
        msgs
    }

    fn shape(calls: &[Vec<Placed<'_>>]) -> Vec<Vec<(String, bool)>> {
        calls
            .iter()
            .map(|c| {
                c.iter()
                    .map(|p| (p.msg.event_id.as_deref().unwrap_or("").to_owned(), p.whole))
                    .collect()
            })
            .collect()
    }

    #[test]
    fn a_ttl_refresh_is_due_once_per_user_and_again_after_half_the_max_age() {
        let memo = TtlMemo::default();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let every = Duration::from_secs(10);
        let t0 = Instant::now();
        // Never refreshed: due, once each however often the user appears.
        let due = memo.due([&a, &b, &a].into_iter(), t0, every);
        assert_eq!(due, [&a, &b]);
        // Nothing recorded until Redis did it (a failed call refreshes nothing).
        assert_eq!(memo.due([&a].into_iter(), t0, every).len(), 1);
        memo.record(std::slice::from_ref(&a), t0);
        assert!(
            memo.due([&a].into_iter(), t0 + Duration::from_secs(9), every)
                .is_empty()
        );
        assert_eq!(
            memo.due([&a, &b].into_iter(), t0 + Duration::from_secs(10), every),
            [&a, &b]
        );
    }

    #[test]
    fn only_calls_of_whole_single_events_take_the_fast_path() {
        let batch = event("e", 3);
        let calls = standalone_calls(&batch);
        assert!(whole_only(&calls[0]));
        let mut cut = event("e", 3);
        cut.truncate(2);
        assert!(!whole_only(&standalone_calls(&cut)[0]));
        let mut covering = event("e", 2);
        covering[1].covers = Some(Arc::new(crate::bus::Covered {
            event_ids: vec![Arc::from("d"), Arc::from("e")],
            without: None,
        }));
        assert!(!whole_only(&standalone_calls(&covering)[0]));
    }

    #[test]
    fn whole_events_are_never_split_between_calls() {
        // 12 events of 20: 240 messages fit one call; the 13th starts the next.
        let batch: Vec<Outgoing> = (0..13).flat_map(|e| event(&format!("e{e}"), 20)).collect();
        let calls = standalone_calls(&batch);
        assert_eq!(calls.iter().map(Vec::len).collect::<Vec<_>>(), [240, 20]);
        assert!(calls.iter().flatten().all(|p| p.whole));
        // Order is kept.
        let order: Vec<&Outgoing> = calls.iter().flatten().map(|p| p.msg).collect();
        assert!(order.iter().zip(&batch).all(|(a, b)| std::ptr::eq(*a, b)));
    }

    #[test]
    fn events_too_big_for_one_call_go_in_parts() {
        let mut batch = event("small", 3);
        batch.extend(event("huge", MAX_WHOLE_EVENT + 1));
        let calls = standalone_calls(&batch);
        let shapes = shape(&calls);
        assert_eq!(shapes[0][..3], vec![("small".to_owned(), true); 3][..]);
        assert!(calls.iter().all(|c| c.len() <= MESSAGES_PER_CALL));
        assert!(calls.iter().flatten().skip(3).all(|p| !p.whole));
        assert_eq!(calls.iter().map(Vec::len).sum::<usize>(), batch.len());
        // The same size is whole while it fits.
        let fits = event("big", MAX_WHOLE_EVENT);
        let calls = standalone_calls(&fits);
        assert_eq!(calls.len(), 1);
        assert!(calls[0].iter().all(|p| p.whole));
    }

    #[test]
    fn a_payload_shared_by_consecutive_messages_is_sent_once() {
        let a = Bytes::from_static(b"{\"a\":1}");
        let b = Bytes::from(b"{\"b\":2}".to_vec());
        let b_again = Bytes::from(b"{\"b\":2}".to_vec());
        let list = [a.clone(), a.clone(), b, b_again, a.clone()];
        let p = distinct_payloads(list.iter());
        assert_eq!(p.numbers, [1, 1, 2, 2, 3]);
        assert_eq!(
            p.distinct.iter().map(|b| &b[..]).collect::<Vec<_>>(),
            [&a[..], &b"{\"b\":2}"[..], &a[..]]
        );
    }

    #[test]
    fn a_cut_or_mixed_run_is_not_whole() {
        let mut cut = event("e", 3);
        cut.truncate(2);
        assert!(standalone_calls(&cut).iter().flatten().all(|p| !p.whole));
        let mut mixed = event("e", 2);
        mixed[1].event_id = Some(Arc::from("other"));
        assert!(standalone_calls(&mixed).iter().flatten().all(|p| !p.whole));
        let plain = vec![Outgoing::new(Arc::from("u"), Bytes::from_static(b"{}"))];
        assert!(standalone_calls(&plain).iter().flatten().all(|p| !p.whole));
    }
}
