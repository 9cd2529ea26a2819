//! Publishing: the Lua scripts that append and publish atomically, and how a batch is cut into
//! script calls.
//!
//! # One script per kind of Redis
//! On standalone Redis every call goes through [`standalone_script`]. A call is cut into runs:
//! consecutive messages that share a payload and what they stand for (one event, or the events
//! a coalesced change covers). A run carries its payload once, gets one stream id for all its
//! recipients, and its channel message is built once; the call reads no TTL ([`TtlMemo`] says
//! when a refresh is due). Session 8 measured only a third of a per-message script's cost in its
//! commands (`docs/benchmarks.md`): the rest is Lua building strings, so work per run rather than
//! per message is what makes a call cheap.
//!
//! A cluster call must stay within one user's slot, so [`cluster_script`] takes one user's
//! messages and guards each per user.
//!
//! # Exactly once per user, cheaply
//! A partition replayed by another consumer (after a crash or a rebalance) must not reach a user
//! twice, however the replay groups the events. The guards are written in the same atomic call
//! as the messages they cover:
//! - **standalone: per event** (`fc:event:<id>`, two dedup windows). `all`: the event went out
//!   whole (every recipient in one call: one `SET` decides for all of them). `some`: it went out
//!   in parts (a recipient was held by the rate limit) or in coalesced messages; the recipients
//!   who had it are the members of `fc:event:<id>:got` (their stream keys, one `SADD` per run).
//!   A run checks its recipients with one `SMISMEMBER` per event, and only when the event went
//!   out before.
//! - **cluster: per user** (`fc:{user}:seen:<window>` sets): an event's guard key would be in
//!   another slot than the user's keys.
//!
//! A coalesced message whose user had some but not all of its events is rebuilt without them
//! (its changes are sums; sent as it is, a folder's size would count twice); one whose user had
//! all of them is dropped.
//!
//! Session 13 measured what the per-user guard had cost coalesced messages on standalone Redis:
//! 17–20 µs of Redis per message against 4.5–5 µs for an event's messages, which took the
//! consume benchmark with the rate limit on from about 70 % to about 100 % of the Redis-bound
//! limit once coalesced messages became runs too (`docs/benchmarks.md`).

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

/// The cluster's publish script (see [`cluster_script`]).
const CLUSTER_BODY: &str = r#"
-- One user's messages (a cluster call stays in one slot), appended in order, then published once:
-- each as '<stream id> <payload bytes>\n<payload>', the first after a new stream as
-- '<epoch>:<stream id> …' (see the module doc of `mod.rs`).
-- Per message 5 KEYS: stream, seen ids (current window), seen ids (previous window), channel,
-- meta. Shared ARGV: 1 max length, 2 max age ms, 3 window ms, 4 message count, 5 the random part
-- of a new epoch, 6 the meta key's TTL ms; then per message 4 ARGV: payload number, event id
-- ('' = not guarded), oldest id to keep ('' = no age trim this time), covered events ('' or a
-- kind, 'sum' or 'any', then every event id the message stands for, '\n'-separated); then the
-- payloads, each once.
-- Returns the number published; or, with nothing written, a flat list of (message index from
-- 0, '\n'-separated events its user had) for each 'sum' message whose user had some but not all
-- of its events: the caller rebuilds those without them and sends the call again.
local maxlen, maxage, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local count, new_epoch, meta_ttl = tonumber(ARGV[4]), ARGV[5], ARGV[6]
local seen_ttl = window * 2
local payloads = 6 + count * 4

