//! The bus: where the consumer side hands per-user messages to the gateway side.
//!
//! The seam is small on purpose, so Redis (standalone or Cluster) can stand behind it as well as
//! the in-process [`MemoryBus`]: publish a batch, subscribe or unsubscribe a user, and read a
//! user's history after a position. What a subscription receives arrives as [`Delivery`] values
//! on the sink the bus was built with, stamped with the user's position (`<epoch>:<id>`, see
//! [`position`]), whose ids strictly increase per user. Payloads are opaque bytes (an encoded
//! `UserMessage`), so a gateway never depends on how they were made.
//!
//! Every bus keeps a bounded history per user under the same contract: what was published is
//! there, in id order, until it is trimmed by length or age, and an epoch that changes whenever
//! the history was lost. [`Bus::catch_up`] reads it for resuming clients and for sessions whose
//! live feed had a gap.

pub mod devices;
mod lines;
mod memory;
pub mod position;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

pub use lines::{LinesBus, write_line};
pub use memory::{MemoryBus, MemoryRetention};
pub use position::{Catchup, LostReason, Position, StreamId};
pub use redis::{RedisBus, RedisOptions, RedisTarget};

/// One message for one user, on its way to the bus.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub user: Arc<str>,
    pub payload: Bytes,
    /// The event this message reports (a coalesced one: its latest). A bus that is shared by
    /// several consumers uses it to deliver each event to each user once.
    pub event_id: Option<Arc<str>>,
    /// `n > 0` on each of `n` consecutive messages that are all of one event's messages (none
    /// was held back by the rate limit): a bus may then guard the event once, not per user.
    /// 0 on any other message.
    pub whole_event: u32,
    /// Every event a message stands for when it stands for several (a coalesced change, a
    /// `resync`); `event_id` is then the latest of them. A bus shared by several consumers
    /// checks each of them per user.
    pub covers: Option<Arc<Covered>>,
}

/// The events one message stands for, and what to do when a user already had some of them.
pub struct Covered {
    pub event_ids: Vec<Arc<str>>,
    /// Rebuilds the message without the events in `had` (which the user already received):
    /// `None` when nothing is left. Absent for a message that is safe to receive again even
    /// if some of its events were seen (a `resync` only asks the client to refetch).
    pub without: Option<Rebuild>,
}

/// Rebuilds a message without the given events (see [`Covered::without`]).
pub type Rebuild = Box<dyn Fn(&[&str]) -> Option<Outgoing> + Send + Sync>;

impl Covered {
    /// Whether a message standing for these events must be rebuilt when a user had a part of
    /// them (it sums their changes), rather than sent as it is.
    pub fn sums_changes(&self) -> bool {
        self.without.is_some()
    }
}

impl std::fmt::Debug for Covered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Covered")
            .field("event_ids", &self.event_ids)
            .field("sums_changes", &self.sums_changes())
            .finish()
    }
}

impl PartialEq for Covered {
    fn eq(&self, other: &Self) -> bool {
        self.event_ids == other.event_ids && self.sums_changes() == other.sums_changes()
    }
}

impl Outgoing {
    pub fn new(user: Arc<str>, payload: Bytes) -> Self {
        Outgoing {
            user,
            payload,
            event_id: None,
            whole_event: 0,
            covers: None,
        }
    }

    pub fn for_event(user: Arc<str>, payload: Bytes, event_id: Option<Arc<str>>) -> Self {
        Outgoing {
            user,
            payload,
            event_id,
            whole_event: 0,
            covers: None,
        }
    }

    /// Marks `messages` as all of one event's messages.
    pub fn mark_whole_event(messages: &mut [Outgoing]) {
        let n = u32::try_from(messages.len()).unwrap_or(0);
        for m in messages {
            m.whole_event = n;
        }
    }

    /// The length of the whole-event run that starts at `messages[0]`, if it is one: `n`
    /// messages of the same event, each marked `n`. Anything else (a run cut short, mixed
    /// events) is not whole.
    pub fn whole_run(messages: &[Outgoing]) -> Option<usize> {
        let first = messages.first()?;
        let n = first.whole_event as usize;
        let event = first.event_id.as_ref()?;
        let run = messages.get(..n)?;
        (n > 0
            && run
                .iter()
                .all(|m| m.whole_event == first.whole_event && m.event_id.as_ref() == Some(event)))
        .then_some(n)
    }
}

/// A message delivered to a subscribed user, with its position in the user's history.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub user: Arc<str>,
    /// `<epoch>:<id>`.
    pub id: Arc<str>,
    pub payload: Bytes,
}

