//! The shared WebSocket client (`testkit::ws`), with the `expect`s a test wants.

use std::time::Duration;

use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

pub use testkit::ws::{Got, Ws};

pub async fn try_connect(url: &str, bearer: Option<&str>) -> Result<Ws, String> {
    testkit::ws::open(url, bearer, None)
        .await
        .map_err(|e| e.to_string())
}

pub async fn connect(url: &str, bearer: Option<&str>) -> Ws {
    try_connect(url, bearer).await.expect("connect")
}

/// The next frame or what ended the wait; a frame that is not JSON fails the test.
pub async fn next(ws: &mut Ws, wait: Duration) -> Got {
    match testkit::ws::next(ws, wait).await {
        Got::Text(t) => panic!("frame is not JSON: {t}"),
        got => got,
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
    testkit::ws::send_text(ws, text).await.expect("send");
}

pub async fn send(ws: &mut Ws, frame: Value) {
    testkit::ws::send(ws, &frame).await.expect("send");
}
