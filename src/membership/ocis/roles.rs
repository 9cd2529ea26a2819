//! oCIS role names and ids → foldercast roles.
//!
//! The graph API names a grant's role three ways depending on the endpoint and version: a unified
//! role UUID (v1beta1), a legacy role name (v1.0 drives), or, when no known role matches the
//! grant's permission set, only a list of `@libre.graph.permissions.actions`. All three end up
//! here. What matters to foldercast is one bit: can this member list the space's folders? A role
//! that cannot (a file drop / upload-only link or grant) must never learn file names.

use crate::membership::Role;

/// The action that lets a grantee list a folder's children.
const LIST_CHILDREN: &str = "libre.graph/driveItem/children/read";

/// Maps a unified role UUID or a legacy role name. `None` for a role foldercast does not know
/// (the caller then falls back to the grant's actions) and for `Denied`, which grants nothing.
pub fn from_graph_role(role: &str) -> Option<Role> {
    let role = role.trim();
    let mapped = match role.to_ascii_lowercase().as_str() {
        // Unified roles: space roles first, then the item roles a space root may also carry.
        "312c0871-5ef7-4b3a-85b6-0e4074c64049" => Role::Manager, // Manager
        "58c63c02-1d89-4572-916a-870abc5a1b7d" => Role::Editor,  // Space Editor
        "3284f2d5-0070-4ad8-ac40-c247f7c1fb27" => Role::Editor,  // Space Editor without versions
        "a8d5fe5e-96e3-418d-825b-534dbdf22b99" => Role::Viewer,  // Space Viewer
        "fb6c3e19-e378-47e5-b277-9732f9de6e21" => Role::Editor,  // Editor
        "2d00ce52-1fc2-4dbc-8b95-a73b73395f5a" => Role::Editor,  // File Editor
        "b1e2218d-eef8-4d4c-b82d-0f1a1b48f3b5" => Role::Viewer,  // Viewer
        "aa97fe03-7980-45ac-9e50-b325749fd7e6" => Role::Viewer, // Secure Viewer (can list, not download)
        "1c996275-f1c9-4e71-abdf-a42f6495e960" => Role::Uploader, // Editor Lite / Uploader (file drop)
        "63e64e19-8d43-42ec-a738-2b6af2610efa" => return None,    // Denied
        // Legacy names (v1.0 drives, reva's conversions).
        "manager" | "coowner" => Role::Manager,
        "editor"
        | "spaceeditor"
        | "spaceeditor-without-versions"
        | "file-editor"
        | "fileeditor" => Role::Editor,
        "viewer" | "spaceviewer" | "secure-viewer" | "secureviewer" => Role::Viewer,
        "uploader" | "editor-lite" | "editorlite" | "file-drop" => Role::Uploader,
        _ => return None,
    };
    Some(mapped)
}

/// Whether `role` names the `Denied` role, which removes access rather than granting it.
pub fn is_denied(role: &str) -> bool {
    let role = role.trim().to_ascii_lowercase();
    role == "63e64e19-8d43-42ec-a738-2b6af2610efa" || role == "denied"
}

/// A grant that carries only actions: a viewer if it may list children, otherwise a member who
/// may not list (for example upload-only), who receives nothing.
pub fn from_actions<'a>(actions: impl IntoIterator<Item = &'a str>) -> Role {
    let mut can_list = false;
    for action in actions {
        if action.trim() == LIST_CHILDREN {
            can_list = true;
        }
    }
    if can_list {
        Role::Viewer
    } else {
        Role::Uploader
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unified_space_roles() {
        assert_eq!(
            from_graph_role("312c0871-5ef7-4b3a-85b6-0e4074c64049"),
            Some(Role::Manager)
        );
        assert_eq!(
            from_graph_role("58c63c02-1d89-4572-916a-870abc5a1b7d"),
            Some(Role::Editor)
        );
        assert_eq!(
            from_graph_role("3284f2d5-0070-4ad8-ac40-c247f7c1fb27"),
            Some(Role::Editor)
        );
        assert_eq!(
            from_graph_role("A8D5FE5E-96E3-418D-825B-534DBDF22B99"),
            Some(Role::Viewer)
        );
    }

    #[test]
    fn upload_only_roles_cannot_list() {
        let uploader = from_graph_role("1c996275-f1c9-4e71-abdf-a42f6495e960");
        assert_eq!(uploader, Some(Role::Uploader));
        assert!(!uploader.is_some_and(Role::can_list));
    }

    #[test]
    fn legacy_names() {
        assert_eq!(from_graph_role("manager"), Some(Role::Manager));
        assert_eq!(from_graph_role("editor"), Some(Role::Editor));
        assert_eq!(
            from_graph_role("spaceeditor-without-versions"),
            Some(Role::Editor)
        );
        assert_eq!(from_graph_role("viewer"), Some(Role::Viewer));
        assert_eq!(from_graph_role("something-new"), None);
    }

    #[test]
    fn denied_grants_nothing() {
        assert_eq!(
            from_graph_role("63e64e19-8d43-42ec-a738-2b6af2610efa"),
            None
        );
        assert!(is_denied("63e64e19-8d43-42ec-a738-2b6af2610efa"));
        assert!(!is_denied("viewer"));
    }

    #[test]
    fn actions_list_children_or_not() {
        assert_eq!(
            from_actions([
                "libre.graph/driveItem/basic/read",
                "libre.graph/driveItem/children/read"
            ]),
            Role::Viewer
        );
        assert_eq!(
            from_actions(["libre.graph/driveItem/upload/create"]),
            Role::Uploader
        );
        assert_eq!(from_actions([]), Role::Uploader);
    }
}
