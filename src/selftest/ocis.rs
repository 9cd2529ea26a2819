//! oCIS: reachable, the credentials accepted, a space's members readable, a group's members
//! readable. The identity must see every space whose changes it resolves (an admin is not
//! automatically a member of project spaces): a space it cannot read is a space whose
//! changes reach nobody.

use crate::membership::ocis::{GraphClient, GraphError};

use super::{Check, STEP_TIMEOUT};

const SYSTEM: &str = "ocis";

pub async fn check(
    url: &str,
    client: &GraphClient,
    space: Option<&str>,
    group: Option<&str>,
) -> Vec<Check> {
    let mut checks = Vec::new();
    let drives = match ask(client.my_drives()).await {
        Ok(d) => d,
        Err(e) => {
            checks.push(refused(url, &e));
            return checks;
        }
    };
    checks.push(Check::pass(
        SYSTEM,
        format!(
            "{url}: reachable, credentials accepted, {} drive(s) visible",
            drives.len()
        ),
    ));
    let space = space.map(str::to_owned).or_else(|| {
        drives
            .iter()
            .find(|(_, kind)| kind == "project")
            .or(drives.first())
            .map(|(id, _)| id.clone())
    });
    match space {
        Some(space) => match ask(client.space_grants(&space)).await {
            Ok(grants) => checks.push(Check::pass(
                SYSTEM,
                format!("space {space}: {} member grant(s) readable", grants.grants.len()),
            )),
            Err(e) => checks.push(Check::fail(
                SYSTEM,
                format!("space {space}: its members are not readable ({e}): its changes would reach nobody"),
                "grant the identity (a technical user) at least viewer on every space, or use an admin token that sees them",
            )),
        },
        None => checks.push(Check::skipped(
            SYSTEM,
            "no space to read (the identity sees none; name one with --check-space)",
        )),
    }
    let group = match group {
        Some(g) => Some(g.to_owned()),
        None => ask(client.group_ids())
            .await
            .ok()
            .and_then(|g| g.into_iter().next()),
    };
    match group {
        Some(group) => match ask(client.group_members(&group)).await {
            Ok(members) => checks.push(Check::pass(
                SYSTEM,
                format!("group {group}: {} member(s) readable", members.len()),
            )),
            Err(e) => checks.push(Check::fail(
                SYSTEM,
                format!("group {group}: members not readable ({e}): spaces shared with it would miss its members"),
                "let the identity read groups (GET /graph/v1.0/groups/{id}/members): an admin or a user with the directory read permission",
            )),
        },
        None => checks.push(Check::skipped(
            SYSTEM,
            "no group to expand (none listed; name one with --check-group)",
        )),
    }
    checks
}

/// A call's error, or its timeout as oCIS being unavailable.
async fn ask<T>(
    call: impl std::future::Future<Output = Result<T, GraphError>>,
) -> Result<T, GraphError> {
    tokio::time::timeout(STEP_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(GraphError::Unavailable(format!(
                "no answer within {} s",
                STEP_TIMEOUT.as_secs()
            )))
        })
}

fn refused(url: &str, e: &GraphError) -> Check {
    if matches!(e, GraphError::Unauthorized(_)) {
        Check::fail(
            SYSTEM,
            format!("{url} refused the credentials: {e}"),
            "check --ocis-token-file / --ocis-basic-file / --ocis-client-id and its secret (the token may have expired)",
        )
    } else {
        Check::fail(
            SYSTEM,
            format!("cannot use {url}: {e}"),
            "check --ocis-url (the oCIS base URL, e.g. https://ocis.example.com) and that this host reaches it",
        )
    }
}
