//! From one event's outcome to outgoing messages: counting, logging, and the rate limit.
//!
//! One step of a lane, kept apart so it can be tested alone and shared with the benchmark
//! harness.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use governor::clock::Clock;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::bus::Outgoing;
use crate::notify::throttle::Throttle;
use crate::notify::{Fanout, MembershipUnavailable, Outcome, Pipeline};
use crate::source::RawEvent;
use crate::telemetry::PipelineStats;

/// What routing one event did.
#[derive(Debug, Default)]
pub struct Routed {
    /// The fan-out, for observers (the demo keeps its folder tree with it).
    pub fanout: Option<Box<Fanout>>,
    /// Recipients whose message the rate limiter holds: the event is handled only once each
    /// of them was released and published.
    pub held: u32,
}

/// Counts `outcome`, logs a rejection with its position, and turns a fan-out into outgoing
/// messages (through the throttle when there is one).
pub fn route<C: Clock + Clone>(
    outcome: Outcome,
    position: &str,
    throttle: Option<&mut Throttle<C>>,
    stats: &PipelineStats,
    out: &mut Vec<Outgoing>,
) -> Routed {
    stats.events.fetch_add(1, Relaxed);
    match outcome {
        Outcome::Rejected(rejection) => {
            stats.count_rejection(rejection.code);
            tracing::warn!(%position, code = rejection.code, reason = %rejection.reason, "event rejected");
            Routed::default()
        }
        Outcome::Duplicate { event_id } => {
            stats.duplicates.fetch_add(1, Relaxed);
            tracing::debug!(%position, %event_id, "duplicate event dropped");
            Routed::default()
        }
        Outcome::Applied { event_id } => {
            stats.applied.fetch_add(1, Relaxed);
            tracing::debug!(%position, %event_id, "group change applied");
            Routed::default()
        }
        Outcome::Deliver(fanout) => {
            stats.delivered_events.fetch_add(1, Relaxed);
            if fanout.muted > 0 {
                stats.muted.fetch_add(fanout.muted as u64, Relaxed);
                tracing::debug!(event_id = %fanout.event.id, muted = fanout.muted, "left out by their preferences");
            }
            let before = out.len();
            let mut whole = true;
            let mut held = 0;
            match throttle {
                Some(t) => {
                    // A membership message is never held (admit may still report it as not
                    // "as it is": it flushed a pending change before it).
                    let holdable = !fanout.message.message.is_never_held();
                    for user in fanout.recipients.iter() {
                        let as_is = t.admit(user, &fanout.message, out);
                        whole &= as_is;
                        held += u32::from(holdable && !as_is);
                    }
                }
                None => out.extend(fanout.recipients.iter().map(|u| fanout.message.to(u))),
            }
            if whole {
                // Every recipient's message went out now, together: the bus may guard the
                // event once rather than per user.
                Outgoing::mark_whole_event(&mut out[before..]);
            }
            tracing::debug!(event_id = %fanout.event.id, recipients = fanout.recipients.len(), sent = out.len() - before, held, "event routed");
            Routed {
                fanout: Some(fanout),
                held,
            }
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
            muted: 0,
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
