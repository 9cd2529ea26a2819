//! The membership cache in front of a directory (oCIS): fresh, stale, or wait.
//!
//! Every event asks "who may list this space?", and a busy space asks thousands of times a second,
//! so the answer is cached per space and the directory is asked at most once per space per TTL:
//!
//! - **fresh** (younger than its TTL, jittered so spaces fetched together do not expire together,
//!   and never past the earliest grant expiry): answered from the cache;
//! - **stale** (older, but fetched less than `max_stale` ago): answered from the cache while one
//!   background request refreshes it (stale-while-revalidate); if oCIS is down, the last known
//!   members keep being served, and counted, until `max_stale`;
//! - **missing, invalidated or too old**: the caller waits for a fetch. If that fails because oCIS
//!   is unreachable the answer is `Unavailable` and the event waits and is retried, never dropped.
//!
//! Concurrent askers of one space share one request (single flight). A membership event
//! invalidates its space; a group membership event invalidates every cached space that grants
//! the group. A fetch that was already running when its space was invalidated still answers the
//! askers that were waiting for it, but its result is not cached.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use rand::Rng;

use super::graph::{GraphError, SpaceGrants};
use crate::event::{Member, MembershipChange};
use crate::membership::{MembershipResolver, ResolveError, UserList};

/// What the cache asks of a directory. [`super::graph::GraphClient`] is the real one.
#[async_trait]
pub trait Directory: Send + Sync + 'static {
    async fn space_grants(&self, space_id: &str) -> Result<SpaceGrants, GraphError>;
    async fn group_members(&self, group_id: &str) -> Result<Vec<String>, GraphError>;
    /// Every user (`GET /graph/v1.0/users`, all pages): for notifications to everyone.
    async fn all_users(&self) -> Result<Vec<String>, GraphError>;
}

#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// How long an answer is fresh.
    pub ttl: Duration,
    /// Fraction of the TTL added or removed at random (0.1 = ±10 %).
    pub jitter: f64,
    /// How long after its fetch an answer may still be served when oCIS cannot be reached.
    pub max_stale: Duration,
    /// Spaces (and, separately, groups) kept.
    pub capacity: u64,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            ttl: Duration::from_secs(60),
            jitter: 0.1,
            max_stale: Duration::from_secs(600),
            capacity: 100_000,
        }
    }
}

/// Counters, readable while the cache runs.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Requests for a space's grants sent to the directory.
    pub space_fetches: AtomicU64,
    /// Requests for a group's members sent to the directory.
    pub group_fetches: AtomicU64,
    /// Answers served from a fresh entry.
    pub fresh_hits: AtomicU64,
    /// Answers served from a stale entry (while refreshing, or because oCIS is unreachable).
    pub stale_served: AtomicU64,
    /// Fetches that failed because oCIS was unreachable.
    pub fetch_failures: AtomicU64,
    /// How long the directory (oCIS) took to answer a space's grants or a group's members,
    /// retries included.
    pub directory_seconds: crate::telemetry::Latency,
}

struct Entry {
    listers: UserList,
    /// Groups granted on the space, so a group change can find the spaces it affects.
    groups: Arc<[Arc<str>]>,
    fetched_at: Instant,
    fresh_until: Instant,
    /// Invalidated: the next asker waits for a fetch instead of getting this answer.
    invalidated: bool,
}

type FetchResult = Result<Arc<Entry>, ResolveError>;

/// The longest pause between background refreshes of a space while oCIS is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The spaces' answers: moka owns them (capacity and age bounds, eviction), and a plain map
/// mirrors what moka holds so the hot path, one lookup per event, is a read lock and a hash
/// (about 50 ns) rather than moka's bookkeeping of every read (about 500 ns: `bench membership`).
/// moka's eviction listener keeps the mirror from outliving moka's entries.
struct SpaceCache {
    owner: moka::sync::Cache<Arc<str>, Arc<Entry>>,
    mirror: Arc<std::sync::RwLock<HashMap<Arc<str>, Arc<Entry>>>>,
}

