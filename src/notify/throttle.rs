//! Per-user rate limiting that never loses a change.
//!
//! Each user has a token bucket (governor). A message the bucket allows goes out at once; one it
//! refuses is folded into the user's pending change for that space: folder deltas are summed per
//! folder, the latest change of each path is kept, and every covered event id is listed. The
//! pending change is flushed as one `coalesced` message when the bucket allows. A user whose
//! pending backlog grows past `max_backlog` events gets one `resync` per space instead: their
//! client refetches rather than replaying a flood.
//!
//! Membership messages are never held back: they first flush that space's pending change (so
//! order is kept, and a removed user's last message really is the last), then go out.
//!
//! The clock is a parameter so a replay can follow event time and stay deterministic.

use std::collections::{BTreeSet, HashMap};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use indexmap::IndexMap;

use super::ancestors::FolderDelta;
use super::message::{COALESCED, ItemUpdate, Prepared, UserMessage};
use crate::bus::Outgoing;

/// Rate-limit settings.
#[derive(Debug, Clone, Copy)]
pub struct ThrottleConfig {
    /// Messages per second per user.
    pub rate: f64,
    pub burst: u32,
    /// Pending events per user beyond which the user gets `resync` instead.
    pub max_backlog: usize,
}

type Limiter<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

pub struct Throttle<C: Clock> {
    quota: Quota,
    clock: C,
    max_backlog: usize,
    /// How long an idle bucket takes to refill; a user idle that long can be forgotten.
    refill: Duration,
    users: HashMap<Arc<str>, UserState<C>>,
    /// Users holding changes, sorted so flushes come out in a deterministic order.
    waiting: BTreeSet<Arc<str>>,
    last_prune: C::Instant,
}

struct UserState<C: Clock> {
    limiter: Limiter<C>,
    /// Per space, oldest first.
    pending: IndexMap<Arc<str>, Pending>,
    /// Events held in `pending` (coalescing ones; a resync holds none).
    backlog: usize,
    last_used: C::Instant,
}

enum Pending {
    Coalescing(Box<Coalesced>),
    Resync {
        time: Arc<str>,
        skipped: u64,
        origins: Origins,
    },
}

/// The oldest source offset held, per partition.
type Origins = HashMap<i32, i64>;

fn note_origin(origins: &mut Origins, origin: Option<(i32, i64)>) {
    if let Some((partition, offset)) = origin {
        let slot = origins.entry(partition).or_insert(offset);
        *slot = (*slot).min(offset);
    }
}

impl Pending {
    fn origins(&self) -> &Origins {
        match self {
            Pending::Coalescing(c) => &c.origins,
            Pending::Resync { origins, .. } => origins,
        }
    }
}

struct Coalesced {
    event_ids: Vec<String>,
    actor: Option<String>,
    mixed_actors: bool,
    time: Arc<str>,
    items: IndexMap<String, ItemUpdate>,
    folders: IndexMap<Arc<str>, (i64, Arc<str>)>,
    /// The original message while only one is held: flushed as-is, not as `coalesced`.
    single: Option<Prepared>,
    origins: Origins,
}

