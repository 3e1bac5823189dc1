//! `agent.toml`: one serde struct, `deny_unknown_fields`, errors that name the file and the
//! field. A documented example lives in `deploy/agent.toml`.

use crate::error::{Error, Result};
use ringcast_proto::limits::check_name;
use ringcast_proto::release::InstallKind;
use ringcast_proto::report::MAX_PRODUCTS;
use ringcast_proto::{Dur, Schedule, Topics, Window};
use serde::Deserialize;
use std::collections::BTreeMap;
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
    /// The products this device runs (`[products.<name>]`, the name being the release name),
    /// each with its own state, topics, install root and downloads. Empty (the default): the
    /// device is a single-product agent that takes every release it is sent on the ring and
    /// device topics, exactly as before products existed.
    #[serde(default)]
    pub products: BTreeMap<String, ProductConfig>,
}

/// One product of a multi-product device (`[products.<name>]`): an OS image, an application,
/// firmware. Each is updated on its own: its own directive topics, phase, current/previous
/// release, rollback floor and downloads (DESIGN.md "Agent state machine").
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductConfig {
    /// Where this product's bundles and files are kept; default `{install.root}/{name}`.
    #[serde(default)]
    pub install_root: Option<PathBuf>,
    /// The install kinds this product takes (e.g. `["command"]` for an OS image handed to
    /// `rauc`); a release of another kind is refused `incompatible`. Absent: any kind.
    #[serde(default)]
    pub kinds: Option<Vec<InstallKind>>,
    /// This product's own delivery windows, in the device's time zone; activation needs one
    /// of these open as well as one of the device's `windows`. Empty: any time.
    #[serde(default)]
    pub windows: Vec<Window>,
    /// This product's defer hook; absent: the device's `[defer]`, if any.
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
        for p in self.products.values_mut() {
            if let Some(root) = p.install_root.as_mut() {
                fix(root);
            }
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
            validate_defer("defer", d)?;
        }
        self.validate_products()
    }

    /// The `[products.<name>]` tables: names, how many, kinds, windows, hooks, and install
    /// roots that cannot prune one another's releases.
    fn validate_products(&self) -> std::result::Result<(), String> {
        if self.products.len() > MAX_PRODUCTS {
            return Err(format!(
                "field products: {} products, at most {MAX_PRODUCTS}",
                self.products.len()
            ));
        }
        let mut roots: Vec<(&str, PathBuf)> = Vec::new();
        for (name, p) in &self.products {
            check_name("product", name)
                .map_err(|e| format!("field products.{name}: {}", e.detail))?;
            if p.kinds.as_ref().is_some_and(Vec::is_empty) {
                return Err(format!(
                    "field products.{name}.kinds: lists no install kind (leave it out to allow any)"
                ));
            }
            Schedule::new(p.windows.clone(), &self.timezone)
                .map_err(|e| format!("field products.{name}.windows: {}", e.detail))?;
            if let Some(d) = &p.defer {
                validate_defer(&format!("products.{name}.defer"), d)?;
            }
            let root = self.product_install_root(name);
            if let Some((other, _)) = roots
                .iter()
                .find(|(_, r)| r.starts_with(&root) || root.starts_with(r))
            {
                return Err(format!(
                    "field products.{name}.install_root: {} overlaps the install root of product {other} \
                     (pruning one product's releases would remove the other's)",
                    root.display()
                ));
            }
            roots.push((name, root));
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

    /// Whether this device runs several named products (`[products]` is not empty).
    pub fn is_multi_product(&self) -> bool {
        !self.products.is_empty()
    }

    /// Where product `name` is installed: its `install_root`, or `{install_root()}/{name}`.
    pub fn product_install_root(&self, name: &str) -> PathBuf {
        self.products
            .get(name)
            .and_then(|p| p.install_root.clone())
            .unwrap_or_else(|| self.install_root().join(name))
    }

    /// Where product `name` keeps its downloads: `{data_dir}/products/{name}/artifacts`, apart
    /// from every other product's, so pruning one never removes another's.
    pub fn product_artifacts_dir(&self, name: &str) -> PathBuf {
        self.data_dir.join("products").join(name).join("artifacts")
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
            products: BTreeMap::new(),
        }
    }
}