impl SpaceCache {
    fn new(capacity: u64, keep: Duration) -> Self {
        let mirror: Arc<std::sync::RwLock<HashMap<Arc<str>, Arc<Entry>>>> = Arc::default();
        let listener_mirror = mirror.clone();
        let owner = moka::sync::Cache::builder()
            .max_capacity(capacity)
            .time_to_live(keep)
            .eviction_listener(move |key: Arc<Arc<str>>, old: Arc<Entry>, cause| {
                if cause == moka::notification::RemovalCause::Replaced {
                    return;
                }
                if let Ok(mut m) = listener_mirror.write() {
                    // Only if the mirror still holds the evicted answer, not a newer one.
                    if m.get(&**key).is_some_and(|e| Arc::ptr_eq(e, &old)) {
                        m.remove(&**key);
                    }
                }
            })
            .build();
        SpaceCache { owner, mirror }
    }

    fn get(&self, space: &str) -> Option<Arc<Entry>> {
        if let Ok(m) = self.mirror.read()
            && let Some(e) = m.get(space)
        {
            return Some(e.clone());
        }
        let entry = self.owner.get(space)?;
        match self.mirror.write() {
            // If an insert raced ahead of us, its (newer) answer wins.
            Ok(mut m) => Some(m.entry(Arc::from(space)).or_insert(entry).clone()),
            Err(_) => Some(entry),
        }
    }

    fn insert(&self, space: Arc<str>, entry: Arc<Entry>) {
        if let Ok(mut m) = self.mirror.write() {
            m.insert(space.clone(), entry.clone());
        }
        self.owner.insert(space, entry);
    }

    /// Cached spaces whose grants include `group`.
    /// Cached drive ids naming `space`: itself, or `<storage>$<space>` for a bare space id.
    fn naming(&self, space: &str) -> Vec<Arc<str>> {
        let suffix = format!("${space}");
        self.owner
            .iter()
            .filter(|(id, _)| &***id == space || id.ends_with(&suffix))
            .map(|(id, _)| id.as_ref().clone())
            .collect()
    }

    fn granting(&self, group: &str) -> Vec<Arc<str>> {
        self.owner
            .iter()
            .filter(|(_, entry)| entry.groups.iter().any(|g| &**g == group))
            .map(|(space, _)| space.as_ref().clone())
            .collect()
    }
}

struct Flight {
    id: u64,
    result: Shared<BoxFuture<'static, FetchResult>>,
}

struct Inner<D> {
    directory: D,
    settings: CacheSettings,
    spaces: SpaceCache,
    groups: moka::future::Cache<Arc<str>, UserList>,
    flights: Mutex<HashMap<Arc<str>, Flight>>,
    next_flight: AtomicU64,
    /// Spaces whose last fetch failed because oCIS was unreachable: no background refresh before
    /// the instant, and the backoff that led to it (1 s doubling to 30 s). Without it, a busy
    /// space served stale during an outage would start a new refresh on every event.
    backoff: Mutex<HashMap<Arc<str>, (Instant, Duration)>>,
    stats: CacheStats,
}

/// A [`MembershipResolver`] that caches a [`Directory`].
pub struct CachedResolver<D> {
    inner: Arc<Inner<D>>,
}

impl<D: Directory> CachedResolver<D> {
    pub fn new(directory: D, settings: CacheSettings) -> Self {
        let keep = settings.ttl.mul_f64(1.0 + settings.jitter.abs()) + settings.max_stale;
        let spaces = SpaceCache::new(settings.capacity, keep);
        let groups = moka::future::Cache::builder()
            .max_capacity(settings.capacity)
            .time_to_live(settings.ttl)
            .build();
        CachedResolver {
            inner: Arc::new(Inner {
                directory,
                settings,
                spaces,
                groups,
                flights: Mutex::new(HashMap::new()),
                next_flight: AtomicU64::new(0),
                backoff: Mutex::new(HashMap::new()),
                stats: CacheStats::default(),
            }),
        }
    }

