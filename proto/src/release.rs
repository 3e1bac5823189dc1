//! Release manifests (signed by the `release` role).

use crate::duration::Dur;
use crate::envelope::{Envelope, RELEASE_TYPE};
use crate::error::{Rejection, Result};
use crate::limits::{check_len, check_list, check_name, MAX_ARG_LEN, MAX_LIST_LEN, MAX_URL_LEN};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// A release manifest, exactly as DESIGN.md lists its fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    /// Product name; sequences increase per name.
    pub name: String,
    /// Semantic version, for people.
    pub version: semver::Version,
    /// Strictly increasing per `name`; what rollback protection compares.
    pub sequence: u64,
    /// Lowest `sequence` a device may return to after installing this release.
    pub rollback_floor: u64,
    /// When the release was signed.
    pub issued_at: Timestamp,
    /// Optional expiry of the manifest itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
    /// Device classes this release may be installed on.
    pub compatible: Vec<String>,
    /// What to download.
    pub artifact: Artifact,
    /// How to install it.
    pub install: Install,
    /// How to judge it after installation.
    pub health: Health,
}

/// The artifact to download.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// Where to fetch it (http or https). Relative URLs are resolved by the agent against its
    /// configured artifact base.
    pub url: String,
    /// Lowercase hex SHA-256 of the whole artifact.
    pub sha256: String,
    /// Exact length in bytes.
    pub size: u64,
    /// `tar.gz` for bundles, `raw` for anything else.
    pub format: ArtifactFormat,
}

/// Artifact formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ArtifactFormat {
    /// A gzip-compressed tar archive.
    #[serde(rename = "tar.gz")]
    TarGz,
    /// Opaque bytes.
    #[serde(rename = "raw")]
    Raw,
}

/// Install kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstallKind {
    /// Unpack into `releases/{version}/` and switch the `current` symlink.
    Bundle,
    /// Replace one file atomically.
    File,
    /// Hand the artifact to an existing installer (`rauc install`, `swupdate -i`, `dpkg -i`).
    Command,
}

/// How to install a release. Which fields apply depends on `kind`; [`Release::validate`]
/// enforces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Install {
    /// The kind of installation.
    pub kind: InstallKind,
    /// `file`: the path to replace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `command`: the installer's argv; `{artifact}` is replaced by the verified file's path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// `command`: the argv that reverts to the previous release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revert: Option<Vec<String>>,
    /// Run before activation; a failure aborts the install.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_activate: Option<Vec<String>>,
    /// Run after activation; a failure counts as a failed health check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_activate: Option<Vec<String>>,
}

/// Probation settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// Checks run every `interval` during `probation`.
    #[serde(default)]
    pub checks: Vec<HealthCheck>,
    /// How long the release must stay healthy before it is committed.
    pub probation: Dur,
    /// Time between rounds of checks.
    pub interval: Dur,
    /// Failed rounds that trigger a local revert.
    pub failures_to_revert: u32,
    /// Agent restarts during probation that trigger a local revert.
    #[serde(default = "default_restarts")]
    pub restarts_to_revert: u32,
}

fn default_restarts() -> u32 {
    2
}

/// Health check kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    /// Run a command; healthy when it exits 0 within the timeout.
    Command,
    /// GET a URL; healthy on a 2xx within the timeout.
    Http,
}

/// One health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Name shown in `reverted` evidence.
    pub name: String,
    /// Kind of check.
    pub kind: CheckKind,
    /// `command`: argv. `{release_dir}` is replaced by the active release's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// `http`: URL to GET.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A check that takes longer has failed.
    pub timeout: Dur,
}

fn check_argv(field: &str, argv: &[String]) -> Result<()> {
    if argv.is_empty() {
        return Err(Rejection::malformed(format!("{field} is an empty command")));
    }
    check_list(field, argv, MAX_LIST_LEN)?;
    for a in argv {
        check_len(field, a, MAX_ARG_LEN)?;
    }
    Ok(())
}

impl Release {
    /// Parse manifest bytes strictly and validate them.
    pub fn parse(bytes: &[u8]) -> Result<Release> {
        let r: Release = serde_json::from_slice(bytes)
            .map_err(|e| Rejection::malformed(format!("release: {e}")))?;
        r.validate()?;
        Ok(r)
    }

