//! The oCIS membership resolver against the LibreGraph test server: shapes, cache, failures.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::libregraph::{
    LibreGraph, MANAGER, SPACE_EDITOR, SPACE_VIEWER, UPLOADER, expiring, group_grant, link_entry,
    user_grant,
};
use foldercast::consumer::process_with_retry;
use foldercast::membership::ocis::{
    CacheSettings, ClientCredentialsConfig, CredentialsConfig, OcisResolver, OcisSettings,
    RetryPolicy, Secret, SecretSource,
};
use foldercast::membership::{MembershipResolver, ResolveError};
use foldercast::notify::dedup::Dedup;
use foldercast::notify::{Outcome, Pipeline};
use foldercast::source::RawEvent;
use tokio_util::sync::CancellationToken;

const SPACE: &str = "storage-users-1$6f3c1a9e-0000-4000-8000-000000000001";

fn settings(graph: &LibreGraph, ttl: Duration, max_stale: Duration) -> OcisSettings {
    OcisSettings {
        url: graph.url.clone(),
        credentials: CredentialsConfig::Bearer(SecretSource::Value(Secret::new("admin-token"))),
        retry: RetryPolicy {
            attempts: 2,
            backoff: Duration::from_millis(20),
            timeout: Duration::from_secs(5),
        },
        cache: CacheSettings {
            ttl,
            jitter: 0.0,
            max_stale,
            capacity: 10_000,
        },
    }
}

/// Signing in as the client the test issuer knows (`foldercast` / `s3cret`).
fn client_credentials(issuer: &common::oidc::Issuer) -> CredentialsConfig {
    CredentialsConfig::ClientCredentials(ClientCredentialsConfig {
        issuer: issuer.url.clone(),
        client_id: "foldercast".into(),
        client_secret: SecretSource::Value(Secret::new("s3cret")),
        scope: None,
    })
}

fn resolver(graph: &LibreGraph, ttl: Duration, max_stale: Duration) -> Arc<OcisResolver> {
    Arc::new(OcisResolver::from_settings(settings(graph, ttl, max_stale)).unwrap())
}

