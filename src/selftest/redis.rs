//! Redis: reachable, version 7 or later, a cluster's slots all covered, nothing evicted,
//! persistence on.
//!
//! Why each matters: the publish scripts use `SET … NX GET` and a cluster uses sharded pub/sub
//! (both Redis 7); an uncovered slot refuses its users' messages; eviction under memory
//! pressure removes histories (clients are then told to refetch) and de-duplication guards (a
//! replayed event could reach a user twice); without persistence a restart loses every history,
//! owed notice, device position and preference.

use redis::aio::MultiplexedConnection;

use super::{Check, within};

const SYSTEM: &str = "redis";

/// Checks standalone Redis at `url`, or each seed node of a cluster.
pub async fn check(standalone: Option<&str>, cluster: &[String]) -> Vec<Check> {
    let mut checks = Vec::new();
    match standalone {
        Some(url) => node(url, false, &mut checks).await,
        None => {
            for url in cluster {
                node(url, true, &mut checks).await;
            }
        }
    }
    checks
}

async fn node(url: &str, cluster: bool, checks: &mut Vec<Check>) {
    let shown = redact(url);
    let mut conn = match connect(url).await {
        Ok(c) => c,
        Err(e) => {
            checks.push(Check::fail(
                SYSTEM,
                format!("cannot reach {shown}: {e}"),
                format!(
                    "check --redis{} and that redis-server listens there and accepts this host",
                    if cluster { "-cluster" } else { "" }
                ),
            ));
            return;
        }
    };
    let server = info(&mut conn, "server").await;
    let version = field(&server, "redis_version").unwrap_or_default();
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major >= 7 {
        checks.push(Check::pass(
            SYSTEM,
            format!("{shown}: reachable, Redis {version}"),
        ));
    } else {
        checks.push(Check::fail(
            SYSTEM,
            format!(
                "{shown}: Redis {version} is older than 7.0: publishing uses SET … NX GET{}",
                if cluster { " and sharded pub/sub" } else { "" }
            ),
            "upgrade to Redis 7 or later",
        ));
    }
    if cluster {
        let text = cmd_text(&mut conn, redis::cmd("CLUSTER").arg("INFO")).await;
        let state = field(&text, "cluster_state")
            .unwrap_or("unknown")
            .to_owned();
        let slots: u32 = field(&text, "cluster_slots_ok")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if state == "ok" && slots == 16384 {
            checks.push(Check::pass(
                SYSTEM,
                format!("{shown}: cluster state ok, all 16384 slots covered"),
            ));
        } else {
            checks.push(Check::fail(
                SYSTEM,
                format!("{shown}: cluster state {state}, {slots} of 16384 slots covered: the users of the others get nothing"),
                "assign every slot to a reachable master (redis-cli --cluster fix HOST:PORT)",
            ));
        }
    }
    checks.push(eviction(&shown, &mut conn).await);
    checks.push(persistence(&shown, &mut conn).await);
}

async fn eviction(shown: &str, conn: &mut MultiplexedConnection) -> Check {
    let (policy, maxmemory) = match (
        config(conn, "maxmemory-policy").await,
        config(conn, "maxmemory").await,
    ) {
        (Ok(p), Ok(m)) => (p, m.parse::<u64>().unwrap_or(0)),
        (Err(e), _) | (_, Err(e)) => {
            return Check::skipped(
                SYSTEM,
                format!(
                    "{shown}: cannot read CONFIG ({e}); make sure maxmemory-policy is noeviction"
                ),
            );
        }
    };
    if policy == "noeviction" {
        Check::pass(SYSTEM, format!("{shown}: maxmemory-policy noeviction"))
    } else if maxmemory == 0 {
        Check::pass(
            SYSTEM,
            format!(
                "{shown}: no maxmemory, so {policy} never evicts (memory grows with users × --stream-max-len)"
            ),
        )
    } else {
        Check::fail(
            SYSTEM,
            format!(
                "{shown}: maxmemory-policy {policy} with maxmemory {maxmemory}: under memory pressure Redis evicts histories (clients are told to refetch) and de-duplication guards (a replayed event could reach a user twice)"
            ),
            "CONFIG SET maxmemory-policy noeviction (and size maxmemory for --stream-max-len entries per user)",
        )
    }
}

async fn persistence(shown: &str, conn: &mut MultiplexedConnection) -> Check {
    let text = info(conn, "persistence").await;
    if field(&text, "aof_enabled") == Some("1") {
        return Check::pass(SYSTEM, format!("{shown}: persistence: AOF on"));
    }
    match config(conn, "save").await {
        Ok(save) if !save.trim().is_empty() => Check::pass(
            SYSTEM,
            format!(
                "{shown}: persistence: RDB snapshots ({save}); a restart loses what came after the last one (clients are told to refetch)"
            ),
        ),
        Ok(_) => Check::fail(
            SYSTEM,
            format!(
                "{shown}: persistence off: a restart loses every history (clients refetch), owed notices, device positions and preferences"
            ),
            "CONFIG SET appendonly yes (and persist it in redis.conf)",
        ),
        Err(e) => Check::skipped(
            SYSTEM,
            format!("{shown}: cannot read CONFIG ({e}); make sure AOF or RDB persistence is on"),
        ),
    }
}

async fn connect(url: &str) -> Result<MultiplexedConnection, String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    within(client.get_multiplexed_async_connection()).await
}

async fn cmd_text(conn: &mut MultiplexedConnection, cmd: &redis::Cmd) -> String {
    within(cmd.query_async::<String>(conn))
        .await
        .unwrap_or_default()
}

async fn info(conn: &mut MultiplexedConnection, section: &str) -> String {
    cmd_text(conn, redis::cmd("INFO").arg(section)).await
}

async fn config(conn: &mut MultiplexedConnection, name: &str) -> Result<String, String> {
    let pair: Vec<String> =
        within(redis::cmd("CONFIG").arg("GET").arg(name).query_async(conn)).await?;
    pair.into_iter()
        .nth(1)
        .ok_or_else(|| format!("CONFIG GET {name} answered nothing"))
}

/// `name:value` from an INFO text.
fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
}

/// A URL without its password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://…@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_fields_and_redaction() {
        let text = "# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n";
        assert_eq!(field(text, "redis_version"), Some("7.0.15"));
        assert_eq!(field(text, "redis"), None);
        assert_eq!(redact("redis://:secret@host:6379"), "redis://…@host:6379");
        assert_eq!(redact("redis://host:6379"), "redis://host:6379");
    }
}
