//! What a local Ringcast world needs before anything runs: fresh keys for every role and a
//! trust root (written as key files the way `ringcast key gen` and `trust init` write them), and
//! a tiny "app" bundle per release with a `health.sh` the agents run during probation.
//!
//! It is also the one place releases are built for the demo, the fleet simulator and the
//! end-to-end tests: [`AppRelease::build`] makes the bundle and its manifest signed with a
//! real ed25519 release key; [`sign_release`] and [`point_at`] do the same for any manifest
//! and artifact bytes. Artifact URLs are the controller's store URLs
//! ([`ringcast_controller::artifacts::url_path`]), so the release works once the artifact is
//! uploaded or put in the store.

use crate::demo::{DemoError, Result};
use jiff::{SignedDuration, Timestamp};
use ringcast_controller::keyfile::{self, Overwrite};
use ringcast_proto::release::{
    Artifact, ArtifactFormat, CheckKind, Health, HealthCheck, Install, InstallKind,
};
use ringcast_proto::trust::{RoleSpec, Roles, TrustDoc};
use ringcast_proto::{Dur, Envelope, Release, SecretKey, TrustRoot, TRUST_TYPE};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

// The marker the fleet puts on devices meant to fail; the healthy app's check looks for it.
use ringcast_agent::fleet::FAIL_MARKER;

/// Fresh keys for the three roles and the trust root that lists them (thresholds of one).
pub struct Keys {
    /// Root role key (offline in production; here it only signs the trust root).
    pub root: SecretKey,
    /// Release role key (signs release manifests).
    pub release: SecretKey,
    /// Controller role key (signs directives).
    pub controller: SecretKey,
    /// The trust root.
    pub trust: TrustRoot,
    /// Its self-signed envelope (what agents ship with and the controller publishes).
    pub trust_env: Envelope,
}

/// Where [`Keys::write`] put the files.
#[derive(Debug, Clone)]
pub struct KeyFiles {
    /// `trust.json`.
    pub trust: PathBuf,
    /// `controller.key` (mode 0600).
    pub controller_key: PathBuf,
    /// `release.key` (mode 0600).
    pub release_key: PathBuf,
    /// `root.key` (mode 0600).
    pub root_key: PathBuf,
}

fn random_key() -> Result<SecretKey> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|e| DemoError::Setup(format!("randomness: {e}")))?;
    Ok(SecretKey::from_seed(seed))
}

impl Keys {
    /// Generate fresh random keys and a trust root valid for `valid_for`, issued at `now`.
    pub fn generate(now: Timestamp, valid_for: SignedDuration) -> Result<Keys> {
        let (root, release, controller) = (random_key()?, random_key()?, random_key()?);
        let mut keys = BTreeMap::new();
        for k in [&root, &release, &controller] {
            keys.insert(k.key_id().clone(), k.public());
        }
        let one = |k: &SecretKey| RoleSpec {
            keyids: vec![k.key_id().clone()],
            threshold: 1,
        };
        let doc = TrustDoc {
            version: 1,
            expires_at: now
                .checked_add(valid_for)
                .map_err(|e| DemoError::Setup(format!("trust root expiry: {e}")))?,
            keys,
            roles: Roles {
                root: one(&root),
                release: one(&release),
                controller: one(&controller),
            },
        };
        let bytes =
            serde_json::to_vec(&doc).map_err(|e| DemoError::Setup(format!("trust root: {e}")))?;
        let trust_env = Envelope::sign(TRUST_TYPE, bytes, &[&root]);
        let trust = TrustRoot::from_envelope_self_signed(&trust_env)
            .map_err(|e| DemoError::Setup(format!("trust root: {e}")))?;
        Ok(Keys {
            root,
            release,
            controller,
            trust,
            trust_env,
        })
    }

    /// Write `root.key`, `release.key`, `controller.key` (PKCS#8 PEM, 0600) and `trust.json`
    /// into `dir`.
    pub fn write(&self, dir: &Path) -> Result<KeyFiles> {
        std::fs::create_dir_all(dir).map_err(|e| DemoError::io(dir, e))?;
        let files = KeyFiles {
            trust: dir.join("trust.json"),
            controller_key: dir.join("controller.key"),
            release_key: dir.join("release.key"),
            root_key: dir.join("root.key"),
        };
        for (path, key) in [
            (&files.root_key, &self.root),
            (&files.release_key, &self.release),
            (&files.controller_key, &self.controller),
        ] {
            keyfile::write_secret_key(path, key, Overwrite::Refuse)
                .map_err(|e| DemoError::Setup(format!("{}: {e}", path.display())))?;
        }
        keyfile::write_atomic(
            &files.trust,
            &self.trust_env.to_vec(),
            0o644,
            Overwrite::Refuse,
        )
        .map_err(|e| DemoError::Setup(format!("{}: {e}", files.trust.display())))?;
        Ok(files)
    }
}

