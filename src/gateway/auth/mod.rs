//! Who is connecting: JWT verification and single-use connection tickets.
//!
//! Browsers cannot set an `Authorization` header on a WebSocket or an `EventSource`, so besides
//! the bearer header a client may authenticate with a first `auth` frame, or trade its bearer
//! token for a short-lived single-use ticket (`POST /api/tickets`) and pass it as `?ticket=`,
//! keeping the long-lived token out of URLs and access logs.
//!
//! Tokens are either HS256 with a shared secret (`--jwt-secret`: the embedded default and tests)
//! or signed by an OIDC issuer (`--oidc-issuer`: production, see [`oidc`]).

pub mod oidc;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use moka::sync::Cache;
use rand::RngCore;
use serde::{Deserialize, Serialize};

pub use oidc::{OidcError, OidcSettings, OidcVerifier};

/// An authenticated user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: Arc<str>,
    /// Token expiry, seconds since the Unix epoch.
    pub expires_at: Option<u64>,
}

impl Identity {
    /// Time left before the token expires (zero if already expired).
    pub fn remaining(&self) -> Option<Duration> {
        let exp = self.expires_at?;
        let now = now_secs();
        Some(Duration::from_secs(exp.saturating_sub(now)))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("missing credentials")]
    Missing,
    #[error("unknown or used ticket")]
    BadTicket,
}

impl AuthError {
    /// The `code` of the error frame sent for this failure.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Expired => "token-expired",
            AuthError::Invalid(_) => "invalid-token",
            AuthError::Missing => "unauthenticated",
            AuthError::BadTicket => "invalid-ticket",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

/// Verifies the tokens clients present: HS256 with a shared secret (the embedded default and
/// tests), or the OIDC issuer's signed tokens ([`oidc`]).
pub struct Authenticator {
    verifier: Verifier,
}

enum Verifier {
    Shared {
        decoding: DecodingKey,
        encoding: EncodingKey,
        validation: Validation,
    },
    Oidc(OidcVerifier),
}

impl Authenticator {
    pub fn hs256(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Authenticator {
            verifier: Verifier::Shared {
                decoding: DecodingKey::from_secret(secret),
                encoding: EncodingKey::from_secret(secret),
                validation,
            },
        }
    }

    pub fn oidc(verifier: OidcVerifier) -> Self {
        Authenticator {
            verifier: Verifier::Oidc(verifier),
        }
    }

    /// Whether this authenticator can sign tokens itself (shared secret only).
    pub fn can_mint(&self) -> bool {
        matches!(self.verifier, Verifier::Shared { .. })
    }

    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        match &self.verifier {
            Verifier::Shared {
                decoding,
                validation,
                ..
            } => verify_shared(token, decoding, validation),
            // Boxed: the JWKS refetch inside makes this future large, and every connection's
            // task would otherwise reserve room for it (0.7 KB per idle connection).
            Verifier::Oidc(oidc) => Box::pin(oidc.verify(token)).await,
        }
    }

    /// Signs a token for `user` valid for `ttl` (demo mode, tests, benchmarks).
    pub fn mint(&self, user: &str, ttl: Duration) -> Result<String, AuthError> {
        let Verifier::Shared { encoding, .. } = &self.verifier else {
            return Err(AuthError::Invalid(
                "tokens come from the OIDC issuer; foldercast does not sign any".into(),
            ));
        };
        let claims = Claims {
            sub: user.to_owned(),
            exp: now_secs() + ttl.as_secs(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, encoding)
            .map_err(|e| AuthError::Invalid(e.to_string()))
    }
}

fn verify_shared(
    token: &str,
    decoding: &DecodingKey,
    validation: &Validation,
) -> Result<Identity, AuthError> {
    let data = jsonwebtoken::decode::<Claims>(token, decoding, validation).map_err(|e| match e
        .kind()
    {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        other => AuthError::Invalid(format!("{other:?}")),
    })?;
    if data.claims.sub.is_empty() {
        return Err(AuthError::Invalid("empty sub claim".into()));
    }
    Ok(Identity {
        user: Arc::from(data.claims.sub),
        expires_at: Some(data.claims.exp),
    })
}

/// Single-use connection tickets, each valid for a short time.
pub struct TicketStore {
    tickets: Cache<String, Identity>,
    ttl: Duration,
}

impl TicketStore {
    pub fn new(ttl: Duration, capacity: u64) -> Self {
        TicketStore {
            tickets: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
            ttl,
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn issue(&self, identity: Identity) -> String {
        let mut bytes = [0u8; 24];
        rand::rng().fill_bytes(&mut bytes);
        let ticket: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        self.tickets.insert(ticket.clone(), identity);
        ticket
    }

    /// Takes the ticket: a second redemption fails.
    pub fn redeem(&self, ticket: &str) -> Result<Identity, AuthError> {
        let identity = self.tickets.remove(ticket).ok_or(AuthError::BadTicket)?;
        if identity.remaining() == Some(Duration::ZERO) {
            return Err(AuthError::Expired);
        }
        Ok(identity)
    }
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The token of an `Authorization: Bearer …` header value.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn verifies_and_refuses() {
        let auth = Authenticator::hs256(b"secret");
        let token = auth.mint("alice", Duration::from_secs(60)).unwrap();
        assert_eq!(&*auth.verify(&token).await.unwrap().user, "alice");
        let other = Authenticator::hs256(b"other");
        assert!(matches!(
            other.verify(&token).await,
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            auth.verify("garbage").await,
            Err(AuthError::Invalid(_))
        ));
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims {
                sub: "alice".into(),
                exp: now_secs() - 5,
            },
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert_eq!(auth.verify(&expired).await, Err(AuthError::Expired));
    }

    #[test]
    fn tickets_are_single_use() {
        let store = TicketStore::new(Duration::from_secs(30), 100);
        let id = Identity {
            user: Arc::from("bob"),
            expires_at: None,
        };
        let t = store.issue(id.clone());
        assert_eq!(store.redeem(&t), Ok(id));
        assert_eq!(store.redeem(&t), Err(AuthError::BadTicket));
        assert_eq!(store.redeem("nope"), Err(AuthError::BadTicket));
    }

    #[test]
    fn parses_bearer() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
    }
}