fn names(list: &[Arc<str>]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

async fn listers(r: &OcisResolver, space: &str) -> Vec<String> {
    names(&r.listers(space).await.expect("members"))
}

fn event(id: &str, space: &str, body: &str) -> RawEvent {
    let json = format!(
        r#"{{"specversion":"1.0","id":"{id}","type":"file-uploaded","time":"2026-11-25T10:00:00Z","data":{{"space_id":"{space}",{body}}}}}"#
    );
    RawEvent::new(json.into_bytes(), format!("test:{id}"))
}

fn upload(id: &str, space: &str) -> RawEvent {
    event(
        id,
        space,
        r#""path":"/f1/report.pdf","kind":"file","size":10"#,
    )
}

fn membership_event(id: &str, kind: &str, space: &str, member: &str) -> RawEvent {
    let json = format!(
        r#"{{"id":"{id}","type":"{kind}","time":"2026-11-25T10:00:01Z","data":{{"space_id":"{space}",{member}}}}}"#
    );
    RawEvent::new(json.into_bytes(), format!("test:{id}"))
}

fn pipeline(r: Arc<OcisResolver>) -> Pipeline {
    Pipeline::new(Dedup::new(10_000, Duration::from_secs(600)), r)
}

fn recipients(outcome: Outcome) -> Vec<String> {
    match outcome {
        Outcome::Deliver(f) => names(&f.recipients),
        other => panic!("expected a delivery, got {other:?}"),
    }
}

#[tokio::test]
async fn real_shapes_links_expiry_roles_and_groups() {
    let graph = LibreGraph::start().await;
    graph.project(
        SPACE,
        vec![
            user_grant("alice", MANAGER),
            user_grant("bob", SPACE_EDITOR),
            user_grant("dropper", UPLOADER),
            expiring(user_grant("former", SPACE_VIEWER), "2020-01-01T00:00:00Z"),
            expiring(user_grant("temp", SPACE_VIEWER), "2999-01-01T00:00:00Z"),
            link_entry("public-link-1"),
            group_grant("eng", SPACE_VIEWER),
            group_grant("drop-box", UPLOADER),
        ],
    );
    graph.group("eng", &["carol", "dan", "alice"]);
    graph.group("drop-box", &["erin"]);
    graph.project("empty-space", vec![]);
    graph.personal("personal-frank", "frank");
    graph.project_v1_only(
        "legacy-space",
        vec![
            user_grant("gina", MANAGER),
            group_grant("eng", SPACE_VIEWER),
        ],
    );
    graph.paged_group("big", &["u1", "u2", "u3", "u4", "u5"]);
    graph.project("paged-space", vec![group_grant("big", SPACE_VIEWER)]);

    let r = resolver(&graph, Duration::from_secs(60), Duration::from_secs(600));
    assert_eq!(
        listers(&r, SPACE).await,
        ["alice", "bob", "carol", "dan", "temp"],
        "links, expired grants, uploaders (direct or by group) are not listers"
    );
    assert_eq!(
        graph.calls("members:drop-box"),
        0,
        "an uploader group is never expanded"
    );
    assert!(
        listers(&r, "empty-space").await.is_empty(),
        "{{}} is an empty list"
    );
    assert_eq!(
        listers(&r, "personal-frank").await,
        ["frank"],
        "the owner of a personal space"
    );
    assert_eq!(
        listers(&r, "legacy-space").await,
        ["alice", "carol", "dan", "gina"],
        "v1.0 legacy role names; the synthetic project owner is ignored"
    );
    assert_eq!(
        listers(&r, "paged-space").await,
        ["u1", "u2", "u3", "u4", "u5"]
    );
    assert_eq!(graph.calls("members:big"), 3, "@odata.nextLink followed");
    assert_eq!(
        graph.calls("members:eng"),
        1,
        "a group is fetched once for all its spaces"
    );
}

#[tokio::test]
async fn a_burst_of_ten_thousand_events_makes_one_request() {
    let graph = LibreGraph::start().await;
    graph.project(SPACE, vec![user_grant("alice", SPACE_VIEWER)]);
    graph.latency(Duration::from_millis(300));
    let r = resolver(&graph, Duration::from_secs(60), Duration::from_secs(600));
    let tasks: Vec<_> = (0..10_000)
        .map(|_| {
            let r = r.clone();
            tokio::spawn(async move { r.listers(SPACE).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(names(&t.await.unwrap().unwrap()), ["alice"]);
    }
    assert_eq!(graph.calls(&format!("permissions:{SPACE}")), 1);
}

#[tokio::test]
async fn ttl_expiry_serves_stale_once_while_refreshing() {
    let graph = LibreGraph::start().await;
    graph.project(SPACE, vec![user_grant("alice", SPACE_VIEWER)]);
    let r = resolver(&graph, Duration::from_millis(300), Duration::from_secs(600));
    let key = format!("permissions:{SPACE}");
    assert_eq!(listers(&r, SPACE).await, ["alice"]);
    assert_eq!(listers(&r, SPACE).await, ["alice"]);
    assert_eq!(graph.calls(&key), 1, "fresh answers come from the cache");

    graph.project(
        SPACE,
        vec![
            user_grant("alice", SPACE_VIEWER),
            user_grant("bob", SPACE_VIEWER),
        ],
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        listers(&r, SPACE).await,
        ["alice"],
        "stale-while-revalidate: the old answer, at once"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        listers(&r, SPACE).await,
        ["alice", "bob"],
        "refreshed behind it"
    );
    assert_eq!(graph.calls(&key), 2);
}

#[tokio::test]
async fn membership_events_invalidate_the_space_and_group_events_its_spaces() {
    let graph = LibreGraph::start().await;
    graph.project(
        SPACE,
        vec![
            user_grant("alice", MANAGER),
            group_grant("eng", SPACE_VIEWER),
        ],
    );
    graph.group("eng", &["carol"]);
    let r = resolver(&graph, Duration::from_secs(3600), Duration::from_secs(3600));
    let p = pipeline(r.clone());
    let shutdown = CancellationToken::new();
    let run = |e: RawEvent| {
        let p = &p;
        let shutdown = &shutdown;
        async move { process_with_retry(p, &e, shutdown).await.unwrap() }
    };
    assert_eq!(
        recipients(run(upload("e1", SPACE)).await),
        ["alice", "carol"]
    );

    // oCIS adds bob, then the event tells us: the new member hears of it at once.
    graph.project(
        SPACE,
        vec![
            user_grant("alice", MANAGER),
            group_grant("eng", SPACE_VIEWER),
            user_grant("bob", SPACE_EDITOR),
        ],
    );
    let added = run(membership_event(
        "m1",
        "space-member-added",
        SPACE,
        r#""user":"bob","role":"editor""#,
    ))
    .await;
    assert_eq!(recipients(added), ["alice", "bob", "carol"]);
    assert_eq!(
        recipients(run(upload("e2", SPACE)).await),
        ["alice", "bob", "carol"]
    );
    assert_eq!(graph.calls(&format!("permissions:{SPACE}")), 2);

    // Removal: the removed member gets this last message, then nothing.
    graph.project(
        SPACE,
        vec![
            user_grant("alice", MANAGER),
            group_grant("eng", SPACE_VIEWER),
        ],
    );
    let removed = run(membership_event(
        "m2",
        "space-member-removed",
        SPACE,
        r#""user":"bob""#,
    ))
    .await;
    assert_eq!(recipients(removed), ["alice", "bob", "carol"]);
    assert_eq!(
        recipients(run(upload("e3", SPACE)).await),
        ["alice", "carol"]
    );

    // A user joins the group: every space granting it learns it.
    graph.group("eng", &["carol", "dan"]);
    let joined = RawEvent::new(
        br#"{"id":"g1","type":"group-member-added","time":"2026-11-25T10:00:02Z","data":{"group":"eng","user":"dan"}}"#.to_vec(),
        "test:g1".into(),
    );
    assert!(matches!(run(joined).await, Outcome::Applied { .. }));
    assert_eq!(
        recipients(run(upload("e4", SPACE)).await),
        ["alice", "carol", "dan"]
    );
    assert_eq!(graph.calls("members:eng"), 2);
}

#[tokio::test]
async fn an_outage_serves_last_known_members_until_max_stale_then_events_wait() {
    let graph = LibreGraph::start().await;
    graph.project(SPACE, vec![user_grant("alice", SPACE_VIEWER)]);
    let r = resolver(
        &graph,
        Duration::from_millis(200),
        Duration::from_millis(2500),
    );
    assert_eq!(listers(&r, SPACE).await, ["alice"]);

    graph.fail_with(Some(503));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        listers(&r, SPACE).await,
        ["alice"],
        "stale within --membership-max-stale"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(listers(&r, SPACE).await, ["alice"]);
    // A busy space during the outage: every event is answered stale, and oCIS is not hammered.
    let key = format!("permissions:{SPACE}");
    let before = graph.calls(&key);
    for _ in 0..100 {
        assert_eq!(listers(&r, SPACE).await, ["alice"]);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let during = graph.calls(&key) - before;
    assert!(during <= 4, "{during} requests for 100 stale answers");
    let stats = r.stats();
    assert!(
        stats
            .stale_served
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
    assert!(
        stats
            .fetch_failures
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );

    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert!(
        matches!(r.listers(SPACE).await, Err(ResolveError::Unavailable(_))),
        "beyond max-stale the answer is unavailable"
    );

    // An event now waits (held, retried), and is delivered once oCIS is back.
    let p = Arc::new(pipeline(r.clone()));
    let shutdown = CancellationToken::new();
    let held = {
        let (p, shutdown) = (p.clone(), shutdown.clone());
        tokio::spawn(async move { process_with_retry(&p, &upload("late", SPACE), &shutdown).await })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!held.is_finished(), "the event waits while oCIS is down");
    graph.fail_with(None);
    let outcome = tokio::time::timeout(Duration::from_secs(15), held)
        .await
        .expect("delivered after recovery")
        .unwrap()
        .unwrap();
    assert_eq!(recipients(outcome), ["alice"]);
}

#[tokio::test]
async fn a_deleted_space_rejects_its_events_and_bad_ids_are_refused() {
    let graph = LibreGraph::start().await;
    graph.project(SPACE, vec![user_grant("alice", SPACE_VIEWER)]);
    let r = resolver(
        &graph,
        Duration::from_millis(100),
        Duration::from_millis(100),
    );
    let p = pipeline(r.clone());
    let shutdown = CancellationToken::new();
    assert_eq!(
        recipients(
            process_with_retry(&p, &upload("a", SPACE), &shutdown)
                .await
                .unwrap()
        ),
        ["alice"]
    );
    graph.delete_space(SPACE);
    tokio::time::sleep(Duration::from_millis(250)).await;
    match process_with_retry(&p, &upload("b", SPACE), &shutdown)
        .await
        .unwrap()
    {
        Outcome::Rejected(rejection) => {
            assert_eq!(rejection.code, "unknown-space");
            assert!(
                rejection.reason.contains("itemNotFound"),
                "{}",
                rejection.reason
            );
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    match process_with_retry(&p, &upload("c", "malformed-id"), &shutdown)
        .await
        .unwrap()
    {
        Outcome::Rejected(rejection) => {
            assert_eq!(rejection.code, "space-refused");
            assert!(rejection.reason.contains("422"), "{}", rejection.reason);
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test]
async fn server_errors_are_retried_with_backoff() {
    let graph = LibreGraph::start().await;
    graph.project(SPACE, vec![user_grant("alice", SPACE_VIEWER)]);
    let r = resolver(&graph, Duration::from_secs(60), Duration::from_secs(60));
    graph.fail_next(1);
    assert_eq!(listers(&r, SPACE).await, ["alice"]);
    assert_eq!(
        graph.calls(&format!("permissions:{SPACE}")),
        2,
        "one 500, one retry"
    );
}

#[tokio::test]
async fn a_401_refreshes_credentials_once_and_a_rotated_token_file_is_picked_up() {
    let graph = LibreGraph::start().await;
    graph.project(SPACE, vec![user_grant("alice", SPACE_VIEWER)]);
    graph.require_authorization(Some("Bearer new-token"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "old-token\n").unwrap();
    let mut s = settings(&graph, Duration::from_secs(60), Duration::from_secs(60));
    s.credentials = CredentialsConfig::Bearer(SecretSource::File(file.clone()));
    let r = OcisResolver::from_settings(s).unwrap();
    match r.listers(SPACE).await {
        Err(ResolveError::Unavailable(reason)) => assert!(reason.contains("401"), "{reason}"),
        other => panic!("expected unavailable, got {other:?}"),
    }
    assert_eq!(
        graph.calls(&format!("permissions:{SPACE}")),
        2,
        "the first 401 refreshes the credentials once; the second is believed"
    );
    std::fs::write(&file, "new-token\n").unwrap();
    assert_eq!(listers(&r, SPACE).await, ["alice"]);
}

#[tokio::test]
async fn client_credentials_come_from_the_token_endpoint_and_are_reused() {
    let graph = LibreGraph::start().await;
    let issuer = common::oidc::Issuer::start().await;
    issuer.allow_client("foldercast", "s3cret");
    graph.project(SPACE, vec![user_grant("alice", SPACE_VIEWER)]);
    graph.project("other", vec![user_grant("bob", SPACE_VIEWER)]);
    graph.require_authorization(Some("Bearer access-1"));
    let mut s = settings(&graph, Duration::from_secs(60), Duration::from_secs(60));
    s.credentials = client_credentials(&issuer);
    for n in 0..50 {
        graph.project(
            &format!("space-{n}"),
            vec![user_grant("carol", SPACE_VIEWER)],
        );
    }
    let r = Arc::new(OcisResolver::from_settings(s).unwrap());
    // Fifty spaces asked at once: one token request, not fifty.
    let tasks: Vec<_> = (0..50)
        .map(|n| {
            let r = r.clone();
            tokio::spawn(async move { r.listers(&format!("space-{n}")).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(names(&t.await.unwrap().unwrap()), ["carol"]);
    }
    assert_eq!(listers(&r, SPACE).await, ["alice"]);
    assert_eq!(listers(&r, "other").await, ["bob"]);
    assert_eq!(issuer.token_requests(), 1, "one token serves many requests");
}

#[tokio::test]
async fn basic_auth_for_development_setups() {
    let graph = LibreGraph::start().await;
    graph.project(SPACE, vec![user_grant("alice", SPACE_VIEWER)]);
    // einstein:relativity, as the proxy expects it with PROXY_ENABLE_BASIC_AUTH.
    graph.require_authorization(Some("Basic ZWluc3RlaW46cmVsYXRpdml0eQ=="));
    let mut s = settings(&graph, Duration::from_secs(60), Duration::from_secs(60));
    s.credentials =
        CredentialsConfig::Basic(SecretSource::Value(Secret::new("einstein:relativity")));
    let r = OcisResolver::from_settings(s).unwrap();
    assert_eq!(listers(&r, SPACE).await, ["alice"]);
}

#[tokio::test]
async fn client_credentials_by_post_when_the_issuer_wants_it() {
    for announce in [true, false] {
        let graph = LibreGraph::start().await;
        let issuer = common::oidc::Issuer::start().await;
        issuer.allow_client("foldercast", "s3cret");
        issuer.post_only(announce);
        graph.project(SPACE, vec![user_grant("alice", SPACE_VIEWER)]);
        let mut s = settings(&graph, Duration::from_secs(60), Duration::from_secs(60));
        s.credentials = client_credentials(&issuer);
        graph.require_authorization(Some("Bearer access-1"));
        let r = OcisResolver::from_settings(s).unwrap();
        // Announced: straight to client_secret_post. Not announced: basic is refused, then post.
        let expected_token = if announce {
            "Bearer access-1"
        } else {
            "Bearer access-2"
        };
        graph.require_authorization(Some(expected_token));
        assert_eq!(listers(&r, SPACE).await, ["alice"], "announce={announce}");
        assert_eq!(issuer.token_requests(), if announce { 1 } else { 2 });
    }
}

/// oCIS's space events (a role changed, a grant expired, a space disabled) make the NATS source
/// invalidate the space: named by its drive id or, as `SpaceMembershipExpired` does, by the bare
/// space id. The next question asks oCIS; other spaces stay cached.
#[tokio::test]
async fn invalidating_by_drive_id_or_bare_space_id_reads_the_members_again() {
    let graph = LibreGraph::start().await;
    let other = "storage-users-1$6f3c1a9e-0000-4000-8000-000000000002";
    graph.project(SPACE, vec![user_grant("alice", MANAGER)]);
    graph.project(other, vec![user_grant("alice", MANAGER)]);
    let r = resolver(&graph, Duration::from_secs(3600), Duration::from_secs(3600));
    assert_eq!(listers(&r, SPACE).await, ["alice"]);
    assert_eq!(listers(&r, other).await, ["alice"]);
    let calls = graph.total_calls();

    graph.project(
        SPACE,
        vec![
            user_grant("alice", MANAGER),
            user_grant("bob", SPACE_VIEWER),
        ],
    );
    assert_eq!(listers(&r, SPACE).await, ["alice"], "cached until told");
    r.invalidate(SPACE);
    assert_eq!(listers(&r, SPACE).await, ["alice", "bob"]);

    graph.project(SPACE, vec![user_grant("alice", MANAGER)]);
    let bare = SPACE.split('$').nth(1).unwrap();
    r.invalidate(bare);
    assert_eq!(
        listers(&r, SPACE).await,
        ["alice"],
        "a bare space id names the drive"
    );
    assert_eq!(listers(&r, other).await, ["alice"]);
    assert_eq!(
        graph.total_calls() - calls,
        2,
        "one request per invalidation; the other space stayed cached"
    );
}
