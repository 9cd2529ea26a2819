//! The oCIS LibreGraph API, as the server really answers it.
//!
//! Two questions are asked: who holds a grant on a space's root
//! (`GET /graph/v1beta1/drives/{id}/root/permissions`, falling back to `GET /graph/v1.0/drives/{id}`
//! when that list is empty, to find a personal space's owner), and who is in a group
//! (`GET /graph/v1.0/groups/{id}/members`). The parsing is lenient where the real server differs
//! from its OpenAPI document: an empty list is `{}` (or `null`), group members are a bare array,
//! `grantedToV2` may arrive as a list in examples, and public links sit among the members.
//!
//! Transport failures (5xx, 429, timeouts, refused connections) are retried here with jittered
//! backoff; a 401 makes the credentials refresh once. What is left is a typed [`GraphError`].

use std::time::{Duration, SystemTime};

use rand::Rng;
use reqwest::StatusCode;
use serde::Deserialize;

use super::credentials::Credentials;
pub use super::error::GraphError;
use super::roles;
use crate::event::Member;
use crate::membership::Role;

/// Retries and timeouts of one graph request.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts per request, the first included.
    pub attempts: u32,
    /// Backoff before the second attempt; doubled each time, with ±50 % jitter.
    pub backoff: Duration,
    /// Timeout of each attempt.
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 3,
            backoff: Duration::from_millis(100),
            timeout: Duration::from_secs(10),
        }
    }
}

/// One member of a space and the role it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub member: Member,
    pub role: Role,
}

/// The grants of a space, as far as foldercast needs them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpaceGrants {
    pub grants: Vec<Grant>,
    /// The earliest future `expirationDateTime` among the grants: the answer is stale after it.
    pub expires: Option<SystemTime>,
}

/// A LibreGraph client: base URL, credentials, retries.
pub struct GraphClient {
    http: reqwest::Client,
    pub(super) base: String,
    credentials: Credentials,
    retry: RetryPolicy,
}

impl GraphClient {
    pub fn new(
        http: reqwest::Client,
        base_url: &str,
        credentials: Credentials,
        retry: RetryPolicy,
    ) -> Self {
        GraphClient {
            http,
            base: base_url.trim_end_matches('/').to_owned(),
            credentials,
            retry,
        }
    }

    /// The grants on a space's root, with a personal space's owner as its only member.
    pub async fn space_grants(&self, space_id: &str) -> Result<SpaceGrants, GraphError> {
        let id = path_segment(space_id);
        let url = format!("{}/graph/v1beta1/drives/{id}/root/permissions", self.base);
        let body = self.get(&url).await?;
        let list: Option<PermissionList> = parse(&body, &url)?;
        let now = SystemTime::now();
        let from_permissions = grants_from(list.map(|l| l.value).unwrap_or_default(), now);
        if !from_permissions.grants.is_empty() {
            return Ok(from_permissions);
        }
        // No grants: a personal space (its owner is implicit) or a project space with no members
        // visible here. The v1.0 drive says which, and carries the grants with legacy role names.
        let url = format!("{}/graph/v1.0/drives/{id}", self.base);
        let body = self.get(&url).await?;
        let Some(drive): Option<Drive> = parse(&body, &url)? else {
            return Err(GraphError::NotFound(format!("{url}: null drive")));
        };
        if drive.drive_type.as_deref() == Some("personal") {
            let owner = drive
                .owner
                .and_then(|o| o.user)
                .and_then(|u| u.id)
                .filter(|id| !id.is_empty());
            return Ok(SpaceGrants {
                grants: owner
                    .map(|id| Grant {
                        member: Member::User(id),
                        role: Role::Manager,
                    })
                    .into_iter()
                    .collect(),
                expires: None,
            });
        }
        // A project space's `owner` is a synthetic space owner, never a member.
        let permissions = drive.root.and_then(|r| r.permissions).unwrap_or_default();
        Ok(grants_from(permissions, now))
    }

    /// The user ids in a group, following `@odata.nextLink`.
    pub async fn group_members(&self, group_id: &str) -> Result<Vec<String>, GraphError> {
        let url = format!(
            "{}/graph/v1.0/groups/{}/members",
            self.base,
            path_segment(group_id)
        );
        self.user_ids(url).await
    }

