//! Membership from a JSON fixture file (`schemas/membership.schema.json`).
//!
//! Used by the embedded default and by tests. Membership events edit the in-memory copy, so a
//! replay that adds or removes members sees the same effect a live directory would show.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use serde::Deserialize;

use super::{MembershipResolver, ResolveError, Role, UserList};
use crate::event::{Member, MembershipChange};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read membership file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid membership file {path}: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("invalid membership file {path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// The fixture file, as written.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Directory {
    #[serde(default)]
    pub users: Vec<UserEntry>,
    #[serde(default)]
    pub groups: Vec<GroupEntry>,
    #[serde(default)]
    pub spaces: Vec<SpaceEntry>,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    pub id: String,
    #[serde(default)]
    pub display_name: Option<String>,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct GroupEntry {
    pub id: String,
    #[serde(default)]
    pub members: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SpaceEntry {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub members: Vec<GrantEntry>,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct GrantEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub role: String,
}

impl Directory {
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: shown.clone(),
            source,
        })?;
        let dir: Directory = serde_json::from_slice(&bytes).map_err(|source| LoadError::Parse {
            path: shown.clone(),
            source,
        })?;
        // Check grants now so a typo in a fixture fails at start, not on the first event.
        for space in &dir.spaces {
            for grant in &space.members {
                grant_of(grant).map_err(|reason| LoadError::Invalid {
                    path: shown.clone(),
                    reason: format!("space {}: {reason}", space.id),
                })?;
            }
        }
        Ok(dir)
    }
}

fn grant_of(entry: &GrantEntry) -> Result<(Member, Role), String> {
    let role = Role::parse(&entry.role).ok_or_else(|| format!("unknown role {:?}", entry.role))?;
    let member = match (&entry.user, &entry.group) {
        (Some(u), None) => Member::User(u.clone()),
        (None, Some(g)) => Member::Group(g.clone()),
        _ => return Err("a member needs exactly one of user or group".into()),
    };
    Ok((member, role))
}

struct State {
    /// Every user of the file: its users, and anyone a group or a grant names.
    users: BTreeSet<String>,
    groups: HashMap<String, Vec<String>>,
    /// space → member → role; a BTreeMap keeps iteration (and so output) deterministic.
    spaces: HashMap<String, BTreeMap<Member, Role>>,
    /// Memoised answers, dropped for a space whenever its grants change.
    listers: HashMap<String, UserList>,
}

/// Resolves membership from a [`Directory`] held in memory.
pub struct FixtureResolver {
    state: RwLock<State>,
}

impl PartialOrd for Member {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Member {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let key = |m: &Member| match m {
            Member::User(u) => (0, u.clone()),
            Member::Group(g) => (1, g.clone()),
        };
        key(self).cmp(&key(other))
    }
}

impl FixtureResolver {
    pub fn new(dir: &Directory) -> Self {
        let groups = dir
            .groups
            .iter()
            .map(|g| (g.id.clone(), g.members.clone()))
            .collect();
        let mut spaces = HashMap::new();
        for space in &dir.spaces {
            let mut grants: BTreeMap<Member, Role> = BTreeMap::new();
            for entry in &space.members {
                // Directory::load already checked every grant; skip rather than panic otherwise.
                if let Ok((member, role)) = grant_of(entry) {
                    let slot = grants.entry(member).or_insert(role);
                    *slot = (*slot).max(role);
                }
            }
            spaces.insert(space.id.clone(), grants);
        }
        let mut users: BTreeSet<String> = dir.users.iter().map(|u| u.id.clone()).collect();
        users.extend(dir.groups.iter().flat_map(|g| g.members.iter().cloned()));
        users.extend(
            dir.spaces
                .iter()
                .flat_map(|s| s.members.iter().filter_map(|m| m.user.clone())),
        );
        FixtureResolver {
            state: RwLock::new(State {
                users,
                groups,
                spaces,
                listers: HashMap::new(),
            }),
        }
    }

    pub fn load(path: &Path) -> Result<Self, LoadError> {
        Ok(Self::new(&Directory::load(path)?))
    }
}

impl State {
    fn expand(&self, member: &Member) -> Vec<String> {
        match member {
            Member::User(u) => vec![u.clone()],
            Member::Group(g) => self.groups.get(g).cloned().unwrap_or_default(),
        }
    }

    fn compute_listers(&self, space_id: &str) -> Result<UserList, ResolveError> {
        let grants = self
            .spaces
            .get(space_id)
            .ok_or_else(|| ResolveError::UnknownSpace(space_id.to_owned()))?;
        // A user's effective role is the highest any of their grants gives.
        let mut effective: BTreeMap<String, Role> = BTreeMap::new();
        for (member, role) in grants {
            for user in self.expand(member) {
                let slot = effective.entry(user).or_insert(*role);
                *slot = (*slot).max(*role);
            }
        }
        Ok(effective
            .into_iter()
            .filter(|(_, role)| role.can_list())
            .map(|(user, _)| Arc::from(user))
            .collect())
    }
}

