//! Kafka: the production event source (a consumer group), its dead-letter topic, and the
//! producer that loads fixture files into a topic.
//!
//! A partition's records are spread over `lanes_per_partition` ordered lanes by their key (the
//! space id): Kafka orders records per key, and each lane keeps that order. At least once: auto-commit is off, and an offset is committed only
//! below every event still in flight, i.e. read but not yet acknowledged by the driver (whose
//! messages, some perhaps held by the rate limiter, are not all accepted by the bus yet). Events
//! are acknowledged out of order (a held one stays in flight while later ones complete), so the
//! tracker keeps the set of offsets in flight per partition. Commits go out every
//! `commit_interval` or `commit_batch` acknowledgements, synchronously before partitions are
//! revoked in a rebalance, and on close. Events a new owner replays are caught by the bus's
//! per-user guard.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Ack, EventSource, Lane, RawEvent, SourceError, SourceEvent};
use crate::event::Rejection;

/// Consumer settings.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub brokers: String,
    pub topic: String,
    pub group: String,
    pub dead_letter_topic: String,
    pub session_timeout: Duration,
    /// Commit at least this often while events are acknowledged...
    pub commit_interval: Duration,
    /// ...and after this many acknowledgements.
    pub commit_batch: u64,
    /// Ordered lanes per partition, chosen by the record's key ([`lane_of`]).
    pub lanes_per_partition: u32,
    /// Extra librdkafka properties (`key=value`), applied last.
    pub options: Vec<(String, String)>,
}

/// Lanes per partition unless told otherwise. With one, a partition's lane published one batch
/// at a time and Redis waited while the lane prepared the next (`bench consume`, 3 rounds, the
/// same session: 70 % of the Redis-bound limit with 1 lane per partition, 84 % with 4, 85 %
/// with 8, 89–94 % with 16, 98 % with 32).
pub const DEFAULT_LANES_PER_PARTITION: u32 = 32;

/// The lane of a record of `partition` with `key`: records of one key share a lane, so they
/// keep the order Kafka gives them (per key); a record without a key goes to the partition's
/// first lane. The hash is fixed (not seeded per process) so a record's lane never changes.
pub fn lane_of(partition: i32, key: Option<&[u8]>, lanes_per_partition: u32) -> Lane {
    let per = lanes_per_partition.max(1);
    let shard = key.map_or(0, |k| {
        // FNV-1a: stable across processes and versions, and enough to spread space ids.
        let hash = k.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        (hash % u64::from(per)) as u32
    });
    (partition.max(0) as u32)
        .saturating_mul(per)
        .saturating_add(shard)
}

/// The partition a lane reads from.
fn partition_of(lane: Lane, lanes_per_partition: u32) -> i32 {
    (lane / lanes_per_partition.max(1)) as i32
}

fn kafka_err(brokers: &str, e: KafkaError) -> SourceError {
    SourceError::Kafka(format!("{brokers}: {e}"))
}

/// Per partition, the offsets read and not yet acknowledged, and the next offset to read.
pub struct CommitTracker {
    topic: String,
    partitions: Mutex<HashMap<i32, InFlight>>,
    since_commit: AtomicU64,
    commit_batch: u64,
    commit_now: Notify,
}

#[derive(Default)]
struct InFlight {
    offsets: BTreeSet<i64>,
    next: i64,
}

impl CommitTracker {
    pub fn new(topic: &str, commit_batch: u64) -> Self {
        CommitTracker {
            topic: topic.to_owned(),
            partitions: Mutex::new(HashMap::new()),
            since_commit: AtomicU64::new(0),
            commit_batch: commit_batch.max(1),
            commit_now: Notify::new(),
        }
    }

    /// Records that the event at `offset` was read and is being handled.
    pub fn read(&self, partition: i32, offset: i64) {
        if let Ok(mut partitions) = self.partitions.lock() {
            let p = partitions.entry(partition).or_default();
            p.offsets.insert(offset);
            p.next = p.next.max(offset + 1);
        }
    }

    /// Records that the event at `offset` is fully handled.
    pub fn acknowledged(&self, partition: i32, offset: i64) {
        if let Ok(mut partitions) = self.partitions.lock()
            && let Some(p) = partitions.get_mut(&partition)
        {
            p.offsets.remove(&offset);
        }
        if self.since_commit.fetch_add(1, Relaxed) + 1 >= self.commit_batch {
            self.commit_now.notify_one();
        }
    }

