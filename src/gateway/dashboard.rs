//! `/dashboard` (admin only): the operator's live view, and this gateway's part in reporting.
//!
//! See `crate::dashboard` for the design: nothing is reported while no dashboard is open. This
//! module is a gateway's side of it:
//! - **reporting** (every gateway): listens on the control channel; while a dashboard is open
//!   anywhere, publishes its connection opens and closes and, every second, its counts;
//! - **showing** (the gateway a viewer is connected to): records that it shows a dashboard (and
//!   the space chosen on it), collects every gateway's and consumer's reports, and streams
//!   them to its viewers over SSE (`GET /api/dashboard/stream`): a `snapshot` every second
//!   (gateways, busiest users, watched spaces, events/s and messages/s, lag, resyncs, dead
//!   letters, pending critical notices), and each `connection` and `space-event` as it comes.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use super::hub::{Hub, Transport};
use super::{AppState, error_response};
use crate::dashboard::{CONTROL, OFF, ON, REPORTS, Report, WATCH_TTL_MS, now_ms};

const PAGE: &str = include_str!("../../web/dashboard.html");

/// How often counts are reported and viewers get a snapshot.
const TICK: Duration = Duration::from_secs(1);
/// Every this many ticks, a showing gateway renews its record (well within its TTL).
const RENEW_TICKS: u32 = 5;
/// Every this many ticks, a reporting gateway with no viewer of its own checks that a
/// dashboard is still open somewhere (an `off` lost with a connection heals).
const VERIFY_TICKS: u32 = 10;
/// A gateway or consumer not heard from for this long leaves the view.
const STALE: Duration = Duration::from_secs(5);
/// How long the chosen space is kept without a renewal.
const CHOSEN_TTL: Duration = Duration::from_secs(30);
/// Reports and operator messages queued at most (a flood is dropped from the view).
const QUEUE: usize = 4096;

/// A gateway's dashboard state.
pub struct GatewayDashboard {
    pub id: String,
    hub: Arc<Hub>,
    viewers: AtomicUsize,
    view: Mutex<View>,
    /// To this gateway's viewers: (SSE event name, JSON).
    live: broadcast::Sender<(&'static str, String)>,
    chosen: Mutex<Option<String>>,
}

/// A report and when it came.
type Heard = (Instant, Report);

#[derive(Default)]
struct View {
    gateways: HashMap<String, (Instant, Report)>,
    /// Per consumer: its latest counters, and the ones before (for rates).
    pipelines: HashMap<String, (Heard, Option<Heard>)>,
}

impl GatewayDashboard {
    /// Starts this gateway's part: the hub's reports are wired to a task that publishes them
    /// while a dashboard is open, and collects what others report while this one shows one.
    pub fn start(state: &Arc<AppState>) -> Arc<GatewayDashboard> {
        let id = state
            .advertised_as
            .get()
            .cloned()
            .unwrap_or_else(|| format!("gw-{:08x}", rand::random::<u32>()));
        let (opens_tx, opens) = mpsc::channel(QUEUE);
        let (operator_tx, operator) = mpsc::channel(QUEUE);
        let _ = state.hub.reports.opens_and_closes.set(opens_tx);
        let _ = state.hub.reports.operator.set(operator_tx);
        let dashboard = Arc::new(GatewayDashboard {
            id,
            hub: state.hub.clone(),
            viewers: AtomicUsize::new(0),
            view: Mutex::new(View::default()),
            live: broadcast::channel(QUEUE).0,
            chosen: Mutex::new(None),
        });
        tokio::spawn(dashboard.clone().run(opens, operator));
        dashboard
    }

    fn active(&self) -> bool {
        self.hub.reports.active.load(Relaxed)
    }

    async fn publish(&self, report: Report) {
        if let Err(e) = self
            .hub
            .bus()
            .operator_publish(REPORTS, &report.to_json())
            .await
        {
            tracing::debug!(error = %e, "a dashboard report was not published");
        }
    }

