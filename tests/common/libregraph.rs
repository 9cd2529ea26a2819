//! A LibreGraph test server: the oCIS routes foldercast calls, with the shapes the real server
//! sends (../shared/reference/ocis-interfaces.md), not only the OpenAPI examples:
//!
//! - `GET /graph/v1beta1/drives/{id}/root/permissions`: `{"value":[…]}` with unified role ids and
//!   `u:`/`g:` ids, public links among the members, `{}` (no `value`) when empty;
//! - `GET /graph/v1.0/drives/{id}`: the v1.0 drive, legacy role names, `grantedToV2` and
//!   `grantedToIdentities`, a personal drive's owner, a project drive's synthetic owner;
//! - `GET /graph/v1.0/groups/{id}/members`: a bare JSON array (or, for a "paged" group, the
//!   spec's `{"value"}` with `@odata.nextLink`);
//! - errors: 401 with an empty body and `Www-Authenticate`, odata errors for 404/422/500.
//!
//! Latency, failures and the expected credentials are injectable; every call is counted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

pub const MANAGER: &str = "312c0871-5ef7-4b3a-85b6-0e4074c64049";
pub const SPACE_EDITOR: &str = "58c63c02-1d89-4572-916a-870abc5a1b7d";
pub const SPACE_VIEWER: &str = "a8d5fe5e-96e3-418d-825b-534dbdf22b99";
pub const UPLOADER: &str = "1c996275-f1c9-4e71-abdf-a42f6495e960";

#[derive(Clone)]
enum Space {
    /// v1beta1 permission entries; the v1.0 drive shows the same members with legacy names
    /// unless `v1_only` (then v1beta1 answers `{}` and only the v1.0 drive knows them).
    Project {
        entries: Vec<Value>,
        v1_only: bool,
    },
    Personal {
        owner: String,
    },
}

#[derive(Default)]
struct Graph {
    spaces: HashMap<String, Space>,
    groups: HashMap<String, (Vec<String>, bool)>,
    /// Answer every request with this status (`None`: behave).
    fail: Option<u16>,
    /// Answer the next N requests with 500, then behave.
    fail_next: u32,
    latency: Duration,
    /// The exact `Authorization` header required, if any.
    authorization: Option<String>,
    /// Spaces whose permission requests answer 503 (an outage seen by some spaces only).
    failing_spaces: std::collections::HashSet<String>,
    calls: HashMap<String, u64>,
}

#[derive(Clone)]
pub struct LibreGraph {
    pub url: String,
    state: Arc<Mutex<Graph>>,
}

/// A v1beta1 permission for a user.
pub fn user_grant(id: &str, role: &str) -> Value {
    json!({"id": format!("u:{id}"),
           "grantedToV2": {"user": {"id": id, "displayName": id.to_uppercase(), "@libre.graph.userType": "Member"}},
           "roles": [role]})
}

/// A v1beta1 permission for a group.
pub fn group_grant(id: &str, role: &str) -> Value {
    json!({"id": format!("g:{id}"),
           "grantedToV2": {"group": {"id": id, "displayName": format!("Group {id}")}},
           "roles": [role]})
}

/// A public link on the space root: not a member.
pub fn link_entry(id: &str) -> Value {
    json!({"id": id, "hasPassword": false, "roles": ["b1e2218d-eef8-4d4c-b82d-0f1a1b48f3b5"],
           "link": {"type": "view", "preventsDownload": false, "webUrl": format!("https://ocis.test/s/{id}"),
                    "@libre.graph.quickLink": false, "@libre.graph.displayName": ""}})
}

/// `entry` with an `expirationDateTime`.
pub fn expiring(mut entry: Value, at: &str) -> Value {
    entry["expirationDateTime"] = json!(at);
    entry
}

fn legacy_role(role: &str) -> &'static str {
    match role {
        MANAGER => "manager",
        SPACE_EDITOR => "editor",
        SPACE_VIEWER => "viewer",
        UPLOADER => "uploader",
        _ => "unknown-role",
    }
}

impl LibreGraph {
    pub async fn start() -> LibreGraph {
        let state = Arc::new(Mutex::new(Graph::default()));
        let app = Router::new()
            .route(
                "/graph/v1beta1/drives/{id}/root/permissions",
                get(permissions),
            )
            .route("/graph/v1.0/drives/{id}", get(drive))
            .route("/graph/v1.0/groups/{id}/members", get(members))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        LibreGraph { url, state }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Graph) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    pub fn project(&self, id: &str, entries: Vec<Value>) {
        self.with(|g| {
            g.spaces.insert(
                id.into(),
                Space::Project {
                    entries,
                    v1_only: false,
                },
            )
        });
    }

