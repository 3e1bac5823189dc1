//! The library entry point: [`Controller::start`] wires store, audit log, engine, ingestion,
//! MQTT and HTTP together and returns a [`ControllerHandle`]. `ringcast serve`, the demo and
//! the end-to-end tests all start the controller this way.

use crate::api::{self, App};
use crate::artifacts::ArtifactStore;
use crate::config::ControllerConfig;
use crate::engine::{self, EngineHandle};
use crate::error::{Error, Result};
use crate::ingest::Ingestor;
use crate::mqtt::{self, MqttSettings};
use crate::shared::{Counters, Shared};
use crate::store::Store;
use ringcast_proto::{Clock, SecretKey, TrustRoot};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tracing::info;

/// Namespace for [`Controller::start`].
pub struct Controller;

/// A running controller.
pub struct ControllerHandle {
    http_addr: SocketAddr,
    broker_addr: SocketAddr,
    shared: Arc<Shared>,
    engine: EngineHandle,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl ControllerHandle {
    /// Where the HTTP API listens.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// `http://{http_addr}` (the artifact base agents use).
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// The MQTT broker the controller uses (embedded or configured).
    pub fn broker_addr(&self) -> SocketAddr {
        self.broker_addr
    }

    /// Shared state (read-only use: tests and the demo inspect rollouts and devices).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The engine handle (submit, approve, … without HTTP).
    pub fn engine(&self) -> &EngineHandle {
        &self.engine
    }

    /// Stop every task, flush the database and release it (the embedded broker, which has
    /// no shutdown, keeps running).
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        let _ = self.shared.store.flush().await;
        drop(self.engine);
        drop(self.shared);
    }
}

fn load_key(path: &std::path::Path) -> Result<SecretKey> {
    // The keyfile module refuses keys readable by group or others, naming path and mode.
    crate::keyfile::load_secret_key(path).map_err(|e| Error::Config {
        file: path.display().to_string(),
        field: "server.controller_key".into(),
        detail: e.to_string(),
    })
}

