//! `ringcast`: the `ringcast` command line (the release manager's and operator's verbs, and
//! `ringcast serve`, the controller daemon) and `ringcast demo`. It is the one crate that links
//! both the controller and the agent: the controller library never links the agent, and the
//! agent never links the controller (a test in `tests/tests/layering.rs` holds both to it).
//!
//! - [`demo`]: `ringcast demo`, an embedded broker, the controller and a fleet of real agents
//!   ([`ringcast_agent::fleet`]) in one process.
//! - [`kit`]: what a local Ringcast world needs before anything runs — fresh keys and a trust
//!   root written as files, a tiny "app" bundle and its signed release. The demo, the fleet
//!   simulator and the end-to-end tests all build their releases with it.
//!
//! The binary's verbs live beside `main.rs` (`src/commands/`), one module per verb group with
//! its clap `Args` and `run()`.

pub mod demo;
pub mod kit;