/// How an app bundle's `health.sh` behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppHealth {
    /// Passes, unless the device carries the fleet's [`FAIL_MARKER`] (the simulator's failure
    /// rate).
    Healthy,
    /// Always fails, with a message on stderr (the demo's broken v3).
    Broken,
    /// Never answers (sleeps far past any check timeout).
    Hangs,
}

fn health_script(version: &str, health: AppHealth) -> String {
    match health {
        AppHealth::Healthy => format!(
            "#!/bin/sh\n# app {version}: healthy unless this device is marked to fail.\n\
             here=$(dirname \"$0\")\n\
             if [ -e \"$here/../../{FAIL_MARKER}\" ]; then\n\
             \techo \"app {version}: self-test failed (simulated device fault)\" >&2\n\
             \texit 1\nfi\necho \"app {version}: ok\"\nexit 0\n"
        ),
        AppHealth::Broken => format!(
            "#!/bin/sh\necho \"app {version}: self-test failed: cannot open /dev/app0 (driver ABI mismatch)\" >&2\nexit 1\n"
        ),
        AppHealth::Hangs => {
            format!("#!/bin/sh\necho \"app {version}: waiting for a peer that never answers\"\nexec sleep 600\n")
        }
    }
}

/// A tar.gz "app" bundle: `VERSION`, `app.sh` and `health.sh`.
pub fn app_bundle(version: &str, health: AppHealth) -> Result<Vec<u8>> {
    let files: [(&str, String, u32); 3] = [
        ("VERSION", format!("{version}\n"), 0o644),
        (
            "app.sh",
            format!("#!/bin/sh\necho \"demo app {version}\"\n"),
            0o755,
        ),
        ("health.sh", health_script(version, health), 0o755),
    ];
    let mut out = Vec::new();
    {
        let gz = flate2::write::GzEncoder::new(&mut out, flate2::Compression::fast());
        let mut t = tar::Builder::new(gz);
        for (path, data, mode) in &files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(*mode);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mtime(0);
            h.set_cksum();
            t.append_data(&mut h, path, data.as_bytes())
                .map_err(|e| DemoError::Setup(format!("bundle {version}: {e}")))?;
        }
        let gz = t
            .into_inner()
            .map_err(|e| DemoError::Setup(format!("bundle {version}: {e}")))?;
        gz.finish()
            .map_err(|e| DemoError::Setup(format!("bundle {version}: {e}")))?;
    }
    Ok(out)
}

/// Point `release` at an artifact as the controller stores it: its SHA-256 (lowercase hex),
/// its size and its store URL, `/artifacts/sha256/{hex}`.
pub fn point_at(release: &mut Release, sha256: &str, size: u64) {
    release.artifact.url = ringcast_controller::artifacts::url_path(sha256);
    release.artifact.sha256 = sha256.to_owned();
    release.artifact.size = size;
}

/// Sign `release` for the artifact `bytes` with the release-role `keys` (digest, size and
/// store URL filled in first): the envelope `ringcast release sign` writes for that artifact.
pub fn sign_release(mut release: Release, bytes: &[u8], keys: &[&SecretKey]) -> Envelope {
    let sha256 = ringcast_proto::digest::sha256_hex(bytes);
    point_at(&mut release, &sha256, bytes.len() as u64);
    release.sign(keys)
}

/// An app release ready to upload and submit.
#[derive(Debug, Clone)]
pub struct SignedApp {
    /// The bundle (tar.gz) to upload or put in the artifact store.
    pub bundle: Vec<u8>,
    /// Its SHA-256 (what the store names it by).
    pub sha256: String,
    /// The manifest, signed by the release key, pointing at the bundle's store URL.
    pub envelope: Envelope,
}

/// Parameters of an app release.
#[derive(Debug, Clone)]
pub struct AppRelease {
    /// Release name.
    pub name: String,
    /// Version (`1.{sequence}.0` style is fine).
    pub version: semver::Version,
    /// Sequence (strictly increasing per name).
    pub sequence: u64,
    /// Rollback floor.
    pub rollback_floor: u64,
    /// Compatible device class.
    pub device_class: String,
    /// Probation length.
    pub probation: Duration,
    /// Interval between health rounds.
    pub interval: Duration,
    /// Timeout of one `health.sh` run.
    pub check_timeout: Duration,
    /// Failed rounds before a revert.
    pub failures_to_revert: u32,
}

impl AppRelease {
    /// Sensible fast defaults for `name` at `sequence` (version `1.{sequence}.0`, floor 1).
    pub fn new(name: &str, sequence: u64, device_class: &str) -> AppRelease {
        AppRelease {
            name: name.into(),
            version: semver::Version::new(1, sequence, 0),
            sequence,
            rollback_floor: 1,
            device_class: device_class.into(),
            probation: Duration::from_millis(1500),
            interval: Duration::from_millis(300),
            check_timeout: Duration::from_secs(5),
            failures_to_revert: 1,
        }
    }

