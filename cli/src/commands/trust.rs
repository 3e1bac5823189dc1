//! `ringcast trust init|rotate`: create and rotate trust roots (offline, root role).
//!
//! A rotation is checked with the same rule devices apply ([`TrustRoot::rotate`]) before the
//! file is written, so an operator learns at the signing table, not from a fleet that silently
//! refuses the new root, that a threshold is missing.

use anyhow::{bail, Context};
use clap::Subcommand;
use ringcast_controller::keyfile::{self, Overwrite};
use ringcast_proto::envelope::TRUST_TYPE;
use ringcast_proto::trust::{RoleSpec, Roles, TrustDoc};
use ringcast_proto::{Dur, Envelope, KeyId, PublicKey, Role, Rotation, SecretKey, TrustRoot};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Arguments of `ringcast trust`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: TrustCommand,
}

#[derive(Debug, Subcommand)]
enum TrustCommand {
    /// Create the first trust root (version 1 by default), self-signed by root keys.
    Init(InitArgs),
    /// Create the next trust root, signed by old AND new root keys, checked as devices will.
    Rotate(RotateArgs),
}

/// Arguments of `ringcast trust init`.
#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Public key file(s) (SPKI PEM or JSON) of the root role. Repeat the flag or list several.
    #[arg(long = "root", value_name = "PUB", num_args = 1.., required = true)]
    root: Vec<PathBuf>,
    /// Public key file(s) of the release role (signs release manifests).
    #[arg(long = "release", value_name = "PUB", num_args = 1.., required = true)]
    release: Vec<PathBuf>,
    /// Public key file(s) of the controller role (signs directives).
    #[arg(long = "controller", value_name = "PUB", num_args = 1.., required = true)]
    controller: Vec<PathBuf>,
    /// Role threshold as ROLE=N (e.g. root=2); repeatable. Roles not named get threshold 1.
    #[arg(long = "threshold", value_name = "ROLE=N")]
    threshold: Vec<String>,
    /// How long the trust root stays valid, e.g. 365d or 8760h.
    #[arg(long, value_name = "DURATION", default_value = "365d")]
    expires: String,
    /// Version number of this trust root.
    #[arg(long, value_name = "N", default_value_t = 1)]
    version: u64,
    /// Private root key file(s) (PKCS#8 PEM, mode 0600) to sign with; at least the root threshold.
    #[arg(long = "sign", value_name = "KEY", num_args = 1.., required = true)]
    sign: Vec<PathBuf>,
    /// Where to write the signed trust root (JSON envelope).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

/// Arguments of `ringcast trust rotate`.
#[derive(Debug, clap::Args)]
pub struct RotateArgs {
    /// The trust root devices trust now.
    #[arg(long, value_name = "FILE")]
    from: PathBuf,
    /// New root role key(s); if absent the root role is kept as it is.
    #[arg(long = "root", value_name = "PUB", num_args = 1..)]
    root: Vec<PathBuf>,
    /// New release role key(s); if absent the release role is kept.
    #[arg(long = "release", value_name = "PUB", num_args = 1..)]
    release: Vec<PathBuf>,
    /// New controller role key(s); if absent the controller role is kept.
    #[arg(long = "controller", value_name = "PUB", num_args = 1..)]
    controller: Vec<PathBuf>,
    /// Role threshold as ROLE=N; repeatable. Roles not named keep their current threshold.
    #[arg(long = "threshold", value_name = "ROLE=N")]
    threshold: Vec<String>,
    /// How long the new trust root stays valid, counted from now.
    #[arg(long, value_name = "DURATION", default_value = "365d")]
    expires: String,
    /// Version of the new root; defaults to the current version + 1.
    #[arg(long, value_name = "N")]
    version: Option<u64>,
    /// Private key files to sign with: a threshold of the OLD root keys and of the NEW ones.
    #[arg(long = "sign", value_name = "KEY", num_args = 1.., required = true)]
    sign: Vec<PathBuf>,
    /// Where to write the new signed trust root.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

/// Run `ringcast trust …`.
pub fn run(args: Args, json: bool) -> anyhow::Result<()> {
    match args.command {
        TrustCommand::Init(a) => init(a, json),
        TrustCommand::Rotate(a) => rotate(a, json),
    }
}

/// Read an envelope file, never more than one byte past the envelope limit: a multi-gigabyte
/// file passed by mistake is refused (as `too_large`, by the parser) without being slurped.
pub(crate) fn read_envelope_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path).with_context(|| format!("io: reading {}", path.display()))?;
    let mut bytes = Vec::new();
    f.take(ringcast_proto::limits::MAX_ENVELOPE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("io: reading {}", path.display()))?;
    Ok(bytes)
}

