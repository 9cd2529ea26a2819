//! Kafka: the production event source (a consumer group), its dead-letter topic, and the
//! producer that loads fixture files into a topic.
//!
//! At-least-once: auto-commit is off. An offset becomes committable only once the event is fully
//! handled (every message accepted by the bus, or the event sent to the dead-letter topic), and
//! never past an event whose messages are still held back by the rate limiter (the "floor" the
//! caller reports). Commits go out in batches, synchronously before partitions are revoked in a
//! rebalance, and on shutdown. Events a new owner replays are caught by the bus's per-user guard.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

use super::{RawEvent, SourceError};
use crate::event::Rejection;

/// Consumer settings.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub brokers: String,
    pub topic: String,
    pub group: String,
    pub dead_letter_topic: String,
    pub session_timeout: Duration,
    /// Extra librdkafka properties (`key=value`), applied last.
    pub options: Vec<(String, String)>,
}

fn kafka_err(brokers: &str, e: KafkaError) -> SourceError {
    SourceError::Kafka(format!("{brokers}: {e}"))
}

/// Offsets fully handled, per partition (the next offset to consume), and the floor function
/// that reports, per partition, the oldest offset whose messages are still held.
pub struct CommitTracker {
    topic: String,
    done: Mutex<HashMap<i32, i64>>,
    floor: Box<dyn Fn() -> HashMap<i32, i64> + Send + Sync>,
}

impl CommitTracker {
    pub fn new(topic: &str, floor: Box<dyn Fn() -> HashMap<i32, i64> + Send + Sync>) -> Self {
        CommitTracker {
            topic: topic.to_owned(),
            done: Mutex::new(HashMap::new()),
            floor,
        }
    }

    /// Records that the event at `offset` is fully handled.
    pub fn handled(&self, partition: i32, offset: i64) {
        if let Ok(mut done) = self.done.lock() {
            let next = done.entry(partition).or_insert(offset + 1);
            *next = (*next).max(offset + 1);
        }
    }

    /// What may be committed now: per partition the handled position, held back to the floor.
    pub fn committable(&self) -> TopicPartitionList {
        let floor = (self.floor)();
        let mut tpl = TopicPartitionList::new();
        if let Ok(done) = self.done.lock() {
            for (&partition, &next) in done.iter() {
                let at = floor.get(&partition).map_or(next, |&f| f.min(next));
                let _ = tpl.add_partition_offset(&self.topic, partition, Offset::Offset(at));
            }
        }
        tpl
    }

    fn forget(&self, partitions: &TopicPartitionList) {
        if let Ok(mut done) = self.done.lock() {
            for p in partitions.elements() {
                done.remove(&p.partition());
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

/// One consumed record, owned.
#[derive(Debug, Clone)]
pub struct KafkaRecord {
    pub raw: RawEvent,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

pub struct KafkaSource {
    consumer: StreamConsumer<GroupContext>,
    dead_letters: FutureProducer,
    settings: KafkaSettings,
    pub tracker: Arc<CommitTracker>,
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
    pub async fn connect(
        settings: KafkaSettings,
        tracker: Arc<CommitTracker>,
    ) -> Result<Self, SourceError> {
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
            // Small fetches, so the consumer queue interleaves partitions in short runs: a long
            // run of one partition fills that partition's worker and holds the reader, while the
            // other workers starve (3 partitions took turns in runs of 30,000 records on tansu,
            // which returns up to fetch.max.bytes from one partition; 4,200 → 4,700 events/s).
            // --kafka-option overrides them.
            .set("fetch.max.bytes", "1048576")
            .set("max.partition.fetch.bytes", "262144");
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
        Ok(KafkaSource {
            consumer,
            dead_letters,
            settings,
            tracker,
        })
    }

    /// The next record (any assigned partition).
    pub async fn recv(&self) -> Result<KafkaRecord, SourceError> {
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
                    return Ok(KafkaRecord {
                        raw: RawEvent {
                            bytes: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                            position: format!("{}/{}@{}", m.topic(), m.partition(), m.offset()),
                        },
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(<[u8]>::to_vec),
                        headers,
                    });
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
    /// [`resume`](Self::resume), fetches again from the record after the last one `recv` returned,
    /// so nothing is skipped and order is kept.
    pub fn pause(&self, partition: i32) -> Result<(), SourceError> {
        self.consumer
            .pause(&self.one_partition(partition))
            .map_err(|e| SourceError::Kafka(format!("pausing partition {partition}: {e}")))
    }

    pub fn resume(&self, partition: i32) -> Result<(), SourceError> {
        self.consumer
            .resume(&self.one_partition(partition))
            .map_err(|e| SourceError::Kafka(format!("resuming partition {partition}: {e}")))
    }

    fn one_partition(&self, partition: i32) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.settings.topic, partition);
        tpl
    }

    /// Commits what is committable (asynchronously; `sync` on shutdown).
    pub fn commit(&self, sync: bool) {
        let tpl = self.tracker.committable();
        if tpl.count() == 0 {
            return;
        }
        let mode = if sync {
            CommitMode::Sync
        } else {
            CommitMode::Async
        };
        if let Err(e) = self.consumer.commit(&tpl, mode) {
            // No assignment right now (mid-rebalance) is normal; anything else is worth a word.
            if !matches!(e, KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) {
                tracing::warn!(error = %e, "offset commit failed; will retry");
            }
        }
    }

    /// Sends a refused record to the dead-letter topic with its original bytes, key and headers,
    /// plus headers naming the error and where it came from. Retries until the broker accepts.
    pub async fn dead_letter(&self, record: &KafkaRecord, rejection: &Rejection) {
        let partition = record.partition.to_string();
        let offset = record.offset.to_string();
        let mut headers = OwnedHeaders::new();
        for (k, v) in &record.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        for (key, value) in [
            ("foldercast-error-code", rejection.code),
            ("foldercast-error", rejection.reason.as_str()),
            ("foldercast-source-topic", self.settings.topic.as_str()),
            ("foldercast-source-partition", partition.as_str()),
            ("foldercast-source-offset", offset.as_str()),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut delay = Duration::from_millis(100);
        loop {
            let mut rec: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.settings.dead_letter_topic)
                    .payload(record.raw.bytes.as_slice())
                    .headers(headers.clone());
            if let Some(k) = &record.key {
                rec = rec.key(k.as_slice());
            }
            match self.dead_letters.send(rec, Duration::from_secs(10)).await {
                Ok(_) => return,
                Err((e, _)) => {
                    tracing::warn!(error = %e, position = %record.raw.position, "dead-letter send failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
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
