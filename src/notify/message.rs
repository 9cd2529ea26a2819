//! The per-user message (`schemas/user-message.schema.json`): what one user learns from one event.
//!
//! A message is built and encoded once per event and the same bytes go to every recipient; only
//! coalesced and resync messages, which differ per user, are encoded per user.

use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;

use super::ancestors::{FolderDelta, folder_deltas};
use crate::bus::Outgoing;
use crate::event::{EventBody, ItemChange, Member, MembershipChange, StorageEvent};
use crate::path::SpacePath;

/// Message types that report a change of an item (and of the folders above it).
pub const ITEM_CHANGES: [&str; 6] = [
    "file-uploaded",
    "file-touched",
    "folder-created",
    "item-trashed",
    "item-restored",
    "item-moved",
];

/// Message `type` values that are not event types.
pub const COALESCED: &str = "coalesced";
pub const RESYNC: &str = "resync";
/// The `reason` of a resync the source asked for (`space-resync`): oCIS could not say exactly
/// what changed.
pub const LOOKUP_REASON: &str = "source";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UserMessage {
    /// The event this message reports (for a coalesced message: the latest one it covers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    #[serde(rename = "type")]
    pub message_type: &'static str,
    pub space_id: Arc<str>,
    pub actor: Option<String>,
    /// The client that made the change (oCIS's `Initiator-ID`), so it can skip its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initiator_id: Option<String>,
    pub time: Arc<str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item: Option<Item>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub folders: Option<Vec<FolderDelta>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub member: Option<MemberInfo>,
    /// Coalesced messages: every event id they stand for, oldest first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_ids: Option<Vec<String>>,
    /// Coalesced messages: the latest change of each path, in the order they last changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub items: Option<Vec<ItemUpdate>>,
    /// Resync messages: why the client must refetch, and how many events it stands for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Item {
    pub path: SpacePath,
    pub old_path: Option<SpacePath>,
    pub kind: &'static str,
    pub size: u64,
    pub item_id: Option<String>,
    /// The folder holding the item, by id (oCIS sources only): what ownCloud Web matches against
    /// the folder on screen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    pub etag: Option<String>,
}

/// An item inside a coalesced message, with the change that last touched it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ItemUpdate {
    #[serde(rename = "type")]
    pub change: &'static str,
    pub event_id: String,
    #[serde(flatten)]
    pub item: Item,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemberInfo {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
}

/// A message with its encoding, shared by every recipient.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub message: Arc<UserMessage>,
    pub payload: Bytes,
    pub event_id: Option<Arc<str>>,
    /// The driver's number for the event this message came from, so a held message holds back
    /// the event's acknowledgement ([`super::throttle::EventRef`]).
    pub origin: Option<super::throttle::EventRef>,
}

impl Prepared {
    pub fn new(message: UserMessage) -> Self {
        let payload = encode(&message);
        let event_id = message.event_id.as_deref().map(Arc::from);
        Prepared {
            message: Arc::new(message),
            payload,
            event_id,
            origin: None,
        }
    }

    /// This message, addressed to `user`.
    pub fn to(&self, user: &Arc<str>) -> Outgoing {
        Outgoing::for_event(user.clone(), self.payload.clone(), self.event_id.clone())
    }
}

pub fn encode(message: &UserMessage) -> Bytes {
    // Serialising plain structs of strings and integers cannot fail.
    Bytes::from(serde_json::to_vec(message).unwrap_or_default())
}

impl UserMessage {
    /// The message every recipient of `event` receives.
    pub fn from_event(event: &StorageEvent) -> Self {
        let mut msg = UserMessage {
            event_id: Some(event.id.clone()),
            message_type: event.event_type.as_str(),
            space_id: Arc::from(event.space_id.as_str()),
            actor: event.actor.clone(),
            initiator_id: event.initiator_id.clone(),
            time: event.time.clone(),
            item: None,
            folders: None,
            member: None,
            event_ids: None,
            items: None,
            reason: None,
            skipped: None,
        };
        match &event.body {
            EventBody::Item(change) => {
                msg.folders = Some(folder_deltas(event.event_type, change, &event.time));
                msg.item = Some(Item::from_change(change));
            }
            EventBody::Membership(change) => msg.member = Some(MemberInfo::from_change(change)),
            // The space's listers refetch it: one event stands behind this resync.
            EventBody::Resync { .. } => {
                msg.message_type = RESYNC;
                msg.reason = Some(LOOKUP_REASON);
                msg.skipped = Some(1);
            }
            // Group changes reach no user directly (the pipeline never builds a message for them).
            EventBody::Group(_) => {}
        }
        msg
    }