/// Payloads at least this long reach [`DeliverySink::deliver_all`] in buffers of their own;
/// shorter ones may be slices of a buffer the bus reads into (see there).
pub const OWN_BUFFER_FROM: usize = 2048;

/// A payload from [`DeliverySink::deliver_all`] that may be kept past the call: a short one is
/// copied (it may be a slice of the bus's read buffer), a long one is already its own buffer.
pub fn keepable(payload: &Bytes) -> Bytes {
    if payload.len() < OWN_BUFFER_FROM {
        Bytes::copy_from_slice(payload)
    } else {
        payload.clone()
    }
}

/// Where a bus hands deliveries: called on the bus's own task, so it must never block.
/// Returns false if the delivery was dropped (a full or closed receiver).
pub trait DeliverySink: FeedEvents + Send + Sync + 'static {
    fn deliver(&self, delivery: Delivery) -> bool;

    /// A user's messages decoded together from the bus's own buffers (one channel message), in
    /// order. The hub overrides it: it looks the user up and locks each of their queues once for
    /// all of them, and never allocates the borrowed names.
    ///
    /// A payload shorter than [`OWN_BUFFER_FROM`] may be a slice of the Redis subscriber's read
    /// buffer (copying every push cost the gateway a copy and an allocation per message): a
    /// sink that keeps one past the call keeps a copy, or the slice would pin the whole buffer.
    fn deliver_all(&self, user: &str, messages: &[(&str, Bytes)]) -> bool {
        messages.iter().fold(true, |ok, (id, payload)| {
            self.deliver(Delivery {
                user: Arc::from(user),
                id: Arc::from(*id),
                payload: keepable(payload),
            }) && ok
        })
    }
}

/// What a bus tells its sink about the live feed itself (not about one message).
pub trait FeedEvents {
    /// The live feed of `user` (every user: `None`) stopped: what is published until
    /// [`FeedEvents::feed_restored`] may never arrive live.
    fn feed_gap(&self, _user: Option<&str>) {}
    /// The live feed is back (resubscribed): whatever was missed is in the history.
    fn feed_restored(&self, _user: Option<&str>) {}
    /// A message on an operator channel this bus subscribed ([`Bus::operator_subscribe`]).
    fn operator_message(&self, _channel: &str, _payload: &[u8]) {}
}

impl FeedEvents for tokio::sync::mpsc::Sender<Delivery> {}

impl DeliverySink for tokio::sync::mpsc::Sender<Delivery> {
    fn deliver(&self, delivery: Delivery) -> bool {
        self.try_send(delivery).is_ok()
    }
}

/// A sink bound after the bus is built: the gateway's hub needs the bus (to subscribe) before it
/// can receive from it. Holds the target weakly, so neither keeps the other alive.
#[derive(Default)]
pub struct LateSink {
    target: std::sync::OnceLock<std::sync::Weak<dyn DeliverySink>>,
}

impl LateSink {
    pub fn bind(&self, target: &Arc<dyn DeliverySink>) {
        let _ = self.target.set(Arc::downgrade(target));
    }
}

impl FeedEvents for LateSink {
    fn feed_gap(&self, user: Option<&str>) {
        if let Some(target) = self.target.get().and_then(std::sync::Weak::upgrade) {
            target.feed_gap(user);
        }
    }

    fn feed_restored(&self, user: Option<&str>) {
        if let Some(target) = self.target.get().and_then(std::sync::Weak::upgrade) {
            target.feed_restored(user);
        }
    }

    fn operator_message(&self, channel: &str, payload: &[u8]) {
        if let Some(target) = self.target.get().and_then(std::sync::Weak::upgrade) {
            target.operator_message(channel, payload);
        }
    }
}

impl DeliverySink for LateSink {
    fn deliver(&self, delivery: Delivery) -> bool {
        match self.target.get().and_then(std::sync::Weak::upgrade) {
            Some(target) => target.deliver(delivery),
            None => false,
        }
    }

