//! Gateway fan-out: Redis → `foldercast gateway` → 1 000 WebSocket clients.
//!
//! Baseline first, in the same run: the bare axum loop (`bare.rs`) sends frames as long as the
//! gateway's (the longest a gateway client received in the latency phase: the payload in its
//! envelope) over as many connections, from inside the server. Then the gateway as a child process, each
//! connection a different user, messages published to Redis by this process:
//! - latency: `rate` messages/s (each to the next user) for `seconds`; produce → frame p50/p99;
//! - cost: the same three patterns on both servers: one message per connection at a time at
//!   `paced_rate`, bursts of `burst` to one connection at `paced_rate`, and one per connection as
//!   fast as they go. CPU per delivered message is compared pattern by pattern, at the same rate,
//!   the two servers taking turns phase by phase for `rounds` rounds (medians reported).
//!   A server's CPU per message falls as its rate rises (more messages per wake-up, Nagle joins
//!   writes), so a gateway at 80 000 msg/s next to a bare loop at 300 000 msg/s compares two
//!   different workloads; the paced phases are the like-for-like figures.
//!
//! CPU is read from /proc for the server child and for this process (the load generator)
//! separately: client and server share the machine's two cores.

use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::idle::listening_addr;
use super::proc::cpu_seconds;
use crate::args::{BenchFanoutArgs, FanoutPattern};
use foldercast::bus::{Bus, Outgoing, RedisBus, RedisOptions, RedisTarget};
use foldercast::gateway::auth::Authenticator;

pub(crate) const SECRET: &str = "bench-fanout-secret-of-at-least-32-bytes";
const PAYLOAD_BYTES: usize = 300;

pub(crate) struct Clients {
    received: Arc<AtomicU64>,
    recording: Arc<AtomicBool>,
    /// (sent_ns, arrived_ns) of each frame received while recording.
    latencies: Arc<std::sync::Mutex<Vec<(u64, u64)>>>,
    /// The longest frame received while recording, in bytes.
    longest: Arc<std::sync::atomic::AtomicUsize>,
}

pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Opens `n` clients; each counts frames and, while recording, the latency in their `sent_ns`.
pub(crate) async fn open_clients(
    addr: &str,
    n: usize,
    tokens: Option<&[String]>,
) -> anyhow::Result<Clients> {
    let clients = Clients {
        received: Arc::new(AtomicU64::new(0)),
        recording: Arc::new(AtomicBool::new(false)),
        latencies: Arc::new(std::sync::Mutex::new(Vec::new())),
        longest: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
    };
    for i in 0..n {
        let config = WebSocketConfig::default().read_buffer_size(4096);
        let token = tokens.map(|t| t[i].as_str());
        let mut ws = testkit::ws::open(&format!("ws://{addr}/ws"), token, Some(config)).await?;
        if token.is_some() {
            testkit::ws::ready(&mut ws, Duration::from_secs(30))
                .await
                .map_err(anyhow::Error::msg)?;
        }
        let (received, recording, latencies, longest) = (
            clients.received.clone(),
            clients.recording.clone(),
            clients.latencies.clone(),
            clients.longest.clone(),
        );
        tokio::spawn(async move {
            while let Some(Ok(msg)) = ws.next().await {
                received.fetch_add(1, Relaxed);
                if recording.load(Relaxed) {
                    longest.fetch_max(msg.len(), Relaxed);
                }
                if recording.load(Relaxed)
                    && let Ok(text) = msg.to_text()
                    && let Some(sent) = sent_ns_in(text.as_bytes())
                    && let Ok(mut all) = latencies.lock()
                {
                    all.push((sent, now_ns()));
                }
            }
        });
    }
    Ok(clients)
}

