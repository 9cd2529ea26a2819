//! Verifying tokens signed by an OIDC issuer (oCIS's IdP, Keycloak, …).
//!
//! At start the issuer's discovery document names its JWKS; the keys are fetched and kept by
//! `kid`. A token signed with a key we do not know triggers a JWKS refetch, which is how key
//! rotation is picked up. Refetches share a bucket of 5 that refills one per
//! `jwks_min_refresh / 5`, so a stream of forged `kid`s cannot make us hammer the issuer, while a
//! real rotation (even one a client races, presenting the new `kid` before it is published) is
//! picked up at once.
//!
//! Only asymmetric algorithms are accepted (RS*, PS*, ES256/384, EdDSA). `alg: none` and HS*
//! are refused before any key is looked at: an HS256 token "signed" with the issuer's *public*
//! key is the classic algorithm-confusion forgery. `iss`, `exp`, `nbf` and (when configured)
//! `aud` are checked with a small leeway; the user id comes from a configurable claim.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;
use serde_json::Value;

use super::{AuthError, Identity};

#[derive(Debug, Clone)]
pub struct OidcSettings {
    /// The issuer URL, exactly as tokens carry it in `iss`.
    pub issuer: String,
    /// Required `aud` (one of the token's audiences); `None` skips the audience check.
    pub audience: Option<String>,
    /// The claim holding the user id (`sub`, `preferred_username`, …).
    pub user_claim: String,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway: Duration,
    /// Least time between two JWKS fetches triggered by unknown key ids.
    pub jwks_min_refresh: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("{0}")]
    Discovery(String),
    #[error(
        "OIDC issuer mismatch: configured {configured:?}, discovery document says {announced:?}"
    )]
    IssuerMismatch {
        configured: String,
        announced: String,
    },
    #[error("fetching the JWKS at {url} failed: {reason}")]
    Jwks { url: String, reason: String },
}

struct Key {
    decoding: DecodingKey,
    /// The algorithm the JWK pins, if it names one.
    alg: Option<Algorithm>,
}

/// Verifies OIDC access or ID tokens against the issuer's published keys.
pub struct OidcVerifier {
    settings: OidcSettings,
    http: reqwest::Client,
    jwks_uri: String,
    keys: RwLock<Arc<HashMap<String, Arc<Key>>>>,
    /// The issuer as the discovery document spells it (may differ by a trailing slash).
    announced_issuer: String,
    /// Serialises refetches.
    fetching: tokio::sync::Mutex<()>,
    /// Bounds refetches across all `kid`s; `None` when `jwks_min_refresh` is zero.
    refetch_budget: Option<governor::DefaultDirectRateLimiter>,
}

