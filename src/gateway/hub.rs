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
use bytes::{Bytes, BytesMut};

use super::protocol::{Route, message_type_of, put_server_frame, server_frame_len, text_of};
use super::session::{Frame, PREBUILT_TEXT_MAX, Push, SessionQueue, SessionWakeups, SharedFrame};
use crate::bus::{Bus, BusError, Delivery, DeliverySink, FeedEvents};

/// Users whose subscriptions may change at the same time (more share a stripe, and wait).
const SUBSCRIPTION_STRIPES: usize = 256;

/// Gateway counters, served at `/api/stats`.
#[derive(Default, Debug)]
pub struct GatewayStats {
    pub connections: AtomicU64,
    /// Of `connections`, the SSE streams (the rest are WebSockets).
    pub sse_connections: AtomicU64,
    pub connections_total: AtomicU64,
    pub delivered: AtomicU64,
    pub evicted: AtomicU64,
    pub auth_failures: AtomicU64,
    /// Connections refused because their user had `--max-connections-per-user` open.
    pub refused_per_user: AtomicU64,
    /// Resumes (from a client's position, or after a gap in the live feed) by outcome:
    /// `recovered`, or why not (`unknown-epoch`, `too-old`, `over-limit`, `bad-position`).
    pub resumes: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// Refused credentials by code (`invalid-token`, `token-expired`, `auth-timeout`, …).
    pub auth_failures_by_code: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// (user, notification) pairs still owed an acknowledgement, across the bus (asked every
    /// [`crate::gateway::notices::PENDING_EVERY`]); -1 until known.
    pub notices_pending: std::sync::atomic::AtomicI64,
    /// Connections the server closed, by the reason it gave (`slow-consumer`, `ping-timeout`,
    /// `rate-limited`, `token-expired`, `shutting-down`, …).
    pub closes: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl GatewayStats {
    pub fn count_auth_failure(&self, code: &'static str) {
        self.auth_failures.fetch_add(1, Relaxed);
        if let Ok(mut m) = self.auth_failures_by_code.lock() {
            *m.entry(code).or_default() += 1;
        }
    }

    pub fn count_close(&self, reason: &str) {
        if let Ok(mut m) = self.closes.lock() {
            match m.get_mut(reason) {
                Some(n) => *n += 1,
                None => {
                    m.insert(reason.to_owned(), 1);
                }
            }
        }
    }

    pub fn count_resume(&self, outcome: &'static str) {
        if let Ok(mut m) = self.resumes.lock() {
            *m.entry(outcome).or_default() += 1;
        }
    }
}

pub struct Hub {
    /// Looked up once per delivered batch: keyed with foldhash, not SipHash (see Cargo.toml).
    sessions: Mutex<foldhash::HashMap<Arc<str>, Vec<Arc<SessionQueue>>>>,
    /// Where the live feed is down (every user, or some): a session that starts meanwhile is
    /// held too, since its history read may predate what the gap loses. Only touched with
    /// `sessions` locked first.
    feed_down: Mutex<FeedDown>,
    draining: std::sync::atomic::AtomicBool,
    /// Serialises a user's subscribe and unsubscribe, so a quick reconnect can never end
    /// unsubscribed. Striped by user rather than one lock: one lock made every connection wait
    /// for every other user's subscription round trip, and 10,000 clients reconnecting at once
    /// took 2 s to subscribe in turn (`bench storm`).
    subscription_order: Box<[tokio::sync::Mutex<()>]>,
    stripe_hasher: std::hash::RandomState,
    bus: Arc<dyn Bus>,
    queue_capacity: usize,
    /// Bytes queued per connection at most (`--send-queue-bytes`).
    queue_bytes: usize,
    /// Open connections per user at most (`--max-connections-per-user`).
    max_per_user: usize,
    wakeups: Arc<SessionWakeups>,
    pub stats: GatewayStats,
    /// What the dashboard is told (`gateway::dashboard`), only while one is open.
    pub reports: ConnectionReports,
    /// The spaces each connection with watches watches (by its queue's address), for the
    /// dashboard's per-space counts. Kept here rather than in every session queue: a field
    /// there moved each queue to the next allocator size class (`bench idle`).
    watching: Mutex<HashMap<usize, Box<[Arc<str>]>>>,
}

/// Connection opens and closes for the dashboard, and the operator channels' messages.
///
/// While no dashboard is open anywhere, a connection costs this one atomic load and nothing
/// is sent; while one is, the open or close is queued (bounded: a flood is dropped from the
/// view, never waited for) for the dashboard task to publish.
#[derive(Default)]
pub struct ConnectionReports {
    pub active: std::sync::atomic::AtomicBool,
    pub(super) opens_and_closes:
        std::sync::OnceLock<tokio::sync::mpsc::Sender<(Arc<str>, Transport, bool)>>,
    pub(super) operator: std::sync::OnceLock<tokio::sync::mpsc::Sender<(String, Bytes)>>,
    /// Reports left out of the view because the queue was full.
    pub dropped: AtomicU64,
}

impl ConnectionReports {
    fn report(&self, user: &Arc<str>, transport: Transport, opened: bool) {
        if !self.active.load(Relaxed) {
            return;
        }
        if let Some(tx) = self.opens_and_closes.get()
            && tx.try_send((user.clone(), transport, opened)).is_err()
        {
            self.dropped.fetch_add(1, Relaxed);
        }
    }
}

/// Why a connection could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("this user already has {0} open connections (--max-connections-per-user)")]
    TooManyConnections(usize),
}

