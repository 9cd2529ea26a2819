//! Resume through the real binary (`foldercast run`, the in-process bus): every route a client
//! can resume by (WebSocket `?since=`, `since` in the auth frame, a `resume` frame; SSE
//! `Last-Event-ID` and `?since=`), every reason it may not recover, and the drain on shutdown.

mod common;

use std::time::Duration;

use common::sse::Sse;
use common::ws::{self, Got, Ws};
use common::{Schemas, Server, assert_valid, token};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(15);

fn upload(id: &str) -> String {
    format!(
        r#"{{"id":"{id}","type":"file-uploaded","time":"2026-11-22T10:00:00Z","data":{{"space_id":"s-eng","path":"/r/{id}.txt","kind":"file","size":1}}}}"#
    ) + "\n"
}

async fn start(extra: &[&str]) -> Server {
    let mut args = vec!["--user-rate", "0", "--resume-max", "5"];
    args.extend_from_slice(extra);
    Server::start(&args).await
}

/// Reads the ready frame (checked against the schema); returns its position.
async fn ready(ws: &mut Ws, schemas: &Schemas) -> String {
    let f = ws::frame(ws, WAIT).await;
    assert_valid(&schemas.server_frame, &f, "ready");
    assert_eq!(f["type"], "ready", "{f}");
    f["position"].as_str().unwrap().to_owned()
}

/// Reads `n` event frames; returns (position, event id) pairs. Every frame is checked against
/// the schema; any other frame fails.
async fn events(ws: &mut Ws, n: usize, schemas: &Schemas) -> Vec<(String, String)> {
    let mut got = Vec::new();
    while got.len() < n {
        let f = ws::frame(ws, WAIT).await;
        assert_valid(&schemas.server_frame, &f, "event frame");
        assert_eq!(f["type"], "event", "{f}");
        got.push((
            f["id"].as_str().unwrap().to_owned(),
            f["data"]["event_id"].as_str().unwrap().to_owned(),
        ));
    }
    got
}

async fn nothing_more(ws: &mut Ws) {
    match ws::next(ws, Duration::from_millis(400)).await {
        Got::TimedOut => {}
        other => panic!("expected nothing more, got {other:?}"),
    }
}

fn ids(pairs: &[(String, String)]) -> Vec<&str> {
    pairs.iter().map(|(_, e)| e.as_str()).collect()
}

