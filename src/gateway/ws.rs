//! `GET /ws`: the WebSocket transport.
//!
//! One task per connection, socket not split: it selects over the client's frames, the session
//! queue and the token's expiry. Queued frames are written without flushing and flushed once per
//! batch, which is what makes bursts cheap. A write that cannot complete within the write
//! timeout ends the connection, like a full queue does.
//!
//! A connection may resume (`?since=` on the upgrade, `since` in the auth frame, or a `resume`
//! frame before anything was delivered): see `resume.rs`. Every frame passes the connection's
//! [`Cursor`], so a frame it already sent is never sent again. An evicted connection is told its
//! last position; on shutdown each one is told to reconnect after a spread-out delay.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use futures_util::{FutureExt, SinkExt};
use serde::Deserialize;
use tokio::time::{Instant, sleep_until};

use super::AppState;
use super::auth::{AuthError, Identity, bearer};
use super::digest::Digest;
use super::hub::{GatewayStats, RegisterError};
use super::protocol::{
    ClientFrame, FrameError, PONG_FRAME, error_frame, error_frame_at, parse_client_frame,
    ready_frame, reconnect_frame,
};
use super::resume::{self, Admit, Cursor, Resumed, Start};
use super::session::{Next, SharedFrame, Watches};

/// Close codes (RFC 6455 §7.4.1): 1001 going away (no answer to pings), 1002 protocol error,
/// 1007 invalid payload (not UTF-8), 1008 policy violation (auth), 1009 message too big, 1011
/// server error, 1013 try again later (evicted).
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_PROTOCOL: u16 = 1002;
const CLOSE_INVALID_PAYLOAD: u16 = 1007;
const CLOSE_POLICY: u16 = 1008;
const CLOSE_TOO_BIG: u16 = 1009;
const CLOSE_ERROR: u16 = 1011;
const CLOSE_TRY_LATER: u16 = 1013;

#[derive(Deserialize)]
pub struct WsQuery {
    ticket: Option<String>,
    /// A position to resume from (`<epoch>:<id>`).
    since: Option<String>,
    /// The client's name for its device: what it owes acknowledgements as.
    device: Option<String>,
    /// A digest window in seconds (`digest.rs`).
    digest: Option<String>,
}

pub async fn handler(
    ws: WebSocketUpgrade,
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<WsQuery>,
) -> Response {
    let pre_auth = super::credentials(&state, &headers, query.ticket.as_deref()).await;
    let cfg = &state.config;
    ws.read_buffer_size(cfg.ws_read_buffer)
        .write_buffer_size(cfg.ws_write_buffer)
        .max_write_buffer_size(cfg.ws_max_write_buffer)
        .max_message_size(cfg.max_client_frame)
        .max_frame_size(cfg.max_client_frame)
        .on_upgrade(move |socket| {
            session(
                socket,
                state,
                pre_auth,
                query.since,
                query.device,
                query.digest,
            )
        })
}

/// What became of writing frames to the socket.
enum Written {
    Ok,
    Failed,
}

/// Feeds one frame through the connection's digest window.
async fn feed_digested(
    socket: &mut WebSocket,
    digest: &mut Digest,
    frame: SharedFrame,
) -> Result<(), axum::Error> {
    let mut out = Vec::new();
    digest.offer(frame, Instant::now(), &mut out);
    for frame in out {
        socket.feed(Message::Text(frame.ws_text())).await?;
    }
    Ok(())
}

/// Feeds what the digest window holds (nothing without one).
async fn feed_held(socket: &mut WebSocket, digest: Option<&mut Digest>) -> Result<(), axum::Error> {
    let mut out = Vec::new();
    if let Some(digest) = digest {
        digest.flush(&mut out);
    }
    for frame in out {
        socket.feed(Message::Text(frame.ws_text())).await?;
    }
    Ok(())
}

/// A frame of a new epoch: what a digest holds (of the old history) first, then the `resumed`
/// frame saying the history was lost, then the frame.
async fn feed_new_epoch(
    socket: &mut WebSocket,
    mut digest: Option<&mut Digest>,
    frame: SharedFrame,
    watches: &Watches,
) -> Result<(), axum::Error> {
    feed_held(socket, digest.as_deref_mut()).await?;
    let lost = Resumed::epoch_lost(frame.id());
    socket.feed(Message::Text(lost.frame(0).into())).await?;
    if !frame.passes(watches) {
        return Ok(());
    }
    match digest {
        None => socket.feed(Message::Text(frame.ws_text())).await,
        Some(digest) => feed_digested(socket, digest, frame).await,
    }
}

