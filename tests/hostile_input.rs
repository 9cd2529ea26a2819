//! Hostile and careless input against the real binary: each test here is one defect found by
//! probing the gateway and the pipeline (issue 12), and fails if that defect comes back.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::sse::Sse;
use common::ws::{Got, connect, frame, next};
use common::{SECRET, Server, bin, demo_membership, redis_url, token};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// Starts `foldercast` with `args` and `env`, expecting it to refuse to start: returns its
/// exit code and stderr. Fails the test if it is still running after 20 s.
async fn refused(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let child = tokio::process::Command::new(bin())
        .args(args)
        .env_remove("FOLDERCAST_JWT_SECRET")
        .envs(env.iter().copied())
        .env("FOLDERCAST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start foldercast");
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("foldercast {args:?} started instead of refusing"))
        .expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn guessable_hs256_secrets_are_refused_at_start() {
    let membership = demo_membership().display().to_string();
    let redis = redis_url();
    for secret in ["", "a", "0123456789abcdef0123456789abcde"] {
        let run = [
            "run",
            "--listen",
            "127.0.0.1:0",
            "--membership",
            &membership,
            "--jwt-secret",
            secret,
        ];
        let (code, stderr) = refused(&run, &[]).await;
        assert_ne!(code, 0, "run --jwt-secret {secret:?} started");
        assert!(
            stderr.contains("at least 32 are required"),
            "no clear reason for {secret:?}: {stderr}"
        );
        let gateway = [
            "gateway",
            "--redis",
            &redis,
            "--listen",
            "127.0.0.1:0",
            "--jwt-secret",
            secret,
        ];
        let (code, stderr) = refused(&gateway, &[]).await;
        assert_ne!(code, 0, "gateway --jwt-secret {secret:?} started");
        assert!(stderr.contains("at least 32"), "{stderr}");
    }
    // Set but empty in the environment, and too short there.
    for value in ["", "short"] {
        let (code, stderr) = refused(
            &["gateway", "--redis", &redis, "--listen", "127.0.0.1:0"],
            &[("FOLDERCAST_JWT_SECRET", value)],
        )
        .await;
        assert_ne!(code, 0, "FOLDERCAST_JWT_SECRET={value:?} started");
        assert!(stderr.contains("FOLDERCAST_JWT_SECRET") || stderr.contains("at least 32"));
    }
    // An empty secret file, and one with a short secret.
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [("empty", "\n"), ("short", "tooshort\n")] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let path = path.display().to_string();
        let (code, _) = refused(
            &[
                "gateway",
                "--redis",
                &redis,
                "--listen",
                "127.0.0.1:0",
                "--jwt-secret-file",
                &path,
            ],
            &[],
        )
        .await;
        assert_ne!(code, 0, "--jwt-secret-file with {name} secret started");
    }
    // 32 bytes is enough.
    let _ok = Server::start(&[]).await;
    assert!(SECRET.len() >= 32);
}

async fn ticket(server: &Server, user: &str) -> String {
    let body: Value = reqwest::Client::new()
        .post(server.url("/api/tickets"))
        .bearer_auth(token(user))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["ticket"].as_str().expect("ticket").to_owned()
}

#[tokio::test]
async fn tickets_do_not_outlive_their_lifetime() {
    let server = Server::start(&["--ticket-ttl", "1s"]).await;
    let fresh = ticket(&server, "bob").await;
    let stale_ws = ticket(&server, "bob").await;
    let stale_sse = ticket(&server, "bob").await;
    let mut ws = connect(&server.ws_url(&format!("/ws?ticket={fresh}")), None).await;
    assert_eq!(
        frame(&mut ws, Duration::from_secs(5)).await["type"],
        "ready"
    );

    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut ws = connect(&server.ws_url(&format!("/ws?ticket={stale_ws}")), None).await;
    let refused = frame(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(refused["code"], "invalid-ticket", "{refused}");
    assert!(matches!(
        next(&mut ws, Duration::from_secs(5)).await,
        Got::Closed(_)
    ));
    let sse = Sse::open(&server.url(&format!("/sse?ticket={stale_sse}")), None).await;
    assert_eq!(sse.status(), 401);
}

#[tokio::test]
async fn tokens_not_yet_valid_are_refused() {
    let server = Server::start(&[]).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let sign = |nbf: u64| {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": "alice", "exp": now + 600, "nbf": nbf}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let mut ws = connect(&server.ws_url("/ws"), Some(&sign(now + 300))).await;
    let refused = frame(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(refused["code"], "invalid-token", "{refused}");
    let sse = Sse::open(&server.url("/sse"), Some(&sign(now + 300))).await;
    assert_eq!(sse.status(), 401);
    let mut ws = connect(&server.ws_url("/ws"), Some(&sign(now - 10))).await;
    assert_eq!(
        frame(&mut ws, Duration::from_secs(5)).await["type"],
        "ready"
    );
}
