//! `foldercast consume`: Kafka (consumer group) → pipeline → Redis, at least once.
//!
//! One task reads the assigned partitions and hands each record to its partition's worker over
//! a bounded channel, so a partition's events keep their order while partitions proceed in
//! parallel. A worker marks an offset handled only after Redis accepted every message of the
//! event (or the event went to the dead-letter topic). Bus failures are retried with backoff,
//! never skipped. Commits go out every `--commit-interval` or `--commit-batch` events, before a
//! rebalance revokes partitions, and on SIGINT/SIGTERM after the pending messages are flushed.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::DefaultClock;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, Outgoing, RedisBus};
use crate::config::ConsumeArgs;
use crate::consumer::{process_with_retry, route};
use crate::notify::throttle::Throttle;
use crate::notify::{Outcome, Pipeline};
use crate::source::kafka::{CommitTracker, KafkaRecord, KafkaSettings, KafkaSource};
use crate::telemetry::PipelineStats;

type SharedThrottle = Arc<Mutex<Option<Throttle<DefaultClock>>>>;

/// What every worker shares.
struct Shared {
    pipeline: Pipeline,
    bus: Arc<RedisBus>,
    source: Arc<KafkaSource>,
    throttle: SharedThrottle,
    stats: PipelineStats,
    shutdown: CancellationToken,
    since_commit: AtomicU64,
    commit_batch: u64,
    commit_now: Notify,
}

pub fn consume(args: ConsumeArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(consume_async(args))?;
    Ok(ExitCode::SUCCESS)
}

async fn consume_async(args: ConsumeArgs) -> anyhow::Result<()> {
    let resolver = super::setup::resolver(&args.membership, None)?;
    let pipeline = Pipeline::new(super::dedup(&args.shaping), resolver);
    let bus = RedisBus::connect(
        &super::redis_target(&args.redis),
        super::redis_options(&args.redis),
        None,
    )
    .await?;
    let throttle: SharedThrottle = Arc::new(Mutex::new(Throttle::new(
        super::throttle_config(&args.shaping),
        DefaultClock::default(),
    )));
    let floor = {
        let throttle = throttle.clone();
        Box::new(move || {
            throttle
                .lock()
                .ok()
                .and_then(|t| t.as_ref().map(|t| t.held_floor()))
                .unwrap_or_default()
        })
    };
    let tracker = Arc::new(CommitTracker::new(&args.topic, floor));
    let options = args
        .kafka_options
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .ok_or_else(|| anyhow::anyhow!("--kafka-option {kv:?} is not key=value"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let settings = KafkaSettings {
        brokers: args.brokers.clone(),
        topic: args.topic.clone(),
        group: args.group.clone(),
        dead_letter_topic: args.dead_letter_topic.clone(),
        session_timeout: args.session_timeout,
        options,
    };
    let source = Arc::new(KafkaSource::connect(settings, tracker).await?);
    tracing::info!(topic = %args.topic, group = %args.group, "consuming");

    let shutdown = CancellationToken::new();
    tokio::spawn(super::cancel_on_signal(shutdown.clone()));
    let shared = Arc::new(Shared {
        pipeline,
        bus,
        source: source.clone(),
        throttle,
        stats: PipelineStats::default(),
        shutdown: shutdown.clone(),
        since_commit: AtomicU64::new(0),
        commit_batch: args.commit_batch.max(1),
        commit_now: Notify::new(),
    });
    let flusher = tokio::spawn(flush_held(shared.clone()));
    let committer = tokio::spawn(commit_periodically(shared.clone(), args.commit_interval));

    let mut workers: HashMap<i32, (mpsc::Sender<KafkaRecord>, JoinHandle<()>)> = HashMap::new();
    loop {
        let record = tokio::select! {
            _ = shutdown.cancelled() => break,
            record = source.recv() => record?,
        };
        let (tx, _) = workers.entry(record.partition).or_insert_with(|| {
            // Deep enough to take a whole fetch of the partition without holding the reader.
            let (tx, rx) = mpsc::channel(WORKER_QUEUE);
            (tx, tokio::spawn(partition_worker(rx, shared.clone())))
        });
        match tx.try_send(record) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(record)) => {
                // Under load a full worker is ordinary backpressure (Redis is the bottleneck)
                // and takes the record soon: wait for it. Pausing at once threw librdkafka's
                // prefetch away and refetched it on every resume (3,500 → 680 events/s). A
                // worker still full after PAUSE_AFTER is stuck, typically on membership (oCIS
                // down): waiting longer would stall every partition and, past
                // max.poll.interval.ms, make us leave the group, so pause just that one.
                let room = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    room = tokio::time::timeout(PAUSE_AFTER, tx.reserve()) => room,
                };
                match room {
                    Ok(Ok(permit)) => permit.send(record),
                    Ok(Err(_)) => break,
                    Err(_) => hold_partition(record, tx.clone(), source.clone(), shutdown.clone()),
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => break,
        }
    }

    // Graceful stop: let workers finish what they hold, flush held messages, commit.
    for (_, (tx, handle)) in workers.drain() {
        drop(tx);
        let _ = tokio::time::timeout(Duration::from_secs(10), handle).await;
    }
    flusher.abort();
    committer.abort();
    let mut out = Vec::new();
    if let Ok(mut t) = shared.throttle.lock()
        && let Some(t) = t.as_mut()
    {
        t.flush_all(&mut out);
    }
    if !out.is_empty() {
        let _ = tokio::time::timeout(Duration::from_secs(10), shared.bus.publish(&out)).await;
    }
    tokio::task::block_in_place(|| source.commit(true));
    tracing::info!(
        events = shared.stats.events.load(Relaxed),
        rejected = shared.stats.rejected.load(Relaxed),
        messages = shared.stats.messages.load(Relaxed),
        "stopped"
    );
    Ok(())
}

/// How long the reader waits for room in a full partition worker before pausing that partition.
const PAUSE_AFTER: Duration = Duration::from_secs(1);

/// Pauses `record`'s partition, hands the record to its worker once there is room, then resumes
/// fetching. No other record of the partition arrives while it is paused, so order is kept.
fn hold_partition(
    record: KafkaRecord,
    tx: mpsc::Sender<KafkaRecord>,
    source: Arc<KafkaSource>,
    shutdown: CancellationToken,
) {
    let partition = record.partition;
    match source.pause(partition) {
        Ok(()) => tracing::info!(partition, "partition paused: its worker is full"),
        Err(e) => tracing::warn!(partition, error = %e, "could not pause a full partition"),
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            sent = tx.send(record) => {
                if sent.is_ok() {
                    match source.resume(partition) {
                        Ok(()) => tracing::info!(partition, "partition resumed"),
                        Err(e) => tracing::warn!(partition, error = %e, "could not resume a partition"),
                    }
                }
            }
        }
    });
}