-- First, reading only: which events of a message standing for several has its user had?
local skip, conflicts, cover = {}, {}, {}
for i = 0, count - 1 do
  local a = 6 + i * 4
  if ARGV[a + 4] ~= '' then
    local k = i * 5
    local kind, ids = nil, {}
    for id in string.gmatch(ARGV[a + 4], '[^\n]+') do
      if kind == nil then kind = id else ids[#ids + 1] = id end
    end
    cover[i] = ids
    local had = {}
    if #ids > 0 then
      local now_seen = redis.call('SMISMEMBER', KEYS[k + 2], unpack(ids))
      local before_seen = redis.call('SMISMEMBER', KEYS[k + 3], unpack(ids))
      for n, id in ipairs(ids) do
        if now_seen[n] == 1 or before_seen[n] == 1 then had[#had + 1] = id end
      end
    end
    if #ids > 0 and #had == #ids then
      skip[i] = true
    elseif #had > 0 and kind == 'sum' then
      conflicts[#conflicts + 1] = i
      conflicts[#conflicts + 1] = table.concat(had, '\n')
    end
  end
end
if #conflicts > 0 then return conflicts end

local published = 0
local channels, entries = {}, {}
-- Per user touched by this call (by meta key): the stream's TTL and, when it was missing, the
-- epoch to announce.
local users = {}
for i = 0, count - 1 do
  local k, a = i * 5, 6 + i * 4
  local payload, event, oldest = ARGV[payloads + tonumber(ARGV[a + 1])], ARGV[a + 2], ARGV[a + 3]
  local fresh = true
  if skip[i] then
    fresh = false
  elseif cover[i] then
    -- Stands for several events: the seen set names them all.
    if #cover[i] > 0 then
      redis.call('SADD', KEYS[k + 2], unpack(cover[i]))
      if redis.call('PTTL', KEYS[k + 2]) < 0 then
        redis.call('PEXPIRE', KEYS[k + 2], seen_ttl)
      end
    end
  elseif event ~= '' then
    if redis.call('SISMEMBER', KEYS[k + 3], event) == 1 or redis.call('SADD', KEYS[k + 2], event) == 0 then
      fresh = false
    elseif redis.call('PTTL', KEYS[k + 2]) < 0 then
      -- A new window's set: it must outlive the next window. PTTL is a read; a PEXPIRE per
      -- message would be a write (and replicated).
      redis.call('PEXPIRE', KEYS[k + 2], seen_ttl)
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
  redis.call('SPUBLISH', channel, #mine == 1 and mine[1] or table.concat(mine))
end
return published
"#;

/// The cluster's script: one user's messages of any kind, in order, guarded per user. Per
/// message 5 KEYS and 4 ARGV.
pub(super) fn cluster_script() -> String {
    [START_HISTORY, CLUSTER_BODY].concat()
}

/// The standalone script (see [`standalone_script`]).
const STANDALONE_BODY: &str = r#"
-- Every call on standalone Redis. A run is consecutive messages sharing a payload and what they
-- stand for: one event's (all of its messages, 'whole'; or some, a 'part': other recipients
-- were held by the rate limit, or the event is too big for one call), several events' (a
-- coalesced change or a resync that its recipients share), or none (a notice).
-- KEYS: 1 the id counter; per message (from 1) its stream 2m and its channel 2m+1; then the
-- event guards (guard g at 2 x count + 1 + g); then, when ARGV 5 is '1', the batch's abort key.
-- ARGV: 1 max length, 2 message count, 3 run count, 4 the guards' TTL ms, 5 abort key given,
-- 6 max age ms, 7 meta TTL ms, 8 the random part of a new epoch, 9 oldest id to keep; then
-- lists of message numbers, space-separated: 10 trim by age, 11 refresh the stream's and meta
-- key's TTLs, 12 hold for a later message of the same user; then per run 3 ARGV: what it stands
-- for ('' nothing; 'g' one event, whole; '-g' a part of one; 'sum g1 g2 …' or 'any g1 g2 …'
-- several), message count, payload.
-- An event's guard (two dedup windows) says how it went out: absent (not yet), 'all' (whole:
-- every recipient had it), or 'some' (in parts or coalesced: the recipients who had it, by
-- stream key, are in the set '<guard>:got', made with it).
-- Returns the number published; -1 when an earlier call of the batch aborted it; or, with
-- nothing written, a flat list of (message index from 0, '\n'-separated events its user had)
-- for each 'sum' message whose user had some but not all of its events: the caller rebuilds
-- those without them and sends this call and the rest of its batch again.
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

-- Each run's kind ('one', 'sum', 'any' or 'none'), whole flag and guard numbers.
local specs = {}
for r = 0, runs - 1 do
  local spec = ARGV[13 + r * 3]
  local kind, gs, whole = 'one', {}, true
  for word in string.gmatch(spec, '%S+') do
    if word == 'sum' or word == 'any' then
      kind = word
    else
      local g = tonumber(word)
      if g < 0 then whole = false end
      gs[#gs + 1] = math.abs(g)
    end
  end
  if #gs == 0 then kind = 'none' end
  specs[r] = {kind = kind, gs = gs, whole = whole}
end

-- Guard states, read once per call and kept up to date by its writes ('sent': whole, by this
-- call).
local states = {}
local function state_of(g)
  local state = states[g]
  if state == nil then
    state = redis.call('GET', KEYS[guard_base + g]) or false
    states[g] = state
  end
  return state
end
local function streams_of(m, n)
  local streams = {}
  for i = 1, n do streams[i] = KEYS[2 * (m + i)] end
  return streams
end
-- Per message of the run after message m, the guard numbers of the events its user had.
local function had_events(gs, m, n)
  local had = {}
  for i = 1, n do had[i] = {} end
  for _, g in ipairs(gs) do
    local state = state_of(g)
    if state == 'all' or state == 'sent' then
      for i = 1, n do had[i][#had[i] + 1] = g end
    elseif state == 'some' then
      local marks = redis.call('SMISMEMBER', KEYS[guard_base + g] .. ':got', unpack(streams_of(m, n)))
      for i = 1, n do
        if marks[i] == 1 then had[i][#had[i] + 1] = g end
      end
    end
  end
  return had
end
-- Marks that the users of `streams` had the event of guard g.
local function mark(g, streams)
  local state = states[g]
  if #streams == 0 or state == 'all' or state == 'sent' then return end
  local guard = KEYS[guard_base + g]
  local got = guard .. ':got'
  redis.call('SADD', got, unpack(streams))
  if not state then
    redis.call('SET', guard, 'some', 'PX', guard_ttl)
    redis.call('PEXPIRE', got, guard_ttl)
    states[g] = 'some'
  end
end

-- First, reading only: which recipients of runs standing for several events had some of them?
-- Each user's events are in a batch once, so what this finds holds for the writes below.
local skips, conflicts = {}, {}
local m = 0
for r = 0, runs - 1 do
  local spec, n = specs[r], tonumber(ARGV[14 + r * 3])
  if spec.kind == 'sum' or spec.kind == 'any' then
    local had = had_events(spec.gs, m, n)
    local skip = {}
    for i = 1, n do
      if #had[i] == #spec.gs then
        skip[i] = true
      elseif #had[i] > 0 and spec.kind == 'sum' then
        local ids = {}
        for _, g in ipairs(had[i]) do ids[#ids + 1] = string.sub(KEYS[guard_base + g], 10) end
        conflicts[#conflicts + 1] = m + i - 1
        conflicts[#conflicts + 1] = table.concat(ids, '\n')
      end
    end
    skips[r] = skip
  end
  m = m + n
end
if #conflicts > 0 then
  -- The batch's later calls must not overtake the rebuilt messages.
  if abort then redis.call('SET', abort, '1', 'PX', 60000) end
  return conflicts
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
-- parse): held until the user's last one. That one may be skipped (its event went out before, a
-- replay after a crash): whatever is still held at the end goes out then.
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

-- Which recipients of a one-event run had its event: every one (true), none (false), or those
-- marked in the table; records the others as having it.
local function one_event(g, whole, m, n)
  local state = state_of(g)
  if state == 'all' or state == 'sent' then
    -- Delivered whole before, or whole by this call: every recipient had it.
    return true
  end
  if not state and whole then
    redis.call('SET', KEYS[guard_base + g], 'all', 'PX', guard_ttl)
    states[g] = 'sent'
    return false
  end
  local skip, fresh = {}, {}
  local streams = streams_of(m, n)
  if state == 'some' then
    local marks = redis.call('SMISMEMBER', KEYS[guard_base + g] .. ':got', unpack(streams))
    for i = 1, n do
      if marks[i] == 1 then skip[i] = true else fresh[#fresh + 1] = streams[i] end
    end
  else
    fresh = streams
  end
  mark(g, fresh)
  return skip
end

local published, id = 0, nil
m = 0
for r = 0, runs - 1 do
  local a = 12 + r * 3
  local spec, n, payload = specs[r], tonumber(ARGV[a + 2]), ARGV[a + 3]
  local skip = false
  if spec.kind == 'one' then
    skip = one_event(spec.gs[1], spec.whole, m, n)
  elseif skips[r] then
    skip = skips[r]
  end
  if skip == true then
    m = m + n
  else
    id = now .. '-' .. seq
    seq = seq + 1
    local tail = ' ' .. #payload .. '\n' .. payload
    local framed = id .. tail
    -- Recipients to mark in the events' sets: runs standing for several events only (a
    -- one-event run marked them already).
    local covering = spec.kind == 'sum' or spec.kind == 'any'
    local sent = {}
    for i = 1, n do
      m = m + 1
      if not (skip and skip[i]) then
        local stream = KEYS[2 * m]
        if covering then sent[#sent + 1] = stream end
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
            -- The stream's top is at or past the id (written by another call in this
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
    if covering then
      for _, g in ipairs(spec.gs) do mark(g, sent) end
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

/// The standalone script: every call on standalone Redis. Per message 2 KEYS and no ARGV; each
/// run of messages sharing a payload and what they stand for carries the payload once with one
/// stream id for all of them; one guard per event, not per user; no `PTTL` (the caller says
/// which streams need their TTL refreshed). It reaches a user's meta key, and an event's set of
/// recipients, by name from keys it was given, which standalone Redis allows (a cluster would
/// refuse an undeclared key; clusters use [`cluster_script`]).
pub(super) fn standalone_script() -> String {
    [START_HISTORY, STANDALONE_BODY].concat()
}

/// Messages per script call on standalone Redis: enough to spread the call's fixed cost, few
/// enough that one call never blocks Redis for long. A whole event may make a call longer.
const MESSAGES_PER_CALL: usize = 256;

/// The largest event kept whole in one call (so guarded once); a bigger one (a space with more
/// members) goes out in parts of [`MESSAGES_PER_CALL`], each part marking its recipients in the
/// event's `got` set, rather than block Redis for one long call.
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
}

/// What one script call answered.
enum CallResult {
    Published,
    /// An earlier call of the batch found conflicts: this one wrote nothing.
    Aborted,
    /// Nothing written: these messages (index in the call) must be rebuilt without these events.
    Conflicts(Vec<(usize, Vec<String>)>),
}

fn call_result(value: redis::Value) -> Result<CallResult, RedisError> {
    match value {
        redis::Value::Int(n) if n >= 0 => Ok(CallResult::Published),
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

/// When this process last refreshed each user's stream TTL, so a standalone call needs no `PTTL`
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

/// A standalone call under construction: what it refreshes, recorded once it succeeded.
struct StandaloneCall {
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

/// What a message stands for, as the standalone script reads it: '' nothing (a notice), 'g'
/// one event (guard number g) with all its messages in the call, '-g' a part of one event,
/// 'sum g1 g2 …' or 'any g1 g2 …' several events (see [`covers_arg`] for the kinds).
fn run_spec<'a>(p: &Placed<'a>, guard_keys: &mut GuardKeys<'a>) -> String {
    if let Some(covers) = p.msg.covers.as_ref().filter(|c| !c.event_ids.is_empty()) {
        let mut spec = String::from(if covers.sums_changes() { "sum" } else { "any" });
        for id in &covers.event_ids {
            spec.push(' ');
            spec.push_str(&guard_keys.number(id).to_string());
        }
        return spec;
    }
    match p.msg.event_id.as_deref() {
        Some(event) if p.whole => guard_keys.number(event).to_string(),
        Some(event) => format!("-{}", guard_keys.number(event)),
        None => String::new(),
    }
}

/// A standalone call's runs, in order: (what the run stands for, its messages, their payload).
/// A run's messages share one stream id, so a user appears in a run once (a second message to
/// the same stream needs a later id).
fn runs_of<'a>(
    call: &[Placed<'a>],
    guard_keys: &mut GuardKeys<'a>,
) -> Vec<(String, usize, &'a Bytes)> {
    let mut runs: Vec<(String, usize, &Bytes)> = Vec::new();
    let mut run_users: HashSet<&str> = HashSet::new();
    for p in call {
        let spec = run_spec(p, guard_keys);
        match runs.last_mut() {
            Some((same, n, payload))
                if *same == spec && **payload == p.msg.payload && run_users.insert(&p.msg.user) =>
            {
                *n += 1
            }
            _ => {
                runs.push((spec, 1, &p.msg.payload));
                run_users.clear();
                run_users.insert(&p.msg.user);
            }
        }
    }
    runs
}

impl RedisBus {
    /// One cluster call: one user's `messages` in order (the call stays in the user's slot),
    /// guarded per user.
    fn cluster_invocation(
        &self,
        messages: &[Placed<'_>],
        window: u64,
        oldest: &mut impl FnMut() -> Option<u64>,
    ) -> redis::Cmd {
        let o = &self.options;
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.publish_script.get_hash())
            .arg(messages.len() * 5);
        for p in messages {
            let user = &p.msg.user;
            cmd.arg(keys::stream(user))
                .arg(keys::seen(user, window))
                .arg(keys::seen(user, window.saturating_sub(1)))
                .arg(keys::channel(user))
                .arg(keys::meta(user));
        }
        cmd.arg(o.stream_max_len)
            .arg(o.stream_max_age.as_millis().max(1) as u64)
            .arg(o.dedup_window.as_millis().max(1) as u64)
            .arg(messages.len())
            .arg(super::history::epoch_base())
            .arg(o.meta_ttl().as_millis() as u64);
        let payloads = distinct_payloads(messages.iter().map(|p| &p.msg.payload));
        for (p, number) in messages.iter().zip(&payloads.numbers) {
            cmd.arg(number)
                .arg(p.msg.event_id.as_deref().unwrap_or(""))
                .arg(oldest().map(|ms| ms.to_string()).unwrap_or_default())
                .arg(covers_arg(p.msg));
        }
        for payload in payloads.distinct {
            cmd.arg(&payload[..]);
        }
        cmd
    }

    /// One standalone call (see [`standalone_script`]): runs of messages sharing a payload and
    /// what they stand for, the TTLs due for a refresh, and which messages wait for a later one
    /// of their user.
    fn standalone_invocation(
        &self,
        call: &[Placed<'_>],
        window_ms: u64,
        oldest: &mut impl FnMut() -> Option<u64>,
        abort: Option<&str>,
        now: Instant,
    ) -> StandaloneCall {
        let o = &self.options;
        let mut guard_keys = GuardKeys::default();
        let runs = runs_of(call, &mut guard_keys);
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
        cmd.arg(self.publish_script.get_hash())
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
        for (spec, n, payload) in runs {
            cmd.arg(spec).arg(n).arg(&payload[..]);
        }
        StandaloneCall { cmd, refreshed }
    }

    /// Publishes `batch`, rebuilding coalesced messages around events their users already had
    /// (a batch replayed after a consumer crash, grouped differently) until nothing conflicts.
    pub(super) async fn publish_once(&self, batch: &[Outgoing]) -> Result<(), RedisError> {
        let mut again = match self.publish_attempt(batch).await? {
            Attempt::Done => return Ok(()),
            Attempt::Again(again) => again,
        };
        for _ in 1..MAX_REBUILDS {
            match self.publish_attempt(&again).await? {
                Attempt::Done => return Ok(()),
                Attempt::Again(next) => again = next,
            }
        }
        Err(RedisError::from((
            redis::ErrorKind::Client,
            "coalesced messages kept conflicting with deliveries of another consumer",
        )))
    }

    /// One attempt: done, or what to send again (rebuilt around events their users had).
    async fn publish_attempt(&self, batch: &[Outgoing]) -> Result<Attempt, RedisError> {
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
                    let invocation = self.standalone_invocation(
                        call,
                        window_ms,
                        &mut trim_every,
                        abort.as_deref(),
                        started,
                    );
                    pipe.add_command(invocation.cmd);
                    refreshed.push(invocation.refreshed);
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
                    let cmd = self.cluster_invocation(msgs, window, &mut trim_every);
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
    fn a_run_says_what_its_messages_stand_for() {
        let whole = event("e", 2);
        let mut part = event("p", 3);
        part.truncate(1);
        let mut coalesced = event("c", 1);
        coalesced[0].covers = Some(Arc::new(crate::bus::Covered {
            event_ids: vec![Arc::from("x"), Arc::from("e")],
            without: None,
        }));
        let notice = vec![Outgoing::new(Arc::from("u"), Bytes::from_static(b"{}"))];
        let batch: Vec<Outgoing> = [whole, part, coalesced, notice].concat();
        let calls = standalone_calls(&batch);
        assert_eq!(calls.len(), 1);
        let mut guards = GuardKeys::default();
        let specs: Vec<String> = calls[0].iter().map(|p| run_spec(p, &mut guards)).collect();
        // A resync's covers sum nothing ('any'); the guard of "e" is shared.
        assert_eq!(specs, ["1", "1", "-2", "any 3 1", ""]);
        assert_eq!(guards.keys, ["e", "p", "x"]);
    }

    #[test]
    fn runs_share_a_payload_and_what_it_stands_for_and_hold_each_user_once() {
        let mut batch = event("e", 3);
        let mut part = event("p", 3);
        part.truncate(2);
        batch.extend(part);
        // A burst of one notice to one user, then to another: one run per message to the first
        // (one stream id each), the second user joins the last of them.
        let notice = Bytes::from_static(b"{\"n\":1}");
        for user in ["a", "a", "b"] {
            batch.push(Outgoing::new(Arc::from(user), notice.clone()));
        }
        let calls = standalone_calls(&batch);
        let mut guards = GuardKeys::default();
        let runs: Vec<(String, usize)> = runs_of(&calls[0], &mut guards)
            .into_iter()
            .map(|(spec, n, _)| (spec, n))
            .collect();
        assert_eq!(
            runs,
            [
                ("1".to_owned(), 3),
                ("-2".to_owned(), 2),
                (String::new(), 1),
                (String::new(), 2)
            ]
        );
    }

    #[test]
    fn whole_events_are_never_split_between_calls() {
        // 12 events of 20: 240 messages fit one call; the 13th starts the next.
        let batch: Vec<Outgoing> = (0..13).flat_map(|e| event(&format!("e{e}"), 20)).collect();
        let calls = standalone_calls(&batch);
        assert_eq!(calls.iter().map(|c| c.len()).collect::<Vec<_>>(), [240, 20]);
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
        assert_eq!(calls.iter().map(|c| c.len()).sum::<usize>(), batch.len());
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
