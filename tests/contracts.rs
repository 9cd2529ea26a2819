//! The contracts in `schemas/` against the fixtures and against what `replay --print` produces,
//! plus golden outputs that pin the pipeline's behaviour on each fixture.
//! Regenerate the goldens after an intended change with `UPDATE_GOLDEN=1 cargo test --test contracts`.

mod common;

use std::collections::{BTreeMap, HashSet};

use common::{Schemas, assert_valid, replay_print, root};
use serde_json::Value;

const FIXTURES: [&str; 3] = ["demo", "edge", "invalid"];

#[test]
fn fixtures_match_their_schemas() {
    let schemas = Schemas::load();
    for set in FIXTURES {
        let dir = root().join("fixtures").join(set);
        let membership: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("membership.json")).unwrap())
                .unwrap();
        assert_valid(
            &schemas.membership,
            &membership,
            &format!("{set}/membership.json"),
        );
        let events = std::fs::read_to_string(dir.join("events.jsonl")).unwrap();
        for (n, line) in events.lines().enumerate() {
            let parsed: Result<Value, _> = serde_json::from_str(line);
            let accepted = foldercast::event::decode(line.as_bytes()).is_ok();
            let schema_ok = parsed
                .as_ref()
                .map(|v| schemas.event.is_valid(v))
                .unwrap_or(false);
            if set == "invalid" {
                // The decoder and the schema agree on what is malformed (an unknown space is
                // well-formed: it is refused later, by the resolver).
                assert_eq!(
                    accepted,
                    schema_ok,
                    "{set}/events.jsonl:{}: decoder and schema disagree: {line}",
                    n + 1
                );
            } else {
                assert!(
                    accepted && schema_ok,
                    "{set}/events.jsonl:{} must be valid: {line}",
                    n + 1
                );
            }
        }
    }
}

#[test]
fn replay_output_matches_golden_and_schema() {
    let schemas = Schemas::load();
    for set in FIXTURES {
        for throttled in [false, true] {
            let dir = root().join("fixtures").join(set);
            let extra: &[&str] = if throttled {
                &[
                    "--throttle",
                    "--user-rate",
                    "0.5",
                    "--user-burst",
                    "2",
                    "--max-backlog",
                    "4",
                ]
            } else {
                &[]
            };
            let out = std::process::Command::new(common::bin())
                .args(["replay", "--print", "--events"])
                .arg(dir.join("events.jsonl"))
                .arg("--membership")
                .arg(dir.join("membership.json"))
                .args(extra)
                .env("FOLDERCAST_LOG", "off")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{set}: replay failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let stdout = String::from_utf8(out.stdout).unwrap();
            for line in stdout.lines() {
                let v: Value = serde_json::from_str(line).unwrap();
                assert_valid(&schemas.message, &v["message"], &format!("{set} message"));
            }
            let name = format!("{set}{}.jsonl", if throttled { "-throttled" } else { "" });
            let golden = root().join("tests/golden").join(&name);
            if std::env::var_os("UPDATE_GOLDEN").is_some() {
                std::fs::write(&golden, &stdout).unwrap();
            }
            let expected = std::fs::read_to_string(&golden)
                .unwrap_or_else(|_| panic!("missing golden {name}"));
            assert_eq!(stdout, expected, "{name} differs from the golden output");
        }
    }
}

fn by_user(pairs: &[(String, Value)]) -> BTreeMap<String, Vec<Value>> {
    let mut map: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for (user, msg) in pairs {
        map.entry(user.clone()).or_default().push(msg.clone());
    }
    map
}

#[test]
fn demo_story_reaches_the_right_people() {
    let dir = root().join("fixtures/demo");
    let (pairs, _, code) =
        replay_print(&dir.join("events.jsonl"), &dir.join("membership.json"), &[]);
    assert_eq!(code, 0);
    let users = by_user(&pairs);
    assert!(
        !users.contains_key("frank"),
        "an uploader never learns names"
    );
    let dave = &users["dave"];
    assert_eq!(dave.first().unwrap()["type"], "space-member-added");
    assert_eq!(
        dave.last().unwrap()["type"],
        "space-member-removed",
        "the removal is dave's last message"
    );
    assert!(users["erin"].iter().all(|m| m["space_id"] == "s-mkt"));
    assert!(users["bob"].iter().any(|m| m["space_id"] == "personal-bob"));
    assert!(
        !users["alice"]
            .iter()
            .any(|m| m["space_id"] == "personal-bob")
    );
    // Within an event, users are sorted; events keep file order.
    let mut last_event = String::new();
    let mut seen_events = HashSet::new();
    let mut users_of_event: Vec<&str> = Vec::new();
    for (user, msg) in &pairs {
        let id = msg["event_id"].as_str().unwrap().to_owned();
        if id != last_event {
            assert!(
                seen_events.insert(id.clone()),
                "event {id} is not contiguous"
            );
            assert!(
                users_of_event.windows(2).all(|w| w[0] < w[1]),
                "users sorted within {last_event}"
            );
            users_of_event.clear();
            last_event = id;
        }
        users_of_event.push(user);
    }
    // The upload into a depth-4 folder reports all four ancestors up to the root.
    let flow = pairs
        .iter()
        .find(|(_, m)| m["item"]["path"] == "/projects/apollo/specs/diagrams/flow.svg")
        .unwrap();
    assert_eq!(flow.1["folders"].as_array().unwrap().len(), 1, "one run");
    let folders = common::folder_changes(&flow.1);
    let folders: Vec<(&str, i64)> = folders.iter().map(|(p, d)| (p.as_str(), *d)).collect();
    assert_eq!(
        folders,
        [
            ("/projects/apollo/specs/diagrams", 40000),
            ("/projects/apollo/specs", 40000),
            ("/projects/apollo", 40000),
            ("/projects", 40000),
            ("/", 40000)
        ]
    );
}

