//! The embedded default's demo: a page that signs in as a fixture user and shows a space's
//! folders changing live, plus the few endpoints it needs.
//!
//! Token minting exists only here, and only for users of the membership fixture: it is what
//! makes the demo usable without an identity provider, and why `--no-demo` turns it off.

mod tree;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::event::StorageEvent;
use crate::gateway::auth::{Authenticator, bearer};
use crate::gateway::error_response;
use crate::membership::{Directory, MembershipResolver};
use crate::path::SpacePath;
pub use tree::{DemoTree, Entry};

const PAGE: &str = include_str!("../../web/demo.html");
/// The JavaScript client the page uses, served as it is published (`clients/js`).
const CLIENT: &str = include_str!("../../clients/js/foldercast.js");

pub struct DemoState {
    directory: Directory,
    resolver: Arc<dyn MembershipResolver>,
    auth: Arc<Authenticator>,
    tree: Mutex<DemoTree>,
    /// Publishes the demo's notices and downtimes (the gateway's own scheduler).
    scheduler: std::sync::OnceLock<Arc<crate::notice::downtime::Scheduler>>,
}

impl DemoState {
    pub fn new(
        directory: Directory,
        resolver: Arc<dyn MembershipResolver>,
        auth: Arc<Authenticator>,
    ) -> Arc<Self> {
        Arc::new(DemoState {
            directory,
            resolver,
            auth,
            tree: Mutex::new(DemoTree::default()),
            scheduler: std::sync::OnceLock::new(),
        })
    }

    /// Lets the page try notifications and downtimes (through the gateway's scheduler).
    pub fn with_scheduler(&self, scheduler: Arc<crate::notice::downtime::Scheduler>) {
        let _ = self.scheduler.set(scheduler);
    }

    /// Keeps the simulated storage in step with the events the pipeline delivered.
    pub fn observe(&self, event: &StorageEvent) {
        if let Ok(mut tree) = self.tree.lock() {
            tree.apply(event);
        }
    }
}

pub fn router(state: Arc<DemoState>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route(
            "/foldercast.js",
            get(|| async {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/javascript; charset=utf-8",
                    )],
                    CLIENT,
                )
            }),
        )
        .route("/api/demo/users", get(users))
        .route("/api/demo/token", post(token))
        .route("/api/demo/tree", get(listing))
        .route("/api/demo/notice", post(demo_notice))
        .route("/api/demo/downtime", post(demo_downtime))
        .with_state(state)
}

async fn users(State(state): State<Arc<DemoState>>) -> Json<serde_json::Value> {
    let mut out = Vec::new();
    for user in &state.directory.users {
        let mut spaces = Vec::new();
        for space in &state.directory.spaces {
            if let Ok(listers) = state.resolver.listers(&space.id).await
                && listers.iter().any(|u| **u == *user.id)
            {
                spaces.push(
                    json!({"id": space.id, "name": space.name.as_deref().unwrap_or(&space.id)}),
                );
            }
        }
        out.push(json!({"id": user.id, "display_name": user.display_name.as_deref().unwrap_or(&user.id), "spaces": spaces}));
    }
    Json(json!({ "users": out }))
}

#[derive(Deserialize)]
struct TokenRequest {
    user: String,
}

async fn token(State(state): State<Arc<DemoState>>, Json(req): Json<TokenRequest>) -> Response {
    if !state.directory.users.iter().any(|u| u.id == req.user) {
        return error_response(
            StatusCode::NOT_FOUND,
            "unknown-user",
            "not a user of the membership fixture",
        );
    }
    match state.auth.mint(&req.user, Duration::from_secs(3600)) {
        Ok(token) => Json(json!({"token": token, "expires_in": 3600})).into_response(),
        Err(e) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "mint-failed",
            &e.to_string(),
        ),
    }
}

#[derive(Deserialize)]
struct TreeQuery {
    space: String,
    #[serde(default)]
    path: Option<String>,
}

