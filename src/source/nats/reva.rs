//! Reva events → foldercast storage events (`ocis-ingestion.md` §5).
//!
//! A reva event's payload is Go's `encoding/json` of a struct without tags: PascalCase keys,
//! nested CS3 messages in snake_case, `null` for unset pointers (`ocis-interfaces.md` §2.2).
//! The mapping keeps to what the event says for certain:
//! - `ContainerCreated` and `FileTouched` create empty items (size 0): mapped in full;
//! - `SpaceShared`, `SpaceUnshared`, `GroupMemberAdded`, `GroupMemberRemoved`: membership
//!   changes, mapped in full;
//! - uploads, moves, trash and restore carry no size, and a reference may name its item by id
//!   rather than by path: those are [`Mapped::Lookup`], for the oCIS API to complete;
//! - role changes, expiries named by a bare space id, disabled, enabled and deleted spaces:
//!   [`Mapped::Invalidate`], the space's members are to be read again;
//! - everything else (sign-ins, downloads, locks, shares of single items, the upload pipeline's
//!   internal steps): [`Mapped::Skip`], counted by type.
//!
//! Paths: `Ref.path` is relative to `Ref.resource_id`, and space-root-relative only when that
//! id is the space root (`opaque_id == space_id`). Both `./a/b` and `/a/b` occur, and `.` is the
//! root. The space id foldercast uses is the graph drive id, `<storage_id>$<space_id>`.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use super::envelope::Envelope;
use crate::event::Rejection;

/// What a reva event becomes.
#[derive(Debug, Clone, PartialEq)]
pub enum Mapped {
    /// A foldercast storage event (CloudEvents JSON, `schemas/storage-event.schema.json`).
    Event(Vec<u8>),
    /// Needs the oCIS API before it can become an event.
    Lookup(Box<Lookup>),
    /// The members of a space are to be read again.
    Invalidate { space_id: String },
    /// Changes no folder view; the reason names the kind, for counting.
    Skip(&'static str),
}

/// What is missing, and for which event: everything the event said, for the lookup to
/// complete ([`Lookup::event`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Lookup {
    /// The reva type without `events.`: `UploadReady`.
    pub reva_type: String,
    pub event_id: String,
    /// The graph drive id, when the event names the space.
    pub space_id: Option<String>,
    /// The space-root-relative path, when the reference has one.
    pub path: Option<String>,
    /// `ItemMoved`: where the item was, when the old reference has a space-relative path.
    pub old_path: Option<String>,
    /// The item's resource id (`storage$space!opaque`), when the event names it.
    pub item_id: Option<String>,
    /// `ItemTrashed`: the trashed node's opaque id, its key in the space's trash bin.
    pub trash_key: Option<String>,
    /// An upload or version restore over an existing file: the event does not say the old size.
    pub overwrite: bool,
    pub missing: &'static str,
    /// `missing == "ids"`: the event is exact without oCIS, which only adds the item's ids; this
    /// is that event, for when oCIS cannot say.
    pub exact: Option<Vec<u8>>,
    /// RFC 3339, as the mapped event would carry it.
    pub time: String,
    pub actor: Option<String>,
    pub initiator_id: Option<String>,
}

impl Lookup {
    /// The foldercast event this lookup completes.
    pub fn event(&self, event_type: &str, space_id: &str, data: Value) -> Vec<u8> {
        storage_event(
            &self.event_id,
            event_type,
            &self.time,
            Some(space_id),
            self.actor.as_deref(),
            self.initiator_id.as_deref(),
            data,
        )
    }
}

