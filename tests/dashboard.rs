//! The operator's dashboard through the real binary: with no dashboard open, gateways send
//! Redis nothing for it (its PUBLISH count does not move while connections come and go);
//! opening one turns every gateway's reporting on (counts, each connection opened), closing it
//! turns them off; consumers report throughput and the chosen space's events; and the page
//! shows it all in headless Chromium.

mod common;

use std::time::Duration;

use common::browser::Browser;
use common::pipeline::{Redis, gateway};
use common::sse::{Sse, SseEvent};
use common::ws;
use common::{ADMIN, PrivateRedis, Server, ticket, token};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);

/// Every command Redis runs, as `redis-cli monitor` prints it.
struct Monitor {
    _child: tokio::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Monitor {
    async fn start(port: u16) -> Monitor {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new("redis-cli")
            .args(["-p", &port.to_string(), "monitor"])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-cli");
        let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        // The first line is MONITOR's own OK.
        let _ = out.next_line().await;
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = out.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        Monitor {
            _child: child,
            lines,
        }
    }

    /// Commands seen so far that touch the dashboard's keys or channels.
    fn dashboard_commands(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("fc:{dashboard}"))
            .cloned()
            .collect()
    }
}

async fn open_dashboard(server: &Server, space: Option<&str>) -> Sse {
    let mut url = server.url("/api/dashboard/stream");
    if let Some(space) = space {
        url.push_str(&format!("?space={space}"));
    }
    let response = Sse::open(&url, Some(&token(ADMIN))).await;
    assert_eq!(response.status(), 200);
    Sse::new(response)
}

/// The next event named `name` whose data satisfies `want`.
async fn until(sse: &mut Sse, name: &str, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {name} event as wanted"
        );
        let SseEvent { event, data, .. } = sse.next().await.expect("the stream goes on");
        if event.as_deref() == Some(name) {
            let v: Value = serde_json::from_str(&data).unwrap();
            if want(&v) {
                return v;
            }
        }
    }
}

