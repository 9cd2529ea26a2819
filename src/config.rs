//! The command line: flags, their `FOLDERCAST_…` environment variables, and an optional file.
//!
//! Precedence, highest first: a flag on the command line, its environment variable, the config
//! file (`--config FILE`, TOML, keys are flag names, either at the top level or in a table named
//! after the subcommand), the built-in default. The file is merged by turning its entries into
//! flags for whatever the command line and environment left unset, so every value goes through
//! the same clap validation and `--help` stays the one reference.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "foldercast",
    version,
    about = "Live folder updates for oCIS: storage events in, per-user WebSocket/SSE messages out",
    long_about = "foldercast turns storage events (file uploaded, moved, trashed, …) into one message per user who \
may see the change, with the size and mtime delta of every ancestor folder, and pushes them to browsers over \
WebSocket and Server-Sent Events.\n\n\
Start with `foldercast run`: it replays the demo fixtures in a loop and serves a demo page at \
http://127.0.0.1:8080/ with no Kafka, Redis or oCIS needed.\n\n\
Every flag can also be set through the environment variable shown with it, or in a TOML file given \
with --config (keys are flag names, e.g. `user-rate = 5`, at the top level or under [run], [replay], …).",
    after_help = "Examples:\n  foldercast run\n  foldercast replay --events fixtures/demo/events.jsonl --membership fixtures/demo/membership.json --print"
)]
pub struct Cli {
    /// TOML file with default values for flags (keys are flag names without dashes' prefix).
    #[arg(long, global = true, env = "FOLDERCAST_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Log filter (tracing directives: `info`, `debug`, `foldercast=debug,tower=warn`). Logs go to stderr.
    #[arg(
        long,
        global = true,
        env = "FOLDERCAST_LOG",
        default_value = "info",
        value_name = "FILTER"
    )]
    pub log: String,

    /// Log lines as text (for people) or JSON, one object per line (for log collectors).
    #[arg(
        long,
        global = true,
        env = "FOLDERCAST_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: crate::telemetry::LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start and moved into its command: the size of the largest variant costs
// nothing, and boxing it would only obscure the clap derive.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run everything in one process on the embedded default: fixture events in a loop,
    /// fixture membership, in-process bus, gateway and demo page.
    Run(RunArgs),
    /// Run the pipeline over a fixture file without a server and print what each user would
    /// receive, or load the file into a Kafka topic (--to-kafka).
    Replay(ReplayArgs),
    /// Consume storage events from Kafka (a consumer group), or oCIS's own events from NATS
    /// JetStream (--nats), and publish per-user messages to Redis.
    Consume(ConsumeArgs),
    /// Serve WebSocket and SSE clients from Redis (run several behind a load balancer).
    Gateway(GatewayCommandArgs),
    /// Publish a notification to users, groups, spaces' members or everyone, through Redis
    /// (the same as POST /api/notifications on a gateway). Prints what was targeted, as JSON.
    Publish(PublishArgs),
    /// Schedule a planned downtime's announcements (sent by the gateways when due), list the
    /// scheduled ones (--list), or cancel one (--cancel ID).
    AnnounceDowntime(DowntimeArgs),
    /// Check a deployment with the flags `consume` and `gateway` use: Redis (version, cluster
    /// slots, eviction, persistence), Kafka (brokers, topics, group lag) or NATS (stream,
    /// consumer), oCIS (credentials, a space's and a group's members), OIDC (discovery, keys),
    /// then a round trip to a gateway's WebSocket (--gateway-url). Prints ✓ or ✗ with the fix
    /// per check; exits 1 on any ✗.
    SelfTest(SelfTestArgs),
}

/// The Kafka topics and group `consume` uses (and `self-test` checks).
#[derive(Debug, Clone, Args)]
pub struct KafkaTopics {
    /// Topic of storage events (keyed by space id).
    #[arg(
        long,
        env = "FOLDERCAST_KAFKA_TOPIC",
        default_value = "storage-events",
        value_name = "TOPIC"
    )]
    pub topic: String,

    /// Consumer group: consumers of one group share the topic's partitions.
    #[arg(
        long,
        env = "FOLDERCAST_KAFKA_GROUP",
        default_value = "foldercast",
        value_name = "GROUP"
    )]
    pub group: String,

    /// Where malformed events go, with headers naming the error and their origin.
    #[arg(
        long,
        env = "FOLDERCAST_DEAD_LETTER_TOPIC",
        default_value = "storage-events.dead-letter",
        value_name = "TOPIC"
    )]
    pub dead_letter_topic: String,
}

#[derive(Debug, Args)]
pub struct SelfTestArgs {
    /// Kafka bootstrap servers to check (as `consume --brokers`).
    #[arg(long, env = "FOLDERCAST_KAFKA_BROKERS", value_name = "HOSTS")]
    pub brokers: Option<String>,

    #[command(flatten)]
    pub kafka: KafkaTopics,

    /// A gateway to send the round trip through (ws://host:port); without it, no round trip.
    #[arg(long, env = "FOLDERCAST_SELF_TEST_GATEWAY", value_name = "URL")]
    pub gateway_url: Option<String>,

