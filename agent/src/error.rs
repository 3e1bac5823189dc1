//! Errors of the agent library. Every variant has a stable `snake_case` code (see
//! [`Error::code`]) that reaches events, state reports and the command line.

use std::path::PathBuf;

/// Everything that can go wrong inside the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file could not be read or is invalid.
    #[error("config {path}: {detail}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the field.
        detail: String,
    },
    /// The persistent store failed.
    #[error("store: {0}")]
    Store(String),
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What we tried.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The trust root the agent was given cannot be used.
    #[error("trust root: {0}")]
    Trust(ringcast_proto::Rejection),
    /// A relative artifact URL with no `artifact_base_url` configured.
    #[error("artifact url {0:?} is relative and no artifact_base_url is configured")]
    NoArtifactBase(String),
    /// The download failed (HTTP, network, stall, or verification).
    #[error("download: {code}: {detail}")]
    Download {
        /// Stable code.
        code: &'static str,
        /// Detail.
        detail: String,
    },
    /// An archive entry tried to leave the release directory or is of a refused type.
    #[error("archive entry {entry:?} refused: {detail}")]
    UnsafeArchive {
        /// Entry path as written in the archive.
        entry: String,
        /// Why.
        detail: String,
    },
    /// Installing, a hook or a revert command failed.
    #[error("install: {code}: {detail}")]
    Install {
        /// Stable code.
        code: &'static str,
        /// Detail (with the tail of the command's output where there is one).
        detail: String,
    },
    /// MQTT setup failed (bad URL, TLS files).
    #[error("mqtt: {0}")]
    Mqtt(String),
}

impl Error {
    /// The stable reason code.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Config { .. } => "bad_config",
            Error::Store(_) => "store_failed",
            Error::Io { source, .. } if is_disk_full(source) => "disk_full",
            Error::Io { .. } => "io_error",
            Error::Trust(_) => "bad_trust_root",
            Error::NoArtifactBase(_) => "no_artifact_base",
            Error::Download { code, .. } => code,
            Error::UnsafeArchive { .. } => "unsafe_archive",
            Error::Install { code, .. } => code,
            Error::Mqtt(_) => "mqtt_setup",
        }
    }

    /// An [`Error::Io`] for `op` on `path`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

impl From<ringcast_io::fs::FsError> for Error {
    fn from(e: ringcast_io::fs::FsError) -> Error {
        use ringcast_io::fs::FsError;
        match e {
            // The agent never refuses overwrites today; should it, the kind keeps the meaning.
            FsError::Exists { path } => Error::io(
                "link",
                path,
                std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            ),
            FsError::Io { op, path, source } => Error::Io { op, path, source },
        }
    }
}

/// Whether an I/O error means the filesystem is full (ACCEPTANCE.md case 17).
pub fn is_disk_full(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(28)
}

/// Why an in-process fleet ([`crate::fleet`]) could not be built or steered.
#[cfg(feature = "fleet")]
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// Fewer devices than rings: every ring needs at least one.
    #[error("{devices} devices cannot fill {rings} rings")]
    TooFewDevices {
        /// Devices asked for.
        devices: usize,
        /// Rings to fill.
        rings: usize,
    },
    /// No device with this id in the fleet.
    #[error("no device {0} in the fleet")]
    NoDevice(String),
    /// One device's agent could not be prepared, started or stopped.
    #[error("device {device}: {source}")]
    Agent {
        /// The device.
        device: String,
        /// The agent's error.
        #[source]
        source: Error,
    },
}

#[cfg(feature = "fleet")]
impl FleetError {
    /// The stable `snake_case` reason code.
    pub fn code(&self) -> &'static str {
        match self {
            FleetError::TooFewDevices { .. } => "too_few_devices",
            FleetError::NoDevice(_) => "no_device",
            FleetError::Agent { source, .. } => source.code(),
        }
    }

    /// An [`FleetError::Agent`] for the device `cfg` configures.
    pub fn agent(cfg: &crate::AgentConfig, source: Error) -> FleetError {
        FleetError::Agent {
            device: cfg.device_id.clone(),
            source,
        }
    }
}

/// Result alias for the agent library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_file_step_keeps_its_step_path_and_disk_full_code() {
        let d = tempfile::tempdir().unwrap();
        // A non-empty directory where the file should go: rename(2) must fail.
        let p = d.path().join("busy");
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join("inside"), b"x").unwrap();
        let err = Error::from(ringcast_io::fs::write_atomic(&p, b"data").unwrap_err());
        assert_eq!(err.code(), "io_error");
        assert!(err.to_string().starts_with("rename "), "{err}");
        assert!(err.to_string().contains("busy"), "{err}");

        let full =
            ringcast_io::fs::FsError::io("write", "/data/x", std::io::Error::from_raw_os_error(28));
        assert_eq!(Error::from(full).code(), "disk_full");
    }
}
