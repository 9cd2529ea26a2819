//! Building the membership resolver and the authenticator from flags and environment.
//!
//! Shared by the subcommands; secrets are read here, from the environment or files, and handed
//! on wrapped in [`Secret`] so they never reach a log line.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

use crate::config::{GatewayArgs, MembershipArgs, OidcArgs};
use crate::gateway::auth::{Authenticator, OidcSettings, OidcVerifier};
use crate::membership::ocis::{
    CacheSettings, ClientCredentialsConfig, CredentialsConfig, OcisResolver, OcisSettings,
    RetryPolicy, Secret, SecretSource,
};
use crate::membership::{FixtureResolver, MembershipResolver};

/// The resolver the flags select: `--ocis-url`, `--membership`, or `default_fixture`.
pub fn resolver(
    m: &MembershipArgs,
    default_fixture: Option<&Path>,
) -> anyhow::Result<Arc<dyn MembershipResolver>> {
    if let Some(url) = &m.ocis_url {
        let resolver = Arc::new(OcisResolver::from_settings(ocis_settings(m, url)?)?);
        tracing::info!(%url, ttl = ?m.membership_ttl, max_stale = ?m.membership_max_stale, "membership from oCIS");
        tokio::spawn(log_cache_stats(Arc::downgrade(&resolver)));
        return Ok(resolver);
    }
    let path = m
        .membership
        .as_deref()
        .or(default_fixture)
        .context("give --membership FILE or --ocis-url URL")?;
    Ok(Arc::new(FixtureResolver::load(path)?))
}

/// The oCIS client the NATS source completes events with: `--ocis-url` and its credentials,
/// or `None` without oCIS.
pub fn item_lookups(
    m: &MembershipArgs,
) -> anyhow::Result<Option<Box<dyn crate::source::nats::lookup::Items>>> {
    let Some(url) = &m.ocis_url else {
        return Ok(None);
    };
    let client = crate::membership::ocis::GraphClient::from_settings(ocis_settings(m, url)?)?;
    Ok(Some(Box::new(client)))
}

/// Logs the cache's counters once a minute while they change, and while the resolver lives.
async fn log_cache_stats(resolver: std::sync::Weak<OcisResolver>) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
    tick.tick().await;
    let mut last = [0u64; 5];
    loop {
        tick.tick().await;
        let Some(resolver) = resolver.upgrade() else {
            return;
        };
        let s = resolver.stats();
        let now = [
            s.fresh_hits.load(Relaxed),
            s.stale_served.load(Relaxed),
            s.space_fetches.load(Relaxed),
            s.group_fetches.load(Relaxed),
            s.fetch_failures.load(Relaxed),
        ];
        if now != last {
            tracing::info!(
                fresh_hits = now[0],
                stale_served = now[1],
                space_fetches = now[2],
                group_fetches = now[3],
                fetch_failures = now[4],
                "membership cache"
            );
            last = now;
        }
    }
}

pub(super) fn ocis_settings(m: &MembershipArgs, url: &str) -> anyhow::Result<OcisSettings> {
    Ok(OcisSettings {
        url: url.to_owned(),
        credentials: ocis_credentials(m, url)?,
        retry: RetryPolicy {
            timeout: m.ocis_timeout,
            ..RetryPolicy::default()
        },
        cache: CacheSettings {
            ttl: m.membership_ttl,
            max_stale: m.membership_max_stale,
            capacity: m.membership_cache_capacity,
            ..CacheSettings::default()
        },
    })
}

/// One of: client credentials, bearer token, basic auth; from a file flag or the environment.
fn ocis_credentials(m: &MembershipArgs, url: &str) -> anyhow::Result<CredentialsConfig> {
    let token = secret_source(m.ocis_token_file.as_deref(), "FOLDERCAST_OCIS_TOKEN");
    let basic = secret_source(m.ocis_basic_file.as_deref(), "FOLDERCAST_OCIS_BASIC");
    let client_secret = secret_source(
        m.ocis_client_secret_file.as_deref(),
        "FOLDERCAST_OCIS_CLIENT_SECRET",
    );
    let client = match &m.ocis_client_id {
        Some(client_id) => {
            let client_secret = client_secret.context(
                "--ocis-client-id needs FOLDERCAST_OCIS_CLIENT_SECRET or --ocis-client-secret-file",
            )?;
            Some(CredentialsConfig::ClientCredentials(
                ClientCredentialsConfig {
                    issuer: m
                        .ocis_token_issuer
                        .clone()
                        .unwrap_or_else(|| url.to_owned()),
                    client_id: client_id.clone(),
                    client_secret,
                    scope: m.ocis_scope.clone(),
                },
            ))
        }
        None => None,
    };
    let configured: Vec<CredentialsConfig> = [
        client,
        token.map(CredentialsConfig::Bearer),
        basic.map(CredentialsConfig::Basic),
    ]
    .into_iter()
    .flatten()
    .collect();
    match configured.len() {
        0 => {
            tracing::warn!("no credentials for oCIS configured; its API will likely answer 401");
            Ok(CredentialsConfig::None)
        }
        1 => Ok(configured
            .into_iter()
            .next()
            .unwrap_or(CredentialsConfig::None)),
        _ => anyhow::bail!(
            "choose one way to sign in to oCIS: an OIDC client (--ocis-client-id), a bearer token \
             (FOLDERCAST_OCIS_TOKEN / --ocis-token-file) or basic auth (FOLDERCAST_OCIS_BASIC / \
             --ocis-basic-file)"
        ),
    }
}

fn secret_source(file: Option<&Path>, env: &str) -> Option<SecretSource> {
    if let Some(path) = file {
        return Some(SecretSource::File(path.to_owned()));
    }
    std::env::var(env)
        .ok()
        .filter(|v| !v.is_empty())
        .map(|v| SecretSource::Value(Secret::new(v)))
}

/// OIDC when `--oidc-issuer` is given (discovered now, so a wrong issuer fails at start);
/// otherwise HS256 with the shared secret.
pub async fn authenticator(g: &GatewayArgs, o: &OidcArgs) -> anyhow::Result<Arc<Authenticator>> {
    let Some(issuer) = &o.oidc_issuer else {
        return Ok(Arc::new(Authenticator::hs256(&super::jwt_secret(g)?)?));
    };
    anyhow::ensure!(
        !g.secret.is_configured(),
        "--oidc-issuer replaces --jwt-secret; give one of them"
    );
    let verifier = OidcVerifier::discover(OidcSettings {
        issuer: issuer.clone(),
        audience: o.oidc_audience.clone(),
        user_claim: o.oidc_user_claim.clone(),
        leeway: o.oidc_leeway,
        jwks_min_refresh: o.oidc_jwks_min_refresh,
    })
    .await?;
    if o.oidc_audience.is_none() {
        tracing::warn!(
            "no --oidc-audience: tokens issued to any client of the issuer are accepted"
        );
    }
    Ok(Arc::new(Authenticator::oidc(verifier)))
}