    async fn activate(&self, on: bool) {
        let was = self.hub.reports.active.swap(on, Relaxed);
        if on && !was {
            tracing::info!(gateway = %self.id, "a dashboard is open: reporting");
            self.publish(self.hub.dashboard_counts(&self.id)).await;
        } else if !on && was {
            tracing::info!(gateway = %self.id, "no dashboard open: reporting stopped");
        }
    }

    async fn run(
        self: Arc<Self>,
        mut opens: mpsc::Receiver<(Arc<str>, Transport, bool)>,
        mut operator: mpsc::Receiver<(String, Bytes)>,
    ) {
        let bus = self.hub.bus().clone();
        if let Err(e) = bus.operator_subscribe(CONTROL, true).await {
            tracing::warn!(error = %e, "the dashboard's control channel is unavailable");
        }
        // A dashboard may be open already (this gateway just started).
        if let Ok((true, _)) = bus.dashboard_state(now_ms()).await {
            self.activate(true).await;
        }
        let mut tick = tokio::time::interval(TICK);
        let mut ticks: u32 = 0;
        loop {
            tokio::select! {
                message = operator.recv() => {
                    let Some((channel, payload)) = message else { return };
                    self.operator_message(&channel, &payload).await;
                }
                opened = opens.recv() => {
                    let Some((user, transport, opened)) = opened else { return };
                    if self.active() {
                        self.publish(Report::Connection {
                            gateway: self.id.clone(),
                            user: user.to_string(),
                            transport: match transport {
                                Transport::WebSocket => "websocket",
                                Transport::Sse => "sse",
                            }
                            .into(),
                            opened,
                        })
                        .await;
                    }
                }
                _ = tick.tick() => {
                    ticks = ticks.wrapping_add(1);
                    self.on_tick(ticks).await;
                }
            }
        }
    }

    async fn on_tick(&self, ticks: u32) {
        let bus = self.hub.bus();
        let showing = self.viewers.load(Relaxed) > 0;
        if self.active() {
            self.publish(self.hub.dashboard_counts(&self.id)).await;
            if !showing && ticks.is_multiple_of(VERIFY_TICKS) {
                match bus.dashboard_state(now_ms()).await {
                    Ok((false, _)) => self.activate(false).await,
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "dashboard state unreadable"),
                }
            }
        }
        if !showing {
            return;
        }
        if ticks.is_multiple_of(RENEW_TICKS) {
            let now = now_ms();
            if let Err(e) = bus
                .dashboard_watch(&self.id, Some(now + WATCH_TTL_MS), now)
                .await
            {
                tracing::debug!(error = %e, "showing a dashboard not recorded");
            }
            let chosen = self.chosen.lock().ok().and_then(|c| c.clone());
            if let Some(space) = chosen {
                let _ = bus.dashboard_choose_space(Some(&space), CHOSEN_TTL).await;
            }
        }
        let snapshot = self.snapshot().to_string();
        let _ = self.live.send(("snapshot", snapshot));
    }

    async fn operator_message(&self, channel: &str, payload: &[u8]) {
        match channel {
            CONTROL => match payload {
                b"on" => self.activate(true).await,
                b"off" => self.activate(false).await,
                _ => {}
            },
            REPORTS => {
                let Ok(report) = serde_json::from_slice::<Report>(payload) else {
                    tracing::debug!("an unreadable dashboard report skipped");
                    return;
                };
                self.collect(report);
            }
            _ => {}
        }
    }

