//! Who a notification reaches: the named users, the members of the named groups, those who may
//! list the named spaces (never an uploader), or everyone the directory knows, each user once.
//!
//! The answer says how each kind was resolved, so an operator sees "12 from group eng, 30 who
//! may list s-eng, 10,000 of oCIS's users" rather than a bare count, and never mistakes
//! "connected users" for everyone.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::Serialize;

use super::{NoticeError, Targets};
use crate::membership::{MembershipResolver, ResolveError};

/// The users a notification goes to, sorted, each once.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Audience {
    #[serde(skip)]
    pub users: Vec<Arc<str>>,
    /// How each target was resolved, in the request's order: `{"kind","id"?,"users","source"?}`.
    pub resolved: Vec<Resolved>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Resolved {
    /// `user`, `group`, `space` or `all`.
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Users this target named (before removing the ones others named too).
    pub users: usize,
    /// Where the list came from (`all`): the membership file, or oCIS's users.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<&'static str>,
}

fn failed(kind: &str, id: &str, e: ResolveError) -> NoticeError {
    match e {
        ResolveError::UnknownSpace(_) => NoticeError::new(
            if kind == "group" {
                "unknown-group"
            } else {
                "unknown-space"
            },
            format!("no {kind} {id:?}"),
        ),
        ResolveError::Refused(reason) => {
            NoticeError::new("bad-notification", format!("{kind} {id:?}: {reason}"))
        }
        ResolveError::Unavailable(reason) => {
            NoticeError::new("directory-unavailable", format!("{kind} {id:?}: {reason}"))
        }
    }
}

/// Resolves `targets` through `resolver`; without one, only named users can be.
pub async fn resolve(
    resolver: Option<&dyn MembershipResolver>,
    targets: &Targets,
) -> Result<Audience, NoticeError> {
    let directory = || {
        resolver.ok_or_else(|| {
            NoticeError::new(
                "no-directory",
                "groups, spaces and all need a directory: start with --membership or --ocis-url",
            )
        })
    };
    let mut users: BTreeSet<Arc<str>> = BTreeSet::new();
    let mut resolved = Vec::new();
    if !targets.users.is_empty() {
        users.extend(targets.users.iter().map(|u| Arc::from(u.as_str())));
        resolved.push(Resolved {
            kind: "user",
            id: None,
            users: targets.users.len(),
            source: None,
        });
    }
    for group in &targets.groups {
        let members = directory()?
            .group_members(group)
            .await
            .map_err(|e| failed("group", group, e))?;
        resolved.push(Resolved {
            kind: "group",
            id: Some(group.clone()),
            users: members.len(),
            source: None,
        });
        users.extend(members.iter().cloned());
    }
    for space in &targets.spaces {
        let listers = directory()?
            .listers(space)
            .await
            .map_err(|e| failed("space", space, e))?;
        resolved.push(Resolved {
            kind: "space",
            id: Some(space.clone()),
            users: listers.len(),
            source: None,
        });
        users.extend(listers.iter().cloned());
    }
    if targets.all {
        let (all, source) = directory()?
            .all_users()
            .await
            .map_err(|e| failed("all", "", e))?;
        resolved.push(Resolved {
            kind: "all",
            id: None,
            users: all.len(),
            source: Some(source),
        });
        users.extend(all.iter().cloned());
    }
    Ok(Audience {
        users: users.into_iter().collect(),
        resolved,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::{Directory, FixtureResolver};

    fn resolver() -> FixtureResolver {
        let dir: Directory = serde_json::from_str(
            r#"{"users":[{"id":"alice"},{"id":"bob"},{"id":"carol"},{"id":"dave"}],
                "groups":[{"id":"eng","members":["bob","carol"]}],
                "spaces":[{"id":"s1","members":[{"user":"alice","role":"manager"},{"group":"eng","role":"viewer"},{"user":"dave","role":"uploader"}]}]}"#,
        )
        .unwrap();
        FixtureResolver::new(&dir)
    }

    fn names(a: &Audience) -> Vec<&str> {
        a.users.iter().map(|u| &**u).collect()
    }

    #[tokio::test]
    async fn targets_expand_and_each_user_counts_once() {
        let r = resolver();
        let targets = Targets {
            users: vec!["alice".into(), "zoe".into()],
            groups: vec!["eng".into()],
            spaces: vec!["s1".into()],
            all: false,
        };
        let a = resolve(Some(&r), &targets).await.unwrap();
        assert_eq!(
            names(&a),
            ["alice", "bob", "carol", "zoe"],
            "the uploader dave is no lister"
        );
        let kinds: Vec<(&str, usize)> = a.resolved.iter().map(|r| (r.kind, r.users)).collect();
        assert_eq!(kinds, [("user", 2), ("group", 2), ("space", 3)]);
        let all = resolve(
            Some(&r),
            &Targets {
                all: true,
                ..Targets::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(names(&all), ["alice", "bob", "carol", "dave"]);
        assert_eq!(all.resolved[0].source, Some("the membership file's users"));
    }

    #[tokio::test]
    async fn unknown_groups_and_spaces_are_refused_by_name() {
        let r = resolver();
        let err = resolve(
            Some(&r),
            &Targets {
                groups: vec!["nope".into()],
                ..Targets::default()
            },
        )
        .await
        .unwrap_err();
        assert_eq!(err.code, "unknown-group");
        let err = resolve(
            Some(&r),
            &Targets {
                spaces: vec!["nope".into()],
                ..Targets::default()
            },
        )
        .await
        .unwrap_err();
        assert_eq!(err.code, "unknown-space");
    }
}
