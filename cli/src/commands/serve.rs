//! `ringcast serve`: run the controller daemon until SIGINT/SIGTERM.

use anyhow::Context;
use ringcast_controller::{Controller, ControllerConfig};
use std::path::PathBuf;
use std::sync::Arc;

/// Arguments of `ringcast serve`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Policy and daemon configuration.
    #[arg(long, env = "RINGCAST_CONFIG", default_value = "ringcast.toml")]
    config: PathBuf,
    /// Override `server.listen`.
    #[arg(long, env = "RINGCAST_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// Override `server.data_dir`.
    #[arg(long, env = "RINGCAST_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

/// Run `ringcast serve`.
pub fn run(args: Args, json: bool) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RINGCAST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
    let mut config = ControllerConfig::load(&args.config)?;
    if let Some(l) = args.listen {
        config.server.listen = l;
    }
    if let Some(d) = args.data_dir {
        config.server.data_dir = d;
    }
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let handle = Controller::start(config, Arc::new(ringcast_proto::SystemClock)).await?;
        eprintln!(
            "ringcast: serving on http://{} (MQTT {})",
            handle.http_addr(),
            handle.broker_addr()
        );
        wait_for_signal().await;
        eprintln!("ringcast: shutting down");
        handle.shutdown().await;
        anyhow::Ok(())
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
