//! The `foldercast` binary: parses the command line and hands over to a subcommand.

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match foldercast::config::parse() {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    foldercast::telemetry::init_logging(&cli.log);
    match foldercast::commands::execute(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("foldercast: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
