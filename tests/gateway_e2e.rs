//! End to end through the real binary: events on stdin of `foldercast run`, frames out of
//! `/ws` and `/sse`, compared with what `replay --print` computes for the same fixture.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::sse::Sse;
use common::ws::{Got, Ws, connect, send};
use common::{Schemas, Server, assert_valid, demo_membership, replay_print, root, token};
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Message, http::HeaderValue};

const WAIT: Duration = Duration::from_secs(15);

/// The next JSON text frame, or `None` if the connection closed.
async fn next_json(ws: &mut Ws) -> Option<Value> {
    match common::ws::next(ws, WAIT).await {
        Got::Frame(v) => Some(v),
        Got::Closed(code) => {
            eprintln!("closed: {code:?}");
            None
        }
        Got::TimedOut => panic!("no frame in time"),
        Got::Text(t) => panic!("frame is not JSON: {t}"),
    }
}

/// Sends a ping and returns everything that arrived before its pong.
async fn sync(ws: &mut Ws) -> Vec<Value> {
    send(ws, json!({"type": "ping"})).await;
    let mut before = Vec::new();
    loop {
        let f = next_json(ws).await.expect("open");
        if f["type"] == "pong" {
            return before;
        }
        before.push(f);
    }
}

/// Reads the ready frame; returns the position the connection starts at.
async fn ready(ws: &mut Ws, user: &str) -> String {
    let f = next_json(ws).await.expect("ready frame");
    assert_eq!(
        (&f["type"], &f["user"]),
        (&json!("ready"), &json!(user)),
        "{f}"
    );
    let position = f["position"].as_str().expect("a position").to_owned();
    assert!(position.contains(':'), "{position}");
    position
}

/// The id of a position (`<epoch>:<n>-0` on the in-process bus).
fn id_of(position: &str) -> u64 {
    let (_, id) = position.split_once(':').expect("a position");
    id.split_once('-')
        .map_or(id, |(n, _)| n)
        .parse()
        .expect("a numeric id")
}

fn demo_events() -> String {
    std::fs::read_to_string(root().join("fixtures/demo/events.jsonl")).unwrap()
}

fn expected_by_user() -> BTreeMap<String, Vec<Value>> {
    let (pairs, _, _) = replay_print(
        &root().join("fixtures/demo/events.jsonl"),
        &demo_membership(),
        &[],
    );
    let mut map: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for (u, m) in pairs {
        map.entry(u).or_default().push(m);
    }
    map
}

