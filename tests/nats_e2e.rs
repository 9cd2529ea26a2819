//! oCIS's own events through the real binary: reva envelopes in a real nats-server's
//! JetStream, `foldercast consume --nats` completing them through the LibreGraph test server's
//! item and WebDAV routes, Redis, the gateway, and WebSocket clients.
//!
//! - the fixture (`fixtures/ocis/events.jsonl`): every mapping reaches the space's members as
//!   the table in its README says, refused envelopes are dead-lettered with their reason, and
//!   every message of the stream ends acknowledged;
//! - lookups that cannot be exact (an item gone by the time it is asked for) resync the space
//!   instead of guessing; an overwrite of a file never seen carries its folders' sizes after
//!   the change, which add up with the deltas around them even when coalesced;
//! - a consumer killed with SIGKILL mid-stream, under the default rate limit: after a restart
//!   every event reaches every member exactly once, and folder sizes add up.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use common::libregraph::{Item, LibreGraph, SPACE_EDITOR, user_grant};
use common::nats::{
    EINSTEIN, MARIE, PHYSICS_GROUP, RICHARD, SPACE_UUID, STORAGE, Stream, drive, fixture_items,
    physics,
};
use common::pipeline::{Redis, Ws, connect, gateway, next_frame};
use common::{PrivateRedis, Schemas, assert_valid, root, unique};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

