//! oCIS's own events through the real binary: reva envelopes in a real nats-server's
//! JetStream, `foldercast consume --nats` completing them through the LibreGraph test server's
//! item and WebDAV routes, Redis, the gateway, and WebSocket clients.
//!
//! - the fixture (`fixtures/ocis/events.jsonl`): every mapping reaches the space's members as
//!   the table in its README says, refused envelopes are dead-lettered with their reason, and
//!   every message of the stream ends acknowledged;
//! - lookups that cannot be exact (an overwrite of a file never seen, an item gone by the time
//!   it is asked for) resync the space instead of guessing;
//! - a consumer killed with SIGKILL mid-stream, under the default rate limit: after a restart
//!   every event reaches every member exactly once, and folder sizes add up.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use async_nats::jetstream;
use base64::Engine;
use common::libregraph::{
    Item, LibreGraph, MANAGER, SPACE_EDITOR, SPACE_VIEWER, group_grant, user_grant,
};
use common::pipeline::{Redis, Ws, connect, gateway, next_frame};
use common::{PrivateRedis, Schemas, assert_valid, bin, root, server_env, unique};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

const STORAGE: &str = "1284d238-aa92-42ce-bdc4-0b0000009157";
const SPACE_UUID: &str = "b6a1c2d3-5e6f-4a1b-9c8d-7e6f5a4b3c2d";
const EINSTEIN: &str = "4c510ada-c86b-4815-8820-42cdf82c3d51";
const MARIE: &str = "f7fbf8c8-139b-4376-b307-cf0a8c2d0d9c";
const RICHARD: &str = "932b4540-8d16-481e-8ef4-588e4b6b151c";
const PHYSICS_GROUP: &str = "167cbee2-0518-455a-bfb2-031fe0621e5d";
const WAIT: Duration = Duration::from_secs(20);

fn drive() -> String {
    format!("{STORAGE}${SPACE_UUID}")
}

struct Stream {
    url: String,
    name: String,
    durable: String,
    dead_letters: String,
}

impl Stream {
    fn new() -> Stream {
        Stream {
            url: server_env("FOLDERCAST_TEST_NATS"),
            name: unique("reva").replace('.', "-"),
            durable: unique("fc").replace('.', "-"),
            dead_letters: unique("dlq").replace('.', "-"),
        }
    }

    /// Writes a file of envelopes into the stream with `replay --to-nats`.
    async fn load(&self, envelopes: &Path) {
        let out = Command::new(bin())
            .args(["replay", "--events"])
            .arg(envelopes)
            .args(["--to-nats", &self.url, "--nats-stream", &self.name])
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `foldercast consume --nats` against this stream, oCIS at `graph`, and `redis`.
    fn consume(&self, graph: &LibreGraph, redis: &str, shaping: &[&str], log: &Path) -> Child {
        Command::new(bin())
            .args(["consume", "--nats", &self.url, "--nats-stream", &self.name])
            .args(["--nats-durable", &self.durable, "--nats-start", "all"])
            .args(["--nats-dead-letter-subject", &self.dead_letters])
            .args(["--nats-ack-wait", "3s"])
            .args(["--ocis-url", &graph.url, "--redis", redis])
            .args(shaping)
            .env("FOLDERCAST_OCIS_TOKEN", "admin-token")
            .env("FOLDERCAST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("start consume")
    }

    async fn context(&self) -> jetstream::Context {
        jetstream::new(async_nats::connect(&self.url).await.unwrap())
    }

    /// Waits until the durable consumer has nothing pending and nothing unacknowledged.
    async fn until_all_acknowledged(&self, log: &Path) {
        let js = self.context().await;
        let mut last = String::new();
        for _ in 0..100 {
            let mut stream = js.get_stream(&self.name).await.unwrap();
            let _ = &mut stream;
            let mut consumer: jetstream::consumer::PullConsumer =
                stream.get_consumer(&self.durable).await.unwrap();
            let info = consumer.info().await.unwrap();
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                return;
            }
            last = format!(
                "pending {} unacknowledged {}",
                info.num_pending, info.num_ack_pending
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "the consumer never acknowledged everything ({last}); log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
}

/// The event frames' data a client received, waiting up to `wait` for each.
async fn events(ws: &mut Ws, count: usize, wait: Duration) -> Vec<Value> {
    let mut got = Vec::new();
    while got.len() < count {
        let Some(frame) = next_frame(ws, wait).await else {
            break;
        };
        if frame["type"] == "event" {
            got.push(frame["data"].clone());
        }
    }
    got
}

fn physics(graph: &LibreGraph) {
    graph.project(
        &drive(),
        vec![
            user_grant(EINSTEIN, MANAGER),
            user_grant(MARIE, SPACE_EDITOR),
            group_grant(PHYSICS_GROUP, SPACE_VIEWER),
        ],
    );
    graph.group(PHYSICS_GROUP, &[RICHARD]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reva_event_of_the_fixture_reaches_the_members_as_its_table_says() {
    let graph = LibreGraph::start().await;
    physics(&graph);
    // The item as oCIS shows it when asked (later than the events: moved, then trashed).
    let q1 = format!("{}!9f1c0e3a", drive());
    graph.item(
        &drive(),
        Item {
            id: q1.clone(),
            path: "/reports/q1-final.pdf".into(),
            size: 1234,
            etag: "\"e-q1\"".into(),
            folder: false,
        },
    );
    graph.trash(&drive(), &q1, "9f1c0e3a");
    graph.item(
        &drive(),
        Item {
            id: q1.clone(),
            path: "/reports/q1-final.pdf".into(),
            size: 1234,
            etag: "\"e-q1\"".into(),
            folder: false,
        },
    );
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

    let got = events(&mut einstein, 8, WAIT).await;
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
            "ocis-012"
        ]
    );
    assert_eq!(got[0]["initiator_id"], "tab-einstein");
    assert!(got[1].get("initiator_id").is_none(), "{}", got[1]);
    assert_eq!(got[0]["actor"], EINSTEIN);
    assert_eq!(got[2]["actor"], MARIE, "UploadReady's ExecutingUser");
    assert_eq!(got[2]["item"]["item_id"], q1.as_str());
    assert_eq!(got[2]["item"]["etag"], "\"e-q1\"");
    // The upload's change is exact (a new file); the move and the trash carry the size.
    let reports: i64 = got
        .iter()
        .flat_map(|m| common::folder_changes(m))
        .filter(|(f, _)| f == "/reports")
        .map(|(_, d)| d)
        .sum();
    assert_eq!(
        reports, 0,
        "uploaded, moved within, trashed: /reports is back to 0"
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
