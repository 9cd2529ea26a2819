//! A reconnect storm: every client of a gateway that was killed resumes at once from the new one.
//!
//! `connections` WebSocket clients (one user each) connect to a `foldercast gateway` child over
//! Redis and note their position. The gateway is killed (SIGKILL: no drain spread, so all of them
//! come back together), `missed` messages per user are published meanwhile, and a new gateway
//! starts on the same port. Every client then reconnects with `?since=<position>`; the bench
//! reports how long until each had its `resumed` frame and all its missed messages, the new
//! gateway's peak resident memory, and the Redis commands per resuming session (script calls and
//! subscriptions, from `INFO commandstats`).

use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;

use super::idle::listening_addr;
use super::proc::redis_info;
use crate::args::BenchStormArgs;
use foldercast::bus::{Bus, Outgoing, RedisBus, RedisOptions, RedisTarget};
use foldercast::gateway::auth::Authenticator;

const SECRET: &str = "bench-storm-secret-of-at-least-32-bytes";

pub fn run(args: BenchStormArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_async(args))
}

async fn gateway(exe: &std::path::Path, listen: &str, redis: &str) -> anyhow::Result<Child> {
    let mut child = Command::new(exe)
        .args([
            "gateway",
            "--listen",
            listen,
            "--jwt-secret",
            SECRET,
            "--redis",
            redis,
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the gateway")?;
    listening_addr(&mut child).await?;
    Ok(child)
}

/// The child's peak resident memory (VmHWM), in MB.
fn peak_rss_mb(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM")?;
    Ok(kb / 1024.0)
}

fn calls(stats: &std::collections::HashMap<String, String>, command: &str) -> u64 {
    stats
        .get(&format!("cmdstat_{command}"))
        .and_then(|v| v.split(',').find_map(|kv| kv.strip_prefix("calls=")))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_json(ws: &mut Ws) -> anyhow::Result<serde_json::Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(60), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return Ok(serde_json::from_str(&t)?),
            Ok(Some(Ok(_))) => continue,
            other => bail!("connection ended: {other:?}"),
        }
    }
}

async fn run_async(args: BenchStormArgs) -> anyhow::Result<ExitCode> {
    let exe = crate::product_binary(None)?;
    let n = args.connections;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let listen = format!("127.0.0.1:{port}");
    let auth = Authenticator::hs256(SECRET.as_bytes())?;
    let run = rand::random::<u32>();
    let users: Vec<Arc<str>> = (0..n)
        .map(|i| Arc::from(format!("storm-{run}-{i}")))
        .collect();
    let mut first = gateway(&exe, &listen, &args.redis).await?;

    // Everyone connects and notes the position `ready` gives.
    let mut positions = Vec::with_capacity(n);
    let mut sockets = Vec::with_capacity(n);
    for user in &users {
        let token = auth.mint(user, Duration::from_secs(3600))?;
        let mut ws = testkit::ws::open(&format!("ws://{listen}/ws"), Some(&token), None).await?;
        let ready = next_json(&mut ws).await?;
        positions.push(
            ready["position"]
                .as_str()
                .context("no position")?
                .to_owned(),
        );
        sockets.push((ws, token));
    }
    println!("bench storm: {n} WebSocket clients (one user each) connected; killing the gateway");
    first.start_kill()?;
    first.wait().await?;
    let tokens: Vec<String> = sockets.into_iter().map(|(_, t)| t).collect();

    let bus = RedisBus::connect(
        &RedisTarget::Standalone(args.redis.clone()),
        RedisOptions::default(),
        None,
    )
    .await?;
    for round in 0..args.missed {
        let batch: Vec<Outgoing> = users
            .iter()
            .map(|u| {
                Outgoing::new(
                    u.clone(),
                    Bytes::from(format!(
                        r#"{{"type":"file-uploaded","space_id":"storm","n":{round}}}"#
                    )),
                )
            })
            .collect();
        for chunk in batch.chunks(1000) {
            bus.publish(chunk).await?;
        }
    }
    let mut redis = redis::Client::open(args.redis.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let before = redis_info(&mut redis, "commandstats").await?;
    let second = gateway(&exe, &listen, &args.redis).await?;
    let pid = second.id().context("no pid")?;

    // The storm: all of them at once, each resuming from its position.
    let start = Instant::now();
    let missed = args.missed as usize;
    let clients = positions.into_iter().zip(tokens).map(|(position, token)| {
        let url = format!("ws://{listen}/ws?since={position}");
        tokio::spawn(async move {
            let reconnect = Instant::now();
            let mut ws = testkit::ws::open(&url, Some(&token), None).await?;
            let ready = next_json(&mut ws).await?;
            anyhow::ensure!(ready["type"] == "ready", "{ready}");
            let resumed = next_json(&mut ws).await?;
            anyhow::ensure!(resumed["recovered"] == true, "not recovered: {resumed}");
            let mut got = 0;
            while got < missed {
                if next_json(&mut ws).await?["type"] == "event" {
                    got += 1;
                }
            }
            Ok::<(Duration, Duration, Ws), anyhow::Error>((
                start.elapsed(),
                reconnect.elapsed(),
                ws,
            ))
        })
    });
    let clients: Vec<_> = clients.collect();
    let mut times = Vec::with_capacity(n);
    let mut own = Vec::with_capacity(n);
    let mut open_sockets = Vec::with_capacity(n);
    for c in clients {
        let (t, mine, ws) = c.await??;
        times.push(t);
        own.push(mine);
        open_sockets.push(ws);
    }
    own.sort();
    let after = redis_info(&mut redis, "commandstats").await?;
    times.sort();
    let pct = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
    let delta = |c: &str| calls(&after, c).saturating_sub(calls(&before, c));
    let scripts = delta("evalsha") + delta("eval");
    let subscribes = delta("subscribe");
    println!(
        "  {n} clients resumed, {missed} missed messages each: all caught up {:.2} s after the new gateway was listening (p50 {:.2} s, p99 {:.2} s)",
        pct(1.0).as_secs_f64(),
        pct(0.5).as_secs_f64(),
        pct(0.99).as_secs_f64()
    );
    let own_pct = |p: f64| own[((own.len() as f64 * p) as usize).min(own.len() - 1)];
    println!(
        "  from each client's own reconnect to caught up: p50 {:.2} s, p99 {:.2} s, max {:.2} s (one client process opens all {n})",
        own_pct(0.5).as_secs_f64(),
        own_pct(0.99).as_secs_f64(),
        own_pct(1.0).as_secs_f64()
    );
    println!("  new gateway peak RSS: {:.1} MB", peak_rss_mb(pid)?);
    println!(
        "  Redis commands per resuming session: {:.2} history reads, {:.2} subscribes ({} and {} in all)",
        scripts as f64 / n as f64,
        subscribes as f64 / n as f64,
        scripts,
        subscribes
    );
    println!(
        "  target: all caught up within 2 s of their reconnect; at most 2 Redis round trips per resuming session"
    );
    println!(
        "  reproduce: ulimit -n 20000 && foldercast-bench storm --redis URL --connections {n} --missed {missed}"
    );
    drop(open_sockets);
    drop(second);
    Ok(ExitCode::SUCCESS)
}