/// Read and verify a self-signed trust root file (its own root threshold must sign it).
pub(crate) fn load_trust(path: &Path) -> anyhow::Result<TrustRoot> {
    let bytes = read_envelope_file(path)?;
    TrustRoot::from_bytes_self_signed(&bytes)
        .with_context(|| format!("trust root {}", path.display()))
}

/// Write a JSON document crash-safely (replacing an older file of the same name).
pub(crate) fn write_doc(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    keyfile::write_atomic(path, bytes, 0o644, Overwrite::Allow)?;
    Ok(())
}

/// Load private keys, refusing to list the same key twice (it would count once anyway).
pub(crate) fn load_signers(paths: &[PathBuf]) -> anyhow::Result<Vec<SecretKey>> {
    let mut keys: Vec<SecretKey> = Vec::new();
    for p in paths {
        let k = keyfile::load_secret_key(p)?;
        if keys.iter().any(|o| o.key_id() == k.key_id()) {
            bail!(
                "duplicate_key: {} is the same key ({}) as another --sign file; a key counts once toward a threshold",
                p.display(),
                k.key_id()
            );
        }
        keys.push(k);
    }
    Ok(keys)
}

fn parse_thresholds(specs: &[String]) -> anyhow::Result<BTreeMap<&'static str, u32>> {
    let mut out = BTreeMap::new();
    for s in specs {
        let (role, n) = s
            .split_once('=')
            .with_context(|| format!("malformed: --threshold {s:?} is not ROLE=N (e.g. root=2)"))?;
        let role: Role = role.trim().parse()?;
        let n: u32 = n.trim().parse().ok().filter(|n| *n >= 1).with_context(|| {
            format!("malformed: --threshold {s:?}: N must be a whole number ≥ 1")
        })?;
        if out.insert(role.as_str(), n).is_some() {
            bail!("malformed: --threshold for {} given twice", role.as_str());
        }
    }
    Ok(out)
}

fn parse_expiry(s: &str) -> anyhow::Result<jiff::Timestamp> {
    let d: Dur = s.parse().context("--expires")?;
    // Whole seconds: the expiry is read by people and compared by devices, not timed.
    jiff::Timestamp::now()
        .checked_add(d.signed())
        .and_then(|t| t.round(jiff::Unit::Second))
        .with_context(|| format!("malformed: --expires {s} is out of range"))
}

/// Key ids of the role, in the order given, with the keys they define.
fn role_keys(
    name: &str,
    paths: &[PathBuf],
    keys: &mut BTreeMap<KeyId, PublicKey>,
) -> anyhow::Result<Vec<KeyId>> {
    let mut ids = Vec::new();
    for p in paths {
        let vk = keyfile::load_public_key(p)?;
        let id = KeyId::of(&vk);
        if ids.contains(&id) {
            bail!(
                "malformed: --{name} lists key {id} twice ({} repeats it)",
                p.display()
            );
        }
        keys.insert(id.clone(), PublicKey::from_verifying(&vk));
        ids.push(id);
    }
    Ok(ids)
}

fn sign_doc(doc: &TrustDoc, signers: &[SecretKey]) -> anyhow::Result<(TrustRoot, Envelope)> {
    let root = TrustRoot::from_doc(doc.clone()).context("trust root")?;
    let payload = serde_json::to_vec(doc)?;
    let refs: Vec<&SecretKey> = signers.iter().collect();
    Ok((root, Envelope::sign(TRUST_TYPE, payload, &refs)))
}

fn short(id: &KeyId) -> &str {
    &id.as_str()[..12]
}

fn describe_role(r: &RoleSpec) -> String {
    let ids: Vec<&str> = r.keyids.iter().map(short).collect();
    format!("{} of [{}]", r.threshold, ids.join(", "))
}