#[test]
fn throttled_replay_coalesces_without_losing_events() {
    let dir = root().join("fixtures/demo");
    let (plain, _, _) = replay_print(&dir.join("events.jsonl"), &dir.join("membership.json"), &[]);
    let (throttled, _, _) = replay_print(
        &dir.join("events.jsonl"),
        &dir.join("membership.json"),
        &[
            "--throttle",
            "--user-rate",
            "0.2",
            "--user-burst",
            "1",
            "--max-backlog",
            "1000",
        ],
    );
    assert!(
        throttled.len() < plain.len(),
        "coalescing reduces messages: {} vs {}",
        throttled.len(),
        plain.len()
    );
    assert!(throttled.iter().any(|(_, m)| m["type"] == "coalesced"));
    // Every event a user would have received is covered exactly once.
    for (user, msgs) in by_user(&plain) {
        let want: Vec<String> = msgs
            .iter()
            .map(|m| m["event_id"].as_str().unwrap().to_owned())
            .collect();
        let got: Vec<String> = throttled
            .iter()
            .filter(|(u, _)| *u == user)
            .flat_map(|(_, m)| match m["event_ids"].as_array() {
                Some(ids) => ids
                    .iter()
                    .map(|i| i.as_str().unwrap().to_owned())
                    .collect::<Vec<_>>(),
                None => vec![m["event_id"].as_str().unwrap().to_owned()],
            })
            .collect();
        let mut sorted_want = want.clone();
        let mut sorted_got = got.clone();
        sorted_want.sort();
        sorted_got.sort();
        assert_eq!(sorted_got, sorted_want, "{user}: every event covered once");
    }
    // Folder deltas are conserved by coalescing: the sum per user and folder is unchanged.
    let sums = |pairs: &[(String, Value)]| {
        let mut s: BTreeMap<(String, String, String), i64> = BTreeMap::new();
        for (u, m) in pairs {
            for (folder, delta) in common::folder_changes(m) {
                *s.entry((u.clone(), m["space_id"].as_str().unwrap().into(), folder))
                    .or_default() += delta;
            }
        }
        s.retain(|_, v| *v != 0);
        s
    };
    assert_eq!(sums(&throttled), sums(&plain));
}

#[test]
fn backlog_overflow_yields_resync() {
    let dir = root().join("fixtures/demo");
    let (throttled, _, _) = replay_print(
        &dir.join("events.jsonl"),
        &dir.join("membership.json"),
        &[
            "--throttle",
            "--user-rate",
            "0.01",
            "--user-burst",
            "1",
            "--max-backlog",
            "3",
        ],
    );
    let resyncs: Vec<&Value> = throttled
        .iter()
        .filter(|(u, _)| u == "alice")
        .map(|(_, m)| m)
        .filter(|m| m["type"] == "resync")
        .collect();
    assert!(
        !resyncs.is_empty(),
        "alice fell behind and must be told to resync"
    );
    assert!(resyncs.iter().all(|m| m["space_id"].is_string()));
}

#[test]
fn rejected_events_are_reported_and_strict_fails() {
    let dir = root().join("fixtures/invalid");
    let (pairs, stderr, code) =
        replay_print(&dir.join("events.jsonl"), &dir.join("membership.json"), &[]);
    assert_eq!(code, 0, "rejections do not fail a normal replay");
    let ids: HashSet<&str> = pairs
        .iter()
        .map(|(_, m)| m["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        HashSet::from(["ok-1", "ok-2"]),
        "the valid events around bad ones are delivered"
    );
    assert!(
        stderr.contains("9 rejected"),
        "summary counts rejections: {stderr}"
    );
    for code in [
        "invalid-json",
        "invalid-path",
        "unknown-type",
        "invalid-field",
        "missing-field",
        "unknown-space",
        "unsupported-specversion",
    ] {
        assert!(stderr.contains(code), "summary names {code}: {stderr}");
    }
    assert!(
        stderr.contains("events.jsonl:2"),
        "rejections are logged with their position: {stderr}"
    );
    let (_, _, strict) = replay_print(
        &dir.join("events.jsonl"),
        &dir.join("membership.json"),
        &["--strict"],
    );
    assert_eq!(strict, 1);
}

#[test]
fn the_demo_preferences_fixture_matches_its_schema() {
    let schemas = Schemas::load();
    let path = root().join("fixtures/demo/preferences.json");
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (user, prefs) in fixture["users"].as_object().expect("a users object") {
        assert_valid(
            &schemas.preferences,
            prefs,
            &format!("preferences of {user}"),
        );
    }
    let loaded = foldercast::preferences::load_fixture(&path).expect("the product reads it");
    assert_eq!(loaded.len(), fixture["users"].as_object().unwrap().len());
}
