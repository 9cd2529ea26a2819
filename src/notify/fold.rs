//! Folding the folder changes of several messages into one list that means the same.
//!
//! A batch (the rate limiter's `coalesced` message, a connection's digest) stands for several
//! messages, and a client must end with the same folder sizes from the batch as from the
//! messages one by one. Entries apply in order:
//! - deltas are summed per run (a folder and how far up), the way a client would add them;
//! - an absolute size (`size`) replaces what came before it for its folder, so a delta covering
//!   that folder that came *after* it must stay after it: such a delta starts a new group of
//!   sums, behind the absolute size, rather than being summed into an earlier run;
//! - a later absolute size of a folder replaces an earlier one in place when nothing covering the
//!   folder came in between, so a burst of overwrites in one folder folds to one entry per folder.

use std::collections::HashMap;
use std::sync::Arc;

use indexmap::IndexMap;

use super::ancestors::FolderDelta;

/// Folder entries of messages added oldest first; [`FolderFold::finish`] gives the folded list.
#[derive(Default)]
pub struct FolderFold {
    /// Entries already placed: earlier groups of sums and absolute sizes.
    done: Vec<FolderDelta>,
    /// The current group of sums, per run: summed delta and latest mtime.
    sums: IndexMap<(Arc<str>, u32), (i64, Arc<str>)>,
    /// Absolute sizes in `done` that nothing after them covers yet, by folder: where they are.
    replaceable: HashMap<Arc<str>, usize>,
}

impl FolderFold {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one message's entry (messages oldest first, each message's entries in order).
    pub fn add(&mut self, entry: &FolderDelta) {
        match entry.size {
            Some(_) => self.add_absolute(entry),
            None => self.add_delta(entry),
        }
    }

    fn add_delta(&mut self, entry: &FolderDelta) {
        // A delta over a folder with a pending absolute size lands after it (it goes into
        // `sums`, which is placed after `done`), so that size is no longer replaceable.
        if !self.replaceable.is_empty() {
            self.replaceable
                .retain(|folder, _| !covers(&entry.path, entry.levels, folder));
        }
        let slot = self
            .sums
            .entry((entry.path.clone(), entry.levels))
            .or_insert((0, entry.mtime.clone()));
        // Each event's delta is bounded (`event::MAX_SIZE`), but a long batch must still never
        // wrap around into a wrong sign.
        slot.0 = slot.0.saturating_add(entry.size_delta.unwrap_or(0));
        slot.1 = entry.mtime.clone();
    }

    fn add_absolute(&mut self, entry: &FolderDelta) {
        if let Some(&at) = self.replaceable.get(&entry.path) {
            // Nothing covering the folder came since: the newer size simply wins.
            self.done[at] = entry.clone();
            return;
        }
        if self
            .sums
            .keys()
            .any(|(path, levels)| covers(path, *levels, &entry.path))
        {
            // Sums over this folder came before the size: they must apply before it.
            self.seal();
        }
        // Sums still pending cover other folders only: applying them after the size changes
        // nothing for it, and a later delta over this folder will land after it.
        self.replaceable.insert(entry.path.clone(), self.done.len());
        self.done.push(entry.clone());
    }

    /// Places the current sums, in the order their runs first appeared.
    fn seal(&mut self) {
        self.done.extend(
            self.sums
                .drain(..)
                .map(|((path, levels), (delta, mtime))| FolderDelta {
                    path,
                    size_delta: Some(delta),
                    size: None,
                    mtime,
                    levels,
                    etag: None,
                }),
        );
        // A sealed sum lies after every absolute size placed so far; those it covers were
        // already dropped from `replaceable` when the sum's deltas arrived.
    }

    /// The folded entries, in the order a client applies them.
    pub fn finish(mut self) -> Vec<FolderDelta> {
        self.seal();
        self.done
    }
}

