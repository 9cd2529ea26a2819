//! Logging setup and the counters the commands report.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `fields` (with `message`), `spans`.
    Json,
}

/// Logs to stderr; `filter` is a tracing directive such as `info` or `foldercast=debug`.
pub fn init_logging(filter: &str) {
    init_logging_as(filter, LogFormat::Text);
}

/// [`init_logging`] in a given format.
pub fn init_logging_as(filter: &str, format: LogFormat) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    // A second init (tests) is harmless: keep the first subscriber.
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
}

/// Pipeline counters, shared by the stages of one process.
#[derive(Default)]
pub struct PipelineStats {
    pub events: AtomicU64,
    pub delivered_events: AtomicU64,
    pub duplicates: AtomicU64,
    /// Group membership changes applied to the cache (they change no folder view).
    pub applied: AtomicU64,
    pub messages: AtomicU64,
    /// Published messages that stand for several events: `coalesced` (their changes summed by
    /// the rate limit) and `resync` (the client must refetch).
    pub coalesced: AtomicU64,
    pub resyncs: AtomicU64,
    /// Messages not published because their user chose not to get them (muted space or
    /// unwanted type, `preferences.rs`).
    pub muted: AtomicU64,
    /// Messages the rate limiter holds right now, over all lanes (their events are not
    /// acknowledged to the source until these are published).
    pub held_messages: std::sync::atomic::AtomicI64,
    /// How long the bus took to accept a lane's batch (each attempt, failed ones included).
    pub publish_seconds: Latency,
    pub rejected: AtomicU64,
    rejected_by_code: Mutex<BTreeMap<&'static str, u64>>,
}

/// A histogram of latencies in seconds, from 0.5 ms to about 4 s.
#[derive(Debug)]
pub struct Latency(pub prometheus_client::metrics::histogram::Histogram);

impl Latency {
    /// Records the time since `started`.
    pub fn since(&self, started: std::time::Instant) {
        self.0.observe(started.elapsed().as_secs_f64());
    }
}

impl Default for Latency {
    fn default() -> Self {
        Latency(prometheus_client::metrics::histogram::Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 14),
        ))
    }
}

impl PipelineStats {
    pub fn count_rejection(&self, code: &'static str) {
        self.rejected.fetch_add(1, Relaxed);
        if let Ok(mut map) = self.rejected_by_code.lock() {
            *map.entry(code).or_default() += 1;
        }
    }

    pub fn rejections(&self) -> BTreeMap<&'static str, u64> {
        self.rejected_by_code
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }
}
