//! [`MosquittoLab`]: the shipped Mosquitto config running on a free port with a fresh test CA,
//! in one call — the starting point for every scenario over mutual TLS.
//!
//! ```no_run
//! # async fn demo() {
//! use ringcast_tests::lab::MosquittoLab;
//! let Some(lab) = MosquittoLab::start(&["dev-1", "dev-2"]) else { return }; // skipped
//! // An agent: agent.toml's [broker] gets these values.
//! let url = lab.mqtts_url();                      // "mqtts://127.0.0.1:PORT"
//! let broker_table = lab.agent_broker_toml("dev-1"); // "[broker]\nurl = …" for agent.toml
//! let dev = lab.certs().device("dev-1");          // .cert / .key paths, CN = "dev-1"
//! let ca = lab.certs().ca();                      // ca_file
//! // The controller: lab.certs().controller() (CN ringcast-controller).
//! // A read-only observer (may run beside the real controller):
//! let mut ctl = lab.connect_observer("observer").await;
//! # let _ = (url, dev, ca, &mut ctl);
//! # }
//! ```

use crate::certs::{CertSet, ClientCert};
use crate::error::Result;
use crate::mosquitto::{self, Mosquitto};
use crate::mqtt::{tls_options, TestClient};
use rumqttc::MqttOptions;
use std::path::Path;
use std::time::Duration;

/// How long a lab client may take to connect before the test fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A temp dir with certificates from `deploy/make-certs.sh` and a Mosquitto running the
/// shipped config and ACL. Dropping it stops the broker and removes the files.
#[derive(Debug)]
pub struct MosquittoLab {
    // Field order matters: the broker is killed before its directory is removed.
    broker: Mosquitto,
    certs: CertSet,
    dir: tempfile::TempDir,
}

impl MosquittoLab {
    /// Start a lab with certificates for the controller and `devices`, or `None` after
    /// printing the skip message when Mosquitto is missing (panics under `CI`). Panics with
    /// the broker log if anything else fails: this is test setup.
    pub fn start(devices: &[&str]) -> Option<MosquittoLab> {
        let bin = mosquitto::require_or_skip()?;
        match Self::start_with(&bin, devices) {
            Ok(lab) => Some(lab),
            Err(e) => panic!("starting the Mosquitto lab failed: {e}"),
        }
    }

    /// Like [`MosquittoLab::start`] with an explicit binary, returning errors.
    pub fn start_with(binary: &Path, devices: &[&str]) -> Result<MosquittoLab> {
        let dir = tempfile::tempdir()
            .map_err(|e| crate::HarnessError::io("creating a temp dir for the lab", e))?;
        let certs = CertSet::generate(&dir.path().join("certs"), devices)?;
        let broker = Mosquitto::start(binary, &certs, &dir.path().join("broker"))?;
        Ok(MosquittoLab { broker, certs, dir })
    }

    /// The certificates (CA, controller, devices).
    pub fn certs(&self) -> &CertSet {
        &self.certs
    }

    /// The broker (port, log, stop/kill/restart).
    pub fn broker(&self) -> &Mosquitto {
        &self.broker
    }

    /// The broker, mutably: to stop, kill or restart it mid-scenario.
    pub fn broker_mut(&mut self) -> &mut Mosquitto {
        &mut self.broker
    }

    /// A scratch directory that lives as long as the lab (agent data dirs, artifacts, …).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The URL agents are configured with: `mqtts://127.0.0.1:{port}`.
    pub fn mqtts_url(&self) -> String {
        format!("mqtts://{}:{}", self.broker.host(), self.broker.port())
    }

    /// The `[broker]` table of an `agent.toml` for `device` on this broker (mutual TLS with
    /// the device's certificate; no username: the broker takes it from the certificate).
    pub fn agent_broker_toml(&self, device: &str) -> String {
        let id = self.certs.device(device);
        // Debug formatting quotes and escapes the paths as TOML basic strings need.
        format!(
            "[broker]\nurl = {:?}\nca_file = {:?}\nclient_cert = {:?}\nclient_key = {:?}\n",
            self.mqtts_url(),
            self.certs.ca().display().to_string(),
            id.cert.display().to_string(),
            id.key.display().to_string(),
        )
    }

    /// rumqttc options for `identity` over mutual TLS to this broker.
    pub fn client_options(&self, client_id: &str, identity: &ClientCert) -> Result<MqttOptions> {
        tls_options(
            client_id,
            self.broker.host(),
            self.broker.port(),
            self.certs.ca_pem()?,
            Some(identity),
        )
    }

    /// Connect a [`TestClient`] as `identity`; panics with the broker log on failure.
    pub async fn connect(&self, client_id: &str, identity: &ClientCert) -> TestClient {
        let opts = match self.client_options(client_id, identity) {
            Ok(o) => o,
            Err(e) => panic!("{client_id}: {e}"),
        };
        match TestClient::connect(opts, CONNECT_TIMEOUT).await {
            Ok(c) => c,
            Err(e) => panic!(
                "{client_id} could not connect: {e}\n--- broker log ---\n{}",
                self.broker.log()
            ),
        }
    }

    /// Connect with the controller's certificate (full rights under the shipped ACL). The
    /// broker allows one connection per certificate: this one replaces any other, including
    /// a real controller's.
    pub async fn connect_controller(&self, client_id: &str) -> TestClient {
        self.connect(client_id, &self.certs.controller()).await
    }

    /// Connect with the read-only observer's certificate: sees every topic, may publish none.
    pub async fn connect_observer(&self, client_id: &str) -> TestClient {
        self.connect(client_id, &self.certs.observer()).await
    }

    /// Connect with a device's certificate.
    pub async fn connect_device(&self, device: &str) -> TestClient {
        self.connect(device, &self.certs.device(device)).await
    }
}