/// Writes the frames that the cursor admits and the watches pass (a digest window may hold
/// them), then flushes once. A frame of a new epoch is replaced by a `resumed` frame that
/// says the history was lost.
///
/// Its future is part of every connection's task: the common case is fed right here, the rest
/// is boxed (a digest window, a new epoch), and the deadline is a future of its own (see
/// [`write_within`]). Together they took the session's future from 3,192 to 2,696 bytes.
fn write_frames<'a>(
    socket: &'a mut WebSocket,
    frames: &'a mut Vec<SharedFrame>,
    watches: &'a Watches,
    cursor: &'a mut Cursor,
    limit: Duration,
    user: &'a str,
    mut digest: Option<&'a mut Digest>,
) -> WithinLimit<impl std::future::Future<Output = Result<(), axum::Error>> + 'a> {
    let write = async move {
        for frame in frames.drain(..) {
            match cursor.admit(frame.id()) {
                Admit::Deliver if frame.passes(watches) => match digest.as_deref_mut() {
                    None => socket.feed(Message::Text(frame.ws_text())).await?,
                    Some(digest) => Box::pin(feed_digested(socket, digest, frame)).await?,
                },
                Admit::Deliver | Admit::Duplicate => {}
                Admit::NewEpoch => {
                    tracing::warn!(%user, position = %frame.id(), "history lost while connected: told the client");
                    Box::pin(feed_new_epoch(
                        socket,
                        digest.as_deref_mut(),
                        frame,
                        watches,
                    ))
                    .await?;
                }
            }
        }
        socket.flush().await
    };
    write_within(limit, write)
}

/// Sends what the digest window holds now.
async fn flush_digest(
    socket: &mut WebSocket,
    digest: Option<&mut Digest>,
    limit: Duration,
    user: &str,
) -> Written {
    let write = async {
        feed_held(socket, digest).await?;
        socket.flush().await
    };
    written(limit, user, write_within(limit, write).await)
}

/// What a write within `limit` came to. Takes the result, not the write: an async fn holding
/// the write's future as a parameter would store it twice in every connection's task.
fn written(
    limit: Duration,
    user: &str,
    result: Result<Result<(), axum::Error>, TimedOut>,
) -> Written {
    match result {
        Ok(Ok(())) => Written::Ok,
        Ok(Err(e)) => {
            tracing::debug!(%user, error = %e, "write failed; closing");
            Written::Failed
        }
        Err(TimedOut) => {
            tracing::info!(%user, timeout = ?limit, "write timed out; closing");
            Written::Failed
        }
    }
}

/// Sends the `resumed` frame and the replay that follows it.
async fn send_resumed(
    socket: &mut WebSocket,
    start: Start,
    watches: &Watches,
    cursor: &mut Cursor,
    limit: Duration,
    user: &str,
) -> Written {
    let Start {
        resumed,
        mut replay,
        ..
    } = start;
    // A replay is what the client missed: it goes out now, not after a digest window.
    if let Some(resumed) = resumed {
        let replayed = replay.iter().filter(|f| f.passes(watches)).count();
        if socket
            .feed(Message::Text(resumed.frame(replayed).into()))
            .await
            .is_err()
        {
            return Written::Failed;
        }
    }
    let result = write_frames(socket, &mut replay, watches, cursor, limit, user, None).await;
    written(limit, user, result)
}