impl<C: Clock + Clone> Throttle<C> {
    /// `None` when `rate` is 0 (limiting off).
    pub fn new(config: ThrottleConfig, clock: C) -> Option<Self> {
        if !(config.rate > 0.0 && config.rate.is_finite()) {
            return None;
        }
        let period = Duration::from_secs_f64(1.0 / config.rate);
        let burst = NonZeroU32::new(config.burst.max(1)).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period)?.allow_burst(burst);
        let last_prune = clock.now();
        Some(Throttle {
            quota,
            clock,
            max_backlog: config.max_backlog.max(1),
            refill: period.saturating_mul(burst.get()),
            users: HashMap::new(),
            waiting: BTreeSet::new(),
            last_prune,
        })
    }

    /// Offers `msg` for `user`; whatever may go out now is appended to `out`. True when exactly
    /// `msg` went out, as it is (nothing held, nothing flushed with it).
    pub fn admit(&mut self, user: &Arc<str>, msg: &Prepared, out: &mut Vec<Outgoing>) -> bool {
        let now = self.clock.now();
        let state = self.users.entry(user.clone()).or_insert_with(|| UserState {
            limiter: RateLimiter::direct_with_clock(self.quota, self.clock.clone()),
            pending: IndexMap::new(),
            backlog: 0,
            last_used: now,
        });
        state.last_used = now;
        let space = &msg.message.space_id;

        if msg.message.is_membership() {
            let flushed = state.pending.shift_remove(space);
            let as_is = flushed.is_none();
            if let Some(pending) = flushed {
                state.emit(user, space, pending, out);
            }
            if state.pending.is_empty() {
                self.waiting.remove(user);
            }
            out.push(msg.to(user));
            return as_is;
        }
        if state.pending.is_empty() && state.limiter.check().is_ok() {
            out.push(msg.to(user));
            return true;
        }
        state.hold(space, msg, self.max_backlog);
        state.flush_allowed(user, out);
        if !state.pending.is_empty() {
            self.waiting.insert(user.clone());
        }
        false
    }

    /// Flushes the pending changes the buckets now allow; now and then forgets idle users.
    pub fn flush_ready(&mut self, out: &mut Vec<Outgoing>) {
        let waiting = std::mem::take(&mut self.waiting);
        for user in waiting {
            if let Some(state) = self.users.get_mut(&user) {
                state.flush_allowed(&user, out);
                if !state.pending.is_empty() {
                    self.waiting.insert(user);
                }
            }
        }
        let now = self.clock.now();
        let refill = self.refill;
        if Duration::from(now.duration_since(self.last_prune)) >= refill {
            // A user idle for a whole refill period has a full bucket again: nothing to keep.
            self.last_prune = now;
            self.users.retain(|_, state| {
                let idle = Duration::from(now.duration_since(state.last_used));
                !(state.pending.is_empty() && idle >= refill)
            });
        }
    }

    /// Flushes everything regardless of the buckets (end of a replay).
    pub fn flush_all(&mut self, out: &mut Vec<Outgoing>) {
        for user in std::mem::take(&mut self.waiting) {
            if let Some(state) = self.users.get_mut(&user) {
                while let Some((space, pending)) = state.pending.shift_remove_index(0) {
                    state.emit(&user, &space, pending, out);
                }
            }
        }
    }

    /// Users with held changes.
    pub fn pending_users(&self) -> usize {
        self.waiting.len()
    }

    /// Per source partition, the oldest offset whose messages are still held: offsets from there
    /// on must not be committed yet.
    pub fn held_floor(&self) -> Origins {
        let mut floor = Origins::new();
        for user in &self.waiting {
            for pending in self
                .users
                .get(user)
                .into_iter()
                .flat_map(|s| s.pending.values())
            {
                for (&partition, &offset) in pending.origins() {
                    note_origin(&mut floor, Some((partition, offset)));
                }
            }
        }
        floor
    }
}

impl<C: Clock> UserState<C> {
    fn hold(&mut self, space: &Arc<str>, msg: &Prepared, max_backlog: usize) {
        let m = &msg.message;
        match self.pending.get_mut(space) {
            Some(Pending::Resync {
                time,
                skipped,
                origins,
            }) => {
                *time = m.time.clone();
                *skipped += 1;
                note_origin(origins, msg.origin);
                return;
            }
            Some(Pending::Coalescing(c)) => c.absorb(msg),
            None => {
                self.pending.insert(
                    space.clone(),
                    Pending::Coalescing(Box::new(Coalesced::start(msg))),
                );
            }
        }
        self.backlog += 1;
        if self.backlog > max_backlog {
            // Too far behind: a refetch is cheaper for everyone than the backlog.
            for pending in self.pending.values_mut() {
                if let Pending::Coalescing(c) = pending {
                    *pending = Pending::Resync {
                        time: c.time.clone(),
                        skipped: c.event_ids.len() as u64,
                        origins: std::mem::take(&mut c.origins),
                    };
                }
            }
            self.backlog = 0;
        }
    }

    fn flush_allowed(&mut self, user: &Arc<str>, out: &mut Vec<Outgoing>) {
        while !self.pending.is_empty() && self.limiter.check().is_ok() {
            if let Some((space, pending)) = self.pending.shift_remove_index(0) {
                self.emit(user, &space, pending, out);
            }
        }
    }

