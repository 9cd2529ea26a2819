//! The input contract: one storage event, decoded and validated.
//!
//! Events arrive as CloudEvents 1.0 in structured mode (`schemas/storage-event.schema.json`).
//! Decoding is strict about what the pipeline relies on (ids, types, paths, sizes) and lenient
//! about everything else (unknown attributes are ignored, as CloudEvents extensions must be).
//! A refused event yields a [`Rejection`] with a stable `code` for counting and a human reason
//! for the log; it never stops the stream.

use std::fmt;
use std::sync::Arc;

use serde::Deserialize;

use crate::path::{PathError, SpacePath};
use crate::role::Role;

/// What happened, as named by the event's `type` attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    FileUploaded,
    FileTouched,
    FolderCreated,
    ItemTrashed,
    ItemRestored,
    ItemMoved,
    SpaceMemberAdded,
    SpaceMemberRemoved,
    GroupMemberAdded,
    GroupMemberRemoved,
    /// The space changed in a way no exact message can describe: its listers refetch it.
    SpaceResync,
}

impl EventType {
    pub const ALL: [EventType; 11] = [
        EventType::FileUploaded,
        EventType::FileTouched,
        EventType::FolderCreated,
        EventType::ItemTrashed,
        EventType::ItemRestored,
        EventType::ItemMoved,
        EventType::SpaceMemberAdded,
        EventType::SpaceMemberRemoved,
        EventType::GroupMemberAdded,
        EventType::GroupMemberRemoved,
        EventType::SpaceResync,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::FileUploaded => "file-uploaded",
            EventType::FileTouched => "file-touched",
            EventType::FolderCreated => "folder-created",
            EventType::ItemTrashed => "item-trashed",
            EventType::ItemRestored => "item-restored",
            EventType::ItemMoved => "item-moved",
            EventType::SpaceMemberAdded => "space-member-added",
            EventType::SpaceMemberRemoved => "space-member-removed",
            EventType::GroupMemberAdded => "group-member-added",
            EventType::GroupMemberRemoved => "group-member-removed",
            EventType::SpaceResync => "space-resync",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    pub fn is_membership(self) -> bool {
        matches!(
            self,
            EventType::SpaceMemberAdded | EventType::SpaceMemberRemoved
        )
    }

    /// A user joining or leaving a group: it concerns every space that grants the group.
    pub fn is_group(self) -> bool {
        matches!(
            self,
            EventType::GroupMemberAdded | EventType::GroupMemberRemoved
        )
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether the changed item is a file or a folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ItemKind {
    File,
    Folder,
}

impl ItemKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ItemKind::File => "file",
            ItemKind::Folder => "folder",
        }
    }
}

/// A validated event.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageEvent {
    pub id: String,
    pub event_type: EventType,
    /// The `time` attribute exactly as received (already checked to be RFC 3339).
    pub time: Arc<str>,
    /// `time` as milliseconds since the Unix epoch, for clocks that follow event time.
    pub time_millis: i64,
    /// The space the event is about; empty for group events, which concern no single space.
    pub space_id: String,
    pub actor: Option<String>,
    /// The client (a browser tab) that made the change, so it can skip its own (oCIS's
    /// `Initiator-ID`).
    pub initiator_id: Option<String>,
    pub body: EventBody,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EventBody {
    Item(ItemChange),
    Membership(MembershipChange),
    Group(GroupChange),
    /// `space-resync`: why no exact change could be given.
    Resync {
        reason: String,
    },
}

/// A user joining (`group-member-added`) or leaving (`-removed`) a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupChange {
    pub group: String,
    pub user: String,
}

/// The default cap on an event's encoded size (`--max-event-bytes`): 64 KiB.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 64 * 1024;

/// The largest size (and size change) an event may carry: 2^53-1 bytes (8 PiB). Beyond any
/// file oCIS stores, and the largest integer a JavaScript client holds exactly; it also keeps
/// sums of deltas far from `i64` overflow.
pub const MAX_SIZE: u64 = (1 << 53) - 1;

