//! A WebSocket test client: connect (bearer or not), read JSON frames with a deadline, send.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Message, http::HeaderValue};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What came next on a connection.
#[derive(Debug)]
pub enum Got {
    Frame(Value),
    /// Closed, with the close code if there was one.
    Closed(Option<u16>),
    TimedOut,
}

pub async fn try_connect(url: &str, bearer: Option<&str>) -> Result<Ws, String> {
    let mut request = url.into_client_request().map_err(|e| e.to_string())?;
    if let Some(t) = bearer {
        request.headers_mut().insert(
            "Authorization",
            HeaderValue::from_str(&format!("Bearer {t}")).map_err(|e| e.to_string())?,
        );
    }
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(ws, _)| ws)
        .map_err(|e| e.to_string())
}

pub async fn connect(url: &str, bearer: Option<&str>) -> Ws {
    try_connect(url, bearer).await.expect("connect")
}

pub async fn next(ws: &mut Ws, wait: Duration) -> Got {
    loop {
        match tokio::time::timeout(wait, ws.next()).await {
            Err(_) => return Got::TimedOut,
            Ok(Some(Ok(Message::Text(t)))) => {
                return Got::Frame(serde_json::from_str(&t).expect("frame is JSON"));
            }
            Ok(Some(Ok(Message::Close(c)))) => return Got::Closed(c.map(|c| c.code.into())),
            Ok(None) | Ok(Some(Err(_))) => return Got::Closed(None),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// The next frame; panics if the connection closes or nothing comes in `wait`.
pub async fn frame(ws: &mut Ws, wait: Duration) -> Value {
    match next(ws, wait).await {
        Got::Frame(v) => v,
        other => panic!("expected a frame, got {other:?}"),
    }
}

/// Sends raw text (anything, valid JSON or not) on a WebSocket or its write half.
pub async fn send_text<S>(ws: &mut S, text: &str)
where
    S: futures_util::Sink<Message> + Unpin,
    S::Error: std::fmt::Debug,
{
    ws.send(Message::Text(text.to_owned().into()))
        .await
        .expect("send");
}

pub async fn send(ws: &mut Ws, frame: Value) {
    ws.send(Message::Text(frame.to_string().into()))
        .await
        .expect("send");
}
