//! `foldercast self-test`: runs the checks of [`crate::selftest`] that the flags name, prints
//! the report, and exits 1 on any failure.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::bus::{Bus, RedisBus};
use crate::config::SelfTestArgs;
use crate::gateway::auth::Authenticator;
use crate::gateway::auth::oidc::OidcSettings;
use crate::membership::ocis::GraphClient;
use crate::selftest::{self, Check};

pub fn self_test(args: SelfTestArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let checks = runtime.block_on(checks(&args));
    print!("{}", selftest::render(&checks));
    Ok(if selftest::failed(&checks) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

async fn checks(args: &SelfTestArgs) -> Vec<Check> {
    let r = &args.redis;
    let mut checks = selftest::redis::check(
        r.redis.as_deref(),
        r.redis_cluster.as_deref().unwrap_or_default(),
    )
    .await;
    match &args.brokers {
        Some(brokers) => {
            checks.extend(
                selftest::kafka::check(selftest::kafka::Target {
                    brokers: brokers.clone(),
                    topic: args.kafka.topic.clone(),
                    group: args.kafka.group.clone(),
                    dead_letter_topic: args.kafka.dead_letter_topic.clone(),
                })
                .await,
            );
        }
        None if args.nats.nats.is_none() => checks.push(Check::skipped(
            "kafka",
            "no --brokers (nor --nats): no event source checked",
        )),
        None => {}
    }
    if let Some(url) = &args.nats.nats {
        let n = &args.nats;
        checks.extend(
            selftest::nats::check(&selftest::nats::Target {
                url: url.clone(),
                stream: n.stream.clone(),
                subject: n.subject.clone().unwrap_or_else(|| n.stream.clone()),
                durable: n.durable.clone(),
            })
            .await,
        );
    }
    match &args.membership.ocis_url {
        Some(url) => {
            match super::setup::ocis_settings(&args.membership, url)
                .and_then(|s| GraphClient::from_settings(s).map_err(anyhow::Error::from))
            {
                Ok(client) => checks.extend(
                    selftest::ocis::check(
                        url,
                        &client,
                        args.check_space.as_deref(),
                        args.check_group.as_deref(),
                    )
                    .await,
                ),
                Err(e) => checks.push(Check::fail(
                    "ocis",
                    format!("bad oCIS settings: {e:#}"),
                    "see --help under the oCIS heading",
                )),
            }
        }
        None => checks.push(Check::skipped(
            "ocis",
            match &args.membership.membership {
                Some(file) => format!("membership from {} (no --ocis-url)", file.display()),
                None => "no --ocis-url".to_owned(),
            },
        )),
    }
    match &args.oidc.oidc_issuer {
        Some(issuer) => {
            let o = &args.oidc;
            checks.push(
                selftest::oidc::check(OidcSettings {
                    issuer: issuer.clone(),
                    audience: o.oidc_audience.clone(),
                    user_claim: o.oidc_user_claim.clone(),
                    leeway: o.oidc_leeway,
                    jwks_min_refresh: o.oidc_jwks_min_refresh,
                })
                .await,
            );
        }
        None => checks.push(Check::skipped(
            "oidc",
            "no --oidc-issuer (tokens signed with --jwt-secret)",
        )),
    }
    checks.push(round_trip(args).await);
    checks
}

async fn round_trip(args: &SelfTestArgs) -> Check {
    const SYSTEM: &str = "round-trip";
    let Some(gateway) = &args.gateway_url else {
        return Check::skipped(
            SYSTEM,
            "no --gateway-url: no message sent through a gateway",
        );
    };
    let token = match probe_token(args) {
        Ok(t) => t,
        Err(e) => {
            return Check::fail(
                SYSTEM,
                format!("no token for the probe user: {e:#}"),
                "give --jwt-secret (the gateway's) or --probe-token-file",
            );
        }
    };
    let connected = match selftest::round_trip::open(gateway, &args.probe_user, &token).await {
        Ok(c) => c,
        Err(failed) => return failed,
    };
    let r = &args.redis;
    let target = super::redis_target(r);
    let bus = match RedisBus::connect(&target, super::redis_options(r), None).await {
        Ok(bus) => bus,
        Err(e) => {
            return Check::fail(
                SYSTEM,
                format!("cannot publish: {e}"),
                "see the redis checks above",
            );
        }
    };
    let bus: Arc<dyn Bus> = bus;
    selftest::round_trip::probe(connected, &*bus, &args.probe_user).await
}

fn probe_token(args: &SelfTestArgs) -> anyhow::Result<String> {
    if let Some(path) = &args.probe_token_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        return Ok(text.trim().to_owned());
    }
    let Some(secret) = super::configured_secret(&args.secret)? else {
        anyhow::bail!("neither --jwt-secret nor --probe-token-file");
    };
    let auth = Authenticator::hs256(secret.as_bytes())?;
    Ok(auth.mint(&args.probe_user, Duration::from_secs(300))?)
}
