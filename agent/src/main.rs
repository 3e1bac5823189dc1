//! `ringcast-agent --config agent.toml [--once]` and `ringcast-agent status --config agent.toml`.

use anyhow::Context;
use ringcast_agent::config::LogFormat;
use ringcast_agent::{Agent, AgentConfig};
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "\
usage: ringcast-agent --config <agent.toml> [--once] [--broker-url <url>]
       ringcast-agent status --config <agent.toml> [--json]

  --config <file>      configuration (env RINGCAST_AGENT_CONFIG)
  --once               process what is retained, finish what can finish now, exit
  --broker-url <url>   override broker.url (env RINGCAST_BROKER_URL)
  status               print the persisted state report (--json for JSON)
  --help, --version";

/// Parsed command line. Hand-written rather than clap: the agent's size budget (≤ 4 MB
/// stripped) has no room for a general-purpose parser, and these are five flags.
#[derive(Debug, Default)]
struct Cli {
    config: Option<PathBuf>,
    once: bool,
    broker_url: Option<String>,
    status: bool,
    json: bool,
}

enum Parsed {
    Run(Cli),
    Help,
    Version,
}

fn parse(args: impl Iterator<Item = String>) -> Result<Parsed, String> {
    let mut cli = Cli {
        config: std::env::var_os("RINGCAST_AGENT_CONFIG").map(PathBuf::from),
        broker_url: std::env::var("RINGCAST_BROKER_URL").ok(),
        ..Cli::default()
    };
    let mut args = args.peekable();
    while let Some(a) = args.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (a.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            "--config" | "-c" => cli.config = Some(PathBuf::from(value("--config")?)),
            "--broker-url" => cli.broker_url = Some(value("--broker-url")?),
            "--once" => cli.once = true,
            "--json" => cli.json = true,
            "status" => cli.status = true,
            "--help" | "-h" | "help" => return Ok(Parsed::Help),
            "--version" | "-V" => return Ok(Parsed::Version),
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    Ok(Parsed::Run(cli))
}

fn main() -> ExitCode {
    let cli = match parse(std::env::args().skip(1)) {
        Ok(Parsed::Run(cli)) => cli,
        Ok(Parsed::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Version) => {
            println!("ringcast-agent {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("ringcast-agent: error: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e
                .downcast_ref::<ringcast_agent::Error>()
                .map(|e| format!(" [{}]", e.code()))
                .unwrap_or_default();
            eprintln!("ringcast-agent: error{code}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let path = cli
        .config
        .clone()
        .context("--config <agent.toml> is required")?;
    let mut cfg = AgentConfig::load(&path)?;
    if let Some(url) = cli.broker_url {
        cfg.broker.url = url;
        cfg.validate()
            .map_err(|detail| ringcast_agent::Error::Config {
                path: path.clone(),
                detail,
            })?;
    }
    if cli.status {
        return status(&cfg, cli.json);
    }
    init_logging(&cfg);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let agent = Agent::open(cfg)?;
        if cli.once {
            agent.run_once().await?;
            return Ok(());
        }
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down");
            let _ = tx.send(true);
        });
        agent.run(rx).await?;
        Ok(())
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}

fn status(cfg: &AgentConfig, json: bool) -> anyhow::Result<()> {
    let p = cfg.data_dir.join("status.json");
    let bytes = std::fs::read(&p)
        .with_context(|| format!("no status at {} (has the agent run yet?)", p.display()))?;
    if json {
        println!("{}", String::from_utf8_lossy(&bytes));
        return Ok(());
    }
    let r = ringcast_proto::StateReport::parse(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    let name = |r: &Option<ringcast_proto::ReleaseRef>| {
        r.as_ref()
            .map(|r| format!("{} {} (seq {})", r.name, r.version, r.sequence))
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "device:     {} ({}, ring {})",
        r.device, r.device_class, r.ring
    );
    if r.is_multi_product() {
        // One block per product: each has its own phase, slot and rollout.
        for (product, p) in &r.products {
            println!("product:    {product}");
            println!("  phase:      {}", p.phase.as_str());
            println!("  current:    {}", name(&p.current));
            println!("  previous:   {}", name(&p.previous));
            println!("  target:     {}", name(&p.target));
            println!("  rollout:    {}", p.rollout_id.as_deref().unwrap_or("-"));
            if let Some(e) = &p.last_error {
                println!("  last error: {}: {}", e.reason, e.detail);
            }
            if let Some(x) = &p.refused {
                println!(
                    "  refused:    {} ({}): {}",
                    x.rollout_id,
                    x.reason.code(),
                    x.detail
                );
            }
        }
        println!("updated:    {}", r.updated_at);
        return Ok(());
    }
    println!("phase:      {}", r.phase.as_str());
    println!("current:    {}", name(&r.current));
    println!("previous:   {}", name(&r.previous));
    println!("target:     {}", name(&r.target));
    println!("rollout:    {}", r.rollout_id.as_deref().unwrap_or("-"));
    if let Some(e) = &r.last_error {
        println!("last error: {}: {}", e.reason, e.detail);
    }
    println!("updated:    {}", r.updated_at);
    Ok(())
}

fn init_logging(cfg: &AgentConfig) {
    use ringcast_agent::log::{Filter, Logger};
    let spec = std::env::var("RINGCAST_LOG").unwrap_or_else(|_| cfg.log_level.clone());
    Logger::new(Filter::parse(&spec), cfg.log_format == LogFormat::Json).install();
}