    /// Every user's id (`GET /graph/v1.0/users`, an admin identity), following
    /// `@odata.nextLink`.
    pub async fn all_users(&self) -> Result<Vec<String>, GraphError> {
        self.user_ids(format!("{}/graph/v1.0/users", self.base))
            .await
    }

    /// The drives this identity sees (`GET /graph/v1.0/me/drives`): (id, driveType), first page.
    /// For `self-test`: it proves the credentials and names a space to read.
    pub async fn my_drives(&self) -> Result<Vec<(String, String)>, GraphError> {
        Ok(self
            .first_page("/graph/v1.0/me/drives")
            .await?
            .iter()
            .filter_map(|d| {
                let id = d["id"].as_str()?.to_owned();
                let kind = d["driveType"].as_str().unwrap_or_default().to_owned();
                Some((id, kind))
            })
            .collect())
    }

    /// Group ids (`GET /graph/v1.0/groups`), first page: for `self-test` to name a group.
    pub async fn group_ids(&self) -> Result<Vec<String>, GraphError> {
        Ok(self
            .first_page("/graph/v1.0/groups")
            .await?
            .iter()
            .filter_map(|g| g["id"].as_str().map(str::to_owned))
            .collect())
    }

    /// The `value` entries of a list's first page at `path`.
    async fn first_page(&self, path: &str) -> Result<Vec<serde_json::Value>, GraphError> {
        let url = format!("{}{path}", self.base);
        let body = self.get(&url).await?;
        let list: Option<serde_json::Value> = parse(&body, &url)?;
        Ok(match list.map(|mut l| l["value"].take()) {
            Some(serde_json::Value::Array(entries)) => entries,
            _ => Vec::new(),
        })
    }

    /// The ids of a (paged) list of users: a bare array, or `{"value"}` pages.
    async fn user_ids(&self, first: String) -> Result<Vec<String>, GraphError> {
        let mut url = first;
        let mut users = Vec::new();
        // A bound on pages, so a server that links to itself cannot loop us forever.
        for _ in 0..10_000 {
            let body = self.get(&url).await?;
            let page: Option<MemberPage> = parse(&body, &url)?;
            let next = match page {
                None => None,
                Some(MemberPage::Bare(list)) => {
                    users.extend(list.into_iter().filter_map(|u| u.id));
                    None
                }
                Some(MemberPage::Odata { value, next_link }) => {
                    users.extend(value.unwrap_or_default().into_iter().filter_map(|u| u.id));
                    next_link
                }
            };
            match next {
                Some(next) if !next.is_empty() => url = next,
                _ => break,
            }
        }
        users.retain(|u| !u.is_empty());
        users.sort();
        users.dedup();
        Ok(users)
    }

    /// GET with credentials, retries and error mapping; the body of a 2xx answer.
    pub(super) async fn get(&self, url: &str) -> Result<bytes::Bytes, GraphError> {
        self.call(url, || self.http.get(url)).await
    }

    /// A WebDAV `PROPFIND` with `Depth: 0` asking for `body`'s properties.
    pub(super) async fn propfind(
        &self,
        url: &str,
        body: &'static str,
    ) -> Result<bytes::Bytes, GraphError> {
        let method = reqwest::Method::from_bytes(b"PROPFIND").map_err(|e| GraphError::Refused {
            status: 0,
            detail: e.to_string(),
        })?;
        self.call(url, || {
            self.http
                .request(method.clone(), url)
                .header("Depth", "0")
                .header(reqwest::header::CONTENT_TYPE, "application/xml")
                .body(body)
        })
        .await
    }

