//! `ringcast release submit`: upload the artifact, then the signed release.

use super::common::{block_on, print_json, Conn};
use anyhow::Context;
use ringcast_controller::api::SubmitRequest;
use std::path::PathBuf;

/// Arguments of `ringcast release submit`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    conn: Conn,
    /// The signed release (`ringcast release sign` output).
    release: PathBuf,
    /// The artifact file to upload to the controller's store.
    #[arg(long)]
    artifact: Option<PathBuf>,
    /// Start the rollout at this time (RFC 3339), default now.
    #[arg(long)]
    start_at: Option<jiff::Timestamp>,
    /// A launch: every ring downloads and verifies the release now and activates it from
    /// this time (RFC 3339); `ringcast rollout launch` moves or holds it.
    #[arg(long)]
    activate_at: Option<jiff::Timestamp>,
    /// How a launch's rings activate: `rings` (the first at the launch, each further one
    /// when the one before passes its gate) or `all` (every ring at the launch).
    #[arg(long, value_enum, requires = "activate_at")]
    launch: Option<LaunchArg>,
}

/// `--launch`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LaunchArg {
    Rings,
    All,
}

/// Run `ringcast release submit`.
pub fn run(args: Args, json: bool) -> anyhow::Result<()> {
    let bytes = std::fs::read(&args.release)
        .with_context(|| format!("reading {}", args.release.display()))?;
    let envelope = ringcast_proto::Envelope::from_slice(&bytes)
        .with_context(|| format!("{} is not a release envelope", args.release.display()))?;
    let c = args.conn.client();
    // The signed release says what the artifact is; the controller checks the streamed bytes
    // against it. Read unverified here: the controller verifies the signatures on submit.
    let release = ringcast_proto::Release::parse(&envelope.payload)
        .with_context(|| format!("{} does not hold a release", args.release.display()))?;
    let declared = (release.artifact.sha256.clone(), release.artifact.size);
    let req = SubmitRequest {
        envelope,
        start_at: args.start_at,
        activate_at: args.activate_at,
        launch: args.launch.map(|l| match l {
            LaunchArg::Rings => ringcast_controller::model::LaunchMode::Rings,
            LaunchArg::All => ringcast_controller::model::LaunchMode::All,
        }),
    };
    let (up, resp) = block_on(async {
        let up = match &args.artifact {
            Some(p) => Some(
                c.upload_artifact_file(p, Some((declared.0.as_str(), declared.1)))
                    .await?,
            ),
            None => None,
        };
        let resp = c.submit(&req).await?;
        Ok::<_, ringcast_controller::client::ClientError>((up, resp))
    })??;
    if json {
        return print_json(&serde_json::json!({
            "artifact": up,
            "release": resp.release,
            "rollout": resp.rollout,
            "warnings": resp.warnings,
        }));
    }
    if let Some(u) = up {
        println!(
            "artifact {} ({} bytes) stored at {}",
            u.sha256, u.size, u.url
        );
    }
    println!(
        "release {} submitted; rollout {} is {}",
        resp.release.id, resp.rollout.id, resp.rollout.phase
    );
    for w in &resp.warnings {
        eprintln!("warning: {w}");
    }
    Ok(())
}
