//! The Redis bus: standalone Redis or Redis Cluster (sharded pub/sub), with a per-user history.
//!
//! Every key of a user carries the user id as a hash tag, so all of them live in one cluster slot:
//! `fc:{alice}:live` (the pub/sub channel), `fc:{alice}:log` (a Redis Stream holding the user's
//! recent messages), `fc:{alice}:meta` (the history's epoch, and the floor below which positions
//! cannot be continued from; it outlives the stream, see `history.rs`) and
//! `fc:{alice}:seen:<window>` (on a cluster: event ids already delivered to alice). On standalone
//! Redis, `fc:event:<id>` instead records how an event went out, and `fc:event:<id>:got` who had
//! it when it went out in parts (see `publish.rs`).
//!
//! A Lua script does, for each message and atomically: skip it if the event was already delivered to
//! this user (so a partition replayed by another consumer after a crash or a rebalance reaches
//! each user once, and a crash between two users loses nothing), append it to the stream
//! (trimmed by length on every append, by age on about one append in 64, and expiring when idle:
//! between the maximum age and twice it after the last append, because the TTL is only rewritten
//! once less than the maximum age is left, so most appends read it rather than write it). At the
//! end of the call it publishes, once per user, the user's messages of that call in order, each
//! as `<stream id> <payload bytes>\n<payload>`. The subscriber makes it the position
//! `<epoch>:<stream id>`, the frame id clients see, so ids increase per user across gateways and
//! restarts, and a subscriber never sees a message that is not in the stream.
//!
//! # Who knows the epoch
//! Reading a user's epoch on every publish cost Redis a quarter of its time per message
//! (`docs/benchmarks.md`, session 8). The epoch only changes when a history starts anew (a new
//! or expired stream, a lost meta key), so whoever starts one tells the channel, in order with
//! the messages: the publish script writes the first entry after a new stream as
//! `<epoch>:<stream id> …`, the history script announces an epoch it creates with an empty
//! entry `<epoch>: 0\n`. The subscriber keeps each subscribed user's epoch: read when it
//! subscribes and by every history read (unless an announcement came first), replaced by
//! announcements, forgotten when the connection drops. A message that arrives while its user's
//! epoch is unknown is held, with the user's later ones, while the bus reads the epoch, then
//! delivered in order (if the read fails, the user's sessions catch up from the history). An
//! earlier version made the sessions hold and catch up instead; that released sessions whose
//! channel a cluster had just dropped (`resume_chaos`), and a gap has one owner now.
//!
//! One publish per user per call rather than per message, because every push costs a gateway a
//! read and a parse (with redis-rs's parser about 1 µs, 30 % of its CPU in bursts; less with our
//! own, but still per push): a burst of 16 uploads to one user's folder is one push to parse,
//! and one `PUBLISH` for Redis.
//!
//! Publishing is batched: on standalone Redis one script call covers about 256 messages (a call's
//! fixed cost is about as large as its commands'), whole events kept together, in one pipeline;
//! on a cluster one call per user (a call must stay within one slot), all sent concurrently. On a
//! cluster the channel is published with `SPUBLISH` and subscribed with `SSUBSCRIBE`, so a
//! message travels only within its shard.
//!
//! Subscribing uses one connection per Redis node. On standalone Redis it is our own
//! (`subscriber.rs`, with `resp.rs`): it reconnects, resubscribes, and says the feed is restored
//! once Redis confirmed every channel, and it reads pushes without redis-rs's parser. On a
//! cluster it is redis-rs's cluster connection (per-node connections, sharded pub/sub following
//! the slots). A health loop pings the subscriber so `/readyz` can tell whether the bus is
//! connected, and so that a connection that stopped answering is dropped.

mod history;
mod publish;
mod resp;
mod shared;
mod subscriber;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{AsyncPushSender, ConnectionManager, ConnectionManagerConfig, SendError};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
use redis::{ErrorKind, PushInfo, PushKind, RedisError, ServerErrorKind, Value};
use tokio::sync::mpsc;

use super::{Bus, BusError, Delivery, DeliverySink, Outgoing};
use publish::{TtlMemo, cluster_script, standalone_script};

/// Where Redis is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    Standalone(String),
    /// Seed nodes of a Redis Cluster.
    Cluster(Vec<String>),
}

/// History and de-duplication settings.
#[derive(Debug, Clone, Copy)]
pub struct RedisOptions {
    /// Entries kept per user stream (approximate trimming).
    pub stream_max_len: u64,
    /// Age after which entries are trimmed; an idle user's stream expires between this and twice
    /// this after its last message.
    pub stream_max_age: Duration,
    /// How long an event id is remembered per user to drop repeats (two windows are checked).
    pub dedup_window: Duration,
}

impl RedisOptions {
    /// How long a user's epoch is kept after the stream's TTL was last refreshed:
    /// well past the stream's own lifetime (at most twice the maximum age), so an expired
    /// history is told apart from a lost one.
    pub fn meta_ttl(&self) -> Duration {
        (self.stream_max_age * 4).max(Duration::from_secs(30 * 24 * 3600))
    }
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            stream_max_len: 1000,
            stream_max_age: Duration::from_secs(24 * 3600),
            dedup_window: Duration::from_secs(600),
        }
    }
}

/// Key and channel names of a user.
pub mod keys {
    pub fn channel(user: &str) -> String {
        format!("fc:{{{user}}}:live")
    }

    pub fn stream(user: &str) -> String {
        format!("fc:{{{user}}}:log")
    }

    pub fn meta(user: &str) -> String {
        format!("fc:{{{user}}}:meta")
    }

    /// Notifications `user` owes acknowledgements for: id → `<u|d> <deadline ms> <payload>`.
    pub fn owed(user: &str) -> String {
        format!("fc:{{{user}}}:owed")
    }

    /// Scheduled items (downtimes) by id: one hash for every process, in one slot with
    /// [`keys::due`] so that a claim is one script.
    pub fn scheduled() -> &'static str {
        "fc:{schedule}:items"
    }

    /// Due announcements: member `<id>|<step>`, score the due time (ms).
    pub fn due() -> &'static str {
        "fc:{schedule}:due"
    }

    /// `user`'s devices: name → [`crate::bus::devices::DeviceRecord`] (JSON).
    pub fn devices(user: &str) -> String {
        format!("fc:{{{user}}}:devices")
    }

    /// The acknowledgements of `user`'s per-device notifications (`<id>\n<device>`).
    pub fn acked(user: &str) -> String {
        format!("fc:{{{user}}}:acked")
    }

    /// `user`'s preferences (JSON, `preferences.rs`); kept until changed.
    pub fn preferences(user: &str) -> String {
        format!("fc:{{{user}}}:prefs")
    }

    pub fn seen(user: &str, window: u64) -> String {
        format!("fc:{{{user}}}:seen:{window}")
    }

    /// How an event went out (standalone Redis only: it is no user's key).
    pub fn event(event: &str) -> String {
        format!("fc:event:{event}")
    }

    /// Set by a publish call that found conflicts, so the later calls of its batch write nothing
    /// (standalone Redis only; short-lived).
    pub fn abort(nonce: u64) -> String {
        format!("fc:abort:{nonce:016x}")
    }

    /// The last stream id the standalone publish script handed out: its ids go
    /// on from it, so one id serves all of a run's recipients (see `publish.rs`).
    pub const LAST_ID: &str = "fc:last-id";

    /// Notifications that ask for an acknowledgement: id → (user, notification) pairs still
    /// owed. Kept beside the per-user hashes for `/metrics` (it is no user's key).
    pub const PENDING_NOTICES: &str = "fc:{notices}:pending";

    /// Their deadlines: id → epoch ms after which they are forgotten.
    pub const PENDING_UNTIL: &str = "fc:{notices}:until";

    /// Gateways' advertisements for discovery: field = gateway id, value =
    /// `<valid until, epoch ms>|<JSON>`.
    pub const GATEWAYS: &str = "fc:{gateways}";

    /// Operator channels and keys (the dashboard) share this prefix and one slot.
    pub const OPERATOR_PREFIX: &str = "fc:{dashboard}:";

    /// Gateways showing a dashboard: field = gateway id, value = valid until (epoch ms).
    pub const DASHBOARD_WATCHING: &str = "fc:{dashboard}:watching";

    /// The space chosen on a dashboard, whose events consumers report.
    pub const DASHBOARD_SPACE: &str = "fc:{dashboard}:space";

    /// The user a channel belongs to.
    pub fn user_of_channel(channel: &[u8]) -> Option<&str> {
        let s = std::str::from_utf8(channel).ok()?;
        s.strip_prefix("fc:{")?.strip_suffix("}:live")
    }
}

