//! Per-connection state shared by WebSocket and SSE: the bounded send queue and the watch filter.
//!
//! The queue is a `VecDeque` behind a mutex with a `Notify` rather than a tokio channel: an empty
//! `VecDeque` allocates nothing, while a channel allocates its first block up front, and most
//! connections are idle most of the time. It is bounded: when a client stops reading and the
//! queue fills, the session is evicted (its queue is dropped and the connection closed), so a
//! slow client costs at most `capacity` frames of memory.
//!
//! When the bus's live feed had a gap (its Redis subscription dropped), the queue is held: the
//! frames that arrive after the subscription is back must not go out before the history that
//! was missed meanwhile. Once the bus says the feed is back, the session is told to catch up
//! ([`Next::CatchUp`]) from its last position, and only then drains the queue (its cursor drops
//! what the catch-up already sent).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use axum::extract::ws::Utf8Bytes;
use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;

use super::protocol::{
    FrameError, FrameSpans, Route, put_server_frame, server_frame, server_frame_len, text_of,
};
use super::wakeups::{Wake, Wakeups};

/// The hub's wake-ups, batched per burst of arrivals.
pub type SessionWakeups = Wakeups<SessionQueue>;
use crate::path::{SpacePath, is_within};

/// One delivered message, shared by every connection of its user.
#[derive(Debug)]
pub struct Frame {
    /// The user message's `type` (the SSE `event:` name).
    pub message_type: std::borrow::Cow<'static, str>,
    body: Body,
    /// Parsed only when a connection with watches needs it.
    route: OnceLock<Route>,
}

/// A frame's bytes: its id and payload, and its WebSocket text when built once.
#[derive(Debug)]
enum Body {
    /// A small frame ([`PREBUILT_TEXT_MAX`]): its WebSocket text, built once for the user's
    /// connections, and where its id and payload lie within it. One reference rather than
    /// three: in `bench fanout`'s bursts the reference counts of the id, text and payload
    /// slices, taken when a batch was built and given back on the writer's thread, cost a few
    /// per cent of the gateway's CPU.
    Built {
        text: Utf8Bytes,
        id: (u32, u32),
        payload: (u32, u32),
    },
    /// A large one, framed when sent so that queues hold only the payload, one buffer shared by
    /// every recipient of the same bytes (a copy per user of every queued message is what let
    /// a few large events pin gigabytes, issue 12); or one whose text does not hold its id or
    /// payload as they are (an escaped id, a payload that is not UTF-8).
    Apart { id: Utf8Bytes, payload: Bytes },
}

impl Frame {
    pub fn new(
        id: Utf8Bytes,
        message_type: std::borrow::Cow<'static, str>,
        payload: Bytes,
        route: Option<Route>,
    ) -> Self {
        let small = payload.len() <= PREBUILT_TEXT_MAX;
        let mut frame = Frame::apart(id, message_type, payload, route);
        if small {
            let (text, spans) = frame.build_text();
            if let Some(body) = Body::built(text, spans) {
                frame.body = body;
            }
        }
        frame
    }

    /// A frame kept as its id and payload, framed when sent: what a batch keeps of a frame it
    /// could not build ([`Frame::with_text`]) or chose not to (a large one), without trying again.
    pub fn apart(
        id: Utf8Bytes,
        message_type: std::borrow::Cow<'static, str>,
        payload: Bytes,
        route: Option<Route>,
    ) -> Self {
        Frame::of(message_type, Body::Apart { id, payload }, route)
    }

    /// A frame whose WebSocket text the caller built into a batch's buffer (`text`:
    /// [`put_server_frame`]'s bytes for this frame, `spans` what it said). `None` if the text
    /// does not hold the id or the payload as they are.
    pub fn with_text(
        message_type: std::borrow::Cow<'static, str>,
        route: Option<Route>,
        text: Utf8Bytes,
        spans: FrameSpans,
    ) -> Option<Self> {
        Some(Frame::of(message_type, Body::built(text, spans)?, route))
    }

