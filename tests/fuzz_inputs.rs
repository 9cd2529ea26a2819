//! Mutation fuzzing of what foldercast reads from outside: event lines and client frames.
//!
//! Seeded and reproducible: the seed is printed, and `FOLDERCAST_FUZZ_SEED=<n>` replays a run.
//! Each run mutates the fixtures (byte flips, insertions, deletions, splices, huge numbers, deep
//! nesting, long strings) into 100,000 event lines and 100,000 client frames and checks that
//! nothing panics, memory stays bounded, and every rejection says why.

mod common;

use std::time::Duration;

use common::{bin, demo_membership, root};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const LINES: usize = 100_000;
const FRAMES: usize = 100_000;

fn seed() -> u64 {
    let seed = std::env::var("FOLDERCAST_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_201);
    eprintln!("fuzz seed {seed} (FOLDERCAST_FUZZ_SEED={seed} to replay)");
    seed
}

/// One mutation of `input` (never a newline: a line stays one line).
fn mutate(rng: &mut StdRng, input: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let len = out.len().max(1);
        let at = rng.random_range(0..len).min(out.len());
        match rng.random_range(0..10) {
            0 => {
                if let Some(b) = out.get_mut(at) {
                    *b ^= 1 << rng.random_range(0..8);
                }
            }
            1 => out.insert(at, rng.random()),
            2 => {
                let end = (at + rng.random_range(1..20)).min(out.len());
                out.drain(at..end);
            }
            3 => {
                let end = (at + rng.random_range(1..40)).min(out.len());
                let piece = out[at..end].to_vec();
                out.splice(at..at, piece);
            }
            4 => {
                // Splice in a piece of another input.
                let other = &corpus[rng.random_range(0..corpus.len())];
                let from = rng.random_range(0..other.len().max(1)).min(other.len());
                let end = (from + rng.random_range(1..60)).min(other.len());
                out.splice(at..at, other[from..end].iter().copied());
            }
            5 => {
                let huge: &[&[u8]] = &[
                    b"18446744073709551616",
                    b"-9223372036854775809",
                    b"1e400",
                    b"9007199254740992",
                    b"-0",
                    b"null",
                    b"\"\\u0000\"",
                    b"\"\\ud800\"",
                ];
                out.splice(
                    at..at,
                    huge[rng.random_range(0..huge.len())].iter().copied(),
                );
            }
            6 => {
                let depth = rng.random_range(1..200);
                let nest: Vec<u8> = std::iter::repeat_n(b'[', depth)
                    .chain(std::iter::repeat_n(b']', depth))
                    .collect();
                out.splice(at..at, nest);
            }
            7 => {
                let long = std::iter::repeat_n(b'a', rng.random_range(100..5000));
                out.splice(at..at, long);
            }
            8 => out.truncate(at),
            _ => {
                let tokens: &[&[u8]] = &[
                    b"/../",
                    b"//",
                    b"\"/\"",
                    b"{}",
                    b"[]",
                    b"\"type\":",
                    b"\":\"",
                ];
                out.splice(
                    at..at,
                    tokens[rng.random_range(0..tokens.len())].iter().copied(),
                );
            }
        }
    }
    out.retain(|b| *b != b'\n' && *b != b'\r');
    out
}

