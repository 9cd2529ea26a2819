//! The benchmarks' command line: one subcommand per benchmark.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use foldercast::config::parse_duration;

#[derive(Debug, Parser)]
#[command(
    name = "foldercast-bench",
    version,
    about = "foldercast's benchmarks: each prints its figures and the command that reproduces them",
    long_about = "foldercast's benchmarks, kept out of the product binary. Each prints its figures, the \
baseline measured in the same run where there is one, and how to reproduce them; `scripts/bench.sh` runs \
them with the servers they need. Benchmarks that run foldercast itself start the `foldercast` binary found \
next to this one (or the one given with --binary).",
    after_help = "Examples:\n  foldercast-bench replay --events 1000000\n  scripts/bench.sh consume"
)]
pub struct Cli {
    /// Log filter (tracing directives). Logs go to stderr.
    #[arg(long, global = true, env = "FOLDERCAST_LOG", default_value = "warn")]
    pub log: String,

    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Pipeline throughput on a generated trace (events/s and messages/s, one core).
    Replay(BenchReplayArgs),
    /// Gateway resident memory per idle authenticated WebSocket connection.
    Idle(BenchIdleArgs),
    /// Kafka → `consume` → Redis throughput, next to redis-benchmark's limit on the same Redis.
    Consume(BenchConsumeArgs),
    /// Gateway fan-out from Redis to 1 000 WebSocket clients: throughput, latency, CPU, next to a
    /// bare axum loop.
    Fanout(BenchFanoutArgs),
    /// Gateway CPU per delivered message with /metrics on and scraped every second, next to
    /// --metrics off, in the same run (target: within 5 %).
    Metrics(BenchMetricsArgs),
    /// The oCIS membership resolver: warm-cache throughput next to the fixture resolver, and
    /// requests to oCIS per space per TTL under paced load.
    Membership(BenchMembershipArgs),
    /// oCIS's NATS JetStream against Kafka into the same Redis, each through `consume`
    /// (events/s ratio), and requests to oCIS per event under a burst into one folder.
    Ingest(BenchIngestArgs),
    /// A notification to 100,000 users (--all): publish time, the longest Redis command, time
    /// until 10,000 connected clients have it.
    Publish(BenchPublishArgs),
    /// A reconnect storm: clients of a killed gateway all resume at once from a new one (time to
    /// catch up, peak memory, Redis commands per resume).
    Storm(BenchStormArgs),
    /// The baseline `bench idle` compares with: a bare axum WebSocket loop (internal use).
    #[command(hide = true)]
    BareGateway {
        #[arg(long, env = "FOLDERCAST_LISTEN", default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// WebSocket write buffer per connection, bytes (the gateway's `--ws-write-buffer`).
        #[arg(long, env = "FOLDERCAST_WS_WRITE_BUFFER", default_value_t = 8192)]
        write_buffer: usize,
    },
}

#[derive(Debug, Args)]
pub struct BenchReplayArgs {
    /// Events in the generated trace.
    #[arg(long, env = "FOLDERCAST_BENCH_EVENTS", default_value_t = 1_000_000)]
    pub events: u64,
    /// Members per space.
    #[arg(long, env = "FOLDERCAST_BENCH_MEMBERS", default_value_t = 20)]
    pub members: usize,
    /// Folder depth of every path.
    #[arg(long, env = "FOLDERCAST_BENCH_DEPTH", default_value_t = 8)]
    pub depth: usize,
    /// Spaces in the trace.
    #[arg(long, env = "FOLDERCAST_BENCH_SPACES", default_value_t = 1000)]
    pub spaces: usize,
}

#[derive(Debug, Args)]
pub struct BenchMembershipArgs {
    /// Events in the warm-cache throughput trace.
    #[arg(long, env = "FOLDERCAST_BENCH_EVENTS", default_value_t = 500_000)]
    pub events: u64,
    /// Spaces (each a project space in the bench's LibreGraph server).
    #[arg(long, env = "FOLDERCAST_BENCH_SPACES", default_value_t = 1000)]
    pub spaces: usize,
    /// Members per space.
    #[arg(long, env = "FOLDERCAST_BENCH_MEMBERS", default_value_t = 20)]
    pub members: usize,
    /// Events paced across --paced-seconds for the request count.
    #[arg(long, env = "FOLDERCAST_BENCH_PACED_EVENTS", default_value_t = 100_000)]
    pub paced_events: u64,
    /// Length of the paced run, seconds.
    #[arg(long, env = "FOLDERCAST_BENCH_PACED_SECONDS", default_value_t = 10)]
    pub paced_seconds: u64,
    /// The short TTL of the second paced run.
    #[arg(long, env = "FOLDERCAST_BENCH_SHORT_TTL", default_value = "2s", value_parser = parse_duration)]
    pub short_ttl: Duration,
}

