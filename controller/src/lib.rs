//! `ringcast-controller`: the controller daemon (rollout engine, report ingestion, artifact
//! store, HTTP API, audit log) and the file helpers its command line uses.
//!
//! - [`config`]: `ringcast.toml` (policy, server, broker, tokens).
//! - [`controller`]: [`Controller::start`] → [`ControllerHandle`], the in-process entry point.
//! - [`engine`]: the rollout state machines (one actor), gates, directives, re-signing.
//! - [`ingest`] and [`mqtt`]: device reports in, directives out; [`reread`]: the complete
//!   re-read of retained reports at every connect and after the broker dropped messages.
//! - [`api`]: `/api/v1`, `/metrics`, `/artifacts/sha256/{hex}`, dashboard.
//! - [`audit`]: the hash-chained audit log and its verifier.
//! - [`store`], [`model`], [`artifacts`]: persistence (files are written crash-safely by
//!   [`ringcast_io::fs`]).
//! - [`broker`]: the embedded rumqttd.
//! - [`client`]: the HTTP client the CLI uses.
//! - [`webhook`]: HMAC-signed webhooks fed from the audit log.
//! - [`demo`]: `ringcast demo`, and the in-process fleet of real agents the simulator and
//!   the end-to-end scenarios share.

pub mod api;
pub mod artifacts;
pub mod audit;
pub mod broker;
pub mod checks;
pub mod client;
pub mod config;
pub mod controller;
pub mod demo;
pub mod engine;
pub mod error;
pub mod ingest;
pub mod keyfile;
pub mod model;
pub mod mqtt;
pub mod reread;
pub mod shared;
pub mod store;
pub mod webhook;

pub use config::ControllerConfig;
pub use controller::{Controller, ControllerHandle};
pub use error::{Error, Result};
