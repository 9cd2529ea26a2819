//! `/metrics`: the counters each process already keeps, in the Prometheus text format.
//!
//! The stages count with atomics where they work (the hub, the HTTP server, the pipeline, the
//! NATS source, the membership cache); a scrape reads them through a [`Collector`] of
//! `prometheus-client`, from a registry each process builds for itself (no global recorder).
//! Every place where a message or an event can be dropped or replaced by a resync has a
//! counter here: refused and evicted connections, write stalls, rejected events by code,
//! duplicates, dead letters, resyncs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::gateway::hub::GatewayStats;
use crate::gateway::server::ServerStats;
use crate::source::nats::consumer::NatsStats;
use crate::telemetry::PipelineStats;

/// Writes one counter (a `_total` is appended by the encoder).
fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> std::fmt::Result {
    let c = ConstCounter::new(value);
    c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)
}

/// Writes one counter family, a value per label.
fn counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &'static str,
    values: &[(String, u64)],
) -> std::fmt::Result {
    let kind = ConstCounter::new(0u64).metric_type();
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (value_of_label, value) in values {
        let labels = [(label, value_of_label.as_str())];
        ConstCounter::new(*value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> std::fmt::Result {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

fn histogram(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    latency: &crate::telemetry::Latency,
) -> std::fmt::Result {
    let h = &latency.0;
    h.encode(encoder.encode_descriptor(name, help, None, h.metric_type())?)
}

fn read(a: &AtomicU64) -> u64 {
    a.load(Relaxed)
}

/// The gateway's connections and deliveries.
pub struct GatewayCollector {
    pub hub: Arc<crate::gateway::hub::Hub>,
    pub server: Arc<ServerStats>,
}

impl Collector for GatewayCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s: &GatewayStats = &self.hub.stats;
        gauge(
            &mut e,
            "foldercast_gateway_open_connections",
            "Open WebSocket and SSE connections.",
            read(&s.connections) as i64,
        )?;
        let (open, sse) = (read(&s.connections), read(&s.sse_connections));
        let kind = ConstGauge::new(0i64).metric_type();
        let mut family = e.encode_descriptor(
            "foldercast_gateway_open_connections_by_transport",
            "Open connections by transport (websocket, sse).",
            None,
            kind,
        )?;
        for (transport, n) in [("websocket", open.saturating_sub(sse)), ("sse", sse)] {
            ConstGauge::new(n as i64).encode(family.encode_family(&[("transport", transport)])?)?;
        }
        gauge(
            &mut e,
            "foldercast_gateway_users",
            "Users with at least one open connection.",
            self.hub.users() as i64,
        )?;
        counter(
            &mut e,
            "foldercast_gateway_connections",
            "Connections opened.",
            read(&s.connections_total),
        )?;
        counter(
            &mut e,
            "foldercast_gateway_frames_delivered",
            "Frames handed to connections.",
            read(&s.delivered),
        )?;
        counter(
            &mut e,
            "foldercast_gateway_sessions_evicted",
            "Slow clients closed (slow-consumer): they resume from their position.",
            read(&s.evicted),
        )?;
        gauge(
            &mut e,
            "foldercast_notifications_pending",
            "(user, notification) pairs still owed an acknowledgement across the bus (asked every 5 s; -1 until known).",
            s.notices_pending.load(Relaxed),
        )?;
        let by_code: Vec<(String, u64)> = s
            .auth_failures_by_code
            .lock()
            .map(|m| m.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect())
            .unwrap_or_default();
        counters(
            &mut e,
            "foldercast_gateway_auth_failures",
            "Refused credentials (tokens, tickets, auth timeouts), by code.",
            "code",
            &by_code,
        )?;
        let closes: Vec<(String, u64)> = s
            .closes
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default();
        counters(
            &mut e,
            "foldercast_gateway_closed",
            "WebSocket connections the server closed, by the reason it gave the client.",
            "reason",
            &closes,
        )?;
        counter(
            &mut e,
            "foldercast_gateway_refused_per_user",
            "Connections refused at --max-connections-per-user.",
            read(&s.refused_per_user),
        )?;
        counter(
            &mut e,
            "foldercast_gateway_refused_connections",
            "Connections closed on arrival at --max-connections.",
            read(&self.server.refused),
        )?;
        counter(
            &mut e,
            "foldercast_gateway_write_stalls",
            "Connections ended because a write stalled past --write-timeout.",
            read(&self.server.write_stalls),
        )?;
        counter(
            &mut e,
            "foldercast_gateway_accept_errors",
            "Failed accept calls (descriptor exhaustion).",
            read(&self.server.accept_errors),
        )?;
        gauge(
            &mut e,
            "foldercast_gateway_bus_connected",
            "1 while the bus (Redis) is reachable.",
            i64::from(self.hub.bus_connected()),
        )?;
        let resumes: Vec<(String, u64)> = s
            .resumes
            .lock()
            .map(|m| m.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect())
            .unwrap_or_default();
        counters(
            &mut e,
            "foldercast_gateway_resumes",
            "Resumes from a position (and catch-ups after a gap) by outcome: recovered, or why the client was told to refetch.",
            "outcome",
            &resumes,
        )?;
        Ok(())
    }
}

/// The consumer's events and messages.
pub struct PipelineCollector {
    pub stats: Arc<PipelineStats>,
}

impl Collector for PipelineCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.stats;
        let outcomes = [
            ("delivered".to_owned(), read(&s.delivered_events)),
            ("duplicate".to_owned(), read(&s.duplicates)),
            ("applied".to_owned(), read(&s.applied)),
            ("rejected".to_owned(), read(&s.rejected)),
        ];
        counters(
            &mut e,
            "foldercast_events",
            "Events handled, by outcome (applied: group changes).",
            "outcome",
            &outcomes,
        )?;
        let rejected: Vec<(String, u64)> = s
            .rejections()
            .into_iter()
            .map(|(code, n)| (code.to_owned(), n))
            .collect();
        counters(
            &mut e,
            "foldercast_events_rejected",
            "Events refused (counted, logged with their position, dead-lettered), by code.",
            "code",
            &rejected,
        )?;
        counter(
            &mut e,
            "foldercast_messages_published",
            "Per-user messages the bus accepted.",
            read(&s.messages),
        )?;
        counter(
            &mut e,
            "foldercast_messages_coalesced",
            "Published messages whose changes the rate limit summed from several events.",
            read(&s.coalesced),
        )?;
        counter(
            &mut e,
            "foldercast_messages_muted",
            "Messages not published because their user muted the space or does not want the type.",
            read(&s.muted),
        )?;
        counter(
            &mut e,
            "foldercast_messages_resync",
            "Published resync messages (the client must refetch), each standing for several events.",
            read(&s.resyncs),
        )?;
        gauge(
            &mut e,
            "foldercast_throttle_held_messages",
            "Messages the rate limit holds to coalesce (their events are acknowledged once these are published).",
            s.held_messages.load(Relaxed).max(0),
        )?;
        histogram(
            &mut e,
            "foldercast_bus_publish_seconds",
            "Time the bus took to accept a lane's batch (each attempt).",
            &s.publish_seconds,
        )?;
        Ok(())
    }
}

