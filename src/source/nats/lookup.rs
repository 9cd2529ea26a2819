//! Completing what a reva event leaves out, through the oCIS API (`ocis-ingestion.md` §5).
//!
//! A lookup answers with the state **now**; what that makes exact:
//! - a new upload, a move, a trash, a restore: the item's size now is its size at the event
//!   (oCIS propagates sizes before it publishes), so `size` (and for an upload `size_delta`)
//!   is exact;
//! - an upload over an existing file or a restored version: the event does not say the old
//!   size. When this process saw the item's size before (an earlier lookup), the change is
//!   new − old (every lookup of a file, whatever its event, tells its size). Otherwise no exact
//!   change can be given, so the folders above the file are read too (the walk oCIS's
//!   activitylog makes) and the event carries their sizes after the change
//!   (`data.folder_sizes`): absolute, safe to apply twice, never a guessed delta. A path deeper
//!   than [`MAX_FOLDER_READS`] folders resyncs the space instead;
//! - the item is gone by now (404), oCIS refuses the question, or the event names too little
//!   (a move whose old path is relative to an unknown folder): `space-resync` as well.
//!
//! Only "oCIS unreachable" is not an answer: the caller waits and asks again, holding the event
//! (and keeping its delivery alive), as membership does.
//!
//! # Shared answers
//! Answers are cached and single-flight, like membership, under one rule that keeps them as
//! exact as a question of the event's own: an answer serves an event only when it was asked
//! after the event was in hand (pulled from the stream), since only then does it show the
//! event's change. Events of one item pulled together (a burst of versions of one file, an
//! upload then its move) share one question; an answer asked before an event arrived is asked
//! again for it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

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
    /// An overwrite of a file whose old size was not known when asked: the file, and the folders
    /// above it (nearest first, up to the space root) as read after the event, or why they
    /// could not be read.
    Overwrite {
        item: ItemInfo,
        folders: Result<Vec<(String, ItemInfo)>, String>,
    },
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

/// One question for oCIS: the call and its drive and item (id, path or trash-bin key).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Question {
    ById(String, String),
    ByPath(String, String),
    Trashed(String, String),
}

/// A question asked at `asked`, and oCIS's answer once it came (the askers that joined wait
/// for it).
struct Answer {
    asked: Instant,
    result: tokio::sync::OnceCell<Result<ItemInfo, GraphError>>,
}

/// Completes lookups, remembering the sizes of files it saw (bounded), so an upload over a
/// file seen before gets an exact change.
pub struct Completer {
    /// `None`: no oCIS to ask (membership from a fixture); every lookup becomes a resync.
    items: Option<Box<dyn Items>>,
    sizes: quick_cache::sync::Cache<String, u64>,
    /// The latest question of each item, answered or in flight (see the module doc: each serves
    /// only events in hand before it was asked). Cleared when it grows past [`SHARED_ANSWERS`].
    answers: Mutex<HashMap<Question, Arc<Answer>>>,
    /// Questions actually sent to oCIS.
    asked: AtomicU64,
}

/// Files whose last size is remembered.
pub const REMEMBERED_SIZES: usize = 100_000;

/// The most folders read above an overwritten file of unknown old size: a deeper file resyncs
/// its space rather than cost one question per level (oCIS answers one item per request).
pub const MAX_FOLDER_READS: usize = 32;

/// Answers kept for sharing: far more than the lanes' lookahead holds in flight. A plain map
/// cleared when full rather than a cache with eviction: moka's future cache, tried first, cost
/// the NATS consumer 20 µs of CPU per event (`docs/benchmarks.md`, session 13), and an answer
/// serves few events anyway (those pulled before it was asked).
const SHARED_ANSWERS: usize = 4_096;

impl Completer {
    pub fn new(items: Option<Box<dyn Items>>) -> Self {
        Completer {
            items,
            sizes: quick_cache::sync::Cache::new(REMEMBERED_SIZES),
            answers: Mutex::new(HashMap::new()),
            asked: AtomicU64::new(0),
        }
    }

