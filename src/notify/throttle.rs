//! Per-user rate limiting that never loses a change, and never repeats one.
//!
//! Each user has a token bucket (governor's keyed limiter), shared by every ordered lane of the
//! consumer, so a user's rate is one figure however many partitions feed them. A message the
//! bucket allows goes out at once; one it refuses is held in the user's pending change for that
//! space, in the lane that read it: folder changes are folded as a client would apply them
//! ([`super::fold`]: deltas summed per run, absolute sizes kept in place), the latest change of
//! each path is kept, and every covered event id is listed. The pending change is flushed as one
//! `coalesced` message when the bucket allows. A user whose pending backlog grows past
//! `max_backlog` events gets one `resync` per space instead: their client refetches rather than
//! replaying a flood.
//!
//! Held changes belong to a lane ([`Throttle`]), never shared: the lane that read an event is
//! the one that publishes it, held or not, so a flush never races the lane's own batch (which
//! would reorder a user's messages).
//!
//! A message standing for several events carries them all ([`Covered`]), with a way to rebuild
//! it without the events a user already had: after a consumer crash the same events may be
//! grouped differently, and the bus, not this stage, knows what each user received.
//!
//! Membership messages are never held back: they first flush that space's pending change (so
//! order is kept, and a removed user's last message really is the last), then go out.
//!
//! Each held message may carry its event's [`EventRef`]; once a held change leaves, its refs are
//! [released](Throttle::take_released), so the driver acknowledges an event to its source only
//! when everything derived from it was published.
//!
//! The clock is a parameter so a replay can follow event time and stay deterministic.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use indexmap::IndexMap;

use super::fold::FolderFold;
use super::message::{COALESCED, ItemUpdate, Prepared, UserMessage};
use crate::bus::{Covered, Outgoing};

/// The driver's number for one source event, so holding a message holds back its event's
/// acknowledgement. Opaque here.
pub type EventRef = u64;

/// Rate-limit settings.
#[derive(Debug, Clone, Copy)]
pub struct ThrottleConfig {
    /// Messages per second per user.
    pub rate: f64,
    pub burst: u32,
    /// Pending events per user beyond which the user gets `resync` instead.
    pub max_backlog: usize,
}

type Limiter<C> =
    RateLimiter<Arc<str>, DashMapStateStore<Arc<str>>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// Every user's bucket, shared by the lanes of one consumer.
pub struct Buckets<C: Clock> {
    limiter: Limiter<C>,
    clock: C,
    max_backlog: usize,
    /// How long an idle bucket takes to refill; a user idle that long can be forgotten.
    refill: Duration,
}

impl<C: Clock + Clone> Buckets<C> {
    /// `None` when `rate` is 0 (limiting off).
    pub fn new(config: ThrottleConfig, clock: C) -> Option<Arc<Self>> {
        if !(config.rate > 0.0 && config.rate.is_finite()) {
            return None;
        }
        let period = Duration::from_secs_f64(1.0 / config.rate);
        let burst = NonZeroU32::new(config.burst.max(1)).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period)?.allow_burst(burst);
        Some(Arc::new(Buckets {
            limiter: RateLimiter::dashmap_with_clock(quota, clock.clone()),
            clock,
            max_backlog: config.max_backlog.max(1),
            refill: period.saturating_mul(burst.get()),
        }))
    }

    /// A lane's throttle over these buckets.
    pub fn lane(self: &Arc<Self>) -> Throttle<C> {
        Throttle {
            buckets: self.clone(),
            users: BTreeMap::new(),
            released: Vec::new(),
            last_prune: self.clock.now(),
        }
    }

    fn allows(&self, user: &Arc<str>) -> bool {
        self.limiter.check_key(user).is_ok()
    }
}

/// One lane's held changes.
pub struct Throttle<C: Clock> {
    buckets: Arc<Buckets<C>>,
    /// Users holding changes in this lane (and only those), sorted so flushes come out in a
    /// deterministic order.
    users: BTreeMap<Arc<str>, UserState>,
    /// Refs of held events whose messages left since the last [`Throttle::take_released`].
    released: Vec<EventRef>,
    last_prune: C::Instant,
}