/// The `resumed` frame, checked; returns it.
async fn resumed(ws: &mut Ws, schemas: &Schemas) -> Value {
    let f = ws::frame(ws, WAIT).await;
    assert_valid(&schemas.server_frame, &f, "resumed");
    assert_eq!(f["type"], "resumed", "{f}");
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_clients_resume_by_every_route_and_are_told_when_they_cannot() {
    let schemas = Schemas::load();
    let mut server = start(&[]).await;
    let url = server.ws_url("/ws");
    let alice = token("alice");
    // A witness connection that stays, to know when events were published.
    let mut witness = ws::connect(&url, Some(&alice)).await;
    let start_position = ready(&mut witness, &schemas).await;
    let mut client = ws::connect(&url, Some(&alice)).await;
    assert_eq!(ready(&mut client, &schemas).await, start_position);

    server
        .send_events(
            &(1..=3)
                .map(|i| upload(&format!("a{i}")))
                .collect::<String>(),
        )
        .await;
    let first = events(&mut client, 3, &schemas).await;
    assert_eq!(ids(&first), ["a1", "a2", "a3"]);
    events(&mut witness, 3, &schemas).await;
    let kept = first[2].0.clone();
    drop(client);

    // Missed while away: four events.
    server
        .send_events(
            &(4..=7)
                .map(|i| upload(&format!("a{i}")))
                .collect::<String>(),
        )
        .await;
    let missed = events(&mut witness, 4, &schemas).await;

    // 1. ?since= on the upgrade.
    let mut back = ws::connect(&format!("{url}?since={kept}"), Some(&alice)).await;
    assert_eq!(
        ready(&mut back, &schemas).await,
        kept,
        "ready says where the replay starts"
    );
    let r = resumed(&mut back, &schemas).await;
    assert_eq!(r["recovered"], true);
    assert_eq!(r["replayed"], 4);
    assert_eq!(r["reason"], Value::Null);
    assert_eq!(
        r["position"],
        missed[3].0.as_str(),
        "the top the replay reaches"
    );
    let replay = events(&mut back, 4, &schemas).await;
    assert_eq!(
        replay, missed,
        "exactly what was missed, with the same positions"
    );
    nothing_more(&mut back).await;
    server.send_events(&upload("a8")).await;
    assert_eq!(
        ids(&events(&mut back, 1, &schemas).await),
        ["a8"],
        "then live, once"
    );
    nothing_more(&mut back).await;
    let a8 = events(&mut witness, 1, &schemas).await;

    // 2. `since` in the auth frame (it wins over the query's).
    let mut by_auth = ws::connect(&format!("{url}?since={start_position}"), None).await;
    ws::send(
        &mut by_auth,
        json!({"type": "auth", "token": alice, "since": kept}),
    )
    .await;
    ready(&mut by_auth, &schemas).await;
    let r = resumed(&mut by_auth, &schemas).await;
    assert_eq!(
        (r["recovered"].clone(), r["replayed"].clone()),
        (json!(true), json!(5))
    );
    assert_eq!(
        ids(&events(&mut by_auth, 5, &schemas).await),
        ["a4", "a5", "a6", "a7", "a8"]
    );
    nothing_more(&mut by_auth).await;

    // 3. A resume frame right after ready.
    let mut by_frame = ws::connect(&url, Some(&alice)).await;
    ready(&mut by_frame, &schemas).await;
    ws::send(
        &mut by_frame,
        json!({"type": "resume", "since": first[1].0}),
    )
    .await;
    let r = resumed(&mut by_frame, &schemas).await;
    assert_eq!(r["recovered"], false, "6 missed, more than --resume-max 5");
    assert_eq!(r["reason"], "over-limit");
    assert_eq!(r["replayed"], 0);
    assert_eq!(r["position"], a8[0].0.as_str());
    nothing_more(&mut by_frame).await;
    // ... and once something was delivered, a resume frame is refused.
    server.send_events(&upload("a9")).await;
    events(&mut by_frame, 1, &schemas).await;
    ws::send(&mut by_frame, json!({"type": "resume", "since": kept})).await;
    let refused = ws::frame(&mut by_frame, WAIT).await;
    assert_valid(&schemas.server_frame, &refused, "error");
    assert_eq!(refused["code"], "resume-too-late");

    // 4. Positions that cannot be continued from: nothing is replayed, and the client is told.
    let top = events(&mut witness, 1, &schemas).await[0].0.clone();
    let (epoch, id) = kept.split_once(':').unwrap();
    let lost_epoch = format!("{}{}:{id}", "f".repeat(8), &epoch[8..]);
    let other_user = {
        let mut bob = ws::connect(&url, Some(&token("bob"))).await;
        ready(&mut bob, &schemas).await
    };
    let (_, top_id) = top.split_once(':').unwrap();
    let (top_n, _) = top_id.split_once('-').unwrap();
    let future = format!("{epoch}:{}-0", top_n.parse::<u64>().unwrap() + 5);
    for (since, reason) in [
        (lost_epoch.as_str(), "unknown-epoch"),
        ("garbage", "bad-position"),
        ("", "bad-position"),
        (future.as_str(), "bad-position"),
        (other_user.as_str(), "bad-position"),
    ] {
        let mut c = ws::connect(&url, Some(&alice)).await;
        ready(&mut c, &schemas).await;
        ws::send(&mut c, json!({"type": "resume", "since": since})).await;
        let r = resumed(&mut c, &schemas).await;
        assert_eq!(
            (r["recovered"].clone(), r["reason"].clone()),
            (json!(false), json!(reason)),
            "{since:?}"
        );
        assert_eq!(r["position"], top.as_str(), "{since:?}: the current top");
        nothing_more(&mut c).await;
    }
    // Without a since there is no resumed frame at all.
    let mut plain = ws::connect(&url, Some(&alice)).await;
    assert_eq!(ready(&mut plain, &schemas).await, top);
    nothing_more(&mut plain).await;
}

/// The SSE events a browser would dispatch, after the stream's opening lines.
async fn sse_open(url: &str, user: &str, last_event_id: Option<&str>) -> (Sse, Option<String>) {
    let mut request = reqwest::Client::new().get(url).bearer_auth(token(user));
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id);
    }
    let response = request.send().await.expect("sse");
    assert_eq!(response.status(), 200);
    let mut sse = Sse::new(response);
    // The ready comment, then the ready event whose id is the starting position.
    let ready = sse.next().await.expect("ready comment");
    assert!(ready.comment.is_some_and(|c| c.starts_with("ready")));
    let start = sse.next().await.expect("starting position");
    assert_eq!(start.event.as_deref(), Some("ready"), "{start:?}");
    let data: Value = serde_json::from_str(&start.data).unwrap();
    assert_eq!(data["position"].as_str(), start.id.as_deref());
    (sse, start.id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_clients_resume_by_last_event_id_which_wins_over_the_query() {
    let schemas = Schemas::load();
    let mut server = start(&[]).await;
    let mut witness = ws::connect(&server.ws_url("/ws"), Some(&token("alice"))).await;
    ready(&mut witness, &schemas).await;
    server
        .send_events(
            &(1..=2)
                .map(|i| upload(&format!("s{i}")))
                .collect::<String>(),
        )
        .await;
    let first = events(&mut witness, 2, &schemas).await;
    server
        .send_events(
            &(3..=4)
                .map(|i| upload(&format!("s{i}")))
                .collect::<String>(),
        )
        .await;
    let missed = events(&mut witness, 2, &schemas).await;

    // The header (what the browser sends on its own reconnect) wins over ?since=.
    let url = server.url(&format!("/sse?since={}", first[0].0));
    let (mut sse, start) = sse_open(&url, "alice", Some(&first[1].0)).await;
    assert_eq!(start.as_deref(), Some(first[1].0.as_str()));
    let r = sse.next_event().await.expect("resumed");
    assert_eq!(r.event.as_deref(), Some("resumed"));
    let outcome: Value = serde_json::from_str(&r.data).unwrap();
    assert_valid(&schemas.server_frame, &outcome, "resumed");
    assert_eq!(
        (outcome["recovered"].clone(), outcome["replayed"].clone()),
        (json!(true), json!(2))
    );
    for (position, event_id) in &missed {
        let e = sse.next_event().await.expect("replayed");
        assert_eq!(e.id.as_deref(), Some(position.as_str()));
        let data: Value = serde_json::from_str(&e.data).unwrap();
        assert_eq!(data["event_id"], event_id.as_str());
    }
    // ?since= alone, on a first connect.
    let (mut by_query, _) = sse_open(&url, "alice", None).await;
    by_query.next_event().await.expect("resumed");
    let ids: Vec<String> = [
        by_query.next_event().await.unwrap(),
        by_query.next_event().await.unwrap(),
        by_query.next_event().await.unwrap(),
    ]
    .into_iter()
    .map(|e| e.id.unwrap())
    .collect();
    assert_eq!(
        ids,
        [first[1].0.clone(), missed[0].0.clone(), missed[1].0.clone()]
    );
    // A position that cannot be continued from: told, with the top as the next Last-Event-ID.
    let (mut lost, _) = sse_open(&server.url("/sse"), "alice", Some("garbage")).await;
    let r = lost.next_event().await.expect("resumed");
    assert_eq!(r.id.as_deref(), Some(missed[1].0.as_str()));
    let outcome: Value = serde_json::from_str(&r.data).unwrap();
    assert_eq!(outcome["reason"], "bad-position");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_tells_every_client_to_reconnect_and_resume_spread_out() {
    let schemas = Schemas::load();
    let mut server = start(&["--drain-spread", "3s", "--drain-grace", "5s"]).await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut c = ws::connect(&server.ws_url("/ws"), Some(&token("alice"))).await;
        ready(&mut c, &schemas).await;
        clients.push(c);
    }
    server.send_events(&upload("d1")).await;
    let mut last = String::new();
    for c in clients.iter_mut() {
        last = events(c, 1, &schemas).await[0].0.clone();
    }
    let (mut sse, _) = sse_open(&server.url("/sse"), "alice", None).await;
    let pid = server.child.id().expect("pid");
    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(signalled.success());
    let mut delays = Vec::new();
    for c in clients.iter_mut() {
        let f = ws::frame(c, WAIT).await;
        assert_valid(&schemas.server_frame, &f, "reconnect");
        assert_eq!(f["type"], "reconnect", "{f}");
        assert_eq!(f["position"], last.as_str(), "the last position delivered");
        let after = f["after_ms"].as_u64().unwrap();
        assert!(after <= 3000, "{after}");
        delays.push(after);
        match ws::next(c, WAIT).await {
            Got::Closed(code) => assert_eq!(code, Some(1001)),
            other => panic!("expected a 1001 close, got {other:?}"),
        }
    }
    delays.sort_unstable();
    assert!(
        delays[19] - delays[0] > 500,
        "spread out, not all at once: {delays:?}"
    );
    let e = sse.next_event().await.expect("reconnect event");
    assert_eq!(e.event.as_deref(), Some("reconnect"));
    assert!(e.retry.is_some_and(|ms| ms <= 3000), "{e:?}");
    let status = tokio::time::timeout(Duration::from_secs(10), server.child.wait())
        .await
        .expect("exits within the drain grace")
        .unwrap();
    assert!(status.success(), "{status:?}");
}
