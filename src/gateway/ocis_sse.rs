//! oCIS's own SSE dialect, so ownCloud Web's client works unchanged against the gateway:
//! `GET /ocs/v2.php/apps/notifications/api/v1/notifications/sse` with `Authorization: Bearer`.
//!
//! oCIS's `sse` service sends `event:` names of its `clientlog` service and a `data:` line of
//! `{"parentitemid","itemid","spaceid","initiatorid","etag","affecteduserids"}`
//! (`ocis-ingestion.md` §7, `ocis-interfaces.md` §3). This module derives them from
//! foldercast's messages, per user:
//!
//! | message | `event:` |
//! |---|---|
//! | `file-uploaded` | `postprocessing-finished` |
//! | `file-touched`, `folder-created`, `item-trashed`, `item-restored` | the same name |
//! | `item-moved` | `item-renamed` when only the name changed, else `item-moved` |
//! | `space-member-added` / `-removed` | the same name; `affecteduserids` names the member when it is a user |
//! | `coalesced` | one event per item it holds, in order |
//! | `resync` | `space-share-updated` naming the user: ownCloud Web then reloads the folder list of the space on screen, the one refetch its protocol has |
//!
//! Unlike oCIS's service, every event has an `id:` line (the message's position): a client
//! that sends it back as `Last-Event-ID` resumes without a gap. What ownCloud Web cannot use
//! (foldercast's `ready`, `resumed`, `error` events) is not sent: a stream that must end just
//! ends, and the client reconnects.

use serde::Serialize;
use serde_json::Value;

/// oCIS's `FileEvent`, as ownCloud Web reads it.
#[derive(Debug, Serialize, PartialEq)]
pub struct FileEvent<'a> {
    pub parentitemid: &'a str,
    pub itemid: &'a str,
    pub spaceid: &'a str,
    pub initiatorid: &'a str,
    pub etag: &'a str,
    pub affecteduserids: Option<Vec<&'a str>>,
}

/// The `(event name, data)` pairs one message becomes for `user`.
pub fn translate(payload: &[u8], user: &str) -> Vec<(&'static str, String)> {
    let Ok(message) = serde_json::from_slice::<Value>(payload) else {
        return Vec::new();
    };
    let str_of = |v: &Value, key: &str| {
        v.get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let space = str_of(&message, "space_id");
    let initiator = str_of(&message, "initiator_id");
    let mut out = Vec::new();
    let mut push = |name: &'static str, event: FileEvent<'_>| {
        if let Ok(data) = serde_json::to_string(&event) {
            out.push((name, data));
        }
    };
    // The event name of a change to `item`, and the item's parent id, id and etag; `None` for
    // a change oCIS has no event for.
    let file_event = |item: &Value, kind: &str| -> Option<(&'static str, [String; 3])> {
        let name = event_name(kind, item);
        (!name.is_empty()).then(|| {
            (
                name,
                [
                    str_of(item, "parent_id"),
                    str_of(item, "item_id"),
                    str_of(item, "etag"),
                ],
            )
        })
    };
    match message
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default()
    {
        "coalesced" => {
            for item in message
                .get("items")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let kind = item.get("type").and_then(Value::as_str).unwrap_or_default();
                if let Some((name, [parent, id, etag])) = file_event(item, kind) {
                    push(
                        name,
                        FileEvent {
                            parentitemid: &parent,
                            itemid: &id,
                            spaceid: &space,
                            initiatorid: "",
                            etag: &etag,
                            affecteduserids: None,
                        },
                    );
                }
            }
        }
        "resync" => push(
            "space-share-updated",
            FileEvent {
                parentitemid: "",
                itemid: "",
                spaceid: &space,
                initiatorid: "",
                etag: "",
                affecteduserids: Some(vec![user]),
            },
        ),
        kind @ ("space-member-added" | "space-member-removed") => {
            let member = message
                .get("member")
                .map(|m| str_of(m, "user"))
                .unwrap_or_default();
            let affected = if member.is_empty() {
                Vec::new()
            } else {
                vec![member.as_str()]
            };
            let name = if kind == "space-member-added" {
                "space-member-added"
            } else {
                "space-member-removed"
            };
            push(
                name,
                FileEvent {
                    parentitemid: "",
                    itemid: "",
                    spaceid: &space,
                    initiatorid: &initiator,
                    etag: "",
                    affecteduserids: Some(affected),
                },
            );
        }
        kind => {
            if let Some(item) = message.get("item")
                && let Some((name, [parent, id, etag])) = file_event(item, kind)
            {
                push(
                    name,
                    FileEvent {
                        parentitemid: &parent,
                        itemid: &id,
                        spaceid: &space,
                        initiatorid: &initiator,
                        etag: &etag,
                        affecteduserids: None,
                    },
                );
            }
        }
    }
    out
}

