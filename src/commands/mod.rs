//! One file per subcommand; each builds its runtime and wires the stages together.

mod consume;
mod gateway;
mod publish;
mod replay;
mod run;
mod self_test;
mod setup;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, DeliverySink, LateSink, RedisOptions, RedisTarget};
use crate::config::{Cli, Command, GatewayArgs, JwtSecretArgs, RedisArgs, ShapingArgs};
use crate::gateway::auth::Authenticator;
use crate::gateway::hub::Hub;
use crate::gateway::{self as gw, AppState, GatewayConfig};
use crate::notify::dedup::Dedup;
use crate::notify::throttle::ThrottleConfig;

pub fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Replay(args) => replay::replay(args),
        Command::Consume(args) => consume::consume(args),
        Command::Gateway(args) => gateway::gateway(args),
        Command::Publish(args) => publish::publish(args),
        Command::AnnounceDowntime(args) => publish::announce_downtime(args),
        Command::SelfTest(args) => self_test::self_test(args),
    }
}

fn throttle_config(s: &ShapingArgs) -> ThrottleConfig {
    ThrottleConfig {
        rate: s.user_rate,
        burst: s.user_burst,
        max_backlog: s.max_backlog,
    }
}

fn dedup(s: &ShapingArgs) -> Dedup {
    Dedup::new(s.dedup_capacity, s.dedup_ttl)
}

/// The pipeline of `consume`, `run` and `replay`: de-duplication, size cap, `resolver`.
fn pipeline(
    s: &ShapingArgs,
    resolver: Arc<dyn crate::membership::MembershipResolver>,
) -> crate::notify::Pipeline {
    crate::notify::Pipeline::new(dedup(s), resolver).with_max_event_bytes(s.max_event_bytes)
}

fn redis_target(r: &RedisArgs) -> RedisTarget {
    match (&r.redis, &r.redis_cluster) {
        (_, Some(nodes)) => RedisTarget::Cluster(nodes.clone()),
        (Some(url), None) => RedisTarget::Standalone(url.clone()),
        // clap requires one of the two.
        (None, None) => RedisTarget::Standalone("redis://127.0.0.1:6379".into()),
    }
}

fn redis_options(r: &RedisArgs) -> RedisOptions {
    RedisOptions {
        stream_max_len: r.history.stream_max_len,
        stream_max_age: r.history.stream_max_age,
        dedup_window: r.delivery_dedup_window,
    }
}

fn gateway_config(g: &GatewayArgs) -> GatewayConfig {
    GatewayConfig {
        send_queue: g.send_queue,
        auth_timeout: g.auth_timeout,
        sse_keepalive: g.sse_keepalive,
        write_timeout: g.write_timeout,
        ws_read_buffer: g.ws_read_buffer,
        ws_write_buffer: g.ws_write_buffer,
        ws_max_write_buffer: g.ws_max_write_buffer,
        max_client_frame: g.max_frame_bytes as usize,
        max_frames_per_sec: g.max_frames_per_sec,
        admin_users: g
            .admin_users
            .iter()
            .map(|u| Arc::from(u.as_str()))
            .collect(),
        tickets_per_sec: g.tickets_per_sec,
        header_timeout: g.header_timeout,
        max_connections: g
            .max_connections
            .unwrap_or_else(crate::gateway::server::ServerLimits::default_max_connections),
        ticket_ttl: g.ticket_ttl,
        token_grace: g.token_grace,
        ping_interval: g.ws_ping_interval,
        resume_max: g.resume_max,
        drain_spread: g.drain_spread,
        max_digest: g.max_digest,
        drain_grace: g.drain_grace,
        public_url: g.public_url.clone(),
        heartbeat_every: g.heartbeat_every,
        device_ttl: g.device_ttl,
        metrics_elsewhere: g.metrics_listen.is_some(),
        metrics_off: !g.metrics,
    }
}

