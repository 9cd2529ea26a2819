//! `GET /sse`: the same stream as Server-Sent Events, for clients that only listen.
//!
//! Each message becomes `id:` (its position), `event:` (the message type) and `data:` (the
//! user message). Watches come from `?watch=<space_id>:<path>` (repeatable). A keep-alive comment
//! goes out while idle so proxies keep the connection open.
//!
//! Resume: the `Last-Event-ID` header (what a browser sends when it reconnects by itself) or
//! `?since=` (a first connect cannot set headers); the header wins. The stream opens with a
//! `ready` event whose `id:` is the starting position, so a client that received nothing yet
//! still resumes from there; a resume is answered by a `resumed` event before the replay. A slow client's stream ends with
//! an `error` event holding its last position; on shutdown, with a `retry:` spread out over
//! `--drain-spread`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use tokio::time::{Instant, sleep_until};

use std::time::Duration;

use super::AppState;
use super::digest::Digest;
use super::hub::{Hub, RegisterError, Registration};
use super::resume::{self, Admit, Cursor, Resumed};
use super::session::{Frame, Next, SharedFrame, Watches};
use crate::path::SpacePath;

/// Which SSE protocol a stream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// foldercast's own: `ready`, `resumed`, `error`, `reconnect` events, message types as names.
    Foldercast,
    /// oCIS's, for ownCloud Web ([`super::ocis_sse`]): its event names and payloads only.
    Ocis,
}

pub async fn handler(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    serve(state, headers, query, Dialect::Foldercast).await
}

/// `GET /ocs/v2.php/apps/notifications/api/v1/notifications/sse`: ownCloud Web's stream.
pub async fn ocis_handler(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    serve(state, headers, query, Dialect::Ocis).await
}

