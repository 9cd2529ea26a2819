//! Discovery: `GET /api/endpoint` names the least-loaded live gateway, so a client can connect
//! there directly instead of through the load balancer (the oCIS design's alternative to a
//! proxy in front of every connection).
//!
//! A gateway started with `--public-url` advertises itself in the bus every
//! `--heartbeat-every`: its WebSocket and SSE URLs, its open connections and the share of a CPU
//! it used over the last interval, valid for two intervals. One that is killed or cut off stops
//! renewing and drops out within two intervals; one that drains (SIGTERM) withdraws at once and
//! stops advertising, so it is never handed out again. Any gateway answers from the
//! advertisements in the bus (a Redis hash): the one with the fewest connections, CPU breaking
//! ties. The state lives in the bus, so gateways stay stateless behind the load balancer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::AppState;

/// One gateway's advertisement (JSON in the bus, and the answer of `GET /api/endpoint`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Advertisement {
    pub gateway: String,
    /// `ws(s)://…/ws`
    pub websocket: String,
    /// `http(s)://…/sse`
    pub sse: String,
    pub connections: u64,
    /// The share of one CPU the gateway used over its last interval.
    pub cpu: f64,
}

/// The WebSocket and SSE URLs of a gateway whose base URL is `public`.
pub fn urls(public: &str) -> Result<(String, String), String> {
    let base = public.trim_end_matches('/');
    let websocket = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}/ws")
    } else if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}/ws")
    } else {
        return Err(format!(
            "--public-url {public:?} must start with http:// or https://"
        ));
    };
    if base.len() <= "https://".len() {
        return Err(format!("--public-url {public:?} names no host"));
    }
    Ok((websocket, format!("{base}/sse")))
}

/// The one to hand out: the fewest connections, then the least CPU, then the id (so equal
/// gateways are chosen the same way by every gateway).
pub fn choose(mut ads: Vec<Advertisement>) -> Option<Advertisement> {
    ads.sort_by(|a, b| {
        a.connections
            .cmp(&b.connections)
            .then(a.cpu.total_cmp(&b.cpu))
            .then(a.gateway.cmp(&b.gateway))
    });
    ads.into_iter().next()
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Starts advertising this gateway when it has a `--public-url`; a bad URL is a start-up error.
pub fn start(state: &Arc<AppState>) -> Result<(), String> {
    let Some(public) = state.config.public_url.clone() else {
        return Ok(());
    };
    let (websocket, sse) = urls(&public)?;
    let id = format!("{:016x}", rand::random::<u64>());
    let _ = state.advertised_as.set(id.clone());
    let every = state.config.heartbeat_every.max(Duration::from_millis(100));
    let weak = Arc::downgrade(state);
    tokio::spawn(async move {
        let mut cpu = CpuSampler::default();
        loop {
            let Some(state) = weak.upgrade() else { return };
            if state.hub.is_draining() {
                return;
            }
            let ad = Advertisement {
                gateway: id.clone(),
                websocket: websocket.clone(),
                sse: sse.clone(),
                connections: state
                    .hub
                    .stats
                    .connections
                    .load(std::sync::atomic::Ordering::Relaxed),
                cpu: cpu.share(),
            };
            let until = now_ms() + 2 * every.as_millis() as i64;
            match serde_json::to_string(&ad) {
                Ok(json) => {
                    if let Err(e) = state.hub.bus().advertise_gateway(&id, &json, until).await {
                        tracing::warn!(error = %e, "could not advertise this gateway; retrying");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "advertisement not encodable"),
            }
            drop(state);
            tokio::time::sleep(every).await;
        }
    });
    tracing::info!(%public, "advertising this gateway for discovery");
    Ok(())
}

/// Withdraws this gateway's advertisement (it drains): no client is sent here any more.
pub async fn withdraw(state: &AppState) {
    if let Some(id) = state.advertised_as.get()
        && let Err(e) = state.hub.bus().withdraw_gateway(id).await
    {
        tracing::warn!(error = %e, "could not withdraw this gateway's advertisement; it expires within two heartbeats");
    }
}

/// `GET /api/endpoint` (any authenticated user): the least-loaded live gateway.
pub async fn endpoint(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let verified = match super::ws::header_token(&headers) {
        Some(token) => state.auth.verify(token).await,
        None => {
            return super::error_response(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "send Authorization: Bearer <token>",
            );
        }
    };
    if let Err(e) = verified {
        return super::error_response(StatusCode::UNAUTHORIZED, e.code(), &e.to_string());
    }
    let ads = match state.hub.bus().gateways(now_ms()).await {
        Ok(all) => all
            .iter()
            .filter_map(|json| serde_json::from_str::<Advertisement>(json).ok())
            .collect(),
        Err(e) => {
            return super::error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                &e.to_string(),
            );
        }
    };
    match choose(ads) {
        Some(ad) => axum::Json(ad).into_response(),
        None => super::error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "no-gateway",
            "no gateway advertises itself (--public-url); connect through the usual address",
        ),
    }
}

