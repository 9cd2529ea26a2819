//! oCIS's event bus in tests: a JetStream stream loaded with `replay --to-nats`, a
//! `consume --nats` on it, and the space the fixture (`fixtures/ocis/events.jsonl`) names with
//! its members on the LibreGraph test server.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use async_nats::jetstream;
use tokio::process::{Child, Command};

use super::libregraph::{
    Item, LibreGraph, MANAGER, SPACE_EDITOR, SPACE_VIEWER, group_grant, user_grant,
};
use super::{bin, server_env, unique};

pub const STORAGE: &str = "1284d238-aa92-42ce-bdc4-0b0000009157";
pub const SPACE_UUID: &str = "b6a1c2d3-5e6f-4a1b-9c8d-7e6f5a4b3c2d";
pub const EINSTEIN: &str = "4c510ada-c86b-4815-8820-42cdf82c3d51";
pub const MARIE: &str = "f7fbf8c8-139b-4376-b307-cf0a8c2d0d9c";
pub const RICHARD: &str = "932b4540-8d16-481e-8ef4-588e4b6b151c";
pub const PHYSICS_GROUP: &str = "167cbee2-0518-455a-bfb2-031fe0621e5d";

/// The fixture's space as a graph drive id.
pub fn drive() -> String {
    format!("{STORAGE}${SPACE_UUID}")
}

/// A stream of its own per test (and a durable consumer and dead-letter subject).
pub struct Stream {
    pub url: String,
    pub name: String,
    pub durable: String,
    pub dead_letters: String,
}

impl Stream {
    pub fn new() -> Stream {
        Stream {
            url: server_env("FOLDERCAST_TEST_NATS"),
            name: unique("reva").replace('.', "-"),
            durable: unique("fc").replace('.', "-"),
            dead_letters: unique("dlq").replace('.', "-"),
        }
    }

    /// Writes a file of envelopes into the stream with `replay --to-nats`.
    pub async fn load(&self, envelopes: &Path) {
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
    pub fn consume(&self, graph: &LibreGraph, redis: &str, shaping: &[&str], log: &Path) -> Child {
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

    pub async fn context(&self) -> jetstream::Context {
        jetstream::new(async_nats::connect(&self.url).await.unwrap())
    }

    /// Waits until the durable consumer has nothing pending and nothing unacknowledged.
    pub async fn until_all_acknowledged(&self, log: &Path) {
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

/// The fixture's items as oCIS shows them when asked, later than the events: the folder
/// `/reports` (node `7d2e`) and the file uploaded as `/reports/q1.pdf`, moved to
/// `/reports/q1-final.pdf`, trashed and restored (node `9f1c0e3a`, 1,234 bytes): both in place
/// and in the trash bin.
pub fn fixture_items(graph: &LibreGraph) {
    let q1 = Item::file(&drive(), "9f1c0e3a", "/reports/q1-final.pdf", 1234);
    graph.item(&drive(), q1.clone());
    graph.trash(&drive(), &q1.id, "9f1c0e3a");
    graph.item(&drive(), q1);
    graph.item(&drive(), Item::folder(&drive(), "7d2e", "/reports", 0));
}

/// The fixture's space: Einstein manages it, Marie edits, the physics group (Richard) views.
pub fn physics(graph: &LibreGraph) {
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
