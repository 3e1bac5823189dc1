//! A fleet of real agents in one process (feature `fleet`): each device is the real agent
//! library with its own MQTT connection, its own data directory and installer root, and its
//! own store (sled, or in memory for load runs). `ringcast demo`, the `ringcast-sim` binary
//! and the end-to-end scenarios all build their devices here, so a simulated device runs
//! exactly the code a real one does. It lives in the agent crate so that none of them needs
//! the controller to link the agent.

use crate::config::{AgentConfig, ProductConfig};
use crate::error::{Error, FleetError};
use crate::{Agent, AgentHandle, Deps, FsInstaller, MemoryStore, SledStore, Store};
use ringcast_proto::{Clock, Dur, StateReport};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Result alias of the fleet builder.
pub type Result<T, E = FleetError> = std::result::Result<T, E>;

/// Name of the marker file that makes a healthy test app fail its health check on one
/// device: `{install_root}/fail-health` (the app's check finds it two levels above its
/// `releases/{version}/` directory). A real check on a real file, so a simulated failure goes
/// through exactly the code a real one does; the fleet places it on the devices its
/// [`FleetSpec::fail_rate`] picks.
pub const FAIL_MARKER: &str = "fail-health";

/// Where each agent keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreKind {
    /// sled in `{data_dir}/db` (what a device runs; survives a restart).
    #[default]
    Sled,
    /// In memory (load runs: no disk per agent; lost on restart).
    Memory,
}

/// A last touch on each device's configuration (TLS files, timings).
pub type Customize = Arc<dyn Fn(&mut AgentConfig) + Send + Sync>;

/// A fleet to simulate.
#[derive(Clone)]
pub struct FleetSpec {
    /// Fleet name.
    pub fleet: String,
    /// Device class of every device.
    pub device_class: String,
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub broker_url: String,
    /// The trust root file every device ships with.
    pub trust_root: PathBuf,
    /// Base joined to relative artifact URLs (the controller's HTTP address).
    pub artifact_base_url: Option<String>,
    /// Parent of the devices' data directories (`{dir}/{device}`).
    pub dir: PathBuf,
    /// Rings and how many devices each has, in order.
    pub rings: Vec<(String, usize)>,
    /// Share of devices (0.0–1.0, per ring, rounded) whose health checks fail.
    pub fail_rate: f64,
    /// Store for each agent.
    pub store: StoreKind,
    /// Time for every agent (share the controller's `FakeClock` in tests).
    pub clock: Arc<dyn Clock>,
    /// Last touch on each device's config (TLS files, timings), given the device id.
    pub customize: Option<Customize>,
}

impl std::fmt::Debug for FleetSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetSpec")
            .field("fleet", &self.fleet)
            .field("broker_url", &self.broker_url)
            .field("rings", &self.rings)
            .field("fail_rate", &self.fail_rate)
            .field("store", &self.store)
            .finish()
    }
}

impl FleetSpec {
    /// Every device runs these products (`[products]`, see [`AgentConfig::products`]), each
    /// at its own install root under the device's; then the spec's own `customize`, if any,
    /// has the last word.
    pub fn with_products(mut self, products: BTreeMap<String, ProductConfig>) -> FleetSpec {
        let then = self.customize.take();
        self.customize = Some(Arc::new(move |cfg: &mut AgentConfig| {
            cfg.products = products.clone();
            if let Some(f) = &then {
                f(cfg);
            }
        }));
        self
    }
}

/// Split `n` devices over `rings` by `shares` (each ring gets at least one device; the last
/// ring takes the rest).
pub fn split(n: usize, rings: &[(&str, f64)]) -> Result<Vec<(String, usize)>> {
    if n < rings.len() {
        return Err(FleetError::TooFewDevices {
            devices: n,
            rings: rings.len(),
        });
    }
    let mut out = Vec::new();
    let mut left = n;
    for (i, (name, share)) in rings.iter().enumerate() {
        let rings_after = rings.len() - i - 1;
        let count = if rings_after == 0 {
            left
        } else {
            ((n as f64 * share).round() as usize).clamp(1, left - rings_after)
        };
        left -= count;
        out.push(((*name).to_owned(), count));
    }
    Ok(out)
}

