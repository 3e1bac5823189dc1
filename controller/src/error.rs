//! The controller's error type, with a stable `snake_case` code per variant (shown by the API
//! and the command line).

use std::path::PathBuf;

/// Everything that can go wrong inside the controller library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The policy or daemon configuration is invalid; `field` names the culprit.
    #[error("config {file}: {field}: {detail}")]
    Config {
        /// File the config came from (or `<code>`).
        file: String,
        /// Dotted path of the offending field.
        field: String,
        /// What is wrong.
        detail: String,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The sled database failed.
    #[error("database: {0}")]
    Db(#[from] sled::Error),
    /// A stored record could not be decoded.
    #[error("stored {what} is corrupt: {detail}")]
    Corrupt {
        /// Which record.
        what: String,
        /// Why.
        detail: String,
    },
    /// A signed document was refused (signature, expiry, shape …).
    #[error("{0}")]
    Rejected(#[from] ringcast_proto::Rejection),
    /// The embedded MQTT broker could not start.
    #[error("broker: {0}")]
    Broker(String),
    /// MQTT client failure.
    #[error("mqtt: {0}")]
    Mqtt(String),
    /// The HTTP listener could not start.
    #[error("http: {0}")]
    Http(String),
    /// A referenced object does not exist.
    #[error("{what} {id:?} not found")]
    NotFound {
        /// Kind of object.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// The request conflicts with the current state (e.g. approve when nothing waits).
    #[error("{code}: {detail}")]
    Conflict {
        /// Stable code.
        code: &'static str,
        /// Detail.
        detail: String,
    },
    /// The controller is shutting down.
    #[error("controller is shutting down")]
    ShuttingDown,
}

impl Error {
    /// The stable `snake_case` code.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Config { .. } => "bad_config",
            Error::Io { .. } => "io",
            Error::Db(_) => "database",
            Error::Corrupt { .. } => "corrupt",
            Error::Rejected(r) => r.reason.code(),
            Error::Broker(_) => "broker",
            Error::Mqtt(_) => "mqtt",
            Error::Http(_) => "http",
            Error::NotFound { .. } => "not_found",
            Error::Conflict { code, .. } => code,
            Error::ShuttingDown => "shutting_down",
        }
    }

    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A conflict with a stable code.
    pub fn conflict(code: &'static str, detail: impl Into<String>) -> Error {
        Error::Conflict {
            code,
            detail: detail.into(),
        }
    }

    /// A corrupt stored record.
    pub fn corrupt(what: impl Into<String>, detail: impl std::fmt::Display) -> Error {
        Error::Corrupt {
            what: what.into(),
            detail: detail.to_string(),
        }
    }
}

impl From<ringcast_io::fs::FsError> for Error {
    fn from(e: ringcast_io::fs::FsError) -> Error {
        use ringcast_io::fs::FsError;
        match e {
            FsError::Io { path, source, .. } => Error::io(path, source),
            // The controller's state writes always overwrite; kept total rather than panicking.
            FsError::Exists { path } => Error::io(
                path,
                std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            ),
        }
    }
}

/// Result alias for the controller library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_write_is_an_io_error_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("missing-dir").join("x.json");
        let err = Error::from(ringcast_io::fs::write_atomic(&p, b"one").unwrap_err());
        assert_eq!(err.code(), "io");
        assert!(err.to_string().contains(&p.display().to_string()), "{err}");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