    fn of(message_type: std::borrow::Cow<'static, str>, body: Body, route: Option<Route>) -> Self {
        let cell = OnceLock::new();
        if let Some(r) = route {
            let _ = cell.set(r);
        }
        Frame {
            message_type,
            body,
            route: cell,
        }
    }

    /// The frame's position, `<epoch>:<id>`.
    pub fn id(&self) -> &str {
        match &self.body {
            // The span was written from a `&str` and lies on its character boundaries.
            Body::Built { text, id, .. } => text
                .as_str()
                .get(id.0 as usize..id.1 as usize)
                .unwrap_or_default(),
            Body::Apart { id, .. } => id.as_str(),
        }
    }

    /// The message as the bus handed it over.
    pub fn payload(&self) -> &[u8] {
        match &self.body {
            Body::Built { text, payload, .. } => text
                .as_bytes()
                .get(payload.0 as usize..payload.1 as usize)
                .unwrap_or_default(),
            Body::Apart { payload, .. } => payload,
        }
    }

    /// The WebSocket text frame. Large ones are built when sent rather than kept: a copy per
    /// user of every queued message is what let a few large events pin gigabytes (issue 12).
    pub fn ws_text(&self) -> Utf8Bytes {
        match &self.body {
            Body::Built { text, .. } => text.clone(),
            Body::Apart { .. } => self.build_text().0,
        }
    }

    fn build_text(&self) -> (Utf8Bytes, FrameSpans) {
        let resync_space = (self.message_type == "resync").then(|| self.route().space_id.as_str());
        let (id, payload) = (self.id(), self.payload());
        let mut out = BytesMut::with_capacity(server_frame_len(id, payload.len(), resync_space));
        let spans = put_server_frame(&mut out, id, payload, resync_space);
        match text_of(out.freeze()) {
            Some(text) => (text, spans),
            // Not UTF-8 (never a payload foldercast wrote): `null` in its place.
            None => {
                let text = server_frame(id, payload, resync_space);
                let spans = FrameSpans {
                    id: None,
                    payload: 0..0,
                };
                (text, spans)
            }
        }
    }

    /// Bytes the frame accounts for in a queue: a built frame's text (which holds its id and
    /// payload); otherwise its payload (perhaps shared), its id, and about what framing adds.
    pub fn size(&self) -> usize {
        match &self.body {
            Body::Built { text, .. } => text.len(),
            Body::Apart { id, payload } => payload.len() + id.len() + 48,
        }
    }

    pub fn route(&self) -> &Route {
        self.route.get_or_init(|| Route::of_payload(self.payload()))
    }

    /// Whether this frame reaches a connection with `watches`.
    pub fn passes(&self, watches: &Watches) -> bool {
        watches.is_empty() || watches.allows(self.route())
    }
}

impl Body {
    /// A built text's body, if `spans` locate the id and the payload in it.
    fn built(text: Utf8Bytes, spans: FrameSpans) -> Option<Body> {
        let id = spans.id?;
        let fits = |r: &std::ops::Range<usize>| r.end <= text.len() && u32::try_from(r.end).is_ok();
        if !fits(&id) || !fits(&spans.payload) {
            return None;
        }
        // The payload was written as it was: its span holds exactly its bytes, and `id`'s lies
        // on the characters of the id.
        Some(Body::Built {
            id: (id.start as u32, id.end as u32),
            payload: (spans.payload.start as u32, spans.payload.end as u32),
            text,
        })
    }
}

/// A frame as queues hold it: one of a batch that was built and allocated together.
///
/// The frames of one pushed message are allocated as one `Arc<[Frame]>` and each queue entry
/// names its batch and index, instead of an `Arc` per frame: in `bench fanout`'s bursts the
/// allocation of every frame, and its free on another thread, showed among the gateway's
/// largest costs. A queue that holds one frame of a batch keeps the batch alive; the batch is
/// one push (at most a publish call's messages for one user), whose texts already share one
/// buffer.
#[derive(Clone)]
pub struct SharedFrame {
    batch: Arc<[Frame]>,
    index: u32,
}

