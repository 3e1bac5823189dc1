//! `ringcast demo`: [`show`] is the demo itself — embedded broker, controller, a fleet of
//! real agents ([`ringcast_agent::fleet`]); v1, v2 and a broken v3 built with
//! [`crate::kit`]; progress per ring; a summary that is checked, not just printed.

pub mod show;

use std::path::{Path, PathBuf};

/// Errors of the demo and of [`crate::kit`], with stable reason codes.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Something could not be prepared (keys, bundles, directories).
    #[error("setup: {0}")]
    Setup(String),
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The fleet of agents ([`ringcast_agent::fleet`]) could not be built or steered.
    #[error("fleet: {0}")]
    Fleet(#[from] ringcast_agent::error::FleetError),
    /// The controller failed.
    #[error("controller: {0}")]
    Controller(#[from] ringcast_controller::Error),
    /// The controller's API refused or was unreachable.
    #[error("api: {0}")]
    Api(#[from] ringcast_controller::client::ClientError),
    /// Something did not happen in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// Ctrl-C.
    #[error("interrupted")]
    Interrupted,
}

impl DemoError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> DemoError {
        DemoError::Io {
            path: path.to_owned(),
            source,
        }
    }

    /// Stable `snake_case` reason code.
    pub fn code(&self) -> &'static str {
        match self {
            DemoError::Setup(_) => "setup_failed",
            DemoError::Io { .. } => "io_error",
            DemoError::Fleet(_) => "fleet_error",
            DemoError::Controller(_) => "controller_error",
            DemoError::Api(_) => "api_error",
            DemoError::Timeout(_) => "timeout",
            DemoError::Interrupted => "interrupted",
        }
    }
}

/// Result alias.
pub type Result<T> = std::result::Result<T, DemoError>;