    /// The user the round trip connects and publishes as (a user nobody else is).
    #[arg(
        long,
        env = "FOLDERCAST_PROBE_USER",
        default_value = "foldercast-self-test",
        value_name = "USER"
    )]
    pub probe_user: String,

    /// A token for the probe user, for gateways that verify OIDC tokens (with --jwt-secret
    /// one is minted instead).
    #[arg(long, env = "FOLDERCAST_PROBE_TOKEN_FILE", value_name = "FILE")]
    pub probe_token_file: Option<PathBuf>,

    /// The gateway's HS256 secret: mints the probe user's token.
    #[command(flatten)]
    pub secret: JwtSecretArgs,

    /// The space whose members oCIS must show (default: the first project drive it lists).
    #[arg(long, env = "FOLDERCAST_CHECK_SPACE", value_name = "SPACE_ID")]
    pub check_space: Option<String>,

    /// The group oCIS must expand (default: the first group it lists).
    #[arg(long, env = "FOLDERCAST_CHECK_GROUP", value_name = "GROUP_ID")]
    pub check_group: Option<String>,

    #[command(flatten)]
    pub nats: NatsArgs,

    #[command(flatten)]
    pub redis: RedisArgs,

    // Last: their help headings apply to every flag after them.
    #[command(flatten)]
    pub membership: MembershipArgs,

    #[command(flatten)]
    pub oidc: OidcArgs,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Events to replay, one JSON event per line; `-` reads standard input (played once).
    #[arg(
        long,
        env = "FOLDERCAST_EVENTS",
        default_value = "fixtures/demo/events.jsonl",
        value_name = "FILE"
    )]
    pub events: PathBuf,

    /// Events per second to replay (0 = as fast as possible). The default is a pace a person can follow.
    #[arg(
        long,
        env = "FOLDERCAST_RATE",
        default_value_t = 2.0,
        value_name = "EVENTS_PER_SEC"
    )]
    pub rate: f64,

    /// Passes over the events file, each with fresh event ids and times (0 = loop forever).
    #[arg(long, env = "FOLDERCAST_PASSES", default_value_t = 0, value_name = "N")]
    pub passes: u64,

    /// Disable the demo page and its token minting (`/`, `/api/demo/*`).
    #[arg(long, env = "FOLDERCAST_NO_DEMO", conflicts_with = "demo")]
    pub no_demo: bool,

    /// Serve the demo page even with a configured `--jwt-secret`. The page mints tokens for
    /// every fixture user with that secret, so without this flag a configured secret turns the
    /// demo off (a generated one, the embedded default, keeps it on).
    #[arg(long, env = "FOLDERCAST_DEMO")]
    pub demo: bool,

    /// Users' preferences to start with (`{"users": {"<user>": {"muted_spaces": [...],
    /// "types": [...]}}}`); `PUT /api/preferences` changes them in memory.
    #[arg(
        long,
        env = "FOLDERCAST_PREFERENCES",
        default_value = "fixtures/demo/preferences.json",
        value_name = "FILE"
    )]
    pub preferences: PathBuf,

    #[command(flatten)]
    pub shaping: ShapingArgs,

    #[command(flatten)]
    pub history: HistoryArgs,

    #[command(flatten)]
    pub gateway: GatewayArgs,

    // Last: their help headings apply to every flag after them.
    #[command(flatten)]
    pub membership: MembershipArgs,

    #[command(flatten)]
    pub oidc: OidcArgs,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Events to process, one JSON event per line (`-` for standard input).
    #[arg(long, env = "FOLDERCAST_EVENTS", value_name = "FILE")]
    pub events: PathBuf,

    /// Instead of running the pipeline, produce the file's events into a Kafka topic, keyed by
    /// space id (so a space's events keep their order), bad lines included.
    #[arg(long, env = "FOLDERCAST_TO_KAFKA", requires = "brokers")]
    pub to_kafka: bool,

    /// Kafka bootstrap servers for --to-kafka (host:port[,host:port…]).
    #[arg(long, env = "FOLDERCAST_KAFKA_BROKERS", value_name = "HOSTS")]
    pub brokers: Option<String>,

    /// Topic for --to-kafka (created with --partitions if missing).
    #[arg(
        long,
        env = "FOLDERCAST_KAFKA_TOPIC",
        default_value = "storage-events",
        value_name = "TOPIC"
    )]
    pub topic: String,

    /// Partitions of a topic that --to-kafka creates.
    #[arg(
        long,
        env = "FOLDERCAST_KAFKA_PARTITIONS",
        default_value_t = 3,
        value_name = "N"
    )]
    pub partitions: i32,

    /// Instead of running the pipeline, write the file's lines (oCIS event envelopes, as in
    /// `fixtures/ocis/`) into a NATS JetStream stream, as oCIS would (nats://host:port).
    #[arg(
        long,
        env = "FOLDERCAST_TO_NATS",
        value_name = "URL",
        conflicts_with = "to_kafka"
    )]
    pub to_nats: Option<String>,

    /// The JetStream stream for --to-nats (created with one subject if missing). oCIS: `main-queue`.
    #[arg(
        long,
        env = "FOLDERCAST_NATS_STREAM",
        default_value = "main-queue",
        value_name = "NAME"
    )]
    pub nats_stream: String,

    /// The subject for --to-nats (default: the stream's name, as oCIS uses).
    #[arg(long, env = "FOLDERCAST_NATS_SUBJECT", value_name = "SUBJECT")]
    pub nats_subject: Option<String>,

    /// Print one JSON line per delivered message: {"user":…,"message":…}, in event order, users sorted.
    #[arg(long, env = "FOLDERCAST_PRINT")]
    pub print: bool,

    /// Apply the per-user rate limit and coalescing, with event time as the clock.
    #[arg(long, env = "FOLDERCAST_THROTTLE")]
    pub throttle: bool,

    /// Exit with status 1 if any event was rejected.
    #[arg(long, env = "FOLDERCAST_STRICT")]
    pub strict: bool,

    #[command(flatten)]
    pub shaping: ShapingArgs,

    /// Where membership comes from (--membership FILE or --ocis-url); not needed with --to-kafka.
    /// Last: its help heading applies to every flag after it.
    #[command(flatten)]
    pub membership: MembershipArgs,
}

