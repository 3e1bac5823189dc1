//! `ringcast release sign|verify|submit`.
//!
//! `sign` turns a release spec (TOML: the manifest's fields without `artifact.sha256` and
//! `artifact.size`) and the artifact file into a signed release envelope; `verify` checks a
//! release envelope exactly as a device would (signatures at the release role's threshold,
//! trust root and release expiry) and shows what it contains. The spec format is documented in
//! `docs/signing.md`.

use anyhow::{bail, Context};
use clap::Subcommand;
use ringcast_controller::keyfile;
use ringcast_proto::envelope::RELEASE_TYPE;
use ringcast_proto::release::{Artifact, ArtifactFormat, Health, Install};
use ringcast_proto::trust::RoleSpec;
use ringcast_proto::{verify_release, Dur, Envelope, KeyId, Release, TrustRoot};
use serde::{Deserialize, Deserializer};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Arguments of `ringcast release`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: ReleaseCommand,
}

#[derive(Debug, Subcommand)]
enum ReleaseCommand {
    /// Sign a release: spec TOML + artifact file → signed release envelope (release role).
    Sign(SignArgs),
    /// Verify a signed release against a trust root, as devices do, and show its contents.
    Verify(VerifyArgs),
    /// Submit a signed release and its artifact to the controller.
    Submit(super::release_submit::Args),
}

/// Arguments of `ringcast release sign`.
#[derive(Debug, clap::Args)]
pub struct SignArgs {
    /// Private release key (PKCS#8 PEM, mode 0600).
    #[arg(long, value_name = "KEY")]
    key: PathBuf,
    /// Release spec (TOML): the manifest's fields except artifact.sha256 and artifact.size.
    #[arg(long, value_name = "TOML")]
    spec: PathBuf,
    /// The artifact file; its SHA-256 and size are computed by streaming it.
    #[arg(long, value_name = "FILE")]
    artifact: PathBuf,
    /// Artifact URL, overriding the spec's artifact.url. Default: /artifacts/sha256/{sha256},
    /// relative to each agent's configured artifact base (the controller serves that path).
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// Where to write the signed release (JSON envelope).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

/// Arguments of `ringcast release verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Trust root file (self-signed by its root role threshold).
    #[arg(long, value_name = "FILE")]
    trust: PathBuf,
    /// Signed release file.
    #[arg(value_name = "RELEASE")]
    release: PathBuf,
    /// Judge expiry at this instant (RFC 3339, e.g. 2026-11-23T00:00:00Z) instead of now.
    #[arg(long, value_name = "RFC3339")]
    at: Option<String>,
    /// Clock skew to allow when judging expiry (devices use their configured skew).
    #[arg(long, value_name = "DURATION", default_value = "0s")]
    skew: String,
}

/// Run `ringcast release …`.
pub fn run(args: Args, json: bool) -> anyhow::Result<()> {
    match args.command {
        ReleaseCommand::Sign(a) => sign(a, json),
        ReleaseCommand::Verify(a) => verify(a, json),
        ReleaseCommand::Submit(a) => super::release_submit::run(a, json),
    }
}

/// The release spec file: a manifest without the fields computed from the artifact.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    name: String,
    version: semver::Version,
    sequence: u64,
    rollback_floor: u64,
    #[serde(default, deserialize_with = "opt_timestamp")]
    issued_at: Option<jiff::Timestamp>,
    #[serde(default, deserialize_with = "opt_timestamp")]
    expires_at: Option<jiff::Timestamp>,
    compatible: Vec<String>,
    artifact: SpecArtifact,
    install: Install,
    health: Health,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecArtifact {
    #[serde(default)]
    url: Option<String>,
    format: ArtifactFormat,
}

/// Accept both a TOML datetime (`issued_at = 2026-11-23T00:00:00Z`) and a quoted RFC 3339
/// string: people write either, and both mean the same instant.
fn opt_timestamp<'de, D: Deserializer<'de>>(d: D) -> Result<Option<jiff::Timestamp>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Toml(toml::value::Datetime),
        Text(String),
    }
    let text = match Either::deserialize(d)? {
        Either::Toml(dt) => dt.to_string(),
        Either::Text(s) => s,
    };
    text.parse::<jiff::Timestamp>().map(Some).map_err(|e| {
        serde::de::Error::custom(format!(
            "{text:?} is not an RFC 3339 instant with a UTC offset (e.g. 2026-11-23T00:00:00Z): {e}"
        ))
    })
}

