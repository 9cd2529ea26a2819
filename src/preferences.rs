//! Per-user preferences: spaces a user muted, and the message types they want.
//!
//! A user edits their own (`GET`/`PUT /api/preferences` on the gateway); they are stored in the
//! bus (Redis `fc:{user}:prefs`, the in-process bus for the embedded default, seeded from a
//! fixture file) and applied by the consumer **before** publishing, so muted traffic costs
//! nothing downstream: no stream entry, no channel message, no gateway work.
//!
//! What a preference can never hide: a `resync` of a space the user did not mute (it says the
//! client's view is stale, and hiding it would be silence), and a `critical` notification
//! (operators use those for what every user must see).
//!
//! The consumer reads preferences through [`PreferenceFilter`]: a bounded cache in front of the
//! bus, filled by one batched read per event for the recipients it does not know, and
//! forgotten after `ttl` so a change takes effect within that time. A bus that cannot answer
//! does not stop delivery: the message goes out as if the user had no preferences (a muted
//! message delivered is a lesser harm than a change lost), and the failure is logged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::bus::Bus;
use crate::membership::UserList;

/// Spaces one user may mute.
pub const MAX_MUTED_SPACES: usize = 256;
/// The longest space id a preference may name (as for watches).
pub const MAX_SPACE_ID_BYTES: usize = 256;
/// The largest preferences document accepted.
pub const MAX_BYTES: usize = 64 * 1024;

/// The message types a user may choose among. `coalesced` messages carry only the chosen types
/// (preferences apply before the rate limit folds anything), and `resync` is never optional.
pub const CHOOSABLE_TYPES: &[&str] = &[
    "file-uploaded",
    "file-touched",
    "folder-created",
    "item-trashed",
    "item-restored",
    "item-moved",
    "space-member-added",
    "space-member-removed",
    "notification",
];

/// One user's preferences (`schemas/preferences.schema.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preferences {
    /// Nothing from these spaces reaches the user (not even resyncs).
    #[serde(default)]
    pub muted_spaces: Vec<String>,
    /// Only these message types reach the user; absent: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub types: Option<Vec<String>>,
}

impl Preferences {
    /// Parses and checks a document a user sent (or the bus holds).
    pub fn parse(json: &[u8]) -> Result<Preferences, String> {
        if json.len() > MAX_BYTES {
            return Err(format!("preferences are at most {MAX_BYTES} bytes"));
        }
        let mut prefs: Preferences =
            serde_json::from_slice(json).map_err(|e| format!("not preferences: {e}"))?;
        if prefs.muted_spaces.len() > MAX_MUTED_SPACES {
            return Err(format!("at most {MAX_MUTED_SPACES} muted spaces"));
        }
        if let Some(bad) = prefs
            .muted_spaces
            .iter()
            .find(|s| s.is_empty() || s.len() > MAX_SPACE_ID_BYTES)
        {
            return Err(format!(
                "a muted space id is 1 to {MAX_SPACE_ID_BYTES} bytes, not {} bytes",
                bad.len()
            ));
        }
        if let Some(bad) = prefs
            .types
            .iter()
            .flatten()
            .find(|t| !CHOOSABLE_TYPES.contains(&t.as_str()))
        {
            return Err(format!(
                "unknown message type {bad:?}; choose among {}",
                CHOOSABLE_TYPES.join(", ")
            ));
        }
        prefs.muted_spaces.sort();
        prefs.muted_spaces.dedup();
        if let Some(types) = &mut prefs.types {
            types.sort();
            types.dedup();
        }
        Ok(prefs)
    }

    /// Whether nothing is filtered.
    pub fn is_default(&self) -> bool {
        self.muted_spaces.is_empty() && self.types.is_none()
    }

    /// Whether a message of `message_type` from `space` reaches this user.
    pub fn allows(&self, space: &str, message_type: &str) -> bool {
        if self
            .muted_spaces
            .binary_search_by(|s| s.as_str().cmp(space))
            .is_ok()
        {
            return false;
        }
        message_type == crate::notify::message::RESYNC
            || self
                .types
                .as_ref()
                .is_none_or(|t| t.binary_search_by(|x| x.as_str().cmp(message_type)).is_ok())
    }

    /// Whether a notification reaches this user: critical ones always do.
    pub fn allows_notification(&self, critical: bool) -> bool {
        critical
            || self
                .types
                .as_ref()
                .is_none_or(|t| t.iter().any(|x| x == "notification"))
    }
}

