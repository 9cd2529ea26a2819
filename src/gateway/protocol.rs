//! The client protocol (`schemas/client-protocol.schema.json`): frames in both directions.
//!
//! Client → server: `auth`, `watch`, `unwatch`, `resume`, `ping`. Server → client: `ready`,
//! `resumed`, `event`, `resync`, `error`, `reconnect`, `pong`. A frame the server cannot use gets an `error` frame back and the
//! connection stays open: one bad frame from a buggy client must not cost it its stream.

use axum::extract::ws::Utf8Bytes;
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::json;

use crate::path::SpacePath;

/// A decoded client frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    Auth {
        token: String,
        /// Where to resume from (a position), when the connection starts with this frame.
        since: Option<String>,
        /// The client's name for its device, when the connection starts with this frame.
        device: Option<String>,
    },
    /// Acknowledges a notification that asked for it (`ack` "user" or "device"), or the
    /// device's position (cumulative), or both.
    Ack {
        notification_id: Option<String>,
        position: Option<String>,
    },
    /// Resume from a position: only before anything was delivered on the connection.
    Resume {
        since: String,
    },
    Watch {
        space_id: String,
        path: SpacePath,
    },
    /// Removes one watch, every watch of a space (`path` absent) or all (both absent).
    Unwatch {
        space_id: Option<String>,
        path: Option<SpacePath>,
    },
    Ping,
}

/// Why a client frame was refused: the `code` and `message` of the error frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub code: &'static str,
    pub message: String,
}

impl FrameError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        FrameError {
            code,
            message: message.into(),
        }
    }

    pub fn to_frame(&self) -> String {
        error_frame(self.code, &self.message)
    }
}

#[derive(Deserialize)]
struct Head {
    #[serde(rename = "type")]
    frame_type: String,
}

#[derive(Deserialize)]
struct AuthBody {
    token: String,
    since: Option<String>,
    device: Option<String>,
}

#[derive(Deserialize)]
struct AckBody {
    notification_id: Option<String>,
    position: Option<String>,
}

#[derive(Deserialize)]
struct ResumeBody {
    since: String,
}

#[derive(Deserialize)]
struct WatchBody {
    space_id: String,
    path: String,
}

#[derive(Deserialize)]
struct UnwatchBody {
    space_id: Option<String>,
    path: Option<String>,
}

/// The longest device name.
pub const MAX_DEVICE: usize = 128;

/// A device name: 1 to [`MAX_DEVICE`] printable characters.
pub fn check_device(device: String) -> Result<String, FrameError> {
    if device.is_empty() || device.len() > MAX_DEVICE || device.chars().any(char::is_control) {
        return Err(FrameError::new(
            "bad-frame",
            format!("a device name is 1 to {MAX_DEVICE} printable characters"),
        ));
    }
    Ok(device)
}

/// The device of a client that names none.
pub const DEFAULT_DEVICE: &str = "default";

/// A notification owed by the client's device, sent on every connect until acknowledged.
pub fn notification_frame(payload: &str) -> String {
    format!(r#"{{"type":"notification","data":{payload}}}"#)
}

/// The answer to an `ack` frame.
pub fn acked_frame(notification_id: &str) -> String {
    json!({"type": "acked", "notification_id": notification_id}).to_string()
}

pub fn parse_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    let bad = |e: serde_json::Error| FrameError::new("bad-frame", e.to_string());
    let head: Head = serde_json::from_str(text).map_err(bad)?;
    match head.frame_type.as_str() {
        "auth" => {
            let b: AuthBody = serde_json::from_str(text).map_err(bad)?;
            Ok(ClientFrame::Auth {
                token: b.token,
                since: b.since,
                device: b.device.map(check_device).transpose()?,
            })
        }
        "ack" => {
            let b: AckBody = serde_json::from_str(text).map_err(bad)?;
            let notification_id = b.notification_id.filter(|id| !id.is_empty());
            let position = b.position.filter(|p| !p.is_empty());
            if notification_id.is_none() && position.is_none() {
                return Err(FrameError::new(
                    "bad-frame",
                    "ack needs a notification_id or a position",
                ));
            }
            if let Some(p) = &position
                && crate::bus::Position::parse(p).is_none()
            {
                return Err(FrameError::new(
                    "bad-frame",
                    format!("{p:?} is not a position"),
                ));
            }
            Ok(ClientFrame::Ack {
                notification_id,
                position,
            })
        }
        "resume" => {
            let b: ResumeBody = serde_json::from_str(text).map_err(bad)?;
            Ok(ClientFrame::Resume { since: b.since })
        }
        "watch" => {
            let b: WatchBody = serde_json::from_str(text).map_err(bad)?;
            if b.space_id.is_empty() {
                return Err(FrameError::new("bad-frame", "space_id must not be empty"));
            }
            Ok(ClientFrame::Watch {
                space_id: b.space_id,
                path: parse_path(&b.path)?,
            })
        }
        "unwatch" => {
            let b: UnwatchBody = serde_json::from_str(text).map_err(bad)?;
            if b.space_id.is_none() && b.path.is_some() {
                return Err(FrameError::new(
                    "bad-frame",
                    "unwatch with a path needs its space_id",
                ));
            }
            Ok(ClientFrame::Unwatch {
                space_id: b.space_id,
                path: b.path.as_deref().map(parse_path).transpose()?,
            })
        }
        "ping" => Ok(ClientFrame::Ping),
        other => Err(FrameError::new(
            "unknown-type",
            format!("unknown frame type {other:?}"),
        )),
    }
}

