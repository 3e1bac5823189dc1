//! Crash-safe file writes: temp file in the same directory, write, fsync, rename, fsync the
//! directory. A power cut leaves either the old file or the new one, never half of one.
//!
//! The one implementation lives in [`ringcast_agent::fsutil`] (STYLE.md rule 7); these are
//! the controller's names for it, mapping errors into the controller's [`Error`].

use crate::error::{Error, Result};
use ringcast_agent::fsutil::{self as shared, WriteError, WriteOptions};
use std::path::Path;

/// Write `bytes` to `path` atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    shared::write_atomic_with(path, bytes, &WriteOptions::default()).map_err(|e| match e {
        WriteError::Io { path, source, .. } => Error::io(path, source),
        // Overwriting is allowed here, so this cannot happen; kept total rather than panicking.
        WriteError::Exists { path } => Error::io(
            path,
            std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        ),
    })
}

/// fsync a directory so a rename inside it survives a power cut.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    shared::fsync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn failed_write_is_an_io_error_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("missing-dir").join("x.json");
        let err = write_atomic(&p, b"one").unwrap_err();
        assert_eq!(err.code(), "io");
        assert!(err.to_string().contains(&p.display().to_string()), "{err}");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
