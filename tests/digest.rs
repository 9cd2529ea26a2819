//! Digest windows through the real binary (`foldercast run`, the in-process bus): a connection
//! that asks for `digest=N` gets its item changes as one `coalesced` message per window and
//! space, at a position it resumes from exactly; other connections of the user are unaffected.

mod common;

use std::time::Duration;

use common::sse::Sse;
use common::ws::{self, Got, Ws};
use common::{Schemas, Server, assert_valid, token};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);

fn upload(id: &str, space: &str, path: &str, size: u64) -> String {
    format!(
        r#"{{"id":"{id}","type":"file-uploaded","time":"2026-11-22T10:00:00Z","data":{{"space_id":"{space}","path":"{path}","kind":"file","size":{size}}}}}"#
    ) + "\n"
}

async fn ready(ws: &mut Ws) -> String {
    let f = ws::frame(ws, WAIT).await;
    assert_eq!(f["type"], "ready", "{f}");
    f["position"].as_str().unwrap().to_owned()
}

/// The next `event` frame, checked against the schema.
async fn event(ws: &mut Ws, schemas: &Schemas) -> Value {
    let f = ws::frame(ws, WAIT).await;
    assert_valid(&schemas.server_frame, &f, "event frame");
    assert_eq!(f["type"], "event", "{f}");
    f
}

async fn quiet(ws: &mut Ws, wait: Duration) {
    match ws::next(ws, wait).await {
        Got::TimedOut => {}
        other => panic!("expected nothing yet, got {other:?}"),
    }
}

/// Per folder: the size change a client applies from one message's runs.
fn folder_sum(messages: &[&Value]) -> std::collections::BTreeMap<String, i64> {
    let mut sums = std::collections::BTreeMap::new();
    for m in messages {
        for (folder, delta) in common::folder_changes(m) {
            *sums.entry(folder).or_default() += delta;
        }
    }
    sums
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_connection_gets_one_coalesced_message_per_window_and_resumes_exactly() {
    let schemas = Schemas::load();
    let mut server = Server::start(&["--user-rate", "0"]).await;
    let url = server.ws_url("/ws");
    let alice = token("alice");
    let mut plain = ws::connect(&url, Some(&alice)).await;
    ready(&mut plain).await;
    let mut digest = ws::connect(&format!("{url}?digest=2"), Some(&alice)).await;
    ready(&mut digest).await;

    // Four changes in one space, then one in another.
    let lines: String = [
        upload("d1", "s-eng", "/docs/a.txt", 10),
        upload("d2", "s-eng", "/docs/b.txt", 20),
        upload("d3", "s-eng", "/docs/deep/c.txt", 30),
        upload("d4", "s-eng", "/docs/a.txt", 40),
    ]
    .concat();
    server.send_events(&lines).await;
    let mut live = Vec::new();
    for _ in 0..4 {
        live.push(event(&mut plain, &schemas).await);
    }
    // The plain connection had all four at once; the digest one holds them.
    quiet(&mut digest, Duration::from_millis(800)).await;
    let started = std::time::Instant::now();
    let d = event(&mut digest, &schemas).await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "sent when the window ends"
    );
    let m = &d["data"];
    assert_eq!(m["type"], "coalesced", "{d}");
    assert_valid(&schemas.message, m, "a digest is a coalesced message");
    assert_eq!(
        m["event_ids"],
        serde_json::json!(["d1", "d2", "d3", "d4"]),
        "every event, in order"
    );
    assert_eq!(
        d["id"], live[3]["id"],
        "at the position of the last change it folds"
    );
    let paths: Vec<&str> = m["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        ["/docs/b.txt", "/docs/deep/c.txt", "/docs/a.txt"],
        "the latest change per path"
    );
    let live_data: Vec<&Value> = live.iter().map(|f| &f["data"]).collect();
    assert_eq!(
        folder_sum(&[m]),
        folder_sum(&live_data),
        "the folder sizes a client ends with are the same"
    );
    quiet(&mut digest, Duration::from_millis(300)).await;

    // Another space's change sends what is held first: positions stay exact.
    let lines = [
        upload("d5", "s-eng", "/docs/e.txt", 1),
        upload("d6", "s-mkt", "/plan.txt", 2),
    ]
    .concat();
    server.send_events(&lines).await;
    let d5 = event(&mut plain, &schemas).await;
    let d6 = event(&mut plain, &schemas).await;
    let first = event(&mut digest, &schemas).await;
    assert_eq!(
        first["data"]["event_id"], "d5",
        "s-eng's lone change as it is, at once"
    );
    assert_eq!(first["id"], d5["id"]);
    let second = event(&mut digest, &schemas).await;
    assert_eq!(
        second["data"]["event_id"], "d6",
        "then s-mkt's, after its window"
    );
    assert_eq!(second["id"], d6["id"]);

    // Resuming from a digest's position replays nothing it folded.
    let since = d["id"].as_str().unwrap();
    let mut back = ws::connect(&format!("{url}?since={since}&digest=1"), Some(&alice)).await;
    ready(&mut back).await;
    let r = ws::frame(&mut back, WAIT).await;
    assert_eq!(r["type"], "resumed", "{r}");
    assert_eq!(r["recovered"], true);
    assert_eq!(r["replayed"], 2, "d5 and d6 only");
    let replayed: Vec<Value> = vec![
        event(&mut back, &schemas).await,
        event(&mut back, &schemas).await,
    ];
    assert_eq!(replayed[0]["data"]["event_id"], "d5");
    assert_eq!(
        replayed[1]["data"]["event_id"], "d6",
        "a replay is not held"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_digests_and_bad_windows_are_refused_clearly() {
    let schemas = Schemas::load();
    let mut server = Server::start(&["--user-rate", "0", "--max-digest", "60s"]).await;
    let url = server.url("/sse?digest=1");
    let mut sse = Sse::new(Sse::open(&url, Some(&token("alice"))).await);
    // The opening comment and the ready event.
    sse.next().await.expect("ready comment");
    sse.next().await.expect("ready event");
    server
        .send_events(
            &[
                upload("s1", "s-eng", "/x/1", 5),
                upload("s2", "s-eng", "/x/2", 6),
            ]
            .concat(),
        )
        .await;
    let e = sse.next_event().await.expect("a digest");
    assert_eq!(e.event.as_deref(), Some("coalesced"), "{e:?}");
    let m: Value = serde_json::from_str(&e.data).unwrap();
    assert_valid(&schemas.message, &m, "SSE digest");
    assert_eq!(m["event_ids"], serde_json::json!(["s1", "s2"]));
    assert!(e.id.is_some(), "a position to resume from");

    for bad in ["0", "61", "soon"] {
        let resp = Sse::open(
            &server.url(&format!("/sse?digest={bad}")),
            Some(&token("alice")),
        )
        .await;
        assert_eq!(resp.status(), 400, "digest={bad}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["code"], "bad-digest", "{body}");
    }
    let mut ws = ws::connect(&server.ws_url("/ws?digest=0"), Some(&token("alice"))).await;
    let error = ws::frame(&mut ws, WAIT).await;
    assert_eq!(error["code"], "bad-digest", "{error}");
    assert!(
        matches!(ws::next(&mut ws, WAIT).await, Got::Closed(Some(1008))),
        "then closed (policy)"
    );
}
