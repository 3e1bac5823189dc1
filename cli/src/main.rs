//! `ringcast`: the release manager's command line and the controller daemon (`ringcast serve`),
//! one module per verb group in [`commands`].

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod commands;

/// Staged, signed software rollouts to device fleets over MQTT.
#[derive(Debug, Parser)]
#[command(name = "ringcast", version, about, long_about = None)]
struct Cli {
    /// Machine-readable JSON output where the output has structure.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate signing keys.
    Key(commands::key::Args),
    /// Create and rotate trust roots (offline, root role).
    Trust(commands::trust::Args),
    /// Sign, verify and submit releases.
    Release(commands::release::Args),
    /// Run the controller daemon.
    Serve(commands::serve::Args),
    /// Inspect and steer rollouts.
    Rollout(commands::rollout::Args),
    /// Inspect devices.
    Devices(commands::devices::Args),
    /// Check the audit log.
    Audit(commands::audit::Args),
    /// Run the whole system locally: broker, controller and a simulated fleet.
    Demo(commands::demo::Args),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version: print as clap renders them.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One clear line, like every other failure (clap's own text starts "error: ").
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("ringcast: error: {first} (see --help)");
            return ExitCode::FAILURE;
        }
    };
    let json = cli.json;
    let result = match cli.command {
        Command::Key(a) => commands::key::run(a, json),
        Command::Trust(a) => commands::trust::run(a, json),
        Command::Release(a) => commands::release::run(a, json),
        Command::Serve(a) => commands::serve::run(a, json),
        Command::Rollout(a) => commands::rollout::run(a, json),
        Command::Devices(a) => commands::devices::run(a, json),
        Command::Audit(a) => commands::audit::run(a, json),
        Command::Demo(a) => commands::demo::run(a, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One clear line: the whole cause chain, reason code included where there is one.
            eprintln!("ringcast: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