/// A foldercast storage event's bytes (CloudEvents JSON, `schemas/storage-event.schema.json`).
fn storage_event(
    id: &str,
    event_type: &str,
    time: &str,
    space_id: Option<&str>,
    actor: Option<&str>,
    initiator_id: Option<&str>,
    mut data: Value,
) -> Vec<u8> {
    if let Some(obj) = data.as_object_mut() {
        if let Some(space) = space_id {
            obj.insert("space_id".into(), json!(space));
        }
        if let Some(actor) = actor {
            obj.insert("actor".into(), json!(actor));
        }
        if let Some(initiator) = initiator_id {
            obj.insert("initiator_id".into(), json!(initiator));
        }
    }
    json!({
        "specversion": "1.0",
        "id": id,
        "source": "ocis/reva",
        "type": event_type,
        "time": time,
        "data": data,
    })
    .to_string()
    .into_bytes()
}

#[derive(Deserialize, Default, Debug)]
struct ResourceId {
    storage_id: Option<String>,
    opaque_id: Option<String>,
    space_id: Option<String>,
}

impl ResourceId {
    /// `storage$space`: the graph drive id.
    fn drive_id(&self) -> Option<String> {
        let space = self.space_id.as_deref().filter(|s| !s.is_empty())?;
        Some(match self.storage_id.as_deref().filter(|s| !s.is_empty()) {
            Some(storage) => format!("{storage}${space}"),
            None => space.to_owned(),
        })
    }

    /// `storage$space!opaque`: the graph item id.
    fn item_id(&self) -> Option<String> {
        let opaque = self.opaque_id.as_deref().filter(|s| !s.is_empty())?;
        Some(format!("{}!{opaque}", self.drive_id()?))
    }

    fn is_space_root(&self) -> bool {
        matches!((&self.opaque_id, &self.space_id), (Some(o), Some(s)) if o == s)
    }
}

#[derive(Deserialize, Default, Debug)]
struct Reference {
    resource_id: Option<ResourceId>,
    path: Option<String>,
}

impl Reference {
    /// The space-root-relative path (`/a/b`, `/` for the root), when the reference gives one.
    fn space_path(&self) -> Option<String> {
        let id = self.resource_id.as_ref()?;
        if !id.is_space_root() {
            return None;
        }
        let raw = self.path.as_deref()?.trim();
        let rest = raw.strip_prefix("./").or_else(|| raw.strip_prefix('/'));
        let rest = match (raw, rest) {
            (".", _) | ("", _) => "",
            (_, Some(rest)) => rest,
            (raw, None) => raw,
        };
        Some(format!("/{}", rest.trim_end_matches('/')))
    }

    fn drive_id(&self) -> Option<String> {
        self.resource_id.as_ref()?.drive_id()
    }
}

#[derive(Deserialize, Default, Debug)]
struct Identity {
    opaque_id: Option<String>,
}

/// The fields of every mapped reva event that foldercast reads (absent ones stay `None`).
#[derive(Deserialize, Default, Debug)]
#[serde(rename_all = "PascalCase")]
struct Payload {
    executant: Option<Identity>,
    #[serde(rename = "ExecutingUser")]
    executing_user: Option<ExecutingUser>,
    #[serde(rename = "Ref")]
    reference: Option<Reference>,
    old_reference: Option<Reference>,
    is_version: Option<bool>,
    file_ref: Option<Reference>,
    #[serde(rename = "ID")]
    id: Option<Value>,
    #[serde(rename = "ResourceID")]
    resource_id: Option<ResourceId>,
    #[serde(rename = "GranteeUserID")]
    grantee_user: Option<Identity>,
    #[serde(rename = "GranteeGroupID")]
    grantee_group: Option<Identity>,
    #[serde(rename = "GroupID")]
    group_id: Option<String>,
    #[serde(rename = "UserID")]
    user_id: Option<String>,
    #[serde(rename = "SpaceID")]
    space_id: Option<Identity>,
    failed: Option<bool>,
    timestamp: Option<Value>,
}

#[derive(Deserialize, Default, Debug)]
struct ExecutingUser {
    id: Option<Identity>,
}

