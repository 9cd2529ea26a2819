//! `foldercast run`: the embedded default, everything in one process.
//!
//! Fixture events (looped, paced) → pipeline → in-process bus → gateway, plus the demo page.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::DefaultClock;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, LateSink, MemoryBus, MemoryRetention};
use crate::config::RunArgs;
use crate::consumer::{run_live, spawn_reader};
use crate::demo::DemoState;
use crate::gateway;
use crate::membership::Directory;
use crate::notify::Pipeline;
use crate::notify::throttle::Throttle;
use crate::source::{FixtureSource, Passes};
use crate::telemetry::PipelineStats;

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_async(args))?;
    // Upgraded sockets are not awaited by axum's graceful shutdown; dropping the runtime ends them.
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(ExitCode::SUCCESS)
}

/// The embedded default's membership when neither --membership nor --ocis-url is given.
const DEMO_MEMBERSHIP: &str = "fixtures/demo/membership.json";

async fn run_async(args: RunArgs) -> anyhow::Result<()> {
    let resolver = super::setup::resolver(&args.membership, Some(Path::new(DEMO_MEMBERSHIP)))?;
    let auth = super::setup::authenticator(&args.gateway, &args.oidc).await?;
    // The demo page lists the fixture's users and mints their tokens: it needs both.
    let demo_directory = match (&args.membership.ocis_url, auth.can_mint(), args.no_demo) {
        (None, true, false) => Some(Directory::load(
            args.membership
                .membership
                .as_deref()
                .unwrap_or(Path::new(DEMO_MEMBERSHIP)),
        )?),
        (_, _, true) => None,
        _ => {
            tracing::info!("demo page off: it needs fixture membership and --jwt-secret tokens");
            None
        }
    };

    let sink = Arc::new(LateSink::default());
    let retention = MemoryRetention {
        max_len: usize::try_from(args.history.stream_max_len).unwrap_or(usize::MAX),
        max_age: args.history.stream_max_age,
    };
    let bus = Arc::new(MemoryBus::with_retention(sink.clone(), retention));
    let (mut app, gateway_state) = super::gateway_app(
        bus.clone() as Arc<dyn Bus>,
        &sink,
        auth.clone(),
        &args.gateway,
    );
    let demo = demo_directory.map(|d| DemoState::new(d, resolver.clone(), auth.clone()));
    if let Some(demo) = &demo {
        app = app.merge(crate::demo::router(demo.clone()));
    }
    let listener = super::bind_and_announce(&args.gateway).await?;

    let shutdown = CancellationToken::new();
    tokio::spawn(super::cancel_on_signal(shutdown.clone()));
    let server = tokio::spawn(gateway::serve(listener, app, shutdown.clone()));

    let passes = if args.events.as_os_str() == "-" {
        Passes::Once
    } else {
        Passes::Loop(args.passes)
    };
    let source = FixtureSource::open(&args.events, passes).await?;
    let (events, reader) = spawn_reader(Box::new(source), args.rate, shutdown.clone());
    let pipeline = Pipeline::new(super::dedup(&args.shaping), resolver);
    let throttle = Throttle::new(
        super::throttle_config(&args.shaping),
        DefaultClock::default(),
    );
    let stats = PipelineStats::default();
    run_live(
        events,
        &pipeline,
        throttle,
        &*bus,
        &stats,
        &shutdown,
        |fanout| {
            if let Some(demo) = &demo {
                demo.observe(&fanout.event);
            }
        },
    )
    .await?;
    match reader.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "event source failed"),
        Err(e) => tracing::error!(error = %e, "event reader stopped"),
    }
    if !shutdown.is_cancelled() {
        tracing::info!(
            events = stats.events.load(std::sync::atomic::Ordering::Relaxed),
            "event input ended; still serving until interrupted"
        );
    }
    shutdown.cancelled().await;
    // Open connections are told to reconnect and resume, then closed.
    gateway_state.drain().await;
    // SSE responses can hold axum's graceful shutdown open: give it a moment, then leave.
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    Ok(())
}