async fn session(
    mut socket: WebSocket,
    state: Arc<AppState>,
    pre_auth: Option<Result<Identity, AuthError>>,
    query_since: Option<String>,
    query_device: Option<String>,
    query_digest: Option<String>,
) {
    let (identity, auth_since, auth_device) = match pre_auth {
        Some(Ok(identity)) => (identity, None, None),
        Some(Err(e)) => {
            state.hub.stats.count_auth_failure(e.code());
            close_with(
                &state.hub.stats,
                &mut socket,
                e.code(),
                &e.to_string(),
                CLOSE_POLICY,
            )
            .await;
            return;
        }
        // Boxed: most clients authenticate on the upgrade, and this wait's state (timers, the
        // verification) would otherwise be part of every connection's task.
        None => match Box::pin(await_auth_frame(&mut socket, &state)).await {
            Some(authed) => authed,
            None => return,
        },
    };
    // The auth frame's position wins over the query's: it is the later, explicit word.
    let since = auth_since.or(query_since);
    let named_device = auth_device.is_some() || query_device.is_some();
    let device = match auth_device
        .or(query_device)
        .map(super::protocol::check_device)
    {
        None => super::protocol::DEFAULT_DEVICE.to_owned(),
        Some(Ok(device)) => device,
        Some(Err(e)) => {
            close_with(
                &state.hub.stats,
                &mut socket,
                e.code,
                &e.message,
                CLOSE_POLICY,
            )
            .await;
            return;
        }
    };
    // Boxed: most connections have none, and an idle connection's task stays small.
    let mut digest = match query_digest
        .as_deref()
        .map(|v| super::digest::parse_window(v, state.config.max_digest))
    {
        None => None,
        Some(Ok(window)) => Some(Box::new(Digest::new(window))),
        Some(Err(message)) => {
            close_with(
                &state.hub.stats,
                &mut socket,
                "bad-digest",
                &message,
                CLOSE_POLICY,
            )
            .await;
            return;
        }
    };
    let registration = match state
        .hub
        .register(identity.user.clone(), super::hub::Transport::WebSocket)
        .await
    {
        Ok(r) => r,
        Err(e @ RegisterError::TooManyConnections(_)) => {
            close_with(
                &state.hub.stats,
                &mut socket,
                "too-many-connections",
                &e.to_string(),
                CLOSE_POLICY,
            )
            .await;
            return;
        }
        Err(e) => {
            close_with(
                &state.hub.stats,
                &mut socket,
                "unavailable",
                &e.to_string(),
                CLOSE_ERROR,
            )
            .await;
            return;
        }
    };
    // A named device that gives no position resumes where it last acknowledged (an unnamed
    // client keeps no device record: no bus round trip on its connects).
    let since = if named_device {
        match Box::pin(state.hub.bus().device_seen(
            &identity.user,
            &device,
            state.config.device_ttl,
        ))
        .await
        {
            Ok(record) => since.or(record.acked),
            Err(e) => {
                tracing::debug!(user = %identity.user, error = %e, "device not recorded");
                since
            }
        }
    } else {
        since
    };
    // Attached first (the registration), then the history read: nothing falls in between.
    let limit = state.config.resume_max;
    // Boxed, like the other rare awaits below: a future awaited inline makes every idle
    // connection's task as large as its largest state (session 3 measured 0.7 KB for one).
    let start = match Box::pin(resume::start(
        &state.hub,
        &identity.user,
        since.as_deref(),
        limit,
    ))
    .await
    {
        Ok(start) => start,
        Err(e) => {
            close_with(
                &state.hub.stats,
                &mut socket,
                "unavailable",
                &e.to_string(),
                CLOSE_ERROR,
            )
            .await;
            return;
        }
    };
    let mut cursor = start.cursor.clone();
    if send_text(&mut socket, ready_frame(&identity.user, &cursor.position()))
        .await
        .is_err()
    {
        return;
    }
    let write_timeout = state.config.write_timeout;
    let mut watches = Watches::default();
    let mut resumed = start.resumed.is_some();
    if let Written::Failed = Box::pin(send_resumed(
        &mut socket,
        start,
        &watches,
        &mut cursor,
        write_timeout,
        &identity.user,
    ))
    .await
    {
        return;
    }
    // What this device still owes an acknowledgement for, on every connect until it does.
    if Box::pin(send_owed(
        &mut socket,
        &state,
        &identity.user,
        &device,
        write_timeout,
    ))
    .await
    .is_err()
    {
        return;
    }

    let mut identity = identity;
    let mut expiry = identity.remaining().map(|d| Instant::now() + d);
    // Set once the token expired: deliveries pause until a fresh auth frame or the deadline.
    let mut expired = false;
    let ping_every = state.config.ping_interval;
    let mut next_ping = (!ping_every.is_zero()).then(|| Instant::now() + ping_every);
    let mut last_heard = Instant::now();
    // One timer for the token's expiry and the next ping, kept registered across iterations and
    // reset only when either moves: the loop runs once per delivered batch, and re-arming a
    // timer (or a wait-list entry) on every iteration would cost every message.
    let deadline = sleep_until(next_deadline(expiry, next_ping, None));
    tokio::pin!(deadline);
    let mut batch = Vec::new();
    let mut frame_budget = FrameBudget::new(state.config.max_frames_per_sec);
    loop {
        tokio::select! {
            incoming = socket.recv() => {
                last_heard = Instant::now();
                let text = match incoming {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Binary(_))) => {
                        let err = FrameError::new("bad-frame", "frames must be JSON text");
                        if send_within(&mut socket, err.to_frame(), write_timeout).await.is_err() { break }
                        continue;
                    }
                    Some(Err(e)) => {
                        Box::pin(refuse_unreadable(&state.hub.stats, &mut socket, &e, &identity.user, state.config.max_client_frame)).await;
                        break;
                    }
                    Some(Ok(Message::Close(_))) | None => break,
                    Some(Ok(_)) => continue, // ping/pong: answered by the library
                };
                if !frame_budget.take(Instant::now()) {
                    tracing::info!(user = %identity.user, "client frames over the rate; closing");
                    close_with(&state.hub.stats, &mut socket, "rate-limited", &frame_budget.describe(), CLOSE_POLICY).await;
                    Box::pin(linger(&mut socket)).await;
                    break;
                }
                let reply = match parse_client_frame(&text) {
                    Ok(ClientFrame::Ping) => Some(PONG_FRAME.to_owned()),
                    Ok(ClientFrame::Watch { space_id, path }) => {
                        let refused = watches.add(&space_id, path).err().map(|e| e.to_frame());
                        registration.set_watching(&watches);
                        refused
                    }
                    Ok(ClientFrame::Unwatch { space_id, path }) => {
                        watches.remove(space_id.as_deref(), path.as_ref());
                        registration.set_watching(&watches);
                        None
                    }
                    Ok(ClientFrame::Resume { since }) => {
                        if resumed || cursor.moved() {
                            Some(error_frame("resume-too-late", "resume before anything is delivered: send since on the upgrade (?since=) or in the auth frame"))
                        } else {
                            resumed = true;
                            match Box::pin(resume::start(&state.hub, &identity.user, Some(&since), limit)).await {
                                Ok(start) => {
                                    cursor = start.cursor.clone();
                                    if let Written::Failed = Box::pin(send_resumed(&mut socket, start, &watches, &mut cursor, write_timeout, &identity.user)).await {
                                        break;
                                    }
                                    None
                                }
                                Err(e) => Some(error_frame("unavailable", &e.to_string())),
                            }
                        }
                    }
                    Ok(ClientFrame::Ack { notification_id, position }) => {
                        if let Some(position) = position
                            && let Err(e) = state.hub.bus().device_acked(&identity.user, &device, &position, state.config.device_ttl).await
                        {
                            tracing::debug!(user = %identity.user, error = %e, "device position not recorded");
                        }
                        match notification_id {
                            Some(id) => Some(Box::pin(acknowledge(&state, &identity.user, &device, &id)).await),
                            None => None,
                        }
                    }
                    Ok(ClientFrame::Auth { token, .. }) => match state.auth.verify(&token).await {
                        // A fresh token for the same user extends the connection's life.
                        Ok(fresh) if fresh.user == identity.user => {
                            expiry = fresh.remaining().map(|d| Instant::now() + d);
                            identity = fresh;
                            expired = false;
                            deadline.as_mut().reset(next_deadline(expiry, next_ping, digest.as_ref().and_then(|d| d.due())));
                            None
                        }
                        Ok(_) => Some(error_frame("user-mismatch", "a connection cannot change its user")),
                        Err(e) => Some(error_frame(e.code(), &e.to_string())),
                    },
                    Err(e) => Some(e.to_frame()),
                };
                // Replies (pongs, errors) are writes like any other: a client that sends but
                // never reads must not hold the task past the write timeout.
                if let Some(reply) = reply
                    && send_within(&mut socket, reply, write_timeout).await.is_err()
                {
                    break;
                }
            }
            next = registration.queue.next_batch(&mut batch), if !expired => {
                if next == Next::CatchUp {
                    // The live feed had a gap: what was missed first, from the history.
                    match Box::pin(resume::after_gap(&state.hub, &identity.user, &mut cursor, limit)).await {
                        Ok((told, mut replay)) => {
                            if let Some(told) = told
                                && send_within(&mut socket, told.frame(0), write_timeout).await.is_err()
                            {
                                break;
                            }
                            let result = Box::pin(write_frames(&mut socket, &mut replay, &watches, &mut cursor, write_timeout, &identity.user, digest.as_deref_mut())).await;
                            if let Written::Failed = written(write_timeout, &identity.user, result) {
                                break;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(user = %identity.user, error = %e, "catch-up after a gap failed; retrying");
                            let queue = registration.queue.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(Duration::from_millis(500)).await;
                                queue.catch_up_again();
                            });
                        }
                    }
                    continue;
                }
                if digest.is_some() {
                    // Held changes go out before the client is told where to resume from.
                    if matches!(next, Next::Drain | Next::Evicted)
                        && let Written::Failed = Box::pin(flush_digest(&mut socket, digest.as_deref_mut(), write_timeout, &identity.user)).await
                    {
                        break;
                    }
                }
                if next == Next::Drain {
                    state.hub.stats.count_close("shutting-down");
                    let after_ms = spread_ms(state.config.drain_spread);
                    let told = async {
                        socket.send(Message::Text(reconnect_frame(&cursor.position(), after_ms).into())).await?;
                        socket.send(Message::Close(Some(CloseFrame {
                            code: CLOSE_GOING_AWAY,
                            reason: Utf8Bytes::from_static("shutting-down: reconnect and resume"),
                        }))).await
                    };
                    let _ = Box::pin(tokio::time::timeout(Duration::from_secs(1), told)).await;
                    break;
                }
                if next == Next::Evicted {
                    tracing::info!(user = %identity.user, position = %cursor.position(), "slow client evicted");
                    let message = "the client did not read fast enough; resume from position";
                    state.hub.stats.count_close("slow-consumer");
                    let frame = error_frame_at("slow-consumer", message, &cursor.position());
                    Box::pin(close_after(&mut socket, frame, "slow-consumer", message, CLOSE_TRY_LATER)).await;
                    break;
                }
                let result = write_frames(&mut socket, &mut batch, &watches, &mut cursor, write_timeout, &identity.user, digest.as_deref_mut()).await;
                if let Written::Failed = written(write_timeout, &identity.user, result) {
                    break;
                }
                // A digest window that just started holding: wake when it is due.
                if let Some(due) = digest.as_ref().and_then(|d| d.due())
                    && due < deadline.deadline()
                {
                    deadline.as_mut().reset(due);
                }
            }
            () = &mut deadline => {
                let now = Instant::now();
                if digest.as_ref().and_then(|d| d.due()).is_some_and(|at| now >= at)
                    && let Written::Failed = Box::pin(flush_digest(&mut socket, digest.as_deref_mut(), write_timeout, &identity.user)).await
                {
                    break;
                }
                if expiry.is_some_and(|at| now >= at) {
                    if expired {
                        state.hub.stats.count_close("token-expired");
                        let close = socket.send(Message::Close(Some(CloseFrame {
                            code: CLOSE_POLICY,
                            reason: Utf8Bytes::from(close_reason("token-expired", "no fresh auth frame in time")),
                        })));
                        let _ = Box::pin(tokio::time::timeout(Duration::from_secs(1), close)).await;
                        break;
                    }
                    // Told, not yet dropped: a fresh auth frame within the grace keeps the
                    // connection (and the messages queued meanwhile).
                    expired = true;
                    let grace = state.config.token_grace;
                    expiry = Some(now + grace);
                    let message = format!(
                        "the token expired; send a fresh auth frame within {}s or the connection closes",
                        grace.as_secs_f32()
                    );
                    if send_within(&mut socket, error_frame("token-expired", &message), write_timeout).await.is_err() {
                        break;
                    }
                }
                if next_ping.is_some_and(|at| now >= at) {
                    // Silent for two intervals: a vanished client (a dropped mobile link leaves
                    // the TCP connection half-open), not a slow one.
                    if last_heard.elapsed() > ping_every * 2 {
                        tracing::info!(user = %identity.user, "no answer to pings; closing");
                        close_with(&state.hub.stats, &mut socket, "ping-timeout", "no answer to pings", CLOSE_GOING_AWAY).await;
                        break;
                    }
                    let ping = write_within(write_timeout, socket.send(Message::Ping(Default::default())));
                    if !matches!(ping.await, Ok(Ok(()))) {
                        break;
                    }
                    next_ping = Some(now + ping_every);
                }
                deadline.as_mut().reset(next_deadline(expiry, next_ping, digest.as_ref().and_then(|d| d.due())));
            }
        }
    }
    batch.clear();
    drop(registration);
}

