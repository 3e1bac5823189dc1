//! `ringcast demo`: the whole system in one process (see [`ringcast::demo::show`]).

use anyhow::Context;
use ringcast::demo::show::{self, Options};
use ringcast::demo::DemoError;
use std::io::IsTerminal;
use std::time::Duration;

/// Arguments of `ringcast demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Number of simulated devices (real agents, one MQTT connection each).
    #[arg(long, default_value_t = 50)]
    pub devices: usize,
    /// Bake time of each ring step, e.g. `2s` (the default keeps the whole demo near 15 s).
    #[arg(long, default_value = "1500ms")]
    pub bake: ringcast_proto::Dur,
    /// Print plain lines even on a terminal.
    #[arg(long)]
    pub plain: bool,
}

/// Run `ringcast demo`.
pub fn run(args: Args, json: bool) -> anyhow::Result<()> {
    // The agents and the controller log through tracing; the demo's own output is the
    // show. Only errors are logged unless RINGCAST_LOG asks for more.
    let filter = std::env::var("RINGCAST_LOG").unwrap_or_else(|_| "error,rumqttd=off".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let opts = Options {
        devices: args.devices,
        bake: args.bake.get(),
        tty: !args.plain && !json && std::io::stdout().is_terminal(),
        progress_to_stderr: json,
        ..Options::default()
    };
    let summary = rt.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\nringcast demo: Ctrl-C — stopping agents and controller, removing the temp dir …");
                let _ = stop_tx.send(true);
            }
        });
        show::run(opts, stop_rx).await
    });
    // Agents' last tasks (and the embedded broker, which has no shutdown) go with the runtime.
    rt.shutdown_timeout(Duration::from_secs(2));
    let summary = match summary {
        Ok(s) => s,
        Err(DemoError::Interrupted) => anyhow::bail!("interrupted (code interrupted)"),
        Err(e) => anyhow::bail!("demo failed: {e} (code {})", e.code()),
    };
    if json {
        let releases: Vec<_> = summary
            .releases
            .iter()
            .map(|r| {
                serde_json::json!({
                    "version": r.version, "outcome": r.outcome, "rings_reached": r.rings_reached,
                    "committed": r.committed, "reverted": r.reverted, "seconds": r.seconds,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "devices": summary.devices, "releases": releases,
                "problems": summary.problems, "ok": summary.problems.is_empty(),
            })
        );
    } else {
        print!("{}", summary.table());
    }
    if summary.problems.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "the demo did not behave as described: {} problem(s) (code demo_failed)",
            summary.problems.len()
        )
    }
}