    pub fn stats(&self) -> &CacheStats {
        &self.inner.stats
    }

    /// Forces the next answer for `space_id` to come from the directory.
    pub fn invalidate_space(&self, space_id: &str) {
        self.inner.invalidate_space(space_id);
    }

    /// Forgets a group's members and invalidates every cached space that grants the group.
    pub async fn invalidate_group(&self, group_id: &str) {
        self.inner.groups.invalidate(group_id).await;
        let affected: Vec<Arc<str>> = self.inner.spaces.granting(group_id);
        for space in affected {
            self.inner.invalidate_space(&space);
        }
    }

    async fn members_of(&self, group_id: &str) -> Result<UserList, ResolveError> {
        self.inner.group_members(group_id).await
    }
}

impl<D: Directory> Inner<D> {
    fn invalidate_space(&self, space_id: &str) {
        if let Some(entry) = self.spaces.get(space_id) {
            self.spaces.insert(
                Arc::from(space_id),
                Arc::new(Entry {
                    listers: entry.listers.clone(),
                    groups: entry.groups.clone(),
                    fetched_at: entry.fetched_at,
                    fresh_until: entry.fetched_at,
                    invalidated: true,
                }),
            );
        }
        if let Ok(mut flights) = self.flights.lock() {
            flights.remove(space_id);
        }
    }

    async fn group_members(self: &Arc<Self>, group_id: &str) -> Result<UserList, ResolveError> {
        let this = self.clone();
        let id: Arc<str> = Arc::from(group_id);
        let key = id.clone();
        self.groups
            .try_get_with(key, async move {
                this.stats.group_fetches.fetch_add(1, Relaxed);
                let started = std::time::Instant::now();
                let answer = this.directory.group_members(&id).await;
                this.stats.directory_seconds.since(started);
                match answer {
                    Ok(users) => Ok(users.into_iter().map(Arc::from).collect::<UserList>()),
                    Err(GraphError::NotFound(detail)) => {
                        tracing::warn!(group = %id, %detail, "group not found; it grants nobody");
                        Ok(UserList::from(Vec::new()))
                    }
                    Err(e) => Err(e),
                }
            })
            .await
            .map_err(|e: Arc<GraphError>| {
                ResolveError::Unavailable(format!("group {group_id}: {e}"))
            })
    }