#[derive(Default)]
struct UserState {
    /// Per space, oldest first.
    pending: IndexMap<Arc<str>, Pending>,
    /// Events held in `pending` (coalescing ones; a resync holds none).
    backlog: usize,
}

enum Pending {
    /// The held messages, oldest first.
    Coalescing(Vec<Prepared>),
    Resync {
        time: Arc<str>,
        event_ids: Vec<Arc<str>>,
        refs: Vec<EventRef>,
    },
}

impl<C: Clock + Clone> Throttle<C> {
    /// A throttle with buckets of its own (one lane). `None` when `rate` is 0 (limiting off).
    pub fn new(config: ThrottleConfig, clock: C) -> Option<Self> {
        Buckets::new(config, clock).map(|b| b.lane())
    }

    /// Offers `msg` for `user`; whatever may go out now is appended to `out`. True when exactly
    /// `msg` went out, as it is (nothing held, nothing flushed with it).
    pub fn admit(&mut self, user: &Arc<str>, msg: &Prepared, out: &mut Vec<Outgoing>) -> bool {
        let space = &msg.message.space_id;
        if msg.message.is_never_held() {
            let mut as_is = true;
            if let Some(state) = self.users.get_mut(user) {
                if let Some(pending) = state.pending.shift_remove(space) {
                    as_is = false;
                    state.emit(user, space, pending, out, &mut self.released);
                }
                if state.pending.is_empty() {
                    self.users.remove(user);
                }
            }
            out.push(msg.to(user));
            return as_is;
        }
        if !self.users.contains_key(user) && self.buckets.allows(user) {
            out.push(msg.to(user));
            return true;
        }
        let state = self.users.entry(user.clone()).or_default();
        state.hold(space, msg, self.buckets.max_backlog);
        state.flush_allowed(user, &self.buckets, out, &mut self.released);
        if state.pending.is_empty() {
            self.users.remove(user);
        }
        false
    }

    /// Flushes the pending changes the buckets now allow; now and then forgets idle buckets.
    pub fn flush_ready(&mut self, out: &mut Vec<Outgoing>) {
        let buckets = &self.buckets;
        let released = &mut self.released;
        self.users.retain(|user, state| {
            state.flush_allowed(user, buckets, out, released);
            !state.pending.is_empty()
        });
        let now = buckets.clock.now();
        if Duration::from(now.duration_since(self.last_prune)) >= buckets.refill {
            // A bucket idle for a whole refill period is full again: nothing to keep.
            self.last_prune = now;
            buckets.limiter.retain_recent();
        }
    }

    /// Flushes everything regardless of the buckets (end of a replay, a drain).
    pub fn flush_all(&mut self, out: &mut Vec<Outgoing>) {
        for (user, mut state) in std::mem::take(&mut self.users) {
            while let Some((space, pending)) = state.pending.shift_remove_index(0) {
                state.emit(&user, &space, pending, out, &mut self.released);
            }
        }
    }

    /// Users with held changes.
    pub fn pending_users(&self) -> usize {
        self.users.len()
    }

    /// Moves the refs of held events whose messages were emitted since the last call to `into`.
    pub fn take_released(&mut self, into: &mut Vec<EventRef>) {
        into.append(&mut self.released);
    }
}

impl UserState {
    fn hold(&mut self, space: &Arc<str>, msg: &Prepared, max_backlog: usize) {
        match self.pending.get_mut(space) {
            Some(Pending::Resync {
                time,
                event_ids,
                refs,
            }) => {
                *time = msg.message.time.clone();
                event_ids.extend(msg.event_id.clone());
                refs.extend(msg.origin);
                return;
            }
            Some(Pending::Coalescing(parts)) => parts.push(msg.clone()),
            None => {
                self.pending
                    .insert(space.clone(), Pending::Coalescing(vec![msg.clone()]));
            }
        }
        self.backlog += 1;
        if self.backlog > max_backlog {
            // Too far behind: a refetch is cheaper for everyone than the backlog.
            for pending in self.pending.values_mut() {
                if let Pending::Coalescing(parts) = pending {
                    *pending = Pending::Resync {
                        time: parts
                            .last()
                            .map(|p| p.message.time.clone())
                            .unwrap_or_else(|| Arc::from("")),
                        event_ids: parts.iter().filter_map(|p| p.event_id.clone()).collect(),
                        refs: parts.iter().filter_map(|p| p.origin).collect(),
                    };
                }
            }
            self.backlog = 0;
        }
    }