#[derive(Debug, Args)]
pub struct BenchConsumeArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "FOLDERCAST_KAFKA_BROKERS")]
    pub brokers: String,
    /// Standalone Redis URL (redis-benchmark runs against the same server).
    #[arg(long, env = "FOLDERCAST_REDIS")]
    pub redis: String,
    /// Events in the trace.
    #[arg(long, env = "FOLDERCAST_BENCH_EVENTS", default_value_t = 100_000)]
    pub events: u64,
    /// Members per space.
    #[arg(long, env = "FOLDERCAST_BENCH_MEMBERS", default_value_t = 20)]
    pub members: usize,
    /// Spaces in the trace.
    #[arg(long, env = "FOLDERCAST_BENCH_SPACES", default_value_t = 1000)]
    pub spaces: usize,
    /// The foldercast binary to run as the consumer (default: this one).
    #[arg(long, env = "FOLDERCAST_BENCH_BINARY")]
    pub binary: Option<PathBuf>,
    /// Rounds; each produces the trace, consumes it, then measures the Redis-bound limit right
    /// after, so every ratio compares two measurements taken seconds apart (the machine's speed
    /// drifts over minutes). The median round is reported.
    #[arg(long, env = "FOLDERCAST_BENCH_ROUNDS", default_value_t = 3)]
    pub rounds: usize,
    /// The consumer's `--user-rate` (0: limit off). The trace gives each user about 4
    /// messages a second, so at the default 20 nothing is coalesced and every message still
    /// counts: this measures what the limiter costs on the way.
    #[arg(long, env = "FOLDERCAST_BENCH_USER_RATE", default_value_t = 0.0)]
    pub user_rate: f64,
    /// The consumer's `--user-burst`.
    #[arg(long, env = "FOLDERCAST_BENCH_USER_BURST", default_value_t = 40)]
    pub user_burst: u32,
    /// librdkafka settings for the consumer, `KEY=VALUE` (its `--kafka-option`), repeatable.
    #[arg(long = "kafka-option", value_name = "KEY=VALUE")]
    pub kafka_options: Vec<String>,
}

#[derive(Debug, Args)]
pub struct BenchStormArgs {
    /// Standalone Redis URL the gateway subscribes to.
    #[arg(long, env = "FOLDERCAST_REDIS")]
    pub redis: String,
    /// WebSocket clients, one user each (the fd limit, 20,000 here, bounds one process).
    #[arg(long, env = "FOLDERCAST_BENCH_CONNECTIONS", default_value_t = 10_000)]
    pub connections: usize,
    /// Messages each user misses while the gateway is down.
    #[arg(long, env = "FOLDERCAST_BENCH_MISSED", default_value_t = 10)]
    pub missed: u64,
}

#[derive(Debug, Args)]
pub struct BenchFanoutArgs {
    /// Standalone Redis URL the gateway subscribes to.
    #[arg(long, env = "FOLDERCAST_REDIS")]
    pub redis: String,
    /// WebSocket clients, one user each.
    #[arg(long, env = "FOLDERCAST_BENCH_CONNECTIONS", default_value_t = 1000)]
    pub connections: usize,
    /// Messages per second in the latency phase.
    #[arg(long, env = "FOLDERCAST_BENCH_RATE", default_value_t = 1000)]
    pub rate: u64,
    /// Seconds of each paced phase.
    #[arg(long, env = "FOLDERCAST_BENCH_SECONDS", default_value_t = 10)]
    pub seconds: u64,
    /// Messages per second in the cost phases that compare the gateway with the bare loop at
    /// the same rate (below what either saturates at).
    #[arg(long, env = "FOLDERCAST_BENCH_PACED_RATE", default_value_t = 20_000)]
    pub paced_rate: u64,
    /// Messages in a row to one connection in the burst phase.
    #[arg(long, env = "FOLDERCAST_BENCH_BURST", default_value_t = 16)]
    pub burst: usize,
    /// Rounds of the cost phases; each round runs every pattern on the bare loop, then on the
    /// gateway, and the medians are reported.
    #[arg(long, env = "FOLDERCAST_BENCH_ROUNDS", default_value_t = 3)]
    pub rounds: usize,
    /// WebSocket write buffer per connection for both servers, bytes (default: the gateway's).
    #[arg(long, env = "FOLDERCAST_WS_WRITE_BUFFER")]
    pub ws_write_buffer: Option<usize>,
    /// The foldercast binary to run as the gateway (default: this one).
    #[arg(long, env = "FOLDERCAST_BENCH_BINARY")]
    pub binary: Option<PathBuf>,
    /// Cost phases to run, in this order: `spread` (one per connection, paced), `bursts`
    /// (paced), `flood` (one per connection, as fast as it goes). One alone is what a profiler
    /// attached to the server should see.
    #[arg(
        long,
        env = "FOLDERCAST_BENCH_PATTERNS",
        value_delimiter = ',',
        default_value = "spread,bursts,flood"
    )]
    pub patterns: Vec<FanoutPattern>,
}