/// The NATS source's own counters.
pub struct NatsCollector {
    pub stats: Arc<NatsStats>,
}

impl Collector for NatsCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.stats;
        counter(
            &mut e,
            "foldercast_nats_received",
            "JetStream messages received.",
            read(&s.received),
        )?;
        counter(
            &mut e,
            "foldercast_nats_redelivered",
            "Messages received again (delivery count above 1).",
            read(&s.redelivered),
        )?;
        counter(
            &mut e,
            "foldercast_nats_lookups",
            "Events completed through the oCIS API.",
            read(&s.lookups),
        )?;
        counter(
            &mut e,
            "foldercast_nats_lookup_retries",
            "Lookups retried because oCIS was unreachable.",
            read(&s.lookup_retries),
        )?;
        counter(
            &mut e,
            "foldercast_nats_resyncs",
            "Events that became a space-resync (no exact change could be said).",
            read(&s.resyncs),
        )?;
        counter(
            &mut e,
            "foldercast_nats_invalidations",
            "Space events that made the members be read again.",
            read(&s.invalidations),
        )?;
        counter(
            &mut e,
            "foldercast_nats_dead_lettered",
            "Envelopes dead-lettered at their last delivery.",
            read(&s.dead_lettered),
        )?;
        gauge(
            &mut e,
            "foldercast_nats_consumer_pending",
            "The durable consumer's lag: stream messages not yet delivered to it (asked every 5 s; -1 until known).",
            s.pending.load(Relaxed),
        )?;
        gauge(
            &mut e,
            "foldercast_nats_consumer_ack_pending",
            "Messages delivered to the consumer and not yet acknowledged (asked every 5 s; -1 until known).",
            s.ack_pending.load(Relaxed),
        )?;
        let skipped: Vec<(String, u64)> = s
            .skipped
            .lock()
            .map(|m| m.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect())
            .unwrap_or_default();
        counters(
            &mut e,
            "foldercast_nats_skipped",
            "Reva events that change no folder view, by kind.",
            "kind",
            &skipped,
        )?;
        Ok(())
    }
}

