//! The gateway: authenticated WebSocket and SSE delivery of each user's own messages.
//!
//! It knows the bus and the protocol, nothing of how messages were made: it can run in the same
//! process as the pipeline (`foldercast run`) or alone behind a load balancer.
//! State lives in one [`AppState`]; handlers stay thin.

pub mod auth;
pub mod dashboard;
pub mod digest;
pub mod discovery;
pub mod hub;
pub mod notices;
mod ocis_sse;
mod preferences;
pub mod protocol;
pub mod resume;
pub mod server;
pub mod session;
mod sse;
pub mod wakeups;
mod ws;

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use auth::{AuthError, Authenticator, Identity, TicketStore};
use hub::Hub;
use server::{ServerLimits, ServerStats};

/// Gateway tuning; defaults suit many mostly idle connections.
/// A connection's WebSocket read buffer, bytes: room for the frames clients send (watch,
/// ack, ping) in one read, and small, since every idle connection holds it whole.
pub const DEFAULT_WS_READ_BUFFER: usize = 256;

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Frames queued per connection before a non-reading client is evicted.
    pub send_queue: usize,
    pub auth_timeout: Duration,
    pub sse_keepalive: Duration,
    pub write_timeout: Duration,
    pub ws_read_buffer: usize,
    pub ws_write_buffer: usize,
    pub ws_max_write_buffer: usize,
    /// A request head, and an idle keep-alive connection's next one, must arrive within this.
    pub header_timeout: Duration,
    /// Open connections at most (below the descriptor limit); more are closed on arrival.
    pub max_connections: usize,
    /// Users allowed the operator's routes (`/api/stats`).
    pub admin_users: Vec<Arc<str>>,
    /// Tickets per second one user may obtain (bursts of twice that).
    pub tickets_per_sec: u32,
    /// Frames per second a WebSocket client may send (bursts of twice that); 0 = no limit.
    pub max_frames_per_sec: u32,
    /// The largest frame a client may send (`--max-frame-bytes`).
    pub max_client_frame: usize,
    pub ticket_ttl: Duration,
    /// After a WebSocket's token expires, how long it may send a fresh `auth` frame before it is
    /// closed (deliveries pause meanwhile).
    pub token_grace: Duration,
    /// How often WebSocket clients are pinged; one that answers nothing (no pong, no frame) for
    /// two intervals is closed. Zero turns pings off.
    pub ping_interval: Duration,
    /// The most messages a resume replays; a client further behind is told `over-limit`.
    pub resume_max: usize,
    /// On shutdown, clients are told to reconnect after a random delay up to this, so that a
    /// deploy does not become a reconnect storm.
    pub drain_spread: Duration,
    /// The longest digest window a client may ask for (`digest.rs`).
    pub max_digest: Duration,
    /// On shutdown, how long open connections are given to be told and closed.
    pub drain_grace: Duration,
    /// Where clients reach this gateway directly (`--public-url`): advertised for discovery.
    pub public_url: Option<String>,
    /// How often the advertisement is renewed.
    pub heartbeat_every: Duration,
    /// A device unseen this long is forgotten (its acknowledged position).
    pub device_ttl: Duration,
    /// `/metrics` is served on its own address (`--metrics-listen`), not on the public one.
    pub metrics_elsewhere: bool,
    /// `/metrics` is not served at all (`--metrics off`).
    pub metrics_off: bool,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            send_queue: 256,
            auth_timeout: Duration::from_secs(10),
            sse_keepalive: Duration::from_secs(15),
            write_timeout: Duration::from_secs(10),
            ws_read_buffer: DEFAULT_WS_READ_BUFFER,
            ws_write_buffer: 8192,
            ws_max_write_buffer: 16 << 20,
            max_client_frame: 64 * 1024,
            max_frames_per_sec: 50,
            admin_users: Vec::new(),
            tickets_per_sec: 5,
            header_timeout: Duration::from_secs(10),
            max_connections: ServerLimits::default_max_connections(),
            ticket_ttl: Duration::from_secs(30),
            token_grace: Duration::from_secs(2),
            ping_interval: Duration::from_secs(30),
            resume_max: 1000,
            drain_spread: Duration::from_secs(10),
            max_digest: digest::DEFAULT_MAX_DIGEST,
            drain_grace: Duration::from_secs(5),
            public_url: None,
            heartbeat_every: Duration::from_secs(5),
            device_ttl: Duration::from_secs(30 * 24 * 3600),
            metrics_elsewhere: false,
            metrics_off: false,
        }
    }
}