/// oCIS's event name for a change of `kind` to `item` ("" for none).
fn event_name(kind: &str, item: &Value) -> &'static str {
    match kind {
        "file-uploaded" => "postprocessing-finished",
        "file-touched" => "file-touched",
        "folder-created" => "folder-created",
        "item-trashed" => "item-trashed",
        "item-restored" => "item-restored",
        "item-moved" => {
            let split = |key: &str| {
                item.get(key)
                    .and_then(Value::as_str)
                    .and_then(|p| p.rsplit_once('/'))
                    .map(|(dir, name)| (dir.to_owned(), name.to_owned()))
            };
            match (split("old_path"), split("path")) {
                (Some((old_dir, old_name)), Some((dir, name)))
                    if old_dir == dir && old_name != name =>
                {
                    "item-renamed"
                }
                _ => "item-moved",
            }
        }
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn events(message: Value) -> Vec<(&'static str, Value)> {
        translate(message.to_string().as_bytes(), "u1")
            .into_iter()
            .map(|(n, d)| (n, serde_json::from_str(&d).unwrap()))
            .collect()
    }

    #[test]
    fn an_upload_is_postprocessing_finished_with_its_ids() {
        let got = events(
            json!({"event_id":"e","type":"file-uploaded","space_id":"s$p","actor":"a","initiator_id":"tab-1","time":"t",
            "item":{"path":"/a/b.txt","old_path":null,"kind":"file","size":3,"item_id":"s$p!b","parent_id":"s$p!a","etag":"\"x\""},"folders":[]}),
        );
        assert_eq!(
            got,
            [(
                "postprocessing-finished",
                json!({"parentitemid":"s$p!a","itemid":"s$p!b","spaceid":"s$p","initiatorid":"tab-1","etag":"\"x\"","affecteduserids":null})
            )]
        );
    }

    #[test]
    fn moves_are_renames_when_only_the_name_changes() {
        let moved = |old: &str, new: &str| {
            events(json!({"type":"item-moved","space_id":"s","item":{"path":new,"old_path":old,"kind":"file","size":1,"item_id":"i","etag":null}}))[0].0
        };
        assert_eq!(moved("/a/x", "/a/y"), "item-renamed");
        assert_eq!(moved("/a/x", "/b/x"), "item-moved");
        assert_eq!(moved("/a/x", "/b/y"), "item-moved");
    }

    #[test]
    fn coalesced_messages_become_one_event_per_item_and_resyncs_a_reload() {
        let got = events(
            json!({"type":"coalesced","space_id":"s","event_ids":["1","2"],"items":[
            {"type":"folder-created","event_id":"1","path":"/d","old_path":null,"kind":"folder","size":0,"item_id":"s!d","etag":"e"},
            {"type":"item-trashed","event_id":"2","path":"/f","old_path":null,"kind":"file","size":5,"item_id":"s!f","etag":null}],"folders":[]}),
        );
        let names: Vec<&str> = got.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["folder-created", "item-trashed"]);
        assert_eq!(got[1].1["itemid"], "s!f");
        let got = events(
            json!({"type":"resync","space_id":"s","time":"t","reason":"backlog","skipped":3}),
        );
        assert_eq!(
            got,
            [(
                "space-share-updated",
                json!({"parentitemid":"","itemid":"","spaceid":"s","initiatorid":"","etag":"","affecteduserids":["u1"]})
            )]
        );
    }

    #[test]
    fn member_changes_name_the_user_they_affect() {
        let got =
            events(json!({"type":"space-member-removed","space_id":"s","member":{"user":"u2"}}));
        assert_eq!(got[0].0, "space-member-removed");
        assert_eq!(got[0].1["affecteduserids"], json!(["u2"]));
        let got =
            events(json!({"type":"space-member-added","space_id":"s","member":{"group":"g"}}));
        assert_eq!(got[0].1["affecteduserids"], json!([]));
    }
}
