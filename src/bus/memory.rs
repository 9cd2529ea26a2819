//! The in-process bus of the embedded default: the same contract as Redis, within one process.
//!
//! Each user has a bounded history (by length and age) with ids from a per-user counter, and an
//! epoch of its own per process start: a client that resumes across a restart of `run` is told
//! `unknown-epoch` rather than served ids of another lifetime.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::Instant;

use super::position::{self, Catchup, HistoryView, Position, StreamId};
use super::{Bus, BusError, Delivery, DeliverySink, Outgoing};

/// How much history the in-process bus keeps per user.
#[derive(Debug, Clone, Copy)]
pub struct MemoryRetention {
    pub max_len: usize,
    pub max_age: Duration,
}

impl Default for MemoryRetention {
    fn default() -> Self {
        MemoryRetention {
            max_len: 1000,
            max_age: Duration::from_secs(24 * 3600),
        }
    }
}

pub struct MemoryBus {
    state: Mutex<State>,
    deliveries: Arc<dyn DeliverySink>,
    retention: MemoryRetention,
    /// The random part of every epoch of this process.
    epoch_base: String,
}

#[derive(Default)]
struct State {
    subscribed: HashSet<Arc<str>>,
    histories: HashMap<Arc<str>, History>,
    /// What `record_once` recorded, until when.
    records: HashMap<String, (String, Instant)>,
    /// Per user: preferences (JSON).
    preferences: HashMap<Arc<str>, String>,
    /// Operator channels subscribed, gateways showing a dashboard (until, ms) and the space
    /// chosen on one (until when).
    operator_channels: HashSet<String>,
    dashboard_watching: HashMap<String, i64>,
    dashboard_space: Option<(String, Instant)>,
    /// Per user: notices owed, and the acknowledgements.
    owed: HashMap<Arc<str>, Owed>,
    /// Per user: devices by name.
    devices: HashMap<Arc<str>, HashMap<String, super::devices::DeviceRecord>>,
    /// Scheduled items (JSON) by id, and their due members.
    schedule: HashMap<String, String>,
    due: Vec<(i64, String)>,
    /// Gateway advertisements: id → (valid until, JSON).
    gateways: HashMap<String, (i64, String)>,
}

/// One user's owed notices (id and encoded, in publish order) and acknowledgements
/// ([`super::ack_member`]).
type Owed = (Vec<(Arc<str>, Vec<u8>)>, HashSet<String>);

/// Records kept at most; expired ones go first, then (a flood of keys) the oldest.
const MAX_RECORDS: usize = 10_000;

#[derive(Default)]
struct History {
    /// Last id given; ids only grow, for every message, subscribed or not.
    top: u64,
    entries: VecDeque<(u64, Instant, Bytes)>,
    /// Whether any entry was trimmed away.
    trimmed: bool,
}

impl History {
    fn trim(&mut self, retention: MemoryRetention, now: Instant) {
        while self.entries.len() > retention.max_len
            || self
                .entries
                .front()
                .is_some_and(|(_, at, _)| now.duration_since(*at) > retention.max_age)
        {
            self.entries.pop_front();
            self.trimmed = true;
        }
    }

    fn safe_from(&self) -> StreamId {
        let id = |n| StreamId { ms: n, seq: 0 };
        match (self.trimmed, self.entries.front()) {
            (false, _) => StreamId::ZERO,
            (true, Some((first, _, _))) => id(*first),
            (true, None) => id(self.top),
        }
    }
}

/// The six hex digits that end every epoch of `user` (see [`position`]).
fn user_check(user: &str) -> String {
    let mut h = std::hash::DefaultHasher::new();
    user.hash(&mut h);
    format!("{:06x}", h.finish() & 0xff_ffff)
}

impl MemoryBus {
    /// A bus that delivers into `deliveries`, keeping the default history per user.
    pub fn new(deliveries: Arc<dyn DeliverySink>) -> Self {
        Self::with_retention(deliveries, MemoryRetention::default())
    }

    pub fn with_retention(deliveries: Arc<dyn DeliverySink>, retention: MemoryRetention) -> Self {
        MemoryBus {
            state: Mutex::new(State::default()),
            deliveries,
            retention: MemoryRetention {
                max_len: retention.max_len.max(1),
                ..retention
            },
            epoch_base: format!("{:08x}", rand::random::<u32>()),
        }
    }

