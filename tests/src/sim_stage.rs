//! [`Stage`]: a whole Ringcast world for one end-to-end scenario — fresh keys and trust root,
//! a broker, the controller (its library API, in process), and a fleet of real agents.
//!
//! Two brokers, one API:
//! - [`BrokerKind::Embedded`]: rumqttd on a free port; controller and agents reach it through
//!   a [`Proxy`], so a scenario can cut the network or "restart the broker" (rumqttd has no
//!   shutdown; from the clients' side a restart is every connection dropping and new ones
//!   refused for a while, and the embedded broker keeps its retained messages).
//! - [`BrokerKind::Mosquitto`]: the SHIPPED Mosquitto config over mutual TLS
//!   ([`crate::lab::MosquittoLab`]); the controller connects with its certificate, every
//!   agent with its own (CN = device id). Cutting the network stops the broker; restarting
//!   it is a real restart with the same persistence directory.
//! - [`BrokerKind::MosquittoPlain`]: the shipped config's limits and persistence on a plain
//!   anonymous listener ([`crate::mosquitto::render_plain_config`]), for scenarios with more
//!   synthetic devices than certificates, and with [`StageSpec::mosquitto_overrides`] to try
//!   other limits.
//!
//! Time: the controller runs on a [`FakeClock`] that a background task moves forward at real
//! speed, so scenarios can also jump it past bakes ([`Stage::advance`]). Agents run on the
//! system clock: probation and health-check timeouts are real (and short in these releases),
//! and a jump on the controller's side reaches them only as a newer `issued_at`, which is
//! exactly how a device learns about time.

use crate::lab::MosquittoLab;
use ringcast::kit::{AppHealth, AppRelease, KeyFiles, Keys};
use ringcast_agent::fleet::{self, Customize, Fleet, FleetSpec, StoreKind};
use ringcast_controller::config::{
    BrokerConfig, BrokerTls, ControllerConfig, Gate, OnFailure, Policy, Promotion, RingPolicy,
    ServerConfig,
};
use ringcast_controller::engine::{Actor, Submit};
use ringcast_controller::model::Rollout;
use ringcast_controller::{Controller, ControllerHandle};
use ringcast_proto::jiff::{SignedDuration, Timestamp};
use ringcast_proto::{Clock, Dur, FakeClock, Percent, Phase, StateReport, SystemClock};
use std::io::Read;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

/// Fleet name used by scenarios.
pub const FLEET: &str = "lab";
/// Device class used by scenarios.
pub const CLASS: &str = "sim-box";
/// Release name used by scenarios.
pub const APP: &str = "app";

/// Which broker a stage runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// Embedded rumqttd (plain TCP, through a cuttable proxy).
    Embedded,
    /// The shipped Mosquitto config, mutual TLS, per-device ACL.
    Mosquitto,
    /// The shipped Mosquitto config's limits on a plain anonymous listener.
    MosquittoPlain,
}

/// A ring of the scenario policy: `steps` percent ramp, `bake`, gate needing `min_reports`
/// commits and tolerating `max_failure_rate`; automatic promotion, halt on failure.
pub fn ring(
    name: &str,
    steps: &[f64],
    bake: &str,
    min_reports: u32,
    max_failure_rate: f64,
) -> RingPolicy {
    RingPolicy {
        name: name.into(),
        steps: steps
            .iter()
            .map(|s| Percent::from_f64(*s).unwrap_or(Percent::FULL))
            .collect(),
        bake: bake.parse().unwrap_or(Dur::secs(60)),
        gate: Gate {
            min_reports,
            max_failure_rate,
        },
        promotion: Promotion::Auto,
        windows: Vec::new(),
        timezone: "UTC".into(),
        on_failure: OnFailure::Halt,
        checks: Vec::new(),
        check_retry: Dur::secs(60),
        check_attempts: 3,
        step_timeout_setting: None,
        retries: 0,
        retry_backoff: Dur::secs(600),
    }
}