pub struct AppState {
    pub auth: Arc<Authenticator>,
    pub tickets: TicketStore,
    /// Tickets issued per user and second (one token obtained 150,000 in 2.7 s before).
    ticket_rate: Option<governor::DefaultKeyedRateLimiter<Arc<str>>>,
    pub hub: Arc<Hub>,
    pub config: GatewayConfig,
    /// What the HTTP server refused or cut (connection cap, stalled writes, accept errors).
    pub server: Arc<ServerStats>,
    /// Publishing notifications (`--admin-token-file`), set once at start.
    pub notices: std::sync::OnceLock<notices::Notices>,
    /// Planned downtimes: announcements this process sends when due, and the current ones for
    /// clients that connect.
    pub downtimes: std::sync::OnceLock<Arc<crate::notice::downtime::Scheduler>>,
    /// The pipeline's counters, when this process runs one too (`run`): in `/metrics`.
    pub pipeline_stats: std::sync::OnceLock<Arc<crate::telemetry::PipelineStats>>,
    /// The consumer's preference cache when it shares this process (the embedded default): a
    /// change made here is forgotten there at once.
    pub preferences: std::sync::OnceLock<Arc<crate::preferences::PreferenceFilter>>,
    /// This gateway's id in the bus's advertisements (`--public-url`), once it advertises.
    pub advertised_as: std::sync::OnceLock<String>,
    /// The operator's live view (`dashboard.rs`), once started.
    pub dashboard: std::sync::OnceLock<Arc<dashboard::GatewayDashboard>>,
}

impl AppState {
    pub fn new(auth: Arc<Authenticator>, hub: Arc<Hub>, config: GatewayConfig) -> Arc<Self> {
        let ticket_rate = std::num::NonZeroU32::new(config.tickets_per_sec).map(|rate| {
            let burst = rate.saturating_mul(std::num::NonZeroU32::MIN.saturating_add(1));
            governor::RateLimiter::keyed(governor::Quota::per_second(rate).allow_burst(burst))
        });
        Arc::new(AppState {
            auth,
            tickets: TicketStore::new(config.ticket_ttl, 100_000),
            ticket_rate,
            hub,
            config,
            server: Arc::default(),
            notices: std::sync::OnceLock::new(),
            downtimes: std::sync::OnceLock::new(),
            pipeline_stats: std::sync::OnceLock::new(),
            preferences: std::sync::OnceLock::new(),
            advertised_as: std::sync::OnceLock::new(),
            dashboard: std::sync::OnceLock::new(),
        })
    }

    /// Tells every open connection to reconnect (with its position, after a spread-out delay)
    /// and waits, up to the drain grace, for them to close.
    pub async fn drain(&self) {
        self.hub.drain_all();
        // No client is sent here any more (the heartbeat stops once the hub drains).
        discovery::withdraw(self).await;
        let deadline = tokio::time::Instant::now() + self.config.drain_grace;
        while self.hub.stats.connections.load(Relaxed) > 0 && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.hub.stats.connections.load(Relaxed);
        if left > 0 {
            tracing::warn!(connections = left, grace = ?self.config.drain_grace, "drain grace over; cutting the rest");
        } else {
            tracing::info!("every connection drained");
        }
    }
}

