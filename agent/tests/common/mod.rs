//! Shared test rig: an embedded rumqttd broker on a free port, a scriptable HTTP artifact
//! server (Range, drip, stall, wrong bytes), a test "controller" that signs and publishes
//! directives and records what the agent reports, and bundle builders.
#![allow(dead_code)]

use jiff::{SignedDuration, Timestamp};
use ringcast_agent::{Agent, AgentConfig, AgentHandle, Deps, FsInstaller, SledStore};
use ringcast_proto::directive::Activation;
use ringcast_proto::release::{
    Artifact, ArtifactFormat, CheckKind, Health, HealthCheck, Install, InstallKind, Release,
};
use ringcast_proto::testkit::{Fixture, FLEET};
use ringcast_proto::{
    Action, Clock, Directive, Dur, Envelope, Event, Percent, StateReport, SystemClock, Topics,
};
use rumqttc::{AsyncClient, Event as MqttEvent, Incoming, MqttOptions, QoS};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

pub const CLASS: &str = "sensor-v2";
pub const RING: &str = "canary";

/// A port no other test process holds (see `ringcast_io::ports`).
pub fn free_port() -> u16 {
    ringcast_io::ports::reserve().unwrap()
}

/// Start an embedded broker; returns its port once it accepts connections.
pub fn start_broker() -> u16 {
    let port = free_port();
    start_broker_on(port);
    port
}

pub fn start_broker_on(port: u16) {
    use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
    let conn = ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: 1024 * 1024,
        max_inflight_count: 256,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "v4".into(),
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        tls: None,
        next_connection_delay_ms: 1,
        connections: conn,
    };
    let router = RouterConfig {
        max_connections: 10_000,
        max_outgoing_packet_count: 200,
        max_segment_size: 104_857_600,
        max_segment_count: 10,
        ..Default::default()
    };
    let mut v4 = HashMap::new();
    v4.insert("v4".to_string(), server);
    let config = Config {
        id: 0,
        router,
        v4: Some(v4),
        ..Default::default()
    };
    std::thread::spawn(move || {
        let mut b = Broker::new(config);
        let _ = b.start();
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "broker did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ----- HTTP artifact server --------------------------------------------------------------

/// How the server answers a path.
#[derive(Clone)]
pub enum Serve {
    /// The bytes, honouring Range.
    Bytes(Vec<u8>),
    /// The bytes in chunks of `chunk` every `every`, honouring Range.
    Drip {
        bytes: Vec<u8>,
        chunk: usize,
        every: Duration,
    },
    /// Send the first `after` bytes of the body, then hang (until the client gives up).
    StallAfter { bytes: Vec<u8>, after: usize },
    /// Advertise and send these bytes, ignoring Range.
    NoRange(Vec<u8>),
}

#[derive(Clone)]
pub struct HttpServer {
    pub port: u16,
    routes: Arc<Mutex<HashMap<String, Vec<Serve>>>>,
    pub hits: Arc<AtomicUsize>,
    pub ranges: Arc<Mutex<Vec<String>>>,
    /// Connections being answered right now (a stalled answer stays open until the client
    /// closes it, so this falling to 0 shows the client gave up).
    pub open: Arc<AtomicUsize>,
}

/// Counts a connection as open while it lives.
struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl HttpServer {
    pub fn start() -> HttpServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let s = HttpServer {
            port,
            routes: Arc::default(),
            hits: Arc::default(),
            ranges: Arc::default(),
            open: Arc::default(),
        };
        let s2 = s.clone();
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let s3 = s2.clone();
                std::thread::spawn(move || s3.handle(conn));
            }
        });
        s
    }

    /// Answers for `path`, used in order; the last one repeats.
    pub fn route(&self, path: &str, answers: Vec<Serve>) {
        self.routes.lock().unwrap().insert(path.into(), answers);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// Wait until no connection is being answered, or panic after `timeout`. The server
    /// runs on plain threads with nothing to await, so this polls.
    pub async fn wait_no_open_connections(&self, what: &str, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.open.load(Ordering::SeqCst) > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {} connection(s) still open",
                self.open.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn handle(&self, conn: TcpStream) {
        self.open.fetch_add(1, Ordering::SeqCst);
        let _open = OpenGuard(self.open.clone());
        let mut r = BufReader::new(conn.try_clone().unwrap());
        let mut line = String::new();
        if r.read_line(&mut line).is_err() {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut range_start: Option<usize> = None;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("range: bytes=") {
                self.ranges.lock().unwrap().push(v.trim().to_string());
                range_start = v.trim().trim_end_matches('-').parse().ok();
            }
        }
        self.hits.fetch_add(1, Ordering::SeqCst);
        let answer = {
            let mut routes = self.routes.lock().unwrap();
            match routes.get_mut(&path) {
                Some(list) if list.len() > 1 => Some(list.remove(0)),
                Some(list) => list.first().cloned(),
                None => None,
            }
        };
        let mut w = conn;
        let Some(answer) = answer else {
            let _ = w.write_all(
                b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            );
            return;
        };
        let (bytes, honour_range) = match &answer {
            Serve::Bytes(b) | Serve::Drip { bytes: b, .. } | Serve::StallAfter { bytes: b, .. } => {
                (b.clone(), true)
            }
            Serve::NoRange(b) => (b.clone(), false),
        };
        let start = if honour_range {
            range_start.unwrap_or(0).min(bytes.len())
        } else {
            0
        };
        let body = &bytes[start..];
        let head = if honour_range && range_start.is_some() {
            format!(
                "HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\ncontent-range: bytes {}-{}/{}\r\nconnection: close\r\n\r\n",
                body.len(),
                start,
                bytes.len().saturating_sub(1),
                bytes.len()
            )
        } else {
            format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            )
        };
        if w.write_all(head.as_bytes()).is_err() {
            return;
        }
        match answer {
            Serve::Bytes(_) | Serve::NoRange(_) => {
                let _ = w.write_all(body);
            }
            Serve::Drip { chunk, every, .. } => {
                for c in body.chunks(chunk) {
                    if w.write_all(c).is_err() {
                        return;
                    }
                    let _ = w.flush();
                    std::thread::sleep(every);
                }
            }
            Serve::StallAfter { after, .. } => {
                let n = after.saturating_sub(start).min(body.len());
                let _ = w.write_all(&body[..n]);
                let _ = w.flush();
                // Hang until the client closes.
                let mut buf = [0u8; 1];
                let _ = w.set_read_timeout(Some(Duration::from_secs(120)));
                let _ = (&w).read(&mut buf);
            }
        }
    }
}