/// A defer hook's values serde cannot check; `field` names its table in errors.
fn validate_defer(field: &str, d: &DeferConfig) -> std::result::Result<(), String> {
    if d.command.first().is_none_or(|p| p.trim().is_empty()) {
        return Err(format!("field {field}.command: must name the hook to run"));
    }
    for (name, v) in [
        ("retry", d.retry),
        ("deadline", d.deadline),
        ("timeout", d.timeout),
    ] {
        if v.get().is_zero() {
            return Err(format!("field {field}.{name}: must be longer than 0s"));
        }
    }
    Ok(())
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
    fn no_products_table_means_a_single_product_agent() {
        let c = AgentConfig::from_toml(GOOD, Path::new("a.toml")).unwrap();
        assert!(c.products.is_empty());
        assert!(!c.is_multi_product());
    }

    #[test]
    fn products_load_with_their_own_roots_kinds_windows_and_hooks() {
        let text = format!(
            r#"{GOOD}
[defer]
command = ["/bin/device-hook"]

[products.os]
kinds = ["command"]
windows = ["Sun 01:00-03:00"]
defer = {{ command = ["/bin/os-hook"], retry = "1m" }}

[products.app]
install_root = "apps/main"
"#
        );
        let c = AgentConfig::from_toml(&text, Path::new("/etc/ringcast/agent.toml")).unwrap();
        assert!(c.is_multi_product());
        assert_eq!(
            c.products.keys().collect::<Vec<_>>(),
            vec!["app", "os"],
            "named tables, in name order"
        );
        let os = &c.products["os"];
        assert_eq!(os.kinds, Some(vec![InstallKind::Command]));
        assert_eq!(os.windows, vec![Window::parse("Sun 01:00-03:00").unwrap()]);
        assert_eq!(os.defer.as_ref().unwrap().command, vec!["/bin/os-hook"]);
        assert_eq!(os.defer.as_ref().unwrap().retry, Dur::secs(60));
        // Defaults: under the device's install root, by name; relative roots resolved.
        assert_eq!(
            c.product_install_root("os"),
            Path::new("/etc/ringcast/data/install/os")
        );
        assert_eq!(
            c.product_install_root("app"),
            Path::new("/etc/ringcast/apps/main")
        );
        let app = &c.products["app"];
        assert!(app.kinds.is_none() && app.windows.is_empty() && app.defer.is_none());
        assert_eq!(
            c.product_artifacts_dir("app"),
            Path::new("/etc/ringcast/data/products/app/artifacts")
        );
    }

    #[test]
    fn bad_products_name_their_field() {
        for (table, field) in [
            ("[products.\"bad/name\"]\n", "products.bad/name"),
            ("[products.os]\nkinds = []\n", "products.os.kinds"),
            ("[products.os]\nkinds = [\"rpm\"]\n", "rpm"),
            ("[products.os]\nknids = [\"command\"]\n", "knids"),
            ("[products.os]\nwindows = [\"Mon 25:00-26:00\"]\n", "windows"),
            (
                "[products.os]\ndefer = { command = [] }\n",
                "products.os.defer.command",
            ),
            (
                "[products.os]\ndefer = { command = [\"/bin/x\"], timeout = \"0s\" }\n",
                "products.os.defer.timeout",
            ),
            (
                "[products.os]\ninstall_root = \"/opt/a\"\n[products.app]\ninstall_root = \"/opt/a/x\"\n",
                "products.os.install_root",
            ),
            (
                "[products.os]\ninstall_root = \"/opt/a\"\n[products.app]\ninstall_root = \"/opt/a\"\n",
                "install_root",
            ),
        ] {
            let text = format!("{GOOD}{table}");
            let e = AgentConfig::from_toml(&text, Path::new("/x/agent.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(field) && e.contains("/x/agent.toml"), "{table}: {e}");
        }
        let many: String = (0..=MAX_PRODUCTS)
            .map(|i| format!("[products.p{i}]\n"))
            .collect();
        let e = AgentConfig::from_toml(&format!("{GOOD}{many}"), Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("field products:") && e.contains("at most"),
            "{e}"
        );
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