impl OidcVerifier {
    /// Discovers the issuer and fetches its keys; fails with a clear error if either is wrong.
    pub async fn discover(settings: OidcSettings) -> Result<Self, OidcError> {
        let http = crate::http::client_builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| OidcError::Discovery(e.to_string()))?;
        let discovery = crate::http::discover(&http, &settings.issuer)
            .await
            .map_err(OidcError::Discovery)?;
        let jwks_uri = discovery.jwks_uri.ok_or_else(|| {
            OidcError::Discovery(format!("{} announces no jwks_uri", settings.issuer))
        })?;
        if discovery.issuer.trim_end_matches('/') != settings.issuer.trim_end_matches('/') {
            return Err(OidcError::IssuerMismatch {
                configured: settings.issuer,
                announced: discovery.issuer,
            });
        }
        let keys = fetch_keys(&http, &jwks_uri).await?;
        tracing::info!(issuer = %settings.issuer, keys = keys.len(), "OIDC issuer discovered");
        let min = settings.jwks_min_refresh;
        let refetch_budget = governor::Quota::with_period(min / 5).map(|quota| {
            governor::RateLimiter::direct(
                quota
                    .allow_burst(std::num::NonZeroU32::new(5).unwrap_or(std::num::NonZeroU32::MIN)),
            )
        });
        Ok(OidcVerifier {
            jwks_uri,
            announced_issuer: discovery.issuer,
            keys: RwLock::new(Arc::new(keys)),
            fetching: tokio::sync::Mutex::new(()),
            refetch_budget,
            settings,
            http,
        })
    }

    /// Signing keys known now (`self-test` reports it).
    pub fn key_count(&self) -> usize {
        self.keys.read().map(|k| k.len()).unwrap_or(0)
    }

    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let header = TokenHeader::parse(token)?;
        let alg = accepted_algorithm(&header.alg)?;
        let key = match self.key(header.kid.as_deref(), alg) {
            Some(key) => key,
            None => {
                self.refetch(header.kid.as_deref(), alg).await;
                self.key(header.kid.as_deref(), alg).ok_or_else(|| {
                    AuthError::Invalid(match &header.kid {
                        Some(kid) => format!("unknown signing key {kid:?}"),
                        None => "no key of the issuer fits the token".into(),
                    })
                })?
            }
        };
        if key.alg.is_some_and(|pinned| pinned != alg) {
            return Err(AuthError::Invalid(format!(
                "the key does not sign with {}",
                header.alg
            )));
        }
        let mut validation = Validation::new(alg);
        validation.leeway = self.settings.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_issuer(&[
            self.settings.issuer.as_str(),
            self.announced_issuer.as_str(),
        ]);
        let mut required = vec!["exp", "iss"];
        match &self.settings.audience {
            Some(aud) => {
                validation.set_audience(&[aud.as_str()]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let data = jsonwebtoken::decode::<serde_json::Map<String, Value>>(
            token,
            &key.decoding,
            &validation,
        )
        .map_err(|e| refusal(e.kind()))?;
        let claims = data.claims;
        let user = match claims.get(&self.settings.user_claim) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => {
                return Err(AuthError::Invalid(format!(
                    "token has no {:?} claim",
                    self.settings.user_claim
                )));
            }
        };
        Ok(Identity {
            user: Arc::from(user),
            expires_at: claims.get("exp").and_then(Value::as_u64),
        })
    }

    fn key(&self, kid: Option<&str>, alg: Algorithm) -> Option<Arc<Key>> {
        let keys = self.keys.read().ok()?.clone();
        match kid {
            Some(kid) => keys.get(kid).cloned(),
            // No kid: acceptable only when exactly one key could have signed it.
            None => {
                let mut fitting = keys
                    .values()
                    .filter(|k| k.alg.is_none_or(|a| a == alg))
                    .filter(|k| same_family(&k.decoding, alg));
                let first = fitting.next()?;
                fitting.next().is_none().then(|| first.clone())
            }
        }
    }

    /// Fetches the JWKS again for an unknown `kid`, within the refetch bounds.
    async fn refetch(&self, kid: Option<&str>, alg: Algorithm) {
        let _one_at_a_time = self.fetching.lock().await;
        if self.key(kid, alg).is_some() {
            return; // fetched by whoever held the lock before us
        }
        if let Some(budget) = &self.refetch_budget
            && budget.check().is_err()
        {
            tracing::debug!("JWKS refetch skipped: refetch budget spent");
            return;
        }
        match fetch_keys(&self.http, &self.jwks_uri).await {
            Ok(keys) => {
                tracing::info!(keys = keys.len(), "JWKS refreshed");
                if let Ok(mut current) = self.keys.write() {
                    *current = Arc::new(keys);
                }
            }
            Err(e) => tracing::warn!(error = %e, "JWKS refresh failed; keeping the known keys"),
        }
    }
}

/// The parts of a JOSE header looked at before any key is chosen.
struct TokenHeader {
    alg: String,
    kid: Option<String>,
}

impl TokenHeader {
    fn parse(token: &str) -> Result<Self, AuthError> {
        let malformed = |why: &str| AuthError::Invalid(format!("malformed token: {why}"));
        let encoded = token.split('.').next().unwrap_or_default();
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(encoded.trim_end_matches('='))
            .map_err(|_| malformed("header is not base64url"))?;
        #[derive(Deserialize)]
        struct Raw {
            alg: Option<String>,
            kid: Option<String>,
        }
        let raw: Raw =
            serde_json::from_slice(&bytes).map_err(|_| malformed("header is not JSON"))?;
        Ok(TokenHeader {
            alg: raw.alg.ok_or_else(|| malformed("no alg"))?,
            kid: raw.kid,
        })
    }
}

