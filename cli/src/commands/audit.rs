//! `ringcast audit verify`: check the hash chain, from the sled database (controller stopped)
//! or through the API.

use super::common::{block_on, print_json, Conn};
use anyhow::Context;
use clap::Subcommand;
use std::path::PathBuf;

/// Arguments of `ringcast audit`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Verify the hash chain; names the first bad entry.
    Verify {
        /// Read the controller's data directory directly (the controller must be stopped).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

/// Run `ringcast audit …`.
pub fn run(args: Args, json: bool) -> anyhow::Result<()> {
    match args.command {
        AuditCommand::Verify { data_dir } => {
            let raw = match data_dir {
                Some(d) => {
                    let path = d.join("ringcast.sled");
                    anyhow::ensure!(
                        path.exists(),
                        "no controller database at {}",
                        path.display()
                    );
                    let db = ringcast_controller::store::open_sled(&path, Some(500)).with_context(
                        || format!("opening {} (is the controller running?)", path.display()),
                    )?;
                    ringcast_controller::audit::export(&db.open_tree("audit")?)?
                }
                None => block_on(args.conn.client().audit())??,
            };
            match ringcast_controller::audit::verify(&raw) {
                Ok(entries) => {
                    if json {
                        print_json(&serde_json::json!({"ok": true, "entries": entries.len()}))?;
                    } else {
                        println!("audit log intact: {} entries", entries.len());
                    }
                    Ok(())
                }
                Err(b) => {
                    if json {
                        print_json(
                            &serde_json::json!({"ok": false, "entry": b.seq, "why": b.why}),
                        )?;
                    }
                    Err(b.into())
                }
            }
        }
    }
}
