//! A folder tree rebuilt from the events, standing in for the storage the demo page would list.
//!
//! Real clients list folders through WebDAV and then apply pushed changes; in the embedded
//! default there is no storage, so this tree answers the listing from the same events.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Serialize;

use crate::event::{EventBody, EventType, ItemKind, StorageEvent};
use crate::path::{SpacePath, is_within};

#[derive(Debug, Clone)]
struct Node {
    kind: ItemKind,
    size: u64,
    mtime: Arc<str>,
}

#[derive(Default)]
struct SpaceTree {
    nodes: BTreeMap<String, Node>,
    /// Trashed subtrees by their former path, so a restore brings back what was there.
    trash: HashMap<String, Vec<(String, Node)>>,
}

/// One row of a folder listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub name: String,
    pub path: String,
    pub kind: &'static str,
    /// For folders, the size of everything below.
    pub size: u64,
    pub mtime: Option<Arc<str>>,
}

#[derive(Default)]
pub struct DemoTree {
    spaces: HashMap<String, SpaceTree>,
}

impl DemoTree {
    pub fn apply(&mut self, event: &StorageEvent) {
        let EventBody::Item(item) = &event.body else {
            return;
        };
        let tree = self.spaces.entry(event.space_id.clone()).or_default();
        let time = &event.time;
        let node = Node {
            kind: item.kind,
            size: if item.kind == ItemKind::File {
                item.size
            } else {
                0
            },
            mtime: time.clone(),
        };
        match event.event_type {
            EventType::FileUploaded | EventType::FolderCreated => {
                tree.nodes.insert(item.path.to_string(), node);
            }
            EventType::FileTouched => {
                tree.nodes
                    .entry(item.path.to_string())
                    .and_modify(|n| n.mtime = time.clone())
                    .or_insert(node);
            }
            EventType::ItemTrashed => {
                let removed = tree.take_subtree(item.path.as_str());
                tree.trash.insert(item.path.to_string(), removed);
            }
            EventType::ItemRestored => match tree.trash.remove(item.path.as_str()) {
                Some(nodes) => tree.nodes.extend(nodes),
                None => {
                    tree.nodes.insert(item.path.to_string(), node);
                }
            },
            EventType::ItemMoved => {
                if let Some(old) = &item.old_path {
                    let moved = tree.take_subtree(old.as_str());
                    let renamed: Vec<(String, Node)> = moved
                        .into_iter()
                        .map(|(p, n)| (format!("{}{}", item.path, &p[old.as_str().len()..]), n))
                        .collect();
                    if renamed.is_empty() {
                        tree.nodes.insert(item.path.to_string(), node);
                    }
                    tree.nodes.extend(renamed);
                    tree.touch_ancestors(old, time);
                }
            }
            EventType::SpaceMemberAdded
            | EventType::SpaceMemberRemoved
            | EventType::GroupMemberAdded
            | EventType::GroupMemberRemoved
            | EventType::SpaceResync => {}
        }
        tree.touch_ancestors(&item.path, time);
    }

    /// The children of `folder` in `space`.
    pub fn listing(&self, space: &str, folder: &SpacePath) -> Vec<Entry> {
        let Some(tree) = self.spaces.get(space) else {
            return Vec::new();
        };
        tree.nodes
            .iter()
            .filter(|(path, _)| {
                SpacePath::parse(path)
                    .ok()
                    .and_then(|p| p.parent())
                    .as_ref()
                    == Some(folder)
            })
            .map(|(path, node)| Entry {
                name: path.rsplit('/').next().unwrap_or_default().to_owned(),
                path: path.clone(),
                kind: node.kind.as_str(),
                size: match node.kind {
                    ItemKind::File => node.size,
                    ItemKind::Folder => tree.size_below(path),
                },
                mtime: Some(node.mtime.clone()),
            })
            .collect()
    }

    /// Size and mtime of a folder itself (the root included).
    pub fn folder(&self, space: &str, folder: &SpacePath) -> (u64, Option<Arc<str>>) {
        let Some(tree) = self.spaces.get(space) else {
            return (0, None);
        };
        let mtime = tree.nodes.get(folder.as_str()).map(|n| n.mtime.clone());
        (tree.size_below(folder.as_str()), mtime)
    }
}

impl SpaceTree {
    fn take_subtree(&mut self, root: &str) -> Vec<(String, Node)> {
        let keys: Vec<String> = self
            .nodes
            .keys()
            .filter(|p| is_within(p, root))
            .cloned()
            .collect();
        keys.into_iter()
            .filter_map(|k| self.nodes.remove(&k).map(|n| (k, n)))
            .collect()
    }

    fn size_below(&self, folder: &str) -> u64 {
        self.nodes
            .iter()
            .filter(|(p, n)| {
                n.kind == ItemKind::File && p.as_str() != folder && is_within(p, folder)
            })
            .map(|(_, n)| n.size)
            .sum()
    }

    fn touch_ancestors(&mut self, path: &SpacePath, time: &Arc<str>) {
        for folder in path.ancestors() {
            let node = self.nodes.entry(folder.to_owned()).or_insert(Node {
                kind: ItemKind::Folder,
                size: 0,
                mtime: time.clone(),
            });
            node.mtime = time.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::decode;

    fn apply(tree: &mut DemoTree, t: &str, path: &str, extra: &str) {
        let json = format!(
            r#"{{"id":"x","type":"{t}","time":"2026-11-22T10:00:00Z","data":{{"space_id":"s","path":"{path}"{extra}}}}}"#
        );
        tree.apply(&decode(json.as_bytes()).unwrap());
    }

    fn names(tree: &DemoTree, folder: &str) -> Vec<(String, u64)> {
        tree.listing("s", &SpacePath::parse(folder).unwrap())
            .into_iter()
            .map(|e| (e.name, e.size))
            .collect()
    }

    #[test]
    fn follows_uploads_moves_trash_and_restore() {
        let mut t = DemoTree::default();
        apply(&mut t, "folder-created", "/a", r#","kind":"folder""#);
        apply(
            &mut t,
            "file-uploaded",
            "/a/b/f.txt",
            r#","kind":"file","size":10"#,
        );
        assert_eq!(names(&t, "/"), [("a".to_owned(), 10)]);
        assert_eq!(names(&t, "/a"), [("b".to_owned(), 10)]);
        apply(
            &mut t,
            "item-moved",
            "/c",
            r#","kind":"folder","size":10,"old_path":"/a/b""#,
        );
        assert_eq!(names(&t, "/"), [("a".to_owned(), 0), ("c".to_owned(), 10)]);
        assert_eq!(names(&t, "/c"), [("f.txt".to_owned(), 10)]);
        apply(
            &mut t,
            "item-trashed",
            "/c",
            r#","kind":"folder","size":10"#,
        );
        assert_eq!(names(&t, "/"), [("a".to_owned(), 0)]);
        apply(
            &mut t,
            "item-restored",
            "/c",
            r#","kind":"folder","size":10"#,
        );
        assert_eq!(names(&t, "/c"), [("f.txt".to_owned(), 10)]);
        assert_eq!(t.folder("s", &SpacePath::root()).0, 10);
    }
}