    /// Starts (or joins) the one fetch of `space_id`.
    fn flight(self: &Arc<Self>, space_id: &str) -> Shared<BoxFuture<'static, FetchResult>> {
        let Ok(mut flights) = self.flights.lock() else {
            // A poisoned lock only means another asker panicked; fetch without sharing.
            let this = self.clone();
            let space: Arc<str> = Arc::from(space_id);
            return async move { this.fetch(space, u64::MAX).await }
                .boxed()
                .shared();
        };
        if let Some(flight) = flights.get(space_id) {
            return flight.result.clone();
        }
        let id = self.next_flight.fetch_add(1, Relaxed);
        let space: Arc<str> = Arc::from(space_id);
        let this = self.clone();
        // Spawned so it completes (and fills the cache) even if every asker gives up.
        let task = tokio::spawn(this.fetch(space.clone(), id));
        let (this, key) = (self.clone(), space.clone());
        let result = async move {
            task.await.unwrap_or_else(|e| {
                // The fetch died without clearing its flight: clear it, or the space would
                // answer this error forever.
                if let Ok(mut flights) = this.flights.lock()
                    && flights.get(&key).is_some_and(|f| f.id == id)
                {
                    flights.remove(&key);
                }
                Err(ResolveError::Unavailable(format!(
                    "membership fetch failed: {e}"
                )))
            })
        }
        .boxed()
        .shared();
        flights.insert(
            space,
            Flight {
                id,
                result: result.clone(),
            },
        );
        result
    }

    async fn fetch(self: Arc<Self>, space: Arc<str>, flight: u64) -> FetchResult {
        let result = self.load(&space).await;
        let mut flights = self.flights.lock().ok();
        let current = flights
            .as_ref()
            .and_then(|f| f.get(&space))
            .is_some_and(|f| f.id == flight);
        if current {
            if let Some(f) = flights.as_mut() {
                f.remove(&space);
            }
            if let Ok(entry) = &result {
                self.spaces.insert(space.clone(), entry.clone());
            }
        }
        drop(flights);
        if let Ok(mut backoff) = self.backoff.lock() {
            match &result {
                Err(ResolveError::Unavailable(_)) => {
                    let wait = backoff
                        .get(&space)
                        .map_or(Duration::from_secs(1), |(_, w)| (*w * 2).min(MAX_BACKOFF));
                    backoff.insert(space, (Instant::now() + wait, wait));
                }
                _ => {
                    backoff.remove(&space);
                }
            }
        }
        result
    }

    /// Whether a background refresh of `space` may start now.
    fn may_refresh(&self, space: &str) -> bool {
        self.backoff
            .lock()
            .map(|b| b.get(space).is_none_or(|(at, _)| Instant::now() >= *at))
            .unwrap_or(true)
    }

    async fn load(self: &Arc<Self>, space: &str) -> FetchResult {
        self.stats.space_fetches.fetch_add(1, Relaxed);
        let started = std::time::Instant::now();
        let answer = self.directory.space_grants(space).await;
        self.stats.directory_seconds.since(started);
        let grants = match answer {
            Ok(g) => g,
            Err(e) => return Err(self.to_resolve_error(space, e)),
        };
        let mut users: Vec<Arc<str>> = Vec::new();
        let mut groups: Vec<Arc<str>> = Vec::new();
        let mut expansions = Vec::new();
        for grant in &grants.grants {
            match &grant.member {
                Member::User(u) if grant.role.can_list() => users.push(Arc::from(u.as_str())),
                Member::Group(g) => {
                    groups.push(Arc::from(g.as_str()));
                    if grant.role.can_list() {
                        expansions.push(g.clone());
                    }
                }
                Member::User(_) => {}
            }
        }
        // Groups are shared by many spaces: each is fetched once per TTL, not once per space.
        let expanded =
            futures_util::future::join_all(expansions.iter().map(|g| self.group_members(g))).await;
        for members in expanded {
            match members {
                Ok(m) => users.extend(m.iter().cloned()),
                Err(e) => {
                    self.stats.fetch_failures.fetch_add(1, Relaxed);
                    return Err(e);
                }
            }
        }
        users.sort();
        users.dedup();
        groups.sort();
        groups.dedup();
        let fetched_at = Instant::now();
        let jitter = self.settings.jitter.abs().min(0.9);
        let factor = if jitter > 0.0 {
            rand::rng().random_range(1.0 - jitter..=1.0 + jitter)
        } else {
            1.0
        };
        let mut fresh_until = fetched_at + self.settings.ttl.mul_f64(factor);
        if let Some(expiry) = grants.expires {
            // A grant that expires ends the answer's freshness with it.
            let left = expiry
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            fresh_until = fresh_until.min(fetched_at + left);
        }
        Ok(Arc::new(Entry {
            listers: users.into(),
            groups: groups.into(),
            fetched_at,
            fresh_until,
            invalidated: false,
        }))
    }

    fn to_resolve_error(&self, space: &str, e: GraphError) -> ResolveError {
        match e {
            GraphError::NotFound(detail) => {
                ResolveError::UnknownSpace(format!("{space} (gone: {detail})"))
            }
            GraphError::Refused { detail, .. } => {
                ResolveError::Refused(format!("space {space}: {detail}"))
            }
            GraphError::Unauthorized(detail) => {
                self.stats.fetch_failures.fetch_add(1, Relaxed);
                tracing::error!(%space, %detail, "oCIS refused foldercast's credentials; events wait");
                ResolveError::Unavailable(detail)
            }
            GraphError::Unavailable(detail) => {
                self.stats.fetch_failures.fetch_add(1, Relaxed);
                ResolveError::Unavailable(detail)
            }
        }
    }
}

