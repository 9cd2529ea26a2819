//! A LibreGraph test server: the oCIS routes foldercast calls, with the shapes the real server
//! sends (../shared/reference/ocis-interfaces.md), not only the OpenAPI examples:
//!
//! - `GET /graph/v1beta1/drives/{id}/root/permissions`: `{"value":[…]}` with unified role ids and
//!   `u:`/`g:` ids, public links among the members, `{}` (no `value`) when empty;
//! - `GET /graph/v1.0/drives/{id}`: the v1.0 drive, legacy role names, `grantedToV2` and
//!   `grantedToIdentities`, a personal drive's owner, a project drive's synthetic owner;
//! - `GET /graph/v1.0/groups/{id}/members`: a bare JSON array (or, for a "paged" group, the
//!   spec's `{"value"}` with `@odata.nextLink`);
//! - `GET /graph/v1.0/drives/{drive}/items/{item}`: a driveItem (`size`, `eTag`,
//!   `parentReference.path`, `file` or `folder`), 404 odata when unknown;
//! - `PROPFIND /remote.php/dav/spaces/{drive}/{path}` and
//!   `/remote.php/dav/spaces/trash-bin/{drive}/{key}` (`Depth: 0`): a WebDAV multistatus with
//!   `oc:size`, `oc:fileid`, `d:getetag`, `d:resourcetype`, `oc:trashbin-original-location`;
//! - `GET /graph/v1.0/me/drives`, `GET /graph/v1.0/groups`: `{"value":[…]}` of the known spaces
//!   (with `driveType`) and groups (what `self-test` lists);
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
    /// Items by (drive, item id), and trashed ones by (drive, trash key).
    items: HashMap<(String, String), Item>,
    trash: HashMap<(String, String), Item>,
    /// Item and WebDAV requests answer 503 (membership still answers).
    items_failing: bool,
    /// `GET /graph/v1.0/users`, in pages of `users_page`.
    users: Vec<String>,
    users_page: usize,
}

/// An item as oCIS describes it.
#[derive(Clone, Debug)]
pub struct Item {
    pub id: String,
    /// Space-root-relative: `/reports/q1.pdf`.
    pub path: String,
    pub size: u64,
    pub etag: String,
    pub folder: bool,
}

impl Item {
    /// A file of `drive` with the node id `node` (its etag: `"<node>"`).
    pub fn file(drive: &str, node: &str, path: &str, size: u64) -> Item {
        Item {
            id: format!("{drive}!{node}"),
            path: path.into(),
            size,
            etag: format!("\"{node}\""),
            folder: false,
        }
    }

    /// A folder, as [`Item::file`].
    pub fn folder(drive: &str, node: &str, path: &str, size: u64) -> Item {
        Item {
            folder: true,
            ..Item::file(drive, node, path, size)
        }
    }
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
            .route("/graph/v1.0/drives/{drive}/items/{item}", get(drive_item))
            .route("/graph/v1.0/users", get(users))
            .route("/graph/v1.0/me/drives", get(my_drives))
            .route("/graph/v1.0/groups", get(groups))
            .route(
                "/remote.php/dav/spaces/{*rest}",
                axum::routing::any(propfind),
            )
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

    /// An item of `drive` (replaces one of the same id).
    pub fn item(&self, drive: &str, item: Item) {
        self.with(|g| g.items.insert((drive.into(), item.id.clone()), item));
    }

    /// Moves an item into the trash bin under `key` (its opaque id, as oCIS does).
    pub fn trash(&self, drive: &str, id: &str, key: &str) {
        self.with(|g| {
            if let Some(item) = g.items.remove(&(drive.to_owned(), id.to_owned())) {
                g.trash.insert((drive.into(), key.into()), item);
            }
        });
    }

    /// The users `GET /graph/v1.0/users` lists, `page` per page (linked by `@odata.nextLink`).
    pub fn users(&self, users: Vec<String>, page: usize) {
        self.with(|g| {
            g.users = users;
            g.users_page = page.max(1);
        });
    }