/// A random delay up to `spread`, in milliseconds (full jitter: reconnects spread evenly).
pub(super) fn spread_ms(spread: Duration) -> u64 {
    let max = spread.as_millis() as u64;
    if max == 0 {
        0
    } else {
        rand::random_range(0..=max)
    }
}

/// Waits for the first frame to be `auth`; other frames get an error and the wait goes on.
async fn await_auth_frame(
    socket: &mut WebSocket,
    state: &AppState,
) -> Option<(Identity, Option<String>, Option<String>)> {
    let until = Instant::now() + state.config.auth_timeout;
    let deadline = sleep_until(until);
    tokio::pin!(deadline);
    let mut frame_budget = FrameBudget::new(state.config.max_frames_per_sec);
    loop {
        tokio::select! {
            _ = &mut deadline => {
                state.hub.stats.count_auth_failure("auth-timeout");
                close_with(&state.hub.stats, socket, "auth-timeout", "no auth frame in time", CLOSE_POLICY).await;
                return None;
            }
            incoming = socket.recv() => {
                let text = match incoming {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Err(e)) => {
                        Box::pin(refuse_unreadable(&state.hub.stats, socket, &e, "(unauthenticated)", state.config.max_client_frame)).await;
                        return None;
                    }
                    Some(Ok(Message::Close(_))) | None => return None,
                    Some(Ok(_)) => continue,
                };
                if !frame_budget.take(Instant::now()) {
                    close_with(&state.hub.stats, socket, "rate-limited", &frame_budget.describe(), CLOSE_POLICY).await;
                    linger(socket).await;
                    return None;
                }
                let reply = match parse_client_frame(&text) {
                    Ok(ClientFrame::Auth { token, since, device }) => match state.auth.verify(&token).await {
                        Ok(identity) => return Some((identity, since, device)),
                        Err(e) => {
                            state.hub.stats.count_auth_failure(e.code());
                            close_with(&state.hub.stats, socket, e.code(), &e.to_string(), CLOSE_POLICY).await;
                            return None;
                        }
                    },
                    Ok(ClientFrame::Ping) => PONG_FRAME.to_owned(),
                    Ok(_) => error_frame("unauthenticated", "send an auth frame first"),
                    Err(e) => e.to_frame(),
                };
                // The auth timeout holds whatever the client sends: a reply it does not read
                // cannot keep it past the deadline.
                if !matches!(tokio::time::timeout_at(until, send_text(socket, reply)).await, Ok(Ok(()))) {
                    if Instant::now() >= until {
                        state.hub.stats.count_auth_failure("auth-timeout");
                        close_with(&state.hub.stats, socket, "auth-timeout", "no auth frame in time", CLOSE_POLICY).await;
                    }
                    return None;
                }
            }
        }
    }
}

