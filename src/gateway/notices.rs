//! `POST /api/notifications`: operators publish notifications through the gateway.
//!
//! Only an admin credential publishes, never a user's token: a bearer listed in
//! `--admin-token-file` (one `name:token` or `token` per line, each at least 32 bytes; the name
//! scopes idempotency keys and names the publisher in logs). Each admin may publish
//! [`PER_MINUTE`] times a minute; a body over [`MAX_BODY`] is refused before it is parsed. An
//! `Idempotency-Key` header makes a retry within 24 h a no-op that answers the first result.

use std::path::Path;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{AppState, error_response};
use crate::notice::Notice;
use crate::notice::publish::{Publisher, Publishing};

/// The largest request body.
pub const MAX_BODY: usize = 64 * 1024;
/// Publishes per admin and minute (a burst of as many).
pub const PER_MINUTE: u32 = 30;
/// The shortest admin token: as long as a good HS256 secret.
pub const MIN_TOKEN_BYTES: usize = 32;

/// How often a gateway asks the bus how many notifications are still owed (`/metrics`).
pub const PENDING_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Keeps the gateway's count of notifications pending acknowledgement current, for as long as
/// the gateway runs.
pub fn watch_pending(state: &Arc<AppState>) {
    state
        .hub
        .stats
        .notices_pending
        .store(-1, std::sync::atomic::Ordering::Relaxed);
    let weak = Arc::downgrade(state);
    tokio::spawn(async move {
        loop {
            let Some(state) = weak.upgrade() else { return };
            let now_ms = chrono::Utc::now().timestamp_millis();
            match state.hub.bus().pending_notices(now_ms).await {
                Ok(n) => state.hub.stats.notices_pending.store(
                    i64::try_from(n).unwrap_or(i64::MAX),
                    std::sync::atomic::Ordering::Relaxed,
                ),
                Err(e) => tracing::debug!(error = %e, "pending notifications unknown for now"),
            }
            drop(state);
            tokio::time::sleep(PENDING_EVERY).await;
        }
    });
}

/// The admin bearer tokens, by name.
pub struct AdminTokens {
    tokens: Vec<(Arc<str>, Vec<u8>)>,
}

/// Names only: tokens never reach a log.
impl std::fmt::Debug for AdminTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.tokens.iter().map(|(n, _)| &**n).collect();
        f.debug_struct("AdminTokens")
            .field("names", &names)
            .finish()
    }
}

impl AdminTokens {
    /// Reads `name:token` or `token` lines (blank lines and `#` comments skipped).
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read --admin-token-file {}: {e}", path.display()))?;
        let mut tokens = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, token) = match line.split_once(':') {
                Some((name, token)) if !name.is_empty() => (name.trim().to_owned(), token.trim()),
                _ => (format!("admin-{}", n + 1), line),
            };
            if token.len() < MIN_TOKEN_BYTES {
                return Err(format!(
                    "--admin-token-file {} line {}: a token of at least {MIN_TOKEN_BYTES} bytes (openssl rand -hex 32)",
                    path.display(),
                    n + 1
                ));
            }
            tokens.push((Arc::from(name), token.as_bytes().to_vec()));
        }
        if tokens.is_empty() {
            return Err(format!(
                "--admin-token-file {} holds no token",
                path.display()
            ));
        }
        Ok(AdminTokens { tokens })
    }

    /// The admin `token` belongs to. Every token is compared in full, whatever matches, so the
    /// time taken says nothing about how close a guess was.
    pub fn admin_of(&self, token: &str) -> Option<Arc<str>> {
        let given = token.as_bytes();
        let mut found = None;
        for (name, known) in &self.tokens {
            let mut diff = u8::from(known.len() != given.len());
            for (i, k) in known.iter().enumerate() {
                diff |= k ^ given.get(i).copied().unwrap_or(0);
            }
            if diff == 0 {
                found = Some(name.clone());
            }
        }
        found
    }
}

/// What the route needs: who may publish, and how.
pub struct Notices {
    pub publisher: Arc<Publisher>,
    pub admins: AdminTokens,
    rate: governor::DefaultKeyedRateLimiter<Arc<str>>,
}

impl Notices {
    pub fn new(publisher: Arc<Publisher>, admins: AdminTokens) -> Self {
        let per_minute = std::num::NonZeroU32::new(PER_MINUTE).unwrap_or(std::num::NonZeroU32::MIN);
        Notices {
            publisher,
            admins,
            rate: governor::RateLimiter::keyed(governor::Quota::per_minute(per_minute)),
        }
    }
}