/// The default of `--max-connections-per-user`: as many tabs and devices as a person uses,
/// far fewer than one token opening thousands (Centrifugo's default client limit is 64 too).
pub const DEFAULT_MAX_CONNECTIONS_PER_USER: usize = 64;

#[derive(Default)]
struct FeedDown {
    all: bool,
    users: std::collections::HashSet<Arc<str>>,
}

impl FeedDown {
    fn covers(&self, user: &str) -> bool {
        self.all || self.users.contains(user)
    }
}

/// How a client is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    Sse,
}

/// A connection's place in the hub; dropping it unregisters the connection.
pub struct Registration {
    hub: Arc<Hub>,
    user: Arc<str>,
    pub queue: Arc<SessionQueue>,
    transport: Transport,
}

impl Registration {
    /// The connection now watches `watches`' spaces (for the dashboard's per-space counts).
    pub fn set_watching(&self, watches: &super::session::Watches) {
        let mut spaces: Vec<Arc<str>> = watches.spaces().map(Arc::from).collect();
        spaces.sort();
        spaces.dedup();
        self.hub
            .set_watching(&self.queue, spaces.into_boxed_slice());
    }
}

impl Hub {
    /// A hub over `bus` whose sessions queue up to `queue_capacity` frames and `queue_bytes`
    /// bytes, with at most
    /// `max_per_user` connections per user (0 = no limit).
    pub fn new(
        bus: Arc<dyn Bus>,
        queue_capacity: usize,
        queue_bytes: usize,
        max_per_user: usize,
    ) -> Arc<Self> {
        Arc::new(Hub {
            sessions: Mutex::default(),
            feed_down: Mutex::new(FeedDown::default()),
            draining: std::sync::atomic::AtomicBool::new(false),
            subscription_order: (0..SUBSCRIPTION_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            stripe_hasher: std::hash::RandomState::new(),
            bus,
            queue_capacity,
            queue_bytes,
            max_per_user: if max_per_user == 0 {
                usize::MAX
            } else {
                max_per_user
            },
            wakeups: SessionWakeups::start(),
            stats: GatewayStats::default(),
            reports: ConnectionReports::default(),
            watching: Mutex::new(HashMap::new()),
        })
    }

    /// The connection of `queue` now watches `spaces` (none: forgotten).
    fn set_watching(&self, queue: &Arc<SessionQueue>, spaces: Box<[Arc<str>]>) {
        let key = Arc::as_ptr(queue) as usize;
        if let Ok(mut w) = self.watching.lock() {
            if spaces.is_empty() {
                w.remove(&key);
            } else {
                w.insert(key, spaces);
            }
        }
    }

    /// This gateway's counts for the dashboard: connections by transport, users, the busiest
    /// users and the most watched spaces (10 each).
    pub fn dashboard_counts(&self, id: &str) -> crate::dashboard::Report {
        let mut busiest: Vec<(String, u64)> = Vec::new();
        let mut spaces: HashMap<Arc<str>, u64> = HashMap::new();
        let (mut connections, mut users) = (0u64, 0u64);
        if let Ok(sessions) = self.sessions.lock() {
            users = sessions.len() as u64;
            for (user, list) in sessions.iter() {
                connections += list.len() as u64;
                busiest.push((user.to_string(), list.len() as u64));
            }
        }
        if let Ok(watching) = self.watching.lock() {
            for space in watching.values().flatten() {
                *spaces.entry(space.clone()).or_default() += 1;
            }
        }
        let top = |mut v: Vec<(String, u64)>| {
            v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            v.truncate(10);
            v
        };
        let sse = self.stats.sse_connections.load(Relaxed);
        crate::dashboard::Report::Gateway {
            id: id.to_owned(),
            connections,
            websocket: connections.saturating_sub(sse),
            sse,
            users,
            busiest: top(busiest),
            spaces: top(spaces
                .into_iter()
                .map(|(s, n)| (s.to_string(), n))
                .collect()),
        }
    }

    /// Shutdown: every session, and any that registers from now on, is told to drain.
    pub fn drain_all(&self) {
        let Ok(sessions) = self.sessions.lock() else {
            return;
        };
        self.draining.store(true, Relaxed);
        sessions.values().flatten().for_each(|q| q.drain());
    }

    /// The bus, for history reads.
    /// Whether the gateway is shutting down (every session told to reconnect elsewhere).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    pub fn bus(&self) -> &Arc<dyn Bus> {
        &self.bus
    }