    /// A project space whose members only the v1.0 drive lists (legacy role names).
    pub fn project_v1_only(&self, id: &str, entries: Vec<Value>) {
        self.with(|g| {
            g.spaces.insert(
                id.into(),
                Space::Project {
                    entries,
                    v1_only: true,
                },
            )
        });
    }

    pub fn personal(&self, id: &str, owner: &str) {
        self.with(|g| {
            g.spaces.insert(
                id.into(),
                Space::Personal {
                    owner: owner.into(),
                },
            )
        });
    }

    pub fn delete_space(&self, id: &str) {
        self.with(|g| g.spaces.remove(id));
    }

    pub fn group(&self, id: &str, members: &[&str]) {
        self.with(|g| {
            g.groups.insert(
                id.into(),
                (members.iter().map(|m| m.to_string()).collect(), false),
            )
        });
    }

    /// A group whose members come in `{"value"}` pages linked by `@odata.nextLink`.
    pub fn paged_group(&self, id: &str, members: &[&str]) {
        self.with(|g| {
            g.groups.insert(
                id.into(),
                (members.iter().map(|m| m.to_string()).collect(), true),
            )
        });
    }

    pub fn fail_with(&self, status: Option<u16>) {
        self.with(|g| g.fail = status);
    }

    pub fn fail_next(&self, n: u32) {
        self.with(|g| g.fail_next = n);
    }

    /// Makes `space`'s permission requests answer 503 (`false` heals it).
    pub fn fail_space(&self, space: &str, failing: bool) {
        self.with(|g| {
            if failing {
                g.failing_spaces.insert(space.to_owned());
            } else {
                g.failing_spaces.remove(space);
            }
        });
    }

    pub fn latency(&self, d: Duration) {
        self.with(|g| g.latency = d);
    }

    pub fn require_authorization(&self, header: Option<&str>) {
        self.with(|g| g.authorization = header.map(str::to_owned));
    }

    /// Calls to one route: `permissions:<space>`, `drive:<space>` or `members:<group>`.
    pub fn calls(&self, key: &str) -> u64 {
        self.with(|g| g.calls.get(key).copied().unwrap_or(0))
    }

    /// All calls so far.
    pub fn total_calls(&self) -> u64 {
        self.with(|g| g.calls.values().sum())
    }
}

fn odata(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message,
            "innererror": {"date": "2026-11-25T10:00:00Z", "request-id": "test"}}})),
    )
        .into_response()
}

