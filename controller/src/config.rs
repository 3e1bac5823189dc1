//! `ringcast.toml`: the rollout policy ("rollout as code") and the daemon's settings.
//!
//! Parsed with `deny_unknown_fields` everywhere; every error names the file and the dotted
//! field. The same structs are built in code by the demo and the tests.

use crate::error::{Error, Result};
use ringcast_proto::{Dur, Percent, Schedule, Window};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The whole configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// The rollout policy.
    #[serde(flatten)]
    pub policy: Policy,
    /// HTTP, storage and key settings.
    pub server: ServerConfig,
    /// External broker; absent = embedded rumqttd on 127.0.0.1.
    #[serde(default)]
    pub broker: Option<BrokerConfig>,
    /// API tokens given inline (in addition to `server.tokens_file`).
    #[serde(default, rename = "token")]
    pub tokens: Vec<TokenEntry>,
    /// Webhooks that receive every audit event, HMAC-signed (`[[webhooks]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<WebhookConfig>,
}

/// Fleet-wide policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Fleet name (topic prefix `ringcast/{fleet}` unless `topic_prefix` is set).
    pub fleet: String,
    /// Topic prefix override.
    #[serde(default)]
    pub topic_prefix: Option<String>,
    /// Real-time interval at which the engine re-evaluates rollouts against the clock.
    #[serde(default = "default_tick")]
    pub tick: Dur,
    /// Lifetime of a signed directive; it is re-signed when half of it has passed.
    #[serde(default = "default_ttl")]
    pub directive_ttl: Dur,
    /// A device silent for this long counts as `unresponsive`.
    #[serde(default = "default_unresponsive")]
    pub unresponsive_after: Dur,
    /// Clock skew allowed when verifying submitted releases.
    #[serde(default = "default_skew")]
    pub allowed_skew: Dur,
    /// What a release submitted while another rollout of the same name is live does:
    /// `supersede` it (the older rollout ends, the new one starts) or `queue` behind it.
    /// Default: `supersede` when every ring promotes automatically, else `queue`.
    #[serde(default)]
    pub on_new_release: Option<OnNewRelease>,
    /// Rings, in promotion order.
    pub rings: Vec<RingPolicy>,
}

/// What a new release does to a live rollout of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnNewRelease {
    /// The older rollout ends (`superseded`) and the new one starts: continuous deployment,
    /// or a hotfix overtaking a release that waits for approval.
    Supersede,
    /// The new rollout waits until the older one has finished.
    Queue,
}

fn default_tick() -> Dur {
    Dur(std::time::Duration::from_millis(200))
}
fn default_ttl() -> Dur {
    Dur::secs(3600)
}
fn default_unresponsive() -> Dur {
    Dur::secs(15 * 60)
}
fn default_skew() -> Dur {
    Dur::secs(300)
}
fn default_check_retry() -> Dur {
    Dur::secs(300)
}

/// One ring's policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RingPolicy {
    /// Ring name (as devices are configured).
    pub name: String,
    /// Percent ramp; the last step is normally 100.
    #[serde(default = "default_steps")]
    pub steps: Vec<Percent>,
    /// How long each step must stay healthy before the next.
    pub bake: Dur,
    /// Health gate.
    pub gate: Gate,
    /// `auto` = continuous deployment; `manual` = an approval is required to enter the ring.
    #[serde(default)]
    pub promotion: Promotion,
    /// Delivery windows; empty = any time.
    #[serde(default)]
    pub windows: Vec<Window>,
    /// IANA zone of `windows`.
    #[serde(default = "default_tz")]
    pub timezone: String,
    /// What a crossed gate does.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Acceptance checks that must pass before the ring is promoted.
    #[serde(default)]
    pub checks: Vec<Check>,
    /// Retry interval (controller clock) for failed checks.
    #[serde(default = "default_check_retry")]
    pub check_retry: Dur,
    /// Runs of the acceptance checks before the ring's `on_failure` applies (at least 1).
    #[serde(default = "default_check_attempts")]
    pub check_attempts: u32,
    /// Longest a step may wait for its gate after its directive went out (or since the
    /// rollout was last resumed); then the rollout ends with the reason (the ring's
    /// `on_failure`). `0s` = no limit. Unset: see [`RingPolicy::step_timeout`].
    #[serde(default, rename = "step_timeout")]
    pub step_timeout_setting: Option<Dur>,
    /// How many times a device whose install failed in this ring is asked to try again
    /// within the rollout (0 = never); a failure counts against the gate only after the last.
    #[serde(default)]
    pub retries: u32,
    /// Wait before the first retry; each further one waits twice as long as the one before.
    #[serde(default = "default_retry_backoff")]
    pub retry_backoff: Dur,
}

