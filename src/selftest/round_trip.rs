//! The round trip: a message published on the bus for a probe user arrives on a gateway's
//! WebSocket. It proves what no single check can: that the gateway authenticates the probe's
//! token, reads the same Redis the consumer writes, and delivers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::bus::{Bus, Outgoing};

use super::{Check, within};

const SYSTEM: &str = "round-trip";

/// How long the probe message may take to arrive.
const ARRIVAL: Duration = Duration::from_secs(10);

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A gateway connection of the probe user, once it said `ready`.
pub struct Connected {
    ws: Socket,
    url: String,
}

/// Connects to `gateway` (`ws://host:port`, `/ws` added) as `user` with `token`. The gateway
/// answers `ready` once it has subscribed the user: publishing before that would only test
/// the history.
pub async fn open(gateway: &str, user: &str, token: &str) -> Result<Connected, Check> {
    let url = format!(
        "{}/ws",
        gateway.trim_end_matches('/').trim_end_matches("/ws")
    );
    let mut request = url.as_str().into_client_request().map_err(|e| {
        Check::fail(
            SYSTEM,
            format!("{url} is not a WebSocket URL: {e}"),
            "give --gateway-url ws://host:port (or wss://)",
        )
    })?;
    if let Ok(value) = format!("Bearer {token}").parse() {
        request.headers_mut().insert("authorization", value);
    }
    let (mut ws, _) = within(tokio_tungstenite::connect_async(request))
        .await
        .map_err(|e| {
            Check::fail(
                SYSTEM,
                format!("cannot open {url}: {e}"),
                "check --gateway-url and that a gateway runs there",
            )
        })?;
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) if t.contains("\"ready\"") => Ok(Connected { ws, url }),
        Ok(Some(Ok(Message::Text(t)))) => Err(Check::fail(
            SYSTEM,
            format!("{url} refused the probe user {user}: {t}"),
            "the gateway must accept the probe's token: the same --jwt-secret (or a --probe-token-file its OIDC issuer signed)",
        )),
        other => Err(Check::fail(
            SYSTEM,
            format!("{url} said nothing usable after the upgrade: {other:?}"),
            "check that --gateway-url points at a foldercast gateway",
        )),
    }
}

/// Publishes a notification for `user` on `bus` and waits for it on `connected`.
pub async fn probe(connected: Connected, bus: &dyn Bus, user: &str) -> Check {
    let Connected { mut ws, url } = connected;
    let id = format!("self-test-{:016x}", rand::random::<u64>());
    let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let payload = serde_json::json!({
        "type": "notification", "notification_id": id, "event_id": id, "level": "info",
        "title": "foldercast self-test", "body": "a probe: it proves the bus reaches this gateway",
        "time": time, "ack": null,
    });
    let started = Instant::now();
    let recipient: Arc<str> = Arc::from(user);
    let message = Outgoing::for_event(
        recipient,
        Bytes::from(payload.to_string()),
        Some(Arc::from(id.as_str())),
    );
    if let Err(e) = bus.publish(&[message]).await {
        return Check::fail(
            SYSTEM,
            format!("publishing the probe failed: {e}"),
            "see the redis checks above",
        );
    }
    let arrived = tokio::time::timeout(ARRIVAL, async {
        while let Some(Ok(frame)) = ws.next().await {
            if let Message::Text(t) = frame
                && t.contains(&id)
            {
                return true;
            }
        }
        false
    })
    .await;
    let _ = ws.close(None).await;
    match arrived {
        Ok(true) => Check::pass(
            SYSTEM,
            format!(
                "a message published for {user} reached {url} in {} ms",
                started.elapsed().as_millis()
            ),
        ),
        _ => Check::fail(
            SYSTEM,
            format!(
                "a message published for {user} did not reach {url} within {} s",
                ARRIVAL.as_secs()
            ),
            "the gateway must use the same Redis (--redis / --redis-cluster) as this command and the consumers",
        ),
    }
}