/// Records queued per partition worker (about 1 KiB each).
const WORKER_QUEUE: usize = 4096;

/// Events handled together: processed in order, published as one pipeline, then marked.
const WORKER_BATCH: usize = 64;

async fn partition_worker(mut records: mpsc::Receiver<KafkaRecord>, shared: Arc<Shared>) {
    let mut batch = Vec::with_capacity(WORKER_BATCH);
    while let Some(first) = records.recv().await {
        batch.push(first);
        // Take what is already queued (never wait for more): big pipelines keep Redis busy.
        while batch.len() < WORKER_BATCH {
            match records.try_recv() {
                Ok(record) => batch.push(record),
                Err(_) => break,
            }
        }
        if !handle(&shared, &batch).await {
            return;
        }
        batch.clear();
    }
}

/// Handles records of one partition, in order; false when shutting down before they were fully
/// handled (their offsets are then not marked, and a later consumer replays them).
async fn handle(shared: &Shared, records: &[KafkaRecord]) -> bool {
    let mut out = Vec::new();
    for record in records {
        let Some(mut outcome) =
            process_with_retry(&shared.pipeline, &record.raw, &shared.shutdown).await
        else {
            return false;
        };
        match &mut outcome {
            Outcome::Rejected(rejection) => shared.source.dead_letter(record, rejection).await,
            Outcome::Deliver(fanout) => {
                fanout.message.origin = Some((record.partition, record.offset))
            }
            Outcome::Duplicate { .. } | Outcome::Applied { .. } => {}
        }
        let Ok(mut throttle) = shared.throttle.lock() else {
            return false;
        };
        route(
            outcome,
            &record.raw.position,
            throttle.as_mut(),
            &shared.stats,
            &mut out,
        );
    }
    if !publish_with_retry(shared, &out).await {
        return false;
    }
    for record in records {
        shared
            .source
            .tracker
            .handled(record.partition, record.offset);
    }
    if shared.since_commit.fetch_add(records.len() as u64, Relaxed) + records.len() as u64
        >= shared.commit_batch
    {
        shared.commit_now.notify_one();
    }
    true
}

/// Publishes until Redis accepts; false if shutdown came first.
async fn publish_with_retry(shared: &Shared, out: &[Outgoing]) -> bool {
    if out.is_empty() {
        return true;
    }
    let mut delay = Duration::from_millis(100);
    loop {
        match shared.bus.publish(out).await {
            Ok(()) => {
                shared.stats.messages.fetch_add(out.len() as u64, Relaxed);
                return true;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "publish to redis failed; retrying");
                tokio::select! {
                    _ = shared.shutdown.cancelled() => return false,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Sends what the rate limiter releases.
async fn flush_held(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        let mut out = Vec::new();
        if let Ok(mut t) = shared.throttle.lock()
            && let Some(t) = t.as_mut()
        {
            t.flush_ready(&mut out);
        }
        publish_with_retry(&shared, &out).await;
    }
}

async fn commit_periodically(shared: Arc<Shared>, interval: Duration) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shared.commit_now.notified() => {}
        }
        shared.since_commit.store(0, Relaxed);
        let source = shared.source.clone();
        let _ = tokio::task::spawn_blocking(move || source.commit(false)).await;
    }
}