// ----- artifacts -------------------------------------------------------------------------

/// A tar.gz with the given files `(path, contents, mode)`.
pub fn bundle(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let gz = flate2::write::GzEncoder::new(&mut out, flate2::Compression::fast());
        let mut t = tar::Builder::new(gz);
        for (path, data, mode) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(*mode);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_cksum();
            t.append_data(&mut h, path, *data).unwrap();
        }
        t.into_inner().unwrap().finish().unwrap();
    }
    out
}

/// A bundle for `version` whose `health.sh` passes (or fails).
pub fn app_bundle(version: &str, healthy: bool) -> Vec<u8> {
    let health = if healthy {
        "#!/bin/sh\nexit 0\n".to_string()
    } else {
        "#!/bin/sh\necho \"app $0 is unhealthy\" >&2\nexit 1\n".to_string()
    };
    let version_file = format!("{version}\n");
    bundle(&[
        ("VERSION", version_file.as_bytes(), 0o644),
        ("health.sh", health.as_bytes(), 0o755),
    ])
}

/// Incompressible bytes (xorshift), so gzip cannot shrink them.
pub fn noise(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn sha256_hex(b: &[u8]) -> String {
    ringcast_proto::digest::sha256_hex(b)
}

/// A bundle release with a `health.sh` command check.
pub fn release(seq: u64, floor: u64, url: &str, artifact: &[u8]) -> Release {
    Release {
        name: "app".into(),
        version: semver::Version::new(1, seq, 0),
        sequence: seq,
        rollback_floor: floor,
        issued_at: Timestamp::now() - SignedDuration::from_mins(5),
        expires_at: None,
        compatible: vec![CLASS.into()],
        artifact: Artifact {
            url: url.into(),
            sha256: sha256_hex(artifact),
            size: artifact.len() as u64,
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
                name: "app".into(),
                kind: CheckKind::Command,
                command: Some(vec!["{release_dir}/health.sh".into()]),
                url: None,
                timeout: Dur::secs(5),
            }],
            probation: Dur(Duration::from_millis(600)),
            interval: Dur(Duration::from_millis(200)),
            failures_to_revert: 1,
            restarts_to_revert: 3,
        },
    }
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A strictly increasing directive sequence.
pub fn next_seq() -> u64 {
    let ms = Timestamp::now().as_millisecond() as u64;
    let prev = SEQ.fetch_max(ms, Ordering::SeqCst).max(ms);
    let n = prev + 1;
    SEQ.fetch_max(n, Ordering::SeqCst);
    n
}