fn report(root: &TrustRoot, env: &Envelope, out: &Path, json: bool) -> anyhow::Result<()> {
    let signed_by: Vec<&str> = env.signatures.iter().map(|s| s.keyid.as_str()).collect();
    if json {
        let v = serde_json::json!({
            "file": out,
            "version": root.version(),
            "expires_at": root.doc.expires_at,
            "roles": root.roles,
            "signed_by": signed_by,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "trust root version {} (expires {}) written to {}",
            root.version(),
            root.doc.expires_at,
            out.display()
        );
        for (name, r) in [
            ("root", &root.roles.root),
            ("release", &root.roles.release),
            ("controller", &root.roles.controller),
        ] {
            println!("  {name:<10} {}", describe_role(r));
        }
        let shorts: Vec<&str> = signed_by.iter().map(|s| &s[..s.len().min(12)]).collect();
        println!("  signed by  {}", shorts.join(", "));
    }
    Ok(())
}

fn init(a: InitArgs, json: bool) -> anyhow::Result<()> {
    let th = parse_thresholds(&a.threshold)?;
    let mut keys = BTreeMap::new();
    let root = role_keys("root", &a.root, &mut keys)?;
    let release = role_keys("release", &a.release, &mut keys)?;
    let controller = role_keys("controller", &a.controller, &mut keys)?;
    let t = |r: &str| th.get(r).copied().unwrap_or(1);
    let doc = TrustDoc {
        version: a.version,
        expires_at: parse_expiry(&a.expires)?,
        keys,
        roles: Roles {
            root: RoleSpec {
                keyids: root,
                threshold: t("root"),
            },
            release: RoleSpec {
                keyids: release,
                threshold: t("release"),
            },
            controller: RoleSpec {
                keyids: controller,
                threshold: t("controller"),
            },
        },
    };
    let signers = load_signers(&a.sign)?;
    for s in &signers {
        if !doc.roles.root.keyids.contains(s.key_id()) {
            bail!(
                "unknown_key: --sign key {} is not a root key of this trust root; sign with the private keys of --root",
                s.key_id()
            );
        }
    }
    let (root, env) = sign_doc(&doc, &signers)?;
    // The same check an agent makes on its initial root.
    let bytes = env.to_vec_pretty();
    let back = TrustRoot::from_bytes_self_signed(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: {} (the root role needs {} distinct signatures)",
            e.reason,
            e.detail,
            describe_role(&root.roles.root)
        )
    })?;
    write_doc(&a.out, &bytes)?;
    report(&back, &env, &a.out, json)
}

fn rotate(a: RotateArgs, json: bool) -> anyhow::Result<()> {
    let old = load_trust(&a.from)?;
    let th = parse_thresholds(&a.threshold)?;
    let mut keys = BTreeMap::new();
    let mut role =
        |name: &str, paths: &[PathBuf], current: &RoleSpec| -> anyhow::Result<RoleSpec> {
            let keyids = if paths.is_empty() {
                for id in &current.keyids {
                    if let Some(pk) = old.doc.keys.get(id) {
                        keys.insert(id.clone(), pk.clone());
                    }
                }
                current.keyids.clone()
            } else {
                role_keys(name, paths, &mut keys)?
            };
            Ok(RoleSpec {
                keyids,
                threshold: th.get(name).copied().unwrap_or(current.threshold),
            })
        };
    let roles = Roles {
        root: role("root", &a.root, &old.roles.root)?,
        release: role("release", &a.release, &old.roles.release)?,
        controller: role("controller", &a.controller, &old.roles.controller)?,
    };
    let version = a.version.unwrap_or(old.version().saturating_add(1));
    if version <= old.version() {
        bail!(
            "trust_rollback: --version {version} is not above the current version {}",
            old.version()
        );
    }
    let doc = TrustDoc {
        version,
        expires_at: parse_expiry(&a.expires)?,
        keys,
        roles,
    };
    let signers = load_signers(&a.sign)?;
    for s in &signers {
        let id = s.key_id();
        if !old.roles.root.keyids.contains(id) && !doc.roles.root.keyids.contains(id) {
            bail!(
                "unknown_key: --sign key {id} is neither an old nor a new root key; it cannot count toward the rotation"
            );
        }
    }
    let (next, env) = sign_doc(&doc, &signers)?;
    // Exactly the rule devices apply to a root published on the trust topic.
    match old.rotate(&env, jiff::Timestamp::now(), jiff::SignedDuration::ZERO) {
        Ok(Rotation::Accepted(_)) => {}
        Ok(Rotation::Unchanged) => {
            bail!("trust_rollback: the new root is identical to the old one")
        }
        Err(e) => {
            let which = if e.detail.starts_with("old root keys") {
                format!(
                    "the OLD root threshold is not met: sign with {} from {}",
                    describe_role(&old.roles.root),
                    a.from.display()
                )
            } else if e.detail.starts_with("new root keys") {
                format!(
                    "the NEW root threshold is not met: sign with {}",
                    describe_role(&next.roles.root)
                )
            } else {
                String::from("devices would refuse it")
            };
            bail!(
                "{}: devices trusting version {} would refuse version {}: {which} ({})",
                e.reason,
                old.version(),
                next.version(),
                e.detail
            );
        }
    }
    let bytes = env.to_vec_pretty();
    write_doc(&a.out, &bytes)?;
    report(&next, &env, &a.out, json)
}