    fn flush_allowed<C: Clock + Clone>(
        &mut self,
        user: &Arc<str>,
        buckets: &Buckets<C>,
        out: &mut Vec<Outgoing>,
        released: &mut Vec<EventRef>,
    ) {
        while !self.pending.is_empty() && buckets.allows(user) {
            if let Some((space, pending)) = self.pending.shift_remove_index(0) {
                self.emit(user, &space, pending, out, released);
            }
        }
    }

    fn emit(
        &mut self,
        user: &Arc<str>,
        space: &Arc<str>,
        pending: Pending,
        out: &mut Vec<Outgoing>,
        released: &mut Vec<EventRef>,
    ) {
        let message = match pending {
            Pending::Resync {
                time,
                event_ids,
                refs,
            } => {
                released.extend(refs);
                let payload = super::message::encode(&UserMessage::resync(
                    space.clone(),
                    time,
                    event_ids.len() as u64,
                    event_ids.last().map(|id| &**id),
                ));
                let mut msg = Outgoing::for_event(user.clone(), payload, event_ids.last().cloned());
                msg.covers = Some(Arc::new(Covered {
                    event_ids,
                    without: None,
                }));
                msg
            }
            Pending::Coalescing(parts) => {
                self.backlog = self.backlog.saturating_sub(parts.len());
                released.extend(parts.iter().filter_map(|p| p.origin));
                coalesce(user, space, parts)
            }
        };
        out.push(message);
    }
}

/// The message for held `parts` (oldest first): the original when there is one, else one
/// `coalesced` message that can rebuild itself without any of its events.
fn coalesce(user: &Arc<str>, space: &Arc<str>, mut parts: Vec<Prepared>) -> Outgoing {
    if parts.len() == 1
        && let Some(only) = parts.pop()
    {
        return only.to(user);
    }
    let message = fold(space, &parts);
    let payload = super::message::encode(&message);
    let event_ids: Vec<Arc<str>> = parts.iter().filter_map(|p| p.event_id.clone()).collect();
    let mut msg = Outgoing::for_event(user.clone(), payload, event_ids.last().cloned());
    let (user, space) = (user.clone(), space.clone());
    msg.covers = Some(Arc::new(Covered {
        event_ids,
        without: Some(Box::new(move |had: &[&str]| {
            let rest: Vec<Prepared> = parts
                .iter()
                .filter(|p| !p.event_id.as_deref().is_some_and(|id| had.contains(&id)))
                .cloned()
                .collect();
            (!rest.is_empty()).then(|| coalesce(&user, &space, rest))
        })),
    }));
    msg
}

