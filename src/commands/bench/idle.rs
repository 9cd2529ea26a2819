//! Idle-connection memory of the gateway, measured on a child process.

use std::process::ExitCode;

use crate::config::BenchIdleArgs;

pub fn run(args: BenchIdleArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!(
        "bench idle is not written yet ({} connections requested)",
        args.connections
    )
}
