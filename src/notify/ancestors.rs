//! Folder deltas: how each ancestor folder's size and mtime change with one event.
//!
//! This is what lets a user looking at `/f1/f2` see `/f1/f2/f3` grow when a file lands in
//! `/f1/f2/f3/f4`: every folder from the item's parent up to the space root changes, with the
//! size it gained or lost and the event time as its new mtime.
//!
//! # Runs, not lists: a message grows linearly with its event
//! Listing every ancestor with its full path made a message quadratic in the path's length:
//! one event with a 4,000-byte path of 2,000 levels became 8 MB per recipient. Ancestors that
//! change alike form a *run*: `{"path": P, "levels": n}` stands for `P` and the `n - 1`
//! folders above it. An upload, a trash or a restore is one run from the item's parent to the
//! root; a move is at most three (folders only above the new place gain the size, folders only
//! above the old place lose it, the common ancestors are touched). A client applies a run by
//! walking up from `P`, or, for the folder on screen `V`, by checking whether a child `C` of
//! `V` lies on it: `P` is `C` or below it, at most `n - 1` levels down.
//!
//! # Absolute sizes
//! Where the source cannot say by how much a folder changed (oCIS: an upload over a file whose
//! old size nobody saw), it reads the folders' sizes after the change instead
//! ([`crate::event::FolderSize`]). Such a folder is an entry of its own, `levels: 1`, with
//! `size` and no `size_delta`: a client sets the size rather than adding to it, which is safe to
//! apply twice. Entries apply in order, so a batch that folds several messages
//! ([`FolderFold`]) keeps a change that came after an absolute size after it.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::event::{EventType, ItemChange};

/// A change shared by a folder and the `levels - 1` folders above it (nearest first): either
/// a size change (`size_delta`) or, for one folder, its size after the change (`size`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FolderDelta {
    pub path: Arc<str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_delta: Option<i64>,
    /// The folder's size after the change, where the change itself is not known exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    pub mtime: Arc<str>,
    /// How many folders the change applies to, from `path` upwards (1: `path` alone).
    pub levels: u32,
    /// With `size`: the folder's etag as read then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<Arc<str>>,
}

impl FolderDelta {
    /// Every folder the run covers, nearest first.
    pub fn folders(&self) -> impl Iterator<Item = &str> {
        std::iter::successors(Some(&*self.path), |p| crate::path::parent_str(p))
            .take(self.levels as usize)
    }
}

/// The runs of folder changes above `item` (and above `old_path` for moves), each folder once,
/// never the item itself. For a move, folders above only the old path lose the size, folders
/// above only the new path gain it, and common ancestors are unchanged in size but touched.
/// A folder the event gives an absolute size for is an entry of its own, with that size.
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
    let runs = delta_runs(item, time, delta, size);
    if item.folder_sizes.is_empty() {
        runs
    } else {
        with_absolute_sizes(runs, item, time)
    }
}

/// A delta run from `folders[0]` over `folders.len()` folders.
fn run(folders: &[&str], size_delta: i64, time: &Arc<str>) -> Option<FolderDelta> {
    let first = folders.first()?;
    Some(FolderDelta {
        path: Arc::from(*first),
        size_delta: Some(size_delta),
        size: None,
        mtime: time.clone(),
        levels: u32::try_from(folders.len()).unwrap_or(u32::MAX),
        etag: None,
    })
}

