//! `ringcast devices list|show|pin|unpin`.

use super::common::{block_on, print_json, table, Conn};
use clap::Subcommand;
use ringcast_controller::model::EventEntry;
use ringcast_proto::{Event, EventKind};

/// Arguments of `ringcast devices`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    command: DevicesCommand,
}

#[derive(Debug, Subcommand)]
enum DevicesCommand {
    /// List devices.
    List {
        /// Only this ring.
        #[arg(long)]
        ring: Option<String>,
        /// Only this phase (`committed`, `reverted`, …, or `unresponsive`).
        #[arg(long)]
        phase: Option<String>,
        /// Only devices reporting for this rollout.
        #[arg(long)]
        rollout: Option<String>,
    },
    /// Show one device, with its recent events newest first (a revert's reason, failing
    /// check and output tail among them).
    Show {
        /// Device id.
        device: String,
    },
    /// Pin a device to a release (hotfix, or hold it back), outside the rings' gates.
    /// Needs an approver token. Ends with `unpin` or the device ring's next rollout.
    Pin {
        /// Device id.
        device: String,
        /// Release id (`{name}-{sequence}`).
        release_id: String,
    },
    /// End a device's pin: it follows its ring again. Needs an approver token.
    Unpin {
        /// Device id.
        device: String,
        /// The product whose pin ends (needed when the device is pinned for several).
        #[arg(long)]
        product: Option<String>,
    },
}

/// `app: ` before a line about one product of a device that runs several.
fn label(product: Option<&str>) -> String {
    product.map(|p| format!("{p}: ")).unwrap_or_default()
}

fn print_pin(p: &ringcast_controller::api::PinView, product: Option<&str>) {
    let l = label(product);
    match &p.release_id {
        Some(r) => println!(
            "pin       {l}{r} ({}, ring {}, by {} at {})",
            p.rollout_id, p.ring, p.by, p.at
        ),
        None => println!(
            "pin       {l}none ({} ended by {} at {}{})",
            p.rollout_id,
            p.by,
            p.at,
            p.ended
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ),
    }
}

/// `s` with control characters other than tab shown escaped (`\u{1b}`), so what a device
/// sent cannot drive the operator's terminal.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() && c != '\t' {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn print_events(events: &[EventEntry]) {
    if events.is_empty() {
        println!("events    none kept");
        return;
    }
    println!("events    {} kept, newest first", events.len());
    for e in events {
        print_event(Some(e.seq), &e.event);
    }
}

/// One event: a line with its number, time, kind and rollout, then its fields (a revert's
/// evidence: reason, check, and every line of its output tail).
fn print_event(seq: Option<u64>, e: &Event) {
    let n = seq.map(|s| format!("#{s} ")).unwrap_or_default();
    let rollout = e
        .rollout_id
        .as_deref()
        .map(|r| format!("  rollout {}", printable(r)))
        .unwrap_or_default();
    println!("  {n}{} {}{rollout}", e.at, e.kind.name());
    let field = |k: &str, v: &str| {
        let mut lines = v.trim_end().lines();
        println!(
            "      {k:<8}{}",
            printable(lines.next().unwrap_or_default())
        );
        for l in lines {
            println!("      {:<8}{}", "", printable(l));
        }
    };
    match &e.kind {
        EventKind::Reverted {
            reason,
            check,
            output,
        } => {
            field("reason", reason);
            if let Some(c) = check {
                field("check", c);
            }
            if let Some(o) = output {
                field("output", o);
            }
        }
        EventKind::Rejected { reason, detail } => {
            field("reason", reason.code());
            field("detail", detail);
        }
        EventKind::DownloadFailed { reason, detail, .. }
        | EventKind::InstallFailed { reason, detail } => {
            field("reason", reason);
            field("detail", detail);
        }
        EventKind::Downloading { received, total } => {
            field("bytes", &format!("{received} of {total}"));
        }
        EventKind::TrustRotated { version } => field("version", &version.to_string()),
        EventKind::Deferred { reason, until } => {
            field("reason", reason);
            field("until", &until.to_string());
        }
        EventKind::DeferHookFailed { detail } => field("detail", detail),
        _ => {}
    }
}