/// The admin a request comes from (and the publishing state), or the response refusing it.
fn admin_of<'a>(
    state: &'a AppState,
    headers: &HeaderMap,
) -> Result<(&'a Notices, Arc<str>), Box<Response>> {
    let Some(notices) = state.notices.get() else {
        return Err(Box::new(error_response(
            StatusCode::NOT_FOUND,
            "not-enabled",
            "publishing is off: start the gateway with --admin-token-file",
        )));
    };
    let Some(token) = super::ws::header_token(headers) else {
        return Err(Box::new(error_response(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "send Authorization: Bearer <a token of --admin-token-file>",
        )));
    };
    match notices.admins.admin_of(token) {
        Some(admin) => Ok((notices, admin)),
        // A user's token (or anything else) never publishes.
        None => Err(Box::new(error_response(
            StatusCode::FORBIDDEN,
            "forbidden",
            "publishing needs an admin token of --admin-token-file; user tokens cannot publish",
        ))),
    }
}

pub async fn publish(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (notices, admin) = match admin_of(&state, &headers) {
        Ok(found) => found,
        Err(refused) => return *refused,
    };
    if notices.rate.check_key(&admin).is_err() {
        return error_response(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            &format!("at most {PER_MINUTE} publishes a minute per admin"),
        );
    }
    let notice: Notice = match json_body(body) {
        Ok(n) => n,
        Err(refused) => return *refused,
    };
    let key = headers
        .get("idempotency-key")
        .map(|v| v.to_str().map_err(|_| ()));
    let key = match key {
        Some(Ok(k)) => Some(k),
        Some(Err(())) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad-notification",
                "Idempotency-Key is not text",
            );
        }
        None => None,
    };
    let who = Publishing {
        publisher: &admin,
        idempotency_key: key,
    };
    match notices.publisher.publish(&notice, who).await {
        Ok(published) => (StatusCode::OK, axum::Json(published)).into_response(),
        Err(e) => {
            let status = match e.code {
                "directory-unavailable" | "bus-unavailable" => StatusCode::SERVICE_UNAVAILABLE,
                "in-progress" => StatusCode::CONFLICT,
                "unknown-group" | "unknown-space" => StatusCode::NOT_FOUND,
                _ => StatusCode::BAD_REQUEST,
            };
            error_response(status, e.code, &e.message)
        }
    }
}

#[derive(serde::Deserialize)]
pub struct AckQuery {
    device: Option<String>,
}

/// `POST /api/notifications/{id}/ack?device=D`: a user's device acknowledges a notification
/// (what SSE clients, which cannot send frames, use; WebSocket clients send an `ack` frame).
pub async fn acknowledge(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    axum::extract::Query(query): axum::extract::Query<AckQuery>,
    headers: HeaderMap,
) -> Response {
    let user = match user_of(&state, &headers).await {
        Ok(user) => user,
        Err(refused) => return refused,
    };
    let device = match query.device.map(super::protocol::check_device) {
        None => super::protocol::DEFAULT_DEVICE.to_owned(),
        Some(Ok(d)) => d,
        Some(Err(e)) => return error_response(StatusCode::BAD_REQUEST, e.code, &e.message),
    };
    match state.hub.bus().acknowledge(&user, &device, &id).await {
        Ok(true) => (
            StatusCode::OK,
            axum::Json(serde_json::json!({"type": "acked", "notification_id": id})),
        )
            .into_response(),
        // Another user's notification is unknown here: acknowledgements are per user.
        Ok(false) => error_response(
            StatusCode::NOT_FOUND,
            "unknown-notification",
            &format!("{user} owes no acknowledgement for {id:?}"),
        ),
        Err(e) => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            &e.to_string(),
        ),
    }
}

fn notice_error(e: crate::notice::NoticeError) -> Response {
    let status = match e.code {
        "directory-unavailable" | "bus-unavailable" => StatusCode::SERVICE_UNAVAILABLE,
        "in-progress" => StatusCode::CONFLICT,
        "unknown-group" | "unknown-space" => StatusCode::NOT_FOUND,
        _ => StatusCode::BAD_REQUEST,
    };
    error_response(status, e.code, &e.message)
}

/// The downtime scheduler, for an admin's request; otherwise the response refusing it.
fn scheduler_for_admin<'a>(
    state: &'a AppState,
    headers: &HeaderMap,
) -> Result<&'a Arc<crate::notice::downtime::Scheduler>, Box<Response>> {
    admin_of(state, headers)?;
    state.downtimes.get().ok_or_else(|| {
        Box::new(error_response(
            StatusCode::NOT_FOUND,
            "not-enabled",
            "no scheduler",
        ))
    })
}

/// `POST /api/downtimes` (admin): schedules a planned downtime's announcements.
pub async fn announce_downtime(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let scheduler = match scheduler_for_admin(&state, &headers) {
        Ok(s) => s,
        Err(refused) => return *refused,
    };
    let request: crate::notice::downtime::DowntimeRequest = match json_body(body) {
        Ok(r) => r,
        Err(refused) => return *refused,
    };
    let downtime = match request.schedule(chrono::Utc::now().timestamp_millis()) {
        Ok(d) => d,
        Err(e) => return notice_error(e),
    };
    match scheduler.schedule(&downtime).await {
        Ok(()) => (StatusCode::OK, axum::Json(downtime)).into_response(),
        Err(e) => notice_error(e),
    }
}