    /// Sends what `build` makes with credentials, retries and error mapping; the body of a 2xx
    /// answer.
    async fn call(
        &self,
        url: &str,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<bytes::Bytes, GraphError> {
        let mut refreshed = false;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let mut request = build().timeout(self.retry.timeout);
            if let Some(auth) = self.credentials.authorization().await? {
                request = request.header(reqwest::header::AUTHORIZATION, auth);
            }
            let failure = match request.send().await {
                Ok(response) => {
                    let status = response.status();
                    if status.is_success() {
                        match response.bytes().await {
                            Ok(body) => return Ok(body),
                            Err(e) => format!("reading {url}: {e}"),
                        }
                    } else if status == StatusCode::UNAUTHORIZED && !refreshed {
                        // Tokens expire and files get rotated: refresh once, then believe it.
                        tracing::info!(%url, "oCIS answered 401; refreshing credentials once");
                        self.credentials.refresh();
                        refreshed = true;
                        attempt -= 1;
                        continue;
                    } else {
                        let retryable = status.is_server_error()
                            || status == StatusCode::TOO_MANY_REQUESTS
                            || status == StatusCode::REQUEST_TIMEOUT;
                        let detail = odata_detail(&response.bytes().await.unwrap_or_default());
                        let detail = format!("{url}: {status}{detail}");
                        if !retryable {
                            tracing::warn!(%detail, "oCIS refused a request");
                            return Err(match status {
                                StatusCode::NOT_FOUND => GraphError::NotFound(detail),
                                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                                    GraphError::Unauthorized(detail)
                                }
                                _ => GraphError::Refused {
                                    status: status.as_u16(),
                                    detail,
                                },
                            });
                        }
                        detail
                    }
                }
                Err(e) => format!("{url}: {}", crate::http::error_chain(&e)),
            };
            if attempt >= self.retry.attempts.max(1) {
                return Err(GraphError::Unavailable(failure));
            }
            let delay = jittered(self.retry.backoff * 2u32.saturating_pow(attempt - 1));
            tracing::debug!(%failure, retry_in = ?delay, "oCIS request failed; retrying");
            tokio::time::sleep(delay).await;
        }
    }
}

/// Grants from permission entries: links, expired grants, denials and unknown roles left out.
pub fn grants_from(permissions: Vec<Permission>, now: SystemTime) -> SpaceGrants {
    let mut out = SpaceGrants::default();
    for permission in permissions {
        if permission.link.is_some() {
            continue; // a public link, not a member
        }
        if let Some(expiry) = permission.expiration.as_deref().filter(|s| !s.is_empty()) {
            match chrono::DateTime::parse_from_rfc3339(expiry) {
                Ok(at) => {
                    let at = SystemTime::from(at);
                    if at <= now {
                        continue;
                    }
                    out.expires = Some(out.expires.map_or(at, |e| e.min(at)));
                }
                Err(_) => {
                    tracing::warn!(expiry, "unreadable expirationDateTime; grant ignored");
                    continue;
                }
            }
        }
        let Some(role) = role_of(&permission) else {
            continue;
        };
        for identity in permission.identities() {
            let member = match (&identity.user, &identity.group) {
                (Some(user), _) if user.id.as_deref().is_some_and(|i| !i.is_empty()) => {
                    Member::User(user.id.clone().unwrap_or_default())
                }
                (_, Some(group)) if group.id.as_deref().is_some_and(|i| !i.is_empty()) => {
                    Member::Group(group.id.clone().unwrap_or_default())
                }
                _ => continue,
            };
            out.grants.push(Grant { member, role });
        }
    }
    out
}

/// The role a permission grants: the highest known role, or its actions when no role is known.
fn role_of(permission: &Permission) -> Option<Role> {
    let names = permission.roles.as_deref().unwrap_or_default();
    if names.iter().any(|r| roles::is_denied(r)) {
        return None;
    }
    if let Some(best) = names.iter().filter_map(|r| roles::from_graph_role(r)).max() {
        return Some(best);
    }
    match &permission.actions {
        Some(actions) => Some(roles::from_actions(actions.iter().map(String::as_str))),
        None => {
            if !names.is_empty() {
                tracing::warn!(roles = ?names, "unknown oCIS role; grant ignored");
            }
            None
        }
    }
}

pub(super) fn parse<T: serde::de::DeserializeOwned>(
    body: &[u8],
    url: &str,
) -> Result<T, GraphError> {
    serde_json::from_slice(body)
        .map_err(|e| GraphError::Unavailable(format!("{url}: unreadable answer: {e}")))
}

