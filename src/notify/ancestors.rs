//! Folder deltas: how each ancestor folder's size and mtime change with one event.
//!
//! This is what lets a user looking at `/f1/f2` see `/f1/f2/f3` grow when a file lands in
//! `/f1/f2/f3/f4`: every folder from the item's parent up to the space root is listed, nearest
//! first, with the size it gained or lost and the event time as its new mtime.

use std::sync::Arc;

use serde::Serialize;

use crate::event::{EventType, ItemChange};

/// One ancestor folder's change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FolderDelta {
    pub path: Arc<str>,
    pub size_delta: i64,
    pub mtime: Arc<str>,
}

/// The deltas of every folder above `item` (and above `old_path` for moves), each once, never
/// the item itself. For a move, folders above only the old path lose the size, folders above
/// only the new path gain it, and common ancestors are unchanged in size but touched.
pub fn folder_deltas(
    event_type: EventType,
    item: &ItemChange,
    time: &Arc<str>,
) -> Vec<FolderDelta> {
    let size = i64::try_from(item.size).unwrap_or(i64::MAX);
    let delta = match event_type {
        EventType::FileUploaded => item.size_delta,
        EventType::ItemTrashed => -size,
        EventType::ItemRestored => size,
        EventType::ItemMoved => size,
        _ => 0,
    };
    let delta_at = |path: &str| FolderDelta {
        path: Arc::from(path),
        size_delta: delta,
        mtime: time.clone(),
    };

    let Some(old) = &item.old_path else {
        return item.path.ancestors().map(delta_at).collect();
    };
    let new_ancestors: Vec<&str> = item.path.ancestors().collect();
    let old_ancestors: Vec<&str> = old.ancestors().collect();
    let is_item = |p: &str| p == item.path.as_str() || p == old.as_str();
    let mut out = Vec::with_capacity(new_ancestors.len() + old_ancestors.len());
    for p in &new_ancestors {
        if is_item(p) {
            continue;
        }
        let mut d = delta_at(p);
        if old_ancestors.contains(p) {
            d.size_delta = 0;
        }
        out.push(d);
    }
    for p in &old_ancestors {
        if is_item(p) || new_ancestors.contains(p) {
            continue;
        }
        let mut d = delta_at(p);
        d.size_delta = -size;
        out.push(d);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ItemKind;
    use crate::path::SpacePath;

    fn item(path: &str, old: Option<&str>, size: u64, size_delta: i64) -> ItemChange {
        ItemChange {
            path: SpacePath::parse(path).unwrap(),
            old_path: old.map(|o| SpacePath::parse(o).unwrap()),
            kind: ItemKind::File,
            size,
            size_delta,
            item_id: None,
            etag: None,
        }
    }

    fn summary(d: &[FolderDelta]) -> Vec<(&str, i64)> {
        d.iter().map(|f| (&*f.path, f.size_delta)).collect()
    }

    #[test]
    fn per_event_type() {
        let t: Arc<str> = Arc::from("2026-11-22T10:00:00Z");
        let up = item("/f1/f2/r.pdf", None, 2048, 1000);
        assert_eq!(
            summary(&folder_deltas(EventType::FileUploaded, &up, &t)),
            [("/f1/f2", 1000), ("/f1", 1000), ("/", 1000)]
        );
        for zero in [EventType::FileTouched, EventType::FolderCreated] {
            assert_eq!(
                summary(&folder_deltas(zero, &up, &t)),
                [("/f1/f2", 0), ("/f1", 0), ("/", 0)]
            );
        }
        assert_eq!(
            summary(&folder_deltas(EventType::ItemTrashed, &up, &t)),
            [("/f1/f2", -2048), ("/f1", -2048), ("/", -2048)]
        );
        assert_eq!(
            summary(&folder_deltas(EventType::ItemRestored, &up, &t)),
            [("/f1/f2", 2048), ("/f1", 2048), ("/", 2048)]
        );
        assert!(folder_deltas(EventType::FolderCreated, &item("/", None, 0, 0), &t).is_empty());
        assert!(
            folder_deltas(EventType::FileUploaded, &up, &t)
                .iter()
                .all(|d| d.mtime == t)
        );
    }

    #[test]
    fn moves_split_old_new_and_common() {
        let t: Arc<str> = Arc::from("2026-11-22T10:00:00Z");
        let mv = item("/a/x/new.txt", Some("/a/y/z/old.txt"), 10, 0);
        assert_eq!(
            summary(&folder_deltas(EventType::ItemMoved, &mv, &t)),
            [
                ("/a/x", 10),
                ("/a", 0),
                ("/", 0),
                ("/a/y/z", -10),
                ("/a/y", -10)
            ]
        );
        let rename = item("/a/b2", Some("/a/b1"), 5, 0);
        assert_eq!(
            summary(&folder_deltas(EventType::ItemMoved, &rename, &t)),
            [("/a", 0), ("/", 0)]
        );
        // Moving a folder up into its former parent's parent: the item never lists itself.
        let up = item("/b", Some("/a/b"), 7, 0);
        assert_eq!(
            summary(&folder_deltas(EventType::ItemMoved, &up, &t)),
            [("/", 0), ("/a", -7)]
        );
    }
}
