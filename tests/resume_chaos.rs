//! Chaos: 1,000 WebSocket clients of 100 users take a 20,000-message stream through the real
//! `gateway` binary while their connections drop at random and they resume, and separately while
//! the gateway is drained (SIGTERM) or killed (SIGKILL) and restarted, and while its Redis
//! subscription connection is killed. Every client must end with every message of its user,
//! exactly once, in order.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::ws::{self, Got};
use common::{SECRET, Server, free_port, redis_cluster_nodes, redis_url, token, unique};
use foldercast::bus::{Bus, Outgoing, RedisBus, RedisOptions, RedisTarget};
use rand::Rng;
use serde_json::Value;

const USERS: usize = 100;
const CLIENTS_PER_USER: usize = 10;
const ROUNDS: u64 = 200; // messages per user: 20,000 in all

#[derive(Clone, Copy, Debug)]
enum Disruption {
    None,
    Drain,
    Kill,
    KillSubscription,
}

fn redis_args(target: &RedisTarget) -> Vec<String> {
    match target {
        RedisTarget::Standalone(url) => vec!["--redis".into(), url.clone()],
        RedisTarget::Cluster(nodes) => vec!["--redis-cluster".into(), nodes.join(",")],
    }
}

async fn gateway(port: u16, target: &RedisTarget) -> Server {
    let mut args: Vec<String> = vec![
        "gateway".into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--jwt-secret".into(),
        SECRET.into(),
        "--drain-spread".into(),
        "1s".into(),
    ];
    args.extend(redis_args(target));
    Server::spawn(&args, false).await
}

/// The position's stream id, to check the order of everything a client receives.
fn id_of(position: &str) -> (u64, u64) {
    let (_, id) = position.split_once(':').expect("a position");
    let (ms, seq) = id.split_once('-').expect("a stream id");
    (ms.parse().unwrap(), seq.parse().unwrap())
}