/// What [`RedisBus::query`] sends: a command or a pipeline.
trait Query: Sync {
    fn send<T: redis::FromRedisValue>(
        &self,
        c: &mut (impl redis::aio::ConnectionLike + Send),
    ) -> impl std::future::Future<Output = Result<T, RedisError>> + Send;
}

impl Query for redis::Cmd {
    fn send<T: redis::FromRedisValue>(
        &self,
        c: &mut (impl redis::aio::ConnectionLike + Send),
    ) -> impl std::future::Future<Output = Result<T, RedisError>> + Send {
        self.query_async(c)
    }
}

impl Query for redis::Pipeline {
    fn send<T: redis::FromRedisValue>(
        &self,
        c: &mut (impl redis::aio::ConnectionLike + Send),
    ) -> impl std::future::Future<Output = Result<T, RedisError>> + Send {
        self.query_async(c)
    }
}

#[derive(Clone)]
enum Conn {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

/// The subscribing connection: our own on standalone Redis (`subscriber.rs`), redis-rs's
/// cluster connection (sharded pub/sub follows the slots) on a cluster.
enum SubscriberConn {
    Standalone(subscriber::Subscriber),
    /// redis-rs's connection manager: for a URL our subscriber does not serve.
    Managed(ConnectionManager),
    Cluster(ClusterConnection),
}

pub struct RedisBus {
    publisher: Conn,
    subscriber: Option<SubscriberConn>,
    /// Users whose channel this gateway wants, and the ones Redis dropped behind its back.
    subscriptions: Arc<Subscriptions>,
    /// Where deliveries go; told about gaps in the live feed.
    sink: Option<Arc<dyn DeliverySink>>,
    /// The publish script: one per kind of Redis (see `publish.rs`).
    publish_script: redis::Script,
    history_script: redis::Script,
    options: RedisOptions,
    connected: Arc<AtomicBool>,
    trim_counter: AtomicU64,
    /// When this process last refreshed each user's stream TTL (standalone calls read no TTL).
    ttl_memo: TtlMemo,
}

/// The channels a gateway wants, and those Redis has dropped behind its back.
///
/// When a cluster slot moves to another node, the old owner sends `sunsubscribe` for every shard
/// channel of the slot, and redis-rs forgets those subscriptions (it cannot tell this from an
/// unsubscribe we asked for). We can: a dropped channel of a user we still serve is queued here
/// and subscribed again, on whichever node owns the slot now.
#[derive(Default)]
struct Subscriptions {
    wanted: std::sync::Mutex<foldhash::HashSet<Arc<str>>>,
    dropped: std::sync::Mutex<std::collections::HashSet<Arc<str>>>,
    /// A cluster connection was lost: subscribe every wanted channel again, then declare the
    /// whole feed restored. redis-rs's own resubscription after a killed node connection was
    /// seen to leave every shard channel unsubscribed (`resubscribes_after_its_subscription_
    /// connections_are_killed`), so the bus does not rely on it.
    everything: AtomicBool,
    wake: tokio::sync::Notify,
    /// Each subscribed user's current epoch (see the module doc).
    /// Read once per channel message: keyed with foldhash, not SipHash (see Cargo.toml).
    epochs: std::sync::Mutex<foldhash::HashMap<Arc<str>, Arc<str>>>,
    /// Users whose epoch is being read again, with the channel messages that arrived meanwhile:
    /// delivered in order once the epoch is known (see [`relearn_epochs`]).
    held: std::sync::Mutex<foldhash::HashMap<Arc<str>, Held>>,
}

/// Channel messages of a user held while the user's epoch is read.
#[derive(Default)]
struct Held {
    messages: Vec<Bytes>,
    /// More arrived than [`MAX_HELD`]: the rest is left to the sessions' catch-up.
    overflowed: bool,
}

/// Channel messages held per user while its epoch is read (a read takes a millisecond; a
/// user's burst of thousands means something else is wrong).
const MAX_HELD: usize = 1024;

impl Subscriptions {
    fn resubscribe_everything(&self) {
        self.everything.store(true, Relaxed);
        self.wake.notify_one();
    }

    /// The epoch of `user`'s messages that do not name one.
    fn epoch_of(&self, user: &str) -> Option<Arc<str>> {
        self.epochs.lock().ok()?.get(user).cloned()
    }

    /// An epoch announced on `user`'s channel: it holds from there on.
    fn announced_epoch(&self, user: &str, epoch: &str) {
        self.with_epoch_of_wanted(user, |epochs| {
            epochs.insert(Arc::from(user), Arc::from(epoch));
        });
    }

    /// An epoch read from Redis. Kept only when none is known: an announcement pushed after
    /// the read may have overtaken its reply.
    fn learn_epoch(&self, user: &str, epoch: &str) {
        self.with_epoch_of_wanted(user, |epochs| {
            if !epochs.contains_key(user) {
                epochs.insert(Arc::from(user), Arc::from(epoch));
            }
        });
    }

    /// Runs `f` on the epochs if `user` is wanted, holding both locks in the one order used
    /// everywhere (`wanted`, then `epochs`): a push callback and an unsubscribe once took them
    /// in opposite orders and deadlocked.
    fn with_epoch_of_wanted(
        &self,
        user: &str,
        f: impl FnOnce(&mut foldhash::HashMap<Arc<str>, Arc<str>>),
    ) {
        let Ok(wanted) = self.wanted.lock() else {
            return;
        };
        if wanted.contains(user)
            && let Ok(mut epochs) = self.epochs.lock()
        {
            f(&mut epochs);
        }
    }

    /// The connection dropped: announcements may have been missed.
    fn forget_epochs(&self) {
        if let Ok(mut epochs) = self.epochs.lock() {
            epochs.clear();
        }
    }

    fn want(&self, user: &Arc<str>, wanted: bool) {
        if let Ok(mut w) = self.wanted.lock() {
            if wanted {
                w.insert(user.clone());
            } else {
                w.remove(user);
                if let Ok(mut epochs) = self.epochs.lock() {
                    epochs.remove(user);
                }
            }
        }
    }

    fn is_wanted(&self, user: &str) -> bool {
        self.wanted
            .lock()
            .map(|w| w.contains(user))
            .unwrap_or(false)
    }

    /// Called from the push callback: must not block. True if Redis dropped a channel we want.
    fn server_dropped(&self, user: &str) -> bool {
        if !self.is_wanted(user) {
            return false; // our own unsubscribe, confirmed
        }
        if let Ok(mut d) = self.dropped.lock() {
            d.insert(Arc::from(user));
        }
        self.wake.notify_one();
        true
    }

