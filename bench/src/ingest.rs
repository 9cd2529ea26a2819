//! `foldercast-bench ingest`: oCIS's own events from NATS JetStream next to Kafka, in one run.
//!
//! Both sources carry the same trace (uploads of distinct files over `spaces` spaces with
//! `members` viewers each, depth-8 paths) into the same Redis, each consumed by a child
//! `foldercast consume` with membership from the bench's LibreGraph server (`graph.rs`, its
//! cache warm after each space's first event) and the rate limit off:
//! - Kafka: foldercast's storage events, complete (`size` given);
//! - NATS: reva `UploadReady` envelopes, as oCIS publishes them; each needs its size looked up
//!   (`GET /graph/v1.0/drives/{drive}/items/{item}`), which the same server answers.
//!
//! The clock runs from the first message in Redis to the last (`INFO commandstats` XADD calls).
//! Rounds alternate which source goes first; the median ratio NATS ÷ Kafka is reported. Then a
//! burst of `burst` uploads into one folder of one space counts the requests to oCIS per event.

use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;

use crate::args::BenchIngestArgs;
use crate::consume::until_published;
use foldercast::source::kafka::KafkaProducer;
use foldercast::source::nats::jetstream::{EnvelopeProducer, StreamTarget};

pub fn run(args: BenchIngestArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_async(args))
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Source {
    Kafka,
    Nats,
}

/// One source's measured run.
struct Run {
    secs: f64,
    cpu: f64,
}

/// The directory part of every path: depth 8, as the other benchmarks.
fn folder_of(n: u64) -> String {
    (1..8)
        .map(|d| format!("/folder-{d}-{}", (n / 7 + d) % 5))
        .collect()
}

fn size_of(n: u64) -> u64 {
    1000 + n % 9000
}

/// foldercast's storage event of upload `n` (the bench graph server's size for the same item).
fn storage_event(tag: &str, n: u64, space: usize, folder: &str) -> String {
    format!(
        r#"{{"specversion":"1.0","id":"{tag}-{n}","source":"bench","type":"file-uploaded","time":"2026-11-30T08:00:00Z","data":{{"space_id":"st$space-{space}","path":"{folder}/file-{n}.bin","kind":"file","size":{},"actor":"user-{space}-0","item_id":"st$space-{space}!n{n}","etag":"\"{n}\""}}}}"#,
        size_of(n)
    )
}

/// oCIS's `UploadReady` of the same upload, in its go-micro envelope.
fn reva_envelope(tag: &str, n: u64, space: usize, folder: &str, overwrite: bool) -> Vec<u8> {
    let root = serde_json::json!({"storage_id": "st", "opaque_id": format!("space-{space}"), "space_id": format!("space-{space}")});
    let payload = serde_json::json!({
        "UploadID": format!("up-{n}"), "Filename": format!("file-{n}.bin"),
        "SpaceOwner": {"opaque_id": format!("space-{space}"), "type": 8},
        "ExecutingUser": {"id": {"idp": "https://ocis.bench", "opaque_id": format!("user-{space}-0"), "type": 1}},
        "ImpersonatingUser": null,
        "FileRef": {"resource_id": root, "path": format!(".{folder}/file-{n}.bin")},
        "ResourceID": {"storage_id": "st", "opaque_id": format!("n{n}"), "space_id": format!("space-{space}")},
        "Timestamp": {"seconds": 1_795_942_800u64 + n}, "Failed": false, "IsVersion": overwrite,
    });
    serde_json::json!({
        "Timestamp": "2026-11-30T08:00:00Z",
        "Metadata": {"eventtype": "events.UploadReady", "eventid": format!("{tag}-{n}"), "initiatorid": ""},
        "ID": format!("env-{tag}-{n}"), "Topic": "main-queue",
        "Payload": base64::engine::general_purpose::STANDARD.encode(payload.to_string()),
    })
    .to_string()
    .into_bytes()
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{prefix}-{nanos}")
}