async fn wait_for(counter: &AtomicU64, target: u64, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while counter.load(Relaxed) < target {
        if Instant::now() > deadline {
            bail!(
                "only {} of {target} messages arrived",
                counter.load(Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// The `sent_ns` stamp of a latency-phase payload, in a frame or a channel message.
fn sent_ns_in(text: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"sent_ns\":";
    let at = text.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let digits = text[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&text[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// Subscribes to every user's channel on a connection of its own and notes when each stamped
/// message leaves Redis (as seen by a subscriber next to the gateway), so Redis → frame can be
/// told apart from produce → frame, which also holds the producer's script call.
async fn tap_redis(
    redis: &str,
    users: &[Arc<str>],
) -> anyhow::Result<(
    tokio::task::JoinHandle<()>,
    Arc<std::sync::Mutex<std::collections::HashMap<u64, u64>>>,
)> {
    let mut pubsub = redis::Client::open(redis)?.get_async_pubsub().await?;
    let channels: Vec<String> = users
        .iter()
        .map(|u| foldercast::bus::redis::keys::channel(u))
        .collect();
    pubsub.subscribe(channels).await?;
    let seen = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let noted = seen.clone();
    let task = tokio::spawn(async move {
        let mut messages = pubsub.into_on_message();
        while let Some(m) = messages.next().await {
            let at = now_ns();
            if let Some(sent) = sent_ns_in(m.get_payload_bytes())
                && let Ok(mut all) = noted.lock()
            {
                all.insert(sent, at);
            }
        }
    });
    Ok((task, seen))
}

fn payload(sent_ns: u64) -> Bytes {
    let head = format!(r#"{{"type":"file-touched","space_id":"bench","sent_ns":{sent_ns},"pad":""#);
    let pad = "x".repeat(PAYLOAD_BYTES.saturating_sub(head.len() + 2));
    Bytes::from(format!("{head}{pad}\"}}"))
}

/// How messages are spread over the connections in a cost phase.
#[derive(Clone, Copy)]
pub(crate) struct Pattern {
    /// Messages per second, in 10 ms ticks; 0 = as fast as they go.
    pub(crate) rate: u64,
    /// Messages in a row to one connection before moving to the next.
    pub(crate) burst: usize,
}

impl Pattern {
    fn describe(&self) -> String {
        let spread = match self.burst {
            1 => "one per connection".to_string(),
            k => format!("bursts of {k} per connection"),
        };
        match self.rate {
            0 => format!("{spread}, as fast as it goes"),
            r => format!("{spread}, {r} msg/s"),
        }
    }
}

/// CPU and wall time of one phase: server process and this process (the load generator).
pub(crate) struct Cost {
    messages: u64,
    secs: f64,
    pub(crate) server_us: f64,
    load_us: f64,
}

impl Cost {
    pub(crate) fn rate(&self) -> f64 {
        self.messages as f64 / self.secs
    }
}

/// Runs `drive` (which starts sending `messages` messages) and measures until all have arrived.
pub(crate) async fn measure<F: std::future::Future<Output = anyhow::Result<()>>>(
    server_pid: u32,
    clients: &Clients,
    messages: u64,
    drive: F,
) -> anyhow::Result<Cost> {
    let before = clients.received.load(Relaxed);
    let server0 = cpu_seconds(server_pid)?;
    let load0 = cpu_seconds(std::process::id())?;
    let t0 = Instant::now();
    drive.await?;
    wait_for(
        &clients.received,
        before + messages,
        Duration::from_secs(300),
    )
    .await?;
    let secs = t0.elapsed().as_secs_f64();
    Ok(Cost {
        messages,
        secs,
        server_us: (cpu_seconds(server_pid)? - server0) * 1e6 / messages as f64,
        load_us: (cpu_seconds(std::process::id())? - load0) * 1e6 / messages as f64,
    })
}

/// Publishes `count` messages to the users through Redis, paced and spread as `pattern` says.
/// With `stamp`, each payload carries its send time for the latency measurement.
pub(crate) async fn publish(
    bus: &RedisBus,
    users: &[Arc<str>],
    count: u64,
    pattern: Pattern,
    stamp: bool,
) -> anyhow::Result<()> {
    let per_tick = match pattern.rate {
        0 => users.len() as u64,
        r => (r / 100).max(1),
    };
    let burst = pattern.burst.max(1) as u64;
    let body = payload(0);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut sent = 0u64;
    while sent < count {
        if pattern.rate > 0 {
            tick.tick().await;
        }
        let end = (sent + per_tick).min(count);
        let batch: Vec<Outgoing> = (sent..end)
            .map(|i| {
                let user = users[((i / burst) % users.len() as u64) as usize].clone();
                let body = if stamp {
                    payload(now_ns())
                } else {
                    body.clone()
                };
                Outgoing::new(user, body)
            })
            .collect();
        bus.publish(&batch).await?;
        sent = end;
    }
    Ok(())
}

pub fn run(args: BenchFanoutArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: BenchFanoutArgs) -> anyhow::Result<ExitCode> {
    let exe = crate::product_binary(args.binary.as_ref())?;
    let n = args.connections;
    let patterns: Vec<Pattern> = args
        .patterns
        .iter()
        .map(|p| match p {
            FanoutPattern::Spread => Pattern {
                rate: args.paced_rate,
                burst: 1,
            },
            FanoutPattern::Bursts => Pattern {
                rate: args.paced_rate,
                burst: args.burst,
            },
            FanoutPattern::Flood => Pattern { rate: 0, burst: 1 },
        })
        .collect();
    let count = |p: &Pattern| match p.rate {
        0 => (n as u64 * 100).max(100_000),
        r => r * args.seconds,
    };
    let write_buffer = args
        .ws_write_buffer
        .unwrap_or_else(|| foldercast::gateway::GatewayConfig::default().ws_write_buffer)
        .to_string();

    // Both servers run side by side, each with its own clients, and take turns phase by phase:
    // this machine's speed drifts by tens of percent over minutes, and a ratio of two phases
    // measured seconds apart is steadier than one of two phases a minute apart.
    let mut bare = tokio::process::Command::new(std::env::current_exe()?)
        .args(["bare-gateway", "--listen", "127.0.0.1:0"])
        .args(["--write-buffer", &write_buffer])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let bare_addr = listening_addr(&mut bare).await?;
    let bare_pid = bare.id().context("no pid")?;
    let bare_clients = open_clients(&bare_addr, n, None).await?;

    let mut gateway = tokio::process::Command::new(&exe)
        .args([
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--jwt-secret",
            SECRET,
            "--redis",
            &args.redis,
            "--log",
            "warn",
            "--ws-write-buffer",
            &write_buffer,
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let addr = listening_addr(&mut gateway).await?;
    let pid = gateway.id().context("no pid")?;
    let auth = Authenticator::hs256(SECRET.as_bytes())?;
    let run_id = now_ns();
    let users: Vec<Arc<str>> = (0..n)
        .map(|i| Arc::from(format!("fan-{run_id}-{i}")))
        .collect();
    let tokens: Vec<String> = users
        .iter()
        .map(|u| auth.mint(u, Duration::from_secs(3600)))
        .collect::<Result<_, _>>()?;
    let clients = open_clients(&addr, n, Some(&tokens)).await?;
    let bus = RedisBus::connect(
        &RedisTarget::Standalone(args.redis.clone()),
        RedisOptions::default(),
        None,
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Latency at `rate` messages/s, each message to the next user.
    let (tap, left_redis) = tap_redis(&args.redis, &users).await?;
    clients.recording.store(true, Relaxed);
    let latency_pattern = Pattern {
        rate: args.rate,
        burst: 1,
    };
    let sent = args.rate.max(1) * args.seconds;
    measure(
        pid,
        &clients,
        sent,
        publish(&bus, &users, sent, latency_pattern, true),
    )
    .await?;
    clients.recording.store(false, Relaxed);
    tokio::time::sleep(Duration::from_millis(100)).await;
    tap.abort();
    // The bare loop sends frames as long as the gateway's: the payload in its envelope (type,
    // position, `data`), about a fifth more bytes to copy and send than the payload alone.
    let frame_bytes = match clients.longest.load(Relaxed) {
        0 => PAYLOAD_BYTES,
        longest => longest,
    };
    let frames = clients
        .latencies
        .lock()
        .map(|l| l.clone())
        .unwrap_or_default();
    let left_redis = left_redis.lock().map(|m| m.clone()).unwrap_or_default();
    let mut produce_to_frame: Vec<u64> = frames
        .iter()
        .map(|(sent, arrived)| arrived.saturating_sub(*sent))
        .collect();
    let mut redis_to_frame: Vec<u64> = frames
        .iter()
        .filter_map(|(sent, arrived)| Some(arrived.saturating_sub(*left_redis.get(sent)?)))
        .collect();
    produce_to_frame.sort_unstable();
    redis_to_frame.sort_unstable();
    let pct = |v: &[u64], p: f64| {
        v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1e6
    };

    // Rounds: per pattern, the bare loop then the gateway.
    let rounds = args.rounds.max(1);
    let mut costs: Vec<Vec<(Cost, Cost)>> = patterns.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (k, p) in patterns.iter().enumerate() {
            let url = format!(
                "http://{bare_addr}/drive?count={}&size={frame_bytes}&rate={}&burst={}",
                count(p),
                p.rate,
                p.burst
            );
            let bare_cost = measure(bare_pid, &bare_clients, count(p), reqwest_post(&url)).await?;
            let phase = publish(&bus, &users, count(p), *p, false);
            let gateway_cost = measure(pid, &clients, count(p), phase).await?;
            costs[k].push((gateway_cost, bare_cost));
        }
    }
    let _ = gateway.kill().await;
    let _ = bare.kill().await;

    println!(
        "bench fanout: {n} WebSocket clients (one user each), {PAYLOAD_BYTES} B payloads in {frame_bytes} B frames (the bare loop's are as long), {write_buffer} B write buffers"
    );
    println!(
        "  latency at {} msg/s for {} s, produce → frame ({} samples): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        args.rate,
        args.seconds,
        produce_to_frame.len(),
        pct(&produce_to_frame, 0.50),
        pct(&produce_to_frame, 0.99),
        pct(&produce_to_frame, 1.0)
    );
    println!(
        "  latency, Redis → frame (from a subscriber next to the gateway; {} samples): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        redis_to_frame.len(),
        pct(&redis_to_frame, 0.50),
        pct(&redis_to_frame, 0.99),
        pct(&redis_to_frame, 1.0)
    );
    println!(
        "  CPU per delivered message, gateway (over Redis) next to the bare axum loop, same pattern, measured in turns ({rounds} rounds; medians, ratios per round):"
    );
    for (p, measured) in patterns.iter().zip(&costs) {
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        };
        let ratios: Vec<f64> = measured
            .iter()
            .map(|(gw, bare)| gw.server_us / bare.server_us)
            .collect();
        let listed: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "    {:<44} gateway {:>6.2} µs ({:>7.0} msg/s; load generator {:.2} µs)   bare {:>5.2} µs ({:>7.0} msg/s)   ratio {:.2}x (rounds: {})",
            p.describe(),
            median(measured.iter().map(|(gw, _)| gw.server_us).collect()),
            median(measured.iter().map(|(gw, _)| gw.rate()).collect()),
            median(measured.iter().map(|(gw, _)| gw.load_us).collect()),
            median(measured.iter().map(|(_, bare)| bare.server_us).collect()),
            median(measured.iter().map(|(_, bare)| bare.rate()).collect()),
            median(ratios),
            listed.join(", ")
        );
    }
    println!(
        "  target: ratio ≤ 1.3x; compare at equal rates (CPU per message falls as the rate rises)"
    );
    println!(
        "  reproduce: scripts/bench.sh fanout   (or: foldercast-bench fanout --redis URL --connections {n} --rate {} --seconds {} --paced-rate {} --burst {} --rounds {rounds})",
        args.rate, args.seconds, args.paced_rate, args.burst
    );
    Ok(ExitCode::SUCCESS)
}

async fn reqwest_post(url: &str) -> anyhow::Result<()> {
    // A bare HTTP/1.1 POST without pulling an HTTP client into the binary.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").context("http URL")?;
    let (host, path) = rest.split_once('/').context("URL path")?;
    let mut stream = tokio::net::TcpStream::connect(host).await?;
    stream.write_all(format!("POST /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await?;
    if !reply.starts_with(b"HTTP/1.1 200") {
        bail!("POST {url}: {}", String::from_utf8_lossy(&reply));
    }
    Ok(())
}
