//! `foldercast-bench`: measured figures, never asserted in tests.
//!
//! Outside the product binary (issue 10): the benchmarks run the real `foldercast` binary as a
//! child process where they measure it, and use the library directly where they measure a stage.
//!
//! `bench replay` runs the pipeline over a generated trace on one thread and reports events/s
//! and messages/s next to a baseline measured in the same run (only parsing each event's JSON).
//! `bench idle` starts a gateway as a child process, opens idle authenticated WebSocket
//! connections to it and reports the child's resident memory per connection.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::args::{BenchCommand, BenchIdleArgs, BenchReplayArgs};
use foldercast::consumer::route;
use foldercast::membership::{Directory, FixtureResolver, GrantEntry, SpaceEntry, UserEntry};
use foldercast::notify::Pipeline;
use foldercast::notify::dedup::Dedup;
use foldercast::telemetry::PipelineStats;

mod args;
mod bare;
mod consume;
mod fanout;
mod graph;
mod idle;
mod ingest;
mod membership;
mod metrics_cost;
mod proc;
mod publish;
mod storm;

/// mimalloc, as in the product: measured stages must allocate as they do there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // The bare loop runs in this binary: it keeps freed memory as the product does.
    foldercast::allocator::keep_freed_memory();
    use clap::Parser;
    let cli = args::Cli::parse();
    foldercast::telemetry::init_logging(&cli.log);
    let result = match cli.command {
        BenchCommand::Replay(args) => replay(args),
        BenchCommand::Idle(args) => idle(args),
        BenchCommand::Consume(args) => consume(args),
        BenchCommand::Fanout(args) => fanout(args),
        BenchCommand::Membership(args) => membership(args),
        BenchCommand::Metrics(args) => metrics_cost::run(args),
        BenchCommand::Ingest(args) => ingest::run(args),
        BenchCommand::Publish(args) => publish::run(args),
        BenchCommand::Storm(args) => storm(args),
        BenchCommand::BareGateway {
            listen,
            write_buffer,
        } => bare_gateway(listen, write_buffer),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("foldercast-bench: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The `foldercast` binary a benchmark runs: `given`, or the one cargo built next to this one.
pub fn product_binary(given: Option<&std::path::PathBuf>) -> anyhow::Result<std::path::PathBuf> {
    if let Some(given) = given {
        return Ok(given.clone());
    }
    let me = std::env::current_exe().context("cannot find this binary")?;
    let product = me.with_file_name("foldercast");
    anyhow::ensure!(
        product.exists(),
        "no foldercast binary next to {} (build it: cargo build --release)",
        me.display()
    );
    Ok(product)
}

pub fn replay(args: BenchReplayArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(replay_async(args))
}

/// A directory of `spaces` spaces with `members` distinct viewers each.
pub fn generated_directory(spaces: usize, members: usize) -> Directory {
    let mut dir = Directory {
        users: Vec::new(),
        groups: Vec::new(),
        spaces: Vec::new(),
    };
    for s in 0..spaces {
        let mut grants = Vec::new();
        for m in 0..members {
            let id = format!("user-{s}-{m}");
            dir.users.push(UserEntry {
                id: id.clone(),
                display_name: None,
            });
            grants.push(GrantEntry {
                user: Some(id),
                group: None,
                role: "viewer".into(),
            });
        }
        dir.spaces.push(SpaceEntry {
            id: format!("space-{s}"),
            name: None,
            members: grants,
        });
    }
    dir
}

/// One JSONL event of the generated trace: uploads mostly, with moves, trash and touches.
pub fn generated_event(n: u64, spaces: usize, depth: usize) -> String {
    let space = n as usize % spaces.max(1);
    let dirs: Vec<String> = (1..depth)
        .map(|d| format!("folder-{d}-{}", (n / 7 + d as u64) % 5))
        .collect();
    let path = format!("/{}/file-{n}.bin", dirs.join("/"));
    let time = "2026-11-22T10:00:00.123Z";
    match n % 10 {
        7 => format!(
            r#"{{"specversion":"1.0","id":"ev-{n}","source":"bench","type":"item-moved","time":"{time}","data":{{"space_id":"space-{space}","path":"{path}","old_path":"/inbox/file-{n}.bin","kind":"file","size":4096,"actor":"user-{space}-0","item_id":"item-{n}","etag":"\"{n}\""}}}}"#
        ),
        8 => format!(
            r#"{{"specversion":"1.0","id":"ev-{n}","source":"bench","type":"item-trashed","time":"{time}","data":{{"space_id":"space-{space}","path":"{path}","kind":"file","size":4096,"actor":"user-{space}-1","item_id":"item-{n}"}}}}"#
        ),
        _ => format!(
            r#"{{"specversion":"1.0","id":"ev-{n}","source":"bench","type":"file-uploaded","time":"{time}","data":{{"space_id":"space-{space}","path":"{path}","kind":"file","size":{},"actor":"user-{space}-2","item_id":"item-{n}","etag":"\"{n}\""}}}}"#,
            1000 + n % 9000
        ),
    }
}

async fn replay_async(args: BenchReplayArgs) -> anyhow::Result<ExitCode> {
    eprintln!(
        "generating {} events over {} spaces ({} members each, depth {})…",
        args.events, args.spaces, args.members, args.depth
    );
    let trace: Vec<Vec<u8>> = (0..args.events)
        .map(|n| generated_event(n, args.spaces, args.depth).into_bytes())
        .collect();
    let bytes: usize = trace.iter().map(|e| e.len()).sum();

    // Baseline: the least any consumer must do, parse every event's JSON.
    let start = Instant::now();
    let mut checksum = 0usize;
    for raw in &trace {
        let v: serde_json::Value =
            serde_json::from_slice(raw).context("generated event is not JSON")?;
        checksum += v.as_object().map(|o| o.len()).unwrap_or(0);
    }
    let baseline = start.elapsed();
    std::hint::black_box(checksum);

    let resolver = Arc::new(FixtureResolver::new(&generated_directory(
        args.spaces,
        args.members,
    )));
    let pipeline = Pipeline::new(
        Dedup::new(args.events.max(1), Duration::from_secs(3600)),
        resolver,
    );
    let stats = PipelineStats::default();
    let mut out = Vec::new();
    let mut sink = std::io::BufWriter::with_capacity(1 << 20, std::io::sink());
    let start = Instant::now();
    for raw in &trace {
        let outcome = pipeline
            .process(raw)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        route::<governor::clock::DefaultClock>(outcome, "bench", None, &stats, &mut out);
        for msg in out.drain(..) {
            foldercast::bus::write_line(&mut sink, &msg)?;
            stats
                .messages
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    sink.flush()?;
    let elapsed = start.elapsed();
    let events = stats
        .delivered_events
        .load(std::sync::atomic::Ordering::Relaxed);
    let messages = stats.messages.load(std::sync::atomic::Ordering::Relaxed);
    anyhow::ensure!(
        events == args.events,
        "only {events} of {} events were delivered",
        args.events
    );

    let secs = elapsed.as_secs_f64();
    println!(
        "bench replay: {} events ({:.1} MB), {} members/space, depth {}",
        args.events,
        bytes as f64 / 1e6,
        args.members,
        args.depth
    );
    println!(
        "  pipeline (decode, dedup, resolve, ancestors, encode, fan-out, print to sink): {:.2} s",
        secs
    );
    println!("  events/s:   {:>12.0}", events as f64 / secs);
    println!("  messages/s: {:>12.0}", messages as f64 / secs);
    println!(
        "  baseline (serde_json::Value parse only): {:.0} events/s; pipeline costs {:.2}x the baseline per event",
        args.events as f64 / baseline.as_secs_f64(),
        secs / baseline.as_secs_f64()
    );
    println!(
        "  reproduce: foldercast-bench replay --events {} --members {} --depth {} --spaces {}",
        args.events, args.members, args.depth, args.spaces
    );
    Ok(ExitCode::SUCCESS)
}

pub fn idle(args: BenchIdleArgs) -> anyhow::Result<ExitCode> {
    idle::run(args)
}

pub fn consume(args: crate::args::BenchConsumeArgs) -> anyhow::Result<ExitCode> {
    consume::run(args)
}

pub fn fanout(args: crate::args::BenchFanoutArgs) -> anyhow::Result<ExitCode> {
    fanout::run(args)
}

pub fn storm(args: crate::args::BenchStormArgs) -> anyhow::Result<ExitCode> {
    storm::run(args)
}

pub fn membership(args: crate::args::BenchMembershipArgs) -> anyhow::Result<ExitCode> {
    membership::run(args)
}

pub fn bare_gateway(listen: std::net::SocketAddr, write_buffer: usize) -> anyhow::Result<ExitCode> {
    bare::serve(listen, write_buffer)
}