    fn take_dropped(&self) -> Vec<Arc<str>> {
        self.dropped
            .lock()
            .map(|mut d| d.drain().collect())
            .unwrap_or_default()
    }
}

/// Turns pushed pub/sub messages into deliveries without blocking the connection.
struct PushToDeliveries {
    deliveries: Arc<dyn DeliverySink>,
    connected: Arc<AtomicBool>,
    subscriptions: Arc<Subscriptions>,
    cluster: bool,
    /// One buffer per payload, whatever the number of its recipients.
    shared: Arc<shared::SharedPayloads>,
    /// Users whose epoch must be read again (see [`relearn_epochs`]).
    relearn: mpsc::Sender<Arc<str>>,
}

impl PushToDeliveries {
    /// A message on `channel`: a user's (delivered with positions) or an operator's.
    fn message(&self, channel: &[u8], payload: Bytes) {
        // Operator traffic (the dashboard) is not a user's: handed over as it is.
        if channel.starts_with(keys::OPERATOR_PREFIX.as_bytes()) {
            if let Ok(channel) = std::str::from_utf8(channel) {
                self.deliveries.operator_message(channel, &payload);
            }
            return;
        }
        let Some(user) = keys::user_of_channel(channel) else {
            // Another writer on our channel, or a foldercast of another format.
            tracing::warn!("malformed channel message skipped");
            return;
        };
        // One lock around holding and delivering, so that messages held for a user and the
        // ones after them reach the sink in order.
        let Ok(mut held) = self.subscriptions.held.lock() else {
            return;
        };
        if let Some(h) = held.get_mut(user) {
            if h.messages.len() < MAX_HELD {
                // Its own copy: the payload is a slice of the subscriber's read buffer.
                h.messages.push(Bytes::copy_from_slice(&payload));
            } else {
                h.overflowed = true;
            }
            return;
        }
        match deliver_message(
            user,
            payload,
            &*self.deliveries,
            &self.subscriptions,
            &self.shared,
        ) {
            Pushed::Delivered => {}
            Pushed::NotTaken => tracing::warn!("delivery dropped: no receiver ready for it"),
            Pushed::EpochUnknown(rest) => {
                // Held until the bus has read the user's epoch, then delivered.
                tracing::info!(%user, "a message came before its user's epoch was known; held while it is read");
                let user: Arc<str> = Arc::from(user);
                held.insert(
                    user.clone(),
                    Held {
                        messages: vec![Bytes::copy_from_slice(&rest)],
                        overflowed: false,
                    },
                );
                if self.relearn.try_send(user.clone()).is_err() {
                    // The reader is gone or behind: the sessions catch up from the history
                    // instead, which learns the epoch too.
                    held.remove(&user);
                    self.deliveries.feed_gap(Some(&user));
                    self.deliveries.feed_restored(Some(&user));
                }
            }
            Pushed::Malformed => tracing::warn!("malformed channel message skipped"),
        }
    }

    /// The subscription connection is gone: whatever is published until it is back reaches
    /// no one live, so sessions hold, then catch up from the history.
    fn lost(&self) {
        self.connected.store(false, Relaxed);
        self.subscriptions.forget_epochs();
        self.deliveries.feed_gap(None);
        if self.cluster {
            self.subscriptions.resubscribe_everything();
        }
    }

