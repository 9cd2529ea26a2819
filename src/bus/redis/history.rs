//! Reading a user's history: the position a client starts from, and the catch-up after one.
//!
//! One script call per read, so epoch, top, trimming state and entries come from one atomic view
//! (a publish between two separate reads could otherwise pass unseen). The script only gathers
//! facts; [`position::decide`] applies the resume rule, the same for every bus.
//!
//! # What the meta key holds, and why it outlives the stream
//! `fc:{user}:meta` holds `epoch` and `floor` (where this lifetime of the stream begins: a
//! position below it cannot be continued from), and, only while the stream is missing, `top`
//! (the position handed out meanwhile). Publishing never writes it but when a stream is
//! (re)created, and reads it only then: the common path costs one `PTTL` per user and call. Its TTL is refreshed with
//! the stream's and is at least 30 days (four times the maximum age when that is longer), so
//! when an idle user's stream expires the epoch lives on: positions from before are `too-old`
//! (the entries are gone, and the old top was not kept: a client idle for longer than the
//! stream lives resyncs even if it missed nothing), positions handed out since recover. When
//! the meta key is gone too (flushed, evicted, Redis restarted without persistence) the next
//! read or publish starts a new epoch, and every older position is `unknown-epoch`.

use std::sync::Arc;

use bytes::Bytes;
use redis::{RedisError, Value};

use super::{Conn, RedisBus, keys};
use crate::bus::position::{self, Catchup, HistoryView, Position, StreamId};

/// KEYS: 1 meta, 2 stream, 3 channel. ARGV: 1 the random part of a new epoch, 2 the meta key's
/// TTL (ms), 3 the client's epoch ('' = position only), 4 the id to read after, 5 how many to
/// read, 6 PUBLISH or SPUBLISH (to announce a new epoch on the channel).
/// Returns {epoch, user check, top (the stream's last id, or the meta key's while the stream is
/// missing), floor, stream exists, max deleted id, entries added, length, first id, entries}.
pub(super) const HISTORY_SCRIPT: &str = r#"
local check = string.sub(redis.sha1hex(KEYS[1]), 1, 6)
local m = redis.call('HMGET', KEYS[1], 'epoch', 'top', 'floor')
local epoch, top, floor = m[1], m[2], m[3] or '0-0'
local exists = redis.call('EXISTS', KEYS[2])
if not epoch then
  -- A new history: it starts at 0.
  epoch = ARGV[1] .. check
  top, floor = '0-0', '0-0'
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'top', top, 'floor', floor)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  -- Subscribers stamp entries with the epoch they know: tell them, in channel order.
  redis.call(ARGV[6], KEYS[3], epoch .. ': 0\n')
end
local max_deleted, added, length, first, entries = '0-0', 0, 0, '0-0', {}
if exists == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[2])
  local f = {}
  for i = 1, #info, 2 do f[info[i]] = info[i + 1] end
  top = f['last-generated-id']
  max_deleted = f['max-deleted-entry-id'] or '0-0'
  -- Before Redis 7.0 there is no count of entries added: -1 says so.
  added = f['entries-added'] or -1
  length = f['length'] or 0
  first = f['recorded-first-entry-id'] or (f['first-entry'] and f['first-entry'][1]) or '0-0'
  if ARGV[3] == epoch then
    entries = redis.call('XRANGE', KEYS[2], '(' .. ARGV[4], '+', 'COUNT', ARGV[5])
  end
elseif not top then
  -- The stream expired (or was evicted) and nobody read since: its top is unknown, so the
  -- history goes on from just after now (above every id ever given); the next publish takes
  -- it as its floor and gives ids above it.
  local t = redis.call('TIME')
  top = string.format('%d-0', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + 1)
  redis.call('HSET', KEYS[1], 'top', top)
end
return {epoch, check, top, floor, exists, max_deleted, added, length, first, entries}
"#;