    fn emit(
        &mut self,
        user: &Arc<str>,
        space: &Arc<str>,
        pending: Pending,
        out: &mut Vec<Outgoing>,
    ) {
        let message = match pending {
            Pending::Resync { time, skipped, .. } => Outgoing::new(
                user.clone(),
                super::message::encode(&UserMessage::resync(space.clone(), time, skipped)),
            ),
            Pending::Coalescing(c) => {
                self.backlog = self.backlog.saturating_sub(c.event_ids.len());
                match &c.single {
                    Some(original) => original.to(user),
                    None => {
                        let latest = c.event_ids.last().map(|id| Arc::from(id.as_str()));
                        let payload = super::message::encode(&c.into_message(space.clone()));
                        Outgoing::for_event(user.clone(), payload, latest)
                    }
                }
            }
        };
        out.push(message);
    }
}

impl Coalesced {
    fn start(msg: &Prepared) -> Self {
        let mut c = Coalesced {
            event_ids: Vec::new(),
            actor: msg.message.actor.clone(),
            mixed_actors: false,
            time: msg.message.time.clone(),
            items: IndexMap::new(),
            folders: IndexMap::new(),
            single: None,
            origins: Origins::new(),
        };
        c.absorb(msg);
        c.single = Some(msg.clone());
        c
    }

    fn absorb(&mut self, msg: &Prepared) {
        let m = &msg.message;
        self.single = None;
        note_origin(&mut self.origins, msg.origin);
        if let Some(ids) = &m.event_ids {
            self.event_ids.extend(ids.iter().cloned());
        } else if let Some(id) = &m.event_id {
            self.event_ids.push(id.clone());
        }
        if self.actor != m.actor {
            self.mixed_actors = true;
        }
        self.time = m.time.clone();
        if let (Some(item), Some(id)) = (&m.item, &m.event_id) {
            // Latest change per path, in the order paths last changed.
            let key = item.path.as_str().to_owned();
            self.items.shift_remove(&key);
            self.items.insert(
                key,
                ItemUpdate {
                    change: m.message_type,
                    event_id: id.clone(),
                    item: item.clone(),
                },
            );
        }
        for FolderDelta {
            path,
            size_delta,
            mtime,
        } in m.folders.iter().flatten()
        {
            let slot = self
                .folders
                .entry(path.clone())
                .or_insert((0, mtime.clone()));
            slot.0 += size_delta;
            slot.1 = mtime.clone();
        }
    }

