//! What metrics cost the gateway: CPU per delivered message with `/metrics` on and scraped
//! every second, next to a gateway with `--metrics off`, in the same run.
//!
//! Two gateways run side by side on the same Redis, each with its own clients (one user per
//! connection), and take turns phase by phase (this machine's speed drifts over minutes): the
//! same paced pattern is published to one, then the other. The scraped gateway renders
//! `/metrics` every second throughout (Prometheus scrapes every 15 s or so by default: this
//! is fifteen times as often). The counters behind `/metrics` are kept by both (`/api/stats`
//! and the dashboard read them): what differs is what serving metrics adds, rendering
//! included, on the delivery path's CPU.

use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use anyhow::Context;

use super::fanout::{Pattern, SECRET, measure, now_ns, open_clients, publish};
use super::idle::listening_addr;
use crate::args::BenchMetricsArgs;
use foldercast::bus::{RedisBus, RedisOptions, RedisTarget};
use foldercast::gateway::auth::Authenticator;

pub fn run(args: BenchMetricsArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_async(args))
}

/// A gateway child with `metrics` on or off, and its clients.
struct Side {
    child: tokio::process::Child,
    pid: u32,
    addr: String,
    users: Vec<Arc<str>>,
    clients: super::fanout::Clients,
}

async fn side(
    exe: &std::path::Path,
    args: &BenchMetricsArgs,
    metrics: bool,
) -> anyhow::Result<Side> {
    let mut child = tokio::process::Command::new(exe)
        .args(["gateway", "--listen", "127.0.0.1:0", "--jwt-secret", SECRET])
        .args(["--redis", &args.redis, "--log", "warn"])
        .args(["--metrics", if metrics { "on" } else { "off" }])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let addr = listening_addr(&mut child).await?;
    let pid = child.id().context("no pid")?;
    let auth = Authenticator::hs256(SECRET.as_bytes())?;
    let run = now_ns();
    let tag = if metrics { "on" } else { "off" };
    let users: Vec<Arc<str>> = (0..args.connections)
        .map(|i| Arc::from(format!("metrics-{tag}-{run}-{i}")))
        .collect();
    let tokens: Vec<String> = users
        .iter()
        .map(|u| auth.mint(u, Duration::from_secs(3600)))
        .collect::<Result<_, _>>()?;
    let clients = open_clients(&addr, args.connections, Some(&tokens)).await?;
    Ok(Side {
        child,
        pid,
        addr,
        users,
        clients,
    })
}

/// GETs `/metrics` every second until dropped; counts the scrapes that answered 200.
fn scrape_every_second(addr: String, scrapes: Arc<AtomicU64>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Ok(mut s) = tokio::net::TcpStream::connect(&addr).await else {
                continue;
            };
            let request =
                format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            if s.write_all(request.as_bytes()).await.is_err() {
                continue;
            }
            let mut answer = Vec::new();
            let _ = s.read_to_end(&mut answer).await;
            if answer.starts_with(b"HTTP/1.1 200") {
                scrapes.fetch_add(1, Relaxed);
            }
        }
    })
}

async fn run_async(args: BenchMetricsArgs) -> anyhow::Result<ExitCode> {
    let exe = crate::product_binary(args.binary.as_ref())?;
    let mut on = side(&exe, &args, true).await?;
    let mut off = side(&exe, &args, false).await?;
    let bus = RedisBus::connect(
        &RedisTarget::Standalone(args.redis.clone()),
        RedisOptions::default(),
        None,
    )
    .await?;
    let scrapes = Arc::new(AtomicU64::new(0));
    let scraper = scrape_every_second(on.addr.clone(), scrapes.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pattern = Pattern {
        rate: args.paced_rate,
        burst: 1,
    };
    let count = args.paced_rate * args.seconds;
    let mut rounds = Vec::new();
    for round in 0..args.rounds.max(1) {
        // Alternate which goes first, so a drift within a round falls on both.
        let order: [&Side; 2] = if round % 2 == 0 {
            [&on, &off]
        } else {
            [&off, &on]
        };
        let mut costs = Vec::new();
        for s in order {
            let phase = publish(&bus, &s.users, count, pattern, false);
            costs.push(measure(s.pid, &s.clients, count, phase).await?);
        }
        let (with, without) = if round % 2 == 0 {
            (&costs[0], &costs[1])
        } else {
            (&costs[1], &costs[0])
        };
        rounds.push((
            with.server_us,
            without.server_us,
            with.rate(),
            without.rate(),
        ));
    }
    scraper.abort();
    let _ = on.child.kill().await;
    let _ = off.child.kill().await;

    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let ratios: Vec<f64> = rounds.iter().map(|(w, wo, _, _)| w / wo).collect();
    let listed: Vec<String> = ratios.iter().map(|r| format!("{r:.3}")).collect();
    println!(
        "bench metrics: 2 gateways on one Redis, {} WebSocket clients each (one user each), {} msg/s for {} s per phase, {} rounds",
        args.connections,
        args.paced_rate,
        args.seconds,
        rounds.len()
    );
    println!(
        "  gateway CPU per delivered message, medians: metrics on and scraped every 1 s {:.3} µs ({:.0} msg/s), --metrics off {:.3} µs ({:.0} msg/s)",
        median(rounds.iter().map(|r| r.0).collect()),
        median(rounds.iter().map(|r| r.2).collect()),
        median(rounds.iter().map(|r| r.1).collect()),
        median(rounds.iter().map(|r| r.3).collect()),
    );
    println!(
        "  ratio on ÷ off: {:.3}x (rounds: {}); {} scrapes answered",
        median(ratios),
        listed.join(", "),
        scrapes.load(Relaxed)
    );
    println!("  target: ≤ 1.05x");
    println!(
        "  reproduce: scripts/bench.sh metrics   (or: foldercast-bench metrics --redis URL --connections {} --paced-rate {} --seconds {} --rounds {})",
        args.connections, args.paced_rate, args.seconds, args.rounds
    );
    Ok(ExitCode::SUCCESS)
}
