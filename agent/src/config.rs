//! `agent.toml`: one serde struct, `deny_unknown_fields`, errors that name the file and the
//! field. A documented example lives in `deploy/agent.toml`.

use crate::error::{Error, Result};
use ringcast_proto::limits::check_name;
use ringcast_proto::{Dur, Schedule, Topics, Window};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The agent's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This device's id (also its MQTT client id and, with the shipped ACL, its username).
    pub device_id: String,
    /// Device class, matched against a release's `compatible` list.
    pub device_class: String,
    /// Fleet name.
    pub fleet: String,
    /// Ring this device belongs to.
    pub ring: String,
    /// Topic prefix; default `ringcast/{fleet}`.
    #[serde(default)]
    pub topic_prefix: Option<String>,
    /// Where the agent keeps its database, downloads and status file.
    pub data_dir: PathBuf,
    /// The initial trust root (self-signed envelope) the device ships with.
    pub trust_root: PathBuf,
    /// Base joined to relative artifact URLs such as `/artifacts/sha256/<hex>`.
    #[serde(default)]
    pub artifact_base_url: Option<String>,
    /// Allowed clock skew when judging expiry.
    #[serde(default = "default_skew")]
    pub clock_skew: Dur,
    /// The device's IANA time zone (for windows without their own zone).
    #[serde(default = "default_tz")]
    pub timezone: String,
    /// The device's own delivery windows (all must allow activation; empty = any time).
    #[serde(default)]
    pub windows: Vec<Window>,
    /// `text` or `json`.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Log filter, e.g. `info` or `ringcast_agent=debug`.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// MQTT broker.
    pub broker: BrokerConfig,
    /// Artifact downloads.
    #[serde(default)]
    pub download: DownloadConfig,
    /// Installation.
    #[serde(default)]
    pub install: InstallConfig,
    /// Health check limits.
    #[serde(default)]
    pub health: HealthConfig,
    /// Report queue.
    #[serde(default)]
    pub reports: ReportsConfig,
    /// The optional defer hook: asked right before activation whether the device may update
    /// now (docs/operations.md "Deferring updates").
    #[serde(default)]
    pub defer: Option<DeferConfig>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// MQTT broker settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub url: String,
    /// MQTT version: `auto` (MQTT 5 where the broker speaks it, else 3.1.1; the default),
    /// `5` or `3.1.1`.
    #[serde(default)]
    pub protocol: ringcast_io::mqtt::Protocol,
    /// CA certificate(s) (PEM) for `mqtts://`; default: none (then TLS fails closed).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// MQTT username (the shipped ACL expects the device id).
    #[serde(default)]
    pub username: Option<String>,
    /// MQTT password.
    #[serde(default)]
    pub password: Option<String>,
    /// Keep-alive interval.
    #[serde(default = "default_keep_alive")]
    pub keep_alive: Dur,
    /// First reconnect delay.
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min: Dur,
    /// Longest reconnect delay (exponential backoff with jitter is capped here).
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max: Dur,
}

/// Download settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownloadConfig {
    /// No byte for this long aborts the attempt (it resumes with Range later).
    pub stall_timeout: Dur,
    /// TCP/TLS connect timeout.
    pub connect_timeout: Dur,
    /// First retry delay after a failed download.
    pub retry_initial: Dur,
    /// Longest retry delay.
    pub retry_max: Dur,
    /// Extra CA certificate (PEM) for https artifact servers.
    pub ca_file: Option<PathBuf>,
}

impl Default for DownloadConfig {
    fn default() -> Self {
        DownloadConfig {
            stall_timeout: Dur::secs(30),
            connect_timeout: Dur::secs(15),
            retry_initial: Dur::secs(5),
            retry_max: Dur::secs(600),
            ca_file: None,
        }
    }
}

/// Install settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InstallConfig {
    /// Where bundles live: `{root}/releases/{version}/` and the `{root}/current` symlink.
    /// Default `{data_dir}/install`.
    pub root: Option<PathBuf>,
    /// Longest a hook or an installer command may run.
    pub command_timeout: Dur,
}

