//! A space role: part of the input contract (an event grants one) and of membership (who may
//! list a space). Its own module, so the event contract and membership do not depend on each
//! other.

/// A space role, ordered by what it may do: `Uploader < Viewer < Editor < Manager`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// File drop: may upload, may not list, so it must never learn names.
    Uploader,
    Viewer,
    Editor,
    Manager,
}

impl Role {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "uploader" => Some(Role::Uploader),
            "viewer" => Some(Role::Viewer),
            "editor" => Some(Role::Editor),
            "manager" => Some(Role::Manager),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Uploader => "uploader",
            Role::Viewer => "viewer",
            Role::Editor => "editor",
            Role::Manager => "manager",
        }
    }

    /// Only roles that may list a folder receive notifications about it.
    pub fn can_list(self) -> bool {
        self >= Role::Viewer
    }
}
