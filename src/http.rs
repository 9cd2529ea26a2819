//! HTTP plumbing shared by the parts that talk to oCIS and to an OIDC issuer: one client
//! identity, error messages that name their cause, and the discovery document both sides read.

use serde::Deserialize;

/// A client builder that identifies foldercast.
pub fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder().user_agent(concat!("foldercast/", env!("CARGO_PKG_VERSION")))
}

/// An error with its chain of causes (`reqwest` puts "connection refused" three levels down).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// GET `url` and decode its JSON; any failure as one readable line.
pub async fn get_json<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
) -> Result<T, String> {
    http.get(url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| error_chain(&e))?
        .json()
        .await
        .map_err(|e| error_chain(&e))
}

/// The parts of an OIDC discovery document foldercast reads.
#[derive(Debug, Deserialize)]
pub struct OidcDiscovery {
    pub issuer: String,
    #[serde(default)]
    pub jwks_uri: Option<String>,
    #[serde(default)]
    pub token_endpoint: Option<String>,
    #[serde(default)]
    pub token_endpoint_auth_methods_supported: Vec<String>,
}

/// `GET <issuer>/.well-known/openid-configuration`; the error names the URL.
pub async fn discover(http: &reqwest::Client, issuer: &str) -> Result<OidcDiscovery, String> {
    let url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    get_json(http, &url)
        .await
        .map_err(|reason| format!("OIDC discovery at {url} failed: {reason}"))
}
