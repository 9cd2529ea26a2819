//! Idle-connection memory of the gateway, measured on a child process.
//!
//! Two children run one after the other: the baseline (a bare axum WebSocket loop, the floor
//! measured in `shared/reference/perf-facts.md`: one task per connection selecting over a bounded
//! channel and `recv`, 1 KiB buffers) and `foldercast run` itself. For each, the bench opens the
//! connections (authenticated for foldercast: bearer token, `ready` frame received), waits for the
//! server to settle, and divides the growth of the child's resident memory by the count.

use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::args::BenchIdleArgs;
use foldercast::gateway::auth::Authenticator;

const SECRET: &str = "bench-idle-secret-of-at-least-32-bytes";
const SETTLE: Duration = Duration::from_secs(10);

pub fn run(args: BenchIdleArgs) -> anyhow::Result<ExitCode> {
    let limit = open_file_limit().unwrap_or(0);
    if (limit as usize) < args.connections + 200 {
        bail!(
            "the open-file limit is {limit}; {} connections need more: run `ulimit -n 20000` first (scripts/bench.sh does)",
            args.connections
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let exe = crate::product_binary(args.binary.as_ref())?;
        let bare = measure(
            &std::env::current_exe().context("cannot find this binary")?,
            &["bare-gateway", "--listen", "127.0.0.1:0"],
            &args,
            false,
        )
        .await?;
        let ours = measure(
            &exe,
            &[
                "run",
                "--events",
                "/dev/null",
                "--listen",
                "127.0.0.1:0",
                "--jwt-secret",
                SECRET,
                "--no-demo",
                "--log",
                "warn",
            ],
            &args,
            true,
        )
        .await?;
        println!(
            "bench idle: {} idle WebSocket connections, {} users, {} s settle",
            args.connections,
            args.users,
            SETTLE.as_secs()
        );
        println!(
            "  bare axum loop (baseline):        {:>6.2} KB per connection",
            bare.kb_per_connection
        );
        println!(
            "  foldercast gateway (authenticated): {:>6.2} KB per connection ({:.2}x the baseline)",
            ours.kb_per_connection,
            ours.kb_per_connection / bare.kb_per_connection
        );
        println!(
            "  foldercast RSS: {:.1} MB before, {:.1} MB after; connect time {:.1} s",
            ours.before_kb / 1024.0,
            ours.after_kb / 1024.0,
            ours.connect_secs
        );
        println!(
            "  reproduce: ulimit -n 20000 && foldercast-bench idle --connections {} --users {}",
            args.connections, args.users
        );
        Ok(ExitCode::SUCCESS)
    })
}

struct Measurement {
    kb_per_connection: f64,
    before_kb: f64,
    after_kb: f64,
    connect_secs: f64,
}

async fn measure(
    exe: &PathBuf,
    argv: &[&str],
    args: &BenchIdleArgs,
    authenticated: bool,
) -> anyhow::Result<Measurement> {
    let mut child = Command::new(exe)
        .args(argv)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    let addr = listening_addr(&mut child).await?;
    let pid = child.id().context("child has no pid")?;
    let auth = Authenticator::hs256(SECRET.as_bytes())?;
    let tokens: Vec<String> = (0..args.users.max(1))
        .map(|u| auth.mint(&format!("user-{u}"), Duration::from_secs(3600)))
        .collect::<Result<_, _>>()?;

    // One warm connection first, so one-time allocations are not charged to the count.
    let mut held = vec![open(&addr, authenticated.then(|| tokens[0].as_str())).await?];
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before_kb = rss_kb(pid)?;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let per_task = 250;
    for chunk_start in (0..args.connections).step_by(per_task) {
        let addr = addr.clone();
        let chunk: Vec<Option<String>> = (chunk_start
            ..(chunk_start + per_task).min(args.connections))
            .map(|i| authenticated.then(|| tokens[i % tokens.len()].clone()))
            .collect();
        tasks.spawn(async move {
            let mut out = Vec::with_capacity(chunk.len());
            for token in chunk {
                out.push(open(&addr, token.as_deref()).await?);
            }
            anyhow::Ok(out)
        });
    }
    while let Some(done) = tasks.join_next().await {
        held.extend(done??);
    }
    let connect_secs = start.elapsed().as_secs_f64();
    tokio::time::sleep(SETTLE).await;
    let after_kb = rss_kb(pid)?;
    let kb_per_connection = (after_kb - before_kb) / args.connections as f64;
    drop(held);
    let _ = child.kill().await;
    Ok(Measurement {
        kb_per_connection,
        before_kb,
        after_kb,
        connect_secs,
    })
}

type ClientWs =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(addr: &str, token: Option<&str>) -> anyhow::Result<ClientWs> {
    // Small client buffers: 19,000 clients share this process with nothing to send.
    let config = WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(1024)
        .max_write_buffer_size(64 * 1024);
    let mut ws = testkit::ws::open(&format!("ws://{addr}/ws"), token, Some(config)).await?;
    if token.is_some() {
        testkit::ws::ready(&mut ws, Duration::from_secs(30))
            .await
            .map_err(anyhow::Error::msg)?;
    }
    Ok(ws)
}

pub(super) async fn listening_addr(child: &mut Child) -> anyhow::Result<String> {
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(rest) = line.strip_prefix("foldercast: serving on http://") {
                return Ok(rest.trim_end_matches('/').to_owned());
            }
        }
        bail!("the child exited before serving")
    })
    .await
    .context("the child did not start in time")??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(addr)
}

fn rss_kb(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .context("no VmRSS")
}

fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}
