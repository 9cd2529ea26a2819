//! One file per subcommand; each builds its runtime and wires the stages together.

mod bench;
mod replay;
mod run;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;

use crate::config::{BenchCommand, Cli, Command, GatewayArgs, ShapingArgs};
use crate::gateway::GatewayConfig;
use crate::notify::dedup::Dedup;
use crate::notify::throttle::ThrottleConfig;

pub fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Replay(args) => replay::replay(args),
        Command::Bench(BenchCommand::Replay(args)) => bench::replay(args),
        Command::Bench(BenchCommand::Idle(args)) => bench::idle(args),
        Command::Bench(BenchCommand::BareGateway { listen }) => bench::bare_gateway(listen),
    }
}

fn throttle_config(s: &ShapingArgs) -> ThrottleConfig {
    ThrottleConfig {
        rate: s.user_rate,
        burst: s.user_burst,
        max_backlog: s.max_backlog,
    }
}

fn dedup(s: &ShapingArgs) -> Dedup {
    Dedup::new(s.dedup_capacity, s.dedup_ttl)
}

fn gateway_config(g: &GatewayArgs) -> GatewayConfig {
    GatewayConfig {
        send_queue: g.send_queue,
        auth_timeout: g.auth_timeout,
        sse_keepalive: g.sse_keepalive,
        write_timeout: g.write_timeout,
        ws_read_buffer: g.ws_read_buffer,
        ws_write_buffer: g.ws_write_buffer,
        ws_max_write_buffer: g.ws_max_write_buffer,
        ticket_ttl: g.ticket_ttl,
        ..GatewayConfig::default()
    }
}

/// The HS256 secret from the flag, the file, or (announced on stdout) a random one.
fn jwt_secret(g: &GatewayArgs) -> anyhow::Result<Arc<[u8]>> {
    if let Some(secret) = &g.jwt_secret {
        return Ok(Arc::from(secret.as_bytes()));
    }
    if let Some(path) = &g.jwt_secret_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --jwt-secret-file {}", path.display()))?;
        let secret = text.trim();
        anyhow::ensure!(
            !secret.is_empty(),
            "--jwt-secret-file {} is empty",
            path.display()
        );
        return Ok(Arc::from(secret.as_bytes()));
    }
    let mut bytes = [0u8; 24];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    println!("foldercast: no --jwt-secret given; generated one for this run: {secret}");
    Ok(Arc::from(secret.into_bytes()))
}
