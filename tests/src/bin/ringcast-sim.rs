//! `ringcast-sim`: a fleet of real Ringcast agents in one process, for the scenario suite and
//! for load. Every device is the real agent library with its own MQTT connection, data
//! directory and installer root, and a sled or in-memory store; `--fail-rate` makes that share
//! of devices fail their release's health check.
//!
//! ```text
//! ringcast-sim --broker mqtt://127.0.0.1:1883 --fleet demo --trust trust.json \
//!              --devices 1000 --rings canary=1%,early=9%,broad=90% --store memory \
//!              --artifact-base http://127.0.0.1:8480 --fail-rate 0.02
//! ```
//! It prints one status line per `--report-every` (devices connected, phases, RSS) and runs
//! until Ctrl-C / SIGTERM, or `--run-for`.

use anyhow::Context;
use clap::Parser;
use ringcast_agent::fleet::{Fleet, StoreKind};
use ringcast_tests::sim::{self, SimOptions};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// N real Ringcast agents in one process.
#[derive(Debug, Parser)]
#[command(name = "ringcast-sim", version, about)]
struct Args {
    /// Broker URL: mqtt://host:port or mqtts://host:port.
    #[arg(long, env = "RINGCAST_SIM_BROKER")]
    broker: String,
    /// Fleet name.
    #[arg(long, default_value = "demo")]
    fleet: String,
    /// Trust root file every device ships with.
    #[arg(long)]
    trust: PathBuf,
    /// Number of devices (used with a percent ring split).
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Ring split: `canary=2,early=3,broad=5` (counts) or `canary=10%,early=30%,broad=60%`.
    #[arg(long, default_value = "canary=10%,early=30%,broad=60%")]
    rings: String,
    /// Device class.
    #[arg(long, default_value = "demo-box")]
    class: String,
    /// Share of devices (0.0–1.0) whose health checks fail.
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Agent store: `sled` (survives a restart of this process) or `memory`.
    #[arg(long, default_value = "memory")]
    store: String,
    /// Data directory for the devices (default: a temp dir removed at exit).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Base URL for relative artifact URLs (the controller's HTTP address).
    #[arg(long)]
    artifact_base: Option<String>,
    /// CA certificate for mqtts://.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Directory holding `{device}.crt` and `{device}.key` (mutual TLS).
    #[arg(long)]
    cert_dir: Option<PathBuf>,
    /// Seconds between status lines.
    #[arg(long, default_value_t = 5.0)]
    report_every: f64,
    /// Stop after this many seconds (default: run until a signal).
    #[arg(long)]
    run_for: Option<f64>,
    /// Print status lines as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = std::env::var("RINGCAST_LOG").unwrap_or_else(|_| "error,rumqttd=off".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringcast-sim: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let rings = sim::parse_rings(&args.rings, args.devices)?;
    let store = match args.store.as_str() {
        "sled" => StoreKind::Sled,
        "memory" => StoreKind::Memory,
        other => anyhow::bail!("--store {other:?}: expected sled or memory (code bad_argument)"),
    };
    if !(0.0..=1.0).contains(&args.fail_rate) {
        anyhow::bail!("--fail-rate must be between 0 and 1 (code bad_argument)");
    }
    let temp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("ringcast-sim-")
                .tempdir()
                .context("creating a temp dir")?;
            temp.path().to_path_buf()
        }
    };
    let opts = SimOptions {
        broker: args.broker.clone(),
        fleet: args.fleet.clone(),
        device_class: args.class.clone(),
        trust_root: args.trust.clone(),
        artifact_base_url: args.artifact_base.clone(),
        dir,
        rings,
        fail_rate: args.fail_rate,
        store,
        ca_file: args.ca_file.clone(),
        cert_dir: args.cert_dir.clone(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(simulate(opts, &args))
}

async fn simulate(opts: SimOptions, args: &Args) -> anyhow::Result<()> {
    let rss_before = sim::rss_bytes().unwrap_or(0);
    let t0 = Instant::now();
    let fleet = Fleet::start(opts.spec())
        .await
        .context("starting the fleet")?;
    let n = fleet.devices().len();
    let failing = fleet.devices().iter().filter(|d| d.failing).count();
    eprintln!(
        "ringcast-sim: {n} agents started in {:.2}s ({failing} set to fail health checks)",
        t0.elapsed().as_secs_f64()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let every = Duration::from_secs_f64(args.report_every.max(0.1));
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let until = args.run_for.map(|s| t0 + Duration::from_secs_f64(s));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = ticker.tick() => {}
        }
        let reports = fleet.statuses();
        let rss = sim::rss_bytes().unwrap_or(0);
        let per_agent = rss.saturating_sub(rss_before) / (n.max(1) as u64);
        let census = sim::census(&reports);
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "t": t0.elapsed().as_secs_f64(), "agents": n,
                    "rss_bytes": rss, "rss_per_agent_bytes": per_agent, "census": census,
                })
            );
        } else {
            let parts: Vec<String> = census.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            println!(
                "[{:7.1}s] agents {n}, rss {:.1} MiB ({:.1} KiB/agent) | {}",
                t0.elapsed().as_secs_f64(),
                rss as f64 / 1048576.0,
                per_agent as f64 / 1024.0,
                parts.join(", ")
            );
        }
        if until.is_some_and(|u| Instant::now() >= u) {
            break;
        }
    }
    fleet.shutdown(Duration::from_secs(20)).await;
    Ok(())
}