/// Writes `events` uploads (upload `n` in space `n % spaces`, or all in space 0 and one folder
/// when `one_folder`; over existing files when `overwrite`) into the source, unconsumed.
async fn produce(
    args: &BenchIngestArgs,
    source: Source,
    tag: &str,
    events: u64,
    one_folder: bool,
    overwrite: bool,
) -> anyhow::Result<()> {
    let place = |n: u64| {
        if one_folder {
            (0, "/burst".to_owned())
        } else {
            (n as usize % args.spaces.max(1), folder_of(n))
        }
    };
    match source {
        Source::Kafka => {
            let producer = KafkaProducer::connect(&args.brokers, tag, 3).await?;
            let mut batch = Vec::with_capacity(5000);
            for n in 0..events {
                let (space, folder) = place(n);
                batch.push((
                    Some(format!("space-{space}")),
                    storage_event(tag, n, space, &folder).into_bytes(),
                ));
                if batch.len() == 5000 || n + 1 == events {
                    producer.send_all(&batch).await?;
                    batch.clear();
                }
            }
        }
        Source::Nats => {
            let producer = EnvelopeProducer::connect(&StreamTarget {
                url: args.nats.clone(),
                stream: tag.to_owned(),
                subject: tag.to_owned(),
            })
            .await?;
            let mut batch = Vec::with_capacity(5000);
            for n in 0..events {
                let (space, folder) = place(n);
                batch.push(reva_envelope(tag, n, space, &folder, overwrite));
                if batch.len() == 5000 || n + 1 == events {
                    producer.publish_all(&batch).await?;
                    batch.clear();
                }
            }
        }
    }
    Ok(())
}

/// `args.burst` uploads into one folder of one space through NATS (over files nobody saw when
/// `overwrite`), consumed.
async fn one_folder_burst(
    args: &BenchIngestArgs,
    exe: &std::path::Path,
    graph: &str,
    conn: &mut redis::aio::MultiplexedConnection,
    overwrite: bool,
) -> anyhow::Result<Run> {
    let what = if overwrite { "overwrites" } else { "uploads" };
    let tag = unique(&format!("ingest-burst-{what}"));
    eprintln!("burst: {} {what} into one folder…", args.burst);
    produce(args, Source::Nats, &tag, args.burst, true, overwrite).await?;
    let expected = args.burst * args.members as u64;
    consume(args, exe, graph, Source::Nats, &tag, expected, conn).await
}

/// Consumes what [`produce`] wrote with a child `foldercast consume`, timed from the first
/// message in Redis to the last.
async fn consume(
    args: &BenchIngestArgs,
    exe: &std::path::Path,
    graph: &str,
    source: Source,
    tag: &str,
    expected: u64,
    conn: &mut redis::aio::MultiplexedConnection,
) -> anyhow::Result<Run> {
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(conn)
        .await?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("consume");
    match source {
        Source::Kafka => cmd.args([
            "--brokers",
            &args.brokers,
            "--topic",
            tag,
            "--group",
            &format!("{tag}-group"),
            "--dead-letter-topic",
            &format!("{tag}-dlq"),
        ]),
        Source::Nats => cmd.args([
            "--nats",
            &args.nats,
            "--nats-stream",
            tag,
            "--nats-durable",
            &format!("{tag}-durable"),
            "--nats-start",
            "all",
            "--nats-dead-letter-subject",
            &format!("{tag}-dlq"),
        ]),
    };
    let mut child = cmd
        .args(["--redis", &args.redis, "--ocis-url", graph])
        .args(["--user-rate", "0", "--log", "warn"])
        .env("FOLDERCAST_OCIS_TOKEN", "bench")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("no pid")?;
    let timed = until_published(conn, pid, expected, &format!("{source:?}")).await?;
    let run = Run {
        secs: timed.secs,
        cpu: timed.cpu,
    };
    let _ = child.kill().await;
    // Synchronously: a lazy free would run beside the next source's run.
    let _: () = redis::cmd("FLUSHDB").query_async(conn).await?;
    Ok(run)
}

