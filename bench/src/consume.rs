//! Kafka → `consume` → Redis throughput, and the Redis-bound limit measured in the same run.
//!
//! A generated trace (`spaces` spaces, `members` viewers each, depth-8 paths) is produced into a
//! fresh topic; then `foldercast consume` runs as a child with the bench's `--user-rate` and
//! `--user-burst`. Progress is read from Redis itself (`INFO commandstats`: one XADD per message,
//! counted inside scripts too), so the clock runs from the first message published to the last. Just before and just after, `redis-benchmark -c 50
//! -P 64` measures XADD and PUBLISH with a payload of the same size on the same server (the
//! limit is the mean of the two): one message costs one of each, so
//! 1 / (1/xadd + 1/publish) messages/s is the Redis-bound limit, ÷ members the event limit.

use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::proc::{cpu_seconds, redis_benchmark, redis_cpu_seconds, redis_host_port, redis_info};
use super::{generated_directory, generated_event};
use crate::args::BenchConsumeArgs;
use foldercast::source::kafka::KafkaProducer;

pub fn run(args: BenchConsumeArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_async(args))
}

/// Messages appended so far: Redis counts commands run inside scripts too. An `XADD` refused
/// for its id (the fast path then lets Redis pick one) counts among `calls` and `failed_calls`.
pub(crate) async fn xadd_calls(
    conn: &mut redis::aio::MultiplexedConnection,
) -> anyhow::Result<u64> {
    let stats = redis_info(conn, "commandstats").await?;
    let field = |name: &str| -> u64 {
        stats
            .get("cmdstat_xadd")
            .and_then(|v| {
                v.split(',')
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            })
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    Ok(field("calls").saturating_sub(field("failed_calls")))
}

/// A consumer's run, from its first message in Redis to its last.
pub(crate) struct Timed {
    pub secs: f64,
    /// CPU seconds of the consumer (`pid`) and of Redis meanwhile.
    pub cpu: f64,
    pub redis_cpu: f64,
    /// Messages written (fewer than expected when the rate limit coalesced some).
    pub messages: u64,
}

/// How long the message count must stand still, short of the expected count, before the run
/// counts as over: the rate limit coalesces a burst's messages into fewer (the consumer flushes
/// what it holds every 50 ms), so with it on the count ends below `expected`.
const SETTLED: Duration = Duration::from_secs(3);

/// Waits for the first message in Redis (at most 120 s), then times the run to the `expected`
/// one, or to the last message when the count stops short of it for [`SETTLED`] (coalesced;
/// at most 600 s).
pub(crate) async fn until_published(
    conn: &mut redis::aio::MultiplexedConnection,
    pid: u32,
    expected: u64,
    what: &str,
) -> anyhow::Result<Timed> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while xadd_calls(conn).await? == 0 {
        if Instant::now() > deadline {
            bail!("{what} published nothing in 120 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t0 = Instant::now();
    let cpu0 = cpu_seconds(pid)?;
    let redis_cpu0 = redis_cpu_seconds(conn).await?;
    let (mut calls, mut changed) = (0, t0);
    while calls < expected {
        let now = xadd_calls(conn).await?;
        if now != calls {
            (calls, changed) = (now, Instant::now());
        } else if changed.elapsed() > SETTLED {
            break;
        }
        if t0.elapsed() > Duration::from_secs(600) {
            bail!("{what}: only {calls} of {expected} messages after 600 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Timed {
        secs: changed.duration_since(t0).as_secs_f64().max(1e-3),
        cpu: cpu_seconds(pid)? - cpu0,
        redis_cpu: redis_cpu_seconds(conn).await? - redis_cpu0,
        messages: calls,
    })
}

/// What one round measured.
struct Round {
    produce_secs: f64,
    secs: f64,
    consume_cpu: f64,
    redis_cpu: f64,
    /// The baseline measured just before the round and just after it.
    before: Baseline,
    after: Baseline,
    /// Messages written (the rate limit may coalesce some).
    messages: u64,
}

/// `redis-benchmark`'s XADD and PUBLISH rates on the bench's Redis at one moment.
#[derive(Clone, Copy)]
struct Baseline {
    xadd: f64,
    publish: f64,
}

impl Baseline {
    /// 1 / (1/xadd + 1/publish) messages/s: what Redis can do if a message costs one of each.
    fn limit_messages(&self) -> f64 {
        1.0 / (1.0 / self.xadd + 1.0 / self.publish)
    }
}

impl Round {
    fn events_per_sec(&self, events: u64) -> f64 {
        events as f64 / self.secs
    }

    /// The mean of the limits measured before and after the round: the machine's speed drifts
    /// by ±10 % over a minute here (other tenants), and bracketing the round cancels most of it.
    fn limit_messages(&self) -> f64 {
        (self.before.limit_messages() + self.after.limit_messages()) / 2.0
    }

    fn ratio(&self, events: u64, members: usize) -> f64 {
        self.events_per_sec(events) / (self.limit_messages() / members as f64)
    }
}

async fn run_async(args: BenchConsumeArgs) -> anyhow::Result<ExitCode> {
    let exe = crate::product_binary(args.binary.as_ref())?;
    let dir = std::env::temp_dir().join(format!("foldercast-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let membership = dir.join("membership.json");
    std::fs::write(
        &membership,
        serde_json::to_vec(&generated_directory(args.spaces, args.members))?,
    )?;
    let payload_sample = sample_payload(&args).await;

    let client = redis::Client::open(args.redis.as_str())?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .context("cannot reach redis")?;
    // A saturated Redis answers INFO slowly, and flushing millions of entries takes a while.
    conn.set_response_timeout(Duration::from_secs(60));

    let mut rounds = Vec::new();
    for round in 1..=args.rounds.max(1) {
        let r = one_round(&args, &exe, &membership, &payload_sample, &mut conn).await?;
        eprintln!(
            "round {round}: {:.0} events/s, limit {:.0} events/s (before: XADD {:.0}/s, PUBLISH {:.0}/s; after: XADD {:.0}/s, PUBLISH {:.0}/s), ratio {:.0} %",
            r.events_per_sec(args.events),
            r.limit_messages() / args.members as f64,
            r.before.xadd,
            r.before.publish,
            r.after.xadd,
            r.after.publish,
            100.0 * r.ratio(args.events, args.members)
        );
        rounds.push(r);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let ratios: Vec<String> = rounds
        .iter()
        .map(|r| format!("{:.0} %", 100.0 * r.ratio(args.events, args.members)))
        .collect();
    rounds.sort_by(|a, b| {
        a.ratio(args.events, args.members)
            .total_cmp(&b.ratio(args.events, args.members))
    });
    let median = &rounds[rounds.len() / 2];
    let expected = args.events * args.members as u64;

    println!(
        "bench consume: {} events × {} members = {} messages ({} B each), {} spaces, 3 partitions; {} round(s), the median shown; rate limit {}",
        args.events,
        args.members,
        expected,
        payload_sample.len(),
        args.spaces,
        rounds.len(),
        if args.user_rate > 0.0 {
            format!("{}/s, burst {}", args.user_rate, args.user_burst)
        } else {
            "off".to_owned()
        }
    );
    println!(
        "  produce into Kafka (not timed below): {:.0} events/s",
        args.events as f64 / median.produce_secs
    );
    println!(
        "  consume → Redis: {:.0} events/s, {:.0} messages/s ({:.2} s; {} messages, {} fewer by coalescing)",
        median.events_per_sec(args.events),
        median.messages as f64 / median.secs,
        median.secs,
        median.messages,
        expected.saturating_sub(median.messages)
    );
    let messages = median.messages.max(1) as f64;
    println!(
        "  CPU: consume {:.2} s ({:.1} µs/message), redis {:.2} s ({:.1} µs/message)",
        median.consume_cpu,
        median.consume_cpu * 1e6 / messages,
        median.redis_cpu,
        median.redis_cpu * 1e6 / messages
    );
    println!(
        "  redis-benchmark -c 50 -P 64 -r {} same server, right before and after: XADD {:.0}/s and {:.0}/s, PUBLISH {:.0}/s and {:.0}/s → limit {:.0} messages/s (the mean) = {:.0} events/s at {} members",
        args.spaces * args.members,
        median.before.xadd,
        median.after.xadd,
        median.before.publish,
        median.after.publish,
        median.limit_messages(),
        median.limit_messages() / args.members as f64,
        args.members
    );
    println!(
        "  ratio: {:.0} % of the Redis-bound limit (target ≥ 90 %); rounds: {}",
        100.0 * median.ratio(args.events, args.members),
        ratios.join(", ")
    );
    println!(
        "  reproduce: scripts/bench.sh consume   (or: foldercast-bench consume --brokers B --redis URL --events {} --members {} --spaces {} --rounds {} --user-rate {} --user-burst {}{})",
        args.events,
        args.members,
        args.spaces,
        rounds.len(),
        args.user_rate,
        args.user_burst,
        args.kafka_options
            .iter()
            .map(|o| format!(" --kafka-option {o}"))
            .collect::<String>()
    );
    Ok(ExitCode::SUCCESS)
}

/// The per-user message of the trace's first event, for the baseline's payload size.
async fn sample_payload(args: &BenchConsumeArgs) -> Vec<u8> {
    let resolver = std::sync::Arc::new(foldercast::membership::FixtureResolver::new(
        &generated_directory(args.spaces, args.members),
    ));
    let p = foldercast::notify::Pipeline::new(
        foldercast::notify::dedup::Dedup::new(10, Duration::from_secs(1)),
        resolver,
    );
    match p
        .process(generated_event(0, args.spaces, 8).as_bytes())
        .await
    {
        Ok(foldercast::notify::Outcome::Deliver(f)) => f.message.payload.to_vec(),
        _ => Vec::new(),
    }
}

/// Measures the baseline on the bench's Redis and empties it, produces the trace into a fresh
/// topic, consumes the trace with a child `foldercast consume`, measures the baseline again, and
/// empties Redis.
async fn one_round(
    args: &BenchConsumeArgs,
    exe: &std::path::Path,
    membership: &std::path::Path,
    payload_sample: &[u8],
    conn: &mut redis::aio::MultiplexedConnection,
) -> anyhow::Result<Round> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let topic = format!("bench-{nanos}");

    // Measured before producing, so that Kafka writing the trace out does not slow it; the
    // round starts on an empty Redis, as without it.
    let before = baseline(args, payload_sample)?;
    let _: () = redis::cmd("FLUSHDB").query_async(conn).await?;

    eprintln!("producing {} events into {topic}…", args.events);
    let producer = KafkaProducer::connect(&args.brokers, &topic, 3).await?;
    let started = Instant::now();
    let mut batch = Vec::with_capacity(5000);
    for n in 0..args.events {
        let line = generated_event(n, args.spaces, 8);
        let key = format!("space-{}", n as usize % args.spaces);
        batch.push((Some(key), line.into_bytes()));
        if batch.len() == 5000 || n + 1 == args.events {
            producer.send_all(&batch).await?;
            batch.clear();
        }
    }
    let produce_secs = started.elapsed().as_secs_f64();

    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(conn)
        .await?;
    let expected = args.events * args.members as u64;

    let mut child = tokio::process::Command::new(exe)
        .args([
            "consume",
            "--brokers",
            &args.brokers,
            "--topic",
            &topic,
            "--group",
            &format!("{topic}-group"),
            "--redis",
            &args.redis,
        ])
        .arg("--membership")
        .arg(membership)
        .args([
            "--user-rate",
            &args.user_rate.to_string(),
            "--user-burst",
            &args.user_burst.to_string(),
            "--log",
            "warn",
            "--dead-letter-topic",
            &format!("{topic}-dlq"),
        ])
        .args(
            args.kafka_options
                .iter()
                .flat_map(|o| ["--kafka-option", o.as_str()]),
        )
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("no pid")?;

    let timed = until_published(conn, pid, expected, "the consumer").await?;
    let (secs, consume_cpu, redis_cpu, messages) =
        (timed.secs, timed.cpu, timed.redis_cpu, timed.messages);
    let _ = child.kill().await;

    let after = baseline(args, payload_sample)?;
    // Synchronously: a lazy free would run beside the next round's baseline.
    let _: () = redis::cmd("FLUSHDB").query_async(conn).await?;
    Ok(Round {
        produce_secs,
        secs,
        consume_cpu,
        redis_cpu,
        before,
        after,
        messages,
    })
}

/// The Redis-bound limit at this moment: `redis-benchmark` XADD and PUBLISH with the round's
/// payload, keys spread as the round's.
fn baseline(args: &BenchConsumeArgs, payload_sample: &[u8]) -> anyhow::Result<Baseline> {
    let (host, port) = redis_host_port(&args.redis)?;
    let payload = String::from_utf8_lossy(payload_sample).replace(' ', "_");
    // One stream and one channel per user, as foldercast writes them: keys spread over as many
    // users as the trace has (-r), not one hot key.
    let users = (args.spaces * args.members).to_string();
    let xadd = redis_benchmark(
        &host,
        port,
        500_000,
        &[
            "-r",
            &users,
            "XADD",
            "bench:{u__rand_int__}:log",
            "MAXLEN",
            "~",
            "1000",
            "*",
            "m",
            &payload,
        ],
    )?;
    let publish = redis_benchmark(
        &host,
        port,
        1_000_000,
        &[
            "-r",
            &users,
            "PUBLISH",
            "bench:{u__rand_int__}:live",
            &payload,
        ],
    )?;
    Ok(Baseline { xadd, publish })
}