/// The gateway's router over `bus`, whose deliveries go to `sink` (bound here to the hub), and
/// its state (to drain it on shutdown).
fn gateway_app(
    bus: Arc<dyn Bus>,
    sink: &LateSink,
    auth: Arc<Authenticator>,
    g: &GatewayArgs,
    resolver: Option<Arc<dyn crate::membership::MembershipResolver>>,
) -> anyhow::Result<(Router, Arc<AppState>)> {
    let publisher = Arc::new(crate::notice::publish::Publisher {
        resolver,
        bus: bus.clone(),
        retention: g.critical_retention,
    });
    let hub = Hub::new(
        bus,
        g.send_queue,
        g.send_queue_bytes,
        g.max_connections_per_user,
    );
    sink.bind(&(hub.clone() as Arc<dyn DeliverySink>));
    let state = AppState::new(auth, hub, gateway_config(g));
    // Every gateway sends the planned-downtime announcements that fall due (each goes out
    // from one of them only), and tells clients that connect during one.
    let scheduler = Arc::new(crate::notice::downtime::Scheduler::new(publisher.clone()));
    tokio::spawn(scheduler.clone().run());
    let _ = state.downtimes.set(scheduler);
    if let Some(path) = &g.admin_token_file {
        let admins = gw::notices::AdminTokens::load(path).map_err(anyhow::Error::msg)?;
        let _ = state
            .notices
            .set(gw::notices::Notices::new(publisher, admins));
        tracing::info!("POST /api/notifications on: admins of --admin-token-file may publish");
    }
    gw::discovery::start(&state).map_err(anyhow::Error::msg)?;
    let _ = state
        .dashboard
        .set(gw::dashboard::GatewayDashboard::start(&state));
    gw::notices::watch_pending(&state);
    Ok((gw::router(state.clone()), state))
}

/// Serves `/metrics` on `addr` (its own listener, off the public address), rendered by
/// `render` at each scrape.
async fn serve_metrics(
    addr: std::net::SocketAddr,
    render: impl Fn() -> axum::response::Response + Clone + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on --metrics-listen {addr}"))?;
    tracing::info!(%addr, "serving /metrics");
    let app = Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move { render() }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "the metrics listener stopped");
        }
    });
    Ok(())
}

/// Binds `--listen` and announces the address on stdout (tests and scripts read it when the
/// port is 0).
async fn bind_and_announce(g: &GatewayArgs) -> anyhow::Result<TcpListener> {
    let listener = crate::gateway::server::bind(g.listen, g.listen_backlog)
        .with_context(|| format!("cannot listen on {}", g.listen))?;
    println!("foldercast: serving on http://{}/", listener.local_addr()?);
    Ok(listener)
}

/// The HS256 secret from the flag, the file, or (announced on stdout) a random one. Its length
/// is checked by [`Authenticator::hs256`](crate::gateway::auth::Authenticator::hs256).
fn jwt_secret(g: &GatewayArgs) -> anyhow::Result<Arc<[u8]>> {
    if let Some(secret) = configured_secret(&g.secret)? {
        return Ok(Arc::from(secret.into_bytes()));
    }
    let mut bytes = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    println!("foldercast: no --jwt-secret given; generated one for this run: {secret}");
    Ok(Arc::from(secret.into_bytes()))
}

/// The HS256 secret the flags give (the file's trimmed), if any.
fn configured_secret(s: &JwtSecretArgs) -> anyhow::Result<Option<String>> {
    if let Some(secret) = &s.jwt_secret {
        return Ok(Some(secret.clone()));
    }
    // Set but empty is a mistake (a template that was not filled in), not a request for a
    // random secret: refuse it like any other short secret.
    if s.jwt_secret_file.is_none() && std::env::var_os("FOLDERCAST_JWT_SECRET").is_some() {
        anyhow::bail!(
            "FOLDERCAST_JWT_SECRET is set but empty; give a secret of at least {} bytes or unset it",
            crate::gateway::auth::MIN_SECRET_BYTES
        );
    }
    let Some(path) = &s.jwt_secret_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --jwt-secret-file {}", path.display()))?;
    let secret = text.trim();
    anyhow::ensure!(
        !secret.is_empty(),
        "--jwt-secret-file {} is empty",
        path.display()
    );
    Ok(Some(secret.to_owned()))
}

/// Cancels `shutdown` on SIGINT or SIGTERM. The handlers are installed before this returns, so
/// a signal that comes while the command is still connecting stops it cleanly instead of
/// killing it (the default action).
fn cancel_on_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    let handlers = {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::interrupt()).ok(),
            signal(SignalKind::terminate()).ok(),
        )
    };
    tokio::spawn(async move {
        #[cfg(unix)]
        match handlers {
            (Some(mut int), Some(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
        shutdown.cancel();
    });
}