fn assert_increasing(ids: &[u64], who: &str) {
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "{who}: ids must strictly increase: {ids:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_receive_exactly_what_replay_computes() {
    let schemas = Schemas::load();
    let mut server = Server::start(&["--user-rate", "0"]).await;
    let expected = expected_by_user();

    // alice: bearer header. bob: auth frame. carol: ticket. dave: header. frank: uploader.
    let mut alice = connect(&server.ws_url("/ws"), Some(&token("alice"))).await;
    ready(&mut alice, "alice").await;
    let mut bob = connect(&server.ws_url("/ws"), None).await;
    send(&mut bob, json!({"type": "auth", "token": token("bob")})).await;
    ready(&mut bob, "bob").await;
    let carols = common::ticket(&server, "carol").await;
    let mut carol = connect(&server.ws_url(&format!("/ws?ticket={carols}")), None).await;
    ready(&mut carol, "carol").await;
    let mut dave = connect(&server.ws_url("/ws"), Some(&token("dave"))).await;
    ready(&mut dave, "dave").await;
    let mut frank = connect(&server.ws_url("/ws"), Some(&token("frank"))).await;
    ready(&mut frank, "frank").await;
    // erin and bob (a second connection) over SSE.
    let mut erin_sse = Sse::new(Sse::open(&server.url("/sse"), Some(&token("erin"))).await);
    assert_eq!(
        erin_sse.next().await.unwrap().comment.as_deref(),
        Some("ready erin")
    );
    let mut bob_sse = Sse::new(Sse::open(&server.url("/sse"), Some(&token("bob"))).await);
    assert_eq!(
        bob_sse.next().await.unwrap().comment.as_deref(),
        Some("ready bob")
    );

    server.send_events(&demo_events()).await;

    for (user, ws) in [
        ("alice", &mut alice),
        ("bob", &mut bob),
        ("carol", &mut carol),
        ("dave", &mut dave),
    ] {
        let want = &expected[user];
        let mut got = Vec::new();
        let mut ids = Vec::new();
        while got.len() < want.len() {
            let frame = next_json(ws).await.expect("connection stays open");
            assert_valid(&schemas.server_frame, &frame, "server frame");
            assert_eq!(frame["type"], "event", "{user}: {frame}");
            ids.push(id_of(frame["id"].as_str().unwrap()));
            got.push(frame["data"].clone());
        }
        assert_eq!(&got, want, "{user} receives what replay computes, in order");
        assert_increasing(&ids, user);
    }
    for (user, sse) in [("erin", &mut erin_sse), ("bob", &mut bob_sse)] {
        let want = &expected[user];
        let mut ids = Vec::new();
        for msg in want {
            let ev = sse.next_event().await.expect("SSE stays open");
            let data: Value = serde_json::from_str(&ev.data).unwrap();
            assert_eq!(&data, msg, "{user} over SSE");
            assert_eq!(
                ev.event.as_deref(),
                msg["type"].as_str(),
                "event: is the message type"
            );
            ids.push(id_of(&ev.id.unwrap()));
        }
        assert_increasing(&ids, user);
    }
    // frank (uploader) got nothing: the first frame after his ping is the pong.
    assert!(
        sync(&mut frank).await.is_empty(),
        "an uploader receives nothing"
    );
    let stats = server.stats().await;
    assert_eq!(stats["connections"], 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_failures_are_refused_clearly() {
    let server = Server::start(&["--auth-timeout", "700ms"]).await;
    let expect_error_and_close = |code: &'static str| async move {
        move |frames: Vec<Option<Value>>| {
            assert_eq!(frames[0].as_ref().unwrap()["type"], "error");
            assert_eq!(frames[0].as_ref().unwrap()["code"], code, "{frames:?}");
            assert!(frames[1].is_none(), "then the connection closes");
        }
    };
    let bad =
        foldercast::gateway::auth::Authenticator::hs256(b"a-wrong-secret-of-thirty-two-bytes")
            .unwrap()
            .mint("alice", Duration::from_secs(60))
            .unwrap();

    let mut ws = connect(&server.ws_url("/ws"), Some(&bad)).await;
    let frames = vec![next_json(&mut ws).await, next_json(&mut ws).await];
    expect_error_and_close("invalid-token").await(frames);

    let expired = foldercast::gateway::auth::Authenticator::hs256(common::SECRET.as_bytes())
        .unwrap()
        .mint("alice", Duration::ZERO)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut ws = connect(&server.ws_url("/ws"), Some(&expired)).await;
    let frames = vec![next_json(&mut ws).await, next_json(&mut ws).await];
    expect_error_and_close("token-expired").await(frames);

    let mut ws = connect(&server.ws_url("/ws"), None).await;
    send(&mut ws, json!({"type": "auth", "token": "not-a-jwt"})).await;
    let frames = vec![next_json(&mut ws).await, next_json(&mut ws).await];
    expect_error_and_close("invalid-token").await(frames);

    let mut ws = connect(&server.ws_url("/ws"), None).await;
    let frames = vec![next_json(&mut ws).await, next_json(&mut ws).await];
    expect_error_and_close("auth-timeout").await(frames);
    // A wrong key, an expired token, garbage and a timeout: each counts as a refusal.
    assert_eq!(server.stats().await["auth_failures"], 4);

    // Before auth, other frames are answered with an error; the connection waits for auth.
    let mut ws = connect(&server.ws_url("/ws"), None).await;
    send(
        &mut ws,
        json!({"type": "watch", "space_id": "s-eng", "path": "/"}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await.unwrap()["code"], "unauthenticated");
    send(&mut ws, json!({"type": "auth", "token": token("alice")})).await;
    ready(&mut ws, "alice").await;

    // A ticket works once.
    let bobs = common::ticket(&server, "bob").await;
    let url = server.ws_url(&format!("/ws?ticket={bobs}"));
    let mut first = connect(&url, None).await;
    ready(&mut first, "bob").await;
    let mut second = connect(&url, None).await;
    let frames = vec![next_json(&mut second).await, next_json(&mut second).await];
    expect_error_and_close("invalid-ticket").await(frames);

    // HTTP endpoints answer 401 with a JSON error.
    let r = reqwest::Client::new()
        .post(server.url("/api/tickets"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = Sse::open(&server.url("/sse"), None).await;
    assert_eq!(r.status(), 401);
    let r = Sse::open(&server.url("/sse"), Some(&bad)).await;
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "invalid-token");
    let r = Sse::open(&server.url("/sse?watch=nocolon"), Some(&token("bob"))).await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        reqwest::get(server.url("/healthz")).await.unwrap().status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_client_frames_get_error_frames_and_the_connection_stays() {
    let schemas = Schemas::load();
    let server = Server::start(&[]).await;
    let mut ws = connect(&server.ws_url("/ws"), Some(&token("alice"))).await;
    ready(&mut ws, "alice").await;
    let cases: [(Message, &str); 6] = [
        (Message::Text("garbage".into()), "bad-frame"),
        (Message::Text(r#"{"type":"dance"}"#.into()), "unknown-type"),
        (
            Message::Text(r#"{"type":"watch","space_id":"s-eng","path":"/a/../b"}"#.into()),
            "invalid-path",
        ),
        (
            Message::Text(r#"{"type":"watch","space_id":"s-eng"}"#.into()),
            "bad-frame",
        ),
        (Message::Binary(vec![1, 2, 3].into()), "bad-frame"),
        (
            Message::Text(format!(r#"{{"type":"auth","token":"{}"}}"#, token("bob")).into()),
            "user-mismatch",
        ),
    ];
    for (frame, code) in cases {
        ws.send(frame).await.unwrap();
        let reply = next_json(&mut ws).await.expect("still open");
        assert_valid(&schemas.server_frame, &reply, "error frame");
        assert_eq!(reply["type"], "error");
        assert_eq!(reply["code"], code);
    }
    send(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut ws).await.unwrap(), json!({"type": "pong"}));
    for i in 0..64 {
        send(
            &mut ws,
            json!({"type": "watch", "space_id": "s", "path": format!("/{i}")}),
        )
        .await;
    }
    send(
        &mut ws,
        json!({"type": "watch", "space_id": "s", "path": "/one-too-many"}),
    )
    .await;
    assert_eq!(
        next_json(&mut ws).await.unwrap()["code"],
        "too-many-watches"
    );
}

fn watched(msg: &Value, space: &str, folder: &str) -> bool {
    if msg.get("item").is_none() {
        return true; // membership messages always pass
    }
    let within = |p: &Value| {
        p.as_str()
            .is_some_and(|p| p == folder || p.starts_with(&format!("{folder}/")))
    };
    msg["space_id"] == space && (within(&msg["item"]["path"]) || within(&msg["item"]["old_path"]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_filter_to_the_folder_on_screen() {
    let mut server = Server::start(&["--user-rate", "0"]).await;
    let folder = "/projects/apollo/specs/diagrams";
    let want: Vec<Value> = expected_by_user()["alice"]
        .iter()
        .filter(|m| watched(m, "s-eng", folder))
        .cloned()
        .collect();
    assert!(
        want.len() >= 4 && want.len() < expected_by_user()["alice"].len(),
        "the filter must matter"
    );

    let mut ws = connect(&server.ws_url("/ws"), Some(&token("alice"))).await;
    ready(&mut ws, "alice").await;
    send(
        &mut ws,
        json!({"type": "watch", "space_id": "s-eng", "path": format!("{folder}/")}),
    )
    .await;
    assert!(sync(&mut ws).await.is_empty());
    let mut sse = Sse::new(
        Sse::open(
            &server.url(&format!("/sse?watch=s-eng:{folder}")),
            Some(&token("alice")),
        )
        .await,
    );
    sse.next().await.unwrap();

    server.send_events(&demo_events()).await;
    let mut got = Vec::new();
    while got.len() < want.len() {
        got.push(next_json(&mut ws).await.unwrap()["data"].clone());
    }
    assert_eq!(got, want);
    let mut got_sse = Vec::new();
    while got_sse.len() < want.len() {
        got_sse.push(serde_json::from_str::<Value>(&sse.next_event().await.unwrap().data).unwrap());
    }
    assert_eq!(got_sse, want);
    assert!(
        sync(&mut ws).await.is_empty(),
        "nothing outside the watch arrives"
    );

    // Without watches, everything arrives again.
    // The pong proves the unwatch was applied before the event is read (it raced it once).
    send(&mut ws, json!({"type": "unwatch"})).await;
    assert!(sync(&mut ws).await.is_empty());
    server
        .send_events(r#"{"id":"late-1","type":"file-uploaded","time":"2026-11-22T11:00:00Z","data":{"space_id":"s-mkt","path":"/elsewhere.txt","kind":"file","size":1}}"#)
        .await;
    server.send_events("\n").await;
    let f = next_json(&mut ws).await.unwrap();
    assert_eq!(f["data"]["event_id"], "late-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_is_evicted_and_others_are_unharmed() {
    let mut server = Server::start(&[
        "--user-rate",
        "0",
        "--send-queue",
        "64",
        "--write-timeout",
        "3s",
    ])
    .await;
    // A client with a tiny receive window that stops reading after `ready`.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.addr.parse().unwrap()).await.unwrap();
    let mut request = server.ws_url("/ws").into_client_request().unwrap();
    request.headers_mut().insert(
        "Authorization",
        HeaderValue::from_str(&format!("Bearer {}", token("alice"))).unwrap(),
    );
    let (mut slow, _) = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream))
        .await
        .unwrap();
    ready(&mut slow, "alice").await;
    let mut healthy = connect(&server.ws_url("/ws"), Some(&token("bob"))).await;
    ready(&mut healthy, "bob").await;

    // 2,000 events with 4 KB paths (~8 KB per message, 16 MB in all: more than the socket
    // buffers hold), paced so a reading client keeps up while the other one's socket buffers
    // and queue fill.
    const EVENTS: usize = 2000;
    let deep: String = (0..60).map(|i| format!("/{}{i}", "d".repeat(62))).collect();
    let events: Vec<String> = (0..EVENTS)
        .map(|i| format!(r#"{{"id":"big-{i}","type":"file-uploaded","time":"2026-11-22T10:00:00Z","data":{{"space_id":"s-eng","path":"{deep}/f{i}","kind":"file","size":1}}}}"#) + "\n")
        .collect();
    let reader = tokio::spawn(async move {
        let mut n = 0;
        while n < EVENTS {
            let f = next_json(&mut healthy)
                .await
                .expect("the healthy client stays connected");
            if f["type"] == "event" {
                n += 1;
            }
        }
        // Kept open: the count below must see this connection and not the evicted one.
        (n, healthy)
    });
    // 20 events per 50 ms: about 3 MB/s to each client, which this test's own reader (a debug
    // build parsing every frame) keeps up with.
    for chunk in events.chunks(20) {
        server.send_events(&chunk.concat()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (received, healthy) = reader.await.unwrap();
    assert_eq!(received, EVENTS, "a reading client gets everything");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let stats = server.stats().await;
        if stats["evicted"].as_u64().unwrap() >= 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slow client was never evicted: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The connection count drops once the evicted session is gone.
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.stats().await["connections"] != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "evicted session still registered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop((slow, healthy));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiring_tokens_close_the_connection_unless_refreshed() {
    let server = Server::start(&[]).await;
    let auth = foldercast::gateway::auth::Authenticator::hs256(common::SECRET.as_bytes()).unwrap();
    let short = auth.mint("alice", Duration::from_secs(2)).unwrap();
    let mut expiring = connect(&server.ws_url("/ws"), Some(&short)).await;
    ready(&mut expiring, "alice").await;
    let mut refreshed = connect(
        &server.ws_url("/ws"),
        Some(&auth.mint("bob", Duration::from_secs(2)).unwrap()),
    )
    .await;
    ready(&mut refreshed, "bob").await;
    send(
        &mut refreshed,
        json!({"type": "auth", "token": token("bob")}),
    )
    .await;
    assert!(sync(&mut refreshed).await.is_empty(), "a refresh is silent");

    let f = next_json(&mut expiring).await.expect("told before closing");
    assert_eq!(f["code"], "token-expired");
    assert!(next_json(&mut expiring).await.is_none());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        sync(&mut refreshed).await.is_empty(),
        "the refreshed connection is still open"
    );
}

#[tokio::test]
async fn clients_that_answer_no_pings_are_closed_and_live_ones_stay() {
    let server = Server::start(&["--ws-ping-interval", "300ms"]).await;
    // A vanished client: it never reads again, so it never answers a ping.
    let mut gone = connect(&server.ws_url("/ws"), Some(&token("alice"))).await;
    ready(&mut gone, "alice").await;
    let mut live = connect(&server.ws_url("/ws"), Some(&token("bob"))).await;
    ready(&mut live, "bob").await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        // Reading (here: a ping/pong round trip) answers the server's pings.
        assert!(sync(&mut live).await.is_empty());
        let stats = server.stats().await;
        if stats["connections"] == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the silent client was not closed: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A client that keeps reading stays, well past two ping intervals.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            sync(&mut live).await.is_empty(),
            "the live client is still served"
        );
    }
    assert_eq!(server.stats().await["connections"], 1);
    // What the silent client finds when it looks again: pings, then the close.
    loop {
        match next_json(&mut gone).await {
            None => break,
            Some(f) => assert_eq!(f["code"], "ping-timeout", "{f}"),
        }
    }
}