/// Reads `users`' preferences from `bus`, in order (the default for those who stored none or
/// whose stored document is unreadable); `None` when the bus cannot answer.
pub async fn read(bus: &dyn Bus, users: &[Arc<str>]) -> Option<Vec<Preferences>> {
    match bus.preferences(users).await {
        Ok(stored) => Some(
            users
                .iter()
                .zip(stored)
                .map(|(user, json)| match json.as_deref().map(|j| Preferences::parse(j.as_bytes())) {
                    None => Preferences::default(),
                    Some(Ok(p)) => p,
                    Some(Err(e)) => {
                        tracing::warn!(%user, error = %e, "stored preferences unreadable; ignored");
                        Preferences::default()
                    }
                })
                .collect(),
        ),
        Err(e) => {
            tracing::warn!(error = %e, users = users.len(), "preferences unreadable; delivering as if none were set");
            None
        }
    }
}

/// `users` less those who turned notifications off (`critical` ones reach everyone), and how
/// many were left out.
pub async fn wanting_notifications(
    bus: &dyn Bus,
    users: &[Arc<str>],
    critical: bool,
) -> (Vec<Arc<str>>, usize) {
    if critical {
        return (users.to_vec(), 0);
    }
    let mut kept = Vec::with_capacity(users.len());
    // In chunks: one read per chunk, as the publisher sends them.
    for chunk in users.chunks(1024) {
        match read(bus, chunk).await {
            Some(prefs) => kept.extend(
                chunk
                    .iter()
                    .zip(prefs)
                    .filter(|(_, p)| p.allows_notification(false))
                    .map(|(u, _)| u.clone()),
            ),
            None => kept.extend(chunk.iter().cloned()),
        }
    }
    let muted = users.len() - kept.len();
    (kept, muted)
}

/// A fixture of users' preferences (`{"users": {"<user>": {…}}}`), each checked, for the
/// embedded default's in-process bus.
pub fn load_fixture(path: &std::path::Path) -> Result<Vec<(String, Preferences)>, String> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Fixture {
        users: std::collections::BTreeMap<String, serde_json::Value>,
    }
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let fixture: Fixture =
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    fixture
        .users
        .into_iter()
        .map(|(user, prefs)| {
            Preferences::parse(prefs.to_string().as_bytes())
                .map(|p| (user.clone(), p))
                .map_err(|e| format!("{}: user {user:?}: {e}", path.display()))
        })
        .collect()
}

/// Users whose preferences are cached at most (each entry is small; most are the default).
const CACHED_USERS: usize = 1 << 20;

/// Preferences read through a cache, for the consumer and the notification publisher.
///
/// `quick_cache` rather than moka: the filter asks once per recipient of every event (20 per
/// event in `bench consume`), and moka's bookkeeping per read cost about 0.3 µs each, 15 % of the
/// consumer's CPU; the time to live is checked here against when the entry was read.
pub struct PreferenceFilter {
    bus: Arc<dyn Bus>,
    cache: quick_cache::sync::Cache<Arc<str>, (Arc<Preferences>, Instant)>,
    ttl: Duration,
}

impl PreferenceFilter {
    /// Preferences from `bus`, each remembered for `ttl` (how soon a change takes effect).
    pub fn new(bus: Arc<dyn Bus>, ttl: Duration) -> Self {
        PreferenceFilter {
            bus,
            cache: quick_cache::sync::Cache::new(CACHED_USERS),
            ttl: ttl.max(Duration::from_millis(1)),
        }
    }

    /// The preferences of each of `users`, in order (the default for those who stored none, and
    /// for everyone when the bus cannot answer).
    pub async fn of(&self, users: &[Arc<str>]) -> Vec<Arc<Preferences>> {
        let now = Instant::now();
        let mut found: Vec<Option<Arc<Preferences>>> = users
            .iter()
            .map(|u| {
                self.cache
                    .get(u)
                    .filter(|(_, read)| now.saturating_duration_since(*read) < self.ttl)
                    .map(|(prefs, _)| prefs)
            })
            .collect();
        let missing: Vec<Arc<str>> = users
            .iter()
            .zip(&found)
            .filter(|(_, p)| p.is_none())
            .map(|(u, _)| u.clone())
            .collect();
        if !missing.is_empty()
            && let Some(stored) = read(&*self.bus, &missing).await
        {
            let mut read = missing.iter().zip(stored);
            for slot in found.iter_mut().filter(|p| p.is_none()) {
                let Some((user, prefs)) = read.next() else {
                    break;
                };
                let prefs = Arc::new(prefs);
                self.cache.insert(user.clone(), (prefs.clone(), now));
                *slot = Some(prefs);
            }
        }
        found.into_iter().map(Option::unwrap_or_default).collect()
    }