/// The id of device `i` of `ring`.
pub fn device_id(ring: &str, i: usize) -> String {
    format!("{ring}-{i:03}")
}

/// One simulated device.
#[derive(Debug)]
pub struct SimDevice {
    /// Device id.
    pub id: String,
    /// Ring.
    pub ring: String,
    /// Whether its health checks are made to fail.
    pub failing: bool,
    /// Its configuration.
    pub cfg: AgentConfig,
    store: Arc<dyn Store>,
    handle: Option<AgentHandle>,
    last: StateReport,
}

impl SimDevice {
    /// Whether its agent is running.
    pub fn is_running(&self) -> bool {
        self.handle.is_some()
    }

    /// The latest state report (the last one seen while it ran, if stopped).
    pub fn status(&self) -> StateReport {
        match &self.handle {
            Some(h) => h.status(),
            None => self.last.clone(),
        }
    }

    /// A receiver of its state reports (while running).
    pub fn watch(&self) -> Option<watch::Receiver<StateReport>> {
        self.handle.as_ref().map(AgentHandle::watch)
    }

    /// The `VERSION` of the release its `current` link points at.
    pub fn current_version(&self) -> Option<String> {
        read_version(&self.cfg.install_root())
    }

    /// The `VERSION` of the release of `product` its `current` link points at (devices with
    /// `[products]`).
    pub fn product_version(&self, product: &str) -> Option<String> {
        read_version(&self.cfg.product_install_root(product))
    }
}