#[async_trait]
impl<D: Directory> MembershipResolver for CachedResolver<D> {
    fn cache_stats(&self) -> Option<&CacheStats> {
        Some(self.stats())
    }

    async fn group_members(&self, group: &str) -> Result<UserList, ResolveError> {
        self.members_of(group).await
    }

    async fn all_users(&self) -> Result<(UserList, &'static str), ResolveError> {
        let mut users = self
            .inner
            .directory
            .all_users()
            .await
            .map_err(|e| match e {
                GraphError::Unavailable(reason) => ResolveError::Unavailable(reason),
                other => ResolveError::Refused(format!("listing oCIS's users: {other}")),
            })?;
        users.sort();
        users.dedup();
        Ok((
            users.into_iter().map(Arc::from).collect(),
            "oCIS's users (GET /graph/v1.0/users)",
        ))
    }

    fn invalidate(&self, space_id: &str) {
        let named = self.inner.spaces.naming(space_id);
        tracing::debug!(space_id, cached = named.len(), "membership invalidated");
        for id in named {
            self.inner.invalidate_space(&id);
        }
        // A fetch in flight for an id not cached yet must not be cached either.
        self.inner.invalidate_space(space_id);
    }

    async fn listers(&self, space_id: &str) -> Result<UserList, ResolveError> {
        let inner = &self.inner;
        let now = Instant::now();
        let cached = inner.spaces.get(space_id);
        if let Some(entry) = &cached {
            if now < entry.fresh_until {
                inner.stats.fresh_hits.fetch_add(1, Relaxed);
                return Ok(entry.listers.clone());
            }
            let within_limit = now.duration_since(entry.fetched_at) <= inner.settings.max_stale;
            if within_limit && !entry.invalidated {
                // Stale while revalidating: answer now, refresh behind the asker's back.
                inner.stats.stale_served.fetch_add(1, Relaxed);
                if inner.may_refresh(space_id) {
                    drop(inner.flight(space_id));
                }
                return Ok(entry.listers.clone());
            }
        }
        match inner.flight(space_id).await {
            Ok(entry) => Ok(entry.listers.clone()),
            Err(ResolveError::Unavailable(reason)) => match cached {
                Some(entry) if now.duration_since(entry.fetched_at) <= inner.settings.max_stale => {
                    inner.stats.stale_served.fetch_add(1, Relaxed);
                    tracing::warn!(space = space_id, %reason, "oCIS unreachable; serving the last known members");
                    Ok(entry.listers.clone())
                }
                _ => Err(ResolveError::Unavailable(reason)),
            },
            Err(other) => Err(other),
        }
    }

    async fn apply(
        &self,
        space_id: &str,
        change: &MembershipChange,
        _added: bool,
    ) -> Result<UserList, ResolveError> {
        // oCIS already reflects the change: forget what we knew so the next answer is fresh.
        self.invalidate_space(space_id);
        match &change.member {
            Member::User(u) => Ok(UserList::from(vec![Arc::from(u.as_str())])),
            Member::Group(g) => {
                self.inner.groups.invalidate(g.as_str()).await;
                self.members_of(g).await
            }
        }
    }

    async fn apply_group(
        &self,
        group: &str,
        _user: &str,
        _added: bool,
    ) -> Result<(), ResolveError> {
        self.invalidate_group(group).await;
        Ok(())
    }
}