impl Controller {
    /// Start the controller. Must be called inside a tokio runtime.
    pub async fn start(
        config: ControllerConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<ControllerHandle> {
        let policy = config.policy.clone();
        policy.validate("<config>")?;
        let topics = policy.topics()?;
        let tokens = config.all_tokens()?;

        let trust_bytes =
            std::fs::read(&config.server.trust).map_err(|e| Error::io(&config.server.trust, e))?;
        let trust = TrustRoot::from_bytes_self_signed(&trust_bytes)?;
        let key = load_key(&config.server.controller_key)?;
        // Secrets are read before anything starts, so a bad one stops startup naming its field.
        let webhooks = crate::webhook::load(&config.webhooks)?;
        if !trust.roles.controller.keyids.contains(key.key_id()) {
            return Err(Error::Config {
                file: config.server.controller_key.display().to_string(),
                field: "server.controller_key".into(),
                detail: format!(
                    "key {} is not a controller key of trust root version {}",
                    key.key_id(),
                    trust.version()
                ),
            });
        }

        let broker_addr = match &config.broker {
            Some(b) => {
                let addr = tokio::net::lookup_host((b.host.as_str(), b.port))
                    .await
                    .map_err(|e| Error::Mqtt(format!("resolve {}: {e}", b.host)))?
                    .next()
                    .ok_or_else(|| Error::Mqtt(format!("{} resolves to nothing", b.host)))?;
                addr
            }
            None => {
                let port = tokio::task::spawn_blocking(crate::broker::start_embedded)
                    .await
                    .map_err(|e| Error::Broker(e.to_string()))??;
                info!(port, "embedded MQTT broker listening on 127.0.0.1");
                SocketAddr::from(([127, 0, 0, 1], port))
            }
        };
        let settings = match &config.broker {
            Some(b) => MqttSettings {
                host: b.host.clone(),
                port: b.port,
                client_id: b.client_id.clone(),
                protocol: b.protocol,
                watch_drops: b.watch_drops,
                persistent: b.persistent_session,
                credentials: b
                    .username
                    .clone()
                    .map(|u| (u, b.password.clone().unwrap_or_default())),
                tls: b.tls.clone(),
            },
            None => MqttSettings {
                host: "127.0.0.1".into(),
                port: broker_addr.port(),
                client_id: "ringcast-controller".into(),
                // The embedded rumqttd listens with MQTT 3.1.1 (and its payload limit keeps
                // oversized messages out).
                protocol: ringcast_io::mqtt::Protocol::V311,
                // rumqttd has no `$SYS` counter (and drops a client that asks for one).
                watch_drops: false,
                // It lives and dies with this process: a session cannot outlive a restart.
                persistent: false,
                credentials: None,
                tls: None,
            },
        };

        let store = Store::open(&config.server.data_dir)?;
        let audit = store.audit()?;
        // Before the engine runs, so a new webhook's start point precedes any new entry.
        crate::webhook::init_cursors(&webhooks, &store, audit.head_seq()).await?;
        let artifacts = ArtifactStore::open(&config.server.data_dir)?;
        let state = engine::load_state(&store)?;
        let devices = store
            .devices()?
            .into_iter()
            .map(|d| (d.id.clone(), d))
            .collect();
        let (client, eventloop) = mqtt::connect(&settings)?;

        let shared = Arc::new(Shared {
            topics: topics.clone(),
            clock: clock.clone(),
            store: store.clone(),
            audit,
            state: engine::Snapshot::new(state),
            devices: Arc::new(RwLock::new(devices)),
            wake: Arc::new(Notify::new()),
            counters: Arc::new(Counters::default()),
            trust,
            trust_envelope: trust_bytes,
            key,
            mqtt: client.clone(),
            artifacts,
            tokens,
            max_artifact_bytes: config.server.max_artifact_bytes,
            webhooks: webhooks.iter().map(|w| w.status()).collect(),
            settled: watch::Sender::new(jiff::Timestamp::MIN),
            fleet_read: Arc::default(),
            policy,
        });

        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (eng, handle) = engine::engine(shared.clone())?;
        let (in_tx, in_rx) = mpsc::channel(8192);
        let ingestor = Ingestor::new(
            topics.clone(),
            clock,
            store,
            shared.devices.clone(),
            shared.counters.clone(),
            shared.wake.clone(),
        )
        .with_event_history(config.server.device_events.max(1))
        .with_fleet_read(shared.fleet_read.clone());

        let listener = tokio::net::TcpListener::bind(config.server.listen)
            .await
            .map_err(|e| Error::Http(format!("bind {}: {e}", config.server.listen)))?;
        let http_addr = listener
            .local_addr()
            .map_err(|e| Error::Http(e.to_string()))?;
        let app = api::router(App {
            shared: shared.clone(),
            engine: handle.clone(),
        });

        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(eng.run(shutdown_rx.clone())));
        tasks.push(tokio::spawn(ingestor.run(
            in_rx,
            shutdown_rx.clone(),
            std::time::Duration::from_millis(100),
        )));
        tasks.push(tokio::spawn(mqtt::run(
            eventloop,
            client,
            mqtt::Wiring {
                topics: topics.clone(),
                tx: in_tx,
                engine: handle.clone(),
                devices: shared.devices.clone(),
                counters: shared.counters.clone(),
                watch_drops: settings.watch_drops,
            },
            shutdown_rx.clone(),
        )));
        for w in webhooks {
            tasks.push(tokio::spawn(w.run(shared.clone(), shutdown_rx.clone())));
        }
        let mut http_shutdown = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = http_shutdown.changed().await;
            });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "http server failed");
            }
        }));
        info!(%http_addr, %broker_addr, fleet = %shared.policy.fleet, "controller started");
        Ok(ControllerHandle {
            http_addr,
            broker_addr,
            shared,
            engine: handle,
            shutdown: shutdown_tx,
            tasks,
        })
    }
}
