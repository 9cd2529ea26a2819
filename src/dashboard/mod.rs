//! The operator's live view: what gateways and consumers report while a dashboard is open.
//!
//! Follows the pub-sub dashboard design: nothing is reported while nobody watches. A gateway
//! whose first viewer arrives records itself in `fc:{dashboard}:watching` and broadcasts `on`
//! on [`CONTROL`]; every gateway then starts reporting on [`REPORTS`] (its counts at once, then
//! its connection opens and closes and a snapshot a second), and consumers (which look every
//! few seconds) report their throughput and the events of the space chosen on a dashboard.
//! When the last viewer anywhere leaves, `off` stops them all. A gateway that starts asks
//! whether a dashboard is open. Until then, a gateway's only cost is one atomic load per
//! connection opened or closed, and not a single Redis command (`tests/dashboard.rs` counts).
//!
//! The gateway's side (the page, the viewers' stream, the aggregation) is in
//! `gateway::dashboard`; the consumer's in [`consumer`].

pub mod consumer;

use serde::{Deserialize, Serialize};

/// Broadcasts `on` (a dashboard opened: report) and `off` (none left: stop).
pub const CONTROL: &str = "fc:{dashboard}:control";
/// Where gateways and consumers report, as JSON [`Report`]s.
pub const REPORTS: &str = "fc:{dashboard}:reports";

pub const ON: &str = "on";
pub const OFF: &str = "off";

/// How long a gateway's record of showing a dashboard lasts without a renewal.
pub const WATCH_TTL_MS: i64 = 15_000;

/// One report on [`REPORTS`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Report {
    /// A gateway's counts now.
    Gateway {
        id: String,
        connections: u64,
        websocket: u64,
        sse: u64,
        users: u64,
        /// Users with the most connections, most first.
        busiest: Vec<(String, u64)>,
        /// Connections watching each space (from their watches), most first.
        spaces: Vec<(String, u64)>,
    },
    /// A connection opened or closed.
    Connection {
        gateway: String,
        user: String,
        transport: String,
        opened: bool,
    },
    /// A consumer's counters since it started (the page computes rates).
    Pipeline {
        id: String,
        events: u64,
        messages: u64,
        coalesced: u64,
        resyncs: u64,
        rejected: u64,
        muted: u64,
        /// Records behind, over its assigned partitions (Kafka).
        lag: Option<i64>,
    },
    /// An event of the space chosen on a dashboard, as a consumer routed it.
    SpaceEvent {
        space: String,
        event_id: String,
        event_type: String,
        path: Option<String>,
        recipients: usize,
        time: String,
    },
}

impl Report {
    pub fn to_json(&self) -> String {
        // Plain strings and numbers: serialising cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