/// Sends the notifications `device` of `user` still owes an acknowledgement for, and the
/// latest announcement of a planned downtime under way. A bus that cannot say is logged, not
/// fatal: they come on the next connect.
async fn send_owed(
    socket: &mut WebSocket,
    state: &AppState,
    user: &str,
    device: &str,
    limit: Duration,
) -> Result<(), ()> {
    let mut owed = match state.hub.bus().owed(user, device).await {
        Ok(owed) => owed,
        Err(e) => {
            tracing::warn!(%user, error = %e, "owed notifications unreadable; they come next time");
            Vec::new()
        }
    };
    // A planned downtime under way: its latest announcement, whenever the client connects.
    if let Some(scheduler) = state.downtimes.get() {
        owed.extend(
            scheduler
                .current_for(user)
                .await
                .into_iter()
                .map(bytes::Bytes::from),
        );
    }
    for payload in owed {
        let Ok(text) = std::str::from_utf8(&payload) else {
            continue;
        };
        if send_within(socket, super::protocol::notification_frame(text), limit)
            .await
            .is_err()
        {
            return Err(());
        }
    }
    Ok(())
}

/// The answer to an `ack` frame: `acked`, or why not.
async fn acknowledge(state: &AppState, user: &str, device: &str, notification_id: &str) -> String {
    match state
        .hub
        .bus()
        .acknowledge(user, device, notification_id)
        .await
    {
        Ok(true) => super::protocol::acked_frame(notification_id),
        Ok(false) => error_frame(
            "unknown-notification",
            &format!("{user} owes no acknowledgement for {notification_id:?}"),
        ),
        Err(e) => error_frame("unavailable", &e.to_string()),
    }
}