    /// Adds a report to the view; connections and space events go to the viewers at once.
    fn collect(&self, report: Report) {
        let now = Instant::now();
        match &report {
            Report::Gateway { id, .. } => {
                if let Ok(mut v) = self.view.lock() {
                    v.gateways.insert(id.clone(), (now, report));
                }
            }
            Report::Pipeline { id, .. } => {
                if let Ok(mut v) = self.view.lock() {
                    let entry = v.pipelines.remove(id);
                    let previous = entry.map(|(latest, _)| latest);
                    v.pipelines.insert(id.clone(), ((now, report), previous));
                }
            }
            Report::Connection { .. } => {
                let _ = self.live.send(("connection", report.to_json()));
            }
            Report::SpaceEvent { .. } => {
                let _ = self.live.send(("space-event", report.to_json()));
            }
        }
    }

    /// What the viewers see every second.
    fn snapshot(&self) -> Value {
        let now = Instant::now();
        let mut gateways = Vec::new();
        let mut busiest: HashMap<String, u64> = HashMap::new();
        let mut spaces: HashMap<String, u64> = HashMap::new();
        let mut pipeline = json!({"consumers": 0});
        if let Ok(mut v) = self.view.lock() {
            v.gateways
                .retain(|_, (at, _)| now.duration_since(*at) < STALE);
            v.pipelines
                .retain(|_, ((at, _), _)| now.duration_since(*at) < STALE * 2);
            for (at, report) in v.gateways.values() {
                if let Report::Gateway {
                    id,
                    connections,
                    websocket,
                    sse,
                    users,
                    busiest: b,
                    spaces: s,
                } = report
                {
                    gateways.push(json!({
                        "id": id, "connections": connections, "websocket": websocket, "sse": sse,
                        "users": users, "age_ms": now.duration_since(*at).as_millis() as u64,
                    }));
                    for (user, n) in b {
                        *busiest.entry(user.clone()).or_default() += n;
                    }
                    for (space, n) in s {
                        *spaces.entry(space.clone()).or_default() += n;
                    }
                }
            }
            pipeline = pipeline_view(v.pipelines.values());
        }
        gateways.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
        let top = |m: HashMap<String, u64>| {
            let mut v: Vec<(String, u64)> = m.into_iter().collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            v.truncate(10);
            v
        };
        let pending = self.hub.stats.notices_pending.load(Relaxed);
        json!({
            "gateway": self.id,
            "gateways": gateways,
            "busiest": top(busiest),
            "spaces": top(spaces),
            "pipeline": pipeline,
            "pending_notices": (pending >= 0).then_some(pending),
            "chosen_space": self.chosen.lock().ok().and_then(|c| c.clone()),
            "dropped_reports": self.hub.reports.dropped.load(Relaxed),
        })
    }

    /// A viewer arrived: the first one records this gateway as showing a dashboard and turns
    /// reporting on everywhere.
    async fn viewer_joined(&self, space: Option<String>) {
        let bus = self.hub.bus();
        if self.viewers.fetch_add(1, Relaxed) == 0 {
            if let Err(e) = bus.operator_subscribe(REPORTS, true).await {
                tracing::warn!(error = %e, "dashboard reports unavailable");
            }
            let now = now_ms();
            let _ = bus
                .dashboard_watch(&self.id, Some(now + WATCH_TTL_MS), now)
                .await;
            let _ = bus.operator_publish(CONTROL, ON).await;
            self.activate(true).await;
        }
        if let Some(space) = space {
            let _ = bus.dashboard_choose_space(Some(&space), CHOSEN_TTL).await;
            if let Ok(mut c) = self.chosen.lock() {
                *c = Some(space);
            }
        }
    }

    /// A viewer left: the last one anywhere turns reporting off everywhere.
    async fn viewer_left(&self) {
        if self.viewers.fetch_sub(1, Relaxed) != 1 {
            return;
        }
        let bus = self.hub.bus();
        let _ = bus.operator_subscribe(REPORTS, false).await;
        if let Ok(mut c) = self.chosen.lock() {
            *c = None;
        }
        match bus.dashboard_watch(&self.id, None, now_ms()).await {
            Ok(true) => {} // another gateway still shows one
            Ok(false) => {
                let _ = bus.dashboard_choose_space(None, CHOSEN_TTL).await;
                let _ = bus.operator_publish(CONTROL, OFF).await;
                self.activate(false).await;
            }
            Err(e) => tracing::debug!(error = %e, "dashboard state unreadable"),
        }
    }
}