    /// Makes item lookups (graph items, PROPFIND) answer 503 while membership answers.
    pub fn fail_items(&self, failing: bool) {
        self.with(|g| g.items_failing = failing);
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

/// `GET /graph/v1.0/users`: `{"value":[…]}` pages with `@odata.nextLink` (an admin's view).
async fn users(
    State(state): State<Arc<Mutex<Graph>>>,
    Query(page): Query<Page>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = gate(&state, "users".into(), &headers).await {
        return r;
    }
    let (users, size) = {
        let g = state.lock().unwrap();
        (g.users.clone(), g.users_page.max(1))
    };
    let n = page.page.unwrap_or(0);
    let chunk: Vec<Value> = users
        .iter()
        .skip(n * size)
        .take(size)
        .map(|u| {
            json!({"id": u, "displayName": u.to_uppercase(), "onPremisesSamAccountName": u,
                       "mail": format!("{u}@ocis.test"), "userType": "Member"})
        })
        .collect();
    let mut body = json!({"value": chunk});
    if (n + 1) * size < users.len() {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("127.0.0.1");
        body["@odata.nextLink"] = json!(format!("http://{host}/graph/v1.0/users?page={}", n + 1));
    }
    axum::Json(body).into_response()
}

/// `GET /graph/v1.0/me/drives`: every known space, as drives with their type.
async fn my_drives(State(state): State<Arc<Mutex<Graph>>>, headers: HeaderMap) -> Response {
    if let Some(r) = gate(&state, "me-drives".into(), &headers).await {
        return r;
    }
    let g = state.lock().unwrap();
    let mut value: Vec<Value> = g
        .spaces
        .iter()
        .map(|(id, s)| {
            let kind = match s {
                Space::Project { .. } => "project",
                Space::Personal { .. } => "personal",
            };
            json!({"id": id, "name": id, "driveType": kind})
        })
        .collect();
    value.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    axum::Json(json!({ "value": value })).into_response()
}

/// `GET /graph/v1.0/groups`: every known group.
async fn groups(State(state): State<Arc<Mutex<Graph>>>, headers: HeaderMap) -> Response {
    if let Some(r) = gate(&state, "groups".into(), &headers).await {
        return r;
    }
    let g = state.lock().unwrap();
    let mut ids: Vec<&String> = g.groups.keys().collect();
    ids.sort();
    let value: Vec<Value> = ids
        .into_iter()
        .map(|id| json!({"id": id, "displayName": format!("Group {id}")}))
        .collect();
    axum::Json(json!({ "value": value })).into_response()
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

async fn drive_item(
    State(state): State<Arc<Mutex<Graph>>>,
    Path((drive, item)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = gate(&state, format!("item:{item}"), &headers).await {
        return r;
    }
    if state.lock().unwrap().items_failing {
        return odata(
            StatusCode::SERVICE_UNAVAILABLE,
            "generalException",
            "items down",
        );
    }
    let found = state
        .lock()
        .unwrap()
        .items
        .get(&(drive.clone(), item))
        .cloned();
    let Some(item) = found else {
        return odata(StatusCode::NOT_FOUND, "itemNotFound", "item not found");
    };
    let (parent, name) = item.path.rsplit_once('/').unwrap_or(("", &item.path));
    let parent_id = parent_id_of(&state, &drive, &item.path);
    let mut body = json!({
        "id": item.id, "name": name, "size": item.size, "eTag": item.etag,
        "lastModifiedDateTime": "2026-11-30T08:00:02Z",
        "parentReference": {"driveId": drive, "driveType": "project", "id": parent_id,
                            "name": parent.rsplit('/').next().unwrap_or(""),
                            "path": if parent.is_empty() { "/" } else { parent }},
        "webDavUrl": format!("https://ocis.test/dav/spaces/{drive}{}", item.path),
    });
    if item.folder {
        body["folder"] = json!({"childCount": 0});
    } else {
        body["file"] = json!({"mimeType": "application/octet-stream"});
    }
    axum::Json(body).into_response()
}

/// The id of the folder holding `path`: a registered folder, else the space root
/// (`storage$space!space`).
fn parent_id_of(state: &Arc<Mutex<Graph>>, drive: &str, path: &str) -> String {
    let parent = path.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
    let g = state.lock().unwrap();
    g.items
        .iter()
        .find(|((d, _), i)| d == drive && i.path == parent)
        .map(|(_, i)| i.id.clone())
        .unwrap_or_else(|| format!("{drive}!{}", drive.rsplit('$').next().unwrap_or(drive)))
}

/// WebDAV `PROPFIND` (Depth 0) on an item by path, or on an item in the trash bin.
async fn propfind(
    State(state): State<Arc<Mutex<Graph>>>,
    method: axum::http::Method,
    Path(rest): Path<String>,
    headers: HeaderMap,
) -> Response {
    if method.as_str() != "PROPFIND" {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    if headers.get("depth").and_then(|d| d.to_str().ok()) != Some("0") {
        return (StatusCode::BAD_REQUEST, "only Depth: 0 here").into_response();
    }
    if let Some(r) = gate(&state, format!("propfind:{rest}"), &headers).await {
        return r;
    }
    if state.lock().unwrap().items_failing {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let decoded = percent_decode;
    let found = {
        let g = state.lock().unwrap();
        match rest.strip_prefix("trash-bin/") {
            Some(trashed) => {
                let (drive, key) = trashed.split_once('/').unwrap_or((trashed, ""));
                g.trash
                    .get(&(decoded(drive), decoded(key)))
                    .cloned()
                    .map(|i| (i, true))
            }
            None => {
                let (drive, path) = rest.split_once('/').unwrap_or((&rest, ""));
                let (drive, path) = (decoded(drive), format!("/{}", decoded(path)));
                g.items
                    .iter()
                    .find(|((d, _), i)| *d == drive && i.path == path)
                    .map(|(_, i)| (i.clone(), false))
            }
        }
    };
    let Some((item, trashed)) = found else {
        // Sabre's 404: an XML error body.
        return (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "application/xml; charset=utf-8")],
            r#"<?xml version="1.0" encoding="utf-8"?><d:error xmlns:d="DAV:" xmlns:s="http://sabredav.org/ns"><s:exception>Sabre\DAV\Exception\NotFound</s:exception><s:message>Resource not found</s:message></d:error>"#,
        )
            .into_response();
    };
    let kind = if item.folder {
        "<d:resourcetype><d:collection/></d:resourcetype>"
    } else {
        "<d:resourcetype/>"
    };
    let location = if trashed {
        format!(
            "<oc:trashbin-original-location>{}</oc:trashbin-original-location>",
            item.path.trim_start_matches('/')
        )
    } else {
        String::new()
    };
    let length = if item.folder {
        String::new()
    } else {
        format!("<d:getcontentlength>{}</d:getcontentlength>", item.size)
    };
    let drive = rest
        .strip_prefix("trash-bin/")
        .unwrap_or(&rest)
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let parent_id = parent_id_of(&state, &percent_decode(&drive), &item.path);
    let body = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<d:multistatus xmlns:s="http://sabredav.org/ns" xmlns:d="DAV:" xmlns:oc="http://owncloud.org/ns">
<d:response><d:href>/remote.php/dav/spaces/{rest}</d:href>
<d:propstat><d:prop><oc:fileid>{id}</oc:fileid><oc:file-parent>{parent_id}</oc:file-parent><oc:size>{size}</oc:size>{length}<d:getetag>&quot;{etag}&quot;</d:getetag>{kind}{location}</d:prop>
<d:status>HTTP/1.1 200 OK</d:status></d:propstat>
</d:response></d:multistatus>"#,
        id = item.id,
        size = item.size,
        etag = item.etag.trim_matches('"'),
    );
    (
        StatusCode::MULTI_STATUS,
        [(header::CONTENT_TYPE, "application/xml; charset=utf-8")],
        body,
    )
        .into_response()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