impl SharedFrame {
    /// Each frame of `batch`, in order.
    pub fn each(batch: Arc<[Frame]>) -> impl Iterator<Item = SharedFrame> {
        (0..batch.len()).map(move |i| SharedFrame {
            batch: batch.clone(),
            // A batch is one push: far fewer than 2^32 frames.
            index: i as u32,
        })
    }
}

impl From<Frame> for SharedFrame {
    fn from(frame: Frame) -> Self {
        SharedFrame {
            batch: Arc::from([frame]),
            index: 0,
        }
    }
}

impl std::ops::Deref for SharedFrame {
    type Target = Frame;

    fn deref(&self) -> &Frame {
        &self.batch[self.index as usize]
    }
}

impl std::fmt::Debug for SharedFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

/// Payloads up to this size get their WebSocket text built once per user (cheaper on the hot
/// path: `bench fanout`); larger ones share the bus's buffer and are framed when sent.
pub const PREBUILT_TEXT_MAX: usize = 2048;

/// What became of a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// The queue was full: this push evicted the session.
    Evicted,
    /// The session was evicted earlier.
    Gone,
}

/// What a session should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Frames were moved into the caller's batch.
    Frames,
    /// The live feed had a gap and is back: read the history after the last position first.
    CatchUp,
    /// The session was evicted (its queue overflowed).
    Evicted,
    /// The gateway is shutting down: tell the client to reconnect, and close.
    Drain,
}

/// Gap states: none, held (the feed is down), catch up (the feed is back).
const GAP_NONE: u8 = 0;
const GAP_HELD: u8 = 1;
const GAP_CATCH_UP: u8 = 2;

pub struct SessionQueue {
    state: Mutex<QueueState>,
    gap: AtomicU8,
    /// Set on shutdown: one byte per connection rather than a cancellation waiter in every
    /// connection's task.
    draining: AtomicBool,
    notify: Notify,
    /// Set while a wake-up is pending in [`Wakeups`], so a burst marks the session once.
    marked: AtomicBool,
    capacity: usize,
    /// Bytes queued at most: a count alone let 256 messages of 8 MB pin 2 GB for one client.
    max_bytes: usize,
}

struct QueueState {
    frames: VecDeque<SharedFrame>,
    /// The WebSocket text of the queued frames, in bytes.
    bytes: usize,
    evicted: bool,
}

impl SessionQueue {
    /// A queue bounded by frame count only.
    pub fn new(capacity: usize) -> Self {
        Self::bounded(capacity, usize::MAX)
    }

    /// A queue of at most `capacity` frames and `max_bytes` bytes (each bound may be overshot
    /// by one batch, see [`Self::push`]).
    pub fn bounded(capacity: usize, max_bytes: usize) -> Self {
        SessionQueue {
            state: Mutex::new(QueueState {
                frames: VecDeque::new(),
                bytes: 0,
                evicted: false,
            }),
            gap: AtomicU8::new(GAP_NONE),
            draining: AtomicBool::new(false),
            notify: Notify::new(),
            marked: AtomicBool::new(false),
            capacity: capacity.max(1),
            max_bytes: max_bytes.max(1),
        }
    }

    /// Queues `frames`, or evicts the session if they do not fit. The wake-up is left to
    /// `wakeups`, at the end of the batch being delivered; an eviction wakes the session at once.
    pub fn push(self: &Arc<Self>, frames: &[SharedFrame], wakeups: &SessionWakeups) -> Push {
        let pushed = self.enqueue(frames);
        if pushed == Push::Queued && !self.marked.swap(true, Ordering::AcqRel) {
            wakeups.mark(self);
        }
        pushed
    }

    fn enqueue(&self, frames: &[SharedFrame]) -> Push {
        let Ok(mut state) = self.state.lock() else {
            return Push::Gone;
        };
        if state.evicted {
            return Push::Gone;
        }
        // A batch is taken whole while the queue has room, however large it is (a consumer
        // catching up publishes up to a whole batch per user at once, and a session that keeps
        // up must not be evicted for that). A queue still full when more arrives belongs to a
        // session that is not draining it: that is what eviction is for. At most capacity +
        // one batch is held.
        if state.frames.len() >= self.capacity || state.bytes >= self.max_bytes {
            state.evicted = true;
            state.frames = VecDeque::new();
            state.bytes = 0;
            drop(state);
            self.notify.notify_one();
            return Push::Evicted;
        }
        state.frames.extend(frames.iter().cloned());
        state.bytes += frames.iter().map(|f| f.size()).sum::<usize>();
        Push::Queued
    }

