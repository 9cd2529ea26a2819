//! Users → their live connections, and the dispatcher that feeds them from the bus.
//!
//! A user's bus subscription exists while at least one of their connections is open on this
//! gateway: the first connection subscribes, the last one to leave unsubscribes. Those changes
//! are serialised by one async lock so a quick reconnect can never end unsubscribed. The bus
//! hands deliveries straight to the hub (no channel, no extra task hop), and the hub never waits
//! on a client: a full queue evicts that session instead. Sessions are woken once per batch of
//! arrivals, not per message (`wakeups.rs`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;

use super::protocol::{Route, message_type_of, server_frame};
use super::session::{Frame, Push, SessionQueue};
use super::wakeups::Wakeups;
use crate::bus::{Bus, BusError, Delivery, DeliverySink};

/// Gateway counters, served at `/api/stats`.
#[derive(Default, Debug)]
pub struct GatewayStats {
    pub connections: AtomicU64,
    pub connections_total: AtomicU64,
    pub delivered: AtomicU64,
    pub evicted: AtomicU64,
    pub auth_failures: AtomicU64,
}

pub struct Hub {
    sessions: Mutex<HashMap<Arc<str>, Vec<Arc<SessionQueue>>>>,
    subscription_order: tokio::sync::Mutex<()>,
    bus: Arc<dyn Bus>,
    queue_capacity: usize,
    wakeups: Arc<Wakeups>,
    pub stats: GatewayStats,
}

/// A connection's place in the hub; dropping it unregisters the connection.
pub struct Registration {
    hub: Arc<Hub>,
    user: Arc<str>,
    pub queue: Arc<SessionQueue>,
}

impl Hub {
    pub fn new(bus: Arc<dyn Bus>, queue_capacity: usize) -> Arc<Self> {
        Arc::new(Hub {
            sessions: Mutex::new(HashMap::new()),
            subscription_order: tokio::sync::Mutex::new(()),
            bus,
            queue_capacity,
            wakeups: Wakeups::start(),
            stats: GatewayStats::default(),
        })
    }

    /// Whether the bus is reachable (`/readyz`).
    pub fn bus_connected(&self) -> bool {
        self.bus.is_connected()
    }

    /// Connected users.
    pub fn users(&self) -> usize {
        self.sessions.lock().map(|s| s.len()).unwrap_or(0)
    }

    pub async fn register(self: &Arc<Self>, user: Arc<str>) -> Result<Registration, BusError> {
        let queue = Arc::new(SessionQueue::new(self.queue_capacity));
        let _order = self.subscription_order.lock().await;
        let first = {
            let mut sessions = self.sessions.lock().map_err(|_| BusError::Closed)?;
            let list = sessions.entry(user.clone()).or_default();
            list.push(queue.clone());
            list.len() == 1
        };
        if first && let Err(e) = self.bus.subscribe(&user).await {
            self.remove(&user, &queue);
            return Err(e);
        }
        self.stats.connections.fetch_add(1, Relaxed);
        self.stats.connections_total.fetch_add(1, Relaxed);
        Ok(Registration {
            hub: self.clone(),
            user,
            queue,
        })
    }

    /// Removes `queue`; true if it was the user's last connection.
    fn remove(&self, user: &Arc<str>, queue: &Arc<SessionQueue>) -> bool {
        let Ok(mut sessions) = self.sessions.lock() else {
            return false;
        };
        let Some(list) = sessions.get_mut(user) else {
            return false;
        };
        list.retain(|q| !Arc::ptr_eq(q, queue));
        if list.is_empty() {
            sessions.remove(user);
            return true;
        }
        false
    }

    async fn unregister(&self, user: Arc<str>, queue: Arc<SessionQueue>) {
        let _order = self.subscription_order.lock().await;
        self.stats.connections.fetch_sub(1, Relaxed);
        if self.remove(&user, &queue)
            && let Err(e) = self.bus.unsubscribe(&user).await
        {
            tracing::warn!(error = %e, "unsubscribe failed");
        }
    }

    /// Queues `messages` (a user's, in order) on every connection of the user: one lookup,
    /// and one lock per connection, for all of them.
    fn deliver_to_sessions(&self, user: &str, messages: &[(&str, Bytes)]) {
        let frames: Vec<Arc<Frame>> = messages
            .iter()
            .map(|(id, payload)| frame_of(id, payload.clone()))
            .collect();
        let Ok(sessions) = self.sessions.lock() else {
            return;
        };
        for queue in sessions.get(user).into_iter().flatten() {
            match queue.push_all_deferred(&frames, &self.wakeups) {
                Push::Queued => self.stats.delivered.fetch_add(frames.len() as u64, Relaxed),
                Push::Evicted => self.stats.evicted.fetch_add(1, Relaxed),
                Push::Gone => 0,
            };
        }
    }
}

/// The frame every connection of the user is sent, built once.
fn frame_of(id: &str, payload: Bytes) -> Arc<Frame> {
    // Only the type is needed for every delivery; a resync (rare) also needs its space.
    let message_type = intern_type(message_type_of(&payload).unwrap_or_default());
    let resync = (message_type == "resync").then(|| Route::of_payload(&payload));
    let text = server_frame(id, &payload, resync.as_ref().map(|r| r.space_id.as_str()));
    Arc::new(Frame::new(
        Arc::from(id),
        message_type,
        payload,
        Utf8Bytes::from(text),
        resync,
    ))
}

/// The bus calls this on its own task (the Redis push callback, or the in-process publisher):
/// it only queues frames, never waits on a client.
impl DeliverySink for Hub {
    fn deliver(&self, delivery: Delivery) -> bool {
        self.deliver_to_sessions(&delivery.user, &[(&delivery.id, delivery.payload)]);
        true
    }

    fn deliver_parts(&self, user: &str, id: &str, payload: Bytes) -> bool {
        self.deliver_to_sessions(user, &[(id, payload)]);
        true
    }

    fn deliver_all(&self, user: &str, messages: &[(&str, Bytes)]) -> bool {
        self.deliver_to_sessions(user, messages);
        true
    }
}

/// The message types foldercast sends, as `'static` strings: no allocation per delivery.
fn intern_type(t: &str) -> Cow<'static, str> {
    const KNOWN: [&str; 12] = [
        "file-uploaded",
        "file-touched",
        "folder-created",
        "item-trashed",
        "item-restored",
        "item-moved",
        "space-member-added",
        "space-member-removed",
        "coalesced",
        "resync",
        "notice",
        "event",
    ];
    match KNOWN.iter().find(|k| **k == t) {
        Some(k) => Cow::Borrowed(k),
        None => Cow::Owned(t.to_owned()),
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.wakeups.close();
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let hub = self.hub.clone();
        let user = self.user.clone();
        let queue = self.queue.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move { hub.unregister(user, queue).await });
            }
            Err(_) => {
                hub.remove(&user, &queue);
            }
        }
    }
}