async fn serve(
    state: Arc<AppState>,
    headers: HeaderMap,
    query: Option<String>,
    dialect: Dialect,
) -> Response {
    let mut ticket = None;
    let mut since = None;
    let mut device = None;
    let mut digest = None;
    let mut watches = Watches::default();
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*key {
            "ticket" => ticket = Some(value.into_owned()),
            "since" => since = Some(value.into_owned()),
            "device" => match super::protocol::check_device(value.into_owned()) {
                Ok(d) => device = Some(d),
                Err(e) => {
                    return super::error_response(StatusCode::BAD_REQUEST, e.code, &e.message);
                }
            },
            "digest" => match super::digest::parse_window(&value, state.config.max_digest) {
                Ok(window) => digest = Some(Box::new(Digest::new(window))),
                Err(message) => {
                    return super::error_response(StatusCode::BAD_REQUEST, "bad-digest", &message);
                }
            },
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
            state.hub.stats.count_auth_failure(e.code());
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
    let registration = match state
        .hub
        .register(identity.user.clone(), super::hub::Transport::Sse)
        .await
    {
        Ok(r) => r,
        Err(e @ RegisterError::TooManyConnections(_)) => {
            return super::error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-connections",
                &e.to_string(),
            );
        }
        Err(e) => {
            return super::error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                &e.to_string(),
            );
        }
    };
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_owned);
    let since = last_event_id.or(since);
    // A device that gives no position resumes where it last acknowledged.
    let device_name = device
        .clone()
        .unwrap_or_else(|| super::protocol::DEFAULT_DEVICE.to_owned());
    let since = match &device {
        Some(_) => match state
            .hub
            .bus()
            .device_seen(&identity.user, &device_name, state.config.device_ttl)
            .await
        {
            Ok(record) => since.or(record.acked),
            Err(_) => since,
        },
        None => since,
    };
    // Attached first (the registration), then the history read: nothing falls in between.
    let start = match resume::start(
        &state.hub,
        &identity.user,
        since.as_deref(),
        state.config.resume_max,
    )
    .await
    {
        Ok(start) => start,
        Err(e) => {
            return super::error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                &e.to_string(),
            );
        }
    };
    let mut intro = VecDeque::new();
    intro.push_back(Event::default().comment(format!("ready {}", identity.user)));
    // `ready` with its id: the browser's last event id is the starting position from here on,
    // and a script reads it from the data. (ownCloud Web knows none of foldercast's own events:
    // in oCIS's dialect, only the messages' ids carry the position.)
    let position = start.cursor.position();
    if dialect == Dialect::Foldercast {
        intro.push_back(
            Event::default()
                .event("ready")
                .id(&position)
                .data(super::protocol::ready_frame(&identity.user, &position)),
        );
    }
    if let Some(resumed) = start
        .resumed
        .as_ref()
        .filter(|_| dialect == Dialect::Foldercast)
    {
        let replayed = start.replay.iter().filter(|f| f.passes(&watches)).count();
        let mut event = Event::default()
            .event("resumed")
            .data(resumed.frame(replayed));
        if !resumed.recovered {
            // The client refetches: its next reconnect starts from the top.
            event = event.id(&resumed.position);
        }
        intro.push_back(event);
    }
    if dialect == Dialect::Foldercast {
        // What this device still owes an acknowledgement for (`POST
        // /api/notifications/{id}/ack`): on every connect until it does.
        let device = device.as_deref().unwrap_or(super::protocol::DEFAULT_DEVICE);
        match state.hub.bus().owed(&identity.user, device).await {
            Ok(owed) => {
                for payload in owed {
                    if let Ok(text) = std::str::from_utf8(&payload) {
                        intro.push_back(Event::default().event("notification").data(text));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(user = %identity.user, error = %e, "owed notifications unreadable; they come next time");
            }
        }
        if let Some(scheduler) = state.downtimes.get() {
            for text in scheduler.current_for(&identity.user).await {
                intro.push_back(Event::default().event("notification").data(text));
            }
        }
    }
    registration.set_watching(&watches);
    let feed = Feed {
        registration,
        watches,
        pending: start.replay.into(),
        batch: Vec::new(),
        cursor: start.cursor,
        intro,
        expiry: identity.remaining().map(|d| Instant::now() + d),
        drain_spread: state.config.drain_spread,
        hub: state.hub.clone(),
        user: identity.user.clone(),
        resume_max: state.config.resume_max,
        done: false,
        dialect,
        digest,
    };
    Sse::new(events(feed))
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
    pending: VecDeque<SharedFrame>,
    batch: Vec<SharedFrame>,
    cursor: Cursor,
    /// Sent before any frame: the ready comment, the starting position, the resume outcome.
    intro: VecDeque<Event>,
    expiry: Option<Instant>,
    drain_spread: Duration,
    hub: Arc<Hub>,
    user: Arc<str>,
    resume_max: usize,
    done: bool,
    dialect: Dialect,
    /// The connection's digest window, if it asked for one (`digest.rs`).
    digest: Option<Box<Digest>>,
}

impl Feed {
    /// The events of one frame in this stream's dialect: the first to send now, the rest
    /// queued in `intro` (a coalesced message is several events in oCIS's dialect).
    fn render(&mut self, frame: &Frame) -> Option<Event> {
        match self.dialect {
            Dialect::Foldercast => to_event(frame),
            Dialect::Ocis => {
                let mut events = super::ocis_sse::translate(frame.payload(), &self.user)
                    .into_iter()
                    .map(|(name, data)| Event::default().id(frame.id()).event(name).data(data));
                let first = events.next();
                self.intro.extend(events);
                first
            }
        }
    }

    /// A frame to send (admitted, passing the watches), through the digest window if there is
    /// one: the first event to send now, the rest queued in `intro` (empty when this is called).
    fn emit(&mut self, frame: SharedFrame) -> Option<Event> {
        let Some(digest) = self.digest.as_mut() else {
            return self.render(&frame);
        };
        let mut out = Vec::new();
        digest.offer(frame, Instant::now(), &mut out);
        self.render_all(out);
        self.intro.pop_front()
    }

    /// Renders `frames` in order onto the end of `intro`.
    fn render_all(&mut self, frames: Vec<SharedFrame>) {
        for frame in frames {
            let at = self.intro.len();
            if let Some(first) = self.render(&frame) {
                self.intro.insert(at, first);
            }
        }
    }

    /// Queues what the digest window holds.
    fn release_held(&mut self) {
        let mut out = Vec::new();
        if let Some(digest) = self.digest.as_mut() {
            digest.flush(&mut out);
        }
        self.render_all(out);
    }

    /// Ends the stream with `event` (silently in oCIS's dialect: its client reconnects), after
    /// what the digest window holds.
    fn end_with(&mut self, event: Event) -> Option<Event> {
        self.done = true;
        self.release_held();
        if self.dialect == Dialect::Foldercast {
            self.intro.push_back(event);
        }
        self.intro.pop_front()
    }
}

fn error_event(code: &str, message: &str, position: &str) -> Event {
    Event::default()
        .event("error")
        .data(super::protocol::error_frame_at(code, message, position))
}

fn events(feed: Feed) -> impl Stream<Item = Result<Event, Infallible>> {
    stream::unfold(feed, move |mut feed| async move {
        // What is queued goes out even after the end was decided (it comes before the end).
        if let Some(event) = feed.intro.pop_front() {
            return Some((Ok(event), feed));
        }
        if feed.done {
            return None;
        }
        loop {
            while let Some(frame) = feed.pending.pop_front() {
                match feed.cursor.admit(frame.id()) {
                    Admit::Deliver if frame.passes(&feed.watches) => {
                        if let Some(event) = feed.emit(frame) {
                            return Some((Ok(event), feed));
                        }
                    }
                    Admit::Deliver | Admit::Duplicate => {}
                    Admit::NewEpoch if feed.dialect == Dialect::Ocis => {
                        // oCIS's dialect cannot say "the history was lost" (ownCloud Web's only
                        // refetch is per space): the frame goes on as it is.
                        if frame.passes(&feed.watches)
                            && let Some(event) = feed.emit(frame)
                        {
                            return Some((Ok(event), feed));
                        }
                    }
                    Admit::NewEpoch => {
                        // What a digest holds is of the old history: it goes first.
                        feed.release_held();
                        let lost = Resumed::epoch_lost(frame.id());
                        let event = Event::default()
                            .event("resumed")
                            .id(&lost.position)
                            .data(lost.frame(0));
                        feed.intro.push_back(event);
                        if frame.passes(&feed.watches)
                            && let Some(next) = to_event(&frame)
                        {
                            feed.intro.push_back(next);
                        }
                        if let Some(event) = feed.intro.pop_front() {
                            return Some((Ok(event), feed));
                        }
                    }
                }
            }
            let expiry = feed.expiry;
            let digest_due = feed.digest.as_ref().and_then(|d| d.due());
            let next = tokio::select! {
                next = feed.registration.queue.next_batch(&mut feed.batch) => next,
                _ = sleep_until(digest_due.unwrap_or_else(Instant::now)), if digest_due.is_some() => {
                    feed.release_held();
                    if let Some(event) = feed.intro.pop_front() {
                        return Some((Ok(event), feed));
                    }
                    continue;
                }
                _ = sleep_until(expiry.unwrap_or_else(Instant::now)), if expiry.is_some() => {
                    let e = error_event("token-expired", "the token expired", &feed.cursor.position());
                    return feed.end_with(e).map(|e| (Ok(e), feed));
                }
            };
            if next == Next::CatchUp {
                // The live feed had a gap: what was missed first, from the history.
                let user = feed.user.clone();
                match resume::after_gap(&feed.hub, &user, &mut feed.cursor, feed.resume_max).await {
                    Ok((told, replay)) => {
                        if let Some(told) = told.filter(|_| feed.dialect == Dialect::Foldercast) {
                            feed.intro.push_back(
                                Event::default()
                                    .event("resumed")
                                    .id(&told.position)
                                    .data(told.frame(0)),
                            );
                        }
                        // Ahead of anything still queued, which the cursor then drops.
                        for frame in replay.into_iter().rev() {
                            feed.pending.push_front(frame);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%user, error = %e, "catch-up after a gap failed; retrying");
                        let queue = feed.registration.queue.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            queue.catch_up_again();
                        });
                    }
                }
                if let Some(event) = feed.intro.pop_front() {
                    return Some((Ok(event), feed));
                }
                continue;
            }
            if next == Next::Drain {
                let after = Duration::from_millis(super::ws::spread_ms(feed.drain_spread));
                let e = Event::default()
                    .event("reconnect")
                    .retry(after.max(Duration::from_millis(1)))
                    .data(super::protocol::reconnect_frame(
                        &feed.cursor.position(),
                        after.as_millis() as u64,
                    ));
                return feed.end_with(e).map(|e| (Ok(e), feed));
            }
            if next == Next::Evicted {
                let e = error_event(
                    "slow-consumer",
                    "the client did not read fast enough; resume from position",
                    &feed.cursor.position(),
                );
                return feed.end_with(e).map(|e| (Ok(e), feed));
            }
            feed.pending.extend(feed.batch.drain(..));
        }
    })
}

fn to_event(frame: &Frame) -> Option<Event> {
    let data = std::str::from_utf8(frame.payload()).ok()?;
    if data.contains(['\r', '\n']) || frame.message_type.contains(['\r', '\n']) {
        return None; // not a compact JSON document; SSE framing would break
    }
    Some(
        Event::default()
            .id(frame.id())
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