#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// Kafka bootstrap servers (host:port[,host:port…]). Either this or --nats.
    #[arg(
        long,
        env = "FOLDERCAST_KAFKA_BROKERS",
        value_name = "HOSTS",
        required_unless_present = "nats",
        conflicts_with = "nats"
    )]
    pub brokers: Option<String>,

    #[command(flatten)]
    pub kafka: KafkaTopics,

    /// Consumer session timeout: how soon a dead consumer's partitions move to another.
    #[arg(long, env = "FOLDERCAST_KAFKA_SESSION_TIMEOUT", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub session_timeout: Duration,

    /// Commit handled offsets at least this often.
    #[arg(long, env = "FOLDERCAST_COMMIT_INTERVAL", default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    pub commit_interval: Duration,

    /// …or after this many handled events, whichever comes first.
    #[arg(
        long,
        env = "FOLDERCAST_COMMIT_BATCH",
        default_value_t = 1000,
        value_name = "EVENTS"
    )]
    pub commit_batch: u64,

    /// Ordered lanes per Kafka partition: a partition's events are spread over this many by
    /// their key (the space id), each handled in order, so one partition keeps several publishes
    /// to Redis in flight. Kafka orders events per key, and so does foldercast.
    #[arg(
        long,
        env = "FOLDERCAST_KAFKA_LANES_PER_PARTITION",
        default_value_t = crate::source::kafka::DEFAULT_LANES_PER_PARTITION,
        value_parser = clap::value_parser!(u32).range(1..=64),
        value_name = "N"
    )]
    pub kafka_lanes_per_partition: u32,

    /// On SIGTERM/SIGINT, how long to keep trying to publish what the rate limiter holds before
    /// leaving it unacknowledged (the next consumer delivers it).
    #[arg(long, env = "FOLDERCAST_CONSUMER_DRAIN_GRACE", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub drain_grace: Duration,

    /// Extra librdkafka consumer property, `key=value` (repeatable). foldercast sets
    /// `fetch.max.bytes=1048576` and `max.partition.fetch.bytes=262144` so partitions interleave;
    /// these override them.
    #[arg(
        long = "kafka-option",
        env = "FOLDERCAST_KAFKA_OPTIONS",
        value_delimiter = ';',
        value_name = "KEY=VALUE"
    )]
    pub kafka_options: Vec<String>,

    /// Serve `/metrics` (Prometheus: events by outcome, rejections by code, messages, the NATS
    /// source's counters) on this address.
    #[arg(long, env = "FOLDERCAST_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,

    #[command(flatten)]
    pub nats: NatsArgs,

    #[command(flatten)]
    pub redis: RedisArgs,

    #[command(flatten)]
    pub shaping: ShapingArgs,

    // Last: its help heading applies to every flag after it.
    #[command(flatten)]
    pub membership: MembershipArgs,
}

/// oCIS's own events: reva events on NATS JetStream, read by a durable pull consumer.
#[derive(Debug, Args)]
#[command(next_help_heading = "oCIS events on NATS JetStream (consume --nats)")]
pub struct NatsArgs {
    /// Read oCIS's events from this NATS server (oCIS's OCIS_EVENTS_ENDPOINT, e.g.
    /// nats://ocis-nats:9233) instead of Kafka. Item sizes and paths the events lack are looked
    /// up with --ocis-url's credentials; without --ocis-url such events resync their space.
    #[arg(long, env = "FOLDERCAST_NATS_URL", value_name = "URL")]
    pub nats: Option<String>,

    /// The JetStream stream oCIS publishes to.
    #[arg(
        long = "nats-stream",
        env = "FOLDERCAST_NATS_STREAM",
        default_value = "main-queue",
        value_name = "STREAM"
    )]
    pub stream: String,

    /// The subject read from the stream (default: the stream's name, as oCIS uses).
    #[arg(
        long = "nats-subject",
        env = "FOLDERCAST_NATS_SUBJECT",
        value_name = "SUBJECT"
    )]
    pub subject: Option<String>,

    /// The durable consumer's name. Never an oCIS service's (clientlog, search, …): consumers
    /// of one name share the messages, so that service would miss some.
    #[arg(
        long = "nats-durable",
        env = "FOLDERCAST_NATS_DURABLE",
        default_value = "foldercast",
        value_name = "NAME"
    )]
    pub durable: String,

    /// Where a consumer created now starts: `new` (events from now on), `all` (everything the
    /// stream holds), or an RFC 3339 time. An existing consumer resumes where it stopped.
    #[arg(
        long = "nats-start",
        env = "FOLDERCAST_NATS_START",
        default_value = "new",
        value_name = "new|all|TIME"
    )]
    pub start: String,

    /// How long an event may stay unacknowledged before the server delivers it again (lookups
    /// that wait on oCIS keep it alive with progress acks).
    #[arg(long = "nats-ack-wait", env = "FOLDERCAST_NATS_ACK_WAIT", default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub ack_wait: Duration,

    /// Deliveries of one event before the server gives up on it; the last one resyncs the
    /// space instead of trying a lookup again.
    #[arg(
        long = "nats-max-deliver",
        env = "FOLDERCAST_NATS_MAX_DELIVER",
        default_value_t = 10,
        value_parser = clap::value_parser!(i64).range(2..),
        value_name = "N"
    )]
    pub max_deliver: i64,

    /// Events delivered and not yet acknowledged, at most (the server pauses beyond).
    #[arg(
        long = "nats-max-ack-pending",
        env = "FOLDERCAST_NATS_MAX_ACK_PENDING",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(i64).range(1..),
        value_name = "N"
    )]
    pub max_ack_pending: i64,

    /// Subject (and stream, created if missing) for envelopes that cannot be read, with the
    /// reason in `Foldercast-Rejection`/`-Reason`/`-Position` headers.
    #[arg(
        long = "nats-dead-letter-subject",
        env = "FOLDERCAST_NATS_DEAD_LETTER_SUBJECT",
        default_value = "foldercast-dead-letters",
        value_name = "SUBJECT"
    )]
    pub dead_letter_subject: String,

    /// Ordered lanes: each space's events are handled in order in one lane; lanes wait on oCIS
    /// independently.
    #[arg(
        long = "nats-lanes",
        env = "FOLDERCAST_NATS_LANES",
        default_value_t = 8,
        value_parser = clap::value_parser!(u32).range(1..=1024),
        value_name = "N"
    )]
    pub lanes: u32,
}

/// Who a notification (or a downtime's announcements) reaches.
#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    /// A user to notify (repeatable).
    #[arg(
        long = "user",
        env = "FOLDERCAST_NOTICE_USERS",
        value_delimiter = ',',
        value_name = "USER"
    )]
    pub users: Vec<String>,

    /// A group whose members to notify (repeatable; needs a directory: --membership or
    /// --ocis-url here for `publish`, on the gateways for `announce-downtime`).
    #[arg(
        long = "group",
        env = "FOLDERCAST_NOTICE_GROUPS",
        value_delimiter = ',',
        value_name = "GROUP"
    )]
    pub groups: Vec<String>,

    /// A space whose members who may list it to notify (repeatable; uploaders are not).
    #[arg(
        long = "space",
        env = "FOLDERCAST_NOTICE_SPACES",
        value_delimiter = ',',
        value_name = "SPACE"
    )]
    pub spaces: Vec<String>,

    /// Everyone the directory knows (the membership file's users, or oCIS's users), not only
    /// those connected.
    #[arg(long, env = "FOLDERCAST_NOTICE_ALL")]
    pub all: bool,
}

