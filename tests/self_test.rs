//! `foldercast self-test` through the real binary: every check passes on a healthy deployment
//! (real Redis, tansu, nats-server, a gateway; the LibreGraph and OIDC test servers), and each
//! failure mode prints ✗ with what is wrong and how to fix it, and exits 1.

mod common;

use std::process::Output;

use common::libregraph::{LibreGraph, MANAGER, group_grant, user_grant};
use common::nats::Stream;
use common::oidc::Issuer;
use common::pipeline::{Redis, gateway, produce, topic};
use common::{PrivateRedis, SECRET, bin, free_port, kafka_brokers, unique};

async fn self_test(args: &[String], env: &[(&str, &str)]) -> (bool, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = tokio::process::Command::new(bin())
        .arg("self-test")
        .args(args)
        .envs(env.iter().copied())
        .env("FOLDERCAST_LOG", "error")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&stdout).into_owned();
    eprintln!("{text}{}", String::from_utf8_lossy(&stderr));
    (status.success(), text)
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// The report's line for a failure of `system` containing `what`, and its fix line after it.
fn failure<'a>(report: &'a str, system: &str, what: &str) -> (&'a str, &'a str) {
    let lines: Vec<&str> = report.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with(&format!("✗ {system}")) && l.contains(what))
        .unwrap_or_else(|| panic!("no ✗ {system} line with {what:?} in:\n{report}"));
    let fix = lines.get(at + 1).copied().unwrap_or_default();
    assert!(
        fix.trim_start().starts_with("fix: "),
        "a fix follows: {fix}"
    );
    (lines[at], fix)
}