fn default_retry_backoff() -> Dur {
    Dur::secs(600)
}

/// Most retries a ring may ask for.
pub const MAX_RETRIES: u32 = 10;

/// `step_timeout` of a ring without delivery windows, when the policy sets none.
pub const DEFAULT_STEP_TIMEOUT: Dur = Dur::secs(24 * 3600);
/// `step_timeout` of a ring with delivery windows, when the policy sets none: a week of
/// windows (a weekly window can leave a device waiting six days) and a day to report.
pub const DEFAULT_WINDOWED_STEP_TIMEOUT: Dur = Dur::secs(8 * 24 * 3600);

impl RingPolicy {
    /// The step timeout in force: the policy's, or a default that fits the ring's windows
    /// ([`DEFAULT_STEP_TIMEOUT`], or [`DEFAULT_WINDOWED_STEP_TIMEOUT`] for a ring with
    /// delivery windows, whose devices may wait days for one).
    pub fn step_timeout(&self) -> Dur {
        self.step_timeout_setting
            .unwrap_or(if self.windows.is_empty() {
                DEFAULT_STEP_TIMEOUT
            } else {
                DEFAULT_WINDOWED_STEP_TIMEOUT
            })
    }
}

fn default_check_attempts() -> u32 {
    3
}

fn default_steps() -> Vec<Percent> {
    vec![Percent::FULL]
}
fn default_tz() -> String {
    "UTC".into()
}

/// Gate: enough evidence, few enough failures.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gate {
    /// Reports required before the gate may promote (or halt).
    pub min_reports: u32,
    /// Failure rate above which the rollout halts (0.0–1.0).
    pub max_failure_rate: f64,
}

/// Promotion mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Promotion {
    /// Continuous deployment.
    #[default]
    Auto,
    /// Continuous delivery: approval required.
    Manual,
}

/// Reaction to a crossed gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Publish `hold`.
    #[default]
    Halt,
    /// Publish an install of the last completed release.
    Rollback,
}

/// An acceptance check.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    /// Name (audit, API).
    pub name: String,
    /// `command` (exit 0) or `http` (2xx).
    pub kind: CheckKind,
    /// argv for `command`; gets `RINGCAST_RING`, `RINGCAST_ROLLOUT`, `RINGCAST_RELEASE` env.
    #[serde(default)]
    pub command: Vec<String>,
    /// URL for `http` (GET).
    #[serde(default)]
    pub url: Option<String>,
    /// Timeout.
    #[serde(default = "default_check_timeout")]
    pub timeout: Dur,
}

fn default_check_timeout() -> Dur {
    Dur::secs(300)
}

/// Check kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    /// Run a command.
    Command,
    /// GET a URL.
    Http,
}

