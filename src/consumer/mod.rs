//! The consumer driver: source → notify → throttle → bus, the one loop every command runs.
//!
//! The source's events arrive in **lanes** (Kafka partitions, shards of spaces, a file), each
//! handled in order by its own task ([`lane`]) while lanes proceed in parallel. The driver reads
//! the source, hands each event to its lane over a bounded queue, and stops them all:
//! - **backpressure**: a full lane queue holds the reader; a lane still full after
//!   [`PAUSE_AFTER`] (stuck on membership, say) is paused at the source if it can be, so the
//!   other lanes go on;
//! - **acknowledgements**: a lane runs an event's [`Ack`](crate::source::Ack) only once the bus
//!   accepted every message derived from it, held ones included ([`acks`]);
//! - **drain**: on stop, lanes finish the batch in hand, publish what the rate limiter holds at
//!   once, acknowledge what was published, and give up after the grace; events still queued are
//!   left unacknowledged, for the source to deliver again.
//!
//! `notify` knows nothing of where events come from, and commands only wire flags to
//! [`Driver`].

mod acks;
mod lane;
mod route;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock, FakeRelativeClock};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, BusError};
use crate::notify::throttle::Buckets;
use crate::notify::{Fanout, Pipeline};
use crate::source::{EventSource, Lane, SourceError, SourceEvent};
use crate::telemetry::PipelineStats;

pub use acks::AckBook;
pub use route::{Routed, process_with_retry, route};

/// How long the reader waits for room in a full lane before pausing that lane at the source.
pub const PAUSE_AFTER: Duration = Duration::from_secs(1);

/// The clock of the rate limiter: the wall clock, or event time in a replay.
pub trait LaneClock: Clock + Clone + Send + Sync + 'static {
    /// An event of time `millis` is about to be routed. True when this moved the clock (what
    /// the limiter now allows is flushed first).
    fn observe(&self, _event_millis: i64) -> bool {
        false
    }
}

impl LaneClock for DefaultClock {}

/// A clock that follows event time (never backwards), so a throttled replay is deterministic.
#[derive(Clone, Default)]
pub struct EventTimeClock {
    clock: FakeRelativeClock,
    latest: Arc<Mutex<EventTime>>,
}

#[derive(Default)]
struct EventTime {
    /// The latest event time seen, in milliseconds.
    millis: Option<i64>,
    /// How far the clock has moved in total.
    advanced: Duration,
}

/// How far event time may move a replay's clock in total. The limiter counts nanoseconds in a
/// `u64` (584 years): a schema-valid event from the year 2700 after one from today would
/// overflow it. Past this span the clock stops, which only makes the limiter stricter.
pub const MAX_REPLAY_SPAN: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

impl Clock for EventTimeClock {
    type Instant = <FakeRelativeClock as Clock>::Instant;

    fn now(&self) -> Self::Instant {
        self.clock.now()
    }
}

impl LaneClock for EventTimeClock {
    fn observe(&self, millis: i64) -> bool {
        let Ok(mut latest) = self.latest.lock() else {
            return false;
        };
        let step = match latest.millis {
            Some(before) if millis > before => Duration::from_millis(millis.abs_diff(before))
                .min(MAX_REPLAY_SPAN.saturating_sub(latest.advanced)),
            Some(_) => return false,
            None => Duration::ZERO,
        };
        latest.millis = Some(millis);
        if step.is_zero() {
            return false;
        }
        latest.advanced += step;
        self.clock.advance(step);
        true
    }
}

/// What a lane does with held messages when its input ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtEnd {
    /// Flush them as the limits allow (a live demo that ran out of events).
    WaitForLimits,
    /// Flush them at once (a replay: time stops with the input).
    FlushAll,
}

#[derive(Debug, Clone)]
pub struct Settings {
    /// Events a lane handles together (one publish).
    pub batch: usize,
    /// Events queued per lane.
    pub lane_queue: usize,
    /// How often a lane flushes what the limiter releases (`None`: only when events arrive).
    pub flush_every: Option<Duration>,
    /// After a stop, how long lanes may keep trying to publish what they hold.
    pub drain_grace: Duration,
    /// Events read per second (0 = as fast as they come).
    pub pace: f64,
    pub at_end: AtEnd,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            batch: 64,
            lane_queue: 4096,
            flush_every: Some(Duration::from_millis(50)),
            drain_grace: Duration::from_secs(10),
            pace: 0.0,
            at_end: AtEnd::WaitForLimits,
        }
    }
}