/// Counts the call, sleeps the latency, and answers the injected failure or bad credentials.
async fn gate(state: &Arc<Mutex<Graph>>, key: String, headers: &HeaderMap) -> Option<Response> {
    let (latency, fail, authorization) = {
        let mut g = state.lock().unwrap();
        *g.calls.entry(key).or_default() += 1;
        let fail = if g.fail_next > 0 {
            g.fail_next -= 1;
            Some(500)
        } else {
            g.fail
        };
        (g.latency, fail, g.authorization.clone())
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let unauthorized = || {
        // The proxy's 401: empty body, a challenge header, no odata.
        (
            StatusCode::UNAUTHORIZED,
            [(
                header::WWW_AUTHENTICATE,
                "Bearer realm=\"ocis.test\", charset=\"UTF-8\"",
            )],
        )
            .into_response()
    };
    if let Some(required) = authorization {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if given != Some(required.as_str()) {
            return Some(unauthorized());
        }
    }
    match fail {
        None => None,
        Some(401) => Some(unauthorized()),
        Some(404) => Some(odata(
            StatusCode::NOT_FOUND,
            "itemNotFound",
            "drive not found",
        )),
        Some(code) => Some(odata(
            StatusCode::from_u16(code).unwrap(),
            "generalException",
            "injected failure",
        )),
    }
}

fn allowed_roles() -> Value {
    json!([
        {"id": SPACE_VIEWER, "displayName": "Can view", "description": "View and download.", "@libre.graph.weight": 1},
        {"id": SPACE_EDITOR, "displayName": "Can edit", "description": "View, download, upload, edit.", "@libre.graph.weight": 2},
        {"id": MANAGER, "displayName": "Can manage", "description": "Everything.", "@libre.graph.weight": 3}
    ])
}

async fn permissions(
    State(state): State<Arc<Mutex<Graph>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = gate(&state, format!("permissions:{id}"), &headers).await {
        return r;
    }
    if state.lock().unwrap().failing_spaces.contains(&id) {
        return odata(
            StatusCode::SERVICE_UNAVAILABLE,
            "serviceNotAvailable",
            "injected outage",
        );
    }
    if id.contains("malformed") {
        return odata(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalidRequest",
            "invalid driveID or itemID",
        );
    }
    let space = state.lock().unwrap().spaces.get(&id).cloned();
    match space {
        None => odata(StatusCode::NOT_FOUND, "itemNotFound", "drive not found"),
        // Go's omitempty: an empty member list has no `value` at all.
        Some(Space::Personal { .. }) | Some(Space::Project { v1_only: true, .. }) => {
            axum::Json(json!({"@libre.graph.permissions.roles.allowedValues": allowed_roles()}))
                .into_response()
        }
        Some(Space::Project { entries, .. }) if entries.is_empty() => {
            axum::Json(json!({})).into_response()
        }
        Some(Space::Project { entries, .. }) => axum::Json(json!({
            "@libre.graph.permissions.roles.allowedValues": allowed_roles(),
            "@libre.graph.permissions.actions.allowedValues": ["libre.graph/driveItem/basic/read", "libre.graph/driveItem/children/read"],
            "value": entries
        }))
        .into_response(),
    }
}

async fn drive(
    State(state): State<Arc<Mutex<Graph>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = gate(&state, format!("drive:{id}"), &headers).await {
        return r;
    }
    let space = state.lock().unwrap().spaces.get(&id).cloned();
    let web = format!("https://ocis.test/dav/spaces/{id}");
    match space {
        None => odata(StatusCode::NOT_FOUND, "itemNotFound", "drive not found"),
        Some(Space::Personal { owner }) => axum::Json(json!({
            "driveAlias": format!("personal/{owner}"), "driveType": "personal", "id": id, "name": owner,
            "owner": {"user": {"displayName": owner.to_uppercase(), "id": owner}},
            "quota": {"remaining": 1000, "state": "normal", "total": 2000, "used": 1000},
            "root": {"eTag": "\"abc\"", "id": id, "webDavUrl": web}
        }))
        .into_response(),
        Some(Space::Project { entries, .. }) => {
            let legacy: Vec<Value> = entries
                .iter()
                .filter(|e| e.get("link").is_none())
                .map(|e| {
                    let identity = e["grantedToV2"].clone();
                    let roles: Vec<&str> = e["roles"]
                        .as_array()
                        .map(|r| r.iter().filter_map(|x| x.as_str()).map(legacy_role).collect())
                        .unwrap_or_default();
                    let mut p = json!({"grantedToV2": identity, "grantedToIdentities": [identity], "roles": roles});
                    if let Some(exp) = e.get("expirationDateTime") {
                        p["expirationDateTime"] = exp.clone();
                    }
                    p
                })
                .collect();
            let space_uuid = id.split('$').next_back().unwrap_or(&id).to_owned();
            axum::Json(json!({
                "driveAlias": "project/test", "driveType": "project", "id": id, "name": "Test",
                // The synthetic space owner: its id is the space id, it is no member.
                "owner": {"user": {"displayName": "", "id": space_uuid}},
                "root": {"eTag": "\"abc\"", "id": id, "webDavUrl": web, "permissions": legacy}
            }))
            .into_response()
        }
    }
}

#[derive(serde::Deserialize)]
struct Page {
    page: Option<usize>,
}

async fn members(
    State(state): State<Arc<Mutex<Graph>>>,
    Path(id): Path<String>,
    Query(page): Query<Page>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = gate(&state, format!("members:{id}"), &headers).await {
        return r;
    }
    let group = state.lock().unwrap().groups.get(&id).cloned();
    let Some((members, paged)) = group else {
        return odata(StatusCode::NOT_FOUND, "itemNotFound", "group not found");
    };
    let user = |m: &String| {
        json!({"id": m, "displayName": m.to_uppercase(), "onPremisesSamAccountName": m,
               "mail": format!("{m}@ocis.test"), "userType": "Member"})
    };
    if !paged {
        // The real server: a bare array, not the spec's {"value": […]}.
        return axum::Json(Value::Array(members.iter().map(user).collect())).into_response();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    let n = page.page.unwrap_or(0);
    let chunk: Vec<Value> = members.iter().skip(n * 2).take(2).map(user).collect();
    let mut body = json!({"value": chunk});
    if (n + 1) * 2 < members.len() {
        body["@odata.nextLink"] = json!(format!(
            "http://{host}/graph/v1.0/groups/{id}/members?page={}",
            n + 1
        ));
    }
    axum::Json(body).into_response()
}