    /// Every wanted channel is subscribed again (our own standalone subscriber says so once
    /// Redis confirmed them all): the sessions catch up on what the gap held back.
    fn restored(&self) {
        self.connected.store(true, Relaxed);
        self.deliveries.feed_restored(None);
    }
}

/// The cluster's subscriber is redis-rs's: its pushes arrive here.
impl AsyncPushSender for PushToDeliveries {
    fn send(&self, info: PushInfo) -> Result<(), SendError> {
        match info.kind {
            PushKind::Message | PushKind::SMessage => {
                let mut data = info.data.into_iter();
                let bytes = |v: Option<Value>| match v {
                    Some(Value::BulkString(b)) => Some(b),
                    Some(Value::SimpleString(s)) => Some(s.into_bytes()),
                    _ => None,
                };
                match (bytes(data.next()), bytes(data.next())) {
                    (Some(channel), Some(payload)) => self.message(&channel, Bytes::from(payload)),
                    _ => tracing::warn!("malformed channel message skipped"),
                }
            }
            PushKind::Disconnection => {
                self.lost();
                tracing::warn!("redis subscription connection lost; reconnecting");
            }
            PushKind::SUnsubscribe => {
                let channel = match info.data.first() {
                    Some(Value::BulkString(b)) => b.as_slice(),
                    _ => return Ok(()),
                };
                if let Some(user) = keys::user_of_channel(channel)
                    && self.subscriptions.server_dropped(user)
                {
                    self.deliveries.feed_gap(Some(user));
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Users whose epoch is waiting to be read again; a full queue falls back on the sessions'
/// own catch-up.
const RELEARN_QUEUE: usize = 4096;

/// Reads the epoch of each user sent here (a history read: it learns the epoch, and starts one
/// if the meta key was lost), then delivers the messages held for the user meanwhile, in order.
/// If the epoch is still unknown (the read failed) or too many were held, the user's sessions
/// catch up from the history instead. Runs until the bus is dropped.
async fn relearn_epochs(
    mut users: mpsc::Receiver<Arc<str>>,
    bus: Weak<RedisBus>,
    sink: Arc<dyn DeliverySink>,
    shared: Arc<shared::SharedPayloads>,
) {
    while let Some(user) = users.recv().await {
        let Some(bus) = bus.upgrade() else { return };
        if let Err(e) = bus.read_history(&user, None, 0).await {
            tracing::warn!(%user, error = %e, "reading the epoch failed; the sessions catch up instead");
        }
        let subs = &bus.subscriptions;
        let Ok(mut held) = subs.held.lock() else {
            return;
        };
        let Some(h) = held.remove(&user) else {
            continue;
        };
        let mut caught_up = !h.overflowed;
        for message in h.messages {
            if !caught_up {
                break;
            }
            caught_up = !matches!(
                deliver_message(&user, message, &*sink, subs, &shared),
                Pushed::EpochUnknown(_)
            );
        }
        if !caught_up {
            sink.feed_gap(Some(&user));
            sink.feed_restored(Some(&user));
        }
    }
}

/// What became of a pushed channel message.
#[derive(Debug, PartialEq)]
enum Pushed {
    /// Every message handed to the sink (or none was in it).
    Delivered,
    /// The sink refused some (a full or closed receiver).
    NotTaken,
    /// From this entry on (the rest of the channel message), the user's epoch is not known:
    /// not delivered; what came before it was.
    EpochUnknown(Bytes),
    /// Not a channel message of this format; what parsed before the fault was delivered.
    Malformed,
}

/// The user and message of a pushed `[channel, message]`.
#[cfg(test)]
fn channel_message(data: Vec<Value>) -> Option<(Arc<str>, Bytes)> {
    let bytes = |v: Value| match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    };
    let mut data = data.into_iter();
    let channel = data.next().and_then(bytes)?;
    let message = Bytes::from(data.next().and_then(bytes)?);
    let user = keys::user_of_channel(&channel)?;
    Some((Arc::from(user), message))
}

/// A stream id's usual length (`<13-digit ms>-<seq>`).
const POSITION_ID_LEN: usize = 16;

/// Hands each message of `user`'s channel message to `sink` with its position, where every
/// entry is `[<epoch>:]<stream id> <payload bytes>\n<payload>` or an announcement
/// `<epoch>: 0\n` (see the module doc). Small payloads are slices of the pushed message (on
/// standalone Redis, of the subscriber's read buffer: the sink copies what it keeps); large
/// ones are shared with the other recipients of the same bytes (`shared.rs`).
fn deliver_message(
    user: &str,
    message: Bytes,
    sink: &dyn DeliverySink,
    subscriptions: &Subscriptions,
    shared: &shared::SharedPayloads,
) -> Pushed {
    let mut epoch = subscriptions.epoch_of(user);
    // Every position written into one buffer: one allocation per push, not one per message.
    // Sized from a guess at the entries (a few hundred bytes each) so neither grows in steps.
    let guess = 1 + message.len() / 256;
    let position_len = epoch.as_ref().map_or(16, |e| e.len()) + 1 + POSITION_ID_LEN;
    let mut positions = String::with_capacity(guess * position_len);
    let mut entries: Vec<(std::ops::Range<usize>, Bytes)> = Vec::with_capacity(guess);
    let mut at = 0;
    let mut outcome = Pushed::Delivered;
    while at < message.len() {
        let Some(entry) = parse_entry(&message[at..]) else {
            outcome = Pushed::Malformed;
            break;
        };
        let id = match entry.id.split_once(':') {
            Some((announced, id)) => {
                subscriptions.announced_epoch(user, announced);
                epoch = Some(Arc::from(announced));
                id
            }
            None => entry.id,
        };
        if !id.is_empty() {
            let Some(epoch) = &epoch else {
                outcome = Pushed::EpochUnknown(message.slice(at..));
                break;
            };
            let payload = shared.share(message.slice(at + entry.payload_start..at + entry.end));
            let start = positions.len();
            positions.push_str(epoch);
            positions.push(':');
            positions.push_str(id);
            entries.push((start..positions.len(), payload));
        }
        at += entry.end;
    }
    // What parsed before a fault is delivered, in order; the rest is in the history.
    let messages: Vec<(&str, Bytes)> = entries
        .into_iter()
        .map(|(span, payload)| (&positions[span], payload))
        .collect();
    let taken = messages.is_empty() || sink.deliver_all(user, &messages);
    match outcome {
        Pushed::Delivered if !taken => Pushed::NotTaken,
        outcome => outcome,
    }
}

#[cfg(test)]
fn delivery_of(
    data: Vec<Value>,
    sink: &dyn DeliverySink,
    subscriptions: &Subscriptions,
    shared: &shared::SharedPayloads,
) -> Pushed {
    match channel_message(data) {
        Some((user, message)) => deliver_message(&user, message, sink, subscriptions, shared),
        None => Pushed::Malformed,
    }
}

/// One `<id> <length>\n<payload>` entry at the start of a channel message, as offsets into it.
struct Entry<'a> {
    id: &'a str,
    payload_start: usize,
    end: usize,
}

fn parse_entry(buf: &[u8]) -> Option<Entry<'_>> {
    let space = buf.iter().position(|b| *b == b' ')?;
    let newline = space + 1 + buf[space + 1..].iter().position(|b| *b == b'\n')?;
    let id = std::str::from_utf8(&buf[..space]).ok()?;
    let length: usize = std::str::from_utf8(&buf[space + 1..newline])
        .ok()?
        .parse()
        .ok()?;
    let end = (newline + 1).checked_add(length)?;
    // An announcement (`<epoch>:`) has an empty stream id and no payload.
    (!id.is_empty() && end <= buf.len()).then_some(Entry {
        id,
        payload_start: newline + 1,
        end,
    })
}

fn unavailable(e: RedisError) -> BusError {
    BusError::Unavailable(e.to_string())
}

impl RedisBus {
    /// `HGET key field`.
    async fn hget(&self, key: &str, field: &str) -> Result<Option<String>, BusError> {
        let mut read = redis::cmd("HGET");
        read.arg(key).arg(field);
        let value: Result<Option<String>, RedisError> = self.query(&read).await;
        value.map_err(|e| BusError::Unavailable(e.to_string()))
    }

    /// `HSET key field value` and the key's lifetime set to `ttl` (from now).
    async fn hset_with_ttl(
        &self,
        key: &str,
        field: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<(), BusError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HSET")
            .arg(key)
            .arg(field)
            .arg(value)
            .ignore()
            .cmd("PEXPIRE")
            .arg(key)
            .arg(ttl.as_millis().max(1) as u64)
            .ignore();
        let done: Result<(), RedisError> = self.query(&pipe).await;
        done.map_err(|e| BusError::Unavailable(e.to_string()))
    }

    /// Connects the publisher, and the subscriber when `deliveries` is given (tests, tools).
    pub async fn connect(
        target: &RedisTarget,
        options: RedisOptions,
        deliveries: Option<mpsc::Sender<Delivery>>,
    ) -> Result<Arc<Self>, BusError> {
        let sink = deliveries.map(|tx| Arc::new(tx) as Arc<dyn DeliverySink>);
        Self::connect_with_sink(target, options, sink).await
    }

    /// Connects the publisher, and the subscriber when `deliveries` is given (gateways: the hub).
    pub async fn connect_with_sink(
        target: &RedisTarget,
        options: RedisOptions,
        deliveries: Option<Arc<dyn DeliverySink>>,
    ) -> Result<Arc<Self>, BusError> {
        let connected = Arc::new(AtomicBool::new(false));
        let subscriptions = Arc::new(Subscriptions::default());
        let publisher = open(target, None).await?;
        let (relearn, relearn_rx) = mpsc::channel(RELEARN_QUEUE);
        let shared = Arc::new(shared::SharedPayloads::default());
        let subscriber = match deliveries.clone() {
            Some(tx) => Some(
                open_subscriber(
                    target,
                    PushToDeliveries {
                        deliveries: tx,
                        connected: connected.clone(),
                        subscriptions: subscriptions.clone(),
                        cluster: matches!(target, RedisTarget::Cluster(_)),
                        shared: shared.clone(),
                        relearn,
                    },
                )
                .await?,
            ),
            None => None,
        };
        if let (Some(SubscriberConn::Cluster(conn)), Some(sink)) = (&subscriber, &deliveries) {
            tokio::spawn(resubscribe_dropped(
                conn.clone(),
                Arc::downgrade(&subscriptions),
                sink.clone(),
            ));
        }
        let publish_script = redis::Script::new(&match &publisher {
            Conn::Standalone(_) => standalone_script(),
            Conn::Cluster(_) => cluster_script(),
        });
        let bus = Arc::new(RedisBus {
            publisher,
            subscriber,
            subscriptions,
            sink: deliveries,
            publish_script,
            history_script: redis::Script::new(history::HISTORY_SCRIPT),
            options,
            connected,
            trim_counter: AtomicU64::new(0),
            ttl_memo: TtlMemo::default(),
        });
        bus.load_script().await?;
        bus.connected.store(true, Relaxed);
        if let Some(sink) = &bus.sink {
            tokio::spawn(relearn_epochs(
                relearn_rx,
                Arc::downgrade(&bus),
                sink.clone(),
                shared,
            ));
        }
        Ok(bus)
    }

    /// Pings every node every `interval` and keeps the connected flag (for `/readyz`) current;
    /// the pings also drive reconnection and resubscription. Runs until the bus is dropped.
    pub fn spawn_health_check(self: &Arc<Self>, interval: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(bus) = weak.upgrade() else { return };
                let conn = match &bus.subscriber {
                    // Our own subscriber keeps the flag and the feed events itself; a ping
                    // that goes unanswered makes it reconnect.
                    Some(SubscriberConn::Standalone(own)) => {
                        let answered =
                            tokio::time::timeout(interval.max(Duration::from_secs(1)), own.ping())
                                .await
                                .is_ok_and(|r| r.is_ok());
                        if !answered && bus.connected.load(Relaxed) {
                            tracing::warn!("redis subscriber does not answer pings; reconnecting");
                            own.reset();
                        }
                        continue;
                    }
                    Some(SubscriberConn::Managed(c)) => Conn::Standalone(c.clone()),
                    Some(SubscriberConn::Cluster(c)) => Conn::Cluster(c.clone()),
                    None => bus.publisher.clone(),
                };
                let ok = tokio::time::timeout(interval.max(Duration::from_secs(1)), ping(conn))
                    .await
                    .map(|r| r.is_ok())
                    .unwrap_or(false);
                let was = bus.connected.swap(ok, Relaxed);
                if ok && !was {
                    // The ping went over the reconnected subscriber, after its resubscription:
                    // whatever is published from now on arrives live, the rest is in history.
                    tracing::info!("redis connection restored; sessions catch up");
                    match (&bus.subscriber, &bus.sink) {
                        // A cluster declares the feed restored once it resubscribed everything.
                        (Some(SubscriberConn::Cluster(_)), _) => {
                            bus.subscriptions.resubscribe_everything()
                        }
                        (_, Some(sink)) => sink.feed_restored(None),
                        _ => {}
                    }
                } else if !ok && was {
                    tracing::warn!("redis unreachable; retrying");
                    bus.subscriptions.forget_epochs();
                    if let Some(sink) = &bus.sink {
                        sink.feed_gap(None);
                    }
                }
            }
        });
    }

    /// Subscribes (`on`) or unsubscribes one channel on whichever subscriber this bus has.
    async fn subscribe_channel(&self, channel: &str, on: bool) -> Result<(), BusError> {
        match (&self.subscriber, on) {
            (Some(SubscriberConn::Standalone(own)), true) => own.subscribe(channel).await,
            (Some(SubscriberConn::Standalone(own)), false) => own.unsubscribe(channel).await,
            (Some(SubscriberConn::Managed(c)), true) => {
                c.clone().subscribe(channel).await.map_err(unavailable)
            }
            (Some(SubscriberConn::Managed(c)), false) => {
                c.clone().unsubscribe(channel).await.map_err(unavailable)
            }
            (Some(SubscriberConn::Cluster(c)), true) => {
                c.clone().ssubscribe(channel).await.map_err(unavailable)
            }
            (Some(SubscriberConn::Cluster(c)), false) => {
                c.clone().sunsubscribe(channel).await.map_err(unavailable)
            }
            (None, _) => Err(BusError::Unavailable(
                "this bus was opened without a subscriber".into(),
            )),
        }
    }

