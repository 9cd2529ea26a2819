//! Planned downtime, through the real binaries: `announce-downtime` schedules in Redis, two
//! gateways send each announcement once (one of them restarted mid-schedule), on time; the
//! last carries the shutdown advice; a client that connects during the window is told; a
//! downtime can be listed and cancelled over HTTP.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::pipeline::{Redis, Ws, connect, gateway, next_frame};
use common::{PrivateRedis, Schemas, assert_valid, bin, demo_membership, token};
use serde_json::{Value, json};

const ADMIN: &str = "ops-0123456789abcdef0123456789abcdef";

fn rfc3339(at: chrono::DateTime<chrono::Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Reads `ws` for `during`, returning each announcement with when it arrived.
async fn announcements(
    ws: &mut Ws,
    during: Duration,
) -> Vec<(Value, chrono::DateTime<chrono::Utc>)> {
    let until = tokio::time::Instant::now() + during;
    let mut got = Vec::new();
    while let Some(left) = until.checked_duration_since(tokio::time::Instant::now()) {
        let Some(f) = next_frame(ws, left).await else {
            break;
        };
        let data = match f["type"].as_str() {
            Some("event") | Some("notification") => f["data"].clone(),
            _ => continue,
        };
        if data.get("downtime").is_some() {
            got.push((data, chrono::Utc::now()));
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announcements_go_out_once_per_step_from_two_gateways_one_restarted() {
    let redis = PrivateRedis::start();
    let dir = tempfile::tempdir().unwrap();
    let admins = dir.path().join("admins");
    std::fs::write(&admins, format!("ops:{ADMIN}\n")).unwrap();
    let membership = demo_membership();
    let args = [
        "--admin-token-file",
        admins.to_str().unwrap(),
        "--membership",
        membership.to_str().unwrap(),
    ];
    let a = gateway(&Redis::Standalone(redis.url()), &args).await;
    let b = gateway(&Redis::Standalone(redis.url()), &args).await;
    let mut alice = connect(&a, "alice").await;
    let mut bob = connect(&b, "bob").await;

    // From 7 s from now; announcements at once, 4 s and 2 s before.
    let from = chrono::Utc::now() + chrono::Duration::seconds(7);
    let until = from + chrono::Duration::seconds(60);
    let out = tokio::process::Command::new(bin())
        .args(["announce-downtime", "--redis", &redis.url(), "--all"])
        .args(["--from", &rfc3339(from), "--until", &rfc3339(until)])
        .args(["--body", "Storage upgrade", "--steps", "4s,2s"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let scheduled: Value = serde_json::from_slice(&out.stdout).unwrap();
    let due: Vec<i64> = scheduled["due_ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(due.len(), 3, "{scheduled}");

    // The first announcement reaches both; then gateway B restarts.
    let first_a = announcements(&mut alice, Duration::from_millis(1500)).await;
    let first_b = announcements(&mut bob, Duration::from_millis(100)).await;
    assert_eq!(
        (first_a.len(), first_b.len()),
        (1, 1),
        "{first_a:?} {first_b:?}"
    );
    drop(bob);
    drop(b);
    let b = gateway(&Redis::Standalone(redis.url()), &args).await;
    let mut bob = connect(&b, "bob").await;

    let rest_a = announcements(&mut alice, Duration::from_secs(6)).await;
    let rest_b = announcements(&mut bob, Duration::from_millis(200)).await;
    let schemas = Schemas::load();
    for (who, first, rest) in [("alice", &first_a, &rest_a), ("bob", &first_b, &rest_b)] {
        let all: Vec<&(Value, chrono::DateTime<chrono::Utc>)> =
            first.iter().chain(rest.iter()).collect();
        // bob reconnected without a position: he gets what came live after, and on connect
        // the current announcement; by id, each step exactly once.
        let mut by_id: HashMap<String, usize> = HashMap::new();
        for (n, _) in &all {
            assert_valid(&schemas.message, n, "an announcement");
            *by_id
                .entry(n["notification_id"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
        if who == "alice" {
            assert_eq!(all.len(), 3, "{who}: {all:?}");
            assert!(by_id.values().all(|n| *n == 1), "{who}: {by_id:?}");
            for ((n, at), due) in all.iter().zip(&due) {
                let late = at.timestamp_millis() - due;
                assert!(
                    (-50..1000).contains(&late),
                    "{who}: {n} came {late} ms after its time"
                );
                assert_eq!(n["downtime"]["from"], rfc3339(from));
            }
            assert!(
                all[..2]
                    .iter()
                    .all(|(n, _)| n.get("shutdown_advice").is_none())
            );
            assert_eq!(
                all[2].0["shutdown_advice"], true,
                "the last one advises to stop"
            );
            assert_eq!(all[2].0["body"], "Storage upgrade");
        } else {
            let steps: std::collections::HashSet<&String> = by_id.keys().collect();
            assert_eq!(steps.len(), 3, "{who}: every step: {by_id:?}");
        }
    }

    // A client connecting during the window is told at once.
    let mut late = testkit::ws::open(&a.ws_url("/ws?device=x"), Some(&token("dave")), None)
        .await
        .unwrap();
    let told = announcements(&mut late, Duration::from_secs(2)).await;
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!(told[0].0["shutdown_advice"], true, "the latest one");

    // Listed, and cancelled (a second downtime, then nothing of it goes out).
    let client = reqwest::Client::new();
    let second = client
        .post(a.url("/api/downtimes"))
        .bearer_auth(ADMIN)
        .json(
            &json!({"from": rfc3339(chrono::Utc::now() + chrono::Duration::seconds(4)),
                      "until": rfc3339(chrono::Utc::now() + chrono::Duration::seconds(30)),
                      "targets": {"users": ["erin"]}, "steps": ["2s"]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 200);
    let second: Value = second.json().await.unwrap();
    let listed: Value = client
        .get(a.url("/api/downtimes"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = listed["downtimes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&second["id"].as_str().unwrap()), "{listed}");
    let user = client
        .get(a.url("/api/downtimes"))
        .bearer_auth(token("erin"))
        .send()
        .await
        .unwrap();
    assert_eq!(user.status(), 403, "users cannot list or schedule");
    let cancelled = client
        .delete(a.url(&format!(
            "/api/downtimes/{}",
            second["id"].as_str().unwrap()
        )))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 204);
    let mut erin = connect(&a, "erin").await;
    let after = announcements(&mut erin, Duration::from_secs(4)).await;
    let of_second: Vec<_> = after
        .iter()
        .filter(|(n, _)| n["downtime"]["from"] == second["from"])
        .collect();
    assert!(
        of_second.is_empty(),
        "nothing of it after the cancel: {of_second:?}"
    );
    // (The first downtime, to everyone and under way, is told to her on connect.)
    assert!(
        after
            .iter()
            .all(|(n, _)| n["downtime"]["from"] == rfc3339(from))
    );
}
