//! Shared helpers for Ringcast's end-to-end scenarios.
//!
//! Everything here drives REAL components, so a scenario tests what ships:
//! - [`certs`]: a test CA and client certificates made by the shipped `deploy/make-certs.sh`.
//! - [`mosquitto`]: find the `mosquitto` binary (or skip, or fail under `CI`), run it with the
//!   shipped `deploy/mosquitto/mosquitto.conf` and `acl` templated only for port, paths and data
//!   dir, stop, kill and restart it on the same port with the same data.
//! - [`mqtt`]: rumqttc options for mutual TLS or plain TCP, and [`mqtt::TestClient`], an
//!   observer/publisher whose every wait is bounded and fails loudly.
//! - [`lab`]: [`lab::MosquittoLab`], all of the above in one call: the starting point of a
//!   scenario over mutual TLS (an agent gets `lab.mqtts_url()`, `lab.certs().ca()` and
//!   `lab.certs().device(id)`; the controller `lab.certs().controller()`).
//! - [`sim`]: the fleet simulator's options (`ringcast-sim`), ring splits, memory readings.
//! - [`sim_stage`]: [`sim_stage::Stage`], a whole Ringcast world for a scenario: controller,
//!   broker (embedded, or Mosquitto over mutual TLS), a fleet of real agents, a fake clock.
//! - [`synthetic`]: devices that are only the retained reports a test publishes for them.
//! - [`error`]: [`HarnessError`] with stable reason codes.
//!
//! `tests/tests/mosquitto_acl.rs` shows the pattern.

pub mod certs;
pub mod error;
pub mod lab;
pub mod mosquitto;
pub mod mqtt;
pub mod sim;
pub mod sim_stage;
pub mod synthetic;

pub use error::{HarnessError, Result};

use std::path::PathBuf;

/// The workspace root (the directory holding `deploy/`, `proto/`, `tests/`).
pub fn workspace_root() -> PathBuf {
    // CARGO_MANIFEST_DIR is `<root>/tests` at compile time; the tests always run from a
    // checkout, so the shipped files are found relative to it.
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// The shipped deploy kit: `<root>/deploy`.
pub fn deploy_dir() -> PathBuf {
    workspace_root().join("deploy")
}

/// A TCP port on 127.0.0.1 reserved for this process (see `ringcast_io::ports`: below the
/// ephemeral range, locked against other Ringcast processes), so a server started on it does
/// not race another test for it.
pub fn free_port() -> Result<u16> {
    ringcast_io::ports::reserve().map_err(|e| {
        HarnessError::io(
            "reserving a local port",
            std::io::Error::new(std::io::ErrorKind::AddrInUse, e.to_string()),
        )
    })
}

/// Whether this test run is CI (`CI` set and not empty): there, missing tools fail the run
/// instead of skipping, because CI installs them.
pub fn is_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
}

/// Route the tracing output of the in-process controller and agents to the test harness's
/// captured output, so a failing test shows their warnings (`RUST_LOG` widens it). Safe to
/// call from every test.
pub fn test_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,rumqttd=off")),
        )
        .with_test_writer()
        .try_init();
}
