//! ownCloud Web's own SSE client, unchanged: the `sse` export of the published npm package
//! `@ownclouders/web-client` (12.5.0, fetched by scripts/servers.sh) loaded in headless Chromium,
//! connected to the gateway's oCIS route, receives oCIS's fixture events (NATS → `consume
//! --nats` → Redis → gateway) under oCIS's event names with the payload its handlers read; a
//! coalesced message becomes one event per item, and a resync the reload ownCloud Web knows.
//! Resume on that route: a client that sends `Last-Event-ID` gets exactly what followed.

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use common::browser::{Browser, Cdp};
use common::libregraph::LibreGraph;
use common::nats::{
    EINSTEIN, MARIE, PHYSICS_GROUP, SPACE_UUID, Stream, drive, fixture_items, physics,
};
use common::sse::Sse;
use common::{PrivateRedis, SECRET, Server, free_port, root, server_env, token};
use foldercast::bus::{Bus, Outgoing, RedisBus, RedisOptions, RedisTarget};
use serde_json::{Value, json};

const ROUTE: &str = "/ocs/v2.php/apps/notifications/api/v1/notifications/sse";

async fn gateway(port: u16, redis: &str) -> Server {
    let args: Vec<String> = [
        "gateway",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--jwt-secret",
        SECRET,
        "--redis",
        redis,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Server::spawn(&args, false).await
}

async fn bus(redis: &str) -> Arc<RedisBus> {
    RedisBus::connect(
        &RedisTarget::Standalone(redis.to_owned()),
        RedisOptions::default(),
        None,
    )
    .await
    .unwrap()
}

/// What the page's client received: `[{type, data}]`.
async fn received(page: &mut Cdp) -> Vec<Value> {
    let text = page.eval("JSON.stringify(window.got || [])").await;
    serde_json::from_str(text.as_str().unwrap_or("[]")).unwrap_or_default()
}

async fn wait_for(page: &mut Cdp, count: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got = received(page).await;
        if got.len() >= count {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {count} events: {got:?}",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ownclouds_web_client_receives_ocis_events_with_the_payload_its_handlers_read() {
    let graph = LibreGraph::start().await;
    physics(&graph);
    fixture_items(&graph);
    let redis = PrivateRedis::start();
    let port = free_port();
    let _server = gateway(port, &redis.url()).await;

    // A page of the gateway's origin (as behind oCIS's proxy), the package's module as it is.
    let browser = Browser::launch(&format!("http://127.0.0.1:{port}/healthz")).await;
    let mut page = browser.loaded_page("/healthz").await;
    let module = std::fs::read(server_env("FOLDERCAST_TEST_WEB_CLIENT")).unwrap();
    let module = base64::engine::general_purpose::STANDARD.encode(module);
    let started = page
        .eval(&format!(
            r#"(async () => {{
                const m = await import("data:text/javascript;base64,{module}");
                window.got = [];
                // As ownCloud Web does: the server's base URL, a bearer token in the headers.
                window.client = m.sse(location.origin + "/", {{ headers: {{ Authorization: "Bearer {token}" }} }});
                // (its readyState constants are declared but never set: onopen tells instead)
                window.opened = false;
                client.onopen = () => {{ window.opened = true; }};
                for (const type of Object.values(m.MESSAGE_TYPE)) {{
                    client.addEventListener(type, (e) => got.push({{ type, data: JSON.parse(e.data) }}));
                }}
                return "started";
            }})()"#,
            token = token(EINSTEIN),
        ))
        .await;
    assert_eq!(started, "started");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while page.eval("window.opened").await != json!(true) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the client never opened"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let stream = Stream::new();
    stream
        .load(&root().join("fixtures/ocis/events.jsonl"))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("consume.log");
    let _consumer = stream.consume(&graph, &redis.url(), &["--user-rate", "0"], &log);
    let got = wait_for(&mut page, 10).await;
    let names: Vec<&str> = got.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "folder-created",
            "file-touched",
            "postprocessing-finished",
            "item-renamed",
            "item-trashed",
            "space-member-added",
            "space-member-removed",
            "folder-created",
            "item-restored",
            "postprocessing-finished",
        ],
        "{got:?}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let space = drive();
    let reports = format!("{space}!7d2e");
    let q1 = format!("{space}!9f1c0e3a");
    let root_id = format!("{space}!{SPACE_UUID}");
    let data = |i: usize| got[i]["data"].clone();
    // Exactly the keys oCIS's FileEvent has.
    for e in &got {
        let keys: Vec<&String> = e["data"].as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "affecteduserids",
                "etag",
                "initiatorid",
                "itemid",
                "parentitemid",
                "spaceid"
            ],
            "{e}"
        );
    }
    // The folder: its ids (for getFileInfo by fileId), the tab that made it (skipped by that
    // tab), its parent (isItemInCurrentFolder).
    assert_eq!(
        data(0),
        json!({"parentitemid": root_id, "itemid": reports, "spaceid": space,
               "initiatorid": "tab-einstein", "etag": "\"7d2e\"", "affecteduserids": null})
    );
    // The upload: parent and item ids and the etag the handler compares.
    assert_eq!(
        data(2),
        json!({"parentitemid": reports, "itemid": q1, "spaceid": space,
               "initiatorid": "", "etag": "\"9f1c0e3a\"", "affecteduserids": null})
    );
    assert_eq!(data(3)["itemid"], q1.as_str());
    assert_eq!(data(4)["itemid"], q1.as_str());
    assert_eq!(data(8)["itemid"], q1.as_str(), "restored");
    assert_eq!(data(5)["affecteduserids"], json!([MARIE]));
    assert_eq!(data(5)["spaceid"], space.as_str());
    assert_eq!(
        data(6)["affecteduserids"],
        json!([]),
        "a group: {PHYSICS_GROUP}"
    );

    // A coalesced message (rate limit) becomes one event per item; a resync, the reload of the
    // space ownCloud Web does on space-share-updated naming its user.
    let bus = bus(&redis.url()).await;
    let user: Arc<str> = Arc::from(EINSTEIN);
    let coalesced = json!({"type": "coalesced", "space_id": space, "actor": null, "time": "2026-11-30T08:01:00Z",
        "event_ids": ["c1", "c2"], "items": [
            {"type": "file-uploaded", "event_id": "c1", "path": "/reports/a.txt", "old_path": null, "kind": "file",
             "size": 5, "item_id": format!("{space}!a"), "parent_id": reports, "etag": "\"a\""},
            {"type": "item-moved", "event_id": "c2", "path": "/b.txt", "old_path": "/reports/b.txt", "kind": "file",
             "size": 7, "item_id": format!("{space}!b"), "parent_id": root_id, "etag": "\"b\""}],
        "folders": []});
    let resync = json!({"type": "resync", "space_id": space, "actor": null, "time": "2026-11-30T08:02:00Z",
        "event_id": "c3", "reason": "backlog", "skipped": 4});
    for (message, id) in [(coalesced, "c2"), (resync, "c3")] {
        let out = Outgoing::for_event(
            user.clone(),
            Bytes::from(message.to_string()),
            Some(Arc::from(id)),
        );
        bus.publish(&[out]).await.unwrap();
    }
    let got = wait_for(&mut page, 13).await;
    let names: Vec<&str> = got[10..]
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "postprocessing-finished",
            "item-moved",
            "space-share-updated"
        ]
    );
    assert_eq!(got[10]["data"]["itemid"], format!("{space}!a"));
    assert_eq!(got[10]["data"]["parentitemid"], reports.as_str());
    assert_eq!(got[12]["data"]["affecteduserids"], json!([EINSTEIN]));
    assert_eq!(got[12]["data"]["spaceid"], space.as_str());
    stream.until_all_acknowledged(&log).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ocis_route_resumes_from_last_event_id() {
    let redis = PrivateRedis::start();
    let port = free_port();
    let server = gateway(port, &redis.url()).await;
    let bus = bus(&redis.url()).await;
    let user: Arc<str> = Arc::from(common::unique("web"));
    let publish = |n: u32| {
        let message = json!({"event_id": format!("e{n}"), "type": "folder-created", "space_id": "s$p",
            "actor": null, "time": "2026-11-30T08:00:00Z",
            "item": {"path": format!("/f{n}"), "old_path": null, "kind": "folder", "size": 0,
                     "item_id": format!("s$p!f{n}"), "etag": null}, "folders": []});
        Outgoing::for_event(
            user.clone(),
            Bytes::from(message.to_string()),
            Some(Arc::from(format!("e{n}"))),
        )
    };
    for n in 0..5 {
        bus.publish(&[publish(n)]).await.unwrap();
    }
    let open = |last: Option<String>| {
        let url = server.url(ROUTE);
        let user = user.clone();
        async move {
            let mut request = reqwest::Client::new()
                .get(url)
                .bearer_auth(token(&user))
                .header("Accept", "text/event-stream");
            if let Some(last) = last {
                request = request.header("Last-Event-ID", last);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            assert!(
                response.headers()["content-type"]
                    .to_str()
                    .unwrap()
                    .starts_with("text/event-stream")
            );
            Sse::new(response)
        }
    };
    // From the start of the history: nothing (a first connect starts live, as oCIS does).
    let mut first = open(None).await;
    bus.publish(&[publish(5)]).await.unwrap();
    let e = first.next_event().await.unwrap();
    assert_eq!(e.event.as_deref(), Some("folder-created"));
    assert_eq!(
        serde_json::from_str::<Value>(&e.data).unwrap()["itemid"],
        "s$p!f5"
    );
    let position = e.id.clone().expect("an id: line");
    drop(first);

    // Missed while away: exactly what followed the last id, in order.
    for n in 6..9 {
        bus.publish(&[publish(n)]).await.unwrap();
    }
    let mut again = open(Some(position)).await;
    for n in 6..9 {
        let e = again.next_event().await.unwrap();
        let data: Value = serde_json::from_str(&e.data).unwrap();
        assert_eq!(data["itemid"], format!("s$p!f{n}"));
    }
    // No token: refused as oCIS's proxy would.
    let refused = reqwest::get(server.url(ROUTE)).await.unwrap();
    assert_eq!(refused.status(), 401);
}