    fn epoch(&self, user: &str) -> String {
        format!("{}{}", self.epoch_base, user_check(user))
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn schedule(&self, id: &str, json: &str, due: &[(String, i64)]) -> Result<(), BusError> {
        let mut state = self.state.lock().map_err(|_| BusError::Closed)?;
        state.schedule.insert(id.to_owned(), json.to_owned());
        state
            .due
            .extend(due.iter().map(|(member, ms)| (*ms, member.clone())));
        Ok(())
    }

    async fn advertise_gateway(&self, id: &str, json: &str, until_ms: i64) -> Result<(), BusError> {
        let mut state = self.state.lock().map_err(|_| BusError::Closed)?;
        state
            .gateways
            .insert(id.to_owned(), (until_ms, json.to_owned()));
        Ok(())
    }

    async fn gateways(&self, now_ms: i64) -> Result<Vec<String>, BusError> {
        let mut state = self.state.lock().map_err(|_| BusError::Closed)?;
        state.gateways.retain(|_, (until, _)| *until > now_ms);
        Ok(state.gateways.values().map(|(_, j)| j.clone()).collect())
    }

    async fn withdraw_gateway(&self, id: &str) -> Result<(), BusError> {
        let mut state = self.state.lock().map_err(|_| BusError::Closed)?;
        state.gateways.remove(id);
        Ok(())
    }

    async fn scheduled(&self) -> Result<Vec<String>, BusError> {
        let state = self.state.lock().map_err(|_| BusError::Closed)?;
        Ok(state.schedule.values().cloned().collect())
    }

    async fn claim_due(&self, now_ms: i64, limit: usize) -> Result<Vec<String>, BusError> {
        let mut state = self.state.lock().map_err(|_| BusError::Closed)?;
        state.due.sort();
        let n = state
            .due
            .iter()
            .take(limit)
            .take_while(|(ms, _)| *ms <= now_ms)
            .count();
        Ok(state.due.drain(..n).map(|(_, m)| m).collect())
    }

    async fn unschedule(&self, id: &str) -> Result<bool, BusError> {
        let mut state = self.state.lock().map_err(|_| BusError::Closed)?;
        let prefix = format!("{id}|");
        state.due.retain(|(_, m)| !m.starts_with(&prefix));
        Ok(state.schedule.remove(id).is_some())
    }

    async fn device_seen(
        &self,
        user: &str,
        device: &str,
        ttl: Duration,
    ) -> Result<super::devices::DeviceRecord, BusError> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut state = self.state.lock().map_err(|_| BusError::Closed)?;
        let devices = state.devices.entry(Arc::from(user)).or_default();
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        devices.retain(|_, d| now_ms.saturating_sub(d.last_seen_ms) < ttl_ms);
        let stored = devices.get(device).map(|d| d.encode());
        if stored.is_none()
            && devices.len() >= super::devices::MAX_DEVICES
            && let Some(oldest) = super::devices::least_recent(devices.iter())
        {
            devices.remove(&oldest);
        }
        let record = super::devices::DeviceRecord::seen(stored.as_deref(), now_ms);
        devices.insert(device.to_owned(), record.clone());
        Ok(record)
    }