/// The runs of an item change as deltas (see [`folder_deltas`]).
fn delta_runs(item: &ItemChange, time: &Arc<str>, delta: i64, size: i64) -> Vec<FolderDelta> {
    let new_ancestors: Vec<&str> = item.path.ancestors().collect();
    let Some(old) = &item.old_path else {
        return run(&new_ancestors, delta, time).into_iter().collect();
    };
    let old_ancestors: Vec<&str> = old.ancestors().collect();
    // Ancestor lists end at the root; the common part is their shared tail.
    let common = new_ancestors
        .iter()
        .rev()
        .zip(old_ancestors.iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    let new_only = &new_ancestors[..new_ancestors.len() - common];
    let old_only = &old_ancestors[..old_ancestors.len() - common];
    let is_item = |p: &&str| *p == item.path.as_str() || *p == old.as_str();
    if new_only.iter().chain(old_only).any(is_item) {
        // A folder moved into itself or out of its own parent chain: not a real move, but
        // keep each folder once, one by one.
        return per_folder(
            &new_ancestors,
            &old_ancestors,
            common,
            delta,
            size,
            time,
            is_item,
        );
    }
    [
        run(new_only, delta, time),
        run(&new_ancestors[new_ancestors.len() - common..], 0, time),
        run(old_only, -size, time),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// `runs` with every folder the event gives an absolute size for cut out into an entry of its
/// own (`size`, `levels: 1`), in place, so the order stays nearest first.
fn with_absolute_sizes(
    runs: Vec<FolderDelta>,
    item: &ItemChange,
    time: &Arc<str>,
) -> Vec<FolderDelta> {
    let absolute: HashMap<&str, &crate::event::FolderSize> = item
        .folder_sizes
        .iter()
        .map(|f| (f.path.as_str(), f))
        .collect();
    let mut out = Vec::with_capacity(runs.len() + absolute.len());
    for r in runs {
        let folders: Vec<&str> = r.folders().collect();
        let mut stretch = 0;
        for (i, folder) in folders.iter().enumerate() {
            let Some(known) = absolute.get(folder) else {
                continue;
            };
            if let Some(delta) = r.size_delta {
                out.extend(run(&folders[stretch..i], delta, time));
            }
            out.push(FolderDelta {
                path: Arc::from(*folder),
                size_delta: None,
                size: Some(known.size),
                mtime: time.clone(),
                levels: 1,
                etag: known.etag.as_deref().map(Arc::from),
            });
            stretch = i + 1;
        }
        if stretch == 0 {
            out.push(r);
        } else if let Some(delta) = r.size_delta {
            out.extend(run(&folders[stretch..], delta, time));
        }
    }
    out
}

/// The one-folder-per-entry fallback for moves whose paths contain each other.
fn per_folder(
    new_ancestors: &[&str],
    old_ancestors: &[&str],
    common: usize,
    delta: i64,
    size: i64,
    time: &Arc<str>,
    is_item: impl Fn(&&str) -> bool,
) -> Vec<FolderDelta> {
    let one = |p: &str, size_delta| FolderDelta {
        path: Arc::from(p),
        size_delta: Some(size_delta),
        size: None,
        mtime: time.clone(),
        levels: 1,
        etag: None,
    };
    let new_only = new_ancestors.len() - common;
    let mut out = Vec::new();
    for (i, p) in new_ancestors.iter().enumerate() {
        if !is_item(p) {
            out.push(one(p, if i < new_only { delta } else { 0 }));
        }
    }
    for p in &old_ancestors[..old_ancestors.len() - common] {
        if !is_item(p) && !new_ancestors.contains(p) {
            out.push(one(p, -size));
        }
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
            parent_id: None,
            etag: None,
            folder_sizes: Vec::new(),
        }
    }

    /// Each folder with its delta, runs expanded.
    fn summary(d: &[FolderDelta]) -> Vec<(&str, i64)> {
        d.iter()
            .flat_map(|f| {
                f.folders()
                    .map(move |p| (p, f.size_delta.unwrap_or_default()))
            })
            .collect()
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

    #[test]
    fn absolute_sizes_cut_their_folders_out_of_the_runs() {
        let t: Arc<str> = Arc::from("2026-11-22T10:00:00Z");
        let mut up = item("/a/b/c/f", None, 9, 4);
        up.folder_sizes = vec![
            crate::event::FolderSize {
                path: SpacePath::parse("/a/b").unwrap(),
                size: 70,
                etag: Some("e".into()),
            },
            crate::event::FolderSize {
                path: SpacePath::parse("/").unwrap(),
                size: 900,
                etag: None,
            },
        ];
        let entries = folder_deltas(EventType::FileUploaded, &up, &t);
        let shown: Vec<(&str, Option<i64>, Option<u64>, u32)> = entries
            .iter()
            .map(|e| (&*e.path, e.size_delta, e.size, e.levels))
            .collect();
        assert_eq!(
            shown,
            [
                ("/a/b/c", Some(4), None, 1),
                ("/a/b", None, Some(70), 1),
                ("/a", Some(4), None, 1),
                ("/", None, Some(900), 1),
            ]
        );
        assert_eq!(entries[1].etag.as_deref(), Some("e"));
        let json = serde_json::to_value(&entries[1]).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"path":"/a/b","size":70,"mtime":&*t,"levels":1,"etag":"e"})
        );
    }

    #[test]
    fn a_deep_path_is_one_run_not_a_list() {
        let t: Arc<str> = Arc::from("2026-11-22T10:00:00Z");
        let deep = format!("{}/f", "/d".repeat(2000));
        let up = item(&deep, None, 1, 1);
        let runs = folder_deltas(EventType::FileUploaded, &up, &t);
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].levels, 2001, "2,000 folders and the root");
        assert_eq!(runs[0].folders().count(), 2001);
        assert_eq!(runs[0].folders().last(), Some("/"));
        let bytes = serde_json::to_vec(&runs).unwrap().len();
        assert!(
            bytes < deep.len() + 200,
            "{bytes} bytes for a {}-byte path",
            deep.len()
        );
        let mv = item(&format!("{deep}2"), Some(&format!("/x{deep}")), 1, 0);
        let runs = folder_deltas(EventType::ItemMoved, &mv, &t);
        assert!(runs.len() <= 3);
        let bytes = serde_json::to_vec(&runs).unwrap().len();
        assert!(bytes < 3 * deep.len() + 600, "{bytes}");
    }
}