impl TargetArgs {
    pub fn targets(&self) -> crate::notice::Targets {
        crate::notice::Targets {
            users: self.users.clone(),
            groups: self.groups.clone(),
            spaces: self.spaces.clone(),
            all: self.all,
        }
    }
}

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  foldercast publish --redis redis://127.0.0.1:6379 --membership fixtures/demo/membership.json --all --title 'Maintenance tonight' --body 'From 22:00 to 23:00'\n  foldercast publish --redis … --user alice --level critical --ack user --title 'Password expires today' --idempotency-key pw-2026-12-01"
)]
pub struct PublishArgs {
    /// The headline (at most 256 bytes).
    #[arg(long, env = "FOLDERCAST_NOTICE_TITLE", value_name = "TEXT")]
    pub title: String,

    /// The text (at most 16 KiB).
    #[arg(
        long,
        env = "FOLDERCAST_NOTICE_BODY",
        default_value = "",
        value_name = "TEXT"
    )]
    pub body: String,

    /// How urgent it is; clients show warnings and critical notices more loudly.
    #[arg(
        long,
        env = "FOLDERCAST_NOTICE_LEVEL",
        value_enum,
        default_value = "info"
    )]
    pub level: crate::notice::Level,

    /// A link the client may show (http or https).
    #[arg(long, env = "FOLDERCAST_NOTICE_LINK", value_name = "URL")]
    pub link: Option<String>,

    /// When the notification is of no use any more (RFC 3339).
    #[arg(long, env = "FOLDERCAST_NOTICE_EXPIRES", value_name = "TIME")]
    pub expires: Option<String>,

    /// Who must acknowledge it: `user` (any one of the user's devices) or `device` (each).
    #[arg(
        long,
        env = "FOLDERCAST_NOTICE_ACK",
        value_enum,
        value_name = "user|device"
    )]
    pub ack: Option<crate::notice::AckMode>,

    /// A remote action for the clients, a JSON object: `{"action":"wipe","path":"/secret"}`.
    #[arg(long, env = "FOLDERCAST_NOTICE_ACTION", value_name = "JSON")]
    pub action: Option<String>,

    #[command(flatten)]
    pub targets: TargetArgs,

    /// Makes a repeat of this publish within 24 h a no-op that prints the first answer.
    #[arg(long, env = "FOLDERCAST_IDEMPOTENCY_KEY", value_name = "KEY")]
    pub idempotency_key: Option<String>,

    /// With --ack: how long devices that have not acknowledged it are sent it again on connect.
    #[arg(long, env = "FOLDERCAST_CRITICAL_RETENTION", default_value = "30d", value_parser = parse_duration, value_name = "DURATION")]
    pub critical_retention: Duration,

    #[command(flatten)]
    pub redis: RedisArgs,

    // Last: its help heading applies to every flag after it.
    #[command(flatten)]
    pub membership: MembershipArgs,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  foldercast announce-downtime --redis redis://127.0.0.1:6379 --all --from 2026-12-01T17:00:00Z --until 2026-12-01T19:00:00Z --body 'Storage upgrade'\n  foldercast announce-downtime --redis … --list\n  foldercast announce-downtime --redis … --cancel dt-…\n\nThe gateways (any of them) send each announcement when it falls due, once."
)]
pub struct DowntimeArgs {
    /// When the downtime starts (RFC 3339).
    #[arg(long, env = "FOLDERCAST_DOWNTIME_FROM", value_name = "TIME", required_unless_present_any = ["list", "cancel"])]
    pub from: Option<String>,

    /// When it ends (RFC 3339).
    #[arg(long, env = "FOLDERCAST_DOWNTIME_UNTIL", value_name = "TIME", required_unless_present_any = ["list", "cancel"])]
    pub until: Option<String>,

    /// The announcement's headline (default: "Planned downtime").
    #[arg(long, env = "FOLDERCAST_DOWNTIME_TITLE", value_name = "TEXT")]
    pub title: Option<String>,

    /// The announcement's text (default: the window, spelled out).
    #[arg(long = "body", env = "FOLDERCAST_DOWNTIME_BODY", value_name = "TEXT")]
    pub body: Option<String>,

    /// How long before --from each announcement goes out (one goes out at once as well).
    #[arg(
        long,
        env = "FOLDERCAST_DOWNTIME_STEPS",
        value_delimiter = ',',
        default_value = "1h,30m,10m,5m,1m,30s,10s",
        value_name = "DURATION,…"
    )]
    pub steps: Vec<String>,

    #[command(flatten)]
    pub targets: TargetArgs,

    /// List the downtimes still to come or under way, as JSON.
    #[arg(long, env = "FOLDERCAST_DOWNTIME_LIST", conflicts_with = "cancel")]
    pub list: bool,

    /// Cancel a scheduled downtime (what is left of its announcements).
    #[arg(long, env = "FOLDERCAST_DOWNTIME_CANCEL", value_name = "ID")]
    pub cancel: Option<String>,

    #[command(flatten)]
    pub redis: RedisArgs,
}

#[derive(Debug, Args)]
pub struct GatewayCommandArgs {
    #[command(flatten)]
    pub redis: RedisArgs,

    #[command(flatten)]
    pub gateway: GatewayArgs,
    #[command(flatten)]
    pub oidc: OidcArgs,

    /// For notifications to groups, spaces and everyone (`POST /api/notifications`); the
    /// gateway needs no directory otherwise.
    #[command(flatten)]
    pub membership: MembershipArgs,
}

