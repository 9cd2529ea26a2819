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
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use moka::sync::Cache;
use rand::RngCore;
use serde::{Deserialize, Serialize};

pub use oidc::{OidcError, OidcSettings, OidcVerifier};

/// The longest a token is treated as valid from now: longer-lived tokens act as if they expired
/// in ten years, which no connection lasts.
pub const MAX_REMAINING: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// An authenticated user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: Arc<str>,
    /// Token expiry, seconds since the Unix epoch.
    pub expires_at: Option<u64>,
}

impl Identity {
    /// Time left before the token expires (zero if already expired), at most
    /// [`MAX_REMAINING`]: connections add it to the clock, and an `exp` of 2^64-1 would
    /// overflow an `Instant`.
    pub fn remaining(&self) -> Option<Duration> {
        let exp = self.expires_at?;
        let now = now_secs();
        Some(Duration::from_secs(exp.saturating_sub(now)).min(MAX_REMAINING))
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
}

/// The shortest HS256 secret accepted: RFC 7518 §3.2 requires a key at least as long as the
/// hash (256 bits). A shorter one can be guessed, and whoever guesses it signs tokens for any user.
pub const MIN_SECRET_BYTES: usize = 32;

/// An HS256 secret refused at start-up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the HS256 secret is {0} bytes; at least {MIN_SECRET_BYTES} are required (RFC 7518 §3.2), \
     for example `openssl rand -hex 32`"
)]
pub struct WeakSecret(pub usize);

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
    /// A verifier (and minter) of HS256 tokens; refuses secrets shorter than
    /// [`MIN_SECRET_BYTES`].
    pub fn hs256(secret: &[u8]) -> Result<Self, WeakSecret> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(WeakSecret(secret.len()));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        // `nbf` is optional, but when a token carries one it must be honoured.
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(Authenticator {
            verifier: Verifier::Shared {
                decoding: DecodingKey::from_secret(secret),
                encoding: EncodingKey::from_secret(secret),
                validation,
            },
        })
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
            exp: now_secs().saturating_add(ttl.as_secs()),
            nbf: None,
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
        ErrorKind::ImmatureSignature => AuthError::Invalid("token not yet valid (nbf)".into()),
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
    /// Each ticket with the moment it was issued: moka's `remove` still returns entries whose
    /// time to live has passed but that were not evicted yet, so redeeming checks the age itself.
    tickets: Cache<String, (Identity, Instant)>,
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
        self.tickets
            .insert(ticket.clone(), (identity, Instant::now()));
        ticket
    }

    /// Takes the ticket: a second redemption fails, and so does one after the ticket's lifetime.
    pub fn redeem(&self, ticket: &str) -> Result<Identity, AuthError> {
        let (identity, issued) = self.tickets.remove(ticket).ok_or(AuthError::BadTicket)?;
        if issued.elapsed() >= self.ttl {
            return Err(AuthError::BadTicket);
        }
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
        let auth = Authenticator::hs256(SECRET).unwrap();
        let token = auth.mint("alice", Duration::from_secs(60)).unwrap();
        assert_eq!(&*auth.verify(&token).await.unwrap().user, "alice");
        let other = Authenticator::hs256(b"another-secret-of-thirty-two-byte").unwrap();
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
                nbf: None,
            },
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert_eq!(auth.verify(&expired).await, Err(AuthError::Expired));
    }

    const SECRET: &[u8] = b"a-secret-of-at-least-thirty-two-bytes";

    #[test]
    fn short_secrets_are_refused() {
        assert_eq!(Authenticator::hs256(b"").err(), Some(WeakSecret(0)));
        assert_eq!(Authenticator::hs256(b"a").err(), Some(WeakSecret(1)));
        assert_eq!(
            Authenticator::hs256(&[b'x'; 31]).err(),
            Some(WeakSecret(31))
        );
        assert!(Authenticator::hs256(&[b'x'; 32]).is_ok());
    }

    #[tokio::test]
    async fn not_before_is_checked() {
        let auth = Authenticator::hs256(SECRET).unwrap();
        let sign = |nbf| {
            let claims = Claims {
                sub: "alice".into(),
                exp: now_secs() + 600,
                nbf: Some(nbf),
            };
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(SECRET),
            )
            .unwrap()
        };
        let early = auth.verify(&sign(now_secs() + 300)).await;
        assert_eq!(
            early,
            Err(AuthError::Invalid("token not yet valid (nbf)".into()))
        );
        assert!(auth.verify(&sign(now_secs() - 1)).await.is_ok());
    }

    #[test]
    fn far_future_expiry_is_capped() {
        let id = Identity {
            user: Arc::from("bob"),
            expires_at: Some(u64::MAX),
        };
        assert_eq!(id.remaining(), Some(MAX_REMAINING));
        // Adding it to the clock must not overflow.
        let _ = tokio::time::Instant::now() + MAX_REMAINING;
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
    fn tickets_expire_even_before_eviction() {
        let store = TicketStore::new(Duration::from_millis(50), 100);
        let t = store.issue(Identity {
            user: Arc::from("bob"),
            expires_at: None,
        });
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(store.redeem(&t), Err(AuthError::BadTicket));
    }

    #[test]
    fn parses_bearer() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
    }
}
