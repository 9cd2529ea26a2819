//! The JavaScript client (`clients/js/foldercast.js`) in headless Chromium against the real
//! `gateway` binary on Redis: a page that loses its connection (the gateway killed, then drained
//! for a restart) misses no change and repeats none; after its user's history is lost, it is
//! told to refetch. Over WebSocket and over SSE.

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use common::browser::{Browser, Cdp};
use common::{SECRET, Server, free_port, redis_url, root, token, unique};
use foldercast::bus::{Bus, Outgoing, RedisBus, RedisOptions, RedisTarget};
use serde_json::Value;

async fn gateway(port: u16) -> Server {
    gateway_on(&redis_url(), port, &[]).await
}

/// A publisher on the suite's Redis.
async fn redis_bus() -> Arc<RedisBus> {
    RedisBus::connect(
        &RedisTarget::Standalone(redis_url()),
        RedisOptions::default(),
        None,
    )
    .await
    .unwrap()
}

async fn publish(bus: &RedisBus, user: &Arc<str>, range: std::ops::Range<u64>) {
    for n in range {
        let payload = Bytes::from(format!(
            r#"{{"event_id":"{user}-{n}","type":"file-uploaded","space_id":"s-js","n":{n}}}"#
        ));
        let msg = Outgoing::for_event(
            user.clone(),
            payload,
            Some(Arc::from(format!("{user}-{n}"))),
        );
        bus.publish(&[msg]).await.expect("publish");
    }
}

/// Loads the client module into `page` and connects with `options` (a JS object literal): the
/// page collects the `n` of every event in `window.got` and its resyncs in `window.resyncs`.
async fn start_client(page: &mut Cdp, options: &str) {
    let module = std::fs::read(root().join("clients/js/foldercast.js")).unwrap();
    let module = base64::engine::general_purpose::STANDARD.encode(module);
    let started = page
        .eval(&format!(
            r#"(async () => {{
                const m = await import("data:text/javascript;base64,{module}");
                window.fcm = m; window.got = []; window.resyncs = [];
                window.fc = m.connect({options});
                fc.on("event", (msg) => got.push(msg.n));
                fc.on("resync", (r) => resyncs.push(r));
                return "started";
            }})()"#
        ))
        .await;
    assert_eq!(started, "started");
    wait_for(page, "connects", |v| v["state"] == "connected").await;
}

/// The page's view: the numbers of the messages it applied, its resyncs and its state.
async fn view(page: &mut Cdp) -> Value {
    let text = page
        .eval("JSON.stringify({got: window.got, resyncs: window.resyncs, state: window.fc && window.fc.state})")
        .await;
    serde_json::from_str(text.as_str().unwrap_or("{}")).unwrap_or_default()
}