/// The oCIS membership cache (nothing for a fixture).
pub struct MembershipCollector {
    pub resolver: Arc<dyn crate::membership::MembershipResolver>,
}

impl Collector for MembershipCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let Some(s) = self.resolver.cache_stats() else {
            return Ok(());
        };
        counter(
            &mut e,
            "foldercast_membership_space_fetches",
            "Requests for a space's members sent to oCIS.",
            read(&s.space_fetches),
        )?;
        counter(
            &mut e,
            "foldercast_membership_group_fetches",
            "Requests for a group's members sent to oCIS.",
            read(&s.group_fetches),
        )?;
        counter(
            &mut e,
            "foldercast_membership_fresh_hits",
            "Answers served from a fresh cache entry.",
            read(&s.fresh_hits),
        )?;
        counter(
            &mut e,
            "foldercast_membership_stale_served",
            "Answers served stale (while refreshing, or oCIS unreachable).",
            read(&s.stale_served),
        )?;
        counter(
            &mut e,
            "foldercast_membership_fetch_failures",
            "Fetches that failed because oCIS was unreachable.",
            read(&s.fetch_failures),
        )?;
        histogram(
            &mut e,
            "foldercast_membership_directory_seconds",
            "Time oCIS took to answer a space's grants or a group's members (retries included).",
            &s.directory_seconds,
        )?;
        Ok(())
    }
}

/// The Kafka source's lag, per assigned partition.
pub struct KafkaCollector {
    pub lag: Arc<crate::source::kafka::KafkaLag>,
}

impl Collector for KafkaCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let kind = ConstGauge::new(0i64).metric_type();
        let mut family = e.encode_descriptor(
            "foldercast_kafka_consumer_lag",
            "Records per assigned partition past the group's committed offset (what a crash would replay), measured every 5 s.",
            None,
            kind,
        )?;
        for (partition, lag) in self.lag.partitions() {
            let partition = partition.to_string();
            let labels = [("partition", partition.as_str())];
            ConstGauge::new(lag).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Collectors are named, not printed (the registry asks for `Debug`).
macro_rules! named_debug {
    ($($t:ty),*) => {$(
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(stringify!($t))
            }
        }
    )*};
}
named_debug!(
    GatewayCollector,
    PipelineCollector,
    NatsCollector,
    MembershipCollector,
    KafkaCollector
);

/// A process's registry.
#[derive(Default)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    pub fn register(&mut self, collector: impl Collector) {
        self.registry.register_collector(Box::new(collector));
    }

    /// The text exposition (`text/plain; version=0.0.4`, OpenMetrics-compatible).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "metrics could not be encoded");
        }
        out
    }
}