/// Not `async fn`s, these two: their futures are part of every connection's task, and an async
/// fn would also keep its parameters there (see [`write_frames`]).
fn send_text(
    socket: &mut WebSocket,
    text: String,
) -> futures_util::sink::Send<'_, WebSocket, Message> {
    SinkExt::send(socket, Message::Text(Utf8Bytes::from(text)))
}

/// Sends one frame within the write timeout; `Err` when it failed or timed out.
fn send_within(
    socket: &mut WebSocket,
    text: String,
    limit: Duration,
) -> impl std::future::Future<Output = Result<(), ()>> + '_ {
    write_within(limit, send_text(socket, text)).map(|sent| match sent {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    })
}

/// Why a client's frame could not be read, as the error code, the close code and a message
/// for the client; `None` when the connection is simply gone (I/O error, reset).
fn unreadable(error: &axum::Error, max_frame: usize) -> Option<(&'static str, u16, String)> {
    use tokio_tungstenite::tungstenite::Error as WsError;
    use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
    let inner = error.source_ws()?;
    match inner {
        WsError::Capacity(CapacityError::MessageTooLong { size, .. }) => Some((
            "frame-too-large",
            CLOSE_TOO_BIG,
            format!(
                "a frame of {size} bytes is over the limit of {max_frame} bytes (--max-frame-bytes)"
            ),
        )),
        WsError::Capacity(e) => Some(("frame-too-large", CLOSE_TOO_BIG, e.to_string())),
        WsError::Utf8(_) => Some((
            "bad-frame",
            CLOSE_INVALID_PAYLOAD,
            "a text frame that is not valid UTF-8".to_owned(),
        )),
        // The client vanished: nobody to tell.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        WsError::Protocol(e) => Some((
            "protocol-error",
            CLOSE_PROTOCOL,
            format!("WebSocket protocol violation: {e}"),
        )),
        _ => None,
    }
}

