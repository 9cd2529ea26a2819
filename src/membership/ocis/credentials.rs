//! How foldercast authenticates to oCIS, and how secrets stay secret.
//!
//! Three ways, in the order production prefers them: an OIDC client-credentials token (fetched
//! from the issuer's token endpoint and renewed before it expires), a fixed bearer token, or HTTP
//! basic auth with a user and password or app token (development setups). Secrets come from the
//! environment or a file, never from a flag (flags show in process listings), and [`Secret`]
//! never prints its value. A file is read again when oCIS answers 401, so rotating it works
//! without a restart.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::header::HeaderValue;
use serde::Deserialize;

use super::error::GraphError;

/// A secret string: `Debug` and `Display` show `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Where a secret comes from.
#[derive(Debug, Clone)]
pub enum SecretSource {
    /// Read once from an environment variable.
    Value(Secret),
    /// Read from a file (trailing newline stripped) at start and again after a 401.
    File(PathBuf),
}

impl SecretSource {
    pub fn load(&self) -> Result<Secret, String> {
        match self {
            SecretSource::Value(s) => Ok(s.clone()),
            SecretSource::File(path) => std::fs::read_to_string(path)
                .map(|s| Secret::new(s.trim_end_matches(['\r', '\n'])))
                .map_err(|e| format!("cannot read secret file {}: {e}", path.display())),
        }
    }
}

/// OIDC client-credentials settings.
#[derive(Debug, Clone)]
pub struct ClientCredentialsConfig {
    /// The issuer whose discovery document names the token endpoint.
    pub issuer: String,
    pub client_id: String,
    pub client_secret: SecretSource,
    pub scope: Option<String>,
}

#[derive(Debug, Clone)]
pub enum CredentialsConfig {
    None,
    Bearer(SecretSource),
    /// `user:secret`.
    Basic(SecretSource),
    ClientCredentials(ClientCredentialsConfig),
}

/// Live credentials: the current `Authorization` value, renewed when needed.
pub struct Credentials {
    config: CredentialsConfig,
    http: reqwest::Client,
    current: Mutex<Option<Current>>,
    /// One renewal at a time: concurrent requests wait for it instead of each asking the IdP.
    renewing: tokio::sync::Mutex<()>,
}

struct Current {
    header: HeaderValue,
    /// When to fetch a new one (client credentials only).
    renew_at: Option<Instant>,
}

impl Credentials {
    pub fn new(config: CredentialsConfig, http: reqwest::Client) -> Self {
        Credentials {
            config,
            http,
            current: Mutex::new(None),
            renewing: tokio::sync::Mutex::new(()),
        }
    }

    fn cached(&self) -> Option<HeaderValue> {
        let current = self.current.lock().ok()?;
        let c = current.as_ref()?;
        c.renew_at
            .is_none_or(|at| Instant::now() < at)
            .then(|| c.header.clone())
    }

    /// Forgets the current value: the next request loads or fetches a new one.
    pub fn refresh(&self) {
        if let Ok(mut current) = self.current.lock() {
            *current = None;
        }
    }

    /// The `Authorization` header to send, or `None` when no credentials are configured.
    pub async fn authorization(&self) -> Result<Option<HeaderValue>, GraphError> {
        if let Some(header) = self.cached() {
            return Ok(Some(header));
        }
        let _renewing = self.renewing.lock().await;
        if let Some(header) = self.cached() {
            return Ok(Some(header)); // renewed by whoever held the lock before us
        }
        let (value, renew_at) = match &self.config {
            CredentialsConfig::None => return Ok(None),
            CredentialsConfig::Bearer(source) => {
                let token = source.load().map_err(GraphError::Unauthorized)?;
                (format!("Bearer {}", token.expose()), None)
            }
            CredentialsConfig::Basic(source) => {
                let pair = source.load().map_err(GraphError::Unauthorized)?;
                if !pair.expose().contains(':') {
                    return Err(GraphError::Unauthorized(
                        "basic credentials must be user:secret".into(),
                    ));
                }
                (format!("Basic {}", base64(pair.expose().as_bytes())), None)
            }
            CredentialsConfig::ClientCredentials(config) => {
                let (token, lifetime) = self.client_credentials(config).await?;
                // Renew when 80 % of the lifetime has passed, and at least 10 s before expiry.
                let renew_in = lifetime
                    .mul_f64(0.8)
                    .min(lifetime.saturating_sub(Duration::from_secs(10)));
                (
                    format!("Bearer {}", token.expose()),
                    Some(Instant::now() + renew_in),
                )
            }
        };
        let mut header = HeaderValue::from_str(&value).map_err(|_| {
            GraphError::Unauthorized(
                "credentials contain characters not allowed in a header".into(),
            )
        })?;
        header.set_sensitive(true);
        if let Ok(mut current) = self.current.lock() {
            *current = Some(Current {
                header: header.clone(),
                renew_at,
            });
        }
        Ok(Some(header))
    }