/// HTTP, data and key settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// HTTP listen address (`127.0.0.1:0` picks a free port).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Directory for the sled database and the artifact store.
    pub data_dir: PathBuf,
    /// Trust root file (DSSE envelope) published on `…/trust` and used to verify releases.
    pub trust: PathBuf,
    /// PKCS#8 PEM key of the `controller` role.
    pub controller_key: PathBuf,
    /// Token file (`[[token]]` entries, same shape as inline tokens).
    #[serde(default)]
    pub tokens_file: Option<PathBuf>,
    /// Public base URL agents use for artifacts (informational; agents are configured).
    #[serde(default)]
    pub public_url: Option<String>,
    /// Largest artifact accepted by upload, a safety cap: uploads stream to a temp file and
    /// downloads stream from the file, so memory does not grow with it, but `data_dir` needs
    /// this much free space per upload in flight. Default 8 GiB.
    #[serde(default = "default_max_artifact")]
    pub max_artifact_bytes: u64,
    /// Events kept per device (its history, where a revert's evidence outlives the events
    /// after it). Default 50; at least 1.
    #[serde(default = "default_device_events")]
    pub device_events: usize,
}

fn default_device_events() -> usize {
    crate::store::EVENT_HISTORY
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8480))
}
fn default_max_artifact() -> u64 {
    8 * 1024 * 1024 * 1024
}

/// External MQTT broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Host name.
    pub host: String,
    /// Port.
    #[serde(default = "default_mqtt_port")]
    pub port: u16,
    /// Client id.
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// MQTT version: `auto` (MQTT 5 where the broker speaks it, else 3.1.1; the default),
    /// `5` or `3.1.1`.
    #[serde(default)]
    pub protocol: ringcast_io::mqtt::Protocol,
    /// Watch the broker's count of dropped messages (Mosquitto's
    /// `$SYS/broker/publish/messages/dropped`) and re-read the fleet's retained reports when
    /// it grows. Harmless on a broker without it.
    #[serde(default = "default_true")]
    pub watch_drops: bool,
    /// Keep the controller's session on the broker across disconnects and restarts, so
    /// events (not retained) published meanwhile wait for it. `false` for brokers that do not
    /// re-send retained messages when a kept session subscribes again (rumqttd): state reports
    /// are then re-read completely at every connect, and only events from the gap are lost.
    #[serde(default = "default_true")]
    pub persistent_session: bool,
    /// User name.
    #[serde(default)]
    pub username: Option<String>,
    /// Password.
    #[serde(default)]
    pub password: Option<String>,
    /// TLS to the broker (e.g. the shipped Mosquitto config, which requires mutual TLS);
    /// absent = plain TCP.
    #[serde(default)]
    pub tls: Option<BrokerTls>,
}

/// TLS settings for the broker connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerTls {
    /// CA certificate(s) (PEM) the broker's certificate must chain to.
    pub ca_file: PathBuf,
    /// Client certificate chain (PEM) for mutual TLS (CN `ringcast-controller` under the
    /// shipped ACL).
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
}

fn default_true() -> bool {
    true
}
fn default_mqtt_port() -> u16 {
    1883
}
fn default_client_id() -> String {
    "ringcast-controller".into()
}

/// One webhook: audit events are POSTed to `url`, signed with the secret in `secret_file`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Unique name, `[a-z0-9_-]` (logs, metrics, the delivery cursor's key).
    pub name: String,
    /// `http://` or `https://` URL that receives the POSTs.
    pub url: String,
    /// File holding the HMAC secret (at least 16 bytes; a trailing newline is trimmed).
    pub secret_file: PathBuf,
    /// Audit actions to deliver; absent = all.
    #[serde(default)]
    pub events: Option<Vec<String>>,
    /// Timeout of one delivery attempt.
    #[serde(default = "default_webhook_timeout")]
    pub timeout: Dur,
    /// First retry delay; doubles per failed attempt.
    #[serde(default = "default_webhook_retry_min")]
    pub retry_min: Dur,
    /// Longest retry delay.
    #[serde(default = "default_webhook_retry_max")]
    pub retry_max: Dur,
}