async fn run_async(args: BenchIngestArgs) -> anyhow::Result<ExitCode> {
    let exe = crate::product_binary(args.binary.as_ref())?;
    let calls = Arc::new(crate::graph::Calls::default());
    let graph = crate::graph::start(args.members, calls.clone())?;
    let client = redis::Client::open(args.redis.as_str())?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .context("cannot reach redis")?;
    conn.set_response_timeout(Duration::from_secs(60));
    let expected = args.events * args.members as u64;

    let mut ratios = Vec::new();
    let mut last = None;
    for round in 1..=args.rounds.max(1) {
        let order = if round % 2 == 1 {
            [Source::Kafka, Source::Nats]
        } else {
            [Source::Nats, Source::Kafka]
        };
        let mut kafka = None;
        let mut nats = None;
        for source in order {
            let tag = unique(&format!("ingest-{source:?}").to_lowercase());
            eprintln!(
                "round {round}: producing {} events into {source:?}…",
                args.events
            );
            produce(&args, source, &tag, args.events, false, false).await?;
            let run = consume(&args, &exe, &graph, source, &tag, expected, &mut conn).await?;
            eprintln!(
                "round {round}: {source:?} {:.0} events/s ({:.1} µs CPU per event)",
                args.events as f64 / run.secs,
                run.cpu * 1e6 / args.events as f64
            );
            match source {
                Source::Kafka => kafka = Some(run),
                Source::Nats => nats = Some(run),
            }
        }
        let (Some(kafka), Some(nats)) = (kafka, nats) else {
            bail!("a source did not run");
        };
        ratios.push(kafka.secs / nats.secs);
        last = Some((kafka, nats));
    }
    let mut sorted = ratios.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];

    // A burst into one folder: requests to oCIS per event. Then the same burst over files
    // nobody saw before (`IsVersion`): no exact delta, so the folders above each file
    // (`/burst` and the root) are read too.
    let before = calls.snapshot();
    let burst = one_folder_burst(&args, &exe, &graph, &mut conn, false).await?;
    let (items, permissions, _) = calls.since(before);
    let before = calls.snapshot();
    let overwrites = one_folder_burst(&args, &exe, &graph, &mut conn, true).await?;
    let (overwrite_items, _, overwrite_folders) = calls.since(before);

    let Some((kafka, nats)) = last else {
        bail!("no round ran");
    };
    println!(
        "bench ingest: {} uploads × {} members = {} messages per source, {} spaces, rate limit off, membership from the bench's LibreGraph server; {} round(s)",
        args.events,
        args.members,
        expected,
        args.spaces,
        ratios.len()
    );
    println!(
        "  last round: Kafka → consume → Redis {:.0} events/s ({:.1} µs CPU/event); NATS (reva UploadReady, one size lookup each) → consume → Redis {:.0} events/s ({:.1} µs CPU/event)",
        args.events as f64 / kafka.secs,
        kafka.cpu * 1e6 / args.events as f64,
        args.events as f64 / nats.secs,
        nats.cpu * 1e6 / args.events as f64
    );
    println!(
        "  NATS ÷ Kafka: {:.2}× (median; target ≥ 0.9×); rounds: {}",
        median,
        ratios
            .iter()
            .map(|r| format!("{r:.2}×"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  burst of {} uploads into one folder: {} item lookups ({:.2} per event; one per distinct item, none for ancestors), {} membership requests; {:.0} events/s",
        args.burst,
        items,
        items as f64 / args.burst.max(1) as f64,
        permissions,
        args.burst as f64 / burst.secs
    );
    println!(
        "  burst of {} overwrites of files never seen, into one folder: {} item lookups ({:.2} per event), {} folder reads for absolute sizes ({:.3} per event; 2 folders above each file, shared by the events pulled before each read); {:.0} events/s",
        args.burst,
        overwrite_items,
        overwrite_items as f64 / args.burst.max(1) as f64,
        overwrite_folders,
        overwrite_folders as f64 / args.burst.max(1) as f64,
        args.burst as f64 / overwrites.secs
    );
    println!(
        "  reproduce: scripts/bench.sh ingest   (or: foldercast-bench ingest --brokers B --nats URL --redis URL --events {} --members {} --spaces {} --rounds {} --burst {})",
        args.events,
        args.members,
        args.spaces,
        ratios.len(),
        args.burst
    );
    Ok(ExitCode::SUCCESS)
}
