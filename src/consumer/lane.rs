//! One lane: its events in order, through notify and its own share of the rate limiter, to the
//! bus, then acknowledged.
//!
//! A lane is the only publisher of what it read, held messages included: its batch and its
//! throttle's flushes go out from the same task, one after the other, so a user's messages never
//! overtake each other. An event is acknowledged once the batch it came in was published and
//! every message the limiter held for it was released and published ([`super::acks`]).
//!
//! A lane stops in one of three ways: its input ended (flush what is held, as the limits allow
//! or at once), the driver stopped it (publish what is held at once, within the grace), or a
//! publish failed for good (publish nothing more: what it held was never acknowledged, so the
//! source delivers it again, in order).

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::sync::mpsc;

use super::acks::AckBook;
use super::route::{process_with_retry, route};
use super::{AtEnd, LaneClock, Shared};
use crate::bus::{BusError, Outgoing};
use crate::notify::Outcome;
use crate::notify::throttle::{EventRef, Throttle};
use crate::source::{Lane, SourceEvent};

/// How a lane ended.
#[derive(Debug)]
pub(super) enum LaneEnd {
    /// Everything it read was published and acknowledged (or the input ended with nothing held).
    Done,
    /// Stopped with `unacknowledged` events left to the source to deliver again.
    Abandoned { unacknowledged: usize },
    /// The bus refused for good.
    Failed(BusError),
}

pub(super) async fn run<C: LaneClock>(
    shared: std::sync::Arc<Shared<C>>,
    lane: Lane,
    mut events: mpsc::Receiver<SourceEvent>,
) -> LaneEnd {
    let mut state = LaneState {
        throttle: shared.buckets.as_ref().map(|b| b.lane()),
        book: AckBook::default(),
        shared: &shared,
        lane,
        reported_held: 0,
    };
    let settings = &shared.settings;
    let mut tick = tokio::time::interval(settings.flush_every.unwrap_or(Duration::from_secs(3600)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ticking = settings.flush_every.is_some() && state.throttle.is_some();
    let mut batch = Vec::with_capacity(settings.batch);
    let input_ended = loop {
        tokio::select! {
            biased;
            _ = shared.stop.cancelled() => break false,
            _ = tick.tick(), if ticking => {
                if let Err(end) = state.flush(false).await {
                    return end;
                }
                state.report_held();
            }
            first = events.recv() => {
                let Some(first) = first else { break true };
                batch.push(first);
                while batch.len() < settings.batch {
                    match events.try_recv() {
                        Ok(event) => batch.push(event),
                        Err(_) => break,
                    }
                }
                if let Err(end) = state.handle(&mut batch).await {
                    return end;
                }
                state.report_held();
            }
        }
    };
    if input_ended && !shared.stop.is_cancelled() {
        match settings.at_end {
            AtEnd::FlushAll => {
                if let Err(end) = state.flush(true).await {
                    return end;
                }
            }
            AtEnd::WaitForLimits => {
                while state
                    .throttle
                    .as_ref()
                    .is_some_and(|t| t.pending_users() > 0)
                {
                    tokio::select! {
                        _ = shared.stop.cancelled() => break,
                        _ = tick.tick() => {
                            if let Err(end) = state.flush(false).await {
                                return end;
                            }
                        }
                    }
                }
            }
        }
    }
    // Stopped (or stopped while waiting for the limits): what is held goes out now.
    if state
        .throttle
        .as_ref()
        .is_some_and(|t| t.pending_users() > 0)
    {
        if let Err(end) = state.flush(true).await {
            return end;
        }
        tracing::info!(lane, "drained: held messages published");
    }
    LaneEnd::Done
}

struct LaneState<'a, C: LaneClock> {
    throttle: Option<Throttle<C>>,
    book: AckBook,
    shared: &'a Shared<C>,
    lane: Lane,
    /// This lane's share of the held-messages gauge, as last added to it.
    reported_held: usize,
}

impl<C: LaneClock> Drop for LaneState<'_, C> {
    fn drop(&mut self) {
        // A lane that ends takes its share with it (what it held was flushed or abandoned).
        self.shared
            .stats
            .held_messages
            .fetch_sub(self.reported_held as i64, Relaxed);
    }
}