fn fixture_lines() -> Vec<Vec<u8>> {
    ["demo", "edge", "invalid"]
        .iter()
        .flat_map(|set| {
            let text = std::fs::read(root().join(format!("fixtures/{set}/events.jsonl"))).unwrap();
            text.split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .map(<[u8]>::to_vec)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Peak resident memory of a running process, in KB (`VmHWM`).
fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_event_lines_are_each_delivered_or_rejected_with_a_reason() {
    let mut rng = StdRng::seed_from_u64(seed());
    let corpus = fixture_lines();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzzed.jsonl");
    let mut text = Vec::with_capacity(LINES * 300);
    let mut written = 0;
    while written < LINES {
        let base = &corpus[rng.random_range(0..corpus.len())];
        let line = mutate(&mut rng, base, &corpus);
        // Blank lines are skipped by the reader, not events: keep the count exact.
        if line.trim_ascii().is_empty() {
            continue;
        }
        text.extend_from_slice(&line);
        text.push(b'\n');
        written += 1;
    }
    std::fs::write(&path, &text).unwrap();

    let mut child = tokio::process::Command::new(bin())
        .args(["replay", "--events"])
        .arg(&path)
        .arg("--membership")
        .arg(demo_membership())
        .args(["--throttle", "--user-burst", "5"])
        .env("FOLDERCAST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let read = tokio::spawn(async move {
        let mut out = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut out)
            .await
            .unwrap();
        out
    });
    let mut peak = 0;
    let status = loop {
        if let Some(kb) = peak_rss_kb(pid) {
            peak = peak.max(kb);
        }
        match tokio::time::timeout(Duration::from_millis(50), child.wait()).await {
            Ok(status) => break status.unwrap(),
            Err(_) => continue,
        }
    };
    let stderr = read.await.unwrap();
    assert!(status.success(), "replay failed ({status}): {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // "replay: E events, D delivered, U duplicates, A applied, R rejected (code: n, …); …"
    let summary = stderr
        .lines()
        .find(|l| l.starts_with("replay: "))
        .unwrap_or_else(|| panic!("no summary: {stderr}"));
    let numbers: Vec<u64> = summary
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    let (events, delivered, duplicates, applied, rejected) =
        (numbers[0], numbers[1], numbers[2], numbers[3], numbers[4]);
    eprintln!("{summary}; peak RSS {} MB", peak / 1024);
    assert_eq!(events, LINES as u64, "{summary}");
    assert_eq!(
        delivered + duplicates + applied + rejected,
        events,
        "every line accounted for: {summary}"
    );
    // Every rejection has a code, and the codes add up.
    let by_code: u64 = summary
        .split_once('(')
        .map(|(_, codes)| {
            codes
                .split(')')
                .next()
                .unwrap_or("")
                .split(", ")
                .filter_map(|c| c.split_once(": ")?.1.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    assert_eq!(by_code, rejected, "{summary}");
    assert!(
        rejected > LINES as u64 / 10,
        "the mutations reach the checks: {summary}"
    );
    assert!(peak < 256 * 1024, "peak RSS {} MB", peak / 1024);
}

#[test]
fn mutated_client_frames_parse_or_get_an_error_code() {
    use foldercast::gateway::protocol::{ClientFrame, parse_client_frame};
    use foldercast::gateway::session::Watches;
    let mut rng = StdRng::seed_from_u64(seed() ^ 0xf4a3);
    let corpus: Vec<Vec<u8>> = [
        r#"{"type":"watch","space_id":"s-eng","path":"/f1/f2"}"#,
        r#"{"type":"unwatch","space_id":"s-eng","path":"/f1"}"#,
        r#"{"type":"unwatch"}"#,
        r#"{"type":"ping"}"#,
        r#"{"type":"auth","token":"eyJhbGciOiJIUzI1NiJ9.e30.x","since":"0123456789abcdef:1-0"}"#,
        r#"{"type":"resume","since":"0123456789abcdef:1764523351234-0"}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let mut watches = Watches::default();
    let (mut accepted, mut refused) = (0, 0);
    let mut codes = std::collections::BTreeMap::<&str, u64>::new();
    for _ in 0..FRAMES {
        let base = &corpus[rng.random_range(0..corpus.len())];
        let bytes = mutate(&mut rng, base, &corpus);
        // The WebSocket layer refuses non-UTF-8 text (1007); what reaches the parser is text.
        let text = String::from_utf8_lossy(&bytes);
        match parse_client_frame(&text) {
            Ok(ClientFrame::Watch { space_id, path }) => match watches.add(&space_id, path) {
                Ok(()) => accepted += 1,
                Err(e) => {
                    assert!(!e.code.is_empty());
                    *codes.entry(e.code).or_default() += 1;
                    refused += 1;
                    watches = Watches::default();
                }
            },
            Ok(_) => accepted += 1,
            Err(e) => {
                assert!(!e.code.is_empty(), "no code for {text:?}");
                assert!(!e.message.is_empty(), "no reason for {text:?}");
                *codes.entry(e.code).or_default() += 1;
                refused += 1;
            }
        }
    }
    eprintln!("{FRAMES} frames: {accepted} accepted, {refused} refused {codes:?}");
    assert_eq!(accepted + refused, FRAMES);
    assert!(
        refused > FRAMES / 10 && accepted > FRAMES / 100,
        "{codes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_gateway_answers_mutated_frames_and_stays_up() {
    use common::ws::{Got, connect, next, send_text};
    const SENT: usize = 5_000;
    let server = common::Server::start(&["--max-frames-per-sec", "0"]).await;
    let mut ws = connect(&server.ws_url("/ws"), Some(&common::token("bob"))).await;
    assert!(
        matches!(next(&mut ws, Duration::from_secs(5)).await, Got::Frame(f) if f["type"] == "ready")
    );
    let mut rng = StdRng::seed_from_u64(seed() ^ 0x5eed);
    let corpus: Vec<Vec<u8>> = [
        r#"{"type":"watch","space_id":"s-eng","path":"/f1/f2"}"#,
        r#"{"type":"unwatch","space_id":"s-eng"}"#,
        r#"{"type":"ping"}"#,
        r#"{"type":"auth","token":"x.y.z"}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    // Read while writing, so neither side's buffers fill.
    let (mut sink, mut stream) = futures_util::StreamExt::split(ws);
    let reader = tokio::spawn(async move {
        let (mut errors, mut pongs) = (0, 0);
        loop {
            match tokio::time::timeout(
                Duration::from_secs(5),
                futures_util::StreamExt::next(&mut stream),
            )
            .await
            {
                Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) => {
                    let f: serde_json::Value = serde_json::from_str(&t).unwrap();
                    if f["type"] == "error" {
                        assert!(f["code"].as_str().is_some_and(|c| !c.is_empty()), "{f}");
                        errors += 1;
                    }
                    pongs += usize::from(f["type"] == "pong");
                }
                Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Close(c)))) => {
                    panic!("closed after {errors} error frames: {c:?}")
                }
                Ok(Some(Ok(_))) => {}
                Ok(None) | Ok(Some(Err(_))) => {
                    panic!("connection lost after {errors} error frames")
                }
                Err(_) => return (errors, pongs),
            }
        }
    });
    for _ in 0..SENT {
        let base = &corpus[rng.random_range(0..corpus.len())];
        let text = String::from_utf8_lossy(&mutate(&mut rng, base, &corpus)).into_owned();
        send_text(&mut sink, &text).await;
    }
    send_text(&mut sink, r#"{"type":"ping"}"#).await;
    let (errors, pongs) = reader.await.unwrap();
    eprintln!("{SENT} mutated frames: {errors} error frames, {pongs} pongs");
    assert!(pongs >= 1, "the gateway still answers");
    assert!(errors > SENT / 10);
    assert_eq!(
        reqwest::get(server.url("/healthz")).await.unwrap().status(),
        200
    );
    // And its memory stayed bounded (it idles at about 10 MB).
    let peak = server
        .child
        .id()
        .and_then(peak_rss_kb)
        .expect("the gateway's VmHWM");
    assert!(peak < 256 * 1024, "gateway peak RSS {} MB", peak / 1024);
}
