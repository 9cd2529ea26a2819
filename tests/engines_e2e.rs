//! Production shape, end to end, against the real servers scripts/test.sh starts:
//! `replay --to-kafka` → Kafka (tansu) → `consume` → Redis / Redis Cluster → `gateway` → clients.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::pipeline::{
    NO_LIMIT, Redis, collect, connect, consume, consume_with, create_topic, gateway, next_frame,
    produce, tagged_fixture, topic,
};
use common::{
    PrivateRedis, Server, demo_membership, kafka_brokers, redis_cluster_nodes, redis_url,
    replay_print, root, token, unique,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::process::Command;
use tokio_tungstenite::tungstenite::Message;

/// The stream id of a position (`<epoch>:<ms>-<seq>`).
fn stream_id(position: &str) -> (u64, u64) {
    let (_, id) = position.split_once(':').expect("a position");
    let (a, b) = id.split_once('-').expect("a Redis stream id");
    (a.parse().unwrap(), b.parse().unwrap())
}

/// Per space, the messages in order: partitions run in parallel, so only a space's order is fixed.
fn by_space(messages: &[Value]) -> BTreeMap<String, Vec<Value>> {
    let mut map: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for m in messages {
        map.entry(m["space_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(m.clone());
    }
    map
}

async fn kafka_to_clients(redis: Redis) {
    let tagged = tagged_fixture(&root().join("fixtures/demo/events.jsonl"), &unique("k2c"));
    let events = tagged.path().to_owned();
    let (pairs, _, _) = replay_print(&events, &demo_membership(), &[]);
    let mut expected: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for (u, m) in pairs {
        expected.entry(u).or_default().push(m);
    }
    let server = gateway(&redis, &[]).await;
    let mut clients = Vec::new();
    for user in ["alice", "bob", "carol", "dave", "erin", "frank"] {
        clients.push((user, connect(&server, user).await));
    }
    let sse = reqwest::Client::new()
        .get(server.url("/sse"))
        .bearer_auth(token("erin"))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    let mut sse_stream = sse.bytes_stream();

    let t = topic();
    create_topic(&t).await;
    let mut consumer = consume(&t, &demo_membership(), &redis, None);
    produce(&t, &events).await;

    for (user, ws) in clients.iter_mut() {
        let want = expected.get(*user).cloned().unwrap_or_default();
        let got = collect(ws, want.len(), Duration::from_secs(30)).await;
        assert_eq!(got.len(), want.len(), "{user}: every message arrives");
        let ids: Vec<(u64, u64)> = got.iter().map(|(id, _)| stream_id(id)).collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "{user}: ids strictly increase"
        );
        let messages: Vec<Value> = got.into_iter().map(|(_, m)| m).collect();
        assert_eq!(
            by_space(&messages),
            by_space(&want),
            "{user}: same messages as replay --print, in order per space"
        );
        assert!(
            next_frame(ws, Duration::from_millis(500)).await.is_none(),
            "{user}: nothing more"
        );
    }
    // erin over SSE: the same stream (after its `ready` event).
    let messages_in = |text: &str| -> Vec<Value> {
        text.split("\n\n")
            .filter(|block| block.ends_with('}') && !block.contains("event: ready"))
            .filter_map(|block| block.lines().find_map(|l| l.strip_prefix("data: ")))
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    };
    let mut text = String::new();
    let want_erin = expected["erin"].len();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while messages_in(&text).len() < want_erin || !text.ends_with("\n\n") {
        let chunk = tokio::time::timeout_at(deadline, sse_stream.next())
            .await
            .expect("SSE data in time")
            .unwrap()
            .unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let sse_messages = messages_in(&text);
    assert_eq!(by_space(&sse_messages), by_space(&expected["erin"]));
    let _ = consumer.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_to_clients_on_standalone_redis() {
    kafka_to_clients(Redis::Standalone(redis_url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_to_clients_on_redis_cluster() {
    kafka_to_clients(Redis::Cluster(redis_cluster_nodes())).await;
}

/// The users of [`generated_membership`]; `run` keeps tests that share Redis apart.
fn generated_users(run: &str, spaces: usize, members: usize) -> Vec<String> {
    (0..spaces)
        .flat_map(|s| (0..members).map(move |m| format!("{run}-u{s}-{m}")))
        .collect()
}

/// `spaces` spaces, each with `members` viewers of its own; returns the membership file.
fn generated_membership(dir: &Path, run: &str, spaces: usize, members: usize) -> PathBuf {
    let dir_json = json!({
        "users": generated_users(run, spaces, members).into_iter().map(|u| json!({"id": u})).collect::<Vec<_>>(),
        "spaces": (0..spaces).map(|s| json!({"id": format!("sp{s}"), "members": (0..members).map(|m| json!({"user": format!("{run}-u{s}-{m}"), "role": "viewer"})).collect::<Vec<_>>()})).collect::<Vec<_>>(),
    });
    let path = dir.join("membership.json");
    std::fs::write(&path, dir_json.to_string()).unwrap();
    path
}

fn generated_events(dir: &Path, count: usize, spaces: usize, prefix: &str) -> PathBuf {
    let mut text = String::new();
    for n in 0..count {
        text.push_str(&format!(
            r#"{{"specversion":"1.0","id":"{prefix}-{n}","type":"file-uploaded","time":"2026-11-22T10:00:00Z","data":{{"space_id":"sp{}","path":"/d/f{n}","kind":"file","size":1}}}}"#,
            n % spaces
        ));
        text.push('\n');
    }
    let path = dir.join(format!("{prefix}.jsonl"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Connects one client per user and counts, per user, each event id received.
async fn watch_users(
    server: &Server,
    users: &[String],
) -> Vec<tokio::task::JoinHandle<(String, HashMap<String, usize>)>> {
    let mut tasks = Vec::new();
    for user in users {
        let mut ws = connect(server, user).await;
        let user = user.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen: HashMap<String, usize> = HashMap::new();
            while let Some(frame) = next_frame(&mut ws, Duration::from_secs(25)).await {
                if frame["type"] == "event" {
                    *seen
                        .entry(frame["data"]["event_id"].as_str().unwrap().to_owned())
                        .or_default() += 1;
                }
            }
            (user, seen)
        }));
    }
    tasks
}

fn check_exactly_once(results: Vec<(String, HashMap<String, usize>)>, per_user: usize) {
    for (user, seen) in results {
        let twice: Vec<&String> = seen
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(id, _)| id)
            .collect();
        assert!(
            twice.is_empty(),
            "{user} received {} events twice, e.g. {:?}",
            twice.len(),
            &twice[..twice.len().min(3)]
        );
        assert_eq!(seen.len(), per_user, "{user} received every expected event");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_share_the_partitions_and_deliver_each_event_once() {
    let dir = tempfile::tempdir().unwrap();
    let (spaces, members, count) = (6, 2, 3000);
    let run = unique("r");
    let membership = generated_membership(dir.path(), &run, spaces, members);
    let events = generated_events(dir.path(), count, spaces, &unique("ev"));
    let redis = Redis::Standalone(redis_url());
    let server = gateway(&redis, &["--send-queue", "100000"]).await;
    let users = generated_users(&run, spaces, members);
    let tasks = watch_users(&server, &users).await;

    let t = topic();
    // Create the (3-partition) topic first: partitions are assigned only once it exists.
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    produce(&t, &empty).await;
    let (log_a, log_b) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let mut a = consume(&t, &membership, &redis, Some(&log_a));
    let mut b = consume(&t, &membership, &redis, Some(&log_b));
    // Both must be in the group before the stream starts, so both get partitions.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let a_assigned = std::fs::read_to_string(&log_a)
            .unwrap_or_default()
            .contains("partitions assigned");
        let b_assigned = std::fs::read_to_string(&log_b)
            .unwrap_or_default()
            .contains("partitions assigned");
        if a_assigned && b_assigned {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the consumers never joined the group"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await; // let the rebalance settle
    produce(&t, &events).await;
    let results = futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    check_exactly_once(results, count / spaces);
    for child in [&mut a, &mut b] {
        let pid = child.id().unwrap() as i32;
        // SIGTERM: a graceful stop that commits.
        let _ = std::process::Command::new("kill")
            .arg(pid.to_string())
            .status();
        let _ = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
    }
    let handled = |log: &Path| -> u64 {
        let text = std::fs::read_to_string(log).unwrap();
        text.lines()
            .filter(|l| l.contains("stopped"))
            .filter_map(|l| {
                l.split("events=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .next()
            .unwrap_or(0)
    };
    // A worker that is merely busy (3,000 events at once) is backpressure, not a stuck partition:
    // pausing it would throw away what librdkafka prefetched (it cost 80 % of throughput once).
    for log in [&log_a, &log_b] {
        let text = std::fs::read_to_string(log).unwrap();
        assert!(
            !text.contains("partition paused"),
            "a busy worker's partition was paused: {}",
            log.display()
        );
    }
    let (ha, hb) = (handled(&log_a), handled(&log_b));
    assert!(
        ha > 0 && hb > 0,
        "both consumers handled events: {ha} and {hb}"
    );
    assert_eq!(ha + hb, count as u64, "together, each event once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_mid_stream_resumes_without_loss_or_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let (spaces, members, count) = (10, 2, 20_000);
    let run = unique("r");
    let membership = generated_membership(dir.path(), &run, spaces, members);
    let events = generated_events(dir.path(), count, spaces, &unique("k9"));
    let redis = Redis::Standalone(redis_url());
    let server = gateway(&redis, &["--send-queue", "100000"]).await;
    let users = generated_users(&run, spaces, members);
    let tasks = watch_users(&server, &users).await;

    let t = topic();
    produce(&t, &events).await;
    let mut first = consume(&t, &membership, &redis, None);
    // Kill it once it is well into the stream.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let delivered = server.stats().await["delivered"].as_u64().unwrap();
        if delivered >= (count * members / 4) as u64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first consumer made no progress ({delivered})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.start_kill().unwrap(); // SIGKILL: no graceful commit
    let _ = first.wait().await;
    let delivered_at_kill = server.stats().await["delivered"].as_u64().unwrap();
    assert!(
        delivered_at_kill < (count * members) as u64,
        "killed before the end"
    );
    let mut second = consume(&t, &membership, &redis, None);
    let results = futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    check_exactly_once(results, count / spaces);
    let _ = second.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_keeps_clients_connected() {
    let mut private = PrivateRedis::start();
    let redis = Redis::Standalone(private.url());
    let server = gateway(&redis, &[]).await;
    let ready = |s: &Server| {
        let url = s.url("/readyz");
        async move {
            reqwest::get(url)
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    assert_eq!(ready(&server).await, 200);
    let mut ws = connect(&server, "alice").await;
    let t = topic();
    create_topic(&t).await;
    let mut consumer = consume(&t, &demo_membership(), &redis, None);

    let one = |id: &str| {
        format!(
            r#"{{"id":"{id}","type":"file-uploaded","time":"2026-11-22T10:00:00Z","data":{{"space_id":"s-eng","path":"/r/{id}","kind":"file","size":1}}}}"#
        )
    };
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), one(&unique("before")) + "\n").unwrap();
    produce(&t, file.path()).await;
    let before = collect(&mut ws, 1, Duration::from_secs(30)).await;
    assert_eq!(before.len(), 1);

    private.stop();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while ready(&server).await != 503 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never reported the outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    private.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while ready(&server).await != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never recovered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after_id = unique("after");
    std::fs::write(file.path(), one(&after_id) + "\n").unwrap();
    produce(&t, file.path()).await;
    // Redis came back empty (no persistence): the client is told its history was lost before
    // the first message of the new epoch reaches it.
    let told = next_frame(&mut ws, Duration::from_secs(30))
        .await
        .expect("a frame after the restart");
    assert_eq!(told["type"], "resumed", "{told}");
    assert_eq!(told["recovered"], false);
    assert_eq!(told["reason"], "unknown-epoch");
    let after = collect(&mut ws, 1, Duration::from_secs(30)).await;
    assert_eq!(
        after.len(),
        1,
        "later messages arrive on the same connection"
    );
    assert_eq!(after[0].1["event_id"], after_id.as_str());
    let epoch = |p: &str| p.split_once(':').unwrap().0.to_owned();
    assert_ne!(epoch(&after[0].0), epoch(&before[0].0), "a new epoch");
    assert_eq!(
        told["position"],
        format!("{}:0-0", epoch(&after[0].0)),
        "the new epoch's start"
    );
    assert_eq!(
        server.stats().await["connections"],
        1,
        "the gateway dropped no client"
    );
    ws.send(Message::Text(r#"{"type":"ping"}"#.into()))
        .await
        .unwrap();
    assert_eq!(
        next_frame(&mut ws, Duration::from_secs(5)).await.unwrap()["type"],
        "pong"
    );
    let _ = consumer.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_events_go_to_the_dead_letter_topic_and_the_rest_is_delivered() {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::{Headers, Message as _};

    let redis = Redis::Standalone(redis_url());
    let server = gateway(&redis, &[]).await;
    let membership = root().join("fixtures/invalid/membership.json");
    let mut ann = connect(&server, "ann").await;
    let t = topic();
    create_topic(&t).await;
    let mut consumer = consume(&t, &membership, &redis, None);
    let tag = unique("dlq");
    let tagged = tagged_fixture(&root().join("fixtures/invalid/events.jsonl"), &tag);
    produce(&t, tagged.path()).await;
    let got = collect(&mut ann, 2, Duration::from_secs(30)).await;
    let ids: HashSet<String> = got
        .iter()
        .map(|(_, m)| {
            let id = m["event_id"].as_str().unwrap();
            id.strip_suffix(&format!(".{tag}")).unwrap_or(id).to_owned()
        })
        .collect();
    assert_eq!(
        ids,
        HashSet::from(["ok-1".to_owned(), "ok-2".to_owned()]),
        "the events around bad ones are delivered"
    );

    let dlq: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", unique("dlq-reader"))
        .set("auto.offset.reset", "earliest")
        .set("broker.address.family", "v4")
        .create()
        .unwrap();
    dlq.subscribe(&[&t.dead_letter]).unwrap();
    let mut codes = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while codes.len() < 9 {
        let m = tokio::time::timeout_at(deadline, dlq.recv())
            .await
            .expect("9 dead letters in time")
            .unwrap();
        let headers: HashMap<String, String> = m
            .headers()
            .unwrap()
            .iter()
            .map(|h| {
                (
                    h.key.to_owned(),
                    String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                )
            })
            .collect();
        assert_eq!(headers["foldercast-source-topic"], t.name);
        assert!(
            headers["foldercast-source-partition"]
                .parse::<i32>()
                .is_ok()
        );
        assert!(headers["foldercast-source-offset"].parse::<i64>().is_ok());
        assert!(!headers["foldercast-error"].is_empty());
        assert!(
            !m.payload().unwrap_or_default().is_empty(),
            "original bytes kept"
        );
        codes.push(headers["foldercast-error-code"].clone());
    }
    codes.sort();
    assert_eq!(
        codes,
        [
            "invalid-field",
            "invalid-field",
            "invalid-json",
            "invalid-path",
            "invalid-path",
            "missing-field",
            "unknown-space",
            "unknown-type",
            "unsupported-specversion"
        ]
    );
    let _ = consumer.kill().await;
}

async fn run_to_exit(args: &[String]) -> (i32, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(common::bin())
            .args(args)
            .env("FOLDERCAST_LOG", "warn")
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("exits in time, not hanging")
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_addresses_are_clear_errors_not_panics() {
    let nowhere = format!("127.0.0.1:{}", common::free_port());
    let membership = demo_membership().display().to_string();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    let cases = [
        (
            s(&[
                "consume",
                "--brokers",
                &nowhere,
                "--membership",
                &membership,
                "--redis",
                &redis_url(),
            ]),
            "cannot reach Kafka brokers",
        ),
        (
            s(&[
                "consume",
                "--brokers",
                &kafka_brokers(),
                "--membership",
                &membership,
                "--redis",
                &format!("redis://{nowhere}"),
            ]),
            "cannot connect to redis",
        ),
        (
            s(&[
                "gateway",
                "--listen",
                "127.0.0.1:0",
                "--redis",
                &format!("redis://{nowhere}"),
            ]),
            "cannot connect to redis",
        ),
        (
            s(&[
                "gateway",
                "--listen",
                "127.0.0.1:0",
                "--redis-cluster",
                &format!("redis://{nowhere}"),
            ]),
            "cannot connect to redis cluster",
        ),
        (
            s(&[
                "replay",
                "--to-kafka",
                "--brokers",
                &nowhere,
                "--events",
                "fixtures/demo/events.jsonl",
            ]),
            "cannot reach Kafka brokers",
        ),
    ];
    for (args, want) in cases {
        let (code, stderr) = run_to_exit(&args).await;
        assert_ne!(code, 0, "{args:?} must fail");
        assert!(
            stderr.contains(want),
            "{args:?}: expected {want:?} in {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    }
}

/// Produces `count` events of `space` into `partition` of `topic`, directly with rdkafka (so the
/// test, not the partitioner, decides where they land).
async fn produce_to_partition(
    topic: &str,
    partition: i32,
    space: &str,
    prefix: &str,
    count: usize,
) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("broker.address.family", "v4")
        .create()
        .unwrap();
    for n in 0..count {
        let event = json!({"specversion": "1.0", "id": format!("{prefix}-{n}"), "type": "file-uploaded",
            "time": "2026-11-25T10:00:00Z",
            "data": {"space_id": space, "path": format!("/f/{prefix}-{n}"), "kind": "file", "size": 1}})
        .to_string();
        producer
            .send(
                FutureRecord::to(topic)
                    .partition(partition)
                    .key(space)
                    .payload(&event),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_waiting_for_membership_does_not_stall_the_others() {
    use common::libregraph::{LibreGraph, SPACE_VIEWER, user_grant};
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};

    let graph = LibreGraph::start().await;
    let run = unique("stall");
    let (stuck_space, free_space) = (format!("{run}-stuck"), format!("{run}-free"));
    let (stuck_user, free_user) = (format!("{run}-s"), format!("{run}-f"));
    graph.project(&stuck_space, vec![user_grant(&stuck_user, SPACE_VIEWER)]);
    graph.project(&free_space, vec![user_grant(&free_user, SPACE_VIEWER)]);
    graph.fail_space(&stuck_space, true);

    let t = topic();
    let admin: AdminClient<_> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("broker.address.family", "v4")
        .create()
        .unwrap();
    admin
        .create_topics(
            &[NewTopic::new(&t.name, 2, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap();

    let redis = Redis::Standalone(redis_url());
    // The stuck user gets all of its events at once after recovery: room for them.
    let server = gateway(&redis, &["--send-queue", "10000"]).await;
    let mut stuck_ws = connect(&server, &stuck_user).await;
    let mut free_ws = connect(&server, &free_user).await;
    let membership = [
        "--ocis-url".to_owned(),
        graph.url.clone(),
        "--membership-max-stale".to_owned(),
        "0s".to_owned(),
    ];
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("consume.log");
    let mut consumer = consume_with(
        &t,
        &membership,
        &[("FOLDERCAST_OCIS_TOKEN", "admin-token")],
        &redis,
        Some(&log),
        NO_LIMIT,
    );

    // More events of the stuck space than its worker can queue (4,096 + a batch of 64), then
    // time for them to pile up: the reader must pause that partition, not wait on it.
    let stuck_events = 5000;
    // Ids of this run only: the exactly-once guard in the shared Redis remembers earlier runs'.
    let stuck_prefix = unique("stuck");
    produce_to_partition(&t.name, 0, &stuck_space, &stuck_prefix, stuck_events).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    produce_to_partition(&t.name, 1, &free_space, &unique("free"), 20).await;
    let got = collect(&mut free_ws, 20, Duration::from_secs(20)).await;
    assert_eq!(
        got.len(),
        20,
        "the other partition keeps flowing; consumer log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        next_frame(&mut stuck_ws, Duration::from_millis(300))
            .await
            .is_none(),
        "the stuck space's events wait"
    );

    // oCIS is back: every waiting event arrives, in order, none lost.
    graph.fail_space(&stuck_space, false);
    let got = collect(&mut stuck_ws, stuck_events, Duration::from_secs(60)).await;
    assert_eq!(
        got.len(),
        stuck_events,
        "all held events delivered after recovery"
    );
    let ids: Vec<String> = got
        .iter()
        .map(|(_, m)| m["event_id"].as_str().unwrap().to_owned())
        .collect();
    let expected: Vec<String> = (0..stuck_events)
        .map(|n| format!("{stuck_prefix}-{n}"))
        .collect();
    assert_eq!(ids, expected, "in partition order");
    let _ = consumer.kill().await;
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("partition paused") && log.contains("partition resumed"),
        "the full partition was paused, then resumed"
    );
}