    /// Build the bundle whose `health.sh` behaves as `health` and its manifest, issued at
    /// `issued_at`, pointing at the bundle's store URL and signed by the release `key`.
    pub fn build(
        &self,
        health: AppHealth,
        issued_at: Timestamp,
        key: &SecretKey,
    ) -> Result<SignedApp> {
        let bundle = app_bundle(&self.version.to_string(), health)?;
        let sha256 = ringcast_proto::digest::sha256_hex(&bundle);
        let url = ringcast_controller::artifacts::url_path(&sha256);
        let envelope = self.manifest(&url, &bundle, issued_at).sign(&[key]);
        Ok(SignedApp {
            bundle,
            sha256,
            envelope,
        })
    }

    /// The manifest for an artifact of `bytes` at `url` (absolute, or relative to the
    /// agents' artifact base such as `/artifacts/sha256/{hex}`), issued at `issued_at`.
    pub fn manifest(&self, url: &str, bytes: &[u8], issued_at: Timestamp) -> Release {
        Release {
            name: self.name.clone(),
            version: self.version.clone(),
            sequence: self.sequence,
            rollback_floor: self.rollback_floor,
            issued_at,
            expires_at: None,
            compatible: vec![self.device_class.clone()],
            artifact: Artifact {
                url: url.into(),
                sha256: ringcast_proto::digest::sha256_hex(bytes),
                size: bytes.len() as u64,
                format: ArtifactFormat::TarGz,
            },
            install: Install {
                kind: InstallKind::Bundle,
                path: None,
                command: None,
                revert: None,
                pre_activate: None,
                post_activate: None,
            },
            health: Health {
                checks: vec![HealthCheck {
                    name: "app-selftest".into(),
                    kind: CheckKind::Command,
                    command: Some(vec!["{release_dir}/health.sh".into()]),
                    url: None,
                    timeout: Dur(self.check_timeout),
                }],
                probation: Dur(self.probation),
                interval: Dur(self.interval),
                failures_to_revert: self.failures_to_revert,
                restarts_to_revert: 3,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_trust_root_lists_each_role_key_once() {
        let k = Keys::generate(Timestamp::now(), SignedDuration::from_hours(24)).unwrap();
        assert!(k
            .trust
            .roles
            .controller
            .keyids
            .contains(k.controller.key_id()));
        assert!(k.trust.roles.release.keyids.contains(k.release.key_id()));
        let dir = tempfile::tempdir().unwrap();
        let files = k.write(dir.path()).unwrap();
        let back = TrustRoot::from_bytes_self_signed(&std::fs::read(files.trust).unwrap()).unwrap();
        assert_eq!(back, k.trust);
        keyfile::load_secret_key(&files.controller_key).unwrap();
    }

    #[test]
    fn app_release_manifest_validates_and_bundle_unpacks() {
        let bytes = app_bundle("1.2.0", AppHealth::Broken).unwrap();
        let r = AppRelease::new("app", 2, "sim").manifest("/artifacts/x", &bytes, Timestamp::now());
        r.validate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut a = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
        a.unpack(dir.path()).unwrap();
        let script = std::fs::read_to_string(dir.path().join("health.sh")).unwrap();
        assert!(script.contains("self-test failed"));
    }

    #[test]
    fn built_release_verifies_against_the_trust_root_and_names_its_bundle() {
        let now = Timestamp::now();
        let k = Keys::generate(now, SignedDuration::from_hours(24)).unwrap();
        let app = AppRelease::new("app", 3, "sim")
            .build(AppHealth::Healthy, now, &k.release)
            .unwrap();
        let r = ringcast_proto::verify_release(&k.trust, &app.envelope, now, SignedDuration::ZERO)
            .unwrap();
        assert_eq!(r.artifact.sha256, app.sha256);
        assert_eq!(r.artifact.size, app.bundle.len() as u64);
        assert_eq!(r.artifact.url, format!("/artifacts/sha256/{}", app.sha256));
        // Signed by another role's key, the same manifest is refused.
        let forged = AppRelease::new("app", 3, "sim")
            .build(AppHealth::Healthy, now, &k.controller)
            .unwrap();
        assert!(ringcast_proto::verify_release(
            &k.trust,
            &forged.envelope,
            now,
            SignedDuration::ZERO
        )
        .is_err());
    }

    #[test]
    fn any_manifest_is_signed_for_the_bytes_it_ships() {
        let now = Timestamp::now();
        let k = Keys::generate(now, SignedDuration::from_hours(24)).unwrap();
        let mut r = AppRelease::new("app", 2, "sim").manifest("/elsewhere", b"old", now);
        r.artifact.size = 1;
        let env = sign_release(r, b"firmware", &[&k.release]);
        let back =
            ringcast_proto::verify_release(&k.trust, &env, now, SignedDuration::ZERO).unwrap();
        assert_eq!(
            back.artifact.sha256,
            ringcast_proto::digest::sha256_hex(b"firmware")
        );
        assert_eq!(back.artifact.size, 8);
        assert_eq!(
            back.artifact.url,
            format!("/artifacts/sha256/{}", back.artifact.sha256)
        );
    }
}
