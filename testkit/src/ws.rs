//! A WebSocket client of the gateway: connect (with a bearer token or not, with a buffer
//! configuration or not), read the next frame with a deadline, wait for `ready`, send.
//!
//! Nothing here panics: tests wrap it with their `expect`s, benchmarks report errors.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error, Message, http::HeaderValue};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What came next on a connection.
#[derive(Debug)]
pub enum Got {
    /// A text frame holding JSON (every frame the gateway sends).
    Frame(Value),
    /// A text frame that is not JSON.
    Text(String),
    /// Closed, with the close code if there was one.
    Closed(Option<u16>),
    TimedOut,
}

/// Opens `url` (`ws://host:port/ws…`), with `Authorization: Bearer <bearer>` when given.
pub async fn open(
    url: &str,
    bearer: Option<&str>,
    config: Option<WebSocketConfig>,
) -> Result<Ws, Error> {
    let mut request = url.into_client_request()?;
    if let Some(t) = bearer {
        let value = HeaderValue::from_str(&format!("Bearer {t}"))
            .map_err(|e| Error::HttpFormat(e.into()))?;
        request.headers_mut().insert("Authorization", value);
    }
    let (ws, _) = tokio_tungstenite::connect_async_with_config(request, config, false).await?;
    Ok(ws)
}

/// The next text frame, skipping pings and pongs.
pub async fn next(ws: &mut Ws, wait: Duration) -> Got {
    loop {
        match tokio::time::timeout(wait, ws.next()).await {
            Err(_) => return Got::TimedOut,
            Ok(Some(Ok(Message::Text(t)))) => {
                return match serde_json::from_str(&t) {
                    Ok(v) => Got::Frame(v),
                    Err(_) => Got::Text(t.to_string()),
                };
            }
            Ok(Some(Ok(Message::Close(c)))) => return Got::Closed(c.map(|c| c.code.into())),
            Ok(None) | Ok(Some(Err(_))) => return Got::Closed(None),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// Waits for the gateway's `ready` frame (sent once a connection is authenticated).
pub async fn ready(ws: &mut Ws, wait: Duration) -> Result<Value, String> {
    match next(ws, wait).await {
        Got::Frame(v) if v["type"] == "ready" => Ok(v),
        other => Err(format!("expected a ready frame, got {other:?}")),
    }
}

/// Sends raw text (anything, valid JSON or not) on a WebSocket or its write half.
pub async fn send_text<S>(ws: &mut S, text: &str) -> Result<(), S::Error>
where
    S: futures_util::Sink<Message> + Unpin,
{
    ws.send(Message::Text(text.to_owned().into())).await
}

/// Sends a JSON frame.
pub async fn send(ws: &mut Ws, frame: &Value) -> Result<(), Error> {
    ws.send(Message::Text(frame.to_string().into())).await
}