    /// The gateway is shutting down: the session's next wait returns [`Next::Drain`].
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    /// The live feed stopped: hold what arrives until [`Self::feed_restored`].
    pub fn feed_gap(&self) {
        self.gap.store(GAP_HELD, Ordering::Release);
    }

    /// The live feed is back (resubscribed): a held session catches up, then goes on.
    pub fn feed_restored(&self) {
        if self
            .gap
            .compare_exchange(GAP_HELD, GAP_CATCH_UP, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.notify.notify_one();
        }
    }

    /// A catch-up that failed (the bus is still unreachable) is tried again.
    pub fn catch_up_again(&self) {
        self.gap.store(GAP_CATCH_UP, Ordering::Release);
        self.notify.notify_one();
    }

    /// Waits for frames and moves all queued ones into `out`, unless the session must catch up
    /// first or was evicted.
    pub async fn next_batch(&self, out: &mut Vec<SharedFrame>) -> Next {
        loop {
            {
                let Ok(mut state) = self.state.lock() else {
                    return Next::Evicted;
                };
                if state.evicted {
                    return Next::Evicted;
                }
                if self.draining.load(Ordering::Acquire) {
                    return Next::Drain;
                }
                match self.gap.load(Ordering::Acquire) {
                    GAP_CATCH_UP => {
                        self.gap.store(GAP_NONE, Ordering::Release);
                        return Next::CatchUp;
                    }
                    // Held: nothing goes out until the catch-up (frames stay queued).
                    GAP_HELD => {}
                    _ if !state.frames.is_empty() => {
                        out.extend(state.frames.drain(..));
                        state.bytes = 0;
                        if state.frames.capacity() > 64 {
                            // Give back what a burst grew, so an idle session stays small.
                            state.frames.shrink_to(0);
                        }
                        return Next::Frames;
                    }
                    _ => {}
                }
            }
            // Notify keeps a permit if `push` ran between the check and here: no lost wake-up.
            self.notify.notified().await;
        }
    }
}

/// Upper bound on watches per connection (each one is checked for every message).
pub const MAX_WATCHES: usize = 64;

/// The longest space id a watch may name. oCIS ids (`<storage>$<space>!<opaque>`) are about
/// 80 bytes.
pub const MAX_SPACE_ID_BYTES: usize = 256;

/// What one connection's watches may hold in all (space ids and paths), so that 64 watches of
/// 4 KB paths cannot pin a quarter megabyte per connection.
pub const MAX_WATCH_BYTES: usize = 16 * 1024;

/// The folders a connection is looking at; empty means "everything I may see".
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Watches {
    entries: Vec<(Box<str>, SpacePath)>,
}

impl Watches {
    pub fn add(&mut self, space_id: &str, path: SpacePath) -> Result<(), FrameError> {
        if self
            .entries
            .iter()
            .any(|(s, p)| &**s == space_id && *p == path)
        {
            return Ok(());
        }
        if space_id.len() > MAX_SPACE_ID_BYTES {
            return Err(FrameError::new(
                "bad-watch",
                format!("a space id is at most {MAX_SPACE_ID_BYTES} bytes"),
            ));
        }
        if self.entries.len() >= MAX_WATCHES {
            return Err(FrameError::new(
                "too-many-watches",
                format!("at most {MAX_WATCHES} watches per connection"),
            ));
        }
        let held: usize = self
            .entries
            .iter()
            .map(|(s, p)| s.len() + p.as_str().len())
            .sum();
        if held + space_id.len() + path.as_str().len() > MAX_WATCH_BYTES {
            return Err(FrameError::new(
                "too-many-watches",
                format!("a connection's watches hold at most {MAX_WATCH_BYTES} bytes in all"),
            ));
        }
        self.entries.push((space_id.into(), path));
        Ok(())
    }