    /// What may be committed now: per partition the oldest offset in flight, or past the last
    /// read when none is.
    pub fn committable(&self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        if let Ok(partitions) = self.partitions.lock() {
            for (&partition, p) in partitions.iter() {
                let at = p.offsets.first().copied().unwrap_or(p.next);
                let _ = tpl.add_partition_offset(&self.topic, partition, Offset::Offset(at));
            }
        }
        tpl
    }

    fn forget(&self, revoked: &TopicPartitionList) {
        if let Ok(mut partitions) = self.partitions.lock() {
            for p in revoked.elements() {
                partitions.remove(&p.partition());
            }
        }
    }
}

/// Commits what is handled before partitions move to another consumer.
pub struct GroupContext {
    tracker: Arc<CommitTracker>,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(revoked) = rebalance {
            let tpl = self.tracker.committable();
            if tpl.count() > 0
                && let Err(e) = consumer.commit(&tpl, CommitMode::Sync)
            {
                tracing::warn!(error = %e, "commit before revoke failed; the new owner replays more");
            }
            self.tracker.forget(revoked);
            tracing::info!(partitions = revoked.count(), "partitions revoked");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(assigned) = rebalance {
            let parts: Vec<i32> = assigned.elements().iter().map(|e| e.partition()).collect();
            tracing::info!(?parts, "partitions assigned");
        }
    }
}

pub struct KafkaSource {
    consumer: Arc<StreamConsumer<GroupContext>>,
    dead_letters: FutureProducer,
    settings: KafkaSettings,
    tracker: Arc<CommitTracker>,
    committer: CancellationToken,
    lag: Arc<KafkaLag>,
}

/// How far the group's committed offsets are behind the end of each partition this consumer is
/// assigned, asked of the brokers every [`KafkaLag::EVERY`] (`/metrics`). Committed, not
/// read: an event counts as done only once acknowledged, so this is what a crash would replay.
#[derive(Default)]
pub struct KafkaLag {
    partitions: Mutex<std::collections::BTreeMap<i32, i64>>,
}

impl KafkaLag {
    pub const EVERY: Duration = Duration::from_secs(5);

    /// Records per assigned partition, as last measured.
    pub fn partitions(&self) -> Vec<(i32, i64)> {
        self.partitions
            .lock()
            .map(|m| m.iter().map(|(p, n)| (*p, *n)).collect())
            .unwrap_or_default()
    }

    /// Asks the brokers for the committed offset and the end of every assigned partition.
    fn measure(&self, consumer: &StreamConsumer<GroupContext>, topic: &str) {
        let timeout = Duration::from_secs(5);
        let assigned = match consumer.assignment() {
            Ok(tpl) => tpl,
            Err(e) => return tracing::debug!(error = %e, "no assignment to measure lag on"),
        };
        let committed = match consumer.committed_offsets(assigned.clone(), timeout) {
            Ok(tpl) => tpl,
            Err(e) => return tracing::debug!(error = %e, "committed offsets unavailable"),
        };
        let mut lag = std::collections::BTreeMap::new();
        for element in committed.elements_for_topic(topic) {
            let partition = element.partition();
            let Ok((low, high)) = consumer.fetch_watermarks(topic, partition, timeout) else {
                continue;
            };
            let done = match element.offset() {
                Offset::Offset(n) => n,
                _ => low,
            };
            lag.insert(partition, (high - done).max(0));
        }
        if let Ok(mut partitions) = self.partitions.lock() {
            *partitions = lag;
        }
    }
}

async fn watch_lag(
    consumer: Arc<StreamConsumer<GroupContext>>,
    lag: Arc<KafkaLag>,
    topic: String,
    stop: CancellationToken,
) {
    loop {
        let (consumer, lag, topic) = (consumer.clone(), lag.clone(), topic.clone());
        // The broker calls block: off the runtime's workers.
        let _ = tokio::task::spawn_blocking(move || lag.measure(&consumer, &topic)).await;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(KafkaLag::EVERY) => {}
        }
    }
}

fn base_config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("broker.address.family", "v4")
        .set("socket.connection.setup.timeout.ms", "10000");
    c
}

