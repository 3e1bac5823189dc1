//! Run Mosquitto with the SHIPPED configuration (`deploy/mosquitto/mosquitto.conf` and
//! `deploy/mosquitto/acl`), templated only for the listener port, certificate, ACL, pid, log
//! and data paths, so the tests prove what operators install.
//!
//! Skipping: [`require_or_skip`] returns `None` with a clear message when no `mosquitto`
//! binary exists, except under `CI`, where it panics: CI installs Mosquitto, so a missing
//! binary there is a broken pipeline, not a reason to pass.

use crate::certs::CertSet;
use crate::error::{HarnessError, Result};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What a test prints when it skips for want of Mosquitto.
pub const SKIP_MESSAGE: &str = "skipped: mosquitto not found (apt-get install mosquitto)";

/// How long a broker may take to accept connections, and to exit after SIGTERM.
const START_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// The real interval at which start and stop are polled.
const POLL: Duration = Duration::from_millis(20);

/// The shipped broker configuration.
pub fn shipped_config_path() -> PathBuf {
    crate::deploy_dir().join("mosquitto").join("mosquitto.conf")
}

/// The shipped ACL.
pub fn shipped_acl_path() -> PathBuf {
    crate::deploy_dir().join("mosquitto").join("acl")
}

/// The `mosquitto` binary: `$RINGCAST_MOSQUITTO` if set, else the first on `PATH`, else
/// Debian's `/usr/sbin/mosquitto` (sbin is often missing from a user's PATH).
pub fn find() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("RINGCAST_MOSQUITTO") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
}

/// The binary, or `None` after printing [`SKIP_MESSAGE`]. Panics under `CI` when missing.
pub fn require_or_skip() -> Option<PathBuf> {
    match find() {
        Some(p) => Some(p),
        None if crate::is_ci() => {
            panic!(
                "mosquitto not found but CI is set: CI must install it (apt-get install mosquitto)"
            )
        }
        None => {
            eprintln!("{SKIP_MESSAGE}");
            None
        }
    }
}

/// Where one broker instance keeps its files.
#[derive(Debug, Clone)]
pub struct BrokerFiles {
    /// CA certificate clients are verified against.
    pub ca: PathBuf,
    /// Broker certificate.
    pub server_cert: PathBuf,
    /// Broker key.
    pub server_key: PathBuf,
    /// ACL file.
    pub acl: PathBuf,
    /// Persistence directory (retained messages survive a restart here).
    pub data_dir: PathBuf,
    /// Log file.
    pub log: PathBuf,
    /// Pid file.
    pub pid: PathBuf,
}