/// A ring directive installing `r` (signed by the release key inside).
pub fn directive(f: &Fixture, rollout: &str, r: &Release) -> Directive {
    let now = Timestamp::now();
    Directive {
        fleet: FLEET.into(),
        ring: RING.into(),
        device: None,
        product: None,
        rollout_id: rollout.into(),
        sequence: next_seq(),
        issued_at: now,
        expires_at: now + SignedDuration::from_hours(1),
        action: Action::Install,
        release: Some(r.sign(&[&f.release])),
        percent: Percent::FULL,
        stage_percent: None,
        activation: Activation::default(),
        attempt: 1,
    }
}

// ----- test controller -------------------------------------------------------------------

/// Publishes directives and records the device's state reports and events.
pub struct Ctl {
    pub client: AsyncClient,
    pub topics: Topics,
    pub states: Arc<Mutex<Vec<StateReport>>>,
    pub events: Arc<Mutex<Vec<Event>>>,
    notify: Arc<tokio::sync::Notify>,
}

impl Ctl {
    pub async fn connect(port: u16, id: &str) -> Ctl {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(5));
        o.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut el) = AsyncClient::new(o, 64);
        let mut net = el.network_options();
        net.set_tcp_nodelay(true);
        el.set_network_options(net);
        let topics = Topics::for_fleet(FLEET).unwrap();
        let states: Arc<Mutex<Vec<StateReport>>> = Arc::default();
        let events: Arc<Mutex<Vec<Event>>> = Arc::default();
        let notify = Arc::new(tokio::sync::Notify::new());
        for f in topics.controller_filters() {
            client.subscribe(f, QoS::AtLeastOnce).await.unwrap();
        }
        let (s2, e2, n2, t2) = (
            states.clone(),
            events.clone(),
            notify.clone(),
            topics.clone(),
        );
        let (ready_tx, mut ready_rx) = mpsc::channel::<()>(1);
        tokio::spawn(async move {
            let mut subacks = 0;
            loop {
                match el.poll().await {
                    Ok(MqttEvent::Incoming(Incoming::SubAck(_))) => {
                        subacks += 1;
                        if subacks == 3 {
                            let _ = ready_tx.send(()).await;
                        }
                    }
                    Ok(MqttEvent::Incoming(Incoming::Publish(p))) => {
                        match t2.parse(&p.topic) {
                            Ok(ringcast_proto::Topic::State(_)) => {
                                if let Ok(r) = StateReport::parse(&p.payload) {
                                    s2.lock().unwrap().push(r);
                                }
                            }
                            Ok(ringcast_proto::Topic::Events(_)) => {
                                if let Ok(e) = Event::parse(&p.payload) {
                                    e2.lock().unwrap().push(e);
                                }
                            }
                            _ => {}
                        }
                        n2.notify_waiters();
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx.recv())
            .await
            .expect("controller subscriptions");
        Ctl {
            client,
            topics,
            states,
            events,
            notify,
        }
    }

    pub async fn publish(&self, topic: String, bytes: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, true, bytes)
            .await
            .unwrap();
    }

    pub async fn ring_directive(&self, env: &Envelope) {
        self.publish(self.topics.ring_directive(RING), env.to_vec())
            .await;
    }

    pub async fn device_directive(&self, device: &str, env: &Envelope) {
        self.publish(self.topics.device_directive(device), env.to_vec())
            .await;
    }

    /// Wait for a state report matching `pred`.
    pub async fn wait_state(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&StateReport) -> bool,
    ) -> StateReport {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let n = self.notify.notified();
            let found = self
                .states
                .lock()
                .unwrap()
                .iter()
                .rev()
                .find(|r| pred(r))
                .cloned();
            if let Some(r) = found {
                return r;
            }
            if tokio::time::timeout_at(deadline, n).await.is_err() {
                let last = self.states.lock().unwrap().last().cloned();
                let ev: Vec<String> = self
                    .events
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|e| serde_json::to_string(&e.kind).unwrap())
                    .collect();
                panic!("timed out waiting for {what}; last state {last:#?}; events {ev:#?}");
            }
        }
    }

    /// Wait for an event matching `pred`.
    pub async fn wait_event(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Event) -> bool,
    ) -> Event {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let n = self.notify.notified();
            let found = self
                .events
                .lock()
                .unwrap()
                .iter()
                .find(|e| pred(e))
                .cloned();
            if let Some(e) = found {
                return e;
            }
            if tokio::time::timeout_at(deadline, n).await.is_err() {
                let ev: Vec<String> = self
                    .events
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|e| serde_json::to_string(&e.kind).unwrap())
                    .collect();
                panic!("timed out waiting for {what}; events {ev:#?}");
            }
        }
    }

    /// Wait for a `rejected` event with `reason`.
    pub async fn wait_rejected(&self, reason: &str) -> Event {
        self.wait_event(&format!("rejected {reason}"), Duration::from_secs(10), |e| {
            matches!(&e.kind, ringcast_proto::EventKind::Rejected { reason: r, .. } if r.code() == reason)
        })
        .await
    }

    /// Wait until `cond` holds (checked after every message).
    pub async fn wait_until(&self, what: &str, timeout: Duration, cond: impl Fn(&Ctl) -> bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let n = self.notify.notified();
            if cond(self) {
                return;
            }
            if tokio::time::timeout_at(deadline, n).await.is_err() {
                let ev: Vec<String> = self
                    .events
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|e| serde_json::to_string(&e.kind).unwrap())
                    .collect();
                panic!("timed out waiting for {what}; events {ev:#?}");
            }
        }
    }

    /// How many `rejected` events carry `reason`.
    pub fn rejected_count(&self, reason: &str) -> usize {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| matches!(&e.kind, ringcast_proto::EventKind::Rejected { reason: r, .. } if r.code() == reason))
            .count()
    }

    pub fn event_count(&self, name: &str) -> usize {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.kind.name() == name)
            .count()
    }
}

