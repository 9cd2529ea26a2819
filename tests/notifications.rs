//! Notifications published by operators, through the real binary: `POST /api/notifications` on
//! a gateway (admin tokens only, idempotency keys, limits) and `foldercast publish` (groups,
//! spaces, everyone from the fixture or from oCIS's paged user list), delivered over Redis to
//! WebSocket clients, kept in each user's history for those who were away.

mod common;

use std::time::Duration;

use common::libregraph::LibreGraph;
use common::pipeline::{Redis, Ws, connect, gateway, next_frame};
use common::{PrivateRedis, Schemas, assert_valid, bin, demo_membership, token, unique};
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const ADMIN: &str = "ops-0123456789abcdef0123456789abcdef";

struct Setup {
    redis: PrivateRedis,
    server: common::Server,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let admins = dir.path().join("admins");
    std::fs::write(&admins, format!("# operators\nops:{ADMIN}\n")).unwrap();
    let redis = PrivateRedis::start();
    let membership = demo_membership();
    let server = gateway(
        &Redis::Standalone(redis.url()),
        &[
            "--admin-token-file",
            admins.to_str().unwrap(),
            "--membership",
            membership.to_str().unwrap(),
        ],
    )
    .await;
    Setup {
        redis,
        server,
        _dir: dir,
    }
}