/// Where space membership comes from: a fixture file, or oCIS's LibreGraph API behind a cache.
///
/// Credentials for oCIS never come from flags (flags show in process listings): set
/// FOLDERCAST_OCIS_TOKEN (a bearer token), FOLDERCAST_OCIS_BASIC (`user:password` or
/// `user:app-token`, development setups) or FOLDERCAST_OCIS_CLIENT_SECRET (with
/// --ocis-client-id, the OIDC client-credentials flow), or point the matching *-file flag at a
/// file holding the secret.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Membership")]
pub struct MembershipArgs {
    /// Membership fixture (users, groups, spaces and their members). `run` defaults to
    /// fixtures/demo/membership.json when neither this nor --ocis-url is given.
    #[arg(
        long,
        env = "FOLDERCAST_MEMBERSHIP",
        value_name = "FILE",
        conflicts_with = "ocis_url"
    )]
    pub membership: Option<PathBuf>,

    /// Resolve space members from oCIS at this base URL (e.g. https://cloud.example.com):
    /// GET /graph/v1beta1/drives/{id}/root/permissions, groups expanded with
    /// /graph/v1.0/groups/{id}/members (needs an admin identity).
    #[arg(long, env = "FOLDERCAST_OCIS_URL", value_name = "URL")]
    pub ocis_url: Option<String>,

    /// File holding a bearer token for oCIS (re-read after a 401). Or set FOLDERCAST_OCIS_TOKEN.
    #[arg(long, env = "FOLDERCAST_OCIS_TOKEN_FILE", value_name = "FILE")]
    pub ocis_token_file: Option<PathBuf>,

    /// File holding `user:secret` for HTTP basic auth to oCIS (password or app token; development
    /// setups). Or set FOLDERCAST_OCIS_BASIC.
    #[arg(long, env = "FOLDERCAST_OCIS_BASIC_FILE", value_name = "FILE")]
    pub ocis_basic_file: Option<PathBuf>,

    /// OIDC client id for the client-credentials flow (secret from FOLDERCAST_OCIS_CLIENT_SECRET
    /// or --ocis-client-secret-file).
    #[arg(long, env = "FOLDERCAST_OCIS_CLIENT_ID", value_name = "ID")]
    pub ocis_client_id: Option<String>,

    /// File holding the OIDC client secret.
    #[arg(long, env = "FOLDERCAST_OCIS_CLIENT_SECRET_FILE", value_name = "FILE")]
    pub ocis_client_secret_file: Option<PathBuf>,

    /// Issuer whose token endpoint issues the client-credentials token (default: --ocis-url,
    /// where oCIS's built-in IdP lives).
    #[arg(long, env = "FOLDERCAST_OCIS_TOKEN_ISSUER", value_name = "URL")]
    pub ocis_token_issuer: Option<String>,

    /// Scope to request with the client-credentials token.
    #[arg(long, env = "FOLDERCAST_OCIS_SCOPE", value_name = "SCOPE")]
    pub ocis_scope: Option<String>,

    /// How long a space's members are cached (±10 % jitter) before oCIS is asked again.
    #[arg(long, env = "FOLDERCAST_MEMBERSHIP_TTL", default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    pub membership_ttl: Duration,

    /// While oCIS is unreachable, keep serving a space's last known members this long after they
    /// were fetched; after that the space's events wait (and are retried), never dropped.
    #[arg(long, env = "FOLDERCAST_MEMBERSHIP_MAX_STALE", default_value = "10m", value_parser = parse_duration, value_name = "DURATION")]
    pub membership_max_stale: Duration,

    /// Spaces (and groups) whose members are cached.
    #[arg(
        long,
        env = "FOLDERCAST_MEMBERSHIP_CACHE_CAPACITY",
        default_value_t = 100_000,
        value_name = "N"
    )]
    pub membership_cache_capacity: u64,

    /// Timeout of each request to oCIS (5xx and timeouts are retried with jittered backoff).
    #[arg(long, env = "FOLDERCAST_OCIS_TIMEOUT", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub ocis_timeout: Duration,
}

/// Sign-in with an OIDC issuer instead of the HS256 shared secret.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "OIDC sign-in")]
pub struct OidcArgs {
    /// Verify client tokens against this OIDC issuer (discovery + JWKS; RS256/ES256/EdDSA).
    /// Replaces --jwt-secret.
    #[arg(long, env = "FOLDERCAST_OIDC_ISSUER", value_name = "URL")]
    pub oidc_issuer: Option<String>,

    /// Required token audience (`aud`); without it the audience is not checked.
    #[arg(long, env = "FOLDERCAST_OIDC_AUDIENCE", value_name = "AUD")]
    pub oidc_audience: Option<String>,

    /// Claim holding the user id (oCIS setups often use `preferred_username` or a custom claim).
    #[arg(
        long,
        env = "FOLDERCAST_OIDC_USER_CLAIM",
        default_value = "sub",
        value_name = "CLAIM"
    )]
    pub oidc_user_claim: String,

    /// Clock skew tolerated on `exp` and `nbf`.
    #[arg(long, env = "FOLDERCAST_OIDC_LEEWAY", default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub oidc_leeway: Duration,

    /// Bounds JWKS refetches caused by unknown key ids: a burst of 5, then one per this ÷ 5.
    #[arg(long, env = "FOLDERCAST_OIDC_JWKS_MIN_REFRESH", default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub oidc_jwks_min_refresh: Duration,
}

/// Where Redis is, and how long it keeps each user's history.
#[derive(Debug, Clone, Args)]
pub struct RedisArgs {
    /// Standalone Redis URL (redis://host:port).
    #[arg(
        long,
        env = "FOLDERCAST_REDIS",
        value_name = "URL",
        required_unless_present = "redis_cluster",
        conflicts_with = "redis_cluster"
    )]
    pub redis: Option<String>,

    /// Redis Cluster seed nodes, comma-separated (redis://a:7000,redis://b:7000). Uses sharded pub/sub.
    #[arg(
        long,
        env = "FOLDERCAST_REDIS_CLUSTER",
        value_name = "URLS",
        value_delimiter = ','
    )]
    pub redis_cluster: Option<Vec<String>>,

    #[command(flatten)]
    pub history: HistoryArgs,

    /// How long Redis remembers which events each user already received (repeats are dropped).
    #[arg(long, env = "FOLDERCAST_DELIVERY_DEDUP_WINDOW", default_value = "10m", value_parser = parse_duration, value_name = "DURATION")]
    pub delivery_dedup_window: Duration,
}

/// How much of each user's history is kept for resuming clients (Redis or in-process).
#[derive(Debug, Clone, Args)]
pub struct HistoryArgs {
    /// Messages kept per user for resuming clients (approximately, on Redis). A client that
    /// missed more than is kept gets `resumed` with `recovered: false` and refetches.
    #[arg(
        long,
        env = "FOLDERCAST_STREAM_MAX_LEN",
        default_value_t = 1000,
        value_name = "N"
    )]
    pub stream_max_len: u64,

    /// Age after which a user's history entries are trimmed: a client away for longer than this
    /// resyncs instead of catching up. An idle user's history expires between this and twice
    /// this after its last message; its epoch and top position are kept at least 30 days, so
    /// a client that missed nothing still resumes.
    #[arg(long, env = "FOLDERCAST_STREAM_MAX_AGE", default_value = "24h", value_parser = parse_duration, value_name = "DURATION")]
    pub stream_max_age: Duration,
}