/// The random part of a new epoch: 8 hex digits (the user check follows).
pub(super) fn epoch_base() -> String {
    format!("{:08x}", rand::random::<u32>())
}

fn text(v: &Value) -> Option<&str> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        other => text(other)?.parse().ok(),
    }
}

fn id(v: &Value) -> Option<StreamId> {
    StreamId::parse(text(v)?)
}

fn malformed(what: &str) -> RedisError {
    RedisError::from((
        redis::ErrorKind::Client,
        "unexpected history reply",
        what.to_owned(),
    ))
}

/// `[id, [field, value, …]]` entries: the id and the `m` field.
fn entries(v: &Value) -> Option<Vec<(StreamId, Bytes)>> {
    let Value::Array(list) = v else {
        return None;
    };
    list.iter()
        .map(|entry| {
            let Value::Array(parts) = entry else {
                return None;
            };
            let entry_id = id(parts.first()?)?;
            let Value::Array(fields) = parts.get(1)? else {
                return None;
            };
            let payload = fields
                .chunks(2)
                .find(|kv| text(&kv[0]) == Some("m"))
                .and_then(|kv| match kv.get(1)? {
                    Value::BulkString(b) => Some(Bytes::copy_from_slice(b)),
                    _ => None,
                })?;
            Some((entry_id, payload))
        })
        .collect()
}

/// The view a reply describes, and the entries it read.
fn view_of(reply: &[Value]) -> Option<(HistoryView, Vec<(StreamId, Bytes)>)> {
    let [
        epoch,
        check,
        top,
        floor,
        exists,
        max_deleted,
        added,
        length,
        first,
        read,
    ] = reply
    else {
        return None;
    };
    let top = id(top)?;
    let (added, length) = (int(added)?, int(length)?);
    let safe_from = if int(exists)? == 0 || (length == 0 && added > 0) {
        top // nothing held: only the top recovers
    } else {
        // Trimming (Redis 7.0) does not record what it deleted: once anything was removed,
        // only ids from the first entry held on are known to miss nothing.
        let trimmed = if added > length || added < 0 {
            id(first)?
        } else {
            StreamId::ZERO
        };
        trimmed.max(id(max_deleted)?).max(id(floor)?)
    };
    let view = HistoryView {
        epoch: Arc::from(text(epoch)?),
        user_check: text(check)?.into(),
        top,
        safe_from,
    };
    Some((view, entries(read)?))
}

impl RedisBus {
    pub(super) async fn read_history(
        &self,
        user: &str,
        since: Option<&Position>,
        limit: usize,
    ) -> Result<Catchup, RedisError> {
        let mut invocation = self.history_script.prepare_invoke();
        invocation
            .key(keys::meta(user))
            .key(keys::stream(user))
            .key(keys::channel(user))
            .arg(epoch_base())
            .arg(self.options.meta_ttl().as_millis() as u64)
            .arg(since.map(|p| &*p.epoch).unwrap_or(""))
            .arg(since.map(|p| p.id.to_string()).unwrap_or_default())
            .arg(limit.saturating_add(1))
            .arg(match self.publisher {
                Conn::Standalone(_) => "PUBLISH",
                Conn::Cluster(_) => "SPUBLISH",
            });
        let reply: Value = match self.publisher.clone() {
            Conn::Standalone(mut c) => invocation.invoke_async(&mut c).await?,
            Conn::Cluster(mut c) => invocation.invoke_async(&mut c).await?,
        };
        let Value::Array(parts) = reply else {
            return Err(malformed("not an array"));
        };
        let (view, after) = view_of(&parts).ok_or_else(|| malformed("fields"))?;
        self.subscriptions.learn_epoch(user, &view.epoch);
        Ok(match since {
            None => Catchup::Recovered {
                entries: Vec::new(),
                top: view.top_position(),
            },
            Some(since) => position::decide(&view, since, after, limit),
        })
    }
}
