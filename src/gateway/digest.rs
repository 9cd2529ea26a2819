//! Digest windows: a connection that asks for `digest=N` gets its changes in batches.
//!
//! Desktop sync clients would rather learn "this folder changed a lot" once than 500 times in
//! a minute (the Nuxeo Drive design waits 30 s "to see if other messages arrive"). A
//! connection opened with `?digest=N` has its item changes held for up to N seconds from the
//! first one, then sent as one `coalesced` message: folder changes folded as the consumer's rate
//! limit folds them (`notify::fold`: deltas summed per run, absolute sizes in place), the latest
//! change of each path, every event id (the same shape the consumer's rate limit produces, so a
//! client handles one kind of batch). Other connections of the same user are unaffected: the
//! digest lives in the connection, after the shared queue.
//!
//! # Exact resume
//! A digest carries the position of the last frame it folds, and it only ever folds a
//! contiguous run of the connection's frames: a change of another space, or any message that
//! is not an item change (membership, resync, notification), first sends what is held, then
//! goes out itself. So every position a client receives covers exactly what came before it,
//! and resuming from a digest's position replays nothing it already summed and skips nothing.
//! What is held when the connection ends was never sent: the client's last position is before
//! it, and a resume replays it.

use std::time::Duration;

use bytes::Bytes;
use indexmap::IndexMap;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use super::session::{Frame, SharedFrame};
use crate::notify::ancestors::FolderDelta;
use crate::notify::fold::FolderFold;

/// The longest digest window a client may ask for unless the operator allows more
/// (`--max-digest`).
pub const DEFAULT_MAX_DIGEST: Duration = Duration::from_secs(300);

/// Frames folded into one digest at most: a busier window sends a digest early rather than
/// hold an unbounded amount per connection.
pub const MAX_HELD: usize = 1024;

/// Whether a digest folds messages of this type: changes of items and batches of them.
fn folded(message_type: &str) -> bool {
    use crate::notify::message::{COALESCED, ITEM_CHANGES};
    message_type == COALESCED || ITEM_CHANGES.contains(&message_type)
}

/// One connection's digest window.
#[derive(Debug)]
pub struct Digest {
    window: Duration,
    held: Vec<SharedFrame>,
    due: Option<Instant>,
}

impl Digest {
    pub fn new(window: Duration) -> Self {
        Digest {
            window,
            held: Vec::new(),
            due: None,
        }
    }

    /// Takes a frame the connection would send now (admitted by its cursor, passing its
    /// watches); appends to `out` what must go out instead, in order.
    pub fn offer(&mut self, frame: SharedFrame, now: Instant, out: &mut Vec<SharedFrame>) {
        if !folded(&frame.message_type) {
            self.flush(out);
            out.push(frame);
            return;
        }
        if self
            .held
            .first()
            .is_some_and(|first| first.route().space_id != frame.route().space_id)
        {
            self.flush(out);
        }
        if self.held.is_empty() {
            self.due = Some(now + self.window);
        }
        self.held.push(frame);
        if self.held.len() >= MAX_HELD {
            self.flush(out);
        }
    }

    /// When the held frames must go out, if any are held.
    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    /// Appends what is held to `out`: one frame as it is, several as one `coalesced` frame.
    pub fn flush(&mut self, out: &mut Vec<SharedFrame>) {
        self.due = None;
        match self.held.len() {
            0 => {}
            1 => out.append(&mut self.held),
            _ => match fold(&self.held) {
                Some(frame) => {
                    self.held.clear();
                    out.push(SharedFrame::from(frame));
                }
                // Not foldable (a payload that is not a foldercast message): as they came.
                None => out.append(&mut self.held),
            },
        }
    }
}

/// Parses `digest=N` (seconds, 1 to `max`).
pub fn parse_window(value: &str, max: Duration) -> Result<Duration, String> {
    let seconds: u64 = value
        .parse()
        .map_err(|_| format!("digest {value:?} is not a whole number of seconds"))?;
    let window = Duration::from_secs(seconds);
    if seconds == 0 || window > max {
        return Err(format!(
            "digest must be 1 to {} seconds, not {seconds}",
            max.as_secs()
        ));
    }
    Ok(window)
}