/// Whether the run from `path` over `levels` folders includes `folder`.
fn covers(path: &str, levels: u32, folder: &str) -> bool {
    if !crate::path::is_within(path, folder) {
        return false;
    }
    let depth = |p: &str| if p == "/" { 0 } else { p.matches('/').count() };
    let below = depth(path).saturating_sub(depth(folder));
    below < levels as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn delta(path: &str, levels: u32, d: i64) -> FolderDelta {
        FolderDelta {
            path: Arc::from(path),
            size_delta: Some(d),
            size: None,
            mtime: Arc::from("t"),
            levels,
            etag: None,
        }
    }

    fn absolute(path: &str, size: u64) -> FolderDelta {
        FolderDelta {
            path: Arc::from(path),
            size_delta: None,
            size: Some(size),
            mtime: Arc::from("t"),
            levels: 1,
            etag: None,
        }
    }

    /// What a client knowing `start` sizes ends with after applying `entries` in order.
    fn apply(start: &BTreeMap<String, i64>, entries: &[FolderDelta]) -> BTreeMap<String, i64> {
        let mut sizes = start.clone();
        for e in entries {
            for folder in e.folders() {
                let slot = sizes.entry(folder.to_owned()).or_default();
                match (e.size, e.size_delta) {
                    (Some(s), _) => *slot = s as i64,
                    (None, Some(d)) => *slot += d,
                    (None, None) => {}
                }
            }
        }
        sizes
    }

    #[test]
    fn covers_counts_levels_upwards() {
        assert!(covers("/a/b", 1, "/a/b"));
        assert!(!covers("/a/b", 1, "/a"));
        assert!(covers("/a/b", 2, "/a"));
        assert!(covers("/a/b", 3, "/"));
        assert!(!covers("/a/b", 2, "/"));
        assert!(!covers("/ab", 2, "/a"));
        assert!(covers("/", 1, "/"));
    }

    #[test]
    fn a_delta_after_an_absolute_size_stays_after_it() {
        let mut fold = FolderFold::new();
        fold.add(&delta("/a", 2, 10));
        fold.add(&absolute("/a", 100));
        fold.add(&delta("/a", 2, 5));
        let out = fold.finish();
        let sizes = apply(&BTreeMap::new(), &out);
        assert_eq!(sizes["/a"], 105);
        assert_eq!(sizes["/"], 15);
    }

    #[test]
    fn a_burst_of_absolute_sizes_folds_to_one_entry_per_folder() {
        let mut fold = FolderFold::new();
        for n in 0..100 {
            fold.add(&absolute("/docs", n));
            fold.add(&absolute("/", 1000 + n));
        }
        let out = fold.finish();
        assert_eq!(out, vec![absolute("/docs", 99), absolute("/", 1099)]);
    }

    fn entry() -> impl Strategy<Value = FolderDelta> {
        let paths = prop::sample::select(vec!["/", "/a", "/a/b", "/a/b/c", "/x", "/x/y"]);
        (paths, 1u32..4, -50i64..50, prop::option::of(0u64..1000)).prop_map(
            |(path, levels, d, size)| match size {
                Some(s) => absolute(path, s),
                None => delta(path, levels, d),
            },
        )
    }

    proptest! {
        /// Applying the folded list ends where applying every entry one by one does, whatever
        /// mix of deltas and absolute sizes came in whatever order.
        #[test]
        fn folding_never_changes_what_a_client_ends_with(
            entries in prop::collection::vec(entry(), 0..40),
            start in prop::collection::btree_map(
                prop::sample::select(vec!["/", "/a", "/a/b", "/x"]).prop_map(str::to_owned),
                0i64..500,
                0..4,
            ),
        ) {
            let mut fold = FolderFold::new();
            for e in &entries {
                fold.add(e);
            }
            let folded = fold.finish();
            prop_assert!(folded.len() <= entries.len());
            prop_assert_eq!(apply(&start, &folded), apply(&start, &entries));
        }
    }
}
