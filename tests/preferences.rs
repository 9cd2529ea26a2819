//! Per-user preferences through the real binary: `GET`/`PUT /api/preferences` (a user's own),
//! applied by the consumer before publishing (in-process, and `consume` against Kafka and
//! Redis, where muted messages never reach the user's stream), and by the notification
//! publisher, where critical notices ignore them.

mod common;

use std::time::Duration;

use common::pipeline::{Redis, connect, consume_with, gateway, next_frame, produce, topic};
use common::ws::{self, Got, Ws};
use common::{Schemas, Server, assert_valid, demo_membership, redis_url, token, unique};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(15);
/// An operator's static bearer token (`--admin-token-file`).
const ADMIN_TOKEN: &str = "ops-0123456789abcdef0123456789abcdef";

fn event(id: &str, kind: &str, space: &str, path: &str) -> String {
    format!(
        r#"{{"id":"{id}","type":"{kind}","time":"2026-11-22T10:00:00Z","data":{{"space_id":"{space}","path":"{path}","kind":"file","size":3}}}}"#
    ) + "\n"
}

async fn put(server: &Server, user: &str, body: &Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .put(server.url("/api/preferences"))
        .bearer_auth(token(user))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn get(server: &Server, bearer: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new().get(server.url("/api/preferences"));
    if let Some(b) = bearer {
        request = request.bearer_auth(b);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Waits until `ws` has received an event with id `last`; returns every event id up to it.
async fn until(ws: &mut Ws, last: &str) -> Vec<String> {
    let mut ids = Vec::new();
    loop {
        match ws::next(ws, WAIT).await {
            Got::Frame(f) if f["type"] == "event" || f["type"] == "notification" => {
                let id = f["data"]["event_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let done = id == last;
                ids.push(id);
                if done {
                    return ids;
                }
            }
            Got::Frame(_) => {}
            other => panic!("waiting for {last}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_mute_spaces_and_choose_types_for_themselves_only() {
    let schemas = Schemas::load();
    let dir = tempfile::tempdir().unwrap();
    let admins = dir.path().join("admins");
    std::fs::write(&admins, format!("ops:{ADMIN_TOKEN}\n")).unwrap();
    let mut server = Server::start(&[
        "--user-rate",
        "0",
        "--admin-token-file",
        admins.to_str().unwrap(),
    ])
    .await;

    // Nothing set: the default, and what may be chosen.
    let (status, none) = get(&server, Some(&token("alice"))).await;
    assert_eq!(status, 200, "{none}");
    assert_eq!(none["user"], "alice");
    assert_eq!(none["muted_spaces"], json!([]));
    assert_eq!(none["types"], Value::Null);
    assert!(none["choosable_types"].as_array().unwrap().len() >= 9);
    assert_eq!(get(&server, None).await.0, 401, "a token is needed");

    // Bad documents are refused with a reason; another user's cannot be set.
    for bad in [
        json!({"types": ["resync"]}),
        json!({"types": ["nope"]}),
        json!({"muted_spaces": [""]}),
        json!({"mute": ["s-mkt"]}),
    ] {
        let (status, body) = put(&server, "alice", &bad).await;
        assert_eq!(status, 400, "{bad}");
        assert_eq!(body["code"], "bad-preferences", "{body}");
    }
    let (status, body) = put(
        &server,
        "alice",
        &json!({"user": "carol", "muted_spaces": ["s-eng"]}),
    )
    .await;
    assert_eq!(status, 403, "{body}");

    // Alice mutes s-mkt and wants uploads and moves only (what GET answered may go back).
    let mut wanted = none.clone();
    wanted["muted_spaces"] = json!(["s-mkt"]);
    wanted["types"] = json!(["item-moved", "file-uploaded"]);
    let (status, set) = put(&server, "alice", &wanted).await;
    assert_eq!(status, 200, "{set}");
    assert_valid(&schemas.preferences, &set, "PUT answer");
    assert_eq!(set["types"], json!(["file-uploaded", "item-moved"]));
    let (_, read) = get(&server, Some(&token("alice"))).await;
    assert_eq!(read, set, "stored as answered");
    let (_, carols) = get(&server, Some(&token("carol"))).await;
    assert_eq!(carols["muted_spaces"], json!([]), "carol's are her own");

    let mut alice = ws::connect(&server.ws_url("/ws"), Some(&token("alice"))).await;
    let mut carol = ws::connect(&server.ws_url("/ws"), Some(&token("carol"))).await;
    for c in [&mut alice, &mut carol] {
        assert_eq!(ws::frame(c, WAIT).await["type"], "ready");
    }
    let lines = [
        event("p1", "file-uploaded", "s-eng", "/d/a"),
        event("p2", "file-touched", "s-eng", "/d/b"),
        event("p3", "file-uploaded", "s-mkt", "/m/c"),
        event("p4", "file-uploaded", "s-eng", "/d/e"),
    ]
    .concat();
    server.send_events(&lines).await;
    assert_eq!(
        until(&mut carol, "p4").await,
        ["p1", "p2", "p4"],
        "carol unaffected"
    );
    assert_eq!(
        until(&mut alice, "p4").await,
        ["p1", "p4"],
        "no touch, nothing from s-mkt"
    );

    // Notifications: alice turned them off (her types omit them); a critical one still comes.
    let publish = |level: &str| json!({"targets": {"users": ["alice", "carol"]}, "level": level, "title": format!("{level} notice"), "body": "b"});
    let mut ids = Vec::new();
    for level in ["info", "critical"] {
        let response = reqwest::Client::new()
            .post(server.url("/api/notifications"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&publish(level))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_valid(&schemas.notification_response, &body, "publish answer");
        if level == "info" {
            assert_eq!(
                (body["targeted"].as_u64(), body["muted"].as_u64()),
                (Some(1), Some(1)),
                "{body}"
            );
        } else {
            assert_eq!(body["targeted"], 2, "critical ignores preferences: {body}");
            assert!(body.get("muted").is_none(), "{body}");
        }
        ids.push(body["notification_id"].as_str().unwrap().to_owned());
    }
    // Each user's messages keep their order, so had the info one reached alice, it would come
    // before the critical one. (A ping's pong is no fence here: it can overtake a message still
    // on its way through Redis to the gateway.)
    assert_eq!(
        until(&mut alice, &ids[1]).await,
        [ids[1].clone()],
        "only the critical one"
    );
    assert_eq!(until(&mut carol, &ids[1]).await, ids, "both");

    // Back to the default: everything again, and it is stored as nothing.
    let (status, cleared) = put(&server, "alice", &json!({})).await;
    assert_eq!(status, 200, "{cleared}");
    server
        .send_events(&event("p5", "file-touched", "s-mkt", "/m/f"))
        .await;
    assert_eq!(until(&mut alice, "p5").await, ["p5"]);

    // Counted where operators look.
    let metrics = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let muted = metrics
        .lines()
        .find(|l| l.starts_with("foldercast_messages_muted_total"))
        .unwrap_or_else(|| panic!("no muted counter in:\n{metrics}"));
    assert!(muted.ends_with(" 2"), "p2 and p3 for alice: {muted}");
}

/// With Kafka, `consume` and Redis: what a user set through any gateway is applied by the
/// consumer before publishing, so a muted message is not even in the user's stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_applies_preferences_stored_in_redis_before_publishing() {
    let redis = Redis::Standalone(redis_url());
    let membership = demo_membership();
    let server = gateway(&redis, &["--membership", membership.to_str().unwrap()]).await;
    let run = unique("pref");
    // Fresh users in the demo's spaces are not possible (the fixture is fixed): fresh spaces
    // instead, in a membership of our own.
    let dir = tempfile::tempdir().unwrap();
    let (mia, max) = (format!("{run}-mia"), format!("{run}-max"));
    let (loud, quiet) = (format!("{run}-loud"), format!("{run}-quiet"));
    let spaces: Vec<Value> = [&loud, &quiet]
        .iter()
        .map(|s| {
            json!({"id": s, "members": [{"user": mia, "role": "viewer"}, {"user": max, "role": "viewer"}]})
        })
        .collect();
    let members = json!({
        "users": [{"id": mia}, {"id": max}],
        "spaces": spaces,
    });
    let members_path = dir.path().join("membership.json");
    std::fs::write(&members_path, members.to_string()).unwrap();

    let (status, set) = put(&server, &mia, &json!({"muted_spaces": [quiet]})).await;
    assert_eq!(status, 200, "{set}");
    let mut mia_ws = connect(&server, &mia).await;
    let mut max_ws = connect(&server, &max).await;

    let events: String = (0..6)
        .map(|i| {
            let space = if i % 2 == 0 { &loud } else { &quiet };
            event(
                &format!("{run}-{i}"),
                "file-uploaded",
                space,
                &format!("/f{i}"),
            )
        })
        .collect();
    let events_path = dir.path().join("events.jsonl");
    std::fs::write(&events_path, events).unwrap();
    let t = topic();
    produce(&t, &events_path).await;
    let membership_args = [
        "--membership".to_owned(),
        members_path.display().to_string(),
    ];
    let mut consumer = consume_with(
        &t,
        &membership_args,
        &[],
        &redis,
        None,
        &["--user-rate", "0"],
    );

    // Each space in its own order; the two spaces' events may interleave either way.
    let mia_ids = first_ids(&mut mia_ws, 3).await;
    let max_ids = first_ids(&mut max_ws, 6).await;
    let _ = consumer.kill().await;
    let expect = |ns: &[usize]| ns.iter().map(|i| format!("{run}-{i}")).collect::<Vec<_>>();
    assert_eq!(max_ids, expect(&[0, 1, 2, 3, 4, 5]));
    assert_eq!(mia_ids, expect(&[0, 2, 4]), "nothing from the muted space");
    assert!(
        next_frame(&mut mia_ws, Duration::from_millis(500))
            .await
            .is_none_or(|f| f["type"] != "event")
    );

    // Muted traffic costs nothing downstream: not in mia's stream at all.
    let mut c = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let len: usize = redis::cmd("XLEN")
        .arg(foldercast::bus::redis::keys::stream(&mia))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(len, 3, "only what mia receives is stored for her");
}

/// The ids of `ws`'s first `n` event frames, sorted.
async fn first_ids(ws: &mut Ws, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    while ids.len() < n {
        let Some(f) = next_frame(ws, WAIT).await else {
            panic!("only {ids:?} came");
        };
        if f["type"] == "event" {
            ids.push(f["data"]["event_id"].as_str().unwrap().to_owned());
        }
    }
    ids.sort();
    ids
}