    /// Sends a command or a pipeline on the publishing connection, standalone or cluster.
    async fn query<T: redis::FromRedisValue>(&self, q: &impl Query) -> Result<T, RedisError> {
        match self.publisher.clone() {
            Conn::Standalone(mut c) => q.send(&mut c).await,
            Conn::Cluster(mut c) => q.send(&mut c).await,
        }
    }

    async fn load_script(&self) -> Result<(), BusError> {
        let mut load = redis::cmd("SCRIPT");
        match self.publisher.clone() {
            Conn::Standalone(mut c) => {
                load.arg("LOAD").arg(standalone_script());
                let _: String = load.query_async(&mut c).await.map_err(unavailable)?;
            }
            Conn::Cluster(mut c) => {
                load.arg("LOAD").arg(cluster_script());
                c.route_command(
                    load,
                    RoutingInfo::MultiNode((
                        MultipleNodeRoutingInfo::AllMasters,
                        Some(ResponsePolicy::AllSucceeded),
                    )),
                )
                .await
                .map_err(unavailable)?;
            }
        }
        Ok(())
    }
}

/// Subscribes again, with backoff, the channels a slot move dropped (or every channel, after a
/// lost connection), and has their sessions catch up on what was published meanwhile. Ends
/// with the bus.
async fn resubscribe_dropped(
    mut conn: ClusterConnection,
    subscriptions: Weak<Subscriptions>,
    sink: Arc<dyn DeliverySink>,
) {
    let mut delay = Duration::from_millis(50);
    loop {
        let Some(subs) = subscriptions.upgrade() else {
            return;
        };
        // Woken by a drop or a lost connection, or retrying after a failure.
        let _ = tokio::time::timeout(Duration::from_secs(5), subs.wake.notified()).await;
        let everything = subs.everything.swap(false, Relaxed);
        let dropped = if everything {
            subs.wanted
                .lock()
                .map(|w| w.iter().cloned().collect())
                .unwrap_or_default()
        } else {
            subs.take_dropped()
        };
        if dropped.is_empty() {
            if everything {
                sink.feed_restored(None);
            }
            continue;
        }
        // The slot is moving, or the node reconnecting: give it a moment.
        tokio::time::sleep(delay).await;
        let mut failed = Vec::new();
        let count = dropped.len();
        for user in dropped {
            if !subs.is_wanted(&user) {
                continue;
            }
            match conn.ssubscribe(keys::channel(&user)).await {
                Ok(()) if everything => {}
                Ok(()) => {
                    tracing::info!(%user, "resubscribed after the cluster moved its slot");
                    sink.feed_restored(Some(&user));
                }
                Err(e) => {
                    tracing::warn!(%user, error = %e, retry_in = ?delay, "resubscription failed");
                    failed.push(user);
                }
            }
        }
        if failed.is_empty() {
            if everything {
                tracing::info!(
                    channels = count,
                    "resubscribed every channel; sessions catch up"
                );
                sink.feed_restored(None);
            }
            delay = Duration::from_millis(50);
        } else {
            if everything {
                subs.everything.store(true, Relaxed);
            } else if let Ok(mut d) = subs.dropped.lock() {
                d.extend(failed);
            }
            subs.wake.notify_one();
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }
}

/// The subscribing connection for `target`: our own on standalone Redis over TCP or a Unix
/// socket, redis-rs's otherwise.
async fn open_subscriber(
    target: &RedisTarget,
    push: PushToDeliveries,
) -> Result<SubscriberConn, BusError> {
    if let RedisTarget::Standalone(url) = target
        && subscriber::Subscriber::serves(url)
    {
        return Ok(SubscriberConn::Standalone(
            subscriber::Subscriber::connect(url, push).await?,
        ));
    }
    Ok(match open(target, Some(push)).await? {
        Conn::Standalone(c) => SubscriberConn::Managed(c),
        Conn::Cluster(c) => SubscriberConn::Cluster(c),
    })
}

async fn open(target: &RedisTarget, push: Option<PushToDeliveries>) -> Result<Conn, BusError> {
    match target {
        RedisTarget::Standalone(url) => {
            let client = redis::Client::open(resp3(url).as_str())
                .map_err(|e| BusError::Unavailable(format!("invalid redis URL {url:?}: {e}")))?;
            let mut config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(5)))
                .set_response_timeout(Some(Duration::from_secs(10)))
                .set_max_delay(Duration::from_secs(5));
            if let Some(push) = push {
                config = config.set_push_sender(push).set_automatic_resubscription();
            }
            let manager = ConnectionManager::new_with_config(client, config)
                .await
                .map_err(|e| {
                    BusError::Unavailable(format!("cannot connect to redis at {url}: {e}"))
                })?;
            Ok(Conn::Standalone(manager))
        }
        RedisTarget::Cluster(nodes) => {
            let mut builder =
                ClusterClientBuilder::new(nodes.iter().map(|n| resp3(n)).collect::<Vec<_>>())
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .connection_timeout(Duration::from_secs(5))
                    .response_timeout(Duration::from_secs(10));
            if let Some(push) = push {
                builder = builder.push_sender(push);
            }
            let client = builder.build().map_err(|e| {
                BusError::Unavailable(format!("invalid redis cluster nodes {nodes:?}: {e}"))
            })?;
            let conn = client.get_async_connection().await.map_err(|e| {
                BusError::Unavailable(format!("cannot connect to redis cluster {nodes:?}: {e}"))
            })?;
            Ok(Conn::Cluster(conn))
        }
    }
}

/// Pub/sub pushes need RESP3.
fn resp3(url: &str) -> String {
    if url.contains("protocol=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&protocol=resp3")
    } else {
        format!("{url}?protocol=resp3")
    }
}

async fn ping(conn: Conn) -> Result<(), RedisError> {
    match conn {
        Conn::Standalone(mut c) => redis::cmd("PING").query_async::<()>(&mut c).await,
        Conn::Cluster(mut c) => c
            .route_command(
                redis::cmd("PING"),
                RoutingInfo::MultiNode((
                    MultipleNodeRoutingInfo::AllMasters,
                    Some(ResponsePolicy::AllSucceeded),
                )),
            )
            .await
            .map(|_| ()),
    }
}

