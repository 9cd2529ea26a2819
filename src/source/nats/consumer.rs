//! The JetStream source: a durable pull consumer on oCIS's stream, reva events in, foldercast
//! events out, each acknowledged only once the bus accepted what it became.
//!
//! One reader pulls from the consumer (durable, explicit acks, its own name: never an oCIS
//! service's, which would steal that service's messages). Each message is opened and mapped
//! ([`super::reva`]) and handed to a **lane** chosen by its space, so one space's events keep
//! their order while lanes wait on oCIS independently. A lane:
//! - hands mapped events to the driver, whose [`Ack`] sends JetStream's `+ACK`;
//! - completes lookups through oCIS ([`super::lookup`]): up to [`LOOKAHEAD`] of its events are
//!   asked about at once, their answers used in the lane's order; while oCIS is unreachable it
//!   asks again with backoff, holding the event (never dropping it);
//! - acknowledges at once what changes no folder view (counted by kind), and what only
//!   invalidates a space's members (after invalidating them);
//! - hands refused envelopes to the driver as rejected, which dead-letters them (the original
//!   bytes, with the reason in headers, on a subject of their own) and then acknowledges.
//!
//! Whatever waits long (a lookup, a full driver queue, the rate limiter) is marked in progress
//! (`+WPI`) every `ack_wait / 3` until acknowledged, so the server does not deliver it again to
//! a process that is still working on it.
//!
//! A message delivered `max_deliver` times is the last chance the server gives it (the process
//! died handling it that often): it is dead-lettered (reason `max-deliveries`) and handled once
//! more, a lookup excepted: its space is resynced instead.
//! Whatever is not acknowledged (a kill -9, a stop before the bus accepted) is delivered again
//! after `ack_wait`; the pipeline's and the bus's guards keep a redelivery from reaching a user
//! twice.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, message::Acker};
use async_trait::async_trait;
use chrono::SecondsFormat;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::envelope;
use super::jetstream::{NatsError, StreamTarget};
use super::lookup::{Completer, Fetched};
use super::reva::{self, Mapped};
use crate::event::Rejection;
use crate::membership::MembershipResolver;
use crate::source::{Ack, EventSource, Lane, RawEvent, SourceError, SourceEvent};

/// Where a new consumer starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartAt {
    /// Only events published from now on (oCIS's own services start so).
    New,
    /// Everything the stream still holds.
    All,
    /// Events published at or after this time (RFC 3339).
    Time(chrono::DateTime<chrono::Utc>),
}

#[derive(Debug, Clone)]
pub struct JetStreamSettings {
    pub target: StreamTarget,
    /// The durable consumer's name.
    pub durable: String,
    /// Where a consumer created now starts; an existing one resumes where it was.
    pub start: StartAt,
    pub ack_wait: Duration,
    /// Deliveries of one message before the server gives up on it.
    pub max_deliver: i64,
    /// Messages delivered but not yet acknowledged, at most.
    pub max_ack_pending: i64,
    /// Where refused envelopes go (a stream of that name is created for it if missing).
    pub dead_letter_subject: String,
    /// Lanes: spaces are spread over this many ordered lanes.
    pub lanes: u32,
}

impl Default for JetStreamSettings {
    fn default() -> Self {
        JetStreamSettings {
            target: StreamTarget {
                url: "nats://127.0.0.1:9233".into(),
                stream: "main-queue".into(),
                subject: "main-queue".into(),
            },
            durable: "foldercast".into(),
            start: StartAt::New,
            ack_wait: Duration::from_secs(30),
            max_deliver: 10,
            max_ack_pending: 10_000,
            dead_letter_subject: "foldercast-dead-letters".into(),
            lanes: 8,
        }
    }
}

/// What the source did that reached no user, by kind: readable while it runs.
#[derive(Debug, Default)]
pub struct NatsStats {
    pub received: AtomicU64,
    pub redelivered: AtomicU64,
    pub lookups: AtomicU64,
    pub lookup_retries: AtomicU64,
    pub resyncs: AtomicU64,
    pub invalidations: AtomicU64,
    /// Envelopes dead-lettered at their last delivery.
    pub dead_lettered: AtomicU64,
    /// The consumer's lag as the server last said (every [`LAG_EVERY`]; -1 until it said):
    /// messages of the stream not yet delivered to it, and delivered but not yet acknowledged.
    pub pending: std::sync::atomic::AtomicI64,
    pub ack_pending: std::sync::atomic::AtomicI64,
    pub skipped: Mutex<HashMap<&'static str, u64>>,
}