impl<C: LaneClock> LaneState<'_, C> {
    /// Moves the shared gauge of held messages by this lane's change since its last report.
    fn report_held(&mut self) {
        let now = self.book.held();
        let change = now as i64 - self.reported_held as i64;
        if change != 0 {
            self.shared.stats.held_messages.fetch_add(change, Relaxed);
            self.reported_held = now;
        }
    }

    /// Handles `batch` in order (emptying it): processed, routed, published, acknowledged.
    async fn handle(&mut self, batch: &mut Vec<SourceEvent>) -> Result<(), LaneEnd> {
        let shared = self.shared;
        let mut out = Vec::new();
        let mut handled: Vec<(EventRef, u32, crate::source::Ack)> = Vec::with_capacity(batch.len());
        for event in batch.drain(..) {
            let processed = match &event.raw.rejected {
                Some(rejection) => Some(Outcome::Rejected(rejection.clone())),
                None => process_with_retry(&shared.pipeline, &event.raw, &shared.stop).await,
            };
            let Some(mut outcome) = processed else {
                // Stopped while membership was down: nothing of this batch went out.
                return Err(self.abandon(handled.len() + 1));
            };
            let number = self.book.number();
            match &mut outcome {
                Outcome::Rejected(rejection) => {
                    if !self.dead_letter(&event, rejection).await {
                        return Err(self.abandon(handled.len() + 1));
                    }
                }
                Outcome::Deliver(fanout) => {
                    fanout.message.origin = Some(number);
                    if let Some(t) = self.throttle.as_mut()
                        && shared.clock.observe(fanout.event.time_millis)
                    {
                        t.flush_ready(&mut out);
                    }
                }
                Outcome::Duplicate { .. } | Outcome::Applied { .. } => {}
            }
            let routed = route(
                outcome,
                &event.raw.position,
                self.throttle.as_mut(),
                &shared.stats,
                &mut out,
            );
            if let (Some(observe), Some(fanout)) = (&shared.observer, &routed.fanout) {
                observe(fanout);
            }
            handled.push((number, routed.held, event.ack));
        }
        let mut released = Vec::new();
        if let Some(t) = self.throttle.as_mut() {
            t.take_released(&mut released);
        }
        if let Err(end) = self.publish(&out).await {
            return Err(match end {
                LaneEnd::Abandoned { .. } => self.abandon(handled.len()),
                other => other,
            });
        }
        for (number, held, ack) in handled {
            if let Some(ack) = self.book.published(number, held, ack) {
                ack.ack();
            }
        }
        self.acknowledge_released(released);
        Ok(())
    }

    /// Publishes what the limiter releases (everything when `all`), then acknowledges the
    /// events that completes.
    async fn flush(&mut self, all: bool) -> Result<(), LaneEnd> {
        let Some(t) = self.throttle.as_mut() else {
            return Ok(());
        };
        let mut out = Vec::new();
        if all {
            t.flush_all(&mut out);
        } else {
            t.flush_ready(&mut out);
        }
        let mut released = Vec::new();
        t.take_released(&mut released);
        if let Err(end) = self.publish(&out).await {
            return Err(match end {
                LaneEnd::Abandoned { .. } => self.abandon(0),
                other => other,
            });
        }
        self.acknowledge_released(released);
        Ok(())
    }

    fn acknowledge_released(&mut self, released: Vec<EventRef>) {
        for number in released {
            if let Some(ack) = self.book.released(number) {
                ack.ack();
            }
        }
    }

    /// Publishes until the bus accepts, retrying with backoff; gives up when the driver's grace
    /// is over, or at once when the bus is closed for good.
    async fn publish(&self, out: &[Outgoing]) -> Result<(), LaneEnd> {
        if out.is_empty() {
            return Ok(());
        }
        let shared = self.shared;
        let mut delay = Duration::from_millis(100);
        loop {
            let started = std::time::Instant::now();
            let result = shared.bus.publish(out).await;
            shared.stats.publish_seconds.since(started);
            match result {
                Ok(()) => {
                    shared.stats.messages.fetch_add(out.len() as u64, Relaxed);
                    for covers in out.iter().filter_map(|m| m.covers.as_ref()) {
                        if covers.event_ids.is_empty() {
                            continue;
                        }
                        let counter = if covers.sums_changes() {
                            &shared.stats.coalesced
                        } else {
                            &shared.stats.resyncs
                        };
                        counter.fetch_add(1, Relaxed);
                    }
                    return Ok(());
                }
                Err(BusError::Closed) => return Err(LaneEnd::Failed(BusError::Closed)),
                Err(e) => {
                    tracing::warn!(lane = self.lane, error = %e, retry_in = ?delay, "publish failed; retrying");
                    tokio::select! {
                        _ = shared.abandon.cancelled() => return Err(LaneEnd::Abandoned { unacknowledged: 0 }),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Sends a refused event to the source's dead letters, retrying until the grace is over.
    async fn dead_letter(&self, event: &SourceEvent, rejection: &crate::event::Rejection) -> bool {
        let shared = self.shared;
        let mut delay = Duration::from_millis(100);
        loop {
            match shared.source.dead_letter(event, rejection).await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::warn!(position = %event.raw.position, error = %e, retry_in = ?delay, "dead letter failed; retrying");
                    tokio::select! {
                        _ = shared.abandon.cancelled() => return false,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Gives up: `in_batch` events of the current batch and every event waiting for held
    /// messages stay unacknowledged; what the limiter holds is dropped unpublished (the source
    /// delivers those events again, in order).
    fn abandon(&mut self, in_batch: usize) -> LaneEnd {
        let unacknowledged = in_batch + self.book.waiting();
        self.throttle = None;
        tracing::warn!(
            lane = self.lane,
            unacknowledged,
            "lane stopped before publishing everything; its source delivers those events again"
        );
        LaneEnd::Abandoned { unacknowledged }
    }
}