    fn into_message(self, space_id: Arc<str>) -> UserMessage {
        UserMessage {
            event_id: self.event_ids.last().cloned(),
            message_type: COALESCED,
            space_id,
            actor: if self.mixed_actors { None } else { self.actor },
            time: self.time,
            item: None,
            folders: Some(
                self.folders
                    .into_iter()
                    .map(|(path, (size_delta, mtime))| FolderDelta {
                        path,
                        size_delta,
                        mtime,
                    })
                    .collect(),
            ),
            member: None,
            event_ids: Some(self.event_ids),
            items: Some(self.items.into_values().collect()),
            reason: None,
            skipped: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::decode;
    use governor::clock::FakeRelativeClock;
    use serde_json::Value;

    fn upload(id: &str, space: &str, path: &str, size: u64) -> Prepared {
        let json = format!(
            r#"{{"id":"{id}","type":"file-uploaded","time":"2026-11-22T10:00:00Z","data":{{"space_id":"{space}","path":"{path}","kind":"file","size":{size},"actor":"alice"}}}}"#
        );
        Prepared::new(UserMessage::from_event(&decode(json.as_bytes()).unwrap()))
    }

    fn parse(out: &[Outgoing]) -> Vec<Value> {
        out.iter()
            .map(|o| serde_json::from_slice(&o.payload).unwrap())
            .collect()
    }

    fn throttle(
        rate: f64,
        burst: u32,
        backlog: usize,
    ) -> (Throttle<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let t = Throttle::new(
            ThrottleConfig {
                rate,
                burst,
                max_backlog: backlog,
            },
            clock.clone(),
        )
        .unwrap();
        (t, clock)
    }

    #[test]
    fn rate_zero_disables() {
        let cfg = ThrottleConfig {
            rate: 0.0,
            burst: 1,
            max_backlog: 1,
        };
        assert!(Throttle::new(cfg, FakeRelativeClock::default()).is_none());
    }

    #[test]
    fn over_limit_is_coalesced_not_lost() {
        let (mut t, clock) = throttle(1.0, 1, 100);
        let bob: Arc<str> = Arc::from("bob");
        let mut out = Vec::new();
        t.admit(&bob, &upload("e1", "s", "/a/one.txt", 10), &mut out);
        t.admit(&bob, &upload("e2", "s", "/a/b/two.txt", 20), &mut out);
        t.admit(&bob, &upload("e3", "s", "/a/b/two.txt", 30), &mut out);
        assert_eq!(out.len(), 1, "only the burst goes out at once");
        assert_eq!(parse(&out)[0]["event_id"], "e1");
        t.flush_ready(&mut out);
        assert_eq!(out.len(), 1, "the bucket is still empty");
        assert_eq!(t.pending_users(), 1);

        clock.advance(Duration::from_secs(1));
        t.flush_ready(&mut out);
        let msgs = parse(&out);
        assert_eq!(msgs.len(), 2);
        let c = &msgs[1];
        assert_eq!(c["type"], "coalesced");
        assert_eq!(c["event_ids"], serde_json::json!(["e2", "e3"]));
        assert_eq!(c["event_id"], "e3");
        assert_eq!(
            c["items"].as_array().unwrap().len(),
            1,
            "latest item per path"
        );
        assert_eq!(c["items"][0]["size"], 30);
        assert_eq!(c["items"][0]["event_id"], "e3");
        let folders: Vec<(String, i64)> = c["folders"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["path"].as_str().unwrap().to_owned(),
                    f["size_delta"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            folders,
            [("/a/b".into(), 50), ("/a".into(), 50), ("/".into(), 50)],
            "deltas summed per folder"
        );
        assert_eq!(t.pending_users(), 0);
    }

    #[test]
    fn single_held_message_is_flushed_unchanged() {
        let (mut t, clock) = throttle(1.0, 1, 100);
        let bob: Arc<str> = Arc::from("bob");
        let mut out = Vec::new();
        t.admit(&bob, &upload("e1", "s", "/x", 1), &mut out);
        let held = upload("e2", "s", "/y", 2);
        t.admit(&bob, &held, &mut out);
        clock.advance(Duration::from_secs(1));
        t.flush_ready(&mut out);
        assert_eq!(out[1].payload, held.payload);
    }

    #[test]
    fn backlog_turns_into_one_resync_per_space() {
        let (mut t, clock) = throttle(1.0, 1, 5);
        let bob: Arc<str> = Arc::from("bob");
        let mut out = Vec::new();
        for i in 0..50 {
            t.admit(&bob, &upload(&format!("e{i}"), "s1", "/f", i), &mut out);
        }
        t.admit(&bob, &upload("x", "s2", "/g", 1), &mut out);
        for _ in 0..2 {
            clock.advance(Duration::from_secs(1));
            t.flush_ready(&mut out);
        }
        let msgs = parse(&out);
        assert_eq!(msgs.len(), 3, "{msgs:?}");
        assert_eq!(msgs[0]["event_id"], "e0");
        assert_eq!(msgs[1]["type"], "resync");
        assert_eq!(msgs[1]["space_id"], "s1");
        assert_eq!(msgs[1]["skipped"], 49);
        assert_eq!(
            msgs[2]["event_id"], "x",
            "a later space starts a fresh backlog"
        );
    }

    #[test]
    fn membership_flushes_pending_of_its_space_first() {
        let (mut t, _clock) = throttle(1.0, 1, 100);
        let bob: Arc<str> = Arc::from("bob");
        let mut out = Vec::new();
        t.admit(&bob, &upload("e1", "s", "/x", 1), &mut out);
        t.admit(&bob, &upload("e2", "s", "/y", 1), &mut out);
        let removed = decode(br#"{"id":"m","type":"space-member-removed","time":"2026-11-22T10:00:01Z","data":{"space_id":"s","user":"bob"}}"#).unwrap();
        t.admit(
            &bob,
            &Prepared::new(UserMessage::from_event(&removed)),
            &mut out,
        );
        let ids: Vec<Value> = parse(&out).iter().map(|m| m["event_id"].clone()).collect();
        assert_eq!(ids, ["e1", "e2", "m"]);
    }

    /// What lets the bus guard an event once rather than per user: admit says whether exactly
    /// the offered message went out, as it is.
    #[test]
    fn admit_tells_whether_the_message_went_out_as_it_is() {
        let (mut t, clock) = throttle(1.0, 1, 100);
        let bob: Arc<str> = Arc::from("bob");
        let mut out = Vec::new();
        assert!(t.admit(&bob, &upload("e1", "s", "/x", 1), &mut out));
        assert!(
            !t.admit(&bob, &upload("e2", "s", "/y", 1), &mut out),
            "held"
        );
        clock.advance(Duration::from_secs(1));
        // The bucket allows one again, but e2 is still pending: e3 joins it, both flushed.
        assert!(!t.admit(&bob, &upload("e3", "s", "/z", 1), &mut out));
        assert_eq!(out.len(), 2);
        // A membership message flushing a pending change is not "as it is" either.
        assert!(!t.admit(&bob, &upload("e4", "s", "/w", 1), &mut out));
        let removed = decode(br#"{"id":"m","type":"space-member-removed","time":"2026-11-22T10:00:01Z","data":{"space_id":"s","user":"bob"}}"#).unwrap();
        let removal = Prepared::new(UserMessage::from_event(&removed));
        assert!(!t.admit(&bob, &removal, &mut out));
        // With nothing pending it is.
        let carol: Arc<str> = Arc::from("carol");
        assert!(t.admit(&carol, &removal, &mut out));
    }

    #[test]
    fn users_are_limited_independently() {
        let (mut t, _clock) = throttle(1.0, 2, 100);
        let mut out = Vec::new();
        for user in ["a", "b", "c"] {
            let u: Arc<str> = Arc::from(user);
            t.admit(&u, &upload("e1", "s", "/x", 1), &mut out);
            t.admit(&u, &upload("e2", "s", "/x", 1), &mut out);
            t.admit(&u, &upload("e3", "s", "/x", 1), &mut out);
        }
        assert_eq!(out.len(), 6);
        let mut rest = Vec::new();
        t.flush_all(&mut rest);
        assert_eq!(rest.len(), 3);
    }

    #[test]
    fn held_messages_hold_back_their_offsets() {
        let (mut t, clock) = throttle(1.0, 1, 100);
        let bob: Arc<str> = Arc::from("bob");
        let mut out = Vec::new();
        let with_origin = |id: &str, p: i32, o: i64| {
            let mut m = upload(id, "s", "/x", 1);
            m.origin = Some((p, o));
            m
        };
        t.admit(&bob, &with_origin("e1", 0, 10), &mut out);
        assert!(t.held_floor().is_empty(), "sent at once: nothing held");
        t.admit(&bob, &with_origin("e2", 0, 11), &mut out);
        t.admit(&bob, &with_origin("e3", 1, 5), &mut out);
        t.admit(&bob, &with_origin("e4", 0, 12), &mut out);
        assert_eq!(t.held_floor(), HashMap::from([(0, 11), (1, 5)]));
        clock.advance(Duration::from_secs(1));
        t.flush_ready(&mut out);
        assert!(
            t.held_floor().is_empty(),
            "flushed: the offsets may be committed"
        );
    }

    #[test]
    fn idle_users_are_forgotten() {
        let (mut t, clock) = throttle(10.0, 5, 100);
        let mut out = Vec::new();
        for i in 0..100 {
            let u: Arc<str> = Arc::from(format!("u{i}"));
            t.admit(&u, &upload("e", "s", "/x", 1), &mut out);
        }
        assert_eq!(t.users.len(), 100);
        clock.advance(Duration::from_secs(1));
        t.flush_ready(&mut out);
        assert!(t.users.is_empty());
    }
}