/// One message on its way through a lane.
struct Pulled {
    envelope: Vec<u8>,
    mapped: Result<Mapped, Rejection>,
    /// The stream sequence: its key among the unacknowledged (which hold its acker).
    sequence: u64,
    position: String,
    delivered: i64,
    /// When it was pulled: an oCIS answer asked since then shows its change.
    in_hand: std::time::Instant,
}

/// Messages pulled and not yet acknowledged, wherever they wait (a lane, a lookup, the
/// driver's queue, the rate limiter): a keeper marks the old ones in progress (`+WPI`) so the
/// server does not deliver them again to a process that is still working on them.
#[derive(Default)]
struct Unacknowledged {
    messages: Mutex<HashMap<u64, (tokio::time::Instant, Arc<Acker>)>>,
}

impl Unacknowledged {
    fn insert(&self, sequence: u64, acker: Arc<Acker>) {
        if let Ok(mut m) = self.messages.lock() {
            m.insert(sequence, (tokio::time::Instant::now(), acker));
        }
    }

    /// Acknowledges `sequence` (a task of its own sends `+ACK`).
    fn ack(&self, sequence: u64) {
        let acker = self
            .messages
            .lock()
            .ok()
            .and_then(|mut m| m.remove(&sequence))
            .map(|(_, a)| a);
        if let Some(acker) = acker {
            ack_now(acker);
        }
    }

    /// Every `every`, marks messages older than `every` in progress, until `stop`.
    async fn keep_alive(self: Arc<Self>, every: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = tokio::time::Instant::now();
            let old: Vec<Arc<Acker>> = match self.messages.lock() {
                Ok(m) => m
                    .values()
                    .filter(|(since, _)| now.duration_since(*since) >= every)
                    .map(|(_, a)| a.clone())
                    .collect(),
                Err(_) => continue,
            };
            if !old.is_empty() {
                tracing::debug!(messages = old.len(), "marking waiting events in progress");
            }
            for acker in old {
                if let Err(e) = acker.ack_with(AckKind::Progress).await {
                    tracing::debug!(error = %e, "progress ack failed");
                }
            }
        }
    }
}

/// Where envelopes go that foldercast will not handle (unreadable, or delivered too often),
/// with the reason in headers.
#[derive(Clone)]
struct DeadLetters {
    js: jetstream::Context,
    subject: String,
}

impl DeadLetters {
    /// Publishes `bytes` and waits until JetStream stored it.
    async fn publish(
        &self,
        bytes: &[u8],
        code: &str,
        reason: &str,
        position: &str,
    ) -> Result<(), SourceError> {
        let mut headers = async_nats::HeaderMap::new();
        let clean = |s: &str| s.replace(['\r', '\n'], " ");
        headers.insert("Foldercast-Rejection", code);
        headers.insert("Foldercast-Reason", clean(reason).as_str());
        headers.insert("Foldercast-Position", clean(position).as_str());
        let failed = |e: &dyn std::fmt::Display| {
            SourceError::Nats(format!("dead letter to {}: {e}", self.subject))
        };
        let ack = self
            .js
            .publish_with_headers(self.subject.clone(), headers, bytes.to_vec().into())
            .await
            .map_err(|e| failed(&e))?;
        ack.await.map_err(|e| failed(&e))?;
        Ok(())
    }
}

pub struct JetStreamSource {
    events: tokio::sync::Mutex<mpsc::Receiver<SourceEvent>>,
    client: async_nats::Client,
    dead_letters: DeadLetters,
    stats: Arc<NatsStats>,
    stop: CancellationToken,
}

/// Events waiting between the lanes and the driver.
const HANDED_OVER: usize = 1024;
/// Messages waiting in each lane.
const LANE_QUEUE: usize = 1024;

