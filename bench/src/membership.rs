//! `foldercast-bench membership`: the oCIS resolver under load.
//!
//! A LibreGraph-shaped server runs in this process on its own thread (1 000 project spaces with
//! 20 viewers each, unified role ids, one request counter). Two figures:
//!
//! 1. Warm-cache throughput: the same trace through the pipeline with the fixture resolver and
//!    with the oCIS resolver (cache warmed first), alternated and best-of-two, plus the bare
//!    `listers()` lookup rate of each.
//! 2. Requests to oCIS while 100 000 events over 1 000 spaces are paced across 10 s, once with
//!    the TTL longer than the run and once with a short TTL, against the "one per space per TTL"
//!    expectation.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use crate::args::BenchMembershipArgs;
use foldercast::consumer::route;
use foldercast::membership::ocis::{
    CacheSettings, CredentialsConfig, OcisResolver, OcisSettings, RetryPolicy, Secret, SecretSource,
};
use foldercast::membership::{FixtureResolver, MembershipResolver};
use foldercast::notify::Pipeline;
use foldercast::notify::dedup::Dedup;
use foldercast::telemetry::PipelineStats;

pub fn run(args: BenchMembershipArgs) -> anyhow::Result<ExitCode> {
    let graph_calls = Arc::new(crate::graph::Calls::default());
    let url = crate::graph::start(args.members, graph_calls.clone())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(measure(args, url, graph_calls))
}

fn ocis(url: &str, ttl: Duration) -> anyhow::Result<Arc<OcisResolver>> {
    Ok(Arc::new(OcisResolver::from_settings(OcisSettings {
        url: url.to_owned(),
        credentials: CredentialsConfig::Bearer(SecretSource::Value(Secret::new("bench"))),
        retry: RetryPolicy::default(),
        cache: CacheSettings {
            ttl,
            ..CacheSettings::default()
        },
    })?))
}

/// Events/s of the pipeline over `trace` with `resolver`.
async fn pipeline_rate(
    trace: &[Vec<u8>],
    resolver: Arc<dyn MembershipResolver>,
) -> anyhow::Result<f64> {
    let pipeline = Pipeline::new(
        Dedup::new(trace.len() as u64 + 1, Duration::from_secs(3600)),
        resolver,
    );
    let stats = PipelineStats::default();
    let mut out = Vec::new();
    let start = Instant::now();
    for raw in trace {
        let outcome = pipeline
            .process(raw)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        route::<governor::clock::DefaultClock>(outcome, "bench", None, &stats, &mut out);
        out.clear();
    }
    let delivered = stats.delivered_events.load(Relaxed);
    anyhow::ensure!(
        delivered == trace.len() as u64,
        "only {delivered} of {} events delivered",
        trace.len()
    );
    Ok(trace.len() as f64 / start.elapsed().as_secs_f64())
}

/// `listers()` lookups per second over `spaces`.
async fn lookup_rate(
    resolver: &dyn MembershipResolver,
    spaces: &[String],
    n: usize,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut total = 0usize;
    for i in 0..n {
        total += resolver.listers(&spaces[i % spaces.len()]).await?.len();
    }
    std::hint::black_box(total);
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Requests made while `events` events over `spaces` spaces are paced across `duration`.
async fn paced_calls(
    url: &str,
    calls: &AtomicU64,
    ttl: Duration,
    args: &BenchMembershipArgs,
) -> anyhow::Result<u64> {
    let resolver = ocis(url, ttl)?;
    let pipeline = Pipeline::new(
        Dedup::new(args.paced_events + 1, Duration::from_secs(3600)),
        resolver,
    );
    let before = calls.load(Relaxed);
    let ticks = (args.paced_seconds * 100).max(1);
    let per_tick = args.paced_events / ticks;
    let mut interval = tokio::time::interval(Duration::from_millis(10));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut n = 0u64;
    for _ in 0..ticks {
        interval.tick().await;
        for _ in 0..per_tick {
            let raw = super::generated_event(n, args.spaces, 4);
            n += 1;
            // A membership answer that is briefly unavailable would be retried; here it must not be.
            pipeline
                .process(raw.as_bytes())
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    // Background refreshes started by the last events land now.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(calls.load(Relaxed) - before)
}

async fn measure(
    args: BenchMembershipArgs,
    url: String,
    graph_calls: Arc<crate::graph::Calls>,
) -> anyhow::Result<ExitCode> {
    let calls = &graph_calls.permissions;
    eprintln!(
        "generating {} events over {} spaces ({} members each)…",
        args.events, args.spaces, args.members
    );
    let trace: Vec<Vec<u8>> = (0..args.events)
        .map(|n| super::generated_event(n, args.spaces, 4).into_bytes())
        .collect();
    let spaces: Vec<String> = (0..args.spaces).map(|s| format!("space-{s}")).collect();
    let fixture: Arc<dyn MembershipResolver> = Arc::new(FixtureResolver::new(
        &super::generated_directory(args.spaces, args.members),
    ));
    let cached = ocis(&url, Duration::from_secs(3600))?;
    for s in &spaces {
        let (a, b) = (fixture.listers(s).await?, cached.listers(s).await?);
        anyhow::ensure!(a == b, "resolvers disagree on {s}");
    }
    let warm_calls = calls.load(Relaxed);
    let cached_dyn: Arc<dyn MembershipResolver> = cached.clone();

    let mut best = [0f64; 4];
    for _ in 0..2 {
        best[0] = best[0].max(pipeline_rate(&trace, fixture.clone()).await?);
        best[1] = best[1].max(pipeline_rate(&trace, cached_dyn.clone()).await?);
        best[2] = best[2].max(lookup_rate(&*fixture, &spaces, args.events as usize).await?);
        best[3] = best[3].max(lookup_rate(&*cached_dyn, &spaces, args.events as usize).await?);
    }
    let extra_calls = calls.load(Relaxed) - warm_calls;

    println!(
        "bench membership: {} spaces × {} members, {} events, warm cache",
        args.spaces, args.members, args.events
    );
    println!(
        "  pipeline events/s   fixture {:>10.0}   oCIS cache {:>10.0}   ratio {:.3}",
        best[0],
        best[1],
        best[1] / best[0]
    );
    println!(
        "  listers() lookups/s fixture {:>10.0}   oCIS cache {:>10.0}   ratio {:.3}",
        best[2],
        best[3],
        best[3] / best[2]
    );
    println!("  oCIS requests during the warm runs: {extra_calls}");

    for ttl in [Duration::from_secs(60), args.short_ttl] {
        let made = paced_calls(&url, calls, ttl, &args).await?;
        let per_space = (args.paced_seconds as f64 / ttl.as_secs_f64())
            .ceil()
            .max(1.0);
        let expected = args.spaces as f64 * per_space;
        println!(
            "  {} events over {} spaces in {} s, TTL {:?}: {} oCIS requests (one per space per TTL = {:.0}; ratio {:.3})",
            args.paced_events,
            args.spaces,
            args.paced_seconds,
            ttl,
            made,
            expected,
            made as f64 / expected
        );
    }
    println!(
        "  reproduce: foldercast-bench membership --events {} --spaces {} --members {} --paced-events {} --paced-seconds {} --short-ttl {}s",
        args.events,
        args.spaces,
        args.members,
        args.paced_events,
        args.paced_seconds,
        args.short_ttl.as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