    /// `{"type":"resync"}`: the client must refetch the space; `latest` is the last event it
    /// stands for.
    pub fn resync(space_id: Arc<str>, time: Arc<str>, skipped: u64, latest: Option<&str>) -> Self {
        UserMessage {
            event_id: latest.map(str::to_owned),
            message_type: RESYNC,
            space_id,
            actor: None,
            initiator_id: None,
            time,
            item: None,
            folders: None,
            member: None,
            event_ids: None,
            items: None,
            reason: Some("backlog"),
            skipped: Some(skipped),
        }
    }

    pub fn is_membership(&self) -> bool {
        self.member.is_some()
    }

    /// Membership changes and resyncs go out at once, never held or coalesced by the rate
    /// limiter (what it held for the user's space goes out before them).
    pub fn is_never_held(&self) -> bool {
        self.member.is_some() || self.message_type == RESYNC
    }
}

impl Item {
    fn from_change(change: &ItemChange) -> Self {
        Item {
            path: change.path.clone(),
            old_path: change.old_path.clone(),
            kind: change.kind.as_str(),
            size: change.size,
            item_id: change.item_id.clone(),
            parent_id: change.parent_id.clone(),
            etag: change.etag.clone(),
        }
    }
}

impl MemberInfo {
    fn from_change(change: &MembershipChange) -> Self {
        let (user, group) = match &change.member {
            Member::User(u) => (Some(u.clone()), None),
            Member::Group(g) => (None, Some(g.clone())),
        };
        MemberInfo {
            user,
            group,
            role: change.role.map(|r| r.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::decode;

    fn message(json: &str) -> serde_json::Value {
        let e = decode(json.as_bytes()).unwrap();
        serde_json::from_slice(&Prepared::new(UserMessage::from_event(&e)).payload).unwrap()
    }

    #[test]
    fn upload_matches_the_contract() {
        let m = message(
            r#"{"id":"e-42","type":"file-uploaded","time":"2026-11-22T10:00:00.123Z","data":{"space_id":"s-eng","path":"/f1/f2/report.pdf","kind":"file","size":2048,"actor":"alice","item_id":"i","etag":"t"}}"#,
        );
        assert_eq!(
            m,
            serde_json::json!({"event_id":"e-42","type":"file-uploaded","space_id":"s-eng","actor":"alice","time":"2026-11-22T10:00:00.123Z",
              "item":{"path":"/f1/f2/report.pdf","old_path":null,"kind":"file","size":2048,"item_id":"i","etag":"t"},
              "folders":[{"path":"/f1/f2","size_delta":2048,"mtime":"2026-11-22T10:00:00.123Z","levels":3}]})
        );
    }

    #[test]
    fn membership_message_has_no_item_or_folders() {
        let m = message(
            r#"{"id":"m","type":"space-member-removed","time":"2026-11-22T10:00:00Z","data":{"space_id":"s","user":"bob"}}"#,
        );
        assert!(m.get("item").is_none() && m.get("folders").is_none());
        assert_eq!(m["member"], serde_json::json!({"user":"bob"}));
        assert_eq!(m["actor"], serde_json::Value::Null);
    }

    #[test]
    fn move_carries_old_path() {
        let m = message(
            r#"{"id":"m","type":"item-moved","time":"2026-11-22T10:00:00Z","data":{"space_id":"s","path":"/b/x","old_path":"/a/x","kind":"file","size":3}}"#,
        );
        assert_eq!(m["item"]["old_path"], "/a/x");
        assert_eq!(m["folders"].as_array().unwrap().len(), 3);
    }
}
