//! `foldercast replay`: the pipeline over a file, no server; prints what each user would receive.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::Context;

use crate::bus::{Bus, LinesBus};
use crate::config::ReplayArgs;
use crate::consumer::{AtEnd, Driver, DriverError, Ended, EventTimeClock, Settings};
use crate::notify::throttle::Buckets;
use crate::source::kafka::KafkaProducer;
use crate::source::nats::jetstream::{EnvelopeProducer, StreamTarget};
use crate::source::{FixtureSource, Passes};
use crate::telemetry::PipelineStats;

pub fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(replay_async(args))
}

async fn replay_async(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    if args.to_kafka {
        return to_kafka(&args).await;
    }
    if let Some(url) = &args.to_nats {
        return to_nats(&args, url).await;
    }
    let resolver = super::setup::resolver(&args.membership, None)?;
    let stop = tokio_util::sync::CancellationToken::new();
    super::cancel_on_signal(stop.clone());
    let source = FixtureSource::open(&args.events, Passes::Once)
        .await?
        .with_max_line(args.shaping.max_event_bytes);
    // Event time drives the throttle's clock, so a throttled replay is deterministic.
    let clock = EventTimeClock::default();
    let output: Option<Box<dyn Write + Send>> = args.print.then(|| {
        Box::new(std::io::BufWriter::with_capacity(
            1 << 20,
            std::io::stdout(),
        )) as Box<dyn Write + Send>
    });
    let bus = Arc::new(LinesBus::new(output));
    let stats = Arc::new(PipelineStats::default());
    let progress = progress_spinner("{spinner} {pos} messages {per_sec} {msg}");
    let driver = Driver {
        source: Arc::new(source),
        pipeline: Arc::new(super::pipeline(&args.shaping, resolver)),
        buckets: if args.throttle {
            Buckets::new(super::throttle_config(&args.shaping), clock.clone())
        } else {
            None
        },
        clock,
        bus: bus.clone() as Arc<dyn Bus>,
        stats: stats.clone(),
        observer: progress.clone().map(|bar| {
            Arc::new(move |_: &crate::notify::Fanout| bar.inc(1)) as crate::consumer::Observer
        }),
        settings: Settings {
            // Time is event time: flush as events arrive, everything at the end.
            flush_every: None,
            at_end: AtEnd::FlushAll,
            ..Settings::default()
        },
    };
    let ended = driver.run(stop).await;
    bus.flush().context("cannot write to stdout")?;
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    match ended {
        Ok(Ended::InputEnded) => {}
        Ok(Ended::Stopped) => anyhow::bail!("interrupted"),
        // A closed stdout ends the output; say so only if it was not a pipe being closed.
        Err(DriverError::Bus(_)) => anyhow::bail!("cannot write to stdout"),
        Err(e) => return Err(e.into()),
    }

    let rejected = stats.rejected.load(Relaxed);
    let reasons: Vec<String> = stats
        .rejections()
        .iter()
        .map(|(code, n)| format!("{code}: {n}"))
        .collect();
    eprintln!(
        "replay: {} events, {} delivered, {} duplicates, {} applied, {} rejected{}; {} messages to {} users",
        stats.events.load(Relaxed),
        stats.delivered_events.load(Relaxed),
        stats.duplicates.load(Relaxed),
        stats.applied.load(Relaxed),
        rejected,
        if reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", reasons.join(", "))
        },
        stats.messages.load(Relaxed),
        bus.users(),
    );
    Ok(if args.strict && rejected > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// A progress spinner on stderr, only when stderr is a terminal.
fn progress_spinner(template: &str) -> Option<indicatif::ProgressBar> {
    std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template(template)
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    })
}

/// `replay --to-kafka`: every line of the file (bad ones too: they are what the dead-letter
/// path is for) produced to the topic, keyed by `data.space_id` so a space's events stay in
/// order within one partition.
async fn to_kafka(args: &ReplayArgs) -> anyhow::Result<ExitCode> {
    let brokers = args
        .brokers
        .as_deref()
        .context("--to-kafka needs --brokers")?;
    let producer = KafkaProducer::connect(brokers, &args.topic, args.partitions).await?;
    let progress = progress_spinner("{spinner} {pos} events produced {per_sec}");
    let produced = in_batches(args, 1000, async |batch: Vec<Vec<u8>>| {
        let keyed: Vec<_> = batch.into_iter().map(|b| (space_key(&b), b)).collect();
        producer.send_all(&keyed).await?;
        if let Some(bar) = &progress {
            bar.inc(keyed.len() as u64);
        }
        Ok(())
    })
    .await?;
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    eprintln!(
        "replay: produced {produced} events to {} at {brokers}",
        args.topic
    );
    Ok(ExitCode::SUCCESS)
}

/// `replay --to-nats`: every line of the file into the stream, in order, each stored by
/// JetStream before the command ends.
async fn to_nats(args: &ReplayArgs, url: &str) -> anyhow::Result<ExitCode> {
    let target = StreamTarget {
        url: url.to_owned(),
        stream: args.nats_stream.clone(),
        subject: args
            .nats_subject
            .clone()
            .unwrap_or_else(|| args.nats_stream.clone()),
    };
    let producer = EnvelopeProducer::connect(&target).await?;
    let published = in_batches(args, 256, async |batch: Vec<Vec<u8>>| {
        producer.publish_all(&batch).await?;
        Ok(())
    })
    .await?;
    eprintln!(
        "replay: published {published} events to stream {} (subject {}) at {url}",
        target.stream, target.subject
    );
    Ok(ExitCode::SUCCESS)
}

/// Reads the file's lines (bad ones too: they are what dead letters are for) and hands them
/// to `send` in batches of `size`, in order; returns how many went.
async fn in_batches(
    args: &ReplayArgs,
    size: usize,
    mut send: impl AsyncFnMut(Vec<Vec<u8>>) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    let source = FixtureSource::open(&args.events, Passes::Once)
        .await?
        .with_max_line(args.shaping.max_event_bytes);
    let mut batch = Vec::with_capacity(size);
    let mut sent = 0u64;
    loop {
        let next = source.next_raw().await?;
        let done = next.is_none();
        if let Some(raw) = next {
            batch.push(raw.bytes);
        }
        if batch.len() >= size || (done && !batch.is_empty()) {
            sent += batch.len() as u64;
            send(std::mem::replace(&mut batch, Vec::with_capacity(size))).await?;
        }
        if done {
            return Ok(sent);
        }
    }
}

fn space_key(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Keyed {
        data: KeyedData,
    }
    #[derive(serde::Deserialize)]
    struct KeyedData {
        space_id: String,
    }
    serde_json::from_slice::<Keyed>(bytes)
        .ok()
        .map(|k| k.data.space_id)
}