/// Template the shipped configuration for a test broker on `127.0.0.1:port`.
///
/// Only these directives are rewritten: `listener`, `cafile`, `certfile`, `keyfile`,
/// `acl_file`, `persistence_location`, `pid_file`, `log_dest`. Each must occur exactly once in
/// the shipped file, so a config that drifts from what the test expects fails loudly instead of
/// silently testing something else. When the tests run as root, `user root` is appended:
/// Mosquitto 2.0 otherwise drops to the `mosquitto` user and cannot read the test's private
/// temp dir (it is ignored when not started as root).
pub fn render_config(
    shipped: &str,
    port: u16,
    files: &BrokerFiles,
    as_root: bool,
) -> Result<String> {
    let replacements: [(&str, String); 8] = [
        ("listener", format!("listener {port} 127.0.0.1")),
        ("cafile", format!("cafile {}", files.ca.display())),
        (
            "certfile",
            format!("certfile {}", files.server_cert.display()),
        ),
        ("keyfile", format!("keyfile {}", files.server_key.display())),
        ("acl_file", format!("acl_file {}", files.acl.display())),
        (
            "persistence_location",
            // Mosquitto appends the file name to this string: it must end with '/'.
            format!("persistence_location {}/", files.data_dir.display()),
        ),
        ("pid_file", format!("pid_file {}", files.pid.display())),
        ("log_dest", format!("log_dest file {}", files.log.display())),
    ];
    let mut seen = [0usize; 8];
    let mut out = String::with_capacity(shipped.len() + 256);
    for line in shipped.lines() {
        let key = line.split_whitespace().next().unwrap_or("");
        match replacements.iter().position(|(k, _)| *k == key) {
            Some(i) => {
                seen[i] += 1;
                out.push_str(&replacements[i].1);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    for (i, (key, _)) in replacements.iter().enumerate() {
        if seen[i] != 1 {
            return Err(HarnessError::Template(format!(
                "the shipped mosquitto.conf has {} `{key}` lines; the test templates exactly one",
                seen[i]
            )));
        }
    }
    if as_root {
        out.push_str("# test harness: running as root, keep root (else Mosquitto drops to `mosquitto`)\nuser root\n");
    }
    Ok(out)
}

/// Directives of the shipped configuration that concern who may connect and how (TLS,
/// certificates, ACL): [`render_plain_config`] drops them.
const AUTH_DIRECTIVES: [&str; 11] = [
    "listener",
    "protocol",
    "cafile",
    "certfile",
    "keyfile",
    "tls_version",
    "require_certificate",
    "use_identity_as_username",
    "use_username_as_clientid",
    "acl_file",
    "allow_anonymous",
];

/// The shipped configuration with its limits, persistence and logging, but a plain anonymous
/// listener on `127.0.0.1:port` and no ACL: for tests with more synthetic devices than it is
/// worth making certificates for (a burst of 20,000 reports), which measure the broker
/// settings that ship. `overrides` replace the value of a shipped directive (or add one), e.g.
/// `("max_queued_messages", "100")` to prove what a too-small queue does.
pub fn render_plain_config(
    shipped: &str,
    port: u16,
    files: &BrokerFiles,
    as_root: bool,
    overrides: &[(&str, &str)],
) -> Result<String> {
    let paths: [(&str, String); 3] = [
        (
            "persistence_location",
            format!("persistence_location {}/", files.data_dir.display()),
        ),
        ("pid_file", format!("pid_file {}", files.pid.display())),
        ("log_dest", format!("log_dest file {}", files.log.display())),
    ];
    let mut seen = [0usize; 3];
    let mut overridden = vec![false; overrides.len()];
    let mut out = String::with_capacity(shipped.len() + 256);
    for line in shipped.lines() {
        let key = line.split_whitespace().next().unwrap_or("");
        if AUTH_DIRECTIVES.contains(&key) {
            out.push_str("# (test harness: plain listener) ");
            out.push_str(line);
        } else if let Some(i) = paths.iter().position(|(k, _)| *k == key) {
            seen[i] += 1;
            out.push_str(&paths[i].1);
        } else if let Some(i) = overrides.iter().position(|(k, _)| *k == key) {
            overridden[i] = true;
            out.push_str(&format!("{} {}", overrides[i].0, overrides[i].1));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    for (i, (key, _)) in paths.iter().enumerate() {
        if seen[i] != 1 {
            return Err(HarnessError::Template(format!(
                "the shipped mosquitto.conf has {} `{key}` lines; the test templates exactly one",
                seen[i]
            )));
        }
    }
    for (i, (k, v)) in overrides.iter().enumerate() {
        if !overridden[i] {
            out.push_str(&format!("{k} {v}\n"));
        }
    }
    out.push_str(&format!(
        "# test harness: plain anonymous listener\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
    ));
    if as_root {
        out.push_str("user root\n");
    }
    Ok(out)
}

/// Whether this process runs with effective uid 0 (read from /proc: no libc needed).
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// A Mosquitto process running the shipped config. Dropping it kills the broker.
#[derive(Debug)]
pub struct Mosquitto {
    binary: PathBuf,
    config: PathBuf,
    files: BrokerFiles,
    port: u16,
    child: Option<Child>,
    /// `Some(overrides)`: the plain-listener flavour ([`render_plain_config`]).
    plain: Option<Vec<(String, String)>>,
}

impl Mosquitto {
    /// Start the shipped config with `certs`' broker certificate and the shipped ACL, keeping
    /// config, data and log in `dir`. Retries with a fresh port if another process grabbed
    /// the one picked.
    pub fn start(binary: &Path, certs: &CertSet, dir: &Path) -> Result<Mosquitto> {
        let data_dir = dir.join("data");
        std::fs::create_dir_all(&data_dir)
            .map_err(|e| HarnessError::io_path("creating", &data_dir, e))?;
        let acl = dir.join("ringcast.acl");
        std::fs::copy(shipped_acl_path(), &acl)
            .map_err(|e| HarnessError::io_path("copying the shipped ACL to", &acl, e))?;
        let files = BrokerFiles {
            ca: certs.ca(),
            server_cert: certs.server_cert(),
            server_key: certs.server_key(),
            acl,
            data_dir,
            log: dir.join("mosquitto.log"),
            pid: dir.join("mosquitto.pid"),
        };
        let mut last = None;
        for _ in 0..3 {
            let port = crate::free_port()?;
            let mut broker = Mosquitto {
                binary: binary.to_path_buf(),
                config: dir.join("mosquitto.conf"),
                files: files.clone(),
                port,
                child: None,
                plain: None,
            };
            match broker.spawn() {
                Ok(()) => return Ok(broker),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| HarnessError::Timeout("mosquitto never started".into())))
    }

    /// Start the shipped config's plain-listener flavour ([`render_plain_config`]) with
    /// `overrides`, keeping config, data and log in `dir`. Clients connect to
    /// `mqtt://127.0.0.1:{port}` with any client id.
    pub fn start_plain(binary: &Path, dir: &Path, overrides: &[(&str, &str)]) -> Result<Mosquitto> {
        let data_dir = dir.join("data");
        std::fs::create_dir_all(&data_dir)
            .map_err(|e| HarnessError::io_path("creating", &data_dir, e))?;
        let files = BrokerFiles {
            ca: PathBuf::new(),
            server_cert: PathBuf::new(),
            server_key: PathBuf::new(),
            acl: PathBuf::new(),
            data_dir,
            log: dir.join("mosquitto.log"),
            pid: dir.join("mosquitto.pid"),
        };
        let overrides: Vec<(String, String)> = overrides
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let mut last = None;
        for _ in 0..3 {
            let mut broker = Mosquitto {
                binary: binary.to_path_buf(),
                config: dir.join("mosquitto.conf"),
                files: files.clone(),
                port: crate::free_port()?,
                child: None,
                plain: Some(overrides.clone()),
            };
            match broker.spawn() {
                Ok(()) => return Ok(broker),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| HarnessError::Timeout("mosquitto never started".into())))
    }

    /// Plain flavour: the overrides the next (re)start uses.
    pub fn set_overrides(&mut self, overrides: &[(&str, &str)]) {
        self.plain = Some(
            overrides
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        );
    }

    /// `mqtt://127.0.0.1:{port}` (the plain flavour; the shipped one speaks `mqtts://`).
    pub fn mqtt_url(&self) -> String {
        format!("mqtt://{}:{}", self.host(), self.port)
    }

    /// Write the config for the current port and start the process; wait until it accepts TCP.
    fn spawn(&mut self) -> Result<()> {
        let shipped_path = shipped_config_path();
        let shipped = std::fs::read_to_string(&shipped_path)
            .map_err(|e| HarnessError::io_path("reading", &shipped_path, e))?;
        let conf = match &self.plain {
            None => render_config(&shipped, self.port, &self.files, running_as_root())?,
            Some(o) => {
                let o: Vec<(&str, &str)> =
                    o.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                render_plain_config(&shipped, self.port, &self.files, running_as_root(), &o)?
            }
        };
        std::fs::write(&self.config, conf)
            .map_err(|e| HarnessError::io_path("writing", &self.config, e))?;
        // The log is appended across restarts: count the "running" lines seen so far.
        let runs_before = self.running_lines();
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| HarnessError::io_path("starting", &self.binary, e))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(HarnessError::BrokerStart {
                        detail: format!("mosquitto exited with {status} on port {}", self.port),
                        log: self.log(),
                    });
                }
            }
            // Ready when THIS process says it is running (it logs that after binding every
            // listener) and the port answers. The log line matters: a parallel test's broker
            // may have grabbed the port, and a bare connect would then reach that broker
            // while ours is failing to bind. (Mosquitto logs and drops the probe connection.)
            if self.running_lines() > runs_before
                && TcpStream::connect_timeout(&([127, 0, 0, 1], self.port).into(), POLL).is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(HarnessError::BrokerStart {
                    detail: format!(
                        "mosquitto did not accept connections on port {} within {START_TIMEOUT:?}",
                        self.port
                    ),
                    log: self.log(),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// How many times the log says a broker started successfully.
    fn running_lines(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("mosquitto version") && l.ends_with(" running"))
            .count()
    }

    /// The host clients connect to (the server certificate has it as an IP SAN).
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// The TLS listener's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The files this broker uses.
    pub fn files(&self) -> &BrokerFiles {
        &self.files
    }

    /// The broker's log so far (for assertions and failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.files.log).unwrap_or_default()
    }

    /// Wait (bounded, polling the log on a short real interval) until the broker's log has a
    /// line containing `needle`: e.g. `"Client dev-1 closed its connection"` to know the
    /// broker has processed a disconnect (and fired its will) before the test goes on.
    /// Async so the test's own tasks (say, a client being torn down) keep running meanwhile.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout(format!(
                    "no {needle:?} in the broker log within {timeout:?}:\n{}",
                    self.log()
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Stop gracefully (SIGTERM, so retained messages are saved), bounded; SIGKILL after.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(POLL);
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Kill at once (SIGKILL): a broker crash. Retained messages not yet autosaved are lost.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start again on the same port with the same data directory (after [`Mosquitto::stop`]
    /// or [`Mosquitto::kill`]; stops a running broker first).
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> BrokerFiles {
        BrokerFiles {
            ca: "/t/ca.crt".into(),
            server_cert: "/t/server.crt".into(),
            server_key: "/t/server.key".into(),
            acl: "/t/acl".into(),
            data_dir: "/t/data".into(),
            log: "/t/log".into(),
            pid: "/t/pid".into(),
        }
    }

    #[test]
    fn shipped_config_is_templated_only_for_port_and_paths() {
        let shipped = std::fs::read_to_string(shipped_config_path()).unwrap();
        let conf = render_config(&shipped, 41883, &files(), true).unwrap();
        for line in [
            "listener 41883 127.0.0.1",
            "cafile /t/ca.crt",
            "certfile /t/server.crt",
            "keyfile /t/server.key",
            "acl_file /t/acl",
            "persistence_location /t/data/",
            "log_dest file /t/log",
            "user root",
        ] {
            assert!(
                conf.lines().any(|l| l == line),
                "missing {line:?} in\n{conf}"
            );
        }
        // The security-relevant lines pass through untouched.
        for line in [
            "require_certificate true",
            "use_identity_as_username true",
            "allow_anonymous false",
            "persistence true",
        ] {
            assert!(
                shipped.lines().any(|l| l == line),
                "shipped config lost {line:?}"
            );
            assert!(
                conf.lines().any(|l| l == line),
                "templating dropped {line:?}"
            );
        }
        for line in conf.lines().filter(|l| !l.starts_with('#')) {
            assert!(
                !line.contains("/etc/") && !line.contains("/var/") && !line.contains("/run/"),
                "a system path leaked into the test config: {line:?}"
            );
        }
    }

    #[test]
    fn plain_flavour_keeps_the_shipped_limits_and_drops_only_auth() {
        let shipped = std::fs::read_to_string(shipped_config_path()).unwrap();
        let conf = render_plain_config(
            &shipped,
            41883,
            &files(),
            false,
            &[("max_queued_messages", "7"), ("sys_interval", "1")],
        )
        .unwrap();
        let live: Vec<&str> = conf.lines().filter(|l| !l.starts_with('#')).collect();
        for kept in shipped.lines().filter(|l| {
            let k = l.split_whitespace().next().unwrap_or("#");
            !k.starts_with('#')
                && !AUTH_DIRECTIVES.contains(&k)
                && ![
                    "persistence_location",
                    "pid_file",
                    "log_dest",
                    "max_queued_messages",
                    "sys_interval",
                ]
                .contains(&k)
        }) {
            assert!(live.contains(&kept), "plain flavour lost {kept:?}");
        }
        assert!(live.contains(&"max_queued_messages 7"));
        assert!(live.contains(&"sys_interval 1"));
        assert!(live.contains(&"listener 41883 127.0.0.1"));
        assert!(live.contains(&"allow_anonymous true"));
        for auth in ["cafile", "acl_file", "require_certificate"] {
            assert!(
                !live.iter().any(|l| l.starts_with(auth)),
                "{auth} must be dropped"
            );
        }
    }

    #[test]
    fn config_missing_a_templated_directive_is_refused() {
        let err = render_config("allow_anonymous false\n", 1, &files(), false).unwrap_err();
        assert_eq!(err.code(), "config_template");
        let twice = "listener 1\nlistener 2\ncafile a\ncertfile b\nkeyfile c\nacl_file d\npersistence_location e\npid_file f\nlog_dest g\n";
        let err = render_config(twice, 1, &files(), false).unwrap_err();
        assert!(err.to_string().contains("2 `listener` lines"), "{err}");
    }
}