/// Go's zero time, written for an unset `time.Time`.
const GO_ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// A reva timestamp as RFC 3339: CS3 `{"seconds","nanos"}` (`{}` is the epoch, so unset) or a
/// Go `time.Time` string (the zero time is unset).
fn time_of(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::Object(ts) => {
            let seconds = ts.get("seconds")?.as_i64()?;
            let nanos = ts.get("nanos").and_then(Value::as_u64).unwrap_or(0);
            let at = DateTime::<Utc>::from_timestamp(seconds, u32::try_from(nanos).ok()?)?;
            (seconds > 0).then(|| at.to_rfc3339_opts(SecondsFormat::AutoSi, true))
        }
        Value::String(s) if !s.is_empty() && s != GO_ZERO_TIME => {
            DateTime::parse_from_rfc3339(s).ok()?;
            Some(s.clone())
        }
        _ => None,
    }
}

fn opaque(id: Option<&Identity>) -> Option<String> {
    id?.opaque_id.clone().filter(|s| !s.is_empty())
}

/// The `ID` of a space event: `{"opaque_id": "storage$space"}`.
fn space_of(id: Option<&Value>) -> Option<String> {
    let s = id?.get("opaque_id")?.as_str()?;
    (!s.is_empty()).then(|| s.to_owned())
}