    async fn client_credentials(
        &self,
        config: &ClientCredentialsConfig,
    ) -> Result<(Secret, Duration), GraphError> {
        let unavailable = |what: &str, e: &dyn std::fmt::Display| {
            GraphError::Unavailable(format!("OIDC client credentials: {what}: {e}"))
        };
        let discovery = crate::http::discover(&self.http, &config.issuer)
            .await
            .map_err(GraphError::Unavailable)?;
        let endpoint = discovery.token_endpoint.as_deref().ok_or_else(|| {
            unavailable(
                &config.issuer,
                &"the discovery document names no token_endpoint",
            )
        })?;
        let secret = config
            .client_secret
            .load()
            .map_err(GraphError::Unauthorized)?;
        // client_secret_basic is the default (RFC 8414); a server announcing only
        // client_secret_post gets that. A refusal with one method is retried once with the other,
        // never both in one request (servers may refuse two methods at once).
        let methods = &discovery.token_endpoint_auth_methods_supported;
        let has = |m: &str| methods.iter().any(|x| x == m);
        let post_first = has("client_secret_post") && !has("client_secret_basic");
        let mut response = None;
        for use_post in [post_first, !post_first] {
            let mut form = vec![("grant_type", "client_credentials")];
            if let Some(scope) = &config.scope {
                form.push(("scope", scope.as_str()));
            }
            let mut request = self.http.post(endpoint);
            if use_post {
                form.push(("client_id", config.client_id.as_str()));
                form.push(("client_secret", secret.expose()));
            } else {
                request = request.basic_auth(&config.client_id, Some(secret.expose()));
            }
            let answer = request
                .form(&form)
                .send()
                .await
                .map_err(|e| unavailable(endpoint, &e))?;
            let refused = matches!(answer.status().as_u16(), 400 | 401);
            response = Some(answer);
            if !refused {
                break;
            }
        }
        let Some(response) = response else {
            return Err(unavailable(endpoint, &"no answer"));
        };
        let status = response.status();
        if status.is_client_error() {
            return Err(GraphError::Unauthorized(format!(
                "token endpoint {endpoint} answered {status} for client {}",
                config.client_id
            )));
        }
        if !status.is_success() {
            return Err(unavailable(endpoint, &status));
        }
        #[derive(Deserialize)]
        struct TokenResponse {
            access_token: String,
            expires_in: Option<u64>,
        }
        let token: TokenResponse = response
            .json()
            .await
            .map_err(|e| unavailable(endpoint, &e))?;
        tracing::info!(client_id = %config.client_id, expires_in = ?token.expires_in, "obtained an oCIS access token");
        Ok((
            Secret::new(token.access_token),
            Duration::from_secs(token.expires_in.unwrap_or(300)),
        ))
    }
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
        let source = SecretSource::Value(s);
        assert!(!format!("{source:?}").contains("hunter2"));
    }

    #[test]
    fn basic_auth_encoding() {
        assert_eq!(
            base64(b"einstein:relativity"),
            "ZWluc3RlaW46cmVsYXRpdml0eQ=="
        );
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"abc"), "YWJj");
    }

    #[test]
    fn secret_files_lose_their_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "abc\n").unwrap();
        assert_eq!(SecretSource::File(path).load().unwrap().expose(), "abc");
    }
}