/// An oCIS double with a project space and a group, answering only `Bearer t0k3n`.
async fn ocis() -> LibreGraph {
    let graph = LibreGraph::start().await;
    graph.project(
        "st$proj",
        vec![user_grant("alice", MANAGER), group_grant("eng", MANAGER)],
    );
    graph.group("eng", &["bob", "carol"]);
    graph.require_authorization(Some("Bearer t0k3n"));
    graph
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_deployment_passes_every_check() {
    let redis = PrivateRedis::start_with(free_port(), &["--appendonly", "yes"]);
    let events = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        events.path(),
        r#"{"id":"st-1","type":"file-uploaded","time":"2026-11-22T10:00:00Z","data":{"space_id":"s","path":"/a","kind":"file","size":1}}"#,
    )
    .unwrap();
    let t = topic();
    produce(&t, events.path()).await;
    let mut dead = topic();
    dead.name = t.dead_letter.clone();
    produce(&dead, events.path()).await;
    let stream = Stream::new();
    stream
        .context()
        .await
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: stream.name.clone(),
            subjects: vec![stream.name.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
    let graph = ocis().await;
    let issuer = Issuer::start().await;
    let server = gateway(&Redis::Standalone(redis.url()), &[]).await;

    let args = owned(&[
        "--redis",
        &redis.url(),
        "--brokers",
        &kafka_brokers(),
        "--topic",
        &t.name,
        "--group",
        &t.group,
        "--dead-letter-topic",
        &t.dead_letter,
        "--nats",
        &stream.url,
        "--nats-stream",
        &stream.name,
        "--nats-durable",
        &stream.durable,
        "--ocis-url",
        &graph.url,
        "--oidc-issuer",
        &issuer.url,
        "--gateway-url",
        &server.ws_url(""),
        "--jwt-secret",
        SECRET,
    ]);
    let (ok, report) = self_test(&args, &[("FOLDERCAST_OCIS_TOKEN", "t0k3n")]).await;
    assert!(ok, "exit 0:\n{report}");
    assert!(!report.contains('✗'), "{report}");
    for (system, what) in [
        ("redis", "reachable, Redis 7"),
        ("redis", "maxmemory-policy noeviction"),
        ("redis", "AOF on"),
        ("kafka", "3 partition(s)"),
        ("kafka", "dead-letter topic"),
        ("kafka", "lag 1 event(s)"),
        ("nats", "reachable"),
        ("nats", "not created yet"),
        ("ocis", "credentials accepted"),
        ("ocis", "space st$proj: 2 member grant(s) readable"),
        ("ocis", "group eng: 2 member(s) readable"),
        ("oidc", "3 key(s)"),
        ("round-trip", "reached"),
    ] {
        assert!(
            report
                .lines()
                .any(|l| l.starts_with(&format!("✓ {system}")) && l.contains(what)),
            "✓ {system} … {what} in:\n{report}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_systems_are_each_named_with_a_fix() {
    let nowhere = |scheme: &str| format!("{scheme}127.0.0.1:{}", free_port());
    let args = owned(&[
        "--redis",
        &nowhere("redis://"),
        "--brokers",
        &nowhere(""),
        "--nats",
        &nowhere("nats://"),
        "--ocis-url",
        &nowhere("http://"),
        "--oidc-issuer",
        &nowhere("http://"),
        "--gateway-url",
        &nowhere("ws://"),
        "--jwt-secret",
        SECRET,
        "--ocis-timeout",
        "1s",
    ]);
    let (ok, report) = self_test(&args, &[("FOLDERCAST_OCIS_TOKEN", "t0k3n")]).await;
    assert!(!ok, "exit 1");
    failure(&report, "redis", "cannot reach");
    failure(&report, "kafka", "cannot reach the brokers");
    failure(&report, "nats", "cannot reach");
    failure(&report, "ocis", "cannot use");
    failure(&report, "oidc", "issuer");
    failure(&report, "round-trip", "cannot open");
    assert!(report.ends_with("checks failed\n"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misconfigured_systems_say_what_is_at_risk() {
    // A Redis that evicts and keeps nothing across a restart.
    let redis = PrivateRedis::start_with(
        free_port(),
        &["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"],
    );
    // A gateway on another Redis: the probe never arrives.
    let other = PrivateRedis::start();
    let server = gateway(&Redis::Standalone(other.url()), &[]).await;
    let graph = ocis().await;
    let stream = Stream::new();
    let args = owned(&[
        "--redis",
        &redis.url(),
        "--brokers",
        &kafka_brokers(),
        "--topic",
        &unique("missing"),
        "--nats",
        &stream.url,
        "--nats-stream",
        &stream.name,
        "--ocis-url",
        &graph.url,
        "--gateway-url",
        &server.ws_url(""),
        "--jwt-secret",
        SECRET,
    ]);
    let (ok, report) = self_test(&args, &[("FOLDERCAST_OCIS_TOKEN", "wrong")]).await;
    assert!(!ok);
    let (_, fix) = failure(&report, "redis", "allkeys-lru");
    assert!(fix.contains("noeviction"), "{fix}");
    failure(&report, "redis", "persistence off");
    let (line, _) = failure(&report, "kafka", "does not exist");
    assert!(line.contains("missing"), "{line}");
    failure(&report, "kafka", "dead-letter topic");
    failure(&report, "nats", "is not there");
    let (_, fix) = failure(&report, "ocis", "refused the credentials");
    assert!(fix.contains("--ocis-token-file"), "{fix}");
    failure(&report, "round-trip", "did not reach");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_uncovered_slots_an_unreadable_space_and_a_foreign_token_fail() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = dir.path().join("nodes.conf");
    // A cluster node with no slots assigned.
    let lone = PrivateRedis::start_with(
        free_port(),
        &[
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            nodes.to_str().unwrap(),
            "--appendonly",
            "yes",
        ],
    );
    let graph = ocis().await;
    graph.fail_space("st$proj", true);
    let redis = PrivateRedis::start();
    let server = gateway(&Redis::Standalone(redis.url()), &[]).await;
    let args = owned(&[
        "--redis-cluster",
        &lone.url(),
        "--ocis-url",
        &graph.url,
        "--ocis-timeout",
        "1s",
        "--gateway-url",
        &server.ws_url(""),
        "--jwt-secret",
        "another-secret-of-at-least-thirty-two-bytes",
    ]);
    let (ok, report) = self_test(&args, &[("FOLDERCAST_OCIS_TOKEN", "t0k3n")]).await;
    assert!(!ok);
    let (line, _) = failure(&report, "redis", "slots covered");
    assert!(line.contains("0 of 16384"), "{line}");
    failure(&report, "ocis", "not readable");
    failure(&report, "round-trip", "refused the probe user");
    assert!(
        report.lines().any(|l| l.starts_with("– kafka")),
        "no event source: not checked, not failed:\n{report}"
    );
}