impl KafkaSource {
    /// Joins the consumer group; fails with a clear error if the brokers cannot be reached.
    pub async fn connect(settings: KafkaSettings) -> Result<Self, SourceError> {
        let tracker = Arc::new(CommitTracker::new(&settings.topic, settings.commit_batch));
        let brokers = settings.brokers.clone();
        let session_ms = settings.session_timeout.as_millis().max(1000).to_string();
        let heartbeat_ms = (settings.session_timeout.as_millis() / 4)
            .max(250)
            .to_string();
        let mut config = base_config(&brokers);
        config
            .set("group.id", &settings.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", &session_ms)
            .set("heartbeat.interval.ms", &heartbeat_ms)
            // Bounded fetches, so the consumer queue interleaves partitions in runs a lane's
            // queue (4,096 records) can take: tansu returns up to fetch.max.bytes from one
            // partition, and librdkafka's defaults (50 MiB) gave runs of 30,000 records that
            // filled one lane and starved the others. 1 MiB / 256 KiB (session 4) went the other
            // way once publishing got cheaper: the reader kept Redis 75 % busy, and 8 MiB / 2 MiB
            // measured 61 → 71 % of the Redis-bound limit (docs/benchmarks.md, session 10).
            // --kafka-option overrides them.
            .set("fetch.max.bytes", "8388608")
            .set("max.partition.fetch.bytes", "2097152");
        for (k, v) in &settings.options {
            config.set(k, v);
        }
        let consumer: StreamConsumer<GroupContext> = config
            .create_with_context(GroupContext {
                tracker: tracker.clone(),
            })
            .map_err(|e| kafka_err(&brokers, e))?;
        let dead_letters: FutureProducer = base_config(&brokers)
            .create()
            .map_err(|e| kafka_err(&brokers, e))?;
        ensure_topic(&brokers, &settings.dead_letter_topic, 1).await?;
        // Fail fast on a wrong address instead of letting librdkafka retry silently forever.
        let probe_topic = settings.topic.clone();
        let metadata = tokio::task::block_in_place(|| {
            consumer.fetch_metadata(Some(&probe_topic), Duration::from_secs(10))
        });
        metadata.map_err(|e| {
            SourceError::Kafka(format!("cannot reach Kafka brokers {brokers}: {e}"))
        })?;
        consumer
            .subscribe(&[&settings.topic])
            .map_err(|e| kafka_err(&brokers, e))?;
        let consumer = Arc::new(consumer);
        let committer = CancellationToken::new();
        tokio::spawn(commit_periodically(
            consumer.clone(),
            tracker.clone(),
            settings.commit_interval,
            committer.clone(),
        ));
        let lag = Arc::new(KafkaLag::default());
        tokio::spawn(watch_lag(
            consumer.clone(),
            lag.clone(),
            settings.topic.clone(),
            committer.clone(),
        ));
        Ok(KafkaSource {
            consumer,
            dead_letters,
            settings,
            tracker,
            committer,
            lag,
        })
    }

    /// The consumer's lag per assigned partition (for `/metrics`).
    pub fn lag(&self) -> Arc<KafkaLag> {
        self.lag.clone()
    }

    /// The next record (any assigned partition), in flight until its `Ack` runs.
    async fn recv(&self) -> SourceEvent {
        loop {
            match self.consumer.recv().await {
                Ok(m) => {
                    let headers = m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|h| {
                                    (
                                        h.key.to_owned(),
                                        h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    let (partition, offset) = (m.partition(), m.offset());
                    let raw = RawEvent {
                        bytes: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                        position: format!("{}/{}@{}", m.topic(), partition, offset),
                        key: m.key().map(<[u8]>::to_vec),
                        headers,
                        rejected: None,
                    };
                    self.tracker.read(partition, offset);
                    let tracker = self.tracker.clone();
                    return SourceEvent {
                        raw,
                        lane: lane_of(partition, m.key(), self.settings.lanes_per_partition),
                        ack: Ack::new(move || tracker.acknowledged(partition, offset)),
                    };
                }
                // Transient broker errors: librdkafka recovers by itself; say so and go on.
                Err(e) => {
                    tracing::warn!(error = %e, "kafka consumer error; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Stops fetching `partition`. librdkafka drops what it prefetched for it and, on
    /// resume, fetches again from the record after the last one `recv` returned,
    /// so nothing is skipped and order is kept.
    fn pause_partition(&self, partition: i32) -> Result<(), SourceError> {
        self.consumer
            .pause(&self.one_partition(partition))
            .map_err(|e| SourceError::Kafka(format!("pausing partition {partition}: {e}")))
    }

    fn resume_partition(&self, partition: i32) -> Result<(), SourceError> {
        self.consumer
            .resume(&self.one_partition(partition))
            .map_err(|e| SourceError::Kafka(format!("resuming partition {partition}: {e}")))
    }

    fn one_partition(&self, partition: i32) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.settings.topic, partition);
        tpl
    }

    /// Sends a refused record to the dead-letter topic with its original bytes, key and headers,
    /// plus headers naming the error and where it came from.
    async fn send_dead_letter(
        &self,
        event: &SourceEvent,
        rejection: &Rejection,
    ) -> Result<(), SourceError> {
        let (partition, offset) = position_numbers(&event.raw.position);
        let mut headers = OwnedHeaders::new();
        for (k, v) in &event.raw.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        for (key, value) in [
            ("foldercast-error-code", rejection.code),
            ("foldercast-error", rejection.reason.as_str()),
            ("foldercast-source-topic", self.settings.topic.as_str()),
            ("foldercast-source-partition", partition),
            ("foldercast-source-offset", offset),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut rec: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.settings.dead_letter_topic)
                .payload(event.raw.bytes.as_slice())
                .headers(headers);
        if let Some(k) = &event.raw.key {
            rec = rec.key(k.as_slice());
        }
        match self.dead_letters.send(rec, Duration::from_secs(10)).await {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(SourceError::Kafka(format!(
                "dead-letter send to {} failed: {e}",
                self.settings.dead_letter_topic
            ))),
        }
    }
}

/// `topic/partition@offset` → ("partition", "offset").
fn position_numbers(position: &str) -> (&str, &str) {
    let tail = position.rsplit_once('/').map_or(position, |(_, t)| t);
    tail.split_once('@').unwrap_or((tail, ""))
}

fn commit(consumer: &StreamConsumer<GroupContext>, tracker: &CommitTracker, mode: CommitMode) {
    tracker.since_commit.store(0, Relaxed);
    let tpl = tracker.committable();
    if tpl.count() == 0 {
        return;
    }
    if let Err(e) = consumer.commit(&tpl, mode) {
        // No assignment right now (mid-rebalance) is normal; anything else is worth a word.
        if !matches!(e, KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) {
            tracing::warn!(error = %e, "offset commit failed; will retry");
        }
    }
}

async fn commit_periodically(
    consumer: Arc<StreamConsumer<GroupContext>>,
    tracker: Arc<CommitTracker>,
    interval: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
            _ = tracker.commit_now.notified() => {}
        }
        commit(&consumer, &tracker, CommitMode::Async);
    }
}

#[async_trait]
impl EventSource for KafkaSource {
    async fn next(&self) -> Result<Option<SourceEvent>, SourceError> {
        let event = self.recv().await;
        Ok(Some(event))
    }

    async fn dead_letter(
        &self,
        event: &SourceEvent,
        rejection: &Rejection,
    ) -> Result<(), SourceError> {
        self.send_dead_letter(event, rejection).await
    }

    fn pause(&self, lane: Lane) -> bool {
        // The whole partition: a lane's records cannot be held back alone. Its other lanes
        // get nothing new until it resumes, and each still keeps its order.
        let partition = partition_of(lane, self.settings.lanes_per_partition);
        match self.pause_partition(partition) {
            Ok(()) => {
                tracing::info!(partition, lane, "partition paused: its lane is full");
                true
            }
            Err(e) => {
                tracing::warn!(partition, lane, error = %e, "could not pause a full partition");
                false
            }
        }
    }

    fn resume(&self, lane: Lane) {
        let partition = partition_of(lane, self.settings.lanes_per_partition);
        match self.resume_partition(partition) {
            Ok(()) => tracing::info!(partition, lane, "partition resumed"),
            Err(e) => tracing::warn!(partition, error = %e, "could not resume a partition"),
        }
    }

    async fn close(&self) {
        self.committer.cancel();
        tokio::task::block_in_place(|| commit(&self.consumer, &self.tracker, CommitMode::Sync));
    }
}

/// Creates `topic` with `partitions` partitions if it does not exist yet.
pub async fn ensure_topic(brokers: &str, topic: &str, partitions: i32) -> Result<(), SourceError> {
    let admin: AdminClient<DefaultClientContext> = base_config(brokers)
        .create()
        .map_err(|e| kafka_err(brokers, e))?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let options = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics([&new], &options)
        .await
        .map_err(|e| SourceError::Kafka(format!("cannot reach Kafka brokers {brokers}: {e}")))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(SourceError::Kafka(format!(
                    "cannot create topic {name}: {code}"
                )));
            }
        }
    }
    Ok(())
}

/// Produces records, keyed, waiting for each batch to be acknowledged.
pub struct KafkaProducer {
    producer: FutureProducer,
    topic: String,
}

impl KafkaProducer {
    pub async fn connect(brokers: &str, topic: &str, partitions: i32) -> Result<Self, SourceError> {
        ensure_topic(brokers, topic, partitions).await?;
        let producer: FutureProducer = base_config(brokers)
            .set("linger.ms", "5")
            .set("message.timeout.ms", "30000")
            .create()
            .map_err(|e| kafka_err(brokers, e))?;
        Ok(KafkaProducer {
            producer,
            topic: topic.to_owned(),
        })
    }