    /// Serialise to the bytes that get signed.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Check bounded lengths and per-kind required fields.
    pub fn validate(&self) -> Result<()> {
        check_name("release name", &self.name)?;
        check_len("version", &self.version.to_string(), 128)?;
        if self.rollback_floor > self.sequence {
            return Err(Rejection::malformed(format!(
                "rollback_floor {} is above the release's own sequence {}",
                self.rollback_floor, self.sequence
            )));
        }
        if let Some(exp) = self.expires_at {
            if exp <= self.issued_at {
                return Err(Rejection::malformed("expires_at is not after issued_at"));
            }
        }
        if self.compatible.is_empty() {
            return Err(Rejection::malformed("compatible lists no device class"));
        }
        check_list("compatible", &self.compatible, MAX_LIST_LEN)?;
        for c in &self.compatible {
            check_name("device class", c)?;
        }
        let a = &self.artifact;
        if a.url.is_empty() {
            return Err(Rejection::malformed("artifact.url is empty"));
        }
        check_len("artifact.url", &a.url, MAX_URL_LEN)?;
        if a.sha256.len() != 64
            || !a
                .sha256
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(Rejection::malformed(
                "artifact.sha256 is not 64 lowercase hex characters",
            ));
        }
        let i = &self.install;
        match i.kind {
            InstallKind::Bundle => {
                if a.format != ArtifactFormat::TarGz {
                    return Err(Rejection::malformed(
                        "install kind bundle needs artifact format tar.gz",
                    ));
                }
            }
            InstallKind::File => {
                let p = i
                    .path
                    .as_deref()
                    .ok_or_else(|| Rejection::malformed("install kind file needs install.path"))?;
                check_len("install.path", p, MAX_ARG_LEN)?;
                if !p.starts_with('/') {
                    return Err(Rejection::malformed("install.path must be absolute"));
                }
            }
            InstallKind::Command => {
                let c = i.command.as_deref().ok_or_else(|| {
                    Rejection::malformed("install kind command needs install.command")
                })?;
                check_argv("install.command", c)?;
            }
        }
        for (f, v) in [
            ("install.revert", &i.revert),
            ("install.pre_activate", &i.pre_activate),
            ("install.post_activate", &i.post_activate),
        ] {
            if let Some(v) = v {
                check_argv(f, v)?;
            }
        }
        let h = &self.health;
        check_list("health.checks", &h.checks, 16)?;
        if h.interval.get().is_zero() {
            return Err(Rejection::malformed("health.interval must be above zero"));
        }
        if h.failures_to_revert == 0 {
            return Err(Rejection::malformed(
                "health.failures_to_revert must be at least 1",
            ));
        }
        for c in &h.checks {
            check_name("health check name", &c.name)?;
            match c.kind {
                CheckKind::Command => check_argv(
                    "health check command",
                    c.command.as_deref().unwrap_or_default(),
                )?,
                CheckKind::Http => {
                    let u = c.url.as_deref().unwrap_or_default();
                    if !(u.starts_with("http://") || u.starts_with("https://")) {
                        return Err(Rejection::malformed(
                            "http health check needs an http(s) url",
                        ));
                    }
                    check_len("health check url", u, MAX_URL_LEN)?;
                }
            }
        }
        Ok(())
    }

    /// Whether `class` is one of the compatible device classes.
    pub fn is_compatible(&self, class: &str) -> bool {
        self.compatible.iter().any(|c| c == class)
    }

    /// Sign this manifest into an envelope.
    pub fn sign(&self, keys: &[&crate::keys::SecretKey]) -> Envelope {
        Envelope::sign(RELEASE_TYPE, self.to_bytes(), keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Reason;
    use crate::testkit::*;

    #[test]
    fn sample_round_trips_and_validates() {
        let r = sample_release("app", 3, 1);
        let back = Release::parse(&r.to_bytes()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let r = sample_release("app", 3, 1);
        let mut v: serde_json::Value = serde_json::from_slice(&r.to_bytes()).unwrap();
        v["surprise"] = serde_json::json!(1);
        assert_eq!(
            Release::parse(&serde_json::to_vec(&v).unwrap())
                .unwrap_err()
                .reason,
            Reason::Malformed
        );
        let mut v: serde_json::Value = serde_json::from_slice(&r.to_bytes()).unwrap();
        v["artifact"]["extra"] = serde_json::json!("x");
        assert!(Release::parse(&serde_json::to_vec(&v).unwrap()).is_err());
    }

    #[test]
    fn invalid_manifests_are_rejected() {
        let base = sample_release("app", 3, 1);
        type Mutate = Box<dyn Fn(&mut Release)>;
        let cases: Vec<(&str, Mutate)> = vec![
            ("floor above sequence", Box::new(|r| r.rollback_floor = 4)),
            ("no classes", Box::new(|r| r.compatible.clear())),
            ("bad sha", Box::new(|r| r.artifact.sha256 = "abc".into())),
            (
                "file without path",
                Box::new(|r| {
                    r.install.kind = InstallKind::File;
                    r.install.path = None;
                }),
            ),
            (
                "command without argv",
                Box::new(|r| {
                    r.install.kind = InstallKind::Command;
                    r.install.command = None;
                }),
            ),
            (
                "bundle raw",
                Box::new(|r| r.artifact.format = ArtifactFormat::Raw),
            ),
            (
                "zero failures",
                Box::new(|r| r.health.failures_to_revert = 0),
            ),
            ("bad name", Box::new(|r| r.name = "a/b".into())),
            (
                "long url",
                Box::new(|r| r.artifact.url = "h".repeat(MAX_URL_LEN + 1)),
            ),
        ];
        for (what, mutate) in cases {
            let mut r = base.clone();
            mutate(&mut r);
            assert!(r.validate().is_err(), "{what} accepted");
        }
    }
}