    /// `recipients` less those who do not want a `message_type` message from `space`, and how
    /// many were left out. The shared list is kept as it is when nobody is left out.
    pub async fn keep(
        &self,
        recipients: UserList,
        space: &str,
        message_type: &str,
    ) -> (UserList, usize) {
        let prefs = self.of(&recipients).await;
        if prefs.iter().all(|p| p.allows(space, message_type)) {
            return (recipients, 0);
        }
        let kept: Vec<Arc<str>> = recipients
            .iter()
            .zip(&prefs)
            .filter(|(_, p)| p.allows(space, message_type))
            .map(|(u, _)| u.clone())
            .collect();
        let muted = recipients.len() - kept.len();
        (kept.into(), muted)
    }

    /// Forgets what is cached for `user` (their preferences just changed here).
    pub fn forget(&self, user: &str) {
        self.cache.remove(user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A change stored behind the filter's back shows after the time to live, and at once for a
    /// user the filter was told to forget; until then the cached answer stands.
    #[tokio::test]
    async fn cached_preferences_last_their_time_to_live_or_until_forgotten() {
        let (tx, _rx) = tokio::sync::mpsc::channel(16);
        let bus: Arc<dyn Bus> = Arc::new(crate::bus::MemoryBus::new(Arc::new(tx)));
        let filter = PreferenceFilter::new(bus.clone(), Duration::from_millis(300));
        let users: Vec<Arc<str>> = vec![Arc::from("alice"), Arc::from("bob")];
        let muted = |prefs: &[Arc<Preferences>]| -> Vec<usize> {
            prefs.iter().map(|p| p.muted_spaces.len()).collect()
        };
        assert_eq!(muted(&filter.of(&users).await), [0, 0]);

        let one = Some(r#"{"muted_spaces":["s1"]}"#);
        bus.set_preferences("alice", one).await.unwrap();
        bus.set_preferences("bob", one).await.unwrap();
        assert_eq!(muted(&filter.of(&users).await), [0, 0], "cached");
        filter.forget("bob");
        assert_eq!(muted(&filter.of(&users).await), [0, 1], "bob forgotten");

        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(muted(&filter.of(&users).await), [1, 1], "alice expired");
    }

    #[test]
    fn documents_are_checked_and_normalised() {
        let p = Preferences::parse(
            br#"{"muted_spaces":["b","a","b"],"types":["item-moved","file-uploaded"]}"#,
        )
        .unwrap();
        assert_eq!(p.muted_spaces, ["a", "b"]);
        assert_eq!(p.types.as_deref().unwrap(), ["file-uploaded", "item-moved"]);
        assert!(Preferences::parse(b"{}").unwrap().is_default());
        for bad in [
            &br#"{"types":["resync"]}"#[..],
            br#"{"types":["file-uploaded","nope"]}"#,
            br#"{"muted_spaces":[""]}"#,
            br#"{"muted":["a"]}"#,
            br#"{"muted_spaces":"a"}"#,
            b"not json",
        ] {
            assert!(
                Preferences::parse(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let many = serde_json::json!({"muted_spaces": (0..=MAX_MUTED_SPACES).map(|i| format!("s{i}")).collect::<Vec<_>>()});
        assert!(Preferences::parse(many.to_string().as_bytes()).is_err());
    }

    #[test]
    fn mutes_and_types_filter_but_never_a_resync_of_a_space_still_watched() {
        let p =
            Preferences::parse(br#"{"muted_spaces":["s-mkt"],"types":["file-uploaded"]}"#).unwrap();
        assert!(p.allows("s-eng", "file-uploaded"));
        assert!(!p.allows("s-eng", "item-moved"));
        assert!(p.allows("s-eng", "resync"), "a resync is never optional");
        assert!(!p.allows("s-mkt", "file-uploaded"));
        assert!(!p.allows("s-mkt", "resync"), "a muted space says nothing");
        assert!(!p.allows_notification(false));
        assert!(
            p.allows_notification(true),
            "critical notices ignore preferences"
        );
        let all = Preferences::default();
        assert!(all.allows("s-mkt", "item-moved") && all.allows_notification(false));
    }
}