/// How messages are shaped per user.
#[derive(Debug, Clone, Args)]
pub struct ShapingArgs {
    /// Messages per second each user may receive before the rest is coalesced (0 = no limit).
    #[arg(
        long,
        env = "FOLDERCAST_USER_RATE",
        default_value_t = 20.0,
        value_name = "PER_SEC"
    )]
    pub user_rate: f64,

    /// Messages a user may receive at once before the rate applies.
    #[arg(
        long,
        env = "FOLDERCAST_USER_BURST",
        default_value_t = 40,
        value_name = "N"
    )]
    pub user_burst: u32,

    /// Events a user may have pending (coalesced, not yet sent) before they get `resync` instead.
    #[arg(
        long,
        env = "FOLDERCAST_MAX_BACKLOG",
        default_value_t = 1000,
        value_name = "N"
    )]
    pub max_backlog: usize,

    /// Event ids remembered for de-duplication.
    #[arg(
        long,
        env = "FOLDERCAST_DEDUP_CAPACITY",
        default_value_t = 1_000_000,
        value_name = "N"
    )]
    pub dedup_capacity: u64,

    /// How long an event id is remembered for de-duplication (e.g. `1h`, `90s`).
    #[arg(long, env = "FOLDERCAST_DEDUP_TTL", default_value = "1h", value_parser = parse_duration, value_name = "DURATION")]
    pub dedup_ttl: Duration,

    /// The largest event accepted, in bytes (one JSONL line or one Kafka message). A larger one
    /// is rejected (`too-large`), counted and dead-lettered; a fixture line is not even read
    /// into memory past this. Two 4,096-byte paths and the rest fit in far less than the default.
    #[arg(
        long,
        env = "FOLDERCAST_MAX_EVENT_BYTES",
        default_value_t = crate::event::DEFAULT_MAX_EVENT_BYTES,
        value_name = "BYTES"
    )]
    pub max_event_bytes: usize,

    /// How long a user's preferences (muted spaces, wanted message types: `PUT
    /// /api/preferences`) are cached before they are read again: a change takes effect within
    /// this. Applied before publishing, so muted traffic costs nothing downstream.
    #[arg(long, env = "FOLDERCAST_PREFERENCES_TTL", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub preferences_ttl: Duration,
}

/// The HS256 secret client tokens are signed with (the gateway verifies them, `self-test` mints
/// its probe's), given once for both.
#[derive(Debug, Clone, Args)]
pub struct JwtSecretArgs {
    /// HS256 secret that signs client tokens (`sub` = user id), at least 32 bytes (`openssl rand -hex 32`).
    #[arg(
        long,
        env = "FOLDERCAST_JWT_SECRET",
        hide_env_values = true,
        value_name = "SECRET"
    )]
    pub jwt_secret: Option<String>,

    /// Read the HS256 secret from a file instead (keeps it out of process listings).
    #[arg(
        long,
        env = "FOLDERCAST_JWT_SECRET_FILE",
        value_name = "FILE",
        conflicts_with = "jwt_secret"
    )]
    pub jwt_secret_file: Option<PathBuf>,
}

impl JwtSecretArgs {
    /// Whether either flag was given.
    pub fn is_configured(&self) -> bool {
        self.jwt_secret.is_some() || self.jwt_secret_file.is_some()
    }
}