    pub fn remove(&mut self, space_id: Option<&str>, path: Option<&SpacePath>) {
        self.entries.retain(|(s, p)| {
            let space_matches = space_id.is_none_or(|id| &**s == id);
            let path_matches = path.is_none_or(|want| p == want);
            !(space_matches && path_matches)
        });
    }

    /// The spaces watched (a space once per watch in it).
    pub fn spaces(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(space, _)| &**space)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether a message with this route reaches a connection with these watches: all do when
    /// nothing is watched; membership and resync messages always do; an item change does when
    /// its path or old path is a watched folder or lies below one in the same space.
    pub fn allows(&self, route: &Route) -> bool {
        if self.entries.is_empty() || route.ignores_watches() {
            return true;
        }
        self.entries.iter().any(|(space, folder)| {
            **space == *route.space_id && route.paths.iter().any(|p| is_within(p, folder.as_str()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(id: &str) -> SharedFrame {
        SharedFrame::from(Frame::new(
            Utf8Bytes::from(id),
            "x".into(),
            Bytes::from_static(b"{}"),
            None,
        ))
    }

    mod frames {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Whatever its id and payload, a frame reads them back as given and sends the text
            /// built from them, whether it keeps one buffer (spans in its text) or two.
            #[test]
            fn a_frame_reads_back_its_id_and_payload_and_sends_their_text(
                id in any::<String>(),
                payload in prop_oneof![
                    any::<Vec<u8>>(),
                    "[ -~]{0,64}".prop_map(String::into_bytes),
                    (0usize..3).prop_map(|k| vec![b'a'; PREBUILT_TEXT_MAX - 1 + k]),
                ],
                resync in any::<bool>(),
            ) {
                let route = resync.then(|| Route {
                    message_type: "resync".into(),
                    space_id: "s1".into(),
                    paths: Vec::new(),
                });
                let kind = if resync { "resync" } else { "file-uploaded" };
                let frame = Frame::new(
                    Utf8Bytes::from(id.clone()),
                    kind.into(),
                    Bytes::from(payload.clone()),
                    route,
                );
                prop_assert_eq!(frame.id(), id.as_str());
                prop_assert_eq!(frame.payload(), payload.as_slice());
                let space = resync.then_some("s1");
                prop_assert_eq!(frame.ws_text(), server_frame(&id, &payload, space));
                prop_assert!(frame.size() >= payload.len());
            }
        }
    }

    fn push(q: &Arc<SessionQueue>, frame: SharedFrame, wakeups: &SessionWakeups) -> Push {
        q.push(&[frame], wakeups)
    }

    #[tokio::test]
    async fn queue_batches_and_evicts_when_full() {
        let w = Wakeups::start();
        let q = Arc::new(SessionQueue::new(3));
        assert_eq!(push(&q, frame("1"), &w), Push::Queued);
        assert_eq!(push(&q, frame("2"), &w), Push::Queued);
        let mut out = Vec::new();
        assert_eq!(q.next_batch(&mut out).await, Next::Frames);
        assert_eq!(out.len(), 2);
        for i in 0..3 {
            assert_eq!(push(&q, frame(&i.to_string()), &w), Push::Queued);
        }
        assert_eq!(
            push(&q, frame("overflow"), &w),
            Push::Evicted,
            "the fourth frame evicts"
        );
        assert_eq!(push(&q, frame("later"), &w), Push::Gone);
        out.clear();
        assert_eq!(q.next_batch(&mut out).await, Next::Evicted);
        assert!(out.is_empty(), "an evicted queue holds nothing");
    }

    #[test]
    fn a_batch_may_overshoot_a_queue_with_room_once() {
        let wakeups = Wakeups::start();
        let q = Arc::new(SessionQueue::new(3));
        assert_eq!(q.push(&[frame("1"), frame("2")], &wakeups), Push::Queued);
        assert_eq!(
            q.push(&[frame("3"), frame("4")], &wakeups),
            Push::Queued,
            "room for one: the batch is taken whole"
        );
        assert_eq!(push(&q, frame("5"), &wakeups), Push::Evicted, "full");
        assert_eq!(push(&q, frame("6"), &wakeups), Push::Gone);
    }

    #[tokio::test]
    async fn queues_are_bounded_in_bytes_too() {
        let wakeups = Wakeups::start();
        let big = |id: &str| {
            SharedFrame::from(Frame::new(
                Utf8Bytes::from(id.to_owned()),
                "x".into(),
                // Above PREBUILT_TEXT_MAX: 3,000 bytes in all, payload, id and framing.
                Bytes::from("x".repeat(3000 - 48 - id.len())),
                None,
            ))
        };
        let q = Arc::new(SessionQueue::bounded(100, 7500));
        for i in 0..3 {
            assert_eq!(q.push(&[big(&i.to_string())], &wakeups), Push::Queued);
        }
        assert_eq!(
            q.push(&[big("4")], &wakeups),
            Push::Evicted,
            "9,000 bytes held"
        );
        let q = Arc::new(SessionQueue::bounded(100, 7500));
        q.push(&[big("1"), big("2")], &wakeups);
        let mut out = Vec::new();
        assert_eq!(q.next_batch(&mut out).await, Next::Frames);
        for i in 0..3 {
            assert_eq!(
                q.push(&[big(&i.to_string())], &wakeups),
                Push::Queued,
                "drained"
            );
        }
    }

    #[tokio::test]
    async fn a_batch_larger_than_the_queue_reaches_a_session_that_keeps_up() {
        let wakeups = Wakeups::start();
        let q = Arc::new(SessionQueue::new(3));
        let burst: Vec<_> = (0..10).map(|i| frame(&i.to_string())).collect();
        assert_eq!(
            q.push(&burst, &wakeups),
            Push::Queued,
            "the queue was empty"
        );
        let mut out = Vec::new();
        assert_eq!(q.next_batch(&mut out).await, Next::Frames);
        assert_eq!(out.len(), 10);
        assert_eq!(
            q.push(&burst, &wakeups),
            Push::Queued,
            "drained: empty again"
        );
        assert_eq!(
            push(&q, frame("more"), &wakeups),
            Push::Evicted,
            "not drained: full"
        );
    }

    #[tokio::test]
    async fn queue_wakes_a_waiting_reader() {
        let w = Wakeups::start();
        let q = Arc::new(SessionQueue::new(8));
        let reader = {
            let q = q.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                q.next_batch(&mut out).await;
                out.len()
            })
        };
        tokio::task::yield_now().await;
        push(&q, frame("1"), &w);
        assert_eq!(reader.await.unwrap(), 1);
    }

    #[tokio::test]
    async fn a_gap_holds_the_queue_until_the_feed_is_back_then_asks_for_a_catch_up() {
        let w = Wakeups::start();
        let q = Arc::new(SessionQueue::new(8));
        q.feed_gap();
        push(&q, frame("after-resubscribe"), &w);
        let mut out = Vec::new();
        let held = tokio::time::timeout(
            std::time::Duration::from_millis(100),
            q.next_batch(&mut out),
        );
        assert!(held.await.is_err(), "nothing goes out while held");
        q.feed_restored();
        assert_eq!(q.next_batch(&mut out).await, Next::CatchUp);
        assert!(out.is_empty(), "the catch-up comes before the queued frame");
        assert_eq!(q.next_batch(&mut out).await, Next::Frames);
        assert_eq!(out.len(), 1);
        // A restore without a gap asks for nothing.
        q.feed_restored();
        push(&q, frame("next"), &w);
        out.clear();
        assert_eq!(q.next_batch(&mut out).await, Next::Frames);
    }

    fn route(space: &str, paths: &[&str]) -> Route {
        Route {
            message_type: "file-uploaded".into(),
            space_id: space.into(),
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn watch_filter() {
        let mut w = Watches::default();
        assert!(w.allows(&route("s", &["/x"])), "no watch: everything");
        w.add("s", SpacePath::parse("/f1/f2").unwrap()).unwrap();
        assert!(w.allows(&route("s", &["/f1/f2"])));
        assert!(w.allows(&route("s", &["/f1/f2/f3/f4/r.pdf"])));
        assert!(!w.allows(&route("s", &["/f1/f2x/r.pdf"])));
        assert!(!w.allows(&route("s", &["/f1"])));
        assert!(!w.allows(&route("other", &["/f1/f2/r.pdf"])));
        assert!(
            w.allows(&route("s", &["/elsewhere", "/f1/f2/moved-out"])),
            "old_path counts"
        );
        assert!(
            w.allows(&route("other", &[])),
            "membership and resync always pass"
        );
        w.remove(Some("s"), None);
        assert!(w.is_empty());
        for i in 0..MAX_WATCHES {
            w.add("s", SpacePath::parse(&format!("/{i}")).unwrap())
                .unwrap();
        }
        assert_eq!(
            w.add("s", SpacePath::parse("/more").unwrap())
                .unwrap_err()
                .code,
            "too-many-watches"
        );
    }

    #[test]
    fn watches_are_bounded_in_bytes() {
        let mut w = Watches::default();
        let long_space = "s".repeat(MAX_SPACE_ID_BYTES + 1);
        let root = SpacePath::parse("/").unwrap();
        assert_eq!(
            w.add(&long_space, root.clone()).unwrap_err().code,
            "bad-watch"
        );
        let deep = SpacePath::parse(&format!("/{}", "d".repeat(4000))).unwrap();
        let mut added = 0;
        while w.add(&format!("s{added}"), deep.clone()).is_ok() {
            added += 1;
        }
        assert_eq!(added, 4, "16 KB of 4 KB paths");
        assert_eq!(
            w.add("s", deep.clone()).unwrap_err().code,
            "too-many-watches"
        );
    }
}

impl Wake for SessionQueue {
    /// Wakes the session for what was queued; clears the mark first, so a frame queued during
    /// the wake-up marks the session again rather than being left unannounced.
    fn wake(&self) {
        self.marked.store(false, Ordering::Release);
        self.notify.notify_one();
    }
}

/// Sessions woken through [`Wakeups`]: one wake-up per burst.
#[cfg(test)]
mod wakeup_tests {
    use std::sync::Arc;

    use super::*;
    use axum::extract::ws::Utf8Bytes;

    fn frame() -> SharedFrame {
        SharedFrame::from(Frame::new(
            Utf8Bytes::from_static("1"),
            "x".into(),
            bytes::Bytes::from_static(b"{}"),
            None,
        ))
    }

    #[tokio::test]
    async fn a_batch_reaches_its_session_in_one_wake_up() {
        let wakeups = Wakeups::start();
        let queue = Arc::new(SessionQueue::new(32));
        // Queued from one task without yielding, as the Redis reader does.
        for _ in 0..8 {
            assert_eq!(queue.push(&[frame()], &wakeups), Push::Queued);
        }
        let two = [frame(), frame()];
        for _ in 0..4 {
            assert_eq!(queue.push(&two, &wakeups), Push::Queued);
        }
        let mut out = Vec::new();
        assert_eq!(queue.next_batch(&mut out).await, Next::Frames);
        assert_eq!(out.len(), 16, "the whole burst in one batch");
        // A later frame wakes the session again.
        assert_eq!(queue.push(&[frame()], &wakeups), Push::Queued);
        out.clear();
        let next = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            queue.next_batch(&mut out),
        );
        assert_eq!(
            next.await.ok(),
            Some(Next::Frames),
            "woken for the later frame"
        );
        assert_eq!(out.len(), 1);
        wakeups.close();
    }

    #[test]
    fn without_a_runtime_frames_wake_at_once() {
        let wakeups = Wakeups::start();
        let queue = Arc::new(SessionQueue::new(4));
        assert_eq!(queue.push(&[frame()], &wakeups), Push::Queued);
        let mut out = Vec::new();
        let ready = futures_util::FutureExt::now_or_never(queue.next_batch(&mut out));
        assert_eq!(ready, Some(Next::Frames));
        assert_eq!(out.len(), 1);
    }
}
