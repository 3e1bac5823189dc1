//! `ringcast rollout list|show|approve|pause|resume|abort|retry|launch`.

use super::common::{bar, block_on, print_json, table, Conn};
use clap::Subcommand;
use ringcast_controller::api::RolloutView;

/// Arguments of `ringcast rollout`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    command: RolloutCommand,
}

#[derive(Debug, Subcommand)]
enum RolloutCommand {
    /// List rollouts.
    List,
    /// Show one rollout, each ring's progress as a bar.
    Show {
        /// Rollout id.
        id: String,
    },
    /// Approve the manual ring a rollout waits for (role approver).
    Approve {
        /// Rollout id.
        id: String,
        /// Approve this ring ahead of time instead.
        #[arg(long)]
        ring: Option<String>,
    },
    /// Pause a rollout (gates still halt it).
    Pause {
        /// Rollout id.
        id: String,
    },
    /// Resume a paused rollout.
    Resume {
        /// Rollout id.
        id: String,
    },
    /// Abort a rollout; rings it reached get `hold`.
    Abort {
        /// Rollout id.
        id: String,
    },
    /// Move a launch (a rollout submitted with --activate-at) or hold it; devices keep what
    /// they staged either way.
    Launch {
        /// Rollout id.
        id: String,
        /// The new launch time (RFC 3339).
        #[arg(long, conflicts_with = "hold", required_unless_present = "hold")]
        at: Option<jiff::Timestamp>,
        /// Hold the launch: nothing activates until a new --at.
        #[arg(long)]
        hold: bool,
    },
    /// Ask the devices whose install failed to try again now (the next attempt), past the
    /// ring's `retries` and backoff.
    Retry {
        /// Rollout id.
        id: String,
        /// Only this ring.
        #[arg(long)]
        ring: Option<String>,
    },
}

/// Run `ringcast rollout …`.
pub fn run(args: Args, json: bool) -> anyhow::Result<()> {
    let c = args.conn.client();
    match args.command {
        RolloutCommand::List => {
            let v = block_on(c.rollouts())??;
            if json {
                return print_json(&v);
            }
            let rows: Vec<Vec<String>> = v
                .iter()
                .map(|r| {
                    vec![
                        r.id.clone(),
                        r.version.clone(),
                        format!("{}{}", r.phase, if r.paused { " (paused)" } else { "" }),
                        r.ring.clone().unwrap_or_else(|| "-".into()),
                        r.created_at.strftime("%Y-%m-%d %H:%M").to_string(),
                    ]
                })
                .collect();
            table(&["rollout", "version", "phase", "ring", "created"], &rows);
            Ok(())
        }
        RolloutCommand::Show { id } => {
            let r = block_on(c.rollout(&id))??;
            if json {
                return print_json(&r);
            }
            show(&r);
            Ok(())
        }
        RolloutCommand::Approve { id, ring } => act(&c, &id, "approve", ring.as_deref(), json),
        RolloutCommand::Pause { id } => act(&c, &id, "pause", None, json),
        RolloutCommand::Resume { id } => act(&c, &id, "resume", None, json),
        RolloutCommand::Abort { id } => act(&c, &id, "abort", None, json),
        RolloutCommand::Launch { id, at, hold: _ } => {
            let r = block_on(c.launch(&id, at))??;
            if json {
                return print_json(&r);
            }
            match r
                .activate_at
                .filter(|_| !r.launch.as_ref().is_some_and(|l| l.held))
            {
                Some(t) => println!("launch: rollout {} activates at {t}", r.id),
                None => println!(
                    "launch: rollout {} is held; devices keep what they staged",
                    r.id
                ),
            }
            Ok(())
        }
        RolloutCommand::Retry { id, ring } => act(&c, &id, "retry", ring.as_deref(), json),
    }
}

fn act(
    c: &ringcast_controller::client::Client,
    id: &str,
    action: &str,
    ring: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let r = block_on(c.act(id, action, ring))??;
    if json {
        return print_json(&r);
    }
    println!(
        "{action}: rollout {} is now {}{}",
        r.id,
        r.phase,
        if r.paused { " (paused)" } else { "" }
    );
    Ok(())
}

fn show(r: &RolloutView) {
    println!("rollout  {}", r.id);
    println!("release  {} (version {})", r.release_id, r.version);
    println!(
        "phase    {}{}",
        r.phase,
        if r.paused { " (paused)" } else { "" }
    );
    if let Some(d) = &r.detail {
        println!("detail   {d}");
    }
    if let Some(a) = r.activate_at {
        println!("activate {a}");
    }
    println!();
    let rows: Vec<Vec<String>> = r
        .rings
        .iter()
        .map(|g| {
            let t = g.tally;
            let total = t.in_ramp.max(t.reported);
            let pct = g
                .percent
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into());
            vec![
                g.name.clone(),
                format!(
                    "{}{}{}",
                    g.status,
                    g.approval
                        .as_ref()
                        .map(|a| format!(" (approved by {})", a.by))
                        .unwrap_or_default(),
                    g.attempt
                        .as_ref()
                        .filter(|a| a.max > 1)
                        .map(|a| format!(" (attempt {}/{})", a.attempt, a.max))
                        .unwrap_or_default()
                ),
                pct,
                format!("{} {}/{}", bar(t.committed, total, 20), t.committed, total),
                g.staged.to_string(),
                t.failed.to_string(),
                t.retrying.to_string(),
                t.pending.to_string(),
                t.deferred.to_string(),
                t.unresponsive.to_string(),
            ]
        })
        .collect();
    super::common::table(
        &[
            "ring",
            "status",
            "ramp",
            "committed",
            "staged",
            "failed",
            "retrying",
            "pending",
            "deferred",
            "silent",
        ],
        &rows,
    );
}