fn parse_path(raw: &str) -> Result<SpacePath, FrameError> {
    SpacePath::parse(raw).map_err(|e| FrameError::new("invalid-path", format!("path {raw:?}: {e}")))
}

/// The first frame of an authenticated connection: whose it is, and the position it starts at
/// (the user's top when the connection attached), so that a client that receives nothing before
/// it drops still has a position to resume from.
pub fn ready_frame(user: &str, position: &str) -> String {
    json!({"type": "ready", "user": user, "position": position}).to_string()
}

/// The outcome of a resume: all of the history after the position was replayed (it follows this
/// frame), or nothing was and `reason` says why; `position` is the top the replay reaches.
pub fn resumed_frame(
    recovered: bool,
    replayed: usize,
    position: &str,
    reason: Option<&str>,
) -> String {
    json!({"type": "resumed", "recovered": recovered, "replayed": replayed, "position": position, "reason": reason})
        .to_string()
}

/// Sent before a server that is shutting down closes the connection: reconnect after `after_ms`
/// (spread so that clients do not all come back at once) and resume from `position`.
pub fn reconnect_frame(position: &str, after_ms: u64) -> String {
    json!({"type": "reconnect", "position": position, "after_ms": after_ms}).to_string()
}

pub fn error_frame(code: &str, message: &str) -> String {
    json!({"type": "error", "code": code, "message": message}).to_string()
}

/// An error that ends the connection, with the last position delivered on it so the client can
/// resume exactly there (an evicted slow consumer).
pub fn error_frame_at(code: &str, message: &str, position: &str) -> String {
    json!({"type": "error", "code": code, "message": message, "position": position}).to_string()
}

pub const PONG_FRAME: &str = r#"{"type":"pong"}"#;

/// The routing facts of a delivered message, read once per delivery from its payload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Route {
    pub message_type: String,
    pub space_id: String,
    /// `item.path`, `item.old_path` and every `items[].path` / `old_path`.
    pub paths: Vec<String>,
}

#[derive(Deserialize)]
struct WireItem {
    path: Option<String>,
    old_path: Option<String>,
}

#[derive(Deserialize)]
struct WireRoute {
    #[serde(rename = "type", default)]
    message_type: String,
    #[serde(default)]
    space_id: String,
    item: Option<WireItem>,
    items: Option<Vec<WireItem>>,
}

impl Route {
    pub fn of_payload(payload: &[u8]) -> Route {
        let Ok(wire) = serde_json::from_slice::<WireRoute>(payload) else {
            return Route::default();
        };
        let mut paths = Vec::new();
        for item in wire
            .item
            .into_iter()
            .chain(wire.items.into_iter().flatten())
        {
            paths.extend(item.path);
            paths.extend(item.old_path);
        }
        Route {
            message_type: wire.message_type,
            space_id: wire.space_id,
            paths,
        }
    }

    /// Messages that reach every connection of a user, whatever it watches.
    pub fn ignores_watches(&self) -> bool {
        self.paths.is_empty()
    }
}