    /// Questions sent to oCIS so far (a shared answer counts once).
    pub fn questions_asked(&self) -> u64 {
        self.asked.load(Relaxed)
    }

    /// oCIS's answer to `question` for an event in hand since `in_hand`: one asked since then
    /// (joining it while in flight), or a new question.
    async fn ask(
        &self,
        items: &dyn Items,
        question: Question,
        in_hand: Instant,
    ) -> Result<ItemInfo, GraphError> {
        let answer = {
            let Ok(mut answers) = self.answers.lock() else {
                // A poisoned lock: ask alone (correct, only less shared).
                return self.ask_now(items, &question).await;
            };
            match answers.get(&question) {
                Some(answer) if answer.asked >= in_hand => answer.clone(),
                _ => {
                    if answers.len() >= SHARED_ANSWERS {
                        answers.clear();
                    }
                    let answer = Arc::new(Answer {
                        asked: Instant::now(),
                        result: tokio::sync::OnceCell::new(),
                    });
                    answers.insert(question.clone(), answer.clone());
                    answer
                }
            }
        };
        let result = answer
            .result
            .get_or_init(|| self.ask_now(items, &question))
            .await
            .clone();
        if matches!(result, Err(GraphError::Unavailable(_)))
            && let Ok(mut answers) = self.answers.lock()
            && answers
                .get(&question)
                .is_some_and(|current| Arc::ptr_eq(current, &answer))
        {
            // Not an answer: the next asker asks again.
            answers.remove(&question);
        }
        result
    }

    async fn ask_now(
        &self,
        items: &dyn Items,
        question: &Question,
    ) -> Result<ItemInfo, GraphError> {
        self.asked.fetch_add(1, Relaxed);
        match question {
            Question::ById(drive, id) => items.by_id(drive, id).await,
            Question::ByPath(drive, path) => items.by_path(drive, path).await,
            Question::Trashed(drive, key) => items.trashed(drive, key).await,
        }
    }

    /// Asks oCIS and builds the event: [`Completer::fetch`] then [`Completer::finish`].
    pub async fn complete(&self, lookup: &Lookup) -> Completion {
        match self.fetch(lookup, Instant::now()).await {
            Fetched::Unavailable(reason) => Completion::Unavailable(reason),
            fetched => Completion::Event(self.finish(lookup, fetched)),
        }
    }

    /// What oCIS says of the event's item, for an event in hand since `in_hand` (pulled then).
    /// Runs ahead, several at a time: the sizes this completer remembers may still change
    /// before [`Completer::finish`], so here they only spare questions (an overwrite's folders
    /// are not read when the file's old size is already known), never decide the event.
    pub async fn fetch(&self, lookup: &Lookup, in_hand: Instant) -> Fetched {
        let Some(space) = lookup.space_id.as_deref() else {
            return Fetched::Resync("names no space".into());
        };
        let Some(items) = &self.items else {
            return match lookup.exact {
                Some(_) => Fetched::Exact,
                None => Fetched::Resync("no oCIS to look the item up (--ocis-url)".into()),
            };
        };
        let drive = space.to_owned();
        let question = if lookup.exact.is_some() {
            match &lookup.path {
                Some(path) => Question::ByPath(drive, path.clone()),
                None => return Fetched::Exact,
            }
        } else {
            match lookup.reva_type.as_str() {
                "ItemTrashed" => match &lookup.trash_key {
                    Some(key) => Question::Trashed(drive, key.clone()),
                    None => return Fetched::Resync("no trash-bin key".into()),
                },
                _ => match (&lookup.item_id, &lookup.path) {
                    (Some(id), _) => Question::ById(drive, id.clone()),
                    (None, Some(path)) => Question::ByPath(drive, path.clone()),
                    (None, None) => {
                        return Fetched::Resync("names the item neither by id nor by path".into());
                    }
                },
            }
        };
        let found = self.ask(items.as_ref(), question, in_hand).await;
        match found {
            Ok(info) if lookup.overwrite => {
                self.fetch_folders(items.as_ref(), lookup, info, in_hand)
                    .await
            }
            Ok(info) => Fetched::Info(info),
            Err(GraphError::Unavailable(reason)) => Fetched::Unavailable(reason),
            Err(other) if lookup.exact.is_some() => {
                tracing::debug!(event_id = %lookup.event_id, error = %other, "no ids for an item; sent without");
                Fetched::Exact
            }
            Err(other) => Fetched::Resync(other.to_string()),
        }
    }