/// A change to a file or folder.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemChange {
    pub path: SpacePath,
    /// Set for `item-moved` only.
    pub old_path: Option<SpacePath>,
    pub kind: ItemKind,
    pub size: u64,
    /// For `file-uploaded`: new size − old size.
    pub size_delta: i64,
    pub item_id: Option<String>,
    /// The id of the folder holding the item (oCIS: `storage$space!node`), when the source knows it.
    pub parent_id: Option<String>,
    pub etag: Option<String>,
    /// Sizes of ancestor folders as the source read them after the change, where it could not
    /// say by how much they changed (`data.folder_sizes`); each replaces that folder's delta.
    pub folder_sizes: Vec<FolderSize>,
}

/// An ancestor folder's size after a change: absolute, so safe to apply twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderSize {
    pub path: SpacePath,
    pub size: u64,
    pub etag: Option<String>,
}

/// A user or a group gaining or losing access to a space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipChange {
    pub member: Member,
    /// The granted role (`space-member-added`; defaults to viewer), or the one revoked if given.
    pub role: Option<Role>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Member {
    User(String),
    Group(String),
}

/// Why an event was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Stable, countable category: `invalid-json`, `missing-field`, `invalid-field`,
    /// `unknown-type`, `invalid-path`, `unsupported-specversion`, `unknown-space`, `too-large`,
    /// `space-refused` (the directory refuses to answer for the space).
    pub code: &'static str,
    pub reason: String,
}

impl Rejection {
    pub fn new(code: &'static str, reason: impl Into<String>) -> Self {
        Rejection {
            code,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.reason)
    }
}

impl std::error::Error for Rejection {}

#[derive(Deserialize)]
struct WireEvent {
    specversion: Option<String>,
    id: Option<String>,
    #[serde(rename = "type")]
    event_type: Option<String>,
    time: Option<String>,
    data: Option<WireData>,
}

#[derive(Deserialize)]
struct WireData {
    space_id: Option<String>,
    path: Option<String>,
    old_path: Option<String>,
    kind: Option<String>,
    size: Option<u64>,
    size_delta: Option<i64>,
    actor: Option<String>,
    initiator_id: Option<String>,
    item_id: Option<String>,
    parent_id: Option<String>,
    etag: Option<String>,
    folder_sizes: Option<Vec<WireFolderSize>>,
    reason: Option<String>,
    user: Option<String>,
    group: Option<String>,
    role: Option<String>,
}

#[derive(Deserialize)]
struct WireFolderSize {
    path: Option<String>,
    size: Option<u64>,
    etag: Option<String>,
}