/// The top-level `type` of an encoded user message, found without parsing it: in the compact
/// encoding the first `"type":"` is the top-level one (nested ones come later, and quotes inside
/// strings are escaped). `None` if absent.
pub fn message_type_of(payload: &[u8]) -> Option<&str> {
    // Bytes, not a `str`: this runs per delivery, and only the type needs to be valid UTF-8.
    const KEY: &[u8] = b"\"type\":\"";
    let start = payload.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let len = payload[start..].iter().position(|b| *b == b'"')?;
    std::str::from_utf8(&payload[start..start + len]).ok()
}

/// `{"type":"event","id":…,"data":…}` (or, for a resync of `resync_space`, `{"type":"resync",
/// "id":…,"space_id":…,"data":…}`) built around the payload bytes without re-encoding them.
/// A payload that is not UTF-8 (never one foldercast wrote) becomes `null`.
pub fn server_frame(id: &str, payload: &[u8], resync_space: Option<&str>) -> Utf8Bytes {
    let mut out = BytesMut::with_capacity(server_frame_len(id, payload.len(), resync_space));
    put_server_frame(&mut out, id, payload, resync_space);
    text_of(out.freeze()).unwrap_or_else(|| {
        let mut out = BytesMut::new();
        put_server_frame(&mut out, id, b"null", resync_space);
        text_of(out.freeze()).unwrap_or(Utf8Bytes::from_static(""))
    })
}

/// The bytes as a text frame's, when they are UTF-8 (the one check a frame's bytes get).
pub fn text_of(bytes: Bytes) -> Option<Utf8Bytes> {
    Utf8Bytes::try_from(bytes).ok()
}

/// The length of [`server_frame`]'s text when its id and space need no escaping (always, for
/// foldercast's positions and space ids); a buffer sized so takes it without growing.
pub fn server_frame_len(id: &str, payload_len: usize, resync_space: Option<&str>) -> usize {
    let (head, space) = match resync_space {
        Some(space) => (RESYNC_HEAD.len(), SPACE_KEY.len() + space.len() + 2),
        None => (EVENT_HEAD.len(), 0),
    };
    head + id.len() + 2 + space + DATA_KEY.len() + payload_len + 1
}

/// Where a frame's id and payload lie in its text, from its first byte: a frame built once
/// keeps these rather than buffers of their own (`session::Frame`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameSpans {
    /// `None` when the id had to be escaped (never one of foldercast's positions).
    pub id: Option<std::ops::Range<usize>>,
    pub payload: std::ops::Range<usize>,
}

/// Appends [`server_frame`]'s bytes to `out`, the payload's as they are (the caller checks the
/// whole text is UTF-8), and says where the id and the payload went.
pub fn put_server_frame(
    out: &mut BytesMut,
    id: &str,
    payload: &[u8],
    resync_space: Option<&str>,
) -> FrameSpans {
    let start = out.len();
    let id_span = match resync_space {
        Some(space) => {
            out.extend_from_slice(RESYNC_HEAD.as_bytes());
            let id_span = put_quoted(out, id);
            out.extend_from_slice(SPACE_KEY.as_bytes());
            put_quoted(out, space);
            id_span
        }
        None => {
            out.extend_from_slice(EVENT_HEAD.as_bytes());
            put_quoted(out, id)
        }
    };
    out.extend_from_slice(DATA_KEY.as_bytes());
    let payload_start = out.len() - start;
    out.extend_from_slice(payload);
    let payload_span = payload_start..out.len() - start;
    out.extend_from_slice(b"}");
    FrameSpans {
        id: id_span.map(|r| r.start - start..r.end - start),
        payload: payload_span,
    }
}

const EVENT_HEAD: &str = r#"{"type":"event","id":"#;
const RESYNC_HEAD: &str = r#"{"type":"resync","id":"#;
const SPACE_KEY: &str = r#","space_id":"#;
const DATA_KEY: &str = r#","data":"#;

