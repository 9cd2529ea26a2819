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
            let mut whole = true;
            match throttle {
                Some(t) => {
                    for user in fanout.recipients.iter() {
                        whole &= t.admit(user, &fanout.message, out);
                    }
                }
                None => out.extend(fanout.recipients.iter().map(|u| fanout.message.to(u))),
            }
            if whole {
                // Every recipient's message went out now, together: the bus may guard the
                // event once rather than per user.
                Outgoing::mark_whole_event(&mut out[before..]);
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use governor::clock::FakeRelativeClock;

    use super::*;
    use crate::notify::message::{Prepared, UserMessage};
    use crate::notify::throttle::ThrottleConfig;

    fn upload(id: &str, users: &[&str]) -> Outcome {
        let json = format!(
            r#"{{"id":"{id}","type":"file-uploaded","time":"2026-11-22T10:00:00Z","data":{{"space_id":"s","path":"/f","kind":"file","size":1,"actor":"ann"}}}}"#
        );
        let event = crate::event::decode(json.as_bytes()).unwrap();
        let message = Prepared::new(UserMessage::from_event(&event));
        let recipients: Vec<Arc<str>> = users.iter().map(|u| Arc::from(*u)).collect();
        Outcome::Deliver(Box::new(Fanout {
            event,
            recipients: recipients.into(),
            message,
        }))
    }

    fn whole_marks(out: &[Outgoing]) -> Vec<u32> {
        out.iter().map(|o| o.whole_event).collect()
    }

    #[test]
    fn an_event_is_marked_whole_only_when_every_recipient_got_it_now() {
        let stats = PipelineStats::default();
        let mut out = Vec::new();
        // No rate limit: always whole.
        route::<FakeRelativeClock>(upload("e0", &["a", "b", "c"]), "0", None, &stats, &mut out);
        assert_eq!(whole_marks(&out), [3, 3, 3]);

        let config = ThrottleConfig {
            rate: 1.0,
            burst: 1,
            max_backlog: 100,
        };
        let mut throttle = Throttle::new(config, FakeRelativeClock::default());
        let mut out = Vec::new();
        route(
            upload("e1", &["a"]),
            "1",
            throttle.as_mut(),
            &stats,
            &mut out,
        );
        route(
            upload("e2", &["b", "c"]),
            "2",
            throttle.as_mut(),
            &stats,
            &mut out,
        );
        assert_eq!(whole_marks(&out), [1, 2, 2]);
        // a is over its limit: e3 is held for a, so d's message is only a part of e3.
        route(
            upload("e3", &["a", "d"]),
            "3",
            throttle.as_mut(),
            &stats,
            &mut out,
        );
        assert_eq!(whole_marks(&out[3..]), [0]);
        assert_eq!(&*out[3].user, "d");
        assert!(out.iter().all(|o| o.event_id.is_some()));
        assert_eq!(Outgoing::whole_run(&out[1..]), Some(2));
        assert_eq!(Outgoing::whole_run(&out[3..]), None);
    }
}