/// Sees every fan-out (the demo keeps its folder tree with it).
pub type Observer = Arc<dyn Fn(&Fanout) + Send + Sync>;

/// How the driver ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The source ran out and every lane finished.
    InputEnded,
    /// Stopped from outside; lanes drained.
    Stopped,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("publishing failed for good: {0}")]
    Bus(#[from] BusError),
}

/// What the lanes share.
struct Shared<C: LaneClock> {
    pipeline: Arc<Pipeline>,
    buckets: Option<Arc<Buckets<C>>>,
    clock: C,
    bus: Arc<dyn Bus>,
    source: Arc<dyn EventSource>,
    stats: Arc<PipelineStats>,
    observer: Option<Observer>,
    settings: Settings,
    /// Stop reading and drain.
    stop: CancellationToken,
    /// The grace is over: stop trying to publish.
    abandon: CancellationToken,
}

/// Everything the driver runs over.
pub struct Driver<C: LaneClock> {
    pub source: Arc<dyn EventSource>,
    pub pipeline: Arc<Pipeline>,
    /// The rate limiter's buckets (`None`: no limit).
    pub buckets: Option<Arc<Buckets<C>>>,
    pub clock: C,
    pub bus: Arc<dyn Bus>,
    pub stats: Arc<PipelineStats>,
    pub observer: Option<Observer>,
    pub settings: Settings,
}

impl<C: LaneClock> Driver<C> {
    /// Runs until the source ends (and every lane finished) or `stop` fires (and lanes drained).
    pub async fn run(self, stop: CancellationToken) -> Result<Ended, DriverError> {
        let shared = Arc::new(Shared {
            pipeline: self.pipeline,
            buckets: self.buckets,
            clock: self.clock,
            bus: self.bus,
            source: self.source,
            stats: self.stats,
            observer: self.observer,
            settings: self.settings,
            stop: stop.clone(),
            abandon: CancellationToken::new(),
        });
        let mut lanes: HashMap<Lane, (mpsc::Sender<SourceEvent>, JoinHandle<lane::LaneEnd>)> =
            HashMap::new();
        let read = read(&shared, &mut lanes).await;
        let ended = match &read {
            Ok(true) => Ended::InputEnded,
            _ => Ended::Stopped,
        };
        if ended == Ended::Stopped {
            // A source error stops everything as a signal would.
            stop.cancel();
            let abandon = shared.abandon.clone();
            let grace = shared.settings.drain_grace;
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                abandon.cancel();
            });
        }
        let mut failure: Option<DriverError> = None;
        let mut unacknowledged = 0;
        for (lane, (tx, handle)) in lanes.drain() {
            drop(tx);
            match handle.await {
                Ok(lane::LaneEnd::Done) => {}
                Ok(lane::LaneEnd::Abandoned { unacknowledged: n }) => unacknowledged += n,
                Ok(lane::LaneEnd::Failed(e)) => {
                    tracing::error!(lane, error = %e, "lane failed");
                    failure.get_or_insert(DriverError::Bus(e));
                }
                Err(e) => tracing::error!(lane, error = %e, "lane task failed"),
            }
        }
        shared.source.close().await;
        if unacknowledged > 0 {
            tracing::warn!(
                unacknowledged,
                "stopped with events unacknowledged: the source delivers them again"
            );
        }
        if let Err(e) = read {
            return Err(e.into());
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(ended),
        }
    }
}

/// Reads the source into the lanes until it ends (`Ok(true)`) or the driver stops (`Ok(false)`).
async fn read<C: LaneClock>(
    shared: &Arc<Shared<C>>,
    lanes: &mut HashMap<Lane, (mpsc::Sender<SourceEvent>, JoinHandle<lane::LaneEnd>)>,
) -> Result<bool, SourceError> {
    let stop = &shared.stop;
    let pace = shared.settings.pace;
    let mut pacer = (pace > 0.0 && pace.is_finite()).then(|| {
        let mut i = tokio::time::interval(Duration::from_secs_f64(1.0 / pace));
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    loop {
        if let Some(p) = pacer.as_mut() {
            tokio::select! {
                _ = stop.cancelled() => return Ok(false),
                _ = p.tick() => {}
            }
        }
        let next = tokio::select! {
            _ = stop.cancelled() => return Ok(false),
            next = shared.source.next() => next?,
        };
        let Some(event) = next else { return Ok(true) };
        let lane = event.lane;
        let (tx, _) = lanes.entry(lane).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(shared.settings.lane_queue.max(1));
            (tx, tokio::spawn(lane::run(shared.clone(), lane, rx)))
        });
        match tx.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(event)) => {
                // Under load a full lane is ordinary backpressure and takes the event soon: wait
                // for it. (Pausing at once threw librdkafka's prefetch away and refetched it on
                // every resume: 3,500 → 680 events/s.) A lane still full after PAUSE_AFTER is
                // stuck, typically on membership (oCIS down): waiting longer would stall every
                // lane and, past max.poll.interval.ms, make a Kafka consumer leave its group.
                let room = tokio::select! {
                    _ = stop.cancelled() => return Ok(false),
                    room = tokio::time::timeout(PAUSE_AFTER, tx.reserve()) => room,
                };
                match room {
                    Ok(Ok(permit)) => permit.send(event),
                    Ok(Err(_)) => return Ok(false),
                    Err(_) => hold_lane(shared, event, tx.clone()).await,
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Ok(false),
        }
    }
}