// ----- devices ---------------------------------------------------------------------------

/// A device under test: its directories and config.
pub struct Device {
    pub dir: tempfile::TempDir,
    pub cfg: AgentConfig,
}

impl Device {
    pub fn new(f: &Fixture, id: &str, broker_port: u16) -> Device {
        let dir = tempfile::tempdir().unwrap();
        let trust = dir.path().join("trust.json");
        std::fs::write(&trust, f.trust_env.to_vec()).unwrap();
        let mut cfg = AgentConfig::minimal(
            id,
            CLASS,
            FLEET,
            RING,
            &format!("mqtt://127.0.0.1:{broker_port}"),
            &dir.path().join("data"),
            &trust,
        );
        cfg.broker.reconnect_max = Dur(Duration::from_millis(500));
        cfg.broker.reconnect_min = Dur(Duration::from_millis(50));
        cfg.download.retry_initial = Dur(Duration::from_millis(200));
        cfg.download.retry_max = Dur(Duration::from_secs(1));
        cfg.download.stall_timeout = Dur(Duration::from_secs(2));
        cfg.download.connect_timeout = Dur(Duration::from_secs(2));
        cfg.install.command_timeout = Dur(Duration::from_secs(20));
        Device { dir, cfg }
    }

    pub fn install_root(&self) -> PathBuf {
        self.cfg.install_root()
    }

    pub fn current_target(&self) -> Option<PathBuf> {
        std::fs::read_link(self.install_root().join("current")).ok()
    }

    pub fn deps(&self) -> Deps {
        self.deps_with_clock(Arc::new(SystemClock))
    }

    /// [`Device::deps`] on `clock`.
    pub fn deps_with_clock(&self, clock: Arc<dyn Clock>) -> Deps {
        std::fs::create_dir_all(&self.cfg.data_dir).unwrap();
        Deps {
            store: Arc::new(SledStore::open(&self.cfg.data_dir.join("db")).unwrap()),
            clock,
            installer: Arc::new(FsInstaller::new(
                self.install_root(),
                Duration::from_secs(20),
                2048,
            )),
        }
    }

    /// Start the agent in-process.
    pub fn spawn(&self) -> AgentHandle {
        Agent::new(self.cfg.clone(), self.deps()).unwrap().spawn()
    }

