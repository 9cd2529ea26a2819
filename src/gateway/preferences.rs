//! `GET`/`PUT /api/preferences`: a user reads and replaces their own preferences (muted spaces,
//! wanted message types; `crate::preferences`). Never another user's: the user is the token's.
//!
//! The consumer applies them before publishing; a change takes effect within its
//! `--preferences-ttl` (at once in the embedded default, whose consumer shares this process).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{AppState, error_response};
use crate::preferences::{CHOOSABLE_TYPES, Preferences};

/// The answer to both routes: the user's preferences and what may be chosen.
fn answer(user: &str, prefs: &Preferences) -> Response {
    Json(serde_json::json!({
        "user": user,
        "muted_spaces": prefs.muted_spaces,
        "types": prefs.types,
        "choosable_types": CHOOSABLE_TYPES,
    }))
    .into_response()
}

fn unavailable(e: impl std::fmt::Display) -> Response {
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        &e.to_string(),
    )
}

pub async fn get(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let user = match super::notices::user_of(&state, &headers).await {
        Ok(user) => user,
        Err(refused) => return refused,
    };
    let stored = match state
        .hub
        .bus()
        .preferences(std::slice::from_ref(&user))
        .await
    {
        Ok(mut stored) => stored.pop().flatten(),
        Err(e) => return unavailable(e),
    };
    let prefs = match stored.as_deref().map(|j| Preferences::parse(j.as_bytes())) {
        None => Preferences::default(),
        Some(Ok(p)) => p,
        // Stored by an older version, or by hand: shown as none, replaced by the next PUT.
        Some(Err(e)) => {
            tracing::warn!(%user, error = %e, "stored preferences unreadable; shown as none");
            Preferences::default()
        }
    };
    answer(&user, &prefs)
}

pub async fn put(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let user = match super::notices::user_of(&state, &headers).await {
        Ok(user) => user,
        Err(refused) => return refused,
    };
    // What GET answered may come back as it is: its `user` must be the caller, and the list of
    // choices is not part of the preferences.
    let body = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(serde_json::Value::Object(mut doc)) => {
            if let Some(named) = doc.remove("user")
                && named.as_str() != Some(&*user)
            {
                return error_response(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "a user sets their own preferences only",
                );
            }
            doc.remove("choosable_types");
            serde_json::Value::Object(doc).to_string().into_bytes()
        }
        _ => body.to_vec(),
    };
    let prefs = match Preferences::parse(&body) {
        Ok(p) => p,
        Err(message) => {
            return error_response(StatusCode::BAD_REQUEST, "bad-preferences", &message);
        }
    };
    // The default is stored as nothing: most users never set any.
    let json = match prefs.is_default() {
        true => None,
        false => match serde_json::to_string(&prefs) {
            Ok(json) => Some(json),
            Err(e) => return unavailable(e),
        },
    };
    if let Err(e) = state
        .hub
        .bus()
        .set_preferences(&user, json.as_deref())
        .await
    {
        return unavailable(e);
    }
    if let Some(filter) = state.preferences.get() {
        filter.forget(&user);
    }
    tracing::info!(%user, muted_spaces = prefs.muted_spaces.len(), types = ?prefs.types, "preferences changed");
    answer(&user, &prefs)
}
