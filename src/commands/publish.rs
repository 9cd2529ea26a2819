//! `foldercast publish` and `announce-downtime`: notifications from the command line, through
//! Redis.
//!
//! Only wiring: the flags become the request `POST /api/notifications` takes, the directory
//! (fixture or oCIS) resolves groups, spaces and everyone, and the Redis bus carries it. The
//! answer (notification id, users targeted, how each target was resolved) is printed as JSON.

use std::process::ExitCode;
use std::sync::Arc;

use crate::bus::{Bus, RedisBus};
use crate::config::{DowntimeArgs, PublishArgs};
use crate::notice::Notice;
use crate::notice::publish::{Publisher, Publishing};

pub fn publish(args: PublishArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(publish_async(args))
}

async fn publish_async(args: PublishArgs) -> anyhow::Result<ExitCode> {
    let has_directory = args.membership.membership.is_some() || args.membership.ocis_url.is_some();
    let resolver = if has_directory {
        Some(super::setup::resolver(&args.membership, None)?)
    } else {
        None
    };
    let bus = RedisBus::connect(
        &super::redis_target(&args.redis),
        super::redis_options(&args.redis),
        None,
    )
    .await?;
    let publisher = Publisher {
        resolver,
        bus: bus as Arc<dyn Bus>,
        retention: args.critical_retention,
    };
    let notice = Notice {
        level: args.level,
        title: args.title,
        body: args.body,
        link: args.link,
        expires: args.expires,
        ack: args.ack,
        action: match &args.action {
            Some(text) => Some(
                serde_json::from_str(text)
                    .map_err(|e| anyhow::anyhow!("--action is not a JSON object: {e}"))?,
            ),
            None => None,
        },
        targets: args.targets.targets(),
        downtime: None,
        shutdown_advice: false,
    };
    let who = Publishing {
        publisher: "cli",
        idempotency_key: args.idempotency_key.as_deref(),
    };
    match publisher.publish(&notice, who).await {
        Ok(published) => {
            println!("{}", serde_json::to_string(&published)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("foldercast publish: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

pub fn announce_downtime(args: DowntimeArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(announce_async(args))
}

async fn announce_async(args: DowntimeArgs) -> anyhow::Result<ExitCode> {
    let bus = RedisBus::connect(
        &super::redis_target(&args.redis),
        super::redis_options(&args.redis),
        None,
    )
    .await?;
    // Scheduling only: the gateways send (they resolve the targets).
    let scheduler = crate::notice::downtime::Scheduler::new(Arc::new(Publisher {
        resolver: None,
        bus: bus as Arc<dyn Bus>,
        retention: crate::notice::publish::CRITICAL_RETENTION,
    }));
    if args.list {
        let all = scheduler.list().await?;
        println!(
            "{}",
            serde_json::to_string(&serde_json::json!({"downtimes": all}))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(id) = &args.cancel {
        if scheduler.cancel(id).await? {
            println!("{}", serde_json::json!({"cancelled": id}));
            return Ok(ExitCode::SUCCESS);
        }
        eprintln!("foldercast announce-downtime: no downtime {id:?}");
        return Ok(ExitCode::from(1));
    }
    let request = crate::notice::downtime::DowntimeRequest {
        from: args.from.unwrap_or_default(),
        until: args.until.unwrap_or_default(),
        title: args.title,
        body: args.body,
        targets: args.targets.targets(),
        steps: Some(args.steps),
    };
    let downtime = match request.schedule(chrono::Utc::now().timestamp_millis()) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("foldercast announce-downtime: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    scheduler.schedule(&downtime).await?;
    println!("{}", serde_json::to_string(&downtime)?);
    Ok(ExitCode::SUCCESS)
}