/// Stream a file through SHA-256 in 64 KiB reads: (lowercase hex digest, size).
fn hash_file(path: &Path) -> anyhow::Result<(String, u64)> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("io: opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("io: reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex::encode(h.finalize()), size))
}

/// A release envelope goes inside a directive envelope, base64 twice over (×4/3 each time), and
/// the directive must stay within the 64 KiB envelope limit; refuse a release that cannot fit.
const MAX_RELEASE_ENVELOPE: usize = 44 * 1024;

fn sign(a: SignArgs, json: bool) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.spec)
        .with_context(|| format!("io: reading {}", a.spec.display()))?;
    let spec: Spec = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("malformed: {}: {}", a.spec.display(), one_line(&e)))?;
    let key = keyfile::load_secret_key(&a.key)?;
    let (sha256, size) = hash_file(&a.artifact)?;
    let url = a
        .url
        .or(spec.artifact.url)
        .unwrap_or_else(|| ringcast_controller::artifacts::url_path(&sha256));
    let release = Release {
        name: spec.name,
        version: spec.version,
        sequence: spec.sequence,
        rollback_floor: spec.rollback_floor,
        issued_at: match spec.issued_at {
            Some(t) => t,
            None => now_seconds(),
        },
        expires_at: spec.expires_at,
        compatible: spec.compatible,
        artifact: Artifact {
            url,
            sha256,
            size,
            format: spec.artifact.format,
        },
        install: spec.install,
        health: spec.health,
    };
    release
        .validate()
        .with_context(|| format!("release spec {}", a.spec.display()))?;
    let env = release.sign(&[&key]);
    let bytes = env.to_vec_pretty();
    if env.to_vec().len() > MAX_RELEASE_ENVELOPE {
        bail!(
            "too_large: the signed release is {} bytes; over {MAX_RELEASE_ENVELOPE} it cannot fit in a 64 KiB directive",
            env.to_vec().len()
        );
    }
    super::trust::write_doc(&a.out, &bytes)?;
    if json {
        let v = serde_json::json!({
            "file": a.out,
            "name": release.name,
            "version": release.version.to_string(),
            "sequence": release.sequence,
            "sha256": release.artifact.sha256,
            "size": release.artifact.size,
            "url": release.artifact.url,
            "signed_by": [key.key_id().as_str()],
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "signed {} {} (sequence {}) with {}: sha256 {} size {} url {} -> {}",
            release.name,
            release.version,
            release.sequence,
            &key.key_id().as_str()[..12],
            release.artifact.sha256,
            release.artifact.size,
            release.artifact.url,
            a.out.display()
        );
    }
    Ok(())
}

/// Now, in whole seconds (sub-second precision in a manifest only adds noise).
fn now_seconds() -> jiff::Timestamp {
    let now = jiff::Timestamp::now();
    now.round(jiff::Unit::Second).unwrap_or(now)
}

/// TOML errors span several lines (with a source excerpt); the CLI prints one.
fn one_line(e: &toml::de::Error) -> String {
    let mut msg = e.message().to_owned();
    if let Some(span) = e.span() {
        msg = format!("{msg} (at byte {})", span.start);
    }
    msg.replace('\n', " ")
}

/// Key ids of the listed release keys whose signatures verify (each counted once).
fn valid_signers(env: &Envelope, trust: &TrustRoot) -> Vec<KeyId> {
    let mut out: Vec<KeyId> = Vec::new();
    for s in &env.signatures {
        let Ok(id) = KeyId::parse(&s.keyid) else {
            continue;
        };
        if out.contains(&id) || !trust.roles.release.keyids.contains(&id) {
            continue;
        }
        let single = Envelope {
            payload_type: env.payload_type.clone(),
            payload: env.payload.clone(),
            signatures: vec![s.clone()],
        };
        let spec = RoleSpec {
            keyids: vec![id.clone()],
            threshold: 1,
        };
        if single.verify(RELEASE_TYPE, trust, &spec).is_ok() {
            out.push(id);
        }
    }
    out
}