/// The durable consumers of oCIS's own services (their group names, `ocis-interfaces.md`
/// §2.1): consumers of one name share the messages, so foldercast must never take one.
pub const OCIS_CONSUMERS: [&str; 20] = [
    "activitylog",
    "antivirus",
    "audit",
    "clientlog",
    "eventhistory",
    "frontend",
    "graph",
    "notifications",
    "ocm",
    "policies",
    "postprocessing",
    "proxy",
    "search",
    "settings",
    "sharing",
    "sse",
    "storage-system",
    "storage-users",
    "userlog",
    "webhooks",
];

impl JetStreamSource {
    /// Connects, finds the stream, and creates or reopens the durable consumer. The dead-letter
    /// stream is created if missing.
    pub async fn connect(
        settings: JetStreamSettings,
        completer: Completer,
        resolver: Arc<dyn MembershipResolver>,
    ) -> Result<Self, NatsError> {
        if OCIS_CONSUMERS.contains(&settings.durable.to_ascii_lowercase().as_str()) {
            return Err(NatsError::StolenDurable {
                name: settings.durable,
            });
        }
        let target = &settings.target;
        let (client, js) = super::jetstream::connect(target).await?;
        let stream_error = |stream: &str, e: &dyn std::fmt::Display| NatsError::Stream {
            stream: stream.to_owned(),
            reason: e.to_string(),
        };
        // oCIS creates its stream when its first service starts: a consumer started before
        // waits for it rather than exit (and be restarted in a loop).
        let mut delay = Duration::from_millis(200);
        let stream = loop {
            match js.get_stream(&target.stream).await {
                Ok(stream) => break stream,
                Err(e) => {
                    tracing::warn!(stream = %target.stream, error = %e, retry_in = ?delay, "JetStream stream not there (yet): oCIS creates it; waiting");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        };
        super::jetstream::ensure_stream(
            &js,
            &settings.dead_letter_subject,
            &settings.dead_letter_subject,
        )
        .await?;
        let deliver_policy = match &settings.start {
            StartAt::New => consumer::DeliverPolicy::New,
            StartAt::All => consumer::DeliverPolicy::All,
            StartAt::Time(t) => consumer::DeliverPolicy::ByStartTime { start_time: *t },
        };
        let config = consumer::pull::Config {
            durable_name: Some(settings.durable.clone()),
            description: Some("foldercast: folder changes to browsers and sync clients".into()),
            deliver_policy,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: settings.ack_wait,
            max_deliver: settings.max_deliver,
            max_ack_pending: settings.max_ack_pending,
            filter_subject: target.subject.clone(),
            ..Default::default()
        };
        let consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(&settings.durable, config)
            .await
            .map_err(|e| stream_error(&target.stream, &e))?;
        tracing::info!(stream = %target.stream, durable = %settings.durable, "JetStream consumer ready");

        let stop = CancellationToken::new();
        let stats = Arc::new(NatsStats::default());
        stats.pending.store(-1, Relaxed);
        stats.ack_pending.store(-1, Relaxed);
        let unacknowledged = Arc::new(Unacknowledged::default());
        let (events_tx, events) = mpsc::channel(HANDED_OVER);
        let completer = Arc::new(completer);
        let dead_letters = DeadLetters {
            js: js.clone(),
            subject: settings.dead_letter_subject.clone(),
        };
        let mut lanes = Vec::new();
        for lane in 0..settings.lanes.max(1) {
            let (tx, rx) = mpsc::channel(LANE_QUEUE);
            lanes.push(tx);
            tokio::spawn(
                LaneWorker {
                    lane,
                    completer: completer.clone(),
                    resolver: resolver.clone(),
                    unacknowledged: unacknowledged.clone(),
                    dead_letters: dead_letters.clone(),
                    events: events_tx.clone(),
                    stats: stats.clone(),
                    settings: settings.clone(),
                    stop: stop.clone(),
                }
                .run(rx),
            );
        }
        tokio::spawn(watch_lag(consumer.clone(), stats.clone(), stop.clone()));
        tokio::spawn(read(
            consumer,
            lanes,
            unacknowledged.clone(),
            stats.clone(),
            target.stream.clone(),
            stop.clone(),
        ));
        tokio::spawn(stats.clone().log_every_minute(stop.clone()));
        tokio::spawn(unacknowledged.clone().keep_alive(
            (settings.ack_wait / 3).max(Duration::from_millis(100)),
            stop.clone(),
        ));
        Ok(JetStreamSource {
            events: tokio::sync::Mutex::new(events),
            client,
            dead_letters,
            stats,
            stop,
        })
    }

    pub fn stats(&self) -> &Arc<NatsStats> {
        &self.stats
    }
}

impl NatsStats {
    /// The counters in one log line.
    fn log(&self, what: &str) {
        let skipped = self
            .skipped
            .lock()
            .map(|m| format!("{:?}", *m))
            .unwrap_or_default();
        tracing::info!(
            received = self.received.load(Relaxed),
            redelivered = self.redelivered.load(Relaxed),
            lookups = self.lookups.load(Relaxed),
            lookup_retries = self.lookup_retries.load(Relaxed),
            resyncs = self.resyncs.load(Relaxed),
            invalidations = self.invalidations.load(Relaxed),
            dead_lettered = self.dead_lettered.load(Relaxed),
            %skipped,
            "{what}"
        );
    }

    /// Logs the counters once a minute while they change, until `stop`.
    async fn log_every_minute(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        tick.tick().await;
        let mut last = 0;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let received = self.received.load(Relaxed);
            if received != last {
                last = received;
                self.log("JetStream source");
            }
        }
    }
}

/// How often the consumer's lag is asked of the server.
pub const LAG_EVERY: Duration = Duration::from_secs(5);

/// Keeps [`NatsStats::pending`] and [`NatsStats::ack_pending`] current, until `stop`.
async fn watch_lag(
    mut consumer: consumer::PullConsumer,
    stats: Arc<NatsStats>,
    stop: CancellationToken,
) {
    loop {
        match consumer.info().await {
            Ok(info) => {
                stats
                    .pending
                    .store(i64::try_from(info.num_pending).unwrap_or(i64::MAX), Relaxed);
                stats.ack_pending.store(
                    i64::try_from(info.num_ack_pending).unwrap_or(i64::MAX),
                    Relaxed,
                );
            }
            Err(e) => tracing::debug!(error = %e, "consumer info unavailable"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(LAG_EVERY) => {}
        }
    }
}

/// Pulls messages, maps them, and hands each to its space's lane, in stream order.
async fn read(
    consumer: consumer::PullConsumer,
    lanes: Vec<mpsc::Sender<Pulled>>,
    unacknowledged: Arc<Unacknowledged>,
    stats: Arc<NatsStats>,
    stream: String,
    stop: CancellationToken,
) {
    let mut delay = Duration::from_millis(100);
    while !stop.is_cancelled() {
        let mut messages = match consumer.messages().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "cannot pull from JetStream; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        delay = Duration::from_millis(100);
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                next = messages.next() => next,
            };
            let message = match next {
                Some(Ok(m)) => m,
                // Missed heartbeats, a server restart: the stream keeps pulling after it.
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "JetStream pull interrupted");
                    continue;
                }
                None => break,
            };
            let (sequence, delivered, published) = match message.info() {
                Ok(info) => (
                    info.stream_sequence,
                    info.delivered,
                    info.published.to_rfc3339_opts(SecondsFormat::AutoSi, true),
                ),
                // Not a JetStream message (no ack subject): nothing to acknowledge it with.
                Err(e) => {
                    tracing::warn!(error = %e, "a message without JetStream metadata; ignored");
                    continue;
                }
            };
            let position = format!("{stream}#{sequence}");
            stats.received.fetch_add(1, Relaxed);
            if delivered > 1 {
                stats.redelivered.fetch_add(1, Relaxed);
            }
            let in_hand = std::time::Instant::now();
            let (message, acker) = message.split();
            let acker = Arc::new(acker);
            unacknowledged.insert(sequence, acker.clone());
            let envelope = message.payload.to_vec();
            let mapped = envelope::open(&envelope).and_then(|e| reva::map(&e, &published));
            let lane = lane_of(&mapped, lanes.len());
            let pulled = Pulled {
                envelope,
                mapped,
                sequence,
                position,
                delivered,
                in_hand,
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                sent = lanes[lane].send(pulled) => if sent.is_err() { return },
            }
        }
    }
}

