//! The demo page in headless Chromium (Debian's `chromium`): it signs in as a demo user, lists a
//! space and shows pushed updates live. Driven over the DevTools protocol; a screenshot is left
//! in `target/demo-page.png`.

mod common;

use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use common::{Server, root};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

struct Browser {
    child: tokio::process::Child,
    _profile: tempfile::TempDir,
    port: u16,
}

impl Browser {
    async fn launch(url: &str) -> Browser {
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

    async fn page(&self) -> Cdp {
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

struct Cdp {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl Cdp {
    async fn call(&mut self, method: &str, params: Value) -> Value {
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

    async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await;
        r["result"]["value"].clone()
    }
}

const PROBE: &str = r#"JSON.stringify({
  status: document.querySelector('#status')?.dataset.state,
  applied: Number(document.body.dataset.applied),
  log: document.querySelectorAll('#log li').length,
  rows: [...document.querySelectorAll('#listing tbody tr')].map(r => [r.dataset.path, Number(r.dataset.size)]),
})"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_page_shows_live_updates() {
    // The embedded default as a person starts it, but faster and on a free port.
    let args: Vec<String> = [
        "run",
        "--listen",
        "127.0.0.1:0",
        "--jwt-secret",
        "demo-secret",
        "--rate",
        "15",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let server = Server::spawn(&args, false).await;
    let browser = Browser::launch(&server.url("/?user=alice&space=s-eng")).await;
    let mut page = browser.page().await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    let mut first_rows: Option<Value> = None;
    let state = loop {
        let state: Value = serde_json::from_str(page.eval(PROBE).await.as_str().unwrap_or("{}"))
            .unwrap_or(json!({}));
        if state["status"] == "live" && first_rows.is_none() {
            first_rows = Some(state["rows"].clone());
        }
        let changed = first_rows.as_ref().is_some_and(|f| *f != state["rows"]);
        if state["status"] == "live"
            && state["applied"].as_u64().unwrap_or(0) >= 3
            && state["log"].as_u64().unwrap_or(0) >= 3
            && changed
        {
            break state;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the page never showed live updates: {state}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let rows = state["rows"].as_array().unwrap();
    assert!(
        rows.iter().any(|r| r[0] == "/projects" || r[0] == "/inbox"),
        "the space root lists its folders: {state}"
    );

    let shot = page
        .call("Page.captureScreenshot", json!({"format": "png"}))
        .await;
    if let Some(data) = shot["data"].as_str() {
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap();
        let _ = std::fs::write(root().join("target/demo-page.png"), png);
    }
    drop(page);
    drop(browser.child);
}