/// `": code: message"` from an odata error body, or nothing.
fn odata_detail(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Envelope {
        error: Option<OdataError>,
    }
    #[derive(Deserialize)]
    struct OdataError {
        code: Option<String>,
        message: Option<String>,
    }
    match serde_json::from_slice::<Envelope>(body) {
        Ok(Envelope {
            error: Some(OdataError { code, message }),
        }) => format!(
            ": {}: {}",
            code.unwrap_or_default(),
            message.unwrap_or_default()
        ),
        _ => String::new(),
    }
}

fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.5..1.5))
}

/// Percent-encodes what may not appear raw in a path segment. oCIS ids use `$` and `!`, which
/// may, and which the server expects raw.
pub(super) fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        let keep = b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b);
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Debug, Default, Deserialize)]
struct PermissionList {
    #[serde(default, deserialize_with = "null_as_default")]
    value: Vec<Permission>,
}

/// One entry of a permissions list or of a v1.0 drive's `root.permissions`.
#[derive(Debug, Default, Deserialize)]
pub struct Permission {
    #[serde(rename = "grantedToV2", default)]
    granted_to_v2: Option<OneOrMany<IdentitySet>>,
    #[serde(
        rename = "grantedToIdentities",
        default,
        deserialize_with = "null_as_default"
    )]
    granted_to_identities: Vec<IdentitySet>,
    #[serde(default)]
    link: Option<serde_json::Value>,
    #[serde(default)]
    roles: Option<Vec<String>>,
    #[serde(rename = "@libre.graph.permissions.actions", default)]
    actions: Option<Vec<String>>,
    #[serde(rename = "expirationDateTime", default)]
    expiration: Option<String>,
}

