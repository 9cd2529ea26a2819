//! `foldercast gateway`: serves WebSocket and SSE clients from Redis.
//!
//! Stateless but for its live sockets: run several behind a load balancer. `/readyz` is ready only
//! while Redis is reachable; clients stay connected through a Redis restart while the bus
//! reconnects and resubscribes. On SIGTERM it drains: every client is told to reconnect (with
//! its position, after a spread-out delay) and the process exits within `--drain-grace`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, LateSink, RedisBus};
use crate::config::GatewayCommandArgs;
use crate::gateway;

pub fn gateway(args: GatewayCommandArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let auth = super::setup::authenticator(&args.gateway, &args.oidc).await?;
        let target = super::redis_target(&args.redis);
        let sink = Arc::new(LateSink::default());
        let sink_dyn: Arc<dyn crate::bus::DeliverySink> = sink.clone();
        let bus =
            RedisBus::connect_with_sink(&target, super::redis_options(&args.redis), Some(sink_dyn))
                .await?;
        bus.spawn_health_check(Duration::from_secs(1));
        let has_directory =
            args.membership.membership.is_some() || args.membership.ocis_url.is_some();
        let resolver = if has_directory {
            Some(super::setup::resolver(&args.membership, None)?)
        } else {
            None
        };
        let (app, state) = super::gateway_app(
            bus.clone() as Arc<dyn Bus>,
            &sink,
            auth,
            &args.gateway,
            resolver,
        )?;
        if let Some(addr) = args.gateway.metrics_listen.filter(|_| args.gateway.metrics) {
            let state = state.clone();
            super::serve_metrics(addr, move || gateway::metrics_text(&state)).await?;
        }
        let listener = super::bind_and_announce(&args.gateway).await?;
        let shutdown = CancellationToken::new();
        super::cancel_on_signal(shutdown.clone());
        let server = tokio::spawn(gateway::serve(
            listener,
            app,
            state.clone(),
            shutdown.clone(),
        ));
        shutdown.cancelled().await;
        // New connections are refused now; open ones are told to reconnect and resume.
        state.drain().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
        anyhow::Ok(())
    })?;
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(ExitCode::SUCCESS)
}
