//! Discovery (`GET /api/endpoint`) across two real gateways on one Redis: the least-loaded
//! live one is handed out, one that stops heartbeating drops out within two intervals, and one
//! that drains is never handed out.

mod common;

use std::time::Duration;

use common::pipeline::{Redis, connect, gateway};
use common::{PrivateRedis, Server, token};
use serde_json::Value;

const EVERY: &str = "300ms";

async fn endpoint(server: &Server, bearer: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new().get(server.url("/api/endpoint"));
    if let Some(t) = bearer {
        request = request.bearer_auth(t);
    }
    let r = request.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// The gateway `server` hands out, once it hands out `want` (within `wait`).
async fn hands_out(server: &Server, want: &str, wait: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let (status, body) = endpoint(server, Some(&token("alice"))).await;
        if status == 200 && body["websocket"] == want {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never handed out {want}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_least_loaded_live_gateway_is_handed_out_and_never_a_draining_one() {
    let redis = PrivateRedis::start();
    let bus = Redis::Standalone(redis.url());

    // No gateway advertises yet: a clear 503; no token: 401.
    let plain = gateway(&bus, &[]).await;
    let (status, body) = endpoint(&plain, Some(&token("alice"))).await;
    assert_eq!((status, body["code"].as_str()), (503, Some("no-gateway")));
    let (status, _) = endpoint(&plain, None).await;
    assert_eq!(status, 401);

    let a = gateway(
        &bus,
        &[
            "--public-url",
            "http://gw-a.test",
            "--heartbeat-every",
            EVERY,
        ],
    )
    .await;
    let mut b = gateway(
        &bus,
        &[
            "--public-url",
            "https://gw-b.test:8443/",
            "--heartbeat-every",
            EVERY,
            "--drain-grace",
            "3s",
        ],
    )
    .await;
    // A carries two connections, B one: B is handed out, by any gateway.
    let _a1 = connect(&a, "alice").await;
    let _a2 = connect(&a, "bob").await;
    let _b1 = connect(&b, "carol").await;
    // Both heartbeat their loads at least once more.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let chosen = hands_out(&plain, "wss://gw-b.test:8443/ws", Duration::from_secs(5)).await;
    assert_eq!(chosen["sse"], "https://gw-b.test:8443/sse");
    assert_eq!(chosen["connections"], 1);
    hands_out(&a, "wss://gw-b.test:8443/ws", Duration::from_secs(1)).await;

    // B stops heartbeating (frozen): within two intervals it is no longer handed out.
    common::signal(&b.child, "STOP");
    let frozen = tokio::time::Instant::now();
    hands_out(&plain, "ws://gw-a.test/ws", Duration::from_secs(3)).await;
    let gone_after = frozen.elapsed();
    assert!(
        gone_after <= Duration::from_millis(2 * 300 + 500),
        "dropped out after {gone_after:?}"
    );
    // Back: handed out again.
    common::signal(&b.child, "CONT");
    hands_out(&plain, "wss://gw-b.test:8443/ws", Duration::from_secs(3)).await;

    // B drains (SIGTERM, carol still connected for up to 3 s): never handed out again, though
    // it has the fewest connections.
    common::signal(&b.child, "TERM");
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..30 {
        let (status, body) = endpoint(&plain, Some(&token("alice"))).await;
        assert_eq!(status, 200);
        assert_eq!(body["websocket"], "ws://gw-a.test/ws", "a draining gateway");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), b.child.wait()).await;
}

#[tokio::test]
async fn a_public_url_that_is_not_http_is_refused_at_start() {
    let out = tokio::process::Command::new(common::bin())
        .args([
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--jwt-secret",
            common::SECRET,
            "--redis",
            &common::redis_url(),
            "--public-url",
            "gw-a.test",
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--public-url") && stderr.contains("http://"),
        "{stderr}"
    );
}
