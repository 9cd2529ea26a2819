//! `GET /sse`: the same stream as Server-Sent Events, for clients that only listen.
//!
//! Each message becomes `id:` (the per-user id), `event:` (the message type) and `data:` (the
//! user message). Watches come from `?watch=<space_id>:<path>` (repeatable). A keep-alive comment
//! goes out while idle so proxies keep the connection open.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use tokio::time::{Instant, sleep_until};

use super::AppState;
use super::auth::Identity;
use super::hub::Registration;
use super::session::{Frame, Watches};
use crate::path::SpacePath;

pub async fn handler(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let mut ticket = None;
    let mut watches = Watches::default();
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*key {
            "ticket" => ticket = Some(value.into_owned()),
            "watch" => {
                let added = parse_watch(&value).and_then(|(space, path)| watches.add(&space, path));
                if let Err(e) = added {
                    return super::error_response(StatusCode::BAD_REQUEST, e.code, &e.message);
                }
            }
            _ => {}
        }
    }
    let identity = match super::credentials(&state, &headers, ticket.as_deref()).await {
        Some(Ok(identity)) => identity,
        Some(Err(e)) => {
            state
                .hub
                .stats
                .auth_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return super::error_response(StatusCode::UNAUTHORIZED, e.code(), &e.to_string());
        }
        None => {
            return super::error_response(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "send a bearer token or a ticket",
            );
        }
    };
    let registration = match state.hub.register(identity.user.clone()).await {
        Ok(r) => r,
        Err(e) => {
            return super::error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                &e.to_string(),
            );
        }
    };
    Sse::new(events(registration, identity, watches))
        .keep_alive(
            KeepAlive::new()
                .interval(state.config.sse_keepalive)
                .text("keep-alive"),
        )
        .into_response()
}

/// `space_id:path`, split at the first colon (space ids contain `$` and `!`, never `:`).
fn parse_watch(value: &str) -> Result<(String, SpacePath), super::protocol::FrameError> {
    let bad = |m: String| super::protocol::FrameError::new("bad-watch", m);
    let (space, path) = value
        .split_once(':')
        .ok_or_else(|| bad(format!("watch {value:?} is not <space_id>:<path>")))?;
    if space.is_empty() {
        return Err(bad("watch needs a space id".into()));
    }
    let path = SpacePath::parse(path).map_err(|e| bad(format!("watch path {path:?}: {e}")))?;
    Ok((space.to_owned(), path))
}

struct Feed {
    registration: Registration,
    watches: Watches,
    pending: VecDeque<Arc<Frame>>,
    batch: Vec<Arc<Frame>>,
    expiry: Option<Instant>,
    greeted: bool,
    done: bool,
}

fn events(
    registration: Registration,
    identity: Identity,
    watches: Watches,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let feed = Feed {
        registration,
        watches,
        pending: VecDeque::new(),
        batch: Vec::new(),
        expiry: identity.remaining().map(|d| Instant::now() + d),
        greeted: false,
        done: false,
    };
    let user = identity.user;
    stream::unfold(feed, move |mut feed| {
        let user = user.clone();
        async move {
            if feed.done {
                return None;
            }
            if !feed.greeted {
                feed.greeted = true;
                return Some((Ok(Event::default().comment(format!("ready {user}"))), feed));
            }
            loop {
                while let Some(frame) = feed.pending.pop_front() {
                    if frame.passes(&feed.watches)
                        && let Some(event) = to_event(&frame)
                    {
                        return Some((Ok(event), feed));
                    }
                }
                let expiry = feed.expiry;
                let alive = tokio::select! {
                    alive = feed.registration.queue.next_batch(&mut feed.batch) => alive,
                    _ = sleep_until(expiry.unwrap_or_else(Instant::now)), if expiry.is_some() => {
                        feed.done = true;
                        let e = Event::default().event("error").data(super::protocol::error_frame("token-expired", "the token expired"));
                        return Some((Ok(e), feed));
                    }
                };
                if !alive {
                    feed.done = true;
                    let e = Event::default()
                        .event("error")
                        .data(super::protocol::error_frame(
                            "slow-consumer",
                            "the client did not read fast enough",
                        ));
                    return Some((Ok(e), feed));
                }
                feed.pending.extend(feed.batch.drain(..));
            }
        }
    })
}

fn to_event(frame: &Frame) -> Option<Event> {
    let data = std::str::from_utf8(&frame.payload).ok()?;
    if data.contains(['\r', '\n']) || frame.message_type.contains(['\r', '\n']) {
        return None; // not a compact JSON document; SSE framing would break
    }
    Some(
        Event::default()
            .id(&*frame.id)
            .event(&*frame.message_type)
            .data(data),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_watch_params() {
        let (s, p) = parse_watch("s-eng:/f1/f2").unwrap();
        assert_eq!((s.as_str(), p.as_str()), ("s-eng", "/f1/f2"));
        let (s, p) = parse_watch("st$sp:/a:b").unwrap();
        assert_eq!((s.as_str(), p.as_str()), ("st$sp", "/a:b"));
        assert!(parse_watch("nocolon").is_err());
        assert!(parse_watch(":/a").is_err());
        assert!(parse_watch("s:a/b").is_err());
    }
}