    fn deliver_all(&self, user: &str, messages: &[(&str, Bytes)]) -> bool {
        match self.target.get().and_then(std::sync::Weak::upgrade) {
            Some(target) => target.deliver_all(user, messages),
            None => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus closed")]
    Closed,
    #[error("bus unavailable: {0}")]
    Unavailable(String),
}

/// How an owed notice is stored (Redis hash value, memory): `<u|d> <deadline ms> <payload>`.
pub fn encode_owed(notice: &OwedNotice, retention: Duration) -> Vec<u8> {
    let deadline = notice
        .published_ms
        .saturating_add(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
    let mode = if notice.per_device { 'd' } else { 'u' };
    let mut out = format!("{mode} {deadline} ").into_bytes();
    out.extend_from_slice(&notice.payload);
    out
}

/// The parts of [`encode_owed`]: per device, the deadline (ms), the payload.
pub fn decode_owed(stored: &[u8]) -> Option<(bool, i64, Bytes)> {
    let text = std::str::from_utf8(stored).ok()?;
    let (mode, rest) = text.split_once(' ')?;
    let (deadline, payload) = rest.split_once(' ')?;
    Some((
        mode == "d",
        deadline.parse().ok()?,
        Bytes::copy_from_slice(payload.as_bytes()),
    ))
}

/// The member of a user's acknowledgement set that says `device` acknowledged `id` (per
/// device), or that the user did (`None`).
pub fn ack_member(id: &str, device: Option<&str>) -> String {
    match device {
        Some(d) => format!("{id}\n{d}"),
        None => id.to_owned(),
    }
}

/// A notification kept until acknowledged: its message, and who must acknowledge it.
#[derive(Debug, Clone)]
pub struct OwedNotice {
    pub id: Arc<str>,
    pub payload: Bytes,
    /// Every device must acknowledge it (`ack: "device"`), or any one (`ack: "user"`).
    pub per_device: bool,
    /// Milliseconds since the Unix epoch: it is forgotten `retention` after.
    pub published_ms: i64,
}

#[async_trait]
pub trait Bus: Send + Sync {
    /// Publishes a batch; returns once the bus has accepted every message of it.
    async fn publish(&self, batch: &[Outgoing]) -> Result<(), BusError>;
    /// Starts delivering `user`'s messages.
    async fn subscribe(&self, user: &Arc<str>) -> Result<(), BusError>;
    /// Stops delivering `user`'s messages.
    async fn unsubscribe(&self, user: &Arc<str>) -> Result<(), BusError>;
    /// `user`'s current position (giving the history an epoch if it has none yet) and, with
    /// `since`, every message after it: all of them, in order, or none and why
    /// ([`position::decide`]). At most `limit` are replayed; more is `over-limit`.
    async fn catch_up(
        &self,
        user: &Arc<str>,
        since: Option<&Position>,
        limit: usize,
    ) -> Result<Catchup, BusError>;
    /// Whether the bus is reachable now (`/readyz`).
    fn is_connected(&self) -> bool {
        true
    }

    /// Records `value` under `key` for `ttl` unless something is recorded there already:
    /// `None` when this call recorded it, else what was recorded first. Makes an operator's
    /// request idempotent across gateways (an idempotency key).
    async fn record_once(
        &self,
        _key: &str,
        _value: &str,
        _ttl: Duration,
    ) -> Result<Option<String>, BusError> {
        Err(BusError::Unavailable("this bus keeps no records".into()))
    }

    /// Keeps a notification that must be acknowledged (`ack` "user" or "device") for each of
    /// `users`, outside the trimmed history, for `retention`.
    async fn owe(
        &self,
        _users: &[Arc<str>],
        _notice: &OwedNotice,
        _retention: Duration,
    ) -> Result<(), BusError> {
        Err(BusError::Unavailable("this bus keeps no notices".into()))
    }

    /// The notifications `user`'s `device` still owes an acknowledgement for, oldest first.
    async fn owed(&self, _user: &str, _device: &str) -> Result<Vec<Bytes>, BusError> {
        Ok(Vec::new())
    }

    /// `device` of `user` acknowledges `notification_id`: `false` when the user owes no such
    /// notification (another user's, an unknown id, an expired one).
    async fn acknowledge(
        &self,
        _user: &str,
        _device: &str,
        _notification_id: &str,
    ) -> Result<bool, BusError> {
        Ok(false)
    }

    /// (user, notification) pairs still owed, over every notification that asks for an
    /// acknowledgement and has not expired at `now_ms`: a per-user notice leaves the count when
    /// any device of its user acknowledges it, a per-device one when it expires.
    async fn pending_notices(&self, _now_ms: i64) -> Result<u64, BusError> {
        Ok(0)
    }

    /// `device` of `user` connects: its record, seen now (kept `ttl` past its last visit).
    async fn device_seen(
        &self,
        _user: &str,
        _device: &str,
        _ttl: Duration,
    ) -> Result<devices::DeviceRecord, BusError> {
        Err(BusError::Unavailable("this bus keeps no devices".into()))
    }

    /// `device` of `user` acknowledges `position` (cumulative): whether it moved forward.
    async fn device_acked(
        &self,
        _user: &str,
        _device: &str,
        _position: &str,
        _ttl: Duration,
    ) -> Result<bool, BusError> {
        Err(BusError::Unavailable("this bus keeps no devices".into()))
    }

    /// `user`'s devices seen within `ttl`, by name.
    async fn devices(
        &self,
        _user: &str,
        _ttl: Duration,
    ) -> Result<Vec<(String, devices::DeviceRecord)>, BusError> {
        Ok(Vec::new())
    }

    /// Forgets `device` of `user` (its acknowledged position); false when unknown.
    async fn forget_device(&self, _user: &str, _device: &str) -> Result<bool, BusError> {
        Ok(false)
    }

    /// Stores (or replaces) scheduled item `id` (JSON) and adds its due `(member, ms)` entries.
    async fn schedule(
        &self,
        _id: &str,
        _json: &str,
        _due: &[(String, i64)],
    ) -> Result<(), BusError> {
        Err(BusError::Unavailable("this bus keeps no schedule".into()))
    }

    /// Every scheduled item (JSON).
    async fn scheduled(&self) -> Result<Vec<String>, BusError> {
        Ok(Vec::new())
    }

    /// Removes and returns up to `limit` due members (due at or before `now_ms`): each is
    /// returned to one caller only, whichever process asks.
    async fn claim_due(&self, _now_ms: i64, _limit: usize) -> Result<Vec<String>, BusError> {
        Ok(Vec::new())
    }

    /// Removes scheduled item `id` and everything of it still due (members `<id>|…`); false
    /// when unknown.
    async fn unschedule(&self, _id: &str) -> Result<bool, BusError> {
        Ok(false)
    }

    /// Advertises gateway `id` (JSON, see `gateway::discovery`) until `until_ms` (epoch ms),
    /// replacing its previous advertisement.
    async fn advertise_gateway(
        &self,
        _id: &str,
        _json: &str,
        _until_ms: i64,
    ) -> Result<(), BusError> {
        Ok(())
    }

    /// The advertisements still valid at `now_ms` (JSON); expired ones are dropped.
    async fn gateways(&self, _now_ms: i64) -> Result<Vec<String>, BusError> {
        Ok(Vec::new())
    }

    /// Withdraws gateway `id`'s advertisement (a gateway that drains).
    async fn withdraw_gateway(&self, _id: &str) -> Result<(), BusError> {
        Ok(())
    }

    /// Publishes `payload` on operator channel `channel` (the dashboard's, `crate::dashboard`).
    async fn operator_publish(&self, _channel: &str, _payload: &str) -> Result<(), BusError> {
        Ok(())
    }

    /// Starts (`on`) or stops handing operator channel `channel`'s messages to the sink
    /// ([`FeedEvents::operator_message`]).
    async fn operator_subscribe(&self, _channel: &str, _on: bool) -> Result<(), BusError> {
        Ok(())
    }

    /// Records that gateway `gateway` shows a dashboard until `until_ms` (`None`: no longer),
    /// and answers whether any gateway shows one at `now_ms`.
    async fn dashboard_watch(
        &self,
        _gateway: &str,
        _until_ms: Option<i64>,
        _now_ms: i64,
    ) -> Result<bool, BusError> {
        Ok(false)
    }

    /// Whether any gateway shows a dashboard at `now_ms`, and the space chosen on one (whose
    /// events the consumers then report).
    async fn dashboard_state(&self, _now_ms: i64) -> Result<(bool, Option<String>), BusError> {
        Ok((false, None))
    }

    /// Chooses the space whose events the consumers report (`None`: none), for `ttl`.
    async fn dashboard_choose_space(
        &self,
        _space: Option<&str>,
        _ttl: Duration,
    ) -> Result<(), BusError> {
        Ok(())
    }

    /// Each of `users`' stored preferences (JSON, see `preferences.rs`), in order: `None` for
    /// a user who stored none.
    async fn preferences(&self, users: &[Arc<str>]) -> Result<Vec<Option<String>>, BusError> {
        Ok(vec![None; users.len()])
    }

    /// Stores `user`'s preferences (JSON), or forgets them (`None`).
    async fn set_preferences(&self, _user: &str, _json: Option<&str>) -> Result<(), BusError> {
        Err(BusError::Unavailable(
            "this bus keeps no preferences".into(),
        ))
    }

    /// Replaces what `key` records (`Some`), or forgets it (`None`).
    async fn rerecord(
        &self,
        _key: &str,
        _value: Option<&str>,
        _ttl: Duration,
    ) -> Result<(), BusError> {
        Err(BusError::Unavailable("this bus keeps no records".into()))
    }
}