    /// Whether the bus is reachable (`/readyz`).
    pub fn bus_connected(&self) -> bool {
        self.bus.is_connected()
    }

    /// Connected users.
    pub fn users(&self) -> usize {
        self.sessions.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// The lock that orders `user`'s subscription changes.
    fn order_of(&self, user: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::BuildHasher;
        let stripe = self.stripe_hasher.hash_one(user) as usize % self.subscription_order.len();
        &self.subscription_order[stripe]
    }

    pub async fn register(
        self: &Arc<Self>,
        user: Arc<str>,
        transport: Transport,
    ) -> Result<Registration, RegisterError> {
        let queue = Arc::new(SessionQueue::bounded(self.queue_capacity, self.queue_bytes));
        let _order = self.order_of(&user).lock().await;
        let first = {
            let mut sessions = self.sessions.lock().map_err(|_| BusError::Closed)?;
            if self.feed_down.lock().is_ok_and(|down| down.covers(&user)) {
                queue.feed_gap();
            }
            if self.draining.load(Relaxed) {
                queue.drain();
            }
            let list = sessions.entry(user.clone()).or_default();
            if list.len() >= self.max_per_user {
                self.stats.refused_per_user.fetch_add(1, Relaxed);
                return Err(RegisterError::TooManyConnections(self.max_per_user));
            }
            list.push(queue.clone());
            list.len() == 1
        };
        if first && let Err(e) = self.bus.subscribe(&user).await {
            self.remove(&user, &queue);
            return Err(e.into());
        }
        self.stats.connections.fetch_add(1, Relaxed);
        self.stats.connections_total.fetch_add(1, Relaxed);
        if transport == Transport::Sse {
            self.stats.sse_connections.fetch_add(1, Relaxed);
        }
        self.reports.report(&user, transport, true);
        Ok(Registration {
            hub: self.clone(),
            user,
            queue,
            transport,
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
        let _order = self.order_of(&user).lock().await;
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
        let frames = frames_of(messages);
        let Ok(sessions) = self.sessions.lock() else {
            return;
        };
        for queue in sessions.get(user).into_iter().flatten() {
            match queue.push(&frames, &self.wakeups) {
                Push::Queued => self.stats.delivered.fetch_add(frames.len() as u64, Relaxed),
                Push::Evicted => self.stats.evicted.fetch_add(1, Relaxed),
                Push::Gone => 0,
            };
        }
    }
}

/// The frames every connection of the user is sent, built once. The WebSocket texts of small
/// frames are slices of one buffer, and each holds its frame's id and payload (the bus's
/// buffer, perhaps its read buffer, is not kept); a large frame keeps the buffer the bus shares
/// among every recipient of the same bytes. The frames are one allocation ([`SharedFrame`]): a
/// batch costs two allocations rather than three per frame (small allocations freed on another
/// thread showed in the profile).
pub(super) fn frames_of(messages: &[(&str, Bytes)]) -> Vec<SharedFrame> {
    let small = |payload: &Bytes| payload.len() <= PREBUILT_TEXT_MAX;
    // Sized for events; a resync's text is longer by its space, and the buffer grows for it.
    let room = messages
        .iter()
        .filter(|(_, payload)| small(payload))
        .map(|(id, payload)| server_frame_len(id, payload.len(), None))
        .sum();
    let mut buffer = BytesMut::with_capacity(room);
    // A slice's iterator knows its length: the `Arc<[Frame]>` is allocated once, in place.
    let batch: Arc<[Frame]> = messages
        .iter()
        .map(|(id, payload)| {
            // Only the type is needed for every delivery; a resync (rare) also needs its space.
            let message_type = intern_type(message_type_of(payload).unwrap_or_default());
            let resync = (message_type == "resync").then(|| Route::of_payload(payload));
            if small(payload) {
                let space = resync.as_ref().map(|r| r.space_id.as_str());
                let spans = put_server_frame(&mut buffer, id, payload, space);
                let built = buffer.split().freeze();
                // Not UTF-8 (never a payload foldercast wrote), or an id that needed escaping:
                // the frame is kept apart, below.
                if let Some(text) = text_of(built)
                    && let Some(frame) =
                        Frame::with_text(message_type.clone(), resync.clone(), text, spans)
                {
                    return frame;
                }
            }
            Frame::apart(
                Utf8Bytes::from(*id),
                message_type,
                crate::bus::keepable(payload),
                resync,
            )
        })
        .collect();
    SharedFrame::each(batch).collect()
}

/// The bus calls this on its own task (the Redis push callback, or the in-process publisher):
/// it only queues frames, never waits on a client.
impl DeliverySink for Hub {
    fn deliver(&self, delivery: Delivery) -> bool {
        self.deliver_to_sessions(&delivery.user, &[(&delivery.id, delivery.payload)]);
        true
    }

    fn deliver_all(&self, user: &str, messages: &[(&str, Bytes)]) -> bool {
        self.deliver_to_sessions(user, messages);
        true
    }
}

/// The message types foldercast sends, as `'static` strings: no allocation per delivery.
fn intern_type(t: &str) -> Cow<'static, str> {
    // A `match` compiles to a length switch and one comparison; a list searched in order cost
    // a comparison per known type on every delivery.
    Cow::Borrowed(match t {
        "file-uploaded" => "file-uploaded",
        "file-touched" => "file-touched",
        "folder-created" => "folder-created",
        "item-trashed" => "item-trashed",
        "item-restored" => "item-restored",
        "item-moved" => "item-moved",
        "space-member-added" => "space-member-added",
        "space-member-removed" => "space-member-removed",
        "coalesced" => "coalesced",
        "resync" => "resync",
        "notice" => "notice",
        "event" => "event",
        other => return Cow::Owned(other.to_owned()),
    })
}

/// A gap in the bus's live feed holds the sessions it concerns; its end makes them catch up
/// from the history (see `session.rs`).
impl FeedEvents for Hub {
    fn feed_gap(&self, user: Option<&str>) {
        self.each_session(user, true, |q| q.feed_gap());
    }

    fn feed_restored(&self, user: Option<&str>) {
        self.each_session(user, false, |q| q.feed_restored());
    }

    fn operator_message(&self, channel: &str, payload: &[u8]) {
        if let Some(tx) = self.reports.operator.get()
            && tx
                .try_send((channel.to_owned(), Bytes::copy_from_slice(payload)))
                .is_err()
        {
            self.reports.dropped.fetch_add(1, Relaxed);
        }
    }
}

impl Hub {
    /// Marks the feed down (or up) for `user` (every user: `None`) and applies `f` to the
    /// sessions concerned, all under the sessions lock so a session that registers meanwhile
    /// sees one or the other.
    fn each_session(&self, user: Option<&str>, down: bool, f: impl Fn(&SessionQueue)) {
        let Ok(sessions) = self.sessions.lock() else {
            return;
        };
        if let Ok(mut feed) = self.feed_down.lock() {
            match (user, down) {
                (None, down) => {
                    feed.all = down;
                    if !down {
                        feed.users.clear();
                    }
                }
                (Some(u), true) => {
                    feed.users.insert(Arc::from(u));
                }
                (Some(u), false) => {
                    feed.users.remove(u);
                }
            }
        }
        match user {
            Some(user) => sessions.get(user).into_iter().flatten().for_each(|q| f(q)),
            None => sessions.values().flatten().for_each(|q| f(q)),
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.wakeups.close();
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.transport == Transport::Sse {
            self.hub.stats.sse_connections.fetch_sub(1, Relaxed);
        }
        self.hub.reports.report(&self.user, self.transport, false);
        self.hub.set_watching(&self.queue, Box::default());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_keep_their_payload_without_holding_a_short_ones_buffer_and_each_is_whole() {
        let resync = Bytes::from_static(br#"{"type":"resync","space_id":"s1","reason":"behind"}"#);
        let upload = Bytes::from_static(br#"{"type":"file-uploaded","space_id":"s1"}"#);
        let not_utf8 = Bytes::from_static(b"\xff\xfe");
        let large = Bytes::from(format!(
            r#"{{"type":"file-uploaded","path":"/{}"}}"#,
            "a".repeat(crate::bus::OWN_BUFFER_FROM + PREBUILT_TEXT_MAX)
        ));
        let messages = [
            ("1-0", upload.clone()),
            ("1-1", resync),
            ("odd \"id\"", upload),
            ("1-3", not_utf8.clone()),
            ("1-4", large.clone()),
        ];
        let frames = frames_of(&messages);
        assert_eq!(frames.len(), 5);
        for (frame, (_, handed)) in frames.iter().zip(&messages) {
            assert_eq!(frame.payload(), handed, "the payload's bytes are kept");
        }
        // A short payload may be a slice of the bus's read buffer: the frame reads its payload
        // and id from its own text instead, so the bus's buffer is not pinned by a queued frame.
        for short in [&frames[0], &frames[1]] {
            let text = short.ws_text();
            let within = text.as_str().as_bytes().as_ptr_range();
            assert!(within.contains(&short.payload().as_ptr()));
            assert!(within.contains(&short.id().as_ptr()));
            assert_eq!(short.size(), text.len(), "one buffer is all it holds");
        }
        // An id that must be escaped, a payload that is not UTF-8: kept apart, as copies.
        assert_ne!(frames[2].payload().as_ptr(), messages[2].1.as_ptr());
        assert_ne!(frames[3].payload().as_ptr(), not_utf8.as_ptr());
        // A long one is a buffer of its own (shared among its recipients): kept as it is.
        assert_eq!(frames[4].payload().as_ptr(), large.as_ptr());
        let json: Vec<serde_json::Value> = frames
            .iter()
            .map(|f| serde_json::from_str(f.ws_text().as_str()).expect("each frame is JSON"))
            .collect();
        assert_eq!(json[0]["type"], "event");
        assert_eq!(json[0]["id"], "1-0");
        assert_eq!(json[0]["data"]["type"], "file-uploaded");
        assert_eq!(&*frames[0].message_type, "file-uploaded");
        assert_eq!(json[1]["type"], "resync");
        assert_eq!(json[1]["space_id"], "s1");
        assert_eq!(json[2]["id"], "odd \"id\"", "ids are escaped in the frame");
        assert_eq!(frames[2].id(), "odd \"id\"", "and raw for SSE");
        assert_eq!(
            json[3]["data"],
            serde_json::Value::Null,
            "a payload that is not UTF-8"
        );
        assert_eq!(frames[3].id(), "1-3");
    }

    #[test]
    fn small_and_large_frames_of_one_batch_read_the_same_as_built_alone() {
        let large = format!(
            r#"{{"type":"file-uploaded","path":"/{}"}}"#,
            "a".repeat(2 * PREBUILT_TEXT_MAX)
        );
        let payloads = [
            Bytes::from_static(br#"{"type":"file-uploaded","space_id":"s1"}"#),
            Bytes::from(large),
            Bytes::from_static(br#"{"type":"resync","space_id":"a-much-longer-space-id"}"#),
            Bytes::from_static(br#"{"type":"item-moved"}"#),
        ];
        let messages: Vec<(&str, Bytes)> = ["e:1-0", "e:1-1", "e:1-2", "e:1-3"]
            .into_iter()
            .zip(payloads.iter().cloned())
            .collect();
        for (frame, (id, payload)) in frames_of(&messages).iter().zip(&messages) {
            let space = (frame.message_type == "resync").then_some("a-much-longer-space-id");
            let alone = crate::gateway::protocol::server_frame(id, payload, space);
            assert_eq!(frame.ws_text(), alone, "{id}");
            assert_eq!(frame.id(), *id);
        }
    }
}