fn verify(a: VerifyArgs, json: bool) -> anyhow::Result<()> {
    let trust = super::trust::load_trust(&a.trust)?;
    let bytes = super::trust::read_envelope_file(&a.release)?;
    let at = match &a.at {
        Some(s) => s.parse::<jiff::Timestamp>().map_err(|e| {
            anyhow::anyhow!("malformed: --at {s:?} is not an RFC 3339 instant: {e}")
        })?,
        None => jiff::Timestamp::now(),
    };
    let skew: Dur = a.skew.parse().context("--skew")?;
    let file = a.release.display();
    let env = Envelope::from_slice(&bytes).with_context(|| file.to_string())?;
    let release =
        verify_release(&trust, &env, at, skew.signed()).with_context(|| file.to_string())?;
    let signers = valid_signers(&env, &trust);
    if json {
        let v = serde_json::json!({
            "valid": true,
            "name": release.name,
            "version": release.version.to_string(),
            "sequence": release.sequence,
            "rollback_floor": release.rollback_floor,
            "issued_at": release.issued_at,
            "expires_at": release.expires_at,
            "compatible": release.compatible,
            "sha256": release.artifact.sha256,
            "size": release.artifact.size,
            "url": release.artifact.url,
            "signed_by": signers,
            "trust_version": trust.version(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{file}: valid (trust root version {})", trust.version());
        println!("  name            {}", release.name);
        println!("  version         {}", release.version);
        println!("  sequence        {}", release.sequence);
        println!("  rollback_floor  {}", release.rollback_floor);
        println!("  issued_at       {}", release.issued_at);
        if let Some(e) = release.expires_at {
            println!("  expires_at      {e}");
        }
        println!("  compatible      {}", release.compatible.join(", "));
        println!("  sha256          {}", release.artifact.sha256);
        println!("  size            {}", release.artifact.size);
        println!("  url             {}", release.artifact.url);
        for s in &signers {
            println!("  signed by       {s}");
        }
    }
    Ok(())
}

/// Parse a spec from text (shared with the tests).
#[cfg(test)]
fn parse_spec(text: &str) -> Result<Spec, toml::de::Error> {
    toml::from_str(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"
name = "app"
version = "1.4.0"
sequence = 14
rollback_floor = 12
issued_at = 2026-11-23T00:00:00Z
expires_at = "2027-11-23T00:00:00Z"
compatible = ["sensor-v2"]

[artifact]
format = "tar.gz"

[install]
kind = "bundle"

[health]
probation = "5m"
interval = "10s"
failures_to_revert = 3

[[health.checks]]
name = "app-alive"
kind = "command"
command = ["/bin/true"]
timeout = "5s"
"#;

    #[test]
    fn spec_accepts_toml_datetimes_and_strings() {
        let s = parse_spec(SPEC).unwrap();
        assert_eq!(
            s.issued_at.unwrap(),
            "2026-11-23T00:00:00Z".parse::<jiff::Timestamp>().unwrap()
        );
        assert!(s.expires_at.is_some());
        assert!(s.artifact.url.is_none());
        assert_eq!(s.health.checks.len(), 1);
    }

    #[test]
    fn spec_rejects_unknown_and_computed_fields() {
        let with_sha = SPEC.replace(
            "format = \"tar.gz\"",
            "format = \"tar.gz\"\nsha256 = \"00\"",
        );
        assert!(parse_spec(&with_sha).is_err());
        let extra = format!("surprise = 1\n{SPEC}");
        assert!(parse_spec(&extra).is_err());
        let local = SPEC.replace("2026-11-23T00:00:00Z\n", "2026-11-23T00:00:00\n");
        assert!(parse_spec(&local).is_err(), "an instant needs an offset");
    }

    #[test]
    fn shipped_example_spec_parses() {
        let text = include_str!("../../../deploy/release.example.toml");
        parse_spec(text).unwrap();
    }
}
