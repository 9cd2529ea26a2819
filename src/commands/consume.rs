//! `foldercast consume`: Kafka (consumer group) → the driver → Redis, each event exactly once
//! per user.
//!
//! Only wiring: the Kafka source (a partition is a lane, offsets committed below what is in
//! flight), the pipeline, the rate limiter's buckets, the Redis bus, and the driver that runs
//! them until SIGINT/SIGTERM.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use governor::clock::DefaultClock;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, RedisBus};
use crate::config::ConsumeArgs;
use crate::consumer::{Driver, Settings};
use crate::notify::throttle::Buckets;
use crate::source::kafka::{KafkaSettings, KafkaSource};
use crate::telemetry::PipelineStats;

pub fn consume(args: ConsumeArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(consume_async(args))?;
    Ok(ExitCode::SUCCESS)
}

async fn consume_async(args: ConsumeArgs) -> anyhow::Result<()> {
    let resolver = super::setup::resolver(&args.membership, None)?;
    let pipeline = super::pipeline(&args.shaping, resolver);
    let bus = RedisBus::connect(
        &super::redis_target(&args.redis),
        super::redis_options(&args.redis),
        None,
    )
    .await?;
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
        commit_interval: args.commit_interval,
        commit_batch: args.commit_batch,
        options,
    };
    let source = Arc::new(KafkaSource::connect(settings).await?);
    tracing::info!(topic = %args.topic, group = %args.group, "consuming");

    let stop = CancellationToken::new();
    tokio::spawn(super::cancel_on_signal(stop.clone()));
    let stats = Arc::new(PipelineStats::default());
    let clock = DefaultClock::default();
    let driver = Driver {
        source,
        pipeline: Arc::new(pipeline),
        buckets: Buckets::new(super::throttle_config(&args.shaping), clock.clone()),
        clock,
        bus: bus as Arc<dyn Bus>,
        stats: stats.clone(),
        observer: None,
        settings: Settings {
            drain_grace: args.drain_grace,
            ..Settings::default()
        },
    };
    let ended = driver.run(stop).await?;
    tracing::info!(
        events = stats.events.load(Relaxed),
        rejected = stats.rejected.load(Relaxed),
        messages = stats.messages.load(Relaxed),
        ?ended,
        "stopped"
    );
    Ok(())
}