/// Appends `s` as a JSON string; where its characters went in `out` when they went unescaped.
fn put_quoted(out: &mut BytesMut, s: &str) -> Option<std::ops::Range<usize>> {
    let plain = s
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
    if plain {
        out.extend_from_slice(b"\"");
        let start = out.len();
        out.extend_from_slice(s.as_bytes());
        let span = start..out.len();
        out.extend_from_slice(b"\"");
        Some(span)
    } else {
        let escaped = serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
        out.extend_from_slice(escaped.as_bytes());
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_frames_are_json_whatever_the_ids() {
        for (id, space) in [
            ("17", None),
            ("1-0", Some("s\"1")),
            ("a\\b\u{1}é", Some("spa ce")),
        ] {
            let frame = server_frame(id, br#"{"type":"x"}"#, space);
            let v: serde_json::Value = serde_json::from_str(&frame).unwrap();
            assert_eq!(v["id"], id);
            assert_eq!(v["data"]["type"], "x");
            if let Some(space) = space {
                assert_eq!(v["space_id"], space);
                assert_eq!(v["type"], "resync");
            } else {
                assert_eq!(v["type"], "event");
            }
        }
    }

    #[test]
    fn parses_client_frames() {
        assert_eq!(
            parse_client_frame(r#"{"type":"auth","token":"t"}"#),
            Ok(ClientFrame::Auth {
                token: "t".into(),
                since: None,
                device: None
            })
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"auth","token":"t","since":"e:1-0"}"#),
            Ok(ClientFrame::Auth {
                token: "t".into(),
                since: Some("e:1-0".into()),
                device: None
            })
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"resume","since":"e:1-0"}"#),
            Ok(ClientFrame::Resume {
                since: "e:1-0".into()
            })
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"watch","space_id":"s","path":"/a/"}"#),
            Ok(ClientFrame::Watch {
                space_id: "s".into(),
                path: SpacePath::parse("/a").unwrap()
            })
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"unwatch"}"#),
            Ok(ClientFrame::Unwatch {
                space_id: None,
                path: None
            })
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"ping"}"#),
            Ok(ClientFrame::Ping)
        );
    }

    #[test]
    fn refuses_with_codes() {
        let code = |t: &str| parse_client_frame(t).unwrap_err().code;
        assert_eq!(code("nope"), "bad-frame");
        assert_eq!(code(r#"{"no":"type"}"#), "bad-frame");
        assert_eq!(code(r#"{"type":"dance"}"#), "unknown-type");
        assert_eq!(code(r#"{"type":"watch","space_id":"s"}"#), "bad-frame");
        assert_eq!(
            code(r#"{"type":"watch","space_id":"s","path":"a/../b"}"#),
            "invalid-path"
        );
        assert_eq!(code(r#"{"type":"auth"}"#), "bad-frame");
        assert_eq!(code(r#"{"type":"resume"}"#), "bad-frame");
        assert_eq!(code(r#"{"type":"unwatch","path":"/a"}"#), "bad-frame");
        assert_eq!(code(r#"{"type":5}"#), "bad-frame");
    }

    #[test]
    fn routes_and_frames() {
        let payload = br#"{"event_id":"e","type":"item-moved","space_id":"s","item":{"path":"/b","old_path":"/a"}}"#;
        let r = Route::of_payload(payload);
        assert_eq!(r.paths, ["/b", "/a"]);
        let frame: serde_json::Value =
            serde_json::from_str(&server_frame("7", payload, None)).unwrap();
        assert_eq!(message_type_of(payload), Some("item-moved"));
        assert_eq!(frame["type"], "event");
        assert_eq!(frame["id"], "7");
        assert_eq!(frame["data"]["event_id"], "e");

        let resync = br#"{"type":"resync","space_id":"s","time":"t","reason":"backlog"}"#;
        let r = Route::of_payload(resync);
        assert!(r.ignores_watches());
        let frame: serde_json::Value =
            serde_json::from_str(&server_frame("8", resync, Some(&r.space_id))).unwrap();
        assert_eq!(message_type_of(resync), Some("resync"));
        let tricky =
            br#"{"event_id":"e\"type\":\"x","type":"coalesced","items":[{"type":"item-moved"}]}"#;
        assert_eq!(message_type_of(tricky), Some("coalesced"));
        assert_eq!(frame["type"], "resync");
        assert_eq!(frame["space_id"], "s");
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any text a client sends: no panic, and a refusal carries a code.
            #[test]
            fn any_text_parses_or_is_refused_with_a_code(
                text in r#"\{"type":"(watch|unwatch|ping|auth|resume|x)"(,"[a-z_]{1,9}":("[^"]{0,12}"|[0-9]{1,3}|null|\[\]|\{\}))*\}|\PC{0,60}"#
            ) {
                if let Err(e) = parse_client_frame(&text) {
                    prop_assert!(!e.code.is_empty());
                    prop_assert!(e.to_frame().contains(e.code));
                }
            }
        }
    }
}
