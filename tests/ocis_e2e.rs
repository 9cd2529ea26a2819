//! The real binary signed in through an OIDC test issuer and resolving members from the
//! LibreGraph test server: who gets in, who is refused and why, who receives what.

mod common;

use std::time::Duration;

use common::Server;
use common::libregraph::{LibreGraph, MANAGER, SPACE_VIEWER, UPLOADER, group_grant, user_grant};
use common::oidc::{Issuer, now};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
const WAIT: Duration = Duration::from_secs(15);
const SPACE: &str = "storage-users-1$7a1b2c3d-0000-4000-8000-00000000e2e0";

/// What the server sent next: a JSON frame, or the close frame's code and reason.
#[derive(Debug)]
enum Next {
    Frame(Value),
    Closed(u16, String),
}

async fn next(ws: &mut Ws) -> Next {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("no frame in time")
        {
            Some(Ok(Message::Text(t))) => return Next::Frame(serde_json::from_str(&t).unwrap()),
            Some(Ok(Message::Close(c))) => {
                let (code, reason) = c
                    .map(|c| (u16::from(c.code), c.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                return Next::Closed(code, reason);
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Next::Closed(1006, String::new()),
        }
    }
}

async fn frame(ws: &mut Ws) -> Value {
    match next(ws).await {
        Next::Frame(v) => v,
        other => panic!("expected a frame, got {other:?}"),
    }
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

async fn open(server: &Server) -> Ws {
    common::ws::connect(&server.ws_url("/ws"), None).await
}

/// Connects, authenticates with an `auth` frame, and returns the socket and the first answer.
async fn sign_in(server: &Server, token: &str) -> (Ws, Value) {
    let mut ws = open(server).await;
    send(&mut ws, json!({"type": "auth", "token": token})).await;
    let first = frame(&mut ws).await;
    (ws, first)
}

/// Sends a ping; returns the frames that arrived before the pong.
async fn sync(ws: &mut Ws) -> Vec<Value> {
    send(ws, json!({"type": "ping"})).await;
    let mut before = Vec::new();
    loop {
        let f = frame(ws).await;
        if f["type"] == "pong" {
            return before;
        }
        before.push(f);
    }
}

async fn start(issuer: &Issuer, graph: Option<&LibreGraph>, extra: &[&str]) -> Server {
    let mut args: Vec<String> = [
        "run",
        "--events",
        "-",
        "--listen",
        "127.0.0.1:0",
        "--rate",
        "0",
        "--oidc-issuer",
        &issuer.url,
        "--oidc-audience",
        "foldercast",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    match graph {
        Some(g) => args.extend(["--ocis-url".to_string(), g.url.clone()]),
        None => args.extend([
            "--membership".to_string(),
            common::demo_membership().display().to_string(),
        ]),
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Server::spawn_with_env(&args, &[("FOLDERCAST_OCIS_TOKEN", "admin-token")], true).await
}

/// Expects the error frame `code` whose message mentions `why`, then a 1008 close.
async fn refused(server: &Server, token: &str, code: &str, why: &str) {
    let (mut ws, first) = sign_in(server, token).await;
    assert_eq!(first["type"], "error", "{first}");
    assert_eq!(first["code"], code, "{first}");
    let message = first["message"].as_str().unwrap_or_default();
    assert!(message.contains(why), "{message:?} should say {why:?}");
    match next(&mut ws).await {
        Next::Closed(1008, reason) => {
            assert!(reason.starts_with(&format!("{code}: ")), "{reason:?}");
            assert!(
                reason.contains(why),
                "the close reason says why: {reason:?}"
            );
        }
        other => panic!("expected a 1008 close, got {other:?}"),
    }
}

fn encode(header: &Value, claims: &Value, signature: &[u8]) -> String {
    use base64::Engine as _;
    let b = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    format!(
        "{}.{}.{}",
        b(header.to_string().as_bytes()),
        b(claims.to_string().as_bytes()),
        b(signature)
    )
}

#[tokio::test]
async fn oidc_tokens_are_verified_and_forgeries_refused_with_clear_reasons() {
    let issuer = Issuer::start().await;
    let server = start(&issuer, None, &[]).await;

    for kid in ["rsa-1", "ec-1", "ed-1"] {
        let (_ws, ready) = sign_in(&server, &issuer.sign(kid, &issuer.claims("alice"))).await;
        assert_eq!(
            (&ready["type"], &ready["user"]),
            (&json!("ready"), &json!("alice")),
            "{kid}"
        );
    }
    // The bearer header works too.
    let mut ws = common::ws::connect(&server.ws_url("/ws"), Some(&issuer.token("bob"))).await;
    let ready = frame(&mut ws).await;
    assert_eq!(
        (&ready["type"], &ready["user"]),
        (&json!("ready"), &json!("bob"))
    );

    // (signing key, claim, its new value or None to drop it, refusal code, what the reason says)
    let cases = [
        (
            "rsa-1",
            "exp",
            Some(json!(now() - 3600)),
            "token-expired",
            "expired",
        ),
        (
            "rsa-1",
            "nbf",
            Some(json!(now() + 3600)),
            "invalid-token",
            "not yet valid",
        ),
        (
            "ec-1",
            "aud",
            Some(json!("some-other-client")),
            "invalid-token",
            "wrong audience",
        ),
        (
            "ed-1",
            "iss",
            Some(json!("https://evil.example")),
            "invalid-token",
            "wrong issuer",
        ),
        ("rsa-1", "sub", None, "invalid-token", "\"sub\" claim"),
    ];
    for (kid, claim, value, code, why) in cases {
        let mut claims = issuer.claims("alice");
        match value {
            Some(v) => claims[claim] = v,
            None => {
                claims.as_object_mut().unwrap().remove(claim);
            }
        }
        refused(&server, &issuer.sign(kid, &claims), code, why).await;
    }

    let none = encode(
        &json!({"alg": "none", "typ": "JWT", "kid": "rsa-1"}),
        &issuer.claims("alice"),
        b"",
    );
    refused(&server, &none, "invalid-token", "alg none").await;

    // The classic confusion: HS256 "signed" with the issuer's public key as the HMAC secret.
    let public = issuer.key("rsa-1").jwk.to_string();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("rsa-1".into());
    let confused = jsonwebtoken::encode(
        &header,
        &issuer.claims("alice"),
        &jsonwebtoken::EncodingKey::from_secret(public.as_bytes()),
    )
    .unwrap();
    refused(&server, &confused, "invalid-token", "HS256 is refused").await;

    // A token from a key the issuer has not published yet, then the rotation.
    let rotated = issuer.sign("rsa-2", &issuer.claims("carol"));
    refused(&server, &rotated, "invalid-token", "unknown signing key").await;
    issuer.publish("rsa-2");
    let fetches = issuer.jwks_fetches();
    let (_ws, ready) = sign_in(&server, &rotated).await;
    assert_eq!(
        (&ready["type"], &ready["user"]),
        (&json!("ready"), &json!("carol"))
    );
    assert_eq!(
        issuer.jwks_fetches(),
        fetches + 1,
        "one refetch picked up the rotation"
    );

    // A flood of forged key ids cannot make the gateway hammer the issuer.
    let before = issuer.jwks_fetches();
    for n in 0..20 {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(format!("forged-{n}"));
        let forged = encode(
            &serde_json::to_value(&header).unwrap(),
            &issuer.claims("mallory"),
            b"sig",
        );
        refused(&server, &forged, "invalid-token", "unknown signing key").await;
    }
    let spent = issuer.jwks_fetches() - before;
    assert!(spent <= 5, "{spent} refetches for 20 forged kids");

    // A tampered signature.
    let good = issuer.token("alice");
    let tampered = format!("{}x", &good[..good.len() - 1]);
    let (mut ws, first) = sign_in(&server, &tampered).await;
    assert_eq!(first["code"], "invalid-token", "{first}");
    assert!(matches!(next(&mut ws).await, Next::Closed(1008, _)));
}

#[tokio::test]
async fn the_user_id_claim_is_configurable_and_tokens_refresh_over_the_open_socket() {
    let issuer = Issuer::start().await;
    let server = start(
        &issuer,
        None,
        &[
            "--oidc-user-claim",
            "preferred_username",
            "--oidc-leeway",
            "0s",
            "--token-grace",
            "5s",
        ],
    )
    .await;
    let (_ws, ready) = sign_in(&server, &issuer.token("alice")).await;
    assert_eq!(
        (&ready["type"], &ready["user"]),
        (&json!("ready"), &json!("alice-name"))
    );

    let mut short = issuer.claims("bob");
    short["exp"] = json!(now() + 2);
    let (mut ws, ready) = sign_in(&server, &issuer.sign("ec-1", &short)).await;
    assert_eq!(ready["user"], "bob-name");
    let told = frame(&mut ws).await;
    assert_eq!(told["type"], "error");
    assert_eq!(told["code"], "token-expired");
    send(
        &mut ws,
        json!({"type": "auth", "token": issuer.sign("ed-1", &issuer.claims("bob"))}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        sync(&mut ws).await.is_empty(),
        "refreshed: still open after the grace"
    );

    short["exp"] = json!(now() + 2);
    let (mut ws, _) = sign_in(&server, &issuer.sign("rsa-1", &short)).await;
    let told = frame(&mut ws).await;
    assert_eq!(told["code"], "token-expired");
    match next(&mut ws).await {
        Next::Closed(1008, reason) => assert!(reason.starts_with("token-expired"), "{reason}"),
        other => panic!("expected a close without a refresh, got {other:?}"),
    }
}

/// A LibreGraph server that wants the admin token, with `SPACE` managed by alice and viewed by
/// the group `eng` (of `eng`), plus `more` grants.
async fn graph_with_space(eng: &[&str], more: &[serde_json::Value]) -> LibreGraph {
    let graph = LibreGraph::start().await;
    graph.require_authorization(Some("Bearer admin-token"));
    let mut grants = vec![
        user_grant("alice", MANAGER),
        group_grant("eng", SPACE_VIEWER),
    ];
    grants.extend_from_slice(more);
    graph.project(SPACE, grants);
    graph.group("eng", eng);
    graph
}

#[tokio::test]
async fn run_with_ocis_and_oidc_delivers_to_the_right_users_only() {
    let issuer = Issuer::start().await;
    let graph = graph_with_space(&["bob"], &[user_grant("dropper", UPLOADER)]).await;
    let mut server = start(&issuer, Some(&graph), &[]).await;

    let mut sockets = Vec::new();
    for user in ["alice", "bob", "dropper", "outsider"] {
        let (ws, ready) = sign_in(&server, &issuer.token(user)).await;
        assert_eq!(ready["user"], user);
        sockets.push((user, ws));
    }
    let event = json!({"specversion": "1.0", "id": "ocis-e2e-1", "type": "file-uploaded",
        "time": "2026-11-25T10:00:00Z",
        "data": {"space_id": SPACE, "path": "/plans/q4.pdf", "kind": "file", "size": 4096, "actor": "alice"}});
    server.send_events(&format!("{event}\n")).await;

    for (user, ws) in sockets.iter_mut() {
        let expected = matches!(*user, "alice" | "bob");
        if expected {
            let msg = frame(ws).await;
            assert_eq!(msg["type"], "event", "{user}: {msg}");
            assert_eq!(msg["data"]["type"], "file-uploaded", "{user}: {msg}");
            assert_eq!(msg["data"]["event_id"], "ocis-e2e-1", "{user}: {msg}");
        }
    }
    // By now the event has been processed: the others got nothing.
    for (user, ws) in sockets.iter_mut() {
        assert!(
            sync(ws).await.is_empty(),
            "{user} received more than expected"
        );
    }
    assert_eq!(graph.calls(&format!("permissions:{SPACE}")), 1);
    assert_eq!(graph.calls("members:eng"), 1);
}

#[tokio::test]
async fn replay_resolves_from_ocis_too() {
    let graph = graph_with_space(&["bob", "carol"], &[]).await;
    graph.personal("personal-dan", "dan");
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let line = |id: &str, space: &str| {
        json!({"specversion": "1.0", "id": id, "type": "folder-created", "time": "2026-11-25T10:00:00Z",
               "data": {"space_id": space, "path": "/new", "kind": "folder"}})
        .to_string()
    };
    std::fs::write(
        &events,
        [
            line("r1", SPACE),
            line("r2", "personal-dan"),
            line("r3", "gone-space"),
        ]
        .join("\n"),
    )
    .unwrap();
    let graph_url = graph.url.clone();
    let events_path = events.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(common::bin())
            .args(["replay", "--print", "--ocis-url", &graph_url, "--events"])
            .arg(&events_path)
            .env("FOLDERCAST_OCIS_TOKEN", "admin-token")
            .env("FOLDERCAST_LOG", "warn")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let delivered: Vec<(String, String)> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["user"].as_str().unwrap().to_owned(),
                v["message"]["event_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expect = |u: &str, e: &str| (u.to_owned(), e.to_owned());
    assert_eq!(
        delivered,
        [
            expect("alice", "r1"),
            expect("bob", "r1"),
            expect("carol", "r1"),
            expect("dan", "r2")
        ]
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown-space"), "{stderr}");
}