/// A frame that cannot be read ends the connection, but never silently: the client gets an
/// error frame and the close code that names the reason (1009, 1007 or 1002).
async fn refuse_unreadable(
    stats: &GatewayStats,
    socket: &mut WebSocket,
    error: &axum::Error,
    user: &str,
    max_frame: usize,
) {
    match unreadable(error, max_frame) {
        Some((code, close_code, message)) => {
            tracing::info!(%user, %code, %message, "unreadable client frame; closing");
            close_with(stats, socket, code, &message, close_code).await;
            linger(socket).await;
        }
        None => tracing::debug!(%user, error = %error, "connection lost"),
    }
}

/// Waits a moment before the socket is dropped after a close the client caused: closing with
/// unread input (the rest of an oversized frame, a flood of frames) makes the kernel send a
/// reset, which destroys the error and close frames in the client's receive buffer before it
/// reads them. Reads what still parses, then waits out the rest.
async fn linger(socket: &mut WebSocket) {
    let until = Instant::now() + Duration::from_millis(500);
    while let Ok(Some(Ok(_))) = tokio::time::timeout_at(until, socket.recv()).await {}
    sleep_until(until).await;
}

/// The WebSocket library's error inside axum's.
trait SourceWs {
    fn source_ws(&self) -> Option<&tokio_tungstenite::tungstenite::Error>;
}

impl SourceWs for axum::Error {
    fn source_ws(&self) -> Option<&tokio_tungstenite::tungstenite::Error> {
        std::error::Error::source(self)?.downcast_ref()
    }
}

/// Sends the error frame and the close frame, giving up after a second: the client may be the
/// reason for closing (not reading, gone), and must not hold the task. Boxed, like every rare
/// await in a connection's task: inline, its timer would make every idle connection's task as
/// large as this path's state.
fn close_with<'a>(
    stats: &GatewayStats,
    socket: &'a mut WebSocket,
    code: &'a str,
    message: &'a str,
    close_code: u16,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
    stats.count_close(code);
    Box::pin(close_after(
        socket,
        error_frame(code, message),
        code,
        message,
        close_code,
    ))
}

/// Sends `frame`, then a close frame whose reason is `code: message`, within a second.
async fn close_after(
    socket: &mut WebSocket,
    frame: String,
    code: &str,
    message: &str,
    close_code: u16,
) {
    let close = async {
        send_text(socket, frame).await?;
        socket
            .send(Message::Close(Some(CloseFrame {
                code: close_code,
                reason: Utf8Bytes::from(close_reason(code, message)),
            })))
            .await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), close).await;
}