/// The WebSocket/SSE gateway.
#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    /// Address to serve HTTP, WebSocket (/ws) and SSE (/sse) on.
    #[arg(
        long,
        env = "FOLDERCAST_LISTEN",
        default_value = "127.0.0.1:8080",
        value_name = "ADDR"
    )]
    pub listen: SocketAddr,

    /// The HS256 secret that signs client tokens. Without it a random one is made and printed.
    #[command(flatten)]
    pub secret: JwtSecretArgs,

    /// Frames queued per connection; a client that falls this far behind is disconnected.
    #[arg(
        long,
        env = "FOLDERCAST_SEND_QUEUE",
        default_value_t = 256,
        value_name = "FRAMES"
    )]
    pub send_queue: usize,

    /// Bytes queued per connection at most; a client that falls this far behind is
    /// disconnected like one over `--send-queue` (one batch may overshoot either bound).
    #[arg(
        long,
        env = "FOLDERCAST_SEND_QUEUE_BYTES",
        default_value_t = 4 << 20,
        value_name = "BYTES"
    )]
    pub send_queue_bytes: usize,

    /// The largest frame a WebSocket client may send (an `auth` frame carries the whole token,
    /// and OIDC tokens with many groups run to several KB). A larger one gets a
    /// `frame-too-large` error frame and a 1009 close.
    #[arg(
        long,
        env = "FOLDERCAST_MAX_FRAME_BYTES",
        default_value_t = 64 * 1024,
        value_parser = clap::value_parser!(u32).range(1024..=16 * 1024 * 1024),
        value_name = "BYTES"
    )]
    pub max_frame_bytes: u32,

    /// A request's headers must arrive within this; it also closes keep-alive connections idle
    /// for as long between requests (slow or silent clients would otherwise hold descriptors).
    #[arg(long, env = "FOLDERCAST_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub header_timeout: Duration,

    /// Open connections per user at most (tabs, devices); more get `too-many-connections`
    /// (WebSocket close 1008, SSE 429). 0 = no limit.
    #[arg(
        long,
        env = "FOLDERCAST_MAX_CONNECTIONS_PER_USER",
        default_value_t = crate::gateway::hub::DEFAULT_MAX_CONNECTIONS_PER_USER,
        value_name = "N"
    )]
    pub max_connections_per_user: usize,

    /// Open connections at most; more are closed as they arrive. Default: the descriptor
    /// limit (`ulimit -n`) less 256 kept for Redis, Kafka and oCIS.
    #[arg(long, env = "FOLDERCAST_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Connections the kernel may complete before the gateway accepts them (the `listen`
    /// backlog). When clients reconnect all at once (a restart, a deploy) a short queue
    /// overflows and the kernel drops their handshakes; each then waits 1 s, 3 s… to retry.
    /// Linux caps it at `net.core.somaxconn` (4,096 on recent kernels): raise that for more.
    #[arg(
        long,
        env = "FOLDERCAST_LISTEN_BACKLOG",
        default_value_t = crate::gateway::server::DEFAULT_LISTEN_BACKLOG,
        value_name = "N"
    )]
    pub listen_backlog: u32,

    /// Users (token `sub`) allowed the operator's routes, `/api/stats` today. Without any,
    /// those routes answer 403 to everyone.
    #[arg(
        long,
        env = "FOLDERCAST_ADMIN_USERS",
        value_delimiter = ',',
        value_name = "USER,…"
    )]
    pub admin_users: Vec<String>,

    /// Admin bearer tokens that may publish notifications (`POST /api/notifications`): one
    /// `name:token` or `token` per line, each at least 32 bytes. User tokens never publish.
    /// Without it, publishing over HTTP is off.
    #[arg(long, env = "FOLDERCAST_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// How long a notification that asks for acknowledgements is kept for devices that have
    /// not acknowledged it (sent again on each of their connects until they do).
    #[arg(long, env = "FOLDERCAST_CRITICAL_RETENTION", default_value = "30d", value_parser = parse_duration, value_name = "DURATION")]
    pub critical_retention: Duration,

    /// A device (a client's `?device=` name) unseen this long is forgotten, with the position it
    /// acknowledged.
    #[arg(long, env = "FOLDERCAST_DEVICE_TTL", default_value = "30d", value_parser = parse_duration, value_name = "DURATION")]
    pub device_ttl: Duration,

    /// Serve `/metrics` (Prometheus) on this address instead of the public one, so that it
    /// need not be exposed (e.g. 127.0.0.1:9100).
    #[arg(long, env = "FOLDERCAST_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,

    /// Serve `/metrics` at all (`off`: it answers 404 and nothing renders it). The counters
    /// behind it are kept either way (`/api/stats` and the dashboard read them).
    #[arg(long, env = "FOLDERCAST_METRICS", default_value = "on", action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new(), value_name = "on|off")]
    pub metrics: bool,

    /// Connection tickets one user may obtain per second (bursts of twice that); more get 429.
    #[arg(
        long,
        env = "FOLDERCAST_TICKETS_PER_SEC",
        default_value_t = 5,
        value_name = "N"
    )]
    pub tickets_per_sec: u32,

    /// Frames per second a WebSocket client may send, in bursts of up to twice that; a client
    /// over it gets a `rate-limited` error frame and a 1008 close. 0 = no limit.
    #[arg(
        long,
        env = "FOLDERCAST_MAX_FRAMES_PER_SEC",
        default_value_t = 50,
        value_name = "N"
    )]
    pub max_frames_per_sec: u32,

    /// Time a WebSocket client has to send its `auth` frame.
    #[arg(long, env = "FOLDERCAST_AUTH_TIMEOUT", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub auth_timeout: Duration,

    /// Interval of SSE keep-alive comments.
    #[arg(long, env = "FOLDERCAST_SSE_KEEPALIVE", default_value = "15s", value_parser = parse_duration, value_name = "DURATION")]
    pub sse_keepalive: Duration,

    /// A write to a client that takes longer than this closes the connection.
    #[arg(long, env = "FOLDERCAST_WRITE_TIMEOUT", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub write_timeout: Duration,

    /// After a WebSocket's token expires it is told (`token-expired`) and may send a fresh `auth`
    /// frame within this time; otherwise it is closed. Deliveries pause meanwhile.
    #[arg(long, env = "FOLDERCAST_TOKEN_GRACE", default_value = "2s", value_parser = parse_duration, value_name = "DURATION")]
    pub token_grace: Duration,

    /// How often WebSocket clients are pinged; one that answers nothing for two intervals is
    /// closed (1001, `ping-timeout`). `0s` turns pings off.
    #[arg(long, env = "FOLDERCAST_WS_PING_INTERVAL", default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub ws_ping_interval: Duration,

    /// The most messages one resume replays; a client further behind gets `resumed` with
    /// `recovered: false` (`over-limit`) and refetches instead.
    #[arg(
        long,
        env = "FOLDERCAST_RESUME_MAX",
        default_value_t = 1000,
        value_name = "N"
    )]
    pub resume_max: usize,

    /// The longest digest window a client may ask for (`?digest=N` on /ws and /sse: its item
    /// changes held N seconds, then sent as one `coalesced` message). Desktop sync clients use
    /// it; other connections of the same user are unaffected.
    #[arg(long, env = "FOLDERCAST_MAX_DIGEST", default_value = "300s", value_parser = parse_duration, value_name = "DURATION")]
    pub max_digest: Duration,

    /// On SIGTERM/SIGINT every client is told to reconnect after a random delay up to this
    /// (WebSocket `reconnect` frame, SSE `retry:`), so a deploy is not a reconnect storm.
    #[arg(long, env = "FOLDERCAST_DRAIN_SPREAD", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub drain_spread: Duration,

    /// On SIGTERM/SIGINT, how long open connections get to be told and closed before exit.
    #[arg(long, env = "FOLDERCAST_DRAIN_GRACE", default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub drain_grace: Duration,

    /// The base URL clients reach this gateway at directly (e.g. https://gw1.example.com). With
    /// it, the gateway heartbeats its WebSocket and SSE URLs and its load into the bus, and any
    /// gateway's GET /api/endpoint hands out the least-loaded live one (never a draining one).
    #[arg(long, env = "FOLDERCAST_PUBLIC_URL", value_name = "URL")]
    pub public_url: Option<String>,

    /// How often a gateway with --public-url heartbeats; one silent for two intervals is no
    /// longer handed out.
    #[arg(long, env = "FOLDERCAST_HEARTBEAT_EVERY", default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub heartbeat_every: Duration,

    /// Lifetime of a single-use connection ticket from POST /api/tickets.
    #[arg(long, env = "FOLDERCAST_TICKET_TTL", default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub ticket_ttl: Duration,

    /// WebSocket read buffer per connection, bytes. Every connection holds it whole (the
    /// library zero-fills it before each read), so it is most of what an idle connection
    /// costs beyond its task: 512 measured 4.51 KB per idle connection, 256 measured 4.29 KB.
    /// Client frames are small (a watch, an ack, a ping); a longer one (an auth frame with a
    /// large token) is read in several calls, and the buffer grows to hold it.
    #[arg(
        long,
        env = "FOLDERCAST_WS_READ_BUFFER",
        default_value_t = crate::gateway::DEFAULT_WS_READ_BUFFER,
        value_name = "BYTES"
    )]
    pub ws_read_buffer: usize,

    /// WebSocket write buffer per connection, bytes: frames queued together go out in one write
    /// up to this size. It is allocated when first used, not per idle connection, and stays at
    /// its high-water mark (a connection that received a burst keeps up to this much).
    #[arg(
        long,
        env = "FOLDERCAST_WS_WRITE_BUFFER",
        default_value_t = 8192,
        value_name = "BYTES"
    )]
    pub ws_write_buffer: usize,

    /// Largest a connection's write buffer may grow, bytes; must exceed the largest message (deep
    /// paths make long `folders` lists). It only grows while a large message is being written.
    #[arg(
        long,
        env = "FOLDERCAST_WS_MAX_WRITE_BUFFER",
        default_value_t = 16 << 20,
        value_name = "BYTES"
    )]
    pub ws_max_write_buffer: usize,
}