/// One client: connects, reads, drops at random and resumes with its last position, until it
/// has `ROUNDS` messages. Returns the message numbers in the order received and how many times
/// it resumed.
async fn client(url: String, user: String, ready: Arc<tokio::sync::Barrier>) -> (Vec<u64>, usize) {
    let bearer = token(&user);
    let mut position: Option<String> = None;
    let mut got: Vec<u64> = Vec::new();
    let mut resumes = 0;
    let mut first = true;
    while got.len() < ROUNDS as usize {
        let target = match &position {
            Some(p) => format!("{url}?since={p}"),
            None => url.clone(),
        };
        let backoff = Duration::from_millis(rand::rng().random_range(50..250));
        let Ok(mut conn) = ws::try_connect(&target, Some(&bearer)).await else {
            tokio::time::sleep(backoff).await;
            continue;
        };
        let hello = match ws::next(&mut conn, Duration::from_secs(20)).await {
            Got::Frame(f) if f["type"] == "ready" => f,
            _ => {
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        if first {
            first = false;
            ready.wait().await;
        }
        if position.is_some() {
            match ws::next(&mut conn, Duration::from_secs(20)).await {
                Got::Frame(f) if f["type"] == "resumed" => {
                    assert_eq!(
                        f["recovered"], true,
                        "{user}: a resume inside retention recovers: {f}"
                    );
                    resumes += 1;
                }
                Got::Frame(f) => panic!("{user}: expected resumed, got {f}"),
                _ => continue,
            }
        } else {
            position = hello["position"].as_str().map(str::to_owned);
        }
        loop {
            let frame: Value = match ws::next(&mut conn, Duration::from_secs(30)).await {
                Got::Frame(f) => f,
                Got::Closed(_) => {
                    tokio::time::sleep(backoff).await;
                    break;
                }
                Got::TimedOut => panic!("{user}: stalled at {} of {ROUNDS}", got.len()),
                Got::Text(t) => panic!("{user}: a frame that is not JSON: {t}"),
            };
            match frame["type"].as_str() {
                Some("event") => {
                    let at = frame["id"].as_str().unwrap().to_owned();
                    if let Some(p) = &position {
                        assert!(id_of(&at) > id_of(p), "{user}: {at} after {p}");
                    }
                    got.push(frame["data"]["n"].as_u64().unwrap());
                    position = Some(at);
                    if got.len() == ROUNDS as usize {
                        break;
                    }
                    if rand::rng().random_ratio(1, 40) {
                        break; // the network drops
                    }
                }
                Some("reconnect") => {
                    let after = frame["after_ms"].as_u64().unwrap();
                    tokio::time::sleep(Duration::from_millis(after)).await;
                    break;
                }
                Some("resumed") => panic!("{user}: history lost during the stream: {frame}"),
                _ => panic!("{user}: unexpected frame {frame}"),
            }
        }
    }
    (got, resumes)
}

async fn kill_subscriptions(target: &RedisTarget) {
    let urls = match target {
        RedisTarget::Standalone(url) => vec![url.clone()],
        RedisTarget::Cluster(nodes) => nodes.clone(),
    };
    common::kill_pubsub_clients(&urls).await;
}

/// One chaos run at a time: each holds 1,000 connections and a gateway, on 2 cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn chaos(target: RedisTarget, disruption: Disruption) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let port = free_port();
    let mut server = gateway(port, &target).await;
    let url = format!("ws://127.0.0.1:{port}/ws");
    let run = unique("chaos");
    let users: Vec<Arc<str>> = (0..USERS)
        .map(|u| Arc::from(format!("{run}-u{u}")))
        .collect();
    let ready = Arc::new(tokio::sync::Barrier::new(USERS * CLIENTS_PER_USER + 1));
    let mut clients = Vec::new();
    for user in &users {
        for _ in 0..CLIENTS_PER_USER {
            clients.push(tokio::spawn(client(
                url.clone(),
                user.to_string(),
                ready.clone(),
            )));
        }
    }
    ready.wait().await;

    let bus = RedisBus::connect(&target, RedisOptions::default(), None)
        .await
        .expect("publisher");
    for round in 0..ROUNDS {
        let payload = Bytes::from(format!(
            r#"{{"event_id":"{run}-{round}","type":"file-uploaded","space_id":"chaos","n":{round}}}"#
        ));
        let batch: Vec<Outgoing> = users
            .iter()
            .map(|u| {
                Outgoing::for_event(
                    u.clone(),
                    payload.clone(),
                    Some(Arc::from(format!("{run}-{round}"))),
                )
            })
            .collect();
        bus.publish(&batch).await.expect("publish");
        tokio::time::sleep(Duration::from_millis(20)).await;
        if round == ROUNDS * 2 / 5 {
            match disruption {
                Disruption::None => {}
                Disruption::Drain | Disruption::Kill => {
                    let signal = if matches!(disruption, Disruption::Drain) {
                        "-TERM"
                    } else {
                        "-KILL"
                    };
                    let pid = server.child.id().expect("pid").to_string();
                    std::process::Command::new("kill")
                        .args([signal, &pid])
                        .status()
                        .unwrap();
                    let exited =
                        tokio::time::timeout(Duration::from_secs(15), server.child.wait()).await;
                    assert!(exited.is_ok(), "the gateway exits after {signal}");
                    server = gateway(port, &target).await;
                }
                Disruption::KillSubscription => kill_subscriptions(&target).await,
            }
        }
        if round == ROUNDS * 3 / 4 && matches!(disruption, Disruption::KillSubscription) {
            kill_subscriptions(&target).await;
        }
    }
    let mut resumes = 0;
    for (i, handle) in clients.into_iter().enumerate() {
        let (got, n) = tokio::time::timeout(Duration::from_secs(120), handle)
            .await
            .expect("every client finishes")
            .expect("client task");
        let want: Vec<u64> = (0..ROUNDS).collect();
        assert_eq!(
            got, want,
            "client {i}: every message exactly once, in order"
        );
        resumes += n;
    }
    eprintln!(
        "{disruption:?}: {} clients, {resumes} resumes",
        USERS * CLIENTS_PER_USER
    );
    assert!(
        resumes > USERS * CLIENTS_PER_USER,
        "clients did drop and resume ({resumes})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_dropping_at_random_resume_without_loss_or_repeat() {
    chaos(RedisTarget::Standalone(redis_url()), Disruption::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_resume_across_a_drained_gateway_restart() {
    chaos(RedisTarget::Standalone(redis_url()), Disruption::Drain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_resume_across_a_killed_gateway() {
    chaos(RedisTarget::Standalone(redis_url()), Disruption::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_catch_up_when_the_gateways_subscription_is_killed() {
    chaos(
        RedisTarget::Standalone(redis_url()),
        Disruption::KillSubscription,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_sessions_catch_up_when_subscriptions_are_killed() {
    chaos(
        RedisTarget::Cluster(redis_cluster_nodes()),
        Disruption::KillSubscription,
    )
    .await;
}
