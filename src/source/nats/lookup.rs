//! Completing what a reva event leaves out, through the oCIS API (`ocis-ingestion.md` §5).
//!
//! A lookup answers with the state **now**; what that makes exact:
//! - a new upload, a move, a trash, a restore: the item's size now is its size at the event
//!   (oCIS propagates sizes before it publishes), so `size` (and for an upload `size_delta`)
//!   is exact;
//! - an upload over an existing file or a restored version: the event does not say the old
//!   size. When this process saw the item's size before (an earlier lookup), the change is
//!   new − old (every lookup of a file, whatever its event, tells its size); otherwise no
//!   exact change can be given, and the space's listers are told to
//!   refetch (`space-resync`) rather than shown a guess;
//! - the item is gone by now (404), oCIS refuses the question, or the event names too little
//!   (a move whose old path is relative to an unknown folder): `space-resync` as well.
//!
//! Only "oCIS unreachable" is not an answer: the caller waits and asks again, holding the event
//! (and keeping its delivery alive), as membership does.

use async_trait::async_trait;
use serde_json::json;

use super::reva::Lookup;
use crate::membership::ocis::GraphClient;
use crate::membership::ocis::GraphError;
use crate::membership::ocis::items::ItemInfo;

/// The three questions the lookups ask of oCIS.
#[async_trait]
pub trait Items: Send + Sync {
    async fn by_id(&self, drive_id: &str, item_id: &str) -> Result<ItemInfo, GraphError>;
    async fn by_path(&self, drive_id: &str, path: &str) -> Result<ItemInfo, GraphError>;
    async fn trashed(&self, drive_id: &str, key: &str) -> Result<ItemInfo, GraphError>;
}

#[async_trait]
impl Items for GraphClient {
    async fn by_id(&self, drive_id: &str, item_id: &str) -> Result<ItemInfo, GraphError> {
        self.item_by_id(drive_id, item_id).await
    }
    async fn by_path(&self, drive_id: &str, path: &str) -> Result<ItemInfo, GraphError> {
        self.item_by_path(drive_id, path).await
    }
    async fn trashed(&self, drive_id: &str, key: &str) -> Result<ItemInfo, GraphError> {
        self.trashed_item(drive_id, key).await
    }
}

/// What oCIS said, before it becomes an event.
#[derive(Debug, Clone, PartialEq)]
pub enum Fetched {
    Info(ItemInfo),
    /// No exact change can be given: the space is resynced, for this reason.
    Resync(String),
    /// The event is exact as it is (no oCIS, or oCIS does not know the item's ids).
    Exact,
    /// oCIS cannot be reached now: ask again later.
    Unavailable(String),
}

/// What a completed lookup became.
#[derive(Debug, Clone, PartialEq)]
pub enum Completion {
    /// A foldercast storage event (a `space-resync` when nothing exact could be said).
    Event(Vec<u8>),
    /// oCIS cannot be reached now: ask again later.
    Unavailable(String),
}

/// Completes lookups, remembering the sizes of files it saw (bounded), so an upload over a
/// file seen before gets an exact change.
pub struct Completer {
    /// `None`: no oCIS to ask (membership from a fixture); every lookup becomes a resync.
    items: Option<Box<dyn Items>>,
    sizes: moka::sync::Cache<String, u64>,
}

/// Files whose last size is remembered.
pub const REMEMBERED_SIZES: u64 = 100_000;

impl Completer {
    pub fn new(items: Option<Box<dyn Items>>) -> Self {
        Completer {
            items,
            sizes: moka::sync::Cache::new(REMEMBERED_SIZES),
        }
    }

    /// Asks oCIS and builds the event: [`Completer::fetch`] then [`Completer::finish`].
    pub async fn complete(&self, lookup: &Lookup) -> Completion {
        match self.fetch(lookup).await {
            Fetched::Unavailable(reason) => Completion::Unavailable(reason),
            fetched => Completion::Event(self.finish(lookup, fetched)),
        }
    }

