//! Hostile and careless input against the real binary: each test here is one defect found by
//! probing the gateway and the pipeline (issue 12), and fails if that defect comes back.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::sse::Sse;
use common::ws::{Got, connect, frame, next};
use common::{SECRET, Server, bin, demo_membership, redis_url, ticket, token};
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

/// `replay` over `lines` (JSONL) with `extra` flags: exit code, stdout, stderr.
fn replay(lines: &str, extra: &[&str]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    std::fs::write(&events, lines).unwrap();
    let out = std::process::Command::new(bin())
        .args(["replay", "--print", "--events"])
        .arg(&events)
        .arg("--membership")
        .arg(demo_membership())
        .args(extra)
        .env("FOLDERCAST_LOG", "warn")
        .output()
        .expect("run replay");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn upload(id: &str, time: &str, size: u64) -> String {
    format!(
        r#"{{"specversion":"1.0","id":"{id}","source":"t","type":"file-uploaded","time":"{time}","data":{{"space_id":"s-eng","path":"/projects/f-{id}","kind":"file","size":{size},"actor":"alice"}}}}"#
    ) + "\n"
}

#[test]
fn throttled_replay_survives_far_future_event_times() {
    let lines = upload("now", "2026-11-22T10:00:00Z", 1)
        + &upload("far", "2700-01-01T00:00:00Z", 2)
        + &upload("farther", "9999-12-31T23:59:59Z", 3);
    let (code, stdout, stderr) = replay(&lines, &["--throttle", "--strict"]);
    assert_eq!(code, 0, "{stderr}");
    for id in ["now", "far", "farther"] {
        assert!(
            stdout.contains(&format!("\"{id}\"")),
            "{id} not delivered: {stdout}"
        );
    }
}

#[test]
fn sizes_beyond_2_pow_53_are_rejected_and_sums_never_wrap() {
    // Two uploads of 2^62 used to sum to -2^63 in a coalesced message.
    let big = 1u64 << 62;
    let lines =
        upload("b1", "2026-11-22T10:00:00Z", big) + &upload("b2", "2026-11-22T10:00:00Z", big);
    let (code, stdout, stderr) = replay(&lines, &["--throttle", "--strict"]);
    assert_eq!(code, 1, "rejections make --strict fail: {stderr}");
    assert!(stdout.is_empty(), "nothing delivered: {stdout}");
    assert!(stderr.contains("2^53-1"), "the reason is given: {stderr}");

    // The largest accepted size, many times over, coalesced: deltas stay positive.
    let max = (1u64 << 53) - 1;
    let lines: String = (0..40)
        .map(|i| upload(&format!("m{i}"), "2026-11-22T10:00:00Z", max))
        .collect();
    let (code, stdout, stderr) = replay(&lines, &["--throttle", "--user-burst", "2", "--strict"]);
    assert_eq!(code, 0, "{stderr}");
    let mut coalesced = 0;
    for line in stdout.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        for f in v["message"]["folders"].as_array().into_iter().flatten() {
            assert!(f["size_delta"].as_i64().unwrap() > 0, "wrapped: {line}");
        }
        coalesced += usize::from(v["message"]["type"] == "coalesced");
    }
    assert!(coalesced > 0, "the rate limit coalesced some: {stdout}");
}

#[tokio::test]
async fn tokens_that_never_expire_keep_their_connection() {
    let server = Server::start(&["--ws-ping-interval", "1s", "--sse-keepalive", "1s"]).await;
    let forever = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "alice", "exp": u64::MAX}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let mut ws = connect(&server.ws_url("/ws"), Some(&forever)).await;
    assert_eq!(
        frame(&mut ws, Duration::from_secs(5)).await["type"],
        "ready"
    );
    let mut sse = Sse::open(&server.url("/sse"), Some(&forever)).await;
    assert_eq!(sse.status(), 200);
    // Used to panic in the connection task ("overflow when adding duration to instant").
    tokio::time::sleep(Duration::from_millis(1500)).await;
    common::ws::send(&mut ws, json!({"type": "ping"})).await;
    let pong = frame(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(pong["type"], "pong", "{pong}");
    assert!(
        tokio::time::timeout(Duration::from_secs(2), sse.chunk())
            .await
            .is_ok_and(|c| c.is_ok_and(|c| c.is_some())),
        "the SSE stream is alive"
    );
}