/// A TCP forwarder in front of a broker: [`Proxy::cut`] drops every connection and refuses
/// new ones until [`Proxy::restore`].
#[derive(Clone, Debug)]
pub struct Proxy {
    /// The port clients connect to.
    pub port: u16,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if std::io::Write::write_all(&mut to, &buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

impl Proxy {
    /// Forward a free local port to `127.0.0.1:target`.
    pub fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind proxy port");
        let port = listener.local_addr().expect("proxy port").port();
        let p = Proxy {
            port,
            up: Arc::new(AtomicBool::new(true)),
            conns: Arc::default(),
        };
        let me = p.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if !me.up.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                if let (Ok(c3), Ok(s3)) = (client.try_clone(), server.try_clone()) {
                    let mut g = me.conns.lock().unwrap_or_else(|p| p.into_inner());
                    g.push(c3);
                    g.push(s3);
                }
                std::thread::spawn(move || pipe(client, s2));
                std::thread::spawn(move || pipe(server, c2));
            }
        });
        p
    }

    /// Drop every connection and refuse new ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Accept connections again.
    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// What a stage runs.
#[derive(Clone)]
pub struct StageSpec {
    /// Broker.
    pub broker: BrokerKind,
    /// Rings of the controller's policy, in order.
    pub rings: Vec<RingPolicy>,
    /// Devices per ring.
    pub devices: Vec<(String, usize)>,
    /// Agent store (sled by default: what a device runs).
    pub store: StoreKind,
    /// Devices run outside the in-process fleet (e.g. a `ringcast-sim` child process the
    /// scenario kills): they get certificates; the scenario starts them.
    pub external: Vec<String>,
    /// [`BrokerKind::MosquittoPlain`]: shipped directives to replace, e.g.
    /// `("max_queued_messages", "100")`.
    pub mosquitto_overrides: Vec<(String, String)>,
    /// The MQTT version controller and agents speak (Mosquitto stages; rumqttd speaks 3.1.1).
    pub protocol: ringcast_io::mqtt::Protocol,
    /// [`BrokerKind::Embedded`]: retained messages a new subscription gets at most (rumqttd
    /// drops the rest), to stand for brokers that truncate a re-read.
    pub embedded_retained_limit: u64,
    /// Products every device runs (`[products]` in its agent.toml); empty: single-product
    /// agents, as before products.
    pub products: std::collections::BTreeMap<String, ringcast_agent::config::ProductConfig>,
}

impl StageSpec {
    /// `rings`, with `devices[i]` devices in ring i.
    pub fn new(broker: BrokerKind, rings: Vec<RingPolicy>, devices: &[usize]) -> StageSpec {
        let devices = rings
            .iter()
            .zip(devices)
            .map(|(r, n)| (r.name.clone(), *n))
            .collect();
        StageSpec {
            broker,
            rings,
            devices,
            store: StoreKind::Sled,
            external: Vec::new(),
            mosquitto_overrides: Vec::new(),
            protocol: ringcast_io::mqtt::Protocol::Auto,
            embedded_retained_limit: ringcast_controller::broker::RETAINED_PER_SUBSCRIPTION,
            products: Default::default(),
        }
    }
}

/// What every agent of a stage gets on top of the fleet's defaults: its certificate on the
/// TLS lab, and the stage's MQTT version.
fn agent_customize(
    lab: Option<&MosquittoLab>,
    protocol: ringcast_io::mqtt::Protocol,
) -> Option<Customize> {
    let tls = lab.map(|lab| (lab.certs().ca(), lab.certs().clone()));
    let f: Customize = Arc::new(move |c: &mut ringcast_agent::AgentConfig| {
        c.broker.protocol = protocol;
        if let Some((ca, certs)) = &tls {
            let id = certs.device(&c.device_id);
            c.broker.ca_file = Some(ca.clone());
            c.broker.client_cert = Some(id.cert);
            c.broker.client_key = Some(id.key);
        }
    });
    Some(f)
}

/// A running world: controller, broker, fleet, clock.
pub struct Stage {
    /// Which broker.
    pub kind: BrokerKind,
    /// The MQTT version its clients speak.
    pub protocol: ringcast_io::mqtt::Protocol,
    /// The controller's clock (moves at real speed; [`Stage::advance`] jumps it).
    pub clock: FakeClock,
    /// Keys and trust root.
    pub keys: Keys,
    /// Their files.
    pub files: KeyFiles,
    /// The controller's configuration (reused on restart).
    pub config: ControllerConfig,
    /// The fleet.
    pub fleet: Fleet,
    controller: Option<ControllerHandle>,
    proxy: Option<Proxy>,
    lab: Option<MosquittoLab>,
    plain: Option<crate::mosquitto::Mosquitto>,
    ticker: JoinHandle<()>,
    broker_url: String,
    _dir: Option<tempfile::TempDir>,
    root: PathBuf,
}

