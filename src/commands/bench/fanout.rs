//! Gateway fan-out: Redis → `foldercast gateway` → 1 000 WebSocket clients.
//!
//! Baseline first, in the same run: the bare axum loop (see `bench idle`) sends messages of the
//! same size round-robin over as many connections, from inside the server. Then the gateway as a
//! child process, each connection a different user, messages published to Redis by this process:
//! - latency: `rate` messages/s (each to the next user) for `seconds`; produce → frame p50/p99;
//! - throughput: messages one per user per batch, as fast as they go; delivered messages/s and
//!   the gateway's CPU per delivered message, next to the baseline's.
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
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::idle::listening_addr;
use super::proc::cpu_seconds;
use crate::bus::{Bus, Outgoing, RedisBus, RedisOptions, RedisTarget};
use crate::config::BenchFanoutArgs;
use crate::gateway::auth::Authenticator;

const SECRET: &str = "bench-fanout-secret";
const PAYLOAD_BYTES: usize = 300;

struct Clients {
    received: Arc<AtomicU64>,
    recording: Arc<AtomicBool>,
    latencies: Arc<std::sync::Mutex<Vec<u64>>>,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Opens `n` clients; each counts frames and, while recording, the latency in their `sent_ns`.
async fn open_clients(addr: &str, n: usize, tokens: Option<&[String]>) -> anyhow::Result<Clients> {
    let clients = Clients {
        received: Arc::new(AtomicU64::new(0)),
        recording: Arc::new(AtomicBool::new(false)),
        latencies: Arc::new(std::sync::Mutex::new(Vec::new())),
    };
    for i in 0..n {
        let mut request = format!("ws://{addr}/ws").into_client_request()?;
        if let Some(tokens) = tokens {
            request.headers_mut().insert(
                "Authorization",
                HeaderValue::from_str(&format!("Bearer {}", tokens[i]))?,
            );
        }
        let config = WebSocketConfig::default().read_buffer_size(4096);
        let (mut ws, _) =
            tokio_tungstenite::connect_async_with_config(request, Some(config), false).await?;
        if tokens.is_some() {
            match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
                Ok(Some(Ok(m))) if m.to_text().unwrap_or("").contains("ready") => {}
                other => bail!("expected a ready frame, got {other:?}"),
            }
        }
        let (received, recording, latencies) = (
            clients.received.clone(),
            clients.recording.clone(),
            clients.latencies.clone(),
        );
        tokio::spawn(async move {
            while let Some(Ok(msg)) = ws.next().await {
                received.fetch_add(1, Relaxed);
                if recording.load(Relaxed)
                    && let Ok(text) = msg.to_text()
                    && let Some(sent) = text
                        .split("\"sent_ns\":")
                        .nth(1)
                        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                        .and_then(|d| d.parse::<u64>().ok())
                    && let Ok(mut all) = latencies.lock()
                {
                    all.push(now_ns().saturating_sub(sent));
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

fn payload(sent_ns: u64) -> Bytes {
    let head = format!(r#"{{"type":"file-touched","space_id":"bench","sent_ns":{sent_ns},"pad":""#);
    let pad = "x".repeat(PAYLOAD_BYTES.saturating_sub(head.len() + 2));
    Bytes::from(format!("{head}{pad}\"}}"))
}

pub fn run(args: BenchFanoutArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: BenchFanoutArgs) -> anyhow::Result<ExitCode> {
    let exe = match &args.binary {
        Some(b) => b.clone(),
        None => std::env::current_exe()?,
    };
    let n = args.connections;
    let throughput_messages = (n as u64 * 200).max(100_000);

    // --- baseline: the bare axum loop -------------------------------------------------------
    let mut bare = tokio::process::Command::new(&exe)
        .args(["bench", "bare-gateway", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let bare_addr = listening_addr(&mut bare).await?;
    let bare_pid = bare.id().context("no pid")?;
    let clients = open_clients(&bare_addr, n, None).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu0 = cpu_seconds(bare_pid)?;
    let t0 = Instant::now();
    reqwest_post(&format!(
        "http://{bare_addr}/drive?count={throughput_messages}&size={PAYLOAD_BYTES}"
    ))
    .await?;
    wait_for(
        &clients.received,
        throughput_messages,
        Duration::from_secs(300),
    )
    .await?;
    let bare_secs = t0.elapsed().as_secs_f64();
    let bare_us = (cpu_seconds(bare_pid)? - cpu0) * 1e6 / throughput_messages as f64;
    let _ = bare.kill().await;
    drop(clients);

    // --- foldercast gateway over Redis ------------------------------------------------------
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
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let addr = listening_addr(&mut gateway).await?;
    let pid = gateway.id().context("no pid")?;
    let auth = Authenticator::hs256(SECRET.as_bytes());
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

    // Latency at `rate` messages/s, in 10 ms ticks, each message to the next user.
    clients.recording.store(true, Relaxed);
    let per_tick = (args.rate / 100).max(1) as usize;
    let ticks = args.seconds * 100;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut next_user = 0usize;
    let before = clients.received.load(Relaxed);
    for _ in 0..ticks {
        tick.tick().await;
        let batch: Vec<Outgoing> = (0..per_tick)
            .map(|_| {
                next_user = (next_user + 1) % n;
                Outgoing::new(users[next_user].clone(), payload(now_ns()))
            })
            .collect();
        bus.publish(&batch).await?;
    }
    let sent = ticks * per_tick as u64;
    wait_for(&clients.received, before + sent, Duration::from_secs(30)).await?;
    clients.recording.store(false, Relaxed);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut lat = clients
        .latencies
        .lock()
        .map(|l| l.clone())
        .unwrap_or_default();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1e3
    };

    // Throughput: one message per user per batch, as fast as Redis takes them.
    let before = clients.received.load(Relaxed);
    let gw_cpu0 = cpu_seconds(pid)?;
    let own_cpu0 = cpu_seconds(std::process::id())?;
    let t0 = Instant::now();
    let mut published = 0u64;
    let body = payload(0);
    while published < throughput_messages {
        let batch: Vec<Outgoing> = users
            .iter()
            .map(|u| Outgoing::new(u.clone(), body.clone()))
            .collect();
        bus.publish(&batch).await?;
        published += batch.len() as u64;
    }
    wait_for(
        &clients.received,
        before + published,
        Duration::from_secs(300),
    )
    .await?;
    let secs = t0.elapsed().as_secs_f64();
    let gw_us = (cpu_seconds(pid)? - gw_cpu0) * 1e6 / published as f64;
    let own_us = (cpu_seconds(std::process::id())? - own_cpu0) * 1e6 / published as f64;
    let _ = gateway.kill().await;

    println!("bench fanout: {n} WebSocket clients (one user each), {PAYLOAD_BYTES} B payloads");
    println!(
        "  latency, produce → frame at {} msg/s for {} s ({} samples): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        per_tick * 100,
        args.seconds,
        lat.len(),
        pct(0.50) / 1e3,
        pct(0.99) / 1e3,
        pct(1.0) / 1e3
    );
    println!(
        "  throughput: {:.0} messages/s delivered ({published} messages, {:.2} s)",
        published as f64 / secs,
        secs
    );
    println!(
        "  gateway CPU: {gw_us:.2} µs per delivered message; load generator (publisher + clients): {own_us:.2} µs"
    );
    println!(
        "  bare axum loop, same run: {bare_us:.2} µs per message ({:.0} messages/s); gateway ÷ bare = {:.2}x (target ≤ 1.3x)",
        throughput_messages as f64 / bare_secs,
        gw_us / bare_us
    );
    println!(
        "  reproduce: scripts/bench.sh fanout   (or: foldercast bench fanout --redis URL --connections {n} --rate {} --seconds {})",
        args.rate, args.seconds
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