/// One `coalesced` frame for `frames` (one space, in order), at the last one's position.
fn fold(frames: &[SharedFrame]) -> Option<Frame> {
    let mut event_ids: Vec<Value> = Vec::new();
    let mut items: IndexMap<String, Value> = IndexMap::new();
    let mut folders = FolderFold::new();
    let mut actor: Option<Value> = None;
    let mut mixed_actors = false;
    let (mut space, mut time) = (Value::Null, Value::Null);
    for frame in frames {
        let Value::Object(m) = serde_json::from_slice::<Value>(frame.payload()).ok()? else {
            return None;
        };
        space = m.get("space_id")?.clone();
        time = m.get("time").cloned().unwrap_or(Value::Null);
        let this_actor = m.get("actor").cloned().unwrap_or(Value::Null);
        match &actor {
            None => actor = Some(this_actor),
            Some(a) if *a != this_actor => mixed_actors = true,
            Some(_) => {}
        }
        match m.get("event_ids").and_then(Value::as_array) {
            Some(ids) => event_ids.extend(ids.iter().cloned()),
            None => event_ids.push(m.get("event_id")?.clone()),
        }
        let mut latest = |update: Map<String, Value>| {
            let path = update.get("path").and_then(Value::as_str)?.to_owned();
            items.shift_remove(&path);
            items.insert(path, Value::Object(update));
            Some(())
        };
        if let Some(Value::Object(item)) = m.get("item") {
            let mut update = item.clone();
            update.insert("type".into(), m.get("type")?.clone());
            update.insert("event_id".into(), m.get("event_id")?.clone());
            latest(update)?;
        }
        for update in m
            .get("items")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            latest(update.as_object()?.clone())?;
        }
        if let Some(entries) = m.get("folders") {
            // Entries that are not foldercast's own (no path, no levels): not foldable.
            let entries = Vec::<FolderDelta>::deserialize(entries).ok()?;
            for entry in &entries {
                folders.add(entry);
            }
        }
    }
    let message = json!({
        "event_id": event_ids.last()?.clone(),
        "type": "coalesced",
        "space_id": space,
        "actor": if mixed_actors { Value::Null } else { actor.unwrap_or(Value::Null) },
        "time": time,
        "event_ids": event_ids,
        "items": items.into_values().collect::<Vec<_>>(),
        "folders": folders.finish(),
    });
    let payload = Bytes::from(serde_json::to_vec(&message).ok()?);
    let last = frames.last()?;
    Some(Frame::new(
        axum::extract::ws::Utf8Bytes::from(last.id()),
        std::borrow::Cow::Borrowed("coalesced"),
        payload,
        None,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::ws::Utf8Bytes;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn upload(n: u64, space: &str, path: &str, size: i64) -> SharedFrame {
        let payload = json!({
            "event_id": format!("e{n}"), "type": "file-uploaded", "space_id": space,
            "actor": "alice", "time": format!("2026-12-01T10:00:{:02}Z", n % 60),
            "item": {"path": path, "old_path": null, "kind": "file", "size": size.max(0),
                     "item_id": null, "etag": null},
            "folders": [{"path": "/a", "levels": 2, "size_delta": size,
                         "mtime": format!("2026-12-01T10:00:{:02}Z", n % 60)}],
        });
        frame(n, "file-uploaded", payload)
    }

    fn frame(n: u64, kind: &'static str, payload: Value) -> SharedFrame {
        SharedFrame::from(Frame::new(
            Utf8Bytes::from(format!("ep:{n}-0")),
            std::borrow::Cow::Borrowed(kind),
            Bytes::from(payload.to_string()),
            None,
        ))
    }

    fn json_of(f: &Frame) -> Value {
        serde_json::from_slice(f.payload()).unwrap()
    }

    #[test]
    fn a_window_of_changes_is_one_coalesced_frame_at_the_last_position() {
        let now = Instant::now();
        let mut d = Digest::new(Duration::from_secs(30));
        let mut out = Vec::new();
        for (n, path) in [(1, "/a/x"), (2, "/a/y"), (3, "/a/x")] {
            d.offer(upload(n, "s1", path, 10 * n as i64), now, &mut out);
        }
        assert!(out.is_empty(), "held");
        assert_eq!(d.due(), Some(now + Duration::from_secs(30)));
        d.flush(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(d.due(), None);
        assert_eq!(out[0].id(), "ep:3-0");
        let m = json_of(&out[0]);
        assert_eq!(m["type"], "coalesced");
        assert_eq!(m["event_id"], "e3");
        assert_eq!(m["event_ids"], json!(["e1", "e2", "e3"]));
        assert_eq!(m["actor"], "alice");
        assert_eq!(
            m["folders"],
            json!([{"path": "/a", "levels": 2, "size_delta": 60, "mtime": "2026-12-01T10:00:03Z"}])
        );
        let paths: Vec<&str> = m["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["path"].as_str().unwrap())
            .collect();
        assert_eq!(
            paths,
            ["/a/y", "/a/x"],
            "latest change per path, in the order they last changed"
        );
        assert_eq!(m["items"][1]["event_id"], "e3");
        assert_eq!(m["items"][1]["type"], "file-uploaded");
    }

    #[test]
    fn absolute_folder_sizes_keep_their_place_in_a_digest() {
        let now = Instant::now();
        let mut d = Digest::new(Duration::from_secs(30));
        let mut out = Vec::new();
        d.offer(upload(1, "s1", "/a/x", 10), now, &mut out);
        // An overwrite oCIS gave no delta for: /a and / as read after it.
        let overwrite = json!({
            "event_id": "e2", "type": "file-uploaded", "space_id": "s1", "actor": "alice",
            "time": "2026-12-01T10:00:02Z",
            "item": {"path": "/a/o", "old_path": null, "kind": "file", "size": 5,
                     "item_id": null, "etag": null},
            "folders": [
                {"path": "/a", "size": 500, "mtime": "2026-12-01T10:00:02Z", "levels": 1, "etag": "ea"},
                {"path": "/", "size": 900, "mtime": "2026-12-01T10:00:02Z", "levels": 1}],
        });
        d.offer(frame(2, "file-uploaded", overwrite), now, &mut out);
        d.offer(upload(3, "s1", "/a/y", 7), now, &mut out);
        d.flush(&mut out);
        assert_eq!(out.len(), 1);
        let m = json_of(&out[0]);
        assert_eq!(
            m["folders"],
            json!([
                {"path": "/a", "levels": 2, "size_delta": 10, "mtime": "2026-12-01T10:00:01Z"},
                {"path": "/a", "size": 500, "mtime": "2026-12-01T10:00:02Z", "levels": 1, "etag": "ea"},
                {"path": "/", "size": 900, "mtime": "2026-12-01T10:00:02Z", "levels": 1},
                {"path": "/a", "levels": 2, "size_delta": 7, "mtime": "2026-12-01T10:00:03Z"},
            ]),
            "the delta before the sizes is moot, the one after adds to them"
        );
    }

    #[test]
    fn another_space_or_a_message_that_is_no_change_sends_what_is_held_first() {
        let now = Instant::now();
        let mut d = Digest::new(Duration::from_secs(30));
        let mut out = Vec::new();
        d.offer(upload(1, "s1", "/a/x", 1), now, &mut out);
        d.offer(upload(2, "s1", "/a/y", 1), now, &mut out);
        d.offer(upload(3, "s2", "/a/z", 1), now, &mut out);
        let ids: Vec<&str> = out.iter().map(|f| f.id()).collect();
        assert_eq!(ids, ["ep:2-0"], "s1's two as one, s2's held");
        let resync = frame(
            4,
            "resync",
            json!({"type": "resync", "space_id": "s2", "time": "t", "reason": "backlog"}),
        );
        d.offer(resync, now, &mut out);
        let ids: Vec<&str> = out.iter().map(|f| f.id()).collect();
        assert_eq!(
            ids,
            ["ep:2-0", "ep:3-0", "ep:4-0"],
            "a lone change goes as it is, then the resync"
        );
        assert_eq!(&*out[1].message_type, "file-uploaded");
        assert_eq!(d.due(), None);
    }

    #[test]
    fn a_busy_window_is_sent_early_rather_than_grow() {
        let now = Instant::now();
        let mut d = Digest::new(Duration::from_secs(30));
        let mut out = Vec::new();
        for n in 0..MAX_HELD as u64 + 1 {
            d.offer(upload(n, "s1", "/a/x", 1), now, &mut out);
        }
        assert_eq!(out.len(), 1);
        assert_eq!(
            json_of(&out[0])["event_ids"].as_array().unwrap().len(),
            MAX_HELD
        );
    }

    #[test]
    fn windows_are_bounded() {
        let max = Duration::from_secs(300);
        assert_eq!(parse_window("30", max), Ok(Duration::from_secs(30)));
        assert!(parse_window("0", max).is_err());
        assert!(parse_window("301", max).is_err());
        assert!(parse_window("1.5", max).is_err());
        assert!(parse_window("-1", max).is_err());
    }

    /// Per folder run: what one frame's deltas add up to.
    fn sums(frames: &[SharedFrame]) -> BTreeMap<(String, u64), i64> {
        let mut sums = BTreeMap::new();
        for f in frames {
            for run in json_of(f)["folders"].as_array().into_iter().flatten() {
                let key = (
                    run["path"].as_str().unwrap().to_owned(),
                    run["levels"].as_u64().unwrap(),
                );
                *sums.entry(key).or_default() += run["size_delta"].as_i64().unwrap();
            }
        }
        sums
    }

    fn covered(frames: &[SharedFrame]) -> Vec<String> {
        frames
            .iter()
            .flat_map(|f| {
                let m = json_of(f);
                match m["event_ids"].as_array() {
                    Some(ids) => ids.iter().map(|i| i.as_str().unwrap().to_owned()).collect(),
                    None => vec![m["event_id"].as_str().unwrap_or_default().to_owned()],
                }
            })
            .collect()
    }

    proptest! {
        /// Whatever arrives, a digest loses no event, repeats none, keeps their order, sums
        /// every folder's deltas exactly, and its positions only grow.
        #[test]
        fn digests_cover_every_event_once_in_order_with_exact_sums(
            frames in prop::collection::vec((0usize..3, -1000i64..1000, any::<bool>(), any::<bool>()), 1..60)
        ) {
            let now = Instant::now();
            let mut d = Digest::new(Duration::from_secs(5));
            let (mut input, mut out) = (Vec::new(), Vec::new());
            for (n, (space, size, resync, flush)) in frames.into_iter().enumerate() {
                let n = n as u64;
                let f = if resync {
                    frame(n, "resync", json!({"type": "resync", "space_id": format!("s{space}"), "event_id": format!("e{n}"), "time": "t", "reason": "backlog"}))
                } else {
                    upload(n, &format!("s{space}"), &format!("/a/f{}", n % 4), size)
                };
                input.push(f.clone());
                d.offer(f, now, &mut out);
                if flush {
                    d.flush(&mut out);
                }
            }
            d.flush(&mut out);
            prop_assert_eq!(covered(&out), covered(&input));
            prop_assert_eq!(sums(&out), sums(&input));
            let positions: Vec<u64> = out.iter().map(|f| f.id()[3..].trim_end_matches("-0").parse().unwrap()).collect();
            prop_assert!(positions.windows(2).all(|w| w[0] < w[1]));
            prop_assert_eq!(positions.last(), Some(&(input.len() as u64 - 1)));
        }
    }
}
