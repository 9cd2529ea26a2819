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
use crate::consumer::{Driver, Observer, Settings};
use crate::demo::DemoState;
use crate::gateway;
use crate::membership::Directory;
use crate::notify::throttle::Buckets;
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
    // The demo page lists the fixture's users and mints their tokens: it needs both. With a
    // secret the operator configured, minting would hand out real tokens: only on request.
    let configured_secret =
        args.gateway.secret.is_configured() || std::env::var_os("FOLDERCAST_JWT_SECRET").is_some();
    if configured_secret && !args.demo && !args.no_demo && auth.can_mint() {
        tracing::warn!(
            "demo page off: it would mint tokens for every fixture user with the configured --jwt-secret; add --demo to serve it anyway"
        );
    }
    let demo_wanted = !args.no_demo && (args.demo || !configured_secret);
    let demo_directory = match (&args.membership.ocis_url, auth.can_mint(), !demo_wanted) {
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
    // The fixture's preferences; the default file may be absent (run from elsewhere).
    let default_fixture = args.preferences.as_os_str() == "fixtures/demo/preferences.json";
    if !default_fixture || args.preferences.exists() {
        for (user, prefs) in
            crate::preferences::load_fixture(&args.preferences).map_err(anyhow::Error::msg)?
        {
            let json = serde_json::to_string(&prefs)?;
            bus.set_preferences(&user, Some(&json)).await?;
        }
    }
    let preferences = Arc::new(crate::preferences::PreferenceFilter::new(
        bus.clone() as Arc<dyn Bus>,
        args.shaping.preferences_ttl,
    ));
    let (mut app, gateway_state) = super::gateway_app(
        bus.clone() as Arc<dyn Bus>,
        &sink,
        auth.clone(),
        &args.gateway,
        Some(resolver.clone()),
    )?;
    let demo = demo_directory.map(|d| DemoState::new(d, resolver.clone(), auth.clone()));
    if let (Some(demo), Some(scheduler)) = (&demo, gateway_state.downtimes.get()) {
        demo.with_scheduler(scheduler.clone());
    }
    if let Some(demo) = &demo {
        app = app.merge(crate::demo::router(demo.clone()));
    }
    if let Some(addr) = args.gateway.metrics_listen.filter(|_| args.gateway.metrics) {
        let state = gateway_state.clone();
        super::serve_metrics(addr, move || gateway::metrics_text(&state)).await?;
    }
    let listener = super::bind_and_announce(&args.gateway).await?;

    let shutdown = CancellationToken::new();
    super::cancel_on_signal(shutdown.clone());
    let server = tokio::spawn(gateway::serve(
        listener,
        app,
        gateway_state.clone(),
        shutdown.clone(),
    ));

    let passes = if args.events.as_os_str() == "-" {
        Passes::Once
    } else {
        Passes::Loop(args.passes)
    };
    let source = FixtureSource::open(&args.events, passes)
        .await?
        .with_max_line(args.shaping.max_event_bytes);
    let stats = Arc::new(PipelineStats::default());
    let _ = gateway_state.pipeline_stats.set(stats.clone());
    let _ = gateway_state.preferences.set(preferences.clone());
    let clock = DefaultClock::default();
    // The dashboard's view of the in-process consumer, and the demo's folder tree.
    let reporter = crate::dashboard::consumer::ConsumerReporter::spawn(
        bus.clone() as Arc<dyn Bus>,
        "run".to_owned(),
        stats.clone(),
        None,
        shutdown.clone(),
    );
    let demo_observer = demo.clone();
    let observer: Option<Observer> = Some(Arc::new(move |fanout: &crate::notify::Fanout| {
        reporter.observe(fanout);
        if let Some(demo) = &demo_observer {
            demo.observe(&fanout.event);
        }
    }) as Observer);
    let driver = Driver {
        source: Arc::new(source),
        pipeline: Arc::new(
            super::pipeline(&args.shaping, resolver).with_preferences(preferences.clone()),
        ),
        buckets: Buckets::new(super::throttle_config(&args.shaping), clock.clone()),
        clock,
        bus: bus.clone() as Arc<dyn Bus>,
        stats: stats.clone(),
        observer,
        settings: Settings {
            pace: args.rate,
            ..Settings::default()
        },
    };
    // The in-process bus cannot refuse: a driver error is the source's (an unreadable file).
    if let Err(e) = driver.run(shutdown.clone()).await {
        tracing::error!(error = %e, "event input stopped");
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
