//! `foldercast consume`: Kafka (consumer group) or oCIS's NATS JetStream → the driver → Redis,
//! each event exactly once per user.
//!
//! Only wiring: the source (Kafka: a partition is a lane, offsets committed below what is in
//! flight; JetStream: a durable consumer, lanes by space, lookups through oCIS), the pipeline,
//! the rate limiter's buckets, the Redis bus, and the driver that runs them until
//! SIGINT/SIGTERM.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use governor::clock::DefaultClock;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, RedisBus};
use crate::config::ConsumeArgs;
use crate::consumer::{Driver, Settings};
use crate::membership::MembershipResolver;
use crate::notify::throttle::Buckets;
use crate::source::EventSource;
use crate::source::kafka::{KafkaSettings, KafkaSource};
use crate::source::nats::consumer::{JetStreamSettings, JetStreamSource, StartAt};
use crate::source::nats::jetstream::StreamTarget;
use crate::source::nats::lookup::Completer;
use crate::telemetry::PipelineStats;

pub fn consume(args: ConsumeArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(consume_async(args))?;
    Ok(ExitCode::SUCCESS)
}

async fn consume_async(args: ConsumeArgs) -> anyhow::Result<()> {
    // Signals first: one that comes while connecting (or while waiting for oCIS's stream)
    // stops the command cleanly, with nothing consumed.
    let stop = CancellationToken::new();
    super::cancel_on_signal(stop.clone());
    let setup = async {
        let resolver = super::setup::resolver(&args.membership, None)?;
        let bus = RedisBus::connect(
            &super::redis_target(&args.redis),
            super::redis_options(&args.redis),
            None,
        )
        .await?;
        let preferences = Arc::new(crate::preferences::PreferenceFilter::new(
            bus.clone() as Arc<dyn crate::bus::Bus>,
            args.shaping.preferences_ttl,
        ));
        let pipeline =
            super::pipeline(&args.shaping, resolver.clone()).with_preferences(preferences);
        let (source, nats_stats, kafka_lag): (Arc<dyn EventSource>, _, _) =
            match (&args.nats.nats, &args.brokers) {
                (Some(url), _) => {
                    let source = nats_source(&args, url, resolver.clone()).await?;
                    let stats = source.stats().clone();
                    (source, Some(stats), None)
                }
                (None, Some(brokers)) => {
                    let source = kafka_source(&args, brokers).await?;
                    let lag = source.lag();
                    (source as Arc<dyn EventSource>, None, Some(lag))
                }
                (None, None) => {
                    anyhow::bail!("give --brokers HOSTS (Kafka) or --nats URL (oCIS)")
                }
            };
        anyhow::Ok((resolver, pipeline, bus, source, nats_stats, kafka_lag))
    };
    let (resolver, pipeline, bus, source, nats_stats, kafka_lag) = tokio::select! {
        _ = stop.cancelled() => {
            tracing::info!("stopped before consuming anything");
            return Ok(());
        }
        ready = setup => ready?,
    };
    let stats = Arc::new(PipelineStats::default());
    if let Some(addr) = args.metrics_listen {
        let (stats, nats_stats, directory) = (stats.clone(), nats_stats.clone(), resolver.clone());
        let kafka_lag = kafka_lag.clone();
        super::serve_metrics(addr, move || {
            let mut m = crate::metrics::Metrics::default();
            m.register(crate::metrics::PipelineCollector {
                stats: stats.clone(),
            });
            m.register(crate::metrics::MembershipCollector {
                resolver: directory.clone(),
            });
            if let Some(nats) = &nats_stats {
                m.register(crate::metrics::NatsCollector {
                    stats: nats.clone(),
                });
            }
            if let Some(lag) = &kafka_lag {
                m.register(crate::metrics::KafkaCollector { lag: lag.clone() });
            }
            axum::response::IntoResponse::into_response((
                [(
                    axum::http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                m.render(),
            ))
        })
        .await?;
    }
    // The dashboard's view of this consumer: published only while one is open.
    let lag: Option<Arc<dyn Fn() -> i64 + Send + Sync>> = kafka_lag.clone().map(|lag| {
        Arc::new(move || lag.partitions().iter().map(|(_, n)| n).sum::<i64>())
            as Arc<dyn Fn() -> i64 + Send + Sync>
    });
    let reporter = crate::dashboard::consumer::ConsumerReporter::spawn(
        bus.clone() as Arc<dyn Bus>,
        format!("consume-{:08x}", rand::random::<u32>()),
        stats.clone(),
        lag,
        stop.clone(),
    );
    let observer: crate::consumer::Observer = Arc::new(move |fanout| reporter.observe(fanout));
    let clock = DefaultClock::default();
    let driver = Driver {
        source,
        pipeline: Arc::new(pipeline),
        buckets: Buckets::new(super::throttle_config(&args.shaping), clock.clone()),
        clock,
        bus: bus as Arc<dyn Bus>,
        stats: stats.clone(),
        observer: Some(observer),
        settings: Settings {
            drain_grace: args.drain_grace,
            lane_queue: lane_queue(&args),
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

/// Events queued per lane. A Kafka partition's lanes share what one lane per partition used to
/// queue (4,096 records: enough for the runs of one partition's records a broker hands out),
/// so more lanes hold no more events in memory.
fn lane_queue(args: &ConsumeArgs) -> usize {
    let one = Settings::default();
    if args.brokers.is_none() {
        return one.lane_queue;
    }
    (one.lane_queue / args.kafka_lanes_per_partition.max(1) as usize).max(2 * one.batch)
}

async fn kafka_source(args: &ConsumeArgs, brokers: &str) -> anyhow::Result<Arc<KafkaSource>> {
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
        brokers: brokers.to_owned(),
        topic: args.kafka.topic.clone(),
        group: args.kafka.group.clone(),
        dead_letter_topic: args.kafka.dead_letter_topic.clone(),
        session_timeout: args.session_timeout,
        commit_interval: args.commit_interval,
        commit_batch: args.commit_batch,
        lanes_per_partition: args.kafka_lanes_per_partition,
        options,
    };
    let source = KafkaSource::connect(settings).await?;
    tracing::info!(topic = %args.kafka.topic, group = %args.kafka.group, "consuming from Kafka");
    Ok(Arc::new(source))
}

async fn nats_source(
    args: &ConsumeArgs,
    url: &str,
    resolver: Arc<dyn MembershipResolver>,
) -> anyhow::Result<Arc<JetStreamSource>> {
    let n = &args.nats;
    let start = match n.start.as_str() {
        "new" => StartAt::New,
        "all" => StartAt::All,
        time => StartAt::Time(
            chrono::DateTime::parse_from_rfc3339(time)
                .map_err(|e| {
                    anyhow::anyhow!("--nats-start {time:?}: new, all or an RFC 3339 time ({e})")
                })?
                .to_utc(),
        ),
    };
    let settings = JetStreamSettings {
        target: StreamTarget {
            url: url.to_owned(),
            stream: n.stream.clone(),
            subject: n.subject.clone().unwrap_or_else(|| n.stream.clone()),
        },
        durable: n.durable.clone(),
        start,
        ack_wait: n.ack_wait,
        max_deliver: n.max_deliver,
        max_ack_pending: n.max_ack_pending,
        dead_letter_subject: n.dead_letter_subject.clone(),
        lanes: n.lanes,
    };
    let items = super::setup::item_lookups(&args.membership)?;
    if items.is_none() {
        tracing::warn!(
            "no --ocis-url: events that need a lookup (uploads, moves, trash, restores) resync their space"
        );
    }
    let source = JetStreamSource::connect(settings, Completer::new(items), resolver).await?;
    tracing::info!(stream = %n.stream, durable = %n.durable, "consuming oCIS events from NATS JetStream");
    Ok(Arc::new(source))
}
