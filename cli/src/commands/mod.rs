//! One module per verb group, each with its clap `Args` and a `run()`.

pub mod audit;
pub mod common;
pub mod demo;
pub mod devices;
pub mod key;
pub mod release;
pub mod release_submit;
pub mod rollout;
pub mod serve;
pub mod trust;