    async fn device_acked(
        &self,
        user: &str,
        device: &str,
        position: &str,
        _ttl: Duration,
    ) -> Result<bool, BusError> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut state = self.state.lock().map_err(|_| BusError::Closed)?;
        let devices = state.devices.entry(Arc::from(user)).or_default();
        let record = devices
            .entry(device.to_owned())
            .or_insert_with(|| super::devices::DeviceRecord::seen(None, now_ms));
        Ok(record.acknowledge(position))
    }

    async fn devices(
        &self,
        user: &str,
        ttl: Duration,
    ) -> Result<Vec<(String, super::devices::DeviceRecord)>, BusError> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let state = self.state.lock().map_err(|_| BusError::Closed)?;
        let mut out: Vec<(String, super::devices::DeviceRecord)> = state
            .devices
            .get(user)
            .map(|d| {
                d.iter()
                    .filter(|(_, r)| now_ms.saturating_sub(r.last_seen_ms) < ttl_ms)
                    .map(|(n, r)| (n.clone(), r.clone()))
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn forget_device(&self, user: &str, device: &str) -> Result<bool, BusError> {
        let mut state = self.state.lock().map_err(|_| BusError::Closed)?;
        Ok(state
            .devices
            .get_mut(user)
            .is_some_and(|d| d.remove(device).is_some()))
    }

    async fn owe(
        &self,
        users: &[Arc<str>],
        notice: &super::OwedNotice,
        retention: Duration,
    ) -> Result<(), BusError> {
        let encoded = super::encode_owed(notice, retention);
        let mut state = self.state.lock().map_err(|_| BusError::Closed)?;
        for user in users {
            let (notices, _) = state.owed.entry(user.clone()).or_default();
            notices.retain(|(id, _)| *id != notice.id);
            notices.push((notice.id.clone(), encoded.clone()));
        }
        Ok(())
    }

    async fn owed(&self, user: &str, device: &str) -> Result<Vec<Bytes>, BusError> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut state = self.state.lock().map_err(|_| BusError::Closed)?;
        let Some((notices, acked)) = state.owed.get_mut(user) else {
            return Ok(Vec::new());
        };
        notices.retain(|(_, stored)| {
            super::decode_owed(stored).is_some_and(|(_, deadline, _)| deadline > now_ms)
        });
        Ok(notices
            .iter()
            .filter_map(|(id, stored)| {
                let (per_device, _, payload) = super::decode_owed(stored)?;
                let member = super::ack_member(id, per_device.then_some(device));
                (!acked.contains(&member)).then_some(payload)
            })
            .collect())
    }

    async fn pending_notices(&self, now_ms: i64) -> Result<u64, BusError> {
        let state = self.state.lock().map_err(|_| BusError::Closed)?;
        Ok(state
            .owed
            .values()
            .flat_map(|(notices, _)| notices.iter())
            .filter(|(_, stored)| {
                super::decode_owed(stored).is_some_and(|(_, deadline, _)| deadline > now_ms)
            })
            .count() as u64)
    }

    async fn acknowledge(
        &self,
        user: &str,
        device: &str,
        notification_id: &str,
    ) -> Result<bool, BusError> {
        let mut state = self.state.lock().map_err(|_| BusError::Closed)?;
        let Some((notices, acked)) = state.owed.get_mut(user) else {
            return Ok(false);
        };
        let Some(per_device) = notices
            .iter()
            .find(|(id, _)| &**id == notification_id)
            .and_then(|(_, stored)| super::decode_owed(stored))
            .map(|(per_device, _, _)| per_device)
        else {
            // Acknowledged before (by any device, for a per-user notice): idempotent.
            return Ok(acked.contains(&super::ack_member(notification_id, None)));
        };
        acked.insert(super::ack_member(
            notification_id,
            per_device.then_some(device),
        ));
        if !per_device {
            notices.retain(|(id, _)| &**id != notification_id);
        }
        Ok(true)
    }

    async fn record_once(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<Option<String>, BusError> {
        let mut state = self.state.lock().map_err(|_| BusError::Closed)?;
        let now = Instant::now();
        if let Some((earlier, until)) = state.records.get(key)
            && *until > now
        {
            return Ok(Some(earlier.clone()));
        }
        if state.records.len() >= MAX_RECORDS {
            state.records.retain(|_, (_, until)| *until > now);
            if state.records.len() >= MAX_RECORDS
                && let Some(oldest) = state
                    .records
                    .iter()
                    .min_by_key(|(_, (_, until))| *until)
                    .map(|(k, _)| k.clone())
            {
                state.records.remove(&oldest);
            }
        }
        state
            .records
            .insert(key.to_owned(), (value.to_owned(), now + ttl));
        Ok(None)
    }

    async fn operator_publish(&self, channel: &str, payload: &str) -> Result<(), BusError> {
        let subscribed = self
            .state
            .lock()
            .map_err(|_| BusError::Closed)?
            .operator_channels
            .contains(channel);
        if subscribed {
            self.deliveries
                .operator_message(channel, payload.as_bytes());
        }
        Ok(())
    }

    async fn operator_subscribe(&self, channel: &str, on: bool) -> Result<(), BusError> {
        let mut state = self.state.lock().map_err(|_| BusError::Closed)?;
        if on {
            state.operator_channels.insert(channel.to_owned());
        } else {
            state.operator_channels.remove(channel);
        }
        Ok(())
    }

    async fn dashboard_watch(
        &self,
        gateway: &str,
        until_ms: Option<i64>,
        now_ms: i64,
    ) -> Result<bool, BusError> {
        {
            let mut state = self.state.lock().map_err(|_| BusError::Closed)?;
            match until_ms {
                Some(until) => {
                    state.dashboard_watching.insert(gateway.to_owned(), until);
                }
                None => {
                    state.dashboard_watching.remove(gateway);
                }
            }
        }
        Ok(self.dashboard_state(now_ms).await?.0)
    }

    async fn dashboard_state(&self, now_ms: i64) -> Result<(bool, Option<String>), BusError> {
        let mut state = self.state.lock().map_err(|_| BusError::Closed)?;
        state.dashboard_watching.retain(|_, until| *until > now_ms);
        let space = state
            .dashboard_space
            .as_ref()
            .filter(|(_, until)| *until > Instant::now())
            .map(|(s, _)| s.clone());
        Ok((!state.dashboard_watching.is_empty(), space))
    }

    async fn dashboard_choose_space(
        &self,
        space: Option<&str>,
        ttl: Duration,
    ) -> Result<(), BusError> {
        let mut state = self.state.lock().map_err(|_| BusError::Closed)?;
        state.dashboard_space = space.map(|s| (s.to_owned(), Instant::now() + ttl));
        Ok(())
    }

    async fn preferences(&self, users: &[Arc<str>]) -> Result<Vec<Option<String>>, BusError> {
        let state = self.state.lock().map_err(|_| BusError::Closed)?;
        Ok(users
            .iter()
            .map(|u| state.preferences.get(u).cloned())
            .collect())
    }

    async fn set_preferences(&self, user: &str, json: Option<&str>) -> Result<(), BusError> {
        let mut state = self.state.lock().map_err(|_| BusError::Closed)?;
        match json {
            Some(json) => {
                if !state.preferences.contains_key(user) && state.preferences.len() >= MAX_RECORDS {
                    return Err(BusError::Unavailable(
                        "the in-process bus keeps no more users' preferences".into(),
                    ));
                }
                state.preferences.insert(Arc::from(user), json.to_owned());
            }
            None => {
                state.preferences.remove(user);
            }
        }
        Ok(())
    }

    async fn rerecord(
        &self,
        key: &str,
        value: Option<&str>,
        ttl: Duration,
    ) -> Result<(), BusError> {
        let mut state = self.state.lock().map_err(|_| BusError::Closed)?;
        match value {
            Some(v) => {
                state
                    .records
                    .insert(key.to_owned(), (v.to_owned(), Instant::now() + ttl));
            }
            None => {
                state.records.remove(key);
            }
        }
        Ok(())
    }

    async fn publish(&self, batch: &[Outgoing]) -> Result<(), BusError> {
        let now = Instant::now();
        let ready: Vec<Delivery> = {
            let mut state = self.state.lock().map_err(|_| BusError::Closed)?;
            let mut ready = Vec::new();
            for msg in batch {
                let history = state.histories.entry(msg.user.clone()).or_default();
                history.top += 1;
                let id = history.top;
                history.entries.push_back((id, now, msg.payload.clone()));
                history.trim(self.retention, now);
                if state.subscribed.contains(&msg.user) {
                    ready.push(Delivery {
                        user: msg.user.clone(),
                        id: Arc::from(format!("{}:{id}-0", self.epoch(&msg.user))),
                        payload: msg.payload.clone(),
                    });
                }
            }
            ready
        };
        for delivery in ready {
            // The hub never blocks: a connection that cannot keep up is evicted there.
            self.deliveries.deliver(delivery);
        }
        Ok(())
    }

    async fn subscribe(&self, user: &Arc<str>) -> Result<(), BusError> {
        let mut state = self.state.lock().map_err(|_| BusError::Closed)?;
        state.subscribed.insert(user.clone());
        Ok(())
    }

    async fn unsubscribe(&self, user: &Arc<str>) -> Result<(), BusError> {
        let mut state = self.state.lock().map_err(|_| BusError::Closed)?;
        state.subscribed.remove(user);
        Ok(())
    }

    async fn catch_up(
        &self,
        user: &Arc<str>,
        since: Option<&Position>,
        limit: usize,
    ) -> Result<Catchup, BusError> {
        let mut state = self.state.lock().map_err(|_| BusError::Closed)?;
        let empty = History::default();
        let history = match state.histories.get_mut(user) {
            Some(h) => {
                h.trim(self.retention, Instant::now());
                &*h
            }
            None => &empty,
        };
        let view = HistoryView {
            epoch: Arc::from(self.epoch(user)),
            user_check: user_check(user).into(),
            top: StreamId {
                ms: history.top,
                seq: 0,
            },
            safe_from: history.safe_from(),
        };
        let Some(since) = since else {
            return Ok(Catchup::Recovered {
                entries: Vec::new(),
                top: view.top_position(),
            });
        };
        let after = history
            .entries
            .iter()
            .filter(|(id, _, _)| StreamId { ms: *id, seq: 0 } > since.id)
            .take(limit.saturating_add(1))
            .map(|(id, _, payload)| (StreamId { ms: *id, seq: 0 }, payload.clone()))
            .collect();
        Ok(position::decide(&view, since, after, limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::LostReason;

    fn ids(c: &Catchup) -> Vec<String> {
        match c {
            Catchup::Recovered { entries, .. } => entries
                .iter()
                .map(|(_, p)| String::from_utf8(p.to_vec()).unwrap())
                .collect(),
            Catchup::Lost { reason, .. } => vec![reason.as_str().to_owned()],
        }
    }

    #[tokio::test]
    async fn delivers_only_to_subscribed_users_with_increasing_positions() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let bus = MemoryBus::new(Arc::new(tx));
        let alice: Arc<str> = Arc::from("alice");
        let bob: Arc<str> = Arc::from("bob");
        bus.subscribe(&alice).await.unwrap();
        let batch = [
            Outgoing::new(alice.clone(), Bytes::from_static(b"1")),
            Outgoing::new(bob.clone(), Bytes::from_static(b"x")),
            Outgoing::new(alice.clone(), Bytes::from_static(b"2")),
        ];
        bus.publish(&batch).await.unwrap();
        let a = rx.recv().await.unwrap();
        let b = rx.recv().await.unwrap();
        let epoch = bus.epoch("alice");
        assert_eq!(
            (&*a.user, &*a.id, &a.payload[..]),
            ("alice", &*format!("{epoch}:1-0"), &b"1"[..])
        );
        assert_eq!(&*b.id, format!("{epoch}:2-0"));
        assert!(rx.try_recv().is_err(), "bob is not subscribed");
        bus.unsubscribe(&alice).await.unwrap();
        bus.publish(&batch).await.unwrap();
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn history_resumes_within_retention_and_says_why_not_outside() {
        let (tx, _rx) = tokio::sync::mpsc::channel(16);
        let retention = MemoryRetention {
            max_len: 3,
            max_age: Duration::from_secs(3600),
        };
        let bus = MemoryBus::with_retention(Arc::new(tx), retention);
        let alice: Arc<str> = Arc::from("alice");
        let start = bus.catch_up(&alice, None, 10).await.unwrap();
        let start = Position::parse(start.top()).unwrap();
        assert_eq!(start.id, StreamId::ZERO, "a user with no history is at 0");
        for n in 1..=3 {
            let m = Outgoing::new(alice.clone(), Bytes::from(n.to_string()));
            bus.publish(&[m]).await.unwrap();
        }
        assert_eq!(
            ids(&bus.catch_up(&alice, Some(&start), 10).await.unwrap()),
            ["1", "2", "3"]
        );
        let at = |n: u64| Position {
            epoch: start.epoch.clone(),
            id: StreamId { ms: n, seq: 0 },
        };
        assert_eq!(
            ids(&bus.catch_up(&alice, Some(&at(1)), 10).await.unwrap()),
            ["2", "3"]
        );
        assert_eq!(
            ids(&bus.catch_up(&alice, Some(&at(1)), 1).await.unwrap()),
            ["over-limit"]
        );
        assert!(ids(&bus.catch_up(&alice, Some(&at(3)), 10).await.unwrap()).is_empty());
        assert_eq!(
            ids(&bus.catch_up(&alice, Some(&at(4)), 10).await.unwrap()),
            ["bad-position"]
        );
        // A fourth message trims the first: from 0 the gap can no longer be filled.
        bus.publish(&[Outgoing::new(alice.clone(), Bytes::from("4"))])
            .await
            .unwrap();
        assert_eq!(
            ids(&bus.catch_up(&alice, Some(&start), 10).await.unwrap()),
            ["too-old"]
        );
        assert_eq!(
            ids(&bus.catch_up(&alice, Some(&at(2)), 10).await.unwrap()),
            ["3", "4"]
        );
        // Another process start (another bus) has another epoch; bob's epoch is not alice's.
        let (tx2, _rx2) = tokio::sync::mpsc::channel(16);
        let restarted = MemoryBus::new(Arc::new(tx2));
        assert_eq!(
            restarted.catch_up(&alice, Some(&at(2)), 10).await.unwrap(),
            Catchup::Lost {
                reason: LostReason::UnknownEpoch,
                top: format!("{}:0-0", restarted.epoch("alice")),
            }
        );
        let bob: Arc<str> = Arc::from("bob");
        assert_eq!(
            ids(&bus.catch_up(&bob, Some(&at(2)), 10).await.unwrap()),
            ["bad-position"]
        );
    }
}
