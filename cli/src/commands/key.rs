//! `ringcast key gen`: generate an ed25519 signing key pair.

use anyhow::Context;
use clap::Subcommand;
use ringcast_controller::keyfile::{self, Overwrite};
use ringcast_proto::{Role, SecretKey};
use std::path::PathBuf;

/// Arguments of `ringcast key`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: KeyCommand,
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Generate a key pair: NAME.key (PKCS#8 PEM, mode 0600) and NAME.pub (SPKI PEM).
    Gen(GenArgs),
}

/// Arguments of `ringcast key gen`.
#[derive(Debug, clap::Args)]
pub struct GenArgs {
    /// Role the key is meant for: root, release or controller. The role is assigned in the trust
    /// root (`ringcast trust init`); it is recorded here so the output says what the key is for.
    #[arg(long, value_name = "ROLE")]
    role: String,
    /// Base name of the files to write: NAME.key and NAME.pub.
    #[arg(long, value_name = "NAME")]
    out: PathBuf,
    /// Replace existing NAME.key / NAME.pub (by default an existing key is never overwritten).
    #[arg(long)]
    force: bool,
}

/// Run `ringcast key …`.
pub fn run(args: Args, json: bool) -> anyhow::Result<()> {
    match args.command {
        KeyCommand::Gen(a) => gen(a, json),
    }
}

/// `NAME` + `.ext`, keeping any dots already in NAME (`ci.release` → `ci.release.key`).
fn with_ext(base: &std::path::Path, ext: &str) -> PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

fn gen(a: GenArgs, json: bool) -> anyhow::Result<()> {
    let role: Role = a.role.parse().map_err(anyhow::Error::new)?;
    let key_path = with_ext(&a.out, "key");
    let pub_path = with_ext(&a.out, "pub");
    let overwrite = if a.force {
        Overwrite::Allow
    } else {
        // Checked up front too so a refusal leaves neither file half-written; the write itself
        // refuses atomically as well.
        for p in [&key_path, &pub_path] {
            if p.exists() {
                return Err(keyfile::KeyFileError::Exists { path: p.clone() }.into());
            }
        }
        Overwrite::Refuse
    };

    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).context("reading the operating system's random source")?;
    let key = SecretKey::from_seed(seed);
    // Do not leave the secret seed in this stack frame longer than needed.
    seed.iter_mut().for_each(|b| *b = 0);
    std::hint::black_box(&seed);

    keyfile::write_secret_key(&key_path, &key, overwrite)?;
    keyfile::write_public_key(&pub_path, &key.verifying_key(), overwrite)?;

    if json {
        let out = serde_json::json!({
            "role": role.as_str(),
            "key_id": key.key_id().as_str(),
            "public_key": key.public(),
            "private_key_file": key_path,
            "public_key_file": pub_path,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{}", key.key_id());
        eprintln!(
            "{} key written: {} (private, mode 0600) and {} (public)",
            role.as_str(),
            key_path.display(),
            pub_path.display()
        );
    }
    Ok(())
}
