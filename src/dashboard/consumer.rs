//! A consumer's part of the dashboard: while one is open anywhere, its counters every two
//! seconds and each event of the chosen space as it is routed.
//!
//! A consumer has no subscriber connection, so it looks (one pipelined read of two keys every
//! two seconds) instead of listening for `on`; it publishes nothing while no dashboard is
//! open. Space events go through a bounded queue: a burst past it is dropped from the view
//! (and counted), never waited for.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{REPORTS, Report, now_ms};
use crate::bus::Bus;
use crate::notify::Fanout;
use crate::telemetry::PipelineStats;

/// How often a consumer looks whether a dashboard is open (and which space it shows).
pub const LOOK_EVERY: Duration = Duration::from_secs(2);

/// Space events waiting to be published at most.
const QUEUE: usize = 1024;

pub struct ConsumerReporter {
    active: AtomicBool,
    chosen: Mutex<Option<String>>,
    events: mpsc::Sender<Report>,
    /// Space events left out of the view (the queue was full).
    pub dropped: AtomicU64,
}

impl ConsumerReporter {
    /// Starts reporting for the consumer `id` over `bus` until `stop`; `lag` measures its lag.
    pub fn spawn(
        bus: Arc<dyn Bus>,
        id: String,
        stats: Arc<PipelineStats>,
        lag: Option<Arc<dyn Fn() -> i64 + Send + Sync>>,
        stop: CancellationToken,
    ) -> Arc<ConsumerReporter> {
        let (tx, mut rx) = mpsc::channel(QUEUE);
        let reporter = Arc::new(ConsumerReporter {
            active: AtomicBool::new(false),
            chosen: Mutex::new(None),
            events: tx,
            dropped: AtomicU64::new(0),
        });
        let publisher = bus.clone();
        tokio::spawn(async move {
            while let Some(report) = rx.recv().await {
                if let Err(e) = publisher.operator_publish(REPORTS, &report.to_json()).await {
                    tracing::debug!(error = %e, "a dashboard report was not published");
                }
            }
        });
        let looking = reporter.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(LOOK_EVERY) => {}
                }
                let (active, chosen) = match bus.dashboard_state(now_ms()).await {
                    Ok(state) => state,
                    Err(e) => {
                        tracing::debug!(error = %e, "dashboard state unreadable");
                        (false, None)
                    }
                };
                looking.active.store(active, Relaxed);
                if let Ok(mut c) = looking.chosen.lock() {
                    *c = chosen.filter(|_| active);
                }
                if !active {
                    continue;
                }
                let report = Report::Pipeline {
                    id: id.clone(),
                    events: stats.events.load(Relaxed),
                    messages: stats.messages.load(Relaxed),
                    coalesced: stats.coalesced.load(Relaxed),
                    resyncs: stats.resyncs.load(Relaxed),
                    rejected: stats.rejected.load(Relaxed),
                    muted: stats.muted.load(Relaxed),
                    lag: lag.as_ref().map(|f| f()),
                };
                if let Err(e) = bus.operator_publish(REPORTS, &report.to_json()).await {
                    tracing::debug!(error = %e, "a dashboard report was not published");
                }
            }
        });
        reporter
    }

    /// Sees every routed event: reports those of the chosen space while a dashboard is open.
    pub fn observe(&self, fanout: &Fanout) {
        if !self.active.load(Relaxed) {
            return;
        }
        let chosen = self
            .chosen
            .lock()
            .map(|c| c.as_deref() == Some(&*fanout.event.space_id))
            .unwrap_or(false);
        if !chosen {
            return;
        }
        let m = &fanout.message.message;
        let report = Report::SpaceEvent {
            space: fanout.event.space_id.to_string(),
            event_id: fanout.event.id.clone(),
            event_type: m.message_type.to_owned(),
            path: m.item.as_ref().map(|i| i.path.as_str().to_owned()),
            recipients: fanout.recipients.len(),
            time: m.time.to_string(),
        };
        if self.events.try_send(report).is_err() {
            self.dropped.fetch_add(1, Relaxed);
        }
    }
}