/// Decodes one event from its JSON bytes.
pub fn decode(bytes: &[u8]) -> Result<StorageEvent, Rejection> {
    let wire: WireEvent = serde_json::from_slice(bytes).map_err(|e| {
        let code = if e.is_syntax() || e.is_eof() {
            "invalid-json"
        } else {
            "invalid-field"
        };
        Rejection::new(code, e.to_string())
    })?;
    if let Some(v) = &wire.specversion
        && v != "1.0"
    {
        return Err(Rejection::new(
            "unsupported-specversion",
            format!("specversion {v:?} is not 1.0"),
        ));
    }
    let id = required(wire.id, "id")?;
    if id.chars().any(char::is_control) {
        // Ids travel as lines in places (a message standing for several events lists them).
        return Err(Rejection::new(
            "invalid-field",
            format!("id {id:?} contains control characters"),
        ));
    }
    let type_name = required(wire.event_type, "type")?;
    let event_type = EventType::parse(&type_name).ok_or_else(|| {
        Rejection::new("unknown-type", format!("unknown event type {type_name:?}"))
    })?;
    let time = required(wire.time, "time")?;
    let time_millis = chrono::DateTime::parse_from_rfc3339(&time)
        .map_err(|e| {
            Rejection::new(
                "invalid-field",
                format!("time {time:?} is not RFC 3339: {e}"),
            )
        })?
        .timestamp_millis();
    let data = wire
        .data
        .ok_or_else(|| Rejection::new("missing-field", "missing required field data"))?;
    if event_type.is_group() {
        let group = required(data.group, "data.group")?;
        let user = required(data.user, "data.user")?;
        return Ok(StorageEvent {
            id,
            event_type,
            time: time.into(),
            time_millis,
            space_id: String::new(),
            actor: data.actor,
            initiator_id: data.initiator_id,
            body: EventBody::Group(GroupChange { group, user }),
        });
    }
    let space_id = required(data.space_id, "data.space_id")?;
    if event_type == EventType::SpaceResync {
        return Ok(StorageEvent {
            id,
            event_type,
            time: time.into(),
            time_millis,
            space_id,
            actor: data.actor,
            initiator_id: data.initiator_id,
            body: EventBody::Resync {
                reason: data.reason.unwrap_or_default(),
            },
        });
    }

    let body = if event_type.is_membership() {
        let member = match (data.user, data.group) {
            (Some(u), None) if !u.is_empty() => Member::User(u),
            (None, Some(g)) if !g.is_empty() => Member::Group(g),
            (Some(_), Some(_)) => {
                return Err(Rejection::new(
                    "invalid-field",
                    "data.user and data.group are exclusive",
                ));
            }
            _ => {
                return Err(Rejection::new(
                    "missing-field",
                    "membership events need data.user or data.group",
                ));
            }
        };
        let role =
            match data.role {
                None => None,
                Some(r) => Some(Role::parse(&r).ok_or_else(|| {
                    Rejection::new("invalid-field", format!("unknown role {r:?}"))
                })?),
            };
        EventBody::Membership(MembershipChange { member, role })
    } else {
        let path = parse_path(&required(data.path, "data.path")?, "data.path")?;
        let kind = match required(data.kind, "data.kind")?.as_str() {
            "file" => ItemKind::File,
            "folder" => ItemKind::Folder,
            other => {
                return Err(Rejection::new(
                    "invalid-field",
                    format!("data.kind {other:?} is neither file nor folder"),
                ));
            }
        };
        let old_path = if event_type == EventType::ItemMoved {
            Some(parse_path(
                &required(data.old_path, "data.old_path")?,
                "data.old_path",
            )?)
        } else {
            None
        };
        let size = data.size.unwrap_or(0);
        if size > MAX_SIZE {
            return Err(Rejection::new(
                "invalid-field",
                format!("data.size {size} is above {MAX_SIZE} (2^53-1)"),
            ));
        }
        let size_delta = match data.size_delta {
            Some(d) if d.unsigned_abs() > MAX_SIZE => {
                return Err(Rejection::new(
                    "invalid-field",
                    format!("data.size_delta {d} is beyond ±{MAX_SIZE} (2^53-1)"),
                ));
            }
            Some(d) => d,
            // In range: size ≤ MAX_SIZE < i64::MAX.
            None => size as i64,
        };
        let folder_sizes = folder_sizes(data.folder_sizes.unwrap_or_default(), &path)?;
        EventBody::Item(ItemChange {
            path,
            old_path,
            kind,
            size,
            size_delta,
            item_id: data.item_id,
            parent_id: data.parent_id,
            etag: data.etag,
            folder_sizes,
        })
    };

    Ok(StorageEvent {
        id,
        event_type,
        time: time.into(),
        time_millis,
        space_id,
        actor: data.actor,
        initiator_id: data.initiator_id,
        body,
    })
}

