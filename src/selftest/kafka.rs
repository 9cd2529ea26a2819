//! Kafka: the brokers answer, the topic exists (and its partitions), the dead-letter topic
//! exists, and how far the consumer group lags.
//!
//! rdkafka's metadata and offset calls block: they run on the blocking pool.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::{Check, STEP_TIMEOUT};

const SYSTEM: &str = "kafka";

/// What to check: the flags `consume` takes.
#[derive(Debug, Clone)]
pub struct Target {
    pub brokers: String,
    pub topic: String,
    pub group: String,
    pub dead_letter_topic: String,
}

pub async fn check(target: Target) -> Vec<Check> {
    match tokio::task::spawn_blocking(move || check_blocking(&target)).await {
        Ok(checks) => checks,
        Err(e) => vec![Check::fail(
            SYSTEM,
            format!("the check itself failed: {e}"),
            "report this as a bug",
        )],
    }
}

fn check_blocking(t: &Target) -> Vec<Check> {
    let mut checks = Vec::new();
    let consumer: BaseConsumer = match ClientConfig::new()
        .set("bootstrap.servers", &t.brokers)
        .set("group.id", &t.group)
        .set("broker.address.family", "v4")
        .set("socket.connection.setup.timeout.ms", "5000")
        .set("enable.auto.commit", "false")
        .create()
    {
        Ok(c) => c,
        Err(e) => {
            checks.push(Check::fail(
                SYSTEM,
                format!("bad Kafka settings: {e}"),
                "check --brokers (host:port[,host:port…])",
            ));
            return checks;
        }
    };
    let metadata = match consumer.fetch_metadata(None, STEP_TIMEOUT) {
        Ok(m) => m,
        Err(e) => {
            checks.push(Check::fail(
                SYSTEM,
                format!("cannot reach the brokers {}: {e}", t.brokers),
                "check --brokers and that the brokers accept this host",
            ));
            return checks;
        }
    };
    checks.push(Check::pass(
        SYSTEM,
        format!(
            "brokers {}: reachable, {} broker(s)",
            t.brokers,
            metadata.brokers().len()
        ),
    ));
    let partitions = |topic: &str| -> Result<Vec<i32>, String> {
        let m = consumer
            .fetch_metadata(Some(topic), STEP_TIMEOUT)
            .map_err(|e| e.to_string())?;
        let Some(found) = m.topics().iter().find(|x| x.name() == topic) else {
            return Err("not in the metadata".into());
        };
        if let Some(err) = found.error() {
            return Err(RDKafkaErrorCode::from(err).to_string());
        }
        if found.partitions().is_empty() {
            return Err("no partitions".into());
        }
        Ok(found.partitions().iter().map(|p| p.id()).collect())
    };
    let parts = match partitions(&t.topic) {
        Ok(p) => {
            checks.push(Check::pass(
                SYSTEM,
                format!("topic {}: {} partition(s)", t.topic, p.len()),
            ));
            p
        }
        Err(e) => {
            checks.push(Check::fail(
                SYSTEM,
                format!("topic {} does not exist ({e})", t.topic),
                format!(
                    "create it with as many partitions as consumers you will run (kafka-topics --create --topic {} --partitions 6), or point --topic at the one the storage events go to",
                    t.topic
                ),
            ));
            Vec::new()
        }
    };
    match partitions(&t.dead_letter_topic) {
        Ok(_) => checks.push(Check::pass(
            SYSTEM,
            format!("dead-letter topic {}: exists", t.dead_letter_topic),
        )),
        Err(e) => checks.push(Check::fail(
            SYSTEM,
            format!(
                "dead-letter topic {} does not exist ({e}): malformed events could not be set aside",
                t.dead_letter_topic
            ),
            format!("create it (kafka-topics --create --topic {})", t.dead_letter_topic),
        )),
    }
    if !parts.is_empty() {
        checks.push(lag(&consumer, t, &parts));
    }
    checks
}

/// The group's lag: what the topic holds past the group's committed offsets.
fn lag(consumer: &BaseConsumer, t: &Target, parts: &[i32]) -> Check {
    let mut list = TopicPartitionList::new();
    for p in parts {
        list.add_partition(&t.topic, *p);
    }
    let committed = match consumer.committed_offsets(list, STEP_TIMEOUT) {
        Ok(c) => c,
        Err(e) => {
            return Check::skipped(
                SYSTEM,
                format!("group {}: committed offsets unreadable ({e})", t.group),
            );
        }
    };
    let (mut lag, mut uncommitted) = (0i64, 0usize);
    for p in parts {
        let (low, high) = match consumer.fetch_watermarks(&t.topic, *p, Duration::from_secs(5)) {
            Ok(w) => w,
            Err(e) => {
                return Check::skipped(
                    SYSTEM,
                    format!("partition {p}: watermarks unreadable ({e})"),
                );
            }
        };
        match committed.find_partition(&t.topic, *p).map(|e| e.offset()) {
            Some(Offset::Offset(at)) => lag += (high - at).max(0),
            _ => {
                uncommitted += 1;
                lag += high - low;
            }
        }
    }
    Check::pass(
        SYSTEM,
        format!(
            "group {}: lag {lag} event(s){}",
            t.group,
            if uncommitted > 0 {
                format!(
                    " ({uncommitted} partition(s) with no commit yet, counted from their start)"
                )
            } else {
                String::new()
            }
        ),
    )
}