    /// Sends every `(key, payload)` and waits until all are acknowledged.
    pub async fn send_all(&self, records: &[(Option<String>, Vec<u8>)]) -> Result<(), SourceError> {
        let sends = records.iter().map(|(key, payload)| {
            let mut rec: FutureRecord<'_, str, [u8]> =
                FutureRecord::to(&self.topic).payload(payload.as_slice());
            if let Some(k) = key {
                rec = rec.key(k);
            }
            self.producer.send(rec, Duration::from_secs(30))
        });
        for result in futures_util::future::join_all(sends).await {
            result.map_err(|(e, _)| {
                SourceError::Kafka(format!("produce to {} failed: {e}", self.topic))
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_keeps_its_lane_and_lanes_stay_within_their_partition() {
        let spaces: Vec<String> = (0..1000).map(|i| format!("space-{i}")).collect();
        for partition in [0, 1, 7] {
            let mut used = std::collections::BTreeSet::new();
            for space in &spaces {
                let lane = lane_of(partition, Some(space.as_bytes()), 4);
                assert_eq!(lane, lane_of(partition, Some(space.as_bytes()), 4));
                assert_eq!(partition_of(lane, 4), partition, "{space}");
                used.insert(lane);
            }
            // 1,000 spaces reach every lane of the partition.
            assert_eq!(used.len(), 4);
            assert_eq!(lane_of(partition, None, 4), partition as Lane * 4);
        }
        // One lane per partition is the partition itself.
        assert_eq!(lane_of(5, Some(b"space-1"), 1), 5);
        assert_eq!(partition_of(5, 1), 5);
    }

    fn committed(tracker: &CommitTracker) -> Vec<(i32, i64)> {
        let mut at: Vec<(i32, i64)> = tracker
            .committable()
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect();
        at.sort();
        at
    }

    /// Acknowledgements come out of order (a held event completes after later ones): the commit
    /// never passes the oldest event still in flight.
    #[test]
    fn commits_stay_below_the_oldest_event_in_flight() {
        let tracker = CommitTracker::new("t", 1000);
        for offset in 10..13 {
            tracker.read(0, offset);
        }
        tracker.read(1, 5);
        tracker.acknowledged(0, 11);
        tracker.acknowledged(0, 12);
        assert_eq!(committed(&tracker), [(0, 10), (1, 5)], "10 is still held");
        tracker.acknowledged(0, 10);
        tracker.acknowledged(1, 5);
        assert_eq!(committed(&tracker), [(0, 13), (1, 6)], "past the last read");
        let mut revoked = TopicPartitionList::new();
        revoked.add_partition("t", 1);
        tracker.forget(&revoked);
        tracker.acknowledged(1, 7); // a late ack of a revoked partition is ignored
        assert_eq!(committed(&tracker), [(0, 13)]);
    }

    #[test]
    fn a_position_names_its_partition_and_offset() {
        assert_eq!(position_numbers("events/2@41"), ("2", "41"));
        assert_eq!(position_numbers("a/b/0@7"), ("0", "7"));
    }
}