/// The gateway's routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/ws", get(ws::handler))
        .route("/sse", get(sse::handler))
        .route(
            "/ocs/v2.php/apps/notifications/api/v1/notifications/sse",
            get(sse::ocis_handler),
        )
        .route("/api/tickets", post(issue_ticket))
        .route("/api/endpoint", get(discovery::endpoint))
        .route("/api/stats", get(stats))
        .route("/dashboard", get(dashboard::page))
        .route("/api/dashboard/stream", get(dashboard::stream))
        .route("/metrics", get(metrics))
        .route(
            "/api/notifications",
            post(notices::publish).layer(axum::extract::DefaultBodyLimit::max(notices::MAX_BODY)),
        )
        .route("/api/notifications/{id}/ack", post(notices::acknowledge))
        .route("/api/devices", get(notices::devices))
        .route(
            "/api/preferences",
            get(preferences::get).put(preferences::put).layer(
                axum::extract::DefaultBodyLimit::max(crate::preferences::MAX_BYTES),
            ),
        )
        .route(
            "/api/downtimes",
            post(notices::announce_downtime).get(notices::list_downtimes),
        )
        .route(
            "/api/downtimes/{id}",
            axum::routing::delete(notices::cancel_downtime),
        )
        .route(
            "/api/devices/{device}",
            axum::routing::delete(notices::forget_device),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Serves `app` on `listener` until `shutdown` fires, within the limits of `server` (header
/// and write timeouts, a connection cap); upgraded sockets are drained by [`AppState::drain`].
pub async fn serve(
    listener: TcpListener,
    app: Router,
    state: Arc<AppState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let limits = ServerLimits {
        header_timeout: state.config.header_timeout,
        write_timeout: state.config.write_timeout,
        max_connections: state.config.max_connections,
    };
    server::serve(listener, app, limits, state.server.clone(), shutdown).await
}

/// Credentials of a request: the bearer header wins over a ticket; `None` if neither is given.
async fn credentials(
    state: &AppState,
    headers: &HeaderMap,
    ticket: Option<&str>,
) -> Option<Result<Identity, AuthError>> {
    if let Some(token) = ws::header_token(headers) {
        return Some(state.auth.verify(token).await);
    }
    ticket.map(|t| state.tickets.redeem(t))
}

async fn issue_ticket(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let verified = match ws::header_token(&headers) {
        Some(token) => Some(state.auth.verify(token).await),
        None => None,
    };
    let identity = match verified {
        Some(Ok(identity)) => identity,
        Some(Err(e)) => return error_response(StatusCode::UNAUTHORIZED, e.code(), &e.to_string()),
        None => {
            return error_response(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "send Authorization: Bearer <token>",
            );
        }
    };
    if let Some(limiter) = &state.ticket_rate {
        if limiter.check_key(&identity.user).is_err() {
            return error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                "too many tickets for this user; --tickets-per-sec",
            );
        }
        // Forget users idle for a while, so the limiter does not grow with every user seen.
        if limiter.len() > 10_000 {
            limiter.retain_recent();
        }
    }
    let ticket = state.tickets.issue(identity);
    (
        StatusCode::CREATED,
        Json(serde_json::json!({"ticket": ticket, "expires_in": state.tickets.ttl().as_secs()})),
    )
        .into_response()
}

/// Ready only while the bus is connected: a load balancer then sends new clients elsewhere,
/// while connected clients stay (the bus reconnects and resubscribes behind them).
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.hub.bus_connected() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "bus disconnected").into_response()
    }
}

/// The caller, if it presents a token (or, on routes a browser opens as a stream, a `ticket`) of
/// one of `--admin-users`; otherwise the response to send.
async fn admin(
    state: &AppState,
    headers: &HeaderMap,
    ticket: Option<&str>,
) -> Result<Identity, Response> {
    let identity = match credentials(state, headers, ticket).await {
        Some(Ok(identity)) => identity,
        Some(Err(e)) => {
            return Err(error_response(
                StatusCode::UNAUTHORIZED,
                e.code(),
                &e.to_string(),
            ));
        }
        None => {
            return Err(error_response(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "send Authorization: Bearer <token> (or, where taken, ?ticket=) of an --admin-users user",
            ));
        }
    };
    if !state.config.admin_users.contains(&identity.user) {
        return Err(error_response(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this route is for --admin-users",
        ));
    }
    Ok(identity)
}

async fn stats(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(refused) = admin(&state, &headers, None).await {
        return refused;
    }
    let s = &state.hub.stats;
    Json(serde_json::json!({
        "connections": s.connections.load(Relaxed),
        "connections_total": s.connections_total.load(Relaxed),
        "users": state.hub.users(),
        "delivered": s.delivered.load(Relaxed),
        "evicted": s.evicted.load(Relaxed),
        "auth_failures": s.auth_failures.load(Relaxed),
        "refused_per_user": s.refused_per_user.load(Relaxed),
        "refused_connections": state.server.refused.load(Relaxed),
        "write_stalls": state.server.write_stalls.load(Relaxed),
        "accept_errors": state.server.accept_errors.load(Relaxed),
    }))
    .into_response()
}

/// `/metrics` (Prometheus text format), unless `--metrics-listen` moved it off this address.
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    if state.config.metrics_off {
        return error_response(
            StatusCode::NOT_FOUND,
            "metrics-off",
            "/metrics is off (--metrics off)",
        );
    }
    if state.config.metrics_elsewhere {
        return error_response(
            StatusCode::NOT_FOUND,
            "not-here",
            "/metrics is on --metrics-listen",
        );
    }
    metrics_text(&state)
}

/// The gateway's metrics (and the pipeline's, in `run`), rendered.
pub fn metrics_text(state: &AppState) -> Response {
    let mut m = crate::metrics::Metrics::default();
    m.register(crate::metrics::GatewayCollector {
        hub: state.hub.clone(),
        server: state.server.clone(),
    });
    if let Some(stats) = state.pipeline_stats.get() {
        m.register(crate::metrics::PipelineCollector {
            stats: stats.clone(),
        });
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.render(),
    )
        .into_response()
}

pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(serde_json::json!({"type": "error", "code": code, "message": message})),
    )
        .into_response()
}