/// Pauses a stuck lane at the source and hands `event` over once there is room, then resumes
/// it: no other event of the lane arrives meanwhile, so order is kept. A source that cannot
/// pause makes the reader wait instead.
async fn hold_lane<C: LaneClock>(
    shared: &Arc<Shared<C>>,
    event: SourceEvent,
    tx: mpsc::Sender<SourceEvent>,
) {
    let lane = event.lane;
    if !shared.source.pause(lane) {
        tokio::select! {
            _ = shared.stop.cancelled() => {}
            _ = tx.send(event) => {}
        }
        return;
    }
    tracing::debug!(lane, "lane paused: its queue is full");
    let shared = shared.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = shared.stop.cancelled() => {}
            sent = tx.send(event) => {
                if sent.is_ok() {
                    shared.source.resume(lane);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

    use async_trait::async_trait;
    use governor::clock::FakeRelativeClock;

    use super::*;
    use crate::bus::{Catchup, Outgoing, Position};
    use crate::membership::{Directory, FixtureResolver};
    use crate::notify::dedup::Dedup;
    use crate::notify::throttle::ThrottleConfig;
    use crate::source::{Ack, RawEvent};

    impl LaneClock for FakeRelativeClock {}

    #[test]
    fn event_time_far_in_the_future_does_not_overflow_the_clock() {
        let clock = EventTimeClock::default();
        let year = 365 * 24 * 3600 * 1000_i64;
        assert!(
            !clock.observe(56 * year),
            "the first event only sets the time"
        );
        assert!(clock.observe(730 * year), "year 2700");
        assert!(!clock.observe(i64::MAX), "past the span the clock stops");
        let limiter = governor::RateLimiter::direct_with_clock(
            governor::Quota::per_second(std::num::NonZeroU32::MIN),
            clock.clone(),
        );
        assert!(limiter.check().is_ok());
        assert!(clock.now() > FakeRelativeClock::default().now());
    }

    /// Events handed out once, then nothing more (a Kafka topic at its end); records acks.
    struct FakeSource {
        events: Mutex<Vec<SourceEvent>>,
        acked: Arc<Mutex<Vec<String>>>,
    }

    impl FakeSource {
        fn new(ids: &[&str]) -> (Arc<Self>, Arc<Mutex<Vec<String>>>) {
            let acked = Arc::new(Mutex::new(Vec::new()));
            let events = ids
                .iter()
                .rev()
                .map(|id| {
                    let json = format!(
                        r#"{{"id":"{id}","type":"file-uploaded","time":"2026-11-22T10:00:00Z","data":{{"space_id":"s","path":"/d/{id}","kind":"file","size":1}}}}"#
                    );
                    let (acked, id) = (acked.clone(), id.to_string());
                    SourceEvent {
                        raw: RawEvent::new(json.into_bytes(), id.clone()),
                        lane: 0,
                        ack: Ack::new(move || acked.lock().unwrap().push(id)),
                    }
                })
                .collect();
            let source = Arc::new(FakeSource {
                events: Mutex::new(events),
                acked: acked.clone(),
            });
            (source, acked)
        }
    }

    #[async_trait]
    impl EventSource for FakeSource {
        async fn next(&self) -> Result<Option<SourceEvent>, SourceError> {
            let next = self.events.lock().unwrap().pop();
            match next {
                Some(event) => Ok(Some(event)),
                None => std::future::pending().await,
            }
        }
    }

    #[derive(Default)]
    struct FakeBus {
        published: Mutex<Vec<Outgoing>>,
        failing: AtomicBool,
    }

    #[async_trait]
    impl Bus for FakeBus {
        async fn publish(&self, batch: &[Outgoing]) -> Result<(), BusError> {
            if self.failing.load(Relaxed) {
                return Err(BusError::Unavailable("down".into()));
            }
            self.published.lock().unwrap().extend_from_slice(batch);
            Ok(())
        }
        async fn subscribe(&self, _: &Arc<str>) -> Result<(), BusError> {
            Ok(())
        }
        async fn unsubscribe(&self, _: &Arc<str>) -> Result<(), BusError> {
            Ok(())
        }
        async fn catch_up(
            &self,
            _: &Arc<str>,
            _: Option<&Position>,
            _: usize,
        ) -> Result<Catchup, BusError> {
            Err(BusError::Closed)
        }
    }

    struct Harness {
        acked: Arc<Mutex<Vec<String>>>,
        bus: Arc<FakeBus>,
        clock: FakeRelativeClock,
        stop: CancellationToken,
        run: JoinHandle<Result<Ended, DriverError>>,
    }

    /// One user (`ann`, the only member of `s`) limited to 1 message/s, burst 1.
    fn start(ids: &[&str], grace: Duration) -> Harness {
        let membership = r#"{"users":[{"id":"ann"}],"spaces":[{"id":"s","members":[{"user":"ann","role":"viewer"}]}]}"#;
        let directory: Directory = serde_json::from_str(membership).unwrap();
        let resolver = Arc::new(FixtureResolver::new(&directory));
        let (source, acked) = FakeSource::new(ids);
        assert!(Arc::ptr_eq(&source.acked, &acked));
        let bus = Arc::new(FakeBus::default());
        let clock = FakeRelativeClock::default();
        let config = ThrottleConfig {
            rate: 1.0,
            burst: 1,
            max_backlog: 100,
        };
        let driver = Driver {
            source,
            pipeline: Arc::new(Pipeline::new(
                Dedup::new(100, Duration::from_secs(60)),
                resolver,
            )),
            buckets: Buckets::new(config, clock.clone()),
            clock: clock.clone(),
            bus: bus.clone(),
            stats: Arc::new(PipelineStats::default()),
            observer: None,
            settings: Settings {
                drain_grace: grace,
                ..Settings::default()
            },
        };
        let stop = CancellationToken::new();
        let run = tokio::spawn(driver.run(stop.clone()));
        Harness {
            acked,
            bus,
            clock,
            stop,
            run,
        }
    }

    fn acked(h: &Harness) -> Vec<String> {
        h.acked.lock().unwrap().clone()
    }

    fn published(h: &Harness) -> usize {
        h.bus.published.lock().unwrap().len()
    }

    #[tokio::test(start_paused = true)]
    async fn held_events_are_acknowledged_only_once_their_release_was_published() {
        let mut h = start(&["e1", "e2", "e3"], Duration::from_secs(5));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(published(&h), 1, "the burst: e1 alone");
        assert_eq!(acked(&h), ["e1"], "e2 and e3 are held: not acknowledged");
        // The bucket refills: the next flush sends e2 and e3 coalesced, then acknowledges them.
        h.clock.advance(Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(published(&h), 2);
        assert_eq!(acked(&h), ["e1", "e2", "e3"]);
        h.stop.cancel();
        assert_eq!((&mut h.run).await.unwrap().unwrap(), Ended::Stopped);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_publishes_what_is_held_then_acknowledges_it() {
        let mut h = start(&["e1", "e2", "e3"], Duration::from_secs(5));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(acked(&h), ["e1"]);
        h.stop.cancel();
        assert_eq!((&mut h.run).await.unwrap().unwrap(), Ended::Stopped);
        assert_eq!(published(&h), 2, "the held change went out at once");
        assert_eq!(acked(&h), ["e1", "e2", "e3"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_final_publish_acknowledges_nothing_and_ends_within_the_grace() {
        let mut h = start(&["e1", "e2", "e3"], Duration::from_secs(3));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(acked(&h), ["e1"]);
        h.bus.failing.store(true, Relaxed);
        let stopped = tokio::time::Instant::now();
        h.stop.cancel();
        assert_eq!((&mut h.run).await.unwrap().unwrap(), Ended::Stopped);
        let took = stopped.elapsed();
        assert!(
            took >= Duration::from_secs(3) && took < Duration::from_secs(4),
            "kept trying for the grace, then gave up: {took:?}"
        );
        assert_eq!(acked(&h), ["e1"], "the held events stay unacknowledged");
        assert_eq!(published(&h), 1);
    }
}
