//! `foldercast-bench publish`: a notification to 100,000 users.
//!
//! A membership file of `users` users (the fixture's `--all`), a gateway with `connected` of
//! them on WebSockets, then `foldercast publish --all` as a child process. Three figures: the
//! time the publish takes (the child's run), the longest single Redis command meanwhile (Redis's
//! slow log with a threshold of 0.5 ms, reset just before), and the time until every connected
//! client has the notification (from the publish's start).

use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;

use crate::args::BenchPublishArgs;
use crate::idle::listening_addr;
use foldercast::gateway::auth::Authenticator;

const SECRET: &str = "bench-publish-secret-of-at-least-32-bytes";

pub fn run(args: BenchPublishArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: BenchPublishArgs) -> anyhow::Result<ExitCode> {
    let exe = crate::product_binary(args.binary.as_ref())?;
    let dir = std::env::temp_dir().join(format!("foldercast-bench-publish-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let membership = dir.join("membership.json");
    let spaces = args.users.div_ceil(20);
    std::fs::write(
        &membership,
        serde_json::to_vec(&crate::generated_directory(spaces, 20))?,
    )?;
    let users = spaces * 20;

    let client = redis::Client::open(args.redis.as_str())?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .context("cannot reach redis")?;
    conn.set_response_timeout(Duration::from_secs(60));
    let _: () = redis::cmd("FLUSHDB").query_async(&mut conn).await?;

    let mut gateway = tokio::process::Command::new(&exe)
        .args(["gateway", "--listen", "127.0.0.1:0", "--jwt-secret", SECRET])
        .args(["--redis", &args.redis, "--log", "warn"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let addr = listening_addr(&mut gateway).await?;
    let auth = Authenticator::hs256(SECRET.as_bytes())?;
    eprintln!("opening {} WebSocket clients…", args.connected);
    let received = Arc::new(AtomicU64::new(0));
    let last_at = Arc::new(std::sync::Mutex::new(None::<Instant>));
    for i in 0..args.connected.min(users) {
        let user = format!("user-{}-{}", i / 20, i % 20);
        let token = auth.mint(&user, Duration::from_secs(3600))?;
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(4096);
        let mut ws =
            testkit::ws::open(&format!("ws://{addr}/ws"), Some(&token), Some(config)).await?;
        testkit::ws::ready(&mut ws, Duration::from_secs(30))
            .await
            .map_err(anyhow::Error::msg)?;
        let (received, last_at) = (received.clone(), last_at.clone());
        tokio::spawn(async move {
            while let Some(Ok(msg)) = ws.next().await {
                if msg.to_text().is_ok_and(|t| t.contains("\"notification\"")) {
                    received.fetch_add(1, Relaxed);
                    if let Ok(mut at) = last_at.lock() {
                        *at = Some(Instant::now());
                    }
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("slowlog-log-slower-than")
        .arg(500)
        .query_async(&mut conn)
        .await?;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("slowlog-max-len")
        .arg(1_000_000)
        .query_async(&mut conn)
        .await?;
    let _: () = redis::cmd("SLOWLOG")
        .arg("RESET")
        .query_async(&mut conn)
        .await?;
    let started = Instant::now();
    let out = tokio::process::Command::new(&exe)
        .args(["publish", "--redis", &args.redis, "--membership"])
        .arg(&membership)
        .args([
            "--all",
            "--title",
            "Maintenance tonight",
            "--body",
            "From 22:00 to 23:00",
            "--log",
            "warn",
        ])
        .output()
        .await?;
    let publish_secs = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("publish failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    // The slow log: [id, time, µs, [cmd, args…], …] per entry.
    let log: Vec<redis::Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(1_000_000)
        .query_async(&mut conn)
        .await?;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("slowlog-log-slower-than")
        .arg(10_000)
        .query_async(&mut conn)
        .await?;
    let mut longest_us = 0i64;
    let mut longest_cmd = String::new();
    let mut commands = 0usize;
    for entry in &log {
        if let redis::Value::Array(fields) = entry
            && let (Some(redis::Value::Int(us)), Some(redis::Value::Array(cmd))) =
                (fields.get(2), fields.get(3))
        {
            let name = match cmd.first() {
                Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                _ => String::new(),
            };
            // The bench's own SLOWLOG and CONFIG calls are not the publish's.
            if name.eq_ignore_ascii_case("slowlog") || name.eq_ignore_ascii_case("config") {
                continue;
            }
            commands += 1;
            if *us > longest_us {
                longest_us = *us;
                longest_cmd = name;
            }
        }
    }
    let connected = args.connected.min(users) as u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while received.load(Relaxed) < connected {
        if Instant::now() > deadline {
            bail!(
                "only {} of {connected} clients got it",
                received.load(Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let all_secs = last_at
        .lock()
        .ok()
        .and_then(|at| *at)
        .map(|at| at.duration_since(started).as_secs_f64())
        .unwrap_or(0.0);
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "bench publish: a notification to --all = {} users (the membership file's), {} of them connected over WebSocket to one gateway",
        answer["targeted"], connected
    );
    println!("  publish (the foldercast publish process, start to exit): {publish_secs:.2} s");
    println!(
        "  longest single Redis command meanwhile: {:.2} ms ({longest_cmd}); {commands} commands took 0.5 ms or more",
        longest_us as f64 / 1000.0
    );
    println!("  every connected client has it: {all_secs:.2} s after the publish started");
    println!(
        "  reproduce: scripts/bench.sh publish   (or: foldercast-bench publish --redis URL --users {} --connected {})",
        args.users, args.connected
    );
    Ok(ExitCode::SUCCESS)
}