async fn connect_and_close(server: &Server, users: &[&str]) {
    for user in users {
        let mut c = ws::connect(&server.ws_url("/ws"), Some(&token(user))).await;
        assert_eq!(ws::frame(&mut c, WAIT).await["type"], "ready");
        drop(c);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_report_only_while_a_dashboard_is_open() {
    let redis = PrivateRedis::start();
    let a = gateway(&Redis::Standalone(redis.url()), &[]).await;
    let b = gateway(&Redis::Standalone(redis.url()), &[]).await;
    // Started: each gateway subscribed to the control channel and asked once whether a
    // dashboard is open. From here on, nothing while nobody watches.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let monitor = Monitor::start(redis.port).await;

    // Nobody watches: connections come and go on both gateways, and nothing is sent for it.
    connect_and_close(&a, &["u1", "u2", "u3"]).await;
    connect_and_close(&b, &["u4", "u5"]).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        monitor.lines.lock().unwrap().len() > 10,
        "the monitor sees the connections' commands"
    );
    assert_eq!(
        monitor.dashboard_commands(),
        Vec::<String>::new(),
        "no dashboard open: not one command for it"
    );

    // Two connections stay on B; a dashboard opens on A and sees both gateways.
    let mut x = ws::connect(&b.ws_url("/ws"), Some(&token("x"))).await;
    let mut y = ws::connect(&b.ws_url("/ws?device=d"), Some(&token("x"))).await;
    for c in [&mut x, &mut y] {
        assert_eq!(ws::frame(c, WAIT).await["type"], "ready");
    }
    let mut dashboard = open_dashboard(&a, None).await;
    let snapshot = until(&mut dashboard, "snapshot", |s| {
        s["gateways"].as_array().is_some_and(|g| g.len() == 2)
    })
    .await;
    let of_b = snapshot["gateways"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["id"] != snapshot["gateway"])
        .unwrap()
        .clone();
    assert_eq!(of_b["connections"], 2, "{snapshot}");
    assert_eq!(of_b["users"], 1);
    assert_eq!(
        snapshot["busiest"][0],
        serde_json::json!(["x", 2]),
        "{snapshot}"
    );

    // A connection opened on B is reported to A's viewer as it happens.
    let mut z = ws::connect(&b.ws_url("/ws"), Some(&token("z"))).await;
    assert_eq!(ws::frame(&mut z, WAIT).await["type"], "ready");
    let opened = until(&mut dashboard, "connection", |c| c["user"] == "z").await;
    assert_eq!(opened["gateway"], of_b["id"]);
    assert_eq!(opened["opened"], true);
    assert_eq!(opened["transport"], "websocket");
    let reported = monitor.dashboard_commands();
    assert!(
        reported
            .iter()
            .any(|c| c.contains("\"PUBLISH\" \"fc:{dashboard}:reports\"")),
        "{reported:?}"
    );

    // A watch counts its connection for the space.
    ws::send(
        &mut x,
        serde_json::json!({"type": "watch", "space_id": "s-eng", "path": "/docs"}),
    )
    .await;
    let watched = until(&mut dashboard, "snapshot", |s| {
        s["spaces"] == serde_json::json!([["s-eng", 1]])
    })
    .await;
    assert_eq!(watched["spaces"][0][0], "s-eng");

    // The dashboard closes: reporting stops everywhere.
    drop(dashboard);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = monitor.dashboard_commands().len();
    connect_and_close(&a, &["u6", "u7"]).await;
    connect_and_close(&b, &["u8"]).await;
    drop((x, y, z));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let more = monitor.dashboard_commands();
    assert_eq!(
        more.len(),
        after,
        "closed: not one command more: {:?}",
        &more[after..]
    );
}

fn upload(id: &str, space: &str) -> String {
    format!(
        r#"{{"id":"{id}","type":"file-uploaded","time":"2026-11-22T10:00:00Z","data":{{"space_id":"{space}","path":"/d/{id}","kind":"file","size":5}}}}"#
    ) + "\n"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dashboard_shows_the_pipeline_and_a_chosen_spaces_events() {
    let mut server = Server::start(&["--user-rate", "0"]).await;
    let mut dashboard = open_dashboard(&server, Some("s-eng")).await;
    // The consumer looks every two seconds; then it reports.
    until(&mut dashboard, "snapshot", |s| {
        s["pipeline"]["consumers"] == 1
    })
    .await;
    let lines: String = (0..5)
        .map(|i| upload(&format!("dash-{i}"), if i == 2 { "s-mkt" } else { "s-eng" }))
        .collect();
    server.send_events(&lines).await;
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let e = until(&mut dashboard, "space-event", |_| true).await;
        assert_eq!(e["space"], "s-eng", "only the chosen space: {e}");
        seen.push(e["event_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(seen, ["dash-0", "dash-1", "dash-3", "dash-4"]);
    let s = until(&mut dashboard, "snapshot", |s| s["pipeline"]["events"] == 5).await;
    assert_eq!(s["chosen_space"], "s-eng");
    assert!(s["pipeline"]["messages"].as_u64().unwrap() >= 5, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_page_shows_gateways_throughput_and_a_space() {
    let args: Vec<String> = [
        "run",
        "--listen",
        "127.0.0.1:0",
        "--jwt-secret",
        common::SECRET,
        "--rate",
        "20",
        "--no-demo",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let server = Server::spawn(&args, false).await;
    let mut alice = ws::connect(&server.ws_url("/ws"), Some(&token("alice"))).await;
    assert_eq!(ws::frame(&mut alice, WAIT).await["type"], "ready");
    let browser =
        Browser::launch(&server.url(&format!("/dashboard?token={}&space=s-eng", token(ADMIN))))
            .await;
    let mut page = browser.page().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let probe = r#"JSON.stringify({
      status: document.querySelector('#status')?.dataset.state,
      gateways: Number(document.body?.dataset.gateways ?? 0),
      connections: Number(document.body?.dataset.connections ?? 0),
      eps: document.querySelector('#eps')?.textContent,
      spaceEvents: Number(document.querySelector('#space-events')?.dataset.count ?? 0),
      busiest: document.querySelector('#busiest tbody tr td')?.textContent,
    })"#;
    let state = loop {
        let state: Value = serde_json::from_str(page.eval(probe).await.as_str().unwrap_or("{}"))
            .unwrap_or_default();
        if state["status"] == "live"
            && state["gateways"] == 1
            && state["connections"].as_u64().unwrap_or(0) >= 1
            && state["spaceEvents"].as_u64().unwrap_or(0) >= 2
            && state["eps"].as_str().is_some_and(|e| e != "–")
        {
            break state;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dashboard never showed it all: {state}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(state["busiest"], "alice", "{state}");
    drop(page);
    drop(browser.child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_stream_and_stats_are_for_admins_by_token_or_ticket() {
    let server = Server::start(&[]).await;
    let stream = server.url("/api/dashboard/stream");
    let status = |r: reqwest::Response| r.status().as_u16();
    let code = |r: reqwest::Response| async move {
        let v: Value = r.json().await.unwrap();
        v["code"].as_str().unwrap_or_default().to_owned()
    };
    // Nothing presented, a user who is not an admin, a ticket that is not one.
    let none = Sse::open(&stream, None).await;
    assert_eq!(none.status(), 401);
    assert_eq!(code(none).await, "unauthenticated");
    let alice = Sse::open(&stream, Some(&token("alice"))).await;
    assert_eq!(alice.status(), 403);
    assert_eq!(code(alice).await, "forbidden");
    let alices_ticket = ticket(&server, "alice").await;
    let by_ticket = Sse::open(&format!("{stream}?ticket={alices_ticket}"), None).await;
    assert_eq!(status(by_ticket), 403);
    let forged = Sse::open(&format!("{stream}?ticket=not-a-ticket"), None).await;
    assert_eq!(forged.status(), 401);
    // An admin's ticket opens the stream (what the page does: EventSource sends no header).
    let admins_ticket = ticket(&server, ADMIN).await;
    let opened = Sse::open(&format!("{stream}?ticket={admins_ticket}"), None).await;
    assert_eq!(opened.status(), 200);
    let mut sse = Sse::new(opened);
    until(&mut sse, "snapshot", |_| true).await;
    // /api/stats takes the same check, by token only.
    let stats = server.url("/api/stats");
    assert_eq!(status(Sse::open(&stats, Some(&token(ADMIN))).await), 200);
    assert_eq!(status(Sse::open(&stats, Some(&token("alice"))).await), 403);
    let with_ticket = format!("{stats}?ticket={}", ticket(&server, ADMIN).await);
    assert_eq!(status(Sse::open(&with_ticket, None).await), 401);
}
