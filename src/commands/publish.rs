//! `foldercast publish`: a notification from the command line, through Redis.
//!
//! Only wiring: the flags become the request `POST /api/notifications` takes, the directory
//! (fixture or oCIS) resolves groups, spaces and everyone, and the Redis bus carries it. The
//! answer (notification id, users targeted, how each target was resolved) is printed as JSON.

use std::process::ExitCode;
use std::sync::Arc;

use crate::bus::{Bus, RedisBus};
use crate::config::PublishArgs;
use crate::notice::publish::{Publisher, Publishing};
use crate::notice::{Notice, Targets};

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
        targets: Targets {
            users: args.users,
            groups: args.groups,
            spaces: args.spaces,
            all: args.all,
        },
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