/// Folds held messages into one `coalesced` message: folder changes folded ([`FolderFold`]),
/// the latest change of each path (in the order paths last changed), every event id.
fn fold(space: &Arc<str>, parts: &[Prepared]) -> UserMessage {
    let mut event_ids = Vec::with_capacity(parts.len());
    let mut actor: Option<Option<String>> = None;
    let mut mixed_actors = false;
    let mut time: Arc<str> = Arc::from("");
    let mut items: IndexMap<String, ItemUpdate> = IndexMap::new();
    let mut folders = FolderFold::new();
    for part in parts {
        let m = &part.message;
        if let Some(ids) = &m.event_ids {
            event_ids.extend(ids.iter().cloned());
        } else if let Some(id) = &m.event_id {
            event_ids.push(id.clone());
        }
        match &actor {
            None => actor = Some(m.actor.clone()),
            Some(a) if *a != m.actor => mixed_actors = true,
            Some(_) => {}
        }
        time = m.time.clone();
        if let (Some(item), Some(id)) = (&m.item, &m.event_id) {
            let key = item.path.as_str().to_owned();
            items.shift_remove(&key);
            items.insert(
                key,
                ItemUpdate {
                    change: m.message_type,
                    event_id: id.clone(),
                    item: item.clone(),
                },
            );
        }
        // Summed per run (a folder and how far up): as linear as the parts, and exact for a
        // client that applies every entry in order (absolute sizes keep their place).
        for entry in m.folders.iter().flatten() {
            folders.add(entry);
        }
    }
    UserMessage {
        event_id: event_ids.last().cloned(),
        message_type: COALESCED,
        space_id: space.clone(),
        actor: if mixed_actors { None } else { actor.flatten() },
        // A client skipping its own changes must not skip the others' folded in with them.
        initiator_id: None,
        time,
        item: None,
        folders: Some(folders.finish()),
        member: None,
        event_ids: Some(event_ids),
        items: Some(items.into_values().collect()),
        reason: None,
        skipped: None,
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

    /// A message's folder changes, runs expanded and summed per folder.
    fn per_folder(m: &Value) -> std::collections::BTreeMap<String, i64> {
        let mut sums = std::collections::BTreeMap::new();
        for f in m["folders"].as_array().into_iter().flatten() {
            let mut path = Some(f["path"].as_str().unwrap().to_owned());
            for _ in 0..f["levels"].as_u64().unwrap() {
                let Some(p) = path else { break };
                *sums.entry(p.clone()).or_insert(0) += f["size_delta"].as_i64().unwrap();
                path = crate::path::parent_str(&p).map(str::to_owned);
            }
        }
        sums
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
    fn summed_deltas_saturate_instead_of_wrapping() {
        let huge = |id: &str| {
            let mut m = UserMessage::from_event(
                &decode(
                    format!(r#"{{"id":"{id}","type":"file-uploaded","time":"2026-11-22T10:00:00Z","data":{{"space_id":"s","path":"/a/f","kind":"file","size":1}}}}"#).as_bytes(),
                )
                .unwrap(),
            );
            for f in m.folders.iter_mut().flatten() {
                f.size_delta = Some(i64::MAX / 2 + 1);
            }
            Prepared::new(m)
        };
        let folded = fold(&Arc::from("s"), &[huge("e1"), huge("e2"), huge("e3")]);
        for f in folded.folders.iter().flatten() {
            assert_eq!(f.size_delta, Some(i64::MAX), "{}", f.path);
        }
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
        assert_eq!(
            per_folder(c),
            [("/a/b".into(), 50), ("/a".into(), 50), ("/".into(), 50)].into(),
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
    fn held_events_are_released_when_their_messages_leave() {
        let (mut t, clock) = throttle(1.0, 1, 100);
        let bob: Arc<str> = Arc::from("bob");
        let mut out = Vec::new();
        let with_ref = |id: &str, r: EventRef| {
            let mut m = upload(id, "s", "/x", 1);
            m.origin = Some(r);
            m
        };
        let mut released = Vec::new();
        t.admit(&bob, &with_ref("e1", 10), &mut out);
        t.take_released(&mut released);
        assert!(released.is_empty(), "sent at once: nothing was held");
        t.admit(&bob, &with_ref("e2", 11), &mut out);
        t.admit(&bob, &with_ref("e3", 12), &mut out);
        t.flush_ready(&mut out);
        t.take_released(&mut released);
        assert!(released.is_empty(), "still held");
        clock.advance(Duration::from_secs(1));
        t.flush_ready(&mut out);
        t.take_released(&mut released);
        assert_eq!(
            released,
            [11, 12],
            "flushed: their events may be acknowledged"
        );
    }

    #[test]
    fn a_coalesced_message_covers_its_events_and_rebuilds_without_some() {
        let (mut t, clock) = throttle(1.0, 1, 100);
        let bob: Arc<str> = Arc::from("bob");
        let mut out = Vec::new();
        t.admit(&bob, &upload("e1", "s", "/a/x", 1), &mut out);
        t.admit(&bob, &upload("e2", "s", "/a/y", 10), &mut out);
        t.admit(&bob, &upload("e3", "s", "/a/z", 100), &mut out);
        t.admit(&bob, &upload("e4", "s", "/b/w", 1000), &mut out);
        clock.advance(Duration::from_secs(1));
        t.flush_ready(&mut out);
        let coalesced = &out[1];
        let covers = coalesced.covers.as_ref().unwrap();
        let ids: Vec<&str> = covers.event_ids.iter().map(|i| &**i).collect();
        assert_eq!(ids, ["e2", "e3", "e4"]);
        let without = covers.without.as_ref().unwrap();
        // Without e3: e2 and e4 summed, e3's 100 bytes not counted again.
        let rebuilt = without(&["e3"]).unwrap();
        let m: Value = serde_json::from_slice(&rebuilt.payload).unwrap();
        assert_eq!(m["event_ids"], serde_json::json!(["e2", "e4"]));
        assert_eq!(
            per_folder(&m),
            [
                ("/".to_owned(), 1010),
                ("/a".to_owned(), 10),
                ("/b".to_owned(), 1000)
            ]
            .into()
        );
        assert_eq!(rebuilt.user, bob);
        // One left: the original message, as it was.
        let single = without(&["e2", "e4"]).unwrap();
        assert_eq!(single.event_id.as_deref(), Some("e3"));
        assert!(single.covers.is_none());
        let m: Value = serde_json::from_slice(&single.payload).unwrap();
        assert_eq!(m["type"], "file-uploaded");
        assert!(without(&["e2", "e3", "e4"]).is_none());
    }

    #[test]
    fn a_resync_covers_every_event_it_stands_for() {
        let (mut t, clock) = throttle(1.0, 1, 3);
        let bob: Arc<str> = Arc::from("bob");
        let mut out = Vec::new();
        for i in 0..10 {
            t.admit(&bob, &upload(&format!("e{i}"), "s", "/f", 1), &mut out);
        }
        clock.advance(Duration::from_secs(1));
        t.flush_ready(&mut out);
        let resync = &out[1];
        let covers = resync.covers.as_ref().unwrap();
        assert_eq!(covers.event_ids.len(), 9);
        assert!(
            covers.without.is_none(),
            "a resync is safe to receive twice"
        );
        assert_eq!(resync.event_id.as_deref(), Some("e9"));
    }

    #[test]
    fn lanes_share_each_users_bucket() {
        let buckets = Buckets::new(
            ThrottleConfig {
                rate: 1.0,
                burst: 1,
                max_backlog: 100,
            },
            FakeRelativeClock::default(),
        )
        .unwrap();
        let (mut a, mut b) = (buckets.lane(), buckets.lane());
        let bob: Arc<str> = Arc::from("bob");
        let mut out = Vec::new();
        assert!(a.admit(&bob, &upload("e1", "s1", "/x", 1), &mut out));
        assert!(
            !b.admit(&bob, &upload("e2", "s2", "/x", 1), &mut out),
            "the other lane sees the bucket empty"
        );
        assert_eq!((a.pending_users(), b.pending_users()), (0, 1));
    }

    #[test]
    fn idle_users_are_forgotten() {
        let (mut t, clock) = throttle(10.0, 5, 100);
        let mut out = Vec::new();
        for i in 0..100 {
            let u: Arc<str> = Arc::from(format!("u{i}"));
            t.admit(&u, &upload("e", "s", "/x", 1), &mut out);
        }
        assert_eq!(t.buckets.limiter.len(), 100);
        assert_eq!(t.pending_users(), 0, "nothing held, nothing kept per lane");
        clock.advance(Duration::from_secs(1));
        t.flush_ready(&mut out);
        assert_eq!(t.buckets.limiter.len(), 0);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Folding any deltas gives their saturating sum per folder: never a wrapped sign.
            #[test]
            fn folded_deltas_are_saturating_sums(deltas in prop::collection::vec(any::<i64>(), 1..12)) {
                let parts: Vec<Prepared> = deltas
                    .iter()
                    .enumerate()
                    .map(|(i, d)| {
                        let mut m = UserMessage::from_event(
                            &decode(
                                format!(r#"{{"id":"e{i}","type":"file-uploaded","time":"2026-11-22T10:00:00Z","data":{{"space_id":"s","path":"/a/f","kind":"file","size":1}}}}"#).as_bytes(),
                            )
                            .unwrap(),
                        );
                        for f in m.folders.iter_mut().flatten() {
                            f.size_delta = Some(*d);
                        }
                        Prepared::new(m)
                    })
                    .collect();
                let expected = deltas.iter().fold(0i64, |a, d| a.saturating_add(*d));
                let folded = fold(&Arc::from("s"), &parts);
                for f in folded.folders.iter().flatten() {
                    // Saturating addition is not associative at the edges; in order it is exact.
                    prop_assert_eq!(f.size_delta, Some(expected));
                }
            }
        }
    }
}