fn default_webhook_timeout() -> Dur {
    Dur::secs(10)
}
fn default_webhook_retry_min() -> Dur {
    Dur::secs(1)
}
fn default_webhook_retry_max() -> Dur {
    Dur::secs(300)
}

impl WebhookConfig {
    fn validate(&self, file: &str, at: &str) -> Result<()> {
        let f = |n: &str| format!("{at}.{n}");
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
        {
            return Err(cfg_err(
                file,
                f("name"),
                format!("{:?} is not 1-64 of [a-z0-9_-]", self.name),
            ));
        }
        let url_ok = reqwest::Url::parse(&self.url).is_ok_and(|u| {
            matches!(u.scheme(), "http" | "https") && u.host_str().is_some_and(|h| !h.is_empty())
        });
        if !url_ok {
            return Err(cfg_err(
                file,
                f("url"),
                format!("{:?} is not an http(s) URL", self.url),
            ));
        }
        if self.events.as_ref().is_some_and(|e| e.is_empty()) {
            return Err(cfg_err(
                file,
                f("events"),
                "an empty list delivers nothing; omit `events` to deliver all",
            ));
        }
        for (n, d) in [
            ("timeout", self.timeout),
            ("retry_min", self.retry_min),
            ("retry_max", self.retry_max),
        ] {
            if d.get().is_zero() {
                return Err(cfg_err(file, f(n), "must be above zero"));
            }
        }
        if self.retry_max.get() < self.retry_min.get() {
            return Err(cfg_err(file, f("retry_max"), "must be at least retry_min"));
        }
        Ok(())
    }

    /// Read the secret (trailing newline trimmed); errors name `{at}.secret_file`.
    pub fn load_secret(&self, at: &str) -> Result<Vec<u8>> {
        let field = format!("{at}.secret_file");
        let file = self.secret_file.display().to_string();
        let mut secret = std::fs::read(&self.secret_file)
            .map_err(|e| cfg_err(&file, &field, format!("cannot read: {e}")))?;
        // Like private keys: a secret others can read is a secret no longer.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&self.secret_file)
                .map_err(|e| cfg_err(&file, &field, format!("cannot read: {e}")))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(cfg_err(
                    &file,
                    &field,
                    format!(
                        "mode {:04o}: a webhook secret must not be readable by group or \
                         others (chmod 600 {file})",
                        mode & 0o7777
                    ),
                ));
            }
        }
        if secret.last() == Some(&b'\n') {
            secret.pop();
            if secret.last() == Some(&b'\r') {
                secret.pop();
            }
        }
        if secret.len() < 16 {
            return Err(cfg_err(
                &file,
                &field,
                format!("secret is {} bytes; at least 16 are required", secret.len()),
            ));
        }
        Ok(secret)
    }
}

/// API roles, ordered: `viewer` < `operator` < `approver`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiRole {
    /// Read only.
    Viewer,
    /// Submit, pause, resume, abort.
    Operator,
    /// Everything, including approvals.
    Approver,
}

impl ApiRole {
    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiRole::Viewer => "viewer",
            ApiRole::Operator => "operator",
            ApiRole::Approver => "approver",
        }
    }
}

/// An API bearer token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// Who holds it (audited as the actor).
    pub name: String,
    /// Its role.
    pub role: ApiRole,
    /// The token itself …
    #[serde(default)]
    pub token: Option<String>,
    /// … or its lowercase hex SHA-256 (preferred in files).
    #[serde(default)]
    pub sha256: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

fn cfg_err(file: &str, field: impl Into<String>, detail: impl Into<String>) -> Error {
    Error::Config {
        file: file.to_owned(),
        field: field.into(),
        detail: detail.into(),
    }
}

