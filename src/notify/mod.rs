//! The notify stage: from one raw event to the message and the users who receive it.
//!
//! `decode → dedup → resolve → build message`, in that order, for one event at a time. Shaping
//! that spans events (rate limits, coalescing) lives in [`throttle`], after this stage; the
//! publish step after that. Each step is its own module so it can be tested alone.

pub mod ancestors;
pub mod dedup;
pub mod fold;
pub mod message;
pub mod throttle;

use std::sync::Arc;

use crate::event::{self, EventBody, EventType, Rejection, StorageEvent};
use crate::membership::{MembershipResolver, ResolveError, UserList};
use crate::preferences::PreferenceFilter;
use dedup::Dedup;
use message::{Prepared, UserMessage};

/// What became of one event.
#[derive(Debug)]
pub enum Outcome {
    /// Send `message` to each of `recipients` (sorted, possibly empty).
    Deliver(Box<Fanout>),
    /// Already seen: dropped before fan-out.
    Duplicate {
        event_id: String,
    },
    Rejected(Rejection),
    /// A group membership change: applied to the resolver, nothing to deliver.
    Applied {
        event_id: String,
    },
}

#[derive(Debug)]
pub struct Fanout {
    pub event: StorageEvent,
    pub recipients: UserList,
    pub message: Prepared,
    /// Users who may see the change but chose not to (`preferences.rs`): left out.
    pub muted: usize,
}

/// Membership could not be resolved now; the event must be retried later.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("membership unavailable: {0}")]
pub struct MembershipUnavailable(pub String);

pub struct Pipeline {
    dedup: Dedup,
    resolver: Arc<dyn MembershipResolver>,
    max_event_bytes: usize,
    /// Users' preferences, applied before anything is published.
    preferences: Option<Arc<PreferenceFilter>>,
}

impl Pipeline {
    pub fn new(dedup: Dedup, resolver: Arc<dyn MembershipResolver>) -> Self {
        Pipeline {
            dedup,
            resolver,
            max_event_bytes: event::DEFAULT_MAX_EVENT_BYTES,
            preferences: None,
        }
    }

    /// Leaves out recipients whose preferences refuse a message (muted space, unwanted type).
    pub fn with_preferences(mut self, preferences: Arc<PreferenceFilter>) -> Self {
        self.preferences = Some(preferences);
        self
    }

    /// Events larger than `bytes` are rejected (`too-large`) before they are parsed.
    pub fn with_max_event_bytes(mut self, bytes: usize) -> Self {
        self.max_event_bytes = bytes;
        self
    }

    /// Processes one raw event. `Err` means membership is unavailable right now: the event was
    /// not consumed (not even remembered for dedup) and must be retried, never dropped.
    pub async fn process(&self, raw: &[u8]) -> Result<Outcome, MembershipUnavailable> {
        if raw.len() > self.max_event_bytes {
            return Ok(Outcome::Rejected(event::Rejection::new(
                "too-large",
                format!(
                    "the event is over {} bytes (--max-event-bytes)",
                    self.max_event_bytes
                ),
            )));
        }
        let event = match event::decode(raw) {
            Ok(e) => e,
            Err(rejection) => return Ok(Outcome::Rejected(rejection)),
        };
        if self.dedup.is_duplicate(&event.id) {
            return Ok(Outcome::Duplicate { event_id: event.id });
        }
        if let EventBody::Group(change) = &event.body {
            let added = event.event_type == EventType::GroupMemberAdded;
            return match self
                .resolver
                .apply_group(&change.group, &change.user, added)
                .await
            {
                Ok(()) => {
                    self.dedup.remember(&event.id);
                    Ok(Outcome::Applied { event_id: event.id })
                }
                Err(ResolveError::Unavailable(reason)) => Err(MembershipUnavailable(reason)),
                Err(other) => Ok(Outcome::Rejected(Rejection::new(
                    "space-refused",
                    other.to_string(),
                ))),
            };
        }
        let recipients = match self.recipients(&event).await {
            Ok(r) => r,
            Err(ResolveError::UnknownSpace(space)) => {
                return Ok(Outcome::Rejected(Rejection::new(
                    "unknown-space",
                    format!("space {space:?} does not exist"),
                )));
            }
            Err(ResolveError::Refused(reason)) => {
                return Ok(Outcome::Rejected(Rejection::new("space-refused", reason)));
            }
            Err(ResolveError::Unavailable(reason)) => return Err(MembershipUnavailable(reason)),
        };
        self.dedup.remember(&event.id);
        let message = Prepared::new(UserMessage::from_event(&event));
        let (recipients, muted) = match &self.preferences {
            Some(preferences) => {
                preferences
                    .keep(recipients, &event.space_id, message.message.message_type)
                    .await
            }
            None => (recipients, 0),
        };
        Ok(Outcome::Deliver(Box::new(Fanout {
            event,
            recipients,
            message,
            muted,
        })))
    }

    async fn recipients(&self, event: &StorageEvent) -> Result<UserList, ResolveError> {
        let change = match &event.body {
            EventBody::Item(_) | EventBody::Resync { .. } => {
                return self.resolver.listers(&event.space_id).await;
            }
            EventBody::Membership(change) => change,
            EventBody::Group(_) => return Ok(UserList::from(Vec::new())),
        };
        let space = &event.space_id;
        let before = or_empty(self.resolver.listers(space).await)?;
        let added = event.event_type == EventType::SpaceMemberAdded;
        let affected = self.resolver.apply(space, change, added).await?;
        let after = or_empty(self.resolver.listers(space).await)?;
        // Those who may list the space now, plus affected users who could list it before (for a
        // removal this is their last message from the space). An affected user who never could
        // list it (an uploader) learns nothing.
        let mut users: Vec<Arc<str>> = after.iter().cloned().collect();
        for user in affected.iter() {
            if before.contains(user) && !after.contains(user) {
                users.push(user.clone());
            }
        }
        users.sort();
        users.dedup();
        Ok(users.into())
    }
}

fn or_empty(r: Result<UserList, ResolveError>) -> Result<UserList, ResolveError> {
    match r {
        Err(ResolveError::UnknownSpace(_)) => Ok(Arc::from(Vec::new())),
        other => other,
    }
}