/// Every consumer's counters summed, with rates from each one's last two reports.
fn pipeline_view<'a>(pipelines: impl Iterator<Item = &'a (Heard, Option<Heard>)>) -> Value {
    let (mut consumers, mut events, mut messages, mut coalesced) = (0u64, 0u64, 0u64, 0u64);
    let (mut resyncs, mut rejected, mut muted) = (0u64, 0u64, 0u64);
    let (mut eps, mut mps) = (0.0f64, 0.0f64);
    let mut lag: Option<i64> = None;
    for ((at, latest), previous) in pipelines {
        let Report::Pipeline {
            events: e,
            messages: m,
            coalesced: c,
            resyncs: r,
            rejected: x,
            muted: u,
            lag: l,
            ..
        } = latest
        else {
            continue;
        };
        consumers += 1;
        events += e;
        messages += m;
        coalesced += c;
        resyncs += r;
        rejected += x;
        muted += u;
        if let Some(l) = l {
            lag = Some(lag.unwrap_or(0) + l);
        }
        if let Some((
            before,
            Report::Pipeline {
                events: e0,
                messages: m0,
                ..
            },
        )) = previous
        {
            let seconds = at.duration_since(*before).as_secs_f64();
            if seconds > 0.0 {
                eps += e.saturating_sub(*e0) as f64 / seconds;
                mps += m.saturating_sub(*m0) as f64 / seconds;
            }
        }
    }
    json!({
        "consumers": consumers, "events": events, "messages": messages, "coalesced": coalesced,
        "resyncs": resyncs, "dead_letters": rejected, "muted": muted, "lag": lag,
        "events_per_sec": (eps * 10.0).round() / 10.0, "messages_per_sec": (mps * 10.0).round() / 10.0,
    })
}

/// `GET /dashboard`: the page (it asks for an admin's token, then streams).
pub async fn page() -> Html<&'static str> {
    Html(PAGE)
}

#[derive(Deserialize)]
pub struct StreamQuery {
    ticket: Option<String>,
    /// The space whose events the page shows live.
    space: Option<String>,
}

/// `GET /api/dashboard/stream` (an `--admin-users` user, by bearer token or ticket).
pub async fn stream(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<StreamQuery>,
) -> Response {
    if let Err(refused) = super::admin(&state, &headers, query.ticket.as_deref()).await {
        return refused;
    }
    let Some(dashboard) = state.dashboard.get().cloned() else {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "no dashboard here",
        );
    };
    let space = query.space.filter(|s| !s.is_empty() && s.len() <= 256);
    let live = dashboard.live.subscribe();
    dashboard.viewer_joined(space).await;
    let first = Event::default()
        .event("snapshot")
        .data(dashboard.snapshot().to_string());
    let viewer = Viewer {
        dashboard,
        live,
        first: Some(first),
    };
    let events = stream::unfold(viewer, |mut v| async move {
        if let Some(first) = v.first.take() {
            return Some((Ok::<_, Infallible>(first), v));
        }
        loop {
            match v.live.recv().await {
                Ok((name, data)) => {
                    return Some((Ok(Event::default().event(name).data(data)), v));
                }
                // A slow viewer skips what it missed: the next snapshot is whole.
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// One viewer's stream; leaving (the stream dropped) is counted.
struct Viewer {
    dashboard: Arc<GatewayDashboard>,
    live: broadcast::Receiver<(&'static str, String)>,
    first: Option<Event>,
}

impl Drop for Viewer {
    fn drop(&mut self) {
        let dashboard = self.dashboard.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { dashboard.viewer_left().await });
        }
    }
}