    /// For an overwrite whose old size is not remembered now: the folders above the file too.
    async fn fetch_folders(
        &self,
        items: &dyn Items,
        lookup: &Lookup,
        info: ItemInfo,
        in_hand: Instant,
    ) -> Fetched {
        let Some(path) = lookup.path.clone().or_else(|| info.path.clone()) else {
            return Fetched::Info(info);
        };
        let space = lookup.space_id.as_deref().unwrap_or_default();
        if self
            .sizes
            .get(&size_key(space, &path, &info, lookup))
            .is_some()
        {
            return Fetched::Info(info);
        }
        let Ok(item_path) = crate::path::SpacePath::parse(&path) else {
            return Fetched::Info(info);
        };
        let folders: Vec<String> = item_path.ancestors().map(str::to_owned).collect();
        if folders.len() > MAX_FOLDER_READS {
            let reason = format!(
                "{} folders deep, more than {MAX_FOLDER_READS} to read",
                folders.len()
            );
            return Fetched::Overwrite {
                item: info,
                folders: Err(reason),
            };
        }
        let answers = futures_util::future::join_all(folders.iter().map(|folder| {
            self.ask(
                items,
                Question::ByPath(space.to_owned(), folder.clone()),
                in_hand,
            )
        }))
        .await;
        let mut read = Vec::with_capacity(folders.len());
        for (folder, answer) in folders.into_iter().zip(answers) {
            match answer {
                Ok(found) => read.push((folder, found)),
                Err(GraphError::Unavailable(reason)) => return Fetched::Unavailable(reason),
                Err(other) => {
                    return Fetched::Overwrite {
                        item: info,
                        folders: Err(format!("folder {folder}: {other}")),
                    };
                }
            }
        }
        Fetched::Overwrite {
            item: info,
            folders: Ok(read),
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
        let (info, folders) = match fetched {
            Fetched::Info(info) => (info, None),
            Fetched::Overwrite { item, folders } => (item, Some(folders)),
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
        let key = size_key(space, &path, &info, lookup);
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
                    match (before, folders) {
                        (Some(before), _) => {
                            data["size_delta"] = json!(info.size as i64 - before as i64);
                        }
                        (None, Some(Ok(folders))) => {
                            data["folder_sizes"] = folders
                                .iter()
                                .map(|(path, f)| json!({"path": path, "size": f.size, "etag": f.etag}))
                                .collect();
                        }
                        (None, Some(Err(reason))) => {
                            return resync(format!(
                                "the file's size before the change is unknown, and {reason}"
                            ));
                        }
                        (None, None) => {
                            return resync("the file's size before the change is unknown".into());
                        }
                    }
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
                self.sizes.remove(&key);
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

/// The key a file's size is remembered under: its id, else its space and path.
fn size_key(space: &str, path: &str, info: &ItemInfo, lookup: &Lookup) -> String {
    info.id
        .clone()
        .or_else(|| lookup.item_id.clone())
        .unwrap_or_else(|| format!("{space}:{path}"))
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;

    /// oCIS answering after a pause, counting questions; the size grows with each question.
    struct SlowItems {
        calls: Arc<AtomicUsize>,
    }

    #[async_trait]
    impl Items for SlowItems {
        async fn by_id(&self, _drive: &str, item: &str) -> Result<ItemInfo, GraphError> {
            let n = self.calls.fetch_add(1, Relaxed) + 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(ItemInfo {
                id: Some(item.to_owned()),
                path: Some("/f".into()),
                size: n as u64,
                ..ItemInfo::default()
            })
        }
        async fn by_path(&self, _: &str, _: &str) -> Result<ItemInfo, GraphError> {
            Err(GraphError::Unavailable("not asked here".into()))
        }
        async fn trashed(&self, _: &str, _: &str) -> Result<ItemInfo, GraphError> {
            Err(GraphError::Unavailable("not asked here".into()))
        }
    }

    fn upload(event_id: &str) -> Lookup {
        Lookup {
            reva_type: "UploadReady".into(),
            event_id: event_id.into(),
            space_id: Some("s$p".into()),
            path: None,
            old_path: None,
            item_id: Some("s$p!file".into()),
            trash_key: None,
            overwrite: false,
            missing: "size",
            exact: None,
            time: "2026-12-01T00:00:00Z".into(),
            actor: None,
            initiator_id: None,
        }
    }

    fn size(f: &Fetched) -> u64 {
        match f {
            Fetched::Info(info) => info.size,
            other => panic!("not an answer: {other:?}"),
        }
    }

    #[tokio::test]
    async fn events_in_hand_before_a_question_share_it_and_later_ones_ask_again() {
        let calls = Arc::new(AtomicUsize::new(0));
        let completer = Completer::new(Some(Box::new(SlowItems {
            calls: calls.clone(),
        })));
        // Three events of one file pulled together: one question, in flight for all three.
        let pulled = Instant::now();
        let (a, b, c) = (upload("a"), upload("b"), upload("c"));
        let (fa, fb, fc) = tokio::join!(
            completer.fetch(&a, pulled),
            completer.fetch(&b, pulled),
            completer.fetch(&c, pulled),
        );
        assert_eq!(calls.load(Relaxed), 1);
        assert_eq!(completer.questions_asked(), 1);
        assert_eq!([size(&fa), size(&fb), size(&fc)], [1, 1, 1]);
        // Pulled again before the answer's question: still that answer (cached).
        assert_eq!(size(&completer.fetch(&upload("d"), pulled).await), 1);
        assert_eq!(calls.load(Relaxed), 1);
        // An event pulled after the question was asked: the answer may not show its change, so
        // oCIS is asked again, and the newer answer is shared from then on.
        let later = Instant::now();
        assert_eq!(size(&completer.fetch(&upload("e"), later).await), 2);
        assert_eq!(size(&completer.fetch(&upload("f"), later).await), 2);
        assert_eq!(calls.load(Relaxed), 2);
    }

    #[tokio::test]
    async fn an_unreachable_ocis_is_never_a_shared_answer() {
        struct Down(Arc<AtomicUsize>);
        #[async_trait]
        impl Items for Down {
            async fn by_id(&self, _: &str, _: &str) -> Result<ItemInfo, GraphError> {
                self.0.fetch_add(1, Relaxed);
                Err(GraphError::Unavailable("connection refused".into()))
            }
            async fn by_path(&self, _: &str, _: &str) -> Result<ItemInfo, GraphError> {
                Err(GraphError::Unavailable("down".into()))
            }
            async fn trashed(&self, _: &str, _: &str) -> Result<ItemInfo, GraphError> {
                Err(GraphError::Unavailable("down".into()))
            }
        }
        let calls = Arc::new(AtomicUsize::new(0));
        let completer = Completer::new(Some(Box::new(Down(calls.clone()))));
        let pulled = Instant::now();
        for _ in 0..2 {
            assert!(matches!(
                completer.fetch(&upload("a"), pulled).await,
                Fetched::Unavailable(_)
            ));
        }
        // Each fetch asked oCIS once itself (the caller's retries reach it), none twice.
        assert_eq!(calls.load(Relaxed), 2);
    }

    /// oCIS with a fixed tree: items by id and by path, counting questions.
    struct Tree {
        items: HashMap<String, ItemInfo>,
        calls: Arc<AtomicUsize>,
    }

    #[async_trait]
    impl Items for Tree {
        async fn by_id(&self, _: &str, item: &str) -> Result<ItemInfo, GraphError> {
            self.calls.fetch_add(1, Relaxed);
            self.items
                .values()
                .find(|i| i.id.as_deref() == Some(item))
                .cloned()
                .ok_or_else(|| GraphError::NotFound(item.into()))
        }
        async fn by_path(&self, _: &str, path: &str) -> Result<ItemInfo, GraphError> {
            self.calls.fetch_add(1, Relaxed);
            self.items
                .get(path)
                .cloned()
                .ok_or_else(|| GraphError::NotFound(path.into()))
        }
        async fn trashed(&self, _: &str, _: &str) -> Result<ItemInfo, GraphError> {
            Err(GraphError::NotFound("no trash here".into()))
        }
    }

    fn tree(entries: &[(&str, u64, bool)]) -> (Tree, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let items = entries
            .iter()
            .map(|(path, size, folder)| {
                let info = ItemInfo {
                    id: Some(format!("s$p!{path}")),
                    path: Some((*path).to_owned()),
                    size: *size,
                    etag: Some(format!("etag-{path}")),
                    folder: *folder,
                    parent_id: None,
                };
                ((*path).to_owned(), info)
            })
            .collect();
        (
            Tree {
                items,
                calls: calls.clone(),
            },
            calls,
        )
    }

    fn overwrite(event_id: &str, path: &str) -> Lookup {
        Lookup {
            overwrite: true,
            item_id: Some(format!("s$p!{path}")),
            path: Some(path.to_owned()),
            ..upload(event_id)
        }
    }

    fn data(event: &[u8]) -> serde_json::Value {
        let event: serde_json::Value = serde_json::from_slice(event).unwrap();
        event["data"].clone()
    }

    #[tokio::test]
    async fn an_overwrite_of_an_unseen_file_carries_its_folders_sizes_and_a_seen_one_its_delta() {
        let (items, calls) = tree(&[
            ("/", 1000, true),
            ("/docs", 300, true),
            ("/docs/q1", 120, true),
            ("/docs/q1/f.txt", 80, false),
        ]);
        let completer = Completer::new(Some(Box::new(items)));
        let pulled = Instant::now();
        let first = overwrite("o1", "/docs/q1/f.txt");
        let second = overwrite("o2", "/docs/q1/f.txt");
        // Pulled together: the file and its three folders are asked once for both.
        let (f1, f2) = tokio::join!(
            completer.fetch(&first, pulled),
            completer.fetch(&second, pulled)
        );
        assert_eq!(calls.load(Relaxed), 4, "the file, /docs/q1, /docs and /");
        let event = completer.finish(&first, f1);
        let d = data(&event);
        assert_eq!(d["size"], 80);
        assert!(d.get("size_delta").is_none(), "{d}");
        assert_eq!(
            d["folder_sizes"],
            serde_json::json!([
                {"path": "/docs/q1", "size": 120, "etag": "etag-/docs/q1"},
                {"path": "/docs", "size": 300, "etag": "etag-/docs"},
                {"path": "/", "size": 1000, "etag": "etag-/"},
            ])
        );
        let decoded = crate::event::decode(&event).unwrap();
        assert_eq!(decoded.event_type, crate::event::EventType::FileUploaded);
        // The first told the file's size: the second is an exact delta of 0, whatever it read.
        let d = data(&completer.finish(&second, f2));
        assert_eq!(d["size_delta"], 0);
        assert!(d.get("folder_sizes").is_none());
        // Now seen: a later overwrite asks for the file alone.
        let later = completer
            .fetch(&overwrite("o3", "/docs/q1/f.txt"), Instant::now())
            .await;
        assert!(matches!(later, Fetched::Info(_)), "{later:?}");
        assert_eq!(calls.load(Relaxed), 5);
    }

    #[tokio::test]
    async fn an_overwrite_whose_folders_cannot_be_read_resyncs_the_space() {
        let deep = format!("{}/f", "/d".repeat(MAX_FOLDER_READS));
        let (items, _) = tree(&[("/gone/f", 5, false), (deep.as_str(), 5, false)]);
        let completer = Completer::new(Some(Box::new(items)));
        for path in ["/gone/f", deep.as_str()] {
            let lookup = overwrite("o", path);
            let fetched = completer.fetch(&lookup, Instant::now()).await;
            let event: serde_json::Value =
                serde_json::from_slice(&completer.finish(&lookup, fetched)).unwrap();
            assert_eq!(event["type"], "space-resync", "{path}: {event}");
        }
    }
}