/// The lane of a mapped message: by its space, so a space's events stay in order.
fn lane_of(mapped: &Result<Mapped, Rejection>, lanes: usize) -> usize {
    #[derive(Deserialize)]
    struct Probe {
        data: Option<ProbeData>,
    }
    #[derive(Deserialize)]
    struct ProbeData {
        space_id: Option<String>,
        group: Option<String>,
    }
    let key = match mapped {
        Ok(Mapped::Event(bytes)) => serde_json::from_slice::<Probe>(bytes)
            .ok()
            .and_then(|p| p.data)
            .and_then(|d| d.space_id.or(d.group)),
        Ok(Mapped::Lookup(l)) => l.space_id.clone(),
        _ => None,
    };
    let Some(key) = key else { return 0 };
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut hasher);
    (hasher.finish() % lanes.max(1) as u64) as usize
}

struct LaneWorker {
    lane: Lane,
    completer: Arc<Completer>,
    resolver: Arc<dyn MembershipResolver>,
    unacknowledged: Arc<Unacknowledged>,
    dead_letters: DeadLetters,
    events: mpsc::Sender<SourceEvent>,
    stats: Arc<NatsStats>,
    settings: JetStreamSettings,
    stop: CancellationToken,
}

/// Lookups a lane runs ahead of the event it hands over: oCIS is asked for up to this many of
/// the lane's events at once, and their answers are used in the lane's order.
pub const LOOKAHEAD: usize = 32;