fn read_version(root: &Path) -> Option<String> {
    std::fs::read_to_string(root.join("current").join("VERSION"))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// A running fleet.
#[derive(Debug)]
pub struct Fleet {
    spec: FleetSpec,
    devices: Vec<SimDevice>,
}

/// Open the store of `kind` for the device `cfg` describes (sled in `{data_dir}/db`).
pub fn open_store(kind: StoreKind, cfg: &AgentConfig) -> Result<Arc<dyn Store>> {
    Ok(match kind {
        StoreKind::Sled => Arc::new(
            SledStore::open(&cfg.data_dir.join("db")).map_err(|e| FleetError::agent(cfg, e))?,
        ),
        StoreKind::Memory => Arc::new(MemoryStore::new()),
    })
}

/// Create the device's data directory and installer roots (the device's, and each
/// product's).
fn prepare_dirs(cfg: &AgentConfig) -> Result<()> {
    for root in install_roots(cfg) {
        std::fs::create_dir_all(&root)
            .map_err(|e| FleetError::agent(cfg, Error::io("create dir", &root, e)))?;
    }
    Ok(())
}

/// The device's install root and each product's.
fn install_roots(cfg: &AgentConfig) -> Vec<PathBuf> {
    std::iter::once(cfg.install_root())
        .chain(cfg.products.keys().map(|p| cfg.product_install_root(p)))
        .collect()
}

/// Start the real agent for `cfg` on `store` and `clock`, with the real installer in its
/// install root (each product's own, with `[products]`).
pub fn spawn_agent(
    cfg: &AgentConfig,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
) -> Result<AgentHandle> {
    let deps = Deps {
        store,
        clock,
        installer: Arc::new(FsInstaller::new(
            cfg.install_root(),
            cfg.install.command_timeout.get(),
            cfg.health.output_tail,
        )),
    };
    let agent = Agent::new(cfg.clone(), deps).map_err(|e| FleetError::agent(cfg, e))?;
    Ok(agent.spawn())
}

/// One device outside a [`Fleet`], started the way the fleet starts its own: directories
/// created, a fresh handle on its `store`, on `clock`. For a device a scenario stops and
/// restarts itself (e.g. with other delivery windows); a sled store keeps its state across.
pub fn start_agent(
    cfg: &AgentConfig,
    store: StoreKind,
    clock: Arc<dyn Clock>,
) -> Result<AgentHandle> {
    prepare_dirs(cfg)?;
    spawn_agent(cfg, open_store(store, cfg)?, clock)
}

impl Fleet {
    /// Build every device's config and store, and start every agent (connections are made
    /// by the agents themselves, concurrently).
    pub async fn start(spec: FleetSpec) -> Result<Fleet> {
        let mut devices = Vec::new();
        for (ring, count) in &spec.rings {
            let failing = (*count as f64 * spec.fail_rate.clamp(0.0, 1.0)).round() as usize;
            for i in 0..*count {
                let id = device_id(ring, i);
                let cfg = device_config(&spec, &id, ring);
                prepare_dirs(&cfg)?;
                // Spread the failing devices over the ring (every k-th), so a ramp step of
                // any size meets some of them.
                let fails = failing > 0 && (i * failing) % count < failing;
                if fails {
                    // Every product of a failing device fails its checks.
                    for root in install_roots(&cfg) {
                        let marker = root.join(FAIL_MARKER);
                        std::fs::write(&marker, b"simulated fault\n")
                            .map_err(|e| FleetError::agent(&cfg, Error::io("write", &marker, e)))?;
                    }
                }
                let store = open_store(spec.store, &cfg)?;
                let mut d = SimDevice {
                    id,
                    ring: ring.clone(),
                    failing: fails,
                    last: placeholder(&cfg),
                    cfg,
                    store,
                    handle: None,
                };
                spawn(&spec, &mut d)?;
                devices.push(d);
            }
        }
        Ok(Fleet { spec, devices })
    }

    /// A fleet of no devices (a placeholder to move a real one out of a struct).
    pub fn empty() -> Fleet {
        Fleet {
            spec: FleetSpec {
                fleet: String::new(),
                device_class: String::new(),
                broker_url: String::new(),
                trust_root: PathBuf::new(),
                artifact_base_url: None,
                dir: PathBuf::new(),
                rings: Vec::new(),
                fail_rate: 0.0,
                store: StoreKind::Memory,
                clock: Arc::new(ringcast_proto::SystemClock),
                customize: None,
            },
            devices: Vec::new(),
        }
    }

    /// The devices.
    pub fn devices(&self) -> &[SimDevice] {
        &self.devices
    }

    /// A device by id.
    pub fn device(&self, id: &str) -> Option<&SimDevice> {
        self.devices.iter().find(|d| d.id == id)
    }

    /// Every device's latest state report.
    pub fn statuses(&self) -> Vec<StateReport> {
        self.devices.iter().map(SimDevice::status).collect()
    }

    /// Stop one device's agent gracefully (as on SIGTERM); its store and files stay.
    pub async fn stop(&mut self, id: &str) -> Result<()> {
        let d = self
            .devices
            .iter_mut()
            .find(|d| d.id == id)
            .ok_or_else(|| FleetError::NoDevice(id.to_owned()))?;
        if let Some(h) = d.handle.take() {
            d.last = h.status();
            h.shutdown()
                .await
                .map_err(|e| FleetError::agent(&d.cfg, e))?;
        }
        Ok(())
    }

    /// Start a stopped device again on the same store and files.
    pub fn restart(&mut self, id: &str) -> Result<()> {
        let spec = self.spec.clone();
        let d = self
            .devices
            .iter_mut()
            .find(|d| d.id == id)
            .ok_or_else(|| FleetError::NoDevice(id.to_owned()))?;
        if d.handle.is_none() {
            spawn(&spec, d)?;
        }
        Ok(())
    }

    /// Stop every agent (bounded: an agent that does not stop within `timeout` is left to
    /// the runtime's shutdown).
    pub async fn shutdown(mut self, timeout: Duration) {
        let handles: Vec<AgentHandle> = self
            .devices
            .iter_mut()
            .filter_map(|d| d.handle.take())
            .collect();
        let all = async {
            for h in handles {
                let _ = h.shutdown().await;
            }
        };
        let _ = tokio::time::timeout(timeout, all).await;
    }
}

fn spawn(spec: &FleetSpec, d: &mut SimDevice) -> Result<()> {
    d.handle = Some(spawn_agent(&d.cfg, d.store.clone(), spec.clock.clone())?);
    Ok(())
}

fn placeholder(cfg: &AgentConfig) -> StateReport {
    StateReport {
        device: cfg.device_id.clone(),
        seq: 0,
        ring: cfg.ring.clone(),
        device_class: cfg.device_class.clone(),
        agent_version: String::new(),
        current: None,
        previous: None,
        target: None,
        phase: ringcast_proto::Phase::Idle,
        rollout_id: None,
        last_error: None,
        refused: None,
        windows: Vec::new(),
        timezone: cfg.timezone.clone(),
        updated_at: jiff::Timestamp::UNIX_EPOCH,
        attempt: 1,
        products: Default::default(),
    }
}

/// The configuration the fleet gives device `id` of `ring`: fast reconnects and retries
/// (everything is local), then the spec's `customize`.
pub fn device_config(spec: &FleetSpec, id: &str, ring: &str) -> AgentConfig {
    let data: &Path = &spec.dir.join(id);
    let mut cfg = AgentConfig::minimal(
        id,
        &spec.device_class,
        &spec.fleet,
        ring,
        &spec.broker_url,
        data,
        &spec.trust_root,
    );
    cfg.artifact_base_url = spec.artifact_base_url.clone();
    cfg.broker.reconnect_min = Dur(Duration::from_millis(100));
    cfg.broker.reconnect_max = Dur(Duration::from_secs(1));
    cfg.broker.keep_alive = Dur(Duration::from_secs(10));
    cfg.download.retry_initial = Dur(Duration::from_millis(200));
    cfg.download.retry_max = Dur(Duration::from_secs(2));
    cfg.download.connect_timeout = Dur(Duration::from_secs(5));
    cfg.download.stall_timeout = Dur(Duration::from_secs(10));
    cfg.install.command_timeout = Dur(Duration::from_secs(30));
    if let Some(f) = &spec.customize {
        f(&mut cfg);
    }
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_products_gives_every_device_them_and_customize_has_the_last_word() {
        let spec = FleetSpec {
            fleet: "lab".into(),
            device_class: "sensor-v2".into(),
            broker_url: "mqtt://127.0.0.1:1883".into(),
            trust_root: PathBuf::from("/t/trust.json"),
            artifact_base_url: None,
            dir: PathBuf::from("/t/fleet"),
            rings: vec![("canary".into(), 1)],
            fail_rate: 0.0,
            store: StoreKind::Memory,
            clock: Arc::new(ringcast_proto::SystemClock),
            customize: Some(Arc::new(|cfg: &mut AgentConfig| {
                cfg.products.remove("fw");
            })),
        };
        let products: BTreeMap<String, ProductConfig> = ["os", "app", "fw"]
            .into_iter()
            .map(|p| (p.to_owned(), ProductConfig::default()))
            .collect();
        let spec = spec.with_products(products);
        let cfg = device_config(&spec, "canary-000", "canary");
        assert_eq!(cfg.products.keys().collect::<Vec<_>>(), vec!["app", "os"]);
        assert_eq!(
            install_roots(&cfg),
            vec![
                PathBuf::from("/t/fleet/canary-000/install"),
                PathBuf::from("/t/fleet/canary-000/install/app"),
                PathBuf::from("/t/fleet/canary-000/install/os"),
            ]
        );
    }

    #[test]
    fn split_gives_every_ring_a_device_and_the_rest_to_the_last() {
        let s = split(50, &[("canary", 0.1), ("early", 0.3), ("broad", 0.6)]).unwrap();
        assert_eq!(
            s,
            vec![
                ("canary".to_owned(), 5),
                ("early".to_owned(), 15),
                ("broad".to_owned(), 30)
            ]
        );
        let s = split(3, &[("canary", 0.1), ("early", 0.3), ("broad", 0.6)]).unwrap();
        assert!(s.iter().all(|(_, n)| *n == 1), "{s:?}");
        let err = split(2, &[("a", 0.5), ("b", 0.3), ("c", 0.2)]).unwrap_err();
        assert_eq!(err.code(), "too_few_devices");
    }
}
