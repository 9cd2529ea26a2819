//! The production shape's pieces for end-to-end tests: the gateway and `consume` processes over
//! real Redis and Kafka, a topic per test, fixture events produced with `replay --to-kafka`, and
//! a WebSocket client reading frames.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::process::{Child, Command};

use tokio_tungstenite::tungstenite::Message;

use super::{Server, kafka_brokers, token, unique};

/// `consume` without a rate limit (the tests that count frames one per event).
pub const NO_LIMIT: &[&str] = &["--user-rate", "0"];

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

#[derive(Clone)]
pub enum Redis {
    Standalone(String),
    Cluster(Vec<String>),
}

impl Redis {
    fn args(&self) -> Vec<String> {
        match self {
            Redis::Standalone(url) => vec!["--redis".into(), url.clone()],
            Redis::Cluster(nodes) => vec!["--redis-cluster".into(), nodes.join(",")],
        }
    }
}

pub async fn gateway(redis: &Redis, extra: &[&str]) -> Server {
    let mut args: Vec<String> = vec![
        "gateway".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--jwt-secret".into(),
        super::SECRET.into(),
    ];
    args.extend(redis.args());
    args.extend(extra.iter().map(|s| s.to_string()));
    Server::spawn(&args, false).await
}

pub struct Topic {
    pub name: String,
    pub group: String,
    pub dead_letter: String,
}

pub fn topic() -> Topic {
    Topic {
        name: unique("events"),
        group: unique("group"),
        dead_letter: unique("dlq"),
    }
}

/// Starts `foldercast consume`; its stderr goes to `log` when given.
pub fn consume(t: &Topic, membership: &Path, redis: &Redis, log: Option<&Path>) -> Child {
    let membership = ["--membership".to_owned(), membership.display().to_string()];
    consume_with(t, &membership, &[], redis, log, NO_LIMIT)
}

/// `consume` with its membership flags (`--membership F` or `--ocis-url U …`) and extra
/// environment given.
pub fn consume_with(
    t: &Topic,
    membership: &[String],
    env: &[(&str, &str)],
    redis: &Redis,
    log: Option<&Path>,
    shaping: &[&str],
) -> Child {
    let mut cmd = Command::new(super::bin());
    cmd.args([
        "consume",
        "--brokers",
        &kafka_brokers(),
        "--topic",
        &t.name,
        "--group",
        &t.group,
        "--dead-letter-topic",
        &t.dead_letter,
    ])
    .args(membership)
    .args(redis.args())
    .args(shaping)
    .args(["--session-timeout", "6s", "--commit-interval", "200ms"])
    .env("FOLDERCAST_LOG", "info")
    .envs(env.iter().copied())
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .kill_on_drop(true);
    match log {
        Some(path) => cmd.stderr(std::fs::File::create(path).unwrap()),
        None => cmd.stderr(Stdio::inherit()),
    };
    cmd.spawn().expect("start consume")
}

pub async fn produce(t: &Topic, events: &Path) {
    let status = Command::new(super::bin())
        .args([
            "replay",
            "--to-kafka",
            "--brokers",
            &kafka_brokers(),
            "--topic",
            &t.name,
            "--partitions",
            "3",
            "--events",
        ])
        .arg(events)
        .env("FOLDERCAST_LOG", "warn")
        .status()
        .await
        .unwrap();
    assert!(status.success(), "replay --to-kafka failed");
}

/// A copy of the fixture at `path` whose event ids end in `.<tag>`. Redis outlives a test
/// (and, on a developer's machine, a whole run): the exactly-once guard rightly drops an event
/// id it has delivered before, so tests against shared servers need ids of their own. Lines
/// that are not JSON objects with a string id are copied as they are (bad input stays bad).
pub fn tagged_fixture(path: &Path, tag: &str) -> tempfile::NamedTempFile {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        match serde_json::from_str::<Value>(line) {
            Ok(mut v) if v["id"].is_string() => {
                let id = format!("{}.{tag}", v["id"].as_str().unwrap_or_default());
                v["id"] = Value::String(id);
                out.push_str(&v.to_string());
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), out).unwrap();
    file
}

/// Creates the 3-partition topic before a consumer subscribes: a consumer that starts on a
/// missing topic may see it only at its next metadata refresh (minutes), which made tests that
/// start the consumer first flaky.
pub async fn create_topic(t: &Topic) {
    let empty = tempfile::NamedTempFile::new().unwrap();
    produce(t, empty.path()).await;
}

pub async fn connect(server: &Server, user: &str) -> Ws {
    let mut ws = testkit::ws::open(&server.ws_url("/ws"), Some(&token(user)), None)
        .await
        .expect("connect");
    testkit::ws::ready(&mut ws, Duration::from_secs(10))
        .await
        .expect("ready");
    ws
}

pub async fn next_frame(ws: &mut Ws, wait: Duration) -> Option<Value> {
    loop {
        match tokio::time::timeout(wait, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return Some(serde_json::from_str(&t).unwrap()),
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => {
                panic!("the gateway closed a client connection")
            }
            Ok(Some(Ok(_))) => continue,
            Err(_) => return None,
        }
    }
}

/// Reads event frames until `count` arrived (or `wait` passes without one).
pub async fn collect(ws: &mut Ws, count: usize, wait: Duration) -> Vec<(String, Value)> {
    let mut got = Vec::new();
    while got.len() < count {
        let Some(frame) = next_frame(ws, wait).await else {
            break;
        };
        if frame["type"] == "event" {
            got.push((
                frame["id"].as_str().unwrap().to_owned(),
                frame["data"].clone(),
            ));
        }
    }
    got
}