/// `GET /api/downtimes` (admin): the downtimes still to come or under way.
pub async fn list_downtimes(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let scheduler = match scheduler_for_admin(&state, &headers) {
        Ok(s) => s,
        Err(refused) => return *refused,
    };
    match scheduler.list().await {
        Ok(all) => axum::Json(serde_json::json!({"downtimes": all})).into_response(),
        Err(e) => notice_error(e),
    }
}

/// `DELETE /api/downtimes/{id}` (admin): cancels what is left of a downtime's announcements.
pub async fn cancel_downtime(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    let scheduler = match scheduler_for_admin(&state, &headers) {
        Ok(s) => s,
        Err(refused) => return *refused,
    };
    match scheduler.cancel(&id).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => error_response(
            StatusCode::NOT_FOUND,
            "unknown-downtime",
            &format!("no downtime {id:?}"),
        ),
        Err(e) => notice_error(e),
    }
}

/// The user of a request's bearer token, or the response refusing it.
pub(super) async fn user_of(state: &AppState, headers: &HeaderMap) -> Result<Arc<str>, Response> {
    let Some(token) = super::ws::header_token(headers) else {
        return Err(error_response(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "send Authorization: Bearer <token>",
        ));
    };
    state
        .auth
        .verify(token)
        .await
        .map(|identity| identity.user)
        .map_err(|e| error_response(StatusCode::UNAUTHORIZED, e.code(), &e.to_string()))
}

/// `GET /api/devices`: the caller's own devices (never another user's), with the position
/// each acknowledged and how many notifications it still owes an acknowledgement for.
pub async fn devices(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let user = match user_of(&state, &headers).await {
        Ok(user) => user,
        Err(refused) => return refused,
    };
    let bus = state.hub.bus();
    let devices = match bus.devices(&user, state.config.device_ttl).await {
        Ok(d) => d,
        Err(e) => {
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                &e.to_string(),
            );
        }
    };
    let mut out = Vec::with_capacity(devices.len());
    for (name, record) in devices {
        let owes = bus.owed(&user, &name).await.map(|o| o.len()).unwrap_or(0);
        let at = |ms: i64| {
            chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        };
        out.push(serde_json::json!({
            "device": name,
            "first_seen": at(record.first_seen_ms),
            "last_seen": at(record.last_seen_ms),
            "acknowledged_position": record.acked,
            "owes": owes,
        }));
    }
    axum::Json(serde_json::json!({"user": &*user, "devices": out})).into_response()
}

/// `DELETE /api/devices/{device}`: forgets one of the caller's devices.
pub async fn forget_device(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(device): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    let user = match user_of(&state, &headers).await {
        Ok(user) => user,
        Err(refused) => return refused,
    };
    match state.hub.bus().forget_device(&user, &device).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => error_response(
            StatusCode::NOT_FOUND,
            "unknown-device",
            &format!("{user} has no device {device:?}"),
        ),
        Err(e) => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            &e.to_string(),
        ),
    }
}

/// A request body of at most [`MAX_BODY`], as `T`; or the response refusing it.
fn json_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, Box<Response>> {
    let body = match body {
        Ok(body) if body.len() <= MAX_BODY => body,
        Ok(_) => return Err(Box::new(too_large())),
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => return Err(Box::new(too_large())),
        Err(e) => {
            return Err(Box::new(error_response(
                StatusCode::BAD_REQUEST,
                "bad-notification",
                &e.body_text(),
            )));
        }
    };
    serde_json::from_slice(&body).map_err(|e| {
        Box::new(error_response(
            StatusCode::BAD_REQUEST,
            "bad-notification",
            &e.to_string(),
        ))
    })
}

fn too_large() -> Response {
    error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too-large",
        &format!("a notification request is at most {} KiB", MAX_BODY / 1024),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_tokens_are_named_long_and_matched_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admins");
        let long = "a".repeat(40);
        std::fs::write(
            &path,
            format!("# operators\nops:{long}\n{}\n", "b".repeat(32)),
        )
        .unwrap();
        let admins = AdminTokens::load(&path).unwrap();
        assert_eq!(admins.admin_of(&long).as_deref(), Some("ops"));
        assert_eq!(admins.admin_of(&"b".repeat(32)).as_deref(), Some("admin-3"));
        assert_eq!(admins.admin_of(&"a".repeat(39)), None);
        assert_eq!(admins.admin_of(&format!("{long}x")), None);
        std::fs::write(&path, "short-token\n").unwrap();
        assert!(
            AdminTokens::load(&path)
                .unwrap_err()
                .contains("at least 32 bytes")
        );
        std::fs::write(&path, "\n# nothing\n").unwrap();
        assert!(
            AdminTokens::load(&path)
                .unwrap_err()
                .contains("holds no token")
        );
    }
}