/// Runs `write`, failing it after `limit`. Almost every write completes at its first poll (the
/// kernel takes the bytes), so the timer, which costs a timer-wheel entry per batch, is only
/// armed for a write that has to wait, and boxed: inline, the timer would be part of every
/// idle connection's task (the socket's own stall guard holds the same limit underneath).
///
/// A future of its own rather than an `async fn`: one that takes `write` as a parameter and
/// pins it holds it twice, and these futures are part of every connection's task (they had
/// grown the session's past an allocator size class: `bench idle`).
fn write_within<F: std::future::Future>(limit: Duration, write: F) -> WithinLimit<F> {
    WithinLimit {
        write,
        limit_ms: u32::try_from(limit.as_millis()).unwrap_or(u32::MAX),
        timer: None,
    }
}

/// The write outlived its limit.
#[derive(Debug)]
struct TimedOut;

pin_project_lite::pin_project! {
    /// See [`write_within`].
    struct WithinLimit<F> {
        #[pin]
        write: F,
        // Milliseconds, not a `Duration`: 4 bytes rather than 16, in every connection's task.
        limit_ms: u32,
        timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<F: std::future::Future> std::future::Future for WithinLimit<F> {
    type Output = Result<F::Output, TimedOut>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let this = self.project();
        if let Poll::Ready(output) = this.write.poll(cx) {
            return Poll::Ready(Ok(output));
        }
        let limit = Duration::from_millis(u64::from(*this.limit_ms));
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(TimedOut)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// `code: message`, cut to the 123 bytes a close frame's reason may hold.
fn close_reason(code: &str, message: &str) -> String {
    let mut reason = format!("{code}: {message}");
    if reason.len() > 123 {
        let mut end = 123;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    reason
}

/// The earlier of the token's expiry and the next ping (far away if neither).
/// The earliest of the token's expiry, the next ping and a digest window's end.
fn next_deadline(
    expiry: Option<Instant>,
    next_ping: Option<Instant>,
    digest_due: Option<Instant>,
) -> Instant {
    [expiry, next_ping, digest_due]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or_else(far_future)
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365)
}

/// How many frames a client may send: `rate` per second on average, bursts of twice that. A
/// generic cell rate: one instant per connection (the moment the bucket would be empty again),
/// no timer, nothing allocated.
struct FrameBudget {
    /// Time one frame costs (zero: no limit).
    interval: Duration,
    /// How far ahead of now the bucket may be drawn (the burst).
    burst: Duration,
    /// When the frames taken so far are paid off.
    paid_until: Option<Instant>,
    rate: u32,
}

impl FrameBudget {
    fn new(rate: u32) -> Self {
        let interval = if rate == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs(1) / rate
        };
        FrameBudget {
            interval,
            burst: interval * 2 * rate,
            paid_until: None,
            rate,
        }
    }

    /// Takes one frame's cost; false when the client is over its budget.
    fn take(&mut self, now: Instant) -> bool {
        if self.interval.is_zero() {
            return true;
        }
        let from = self.paid_until.map_or(now, |t| t.max(now));
        let next = from + self.interval;
        if next.saturating_duration_since(now) > self.burst {
            return false;
        }
        self.paid_until = Some(next);
        true
    }

    fn describe(&self) -> String {
        format!(
            "more than {} frames per second (bursts of {}); --max-frames-per-sec",
            self.rate,
            self.rate * 2
        )
    }
}

/// Reads a bearer token from request headers.
pub fn header_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
}

#[cfg(test)]
mod tests {
    use super::{FrameBudget, close_reason};
    use std::time::Duration;
    use tokio::time::Instant;

    #[test]
    fn frame_budget_allows_bursts_then_the_rate() {
        let now = Instant::now();
        let mut budget = FrameBudget::new(10);
        let taken = (0..100).take_while(|_| budget.take(now)).count();
        assert_eq!(taken, 20, "a burst of twice the rate");
        assert!(!budget.take(now));
        // A second later, ten more.
        let later = now + Duration::from_secs(1);
        let taken = (0..100).take_while(|_| budget.take(later)).count();
        assert_eq!(taken, 10);
        let mut unlimited = FrameBudget::new(0);
        assert!((0..10_000).all(|_| unlimited.take(now)));
    }

    #[test]
    fn close_reasons_fit_a_close_frame() {
        assert_eq!(
            close_reason("invalid-token", "wrong audience"),
            "invalid-token: wrong audience"
        );
        let long = close_reason("invalid-token", &"é".repeat(200));
        assert!(long.len() <= 123 && long.starts_with("invalid-token: é"));
    }
}