async fn post(
    server: &common::Server,
    bearer: Option<&str>,
    key: Option<&str>,
    body: String,
) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(server.url("/api/notifications"))
        .header("content-type", "application/json")
        .body(body);
    if let Some(b) = bearer {
        request = request.bearer_auth(b);
    }
    if let Some(k) = key {
        request = request.header("Idempotency-Key", k);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The notifications a client received before the pong of a ping.
async fn notifications(ws: &mut Ws) -> Vec<Value> {
    ws.send(Message::Text(json!({"type": "ping"}).to_string().into()))
        .await
        .unwrap();
    let mut got = Vec::new();
    loop {
        let f = next_frame(ws, Duration::from_secs(10))
            .await
            .expect("a pong");
        if f["type"] == "pong" {
            return got;
        }
        if f["type"] == "event" && f["data"]["type"] == "notification" {
            got.push(f["data"].clone());
        }
    }
}

/// The position of the next event frame.
async fn next_event_position(ws: &mut Ws) -> String {
    loop {
        let f = next_frame(ws, Duration::from_secs(10)).await.unwrap();
        if f["type"] == "event" {
            return f["id"].as_str().unwrap().to_owned();
        }
    }
}

/// Waits for `n` notifications.
async fn wait_notifications(ws: &mut Ws, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    while got.len() < n {
        let f = next_frame(ws, Duration::from_secs(15))
            .await
            .expect("a notification in time");
        if f["type"] == "event" && f["data"]["type"] == "notification" {
            got.push(f["data"].clone());
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_publish_over_http_to_users_groups_spaces_and_everyone() {
    let s = setup().await;
    let schemas = Schemas::load();
    let mut alice = connect(&s.server, "alice").await;
    let mut bob = connect(&s.server, "bob").await;
    let mut frank = connect(&s.server, "frank").await;

    // To one user: only she receives it, as the schema says, watches or not.
    let request = json!({"title": "Your quota is almost full", "body": "95 % used", "level": "warning",
                         "link": "https://cloud.example.com/settings", "targets": {"users": ["alice"]}});
    assert_valid(&schemas.notification_request, &request, "a request");
    let (status, answer) = post(&s.server, Some(ADMIN), None, request.to_string()).await;
    assert_eq!(status, 200, "{answer}");
    assert_valid(&schemas.notification_response, &answer, "an answer");
    assert_eq!(
        (answer["targeted"].as_u64(), &answer["replayed"]),
        (Some(1), &json!(false))
    );
    let got = wait_notifications(&mut alice, 1).await;
    assert_valid(&schemas.message, &got[0], "a notification");
    assert_eq!(got[0]["title"], "Your quota is almost full");
    assert_eq!(got[0]["level"], "warning");
    assert_eq!(got[0]["notification_id"], answer["notification_id"]);
    assert_eq!(got[0]["ack"], Value::Null);
    assert!(notifications(&mut bob).await.is_empty());

    // A group, and a space's members who may list it: frank (an uploader of s-eng) is not one.
    // bob watches a folder: notifications pass every watch.
    bob.send(Message::Text(
        json!({"type": "watch", "space_id": "s-eng", "path": "/projects"})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    assert!(notifications(&mut bob).await.is_empty());
    let (status, answer) = post(
        &s.server,
        Some(ADMIN),
        None,
        json!({"title": "s-eng moves to new storage", "targets": {"groups": ["engineering"], "spaces": ["s-eng"]}})
            .to_string(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["targeted"], 3, "alice, bob, carol: {answer}");
    assert_eq!(
        answer["resolved"],
        json!([{"kind": "group", "id": "engineering", "users": 2}, {"kind": "space", "id": "s-eng", "users": 3}])
    );
    assert_eq!(wait_notifications(&mut bob, 1).await.len(), 1);
    assert_eq!(wait_notifications(&mut alice, 1).await.len(), 1);
    assert!(
        notifications(&mut frank).await.is_empty(),
        "an uploader is no lister"
    );

    // Everyone the directory knows, not only who is connected; said so in the answer.
    let (status, answer) = post(
        &s.server,
        Some(ADMIN),
        None,
        json!({"title": "Maintenance at 22:00", "level": "critical", "ack": "user", "targets": {"all": true}}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["targeted"], 6);
    assert_eq!(
        answer["resolved"][0]["source"],
        "the membership file's users"
    );
    let got = wait_notifications(&mut frank, 1).await;
    assert_eq!(
        (&got[0]["level"], &got[0]["ack"]),
        (&json!("critical"), &json!("user"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admin_tokens_publish_within_limits_and_a_retried_key_is_a_no_op() {
    let s = setup().await;
    let body = json!({"title": "Hello", "targets": {"users": ["carol"]}}).to_string();
    // No token, a user's token, a made-up one.
    assert_eq!(post(&s.server, None, None, body.clone()).await.0, 401);
    let (status, answer) = post(&s.server, Some(&token("alice")), None, body.clone()).await;
    assert_eq!((status, &answer["code"]), (403, &json!("forbidden")));
    assert_eq!(
        post(&s.server, Some(&"x".repeat(36)), None, body.clone())
            .await
            .0,
        403
    );
    // Too large, malformed, no target, an unknown group.
    let huge =
        json!({"title": "Hi", "body": "x".repeat(70 * 1024), "targets": {"all": true}}).to_string();
    let (status, answer) = post(&s.server, Some(ADMIN), None, huge).await;
    assert_eq!(
        (status, &answer["code"]),
        (413, &json!("too-large")),
        "{answer}"
    );
    let (status, answer) = post(&s.server, Some(ADMIN), None, "{not json".into()).await;
    assert_eq!((status, &answer["code"]), (400, &json!("bad-notification")));
    let (status, answer) = post(
        &s.server,
        Some(ADMIN),
        None,
        json!({"title": "Hi", "targets": {}}).to_string(),
    )
    .await;
    assert_eq!((status, &answer["code"]), (400, &json!("no-targets")));
    let (status, answer) = post(
        &s.server,
        Some(ADMIN),
        None,
        json!({"title": "Hi", "targets": {"groups": ["nope"]}}).to_string(),
    )
    .await;
    assert_eq!(
        (status, &answer["code"]),
        (404, &json!("unknown-group")),
        "{answer}"
    );

    // The same key twice: one notification, the first answer again.
    let mut carol = connect(&s.server, "carol").await;
    let key = unique("key");
    let (status, first) = post(&s.server, Some(ADMIN), Some(&key), body.clone()).await;
    assert_eq!(status, 200, "{first}");
    let (status, again) = post(&s.server, Some(ADMIN), Some(&key), body.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(again["replayed"], true);
    assert_eq!(again["notification_id"], first["notification_id"]);
    assert_eq!(again["targeted"], first["targeted"]);
    assert_eq!(wait_notifications(&mut carol, 1).await.len(), 1);
    assert!(notifications(&mut carol).await.is_empty(), "delivered once");

    // Per admin, 30 a minute.
    let mut limited = 0;
    for _ in 0..40 {
        if post(&s.server, Some(ADMIN), None, body.clone()).await.0 == 429 {
            limited += 1;
        }
    }
    assert!(limited >= 8, "{limited} of 40 refused");
    drop(s.redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_away_when_it_was_published_gets_it_on_resume() {
    let s = setup().await;
    let mut dave = connect(&s.server, "dave").await;
    // Where dave's client was: the position of its last frame (here: a notification).
    let (_, _) = post(
        &s.server,
        Some(ADMIN),
        None,
        json!({"title": "first", "targets": {"users": ["dave"]}}).to_string(),
    )
    .await;
    let position = next_event_position(&mut dave).await;
    drop(dave);
    let (status, answer) = post(
        &s.server,
        Some(ADMIN),
        None,
        json!({"title": "while you were away", "targets": {"users": ["dave"]}}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let mut back = testkit::ws::open(
        &s.server.ws_url(&format!("/ws?since={position}")),
        Some(&token("dave")),
        None,
    )
    .await
    .unwrap();
    let got = wait_notifications(&mut back, 1).await;
    assert_eq!(got[0]["title"], "while you were away");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_publishes_to_everyone_ocis_lists_over_its_pages() {
    let graph = LibreGraph::start().await;
    let users: Vec<String> = (0..10_000).map(|n| format!("user-{n:05}")).collect();
    graph.users(users, 1000);
    let redis = PrivateRedis::start();
    let server = gateway(&Redis::Standalone(redis.url()), &[]).await;
    let mut last = connect(&server, "user-09999").await;
    let out = tokio::process::Command::new(bin())
        .args([
            "publish",
            "--redis",
            &redis.url(),
            "--ocis-url",
            &graph.url,
            "--all",
        ])
        .args(["--title", "Welcome to the new storage", "--level", "info"])
        .env("FOLDERCAST_OCIS_TOKEN", "admin-token")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_valid(
        &Schemas::load().notification_response,
        &answer,
        "the CLI's answer",
    );
    assert_eq!(answer["targeted"], 10_000);
    assert_eq!(
        answer["resolved"][0]["source"],
        "oCIS's users (GET /graph/v1.0/users)"
    );
    assert_eq!(graph.calls("users"), 10, "ten pages of 1,000");
    let got = wait_notifications(&mut last, 1).await;
    assert_eq!(got[0]["title"], "Welcome to the new storage");

    // Without a directory, only named users; groups are refused with the reason.
    let out = tokio::process::Command::new(bin())
        .args([
            "publish",
            "--redis",
            &redis.url(),
            "--group",
            "eng",
            "--title",
            "x",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-directory"));
}

/// Connects `user` as `device`; returns the socket and the notifications owed at connect
/// (the `notification` frames before the pong of a first ping).
async fn connect_device(server: &common::Server, user: &str, device: &str) -> (Ws, Vec<Value>) {
    let mut ws = testkit::ws::open(
        &server.ws_url(&format!("/ws?device={device}")),
        Some(&token(user)),
        None,
    )
    .await
    .unwrap();
    ws.send(Message::Text(json!({"type": "ping"}).to_string().into()))
        .await
        .unwrap();
    let mut owed = Vec::new();
    loop {
        let f = next_frame(&mut ws, Duration::from_secs(10))
            .await
            .expect("a pong");
        match f["type"].as_str() {
            Some("pong") => return (ws, owed),
            Some("notification") => owed.push(f["data"].clone()),
            _ => {}
        }
    }
}

/// Sends an ack frame; the answer (`acked` or an error).
async fn ack(ws: &mut Ws, id: &str) -> Value {
    ws.send(Message::Text(
        json!({"type": "ack", "notification_id": id})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    loop {
        let f = next_frame(ws, Duration::from_secs(10))
            .await
            .expect("an answer");
        if f["type"] == "acked" || f["type"] == "error" {
            return f;
        }
    }
}

/// `foldercast_notifications_pending` on the gateway's /metrics, once `done` holds (it is
/// refreshed every 5 s).
async fn pending_notices(server: &common::Server, done: impl Fn(f64) -> bool) -> f64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let text = reqwest::get(server.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let n = text
            .lines()
            .find_map(|l| l.strip_prefix("foldercast_notifications_pending "))
            .and_then(|v| v.trim().parse::<f64>().ok());
        if let Some(n) = n
            && done(n)
        {
            return n;
        }
        assert!(tokio::time::Instant::now() < deadline, "pending: {n:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_critical_notice_comes_on_every_connect_until_one_device_acknowledges_it() {
    let s = setup().await;
    let schemas = Schemas::load();
    // Published while alice is offline.
    let (status, answer) = post(
        &s.server,
        Some(ADMIN),
        None,
        json!({"title": "Password expires today", "level": "critical", "ack": "user", "targets": {"users": ["alice"]}})
            .to_string(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let id = answer["notification_id"].as_str().unwrap().to_owned();
    // /metrics counts it pending for alice, with another one owed by bob and dave.
    let (status, _) = post(
        &s.server,
        Some(ADMIN),
        None,
        json!({"title": "Read the handbook", "ack": "user", "targets": {"users": ["bob", "dave"]}})
            .to_string(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(pending_notices(&s.server, |n| n == 3.0).await, 3.0);
    let (laptop, owed) = connect_device(&s.server, "alice", "laptop").await;
    assert_eq!(owed.len(), 1);
    assert_valid(&schemas.message, &owed[0], "an owed notification");
    assert_eq!(
        (&owed[0]["notification_id"], &owed[0]["ack"]),
        (&json!(id), &json!("user"))
    );
    drop(laptop);
    let (mut laptop, owed) = connect_device(&s.server, "alice", "laptop").await;
    assert_eq!(owed.len(), 1, "again, until acknowledged");
    // Another user cannot acknowledge it; alice can, twice (idempotent).
    let (mut bob, _) = connect_device(&s.server, "bob", "laptop").await;
    let refused = ack(&mut bob, &id).await;
    assert_eq!(
        (&refused["type"], &refused["code"]),
        (&json!("error"), &json!("unknown-notification"))
    );
    let answer = ack(&mut laptop, &id).await;
    assert_valid(&schemas.server_frame, &answer, "an acked frame");
    assert_eq!(answer, json!({"type": "acked", "notification_id": id}));
    assert_eq!(ack(&mut laptop, &id).await["type"], "acked", "idempotent");
    // One pair fewer pending, counted once though acknowledged twice.
    assert_eq!(pending_notices(&s.server, |n| n == 2.0).await, 2.0);
    drop(laptop);
    // Any one device's acknowledgement is enough: the phone is not told either.
    let (_phone, owed) = connect_device(&s.server, "alice", "phone").await;
    assert!(owed.is_empty(), "{owed:?}");
    let (_laptop, owed) = connect_device(&s.server, "alice", "laptop").await;
    assert!(owed.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_action_reaches_each_device_until_it_acknowledges_and_expires_after_retention() {
    let s = setup().await;
    let out = tokio::process::Command::new(bin())
        .args([
            "publish",
            "--redis",
            &s.redis.url(),
            "--user",
            "bob",
            "--title",
            "Wipe /secret",
        ])
        .args([
            "--level",
            "critical",
            "--ack",
            "device",
            "--critical-retention",
            "4s",
        ])
        .args(["--action", r#"{"action":"wipe","path":"/secret"}"#])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = answer["notification_id"].as_str().unwrap().to_owned();
    let (mut d1, owed) = connect_device(&s.server, "bob", "d1").await;
    assert_eq!(owed.len(), 1);
    assert_eq!(
        owed[0]["action"],
        json!({"action": "wipe", "path": "/secret"})
    );
    assert_eq!(ack(&mut d1, &id).await["type"], "acked");
    drop(d1);
    let (_d1, owed) = connect_device(&s.server, "bob", "d1").await;
    assert!(owed.is_empty(), "d1 confirmed it");
    let (_d2, owed) = connect_device(&s.server, "bob", "d2").await;
    assert_eq!(owed.len(), 1, "d2 has not");
    // A device that first connects later still owes it, within the retention…
    let (_d3, owed) = connect_device(&s.server, "bob", "d3").await;
    assert_eq!(owed.len(), 1);
    // …and nobody after it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (_d4, owed) = connect_device(&s.server, "bob", "d4").await;
    assert!(owed.is_empty(), "expired after --critical-retention");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_survive_gateway_and_redis_restarts_and_sse_clients_acknowledge_over_http()
{
    let dir = tempfile::tempdir().unwrap();
    let admins = dir.path().join("admins");
    std::fs::write(&admins, format!("ops:{ADMIN}\n")).unwrap();
    let mut redis = PrivateRedis::start_with(
        common::free_port(),
        &["--appendonly", "yes", "--appendfsync", "always"],
    );
    let membership = demo_membership();
    let start = |url: String| {
        let admins = admins.clone();
        let membership = membership.clone();
        async move {
            gateway(
                &Redis::Standalone(url),
                &[
                    "--admin-token-file",
                    admins.to_str().unwrap(),
                    "--membership",
                    membership.to_str().unwrap(),
                ],
            )
            .await
        }
    };
    let server = start(redis.url()).await;
    let (status, answer) = post(
        &server,
        Some(ADMIN),
        None,
        json!({"title": "Read the new policy", "ack": "user", "targets": {"users": ["carol", "dave"]}}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let id = answer["notification_id"].as_str().unwrap().to_owned();
    // carol acknowledges (over SSE + HTTP); dave does not.
    let mut sse = common::sse::Sse::new(
        common::sse::Sse::open(&server.url("/sse?device=browser"), Some(&token("carol"))).await,
    );
    let owed = loop {
        let e = sse.next().await.expect("events");
        if e.event.as_deref() == Some("notification") {
            break e;
        }
    };
    let data: Value = serde_json::from_str(&owed.data).unwrap();
    assert_eq!(data["notification_id"], id.as_str());
    let acked = reqwest::Client::new()
        .post(server.url(&format!("/api/notifications/{id}/ack?device=browser")))
        .bearer_auth(token("carol"))
        .send()
        .await
        .unwrap();
    assert_eq!(acked.status(), 200);
    let other = reqwest::Client::new()
        .post(server.url("/api/notifications/n-nope/ack"))
        .bearer_auth(token("carol"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    drop(sse);
    drop(server);

    // Redis restarts (append-only file) and a new gateway comes up.
    redis.restart();
    let server = start(redis.url()).await;
    let (_carol, owed) = connect_device(&server, "carol", "browser").await;
    assert!(owed.is_empty(), "an acknowledged notice never comes back");
    let (_dave, owed) = connect_device(&server, "dave", "phone").await;
    assert_eq!(owed.len(), 1, "an unacknowledged one is not lost");
    assert_eq!(owed[0]["notification_id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_resumes_where_it_acknowledged_and_lists_only_its_users_devices() {
    let s = setup().await;
    let publish = |title: &'static str| {
        let server = &s.server;
        async move {
            let (status, answer) = post(
                server,
                Some(ADMIN),
                None,
                json!({"title": title, "targets": {"users": ["erin"]}}).to_string(),
            )
            .await;
            assert_eq!(status, 200, "{answer}");
        }
    };
    // The desktop app receives one message and acknowledges its position.
    let (mut desktop, _) = connect_device(&s.server, "erin", "desktop").await;
    publish("one").await;
    let position = next_event_position(&mut desktop).await;
    desktop
        .send(Message::Text(
            json!({"type": "ack", "position": position})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
    assert!(notifications(&mut desktop).await.is_empty());
    // A malformed ack is an error frame, and the connection stays.
    desktop
        .send(Message::Text(
            json!({"type": "ack", "position": "nonsense"})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
    let f = next_frame(&mut desktop, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        (&f["type"], &f["code"]),
        (&json!("error"), &json!("bad-frame"))
    );
    drop(desktop);
    publish("two").await;
    publish("three").await;

    // The app restarts without a position of its own: it resumes where the device acknowledged.
    let mut back = testkit::ws::open(
        &s.server.ws_url("/ws?device=desktop"),
        Some(&token("erin")),
        None,
    )
    .await
    .unwrap();
    let got = wait_notifications(&mut back, 2).await;
    let titles: Vec<&str> = got.iter().map(|n| n["title"].as_str().unwrap()).collect();
    assert_eq!(
        titles,
        ["two", "three"],
        "exactly what followed the acknowledged position"
    );

    // Devices are per user: erin sees hers, alice none of them.
    let list = |user: &'static str| {
        let url = s.server.url("/api/devices");
        async move {
            reqwest::Client::new()
                .get(url)
                .bearer_auth(token(user))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let erin = list("erin").await;
    assert_eq!(erin["devices"][0]["device"], "desktop");
    assert_eq!(
        erin["devices"][0]["acknowledged_position"],
        position.as_str()
    );
    assert!(
        list("alice").await["devices"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let delete = |user: &'static str| {
        let url = s.server.url("/api/devices/desktop");
        async move {
            reqwest::Client::new()
                .delete(url)
                .bearer_auth(token(user))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(delete("alice").await, 404, "not hers");
    assert_eq!(delete("erin").await, 204);
    assert!(
        !list("erin").await["devices"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["device"] == "desktop")
    );
    // A client inventing a device per connection does not grow erin's record without bound.
    for n in 0..70 {
        let _ = connect_device(&s.server, "erin", &format!("tab-{n}")).await;
    }
    let devices = list("erin").await;
    let names: Vec<&str> = devices["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 64, "{names:?}");
    assert!(
        names.contains(&"tab-69") && !names.contains(&"tab-0"),
        "the least recent go"
    );
}

/// The embedded default (`run`: the in-process bus) keeps the same contract: publishing,
/// idempotency keys, notices owed until acknowledged, devices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_default_publishes_and_keeps_notices_until_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let admins = dir.path().join("admins");
    std::fs::write(&admins, format!("ops:{ADMIN}\n")).unwrap();
    let server = common::Server::start(&["--admin-token-file", admins.to_str().unwrap()]).await;
    let mut bob = connect(&server, "bob").await;
    let key = unique("run");
    let body = json!({"title": "Down at noon", "level": "critical", "ack": "device",
                      "targets": {"groups": ["engineering"]}})
    .to_string();
    let (status, first) = post(&server, Some(ADMIN), Some(&key), body.clone()).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["targeted"], 2, "bob and carol");
    let (_, again) = post(&server, Some(ADMIN), Some(&key), body).await;
    assert_eq!(again["replayed"], true);
    let live = wait_notifications(&mut bob, 1).await;
    assert_eq!(live[0]["title"], "Down at noon");
    assert!(notifications(&mut bob).await.is_empty(), "once");
    let id = first["notification_id"].as_str().unwrap().to_owned();
    let (mut carol, owed) = connect_device(&server, "carol", "phone").await;
    assert_eq!(owed.len(), 1);
    assert_eq!(ack(&mut carol, &id).await["type"], "acked");
    drop(carol);
    let (_carol, owed) = connect_device(&server, "carol", "phone").await;
    assert!(owed.is_empty());
    let (_carol_laptop, owed) = connect_device(&server, "carol", "laptop").await;
    assert_eq!(owed.len(), 1, "per device");
}

/// The same on the 3-node Redis Cluster: idempotency records, owed notices (a batch of users
/// spans slots), devices and the downtime schedule each stay within a slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_devices_and_downtimes_work_on_a_redis_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let admins = dir.path().join("admins");
    std::fs::write(&admins, format!("ops:{ADMIN}\n")).unwrap();
    let nodes = common::redis_cluster_nodes();
    let server = gateway(
        &Redis::Cluster(nodes.clone()),
        &["--admin-token-file", admins.to_str().unwrap()],
    )
    .await;
    let users: Vec<String> = (0..20).map(|n| unique(&format!("cl{n}"))).collect();
    let key = unique("cluster-key");
    let body = json!({"title": "Cluster notice", "ack": "device", "targets": {"users": users}})
        .to_string();
    let (status, first) = post(&server, Some(ADMIN), Some(&key), body.clone()).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["targeted"], 20);
    let (_, again) = post(&server, Some(ADMIN), Some(&key), body).await;
    assert_eq!(again["replayed"], true);
    let id = first["notification_id"].as_str().unwrap().to_owned();
    for user in [&users[0], &users[19]] {
        let (mut ws, owed) = connect_device(&server, user, "d1").await;
        assert_eq!(owed.len(), 1, "{user}");
        assert_eq!(ack(&mut ws, &id).await["type"], "acked");
        drop(ws);
        let (_ws, owed) = connect_device(&server, user, "d1").await;
        assert!(owed.is_empty());
    }
    let devices: Value = reqwest::Client::new()
        .get(server.url("/api/devices"))
        .bearer_auth(token(&users[0]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(devices["devices"][0]["device"], "d1", "{devices}");

    // A downtime's first announcement goes out from the cluster's schedule.
    let mut ws = connect(&server, &users[5]).await;
    let now = chrono::Utc::now();
    let scheduled = reqwest::Client::new()
        .post(server.url("/api/downtimes"))
        .bearer_auth(ADMIN)
        .json(
            &json!({"from": (now + chrono::Duration::seconds(30)).to_rfc3339(),
                      "until": (now + chrono::Duration::seconds(90)).to_rfc3339(),
                      "targets": {"users": [&users[5]]}, "steps": []}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(scheduled.status(), 200);
    let got = wait_notifications(&mut ws, 1).await;
    assert!(got[0].get("downtime").is_some(), "{got:?}");
    let id = scheduled.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let cancelled = reqwest::Client::new()
        .delete(server.url(&format!("/api/downtimes/{id}")))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 204);
}

/// `--log-format json`: every log line is one JSON object a collector can read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let redis = PrivateRedis::start();
    let out = tokio::process::Command::new(bin())
        .args([
            "publish",
            "--redis",
            &redis.url(),
            "--user",
            "zoe",
            "--title",
            "t",
        ])
        .args(["--log-format", "json", "--log", "info"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let published = lines
        .iter()
        .find(|l| l["fields"]["message"] == "notification published")
        .expect("the publish is logged");
    assert_eq!(published["level"], "INFO");
    assert_eq!(published["fields"]["targeted"], 1);
}