/// Run `ringcast devices …`.
pub fn run(args: Args, json: bool) -> anyhow::Result<()> {
    let c = args.conn.client();
    match args.command {
        DevicesCommand::List {
            ring,
            phase,
            rollout,
        } => {
            let v = block_on(c.devices(ring.as_deref(), phase.as_deref(), rollout.as_deref()))??;
            if json {
                return print_json(&v);
            }
            // A column for the products of devices that run several, only when one is listed.
            let any_products = v.iter().any(|d| !d.products.is_empty());
            let rows: Vec<Vec<String>> = v
                .iter()
                .map(|d| {
                    let multi = !d.products.is_empty();
                    let or_dash = |x: &Option<String>| match x {
                        Some(x) if !multi => x.clone(),
                        _ => "-".into(),
                    };
                    let mut row = vec![
                        d.id.clone(),
                        d.ring.clone().unwrap_or_else(|| "-".into()),
                        format!(
                            "{}{}",
                            or_dash(&d.phase),
                            if d.unresponsive { " (silent)" } else { "" }
                        ),
                        or_dash(&d.current),
                        or_dash(&d.rollout_id),
                        d.last_error.clone().unwrap_or_default(),
                    ];
                    if any_products {
                        row.push(products_cell(&d.products));
                    }
                    row
                })
                .collect();
            let mut headers = vec!["device", "ring", "phase", "current", "rollout", "error"];
            if any_products {
                headers.push("products");
            }
            table(&headers, &rows);
            Ok(())
        }
        DevicesCommand::Show { device } => {
            let d = block_on(c.device(&device))??;
            if json {
                return print_json(&d);
            }
            println!("device    {}", d.id);
            println!("ring      {}", d.ring.as_deref().unwrap_or("-"));
            println!("class     {}", d.device_class.as_deref().unwrap_or("-"));
            let silent = if d.unresponsive {
                " (silent past the timeout)"
            } else {
                ""
            };
            if d.products.is_empty() {
                println!("phase     {}{silent}", d.phase.as_deref().unwrap_or("-"));
                println!("current   {}", d.current.as_deref().unwrap_or("-"));
                println!("rollout   {}", d.rollout_id.as_deref().unwrap_or("-"));
            } else {
                // One line per product: its phase, what it runs, the rollout of the phase.
                for p in &d.products {
                    println!(
                        "product   {}: {}, current {}, rollout {}{}{silent}",
                        p.product,
                        p.phase,
                        p.current.as_deref().unwrap_or("-"),
                        p.rollout_id.as_deref().unwrap_or("-"),
                        p.last_error
                            .as_deref()
                            .map(|e| format!(", error {e}"))
                            .unwrap_or_default()
                    );
                }
            }
            println!(
                "online    {}",
                d.online
                    .map(|o| o.to_string())
                    .unwrap_or_else(|| "-".into())
            );
            println!("last seen {}", d.last_seen);
            if let Some(r) = &d.record.report {
                if let Some(e) = &r.last_error {
                    println!("error     {}: {}", e.reason, e.detail);
                }
            }
            if let Some(p) = &d.pin {
                print_pin(p, None);
            }
            for p in &d.products {
                if let Some(pin) = &p.pin {
                    print_pin(pin, Some(&p.product));
                }
            }
            if d.products.is_empty() {
                if let Some(p) = &d.prediction {
                    print_prediction(p, None);
                }
            }
            for p in &d.products {
                if let Some(pr) = &p.prediction {
                    print_prediction(pr, Some(&p.product));
                }
            }
            match &d.events {
                Some(events) => print_events(events),
                // A controller from before event history: only the newest event is known.
                None => {
                    if let Some(e) = &d.record.last_event {
                        println!("events    (newest only)");
                        print_event(None, e);
                    }
                }
            }
            Ok(())
        }
        DevicesCommand::Pin { device, release_id } => {
            let p = block_on(c.pin(&device, &release_id))??;
            if json {
                return print_json(&p);
            }
            println!("device    {}", p.device);
            print_pin(&p, None);
            Ok(())
        }
        DevicesCommand::Unpin { device, product } => {
            let p = block_on(c.unpin_product(&device, product.as_deref()))??;
            if json {
                return print_json(&p);
            }
            println!("device    {}", p.device);
            print_pin(&p, None);
            Ok(())
        }
    }
}

/// The products of a device that runs several, in one cell: `app:probation 1.2.0; os:…`.
fn products_cell(products: &[ringcast_controller::api::ProductView]) -> String {
    products
        .iter()
        .map(|p| {
            // `current` names the product again (`app 1.2.0`): the version says enough here.
            let version = p
                .current
                .as_deref()
                .map(|c| c.strip_prefix(&format!("{} ", p.product)).unwrap_or(c))
                .unwrap_or("-");
            let error = p
                .last_error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default();
            format!("{}:{} {version}{error}", p.product, p.phase)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The forecast: when the device commits (it counts as updated then), or what it waits for
/// (for one `product` of a device that runs several).
fn print_prediction(p: &ringcast_controller::engine::forecast::Prediction, product: Option<&str>) {
    let place = match (&p.ring, p.step) {
        (Some(r), Some(s)) => format!(", step {s} of ring {r}"),
        _ => String::new(),
    };
    let l = label(product);
    match (p.at, &p.waits_for) {
        (Some(at), _) => println!("update    {l}commits {at} with {}{place}", p.rollout_id),
        (None, Some(w)) => println!("update    {l}{} waits for {w}{place}", p.rollout_id),
        (None, None) => println!("update    {l}{}{place}", p.rollout_id),
    }
    println!("          {}", p.note);
    if let Some(t) = p.published_at {
        println!("          directive {t}");
    }
    if let Some(t) = p.activates_at {
        println!("          activates {t}");
    }
}
