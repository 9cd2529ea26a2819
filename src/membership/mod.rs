//! Who may see a space: roles, the resolver seam, and its implementations.
//!
//! The pipeline asks one question per event, "who may list this space?", and tells the resolver
//! about membership events so later answers reflect them. Everything behind that question
//! (a fixture file, or the oCIS LibreGraph API behind a cache) stays behind [`MembershipResolver`].

mod fixture;
pub mod ocis;

use std::sync::Arc;

use async_trait::async_trait;

use crate::event::MembershipChange;

pub use fixture::{
    Directory, FixtureResolver, GrantEntry, GroupEntry, LoadError, SpaceEntry, UserEntry,
};

pub use crate::role::Role;

/// A sorted, de-duplicated list of user ids, cheap to clone and share across events.
pub type UserList = Arc<[Arc<str>]>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The space does not exist (any more): its events are rejected.
    #[error("unknown space {0:?}")]
    UnknownSpace(String),
    /// The directory refuses to answer for this space (a malformed id, an unsupported space
    /// type): its events are rejected with the reason.
    #[error("space refused: {0}")]
    Refused(String),
    /// The directory cannot answer now; the event must wait, not be dropped.
    #[error("membership unavailable: {0}")]
    Unavailable(String),
}

/// The membership seam.
#[async_trait]
pub trait MembershipResolver: Send + Sync {
    /// Users whose role in `space_id` lets them list it (groups expanded), sorted, each once.
    async fn listers(&self, space_id: &str) -> Result<UserList, ResolveError>;

    /// Applies a `space-member-added` (`added = true`) or `-removed` event and returns the users
    /// it affects (a group expanded to its members), sorted, each once.
    async fn apply(
        &self,
        space_id: &str,
        change: &MembershipChange,
        added: bool,
    ) -> Result<UserList, ResolveError>;

    /// Applies a `group-member-added` (`added = true`) or `-removed` event: `user` joined or
    /// left `group`, which changes the members of every space that grants the group.
    async fn apply_group(&self, group: &str, user: &str, added: bool) -> Result<(), ResolveError>;

    /// Forgets what is known of a space's members (a role changed, a grant expired, the space
    /// was disabled or deleted): the next question asks the directory. `space_id` may be a
    /// drive id (`storage$space`) or a bare space id. A directory read fresh each time (a
    /// fixture) has nothing to forget.
    fn invalidate(&self, _space_id: &str) {}

    /// The users in `group`, sorted, each once (`UnknownSpace` names the group when it does
    /// not exist). For notifications to a group.
    async fn group_members(&self, group: &str) -> Result<UserList, ResolveError>;

    /// Every user the directory knows, sorted, each once, and where the list came from (said
    /// in a publish's answer). For notifications to everyone.
    async fn all_users(&self) -> Result<(UserList, &'static str), ResolveError>;

    /// The cache's counters, for a resolver that caches a remote directory (`/metrics`).
    fn cache_stats(&self) -> Option<&ocis::CacheStats> {
        None
    }
}