/// A cost phase of `bench fanout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FanoutPattern {
    Spread,
    Bursts,
    Flood,
}

#[derive(Debug, Args)]
pub struct BenchMetricsArgs {
    /// Standalone Redis URL both gateways subscribe to.
    #[arg(long, env = "FOLDERCAST_REDIS")]
    pub redis: String,
    /// WebSocket clients per gateway, one user each.
    #[arg(long, env = "FOLDERCAST_BENCH_CONNECTIONS", default_value_t = 500)]
    pub connections: usize,
    /// Messages per second in each phase.
    #[arg(long, env = "FOLDERCAST_BENCH_PACED_RATE", default_value_t = 20_000)]
    pub paced_rate: u64,
    /// Seconds of each phase.
    #[arg(long, env = "FOLDERCAST_BENCH_SECONDS", default_value_t = 10)]
    pub seconds: u64,
    /// Rounds; each runs a phase on both gateways (their order alternating).
    #[arg(long, env = "FOLDERCAST_BENCH_ROUNDS", default_value_t = 5)]
    pub rounds: usize,
    /// The foldercast binary to run as the gateways (default: the one next to this).
    #[arg(long, env = "FOLDERCAST_BENCH_BINARY")]
    pub binary: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BenchIdleArgs {
    /// Idle authenticated connections to open (the open-file limit is 20 000 per process).
    #[arg(long, env = "FOLDERCAST_BENCH_CONNECTIONS", default_value_t = 19_000)]
    pub connections: usize,
    /// Distinct users the connections belong to.
    #[arg(long, env = "FOLDERCAST_BENCH_USERS", default_value_t = 1000)]
    pub users: usize,
    /// The foldercast binary to start as the gateway under test (default: this one).
    #[arg(long, env = "FOLDERCAST_BENCH_BINARY")]
    pub binary: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BenchIngestArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "FOLDERCAST_KAFKA_BROKERS")]
    pub brokers: String,
    /// NATS server with JetStream.
    #[arg(long, env = "FOLDERCAST_NATS_URL")]
    pub nats: String,
    /// Standalone Redis URL.
    #[arg(long, env = "FOLDERCAST_REDIS")]
    pub redis: String,
    /// Uploads per source and round.
    #[arg(long, env = "FOLDERCAST_BENCH_EVENTS", default_value_t = 20_000)]
    pub events: u64,
    /// Members per space.
    #[arg(long, env = "FOLDERCAST_BENCH_MEMBERS", default_value_t = 20)]
    pub members: usize,
    /// Spaces in the trace.
    #[arg(long, env = "FOLDERCAST_BENCH_SPACES", default_value_t = 100)]
    pub spaces: usize,
    /// Rounds (the sources alternate going first); the median ratio is reported.
    #[arg(long, env = "FOLDERCAST_BENCH_ROUNDS", default_value_t = 3)]
    pub rounds: usize,
    /// Uploads into one folder, to count requests to oCIS per event.
    #[arg(long, default_value_t = 10_000)]
    pub burst: u64,
    /// The foldercast binary to run as the consumer (default: the one next to this one).
    #[arg(long, env = "FOLDERCAST_BENCH_BINARY")]
    pub binary: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BenchPublishArgs {
    /// Standalone Redis URL (flushed first).
    #[arg(long, env = "FOLDERCAST_REDIS")]
    pub redis: String,
    /// Users in the membership file, all targeted.
    #[arg(long, default_value_t = 100_000)]
    pub users: usize,
    /// Of them, connected over WebSocket.
    #[arg(long, default_value_t = 10_000)]
    pub connected: usize,
    /// The foldercast binary (default: the one next to this one).
    #[arg(long, env = "FOLDERCAST_BENCH_BINARY")]
    pub binary: Option<PathBuf>,
}
