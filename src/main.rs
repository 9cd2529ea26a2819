//! The `foldercast` binary: parses the command line and hands over to a subcommand.

use std::process::ExitCode;

/// mimalloc rather than glibc's allocator: a delivery allocates a few small buffers (the parsed
/// Redis reply, the frame) that are freed on another thread, and glibc spent about 17 % of the
/// gateway's CPU on them (`docs/benchmarks.md`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    foldercast::allocator::keep_freed_memory();
    let cli = match foldercast::config::parse() {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    foldercast::telemetry::init_logging_as(&cli.log, cli.log_format);
    match foldercast::commands::execute(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("foldercast: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