async fn listing(
    State(state): State<Arc<DemoState>>,
    headers: HeaderMap,
    Query(q): Query<TreeQuery>,
) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer);
    let verified = match token {
        Some(t) => Some(state.auth.verify(t).await),
        None => None,
    };
    let identity = match verified {
        Some(Ok(identity)) => identity,
        Some(Err(e)) => return error_response(StatusCode::UNAUTHORIZED, e.code(), &e.to_string()),
        None => {
            return error_response(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "bearer token required",
            );
        }
    };
    let allowed = match state.resolver.listers(&q.space).await {
        Ok(listers) => listers.contains(&identity.user),
        Err(_) => false,
    };
    if !allowed {
        return error_response(
            StatusCode::FORBIDDEN,
            "forbidden",
            "you may not list this space",
        );
    }
    let folder = match SpacePath::parse(q.path.as_deref().unwrap_or("/")) {
        Ok(p) => p,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, "invalid-path", &e.to_string()),
    };
    let Ok(tree) = state.tree.lock() else {
        return error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "unavailable",
            "tree lock poisoned",
        );
    };
    let (size, mtime) = tree.folder(&q.space, &folder);
    let entries: Vec<Entry> = tree.listing(&q.space, &folder);
    Json(json!({"space_id": q.space, "path": folder, "size": size, "mtime": mtime, "entries": entries})).into_response()
}

/// `POST /api/demo/notice {"user"}`: a critical notice to one fixture user, to acknowledge.
async fn demo_notice(
    State(state): State<Arc<DemoState>>,
    Json(req): Json<TokenRequest>,
) -> Response {
    let Some(scheduler) = state.scheduler.get() else {
        return error_response(StatusCode::NOT_FOUND, "not-enabled", "no scheduler");
    };
    if !state.directory.users.iter().any(|u| u.id == req.user) {
        return error_response(
            StatusCode::NOT_FOUND,
            "unknown-user",
            "not a user of the membership fixture",
        );
    }
    let notice = crate::notice::Notice {
        level: crate::notice::Level::Critical,
        title: "A critical notice".into(),
        body: "It comes on every connect of this browser until acknowledged.".into(),
        link: None,
        expires: None,
        ack: Some(crate::notice::AckMode::User),
        action: None,
        targets: crate::notice::Targets {
            users: vec![req.user],
            ..Default::default()
        },
        downtime: None,
        shutdown_advice: false,
    };
    let who = crate::notice::publish::Publishing {
        publisher: "demo",
        idempotency_key: None,
    };
    match scheduler.publisher.publish(&notice, who).await {
        Ok(p) => Json(p).into_response(),
        Err(e) => error_response(StatusCode::SERVICE_UNAVAILABLE, e.code, &e.message),
    }
}

/// `POST /api/demo/downtime`: a downtime of everyone a minute from now, for a minute, with
/// announcements at once and 30 and 10 s before.
async fn demo_downtime(State(state): State<Arc<DemoState>>) -> Response {
    let Some(scheduler) = state.scheduler.get() else {
        return error_response(StatusCode::NOT_FOUND, "not-enabled", "no scheduler");
    };
    let now = chrono::Utc::now();
    let at = |s: i64| {
        (now + chrono::Duration::seconds(s)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    let request = crate::notice::downtime::DowntimeRequest {
        from: at(60),
        until: at(120),
        title: Some("Planned downtime".into()),
        body: Some("The demo storage is upgraded".into()),
        targets: crate::notice::Targets {
            all: true,
            ..Default::default()
        },
        steps: Some(vec!["30s".into(), "10s".into()]),
    };
    let downtime = match request.schedule(now.timestamp_millis()) {
        Ok(d) => d,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, e.code, &e.message),
    };
    match scheduler.schedule(&downtime).await {
        Ok(()) => Json(downtime).into_response(),
        Err(e) => error_response(StatusCode::SERVICE_UNAVAILABLE, e.code, &e.message),
    }
}