    /// Write the config as TOML (for the binary).
    pub fn write_config(&self) -> PathBuf {
        let c = &self.cfg;
        let text = format!(
            r#"device_id = "{id}"
device_class = "{class}"
fleet = "{fleet}"
ring = "{ring}"
data_dir = "{data}"
trust_root = "{trust}"
log_level = "info,ringcast_agent=debug"
[broker]
url = "{url}"
reconnect_min = "50ms"
reconnect_max = "500ms"
[download]
stall_timeout = "{stall}ms"
retry_initial = "200ms"
retry_max = "1s"
connect_timeout = "2s"
[install]
command_timeout = "30s"
"#,
            id = c.device_id,
            class = c.device_class,
            fleet = c.fleet,
            ring = c.ring,
            data = c.data_dir.display(),
            trust = c.trust_root.display(),
            url = c.broker.url,
            stall = c.download.stall_timeout.get().as_millis(),
        );
        let p = self.dir.path().join("agent.toml");
        std::fs::write(&p, text).unwrap();
        p
    }
}

/// The system clock plus an offset the test moves forward: time runs at real speed (so
/// probation and health rounds pass), and [`JumpClock::jump`] moves it ahead at once (past a
/// retry, a deadline). Clones share the offset; the agent sees a jump at its next tick. It
/// counts how often it was read: the agent reads it at every tick, so
/// [`JumpClock::wait_reads`] awaits the agent having had that many chances to act.
#[derive(Debug, Clone, Default)]
pub struct JumpClock {
    offset: Arc<Mutex<SignedDuration>>,
    reads: Arc<AtomicU64>,
}

impl JumpClock {
    pub fn jump(&self, by: SignedDuration) {
        let mut g = self.offset.lock().unwrap();
        *g += by;
    }

    /// Wait until the clock was read `n` more times, or panic after 10 s.
    pub async fn wait_reads(&self, what: &str, n: u64) {
        let want = self.reads.load(Ordering::SeqCst) + n;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.reads.load(Ordering::SeqCst) < want {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: the agent read its clock {} of {want} times",
                self.reads.load(Ordering::SeqCst)
            );
            // A counter has nothing to await: poll it.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Clock for JumpClock {
    fn now(&self) -> Timestamp {
        self.reads.fetch_add(1, Ordering::SeqCst);
        Timestamp::now() + *self.offset.lock().unwrap()
    }
}

/// A device window that is certainly closed now and for the next two days: one minute,
/// three days ahead (UTC, the devices' default zone).
pub fn closed_window() -> ringcast_proto::Window {
    let day = Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .weekday()
        .wrapping_add(3);
    let name = match day {
        jiff::civil::Weekday::Monday => "Mon",
        jiff::civil::Weekday::Tuesday => "Tue",
        jiff::civil::Weekday::Wednesday => "Wed",
        jiff::civil::Weekday::Thursday => "Thu",
        jiff::civil::Weekday::Friday => "Fri",
        jiff::civil::Weekday::Saturday => "Sat",
        jiff::civil::Weekday::Sunday => "Sun",
    };
    ringcast_proto::Window::parse(&format!("{name} 03:00-03:01")).unwrap()
}

/// Files in the device's download area (`{data_dir}/artifacts`), sorted.
pub fn artifact_files(dev: &Device) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dev.cfg.data_dir.join("artifacts"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

pub fn read_version(root: &Path) -> Option<String> {
    std::fs::read_to_string(root.join("current").join("VERSION"))
        .ok()
        .map(|s| s.trim().to_string())
}

// ----- a TCP proxy in front of the broker, to cut the network ----------------------------

/// Forwards a port to the broker; `cut()` drops every connection and refuses new ones until
/// `restore()`. From the agent's side this is a broker restart or a network outage; the
/// broker keeps its retained messages.
#[derive(Clone)]
pub struct Proxy {
    pub port: u16,
    up: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    pub fn start(target: u16) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = Proxy {
            port: l.local_addr().unwrap().port(),
            up: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            conns: Arc::default(),
        };
        let p2 = p.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                if !p2.up.load(Ordering::SeqCst) {
                    let _ = c.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(b) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let _ = c.set_nodelay(true);
                let _ = b.set_nodelay(true);
                {
                    let mut g = p2.conns.lock().unwrap();
                    g.push(c.try_clone().unwrap());
                    g.push(b.try_clone().unwrap());
                }
                let (mut c2, mut b2) = (c.try_clone().unwrap(), b.try_clone().unwrap());
                let (mut c3, mut b3) = (c, b);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c2, &mut b2);
                    let _ = b2.shutdown(std::net::Shutdown::Both);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut b3, &mut c3);
                    let _ = c3.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        p
    }

    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}