#[async_trait]
impl Bus for RedisBus {
    async fn schedule(&self, id: &str, json: &str, due: &[(String, i64)]) -> Result<(), BusError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HSET")
            .arg(keys::scheduled())
            .arg(id)
            .arg(json)
            .ignore();
        for (member, ms) in due {
            pipe.cmd("ZADD")
                .arg(keys::due())
                .arg(*ms)
                .arg(member)
                .ignore();
        }
        let done: Result<(), RedisError> = self.query(&pipe).await;
        done.map_err(|e| BusError::Unavailable(e.to_string()))
    }

    async fn advertise_gateway(&self, id: &str, json: &str, until_ms: i64) -> Result<(), BusError> {
        let mut set = redis::cmd("HSET");
        set.arg(keys::GATEWAYS)
            .arg(id)
            .arg(format!("{until_ms}|{json}"));
        let done: Result<(), RedisError> = self.query(&set).await;
        done.map_err(unavailable)
    }

    async fn gateways(&self, now_ms: i64) -> Result<Vec<String>, BusError> {
        let mut read = redis::cmd("HGETALL");
        read.arg(keys::GATEWAYS);
        let all: Vec<(String, String)> = self.query(&read).await.map_err(unavailable)?;
        let mut live = Vec::new();
        let mut expired = Vec::new();
        for (id, value) in all {
            match value.split_once('|') {
                Some((until, json)) if until.parse::<i64>().is_ok_and(|u| u > now_ms) => {
                    live.push(json.to_owned());
                }
                _ => expired.push(id),
            }
        }
        if !expired.is_empty() {
            // Gateways that stopped heartbeating (killed, partitioned) leave no trace.
            let mut del = redis::cmd("HDEL");
            del.arg(keys::GATEWAYS).arg(&expired);
            let _: Result<u64, RedisError> = self.query(&del).await;
        }
        Ok(live)
    }

    async fn withdraw_gateway(&self, id: &str) -> Result<(), BusError> {
        let mut del = redis::cmd("HDEL");
        del.arg(keys::GATEWAYS).arg(id);
        let done: Result<u64, RedisError> = self.query(&del).await;
        done.map(|_| ()).map_err(unavailable)
    }

    async fn scheduled(&self) -> Result<Vec<String>, BusError> {
        let mut read = redis::cmd("HVALS");
        read.arg(keys::scheduled());
        let all: Result<Vec<String>, RedisError> = self.query(&read).await;
        all.map_err(|e| BusError::Unavailable(e.to_string()))
    }

    async fn claim_due(&self, now_ms: i64, limit: usize) -> Result<Vec<String>, BusError> {
        // Read and remove in one script: two gateways never claim the same announcement.
        let script = redis::Script::new(
            r"local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
              for _, m in ipairs(due) do redis.call('ZREM', KEYS[1], m) end
              return due",
        );
        let mut call = script.key(keys::due());
        call.arg(now_ms).arg(limit);
        let claimed: Result<Vec<String>, RedisError> = match self.publisher.clone() {
            Conn::Standalone(mut c) => call.invoke_async(&mut c).await,
            Conn::Cluster(mut c) => call.invoke_async(&mut c).await,
        };
        claimed.map_err(|e| BusError::Unavailable(e.to_string()))
    }

    async fn unschedule(&self, id: &str) -> Result<bool, BusError> {
        if self.hget(keys::scheduled(), id).await?.is_none() {
            return Ok(false);
        }
        let mut read = redis::cmd("ZRANGE");
        read.arg(keys::due()).arg(0).arg(-1);
        let due: Result<Vec<String>, RedisError> = self.query(&read).await;
        let prefix = format!("{id}|");
        let mine: Vec<String> = due
            .map_err(|e| BusError::Unavailable(e.to_string()))?
            .into_iter()
            .filter(|m| m.starts_with(&prefix))
            .collect();
        let mut pipe = redis::pipe();
        pipe.cmd("HDEL").arg(keys::scheduled()).arg(id).ignore();
        if !mine.is_empty() {
            pipe.cmd("ZREM").arg(keys::due()).arg(&mine).ignore();
        }
        let done: Result<(), RedisError> = self.query(&pipe).await;
        done.map_err(|e| BusError::Unavailable(e.to_string()))?;
        Ok(true)
    }

    async fn device_seen(
        &self,
        user: &str,
        device: &str,
        ttl: Duration,
    ) -> Result<crate::bus::devices::DeviceRecord, BusError> {
        let stored = self.hget(&keys::devices(user), device).await?;
        let now_ms = chrono::Utc::now().timestamp_millis();
        if stored.is_none() {
            let known = self.devices(user, ttl).await?;
            if known.len() >= crate::bus::devices::MAX_DEVICES
                && let Some(oldest) =
                    crate::bus::devices::least_recent(known.iter().map(|(n, r)| (n, r)))
            {
                self.forget_device(user, &oldest).await?;
            }
        }
        let record = crate::bus::devices::DeviceRecord::seen(stored.as_deref(), now_ms);
        self.hset_with_ttl(&keys::devices(user), device, &record.encode(), ttl)
            .await?;
        Ok(record)
    }

    async fn device_acked(
        &self,
        user: &str,
        device: &str,
        position: &str,
        ttl: Duration,
    ) -> Result<bool, BusError> {
        let stored = self.hget(&keys::devices(user), device).await?;
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut record = match stored {
            Some(s) => serde_json::from_str(&s)
                .unwrap_or_else(|_| crate::bus::devices::DeviceRecord::seen(None, now_ms)),
            None => crate::bus::devices::DeviceRecord::seen(None, now_ms),
        };
        if !record.acknowledge(position) {
            return Ok(false);
        }
        self.hset_with_ttl(&keys::devices(user), device, &record.encode(), ttl)
            .await?;
        Ok(true)
    }

    async fn devices(
        &self,
        user: &str,
        ttl: Duration,
    ) -> Result<Vec<(String, crate::bus::devices::DeviceRecord)>, BusError> {
        let mut read = redis::cmd("HGETALL");
        read.arg(keys::devices(user));
        let all: Result<Vec<(String, String)>, RedisError> = self.query(&read).await;
        let now_ms = chrono::Utc::now().timestamp_millis();
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let mut out: Vec<(String, crate::bus::devices::DeviceRecord)> = all
            .map_err(|e| BusError::Unavailable(e.to_string()))?
            .into_iter()
            .filter_map(|(name, json)| {
                let record: crate::bus::devices::DeviceRecord = serde_json::from_str(&json).ok()?;
                (now_ms.saturating_sub(record.last_seen_ms) < ttl_ms).then_some((name, record))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn forget_device(&self, user: &str, device: &str) -> Result<bool, BusError> {
        let mut del = redis::cmd("HDEL");
        del.arg(keys::devices(user)).arg(device);
        let removed: Result<u64, RedisError> = self.query(&del).await;
        Ok(removed.map_err(|e| BusError::Unavailable(e.to_string()))? > 0)
    }

    async fn owe(
        &self,
        users: &[Arc<str>],
        notice: &crate::bus::OwedNotice,
        retention: Duration,
    ) -> Result<(), BusError> {
        let encoded = crate::bus::encode_owed(notice, retention);
        let ttl = retention.as_millis().max(1) as u64;
        // HSET answers 1 for a user newly owed the notice (a retried publish re-owes none).
        let owe_one = |pipe: &mut redis::Pipeline, user: &str| {
            pipe.cmd("HSET")
                .arg(keys::owed(user))
                .arg(&*notice.id)
                .arg(&encoded)
                .cmd("PEXPIRE")
                .arg(keys::owed(user))
                .arg(ttl)
                .ignore();
        };
        let newly: u64 = match self.publisher.clone() {
            // One pipeline for the batch.
            Conn::Standalone(mut c) => {
                let mut pipe = redis::pipe();
                for user in users {
                    owe_one(&mut pipe, user);
                }
                let added: Vec<u64> = pipe
                    .query_async(&mut c)
                    .await
                    .map_err(|e| BusError::Unavailable(e.to_string()))?;
                added.iter().sum()
            }
            // A pipeline may not cross slots: one per user (its keys share its slot), a few
            // dozen at a time.
            Conn::Cluster(c) => {
                use futures_util::StreamExt;
                let pipes: Vec<redis::Pipeline> = users
                    .iter()
                    .map(|user| {
                        let mut pipe = redis::pipe();
                        owe_one(&mut pipe, user);
                        pipe
                    })
                    .collect();
                let results: Vec<Result<Vec<u64>, RedisError>> =
                    futures_util::stream::iter(pipes.into_iter().map(move |pipe| {
                        let mut c = c.clone();
                        async move { pipe.query_async::<Vec<u64>>(&mut c).await }
                    }))
                    .buffer_unordered(32)
                    .collect()
                    .await;
                let mut newly = 0;
                for added in results {
                    newly += added.map_err(unavailable)?.iter().sum::<u64>();
                }
                newly
            }
        };
        // The count for /metrics: a separate step (another slot on a cluster); a crash between
        // the two leaves it short until the notice expires.
        let deadline = notice.published_ms + retention.as_millis() as i64;
        let mut count = redis::pipe();
        count
            .cmd("HINCRBY")
            .arg(keys::PENDING_NOTICES)
            .arg(&*notice.id)
            .arg(newly)
            .ignore()
            .cmd("HSET")
            .arg(keys::PENDING_UNTIL)
            .arg(&*notice.id)
            .arg(deadline)
            .ignore();
        let done: Result<(), RedisError> = self.query(&count).await;
        done.map_err(unavailable)
    }

    async fn pending_notices(&self, now_ms: i64) -> Result<u64, BusError> {
        let mut read = redis::pipe();
        read.cmd("HGETALL")
            .arg(keys::PENDING_NOTICES)
            .cmd("HGETALL")
            .arg(keys::PENDING_UNTIL);
        let (counts, until): (Vec<(String, i64)>, Vec<(String, i64)>) =
            self.query(&read).await.map_err(unavailable)?;
        let until: std::collections::HashMap<String, i64> = until.into_iter().collect();
        let mut pending = 0u64;
        let mut over = Vec::new();
        for (id, n) in counts {
            match until.get(&id) {
                Some(deadline) if *deadline > now_ms && n > 0 => pending += n as u64,
                _ => over.push(id),
            }
        }
        if !over.is_empty() {
            // Expired, or acknowledged by everyone who owed it.
            let mut forget = redis::pipe();
            forget
                .cmd("HDEL")
                .arg(keys::PENDING_NOTICES)
                .arg(&over)
                .ignore()
                .cmd("HDEL")
                .arg(keys::PENDING_UNTIL)
                .arg(&over)
                .ignore();
            let _: Result<(), RedisError> = self.query(&forget).await;
        }
        Ok(pending)
    }

    async fn owed(&self, user: &str, device: &str) -> Result<Vec<Bytes>, BusError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL")
            .arg(keys::owed(user))
            .cmd("SMEMBERS")
            .arg(keys::acked(user));
        let read: Result<(Vec<(String, Vec<u8>)>, Vec<String>), RedisError> =
            self.query(&pipe).await;
        let (stored, acked) = read.map_err(|e| BusError::Unavailable(e.to_string()))?;
        let acked: std::collections::HashSet<String> = acked.into_iter().collect();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut owed: Vec<(i64, Bytes)> = stored
            .iter()
            .filter_map(|(id, value)| {
                let (per_device, deadline, payload) = crate::bus::decode_owed(value)?;
                let member = crate::bus::ack_member(id, per_device.then_some(device));
                (deadline > now_ms && !acked.contains(&member)).then_some((deadline, payload))
            })
            .collect();
        // Oldest first (same retention: the earliest deadline was published first).
        owed.sort_by_key(|(deadline, _)| *deadline);
        Ok(owed.into_iter().map(|(_, p)| p).collect())
    }

    async fn acknowledge(
        &self,
        user: &str,
        device: &str,
        notification_id: &str,
    ) -> Result<bool, BusError> {
        let mut read = redis::cmd("HGET");
        read.arg(keys::owed(user)).arg(notification_id);
        let stored: Result<Option<Vec<u8>>, RedisError> = self.query(&read).await;
        let stored = stored.map_err(|e| BusError::Unavailable(e.to_string()))?;
        let Some((per_device, deadline, _)) = stored.as_deref().and_then(crate::bus::decode_owed)
        else {
            // Acknowledged before (by any device, for a per-user notice): idempotent.
            let mut seen = redis::cmd("SISMEMBER");
            seen.arg(keys::acked(user))
                .arg(crate::bus::ack_member(notification_id, None));
            let seen: Result<bool, RedisError> = self.query(&seen).await;
            return seen.map_err(|e| BusError::Unavailable(e.to_string()));
        };
        let ttl = (deadline - chrono::Utc::now().timestamp_millis()).max(1);
        let mut pipe = redis::pipe();
        pipe.cmd("SADD")
            .arg(keys::acked(user))
            .arg(crate::bus::ack_member(
                notification_id,
                per_device.then_some(device),
            ))
            .ignore()
            .cmd("PEXPIRE")
            .arg(keys::acked(user))
            .arg(ttl)
            .arg("GT")
            .ignore();
        // A new set has no TTL for GT to compare with: give it one.
        pipe.cmd("PEXPIRE")
            .arg(keys::acked(user))
            .arg(ttl)
            .arg("NX")
            .ignore();
        if !per_device {
            // Any one device's acknowledgement ends a per-user notice for all of them.
            pipe.cmd("HDEL").arg(keys::owed(user)).arg(notification_id);
        }
        let removed: Vec<u64> = self.query(&pipe).await.map_err(unavailable)?;
        if removed.first().is_some_and(|n| *n > 0) {
            let mut count = redis::cmd("HINCRBY");
            count
                .arg(keys::PENDING_NOTICES)
                .arg(notification_id)
                .arg(-1);
            let _: Result<i64, RedisError> = self.query(&count).await;
        }
        Ok(true)
    }

    async fn record_once(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<Option<String>, BusError> {
        // SET … NX GET (Redis 7): set unless present, and say what was there, in one command.
        let mut set = redis::cmd("SET");
        set.arg(key)
            .arg(value)
            .arg("NX")
            .arg("GET")
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64);
        let earlier: Result<Option<String>, RedisError> = self.query(&set).await;
        earlier.map_err(|e| BusError::Unavailable(e.to_string()))
    }

    async fn preferences(&self, users: &[Arc<str>]) -> Result<Vec<Option<String>>, BusError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let read: Result<Vec<Option<String>>, RedisError> = match &self.publisher {
            // One round trip for all of an event's recipients.
            Conn::Standalone(_) => {
                let mut mget = redis::cmd("MGET");
                for user in users {
                    mget.arg(keys::preferences(user));
                }
                self.query(&mget).await
            }
            // Each user's key lives in its own slot: one GET each, all at once.
            Conn::Cluster(_) => futures_util::future::join_all(users.iter().map(|user| {
                let mut get = redis::cmd("GET");
                get.arg(keys::preferences(user));
                async move { self.query::<Option<String>>(&get).await }
            }))
            .await
            .into_iter()
            .collect(),
        };
        read.map_err(unavailable)
    }

    async fn set_preferences(&self, user: &str, json: Option<&str>) -> Result<(), BusError> {
        let mut cmd = redis::cmd(if json.is_some() { "SET" } else { "DEL" });
        cmd.arg(keys::preferences(user));
        if let Some(json) = json {
            cmd.arg(json);
        }
        let done: Result<(), RedisError> = self.query(&cmd).await;
        done.map_err(unavailable)
    }

    async fn rerecord(
        &self,
        key: &str,
        value: Option<&str>,
        ttl: Duration,
    ) -> Result<(), BusError> {
        let cmd = match value {
            Some(v) => {
                let mut set = redis::cmd("SET");
                set.arg(key)
                    .arg(v)
                    .arg("PX")
                    .arg(ttl.as_millis().max(1) as u64);
                set
            }
            None => {
                let mut del = redis::cmd("DEL");
                del.arg(key);
                del
            }
        };
        let done: Result<(), RedisError> = self.query(&cmd).await;
        done.map_err(|e| BusError::Unavailable(e.to_string()))
    }

    async fn publish(&self, batch: &[Outgoing]) -> Result<(), BusError> {
        if batch.is_empty() {
            return Ok(());
        }
        match self.publish_once(batch).await {
            Ok(()) => Ok(()),
            // A restarted Redis has forgotten the script: load it and try once more. Messages
            // that did go out are not repeated: the event and per-user guards drop them.
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.load_script().await?;
                self.publish_once(batch).await.map_err(unavailable)
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn subscribe(&self, user: &Arc<str>) -> Result<(), BusError> {
        self.subscriptions.want(user, true);
        let result = self.subscribe_channel(&keys::channel(user), true).await;
        if result.is_err() {
            self.subscriptions.want(user, false);
            return result;
        }
        // The epoch of the messages that will arrive (none yet: the first publish or read
        // announces it). A failed read is not fatal: such messages are caught up instead.
        let mut read = redis::cmd("HGET");
        read.arg(keys::meta(user)).arg("epoch");
        let epoch: Result<Option<String>, RedisError> = self.query(&read).await;
        match epoch {
            Ok(Some(epoch)) => self.subscriptions.learn_epoch(user, &epoch),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(%user, error = %e, "reading the epoch failed; the history will tell")
            }
        }
        Ok(())
    }

    async fn operator_publish(&self, channel: &str, payload: &str) -> Result<(), BusError> {
        let mut publish = redis::cmd(match self.publisher {
            Conn::Standalone(_) => "PUBLISH",
            Conn::Cluster(_) => "SPUBLISH",
        });
        publish.arg(channel).arg(payload);
        let done: Result<u64, RedisError> = self.query(&publish).await;
        done.map(|_| ()).map_err(unavailable)
    }

    async fn operator_subscribe(&self, channel: &str, on: bool) -> Result<(), BusError> {
        self.subscribe_channel(channel, on).await
    }

    async fn dashboard_watch(
        &self,
        gateway: &str,
        until_ms: Option<i64>,
        now_ms: i64,
    ) -> Result<bool, BusError> {
        let change = match until_ms {
            Some(until) => {
                let mut set = redis::cmd("HSET");
                set.arg(keys::DASHBOARD_WATCHING).arg(gateway).arg(until);
                set
            }
            None => {
                let mut del = redis::cmd("HDEL");
                del.arg(keys::DASHBOARD_WATCHING).arg(gateway);
                del
            }
        };
        let done: Result<u64, RedisError> = self.query(&change).await;
        done.map_err(unavailable)?;
        Ok(self.dashboard_state(now_ms).await?.0)
    }

    async fn dashboard_state(&self, now_ms: i64) -> Result<(bool, Option<String>), BusError> {
        let mut read = redis::pipe();
        read.cmd("HGETALL")
            .arg(keys::DASHBOARD_WATCHING)
            .cmd("GET")
            .arg(keys::DASHBOARD_SPACE);
        let (watching, space): (Vec<(String, i64)>, Option<String>) =
            self.query(&read).await.map_err(unavailable)?;
        let expired: Vec<&String> = watching
            .iter()
            .filter(|(_, until)| *until <= now_ms)
            .map(|(g, _)| g)
            .collect();
        if !expired.is_empty() {
            // A gateway that stopped heartbeating (killed) shows no dashboard.
            let mut del = redis::cmd("HDEL");
            del.arg(keys::DASHBOARD_WATCHING).arg(&expired);
            let _: Result<u64, RedisError> = self.query(&del).await;
        }
        Ok((watching.len() > expired.len(), space))
    }

    async fn dashboard_choose_space(
        &self,
        space: Option<&str>,
        ttl: Duration,
    ) -> Result<(), BusError> {
        let cmd = match space {
            Some(space) => {
                let mut set = redis::cmd("SET");
                set.arg(keys::DASHBOARD_SPACE)
                    .arg(space)
                    .arg("PX")
                    .arg(ttl.as_millis().max(1) as u64);
                set
            }
            None => {
                let mut del = redis::cmd("DEL");
                del.arg(keys::DASHBOARD_SPACE);
                del
            }
        };
        let done: Result<redis::Value, RedisError> = self.query(&cmd).await;
        done.map(|_| ()).map_err(unavailable)
    }

    async fn unsubscribe(&self, user: &Arc<str>) -> Result<(), BusError> {
        self.subscriptions.want(user, false);
        match self.subscriber {
            Some(_) => self.subscribe_channel(&keys::channel(user), false).await,
            None => Ok(()),
        }
    }

    async fn catch_up(
        &self,
        user: &Arc<str>,
        since: Option<&crate::bus::Position>,
        limit: usize,
    ) -> Result<crate::bus::Catchup, BusError> {
        self.read_history(user, since, limit)
            .await
            .map_err(unavailable)
    }

    fn is_connected(&self) -> bool {
        self.connected.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_a_hash_tag() {
        assert_eq!(keys::channel("alice"), "fc:{alice}:live");
        assert_eq!(keys::stream("alice"), "fc:{alice}:log");
        assert_eq!(keys::seen("alice", 7), "fc:{alice}:seen:7");
        assert_eq!(keys::user_of_channel(b"fc:{alice}:live"), Some("alice"));
        assert_eq!(keys::user_of_channel(b"other"), None);
    }

    fn push(entries: &str) -> Vec<Value> {
        vec![
            Value::BulkString(b"fc:{bob}:live".to_vec()),
            Value::BulkString(entries.as_bytes().to_vec()),
        ]
    }

    /// Subscriptions wanting bob, with his epoch known when `epoch` is given.
    fn bob(epoch: Option<&str>) -> Subscriptions {
        let subs = Subscriptions::default();
        subs.want(&Arc::from("bob"), true);
        if let Some(epoch) = epoch {
            subs.learn_epoch("bob", epoch);
        }
        subs
    }

    #[test]
    fn pushed_messages_become_deliveries() {
        let (tx, mut rx) = mpsc::channel(8);
        let subs = bob(Some("e1"));
        assert_eq!(
            delivery_of(
                push("1700000000000-0 7\n{\"a\":1}"),
                &tx,
                &subs,
                &Default::default()
            ),
            Pushed::Delivered
        );
        let d = rx.try_recv().unwrap();
        assert_eq!(
            (&*d.user, &*d.id, &d.payload[..]),
            ("bob", "e1:1700000000000-0", &b"{\"a\":1}"[..])
        );
        // One push carries a user's messages of one script call, in order; payloads may hold
        // newlines and spaces, since the length decides where they end.
        let spaced = "{\"b\":\n\"x y\"}";
        let two = format!("1-0 2\n{{}}1-1 {}\n{spaced}", spaced.len());
        assert_eq!(
            delivery_of(push(&two), &tx, &subs, &Default::default()),
            Pushed::Delivered
        );
        let first = rx.try_recv().unwrap();
        let second = rx.try_recv().unwrap();
        assert_eq!((&*first.id, &first.payload[..]), ("e1:1-0", &b"{}"[..]));
        assert_eq!(
            (&*second.id, &second.payload[..]),
            ("e1:1-1", spaced.as_bytes())
        );
        let long_id = format!("{} 2\n{{}}", "9".repeat(60));
        assert_eq!(
            delivery_of(push(&long_id), &tx, &subs, &Default::default()),
            Pushed::Delivered
        );
        assert_eq!(rx.try_recv().unwrap().id.len(), 63);
    }

    #[test]
    fn announced_epochs_hold_from_where_they_are_announced() {
        let (tx, mut rx) = mpsc::channel(8);
        let subs = bob(Some("e1"));
        // A new stream's first entry names its epoch; the entries after it use it.
        assert_eq!(
            delivery_of(
                push("1-0 2\n{}e2:5-0 2\n{}5-1 2\n{}"),
                &tx,
                &subs,
                &Default::default()
            ),
            Pushed::Delivered
        );
        let ids: Vec<Arc<str>> = (0..3).map(|_| rx.try_recv().unwrap().id).collect();
        assert_eq!(ids, [Arc::from("e1:1-0"), "e2:5-0".into(), "e2:5-1".into()]);
        // An announcement alone delivers nothing and is remembered for the next push.
        assert_eq!(
            delivery_of(push("e3: 0\n"), &tx, &subs, &Default::default()),
            Pushed::Delivered
        );
        assert!(rx.try_recv().is_err());
        assert_eq!(
            delivery_of(push("6-0 2\n{}"), &tx, &subs, &Default::default()),
            Pushed::Delivered
        );
        assert_eq!(&*rx.try_recv().unwrap().id, "e3:6-0");
        // A read does not override an announcement that overtook its reply.
        subs.learn_epoch("bob", "e2");
        assert_eq!(subs.epoch_of("bob").as_deref(), Some("e3"));
    }

    #[test]
    fn messages_of_an_unknown_epoch_are_not_delivered_live() {
        let (tx, mut rx) = mpsc::channel(8);
        let subs = bob(None);
        assert_eq!(
            delivery_of(push("1-0 2\n{}"), &tx, &subs, &Default::default()),
            Pushed::EpochUnknown(Bytes::from_static(b"1-0 2\n{}"))
        );
        assert!(rx.try_recv().is_err());
        // A dropped connection forgets what it knew: announcements may have been missed.
        subs.learn_epoch("bob", "e1");
        subs.forget_epochs();
        assert!(subs.epoch_of("bob").is_none());
        // Unsubscribed users' epochs are neither learned nor kept.
        subs.want(&Arc::from("bob"), false);
        subs.learn_epoch("bob", "e1");
        assert!(subs.epoch_of("bob").is_none());
    }

    #[test]
    fn malformed_channel_messages_are_refused() {
        let (tx, mut rx) = mpsc::channel(8);
        let subs = bob(Some("e1"));
        assert_eq!(
            delivery_of(
                vec![Value::BulkString(b"fc:{bob}:live".to_vec())],
                &tx,
                &subs,
                &Default::default()
            ),
            Pushed::Malformed
        );
        for bad in [
            "1-0\n{}",       // the old format, no length
            "1-0 9\n{}",     // longer than what follows
            "1-0 x\n{}",     // not a length
            " 2\n{}",        // no id
            "1-0 2\n{}junk", // a second entry that does not parse
        ] {
            assert_eq!(
                delivery_of(push(bad), &tx, &subs, &Default::default()),
                Pushed::Malformed,
                "{bad:?}"
            );
        }
        // Entries before a malformed one were delivered; nothing after it.
        assert_eq!(rx.try_recv().unwrap().id.as_ref(), "e1:1-0");
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn resp3_is_requested() {
        assert_eq!(resp3("redis://h:1"), "redis://h:1?protocol=resp3");
        assert_eq!(
            resp3("redis://h:1/?db=2"),
            "redis://h:1/?db=2&protocol=resp3"
        );
        assert_eq!(resp3("redis://h:1?protocol=3"), "redis://h:1?protocol=3");
    }
}