    /// What oCIS says of the event's item. Runs ahead, several at a time: it reads nothing this
    /// completer remembers.
    pub async fn fetch(&self, lookup: &Lookup) -> Fetched {
        let Some(space) = lookup.space_id.as_deref() else {
            return Fetched::Resync("names no space".into());
        };
        let Some(items) = &self.items else {
            return match lookup.exact {
                Some(_) => Fetched::Exact,
                None => Fetched::Resync("no oCIS to look the item up (--ocis-url)".into()),
            };
        };
        let found = if lookup.exact.is_some() {
            match &lookup.path {
                Some(path) => items.by_path(space, path).await,
                None => return Fetched::Exact,
            }
        } else {
            match lookup.reva_type.as_str() {
                "ItemTrashed" => match &lookup.trash_key {
                    Some(key) => items.trashed(space, key).await,
                    None => return Fetched::Resync("no trash-bin key".into()),
                },
                _ => match (&lookup.item_id, &lookup.path) {
                    (Some(id), _) => items.by_id(space, id).await,
                    (None, Some(path)) => items.by_path(space, path).await,
                    (None, None) => {
                        return Fetched::Resync("names the item neither by id nor by path".into());
                    }
                },
            }
        };
        match found {
            Ok(info) => Fetched::Info(info),
            Err(GraphError::Unavailable(reason)) => Fetched::Unavailable(reason),
            Err(other) if lookup.exact.is_some() => {
                tracing::debug!(event_id = %lookup.event_id, error = %other, "no ids for an item; sent without");
                Fetched::Exact
            }
            Err(other) => Fetched::Resync(other.to_string()),
        }
    }

    /// The event `fetched` makes of `lookup`. Runs in the order of the lane's events: the
    /// remembered file sizes change here, so an overwrite is compared with the upload before
    /// it, not with whichever lookup finished first.
    pub fn finish(&self, lookup: &Lookup, fetched: Fetched) -> Vec<u8> {
        let space = lookup.space_id.as_deref().unwrap_or_default();
        let resync = |reason: String| {
            tracing::info!(event_id = %lookup.event_id, space_id = %space, %reason, "lookup gives no exact change; the space is resynced");
            lookup.event(
                "space-resync",
                space,
                json!({"reason": format!("{}: {reason}", lookup.reva_type)}),
            )
        };
        let info = match fetched {
            Fetched::Info(info) => info,
            Fetched::Resync(reason) | Fetched::Unavailable(reason) => return resync(reason),
            Fetched::Exact => {
                return match &lookup.exact {
                    Some(exact) => exact.clone(),
                    None => resync("no exact event".into()),
                };
            }
        };
        if let Some(exact) = &lookup.exact {
            return with_ids(exact, &info);
        }
        let Some(path) = lookup.path.clone().or_else(|| info.path.clone()) else {
            return resync("oCIS gave no path".into());
        };
        if path == "/" {
            return resync("the event names the space root".into());
        }
        let key = info
            .id
            .clone()
            .or_else(|| lookup.item_id.clone())
            .unwrap_or_else(|| format!("{space}:{path}"));
        let kind = if info.folder { "folder" } else { "file" };
        let mut data = json!({
            "path": path,
            "kind": kind,
            "size": info.size,
            "item_id": info.id.clone().or_else(|| lookup.item_id.clone()),
            "parent_id": info.parent_id,
            "etag": info.etag,
        });
        let event_type = match lookup.reva_type.as_str() {
            "UploadReady" | "FileVersionRestored" => {
                data["kind"] = json!("file");
                let before = self.sizes.get(&key);
                self.sizes.insert(key, info.size);
                if lookup.overwrite {
                    let Some(before) = before else {
                        return resync("the file's size before the change is unknown".into());
                    };
                    data["size_delta"] = json!(info.size as i64 - before as i64);
                }
                "file-uploaded"
            }
            "ItemMoved" => {
                let Some(old_path) = &lookup.old_path else {
                    return resync("the old path is not space-relative".into());
                };
                data["old_path"] = json!(old_path);
                if !info.folder {
                    self.sizes.insert(key, info.size);
                }
                "item-moved"
            }
            "ItemTrashed" => {
                self.sizes.invalidate(&key);
                "item-trashed"
            }
            "ItemRestored" => {
                if !info.folder {
                    self.sizes.insert(key, info.size);
                }
                "item-restored"
            }
            other => return resync(format!("{other} is not looked up")),
        };
        lookup.event(event_type, space, data)
    }
}

/// An event exact without oCIS, with the item's ids and etag added.
fn with_ids(exact: &[u8], info: &ItemInfo) -> Vec<u8> {
    let Ok(mut event) = serde_json::from_slice::<serde_json::Value>(exact) else {
        return exact.to_vec();
    };
    if let Some(data) = event.get_mut("data").and_then(|d| d.as_object_mut()) {
        data.insert("item_id".into(), json!(info.id));
        data.insert("parent_id".into(), json!(info.parent_id));
        data.insert("etag".into(), json!(info.etag));
    }
    event.to_string().into_bytes()
}
