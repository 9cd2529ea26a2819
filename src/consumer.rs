//! The consuming side's driver: source → notify → throttle → bus, one event at a time.
//!
//! Reading runs in its own task feeding a bounded channel, so a slow sink slows the reader
//! (backpressure) and a waiting reader never blocks the throttle's flushes. Events are processed
//! strictly in order: a space's changes reach each user in the order they happened.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use governor::clock::Clock;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::bus::{Bus, BusError, Outgoing};
use crate::notify::throttle::Throttle;
use crate::notify::{Fanout, MembershipUnavailable, Outcome, Pipeline};
use crate::source::{EventSource, RawEvent, SourceError};
use crate::telemetry::PipelineStats;

/// Counts `outcome`, logs a rejection with its position, and turns a fan-out into outgoing
/// messages (through the throttle when there is one). Returns the fan-out for observers.
pub fn route<C: Clock + Clone>(
    outcome: Outcome,
    position: &str,
    throttle: Option<&mut Throttle<C>>,
    stats: &PipelineStats,
    out: &mut Vec<Outgoing>,
) -> Option<Box<Fanout>> {
    stats.events.fetch_add(1, Relaxed);
    match outcome {
        Outcome::Rejected(rejection) => {
            stats.count_rejection(rejection.code);
            tracing::warn!(%position, code = rejection.code, reason = %rejection.reason, "event rejected");
            None
        }
        Outcome::Duplicate { event_id } => {
            stats.duplicates.fetch_add(1, Relaxed);
            tracing::debug!(%position, %event_id, "duplicate event dropped");
            None
        }
        Outcome::Applied { event_id } => {
            tracing::debug!(%position, %event_id, "group change applied");
            None
        }
        Outcome::Deliver(fanout) => {
            stats.delivered_events.fetch_add(1, Relaxed);
            let before = out.len();
            match throttle {
                Some(t) => {
                    for user in fanout.recipients.iter() {
                        t.admit(user, &fanout.message, out);
                    }
                }
                None => out.extend(fanout.recipients.iter().map(|u| fanout.message.to(u))),
            }
            tracing::debug!(event_id = %fanout.event.id, recipients = fanout.recipients.len(), sent = out.len() - before, "event routed");
            Some(fanout)
        }
    }
}

/// Processes one event, waiting (with backoff) while membership is unavailable: an event is
/// never dropped because the directory is down.
pub async fn process_with_retry(
    pipeline: &Pipeline,
    raw: &RawEvent,
    shutdown: &CancellationToken,
) -> Option<Outcome> {
    let mut delay = Duration::from_millis(100);
    loop {
        let span = tracing::debug_span!("event", position = %raw.position);
        match pipeline.process(&raw.bytes).instrument(span).await {
            Ok(outcome) => return Some(outcome),
            Err(MembershipUnavailable(reason)) => {
                tracing::warn!(position = %raw.position, %reason, retry_in = ?delay, "membership unavailable; holding event");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Reads `source` into a bounded channel, at most `rate` events per second (0 = unpaced).
pub fn spawn_reader(
    mut source: Box<dyn EventSource>,
    rate: f64,
    shutdown: CancellationToken,
) -> (
    mpsc::Receiver<RawEvent>,
    tokio::task::JoinHandle<Result<(), SourceError>>,
) {
    let (tx, rx) = mpsc::channel(1024);
    let handle = tokio::spawn(async move {
        let mut pacer = (rate > 0.0 && rate.is_finite()).then(|| {
            let mut i = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        loop {
            if let Some(p) = pacer.as_mut() {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = p.tick() => {}
                }
            }
            let next = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                next = source.next_event() => next?,
            };
            let Some(event) = next else { return Ok(()) };
            if tx.send(event).await.is_err() {
                return Ok(());
            }
        }
    });
    (rx, handle)
}

/// Runs the live loop until the input ends or `shutdown` fires. `observe` sees every fan-out
/// (the demo keeps its folder tree with it).
pub async fn run_live<C: Clock + Clone>(
    mut events: mpsc::Receiver<RawEvent>,
    pipeline: &Pipeline,
    mut throttle: Option<Throttle<C>>,
    bus: &dyn Bus,
    stats: &PipelineStats,
    shutdown: &CancellationToken,
    mut observe: impl FnMut(&Fanout),
) -> Result<(), BusError> {
    let mut flush = tokio::time::interval(Duration::from_millis(50));
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = Vec::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = flush.tick(), if throttle.is_some() => {
                if let Some(t) = throttle.as_mut() {
                    t.flush_ready(&mut out);
                }
            }
            next = events.recv() => {
                let Some(raw) = next else { break };
                let Some(outcome) = process_with_retry(pipeline, &raw, shutdown).await else { break };
                if let Some(fanout) = route(outcome, &raw.position, throttle.as_mut(), stats, &mut out) {
                    observe(&fanout);
                }
            }
        }
        if !out.is_empty() {
            bus.publish(&out).await?;
            stats.messages.fetch_add(out.len() as u64, Relaxed);
            out.clear();
        }
    }
    // Input ended: whatever the throttle still holds is owed to its users.
    if let Some(t) = throttle.as_mut() {
        while t.pending_users() > 0 && !shutdown.is_cancelled() {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = flush.tick() => t.flush_ready(&mut out),
            }
            if !out.is_empty() {
                bus.publish(&out).await?;
                stats.messages.fetch_add(out.len() as u64, Relaxed);
                out.clear();
            }
        }
    }
    Ok(())
}
