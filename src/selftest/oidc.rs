//! OIDC: the issuer's discovery document and its signing keys (JWKS), as the gateway fetches
//! them at start.

use crate::gateway::auth::oidc::{OidcSettings, OidcVerifier};

use super::Check;

const SYSTEM: &str = "oidc";

pub async fn check(settings: OidcSettings) -> Check {
    let issuer = settings.issuer.clone();
    match tokio::time::timeout(super::STEP_TIMEOUT * 3, OidcVerifier::discover(settings)).await {
        Ok(Ok(verifier)) => Check::pass(
            SYSTEM,
            format!(
                "issuer {issuer}: discovery and JWKS read, {} key(s)",
                verifier.key_count()
            ),
        ),
        Ok(Err(e)) => Check::fail(
            SYSTEM,
            format!("issuer {issuer}: {e}"),
            "check --oidc-issuer: exactly the `iss` of the tokens, serving /.well-known/openid-configuration with a jwks_uri that lists signing keys",
        ),
        Err(_) => Check::fail(
            SYSTEM,
            format!(
                "issuer {issuer}: no answer within {} s",
                (super::STEP_TIMEOUT * 3).as_secs()
            ),
            "check --oidc-issuer and that this host reaches it",
        ),
    }
}
