//! Errors of the end-to-end harness, each with a stable reason code.

use std::path::Path;

/// Why a harness step failed. Test code usually `unwrap()`s these: the message says what
/// happened and where, and for a broker includes its log.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A file or process operation failed.
    #[error("io_error: {context}: {source}")]
    Io {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An external command (openssl script, mosquitto) exited unsuccessfully.
    #[error("command_failed: {command} exited with {status}: {output}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// Its stderr and stdout, trimmed.
        output: String,
    },
    /// The shipped config no longer has a line the harness must template.
    #[error("config_template: {0}")]
    Template(String),
    /// The broker did not come up.
    #[error("broker_start_failed: {detail}\n--- broker log ---\n{log}")]
    BrokerStart {
        /// What went wrong.
        detail: String,
        /// The broker's log so far.
        log: String,
    },
    /// A bounded wait ran out.
    #[error("timeout: {0}")]
    Timeout(String),
    /// The MQTT client failed or the broker answered unexpectedly.
    #[error("mqtt: {0}")]
    Mqtt(String),
    /// A simulator or scenario argument is invalid (e.g. a ring split).
    #[error("bad_argument: {0}")]
    BadArgument(String),
}

impl HarnessError {
    /// The stable `snake_case` code.
    pub fn code(&self) -> &'static str {
        match self {
            HarnessError::Io { .. } => "io_error",
            HarnessError::CommandFailed { .. } => "command_failed",
            HarnessError::Template(_) => "config_template",
            HarnessError::BrokerStart { .. } => "broker_start_failed",
            HarnessError::Timeout(_) => "timeout",
            HarnessError::Mqtt(_) => "mqtt",
            HarnessError::BadArgument(_) => "bad_argument",
        }
    }

    /// An I/O error with what the harness was doing.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        HarnessError::Io {
            context: context.into(),
            source,
        }
    }

    /// An I/O error on a path.
    pub fn io_path(what: &str, path: &Path, source: std::io::Error) -> Self {
        HarnessError::Io {
            context: format!("{what} {}", path.display()),
            source,
        }
    }
}

/// Result alias for the harness.
pub type Result<T, E = HarnessError> = std::result::Result<T, E>;