/// `90`, `1.5s`, `250ms`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        _ => return Err(format!("{s:?}: unit must be ms, s, m, h or d")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

/// Parses the process arguments, merging `--config` if one is given.
pub fn parse() -> Result<Cli, clap::Error> {
    parse_from(std::env::args_os().collect())
}

pub fn parse_from(args: Vec<OsString>) -> Result<Cli, clap::Error> {
    let command = Cli::command();
    let matches = command.clone().try_get_matches_from(&args)?;
    let Some(path) = matches.get_one::<PathBuf>("config").cloned() else {
        return Cli::from_arg_matches(&matches);
    };
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Cli::command().error(
            clap::error::ErrorKind::Io,
            format!("cannot read config file {}: {e}", path.display()),
        )
    })?;
    let table: toml::Table = text.parse().map_err(|e| {
        Cli::command().error(
            clap::error::ErrorKind::InvalidValue,
            format!("invalid config file {}: {e}", path.display()),
        )
    })?;
    let extra = file_args(&command, &matches, &table).map_err(|m| {
        Cli::command().error(
            clap::error::ErrorKind::InvalidValue,
            format!("config file {}: {m}", path.display()),
        )
    })?;
    let mut merged = args;
    merged.extend(extra);
    let matches = Cli::command().try_get_matches_from(&merged)?;
    Cli::from_arg_matches(&matches)
}

/// Flags for the file's entries that neither the command line nor the environment set.
fn file_args(
    command: &clap::Command,
    matches: &clap::ArgMatches,
    table: &toml::Table,
) -> Result<Vec<OsString>, String> {
    // Walk down to the innermost subcommand the user chose (e.g. `consume`; nested subcommands left with the benchmarks).
    let mut cmd = command;
    let mut m = matches;
    let mut path = Vec::new();
    while let Some((name, sub)) = m.subcommand() {
        let Some(next) = cmd.find_subcommand(name) else {
            break;
        };
        path.push(name.to_owned());
        cmd = next;
        m = sub;
    }
    let mut entries: Vec<(&String, &toml::Value)> = Vec::new();
    for (key, value) in table {
        if !value.is_table() {
            entries.push((key, value));
        }
    }
    if let Some(toml::Value::Table(section)) = path.first().and_then(|p| table.get(p)) {
        entries.extend(section.iter());
    }
    let mut out = Vec::new();
    for (key, value) in entries {
        if key == "config" {
            continue;
        }
        let Some(arg) = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()))
        else {
            continue; // a key for another subcommand
        };
        let id = arg.get_id().as_str();
        if !matches!(m.value_source(id), None | Some(ValueSource::DefaultValue)) {
            continue;
        }
        let flag = format!("--{key}");
        match value {
            toml::Value::Boolean(true) => out.push(flag.into()),
            toml::Value::Boolean(false) => {}
            toml::Value::String(s) => out.push(format!("{flag}={s}").into()),
            toml::Value::Integer(i) => out.push(format!("{flag}={i}").into()),
            toml::Value::Float(f) => out.push(format!("{flag}={f}").into()),
            other => return Err(format!("{key}: unsupported value {other}")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("soon").is_err());
        assert_eq!(
            parse_duration("2d").unwrap(),
            Duration::from_secs(2 * 86400)
        );
        assert!(parse_duration("5w").is_err());
    }

    #[test]
    fn config_file_fills_unset_flags_only() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(
            &mut f,
            b"user-rate = 3.5\nprint = true\n[replay]\nmax-backlog = 7\n[run]\nrate = 99\n",
        )
        .unwrap();
        let cli = parse_from(args(&[
            "foldercast",
            "--config",
            f.path().to_str().unwrap(),
            "replay",
            "--events",
            "e",
            "--membership",
            "m",
            "--max-backlog",
            "9",
        ]))
        .unwrap();
        let Command::Replay(r) = cli.command else {
            panic!()
        };
        assert_eq!(r.shaping.user_rate, 3.5, "from the file");
        assert!(r.print, "booleans from the file");
        assert_eq!(r.shaping.max_backlog, 9, "the command line wins");
    }

    #[test]
    fn metrics_are_switched_by_a_value() {
        let gateway = |extra: &[&str]| {
            let mut a = vec!["foldercast", "gateway", "--redis", "redis://x"];
            a.extend_from_slice(extra);
            match parse_from(args(&a)).unwrap().command {
                Command::Gateway(g) => g.gateway.metrics,
                _ => panic!(),
            }
        };
        assert!(gateway(&[]), "on by default");
        assert!(!gateway(&["--metrics", "off"]));
        assert!(gateway(&["--metrics", "on"]));
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_flag_reads_an_environment_variable() {
        fn walk(cmd: &clap::Command, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.get_long().is_some()
                    && !matches!(id, "help" | "version")
                    && arg.get_env().is_none()
                {
                    missing.push(format!("{} --{id}", cmd.get_name()));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), &mut missing);
        assert!(
            missing.is_empty(),
            "flags without FOLDERCAST_ variables: {missing:?}"
        );
    }
}