/// This process's CPU share between two calls, from `/proc/self/stat` (Linux; 0 elsewhere).
#[derive(Default)]
struct CpuSampler {
    last: Option<(Instant, f64)>,
}

impl CpuSampler {
    fn share(&mut self) -> f64 {
        let Some(used) = cpu_seconds() else {
            return 0.0;
        };
        let now = Instant::now();
        let share = match self.last {
            Some((at, before)) => {
                let wall = now.duration_since(at).as_secs_f64();
                if wall > 0.0 {
                    ((used - before) / wall).max(0.0)
                } else {
                    0.0
                }
            }
            None => 0.0,
        };
        self.last = Some((now, used));
        share
    }
}

/// User and system CPU seconds of this process. Fields 14 and 15 of `/proc/self/stat`, in
/// clock ticks of 1/100 s (Linux's `USER_HZ` on every architecture it exposes to userland).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces; the fields after it follow its ')'.
    let after = &stat[stat.rfind(')')? + 2..];
    let mut fields = after.split_whitespace();
    let utime: f64 = fields.nth(11)?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ad(id: &str, connections: u64, cpu: f64) -> Advertisement {
        Advertisement {
            gateway: id.into(),
            websocket: format!("ws://{id}/ws"),
            sse: format!("http://{id}/sse"),
            connections,
            cpu,
        }
    }

    #[test]
    fn the_fewest_connections_win_then_the_least_cpu_then_the_id() {
        assert_eq!(choose(vec![]), None);
        let picked = choose(vec![ad("a", 5, 0.1), ad("b", 2, 0.9), ad("c", 2, 0.2)]);
        assert_eq!(picked.map(|a| a.gateway), Some("c".into()));
        let tie = choose(vec![ad("b", 1, 0.0), ad("a", 1, 0.0)]);
        assert_eq!(tie.map(|a| a.gateway), Some("a".into()));
    }

    #[test]
    fn public_urls_give_websocket_and_sse_urls() {
        assert_eq!(
            urls("https://gw1.example.com/").unwrap(),
            (
                "wss://gw1.example.com/ws".into(),
                "https://gw1.example.com/sse".into()
            )
        );
        assert_eq!(
            urls("http://10.0.0.5:8080").unwrap(),
            (
                "ws://10.0.0.5:8080/ws".into(),
                "http://10.0.0.5:8080/sse".into()
            )
        );
        assert!(urls("gw1.example.com").is_err());
        assert!(urls("https://").is_err());
    }

    #[test]
    fn this_process_has_cpu_time() {
        if cfg!(target_os = "linux") {
            let spent = cpu_seconds().expect("/proc/self/stat");
            assert!(spent >= 0.0);
            let mut sampler = CpuSampler::default();
            assert_eq!(sampler.share(), 0.0, "nothing to compare the first time");
            let busy = Instant::now();
            while busy.elapsed() < Duration::from_millis(50) {
                std::hint::black_box(busy.elapsed());
            }
            assert!(sampler.share() >= 0.0);
        }
    }
}
