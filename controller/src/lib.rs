//! `ringcast-controller`: the controller daemon as a library (rollout engine, report
//! ingestion, artifact store, HTTP API, audit log) and the key files its command line writes.
//! The `ringcast` binary that runs it (`ringcast serve`) and the operator verbs are the
//! `ringcast` crate (`cli/`); this crate does not link the agent.
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
//! - [`client`]: the HTTP client the command line uses.
//! - [`keyfile`]: PKCS#8 / SubjectPublicKeyInfo key files, written crash-safely.
//! - [`webhook`]: HMAC-signed webhooks fed from the audit log.

pub mod api;
pub mod artifacts;
pub mod audit;
pub mod broker;
pub mod checks;
pub mod client;
pub mod config;
pub mod controller;
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