/// Maps an opened envelope. `fallback_time` (RFC 3339) dates an event whose payload and
/// envelope carry no time: the time the stream stored it.
pub fn map(envelope: &Envelope, fallback_time: &str) -> Result<Mapped, Rejection> {
    let reva_type = envelope
        .event_type
        .strip_prefix("events.")
        .unwrap_or(&envelope.event_type);
    if !MAPPED.contains(&reva_type) {
        return Ok(Mapped::Skip(skip_reason(reva_type)));
    }
    let p: Payload = serde_json::from_slice(&envelope.payload).map_err(|e| {
        Rejection::new(
            "invalid-json",
            format!("{reva_type} payload does not parse: {e}"),
        )
    })?;
    let time = time_of(p.timestamp.as_ref())
        .or_else(|| {
            time_of(
                envelope
                    .timestamp
                    .as_ref()
                    .map(|t| Value::String(t.clone()))
                    .as_ref(),
            )
        })
        .unwrap_or_else(|| fallback_time.to_owned());
    let actor = opaque(p.executant.as_ref())
        .or_else(|| opaque(p.executing_user.as_ref().and_then(|u| u.id.as_ref())));
    let initiator = envelope.initiator_id.as_deref();
    let event_bytes = |event_type: &str, space_id: Option<&str>, data: Value| {
        storage_event(
            &envelope.event_id,
            event_type,
            &time,
            space_id,
            actor.as_deref(),
            initiator,
            data,
        )
    };
    let event = |event_type: &str, space_id: Option<&str>, data: Value| {
        Mapped::Event(event_bytes(event_type, space_id, data))
    };
    let lookup = |missing: &'static str, reference: Option<&Reference>, item: Option<String>| {
        Mapped::Lookup(Box::new(Lookup {
            reva_type: reva_type.to_owned(),
            event_id: envelope.event_id.clone(),
            space_id: reference.and_then(Reference::drive_id),
            path: reference.and_then(Reference::space_path),
            old_path: p.old_reference.as_ref().and_then(Reference::space_path),
            item_id: item,
            trash_key: None,
            exact: None,
            overwrite: p.is_version == Some(true) || reva_type == "FileVersionRestored",
            missing,
            time: time.clone(),
            actor: actor.clone(),
            initiator_id: envelope.initiator_id.clone(),
        }))
    };
    let missing_ref = || Rejection::new("missing-field", format!("{reva_type} without Ref"));
    Ok(match reva_type {
        "ContainerCreated" | "FileTouched" => {
            let reference = p.reference.as_ref().ok_or_else(missing_ref)?;
            let (kind, foldercast_type) = if reva_type == "ContainerCreated" {
                ("folder", "folder-created")
            } else {
                ("file", "file-touched")
            };
            match (reference.drive_id(), reference.space_path()) {
                // Exact as it is (an empty item); oCIS is asked only for its ids, which clients
                // such as ownCloud Web need to fetch it.
                (Some(space), Some(path)) if path != "/" => {
                    let exact = event_bytes(
                        foldercast_type,
                        Some(&space),
                        json!({"path": path, "kind": kind, "size": 0}),
                    );
                    let mut ids = lookup("ids", Some(reference), None);
                    if let Mapped::Lookup(l) = &mut ids {
                        l.exact = Some(exact);
                    }
                    ids
                }
                (Some(space), Some(_)) => {
                    return Err(Rejection::new(
                        "invalid-path",
                        format!("{reva_type} of the root of {space}"),
                    ));
                }
                _ => lookup("path", Some(reference), None),
            }
        }
        "UploadReady" if p.failed == Some(true) => {
            // The storage already reverted the size it had propagated.
            Mapped::Skip("failed upload")
        }
        "UploadReady" => lookup(
            "size",
            p.file_ref.as_ref().or(p.reference.as_ref()),
            p.resource_id.as_ref().and_then(ResourceId::item_id),
        ),
        "ItemTrashed" | "ItemRestored" | "ItemMoved" | "FileVersionRestored" => {
            let id =
                p.id.as_ref()
                    .and_then(|v| serde_json::from_value::<ResourceId>(v.clone()).ok());
            let mut found = lookup(
                "size",
                p.reference.as_ref(),
                id.as_ref().and_then(ResourceId::item_id),
            );
            if let (Mapped::Lookup(l), "ItemTrashed") = (&mut found, reva_type) {
                l.trash_key = id.and_then(|id| id.opaque_id).filter(|k| !k.is_empty());
                if l.space_id.is_none() {
                    return Err(Rejection::new(
                        "missing-field",
                        "ItemTrashed names no space",
                    ));
                }
            }
            found
        }
        "SpaceShared" | "SpaceUnshared" => {
            let space = space_of(p.id.as_ref()).ok_or_else(|| {
                Rejection::new("missing-field", format!("{reva_type} without ID"))
            })?;
            let member = match (
                opaque(p.grantee_user.as_ref()),
                opaque(p.grantee_group.as_ref()),
            ) {
                (Some(user), _) => json!({"user": user}),
                (None, Some(group)) => json!({"group": group}),
                (None, None) => {
                    return Err(Rejection::new(
                        "missing-field",
                        format!("{reva_type} names no grantee"),
                    ));
                }
            };
            let foldercast_type = if reva_type == "SpaceShared" {
                "space-member-added"
            } else {
                "space-member-removed"
            };
            event(foldercast_type, Some(&space), member)
        }
        "SpaceShareUpdated" | "SpaceDisabled" | "SpaceEnabled" | "SpaceDeleted" => {
            match space_of(p.id.as_ref()) {
                Some(space_id) => Mapped::Invalidate { space_id },
                None => {
                    return Err(Rejection::new(
                        "missing-field",
                        format!("{reva_type} without ID"),
                    ));
                }
            }
        }
        // Names the bare space id (no storage id): the space is known once looked up.
        "SpaceMembershipExpired" => match opaque(p.space_id.as_ref()) {
            Some(space_id) => Mapped::Invalidate { space_id },
            None => {
                return Err(Rejection::new(
                    "missing-field",
                    "SpaceMembershipExpired without SpaceID",
                ));
            }
        },
        "GroupMemberAdded" | "GroupMemberRemoved" => {
            let (Some(group), Some(user)) = (
                p.group_id.filter(|s| !s.is_empty()),
                p.user_id.filter(|s| !s.is_empty()),
            ) else {
                return Err(Rejection::new(
                    "missing-field",
                    format!("{reva_type} without GroupID or UserID"),
                ));
            };
            let foldercast_type = if reva_type == "GroupMemberAdded" {
                "group-member-added"
            } else {
                "group-member-removed"
            };
            event(foldercast_type, None, json!({"group": group, "user": user}))
        }
        _ => Mapped::Skip(skip_reason(reva_type)),
    })
}