/// The event frames' data a client received, waiting up to `wait` for each.
async fn events(ws: &mut Ws, count: usize, wait: Duration) -> Vec<Value> {
    let mut got = Vec::new();
    while got.len() < count {
        let Some(frame) = next_frame(ws, wait).await else {
            break;
        };
        if frame["type"] == "event" || frame["type"] == "resync" {
            got.push(frame["data"].clone());
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reva_event_of_the_fixture_reaches_the_members_as_its_table_says() {
    let graph = LibreGraph::start().await;
    physics(&graph);
    fixture_items(&graph);
    let q1 = format!("{}!9f1c0e3a", drive());
    let reports = format!("{}!7d2e", drive());
    let redis = PrivateRedis::start();
    let server = gateway(&Redis::Standalone(redis.url()), &[]).await;
    let mut einstein = connect(&server, EINSTEIN).await;
    let mut richard = connect(&server, RICHARD).await;

    let stream = Stream::new();
    stream
        .load(&root().join("fixtures/ocis/events.jsonl"))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("consume.log");
    let _consumer = stream.consume(&graph, &redis.url(), &["--user-rate", "0"], &log);

    let got = events(&mut einstein, 10, WAIT).await;
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();
    let schemas = Schemas::load();
    for m in &got {
        assert_valid(&schemas.message, m, "a message from a reva event");
    }
    let summary: Vec<String> = got
        .iter()
        .map(|m| {
            let item = &m["item"];
            match m["type"].as_str().unwrap() {
                "space-member-added" | "space-member-removed" => format!(
                    "{} {}",
                    m["type"].as_str().unwrap(),
                    m["member"]["user"]
                        .as_str()
                        .or(m["member"]["group"].as_str())
                        .unwrap()
                ),
                "resync" => format!("resync {}", m["reason"]),
                t => format!(
                    "{t} {}{} {}",
                    item["old_path"]
                        .as_str()
                        .map(|p| format!("{p} -> "))
                        .unwrap_or_default(),
                    item["path"].as_str().unwrap(),
                    item["size"]
                ),
            }
        })
        .collect();
    assert_eq!(
        summary,
        [
            "folder-created /reports 0",
            "file-touched /reports/notes.md 0",
            "file-uploaded /reports/q1.pdf 1234",
            "item-moved /reports/q1.pdf -> /reports/q1-final.pdf 1234",
            "item-trashed /reports/q1-final.pdf 1234",
            &format!("space-member-added {MARIE}"),
            &format!("space-member-removed {PHYSICS_GROUP}"),
            "folder-created /reports/2026 0",
            "item-restored /reports/q1-final.pdf 1234",
            "file-uploaded /reports/q1-final.pdf 1234",
        ],
        "log:\n{}",
        logged()
    );
    // Ids are reva's event ids; the initiator and the actor come through.
    let ids: Vec<&str> = got
        .iter()
        .map(|m| m["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "ocis-001", "ocis-002", "ocis-003", "ocis-004", "ocis-005", "ocis-006", "ocis-007",
            "ocis-012", "ocis-016", "ocis-017"
        ]
    );
    assert_eq!(got[0]["initiator_id"], "tab-einstein");
    assert!(got[1].get("initiator_id").is_none(), "{}", got[1]);
    assert_eq!(got[0]["actor"], EINSTEIN);
    assert_eq!(got[2]["actor"], MARIE, "UploadReady's ExecutingUser");
    assert_eq!(got[2]["item"]["item_id"], q1.as_str());
    // Ids come from oCIS, for clients that fetch items by id (ownCloud Web): a created folder's
    // by path (WebDAV), an upload's parent from the graph item.
    assert_eq!(got[0]["item"]["item_id"], reports.as_str());
    assert_eq!(
        got[0]["item"]["parent_id"],
        format!("{}!{SPACE_UUID}", drive())
    );
    assert_eq!(got[2]["item"]["parent_id"], reports.as_str());
    assert!(
        got[1]["item"].get("parent_id").is_none(),
        "not in oCIS: sent without ids"
    );
    assert_eq!(got[2]["item"]["etag"], "\"9f1c0e3a\"");
    // The upload's change is exact (a new file); the move and the trash carry the size.
    let reports: i64 = got
        .iter()
        .flat_map(common::folder_changes)
        .filter(|(f, _)| f == "/reports")
        .map(|(_, d)| d)
        .sum();
    assert_eq!(
        reports, 1234,
        "uploaded, moved within, trashed, restored, its version restored (same size): 1234"
    );
    assert_eq!(
        common::folder_changes(&got[9]),
        [("/reports".to_owned(), 0), ("/".to_owned(), 0)],
        "a restored version of a file seen before: an exact change"
    );
    // A group member saw the space until the group was removed from it.
    let richard_got = events(&mut richard, 7, WAIT).await;
    assert_eq!(
        richard_got.last().unwrap()["type"],
        "space-member-removed",
        "{richard_got:?}"
    );

    // Both refused envelopes are dead letters, with their reasons.
    let js = stream.context().await;
    let dlq = js.get_stream(&stream.dead_letters).await.unwrap();
    let mut reasons = Vec::new();
    for seq in 1..=2 {
        let m = dlq.get_raw_message(seq).await.unwrap();
        let headers = m.headers;
        reasons.push(
            headers
                .get("Foldercast-Rejection")
                .map(|v| v.to_string())
                .unwrap_or_default(),
        );
        assert!(headers.get("Foldercast-Position").is_some());
    }
    assert_eq!(reasons, ["invalid-field", "invalid-json"]);
    stream.until_all_acknowledged(&log).await;
    assert!(
        logged().contains("event rejected"),
        "rejections are logged with their position"
    );
}

/// A go-micro envelope as oCIS writes it: the reva event's JSON, standard base64.
fn envelope(reva_type: &str, event_id: &str, payload: &Value) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(payload.to_string());
    json!({
        "Timestamp": "2026-11-30T08:00:00.5+01:00",
        "Metadata": {"eventtype": format!("events.{reva_type}"), "eventid": event_id,
                     "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                     "initiatorid": ""},
        "ID": format!("env-{event_id}"),
        "Topic": "main-queue",
        "Payload": encoded,
    })
    .to_string()
}

fn resource(space: &str, opaque: &str) -> Value {
    json!({"storage_id": STORAGE, "opaque_id": opaque, "space_id": space})
}

/// `UploadReady` of `path` in `space` (a bare space uuid), item `opaque`.
fn upload_ready(space: &str, path: &str, opaque: &str, is_version: bool, seconds: u64) -> Value {
    json!({
        "UploadID": format!("up-{opaque}"), "Filename": path.rsplit('/').next(),
        "SpaceOwner": {"idp": "https://ocis.example", "opaque_id": space, "type": 8},
        "ExecutingUser": {"id": {"idp": "https://ocis.example", "opaque_id": EINSTEIN, "type": 1},
                          "username": "einstein"},
        "ImpersonatingUser": null,
        "FileRef": {"resource_id": resource(space, space), "path": format!(".{path}")},
        "ResourceID": resource(space, opaque),
        "Timestamp": {"seconds": seconds},
        "Failed": false,
        "IsVersion": is_version,
    })
}

/// Folder sizes by (space, folder).
type Sizes = BTreeMap<(String, String), i64>;

/// What one user's client saw: each event id with how often it came, folder sizes summed from
/// every `size_delta`, and resyncs.
#[derive(Default, Debug)]
struct Seen {
    ids: HashMap<String, u32>,
    sizes: Sizes,
    resyncs: Vec<Value>,
}

impl Seen {
    fn take(&mut self, m: &Value) {
        let space = m["space_id"].as_str().unwrap_or_default().to_owned();
        match m["type"].as_str() {
            Some("resync") => self.resyncs.push(m.clone()),
            Some("coalesced") => {
                for id in m["event_ids"].as_array().unwrap() {
                    *self.ids.entry(id.as_str().unwrap().to_owned()).or_default() += 1;
                }
            }
            _ => {
                *self
                    .ids
                    .entry(m["event_id"].as_str().unwrap().to_owned())
                    .or_default() += 1
            }
        }
        for (folder, delta) in common::folder_changes(m) {
            *self.sizes.entry((space.clone(), folder)).or_default() += delta;
        }
    }
}

/// Reads `ws` into a shared [`Seen`] until the task is aborted.
fn watch(
    mut ws: Ws,
) -> (
    std::sync::Arc<std::sync::Mutex<Seen>>,
    tokio::task::JoinHandle<()>,
) {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
    let shared = seen.clone();
    let task = tokio::spawn(async move {
        while let Some(frame) = next_frame(&mut ws, Duration::from_secs(3600)).await {
            if frame["type"] == "event" || frame["type"] == "resync" {
                shared.lock().unwrap().take(&frame["data"]);
            }
        }
    });
    (seen, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_mid_stream_under_the_rate_limit_delivers_every_event_once() {
    const EVENTS: usize = 900;
    let spaces: Vec<String> = (0..3).map(|s| format!("{}-{s}", unique("sp"))).collect();
    let drive_of = |s: usize| format!("{STORAGE}${}", spaces[s]);
    let users: Vec<String> = (0..4).map(|u| unique(&format!("user{u}"))).collect();
    // u0 everywhere, u1 in 0 and 1, u2 in 2, u3 in 1 and 2.
    let member = |u: usize, s: usize| matches!((u, s), (0, _) | (1, 0 | 1) | (2, 2) | (3, 1 | 2));
    let graph = LibreGraph::start().await;
    for s in 0..3 {
        graph.project(
            &drive_of(s),
            (0..4)
                .filter(|&u| member(u, s))
                .map(|u| user_grant(&users[u], SPACE_EDITOR))
                .collect(),
        );
    }
    let prefix = unique("kill");
    let mut lines = String::new();
    let mut expected: Vec<(Vec<String>, Sizes)> = vec![Default::default(); 4];
    for i in 0..EVENTS {
        let s = i % 3;
        let path = format!("/d{}/sub/f{i}.bin", i % 5);
        let opaque = format!("n{i}");
        let size = (i + 1) as u64;
        graph.item(&drive_of(s), Item::file(&drive_of(s), &opaque, &path, size));
        let id = format!("{prefix}-{i}");
        lines.push_str(&envelope(
            "UploadReady",
            &id,
            &upload_ready(&spaces[s], &path, &opaque, false, 1_795_942_800 + i as u64),
        ));
        lines.push('\n');
        for (u, (ids, sizes)) in expected.iter_mut().enumerate() {
            if member(u, s) {
                ids.push(id.clone());
                for folder in [
                    format!("/d{}/sub", i % 5),
                    format!("/d{}", i % 5),
                    "/".into(),
                ] {
                    *sizes.entry((drive_of(s), folder)).or_default() += size as i64;
                }
            }
        }
    }
    // Slow enough lookups that the kill lands mid-stream.
    graph.latency(Duration::from_millis(8));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("envelopes.jsonl");
    std::fs::write(&file, lines).unwrap();

    let redis = PrivateRedis::start();
    let server = gateway(&Redis::Standalone(redis.url()), &["--send-queue", "10000"]).await;
    let mut watched = Vec::new();
    for user in &users {
        watched.push(watch(connect(&server, user).await));
    }
    let stream = Stream::new();
    stream.load(&file).await;
    let log = dir.path().join("consume.log");
    // The default shaping: the rate limiter engaged.
    let mut consumer = stream.consume(&graph, &redis.url(), &[], &log);
    let progress = || watched[0].0.lock().unwrap().ids.len();
    for _ in 0..600 {
        if progress() >= EVENTS / 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let at_kill = progress();
    assert!(
        (EVENTS / 4..EVENTS).contains(&at_kill),
        "killed mid-stream ({at_kill} of {EVENTS}); log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    consumer.start_kill().unwrap();
    consumer.wait().await.unwrap();
    eprintln!("killed with SIGKILL after {at_kill} of {EVENTS} events reached user 0");
    let log2 = dir.path().join("consume-2.log");
    let mut consumer = stream.consume(&graph, &redis.url(), &[], &log2);
    for _ in 0..1200 {
        let done = (0..4).all(|u| watched[u].0.lock().unwrap().ids.len() >= expected[u].0.len());
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stream.until_all_acknowledged(&log2).await;
    // Anything late would show now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = common::stop_with(&mut consumer, "TERM", Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");

    for (u, (seen, task)) in watched.iter().enumerate() {
        task.abort();
        let seen = seen.lock().unwrap();
        let (ids, sizes) = &expected[u];
        let missing: Vec<&String> = ids
            .iter()
            .filter(|id| !seen.ids.contains_key(*id))
            .collect();
        let twice: Vec<(&String, &u32)> = seen.ids.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            missing.is_empty() && twice.is_empty() && seen.ids.len() == ids.len(),
            "user {u}: {} missing (first {:?}), {} twice (first {:?}), {} received for {} expected; killed at {at_kill}",
            missing.len(),
            missing.first(),
            twice.len(),
            twice.first(),
            seen.ids.len(),
            ids.len()
        );
        assert!(seen.resyncs.is_empty(), "user {u}: {:?}", seen.resyncs);
        assert_eq!(
            &seen.sizes, sizes,
            "user {u}: folder sizes from every size_delta"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_that_cannot_be_exact_resync_the_space_and_exact_ones_carry_the_change() {
    let graph = LibreGraph::start().await;
    physics(&graph);
    let item = |node: &str, path: &str, size: u64| Item::file(&drive(), node, path, size);
    graph.item(&drive(), item("a", "/docs/a.txt", 100));
    graph.item(&drive(), item("b", "/docs/b.txt", 50));
    let redis = PrivateRedis::start();
    let server = gateway(&Redis::Standalone(redis.url()), &[]).await;
    let mut einstein = connect(&server, EINSTEIN).await;
    let stream = Stream::new();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, lines: Vec<String>| {
        let path = dir.path().join(name);
        std::fs::write(&path, lines.join("\n")).unwrap();
        path
    };
    let prefix = unique("exact");
    let id = |n: u32| format!("{prefix}-{n}");
    // An overwrite of a file never seen, a new file, a file gone by the time it is asked for,
    // and a move whose old path is relative to a folder (not the space root).
    let moved = json!({
        "Executant": {"idp": "https://ocis.example", "opaque_id": EINSTEIN, "type": 1},
        "Ref": {"resource_id": resource(SPACE_UUID, SPACE_UUID), "path": "./docs/b.txt"},
        "OldReference": {"resource_id": resource(SPACE_UUID, "some-folder"), "path": "./b.txt"},
        "Timestamp": {"seconds": 1_795_942_900u64},
    });
    stream
        .load(&write(
            "first.jsonl",
            vec![
                envelope(
                    "UploadReady",
                    &id(1),
                    &upload_ready(SPACE_UUID, "/docs/a.txt", "a", true, 1_795_942_801),
                ),
                envelope(
                    "UploadReady",
                    &id(2),
                    &upload_ready(SPACE_UUID, "/docs/b.txt", "b", false, 1_795_942_802),
                ),
                envelope(
                    "UploadReady",
                    &id(3),
                    &upload_ready(SPACE_UUID, "/docs/gone.txt", "gone", false, 1_795_942_803),
                ),
                envelope("ItemMoved", &id(4), &moved),
            ],
        ))
        .await;
    let log = dir.path().join("consume.log");
    let _consumer = stream.consume(&graph, &redis.url(), &["--user-rate", "0"], &log);
    let got = events(&mut einstein, 4, WAIT).await;
    let schemas = Schemas::load();
    for m in &got {
        assert_valid(&schemas.message, m, "a message from a lookup");
    }
    let kinds: Vec<(&str, &str)> = got
        .iter()
        .map(|m| (m["type"].as_str().unwrap(), m["event_id"].as_str().unwrap()))
        .collect();
    let (i1, i2, i3, i4) = (id(1), id(2), id(3), id(4));
    assert_eq!(
        kinds,
        [
            ("resync", i1.as_str()),
            ("file-uploaded", i2.as_str()),
            ("resync", i3.as_str()),
            ("resync", i4.as_str())
        ],
        "{got:?}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    for r in [&got[0], &got[2], &got[3]] {
        assert_eq!(
            (&r["reason"], &r["space_id"]),
            (&json!("source"), &json!(drive()))
        );
    }
    assert_eq!(
        common::folder_changes(&got[1]),
        [("/docs".to_owned(), 50), ("/".to_owned(), 50)]
    );

    // b was seen at 50 bytes: an overwrite to 80 is an exact +30.
    graph.item(&drive(), item("b", "/docs/b.txt", 80));
    stream
        .load(&write(
            "second.jsonl",
            vec![envelope(
                "UploadReady",
                &id(5),
                &upload_ready(SPACE_UUID, "/docs/b.txt", "b", true, 1_795_942_805),
            )],
        ))
        .await;
    let got = events(&mut einstein, 1, WAIT).await;
    assert_eq!(got[0]["type"], "file-uploaded", "{got:?}");
    assert_eq!(got[0]["item"]["size"], 80);
    assert_eq!(
        common::folder_changes(&got[0]),
        [("/docs".to_owned(), 30), ("/".to_owned(), 30)]
    );
    stream.until_all_acknowledged(&log).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overwrite_nobody_saw_before_carries_absolute_folder_sizes_that_add_up_when_coalesced() {
    let graph = LibreGraph::start().await;
    physics(&graph);
    // oCIS's tree once the overwrite (a.txt: 100 → 150 bytes) and the upload before it
    // (x.txt, 10 bytes) happened; the folders were 300 and 1,000 bytes before either.
    let d = drive();
    graph.item(&d, Item::file(&d, "x", "/docs/x.txt", 10));
    graph.item(&d, Item::file(&d, "a", "/docs/a.txt", 150));
    graph.item(&d, Item::file(&d, "n", "/docs/n.txt", 30));
    graph.item(&d, Item::folder(&d, "docs", "/docs", 300 + 10 + 50));
    graph.item(&d, Item::folder(&d, SPACE_UUID, "/", 1000 + 10 + 50));
    let redis = PrivateRedis::start();
    let server = gateway(&Redis::Standalone(redis.url()), &[]).await;
    let mut einstein = connect(&server, EINSTEIN).await;
    let stream = Stream::new();
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("absolute");
    let id = |n: u32| format!("{prefix}-{n}");
    let fixture = dir.path().join("events.jsonl");
    std::fs::write(
        &fixture,
        [
            envelope(
                "UploadReady",
                &id(1),
                &upload_ready(SPACE_UUID, "/docs/x.txt", "x", false, 1_795_942_801),
            ),
            envelope(
                "UploadReady",
                &id(2),
                &upload_ready(SPACE_UUID, "/docs/a.txt", "a", true, 1_795_942_802),
            ),
            envelope(
                "UploadReady",
                &id(3),
                &upload_ready(SPACE_UUID, "/docs/n.txt", "n", false, 1_795_942_803),
            ),
        ]
        .join("\n"),
    )
    .unwrap();
    stream.load(&fixture).await;
    let log = dir.path().join("consume.log");
    // One message at once, then one every 5 s: the overwrite and the upload after it are
    // held and leave as one coalesced message.
    let _consumer = stream.consume(
        &graph,
        &redis.url(),
        &["--user-rate", "0.2", "--user-burst", "1"],
        &log,
    );
    let got = events(&mut einstein, 2, WAIT).await;
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(got.len(), 2, "{got:?}\n{}", logged());
    let schemas = Schemas::load();
    for m in &got {
        assert_valid(&schemas.message, m, "a message with absolute folder sizes");
    }
    assert_eq!(got[0]["type"], "file-uploaded", "{got:?}");
    assert_eq!(got[1]["type"], "coalesced", "{got:?}");
    assert_eq!(got[1]["event_ids"], json!([id(2), id(3)]));
    let absolute: Vec<(&str, u64)> = got[1]["folders"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| Some((f["path"].as_str()?, f["size"].as_u64()?)))
        .collect();
    assert_eq!(absolute, [("/docs", 360), ("/", 1060)], "{}", got[1]);
    // A client that knew the sizes before ends with oCIS's sizes after all three.
    let mut sizes: BTreeMap<String, i64> =
        [("/docs".to_owned(), 300), ("/".to_owned(), 1000)].into();
    for m in &got {
        common::apply_folders(&mut sizes, m);
    }
    assert_eq!(sizes["/docs"], 300 + 10 + 50 + 30);
    assert_eq!(sizes["/"], 1000 + 10 + 50 + 30);
    // Each folder was read once, for the overwrite alone.
    for folder in ["propfind:{d}/docs", "propfind:{d}/"] {
        let key = folder.replace("{d}", &d);
        assert_eq!(graph.calls(&key), 1, "{key}");
    }
    stream.until_all_acknowledged(&log).await;
}

/// A nats-server of the test's own, to stop and start again (JetStream on disk).
struct PrivateNats {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl PrivateNats {
    fn start() -> PrivateNats {
        let mut n = PrivateNats {
            port: common::free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        n.restart();
        n
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn restart(&mut self) {
        self.stop();
        let binary = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("nats-server");
        let child = std::process::Command::new(binary)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("nats-server did not start on {}", self.port);
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_loses_nothing_and_the_consumer_carries_on() {
    let graph = LibreGraph::start().await;
    physics(&graph);
    let mut nats = PrivateNats::start();
    let mut stream = Stream::new();
    stream.url = nats.url();
    let redis = PrivateRedis::start();
    let server = gateway(&Redis::Standalone(redis.url()), &[]).await;
    let mut einstein = connect(&server, EINSTEIN).await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("restart");
    let created = |n: u32| {
        envelope(
            "ContainerCreated",
            &format!("{prefix}-{n}"),
            &json!({
                "Executant": {"idp": "https://ocis.example", "opaque_id": EINSTEIN, "type": 1},
                "Ref": {"resource_id": resource(SPACE_UUID, SPACE_UUID), "path": format!("./folder-{n}")},
                "Timestamp": {"seconds": 1_795_942_800u64 + u64::from(n)},
            }),
        )
    };
    let batch = |name: &str, range: std::ops::Range<u32>| {
        let path = dir.path().join(name);
        std::fs::write(&path, range.map(created).collect::<Vec<_>>().join("\n")).unwrap();
        path
    };
    stream.load(&batch("first.jsonl", 0..20)).await;
    let log = dir.path().join("consume.log");
    let mut consumer = stream.consume(&graph, &redis.url(), &["--user-rate", "0"], &log);
    let first = events(&mut einstein, 20, WAIT).await;
    assert_eq!(first.len(), 20);

    nats.restart();
    stream.load(&batch("second.jsonl", 20..40)).await;
    let second = events(&mut einstein, 20, Duration::from_secs(30)).await;
    let paths: Vec<String> = first
        .iter()
        .chain(&second)
        .map(|m| m["item"]["path"].as_str().unwrap().to_owned())
        .collect();
    let want: Vec<String> = (0..40).map(|n| format!("/folder-{n}")).collect();
    assert_eq!(
        paths,
        want,
        "every event once, in order, across the restart; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        consumer.try_wait().unwrap().is_none(),
        "the consumer rode the restart out"
    );
    stream.until_all_acknowledged(&log).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_waiting_on_ocis_past_the_ack_wait_is_kept_in_progress_not_delivered_again() {
    let graph = LibreGraph::start().await;
    physics(&graph);
    graph.item(&drive(), Item::file(&drive(), "wait", "/waiting.bin", 77));
    let redis = PrivateRedis::start();
    let server = gateway(&Redis::Standalone(redis.url()), &[]).await;
    let mut einstein = connect(&server, EINSTEIN).await;
    let stream = Stream::new();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("one.jsonl");
    let id = unique("wait");
    std::fs::write(
        &file,
        envelope(
            "UploadReady",
            &id,
            &upload_ready(SPACE_UUID, "/waiting.bin", "wait", false, 1_795_942_900),
        ),
    )
    .unwrap();
    let log = dir.path().join("consume.log");
    // Membership first (so only the item lookup fails), then oCIS answers 503 for three ack
    // waits (3 s each). The stream exists before the consumer starts (it looks it up).
    stream.load(&file).await;
    let _consumer = stream.consume(&graph, &redis.url(), &["--user-rate", "0"], &log);
    let got = events(&mut einstein, 1, WAIT).await;
    assert_eq!(got[0]["event_id"], id.as_str());
    graph.fail_with(Some(503));
    let id2 = unique("wait");
    std::fs::write(
        &file,
        envelope(
            "UploadReady",
            &id2,
            &upload_ready(SPACE_UUID, "/waiting.bin", "wait", false, 1_795_942_901),
        ),
    )
    .unwrap();
    stream.load(&file).await;
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert!(
        events(&mut einstein, 1, Duration::from_millis(300))
            .await
            .is_empty(),
        "the event waits for oCIS"
    );
    graph.fail_with(None);
    let got = events(&mut einstein, 1, WAIT).await;
    assert_eq!(got[0]["event_id"], id2.as_str());
    assert_eq!(got[0]["item"]["size"], 77);
    stream.until_all_acknowledged(&log).await;
    let js = stream.context().await;
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream(&stream.name)
        .await
        .unwrap()
        .get_consumer(&stream.durable)
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    // Every delivery, redeliveries included, takes a consumer sequence number.
    assert_eq!(
        (
            info.delivered.stream_sequence,
            info.delivered.consumer_sequence
        ),
        (2, 2),
        "kept in progress, never delivered again; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_at_its_last_delivery_is_dead_lettered_and_its_space_resynced() {
    let graph = LibreGraph::start().await;
    physics(&graph);
    let redis = PrivateRedis::start();
    let server = gateway(&Redis::Standalone(redis.url()), &[]).await;
    let mut einstein = connect(&server, EINSTEIN).await;
    let stream = Stream::new();
    let dir = tempfile::tempdir().unwrap();
    let warm = unique("warm");
    let id = unique("last");
    // Makes the membership cache warm before oCIS goes down.
    let warm_file = dir.path().join("warm.jsonl");
    std::fs::write(
        &warm_file,
        envelope(
            "FileTouched",
            &warm,
            &json!({"Executant": null, "Timestamp": {"seconds": 1_795_942_900u64},
                    "Ref": {"resource_id": resource(SPACE_UUID, SPACE_UUID), "path": "./warm.txt"}}),
        ),
    )
    .unwrap();
    let file = dir.path().join("late.jsonl");
    std::fs::write(
        &file,
        envelope(
            "UploadReady",
            &id,
            &upload_ready(SPACE_UUID, "/late.bin", "late", false, 1_795_942_901),
        ),
    )
    .unwrap();
    let limit = ["--user-rate", "0", "--nats-max-deliver", "2"];
    let log = dir.path().join("consume.log");
    stream.load(&warm_file).await;
    let mut consumer = stream.consume(&graph, &redis.url(), &limit, &log);
    let got = events(&mut einstein, 1, WAIT).await;
    assert_eq!(got[0]["event_id"], warm.as_str());
    // oCIS fails the upload's lookup; the consumer dies while it waits (first delivery).
    graph.fail_items(true);
    stream.load(&file).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    consumer.start_kill().unwrap();
    consumer.wait().await.unwrap();
    // The second delivery is the last: dead-lettered, and the space resynced rather than risk
    // the lookup again (oCIS is still down).
    let log2 = dir.path().join("consume-2.log");
    let _consumer = stream.consume(&graph, &redis.url(), &limit, &log2);
    let got = events(&mut einstein, 1, WAIT).await;
    assert_eq!(
        (&got[0]["type"], &got[0]["event_id"], &got[0]["reason"]),
        (&json!("resync"), &json!(id), &json!("source")),
        "{got:?}\n{}",
        std::fs::read_to_string(&log2).unwrap_or_default()
    );
    let js = stream.context().await;
    let dlq = js.get_stream(&stream.dead_letters).await.unwrap();
    let m = dlq.get_raw_message(1).await.unwrap();
    assert_eq!(
        m.headers
            .get("Foldercast-Rejection")
            .map(|v| v.to_string())
            .as_deref(),
        Some("max-deliveries")
    );
    let original: Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(
        original["Metadata"]["eventid"],
        id.as_str(),
        "the envelope as oCIS sent it"
    );
    stream.until_all_acknowledged(&log2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ocis_services_durable_name_is_refused_at_start() {
    let out = tokio::process::Command::new(common::bin())
        .args([
            "consume",
            "--nats",
            &common::server_env("FOLDERCAST_TEST_NATS"),
        ])
        .args(["--nats-durable", "clientlog", "--membership"])
        .arg(root().join("fixtures/demo/membership.json"))
        .args(["--redis", &common::redis_url()])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("is the consumer of oCIS's clientlog service"),
        "{stderr}"
    );
}

/// A consumer started before oCIS created its stream waits for it, then consumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_started_before_the_stream_waits_for_it() {
    let graph = LibreGraph::start().await;
    physics(&graph);
    let redis = PrivateRedis::start();
    let server = gateway(&Redis::Standalone(redis.url()), &[]).await;
    let mut einstein = connect(&server, EINSTEIN).await;
    let stream = Stream::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("consume.log");
    let mut consumer = stream.consume(&graph, &redis.url(), &["--user-rate", "0"], &log);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        consumer.try_wait().unwrap().is_none(),
        "still running, waiting"
    );
    let file = dir.path().join("late.jsonl");
    let id = unique("late-stream");
    std::fs::write(
        &file,
        envelope(
            "FileTouched",
            &id,
            &json!({"Executant": null, "Timestamp": {"seconds": 1_795_942_950u64},
                    "Ref": {"resource_id": resource(SPACE_UUID, SPACE_UUID), "path": "./late.txt"}}),
        ),
    )
    .unwrap();
    stream.load(&file).await;
    let got = events(&mut einstein, 1, WAIT).await;
    assert_eq!(
        got.first().map(|m| m["event_id"].clone()),
        Some(json!(id)),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// An operator who stops a consumer while it still waits for its stream (or connects) gets a
/// clean exit, not a death by signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_stopped_while_waiting_for_its_stream_exits_cleanly() {
    let graph = LibreGraph::start().await;
    physics(&graph);
    let redis = PrivateRedis::start();
    let stream = Stream::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("consume.log");
    let mut consumer = stream.consume(&graph, &redis.url(), &["--user-rate", "0"], &log);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(consumer.try_wait().unwrap().is_none(), "waiting");
    let status = common::stop_with(&mut consumer, "TERM", Duration::from_secs(10)).await;
    assert!(
        status.success(),
        "{status}: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}
