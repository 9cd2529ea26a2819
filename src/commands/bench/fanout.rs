//! Gateway fan-out (placeholder replaced below).
use std::process::ExitCode;
pub fn run(_args: crate::config::BenchFanoutArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("bench fanout: not built yet")
}
