//! `foldercast replay`: the pipeline over a file, no server; prints what each user would receive.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::Context;
use governor::clock::FakeRelativeClock;

use crate::bus::Outgoing;
use crate::config::ReplayArgs;
use crate::consumer::{process_with_retry, route};
use crate::notify::throttle::Throttle;
use crate::notify::{Outcome, Pipeline};
use crate::source::kafka::KafkaProducer;
use crate::source::{EventSource, FixtureSource, Passes};
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
    let resolver = super::setup::resolver(&args.membership, None)?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(super::cancel_on_signal(shutdown.clone()));
    let pipeline = Pipeline::new(super::dedup(&args.shaping), resolver);
    let mut source = FixtureSource::open(&args.events, Passes::Once).await?;
    // Event time drives the throttle's clock, so a throttled replay is deterministic.
    let clock = FakeRelativeClock::default();
    let mut throttle = if args.throttle {
        Throttle::new(super::throttle_config(&args.shaping), clock.clone())
    } else {
        None
    };
    let mut event_clock = EventClock::default();
    let stats = PipelineStats::default();
    let mut printer = args
        .print
        .then(|| std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock()));
    let progress = progress_spinner("{spinner} {pos} events {per_sec} {msg}");
    let mut out: Vec<Outgoing> = Vec::new();
    let mut users = std::collections::HashSet::new();

    while let Some(raw) = source.next_event().await? {
        // Membership that cannot be resolved now (oCIS down) makes the event wait, not vanish.
        let Some(outcome) = process_with_retry(&pipeline, &raw, &shutdown).await else {
            anyhow::bail!("interrupted at {}", raw.position);
        };
        if let (Some(t), Outcome::Deliver(f)) = (throttle.as_mut(), &outcome) {
            if let Some(step) = event_clock.advance_to(f.event.time_millis) {
                clock.advance(step);
            }
            t.flush_ready(&mut out);
        }
        route(outcome, &raw.position, throttle.as_mut(), &stats, &mut out);
        emit(&mut printer, &mut out, &stats, &mut users)?;
        if let Some(bar) = &progress {
            bar.inc(1);
        }
    }
    if let Some(t) = throttle.as_mut() {
        t.flush_all(&mut out);
        emit(&mut printer, &mut out, &stats, &mut users)?;
    }
    if let Some(p) = printer.as_mut() {
        p.flush().context("cannot write to stdout")?;
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }

    let rejected = stats.rejected.load(Relaxed);
    let reasons: Vec<String> = stats
        .rejections()
        .iter()
        .map(|(code, n)| format!("{code}: {n}"))
        .collect();
    eprintln!(
        "replay: {} events, {} delivered, {} duplicates, {} rejected{}; {} messages to {} users",
        stats.events.load(Relaxed),
        stats.delivered_events.load(Relaxed),
        stats.duplicates.load(Relaxed),
        rejected,
        if reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", reasons.join(", "))
        },
        stats.messages.load(Relaxed),
        users.len(),
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
    let mut source = FixtureSource::open(&args.events, Passes::Once).await?;
    let progress = progress_spinner("{spinner} {pos} events produced {per_sec}");
    let mut batch = Vec::with_capacity(1000);
    let mut produced = 0u64;
    loop {
        let next = source.next_event().await?;
        let done = next.is_none();
        if let Some(raw) = next {
            batch.push((space_key(&raw.bytes), raw.bytes));
        }
        if batch.len() >= 1000 || (done && !batch.is_empty()) {
            producer.send_all(&batch).await?;
            produced += batch.len() as u64;
            if let Some(bar) = &progress {
                bar.inc(batch.len() as u64);
            }
            batch.clear();
        }
        if done {
            break;
        }
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    eprintln!(
        "replay: produced {produced} events to {} at {brokers}",
        args.topic
    );
    Ok(ExitCode::SUCCESS)
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

fn emit(
    printer: &mut Option<impl Write>,
    out: &mut Vec<Outgoing>,
    stats: &PipelineStats,
    users: &mut std::collections::HashSet<Arc<str>>,
) -> anyhow::Result<()> {
    stats.messages.fetch_add(out.len() as u64, Relaxed);
    for msg in out.drain(..) {
        if let Some(p) = printer.as_mut() {
            write_line(p, &msg).context("cannot write to stdout")?;
        }
        users.insert(msg.user);
    }
    Ok(())
}

/// `{"user":…,"message":…}` around the already-encoded message.
pub fn write_line(w: &mut impl Write, msg: &Outgoing) -> std::io::Result<()> {
    w.write_all(b"{\"user\":")?;
    serde_json::to_writer(&mut *w, &*msg.user)?;
    w.write_all(b",\"message\":")?;
    w.write_all(&msg.payload)?;
    w.write_all(b"}\n")
}

/// Turns event times into forward steps of a clock (time never runs backwards).
#[derive(Default)]
struct EventClock {
    latest: Option<i64>,
}

impl EventClock {
    fn advance_to(&mut self, millis: i64) -> Option<Duration> {
        let step = match self.latest {
            None => None,
            Some(latest) if millis > latest => {
                Some(Duration::from_millis((millis - latest) as u64))
            }
            Some(_) => return None,
        };
        self.latest = Some(millis);
        step
    }
}