/// `data.folder_sizes`, checked: each an ancestor of the item's path (`data.path`), once, with
/// a size in range.
fn folder_sizes(wire: Vec<WireFolderSize>, item: &SpacePath) -> Result<Vec<FolderSize>, Rejection> {
    if wire.is_empty() {
        return Ok(Vec::new());
    }
    let mut ancestors: std::collections::HashSet<&str> = item.ancestors().collect();
    let mut out: Vec<FolderSize> = Vec::with_capacity(wire.len());
    for (n, entry) in wire.into_iter().enumerate() {
        let name = format!("data.folder_sizes[{n}]");
        let path = parse_path(&required(entry.path, &format!("{name}.path"))?, &name)?;
        // Each ancestor is taken out once used: a second entry for it is refused too.
        if !ancestors.remove(path.as_str()) {
            return Err(Rejection::new(
                "invalid-field",
                format!(
                    "{name}.path {:?} is not a folder above data.path, or is listed twice",
                    path.as_str()
                ),
            ));
        }
        let size = entry.size.ok_or_else(|| {
            Rejection::new(
                "missing-field",
                format!("missing required field {name}.size"),
            )
        })?;
        if size > MAX_SIZE {
            return Err(Rejection::new(
                "invalid-field",
                format!("{name}.size {size} is above {MAX_SIZE} (2^53-1)"),
            ));
        }
        out.push(FolderSize {
            path,
            size,
            etag: entry.etag,
        });
    }
    Ok(out)
}

fn required(value: Option<String>, name: &str) -> Result<String, Rejection> {
    match value {
        Some(v) if !v.is_empty() => Ok(v),
        Some(_) => Err(Rejection::new(
            "invalid-field",
            format!("{name} must not be empty"),
        )),
        None => Err(Rejection::new(
            "missing-field",
            format!("missing required field {name}"),
        )),
    }
}