#[async_trait]
impl MembershipResolver for FixtureResolver {
    async fn listers(&self, space_id: &str) -> Result<UserList, ResolveError> {
        {
            let state = self.state.read().map_err(|_| poisoned())?;
            if let Some(list) = state.listers.get(space_id) {
                return Ok(list.clone());
            }
        }
        let mut state = self.state.write().map_err(|_| poisoned())?;
        let list = state.compute_listers(space_id)?;
        state.listers.insert(space_id.to_owned(), list.clone());
        Ok(list)
    }

    async fn apply(
        &self,
        space_id: &str,
        change: &MembershipChange,
        added: bool,
    ) -> Result<UserList, ResolveError> {
        let mut state = self.state.write().map_err(|_| poisoned())?;
        let affected: BTreeSet<String> = state.expand(&change.member).into_iter().collect();
        if added {
            let grants = state.spaces.entry(space_id.to_owned()).or_default();
            grants.insert(change.member.clone(), change.role.unwrap_or(Role::Viewer));
        } else if let Some(grants) = state.spaces.get_mut(space_id) {
            grants.remove(&change.member);
        } else {
            return Err(ResolveError::UnknownSpace(space_id.to_owned()));
        }
        state.listers.remove(space_id);
        Ok(affected.into_iter().map(Arc::from).collect())
    }

    async fn apply_group(&self, group: &str, user: &str, added: bool) -> Result<(), ResolveError> {
        let mut state = self.state.write().map_err(|_| poisoned())?;
        let members = state.groups.entry(group.to_owned()).or_default();
        members.retain(|m| m != user);
        if added {
            members.push(user.to_owned());
            state.users.insert(user.to_owned());
        }
        // Any space may grant the group: forget every memoised answer.
        state.listers.clear();
        Ok(())
    }

    async fn group_members(&self, group: &str) -> Result<UserList, ResolveError> {
        self.group_list(group)
    }

    async fn all_users(&self) -> Result<(UserList, &'static str), ResolveError> {
        let state = self.state.read().map_err(|_| poisoned())?;
        Ok((
            state.users.iter().map(|u| Arc::from(u.as_str())).collect(),
            "the membership file's users",
        ))
    }
}

impl FixtureResolver {
    fn group_list(&self, group: &str) -> Result<UserList, ResolveError> {
        let state = self.state.read().map_err(|_| poisoned())?;
        let members = state
            .groups
            .get(group)
            .ok_or_else(|| ResolveError::UnknownSpace(group.to_owned()))?;
        let sorted: BTreeSet<&String> = members.iter().collect();
        Ok(sorted.into_iter().map(|u| Arc::from(u.as_str())).collect())
    }
}

fn poisoned() -> ResolveError {
    ResolveError::Unavailable("membership state lock poisoned".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn directory() -> Directory {
        serde_json::from_str(
            r#"{"users":[{"id":"alice"},{"id":"bob"},{"id":"carol"},{"id":"dan"},{"id":"erin"}],
                "groups":[{"id":"eng","members":["bob","carol"]},{"id":"drop","members":["erin","bob"]}],
                "spaces":[{"id":"s","members":[
                    {"user":"alice","role":"manager"},{"group":"eng","role":"viewer"},
                    {"user":"dan","role":"uploader"},{"group":"drop","role":"uploader"}]}]}"#,
        )
        .unwrap()
    }

    fn names(list: &UserList) -> Vec<&str> {
        list.iter().map(|u| &**u).collect()
    }

    #[tokio::test]
    async fn listers_expand_groups_and_exclude_uploaders() {
        let r = FixtureResolver::new(&directory());
        let l = r.listers("s").await.unwrap();
        // bob is an uploader through `drop` but a viewer through `eng`: the higher role wins.
        assert_eq!(names(&l), ["alice", "bob", "carol"]);
        assert_eq!(
            r.listers("nope").await,
            Err(ResolveError::UnknownSpace("nope".into()))
        );
    }

    #[tokio::test]
    async fn membership_changes_apply_to_later_lookups() {
        let r = FixtureResolver::new(&directory());
        let add = MembershipChange {
            member: Member::User("dan".into()),
            role: Some(Role::Editor),
        };
        assert_eq!(names(&r.apply("s", &add, true).await.unwrap()), ["dan"]);
        assert_eq!(
            names(&r.listers("s").await.unwrap()),
            ["alice", "bob", "carol", "dan"]
        );
        let remove_eng = MembershipChange {
            member: Member::Group("eng".into()),
            role: None,
        };
        assert_eq!(
            names(&r.apply("s", &remove_eng, false).await.unwrap()),
            ["bob", "carol"]
        );
        assert_eq!(names(&r.listers("s").await.unwrap()), ["alice", "dan"]);
    }
}
