//! The content-addressed artifact store: `{data_dir}/artifacts/sha256/{hex}`, written
//! crash-safe, served at `/artifacts/sha256/{hex}` with HTTP Range support.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Artifacts by SHA-256.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    dir: PathBuf,
}

/// Whether `s` is 64 lowercase hex characters.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl ArtifactStore {
    /// Open (creating) under `data_dir`.
    pub fn open(data_dir: &Path) -> Result<ArtifactStore> {
        let dir = data_dir.join("artifacts").join("sha256");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(ArtifactStore { dir })
    }

    /// Path of an artifact (the hex must be checked first).
    pub fn path(&self, hex: &str) -> Option<PathBuf> {
        is_sha256_hex(hex).then(|| self.dir.join(hex))
    }

    /// Whether an artifact with this digest and size is stored.
    pub fn has(&self, hex: &str, size: u64) -> bool {
        self.path(hex)
            .and_then(|p| std::fs::metadata(p).ok())
            .is_some_and(|m| m.len() == size)
    }

    /// Store bytes; returns their digest. Idempotent.
    pub fn put(&self, bytes: &[u8]) -> Result<String> {
        let hex = ringcast_proto::digest::sha256_hex(bytes);
        let path = self.dir.join(&hex);
        if !self.has(&hex, bytes.len() as u64) {
            crate::fsutil::write_atomic(&path, bytes)?;
        }
        Ok(hex)
    }
}

/// A parsed `Range: bytes=…` header (single range only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeReq {
    /// No (usable) Range header: the whole body.
    Full,
    /// Inclusive byte range within the file.
    Part(u64, u64),
    /// Cannot be satisfied (416).
    Unsatisfiable,
}

/// Interpret a Range header against a file of `len` bytes.
pub fn parse_range(header: Option<&str>, len: u64) -> RangeReq {
    let Some(h) = header else {
        return RangeReq::Full;
    };
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return RangeReq::Full;
    };
    if spec.contains(',') {
        // Multipart ranges are not offered; the whole body is a valid answer.
        return RangeReq::Full;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return RangeReq::Unsatisfiable;
    };
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = if a.is_empty() {
        let Ok(n) = b.parse::<u64>() else {
            return RangeReq::Unsatisfiable;
        };
        if n == 0 || len == 0 {
            return RangeReq::Unsatisfiable;
        }
        (len.saturating_sub(n), len - 1)
    } else {
        let Ok(s) = a.parse::<u64>() else {
            return RangeReq::Unsatisfiable;
        };
        let e = if b.is_empty() {
            len.saturating_sub(1)
        } else {
            match b.parse::<u64>() {
                Ok(e) => e.min(len.saturating_sub(1)),
                Err(_) => return RangeReq::Unsatisfiable,
            }
        };
        (s, e)
    };
    if start >= len || start > end {
        return RangeReq::Unsatisfiable;
    }
    RangeReq::Part(start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), RangeReq::Full);
        assert_eq!(parse_range(Some("bytes=0-4"), 10), RangeReq::Part(0, 4));
        assert_eq!(parse_range(Some("bytes=5-"), 10), RangeReq::Part(5, 9));
        assert_eq!(parse_range(Some("bytes=-3"), 10), RangeReq::Part(7, 9));
        assert_eq!(parse_range(Some("bytes=8-100"), 10), RangeReq::Part(8, 9));
        assert_eq!(parse_range(Some("bytes=10-"), 10), RangeReq::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=x-"), 10), RangeReq::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10), RangeReq::Full);
    }

    #[test]
    fn put_is_content_addressed() {
        let d = tempfile::tempdir().unwrap();
        let s = ArtifactStore::open(d.path()).unwrap();
        let h = s.put(b"hello").unwrap();
        assert!(s.has(&h, 5));
        assert!(!s.has(&h, 6));
        assert!(s.path("../etc").is_none());
    }
}