impl Default for InstallConfig {
    fn default() -> Self {
        InstallConfig {
            root: None,
            command_timeout: Dur::secs(600),
        }
    }
}

/// Health-check settings on the agent's side (the checks themselves come with the release).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Bytes of a failing check's output kept as evidence.
    pub output_tail: usize,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig { output_tail: 2048 }
    }
}

/// Outgoing report queue (persisted; survives offline periods and restarts).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportsConfig {
    /// Most queued messages; beyond it the oldest progress events are dropped first.
    pub queue_max: usize,
}

impl Default for ReportsConfig {
    fn default() -> Self {
        ReportsConfig { queue_max: 1000 }
    }
}

/// The defer hook (`[defer]`): a command the agent runs when a staged release may be
/// activated. Exit 0 = go ahead; exit 75 (`EX_TEMPFAIL`) = not now, the last line it printed
/// being the reason; anything else (or a timeout) = go ahead with a `defer_hook_failed`
/// event, so a broken hook never blocks updates.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeferConfig {
    /// argv of the hook. It gets `RINGCAST_RELEASE`, `RINGCAST_VERSION`, `RINGCAST_ROLLOUT`,
    /// `RINGCAST_DEADLINE` (RFC 3339) and `RINGCAST_ARTIFACT` in its environment.
    pub command: Vec<String>,
    /// How long after a "not now" the hook is asked again.
    #[serde(default = "default_defer_retry")]
    pub retry: Dur,
    /// The longest one release may be deferred in one rollout, counted from the first "not
    /// now"; after it the update proceeds without asking.
    #[serde(default = "default_defer_deadline")]
    pub deadline: Dur,
    /// Longest one run of the hook may take; a hook that takes longer counts as broken.
    #[serde(default = "default_defer_timeout")]
    pub timeout: Dur,
}

impl DeferConfig {
    /// A hook with the default timings.
    pub fn new(command: Vec<String>) -> DeferConfig {
        DeferConfig {
            command,
            retry: default_defer_retry(),
            deadline: default_defer_deadline(),
            timeout: default_defer_timeout(),
        }
    }
}

fn default_defer_retry() -> Dur {
    Dur::secs(300)
}
fn default_defer_deadline() -> Dur {
    Dur::secs(24 * 3600)
}
fn default_defer_timeout() -> Dur {
    Dur::secs(30)
}

fn default_skew() -> Dur {
    Dur::secs(300)
}
fn default_tz() -> String {
    "UTC".into()
}
fn default_log_level() -> String {
    "info".into()
}
fn default_keep_alive() -> Dur {
    Dur::secs(30)
}
fn default_reconnect_min() -> Dur {
    Dur(std::time::Duration::from_millis(500))
}
fn default_reconnect_max() -> Dur {
    Dur::secs(60)
}

