//! Space membership from oCIS: the LibreGraph API behind a cache.
//!
//! - [`graph`]: the HTTP calls and the parsing of what oCIS really answers;
//! - [`roles`]: oCIS role ids and names → foldercast roles;
//! - [`credentials`]: how foldercast signs in to oCIS, and keeping secrets out of logs;
//! - [`cache`]: fresh / stale / wait, single flight, invalidation;
//! - [`items`]: sizes, kinds and paths of items, for the NATS source's lookups.

pub mod cache;
pub mod credentials;
pub mod error;
pub mod graph;
pub mod items;
pub mod roles;

use async_trait::async_trait;

pub use cache::{CacheSettings, CacheStats, CachedResolver, Directory};
pub use credentials::{ClientCredentialsConfig, CredentialsConfig, Secret, SecretSource};
pub use graph::{GraphClient, GraphError, RetryPolicy, SpaceGrants};

/// The resolver `--ocis-url` selects.
pub type OcisResolver = CachedResolver<GraphClient>;

/// Everything needed to reach oCIS.
#[derive(Debug, Clone)]
pub struct OcisSettings {
    /// Base URL of oCIS (the proxy), e.g. `https://cloud.example.com`.
    pub url: String,
    pub credentials: CredentialsConfig,
    pub retry: RetryPolicy,
    pub cache: CacheSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum OcisError {
    #[error("invalid oCIS URL {url:?}: must start with http:// or https://")]
    BadUrl { url: String },
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

impl OcisResolver {
    /// Builds the resolver; nothing is fetched until the first event asks.
    pub fn from_settings(settings: OcisSettings) -> Result<Self, OcisError> {
        let cache = settings.cache.clone();
        Ok(CachedResolver::new(
            GraphClient::from_settings(settings)?,
            cache,
        ))
    }
}

impl GraphClient {
    /// A client of the oCIS at `settings.url`, signing in as `settings.credentials` say.
    pub fn from_settings(settings: OcisSettings) -> Result<Self, OcisError> {
        if !(settings.url.starts_with("http://") || settings.url.starts_with("https://")) {
            return Err(OcisError::BadUrl { url: settings.url });
        }
        let http = crate::http::client_builder()
            .connect_timeout(settings.retry.timeout)
            .build()?;
        let credentials = credentials::Credentials::new(settings.credentials, http.clone());
        Ok(GraphClient::new(
            http,
            &settings.url,
            credentials,
            settings.retry,
        ))
    }
}

#[async_trait]
impl Directory for GraphClient {
    async fn space_grants(&self, space_id: &str) -> Result<SpaceGrants, GraphError> {
        GraphClient::space_grants(self, space_id).await
    }

    async fn group_members(&self, group_id: &str) -> Result<Vec<String>, GraphError> {
        GraphClient::group_members(self, group_id).await
    }

    async fn all_users(&self) -> Result<Vec<String>, GraphError> {
        GraphClient::all_users(self).await
    }
}