fn accepted_algorithm(alg: &str) -> Result<Algorithm, AuthError> {
    let refused = |why: String| Err(AuthError::Invalid(why));
    match alg {
        "RS256" => Ok(Algorithm::RS256),
        "RS384" => Ok(Algorithm::RS384),
        "RS512" => Ok(Algorithm::RS512),
        "PS256" => Ok(Algorithm::PS256),
        "PS384" => Ok(Algorithm::PS384),
        "PS512" => Ok(Algorithm::PS512),
        "ES256" => Ok(Algorithm::ES256),
        "ES384" => Ok(Algorithm::ES384),
        "EdDSA" => Ok(Algorithm::EdDSA),
        a if a.eq_ignore_ascii_case("none") => refused("alg none is refused".into()),
        a if a.to_ascii_uppercase().starts_with("HS") => refused(format!(
            "alg {a} is refused: tokens must be signed with the issuer's keys"
        )),
        other => refused(format!("alg {other} is not accepted")),
    }
}

fn refusal(kind: &ErrorKind) -> AuthError {
    AuthError::Invalid(match kind {
        ErrorKind::ExpiredSignature => return AuthError::Expired,
        ErrorKind::ImmatureSignature => "token not yet valid (nbf)".into(),
        ErrorKind::InvalidIssuer => "wrong issuer".into(),
        ErrorKind::InvalidAudience => "wrong audience".into(),
        ErrorKind::InvalidSignature => "bad signature".into(),
        ErrorKind::InvalidAlgorithm => "algorithm does not match the key".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("missing {claim} claim"),
        other => format!("{other:?}"),
    })
}

fn same_family(key: &DecodingKey, alg: Algorithm) -> bool {
    use jsonwebtoken::AlgorithmFamily as F;
    let family = match alg {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => F::Rsa,
        Algorithm::ES256 | Algorithm::ES384 => F::Ec,
        Algorithm::EdDSA => F::Ed,
        _ => F::Hmac,
    };
    key.family() == family
}

/// The signing keys of a JWKS by `kid`. Keys that cannot be used (encryption keys, symmetric
/// keys, unknown types) are skipped one by one rather than failing the whole set.
async fn fetch_keys(
    http: &reqwest::Client,
    url: &str,
) -> Result<HashMap<String, Arc<Key>>, OidcError> {
    #[derive(Deserialize)]
    struct RawSet {
        keys: Vec<Value>,
    }
    let set: RawSet = crate::http::get_json(http, url)
        .await
        .map_err(|reason| OidcError::Jwks {
            url: url.to_owned(),
            reason,
        })?;
    let mut keys = HashMap::new();
    for (i, raw) in set.keys.into_iter().enumerate() {
        let jwk: Jwk = match serde_json::from_value(raw) {
            Ok(jwk) => jwk,
            Err(e) => {
                tracing::debug!(index = i, error = %e, "JWKS entry skipped");
                continue;
            }
        };
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
            continue; // a symmetric key has no business in a public JWKS
        }
        let decoding = match DecodingKey::from_jwk(&jwk) {
            Ok(k) => k,
            Err(e) => {
                tracing::debug!(index = i, error = %e, "JWKS entry unusable");
                continue;
            }
        };
        let alg = jwk
            .common
            .key_algorithm
            .and_then(|a| accepted_algorithm(&a.to_string()).ok());
        let kid = jwk.common.key_id.clone().unwrap_or_else(|| format!("#{i}"));
        keys.insert(kid, Arc::new(Key { decoding, alg }));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_with_header(header: &str) -> String {
        let h = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(header);
        format!("{h}.e30.")
    }

    #[test]
    fn refuses_none_and_symmetric_algorithms_up_front() {
        let none = TokenHeader::parse(&token_with_header(r#"{"alg":"none"}"#)).unwrap();
        assert!(
            matches!(accepted_algorithm(&none.alg), Err(AuthError::Invalid(m)) if m.contains("none"))
        );
        let hs = TokenHeader::parse(&token_with_header(r#"{"alg":"HS256","kid":"k"}"#)).unwrap();
        assert!(
            matches!(accepted_algorithm(&hs.alg), Err(AuthError::Invalid(m)) if m.contains("HS256"))
        );
        assert_eq!(accepted_algorithm("ES256").ok(), Some(Algorithm::ES256));
        assert_eq!(accepted_algorithm("EdDSA").ok(), Some(Algorithm::EdDSA));
    }

    #[test]
    fn malformed_headers_are_clear() {
        assert!(
            matches!(TokenHeader::parse("%%%"), Err(AuthError::Invalid(m)) if m.contains("malformed"))
        );
        assert!(TokenHeader::parse(&token_with_header(r#"{"typ":"JWT"}"#)).is_err());
    }
}