/// A WebSocket client that writes raw frames, so it can break the protocol on purpose.
mod raw {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    pub struct RawWs(pub TcpStream);

    /// What the server sent: text frames, then the close code (if a close frame came).
    #[derive(Debug, Default)]
    pub struct Heard {
        pub texts: Vec<String>,
        pub close: Option<u16>,
    }

    impl RawWs {
        pub async fn open(addr: &str, path_and_query: &str, bearer: Option<&str>) -> RawWs {
            let mut tcp = TcpStream::connect(addr).await.expect("connect");
            let auth = bearer
                .map(|t| format!("Authorization: Bearer {t}\r\n"))
                .unwrap_or_default();
            let request = format!(
                "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n"
            );
            tcp.write_all(request.as_bytes()).await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                tcp.read_exact(&mut byte).await.expect("handshake");
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head);
            assert!(head.starts_with("HTTP/1.1 101"), "{head}");
            RawWs(tcp)
        }

        /// Writes one masked frame: `first` is the FIN/RSV/opcode byte.
        pub async fn frame(&mut self, first: u8, payload: &[u8]) {
            let mut out = vec![first];
            let mask = [1u8, 2, 3, 4];
            match payload.len() {
                n if n < 126 => out.push(0x80 | n as u8),
                n if n < 65536 => {
                    out.push(0x80 | 126);
                    out.extend_from_slice(&(n as u16).to_be_bytes());
                }
                n => {
                    out.push(0x80 | 127);
                    out.extend_from_slice(&(n as u64).to_be_bytes());
                }
            }
            out.extend_from_slice(&mask);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
            // The server may stop reading part-way (that is the point of some tests).
            let _ = self.0.write_all(&out).await;
        }

        /// Reads frames until one is `ready`; false if none came within 5 s.
        pub async fn hear_ready(&mut self) -> bool {
            for _ in 0..5 {
                let heard = self.hear_one(Duration::from_secs(5)).await;
                if heard.is_some_and(|t| t.contains("\"ready\"")) {
                    return true;
                }
            }
            false
        }

        async fn hear_one(&mut self, wait: Duration) -> Option<String> {
            let mut head = [0u8; 2];
            tokio::time::timeout(wait, self.0.read_exact(&mut head))
                .await
                .ok()?
                .ok()?;
            let len = usize::from(head[1] & 0x7f);
            assert!(len < 126, "short frames only before the test starts");
            let mut payload = vec![0u8; len];
            self.0.read_exact(&mut payload).await.ok()?;
            Some(String::from_utf8_lossy(&payload).into_owned())
        }

        /// Reads server frames until a close frame, the end of the stream or `wait`.
        pub async fn hear(&mut self, wait: Duration) -> Heard {
            let mut heard = Heard::default();
            let _ = tokio::time::timeout(wait, async {
                loop {
                    let mut head = [0u8; 2];
                    if self.0.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    let mut len = u64::from(head[1] & 0x7f);
                    if len == 126 {
                        let mut b = [0u8; 2];
                        if self.0.read_exact(&mut b).await.is_err() {
                            return;
                        }
                        len = u64::from(u16::from_be_bytes(b));
                    } else if len == 127 {
                        let mut b = [0u8; 8];
                        if self.0.read_exact(&mut b).await.is_err() {
                            return;
                        }
                        len = u64::from_be_bytes(b);
                    }
                    let mut payload = vec![0u8; len as usize];
                    if self.0.read_exact(&mut payload).await.is_err() {
                        return;
                    }
                    match head[0] & 0x0f {
                        0x1 => heard
                            .texts
                            .push(String::from_utf8_lossy(&payload).into_owned()),
                        0x8 => {
                            heard.close =
                                payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
                            return;
                        }
                        _ => {}
                    }
                }
            })
            .await;
            heard
        }
    }
}