/// Split a toml error into (field path, message), best effort: toml names the key in its
/// message for unknown/missing fields; we add the line for the rest.
fn toml_err(file: &str, src: &str, e: toml::de::Error) -> Error {
    let msg = e.message().to_owned();
    let field = e
        .span()
        .and_then(|s| src.get(s.clone()))
        .map(|s| s.trim().trim_matches('"').to_owned())
        .filter(|s| !s.is_empty() && s.len() < 80 && !s.contains('\n'))
        .unwrap_or_else(|| "(document)".into());
    let line = e
        .span()
        .map(|s| src.get(..s.start).unwrap_or(src).lines().count().max(1))
        .unwrap_or(0);
    cfg_err(file, field, format!("{msg} (line {line})"))
}

impl ControllerConfig {
    /// Parse and validate a config document; relative paths are resolved against `base`.
    pub fn parse(src: &str, file: &str, base: &Path) -> Result<ControllerConfig> {
        let mut c: ControllerConfig = toml::from_str(src).map_err(|e| toml_err(file, src, e))?;
        for p in [
            &mut c.server.data_dir,
            &mut c.server.trust,
            &mut c.server.controller_key,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(tls) = c.broker.as_mut().and_then(|b| b.tls.as_mut()) {
            for p in [
                Some(&mut tls.ca_file),
                tls.client_cert.as_mut(),
                tls.client_key.as_mut(),
            ]
            .into_iter()
            .flatten()
            {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
        if let Some(t) = &mut c.server.tokens_file {
            if t.is_relative() {
                *t = base.join(&*t);
            }
        }
        for w in &mut c.webhooks {
            if w.secret_file.is_relative() {
                w.secret_file = base.join(&w.secret_file);
            }
        }
        c.validate(file)?;
        Ok(c)
    }

    /// Load from a file.
    pub fn load(path: &Path) -> Result<ControllerConfig> {
        let src = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        ControllerConfig::parse(&src, &path.display().to_string(), base)
    }

    /// Check everything serde cannot.
    pub fn validate(&self, file: &str) -> Result<()> {
        self.policy.validate(file)?;
        if let Some(tls) = self.broker.as_ref().and_then(|b| b.tls.as_ref()) {
            if tls.client_cert.is_some() != tls.client_key.is_some() {
                return Err(cfg_err(
                    file,
                    "broker.tls.client_cert",
                    "client_cert and client_key go together",
                ));
            }
        }
        for (i, t) in self.tokens.iter().enumerate() {
            t.validate(file, &format!("token[{i}]"))?;
        }
        let mut names = std::collections::HashSet::new();
        for (i, w) in self.webhooks.iter().enumerate() {
            let at = format!("webhooks[{i}]");
            w.validate(file, &at)?;
            if !names.insert(w.name.as_str()) {
                return Err(cfg_err(
                    file,
                    format!("{at}.name"),
                    format!("webhook {:?} appears twice", w.name),
                ));
            }
        }
        Ok(())
    }

    /// All tokens: inline plus the token file.
    pub fn all_tokens(&self) -> Result<Vec<TokenEntry>> {
        let mut out = self.tokens.clone();
        if let Some(p) = &self.server.tokens_file {
            let src = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            let file = p.display().to_string();
            let tf: TokenFile = toml::from_str(&src).map_err(|e| toml_err(&file, &src, e))?;
            for (i, t) in tf.token.iter().enumerate() {
                t.validate(&file, &format!("token[{i}]"))?;
            }
            out.extend(tf.token);
        }
        Ok(out)
    }
}

impl TokenEntry {
    fn validate(&self, file: &str, at: &str) -> Result<()> {
        match (&self.token, &self.sha256) {
            (Some(t), None) if t.len() >= 16 => Ok(()),
            (Some(_), None) => Err(cfg_err(
                file,
                format!("{at}.token"),
                "shorter than 16 characters",
            )),
            (None, Some(h)) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(()),
            (None, Some(_)) => Err(cfg_err(
                file,
                format!("{at}.sha256"),
                "not 64 hex characters",
            )),
            _ => Err(cfg_err(file, at, "give exactly one of `token` or `sha256`")),
        }
    }

    /// The SHA-256 of the token, lowercase hex.
    pub fn digest(&self) -> String {
        match (&self.sha256, &self.token) {
            (Some(h), _) => h.to_ascii_lowercase(),
            (None, Some(t)) => ringcast_proto::digest::sha256_hex(t.as_bytes()),
            (None, None) => String::new(),
        }
    }
}

impl Policy {
    /// Check rings, steps, gates, windows and zones.
    pub fn validate(&self, file: &str) -> Result<()> {
        ringcast_proto::limits::check_name("fleet", &self.fleet)
            .map_err(|e| cfg_err(file, "fleet", e.detail))?;
        if let Some(p) = &self.topic_prefix {
            ringcast_proto::Topics::with_prefix(p)
                .map_err(|e| cfg_err(file, "topic_prefix", e.detail))?;
        }
        if self.tick.get().is_zero() {
            return Err(cfg_err(file, "tick", "must be above zero"));
        }
        if self.directive_ttl.get() < std::time::Duration::from_secs(10) {
            return Err(cfg_err(file, "directive_ttl", "must be at least 10s"));
        }
        if self.rings.is_empty() {
            return Err(cfg_err(file, "rings", "at least one ring is required"));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, r) in self.rings.iter().enumerate() {
            let at = |f: &str| format!("rings[{i}].{f}");
            ringcast_proto::limits::check_name("ring", &r.name)
                .map_err(|e| cfg_err(file, at("name"), e.detail))?;
            if !seen.insert(r.name.as_str()) {
                return Err(cfg_err(
                    file,
                    at("name"),
                    format!("ring {:?} appears twice", r.name),
                ));
            }
            if r.steps.is_empty() {
                return Err(cfg_err(file, at("steps"), "at least one step is required"));
            }
            if r.steps.windows(2).any(|w| w[1] <= w[0]) {
                return Err(cfg_err(file, at("steps"), "steps must strictly increase"));
            }
            if r.steps.contains(&Percent::ZERO) {
                return Err(cfg_err(file, at("steps"), "a step of 0% delivers nothing"));
            }
            if r.check_attempts == 0 {
                return Err(cfg_err(
                    file,
                    at("check_attempts"),
                    "at least one attempt is required",
                ));
            }
            if r.retries > MAX_RETRIES {
                return Err(cfg_err(
                    file,
                    at("retries"),
                    format!("at most {MAX_RETRIES} retries"),
                ));
            }
            if r.retries > 0 && r.retry_backoff.get().is_zero() {
                return Err(cfg_err(
                    file,
                    at("retry_backoff"),
                    "a retry needs a backoff above 0s",
                ));
            }
            let g = r.gate;
            if !(0.0..=1.0).contains(&g.max_failure_rate) || !g.max_failure_rate.is_finite() {
                return Err(cfg_err(
                    file,
                    at("gate.max_failure_rate"),
                    "must be between 0.0 and 1.0",
                ));
            }
            Schedule::new(r.windows.clone(), &r.timezone)
                .map_err(|e| cfg_err(file, at("timezone"), e.detail))?;
            for (j, c) in r.checks.iter().enumerate() {
                let cat = |f: &str| format!("rings[{i}].checks[{j}].{f}");
                match c.kind {
                    CheckKind::Command if c.command.is_empty() => {
                        return Err(cfg_err(
                            file,
                            cat("command"),
                            "a command check needs a command",
                        ))
                    }
                    CheckKind::Http
                        if !c.url.as_deref().is_some_and(|u| {
                            u.starts_with("http://") || u.starts_with("https://")
                        }) =>
                    {
                        return Err(cfg_err(
                            file,
                            cat("url"),
                            "an http check needs an http(s) url",
                        ))
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// The topic names of this fleet.
    pub fn topics(&self) -> Result<ringcast_proto::Topics> {
        let t = match &self.topic_prefix {
            Some(p) => ringcast_proto::Topics::with_prefix(p),
            None => ringcast_proto::Topics::for_fleet(&self.fleet),
        };
        Ok(t?)
    }

    /// Whether every ring promotes automatically.
    pub fn all_auto(&self) -> bool {
        self.rings.iter().all(|r| r.promotion == Promotion::Auto)
    }

    /// What a new release does to a live one of the same name: `on_new_release`, or by
    /// default supersede when every ring is automatic and queue otherwise.
    pub fn new_release_rule(&self) -> OnNewRelease {
        self.on_new_release.unwrap_or(if self.all_auto() {
            OnNewRelease::Supersede
        } else {
            OnNewRelease::Queue
        })
    }

    /// The ring named `name`.
    pub fn ring(&self, name: &str) -> Option<&RingPolicy> {
        self.rings.iter().find(|r| r.name == name)
    }

    /// The ring after `name`, if there is one.
    pub fn next_ring(&self, name: &str) -> Option<&RingPolicy> {
        let i = self.ring_index(name)?;
        self.rings.get(i + 1)
    }

    /// Index of a ring by name.
    pub fn ring_index(&self, name: &str) -> Option<usize> {
        self.rings.iter().position(|r| r.name == name)
    }
}

impl RingPolicy {
    /// The ring's window schedule.
    pub fn schedule(&self) -> Schedule {
        Schedule::new(self.windows.clone(), &self.timezone).unwrap_or_else(|_| Schedule::always())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
fleet = "plant-7"
[server]
data_dir = "data"
trust = "trust.json"
controller_key = "controller.key"
[[rings]]
name = "canary"
steps = [10, 100]
bake = "30m"
gate = { min_reports = 5, max_failure_rate = 0.2 }
[[rings]]
name = "broad"
bake = "1h"
promotion = "manual"
windows = ["Tue,Thu 02:00-05:00"]
timezone = "Europe/Berlin"
gate = { min_reports = 50, max_failure_rate = 0.05 }
on_failure = "rollback"
"#;

    #[test]
    fn good_config_parses_and_resolves_paths() {
        let c = ControllerConfig::parse(GOOD, "r.toml", Path::new("/etc/rc")).unwrap();
        assert_eq!(c.policy.rings.len(), 2);
        assert_eq!(c.server.data_dir, Path::new("/etc/rc/data"));
        assert_eq!(c.policy.rings[1].promotion, Promotion::Manual);
        assert!(!c.policy.all_auto());
    }

    #[test]
    fn unknown_field_is_named() {
        let src = GOOD.replace("bake = \"1h\"", "bake = \"1h\"\nbaek = \"2h\"");
        let e = ControllerConfig::parse(&src, "r.toml", Path::new("/")).unwrap_err();
        assert!(e.to_string().contains("baek"), "{e}");
    }

    #[test]
    fn bad_values_name_their_field() {
        for (from, to, field) in [
            (
                "max_failure_rate = 0.2",
                "max_failure_rate = 1.5",
                "rings[0].gate.max_failure_rate",
            ),
            ("steps = [10, 100]", "steps = [50, 10]", "rings[0].steps"),
            ("\"Europe/Berlin\"", "\"Mars/Base\"", "rings[1].timezone"),
            ("name = \"broad\"", "name = \"canary\"", "rings[1].name"),
        ] {
            let src = GOOD.replace(from, to);
            let e = ControllerConfig::parse(&src, "r.toml", Path::new("/")).unwrap_err();
            assert!(e.to_string().contains(field), "{field}: {e}");
        }
        let e = ControllerConfig::parse(
            &GOOD.replace("\"30m\"", "\"30 minutes\""),
            "r.toml",
            Path::new("/"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("30 minutes"), "{e}");
    }

    #[test]
    fn example_policy_in_deploy_parses() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/ringcast.toml");
        ControllerConfig::load(&p).unwrap();
    }
}
