//! `foldercast self-test`: checks a deployment's every dependency, then a round trip.
//!
//! The commonest pain of a push service's operators is setup (the nearest peer's issues are
//! full of it): a Redis that evicts, a topic that does not exist, credentials oCIS refuses, a
//! gateway on another Redis than the consumer. Each check here says ✓ with what it found, or ✗
//! with what is wrong and how to fix it; one that cannot be made is `–` (not a failure). The
//! command takes the same flags as `consume` and `gateway`, so it checks what they will use,
//! and exits non-zero on any ✗.
//!
//! One module per system: [`redis`], [`kafka`], [`nats`], [`ocis`], [`oidc`], and the
//! [`round_trip`] through the bus to a gateway's WebSocket.

pub mod kafka;
pub mod nats;
pub mod ocis;
pub mod oidc;
pub mod redis;
pub mod round_trip;

use std::fmt::Write as _;
use std::time::Duration;

/// How long one network step of a check may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pass,
    Fail,
    /// Not checked (nothing to check with, or not readable here): no failure.
    Skipped,
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// The system: `redis`, `kafka`, `nats`, `ocis`, `oidc`, `round-trip`.
    pub system: &'static str,
    pub status: Status,
    /// What was found, or what is wrong.
    pub what: String,
    /// How to fix it (failures).
    pub fix: Option<String>,
}

impl Check {
    pub fn pass(system: &'static str, what: impl Into<String>) -> Check {
        Check {
            system,
            status: Status::Pass,
            what: what.into(),
            fix: None,
        }
    }

    pub fn fail(system: &'static str, what: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            system,
            status: Status::Fail,
            what: what.into(),
            fix: Some(fix.into()),
        }
    }

    pub fn skipped(system: &'static str, what: impl Into<String>) -> Check {
        Check {
            system,
            status: Status::Skipped,
            what: what.into(),
            fix: None,
        }
    }
}

/// The report, one line per check (and an indented `fix:` line under each failure).
pub fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        let mark = match c.status {
            Status::Pass => "✓",
            Status::Fail => "✗",
            Status::Skipped => "–",
        };
        let _ = writeln!(out, "{mark} {:<10} {}", c.system, c.what);
        if let Some(fix) = &c.fix {
            let _ = writeln!(out, "  {:<10} fix: {fix}", "");
        }
    }
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    let _ = if failed == 0 {
        writeln!(out, "all {} checks passed", checks.len())
    } else {
        writeln!(out, "{failed} of {} checks failed", checks.len())
    };
    out
}

/// Whether any check failed.
pub fn failed(checks: &[Check]) -> bool {
    checks.iter().any(|c| c.status == Status::Fail)
}

/// Runs `step`, or says it took longer than [`STEP_TIMEOUT`].
pub async fn within<T, E: std::fmt::Display>(
    step: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(STEP_TIMEOUT, step).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} s", STEP_TIMEOUT.as_secs())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_marks_each_check_and_says_how_to_fix_failures() {
        let checks = [
            Check::pass("redis", "reachable"),
            Check::fail("kafka", "topic t does not exist", "create it"),
            Check::skipped("oidc", "no --oidc-issuer"),
        ];
        let text = render(&checks);
        assert_eq!(
            text,
            "✓ redis      reachable\n✗ kafka      topic t does not exist\n             fix: create it\n– oidc       no --oidc-issuer\n1 of 3 checks failed\n"
        );
        assert!(failed(&checks));
        assert!(!failed(&checks[..1]));
    }
}