impl AgentConfig {
    /// Read and validate `path`.
    pub fn load(path: &Path) -> Result<AgentConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            path: path.to_owned(),
            detail: format!("cannot read: {e}"),
        })?;
        AgentConfig::from_toml(&text, path)
    }

    /// Parse and validate TOML text; `path` names the source in errors. Relative paths in the
    /// file are taken relative to the file's directory.
    pub fn from_toml(text: &str, path: &Path) -> Result<AgentConfig> {
        let mut c: AgentConfig = toml::from_str(text).map_err(|e| Error::Config {
            path: path.to_owned(),
            detail: e.to_string().trim().replace('\n', " "),
        })?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            c.resolve_relative(dir);
        }
        c.validate().map_err(|detail| Error::Config {
            path: path.to_owned(),
            detail,
        })?;
        Ok(c)
    }

    fn resolve_relative(&mut self, dir: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        fix(&mut self.data_dir);
        fix(&mut self.trust_root);
        for p in [
            &mut self.broker.ca_file,
            &mut self.broker.client_cert,
            &mut self.broker.client_key,
            &mut self.download.ca_file,
            &mut self.install.root,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
    }

    /// Check values serde cannot: names, zone, URL schemes. Errors name the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        for (field, v) in [
            ("device_id", &self.device_id),
            ("device_class", &self.device_class),
            ("fleet", &self.fleet),
            ("ring", &self.ring),
        ] {
            check_name(field, v).map_err(|e| format!("field {field}: {}", e.detail))?;
        }
        self.topics()
            .map_err(|e| format!("field topic_prefix: {}", e.detail))?;
        Schedule::new(self.windows.clone(), &self.timezone)
            .map_err(|e| format!("field timezone: {}", e.detail))?;
        let u = &self.broker.url;
        if !(u.starts_with("mqtt://") || u.starts_with("mqtts://")) {
            return Err(format!(
                "field broker.url: {u:?} must start with mqtt:// or mqtts://"
            ));
        }
        crate::transport::parse_broker_url(u).map_err(|e| format!("field broker.url: {e}"))?;
        if self.broker.client_cert.is_some() != self.broker.client_key.is_some() {
            return Err(
                "field broker.client_cert: client_cert and client_key go together".to_owned(),
            );
        }
        if let Some(b) = &self.artifact_base_url {
            if !(b.starts_with("http://") || b.starts_with("https://")) {
                return Err(format!(
                    "field artifact_base_url: {b:?} must start with http:// or https://"
                ));
            }
        }
        if self.reports.queue_max < 16 {
            return Err("field reports.queue_max: must be at least 16".into());
        }
        if let Some(d) = &self.defer {
            if d.command.first().is_none_or(|p| p.trim().is_empty()) {
                return Err("field defer.command: must name the hook to run".into());
            }
            for (field, v) in [
                ("retry", d.retry),
                ("deadline", d.deadline),
                ("timeout", d.timeout),
            ] {
                if v.get().is_zero() {
                    return Err(format!("field defer.{field}: must be longer than 0s"));
                }
            }
        }
        Ok(())
    }

    /// The topic names for this device's fleet.
    pub fn topics(&self) -> ringcast_proto::error::Result<Topics> {
        match &self.topic_prefix {
            Some(p) => Topics::with_prefix(p),
            None => Topics::for_fleet(&self.fleet),
        }
    }

    /// Where bundles are installed.
    pub fn install_root(&self) -> PathBuf {
        self.install
            .root
            .clone()
            .unwrap_or_else(|| self.data_dir.join("install"))
    }

    /// A minimal config for tests and simulators: everything else at its default.
    pub fn minimal(
        device_id: &str,
        device_class: &str,
        fleet: &str,
        ring: &str,
        broker_url: &str,
        data_dir: &Path,
        trust_root: &Path,
    ) -> AgentConfig {
        AgentConfig {
            device_id: device_id.into(),
            device_class: device_class.into(),
            fleet: fleet.into(),
            ring: ring.into(),
            topic_prefix: None,
            data_dir: data_dir.into(),
            trust_root: trust_root.into(),
            artifact_base_url: None,
            clock_skew: default_skew(),
            timezone: default_tz(),
            windows: Vec::new(),
            log_format: LogFormat::Text,
            log_level: default_log_level(),
            broker: BrokerConfig {
                url: broker_url.into(),
                protocol: ringcast_io::mqtt::Protocol::default(),
                ca_file: None,
                client_cert: None,
                client_key: None,
                username: None,
                password: None,
                keep_alive: default_keep_alive(),
                reconnect_min: default_reconnect_min(),
                reconnect_max: default_reconnect_max(),
            },
            download: DownloadConfig::default(),
            install: InstallConfig::default(),
            health: HealthConfig::default(),
            reports: ReportsConfig::default(),
            defer: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
device_id = "dev-1"
device_class = "sensor-v2"
fleet = "lab"
ring = "canary"
data_dir = "data"
trust_root = "trust.json"
windows = ["Mon-Fri 02:00-05:00"]
timezone = "Europe/Berlin"
[broker]
url = "mqtt://127.0.0.1:1883"
"#;

    #[test]
    fn shipped_example_config_loads_and_matches_the_systemd_unit() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let c = AgentConfig::from_toml(&text, &path).unwrap();
        // deploy/systemd/ringcast-agent.service gives the agent StateDirectory=ringcast-agent.
        assert_eq!(c.data_dir, Path::new("/var/lib/ringcast-agent"));
    }

    #[test]
    fn good_config_loads_and_resolves_relative_paths() {
        let c = AgentConfig::from_toml(GOOD, Path::new("/etc/ringcast/agent.toml")).unwrap();
        assert_eq!(c.data_dir, Path::new("/etc/ringcast/data"));
        assert_eq!(c.install_root(), Path::new("/etc/ringcast/data/install"));
        assert_eq!(c.download.stall_timeout, Dur::secs(30));
    }

    #[test]
    fn unknown_field_error_names_file_and_field() {
        let text = GOOD.replace("ring = ", "rnig = \"x\"\nring = ");
        let e = AgentConfig::from_toml(&text, Path::new("/x/agent.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/x/agent.toml") && e.contains("rnig"), "{e}");
    }

    #[test]
    fn defer_section_is_optional_and_has_defaults() {
        let c = AgentConfig::from_toml(GOOD, Path::new("a.toml")).unwrap();
        assert!(c.defer.is_none(), "no hook unless configured");
        let text = format!("{GOOD}[defer]\ncommand = [\"/usr/local/bin/may-update\"]\n");
        let d = AgentConfig::from_toml(&text, Path::new("a.toml"))
            .unwrap()
            .defer
            .unwrap();
        assert_eq!(d.command, vec!["/usr/local/bin/may-update".to_string()]);
        assert_eq!(
            (d.retry, d.deadline, d.timeout),
            (Dur::secs(300), Dur::secs(86400), Dur::secs(30))
        );
        let text = format!(
            "{GOOD}[defer]\ncommand = [\"/bin/x\"]\nretry = \"1m\"\ndeadline = \"2h\"\ntimeout = \"5s\"\n"
        );
        let d = AgentConfig::from_toml(&text, Path::new("a.toml"))
            .unwrap()
            .defer
            .unwrap();
        assert_eq!(
            (d.retry, d.deadline, d.timeout),
            (Dur::secs(60), Dur::secs(7200), Dur::secs(5))
        );
    }

    #[test]
    fn bad_defer_values_name_their_field() {
        for (section, field) in [
            ("command = []", "defer.command"),
            ("command = [\"\"]", "defer.command"),
            ("command = [\"/bin/x\"]\nretry = \"0s\"", "defer.retry"),
            (
                "command = [\"/bin/x\"]\ndeadline = \"0s\"",
                "defer.deadline",
            ),
            ("command = [\"/bin/x\"]\ntimeout = \"0s\"", "defer.timeout"),
            ("command = [\"/bin/x\"]\nretyr = \"1m\"", "retyr"),
            ("retry = \"1m\"", "command"),
        ] {
            let text = format!("{GOOD}[defer]\n{section}\n");
            let e = AgentConfig::from_toml(&text, Path::new("/x/agent.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(field) && e.contains("/x/agent.toml"), "{e}");
        }
    }

    #[test]
    fn bad_values_name_their_field() {
        for (from, to, field) in [
            ("mqtt://127.0.0.1:1883", "http://x", "broker.url"),
            ("Europe/Berlin", "Mars/Olympus", "timezone"),
            ("dev-1", "dev/1", "device_id"),
        ] {
            let e = AgentConfig::from_toml(&GOOD.replace(from, to), Path::new("a.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(field), "{e}");
        }
        let e = AgentConfig::from_toml(
            &GOOD.replace("device_class = \"sensor-v2\"\n", ""),
            Path::new("a.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("device_class"), "{e}");
    }
}