/// A pulled message, ready to go on in order.
enum Step {
    /// Acknowledged already (skipped, or an invalidation).
    Done,
    Hand(RawEvent, u64),
    /// A lookup answered; the event is built in order ([`Completer::finish`]).
    Finish {
        lookup: Box<reva::Lookup>,
        fetched: Fetched,
        position: String,
        sequence: u64,
    },
    Stopped,
}

impl LaneWorker {
    async fn run(self, rx: mpsc::Receiver<Pulled>) {
        let worker = &self;
        let steps = tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|pulled| {
                let span = tracing::debug_span!("nats", position = %pulled.position);
                worker.prepare(pulled).instrument(span)
            })
            .buffered(LOOKAHEAD);
        tokio::pin!(steps);
        loop {
            let step = tokio::select! {
                _ = self.stop.cancelled() => return,
                step = steps.next() => match step { Some(s) => s, None => return },
            };
            let handed = match step {
                Step::Done => true,
                Step::Stopped => false,
                Step::Hand(raw, sequence) => self.hand_over(raw, sequence).await,
                Step::Finish {
                    lookup,
                    fetched,
                    position,
                    sequence,
                } => {
                    let bytes = self.completer.finish(&lookup, fetched);
                    if bytes.windows(14).any(|w| w == b"\"space-resync\"") {
                        self.stats.resyncs.fetch_add(1, Relaxed);
                    }
                    self.hand_over(RawEvent::new(bytes, position), sequence)
                        .await
                }
            };
            if !handed {
                return;
            }
        }
    }

    /// Everything that may run ahead: acknowledging what reaches no user, asking oCIS.
    async fn prepare(&self, pulled: Pulled) -> Step {
        let Pulled {
            envelope,
            mapped,
            sequence,
            position,
            delivered,
            in_hand,
        } = pulled;
        let last_delivery = delivered >= self.settings.max_deliver;
        if last_delivery {
            // The server will not deliver it again: kept where an operator can look at it, and
            // still handled below (a lookup is not risked again: its space is resynced).
            self.stats.dead_lettered.fetch_add(1, Relaxed);
            let reason = format!(
                "delivered {delivered} times (--nats-max-deliver): the consumer kept stopping before handling it"
            );
            tracing::warn!(%position, delivered, "last delivery; the event is dead-lettered and handled once more");
            if let Err(e) = self
                .dead_letters
                .publish(&envelope, "max-deliveries", &reason, &position)
                .await
            {
                tracing::error!(%position, error = %e, "dead-lettering a last delivery failed");
            }
        }
        match mapped {
            Ok(Mapped::Event(bytes)) => Step::Hand(RawEvent::new(bytes, position), sequence),
            Ok(Mapped::Skip(reason)) => {
                if let Ok(mut skipped) = self.stats.skipped.lock() {
                    *skipped.entry(reason).or_default() += 1;
                }
                tracing::debug!(%position, reason, "reva event skipped");
                self.unacknowledged.ack(sequence);
                Step::Done
            }
            Ok(Mapped::Invalidate { space_id }) => {
                self.stats.invalidations.fetch_add(1, Relaxed);
                self.resolver.invalidate(&space_id);
                tracing::debug!(%position, %space_id, "space members to be read again");
                self.unacknowledged.ack(sequence);
                Step::Done
            }
            Ok(Mapped::Lookup(lookup)) => {
                self.stats.lookups.fetch_add(1, Relaxed);
                let fetched = if last_delivery {
                    Fetched::Resync(format!("delivered {delivered} times"))
                } else {
                    match self.fetch(&lookup, &position, in_hand).await {
                        Some(f) => f,
                        None => return Step::Stopped,
                    }
                };
                Step::Finish {
                    lookup,
                    fetched,
                    position,
                    sequence,
                }
            }
            Err(rejection) => {
                let mut raw = RawEvent::new(envelope, position);
                raw.rejected = Some(rejection);
                Step::Hand(raw, sequence)
            }
        }
    }

    /// Asks oCIS until it answers (the keeper marks the event in progress meanwhile). `None`
    /// once stopped.
    async fn fetch(
        &self,
        lookup: &reva::Lookup,
        position: &str,
        in_hand: std::time::Instant,
    ) -> Option<Fetched> {
        let mut delay = Duration::from_millis(200);
        loop {
            let fetched = tokio::select! {
                _ = self.stop.cancelled() => return None,
                f = self.completer.fetch(lookup, in_hand) => f,
            };
            let Fetched::Unavailable(reason) = fetched else {
                return Some(fetched);
            };
            self.stats.lookup_retries.fetch_add(1, Relaxed);
            tracing::warn!(%position, %reason, retry_in = ?delay, "oCIS unavailable for a lookup; holding the event");
            tokio::select! {
                _ = self.stop.cancelled() => return None,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }

    async fn hand_over(&self, raw: RawEvent, sequence: u64) -> bool {
        let unacknowledged = self.unacknowledged.clone();
        let event = SourceEvent {
            raw,
            lane: self.lane,
            ack: Ack::new(move || unacknowledged.ack(sequence)),
        };
        tokio::select! {
            _ = self.stop.cancelled() => false,
            sent = self.events.send(event) => sent.is_ok(),
        }
    }
}

/// Sends `+ACK` (from a synchronous acknowledgement: in a task of its own).
fn ack_now(acker: Arc<Acker>) {
    tokio::spawn(async move {
        if let Err(e) = acker.ack().await {
            // Not acknowledged means delivered again: a duplicate the guards drop, never a loss.
            tracing::warn!(error = %e, "JetStream ack failed; the event comes again");
        }
    });
}

#[async_trait]
impl EventSource for JetStreamSource {
    async fn next(&self) -> Result<Option<SourceEvent>, SourceError> {
        match self.events.lock().await.recv().await {
            Some(event) => Ok(Some(event)),
            None => Err(SourceError::Nats("the JetStream reader stopped".into())),
        }
    }

    async fn dead_letter(
        &self,
        event: &SourceEvent,
        rejection: &Rejection,
    ) -> Result<(), SourceError> {
        self.dead_letters
            .publish(
                &event.raw.bytes,
                rejection.code,
                &rejection.reason,
                &event.raw.position,
            )
            .await
    }

    async fn close(&self) {
        self.stop.cancel();
        self.stats.log("JetStream source stopped");
        // Acknowledgements are published asynchronously: let them reach the server.
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Err(e) = self.client.flush().await {
            tracing::warn!(error = %e, "flushing acknowledgements to NATS failed");
        }
    }
}