fn parse_path(raw: &str, name: &str) -> Result<SpacePath, Rejection> {
    SpacePath::parse(raw).map_err(|e: PathError| {
        let shown: String = raw.chars().take(80).collect();
        Rejection::new("invalid-path", format!("{name} {shown:?}: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(json: &str) -> Result<StorageEvent, Rejection> {
        decode(json.as_bytes())
    }

    const UPLOAD: &str = r#"{"specversion":"1.0","id":"e-42","source":"ocis/storage-users","type":"file-uploaded","time":"2026-11-22T10:00:00.123Z","data":{"space_id":"s-eng","path":"/f1/f2/report.pdf","kind":"file","size":2048,"actor":"alice","item_id":"i1","etag":"x"}}"#;

    #[test]
    fn decodes_upload_with_defaults() {
        let e = ev(UPLOAD).unwrap();
        assert_eq!(e.id, "e-42");
        assert_eq!(e.event_type, EventType::FileUploaded);
        assert_eq!(&*e.time, "2026-11-22T10:00:00.123Z");
        assert_eq!(e.actor.as_deref(), Some("alice"));
        let EventBody::Item(item) = e.body else {
            panic!("not an item change")
        };
        assert_eq!(item.path.as_str(), "/f1/f2/report.pdf");
        assert_eq!(item.size, 2048);
        assert_eq!(item.size_delta, 2048, "size_delta defaults to size");
    }

    #[test]
    fn folder_sizes_must_name_ancestors_once_with_a_size_in_range() {
        let with = |sizes: &str| {
            ev(&format!(
                r#"{{"id":"1","type":"file-uploaded","time":"2026-11-22T10:00:00Z","data":{{"space_id":"s","path":"/a/b/f","kind":"file","size":5,"folder_sizes":{sizes}}}}}"#
            ))
        };
        let e = with(r#"[{"path":"/a/b","size":7,"etag":"e1"},{"path":"/","size":90}]"#).unwrap();
        let EventBody::Item(item) = e.body else {
            panic!("not an item change")
        };
        assert_eq!(
            item.folder_sizes,
            [
                FolderSize {
                    path: SpacePath::parse("/a/b").unwrap(),
                    size: 7,
                    etag: Some("e1".into())
                },
                FolderSize {
                    path: SpacePath::parse("/").unwrap(),
                    size: 90,
                    etag: None
                }
            ]
        );
        for (bad, code) in [
            (r#"[{"path":"/a/b/f","size":1}]"#, "invalid-field"),
            (r#"[{"path":"/x","size":1}]"#, "invalid-field"),
            (
                r#"[{"path":"/a","size":1},{"path":"/a","size":2}]"#,
                "invalid-field",
            ),
            (
                r#"[{"path":"/a","size":9007199254740992}]"#,
                "invalid-field",
            ),
            (r#"[{"path":"/a"}]"#, "missing-field"),
            (r#"[{"path":"a/../b","size":1}]"#, "invalid-path"),
        ] {
            assert_eq!(with(bad).unwrap_err().code, code, "{bad}");
        }
    }

    #[test]
    fn every_type_name_round_trips() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
        }
        assert_eq!(EventType::parse("file-deleted"), None);
    }

    #[test]
    fn rejections_carry_codes() {
        let cases = [
            ("{not json", "invalid-json"),
            (
                r#"{"type":"file-uploaded","time":"2026-11-22T10:00:00Z","data":{"space_id":"s","path":"/a","kind":"file"}}"#,
                "missing-field",
            ),
            (
                r#"{"id":"1","type":"file-exploded","time":"2026-11-22T10:00:00Z","data":{"space_id":"s","path":"/a","kind":"file"}}"#,
                "unknown-type",
            ),
            (
                r#"{"id":"1","type":"file-uploaded","time":"yesterday","data":{"space_id":"s","path":"/a","kind":"file"}}"#,
                "invalid-field",
            ),
            (
                r#"{"id":"a\nb","type":"file-uploaded","time":"2026-11-22T10:00:00Z","data":{"space_id":"s","path":"/a","kind":"file"}}"#,
                "invalid-field",
            ),
            (
                r#"{"id":"1","type":"file-uploaded","time":"2026-11-22T10:00:00Z","data":{"space_id":"s","path":"/a","kind":"file","size":"12"}}"#,
                "invalid-field",
            ),
            (
                r#"{"id":"1","type":"file-uploaded","time":"2026-11-22T10:00:00Z","data":{"space_id":"s","path":"/a","kind":"file","size":9007199254740992}}"#,
                "invalid-field",
            ),
            (
                r#"{"id":"1","type":"file-uploaded","time":"2026-11-22T10:00:00Z","data":{"space_id":"s","path":"/a","kind":"file","size":1,"size_delta":-9007199254740992}}"#,
                "invalid-field",
            ),
            (
                r#"{"id":"1","type":"file-uploaded","time":"2026-11-22T10:00:00Z","data":{"space_id":"s","path":"/a","kind":"file","size":-1}}"#,
                "invalid-field",
            ),
            (
                r#"{"id":"1","type":"file-uploaded","time":"2026-11-22T10:00:00Z","data":{"space_id":"s","path":"/a/../b","kind":"file"}}"#,
                "invalid-path",
            ),
            (
                r#"{"id":"1","type":"file-uploaded","time":"2026-11-22T10:00:00Z","data":{"space_id":"s","kind":"file"}}"#,
                "missing-field",
            ),
            (
                r#"{"id":"1","type":"file-uploaded","time":"2026-11-22T10:00:00Z","data":{"space_id":"s","path":"/a","kind":"link"}}"#,
                "invalid-field",
            ),
            (
                r#"{"id":"1","type":"item-moved","time":"2026-11-22T10:00:00Z","data":{"space_id":"s","path":"/a","kind":"file"}}"#,
                "missing-field",
            ),
            (
                r#"{"id":"1","type":"file-uploaded","time":"2026-11-22T10:00:00Z"}"#,
                "missing-field",
            ),
            (
                r#"{"id":"1","type":"file-uploaded","time":"2026-11-22T10:00:00Z","data":{"path":"/a","kind":"file"}}"#,
                "missing-field",
            ),
            (
                r#"{"specversion":"0.3","id":"1","type":"file-uploaded","time":"2026-11-22T10:00:00Z","data":{"space_id":"s","path":"/a","kind":"file"}}"#,
                "unsupported-specversion",
            ),
            (
                r#"{"id":"1","type":"space-member-added","time":"2026-11-22T10:00:00Z","data":{"space_id":"s"}}"#,
                "missing-field",
            ),
            (
                r#"{"id":"1","type":"space-member-added","time":"2026-11-22T10:00:00Z","data":{"space_id":"s","user":"u","role":"owner"}}"#,
                "invalid-field",
            ),
            (r#"[1,2]"#, "invalid-field"),
        ];
        for (json, code) in cases {
            let err = ev(json).expect_err(json);
            assert_eq!(err.code, code, "{json}: {err}");
        }
    }

    #[test]
    fn membership_event_decodes() {
        let e = ev(r#"{"id":"m1","type":"space-member-added","time":"2026-11-22T10:00:00+01:00","data":{"space_id":"s","group":"eng","role":"editor"}}"#).unwrap();
        assert_eq!(
            e.body,
            EventBody::Membership(MembershipChange {
                member: Member::Group("eng".into()),
                role: Some(Role::Editor)
            })
        );
    }

    #[test]
    fn move_keeps_old_path_and_trailing_slash_is_dropped() {
        let e = ev(r#"{"id":"1","type":"item-moved","time":"2026-11-22T10:00:00Z","data":{"space_id":"s","path":"/b/","old_path":"/a/","kind":"folder","size":10}}"#).unwrap();
        let EventBody::Item(item) = e.body else {
            panic!()
        };
        assert_eq!(item.path.as_str(), "/b");
        assert_eq!(item.old_path.unwrap().as_str(), "/a");
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        /// Every code a rejection may carry (the README and the metrics list them).
        const CODES: &[&str] = &[
            "invalid-json",
            "missing-field",
            "invalid-field",
            "unknown-type",
            "invalid-path",
            "unsupported-specversion",
        ];

        fn valid_line() -> impl Strategy<Value = String> {
            (
                "[a-z0-9-]{1,12}",
                prop::sample::select(vec!["file-uploaded", "item-trashed", "item-moved", "folder-created"]),
                "(/[a-z]{1,4}){1,5}",
                any::<u64>(),
                any::<i64>(),
            )
                .prop_map(|(id, kind, path, size, delta)| {
                    format!(
                        r#"{{"specversion":"1.0","id":"{id}","type":"{kind}","time":"2026-11-22T10:00:00Z","data":{{"space_id":"s","path":"{path}","old_path":"/old{path}","kind":"file","size":{size},"size_delta":{delta}}}}}"#
                    )
                })
        }

        proptest! {
            /// Arbitrary bytes: no panic, and a rejection always names its category.
            #[test]
            fn any_bytes_decode_or_are_rejected_with_a_code(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
                if let Err(r) = decode(&bytes) {
                    prop_assert!(CODES.contains(&r.code), "{}", r.code);
                }
            }

            /// Well-formed events with any numbers: accepted exactly when sizes are in range.
            #[test]
            fn sizes_are_accepted_only_in_range(line in valid_line()) {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                let size = v["data"]["size"].as_u64().unwrap();
                let delta = v["data"]["size_delta"].as_i64().unwrap();
                match decode(line.as_bytes()) {
                    Ok(_) => prop_assert!(size <= MAX_SIZE && delta.unsigned_abs() <= MAX_SIZE),
                    Err(r) => {
                        prop_assert_eq!(r.code, "invalid-field");
                        prop_assert!(size > MAX_SIZE || delta.unsigned_abs() > MAX_SIZE);
                    }
                }
            }
        }
    }
}