/// The operator scenarios act as.
pub fn operator() -> Actor {
    Actor {
        name: "scenario".into(),
        role: "operator".into(),
    }
}

impl Stage {
    /// Start a stage, or `None` (after printing why) when the spec needs Mosquitto and it is
    /// not installed (under `CI`, a missing Mosquitto panics instead).
    pub async fn start(spec: StageSpec) -> Option<Stage> {
        let ids: Vec<String> = spec
            .devices
            .iter()
            .flat_map(|(r, n)| (0..*n).map(move |i| fleet::device_id(r, i)))
            .chain(spec.external.iter().cloned())
            .collect();
        let (lab, dir) = match spec.broker {
            BrokerKind::Mosquitto => {
                let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
                let lab = MosquittoLab::start(&refs)?;
                (Some(lab), None)
            }
            BrokerKind::Embedded => (None, Some(tempfile::tempdir().expect("temp dir"))),
            BrokerKind::MosquittoPlain => {
                crate::mosquitto::require_or_skip()?;
                (None, Some(tempfile::tempdir().expect("temp dir")))
            }
        };
        // The embedded rumqttd listens with MQTT 3.1.1 only.
        let protocol = match spec.broker {
            BrokerKind::Embedded => ringcast_io::mqtt::Protocol::V311,
            _ => spec.protocol,
        };
        let plain = match spec.broker {
            BrokerKind::MosquittoPlain => {
                let bin = crate::mosquitto::find()?;
                let dir = dir.as_ref().map(|d| d.path().join("mosquitto"))?;
                let o: Vec<(&str, &str)> = spec
                    .mosquitto_overrides
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                Some(
                    crate::mosquitto::Mosquitto::start_plain(&bin, &dir, &o)
                        .unwrap_or_else(|e| panic!("starting mosquitto failed: {e}")),
                )
            }
            _ => None,
        };
        let root = match (&lab, &dir) {
            (Some(l), _) => l.dir().join("stage"),
            (_, Some(d)) => d.path().to_path_buf(),
            _ => unreachable!("a stage has a lab or a temp dir"),
        };
        let now = SystemClock.now();
        let clock = FakeClock::new(now);
        let keys = Keys::generate(now, SignedDuration::from_hours(24 * 30)).expect("keys");
        let files = keys.write(&root.join("keys")).expect("key files");

        let (broker_cfg, proxy, broker_url) = match (&lab, &plain) {
            (None, Some(m)) => {
                let cfg = BrokerConfig {
                    host: m.host().into(),
                    port: m.port(),
                    client_id: "ringcast-controller".into(),
                    protocol,
                    watch_drops: true,
                    persistent_session: true,
                    username: None,
                    password: None,
                    tls: None,
                };
                (cfg, None, m.mqtt_url())
            }
            (None, None) => {
                let port = ringcast_controller::broker::free_port().expect("free port");
                ringcast_controller::broker::start_embedded_with(
                    port,
                    spec.embedded_retained_limit,
                )
                .expect("embedded broker");
                let proxy = Proxy::start(port);
                let cfg = BrokerConfig {
                    host: "127.0.0.1".into(),
                    port: proxy.port,
                    client_id: "ringcast-controller".into(),
                    protocol: ringcast_io::mqtt::Protocol::V311,
                    // rumqttd: no $SYS drop counter.
                    watch_drops: false,
                    persistent_session: false,
                    username: None,
                    password: None,
                    tls: None,
                };
                let url = format!("mqtt://127.0.0.1:{}", proxy.port);
                (cfg, Some(proxy), url)
            }
            (Some(lab), _) => {
                let c = lab.certs().controller();
                let cfg = BrokerConfig {
                    host: lab.broker().host().into(),
                    port: lab.broker().port(),
                    client_id: c.name.clone(),
                    protocol,
                    watch_drops: true,
                    persistent_session: true,
                    username: None,
                    password: None,
                    tls: Some(BrokerTls {
                        ca_file: lab.certs().ca(),
                        client_cert: Some(c.cert.clone()),
                        client_key: Some(c.key.clone()),
                    }),
                };
                (cfg, None, lab.mqtts_url())
            }
        };
        let config = ControllerConfig {
            policy: Policy {
                fleet: FLEET.into(),
                topic_prefix: None,
                tick: Dur(Duration::from_millis(50)),
                directive_ttl: Dur::secs(3600),
                unresponsive_after: Dur::secs(30 * 86400),
                allowed_skew: Dur::secs(300),
                on_new_release: None,
                rings: spec.rings.clone(),
            },
            server: ServerConfig {
                listen: ([127, 0, 0, 1], 0).into(),
                data_dir: root.join("controller"),
                trust: files.trust.clone(),
                controller_key: files.controller_key.clone(),
                tokens_file: None,
                public_url: None,
                max_artifact_bytes: 16 * 1024 * 1024,
                device_events: ringcast_controller::store::EVENT_HISTORY,
            },
            broker: Some(broker_cfg),
            tokens: Vec::new(),
            webhooks: Vec::new(),
        };
        let mut config = config;
        let controller = Controller::start(config.clone(), Arc::new(clock.clone()))
            .await
            .expect("controller starts");
        // A restarted controller must serve artifacts where the agents were told to look.
        config.server.listen = controller.http_addr();

        let customize = agent_customize(lab.as_ref(), protocol);
        let fleet_spec = FleetSpec {
            fleet: FLEET.into(),
            device_class: CLASS.into(),
            broker_url: broker_url.clone(),
            trust_root: files.trust.clone(),
            artifact_base_url: Some(controller.http_url()),
            dir: root.join("devices"),
            rings: spec.devices.clone(),
            fail_rate: 0.0,
            store: spec.store,
            clock: Arc::new(SystemClock),
            customize,
        };
        let fleet_spec = if spec.products.is_empty() {
            fleet_spec
        } else {
            fleet_spec.with_products(spec.products.clone())
        };
        let fleet = Fleet::start(fleet_spec).await.expect("fleet starts");

        // Move the controller's clock at real speed, so nothing waits on a frozen clock.
        let c2 = clock.clone();
        let ticker = tokio::spawn(async move {
            let step = Duration::from_millis(20);
            let mut last = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(step).await;
                let now = tokio::time::Instant::now();
                let d = now - last;
                last = now;
                c2.advance(SignedDuration::try_from(d).unwrap_or(SignedDuration::ZERO));
            }
        });
        let stage = Stage {
            kind: spec.broker,
            protocol,
            clock,
            keys,
            files,
            config,
            fleet,
            controller: Some(controller),
            proxy,
            lab,
            plain,
            ticker,
            broker_url,
            _dir: dir,
            root,
        };
        stage
            .wait_until("every device reported to the controller", 30, |s| {
                s.known_devices() >= s.fleet.devices().len()
            })
            .await;
        Some(stage)
    }

    /// The running controller.
    pub fn controller(&self) -> &ControllerHandle {
        self.controller.as_ref().expect("controller running")
    }

    /// Scratch directory of this stage.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// The Mosquitto lab (Mosquitto stages only).
    pub fn lab(&self) -> Option<&MosquittoLab> {
        self.lab.as_ref()
    }

    /// A `ringcast-sim` command (binary `exe`) running `count` devices of `ring` with sled
    /// stores under `data`, connected to this stage's broker (with their certificates on
    /// Mosquitto) and artifact server. Ids are `{ring}-000`, … as in the in-process fleet.
    pub fn sim_command(
        &self,
        exe: &Path,
        ring: &str,
        count: usize,
        data: &Path,
    ) -> std::process::Command {
        let mut c = std::process::Command::new(exe);
        c.arg("--broker")
            .arg(&self.broker_url)
            .arg("--fleet")
            .arg(FLEET)
            .arg("--class")
            .arg(CLASS)
            .arg("--trust")
            .arg(&self.files.trust)
            .arg("--rings")
            .arg(format!("{ring}={count}"))
            .arg("--store")
            .arg("sled")
            .arg("--dir")
            .arg(data)
            .arg("--artifact-base")
            .arg(self.controller().http_url())
            .arg("--report-every")
            .arg("3600");
        if let Some(lab) = &self.lab {
            c.arg("--ca-file")
                .arg(lab.certs().ca())
                .arg("--cert-dir")
                .arg(lab.certs().dir().join("devices"));
        }
        c.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        c
    }

    /// The URL agents reach this stage's broker at (through the proxy when embedded).
    pub fn broker_url(&self) -> &str {
        &self.broker_url
    }

    /// The configuration the in-process fleet would give device `id` of `ring` (same broker,
    /// trust root, artifact server and timings; its certificate on Mosquitto, where `id` must
    /// be in [`StageSpec::external`]), with its data under this stage's directory. For a
    /// device the scenario runs and restarts itself, e.g. with its own delivery windows.
    pub fn external_device_config(&self, id: &str, ring: &str) -> ringcast_agent::AgentConfig {
        let customize = agent_customize(self.lab.as_ref(), self.protocol);
        let spec = FleetSpec {
            fleet: FLEET.into(),
            device_class: CLASS.into(),
            broker_url: self.broker_url.clone(),
            trust_root: self.files.trust.clone(),
            artifact_base_url: Some(self.controller().http_url()),
            dir: self.root.join("external"),
            rings: Vec::new(),
            fail_rate: 0.0,
            store: StoreKind::Sled,
            clock: Arc::new(SystemClock),
            customize,
        };
        fleet::device_config(&spec, id, ring)
    }

    /// Jump the controller's clock.
    pub fn advance(&self, d: &str) {
        let d: Dur = d.parse().expect("duration");
        self.clock.advance(d.signed());
    }

    /// Wait (at most 10 s, then fail) until the controller's engine has decided and carried
    /// out a tick at its clock's current reading: the "settled" signal for asserting that
    /// something did not happen.
    pub async fn settle(&self) {
        use ringcast_proto::Clock as _;
        let at = self.clock.now();
        if tokio::time::timeout(
            Duration::from_secs(10),
            self.controller().shared().settled(at),
        )
        .await
        .is_err()
        {
            panic!(
                "the engine did not carry out a tick at {at} within 10s\n{}",
                self.dump()
            );
        }
    }

    /// Devices the controller has a state report from.
    pub fn known_devices(&self) -> usize {
        self.controller()
            .shared()
            .devices
            .read()
            .map(|d| d.values().filter(|r| r.report.is_some()).count())
            .unwrap_or(0)
    }

    /// The controller's latest report from `device`.
    pub fn controller_view(&self, device: &str) -> Option<StateReport> {
        self.controller()
            .shared()
            .devices
            .read()
            .ok()?
            .get(device)?
            .report
            .clone()
    }

    /// Upload a bundle whose health check behaves as `health`, sign release `sequence` with
    /// `tune` applied to its parameters, and submit it. Returns the rollout id.
    pub async fn submit(
        &self,
        sequence: u64,
        health: AppHealth,
        tune: impl FnOnce(&mut AppRelease),
    ) -> String {
        self.submit_scheduled(sequence, health, tune, None, None)
            .await
    }

    /// [`Stage::submit`] as a launch at `activate_at` (every ring pre-stages) in `launch`
    /// mode, or with neither.
    pub async fn submit_scheduled(
        &self,
        sequence: u64,
        health: AppHealth,
        tune: impl FnOnce(&mut AppRelease),
        activate_at: Option<Timestamp>,
        launch: Option<ringcast_controller::model::LaunchMode>,
    ) -> String {
        let mut rel = AppRelease::new(APP, sequence, CLASS);
        tune(&mut rel);
        let issued = Timestamp::now() - SignedDuration::from_secs(60);
        let app = rel
            .build(health, issued, &self.keys.release)
            .expect("release built");
        let hex = self
            .controller()
            .shared()
            .artifacts
            .put(&app.bundle)
            .expect("artifact stored");
        assert_eq!(hex, app.sha256, "the store names the bundle by its digest");
        let env = app.envelope;
        let (_, ro) = self
            .controller()
            .engine()
            .submit(
                Submit {
                    envelope: env,
                    start_at: None,
                    activate_at,
                    launch,
                },
                operator(),
            )
            .await
            .expect("release accepted");
        ro.id
    }

    /// Put `artifact` in the controller's store and submit `release` pointing at it, signed by
    /// the stage's release key (for releases [`Stage::submit`]'s app bundle does not cover: an
    /// `os` image installed by a command, say). The release's `artifact` fields are set here.
    pub async fn submit_release(
        &self,
        mut release: ringcast_proto::Release,
        artifact: &[u8],
    ) -> String {
        let hex = self
            .controller()
            .shared()
            .artifacts
            .put(artifact)
            .expect("artifact stored");
        ringcast::kit::point_at(&mut release, &hex, artifact.len() as u64);
        let env = release.sign(&[&self.keys.release]);
        let (_, ro) = self
            .controller()
            .engine()
            .submit(
                Submit {
                    envelope: env,
                    start_at: None,
                    activate_at: None,
                    launch: None,
                },
                operator(),
            )
            .await
            .expect("release accepted");
        ro.id
    }

    /// The rollout as the engine sees it.
    pub fn rollout(&self, id: &str) -> Rollout {
        self.controller()
            .shared()
            .state
            .read()
            .expect("state lock")
            .rollouts
            .get(id)
            .cloned()
            .expect("rollout exists")
    }

    /// Its phase name (`baking`, `completed`, `halted`, …).
    pub fn phase(&self, id: &str) -> String {
        self.rollout(id).state.phase().to_owned()
    }

    /// Poll `cond` every 25 ms until it holds; panic after `secs` seconds with the fleet's
    /// and the controller's view.
    pub async fn wait_until(&self, what: &str, secs: u64, mut cond: impl FnMut(&Stage) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            if cond(self) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "timed out after {secs}s waiting for: {what}\n{}",
                    self.dump()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Drive rollout `id` to an end: while it bakes, jump the controller clock by `bake`
    /// (once per real 150 ms), until it is no longer live. Returns the final phase.
    pub async fn drive(&self, id: &str, bake: &str, secs: u64) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let r = self.rollout(id);
            if !r.state.is_live() {
                return r.state.phase().to_owned();
            }
            if r.state.phase() == "baking" {
                self.advance(bake);
            }
            if tokio::time::Instant::now() > deadline {
                panic!("rollout {id} still live after {secs}s\n{}", self.dump());
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    /// Submit healthy release `sequence` and drive it to completion.
    pub async fn complete(&self, sequence: u64, bake: &str) -> String {
        let id = self.submit(sequence, AppHealth::Healthy, |_| {}).await;
        let end = self.drive(&id, bake, 60).await;
        assert_eq!(end, "completed", "release {sequence}\n{}", self.dump());
        id
    }

    /// Every device's own status (in process).
    pub fn statuses(&self) -> Vec<StateReport> {
        self.fleet.statuses()
    }

    /// Devices whose agent reports `phase` with `current` (for committed) or `target`
    /// (otherwise) at `sequence`.
    pub fn count(&self, phase: Phase, sequence: u64) -> usize {
        self.statuses()
            .iter()
            .filter(|r| {
                let rel = if phase == Phase::Committed {
                    &r.current
                } else {
                    &r.target
                };
                r.phase == phase && rel.as_ref().map(|x| x.sequence) == Some(sequence)
            })
            .count()
    }

    /// The Mosquitto process of a Mosquitto stage (either kind).
    pub fn mosquitto(&self) -> Option<&crate::mosquitto::Mosquitto> {
        self.lab
            .as_ref()
            .map(|l| l.broker())
            .or(self.plain.as_ref())
    }

    fn mosquitto_mut(&mut self) -> Option<&mut crate::mosquitto::Mosquitto> {
        match (&mut self.lab, &mut self.plain) {
            (Some(l), _) => Some(l.broker_mut()),
            (None, Some(p)) => Some(p),
            _ => None,
        }
    }

    /// Cut the network between every client and the broker (embedded: the proxy drops and
    /// refuses connections; Mosquitto: the broker is stopped).
    pub fn cut_network(&mut self) {
        if let Some(p) = &self.proxy {
            p.cut();
        } else if let Some(m) = self.mosquitto_mut() {
            m.stop();
        }
    }

    /// Bring the network back (Mosquitto: start the broker again, same port, same data).
    pub fn restore_network(&mut self) {
        if let Some(p) = &self.proxy {
            p.restore();
        } else if let Some(m) = self.mosquitto_mut() {
            m.restart()
                .unwrap_or_else(|e| panic!("mosquitto restart failed: {e}"));
        }
    }

    /// Mosquitto: restart gracefully, so its persistence file holds the retained messages of
    /// this moment (what a later [`Stage::crash_broker`] comes back to).
    pub fn save_broker(&mut self) {
        let m = self.mosquitto_mut().expect("a Mosquitto stage");
        m.restart()
            .unwrap_or_else(|e| panic!("mosquitto restart failed: {e}"));
    }

    /// Plain Mosquitto: restart gracefully (retained messages saved and reloaded) with other
    /// overrides of the shipped directives.
    pub fn reconfigure_broker(&mut self, overrides: &[(&str, &str)]) {
        let m = self.plain.as_mut().expect("a MosquittoPlain stage");
        m.set_overrides(overrides);
        m.restart()
            .unwrap_or_else(|e| panic!("mosquitto restart failed: {e}"));
    }

    /// Mosquitto: SIGKILL, then start again from its last persistence file, which holds the
    /// retained messages as they were at the last save (ACCEPTANCE 25).
    pub fn crash_broker(&mut self) {
        let m = self.mosquitto_mut().expect("a Mosquitto stage");
        m.kill();
        m.restart()
            .unwrap_or_else(|e| panic!("mosquitto restart failed: {e}"));
    }

    /// Restart the broker: Mosquitto for real (SIGTERM, start again on the same data);
    /// embedded, every connection is dropped and refused for `down`, then accepted again.
    pub async fn restart_broker(&mut self, down: Duration) {
        self.cut_network();
        tokio::time::sleep(down).await;
        self.restore_network();
    }

    /// Stop the controller (tasks stopped, database flushed and released).
    pub async fn stop_controller(&mut self) {
        if let Some(c) = self.controller.take() {
            c.shutdown().await;
        }
    }

    /// Start the controller again with the same configuration, database and clock.
    pub async fn start_controller(&mut self) {
        assert!(self.controller.is_none(), "controller already running");
        let c = Controller::start(self.config.clone(), Arc::new(self.clock.clone()))
            .await
            .expect("controller restarts");
        self.controller = Some(c);
    }

    /// A readable picture of the world for failure messages.
    pub fn dump(&self) -> String {
        let mut s = String::from("--- agents ---\n");
        for r in self.statuses() {
            s.push_str(&format!(
                "{} [{}] {} current={:?} target={:?} rollout={:?} err={:?}\n",
                r.device,
                r.ring,
                r.phase.as_str(),
                r.current.as_ref().map(|c| c.sequence),
                r.target.as_ref().map(|c| c.sequence),
                r.rollout_id,
                r.last_error.as_ref().map(|e| &e.reason)
            ));
        }
        if let Some(c) = &self.controller {
            s.push_str("--- controller ---\n");
            if let Ok(st) = c.shared().state.read() {
                for r in st.rollouts.values() {
                    s.push_str(&format!(
                        "rollout {} {:?} reached {:?}\n",
                        r.id, r.state, r.rings_reached
                    ));
                }
            }
            if let Ok(d) = c.shared().devices.read() {
                let mut v: Vec<_> = d.values().collect();
                v.sort_by(|a, b| a.id.cmp(&b.id));
                if v.len() > 40 {
                    s.push_str(&format!("({} devices known; the first 40:)\n", v.len()));
                }
                for d in v.into_iter().take(40) {
                    if let Some(r) = &d.report {
                        s.push_str(&format!(
                            "seen {} {} cur={:?} tgt={:?}\n",
                            d.id,
                            r.phase.as_str(),
                            r.current.as_ref().map(|c| c.sequence),
                            r.target.as_ref().map(|c| c.sequence)
                        ));
                    }
                }
            }
        }
        if let Some(m) = self.mosquitto() {
            let log = m.log();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            s.push_str("--- mosquitto log (last 20 lines) ---\n");
            for l in tail.into_iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    /// Stop agents and controller.
    pub async fn shutdown(mut self) {
        self.ticker.abort();
        let fleet = std::mem::replace(&mut self.fleet, Fleet::empty());
        fleet.shutdown(Duration::from_secs(10)).await;
        if let Some(c) = self.controller.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), c.shutdown()).await;
        }
    }
}
