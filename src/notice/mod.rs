//! Notifications an operator publishes: to users, groups, spaces' members, or everyone.
//!
//! A notification is a user message of its own type (`schemas/user-message.schema.json`,
//! `"type":"notification"`) and travels the same way as storage events: the bus's per-user
//! history (so a client that was away catches up, or is told to refetch), its exactly-once guard
//! (the notification id is the event id: a retried publish reaches nobody twice), every watch
//! filter passed. The pieces:
//! - [`Notice`]: what an operator asks for, validated (the CLI and `POST /api/notifications`
//!   share it);
//! - [`audience`]: who the targets are, through the membership resolver (fixture or oCIS), and
//!   how each kind was resolved;
//! - [`publish`]: the message, sent in bounded batches, and the idempotency key that makes a
//!   retried publish a no-op for 24 h.

pub mod audience;
pub mod downtime;
pub mod publish;

use serde::{Deserialize, Serialize};

/// How urgent a notification is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    #[default]
    Info,
    Warning,
    Critical,
}

/// Who must acknowledge it: nobody, any one device of the user, or every device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    User,
    Device,
}

/// Who receives it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Targets {
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    /// Spaces: their members who may list them (never an uploader).
    #[serde(default)]
    pub spaces: Vec<String>,
    /// Every user the directory knows (not only the connected ones).
    #[serde(default)]
    pub all: bool,
}

/// A publish request, as `POST /api/notifications` takes it (and `foldercast publish` builds it).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Notice {
    #[serde(default)]
    pub level: Level,
    pub title: String,
    #[serde(default)]
    pub body: String,
    pub link: Option<String>,
    /// RFC 3339: after it, the notification is of no use any more.
    pub expires: Option<String>,
    pub ack: Option<AckMode>,
    /// A remote action for the client to carry out, e.g. `{"action":"wipe","path":"/secret"}`
    /// (with `ack: "device"`, every device confirms it did).
    pub action: Option<serde_json::Map<String, serde_json::Value>>,
    pub targets: Targets,
    /// Set by the downtime scheduler ([`downtime`]), never by a request.
    #[serde(skip)]
    pub downtime: Option<downtime::Window>,
    /// The last announcement before a downtime: clients stop sending requests.
    #[serde(skip)]
    pub shutdown_advice: bool,
}

/// The most bytes a title may have; a body's, a link's.
pub const MAX_TITLE: usize = 256;
pub const MAX_BODY: usize = 16 * 1024;
pub const MAX_LINK: usize = 2048;
/// The most bytes an action may take, encoded.
pub const MAX_ACTION: usize = 4096;
/// The most explicit targets of each kind in one request.
pub const MAX_TARGETS: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct NoticeError {
    /// Stable: `bad-notification`, `no-targets`, `unknown-group`, `unknown-space`,
    /// `directory-unavailable`, `bus-unavailable`.
    pub code: &'static str,
    pub message: String,
}

impl NoticeError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        NoticeError {
            code,
            message: message.into(),
        }
    }
}

impl Notice {
    /// Checks what the schema cannot: sizes, a real expiry time, at least one target.
    pub fn validate(&self) -> Result<(), NoticeError> {
        let bad = |m: String| Err(NoticeError::new("bad-notification", m));
        if self.title.trim().is_empty() {
            return bad("a title is required".into());
        }
        if self.title.len() > MAX_TITLE {
            return bad(format!("the title is over {MAX_TITLE} bytes"));
        }
        if self.body.len() > MAX_BODY {
            return bad(format!("the body is over {MAX_BODY} bytes"));
        }
        if let Some(link) = &self.link
            && (link.len() > MAX_LINK
                || !(link.starts_with("https://") || link.starts_with("http://")))
        {
            return bad(format!(
                "link must be an http(s) URL of at most {MAX_LINK} bytes"
            ));
        }
        if let Some(action) = &self.action {
            let encoded = serde_json::to_vec(action)
                .map(|v| v.len())
                .unwrap_or(usize::MAX);
            if encoded > MAX_ACTION || !action.get("action").is_some_and(|a| a.is_string()) {
                return bad(format!(
                    "an action is an object with an \"action\" name, at most {MAX_ACTION} bytes"
                ));
            }
        }
        if let Some(expires) = &self.expires
            && chrono::DateTime::parse_from_rfc3339(expires).is_err()
        {
            return bad(format!("expires {expires:?} is not RFC 3339"));
        }
        let t = &self.targets;
        for (kind, list) in [
            ("users", &t.users),
            ("groups", &t.groups),
            ("spaces", &t.spaces),
        ] {
            if list.len() > MAX_TARGETS {
                return bad(format!("more than {MAX_TARGETS} {kind}"));
            }
            if list
                .iter()
                .any(|v| v.trim().is_empty() || v.chars().any(char::is_control))
            {
                return bad(format!("an empty or unprintable id among {kind}"));
            }
        }
        if !t.all && t.users.is_empty() && t.groups.is_empty() && t.spaces.is_empty() {
            return Err(NoticeError::new(
                "no-targets",
                "name users, groups, spaces, or all",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(json: &str) -> Result<Notice, String> {
        let n: Notice = serde_json::from_str(json).map_err(|e| e.to_string())?;
        n.validate().map_err(|e| e.code.to_owned())?;
        Ok(n)
    }

    #[test]
    fn a_notice_needs_a_title_and_a_target() {
        assert!(notice(r#"{"title":"Hi","targets":{"users":["alice"]}}"#).is_ok());
        assert_eq!(
            notice(r#"{"title":"Hi","targets":{}}"#).unwrap_err(),
            "no-targets"
        );
        assert_eq!(
            notice(r#"{"title":" ","targets":{"all":true}}"#).unwrap_err(),
            "bad-notification"
        );
        assert!(
            notice(r#"{"title":"Hi","targets":{"everyone":true}}"#)
                .unwrap_err()
                .contains("unknown field")
        );
        assert_eq!(
            notice(r#"{"title":"Hi","expires":"tomorrow","targets":{"all":true}}"#).unwrap_err(),
            "bad-notification"
        );
        assert_eq!(
            notice(r#"{"title":"Hi","link":"javascript:alert(1)","targets":{"all":true}}"#)
                .unwrap_err(),
            "bad-notification"
        );
        let n = notice(r#"{"title":"Down at 17:00","level":"critical","ack":"device","targets":{"groups":["eng"]}}"#).unwrap();
        assert_eq!((n.level, n.ack), (Level::Critical, Some(AckMode::Device)));
    }
}