/// The reva types [`map`] reads.
const MAPPED: [&str; 16] = [
    "ContainerCreated",
    "FileTouched",
    "UploadReady",
    "ItemTrashed",
    "ItemRestored",
    "ItemMoved",
    "FileVersionRestored",
    "SpaceShared",
    "SpaceUnshared",
    "SpaceShareUpdated",
    "SpaceDisabled",
    "SpaceEnabled",
    "SpaceDeleted",
    "SpaceMembershipExpired",
    "GroupMemberAdded",
    "GroupMemberRemoved",
];

/// Why a type is skipped, by family (a bounded set of labels for a metric).
fn skip_reason(reva_type: &str) -> &'static str {
    match reva_type {
        "ItemPurged" => "purged from trash",
        "FileUploaded"
        | "BytesReceived"
        | "PostprocessingFinished"
        | "PostprocessingStepFinished"
        | "StartPostprocessingStep"
        | "PostprocessingRetry"
        | "ResumePostprocessing"
        | "RestartPostprocessing"
        | "CleanUpload"
        | "RevertRevision" => "upload pipeline step",
        t if t.starts_with("Share") || t.starts_with("Link") || t.starts_with("ReceivedShare") => {
            "share of an item"
        }
        t if t.starts_with("User") || t == "BackchannelLogout" => "user event",
        _ => "changes no folder view",
    }
}

#[cfg(test)]
mod tests {
    use super::super::envelope::{open, seal};
    use super::*;
    use crate::event::{EventBody, EventType, Member, decode};

    const SPACE: &str = "1284d238-aa92-42ce-bdc4-0b0000009157$b6a1c2d3";
    const ROOT: &str = r#"{"storage_id":"1284d238-aa92-42ce-bdc4-0b0000009157","opaque_id":"b6a1c2d3","space_id":"b6a1c2d3"}"#;
    const EINSTEIN: &str = r#"{"idp":"https://ocis.example","opaque_id":"4c510ada-c86b-4815-8820-42cdf82c3d51","type":1}"#;

    fn mapped(reva_type: &str, payload: &str) -> Result<Mapped, Rejection> {
        let envelope = open(&seal(reva_type, "ev-42", "tab-1", payload)).unwrap();
        map(&envelope, "2026-11-30T00:00:00Z")
    }

    /// The foldercast event a mapping produced (for a lookup of ids only, the event it makes
    /// without oCIS), through the pipeline's own decoder.
    fn decoded(m: Mapped) -> crate::event::StorageEvent {
        let bytes = match m {
            Mapped::Event(bytes) => bytes,
            Mapped::Lookup(l) if l.missing == "ids" => l.exact.unwrap(),
            other => panic!("not an event: {other:?}"),
        };
        decode(&bytes).unwrap_or_else(|r| panic!("{r}: {}", String::from_utf8_lossy(&bytes)))
    }

    #[test]
    fn created_folders_and_touched_files_map_in_full() {
        for (path, want) in [
            ("./reports", "/reports"),
            ("/reports/q1", "/reports/q1"),
            ("reports/", "/reports"),
        ] {
            let payload = format!(
                r#"{{"SpaceOwner":null,"Executant":{EINSTEIN},"Ref":{{"resource_id":{ROOT},"path":"{path}"}},"Owner":null,"Timestamp":{{"seconds":1718000000,"nanos":123456789}},"ImpersonatingUser":null}}"#
            );
            let e = decoded(mapped("events.ContainerCreated", &payload).unwrap());
            assert_eq!(e.event_type, EventType::FolderCreated);
            assert_eq!((e.id.as_str(), e.space_id.as_str()), ("ev-42", SPACE));
            assert_eq!(
                e.actor.as_deref(),
                Some("4c510ada-c86b-4815-8820-42cdf82c3d51")
            );
            assert_eq!(&*e.time, "2024-06-10T06:13:20.123456789Z");
            let EventBody::Item(item) = e.body else {
                panic!()
            };
            assert_eq!((item.path.as_str(), item.size), (want, 0));
        }
        let touched = format!(
            r#"{{"Executant":{EINSTEIN},"Ref":{{"resource_id":{ROOT},"path":"./notes.md"}},"Timestamp":null}}"#
        );
        let e = decoded(mapped("events.FileTouched", &touched).unwrap());
        assert_eq!(e.event_type, EventType::FileTouched);
        // No time in the payload: the envelope's.
        assert!(e.time.starts_with("2026-08-14T09:37:56"));
    }