async fn wait_for(page: &mut Cdp, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let v = view(page).await;
        if done(&v) {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn numbers(v: &Value) -> Vec<u64> {
    v["got"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

/// Folder sizes in the page: the client's `applyFolders` over a real gateway's messages, one
/// with a run of deltas, one coalesced batch where absolute sizes (an overwrite oCIS could not
/// give a delta for) come between deltas. Applied in order, the page ends with oCIS's sizes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_applies_folder_deltas_and_absolute_sizes_in_order() {
    let port = free_port();
    let _server = gateway(port).await;
    let user: Arc<str> = Arc::from(unique("js-sizes"));
    let bus = redis_bus().await;
    let browser = Browser::launch(&format!("http://127.0.0.1:{port}/healthz")).await;
    let mut page = browser.loaded_page("/healthz").await;
    let options = format!(
        r#"{{ url: "ws://127.0.0.1:{port}/ws", getToken: () => "{}" }}"#,
        token(&user)
    );
    start_client(&mut page, &options).await;
    let ready = page
        .eval(
            r#"window.sizes = new Map([["/docs", 300], ["/", 1000], ["/other", 5]]);
               fc.on("event", (msg) => fcm.applyFolders(msg, sizes)); "ready""#,
        )
        .await;
    assert_eq!(ready, "ready");
    let t = "2026-12-02T10:00:00Z";
    let messages = [
        serde_json::json!({"event_id": format!("{user}-1"), "type": "file-uploaded", "space_id": "s-js",
            "actor": null, "time": t, "n": 1,
            "item": {"path": "/docs/x.txt", "old_path": null, "kind": "file", "size": 10, "item_id": null, "etag": null},
            "folders": [{"path": "/docs", "size_delta": 10, "mtime": t, "levels": 2}]}),
        serde_json::json!({"event_id": format!("{user}-3"), "type": "coalesced", "space_id": "s-js",
            "actor": null, "time": t, "n": 2, "event_ids": [format!("{user}-2"), format!("{user}-3")], "items": [],
            "folders": [
                {"path": "/docs", "size": 360, "mtime": t, "levels": 1, "etag": "e1"},
                {"path": "/", "size": 1060, "mtime": t, "levels": 1},
                {"path": "/docs", "size_delta": 30, "mtime": t, "levels": 2}]}),
    ];
    let schemas = common::Schemas::load();
    for m in &messages {
        // `n` is this test's own counter, not part of the contract.
        let mut contract = m.clone();
        contract.as_object_mut().unwrap().remove("n");
        common::assert_valid(&schemas.message, &contract, "a message with folder sizes");
        let id = m["event_id"].as_str().unwrap();
        let msg = Outgoing::for_event(
            user.clone(),
            Bytes::from(m.to_string()),
            Some(Arc::from(id)),
        );
        bus.publish(&[msg]).await.expect("publish");
    }
    wait_for(&mut page, "both messages", |v| numbers(v).len() >= 2).await;
    let sizes = page
        .eval("JSON.stringify(Object.fromEntries(window.sizes))")
        .await;
    let sizes: Value = serde_json::from_str(sizes.as_str().unwrap()).unwrap();
    assert_eq!(
        sizes,
        serde_json::json!({"/docs": 390, "/": 1090, "/other": 5}),
        "deltas add, absolute sizes set, in order"
    );
}

async fn stop(server: &mut Server, signal: &str) {
    common::stop_with(&mut server.child, signal, Duration::from_secs(15)).await;
}

async fn page_survives_restarts_and_refetches_after_a_lost_history(transport: &str) {
    let port = free_port();
    let mut server = gateway(port).await;
    let user: Arc<str> = Arc::from(unique("js"));
    let bus = redis_bus().await;
    // A page of the gateway's own origin, as behind the deployment's proxy (SSE tickets are
    // fetched same-origin; the gateway sends no CORS headers).
    let browser = Browser::launch(&format!("http://127.0.0.1:{port}/healthz")).await;
    let mut page = browser.loaded_page("/healthz").await;
    let url = match transport {
        "sse" => format!("http://127.0.0.1:{port}/sse"),
        _ => format!("ws://127.0.0.1:{port}/ws"),
    };
    start_client(
        &mut page,
        &format!(
            r#"{{ url: "{url}", transport: "{transport}", getToken: () => "{}" }}"#,
            token(&user)
        ),
    )
    .await;

    publish(&bus, &user, 0..30).await;
    wait_for(&mut page, "live messages", |v| numbers(v).len() >= 30).await;

    // The gateway is killed; changes go on meanwhile; a new gateway comes up on the same port.
    stop(&mut server, "KILL").await;
    publish(&bus, &user, 30..60).await;
    server = gateway(port).await;
    wait_for(&mut page, "caught up after a kill", |v| {
        numbers(v).len() >= 60
    })
    .await;

    // A drained restart: the page is told when to come back, and resumes.
    stop(&mut server, "TERM").await;
    publish(&bus, &user, 60..90).await;
    server = gateway(port).await;
    let v = wait_for(&mut page, "caught up after a drain", |v| {
        numbers(v).len() >= 90
    })
    .await;
    assert_eq!(
        numbers(&v),
        (0..90).collect::<Vec<_>>(),
        "every change once, in order"
    );
    assert_eq!(
        v["resyncs"].as_array().map(Vec::len),
        Some(0),
        "nothing to refetch: {v}"
    );

    // The user's history is lost (its keys evicted): the page is told to refetch.
    let mut c = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(foldercast::bus::redis::keys::stream(&user))
        .arg(foldercast::bus::redis::keys::meta(&user))
        .query_async(&mut c)
        .await
        .unwrap();
    publish(&bus, &user, 90..91).await;
    let v = wait_for(&mut page, "told to refetch", |v| {
        v["resyncs"].as_array().is_some_and(|r| !r.is_empty()) && numbers(v).len() >= 91
    })
    .await;
    assert_eq!(v["resyncs"][0]["reason"], "unknown-epoch", "{v}");
    assert_eq!(numbers(&v), (0..91).collect::<Vec<_>>(), "{v}");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_page_survives_restarts_and_refetches_after_a_lost_history() {
    page_survives_restarts_and_refetches_after_a_lost_history("ws").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_page_survives_restarts_and_refetches_after_a_lost_history() {
    page_survives_restarts_and_refetches_after_a_lost_history("sse").await;
}

/// Notifications in the page: one that asks for an acknowledgement arrives (published while the
/// page was not there), `ack()` acknowledges it, and the next connect of the device no longer
/// brings it.
async fn page_acknowledges_a_notification(transport: &str) {
    let port = free_port();
    let _server = gateway(port).await;
    let user = unique("js-notice");
    let out = tokio::process::Command::new(common::bin())
        .args(["publish", "--redis", &redis_url(), "--user", &user])
        .args([
            "--title",
            "Sign the new policy",
            "--level",
            "critical",
            "--ack",
            "user",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let browser = Browser::launch(&format!("http://127.0.0.1:{port}/healthz")).await;
    let mut page = browser.loaded_page("/healthz").await;
    let module = std::fs::read(root().join("clients/js/foldercast.js")).unwrap();
    let module = base64::engine::general_purpose::STANDARD.encode(module);
    let url = match transport {
        "sse" => format!("http://127.0.0.1:{port}/sse"),
        _ => format!("ws://127.0.0.1:{port}/ws"),
    };
    let script = format!(
        r#"(async () => {{
            const m = await import("data:text/javascript;base64,{module}");
            window.notes = [];
            window.start = () => {{
                window.fc = m.connect({{ url: "{url}", transport: "{transport}", device: "tab", getToken: () => "{token}" }});
                fc.on("notification", (n, ack) => {{ notes.push(n.title); ack().then(() => notes.push("acked")); }});
            }};
            start();
            return "started";
        }})()"#,
        token = token(&user),
    );
    assert_eq!(page.eval(&script).await, "started");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let notes = page.eval("JSON.stringify(window.notes)").await;
        if notes.as_str() == Some(r#"["Sign the new policy","acked"]"#) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{transport}: {notes}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A new page session of the same device: nothing owed any more.
    page.eval("fc.close(); window.notes = []; start(); 'again'")
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while page.eval("window.fc.state").await != "connected" {
        assert!(tokio::time::Instant::now() < deadline, "reconnects");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(page.eval("JSON.stringify(window.notes)").await, "[]");
    if transport != "ws" {
        return;
    }
    // The page tells the server the position its device has (every 5 s); a page started
    // afresh, with no position of its own, resumes from there: only what came after.
    let publish = |title: &'static str| {
        let user = user.clone();
        async move {
            let out = tokio::process::Command::new(common::bin())
                .args([
                    "publish",
                    "--redis",
                    &redis_url(),
                    "--user",
                    &user,
                    "--title",
                    title,
                ])
                .output()
                .await
                .unwrap();
            assert!(out.status.success());
        }
    };
    publish("seen").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while page.eval("JSON.stringify(window.notes)").await != r#"["seen","acked"]"# {
        assert!(tokio::time::Instant::now() < deadline, "the seen notice");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(6000)).await;
    page.eval("fc.close(); 'closed'").await;
    publish("missed").await;
    page.eval("window.notes = []; start(); 'again'").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while page.eval("JSON.stringify(window.notes)").await != r#"["missed","acked"]"# {
        let notes = page.eval("JSON.stringify(window.notes)").await;
        assert!(
            tokio::time::Instant::now() < deadline,
            "resumed from the device's position: {notes}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_page_acknowledges_a_notification() {
    page_acknowledges_a_notification("ws").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_page_acknowledges_a_notification() {
    page_acknowledges_a_notification("sse").await;
}

/// A gateway on `redis` at `port`, with `extra` flags.
async fn gateway_on(redis: &str, port: u16, extra: &[&str]) -> Server {
    let mut args: Vec<String> = [
        "gateway",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--jwt-secret",
        SECRET,
        "--redis",
        redis,
        "--drain-spread",
        "1s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    Server::spawn(&args, false).await
}

/// Discovery in the page: the client asks `GET /api/endpoint` and connects to the gateway it
/// names (not the one serving the page); when that one drains, the client asks again, is named
/// none, and falls back to `url`, missing nothing and repeating nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_follows_discovery_and_falls_back_when_its_gateway_drains() {
    let redis = common::PrivateRedis::start();
    let (port_a, port_b) = (free_port(), free_port());
    let a = gateway_on(&redis.url(), port_a, &[]).await;
    let public_b = format!("http://127.0.0.1:{port_b}");
    let mut b = gateway_on(
        &redis.url(),
        port_b,
        &["--public-url", &public_b, "--heartbeat-every", "300ms"],
    )
    .await;
    let user: Arc<str> = Arc::from(unique("js-discovery"));
    let bus = RedisBus::connect(
        &RedisTarget::Standalone(redis.url()),
        RedisOptions::default(),
        None,
    )
    .await
    .unwrap();
    // B has advertised itself.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while reqwest::Client::new()
        .get(a.url("/api/endpoint"))
        .bearer_auth(token(&user))
        .send()
        .await
        .unwrap()
        .status()
        != 200
    {
        assert!(tokio::time::Instant::now() < deadline, "B never advertised");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let browser = Browser::launch(&format!("http://127.0.0.1:{port_a}/healthz")).await;
    let mut page = browser.loaded_page("/healthz").await;
    start_client(
        &mut page,
        &format!(
            r#"{{ discoveryUrl: "http://127.0.0.1:{port_a}/api/endpoint",
                  url: "ws://127.0.0.1:{port_a}/ws", getToken: () => "{}" }}"#,
            token(&user)
        ),
    )
    .await;
    assert_eq!(
        b.stats().await["connections"],
        1,
        "connected to the named gateway"
    );
    assert_eq!(a.stats().await["connections"], 0);
    publish(&bus, &user, 0..10).await;
    wait_for(&mut page, "live messages", |v| numbers(v).len() >= 10).await;

    // B drains: the page asks again, is named none (B withdrew), and comes back on A.
    stop(&mut b, "TERM").await;
    publish(&bus, &user, 10..20).await;
    let v = wait_for(&mut page, "caught up on the fallback", |v| {
        numbers(v).len() >= 20 && v["state"] == "connected"
    })
    .await;
    assert_eq!(
        numbers(&v),
        (0..20).collect::<Vec<_>>(),
        "once each, in order"
    );
    assert_eq!(a.stats().await["connections"], 1);
    assert!(v["resyncs"].as_array().is_some_and(Vec::is_empty), "{v}");
}
