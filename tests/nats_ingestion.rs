//! oCIS's event bus, for real: `replay --to-nats` writes a reva fixture (go-micro envelopes, as
//! oCIS publishes them) into a nats-server's JetStream; read back in order, every envelope
//! opens and maps as the NATS source will map it, and what maps to a storage event meets the
//! input contract.

mod common;

use std::time::Duration;

use async_nats::jetstream;
use common::{Schemas, assert_valid, bin, root, server_env, unique};
use foldercast::source::nats::{envelope, reva};
use futures_util::StreamExt;
use serde_json::Value;

/// What each fixture line must become, in order.
const EXPECTED: [&str; 17] = [
    "ids folder-created /reports",
    "ids file-touched /reports/notes.md",
    "lookup UploadReady size /reports/q1.pdf",
    "lookup ItemMoved size /reports/q1-final.pdf",
    "lookup ItemTrashed size /reports/q1-final.pdf",
    "event space-member-added",
    "event space-member-removed",
    "invalidate",
    "invalidate",
    "event group-member-added",
    "skip user event",
    "ids folder-created /reports/2026",
    "skip failed upload",
    "rejected invalid-field",
    "rejected invalid-json",
    "lookup ItemRestored size /reports/q1-final.pdf",
    "lookup FileVersionRestored size /reports/q1-final.pdf",
];

/// The time a stream stored a message: what dates an event that carries none.
const STORED_AT: &str = "2026-12-01T00:00:00Z";

fn outcome(bytes: &[u8], schemas: &Schemas) -> String {
    let opened = match envelope::open(bytes) {
        Ok(e) => e,
        Err(r) => return format!("rejected {}", r.code),
    };
    match reva::map(&opened, STORED_AT) {
        Err(r) => format!("rejected {}", r.code),
        Ok(reva::Mapped::Event(event)) => {
            let json: Value = serde_json::from_slice(&event).unwrap();
            assert_valid(&schemas.event, &json, "a mapped reva event");
            let decoded = foldercast::event::decode(&event).expect("the pipeline takes it");
            assert_eq!(
                decoded.id, opened.event_id,
                "the reva event id is the event's id"
            );
            match json["data"]["path"].as_str() {
                Some(path) => format!("event {} {path}", json["type"].as_str().unwrap()),
                None => format!("event {}", json["type"].as_str().unwrap()),
            }
        }
        // Exact without oCIS, which only adds the item's ids.
        Ok(reva::Mapped::Lookup(l)) if l.missing == "ids" => {
            let exact = l.exact.expect("an ids lookup carries its event");
            let json: Value = serde_json::from_slice(&exact).unwrap();
            assert_valid(&schemas.event, &json, "a mapped reva event");
            foldercast::event::decode(&exact).expect("the pipeline takes it");
            format!(
                "ids {} {}",
                json["type"].as_str().unwrap(),
                json["data"]["path"].as_str().unwrap()
            )
        }
        Ok(reva::Mapped::Lookup(l)) => format!(
            "lookup {} {} {}",
            l.reva_type,
            l.missing,
            l.path.unwrap_or_default()
        ),
        Ok(reva::Mapped::Invalidate { .. }) => "invalidate".into(),
        Ok(reva::Mapped::Skip(reason)) => format!("skip {reason}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reva_fixture_goes_into_jetstream_in_order_and_every_envelope_maps() {
    let url = server_env("FOLDERCAST_TEST_NATS");
    let stream = unique("fc-reva").replace('.', "-");
    let fixture = root().join("fixtures/ocis/events.jsonl");
    let out = tokio::process::Command::new(bin())
        .args(["replay", "--events"])
        .arg(&fixture)
        .args(["--to-nats", &url, "--nats-stream", &stream])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("published 17 events"), "{stderr}");

    // Read the stream back from its first message, as a durable consumer of oCIS's would.
    let js = jetstream::new(async_nats::connect(&url).await.unwrap());
    let consumer = js
        .get_stream(&stream)
        .await
        .unwrap()
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some(unique("reader").replace('.', "-")),
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let lines: Vec<String> = std::fs::read_to_string(&fixture)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let schemas = Schemas::load();
    let mut got = Vec::new();
    while got.len() < lines.len() {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("the whole fixture is in the stream")
            .expect("open")
            .expect("a message");
        assert_eq!(
            String::from_utf8_lossy(&message.payload),
            lines[got.len()],
            "stored as written, in order"
        );
        got.push(outcome(&message.payload, &schemas));
        message.ack().await.unwrap();
    }
    assert_eq!(got, EXPECTED);
    // Nothing more than the fixture.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), messages.next())
            .await
            .is_err()
    );
}