    #[test]
    fn a_reference_by_id_or_without_a_path_needs_a_lookup() {
        let by_id = r#"{"Ref":{"resource_id":{"storage_id":"1284d238-aa92-42ce-bdc4-0b0000009157","opaque_id":"7d2e","space_id":"b6a1c2d3"},"path":"./x"}}"#;
        let Mapped::Lookup(l) = mapped("events.ContainerCreated", by_id).unwrap() else {
            panic!()
        };
        assert_eq!(
            (l.missing, l.path, l.space_id.as_deref()),
            ("path", None, Some(SPACE))
        );
        let no_path = format!(r#"{{"Ref":{{"resource_id":{ROOT}}}}}"#);
        assert!(matches!(
            mapped("events.FileTouched", &no_path).unwrap(),
            Mapped::Lookup(l) if l.missing == "path"
        ));
    }

    #[test]
    fn uploads_moves_and_trash_need_their_size_looked_up() {
        let upload = format!(
            r#"{{"UploadID":"u1","Filename":"report.pdf","ExecutingUser":{{"id":{EINSTEIN},"username":"einstein"}},"FileRef":{{"resource_id":{ROOT},"path":"./reports/report.pdf"}},"ResourceID":{{"storage_id":"1284d238-aa92-42ce-bdc4-0b0000009157","opaque_id":"9f1c","space_id":"b6a1c2d3"}},"Timestamp":{{"seconds":1718000001,"nanos":5000}},"Failed":false,"IsVersion":false}}"#
        );
        let Mapped::Lookup(l) = mapped("events.UploadReady", &upload).unwrap() else {
            panic!()
        };
        assert_eq!(l.reva_type, "UploadReady");
        assert_eq!(l.path.as_deref(), Some("/reports/report.pdf"));
        assert_eq!(l.item_id, Some(format!("{SPACE}!9f1c")));
        let failed = upload.replace(r#""Failed":false"#, r#""Failed":true"#);
        assert_eq!(
            mapped("events.UploadReady", &failed).unwrap(),
            Mapped::Skip("failed upload")
        );
        let trashed = format!(
            r#"{{"Executant":{EINSTEIN},"ID":{{"storage_id":"1284d238-aa92-42ce-bdc4-0b0000009157","opaque_id":"9f1c","space_id":"b6a1c2d3"}},"Ref":{{"resource_id":{ROOT},"path":"./reports/q2.pdf"}},"Timestamp":{{"seconds":1718000003,"nanos":1}}}}"#
        );
        let Mapped::Lookup(l) = mapped("events.ItemTrashed", &trashed).unwrap() else {
            panic!()
        };
        assert_eq!(
            (l.path.as_deref(), l.item_id),
            (Some("/reports/q2.pdf"), Some(format!("{SPACE}!9f1c")))
        );
        let moved = format!(
            r#"{{"Ref":{{"resource_id":{ROOT},"path":"/reports/q2.pdf"}},"OldReference":{{"resource_id":{ROOT},"path":"/reports/q1.pdf"}},"Timestamp":{{"seconds":1718000002}}}}"#
        );
        assert!(matches!(
            mapped("events.ItemMoved", &moved).unwrap(),
            Mapped::Lookup(_)
        ));
    }

    #[test]
    fn space_and_group_membership_map_to_member_events() {
        let shared = format!(
            r#"{{"Executant":{EINSTEIN},"GranteeUserID":null,"GranteeGroupID":{{"idp":"x","opaque_id":"167cbee2"}},"Creator":{EINSTEIN},"ID":{{"opaque_id":"{SPACE}"}},"Timestamp":"2024-06-10T12:00:00.123456789Z"}}"#
        );
        let e = decoded(mapped("events.SpaceShared", &shared).unwrap());
        assert_eq!(
            (e.event_type, e.space_id.as_str()),
            (EventType::SpaceMemberAdded, SPACE)
        );
        assert_eq!(&*e.time, "2024-06-10T12:00:00.123456789Z");
        let EventBody::Membership(m) = e.body else {
            panic!()
        };
        assert_eq!(m.member, Member::Group("167cbee2".into()));
        let unshared = shared.replace(
            r#""GranteeUserID":null"#,
            r#""GranteeUserID":{"opaque_id":"f7fb","type":1}"#,
        );
        let e = decoded(mapped("events.SpaceUnshared", &unshared).unwrap());
        assert_eq!(e.event_type, EventType::SpaceMemberRemoved);
        let EventBody::Membership(m) = e.body else {
            panic!()
        };
        assert_eq!(m.member, Member::User("f7fb".into()));

        let group = r#"{"Executant":null,"GroupID":"167cbee2","UserID":"f7fb","Timestamp":{"seconds":1718000005}}"#;
        let e = decoded(mapped("events.GroupMemberAdded", group).unwrap());
        assert_eq!(e.event_type, EventType::GroupMemberAdded);
        let e = decoded(mapped("events.GroupMemberRemoved", group).unwrap());
        assert_eq!(e.event_type, EventType::GroupMemberRemoved);
    }

    #[test]
    fn role_changes_and_space_lifecycle_invalidate_the_space() {
        let updated =
            format!(r#"{{"ID":{{"opaque_id":"{SPACE}"}},"Timestamp":"0001-01-01T00:00:00Z"}}"#);
        for t in [
            "SpaceShareUpdated",
            "SpaceDisabled",
            "SpaceEnabled",
            "SpaceDeleted",
        ] {
            assert_eq!(
                mapped(&format!("events.{t}"), &updated).unwrap(),
                Mapped::Invalidate {
                    space_id: SPACE.into()
                },
                "{t}"
            );
        }
        // A bare space id, as SpaceMembershipExpired sends it.
        let expired = r#"{"SpaceID":{"opaque_id":"b6a1c2d3"},"SpaceName":"Mars","ExpiredAt":"2024-06-01T00:00:00Z","GranteeUserID":{"opaque_id":"f7fb"},"GranteeGroupID":null,"Timestamp":{"seconds":1718000004}}"#;
        assert_eq!(
            mapped("events.SpaceMembershipExpired", expired).unwrap(),
            Mapped::Invalidate {
                space_id: "b6a1c2d3".into()
            }
        );
    }

    #[test]
    fn other_types_are_skipped_and_broken_payloads_refused() {
        for (t, reason) in [
            ("events.UserSignedIn", "user event"),
            ("events.ShareCreated", "share of an item"),
            ("events.PostprocessingFinished", "upload pipeline step"),
            ("events.ItemPurged", "purged from trash"),
            ("events.SendSSE", "changes no folder view"),
        ] {
            assert_eq!(mapped(t, "{}").unwrap(), Mapped::Skip(reason), "{t}");
        }
        assert_eq!(
            mapped("events.ContainerCreated", "[1,").unwrap_err().code,
            "invalid-json"
        );
        assert_eq!(
            mapped("events.ContainerCreated", "{}").unwrap_err().code,
            "missing-field"
        );
        assert_eq!(
            mapped("events.SpaceShared", "{}").unwrap_err().code,
            "missing-field"
        );
        let root = format!(r#"{{"Ref":{{"resource_id":{ROOT},"path":"."}}}}"#);
        assert_eq!(
            mapped("events.ContainerCreated", &root).unwrap_err().code,
            "invalid-path"
        );
    }
}
