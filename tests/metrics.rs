//! `/metrics` in the Prometheus text format: the gateway's connections and the pipeline's
//! events on `run`, moved off the public address with `--metrics-listen`, and `consume --nats`'s
//! events by outcome, rejections by code and the NATS source's counters.

mod common;

use std::time::Duration;

use common::libregraph::LibreGraph;
use common::nats::{Stream, fixture_items, physics};
use common::{PrivateRedis, Server, free_port, root};

/// The value of the sample `name` (with its labels, as written) in a text exposition.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn scrape(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_gateway_and_pipeline_metrics_and_can_move_them_off_the_public_address() {
    let mut server = Server::start(&["--user-rate", "0"]).await;
    let _alice = common::pipeline::connect(&server, "alice").await;
    server
        .send_events(&std::fs::read_to_string(root().join("fixtures/demo/events.jsonl")).unwrap())
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let text = loop {
        let (status, text) = scrape(&server.url("/metrics")).await;
        assert_eq!(status, 200);
        if sample(&text, "foldercast_events_total{outcome=\"delivered\"}").unwrap_or(0.0) > 0.0 {
            break text;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        sample(&text, "foldercast_gateway_open_connections"),
        Some(1.0),
        "{text}"
    );
    // By transport: alice's WebSocket, then an SSE stream of bob's.
    let sse = common::sse::Sse::open(&server.url("/sse"), Some(&common::token("bob"))).await;
    assert_eq!(sse.status(), 200);
    let (_, text) = scrape(&server.url("/metrics")).await;
    for (transport, n) in [("websocket", 1.0), ("sse", 1.0)] {
        assert_eq!(
            sample(
                &text,
                &format!(
                    "foldercast_gateway_open_connections_by_transport{{transport=\"{transport}\"}}"
                )
            ),
            Some(n),
            "{text}"
        );
    }
    drop(sse);
    assert!(sample(&text, "foldercast_messages_published_total").unwrap() > 0.0);
    assert!(text.contains("# TYPE foldercast_gateway_sessions_evicted counter"));

    // Resumes by outcome: a position the server cannot read is counted as such.
    let mut lost = testkit::ws::open(
        &server.ws_url("/ws?since=nonsense"),
        Some(&common::token("bob")),
        None,
    )
    .await
    .unwrap();
    testkit::ws::ready(&mut lost, Duration::from_secs(10))
        .await
        .unwrap();
    let (_, text) = scrape(&server.url("/metrics")).await;
    assert_eq!(
        sample(
            &text,
            "foldercast_gateway_resumes_total{outcome=\"bad-position\"}"
        ),
        Some(1.0),
        "{text}"
    );

    // Refused credentials by code, and closes by the reason the client was given.
    let bad = testkit::ws::open(&server.ws_url("/ws"), Some("not-a-jwt"), None).await;
    drop(bad);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let (_, text) = scrape(&server.url("/metrics")).await;
        if sample(
            &text,
            "foldercast_gateway_closed_total{reason=\"invalid-token\"}",
        )
        .is_some()
        {
            break text;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        sample(
            &text,
            "foldercast_gateway_auth_failures_total{code=\"invalid-token\"}"
        ),
        Some(1.0),
        "{text}"
    );
    // Each publish to the bus is timed.
    assert!(
        sample(&text, "foldercast_bus_publish_seconds_count").unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    assert!(text.contains("foldercast_bus_publish_seconds_bucket{le=\"0.0005\"}"));
    assert_eq!(
        sample(&text, "foldercast_messages_coalesced_total"),
        Some(0.0),
        "the rate limit is off"
    );

    // With the rate limit engaged, coalesced messages are counted.
    let mut limited = Server::start(&["--user-rate", "1", "--user-burst", "1"]).await;
    let _alice = common::pipeline::connect(&limited, "alice").await;
    limited
        .send_events(&std::fs::read_to_string(root().join("fixtures/demo/events.jsonl")).unwrap())
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, text) = scrape(&limited.url("/metrics")).await;
        let shaped = sample(&text, "foldercast_messages_coalesced_total").unwrap_or(0.0)
            + sample(&text, "foldercast_messages_resync_total").unwrap_or(0.0);
        // Coalesced, and nothing left held once the limit let it all out.
        if shaped > 0.0 && sample(&text, "foldercast_throttle_held_messages") == Some(0.0) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // --metrics-listen: on its own address only.
    let port = free_port();
    let moved = Server::start(&["--metrics-listen", &format!("127.0.0.1:{port}")]).await;
    let (status, _) = scrape(&moved.url("/metrics")).await;
    assert_eq!(status, 404);
    let (status, text) = scrape(&format!("http://127.0.0.1:{port}/metrics")).await;
    assert_eq!(status, 200);
    assert!(text.contains("foldercast_gateway_open_connections"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_counts_outcomes_rejections_and_the_nats_source() {
    let graph = LibreGraph::start().await;
    physics(&graph);
    fixture_items(&graph);
    let redis = PrivateRedis::start();
    let stream = Stream::new();
    stream
        .load(&root().join("fixtures/ocis/events.jsonl"))
        .await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("consume.log");
    let metrics = format!("127.0.0.1:{port}");
    let _consumer = stream.consume(
        &graph,
        &redis.url(),
        &["--user-rate", "0", "--metrics-listen", &metrics],
        &log,
    );
    let url = format!("http://{metrics}/metrics");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let text = loop {
        if let Ok(r) = reqwest::get(&url).await
            && let Ok(text) = r.text().await
            && sample(&text, "foldercast_nats_received_total") == Some(17.0)
            && sample(&text, "foldercast_events_total{outcome=\"rejected\"}") == Some(2.0)
        {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        sample(
            &text,
            "foldercast_events_rejected_total{code=\"invalid-field\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "foldercast_events_rejected_total{code=\"invalid-json\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "foldercast_nats_skipped_total{kind=\"user event\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "foldercast_nats_skipped_total{kind=\"failed upload\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "foldercast_nats_invalidations_total"),
        Some(2.0)
    );
    assert!(sample(&text, "foldercast_nats_lookups_total").unwrap() >= 5.0);
    assert!(sample(&text, "foldercast_messages_published_total").unwrap() > 0.0);
    // The consumer's lag, as the server says it (every 5 s; -1 before its first answer): 0
    // once everything was handled.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
        if sample(&text, "foldercast_nats_consumer_pending") == Some(0.0)
            && sample(&text, "foldercast_nats_consumer_ack_pending") == Some(0.0)
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The oCIS membership cache: asked, then answering from memory.
    assert!(
        sample(&text, "foldercast_membership_space_fetches_total").unwrap() >= 1.0,
        "{text}"
    );
    assert!(sample(&text, "foldercast_membership_fresh_hits_total").unwrap() >= 1.0);
    // Each fetch from oCIS is timed.
    assert!(
        sample(&text, "foldercast_membership_directory_seconds_count").unwrap_or(0.0)
            >= sample(&text, "foldercast_membership_space_fetches_total").unwrap_or(1.0),
        "{text}"
    );
}

/// `consume` from Kafka reports its lag per assigned partition: the records past the group's
/// committed offset, 0 everywhere once every event was acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_from_kafka_reports_its_lag_per_partition() {
    use common::pipeline::{Redis, consume_with, produce, tagged_fixture, topic};
    let t = topic();
    let events = tagged_fixture(
        &root().join("fixtures/demo/events.jsonl"),
        &common::unique("lag"),
    );
    produce(&t, events.path()).await;
    let port = free_port();
    let membership = [
        "--membership".to_owned(),
        common::demo_membership().display().to_string(),
    ];
    let listen = format!("127.0.0.1:{port}");
    let _consumer = consume_with(
        &t,
        &membership,
        &[],
        &Redis::Standalone(common::redis_url()),
        None,
        &["--user-rate", "0", "--metrics-listen", &listen],
    );
    let url = format!("http://127.0.0.1:{port}/metrics");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text = match reqwest::get(&url).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let lags: Vec<Option<f64>> = (0..3)
            .map(|p| {
                sample(
                    &text,
                    &format!("foldercast_kafka_consumer_lag{{partition=\"{p}\"}}"),
                )
            })
            .collect();
        if lags.iter().all(|l| *l == Some(0.0)) {
            assert!(sample(&text, "foldercast_events_total{outcome=\"delivered\"}").unwrap() > 0.0);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "lag per partition never reached 0: {lags:?}\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
