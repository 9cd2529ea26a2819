//! Headless Chromium (Debian's `chromium`) driven over the DevTools protocol.

use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

pub struct Browser {
    pub child: tokio::process::Child,
    _profile: tempfile::TempDir,
    port: u16,
}

impl Browser {
    pub async fn launch(url: &str) -> Browser {
        let exe = std::env::var("FOLDERCAST_CHROMIUM").unwrap_or_else(|_| "chromium".into());
        let profile = tempfile::tempdir().unwrap();
        let child = tokio::process::Command::new(&exe)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {exe} (scripts/test.sh installs Debian's chromium): {e}")
            });
        let port_file = profile.path().join("DevToolsActivePort");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let port = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file)
                && let Some(Ok(port)) = text.lines().next().map(str::parse)
            {
                break port;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromium did not open its DevTools port"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        Browser {
            child,
            _profile: profile,
            port,
        }
    }

    /// The page, once the URL it was launched with (path `path`) has loaded.
    pub async fn loaded_page(&self, path: &str) -> Cdp {
        let mut page = self.page().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let loaded = format!(
            r#"location.pathname === {} && document.readyState === "complete""#,
            json!(path)
        );
        while page.eval(&loaded).await != Value::Bool(true) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the page never loaded"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        page
    }

    pub async fn page(&self) -> Cdp {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let list: Value = reqwest::get(format!("http://127.0.0.1:{}/json/list", self.port))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if let Some(ws) = list
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["type"] == "page")
                .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            {
                let (socket, _) = tokio_tungstenite::connect_async(ws).await.unwrap();
                return Cdp { socket, next_id: 0 };
            }
            assert!(tokio::time::Instant::now() < deadline, "no page target");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub struct Cdp {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl Cdp {
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        self.socket
            .send(Message::Text(
                json!({"id": id, "method": method, "params": params})
                    .to_string()
                    .into(),
            ))
            .await
            .unwrap();
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(20), self.socket.next())
                .await
                .expect("CDP reply")
                .unwrap()
                .unwrap();
            if let Message::Text(t) = msg {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["id"] == id {
                    return v["result"].clone();
                }
            }
        }
    }

    pub async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(e) = r.get("exceptionDetails") {
            panic!("page script failed: {e}");
        }
        r["result"]["value"].clone()
    }
}