#[tokio::test]
async fn unreadable_frames_get_an_error_frame_and_a_close_code() {
    let server = Server::start(&["--max-frame-bytes", "20000"]).await;
    let alice = token("alice");
    // (what the client sends, error code, close code), authenticated and not.
    let cases: Vec<(&str, Vec<u8>, u8, &str, u16)> = vec![
        (
            "oversized",
            vec![b' '; 30_000],
            0x81,
            "frame-too-large",
            1009,
        ),
        (
            "not UTF-8",
            vec![b'"', 0xff, 0xfe, b'"'],
            0x81,
            "bad-frame",
            1007,
        ),
        (
            "reserved bits",
            b"{}".to_vec(),
            0x81 | 0x40,
            "protocol-error",
            1002,
        ),
        (
            "unknown opcode",
            b"{}".to_vec(),
            0x83,
            "protocol-error",
            1002,
        ),
    ];
    for (what, payload, first, code, close) in cases {
        for bearer in [Some(alice.as_str()), None] {
            let mut ws = raw::RawWs::open(&server.addr, "/ws", bearer).await;
            if bearer.is_some() {
                let ready = ws.hear_ready().await;
                assert!(ready, "{what}: no ready frame");
            }
            ws.frame(first, &payload).await;
            let heard = ws.hear(Duration::from_secs(5)).await;
            let error = heard
                .texts
                .iter()
                .map(|t| serde_json::from_str::<Value>(t).unwrap())
                .find(|f| f["type"] == "error");
            let error =
                error.unwrap_or_else(|| panic!("{what} ({bearer:?}): no error frame: {heard:?}"));
            assert_eq!(error["code"], code, "{what}: {error}");
            assert_eq!(heard.close, Some(close), "{what}: {heard:?}");
        }
    }
    // A frame just under the limit is read (and answered as a bad frame, not dropped).
    let mut ws = raw::RawWs::open(&server.addr, "/ws", Some(&alice)).await;
    assert!(ws.hear_ready().await);
    let mut near = br#"{"type":"ping","pad":""#.to_vec();
    near.resize(19_000, b'x');
    near.extend_from_slice(br#""}"#);
    ws.frame(0x81, &near).await;
    ws.frame(0x81, br#"{"type":"ping"}"#).await;
    let heard = ws.hear(Duration::from_millis(1500)).await;
    assert!(heard.close.is_none(), "{heard:?}");
    assert!(heard.texts.iter().any(|t| t.contains("pong")), "{heard:?}");
}

/// Sends `{"type":"ping"}` frames without ever reading, until the server drops the connection;
/// returns how long that took (or `None` if it held on for `limit`).
async fn ping_without_reading(
    addr: &str,
    bearer: Option<&str>,
    limit: Duration,
) -> Option<Duration> {
    let mut ws = raw::RawWs::open(addr, "/ws", bearer).await;
    let started = std::time::Instant::now();
    let ping = {
        let mut f = Vec::new();
        let payload = br#"{"type":"ping"}"#;
        let mask = [9u8, 8, 7, 6];
        f.extend_from_slice(&[0x81, 0x80 | payload.len() as u8]);
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f.repeat(256)
    };
    let held = tokio::time::timeout(limit, async {
        use tokio::io::AsyncWriteExt;
        while ws.0.write_all(&ping).await.is_ok() {}
    })
    .await;
    held.ok().map(|()| started.elapsed())
}

#[tokio::test]
async fn clients_that_never_read_their_replies_are_timed_out() {
    // No frame rate limit here: this is about writes, and the limit would end it first.
    let server = Server::start(&[
        "--write-timeout",
        "1s",
        "--auth-timeout",
        "2s",
        "--max-frames-per-sec",
        "0",
    ])
    .await;
    // Authenticated: the pongs fill the socket, and the write timeout ends it.
    let authed =
        ping_without_reading(&server.addr, Some(&token("alice")), Duration::from_secs(30)).await;
    assert!(
        authed.is_some(),
        "an authenticated non-reader held on for 30 s"
    );
    // Unauthenticated: the auth timeout holds whatever the client sends.
    let anonymous = ping_without_reading(&server.addr, None, Duration::from_secs(30)).await;
    assert!(
        anonymous.is_some(),
        "an unauthenticated non-reader held on for 30 s"
    );
    eprintln!("closed after {authed:?} (authenticated) and {anonymous:?} (not)");
}

/// A TCP connection with a small receive buffer, so a client that does not read stalls the
/// server's writes after little data.
async fn small_buffer_tcp(addr: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(addr.parse().unwrap()).await.unwrap()
}

/// True once the server closed `tcp` (a read returns end of stream or an error) within `wait`.
async fn closed_by_server(tcp: &mut tokio::net::TcpStream, wait: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    tokio::time::timeout(wait, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn slow_and_silent_http_clients_are_timed_out_and_capped() {
    use tokio::io::AsyncWriteExt;
    let server = Server::start(&["--header-timeout", "1s", "--max-connections", "40"]).await;
    // Silent clients, and one sending its headers a byte at a time.
    let mut silent = Vec::new();
    for _ in 0..30 {
        silent.push(tokio::net::TcpStream::connect(&server.addr).await.unwrap());
    }
    let mut dribbling = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let dribble = tokio::spawn(async move {
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n" {
            if dribbling.write_all(&[*byte]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        false
    });
    // Past the cap, new connections are closed at once.
    let mut over = Vec::new();
    for _ in 0..15 {
        over.push(tokio::net::TcpStream::connect(&server.addr).await.unwrap());
    }
    let mut closed_at_once = 0;
    for tcp in &mut over {
        closed_at_once += usize::from(closed_by_server(tcp, Duration::from_millis(500)).await);
    }
    assert!(
        closed_at_once >= 5,
        "{closed_at_once} of 15 over the cap closed"
    );
    // The header timeout frees every silent slot.
    for tcp in &mut silent {
        assert!(
            closed_by_server(tcp, Duration::from_secs(5)).await,
            "a silent client held on"
        );
    }
    assert!(dribble.await.unwrap(), "a dribbling client held on");
    let health = reqwest::get(server.url("/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    let stats = server.stats().await;
    assert!(
        stats["refused_connections"].as_u64().unwrap() >= 5,
        "{stats}"
    );
}

#[tokio::test]
async fn a_non_reading_sse_client_is_closed_by_the_write_timeout() {
    use tokio::io::AsyncWriteExt;
    let mut server = Server::start(&["--send-queue", "8", "--write-timeout", "1s"]).await;
    let mut tcp = small_buffer_tcp(&server.addr).await;
    let request = format!(
        "GET /sse HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nAccept: text/event-stream\r\n\r\n",
        token("alice")
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while server.stats().await["connections"] != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the SSE client never connected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ~8 KB per message (4 KB paths); paced, so the pipeline (a debug build here) never
    // starves the connection's task, and the socket's buffers fill long before the queue would
    // drain.
    let deep: String = (0..60).map(|i| format!("/{}{i}", "d".repeat(62))).collect();
    for round in 0..400 {
        // Fewer per burst than the queue holds: only a stalled socket gets this client evicted.
        let events: String = (0..4)
            .map(|i| format!(r#"{{"id":"sse-{round}-{i}","type":"file-uploaded","time":"2026-11-22T10:00:00Z","data":{{"space_id":"s-eng","path":"/projects{deep}/f{i}","kind":"file","size":1}}}}"#) + "\n")
            .collect();
        server.send_events(&events).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let stats = server.stats().await;
        if stats["evicted"].as_u64().unwrap() >= 1 || stats["connections"] == 0 {
            break;
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stats = server.stats().await;
        // Closed by the write timeout (whether or not the queue overflowed first).
        if stats["connections"] == 0 {
            assert!(stats["write_stalls"].as_u64().unwrap() >= 1, "{stats}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the evicted SSE client is still open: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn connection_limits_hold() {
    let server = Server::start(&[
        "--max-connections-per-user",
        "3",
        "--max-frames-per-sec",
        "10",
    ])
    .await;
    // A fourth connection of one user is refused, on both transports; other users are not.
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut ws = connect(&server.ws_url("/ws"), Some(&token("carol"))).await;
        assert_eq!(
            frame(&mut ws, Duration::from_secs(5)).await["type"],
            "ready"
        );
        open.push(ws);
    }
    let mut fourth = connect(&server.ws_url("/ws"), Some(&token("carol"))).await;
    let refused = frame(&mut fourth, Duration::from_secs(5)).await;
    assert_eq!(refused["code"], "too-many-connections", "{refused}");
    assert!(matches!(
        next(&mut fourth, Duration::from_secs(5)).await,
        Got::Closed(Some(1008))
    ));
    let sse = Sse::open(&server.url("/sse"), Some(&token("carol"))).await;
    assert_eq!(sse.status(), 429);
    let mut other = connect(&server.ws_url("/ws"), Some(&token("dave"))).await;
    assert_eq!(
        frame(&mut other, Duration::from_secs(5)).await["type"],
        "ready"
    );
    // A closed connection frees its slot.
    drop(open.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut again = connect(&server.ws_url("/ws"), Some(&token("carol"))).await;
        if frame(&mut again, Duration::from_secs(5)).await["type"] == "ready" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot was never freed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Frames over the rate: an error frame, then 1008.
    // The server closes part-way: later sends may fail, which is the point.
    for _ in 0..100 {
        use futures_util::SinkExt;
        let ping = tokio_tungstenite::tungstenite::Message::Text(r#"{"type":"ping"}"#.into());
        if other.send(ping).await.is_err() {
            break;
        }
    }
    let mut codes = Vec::new();
    loop {
        match next(&mut other, Duration::from_secs(5)).await {
            Got::Frame(f) => codes.push(
                f["type"].as_str().unwrap_or("").to_owned()
                    + ":"
                    + f["code"].as_str().unwrap_or(""),
            ),
            Got::Closed(code) => {
                assert_eq!(code, Some(1008), "{codes:?}");
                break;
            }
            Got::TimedOut => panic!("still open after 100 frames at once: {codes:?}"),
            Got::Text(t) => panic!("frame is not JSON: {t}"),
        }
    }
    assert_eq!(
        codes.iter().filter(|c| c.starts_with("pong")).count(),
        20,
        "{codes:?}"
    );
    assert_eq!(codes.last().map(String::as_str), Some("error:rate-limited"));

    // Watches are bounded: a huge space id gets an error frame, the connection stays.
    let mut ws = connect(&server.ws_url("/ws"), Some(&token("dave"))).await;
    assert_eq!(
        frame(&mut ws, Duration::from_secs(5)).await["type"],
        "ready"
    );
    common::ws::send(
        &mut ws,
        json!({"type": "watch", "space_id": "s".repeat(16_000), "path": "/"}),
    )
    .await;
    assert_eq!(
        frame(&mut ws, Duration::from_secs(5)).await["code"],
        "bad-watch"
    );
    common::ws::send(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(frame(&mut ws, Duration::from_secs(5)).await["type"], "pong");
}

#[tokio::test]
async fn stats_need_an_admin_and_tickets_are_rate_limited() {
    let server = Server::start(&[]).await;
    let http = reqwest::Client::new();
    let stats = |bearer: Option<String>| {
        let mut request = http.get(server.url("/api/stats"));
        if let Some(t) = bearer {
            request = request.bearer_auth(t);
        }
        request.send()
    };
    assert_eq!(stats(None).await.unwrap().status(), 401);
    assert_eq!(stats(Some(token("bob"))).await.unwrap().status(), 403);
    assert_eq!(
        stats(Some(token(common::ADMIN))).await.unwrap().status(),
        200
    );

    // 5 per second, bursts of 10: one token cannot mint tickets without end.
    let mut issued = 0;
    let mut limited = 0;
    for _ in 0..100 {
        let r = http
            .post(server.url("/api/tickets"))
            .bearer_auth(token("bob"))
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            201 => issued += 1,
            429 => limited += 1,
            other => panic!("ticket answer {other}"),
        }
    }
    assert!((10..=15).contains(&issued), "{issued} issued");
    assert_eq!(issued + limited, 100);
    let other = http
        .post(server.url("/api/tickets"))
        .bearer_auth(token("carol"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 201, "another user is not limited");
}

#[tokio::test]
async fn a_configured_secret_keeps_the_demo_off_unless_asked() {
    // `run` with a configured --jwt-secret: the demo must not mint tokens with it.
    let membership = demo_membership().display().to_string();
    let args = |extra: &[&str]| -> Vec<String> {
        [
            "run",
            "--events",
            "-",
            "--listen",
            "127.0.0.1:0",
            "--jwt-secret",
            SECRET,
            "--membership",
            &membership,
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
    };
    let server = Server::spawn(&args(&[]), true).await;
    for path in ["/", "/api/demo/users"] {
        let status = reqwest::get(server.url(path)).await.unwrap().status();
        assert_eq!(status, 404, "{path} served with a configured secret");
    }
    let minted = reqwest::Client::new()
        .post(server.url("/api/demo/token"))
        .json(&json!({"user": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(minted.status(), 404);
    let asked = Server::spawn(&args(&["--demo"]), true).await;
    assert_eq!(
        reqwest::get(asked.url("/api/demo/users"))
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn oversized_events_are_rejected_with_a_reason_and_the_rest_is_delivered() {
    let huge = format!(
        r#"{{"specversion":"1.0","id":"huge","source":"t","type":"file-uploaded","time":"2026-11-22T10:00:00Z","data":{{"space_id":"s-eng","path":"/projects/f","kind":"file","size":1,"pad":"{}"}}}}"#,
        "x".repeat(200_000)
    ) + "\n";
    let lines = huge + &upload("after", "2026-11-22T10:00:00Z", 1);
    let (code, stdout, stderr) = replay(&lines, &["--strict", "--max-event-bytes", "10000"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("too-large"), "{stderr}");
    assert!(
        stdout.contains("\"after\""),
        "the next event is delivered: {stdout}"
    );
    assert!(!stdout.contains("\"huge\""));
    // Within the default (64 KiB) it passes.
    let (code, _, stderr) = replay(&upload("small", "2026-11-22T10:00:00Z", 1), &["--strict"]);
    assert_eq!(code, 0, "{stderr}");
}

#[tokio::test]
async fn a_non_reading_client_is_evicted_by_queued_bytes_not_only_count() {
    use tokio::io::AsyncWriteExt;
    // A count no one reaches here, and a byte bound a few messages exceed.
    let mut server = Server::start(&[
        "--send-queue",
        "100000",
        "--send-queue-bytes",
        "300000",
        "--write-timeout",
        "60s",
        "--user-rate",
        "0",
    ])
    .await;
    let mut tcp = small_buffer_tcp(&server.addr).await;
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {}\r\n\r\n",
        token("alice")
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    // ~8 KB per message (4 KB paths): the socket's buffers fill first, then the queue's bytes.
    let deep: String = (0..60).map(|i| format!("/{}{i}", "d".repeat(62))).collect();
    for round in 0..400 {
        let events: String = (0..8)
            .map(|i| format!(r#"{{"id":"qb-{round}-{i}","type":"file-uploaded","time":"2026-11-22T10:00:00Z","data":{{"space_id":"s-eng","path":"/projects{deep}/f{i}","kind":"file","size":1}}}}"#) + "\n")
            .collect();
        server.send_events(&events).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let stats = server.stats().await;
        if stats["evicted"].as_u64().unwrap() >= 1 {
            // Evicted long before the write timeout (60 s) or the count (100,000) could act.
            assert_eq!(stats["write_stalls"], 0, "{stats}");
            return;
        }
    }
    panic!("never evicted: {}", server.stats().await);
}

#[test]
fn a_message_grows_linearly_with_its_event() {
    // A 4,000-byte path of 2,000 levels used to become an 8 MB message per recipient.
    let deep = "/d".repeat(1999) + "/f";
    let event = |id: &str, path: &str, old: Option<&str>| {
        let (kind, old) = match old {
            Some(o) => ("item-moved", format!(r#","old_path":"{o}""#)),
            None => ("file-uploaded", String::new()),
        };
        format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"t","type":"{kind}","time":"2026-11-22T10:00:00Z","data":{{"space_id":"s-eng","path":"{path}"{old},"kind":"file","size":1}}}}"#
        ) + "\n"
    };
    let moved = format!("/x{deep}");
    let lines = event("deep-up", &deep, None) + &event("deep-mv", &moved, Some(&deep));
    let (code, stdout, stderr) = replay(&lines, &["--strict"]);
    assert_eq!(code, 0, "{stderr}");
    let mut seen = 0;
    for line in stdout.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let input = if v["message"]["event_id"] == "deep-up" {
            lines.lines().next()
        } else {
            lines.lines().nth(1)
        };
        let input = input.unwrap().len();
        assert!(
            line.len() < 4 * input,
            "a {input}-byte event became a {}-byte message",
            line.len()
        );
        // Still every folder's change, for a client that applies the runs.
        let changes = common::folder_changes(&v["message"]);
        if v["message"]["event_id"] == "deep-up" {
            assert_eq!(changes.len(), 2000, "1,999 folders and the root");
        } else {
            assert!(
                changes.len() >= 4000,
                "old and new ancestors: {}",
                changes.len()
            );
        }
        seen += 1;
    }
    assert!(seen >= 2, "{stdout}");
}