impl Permission {
    /// `grantedToV2` when present, else the deprecated `grantedToIdentities` (older v1.0).
    fn identities(&self) -> Vec<&IdentitySet> {
        match &self.granted_to_v2 {
            Some(OneOrMany::One(set)) => vec![set],
            Some(OneOrMany::Many(sets)) if !sets.is_empty() => sets.iter().collect(),
            _ => self.granted_to_identities.iter().collect(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    // First: serde would otherwise read a list as a struct in sequence form.
    Many(Vec<T>),
    One(T),
}

#[derive(Debug, Default, Deserialize)]
struct IdentitySet {
    #[serde(default)]
    user: Option<GraphIdentity>,
    #[serde(default)]
    group: Option<GraphIdentity>,
}

#[derive(Debug, Default, Deserialize)]
struct GraphIdentity {
    #[serde(default)]
    id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Drive {
    #[serde(rename = "driveType", default)]
    drive_type: Option<String>,
    #[serde(default)]
    owner: Option<IdentitySet>,
    #[serde(default)]
    root: Option<DriveRoot>,
}

#[derive(Debug, Deserialize)]
struct DriveRoot {
    #[serde(default)]
    permissions: Option<Vec<Permission>>,
}

/// A page of group members: the bare array the server sends, or the `{"value"}` the spec shows.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum MemberPage {
    Bare(Vec<GraphIdentity>),
    Odata {
        #[serde(default)]
        value: Option<Vec<GraphIdentity>>,
        #[serde(rename = "@odata.nextLink", default)]
        next_link: Option<String>,
    },
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(json: &str) -> SpaceGrants {
        let list: Option<PermissionList> = serde_json::from_str(json).unwrap();
        grants_from(list.map(|l| l.value).unwrap_or_default(), SystemTime::now())
    }

    fn users(g: &SpaceGrants) -> Vec<(String, Role)> {
        g.grants
            .iter()
            .map(|g| match &g.member {
                Member::User(u) => (format!("u:{u}"), g.role),
                Member::Group(x) => (format!("g:{x}"), g.role),
            })
            .collect()
    }

    #[test]
    fn empty_lists_are_empty_objects_or_null() {
        assert!(grants("{}").grants.is_empty());
        assert!(grants("null").grants.is_empty());
        assert!(grants(r#"{"value":null}"#).grants.is_empty());
    }

    #[test]
    fn v1beta1_members_links_and_expiry() {
        let g = grants(
            r#"{"@libre.graph.permissions.roles.allowedValues":[{"id":"x"}],"value":[
            {"id":"u:alice","grantedToV2":{"user":{"id":"alice","displayName":"Alice"}},"roles":["312c0871-5ef7-4b3a-85b6-0e4074c64049"]},
            {"id":"g:eng","grantedToV2":{"group":{"id":"eng","displayName":"Eng"}},"roles":["a8d5fe5e-96e3-418d-825b-534dbdf22b99"],"expirationDateTime":"2999-01-01T00:00:00Z"},
            {"id":"u:old","grantedToV2":{"user":{"id":"old","displayName":""}},"roles":["a8d5fe5e-96e3-418d-825b-534dbdf22b99"],"expirationDateTime":"2001-01-01T00:00:00Z"},
            {"id":"link1","link":{"type":"view","webUrl":"https://x/s/abc"},"roles":["b1e2218d-eef8-4d4c-b82d-0f1a1b48f3b5"]},
            {"id":"u:drop","grantedToV2":{"user":{"id":"drop","displayName":""}},"roles":["1c996275-f1c9-4e71-abdf-a42f6495e960"]},
            {"id":"u:acts","grantedToV2":{"user":{"id":"acts","displayName":""}},"@libre.graph.permissions.actions":["libre.graph/driveItem/children/read"]}
        ]}"#,
        );
        assert_eq!(
            users(&g),
            vec![
                ("u:alice".into(), Role::Manager),
                ("g:eng".into(), Role::Viewer),
                ("u:drop".into(), Role::Uploader),
                ("u:acts".into(), Role::Viewer),
            ]
        );
        assert!(g.expires.is_some());
    }

    #[test]
    fn v1_legacy_names_and_granted_to_identities() {
        let drive: Drive = serde_json::from_str(
            r#"{"driveType":"project","owner":{"user":{"id":"space-owner","displayName":""}},
            "root":{"id":"s","permissions":[
              {"grantedToIdentities":[{"user":{"id":"admin","displayName":"Admin"}}],"roles":["manager"]},
              {"grantedToV2":{"group":{"id":"eng"}},"grantedToIdentities":[{"group":{"id":"eng"}}],"roles":["viewer"]}
            ]}}"#,
        )
        .unwrap();
        let g = grants_from(drive.root.unwrap().permissions.unwrap(), SystemTime::now());
        assert_eq!(
            users(&g),
            vec![
                ("u:admin".into(), Role::Manager),
                ("g:eng".into(), Role::Viewer)
            ]
        );
    }

    #[test]
    fn granted_to_v2_as_a_list_like_the_spec_example() {
        let g = grants(
            r#"{"value":[{"grantedToV2":[{"user":{"id":"bob"}}],"roles":["58c63c02-1d89-4572-916a-870abc5a1b7d"]}]}"#,
        );
        assert_eq!(users(&g), vec![("u:bob".into(), Role::Editor)]);
    }

    #[test]
    fn group_member_pages_in_both_forms() {
        let bare: MemberPage = serde_json::from_str(
            r#"[{"id":"a","displayName":"A","onPremisesSamAccountName":"a"}]"#,
        )
        .unwrap();
        assert!(matches!(bare, MemberPage::Bare(ref v) if v.len() == 1));
        let odata: MemberPage =
            serde_json::from_str(r#"{"value":[{"id":"a"}],"@odata.nextLink":"http://x/next"}"#)
                .unwrap();
        assert!(
            matches!(odata, MemberPage::Odata { next_link: Some(ref n), .. } if n == "http://x/next")
        );
        let empty: MemberPage = serde_json::from_str("{}").unwrap();
        assert!(matches!(
            empty,
            MemberPage::Odata {
                value: None,
                next_link: None
            }
        ));
    }

    #[test]
    fn odata_errors_become_log_detail() {
        assert_eq!(
            odata_detail(br#"{"error":{"code":"itemNotFound","message":"drive not found","innererror":{"date":"x"}}}"#),
            ": itemNotFound: drive not found"
        );
        assert_eq!(odata_detail(b""), "");
    }

    #[test]
    fn ids_keep_their_dollar_and_bang() {
        assert_eq!(path_segment("storage-1$abc!def"), "storage-1$abc!def");
        assert_eq!(path_segment("a/b c"), "a%2Fb%20c");
    }
}
